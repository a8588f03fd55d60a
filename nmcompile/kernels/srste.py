"""SR-STE epilogue of the 2:4 weight gradient: ``dW = G + λ (1 − F) ⊙ W`` in one pass (SPEC §6).

cuSPARSELt's GEMM has no such epilogue, so the 2:4 path's ``G = mvue(dY)ᵀ X`` gets it here
instead of four elementwise passes over ``[O, K]`` (``W ⊙ F`` written, subtracted, scaled, added).
Tiling: a program owns ``[BLOCK_O, BLOCK_K]`` of ``dW``, ``BLOCK_K`` a multiple of ``M``, so ``F``
is ranked from the ``W`` tile in registers (or loaded, for a transposable mask). The sum is taken
in fp32 and rounded once to ``W``'s dtype, as in the fused Triton weight-gradient kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import autotune_configs, check_devices, check_mask, check_nm, check_tensor, nm_keep_rows, wide_index

TILES = [{"BLOCK_O": 32, "BLOCK_K": 64}, {"BLOCK_O": 64, "BLOCK_K": 128}]
"""The tiles ``CONFIGS`` tries on a GPU (the interpreter runs one small tile); the tests run each."""
CONFIGS = autotune_configs(TILES, [(4, 1), (8, 1)], ("BLOCK_K",))


@triton.autotune(configs=CONFIGS, key=["O", "K", "M", "LOAD_MASK"])
@triton.jit
def srste_kernel(
    g_ptr, w_ptr, f_ptr, out_ptr, n: tl.constexpr, lam, O, K,
    stride_go, stride_gk, stride_wo, stride_wk, stride_fo, stride_fk, stride_oo, stride_ok,
    M: tl.constexpr, LOAD_MASK: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    """``out = G + lam · W`` where ``F`` prunes ``W``, else ``G``, on one ``[BLOCK_O, BLOCK_K]`` tile;
    ``WIDE``: int64 offsets (an operand past 2³¹ elements)."""
    o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    if WIDE:
        o, ks = o.to(tl.int64), ks.to(tl.int64)
    inside = (o[:, None] < O) & (ks[None, :] < K)
    w = tl.load(w_ptr + o[:, None] * stride_wo + ks[None, :] * stride_wk, mask=inside, other=0.0).to(tl.float32)
    if LOAD_MASK:
        keep = tl.load(f_ptr + o[:, None] * stride_fo + ks[None, :] * stride_fk, mask=inside, other=0) != 0
    else:
        keep = nm_keep_rows(w, n, BLOCK_O, BLOCK_K, M)
    g = tl.load(g_ptr + o[:, None] * stride_go + ks[None, :] * stride_gk, mask=inside, other=0.0).to(tl.float32)
    out = g + lam * tl.where(keep, 0.0, w)
    tl.store(out_ptr + o[:, None] * stride_oo + ks[None, :] * stride_ok, out.to(out_ptr.dtype.element_ty), mask=inside)


def srste_add(
    grad: torch.Tensor, weight: torch.Tensor, n: int, m: int, lam: float, *, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``grad + lam (1 − F) ⊙ weight`` ``[O, K]`` in ``weight``'s dtype; ``F`` is N:M along ``K``
    ranked from ``weight``, or the given ``mask``."""
    check_nm(n, m)
    check_tensor("grad", grad, 2)
    check_tensor("weight", weight, 2)
    O, K = weight.shape
    if grad.shape != weight.shape or K % m:
        raise ValueError(f"grad {tuple(grad.shape)} and weight {tuple(weight.shape)}: one [O, K] shape, K % m == 0")
    check_devices(grad=grad, weight=weight)
    check_mask(mask, weight)
    out = torch.empty((O, K), dtype=weight.dtype, device=weight.device)
    f = mask.view(torch.int8) if mask is not None else weight

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(O, meta["BLOCK_O"]), triton.cdiv(K, meta["BLOCK_K"])

    srste_kernel[grid](
        grad, weight, f, out, n, float(lam), O, K, *grad.stride(), *weight.stride(), *f.stride(), *out.stride(),
        M=m, LOAD_MASK=mask is not None, WIDE=wide_index(grad, weight, f, out),
    )  # fmt: skip
    return out
