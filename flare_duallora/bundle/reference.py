"""The reference bundles shipped in the package, and copying one to a folder of the user's."""

from __future__ import annotations

import shutil
from pathlib import Path

REFERENCE_BUNDLES = {
    "cmr3d": "cmr3d_vit_classification",
    "cls2d": "cls2d_classification",
    "cmr3d_seg": "cmr3d_segmentation",
}


def reference_bundle(name: str) -> Path:
    """Path of a reference bundle shipped with the package (``cmr3d``, ``cmr3d_seg`` or ``cls2d``, or its folder name)."""
    folder = REFERENCE_BUNDLES.get(name, name)
    path = Path(__file__).resolve().parents[1] / "bundles" / folder
    if not (path / "configs").is_dir():
        raise ValueError(f"unknown reference bundle {name!r}; known: {sorted(REFERENCE_BUNDLES)}")
    return path


def init_bundle(name: str, dest: str | Path) -> Path:
    """Copy a reference bundle to ``dest`` (a hospital then edits it or replaces it by its own)."""
    dest = Path(dest)
    if not (dest / "configs").is_dir():
        shutil.copytree(reference_bundle(name), dest, dirs_exist_ok=True)
    return dest
