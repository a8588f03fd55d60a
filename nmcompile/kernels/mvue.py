"""Standalone MVUE gradient pruning kernel (SPEC §7) for a gradient ``[T, O]``, blocks along ``T``.

Tiling: each program owns ``BLOCK_G`` blocks (of ``MM`` = 2 or 4 consecutive tokens) of
``BLOCK_O`` columns. It loads each entry of its blocks as a tile of its own, ``[BLOCK_G, BLOCK_O]``
at tokens ``MM·g + j``: every load and store runs along ``dY``'s contiguous dim, and the rule is
entrywise across the ``MM`` tiles, so no data moves between threads. (Reducing the ``MM`` axis of
one ``[.., MM]`` tile, as before, compiled to 14 warp shuffles per entry for sm90 and ran at a
sixth of an H200's bandwidth: 0.67 ms for a bf16 ``8192 x 16384``.) A ragged end is zero-padded
by the masked loads, as the reference pads. The transposed result (``[O, T]`` contiguous, for the
2:4 path) is joined back into whole blocks and stored along ``T``. Random numbers come from the
reference's counter hash of ``(key, step, block index)``, so this kernel, the fused
weight-gradient kernel and the portable op prune a step identically.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import MVUE_RULES, autotune_configs, check_tensor, join_entries, mvue_parts, step_seed, wide_index
from .compress24 import LAYOUTS, outputs, store_groups

TILES = [{"BLOCK_G": 16, "BLOCK_O": 128}, {"BLOCK_G": 8, "BLOCK_O": 256}, {"BLOCK_G": 32, "BLOCK_O": 64}]
"""The tiles ``CONFIGS`` tries on a GPU (the interpreter runs one small tile); the tests run each."""
CONFIGS = autotune_configs(
    TILES,
    [(4, 1), (8, 1)],
    (),
)


@triton.jit
def _entry(g_ptr, groups, cols, j, T, O, stride_gt, stride_go, MM: tl.constexpr):
    """Entry ``j`` of the blocks ``groups`` of columns ``cols``, in fp32 (0 past either end)."""
    rows = groups[:, None] * MM + j
    inside = (rows < T) & (cols[None, :] < O)
    return tl.load(g_ptr + rows * stride_gt + cols[None, :] * stride_go, mask=inside, other=0.0).to(tl.float32)


@triton.jit
def _store_entry(out_ptr, value, groups, cols, j, T, O, stride_ot, stride_oo, MM: tl.constexpr):
    """Store entry ``j`` of the blocks ``groups`` of columns ``cols`` (what lies inside ``[T, O]``)."""
    rows = groups[:, None] * MM + j
    inside = (rows < T) & (cols[None, :] < O)
    tl.store(out_ptr + rows * stride_ot + cols[None, :] * stride_oo, value.to(out_ptr.dtype.element_ty), mask=inside)


@triton.autotune(configs=CONFIGS, key=["T", "O", "RULE", "TRANSPOSE", "COMPRESS"])
@triton.jit(do_not_specialize=["seed"])
def mvue_kernel(
    g_ptr, out_ptr, meta_ptr, seed, T, O, stride_gt, stride_go, stride_ot, stride_oo,
    RULE: tl.constexpr, MM: tl.constexpr, TRANSPOSE: tl.constexpr, COMPRESS: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_O: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    """``out = prune(g)``: blocks of ``MM`` consecutive rows (tokens) of each column of ``g``;
    ``TRANSPOSE``: ``out`` is contiguous along ``T``; ``COMPRESS`` (``MM`` = 4; 1 + the layout's index in
    ``compress24.LAYOUTS``): ``prune(g)ᵀ`` compressed 2:4 into ``out`` (values) and ``meta``, its blocks the
    groups; ``WIDE``: int64 offsets (past 2³¹ elements)."""
    groups = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    cols = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    if WIDE:
        groups, cols = groups.to(tl.int64), cols.to(tl.int64)
    index = cols.to(tl.int64)[None, :] * tl.cdiv(T, MM) + groups[:, None]
    if MM == 2:
        a = (_entry(g_ptr, groups, cols, 0, T, O, stride_gt, stride_go, MM),
             _entry(g_ptr, groups, cols, 1, T, O, stride_gt, stride_go, MM))  # fmt: skip
    else:
        a = (_entry(g_ptr, groups, cols, 0, T, O, stride_gt, stride_go, MM),
             _entry(g_ptr, groups, cols, 1, T, O, stride_gt, stride_go, MM),
             _entry(g_ptr, groups, cols, 2, T, O, stride_gt, stride_go, MM),
             _entry(g_ptr, groups, cols, 3, T, O, stride_gt, stride_go, MM))  # fmt: skip
    pruned = mvue_parts(a, seed, index, RULE)
    if COMPRESS:
        kind = out_ptr.dtype.element_ty
        store_groups(out_ptr, meta_ptr, tl.trans(pruned[0]).to(kind), tl.trans(pruned[1]).to(kind),
                     tl.trans(pruned[2]).to(kind), tl.trans(pruned[3]).to(kind), cols, tl.program_id(1) * BLOCK_G,
                     O, T, COMPRESS - 1, BLOCK_G, WIDE)  # fmt: skip
    elif TRANSPOSE:
        blocks = join_entries(pruned, MM)
        tokens = tl.program_id(1) * (BLOCK_G * MM) + tl.arange(0, BLOCK_G * MM)
        if WIDE:
            tokens = tokens.to(tl.int64)
        tile = tl.reshape(tl.permute(blocks, (1, 0, 2)), (BLOCK_O, BLOCK_G * MM))
        inside = (cols[:, None] < O) & (tokens[None, :] < T)
        tl.store(out_ptr + tokens[None, :] * stride_ot + cols[:, None] * stride_oo, tile.to(out_ptr.dtype.element_ty),
                 mask=inside)  # fmt: skip
    else:
        for j in tl.static_range(MM):
            _store_entry(out_ptr, pruned[j], groups, cols, j, T, O, stride_ot, stride_oo, MM)


def _rule(rule: str) -> tuple[int, int]:
    """``rule``'s id and block size, checked."""
    if rule not in MVUE_RULES:
        raise ValueError(f"rule must be one of {sorted(MVUE_RULES)}, got {rule!r}")
    return MVUE_RULES[rule]


