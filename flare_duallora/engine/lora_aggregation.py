"""How the server combines the sites' LoRA factors: ``factors`` (FedAvg of A and B), ``svd`` or ``fedex``.

Averaging ``A`` and ``B`` separately is not averaging the updates: ``avg(B) avg(A) != avg(B_k A_k)``.  Per LoRA layer
(``<module>.lora_A.<adapter>.weight``, ``r x d_in``, and ``<module>.lora_B.<adapter>.weight``, ``d_out x r``; conv
adapters are flattened to that layout and reshaped back), with the aggregation weights ``w_k`` (normalised to 1):

``factors``  ``A = sum w_k A_k``, ``B = sum w_k B_k`` (FedIT / FedAvg; today's behaviour).  Inexact: the effective
             update ``B A`` differs from ``sum w_k B_k A_k``.
``svd``      the server forms ``P = sum w_k B_k A_k`` and refactors it to rank ``r`` by truncated SVD,
             ``P ~ U_r S_r V_r^T``, ``B = U_r S_r^1/2``, ``A = S_r^1/2 V_r^T`` (singular values split symmetrically).
             The download stays rank r; exact when the stacked rank of the sites' updates is <= r, otherwise the best
             rank-r approximation (Eckart-Young).  Computed from QR factors of the stacked ``[w_k B_k]`` and
             ``[A_k]`` (only a ``Kr x Kr`` SVD).  Rank components with a zero singular value keep a non-zero ``A`` row
             (an orthonormal direction of the sites' ``A`` rows, at the average row norm) and a zero ``B`` column, so
             no component is dead for the next round.  ``svd`` re-parametrises the factors: they are no longer the
             sites' ``A`` / ``B`` (optimiser moments kept across rounds refer to the old parametrisation).
``fedex``    FedEx-LoRA: the averaged factors as in ``factors`` plus, per layer, the dense residual
             ``R = s * (sum w_k B_k A_k - B A)`` (``s = alpha / r``) that every site adds to its frozen base weight,
             so its effective update ``W0 + R + s B A`` equals ``W0 + s sum w_k B_k A_k`` exactly.  Residuals are
             keyed by the base weight of the adapted network (``<module>.base_layer.weight``) and shaped like it.

LoRA scaling: the products ``B_k A_k`` here are in **factor space, without the scaling** ``s = alpha / r``.  ``s``
is the same for a layer on every site, so it factors out of the average, out of the SVD and out of every relative
error.  Only the fedex residual, which is added to a weight, is in weight space: it includes ``s``.

Layers whose ``lora_A`` or ``lora_B`` is not in the shared state (FFA-LoRA shares B only, FedSA-LoRA A only) have no
product to average: their factors are averaged as in ``factors`` (exact for FFA, whose ``A`` is identical on every
site).  Every non-LoRA shared key (a shared head) is averaged with the same weights.  Sites are summed in sorted
order (float64), like :mod:`flare_duallora.engine.aggregation`.

Server (FLARE layer)::

    result = aggregate_lora(params_by_site, weights_by_site, mode, scaling=settings.alpha_of("global") /
                            settings.rank_of("global"))
    # send result.state (+ result.residuals for fedex) to every site

Site, on receiving a fedex round::

    adapted.load_shared(state)
    fold_residuals(adapted.net, residuals)   # W0 += R, once per round; persist the base (it is no longer the bundle's)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

__all__ = [
    "LORA_AGGREGATION_MODES", "LoraAggregate", "LoraPair", "add_residuals", "aggregate_lora", "aggregation_error",
    "check_residuals", "download_bytes", "fold_residuals", "lora_pairs", "upload_bytes",
]

LORA_AGGREGATION_MODES = ("factors", "svd", "fedex")
_A_KEY = re.compile(r"^(?P<module>.+)\.lora_A\.(?P<adapter>[^.]+)\.weight$")

Array = np.ndarray
State = Mapping[str, object]
Scaling = Union[None, float, Mapping[str, float]]


@dataclass(frozen=True)
class LoraPair:
    """One LoRA layer of a state dict: both factor keys, and the base weight key its residual goes to."""

    layer: str  # "<module>.<adapter>"
    module: str
    adapter: str
    a_key: str
    b_key: str

    @property
    def base_key(self) -> str:
        """The frozen base weight in the adapted network's state dict (peft names it ``base_layer``)."""
        return f"{self.module}.base_layer.weight"


