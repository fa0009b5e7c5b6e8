"""The server's arithmetic, without FLARE: validate a contribution whole, bound each site's influence, combine.

Everything here works on ``{key: numpy array}`` dicts in float64 and sums sites in a fixed (sorted) order, so two
runners that feed the same contributions get the same global model to the last bit.

Rules (the defaults keep plain FedAvg for honest sites):

* **validation** (:func:`check_contribution`): exactly the expected keys and shapes, a numeric dtype, every value
  finite, a finite positive weight.  Nothing of a contribution is used unless all of it passes.
* **magnitude bound** (``reject_ratio``, default 100): with ``g`` the current global shared state, a contribution
  ``w`` whose update ``||w - g||`` exceeds ``reject_ratio * ||g||`` is rejected.  When the server does not know
  ``g`` (round 0 without the sites' initial state, see *update norms*), ``g`` is the coordinate-wise median of the
  round's valid contributions and ``||g||`` the norm the job was built with (the initial shared state), else the
  median's norm.
* **relative clipping** (``clip_ratio``, default :data:`DEFAULT_CLIP_RATIO`): an update whose norm exceeds
  ``clip_ratio`` x the median update norm of the *other* sites this round is scaled down to that length (towards
  the reference it was measured from).  Needs one other site; skipped when the others' median is 0.
* **absolute clipping** (``max_update_norm``, off by default): an update longer than ``max_update_norm * ||g||`` is
  scaled down to that length.
* **weight caps**: a site's declared weight is cut to ``max_weight_ratio`` (default
  :data:`DEFAULT_MAX_WEIGHT_RATIO`) x the median of the other sites' declared weights, and the weight of a site
  whose update was clipped to that median itself (a site may not be both far out and heavy: its influence on the
  global is its share times its update); then, with three sites or more, no site keeps more than
  ``max_weight_share`` (default :data:`DEFAULT_MAX_WEIGHT_SHARE`) of the weights (the excess is spread over the
  others in proportion to their weights).
* Every clip and cap is returned as a :class:`Bound` (site, kind, factor, reason).  The defaults were chosen from
  measured honest federations (``python -m flare_duallora.bench.bounds``; README, "What the server checks"): with
  them an honest federation is aggregated bit for bit as plain FedAvg.
* **update norms**: an update is ``w - g``.  Before round 0 the controller asks every site for its shared state
  and ``g`` is the one a majority holds bit for bit (every site starts from the same seeded adapters).  Without
  it, ``g`` is the coordinate-wise median of the round's valid contributions: robust to one boosted site, but not
  exact for honest ones (an honest update can then look clipped: it is logged like any clip).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np

__all__ = [
    "AggregationRules", "Bound", "Contribution", "DEFAULT_CLIP_RATIO", "DEFAULT_MAX_WEIGHT_RATIO",
    "DEFAULT_MAX_WEIGHT_SHARE", "ROBUST_MODES", "Rejection", "aggregate", "bound_weights", "cap_shares",
    "check_contribution", "flat_norm",
]

#: clip an update at this many times the median update norm of the other sites (honest maximum measured: README)
DEFAULT_CLIP_RATIO = 6.0
#: cut a declared weight to this many times the median of the other sites' declared weights
DEFAULT_MAX_WEIGHT_RATIO = 8.0
#: no site keeps more than this share of the weights (with three sites or more)
DEFAULT_MAX_WEIGHT_SHARE = 0.6

ROBUST_MODES = ("mean", "trimmed_mean", "median")
Shapes = Mapping[str, Sequence[int]]


@dataclass
class Contribution:
    """One site's valid contribution: float64 arrays and its aggregation weight."""

    site: str
    params: dict[str, np.ndarray]
    weight: float


@dataclass
class Rejection:
    site: str
    reason: str


@dataclass
class Bound:
    """A clip or a cap: ``kind`` is ``clipped`` (the update was scaled by ``factor``) or ``capped`` (the weight share
    was multiplied by ``factor``)."""

    site: str
    kind: str
    factor: float
    reason: str


