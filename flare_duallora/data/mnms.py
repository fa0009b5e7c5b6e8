"""Reader for the M&Ms-1 (Multi-Centre, Multi-Vendor & Multi-Disease) ``OpenDataset`` layout.

Published layout::

    OpenDataset/211230_M&Ms_Dataset_information_diagnosis_opendataset.csv
    OpenDataset/Training/Labeled/A0S9V9/A0S9V9_sa.nii.gz      (4D x,y,z,t cine short axis)
                                        A0S9V9_sa_gt.nii.gz   (4D, labels 1 LV, 2 MYO, 3 RV at ED/ES)
    OpenDataset/Training/Unlabeled/<CODE>/...
    OpenDataset/Validation/<CODE>/...
    OpenDataset/Testing/<CODE>/...

The CSV starts with an unnamed index column followed by ``External code, VendorName,
Vendor, Centre, ED, ES, Age, Pathology, Sex, Height, Weight``; ``ED``/``ES`` are 0-based
indices into the 4th (time) dimension.  Because downstream MONAI bundles read 3D volumes
(as for ACDC), :func:`read_mnms` extracts the ED and ES frames once into a cache folder.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable

import nibabel as nib
import numpy as np

from .records import (
    MNMS_VENDOR_LETTERS,
    CMRRecord,
    DatasetFormatError,
    canonical_vendor,
    existing_dir,
    parse_int,
    read_csv_rows,
)

__all__ = [
    "MNMS_COLUMNS",
    "MNMS_FOLDERS",
    "MNMS_LABELS",
    "extract_frame",
    "find_mnms_csv",
    "read_mnms",
    "read_mnms_csv",
]

logger = logging.getLogger(__name__)

#: Columns of the information CSV after the unnamed index column.
MNMS_COLUMNS: tuple[str, ...] = (
    "External code", "VendorName", "Vendor", "Centre", "ED", "ES",
    "Age", "Pathology", "Sex", "Height", "Weight",
)
#: Columns the reader needs; the others may be absent.
_REQUIRED = ("External code", "VendorName", "Vendor", "Centre", "ED", "ES", "Pathology")
#: Folders (relative to the dataset root) searched for ``<CODE>/<CODE>_sa.nii.gz``.
MNMS_FOLDERS: tuple[str, ...] = ("Training/Labeled", "Training/Unlabeled", "Validation", "Testing")
#: Label values of the M&Ms ``_gt`` maps (note: differs from ACDC).
MNMS_LABELS: dict[str, int] = {"background": 0, "LV": 1, "MYO": 2, "RV": 3}


def find_mnms_csv(root: str | Path) -> Path:
    """Find the information CSV in ``root`` (or ``root/OpenDataset``).

    Matches ``*M&Ms*information*.csv`` and ``*M&Ms*Dataset*.csv`` case-insensitively; when
    several versions exist the lexicographically last (newest date prefix) is returned.
    """
    root = existing_dir(root, "M&Ms root")
    for folder in (root, root / "OpenDataset"):
        if not folder.is_dir():
            continue
        hits = sorted(
            p for p in folder.iterdir()
            if p.is_file() and p.suffix.lower() == ".csv" and "m&ms" in p.name.lower()
            and ("information" in p.name.lower() or "dataset" in p.name.lower())
        )
        if hits:
            return hits[-1].resolve()
    raise FileNotFoundError(
        f"M&Ms information CSV not found in {root}: expected a file matching "
        "'*M&Ms*information*.csv' or '*M&Ms*Dataset*.csv' (or pass csv_path)"
    )


def _vendor(row: dict[str, str], where: str) -> str:
    letter = row["Vendor"].strip().upper()
    name = row["VendorName"].strip()
    from_letter = MNMS_VENDOR_LETTERS.get(letter) if letter else None
    from_name = canonical_vendor(name) if name else None
    if letter and from_letter is None:
        raise DatasetFormatError(f"{where}: unknown Vendor {letter!r}; expected one of A, B, C, D")
    if name and from_name is None:
        raise DatasetFormatError(
            f"{where}: unknown VendorName {name!r}; expected Siemens, Philips, GE or Canon"
        )
    if from_letter is None and from_name is None:
        raise DatasetFormatError(f"{where}: both Vendor and VendorName are empty")
    if from_letter and from_name and from_letter != from_name:
        raise DatasetFormatError(
            f"{where}: Vendor {letter!r} ({from_letter}) contradicts VendorName {name!r}"
        )
    return from_letter or from_name  # type: ignore[return-value]


def read_mnms_csv(csv_path: str | Path) -> list[dict]:
    """Parse the M&Ms information CSV into a list of row dicts.

    Each dict has ``code``, ``vendor`` (canonical name), ``centre``, ``ed``, ``es`` (0-based),
    ``pathology`` and ``meta`` (remaining columns).  Raises :class:`DatasetFormatError`
    naming the CSV (and the row's External code) for missing columns, unknown vendors,
    bad frame indices, empty pathology or duplicate codes.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"M&Ms information CSV not found: {csv_path}")
    rows, seen = [], set()
    for lineno, row in read_csv_rows(csv_path, _REQUIRED):
        code = row["External code"]
        where = f"{csv_path}, line {lineno} (External code {code or '?'})"
        if not code:
            raise DatasetFormatError(f"{where}: empty External code")
        if code in seen:
            raise DatasetFormatError(f"{where}: duplicate External code")
        seen.add(code)
        if not row["Pathology"]:
            raise DatasetFormatError(f"{where}: empty Pathology")
        rows.append({
            "code": code,
            "vendor": _vendor(row, where),
            "centre": row["Centre"] or None,
            "ed": parse_int(row["ED"], where, "ED must be a 0-based frame index", minimum=0),
            "es": parse_int(row["ES"], where, "ES must be a 0-based frame index", minimum=0),
            "pathology": row["Pathology"],
            "meta": {k: row.get(k) or None for k in ("Age", "Sex", "Height", "Weight")},
        })
    return rows


