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
from torch.utils.data import ConcatDataset, DataLoader, Sampler, SequentialSampler, Subset, TensorDataset

from flare_duallora.engine import AdaptedNetwork
from flare_duallora.training.batch import labels_of, logits_of, pick_device
from flare_duallora.training.privacy import Forward, StandardStep, TrainingStep
from flare_duallora.training.prefix_cache import (
    PrefixCache, PrefixCacheError, make_split, states_nbytes, verify_split,
)

__all__ = [
    "CACHE_MODES", "CacheDecision", "EVAL_KINDS", "EpochShuffle", "RoundStats", "SiteTrainer", "default_cache_budget",
    "make_loader", "state_checksum", "transform_randomness", "transforms_are_random",
]

EVAL_KINDS = ("personalised", "global_only")
CACHE_MODES = ("auto", "on", "off")


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


@dataclass
class CacheDecision:
    """Whether the frozen-prefix cache is on, and why (the executor logs and records it)."""

    enabled: bool
    reason: str


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
        task=None,
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
        if task is None:
            from flare_duallora.training.tasks import ClassificationTask

            task = ClassificationTask(num_classes, label_names)
        self.task = task  # owns what the loss compares with and the evaluation (training/tasks.py)
        self.rounds_done = 0
        self.cache: Optional[PrefixCache] = None  # the training set's prefix states while the cache is on
        # the validation set's prefix states (batches) while the cache is on; False: tried, not cacheable
        self._eval_cache: Optional[list] | bool = None
        self._split = None  # a split verified against the network's own output (shared by both evaluations)
        self._split_checked = False
        self._private_lora: Optional[bool] = None
        self._cache_source: Optional[Iterable] = None  # the loader the training cache was built from
        self.training_step: TrainingStep = StandardStep()  # how steps are taken (DP-SGD: training/privacy.py)

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
        """One optimiser step of the training-step strategy; the loss stays on the device (no host sync per step)."""
        return self.training_step.step(self, forward, y)

    def set_training_step(self, step: TrainingStep) -> None:
        """Train through ``step`` (e.g. :class:`~flare_duallora.training.privacy.DPSGDStep`) from now on."""
        self.training_step = step

    def _set_train_mode(self) -> None:
        self.adapted.net.train()
        self.adapted.freeze_base_statistics()

    def _tolerance(self) -> dict:
        """How close the cached path must be to ``net(x)`` (bf16 autocast on a GPU rounds both differently)."""
        return {"rtol": 2e-2, "atol": 2e-2} if self.amp else {"rtol": 1e-4, "atol": 1e-5}

    def _has_private_lora(self) -> bool:
        """Whether zeroing the private adapters changes anything (else the global-only model is the personalised)."""
        if self._private_lora is None:
            # a private head or private statistics count too: the global-only model leaves them out
            self._private_lora = self.adapted.has_private_parts
        return self._private_lora

    # ------------------------------------------------------------------ frozen-prefix cache (executor setting)
    def configure_cache(self, mode: str, train_dataset, max_bytes: Optional[int] = None) -> CacheDecision:
        """Turn the frozen-prefix cache on or off for ``mode`` = ``auto`` | ``on`` | ``off`` and say why.

        The cache holds, for every training example, what the frozen part of the network feeds its trainable part:
        the tokens entering the first adapted ViT block (LoRA methods), or pFedST's frozen backbone states that feed
        the side network.  Each step then runs only the trainable part.  It is used when (all checked here, never
        taken from a caller's flag):

        * nothing in the frozen part trains, and it computes the same in training as in evaluation mode;
        * the training transforms are deterministic: ``train_dataset.transform`` holds no monai ``Randomizable``
          (nested ``Compose`` walked), and loading the first training item twice gives the same data;
        * on one batch the cached path gives the network's own output ``net(x)`` (a wrapper whose ``forward`` does
          more than the split computes is refused);
        * the cache fits in ``max_bytes`` (default: half the memory free on the training device).

        ``auto`` uses the cache when all hold; ``on`` raises :class:`PrefixCacheError` when one does not (where the
        transform chain cannot be read, ``on`` trusts the data set once loading an item twice agrees); ``off``
        drops it.  While the cache is on, evaluation on the site's validation data caches its prefix states too
        (when the validation transforms are deterministic).  ``train_dataset`` must be the data set the training
        loader reads, in the order it indexes it.
        """
        if mode not in CACHE_MODES:
            raise ValueError(f"setting 'prefix_cache' = {mode!r}: expected one of {CACHE_MODES}")
        self.cache, self._eval_cache, self._cache_source = None, None, None
        if mode == "off":
            return CacheDecision(False, "prefix_cache = off: every step runs the whole network")
        try:
            why = self._build_train_cache(train_dataset, trust_unknown=(mode == "on"), max_bytes=max_bytes)
        except PrefixCacheError as e:
            if mode == "on":
                raise PrefixCacheError(f"prefix_cache = on, but the cache cannot be used: {e}") from None
            return CacheDecision(False, f"prefix_cache = auto: off, {e}")
        return CacheDecision(True, f"prefix_cache = {mode}: on, {why}")

    def _build_train_cache(self, dataset, trust_unknown: bool, max_bytes: Optional[int]) -> str:
        random, how = transform_randomness(dataset)
        if random:
            raise PrefixCacheError(f"the training transforms are random ({how}): cached states would differ from "
                                   f"the ones each epoch computes; make the training transforms deterministic or "
                                   f"set prefix_cache = off")
        if random is None and not trust_unknown:
            raise PrefixCacheError(f"whether the training transforms are deterministic cannot be read ({how}); set "
                                   f"prefix_cache = on to use the cache anyway")
        loader_data = getattr(self.train_loader, "dataset", None)
        if loader_data is not None and loader_data is not dataset:
            raise PrefixCacheError("the training loader does not read the given training data set")
        if len(dataset) == 0:
            raise PrefixCacheError("the training data set is empty")
        if not _same_item_twice(dataset):
            raise PrefixCacheError("the training transforms are random (loading the first training item twice gave "
                                   "different data)")
        split = make_split(self.adapted.net)
        batch_size = getattr(self.train_loader, "batch_size", None) or 8
        build_loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)  # data-set order
        x = next(iter(build_loader))[self.image_key].to(self.device)
        verify_split(split, x, self._set_train_mode, self._autocast, check_train_mode=True, **self._tolerance())
        with torch.no_grad(), self._autocast():
            per_example = states_nbytes([s.float() for s in split.prefix(x)]) / x.shape[0]
        need = int(per_example * len(dataset))
        budget = max_bytes if max_bytes is not None else default_cache_budget(self.device)
        if need > budget:
            raise PrefixCacheError(f"the cache of {len(dataset)} training examples would take {_mib(need)}, more "
                                   f"than the {_mib(budget)} allowed on {self.device}")
        self.cache = PrefixCache.build(split, build_loader, self.device, self.image_key, self.label_key,
                                       autocast=self._autocast if self.amp else None)
        self._split, self._split_checked = split, True
        self._cache_source = build_loader
        return (f"{split.description} computed once for {len(self.cache)} training examples "
                f"({_mib(self.cache.nbytes)}): nothing in it trains, the training transforms are deterministic "
                f"({how}) and the cached path gave the network's own output on one batch")

    def _refresh_if_stale(self) -> None:
        """Recompute the cached states when something wrote into the frozen part since they were computed."""
        if self.cache is not None and not self.cache.is_current():
            self.cache = PrefixCache.build(self.cache.split, self._cache_source, self.device, self.image_key,
                                           self.label_key, autocast=self._autocast if self.amp else None)
            self._eval_cache = None

    def _batches(self):
        """Training batches as (forward, labels) pairs, from the loader or from the prefix cache."""
        self._refresh_if_stale()
        if self.cache is None:
            net = self.adapted.net
            for batch in self.train_loader:
                x = batch[self.image_key].to(self.device, non_blocking=True)
                yield Forward(lambda x: logits_of(net(x)), (x,)), self.task.labels(batch, self.label_key).to(self.device)
            return
        loader = self.train_loader
        sampler = getattr(loader, "sampler", None)
        # the loader's own sampler gives this epoch's order (and advances its generator as the loader would)
        order = None if sampler is None or isinstance(sampler, SequentialSampler) else list(iter(sampler))
        batch_size = getattr(loader, "batch_size", None) or 8
        suffix = self.cache.split.suffix
        for states, y in self.cache.batches(batch_size, order, bool(getattr(loader, "drop_last", False))):
            yield Forward(suffix, tuple(states)), y

    def _index_batches(self, draws):
        """Training batches for given ``(item indices, group of each item)`` draws (a sampler of the training
        step's own, e.g. Poisson sampling), from the prefix cache or the training data set; an empty draw gives an
        empty batch."""
        self._refresh_if_stale()
        empty = torch.zeros(0, dtype=torch.long, device=self.device)
        if self.cache is not None:
            suffix = self.cache.split.suffix
            for items, groups in draws:
                idx = torch.as_tensor(items, dtype=torch.long, device=self.cache.labels.device)
                yield Forward(suffix, tuple(s[idx] for s in self.cache.states),
                              torch.as_tensor(groups, dtype=torch.long)), self.cache.labels[idx]
            return
        net = self.adapted.net
        loader = self.train_loader
        full = [items for items, _ in draws if items]
        batches = iter(DataLoader(loader.dataset, batch_sampler=full, collate_fn=loader.collate_fn,
                                  num_workers=getattr(loader, "num_workers", 0),
                                  pin_memory=getattr(loader, "pin_memory", False))) if full else iter(())
        for items, groups in draws:
            if not items:
                yield Forward(lambda x: x, ()), empty
                continue
            batch = next(batches)
            x = batch[self.image_key].to(self.device, non_blocking=True)
            yield (Forward(lambda x: logits_of(net(x)), (x,), torch.as_tensor(groups, dtype=torch.long)),
                   labels_of(batch, self.label_key).to(self.device))

    # ------------------------------------------------------------------ training
    def train_round(
        self, epochs: int = 1, steps: Optional[int] = None, should_abort: Callable[[], bool] = lambda: False
    ) -> RoundStats:
        """Train ``epochs`` passes over the local data, or exactly ``steps`` optimiser steps when given."""
        self._set_train_mode()
        self._reseed_loader()
        self.training_step.begin_round(self, epochs, steps)  # may refuse the round (a privacy budget)
        n_steps = n_examples = 0
        total_loss = torch.zeros((), device=self.device)
        start = time.perf_counter()
        for forward, y in self.training_step.round_batches(self, epochs, steps):
            if should_abort():
                return RoundStats(n_steps, n_examples, float(total_loss) / max(n_steps, 1),
                                  time.perf_counter() - start)
            loss, n = self._optimise(forward, y)
            n_steps += 1
            n_examples += n
            total_loss += loss
        self.training_step.end_round(self, n_steps)
        self.rounds_done += 1
        return RoundStats(n_steps, n_examples, float(total_loss) / max(n_steps, 1), time.perf_counter() - start)

    # ------------------------------------------------------------------ evaluation
    def predict(self, loader: Optional[Iterable] = None) -> tuple[np.ndarray, np.ndarray]:
        """Labels and class probabilities of the network as it is now (personalised, unless the caller zeroed the
        private adapters) on ``loader`` (default: the site's validation data)."""
        return self._predict(loader, ("personalised",))["personalised"]

    def evaluate(self, loader: Optional[Iterable] = None,
                 kinds: Sequence[str] = EVAL_KINDS) -> dict[str, dict]:
        """Metrics of the personalised model (base + shared + private) and/or of the global-only model (the
        private adapters zeroed), on ``loader`` (default: the site's validation data), as the site's task
        (:mod:`flare_duallora.training.tasks`) measures them.

        Runs under ``torch.inference_mode()``.  For classification, asked for together, the two models share the
        frozen prefix (or pFedST's backbone states): it runs once per batch and only the rest runs twice.  While the
        prefix cache is on, the validation data's prefix states are computed once and reused by later evaluations.
        """
        unknown = set(kinds) - set(EVAL_KINDS)
        if unknown:
            raise ValueError(f"unknown evaluation kind(s) {sorted(unknown)}; expected {EVAL_KINDS}")
        return self.task.evaluate(self, loader, kinds)

    def _predict(self, loader: Optional[Iterable], kinds: tuple[str, ...]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        loader = loader if loader is not None else self.val_loader
        if loader is None:
            raise ValueError("no validation data configured for this site")
        net = self.adapted.net
        was_training = net.training
        net.eval()
        out: dict[str, tuple[list, list]] = {k: ([], []) for k in kinds}
        global_is_personalised = not self._has_private_lora()
        runs = [k for k in kinds if not (k == "global_only" and global_is_personalised and "personalised" in kinds)]
        try:
            split = self._eval_split(loader) if (len(runs) > 1 or self.cache is not None) else None
            for states, x, y in self._eval_batches(loader, split):
                for kind in runs:
                    ctx = self.adapted.private_adapters_disabled() if kind == "global_only" else \
                        contextlib.nullcontext()
                    with ctx, torch.inference_mode(), self._autocast():
                        logits = split.suffix(*states) if states is not None else logits_of(net(x))
                        probs = torch.softmax(logits.float(), dim=1).cpu().numpy()
                    out[kind][0].append(y.cpu().numpy())
                    out[kind][1].append(probs)
        finally:
            net.train(was_training)
        if "global_only" in kinds and "global_only" not in runs:
            out["global_only"] = out["personalised"]
        if not out[kinds[0]][0]:
            raise ValueError("the validation data set is empty")
        return {k: (np.concatenate(ys), np.concatenate(ps)) for k, (ys, ps) in out.items()}

    def _eval_split(self, loader: Iterable):
        """The split verified against ``net(x)`` on one batch (checked once), or None when there is none."""
        if self._split_checked:
            return self._split
        batch = next(iter(loader), None)
        if batch is None:
            return None  # nothing to check on (the caller says the data set is empty)
        self._split_checked = True
        try:
            split = make_split(self.adapted.net)
            verify_split(split, batch[self.image_key].to(self.device), self._set_train_mode, self._autocast,
                         check_train_mode=False, **self._tolerance())
        except PrefixCacheError:
            return None  # two full passes
        self._split = split
        return split

    def _eval_batches(self, loader: Iterable, split):
        """``(states or None, x or None, labels)`` per batch: the cached validation states when the cache is on,
        the prefix computed now when a split is shared, else the images."""
        self._refresh_if_stale()
        if split is not None and self.cache is not None and loader is self.val_loader:
            if self._eval_cache is None:  # not tried yet: cache when deterministic and within the budget
                deterministic = transform_randomness(getattr(loader, "dataset", None))[0] is False
                self._eval_cache = (self._prefix_states(loader, split) if deterministic else None) or False
            if self._eval_cache:
                for states, y in self._eval_cache:
                    yield states, None, y
                return
        for batch in loader:
            x = batch[self.image_key].to(self.device, non_blocking=True)
            y = labels_of(batch, self.label_key)
            if split is None:
                yield None, x, y
            else:
                with torch.inference_mode(), self._autocast():
                    states = split.prefix(x)
                yield states, None, y

    def _prefix_states(self, loader: Iterable, split) -> Optional[list]:
        """Every validation batch's prefix states (None when they would not fit in the cache budget)."""
        budget, used, out = default_cache_budget(self.device), 0, []
        for batch in loader:
            x = batch[self.image_key].to(self.device, non_blocking=True)
            with torch.inference_mode(), self._autocast():
                states = split.prefix(x)
            used += states_nbytes(states)
            if used > budget:
                return None
            out.append((states, labels_of(batch, self.label_key)))
        return out

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
        out = {
            "private": self.adapted.private_state(),
            "optimizer": self.optimizer.state_dict(),
            "rounds_done": self.rounds_done,
        }
        privacy = self.training_step.state()
        if privacy is not None:
            out["privacy"] = privacy  # the spent privacy budget (a resumed job continues the count)
        return out

    def load_site_state(self, state: dict, source: str = "site state") -> None:
        rounds_done = int(state.get("rounds_done", 0))
        self.training_step.load_state(state.get("privacy"), rounds_done, source)  # checked before anything changes
        self.adapted.load_private(state["private"], source=source)
        self.optimizer.load_state_dict(state["optimizer"])
        self.rounds_done = rounds_done


# ---------------------------------------------------------------------- data-side conditions of the cache
def _random_names(transform) -> list[str]:
    """Best-effort names of the random transforms in a chain (for messages; the decision is
    :func:`~flare_duallora.bundle.runtime.contains_randomizable`'s)."""
    from monai.transforms import Compose, Randomizable

    names, stack = [], [transform]
    while stack:
        t = stack.pop(0)
        if isinstance(t, Compose) and type(t) is Compose:
            stack[:0] = list(t.transforms)
        elif isinstance(t, (list, tuple)):
            stack[:0] = list(t)
        elif isinstance(t, Randomizable):
            names.append(type(t).__name__)
        elif isinstance(getattr(t, "transforms", None), (list, tuple)):
            stack[:0] = list(t.transforms)
    return names


def transform_randomness(dataset) -> tuple[Optional[bool], str]:
    """``(True, what)`` when the data set's transform chain holds a random transform (a monai ``Randomizable``,
    nested ``Compose`` walked), ``(False, what)`` when it holds none, ``(None, why)`` when there is no chain to read
    (a data set without a ``transform`` attribute)."""
    from flare_duallora.bundle.runtime import contains_randomizable

    if isinstance(dataset, (list, tuple)):
        return False, "an in-memory list, no transforms"
    if isinstance(dataset, TensorDataset):
        return False, "a TensorDataset, no transforms"
    if isinstance(dataset, Subset):
        return transform_randomness(dataset.dataset)
    if isinstance(dataset, ConcatDataset):
        parts = [transform_randomness(d) for d in dataset.datasets]
        for verdict in (True, None):
            for r, how in parts:
                if r is verdict:
                    return r, how
        return False, "; ".join(how for _, how in parts)
    if dataset is None or not hasattr(dataset, "transform"):
        return None, f"{type(dataset).__name__} has no 'transform' attribute"
    transform = dataset.transform
    if transform is None:
        return False, f"{type(dataset).__name__} has no transform"
    if contains_randomizable(transform):
        names = _random_names(transform)
        shown = ", ".join(dict.fromkeys(names)) if names else "a random Compose"
        return True, f"{type(dataset).__name__}.transform holds {shown}"
    return False, f"no monai Randomizable in {type(dataset).__name__}.transform"


def transforms_are_random(dataset) -> bool:
    """True when the data set's transform chain holds a random transform (``monai.transforms.Randomizable``)."""
    return transform_randomness(dataset)[0] is True


def _same_item_twice(dataset) -> bool:
    """Whether loading item 0 twice gives equal tensors (a random transform the chain did not show)."""
    a, b = dataset[0], dataset[0]

    def equal(u, v) -> bool:
        if isinstance(u, torch.Tensor) or isinstance(v, torch.Tensor):
            return torch.equal(torch.as_tensor(u), torch.as_tensor(v))
        if isinstance(u, np.ndarray):
            return np.array_equal(u, v)
        if isinstance(u, dict):
            return isinstance(v, dict) and u.keys() == v.keys() and all(equal(u[k], v[k]) for k in u)
        if isinstance(u, (list, tuple)):
            return len(u) == len(v) and all(equal(i, j) for i, j in zip(u, v))
        return True

    return equal(a, b)


def default_cache_budget(device: torch.device) -> int:
    """Bytes the caches may take on ``device``: half its free memory (GPU), half the available memory (CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return 4 * 2**30


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


class EpochShuffle(Sampler):
    """A new permutation each epoch from the sampler's own generator (the prefix cache replays the same order)."""

    def __init__(self, n: int, seed: int = 0):
        self.n = n
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.generator).tolist())


def make_loader(dataset, batch_size: int, shuffle: bool, num_workers: int = 0, seed: int = 0,
                collate_fn: Optional[Callable] = None) -> DataLoader:
    """``collate_fn``: e.g. ``monai.data.list_data_collate`` for items that are lists of crops."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=collate_fn,
        sampler=EpochShuffle(len(dataset), seed) if shuffle else None,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=False,
    )
