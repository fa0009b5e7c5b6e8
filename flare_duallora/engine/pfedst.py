"""pFedST: personalised federated side-tuning (MICCAI 2025) as a method of the adapter engine.

``adapt(net, AdapterSettings(method="pfedst", ...))`` wraps the bundle's network (which must contain a MONAI
``ViT``) in a :class:`~flare_duallora.nets.side_network.SideTunedNetwork`: the network becomes the frozen
``backbone`` (run under ``torch.no_grad``: no gradient, no stored activation), and a light ``side`` network reads
its hidden states through gated ladder connections.  Personalised LoRA adapters (adapter ``local``) are injected
into the side blocks' Linear layers only.

Roles (decided from the key alone, so the server and the filters apply the same rule without the network):

=====================================================  =======================================================
key                                                    role
=====================================================  =======================================================
``backbone.*``                                         frozen (never trained, never sent)
``side.*.lora_A.local.*`` / ``side.*.lora_B.local.*``  private (the personalised LoRA modules)
``side.head.*``                                        shared by default; private with ``head_shared=False``
every other ``side.*`` key                             shared: side-block base weights (``.base_layer.``),
                                                       LayerNorms, ``side.embed``, ladders, gates, ``side.norm``
=====================================================  =======================================================

Unlike the LoRA methods, the side blocks' *base* weights train (and are averaged): pFedST's "portion of the side
network that participates in aggregation" is everything but the LoRA modules (and the head when it is private).

What the paper leaves open, chosen here (all in ``AdapterSettings.extra``, see :data:`EXTRA_DEFAULTS`):

``reduction`` (8)            side width ``d_s = hidden_size // reduction`` (the LST value; 4 for very small ViTs)
``side_layers`` (None)       number of side blocks ``L'``; None = as many as the backbone has blocks
``ladder_every`` (1)         a ladder into every k-th side block (the last one always has one)
``side_heads`` (None)        side attention heads; None = the largest count <= the backbone's that divides d_s
``mlp_ratio`` (None)         side MLP width / d_s; None = the backbone's mlp_dim / hidden_size
``gate_init`` (0.0)          initial gate logit: each ladder enters at sigmoid(0) = 0.5
``pool`` ("auto")            ``cls`` token, ``mean`` of tokens, or ``auto`` (cls when the ViT has a cls token)
``lora_modules`` (all four)  which side Linears get the private LoRA: ``qkv``, ``out_proj``, ``linear1``, ``linear2``
``num_classes`` (None)       side head outputs; None = those of the ViT's classification head
``backbone_eval`` (True)     keep the frozen backbone in eval mode (no dropout) while the side network trains
``side_init`` ("random")     ``backbone``: side blocks, norm (and cls head) start as the backbone's, pruned (LST)

The logits head is the side network's (``side.head``, new), so "the adapted network equals the frozen base at
init" does not hold for pFedST; what holds is that the backbone is untouched and the LoRA modules start with
``B = 0`` (zero contribution: the side network equals its LoRA-free self).  The engine's ``target_modules``,
``blocks`` and ``head`` settings are replaced by the side network's own (LoRA on ``lora_modules`` of every side
block, head ``side.head``); ``rank``/``alpha``/``dropout``/``seed``/``head_shared`` apply as for other methods.
The side network is initialised from ``seed`` so that every site starts from the same shared weights.

Memory (``flare_duallora.bench.memory``, CPU, MONAI ViT hidden 192 / 6 blocks / 257 tokens, batch 8, rank 8):
pFedST needs no backward through the backbone, but keeps the L+1 full-width hidden states that feed the ladders
and runs L' side blocks.  It is far below the methods that back-propagate through every block (FedIT, full) and
below Med-DualLoRA on the last two blocks with MONAI's einsum attention (66.5 vs 76.6 MiB); with SDPA attention
in the backbone Med-DualLoRA is as low (about 65 MiB), and ``reduction`` 8 brings pFedST to about 44 MiB.

Export: ``AdaptedNetwork.export()`` gives the plain state dict of the ``SideTunedNetwork`` (LoRA merged), which
loads strictly into :func:`build_side_tuned` ``(fresh_bundle_network, settings)``; :func:`network_def` gives the
bundle config (``network_def``) that builds the same wrapper, for exporting pFedST models as MONAI bundles.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from torch import nn

from flare_duallora.engine.methods import FROZEN, LOCAL, LORA_KEY, PRIVATE, SHARED, MethodSpec, register_method
from flare_duallora.nets.side_network import SideTunedNetwork

SIDE_HEAD = "side.head"
LORA_PARENTS = {"qkv": "attn", "out_proj": "attn", "linear1": "mlp", "linear2": "mlp"}
EXTRA_DEFAULTS: dict[str, Any] = {
    "reduction": 8,
    "side_layers": None,
    "ladder_every": 1,
    "side_heads": None,
    "mlp_ratio": None,
    "gate_init": 0.0,
    "pool": "auto",
    "lora_modules": ("qkv", "out_proj", "linear1", "linear2"),
    "num_classes": None,
    "backbone_eval": True,
    "side_init": "random",
}


def side_options(settings) -> dict[str, Any]:
    """``settings.extra`` merged over :data:`EXTRA_DEFAULTS` (unknown keys refused, naming the setting)."""
    extra = dict(settings.extra or {})
    unknown = set(extra) - set(EXTRA_DEFAULTS)
    if unknown:
        raise ValueError(
            f"setting 'extra' = {sorted(unknown)}: unknown pFedST option(s); known: {sorted(EXTRA_DEFAULTS)}"
        )
    options = {**EXTRA_DEFAULTS, **extra}
    modules = options["lora_modules"]
    modules = (modules,) if isinstance(modules, str) else tuple(modules)
    bad = [m for m in modules if m not in LORA_PARENTS]
    if not modules or bad:
        raise ValueError(
            f"setting 'extra.lora_modules' = {list(modules)!r}: expected a non-empty subset of {list(LORA_PARENTS)}"
        )
    options["lora_modules"] = modules
    return options


def lora_regex(modules) -> str:
    """Full-match regex of the side blocks' Linears that get the private LoRA (never ladders, head or backbone)."""
    names = "|".join(re.escape(f"{LORA_PARENTS[m]}.{m}") for m in modules)
    return rf"side\.blocks\.\d+\.({names})"


