"""A site built from a bundle: model-zoo DenseNet bundle training with adapters, and plain-bundle export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.bundle import load as bundle_load

from conftest import ADAPTER, CMR_BUNDLE, TINY_CMR, write_random_cmr_site
from flare_duallora.bundle import load_bundle_network
from flare_duallora.training.from_bundle import build_site, export_site_bundles
from test_bundle_runtime import _densenet_config, _write_bundle, _write_npy_datalist


def test_model_zoo_densenet_bundle_trains_with_adapters_and_its_own_loss(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    datalist = _write_npy_datalist(data, n_train=6, n_val=2)
    root = _write_bundle(tmp_path / "densenet_bundle", _densenet_config())
    build = build_site(root, {"method": "duallora", "target_modules": r".*denseblock4\.denselayer16\.layers\.conv[12]",
                              "head": "class_layers.out", "rank": 2}, datalist, device="cpu", allow_random_base=True)
    site = build.trainer
    assert build.base_source.startswith("random") and build.fingerprint.startswith("sha256:")
    assert type(site.adapted.net).__name__ == "DenseNet121"
    assert isinstance(site.loss_fn, torch.nn.CrossEntropyLoss)
    assert type(site.optimizer).__name__ == "SGD"  # the bundle's own optimiser, over trainable params only
    n_opt = sum(p.numel() for g in site.optimizer.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in site.adapted.trainable_parameters())
    base = {k: v.clone() for k, v in site.adapted.net.state_dict().items() if ".base_layer." in k}
    shared_before = site.adapted.shared_state()
    stats = site.train_round(epochs=1)
    assert stats.steps == 2 and stats.examples == 6 and np.isfinite(stats.loss)
    after = site.adapted.net.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in base.items())  # the frozen base never moves
    assert any(not torch.equal(v, site.adapted.shared_state()[k]) for k, v in shared_before.items())
    metrics = site.evaluate()
    assert set(metrics) == {"personalised", "global_only"} and metrics["personalised"]["n"] == 2


@pytest.mark.parametrize("method", ["duallora", "pfedst"])
def test_exported_bundles_reproduce_personalised_and_global_predictions(tmp_path, method):
    datalist = write_random_cmr_site(tmp_path, "site-x", n=6, n_val=3)
    build = build_site(CMR_BUNDLE, {"method": method, **ADAPTER}, datalist, TINY_CMR, device="cpu",
                       allow_random_base=True)
    site = build.trainer
    site.train_round(epochs=3)
    _, personalised = site.predict()
    with site.adapted.private_adapters_disabled():
        _, global_only = site.predict()
    paths = export_site_bundles(build, tmp_path / "export", "site-x")
    meta = json.loads((paths["personalised"] / "configs" / "metadata.json").read_text())
    assert meta["trained_weights"]["site"] == "site-x" and meta["trained_weights"]["method"] == method
    assert "private parts" in meta["trained_weights"]["what"]
    gmeta = json.loads((paths["global"] / "configs" / "metadata.json").read_text())["trained_weights"]
    assert "federation's global model" in gmeta["what"] and gmeta["global_only"]["private_left_out"]
    assert "## Trained weights in this bundle" in (paths["global"] / "docs" / "README.md").read_text()
    assert not np.allclose(personalised, global_only)  # the local adapter matters after training
    batch = torch.cat([b["image"] for b in site.val_loader])
    for kind, probs in (("personalised", personalised), ("global", global_only)):
        net = load_bundle_network(paths[kind]).eval()
        with torch.no_grad():
            out = torch.softmax(net(batch), 1).numpy()
        assert np.allclose(out, probs, atol=1e-5), kind
    # and with MONAI's own loader, offline (weights are local)
    net = bundle_load(name="personalised", bundle_dir=str(tmp_path / "export"), source="github", device="cpu")
    with torch.no_grad():
        assert np.allclose(torch.softmax(net.eval()(batch), 1).numpy(), personalised, atol=1e-5)
