"""pFedST (personalised federated side-tuning) on real MONAI ViTs: frozen backbone, roles, export, memory."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from monai.networks.nets import ViT, DenseNet121
from torch import nn

from flare_duallora.engine import FROZEN, METHODS, AdapterSettings, SharingPolicy, adapt
from flare_duallora.engine.pfedst import build_side_tuned, lora_regex
from flare_duallora.nets.side_network import SideTunedNetwork, ladder_taps

MB = 2**20


def vit3d(seed: int = 0, **kw) -> ViT:
    torch.manual_seed(seed)
    args = dict(in_channels=2, img_size=(16, 16, 4), patch_size=(8, 8, 2), hidden_size=32, mlp_dim=64, num_layers=4,
                num_heads=4, classification=True, num_classes=3, post_activation=None)
    args.update(kw)
    return ViT(**args)


class Wrapper(nn.Module):
    """A bundle-style wrapper (like ``ViTClassifier``): the ViT lives under ``.vit``, forward returns logits."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.vit = vit3d(seed, post_activation="Tanh")  # head = Sequential(Linear, Tanh)

    def forward(self, x):
        return self.vit(x)[0]


def settings(**kw) -> AdapterSettings:
    base = dict(method="pfedst", head="vit.classification_head", rank=4, seed=0)
    base.update(kw)
    return AdapterSettings(**base)


