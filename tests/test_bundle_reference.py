"""The two reference bundles parse with BundleRuntime and run standalone as model-zoo bundles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import flare_duallora
from flare_duallora.bundle import BundleRuntime

BUNDLES = Path(flare_duallora.__file__).parent / "bundles"
TINY_NET = {"hidden_size": 32, "mlp_dim": 64, "num_layers": 2, "num_heads": 4}


def _cmr_datalist(root: Path) -> Path:
    import nibabel as nib

    rng = np.random.default_rng(0)
    items = []
    for i in range(6):
        item = {}
        for phase in ("ed", "es"):
            p = root / f"patient{i:03d}_{phase}.nii.gz"
            vol = (rng.random((24, 20, 5)) * 300).astype(np.float32)
            nib.save(nib.Nifti1Image(vol, np.eye(4)), str(p))
            item[phase] = str(p)
        item.update(label=i % 2, subject=f"patient{i:03d}", group="DCM" if i % 2 else "NOR",
                    vendor="Siemens", source="ACDC")
        items.append(item)
    dl = root / "site-siemens.json"
    dl.write_text(json.dumps({"name": "site-siemens", "task": "cmr", "label_mode": "binary",
                              "label_names": ["NOR", "disease"], "num_classes": 2,
                              "training": items[:4], "validation": items[4:]}))
    return dl


def _isic_datalist(root: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    items = []
    for i in range(6):
        p = root / f"ISIC_{i:07d}.jpg"
        Image.fromarray(rng.integers(0, 256, (30, 26, 3), dtype=np.uint8)).save(p)
        items.append({"image": str(p), "label": i % 8, "subject": f"ISIC_{i:07d}", "center": 0})
    dl = root / "center-0.json"
    dl.write_text(json.dumps({"name": "center-0", "task": "isic", "num_classes": 8,
                              "training": items[:4], "validation": items[4:]}))
    return dl


CASES = {
    "cmr3d_vit_classification": dict(
        datalist=_cmr_datalist, overrides={"image_size": [16, 16, 4], "patch_size": [8, 8, 4], **TINY_NET},
        image_shape=(2, 16, 16, 4), num_classes=2, label_names=["NOR", "disease"]),
    "cls2d_classification": dict(
        datalist=_isic_datalist, overrides={"image_size": [16, 16], "patch_size": [8, 8], **TINY_NET},
        image_shape=(3, 16, 16), num_classes=8, label_names=["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]),
}


@pytest.fixture(params=sorted(CASES))
def case(request, tmp_path: Path):
    spec = CASES[request.param]
    data = tmp_path / "data"
    data.mkdir()
    bundle = tmp_path / request.param  # a copy: standalone runs write models/ and eval/ into the bundle root
    shutil.copytree(BUNDLES / request.param, bundle)
    overrides = {"datalist": str(spec["datalist"](data)), **spec["overrides"]}
    return request.param, bundle, overrides, spec


def test_reference_bundle_layout():
    for name in CASES:
        root = BUNDLES / name
        for f in ("LICENSE", "configs/metadata.json", "configs/train.json", "configs/evaluate.json", "docs/README.md"):
            assert (root / f).is_file(), f"{name}/{f}"
        assert not (root / "models").exists(), "reference bundles ship without weights"
        meta = json.loads((root / "configs" / "metadata.json").read_text())
        for key in ("version", "monai_version", "pytorch_version", "numpy_version", "required_packages_version",
                    "task", "description", "authors", "copyright", "network_data_format"):
            assert key in meta, f"{name}: metadata.{key}"
        train = json.loads((root / "configs" / "train.json").read_text())
        assert train["network_def"]["_target_"] == "flare_duallora.nets.ViTClassifier"
        assert train["network_def"]["sdpa"] is True
        assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == train["network_def"]["in_channels"]
        assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == train["num_classes"]


def test_runtime_parses_and_trains_one_step(case):
    name, bundle, overrides, spec = case
    rt = BundleRuntime(bundle, overrides)
    assert rt.num_classes == spec["num_classes"] and rt.label_names == spec["label_names"]
    assert rt.train_transforms_are_random() is True
    assert rt.batch_size >= 1 and rt.num_workers == 0
    net = rt.build_network()
    assert rt.load_pretrained(net) is False  # no weights shipped
    ds = rt.train_dataset
    assert len(ds) == 4 and len(rt.val_dataset) == 2
    sample = rt.val_dataset[0]
    assert tuple(sample["image"].shape) == spec["image_shape"] and sample["image"].dtype == torch.float32
    assert sample["label"].dtype == torch.long and "ed" not in sample
    batch = torch.utils.data.DataLoader(ds, batch_size=2)
    batch = next(iter(batch))
    assert type(batch["image"]) is torch.Tensor  # no MetaTensor reaches the network
    net.train()
    logits = net(batch["image"])
    assert logits.shape == (2, spec["num_classes"])
    loss = rt.loss(logits, batch["label"])
    loss.backward()
    opt = rt.make_optimizer(net.parameters())
    assert isinstance(opt, torch.optim.AdamW)
    opt.step()
    assert "train::trainer" not in rt.parser.ref_resolver.resolved_content


def test_standalone_config_workflow(case):
    from monai.bundle import ConfigWorkflow

    name, bundle, overrides, spec = case
    override = {**overrides, "train#trainer#max_epochs": 1}
    wf = ConfigWorkflow(config_file=str(bundle / "configs" / "train.json"), workflow_type="train",
                        logging_file=False, bundle_root=str(bundle), **override)
    wf.initialize()
    wf.check_properties()
    wf.run()
    assert wf.trainer.state.epoch == 1 and "train_accuracy" in wf.trainer.state.metrics
    wf.finalize()
    assert (bundle / "models" / "model.pt").is_file()  # CheckpointSaver of validate#handlers

    # the saved checkpoint loads strictly through the runtime ...
    rt = BundleRuntime(bundle, overrides)
    assert rt.load_pretrained(rt.build_network()) is True
    # ... and evaluate.json (layered on train.json) runs the evaluator from it
    ev = ConfigWorkflow(config_file=[str(bundle / "configs" / "train.json"), str(bundle / "configs" / "evaluate.json")],
                        workflow_type="train", logging_file=False, bundle_root=str(bundle), **override)
    ev.initialize()
    ev.run()
    assert "val_accuracy" in ev.evaluator.state.metrics
    assert (bundle / "eval" / "metrics.csv").is_file()