@dataclass
class LoraAggregate:
    """The new shared state (same keys and shapes as the contributions) and, for ``fedex``, the residuals."""

    mode: str
    state: dict[str, Array]
    residuals: dict[str, Array] = field(default_factory=dict)  # base weight key -> residual (weight space, x s)
    pairs: dict[str, LoraPair] = field(default_factory=dict)
    shares: dict[str, float] = field(default_factory=dict)


def lora_pairs(keys: Iterable[str]) -> dict[str, LoraPair]:
    """Every LoRA layer whose ``lora_A`` *and* ``lora_B`` are among ``keys``, by ``"<module>.<adapter>"``."""
    keys = set(keys)
    out = {}
    for key in sorted(keys):
        m = _A_KEY.match(key)
        if not m:
            continue
        b_key = f"{m['module']}.lora_B.{m['adapter']}.weight"
        if b_key in keys:
            layer = f"{m['module']}.{m['adapter']}"
            out[layer] = LoraPair(layer, m["module"], m["adapter"], key, b_key)
    return out


def _np(value) -> Array:
    if hasattr(value, "materialize"):  # a lazy reference with tensor disk offload
        value = value.materialize()
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


def _mat_a(a: Array) -> Array:
    return a.reshape(a.shape[0], -1)  # r x d_in(*k)


def _mat_b(b: Array) -> Array:
    return b.reshape(b.shape[0], -1)  # d_out x r (conv: d_out x r x 1 x ... x 1)


def _scaling_of(scaling: Scaling, pair: LoraPair) -> float:
    if scaling is None:
        raise ValueError("fedex needs the LoRA scaling (alpha / r) to put the residual in weight space: pass scaling=")
    if isinstance(scaling, Mapping):
        for k in (pair.layer, pair.adapter):
            if k in scaling:
                return float(scaling[k])
        raise ValueError(f"no LoRA scaling given for layer {pair.layer!r} (adapter {pair.adapter!r})")
    return float(scaling)


def _prepare(states: Mapping[str, State], weights: Mapping[str, float]
             ) -> tuple[list[str], list[float], dict[str, dict[str, Array]]]:
    sites = sorted(states)
    if not sites:
        raise ValueError("no site contribution to aggregate")
    if set(weights) != set(sites):
        raise ValueError(f"weights given for {sorted(weights)}, contributions from {sites}")
    raw = [weights[s] for s in sites]
    if any(not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0) for w in raw):
        raise ValueError(f"aggregation weights must be finite and > 0: {dict(zip(sites, raw))}")
    total = float(sum(raw))
    shares = [float(w) / total for w in raw]
    arrays = {s: {k: _np(v) for k, v in states[s].items()} for s in sites}
    keys = set(arrays[sites[0]])
    for s in sites[1:]:
        if set(arrays[s]) != keys:
            raise ValueError(f"site {s!r} sent other keys than site {sites[0]!r}")
        for k in keys:
            if arrays[s][k].shape != arrays[sites[0]][k].shape:
                raise ValueError(f"{k}: shape {arrays[s][k].shape} from {s!r}, {arrays[sites[0]][k].shape} from "
                                 f"{sites[0]!r}")
    return sites, shares, arrays


def _weighted(values: Sequence[Array], shares: Sequence[float]) -> Array:
    acc = np.zeros_like(values[0])
    for w, v in zip(shares, values):
        acc += w * v
    return acc


def _exact_product(pair: LoraPair, sites, shares, arrays) -> Array:
    return _weighted([_mat_b(arrays[s][pair.b_key]) @ _mat_a(arrays[s][pair.a_key]) for s in sites], shares)


def _svd_factors(pair: LoraPair, sites, shares, arrays, rank: int) -> tuple[Array, Array]:
    """Rank-``rank`` factors ``B`` (d_out x r), ``A`` (r x d_in) of ``sum w_k B_k A_k``, singular values split."""
    b_cat = np.concatenate([w * _mat_b(arrays[s][pair.b_key]) for s, w in zip(sites, shares)], axis=1)  # d_out x Kr
    a_cat = np.concatenate([_mat_a(arrays[s][pair.a_key]) for s in sites], axis=0)  # Kr x d_in
    q_b, r_b = np.linalg.qr(b_cat)
    q_a, r_a = np.linalg.qr(a_cat.T)
    u, sv, vt = np.linalg.svd(r_b @ r_a.T)  # the Kr x Kr core of P = Q_b (R_b R_a^T) Q_a^T
    u, vt = q_b @ u, vt @ q_a.T  # d_out x m, m x d_in (m = min(d_out, d_in, Kr))
    k = min(rank, sv.shape[0])
    root = np.sqrt(sv[:k])
    b = np.zeros((b_cat.shape[0], rank))
    a = np.zeros((rank, a_cat.shape[1]))
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vt[:k]
    # components without signal (a zero singular value) keep an input direction and a zero B column: the product is
    # unchanged and the component can still learn next round
    tol = max(b_cat.shape[0], a_cat.shape[1]) * np.finfo(np.float64).eps * (sv[0] if sv.size else 0.0)
    dead = [i for i in range(rank) if i >= k or sv[i] <= tol]
    if dead:
        row_norm = float(np.mean(np.linalg.norm(_weighted([_mat_a(arrays[s][pair.a_key]) for s in sites], shares),
                                                axis=1)))
        spare = [vt[i] for i in range(vt.shape[0]) if i >= k or sv[i] <= tol]
        for j, i in enumerate(dead):
            b[:, i] = 0.0
            a[i] = (spare[j] if j < len(spare) else np.zeros(a.shape[1])) * row_norm
    return b, a


