"""Client-side task-result filter: what leaves a site is *built* from an allow-list, never stripped from what the
result holds.

For every task result the filter makes a new :class:`Shareable` holding only:

* **an error reply** (return code not OK): its return code (a ``ReturnCode`` name) and a cause string cut to
  ``MAX_CAUSE`` characters; no other header (FLARE's ``__``-prefixed ones included), no DXO, nothing else;
* **one DXO of an expected kind**: ``WEIGHTS`` (tasks ``train``, ``submit_model``) or ``METRICS`` (``validate``);
  every other kind (``APP_DEFINED``, ``COLLECTION``, ``FL_MODEL``, ``WEIGHT_DIFF``, ...) blocks the result;
* **WEIGHTS data**: string keys the method shares (:class:`~flare_duallora.engine.SharingPolicy`, the same rule as
  the executor and the aggregator), each a numeric array (numpy or torch, no object dtype, nothing nested) of the
  schema's shape.  The schema is the one the site's own executor declares for the task (:data:`OUTBOUND_PROP`, from
  its network), else the filter's ``schema`` argument; with a schema, the key set must be exactly the schema's.
  Frozen/base keys block the result; private keys are stripped (``on_private="strip"``) or block it (``"block"``);
* **METRICS data** and the metrics in meta: names from a fixed set per result kind
  (``<model kind>/<metric>[/<class label>]``), per-class entries only for the class labels the site's bundle declares
  (at most its class count; none when the filter does not know them), finite values in each metric's range rounded
  to ``METRIC_DECIMALS`` places (non-finite values become ``null``);
* **DXO meta**: names from a fixed list (:data:`WEIGHTS_META`, :data:`METRICS_META`) with scalar values of the
  expected type; the base fingerprint only as a short ``sha256:<hex>``-like string;
* **headers**: ``current_round`` (an int) and, on error replies, the cause.  FLARE adds its own routing headers
  (task name and id, cookies, peer properties) after the filters ran.

Whatever else the result held is dropped and logged; arrays, tensors or bytes anywhere in what is dropped block the
whole result (they are not an accident).

It applies where results leave (filter direction ``out``, or none given); on the receiving side (a privacy scope also
installs it among the server's ``in`` result filters) it passes results through unchanged.

Configure it with explicit task names (``["train", "validate", "submit_model"]``): nvflare 2.9.0 never applies a
job filter registered for ``"*"``.  Or install it as a site ``privacy.json`` scope, which applies to every task and
runs before job filters (``flare-duallora site-config --privacy``).
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.filter import ContentBlockedException, Filter
from nvflare.apis.fl_constant import FilterKey, FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable
from nvflare.app_common.app_constant import AppConstants

from flare_duallora.engine import FROZEN, PRIVATE, SHARED, SharingPolicy
from flare_duallora.engine.state import preview_keys
from flare_duallora.flare.run_files import CAUSE_HEADER, FINGERPRINT_META, PRIVACY_META, privacy_entry
from flare_duallora.metrics import METRIC_NAMES, is_key_metric

STRIP, BLOCK = "strip", "block"
MAX_CAUSE = 2000
METRIC_DECIMALS = 6
# the executor declares what it may send for the task being answered (set on the task's FLContext, private)
OUTBOUND_PROP = "flare_duallora.outbound"

# the DXO kind each task answers with
TASK_KINDS = {"train": DataKind.WEIGHTS, "submit_model": DataKind.WEIGHTS, "validate": DataKind.METRICS}
RESULT_KINDS = (DataKind.WEIGHTS, DataKind.METRICS)
# model kinds whose metrics a result may carry: in a METRICS result (final validation) and in a training result's meta
VALIDATION_KINDS = ("personalised", "global_only")
TRAINING_KINDS = ("global_only_received", "personalised_after_training")
PER_CLASS = ("sensitivity", "specificity", "auc", "dice", "hd95")
_UNIT = (0.0, 1.0)
METRIC_RANGES = {"balanced_accuracy": _UNIT, "accuracy": _UNIT, "sensitivity": _UNIT, "specificity": _UNIT,
                 "auc": _UNIT, "mcc": (-1.0, 1.0), "n": (0, 1e9), "loss": (0.0, 1e6), "dice": _UNIT,
                 "hd95": (0.0, 1e6), "hd95_unit": _UNIT}  # hd95_unit: 1 mm, 0 voxels
assert set(METRIC_RANGES) == set(METRIC_NAMES)
# a bundle's own key metric (model-zoo names: val_mean_dice, val_accuracy), reported under its name: a scalar, at most
# MAX_KEY_METRICS of them per model kind
KEY_METRIC_RANGE = (-1e6, 1e6)
MAX_KEY_METRICS = 2


def _range(base: str) -> Optional[tuple]:
    """The range of a metric name (a known metric or a ``val_*`` key metric), None for an unknown name."""
    return METRIC_RANGES.get(base) or (KEY_METRIC_RANGE if is_key_metric(base) else None)
FINGERPRINT_PATTERN = re.compile(r"^[A-Za-z0-9]{1,16}:[0-9a-f]{16,128}$")
RETURN_CODE_PATTERN = re.compile(r"^[A-Z_]{1,64}$")
FILTER_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
MAX_FILTER_HISTORY = 8


def _count(value: Any) -> Optional[int]:
    """A non-negative int (a float with an integral value is taken), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    if not math.isfinite(value) or value < 0 or value != int(value) or value > 1e15:
        return None
    return int(value)


