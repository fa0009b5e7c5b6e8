"""The in-process federation the benchmarks use: the same global model and site metrics as ``nvflare simulator``,
and, for every method, only the method's shared keys reach the aggregator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import ADAPTER, CMR_BUNDLE, TINY_CMR, tiny_recipe
from flare_duallora.bench.federation import run_in_process
from flare_duallora.engine import method_names
from flare_duallora.training.from_bundle import build_site
from hostile import RecordTraffic, load_traffic

SITES = ["site-a", "site-b"]
DETERMINISTIC = {**TINY_CMR, "train#random_transforms": []}  # no random augmentation: both runners see the same data


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as the simulator's sites (OMP_NUM_THREADS=1)
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
def test_the_in_process_runner_and_the_simulator_give_the_same_global_model_and_metrics(tmp_path, cmr_datalists,
                                                                                        one_thread, monkeypatch):
    """The simulator side runs through nvflare's own ``SimEnv`` (the recipe installs the site configuration)."""
    from nvflare.recipe import SimEnv

    from flare_duallora.flare.run_files import read_run

    sim_recipe = tiny_recipe(cmr_datalists, SITES, name="same", rounds=2, bundle_overrides=DETERMINISTIC)
    sim_recipe.add_server_output_filter(RecordTraffic("out"), tasks=["train", "validate", "submit_model"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one torch thread per site, like the in-process run below
    sim_recipe.run(SimEnv(clients=SITES, workspace_root=str(tmp_path / "ws")))
    sim = read_run(tmp_path / "ws" / "same" / "server" / "simulate_job")
    assert sim.completed, sim.status
    local = run_in_process(tiny_recipe(cmr_datalists, SITES, name="same", rounds=2, bundle_overrides=DETERMINISTIC),
                           tmp_path / "in_process")
    assert local.ok, local.failures
    traffic = sim.server_dir / "traffic"
    for rnd, sent in ((0, "out_train_r1.npz"), (1, "out_validate_rNone.npz")):
        expected, _ = load_traffic(traffic / sent)
        assert set(expected) == set(local.globals[rnd])
        for key, value in expected.items():
            assert np.allclose(local.globals[rnd][key], value, atol=1e-6), (rnd, key)
    for site in SITES:
        for kind in ("personalised", "global_only"):
            a, b = sim.site_results[site][kind], local.site_results[site][kind]
            assert a.keys() == b.keys()
            for name in a:
                assert a[name] == pytest.approx(b[name], abs=1e-6, nan_ok=True), (site, kind, name)


@pytest.mark.parametrize("method", method_names())
def test_only_the_methods_shared_keys_reach_the_aggregator(tmp_path, cmr_datalists, method):
    recipe = tiny_recipe(cmr_datalists, SITES, name=method, method=method, rounds=1, bundle_overrides=DETERMINISTIC)
    out = run_in_process(recipe, tmp_path)
    assert out.ok, out.failures
    build = build_site(CMR_BUNDLE, {"method": method, **ADAPTER}, cmr_datalists / "site-a.json", DETERMINISTIC,
                       device="cpu", allow_random_base=True)
    shared, private = set(build.adapted.shared_keys), set(build.adapted.private_keys)
    assert set(recipe.plan.schema) == shared
    trains = [e for e in out.received if e["task"] == "train"]
    assert len(trains) == len(SITES)
    for entry in trains:
        keys = set(entry["keys"])
        assert keys == shared, f"{method}: {sorted(keys ^ shared)[:5]}"
        assert not keys & private
        if method == "pfedst":  # the side network's own base weights are shared; the frozen backbone never is
            assert not any(k.startswith("backbone.") for k in keys)
        elif method != "full":
            assert not any(".base_layer." in k for k in keys)
    if method in ("duallora", "fedopal", "local"):
        assert not any(".local." in k for e in trains for k in e["keys"])
    if method == "fedsa":
        assert all(".lora_B." not in k for k in out.globals[0])
    if method == "pfedst":
        assert all(k.startswith("side.") and ".lora_" not in k for k in out.globals[0])


def test_weights_follow_dataset_size_under_local_steps(tmp_path):
    """8 vs 64 training examples, both sites doing the same 2 local steps: the aggregation weights are 1:8."""
    from conftest import write_random_cmr_site

    write_random_cmr_site(tmp_path, "site-small", n=10, n_val=2, seed=1)
    write_random_cmr_site(tmp_path, "site-large", n=66, n_val=2, seed=2)
    recipe = tiny_recipe(tmp_path, ["site-small", "site-large"], name="weights", rounds=1, local_steps=2,
                         bundle_overrides=DETERMINISTIC)
    out = run_in_process(recipe, tmp_path / "run")
    assert out.ok, out.failures
    shares = out.rounds[0]["accepted"]
    assert shares["site-large"] / shares["site-small"] == pytest.approx(8.0, rel=1e-4)  # shares are rounded to 1e-6
    steps = {s: next(e for e in out.records[s] if e["event"] == "train")["steps"] for s in shares}
    assert steps == {"site-small": 2, "site-large": 2}


def test_per_round_global_only_is_the_received_global_model_before_local_training(tmp_path, cmr_datalists):
    recipe = tiny_recipe(cmr_datalists, SITES, name="received", rounds=2, bundle_overrides=DETERMINISTIC)
    out = run_in_process(recipe, tmp_path)
    assert out.ok, out.failures
    round1 = next(e for e in out.records["site-a"] if e["event"] == "train" and e["round"] == 1)
    build = build_site(CMR_BUNDLE, recipe.settings, cmr_datalists / "site-a.json", DETERMINISTIC, device="cpu",
                       allow_random_base=True)
    build.adapted.load_shared({k: torch.as_tensor(v) for k, v in out.globals[0].items()})
    expected = build.trainer.evaluate(kinds=("global_only",))["global_only"]
    measured = round1["metrics"]["global_only_received"]
    for name, value in expected.items():
        assert measured[name] == pytest.approx(value, abs=1e-6, nan_ok=True), name
    after = round1["metrics"]["personalised_after_training"]
    assert after != measured  # the other figure is the site's model after this round's training


@pytest.mark.parametrize("mode", ["svd", "fedex"])
def test_svd_and_fedex_aggregation_run_end_to_end_with_the_base_checked_every_round(tmp_path, cmr_datalists, mode):
    """fedex folds the residual of the exact average into every site's base each round: the sites' fingerprints move
    with it exactly as the server's expectation does (no site is refused), and the rank stays r on the wire."""
    recipe = tiny_recipe(cmr_datalists, SITES, name=mode, rounds=3, bundle_overrides=DETERMINISTIC,
                         lora_aggregation=mode)
    out = run_in_process(recipe, tmp_path)
    assert out.ok, out.failures
    assert all(not r["rejected"] and r["aggregated"] for r in out.rounds)
    assert all(set(g) == set(recipe.plan.schema) for g in out.globals)
    prints = [e["fingerprint"] for e in out.records["site-a"] if e["event"] == "started"]
    if mode == "fedex":
        assert all(r.get("fedex_residual_bytes", 0) > 0 for r in out.rounds)
        base = {k: v for k, v in out.sites["site-a"].adapted.net.state_dict().items() if ".base_layer." in k}
        fresh = build_site(CMR_BUNDLE, recipe.settings, cmr_datalists / "site-a.json", DETERMINISTIC, device="cpu",
                           allow_random_base=True).adapted.net.state_dict()
        assert any(not torch.equal(v, fresh[k]) for k, v in base.items())  # residuals were folded into the base
        assert out.sites["site-a"].fingerprint != prints[0]  # and the fingerprint moved with them
    with pytest.raises(Exception, match="robust_aggregation = 'mean'"):
        tiny_recipe(cmr_datalists, SITES, name="x", lora_aggregation=mode, robust_aggregation="median")
