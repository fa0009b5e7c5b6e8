"""Training speed of the executor's local loop, side by side with a bare reference loop, in one process.

Every mode runs through :class:`~flare_duallora.training.site.SiteTrainer` (the code the FLARE executor runs), data
already on the device.  Its reference runs in the same process, interleaved with it: ``repetitions`` of ``steps``
optimiser steps each, within which a mode and its reference alternate in chunks of a few steps (A B, B A, ...), each
chunk after one untimed step of the same loop (so that no loop pays for coming back into the caches after the other
one ran).  A reading and its reference thus see the same machine load.  A ratio is computed within each repetition,
and the median and the spread (quartiles, min - max) over the repetitions are reported.

=======================  ====================================================  =========================  ======
mode                     what runs                                             reference (same process)   target
=======================  ====================================================  =========================  ======
``dual_last2``           Med-DualLoRA on the last 2 blocks (SDPA attention)    ``bare_dual_last2``        0.98
``dual_last2_cached``    the same with the frozen-prefix cache (suffix only)   ``bare_dual_last2_cached`` 0.98
``pfedst``               pFedST (frozen backbone + side network)               -                          -
``pfedst_cached``        pFedST with the backbone-states cache (side only)     ``pfedst``                 1.6
``forward``              forward pass alone, no gradient (a ceiling)           -                          -
``full``                 full fine-tuning                                      -                          -
``lora_all``             one LoRA on every block (FedIT)                       -                          -
``dual_last2_einsum``    ``dual_last2`` with MONAI's einsum attention          -                          -
``seg_dual_last2``       Med-DualLoRA on a UNETR-style segmenter (ViT encoder  ``bare_seg_dual_last2``    0.95
                         adapted in its last 2 blocks, the decoder trained),
                         DiceCE loss, segmentation task
=======================  ====================================================  =========================  ======

The bare loops use no project code: a plain MONAI ``ViT`` with peft's ``inject_adapter_in_model`` (adapters
``global`` and ``local`` on ``attn.qkv`` / ``attn.out_proj`` of the last two blocks, the head trainable), AdamW,
``cross_entropy``, ``zero_grad / backward / step`` (and, for the cached one, the tokens entering block ``L - 2``
computed once with ``torch.no_grad``).  They start from the project network's weights (copied by state dict), so
both loops train the same function on the same batches (:func:`loss_trajectories`; a test checks it to 1e-5).

For pFedST the reference of the cached mode is the uncached mode: the ratio is the speed-up of the cache.

The segmentation reference (``bare_seg_dual_last2``) is the same network class (``ViTSegmenter``, the reference
bundle's) with peft's adapters injected by hand on the last two blocks' attention, the decoder trainable, MONAI's
``DiceCELoss``, AdamW and ``zero_grad / backward / step``: what a user would write around the same network.
"""

from __future__ import annotations

import csv
import re
import resource
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from flare_duallora.bench.comm import TINY_CMR, VIT_B_CMR
from flare_duallora.engine import AdapterSettings, adapt
from flare_duallora.nets import ViTClassifier
from flare_duallora.training.batch import pick_device
from flare_duallora.training.site import SiteTrainer

# the issue's setting: MONAI ViT hidden 192 (ViT-Tiny width), 6 blocks, 2x64x64x8 input, 8x8x2 patches (256 tokens +
# cls), batch 8
ISSUE_NET = dict(in_channels=2, img_size=(64, 64, 8), patch_size=(8, 8, 2), num_classes=2, hidden_size=192,
                 mlp_dim=768, num_layers=6, num_heads=3, spatial_dims=3, qkv_bias=True)
# the segmentation modes' network: the reference segmentation bundle's UNETR-style ViTSegmenter, 4 classes
TINY_SEG = dict(in_channels=1, img_size=(16, 16, 4), patch_size=(8, 8, 2), out_channels=4, hidden_size=32, mlp_dim=64,
                num_layers=4, num_heads=4, spatial_dims=3, qkv_bias=True, feature_size=4)
# the classification modes' encoder with the decoder width of the benchmark's segmentation bundle (feature_size 8)
ISSUE_SEG = dict(in_channels=1, img_size=(64, 64, 8), patch_size=(8, 8, 2), out_channels=4, hidden_size=192,
                 mlp_dim=768, num_layers=6, num_heads=3, spatial_dims=3, qkv_bias=True, feature_size=8)
