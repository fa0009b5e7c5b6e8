"""Assemble a site from a MONAI bundle, a site datalist and adapter settings, and export it back as bundles.

The same :func:`build_adapted` builds the network on a site and on the machine that builds a job, so the job's
schema (shared keys and shapes) and base fingerprint are those every site will compute.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from flare_duallora.bundle import BundleConfigError, BundleRuntime, export_bundle
from flare_duallora.bundle.runtime import innermost
from flare_duallora.data.datalists import read_site_datalist
from flare_duallora.data.records import DatasetFormatError
from flare_duallora.engine import AdaptedNetwork, AdapterSettings, adapt, get_method
from flare_duallora.engine.fingerprint import fingerprint
from flare_duallora.training.class_weights import apply_class_weighting
from flare_duallora.training.batch import pick_device
from flare_duallora.training.site import SiteTrainer, make_loader
from flare_duallora.training.tasks import Task, detect_task, make_task

__all__ = ["EXPORT_KINDS", "SiteBuild", "build_adapted", "build_site", "export_site_bundles", "network_overrides",
           "site_task"]

EXPORT_KINDS = ("personalised", "global")


def network_overrides(overrides: Optional[Mapping[str, Any]], datalist: Optional[str | Path]) -> tuple[dict, dict]:
    """The bundle overrides a site builds with (its datalist as the ``datalist`` id, the datalist's class count as
    ``num_classes``) and the datalist's content (empty without a datalist).  Raises ``DatasetFormatError``."""
    out = dict(overrides or {})
    info: dict = {}
    if datalist is not None:
        info = read_site_datalist(datalist)
        out["datalist"] = str(datalist)
        if "num_classes" in info:
            out.setdefault("num_classes", info["num_classes"])
    return out, info


def build_adapted(runtime: BundleRuntime, settings: AdapterSettings, allow_random_base: bool = False
                  ) -> tuple[AdaptedNetwork, str]:
    """The bundle's network with its pretrained base loaded, adapted for ``settings``; and where the base came from.

    The network is built under ``torch.manual_seed(settings.seed)`` so that, with ``allow_random_base``, every site
    builds the same random base (a bundle without ``models/model.pt`` is otherwise refused: each site would average
    adapters trained on a different random network).
    """
    if not runtime.pretrained_path.is_file() and not allow_random_base:
        raise BundleConfigError(
            f"bundle {runtime.bundle_root} has no pretrained weights ({runtime.pretrained_path} is missing): every site "
            f"would fine-tune its own random network and the shared adapters would be averaged across different "
            f"bases. Add models/model.pt (flare-duallora pretrain) or set allow_random_base = true")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        net = runtime.build_network()
    loaded = runtime.load_pretrained(net)
    source = str(runtime.pretrained_path) if loaded else f"random (seed {settings.seed}, allow_random_base)"
    return adapt(net, settings), source


def site_task(runtime: BundleRuntime, setting: str = "auto", net: Optional[torch.nn.Module] = None,
              num_classes: Optional[int] = None, label_names: Optional[list] = None) -> tuple[Task, str]:
    """The site's task object and how it was chosen; ``ValueError`` naming what is missing when the bundle cannot
    be evaluated."""
    choice = detect_task(runtime, setting, net)
    if choice.name is None:
        raise BundleConfigError(choice.reason)
    from flare_duallora.training.tasks import TASKS

    problems = TASKS[choice.name].problems(runtime)
    if problems:
        raise BundleConfigError(f"bundle {runtime.bundle_root} is a {choice.name} bundle ({choice.reason}) the plugin "
                                f"cannot train and evaluate: " + "; ".join(problems))
    return make_task(choice.name, runtime, num_classes, label_names), choice.reason


def _item_files(dataset, index: int) -> str:
    """The files a data set's raw item names (``data[index]`` of a MONAI ``Dataset``), for messages."""
    data = getattr(dataset, "data", None)
    try:
        item = data[index] if data is not None else None
    except Exception:  # noqa: BLE001
        item = None
    if isinstance(item, Mapping):
        files = [f"{k}: {v}" for k, v in item.items() if isinstance(v, (str, Path))]
        return ", ".join(files) if files else str(item)[:300]
    return "" if item is None else str(item)[:300]


