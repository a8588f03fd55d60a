"""Input-gradient GEMM with the backward masks computed in registers (SPEC §4).

Bi-Mask: ``dX = dY[:, P] · (W[P] ⊙ Bp)`` with ``Bp = nm_mask(|W ⊙ F|[P], along O) ∧ F[P]``.
Tiling: a program owns ``[BLOCK_T, BLOCK_K]`` of ``dX`` and walks the reduction dim ``O`` in steps
of ``BLOCK_O``. Rows of ``W`` are gathered through ``P`` while loading (and the matching columns
of ``dY``); ``BLOCK_K`` and ``BLOCK_O`` are multiples of ``M``, so the tile holds whole groups
both ways: ``F`` is ranked along ``K``, then ``Bp`` along the permuted ``O``, neither touching
memory. Without ``P`` the kernel computes ``dY · (W ⊙ F)`` (``dense`` backward mode), or with a
loaded mask ``dY · (W ⊙ mask)`` (``transposable``). Mask decay scales pruned weights by ``α``.
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
    check_perm,
    check_tensor,
    dot_dtype,
    gemm_grid,
    gemm_launcher,
    grouped_tile,
    input_precision,
    nm_keep_cols,
    nm_keep_rows,
    wide_index,
)

TILES = [
    {"BLOCK_T": 128, "BLOCK_K": 128, "BLOCK_O": 32, "GROUP": 8},
    {"BLOCK_T": 128, "BLOCK_K": 64, "BLOCK_O": 64, "GROUP": 8},
    {"BLOCK_T": 64, "BLOCK_K": 128, "BLOCK_O": 64, "GROUP": 8},
    {"BLOCK_T": 64, "BLOCK_K": 64, "BLOCK_O": 32, "GROUP": 8},
]
"""The tiles ``CONFIGS`` tries on a GPU (the interpreter runs one small tile); the tests run each."""
CONFIGS = autotune_configs(
    TILES,
    [(4, 3), (8, 4)],
    grouped=("BLOCK_K", "BLOCK_O"),
)


@triton.autotune(configs=CONFIGS, key=["T", "O", "K", "M", "PERMUTE", "LOAD_MASK"])
@triton.jit
def input_grad_kernel(
    dy_ptr, w_ptr, perm_ptr, f_ptr, alpha_ptr, dx_ptr, n: tl.constexpr, T, O, K,
    stride_dt, stride_do, stride_wo, stride_wk, stride_fo, stride_fk, stride_xt, stride_xk,
    M: tl.constexpr, PERMUTE: tl.constexpr, LOAD_MASK: tl.constexpr, HAS_ALPHA: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_O: tl.constexpr, GROUP: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    """One ``[BLOCK_T, BLOCK_K]`` tile of ``dX``; ``WIDE``: int64 offsets (an operand past 2³¹ elements)."""
    tile_t, tile_k = grouped_tile(tl.program_id(0), T, K, BLOCK_T, BLOCK_K, GROUP)
    rows = tile_t * BLOCK_T + tl.arange(0, BLOCK_T)
    ks = tile_k * BLOCK_K + tl.arange(0, BLOCK_K)
    o_tile = tl.arange(0, BLOCK_O)
    if WIDE:
        rows, ks, o_tile = rows.to(tl.int64), ks.to(tl.int64), o_tile.to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for o0 in range(0, O, BLOCK_O):
        o = o0 + o_tile
        source = tl.load(perm_ptr + o, mask=o < O, other=0) if PERMUTE else o
        w_inside = (o[:, None] < O) & (ks[None, :] < K)
        w = tl.load(w_ptr + source[:, None] * stride_wo + ks[None, :] * stride_wk, mask=w_inside, other=0.0)
        w = w.to(tl.float32)
        if LOAD_MASK:
            keep = tl.load(f_ptr + source[:, None] * stride_fo + ks[None, :] * stride_fk, mask=w_inside, other=0) != 0
        else:
            keep = nm_keep_rows(w, n, BLOCK_O, BLOCK_K, M)
        if PERMUTE:
            keep = nm_keep_cols(tl.where(keep, w, 0.0), n, BLOCK_O, BLOCK_K, M) & keep
        if HAS_ALPHA:
            w = tl.where(keep, w, w * tl.load(alpha_ptr))
        else:
            w = tl.where(keep, w, 0.0)
        w = w.to(w_ptr.dtype.element_ty).to(dy_ptr.dtype.element_ty)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dt + source[None, :] * stride_do,
                     mask=(rows[:, None] < T) & (o[None, :] < O), other=0.0)  # fmt: skip
        acc = tl.dot(dy.to(DOT), w.to(DOT), acc, input_precision=PRECISION)
    out = (rows[:, None] < T) & (ks[None, :] < K)
    tl.store(dx_ptr + rows[:, None] * stride_xt + ks[None, :] * stride_xk, acc.to(dx_ptr.dtype.element_ty), mask=out)


def sparse_input_grad(
    dy: torch.Tensor,
    weight: torch.Tensor,
    n: int,
    m: int,
    *,
    perm: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dX`` ``[T, K]`` in ``dy``'s dtype for ``dy`` ``[T, O]`` and ``weight`` ``[O, K]``: Bi-Mask
    with ``perm``, ``dY · (W ⊙ F)`` without, ``dY · (W ⊙ mask)`` with a given ``mask``."""
    check_nm(n, m)
    check_tensor("dy", dy, 2)
    check_tensor("weight", weight, 2)
    T, O = dy.shape
    K = weight.shape[1]
    if weight.shape[0] != O or K % m:
        raise ValueError(f"weight {tuple(weight.shape)} must be [O={O}, K] with K % m == 0 (m={m})")
    check_devices(dy=dy, weight=weight)
    check_perm(perm, weight, m)
    check_mask(mask, weight)
    check_alpha(alpha, weight)
    dx = torch.empty((T, K), dtype=dy.dtype, device=dy.device)
    f = mask.view(torch.int8) if mask is not None else weight
    gemm_launcher(input_grad_kernel)[gemm_grid(T, K, "BLOCK_T", "BLOCK_K")](
        dy, weight, perm.contiguous() if perm is not None else dy, f, alpha if alpha is not None else dy, dx, n,
        T, O, K,
        *dy.stride(), *weight.stride(), *f.stride(), *dx.stride(),
        M=m, PERMUTE=perm is not None, LOAD_MASK=mask is not None, HAS_ALPHA=alpha is not None,
        DOT=dot_dtype(dy.dtype), PRECISION=input_precision(), WIDE=wide_index(dy, weight, f, dx),
    )  # fmt: skip
    return dx
