"""One site's local training and evaluation of an adapted network (no FLARE here).

The executor, the local demo and the benchmarks all drive this class, so what is measured is what runs.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from flare_duallora.engine import AdaptedNetwork
from flare_duallora.training.batch import labels_of, logits_of, pick_device
from flare_duallora.metrics import classification_metrics
from flare_duallora.training.prefix_cache import PrefixCache, PrefixCacheError, ViTPrefixSplit


def state_checksum(state: dict) -> str:
    """A short, order-independent checksum of a state dict (used to prove what a site restored)."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class RoundStats:
    steps: int
    examples: int
    loss: float
    seconds: float

    def as_dict(self) -> dict:
        return {"steps": self.steps, "examples": self.examples, "loss": self.loss, "seconds": self.seconds}


class SiteTrainer:
    """Trains the trainable (shared + private) parameters of an :class:`AdaptedNetwork` on one site's data."""

    def __init__(
        self,
        adapted: AdaptedNetwork,
        loss_fn: nn.Module,
        optimizer: torch.optim.Optimizer,
        train_loader: Iterable,
        val_loader: Optional[Iterable] = None,
        device: torch.device | str = "auto",
        amp: bool = True,
        num_classes: Optional[int] = None,
        label_names: Optional[list[str]] = None,
        image_key: str = "image",
        label_key: str = "label",
        seed: int = 0,
    ):
        self.adapted = adapted
        self.device = pick_device(device) if isinstance(device, str) else device
        self.adapted.net.to(self.device)
        self.loss_fn = loss_fn.to(self.device) if isinstance(loss_fn, nn.Module) else loss_fn
        self.optimizer = optimizer
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.amp = amp and self.device.type == "cuda"
        self.num_classes = num_classes
        self.label_names = label_names
        self.image_key, self.label_key = image_key, label_key
        self.seed = seed
        self.rounds_done = 0
        self.cache = None  # a PrefixCache when the frozen-prefix mode is on

    # ------------------------------------------------------------------ helpers
    def _autocast(self):
        if self.amp:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _reseed_loader(self) -> None:
        """Shuffle differently every round but identically on a replay (restart) of the same round."""
        sampler = getattr(self.train_loader, "sampler", None)
        gen = getattr(sampler, "generator", None)
        if gen is not None:
            gen.manual_seed(self.seed * 100003 + self.rounds_done)

    def _optimise(self, forward, y: torch.Tensor) -> tuple[torch.Tensor, int]:
        """One optimiser step; the loss stays on the device (no host sync per step)."""
        with self._autocast():
            out = forward()
            loss = self.loss_fn(out.float(), y)
            reg = self.adapted.regularizer()
            if reg is not None:
                loss = loss + reg
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), int(y.shape[0])

    # ------------------------------------------------------------------ frozen-prefix cache
    def enable_prefix_cache(self, dataset, transforms_random: bool, batch_size: Optional[int] = None) -> int:
        """Cache the tokens entering the first adapted ViT block once; later rounds train the suffix only.

        ``dataset`` must be the training data set in the order the training loader indexes it.  Returns the
        first cached block index.  Raises :class:`PrefixCacheError` when the cache would change results.
        """
        if transforms_random:
            raise PrefixCacheError(
                "the bundle's training transforms are random (train#random_transforms), so cached activations would "
                "differ from recomputed ones; disable 'prefix_cache' or make the training transforms deterministic"
            )
        split = ViTPrefixSplit(self.adapted.net)
        loader = make_loader(dataset, batch_size or getattr(self.train_loader, "batch_size", 8), shuffle=False)
        self.cache = PrefixCache.build(split, loader, self.device, self.image_key, self.label_key,
                                       autocast=self._autocast if self.amp else None)
        self._batch_size = batch_size or getattr(self.train_loader, "batch_size", 8)
        return split.k

    def _batches(self):
        """Training batches as (forward, labels) pairs, from the loader or from the prefix cache."""
        if self.cache is None:
            for batch in self.train_loader:
                x = batch[self.image_key].to(self.device, non_blocking=True)
                yield (lambda x=x: logits_of(self.adapted.net(x))), labels_of(batch, self.label_key).to(self.device)
        else:
            sampler = getattr(self.train_loader, "sampler", None)
            order = list(iter(sampler)) if isinstance(sampler, EpochShuffle) else None
            for h, y in self.cache.batches(self._batch_size, order=order):
                yield (lambda h=h: self.cache.split.suffix(h)), y

    # ------------------------------------------------------------------ training
    def train_round(
        self, epochs: int = 1, steps: Optional[int] = None, should_abort: Callable[[], bool] = lambda: False
    ) -> RoundStats:
        """Train ``epochs`` passes over the local data, or exactly ``steps`` optimiser steps when given."""
        net = self.adapted.net
        net.train()
        self.adapted.freeze_base_statistics()
        self._reseed_loader()
        n_steps = n_examples = 0
        total_loss = torch.zeros((), device=self.device)
        start = time.perf_counter()
        epoch = 0
        while True:
            for forward, y in self._batches():
                if should_abort():
                    return RoundStats(n_steps, n_examples, float(total_loss) / max(n_steps, 1),
                                      time.perf_counter() - start)
                loss, n = self._optimise(forward, y)
                n_steps += 1
                n_examples += n
                total_loss += loss
                if steps is not None and n_steps >= steps:
                    break
            epoch += 1
            if (steps is not None and n_steps >= steps) or (steps is None and epoch >= epochs):
                break
            if n_steps == 0:
                raise ValueError("the training data set is empty")
        self.rounds_done += 1
        return RoundStats(n_steps, n_examples, float(total_loss) / max(n_steps, 1), time.perf_counter() - start)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def predict(self, loader: Optional[Iterable] = None) -> tuple[np.ndarray, np.ndarray]:
        loader = loader if loader is not None else self.val_loader
        if loader is None:
            raise ValueError("no validation data configured for this site")
        net = self.adapted.net
        net.eval()
        ys, ps = [], []
        for batch in loader:
            x = batch[self.image_key].to(self.device)
            with self._autocast():
                out = logits_of(net(x)).float()
            ps.append(torch.softmax(out, dim=1).cpu().numpy())
            ys.append(labels_of(batch, self.label_key).numpy())
        if not ys:
            raise ValueError("the validation data set is empty")
        return np.concatenate(ys), np.concatenate(ps)

    def evaluate(self, loader: Optional[Iterable] = None,
                 kinds: Sequence[str] = ("personalised", "global_only")) -> dict[str, dict]:
        """Metrics of the personalised model (base + shared + private) and/or of the global-only model (the
        private adapters zeroed), on ``loader`` (default: the site's validation data)."""
        unknown = set(kinds) - set(EVAL_KINDS)
        if unknown:
            raise ValueError(f"unknown evaluation kind(s) {sorted(unknown)}; expected {EVAL_KINDS}")
        out = {}
        if "personalised" in kinds:
            y, p = self.predict(loader)
            out["personalised"] = classification_metrics(y, p, self.num_classes, self.label_names)
        if "global_only" in kinds:
            with self.adapted.private_adapters_disabled():
                y, p = self.predict(loader)
            out["global_only"] = classification_metrics(y, p, self.num_classes, self.label_names)
        return out

    # ------------------------------------------------------------------ frozen-prefix cache (executor setting)
    def configure_cache(self, mode: str, train_dataset) -> "CacheDecision":
        """Turn the frozen-prefix cache on or off for ``mode`` = ``auto`` | ``on`` | ``off`` and say why.

        ``auto`` turns it on when nothing in the prefix trains and the training transforms of ``train_dataset`` are
        deterministic (read from the transform chain itself); ``on`` raises :class:`PrefixCacheError` when the cache
        cannot be used.
        """
        if mode not in CACHE_MODES:
            raise ValueError(f"setting 'prefix_cache' = {mode!r}: expected one of {CACHE_MODES}")
        if mode == "off":
            return CacheDecision(False, "prefix_cache = off")
        try:
            k = self.enable_prefix_cache(train_dataset, transforms_random=transforms_are_random(train_dataset))
        except PrefixCacheError as e:
            if mode == "on":
                raise
            return CacheDecision(False, str(e))
        return CacheDecision(True, f"blocks before block {k} are frozen and the training transforms are deterministic")

    # ------------------------------------------------------------------ snapshots (a failed round leaves no trace)
    def snapshot(self) -> dict:
        """An in-memory copy of everything a round changes: trainable weights, optimiser state, round counter."""
        trainable = {n for n, p in self.adapted.net.named_parameters() if p.requires_grad}
        weights = {k: v.detach().clone() for k, v in self.adapted.net.state_dict().items() if k in trainable}
        return {"weights": weights, "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "rounds_done": self.rounds_done}

    def restore(self, snapshot: dict) -> None:
        own = self.adapted.net.state_dict()
        with torch.no_grad():
            for k, v in snapshot["weights"].items():
                own[k].copy_(v)
        self.optimizer.load_state_dict(snapshot["optimizer"])
        self.rounds_done = snapshot["rounds_done"]

    def trainable_finite(self) -> bool:
        """Whether every trainable parameter is finite (a round that diverged is not kept)."""
        return all(bool(torch.isfinite(p).all()) for p in self.adapted.trainable_parameters())

    # ------------------------------------------------------------------ persistence
    def site_state(self) -> dict:
        """What a site keeps at home between rounds: private weights, optimiser state, round counter."""
        return {
            "private": self.adapted.private_state(),
            "optimizer": self.optimizer.state_dict(),
            "rounds_done": self.rounds_done,
        }

    def load_site_state(self, state: dict, source: str = "site state") -> None:
        self.adapted.load_private(state["private"], source=source)
        self.optimizer.load_state_dict(state["optimizer"])
        self.rounds_done = int(state.get("rounds_done", 0))


EVAL_KINDS = ("personalised", "global_only")
CACHE_MODES = ("auto", "on", "off")


@dataclass
class CacheDecision:
    enabled: bool
    reason: str


def transforms_are_random(dataset) -> bool:
    """True when the data set's transform chain holds a random transform (``monai.transforms.Randomizable``)."""
    from flare_duallora.bundle.runtime import contains_randomizable

    return contains_randomizable(getattr(dataset, "transform", None))


class EpochShuffle(Sampler):
    """A new permutation each epoch from the sampler's own generator (the prefix cache replays the same order)."""

    def __init__(self, n: int, seed: int = 0):
        self.n = n
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.generator).tolist())


def make_loader(dataset, batch_size: int, shuffle: bool, num_workers: int = 0, seed: int = 0) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochShuffle(len(dataset), seed) if shuffle else None,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=False,
    )
