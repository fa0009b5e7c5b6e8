"""Record types, vendor tables and the error type shared by the dataset readers.

The readers (:mod:`.acdc`, :mod:`.mnms`, :mod:`.isic`) turn a dataset on disk into a
list of plain records; :mod:`.datalists` turns records into per-client datalist JSON.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

__all__ = [
    "ACDC_GROUPS",
    "CMRRecord",
    "DatasetFormatError",
    "ISIC_CLASSES",
    "ISICRecord",
    "MNMS_VENDOR_LETTERS",
    "VENDORS",
    "canonical_vendor",
    "parse_int",
    "read_csv_rows",
]


class DatasetFormatError(ValueError):
    """A dataset file exists but its content does not follow the published format."""


#: Vendors in client order.  ACDC is acquired on Siemens scanners only.
VENDORS: tuple[str, ...] = ("Siemens", "Philips", "GE", "Canon")

#: M&Ms-1 ``Vendor`` column letter -> canonical vendor name.
MNMS_VENDOR_LETTERS: dict[str, str] = {"A": "Siemens", "B": "Philips", "C": "GE", "D": "Canon"}

#: Accepted spellings of the M&Ms ``VendorName`` column (lower-case) -> canonical vendor name.
_VENDOR_ALIASES: dict[str, str] = {
    "siemens": "Siemens",
    "philips": "Philips",
    "ge": "GE",
    "general electric": "GE",
    "canon": "Canon",
}

#: The five ACDC diagnostic groups (``Group`` key of ``Info.cfg``).
ACDC_GROUPS: tuple[str, ...] = ("NOR", "MINF", "DCM", "HCM", "RV")

#: Fed-ISIC2019 classes; ``target`` indexes this tuple.
ISIC_CLASSES: tuple[str, ...] = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")


def canonical_vendor(name: str) -> str | None:
    """Return the canonical vendor name for ``name`` (case-insensitive) or ``None`` if unknown."""
    return _VENDOR_ALIASES.get(str(name).strip().lower())


@dataclass(frozen=True)
class CMRRecord:
    """One cine-CMR subject reduced to its end-diastolic and end-systolic 3D volumes.

    Attributes:
        subject: subject id (``patient001`` for ACDC, the 6-character code for M&Ms).
        ed, es: absolute paths to 3D NIfTI volumes (x, y, z).
        group: diagnosis exactly as written in the source (ACDC ``Group`` / M&Ms ``Pathology``).
        vendor: canonical vendor name (one of :data:`VENDORS`).
        source: ``"ACDC"`` or ``"MnMs"``.
        ed_gt, es_gt: label maps for ``ed`` / ``es`` when the dataset ships them, else ``None``.
        centre: acquisition centre (M&Ms ``Centre`` column; ``None`` for ACDC).
        meta: remaining per-subject metadata (height, weight, frame numbers, ...).
    """

    subject: str
    ed: str
    es: str
    group: str
    vendor: str
    source: str
    ed_gt: str | None = None
    es_gt: str | None = None
    centre: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Return the record as a plain dict."""
        return asdict(self)


@dataclass(frozen=True)
class ISICRecord:
    """One Fed-ISIC2019 image.

    Attributes:
        image: absolute path to the JPEG.
        target: class index into :data:`ISIC_CLASSES`.
        center: FLamby centre index (0..5).
        fold: ``"train"`` or ``"test"``.
        subject: image id (file stem, e.g. ``ISIC_0065613``).
    """

    image: str
    target: int
    center: int
    fold: str
    subject: str

    @property
    def class_name(self) -> str:
        """Name of the class of this image."""
        return ISIC_CLASSES[self.target]


def existing_dir(path: str | Path, what: str) -> Path:
    """Return ``path`` as a resolved :class:`Path`, raising a clear error if it is not a folder."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {p}")
    return p.resolve()


def parse_int(value: str, where: str, must: str, minimum: int | None = None) -> int:
    """An integer cell ("3" or "3.0"); otherwise ``DatasetFormatError("<where>: <must>, got '<value>'")``."""
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not number.is_integer() or (minimum is not None and number < minimum):
        raise DatasetFormatError(f"{where}: {must}, got {value!r}")
    return int(number)


def read_csv_rows(path: Path, required: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """``(line number, row)`` of a CSV with stripped headers and cells, blank rows skipped.

    Raises ``DatasetFormatError`` naming the file and the missing columns.
    """
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in required if c not in header]
        if missing:
            raise DatasetFormatError(f"{path}: missing column(s) {', '.join(missing)}")
        reader.fieldnames = header
        for lineno, raw in enumerate(reader, start=2):
            row = {k: (v or "").strip() for k, v in raw.items() if k is not None}
            if any(row.values()):
                yield lineno, row
