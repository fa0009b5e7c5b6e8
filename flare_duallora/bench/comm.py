"""Bytes each site sends per round, per method, measured on the real shared state of the real network; and, per
``lora_aggregation`` mode (factors | svd | fedex), the bytes each site receives and how far its effective update is
from the exact weighted average of the sites' ``B_k A_k`` (:func:`aggregation_table`)."""

from __future__ import annotations

from typing import Sequence

from flare_duallora.engine import AdapterSettings, adapt, get_method
from flare_duallora.engine.state import payload_bytes
from flare_duallora.nets import ViTClassifier

# ViT-B for cine CMR as in the benchmark issue: 192x192x16, ED+ES as two channels, patch 16x16x4
VIT_B_CMR = dict(in_channels=2, img_size=(192, 192, 16), patch_size=(16, 16, 4), num_classes=2, hidden_size=768,
                 mlp_dim=3072, num_layers=12, num_heads=12, spatial_dims=3, qkv_bias=True)
TINY_CMR = dict(in_channels=2, img_size=(16, 16, 4), patch_size=(8, 8, 2), num_classes=2, hidden_size=32,
                mlp_dim=64, num_layers=4, num_heads=4, spatial_dims=3, qkv_bias=True)
DEFAULT_METHODS = ("full", "fedit", "ffa", "fedsa", "duallora", "fedopal", "local", "pfedst")

# adapter placement per method, as the benchmark runs them: Med-DualLoRA / FedOPAL adapt the last two blocks,
# the single-LoRA baselines all blocks (their published setting)
PLACEMENT = {"duallora": "last:2", "fedopal": "last:2"}


def comm_table(net_kwargs: dict = VIT_B_CMR, methods: Sequence[str] = DEFAULT_METHODS, rank: int = 8,
               targets: str = r".*blocks\.\d+\.attn\.(qkv|out_proj)") -> list[dict]:
    rows = []
    full_bytes = None
    for method in methods:
        try:
            get_method(method)
        except ValueError:
            continue  # a method not installed in this build (e.g. pfedst)
        net = ViTClassifier(**net_kwargs)
        settings = AdapterSettings(method=method, target_modules=targets, blocks=PLACEMENT.get(method), rank=rank,
                                   head="vit.classification_head")
        adapted = adapt(net, settings)
        shared = adapted.shared_state()
        n_bytes = payload_bytes(shared)
        trainable = sum(p.numel() for p in adapted.trainable_parameters())
        if method == "full":
            full_bytes = n_bytes
        rows.append({"method": method, "blocks": PLACEMENT.get(method, "all"), "rank": rank,
                     "shared_tensors": len(shared), "shared_params": sum(v.numel() for v in shared.values()),
                     "trainable_params": trainable, "bytes_per_round": n_bytes})
        del net, adapted
    for row in rows:
        row["vs_full"] = row["bytes_per_round"] / full_bytes if full_bytes else None
    return rows


# ------------------------------------------------------------------------------------------- LoRA aggregation modes
# the demo's ``small`` CMR network (CMR_PRESETS["small"]): where the aggregation error is measured for the ViT-B table
SMALL_CMR = dict(in_channels=2, img_size=(32, 32, 8), patch_size=(4, 4, 4), num_classes=2, hidden_size=64,
                 mlp_dim=128, num_layers=4, num_heads=4, spatial_dims=3, qkv_bias=True)
# methods whose shared state holds both factors of a layer (FFA shares B only, FedSA A only: nothing to combine)
PRODUCT_METHODS = ("fedit", "duallora", "fedopal")
DEFAULT_AGGREGATION_METHODS = ("fedit", "duallora")


def _adapter_settings(method: str, rank: int, targets: str, seed: int = 0) -> AdapterSettings:
    return AdapterSettings(method=method, target_modules=targets, blocks=PLACEMENT.get(method), rank=rank,
                           head="vit.classification_head", seed=seed)


