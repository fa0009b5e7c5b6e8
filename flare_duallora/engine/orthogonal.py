"""FedOPAL orthogonality penalty between the global and the local LoRA adapter of every adapted layer.

peft stores ``lora_A`` as r x d_in (its rows span the input subspace) and ``lora_B`` as d_out x r, so the
cross-Gram that is zero exactly when the two input subspaces are orthogonal is ``A_g A_l^T`` (r_g x r_l), not
``A_g^T A_l``.  Conv adapters are flattened to the same layout (A: r x (d_in * k), B: d_out x r).

Modes (per layer; ``d`` = d_in of the flattened ``lora_A``):

``subspace`` (default)  the principal angles between the input subspaces (row spaces of ``A_g`` and ``A_l``):
           ``sum_i cos^2 theta_i / min(r_g, r_l) = tr(P_g P_l) / min(r_g, r_l)``, with ``P`` the orthogonal
           projector on a row space.  It depends on the subspaces only, so *any* re-parametrisation of an adapter
           that leaves its update unchanged (``A -> M A``, ``B -> B M^-1``, in particular ``A_l * c``, ``B_l / c``)
           leaves it unchanged.  Computed with r x r matrices only (a Cholesky of each Gram ``A A^T``).
``cosine``  the mean squared cosine between the rows of ``A_g`` and of ``A_l`` (row-normalised factors): scale-free
           per row (``A_l -> D A_l``, ``B_l -> B_l D^-1`` with ``D`` diagonal), cheaper than ``subspace``.
``delta``  ``||dW_g dW_l^T||_F^2 / (||dW_g||_F^2 ||dW_l||_F^2 + eps)``, dW = B A: the effective updates' input
           spaces apart.  Computed on the factors scaled to unit Frobenius norm, so the quantity is exactly
           scale-free and ``eps`` (1e-6) is *relative* (it equals ``eps ||B_g||^2 ||A_g||^2 ||B_l||^2 ||A_l||^2`` in
           the formula above): no fixed floor swallows the small updates of the first steps.  ``B = 0`` at
           initialisation makes ``dW = 0``, so the value is 0 there; it is active (non-zero value and gradient)
           from the first optimiser step on.
``repr``   representation level: the mean squared Pearson correlation, over the batch's tokens, between the global
           and the local branch's codes ``A_g x`` and ``A_l x`` (every pair of rank components).  The cross-covariance
           of the two branches' outputs is ``B_g Cov(A_g x, A_l x) B_l^T``, so decorrelated codes give decorrelated
           branch outputs, and unlike ``B A x`` the codes are informative from step 0 (``B = 0`` at init).  The
           inputs ``x`` are taken from the current forward pass by hooks (:class:`BranchRecorder`) and detached,
           and so is the global code: the gradient reaches ``A_l`` only, as for the weight-level modes.  Scale-free
           per component.
           (Conv adapters: the codes are the ``lora_A`` conv outputs at every output position.)
``A``      ``sum ||A_g A_l^T||_F^2`` over layers (the original form; *not* scale-invariant: ``A_l * 0.01``,
           ``B_l * 100`` leaves the network unchanged and the penalty 10^4 times lower).  Kept for comparison.
``AB``     ``sum ||A_g A_l^T||_F^2 + ||B_g^T B_l||_F^2`` (both factors; not scale-invariant).  Kept for comparison.

Where the gradient goes.  The penalty is a function of both adapters, but only the **private** (``local``) adapter
receives its gradient: the shared (``global``) factors enter every mode detached.  The paper's joint gradient also
moves the shared ``A_g`` away from ``A_l``; the direction of that move is a function of ``A_l``, and ``A_g`` is what
the site sends.  A server that sends ``B_g = 0`` and a zero head silences the data gradient, so the shared update
*is* the penalty's: 71-78 % of its energy lay in ``A_l``'s row space (chance: ``r_l / d``) and a few rounds let the
server estimate the private subspace.  With the detached shared factor the shared update carries no term that
depends on ``A_l`` (tests/test_what_leaves.py measures both).  Orthogonality is still reached: ``A_l`` alone moves
away from the current ``A_g`` (the penalty is symmetric in the two subspaces).

Normalisation and the default weight.  For the scale-free modes (``subspace``, ``cosine``, ``delta``, ``repr``) the
network-level penalty is the *mean over layers* of the per-layer value divided by its **chance level**: its expected
value for two independently initialised adapters (``max(r_g, r_l) / d`` for ``subspace``, ``1 / d`` for ``cosine``
and ``delta``, ``tr(S^2) / tr(S)^2`` for ``repr``, with ``S`` the covariance of the layer's input tokens in the batch,
i.e. one over their effective dimension; exact in expectation for ``cosine``/``delta``/``subspace`` whenever one
adapter's distribution is invariant to sign flips and permutations of the input coordinates, as peft's
Kaiming-uniform ``A`` is, and a first-order estimate for ``repr``).  So the penalty is 0 when the branches are
orthogonal, ~1 at initialisation whatever the width, rank, layer count or token statistics, and larger when the
branches overlap more than chance.

The default ``orth_lambda = "auto"`` is then ``orth_share * ln(K)`` (:func:`calibrated_lambda`), ``K`` the number of
classes of the network's head: ``ln K`` is the cross-entropy of a uniform prediction, the task loss of a fresh head,
so **the penalty starts at ``orth_share`` (default 10 %) of the initial task loss**.  10 % because the previous fixed
``lambda = 0.1`` on the raw ``A`` mode made the penalty ~0.4 % of the loss, too small to change what the optimiser
does, while a penalty of the same order as the task loss would trade accuracy for orthogonality; at 10 % the two
gradients are commensurate at the start and the task dominates.  The legacy modes ``A``/``AB`` are not normalised;
with ``"auto"`` their lambda is calibrated on the exact penalty value at injection time (adapters at their seeded
initialisation, identical on every site and on every restart).  An explicit number is used as given.

Measured at initialisation on the demo's ``small`` CMR network (hidden 64, rank 4, last two blocks, K = 2), as
``lambda * penalty / ln K``: ``subspace`` 9.5 %, ``cosine`` 10.6 %, ``A`` / ``AB`` 10.0 % (exact by construction),
``repr`` 6.7-7.2 % on real tokens (its chance level is a first-order estimate), ``delta`` 0 (``B = 0``), 9.4 % after
one Adam step at lr 1e-3.  ViT-B shapes (768, rank 8): ``subspace`` 10.8 %, ``cosine`` 10.9 %.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

DEFAULT_MODE = "subspace"
SCALE_FREE_MODES = ("subspace", "cosine", "delta", "repr")  # normalised to their chance level, mean over layers
LEGACY_MODES = ("A", "AB")  # raw sums, kept for comparison
MODES = SCALE_FREE_MODES + LEGACY_MODES
DEFAULT_SHARE = 0.1  # the calibrated penalty is this fraction of the initial task loss (ln K)
DELTA_EPS = 1e-6  # relative: added to a denominator that is <= 1 by construction
MAX_REPR_TOKENS = 4096  # tokens used to estimate the repr mode's chance level (no gradient)

LEAK_NOTE = ("with shared_gradient=True the orthogonality penalty moves the shared A_g away from the private A_l, so "
             "the shared update a site sends carries A_l's row space (71-78 % of its energy when a server silences "
             "the data gradient with B_g = 0 and a zero head)")

__all__ = [
    "BranchRecorder", "LEAK_NOTE", "DEFAULT_MODE", "DEFAULT_SHARE", "MODES", "calibrated_lambda", "chance_level",
    "dual_layers",
    "orthogonality_penalty", "pair_penalty", "representation_penalty",
]


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"setting 'orth_mode' = {mode!r}: expected one of {MODES}")


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    # r x r algebra in float64 (tiny matrices; exact scale invariance and no bf16 autocast); MPS has no float64
    return torch.float32 if t.device.type == "mps" else torch.float64


def _factors(layer: LoraLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    a = layer.lora_A[adapter].weight.flatten(1)  # r x d_in(*k)
    b = layer.lora_B[adapter].weight.flatten(1)  # d_out x r
    return a, b


def dual_layers(net: nn.Module, first: str = "global", second: str = "local") -> Iterator[tuple[str, LoraLayer]]:
    """Every LoRA layer of ``net`` that carries both adapters, with its module name."""
    for name, module in net.named_modules():
        if isinstance(module, LoraLayer) and first in module.lora_A and second in module.lora_A:
            yield name, module


def _unit(x: torch.Tensor) -> torch.Tensor:
    """``x / ||x||_F`` (0 stays 0)."""
    return x / x.norm().clamp_min(torch.finfo(x.dtype).tiny ** 0.5)


def _subspace_overlap(a_g: torch.Tensor, a_l: torch.Tensor) -> torch.Tensor:
    """``tr(P_g P_l) = ||L_g^-1 (A_g A_l^T) L_l^-T||_F^2`` with ``A A^T = L L^T`` (sum of cos^2 of principal angles)."""

    def chol(a: torch.Tensor) -> torch.Tensor:
        gram = a @ a.T
        ridge = 1e-10 * torch.diagonal(gram).mean().detach() + torch.finfo(a.dtype).tiny  # relative: scale-free
        return torch.linalg.cholesky(gram + ridge * torch.eye(a.shape[0], dtype=a.dtype, device=a.device))

    l_g, l_l = chol(a_g), chol(a_l)
    x = torch.linalg.solve_triangular(l_g, a_g @ a_l.T, upper=False)  # r_g x r_l
    y = torch.linalg.solve_triangular(l_l, x.T, upper=False)  # r_l x r_g
    return y.pow(2).sum()


def pair_penalty(a_g: torch.Tensor, b_g: torch.Tensor, a_l: torch.Tensor, b_l: torch.Tensor, mode: str) -> torch.Tensor:
    """The raw penalty of one layer, given both adapters' factors in peft layout (A: r x d_in, B: d_out x r).

    ``subspace``, ``cosine`` and ``delta`` lie in [0, 1] (see the module docstring); ``A`` and ``AB`` are raw sums.
    """
    _check_mode(mode)
    if mode == "A":
        return (a_g @ a_l.T).pow(2).sum()
    if mode == "AB":
        return (a_g @ a_l.T).pow(2).sum() + (b_g.T @ b_l).pow(2).sum()
    if mode == "repr":
        raise ValueError("orth_mode 'repr' needs the branch inputs of a forward pass: use BranchRecorder")
    out_dtype = a_g.dtype
    a_g, a_l, b_g, b_l = (t.to(_work_dtype(t)) for t in (a_g, a_l, b_g, b_l))
    if mode == "subspace":
        return (_subspace_overlap(a_g, a_l) / min(a_g.shape[0], a_l.shape[0])).to(out_dtype)
    if mode == "cosine":
        eps = torch.finfo(a_g.dtype).tiny ** 0.5
        u_g = a_g / a_g.norm(dim=1, keepdim=True).clamp_min(eps)
        u_l = a_l / a_l.norm(dim=1, keepdim=True).clamp_min(eps)
        return (u_g @ u_l.T).pow(2).mean().to(out_dtype)
    # delta: the ratio is invariant to the scale of each factor, so compute it on unit-norm factors; then every
    # term is O(1), eps is relative, and nothing under- or overflows when B is still tiny
    a_g, a_l, b_g, b_l = _unit(a_g), _unit(a_l), _unit(b_g), _unit(b_l)
    # ||B_g M B_l^T||^2 = tr(M^T G_g M G_l), M = A_g A_l^T, G = B^T B ; ||B A||^2 = tr(G (A A^T))
    cross_a = a_g @ a_l.T
    g_g, g_l = b_g.T @ b_g, b_l.T @ b_l
    num = torch.trace(cross_a.T @ g_g @ cross_a @ g_l)
    den = torch.trace(g_g @ (a_g @ a_g.T)) * torch.trace(g_l @ (a_l @ a_l.T))
    return (num / (den + DELTA_EPS)).to(out_dtype)


def chance_level(mode: str, d_in: int, r_g: int, r_l: int) -> float:
    """Expected :func:`pair_penalty` of two independently initialised adapters (1.0 for the raw modes).

    ``subspace``: ``E tr(P_g P_l) = r_g r_l / d``, so ``max(r_g, r_l) / d`` after dividing by ``min(r_g, r_l)``;
    ``cosine`` and ``delta``: ``1 / d``.  (``repr``: data-dependent, see :func:`representation_penalty`.)
    """
    _check_mode(mode)
    if mode == "subspace":
        return min(1.0, max(r_g, r_l) / d_in)
    if mode in ("cosine", "delta", "repr"):
        return 1.0 / d_in
    return 1.0


def orthogonality_penalty(net: nn.Module, mode: str = DEFAULT_MODE, first: str = "global",
                          second: str = "local", shared_gradient: bool = False) -> torch.Tensor:
    """The network-level weight penalty (differentiable).

    Scale-free modes: the mean over layers of ``pair_penalty / chance_level`` (~1 at initialisation, 0 when the
    adapters are orthogonal).  ``A`` / ``AB``: the sum of ``pair_penalty`` over layers.  ``repr`` needs a forward
    pass: use :class:`BranchRecorder`.

    The ``first`` (shared) adapter enters **detached**: the penalty's gradient reaches the private adapter only, so
    the shared factors a site sends are moved by its data alone.  ``shared_gradient=True`` gives the paper's joint
    gradient, which moves the shared ``A_g`` away from the private ``A_l`` and so writes ``A_l``'s subspace into
    what leaves the site (see :data:`LEAK_NOTE`); it is kept for that comparison, not offered as a job setting.
    """
    _check_mode(mode)
    if mode == "repr":
        raise ValueError("orth_mode 'repr' needs the branch inputs of a forward pass: use BranchRecorder")
    terms = []
    for _, module in dual_layers(net, first, second):
        a_g, b_g = _factors(module, first)
        if not shared_gradient:
            a_g, b_g = a_g.detach(), b_g.detach()
        a_l, b_l = _factors(module, second)
        term = pair_penalty(a_g, b_g, a_l, b_l, mode=mode)
        if mode in SCALE_FREE_MODES:
            term = term / chance_level(mode, a_g.shape[1], a_g.shape[0], a_l.shape[0])
        terms.append(term)
    if not terms:
        raise ValueError(f"no layer carries both the {first!r} and the {second!r} adapter")
    total = torch.stack(terms).sum()
    return total / len(terms) if mode in SCALE_FREE_MODES else total


def calibrated_lambda(num_classes: int, share: float = DEFAULT_SHARE, penalty_at_init: float = 1.0) -> float:
    """``share * ln(K) / penalty_at_init``: lambda such that ``lambda * penalty = share * ln K`` at initialisation.

    ``ln K`` is the cross-entropy of a uniform prediction over ``K`` classes (the task loss of a fresh head, ``K``
    at least 2).  For the scale-free modes the penalty at initialisation is 1 in expectation (it is normalised to
    its chance level); the raw modes pass their measured value.
    """
    if penalty_at_init <= 0 or not math.isfinite(penalty_at_init):
        raise ValueError(f"cannot calibrate orth_lambda on a penalty of {penalty_at_init!r} at initialisation")
    return share * math.log(max(int(num_classes), 2)) / penalty_at_init


# ---------------------------------------------------------------------------------------------- representation level
def _tokens(z: torch.Tensor, linear: bool) -> torch.Tensor:
    """A branch code as (tokens, r): Linear codes are (..., r); Conv codes (B, r, *spatial)."""
    if linear:
        return z.reshape(-1, z.shape[-1])
    return z.movedim(1, -1).reshape(-1, z.shape[1])


def representation_penalty(z_g: torch.Tensor, z_l: torch.Tensor) -> torch.Tensor:
    """Mean squared Pearson correlation between the columns of ``z_g`` (N x r_g) and ``z_l`` (N x r_l), in [0, 1].

    0 when every global code component is uncorrelated with every local one over the N tokens; invariant to the
    scale (and offset) of each component.
    """
    if z_g.shape[0] != z_l.shape[0]:
        raise ValueError(f"the two branches saw different token counts: {z_g.shape[0]} vs {z_l.shape[0]}")
    out_dtype = z_g.dtype
    z_g, z_l = z_g.to(_work_dtype(z_g)), z_l.to(_work_dtype(z_l))
    eps = torch.finfo(z_g.dtype).tiny ** 0.5

    def standardise(z: torch.Tensor) -> torch.Tensor:
        z = z - z.mean(dim=0, keepdim=True)
        return z / z.norm(dim=0, keepdim=True).clamp_min(eps)

    return (standardise(z_g).T @ standardise(z_l)).pow(2).mean().to(out_dtype)


@torch.no_grad()
def token_chance_level(x: torch.Tensor) -> torch.Tensor:
    """``tr(S^2) / tr(S)^2`` for the covariance ``S`` of the token rows of ``x`` (N x d): the expected squared
    correlation of two independent random projections of the tokens, to first order (1/d for white tokens, one over
    the tokens' effective dimension otherwise).  At most :data:`MAX_REPR_TOKENS` evenly spaced tokens are used; a
    0-d tensor on ``x``'s device (no host synchronisation)."""
    if x.shape[0] > MAX_REPR_TOKENS:
        x = x[torch.linspace(0, x.shape[0] - 1, MAX_REPR_TOKENS, device=x.device).long()]
    x = x.float()
    x = x - x.mean(dim=0, keepdim=True)
    s = x.T @ x if x.shape[0] >= x.shape[1] else x @ x.T  # same non-zero spectrum
    tr = torch.trace(s)
    ratio = s.pow(2).sum() / tr.pow(2).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where(tr > 0, ratio, torch.ones_like(ratio)).clamp(1.0 / x.shape[1], 1.0)


class BranchRecorder:
    """Forward hooks that keep, for every layer with both adapters, the input each ``lora_A`` saw in the latest
    forward pass with gradients enabled; :meth:`penalty` turns them into the ``repr`` penalty.

    Registered by :class:`~flare_duallora.engine.AdaptedNetwork` only when ``orth_mode = "repr"`` (no hook, no cost
    otherwise).  Nothing is recorded under ``torch.no_grad()`` (evaluation).  The inputs are references to tensors
    the forward pass keeps for its own backward anyway; :meth:`penalty` releases them.
    """

    def __init__(self, net: nn.Module, first: str = "global", second: str = "local", shared_gradient: bool = False):
        self.first, self.second = first, second
        self.shared_gradient = shared_gradient
        self._inputs: dict[str, dict[str, torch.Tensor]] = {}
        self._layers: dict[str, LoraLayer] = dict(dual_layers(net, first, second))
        if not self._layers:
            raise ValueError(f"no layer carries both the {first!r} and the {second!r} adapter")
        self._handles = []
        for name, layer in self._layers.items():
            for adapter in (first, second):
                self._handles.append(layer.lora_A[adapter].register_forward_hook(self._hook(name, adapter)))

    def _hook(self, name: str, adapter: str):
        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if torch.is_grad_enabled():
                self._inputs.setdefault(name, {})[adapter] = inputs[0]
        return record

    @property
    def recorded(self) -> int:
        """Layers whose two branch inputs are held."""
        return sum(1 for v in self._inputs.values() if len(v) == 2)

    def clear(self) -> None:
        self._inputs.clear()

    def remove(self) -> None:
        """Remove the hooks (the network is left as before)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()

    def penalty(self, clear: bool = True) -> Optional[torch.Tensor]:
        """Mean over layers of ``representation_penalty / token_chance_level`` for the latest forward pass, or
        ``None`` when no training forward pass was recorded since the last call."""
        terms = []
        for name, held in self._inputs.items():
            if len(held) != 2:
                continue
            layer = self._layers[name]
            codes = []
            for adapter in (self.first, self.second):
                module = layer.lora_A[adapter]
                x = held[adapter].detach().to(module.weight.dtype)  # (bf16 under autocast; the penalty runs without)
                z = module.forward(x)  # .forward: no hook fires; the gradient reaches this adapter's A only
                if adapter == self.first and not self.shared_gradient:
                    z = z.detach()  # the shared adapter's code is a constant: the gradient reaches A_l only
                codes.append(_tokens(z, isinstance(module, nn.Linear)))
            module = layer.lora_A[self.first]
            if isinstance(module, nn.Linear):
                x = held[self.first].detach()
                chance = token_chance_level(x.reshape(-1, x.shape[-1]))
            else:  # Conv adapters: the white-token level 1 / (d_in * kernel) (patches are not materialised)
                chance = torch.tensor(1.0 / module.weight[0].numel(), device=codes[0].device)
            terms.append(representation_penalty(*codes) / chance.to(codes[0].dtype))
        if clear:
            self.clear()
        if not terms:
            return None
        return torch.stack(terms).mean()
