"""export_bundle writes a personalised bundle that reloads (offline) to the same network."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import flare_duallora
from flare_duallora.bundle import BundleConfigError, BundleRuntime, export_bundle, load_bundle_network
from flare_duallora.bundle.export import bump_version

SRC = Path(flare_duallora.__file__).parent / "bundles" / "cmr3d_vit_classification"
NET_OVERRIDES = {"image_size": [16, 16, 4], "patch_size": [8, 8, 4], "hidden_size": 32, "mlp_dim": 64,
                 "num_layers": 2, "num_heads": 4, "num_classes": 3}


def test_bump_version():
    assert bump_version("0.1.0") == "0.1.1"
    assert bump_version("1.2.9") == "1.2.10"
    assert bump_version("v2") == "v3"
    assert bump_version("dev") == "dev.1"


def test_export_and_reload_exactly(tmp_path: Path):
    torch.manual_seed(0)
    rt = BundleRuntime(SRC, NET_OVERRIDES)
    net = rt.build_network().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 2, 16, 16, 4)
    with torch.no_grad():
        expected = net(x)

    dst = export_bundle(SRC, tmp_path / "out" / "site-1_cmr3d", net.state_dict(),
                        description="site-1 personalised model", config_overrides=NET_OVERRIDES)
    assert dst == (tmp_path / "out" / "site-1_cmr3d").resolve()
    for f in ("LICENSE", "docs/README.md", "configs/train.json", "configs/evaluate.json", "models/model.pt"):
        assert (dst / f).is_file(), f
    meta = json.loads((dst / "configs" / "metadata.json").read_text())
    src_meta = json.loads((SRC / "configs" / "metadata.json").read_text())
    assert meta["version"] == bump_version(src_meta["version"])
    assert next(iter(meta["changelog"])) == meta["version"]
    assert "personalised federated learning export" in meta["changelog"][meta["version"]]
    assert "site-1 personalised model" in meta["changelog"][meta["version"]]
    assert json.loads((dst / "configs" / "train.json").read_text())["num_classes"] == 3
    assert isinstance(torch.load(dst / "models" / "model.pt", weights_only=True), dict)
    assert not (SRC / "models").exists()  # the source bundle is untouched

    reloaded = load_bundle_network(dst).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x), expected)

    from monai.bundle import load

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # models/model.pt exists locally, so monai.bundle.load does not download anything
        net2 = load(name=dst.name, bundle_dir=str(dst.parent), source="monaihosting", device="cpu")
    from monai.utils import set_determinism

    set_determinism(seed=None)  # load() ran the bundle's "initialize" (set_determinism(seed=123))
    assert type(net2).__name__ == "ViTClassifier"
    net2.eval()
    with torch.no_grad():
        assert torch.equal(net2(x), expected)


def test_export_errors(tmp_path: Path):
    rt = BundleRuntime(SRC, NET_OVERRIDES)
    sd = rt.build_network().state_dict()
    with pytest.raises(BundleConfigError, match="does not match"):
        export_bundle(SRC, tmp_path / "bad", sd)  # weights of a 3-class tiny net vs. the default network_def
    with pytest.raises(BundleConfigError, match="no configs/ folder"):
        export_bundle(tmp_path / "nope", tmp_path / "x", sd)
    with pytest.raises(BundleConfigError, match="bundle weights not found"):
        load_bundle_network(SRC)
