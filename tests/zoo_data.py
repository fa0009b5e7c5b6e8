"""Tiny data in the on-disk layouts model-zoo bundles read (NIfTI volumes in a Decathlon-style dataset_dir)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

ZOO_BUNDLES = Path(__file__).parent / "zoo_bundles"
SPLEEN_BUNDLE = ZOO_BUNDLES / "tiny_spleen_ct_segmentation"
# a UNet preset (flare_duallora.engine.targets.PRESETS["UNet"]): LoRA on the residual units' convolutions, the last
# up-sampling block trained whole as the head
UNET_ADAPTER = {"target_modules": r".*\.conv\.unit\d+\.conv", "head": "model.2", "rank": 2}


def spleen_volume(rng: np.random.Generator, size: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like volume (HU) with a bright ellipsoid 'spleen' at a random place, and its mask."""
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1).astype(np.float32)
    centre = rng.uniform(size * 0.35, size * 0.65, 3)
    radii = rng.uniform(size * 0.15, size * 0.25, 3)
    mask = (((grid - centre) / radii) ** 2).sum(-1) <= 1.0
    image = rng.normal(-20.0, 20.0, (size,) * 3) + 120.0 * mask
    return image.astype(np.float32), mask.astype(np.uint8)


def write_spleen_dataset(root: Path, n_train: int = 6, n_test: int = 1, size: int = 24, seed: int = 0) -> Path:
    """``root/imagesTr``, ``root/labelsTr`` (the bundle's ``dataset_dir`` layout) and ``root/imagesTs``."""
    rng = np.random.default_rng(seed)
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i in range(n_train + n_test):
        image, mask = spleen_volume(rng, size)
        if i < n_train:
            nib.save(nib.Nifti1Image(image, affine), str(root / "imagesTr" / f"spleen_{i:02d}.nii.gz"))
            nib.save(nib.Nifti1Image(mask, affine), str(root / "labelsTr" / f"spleen_{i:02d}.nii.gz"))
        else:
            nib.save(nib.Nifti1Image(image, affine), str(root / "imagesTs" / f"spleen_{i:02d}.nii.gz"))
    return root


TEMPLATE_BUNDLE = ZOO_BUNDLES / "tiny_classification_template"
#: the classification_template's ids, mapped to the model-zoo convention the plugin reads
TEMPLATE_IDS = {"train#dataset": "train_dataset", "validate#dataset": "val_dataset", "loss": "lossfn",
                "train#dataloader": "train_dataloader", "validate#dataloader": "val_dataloader"}


def write_class_images(root: Path, n: int = 16, size: int = 32, seed: int = 0) -> Path:
    """2D NIfTI images ``<class>_<i>.nii.gz`` whose mean intensity encodes the class."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        label = i % 2
        image = rng.normal(size=(size, size)).astype(np.float32) + 2.0 * label
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(root / f"{label}_{i:03d}.nii.gz"))
    return root