def batch(n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 16, 16, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def perturb_trainables(adapted, scale=0.1, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapted.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def test_pfedst_is_registered_with_the_engine():
    assert "pfedst" in METHODS
    spec = METHODS["pfedst"]
    assert spec.prepare is not None and spec.extra_roles is not None and spec.personalised


def test_training_steps_leave_the_backbone_untouched_and_train_the_side_network():
    adapted = adapt(vit3d(), settings())
    net = adapted.net
    assert isinstance(net, SideTunedNetwork)
    backbone_before = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    grad_modes = []
    net.backbone_vit.blocks[-1].register_forward_hook(
        lambda m, i, o: grad_modes.append((torch.is_grad_enabled(), o.requires_grad)))
    opt = torch.optim.AdamW(adapted.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    net.train()
    assert not net.backbone.training and net.side.training  # frozen backbone: no dropout
    x, y = batch()
    for step in range(2):  # LoRA B = 0 at init hides the gradient of A in the first step
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        if step == 1:
            roles = adapted.roles()
            for name, p in net.named_parameters():
                if roles[name] == FROZEN:
                    assert p.grad is None and not p.requires_grad, name
                else:
                    assert p.grad is not None and p.grad.abs().sum() > 0, name
        opt.step()
    # the backbone ran without autograd: no graph, no saved activations
    assert grad_modes == [(False, False), (False, False)]
    assert all(p.grad is None for p in net.backbone.parameters())
    for key, value in net.backbone.state_dict().items():
        assert torch.equal(value, backbone_before[key]), key
    assert any(".lora_A.local." in n for n, p in net.named_parameters() if p.grad is not None)
    assert any(".base_layer." in n and n.startswith("side.blocks.")
               for n, p in net.named_parameters() if p.grad is not None)


@pytest.mark.parametrize("head_shared", [None, True, False])
def test_shared_and_private_partition_the_trainable_parameters(head_shared):
    adapted = adapt(vit3d(), settings(head_shared=head_shared))
    net = adapted.net
    params = dict(net.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    shared, private = set(adapted.shared_keys), set(adapted.private_keys)
    assert shared | private == trainable and not shared & private
    assert all(not params[k].requires_grad for k in adapted.keys_with_role(FROZEN) if k in params)
    assert {k for k in net.state_dict() if k.startswith("backbone.")} == set(adapted.keys_with_role(FROZEN))

    payload = adapted.shared_state()
    assert payload and all(k.startswith("side.") for k in payload)
    assert not any(".lora_" in k or k.startswith("backbone.") for k in payload)
    head_keys = {"side.head.weight", "side.head.bias"}
    if head_shared is False:
        assert not head_keys & set(payload) and head_keys <= private
    else:
        assert head_keys <= set(payload)
    # every side parameter that is not LoRA (nor a private head) travels: base weights, ladders, gates, norms
    assert {k for k in payload if k.startswith("side.ladders.")} and {k for k in payload if k.startswith("side.gates.")}
    assert any(".base_layer." in k for k in payload)
    assert all(re.search(r"\.lora_[AB]\.local\.", k) for k in private - head_keys)
    # LoRA only in the side blocks' Linears: never in ladders, head, embed or the backbone
    assert adapted.targets and all(re.fullmatch(r"side\.blocks\.\d+\.(attn\.(qkv|out_proj)|mlp\.linear[12])", t)
                                   for t in adapted.targets)
    # the server / filters build the policy from the job's settings, without the network: same roles
    server = SharingPolicy("pfedst", head="vit.classification_head", head_shared=head_shared)
    assert server.roles(net.state_dict()) == adapted.roles()


def test_lora_starts_at_zero_and_the_side_network_init_is_seeded():
    net = vit3d()
    x, _ = batch()
    backbone_logits = net(x)[0].detach()
    adapted = adapt(net, settings())
    lora_b = [p for n, p in adapted.net.named_parameters() if ".lora_B." in n]
    assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b)
    # with B = 0 the adapted network computes exactly its LoRA-free side-tuned self
    plain = build_side_tuned(vit3d(), settings())
    plain.load_state_dict(adapted.export(), strict=True)
    assert torch.allclose(adapted.net(x), plain(x), atol=1e-6)
    # the backbone itself is untouched (its own head still gives the same logits)
    assert torch.allclose(adapted.net.backbone_vit(x)[0], backbone_logits, atol=1e-6)
    # shared side weights start identical on every site (same seed) and differ with another seed
    again = adapt(vit3d(), settings()).shared_state()
    other = adapt(vit3d(), settings(seed=1)).shared_state()
    first = adapted.shared_state()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_backbone_states_are_monai_hidden_states():
    side = build_side_tuned(vit3d(), settings())
    x, _ = batch()
    with torch.no_grad():
        h0, hidden = side.backbone_states(x)
        _, reference = side.backbone_vit(x)
    assert h0.shape == reference[0].shape
    assert sorted(hidden) == list(range(len(reference)))
    for j, h in hidden.items():
        assert torch.equal(h, reference[j])


def test_side_options_ladders_and_wrapped_vit():
    s = settings(extra={"reduction": 8, "side_layers": 2, "ladder_every": 2, "pool": "mean", "gate_init": -1.0,
                        "lora_modules": ["qkv"]})
    adapted = adapt(Wrapper(), s)
    net = adapted.net
    assert net.side.width == 4 and len(net.side.blocks) == 2 and net.side.pool == "mean"
    assert net.side.taps == {1: 3} == ladder_taps(4, 2, 2)
    assert net.num_classes == 3  # read from the Sequential(Linear, Tanh) head
    assert adapted.targets == ["side.blocks.0.attn.qkv", "side.blocks.1.attn.qkv"]
    assert all(k.startswith("backbone.vit.") for k in adapted.keys_with_role(FROZEN))
    assert float(net.side.gates["1"].detach()) == -1.0
    x, _ = batch()
    assert net(x).shape == (4, 3)
    assert ladder_taps(12, 12) == {i: i for i in range(12)}
    assert ladder_taps(12, 4) == {0: 2, 1: 5, 2: 8, 3: 11}
    assert re.fullmatch(lora_regex(("linear2",)), "side.blocks.3.mlp.linear2")


def test_2d_vit_without_classification_head_needs_num_classes():
    torch.manual_seed(0)
    vit = ViT(in_channels=3, img_size=(16, 16), patch_size=(4, 4), hidden_size=32, mlp_dim=64, num_layers=2,
              num_heads=4, spatial_dims=2)  # no classification head, no cls token
    with pytest.raises(ValueError, match=r"setting 'extra'.*num_classes"):
        adapt(vit, settings(head=None))
    adapted = adapt(vit, settings(head=None, extra={"num_classes": 5}))
    assert adapted.net.side.pool == "mean"  # auto: no cls token
    assert adapted.net(torch.randn(2, 3, 16, 16)).shape == (2, 5)


@pytest.mark.parametrize("kind", ["personalised", "global"])
def test_export_round_trip_loads_strictly_into_a_fresh_side_tuned_network(kind):
    adapted = adapt(Wrapper(seed=0), settings())
    perturb_trainables(adapted)
    x, _ = batch()
    with torch.no_grad():
        if kind == "global":
            with adapted.private_adapters_disabled():
                expected = adapted.net(x)
        else:
            expected = adapted.net(x)
    state = adapted.export(kind)
    assert not any(".lora_" in k or ".base_layer." in k for k in state)
    fresh = build_side_tuned(Wrapper(seed=123), settings())  # other weights everywhere: all come from the export
    assert not torch.allclose(fresh(x), expected, atol=1e-3)
    fresh.load_state_dict(state, strict=True)
    fresh.eval()
    assert torch.allclose(fresh(x), expected, atol=1e-5)
    if kind == "global":
        assert not torch.allclose(expected, adapted.net(x), atol=1e-4)  # the private LoRA matters


def test_network_without_vit_is_refused_naming_the_setting():
    dense = DenseNet121(spatial_dims=2, in_channels=3, out_channels=2, init_features=8, growth_rate=4,
                        block_config=(2, 2))
    with pytest.raises(ValueError, match=r"setting 'method' = 'pfedst'.*MONAI ViT.*DenseNet121"):
        adapt(dense, settings(head="class_layers.out"))
    with pytest.raises(ValueError, match="setting 'method'"):
        build_side_tuned(nn.Sequential(nn.Linear(4, 2)), settings())


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"nope": 1}, r"setting 'extra' = \['nope'\]"),
        ({"reduction": 3}, r"setting 'extra'.*'reduction' = 3"),
        ({"side_layers": 0}, r"setting 'extra'.*'side_layers'"),
        ({"side_heads": 3}, r"setting 'extra'.*'side_heads'"),
        ({"pool": "max"}, r"setting 'extra'.*'pool'"),
        ({"lora_modules": ["to_q"]}, r"setting 'extra.lora_modules'"),
    ],
)
def test_bad_side_options_raise_naming_the_setting(extra, message):
    with pytest.raises(ValueError, match=message):
        adapt(vit3d(), settings(extra=extra))


