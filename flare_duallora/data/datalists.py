"""Split dataset records into one datalist JSON per federated client.

Datalist contract (read by the MONAI bundles; keep in sync with them)::

    {"name": "site-siemens", "task": "cmr", "label_mode": "binary",
     "label_names": ["NOR", "disease"], "num_classes": 2,
     "training":   [{"ed": "/abs/ed.nii.gz", "es": "/abs/es.nii.gz", "label": 1,
                     "subject": "patient001", "group": "DCM", "vendor": "Siemens",
                     "source": "ACDC"}, ...],
     "validation": [...same keys...]}

    {"name": "site-0", "task": "isic", "label_mode": "multiclass",
     "label_names": ["MEL", ..., "SCC"], "num_classes": 8,
     "training":   [{"image": "/abs/ISIC_0000000.jpg", "label": 3,
                     "subject": "ISIC_0000000", "center": 0}, ...],
     "validation": [...]}

Files are written to ``<out_dir>/<client>.json`` together with ``<out_dir>/clients.json``
(a summary: per client its datalist path, train/val sizes and label counts).  All clients
of one split share the same ``label_names`` so that every client has the same head size.
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

from .acdc import read_acdc
from .isic import read_isic
from .mnms import read_mnms
from .records import ACDC_GROUPS, ISIC_CLASSES, VENDORS, CMRRecord, DatasetFormatError, ISICRecord

__all__ = [
    "read_site_datalist",
    "BINARY_LABEL_NAMES",
    "canonical_group",
    "cmr_datalists",
    "cmr_label_names",
    "isic_datalists",
    "split_cmr",
    "split_isic",
    "stratified_split",
    "write_datalist",
]

#: Label names in ``binary`` mode (0 = normal, 1 = any disease).
BINARY_LABEL_NAMES: tuple[str, str] = ("NOR", "disease")
#: M&Ms pathology codes that name an ACDC group (used to pool classes in multiclass mode).
_GROUP_ALIASES = {"ARV": "RV", "IHD": "MINF"}
LABEL_MODES = ("binary", "multiclass")


def canonical_group(group: str) -> str:
    """Map a diagnosis string to the ACDC naming (M&Ms ``ARV`` -> ``RV``, ``IHD`` -> ``MINF``)."""
    g = group.strip().upper()
    return _GROUP_ALIASES.get(g, g)


def cmr_label_names(records: Iterable[CMRRecord], label_mode: str) -> list[str]:
    """Return the label names for ``label_mode``.

    ``binary``: ``["NOR", "disease"]``.  ``multiclass``: the canonical groups present, in ACDC
    order (NOR, MINF, DCM, HCM, RV) followed by any other M&Ms code alphabetically.
    """
    if label_mode == "binary":
        return list(BINARY_LABEL_NAMES)
    if label_mode != "multiclass":
        raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
    present = {canonical_group(r.group) for r in records}
    known = [g for g in ACDC_GROUPS if g in present]
    return known + sorted(present - set(known))


def _cmr_label(group: str, label_mode: str, names: Sequence[str]) -> int:
    g = canonical_group(group)
    if label_mode == "binary":
        return 0 if g == "NOR" else 1
    return names.index(g)


def stratified_split(labels: Sequence[int], val_fraction: float, rng: random.Random
                     ) -> tuple[list[int], list[int]]:
    """Split indices ``0..len(labels)-1`` into (train, val), stratified by label.

    The validation size is ``round(n * val_fraction)`` clamped to ``[1, n - 1]`` when
    ``n >= 2`` (so both parts are non-empty) and 0 when ``n < 2``.  Per-label quotas use the
    largest-deficit method, never taking the last training item of a label while another
    label can give one.
    Both returned lists are sorted.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(labels)
    n_val = min(max(round(n * val_fraction), 1), n - 1) if n >= 2 else 0
    by_label: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        by_label[y].append(i)
    order = sorted(by_label)
    for y in order:
        rng.shuffle(by_label[y])
    exact = {y: len(by_label[y]) * n_val / n for y in order} if n else {}
    quota = dict.fromkeys(order, 0)
    for _ in range(n_val):  # greedy: keep every label in training, then largest deficit first
        y = max((y for y in order if quota[y] < len(by_label[y])),
                key=lambda y: (quota[y] + 1 < len(by_label[y]), exact[y] - quota[y], -y))
        quota[y] += 1
    val = sorted(i for y in order for i in by_label[y][: quota[y]])
    val_set = set(val)
    return [i for i in range(n) if i not in val_set], val


def write_datalist(path: str | Path, name: str, task: str, label_mode: str,
                   label_names: Sequence[str], training: list[dict], validation: list[dict],
                   test: list[dict] | None = None) -> Path:
    """Write one client datalist JSON (the contract above) atomically and return its path; a held-out ``test`` list
    is written when given (the benchmarks report on it; federated training never reads it)."""
    payload = {
        "name": name,
        "task": task,
        "label_mode": label_mode,
        "label_names": list(label_names),
        "num_classes": len(label_names),
        "training": training,
        "validation": validation,
    }
    if test is not None:
        payload["test"] = test
    return _write_json(Path(path), payload)


