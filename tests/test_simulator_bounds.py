"""Bounded influence in the real ``nvflare simulator``: three sites, one of them boosting its update 20x and
declaring 100x its dataset size in every round; and the same federation honest.  Two runs serve every assertion."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import TASKS, run_sim, tiny_recipe
from hostile import BoostAndInflate, RecordTraffic, load_traffic

pytestmark = pytest.mark.slow
SITES = ["site-a", "site-b", "site-c"]
HONEST = ["site-a", "site-b"]
ROUNDS = 3


def norm(x: dict, y: dict) -> float:
    return float(np.sqrt(sum(np.square(x[k].astype(np.float64) - y[k].astype(np.float64)).sum() for k in x)))


def traffic(r):
    """Per round: the global the sites started from, every site's result and declared size, the next global."""
    folder = r.outputs.server_dir / "traffic"
    initial = {s: load_traffic(p)[0] for s in SITES for p in folder.glob(f"in_submit_model_*_{s}.npz")}
    rounds = []
    start = initial["site-a"]
    for rnd in range(ROUNDS):
        results = {s: load_traffic(folder / f"in_train_r{rnd}_{s}.npz") for s in SITES}
        nxt = folder / (f"out_train_r{rnd + 1}.npz" if rnd < ROUNDS - 1 else "out_validate_rNone.npz")
        end, _ = load_traffic(nxt)
        rounds.append({"start": start, "results": {s: w for s, (w, _) in results.items()},
                       "sizes": {s: float(e["__dataset_size"]) for s, (_, e) in results.items()}, "end": end})
        start = end
    return initial, rounds


def weighted_mean(results: dict, sizes: dict, sites) -> dict:
    total = sum(sizes[s] for s in sites)
    return {k: sum(sizes[s] / total * results[s][k].astype(np.float64) for s in sites) for k in results[sites[0]]}


def record(recipe, site=None, **hostile):
    recipe.set_per_site_config({s: {} for s in SITES})
    if site:
        recipe.add_client_input_filter(BoostAndInflate("in", **hostile), tasks=["train"], clients=[site])
        recipe.add_client_output_filter(BoostAndInflate("out", **hostile), tasks=list(TASKS), clients=[site])
    recipe.add_server_input_filter(RecordTraffic("in"), tasks=list(TASKS))
    recipe.add_server_output_filter(RecordTraffic("out"), tasks=list(TASKS))
    return recipe


@pytest.fixture(scope="module")
def honest_run(tmp_path_factory, cmr_datalists):
    root = tmp_path_factory.mktemp("honest_bounds")
    return run_sim(record(tiny_recipe(cmr_datalists, SITES, name="honest", rounds=ROUNDS)), root / "ws", timeout=400)


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory, cmr_datalists):
    root = tmp_path_factory.mktemp("hostile_bounds")
    recipe = record(tiny_recipe(cmr_datalists, SITES, name="boosted", rounds=ROUNDS), "site-c", boost=20.0,
                    size_factor=100)
    return run_sim(recipe, root / "ws", timeout=400)


def test_an_honest_federation_is_plain_fedavg_with_the_bounds_on(honest_run):
    r = honest_run
    assert r.ok, r.describe_failure()
    initial, rounds = traffic(r)
    assert len({json.dumps({k: v.tolist() for k, v in w.items()}) for w in initial.values()}) == 1  # one init
    for rnd, t in enumerate(rounds):
        expected = weighted_mean(t["results"], t["sizes"], SITES)
        for k, v in t["end"].items():
            assert np.allclose(v, expected[k], rtol=0, atol=1e-6), (rnd, k)
    for entry in r.communication:
        assert entry["clipped"] == {} and entry["capped"] == {} and set(entry["accepted"]) == set(SITES)
    assert all(p["clipped"] == [] and p["capped"] == [] for p in r.outputs.progress)
    assert r.outputs.status["bounded"] == {"rounds": ROUNDS, "clipped": {}, "capped": {}, "clipped_every_round": []}


def test_a_boosted_site_declaring_100x_its_data_moves_the_global_at_most_3x_the_largest_honest_update(hostile_run):
    """site-c sends g + 20 (w - g) and declares 100x its dataset size in every round: the run completes, and every
    round's global is within 3x the largest honest update of the honest sites' weighted mean."""
    r = hostile_run
    assert r.ok, r.describe_failure()
    _, rounds = traffic(r)
    for rnd, t in enumerate(rounds):
        assert t["sizes"]["site-c"] == 100 * t["sizes"]["site-a"]
        honest_mean = weighted_mean(t["results"], t["sizes"], HONEST)
        largest = max(norm(t["results"][s], t["start"]) for s in HONEST)
        boosted = norm(t["results"]["site-c"], t["start"])
        moved = norm(t["end"], honest_mean)
        assert boosted > 10 * largest  # the attack is real: 20x an update the size of the honest ones
        assert moved <= 3 * largest, (rnd, moved / largest)
        unbounded = weighted_mean(t["results"], t["sizes"], SITES)  # plain FedAvg would have followed site-c
        assert norm(unbounded, honest_mean) > 10 * largest


def test_every_clip_and_cap_is_logged_counted_and_the_site_named_in_the_summary(hostile_run):
    r = hostile_run
    for rnd, entry in enumerate(r.communication):
        assert set(entry["clipped"]) == {"site-c"} and set(entry["capped"]) == {"site-c"}, rnd
        clip, cap = entry["clipped"]["site-c"], entry["capped"]["site-c"]
        assert 0 < clip["factor"] < 0.5 and "clip_ratio = 6 x the median update norm" in clip["reason"]
        # clipped, so it weighs the others' median (6), not the 600 it declared
        assert cap["factor"] == pytest.approx((1 / 3) / (600 / 612), rel=1e-3) and "clipped" in cap["reason"]
        assert entry["accepted"]["site-c"] == pytest.approx(1 / 3, rel=1e-5) and not entry["rejected"]
    assert all(p["clipped"] == ["site-c"] and p["capped"] == ["site-c"] for p in r.outputs.progress)
    assert r.outputs.status["bounded"]["clipped_every_round"] == ["site-c"]
    log = (r.outputs.server_dir.parent / "log.txt").read_text()
    assert "round 0: clipped the update of site-c by a factor" in log
    assert "round 2: capped the weight of site-c by a factor" in log
    assert "site site-c was clipped in every round (3 of 3)" in log
    assert "round 0 updates are measured from the initial shared state 3 of 3 sites hold" in log
