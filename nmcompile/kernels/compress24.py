"""2:4 compression kernel: a dense fp16/bf16 ``A`` ``[R, C]`` with at most two nonzeros in every
aligned group of four along ``C`` to the values and metadata the sparse tensor cores read, in one
pass, in CUTLASS's layout or in one of cuSPARSELt's.

``torch._cslt_compress`` took 1.4 to 3.1 ms per operand of the FFN block on an H200 (more than the
2:4 GEMM saves, docs/benchmarks.md); this kernel reads ``A`` once and writes ``R x C/2`` values and
``R x C/16`` 16-bit metadata words. Which two entries of a group it keeps, and their 4-bit code
(``idx0 | idx1 << 2``, ``idx0 < idx1``), follow ``sparse_semi_structured_from_dense_cutlass``, also
for groups with fewer or more than two nonzeros. A metadata word holds the codes of 16 columns of
one row; where it goes:

- ``CUTLASS``: ``ColumnMajorInterleaved<2>`` with the 32-row swizzle of PyTorch's
  ``_calculate_meta_reordering_scatter_offsets``; values and metadata are separate tensors.
- ``cuSPARSELt`` (``cusparselt``): one buffer, the values then the metadata, in 128x64 blocks
  (column-major over blocks), 32x32 tiles inside them (column-major), and the same swizzle inside
  a tile. This is the layout PyTorch's ``_sparse_semi_structured_tile`` writes for cuSPARSELt
  (``MetadataCuSparseLt``, which its authors reverse-engineered and test on sm8x). The H200's
  cuSPARSELt (torch 2.11) did not read it.
- ``cuSPARSELt`` on sm90 (``cusparselt_sm90``): the same buffer, the metadata in the layout
  torchao's ``sparse24_sm90_sparsify`` writes for 16-bit operands: per 64 rows, per 32-column
  strip, 256 bytes, 64 per 16 rows; in those, word ``4 i + k`` holds the codes of groups ``k``
  and ``4 + k`` of rows ``i`` and ``i + 8``.

``sparse24`` takes a cuSPARSELt layout only after checking it against ``torch._cslt_compress`` on
the GPU at hand (``sparse24.compress``). Both need ``R`` and ``C`` to be multiples of 128, and
the buffer is ``[R, S]``, as the library's.

Tiling: each program owns ``BLOCK_R`` rows by ``BLOCK_C`` columns, loads them along ``C`` and
splits the groups of four into their entries in registers (``tl.split``), so no data moves
between threads before the scattered 16-bit metadata stores; the sm90 layout's words gather four
codes from two rows and two words each, a few shuffles per program (``python -m benchmarks.ptx``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import autotune_configs, check_tensor, split_entries, wide_index

LAYOUTS = ("cutlass", "cusparselt", "cusparselt_sm90")
BLOCK = 128  # cuSPARSELt's metadata blocks: R and C must be multiples of it
TILES = [{"BLOCK_R": 32, "BLOCK_C": 128}, {"BLOCK_R": 16, "BLOCK_C": 256}, {"BLOCK_R": 64, "BLOCK_C": 64}]
"""The tiles ``CONFIGS`` tries on a GPU; the tests run each."""
INTERPRETED = {"BLOCK_R": 32, "BLOCK_C": 64}
"""The interpreter's tile: the smallest CUTLASS compression, a quarter of cuSPARSELt's smallest (a
smaller one only multiplies the programs the interpreter runs, at about 20 ms each)."""
CONFIGS = autotune_configs(TILES, [(4, 1), (8, 1)], ("BLOCK_C",), INTERPRETED)


@triton.jit
def _pick(i, e0, e1, e2, e3):
    """Entry ``i`` (0..3) of each group."""
    return tl.where(i == 0, e0, tl.where(i == 1, e1, tl.where(i == 2, e2, e3)))


@triton.jit
def quads(x, BLOCK_R: tl.constexpr, GROUPS: tl.constexpr):
    """The four entries of each aligned group of four along the last dim of ``x``."""
    return split_entries(tl.reshape(x, [BLOCK_R, GROUPS, 4]), 4)


@triton.jit
def _store_words(meta_ptr, code, r, group0, R, C, LAYOUT: tl.constexpr, GROUPS: tl.constexpr, WIDE: tl.constexpr):
    """The codes ``code`` (``[len(r), GROUPS]``), four groups to a word (the first in the low bits),
    in CUTLASS's layout (``LAYOUT`` 0) or PyTorch's sm8x one for cuSPARSELt (1): 32x32 tiles of
    64 words, swizzled as PyTorch's ``_calculate_meta_reordering_scatter_offsets``."""
    c0, c1, c2, c3 = quads(code, code.shape[0], GROUPS // 4)
    word = (c0 | (c1 << 4) | (c2 << 8) | (c3 << 12)).to(tl.int16)
    j = group0 // 4 + tl.arange(0, GROUPS // 4)[None, :]
    if WIDE:
        j = j.to(tl.int64)
    # inside 32 rows: row r goes to 4·(r % 8) + (r % 32) // 8; then 2x2 swaps between row and column pairs
    swizzled = (r % 8) * 4 + (r % 32) // 8
    top_right = ((swizzled % 2) == 0) & ((j % 2) == 1)
    bottom_left = ((swizzled % 2) == 1) & ((j % 2) == 0)
    shift = top_right.to(r.dtype) - bottom_left.to(r.dtype)
    in_tile = (swizzled + shift) * 2 + (j % 2) - shift  # 64 words: 32 rows x 2 words
    if LAYOUT == 1:
        offset = (r // 128) * 512 + (j // 4) * 512 * (R // 128) + ((r % 128) // 32) * 64 + ((j % 4) // 2) * 256
    else:
        offset = (j // 2) * R * 2 + (r // 32) * 64
    tl.store(meta_ptr + offset + in_tile, word, mask=(r < R) & (j < C // 16))


@triton.jit
def _store_sm90(meta_ptr, code, rows, group0, R, C, GROUPS: tl.constexpr):
    """The codes ``code`` (``[len(rows), GROUPS]``) in cuSPARSELt's sm90 layout: per 16 rows and 32
    columns, 32 words in a row; word ``4 i + k`` holds the codes of group ``k`` and ``4 + k`` of
    rows ``i`` and ``i + 8``, in nibbles ``[row i, group k; row i + 8, group k; row i, group 4 + k;
    row i + 8, group 4 + k]``. ``rows`` starts at a multiple of 16, ``group0`` of 8."""
    c = tl.reshape(code, [code.shape[0] // 16, 2, 8, GROUPS // 8, 2, 4])
    h = tl.arange(0, 2)[None, :, None, None, None, None]
    jj = tl.arange(0, 2)[None, None, None, None, :, None]
    word = tl.sum(tl.sum(c << (4 * (h + 2 * jj)), axis=4), axis=1)  # disjoint nibbles: the sum is an OR
    row16 = tl.min(rows, axis=0) + 16 * tl.arange(0, code.shape[0] // 16).to(rows.dtype)
    strip = group0 // 8 + tl.arange(0, GROUPS // 8).to(rows.dtype)
    base = (row16 // 64) * 4 * C + ((row16 % 64) // 16) * 32
    offset = (
        base[:, None, None, None] + strip[None, None, :, None] * 128
        + 4 * tl.arange(0, 8)[None, :, None, None] + tl.arange(0, 4)[None, None, None, :]
    )  # fmt: skip
    inside = (row16 < R)[:, None, None, None] & (strip * 32 < C)[None, None, :, None]
    tl.store(meta_ptr + offset, word.to(tl.int16), mask=inside)


@triton.jit
def store_groups(
    values_ptr, meta_ptr, e0, e1, e2, e3, rows, group0, R, C,
    LAYOUT: tl.constexpr, GROUPS: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    """Compress the groups ``group0 .. group0 + GROUPS`` of the rows ``rows`` of a 2:4 operand
    ``[R, C]``, given as their four entries ``e0..e3`` (``[len(rows), GROUPS]`` tiles): the kept pair
    of each group into ``values[r, 2g:2g+2]``, their codes, four groups to a 16-bit word, into
    ``meta`` where the layout (``LAYOUTS.index``) puts them. ``group0`` is a multiple of 4 (whole
    words); for ``cusparselt_sm90`` a multiple of 8, with ``rows`` whole 16-row runs."""
    m0, m1, m3 = e0 != 0, e1 != 0, e3 != 0
    # sparse_semi_structured_from_dense_cutlass's encoding, minimised for the <2 and >2 cases
    both, second_only, neither = m0 & m1, ~m0 & m1, ~m0 & ~m1
    idx0 = second_only.to(tl.int32) | (neither.to(tl.int32) << 1)
    idx1 = (both | neither | m3).to(tl.int32) | ((second_only | ~m1).to(tl.int32) << 1)

    half = 2 * group0 + tl.arange(0, 2 * GROUPS)
    if WIDE:
        half = half.to(tl.int64)
    kept = tl.reshape(tl.join(_pick(idx0, e0, e1, e2, e3), _pick(idx1, e0, e1, e2, e3)), [e0.shape[0], 2 * GROUPS])
    r = rows[:, None]
    tl.store(values_ptr + r * (C // 2) + half[None, :], kept, mask=(r < R) & (half[None, :] < C // 2))

    if LAYOUT == 2:
        _store_sm90(meta_ptr, idx0 | (idx1 << 2), rows, group0, R, C, GROUPS)
    else:
        _store_words(meta_ptr, idx0 | (idx1 << 2), r, group0, R, C, LAYOUT, GROUPS, WIDE)


@triton.autotune(configs=CONFIGS, key=["R", "C", "LAYOUT"])
@triton.jit
def compress24_kernel(
    a_ptr, values_ptr, meta_ptr, R, C, stride_ar, stride_ac,
    LAYOUT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    """``a``'s tile of ``BLOCK_R`` rows and ``BLOCK_C`` columns compressed (``store_groups``);
    ``WIDE``: int64 offsets."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if WIDE:
        rows, cols = rows.to(tl.int64), cols.to(tl.int64)
    inside = (rows[:, None] < R) & (cols[None, :] < C)
    x = tl.load(a_ptr + rows[:, None] * stride_ar + cols[None, :] * stride_ac, mask=inside, other=0.0)
    e0, e1, e2, e3 = quads(x, BLOCK_R, BLOCK_C // 4)
    store_groups(values_ptr, meta_ptr, e0, e1, e2, e3, rows, tl.program_id(1) * (BLOCK_C // 4), R, C,
                 LAYOUT, BLOCK_C // 4, WIDE)  # fmt: skip


def compressed_numel(rows: int, cols: int) -> int:
    """Elements of ``A``'s dtype that its values and metadata take (a cuSPARSELt buffer's least size)."""
    return rows * cols // 2 + rows * cols // 16


def outputs(
    rows: int, cols: int, dtype: torch.dtype, device: torch.device, layout: str, numel: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor | None]]:
    """The values and metadata tensors a ``[rows, cols]`` compression in ``layout`` writes, and what
    it returns: CUTLASS's ``(values, meta)``, or cuSPARSELt's one buffer and ``None``: ``[R, S]`` with
    ``S`` the fewest columns that hold ``numel`` elements (zeros past the metadata), the 2-D shape
    ``torch._cslt_compress`` returns and ``torch._cslt_sparse_mm`` asserts. Checks the layout, dtype and shape."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"2:4 compression takes fp16 or bf16, got {dtype}")
    multiple = (32, 64) if layout == "cutlass" else (BLOCK, BLOCK)
    if rows % multiple[0] or cols % multiple[1]:
        raise ValueError(f"a {layout} compression needs [R, C] multiples of {multiple}, got {(rows, cols)}")
    if layout == "cutlass":
        values = torch.empty(rows, cols // 2, dtype=dtype, device=device)
        meta = torch.empty(rows, cols // 16, dtype=torch.int16, device=device)
        return values, meta, (values, meta)
    need = compressed_numel(rows, cols)
    numel = need if numel is None else numel
    if numel < need:
        raise ValueError(f"numel={numel} cannot hold {need} elements of values and metadata")
    buffer = torch.empty(rows, -(-numel // rows), dtype=dtype, device=device)  # [R, S], as the library's
    flat = buffer.view(-1)
    flat[need:].zero_()
    values, meta = flat[: rows * cols // 2].view(rows, cols // 2), flat[rows * cols // 2 : need].view(torch.int16)
    return values, meta, (buffer, None)


def compress24(a: torch.Tensor, layout: str, *, numel: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``a`` ``[R, C]`` (2:4 along ``C``, fp16/bf16) compressed in ``layout``: CUTLASS's
    ``(values [R, C/2], meta int16 [R, C/16])`` (``R`` a multiple of 32, ``C`` of 64), or
    cuSPARSELt's one buffer ``[R, S]`` and ``None`` (``R``, ``C`` multiples of 128), holding at least
    ``numel`` elements (at least ``compressed_numel``; zeros past the metadata)."""
    check_tensor("a", a, 2, (torch.float16, torch.bfloat16))
    R, C = a.shape
    values, meta, result = outputs(R, C, a.dtype, a.device, layout, numel)

    def grid(meta_: dict) -> tuple[int, int]:
        return triton.cdiv(R, meta_["BLOCK_R"]), triton.cdiv(C, meta_["BLOCK_C"])

    compress24_kernel[grid](
        a, values, meta, R, C, *a.stride(), LAYOUT=LAYOUTS.index(layout), WIDE=wide_index(a, values)
    )
    return result
