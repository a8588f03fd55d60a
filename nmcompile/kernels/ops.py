"""The Triton path's custom ops (namespace ``nmsparse``), the targets of ``passes.lower_kernels``.

``triton_linear`` has the signature of ``nmsparse::sparse_linear`` with ``fwd_mask`` optional:
``None`` means the kernels rank ``F`` from ``W`` in registers, so AOTAutograd saves only ``W`` and
``P`` for the backward, never a mask. Its backward calls ``triton_input_grad`` and
``triton_weight_grad`` (MVUE and SR-STE fused), named ``<layer>_bwd_*`` like the portable graph's.
The ops are opaque to Inductor (``custom_op``), which compiles everything around them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx.traceback import annotate

from nmcompile.ops import _setup_linear, role

from .input_grad import sparse_input_grad
from .sparse_forward import sparse_linear_forward
from .weight_grad import sparse_weight_grad


def _n(n: int, n_eff: torch.Tensor | None) -> int:
    """N in force: the schedule's ``n_eff`` (a CPU 0-d tensor, read without a device sync) or ``n``."""
    return int(n_eff) if n_eff is not None else n


@torch.library.custom_op("nmsparse::triton_linear", mutates_args=())
def triton_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    fwd_mask: torch.Tensor | None,
    perm: torch.Tensor | None,
    n: int,
    m: int,
    srste_lambda: float,
    layer: str,
    n_eff: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    step: torch.Tensor | None = None,
    grad_prune: str = "none",
    prune_key: int = 0,
) -> torch.Tensor:
    """``nmsparse::sparse_linear`` on the fused forward kernel (``F`` in registers unless given)."""
    x2d = x.reshape(-1, x.shape[-1])
    y = sparse_linear_forward(x2d, weight, bias, _n(n, n_eff), m, mask=fwd_mask, alpha=alpha)
    return y.reshape(*x.shape[:-1], weight.shape[0])


@triton_linear.register_fake
def _(x, weight, bias, fwd_mask, perm, n, m, srste_lambda, layer, n_eff=None, alpha=None, step=None,
      grad_prune="none", prune_key=0):  # fmt: skip
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("nmsparse::triton_input_grad", mutates_args=())
def triton_input_grad(
    dy: torch.Tensor,
    weight: torch.Tensor,
    fwd_mask: torch.Tensor | None,
    perm: torch.Tensor | None,
    n: int,
    m: int,
    n_eff: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dX`` for ``dy`` ``[T, O]``: Bi-Mask with ``perm``, else ``dY · (W ⊙ F)`` (SPEC §4)."""
    return sparse_input_grad(dy, weight, _n(n, n_eff), m, perm=perm, mask=fwd_mask, alpha=alpha)


@triton_input_grad.register_fake
def _(dy, weight, fwd_mask, perm, n, m, n_eff=None, alpha=None):
    return dy.new_empty((dy.shape[0], weight.shape[1]))


@torch.library.custom_op("nmsparse::triton_weight_grad", mutates_args=())
def triton_weight_grad(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    fwd_mask: torch.Tensor | None,
    n: int,
    m: int,
    srste_lambda: float,
    grad_prune: str,
    prune_key: int,
    n_eff: torch.Tensor | None = None,
    step: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dW = prune(dY)ᵀ X + λ (1 − F) ⊙ W`` for ``dy`` ``[T, O]``, ``x`` ``[T, K]`` (SPEC §6, §7)."""
    return sparse_weight_grad(
        dy, x, weight, _n(n, n_eff), m, srste_lambda=srste_lambda, grad_prune=grad_prune,
        step=int(step) if step is not None else 0, key=prune_key, mask=fwd_mask,
    )  # fmt: skip


@triton_weight_grad.register_fake
def _(dy, x, weight, fwd_mask, n, m, srste_lambda, grad_prune, prune_key, n_eff=None, step=None):
    return weight.new_empty(weight.shape)


def _backward(ctx: Any, dy: torch.Tensor) -> tuple:
    """The three backward products of ``triton_linear``, each one kernel (SPEC §4, §6, §7)."""
    x, weight, fwd_mask, perm, n_eff, alpha, step = ctx.saved_tensors
    dy2d = dy.reshape(-1, dy.shape[-1])
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        with annotate(role(ctx.layer, "bwd_input_grad")):
            dx = torch.ops.nmsparse.triton_input_grad(dy2d, weight, fwd_mask, perm, ctx.n, ctx.m, n_eff, alpha)
            dx = dx.reshape(x.shape)
    if ctx.needs_input_grad[1]:
        with annotate(role(ctx.layer, "bwd_weight_grad")):
            dw = torch.ops.nmsparse.triton_weight_grad(
                dy2d, x.reshape(-1, x.shape[-1]), weight, fwd_mask, ctx.n, ctx.m, ctx.srste_lambda,
                ctx.grad_prune, ctx.prune_key, n_eff, step,
            )  # fmt: skip
    if ctx.has_bias and ctx.needs_input_grad[2]:
        with annotate(role(ctx.layer, "bwd_bias_grad")):
            db = dy2d.sum(0)
    return dx, dw, db, *([None] * 11)


triton_linear.register_autograd(_backward, setup_context=_setup_linear)  # same inputs as sparse_linear
