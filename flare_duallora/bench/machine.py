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
