"""Standalone MVUE gradient pruning kernel (SPEC §7) for a gradient ``[T, O]``, blocks along ``T``.

Tiling: each program owns ``[BLOCK_O, BLOCK_T]`` of the transposed view (``BLOCK_T`` a multiple of
the block size 2 or 4; a ragged end is zero-padded by the masked load, as the reference pads).
Random numbers come from the reference's counter hash of ``(key, step, block index)``, so this
kernel, the fused weight-gradient kernel and the portable op prune a step identically.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import MVUE_RULES, autotune_configs, check_tensor, mvue_tile, step_seed, wide_index

CONFIGS = autotune_configs([{"BLOCK_O": 32, "BLOCK_T": 64}, {"BLOCK_O": 64, "BLOCK_T": 64}], [(4, 1)], ("BLOCK_T",))


@triton.autotune(configs=CONFIGS, key=["T", "O", "RULE"])
@triton.jit(do_not_specialize=["seed"])
def mvue_kernel(
    g_ptr, out_ptr, seed, T, O, stride_gt, stride_go, stride_ot, stride_oo,
    RULE: tl.constexpr, MM: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_T: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    """``out = prune(g)``: blocks of ``MM`` consecutive rows (tokens) of each column of ``g``;
    ``WIDE``: int64 offsets (past 2³¹ elements)."""
    cols = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    rows = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    if WIDE:
        cols, rows = cols.to(tl.int64), rows.to(tl.int64)
    inside = (cols[:, None] < O) & (rows[None, :] < T)
    g = tl.load(g_ptr + rows[None, :] * stride_gt + cols[:, None] * stride_go, mask=inside, other=0.0)
    blocks = tl.reshape(g.to(tl.float32), (BLOCK_O, BLOCK_T // MM, MM))
    per_col = tl.cdiv(T, MM)
    first_block = tl.program_id(1) * (BLOCK_T // MM)
    index = cols.to(tl.int64)[:, None, None] * per_col + first_block + tl.arange(0, BLOCK_T // MM)[None, :, None]
    pruned = tl.reshape(mvue_tile(blocks, seed, index, RULE), (BLOCK_O, BLOCK_T))
    tl.store(out_ptr + rows[None, :] * stride_ot + cols[:, None] * stride_oo, pruned.to(g.dtype), mask=inside)


def mvue_prune(grad: torch.Tensor, step: int, key: int, rule: str, *, transpose: bool = False) -> torch.Tensor:
    """SPEC §7 ``rule`` on ``grad`` ``[T, O]`` (blocks along ``T``), stream ``(key, step)``: the
    ``nmsparse::mvue_prune`` op in one launch. ``transpose`` returns the result as a contiguous
    ``[O, T]`` (N:M along its last dim: the 2:4 path's weight-gradient operand)."""
    check_tensor("grad", grad, 2)
    if rule not in MVUE_RULES:
        raise ValueError(f"rule must be one of {sorted(MVUE_RULES)}, got {rule!r}")
    rule_id, mm = MVUE_RULES[rule]
    T, O = grad.shape
    out = grad.new_empty((O, T)).t() if transpose else torch.empty_like(grad, memory_format=torch.contiguous_format)

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(O, meta["BLOCK_O"]), triton.cdiv(T, meta["BLOCK_T"])

    seed, wide = step_seed(key, step), wide_index(grad, out)
    mvue_kernel[grid](grad, out, seed, T, O, *grad.stride(), *out.stride(), RULE=rule_id, MM=mm, WIDE=wide)
    return out.t() if transpose else out
