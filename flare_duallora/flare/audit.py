"""Server-side audit: record everything of every task result as the server received it.

Installed as a server task-result filter (direction ``in``) it sees exactly what arrived over the wire, before
any aggregation; it changes nothing and never fails (a result it cannot read is recorded as such).
``received_keys.jsonl`` in the server's run directory then proves what left the sites (the privacy tests read it):
the DXO kind, its data keys, its meta names, the header names, the other top-level keys, and sizes.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
from nvflare.apis.dxo import from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable
from nvflare.app_common.app_constant import AppConstants

from flare_duallora.flare.run_files import AUDIT_FILE, CAUSE_HEADER, append_jsonl

MAX_NAMES = 10_000  # names recorded per field (a result with more is recorded as cut, with its count)
MAX_NAME = 200  # characters per recorded name


def size_of(value: Any, depth: int = 0) -> int:
    """Approximate bytes of a value as it travels: arrays and tensors by their data, bytes and strings by length,
    containers by their content (8 per scalar)."""
    if depth > 50:
        return 0
    if hasattr(value, "materialize"):
        value = value.materialize()
    if hasattr(value, "element_size") and hasattr(value, "numel"):
        return int(value.numel() * value.element_size())
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value)
    if isinstance(value, str):
        return len(value.encode("utf-8", "replace"))
    if isinstance(value, dict):
        return sum(size_of(k, depth + 1) + size_of(v, depth + 1) for k, v in value.items())
    if isinstance(value, (list, tuple, set)):
        return sum(size_of(v, depth + 1) for v in value)
    return 8


def _names(mapping: Any) -> list[str]:
    if not isinstance(mapping, dict):
        return []
    names = sorted((k if isinstance(k, str) else repr(k))[:MAX_NAME] for k in mapping)
    return names[:MAX_NAMES]


class ReceivedKeysAudit(Filter):
    """Append, for every result the server receives, ``{site, task, round, kind, keys, meta, headers, top_level,
    bytes, meta_bytes, header_bytes, return_code}`` (``keys``: the DXO's data keys of any kind; ``bytes``: the size
    of its data)."""

    def __init__(self, file_name: str = AUDIT_FILE):
        super().__init__()
        self.file_name = file_name

    @staticmethod
    def describe(shareable: Shareable) -> dict:
        """What a result holds, by name and size (never its values, but for the error cause)."""
        entry: dict = {}
        headers = shareable.get(ReservedHeaderKey.HEADERS)
        entry["return_code"] = shareable.get_return_code(ReturnCode.OK)
        entry["headers"] = _names(headers)
        entry["header_bytes"] = size_of(headers) if headers is not None else 0
        entry["top_level"] = _names({k: None for k in shareable if k != ReservedHeaderKey.HEADERS})
        try:
            dxo = from_shareable(shareable)
            kind, data, meta = dxo.data_kind, dxo.data, dxo.meta
        except Exception:  # noqa: BLE001 - recorded as such; the workflow rejects it
            kind, data, meta = "not-a-dxo", None, None
        entry["kind"] = getattr(kind, "value", str(kind))
        entry["keys"] = _names(data)
        entry["key_count"] = len(data) if isinstance(data, dict) else 0
        entry["bytes"] = size_of(data) if data is not None else 0
        entry["meta"] = _names(meta)
        entry["meta_bytes"] = size_of(meta) if meta is not None else 0
        if entry["return_code"] != ReturnCode.OK:
            cause = shareable.get_header(CAUSE_HEADER)
            entry["cause"] = cause[:2000] if isinstance(cause, str) else None
        return entry

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        try:
            entry = {
                "time": time.time(),
                "site": str(shareable.get_peer_prop(ReservedKey.IDENTITY_NAME, "unknown")),
                "task": shareable.get_header(ReservedHeaderKey.TASK_NAME, ""),
                "round": shareable.get_cookie(AppConstants.CONTRIBUTION_ROUND,
                                              shareable.get_header(AppConstants.CURRENT_ROUND)),
                **self.describe(shareable),
            }
        except Exception as e:  # noqa: BLE001 - the audit must not be the thing that fails
            entry = {"time": time.time(), "error": f"could not describe the result: {type(e).__name__}"}
        try:
            run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
            append_jsonl(os.path.join(run_dir, self.file_name), entry)
        except Exception as e:  # noqa: BLE001
            self.log_error(fl_ctx, f"ReceivedKeysAudit could not record a result: {type(e).__name__}: {e}")
        return shareable
