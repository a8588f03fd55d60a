"""Permutation scoring kernel (SPEC §5): the scores of all candidate permutations in one launch.

``score(P) = Σ over blocks of M rows of F[P] and over columns of min(N, kept in the block)``.
Tiling: program ``(c, i, j)`` gathers ``BLOCK_B`` blocks (``BLOCK_B × M`` rows, through candidate
``c``'s indices) × ``BLOCK_C`` columns of the mask, reduces them to one partial score and adds it
to ``scores[c]`` atomically; integer adds make the result exact and independent of order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import autotune_configs, check_nm

TILES = [{"BLOCK_B": 16, "BLOCK_C": 64}, {"BLOCK_B": 32, "BLOCK_C": 128}]
"""The tiles ``CONFIGS`` tries on a GPU (the interpreter runs one small tile); the tests run each."""
CONFIGS = autotune_configs(TILES, [(4, 1)], ())


@triton.autotune(configs=CONFIGS, key=["O", "C", "M"], reset_to_zero=["score_ptr"])  # timed runs add too
@triton.jit
def perm_score_kernel(
    f_ptr, perm_ptr, score_ptr, n, O, C, stride_fo, stride_fc, stride_pc,
    M: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """``scores[c] += Σ min(n, Σ_block F[perm[c, rows], cols])`` over this program's tile."""
    candidate = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_B * M + tl.arange(0, BLOCK_B * M)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    source = tl.load(perm_ptr + candidate * stride_pc + rows, mask=rows < O, other=0)
    inside = (rows[:, None] < O) & (cols[None, :] < C)
    f = tl.load(f_ptr + source[:, None] * stride_fo + cols[None, :] * stride_fc, mask=inside, other=0)
    per_block = tl.sum(tl.reshape(f.to(tl.int32), (BLOCK_B, M, BLOCK_C)), axis=1)
    tl.atomic_add(score_ptr + candidate, tl.sum(tl.sum(tl.minimum(per_block, n), axis=1), axis=0))


def permutation_scores(fmask: torch.Tensor, perms: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """``reference.permutation_score`` of each row of ``perms`` ``[P, O]`` for ``fmask`` ``[O, ...]``
    (a conv mask's trailing dims are columns): int64 ``[P]``."""
    check_nm(n, m)
    integer = not (perms.dtype.is_floating_point or perms.dtype.is_complex or perms.dtype == torch.bool)
    if (
        fmask.dtype != torch.bool or fmask.dim() == 0 or fmask.shape[0] % m
        or not integer or perms.dim() != 2 or perms.shape[1] != fmask.shape[0]
    ):  # fmt: skip
        raise ValueError(
            f"need a bool mask [O, ...] with O % m == 0 and integer perms [P, O], got {fmask.dtype} "
            f"{tuple(fmask.shape)} and {perms.dtype} {tuple(perms.shape)}"
        )
    f = fmask.reshape(fmask.shape[0], -1).view(torch.int8)
    perms = perms.to(device=f.device, dtype=torch.int64).contiguous()
    scores = torch.zeros(perms.shape[0], dtype=torch.int32, device=f.device)
    O, C = f.shape

    def grid(meta: dict) -> tuple[int, int, int]:
        return perms.shape[0], triton.cdiv(O // m, meta["BLOCK_B"]), triton.cdiv(C, meta["BLOCK_C"])

    perm_score_kernel[grid](f, perms, scores, n, O, C, *f.stride(), perms.stride(0), M=m)
    return scores.to(torch.int64)


def search_permutation(
    fmask: torch.Tensor, current: torch.Tensor, candidates: list[torch.Tensor], n: int, m: int
) -> tuple[torch.Tensor, int]:
    """``reference.search_permutation`` with one scoring launch: the best of ``current`` and the
    candidates, the earliest on ties (so ``current`` stays unless a candidate beats it)."""
    if any(c.shape != current.shape for c in candidates):
        raise ValueError(f"candidates must have current's shape {tuple(current.shape)}")
    perms = torch.stack([current.to(fmask.device), *[c.to(fmask.device) for c in candidates]])
    scores = permutation_scores(fmask, perms, n, m)
    best = int(torch.argmax(scores))  # the first maximum
    return perms[best].to(current.device).clone(), int(scores[best])
