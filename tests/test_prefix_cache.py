"""Frozen-prefix cache (executor setting ``prefix_cache = auto | on | off``): same training as the standard mode,
refused whenever it would change what trains, and evaluation sharing the prefix gives the same metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import Dataset
from monai.transforms import Compose, EnsureTyped, RandGaussianNoised
from torch import nn

from conftest import CMR_BUNDLE, write_random_cmr_site
from flare_duallora.engine import AdapterSettings, adapt
from flare_duallora.metrics import classification_metrics
from flare_duallora.nets import ViTClassifier
from flare_duallora.training import SiteTrainer, make_loader
from flare_duallora.training.prefix_cache import PrefixCacheError, ViTPrefixSplit, make_split, verify_split


def tiny_net(seed=0, **kw):
    torch.manual_seed(seed)
    return ViTClassifier(in_channels=2, img_size=(16, 16, 4), patch_size=(8, 8, 2), num_classes=2, hidden_size=32,
                         mlp_dim=64, num_layers=4, num_heads=4, **kw)


def dataset(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(2, 16, 16, 4, generator=g), "label": torch.tensor(i % 2)} for i in range(n)]


def perturb(adapted, std=0.05):
    for p in adapted.trainable_parameters():  # move off the B = 0 start so every gradient is non-trivial
        torch.nn.init.normal_(p, std=std) if p.ndim > 1 else None


def trainer(method="duallora", seed=0, net=None, data=None, val=None):
    adapted = adapt(net if net is not None else tiny_net(seed),
                    AdapterSettings(method=method, blocks="last:2", head="vit.classification_head", rank=4))
    perturb(adapted)
    data = data if data is not None else dataset()
    opt = torch.optim.AdamW(adapted.trainable_parameters(), lr=1e-2)
    return SiteTrainer(adapted, torch.nn.CrossEntropyLoss(), opt, make_loader(data, 4, True, seed=3),
                       make_loader(val if val is not None else dataset(7, seed=5), 3, False), device="cpu",
                       num_classes=2), data


class Rescaled(nn.Module):
    """A wrapper with a ``.vit`` whose forward is *not* the ViT's: it doubles the logits."""

    def __init__(self):
        super().__init__()
        self.vit = tiny_net().vit

    def forward(self, x):
        return 2.0 * self.vit(x)[0]