def build_side_tuned(net: nn.Module, settings) -> SideTunedNetwork:
    """The plain (LoRA-free) ``SideTunedNetwork`` around ``net`` that ``adapt(net, settings)`` builds.

    Use it on a fresh bundle network to load an exported pFedST state dict with ``strict=True``.  A network that
    already is a ``SideTunedNetwork`` is returned unchanged.

    Raises:
        ValueError naming the setting: ``net`` holds no MONAI ViT ('method'), or a bad ``extra`` option.
    """
    if isinstance(net, SideTunedNetwork):
        return net
    options = side_options(settings)
    options.pop("lora_modules")
    try:
        return SideTunedNetwork(net, seed=settings.seed, **options)
    except ValueError as err:
        if "MONAI ViT" in str(err):
            raise ValueError(f"setting 'method' = 'pfedst': {err}") from None
        raise ValueError(f"setting 'extra' (pFedST side network): {err}") from None


def network_def(backbone_def: Any, settings) -> dict[str, Any]:
    """A MONAI bundle ``network_def`` building the plain ``SideTunedNetwork`` around ``backbone_def``.

    ``backbone_def`` is the bundle's original ``network_def`` (a config dict with ``_target_``, or a reference
    such as ``"@original_network_def"``).  Baked into an exported bundle, it makes ``network_def`` match the
    state dict that ``AdaptedNetwork.export()`` gives for pFedST.
    """
    options = side_options(settings)
    options.pop("lora_modules")
    return {"_target_": f"{SideTunedNetwork.__module__}.{SideTunedNetwork.__qualname__}", "backbone": backbone_def,
            **options, "seed": settings.seed}


def prepare(net: nn.Module, settings) -> tuple[SideTunedNetwork, Any]:
    """The ``MethodSpec.prepare`` hook: wrap ``net`` and point the LoRA injection at the side blocks."""
    side_tuned = build_side_tuned(net, settings)
    options = side_options(settings)
    adapted_settings = dataclasses.replace(
        settings, target_modules=lora_regex(options["lora_modules"]), blocks=None, head=(SIDE_HEAD,)
    )
    return side_tuned, adapted_settings


def extra_roles(key: str):
    """Roles of the wrapper's keys; ``None`` for the head (shared or private by ``head_shared``)."""
    if key.startswith("backbone."):
        return FROZEN
    if key.startswith("side."):
        if LORA_KEY.search(key):
            return PRIVATE
        if key == SIDE_HEAD or key.startswith(SIDE_HEAD + "."):
            return None
        return SHARED
    return None


def _private(factor: str, adapter: str) -> str:
    return PRIVATE


SPEC = register_method(
    MethodSpec(
        "pfedst",
        "pFedST: frozen ViT + side network; side blocks, ladders, gates (and head) shared, side LoRA private",
        (LOCAL,),
        _private,
        base_role=FROZEN,
        head_shared_default=True,
        personalised=True,
        extra_roles=extra_roles,
        prepare=prepare,
        heads=(SIDE_HEAD,),
        export_network_def=network_def,
        title="pFedST",
    )
)

__all__ = [
    "EXTRA_DEFAULTS", "SPEC", "build_side_tuned", "extra_roles", "lora_regex", "network_def", "prepare", "side_options",
]
