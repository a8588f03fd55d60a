"""Masked-operand kernel: a GEMM's sparse weight operand in one pass over ``W``, written to memory.

Two users. The 2:4 path compresses it (PyTorch's semi-structured layout: N:M along the *last* dim,
zeros in place), or has this kernel store it compressed (``COMPRESS``: ``compress24.store_groups``
on the tile, or on its transpose with ``TRANSPOSED``) where the library's layout takes the shape;
the Triton path on large batches hands it to a dense cuBLAS GEMM, since ranking the mask inside
every GEMM tile repeats it once per tile of tokens (``kernels.ops``).

- forward: ``W ⊙ F`` ``[O, K]``, ``F`` N:M along ``K`` (ranked in registers, or a loaded mask);
- input gradient: ``(W[P] ⊙ Bp)ᵀ`` ``[K, O]``, ``Bp = nm_mask(|W⊙F|[P], along O) ∧ F[P]`` (SPEC §4),
  or ``(W ⊙ mask)ᵀ`` for a loaded transposable mask (2:4); ``W ⊙ B`` ``[O, K]`` with the rows back
  in ``W``'s order, ``B[P] = Bp``, so that ``dX = dY · (W ⊙ B)`` needs no gather of ``dY`` (Triton).

With mask decay the pruned entries are ``α W`` instead of zeros (the Triton path; 2:4 has no decay).
Tiling: a program owns ``[BLOCK_O, BLOCK_K]`` of ``W`` (rows gathered through ``P``), both extents
multiples of ``M`` so the tile holds whole groups both ways, and stores it through the output's
strides (transposed for the 2:4 input gradient, by passing the ``[O, K]`` view of a ``[K, O]``
buffer), at the gathered rows themselves with ``SCATTER``. On a GPU the configs include K tiles as
wide as the program's threads (8 entries each), so each thread holds whole groups of rows and
ranking ``Bp`` along ``O`` needs no data from other threads (``python -m benchmarks.ptx``: 0
shuffles, against 8 per entry with the 64-wide tiles).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    DTYPES,
    autotune_configs,
    check_alpha,
    check_mask,
    check_nm,
    check_perm,
    check_tensor,
    interpreting,
    nm_keep_cols,
    nm_keep_rows,
    wide_index,
)
from .compress24 import LAYOUTS, outputs, quads, store_groups
from .sparse24 import fits_24

TILES = [{"BLOCK_O": 32, "BLOCK_K": 64}, {"BLOCK_O": 64, "BLOCK_K": 64}]
"""The tiles ``CONFIGS`` tries on a GPU (the interpreter runs one small tile); the tests run each."""
THREAD_TILES = [({"BLOCK_O": rows, "BLOCK_K": 256 * warps}, warps) for rows in (4, 8) for warps in (4, 8)]
"""GPU tiles with their ``num_warps``: K tiles as wide as the threads (8 entries each), so that each
thread holds whole row groups."""
CONFIGS = autotune_configs(TILES, [(4, 1)], ("BLOCK_O", "BLOCK_K"))
if not interpreting():
    CONFIGS += [triton.Config(tile, num_warps=warps, num_stages=1) for tile, warps in THREAD_TILES]


def _whole_groups(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The configs whose ``BLOCK_O`` holds whole groups of ``M`` rows (powers of two: ``M <= BLOCK_O``)
    and, where the operand is written compressed, what its layout stores at once: for the transposed
    operand (rows of ``W`` are its columns) whole 16-row metadata words, 32 rows in cuSPARSELt's
    sm90 layout; for ``W ⊙ F`` there, whole 16-row runs."""
    sm90 = kwargs["COMPRESS"] == 1 + LAYOUTS.index("cusparselt_sm90")
    if kwargs["COMPRESS"] and kwargs["TRANSPOSED"]:
        least = 32 if sm90 else 16
    else:
        least = 16 if sm90 else 1
    return [c for c in configs if c.kwargs["BLOCK_O"] >= max(kwargs["M"], least)]