def _write_json(path: Path, payload: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp{os.getpid()}_{path.name}"
    tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path.resolve()


def _counts(items: list[dict], k: int) -> list[int]:
    counts = [0] * k
    for item in items:
        counts[item["label"]] += 1
    return counts


def _write_clients(out_dir: Path, task: str, label_mode: str, names: Sequence[str],
                   clients: dict[str, tuple[Path, list[dict], list[dict]]], **extra: Any) -> Path:
    summary = {
        "task": task, "label_mode": label_mode, "label_names": list(names),
        "num_classes": len(names), **extra,
        "clients": [
            {"name": client, "datalist": str(path), "n_train": len(tr), "n_val": len(va),
             "train_label_counts": _counts(tr, len(names)),
             "val_label_counts": _counts(va, len(names))}
            for client, (path, tr, va) in clients.items()
        ],
    }
    return _write_json(out_dir / "clients.json", summary)


def cmr_datalists(records: Sequence[CMRRecord], out_dir: str | Path, label_mode: str = "binary",
                  val_fraction: float = 0.25, seed: int = 0, prefix: str = "site-", test_fraction: float = 0.0
                  ) -> dict[str, Path]:
    """Write one datalist per vendor (``<prefix><vendor lower-case>``) from CMR records.

    Training/validation are split per client with :func:`stratified_split`, seeded by
    ``seed`` and the client name, so the split does not depend on the other clients.  With ``test_fraction`` a
    stratified held-out ``test`` list is taken first (``val_fraction`` is then a share of what is left).
    """
    if not records:
        raise ValueError("no CMR records to split")
    out_dir = Path(out_dir)
    names = cmr_label_names(records, label_mode)
    per_vendor: dict[str, list[CMRRecord]] = defaultdict(list)
    for r in records:
        per_vendor[r.vendor].append(r)
    vendor_order = [v for v in VENDORS if v in per_vendor] + sorted(set(per_vendor) - set(VENDORS))
    clients: dict[str, tuple[Path, list[dict], list[dict]]] = {}
    for vendor in vendor_order:
        client = f"{prefix}{vendor.lower()}"
        recs = sorted(per_vendor[vendor], key=lambda r: (r.source, r.subject))
        items = [{"ed": r.ed, "es": r.es, "label": _cmr_label(r.group, label_mode, names),
                  "subject": r.subject, "group": r.group, "vendor": r.vendor, "source": r.source}
                 for r in recs]
        rng = random.Random(f"{seed}:{client}")
        test = None
        if test_fraction:
            keep_idx, test_idx = stratified_split([it["label"] for it in items], test_fraction, rng)
            test, items = [items[i] for i in test_idx], [items[i] for i in keep_idx]
        train_idx, val_idx = stratified_split([it["label"] for it in items], val_fraction, rng)
        training, validation = [items[i] for i in train_idx], [items[i] for i in val_idx]
        path = write_datalist(out_dir / f"{client}.json", client, "cmr", label_mode, names,
                              training, validation, test)
        clients[client] = (path, training, validation)
    _write_clients(out_dir, "cmr", label_mode, names, clients, seed=seed, val_fraction=val_fraction)
    return {c: v[0] for c, v in clients.items()}


def split_cmr(acdc_root: str | Path | None, mnms_root: str | Path | None, out_dir: str | Path,
              label_mode: str = "binary", val_fraction: float = 0.25, seed: int = 0,
              prefix: str = "site-", *, mnms_csv: str | Path | None = None,
              cache_dir: str | Path | None = None, acdc_splits: Iterable[str] = ("training",),
              mnms_missing: str = "error", test_fraction: float = 0.0) -> dict[str, Path]:
    """Read ACDC and/or M&Ms and write one CMR datalist per vendor (ACDC joins Siemens).

    M&Ms ED/ES frames are extracted into ``cache_dir`` (default ``<out_dir>/mnms_3d``).
    Returns ``{client name: datalist path}``; ``<out_dir>/clients.json`` summarises them.
    """
    records = read_cmr_records(acdc_root, mnms_root, out_dir, mnms_csv=mnms_csv, cache_dir=cache_dir,
                               acdc_splits=acdc_splits, mnms_missing=mnms_missing)
    return cmr_datalists(records, Path(out_dir), label_mode, val_fraction, seed, prefix, test_fraction)


def read_cmr_records(acdc_root: str | Path | None, mnms_root: str | Path | None, out_dir: str | Path, *,
                     mnms_csv: str | Path | None = None, cache_dir: str | Path | None = None,
                     acdc_splits: Iterable[str] = ("training",), mnms_missing: str = "error") -> list[CMRRecord]:
    """The subjects of ACDC and/or M&Ms (M&Ms ED/ES frames extracted into ``cache_dir``, default
    ``<out_dir>/mnms_3d``)."""
    if acdc_root is None and mnms_root is None:
        raise ValueError("give at least one of acdc_root and mnms_root")
    records: list[CMRRecord] = []
    if acdc_root is not None:
        records += read_acdc(acdc_root, splits=acdc_splits)
    if mnms_root is not None:
        cache = cache_dir if cache_dir is not None else Path(out_dir) / "mnms_3d"
        records += read_mnms(mnms_root, csv_path=mnms_csv, cache_dir=cache, missing=mnms_missing)
    return records


def isic_datalists(records: Sequence[ISICRecord], out_dir: str | Path, prefix: str = "site-",
                   val_fraction: float | None = None, seed: int = 0) -> dict[str, Path]:
    """Write one datalist per centre (``<prefix><center>``): train fold -> training, test fold -> validation.

    With ``val_fraction`` the train fold is split (stratified) into training and validation and the test fold
    becomes a held-out ``test`` list (the benchmarks' protocol)."""
    if not records:
        raise ValueError("no Fed-ISIC2019 records to split")
    out_dir = Path(out_dir)
    names = list(ISIC_CLASSES)
    clients: dict[str, tuple[Path, list[dict], list[dict]]] = {}
    for center in sorted({r.center for r in records}):
        client = f"{prefix}{center}"
        folds: dict[str, list[dict]] = {"train": [], "test": []}
        for r in records:
            if r.center == center:
                folds[r.fold].append({"image": r.image, "label": r.target,
                                      "subject": r.subject, "center": r.center})
        if val_fraction:
            train_idx, val_idx = stratified_split([it["label"] for it in folds["train"]], val_fraction,
                                                  random.Random(f"{seed}:{client}"))
            training, validation = [folds["train"][i] for i in train_idx], [folds["train"][i] for i in val_idx]
            path = write_datalist(out_dir / f"{client}.json", client, "isic", "multiclass", names,
                                  training, validation, folds["test"])
            clients[client] = (path, training, validation)
            continue
        path = write_datalist(out_dir / f"{client}.json", client, "isic", "multiclass", names,
                              folds["train"], folds["test"])
        clients[client] = (path, folds["train"], folds["test"])
    _write_clients(out_dir, "isic", "multiclass", names, clients)
    return {c: v[0] for c, v in clients.items()}


def split_isic(isic_root: str | Path, split_csv: str | Path, out_dir: str | Path,
               centers: Iterable[int] | None = None, prefix: str = "site-", val_fraction: float | None = None,
               seed: int = 0) -> dict[str, Path]:
    """Read Fed-ISIC2019 and write one datalist per centre; returns ``{client: path}``."""
    records = read_isic(isic_root, split_csv, centers=centers)
    return isic_datalists(records, out_dir, prefix, val_fraction, seed)


SPLITS = ("training", "validation", "test")


def read_site_datalist(path: str | Path, num_classes: int | None = None,
                       required: Sequence[str] = ("training", "validation")) -> dict:
    """Read and check one site datalist before anything is built from it.

    Errors (:class:`DatasetFormatError`) name the file and, for a bad item, its split, index and subject: a file
    that is missing or not JSON (line and column), a missing or empty required split, an item without a ``label``,
    a label that is not an integer in ``0 .. num_classes - 1`` (``num_classes`` from the argument, else the
    datalist's own ``num_classes``); in a ``label_mode: segmentation`` datalist, an item whose ``image`` or
    ``label`` is not a file path.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(f"datalist {path} does not exist")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetFormatError(f"datalist {path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
                                 ) from None
    if not isinstance(info, dict):
        raise DatasetFormatError(f"datalist {path} must hold a JSON object with 'training' and 'validation' lists")
    k = num_classes if num_classes is not None else info.get("num_classes")
    for split in SPLITS:
        items = info.get(split)
        if items is None:
            if split in required:
                raise DatasetFormatError(f"datalist {path} has no '{split}' list")
            continue
        if not isinstance(items, list) or (split in required and not items):
            raise DatasetFormatError(f"datalist {path}: '{split}' must be a non-empty list of items")
        for i, item in enumerate(items):
            where = f"datalist {path}: {split} item {i}"
            if isinstance(item, dict) and item.get("subject") is not None:
                where += f" (subject {item['subject']})"
            if not isinstance(item, dict) or "label" not in item:
                raise DatasetFormatError(f"{where} has no 'label'")
            label = item["label"]
            if info.get("label_mode") == "segmentation":  # a mask file per item (cmr_segmentation)
                if not isinstance(label, str) or not label or not isinstance(item.get("image"), str):
                    raise DatasetFormatError(f"{where}: a segmentation item needs 'image' and 'label' file paths, "
                                             f"got label {label!r}")
                continue
            if isinstance(label, bool) or not isinstance(label, int):
                raise DatasetFormatError(f"{where}: label {label!r} is not an integer class index")
            if k is not None and not 0 <= label < int(k):
                raise DatasetFormatError(f"{where}: label {label} is outside 0..{int(k) - 1} (num_classes {k})")
    return info
