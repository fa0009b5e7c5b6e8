"""Reader for the ACDC (Automated Cardiac Diagnosis Challenge, MICCAI 2017) layout.

Published layout::

    <root>/training/patient001/Info.cfg
                               patient001_4d.nii.gz          (optional, x,y,z,t)
                               patient001_frame01.nii.gz     (ED, frame number 1-based, 2 digits)
                               patient001_frame01_gt.nii.gz  (optional labels 0 bg, 1 RV, 2 MYO, 3 LV)
                               patient001_frame12.nii.gz     (ES)
                               patient001_frame12_gt.nii.gz
    <root>/testing/patient101/...

``Info.cfg`` holds one ``key: value`` per line with keys ``ED``, ``ES``, ``Group``,
``Height``, ``NbFrame`` and ``Weight``.  All scanners are Siemens.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from .records import ACDC_GROUPS, CMRRecord, DatasetFormatError, existing_dir, parse_int

__all__ = ["ACDC_LABELS", "find_frame_file", "parse_info_cfg", "read_acdc"]

#: Label values of the ACDC ``_gt`` maps.
ACDC_LABELS: dict[str, int] = {"background": 0, "RV": 1, "MYO": 2, "LV": 3}

_REQUIRED_KEYS = ("ED", "ES", "Group")
_SUBJECT_RE = re.compile(r"^patient\d+$")


def parse_info_cfg(path: str | Path) -> dict[str, str]:
    """Parse an ACDC ``Info.cfg`` into a ``{key: value}`` dict of strings.

    Blank lines are skipped.  Raises :class:`FileNotFoundError` if the file is missing and
    :class:`DatasetFormatError` naming the file and the 1-based line number for a line that
    is not ``key: value`` or repeats a key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ACDC Info.cfg not found: {path}")
    info: dict[str, str] = {}
    for lineno, raw in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        key, sep, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise DatasetFormatError(
                f"{path}, line {lineno}: expected 'key: value', got {raw!r}"
            )
        if key in info:
            raise DatasetFormatError(f"{path}, line {lineno}: key {key!r} given twice")
        info[key] = value
    return info


def _frame_number(info: dict[str, str], key: str, cfg: Path) -> int:
    return parse_int(info[key], str(cfg), f"{key} must be a 1-based frame number", minimum=1)


def find_frame_file(subject_dir: Path, subject: str, frame: int, gt: bool = False) -> Path | None:
    """Return ``<subject>_frameXX[_gt].nii.gz`` (or ``.nii``) inside ``subject_dir`` if it exists."""
    stem = f"{subject}_frame{frame:02d}{'_gt' if gt else ''}"
    for suffix in (".nii.gz", ".nii"):
        candidate = subject_dir / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate.resolve()
    return None


def _float_or_none(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def read_subject(subject_dir: str | Path) -> CMRRecord:
    """Read one ``patientNNN`` folder into a :class:`CMRRecord` (source ``ACDC``, vendor Siemens)."""
    subject_dir = Path(subject_dir).resolve()
    subject = subject_dir.name
    cfg = subject_dir / "Info.cfg"
    info = parse_info_cfg(cfg)
    missing = [k for k in _REQUIRED_KEYS if k not in info]
    if missing:
        raise DatasetFormatError(f"{cfg}: missing key(s) {', '.join(missing)}")
    group = info["Group"]
    if group not in ACDC_GROUPS:
        raise DatasetFormatError(
            f"{cfg}: unknown Group {group!r}; expected one of {', '.join(ACDC_GROUPS)}"
        )
    ed, es = _frame_number(info, "ED", cfg), _frame_number(info, "ES", cfg)
    if "NbFrame" in info:
        nb = _frame_number(info, "NbFrame", cfg)
        for key, frame in (("ED", ed), ("ES", es)):
            if frame > nb:
                raise DatasetFormatError(f"{cfg}: {key} = {frame} exceeds NbFrame = {nb}")
    paths = {}
    for key, frame in (("ED", ed), ("ES", es)):
        found = find_frame_file(subject_dir, subject, frame)
        if found is None:
            raise FileNotFoundError(
                f"ACDC {key} frame file missing: {subject_dir / f'{subject}_frame{frame:02d}.nii.gz'}"
                f" (frame {frame} from {cfg})"
            )
        paths[key] = found
    ed_gt, es_gt = (find_frame_file(subject_dir, subject, f, gt=True) for f in (ed, es))
    four_d = subject_dir / f"{subject}_4d.nii.gz"
    meta = {
        "split": subject_dir.parent.name,
        "ed_frame": ed,
        "es_frame": es,
        "nb_frames": int(float(info["NbFrame"])) if "NbFrame" in info else None,
        "height": _float_or_none(info.get("Height")),
        "weight": _float_or_none(info.get("Weight")),
        "cine_4d": str(four_d) if four_d.is_file() else None,
    }
    return CMRRecord(
        subject=subject,
        ed=str(paths["ED"]),
        es=str(paths["ES"]),
        group=group,
        vendor="Siemens",
        source="ACDC",
        ed_gt=str(ed_gt) if ed_gt else None,
        es_gt=str(es_gt) if es_gt else None,
        meta=meta,
    )


def read_acdc(root: str | Path, splits: Iterable[str] = ("training",)) -> list[CMRRecord]:
    """Read every ``patientNNN`` subject of the requested ACDC splits.

    Args:
        root: the ACDC ``database`` folder, i.e. the folder that contains ``training/``
            (and ``testing/``).
        splits: sub-folders to read, e.g. ``("training", "testing")``.  Each must exist.

    Returns:
        Records sorted by split then subject id.

    Raises:
        FileNotFoundError: missing root, split folder, ``Info.cfg`` or frame file (the
            message names the path).
        DatasetFormatError: malformed ``Info.cfg`` (file and line number), missing key or
            unknown ``Group``.
    """
    root = existing_dir(root, "ACDC root")
    records: list[CMRRecord] = []
    for split in splits:
        split_dir = root / split
        if not split_dir.is_dir():
            raise FileNotFoundError(f"ACDC '{split}' folder not found: {split_dir}")
        subjects = sorted(p for p in split_dir.iterdir() if p.is_dir() and _SUBJECT_RE.match(p.name))
        records.extend(read_subject(p) for p in subjects)
    return records
