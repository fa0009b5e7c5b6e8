"""Communication accounting: the bytes of a payload of tensors / arrays."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch


def value_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    return int(np.asarray(value).nbytes)


def payload_bytes(payload: Mapping[str, object]) -> int:
    """Sum of the tensor bytes of a state dict (the wire format adds a small header per tensor)."""
    return sum(value_bytes(v) for v in payload.values())
