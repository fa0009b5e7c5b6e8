"""Frozen-prefix cache: compute what the frozen part of a network feeds its trainable part once, then train the rest.

Two splits of a network into a frozen *prefix* (run once per training example, without gradient) and a trainable
*suffix* (run at every step on the cached prefix states):

* :class:`ViTPrefixSplit`, a MONAI ViT classifier adapted in its last blocks (Med-DualLoRA adapts two): the prefix
  is the patch embedding and the blocks before the first block holding a trainable parameter, the state is the
  tokens entering that block, the suffix is the remaining blocks, the final norm and the classification head.
* :class:`StatesSplit`, a network that exposes the hooks ``frozen_modules()``, ``frozen_states(x)`` and
  ``forward_from_states(*states)`` (pFedST's :class:`~flare_duallora.nets.side_network.SideTunedNetwork`): the
  states are the frozen backbone's hidden states that feed the side network's embedding and ladders, the suffix is
  the side network.

:func:`make_split` picks the split and :func:`verify_split` checks it before anything is cached: nothing in the
prefix trains, the prefix computes the same in training and in evaluation mode (no dropout, no batch statistics),
and on one batch the cached path (``suffix(*prefix(x))``) gives the network's own output (``net(x)``).  A wrapper
whose ``forward`` does anything else around the ViT (rescales the logits, preprocesses the input) is refused there:
caching would train a different function.  The transforms' side of the conditions (the same input in every epoch)
is checked by the caller (:class:`~flare_duallora.training.site.SiteTrainer`) from the transform chain.
"""

from __future__ import annotations

import contextlib
import re
from typing import Callable, Iterable, Optional, Sequence

import torch
from monai.networks.nets import ViT
from torch import nn

from flare_duallora.nets.vit import find_vit as _find_vit
from flare_duallora.nets.vit import vit_readout, vit_tokens
from flare_duallora.training.batch import labels_of, logits_of

__all__ = [
    "PrefixCache", "PrefixCacheError", "StatesSplit", "ViTPrefixSplit", "first_trainable_block", "find_vit",
    "frozen_versions", "make_split", "states_nbytes", "verify_split",
]

States = tuple[torch.Tensor, ...]


class PrefixCacheError(ValueError):
    """The frozen-prefix cache cannot be used for this network or data pipeline (the message says why)."""


def find_vit(net: nn.Module) -> ViT:
    """The MONAI ViT inside ``net`` (the outermost one); :class:`PrefixCacheError` when there is none."""
    try:
        return _find_vit(net)[1]
    except ValueError as e:
        raise PrefixCacheError(f"the frozen-prefix cache needs {e}") from None


def first_trainable_block(net: nn.Module) -> int:
    """Index of the first ViT block holding a trainable parameter (the number of blocks when none does)."""
    vit = find_vit(net)
    first = None
    for name, p in vit.named_parameters():
        if not p.requires_grad:
            continue
        m = re.match(r"blocks\.(\d+)\.", name)
        if m is None:
            if name.startswith(("patch_embedding", "cls_token")):
                raise PrefixCacheError(f"parameter {name!r} before the blocks is trainable: nothing can be cached")
            continue  # final norm / head after the blocks
        idx = int(m.group(1))
        first = idx if first is None else min(first, idx)
    return len(vit.blocks) if first is None else first


