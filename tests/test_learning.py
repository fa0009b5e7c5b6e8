"""Learning on the synthetic vendor-shift CMR task (small preset): the backbone pretrained without labels (masked
autoencoding on a disjoint cohort) matters."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from flare_duallora.training.from_bundle import build_site
from flare_duallora.synthetic_tasks import prepare_cmr

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def small_cmr(tmp_path_factory):
    """The demo's task: 4 vendor sites, 40 subjects each, bundle pretrained by MAE on a disjoint cohort (~30 s CPU)."""
    return prepare_cmr(tmp_path_factory.mktemp("small_cmr"), preset="small", seed=0, log=lambda *_: None)


def mean_personalised_ba(setup, bundle, epochs=20):
    scores = []
    for site in setup.sites:
        trainer = build_site(bundle, {**setup.adapter, "method": "duallora"}, setup.datalist_dir / f"{site}.json",
                             setup.overrides, device="cpu", allow_random_base=True).trainer
        trainer.train_round(epochs=epochs)
        scores.append(trainer.evaluate()["personalised"]["balanced_accuracy"])
    return float(np.mean(scores)), scores


def test_pretrained_backbone_beats_random_init_with_duallora(small_cmr, tmp_path):
    random_bundle = tmp_path / "random_init"
    shutil.copytree(small_cmr.bundle, random_bundle, ignore=shutil.ignore_patterns("models"))
    assert (small_cmr.bundle / "models" / "model.pt").is_file() and not (random_bundle / "models").exists()
    pretrained, p_sites = mean_personalised_ba(small_cmr, small_cmr.bundle)
    random_init, r_sites = mean_personalised_ba(small_cmr, random_bundle)
    print(f"mean personalised BA: pretrained {pretrained:.3f} {np.round(p_sites, 3)}, "
          f"random init {random_init:.3f} {np.round(r_sites, 3)}")
    assert pretrained > random_init + 0.05
