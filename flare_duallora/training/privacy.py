"""How a site takes its optimiser steps: the one seam through which differential privacy enters training.

:class:`SiteTrainer` asks its :class:`TrainingStep` for the round's batches and lets it take every step:

* :class:`StandardStep` (default): shuffled mini-batches, the batch-mean loss, one optimiser step.
* :class:`DPSGDStep`: sample-level DP-SGD (Abadi et al. 2016) over *every* trained parameter (shared and private
  LoRA, head, pFedST's side network): each batch is drawn by Poisson sampling (every unit of privacy joins with
  probability ``q``), per-example gradients of the trainable part are computed with ``torch.func`` (``vmap`` of
  ``grad``; with the frozen-prefix cache only the trainable suffix runs), each unit's gradient is clipped to
  ``max_grad_norm``, Gaussian noise of standard deviation ``noise_multiplier * max_grad_norm`` is added to the sum
  and the result is divided by the expected batch size.  The noise multiplier is calibrated once for the whole job
  from the target ``(epsilon, delta)``, ``q`` and the job's total steps (``rounds x steps per round``) with a named
  Opacus accountant (``rdp`` by default, or ``prv``); the steps spent are kept in the site's private state
  (:meth:`DPSGDStep.state`), so a resumed job continues the count, and a round whose steps would take the spent
  epsilon past the target is refused before it starts (:class:`PrivacyBudgetExceeded`).

The unit of privacy is one datalist item, or one *subject* where the training items carry a ``subject`` key and a
subject has several items: then subjects are sampled and each subject's summed gradient is clipped (user-level DP
for the subject's whole record).  What the guarantee covers: everything the site's training produces over the job
(the shared update it sends each round, its private adapters, the exported bundles), for its own training data.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

__all__ = [
    "ACCOUNTANTS", "DPSGDStep", "DPSettings", "Forward", "PrivacyBudgetExceeded", "PrivacyError", "StandardStep",
    "TrainingStep", "batchnorm_problem", "compute_epsilon", "install_training_step", "make_training_step", "subjects_of",
    "trainable_batchnorms",
]

ACCOUNTANTS = ("rdp", "prv")
UNITS = ("auto", "item", "subject")
SETTING = "differential_privacy"


class PrivacyError(ValueError):
    """A differential-privacy setting that cannot be honoured (names the setting or the module at fault)."""


class PrivacyBudgetExceeded(PrivacyError):
    """A round would take the site's spent epsilon past its target."""


@dataclass
class Forward:
    """The logits of one batch: ``fn(*inputs)`` (the whole network on images, or the trainable suffix on cached
    prefix states).  ``groups`` (DP with subjects): the subject index of each example in the batch."""

    fn: Callable
    inputs: tuple
    groups: Optional[torch.Tensor] = None

    def __call__(self) -> torch.Tensor:
        return self.fn(*self.inputs)


