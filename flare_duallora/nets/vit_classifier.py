"""A MONAI ``ViT`` image classifier that returns logits only.

``monai.networks.nets.ViT(classification=True)`` has two properties that make it awkward inside a bundle
or a ``SupervisedTrainer``:

* ``forward`` returns a tuple ``(logits, hidden_states_out)``, which a loss function cannot take;
* the classification head ends with ``nn.Tanh()`` by default (``post_activation="Tanh"``), which squashes
  the logits into ``[-1, 1]`` and is wrong for ``CrossEntropyLoss``.

:class:`ViTClassifier` wraps the MONAI ViT (``post_activation=None``) and returns the logits tensor only.
With ``sdpa=True`` every self-attention block runs through ``torch.nn.functional.scaled_dot_product_attention``
(MONAI's ``SABlock.use_flash_attention``) instead of the explicit einsum/softmax path. Both paths have the
same parameters, so checkpoints are interchangeable.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import ViT
from torch import nn

from .vit import POOLS, set_vit_attn_dropout, set_vit_sdpa, vit_readout, vit_tokens

__all__ = ["ViTClassifier"]


class ViTClassifier(nn.Module):
    """ViT classifier producing ``(B, num_classes)`` logits (no ``Tanh``, no hidden-state tuple).

    The MONAI module names are kept unchanged under the ``vit.`` prefix, so LoRA adapters can target them
    with regexes such as ``r".*vit\\.blocks\\.(2|3)\\.attn\\.(qkv|out_proj)"``.  For ``num_layers=L``:

    ===========================================  ==============================================================
    module name                                  type / role
    ===========================================  ==============================================================
    ``vit.patch_embedding.patch_embeddings``     ``ConvNd`` patch projection (``proj_type="conv"``)
    ``vit.patch_embedding.position_embeddings``  learnable positional embedding (a ``Parameter``)
    ``vit.cls_token``                            class token (a ``Parameter``)
    ``vit.blocks.{i}.norm1`` / ``.norm2``        ``LayerNorm``, ``i`` in ``0..L-1``
    ``vit.blocks.{i}.attn.qkv``                  ``Linear(hidden, 3*hidden, bias=qkv_bias)`` (fused q/k/v)
    ``vit.blocks.{i}.attn.out_proj``             ``Linear(hidden, hidden)``
    ``vit.blocks.{i}.mlp.linear1``               ``Linear(hidden, mlp_dim)``
    ``vit.blocks.{i}.mlp.linear2``               ``Linear(mlp_dim, hidden)``
    ``vit.norm``                                 final ``LayerNorm``
    ``vit.classification_head``                  ``Linear(hidden, num_classes)`` (a plain Linear, no Sequential)
    ===========================================  ==============================================================

    In MONAI 1.6 ``vit.blocks.{i}.attn.to_q/to_k/to_v`` (one shared ``Identity``) and
    ``vit.blocks.{i}.cross_attn`` (``Identity``) also exist but hold no parameters, and
    ``vit.blocks.{i}.norm_cross_attn`` is an unused ``LayerNorm`` (its parameters are in the state_dict but get
    no gradient).  Anchor regexes on ``blocks\\.N\\.attn\\.`` so they never match cross attention on other
    MONAI versions.

    Args:
        in_channels: number of input channels (2 for ED+ES cardiac volumes, 3 for RGB).
        img_size: spatial input size, e.g. ``(64, 64, 8)`` or ``(64, 64)``.
        patch_size: patch size; must divide ``img_size``.
        num_classes: number of output logits.
        hidden_size: token width; divisible by ``num_heads``.
        mlp_dim: hidden width of the MLP blocks.
        num_layers: number of transformer blocks.
        num_heads: number of attention heads.
        spatial_dims: 2 or 3.
        dropout_rate: dropout in the patch embedding, attention and MLP blocks.
        qkv_bias: add a bias to the fused ``qkv`` projection.
        sdpa: run attention through ``torch.nn.functional.scaled_dot_product_attention``.
        proj_type: patch embedding type (``"conv"`` or ``"perceptron"``), passed to MONAI.
        pos_embed_type: positional embedding type (``"learnable"``, ``"sincos"``, ``"none"``).
        pool: ``cls`` (MONAI's head on the cls token) or ``mean`` (the head on the mean of the patch tokens, how
            masked-autoencoder backbones are fine-tuned); the weights are the same either way.
        feature_norm: standardise the pooled features before the head with statistics set at pretraining
            (a ``BatchNorm1d`` without affine parameters; its statistics are buffers that stay frozen).

    Note:
        MONAI's SDPA path passes ``dropout_p=dropout_rate`` even in eval mode.  This wrapper sets the
        attention dropout of the SDPA path to 0 in ``eval()`` and restores it in ``train()``, so evaluation is
        deterministic on both paths.
    """

    def __init__(
        self,
        in_channels: int,
        img_size: Sequence[int] | int,
        patch_size: Sequence[int] | int,
        num_classes: int = 2,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_layers: int = 12,
        num_heads: int = 12,
        spatial_dims: int = 3,
        dropout_rate: float = 0.0,
        qkv_bias: bool = False,
        sdpa: bool = True,
        proj_type: str = "conv",
        pos_embed_type: str = "learnable",
        pool: str = "cls",
        feature_norm: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.vit = ViT(
            in_channels=in_channels,
            img_size=img_size,
            patch_size=patch_size,
            hidden_size=hidden_size,
            mlp_dim=mlp_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            proj_type=proj_type,
            pos_embed_type=pos_embed_type,
            classification=True,
            num_classes=num_classes,
            dropout_rate=dropout_rate,
            spatial_dims=spatial_dims,
            post_activation=None,
            qkv_bias=qkv_bias,
        )
        if pool not in POOLS:
            raise ValueError(f"pool {pool!r}: expected one of {POOLS}")
        self.pool = pool
        # standardises the pooled features with statistics fixed at pretraining time (MAE features have a small
        # spread between images; the MAE paper's linear probe puts the same non-affine BatchNorm before the head)
        self.feature_norm = nn.BatchNorm1d(hidden_size, affine=False, momentum=None) if feature_norm else None
        self._attn_dropout = float(dropout_rate)
        self.set_sdpa(sdpa)

    @property
    def sdpa(self) -> bool:
        """Whether attention runs through torch SDPA (``SABlock.use_flash_attention``)."""
        return self._sdpa

    def set_sdpa(self, enabled: bool) -> None:
        """Switch every attention block between the SDPA and the einsum implementation (same weights)."""
        self._sdpa = bool(enabled)
        set_vit_sdpa(self.vit, self._sdpa)
        self._sync_attn_dropout()

    def _sync_attn_dropout(self) -> None:
        # SDPA gets ``dropout_p=SABlock.dropout_rate`` regardless of train/eval: disable it outside training.
        set_vit_attn_dropout(self.vit, self._attn_dropout if self.training else 0.0)

    def train(self, mode: bool = True) -> ViTClassifier:
        super().train(mode)
        self._sync_attn_dropout()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the ``(B, num_classes)`` logits for an input of shape ``(B, in_channels, *img_size)``."""
        if self.pool == "cls" and self.feature_norm is None:
            logits, _ = self.vit(x)
            return logits
        h = vit_tokens(self.vit, x)
        for block in self.vit.blocks:
            h = block(h)
        return self.readout(h)

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """The logits from the last block's tokens: final norm, pooling, feature standardisation, head."""
        return vit_readout(self.vit, h, self.pool, self.feature_norm)