def _check_first_image(dataset, net: torch.nn.Module, datalist: Optional[Path], runtime: BundleRuntime) -> None:
    """The first training item must load and have the channels the network takes (say so here, naming the item,
    its files, the root cause and where the bundle reads its data; not deep inside torch)."""
    source = f"datalist {datalist}" if datalist is not None else runtime.data_sources()
    if len(dataset) == 0:
        raise DatasetFormatError(f"the training data set ({runtime.bundle_id('train#dataset')}) is empty: data read "
                                 f"from {source} (bundle {runtime.bundle_root})")
    try:
        first = dataset[0]
    except Exception as e:  # noqa: BLE001 - a loader error names the file it could not read
        files = _item_files(dataset, 0)
        raise DatasetFormatError(
            f"training item 0 ({files or 'no file names'}) cannot be loaded: {innermost(e)} "
            f"(data read from {source}; bundle {runtime.bundle_root})") from None
    if isinstance(first, (list, tuple)) and first and isinstance(first[0], Mapping):
        first = first[0]  # a transform that gives several crops per item
    image = first.get("image") if isinstance(first, Mapping) else None
    if image is None:
        return
    conv = next((m for m in net.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))), None)
    if conv is not None and tuple(image.shape)[0] != conv.in_channels:
        raise DatasetFormatError(
            f"{source}: training item 0 has {tuple(image.shape)[0]} image channel(s) (shape "
            f"{tuple(image.shape)}) but the network's input layer takes {conv.in_channels}")


@dataclass
class SiteBuild:
    """A site ready to train: its trainer and what it was built from."""

    trainer: SiteTrainer
    runtime: BundleRuntime
    settings: AdapterSettings
    bundle_root: Path
    network_overrides: dict  # the overrides that shape the network (baked into exported bundles)
    task: str  # classification | segmentation (the trainer's task object evaluates)
    base_source: str  # models/model.pt, or the seed of an allowed random base
    fingerprint: str  # of the frozen base, frozen adapters, layout and method
    train_dataset: Any
    datalist: Optional[Path] = None
    datalist_info: dict = field(default_factory=dict)

    @property
    def adapted(self) -> AdaptedNetwork:
        return self.trainer.adapted

    @property
    def dataset_size(self) -> int:
        return len(self.train_dataset)


def build_site(
    bundle_root: str | Path,
    settings: AdapterSettings | Mapping[str, Any],
    datalist: Optional[str | Path] = None,
    overrides: Optional[Mapping[str, Any]] = None,
    device: str = "auto",
    amp: bool = True,
    seed: int = 0,
    allow_random_base: bool = False,
    task: str = "auto",
    bundle_ids: Optional[Mapping[str, str]] = None,
) -> SiteBuild:
    """Check the datalist, build the bundle's network with its pretrained base, inject adapters, make loaders.

    The pretrained ``models/model.pt`` is loaded into the plain network *before* injection, so the frozen base is
    exactly the bundle's; the bundle's own loss and optimiser (over the trainable parameters only) are used.
    ``task``: ``auto`` (read from the bundle, :func:`~flare_duallora.training.tasks.detect_task`), ``classification``
    or ``segmentation``; ``bundle_ids``: the bundle's own names of the standard ids (``{"train#dataset":
    "train_dataset"}``).
    """
    settings = settings if isinstance(settings, AdapterSettings) else AdapterSettings.from_dict(settings)
    datalist = Path(datalist) if datalist is not None else None
    overrides, info = network_overrides(overrides, datalist)
    runtime = BundleRuntime(bundle_root, overrides=overrides, ids=bundle_ids)
    if datalist is not None and "num_classes" not in info and runtime.num_classes is not None:
        read_site_datalist(datalist, runtime.num_classes)  # labels against the bundle's class count
    apply_class_weighting(runtime)  # the bundle's class_weighting, from this site's training labels
    adapted, source = build_adapted(runtime, settings, allow_random_base)
    fp = fingerprint(adapted)  # on the CPU copy, before training
    site_task_, _ = site_task(runtime, task, adapted.net, info.get("num_classes", runtime.num_classes),
                              info.get("label_names", runtime.label_names))
    train_dataset = runtime.train_dataset
    _check_first_image(train_dataset, adapted.net, datalist, runtime)
    dev = pick_device(device)
    adapted.net.to(dev)
    optimizer = runtime.make_optimizer(adapted.trainable_parameters())
    collate = site_task_.collate_fn
    train_loader = make_loader(train_dataset, runtime.batch_size, True, runtime.num_workers, seed, collate)
    val_loader = make_loader(runtime.val_dataset, runtime.val_batch_size, False, runtime.num_workers,
                             collate_fn=collate)
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
        task=site_task_,
    )
    return SiteBuild(
        trainer=trainer, runtime=runtime, settings=settings, bundle_root=Path(bundle_root),
        network_overrides={k: v for k, v in overrides.items() if k != "datalist"}, task=site_task_.name,
        base_source=source,
        fingerprint=fp, train_dataset=train_dataset, datalist=datalist, datalist_info=info,
    )


