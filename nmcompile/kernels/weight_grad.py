"""Weight-gradient GEMM with MVUE pruning fused into the load and SR-STE into the epilogue.

``dW = prune(dY)ᵀ · X + λ (1 − F) ⊙ W`` (SPEC §6, §7). Tiling: a program owns ``[BLOCK_O, BLOCK_K]``
of ``dW`` and walks the reduction dim ``T`` in steps of ``BLOCK_T``, a multiple of the MVUE block
(2 or 4 tokens), so each loaded ``dYᵀ`` tile holds whole blocks: it is pruned in registers with
the counter-hash uniforms of ``(key, step, block index)``, exactly the portable op's stream. The
epilogue ranks ``F`` from the ``W`` tile (``BLOCK_K`` a multiple of ``M``) for the SR-STE term.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    MVUE_RULES,
    autotune_configs,
    check_devices,
    check_mask,
    check_nm,
    check_tensor,
    dot_dtype,
    gemm_grid,
    gemm_launcher,
    grouped_tile,
    input_precision,
    mvue_tile,
    nm_keep_rows,
    step_seed,
    wide_index,
)

TILES = [
    {"BLOCK_O": 128, "BLOCK_K": 128, "BLOCK_T": 32, "GROUP": 8},
    {"BLOCK_O": 128, "BLOCK_K": 64, "BLOCK_T": 64, "GROUP": 8},
    {"BLOCK_O": 64, "BLOCK_K": 128, "BLOCK_T": 64, "GROUP": 8},
    {"BLOCK_O": 64, "BLOCK_K": 64, "BLOCK_T": 32, "GROUP": 8},
]
"""The tiles ``CONFIGS`` tries on a GPU (the interpreter runs one small tile); the tests run each."""
CONFIGS = autotune_configs(
    TILES,
    [(4, 3), (8, 4)],
    grouped=("BLOCK_K",),
)


@triton.autotune(configs=CONFIGS, key=["T", "O", "K", "M", "RULE", "LOAD_MASK"])
@triton.jit(do_not_specialize=["seed"])
def weight_grad_kernel(
    dy_ptr, x_ptr, w_ptr, f_ptr, dw_ptr, n: tl.constexpr, lam, seed, T, O, K,
    stride_dt, stride_do, stride_xt, stride_xk, stride_wo, stride_wk, stride_fo, stride_fk, stride_go, stride_gk,
    M: tl.constexpr, RULE: tl.constexpr, MM: tl.constexpr, SRSTE: tl.constexpr, LOAD_MASK: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr, GROUP: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    """One ``[BLOCK_O, BLOCK_K]`` tile of ``dW``; ``WIDE``: int64 offsets (an operand past 2³¹ elements)."""
    tile_o, tile_k = grouped_tile(tl.program_id(0), O, K, BLOCK_O, BLOCK_K, GROUP)
    cols = tile_o * BLOCK_O + tl.arange(0, BLOCK_O)
    ks = tile_k * BLOCK_K + tl.arange(0, BLOCK_K)
    t_tile = tl.arange(0, BLOCK_T)
    if WIDE:
        cols, ks, t_tile = cols.to(tl.int64), ks.to(tl.int64), t_tile.to(tl.int64)
    per_col = tl.cdiv(T, MM)
    acc = tl.zeros((BLOCK_O, BLOCK_K), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + t_tile
        g = tl.load(dy_ptr + t[None, :] * stride_dt + cols[:, None] * stride_do,
                    mask=(cols[:, None] < O) & (t[None, :] < T), other=0.0)  # fmt: skip
        if RULE > 0:
            blocks = tl.reshape(g.to(tl.float32), (BLOCK_O, BLOCK_T // MM, MM))
            block = t0 // MM + tl.arange(0, BLOCK_T // MM)
            index = cols.to(tl.int64)[:, None] * per_col + block[None, :]
            g = tl.reshape(mvue_tile(blocks, seed, index, RULE, MM), (BLOCK_O, BLOCK_T)).to(dy_ptr.dtype.element_ty)
        x = tl.load(x_ptr + t[:, None] * stride_xt + ks[None, :] * stride_xk,
                    mask=(t[:, None] < T) & (ks[None, :] < K), other=0.0)  # fmt: skip
        acc = tl.dot(g.to(DOT), x.to(DOT), acc, input_precision=PRECISION)
    w_inside = (cols[:, None] < O) & (ks[None, :] < K)
    if SRSTE:
        w = tl.load(w_ptr + cols[:, None] * stride_wo + ks[None, :] * stride_wk, mask=w_inside, other=0.0)
        w = w.to(tl.float32)
        if LOAD_MASK:
            keep = tl.load(f_ptr + cols[:, None] * stride_fo + ks[None, :] * stride_fk, mask=w_inside, other=0) != 0
        else:
            keep = nm_keep_rows(w, n, BLOCK_O, BLOCK_K, M)
        acc += lam * tl.where(keep, 0.0, w)
    tl.store(dw_ptr + cols[:, None] * stride_go + ks[None, :] * stride_gk, acc.to(dw_ptr.dtype.element_ty),
             mask=w_inside)  # fmt: skip


def sparse_weight_grad(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    n: int,
    m: int,
    *,
    srste_lambda: float = 0.0,
    grad_prune: str = "none",
    step: int = 0,
    key: int = 0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dW`` ``[O, K]`` in ``weight``'s dtype for ``dy`` ``[T, O]``, ``x`` ``[T, K]``: ``dYᵀ X``
    with ``dY`` MVUE-pruned by ``grad_prune`` (stream ``(key, step)``) and ``+ λ (1 − F) ⊙ W``;
    ``F`` ranked from ``weight`` (N:M along ``K``) or the given ``mask``."""
    check_nm(n, m)
    check_tensor("dy", dy, 2)
    check_tensor("x", x, 2)
    check_tensor("weight", weight, 2)
    T, O = dy.shape
    K = x.shape[1]
    if x.shape[0] != T or x.dtype != dy.dtype:
        raise ValueError(f"x {x.dtype} {tuple(x.shape)} must be [T={T}, K] in dy's dtype {dy.dtype}")
    if weight.shape != (O, K) or K % m:
        raise ValueError(f"weight {tuple(weight.shape)} must be [O={O}, K={K}] with K % m == 0 (m={m})")
    if grad_prune != "none" and grad_prune not in MVUE_RULES:
        raise ValueError(f"grad_prune must be 'none' or one of {sorted(MVUE_RULES)}, got {grad_prune!r}")
    check_devices(dy=dy, x=x, weight=weight)
    check_mask(mask, weight)
    rule, mm = MVUE_RULES.get(grad_prune, (0, 4))
    dw = torch.empty((O, K), dtype=weight.dtype, device=weight.device)
    f = mask.view(torch.int8) if mask is not None else weight
    gemm_launcher(weight_grad_kernel)[gemm_grid(O, K, "BLOCK_O", "BLOCK_K")](
        dy, x, weight, f, dw, n, float(srste_lambda), step_seed(key, step), T, O, K,
        *dy.stride(), *x.stride(), *weight.stride(), *f.stride(), *dw.stride(),
        M=m, RULE=rule, MM=mm, SRSTE=srste_lambda != 0, LOAD_MASK=mask is not None,
        DOT=dot_dtype(dy.dtype), PRECISION=input_precision(), WIDE=wide_index(dy, x, weight, f, dw),
    )  # fmt: skip
    return dw
