"""CPU mask kernels of the portable path, for fp32 weights and M=4, in C: the forward ``W ⊙ F``
(``F = nm_mask(W, n, 4, dim=K)``) and Bi-Mask's backward weight ``W ⊙ B`` from it, each in one pass;
``F`` itself, a byte per weight, for the permutation search.

Inductor's CPU code for groups along the contiguous dim is scalar (3.4 ms per million weights
measured on a 2-core AMD EPYC, torch 2.13), and its Bi-Mask weight takes three passes and an
``argsort`` (0.65-0.8 ms on a 2-core Intel Xeon); these kernels take 0.2 ms each on that Xeon's
two threads. Tiling, forward: one 32-byte vector holds two groups of 4; the rank of each lane comes
from three in-group rotations (``__builtin_shuffle``). Backward: a group is four rows ``P[4g:4g+4]``,
ranked eight columns per vector and written back to the same rows. Ties go to the lower index (of
the group, in ``P``'s order) as SPEC §2 says, NaN ranks as +inf. GCC vector extensions, not
intrinsics, so one source serves x86 and ARM; OpenMP over groups, on torch's thread count. Built on
first use with the C compiler Inductor's CPU backend needs anyway, with ``-march=native``, into
Inductor's cache directory under a key of the source, the compiler, the flags and this CPU; where
it cannot be built, ``blocker`` says why and the graphs keep the composite masks.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from nmcompile.ops import gradless_op, n_in_force

M = 4  # the group size the kernel is written for

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));
/* lane i of a group reads lane (i + k) % 4 of the same group */
static const i8 ROT1 = {1, 2, 3, 0, 5, 6, 7, 4};
static const i8 ROT2 = {2, 3, 0, 1, 6, 7, 4, 5};
static const i8 ROT3 = {3, 0, 1, 2, 7, 4, 5, 6};
/* lanes whose k-th neighbour has the lower index, so wins a tie: i >= 4 - k */
static const i8 LOW1 = {0, 0, 0, -1, 0, 0, 0, -1};
static const i8 LOW2 = {0, 0, -1, -1, 0, 0, -1, -1};
static const i8 LOW3 = {0, -1, -1, -1, 0, -1, -1, -1};
#define PARALLEL_MIN 65536 /* weights below which one thread is faster than waking the team */

static inline i8 above(f8 a, f8 b, i8 low) { return (b > a) | ((b == a) & low); }

static inline float magnitude(float v) { float a = fabsf(v); return a == a ? a : INFINITY; }

/* how many entries of a group of 4 magnitudes outrank entry i (ties to the lower index): the scalar tails' rank */
static inline int outranked(const float a[4], int i) {
  int count = 0;
  for (int j = 0; j < 4; ++j) count += j < i ? a[j] >= a[i] : (j > i && a[j] > a[i]);
  return count;
}

static inline f8 magnitudes(f8 v) {
  const i8 inf = (i8)((f8){INFINITY, INFINITY, INFINITY, INFINITY, INFINITY, INFINITY, INFINITY, INFINITY});
  f8 a = (f8)((i8)v & 0x7fffffff);
  i8 number = a == a;
  return (f8)(((i8)a & number) | (inf & ~number));
}

/* the lanes of two groups of 4 (one vector) that the forward keeps: -1 kept, 0 pruned */
static inline i8 kept_lanes(f8 v, i8 limit) {
  f8 a = magnitudes(v);
  i8 count = -(above(a, __builtin_shuffle(a, ROT1), LOW1) + above(a, __builtin_shuffle(a, ROT2), LOW2)
               + above(a, __builtin_shuffle(a, ROT3), LOW3));
  return count < limit;
}

/* forward: groups of 4 along the contiguous dim, two groups per vector */
void nm4_masked_weight_f32(const float *restrict w, float *restrict out, int64_t groups, int32_t n, int32_t threads) {
  const i8 limit = {n, n, n, n, n, n, n, n};
  const int64_t pairs = groups / 2;
  #pragma omp parallel for num_threads(threads) schedule(static) if (4 * groups >= PARALLEL_MIN)
  for (int64_t p = 0; p < pairs; ++p) {
    f8 v;
    __builtin_memcpy(&v, w + 8 * p, sizeof v);
    f8 kept = (f8)((i8)v & kept_lanes(v, limit));
    __builtin_memcpy(out + 8 * p, &kept, sizeof kept);
  }
  for (int64_t g = 2 * pairs; g < groups; ++g) {
    const float *x = w + 4 * g;
    float a[4] = {magnitude(x[0]), magnitude(x[1]), magnitude(x[2]), magnitude(x[3])};
    for (int i = 0; i < 4; ++i) out[4 * g + i] = outranked(a, i) < n ? x[i] : 0.0f;
  }
}

/* the forward mask itself, a byte (0 or 1) per weight, as torch's bool: for the permutation search */
void nm4_mask_f32(const float *restrict w, unsigned char *restrict out, int64_t groups, int32_t n, int32_t threads) {
  const i8 limit = {n, n, n, n, n, n, n, n};
  const int64_t pairs = groups / 2;
  #pragma omp parallel for num_threads(threads) schedule(static) if (4 * groups >= PARALLEL_MIN)
  for (int64_t p = 0; p < pairs; ++p) {
    f8 v;
    __builtin_memcpy(&v, w + 8 * p, sizeof v);
    i8 keep = kept_lanes(v, limit);
    for (int lane = 0; lane < 8; ++lane) out[8 * p + lane] = keep[lane] & 1;
  }
  for (int64_t g = 2 * pairs; g < groups; ++g) {
    const float *x = w + 4 * g;
    float a[4] = {magnitude(x[0]), magnitude(x[1]), magnitude(x[2]), magnitude(x[3])};
    for (int i = 0; i < 4; ++i) out[4 * g + i] = outranked(a, i) < n;
  }
}

/* Bi-Mask backward: the group of row slot j is rows perm[4g .. 4g+3], ranked column by column,
   eight columns per vector; returns -1 (nothing written) if perm is not a permutation of 0..rows-1 */
int32_t nm4_bimask_rows_f32(const float *restrict w, const int64_t *restrict perm, float *restrict out,
                            int64_t rows, int64_t cols, int32_t n, int32_t threads) {
  unsigned char *seen = calloc(rows ? rows : 1, 1);
  if (!seen) return -2;
  for (int64_t i = 0; i < rows; ++i) {
    int64_t r = perm[i];
    if (r < 0 || r >= rows || seen[r]) { free(seen); return -1; }
    seen[r] = 1;
  }
  free(seen);
  const i8 limit = {n, n, n, n, n, n, n, n};
  #pragma omp parallel for num_threads(threads) schedule(static) if (rows * cols >= PARALLEL_MIN)
  for (int64_t g = 0; g < rows / 4; ++g) {
    const float *src[4];
    float *dst[4];
    for (int j = 0; j < 4; ++j) { src[j] = w + perm[4 * g + j] * cols; dst[j] = out + perm[4 * g + j] * cols; }
    int64_t k = 0;
    for (; k + 8 <= cols; k += 8) {
      f8 v[4], a[4];
      /* unrolled, so v and a live in registers: GCC 12 left the j loop rolled and the arrays on the
         stack, and a 32-byte reload of two 16-byte stores (its split unaligned loads) stalls: 4x slower */
      #pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) { __builtin_memcpy(&v[j], src[j] + k, sizeof(f8)); a[j] = magnitudes(v[j]); }
      #pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        i8 count = {0};
        #pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) if (i != j) count -= i < j ? a[i] >= a[j] : a[i] > a[j];
        f8 kept = (f8)((i8)v[j] & (count < limit));
        __builtin_memcpy(dst[j] + k, &kept, sizeof kept);
      }
    }
    for (; k < cols; ++k) {
      float a[4] = {magnitude(src[0][k]), magnitude(src[1][k]), magnitude(src[2][k]), magnitude(src[3][k])};
      for (int j = 0; j < 4; ++j) dst[j][k] = outranked(a, j) < n ? src[j][k] : 0.0f;
    }
  }
  return 0;
}
"""

_FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-Wno-psabi")


def _compiler() -> str | None:
    """The C compiler: ``$CC``, else ``cc`` or ``gcc`` on ``PATH``. A ``$CC`` that names no
    executable (a wrong path, or a command with arguments as ``ccache gcc``) is not used, with a
    warning: the build would otherwise take another compiler without a word."""
    wanted = os.environ.get("CC", "")
    found = shutil.which(wanted) if wanted else None
    if wanted and found is None:
        warnings.warn(
            f"nmsparse: $CC={wanted!r} is not an executable (a command with arguments is not taken); "
            "the C mask kernels build with cc or gcc from PATH",
            stacklevel=2,
        )
    return found or shutil.which("cc") or shutil.which("gcc")


def _cpu_key() -> str:
    """What ``-march=native`` depends on: the CPU model and feature flags (Linux), else the platform."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        info = []
    wanted = ("model name", "flags", "Features", "CPU part")
    lines = {line.split(":")[0].strip(): line for line in info if line.split(":")[0].strip() in wanted}
    return platform.machine() + "".join(sorted(lines.values()))


def _cache_dir() -> Path:
    """``nmcompile/`` in Inductor's cache directory (``TORCHINDUCTOR_CACHE_DIR`` moves it)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "nmcompile"


def _build(compiler: str, flags: tuple[str, ...]) -> ctypes.CDLL | str:
    """The kernel library built with ``flags``, cached on disk under a key of all the build reads; or why not."""
    key = hashlib.sha256("\0".join((_SOURCE, compiler, *flags, _cpu_key())).encode()).hexdigest()[:20]
    path = _cache_dir() / f"nm4_mask_{key}.so"
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                source, built = Path(tmp) / "nm4_mask.c", Path(tmp) / path.name
                source.write_text(_SOURCE)
                done = subprocess.run([compiler, *flags, str(source), "-o", str(built)], capture_output=True, text=True)
                if done.returncode:
                    return f"the C mask kernel did not build: {done.stderr.strip()[:300]}"
                os.replace(built, path)  # atomic: a concurrent build of the same key writes the same file
        return ctypes.CDLL(str(path))
    except OSError as exc:  # a read-only cache directory, a noexec mount, an OpenMP runtime that does not load, ...
        return f"the C mask kernel could not be built or loaded: {exc}"


