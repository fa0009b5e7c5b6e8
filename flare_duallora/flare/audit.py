"""Server-side audit: record the keys and bytes of every task result as the server received it.

Installed as a server task-result filter (direction ``in``) it sees exactly what arrived over the wire, before
any aggregation; it changes nothing.  ``received_keys.jsonl`` in the server's run directory then proves what left
the sites (the privacy tests read it).
"""

from __future__ import annotations

import os
import time

from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable
from nvflare.app_common.app_constant import AppConstants

from flare_duallora.engine.state import payload_bytes
from flare_duallora.flare.run_files import AUDIT_FILE, CAUSE_HEADER, append_jsonl


class ReceivedKeysAudit(Filter):
    """Append ``{site, task, round, kind, keys, bytes, return_code}`` for every result the server receives."""

    def __init__(self, file_name: str = AUDIT_FILE):
        super().__init__()
        self.file_name = file_name

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        rc = shareable.get_return_code(ReturnCode.OK)
        try:
            dxo = from_shareable(shareable)
            kind, data = dxo.data_kind, dxo.data or {}
        except Exception:  # noqa: BLE001
            kind, data = "not-a-dxo", {}
        weights = kind in (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF)
        try:
            size = payload_bytes(data) if weights else 0
        except Exception:  # noqa: BLE001 - not arrays (the aggregator rejects it)
            size = None
        entry = {
            "time": time.time(),
            "site": shareable.get_peer_prop(ReservedKey.IDENTITY_NAME, "unknown"),
            "task": shareable.get_header(ReservedHeaderKey.TASK_NAME, ""),
            "round": shareable.get_cookie(AppConstants.CONTRIBUTION_ROUND, shareable.get_header(AppConstants.CURRENT_ROUND)),
            "kind": getattr(kind, "value", str(kind)),
            "keys": sorted(data) if weights else [],
            "bytes": size,
            "return_code": rc,
        }
        if rc != ReturnCode.OK:
            entry["cause"] = shareable.get_header(CAUSE_HEADER)
        run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
        append_jsonl(os.path.join(run_dir, self.file_name), entry)
        return shareable
