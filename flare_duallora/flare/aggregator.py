"""Server-side aggregator: the method's shared keys only, every contribution validated whole, influence bounded.

The server knows the schema (shared keys and shapes) before round 0 when the job carries it (the job builders
compute it from the bundle's network); otherwise the schema is the one at least ``min_agree`` sites agree on in the
first round, never whichever site answers first.  Each contribution is checked whole before anything of it is
used (:func:`flare_duallora.engine.aggregation.check_contribution`: keys, shapes, numeric dtype, finite values,
finite positive weight; the site's base fingerprint; the same weight it declared in its first round), stored, and
combined in :meth:`aggregate_model` with the magnitude bound, the relative and absolute clips, the weight caps and the
robust mode of :class:`~flare_duallora.engine.aggregation.AggregationRules`.  There are no partial sums: a rejected
contribution leaves no trace but its record in ``communication.json``; every clip and cap is logged (site, round,
factor, reason) and recorded there.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional

import numpy as np
from nvflare.apis.dxo import MetaKey
from nvflare.apis.fl_component import FLComponent
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator

from flare_duallora.engine import SHARED, SharingPolicy
from flare_duallora.engine.aggregation import (
    DEFAULT_CLIP_RATIO, DEFAULT_MAX_WEIGHT_RATIO, DEFAULT_MAX_WEIGHT_SHARE, AggregationRules, Contribution, aggregate,
    check_contribution,
)
from flare_duallora.engine.state import payload_bytes, preview_keys
from flare_duallora.engine.fingerprint import chain_fingerprint
from flare_duallora.flare.run_files import FEDEX_META, FINGERPRINT_META

WEIGH_BY = ("dataset_size", "steps", "uniform")


def _pairs(schema):
    """A schema as ``(key, shape)`` pairs: a ``{key: shape}`` dict, or ``[[key, shape], ...]`` (job templates write a
    list, since HOCON reads dots in keys as paths)."""
    return schema.items() if isinstance(schema, dict) else [(k, v) for k, v in schema]


class SharedKeyAggregator(ModelAggregator):
    """Validated, bounded FedAvg of the method's shared keys (works under ``FedAvg`` and ``ScatterAndGather``).

    Args:
        sharing: the sharing rule (``SharingPolicy.to_args()``), as on the sites.
        weigh_by: ``dataset_size`` (the site's training-set size, meta ``dataset_size``; default), ``steps``
            (``NUM_STEPS_CURRENT_ROUND``) or ``uniform``.
        robust_aggregation, max_update_norm, max_weight_share, reject_ratio, trim_fraction, lora_aggregation,
            clip_ratio, max_weight_ratio: see :class:`~flare_duallora.engine.aggregation.AggregationRules` (defaults:
            weighted mean of the factors; updates longer than 100x the global shared state's norm rejected; an update
            longer than 6x the other sites' median update norm clipped, and its weight cut to the others' median; a
            declared weight above 8x the others' median, or a share above 0.6, capped).  The weight a site declares
            (its dataset size, or its steps) is fixed at its first round: a different dataset size, or more steps,
            later is refused.
        lora_scaling: the shared adapter's ``alpha / r`` (``fedex`` folds residuals in weight space).
        schema: ``{key: shape}`` of the shared state, known when the job was built (``None``: agreed in round 0).
        fingerprint: the base fingerprint every site must report (``None``: the majority's).
        reference_norm: the norm of the initial shared state (for the magnitude bound of round 0).
        min_agree: how many sites must agree on a schema / fingerprint the job does not carry.
    """

    def __init__(
        self,
        sharing: dict,
        weigh_by: str = "dataset_size",
        robust_aggregation: str = "mean",
        max_update_norm: Optional[float] = None,
        max_weight_share: Optional[float] = DEFAULT_MAX_WEIGHT_SHARE,
        reject_ratio: Optional[float] = 100.0,
        trim_fraction: float = 0.2,
        schema: Optional[dict] = None,
        fingerprint: Optional[str] = None,
        reference_norm: Optional[float] = None,
        min_agree: int = 1,
        lora_aggregation: str = "factors",
        lora_scaling: Optional[float] = None,
        clip_ratio: Optional[float] = DEFAULT_CLIP_RATIO,
        max_weight_ratio: Optional[float] = DEFAULT_MAX_WEIGHT_RATIO,
    ):
        FLComponent.__init__(self)
        ModelAggregator.__init__(self)
        if weigh_by not in WEIGH_BY:
            raise ValueError(f"setting 'weigh_by' = {weigh_by!r}: expected one of {WEIGH_BY}")
        self.sharing = dict(sharing)
        self.weigh_by = weigh_by
        self.robust_aggregation = robust_aggregation
        self.max_update_norm = max_update_norm
        self.max_weight_share = max_weight_share
        self.reject_ratio = reject_ratio
        self.trim_fraction = trim_fraction
        self.schema = schema
        self.fingerprint = fingerprint
        self.reference_norm = reference_norm
        self.min_agree = min_agree
        self.lora_aggregation = lora_aggregation
        self.lora_scaling = lora_scaling
        self.clip_ratio = clip_ratio
        self.max_weight_ratio = max_weight_ratio
        self.policy = SharingPolicy.from_args(self.sharing)
        self.rules = AggregationRules(robust_aggregation, reject_ratio, max_update_norm, max_weight_share,
                                      trim_fraction, lora_aggregation, clip_ratio, max_weight_ratio)
        if lora_aggregation == "fedex" and not lora_scaling:
            raise ValueError("setting 'lora_aggregation' = 'fedex' needs 'lora_scaling' (the shared adapter's alpha / r)")
        self._schema = {k: tuple(v) for k, v in _pairs(schema)} if schema is not None else None
        self._fingerprint = fingerprint
        self.global_params: Optional[dict[str, np.ndarray]] = None  # the current global shared state
        # before round 0: the shared state every site starts from, when the controller learned it (else None)
        self.initial: Optional[dict[str, np.ndarray]] = None
        self.current_round: Optional[int] = None
        self.history: list[dict] = []  # per round: accepted / rejected / clipped / capped sites and why, bytes
        self.declared: dict[str, list] = {}  # site -> [the weight it declared in its first round, that round]
        self.reset_stats()

    # ------------------------------------------------------------------ state
    def reset_stats(self) -> None:
        self._pending: list[tuple[Contribution, Optional[str]]] = []
        self._round = {"accepted": {}, "rejected": {}, "bytes_received": {}}

    def set_global(self, params: Optional[dict], current_round: Optional[int] = None) -> None:
        """The global shared state the sites received this round (``None`` before the server knows one)."""
        self.global_params = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()} if params else None
        if self.global_params and self._schema is None:
            self._schema = {k: tuple(v.shape) for k, v in self.global_params.items()}
        self.current_round = current_round

    def learn_initial(self, results: list[FLModel], n_sites: int) -> str:
        """Keep (as :attr:`initial`) the shared state at least ``min_agree`` sites report bit for bit before round 0
        (every site starts from the same seeded adapters); return what was learned, for the log."""
        import hashlib

        states: dict[str, dict] = {}
        votes: Counter = Counter()
        for result in results:
            arrays, reason = check_contribution(result.params or {}, 1.0, self._schema)
            if reason or not arrays:
                continue
            digest = hashlib.sha256()
            for k in sorted(arrays):
                digest.update(k.encode() + arrays[k].tobytes())
            states[digest.hexdigest()] = arrays
            votes[digest.hexdigest()] += 1
        if not votes and all(not (r.params or {}) for r in results):
            self.initial = None
            return "the sites share no weights: there is no initial shared state to measure updates from"
        if votes:
            best, count = votes.most_common(1)[0]
            if count >= self.min_agree and list(votes.values()).count(count) == 1:
                self.initial = states[best]
                return (f"round 0 updates are measured from the initial shared state {count} of {n_sites} sites "
                        f"hold ({best[:12]})")
        self.initial = None
        return (f"no initial shared state that {self.min_agree} sites agree on (votes: "
                f"{sorted(votes.values(), reverse=True)}): round 0 updates are measured from the median of the other "
                f"sites' contributions")

    def _weight(self, meta: dict):
        if self.weigh_by == "uniform":
            return 1.0
        key = "dataset_size" if self.weigh_by == "dataset_size" else MetaKey.NUM_STEPS_CURRENT_ROUND
        return meta.get(key)

    def _reject(self, site: str, reason: str) -> bool:
        self.error(f"round {self.current_round}: rejected the contribution of {site}: {reason}")
        self._round["rejected"][site] = reason
        return False

    # ------------------------------------------------------------------ per result
    def accept_model(self, model: FLModel) -> bool:
        """Validate one site's result whole and keep it for :meth:`aggregate_model`; a malformed result (any
        type, any key) is rejected with its reason, never raised."""
        meta = getattr(model, "meta", None)
        site = str(meta.get("client_name", "unknown site")) if isinstance(meta, dict) else "unknown site"
        try:
            return self._accept(model, site)
        except Exception as e:  # noqa: BLE001 - a hostile result is a rejection, never a crash
            return self._reject(site, f"malformed result ({type(e).__name__}: {str(e)[:200]})")

    def _accept(self, model: FLModel, site: str) -> bool:
        meta = model.meta if isinstance(model.meta, dict) else {}
        params = model.params or {}
        try:
            self._round["bytes_received"][site] = payload_bytes(params)
        except Exception:  # noqa: BLE001 - not arrays: rejected below
            self._round["bytes_received"][site] = None
        if site in self._round["accepted"] or site in self._round["rejected"] or \
                any(c.site == site for c, _ in self._pending):
            return self._reject(site, "a second result in the same round")
        if not isinstance(params, dict) or any(not isinstance(k, str) for k in params):
            arrays, reason = check_contribution(params, self._weight(meta), self._schema)
            return self._reject(site, reason or "the shared weights are not a dict with string keys")
        bad = {k: r for k, r in self.policy.roles(params).items() if r != SHARED}
        if bad:
            return self._reject(site, f"{len(bad)} key(s) that method {self.policy.method!r} does not share "
                                      f"({'/'.join(sorted(set(bad.values())))}): {preview_keys(bad)}")
        arrays, reason = check_contribution(params, self._weight(meta), self._schema)
        if reason:
            return self._reject(site, reason)
        fp = meta.get(FINGERPRINT_META)
        if not (fp is None or isinstance(fp, str)):
            return self._reject(site, f"base fingerprint of type {type(fp).__name__}, not a string")
        if self._fingerprint is not None and fp != self._fingerprint:
            return self._reject(site, f"base fingerprint {fp[:80] if fp else fp} differs from the job's "
                                      f"{self._fingerprint}: this site trains on a different frozen network (bundle, "
                                      f"model.pt, method or layout)")
        weight = float(self._weight(meta))
        reason = self._weight_change(site, weight)
        if reason:
            return self._reject(site, reason)
        self._pending.append((Contribution(site, arrays, weight), fp))
        return True

    def _weight_change(self, site: str, weight: float) -> Optional[str]:
        """Why a declared weight is refused: a dataset size other than the site's first one, or more steps."""
        if self.weigh_by == "uniform":
            return None
        first = self.declared.get(site)
        if first is None:
            return None
        declared, rnd = first
        if self.weigh_by == "dataset_size" and weight != declared:
            return (f"dataset size {weight:g} differs from the {declared:g} it declared in round {rnd} (a site's "
                    f"dataset size is fixed for the job)")
        if self.weigh_by == "steps" and weight > declared:
            return f"{weight:g} steps exceed the {declared:g} it declared in round {rnd}"
        return None

    # ------------------------------------------------------------------ per round
    def _agree(self) -> None:
        """Round-0 agreement when the job carries no schema / fingerprint: the set ``min_agree`` sites share."""
        if self._schema is None and self._pending:
            layouts = Counter(tuple(sorted((k, v.shape) for k, v in c.params.items())) for c, _ in self._pending)
            layout, count = layouts.most_common(1)[0]
            if count >= self.min_agree and list(layouts.values()).count(count) == 1:
                self._schema = dict(layout)
                for c, fp in list(self._pending):
                    if tuple(sorted((k, v.shape) for k, v in c.params.items())) != layout:
                        self._pending.remove((c, fp))
                        self._reject(c.site, f"key set / shapes differ from the schema {count} sites agree on")
            else:
                for c, _ in self._pending:
                    self._reject(c.site, f"no schema that {self.min_agree} sites agree on yet (layouts: "
                                         f"{sorted(layouts.values(), reverse=True)})")
                self._pending = []
        if self._fingerprint is None and self._pending:
            prints = Counter(fp for _, fp in self._pending)
            fp, count = prints.most_common(1)[0]
            if count >= self.min_agree and list(prints.values()).count(count) == 1:
                self._fingerprint = fp
                for c, other in list(self._pending):
                    if other != fp:
                        self._pending.remove((c, other))
                        self._reject(c.site, f"base fingerprint {other} differs from the one {count} sites share "
                                             f"({fp}): this site trains on a different frozen network")

    def aggregate_model(self) -> FLModel:
        self._agree()
        summary = {"round": self.current_round, **{k: dict(v) for k, v in self._round.items()}}
        current = self.global_params
        if current is None and self.initial is not None and self._pending and \
                set(self.initial) == set(self._pending[0][0].params):
            current = self.initial
        outcome = aggregate([c for c, _ in self._pending], self.rules, current, self.reference_norm,
                            self.lora_scaling) if self._pending else None
        summary.update(clipped={}, capped={})
        if outcome is not None:
            for r in outcome.rejected:
                self._reject(r.site, r.reason)
            for b in outcome.bounds:
                self.warning(f"round {self.current_round}: {b.kind} the {'update' if b.kind == 'clipped' else 'weight'}"
                             f" of {b.site} by a factor {b.factor:.4g}: {b.reason}")
                summary[b.kind][b.site] = {"factor": round(b.factor, 6), "reason": b.reason}
            summary.update(rejected=dict(self._round["rejected"]),
                           update_norm={s: round(n, 6) for s, n in outcome.update_norms.items()},
                           declared={c.site: c.weight for c, _ in self._pending},
                           reference_norm=outcome.reference_norm)
            if outcome.shares:
                for c, _ in self._pending:  # the first weight of every site that took part in an aggregation
                    if c.site in outcome.shares:
                        self.declared.setdefault(c.site, [c.weight, self.current_round])
        if outcome is None or not outcome.shares:
            self.error(f"round {self.current_round}: no acceptable contribution (rejected: "
                       f"{sorted(self._round['rejected'])}); the global model stays as it was")
            params = {k: v.astype(np.float32) for k, v in (self.global_params or {}).items()}
            summary["aggregated"] = False
        else:
            summary["accepted"] = {s: round(w, 6) for s, w in outcome.shares.items()}
            summary["aggregated"] = True
            params = {k: v.astype(np.float32) for k, v in outcome.params.items()}
            self.global_params = {k: v.astype(np.float64) for k, v in params.items()}
            self.info(f"round {self.current_round}: aggregated {sorted(outcome.shares)} "
                      f"({self.robust_aggregation}); rejected {sorted(self._round['rejected'])}")
        meta = {"aggregation": summary}
        if outcome is not None and outcome.shares and outcome.residuals:
            # fedex: every site folds these into its frozen base; the base fingerprint moves with them
            residuals = {k: v.astype(np.float32) for k, v in outcome.residuals.items()}
            meta[FEDEX_META] = residuals
            summary["fedex_residual_bytes"] = payload_bytes(residuals)
            if self._fingerprint is not None:
                self._fingerprint = chain_fingerprint(self._fingerprint, residuals)
        self.history.append(summary)
        self.reset_stats()
        return FLModel(params_type=ParamsType.FULL, params=params, meta=meta)
