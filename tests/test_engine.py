"""The adapter engine on real MONAI networks: roles, gradients, shared state, penalty, export, bad input."""

from __future__ import annotations

import re

import pytest
import torch
from monai.networks.nets import ViT, DenseNet121

from flare_duallora.engine import (
    FROZEN,
    PRIVATE,
    SHARED,
    AdapterSettings,
    StateError,
    adapt,
    orthogonality_penalty,
    pair_penalty,
)

METHODS = ["duallora", "fedopal", "fedit", "ffa", "fedsa", "local", "full"]
VIT_TARGETS = r".*blocks\.\d+\.attn\.(qkv|out_proj)"


def vit3d(seed: int = 0) -> ViT:
    torch.manual_seed(seed)
    return ViT(in_channels=2, img_size=(16, 16, 4), patch_size=(8, 8, 4), hidden_size=32, mlp_dim=64,
               num_layers=4, num_heads=4, classification=True, num_classes=3, post_activation=None)


def vit2d(seed: int = 0) -> ViT:
    torch.manual_seed(seed)
    return ViT(in_channels=3, img_size=(16, 16), patch_size=(8, 8), hidden_size=32, mlp_dim=64, num_layers=3,
               num_heads=4, classification=True, num_classes=4, post_activation=None, spatial_dims=2)


def logits(net, x):
    out = net(x)
    return out[0] if isinstance(out, tuple) else out


def settings(method: str, **kw) -> AdapterSettings:
    base = dict(method=method, target_modules=VIT_TARGETS, blocks="last:2", head="classification_head", rank=4)
    base.update(kw)
    return AdapterSettings(**base)


