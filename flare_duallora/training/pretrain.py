"""Pretrain the reference backbone on a disjoint cohort, so LoRA adapts a network that already means something.

Supervised on *another label set* (the five-way pathology group rather than the federated task's disease
vs. normal), on subjects that never appear in the federation.  The saved ``models/model.pt`` matches the
bundle's ``network_def`` exactly: the pretraining head is dropped and the task head is freshly initialised
(every method trains the head anyway).
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
) -> Path:
    """Train every parameter of ``network_def`` on ``datalist`` and write ``<bundle>/models/model.pt``.

    ``progress`` shows a progress bar over the epochs (tqdm, on stderr) instead of one line per epoch."""
    if mode != "supervised":
        raise ValueError(f"setting 'mode' = {mode!r}: expected 'supervised'")
    info = json.loads(Path(datalist).read_text())
    k_pre = int(info["num_classes"])
    overrides = dict(overrides or {})
    runtime = BundleRuntime(bundle_root, overrides={**overrides, "datalist": str(datalist), "num_classes": k_pre})
    torch.manual_seed(seed)
    net = runtime.build_network()
    dev = pick_device(device)
    net.to(dev)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    loader = make_loader(runtime.train_dataset, runtime.batch_size, True, runtime.num_workers, seed)
    loss_fn = runtime.loss
    start = time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(range(epochs), desc="pretraining", unit="epoch", disable=not progress, file=sys.stderr)
    for epoch in bar:
        net.train()
        total, n = 0.0, 0
        for batch in loader:
            x, y = batch["image"].to(dev), labels_of(batch).to(dev)
            loss = loss_fn(logits_of(net(x)), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(y)
            n += len(y)
        sched.step()
        bar.set_postfix(loss=f"{total / max(n, 1):.4f}")
        if not progress:
            log(f"pretrain epoch {epoch + 1}/{epochs}: loss {total / max(n, 1):.4f}")
    # the federated task's network: same backbone, task head freshly initialised from the seed
    task = BundleRuntime(bundle_root, overrides=overrides)
    torch.manual_seed(seed + 1)
    target = task.build_network()
    target_sd = target.state_dict()
    heads = head_prefixes(target, int(task.num_classes or 2))
    pre_sd = net.state_dict()
    for key in target_sd:
        if not any(key.startswith(h + ".") for h in heads):
            if pre_sd[key].shape != target_sd[key].shape:
                raise ValueError(f"pretrained {key} {tuple(pre_sd[key].shape)} does not fit {tuple(target_sd[key].shape)}")
            target_sd[key] = pre_sd[key].detach().cpu()
    target.load_state_dict(target_sd, strict=True)
    out = Path(out_file) if out_file else task.pretrained_path
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(target.state_dict(), out)
    log(f"pretrained backbone written to {out} ({time.perf_counter() - start:.0f} s, head {heads} re-initialised)")
    return out
