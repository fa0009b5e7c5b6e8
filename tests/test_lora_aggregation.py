"""LoRA aggregation modes: factors = FedAvg, svd exact up to rank r, fedex exact on every site (after the fold)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.networks.nets import ViT

from flare_duallora.engine import AdapterSettings, adapt
from flare_duallora.engine.aggregation import AggregationRules, Contribution, aggregate
from flare_duallora.engine.lora_aggregation import (
    add_residuals, aggregate_lora, aggregation_error, download_bytes, fold_residuals, lora_pairs, upload_bytes,
)
from flare_duallora.engine.state import delta_weight

TARGETS = r".*blocks\.\d+\.attn\.(qkv|out_proj)"
A, B = "m.lora_A.global.weight", "m.lora_B.global.weight"


def vit3d(seed: int = 0) -> ViT:
    torch.manual_seed(seed)
    return ViT(in_channels=2, img_size=(16, 16, 4), patch_size=(8, 8, 4), hidden_size=32, mlp_dim=64,
               num_layers=4, num_heads=4, classification=True, num_classes=3, post_activation=None)


def sites_from_one_init(method="fedit", n=3, scale=0.05, rank=4):
    """``n`` sites built from the same seed, each moved differently (as local training does)."""
    settings = AdapterSettings(method=method, target_modules=TARGETS, blocks="last:2", head="classification_head",
                               rank=rank, alpha=8.0)
    out = []
    for i in range(n):
        adapted = adapt(vit3d(), settings)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in adapted.trainable_parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale)
        out.append(adapted)
    return settings, out


def rel(x, y):
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


def exact_average(states, weights, pair):
    total = sum(weights.values())
    return sum(w / total * (states[s][pair.b_key].reshape(states[s][pair.b_key].shape[0], -1)
                            @ states[s][pair.a_key].reshape(states[s][pair.a_key].shape[0], -1))
               for s, w in weights.items())


def test_factors_reproduces_plain_weighted_averaging():
    _, sites = sites_from_one_init()
    states = {f"site-{i}": {k: v.numpy() for k, v in s.shared_state().items()} for i, s in enumerate(sites)}
    weights = {"site-0": 8.0, "site-1": 64.0, "site-2": 20.0}
    ours = aggregate_lora(states, weights, "factors")
    plain = aggregate([Contribution(s, {k: v.astype(np.float64) for k, v in p.items()}, weights[s])
                       for s, p in states.items()], AggregationRules(reject_ratio=None, clip_ratio=None,
                                                                          max_weight_share=None))
    assert set(ours.state) == set(plain.params) and not ours.residuals
    for k, v in plain.params.items():
        assert np.allclose(ours.state[k], v, rtol=0, atol=1e-12), k
    assert ours.shares == pytest.approx({"site-0": 8 / 92, "site-1": 64 / 92, "site-2": 20 / 92})


@pytest.mark.parametrize("case", ["each_site_rank_2", "same_input_space"])
def test_svd_equals_the_exact_average_when_the_stacked_rank_is_at_most_r(case):
    g = np.random.default_rng(0)
    r, d_in, d_out = 4, 32, 96
    shared_a = g.normal(size=(r, d_in))
    states = {}
    for k in range(2):
        a, b = g.normal(size=(r, d_in)), g.normal(size=(d_out, r))
        if case == "each_site_rank_2":
            b[:, 2:] = 0.0  # rank(B_k A_k) = 2: stacked rank 4 = r
        else:
            a = g.normal(size=(r, r)) @ shared_a  # same input space, other basis: stacked rank <= r
        states[f"s{k}"] = {A: a.astype(np.float32), B: b.astype(np.float32), "head.weight": g.normal(size=(3, 8))}
    weights = {"s0": 3.0, "s1": 1.0}
    result = aggregate_lora(states, weights, "svd")
    pair = lora_pairs(states["s0"])["m.global"]
    assert result.state[A].shape == (r, d_in) and result.state[B].shape == (d_out, r)  # the download stays rank r
    assert rel(result.state[B] @ result.state[A], exact_average(states, weights, pair)) < 1e-5
    assert aggregation_error(states, weights, "svd")["m.global"] < 1e-5
    assert aggregation_error(states, weights, "factors")["m.global"] > 1e-2  # while averaging factors is not exact


def test_svd_truncates_to_the_best_rank_r_and_keeps_no_dead_component():
    g = np.random.default_rng(1)
    states = {f"s{k}": {A: g.normal(size=(4, 20)), B: g.normal(size=(30, 4))} for k in range(3)}
    weights = {s: 1.0 for s in states}
    pair = lora_pairs(states["s0"])["m.global"]
    exact = exact_average(states, weights, pair)
    sv = np.linalg.svd(exact, compute_uv=False)
    best = np.sqrt((sv[4:] ** 2).sum()) / np.linalg.norm(exact)  # Eckart-Young
    assert aggregation_error(states, weights, "svd")["m.global"] == pytest.approx(best, rel=1e-9)
    # nothing trained yet (B = 0 everywhere): the product is 0, B stays 0 and every A row keeps a direction
    zero = {s: {A: v[A], B: np.zeros_like(v[B])} for s, v in states.items()}
    out = aggregate_lora(zero, weights, "svd")
    assert np.all(out.state[B] == 0) and np.all(np.linalg.norm(out.state[A], axis=1) > 0)


@pytest.mark.parametrize("method", ["fedit", "duallora"])
def test_fedex_gives_every_site_the_exact_average_of_the_products(method):
    settings, sites = sites_from_one_init(method)
    names = [f"site-{i}" for i in range(len(sites))]
    states = {n: s.shared_state() for n, s in zip(names, sites)}
    weights = {"site-0": 1.0, "site-1": 2.0, "site-2": 5.0}
    s = settings.alpha_of("global") / settings.rank_of("global")
    result = aggregate_lora(states, weights, "fedex", scaling=s)
    pairs = result.pairs
    assert pairs and set(result.residuals) == {p.base_key for p in pairs.values()}
    np_states = {n: {k: v.numpy().astype(np.float64) for k, v in st.items()} for n, st in states.items()}
    base0 = {k: v.clone() for k, v in sites[0].net.state_dict().items() if ".base_layer." in k}  # W0, same everywhere
    for adapted in sites:
        adapted.load_shared({k: torch.as_tensor(v) for k, v in result.state.items()})
        fold_residuals(adapted.net, result.residuals)
        layers = dict(adapted.net.named_modules())
        for pair in pairs.values():
            layer = layers[pair.module]
            effective = (layer.get_base_layer().weight - base0[pair.base_key]) + delta_weight(layer, "global")
            exact = s * exact_average(np_states, weights, pair)
            assert rel(effective.detach().double().numpy(), exact) < 1e-5, pair.layer
    assert max(aggregation_error(states, weights, "fedex", scaling=s).values()) < 1e-9
    # a residual of the wrong size, or for a weight the network lacks, changes nothing and says so
    key = next(iter(result.residuals))
    before = sites[0].net.state_dict()[key].clone()
    with pytest.raises(ValueError, match="does not fit"):
        fold_residuals(sites[0].net, {key: np.zeros(3)})
    with pytest.raises(KeyError, match="does not have"):
        fold_residuals(sites[0].net, {key: result.residuals[key], "nope.weight": np.zeros(3)})
    assert torch.equal(sites[0].net.state_dict()[key], before)


def test_bytes_per_round_fedex_adds_the_dense_residuals_svd_stays_rank_r():
    settings, sites = sites_from_one_init("fedit", n=2)
    states = {f"s{i}": a.shared_state() for i, a in enumerate(sites)}
    weights = {"s0": 1.0, "s1": 1.0}
    sizes = {}
    for mode in ("factors", "svd", "fedex"):
        sizes[mode] = download_bytes(aggregate_lora(states, weights, mode, scaling=2.0))
    assert sizes["svd"] == sizes["factors"] == upload_bytes(states["s0"])
    # 2 adapted blocks x (qkv 96x32 + out_proj 32x32) dense residuals in float32
    assert sizes["fedex"] - sizes["factors"] == 2 * (96 * 32 + 32 * 32) * 4


def test_conv_adapters_and_layers_without_a_shared_pair():
    from monai.networks.nets import DenseNet121

    def site(seed):
        torch.manual_seed(0)
        net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2, init_features=8, growth_rate=4,
                          block_config=(2, 2))
        adapted = adapt(net, AdapterSettings(method="fedit", target_modules=r".*denseblock2\.denselayer2\.layers\.conv[12]",
                                             head="class_layers.out", rank=2))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in adapted.trainable_parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        return adapted

    sites = [site(1), site(2)]
    states = {f"s{i}": a.shared_state() for i, a in enumerate(sites)}
    weights = {"s0": 1.0, "s1": 3.0}
    result = aggregate_lora(states, weights, "fedex", scaling=1.0)
    for key, res in result.residuals.items():
        assert res.shape == tuple(sites[0].net.state_dict()[key].shape)  # conv residuals shaped like the kernel
    assert max(aggregation_error(states, weights, "fedex", scaling=1.0).values()) < 1e-9
    # FFA-LoRA shares B only (A frozen, identical): no product to form, the factors are averaged, no residual
    only_b = {s: {k: v for k, v in st.items() if ".lora_A." not in k} for s, st in states.items()}
    for mode in ("svd", "fedex"):
        out = aggregate_lora(only_b, weights, mode, scaling=1.0)
        assert not out.pairs and not out.residuals
        plain = aggregate_lora(only_b, weights, "factors")
        assert all(np.array_equal(out.state[k], plain.state[k]) for k in plain.state)


def test_bad_input_is_refused_naming_the_problem():
    st = {A: np.ones((2, 4)), B: np.ones((3, 2))}
    with pytest.raises(ValueError, match="lora_aggregation"):
        aggregate_lora({"a": st}, {"a": 1.0}, "mean")
    with pytest.raises(ValueError, match="scaling"):
        aggregate_lora({"a": st}, {"a": 1.0}, "fedex")
    with pytest.raises(ValueError, match="finite and > 0"):
        aggregate_lora({"a": st}, {"a": 0.0})
    with pytest.raises(ValueError, match="other keys"):
        aggregate_lora({"a": st, "b": {A: st[A]}}, {"a": 1.0, "b": 1.0})
    with pytest.raises(ValueError, match="shape"):
        aggregate_lora({"a": st, "b": {A: np.ones((2, 5)), B: st[B]}}, {"a": 1.0, "b": 1.0})
    total = add_residuals({}, {"w": np.ones(2)})
    assert np.array_equal(add_residuals(total, {"w": np.ones(2)})["w"], [2.0, 2.0])


def test_bench_aggregation_table_reports_bytes_and_error_per_mode():
    from flare_duallora.bench.comm import TINY_CMR, aggregation_table

    rows = aggregation_table(TINY_CMR, TINY_CMR, methods=("fedit", "ffa"), lrs=(1e-2,), n_sites=2, steps=3)
    by_mode = {r["lora_aggregation"]: r for r in rows}
    assert [r["method"] for r in rows] == ["fedit"] * 3  # FFA shares B only: no product to aggregate
    assert by_mode["svd"]["down_bytes_per_site"] == by_mode["factors"]["down_bytes_per_site"]
    assert by_mode["fedex"]["down_bytes_per_site"] > by_mode["factors"]["down_bytes_per_site"]
    assert by_mode["fedex"]["rel_error_max"] < 1e-9 < by_mode["factors"]["rel_error_median"]
    assert "2 sites x 3 Adam steps" in rows[0]["error_measured_on"]
