"""Bytes each site sends per round, per method, measured on the real shared state of the real network."""

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