@dataclass(frozen=True)
class AggregationRules:
    """How contributions are bounded and combined (see the module docstring)."""

    robust: str = "mean"
    reject_ratio: Optional[float] = 100.0
    max_update_norm: Optional[float] = None
    max_weight_share: Optional[float] = DEFAULT_MAX_WEIGHT_SHARE
    trim_fraction: float = 0.2
    lora_aggregation: str = "factors"
    clip_ratio: Optional[float] = DEFAULT_CLIP_RATIO
    max_weight_ratio: Optional[float] = DEFAULT_MAX_WEIGHT_RATIO

    def __post_init__(self) -> None:
        from flare_duallora.engine.lora_aggregation import LORA_AGGREGATION_MODES

        if self.robust not in ROBUST_MODES:
            raise ValueError(f"setting 'robust_aggregation' = {self.robust!r}: expected one of {ROBUST_MODES}")
        if self.lora_aggregation not in LORA_AGGREGATION_MODES:
            raise ValueError(f"setting 'lora_aggregation' = {self.lora_aggregation!r}: expected one of "
                             f"{LORA_AGGREGATION_MODES}")
        if self.lora_aggregation != "factors" and self.robust != "mean":
            raise ValueError(f"setting 'lora_aggregation' = {self.lora_aggregation!r} averages the products B A with "
                             f"the sites' weights: it needs robust_aggregation = 'mean', not {self.robust!r}")
        for name in ("reject_ratio", "max_update_norm"):
            value = getattr(self, name)
            if value is not None and not (_number(value) and value > 0):
                raise ValueError(f"setting {name!r} = {value!r}: expected a number > 0 or None")
        for name in ("clip_ratio", "max_weight_ratio"):
            value = getattr(self, name)
            if value is not None and not (_number(value) and value >= 1):
                raise ValueError(f"setting {name!r} = {value!r}: expected a number >= 1 (a multiple of the other "
                                 f"sites' median) or None (off)")
        share = self.max_weight_share
        if share is not None and not (_number(share) and 0 < share <= 1):
            raise ValueError(f"setting 'max_weight_share' = {share!r}: expected a number in (0, 1] or None")
        if not 0 <= self.trim_fraction < 0.5:
            raise ValueError(f"setting 'trim_fraction' = {self.trim_fraction!r}: expected a number in [0, 0.5)")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def flat_norm(params: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of all values of a state dict taken as one vector."""
    return math.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in params.values()))


def _as_array(value) -> np.ndarray:
    if hasattr(value, "materialize"):  # a lazy reference with tensor disk offload
        value = value.materialize()
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def check_contribution(params: Mapping[str, object], weight: object, expected: Optional[Shapes]
                       ) -> tuple[Optional[dict[str, np.ndarray]], Optional[str]]:
    """``(float64 arrays, None)`` for a valid contribution, ``(None, reason)`` otherwise.

    ``expected`` is the schema ``{key: shape}``; ``None`` skips the key and shape check (the caller then checks the
    schema across sites).  The whole contribution is checked before anything is returned.
    """
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight) or weight <= 0:
        return None, f"aggregation weight {_short(weight)} is not a finite positive number"
    if params is not None and not isinstance(params, Mapping):
        return None, f"the shared weights are a {type(params).__name__}, not a dict of arrays"
    odd = [_short(k) for k in (params or {}) if not isinstance(k, str)]
    if odd:
        return None, f"{len(odd)} key(s) that are not strings: {', '.join(odd[:3])}"
    if not params:
        if expected is not None and not expected:
            return {}, None  # a method that shares nothing (local-only) sends nothing
        return None, "no shared weights in the result"
    if expected is not None:
        missing, extra = set(expected) - set(params), set(params) - set(expected)
        if missing or extra:
            return None, (f"key set differs from the job's schema: missing {_preview(missing)}; "
                          f"unexpected {_preview(extra)}")
    arrays = {}
    for key in sorted(params):
        try:
            arr = _as_array(params[key])
        except Exception as e:  # noqa: BLE001 - anything that is not an array is refused
            return None, f"{key}: not an array ({type(e).__name__})"
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            return None, f"{key}: dtype {arr.dtype} is not numeric"
        if expected is not None and tuple(arr.shape) != tuple(expected[key]):
            return None, f"{key}: shape {tuple(arr.shape)}, expected {tuple(expected[key])}"
        arr = arr.astype(np.float64)
        if not np.isfinite(arr).all():
            return None, f"{key}: {int((~np.isfinite(arr)).sum())} non-finite value(s) (NaN or Inf)"
        arrays[key] = arr
    return arrays, None


def _short(value, n: int = 60) -> str:
    """``repr(value)`` cut to ``n`` characters (a hostile value never floods a log or a status file)."""
    text = repr(value)
    return text if len(text) <= n else text[:n] + "..."


def _preview(keys, n: int = 3) -> str:
    keys = sorted(keys)
    return (", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")) or "none"


def cap_shares(weights: Sequence[float], max_share: Optional[float]) -> list[float]:
    """Normalised weights with no share above ``max_share`` (water-filling; exact when feasible)."""
    return _water_fill(weights, max_share)[0]


def _water_fill(weights: Sequence[float], max_share: Optional[float]) -> tuple[list[float], set[int]]:
    total = float(sum(weights))
    shares = [w / total for w in weights]
    if max_share is None:
        return shares, set()
    if max_share * len(shares) < 1 - 1e-12:
        return [1.0 / len(shares)] * len(shares), set()
    capped: set[int] = set()
    while True:
        free = [i for i in range(len(shares)) if i not in capped]
        budget = 1.0 - max_share * len(capped)
        free_total = sum(weights[i] for i in free)
        shares = [max_share if i in capped else budget * weights[i] / free_total for i in range(len(weights))]
        over = [i for i in free if shares[i] > max_share + 1e-12]
        if not over:
            return shares, capped
        capped.update(over)


def bound_weights(weights: Mapping[str, float], max_ratio: Optional[float], max_share: Optional[float],
                  clipped: Sequence[str] = ()) -> tuple[dict[str, float], list[Bound]]:
    """``({site: share}, caps)``: each declared weight cut to ``max_ratio`` x the median of the other sites'
    declared weights, the weight of a ``clipped`` site to that median itself (its update is already at the limit:
    it may not weigh more than a typical site too), then (three sites or more) no share above ``max_share``.
    Without a cap the shares are the plain normalised weights, bit for bit."""
    sites = sorted(weights)
    raw = [float(weights[s]) for s in sites]
    cut = list(raw)
    reasons: dict[int, str] = {}
    for i in range(len(sites) if len(sites) >= 2 else 0):
        others = float(np.median([raw[j] for j in range(len(sites)) if j != i]))
        if sites[i] in clipped and raw[i] > others:
            cut[i] = others
            reasons[i] = (f"its update was clipped, so its declared weight {raw[i]:g} is cut to the median of the "
                          f"other sites' ({others:g})")
        elif max_ratio is not None and raw[i] > max_ratio * others:
            cut[i] = max_ratio * others
            reasons[i] = (f"declared weight {raw[i]:g} is more than max_weight_ratio = {max_ratio:g} x the "
                          f"median of the other sites' ({others:g})")
    shares, over = _water_fill(cut, max_share if len(sites) >= 3 else None)
    total = sum(cut)
    for i in over:
        share = f"its share {cut[i] / total:.3g} of the weights exceeds max_weight_share = {max_share:g}"
        reasons[i] = f"{reasons[i]}; {share}" if i in reasons else share
    raw_total = sum(raw)
    caps = [Bound(sites[i], "capped", shares[i] / (raw[i] / raw_total), reasons[i]) for i in sorted(reasons)]
    return dict(zip(sites, shares)), caps


def _median(stack: list[np.ndarray]) -> np.ndarray:
    return np.median(np.stack(stack), axis=0)


def _trimmed_mean(stack: list[np.ndarray], fraction: float) -> np.ndarray:
    k = int(math.floor(fraction * len(stack)))
    if k == 0 and len(stack) >= 3 and fraction > 0:
        k = 1  # with few sites, trim at least the extremes
    arr = np.sort(np.stack(stack), axis=0)
    return arr[k:len(stack) - k].mean(axis=0)


@dataclass
class RoundOutcome:
    params: dict[str, np.ndarray]
    shares: dict[str, float]
    rejected: list[Rejection] = field(default_factory=list)
    clipped: list[str] = field(default_factory=list)
    bounds: list[Bound] = field(default_factory=list)  # every clip and cap, with its factor and reason
    reference_norm: float = 0.0
    update_norms: dict[str, float] = field(default_factory=dict)
    residuals: dict[str, np.ndarray] = field(default_factory=dict)  # fedex: base weight key -> residual


def aggregate(contributions: Sequence[Contribution], rules: AggregationRules,
              current: Optional[Mapping[str, np.ndarray]] = None,
              reference_norm: Optional[float] = None, lora_scaling: Optional[float] = None) -> RoundOutcome:
    """Bound, weigh and combine valid contributions (sorted by site) into the next global state.

    ``current`` is the global shared state the sites received (None before the server knows one);
    ``reference_norm`` replaces ``||current||`` when ``current`` is None (the job's initial shared state norm);
    ``lora_scaling`` is the LoRA ``alpha / r`` of the shared adapter (needed by ``fedex``).
    Raises ``ValueError`` without contributions; ``params`` is empty when every one was rejected.
    """
    contributions = sorted(contributions, key=lambda c: c.site)
    if not contributions:
        raise ValueError("no valid contribution to aggregate")
    keys = sorted(contributions[0].params)
    if current is not None:
        ref = {k: np.asarray(current[k], dtype=np.float64) for k in keys}
        norm = flat_norm(ref)
    else:
        ref = {k: _median([c.params[k] for c in contributions]) for k in keys}
        norm = reference_norm if reference_norm is not None else flat_norm(ref)
    out = RoundOutcome(params={}, shares={}, reference_norm=norm)
    valid: list[Contribution] = []
    for c in contributions:
        n = flat_norm({k: c.params[k] - ref[k] for k in keys})
        if rules.reject_ratio is not None and norm > 0 and n > rules.reject_ratio * norm:
            out.rejected.append(Rejection(c.site, f"update norm {n:.3g} exceeds {rules.reject_ratio:g} x the norm "
                                                  f"of the current global shared state ({norm:.3g})"))
            continue
        valid.append(c)
    if not valid:
        return out  # every contribution rejected: no parameters (the caller keeps the current global state)
    kept = _clip(valid, keys, ref if current is not None else None, norm, rules, out)
    out.shares, caps = bound_weights({c.site: c.weight for c, _ in kept}, rules.max_weight_ratio,
                                     rules.max_weight_share, out.clipped)
    out.bounds += caps
    shares = [out.shares[c.site] for c, _ in kept]
    if rules.lora_aggregation != "factors":
        from flare_duallora.engine.lora_aggregation import aggregate_lora

        result = aggregate_lora({c.site: x for c, x in kept}, out.shares, rules.lora_aggregation, lora_scaling)
        out.params, out.residuals = dict(result.state), dict(result.residuals)
        return out
    for k in keys:
        stack = [x[k] for _, x in kept]
        if rules.robust == "median":
            out.params[k] = _median(stack)
        elif rules.robust == "trimmed_mean":
            out.params[k] = _trimmed_mean(stack, rules.trim_fraction)
        else:
            acc = np.zeros_like(stack[0])
            for s, v in zip(shares, stack):
                acc += s * v
            out.params[k] = acc
    return out


def _clip(valid: list[Contribution], keys: list[str], ref: Optional[dict], norm: float, rules: AggregationRules,
          out: RoundOutcome) -> list[tuple[Contribution, dict[str, np.ndarray]]]:
    """Each contribution, its update scaled down where it is longer than the relative / absolute bound."""
    known = ref is not None
    if ref is None:  # the initial state is unknown: the coordinate-wise median of the valid contributions
        ref = {k: _median([c.params[k] for c in valid]) for k in keys}
    deltas = [{k: c.params[k] - ref[k] for k in keys} for c in valid]
    norms = [flat_norm(d) for d in deltas]
    out.update_norms = {c.site: n for c, n in zip(valid, norms)}
    what = "the global shared state" if known else "the coordinate-wise median of the contributions"
    kept = []
    for i, c in enumerate(valid):
        limit, reason = math.inf, ""
        others = [n for j, n in enumerate(norms) if j != i]
        median = float(np.median(others)) if others else 0.0
        if rules.clip_ratio is not None and median > 0 and rules.clip_ratio * median < limit:
            limit = rules.clip_ratio * median
            reason = (f"update norm {norms[i]:.4g} (from {what}) exceeds clip_ratio = {rules.clip_ratio:g} x the "
                      f"median update norm of the other {len(others)} site(s) ({median:.4g})")
        if rules.max_update_norm is not None and norm > 0 and rules.max_update_norm * norm < limit:
            limit = rules.max_update_norm * norm
            reason = (f"update norm {norms[i]:.4g} exceeds max_update_norm = {rules.max_update_norm:g} x the norm "
                      f"of the global shared state ({norm:.4g})")
        x = c.params
        if norms[i] > limit:
            scale = limit / norms[i]
            x = {k: ref[k] + scale * deltas[i][k] for k in keys}
            out.clipped.append(c.site)
            out.bounds.append(Bound(c.site, "clipped", scale, reason))
        kept.append((c, x))
    return kept
