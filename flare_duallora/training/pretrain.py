"""Pretrain the reference backbone on a disjoint cohort, so LoRA adapts a network that already means something.

Two modes, on subjects that never appear in the federation:

* ``mae`` (self-supervised, like a foundation model such as CineMA): masked autoencoding of the bundle's ViT,
  no label read (:mod:`flare_duallora.training.mae`);
* ``supervised``: on *another label set* (the five-way pathology group rather than the federated task's disease
  vs. normal).

The saved ``models/model.pt`` matches the bundle's ``network_def`` exactly: the backbone comes from pretraining and
the task head is freshly initialised (every method trains the head anyway).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Mapping, Optional

import torch

from flare_duallora.bundle import BundleRuntime
from flare_duallora.training.batch import labels_of, logits_of, pick_device
from flare_duallora.training.mae import MaskedAutoencoder
from flare_duallora.training.site import make_loader


def pooled_datalist(datalists: list[Path], out: Path) -> Path:
    """Merge several site datalists (same label mode) into one pooled datalist for pretraining."""
    merged: dict = {"training": [], "validation": []}
    for path in datalists:
        info = json.loads(Path(path).read_text())
        for split in ("training", "validation"):
            merged[split] += info.get(split, [])
        for key in ("num_classes", "label_names", "label_mode", "task"):
            merged.setdefault(key, info.get(key))
    merged["name"] = "pretraining"
    out.write_text(json.dumps(merged, indent=1))
    return out


def head_prefixes(net: torch.nn.Module, num_classes: int) -> list[str]:
    """State-dict prefixes of the output layer(s): parameters whose first dimension is the class count."""
    last = [n for n, p in net.named_parameters() if p.ndim == 2 and p.shape[0] == num_classes]
    return sorted({n.rsplit(".", 1)[0] for n in last[-1:]})


PRETRAIN_MODES = ("supervised", "mae")


def pretrain_backbone(
    bundle_root: str | Path,
    datalist: str | Path,
    overrides: Optional[Mapping] = None,
    epochs: int = 10,
    lr: float = 1e-3,
    device: str = "auto",
    seed: int = 0,
    out_file: Optional[str | Path] = None,
    log=print,
    mode: str = "supervised",
    progress: bool = True,
    mask_ratio: float = 0.75,
    history: Optional[list] = None,
) -> Path:
    """Pretrain the backbone of ``network_def`` on ``datalist`` and write ``<bundle>/models/model.pt``.

    ``mode``:

    * ``supervised``: every parameter trained with the bundle's loss on the datalist's labels (its ``num_classes``
      may differ from the task's); the pretraining head is then dropped.
    * ``mae``: self-supervised masked autoencoding (:mod:`flare_duallora.training.mae`) of the network's own MONAI
      ViT, as foundation models such as CineMA are pretrained: ``mask_ratio`` of the patch tokens masked, the
      visible ones (plus the cls token) encoded by the ViT, a light decoder reconstructs the masked patches' pixels
      (normalised per patch).  **No label is read**: the datalist's items need only their images (any ``label`` is
      replaced by a placeholder 0 so the bundle's transforms run).  AdamW (betas 0.9/0.95, weight decay 0.05) with a
      cosine schedule over the epochs; the bundle's training transforms (random augmentations included) apply.

    Either way the written checkpoint is the *task's* network (the bundle's ``num_classes``): the backbone from
    pretraining, the task head freshly initialised from ``seed + 1`` (every method trains the head), so it loads with
    ``strict=True`` into ``network_def``.  Written into the bundle's own ``models/model.pt``, the ``overrides`` the
    network was built with (its size) are written into the bundle's ``configs/train.json`` as well, so the bundle
    describes the network its weights belong to and loads without them.  ``progress`` shows a progress bar over the
    epochs (tqdm on a terminal; off a terminal, such as a log file, one line per 5 % of the epochs instead of
    carriage-return frames) instead of one line per epoch; ``history``, when given, receives each epoch's mean
    training loss.
    """
    if mode not in PRETRAIN_MODES:
        raise ValueError(f"setting 'mode' = {mode!r}: expected one of {PRETRAIN_MODES}")
    info = json.loads(Path(datalist).read_text())
    overrides = dict(overrides or {})
    dev = pick_device(device)
    start = time.perf_counter()
    from tqdm.auto import tqdm

    interactive = progress and _is_terminal(sys.stderr)
    bar = tqdm(range(epochs), desc=f"pretraining ({mode})", unit="epoch", disable=not interactive, file=sys.stderr)
    every = max(1, epochs // 20)  # off a terminal: a line per 5 % of the epochs
    if mode == "supervised":
        k_pre = int(info["num_classes"])
        runtime = BundleRuntime(bundle_root, overrides={**overrides, "datalist": str(datalist), "num_classes": k_pre})
        torch.manual_seed(seed)
        net = runtime.build_network()
        net.to(dev)
        step, params = _supervised_step(net, runtime.loss, dev), list(net.parameters())
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    else:
        items = [{**item, "label": 0} for item in info.get("training", [])]  # labels are never read
        if not items:
            raise ValueError(f"{datalist}: no 'training' items to pretrain on")
        runtime = BundleRuntime(bundle_root, overrides={**overrides, "datalist": str(datalist), "train_datalist": items})
        torch.manual_seed(seed)
        net = runtime.build_network()
        mae = MaskedAutoencoder(net, mask_ratio=mask_ratio).to(dev)
        masks = torch.Generator().manual_seed(seed)
        step, params = _mae_step(mae, dev, masks), list(mae.parameters())
        optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    loader = make_loader(runtime.train_dataset, runtime.batch_size, True, runtime.num_workers, seed)
    for epoch in bar:
        net.train()
        total, n = 0.0, 0
        for batch in loader:
            loss, size = step(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * size
            n += size
        sched.step()
        mean = total / max(n, 1)
        if history is not None:
            history.append(mean)
        bar.set_postfix(loss=f"{mean:.4f}")
        if not interactive and (not progress or (epoch + 1) % every == 0 or epoch + 1 == epochs):
            what = "reconstruction loss" if mode == "mae" else "loss"
            log(f"pretrain ({mode}) epoch {epoch + 1}/{epochs} ({100 * (epoch + 1) // max(epochs, 1)} %): "
                f"{what} {mean:.4f}")
    _calibrate_feature_norm(net, loader, dev)
    out, heads = _write_task_checkpoint(bundle_root, overrides, net.state_dict(), seed, out_file)
    log(f"pretrained backbone ({mode}) written to {out} ({time.perf_counter() - start:.0f} s, "
        f"head {heads} re-initialised)")
    return out


@torch.no_grad()
def _calibrate_feature_norm(net: torch.nn.Module, loader, dev: torch.device) -> None:
    """Set the statistics of a classifier's feature standardisation (``feature_norm``) from the pretrained backbone
    on the whole pretraining cohort: an average over every batch, frozen afterwards."""
    norm = getattr(net, "feature_norm", None)
    if norm is None:
        return
    seen: list[torch.Tensor] = []
    hook = norm.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().double()))
    was = net.training
    net.eval()  # the backbone runs as it will be used
    try:
        for batch in loader:
            net(batch["image"].to(dev))
    finally:
        hook.remove()
        net.train(was)
    feats = torch.cat(seen)
    norm.running_mean.copy_(feats.mean(0))
    norm.running_var.copy_(feats.var(0, unbiased=True) if len(feats) > 1 else torch.ones_like(feats[0]))
    norm.num_batches_tracked.fill_(len(seen))


def _supervised_step(net: torch.nn.Module, loss_fn, dev: torch.device):
    def step(batch) -> tuple[torch.Tensor, int]:
        x, y = batch["image"].to(dev), labels_of(batch).to(dev)
        return loss_fn(logits_of(net(x)), y), len(y)
    return step


def _mae_step(mae: MaskedAutoencoder, dev: torch.device, masks: torch.Generator):
    def step(batch) -> tuple[torch.Tensor, int]:
        x = batch["image"].to(dev)
        loss, _, _ = mae(x, generator=masks)
        return loss, x.shape[0]
    return step


def _write_task_checkpoint(bundle_root: str | Path, overrides: Mapping, pretrained: Mapping[str, torch.Tensor],
                           seed: int, out_file: Optional[str | Path]) -> tuple[Path, list[str]]:
    """The federated task's network: the pretrained backbone, the task head freshly initialised from ``seed + 1``;
    loaded strictly into ``network_def`` before it is written."""
    task = BundleRuntime(bundle_root, overrides=overrides)
    torch.manual_seed(seed + 1)
    target = task.build_network()
    target_sd = target.state_dict()
    heads = head_prefixes(target, int(task.num_classes or 2))
    for key in target_sd:
        if not any(key.startswith(h + ".") for h in heads):
            if pretrained[key].shape != target_sd[key].shape:
                raise ValueError(f"pretrained {key} {tuple(pretrained[key].shape)} does not fit "
                                 f"{tuple(target_sd[key].shape)}")
            target_sd[key] = pretrained[key].detach().cpu()
    target.load_state_dict(target_sd, strict=True)
    out = Path(out_file) if out_file else task.pretrained_path
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(target.state_dict(), out)
    if out == task.pretrained_path:
        write_config_values(bundle_root, overrides)
    return out, heads


#: override ids that name a site's data, never written into a bundle's configs
_DATA_IDS = ("datalist", "train_datalist", "val_datalist", "dataset_dir", "bundle_root")


def write_config_values(bundle_root: str | Path, values: Mapping, config_file: str = "configs/train.json") -> None:
    """Write ``values`` (``{config id: plain value}``, ids with ``#`` for nesting) into the bundle's main config, so
    that the bundle alone describes the network its ``models/model.pt`` was trained as.  Ids naming data are left
    out (:data:`_DATA_IDS`); the result is checked by building the network from the written configs."""
    from monai.bundle import ConfigParser

    values = {k: v for k, v in values.items() if k.split("#")[0] not in _DATA_IDS}
    if not values:
        return
    stem = (Path(bundle_root) / config_file).with_suffix("")
    main = next((stem.with_suffix(x) for x in (".json", ".yaml", ".yml") if stem.with_suffix(x).is_file()), None)
    if main is None:
        raise FileNotFoundError(f"{stem}.json (or .yaml): the bundle's main config is missing; cannot record the "
                                f"network's size in it")
    parser = ConfigParser(config=ConfigParser.load_config_file(main))
    for key, value in values.items():
        parser.set(value, key.replace("::", "#"))
    raw = parser.get()
    raw.pop(ConfigParser.meta_key, None)
    fmt = "json" if main.suffix == ".json" else "yaml"
    ConfigParser.export_config_file(raw, str(main), fmt=fmt, **({"indent": 4} if fmt == "json" else {}))


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
