"""Assemble a :class:`SiteTrainer` from a MONAI bundle, a site datalist and adapter settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional

from flare_duallora.bundle import BundleRuntime, export_bundle
from flare_duallora.engine import AdapterSettings, adapt
from flare_duallora.training.site import SiteTrainer, make_loader, pick_device


def datalist_info(path: str | Path) -> dict:
    """``num_classes`` / ``label_names`` recorded in a site datalist (the data splitter writes them)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"datalist {path} does not exist (setting 'datalist_dir' or 'datalist')")
    with open(path) as f:
        info = json.load(f)
    return {k: info[k] for k in ("num_classes", "label_names") if k in info}


def build_site(
    bundle_root: str | Path,
    adapter: AdapterSettings | Mapping[str, Any],
    datalist: Optional[str | Path] = None,
    overrides: Optional[Mapping[str, Any]] = None,
    device: str = "auto",
    amp: bool = True,
    seed: int = 0,
) -> SiteTrainer:
    """Build the bundle's network, load its pretrained weights into the base, inject adapters, make loaders.

    The pretrained ``models/model.pt`` is loaded into the plain network *before* injection, so the frozen base
    is exactly the bundle's; the bundle's own loss and optimiser (over the trainable parameters only) are used.
    """
    settings = adapter if isinstance(adapter, AdapterSettings) else AdapterSettings.from_dict(adapter)
    overrides = dict(overrides or {})
    info: dict = {}
    if datalist is not None:
        overrides["datalist"] = str(datalist)
        info = datalist_info(datalist)
    if "num_classes" in info:
        overrides.setdefault("num_classes", info["num_classes"])
    runtime = BundleRuntime(bundle_root, overrides=overrides)
    net = runtime.build_network()
    runtime.load_pretrained(net)
    adapted = adapt(net, settings)
    dev = pick_device(device)
    adapted.net.to(dev)
    optimizer = runtime.make_optimizer(adapted.trainable_parameters())
    train_loader = make_loader(runtime.train_dataset, runtime.batch_size, True, runtime.num_workers, seed)
    val_loader = make_loader(runtime.val_dataset, runtime.val_batch_size, False, runtime.num_workers)
    trainer = SiteTrainer(
        adapted,
        runtime.loss,
        optimizer,
        train_loader,
        val_loader,
        device=dev,
        amp=amp,
        num_classes=info.get("num_classes", runtime.num_classes),
        label_names=info.get("label_names", runtime.label_names),
        seed=seed,
    )
    trainer.runtime = runtime
    trainer.bundle_root = Path(bundle_root)
    # the overrides that shape the network: baked into exported bundles so network_def matches the weights
    trainer.network_overrides = {k: v for k, v in overrides.items() if k != "datalist"}
    return trainer


EXPORT_KINDS = ("personalised", "global")


def export_site_bundles(trainer: SiteTrainer, out_dir: str | Path, site: str = "site") -> dict[str, Path]:
    """Write the site's personalised (base + shared + private) and global-only models as plain MONAI bundles.

    Each ``<out_dir>/<kind>/models/model.pt`` loads strictly into the original bundle's ``network_def``, so a
    hospital runs its personalised model with standard MONAI tooling (``monai.bundle.load``, ``ConfigWorkflow``).
    """
    overrides = dict(trainer.network_overrides)
    settings = trainer.adapted.settings
    if settings.method == "pfedst":  # the exported network is the side-tuned wrapper around the bundle's network
        from flare_duallora.engine.pfedst import network_def

        overrides["network_def"] = network_def(trainer.runtime.get("network_def"), settings)
    out = {}
    for kind in EXPORT_KINDS:
        out[kind] = export_bundle(
            trainer.bundle_root,
            Path(out_dir) / kind,
            trainer.adapted.export(kind),
            description=f"{kind} model of {site} after federated {trainer.adapted.settings.method} fine-tuning",
            config_overrides=overrides,
        )
    return out