@functools.cache
def _library() -> ctypes.CDLL | str:
    """The built kernel library, or why it could not be built (tried once per process): with OpenMP,
    which resolves to the runtime torch has loaded (one thread team for torch and these kernels),
    else single-threaded."""
    compiler = _compiler()
    if compiler is None:
        return "no C compiler found ($CC, cc or gcc)"
    library = _build(compiler, (*_FLAGS, "-fopenmp"))
    if isinstance(library, str):
        library = _build(compiler, _FLAGS)
        if isinstance(library, str):
            return library
    pointer, int64, int32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    for forward in (library.nm4_masked_weight_f32, library.nm4_mask_f32):
        forward.argtypes = (pointer, pointer, int64, int32, int32)
        forward.restype = None
    library.nm4_bimask_rows_f32.argtypes = (pointer, pointer, pointer, int64, int64, int32, int32)
    library.nm4_bimask_rows_f32.restype = ctypes.c_int32
    return library


def blocker(weight: torch.Tensor, m: int) -> str | None:
    """Why the kernels cannot compute ``weight``'s masks (forward, or Bi-Mask backward from its
    ``W ⊙ F``), or ``None`` when they can."""
    if weight.device.type != "cpu":
        return f"weight on {weight.device.type}"
    if weight.dtype != torch.float32:
        return f"weight dtype {weight.dtype} (the C kernel takes fp32)"
    if m != M:
        return f"m={m} (the C kernel is written for m=4)"
    return _build_error()


@torch.compiler.assume_constant_result
def _build_error() -> str | None:
    """Why the library is not there, or ``None``: a constant to Dynamo, so that code it traces (a
    ``torch.compile``d caller of ``ops.input_grad_weight``) asks without a graph break."""
    library = _library()
    return library if isinstance(library, str) else None


