"""Client-side task-result filter: nothing but the method's shared keys, and plain metrics, leaves the site.

It fails closed, for every result:

* an **error reply** (return code not OK) leaves with its return code and a short cause string only;
* a result that is **not a DXO** is blocked (its keys cannot be checked);
* **weights of any DXO kind** (WEIGHTS, WEIGHT_DIFF, FL_MODEL, ...; COLLECTIONs walked): frozen/base keys block the
  whole result, private keys are stripped (``on_private="strip"``) or block it (``"block"``);
* a **METRICS** DXO keeps only known metric names with finite scalar values (or null);
* **meta and headers** never carry arrays or tensors (blocked); site metrics in meta pass only as finite scalars or
  null under known names, the base fingerprint only as a string; ``strip_site_metrics`` / ``strip_initial_metrics``
  remove them, in COLLECTION meta too.

Configure it with explicit task names (``["train", "validate", "submit_model"]``): nvflare 2.9.0 never applies a
job filter registered for ``"*"``.  Or install it as a site ``privacy.json`` scope, which applies to every task and
runs before job filters (``flare-duallora site-config --privacy``).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.filter import ContentBlockedException, Filter
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable

from flare_duallora.engine import FROZEN, PRIVATE, SharingPolicy
from flare_duallora.engine.state import preview_keys
from flare_duallora.flare.run_files import CAUSE_HEADER, FINGERPRINT_META
from flare_duallora.metrics import MODEL_KINDS, is_metric_name

STRIP, BLOCK = "strip", "block"
METRICS_META = ("site_metrics", MetaKey.INITIAL_METRICS)
MAX_CAUSE = 2000


def _is_array(value: Any) -> bool:
    return isinstance(value, np.ndarray) or hasattr(value, "detach") or hasattr(value, "__array_interface__")


def _arrays_in(value: Any, path: str = "") -> list[str]:
    """Where ``value`` holds an array or tensor (dicts and lists walked)."""
    if _is_array(value):
        return [path or "<value>"]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _arrays_in(v, f"{path}.{k}" if path else str(k))]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in _arrays_in(v, f"{path}[{i}]")]
    return []


def _scalar(value: Any) -> tuple[bool, Any]:
    """``(ok, value)``: finite ints/floats pass, non-finite floats become None, None passes, the rest fails."""
    if value is None:
        return True, None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False, None
    return True, (value if math.isfinite(value) else None)


def _clean_metrics(value: Any) -> tuple[dict, list[str]]:
    """``{kind: {metric: scalar}}`` with only known kinds and names and finite scalars; and what was dropped."""
    out, dropped = {}, []
    if not isinstance(value, dict):
        return out, ["<not a dict>"]
    for kind, metrics in value.items():
        if kind not in MODEL_KINDS or not isinstance(metrics, dict):
            dropped.append(str(kind))
            continue
        clean = {}
        for name, v in metrics.items():
            ok, v = _scalar(v)
            if ok and is_metric_name(name):
                clean[name] = v
            else:
                dropped.append(f"{kind}/{name}")
        out[kind] = clean
    return out, dropped


class PrivateKeyFilter(Filter):
    """Remove private adapter keys from outgoing results and block anything else that is not shared.

    Args:
        sharing: the sharing rule, ``{"method": ..., "head": [...], "head_shared": ...}`` (what
            :meth:`~flare_duallora.engine.SharingPolicy.to_args` gives; the same on sites and server).
        on_private: ``strip`` (default) removes private keys and lets the shared rest go; ``block`` refuses the
            whole result instead.  Frozen keys (base weights) always block.
        strip_initial_metrics: drop ``meta["initial_metrics"]`` (pre-training metrics on the received model).
        strip_site_metrics: drop the per-site metrics in ``meta`` (in COLLECTION meta too).
    """

    def __init__(self, sharing: dict, on_private: str = STRIP, strip_initial_metrics: bool = False,
                 strip_site_metrics: bool = False):
        super().__init__()
        if on_private not in (STRIP, BLOCK):
            raise ValueError(f"setting 'on_private' = {on_private!r}: expected 'strip' or 'block'")
        self.sharing = dict(sharing)
        self.on_private = on_private
        self.strip_initial_metrics = strip_initial_metrics
        self.strip_site_metrics = strip_site_metrics
        self.policy = SharingPolicy.from_args(self.sharing)

    # ------------------------------------------------------------------ entry point
    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        site = fl_ctx.get_identity_name()
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return self._error_reply(shareable, fl_ctx)
        arrays = _arrays_in(self._custom_headers(shareable))
        if arrays:
            self._block(fl_ctx, f"{site}: blocked a result whose headers carry arrays/tensors: {arrays[:5]}")
        try:
            dxo = from_shareable(shareable)
        except Exception:  # noqa: BLE001
            self._block(fl_ctx, f"{site}: PrivateKeyFilter: result is not a DXO; blocked (cannot check its keys)")
        self._check(dxo, fl_ctx)
        return dxo.update_shareable(shareable)

    @staticmethod
    def _custom_headers(shareable: Shareable) -> dict:
        headers = shareable.get(ReservedHeaderKey.HEADERS) or {}
        return {k: v for k, v in headers.items() if not str(k).startswith("__")}

    def _error_reply(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        """Keep the return code, FLARE's reserved headers and a short cause string; drop everything else."""
        headers = shareable.get(ReservedHeaderKey.HEADERS) or {}
        kept = {k: v for k, v in headers.items() if str(k).startswith("__") and not _arrays_in(v)}
        cause = headers.get(CAUSE_HEADER)
        if isinstance(cause, str):
            kept[CAUSE_HEADER] = cause[:MAX_CAUSE]
        dropped = [k for k in shareable if k != ReservedHeaderKey.HEADERS]
        for k in dropped:
            del shareable[k]
        shareable[ReservedHeaderKey.HEADERS] = kept
        if dropped:
            self.log_warning(fl_ctx, f"{fl_ctx.get_identity_name()}: an error reply carried content {dropped}; only "
                                     f"its return code and cause leave the site")
        return shareable

    def _block(self, fl_ctx: FLContext, msg: str):
        self.log_error(fl_ctx, msg)
        raise ContentBlockedException(msg)

    # ------------------------------------------------------------------ DXOs
    def _check(self, dxo: DXO, fl_ctx: FLContext, outer: bool = True) -> None:
        site = fl_ctx.get_identity_name()
        self._check_meta(dxo, fl_ctx)
        if dxo.data_kind == DataKind.COLLECTION:
            for name, sub in (dxo.data or {}).items():
                if not isinstance(sub, DXO):
                    self._block(fl_ctx, f"{site}: blocked a COLLECTION whose entry {name!r} is not a DXO")
                self._check(sub, fl_ctx, outer=False)
            return
        data = dxo.data if isinstance(dxo.data, dict) else {}
        if dxo.data_kind == DataKind.METRICS:
            dropped = []
            for key in list(data):
                ok, value = _scalar(data[key])
                kind, _, name = str(key).partition("/")
                if ok and kind in MODEL_KINDS and is_metric_name(name):
                    data[key] = value
                else:
                    dropped.append(str(key))
                    del data[key]
            if dropped:
                self.log_warning(fl_ctx, f"{site}: removed {len(dropped)} entries that are not plain metrics from a "
                                         f"METRICS result: {preview_keys(dropped)}")
        else:
            roles = self.policy.roles(data)
            frozen = [k for k, r in roles.items() if r == FROZEN]
            private = [k for k, r in roles.items() if r == PRIVATE]
            if frozen:
                kind = getattr(dxo.data_kind, "value", dxo.data_kind)
                self._block(fl_ctx, f"{site}: blocked a {kind} result carrying {len(frozen)} frozen/base "
                                    f"key(s) not shared by method {self.policy.method!r}: {preview_keys(frozen)}")
            if private and self.on_private == BLOCK:
                self._block(fl_ctx, f"{site}: blocked a result carrying {len(private)} private key(s): "
                                    f"{preview_keys(private)}")
            for key in private:
                del data[key]
            if private:
                self.log_warning(fl_ctx, f"{site}: removed {len(private)} private key(s) before sending: "
                                         f"{preview_keys(private)}")
        dxo.add_filter_history(type(self).__name__)

    def _check_meta(self, dxo: DXO, fl_ctx: FLContext) -> None:
        site = fl_ctx.get_identity_name()
        meta = dxo.meta if isinstance(dxo.meta, dict) else {}
        if self.strip_initial_metrics:
            meta.pop(MetaKey.INITIAL_METRICS, None)
        if self.strip_site_metrics:
            meta.pop("site_metrics", None)
            meta.pop(MetaKey.INITIAL_METRICS, None)
        for key in METRICS_META:
            if key in meta:
                meta[key], dropped = _clean_metrics(meta[key])
                if dropped:
                    self.log_warning(fl_ctx, f"{site}: removed non-metric entries from meta[{key!r}]: {dropped[:5]}")
        if FINGERPRINT_META in meta and not isinstance(meta[FINGERPRINT_META], str):
            del meta[FINGERPRINT_META]
        arrays = _arrays_in(meta)
        if arrays:
            self._block(fl_ctx, f"{site}: blocked a result whose DXO meta carries arrays/tensors: {arrays[:5]}")
