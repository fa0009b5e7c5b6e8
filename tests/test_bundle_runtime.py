"""Tests for flare_duallora.bundle.runtime.BundleRuntime: errors and a model-zoo style DenseNet bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from flare_duallora.bundle import BundleConfigError, BundleRuntime

META = {
    "version": "0.1.0",
    "monai_version": "1.6.1",
    "pytorch_version": "2.13.0",
    "numpy_version": "2.4.6",
    "required_packages_version": {},
    "task": "test classification",
    "description": "test bundle",
    "authors": "tests",
    "copyright": "tests",
    "network_data_format": {
        "inputs": {"image": {"type": "image", "num_channels": 3, "spatial_shape": [32, 32]}},
        "outputs": {"pred": {"type": "probabilities", "format": "classes", "num_channels": 2,
                             "channel_def": {"0": "benign", "1": "malignant"}}},
    },
}


def _write_npy_datalist(root: Path, n_train: int = 4, n_val: int = 2) -> Path:
    rng = np.random.default_rng(0)
    items = []
    for i in range(n_train + n_val):
        p = root / f"img{i}.npy"
        np.save(p, rng.random((3, 32, 32), dtype=np.float32))
        items.append({"image": str(p), "label": i % 2, "subject": f"s{i}"})
    dl = root / "datalist.json"
    dl.write_text(json.dumps({"training": items[:n_train], "validation": items[n_train:]}))
    return dl


def _densenet_config() -> dict:
    """A model-zoo style train.json (pathology_nuclei_classification/endoscopic conventions)."""
    transforms = [
        {"_target_": "LoadImaged", "keys": "image", "image_only": True},
        {"_target_": "ScaleIntensityd", "keys": "image"},
        {"_target_": "EnsureTyped", "keys": "image"},
    ]
    return {
        "imports": ["$import json", "$import pathlib"],
        "bundle_root": ".",
        "ckpt_dir": "$@bundle_root + '/models'",
        "dataset_dir": "/nonexistent",
        "datalist": "$@dataset_dir + '/datalist.json'",
        "train_datalist": "$json.loads(pathlib.Path(@datalist).read_text())['training']",
        "val_datalist": "$json.loads(pathlib.Path(@datalist).read_text())['validation']",
        "device": "$torch.device('cpu')",
        "val_interval": 1,
        "network_def": {"_target_": "DenseNet121", "spatial_dims": 2, "in_channels": 3, "out_channels": 2},
        "network": "$@network_def.to(@device)",
        "loss": {"_target_": "torch.nn.CrossEntropyLoss"},
        "lr": 0.01,
        "optimizer": {"_target_": "torch.optim.SGD", "params": "$@network.parameters()", "lr": "@lr", "momentum": 0.9},
        "train": {
            "deterministic_transforms": transforms,
            "random_transforms": [{"_target_": "RandFlipd", "keys": "image", "prob": 0.5, "spatial_axis": 0}],
            "preprocessing": {"_target_": "Compose",
                              "transforms": "$@train#deterministic_transforms + @train#random_transforms"},
            "dataset": {"_target_": "Dataset", "data": "@train_datalist", "transform": "@train#preprocessing"},
            "dataloader": {"_target_": "DataLoader", "dataset": "@train#dataset", "batch_size": 3,
                           "shuffle": True, "num_workers": 0},
            "inferer": {"_target_": "SimpleInferer"},
            "postprocessing": {"_target_": "Compose",
                               "transforms": [{"_target_": "Activationsd", "keys": "pred", "softmax": True}]},
            "handlers": [
                {"_target_": "ValidationHandler", "validator": "@validate#evaluator", "epoch_level": True,
                 "interval": "@val_interval"},
                {"_target_": "StatsHandler", "tag_name": "train_loss",
                 "output_transform": "$monai.handlers.from_engine(['loss'], first=True)"},
            ],
            "key_metric": {"train_accuracy": {"_target_": "ignite.metrics.Accuracy",
                                              "output_transform": "$monai.handlers.from_engine(['pred', 'label'])"}},
            "trainer": {"_target_": "SupervisedTrainer", "max_epochs": 2, "device": "@device",
                        "train_data_loader": "@train#dataloader", "network": "@network", "loss_function": "@loss",
                        "optimizer": "@optimizer", "inferer": "@train#inferer",
                        "postprocessing": "@train#postprocessing", "key_train_metric": "@train#key_metric",
                        "train_handlers": "@train#handlers"},
        },
        "validate": {
            "preprocessing": {"_target_": "Compose", "transforms": "%train#deterministic_transforms"},
            "dataset": {"_target_": "CacheDataset", "data": "@val_datalist", "transform": "@validate#preprocessing",
                        "cache_rate": 1.0, "num_workers": 0, "progress": False},
            "dataloader": {"_target_": "DataLoader", "dataset": "@validate#dataset", "batch_size": 5,
                           "shuffle": False, "num_workers": 0},
            "inferer": {"_target_": "SimpleInferer"},
            "handlers": [{"_target_": "StatsHandler", "iteration_log": False},
                         {"_target_": "CheckpointSaver", "save_dir": "@ckpt_dir", "save_dict": {"model": "@network"},
                          "save_key_metric": True, "key_metric_filename": "model.pt"}],
            "key_metric": {"val_accuracy": {"_target_": "ignite.metrics.Accuracy",
                                            "output_transform": "$monai.handlers.from_engine(['pred', 'label'])"}},
            "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device",
                          "val_data_loader": "@validate#dataloader", "network": "@network",
                          "inferer": "@validate#inferer", "key_val_metric": "@validate#key_metric",
                          "val_handlers": "@validate#handlers"},
        },
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@train#trainer.run()"],
    }


def _write_bundle(root: Path, config: dict | str | None, meta: dict | None = META, name: str = "train.json") -> Path:
    (root / "configs").mkdir(parents=True, exist_ok=True)
    if config is not None:
        text = config if isinstance(config, str) else json.dumps(config, indent=2)
        (root / "configs" / name).write_text(text)
    if meta is not None:
        (root / "configs" / "metadata.json").write_text(json.dumps(meta))
    (root / "LICENSE").write_text("test")
    return root


@pytest.fixture()
def densenet_bundle(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "data"
    data.mkdir()
    return _write_bundle(tmp_path / "densenet_bundle", _densenet_config()), _write_npy_datalist(data)


# ------------------------------------------------------------------------------------------ errors
def test_missing_bundle_folder(tmp_path: Path):
    with pytest.raises(BundleConfigError, match="bundle folder not found"):
        BundleRuntime(tmp_path / "nope")


def test_missing_train_json(tmp_path: Path):
    root = _write_bundle(tmp_path / "b", None)
    with pytest.raises(BundleConfigError) as e:
        BundleRuntime(root)
    assert "train.json" in str(e.value) or "train.json|yaml" in str(e.value)
    assert str(root / "configs" / "train") in str(e.value)


def test_malformed_json(tmp_path: Path):
    root = _write_bundle(tmp_path / "b", '{\n  "network_def": {"_target_": "DenseNet121",,}\n}')
    with pytest.raises(BundleConfigError) as e:
        BundleRuntime(root)
    msg = str(e.value)
    assert "malformed JSON" in msg and str(root / "configs" / "train.json") in msg and "line 2" in msg


def test_missing_metadata(tmp_path: Path):
    root = _write_bundle(tmp_path / "b", _densenet_config(), meta=None)
    with pytest.raises(BundleConfigError, match="metadata.json"):
        BundleRuntime(root)


@pytest.mark.parametrize("missing", ["network_def", "train#dataset", "validate#dataset"])
def test_missing_required_key(tmp_path: Path, missing: str):
    cfg = _densenet_config()
    if missing == "network_def":
        del cfg["network_def"]
    else:
        section, key = missing.split("#")
        del cfg[section][key]
    root = _write_bundle(tmp_path / "b", cfg)
    with pytest.raises(BundleConfigError) as e:
        BundleRuntime(root)
    assert f"'{missing}'" in str(e.value) and str(root / "configs" / "train.json") in str(e.value)


def test_unknown_target_names_id_and_file(tmp_path: Path):
    cfg = _densenet_config()
    cfg["network_def"]["_target_"] = "NoSuchNetwork"
    root = _write_bundle(tmp_path / "b", cfg)
    rt = BundleRuntime(root)
    with pytest.raises(BundleConfigError) as e:
        rt.build_network()
    msg = str(e.value)
    assert "'network_def'" in msg and str(root / "configs" / "train.json") in msg and "NoSuchNetwork" in msg


def test_error_in_override_file_is_attributed(densenet_bundle):
    root, datalist = densenet_bundle
    (root / "configs" / "evaluate.json").write_text(json.dumps({"loss": {"_target_": "torch.nn.NoSuchLoss"}}))
    rt = BundleRuntime(root, {"datalist": str(datalist)}, config_files=("configs/train.json", "configs/evaluate.json"))
    with pytest.raises(BundleConfigError) as e:
        _ = rt.loss
    assert "'loss'" in str(e.value) and "evaluate.json" in str(e.value)
    # flat "a#b" keys of an override file are attributed too
    (root / "configs" / "evaluate.json").write_text(json.dumps({"validate#dataset#_target_": "NoSuchDataset"}))
    rt = BundleRuntime(root, {"datalist": str(datalist)}, config_files=("configs/train.json", "configs/evaluate.json"))
    expected = r"'validate#dataset' from .*train.json \(with evaluate.json \['validate#dataset#_target_'\]\)"
    with pytest.raises(BundleConfigError, match=expected):
        _ = rt.val_dataset
    # an override is reported as such
    rt = BundleRuntime(root, {"datalist": str(datalist), "train#dataset#_target_": "NoSuchDataset"})
    expected = r"'train#dataset' from .*train.json \(with overrides \['train#dataset#_target_'\]\)"
    with pytest.raises(BundleConfigError, match=expected):
        _ = rt.train_dataset
    rt = BundleRuntime(root, {"datalist": str(datalist), "loss": {"_target_": "NoSuchLoss"}})
    with pytest.raises(BundleConfigError, match=r"'loss' from overrides"):
        _ = rt.loss


def test_missing_datalist_is_reported(densenet_bundle):
    root, _ = densenet_bundle
    rt = BundleRuntime(root)  # default datalist points to /nonexistent
    with pytest.raises(BundleConfigError) as e:
        _ = rt.train_dataset
    assert "'train#dataset'" in str(e.value) and "nonexistent" in str(e.value)


# ------------------------------------------------------------------------------------------ model-zoo bundle
def test_model_zoo_densenet_bundle(densenet_bundle):
    root, datalist = densenet_bundle
    rt = BundleRuntime(root, {"datalist": str(datalist)})
    assert rt.config_path == root / "configs" / "train.json"
    assert rt.bundle_root == root.resolve()
    assert rt.get("bundle_root") == str(root.resolve())
    assert rt.get("train#trainer#max_epochs") == 2 and rt.get("no#such", "d") == "d"

    net1, net2 = rt.build_network(), rt.build_network()
    assert net1 is not net2 and type(net1).__name__ == "DenseNet121"
    assert all(p1 is not p2 for p1, p2 in zip(net1.parameters(), net2.parameters()))

    ds = rt.train_dataset
    assert len(ds) == 4 and len(rt.val_dataset) == 2 and rt.train_dataset is ds  # cached
    assert rt.batch_size == 3 and rt.val_batch_size == 5 and rt.num_workers == 0
    assert rt.train_transforms_are_random()
    assert rt.num_classes == 2 and rt.label_names == ["benign", "malignant"]

    from monai.data import DataLoader

    batch = next(iter(DataLoader(ds, batch_size=rt.batch_size)))
    net1.train()
    loss = rt.loss(net1(batch["image"]), batch["label"])
    loss.backward()
    opt = rt.make_optimizer([p for p in net1.parameters() if p.requires_grad])
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]["lr"] == 0.01 and opt.param_groups[0]["momentum"] == 0.9
    opt.step()

    # the trainer, its ignite handlers and the `network`/`optimizer` ids were never built
    resolved = rt.parser.ref_resolver.resolved_content
    for id in ("train::trainer", "train::handlers", "validate::evaluator", "network", "optimizer"):
        assert id not in resolved
    # ... but can be on request
    trainer = rt.parsed("train#trainer")
    assert type(trainer).__name__ == "SupervisedTrainer"


def test_make_optimizer_only_given_params_and_default(tmp_path: Path, densenet_bundle):
    root, datalist = densenet_bundle
    rt = BundleRuntime(root, {"datalist": str(datalist), "lr": 0.5})
    head = nn.Linear(3, 2)
    opt = rt.make_optimizer(head.parameters())
    assert opt.param_groups[0]["lr"] == 0.5
    assert sum(len(g["params"]) for g in opt.param_groups) == 2
    cfg = _densenet_config()
    del cfg["optimizer"]
    rt2 = BundleRuntime(_write_bundle(tmp_path / "noopt", cfg))
    opt2 = rt2.make_optimizer(head.parameters())
    assert isinstance(opt2, torch.optim.AdamW) and opt2.param_groups[0]["lr"] == 1e-3


def test_load_pretrained_raw_and_nested(densenet_bundle):
    root, _ = densenet_bundle
    rt = BundleRuntime(root)
    net = rt.build_network()
    assert rt.pretrained_path == root.resolve() / "models" / "model.pt"
    assert rt.load_pretrained(net) is False
    src = rt.build_network()
    (root / "models").mkdir()
    for payload in (src.state_dict(), {"model": src.state_dict(), "optimizer": {}}):
        torch.save(payload, rt.pretrained_path)
        dst = rt.build_network()
        assert rt.load_pretrained(dst) is True
        assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    torch.save({"bogus.weight": torch.zeros(1)}, rt.pretrained_path)
    with pytest.raises(BundleConfigError, match="does not match"):
        rt.load_pretrained(rt.build_network())


def test_transforms_random_detection(tmp_path: Path, densenet_bundle):
    root, datalist = densenet_bundle
    det = {"_target_": "Compose", "transforms": "%train#deterministic_transforms"}
    rt = BundleRuntime(root, {"datalist": str(datalist), "train#preprocessing": det})
    assert rt.train_transforms_are_random() is False
    nested = {"_target_": "Compose", "transforms": [
        {"_target_": "Compose", "transforms": "%train#deterministic_transforms"},
        {"_target_": "Compose", "transforms": [{"_target_": "RandGaussianNoised", "keys": "image", "prob": 0.1}]}]}
    rt = BundleRuntime(root, {"datalist": str(datalist), "train#preprocessing": nested})
    assert rt.train_transforms_are_random() is True
    one_of = {"_target_": "OneOf", "transforms": "%train#deterministic_transforms"}
    rt = BundleRuntime(root, {"datalist": str(datalist), "train#preprocessing": one_of})
    assert rt.train_transforms_are_random() is True


def test_yaml_config_and_layered_files(tmp_path: Path, densenet_bundle):
    import yaml

    root, datalist = densenet_bundle
    yroot = tmp_path / "yaml_bundle"
    _write_bundle(yroot, yaml.safe_dump(_densenet_config()), name="train.yaml")
    rt = BundleRuntime(yroot, {"datalist": str(datalist)})  # asked for configs/train.json, found train.yaml
    assert rt.config_path.name == "train.yaml" and len(rt.val_dataset) == 2

    (root / "configs" / "evaluate.json").write_text(json.dumps({"validate#dataloader#batch_size": 1, "lr": 0.2}))
    rt = BundleRuntime(root, {"datalist": str(datalist)},
                       config_files=("configs/train.json", "configs/evaluate.json", "configs/absent.json"))
    assert [p.name for p in rt.config_files] == ["train.json", "evaluate.json"]
    assert rt.val_batch_size == 1 and rt.make_optimizer(nn.Linear(1, 1).parameters()).param_groups[0]["lr"] == 0.2


def test_overrides_create_missing_parents(densenet_bundle):
    root, datalist = densenet_bundle
    rt = BundleRuntime(root, {"datalist": str(datalist), "extra#nested#value": 3, "network_def#out_channels": 5})
    assert rt.get("extra#nested#value") == 3
    assert rt.num_classes == 5  # no num_classes id: taken from network_def#out_channels before metadata
    assert rt.build_network().eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 5)
