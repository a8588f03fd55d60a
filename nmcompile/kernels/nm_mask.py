"""Standalone N:M mask kernel: ``keep = nm_mask(a, n, m, dim)`` for a 2-D view, one launch.

Tiling: each program owns a ``[BLOCK_R, BLOCK_C]`` tile of the matrix whose *columns* hold the
groups (``BLOCK_C`` a multiple of ``M``, so groups never straddle tiles); masks along rows use the
transposed view, so both directions are one kernel with strided loads. Used where no GEMM can
absorb the mask: the permutation search on CUDA (``state.LayerState.begin_training_step``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import autotune_configs, check_nm, check_tensor, nm_keep_rows, wide_index

TILES = [{"BLOCK_R": 32, "BLOCK_C": 64}, {"BLOCK_R": 64, "BLOCK_C": 128}]
"""The tiles ``CONFIGS`` tries on a GPU (the interpreter runs one small tile); the tests run each."""
CONFIGS = autotune_configs(TILES, [(4, 1)], ("BLOCK_C",))


@triton.autotune(configs=CONFIGS, key=["R", "C", "M"])
@triton.jit
def nm_mask_kernel(
    a_ptr, out_ptr, n: tl.constexpr, R, C, stride_ar, stride_ac, stride_or, stride_oc,
    M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    """``out[r, c]`` = entry ``(r, c)`` is among the top ``n`` of its group of ``M`` columns;
    ``WIDE``: int64 offsets (an operand past 2³¹ elements)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if WIDE:
        rows, cols = rows.to(tl.int64), cols.to(tl.int64)
    inside = (rows[:, None] < R) & (cols[None, :] < C)
    a = tl.load(a_ptr + rows[:, None] * stride_ar + cols[None, :] * stride_ac, mask=inside, other=0.0)
    keep = nm_keep_rows(a, n, BLOCK_R, BLOCK_C, M)
    tl.store(out_ptr + rows[:, None] * stride_or + cols[None, :] * stride_oc, keep.to(tl.int8), mask=inside)


def nm_mask(a: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    """SPEC §2 N:M magnitude mask of a 2-D ``a`` along ``dim`` (bool, contiguous), in one launch."""
    check_nm(n, m)
    check_tensor("a", a, 2)
    if dim not in (0, 1, -1, -2):
        raise ValueError(f"dim must be 0 or 1 for a 2-D tensor, got {dim}")
    if a.shape[dim] % m:
        raise ValueError(f"nm_mask: dim {dim} of size {a.shape[dim]} is not divisible by m={m}")
    out = torch.empty(a.shape, dtype=torch.int8, device=a.device)
    view, out_view = (a, out) if dim % 2 == 1 else (a.t(), out.t())
    R, C = view.shape

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(R, meta["BLOCK_R"]), triton.cdiv(C, meta["BLOCK_C"])

    nm_mask_kernel[grid](view, out_view, n, R, C, *view.stride(), *out_view.stride(), M=m, WIDE=wide_index(a, out))
    return out.view(torch.bool)
