"""A UNETR-style segmentation network whose encoder is the same MONAI ViT as :class:`~.vit_classifier.ViTClassifier`.

One foundation model, two tasks: the encoder's module names and parameter shapes are those of the classifier's
``vit`` (``vit.patch_embedding.*``, ``vit.cls_token``, ``vit.blocks.{i}.*``, ``vit.norm``), only the classification
head is absent, so a masked-autoencoder-pretrained classifier checkpoint loads into it
(:func:`flare_duallora.training.encoder_transfer.transfer_encoder`) and the same LoRA target regexes
(``vit.blocks.N.attn.(qkv|out_proj)``) adapt it.

Decoder (UNETR, Hatamizadeh et al. 2022, reduced to two skip levels and without transposed convolutions, which peft
cannot adapt)::

    z_mid, z_L  = tokens after block L//2 and after the last block (final norm), cls token dropped, as grids
    d1          = up(proj_deep(z_L)) ++ up(proj_mid(z_mid))  -> conv block      (patch grid x f1)
    d0          = up(d1) ++ stem(x)                          -> conv block      (full resolution)
    logits      = out(d0)                                                       (out_channels)

``up`` is trilinear (bilinear in 2D) up-sampling; the factors ``f1 = max(1, p // 2)`` and ``p / f1`` per axis
(``p`` the patch size) bring the patch grid back to the input size.  Every module of the decoder sits under
``decoder.``, the module prefix a job names as the head trained whole.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import ViT
from torch import nn

from .vit import set_vit_attn_dropout, set_vit_sdpa, vit_tokens

__all__ = ["ViTSegmenter"]


def _tuple(value, n: int) -> tuple[int, ...]:
    out = tuple(int(v) for v in value) if isinstance(value, Sequence) else (int(value),) * n
    if len(out) != n:
        raise ValueError(f"expected {n} sizes, got {value!r}")
    return out


class _ConvBlock(nn.Sequential):
    def __init__(self, dims: int, cin: int, cout: int):
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        norm = nn.InstanceNorm3d if dims == 3 else nn.InstanceNorm2d
        super().__init__(conv(cin, cout, 3, padding=1), norm(cout, affine=True), nn.LeakyReLU(0.01, inplace=True),
                         conv(cout, cout, 3, padding=1), norm(cout, affine=True), nn.LeakyReLU(0.01, inplace=True))


class _Decoder(nn.Module):
    def __init__(self, dims: int, in_channels: int, hidden: int, feature_size: int, out_channels: int,
                 patch: tuple[int, ...]):
        super().__init__()
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        mode = "trilinear" if dims == 3 else "bilinear"
        f = feature_size
        first = tuple(max(1, p // 2) for p in patch)
        second = tuple(p // a for p, a in zip(patch, first))
        self.proj_deep = conv(hidden, 4 * f, 1)
        self.proj_mid = conv(hidden, 2 * f, 1)
        self.up1 = nn.Upsample(scale_factor=first, mode=mode, align_corners=False)
        self.block1 = _ConvBlock(dims, 6 * f, 2 * f)
        self.up0 = nn.Upsample(scale_factor=second, mode=mode, align_corners=False)
        self.stem = _ConvBlock(dims, in_channels, f)
        self.block0 = _ConvBlock(dims, 3 * f, f)
        self.out = conv(f, out_channels, 1)

    def forward(self, x: torch.Tensor, mid: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        d1 = self.block1(torch.cat((self.up1(self.proj_deep(deep)), self.up1(self.proj_mid(mid))), dim=1))
        d0 = self.block0(torch.cat((self.up0(d1), self.stem(x)), dim=1))
        return self.out(d0)


class ViTSegmenter(nn.Module):
    """``(B, in_channels, *img_size)`` -> ``(B, out_channels, *img_size)`` logits from a ViT encoder and a UNETR-style
    decoder.  Arguments as :class:`~.vit_classifier.ViTClassifier` (``out_channels`` instead of ``num_classes``),
    plus ``feature_size`` (the decoder's width at full resolution)."""

    def __init__(
        self,
        in_channels: int,
        img_size: Sequence[int] | int,
        patch_size: Sequence[int] | int,
        out_channels: int = 4,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_layers: int = 12,
        num_heads: int = 12,
        spatial_dims: int = 3,
        dropout_rate: float = 0.0,
        qkv_bias: bool = False,
        sdpa: bool = True,
        feature_size: int = 16,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.img_size = _tuple(img_size, spatial_dims)
        self.patch_size = _tuple(patch_size, spatial_dims)
        if any(s % p for s, p in zip(self.img_size, self.patch_size)):
            raise ValueError(f"patch_size {self.patch_size} does not tile img_size {self.img_size}")
        self.grid = tuple(s // p for s, p in zip(self.img_size, self.patch_size))
        self.out_channels = int(out_channels)
        self.vit = ViT(in_channels=in_channels, img_size=self.img_size, patch_size=self.patch_size,
                       hidden_size=hidden_size, mlp_dim=mlp_dim, num_layers=num_layers, num_heads=num_heads,
                       proj_type="conv", pos_embed_type="learnable", classification=False, dropout_rate=dropout_rate,
                       spatial_dims=spatial_dims, qkv_bias=qkv_bias)
        # the classifier's cls token (MONAI adds it only with classification=True): same key, same role in attention
        self.vit.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.mid_layer = max(0, num_layers // 2 - 1)
        self.decoder = _Decoder(spatial_dims, in_channels, hidden_size, int(feature_size), self.out_channels,
                                self.patch_size)
        set_vit_sdpa(self.vit, sdpa)
        self._attn_dropout = float(dropout_rate)

    def train(self, mode: bool = True) -> "ViTSegmenter":
        super().train(mode)
        set_vit_attn_dropout(self.vit, self._attn_dropout if mode else 0.0)  # SDPA drops out in eval too
        return self

    def _grid(self, tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, 1:]  # drop the cls token
        return patches.transpose(1, 2).reshape(tokens.shape[0], -1, *self.grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = vit_tokens(self.vit, x)
        mid = None
        for i, block in enumerate(self.vit.blocks):
            h = block(h)
            if i == self.mid_layer:
                mid = h
        return self.decoder(x, self._grid(mid), self._grid(self.vit.norm(h)))

    # ------------------------------------------------------------------ frozen-prefix cache hooks
    # (:class:`flare_duallora.training.prefix_cache.StatesSplit`): the encoder before its first adapted block is
    # frozen, so what it feeds the rest is computed once per training example: the tokens entering that block, the
    # mid-level tokens the decoder reads when they come from the frozen part, and the input volume the decoder's stem
    # reads (the decoder trains, so the volume itself is a state)
    def _first_trainable_block(self) -> int:
        first = next((i for i, b in enumerate(self.vit.blocks) if any(p.requires_grad for p in b.parameters())),
                     len(self.vit.blocks))
        return first

    @property
    def frozen_states_description(self) -> str:
        k = self._first_trainable_block()
        mid = " and the mid-level tokens the decoder reads" if self.mid_layer < k else ""
        return (f"the ViT encoder's patch embedding and blocks 0-{k - 1} (the tokens entering block {k}{mid}, with the "
                f"input volume the decoder's stem reads)")

    def frozen_modules(self) -> list[nn.Module]:
        return [self.vit.patch_embedding, *self.vit.blocks[: self._first_trainable_block()]]

    def frozen_parameters_trainable(self) -> list[str]:
        """Parameters of the frozen part, outside :meth:`frozen_modules`, that train (the cache is refused when there
        is any): the cls token, a parameter of the ViT itself."""
        return ["vit.cls_token"] if self.vit.cls_token.requires_grad else []

    def frozen_states(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        k = self._first_trainable_block()
        h = vit_tokens(self.vit, x)
        mid = None
        for i, block in enumerate(self.vit.blocks[:k]):
            h = block(h)
            if i == self.mid_layer:
                mid = h
        return (x, h) if mid is None else (x, h, mid)

    def forward_from_states(self, x: torch.Tensor, h: torch.Tensor, mid: torch.Tensor | None = None) -> torch.Tensor:
        k = self._first_trainable_block()
        for i, block in enumerate(self.vit.blocks[k:], start=k):
            h = block(h)
            if i == self.mid_layer:
                mid = h
        return self.decoder(x, self._grid(mid), self._grid(self.vit.norm(h)))
