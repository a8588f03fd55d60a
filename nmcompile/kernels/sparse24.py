"""2:4 sparse-tensor-core GEMM ``A @ B`` for an ``A`` that is 2:4 along its last dim (zeros in place),
on PyTorch's semi-structured support: cuSPARSELt (``torch._cslt_sparse_mm``) where the build has
it, else CUTLASS (``torch._sparse_semi_structured_mm``, sm8x only). fp16/bf16 on sm80+ (Ampere,
Hopper). The Triton kernel ``compress24`` compresses ``A`` in one pass: in CUTLASS's layout, and
for cuSPARSELt, for shapes that are multiples of 128, in whichever of its two cuSPARSELt layouts
(PyTorch's sm8x one, torchao's sm90 one) a check on the GPU at hand finds equal to
``torch._cslt_compress``'s (which compresses everything else). The masked-operand and MVUE
kernels write their operands compressed themselves where ``triton_layout`` allows (``kernels.ops``).

Both libraries want ``A`` and ``B`` padded to tile multiples; zero rows and columns keep ``A`` 2:4,
so the pads change nothing and are cut from the result. ``compress`` and ``compressed_mm`` split
the work so that a benchmark can time the GEMM alone. Any N:M pattern with at most two kept
entries in every aligned group of four is 2:4 (``fits_24``): 1:2, 2:4, 1:4, 2:8, 1:3, 2:12, ...
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.nn.functional as F

DTYPES = (torch.float16, torch.bfloat16)
_PAD_ROWS, _PAD_COLS, _PAD_N = 32, 64, 16  # A's rows and cols, B's cols: multiples both libraries take


def fits_24(n: int, m: int) -> bool:
    """Whether every N:M mask is also 2:4 along the same dim (at most 2 kept per aligned 4): 1:m
    (an aligned 4 meets at most two groups), and 2:m where groups hold whole aligned 4s (m = 4k)."""
    return m >= 2 and (n == 1 or (n == 2 and m % 4 == 0))


def blocker(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why a GEMM on ``device`` in ``dtype`` cannot run on 2:4 tensor cores, or ``None``."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return "not on CUDA (2:4 tensor cores need sm80+)"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"sm{major}{minor} has no 2:4 sparse tensor cores (sm80+)"
    if major != 8 and not torch.backends.cusparselt.is_available():
        return f"sm{major}{minor} and no cuSPARSELt in this torch build (its CUTLASS 2:4 GEMM runs on sm8x only)"
    if dtype not in DTYPES:
        return f"compute dtype {dtype} (2:4 tensor cores take fp16, bf16: use them or autocast)"
    return None


def _pad(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``t`` zero-padded at the end to multiples of ``rows`` and ``cols``."""
    pad_rows, pad_cols = -t.shape[0] % rows, -t.shape[1] % cols
    return F.pad(t, (0, pad_cols, 0, pad_rows)) if pad_rows or pad_cols else t


def dense_operand(b: torch.Tensor) -> torch.Tensor:
    """``b`` where both libraries read it as it is: row-major or column-major (the transpose of a
    contiguous tensor, as ``x.t()``) and 16-byte aligned; anything else is copied to a fresh tensor."""
    readable = b.is_contiguous() or b.t().is_contiguous()
    return b if readable and b.data_ptr() % 16 == 0 else b.clone(memory_format=torch.contiguous_format)


@dataclasses.dataclass(frozen=True)
class Compressed:
    """A 2:4 operand ``[rows, cols]`` compressed, padded to the tiles, for the library that multiplies it:
    cuSPARSELt (values and metadata in ``packed``) or CUTLASS (``meta`` apart)."""

    rows: int
    cols: int
    dtype: torch.dtype
    packed: torch.Tensor
    meta: torch.Tensor | None


def _check(rows: int, cols: int, dtype: torch.dtype, b: torch.Tensor, bias: torch.Tensor | None) -> None:
    """The dense operand and bias checks of both entry points, for a sparse ``[rows, cols]`` in ``dtype``."""
    if b.dim() != 2 or b.shape[0] != cols:
        raise ValueError(f"semi_structured_mm: shapes ({rows}, {cols}) @ {tuple(b.shape)} do not chain")
    if b.dtype != dtype or dtype not in DTYPES:
        raise ValueError(f"semi_structured_mm takes fp16 or bf16 operands of one dtype, got {dtype}, {b.dtype}")
    if bias is not None and bias.shape != (rows,):
        raise ValueError(f"semi_structured_mm: bias {tuple(bias.shape)} is not [{rows}] (one per row of a)")