def _number(value: Any) -> Optional[float]:
    """A finite float (ints taken), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class _Drop(Exception):
    pass


def _meta_count(value):
    out = _count(value)
    if out is None:
        raise _Drop
    return out


def _meta_number(value):
    out = _number(value)
    if out is None and not (isinstance(value, float) and not math.isfinite(value)):
        raise _Drop
    return out  # a non-finite float travels as None


def _meta_fingerprint(value):
    if not isinstance(value, str) or not FINGERPRINT_PATTERN.match(value):
        raise _Drop
    return value


def _meta_privacy(value):
    """The spent differential-privacy budget: fixed keys, finite numbers and short names only (run_files)."""
    out = privacy_entry(value)
    if out is None:
        raise _Drop
    return out


# meta names a result may carry, with the check that builds the value that leaves (raises _Drop)
WEIGHTS_META = {
    MetaKey.NUM_STEPS_CURRENT_ROUND: _meta_count,
    "num_examples": _meta_count,
    "dataset_size": _meta_count,
    "bytes_sent": _meta_count,
    "loss": _meta_number,
    FINGERPRINT_META: _meta_fingerprint,
    PRIVACY_META: _meta_privacy,
}
METRICS_META = {FINGERPRINT_META: _meta_fingerprint, PRIVACY_META: _meta_privacy}
# metric dicts in a WEIGHTS result's meta: {meta name: the model kinds it may hold}
WEIGHTS_META_METRICS = {"site_metrics": TRAINING_KINDS, MetaKey.INITIAL_METRICS: ("global_only_received",)}


def _is_array(value: Any) -> bool:
    return isinstance(value, np.ndarray) or hasattr(value, "detach") or hasattr(value, "__array_interface__")


def _hidden_payload(value: Any, path: str = "", depth: int = 0) -> list[str]:
    """Where ``value`` holds an array, a tensor or bytes (dicts and lists walked)."""
    if _is_array(value) or isinstance(value, (bytes, bytearray, memoryview)):
        return [path or "<value>"]
    if depth > 20:
        return [path or "<value>"]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _hidden_payload(v, f"{path}.{k}" if path else str(k), depth + 1)]
    if isinstance(value, (list, tuple, set)):
        return [p for i, v in enumerate(value) for p in _hidden_payload(v, f"{path}[{i}]", depth + 1)]
    return []


def class_labels(num_classes: Optional[int], label_names: Optional[Sequence[str]]) -> tuple[str, ...]:
    """The per-class labels metrics may name: the bundle's label names (at most its class count), else ``0..K-1``."""
    k = _count(num_classes)
    if not k:
        return ()
    if label_names is not None:
        names = [n for n in label_names if isinstance(n, str)]
        return tuple(names[:k])
    return tuple(str(i) for i in range(k))


def metric_value(name: str, value: Any) -> tuple[bool, Any]:
    """``(ok, value)`` for one metric: ``None`` passes, a non-finite float becomes ``None``, a finite number in the
    metric's range is rounded; anything else (strings, bytes, bools, lists, dicts, out of range) is not ok."""
    if value is None:
        return True, None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False, None
    value = float(value)
    if not math.isfinite(value):
        return True, None
    lo, hi = _range(name.partition("/")[0])
    if not lo <= value <= hi:
        return False, None
    if name in ("n", "hd95_unit"):
        return (value == int(value)), int(value)
    return True, round(value, METRIC_DECIMALS)


