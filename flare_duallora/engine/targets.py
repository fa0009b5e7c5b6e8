"""Choose which modules get adapters: a name pattern plus an optional transformer-block selection."""

from __future__ import annotations

import re
from typing import Optional, Sequence, Union

from torch import nn

# Layer types peft's LoRA supports and this plugin targets (peft 0.21 has no LoRA for ConvTranspose).
SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

#: ``target_modules`` / ``head`` presets for the networks hospitals bring (MONAI module names; README table).
#: Each adapts the encoder's convolutions or attention projections and names the decoder / head that every method
#: trains (shared by default); the patterns never match a ConvTranspose (which peft cannot adapt).
PRESETS: dict[str, dict] = {
    "UNet": {"target_modules": r".*\.conv\.unit\d+\.conv", "head": "model.2"},
    "SegResNet": {"target_modules": r"(down_layers|up_layers)\.\d+\.\d+\.conv[12]\.conv", "head": "conv_final"},
    "UNETR": {"target_modules": r"vit\.blocks\.\d+\.attn\.(qkv|out_proj)", "head": "out"},
    "SwinUNETR": {"target_modules": r"swinViT\.layers\d\.0\.blocks\.\d+\.attn\.(qkv|proj)", "head": "out"},
    "DenseNet121": {"target_modules": r"features\.denseblock4\.denselayer\d+\.layers\.conv[12]",
                    "head": "class_layers.out"},
    "SEResNet50": {"target_modules": r"layer4\.\d+\.conv[123]\.conv", "head": "last_linear"},
    "ViT": {"target_modules": r".*blocks\.\d+\.attn\.(qkv|out_proj)", "head": "classification_head"},
}

Blocks = Union[None, int, str, Sequence[int]]


def _block_index(name: str, block_pattern: str) -> Optional[int]:
    m = re.search(rf"(?:^|\.){re.escape(block_pattern)}\.(\d+)(?:\.|$)", name)
    return int(m.group(1)) if m else None


def _parse_blocks(blocks: Blocks, available: list[int]) -> Optional[set[int]]:
    """``None`` (all), an int ``n`` or ``"last:n"`` (the last n blocks), ``"first:n"``, or explicit indices."""
    if blocks is None:
        return None
    if isinstance(blocks, str):
        m = re.fullmatch(r"(last|first):(\d+)", blocks.strip())
        if m is None:
            raise ValueError(f"setting 'blocks' = {blocks!r}: expected 'last:N', 'first:N', an int or a list of ints")
        which, n = m.group(1), int(m.group(2))
        blocks = n if which == "last" else list(available[:n])
    if isinstance(blocks, int):
        if blocks <= 0:
            raise ValueError(f"setting 'blocks' = {blocks}: the number of blocks must be > 0")
        if blocks > len(available):
            raise ValueError(f"setting 'blocks' = {blocks}: the network has only {len(available)} blocks")
        return set(available[-blocks:])
    chosen = {int(b) for b in blocks}
    missing = chosen - set(available)
    if missing:
        raise ValueError(f"setting 'blocks': block(s) {sorted(missing)} do not exist; the network has {available}")
    return chosen


def _matches(name: str, target_modules: Union[str, Sequence[str]]) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def resolve_targets(
    net: nn.Module,
    target_modules: Union[str, Sequence[str]],
    blocks: Blocks = None,
    block_pattern: str = "blocks",
    exclude: Sequence[str] = (),
) -> list[str]:
    """Full names of the modules that get adapters.

    Args:
        target_modules: a regex matched against the whole module name (``re.fullmatch``, as peft does) or a list
            of names / name suffixes (``["qkv", "out_proj"]``).
        blocks: restrict to transformer blocks: ``"last:2"``, ``2`` (= the last two), ``[10, 11]``.
        block_pattern: the name of the block container (``blocks`` for MONAI ViT).
        exclude: module name prefixes never adapted (e.g. the classification head).

    Raises:
        ValueError naming the setting when nothing matches.
    """
    if not target_modules:
        raise ValueError("setting 'target_modules' is empty")
    unsupported = [
        f"{name} ({type(mod).__name__})"
        for name, mod in net.named_modules()
        if name
        and not isinstance(mod, SUPPORTED_LAYERS)
        and any(True for _ in mod.parameters(recurse=False))  # a layer with weights, not a container
        and _matches(name, target_modules)
        and not any(name == e or name.startswith(e + ".") for e in exclude)
    ]
    if unsupported:
        shown = ", ".join(unsupported[:8]) + (f" and {len(unsupported) - 8} more" if len(unsupported) > 8 else "")
        raise ValueError(
            f"setting 'target_modules' = {target_modules!r} matches layer(s) LoRA cannot adapt: {shown}; peft adapts "
            f"only Linear, Conv1d, Conv2d and Conv3d (no ConvTranspose): narrow the pattern (see the presets in "
            f"flare_duallora.engine.targets.PRESETS) or name such a layer as 'head' to train it whole")
    candidates = [
        name
        for name, mod in net.named_modules()
        if name
        and isinstance(mod, SUPPORTED_LAYERS)
        and _matches(name, target_modules)
        and not any(name == e or name.startswith(e + ".") for e in exclude)
    ]
    if not candidates:
        raise ValueError(
            f"setting 'target_modules' = {target_modules!r} matches no Linear/Conv module of {type(net).__name__} "
            f"(its layers with weights include: {', '.join(_layer_names(net)[:6])})"
        )
    if blocks is None:
        return candidates
    available = sorted({i for name, _ in net.named_modules() if (i := _block_index(name, block_pattern)) is not None})
    if not available:
        raise ValueError(f"setting 'blocks' = {blocks!r}: no '{block_pattern}.<N>' modules in {type(net).__name__}")
    chosen = _parse_blocks(blocks, available)
    selected = [n for n in candidates if _block_index(n, block_pattern) in chosen]
    if not selected:
        raise ValueError(
            f"settings 'target_modules' = {target_modules!r} and 'blocks' = {blocks!r} select no module together"
        )
    return selected


def _layer_names(net: nn.Module) -> list[str]:
    return [f"{n} ({type(m).__name__})" for n, m in net.named_modules()
            if n and isinstance(m, SUPPORTED_LAYERS)]


def targets_regex(names: Sequence[str]) -> str:
    """An exact-match regex for peft's ``target_modules`` (peft applies ``re.fullmatch``)."""
    return "(" + "|".join(re.escape(n) for n in names) + ")"
