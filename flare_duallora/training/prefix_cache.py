"""Frozen-prefix cache: compute the activations entering the first adapted block once, then train the rest.

When only the last blocks of a ViT carry adapters (Med-DualLoRA adapts two), the patch embedding and the
blocks before them are frozen and, with deterministic transforms, produce the same tokens for an image in
every epoch and every round.  This module caches those tokens per site and trains the suffix only; the
adapters' gradients are the same as in the standard mode up to float tolerance.

Refused (with a message that says why) when the train transforms are random, when a trainable parameter
lives in the prefix, or when the network is not a MONAI ViT (or a wrapper exposing one as ``.vit``).
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

import torch
from monai.networks.nets import ViT
from torch import nn

from flare_duallora.nets.vit import vit_tokens
from flare_duallora.training.batch import labels_of


class PrefixCacheError(ValueError):
    """The frozen-prefix cache cannot be used for this network or data pipeline."""


def find_vit(net: nn.Module) -> ViT:
    if isinstance(net, ViT):
        return net
    inner = getattr(net, "vit", None)
    if isinstance(inner, ViT):
        return inner
    raise PrefixCacheError(f"prefix cache needs a MONAI ViT or a wrapper with a .vit ViT; got {type(net).__name__}")



def first_trainable_block(net: nn.Module) -> int:
    """Index of the first ViT block holding a trainable parameter."""
    vit = find_vit(net)
    prefix = dict(vit.named_parameters())
    first = None
    for name, p in prefix.items():
        if not p.requires_grad:
            continue
        m = re.match(r"blocks\.(\d+)\.", name)
        if m is None:
            if name.startswith(("patch_embedding", "cls_token")):
                raise PrefixCacheError(f"parameter {name!r} before the blocks is trainable: nothing can be cached")
            continue  # norm / head after the blocks
        idx = int(m.group(1))
        first = idx if first is None else min(first, idx)
    if first is None:
        first = len(vit.blocks)
    return first


class ViTPrefixSplit:
    """``prefix(x)`` = tokens entering block ``k``; ``suffix(tokens)`` = logits, exactly as ``ViT.forward``."""

    def __init__(self, net: nn.Module, first_block: Optional[int] = None):
        self.net = net
        self.vit = find_vit(net)
        self.k = first_trainable_block(net) if first_block is None else first_block

    @torch.no_grad()
    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        h = vit_tokens(vit, x)
        for blk in vit.blocks[: self.k]:
            h = blk(h)
        return h

    def suffix(self, h: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        for blk in vit.blocks[self.k:]:
            h = blk(h)
        h = vit.norm(h)
        if hasattr(vit, "classification_head"):
            h = vit.classification_head(h[:, 0])
        return h


def check_prefix_frozen_in_eval(split: ViTPrefixSplit) -> None:
    """Dropout in the prefix would make cached tokens differ from recomputed ones."""
    for name, module in split.vit.named_modules():
        m = re.match(r"blocks\.(\d+)", name)
        in_prefix = name.startswith("patch_embedding") or (m is not None and int(m.group(1)) < split.k)
        if in_prefix and isinstance(module, nn.Dropout) and module.p > 0:
            raise PrefixCacheError(f"dropout {name!r} (p={module.p}) in the frozen prefix: cached tokens would differ")


class PrefixCache:
    """Tokens entering the first adapted block for every training example, kept on the training device."""

    def __init__(self, split: ViTPrefixSplit, tokens: torch.Tensor, labels: torch.Tensor):
        self.split = split
        self.tokens = tokens
        self.labels = labels

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        split: ViTPrefixSplit,
        loader: Iterable,
        device: torch.device,
        image_key: str = "image",
        label_key: str = "label",
        dtype: torch.dtype = torch.float32,
        autocast=None,
    ) -> "PrefixCache":
        check_prefix_frozen_in_eval(split)
        was_training = split.vit.training
        split.vit.eval()  # the prefix is frozen: no dropout, fixed statistics
        toks, ys = [], []
        try:
            for batch in loader:
                x = batch[image_key].to(device, non_blocking=True)
                if autocast is not None:
                    with autocast():
                        h = split.prefix(x)
                else:
                    h = split.prefix(x)
                toks.append(h.to(dtype))
                ys.append(labels_of(batch, label_key).to(device))
        finally:
            split.vit.train(was_training)
        if not toks:
            raise PrefixCacheError("the training data set is empty")
        return cls(split, torch.cat(toks), torch.cat(ys))

    def batches(self, batch_size: int, order: Optional[list[int]] = None):
        """Mini-batches in ``order`` (the training loader's permutation for this epoch) or in data-set order."""
        order = torch.as_tensor(order if order is not None else range(len(self)), device=self.tokens.device)
        for start in range(0, len(self), batch_size):
            idx = order[start:start + batch_size]
            yield self.tokens[idx], self.labels[idx]