# ---------------------------------------------------------------------------------------------- settings
@dataclass
class DPSettings:
    """``differential_privacy = {"epsilon": 3.0, "delta": 1e-5, "max_grad_norm": 1.0}`` (a job setting).

    ``rounds``: the job's rounds (the recipe fills it from ``num_rounds``); ``accountant``: ``rdp`` | ``prv``;
    ``unit``: ``auto`` (subject where items carry a ``subject`` key, else item) | ``item`` | ``subject``.
    """

    epsilon: float
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    rounds: Optional[int] = None
    accountant: str = "rdp"
    unit: str = "auto"

    @classmethod
    def from_dict(cls, value: Any) -> Optional["DPSettings"]:
        """``None`` / ``{}`` -> no DP; a dict -> checked settings (:class:`PrivacyError` names the key)."""
        if value is None or value == {} or value == "":
            return None
        if not isinstance(value, Mapping):
            raise PrivacyError(f"setting {SETTING!r}: expected a dict such as {{'epsilon': 3.0, 'delta': 1e-5, "
                               f"'max_grad_norm': 1.0}}, got {type(value).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(value) - known
        if unknown:
            raise PrivacyError(f"setting {SETTING!r}: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
        if "epsilon" not in value:
            raise PrivacyError(f"setting {SETTING!r}: 'epsilon' (the target budget) is required")
        s = cls(**dict(value))
        for name, low, high in (("epsilon", 0.0, math.inf), ("delta", 0.0, 1.0), ("max_grad_norm", 0.0, math.inf)):
            v = getattr(s, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (low < v < high) or not math.isfinite(v):
                raise PrivacyError(f"setting '{SETTING}.{name}' = {v!r}: expected a finite number in ({low}, {high})")
            setattr(s, name, float(v))
        if s.rounds is not None and (isinstance(s.rounds, bool) or not isinstance(s.rounds, int) or s.rounds < 1):
            raise PrivacyError(f"setting '{SETTING}.rounds' = {s.rounds!r}: expected an integer >= 1")
        if s.accountant not in ACCOUNTANTS:
            raise PrivacyError(f"setting '{SETTING}.accountant' = {s.accountant!r}: expected one of {ACCOUNTANTS}")
        if s.unit not in UNITS:
            raise PrivacyError(f"setting '{SETTING}.unit' = {s.unit!r}: expected one of {UNITS}")
        return s

    def to_dict(self) -> dict:
        return asdict(self)


def check_method_settings(adapter_settings) -> Optional[str]:
    """The problem with DP-SGD under these adapter settings (``None``: none).  FedOPAL's ``repr`` penalty mixes
    the examples of a batch (their covariance), so it has no per-example gradient."""
    if getattr(adapter_settings, "orth_mode", None) == "repr" and getattr(adapter_settings, "method", "") == "fedopal":
        return (f"setting {SETTING!r} with orth_mode = 'repr': the representation penalty couples the examples of a "
                f"batch and cannot be made per-example private; use orth_mode 'subspace', 'cosine' or 'delta'")
    return None


def trainable_batchnorms(net: nn.Module, set_train_mode: Optional[Callable[[], None]] = None) -> list[str]:
    """Names of the BatchNorm modules that would train (trainable affine weights, or running in training mode while
    the network trains): they mix the examples of a batch, so per-example privacy does not hold."""
    from torch.nn.modules.batchnorm import _BatchNorm

    was = net.training
    if set_train_mode is not None:
        set_train_mode()
    else:
        net.train()
    try:
        return [name for name, m in net.named_modules() if isinstance(m, _BatchNorm)
                and (m.training or any(p.requires_grad for p in m.parameters(recurse=False)))]
    finally:
        net.train(was)


def subjects_of(dataset) -> Optional[list]:
    """The ``subject`` of each training item (data-set order) when every item carries one, else ``None``."""
    data = getattr(dataset, "data", None)
    if not isinstance(data, Sequence) or not data:
        return None
    subjects = [item.get("subject") if isinstance(item, Mapping) else None for item in data]
    return None if any(s is None for s in subjects) else [str(s) for s in subjects]


# ---------------------------------------------------------------------------------------------- accounting
def compute_epsilon(history: Sequence[Sequence], delta: float, accountant: str = "rdp") -> float:
    """Epsilon spent by ``history`` = ``[(noise_multiplier, sample_rate, steps), ...]`` at ``delta`` (0: nothing)."""
    from opacus.accountants import create_accountant

    history = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    if not history:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = history
    with warnings.catch_warnings():  # "optimal order is the largest alpha": a looser bound, still a valid one
        warnings.simplefilter("ignore", UserWarning)
        return float(acc.get_epsilon(delta=delta))


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                              steps=steps, accountant=accountant, epsilon_tolerance=0.01))
    except ValueError as e:
        raise PrivacyError(f"setting '{SETTING}.epsilon' = {target_epsilon}: no noise multiplier reaches it over "
                           f"{steps} steps at sample rate {sample_rate:.4g} ({e})") from None


# ---------------------------------------------------------------------------------------------- strategies
class TrainingStep:
    """The strategy :class:`~flare_duallora.training.site.SiteTrainer` trains through (one per trainer)."""

    def begin_round(self, trainer, epochs: int, steps: Optional[int]) -> None:
        """Called before a round's first batch (may refuse the round)."""

    def round_batches(self, trainer, epochs: int, steps: Optional[int]) -> Iterator[tuple[Forward, torch.Tensor]]:
        raise NotImplementedError

    def step(self, trainer, forward: Forward, y: torch.Tensor) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def end_round(self, trainer, steps_done: int) -> None:
        """Called once a round completed (``steps_done`` optimiser steps)."""

    def state(self) -> Optional[dict]:
        """What the site keeps in its private state for this strategy (``None``: nothing)."""
        return None

    def load_state(self, state: Optional[dict], rounds_done: int = 0, source: str = "site state") -> None:
        """Continue from a saved state's entry (``rounds_done``: the rounds that state completed)."""
        if state:
            raise PrivacyError(f"{source} holds a differential-privacy ledger ({state.get('epsilon_spent')} spent of "
                               f"{state.get('target_epsilon')}) but this job trains without "
                               f"{SETTING!r}: continuing it without DP would void the guarantee")

    def report(self) -> Optional[dict]:
        """The privacy entry of the site's results (``None``: not private)."""
        return None


class StandardStep(TrainingStep):
    """Shuffled mini-batches (the loader's sampler, replayed by the prefix cache), batch-mean loss."""

    def round_batches(self, trainer, epochs, steps):
        n_steps = epoch = 0
        while True:
            for forward, y in trainer._batches():
                yield forward, y
                n_steps += 1
                if steps is not None and n_steps >= steps:
                    return
            epoch += 1
            if n_steps == 0:
                raise ValueError("the training data set is empty")
            if steps is None and epoch >= epochs:
                return

    def step(self, trainer, forward, y):
        with trainer._autocast():
            out = forward()
            loss = trainer.loss_fn(out.float(), y)
            reg = trainer.adapted.regularizer()
            if reg is not None:
                loss = loss + reg
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.step()
        return loss.detach(), int(y.shape[0])


class _Holder(nn.Module):
    """Lets ``torch.func.functional_call`` swap the trainable parameters of ``net`` around any function of it."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, fn, *inputs):
        return fn(*inputs)


def _sum_loss(loss_fn):
    """The loss of one example as the batch loss would weigh it: ``reduction = 'sum'`` (a class-weighted mean would
    divide each example's loss by its own weight)."""
    if isinstance(loss_fn, nn.Module) and getattr(loss_fn, "reduction", None) == "mean":
        clone = copy.copy(loss_fn)
        clone.reduction = "sum"
        return clone
    return loss_fn


class DPSGDStep(TrainingStep):
    """Sample-level DP-SGD with Poisson sampling and a whole-job budget (see the module docstring).

    Args:
        settings: the job's :class:`DPSettings` (``rounds`` required).
        n_items: training items; ``subjects``: each item's subject (``None``: the unit is the item).
        batch_size: the bundle's batch size, in items (the expected batch size of the Poisson sampler).
        local_epochs / local_steps: the work per round (steps per round = ``local_steps``, or ``local_epochs x
            round(1 / q)``).
        seed: the sampling seed (each round draws from ``seed`` and the round number; the noise does not replay).
    """

    def __init__(self, settings: DPSettings, n_items: int, batch_size: int, local_epochs: int = 1,
                 local_steps: Optional[int] = None, subjects: Optional[Sequence[str]] = None, seed: int = 0):
        if settings.rounds is None:
            raise PrivacyError(f"setting '{SETTING}.rounds' is needed to calibrate the noise for the whole job (the "
                               f"recipe fills it from num_rounds)")
        if n_items < 1:
            raise PrivacyError("differential privacy: the training data set is empty")
        self.settings = settings
        self.seed = seed
        unit = settings.unit
        if unit == "subject" and subjects is None:
            raise PrivacyError(f"setting '{SETTING}.unit' = 'subject' but the training items carry no 'subject' key")
        grouped = subjects is not None and unit != "item" and len(set(subjects)) < len(subjects)
        if grouped or unit == "subject":
            order = list(dict.fromkeys(subjects))
            index = {s: i for i, s in enumerate(order)}
            self.members = [[] for _ in order]
            for i, s in enumerate(subjects):
                self.members[index[s]].append(i)
            self.unit = "subject"
        else:
            self.members = [[i] for i in range(n_items)]
            self.unit = "item"
        n_units = len(self.members)
        per_unit = n_items / n_units
        self.expected_units = max(1.0, min(float(n_units), round(batch_size / per_unit)))
        self.sample_rate = self.expected_units / n_units
        self.steps_per_epoch = max(1, round(1 / self.sample_rate))
        self.steps_per_round = self._round_steps(local_epochs, local_steps)
        self.planned_steps = self.steps_per_round * settings.rounds
        self.noise_multiplier = calibrate_noise(settings.epsilon, settings.delta, self.sample_rate,
                                                self.planned_steps, settings.accountant)
        self.steps_spent = 0
        self.rounds_charged = 0
        self.unit_description = (f"one subject (all of its {n_items} training items grouped by the datalist's "
                                 f"'subject' key into {n_units} subjects)" if self.unit == "subject" else
                                 "one datalist item (one training example)")
        self.last: dict = {}  # the last step's clipping and noise (diagnostics, tests)
        self._this_round = self.steps_per_round

    # ------------------------------------------------------------------ accounting
    def _round_steps(self, epochs: int, steps: Optional[int]) -> int:
        """A round's steps: ``steps``, or ``epochs`` x ``round(1 / q)`` (one expected pass over the data each)."""
        return int(steps) if steps is not None else int(epochs) * self.steps_per_epoch

    def epsilon(self, steps: Optional[int] = None) -> float:
        """Epsilon spent after ``steps`` steps (default: the steps spent).  RDP composes linearly over identical
        steps, so the ``rdp`` accountant's value is one step's RDP curve times ``steps`` (the same number
        ``RDPAccountant.get_epsilon`` gives, without recomputing the curve every round)."""
        n = self.steps_spent if steps is None else int(steps)
        if n <= 0:
            return 0.0
        if self.settings.accountant != "rdp":
            return compute_epsilon([(self.noise_multiplier, self.sample_rate, n)], self.settings.delta,
                                   self.settings.accountant)
        from opacus.accountants import RDPAccountant
        from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

        orders = RDPAccountant.DEFAULT_ALPHAS
        if getattr(self, "_rdp_one", None) is None:
            self._rdp_one = compute_rdp(q=self.sample_rate, noise_multiplier=self.noise_multiplier, steps=1,
                                        orders=orders)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return float(get_privacy_spent(orders=orders, rdp=self._rdp_one * n, delta=self.settings.delta)[0])

    def begin_round(self, trainer, epochs, steps):
        self._this_round = n = self._round_steps(epochs, steps)
        after = self.steps_spent + n
        eps_after = self.epsilon(after)
        if eps_after > self.settings.epsilon * (1 + 1e-9):
            raise PrivacyBudgetExceeded(
                f"round {trainer.rounds_done}: refused by differential privacy: its {n} steps "
                f"would take the spent epsilon from {self.epsilon():.4g} to {eps_after:.4g}, past the target "
                f"epsilon {self.settings.epsilon:g} (delta {self.settings.delta:g}, {self.steps_spent} of "
                f"{self.planned_steps} planned steps spent); nothing was trained")

    def end_round(self, trainer, steps_done):
        self.steps_spent += self._this_round  # the round's steps (an empty Poisson batch counts too)
        self.rounds_charged += 1

    def _identity(self) -> dict:
        s = self.settings
        return {"target_epsilon": s.epsilon, "delta": s.delta, "max_grad_norm": s.max_grad_norm,
                "accountant": s.accountant, "unit": self.unit, "sample_rate": self.sample_rate,
                "noise_multiplier": self.noise_multiplier, "steps_per_round": self.steps_per_round}

    def state(self) -> dict:
        return {**self._identity(), "steps": self.steps_spent, "rounds": self.rounds_charged,
                "planned_steps": self.planned_steps, "epsilon_spent": self.epsilon()}

    def load_state(self, state, rounds_done=0, source="site state"):
        if not state:
            if rounds_done > 0:  # its earlier rounds have no guarantee
                raise PrivacyError(f"{source} holds {rounds_done} round(s) trained without differential privacy: "
                                   f"a DP job cannot continue it (start fresh or use another state name)")
            return
        saved = {k: state.get(k) for k in self._identity()}
        job = self._identity()
        bad = [f"{k}: saved {saved[k]!r}, job {job[k]!r}" for k in job
               if not (saved[k] == job[k] or (isinstance(job[k], float) and isinstance(saved[k], (int, float))
                                               and math.isclose(saved[k], job[k], rel_tol=1e-9)))]
        if bad:
            raise PrivacyError(f"{source} was saved under other differential-privacy settings ({'; '.join(bad)}): "
                               f"its spent budget cannot be continued by this job")
        steps = int(state.get("steps", 0))
        if steps >= self.steps_spent:  # the ledger never goes back (a rolled-back round was still released)
            self.steps_spent = steps
            self.rounds_charged = int(state.get("rounds", 0))

    def report(self) -> dict:
        s = self.settings
        return {"epsilon": self.epsilon(), "delta": s.delta, "target_epsilon": s.epsilon,
                "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "steps": self.steps_spent, "accountant": s.accountant, "unit": self.unit,
                "max_grad_norm": s.max_grad_norm}

    def guarantee(self) -> str:
        r = self.report()
        return (f"({r['epsilon']:.3g}, {r['delta']:g})-differential privacy for each {self.unit} of this site's "
                f"training data (DP-SGD, Poisson sampling rate {r['sample_rate']:.4g}, noise multiplier "
                f"{r['noise_multiplier']:.4g}, clipping norm {r['max_grad_norm']:g}, {r['steps']} steps, "
                f"{r['accountant'].upper()} accountant; target epsilon {r['target_epsilon']:g}); unit: "
                f"{self.unit_description}")

    # ------------------------------------------------------------------ batches
    def _generator(self, trainer) -> torch.Generator:
        # seeded by the ledger's steps, not the round: a federation that continues an earlier one's ledger under the
        # same state name draws new batches, never the earlier federation's again
        return torch.Generator().manual_seed(self.seed * 1000003 + 7919 * self.steps_spent + 17)

    def round_batches(self, trainer, epochs, steps):
        gen = self._generator(trainer)
        n_units = len(self.members)
        draws = []
        for _ in range(self._this_round):
            chosen = torch.nonzero(torch.rand(n_units, generator=gen) < self.sample_rate).flatten().tolist()
            items, groups = [], []
            for g, u in enumerate(chosen):
                items += self.members[u]
                groups += [g] * len(self.members[u])
            draws.append((items, groups))
        yield from trainer._index_batches(draws)

    # ------------------------------------------------------------------ one private step
    def step(self, trainer, forward, y):
        net = trainer.adapted.net
        params = {n: p for n, p in net.named_parameters() if p.requires_grad}
        names = list(params)
        s = self.settings
        device = trainer.device
        batch = int(y.shape[0])
        if batch:
            per_example, loss = self._per_example_grads(trainer, forward, y, params)
            groups = forward.groups
            if groups is not None and self.unit == "subject":
                groups = groups.to(device)
                n_groups = int(groups.max()) + 1
                per_example = {n: torch.zeros((n_groups, *g.shape[1:]), dtype=g.dtype, device=g.device)
                               .index_add_(0, groups, g) for n, g in per_example.items()}
            flat = torch.cat([per_example[n].reshape(per_example[n].shape[0], -1).float() for n in names], dim=1)
            norms = flat.norm(dim=1)
            factor = (s.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
            summed = {n: torch.einsum("i,i...->...", factor, per_example[n].float()) for n in names}
            clipped_norms = norms * factor
        else:  # an empty Poisson batch: the step is noise only
            loss = torch.zeros((), device=device)
            summed = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in names}
            norms = clipped_norms = torch.zeros(0, device=device)
        noise = {n: torch.normal(0.0, self.noise_multiplier * s.max_grad_norm, size=summed[n].shape,
                                 device=summed[n].device) for n in names}
        trainer.optimizer.zero_grad(set_to_none=True)
        for n in names:
            params[n].grad = ((summed[n] + noise[n]) / self.expected_units).to(params[n].dtype)
        reg = trainer.adapted.regularizer()  # data-independent (repr mode is refused): no privacy cost
        if reg is not None:
            used = [params[n] for n in names]
            grads = torch.autograd.grad(reg, used, allow_unused=True)
            for p, g in zip(used, grads):
                if g is not None:
                    p.grad = p.grad + g.to(p.grad.dtype)
            loss = loss + reg.detach()
        trainer.optimizer.step()
        self.last = {"norms": norms.detach(), "clipped_norms": clipped_norms.detach(),
                     "noise_std": self.noise_multiplier * s.max_grad_norm,
                     "noise": {n: v.detach() for n, v in noise.items()},
                     "summed": {n: v.detach() for n, v in summed.items()}}
        return loss.detach(), batch

    def _per_example_grads(self, trainer, forward, y, params):
        """``({name: per-example gradient [B, *shape]}, mean loss)``: by activation and output-gradient hooks when
        every trained parameter is the weight or bias of an ``nn.Linear`` (LoRA factors, linear heads: one batched
        pass, fused attention kept), else by ``torch.func`` ``vmap(grad)`` (pFedST's gates, LayerNorms, ...)."""
        linears = self._linear_layout(trainer.adapted.net, params)
        if linears is not None:
            return self._linear_grads(trainer, forward, y, params, linears)
        return self._vmap_grads(trainer, forward, y, params)

    def _linear_layout(self, net, params):
        if getattr(self, "_layout_for", None) is not net:
            owners = {}
            for mname, m in net.named_modules():
                for pname, p in m.named_parameters(recurse=False):
                    if p.requires_grad:
                        owners[f"{mname}.{pname}" if mname else pname] = (m, pname)
            ok = all(type(m) is nn.Linear for m, _ in owners.values())
            self._layout = {n: owners[n] for n in params} if ok and set(owners) == set(params) else None
            self._layout_for = net
        return self._layout

    def _linear_grads(self, trainer, forward, y, params, layout):
        modules = {id(m): m for m, _ in layout.values()}
        seen: dict = {}
        handles = []

        def capture(module, inputs, output):
            if id(module) in seen:  # called twice in one pass: the per-example product below would be wrong
                seen[id(module)] = None
                return
            record = seen[id(module)] = [inputs[0].detach(), None]
            output.register_hook(lambda g: record.__setitem__(1, g.detach()))

        for m in modules.values():
            handles.append(m.register_forward_hook(capture))
        try:
            with trainer._autocast():
                logits = forward()
            loss = _sum_loss(trainer.loss_fn)(logits.float(), y)
            torch.autograd.backward(loss, inputs=list(params.values()))
        finally:
            for h in handles:
                h.remove()
            for p in params.values():
                p.grad = None
        if any(seen.get(k) is None or seen[k][1] is None for k in modules):
            self._layout = None  # this network's forward does not fit the hook path: use vmap from now on
            return self._vmap_grads(trainer, forward, y, params)
        out = {}
        for name, (m, pname) in layout.items():
            a, g = seen[id(m)]
            a, g = a.float().reshape(a.shape[0], -1, a.shape[-1]), g.float().reshape(g.shape[0], -1, g.shape[-1])
            out[name] = torch.einsum("bto,bti->boi", g, a) if pname == "weight" else g.sum(dim=1)
        return out, loss.detach() / max(int(y.shape[0]), 1)

    def _vmap_grads(self, trainer, forward, y, params):
        from torch.func import functional_call, grad_and_value, vmap
        from torch.nn.attention import SDPBackend, sdpa_kernel

        holder = _Holder(trainer.adapted.net)
        loss_one = _sum_loss(trainer.loss_fn)
        fn = forward.fn

        def one(p, inputs, label):
            with trainer._autocast():
                logits = functional_call(holder, {f"net.{k}": v for k, v in p.items()},
                                         (fn, *[t.unsqueeze(0) for t in inputs]))
            return loss_one(logits.float(), label.unsqueeze(0))

        detached = {k: v.detach() for k, v in params.items()}
        # the composite (math) attention has vmap batching rules; the fused kernels fall back to a per-example loop
        with sdpa_kernel(SDPBackend.MATH):
            grads, losses = vmap(grad_and_value(one), in_dims=(None, 0, 0), randomness="different")(
                detached, tuple(forward.inputs), y)
        return grads, losses.mean()


def make_training_step(differential_privacy: Any, dataset, batch_size: int, local_epochs: int = 1,
                       local_steps: Optional[int] = None, seed: int = 0, adapter_settings=None) -> TrainingStep:
    """The training step a site's settings ask for: :class:`StandardStep`, or :class:`DPSGDStep` over
    ``dataset`` (subjects read from its items)."""
    settings = DPSettings.from_dict(differential_privacy)
    if settings is None:
        return StandardStep()
    problem = check_method_settings(adapter_settings) if adapter_settings is not None else None
    if problem:
        raise PrivacyError(problem)
    return DPSGDStep(settings, len(dataset), batch_size, local_epochs, local_steps,
                     subjects=subjects_of(dataset) if settings.unit != "item" else None, seed=seed)


def install_training_step(trainer, differential_privacy: Any, dataset, batch_size: int, local_epochs: int = 1,
                          local_steps: Optional[int] = None, seed: int = 0, adapter_settings=None) -> TrainingStep:
    """Give ``trainer`` the training step its settings ask for (see :func:`make_training_step`); with DP, a
    BatchNorm that would train is refused first, naming it."""
    step = make_training_step(differential_privacy, dataset, batch_size, local_epochs, local_steps, seed,
                              adapter_settings)
    if isinstance(step, DPSGDStep):
        bad = trainable_batchnorms(trainer.adapted.net, trainer._set_train_mode)
        if bad:
            raise PrivacyError(batchnorm_problem(bad))
    trainer.set_training_step(step)
    return step


def batchnorm_problem(names: Sequence[str]) -> str:
    return (f"setting {SETTING!r}: BatchNorm module(s) {', '.join(names[:8])} would train (trainable or in training "
            f"mode): a batch's statistics mix its examples, so per-example privacy cannot hold; freeze them, or "
            f"replace them with GroupNorm")
