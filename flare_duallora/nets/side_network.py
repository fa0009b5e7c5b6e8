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

Frozen-backbone cache hooks: ``frozen_modules()``, ``frozen_states(x)`` (``h_0`` and the tapped block outputs, no
gradient) and ``forward_from_states(*states)`` (the side network on them); ``forward(x)`` is exactly the second on
the first.  With deterministic transforms a site computes the states once and trains only the side network
(:mod:`flare_duallora.training.prefix_cache`, executor setting ``prefix_cache``).

``side_init = "backbone"`` starts the side blocks (and the side norm, and the head when it pools the cls token) as the
backbone's blocks structurally pruned to the side width, as ladder side-tuning does (:func:`init_side_from_backbone`);
the default ``random`` is the seeded random initialisation.

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

__all__ = ["SideBlock", "SideNetwork", "SideTunedNetwork", "init_side_from_backbone", "ladder_taps"]

POOLS = ("auto", "cls", "mean")
SIDE_INITS = ("random", "backbone")


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


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, in increasing index order (ties: the lower index)."""
    return torch.sort(torch.topk(scores, k, sorted=True).indices).values


def _source_block(i: int, num_backbone_layers: int, side_layers: int) -> int:
    return max(0, round((i + 1) * num_backbone_layers / side_layers) - 1)


@torch.no_grad()
def init_side_from_backbone(side: SideNetwork, vit: ViT) -> None:
    """Initialise ``side`` from the ViT's weights, structurally pruned to the side width (LST's initialisation).

    Ladder side-tuning (Sung et al., NeurIPS 2022) starts the side network as the backbone pruned by weight
    magnitude.  Here, with ``d`` the backbone width and ``d_s`` the side width:

    * one set ``S`` of ``d_s`` residual channels is kept for the whole side network: those with the largest total
      weight L1 norm read from and written to them across the backbone's blocks (LayerNorm gains included);
    * side block ``i`` starts from backbone block ``round((i + 1) L / L') - 1`` (the block its ladder taps): its
      LayerNorms keep the channels ``S``; its attention keeps ``d_s`` inner dimensions (the side's heads taken from
      the backbone's strongest heads, the strongest dimensions of each; the query scaled by ``sqrt(d_s_head /
      d_head)`` so that the attention logits keep their temperature), its ``qkv`` rows those dimensions and its
      columns ``S``, ``out_proj`` the transpose; its MLP keeps the hidden units with the largest weight norms;
    * ``side.embed`` starts as the selection of the channels ``S`` (``s_0 = h_0[..., S]``), ``side.norm`` as the
      ViT's final norm on ``S`` and, when the side pools the cls token and has the ViT head's classes,
      ``side.head`` as the ViT head on ``S``;
    * the ladders and gates keep their seeded random initialisation.

    Raises:
        ValueError: the ViT's blocks are not MONAI ``TransformerBlock`` s with a combined ``qkv`` projection.
    """
    blocks = list(vit.blocks)
    try:
        qkv = [b.attn.qkv.weight for b in blocks]
        outs = [b.attn.out_proj.weight for b in blocks]
        w1 = [b.mlp.linear1.weight for b in blocks]
        w2 = [b.mlp.linear2.weight for b in blocks]
        g1 = [b.norm1.weight for b in blocks]
        g2 = [b.norm2.weight for b in blocks]
    except AttributeError as e:
        raise ValueError(f"'side_init' = 'backbone' needs MONAI ViT blocks (norm1, attn.qkv, attn.out_proj, norm2, "
                         f"mlp.linear1/linear2): {e}") from None
    if any(not isinstance(b.attn.qkv, nn.Linear) or not isinstance(b.attn.out_proj, nn.Linear) for b in blocks):
        raise ValueError("'side_init' = 'backbone' needs attention blocks with a combined qkv Linear and an out_proj "
                         "Linear (MONAI SABlock with use_combined_linear=True, include_fc=True)")
    d, ds = qkv[0].shape[1], side.width
    score = torch.zeros(d)
    for q, o, a, b, n1, n2 in zip(qkv, outs, w1, w2, g1, g2):
        score += q.abs().sum(0).cpu() * n1.abs().cpu() + a.abs().sum(0).cpu() * n2.abs().cpu()
        score += o.abs().sum(1).cpu() + b.abs().sum(1).cpu()
    S = _top(score, ds)

    def copy_(dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src.to(dst.device, dst.dtype))

    for i, sblk in enumerate(side.blocks):
        bblk = blocks[_source_block(i, len(blocks), len(side.blocks))]
        attn = bblk.attn
        heads, sheads = attn.num_heads, sblk.attn.num_heads
        inner = attn.qkv.weight.shape[0] // 3
        hd, shd = inner // heads, ds // sheads
        W, bias = attn.qkv.weight.detach().cpu(), attn.qkv.bias
        Wo = attn.out_proj.weight.detach().cpu()
        dim_score = sum(W[p * inner:(p + 1) * inner].abs().sum(1) for p in range(3)) + Wo.abs().sum(0)
        if sheads <= heads and shd <= hd:
            head_score = dim_score.reshape(heads, hd).sum(1)
            T = torch.cat([h * hd + _top(dim_score[h * hd:(h + 1) * hd], shd) for h in _top(head_score, sheads)])
        else:
            T = _top(dim_score, ds)
        scale = (shd / hd) ** 0.5
        for p in range(3):
            rows = p * inner + T
            block = W[rows][:, S] * (scale if p == 0 else 1.0)
            copy_(sblk.attn.qkv.weight[p * ds:(p + 1) * ds], block)
            b = bias.detach().cpu()[rows] * (scale if p == 0 else 1.0) if bias is not None else torch.zeros(ds)
            copy_(sblk.attn.qkv.bias[p * ds:(p + 1) * ds], b)
        copy_(sblk.attn.out_proj.weight, Wo[S][:, T])
        copy_(sblk.attn.out_proj.bias, attn.out_proj.bias.detach().cpu()[S] if attn.out_proj.bias is not None
              else torch.zeros(ds))
        for sn, bn in ((sblk.norm1, bblk.norm1), (sblk.norm2, bblk.norm2)):
            copy_(sn.weight, bn.weight.detach().cpu()[S])
            copy_(sn.bias, bn.bias.detach().cpu()[S])
        A, B = bblk.mlp.linear1, bblk.mlp.linear2
        m_side = sblk.mlp.linear1.out_features
        if m_side <= A.out_features and A.out_features == B.in_features:
            U = _top(A.weight.detach().cpu()[:, S].abs().sum(1) + B.weight.detach().cpu()[S].abs().sum(0), m_side)
            copy_(sblk.mlp.linear1.weight, A.weight.detach().cpu()[U][:, S])
            copy_(sblk.mlp.linear1.bias, A.bias.detach().cpu()[U])
            copy_(sblk.mlp.linear2.weight, B.weight.detach().cpu()[S][:, U])
            copy_(sblk.mlp.linear2.bias, B.bias.detach().cpu()[S])
    side.embed.weight.zero_()
    side.embed.weight[torch.arange(ds), S.to(side.embed.weight.device)] = 1.0
    side.embed.bias.zero_()
    copy_(side.norm.weight, vit.norm.weight.detach().cpu()[S])
    copy_(side.norm.bias, vit.norm.bias.detach().cpu()[S])
    head = getattr(vit, "classification_head", None)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)] if head is not None else []
    if side.pool == "cls" and linears and linears[0].out_features == side.head.out_features:
        copy_(side.head.weight, linears[0].weight.detach().cpu()[:, S])
        if linears[0].bias is not None:
            copy_(side.head.bias, linears[0].bias.detach().cpu())


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
        side_init: ``random`` (seeded initialisation) or ``backbone``: the side blocks, the side norm and (for a
            ``cls`` pool with the same classes) the head start as the backbone's, pruned to the side width as in
            ladder side-tuning (see :func:`init_side_from_backbone`); ladders and gates stay seeded random.
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
        side_init: str = "random",
    ):
        super().__init__()
        if side_init not in SIDE_INITS:
            raise ValueError(f"'side_init' = {side_init!r}: expected one of {SIDE_INITS}")
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
        if side_init == "backbone":
            init_side_from_backbone(self.side, vit)
        self.side_init = side_init
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

    # ------------------------------------------------------------------ frozen-backbone cache hooks
    # (read by flare_duallora.training.prefix_cache.StatesSplit: the backbone is frozen, so with deterministic
    # transforms its states are the same for an image in every epoch; a site computes them once and trains only
    # the side network on them)
    @property
    def state_taps(self) -> tuple[int, ...]:
        """The backbone blocks whose outputs feed a ladder, in the order :meth:`frozen_states` returns them."""
        return tuple(sorted(set(self.side.taps.values())))

    @property
    def frozen_states_description(self) -> str:
        taps = ", ".join(map(str, self.state_taps))
        return f"pFedST's frozen backbone (h_0 and the outputs of block(s) {taps}, which feed the side network)"

    def frozen_modules(self) -> list[nn.Module]:
        """The modules :meth:`frozen_states` runs (none of them may train for the states to be cached)."""
        return [self.backbone]

    def frozen_states(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(h_0, h_{t_1}, ..., h_{t_k})`` for the taps :attr:`state_taps`, computed without gradient."""
        with torch.no_grad():
            h0, hidden = self.backbone_states(x)
        return (h0, *(hidden[j] for j in self.state_taps))

    def forward_from_states(self, h0: torch.Tensor, *hidden: torch.Tensor) -> torch.Tensor:
        """The side network on states given by :meth:`frozen_states` (computed now or cached): the logits."""
        taps = self.state_taps
        if len(hidden) != len(taps):
            raise ValueError(f"expected {len(taps)} tapped backbone states (blocks {list(taps)}), got {len(hidden)}")
        return self.side(h0, dict(zip(taps, hidden)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from_states(*self.frozen_states(x))