def trained_site_states(net_kwargs: dict, method: str, n_sites: int = 3, steps: int = 12, lr: float = 1e-3,
                        rank: int = 8, batch: int = 8, seed: int = 0,
                        targets: str = r".*blocks\.\d+\.attn\.(qkv|out_proj)"):
    """The shared states of ``n_sites`` sites trained ``steps`` Adam steps from one initialisation.

    Every site starts from the same network and adapter seed (as a federated round does) and sees its own data:
    inputs with a site-specific intensity shift and a site-specific linear labelling rule, so the sites' updates
    differ the way heterogeneous sites' do.  Returns ``({site: shared state}, {site: weight}, scaling)`` with weights
    in the proportions 1 : 2 : 4 : ... (unequal dataset sizes).
    """
    import torch

    from flare_duallora.training.batch import logits_of

    states, weights = {}, {}
    settings = _adapter_settings(method, rank, targets, seed)
    shape = (net_kwargs["in_channels"], *net_kwargs["img_size"])
    for k in range(n_sites):
        torch.manual_seed(seed)
        adapted = adapt(ViTClassifier(**net_kwargs), settings)
        adapted.net.train()
        opt = torch.optim.Adam(adapted.trainable_parameters(), lr=lr)
        g = torch.Generator().manual_seed(seed * 1009 + k)
        rule = torch.randn(shape, generator=g)
        for _ in range(steps):
            x = torch.randn((batch, *shape), generator=g) * (1.0 + 0.25 * k) + 0.3 * k
            y = ((x - x.mean()) * rule).flatten(1).mean(1).gt(0).long()
            loss = torch.nn.functional.cross_entropy(logits_of(adapted.net(x)), y)
            reg = adapted.regularizer()
            if reg is not None:
                loss = loss + reg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        name = f"site-{k + 1}"
        states[name] = adapted.shared_state()
        weights[name] = float(2 ** k)
    return states, weights, settings.alpha_of("global") / settings.rank_of("global")


def _residual_numel(shared: dict) -> int:
    """Elements of the dense fedex residuals: d_out x d_in(*k) for every layer whose A and B are both shared."""
    from flare_duallora.engine.lora_aggregation import lora_pairs

    total = 0
    for pair in lora_pairs(shared).values():
        a, b = shared[pair.a_key], shared[pair.b_key]
        total += int(b.shape[0]) * int(a[0].numel())
    return total


def aggregation_table(bytes_net: dict = VIT_B_CMR, error_net: dict = SMALL_CMR,
                      methods: Sequence[str] = DEFAULT_AGGREGATION_METHODS, rank: int = 8,
                      lrs: Sequence[float] = (1e-3, 1e-2), n_sites: int = 3, steps: int = 12,
                      targets: str = r".*blocks\.\d+\.attn\.(qkv|out_proj)") -> list[dict]:
    """Per method, learning rate and ``lora_aggregation`` mode: bytes per site per round on ``bytes_net``'s real
    shapes (float32 on the wire) and the per-layer relative error of the sites' effective update against the exact
    weighted average of ``B_k A_k``, measured on ``n_sites`` sites trained ``steps`` steps on ``error_net``."""
    import numpy as np

    from flare_duallora.engine.lora_aggregation import LORA_AGGREGATION_MODES, aggregation_error

    img = "x".join(map(str, error_net["img_size"]))
    measured_on = (f"{n_sites} sites x {steps} Adam steps from one init, ViT {img} patch "
                   f"{'x'.join(map(str, error_net['patch_size']))} hidden {error_net['hidden_size']}")
    rows = []
    for method in methods:
        if method not in PRODUCT_METHODS:
            continue
        shared = adapt(ViTClassifier(**bytes_net), _adapter_settings(method, rank, targets)).shared_state()
        up = payload_bytes(shared)
        down = {"factors": up, "svd": up, "fedex": up + 4 * _residual_numel(shared)}
        for lr in lrs:
            states, weights, scaling = trained_site_states(error_net, method, n_sites, steps, lr, rank,
                                                           targets=targets)
            for mode in LORA_AGGREGATION_MODES:
                errors = np.array(list(aggregation_error(states, weights, mode, scaling=scaling).values()))
                rows.append({"method": method, "lr": lr, "lora_aggregation": mode, "error_layers": len(errors),
                             "down_bytes_per_site": down[mode], "up_bytes_per_site": up,
                             "down_vs_factors": round(down[mode] / up, 3),
                             "rel_error_median": float(np.median(errors)), "rel_error_max": float(errors.max()),
                             "error_measured_on": measured_on})
    return rows
