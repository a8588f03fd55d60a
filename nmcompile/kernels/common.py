"""Device functions shared by the kernels: N:M rank masks, the counter-based hash, MVUE rules.

Each follows ``nmcompile.reference`` (SPEC §2, §4, §7) entry for entry, so a kernel's masks equal
the reference's bit for bit: ranks come from exact comparisons of fp32 magnitudes (exact for fp16,
bf16 and fp32 inputs), and the random numbers from the same 32-bit hash of ``(key, step, index)``.
Mask groups lie along the last axis of a 3-D register tile ``[rows, groups, M]``; MVUE blocks are
tuples of their entries, one tensor each, so the rules are entrywise (``mvue_parts``).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from triton.runtime.autotuner import Autotuner

from nmcompile import reference
from nmcompile.options import power_of_two
from nmcompile.reference import _M32, _mix32

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """``TRITON_INTERPRET=1``: kernels run on the CPU through Triton's interpreter (tests only)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def autotune_configs(
    space: list[dict[str, int]],
    warps: list[tuple[int, int]],
    grouped: tuple[str, ...],
    interpreted: dict[str, int] | None = None,
) -> list[triton.Config]:
    """``space`` × (num_warps, num_stages) on a GPU; one config under the interpreter, where
    autotuning would only cost time: ``interpreted``, or a small one that splits the tests' small
    shapes into several tiles, 16 per block, 32 for the ``grouped`` blocks (which hold whole N:M
    groups, so they must be at least ``M`` <= 32)."""
    if interpreting():
        tile = interpreted or {key: 32 if key in grouped else 16 for key in space[0]}
        return [triton.Config(tile, num_warps=1)]
    return [triton.Config(tile, num_warps=w, num_stages=s) for tile in space for w, s in warps]


def check_nm(n: int, m: int) -> None:
    """The kernels take power-of-two ``m`` up to 32 (register tiles have power-of-two extents), and
    ``n`` and ``m`` as Python ints, which they compile in (a float ``n`` ranked a wrong N)."""
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, m)):
        raise ValueError(f"Triton N:M kernels take n and m as Python ints, got n={n!r}, m={m!r}")
    if not power_of_two(m) or not 2 <= m <= 32 or not 1 <= n <= m:
        raise ValueError(f"Triton N:M kernels need 1 <= n <= m and m a power of two in 2..32, got {n}:{m}")


def check_tensor(name: str, t: torch.Tensor, dim: int, dtypes: tuple[torch.dtype, ...] = DTYPES) -> None:
    """Shape and dtype checks of a launcher's input, with a message that names it."""
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must be one of {dtypes}, got {t.dtype}")


