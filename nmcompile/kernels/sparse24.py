"""2:4 sparse-tensor-core GEMM ``A @ B`` for an ``A`` that is 2:4 along its last dim (zeros in place),
on PyTorch's semi-structured support: cuSPARSELt (``torch._cslt_compress``/``_cslt_sparse_mm``)
where the build has it, else CUTLASS (``sparse_semi_structured_from_dense_cutlass`` and
``torch._sparse_semi_structured_mm``). fp16/bf16 on sm80+ (Ampere, Hopper).

Both libraries want ``A`` and ``B`` padded to tile multiples; zero rows and columns keep ``A`` 2:4,
so the pads change nothing and are cut from the result. Any N:M pattern with at most two kept
entries in every aligned group of four is 2:4 (``fits_24``): 1:2, 2:4, 1:4, 2:8, ...
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nmcompile.options import power_of_two

DTYPES = (torch.float16, torch.bfloat16)
_PAD_ROWS, _PAD_COLS, _PAD_N = 32, 64, 16  # A's rows and cols, B's cols: multiples both libraries take


def fits_24(n: int, m: int) -> bool:
    """Whether every N:M mask is also 2:4 along the same dim (at most 2 kept per aligned 4)."""
    if not power_of_two(m) or not 1 <= n <= m:
        return False
    return n <= 1 if m == 2 else m >= 4 and n <= 2


def blocker(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why a GEMM on ``device`` in ``dtype`` cannot run on 2:4 tensor cores, or ``None``."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return "not on CUDA (2:4 tensor cores need sm80+)"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"sm{major}{minor} has no 2:4 sparse tensor cores (sm80+)"
    if dtype not in DTYPES:
        return f"compute dtype {dtype} (2:4 tensor cores take fp16, bf16: use them or autocast)"
    return None


def is_24(a: torch.Tensor) -> bool:
    """Whether ``a`` (2-D) has at most two nonzeros in every aligned group of four along its last dim."""
    cols = a.shape[-1]
    padded = F.pad(a, (0, -cols % 4)) if cols % 4 else a
    return bool(((padded != 0).reshape(a.shape[0], -1, 4).sum(-1) <= 2).all())


def _pad(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``t`` zero-padded at the end to multiples of ``rows`` and ``cols``."""
    pad_rows, pad_cols = -t.shape[0] % rows, -t.shape[1] % cols
    return F.pad(t, (0, pad_cols, 0, pad_rows)) if pad_rows or pad_cols else t


def semi_structured_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` on 2:4 sparse tensor cores: ``a`` ``[R, C]`` 2:4 along ``C`` is compressed,
    ``b`` ``[C, N]`` stays dense; result ``[R, N]`` in ``a``'s dtype."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"semi_structured_mm: shapes {tuple(a.shape)} @ {tuple(b.shape)} do not chain")
    if a.dtype != b.dtype or a.dtype not in DTYPES:
        raise ValueError(f"semi_structured_mm takes fp16 or bf16 operands of one dtype, got {a.dtype}, {b.dtype}")
    why = blocker(a.device, a.dtype)
    if why is not None:
        raise ValueError(f"semi_structured_mm: {why}")
    rows, n = a.shape[0], b.shape[1]
    a_pad = _pad(a, _PAD_ROWS, _PAD_COLS)
    b_pad = _pad(b, _PAD_COLS, _PAD_N).contiguous()
    if torch.backends.cusparselt.is_available():
        out = torch._cslt_sparse_mm(torch._cslt_compress(a_pad), b_pad)
    else:
        from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

        packed, meta = sparse_semi_structured_from_dense_cutlass(a_pad)
        out = torch._sparse_semi_structured_mm(packed, meta, b_pad)
    return out[:rows, :n]