def perturb_trainables(adapted, scale=0.1, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapted.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("method", METHODS)
def test_injected_output_equals_base_at_init(method):
    net = vit3d()
    x = torch.randn(2, 2, 16, 16, 4)
    ref = logits(net, x).detach()
    adapted = adapt(net, settings(method))
    assert torch.allclose(logits(adapted.net, x), ref, atol=1e-6)


EXPECTED_SHARED = {
    "duallora": r"(\.lora_[AB]\.global\.|^classification_head\.)",
    "fedopal": r"(\.lora_[AB]\.global\.|^classification_head\.)",
    "fedit": r"(\.lora_[AB]\.global\.|^classification_head\.)",
    "ffa": r"(\.lora_B\.global\.|^classification_head\.)",
    "fedsa": r"(\.lora_A\.global\.|^classification_head\.)",
    "local": r"^$",
}


@pytest.mark.parametrize("method", sorted(EXPECTED_SHARED))
def test_shared_state_holds_exactly_the_method_keys(method):
    adapted = adapt(vit3d(), settings(method))
    keys = list(adapted.shared_state())
    all_keys = list(adapted.net.state_dict())
    expected = [k for k in all_keys if re.search(EXPECTED_SHARED[method], k)]
    assert sorted(keys) == sorted(expected)
    assert not any(".base_layer." in k for k in keys)
    assert not any(k.startswith("blocks.") and ".lora_" not in k for k in keys)
    if method in ("duallora", "fedopal"):
        assert adapted.private_keys and all(".local." in k for k in adapted.private_keys)
    if method == "fedsa":
        assert all(".lora_B." in k for k in adapted.private_keys)


def test_full_method_shares_every_parameter_and_no_buffer():
    net = DenseNet121(spatial_dims=2, in_channels=3, out_channels=2, init_features=8, growth_rate=4,
                      block_config=(2, 2))
    adapted = adapt(net, AdapterSettings(method="full", head="class_layers.out"))
    params = {n for n, _ in net.named_parameters()}
    assert set(adapted.shared_keys) == params
    assert all("running_" in k or "num_batches" in k for k in adapted.private_keys)


@pytest.mark.parametrize("method", ["duallora", "fedopal", "fedit", "ffa", "fedsa", "local"])
def test_requires_grad_and_gradient_flow(method):
    adapted = adapt(vit3d(), settings(method))
    roles = adapted.roles()
    for name, p in adapted.net.named_parameters():
        assert p.requires_grad == (roles[name] in (SHARED, PRIVATE)), name
    if method == "ffa":
        assert all(not p.requires_grad for n, p in adapted.net.named_parameters() if ".lora_A." in n)
    perturb_trainables(adapted)  # B = 0 at init would hide gradients of A
    x = torch.randn(3, 2, 16, 16, 4)
    loss = logits(adapted.net, x).pow(2).sum()
    reg = adapted.regularizer()
    if reg is not None:
        loss = loss + reg
    loss.backward()
    for name, p in adapted.net.named_parameters():
        if roles[name] == FROZEN:
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    if method in ("duallora", "fedopal"):
        grads = {n for n, p in adapted.net.named_parameters() if p.grad is not None}
        assert any(".lora_A.global." in n for n in grads) and any(".lora_A.local." in n for n in grads)


def test_same_seed_gives_identical_shared_init_on_every_site():
    a = adapt(vit3d(), settings("duallora", seed=7)).shared_state()
    b = adapt(vit3d(), settings("duallora", seed=7)).shared_state()
    c = adapt(vit3d(), settings("duallora", seed=8)).shared_state()
    lora = [k for k in a if ".lora_A." in k]
    assert all(torch.equal(a[k], b[k]) for k in lora)
    assert not all(torch.equal(a[k], c[k]) for k in lora)


def test_load_shared_touches_only_shared_keys():
    site = adapt(vit3d(), settings("duallora"))
    perturb_trainables(site)
    private_before = site.private_state()
    other = adapt(vit3d(), settings("duallora"))
    perturb_trainables(other, seed=5)
    site.load_shared(other.shared_state())
    for k, v in site.shared_state().items():
        assert torch.equal(v, other.shared_state()[k])
    for k, v in site.private_state().items():
        assert torch.equal(v, private_before[k])


def test_load_shared_refuses_private_keys_wrong_shapes_and_missing_keys():
    site = adapt(vit3d(), settings("duallora"))
    payload = site.shared_state()
    with pytest.raises(StateError, match=r"refused 1 private key\(s\): .*lora_A\.local"):
        site.load_shared({**payload, site.private_keys[0]: site.private_state()[site.private_keys[0]]})
    key = next(k for k in payload if ".lora_A." in k)
    with pytest.raises(StateError, match=rf"wrong shape .*{re.escape(key)}"):
        site.load_shared({**payload, key: torch.zeros(1, 2)})
    with pytest.raises(StateError, match="missing 1 key"):
        site.load_shared({k: v for k, v in payload.items() if k != key})
    with pytest.raises(StateError, match="unknown to the network: nope"):
        site.load_shared({**payload, "nope": torch.zeros(1)})
    base_key = next(k for k in site.net.state_dict() if ".base_layer." in k)
    with pytest.raises(StateError, match="frozen"):
        site.load_shared({**payload, base_key: site.net.state_dict()[base_key]})


def test_private_state_round_trip():
    site = adapt(vit3d(), settings("fedsa"))
    perturb_trainables(site)
    saved = site.private_state()
    fresh = adapt(vit3d(), settings("fedsa"))
    fresh.load_private(saved)
    assert all(torch.equal(fresh.private_state()[k], v) for k, v in saved.items())


def test_orthogonality_penalty_zero_for_orthogonal_rows_positive_otherwise():
    q, _ = torch.linalg.qr(torch.randn(16, 16))
    a_g, a_l = q[:4].clone(), q[4:8].clone()  # mutually orthogonal rows
    b = torch.randn(10, 4)
    for mode in ("A", "AB", "delta"):
        zero = pair_penalty(a_g, b, a_l, torch.zeros(10, 4) if mode == "AB" else b, mode)
        assert float(zero) == pytest.approx(0.0, abs=1e-10)
    a_l2 = a_l + 0.3 * a_g
    for mode in ("A", "AB", "delta"):
        assert float(pair_penalty(a_g, b, a_l2, b, mode)) > 1e-3
    # A^T A-style (d x d) would vanish only if a factor is 0: check we do not compute that
    assert float(pair_penalty(a_g, b, a_l, b, "A")) == pytest.approx(0.0, abs=1e-10)


def test_orthogonality_penalty_gradient_matches_closed_form():
    a_g = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    a_l = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    b_g, b_l = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    pair_penalty(a_g, b_g, a_l, b_l, "A").backward()
    with torch.no_grad():
        m = a_g @ a_l.T
        assert torch.allclose(a_g.grad, 2 * m @ a_l)
        assert torch.allclose(a_l.grad, 2 * m.T @ a_g)
    # delta mode against its definition on explicit d_out x d_in updates
    dg, dl = b_g @ a_g.detach(), b_l @ a_l.detach()
    direct = (dg @ dl.T).pow(2).sum() / (dg.pow(2).sum() * dl.pow(2).sum())
    fast = pair_penalty(a_g.detach(), b_g, a_l.detach(), b_l, "delta")
    assert torch.allclose(direct, fast)
    assert torch.autograd.gradcheck(lambda x: pair_penalty(x, b_g, a_l.detach(), b_l, "delta"), (a_g.detach().requires_grad_(),))


def test_fedopal_regularizer_on_network_is_lambda_times_penalty():
    adapted = adapt(vit3d(), settings("fedopal", orth_lambda=0.5, orth_mode="A"))
    pen = orthogonality_penalty(adapted.net, "A")
    assert float(pen) > 0  # random A_g, A_l from different seeds are not orthogonal
    assert torch.allclose(adapted.regularizer(), 0.5 * pen)
    assert adapt(vit3d(), settings("duallora")).regularizer() is None


@pytest.mark.parametrize("method", ["duallora", "fedsa", "ffa", "full"])
def test_export_round_trip_loads_strictly_into_plain_network(method):
    adapted = adapt(vit3d(), settings(method))
    perturb_trainables(adapted)
    x = torch.randn(2, 2, 16, 16, 4)
    personalised = logits(adapted.net, x).detach()
    plain = vit3d(seed=123)
    plain.load_state_dict(adapted.export("personalised"), strict=True)
    assert torch.allclose(logits(plain, x), personalised, atol=1e-5)
    with adapted.private_adapters_disabled():
        global_only = logits(adapted.net, x).detach()
    plain.load_state_dict(adapted.export("global"), strict=True)
    assert torch.allclose(logits(plain, x), global_only, atol=1e-5)
    assert torch.allclose(logits(adapted.net, x), personalised)  # the context restored the private adapters
    if method in ("duallora", "fedsa"):
        assert not torch.allclose(global_only, personalised, atol=1e-4)


def test_plain_checkpoint_loads_into_injected_network():
    pretrained = vit3d(seed=42)
    x = torch.randn(2, 2, 16, 16, 4)
    adapted = adapt(vit3d(seed=0), settings("duallora"))
    adapted.load_base_checkpoint(pretrained.state_dict())
    assert torch.allclose(logits(adapted.net, x), logits(pretrained, x), atol=1e-6)
    assert any(".base_layer." in k for k in adapted.net.state_dict())
    broken = dict(pretrained.state_dict())
    broken.pop("blocks.3.attn.qkv.weight")
    with pytest.raises(StateError, match=r"missing 1: blocks\.3\.attn\.qkv\.weight"):
        adapted.load_base_checkpoint(broken, source="model.pt")


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(target_modules=r".*nothing_like_this"), "setting 'target_modules'"),
        (dict(rank=0), "setting 'rank'"),
        (dict(rank=-2), "setting 'rank'"),
        (dict(method="fedfoo"), "setting 'method'"),
        (dict(blocks=[7]), "setting 'blocks'"),
        (dict(blocks="middle"), "setting 'blocks'"),
        (dict(head="no_such_head"), "setting 'head'"),
        (dict(orth_mode="B"), "setting 'orth_mode'"),
    ],
)
def test_bad_settings_raise_naming_the_setting(kw, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        adapt(vit3d(), settings(kw.pop("method", "duallora"), **kw))


def test_vit_2d_and_list_targets():
    net = vit2d()
    x = torch.randn(2, 3, 16, 16)
    ref = logits(net, x).detach()
    adapted = adapt(net, AdapterSettings(method="duallora", target_modules=["qkv", "out_proj", "linear1"],
                                         blocks=[2], head="classification_head", rank=2))
    assert adapted.targets == ["blocks.2.mlp.linear1", "blocks.2.attn.out_proj", "blocks.2.attn.qkv"]
    assert torch.allclose(logits(adapted.net, x), ref, atol=1e-6)


def test_densenet_conv_lora():
    torch.manual_seed(0)
    net = DenseNet121(spatial_dims=3, in_channels=1, out_channels=2, init_features=8, growth_rate=4,
                      block_config=(2, 2, 2, 2))
    net.eval()
    x = torch.randn(2, 1, 32, 32, 32)
    ref = net(x).detach()
    adapted = adapt(net, AdapterSettings(method="fedopal", target_modules=r".*denseblock4\.denselayer2\.layers\.conv[12]",
                                         head="class_layers.out", rank=2))
    assert len(adapted.targets) == 2
    assert torch.allclose(adapted.net(x), ref, atol=1e-6)
    perturb_trainables(adapted)
    assert float(adapted.regularizer()) > 0
    plain = DenseNet121(spatial_dims=3, in_channels=1, out_channels=2, init_features=8, growth_rate=4,
                        block_config=(2, 2, 2, 2)).eval()
    plain.load_state_dict(adapted.export(), strict=True)
    assert torch.allclose(plain(x), adapted.net(x), atol=1e-5)
