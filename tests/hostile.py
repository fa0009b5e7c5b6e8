"""Test-only FLARE filters: a site that lies, a server that sends poison, a server-side recorder.

They travel inside the test jobs as custom code (FedJob copies this module into the job), so they run in the real
simulator's site and server processes.
"""

from __future__ import annotations

import os

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLContextKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable
from nvflare.app_common.app_constant import AppConstants


class HostileResultFilter(Filter):
    """On one site: round 0 sends NaN, round 1 weights scaled by 1e30, round 2 only half of the keys."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        # a result may not carry the task name header (the context names the task): submit_model results pass
        task = shareable.get_header(ReservedHeaderKey.TASK_NAME) or fl_ctx.get_prop(FLContextKey.TASK_NAME)
        if task not in (None, "train") or shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable
        dxo = from_shareable(shareable)
        if dxo.data_kind != DataKind.WEIGHTS:
            return shareable
        rnd, self.count = self.count, self.count + 1
        data = dict(dxo.data)
        if rnd == 0:
            data = {k: np.full_like(v, np.nan) for k, v in data.items()}
        elif rnd == 1:
            data = {k: v * 1e30 for k, v in data.items()}
        elif rnd == 2:
            keys = sorted(data)
            data = {k: data[k] for k in keys[: len(keys) // 2]}
        return DXO(DataKind.WEIGHTS, data=data, meta=dxo.meta).update_shareable(shareable)


class PoisonGlobal(Filter):
    """On the server: the task data of round ``poison_round`` becomes NaN (a broken or hostile server)."""

    def __init__(self, poison_round: int = 1):
        super().__init__()
        self.poison_round = poison_round

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if shareable.get_header(AppConstants.CURRENT_ROUND) != self.poison_round:
            return shareable
        dxo = from_shareable(shareable)
        if dxo.data_kind != DataKind.WEIGHTS or not dxo.data:
            return shareable
        return DXO(DataKind.WEIGHTS, data={k: np.full_like(v, np.nan) for k, v in dxo.data.items()},
                   meta=dxo.meta).update_shareable(shareable)


class RecordTraffic(Filter):
    """On the server: save every WEIGHTS payload it sees (results in, task data out) under ``<run dir>/traffic``."""

    def __init__(self, direction: str = "in"):
        super().__init__()
        self.direction = direction

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        try:
            dxo = from_shareable(shareable)
        except Exception:  # noqa: BLE001 - error replies
            return shareable
        if dxo.data_kind != DataKind.WEIGHTS:
            return shareable
        run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
        folder = os.path.join(run_dir, "traffic")
        os.makedirs(folder, exist_ok=True)
        task = shareable.get_header(ReservedHeaderKey.TASK_NAME, "task")
        if self.direction == "in":
            site = shareable.get_peer_prop(ReservedKey.IDENTITY_NAME, "unknown")
            rnd = shareable.get_cookie(AppConstants.CONTRIBUTION_ROUND)
            name = f"in_{task}_r{rnd}_{site}.npz"
            extra = {"__dataset_size": np.asarray(dxo.meta.get("dataset_size", -1))}
        else:
            rnd = shareable.get_header(AppConstants.CURRENT_ROUND)
            name = f"out_{task}_r{rnd}.npz"
            extra = {}
        data = {k.replace(".", "~"): np.asarray(v) for k, v in (dxo.data or {}).items()}
        try:
            np.savez(os.path.join(folder, name), **data, **extra)
        except (TypeError, ValueError):  # not arrays (the aggregator rejects those)
            pass
        return shareable


def load_traffic(path) -> tuple[dict, dict]:
    """``(weights, extras)`` of one recorded payload."""
    with np.load(path) as z:
        weights = {k.replace("~", "."): z[k] for k in z.files if not k.startswith("__")}
        extras = {k: z[k] for k in z.files if k.startswith("__")}
    return weights, extras


class BoostAndInflate(Filter):
    """On one site, as its task-data (``direction="in"``) *and* task-result (``"out"``) filter: every training result
    becomes ``g + boost (w - g)`` (its own update, ``boost`` times: model replacement) and declares ``size_factor`` x
    its dataset size.

    ``g`` is what the site started the round from: the train task's global model, or in round 0 (empty task data)
    the site's shared state it reported with ``submit_model`` before round 0.
    """

    _reference: dict = {}  # shared by the site's input and output filter instances (one process per site)

    def __init__(self, direction: str = "out", boost: float = 20.0, size_factor: int = 1):
        super().__init__()
        self.direction = direction
        self.boost = boost
        self.size_factor = size_factor

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        # a result may not carry the task name header; the context always names the task
        task = shareable.get_header(ReservedHeaderKey.TASK_NAME) or fl_ctx.get_prop(FLContextKey.TASK_NAME)
        try:
            dxo = from_shareable(shareable)
        except Exception:  # noqa: BLE001 - error replies
            return shareable
        if dxo.data_kind != DataKind.WEIGHTS:
            return shareable
        data = dict(dxo.data or {})
        is_result = self.direction == "out"
        if task == "submit_model" and is_result or task == "train" and not is_result and data:
            BoostAndInflate._reference = {k: np.asarray(v, dtype=np.float64) for k, v in data.items()}
            return shareable
        if task != "train" or not is_result:
            return shareable
        g = BoostAndInflate._reference
        boosted = {k: (g[k] + self.boost * (np.asarray(v, np.float64) - g[k])).astype(np.asarray(v).dtype)
                   if k in g else v for k, v in data.items()}
        meta = dict(dxo.meta or {})
        meta["dataset_size"] = int(meta["dataset_size"]) * self.size_factor
        return DXO(DataKind.WEIGHTS, data=boosted, meta=meta).update_shareable(shareable)
