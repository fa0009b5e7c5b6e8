"""Training speed of the executor's local loop: samples/s and peak memory per mode, data already on the device.

Modes (all through :class:`SiteTrainer`, i.e. the code the FLARE executor runs):

``forward``              forward pass alone (no grad), the ceiling for anything that runs the whole network
``full``                 full fine-tuning
``lora_all``             one LoRA on every block (FedIT)
``dual_last2``           Med-DualLoRA on the last two blocks (standard mode)
``dual_last2_einsum``    the same with MONAI's default einsum attention instead of SDPA
``dual_last2_cached``    the same with the frozen-prefix cache (suffix only; the cache is built once, untimed)
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from typing import Optional, Sequence

import torch

from flare_duallora.bench.comm import TINY_CMR, VIT_B_CMR
from flare_duallora.engine import AdapterSettings, adapt
from flare_duallora.nets import ViTClassifier
from flare_duallora.training.batch import pick_device
from flare_duallora.training.site import SiteTrainer

MODES = ("forward", "full", "lora_all", "dual_last2", "dual_last2_einsum", "dual_last2_cached")
SETTINGS = {
    "tiny": dict(net=TINY_CMR, batch=8, n_data=32, warmup=2, steps=6),
    "small": dict(net=dict(TINY_CMR, hidden_size=96, mlp_dim=192, num_layers=6, img_size=(32, 32, 8),
                           patch_size=(8, 8, 2)), batch=16, n_data=64, warmup=3, steps=10),
    "full": dict(net=VIT_B_CMR, batch=64, n_data=640, warmup=5, steps=30),
}


class TensorBatches:
    """An in-memory "loader" of device tensors (data already on the GPU, as in the speed targets)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int):
        self.x, self.y, self.batch_size = x, y, batch

    def __iter__(self):
        for i in range(0, len(self.y) - self.batch_size + 1, self.batch_size):
            yield {"image": self.x[i:i + self.batch_size], "label": self.y[i:i + self.batch_size]}


def _settings(mode: str) -> Optional[AdapterSettings]:
    head = "vit.classification_head"
    if mode == "full":
        return AdapterSettings(method="full", head=head)
    if mode == "lora_all":
        return AdapterSettings(method="fedit", head=head, rank=8)
    if mode.startswith("dual_last2"):
        return AdapterSettings(method="duallora", blocks="last:2", head=head, rank=8)
    return None


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS, MiB (Linux: KiB)


def measure_mode(mode: str, setting: str = "tiny", device: str = "auto", seed: int = 0) -> dict:
    cfg = SETTINGS[setting]
    dev = pick_device(device)
    torch.manual_seed(seed)
    net = ViTClassifier(**cfg["net"], sdpa=(mode != "dual_last2_einsum"))
    n, b = cfg["n_data"], cfg["batch"]
    x = torch.randn(n, *((cfg["net"]["in_channels"],) + tuple(cfg["net"]["img_size"])), device=dev)
    y = torch.randint(0, cfg["net"]["num_classes"], (n,), device=dev)
    amp = dev.type == "cuda"
    steps_per_epoch = n // b
    if mode == "forward":
        net.to(dev).eval()
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp else torch.autocast("cpu", enabled=False)
        with torch.no_grad(), ctx:
            for i in range(cfg["warmup"]):
                net(x[:b])
            _peak_reset(dev)
            start = time.perf_counter()
            for i in range(cfg["steps"]):
                j = (i % steps_per_epoch) * b
                net(x[j:j + b])
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - start
        samples = cfg["steps"] * b
    else:
        adapted = adapt(net, _settings(mode))
        opt = torch.optim.AdamW(adapted.trainable_parameters(), lr=1e-4, fused=dev.type == "cuda")
        trainer = SiteTrainer(adapted, torch.nn.CrossEntropyLoss(), opt, TensorBatches(x, y, b), device=dev, amp=amp)
        if mode == "dual_last2_cached":
            trainer.enable_prefix_cache(list({"image": x[i], "label": y[i]} for i in range(n)), transforms_random=False,
                                        batch_size=b)
        trainer.train_round(steps=cfg["warmup"])
        _peak_reset(dev)
        start = time.perf_counter()
        stats = trainer.train_round(steps=cfg["steps"])
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - start
        samples = stats.examples
    return {"mode": mode, "setting": setting, "batch": b, "samples_per_s": samples / seconds,
            "peak_memory_mib": _peak(dev), "device": str(dev)}


def speed_table(setting: str = "tiny", modes: Sequence[str] = MODES, device: str = "auto") -> list[dict]:
    """Each mode in a fresh process, so one mode's peak memory never shows in another's."""
    rows = []
    for mode in modes:
        code = ("import json; from flare_duallora.bench.speed import measure_mode; "
                f"print(json.dumps(measure_mode({mode!r}, {setting!r}, {device!r})))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"speed mode {mode} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows
