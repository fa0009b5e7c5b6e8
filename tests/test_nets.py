"""Tests for flare_duallora.nets.ViTClassifier (tiny networks, CPU)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from flare_duallora.nets import ViTClassifier

TINY = dict(hidden_size=32, mlp_dim=64, num_layers=2, num_heads=4)


def _net3d(**kw) -> ViTClassifier:
    args = dict(in_channels=2, img_size=(16, 16, 4), patch_size=(8, 8, 4), num_classes=3, spatial_dims=3, **TINY)
    args.update(kw)
    return ViTClassifier(**args)


def test_output_shape_3d_and_2d():
    torch.manual_seed(0)
    net = _net3d().eval()
    assert net(torch.randn(2, 2, 16, 16, 4)).shape == (2, 3)
    net2d = ViTClassifier(3, (16, 16), (8, 8), num_classes=8, spatial_dims=2, **TINY).eval()
    out = net2d(torch.randn(5, 3, 16, 16))
    assert isinstance(out, torch.Tensor) and out.shape == (5, 8)


def test_no_tanh_head_and_unbounded_logits():
    torch.manual_seed(0)
    net = _net3d().eval()
    assert isinstance(net.vit.classification_head, nn.Linear)
    assert not any(isinstance(m, nn.Tanh) for m in net.modules())
    with torch.no_grad():
        net.vit.classification_head.weight.mul_(50.0)
        out = net(torch.randn(4, 2, 16, 16, 4))
    assert out.abs().max() > 1.0


def test_sdpa_and_einsum_paths_match():
    torch.manual_seed(0)
    sdpa = _net3d(sdpa=True).eval()
    einsum = _net3d(sdpa=False).eval()
    einsum.load_state_dict(sdpa.state_dict(), strict=True)
    assert all(b.attn.use_flash_attention for b in sdpa.vit.blocks)
    assert not any(b.attn.use_flash_attention for b in einsum.vit.blocks)
    x = torch.randn(3, 2, 16, 16, 4)
    with torch.no_grad():
        torch.testing.assert_close(sdpa(x), einsum(x), atol=1e-5, rtol=1e-5)
    sdpa.set_sdpa(False)
    assert not sdpa.sdpa and not any(b.attn.use_flash_attention for b in sdpa.vit.blocks)


def test_sdpa_eval_is_deterministic_with_dropout():
    """MONAI passes dropout_p to SDPA even in eval(); the wrapper must switch it off."""
    torch.manual_seed(0)
    net = _net3d(dropout_rate=0.5).eval()
    x = torch.randn(2, 2, 16, 16, 4)
    with torch.no_grad():
        torch.testing.assert_close(net(x), net(x))
    assert all(b.attn.dropout_rate == 0.0 for b in net.vit.blocks)
    net.train()
    assert all(b.attn.dropout_rate == 0.5 for b in net.vit.blocks)


def test_state_dict_loads_strictly_and_module_names():
    a, b = _net3d(), _net3d(sdpa=False)
    b.load_state_dict(a.state_dict(), strict=True)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    names = dict(a.named_modules())
    for i in range(2):
        assert isinstance(names[f"vit.blocks.{i}.attn.qkv"], nn.Linear)
        assert isinstance(names[f"vit.blocks.{i}.attn.out_proj"], nn.Linear)
        assert isinstance(names[f"vit.blocks.{i}.mlp.linear1"], nn.Linear)
        assert isinstance(names[f"vit.blocks.{i}.mlp.linear2"], nn.Linear)
    assert isinstance(names["vit.classification_head"], nn.Linear)
    pattern = re.compile(r".*vit\.blocks\.1\.attn\.(qkv|out_proj)")
    assert sorted(n for n in names if pattern.fullmatch(n)) == ["vit.blocks.1.attn.out_proj", "vit.blocks.1.attn.qkv"]


def test_backward_and_bad_args():
    net = _net3d().train()
    net(torch.randn(2, 2, 16, 16, 4)).sum().backward()
    assert net.vit.blocks[0].attn.qkv.weight.grad is not None
    with pytest.raises(ValueError):
        _net3d(hidden_size=30)  # not divisible by num_heads
