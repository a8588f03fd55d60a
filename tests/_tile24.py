"""An independent oracle of the 2:4 metadata layouts: PyTorch's ``_sparse_semi_structured_tile``
CUDA kernel (``SparseSemiStructuredPack.h``, ``SparseSemiStructuredTile.cu``) transcribed lane by
lane, warp shuffles included, with its two metadata stores (``MetadataCutlass``,
``MetadataCuSparseLt``); and torchao's sm90 sparsify kernel for cuSPARSELt's 16-bit operands
(``sparse24_sm90_sparsify.cu``, ``MetadataCusparseLt16bits`` and ``store_metadata_reordered`` in
``warp_tensor.h``). Given the 4-bit codes of a 2:4 operand each returns the flat 16-bit metadata
buffer that kernel writes. Slow (Python loops): small shapes only."""

from __future__ import annotations

import torch

WARP_ROWS, WARP_COLS, THREAD = 32, 64, 8  # kWarpX, kWarpY, kThreadX = kThreadY
TILE32 = 32 * 32 // 16  # kStrideBlock32x32: 16-bit words of one 32x32 tile


def codes(dense: torch.Tensor) -> torch.Tensor:
    """``idx0 | idx1 << 2`` of each group of four along the last dim, as
    ``sparse_semi_structured_from_dense_cutlass`` encodes it ([R, C/4] int64)."""
    rows, cols = dense.shape
    m0, m1, _m2, m3 = (dense != 0).view(rows, cols // 4, 4).unbind(-1)
    idx0 = (~m0 & m1).long() | ((~m0 & ~m1).long() << 1)
    idx1 = ((m0 & m1) | (~m0 & ~m1) | m3).long() | (((~m0 & m1) | ~m1).long() << 1)
    return idx0 | (idx1 << 2)


def _cutlass_offset(warp_row: int, thread_row: int, warp_col: int, thread_col: int, rows: int) -> int:
    stride = 2 * rows  # metaN.stride(2) of the (C/32, R, 2).permute(1, 2, 0) view
    offset = warp_row * 2 + (warp_col // 32) * stride + 64 * (thread_row // 32) + (thread_col // 32) * stride
    return offset + ((thread_row % 32) // 16) * 4 + ((thread_col % 32) // 16) * 2


def _cusparselt_offset(warp_row: int, thread_row: int, warp_col: int, thread_col: int, rows: int) -> int:
    offset = (warp_row // 128) * (TILE32 * 8) + (warp_col // 64) * (TILE32 * 8) * (rows // 128)
    offset += (((warp_row + thread_row) % 128) // 32) * TILE32 + (((warp_col + thread_col) % 64) // 32) * (TILE32 * 4)
    return offset + (warp_row % 32) * 2 + ((thread_row % 32) // 16) * 4 + ((thread_col % 32) // 16) * 2


def _byte(value: int, index: int) -> int:
    return (value >> (8 * index)) & 0xFF


def _shuffled_words(meta: dict[tuple[int, int], int]) -> dict[tuple[int, int], int]:
    """``warp_shuffle_meta`` (not transposed) for every lane ``(tx, ty)`` of a warp, from each
    lane's ``meta_ab`` (or ``meta_cd``); ``__shfl_xor_sync`` by 4 is the lane ``ty ^ 1``, by 1 ``tx ^ 1``."""
    lines = {}
    for (tx, ty), value in meta.items():
        left = int(ty % 2 == 0)
        other = meta[(tx, ty ^ 1)]
        other_left = 1 - left
        line0 = (_byte(value, 1 - left) << ((1 - left) * 8)) | (_byte(other, other_left) << (left * 8))
        line1 = (_byte(value, 3 - left) << ((1 - left) * 8)) | (_byte(other, other_left + 2) << (left * 8))
        lines[(tx, ty)] = (line0, line1)
    words = {}
    for (tx, ty), (line0, line1) in lines.items():
        bottom = tx % 2
        partner0, partner1 = lines[(tx ^ 1, ty)]
        received = partner0 if (tx ^ 1) % 2 else partner1  # the partner sends line0 if it is a bottom lane
        words[(tx, ty)] = (received | (line1 << 16)) if bottom else ((received << 16) | line0)
    return words


def tile_kernel_meta(code: torch.Tensor, layout: str) -> torch.Tensor:
    """The flat int64 buffer of 16-bit metadata words that PyTorch's tile kernel writes for the
    codes ``code`` ``[R, C/4]`` with ``MetadataCutlass`` (``layout="cutlass"``) or ``MetadataCuSparseLt``."""
    rows, cols = code.shape[0], code.shape[1] * 4
    offset_of = _cutlass_offset if layout == "cutlass" else _cusparselt_offset
    out = torch.full((rows * cols // 16,), -1, dtype=torch.int64)
    code = code.tolist()
    for bx in range(rows // WARP_ROWS):
        for by in range(cols // WARP_COLS):
            for half in (0, 1):  # meta_ab: rows 0-3 of each lane's 8x8 tile; meta_cd: rows 4-7
                meta = {}
                for tx in range(WARP_ROWS // THREAD):
                    for ty in range(WARP_COLS // THREAD):
                        x, y = bx * WARP_ROWS + tx * THREAD + 4 * half, by * WARP_COLS + ty * THREAD
                        meta[(tx, ty)] = sum(
                            (code[x + i][y // 4] | (code[x + i][y // 4 + 1] << 4)) << (8 * i) for i in range(4)
                        )
                for (tx, ty), word in _shuffled_words(meta).items():
                    left, bottom = int(ty % 2 == 0), tx % 2
                    base = offset_of(bx * WARP_ROWS, tx * THREAD, by * WARP_COLS, ty * THREAD, rows) + 32 * half
                    at = base + 2 * ((1 - left) + 2 * bottom) * 4  # uint32 index into 16-bit words
                    out[at], out[at + 1] = word & 0xFFFF, word >> 16
    if (out < 0).any():
        raise AssertionError("the transcription left words unwritten")
    return out


SM90_BLOCK, SM90_WARPS = 64, 2  # MetadataCusparseLt16bits: kBlockSize0 = kBlockSize1, kNumWarpsPerCTA


def sm90_kernel_meta(code: torch.Tensor) -> torch.Tensor:
    """The flat int64 buffer of 16-bit metadata words torchao's sm90 kernel writes for cuSPARSELt
    (fp16/bf16) for the codes ``code`` ``[R, C/4]``. Per 64x64 block: each 8-column byte (two codes,
    the first in the low nibble) goes through shared memory; then each warp takes 32 columns, 16
    rows at a time (``WarpTensor<uint8_t, 16, 4>``: lane ``l`` holds row ``l / 2``, bytes
    ``2 (l % 2)`` and ``+ 1``), swaps nibbles with lane ``l ^ 16`` and bytes with lane ``l ^ 1``,
    and stores 16 bits at byte ``(l % 2) 4 + ((l % 16) / 2) 8 + (l / 16) 2`` past ``idx``."""
    rows, cols = code.shape[0], code.shape[1] * 4
    out = torch.full((rows * cols // 16,), -1, dtype=torch.int64)
    code = code.tolist()

    def byte(r: int, chunk: int) -> int:  # sparsify_pack: codes of the groups 2 chunk, 2 chunk + 1
        return code[r][2 * chunk] | (code[r][2 * chunk + 1] << 4)

    for block_row in range(0, rows, SM90_BLOCK):
        for block_col in range(0, cols, SM90_BLOCK):
            for warp in range(SM90_WARPS):
                warp_col = warp * 32
                for it_row in range(0, SM90_BLOCK, 16):
                    step0 = {}
                    for lane in range(32):  # load_32bits: data[0], data[1] from shared memory
                        r = block_row + it_row + lane // 2
                        chunk = (block_col + warp_col) // 8 + 2 * (lane % 2)
                        step0[lane] = byte(r, chunk) | (byte(r, chunk + 1) << 8)
                    step1 = {}
                    for lane, mine in step0.items():
                        other = step0[lane ^ 16]
                        if lane & 16:
                            step1[lane] = (mine & 0xF0F0) | ((other >> 4) & 0x0F0F)
                        else:
                            step1[lane] = (mine & 0x0F0F) | ((other << 4) & 0xF0F0)
                    current_col, current_row = block_col + warp_col, block_row + it_row
                    idx = (current_col // 32) * 256 + (current_row % 8) * 8 + ((current_row % 64) // 16) * 64
                    idx += (current_row // 64) * 8 * cols
                    for lane, mine in step1.items():
                        other = step1[lane ^ 1]
                        if lane & 1:
                            word = (mine & 0xFF00) | ((other >> 8) & 0x00FF)
                        else:
                            word = (mine & 0x00FF) | ((other << 8) & 0xFF00)
                        at = idx + (lane % 2) * 4 + ((lane % 16) // 2) * 8 + (lane // 16) * 2  # bytes
                        out[at // 2] = word
    if (out < 0).any():
        raise AssertionError("the transcription left words unwritten")
    return out
