"""A fingerprint of what must be identical on every site for averaging to mean anything.

Averaging shared adapters across sites assumes they sit on the same frozen network: the same pretrained base, the
same frozen LoRA factors (FFA-LoRA's ``lora_A``), the same adapter layout and method.  :func:`fingerprint` hashes
exactly that, so two sites (or a site and the job builder) can compare one string instead of the tensors:

* the method name;
* every state-dict key with its role and shape (the layout: which modules carry which adapters, of which rank);
* the bytes of every *frozen* tensor (the base weights and buffers that never train).

Trained tensors (shared and private) are not hashed: they change every step.  The fingerprint is computed once,
before training, on the CPU copy of the network.
"""

from __future__ import annotations

import hashlib

import torch

from flare_duallora.engine.adapted import AdaptedNetwork
from flare_duallora.engine.methods import FROZEN

__all__ = ["chain_fingerprint", "fingerprint"]


def fingerprint(adapted: AdaptedNetwork) -> str:
    """``sha256:<hex>`` over the method, the layout (key, role, shape) and the frozen tensors' bytes."""
    h = hashlib.sha256()
    h.update(f"method={adapted.settings.method}\n".encode())
    roles = adapted.roles()
    state = adapted.net.state_dict()
    for key in sorted(state):
        value = state[key]
        h.update(f"{key}|{roles[key]}|{tuple(value.shape)}|{value.dtype}\n".encode())
    for key in sorted(state):
        if roles[key] == FROZEN:
            tensor = state[key].detach().to("cpu").contiguous()
            h.update(key.encode())
            h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return "sha256:" + h.hexdigest()


def chain_fingerprint(previous: str, residuals) -> str:
    """The fingerprint after a fedex round folded ``residuals`` (``{base weight key: float32 array}``) into the base:
    the server and every site compute it from the same bytes, so the base stays checkable round after round."""
    import numpy as np

    h = hashlib.sha256(previous.encode())
    for key in sorted(residuals):
        h.update(key.encode())
        h.update(np.ascontiguousarray(np.asarray(residuals[key], dtype=np.float32)).tobytes())
    return "sha256:" + h.hexdigest()