def aggregate_lora(states: Mapping[str, State], weights: Mapping[str, float], mode: str = "factors",
                   scaling: Scaling = None) -> LoraAggregate:
    """Combine the sites' shared states ``{site: {key: array}}`` with ``weights`` ``{site: w > 0}``.

    Returns a :class:`LoraAggregate`: ``state`` holds the same keys and shapes as each contribution (float64), and
    for ``fedex`` ``residuals`` maps each adapted base weight key to the residual every site adds to it
    (:func:`fold_residuals`).  ``scaling`` (``alpha / r``: one number, or ``{layer or adapter: s}``) is needed for
    ``fedex`` only.  Raises ``ValueError`` on an unknown mode, mismatched keys or shapes, or bad weights.
    """
    if mode not in LORA_AGGREGATION_MODES:
        raise ValueError(f"setting 'lora_aggregation' = {mode!r}: expected one of {LORA_AGGREGATION_MODES}")
    sites, shares, arrays = _prepare(states, weights)
    first = arrays[sites[0]]
    pairs = lora_pairs(first)
    state = {k: _weighted([arrays[s][k] for s in sites], shares) for k in sorted(first)}  # factors (and the rest)
    out = LoraAggregate(mode, state, pairs=pairs, shares=dict(zip(sites, shares)))
    if mode == "factors":
        return out
    for pair in pairs.values():
        a_shape, b_shape = first[pair.a_key].shape, first[pair.b_key].shape
        if mode == "svd":
            b, a = _svd_factors(pair, sites, shares, arrays, rank=a_shape[0])
            state[pair.b_key], state[pair.a_key] = b.reshape(b_shape), a.reshape(a_shape)
        else:  # fedex
            exact = _exact_product(pair, sites, shares, arrays)
            mean = _mat_b(state[pair.b_key]) @ _mat_a(state[pair.a_key])
            residual = (_scaling_of(scaling, pair) * (exact - mean)).reshape((b_shape[0],) + tuple(a_shape[1:]))
            key = pair.base_key
            out.residuals[key] = out.residuals[key] + residual if key in out.residuals else residual
    return out


def effective_products(result: LoraAggregate, scaling: Scaling = None) -> dict[str, Array]:
    """Per layer, the update a site applies after this round, in factor space (``B A`` + ``R / s`` for fedex)."""
    out = {}
    for layer, pair in result.pairs.items():
        prod = _mat_b(result.state[pair.b_key]) @ _mat_a(result.state[pair.a_key])
        if result.mode == "fedex":
            residual = result.residuals[pair.base_key]
            prod = prod + residual.reshape(prod.shape) / _scaling_of(scaling, pair)
        out[layer] = prod
    return out


def aggregation_error(states: Mapping[str, State], weights: Mapping[str, float], mode: str,
                      scaling: Scaling = None, result: Optional[LoraAggregate] = None) -> dict[str, float]:
    """Per LoRA layer, ``||effective update - sum w_k B_k A_k||_F / ||sum w_k B_k A_k||_F`` of ``mode``.

    The effective update is what every site's network adds to its base after the round (for ``fedex`` the
    averaged factors plus the folded residual).  Scaling-free (``s`` cancels); 0 for a layer whose exact average
    is 0 and whose effective update is 0 too (``inf`` if only the exact average is 0).  ``scaling`` defaults to 1
    (any positive value gives the same errors).
    """
    sites, shares, arrays = _prepare(states, weights)
    scaling = 1.0 if scaling is None else scaling
    result = result if result is not None else aggregate_lora(states, weights, mode, scaling)
    effective = effective_products(result, scaling)
    out = {}
    for layer, pair in result.pairs.items():
        exact = _exact_product(pair, sites, shares, arrays)
        num, den = float(np.linalg.norm(effective[layer] - exact)), float(np.linalg.norm(exact))
        out[layer] = num / den if den > 0 else (0.0 if num == 0 else math.inf)
    return out