def check_devices(**tensors: torch.Tensor | None) -> None:
    """A launcher's tensors (``None`` left out) on one device: a kernel cannot read another
    device's memory, and Triton's own error names no argument."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError("tensors must be on one device, got " + ", ".join(f"{k} on {v}" for k, v in devices.items()))


def check_perm(perm: torch.Tensor | None, weight: torch.Tensor, m: int) -> None:
    """A Bi-Mask row permutation of ``weight``'s rows: int64 ``[O]`` on its device, with ``O``
    divisible by ``m`` (or ``None``). Its values index rows unchecked (a check would read ``perm``
    back to the host at every call): it must be a permutation of ``range(O)``, as the backend's own
    are (drawn by ``randperm``; a checkpoint's are checked when it loads). The kernels take it
    contiguous."""
    rows = weight.shape[0]
    if perm is not None and (perm.shape != (rows,) or perm.dtype != torch.int64 or rows % m):
        raise ValueError(f"perm must be int64 [{rows}] with O % m == 0, got {perm.dtype} {tuple(perm.shape)}")
    check_devices(weight=weight, perm=perm)


NEAR_TIE: tl.constexpr = tl.constexpr(reference.NEAR_TIE)  # the reference's margin, read by mvue24 below
INDEX_LIMIT = 2**31  # offsets from here on need int64 arithmetic in the kernels
TILE_MARGIN = 256  # the largest block: masked lanes of a last tile compute offsets past the tensor


def wide_index(*tensors: torch.Tensor) -> bool:
    """Whether an offset into any of ``tensors`` (a tile past each edge included) can reach
    ``INDEX_LIMIT``, so the kernels must compute offsets in int64 rather than int32."""
    return any(
        sum((size + TILE_MARGIN) * abs(stride) for size, stride in zip(t.shape, t.stride(), strict=True)) >= INDEX_LIMIT
        for t in tensors
    )


def check_alpha(alpha: torch.Tensor | None, weight: torch.Tensor) -> None:
    """A mask-decay factor: a 0-d float32 tensor on the weight's device (or ``None``)."""
    if alpha is not None and (
        not isinstance(alpha, torch.Tensor) or alpha.shape != () or alpha.dtype != torch.float32
        or alpha.device != weight.device
    ):  # fmt: skip
        got = f"{alpha.dtype} {tuple(alpha.shape)} on {alpha.device}" if isinstance(alpha, torch.Tensor) else alpha
        raise ValueError(f"alpha must be a 0-d float32 tensor on {weight.device}, got {got!r}")


def check_mask(mask: torch.Tensor | None, weight: torch.Tensor) -> None:
    """A loaded mask: bool, the weight's shape, on its device (or ``None``)."""
    if mask is not None and (mask.shape != weight.shape or mask.dtype != torch.bool):
        raise ValueError(f"mask must be bool {tuple(weight.shape)}, got {mask.dtype} {tuple(mask.shape)}")
    check_devices(weight=weight, mask=mask)


def step_seed(key: int, step: int) -> int:
    """The per-step seed of ``reference.counter_uniforms``: ``mix32((step mod 2³²) ^ key)``."""
    return int(_mix32(torch.tensor((step & _M32) ^ key, dtype=torch.int64)))


def tl_dtype(dtype: torch.dtype) -> tl.dtype:
    """The Triton element type of a torch floating dtype."""
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """The element type ``tl.dot`` gets for inputs of ``dtype``: their own, except bf16 under the
    interpreter, whose bf16 ``dot`` is wrong in Triton 3.9 (bf16 → fp32 is exact, so only the
    summation order changes)."""
    return tl.float32 if interpreting() and dtype == torch.bfloat16 else tl_dtype(dtype)


def input_precision() -> str:
    """fp32 ``tl.dot`` as torch's own matmul would run it: TF32 only where torch allows it."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def gemm_launcher(kernel: Autotuner) -> Autotuner | FirstConfig:
    """How a GEMM kernel is launched: autotuned by timing its configs, except under
    ``torch.use_deterministic_algorithms``, where it runs its first config untimed. Its tiles sum
    the products in different orders, and timings can pick another tile in the next process, so
    two runs would round differently (Inductor's deterministic mode skips autotuning likewise)."""
    return FirstConfig(kernel) if torch.are_deterministic_algorithms_enabled() else kernel


class FirstConfig:
    """``kernel[grid](...)`` on ``kernel.configs[0]``, the other configs never timed."""

    def __init__(self, kernel: Autotuner) -> None:
        self.kernel = kernel

    def __getitem__(self, grid: Callable[[dict], tuple[int]]) -> Callable[..., object]:
        config = self.kernel.configs[0]
        return lambda *args, **kwargs: self.kernel.fn[grid](*args, **kwargs, **config.all_kwargs())


@triton.jit
def magnitude(x):
    """``|x|`` in fp32 with NaN as +inf, so NaN ranks as the largest magnitude (SPEC §2)."""
    a = tl.abs(x.to(tl.float32))
    return tl.where(a != a, float("inf"), a)


@triton.jit
def nm_keep(mag, n: tl.constexpr, M: tl.constexpr):
    """Top-``n`` of each group of ``M`` along the last axis of ``mag`` ``[R, G, M]`` (fp32, no NaN).

    Entry ``i`` is kept when fewer than ``n`` entries rank above it (``|a_j| > |a_i|``, or equal
    with ``j < i``): for ``M = 4`` (2:4, the common case) from the 6 comparisons of the group's
    pairs (``_keep4``), else in ``min(n, M - n)`` passes (``_keep_by_passes``), so nothing ``M×M``
    is held at once. ``n`` is a compile-time constant: one kernel per N in force, fully unrolled.
    """
    if M == 4:
        keep = _keep4(mag, n)
    else:
        keep = _keep_by_passes(mag, n, M)
    return keep


@triton.jit
def _keep_by_passes(mag, n: tl.constexpr, M: tl.constexpr):
    """``nm_keep`` by choosing, pass after pass, the first entry of the ranking not chosen yet (two
    reductions over the group a pass, where ranking each entry against every other takes ``M``):
    the top ``n`` for ``n <= M / 2``, else the bottom ``M - n`` (``-mag``, ties to the higher index),
    whose complement is kept."""
    FLIP: tl.constexpr = n > M // 2
    idx = tl.arange(0, M)[None, None, :]
    if FLIP:
        key = -mag
        order = M - 1 - idx
    else:
        key = mag
        order = idx
    chosen = tl.zeros(mag.shape, dtype=tl.int1)
    for _ in tl.static_range(M - n if FLIP else n):
        candidate = tl.where(chosen, -float("inf"), key)
        top = tl.max(candidate, axis=2)[:, :, None]
        first = tl.min(tl.where((candidate == top) & ~chosen, order, M), axis=2)[:, :, None]
        chosen = chosen | (order == first)
    if FLIP:
        chosen = ~chosen
    return chosen


@triton.jit
def _keep4(mag, n: tl.constexpr):
    """``nm_keep`` for groups of 4: each pair compared once (``g_ij``: ``a_i`` ranks above ``a_j``,
    ties to the lower index), and each entry's count of entries above it summed from the 6, with
    no reduction across the group (no warp shuffles)."""
    a0, a1, a2, a3 = split_entries(mag, 4)
    g01, g02, g03 = (a0 >= a1).to(tl.int32), (a0 >= a2).to(tl.int32), (a0 >= a3).to(tl.int32)
    g12, g13, g23 = (a1 >= a2).to(tl.int32), (a1 >= a3).to(tl.int32), (a2 >= a3).to(tl.int32)
    k0 = 3 - g01 - g02 - g03 < n
    k1 = g01 + 2 - g12 - g13 < n
    k2 = g02 + g12 + 1 - g23 < n
    k3 = g03 + g13 + g23 < n
    return join_entries((k0, k1, k2, k3), 4)


@triton.jit
def nm_keep_rows(w, n: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, M: tl.constexpr):
    """N:M mask of a tile ``w`` ``[BLOCK_R, BLOCK_C]`` along its columns (the reduction dim K)."""
    mag = tl.reshape(magnitude(w), (BLOCK_R, BLOCK_C // M, M))
    return tl.reshape(nm_keep(mag, n, M), (BLOCK_R, BLOCK_C))


@triton.jit
def nm_keep_cols(w, n: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, M: tl.constexpr):
    """N:M mask of a tile ``w`` ``[BLOCK_R, BLOCK_C]`` along its rows (groups of ``M`` rows)."""
    mag = tl.permute(tl.reshape(magnitude(w), (BLOCK_R // M, M, BLOCK_C)), (0, 2, 1))
    keep = tl.permute(nm_keep(mag, n, M), (0, 2, 1))
    return tl.reshape(keep, (BLOCK_R, BLOCK_C))


@triton.jit
def mix32(h):
    """The lowbias32 integer hash on uint32 (``reference._mix32``)."""
    h = h ^ (h >> 16)
    h = h * 0x7FEB352D
    h = h ^ (h >> 15)
    h = h * 0x846CA68B
    return h ^ (h >> 16)


@triton.jit
def uniforms(seed, index):
    """``reference.counter_uniforms`` entry ``index`` (int64) of the stream with per-step ``seed``."""
    low = (index & 0xFFFFFFFF).to(tl.uint32)
    high = (index >> 32).to(tl.uint32)
    h = mix32(mix32(low ^ seed.to(tl.uint32)) ^ high)
    return (h >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _last_positive4(p0, p1, p2, p3, otherwise):
    """``reference._last_positive`` for 4 entries: index of the last with ``p > 0`` (else ``otherwise``)."""
    return tl.where(p3 > 0, 3, tl.where(p2 > 0, 2, tl.where(p1 > 0, 1, tl.where(p0 > 0, 0, otherwise))))


@triton.jit
def _cover4(p0, p1, p2, u, last, SECOND_UNIT: tl.constexpr):
    """``reference._cover`` for 4 entries: index of the interval holding ``u`` (``u + 1`` with
    ``SECOND_UNIT``, as ``end − 1 ≤ u``) when ``p`` are laid end to end (ends summed in order); a
    point past the rounded ends falls in ``last`` (the last entry with ``p > 0``)."""
    e1 = p0 + p1
    e2 = e1 + p2
    if SECOND_UNIT:
        index = (p0 - 1 <= u).to(tl.int32) + (e1 - 1 <= u).to(tl.int32) + (e2 - 1 <= u).to(tl.int32)
    else:
        index = (p0 <= u).to(tl.int32) + (e1 <= u).to(tl.int32) + (e2 <= u).to(tl.int32)
    return tl.minimum(index, last)


@triton.jit
def _safe(x, ok):
    """``x`` where ``ok``, else 1: a divisor that cannot be zero in the branch not taken."""
    return tl.where(ok, x, 1.0)


@triton.jit
def _sign(x):
    """``torch.sign`` in fp32: -1, 0 or 1."""
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@triton.jit
def _sums4(x0, x1, x2, x3):
    """``reference._sums``: the total of 4 entries and, for each, the sum of the other three, from
    the pair sums (summed: the total less the entry cancels when the entry dominates)."""
    s01, s23 = x0 + x1, x2 + x3
    return s01 + s23, (x1 + s23, x0 + s23, s01 + x3, s01 + x2)


@triton.jit
def _choose4(i, x0, x1, x2, x3):
    """``(x0, x1, x2, x3)[i]`` entrywise, for an int32 index tensor ``i``."""
    return tl.where(i == 0, x0, tl.where(i == 1, x1, tl.where(i == 2, x2, x3)))


@triton.jit
def _non_finite_first(a0, total):
    """What a block whose magnitude ``total`` is NaN or inf keeps at entry 0 (the rest 0): that total,
    with ``a0``'s sign (``reference._unsampled_where_not_finite``)."""
    return tl.where(a0 < 0, -total, total)


@triton.jit
def mvue12(a, u):
    """SPEC §7 1:2 on a block ``a = (a0, a1)`` (fp32 tensors of one shape), uniform ``u`` per block."""
    a0, a1 = a
    total = tl.abs(a0) + tl.abs(a1)
    keep_first = u < tl.where(total > 0, tl.abs(a0) / _safe(total, total > 0), 0.0)
    finite = total < float("inf")
    return (
        tl.where(finite, tl.where(keep_first, _sign(a0) * total, 0.0), _non_finite_first(a0, total)),
        tl.where(finite, tl.where(keep_first, 0.0, _sign(a1) * total), 0.0),
    )


@triton.jit
def _max_nan(x, y):
    """``torch.maximum``: NaN if either is (``tl.maximum`` on a GPU returns the other operand)."""
    return tl.maximum(x, y, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _p24(mag, i, top_index, dominant, rest, total):
    """Inclusion probability of entry ``i`` (magnitude ``mag``) under the optimal 2:4 rule: the
    dominant entry 1, the others ``mag / rest``; without one ``2 mag / total``. One division for
    both cases (the same operands, so the same result as dividing in each)."""
    den = tl.where(dominant, rest, total)
    ok = den > 0
    p = tl.where(dominant, mag, 2 * mag) / _safe(den, ok)
    p = tl.where(ok, p, tl.where(dominant, 1.0 / 3, 0.5))
    return tl.where(dominant & (top_index == i), 1.0, p)


@triton.jit
def _divided(a, p):
    """``a / p``, 0 where ``p`` is 0."""
    return tl.where(p > 0, a / _safe(p, p > 0), 0.0)


@triton.jit
def _kept4(a, p, first, second, total):
    """A block ``a = (a0, .., a3)`` with its two drawn entries (indices ``first``, ``second``) divided
    by their inclusion probabilities ``p = (p0, .., p3)`` and the others 0: two divisions per
    block, of the drawn entries picked out first, instead of one per entry. A block whose magnitude
    ``total`` is NaN or inf keeps ``_non_finite_first`` only: both indices 0, the value swapped in."""
    a0, a1, a2, a3 = a
    p0, p1, p2, p3 = p
    finite = total < float("inf")
    first = tl.where(finite, first, 0)
    second = tl.where(finite, second, 0)
    at_first = _divided(_choose4(first, a0, a1, a2, a3), _choose4(first, p0, p1, p2, p3))
    at_first = tl.where(finite, at_first, _non_finite_first(a0, total))
    at_second = _divided(_choose4(second, a0, a1, a2, a3), _choose4(second, p0, p1, p2, p3))
    return (
        tl.where(first == 0, at_first, tl.where(second == 0, at_second, 0.0)),
        tl.where(first == 1, at_first, tl.where(second == 1, at_second, 0.0)),
        tl.where(first == 2, at_first, tl.where(second == 2, at_second, 0.0)),
        tl.where(first == 3, at_first, tl.where(second == 3, at_second, 0.0)),
    )


@triton.jit
def mvue24(a, u):
    """SPEC §7 optimal 2:4 on a block ``a = (a0, .., a3)`` (fp32): systematic sampling with inclusion
    probabilities ``p`` (the dominant entry always kept; a block within 2⁻¹⁸ of a tie sampled as
    dominant, as ``reference._mvue24`` says why), one uniform ``u`` per block."""
    a0, a1, a2, a3 = a
    m0, m1, m2, m3 = tl.abs(a0), tl.abs(a1), tl.abs(a2), tl.abs(a3)
    total, (o0, o1, o2, o3) = _sums4(m0, m1, m2, m3)
    top = _max_nan(_max_nan(m0, m1), _max_nan(m2, m3))
    top_index = tl.where(m0 == top, 0, tl.where(m1 == top, 1, tl.where(m2 == top, 2, 3)))  # the first maximum
    rest = _choose4(top_index, o0, o1, o2, o3)
    dominant = top > rest * NEAR_TIE
    p0 = _p24(m0, 0, top_index, dominant, rest, total)
    p1 = _p24(m1, 1, top_index, dominant, rest, total)
    p2 = _p24(m2, 2, top_index, dominant, rest, total)
    p3 = _p24(m3, 3, top_index, dominant, rest, total)
    l0 = tl.where(dominant & (top_index == 0), 0.0, p0)  # the others of a dominant entry: one unit
    l1 = tl.where(dominant & (top_index == 1), 0.0, p1)
    l2 = tl.where(dominant & (top_index == 2), 0.0, p2)
    l3 = tl.where(dominant & (top_index == 3), 0.0, p3)
    last = _last_positive4(l0, l1, l2, l3, top_index)
    first = _cover4(l0, l1, l2, u, last, False)
    second = tl.where(dominant, top_index, _cover4(l0, l1, l2, u, last, True))
    return _kept4(a, (p0, p1, p2, p3), first, second, total)


@triton.jit
def _q(mag, i, first, left):
    """Entry ``i``'s probability in the second draw of the two-draw rule: its magnitude over that of
    the entries ``first`` left (``left``), 0 for ``first`` itself."""
    return tl.where(first == i, 0.0, tl.where(left > 0, mag / _safe(left, left > 0), 1.0 / 3))


@triton.jit
def _ratio(mag, others):
    """``p / (1 − p)`` as ``mag / others`` (the magnitude of the other three), 0 where ``p = 1``."""
    return tl.where(others > 0, mag / _safe(others, others > 0), 0.0)


@triton.jit
def mvue24_approx(a, u0, u1):
    """SPEC §7 two-draw 2:4 on a block ``a = (a0, .., a3)`` (fp32): one draw by ``p``, one among the
    rest, each kept entry divided by its inclusion probability; uniforms ``u0``, ``u1`` per block."""
    a0, a1, a2, a3 = a
    m0, m1, m2, m3 = tl.abs(a0), tl.abs(a1), tl.abs(a2), tl.abs(a3)
    total, (o0, o1, o2, o3) = _sums4(m0, m1, m2, m3)  # o_i = (1 − p_i) · total, without cancellation
    p0 = tl.where(total > 0, m0 / _safe(total, total > 0), 0.25)
    p1 = tl.where(total > 0, m1 / _safe(total, total > 0), 0.25)
    p2 = tl.where(total > 0, m2 / _safe(total, total > 0), 0.25)
    p3 = tl.where(total > 0, m3 / _safe(total, total > 0), 0.25)
    first = _cover4(p0, p1, p2, u0, _last_positive4(p0, p1, p2, p3, 0), False)
    left = _choose4(first, o0, o1, o2, o3)
    q0, q1, q2, q3 = _q(m0, 0, first, left), _q(m1, 1, first, left), _q(m2, 2, first, left), _q(m3, 3, first, left)
    second = _cover4(q0, q1, q2, u1, _last_positive4(q0, q1, q2, q3, first), False)
    _, (s0, s1, s2, s3) = _sums4(_ratio(m0, o0), _ratio(m1, o1), _ratio(m2, o2), _ratio(m3, o3))
    inclusion = (p0 + p0 * s0, p1 + p1 * s1, p2 + p2 * s2, p3 + p3 * s3)
    return _kept4(a, inclusion, first, second, total)  # inclusion: P(i first) + Σ_j P(j first, then i)


@triton.jit
def mvue_parts(a, seed, block_index, RULE: tl.constexpr):
    """Prune blocks given as a tuple of their ``MM`` entries ``a`` (fp32 tensors of one shape) by
    ``RULE`` (1: mvue12, 2: mvue24, 3: mvue24_approx); ``block_index`` (int64, same shape) numbers
    the blocks as the reference stream does. Entrywise, so a kernel that loads each entry of its
    blocks as its own tile (``kernels.mvue``) needs no data exchange between threads."""
    if RULE == 1:
        out = mvue12(a, uniforms(seed, block_index))
    elif RULE == 2:
        out = mvue24(a, uniforms(seed, block_index))
    else:
        out = mvue24_approx(a, uniforms(seed, 2 * block_index), uniforms(seed, 2 * block_index + 1))
    return out


@triton.jit
def split_entries(g, MM: tl.constexpr):
    """A tile ``[R, G, MM]`` of blocks (``MM`` 2 or 4) split into its ``MM`` entries ``[R, G]``, in
    registers: ``join_entries`` undone."""
    if MM == 2:
        a = tl.split(g)
    else:
        even, odd = tl.split(tl.reshape(g, (g.shape[0], g.shape[1], 2, 2)))  # entries (0, 2) and (1, 3)
        a0, a2 = tl.split(even)
        a1, a3 = tl.split(odd)
        a = (a0, a1, a2, a3)
    return a


@triton.jit
def join_entries(o, MM: tl.constexpr):
    """A tuple of ``MM`` entries ``[R, G]`` of blocks joined into a tile ``[R, G, MM]``."""
    if MM == 2:
        out = tl.join(o[0], o[1])
    else:
        out = tl.reshape(tl.join(tl.join(o[0], o[2]), tl.join(o[1], o[3])), (o[0].shape[0], o[0].shape[1], 4))
    return out


@triton.jit
def mvue_tile(g, seed, block_index, RULE: tl.constexpr, MM: tl.constexpr):
    """``mvue_parts`` on a tile ``g`` ``[R, G, MM]`` (fp32) of whole blocks along its last axis,
    ``block_index`` ``[R, G]``: the tile split into its ``MM`` entries and joined back."""
    return join_entries(mvue_parts(split_entries(g, MM), seed, block_index, RULE), MM)


MVUE_RULES = {"mvue12": (1, 2), "mvue24": (2, 4), "mvue24_approx": (3, 4)}  # rule id, block size


@triton.jit
def grouped_tile(pid, rows, cols, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, GROUP: tl.constexpr):
    """Tile ``(a, b)`` of a 1-D launch in the Triton tutorial's grouped order (``GROUP`` row tiles
    share column tiles while they sit in L2)."""
    tiles_a = tl.cdiv(rows, BLOCK_A)
    tiles_b = tl.cdiv(cols, BLOCK_B)
    per_group = GROUP * tiles_b
    first = (pid // per_group) * GROUP
    size = min(tiles_a - first, GROUP)
    return first + (pid % per_group) % size, (pid % per_group) // size


def gemm_grid(rows: int, cols: int, block_a: str, block_b: str) -> Callable[[dict], tuple[int]]:
    """The 1-D launch grid of ``grouped_tile`` for an output ``[rows, cols]``."""
    return lambda meta: (triton.cdiv(rows, meta[block_a]) * triton.cdiv(cols, meta[block_b]),)
