"""Filter, aggregator and site configuration with real nvflare objects, against sites that lie (no simulator)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.filter import ContentBlockedException
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, make_reply
from nvflare.app_common.abstract.fl_model import FLModel

from flare_duallora.deploy.site_config import PACKAGE_PREFIX, RUNTIME_CLASSES, install_site_config, privacy_config
from flare_duallora.flare.site_policy import SitePolicyError
from flare_duallora.engine.aggregation import AggregationRules, Contribution, aggregate, cap_shares
from flare_duallora.flare.aggregator import SharedKeyAggregator
from flare_duallora.flare.filters import PrivateKeyFilter
from flare_duallora.flare.run_files import CAUSE_HEADER, FINGERPRINT_META

G = "blocks.3.attn.qkv.lora_A.global.weight"
GB = "blocks.3.attn.qkv.lora_B.global.weight"
L = "blocks.3.attn.qkv.lora_A.local.weight"
BASE = "blocks.3.attn.qkv.base_layer.weight"
HEAD = "classification_head.weight"
DUAL = {"method": "duallora", "head": ["classification_head"]}


def payload(*keys, value=1.0, shape=(4, 8)):
    return {k: np.full(shape, value, dtype=np.float32) for k in keys}


def run_filter(flt, data, meta=None, kind=DataKind.WEIGHTS):
    shareable = DXO(kind, data=data, meta=meta or {}).to_shareable()
    return from_shareable(flt.process(shareable, FLContext()))


# ---------------------------------------------------------------------------------------------- filter
def test_filter_strips_private_keys_and_keeps_shared():
    out = run_filter(PrivateKeyFilter(DUAL), payload(G, GB, L, HEAD))
    assert sorted(out.data) == sorted([G, GB, HEAD])


def test_filter_blocks_base_weights_and_private_in_block_mode():
    with pytest.raises(ContentBlockedException, match=r"frozen/base key\(s\).*base_layer"):
        run_filter(PrivateKeyFilter(DUAL), payload(G, BASE))
    with pytest.raises(ContentBlockedException, match=r"private key\(s\): .*lora_A\.local"):
        run_filter(PrivateKeyFilter(DUAL, on_private="block"), payload(G, L))
    with pytest.raises(ContentBlockedException, match="lora_B"):  # FedSA keeps B at home
        run_filter(PrivateKeyFilter({"method": "fedsa"}, on_private="block"), payload(G, GB))
    with pytest.raises(ContentBlockedException, match="lora_A"):  # FFA never sends its frozen A
        run_filter(PrivateKeyFilter({"method": "ffa"}), payload(G, GB))


@pytest.mark.parametrize("kind", [DataKind.WEIGHT_DIFF, DataKind.FL_MODEL, DataKind.APP_DEFINED, DataKind.COLLECTION])
def test_filter_blocks_every_kind_but_weights_and_metrics(kind):
    with pytest.raises(ContentBlockedException, match="only WEIGHTS and METRICS leave"):
        run_filter(PrivateKeyFilter(DUAL), payload(G), kind=kind)


def test_filter_keeps_only_plain_metrics_in_a_metrics_result():
    data = {"personalised/balanced_accuracy": 0.7, "global_only/sensitivity/AK": float("nan"),
            "personalised/n": 10, "personalised/whatever": 1.0, "global_only/auc": "0.5",
            "global_only/auc/XX": 0.5, "personalised/mcc": 3.0}
    flt = PrivateKeyFilter(DUAL, num_classes=2, label_names=["NOR", "AK"])
    out = run_filter(flt, data, kind=DataKind.METRICS)
    assert out.data == {"personalised/balanced_accuracy": 0.7, "global_only/sensitivity/AK": None,
                        "personalised/n": 10}
    with pytest.raises(ContentBlockedException, match="METRICS entries carry arrays"):
        run_filter(flt, {**data, L: np.ones((2, 2), np.float32)}, kind=DataKind.METRICS)


def test_filter_blocks_arrays_in_meta_and_headers_and_cleans_site_metrics():
    with pytest.raises(ContentBlockedException, match="meta carry arrays"):
        run_filter(PrivateKeyFilter(DUAL), payload(G), meta={"extra": {"w": np.ones(3)}})
    with pytest.raises(ContentBlockedException, match="meta carry arrays"):
        run_filter(PrivateKeyFilter(DUAL), payload(G), meta={"w": torch.ones(3)})
    shareable = DXO(DataKind.WEIGHTS, data=payload(G)).to_shareable()
    shareable.set_header("smuggled", np.ones(4))
    with pytest.raises(ContentBlockedException, match="headers carry arrays"):
        PrivateKeyFilter(DUAL).process(shareable, FLContext())
    fp = "sha256:" + "ab" * 32
    meta = {"site_metrics": {"personalised_after_training": {"balanced_accuracy": 0.6, "secret": 1.0,
                                                             "auc": float("inf")},
                             "weights": {"balanced_accuracy": 1.0}},
            MetaKey.INITIAL_METRICS: {"global_only_received": {"mcc": 0.1}},
            FINGERPRINT_META: fp}
    out = run_filter(PrivateKeyFilter(DUAL), payload(G), meta=meta)
    assert out.meta["site_metrics"] == {"personalised_after_training": {"balanced_accuracy": 0.6, "auc": None}}
    assert out.meta[FINGERPRINT_META] == fp
    for bad in (12, "sha256:abc", "x" * 5000):
        assert FINGERPRINT_META not in run_filter(PrivateKeyFilter(DUAL), payload(G), meta={FINGERPRINT_META: bad}).meta


def test_filter_strips_metrics_on_request():
    flt = PrivateKeyFilter(DUAL, strip_site_metrics=True)
    meta = {"site_metrics": {"personalised_after_training": {"n": 3}},
            MetaKey.INITIAL_METRICS: {"global_only_received": {"n": 1}}, "dataset_size": 4}
    out = run_filter(flt, payload(G, L), meta=meta)
    assert "site_metrics" not in out.meta and MetaKey.INITIAL_METRICS not in out.meta
    assert out.meta["dataset_size"] == 4 and list(out.data) == [G]
    initial_only = run_filter(PrivateKeyFilter(DUAL, strip_initial_metrics=True), payload(G), meta=dict(meta))
    assert MetaKey.INITIAL_METRICS not in initial_only.meta and "site_metrics" in initial_only.meta


def test_filter_sends_only_the_cause_of_an_error_reply():
    reply = make_reply(ReturnCode.EXECUTION_EXCEPTION)
    reply.set_header(CAUSE_HEADER, "site-a: ValueError: " + "x" * 5000)
    reply["DXO"] = DXO(DataKind.WEIGHTS, data=payload(L)).to_dict() if hasattr(DXO, "to_dict") else {"x": 1}
    reply.set_header("extra", np.ones(2))
    out = PrivateKeyFilter(DUAL).process(reply, FLContext())
    assert out.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    assert set(out) == {ReservedHeaderKey.HEADERS}
    assert out.get_header("extra") is None and len(out.get_header(CAUSE_HEADER)) == 2000


def test_filter_blocks_a_result_that_is_not_a_dxo():
    with pytest.raises(ContentBlockedException, match="not a DXO"):
        PrivateKeyFilter(DUAL).process(make_reply(ReturnCode.OK), FLContext())


def test_filter_rejects_bad_settings():
    with pytest.raises(ValueError, match="on_private"):
        PrivateKeyFilter(DUAL, on_private="maybe")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        PrivateKeyFilter({"method": "nope"})


# ---------------------------------------------------------------------------------------------- aggregator
def result(site, data, n=10, **meta):
    return FLModel(params=data, meta={"client_name": site, "dataset_size": n, MetaKey.NUM_STEPS_CURRENT_ROUND: 2,
                                      FINGERPRINT_META: "fp", **meta})


def aggregate_round(agg, *results, current=None):
    agg.reset_stats()
    agg.set_global(current, 0)
    for r in results:
        agg.accept_model(r)
    return agg.aggregate_model()


def test_aggregator_weights_by_dataset_size_steps_or_uniformly():
    a, b = payload(G, value=1.0), payload(G, value=3.0)
    for weigh_by, expected in (("dataset_size", (1 * 8 + 3 * 64) / 72), ("steps", 2.0), ("uniform", 2.0)):
        agg = SharedKeyAggregator(DUAL, weigh_by=weigh_by)
        out = aggregate_round(agg, result("s1", a, n=8), result("s2", b, n=64))
        assert np.allclose(out.params[G], expected), weigh_by
        assert out.meta["aggregation"]["accepted"] == pytest.approx(
            {"s1": 8 / 72, "s2": 64 / 72} if weigh_by == "dataset_size" else {"s1": 0.5, "s2": 0.5})


@pytest.mark.parametrize("poison,reason", [
    (np.nan, "non-finite"), (np.inf, "non-finite"), ("scaled", "update norm .* exceeds 100 x"),
])
def test_aggregator_rejects_non_finite_and_huge_weights_and_keeps_the_honest_average(poison, reason):
    agg = SharedKeyAggregator(DUAL)
    current = payload(G, value=1.0)
    honest = [result("s1", payload(G, value=1.1)), result("s2", payload(G, value=0.9))]
    bad = payload(G, value=1.0)
    bad[G] = bad[G] * 1e30 if poison == "scaled" else np.full_like(bad[G], poison)
    out = aggregate_round(agg, *honest, result("s3", bad), current=current)
    assert np.allclose(out.params[G], 1.0)  # exactly the honest sites' average
    assert set(out.meta["aggregation"]["rejected"]) == {"s3"}
    assert __import__("re").search(reason, out.meta["aggregation"]["rejected"]["s3"])


@pytest.mark.parametrize("weight", [1e12 * float("nan"), float("inf"), -3, 0, "10", None])
def test_aggregator_rejects_a_weight_that_is_not_finite_and_positive(weight):
    agg = SharedKeyAggregator(DUAL)
    out = aggregate_round(agg, result("s1", payload(G, value=1.0)), result("s2", payload(G, value=5.0), n=weight))
    assert np.allclose(out.params[G], 1.0) and set(out.meta["aggregation"]["rejected"]) == {"s2"}


def test_aggregator_bounds_a_huge_dataset_size_with_max_weight_share():
    agg = SharedKeyAggregator(DUAL, max_weight_share=0.5)
    out = aggregate_round(agg, result("s1", payload(G, value=1.0)), result("s2", payload(G, value=2.0)),
                          result("s3", payload(G, value=3.0), n=1e12))
    shares = out.meta["aggregation"]["accepted"]
    assert shares["s3"] == pytest.approx(0.5) and shares["s1"] == pytest.approx(0.25)
    assert np.allclose(out.params[G], 0.25 * 1 + 0.25 * 2 + 0.5 * 3)


def test_a_string_array_after_a_valid_key_leaves_no_partial_sum():
    agg = SharedKeyAggregator(DUAL)
    bad = {G: np.ones((4, 8), np.float32), GB: np.array([["a"] * 8] * 4)}
    good = payload(G, GB, value=2.0)
    out = aggregate_round(agg, result("s1", good), result("s2", bad), current=payload(G, GB, value=2.0))
    assert set(out.meta["aggregation"]["rejected"]) == {"s2"} and "not numeric" in \
        out.meta["aggregation"]["rejected"]["s2"]
    assert np.allclose(out.params[G], 2.0) and np.allclose(out.params[GB], 2.0)


def test_a_key_subset_first_does_not_become_the_schema():
    """Round 0 without a job schema: the layout the majority agrees on wins, whoever answers first."""
    agg = SharedKeyAggregator(DUAL, min_agree=2)
    out = aggregate_round(agg, result("s0", payload(G)), result("s1", payload(G, GB)), result("s2", payload(G, GB)))
    assert set(out.meta["aggregation"]["rejected"]) == {"s0"} and set(out.params) == {G, GB}
    nxt = aggregate_round(agg, result("s1", payload(G, GB)), result("s2", payload(G, GB)), current=out.params)
    assert not nxt.meta["aggregation"]["rejected"]  # the honest sites are accepted in the next round


def test_the_job_schema_and_fingerprint_are_checked_from_round_0():
    agg = SharedKeyAggregator(DUAL, schema={G: [4, 8], GB: [4, 8]}, fingerprint="fp")
    out = aggregate_round(agg, result("s1", payload(G, GB)), result("s2", payload(G)),
                          result("s3", payload(G, GB, shape=(2, 8))), result("s4", payload(G, GB), base_fingerprint="x"))
    rejected = out.meta["aggregation"]["rejected"]
    assert set(rejected) == {"s2", "s3", "s4"}
    assert "key set differs" in rejected["s2"] and "shape" in rejected["s3"] and "fingerprint" in rejected["s4"]


def test_aggregator_refuses_private_and_base_keys_and_second_results():
    agg = SharedKeyAggregator(DUAL)
    out = aggregate_round(agg, result("s1", payload(G)), result("s2", payload(G, L)), result("s3", payload(BASE)),
                          result("s1", payload(G)))
    rejected = out.meta["aggregation"]["rejected"]
    assert "does not share" in rejected["s2"] and "does not share" in rejected["s3"]
    assert "second result" in rejected["s1"] and out.meta["aggregation"]["accepted"] == {"s1": 1.0}


def test_robust_modes_and_clipping():
    vals = [1.0, 2.0, 3.0, 100.0]
    contribs = [Contribution(f"s{i}", {G: np.full((2, 2), v)}, 1.0) for i, v in enumerate(vals)]
    current = {G: np.full((2, 2), 2.0)}
    assert np.allclose(aggregate(contribs, AggregationRules("median", None), current).params[G], 2.5)
    assert np.allclose(aggregate(contribs, AggregationRules("trimmed_mean", None), current).params[G], 2.5)
    assert np.allclose(aggregate(contribs, AggregationRules("mean", None, clip_ratio=None), current).params[G], 26.5)
    # the default relative clip: s3's update (norm 196) is cut to 6 x the others' median update norm (2): +6 each
    assert np.allclose(aggregate(contribs, AggregationRules("mean", None), current).params[G], 3.5)
    clipped = aggregate(contribs, AggregationRules("mean", None, max_update_norm=1.0, clip_ratio=None), current)
    assert clipped.clipped == ["s3"]
    # ||g|| = 4 (four entries of 2); the update of s3 (98 per entry, norm 196) is scaled to norm 4: +2 per entry
    assert np.allclose(clipped.params[G], np.mean([1.0, 2.0, 3.0, 2.0 + 98 * 4 / 196]))
    assert cap_shares([1, 1, 1e12], 0.5) == pytest.approx([0.25, 0.25, 0.5])
    with pytest.raises(ValueError, match="robust_aggregation"):
        AggregationRules("mode")


def test_defaults_keep_plain_fedavg_for_honest_sites():
    rng = np.random.default_rng(0)
    data = [rng.normal(size=(3, 5)) for _ in range(3)]
    weights = [4.0, 10.0, 7.0]
    out = aggregate([Contribution(f"s{i}", {G: d}, w) for i, (d, w) in enumerate(zip(data, weights))],
                    AggregationRules(), {G: np.mean(data, 0)})
    assert np.allclose(out.params[G], sum(w * d for w, d in zip(weights, data)) / sum(weights), atol=1e-12)


# ---------------------------------------------------------------------------------------------- site config
def test_site_config_adds_the_allow_list_entry_keeps_site_additions_and_writes_policies(tmp_path):
    local = tmp_path / "local"
    written = install_site_config(local, privacy=privacy_config(DUAL), site_policy={"allow_job_code": False})
    resources = json.loads((local / "resources.json").read_text())
    allow_list = resources["class_allow_list"]
    assert set(RUNTIME_CLASSES) <= set(allow_list) and PACKAGE_PREFIX not in allow_list
    assert resources["class_list_enforcement_mode"] == "enforce"
    scope = json.loads((local / "privacy.json").read_text())["scopes"][0]
    assert scope["task_result_filters"][0]["args"]["sharing"]["method"] == "duallora"
    assert json.loads((local / "flare_duallora.json").read_text()) == {"allow_job_code": False}
    assert len(written) == 3
    resources["class_allow_list"] += ["my_site_lib.", PACKAGE_PREFIX]  # a site's own entry; the old broad one
    (local / "resources.json").write_text(json.dumps(resources))
    install_site_config(local)
    again = json.loads((local / "resources.json").read_text())["class_allow_list"]
    assert all(again.count(c) == 1 for c in RUNTIME_CLASSES) and "my_site_lib." in again
    assert PACKAGE_PREFIX not in again  # the package prefix is removed on upgrade
    with pytest.raises(SitePolicyError, match="unknown setting"):
        install_site_config(local, site_policy={"no_such_setting": 1})