@pytest.mark.parametrize("sdpa", [False, True], ids=["einsum", "sdpa"])
def test_peak_training_memory_of_pfedst_is_below_duallora(sdpa):
    """Same plain MONAI ViT (hidden 192, 6 blocks, 256 tokens + cls, einsum attention), batch 8, a real AdamW step:
    pFedST keeps the backbone out of autograd, Med-DualLoRA back-propagates through its last two full-width blocks."""
    from flare_duallora.bench.memory import cpu_peak_supported, measure_peak_training_memory

    if not cpu_peak_supported():
        pytest.skip("the CPU peak-memory measurement needs Linux >= 4.0 with glibc")
    figures = {m: measure_peak_training_memory(m, batch=8, steps=1, sdpa=sdpa, detail=True)
               for m in ("duallora", "pfedst")}
    for m, r in figures.items():
        print(f"\npeak training memory {m}: {r['peak_bytes'] / MB:.1f} MiB "
              f"(tensors {r['static_bytes'] / MB:.1f} MiB + step {r['step_bytes'] / MB:.1f} MiB, {r['how']}, "
              f"{r['trainable_params']} trainable parameters)")
    assert figures["pfedst"]["peak_bytes"] < figures["duallora"]["peak_bytes"]


def test_bundle_network_def_builds_the_wrapper_the_export_loads_into():
    from monai.bundle import ConfigParser

    from flare_duallora.engine.pfedst import network_def

    s = settings(extra={"side_layers": 2, "pool": "mean"})
    adapted = adapt(vit3d(), s)
    perturb_trainables(adapted)
    vit_def = {"_target_": "monai.networks.nets.ViT", "in_channels": 2, "img_size": [16, 16, 4],
               "patch_size": [8, 8, 2], "hidden_size": 32, "mlp_dim": 64, "num_layers": 4, "num_heads": 4,
               "classification": True, "num_classes": 3, "post_activation": None}
    parser = ConfigParser({"network_def": network_def(vit_def, s)})
    net = parser.get_parsed_content("network_def")
    assert isinstance(net, SideTunedNetwork)
    net.load_state_dict(adapted.export(), strict=True)
    x, _ = batch()
    assert torch.allclose(net(x), adapted.net(x), atol=1e-5)


