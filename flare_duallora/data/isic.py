"""Reader for FLamby Fed-ISIC2019 (8-class dermoscopy, 6 centres).

Published layout::

    <root>/ISIC_2019_Training_Input_preprocessed/<image>.jpg    (RGB, shorter side 224 px)
    train_test_split                                            (CSV, any location)

The split CSV header is
``image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK,target,center,fold,fold2`` where ``target`` is
the class index in the order ``MEL, NV, BCC, AK, BKL, DF, VASC, SCC``, ``center`` is the
FLamby centre (0..5) and ``fold`` is ``train`` or ``test``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from .records import ISIC_CLASSES, DatasetFormatError, ISICRecord, existing_dir, parse_int, read_csv_rows

__all__ = ["ISIC_COLUMNS", "ISIC_IMAGE_DIR", "read_isic"]

#: Header of the FLamby split CSV.
ISIC_COLUMNS: tuple[str, ...] = ("image", *ISIC_CLASSES, "UNK", "target", "center", "fold", "fold2")
#: Image folder inside the dataset root.
ISIC_IMAGE_DIR = "ISIC_2019_Training_Input_preprocessed"
_REQUIRED = ("image", "target", "center", "fold")
_FOLDS = ("train", "test")


def _image_dir(root: Path) -> Path:
    sub = root / ISIC_IMAGE_DIR
    return sub if sub.is_dir() else root


def read_isic(
    root: str | Path,
    split_csv: str | Path,
    centers: Iterable[int] | None = None,
    folds: Iterable[str] = _FOLDS,
    check_images: bool = True,
) -> list[ISICRecord]:
    """Read the Fed-ISIC2019 split CSV and resolve image paths.

    Args:
        root: dataset folder holding ``ISIC_2019_Training_Input_preprocessed/`` (the image
            folder itself is accepted too).
        split_csv: the FLamby ``train_test_split`` CSV.
        centers: keep only these centre indices (default: all).
        folds: keep only these folds (``train`` / ``test``).
        check_images: raise if an image file is missing (default ``True``).

    Returns:
        Records in CSV order.

    Raises:
        FileNotFoundError: missing root, CSV or image (the message names the path and CSV line).
        DatasetFormatError: missing columns, target outside 0..7, unknown fold.
    """
    root = existing_dir(root, "Fed-ISIC2019 root")
    images = _image_dir(root)
    split_csv = Path(split_csv)
    if not split_csv.is_file():
        raise FileNotFoundError(f"Fed-ISIC2019 split CSV not found: {split_csv}")
    keep_centers = None if centers is None else {int(c) for c in centers}
    keep_folds = set(folds)
    records: list[ISICRecord] = []
    for lineno, row in read_csv_rows(split_csv, _REQUIRED):
        name = row["image"]
        where = f"{split_csv}, line {lineno} (image {name or '?'})"
        target = parse_int(row["target"], where, "target must be an integer")
        if not 0 <= target < len(ISIC_CLASSES):
            raise DatasetFormatError(
                f"{where}: target {target} out of range 0..{len(ISIC_CLASSES) - 1}"
            )
        center = parse_int(row["center"], where, "center must be an integer")
        fold = row["fold"]
        if fold not in _FOLDS:
            raise DatasetFormatError(f"{where}: fold must be 'train' or 'test', got {fold!r}")
        if (keep_centers is not None and center not in keep_centers) or fold not in keep_folds:
            continue
        path = images / f"{name}.jpg"
        if check_images and not path.is_file():
            raise FileNotFoundError(f"Fed-ISIC2019 image missing: {path} ({where})")
        records.append(ISICRecord(image=str(path), target=target, center=center,
                                  fold=fold, subject=name))
    return records