VIT_B_SEG = dict(in_channels=1, img_size=(192, 192, 16), patch_size=(16, 16, 4), out_channels=4, hidden_size=768,
                 mlp_dim=3072, num_layers=12, num_heads=12, spatial_dims=3, qkv_bias=True, feature_size=16)
SETTINGS = {
    "tiny": dict(net=TINY_CMR, seg_net=TINY_SEG, batch=8, steps=4, repetitions=5, warmup=1),
    "small": dict(net=ISSUE_NET, seg_net=ISSUE_SEG, batch=8, steps=16, repetitions=7, warmup=2),
    "medium": dict(net=ISSUE_NET, seg_net=ISSUE_SEG, batch=8, steps=32, repetitions=11, warmup=3),
    "full": dict(net=VIT_B_CMR, seg_net=VIT_B_SEG, batch=64, steps=20, repetitions=5, warmup=3),
}
MODES = ("dual_last2", "dual_last2_cached", "pfedst", "pfedst_cached", "forward", "full", "lora_all",
         "dual_last2_einsum", "dual_last2_dp", "dual_last2_cached_dp", "seg_dual_last2")
DEFAULT_MODES = ("dual_last2", "dual_last2_cached", "pfedst", "pfedst_cached")
REFERENCE = {"dual_last2": "bare_dual_last2", "dual_last2_cached": "bare_dual_last2_cached",
             "pfedst_cached": "pfedst", "dual_last2_dp": "dual_last2", "dual_last2_cached_dp": "dual_last2_cached",
             "seg_dual_last2": "bare_seg_dual_last2"}
# DP-SGD: at most 1.5 x slower than the same non-private loop
TARGET = {"dual_last2": 0.98, "dual_last2_cached": 0.98, "pfedst_cached": 1.6, "dual_last2_dp": 1 / 1.5,
          "dual_last2_cached_dp": 1 / 1.5, "seg_dual_last2": 0.95}
# the DP modes' budget: calibrated for far more steps than a benchmark takes (the noise level does not change the cost)
BENCH_DP = {"epsilon": 8.0, "delta": 1e-5, "max_grad_norm": 1.0, "rounds": 10**6}
HEAD = "vit.classification_head"
LR = 1e-4


def _adapter_settings(mode: str) -> AdapterSettings:
    if mode.startswith("seg_"):
        return AdapterSettings(method="duallora", blocks="last:2", head="decoder", rank=8)
    if mode == "full":
        return AdapterSettings(method="full", head=HEAD)
    if mode == "lora_all":
        return AdapterSettings(method="fedit", head=HEAD, rank=8)
    if mode.startswith("pfedst"):
        return AdapterSettings(method="pfedst", head=HEAD, rank=8)
    return AdapterSettings(method="duallora", blocks="last:2", head=HEAD, rank=8)


