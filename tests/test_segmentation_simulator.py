"""A model-zoo style 3D segmentation bundle trained with duallora in the real simulator (one run, several checks)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import run_sim
from test_simulator import strict_json_files
from zoo_data import SPLEEN_BUNDLE, UNET_ADAPTER, write_spleen_dataset
from flare_duallora.deploy.report import results_table

pytestmark = pytest.mark.slow
SITES = ["site-a", "site-b"]


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    """site-a reads the bundle as published, site-b its own copy (per-site bundle_root); each its own dataset_dir."""
    from flare_duallora.deploy.recipe import DualLoRARecipe

    root = tmp_path_factory.mktemp("seg_run")
    data = {site: write_spleen_dataset(root / f"data-{site}", seed=i + 1) for i, site in enumerate(SITES)}
    own_copy = shutil.copytree(SPLEEN_BUNDLE, root / "site-b-bundle")
    recipe = DualLoRARecipe(name="seg", target="sim", bundle_root=str(SPLEEN_BUNDLE),
                            settings={"method": "duallora", **UNET_ADAPTER}, clients=SITES, num_rounds=2,
                            local_steps=2, allow_random_base=True, device="cpu")
    recipe.set_per_site_config({
        "site-a": {"bundle_overrides": {"dataset_dir": str(data["site-a"])}},
        "site-b": {"bundle_root": str(own_copy), "bundle_overrides": {"dataset_dir": str(data["site-b"])}},
    })
    assert recipe.plan.task == "segmentation"
    return recipe, run_sim(recipe, root / "ws", timeout=600), root / "ws"


def test_each_site_reports_dice_of_both_models_with_the_bundles_key_metric(seg_run):
    recipe, r, _ = seg_run
    assert r.ok, r.describe_failure()
    assert set(r.site_results) == set(SITES)
    for site in SITES:
        for kind in ("personalised", "global_only"):
            m = r.site_results[site][kind]
            assert m["n"] == 2 and 0.0 <= m["dice"] <= 1.0 and "dice/spleen" in m and "hd95" in m
            # the key metric passed the server's result filter under its own name
            assert m["val_mean_dice"] == pytest.approx(m["dice"], abs=1e-5)
        records = r.site_records[site]
        started = next(e for e in records if e["event"] == "started")
        assert started["task"] == "segmentation" and started["dataset_size"] == 4
        cache = next(e for e in records if e["event"] == "prefix_cache")
        assert not cache["enabled"] and "random" in cache["reason"]
        trains = [e for e in records if e["event"] == "train"]
        assert [e["round"] for e in trains] == [0, 1] and all(e["examples"] == 16 for e in trains)  # 2 x 2 x 4 crops
        assert set(trains[0]["metrics"]["personalised_after_training"]) >= {"dice", "hd95", "val_mean_dice"}
        final = next(e for e in records if e["event"] == "validate")
        assert (Path(final["bundles"]["personalised"]) / "configs" / "inference.json").is_file()
    table = results_table(r.site_results)
    assert "| dice | hd95 (mm) | val_mean_dice |" in table and "| site-b | 2 | global-only |" in table


def test_only_shared_keys_reach_the_server_and_results_are_strict_json(seg_run):
    recipe, r, ws = seg_run
    weights = [e for e in r.received if e["kind"] == "WEIGHTS"]  # the initial state and 2 rounds
    assert len([e for e in weights if e["task"] == "train"]) == 2 * len(SITES) and all(set(e["keys"]) == set(recipe.plan.schema) for e in weights)
    assert not any(".local." in k or ".base_layer." in k for e in weights for k in e["keys"])
    assert any(".global." in k for k in recipe.plan.schema) and any(k.startswith("model.2.") for k in recipe.plan.schema)
    files = {p.name for p in strict_json_files(ws / "seg")}  # raises on NaN / Infinity tokens
    assert {"site_results.json", "site_records.jsonl", "progress.jsonl"} <= files
