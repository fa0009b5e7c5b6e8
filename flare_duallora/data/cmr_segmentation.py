"""Cardiac segmentation datalists: one item per annotated frame (ED and ES), masks in one label convention.

ACDC and M&Ms-1 label the same three structures with different values (ACDC 1 RV, 2 MYO, 3 LV; M&Ms 1 LV, 2 MYO,
3 RV).  :func:`split_cmr_segmentation` rewrites every mask once into :data:`SEG_LABEL_NAMES` (0 background, 1 LV,
2 MYO, 3 RV) as a NIfTI file under ``<out_dir>/masks`` so that any bundle reads one convention, and writes one
datalist per vendor::

    {"name": "site-siemens", "task": "cmr_segmentation", "label_mode": "segmentation",
     "label_names": ["background", "LV", "MYO", "RV"], "num_classes": 4,
     "training":   [{"image": "/abs/ed.nii.gz", "label": "/abs/masks/patient001_ED_gt.nii.gz",
                     "subject": "patient001", "frame": "ED", "vendor": "Siemens", "source": "ACDC",
                     "group": "DCM"}, ...],
     "validation": [...], "test": [...]}

Splits are drawn over *subjects* (the privacy unit): the ED and ES items of one subject are always on the same side.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import nibabel as nib
import numpy as np

from .acdc import ACDC_LABELS
from .datalists import _write_json, canonical_group, read_cmr_records, stratified_split, write_datalist
from .mnms import MNMS_LABELS
from .records import VENDORS, CMRRecord, DatasetFormatError

__all__ = ["SEG_LABEL_NAMES", "SEG_LABEL_MODE", "SEG_TASK", "canonical_mask", "cmr_segmentation_datalists",
           "segmentation_items", "split_cmr_segmentation", "split_by_subject"]

#: the one convention every segmentation datalist's masks use (index = label value)
SEG_LABEL_NAMES: tuple[str, ...] = ("background", "LV", "MYO", "RV")
SEG_LABEL_MODE = "segmentation"
SEG_TASK = "cmr_segmentation"

_SOURCE_LABELS = {"ACDC": ACDC_LABELS, "MnMs": MNMS_LABELS}


def _lookup(source: str) -> np.ndarray:
    """Source label value -> canonical label value."""
    if source not in _SOURCE_LABELS:
        raise ValueError(f"no mask convention known for source {source!r}; expected one of {list(_SOURCE_LABELS)}")
    table = np.zeros(len(SEG_LABEL_NAMES), np.uint8)
    for name, value in _SOURCE_LABELS[source].items():
        table[value] = SEG_LABEL_NAMES.index(name)
    return table


def canonical_mask(mask: np.ndarray, source: str, where: str = "mask") -> np.ndarray:
    """``mask`` (in ``source``'s own label values) in :data:`SEG_LABEL_NAMES` values, as uint8.

    Raises :class:`DatasetFormatError` naming ``where`` for a value that is not a label of that dataset."""
    values = np.unique(mask)
    bad = [v for v in values.tolist() if not (float(v).is_integer() and 0 <= v < len(SEG_LABEL_NAMES))]
    if bad:
        raise DatasetFormatError(f"{where}: label value(s) {bad[:5]} are not {source} labels "
                                 f"{sorted(_SOURCE_LABELS[source].values())}")
    return _lookup(source)[np.asarray(mask).astype(np.int64)]


def _write_mask(src: str, source: str, out: Path) -> Path:
    img = nib.load(src)
    data = canonical_mask(np.asanyarray(img.dataobj), source, src)
    header = img.header.copy()
    header.set_data_dtype(np.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp_{out.name}"
    nib.save(nib.Nifti1Image(data, img.affine, header), str(tmp))
    tmp.replace(out)
    return out.resolve()


def segmentation_items(records: Sequence[CMRRecord], mask_dir: str | Path) -> tuple[list[dict], list[str]]:
    """One item per annotated frame (ED, ES) of every record that has masks, its mask rewritten into
    :data:`SEG_LABEL_NAMES` under ``mask_dir``; and the subjects skipped for lack of masks."""
    mask_dir = Path(mask_dir)
    items, skipped = [], []
    for r in records:
        frames = [(f, img, gt) for f, img, gt in (("ED", r.ed, r.ed_gt), ("ES", r.es, r.es_gt)) if gt]
        if not frames:
            skipped.append(r.subject)
            continue
        for frame, image, gt in frames:
            mask = _write_mask(gt, r.source, mask_dir / r.source / f"{r.subject}_{frame}_gt.nii.gz")
            items.append({"image": image, "label": str(mask), "subject": r.subject, "frame": frame,
                          "vendor": r.vendor, "source": r.source, "group": r.group})
    return items, skipped


def split_by_subject(items: Sequence[dict], fractions: Sequence[float], rng: random.Random) -> list[list[dict]]:
    """Split ``items`` into ``len(fractions) + 1`` parts (the last takes the rest) by *subject*, stratified by the
    subject's diagnosis group: every item of a subject lands in the same part.  Each fraction is taken of what the
    earlier parts left."""
    by_subject: dict[str, list[dict]] = defaultdict(list)
    for it in items:
        by_subject[it["subject"]].append(it)
    subjects = sorted(by_subject)
    groups = sorted({canonical_group(by_subject[s][0]["group"]) for s in subjects})
    parts: list[list[dict]] = []
    rest = subjects
    for fraction in fractions:
        if not fraction:
            parts.append([])
            continue
        labels = [groups.index(canonical_group(by_subject[s][0]["group"])) for s in rest]
        keep, take = stratified_split(labels, fraction, rng)
        parts.append([it for i in take for it in by_subject[rest[i]]])
        rest = [rest[i] for i in keep]
    parts.append([it for s in rest for it in by_subject[s]])
    return parts


def cmr_segmentation_datalists(records: Sequence[CMRRecord], out_dir: str | Path, val_fraction: float = 0.25,
                               seed: int = 0, prefix: str = "site-", test_fraction: float = 0.0) -> dict[str, Path]:
    """Write one segmentation datalist per vendor (``<prefix><vendor>``; ACDC joins Siemens) and
    ``clients.json``; masks go to ``<out_dir>/masks``.  Returns ``{client: datalist path}``."""
    out_dir = Path(out_dir)
    items, skipped = segmentation_items(records, out_dir / "masks")
    if not items:
        raise ValueError(f"no CMR record has ground-truth masks ({len(records)} read; none with _gt files)")
    per_vendor: dict[str, list[dict]] = defaultdict(list)
    for it in items:
        per_vendor[it["vendor"]].append(it)
    order = [v for v in VENDORS if v in per_vendor] + sorted(set(per_vendor) - set(VENDORS))
    clients, summary = {}, []
    for vendor in order:
        client = f"{prefix}{vendor.lower()}"
        vendor_items = sorted(per_vendor[vendor], key=lambda it: (it["source"], it["subject"], it["frame"]))
        rng = random.Random(f"{seed}:{client}")
        if test_fraction:
            test, validation, training = split_by_subject(vendor_items, [test_fraction, val_fraction], rng)
        else:
            test = None
            validation, training = split_by_subject(vendor_items, [val_fraction], rng)
        path = write_datalist(out_dir / f"{client}.json", client, SEG_TASK, SEG_LABEL_MODE, SEG_LABEL_NAMES,
                              training, validation, test)
        clients[client] = path
        summary.append({"name": client, "datalist": str(path),
                        **{f"n_{k}": len(v) for k, v in (("train", training), ("val", validation),
                                                          ("test", test or []))},
                        "n_subjects": len({it["subject"] for it in vendor_items})})
    _write_json(out_dir / "clients.json", {
        "task": SEG_TASK, "label_mode": SEG_LABEL_MODE, "label_names": list(SEG_LABEL_NAMES),
        "num_classes": len(SEG_LABEL_NAMES), "seed": seed, "val_fraction": val_fraction,
        "skipped_without_masks": skipped, "clients": summary})
    return clients


def split_cmr_segmentation(acdc_root: str | Path | None, mnms_root: str | Path | None, out_dir: str | Path,
                           val_fraction: float = 0.25, seed: int = 0, prefix: str = "site-", *,
                           mnms_csv: str | Path | None = None, cache_dir: str | Path | None = None,
                           acdc_splits: Iterable[str] = ("training",), mnms_missing: str = "error",
                           test_fraction: float = 0.0) -> dict[str, Path]:
    """Read ACDC and/or M&Ms and write one segmentation datalist per vendor (see the module docstring)."""
    records = read_cmr_records(acdc_root, mnms_root, out_dir, mnms_csv=mnms_csv, cache_dir=cache_dir,
                               acdc_splits=acdc_splits, mnms_missing=mnms_missing)
    return cmr_segmentation_datalists(records, Path(out_dir), val_fraction, seed, prefix, test_fraction)