def test_the_vit_prefix_split_is_refused_on_the_side_tuned_wrapper_and_the_backbone_states_split_is_used():
    """Split as a plain ViT classifier, pFedST would train the frozen ViT's head instead of the side network: the
    one-batch check against the wrapper's own output refuses it; the wrapper's own hooks give the right split."""
    from flare_duallora.training.prefix_cache import PrefixCacheError, StatesSplit, ViTPrefixSplit, make_split, \
        verify_split

    net = adapt(vit3d(), settings()).net
    x, _ = batch()
    with pytest.raises(PrefixCacheError, match="does not give SideTunedNetwork's own output"):
        verify_split(ViTPrefixSplit(net), x, net.train)
    split = make_split(net)
    assert isinstance(split, StatesSplit)
    verify_split(split, x, net.train)
    states = split.prefix(x)
    assert len(states) == 1 + len(net.state_taps) and all(s.shape[0] == 4 for s in states)
    with torch.no_grad():
        assert torch.equal(split.suffix(*states), net(x))


def _side_trainer(data, seed=0, val=None):
    from flare_duallora.training import SiteTrainer, make_loader

    adapted = adapt(vit3d(), settings(extra={"reduction": 4}))
    perturb_trainables(adapted, scale=0.05)
    opt = torch.optim.AdamW(adapted.trainable_parameters(), lr=1e-2)
    val = val if val is not None else items(6, seed=7)
    return SiteTrainer(adapted, nn.CrossEntropyLoss(), opt, make_loader(data, 4, True, seed=3),
                       make_loader(val, 4, False), device="cpu", num_classes=3)


def items(n=10, seed=0):
    x, y = batch(n, seed)
    return [{"image": x[i], "label": y[i]} for i in range(n)]


def test_backbone_states_cache_follows_the_uncached_trajectory_and_skips_the_backbone():
    data = items()
    standard, cached = _side_trainer(data), _side_trainer(data)
    decision = cached.configure_cache("auto", data)
    assert decision.enabled and "pFedST's frozen backbone" in decision.reason
    assert len(cached.cache.states) == 1 + 4  # h_0 and the four tapped blocks
    calls = []
    cached.adapted.net.backbone_vit.patch_embedding.register_forward_hook(lambda *a: calls.append(1))
    for _ in range(2):
        s1, s2 = standard.train_round(epochs=2), cached.train_round(epochs=2)
        assert (s1.steps, s1.examples) == (s2.steps, s2.examples)
        assert s1.loss == pytest.approx(s2.loss, abs=1e-5)
    assert not calls  # an epoch runs only the side network
    for get in ("shared_state", "private_state"):
        a, b = getattr(standard.adapted, get)(), getattr(cached.adapted, get)()
        assert a and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), get


def test_backbone_states_cache_is_refused_under_random_transforms():
    from monai.data import Dataset
    from monai.transforms import Compose, RandGaussianNoised

    from flare_duallora.training.prefix_cache import PrefixCacheError

    data = Dataset(items(), transform=Compose([RandGaussianNoised(keys="image", prob=1.0, std=0.1)]))
    t = _side_trainer(data)
    decision = t.configure_cache("auto", data)
    assert not decision.enabled and "random" in decision.reason and "RandGaussianNoised" in decision.reason
    with pytest.raises(PrefixCacheError, match="random"):
        t.configure_cache("on", data)