def metric_name_ok(name: Any, labels: Iterable[str]) -> bool:
    """``balanced_accuracy`` or ``sensitivity/<label>`` with a declared class label."""
    if not isinstance(name, str):
        return False
    base, sep, label = name.partition("/")
    if _range(base) is None:
        return False
    return not sep or (base in PER_CLASS and label in labels)


def clean_flat_metrics(data: Any, kinds: Sequence[str], labels: Sequence[str]) -> tuple[dict, list[str]]:
    """``{"<kind>/<metric>[/<label>]": value}`` built from ``data``: only the given model kinds, known metric names,
    declared class labels and valid values; and what was left out (as strings)."""
    out, dropped = {}, []
    if not isinstance(data, dict):
        return out, ["<not a dict>"]
    key_metrics: dict[str, int] = {}
    for key, value in data.items():
        kind, _, name = key.partition("/") if isinstance(key, str) else ("", "", "")
        ok, clean = metric_value(name, value) if kind in kinds and metric_name_ok(name, labels) else (False, None)
        if ok and is_key_metric(name):
            key_metrics[kind] = key_metrics.get(kind, 0) + 1
            ok = key_metrics[kind] <= MAX_KEY_METRICS
        if ok:
            out[key] = clean
        else:
            dropped.append(repr(key)[:80])
    return out, dropped


def clean_nested_metrics(value: Any, kinds: Sequence[str], labels: Sequence[str]) -> tuple[dict, list[str]]:
    """``{kind: {metric: value}}`` built the same way (metrics in a training result's meta)."""
    if not isinstance(value, dict):
        return {}, ["<not a dict>"]
    flat, dropped = {}, []
    for kind, metrics in value.items():
        if not isinstance(metrics, dict):
            dropped.append(repr(kind)[:80])
            continue
        for name, v in metrics.items():
            flat[(kind, name)] = v
    out: dict = {}
    for (kind, name), v in flat.items():
        ok = kind in kinds and metric_name_ok(name, labels)
        ok, clean = metric_value(name, v) if ok else (False, None)
        if ok:
            out.setdefault(kind, {})[name] = clean
        else:
            dropped.append(f"{kind!r}/{name!r}"[:80])
    return out, dropped


def describe_outbound(shapes: Mapping[str, Sequence[int]], num_classes: Optional[int],
                      label_names: Optional[Sequence[str]]) -> dict:
    """What a site's executor declares it may send (:data:`OUTBOUND_PROP`): its shared keys' shapes and the class
    labels its bundle declares."""
    return {"schema": {str(k): [int(d) for d in v] for k, v in shapes.items()},
            "num_classes": _count(num_classes),
            "label_names": [str(n) for n in label_names] if label_names is not None else None}


def _schema(value) -> Optional[dict]:
    if value is None:
        return None
    pairs = value.items() if isinstance(value, dict) else [(k, v) for k, v in value]
    return {str(k): tuple(int(d) for d in v) for k, v in pairs}


