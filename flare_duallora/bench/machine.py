"""Describe the machine a benchmark ran on (reported with every figure)."""

from __future__ import annotations

import os
import platform

import torch


def describe(device: torch.device | None = None) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        info["gpu"] = None
    return info


def describe_line(info: dict) -> str:
    dev = info["gpu"] or f"CPU ({info['cpu']}, {info['cpu_count']} cores, {info['torch_threads']} torch threads)"
    return f"{dev}; torch {info['torch']}; python {info['python']}"


def provenance() -> dict:
    """The code a benchmark ran: the git commit of the flare_duallora checkout (``dirty`` when files differ from it),
    or ``unknown`` outside a git checkout."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, status = "", ""
    if not commit:
        return {"commit": "unknown", "dirty": None}
    return {"commit": commit, "dirty": bool(status)}


def provenance_line(info: dict) -> str:
    return info["commit"] + (" (with uncommitted changes)" if info.get("dirty") else "")