class ViTPrefixSplit:
    """``prefix(x)`` = ``(tokens entering block k,)``; ``suffix(tokens)`` = logits, exactly as ``ViT.forward``."""

    def __init__(self, net: nn.Module, first_block: Optional[int] = None):
        self.net = net
        self.vit = find_vit(net)
        self.k = first_trainable_block(net) if first_block is None else first_block

    @property
    def description(self) -> str:
        blocks = f"blocks 0-{self.k - 1}" if self.k > 1 else ("block 0" if self.k == 1 else "no block")
        return f"the ViT's patch embedding and {blocks} (the tokens entering block {self.k})"

    def frozen_modules(self) -> list[nn.Module]:
        return [self.vit.patch_embedding, *self.vit.blocks[: self.k]]

    def frozen_parameters_trainable(self) -> list[str]:
        names = [f"patch_embedding.{n}" for n, p in self.vit.patch_embedding.named_parameters() if p.requires_grad]
        if getattr(self.vit, "cls_token", None) is not None and self.vit.cls_token.requires_grad:
            names.append("cls_token")
        for i, blk in enumerate(self.vit.blocks[: self.k]):
            names += [f"blocks.{i}.{n}" for n, p in blk.named_parameters() if p.requires_grad]
        return names

    def prefix(self, x: torch.Tensor) -> States:
        h = vit_tokens(self.vit, x)
        for blk in self.vit.blocks[: self.k]:
            h = blk(h)
        return (h,)

    def suffix(self, h: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        for blk in vit.blocks[self.k:]:
            h = blk(h)
        readout = getattr(self.net, "readout", None)  # a classifier that says how it reads the tokens out
        return readout(h) if callable(readout) else vit_readout(vit, h)


class StatesSplit:
    """The split a network defines itself through the hooks ``frozen_modules()``, ``frozen_states(x)`` (a tuple of
    tensors with the batch as first dimension) and ``forward_from_states(*states)`` (pFedST's side-tuned network)."""

    HOOKS = ("frozen_modules", "frozen_states", "forward_from_states")

    def __init__(self, net: nn.Module):
        missing = [h for h in self.HOOKS if not callable(getattr(net, h, None))]
        if missing:
            raise PrefixCacheError(f"{type(net).__name__} lacks the cache hook(s) {missing}")
        self.net = net
        self.description = getattr(net, "frozen_states_description", "the network's frozen states")

    def frozen_modules(self) -> list[nn.Module]:
        return list(self.net.frozen_modules())

    def frozen_parameters_trainable(self) -> list[str]:
        names = [n for m in self.frozen_modules() for n, p in m.named_parameters() if p.requires_grad]
        own = getattr(self.net, "frozen_parameters_trainable", None)  # parameters outside the frozen modules
        return names + [n for n in (own() if callable(own) else []) if n not in names]

    def prefix(self, x: torch.Tensor) -> States:
        return tuple(self.net.frozen_states(x))

    def suffix(self, *states: torch.Tensor) -> torch.Tensor:
        return self.net.forward_from_states(*states)


Split = ViTPrefixSplit | StatesSplit


def make_split(net: nn.Module) -> Split:
    """The split of ``net``: its own hooks when it has them, else the MONAI ViT prefix (unverified: see
    :func:`verify_split`)."""
    if any(callable(getattr(net, h, None)) for h in StatesSplit.HOOKS):
        return StatesSplit(net)
    return ViTPrefixSplit(net)


def _max_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> bool:
    if a.shape != b.shape:
        return False
    scale = float(b.float().abs().max()) if b.numel() else 0.0
    return _max_gap(a, b) <= atol + rtol * scale


def verify_split(
    split: Split,
    x: torch.Tensor,
    set_train_mode: Callable[[], None],
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    check_train_mode: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> None:
    """Raise :class:`PrefixCacheError` unless caching ``split``'s prefix leaves the network's function unchanged.

    Checks, on the batch ``x``: no parameter of the prefix trains; with ``check_train_mode``, the prefix computes the
    same in the mode training puts the network in (``set_train_mode``) as in evaluation mode (no active dropout,
    no batch statistics); and ``suffix(*prefix(x))`` equals the network's own output ``net(x)`` in evaluation mode.
    The network's train/eval mode is restored.
    """
    net = split.net
    trainable = split.frozen_parameters_trainable()
    if trainable:
        raise PrefixCacheError(f"parameter(s) {trainable[:3]} of the frozen part ({split.description}) train: "
                               f"nothing before them can be cached")
    was_training = net.training
    try:
        with torch.inference_mode(), autocast():
            if check_train_mode:
                set_train_mode()
                for m in split.frozen_modules():
                    for name, mod in m.named_modules():
                        if isinstance(mod, nn.modules.dropout._DropoutNd) and mod.training and mod.p > 0:
                            raise PrefixCacheError(
                                f"dropout (p={mod.p}) is active in the frozen part ({split.description}) during "
                                f"training: cached states would differ from recomputed ones")
                in_train = split.prefix(x)
            net.eval()
            states = split.prefix(x)
            if check_train_mode:
                for a, b in zip(in_train, states):
                    if not _close(a, b, rtol, atol):
                        raise PrefixCacheError(
                            f"the frozen part ({split.description}) computes differently in training mode than in "
                            f"evaluation mode (max difference {_max_gap(a, b):.3g}; dropout or batch statistics?): "
                            f"cached states would differ from recomputed ones")
            cached = logits_of(split.suffix(*states))
            own = logits_of(net(x))
    except PrefixCacheError:
        raise
    except Exception as e:  # noqa: BLE001 - a network the split does not fit (shapes, missing modules)
        raise PrefixCacheError(f"{type(net).__name__} cannot be split at {split.description}: "
                               f"{type(e).__name__}: {e}") from None
    finally:
        net.train(was_training)
    if cached.shape != own.shape:
        raise PrefixCacheError(
            f"the cached path ({split.description}, then the rest) gives shape {list(cached.shape)} but "
            f"{type(net).__name__}'s own output has shape {list(own.shape)}: the network does more than read the "
            f"cached states out (a decoder with skip connections, as UNETR's, reads the input and the encoder's "
            f"intermediate states), so nothing can be cached")
    if not _close(cached, own, rtol, atol):
        raise PrefixCacheError(
            f"the cached path ({split.description}, then the rest) does not give {type(net).__name__}'s own output "
            f"(max difference {_max_gap(cached, own):.3g} on one batch): its forward does more than the split "
            f"computes, so caching would train a different function")


def frozen_versions(split: Split) -> tuple[int, ...]:
    """The in-place version counters of the frozen part's parameters and buffers: they change when anything writes
    into them (a checkpoint loaded, a residual folded into a base weight), which makes cached states stale."""
    return tuple(t._version for m in split.frozen_modules() for t in (*m.parameters(), *m.buffers()))


def states_nbytes(states: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in states)


class PrefixCache:
    """Prefix states of every training example (in data-set order) and their labels, kept on the training device."""

    def __init__(self, split: Split, states: States, labels: torch.Tensor):
        self.split = split
        self.states = tuple(states)
        self.labels = labels
        self.versions = frozen_versions(split)

    def is_current(self) -> bool:
        """Whether the frozen part is unchanged since the states were computed."""
        return frozen_versions(self.split) == self.versions

    @property
    def tokens(self) -> torch.Tensor:
        """The first cached state (the tokens, for the ViT prefix)."""
        return self.states[0]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def nbytes(self) -> int:
        return states_nbytes(self.states)

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        split: Split,
        loader: Iterable,
        device: torch.device,
        image_key: str = "image",
        label_key: str = "label",
        dtype: Optional[torch.dtype] = torch.float32,
        autocast=None,
    ) -> "PrefixCache":
        """Run the prefix over ``loader`` (in evaluation mode; :func:`verify_split` showed it is the same) and keep
        the states.  Built under ``no_grad`` (not ``inference_mode``): the states are inputs of training steps."""
        net = split.net
        was_training = net.training
        net.eval()
        parts: list[list[torch.Tensor]] = []
        ys = []
        try:
            for batch in loader:
                x = batch[image_key].to(device, non_blocking=True)
                with autocast() if autocast is not None else contextlib.nullcontext():
                    states = split.prefix(x)
                parts.append([s if dtype is None else s.to(dtype) for s in states])
                ys.append(labels_of(batch, label_key).to(device))
        finally:
            net.train(was_training)
        if not parts:
            raise PrefixCacheError("the training data set is empty")
        states = tuple(torch.cat([p[i] for p in parts]) for i in range(len(parts[0])))
        return cls(split, states, torch.cat(ys))

    def batches(self, batch_size: int, order: Optional[Sequence[int]] = None, drop_last: bool = False):
        """``(states, labels)`` mini-batches in ``order`` (the training sampler's permutation for this epoch) or in
        data-set order (contiguous slices, no copy)."""
        n = len(self)
        stop = n - n % batch_size if drop_last else n
        if order is None:
            for start in range(0, stop, batch_size):
                end = start + batch_size
                yield tuple(s[start:end] for s in self.states), self.labels[start:end]
            return
        index = torch.as_tensor(list(order), device=self.labels.device)
        for start in range(0, stop, batch_size):
            idx = index[start:start + batch_size]
            yield tuple(s[idx] for s in self.states), self.labels[idx]
