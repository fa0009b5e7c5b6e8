"""What the plugin knows about MONAI's ``ViT``, in one place: finding it inside a network and computing its tokens.

MONAI 1.6 ``ViT.forward``: ``x = patch_embedding(x)``; a ``cls_token`` is prepended when the ViT has one
(``classification=True``); then every block; then ``norm``; then ``classification_head(x[:, 0])`` when classifying.
It returns ``(output, hidden_states_out)``.  The frozen-prefix cache and pFedST's side network both start from the
tokens entering the first block (:func:`vit_tokens`) and run blocks one by one.
"""

from __future__ import annotations

from typing import Optional

import torch
from monai.networks.nets import ViT
from torch import nn

__all__ = ["POOLS", "find_vit", "vit_num_classes", "vit_readout", "vit_tokens"]

#: how a classifier reads the ViT's final tokens: the cls token (MONAI's own head), or the mean of the patch tokens
#: (what masked-autoencoder backbones are fine-tuned with: MAE trains the patch tokens, not the cls token's output)
POOLS = ("cls", "mean")


def find_vit(net: nn.Module) -> tuple[str, ViT]:
    """The first (outermost) MONAI ``ViT`` inside ``net`` and its module name (``""`` when ``net`` is one).

    Raises:
        ValueError: ``net`` holds no ``monai.networks.nets.ViT``.
    """
    for name, module in net.named_modules():
        if isinstance(module, ViT):
            return name, module
    raise ValueError(f"a network containing a MONAI ViT (monai.networks.nets.ViT) is needed; {type(net).__name__} contains none")


def vit_tokens(vit: ViT, x: torch.Tensor) -> torch.Tensor:
    """The tokens entering the ViT's first block: patch embedding (with positions) and the cls token if any."""
    h = vit.patch_embedding(x)
    if hasattr(vit, "cls_token"):
        h = torch.cat((vit.cls_token.expand(h.shape[0], -1, -1), h), dim=1)
    return h


def vit_num_classes(vit: ViT) -> Optional[int]:
    """Number of outputs of the ViT's classification head (``Linear`` or ``Sequential(Linear, Tanh)``), or None."""
    head = getattr(vit, "classification_head", None)
    if head is None:
        return None
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def vit_readout(vit: ViT, h: torch.Tensor, pool: str = "cls", feature_norm: Optional[nn.Module] = None) -> torch.Tensor:
    """The ViT's final norm, the pooling, an optional feature standardisation and its classification head (if it
    has one) on the last block's tokens."""
    if pool not in POOLS:
        raise ValueError(f"pool {pool!r}: expected one of {POOLS}")
    h = vit.norm(h)
    if not hasattr(vit, "classification_head"):
        return h
    has_cls = hasattr(vit, "cls_token")
    pooled = h[:, 0] if pool == "cls" and has_cls else (h[:, 1:] if has_cls else h).mean(dim=1)
    if feature_norm is not None:
        pooled = feature_norm(pooled)
    return vit.classification_head(pooled)


def set_vit_sdpa(vit: nn.Module, enabled: bool) -> None:
    """Switch every attention block of ``vit`` between torch SDPA and the einsum implementation (same weights)."""
    from monai.networks.blocks.selfattention import SABlock

    for module in vit.modules():
        if isinstance(module, SABlock):
            if enabled and module.save_attn:
                raise ValueError("sdpa=True cannot be combined with SABlock.save_attn=True")
            module.use_flash_attention = bool(enabled)


def set_vit_attn_dropout(vit: nn.Module, rate: float) -> None:
    """Set every attention block's dropout: SDPA applies ``SABlock.dropout_rate`` in eval too, so callers pass 0
    outside training."""
    from monai.networks.blocks.selfattention import SABlock

    for module in vit.modules():
        if isinstance(module, SABlock):
            module.dropout_rate = rate
