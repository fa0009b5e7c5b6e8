"""Shared fixtures: tiny site datalists on disk and tiny overrides of the reference bundles."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import flare_duallora

BUNDLES = Path(flare_duallora.__file__).parent / "bundles"
CMR_BUNDLE = BUNDLES / "cmr3d_vit_classification"
CLS2D_BUNDLE = BUNDLES / "cls2d_classification"
CMR_SEG_BUNDLE = BUNDLES / "cmr3d_segmentation"

# a tiny ViT so a simulator round takes seconds on 2 CPU cores
TINY_CMR = {"image_size": [16, 16, 4], "patch_size": [8, 8, 2], "hidden_size": 32, "mlp_dim": 64, "num_heads": 4}
ADAPTER = {"blocks": "last:2", "head": "vit.classification_head", "rank": 4}


def write_random_cmr_site(root: Path, site: str, n: int = 8, n_val: int = 2, seed: int = 0) -> Path:
    """A site datalist in the data splitter's format, with small NIfTI ED/ES volumes whose mean encodes the label."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        label = i % 2
        paths = {}
        for phase in ("ed", "es"):
            arr = rng.normal(size=(20, 20, 5)).astype(np.float32) + 1.5 * label
            path = root / f"{site}_{i:03d}_{phase}.nii.gz"
            nib.save(nib.Nifti1Image(arr, np.diag([1.5, 1.5, 8.0, 1.0])), str(path))
            paths[phase] = str(path)
        items.append({**paths, "label": label, "subject": f"{site}-{i}", "vendor": site})
    datalist = {"name": site, "task": "cmr", "label_mode": "binary", "label_names": ["NOR", "disease"],
                "num_classes": 2, "training": items[n_val:], "validation": items[:n_val]}
    path = root / f"{site}.json"
    path.write_text(json.dumps(datalist))
    return path


@pytest.fixture(scope="session")
def cmr_datalists(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cmr_sites")
    for i, site in enumerate(["site-a", "site-b", "site-c"]):
        write_random_cmr_site(root, site, seed=i)
    return root


@pytest.fixture(scope="session")
def cmr_seg_datalists(tmp_path_factory) -> Path:
    """Segmentation datalists (``split cmr --task segmentation`` format) for site-a, site-b: random frames, masks of
    0 background, 1 LV, 2 MYO, 3 RV."""
    root = tmp_path_factory.mktemp("cmr_seg_sites")
    rng = np.random.default_rng(0)
    for site in ("site-a", "site-b"):
        items = []
        for i in range(4):
            for frame in ("ED", "ES"):
                mask = rng.integers(0, 4, (20, 20, 5)).astype(np.uint8)
                image = (mask * 1.0 + rng.normal(size=mask.shape)).astype(np.float32)
                paths = {}
                for key, arr in (("image", image), ("label", mask)):
                    paths[key] = str(root / f"{site}_{i}_{frame}_{key}.nii.gz")
                    nib.save(nib.Nifti1Image(arr, np.diag([1.5, 1.5, 8.0, 1.0])), paths[key])
                items.append({**paths, "subject": f"{site}-{i}", "frame": frame, "vendor": site})
        payload = {"name": site, "task": "cmr_segmentation", "label_mode": "segmentation",
                   "label_names": ["background", "LV", "MYO", "RV"], "num_classes": 4,
                   "training": items[:6], "validation": items[6:]}
        (root / f"{site}.json").write_text(json.dumps(payload))
    return root


TASKS = ["train", "validate", "submit_model"]


def tiny_recipe(datalists: Path, sites, name: str = "tiny", method: str = "duallora", rounds: int = 2,
                settings: dict | None = None, **kw):
    """A DualLoRARecipe on the tiny CMR bundle (no pretrained weights: allow_random_base) for the simulator tests."""
    from flare_duallora.deploy.recipe import DualLoRARecipe

    kw.setdefault("allow_random_base", True)
    kw.setdefault("device", "cpu")
    return DualLoRARecipe(name=name, target=kw.pop("target", "sim"), bundle_root=kw.pop("bundle_root", str(CMR_BUNDLE)),
                          settings={"method": method, **ADAPTER, **(settings or {})}, clients=list(sites),
                          datalist_dir=str(datalists) if datalists else None, num_rounds=rounds,
                          bundle_overrides=kw.pop("bundle_overrides", TINY_CMR), **kw)


def run_sim(recipe, workspace: Path, timeout: float = 300, **kw):
    """Run a recipe in the simulator (quiet) and return its SimulationResult."""
    from flare_duallora.deploy.simulate import DualLoRASimEnv

    env = DualLoRASimEnv(clients=recipe.clients, workspace_root=workspace, timeout=timeout, log=None,
                         raise_on_failure=False, **kw)
    recipe.run(env)
    return env.result
