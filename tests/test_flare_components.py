"""Filter, aggregator and job builder, exercised with real nvflare objects (no network, no simulator)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.filter import ContentBlockedException
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel

from flare_duallora.flare.aggregator import SharedKeyAggregator
from flare_duallora.flare.filters import PrivateKeyFilter
from flare_duallora.flare.site_config import PACKAGE_PREFIX, install_site_config, privacy_config

G = "blocks.3.attn.qkv.lora_A.global.weight"
GB = "blocks.3.attn.qkv.lora_B.global.weight"
L = "blocks.3.attn.qkv.lora_A.local.weight"
BASE = "blocks.3.attn.qkv.base_layer.weight"
HEAD = "classification_head.weight"


def payload(*keys, value=1.0, shape=(4, 8)):
    return {k: np.full(shape, value, dtype=np.float32) for k in keys}


def run_filter(flt, data, meta=None):
    shareable = DXO(DataKind.WEIGHTS, data=data, meta=meta or {}).to_shareable()
    return from_shareable(flt.process(shareable, FLContext()))


def test_filter_strips_private_keys_and_keeps_shared():
    flt = PrivateKeyFilter("duallora", head="classification_head")
    out = run_filter(flt, payload(G, GB, L, HEAD))
    assert sorted(out.data) == sorted([G, GB, HEAD])


def test_filter_blocks_base_weights_and_private_in_block_mode():
    with pytest.raises(ContentBlockedException, match=r"frozen/base key\(s\).*base_layer"):
        run_filter(PrivateKeyFilter("duallora"), payload(G, BASE))
    with pytest.raises(ContentBlockedException, match=r"private key\(s\): .*lora_A\.local"):
        run_filter(PrivateKeyFilter("duallora", on_private="block"), payload(G, L))
    # FedSA keeps B at home, FFA never sends its frozen A
    with pytest.raises(ContentBlockedException, match="lora_B"):
        run_filter(PrivateKeyFilter("fedsa", on_private="block"), payload(G, GB))
    with pytest.raises(ContentBlockedException, match="lora_A"):
        run_filter(PrivateKeyFilter("ffa"), payload(G, GB))


def test_filter_can_strip_metrics_and_passes_metrics_dxos():
    flt = PrivateKeyFilter("duallora", strip_initial_metrics=True, strip_site_metrics=True)
    out = run_filter(flt, payload(G), meta={MetaKey.INITIAL_METRICS: {"a": 1}, "site_metrics": {"b": 2}})
    assert MetaKey.INITIAL_METRICS not in out.meta and "site_metrics" not in out.meta
    metrics = DXO(DataKind.METRICS, data={"personalised/balanced_accuracy": 0.7}).to_shareable()
    assert from_shareable(flt.process(metrics, FLContext())).data == {"personalised/balanced_accuracy": 0.7}


def test_filter_rejects_bad_settings():
    with pytest.raises(ValueError, match="setting 'method'"):
        PrivateKeyFilter("nope")
    with pytest.raises(ValueError, match="setting 'on_private'"):
        PrivateKeyFilter("duallora", on_private="maybe")


def contribution(site, params, n=10, steps=3):
    return FLModel(params=params, meta={"client_name": site, "num_examples": n, MetaKey.NUM_STEPS_CURRENT_ROUND: steps})


@pytest.mark.parametrize("weigh_by, expected", [("examples", (1 * 10 + 3 * 30) / 40), ("steps", (1 * 5 + 3 * 1) / 6),
                                                ("uniform", 2.0)])
def test_aggregator_weighted_average_of_shared_keys(weigh_by, expected):
    agg = SharedKeyAggregator("duallora", weigh_by=weigh_by)
    assert agg.accept_model(contribution("site-1", payload(G, GB, value=1.0), n=10, steps=5))
    assert agg.accept_model(contribution("site-2", payload(G, GB, value=3.0), n=30, steps=1))
    out = agg.aggregate_model()
    assert sorted(out.params) == sorted([G, GB])
    assert np.allclose(out.params[G], expected)
    assert set(out.meta["aggregation"]["accepted"]) == {"site-1", "site-2"}
    assert out.meta["aggregation"]["bytes_received"]["site-1"] == 2 * 4 * 8 * 4


def test_aggregator_rejects_private_keys_wrong_shapes_and_key_sets():
    agg = SharedKeyAggregator("duallora")
    assert agg.accept_model(contribution("site-1", payload(G, GB, value=1.0)))
    assert not agg.accept_model(contribution("site-2", payload(G, GB, L, value=9.0)))
    assert not agg.accept_model(contribution("site-3", {**payload(G, value=9.0), **payload(GB, shape=(2, 2))}))
    assert not agg.accept_model(contribution("site-4", payload(G, value=9.0)))
    out = agg.aggregate_model()
    rejected = out.meta["aggregation"]["rejected"]
    assert "lora_A.local" in rejected["site-2"] and "private" in rejected["site-2"]
    assert "wrong shape" in rejected["site-3"]
    assert "key set differs" in rejected["site-4"]
    assert np.allclose(out.params[G], 1.0)  # nothing of the rejected sites was averaged in
    # next round: shapes are pinned to the global model
    assert not agg.accept_model(contribution("site-1", payload(G, GB, shape=(3, 8))))
    kept = agg.aggregate_model()
    assert np.allclose(kept.params[G], 1.0)  # nothing accepted: the global model stays


def test_aggregator_rejects_base_weights_for_adapter_methods_but_not_full():
    agg = SharedKeyAggregator("fedit")
    assert not agg.accept_model(contribution("site-1", payload(G, BASE)))
    full = SharedKeyAggregator("full")
    assert full.accept_model(contribution("site-1", payload("blocks.3.attn.qkv.weight")))


def test_site_config_allow_list_and_privacy_scope(tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    (local / "resources.json.default").write_text(json.dumps({"format_version": 2, "class_allow_list": ["nvflare.x"]}))
    install_site_config(local, privacy=privacy_config("duallora", head="classification_head"))
    resources = json.loads((local / "resources.json").read_text())
    assert resources["class_allow_list"] == ["nvflare.x", PACKAGE_PREFIX]
    privacy = json.loads((local / "privacy.json").read_text())
    scope = privacy["scopes"][0]
    assert privacy["default_scope"] == scope["name"]
    flt = scope["task_result_filters"][0]
    assert flt["path"] == "flare_duallora.flare.filters.PrivateKeyFilter"
    assert PrivateKeyFilter(**flt["args"]).policy.method == "duallora"  # the scope's args build the filter
    # a second install keeps the site's list and does not duplicate our prefix
    install_site_config(local)
    assert json.loads((local / "resources.json").read_text())["class_allow_list"] == ["nvflare.x", PACKAGE_PREFIX]
