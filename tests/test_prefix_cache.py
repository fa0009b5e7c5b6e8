"""Frozen-prefix cache: same adapter gradients and same training trajectory as the standard mode."""

from __future__ import annotations

import pytest
import torch

from flare_duallora.engine import AdapterSettings, adapt
from flare_duallora.nets import ViTClassifier
from flare_duallora.training import SiteTrainer, make_loader
from flare_duallora.training.prefix_cache import PrefixCacheError, ViTPrefixSplit


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return ViTClassifier(in_channels=2, img_size=(16, 16, 4), patch_size=(8, 8, 2), num_classes=2, hidden_size=32,
                         mlp_dim=64, num_layers=4, num_heads=4)


def dataset(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(2, 16, 16, 4, generator=g), "label": torch.tensor(i % 2)} for i in range(n)]


def trainer(method="duallora", seed=0):
    adapted = adapt(tiny_net(seed), AdapterSettings(method=method, blocks="last:2", head="vit.classification_head",
                                                    rank=4))
    for p in adapted.trainable_parameters():  # move off the B = 0 start so every gradient is non-trivial
        torch.nn.init.normal_(p, std=0.05) if p.ndim > 1 else None
    data = dataset()
    opt = torch.optim.AdamW(adapted.trainable_parameters(), lr=1e-2)
    return SiteTrainer(adapted, torch.nn.CrossEntropyLoss(), opt, make_loader(data, 4, True, seed=3),
                       device="cpu"), data


def test_prefix_split_reproduces_forward():
    net = tiny_net()
    split = ViTPrefixSplit(adapt(net, AdapterSettings(blocks="last:2", head="vit.classification_head")).net)
    assert split.k == 2
    x = torch.randn(3, 2, 16, 16, 4)
    assert torch.allclose(split.suffix(split.prefix(x)), net(x), atol=1e-6)


def test_cached_adapter_gradients_equal_standard_gradients():
    t, data = trainer("fedopal")
    batch = torch.utils.data.default_collate(data[:4])
    net = t.adapted.net
    loss = t.loss_fn(net(batch["image"]), batch["label"]) + t.adapted.regularizer()
    loss.backward()
    standard = {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}
    net.zero_grad()
    split = ViTPrefixSplit(net)
    loss = t.loss_fn(split.suffix(split.prefix(batch["image"])), batch["label"]) + t.adapted.regularizer()
    loss.backward()
    assert standard and any(".lora_A.local." in n for n in standard)
    for name, p in net.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, standard[name], atol=1e-5), name


def test_cached_training_round_matches_standard_round():
    standard, _ = trainer()
    cached, data = trainer()
    assert cached.enable_prefix_cache(data, transforms_random=False) == 2
    for _ in range(2):
        s1 = standard.train_round(epochs=2)
        s2 = cached.train_round(epochs=2)
        assert (s1.steps, s1.examples) == (s2.steps, s2.examples)
        assert s1.loss == pytest.approx(s2.loss, abs=1e-5)
    for key, value in standard.adapted.shared_state().items():
        assert torch.allclose(value, cached.adapted.shared_state()[key], atol=1e-5), key
    for key, value in standard.adapted.private_state().items():
        assert torch.allclose(value, cached.adapted.private_state()[key], atol=1e-5), key


def test_prefix_cache_refuses_random_transforms_and_trainable_prefix():
    t, data = trainer()
    with pytest.raises(PrefixCacheError, match="random"):
        t.enable_prefix_cache(data, transforms_random=True)
    full, data = trainer("full")
    with pytest.raises(PrefixCacheError, match="before the blocks is trainable"):
        full.enable_prefix_cache(data, transforms_random=False)