@triton.autotune(
    configs=CONFIGS,
    key=["O", "K", "M", "PERMUTE", "LOAD_MASK", "HAS_ALPHA", "SCATTER", "COMPRESS", "TRANSPOSED", "stride_ok"],
    prune_configs_by={"early_config_prune": _whole_groups},
)
@triton.jit
def masked_operand_kernel(
    w_ptr, perm_ptr, f_ptr, alpha_ptr, out_ptr, meta_ptr, n: tl.constexpr, O, K,
    stride_wo, stride_wk, stride_fo, stride_fk, stride_oo, stride_ok,
    M: tl.constexpr, PERMUTE: tl.constexpr, LOAD_MASK: tl.constexpr, HAS_ALPHA: tl.constexpr,
    SCATTER: tl.constexpr, COMPRESS: tl.constexpr, TRANSPOSED: tl.constexpr, BLOCK_O: tl.constexpr,
    BLOCK_K: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    """``out[o, k] = W[src(o), k]`` where kept, else 0 (``α W`` with ``HAS_ALPHA``); ``src`` is ``P``
    with ``PERMUTE``; ``SCATTER`` stores row ``o`` at ``src(o)``. ``COMPRESS`` (1 + the index of the
    layout in ``compress24.LAYOUTS``): the operand, ``[O, K]`` or with ``TRANSPOSED`` ``[K, O]``, 2:4
    along its last dim, compressed into ``out`` (values) and ``meta`` instead. ``WIDE``: int64
    offsets (an operand past 2³¹ elements)."""
    o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    if WIDE:
        o, ks = o.to(tl.int64), ks.to(tl.int64)
    inside = (o[:, None] < O) & (ks[None, :] < K)
    source = tl.load(perm_ptr + o, mask=o < O, other=0) if PERMUTE else o
    w = tl.load(w_ptr + source[:, None] * stride_wo + ks[None, :] * stride_wk, mask=inside, other=0.0)
    if LOAD_MASK:
        keep = tl.load(f_ptr + source[:, None] * stride_fo + ks[None, :] * stride_fk, mask=inside, other=0) != 0
    else:
        keep = nm_keep_rows(w, n, BLOCK_O, BLOCK_K, M)
    if PERMUTE:
        keep = nm_keep_cols(tl.where(keep, w.to(tl.float32), 0.0), n, BLOCK_O, BLOCK_K, M) & keep
    if HAS_ALPHA:  # as the fused kernels: α W in fp32, rounded to W's dtype, then to the output's
        kept = tl.where(keep, w.to(tl.float32), w.to(tl.float32) * tl.load(alpha_ptr)).to(w_ptr.dtype.element_ty)
    else:
        kept = tl.where(keep, w, tl.zeros_like(w))
    kept = kept.to(out_ptr.dtype.element_ty)
    if COMPRESS and TRANSPOSED:
        e0, e1, e2, e3 = quads(tl.trans(kept), BLOCK_K, BLOCK_O // 4)
        store_groups(out_ptr, meta_ptr, e0, e1, e2, e3, ks, tl.program_id(0) * (BLOCK_O // 4), K, O,
                     COMPRESS - 1, BLOCK_O // 4, WIDE)  # fmt: skip
    elif COMPRESS:
        e0, e1, e2, e3 = quads(kept, BLOCK_O, BLOCK_K // 4)
        store_groups(out_ptr, meta_ptr, e0, e1, e2, e3, o, tl.program_id(1) * (BLOCK_K // 4), O, K,
                     COMPRESS - 1, BLOCK_K // 4, WIDE)  # fmt: skip
    else:
        rows = source if SCATTER else o
        tl.store(out_ptr + rows[:, None] * stride_oo + ks[None, :] * stride_ok, kept, mask=inside)


def _launch(
    weight: torch.Tensor,
    n: int,
    m: int,
    perm: torch.Tensor | None,
    mask: torch.Tensor | None,
    out_view: torch.Tensor,
    alpha: torch.Tensor | None = None,
    scatter: bool = False,
    compressed: tuple[str, torch.Tensor, bool] | None = None,
) -> None:
    """Fill ``out_view`` (an ``[O, K]`` view, maybe transposed) with the masked ``weight``; or, with
    ``compressed`` = ``(layout, meta, transposed)``, its values (``out_view``) and ``meta``."""
    O, K = weight.shape
    f = mask.view(torch.int8) if mask is not None else weight
    layout, meta, transposed = compressed or ("", out_view, False)

    def grid(meta_: dict) -> tuple[int, int]:
        return triton.cdiv(O, meta_["BLOCK_O"]), triton.cdiv(K, meta_["BLOCK_K"])

    masked_operand_kernel[grid](
        weight, perm.contiguous() if perm is not None else weight, f, alpha if alpha is not None else weight,
        out_view, meta, n, O, K, *weight.stride(), *f.stride(), *out_view.stride(),
        M=m, PERMUTE=perm is not None, LOAD_MASK=mask is not None, HAS_ALPHA=alpha is not None, SCATTER=scatter,
        COMPRESS=1 + LAYOUTS.index(layout) if layout else 0, TRANSPOSED=transposed,
        WIDE=wide_index(weight, f, out_view, meta),
    )  # fmt: skip


def _check(
    weight: torch.Tensor,
    n: int,
    m: int,
    mask: torch.Tensor | None,
    dtype: torch.dtype | None,
    alpha: torch.Tensor | None = None,
) -> torch.dtype:
    """Launcher checks shared by the operands; returns the output dtype."""
    check_nm(n, m)
    check_tensor("weight", weight, 2)
    if weight.shape[1] % m:
        raise ValueError(f"weight {tuple(weight.shape)}: K must be divisible by m={m}")
    check_mask(mask, weight)
    check_alpha(alpha, weight)
    out_dtype = dtype or weight.dtype
    if out_dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {out_dtype}")
    return out_dtype


def _input_grad_check(
    weight: torch.Tensor,
    n: int,
    m: int,
    perm: torch.Tensor | None,
    mask: torch.Tensor | None,
    dtype: torch.dtype | None,
) -> torch.dtype:
    """The input-gradient operand's checks (exactly one of ``perm`` and ``mask``); its dtype."""
    out_dtype = _check(weight, n, m, mask, dtype)
    if (perm is None) == (mask is None):
        raise ValueError("input_grad_operand takes exactly one of perm (Bi-Mask) and mask (transposable)")
    check_perm(perm, weight, m)
    return out_dtype


def forward_operand(
    weight: torch.Tensor,
    n: int,
    m: int,
    *,
    mask: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``W ⊙ F`` ``[O, K]`` (contiguous, in ``dtype``, default ``weight``'s), ``F`` the N:M mask
    along ``K`` ranked from ``weight``, or ``mask`` where given; ``W ⊙ (F + (1−F)α)`` with ``alpha``."""
    out = torch.empty(weight.shape, dtype=_check(weight, n, m, mask, dtype, alpha), device=weight.device)
    _launch(weight, n, m, None, mask, out, alpha)
    return out


def backward_operand(
    weight: torch.Tensor,
    n: int,
    m: int,
    *,
    perm: torch.Tensor,
    mask: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Bi-Mask's ``W ⊙ B`` ``[O, K]`` (contiguous, rows in ``weight``'s order, ``B[P] = Bp``), so
    ``dY · (W ⊙ B) = dY[:, P] · (W[P] ⊙ Bp)``; ``F`` ranked from ``weight`` or the given ``mask``."""
    out_dtype = _check(weight, n, m, mask, dtype, alpha)
    if perm is None:
        raise ValueError("backward_operand needs perm (Bi-Mask); forward_operand serves the other modes")
    check_perm(perm, weight, m)
    out = torch.empty(weight.shape, dtype=out_dtype, device=weight.device)
    _launch(weight, n, m, perm, mask, out, alpha, scatter=True)
    return out


def input_grad_operand(
    weight: torch.Tensor,
    n: int,
    m: int,
    *,
    perm: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``(W[P] ⊙ Bp)ᵀ`` ``[K, O]`` (contiguous, N:M along ``O``) with ``perm``; ``(W ⊙ mask)ᵀ``
    with a transposable ``mask`` instead."""
    out_dtype = _input_grad_check(weight, n, m, perm, mask, dtype)
    out = torch.empty((weight.shape[1], weight.shape[0]), dtype=out_dtype, device=weight.device)
    _launch(weight, n, m, perm, mask, out.t())
    return out


def _check_24(n: int, m: int) -> None:
    """A compressed operand keeps at most two of every four entries: ``n:m`` must be 2:4-compatible."""
    if not fits_24(n, m):
        raise ValueError(f"a 2:4 compressed operand needs an N:M that is 2:4 (1:2, 2:4, 1:4, 2:8, ...), got {n}:{m}")


def forward_operand_compressed(
    weight: torch.Tensor,
    n: int,
    m: int,
    layout: str,
    *,
    numel: int | None = None,
    mask: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``compress24.compress24(forward_operand(weight, n, m, mask=mask, dtype=dtype), layout,
    numel=numel)`` in one pass over ``W``, without the dense operand in memory (2:4 ``n:m`` only)."""
    out_dtype = _check(weight, n, m, mask, dtype)
    _check_24(n, m)
    values, meta, result = outputs(*weight.shape, out_dtype, weight.device, layout, numel)
    _launch(weight, n, m, None, mask, values, compressed=(layout, meta, False))
    return result


def input_grad_operand_compressed(
    weight: torch.Tensor,
    n: int,
    m: int,
    layout: str,
    *,
    numel: int | None = None,
    perm: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``compress24.compress24(input_grad_operand(weight, n, m, perm=perm, mask=mask, dtype=dtype),
    layout, numel=numel)`` in one pass over ``W``, without the dense ``[K, O]`` in memory."""
    out_dtype = _input_grad_check(weight, n, m, perm, mask, dtype)
    _check_24(n, m)
    O, K = weight.shape
    values, meta, result = outputs(K, O, out_dtype, weight.device, layout, numel)
    _launch(weight, n, m, perm, mask, values, compressed=(layout, meta, True))
    return result