def compress(a: torch.Tensor) -> Compressed:
    """``a`` ``[R, C]``, 2:4 along ``C``, fp16/bf16 on an sm80+ GPU, compressed for ``compressed_mm``."""
    if a.dim() != 2 or a.dtype not in DTYPES:
        raise ValueError(f"compress takes a 2-D fp16 or bf16 operand, got {a.dim()}-D {a.dtype}")
    why = blocker(a.device, a.dtype)
    if why is not None:
        raise ValueError(f"semi_structured_mm: {why}")
    padded = _pad(a.contiguous(), _PAD_ROWS, _PAD_COLS)
    layout = triton_layout(*padded.shape, padded.dtype, padded.device)
    if layout is None:  # no cuSPARSELt layout checked here (padded shapes always fit CUTLASS's)
        return Compressed(*a.shape, a.dtype, torch._cslt_compress(padded), None)
    from nmcompile.kernels.compress24 import compress24

    return Compressed(*a.shape, a.dtype, *compress24(padded, layout[0], numel=layout[1]))


def triton_layout(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> tuple[str, int | None] | None:
    """The layout (and, for cuSPARSELt, the buffer size) in which the Triton kernels write a
    ``[rows, cols]`` 2:4 operand for this machine's library, or ``None`` where they cannot and
    ``torch._cslt_compress`` compresses it: CUTLASS's for multiples of 32 and 64 where there is no
    cuSPARSELt; with cuSPARSELt, the one ``checked_layout`` finds."""
    if not torch.backends.cusparselt.is_available():
        return None if rows % 32 or cols % 64 else ("cutlass", None)
    return checked_layout(rows, cols, dtype, device)


_CHECKED: dict[tuple, tuple[str, int] | None] = {}
"""``checked_layout``'s answer per operand shape, dtype and device: one check each in a process."""


def checked_layout(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> tuple[str, int] | None:
    """The cuSPARSELt layout in which ``compress24`` writes a ``[rows, cols]`` operand for the library
    here, and the library's buffer size, or ``None`` where ``torch._cslt_compress`` must do it: off
    CUDA, shapes that are not multiples of 128, and where the layout check (``_layout_check``) fails."""
    if device.type != "cuda" or rows % 128 or cols % 128:
        return None
    return _check_once(rows, cols, dtype, device)


def _check_once(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> tuple[str, int] | None:
    """``_layout_check``'s answer, checked once per shape, dtype and device in a process. The first
    shape that fails on a device warns, saying why; later ones there stay quiet, since a library that
    reads none of the layouts at one shape is the same library at the next (``_CHECKED`` has them all)."""
    key = (rows, cols, dtype, device)
    if key not in _CHECKED:
        found, why = _layout_check(rows, cols, dtype, device)
        if found is None and not any(k[3] == device and v is None for k, v in _CHECKED.items()):
            warnings.warn(
                f"nmcompile: no layout of the Triton 2:4 compression matches torch._cslt_compress for [{rows}, "
                f"{cols}] {dtype} on {device} ({why}); that shape, and any other that fails this check on "
                f"{device} (not warned again), is compressed by torch._cslt_compress (slower)",
                RuntimeWarning,
                stacklevel=3,
            )
        _CHECKED[key] = found
    return _CHECKED[key]


_PAIRS = ((1, 1, 0, 0), (1, 0, 1, 0), (1, 0, 0, 1), (0, 1, 1, 0), (0, 1, 0, 1), (0, 0, 1, 1))  # 2 of 4


def random_24(rows: int, cols: int, dtype: torch.dtype, device: torch.device | str, seed: int = 0) -> torch.Tensor:
    """Exactly two nonzeros, of magnitude 0.5 to 1.5, at random places in every aligned group of four
    along the rows: the layout check's probe (``cols`` a multiple of 4). About 6 bytes of scratch
    per entry, so the probe of an FFN weight stays well under a GiB."""
    generator = torch.Generator(device).manual_seed(seed)
    pair = torch.randint(0, len(_PAIRS), (rows, cols // 4), generator=generator, device=device, dtype=torch.uint8)
    mask = torch.tensor(_PAIRS, dtype=torch.bool, device=device)[pair.int()].view(rows, cols)
    values = torch.rand(rows, cols, generator=generator, device=device, dtype=dtype).add_(0.5)
    negative = torch.rand(rows, cols, generator=generator, device=device, dtype=dtype) < 0.5
    return torch.where(negative, -values, values).masked_fill_(~mask, 0)


CUSPARSELT_LAYOUTS = {"cusparselt": "PyTorch's sm8x one", "cusparselt_sm90": "torchao's sm90 one"}
"""``compress24``'s cuSPARSELt layouts, as the warning of a failed check names them. Neither is
documented: PyTorch's ``_sparse_semi_structured_tile`` writes the first (its authors test it on
sm8x), torchao's ``sparse24_sm90_sparsify`` the second (for 16-bit operands)."""


def _candidates(device: torch.device) -> tuple[str, ...]:
    """The cuSPARSELt layouts to check, the likelier first: sm90's on a compute capability 9 GPU."""
    sm90 = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
    return ("cusparselt_sm90", "cusparselt") if sm90 else ("cusparselt", "cusparselt_sm90")


def _layout_check(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> tuple[tuple[str, int] | None, str]:
    """``compress24``'s cuSPARSELt layouts checked against the library's own, the likelier first: a
    random 2:4 ``[rows, cols]`` compressed both ways gives the same product with algorithm 0.
    Returns the first layout that does and the buffer's size, or ``None``; and why each layout
    tried before it failed ("" if none did)."""
    from nmcompile.kernels.compress24 import compress24

    probe = random_24(rows, cols, dtype, device)
    b = torch.randn(cols, 64, generator=torch.Generator(device).manual_seed(1), device=device).to(dtype)
    theirs = torch._cslt_compress(probe)
    expected = torch._cslt_sparse_mm(theirs, b)
    details = []
    for layout in _candidates(device):
        try:
            ours = compress24(probe, layout, numel=theirs.numel())[0]
            if torch.equal(torch._cslt_sparse_mm(ours, b), expected):
                return (layout, theirs.numel()), "; ".join(details)
            details.append(f"{CUSPARSELT_LAYOUTS[layout]}: they multiply differently")
        except (RuntimeError, ValueError) as exc:
            details.append(f"{CUSPARSELT_LAYOUTS[layout]}: {type(exc).__name__}: {exc}")
    return None, "; ".join(details)


def _dense_operands(
    a: Compressed, b: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``b`` and ``bias`` checked against ``a`` and padded to the tiles, as both libraries take them."""
    _check(a.rows, a.cols, a.dtype, b, bias)
    b_pad = _pad(dense_operand(b), _PAD_COLS, _PAD_N)
    if bias is not None:
        bias = F.pad(bias.to(a.dtype), (0, -a.rows % _PAD_ROWS)).contiguous()
    return b_pad, bias


def compressed_mm(
    a: Compressed,
    b: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    transpose_result: bool = False,
    alg_id: int = 0,
) -> torch.Tensor:
    """``a @ b (+ bias[:, None])`` on 2:4 sparse tensor cores, ``b`` ``[C, N]`` dense, ``bias`` ``[R]``:
    ``[R, N]`` in ``a``'s dtype, or with ``transpose_result`` its transpose ``[N, R]``, contiguous.
    cuSPARSELt writes that transpose and adds the bias in its epilogue: a linear layer's ``[T, O]``
    output costs no copy. ``alg_id`` picks cuSPARSELt's algorithm (``search_alg``); CUTLASS has one."""
    b_pad, bias = _dense_operands(a, b, bias)
    n = b.shape[1]
    if a.meta is None:
        out = torch._cslt_sparse_mm(a.packed, b_pad, bias=bias, transpose_result=transpose_result, alg_id=alg_id)
    else:
        if alg_id:
            raise ValueError(f"compressed_mm: alg_id={alg_id}, but CUTLASS (no cuSPARSELt) has only algorithm 0")
        if bias is None:
            out = torch._sparse_semi_structured_mm(a.packed, a.meta, b_pad)
        else:
            out = torch._sparse_semi_structured_addmm(bias, a.packed, a.meta, b_pad)
        out = out.t() if transpose_result else out
    return out[:n, : a.rows].contiguous() if transpose_result else out[: a.rows, :n]


def search_alg(
    a: Compressed, b: torch.Tensor, *, bias: torch.Tensor | None = None, transpose_result: bool = False
) -> int:
    """The ``alg_id`` of cuSPARSELt's fastest algorithm for ``compressed_mm(a, b, ...)``, which its
    search (``library_search``) finds by timing each on these operands; 0 under CUTLASS, and 0
    unsearched where the search is known to fail (``search_fails``)."""
    b_pad, bias = _dense_operands(a, b, bias)
    if a.meta is not None or search_fails(a.dtype, transpose_result):
        return 0
    return library_search(a.packed, b_pad, bias, transpose_result)


def library_search(packed: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, transpose_result: bool) -> int:
    """cuSPARSELt's search for ``torch._cslt_sparse_mm(packed, b, bias=bias, transpose_result=...)``:
    the fastest algorithm's id. Through ``torch._C._cusparselt.mm_search`` where the build has it
    (positional arguments; it returns the id first, then its split-K settings, which the GEMMs here
    leave at their defaults), else the ``torch._cslt_sparse_mm_search`` it deprecates (torch 2.11
    warns on each process's first call)."""
    mm_search = getattr(getattr(torch._C, "_cusparselt", None), "mm_search", None)
    if mm_search is None:
        return int(torch._cslt_sparse_mm_search(packed, b, bias=bias, transpose_result=transpose_result))
    return int(mm_search(packed, b, bias, None, None, transpose_result)[0])


_FASTEST: dict[tuple, int] = {}
"""``search_alg``'s answer per GEMM problem, as Triton's autotuner keeps its timings: one search per
shape and layout in a process. On an H200 cuSPARSELt's algorithm 0 ran the FFN's 2:4 GEMMs no faster
than dense (1.01x); the fastest one 1.5x faster (docs/benchmarks.md)."""


def search_fails(dtype: torch.dtype, transpose_result: bool) -> bool:
    """Whether cuSPARSELt's search is known to fail on this problem: fp16 with a transposed result.
    On an H200 (torch 2.11.0+cu130, 2026-12-04, ``python -m benchmarks.cslt_probe``) every such
    search raised an internal error, at every shape, ``b`` layout and bias tried, and a later call
    then met an illegal instruction that ended the process's CUDA context; algorithm 0 and bf16
    searches all ran right. The 2:4 forward and input gradient multiply with a transposed result."""
    return dtype == torch.float16 and transpose_result


def fastest_alg(
    a: Compressed, b: torch.Tensor, *, bias: torch.Tensor | None = None, transpose_result: bool = False
) -> int:
    """``search_alg`` for this problem (library, shapes, dtype, ``b``'s layout, bias, result layout),
    searched once; 0, unsearched, under ``torch.use_deterministic_algorithms``: cuSPARSELt's
    algorithms split and order the sums differently, and a search by timing can pick another in the
    next process."""
    if torch.are_deterministic_algorithms_enabled():
        return 0
    key = (
        a.meta is None, a.rows, a.cols, b.shape[1], a.dtype, b.is_contiguous(), bias is not None, transpose_result,
        b.device,
    )  # fmt: skip
    if key not in _FASTEST:
        _FASTEST[key] = search_alg(a, b, bias=bias, transpose_result=transpose_result)
    return _FASTEST[key]


def semi_structured_mm(
    a: torch.Tensor, b: torch.Tensor, *, bias: torch.Tensor | None = None, transpose_result: bool = False
) -> torch.Tensor:
    """``compressed_mm(compress(a), b, ...)`` on the fastest algorithm (``fastest_alg``): ``a``
    ``[R, C]`` 2:4 along ``C`` times a dense ``b``."""
    if a.dim() == 2:
        _check(*a.shape, a.dtype, b, bias)
    return fastest_mm(compress(a), b, bias=bias, transpose_result=transpose_result)


def fastest_mm(
    a: Compressed, b: torch.Tensor, *, bias: torch.Tensor | None = None, transpose_result: bool = False
) -> torch.Tensor:
    """``compressed_mm`` on the fastest algorithm (``fastest_alg``), for an operand compressed by
    ``compress`` or written compressed by a kernel."""
    alg_id = fastest_alg(a, b, bias=bias, transpose_result=transpose_result)
    return compressed_mm(a, b, bias=bias, transpose_result=transpose_result, alg_id=alg_id)
