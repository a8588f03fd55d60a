"""The Triton and 2:4 paths' custom ops (namespace ``nmsparse``), the targets of ``passes.lower_kernels``.

``triton_linear`` has the signature of ``nmsparse::sparse_linear`` with ``fwd_mask`` optional:
``None`` means the kernels rank ``F`` from ``W`` in registers, so AOTAutograd saves only ``W`` and
``P`` for the backward, never a mask. Its backward calls ``triton_input_grad`` and
``triton_weight_grad`` (MVUE and SR-STE fused), named ``<layer>_bwd_*`` like the portable graph's.
From ``SPLIT_TOKENS`` tokens on (the input gradient at every size), each of the three writes its masked
operand (or pruned ``dY``) in one Triton pass and runs a cuBLAS GEMM instead: still no mask in memory,
one operand-sized buffer.
``sparse24_linear`` has the same signature and saves the same tensors; its three GEMMs run on 2:4
sparse tensor cores (``kernels.sparse24``) with operands the masked-operand and MVUE kernels write.
The ops are opaque to Inductor (``custom_op``), which compiles everything around them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.fx.traceback import annotate

from nmcompile.ops import (
    _setup_linear,
    gemm_op,
    gradless_op,
    linear_fake,
    n_in_force,
    role,
)

from . import sparse24
from .common import MVUE_RULES
from .gather_t import gather_t
from .mvue import mvue_prune, mvue_prune_compressed
from .operand24 import (
    backward_operand,
    forward_operand,
    forward_operand_compressed,
    input_grad_operand,
    input_grad_operand_compressed,
)
from .sparse_forward import sparse_linear_forward
from .srste import srste_add
from .weight_grad import sparse_weight_grad

SPLIT_TOKENS = 512
"""From this many tokens (rows of ``X`` and ``dY``) on, the forward and weight-gradient ops write the
masked operand (or pruned ``dY``) in one pass (``operand24``, ``mvue``) and run a dense cuBLAS GEMM on
it, instead of the fused kernels, which rank ``F`` (or prune ``dY``) again in every tile of the other
GEMM dim. H200, torch 2.11, FFN fc1 4096 -> 16384 in bf16 (docs/benchmarks.md): at 512 tokens fused /
split / dense took 0.456 / 0.291 / 0.098 ms (forward), 4.770 / 0.378 / 0.099 (input gradient),
0.283 / 0.266 / 0.116 (weight gradient); at 8192 tokens the fused kernels ran 3.98x, 48x and 1.32x
dense. Below 512 tokens is not measured. The input gradient is split at every size: its fused
kernel's programs tile ``[T, K]`` and each walks all of ``O``, ranking ``W`` as it goes, so fewer
tokens mean fewer programs doing the same walk (at 512 tokens 1 to 4 waves on 132 SMs: one wave
should take a quarter of 4.77 ms or more, against 0.38 ms split). Reasoned, not measured."""


def _split(tokens: int) -> bool:
    """Whether a GEMM with ``tokens`` rows runs as masked operand + dense GEMM (``SPLIT_TOKENS``)."""
    return tokens >= SPLIT_TOKENS


def _step(step: torch.Tensor | None) -> int:
    """The training step seeding MVUE (a CPU 0-d tensor), 0 where the recipe has none."""
    return int(step) if step is not None else 0


def _triton_linear(
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
    """``nmsparse::sparse_linear`` on the fused forward kernel (``F`` in registers unless given), or
    from ``SPLIT_TOKENS`` tokens on as ``W ⊙ F`` from one Triton pass and a cuBLAS GEMM."""
    x2d = x.reshape(-1, x.shape[-1])
    if _split(x2d.shape[0]):
        operand = forward_operand(weight, n_in_force(n, n_eff), m, mask=fwd_mask, alpha=alpha, dtype=x.dtype)
        y = torch.nn.functional.linear(x2d, operand, bias.to(x.dtype) if bias is not None else None)
    else:
        y = sparse_linear_forward(x2d, weight, bias, n_in_force(n, n_eff), m, mask=fwd_mask, alpha=alpha)
    return y.reshape(*x.shape[:-1], weight.shape[0])


@gradless_op("triton_input_grad")
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
    """``dX`` for ``dy`` ``[T, O]``: Bi-Mask with ``perm``, else ``dY · (W ⊙ F)`` (SPEC §4), split at
    every batch size (``SPLIT_TOKENS``: the fused kernel's grid shrinks with ``T``, its work does not)."""
    n = n_in_force(n, n_eff)
    if perm is None:
        return dy @ forward_operand(weight, n, m, mask=fwd_mask, alpha=alpha, dtype=dy.dtype)
    return dy @ backward_operand(weight, n, m, perm=perm, mask=fwd_mask, alpha=alpha, dtype=dy.dtype)


@torch.library.register_fake(triton_input_grad)
def _(dy, weight, fwd_mask, perm, n, m, n_eff=None, alpha=None):
    return dy.new_empty((dy.shape[0], weight.shape[1]))


@gradless_op("triton_weight_grad")
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
    if _split(dy.shape[0]):
        pruned = dy if grad_prune == "none" else mvue_prune(dy, _step(step), prune_key, grad_prune)
        return _with_srste(pruned.t() @ x, weight, n_in_force(n, n_eff), m, srste_lambda, fwd_mask)
    return sparse_weight_grad(
        dy, x, weight, n_in_force(n, n_eff), m, srste_lambda=srste_lambda, grad_prune=grad_prune,
        step=_step(step), key=prune_key, mask=fwd_mask,
    )  # fmt: skip


@torch.library.register_fake(triton_weight_grad)
def _weight_grad_fake(dy, x, weight, fwd_mask, n, m, srste_lambda, grad_prune, prune_key, n_eff=None, step=None):
    return weight.new_empty(weight.shape)


def _with_srste(
    dw: torch.Tensor, weight: torch.Tensor, n: int, m: int, srste_lambda: float, mask: torch.Tensor | None
) -> torch.Tensor:
    """``dw + λ (1 − F) ⊙ W`` in one pass (``kernels.srste``) where ``λ`` is set; in ``weight``'s dtype."""
    if srste_lambda:
        return srste_add(dw, weight, n, m, srste_lambda, mask=mask)
    return dw.to(weight.dtype)


def _gemm_backward(ctx: Any, dy: torch.Tensor, input_grad: Any, weight_grad: Any) -> tuple:
    """The three backward products of a lowered linear, each one op (SPEC §4, §6, §7): ``input_grad``
    and ``weight_grad`` are the path's ``nmsparse`` ops (their signatures differ only in ``alpha``)."""
    x, weight, fwd_mask, perm, n_eff, alpha, step = ctx.saved_tensors
    dy2d = dy.reshape(-1, dy.shape[-1])
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        with annotate(role(ctx.layer, "bwd_input_grad")):
            dx = input_grad(dy2d, weight, fwd_mask, perm, ctx.n, ctx.m, n_eff, alpha).reshape(x.shape)
    if ctx.needs_input_grad[1]:
        with annotate(role(ctx.layer, "bwd_weight_grad")):
            dw = weight_grad(
                dy2d, x.reshape(-1, x.shape[-1]).to(dy.dtype), weight, fwd_mask, ctx.n, ctx.m, ctx.srste_lambda,
                ctx.grad_prune, ctx.prune_key, n_eff, step,
            )  # fmt: skip
    if ctx.has_bias and ctx.needs_input_grad[2]:
        with annotate(role(ctx.layer, "bwd_bias_grad")):
            db = dy2d.sum(0)
    return dx, dw, db, *([None] * 11)


def _triton_backward(ctx: Any, dy: torch.Tensor) -> tuple:
    ops = torch.ops.nmsparse
    return _gemm_backward(ctx, dy, ops.triton_input_grad, ops.triton_weight_grad)


triton_linear = gemm_op("triton_linear", _triton_linear, linear_fake, _triton_backward, _setup_linear)


def _mm24(
    operand: tuple[int, int, torch.dtype, torch.device, tuple[int, int]],
    dense: Callable[[], torch.Tensor],
    compressed: Callable[[str, int | None], tuple[torch.Tensor, torch.Tensor | None]] | None,
    b: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    transpose_result: bool = False,
) -> torch.Tensor:
    """``A @ b (+ bias[:, None])`` for a sparse operand ``A`` that a kernel writes (``operand``: rows,
    cols, dtype, device, N:M pattern along its last dim). On 2:4 sparse tensor cores where they take
    it: written compressed in the kernel's own pass (``compressed(layout, numel)``) where the shape
    fits the library's layout unpadded (``sparse24.triton_layout``), so the dense operand never
    exists, else written dense (``dense()``) for ``sparse24.semi_structured_mm``. Elsewhere (the CPU
    tests, fp32, or structure decay's N in force above 2:4) ``dense()`` meets a dense GEMM, with the
    same result layout."""
    rows, cols, dtype, device, pattern = operand
    if not sparse24.fits_24(*pattern) or sparse24.blocker(device, dtype) is not None:
        out = dense() @ b
        if bias is not None:
            out = out + bias.to(out.dtype)[:, None]
        return out.t().contiguous() if transpose_result else out
    layout = sparse24.triton_layout(rows, cols, dtype, device) if compressed is not None else None
    if layout is None:
        return sparse24.semi_structured_mm(dense(), b, bias=bias, transpose_result=transpose_result)
    packed = sparse24.Compressed(rows, cols, dtype, *compressed(*layout))
    return sparse24.fastest_mm(packed, b, bias=bias, transpose_result=transpose_result)


def _sparse24_linear(
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
    """``nmsparse::sparse_linear`` as ``Yᵀ = (W ⊙ F) Xᵀ`` with ``W ⊙ F`` compressed 2:4 (no mask decay);
    a dense GEMM on ``W ⊙ F`` while structure decay's N in force is not 2:4 (``_mm24``)."""
    x2d = x.reshape(-1, x.shape[-1])
    n = n_in_force(n, n_eff)
    y = _mm24(
        (*weight.shape, x.dtype, x.device, (n, m)),
        lambda: forward_operand(weight, n, m, mask=fwd_mask, dtype=x.dtype),
        lambda layout, numel: forward_operand_compressed(
            weight, n, m, layout, numel=numel, mask=fwd_mask, dtype=x.dtype
        ),
        x2d.t(),
        bias=bias,
        transpose_result=True,
    )  # contiguous [T, O], as the fake
    return y.reshape(*x.shape[:-1], weight.shape[0])


@gradless_op("sparse24_input_grad")
def sparse24_input_grad(
    dy: torch.Tensor,
    weight: torch.Tensor,
    fwd_mask: torch.Tensor | None,
    perm: torch.Tensor | None,
    n: int,
    m: int,
    n_eff: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dXᵀ = (W[P] ⊙ Bp)ᵀ dY[:, P]ᵀ`` with the operand compressed 2:4 along ``O`` (or the transposable
    ``(W ⊙ mask)ᵀ``); without either (``backward='dense'``) ``dY (W ⊙ F)`` on a dense GEMM."""
    n = n_in_force(n, n_eff)
    if perm is None and fwd_mask is None:
        return dy @ forward_operand(weight, n, m, dtype=dy.dtype)
    mask = None if perm is not None else fwd_mask
    return _mm24(
        (weight.shape[1], weight.shape[0], dy.dtype, dy.device, (n, m)),
        lambda: input_grad_operand(weight, n, m, perm=perm, mask=mask, dtype=dy.dtype),
        lambda layout, numel: input_grad_operand_compressed(
            weight, n, m, layout, numel=numel, perm=perm, mask=mask, dtype=dy.dtype
        ),
        gather_t(dy, perm) if perm is not None else dy.t(),
        transpose_result=True,
    )


@torch.library.register_fake(sparse24_input_grad)
def _(dy, weight, fwd_mask, perm, n, m, n_eff=None):
    return dy.new_empty((dy.shape[0], weight.shape[1]))


@gradless_op("sparse24_weight_grad")
def sparse24_weight_grad(
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
    """``dW = prune(dY)ᵀ X + λ (1 − F) ⊙ W``: ``prune(dY)ᵀ`` compressed 2:4 along ``T`` (MVUE); with
    ``grad_prune='none'`` a dense GEMM. SR-STE in one pass (``kernels.srste``); in ``weight``'s dtype."""
    if grad_prune == "none":
        dw = dy.t() @ x
    else:
        step_, (T, O) = _step(step), dy.shape
        dw = _mm24(
            (O, T, dy.dtype, dy.device, (2, 4)),
            lambda: mvue_prune(dy, step_, prune_key, grad_prune, transpose=True),
            (lambda layout, numel: mvue_prune_compressed(dy, step_, prune_key, grad_prune, layout, numel=numel))
            if MVUE_RULES[grad_prune][1] == 4
            else None,
            x,
        )
    return _with_srste(dw, weight, n_in_force(n, n_eff), m, srste_lambda, fwd_mask)


torch.library.register_fake(sparse24_weight_grad, _weight_grad_fake)


def _backward24(ctx: Any, dy: torch.Tensor) -> tuple:
    ops = torch.ops.nmsparse
    input_grad = lambda dy2d, w, f, perm, n, m, n_eff, _alpha: ops.sparse24_input_grad(dy2d, w, f, perm, n, m, n_eff)  # noqa: E731
    return _gemm_backward(ctx, dy, input_grad, ops.sparse24_weight_grad)


sparse24_linear = gemm_op("sparse24_linear", _sparse24_linear, linear_fake, _backward24, _setup_linear)
