"""FedOPAL penalties: scale invariance of the default, `delta` active after one step, the representation variant,
the calibrated weight, and hooks only when they are needed."""

from __future__ import annotations

import math

import pytest
import torch
from monai.networks.nets import ViT
from peft.tuners.lora import LoraLayer

from flare_duallora.engine import AdapterSettings, adapt
from flare_duallora.engine.orthogonal import (
    MODES, BranchRecorder, chance_level, dual_layers, orthogonality_penalty, pair_penalty, representation_penalty,
)

TARGETS = r".*blocks\.\d+\.attn\.(qkv|out_proj)"


def vit3d(seed: int = 0) -> ViT:
    torch.manual_seed(seed)
    return ViT(in_channels=2, img_size=(16, 16, 4), patch_size=(8, 8, 4), hidden_size=32, mlp_dim=64,
               num_layers=4, num_heads=4, classification=True, num_classes=3, post_activation=None)


def fedopal(**kw):
    base = dict(method="fedopal", target_modules=TARGETS, blocks="last:2", head="classification_head", rank=4)
    base.update(kw)
    return adapt(vit3d(), AdapterSettings(**base))


def logits(net, x):
    out = net(x)
    return out[0] if isinstance(out, tuple) else out


def perturb(adapted, scale=0.1, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapted.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def rescale_local(adapted, c: float):
    """A_l * c, B_l / c: the network computes exactly the same function."""
    with torch.no_grad():
        for _, layer in dual_layers(adapted.net):
            layer.lora_A["local"].weight.mul_(c)
            layer.lora_B["local"].weight.div_(c)


def x_batch(n=8, seed=3):
    return torch.randn(n, 2, 16, 16, 4, generator=torch.Generator().manual_seed(seed))


def penalty_of(adapted, x):
    """The regularizer after a training forward pass (the repr mode reads that pass)."""
    logits(adapted.net, x)
    return adapted.regularizer()


def test_default_mode_is_scale_free_and_calibrated():
    s = AdapterSettings(method="fedopal")
    assert s.orth_mode == "subspace" and s.orth_lambda == "auto" and s.orth_share == 0.1


@pytest.mark.parametrize("mode", ["subspace", "cosine", "delta", "repr"])
@pytest.mark.parametrize("c", [100.0, 0.01])
def test_penalty_unchanged_when_local_A_scaled_by_c_and_B_by_one_over_c(mode, c):
    adapted = fedopal(orth_mode=mode)
    perturb(adapted)
    x = x_batch()
    before_out = logits(adapted.net, x).detach()
    before = float(penalty_of(adapted, x).detach())
    rescale_local(adapted, c)
    assert torch.allclose(logits(adapted.net, x), before_out, atol=1e-5)  # same function
    after = float(penalty_of(adapted, x).detach())
    assert before > 0
    assert after == pytest.approx(before, rel=1e-6)


def test_legacy_A_mode_is_not_scale_free():
    """The issue's finding, kept visible: A_l * 0.01, B_l * 100 lowers the raw A penalty 10^4 times."""
    adapted = fedopal(orth_mode="A", orth_lambda=1.0)
    perturb(adapted)
    before = float(adapted.regularizer())
    rescale_local(adapted, 0.01)
    assert float(adapted.regularizer()) == pytest.approx(before * 1e-4, rel=1e-4)


def test_subspace_mode_is_the_principal_angles_and_ignores_any_reparametrisation():
    g = torch.Generator().manual_seed(0)
    a_g, a_l = torch.randn(4, 20, generator=g, dtype=torch.float64), torch.randn(3, 20, generator=g, dtype=torch.float64)
    b_g, b_l = torch.randn(7, 4, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g, dtype=torch.float64)
    q_g, _ = torch.linalg.qr(a_g.T)
    q_l, _ = torch.linalg.qr(a_l.T)
    cos = torch.linalg.svdvals(q_g.T @ q_l)  # cosines of the principal angles
    value = pair_penalty(a_g, b_g, a_l, b_l, "subspace")
    assert float(value) == pytest.approx(float(cos.pow(2).sum() / 3), rel=1e-9)
    m = torch.randn(3, 3, generator=g, dtype=torch.float64) + 3 * torch.eye(3, dtype=torch.float64)
    moved = pair_penalty(a_g, b_g, m @ a_l, b_l @ torch.linalg.inv(m), "subspace")
    assert float(moved) == pytest.approx(float(value), rel=1e-9)
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    assert float(pair_penalty(q[:4], b_g, q[4:7], b_l, "subspace")) == pytest.approx(0.0, abs=1e-12)
    assert float(pair_penalty(a_g, b_g, a_g[:3], b_l, "subspace")) == pytest.approx(1.0, rel=1e-9)  # contained


def test_delta_is_zero_at_init_and_active_after_one_optimiser_step():
    adapted = fedopal(orth_mode="delta")
    x, y = x_batch(), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    reg0 = adapted.regularizer()
    assert float(reg0) == 0.0  # B = 0: dW = 0
    opt = torch.optim.Adam(adapted.trainable_parameters(), lr=1e-3)
    loss = torch.nn.functional.cross_entropy(logits(adapted.net, x), y) + reg0
    loss.backward()
    opt.step()
    opt.zero_grad()
    reg1 = adapted.regularizer()
    assert float(reg1) > 1e-3
    reg1.backward()
    for _, layer in dual_layers(adapted.net):
        for factor in (layer.lora_A["local"], layer.lora_B["local"]):
            assert factor.weight.grad is not None and float(factor.weight.grad.abs().sum()) > 0
        for factor in (layer.lora_A["global"], layer.lora_B["global"]):  # detached: the data alone moves them
            assert factor.weight.grad is None or float(factor.weight.grad.abs().sum()) == 0


def test_delta_eps_is_relative_tiny_updates_are_not_clipped():
    g = torch.Generator().manual_seed(1)
    a_g, a_l = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    b_g, b_l = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    ref = float(pair_penalty(a_g, b_g, a_l, b_l, "delta"))
    tiny = float(pair_penalty(a_g, 1e-5 * b_g, a_l, 1e-5 * b_l, "delta"))  # the first steps' B
    assert ref > 1e-3 and tiny == pytest.approx(ref, rel=1e-6)


def test_representation_penalty_zero_for_uncorrelated_codes_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(64, 64, generator=g, dtype=torch.float64)
    m[:, 0] = 1.0
    q, _ = torch.linalg.qr(m)
    q = q[:, 1:]  # orthonormal columns, each orthogonal to the constant vector: zero-mean columns
    z_g, z_l = q[:, :4] * 3.0 + 5.0, q[:, 4:7] * 0.2 - 1.0  # scaled and offset: still uncorrelated
    assert float(representation_penalty(z_g, z_l)) == pytest.approx(0.0, abs=1e-12)
    z_l2 = z_l + 0.5 * q[:, :3]
    assert float(representation_penalty(z_g, z_l2)) > 1e-3
    assert float(representation_penalty(z_g, z_g[:, :2])) == pytest.approx(2 / 8)  # 2 of 4 x 2 pairs correlate fully


def test_representation_variant_on_the_network_zero_for_orthogonal_branches_and_gradient_reaches_local_only():
    adapted = fedopal(orth_mode="repr", blocks=[3], target_modules=r".*blocks\.\d+\.attn\.qkv")
    (name, layer), = list(dual_layers(adapted.net))
    x = x_batch(n=16)
    reg = penalty_of(adapted, x)
    assert float(reg) > 0
    reg.backward()
    grad = layer.lora_A["local"].weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0
    shared = layer.lora_A["global"].weight.grad
    assert shared is None or float(shared.abs().sum()) == 0  # the shared adapter enters detached (issue 17, M2)
    joint = BranchRecorder(adapted.net, shared_gradient=True)
    layer.lora_A["global"].weight.grad = None
    logits(adapted.net, x)
    joint.penalty().backward()
    assert float(layer.lora_A["global"].weight.grad.abs().sum()) > 0  # the paper's joint gradient, on request
    joint.remove()
    # make the branches orthogonal on this batch: A_l's rows orthogonal to S A_g^T (S: the layer's token covariance)
    seen = {}
    handle = layer.lora_A["global"].register_forward_hook(lambda m, i, o: seen.update(x=i[0].detach()))
    with torch.no_grad():
        logits(adapted.net, x)
    handle.remove()
    t = seen["x"].reshape(-1, seen["x"].shape[-1]).double()
    t = t - t.mean(0)
    u = (t.T @ t) @ layer.lora_A["global"].weight.detach().double().T  # d x r_g
    qu, _ = torch.linalg.qr(u)
    a_l = layer.lora_A["local"].weight.detach().double()
    with torch.no_grad():
        layer.lora_A["local"].weight.copy_((a_l - (a_l @ qu) @ qu.T).float())
    zero = penalty_of(adapted, x)
    assert float(zero) < 1e-6 * float(reg)


def test_hooks_exist_only_for_the_representation_mode():
    def hooked(adapted):
        return sum(len(m._forward_hooks) for m in adapted.net.modules())

    assert hooked(fedopal()) == 0
    assert hooked(fedopal(orth_mode="delta")) == 0
    assert hooked(adapt(vit3d(), AdapterSettings(method="duallora", target_modules=TARGETS, blocks="last:2",
                                                 head="classification_head", orth_mode="repr"))) == 0
    assert hooked(fedopal(orth_mode="repr", orth_lambda=0)) == 0
    repr_net = fedopal(orth_mode="repr")
    assert hooked(repr_net) == 2 * 4  # 2 adapters x 4 adapted layers
    with torch.no_grad():
        logits(repr_net.net, x_batch())
    assert repr_net.regularizer() is None  # evaluation passes are not recorded


def test_calibrated_lambda_makes_the_penalty_a_tenth_of_ln_k_at_init():
    adapted = fedopal()
    assert adapted.num_classes() == 3
    assert adapted.orth_lambda == pytest.approx(0.1 * math.log(3))
    share = float(adapted.regularizer()) / math.log(3)
    assert 0.05 < share < 0.2  # ~1 x chance at init; the exact value is a draw of the seeded init
    for mode in ("A", "AB"):  # legacy modes: calibrated on their exact value at injection
        legacy = fedopal(orth_mode=mode)
        assert float(legacy.regularizer()) == pytest.approx(0.1 * math.log(3), rel=1e-6)
    assert fedopal(orth_lambda=0.3).orth_lambda == 0.3
    assert fedopal(orth_share=0.5).orth_lambda == pytest.approx(0.5 * math.log(3))


@pytest.mark.parametrize("mode", ["subspace", "cosine", "delta"])
def test_scale_free_modes_are_near_one_at_random_initialisation(mode):
    """Normalised to chance: the mean over many independent random pairs is ~1."""
    g = torch.Generator().manual_seed(0)
    d, r = 48, 4
    vals = []
    for _ in range(150):
        a_g, a_l = (torch.rand(r, d, generator=g) - 0.5, torch.rand(r, d, generator=g) - 0.5)
        b_g, b_l = torch.randn(10, r, generator=g), torch.randn(10, r, generator=g)
        vals.append(float(pair_penalty(a_g, b_g, a_l, b_l, mode)) / chance_level(mode, d, r, r))
    assert sum(vals) / len(vals) == pytest.approx(1.0, abs=0.15)  # standard error ~0.03


def test_branch_recorder_can_be_removed_and_penalty_rejects_repr_without_forward():
    adapted = fedopal(orth_mode="repr")
    with pytest.raises(ValueError, match="BranchRecorder"):
        orthogonality_penalty(adapted.net, "repr")
    rec = BranchRecorder(adapted.net)
    logits(adapted.net, x_batch())
    assert rec.recorded == 4
    rec.remove()
    assert rec.recorded == 0


@pytest.mark.parametrize("kw, message", [
    (dict(orth_lambda=-1.0), "setting 'orth_lambda'"),
    (dict(orth_lambda="big"), "setting 'orth_lambda'"),
    (dict(orth_share=0.0), "setting 'orth_share'"),
    (dict(orth_mode="rows"), "setting 'orth_mode'"),
])
def test_bad_orth_settings_name_the_setting(kw, message):
    with pytest.raises(ValueError, match=message):
        AdapterSettings(method="fedopal", **kw)


def test_every_mode_runs_on_conv_adapters():
    from monai.networks.nets import DenseNet121

    torch.manual_seed(0)
    for mode in MODES:
        adapted = adapt(DenseNet121(spatial_dims=2, in_channels=1, out_channels=2, init_features=8, growth_rate=4,
                                    block_config=(2, 2)),
                        AdapterSettings(method="fedopal", target_modules=r".*denseblock2\.denselayer2\.layers\.conv[12]",
                                        head="class_layers.out", rank=2, orth_mode=mode))
        perturb(adapted)
        adapted.net.train()
        out = adapted.net(torch.randn(2, 1, 16, 16))
        reg = adapted.regularizer()
        assert reg is not None and torch.isfinite(reg) and float(reg) > 0, mode
        (out.sum() + reg).backward()
        layer = next(m for m in adapted.net.modules() if isinstance(m, LoraLayer))
        assert float(layer.lora_A["local"].weight.grad.abs().sum()) > 0, mode


@pytest.mark.parametrize("mode", ["subspace", "repr"])
def test_penalty_under_autocast_is_computed_in_full_precision(mode):
    adapted = fedopal(orth_mode=mode)
    perturb(adapted)
    x = x_batch()
    logits(adapted.net, x)
    reference = float(adapted.regularizer().detach())
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        logits(adapted.net, x)
        reg = adapted.regularizer()
    assert reg.dtype == torch.float32
    assert float(reg.detach()) == pytest.approx(reference, rel=0.05 if mode == "repr" else 1e-6)  # repr: bf16 inputs