@pytest.mark.parametrize("cache", [False, True], ids=["shared-states", "cached-states"])
def test_pfedst_evaluations_sharing_backbone_states_equal_two_full_passes(cache):
    from flare_duallora.metrics import classification_metrics

    data = items()
    t = _side_trainer(data)
    t.train_round(epochs=1)
    net = t.adapted.net.eval()
    reference = {}
    for kind in ("personalised", "global_only"):
        with t.adapted.private_adapters_disabled() if kind == "global_only" else torch.no_grad(), torch.no_grad():
            ys, ps = zip(*[(b["label"].numpy(), torch.softmax(net(b["image"]), 1).numpy()) for b in t.val_loader])
        reference[kind] = classification_metrics(np.concatenate(ys), np.concatenate(ps), 3)
    if cache:
        assert t.configure_cache("auto", data).enabled
    first = t.evaluate()
    calls = []
    net.backbone_vit.patch_embedding.register_forward_hook(lambda *a: calls.append(1))
    again = t.evaluate()
    assert len(calls) == (0 if cache else len(t.val_loader))  # once per batch for both models, or cached
    for result in (first, again):
        assert result.keys() == reference.keys()
        for kind in reference:
            for name, value in reference[kind].items():
                assert result[kind][name] == pytest.approx(value, abs=1e-9, nan_ok=True), (kind, name)


def test_side_init_backbone_starts_the_side_network_as_the_pruned_backbone():
    x, _ = batch()
    # at full width (reduction 1, as many heads, same MLP) pruning keeps everything: side block i is backbone block i
    full = build_side_tuned(vit3d(), settings(extra={"reduction": 1, "side_init": "backbone", "side_heads": 4}))
    vit = full.backbone_vit
    h = torch.randn(2, 9, 32)
    with torch.no_grad():
        for i, blk in enumerate(full.side.blocks):
            assert torch.allclose(blk(h), vit.blocks[i](h), atol=1e-5), i
        assert torch.equal(full.side.embed(h), h)  # the embedding selects every channel
        assert torch.allclose(full.side.norm(h), vit.norm(h), atol=1e-6)
    # pruned to width 8: the kept channels are one set S for the whole side network, read off the embedding
    s = settings(extra={"reduction": 4, "side_init": "backbone"})
    net = build_side_tuned(vit3d(), s)
    side, vit = net.side, net.backbone_vit
    S = side.embed.weight.argmax(1)
    assert side.width == 8 and torch.equal(side.embed.weight.sum(1), torch.ones(8)) and torch.equal(S, S.sort().values)
    for i, blk in enumerate(side.blocks):
        assert torch.equal(blk.norm1.weight, vit.blocks[i].norm1.weight[S])
        assert torch.equal(blk.mlp.linear2.bias, vit.blocks[i].mlp.linear2.bias[S])
        v_rows = blk.attn.qkv.weight[16:24]  # the kept value rows: rows of the backbone's value projection on S
        assert all(any(torch.equal(r, vr[S]) for vr in vit.blocks[i].attn.qkv.weight[64:96]) for r in v_rows)
    assert torch.equal(side.head.weight, vit.classification_head.weight[:, S])  # cls pool, same classes
    # deterministic (every site starts from the same shared side weights), different from the random init
    again = build_side_tuned(vit3d(), s)
    assert all(torch.equal(a, b) for a, b in zip(side.state_dict().values(), again.side.state_dict().values()))
    random = build_side_tuned(vit3d(), settings(extra={"reduction": 4}))
    assert random.side_init == "random"
    assert not torch.equal(random.side.blocks[0].attn.qkv.weight, side.blocks[0].attn.qkv.weight)
    assert torch.equal(random.side.ladders["0"].weight, side.ladders["0"].weight)  # ladders stay seeded random
    adapted = adapt(vit3d(), s)  # trains like any pFedST network
    assert adapted.net(x).shape == (4, 3)
    with pytest.raises(ValueError, match=r"setting 'extra'.*'side_init'"):
        adapt(vit3d(), settings(extra={"side_init": "pretrained"}))
