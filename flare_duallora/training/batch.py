"""Small helpers every training loop needs: the device, the logits of a network output, the labels of a batch."""

from __future__ import annotations

import torch

__all__ = ["labels_of", "logits_of", "pick_device"]


def pick_device(device: str = "auto") -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def logits_of(output) -> torch.Tensor:
    """MONAI ViT returns ``(logits, hidden_states)``; everything else returns logits."""
    return output[0] if isinstance(output, (tuple, list)) else output


def labels_of(batch: dict, key: str = "label") -> torch.Tensor:
    """The batch's labels as a 1-D long tensor (a trailing singleton dimension is dropped)."""
    y = torch.as_tensor(batch[key])
    if y.ndim > 1 and y.shape[-1] == 1:
        y = y.reshape(-1)
    return y.long()