class PrivateKeyFilter(Filter):
    """Build what leaves a site from an allow-list: the method's shared keys, plain metrics and a few scalars.

    Args:
        sharing: the sharing rule, ``{"method": ..., "head": [...], "head_shared": ...}`` (what
            :meth:`~flare_duallora.engine.SharingPolicy.to_args` gives; the same on sites and server).
        on_private: ``strip`` (default) removes private keys and lets the shared rest go; ``block`` refuses the
            whole result instead.  Frozen keys (base weights) always block.
        strip_initial_metrics: send no ``meta["initial_metrics"]`` (pre-training metrics on the received model).
        strip_site_metrics: send no per-site metrics in ``meta``.
        schema: ``{key: shape}`` (or ``[[key, shape], ...]``) of the shared state, used when the site's executor
            declares none; ``num_classes`` / ``label_names``: the class labels per-class metrics may name, likewise.
    """

    def __init__(self, sharing: dict, on_private: str = STRIP, strip_initial_metrics: bool = False,
                 strip_site_metrics: bool = False, schema=None, num_classes: Optional[int] = None,
                 label_names: Optional[list] = None):
        super().__init__()
        if on_private not in (STRIP, BLOCK):
            raise ValueError(f"setting 'on_private' = {on_private!r}: expected 'strip' or 'block'")
        self.sharing = dict(sharing)
        self.on_private = on_private
        self.strip_initial_metrics = strip_initial_metrics
        self.strip_site_metrics = strip_site_metrics
        self.schema = schema
        self.num_classes = num_classes
        self.label_names = label_names
        self.policy = SharingPolicy.from_args(self.sharing)
        self._schema = _schema(schema)

    # ------------------------------------------------------------------ entry point
    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if fl_ctx.get_prop(FLContextKey.FILTER_DIRECTION) == FilterKey.IN:
            # a privacy scope also applies on the receiving side (the server's "in" result filters; the simulator
            # applies scopes there only): nothing is rebuilt, since FLARE's routing headers must stay and the server's
            # own checks (aggregator, controller, audit) follow, but a result carrying keys this rule does not share
            # is blocked.  The allow-list is applied where results leave: "out" (or no direction given).
            self._check_arrived(shareable, fl_ctx)
            return shareable
        if not isinstance(shareable, Shareable):
            self._block(fl_ctx, f"{self._site(fl_ctx)}: blocked a result that is not a Shareable")
        rc = shareable.get_return_code(ReturnCode.OK)
        if rc != ReturnCode.OK:
            return self._error_reply(shareable, rc, fl_ctx)
        try:
            dxo = from_shareable(shareable)
        except Exception:  # noqa: BLE001
            self._block(fl_ctx, f"{self._site(fl_ctx)}: PrivateKeyFilter: result is not a DXO; blocked (cannot "
                                f"check its keys)")
        out = Shareable()
        self._build_dxo(dxo, fl_ctx).update_shareable(out)
        self._copy_headers(shareable, out, fl_ctx)
        self._report_dropped_top_level(shareable, fl_ctx)
        return out

    @staticmethod
    def _site(fl_ctx: FLContext) -> str:
        return str(fl_ctx.get_identity_name())

    def _check_arrived(self, shareable: Shareable, fl_ctx: FLContext) -> None:
        """Block an arrived WEIGHTS result whose keys this filter's rule does not share (frozen or private)."""
        if not isinstance(shareable, Shareable) or shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return
        try:
            dxo = from_shareable(shareable)
        except Exception:  # noqa: BLE001 - not a DXO: the server's own checks reject it
            return
        if dxo.data_kind != DataKind.WEIGHTS or not isinstance(dxo.data, dict):
            return
        roles = self.policy.roles([k for k in dxo.data if isinstance(k, str)])
        bad = [k for k, r in roles.items() if r != SHARED]
        if bad:
            peer = fl_ctx.get_peer_context()
            site = str(peer.get_identity_name()) if peer is not None else "a site"
            self._block(fl_ctx, f"{site}: blocked a WEIGHTS result carrying {len(bad)} key(s) not shared by method "
                                f"{self.policy.method!r}: {preview_keys(bad)}")

    def _block(self, fl_ctx: FLContext, msg: str):
        self.log_error(fl_ctx, msg)
        raise ContentBlockedException(msg)

    def _dropped(self, fl_ctx: FLContext, where: str, items: dict) -> None:
        """Log what was left out; arrays, tensors or bytes in it block the result."""
        if not items:
            return
        hidden = [f"{k!r}{'.' + p if p != '<value>' else ''}" for k, v in items.items() for p in _hidden_payload(v)]
        if hidden:
            self._block(fl_ctx, f"{self._site(fl_ctx)}: blocked a result whose {where} carry arrays/tensors/bytes "
                                f"outside the allow-list: {hidden[:5]}")
        self.log_warning(fl_ctx, f"{self._site(fl_ctx)}: left out {len(items)} {where} entr(ies) not on the "
                                 f"allow-list: {[repr(k)[:60] for k in list(items)[:5]]}")

    def _error_reply(self, shareable: Shareable, rc: Any, fl_ctx: FLContext) -> Shareable:
        """A new reply with the return code and a short cause string only."""
        out = Shareable()
        out.set_return_code(rc if isinstance(rc, str) and RETURN_CODE_PATTERN.match(rc) else
                            ReturnCode.EXECUTION_EXCEPTION)
        headers = shareable.get(ReservedHeaderKey.HEADERS)
        cause = headers.get(CAUSE_HEADER) if isinstance(headers, dict) else None
        if isinstance(cause, str):
            out.set_header(CAUSE_HEADER, cause[:MAX_CAUSE])
        dropped = [repr(k)[:60] for k in shareable if k != ReservedHeaderKey.HEADERS]
        if isinstance(headers, dict):
            dropped += [repr(k)[:60] for k in headers if k not in (ReservedHeaderKey.RC, CAUSE_HEADER)]
        if dropped:
            self.log_warning(fl_ctx, f"{self._site(fl_ctx)}: an error reply carried {dropped[:5]}; only its return "
                                     f"code and cause leave the site")
        return out

    def _copy_headers(self, src: Shareable, out: Shareable, fl_ctx: FLContext) -> None:
        headers = src.get(ReservedHeaderKey.HEADERS)
        headers = dict(headers) if isinstance(headers, dict) else {}
        rnd = headers.pop(AppConstants.CURRENT_ROUND, None)
        if _count(rnd) is not None:
            out.set_header(AppConstants.CURRENT_ROUND, _count(rnd))
        for name in (ReservedHeaderKey.CONTENT_TYPE, ReservedHeaderKey.RC):
            headers.pop(name, None)  # rebuilt: the content type by the DXO, the return code is OK
        self._dropped(fl_ctx, "headers", headers)

    def _report_dropped_top_level(self, src: Shareable, fl_ctx: FLContext) -> None:
        extra = {k: v for k, v in src.items() if k not in (ReservedHeaderKey.HEADERS, "DXO")}
        self._dropped(fl_ctx, "top-level Shareable keys", extra)

    # ------------------------------------------------------------------ DXO
    def _outbound(self, fl_ctx: FLContext) -> dict:
        declared = fl_ctx.get_prop(OUTBOUND_PROP)
        return declared if isinstance(declared, dict) else {}

    def _build_dxo(self, dxo: DXO, fl_ctx: FLContext) -> DXO:
        site = self._site(fl_ctx)
        kind = dxo.data_kind
        kind_name = getattr(kind, "value", kind)
        if kind not in RESULT_KINDS:
            self._block(fl_ctx, f"{site}: blocked a {kind_name!r} result: only WEIGHTS and METRICS leave the site")
        task = fl_ctx.get_prop(FLContextKey.TASK_NAME)
        if task in TASK_KINDS and TASK_KINDS[task] != kind:
            self._block(fl_ctx, f"{site}: blocked a {kind_name} result to task {task!r}, which answers with "
                                f"{TASK_KINDS[task]}")
        if not isinstance(dxo.data, dict):
            self._block(fl_ctx, f"{site}: blocked a {kind_name} result whose data is not a dict")
        declared = self._outbound(fl_ctx)
        labels = class_labels(declared.get("num_classes", self.num_classes),
                              declared.get("label_names", self.label_names)) if declared else \
            class_labels(self.num_classes, self.label_names)
        meta = dxo.meta if isinstance(dxo.meta, dict) else {}
        if kind == DataKind.METRICS:
            data, dropped = clean_flat_metrics(dxo.data, VALIDATION_KINDS, labels)
            self._dropped(fl_ctx, "METRICS entries", {k: v for k, v in dxo.data.items() if k not in data})
            out_meta = self._build_meta(meta, METRICS_META, {}, labels, fl_ctx)
        else:
            schema = _schema(declared["schema"]) if isinstance(declared.get("schema"), (dict, list)) else self._schema
            data = self._build_weights(dxo.data, schema, fl_ctx)
            metrics_meta = dict(WEIGHTS_META_METRICS)
            if self.strip_site_metrics:
                metrics_meta = {}
            elif self.strip_initial_metrics:
                metrics_meta.pop(MetaKey.INITIAL_METRICS)
            out_meta = self._build_meta(meta, WEIGHTS_META, metrics_meta, labels, fl_ctx)
        out = DXO(kind, data=data, meta=out_meta)
        history = meta.get(MetaKey.FILTER_HISTORY)
        kept = [h for h in history if isinstance(h, str) and FILTER_NAME_PATTERN.match(h)] \
            if isinstance(history, list) else []
        out.add_filter_history(kept[-(MAX_FILTER_HISTORY - 1):] + [type(self).__name__])
        return out

    def _build_meta(self, meta: dict, scalars: dict, metrics: dict, labels: Sequence[str],
                    fl_ctx: FLContext) -> dict:
        out, dropped = {}, {}
        for name, value in meta.items():
            if name == MetaKey.FILTER_HISTORY:
                continue
            if name in scalars:
                try:
                    out[name] = scalars[name](value)
                except _Drop:
                    dropped[name] = value
            elif name in metrics:
                clean, bad = clean_nested_metrics(value, metrics[name], labels)
                out[name] = clean
                if bad:
                    self.log_warning(fl_ctx, f"{self._site(fl_ctx)}: left out metrics of meta[{name!r}] not on the "
                                             f"allow-list: {bad[:5]}")
                    hidden = _hidden_payload(value)
                    if hidden:
                        dropped[name] = value
            elif name in WEIGHTS_META_METRICS and (self.strip_site_metrics or self.strip_initial_metrics):
                hidden = _hidden_payload(value)
                if hidden:
                    dropped[name] = value
            else:
                dropped[name] = value
        self._dropped(fl_ctx, "DXO meta", dropped)
        return out

    def _build_weights(self, data: dict, schema: Optional[dict], fl_ctx: FLContext) -> dict:
        site = self._site(fl_ctx)
        bad_keys = [repr(k)[:60] for k in data if not isinstance(k, str)]
        if bad_keys:
            self._block(fl_ctx, f"{site}: blocked a WEIGHTS result with non-string keys: {bad_keys[:5]}")
        roles = self.policy.roles(data)
        frozen = [k for k, r in roles.items() if r == FROZEN]
        private = [k for k, r in roles.items() if r == PRIVATE]
        if frozen:
            self._block(fl_ctx, f"{site}: blocked a WEIGHTS result carrying {len(frozen)} frozen/base key(s) not "
                                f"shared by method {self.policy.method!r}: {preview_keys(frozen)}")
        if private and self.on_private == BLOCK:
            self._block(fl_ctx, f"{site}: blocked a result carrying {len(private)} private key(s): "
                                f"{preview_keys(private)}")
        if private:
            self.log_warning(fl_ctx, f"{site}: removed {len(private)} private key(s) before sending: "
                                     f"{preview_keys(private)}")
        out = {}
        for key in sorted(k for k in data if k not in private):
            arr = self._array(data[key])
            if arr is None:
                self._block(fl_ctx, f"{site}: blocked a WEIGHTS result: {key} is not a numeric array "
                                    f"({type(data[key]).__name__})")
            if schema is not None and key in schema and tuple(arr.shape) != schema[key]:
                self._block(fl_ctx, f"{site}: blocked a WEIGHTS result: {key} has shape {tuple(arr.shape)}, the "
                                    f"schema {schema[key]}")
            out[key] = arr
        if schema is not None and out and set(out) != set(schema):
            extra, missing = set(out) - set(schema), set(schema) - set(out)
            self._block(fl_ctx, f"{site}: blocked a WEIGHTS result whose keys differ from the schema (unexpected "
                                f"{preview_keys(extra) or 'none'}; missing {preview_keys(missing) or 'none'})")
        return out

    @staticmethod
    def _array(value: Any) -> Optional[np.ndarray]:
        """A numeric numpy array (torch tensors converted), or None for anything else (lists, nested, objects)."""
        if hasattr(value, "detach") and hasattr(value, "cpu"):
            try:
                value = value.detach().cpu().numpy()
            except Exception:  # noqa: BLE001
                return None
        if not isinstance(value, np.ndarray):
            return None
        if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
            return None
        return value