class TensorBatches:
    """An in-memory "loader" of device tensors: consecutive slices from the start at every pass."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int):
        self.x, self.y, self.batch_size = x, y, batch
        # the examples one by one (DP-SGD draws its own Poisson batches from them; the prefix cache reads them)
        self.dataset = [{"image": x[i], "label": y[i]} for i in range(len(y))]

    def __iter__(self):
        for i in range(0, len(self.y) - self.batch_size + 1, self.batch_size):
            yield {"image": self.x[i:i + self.batch_size], "label": self.y[i:i + self.batch_size]}

    @staticmethod
    def collate_fn(items):
        return {"image": torch.stack([d["image"] for d in items]), "label": torch.stack([d["label"] for d in items])}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Recorder(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.values = inner, []

    def forward(self, out, y):
        loss = self.inner(out, y)
        self.values.append(float(loss.detach()))
        return loss


class ProjectLoop:
    """``SiteTrainer.train_round(steps=...)`` on an adapted ``ViTClassifier``: what the executor runs."""

    def __init__(self, mode: str, net_cfg: dict, x: torch.Tensor, y: torch.Tensor, batch: int, device: torch.device,
                 seed: int = 0):
        self.mode, self.device = mode, device
        torch.manual_seed(seed)
        segmentation = mode.startswith("seg_")
        if segmentation:
            from flare_duallora.nets.vit_segmenter import ViTSegmenter

            self.net = ViTSegmenter(**net_cfg)
        else:
            self.net = ViTClassifier(**net_cfg, sdpa=(mode != "dual_last2_einsum"))
        private = mode.endswith("_dp")
        mode = mode.removesuffix("_dp")
        self.x, self.batch = x, batch
        if mode == "forward":
            self.net.to(device).eval()
            return
        self.adapted = adapt(self.net, _adapter_settings(mode))
        opt = torch.optim.AdamW(self.adapted.trainable_parameters(), lr=LR, fused=device.type == "cuda")
        if segmentation:
            from monai.losses import DiceCELoss

            from flare_duallora.training.tasks import SegmentationTask

            loss, task = DiceCELoss(to_onehot_y=True, softmax=True), SegmentationTask(net_cfg["out_channels"])
        else:
            loss, task = torch.nn.CrossEntropyLoss(), None
        self.trainer = SiteTrainer(self.adapted, loss, opt, TensorBatches(x, y, batch), device=device,
                                   amp=device.type == "cuda", task=task)
        self.cache_reason = None
        data = self.trainer.train_loader.dataset
        if mode.endswith("_cached"):
            self.cache_reason = self.trainer.configure_cache("on", data).reason
        if private:  # DP-SGD through the training-step seam the executor installs
            from flare_duallora.training.privacy import install_training_step

            install_training_step(self.trainer, BENCH_DP, data, batch)

    def run(self, steps: int) -> float:
        """Seconds for ``steps`` optimiser steps (the device synchronised at the end)."""
        _sync(self.device)
        start = time.perf_counter()
        if self.mode == "forward":
            amp = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else \
                torch.autocast("cpu", enabled=False)
            n = len(self.x) // self.batch
            with torch.no_grad(), amp:
                for i in range(steps):
                    j = (i % n) * self.batch
                    self.net(self.x[j:j + self.batch])
        else:
            self.trainer.train_round(steps=steps)
        _sync(self.device)
        return time.perf_counter() - start

    def trajectory(self, steps: int) -> list[float]:
        """The loss of each of ``steps`` steps (for checking that two loops train the same function)."""
        inner = self.trainer.loss_fn
        self.trainer.loss_fn = rec = _Recorder(inner)
        try:
            self.trainer.train_round(steps=steps)
        finally:
            self.trainer.loss_fn = inner
        return rec.values

    def trainable_state(self) -> dict[str, torch.Tensor]:
        strip = "" if self.mode.startswith("seg_") else "vit."  # the bare classifier is a MONAI ViT (no prefix)
        return {k.removeprefix(strip) if strip else k: p.detach().clone()
                for k, p in self.adapted.net.named_parameters() if p.requires_grad}


class BareLoop:
    """The hand-written reference: plain MONAI ViT + peft, AdamW, ``zero_grad / backward / step``.  No project code.

    ``cached``: the tokens entering the first adapted block are computed once (``torch.no_grad``, eval mode) and each
    step runs the last two blocks, the final norm and the head on them."""

    def __init__(self, project_net: torch.nn.Module, net_cfg: dict, x: torch.Tensor, y: torch.Tensor, batch: int,
                 device: torch.device, cached: bool = False, adapted_blocks: int = 2, rank: int = 8):
        from monai.networks.nets import ViT
        from peft import LoraConfig, inject_adapter_in_model
        from peft.functional import set_adapter

        self.device, self.batch, self.cached = device, batch, cached
        cfg = {k: v for k, v in net_cfg.items() if k != "sdpa"}
        vit = ViT(**cfg, classification=True, post_activation=None)
        for blk in vit.blocks:
            blk.attn.use_flash_attention = True
        for p in vit.parameters():
            p.requires_grad = False
        n = len(vit.blocks)
        self.k = n - adapted_blocks
        last = "|".join(str(i) for i in range(self.k, n))
        pattern = rf".*blocks\.({last})\.attn\.(qkv|out_proj)"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # two adapters: intended
            for name in ("global", "local"):
                inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=pattern), vit,
                                        adapter_name=name)
        set_adapter(vit, ["global", "local"])
        for p in vit.classification_head.parameters():
            p.requires_grad = True
        # the same weights as the project's network (ViTClassifier keeps MONAI's names under "vit.")
        vit.load_state_dict({re.sub(r"^vit\.", "", k): v for k, v in project_net.state_dict().items()}, strict=True)
        self.vit = vit.to(device)
        self.params = [p for p in vit.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=LR, fused=device.type == "cuda")
        self.amp = device.type == "cuda"
        self.x, self.y = x, y
        if cached:
            vit.eval()
            with torch.no_grad(), self._autocast():
                chunks = []
                for i in range(0, len(x), batch):
                    h = vit.patch_embedding(x[i:i + batch])
                    h = torch.cat((vit.cls_token.expand(h.shape[0], -1, -1), h), dim=1)
                    for blk in vit.blocks[: self.k]:
                        h = blk(h)
                    chunks.append(h.float())
            self.tokens = torch.cat(chunks)

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else torch.autocast("cpu", enabled=False)

    def _forward(self, i: int) -> torch.Tensor:
        vit = self.vit
        if not self.cached:
            return vit(self.x[i:i + self.batch])[0]
        h = self.tokens[i:i + self.batch]
        for blk in vit.blocks[self.k:]:
            h = blk(h)
        return vit.classification_head(vit.norm(h)[:, 0])

    def _loss(self, i: int) -> torch.Tensor:
        return F.cross_entropy(self._forward(i).float(), self.y[i:i + self.batch])

    def _loop(self, steps: int, record: Optional[list] = None) -> None:
        self.vit.train()
        n = len(self.y) - len(self.y) % self.batch
        total = torch.zeros((), device=self.device)
        for s in range(steps):
            i = (s * self.batch) % n
            with self._autocast():
                loss = self._loss(i)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            total += loss.detach()
            if record is not None:
                record.append(float(loss.detach()))
        float(total)  # one host sync per round, as SiteTrainer does

    def run(self, steps: int) -> float:
        _sync(self.device)
        start = time.perf_counter()
        self._loop(steps)
        _sync(self.device)
        return time.perf_counter() - start

    def trajectory(self, steps: int) -> list[float]:
        values: list[float] = []
        self._loop(steps, values)
        return values

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self.vit.named_parameters() if p.requires_grad}


class BareSegLoop(BareLoop):
    """The hand-written segmentation reference: the same ``ViTSegmenter`` class, peft's ``global`` and ``local``
    adapters injected on the last two blocks' attention, the decoder trainable, MONAI's ``DiceCELoss``, AdamW and
    ``zero_grad / backward / step``.  No project code in the loop; the network starts from the project's weights."""

    def __init__(self, project_net: torch.nn.Module, net_cfg: dict, x: torch.Tensor, y: torch.Tensor, batch: int,
                 device: torch.device, rank: int = 8):
        from monai.losses import DiceCELoss
        from peft import LoraConfig, inject_adapter_in_model
        from peft.functional import set_adapter

        from flare_duallora.nets.vit_segmenter import ViTSegmenter

        self.device, self.batch, self.cached = device, batch, False
        net = ViTSegmenter(**net_cfg)
        for p in net.parameters():
            p.requires_grad = False
        n = len(net.vit.blocks)
        last = "|".join(str(i) for i in range(n - 2, n))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # two adapters: intended
            for name in ("global", "local"):
                inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank,
                                                   target_modules=rf"vit\.blocks\.({last})\.attn\.(qkv|out_proj)"),
                                        net, adapter_name=name)
        set_adapter(net, ["global", "local"])
        for p in net.decoder.parameters():
            p.requires_grad = True
        net.load_state_dict(project_net.state_dict(), strict=True)
        self.vit = net.to(device)  # BareLoop's loop calls it self.vit
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=LR, fused=device.type == "cuda")
        self.amp = device.type == "cuda"
        self.x, self.y = x, y
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True)

    def _loss(self, i: int) -> torch.Tensor:  # BareLoop's loop, MONAI's DiceCE on the whole network's output
        return self.loss(self.vit(self.x[i:i + self.batch]).float(), self.y[i:i + self.batch])