def download_bytes(result: LoraAggregate, itemsize: int = 4) -> int:
    """Bytes each site receives per round: the shared state (rank-r factors and any shared head) plus, for fedex,
    the dense residuals; ``itemsize`` 4 = float32 on the wire."""
    n = sum(int(np.prod(v.shape)) for v in result.state.values())
    n += sum(int(np.prod(v.shape)) for v in result.residuals.values())
    return n * itemsize


def upload_bytes(state: State, itemsize: int = 4) -> int:
    """Bytes one site sends per round (the same in every mode: its shared state)."""
    return sum(int(np.prod(tuple(v.shape))) for v in state.values()) * itemsize


MAX_RESIDUAL_RATIO = 0.5  # a fedex residual larger than half its base weight (Frobenius) rewrites the base: refused


def check_residuals(net: nn.Module, residuals: Mapping[str, object], max_ratio: Optional[float] = MAX_RESIDUAL_RATIO
                    ) -> dict[str, torch.Tensor]:
    """fedex residuals checked whole before any is folded: keys of the network's adapted base weights
    (``<module>.base_layer.weight``), sizes that fit, values finite *after the cast to the weight's dtype* (a float64
    1e300 becomes inf in float32), each no larger than ``max_ratio`` times its base weight's norm (None: no bound),
    and a base that stays finite.  Returns the tensors shaped and typed like the weights; raises ``KeyError`` /
    ``ValueError`` naming the first problem (nothing changed)."""
    if not isinstance(residuals, Mapping):
        raise ValueError("fedex residuals: expected a dict of arrays")
    own = net.state_dict()
    unknown = [k for k in residuals if not isinstance(k, str) or k not in own or not k.endswith(".base_layer.weight")]
    if unknown:
        raise KeyError(f"fedex residual for {len(unknown)} weight(s) the network does not have as adapted base "
                       f"weights: {[str(k) for k in unknown][:3]}")
    tensors = {}
    for key, value in residuals.items():
        try:
            t = torch.as_tensor(_np(value))
        except Exception:  # noqa: BLE001 - strings, objects
            raise ValueError(f"fedex residual {key}: not a numeric array") from None
        if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"fedex residual {key}: dtype {t.dtype} is not numeric")
        if t.numel() != own[key].numel():
            raise ValueError(f"fedex residual {key}: {tuple(t.shape)} does not fit the weight {tuple(own[key].shape)}")
        t = t.reshape(own[key].shape).to(own[key].dtype)
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"fedex residual {key}: non-finite values in the weight's dtype {own[key].dtype}")
        base = own[key].detach().float().norm()
        if max_ratio is not None and float(t.float().norm()) > max_ratio * float(base):
            raise ValueError(f"fedex residual {key}: norm {float(t.float().norm()):.3g} exceeds {max_ratio} x the base "
                             f"weight's norm {float(base):.3g}")
        if not bool(torch.isfinite(own[key].detach().cpu() + t.cpu()).all()):
            raise ValueError(f"fedex residual {key}: folding it would make the base weight non-finite")
        tensors[key] = t
    return tensors


def fold_residuals(net: nn.Module, residuals: Mapping[str, object], max_ratio: Optional[float] = None) -> None:
    """Add each fedex residual to its frozen base weight, in place (``W0 += R``), on the site.

    ``residuals`` keys are base weight keys of the adapted network (``<module>.base_layer.weight``); a residual is
    shaped like the base weight (or flattened to ``d_out x d_in``).  Everything is checked first
    (:func:`check_residuals`, with ``max_ratio``); raises ``KeyError`` / ``ValueError`` and changes nothing then.
    """
    tensors = check_residuals(net, residuals, max_ratio)
    own = net.state_dict()
    with torch.no_grad():
        for key, t in tensors.items():
            own[key].add_(t.to(own[key].device, own[key].dtype))


def add_residuals(total: Mapping[str, Array], new: Mapping[str, Array]) -> dict[str, Array]:
    """The running sum of fedex residuals (what a server keeps to rebuild the global model, or to bring a site that
    (re)joins up to date: every site's base is ``W0 + sum of the rounds' residuals``)."""
    out = {k: np.asarray(v, dtype=np.float64).copy() for k, v in total.items()}
    for k, v in new.items():
        out[k] = out[k] + v if k in out else np.asarray(v, dtype=np.float64).copy()
    return out