def _launch(grad: torch.Tensor, out: torch.Tensor, meta: torch.Tensor, step: int, key: int, rule: str, **flags) -> None:
    """``mvue_kernel`` over ``grad`` ``[T, O]`` (one program per ``BLOCK_G`` blocks of ``BLOCK_O`` columns)."""
    rule_id, mm = _rule(rule)
    T, O = grad.shape

    def grid(meta_: dict) -> tuple[int, int]:
        return triton.cdiv(O, meta_["BLOCK_O"]), triton.cdiv(triton.cdiv(T, mm), meta_["BLOCK_G"])

    mvue_kernel[grid](
        grad, out, meta, step_seed(key, step), T, O, *grad.stride(), *out.stride(), RULE=rule_id, MM=mm,
        WIDE=wide_index(grad, out), **flags,
    )  # fmt: skip


def mvue_prune(grad: torch.Tensor, step: int, key: int, rule: str, *, transpose: bool = False) -> torch.Tensor:
    """SPEC §7 ``rule`` on ``grad`` ``[T, O]`` (blocks along ``T``), stream ``(key, step)``: the
    ``nmsparse::mvue_prune`` op in one launch. ``transpose`` returns the result as a contiguous
    ``[O, T]`` (N:M along its last dim: the 2:4 path's weight-gradient operand)."""
    check_tensor("grad", grad, 2)
    T, O = grad.shape
    out = grad.new_empty((O, T)).t() if transpose else torch.empty_like(grad, memory_format=torch.contiguous_format)
    _launch(grad, out, out, step, key, rule, TRANSPOSE=transpose, COMPRESS=0)
    return out.t() if transpose else out


def mvue_prune_compressed(
    grad: torch.Tensor, step: int, key: int, rule: str, layout: str, *, numel: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``compress24.compress24(mvue_prune(grad, step, key, rule, transpose=True), layout, numel=numel)``
    in one pass, without the pruned ``[O, T]`` in memory: the 2:4 weight gradient's operand. For the
    rules with blocks of 4 (``mvue24``, ``mvue24_approx``), fp16/bf16 ``grad``; ``O`` and ``T`` as
    ``compress24`` needs them."""
    check_tensor("grad", grad, 2, (torch.float16, torch.bfloat16))
    if _rule(rule)[1] != 4:
        raise ValueError(f"a compressed MVUE needs blocks of 4 tokens (mvue24, mvue24_approx), got {rule!r}")
    T, O = grad.shape
    values, meta, result = outputs(O, T, grad.dtype, grad.device, layout, numel)
    _launch(grad, values, meta, step, key, rule, TRANSPOSE=True, COMPRESS=1 + LAYOUTS.index(layout))
    return result
