"""FedOPAL orthogonality penalty between the global and the local LoRA adapter of every adapted layer.

peft stores ``lora_A`` as r x d_in (its rows span the input subspace) and ``lora_B`` as d_out x r, so the
cross-Gram that is zero exactly when the two input subspaces are orthogonal is ``A_g A_l^T`` (r_g x r_l), not
``A_g^T A_l``.  Conv adapters are flattened to the same layout (A: r x (d_in * k), B: d_out x r).

Modes:
``A``      sum ||A_g A_l^T||_F^2                       (input subspaces apart; active from step 0)
``AB``     sum ||A_g A_l^T||_F^2 + ||B_g^T B_l||_F^2    (both factors)
``delta``  sum ||dW_g dW_l^T||_F^2 / (||dW_g||_F^2 ||dW_l||_F^2 + eps), dW = B A: the effective updates'
           row spaces apart, scale-free; computed with r x r matrices only.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

MODES = ("A", "AB", "delta")


def _factors(layer: LoraLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    a = layer.lora_A[adapter].weight.flatten(1)  # r x d_in(*k)
    b = layer.lora_B[adapter].weight.flatten(1)  # d_out x r
    return a, b


def pair_penalty(a_g: torch.Tensor, b_g: torch.Tensor, a_l: torch.Tensor, b_l: torch.Tensor, mode: str) -> torch.Tensor:
    """Penalty for one layer, given the factors of both adapters in peft layout."""
    cross_a = a_g @ a_l.T  # r_g x r_l
    if mode == "A":
        return cross_a.pow(2).sum()
    if mode == "AB":
        return cross_a.pow(2).sum() + (b_g.T @ b_l).pow(2).sum()
    if mode == "delta":
        # ||B_g M B_l^T||^2 = tr(M^T G_g M G_l), M = A_g A_l^T, G = B^T B ; ||B A||^2 = tr(G (A A^T))
        g_g, g_l = b_g.T @ b_g, b_l.T @ b_l
        num = torch.trace(cross_a.T @ g_g @ cross_a @ g_l)
        den = torch.trace(g_g @ (a_g @ a_g.T)) * torch.trace(g_l @ (a_l @ a_l.T))
        return num / (den + 1e-12)
    raise ValueError(f"setting 'orth_mode' = {mode!r}: expected one of {MODES}")


def orthogonality_penalty(net: nn.Module, mode: str = "A", first: str = "global", second: str = "local") -> torch.Tensor:
    """Sum of :func:`pair_penalty` over every layer that carries both adapters (differentiable)."""
    if mode not in MODES:
        raise ValueError(f"setting 'orth_mode' = {mode!r}: expected one of {MODES}")
    total = None
    for module in net.modules():
        if isinstance(module, LoraLayer) and first in module.lora_A and second in module.lora_A:
            term = pair_penalty(*_factors(module, first), *_factors(module, second), mode=mode)
            total = term if total is None else total + term
    if total is None:
        raise ValueError(f"no layer carries both the {first!r} and the {second!r} adapter")
    return total
