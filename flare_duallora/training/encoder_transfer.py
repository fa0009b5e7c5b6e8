"""One foundation model, two tasks: carry a pretrained ViT encoder from the classification bundle's checkpoint into
the segmentation bundle's network.

:func:`transfer_encoder` copies every ``vit.*`` tensor (patch embedding, positions, cls token, blocks, final norm) of
a source state dict into a target network that has the same key; the classification head has no counterpart and is
left out.  The only tensor whose shape may differ is the patch projection's kernel when the input channels differ
(the CMR classifier reads ED and ES as two channels, the segmenter one frame): its channels are summed, which is
exactly the classifier's projection of that frame given in both channels (``conv([x, x], W) = conv(x, W_0 + W_1)``);
any other mismatch is an error naming the key.  :func:`write_segmentation_base` writes a segmentation bundle's
``models/model.pt``: the transferred encoder and a decoder initialised from a seed, so every site starts from the same
base.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import nn

__all__ = ["ENCODER_PREFIX", "ENCODER_SIZE_IDS", "encoder_sizes", "segmentation_base_from_bundle", "transfer_encoder",
           "write_segmentation_base"]

#: the config ids both reference bundles size their ViT (and its input) with
ENCODER_SIZE_IDS = ("image_size", "patch_size", "roi_scale", "hidden_size", "mlp_dim", "num_layers", "num_heads")

ENCODER_PREFIX = "vit."
_PATCH_KERNEL = "vit.patch_embedding.patch_embeddings.weight"


def transfer_encoder(source: Mapping[str, torch.Tensor], target: nn.Module) -> list[str]:
    """Load the ``vit.*`` tensors of ``source`` into ``target`` (in place); returns the keys loaded.

    Raises ``ValueError`` when a target encoder key is missing from ``source`` or has another shape (beyond the
    patch kernel's input channels)."""
    state = target.state_dict()
    loaded = []
    for key, value in state.items():
        if not key.startswith(ENCODER_PREFIX):
            continue
        if key not in source:
            raise ValueError(f"the pretrained checkpoint has no {key} (the segmentation encoder needs every "
                             f"{ENCODER_PREFIX}* tensor of the classification bundle's ViT)")
        src = source[key].detach().cpu()
        if key == _PATCH_KERNEL and src.shape != value.shape and src.shape[0] == value.shape[0] \
                and src.shape[2:] == value.shape[2:] and value.shape[1] == 1:
            src = src.sum(dim=1, keepdim=True)
        if src.shape != value.shape:
            raise ValueError(f"pretrained {key} has shape {tuple(src.shape)}, the segmentation encoder "
                             f"{tuple(value.shape)}: build both bundles with the same ViT size (image_size, "
                             f"patch_size, hidden_size, mlp_dim, num_layers, num_heads)")
        state[key] = src.to(value.dtype)
        loaded.append(key)
    target.load_state_dict(state, strict=True)
    return loaded


def write_segmentation_base(classification_checkpoint: str | Path, seg_bundle: str | Path,
                            overrides: Optional[Mapping] = None, seed: int = 0) -> Path:
    """``<seg_bundle>/models/model.pt``: the segmentation network of ``seg_bundle`` (built with ``overrides``, the
    decoder seeded by ``seed``) with the encoder of ``classification_checkpoint``; the ``overrides`` are written into
    the bundle's config so that the bundle alone describes the network its weights belong to."""
    from flare_duallora.bundle import BundleRuntime
    from flare_duallora.training.pretrain import write_config_values

    source = torch.load(str(classification_checkpoint), map_location="cpu", weights_only=True)
    runtime = BundleRuntime(seg_bundle, overrides=dict(overrides or {}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = runtime.build_network()
    transfer_encoder(source, net)
    out = runtime.pretrained_path
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), out)
    write_config_values(seg_bundle, dict(overrides or {}))
    return out


def encoder_sizes(classification_bundle: str | Path) -> dict:
    """The ViT's size as the classification bundle's config states it (:data:`ENCODER_SIZE_IDS`)."""
    from flare_duallora.bundle import BundleRuntime

    runtime = BundleRuntime(classification_bundle)
    return {k: runtime.get(k) for k in ENCODER_SIZE_IDS if runtime.has(k)}


def segmentation_base_from_bundle(classification_bundle: str | Path, seg_bundle: str | Path,
                                  overrides: Optional[Mapping] = None, seed: int = 0) -> Path:
    """:func:`write_segmentation_base` from a pretrained classification bundle: its ``models/model.pt`` and the ViT
    size its config states (``overrides`` on top, e.g. the decoder's ``feature_size``)."""
    checkpoint = Path(classification_bundle) / "models" / "model.pt"
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: the classification bundle has no pretrained weights to take the encoder "
                                f"from (flare-duallora pretrain --bundle {classification_bundle} ...)")
    return write_segmentation_base(checkpoint, seg_bundle, {**encoder_sizes(classification_bundle),
                                                            **dict(overrides or {})}, seed)
