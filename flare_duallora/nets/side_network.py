"""Side-tuning wrapper for pFedST: a frozen MONAI ViT backbone plus a light, trainable side network.

pFedST (personalised federated side-tuning, MICCAI 2025) equips every site with a frozen pre-trained encoder and a
small side network that reads the encoder's intermediate activations through *ladder* connections (LST, Sung et
al., NeurIPS 2022).  Only the side network trains, so no gradient and no activation memory flows through the
backbone.  The exact pFedST architecture is not published; this is the reconstruction (the choices and their
settings are listed in :mod:`flare_duallora.engine.pfedst`)::

    h_0            = tokens entering the backbone's first block (patch embedding + position + cls token)
    h_1 .. h_L     = outputs of the backbone's L blocks (MONAI's ``hidden_states_out``), computed under no_grad
    s_0            = side.embed(h_0)                                  Linear d -> d_s
    s_i            = side.blocks[i](s_{i-1}) + sigmoid(side.gates[i]) * side.ladders[i](h_{tap(i)})
    logits         = side.head(pool(side.norm(s_L')))                 Linear d_s -> num_classes

with ``d_s = hidden_size // reduction``.  Side block ``i`` of ``L'`` taps backbone block
``tap(i) = round((i + 1) * L / L') - 1`` (so with ``L' = L`` block ``i`` taps block ``i`` and the last side block
always taps the last backbone block); with ``ladder_every = k`` only every k-th side block (counted back from
the last one) has a ladder.

Module names (the state-dict keys the sharing rule of :mod:`flare_duallora.engine.pfedst` reads)::

    backbone.<the given network>            frozen
    side.embed                              Linear(d, d_s)
    side.blocks.{i}.norm1 / .norm2          LayerNorm(d_s)
    side.blocks.{i}.attn.qkv / .out_proj    Linear(d_s, 3 d_s) / Linear(d_s, d_s)   (SDPA attention)
    side.blocks.{i}.mlp.linear1 / .linear2  Linear(d_s, m) / Linear(m, d_s)
    side.ladders.{i}                        Linear(d, d_s)       (for side blocks with a ladder)
    side.gates.{i}                          scalar gate logit    (same indices as the ladders)
    side.norm                               LayerNorm(d_s)
    side.head                               Linear(d_s, num_classes)

The class is built from plain arguments (``backbone`` plus numbers), so a bundle config can instantiate it with
``{"_target_": "flare_duallora.nets.side_network.SideTunedNetwork", "backbone": "@<network>", ...}`` to load an
exported pFedST state dict.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from monai.networks.nets import ViT
from torch import nn

from .vit import find_vit, vit_num_classes, vit_tokens

__all__ = ["SideBlock", "SideNetwork", "SideTunedNetwork", "ladder_taps"]

POOLS = ("auto", "cls", "mean")


def ladder_taps(num_backbone_layers: int, side_layers: int, ladder_every: int = 1) -> dict[int, int]:
    """``{side block index: backbone block index}`` for the side blocks that get a ladder connection."""
    taps = {}
    for i in range(side_layers):
        if (side_layers - 1 - i) % ladder_every == 0:
            taps[i] = max(0, round((i + 1) * num_backbone_layers / side_layers) - 1)
    return taps


class SideAttention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention`` (no N x N map is stored for backward
    where the fused kernel is available)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"side width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(y.transpose(1, 2).reshape(b, n, d))


class SideMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.gelu(self.linear1(x)))


class SideBlock(nn.Module):
    """A pre-norm transformer block of the side network (the personalised LoRA goes on its four Linears)."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SideAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = SideMLP(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SideNetwork(nn.Module):
    """The trainable side network: embed, L' side blocks with gated ladders, norm, pooled head."""

    def __init__(
        self,
        hidden_size: int,
        num_classes: int,
        num_backbone_layers: int,
        reduction: int = 4,
        side_layers: Optional[int] = None,
        ladder_every: int = 1,
        side_heads: int = 1,
        mlp_dim: Optional[int] = None,
        gate_init: float = 0.0,
        pool: str = "mean",
    ):
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"side pool {pool!r}: expected 'cls' or 'mean'")
        side_layers = num_backbone_layers if side_layers is None else side_layers
        self.width = hidden_size // reduction
        self.pool = pool
        self.taps = ladder_taps(num_backbone_layers, side_layers, ladder_every)
        self.embed = nn.Linear(hidden_size, self.width)
        self.blocks = nn.ModuleList(
            SideBlock(self.width, side_heads, mlp_dim or 4 * self.width) for _ in range(side_layers)
        )
        self.ladders = nn.ModuleDict({str(i): nn.Linear(hidden_size, self.width) for i in self.taps})
        self.gates = nn.ParameterDict({str(i): nn.Parameter(torch.tensor(float(gate_init))) for i in self.taps})
        self.norm = nn.LayerNorm(self.width)
        self.head = nn.Linear(self.width, num_classes)

    def forward(self, h0: torch.Tensor, hidden: dict[int, torch.Tensor]) -> torch.Tensor:
        s = self.embed(h0)
        for i, block in enumerate(self.blocks):
            s = block(s)
            if i in self.taps:
                key = str(i)
                s = s + torch.sigmoid(self.gates[key]) * self.ladders[key](hidden[self.taps[i]])
        s = self.norm(s)
        pooled = s[:, 0] if self.pool == "cls" else s.mean(dim=1)
        return self.head(pooled)


