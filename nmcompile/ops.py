"""Custom ops of the rewritten graphs (namespace ``nmsparse``) and the autograd of the sparse GEMM.

``nm_mask`` and ``transposable_mask`` are opaque mask nodes. ``sparse_linear`` is the N:M GEMM
``Y = X (W⊙F)ᵀ + b``; its backward is plain torch code traced by AOTAutograd, each step wrapped in
``fx.traceback.annotate`` so the backward graph shows it as its own, named node
(``<layer>_bwd_perm``, ``<layer>_bwd_mask``, ...; see ``passes.name_nodes``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.fx.traceback import annotate

from nmcompile import reference

NAME_KEY = "nmsparse"


def role(layer: str, what: str) -> dict[str, str]:
    """The annotation that names a node ``<layer>_<what>`` in the rewritten graphs."""
    return {NAME_KEY: f"{layer}_{what}"}


@torch.library.custom_op("nmsparse::nm_mask", mutates_args=())
def nm_mask(a: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    """SPEC §2 N:M magnitude mask along ``dim``, by rank counting (M comparisons per entry, no sort).

    Entry ``i`` of a group is kept when fewer than ``n`` entries rank above it, where ``j`` ranks
    above ``i`` if ``|a_j| > |a_i|``, or ``|a_j| == |a_i|`` and ``j < i``; NaN ranks as +inf.
    """
    if a.shape[dim] % m:
        raise ValueError(f"nm_mask: dim {dim} of size {a.shape[dim]} is not divisible by m={m}")
    mag = a.detach().abs()
    mag = torch.where(torch.isnan(mag), torch.inf, mag).movedim(dim, -1)
    groups = mag.reshape(*mag.shape[:-1], mag.shape[-1] // m, m)
    mine, other = groups.unsqueeze(-1), groups.unsqueeze(-2)
    lower = torch.ones(m, m, dtype=torch.bool, device=a.device).tril(-1)  # [i, j]: j < i
    above = (other > mine) | ((other == mine) & lower)
    keep = above.sum(-1) < n
    return keep.reshape(mag.shape).movedim(-1, dim).contiguous()


@nm_mask.register_fake
def _(a: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    return torch.empty_like(a, dtype=torch.bool, memory_format=torch.contiguous_format)


@torch.library.custom_op("nmsparse::transposable_mask", mutates_args=())
def transposable_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """SPEC §4 transposable mask of ``w`` ``[O, K]`` (N:M along both dims)."""
    return reference.transposable_mask(w, n, m)


@transposable_mask.register_fake
def _(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    return torch.empty_like(w, dtype=torch.bool, memory_format=torch.contiguous_format)


@torch.library.custom_op("nmsparse::sparse_linear", mutates_args=())
def sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    fwd_mask: torch.Tensor,
    perm: torch.Tensor | None,
    n: int,
    m: int,
    srste_lambda: float,
    layer: str,
) -> torch.Tensor:
    """``Y = X (W⊙F)ᵀ + b`` for ``W`` ``[O, K]``; the backward mode follows from ``perm`` (see below)."""
    return F.linear(x, torch.where(fwd_mask, weight, 0), bias)


@sparse_linear.register_fake
def _(x, weight, bias, fwd_mask, perm, n, m, srste_lambda, layer):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, weight, bias, fwd_mask, perm, n, m, srste_lambda, layer = inputs
    ctx.save_for_backward(x, weight, fwd_mask, perm)
    ctx.n, ctx.m, ctx.srste_lambda, ctx.layer = n, m, srste_lambda, layer
    ctx.has_bias = bias is not None


def _backward(ctx: Any, dy: torch.Tensor) -> tuple:
    """SPEC §4, §6. With ``perm`` (bimask): ``dX = dY[:, P] · (W[P] ⊙ Bp)``,
    ``Bp = nm_mask(|W⊙F|[P], dim=0)``; without: ``dX = dY · (W ⊙ F)`` (``F`` is the transposable
    mask in that mode). ``dW = dYᵀX + λ(1−F)⊙W`` (straight-through), ``db = Σ dY``.
    """
    x, weight, fwd_mask, perm = ctx.saved_tensors
    layer = ctx.layer
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        if perm is not None:
            with annotate(role(layer, "bwd_perm")):
                w_perm = torch.where(fwd_mask, weight, 0).index_select(0, perm)
            with annotate(role(layer, "bwd_mask")):
                b_perm = torch.ops.nmsparse.nm_mask(w_perm, ctx.n, ctx.m, 0)
            with annotate(role(layer, "bwd_input_grad")):
                dx = dy.index_select(-1, perm) @ torch.where(b_perm, w_perm, 0)
        else:
            with annotate(role(layer, "bwd_input_grad")):
                dx = dy @ torch.where(fwd_mask, weight, 0)
    dy2 = dy.reshape(-1, dy.shape[-1])
    if ctx.needs_input_grad[1]:
        with annotate(role(layer, "bwd_weight_grad")):
            dw = dy2.t() @ x.reshape(-1, x.shape[-1])
        if ctx.srste_lambda:
            with annotate(role(layer, "bwd_srste")):
                dw = dw + ctx.srste_lambda * torch.where(fwd_mask, 0, weight)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        with annotate(role(layer, "bwd_bias_grad")):
            db = dy2.sum(0)
    return dx, dw, db, None, None, None, None, None, None


sparse_linear.register_autograd(_backward, setup_context=_setup_context)
