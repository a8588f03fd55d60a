"""Column gather, transposed: ``a[:, perm].t()`` as a contiguous ``[O, T]``, the dense operand of the
2:4 input gradient (``dY[:, P]ᵀ``, SPEC §4's permuted output dim).

``index_select`` along the columns took 0.81 ms for fc1's bf16 ``8192 x 16384`` ``dY`` on an H200,
a sixth of the bandwidth: each warp reads 32 scattered entries of a row. This kernel reads each
``[BLOCK_T, BLOCK_O]`` tile of ``a`` along its contiguous dim and stores it transposed into the
rows ``P⁻¹[o]`` of the result, ``BLOCK_T`` contiguous tokens each; Triton moves the tile between
the two layouts through shared memory. Every byte is read once and written once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import DTYPES, autotune_configs, check_tensor, wide_index

TILES = [{"BLOCK_T": 64, "BLOCK_O": 64}, {"BLOCK_T": 128, "BLOCK_O": 32}, {"BLOCK_T": 32, "BLOCK_O": 128}]
"""The tiles ``CONFIGS`` tries on a GPU (the interpreter runs one small tile); the tests run each."""
CONFIGS = autotune_configs(
    TILES,
    [(4, 1), (8, 1)],
    (),
)


@triton.autotune(configs=CONFIGS, key=["T", "O"])
@triton.jit
def gather_t_kernel(
    a_ptr, row_of_ptr, out_ptr, T, O, stride_at, stride_ao,
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    """``out[row_of[o], t] = a[t, o]`` for a tile of ``a``; ``WIDE``: int64 offsets."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    if WIDE:
        t, o = t.to(tl.int64), o.to(tl.int64)
    inside = (t[:, None] < T) & (o[None, :] < O)
    tile = tl.load(a_ptr + t[:, None] * stride_at + o[None, :] * stride_ao, mask=inside)
    row = tl.load(row_of_ptr + o, mask=o < O, other=0)
    tl.store(out_ptr + row[None, :] * T + t[:, None], tile, mask=inside)


def gather_t(a: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``a[:, perm].t()`` contiguous (``[O, T]``) for ``a`` ``[T, O]`` and a permutation ``perm`` of
    ``0..O-1`` (int64, on ``a``'s device): row ``j`` of the result is column ``perm[j]`` of ``a``.
    Values are not checked (that would read ``perm`` back to the host at every call); one that is
    no permutation gives wrong rows, never a write outside the result."""
    check_tensor("a", a, 2, DTYPES)
    T, O = a.shape
    if perm.shape != (O,) or perm.dtype != torch.int64 or perm.device != a.device:
        got = f"{perm.dtype} {tuple(perm.shape)} on {perm.device}"
        raise ValueError(f"perm must be int64 [{O}] on {a.device}, got {got}")
    row_of = torch.argsort(perm)  # P's inverse; a permutation of the rows even where perm is none
    out = a.new_empty((O, T))

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(T, meta["BLOCK_T"]), triton.cdiv(O, meta["BLOCK_O"])

    gather_t_kernel[grid](a, row_of, out, T, O, *a.stride(), WIDE=wide_index(a, out))
    return out
