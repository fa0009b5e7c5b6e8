"""Peak training memory of one method: real optimiser steps (forward, CE loss, backward, AdamW) on a MONAI ViT.

The figure is the memory a site needs to train: the resident tensors (weights, buffers, AdamW state, the batch)
plus the peak extra memory of a training step (activations kept for backward, gradients, temporaries).  One
warm-up step runs first (kernels loaded, AdamW state allocated), then ``steps`` measured steps:

* CUDA: ``torch.cuda.max_memory_allocated`` over the measured steps (peak stats reset after the warm-up).
* CPU (Linux): there is no allocator counter, so the step part is the increase of the process's peak resident set
  size (``VmHWM``) over its RSS at the start of the measured steps (peak reset through ``/proc/self/clear_refs``,
  Linux >= 4.0); the resident part is counted exactly from the tensors.  For the RSS to follow the live tensors,
  glibc's mmap threshold is fixed at 64 KiB while measuring, so every tensor block of 64 KiB or more is its own
  mapping, given back to the system when freed (glibc's default threshold grows up to 32 MiB and freed blocks
  then stay resident: the figure would depend on what the process did before).  Afterwards the threshold is set
  to 32 MiB (glibc's dynamic maximum).  With this the figures repeat to within about 0.5 MiB, in any order.

``isolate=True`` runs the measurement in a fresh Python process (slower: torch, monai and peft are imported again).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import re
import subprocess
import sys
from typing import Iterator, Optional, Union

import torch

# ViT hidden 192 (ViT-Tiny width), 6 blocks, 3D 32x32x8 with 4x4x2 patches: 256 tokens + cls
MEMORY_NET = dict(in_channels=2, img_size=(32, 32, 8), patch_size=(4, 4, 2), hidden_size=192, mlp_dim=768,
                  num_layers=6, num_heads=3, num_classes=2, spatial_dims=3, qkv_bias=True)
VIT_TARGETS = r".*blocks\.\d+\.attn\.(qkv|out_proj)"
# adapter settings per method, as the benchmark runs them (Med-DualLoRA / FedOPAL on the last two blocks)
METHOD_SETTINGS = {
    "duallora": dict(blocks="last:2"),
    "fedopal": dict(blocks="last:2"),
    "pfedst": dict(),
}

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_MEASURE_MMAP_THRESHOLD = 64 * 1024
_AFTER_MMAP_THRESHOLD = 32 * 2**20


def _settings(method: str, head: str, overrides: Optional[dict]):
    from flare_duallora.engine import AdapterSettings

    values = dict(method=method, target_modules=VIT_TARGETS, head=head, rank=8)
    values.update(METHOD_SETTINGS.get(method, {}))
    values.update(overrides or {})
    return AdapterSettings(**values)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    if m is None:
        raise OSError(f"no {field} in /proc/self/status")
    return int(m.group(1))


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def cpu_peak_supported() -> bool:
    """Whether this system can reset and read the peak RSS (Linux >= 4.0 with glibc)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kib("VmHWM")
    except OSError:
        return False
    return _libc() is not None


@contextlib.contextmanager
def _rss_follows_tensors() -> Iterator[None]:
    libc = _libc()
    if libc is None:
        raise OSError("peak training memory on CPU needs glibc (mallopt) and Linux /proc; measure on CUDA instead")
    libc.mallopt(_M_MMAP_THRESHOLD, _MEASURE_MMAP_THRESHOLD)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _AFTER_MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * _AFTER_MMAP_THRESHOLD)