class Opaque(torch.utils.data.Dataset):
    """A data set whose transforms cannot be read (no ``transform`` attribute)."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_prefix_split_reproduces_forward():
    net = tiny_net()
    split = ViTPrefixSplit(adapt(net, AdapterSettings(blocks="last:2", head="vit.classification_head")).net)
    assert split.k == 2
    x = torch.randn(3, 2, 16, 16, 4)
    with torch.no_grad():
        assert torch.allclose(split.suffix(*split.prefix(x)), net(x), atol=1e-6)


def test_cached_adapter_gradients_equal_standard_gradients():
    t, data = trainer("fedopal")
    batch = torch.utils.data.default_collate(data[:4])
    net = t.adapted.net
    loss = t.loss_fn(net(batch["image"]), batch["label"]) + t.adapted.regularizer()
    loss.backward()
    standard = {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}
    net.zero_grad()
    split = ViTPrefixSplit(net)
    with torch.no_grad():
        states = split.prefix(batch["image"])
    loss = t.loss_fn(split.suffix(*states), batch["label"]) + t.adapted.regularizer()
    loss.backward()
    assert standard and any(".lora_A.local." in n for n in standard)
    for name, p in net.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, standard[name], atol=1e-5), name


def test_cached_training_round_matches_standard_round():
    standard, _ = trainer()
    cached, data = trainer()
    decision = cached.configure_cache("auto", data)
    assert decision.enabled and "blocks 0-1" in decision.reason and "deterministic" in decision.reason
    calls = []
    cached.adapted.net.vit.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    for _ in range(2):
        s1 = standard.train_round(epochs=2)
        s2 = cached.train_round(epochs=2)
        assert (s1.steps, s1.examples) == (s2.steps, s2.examples)
        assert s1.loss == pytest.approx(s2.loss, abs=1e-5)
    assert not calls  # the prefix never ran while training
    for key, value in standard.adapted.shared_state().items():
        assert torch.allclose(value, cached.adapted.shared_state()[key], atol=1e-5), key
    for key, value in standard.adapted.private_state().items():
        assert torch.allclose(value, cached.adapted.private_state()[key], atol=1e-5), key


def test_cached_states_are_recomputed_when_something_writes_into_the_frozen_prefix():
    standard, _ = trainer()
    cached, data = trainer()
    assert cached.configure_cache("on", data).enabled
    cached.evaluate()  # the validation states are cached too
    for t in (standard, cached):  # e.g. a base checkpoint loaded, or a residual folded into a base weight
        with torch.no_grad():
            t.adapted.net.vit.blocks[0].mlp.linear1.weight.mul_(1.5)
    assert not cached.cache.is_current()
    s1, s2 = standard.train_round(epochs=1), cached.train_round(epochs=1)
    assert s1.loss == pytest.approx(s2.loss, abs=1e-5) and cached.cache.is_current()
    _same_metrics(cached.evaluate(), standard.evaluate())


def test_random_transforms_turn_auto_off_with_the_reason_and_on_raises():
    items = dataset()
    random_data = Dataset(items, transform=Compose([RandGaussianNoised(keys="image", prob=1.0, std=0.1),
                                                   EnsureTyped(keys="image")]))
    t, _ = trainer(data=random_data)
    decision = t.configure_cache("auto", random_data)
    assert not decision.enabled and t.cache is None
    assert "random" in decision.reason and "RandGaussianNoised" in decision.reason
    with pytest.raises(PrefixCacheError, match="prefix_cache = on.*random"):
        t.configure_cache("on", random_data)
    # the same chain without the random transform: deterministic, read from the chain itself
    plain = Dataset(items, transform=Compose([EnsureTyped(keys="image")]))
    t, _ = trainer(data=plain)
    assert t.configure_cache("auto", plain).enabled


def test_a_random_transform_the_chain_hides_is_caught_and_unreadable_chains_need_on():
    class Noisy(Opaque):
        transform = None  # claims to have no transform, yet every load differs

        def __getitem__(self, i):
            item = dict(self.items[i])
            item["image"] = item["image"] + torch.randn_like(item["image"])
            return item

    noisy = Noisy(dataset())
    t, _ = trainer(data=noisy)
    assert "loading the first training item twice" in t.configure_cache("auto", noisy).reason
    opaque = Opaque(dataset())
    t, _ = trainer(data=opaque)
    decision = t.configure_cache("auto", opaque)
    assert not decision.enabled and "cannot be read" in decision.reason and "no 'transform'" in decision.reason
    assert t.configure_cache("on", opaque).enabled  # 'on' trusts it (loading item 0 twice agreed)
    assert not t.configure_cache("off", opaque).enabled and t.cache is None


def test_trainable_prefix_dropout_and_memory_budget_are_refused():
    full, data = trainer("full")
    decision = full.configure_cache("auto", data)
    assert not decision.enabled and "before the blocks is trainable" in decision.reason
    with pytest.raises(PrefixCacheError, match="before the blocks is trainable"):
        full.configure_cache("on", data)
    dropout, data = trainer(net=tiny_net(dropout_rate=0.1))
    assert "dropout" in dropout.configure_cache("auto", data).reason
    t, data = trainer()
    decision = t.configure_cache("auto", data, max_bytes=1000)
    assert not decision.enabled and "would take" in decision.reason
    with pytest.raises(PrefixCacheError, match="would take"):
        t.configure_cache("on", data, max_bytes=1000)
    with pytest.raises(ValueError, match="prefix_cache"):
        t.configure_cache("sometimes", data)


def test_a_wrapper_whose_forward_rescales_the_logits_is_refused():
    t, data = trainer(net=Rescaled())
    decision = t.configure_cache("auto", data)
    assert not decision.enabled and t.cache is None
    assert "does not give Rescaled's own output" in decision.reason
    with pytest.raises(PrefixCacheError, match="does not give Rescaled's own output"):
        t.configure_cache("on", data)
    # evaluation does not share a prefix it cannot trust: it gives the wrapper's own (doubled) logits
    net = t.adapted.net.eval()
    with torch.no_grad():
        x = torch.stack([d["image"] for d in dataset(7, seed=5)])
        expected = torch.softmax(net(x), 1).numpy()
    _, probs = t.predict()
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    with pytest.raises(PrefixCacheError):
        verify_split(make_split(net), x, net.train)


def _two_full_passes(t: SiteTrainer) -> dict:
    net = t.adapted.net
    net.eval()
    out = {}
    for kind in ("personalised", "global_only"):
        ys, ps = [], []
        with t.adapted.private_adapters_disabled() if kind == "global_only" else torch.no_grad():
            with torch.no_grad():
                for batch in t.val_loader:
                    ps.append(torch.softmax(net(batch["image"]), 1).numpy())
                    ys.append(batch["label"].numpy())
        out[kind] = classification_metrics(np.concatenate(ys), np.concatenate(ps), 2)
    return out


def _same_metrics(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for kind in a:
        assert a[kind].keys() == b[kind].keys()
        for name, value in a[kind].items():
            assert value == pytest.approx(b[kind][name], abs=1e-9, nan_ok=True), (kind, name)


@pytest.mark.parametrize("cache", [False, True], ids=["shared-prefix", "cached-prefix"])
def test_personalised_and_global_only_evaluation_sharing_the_prefix_equal_two_full_passes(cache):
    t, data = trainer()
    t.train_round(epochs=1)
    reference = _two_full_passes(t)
    assert reference["personalised"] != reference["global_only"]  # the private adapters matter
    if cache:
        assert t.configure_cache("auto", data).enabled
    modes = []
    vit = t.adapted.net.vit
    vit.classification_head.register_forward_hook(lambda *a: modes.append(torch.is_inference_mode_enabled()))
    _same_metrics(t.evaluate(), reference)
    assert modes and all(modes)  # evaluation runs under torch.inference_mode()
    calls = []
    vit.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    _same_metrics(t.evaluate(), reference)
    # the prefix ran once per batch for both models (two full passes would run it twice), or not at all when the
    # validation states are cached
    assert len(calls) == (0 if cache else len(t.val_loader))
    _same_metrics(t.evaluate(kinds=("global_only",)), {"global_only": reference["global_only"]})
    t.train_round(epochs=1)  # training still works after evaluations (no inference tensors leak into it)


def test_reference_cmr_bundle_auto_is_on_for_the_deterministic_preset_and_off_with_its_random_transforms(tmp_path):
    from flare_duallora.training.from_bundle import build_site

    datalist = write_random_cmr_site(tmp_path, "site-a", n=6, n_val=2)
    tiny = {"image_size": [16, 16, 4], "patch_size": [8, 8, 2], "hidden_size": 32, "mlp_dim": 64, "num_heads": 4}
    settings = {"method": "duallora", "blocks": "last:2", "head": "vit.classification_head", "rank": 4}
    deterministic = build_site(CMR_BUNDLE, settings, datalist, {**tiny, "train#random_transforms": []},
                               device="cpu", allow_random_base=True)
    decision = deterministic.trainer.configure_cache("auto", deterministic.train_dataset)
    assert decision.enabled, decision.reason
    assert "no monai Randomizable in CacheDataset.transform" in decision.reason
    deterministic.trainer.train_round(epochs=1)
    assert set(deterministic.trainer.evaluate()) == {"personalised", "global_only"}

    default = build_site(CMR_BUNDLE, settings, datalist, tiny, device="cpu", allow_random_base=True)
    decision = default.trainer.configure_cache("auto", default.train_dataset)
    assert not decision.enabled and default.trainer.cache is None
    assert "the training transforms are random" in decision.reason and "RandAffined" in decision.reason