class SideTunedNetwork(nn.Module):
    """``backbone`` (frozen, run under ``torch.no_grad``) + ``side`` (trainable); ``forward`` returns logits.

    Args:
        backbone: the bundle's network; it must contain a MONAI ``ViT`` (found by scanning ``modules()``).  Only
            the ViT's patch embedding and blocks run (the wrapper's own ``forward``, the ViT's final norm and its
            classification head do not): preprocessing a wrapper does outside the ViT is bypassed.
        num_classes: outputs of ``side.head``; default: those of the ViT's classification head.
        reduction: side width ``d_s = hidden_size // reduction`` (must divide ``hidden_size``).
        side_layers: number of side blocks ``L'`` (default: as many as the backbone has blocks).
        ladder_every: a ladder into every k-th side block, counted back from the last one (which always has one).
        side_heads: attention heads of the side blocks (default: the largest number <= the backbone's heads that
            divides ``d_s``).
        mlp_ratio: side MLP width / ``d_s`` (default: the backbone's ``mlp_dim / hidden_size``).
        gate_init: initial gate logit (``sigmoid(0) = 0.5``).
        pool: ``cls`` (token 0), ``mean`` (all tokens) or ``auto`` (``cls`` when the ViT has a cls token).
        seed: seed of the side network's initialisation (identical on every site, since most of it is shared).
        backbone_eval: keep the backbone in ``eval()`` mode even when the wrapper is put in ``train()``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: Optional[int] = None,
        reduction: int = 4,
        side_layers: Optional[int] = None,
        ladder_every: int = 1,
        side_heads: Optional[int] = None,
        mlp_ratio: Optional[float] = None,
        gate_init: float = 0.0,
        pool: str = "auto",
        seed: int = 0,
        backbone_eval: bool = True,
    ):
        super().__init__()
        self._vit_path, vit = find_vit(backbone)
        block0 = vit.blocks[0]
        hidden = block0.norm1.normalized_shape[0]
        n_layers = len(vit.blocks)
        if num_classes is None:
            num_classes = vit_num_classes(vit)
            if num_classes is None:
                raise ValueError("the ViT has no classification head: give the number of classes ('num_classes')")
        if not isinstance(reduction, int) or reduction <= 0 or hidden % reduction:
            raise ValueError(f"'reduction' = {reduction!r} must be a positive integer dividing hidden_size {hidden}")
        if side_layers is not None and (not isinstance(side_layers, int) or side_layers <= 0):
            raise ValueError(f"'side_layers' = {side_layers!r} must be a positive integer")
        if not isinstance(ladder_every, int) or ladder_every <= 0:
            raise ValueError(f"'ladder_every' = {ladder_every!r} must be a positive integer")
        if pool not in POOLS:
            raise ValueError(f"'pool' = {pool!r}: expected one of {POOLS}")
        width = hidden // reduction
        if side_heads is None:
            side_heads = max(1, min(getattr(block0.attn, "num_heads", 1), width))
            while width % side_heads:
                side_heads -= 1
        elif not isinstance(side_heads, int) or side_heads <= 0 or width % side_heads:
            raise ValueError(
                f"'side_heads' = {side_heads!r} must be a positive integer dividing the side width {width}"
            )
        ratio = mlp_ratio if mlp_ratio is not None else block0.mlp.linear1.out_features / hidden
        if ratio <= 0:
            raise ValueError(f"'mlp_ratio' = {mlp_ratio!r} must be > 0")
        self.has_cls = hasattr(vit, "cls_token")
        if pool == "auto":
            pool = "cls" if self.has_cls else "mean"
        self.backbone_eval = bool(backbone_eval)
        self.backbone = backbone
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.side = SideNetwork(
                hidden, int(num_classes), n_layers, reduction=reduction, side_layers=side_layers,
                ladder_every=ladder_every, side_heads=side_heads, mlp_dim=max(1, round(ratio * width)),
                gate_init=gate_init, pool=pool,
            )
        self.num_classes = int(num_classes)
        self.train(self.training)

    @property
    def backbone_vit(self) -> ViT:
        """The backbone's MONAI ViT.  Deliberately not named ``vit``: code that splits a ``.vit`` (the frozen-prefix
        cache) must not mistake the wrapper for a plain ViT classifier.  Not registered a second time: its keys
        stay under ``backbone.``."""
        return self.backbone.get_submodule(self._vit_path) if self._vit_path else self.backbone

    def train(self, mode: bool = True) -> "SideTunedNetwork":
        super().train(mode)
        if self.backbone_eval:
            self.backbone.eval()
        return self

    def backbone_states(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """``h_0`` and the tapped block outputs, exactly as ``ViT.forward`` computes them (MONAI 1.6), stopping
        after the last tapped block; call under ``torch.no_grad()``."""
        vit = self.backbone_vit
        t = h0 = vit_tokens(vit, x)
        wanted = set(self.side.taps.values())
        last = max(wanted)
        hidden = {}
        for j, block in enumerate(vit.blocks):
            if j > last:
                break
            t = block(t)
            if j in wanted:
                hidden[j] = t
        return h0, hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            h0, hidden = self.backbone_states(x)
        return self.side(h0, hidden)