def _data(cfg: dict, n: int, device: torch.device, seed: int = 0,
          segmentation: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    net = cfg["seg_net" if segmentation else "net"]
    x = torch.randn(n, net["in_channels"], *net["img_size"], generator=g)
    if segmentation:  # a label map per volume, channel first (what DiceCELoss(to_onehot_y=True) reads)
        y = torch.randint(0, net["out_channels"], (n, 1, *net["img_size"]), generator=g)
    else:
        y = torch.randint(0, net["num_classes"], (n,), generator=g)
    return x.to(device), y.to(device)


def build_loops(setting: str, modes: Sequence[str], device: torch.device, seed: int = 0) -> dict:
    """Every mode's loop and the references they need, on the same data (one pass = ``steps`` batches)."""
    cfg = SETTINGS[setting]
    data: dict = {}
    loops: dict = {}
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown speed mode {mode!r}; known: {', '.join(MODES)}")
        seg = mode.startswith("seg_")
        if seg not in data:
            data[seg] = _data(cfg, cfg["steps"] * cfg["batch"], device, seed, segmentation=seg)
        x, y = data[seg]
        if mode not in loops:
            loops[mode] = ProjectLoop(mode, cfg["seg_net" if seg else "net"], x, y, cfg["batch"], device, seed)
        ref = REFERENCE.get(mode)
        if ref is not None and ref not in loops:
            if seg:
                loops[ref] = BareSegLoop(loops[mode].net, cfg["seg_net"], x, y, cfg["batch"], device)
            elif ref.startswith("bare_"):
                loops[ref] = BareLoop(loops[mode].net, cfg["net"], x, y, cfg["batch"], device,
                                      cached=ref.endswith("_cached"))
            else:
                loops[ref] = ProjectLoop(ref, cfg["net"], x, y, cfg["batch"], device, seed)
    return loops


def loss_trajectories(setting: str = "tiny", mode: str = "dual_last2", steps: int = 3, device: str = "cpu",
                      seed: int = 0) -> tuple[list[float], list[float], dict, dict]:
    """Per-step losses of ``mode`` and of its reference from the same start, and their trainable weights after."""
    dev = pick_device(device)
    loops = build_loops(setting, [mode], dev, seed)
    project, reference = loops[mode], loops[REFERENCE[mode]]
    a, b = project.trajectory(steps), reference.trajectory(steps)
    return a, b, project.trainable_state(), reference.trainable_state()


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS, MiB (Linux: KiB)


def measure(setting: str = "tiny", modes: Sequence[str] = DEFAULT_MODES, device: str = "auto",
            repetitions: Optional[int] = None, steps: Optional[int] = None, seed: int = 0,
            log: Callable[[str], None] = lambda s: None) -> list[dict]:
    """One row per mode: median samples/s (and spread) and, where it has a reference, the median ratio to it."""
    cfg = SETTINGS[setting]
    dev = pick_device(device)
    reps = repetitions or cfg["repetitions"]
    steps = steps or cfg["steps"]
    chunk = max(1, min(cfg.get("chunk", 4), steps))
    loops = build_loops(setting, modes, dev, seed)
    # groups measured together: a mode and its reference, alternating chunk by chunk
    groups: list[tuple[str, ...]] = []
    for mode in modes:
        group = (mode, REFERENCE[mode]) if mode in REFERENCE else (mode,)
        if not any(set(group) <= set(g) for g in groups):
            groups = [g for g in groups if not set(g) <= set(group)] + [group]
    names = [n for g in groups for n in g]
    for name in names:
        loops[name].run(cfg["warmup"])
    seconds: dict[str, list[float]] = {name: [] for name in names}
    peak: dict[str, float] = {name: 0.0 for name in names}
    for r in range(reps):
        spent = {name: 0.0 for name in names}
        for group in (groups if r % 2 == 0 else groups[::-1]):
            for c in range(0, steps, chunk):
                n = min(chunk, steps - c)
                for name in (group if (r + c // chunk) % 2 == 0 else group[::-1]):
                    loops[name].run(1)  # untimed: back in the caches after the other loop ran
                    _peak_reset(dev)
                    spent[name] += loops[name].run(n)
                    peak[name] = max(peak[name], _peak(dev))
        for name in names:
            seconds[name].append(spent[name])
        log(f"repetition {r + 1}/{reps}: " + ", ".join(f"{n} {steps * cfg['batch'] / seconds[n][-1]:.1f}/s"
                                                       for n in names))
    rows = []
    samples = steps * cfg["batch"]
    for mode in modes:
        rate = [samples / t for t in seconds[mode]]
        ref = REFERENCE.get(mode)
        row = {"mode": mode, "reference": ref or "", "samples_per_s": statistics.median(rate),
               "samples_per_s_min": min(rate), "samples_per_s_max": max(rate)}
        if ref is not None:
            ratios = [tr / tm for tm, tr in zip(seconds[mode], seconds[ref])]  # (mode samples/s) / (ref samples/s)
            q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
            row.update(reference_samples_per_s=statistics.median(samples / t for t in seconds[ref]),
                       ratio=statistics.median(ratios), ratio_q1=q1, ratio_q3=q3, ratio_min=min(ratios),
                       ratio_max=max(ratios), target=TARGET[mode],
                       meets_target=statistics.median(ratios) >= TARGET[mode])
        else:
            row.update(reference_samples_per_s=None, ratio=None, ratio_q1=None, ratio_q3=None, ratio_min=None,
                       ratio_max=None, target=None, meets_target=None)
        row.update(setting=setting, batch=cfg["batch"], steps=steps, repetitions=reps,
                   peak_memory_mib=peak[mode], device=str(dev))
        rows.append(row)
    return rows


def write_tables(rows: list[dict], out_dir: Path, machine: str, setting: str) -> Path:
    """``speed.csv`` (every column) and ``speed.md`` (the table, the machine, how to read it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "speed.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    seg = all(str(r["mode"]).startswith("seg_") for r in rows)
    net = SETTINGS[setting]["seg_net" if seg else "net"]
    first = rows[0]
    shape = "x".join(map(str, (net["in_channels"], *net["img_size"])))
    what = (f"UNETR-style ViTSegmenter (decoder width {net['feature_size']}, {net['out_channels']} classes, DiceCE "
            f"loss), encoder: MONAI ViT" if seg else "MONAI ViT")
    lines = [
        f"# Local training speed, project loop vs bare loop ({setting} setting)", "",
        f"Machine: {machine}", "",
        f"{what} hidden {net['hidden_size']}, {net['num_layers']} blocks, input {shape}, patch "
        f"{'x'.join(map(str, net['patch_size']))}, batch {first['batch']}, AdamW, SDPA attention; "
        f"{first['repetitions']} repetitions of {first['steps']} steps in one process, each mode alternating "
        f"with its reference in chunks of {min(SETTINGS[setting].get('chunk', 4), first['steps'])} steps.", "",
        "| mode | samples/s: median (min-max) | reference | reference samples/s | ratio: median [quartiles] "
        "(min-max) | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rate = f"{r['samples_per_s']:,.1f} ({r['samples_per_s_min']:,.1f}-{r['samples_per_s_max']:,.1f})"
        if r["ratio"] is None:
            lines.append(f"| {r['mode']} | {rate} | - | - | - | - | - |")
        else:
            lines.append(
                f"| {r['mode']} | {rate} | {r['reference']} | {r['reference_samples_per_s']:,.1f} | "
                f"{r['ratio']:.3f} [{r['ratio_q1']:.3f}-{r['ratio_q3']:.3f}] ({r['ratio_min']:.3f}-"
                f"{r['ratio_max']:.3f}) | >= {r['target']} | "
                f"{'yes' if r['meets_target'] else 'no'} |")
    lines += [
        "", "ratio = (mode samples/s) / (reference samples/s), both measured in the same repetition; the median over "
        "the repetitions and its spread (quartiles, min-max) are shown.  For `dual_last2*` the reference is a bare loop (plain "
        "torch + peft, no project code) on the same network, weights and data (target >= 0.98); for `seg_dual_last2` "
        "it is the same segmentation network with peft's adapters injected by hand, DiceCE, AdamW (target >= 0.95); for "
        "`pfedst_cached` it is uncached pFedST, and the ratio is the speed-up of the backbone-states cache (target "
        ">= 1.6).  Readings taken while other work runs on the machine spread by several per cent: judge the "
        "median with its spread.  peak_memory_mib in speed.csv: on a GPU, the peak allocated during the mode's "
        "steps; on a CPU, the peak RSS of the whole benchmark process.",
    ]
    (out_dir / "speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return out_dir / "speed.md"
