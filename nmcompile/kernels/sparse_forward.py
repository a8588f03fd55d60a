"""Forward GEMM with the N:M mask computed in registers: ``Y = X · (W ⊙ F)ᵀ + b``.

Tiling (as Triton's ``03-matrix-multiplication``): a program owns ``[BLOCK_T, BLOCK_O]`` of ``Y``
and walks ``K`` in steps of ``BLOCK_K``, a multiple of ``M``, so every ``W`` tile
``[BLOCK_O, BLOCK_K]`` holds whole groups: ``F`` (top-``n`` of each ``M`` along ``K``) is ranked
from that tile and never written to memory. With mask decay, pruned weights enter scaled by ``α``
(SPEC §8). A loaded mask replaces the ranking where ``F`` is not an N:M mask along ``K`` alone
(the ``transposable`` mode). Accumulation in fp32; bias added in the epilogue.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    autotune_configs,
    check_alpha,
    check_devices,
    check_mask,
    check_nm,
    check_tensor,
    dot_dtype,
    gemm_grid,
    gemm_launcher,
    grouped_tile,
    input_precision,
    nm_keep_rows,
    wide_index,
)

TILES = [
    {"BLOCK_T": 128, "BLOCK_O": 128, "BLOCK_K": 64, "GROUP": 8},
    {"BLOCK_T": 128, "BLOCK_O": 64, "BLOCK_K": 32, "GROUP": 8},
    {"BLOCK_T": 64, "BLOCK_O": 128, "BLOCK_K": 32, "GROUP": 8},
    {"BLOCK_T": 64, "BLOCK_O": 64, "BLOCK_K": 64, "GROUP": 8},
]
"""The tiles ``CONFIGS`` tries on a GPU (the interpreter runs one small tile); the tests run each."""
CONFIGS = autotune_configs(
    TILES,
    [(4, 3), (8, 4)],
    grouped=("BLOCK_K",),
)


@triton.autotune(configs=CONFIGS, key=["T", "O", "K", "M", "LOAD_MASK"])
@triton.jit
def sparse_forward_kernel(
    x_ptr, w_ptr, b_ptr, f_ptr, alpha_ptr, y_ptr, n: tl.constexpr, T, O, K,
    stride_xt, stride_xk, stride_wo, stride_wk, stride_fo, stride_fk, stride_yt, stride_yo,
    M: tl.constexpr, HAS_BIAS: tl.constexpr, LOAD_MASK: tl.constexpr, HAS_ALPHA: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    """One ``[BLOCK_T, BLOCK_O]`` tile of ``Y``; ``WIDE``: int64 offsets (an operand past 2³¹ elements)."""
    tile_t, tile_o = grouped_tile(tl.program_id(0), T, O, BLOCK_T, BLOCK_O, GROUP)
    rows = tile_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tile_o * BLOCK_O + tl.arange(0, BLOCK_O)
    ks = tl.arange(0, BLOCK_K)
    if WIDE:
        rows, cols, ks = rows.to(tl.int64), cols.to(tl.int64), ks.to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        x = tl.load(x_ptr + rows[:, None] * stride_xt + k[None, :] * stride_xk,
                    mask=(rows[:, None] < T) & (k[None, :] < K), other=0.0)  # fmt: skip
        w_inside = (cols[:, None] < O) & (k[None, :] < K)
        w = tl.load(w_ptr + cols[:, None] * stride_wo + k[None, :] * stride_wk, mask=w_inside, other=0.0)
        w = w.to(tl.float32)  # elementwise math in fp32: rounds once, like torch's ops on w's dtype
        if LOAD_MASK:
            keep = tl.load(f_ptr + cols[:, None] * stride_fo + k[None, :] * stride_fk, mask=w_inside, other=0) != 0
        else:
            keep = nm_keep_rows(w, n, BLOCK_O, BLOCK_K, M)
        if HAS_ALPHA:
            w = tl.where(keep, w, w * tl.load(alpha_ptr))
        else:
            w = tl.where(keep, w, 0.0)
        w = w.to(w_ptr.dtype.element_ty).to(x.dtype)
        acc = tl.dot(x.to(DOT), tl.trans(w.to(DOT)), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < O, other=0.0).to(tl.float32)[None, :]
    out = (rows[:, None] < T) & (cols[None, :] < O)
    tl.store(y_ptr + rows[:, None] * stride_yt + cols[None, :] * stride_yo, acc.to(y_ptr.dtype.element_ty), mask=out)


def sparse_linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    n: int,
    m: int,
    *,
    mask: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x`` ``[T, K]`` · ``(W ⊙ F)ᵀ`` ``[K, O]`` (+ ``bias``) in ``x``'s dtype; ``F`` is N:M along
    ``K`` from ``weight``'s own values (or ``mask`` where given), ``W ⊙ (F + (1−F)α)`` with ``alpha``."""
    check_nm(n, m)
    check_tensor("x", x, 2)
    check_tensor("weight", weight, 2)
    T, K = x.shape
    O = weight.shape[0]
    if weight.shape[1] != K or K % m:
        raise ValueError(f"weight {tuple(weight.shape)} must be [O, K={K}] with K % m == 0 (m={m})")
    if bias is not None and (bias.shape != (O,) or bias.dtype not in (x.dtype, weight.dtype)):
        raise ValueError(f"bias must be [{O}] in x's or weight's dtype, got {tuple(bias.shape)} {bias.dtype}")
    check_devices(x=x, weight=weight, bias=bias)
    check_mask(mask, weight)
    check_alpha(alpha, weight)
    y = torch.empty((T, O), dtype=x.dtype, device=x.device)
    f = mask.view(torch.int8) if mask is not None else weight
    gemm_launcher(sparse_forward_kernel)[gemm_grid(T, O, "BLOCK_T", "BLOCK_O")](
        x, weight, bias.contiguous() if bias is not None else x, f, alpha if alpha is not None else x, y, n, T, O, K,
        *x.stride(), *weight.stride(), *f.stride(), *y.stride(),
        M=m, HAS_BIAS=bias is not None, LOAD_MASK=mask is not None, HAS_ALPHA=alpha is not None,
        DOT=dot_dtype(x.dtype), PRECISION=input_precision(), WIDE=wide_index(x, weight, f, y),
    )  # fmt: skip
    return y