def export_site_bundles(site: SiteBuild, out_dir: str | Path, site_name: str = "site",
                        details: Optional[Mapping[str, Any]] = None) -> dict[str, Path]:
    """Write the site's personalised (base + shared + private) and global-only models as plain MONAI bundles.

    Each ``<out_dir>/<kind>/models/model.pt`` loads strictly into the exported bundle's ``network_def``, so a
    hospital runs its personalised model with standard MONAI tooling (``monai.bundle.load``, ``ConfigWorkflow``).
    A method that trains its own network (pFedST's side-tuned wrapper) exports that network's ``network_def``.

    Only plain-data overrides (no expression, reference or component key; see
    :func:`~flare_duallora.bundle.paths.code_in_overrides`) are baked into the exported configs, and
    ``metadata.json`` lists them (``trained_weights.bundle_overrides``): loading an exported bundle runs nothing a
    job sent, even where the site allowed job code.
    """
    from flare_duallora.bundle.paths import code_in_overrides

    overrides = {k: v for k, v in site.network_overrides.items() if not code_in_overrides({k: v})}
    applied = sorted(overrides)
    settings = site.settings
    spec = get_method(settings.method)
    if spec.export_network_def is not None:
        overrides["network_def"] = spec.export_network_def(site.runtime.get("network_def"), settings)
    contents = site.adapted.global_only_contents()
    out = {}
    for kind in EXPORT_KINDS:
        if kind == "personalised":
            what = "base + shared + private parts (adapters, head, statistics): the site's personalised model"
            extra = {}
        else:
            what = global_only_description(contents)
            extra = {"global_only": contents}
        out[kind] = export_bundle(
            site.bundle_root,
            Path(out_dir) / kind,
            site.adapted.export(kind),
            description=f"{kind} model of {site_name} after federated {settings.method} fine-tuning",
            config_overrides=overrides,
            trained_weights={"what": what, "site": site_name, "method": settings.method,
                             "base": site.base_source, "bundle_overrides": applied, **extra,
                             **dict(details or {})},
        )
    return out


def global_only_description(contents: Mapping[str, Any]) -> str:
    """One line for the global-only export's metadata: what it holds and what it leaves out."""
    shared = ", ".join(contents.get("shared") or []) or "nothing"
    left = ", ".join(contents.get("private_left_out") or []) or "nothing"
    text = f"base + shared parts only ({shared}); left out, private to the site: {left}"
    if not contents.get("trained_by_the_federation"):
        return text + ". The method shares nothing: this is NOT a federated model, only the pretrained base"
    if str(contents.get("head", "")).startswith("private"):
        return text + (". The head is private: this model carries the head as the site received it before "
                       "training, NOT a head trained by the federation")
    return text + ": the federation's global model"
