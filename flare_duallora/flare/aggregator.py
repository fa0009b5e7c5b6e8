"""Server-side aggregator: a weighted average of shared keys only, refusing anything else.

A contribution is rejected whole (and logged with the site's name and the keys at fault) when it carries a key
the method keeps private or frozen, a key set different from the round's, or a tensor of the wrong shape.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
from nvflare.apis.dxo import MetaKey
from nvflare.apis.fl_component import FLComponent
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator

from flare_duallora.engine import SHARED, SharingPolicy
from flare_duallora.engine.state import preview_keys
from flare_duallora.flare.comm import payload_bytes

WEIGHT_SOURCES = ("examples", "steps", "uniform")


def _as_array(value) -> np.ndarray:
    if hasattr(value, "materialize"):  # lazy reference with tensor disk offload
        value = value.materialize()
    if hasattr(value, "detach"):
        value = value.detach().cpu().float().numpy()
    return np.asarray(value)


class SharedKeyAggregator(ModelAggregator):
    """Weighted FedAvg of the method's shared keys (works under ``FedAvg`` and ``ScatterAndGather``).

    Args:
        method, head, head_shared: the sharing rule, as on the sites.
        weigh_by: ``examples`` (meta ``num_examples``), ``steps`` (``NUM_STEPS_CURRENT_ROUND``) or ``uniform``.
    """

    def __init__(
        self,
        method: str,
        head: Union[None, str, Sequence[str]] = None,
        head_shared: Optional[bool] = None,
        weigh_by: str = "examples",
    ):
        FLComponent.__init__(self)
        ModelAggregator.__init__(self)
        if weigh_by not in WEIGHT_SOURCES:
            raise ValueError(f"setting 'weigh_by' = {weigh_by!r}: expected one of {WEIGHT_SOURCES}")
        self.method = method
        self.head = head
        self.head_shared = head_shared
        self.weigh_by = weigh_by
        self.policy = SharingPolicy(method, head or (), head_shared)
        self.shapes: Optional[dict[str, tuple]] = None  # the global model's key set and shapes, once known
        self.history: list[dict] = []  # per round: accepted / rejected sites, bytes received
        self._last: dict[str, np.ndarray] = {}
        self.reset_stats()

    def reset_stats(self) -> None:
        self._sum: dict[str, np.ndarray] = {}
        self._total_weight = 0.0
        self._round = {"accepted": {}, "rejected": {}, "bytes_received": {}}

    def _weight(self, model: FLModel) -> float:
        meta = model.meta or {}
        if self.weigh_by == "uniform":
            return 1.0
        key = "num_examples" if self.weigh_by == "examples" else MetaKey.NUM_STEPS_CURRENT_ROUND
        value = meta.get(key)
        if not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"meta {key!r} is missing or not positive ({value!r}) but 'weigh_by' = {self.weigh_by!r}")
        return float(value)

    def _reject(self, site: str, reason: str) -> bool:
        self.error(f"rejected the contribution of {site}: {reason}")
        self._round["rejected"][site] = reason
        return False

    def accept_model(self, model: FLModel) -> bool:
        site = (model.meta or {}).get("client_name", "unknown site")
        params = model.params or {}
        self._round["bytes_received"][site] = payload_bytes({k: _as_array(v) for k, v in params.items()})
        bad = {k: r for k, r in self.policy.roles(params).items() if r != SHARED}
        if bad:
            return self._reject(site, f"{len(bad)} key(s) that method {self.method!r} does not share "
                                      f"({'/'.join(sorted(set(bad.values())))}): {preview_keys(bad)}")
        arrays = {k: _as_array(v) for k, v in params.items()}
        reference = self.shapes or (
            {k: v.shape for k, v in self._sum.items()} if self._sum else None
        )
        if reference is not None:
            missing, extra = set(reference) - set(arrays), set(arrays) - set(reference)
            if missing or extra:
                return self._reject(site, f"key set differs from the global model (missing {preview_keys(missing)}; "
                                          f"unexpected {preview_keys(extra)})")
            wrong = [f"{k} {arrays[k].shape} (expected {tuple(reference[k])})" for k in arrays
                     if tuple(arrays[k].shape) != tuple(reference[k])]
            if wrong:
                return self._reject(site, f"wrong shape for {'; '.join(wrong[:5])}")
        try:
            weight = self._weight(model)
        except ValueError as e:
            return self._reject(site, str(e))
        for k, v in arrays.items():
            acc = self._sum.get(k)
            self._sum[k] = v.astype(np.float64) * weight if acc is None else acc + v.astype(np.float64) * weight
        self._total_weight += weight
        self._round["accepted"][site] = weight
        self.info(f"accepted {site}: {len(arrays)} shared keys, weight {weight}")
        return True

    def aggregate_model(self) -> FLModel:
        summary = {k: dict(v) if isinstance(v, dict) else v for k, v in self._round.items()}
        if not self._round["accepted"]:
            self.error(f"no acceptable contribution this round (rejected: {sorted(self._round['rejected'])}); "
                       "the global model stays as it was")
            params = dict(self._last)
        else:
            params = {k: (v / self._total_weight).astype(np.float32) for k, v in self._sum.items()}
            self.shapes = {k: v.shape for k, v in params.items()}
            self._last = params
        self.history.append(summary)
        self.reset_stats()
        return FLModel(params_type=ParamsType.FULL, params=params, meta={"aggregation": summary})