def _reset_peak_rss() -> int:
    """Release free heap pages, reset the peak RSS and return the current RSS in bytes."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as err:
        raise OSError(f"the peak RSS cannot be reset here ({err}); peak training memory on CPU needs Linux >= 4.0")
    return _status_kib("VmRSS") * 1024


def _tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def _measure_here(method: str, net_kwargs: dict, batch: int, steps: int, device: str, settings: Optional[dict],
                  sdpa: bool, seed: int) -> dict:
    dev = torch.device(device)
    ctx = contextlib.nullcontext() if dev.type == "cuda" else _rss_follows_tensors()
    with ctx:
        return _measure(method, net_kwargs, batch, steps, dev, settings, sdpa, seed)


def _measure(method: str, net_kwargs: dict, batch: int, steps: int, dev: torch.device, settings: Optional[dict],
             sdpa: bool, seed: int) -> dict:
    from monai.networks.blocks.selfattention import SABlock
    from monai.networks.nets import ViT

    from flare_duallora.engine import adapt

    torch.manual_seed(seed)
    net = ViT(**net_kwargs, classification=True, post_activation=None)
    for module in net.modules():
        if isinstance(module, SABlock):
            module.use_flash_attention = sdpa
    adapted = adapt(net, _settings(method, "classification_head", settings))
    model = adapted.net.to(dev)
    model.train()
    adapted.freeze_base_statistics()
    opt = torch.optim.AdamW(adapted.trainable_parameters(), lr=1e-4)
    x = torch.randn(batch, net_kwargs["in_channels"], *net_kwargs["img_size"], device=dev)
    y = torch.randint(0, net_kwargs.get("num_classes", 2), (batch,), device=dev)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        out = model(x)
        logits = out[0] if isinstance(out, tuple) else out
        loss = loss_fn(logits.float(), y)
        reg = adapted.regularizer()
        if reg is not None:
            loss = loss + reg
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)  # gradients count as step memory, not as resident state

    step()  # warm-up: kernels loaded, AdamW state allocated
    state = [t for s in opt.state.values() for t in s.values()]
    static = _tensor_bytes([*model.parameters(), *model.buffers(), *state, x, y])
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        for _ in range(steps):
            step()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        step_bytes, how = peak - before, "cuda.max_memory_allocated"
    else:
        before = _reset_peak_rss()
        for _ in range(steps):
            step()
        step_bytes, how = _status_kib("VmHWM") * 1024 - before, "tensors + peak RSS increase"
        peak = static + step_bytes
    trainable = sum(p.numel() for p in adapted.trainable_parameters())
    return {"method": method, "device": str(dev), "batch": batch, "steps": steps, "peak_bytes": int(peak),
            "static_bytes": int(static), "step_bytes": int(step_bytes), "how": how,
            "trainable_params": int(trainable), "sdpa": sdpa}


def measure_peak_training_memory(
    method: str,
    net_kwargs: Optional[dict] = None,
    batch: int = 8,
    steps: int = 1,
    device: str = "cpu",
    settings: Optional[dict] = None,
    sdpa: bool = False,
    seed: int = 0,
    isolate: bool = False,
    detail: bool = False,
) -> Union[int, dict]:
    """Peak training memory (bytes) of ``method``: resident tensors + the peak extra memory of a training step.

    Args:
        method: a registered method (``pfedst``, ``duallora``, ...).
        net_kwargs: MONAI ``ViT`` arguments (default :data:`MEMORY_NET`); ``classification=True``, no Tanh.
        batch, steps: batch size and number of measured optimiser steps (after one warm-up step).
        device: ``cpu`` or ``cuda[:i]``.
        settings: ``AdapterSettings`` overrides on top of :data:`METHOD_SETTINGS` (rank 8, attention targets,
            head ``classification_head``; duallora/fedopal on the last two blocks), e.g.
            ``{"extra": {"reduction": 8}}`` for pFedST.
        sdpa: MONAI attention through ``scaled_dot_product_attention`` (``ViTClassifier(sdpa=True)``) instead of
            the einsum path of a plain MONAI ``ViT``.
        isolate: run in a fresh subprocess.
        detail: return a dict: ``peak_bytes`` (the figure), ``static_bytes`` (resident tensors), ``step_bytes``
            (peak extra memory of a step), ``trainable_params``, ...

    On CPU this changes glibc's mmap threshold of the calling process (see the module docstring).
    """
    net_kwargs = dict(MEMORY_NET if net_kwargs is None else net_kwargs)
    if isolate:
        args = dict(method=method, net_kwargs=net_kwargs, batch=batch, steps=steps, device=device,
                    settings=settings, sdpa=sdpa, seed=seed)
        code = ("import json, sys; from flare_duallora.bench.memory import _measure_here; "
                "print(json.dumps(_measure_here(**json.loads(sys.argv[1]))))")
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(_MEASURE_MMAP_THRESHOLD)}
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"memory measurement of {method!r} failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    else:
        result = _measure_here(method, net_kwargs, batch, steps, device, settings, sdpa, seed)
    return result if detail else result["peak_bytes"]


__all__ = ["MEMORY_NET", "METHOD_SETTINGS", "cpu_peak_supported", "measure_peak_training_memory"]