def _checked_library(weight: torch.Tensor, n: int) -> ctypes.CDLL:
    """The library, after the checks both launchers share."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        raise ValueError(f"weight must be fp32 on the CPU, got {weight.dtype} on {weight.device}")
    if not 1 <= n <= M:
        raise ValueError(f"n must be in 1..{M}, got {n}")
    library = _library()
    if isinstance(library, str):
        raise RuntimeError(library)
    return library


def _forward_kernel(weight: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The forward kernel on ``weight``: ``W ⊙ F`` (``dtype`` fp32) or the mask ``F`` (``dtype`` bool)."""
    if weight.dim() == 0 or weight.shape[-1] % M:
        raise ValueError(f"the last dim of weight must be divisible by {M}, got shape {tuple(weight.shape)}")
    library = _checked_library(weight, n)
    weight = weight.detach().contiguous()
    out = torch.empty_like(weight, dtype=dtype, memory_format=torch.contiguous_format)  # the fake's strides
    kernel = library.nm4_mask_f32 if dtype == torch.bool else library.nm4_masked_weight_f32
    kernel(weight.data_ptr(), out.data_ptr(), weight.numel() // M, n, torch.get_num_threads())
    return out


def nm4_masked_weight(weight: torch.Tensor, n: int) -> torch.Tensor:
    """``W ⊙ nm_mask(W, n, 4, dim=-1)``: the kept entries as they are, the pruned ones ``+0.0``."""
    return _forward_kernel(weight, n, torch.float32)


def nm4_mask(weight: torch.Tensor, n: int) -> torch.Tensor:
    """``nm_mask(W, n, 4, dim=-1)``, the bool mask itself, for the permutation search."""
    return _forward_kernel(weight, n, torch.bool)


def nm4_bimask_weight(masked: torch.Tensor, perm: torch.Tensor, n: int) -> torch.Tensor:
    """Bi-Mask's input-gradient weight ``W ⊙ B`` from ``masked`` = ``W ⊙ F`` (SPEC §4): in each group
    of rows ``P[4g:4g+4]``, at every column (every ``(c, *k)`` of a conv weight), the ``n`` largest
    ``|W ⊙ F|`` kept, the rest ``+0.0``; in the original row order, as
    ``where(nm_mask((W⊙F)[P], n, 4, dim=0), (W⊙F)[P], 0)[P⁻¹]``, without building the permuted copy."""
    if masked.dim() < 2 or masked.shape[0] % M:
        raise ValueError(f"masked must be [O, ...] with O divisible by {M}, got shape {tuple(masked.shape)}")
    if perm.dtype != torch.int64 or perm.shape != masked.shape[:1] or perm.device.type != "cpu":
        raise ValueError(f"perm must be int64 [{masked.shape[0]}] on the CPU, got {perm.dtype} {tuple(perm.shape)}")
    library = _checked_library(masked, n)
    masked, perm = masked.detach().contiguous(), perm.contiguous()
    out = torch.empty_like(masked, memory_format=torch.contiguous_format)  # the fake's strides, also on dims of size 1
    rows = masked.shape[0]
    cols = masked.numel() // rows if rows else 0
    status = library.nm4_bimask_rows_f32(
        masked.data_ptr(), perm.data_ptr(), out.data_ptr(), rows, cols, n, torch.get_num_threads()
    )
    if status == -1:
        raise ValueError(f"perm is not a permutation of 0..{rows - 1}")
    if status:
        raise MemoryError("nm4_bimask_rows_f32 could not allocate its permutation check")
    return out


@gradless_op("cpu_masked_weight")
def cpu_masked_weight(weight: torch.Tensor, n: int, n_eff: torch.Tensor | None = None) -> torch.Tensor:
    """Graph node for ``<layer>_fwd_masked`` on the CPU path; ``n_eff`` overrides ``n`` (SPEC §8). Never
    differentiated: the sparse GEMMs read ``W ⊙ F`` as their mask, and their autograd gives ``W``'s gradient."""
    return nm4_masked_weight(weight, n_in_force(n, n_eff))


@torch.library.register_fake(cpu_masked_weight)
def _(weight: torch.Tensor, n: int, n_eff: torch.Tensor | None = None) -> torch.Tensor:
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


@gradless_op("cpu_bimask_weight")
def cpu_bimask_weight(
    masked: torch.Tensor, perm: torch.Tensor, n: int, n_eff: torch.Tensor | None = None
) -> torch.Tensor:
    """Graph node for ``<layer>_bwd_mask`` on the CPU path (inside the backward, never differentiated):
    ``W ⊙ B`` from ``W ⊙ F`` and ``P``; ``n_eff`` overrides ``n`` (SPEC §8)."""
    return nm4_bimask_weight(masked, perm, n_in_force(n, n_eff))


@torch.library.register_fake(cpu_bimask_weight)
def _(masked: torch.Tensor, perm: torch.Tensor, n: int, n_eff: torch.Tensor | None = None) -> torch.Tensor:
    return torch.empty_like(masked, memory_format=torch.contiguous_format)