MAX_METRIC_ENTRIES = 4096  # the server refuses a site's final metrics with more entries than this


def metrics_problem(metrics: Any, kinds: Sequence[str] = VALIDATION_KINDS) -> Optional[str]:
    """What is wrong with a site's flat metrics as the server received them (``None`` when nothing is): a dict of at
    most :data:`MAX_METRIC_ENTRIES` entries, string keys ``<kind>/<metric>[/<label>]`` with a known kind and metric,
    values ``None`` or real numbers (no bools, strings, bytes, containers).  The server rejects the whole result
    otherwise (the filter on an honest site never lets such a result leave)."""
    if not isinstance(metrics, dict):
        return f"metrics are a {type(metrics).__name__}, not a dict"
    if len(metrics) > MAX_METRIC_ENTRIES:
        return f"{len(metrics)} metric entries (at most {MAX_METRIC_ENTRIES})"
    for key, value in metrics.items():
        if not isinstance(key, str):
            return f"a metric key of type {type(key).__name__} ({repr(key)[:40]})"
        kind, _, name = key.partition("/")
        base, sep, label = name.partition("/")
        if kind not in kinds or _range(base) is None or (sep and (base not in PER_CLASS or not label
                                                                         or len(label) > 64 or "/" in label)):
            return f"unknown metric {key[:80]!r}"
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float, np.integer,
                                                                                    np.floating))):
            return f"metric {key[:80]!r} holds a {type(value).__name__}, not a number"
    return None
