"""Bounded influence (no simulator): the relative clip, the weight caps, the fixed declared weight, their records.

The simulator side (a boosted site, a site inflating its dataset size, an honest federation) is in
``tests/test_simulator_bounds.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from nvflare.apis.dxo import MetaKey
from nvflare.app_common.abstract.fl_model import FLModel

from flare_duallora.deploy.report import format_round
from flare_duallora.engine.aggregation import (
    DEFAULT_CLIP_RATIO, DEFAULT_MAX_WEIGHT_RATIO, DEFAULT_MAX_WEIGHT_SHARE, AggregationRules, Contribution, aggregate,
    bound_weights, flat_norm,
)
from flare_duallora.engine.lora_aggregation import aggregate_lora
from flare_duallora.flare.aggregator import SharedKeyAggregator
from flare_duallora.flare.run_files import FINGERPRINT_META

A = "blocks.3.attn.qkv.lora_A.global.weight"
B = "blocks.3.attn.qkv.lora_B.global.weight"
HEAD = "classification_head.weight"
DUAL = {"method": "duallora", "head": ["classification_head"]}
#: Fed-ISIC2019's training images per centre and ACDC + M&Ms subjects per vendor: honest, skewed weights
ISIC = {"c0": 9930, "c1": 3163, "c2": 2691, "c3": 1807, "c4": 655, "c5": 351}
CMR = {"siemens": 275, "philips": 125, "ge": 75, "canon": 50}


def state(rng, scale=1.0, shape=(4, 8)):
    return {A: scale * rng.normal(size=shape), B: scale * rng.normal(size=(shape[1], shape[0])),
            HEAD: scale * rng.normal(size=(2, 8))}


def plus(g, d, factor=1.0):
    return {k: g[k] + factor * d[k] for k in g}


def weighted_mean(states: dict, weights: dict) -> dict:
    total = sum(weights.values())
    return {k: sum(weights[s] / total * states[s][k] for s in sorted(states)) for k in next(iter(states.values()))}


def distance(x, y) -> float:
    return flat_norm({k: x[k] - y[k] for k in x})


# ---------------------------------------------------------------------------------------------- honest = FedAvg
@pytest.mark.parametrize("weights", [ISIC, CMR, {"a": 6, "b": 6, "c": 6}], ids=["isic", "cmr", "equal"])
@pytest.mark.parametrize("known_global", [True, False], ids=["round_n", "round_0"])
def test_honest_skewed_federations_are_aggregated_bit_for_bit_as_plain_fedavg(weights, known_global):
    """Honest updates whose norms differ up to 3x (a big centre trains more steps) and Fed-ISIC2019 / CMR vendor
    proportions: no clip, no cap, and the result is the plain weighted mean to the last bit."""
    rng = np.random.default_rng(1)
    g = state(rng)
    sites = sorted(weights)
    scales = np.linspace(0.01, 0.03, len(sites))  # update norms differ by 3x
    states = {s: plus(g, state(rng, sc)) for s, sc in zip(sites, scales)}
    out = aggregate([Contribution(s, states[s], float(weights[s])) for s in sites], AggregationRules(),
                    g if known_global else None)
    assert not out.bounds and not out.clipped
    total = float(sum(weights.values()))
    for k in g:
        acc = np.zeros_like(g[k])
        for s in sites:
            acc += (float(weights[s]) / total) * states[s][k]
        assert np.array_equal(out.params[k], acc), k


def test_the_defaults_leave_margin_over_the_honest_proportions():
    """Fed-ISIC2019's largest centre holds 53 % of the training images, 5.5x the median of the others: under the
    share cap (0.6) and the ratio cap (8)."""
    shares, caps = bound_weights(ISIC, DEFAULT_MAX_WEIGHT_RATIO, DEFAULT_MAX_WEIGHT_SHARE)
    assert not caps and shares["c0"] == pytest.approx(9930 / sum(ISIC.values()))
    assert 0.5 < shares["c0"] < DEFAULT_MAX_WEIGHT_SHARE
    assert 9930 / np.median([3163, 2691, 1807, 655, 351]) < DEFAULT_MAX_WEIGHT_RATIO


# ---------------------------------------------------------------------------------------------- a boosted update
@pytest.mark.parametrize("known_global", [True, False], ids=["round_n", "round_0"])
def test_a_boosted_update_is_clipped_to_clip_ratio_times_the_other_sites_median(known_global):
    rng = np.random.default_rng(2)
    g = state(rng)
    honest = {s: plus(g, state(rng, 0.02)) for s in ("a", "b")}
    boosted = plus(g, state(rng, 0.02), 20.0)
    contribs = [Contribution(s, honest[s], 10.0) for s in honest] + [Contribution("c", boosted, 10.0)]
    out = aggregate(contribs, AggregationRules(), g if known_global else None)
    assert out.clipped == ["c"] and [b.kind for b in out.bounds] == ["clipped"]
    bound = out.bounds[0]
    others = [out.update_norms[s] for s in ("a", "b")]
    assert bound.factor == pytest.approx(DEFAULT_CLIP_RATIO * np.median(others) / out.update_norms["c"])
    assert "clip_ratio = 6 x the median update norm of the other 2 site(s)" in bound.reason
    largest = max(distance(honest[s], g) for s in honest)
    assert distance(out.params, weighted_mean(honest, {"a": 1, "b": 1})) <= 3 * largest
    unbounded = aggregate(contribs, AggregationRules(clip_ratio=None), g if known_global else None)
    assert distance(unbounded.params, weighted_mean(honest, {"a": 1, "b": 1})) > 3 * largest  # the bound mattered


def test_the_clip_keeps_the_direction_and_reaches_the_limit_exactly():
    g = {A: np.zeros((2, 2))}
    contribs = [Contribution("a", {A: np.full((2, 2), 1.0)}, 1.0), Contribution("b", {A: np.full((2, 2), 2.0)}, 1.0),
                Contribution("c", {A: np.full((2, 2), -50.0)}, 1.0)]
    out = aggregate(contribs, AggregationRules(max_weight_share=None), g)
    # others' median update norm = 1.5 x 2 = 3; c's update (norm 100) is cut to 6 x 3 = 18: -9 per entry
    assert out.bounds[0].factor == pytest.approx(18 / 100)
    assert np.allclose(out.params[A], (1 + 2 - 9) / 3)


# ---------------------------------------------------------------------------------------------- weight caps
def test_a_site_claiming_100x_its_dataset_size_is_capped():
    shares, caps = bound_weights({"a": 6, "b": 6, "c": 600}, DEFAULT_MAX_WEIGHT_RATIO, DEFAULT_MAX_WEIGHT_SHARE)
    assert shares == pytest.approx({"a": 0.2, "b": 0.2, "c": 0.6})  # 8x the others' median is 0.8: 0.6 binds
    assert [c.site for c in caps] == ["c"] and caps[0].factor == pytest.approx(0.6 / (600 / 612))
    assert "max_weight_ratio = 8" in caps[0].reason and "max_weight_share = 0.6" in caps[0].reason
    many = {f"s{i}": 10 for i in range(9)} | {"liar": 1000}
    shares, caps = bound_weights(many, DEFAULT_MAX_WEIGHT_RATIO, DEFAULT_MAX_WEIGHT_SHARE)
    assert shares["liar"] == pytest.approx(80 / 170) and "max_weight_share" not in caps[0].reason  # the ratio binds
    shares, caps = bound_weights({"a": 10, "b": 1000}, DEFAULT_MAX_WEIGHT_RATIO, DEFAULT_MAX_WEIGHT_SHARE)
    assert shares["b"] == pytest.approx(80 / 90)  # two sites: only the ratio cap (a share cap cannot tell them apart)


@pytest.mark.parametrize("boost", [1.0, 20.0])
def test_a_weight_liar_stays_within_3x_the_largest_honest_update(boost):
    """100x its dataset size with its own update (capped at a 0.6 share) or a 20x boosted one (clipped, and then
    weighing the others' median)."""
    rng = np.random.default_rng(3)
    g = state(rng)
    honest = {s: plus(g, state(rng, 0.02)) for s in ("a", "b")}
    liar = plus(g, state(rng, 0.02), boost)
    contribs = [Contribution("a", honest["a"], 6.0), Contribution("b", honest["b"], 6.0),
                Contribution("c", liar, 600.0)]
    out = aggregate(contribs, AggregationRules(), g)
    kinds = {("c", "capped")} | ({("c", "clipped")} if boost > 1 else set())
    assert {(b.site, b.kind) for b in out.bounds} == kinds
    assert out.shares["c"] == pytest.approx(1 / 3 if boost > 1 else DEFAULT_MAX_WEIGHT_SHARE)
    largest = max(distance(honest[s], g) for s in honest)
    assert distance(out.params, weighted_mean(honest, {"a": 6, "b": 6})) <= 3 * largest


# ---------------------------------------------------------------------------------------------- lora modes
@pytest.mark.parametrize("mode", ["svd", "fedex"])
def test_svd_and_fedex_combine_the_clipped_factors_with_the_capped_shares(mode):
    rng = np.random.default_rng(4)
    g = {A: rng.normal(size=(4, 8)), B: np.zeros((8, 4))}
    states = {s: plus(g, {A: 0.05 * rng.normal(size=(4, 8)), B: 0.05 * rng.normal(size=(8, 4))})
              for s in ("a", "b", "c")}
    states["c"] = plus(g, {k: states["c"][k] - g[k] for k in g}, 20.0)
    weights = {"a": 5.0, "b": 6.0, "c": 500.0}
    out = aggregate([Contribution(s, states[s], weights[s]) for s in states],
                    AggregationRules(lora_aggregation=mode), g, lora_scaling=2.0)
    assert {(b.site, b.kind) for b in out.bounds} == {("c", "clipped"), ("c", "capped")}
    scale = next(b.factor for b in out.bounds if b.kind == "clipped")
    clipped = dict(states, c=plus(g, {k: states["c"][k] - g[k] for k in g}, scale))
    expected = aggregate_lora(clipped, out.shares, mode, 2.0)
    for k in g:
        assert np.allclose(out.params[k], expected.state[k], atol=1e-12)
    assert out.shares["c"] == pytest.approx(1 / 3)  # clipped: it weighs the others' median (5.5), not 500


# ---------------------------------------------------------------------------------------------- aggregator
def result(site, data, n=10, steps=2):
    return FLModel(params={k: v.astype(np.float32) for k, v in data.items()},
                   meta={"client_name": site, "dataset_size": n, MetaKey.NUM_STEPS_CURRENT_ROUND: steps,
                         FINGERPRINT_META: "fp"})


def run_round(agg, rnd, current, *results):
    agg.reset_stats()
    agg.set_global(current, rnd)
    for r in results:
        agg.accept_model(r)
    return agg.aggregate_model()


def test_a_dataset_size_that_changes_after_the_first_round_is_refused():
    rng = np.random.default_rng(5)
    g = {k: v.astype(np.float32).astype(np.float64) for k, v in state(rng).items()}
    agg = SharedKeyAggregator(DUAL)
    first = run_round(agg, 0, g, *(result(s, plus(g, state(rng, 0.01)), n=8) for s in ("a", "b", "c")))
    assert set(first.meta["aggregation"]["accepted"]) == {"a", "b", "c"}
    nxt = run_round(agg, 1, g, result("a", plus(g, state(rng, 0.01)), n=8),
                    result("b", plus(g, state(rng, 0.01)), n=800),
                    result("c", plus(g, state(rng, 0.01)), n=7))
    rejected = nxt.meta["aggregation"]["rejected"]
    assert set(rejected) == {"b", "c"}
    assert "dataset size 800 differs from the 8 it declared in round 0" in rejected["b"] and "fixed" in rejected["b"]
    steps = SharedKeyAggregator(DUAL, weigh_by="steps")
    run_round(steps, 0, g, *(result(s, plus(g, state(rng, 0.01)), steps=4) for s in ("a", "b")))
    out = run_round(steps, 1, g, result("a", plus(g, state(rng, 0.01)), steps=3),
                    result("b", plus(g, state(rng, 0.01)), steps=40))
    assert set(out.meta["aggregation"]["rejected"]) == {"b"} and "40 steps exceed the 4" in \
        out.meta["aggregation"]["rejected"]["b"]


def test_every_clip_and_cap_is_recorded_with_factor_and_reason(caplog):
    rng = np.random.default_rng(6)
    g = {k: v.astype(np.float32).astype(np.float64) for k, v in state(rng).items()}
    agg = SharedKeyAggregator(DUAL)
    out = run_round(agg, 2, g, result("a", plus(g, state(rng, 0.01)), n=6),
                    result("b", plus(g, state(rng, 0.01)), n=6), result("c", plus(g, state(rng, 0.01), 20), n=600))
    summary = out.meta["aggregation"]
    assert set(summary["clipped"]) == {"c"} and set(summary["capped"]) == {"c"}
    assert 0 < summary["clipped"]["c"]["factor"] < 1 and "clip_ratio" in summary["clipped"]["c"]["reason"]
    assert summary["capped"]["c"]["factor"] == pytest.approx((1 / 3) / (600 / 612), rel=1e-5)
    assert "its update was clipped" in summary["capped"]["c"]["reason"]
    assert summary["declared"] == {"a": 6.0, "b": 6.0, "c": 600.0} and summary["accepted"]["c"] == pytest.approx(1 / 3)
    logged = [r.getMessage() for r in caplog.records]
    assert any("round 2: clipped the update of c by a factor" in m for m in logged)
    assert any("round 2: capped the weight of c by a factor" in m and "clipped" in m for m in logged)
    line = format_round({"round": 2, "num_rounds": 3, "answered": ["a", "b", "c"], "accepted": ["a", "b", "c"],
                         "clipped": ["c"], "capped": ["c"], "mean_loss": 0.5}, 3)
    assert "1 clipped (c), 1 capped (c)" in line


def test_the_run_summary_names_a_site_clipped_in_every_round():
    from flare_duallora.flare.controller import PersonalisedFedAvg

    ctl = PersonalisedFedAvg(DUAL, num_clients=3, num_rounds=3)
    ctl.aggregator.history = [
        {"aggregated": True, "clipped": {"c": {}, "a": {}}, "capped": {"c": {}}},
        {"aggregated": True, "clipped": {"c": {}}, "capped": {}},
        {"aggregated": True, "clipped": {"c": {}}, "capped": {"c": {}}},
    ]
    assert ctl._bound_summary() == {"rounds": 3, "clipped": {"a": 1, "c": 3}, "capped": {"c": 2},
                                    "clipped_every_round": ["c"]}


@pytest.mark.parametrize("setting,value", [("clip_ratio", 0.5), ("max_weight_ratio", float("nan")),
                                           ("clip_ratio", True), ("max_weight_share", 1.5)])
def test_bad_bound_settings_are_refused_by_name(setting, value):
    with pytest.raises(ValueError, match=setting):
        AggregationRules(**{setting: value})


def test_the_bounds_bench_reports_each_sites_norm_ratio_and_share():
    from flare_duallora.bench.bounds import maxima, round_stats

    stats = round_stats({"update_norm": {"a": 1.0, "b": 2.0, "c": 6.0}, "declared": {"a": 1, "b": 1, "c": 2}})
    assert stats["c"] == {"norm_ratio": 4.0, "share": 0.5} and stats["a"]["norm_ratio"] == 0.25
    rows = [{"task": "cmr", "preset": "tiny", "method": "duallora", "seed": 0, "round": 0, "site": s,
             "clipped": s == "c", "capped": False, **st} for s, st in stats.items()]
    m = maxima(rows)["cmr tiny"]
    assert m["max_norm_ratio"] == 4.0 and m["max_share"] == 0.5 and m["clips"] == 1 and m["runs"] == 1
