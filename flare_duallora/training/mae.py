"""Masked autoencoding (MAE, He et al. 2022) of a bundle network's own MONAI ViT: self-supervised, no labels.

The encoder *is* the ViT inside the bundle's ``network_def`` (found with :func:`~flare_duallora.nets.vit.find_vit`):
its patch embedding (with positions), its cls token, its blocks and its final norm.  A random ``mask_ratio`` of the
patch tokens of each image is dropped; the encoder sees the visible tokens plus the cls token; a light decoder
(a linear projection, a learned mask token and position embedding, ``decoder_depth`` transformer blocks, a linear
pixel head) reconstructs the pixels of the masked patches.  The loss is the mean squared error on the masked patches
only, against targets normalised per patch (zero mean, unit variance over the patch's pixels and channels; MAE's
``norm_pix_loss``).  After training the decoder is thrown away and the ViT's weights are the pretrained backbone.

Token order: MONAI's patch embedding (conv or perceptron) flattens the patch grid row-major over the spatial axes
(``h w d``), and :func:`patchify` lists the patches' pixels in the same order, so target ``i`` is token ``i``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from monai.networks.blocks import TransformerBlock
from monai.networks.nets import ViT
from torch import nn

from flare_duallora.nets.vit import find_vit, vit_tokens

__all__ = ["MaskedAutoencoder", "patchify", "random_masking"]


def patchify(x: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """``(B, C, *spatial)`` -> ``(B, N, C * prod(patch))``, patches in MONAI's token order (row-major grid)."""
    b, c, *spatial = x.shape
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != len(spatial) or any(s % p for s, p in zip(spatial, patch)):
        raise ValueError(f"patch size {patch} does not tile the image size {tuple(spatial)}")
    grid = [s // p for s, p in zip(spatial, patch)]
    shape = [b, c]
    for g, p in zip(grid, patch):
        shape += [g, p]
    x = x.reshape(shape)
    n = len(spatial)
    grid_axes = [2 + 2 * i for i in range(n)]
    patch_axes = [3 + 2 * i for i in range(n)]
    x = x.permute(0, *grid_axes, 1, *patch_axes)
    return x.reshape(b, -1, c * int(torch.tensor(patch).prod()))


def random_masking(batch: int, n_tokens: int, n_keep: int, device, generator: Optional[torch.Generator] = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image, a random subset of ``n_keep`` visible tokens.

    Returns ``(keep, restore, mask)``: the visible token indices ``(B, n_keep)``, the permutation that puts the
    shuffled sequence back in order ``(B, N)``, and ``mask`` ``(B, N)`` with 1 on the masked tokens.
    """
    noise = torch.rand(batch, n_tokens, generator=generator, device="cpu").to(device)
    shuffle = noise.argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    keep = shuffle[:, :n_keep]
    mask = torch.ones(batch, n_tokens, device=device)
    mask[:, :n_keep] = 0
    mask = torch.gather(mask, 1, restore)
    return keep, restore, mask


class MaskedAutoencoder(nn.Module):
    """The network's ViT as an MAE encoder, plus a light decoder.

    Args:
        net: the bundle network (e.g. :class:`~flare_duallora.nets.ViTClassifier`); its ViT is trained in place.
        mask_ratio: fraction of the patch tokens masked in each image (0.75 as in MAE; at least one token stays
            visible and at least one is masked).
        decoder_dim, decoder_depth, decoder_heads: the decoder's width (default: half the encoder's, at least 16),
            number of transformer blocks (default 1) and heads (default: the largest of 4, 2, 1 dividing the width).
        patch_size: the ViT's patch size (default: read from its conv patch embedding).
    """

    def __init__(self, net: nn.Module, mask_ratio: float = 0.75, decoder_dim: Optional[int] = None,
                 decoder_depth: int = 1, decoder_heads: Optional[int] = None,
                 patch_size: Optional[Sequence[int]] = None):
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"setting 'mask_ratio' = {mask_ratio!r}: expected a number in (0, 1)")
        self.vit_name, vit = find_vit(net)
        self.net = net
        self.mask_ratio = float(mask_ratio)
        embed = vit.patch_embedding
        self.patch_size = tuple(int(k) for k in patch_size) if patch_size is not None else self._patch_size(embed)
        self.n_tokens = int(embed.n_patches)
        hidden = int(embed.position_embeddings.shape[-1])
        self.patch_pixels = int(embed.patch_dim)  # in_channels x prod(patch)
        dim = int(decoder_dim or max(16, hidden // 2))
        heads = int(decoder_heads or next(h for h in (4, 2, 1) if dim % h == 0))
        self.decoder_embed = nn.Linear(hidden, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_pos = nn.Parameter(torch.zeros(1, self.n_tokens, dim))
        self.decoder_blocks = nn.ModuleList(
            TransformerBlock(hidden_size=dim, mlp_dim=4 * dim, num_heads=heads, dropout_rate=0.0, qkv_bias=True)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(dim)
        self.decoder_pred = nn.Linear(dim, self.patch_pixels)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.decoder_pos, std=0.02)

    @staticmethod
    def _patch_size(embed: nn.Module) -> tuple[int, ...]:
        for m in embed.modules():
            if isinstance(m, nn.modules.conv._ConvNd):  # conv patch embedding: kernel = stride = patch
                return tuple(int(k) for k in m.kernel_size)
        raise ValueError("cannot read the patch size from the ViT's patch embedding (not 'conv'): pass patch_size=")

    @property
    def vit(self) -> ViT:
        return find_vit(self.net)[1]

    @property
    def n_keep(self) -> int:
        return min(self.n_tokens - 1, max(1, int(round(self.n_tokens * (1.0 - self.mask_ratio)))))

    def encode(self, x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The visible tokens (and the cls token first, if the ViT has one) through the ViT's blocks and norm;
        returns the encoded tokens and whether the first one is the cls token."""
        vit = self.vit
        tokens = vit_tokens(vit, x)  # patch embedding with positions, cls token prepended when the ViT has one
        has_cls = hasattr(vit, "cls_token")
        cls, patches = (tokens[:, :1], tokens[:, 1:]) if has_cls else (None, tokens)
        visible = torch.gather(patches, 1, keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        h = torch.cat((cls, visible), dim=1) if has_cls else visible
        for block in vit.blocks:
            h = block(h)
        return vit.norm(h), has_cls

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, predicted patches (B, N, P), mask (B, N))`` for images ``x`` ``(B, C, *spatial)``.

        ``generator`` (a CPU generator) draws the masks, for reproducible runs."""
        b = x.shape[0]
        keep, restore, mask = random_masking(b, self.n_tokens, self.n_keep, x.device, generator)
        latent, has_cls = self.encode(x, keep)
        h = self.decoder_embed(latent)
        cls, h = (h[:, :1], h[:, 1:]) if has_cls else (None, h)
        filler = self.mask_token.expand(b, self.n_tokens - h.shape[1], -1)
        h = torch.cat((h, filler), dim=1)
        h = torch.gather(h, 1, restore.unsqueeze(-1).expand(-1, -1, h.shape[-1])) + self.decoder_pos
        if has_cls:  # the cls token reaches the decoder as a summary of the visible patches (as in MAE), so the
            h = torch.cat((cls, h), dim=1)  # encoder learns to put something of the whole image into it
        for block in self.decoder_blocks:
            h = block(h)
        pred = self.decoder_pred(self.decoder_norm(h[:, 1:] if has_cls else h))
        target = patchify(x, self.patch_size)
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = (pred - target).pow(2).mean(dim=-1)
        loss = (per_patch * mask).sum() / mask.sum()
        return loss, pred, mask
