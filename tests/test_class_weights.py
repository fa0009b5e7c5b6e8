"""The reference bundles weigh their loss by the inverse class frequency of each site's own training labels."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ADAPTER, CMR_BUNDLE, CLS2D_BUNDLE, TINY_CMR, write_random_cmr_site
from flare_duallora.bundle import BundleConfigError, BundleRuntime
from flare_duallora.training.class_weights import inverse_frequency
from flare_duallora.training.from_bundle import build_site


def _relabel(path, training, validation):
    info = json.loads(path.read_text())
    for item, y in zip(info["training"], training):
        item["label"] = y
    for item, y in zip(info["validation"], validation):
        item["label"] = y
    path.write_text(json.dumps(info))
    return path


def _weights(bundle, datalist, overrides=TINY_CMR):
    build = build_site(bundle, {"method": "duallora", **ADAPTER}, datalist, overrides, device="cpu",
                       allow_random_base=True)
    weight = build.trainer.loss_fn.weight
    return None if weight is None else weight.tolist()


def test_each_site_weighs_its_loss_by_its_own_training_labels_and_never_by_validation(tmp_path):
    a = _relabel(write_random_cmr_site(tmp_path, "site-a", n=10, n_val=2), [0] * 6 + [1] * 2, [1, 1])
    b = _relabel(write_random_cmr_site(tmp_path, "site-b", n=10, n_val=2, seed=1), [0] * 2 + [1] * 6, [0, 0])
    assert _weights(CMR_BUNDLE, a) == pytest.approx([8 / (2 * 6), 8 / (2 * 2)])
    assert _weights(CMR_BUNDLE, b) == pytest.approx([8 / (2 * 2), 8 / (2 * 6)])
    _relabel(a, [0] * 6 + [1] * 2, [0, 1])  # other validation labels: the same weights
    assert _weights(CMR_BUNDLE, a) == pytest.approx([8 / (2 * 6), 8 / (2 * 2)])
    # the bundle setting turns it off
    assert _weights(CMR_BUNDLE, a, {**TINY_CMR, "class_weighting": "none"}) is None


def test_inverse_frequency_keeps_the_mean_weight_one_and_names_bad_settings(tmp_path):
    w = inverse_frequency([0, 0, 0, 2], 4)
    assert w == pytest.approx([4 / 6, 0.0, 2.0, 0.0])  # classes 1 and 3 absent: weight 0
    assert sum(w[y] for y in [0, 0, 0, 2]) / 4 == pytest.approx(1.0)
    with pytest.raises(ValueError, match="outside 0..1"):
        inverse_frequency([0, 3], 2)
    site = write_random_cmr_site(tmp_path, "site-c", n=4, n_val=1)
    with pytest.raises(BundleConfigError, match="class_weighting.*'sqrt'"):
        _weights(CMR_BUNDLE, site, {**TINY_CMR, "class_weighting": "sqrt"})
    for bundle in (CMR_BUNDLE, CLS2D_BUNDLE):  # both reference bundles ask for it
        rt = BundleRuntime(bundle, overrides={"datalist": str(site)})
        assert rt.get("class_weighting") == "inverse_frequency" and rt.get("class_weights") is None
        assert rt.loss.weight is None  # without the site's weights the loss is plain cross-entropy
        assert isinstance(rt.loss, torch.nn.CrossEntropyLoss)