def _find_cine(root: Path, code: str, folders: Iterable[str]) -> tuple[Path | None, str | None]:
    for folder in folders:
        for suffix in (".nii.gz", ".nii"):
            candidate = root / folder / code / f"{code}_sa{suffix}"
            if candidate.is_file():
                return candidate, folder
    return None, None


def _is_fresh(out: Path, src: Path) -> bool:
    return out.is_file() and out.stat().st_mtime >= src.stat().st_mtime


def extract_frame(cine: nib.Nifti1Image, index: int, out: Path, source: Path) -> Path:
    """Write frame ``index`` of a 4D image to ``out`` as a 3D NIfTI (same affine, spacing, dtype).

    The file is written to a temporary name then renamed, so concurrent readers never see a
    partial file.  ``source`` is only used in error messages.
    """
    if cine.ndim != 4:
        raise DatasetFormatError(f"{source}: expected a 4D (x,y,z,t) image, got shape {cine.shape}")
    n_t = cine.shape[3]
    if not 0 <= index < n_t:
        raise DatasetFormatError(f"{source}: frame index {index} out of range for {n_t} frames")
    volume = np.asanyarray(cine.dataobj[..., index])
    header = cine.header.copy()
    header.set_data_shape(volume.shape)
    header.set_data_dtype(volume.dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp{os.getpid()}_{out.name}"
    nib.save(nib.Nifti1Image(volume, cine.affine, header), str(tmp))
    os.replace(tmp, out)
    return out


def _extract_ed_es(cine_path: Path, frames: dict[str, int], out_dir: Path, code: str,
                   suffix: str) -> dict[str, Path]:
    """Extract (or reuse cached) 3D files for the ED/ES frame indices of one 4D file."""
    wanted = {key: out_dir / f"{code}_sa_frame{t:02d}{suffix}.nii.gz" for key, t in frames.items()}
    if all(_is_fresh(p, cine_path) for p in wanted.values()):
        return wanted
    cine = nib.load(str(cine_path))
    for key, t in frames.items():
        if not _is_fresh(wanted[key], cine_path):
            extract_frame(cine, t, wanted[key], cine_path)
    return wanted


def read_mnms(
    root: str | Path,
    csv_path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    folders: Iterable[str] = MNMS_FOLDERS,
    missing: str = "error",
) -> list[CMRRecord]:
    """Read the M&Ms-1 dataset, extracting ED/ES 3D volumes into ``cache_dir``.

    Args:
        root: the ``OpenDataset`` folder.
        csv_path: explicit information CSV; found with :func:`find_mnms_csv` when ``None``.
        cache_dir: where the 3D ED/ES files are written, as
            ``<cache_dir>/<CODE>/<CODE>_sa_frameTT[_gt].nii.gz`` (TT = 0-based index).
            Defaults to ``<root>/derived_3d``.  Existing files newer than the 4D source
            are reused.
        folders: sub-folders searched for ``<CODE>/<CODE>_sa.nii.gz``.
        missing: ``"error"`` to raise when a CSV row has no image (default) or ``"skip"`` to
            log and skip it (the public release lacks 30 restricted subjects).

    Returns:
        Records sorted by subject code; ``meta`` holds the folder, frame indices and 4D path.
    """
    if missing not in ("error", "skip"):
        raise ValueError(f"missing must be 'error' or 'skip', got {missing!r}")
    root = existing_dir(root, "M&Ms root")
    csv_path = Path(csv_path).resolve() if csv_path is not None else find_mnms_csv(root)
    cache = Path(cache_dir) if cache_dir is not None else root / "derived_3d"
    folders = tuple(folders)
    records: list[CMRRecord] = []
    for row in sorted(read_mnms_csv(csv_path), key=lambda r: r["code"]):
        code = row["code"]
        cine, folder = _find_cine(root, code, folders)
        if cine is None:
            msg = (f"M&Ms image missing for External code {code} (listed in {csv_path}): "
                   f"no {code}/{code}_sa.nii.gz under {root} in {', '.join(folders)}")
            if missing == "skip":
                logger.warning("%s; skipped", msg)
                continue
            raise FileNotFoundError(msg + " (use missing='skip' to ignore)")
        frames = {"ed": row["ed"], "es": row["es"]}
        out_dir = (cache / code).resolve()
        images = _extract_ed_es(cine, frames, out_dir, code, "")
        gt_path = cine.with_name(cine.name.replace("_sa.", "_sa_gt."))
        labels = _extract_ed_es(gt_path, frames, out_dir, code, "_gt") if gt_path.is_file() else {}
        records.append(CMRRecord(
            subject=code,
            ed=str(images["ed"]),
            es=str(images["es"]),
            group=row["pathology"],
            vendor=row["vendor"],
            source="MnMs",
            ed_gt=str(labels["ed"]) if labels else None,
            es_gt=str(labels["es"]) if labels else None,
            centre=row["centre"],
            meta={"folder": folder, "ed_index": row["ed"], "es_index": row["es"],
                  "cine_4d": str(cine.resolve()), **row["meta"]},
        ))
    return records
