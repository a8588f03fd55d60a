"""The SPEC made executable in plain eager PyTorch: the test oracle and the benchmark baseline.

Mask, permutation, gradient, MVUE and schedule rules follow ``SPEC.md`` §2–§8 literally.
``sparsify`` swaps each eligible ``nn.Linear`` and ``nn.Conv1d/2d/3d`` for its sparse twin (same
parameters) and routes ``mm``/``addmm``/``matmul`` calls on other eligible 2-D weights (e.g.
GPT-2's ``Conv1D``) through the same ``autograd.Function``, so the eager model trains exactly as
the compiled one should.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import itertools
import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import _WrappedHook
from torch.overrides import TorchFunctionMode

from nmcompile.options import SparsityConfig, structure_sequence

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FLOAT32_EXACT = 2**24  # every integer up to this is a float32


def _check_nm(size: int, n: int, m: int, what: str) -> None:
    if not 1 <= n <= m:
        raise ValueError(f"N:M needs 1 <= n <= m, got {n}:{m}")
    if size % m:
        raise ValueError(f"{what} of size {size} is not divisible by m={m}")


def magnitude(a: torch.Tensor) -> torch.Tensor:
    """``|a|`` in float64 with NaN as +inf, so NaN ranks as the largest magnitude (SPEC §2)."""
    mag = a.detach().abs().double()
    return torch.where(torch.isnan(mag), torch.inf, mag)


def nm_mask(a: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    """SPEC §2: keep the ``n`` largest ``|a|`` in each group of ``m`` along ``dim``; ties to lower index."""
    _check_nm(a.shape[dim], n, m, f"dim {dim}")
    moved = magnitude(a).movedim(dim, -1)
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order[..., :n], True)
    return keep.reshape(moved.shape).movedim(-1, dim)


@functools.cache
def transposable_patterns(n: int, m: int) -> torch.Tensor:
    """All ``m×m`` 0/1 blocks with exactly ``n`` ones per row and per column, flattened: ``[P, m*m]``."""
    rows = list(itertools.combinations(range(m), n))
    patterns = []
    for choice in itertools.product(rows, repeat=m):
        block = torch.zeros(m, m, dtype=torch.bool)
        for r, cols in enumerate(choice):
            block[r, list(cols)] = True
        if bool((block.sum(0) == n).all()):
            patterns.append(block.flatten())
    return torch.stack(patterns)


def transposable_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """SPEC §4 ``transposable``: N:M along both dims of ``w`` ``[O, K]``, maximising kept ``|w|``.

    Exact (best of all valid block patterns, first on ties) for ``m <= 4``; the greedy
    2-approximation (entries by decreasing ``|w|``, kept while row and column have room) above,
    which keeps at most ``n`` per row and column. A conv weight ``[O, C, *k]`` gets one such mask
    per kernel position (N:M along ``C`` and along ``O``).
    """
    if w.dim() > 2:
        per_position = w.movedim((0, 1), (-2, -1))  # [*k, O, C]
        mask = transposable_mask(per_position.reshape(-1, w.shape[1]), n, m)
        return mask.reshape(per_position.shape).movedim((-2, -1), (0, 1))
    O, K = w.shape
    _check_nm(O, n, m, "rows")
    _check_nm(K, n, m, "columns")

    def blocks(a: torch.Tensor) -> torch.Tensor:
        return a.reshape(O // m, m, K // m, m).permute(0, 2, 1, 3).reshape(-1, m * m)

    mag = magnitude(w)
    if m <= 4:
        # Ranked by how many inf/NaN a pattern keeps, then by the sum of the finite |w| it keeps
        # (capped so that sums stay finite): a NaN cannot drown the finite entries beside it.
        patterns = transposable_patterns(n, m).to(w.device).double()
        infinite = torch.isinf(mag)
        finite = torch.where(infinite, 0.0, mag).clamp(max=torch.finfo(torch.float64).max / (4 * m * m))
        kept_infinite = blocks(infinite.double()) @ patterns.T
        kept_finite = blocks(finite) @ patterns.T
        most = kept_infinite == kept_infinite.amax(dim=1, keepdim=True)
        keep = patterns.bool()[torch.where(most, kept_finite, -torch.inf).argmax(dim=1)]
    else:
        keep = _greedy_transposable(blocks(mag), n, m)
    return keep.reshape(O // m, K // m, m, m).permute(0, 2, 1, 3).reshape(O, K)


def _greedy_transposable(blocks: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Greedy transposable selection over flattened ``m×m`` blocks ``[B, m*m]``."""
    count = blocks.shape[0]
    order = torch.sort(blocks, dim=1, descending=True, stable=True).indices
    keep = torch.zeros_like(blocks, dtype=torch.bool)
    row_count = torch.zeros(count, m, dtype=torch.int64, device=blocks.device)
    col_count = torch.zeros_like(row_count)
    batch = torch.arange(count, device=blocks.device)
    for j in range(m * m):
        idx = order[:, j]
        r, c = idx // m, idx % m
        ok = (row_count[batch, r] < n) & (col_count[batch, c] < n)
        keep[batch, idx] = ok
        row_count[batch, r] += ok
        col_count[batch, c] += ok
    return keep


def permutation_score(fmask: torch.Tensor, perm: torch.Tensor, n: int, m: int) -> int:
    """SPEC §5: over blocks of ``m`` rows of ``F[P]`` × a column, sum ``min(n, kept in block)``.

    For a conv mask ``[O, C, *k]`` every ``(c, *k)`` position is a column.
    """
    return int(permutation_scores(fmask, perm[None], n, m)[0])


SCORE_CHUNK = 2**20
"""Mask entries per batch of candidates that ``permutation_scores`` scores together. Small weights
share a batch: a search (100 candidates, the forward mask and their draws included) took 4.5-5.2 ms
for a 64 x 64 weight one candidate at a time, most of it the dispatch of five ops per candidate,
and 1.8-2.0 ms batched (1.3-1.8 ms with the draws' own cost cut); 512 x 128: 6.1-6.6, 4.0 and
2.9-3.0 ms. Weights of this many entries or more go one at a time, as before (2048 x 512: 24-28 ms
either way), so the batch's buffers stay small (``python -m benchmarks.masks --rows R --cols C
--threads 1``, 2-core AMD EPYC, torch 2.13)."""


def permutation_scores(fmask: torch.Tensor, perms: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """``permutation_score`` of each row of ``perms`` ``[C, O]``, as int64 ``[C]``, batched."""
    O = fmask.shape[0]
    _check_nm(O, n, m, "rows")
    flat = fmask.reshape(O, -1)
    perms = perms.to(fmask.device)
    # Byte counts (search scores 100 candidates), summed from bytes rather than bools and totalled
    # in int32 where that cannot overflow, as ATen's int64 total of bytes is slow: a 2:4 search
    # over a 4096 x 4096 weight took 1.1-1.2 s, 1.6-1.8 s before (``python -m benchmarks.masks
    # --rows 4096 --cols 4096 --threads 1``, a 2-core AMD EPYC, torch 2.13).
    counts = torch.uint8 if m < 256 else torch.int64
    width = flat.shape[1]
    total = torch.int32 if O // m * width * n < 2**31 else torch.int64  # a candidate's score fits
    batch = max(1, min(len(perms), SCORE_CHUNK // max(1, flat.numel())))
    # Buffers for every batch: fresh ones of these sizes cost more in page faults than the sums.
    gathered = flat.new_empty(batch * O, width)
    in_block = flat.new_empty(batch, O // m, width, dtype=counts)
    kept = flat.new_empty(batch, O // m, width, dtype=total)  # a sum's own cast to int32 allocates
    scores = []
    for chunk in perms.split(batch):
        size = len(chunk)
        rows = torch.index_select(flat, 0, chunk.reshape(-1), out=gathered[: size * O])
        torch.sum(rows.view(size, O // m, m, width), 2, dtype=counts, out=in_block[:size])
        kept[:size].copy_(in_block[:size].clamp_(max=n))
        scores.append(kept[:size].sum((1, 2), dtype=total))
    return torch.cat(scores).long()


def search_permutation(
    fmask: torch.Tensor, current: torch.Tensor, candidates: Sequence[torch.Tensor], n: int, m: int
) -> tuple[torch.Tensor, int]:
    """Best of ``current`` and ``candidates`` by ``permutation_score``; ties keep the earlier one.
    The mask is made bytes once here, and the candidates are scored in batches."""
    fmask = fmask.to(torch.uint8)
    perms = torch.stack([current.to(fmask.device), *(c.to(fmask.device) for c in candidates)])
    scores = permutation_scores(fmask, perms, n, m).tolist()
    best = max(range(len(scores)), key=scores.__getitem__)  # the first of the highest
    chosen = current if best == 0 else candidates[best - 1]
    return chosen.to(current.device).clone(), scores[best]


def swap_rows(
    fmask: torch.Tensor, perm: torch.Tensor, n: int, m: int, sweeps: int, generator: torch.Generator, groups: int = 1
) -> torch.Tensor:
    """Greedy row swaps after the random search (option ``perm_swaps``, SPEC §5's "better search").

    Each sweep pairs the blocks of ``m`` rows of ``F[P]`` at random (inside each of ``groups``
    equal row groups, so a grouped convolution's rows stay in their group) and, in each pair, makes
    the one swap of a row of one block with a row of the other that raises ``permutation_score``
    most (the first such swap, row-major over the pair's ``m x m`` choices), where any raises it.
    The pairs are disjoint, so a sweep's swaps add their gains: the score never falls.

    For rows ``a`` of block 1 and ``b`` of block 2 with column counts ``c1``, ``c2``, a swap moves
    the entries where ``F_a != F_b``; its gain is ``F_a·x + F_b·y + Σ_k F_a F_b (e1 + e2)`` with
    ``x = [c2<n] − [c1<=n]``, ``y = [c1<n] − [c2<=n]`` and ``e = [c == n]``: batched matmuls in
    float32, whose integer sums (at most ``4·K`` for ``K`` columns) are exact up to ``2²⁴``; float64
    for wider rows.
    """
    O = fmask.shape[0]
    _check_nm(O // groups, n, m, "rows per group")
    width = fmask[0].numel()
    dtype = torch.float32 if 4 * width <= FLOAT32_EXACT else torch.float64
    given = perm.device
    perm = perm.to(fmask.device, copy=True)
    permuted = fmask.reshape(O, width).index_select(0, perm).to(dtype)
    per_group, choices = O // groups // m, m * m
    count = groups * (per_group // 2)  # block pairs per sweep
    if not count:
        return perm.to(given)
    # Buffers reused by every sweep: fresh ones of this size cost more in page faults than the work.
    rows, scaled = permuted.new_empty(2, count, m, width), permuted.new_empty(count, m, width)
    offsets = torch.arange(m, device=fmask.device)
    order = torch.arange(choices, device=fmask.device)
    for _ in range(sweeps):
        picks = [torch.randperm(per_group, generator=generator)[: per_group // 2 * 2] for _ in range(groups)]
        pairs = torch.cat([p + g * per_group for g, p in enumerate(picks)]).reshape(-1, 2).to(fmask.device)
        positions = (pairs.t()[..., None] * m + offsets).reshape(2, count, m)  # [block 1 or 2, pair, row]
        torch.index_select(permuted, 0, positions.reshape(-1), out=rows.view(-1, width))
        f1, f2 = rows
        counts = rows.sum(2)  # [2, count, width]
        below, at_most = (n - counts).clamp_(0, 1), (n + 1 - counts).clamp_(0, 1)  # [c < n], [c <= n]
        x, y = below[1] - at_most[0], below[0] - at_most[1]
        both = (at_most - below).sum(0)
        torch.mul(f1, both[:, None], out=scaled)
        gain = torch.bmm(f1, x[..., None]) + torch.bmm(f2, y[..., None]).transpose(1, 2)
        gain = (gain + torch.bmm(scaled, f2.transpose(1, 2))).round().long().reshape(count, choices)
        choice = (gain * choices - order).argmax(1)  # the largest gain, first on ties, on any device
        better = gain.gather(1, choice[:, None])[:, 0] > 0
        a = positions[0].gather(1, (choice // m)[:, None])[better, 0]
        b = positions[1].gather(1, (choice % m)[:, None])[better, 0]
        moved, swapped = torch.cat([a, b]), torch.cat([b, a])
        perm[moved] = perm[swapped]
        permuted[moved] = permuted[swapped]
    return perm.to(given)


def backward_mask(w: torch.Tensor, fmask: torch.Tensor, perm: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """SPEC §4 Bi-Mask ``B`` in original row order: ``Bp = nm_mask(|W⊙F|[P], dim=0)``, ``B[P[i]] = Bp[i]``.

    Intersected with ``F`` so that ``B ⊆ F`` as SPEC states: a block with fewer than ``n``
    forward-kept weights fills its ``n`` picks with zeros of ``W⊙F``, which must not bring pruned
    weights back. ``B`` then keeps ``min(n, kept)`` per block, the count SPEC §5 scores, except
    where kept weights are exactly 0: the tie among zeros can pick a pruned one, which ``∧ F``
    drops. ``W⊙B``, all that the backward uses, is the same either way.
    """
    permuted = torch.where(fmask, w.detach(), 0).index_select(0, perm)
    bp = nm_mask(permuted, n, m, dim=0)
    b = torch.empty_like(bp)
    b[perm] = bp
    return b & fmask


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Per-step options of one sparse GEMM in the reference: SR-STE ``λ``, mask-decay ``α`` (``None``
    without), and MVUE pruning of dY for dW (``rule`` ``"none"`` without; ``key``/``step`` seed it)."""

    srste_lambda: float = 0.0
    alpha: float | None = None
    rule: str = "none"
    key: int = 0
    step: torch.Tensor | None = None

    def weight(self, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``W ⊙ mask``, or ``W ⊙ (mask + (1 − mask)·α)`` with mask decay (SPEC §8), in ``W``'s layout.

        A mask is laid out by the dim it was ranked along, and ``torch.where`` follows it where
        ``W``'s strides do not decide: a 1x1 kernel's NCHW weight, channels-last on its dims of
        size 1, would make the convolution's output channels-last (a ``.view`` then fails)."""
        masked = torch.where(mask, weight, 0 if self.alpha is None else weight * self.alpha)
        return masked if masked.stride() == weight.stride() else torch.empty_like(weight).copy_(masked)

    def prune(self, dy: torch.Tensor, channel_dim: int) -> torch.Tensor:
        """SPEC §7: the MVUE rule on the token view ``[T, O]`` of ``dy``, blocks along ``T``."""
        if self.rule == "none":
            return dy
        tokens = dy.movedim(channel_dim, -1)
        flat = tokens.reshape(-1, tokens.shape[-1])
        pruned = mvue_prune_with(flat, self.rule, 0, lambda index: counter_uniforms_at(self.key, self.step, index))
        return pruned.reshape(tokens.shape).movedim(-1, channel_dim)

    def srste(self, dw: torch.Tensor, weight: torch.Tensor, fmask: torch.Tensor) -> torch.Tensor:
        """``dW + λ(1−F)⊙W`` (SPEC §8): the SR-STE term pulls the pruned weights towards zero."""
        return dw + self.srste_lambda * torch.where(fmask, 0, weight) if self.srste_lambda else dw


def autocast_to(dtype: torch.dtype, autocast: torch.dtype | None) -> torch.dtype:
    """The dtype a GEMM operand of ``dtype`` takes under autocast to ``autocast`` (``None``: off):
    autocast casts floating point but float64, as torch's ``is_eligible`` does; the rest keeps its own."""
    eligible = autocast is not None and dtype.is_floating_point and dtype != torch.float64
    return autocast if eligible else dtype


def autocast_in_force(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force for ``device_type``, ``None`` where autocast is off or does not
    know the device (meta)."""
    on = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    return torch.get_autocast_dtype(device_type) if on else None


def autocast_inputs(x: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    """Under autocast, activations and bias cast to the autocast dtype, as ``F.linear`` does (float64
    and non-float inputs keep theirs); the weight keeps its own dtype (masks come from its values)
    and meets the compute dtype in the GEMM (``compute_weight``)."""
    dtype = autocast_in_force(x.device.type)
    if dtype is None:
        return x, bias
    return x.to(autocast_to(x.dtype, dtype)), bias.to(autocast_to(bias.dtype, dtype)) if bias is not None else None


def compute_weight(weight: torch.Tensor) -> torch.Tensor:
    """The masked ``weight`` in the dtype autocast gives it, as ``F.linear`` would (its own outside
    autocast): a GEMM with an input of another dtype then raises, as in eager."""
    return weight.to(autocast_to(weight.dtype, autocast_in_force(weight.device.type)))


class SparseGemm(torch.autograd.Function):
    """``Y = X (W⊙F)ᵀ + b``; ``dX = dY (W⊙B)``; ``dW = prune(dY)ᵀX + λ(1−F)⊙W`` (SPEC §3–§8)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        fmask: torch.Tensor,
        bmask: torch.Tensor,
        recipe: Recipe,
    ) -> torch.Tensor:
        x, bias = autocast_inputs(x, bias)
        ctx.save_for_backward(x, weight, fmask, bmask)
        ctx.recipe = recipe
        return F.linear(x, compute_weight(recipe.weight(weight, fmask)), bias)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, weight, fmask, bmask = ctx.saved_tensors
        recipe: Recipe = ctx.recipe
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dy @ recipe.weight(weight, bmask).to(dy.dtype) if need_x else None
        dw = None
        if need_w:
            pruned = recipe.prune(dy, -1)
            dw = recipe.srste(pruned.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1]), weight, fmask)
        db = dy.reshape(-1, dy.shape[-1]).sum(0) if need_b else None
        return dx, dw, db, None, None, None


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def conv_padding(padding: Any, kernel: Sequence[int], dilation: Sequence[int]) -> tuple[list[int], list[int] | None]:
    """Explicit per-dim conv padding, plus ``F.pad`` widths when ``"same"`` needs asymmetric padding.

    ``"same"`` pads ``dilation·(k−1)`` in total per dim, the extra one on the right, as PyTorch does.
    """
    dims = len(kernel)
    if not isinstance(padding, str):
        return ([padding] * dims if isinstance(padding, int) else list(padding)), None
    if padding == "valid":
        return [0] * dims, None
    total = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
    left = [t // 2 for t in total]
    if all(2 * lo == t for lo, t in zip(left, total, strict=True)):
        return left, None
    pad: list[int] = []
    for lo, t in zip(reversed(left), reversed(total), strict=True):
        pad += [lo, t - lo]
    return [0] * dims, pad


class SparseConv(torch.autograd.Function):
    """Convolution with ``W⊙F`` forward, ``W⊙B`` input gradient, straight-through ``dW`` (SPEC §3–§8)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        fmask: torch.Tensor,
        bmask: torch.Tensor,
        recipe: Recipe,
        conv: tuple,
    ) -> torch.Tensor:
        x, bias = autocast_inputs(x, bias)
        ctx.save_for_backward(x, weight, fmask, bmask)
        ctx.recipe, ctx.conv = recipe, conv
        return _CONV[weight.dim() - 2](x, compute_weight(recipe.weight(weight, fmask)), bias, *conv)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, weight, fmask, bmask = ctx.saved_tensors
        recipe: Recipe = ctx.recipe
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        d = weight.dim() - 2
        weight_grad = getattr(torch.nn.grad, f"conv{d}d_weight")
        dx = None
        if need_x:  # ``x`` itself, not a stand-in of its shape: the kernel then follows its memory format
            stride, padding, dilation, groups = ctx.conv
            wb = recipe.weight(weight, bmask).to(dy.dtype)
            args = (stride, padding, dilation, False, [0] * d, groups, [True, False, False])
            dx = torch.ops.aten.convolution_backward(dy, x, wb, None, *args)[0]
        dw = None
        if need_w:
            dw = recipe.srste(weight_grad(x, weight.shape, recipe.prune(dy, 1), *ctx.conv), weight, fmask)
        db = dy.sum([0, *range(2, dy.dim())]) if need_b else None
        return dx, dw, db, None, None, None, None


class _ForwardUses:
    """The weights the sparsified model's current forward has used, to find one used twice (SPEC §10:
    a parameter used by more than one node stays dense, as the compiled backend keeps it)."""

    def __init__(self, model: nn.Module, registry: Any) -> None:
        self.registry = registry
        self.seen: dict[int, _Rule | None] | None = None  # weight id -> its first use's rule, in this forward
        self.shared: set[int] = set()
        self.dropped: set[int] = set()  # ids of the rules whose states were dropped
        model.register_forward_pre_hook(self.begin)
        model.register_forward_hook(self.end, always_call=True)

    def begin(self, module: nn.Module, args: Any) -> None:
        self.seen = {}

    def end(self, module: nn.Module, args: Any, output: Any) -> None:
        self.seen = None

    def is_dense(self, param: nn.Parameter, rule: _Rule | None) -> bool:
        """Whether a use of ``param`` through ``rule`` (``None``: a dense GEMM or another op) runs
        dense: every GEMM on it does from its second use in one forward on, and its rules' states
        are dropped (a rule per layout), with a warning. That forward's first use may have run sparse."""
        key = id(param)
        if key in self.shared:
            self._drop(param, [rule], "")
            return True
        if self.seen is None:  # a call outside the model's forward (the layer on its own)
            return False
        if key not in self.seen:
            self.seen[key] = rule
            return False
        self.shared.add(key)
        first = self.seen[key]
        self._drop(param, [first, rule], "; this forward's first use of it ran sparse" if first is not None else "")
        return True

    def _drop(self, param: nn.Parameter, rules: list[_Rule | None], note: str) -> None:
        """Reset and forget the states of ``rules``, warning once with the weight's name."""
        fresh = {id(r): r for r in rules if r is not None and r.has_state and id(r) not in self.dropped}
        for r in fresh.values():
            r.state.reset()
            self.registry.discard(param, r.state)
            self.dropped.add(id(r))
        if fresh:
            warnings.warn(
                f"nmcompile.reference: {next(iter(fresh.values())).state.spec.name} is used by more than one "
                f"op in one forward; its GEMMs run dense from here on, as the compiled backend keeps them{note}",
                stacklevel=_user_stacklevel(),  # the user's line that makes the second use
            )


def _user_stacklevel() -> int:
    """The ``stacklevel`` that names, in a warning its caller raises, the first frame outside
    nmcompile and torch: the user's line whose call it is about, however many torch frames
    (module calls, torch-function dispatch) lie between."""
    import nmcompile.passes

    internal = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, sys.modules["nmcompile"], nmcompile.passes))
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(internal):
        frame, level = frame.f_back, level + 1
    return level


class _Rule:
    """How one eligible weight is sparsified in the reference: its state, masks and GEMM. The
    state is made by ``make_state``: at once for a trainable weight (so ``sparsity_state`` and
    ``state_dict`` have it from the start), at its first sparse call for one frozen when
    ``sparsify`` ran (the backend makes it at the first compile that finds the weight trainable)."""

    def __init__(
        self, make_state: Callable[[], Any], param: nn.Parameter, backward: str, config: SparsityConfig,
        uses: _ForwardUses,
    ) -> None:  # fmt: skip
        self._make_state = make_state
        self._state: Any = make_state() if param.requires_grad else None
        self.param = param
        self.backward = backward
        self.config = config
        self.uses = uses

    @property
    def has_state(self) -> bool:
        """Whether the state exists (a rule of a weight frozen since ``sparsify`` makes it late)."""
        return self._state is not None

    @property
    def state(self) -> Any:
        if self._state is None:
            self._state = self._make_state()
        return self._state

    def __call__(
        self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, conv: tuple | None = None
    ) -> torch.Tensor:
        """The sparse ``F.linear(x, w, bias)`` for ``w`` as ``[O, K]``, or, given ``conv = (stride,
        padding, dilation, groups)``, the sparse convolution with ``w`` ``[O, C, *k]``. Counts steps.
        A weight used twice in one forward runs the dense GEMM, as does one that dynamo traces (a
        ``torch.cond`` branch, which torch traces even in eager mode, and the backend leaves dense)
        and a frozen one (SPEC §10; the backend recompiles a layer frozen mid-training dense), which
        counts no step. Under ``inference_mode`` (``enable_grad()`` or not) it records no graph and
        counts no step, as eager ops there. Its own ops on ``w`` are not the user's:
        ``_GemmInterceptor`` sees none of them."""
        with torch._C.DisableTorchFunction():
            return self._run(x, w, bias, conv)

    def _run(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, conv: tuple | None) -> torch.Tensor:
        if torch.compiler.is_compiling() or not w.requires_grad or self.uses.is_dense(self.param, self):
            return F.linear(x, w, bias) if conv is None else _CONV[w.dim() - 2](x, w, bias, *conv)
        config, state = self.config, self.state
        # The search scores the weight in use: a stand-in Parameter of the layer's shape where one is
        # in the layer's place (``SparseLinear``, ``SparseConvNd``), else the rule's own (``w`` may be its view).
        forward = state.enter_forward(w if isinstance(w, nn.Parameter) else self.param)
        n, m = state.mask_n(forward.step), config.m
        with torch.no_grad():
            if self.backward == "transposable":
                fmask = bmask = transposable_mask(w, n, m)
            else:
                fmask = nm_mask(w, n, m, dim=1)
                bmask = backward_mask(w, fmask, forward.perm, n, m) if self.backward == "bimask" else fmask
        recipe = Recipe(
            config.srste_lambda,
            state.alpha(forward.step),
            config.grad_prune,
            prune_key(config.seed, state.spec.index),
            state.step_tensor(forward.step),
        )
        with torch.no_grad() if torch.is_inference_mode_enabled() else contextlib.nullcontext():
            if conv is None:
                y = SparseGemm.apply(x, w, bias, fmask, bmask, recipe)
            else:
                y = SparseConv.apply(x, w, bias, fmask, bmask, recipe, conv)
        state.exit_forward(forward)
        return y


def _stands_in(weight: torch.Tensor, param: nn.Parameter) -> bool:
    """Whether a swapped layer's ``weight`` is a stand-in its rule cannot run: a plain tensor or a
    view (``functional_call``'s fast weights; SPEC §10 rewrites Parameters only) or a Parameter of
    another shape. Those run dense; a Parameter of the layer's shape runs on the layer's state."""
    return weight is not param and (not isinstance(weight, nn.Parameter) or weight.shape != param.shape)


class SparseLinear(nn.Module):
    """An ``nn.Linear`` replacement holding the same parameters, run through ``SparseGemm``."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.rule: _Rule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _stands_in(self.weight, self.rule.param):
            return F.linear(x, self.weight, self.bias)
        return self.rule(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        c = self.rule.config
        return f"{self.in_features}, {self.out_features}, {c.n}:{c.m}, backward={self.rule.backward}"


class SparseConvNd(nn.Module):
    """An ``nn.Conv1d/2d/3d`` replacement holding the same parameters, run through ``SparseConv``."""

    def __init__(self, conv: nn.modules.conv._ConvNd) -> None:
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.dilation, self.groups = list(conv.stride), list(conv.dilation), conv.groups
        self.padding, self.padding_mode = conv.padding, conv.padding_mode
        self.kernel_size = conv.kernel_size
        self._reversed_padding_repeated_twice = conv._reversed_padding_repeated_twice
        self.rule: _Rule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        geometry = (self.stride, padding, self.dilation, self.groups)
        if _stands_in(self.weight, self.rule.param):
            return _CONV[self.weight.dim() - 2](x, self.weight, self.bias, *geometry)
        return _conv_call(self.rule, x, self.weight, self.bias, *geometry)

    def extra_repr(self) -> str:
        c = self.rule.config
        return f"{tuple(self.weight.shape)}, {c.n}:{c.m}, backward={self.rule.backward}, groups={self.groups}"


def swaps_dims(name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
    """Whether ``W.<name>(*args, **kwargs)`` swaps the dims of a 2-D ``W``: ``t``, ``T``, ``mT``,
    ``transpose(0, 1)``, ``permute(1, 0)``, with negative dims or keywords. A GEMM through one uses
    ``W`` as ``[out, in]``; the backend's target search and the reference ask this one function."""
    if name in ("t", "T", "mT"):
        return True
    if name == "transpose":
        dims = [args[i] if len(args) > i else kwargs.get(key) for i, key in enumerate(("dim0", "dim1"))]
        return all(type(d) is int for d in dims) and sorted(d % 2 for d in dims) == [0, 1]
    if name == "permute":
        dims = kwargs.get("dims", args[0] if len(args) == 1 and type(args[0]) is not int else args)
        return all(type(d) is int for d in dims) and [d % 2 for d in dims] == [1, 0]
    return False


def _conv_call(rule: _Rule, x: torch.Tensor, weight: torch.Tensor, bias: Any, stride: Any, padding: Any,
               dilation: Any, groups: int) -> torch.Tensor:  # fmt: skip
    """``rule``'s sparse ``F.conv1d/2d/3d(x, weight, bias, stride, padding, dilation, groups)``: an
    unbatched input (one sample ``[C, *spatial]``), int or per-dim sizes, ``"same"``/``"valid"``."""
    dims = weight.dim() - 2
    stride, dilation = ([v] * dims if isinstance(v, int) else list(v) for v in (stride, dilation))
    unbatched = x.dim() == weight.dim() - 1
    if unbatched:
        x = x.unsqueeze(0)
    padding, pad = conv_padding(padding, weight.shape[2:], dilation)
    if pad is not None:
        x = F.pad(x, pad)
    y = rule(x, weight, bias, (stride, padding, dilation, groups))
    return y.squeeze(0) if unbatched else y


# The operands of each GEMM by name, as torch's signatures call them (the backend reads them so too).
GEMM_ARGS = {"linear": ("input", "weight", "bias"), "mm": ("input", "mat2"), "matmul": ("input", "other"),
             "addmm": ("input", "mat1", "mat2")}  # fmt: skip
_GEMM_FUNCS = {torch.mm: GEMM_ARGS["mm"], torch.Tensor.mm: GEMM_ARGS["mm"], torch.matmul: GEMM_ARGS["matmul"],
               torch.linalg.matmul: GEMM_ARGS["matmul"],
               torch.Tensor.matmul: GEMM_ARGS["matmul"], torch.Tensor.__matmul__: GEMM_ARGS["matmul"],
               torch.addmm: GEMM_ARGS["addmm"], torch.Tensor.addmm: GEMM_ARGS["addmm"]}  # fmt: skip
_TRANSPOSE_FUNCS = {torch.t: "t", torch.Tensor.t: "t", torch.transpose: "transpose",
                    torch.Tensor.transpose: "transpose", torch.permute: "permute", torch.Tensor.permute: "permute",
                    torch.Tensor.T.__get__: "T", torch.Tensor.mT.__get__: "mT"}  # fmt: skip
_CONV_FUNCS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_CONV_SIGNATURE = inspect.signature(lambda input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1: None)


_LINEAR_FUNCS = {F.linear, torch._C._nn.linear}
# Tensor methods that return their tensor itself where nothing changes (the backend looks through them).
CASTS = frozenset({"to", "type", "type_as", "float", "double", "half", "bfloat16", "contiguous", "cpu", "cuda"})


def holds_tensor(value: Any) -> bool:
    """Whether an op's result is, or holds, a tensor: one that does not (``W.size()``, ``W.is_leaf``,
    ``torch.numel(W)``, a hook handle) only read metadata, which dynamo folds out of the graph."""
    return isinstance(value, torch.Tensor) or (
        isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value)
    )


class _GemmInterceptor(TorchFunctionMode):
    """Routes GEMMs on eligible weights through their rules (a swapped module's weight used outside
    the module, through the module's):
    ``F.linear(x, W, b)`` (``[out, in]``), ``mm``/``matmul``/``addmm``/``@`` whose right operand
    is ``W`` (``[in, out]`` layout) or its transpose (``W.t()``, ``W.T``, ``W.mT``, ``W.permute(1, 0)``:
    ``[out, in]`` layout), and ``F.conv1d/2d/3d(x, W, ...)``. Counts every other op on a weight as
    a use of it (``_other_op``)."""

    def __init__(self, candidates: dict[int, nn.Parameter], make_rule: Callable[..., Any], uses: _ForwardUses) -> None:
        super().__init__()
        self.candidates = candidates
        self.make_rule = make_rule
        self.uses = uses
        self.rules: dict[tuple[int, str, int], Any] = {}
        self.views: dict[int, tuple[torch.Tensor, nn.Parameter]] = {}

    def _candidate(self, t: Any) -> nn.Parameter | None:
        p = self.candidates.get(id(t))
        return p if p is t else None

    def _rule(self, param: nn.Parameter, layout: str, groups: int = 1) -> Any:
        """``param``'s rule for a GEMM of ``layout`` and ``groups``; ``None`` where that GEMM is not
        eligible (it runs dense, through ``_other_op``)."""
        key = (id(param), layout, groups)
        if key not in self.rules:
            self.rules[key] = self.make_rule(param, layout, groups)
        return self.rules[key]

    def _transposes(self, func: Callable, args: tuple, kwargs: dict) -> bool:
        """Whether ``func(*args, **kwargs)`` is the transpose of a 2-D candidate weight."""
        param = self._candidate(args[0]) if args else None
        return param is not None and param.dim() == 2 and swaps_dims(_TRANSPOSE_FUNCS[func], args[1:], kwargs)

    def _attention(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        """``nn.MultiheadAttention``: its projections are GEMMs on weights to route, but torch runs
        the fused function without this mode; so run PyTorch's formula, decomposed, under it."""
        from nmcompile.passes.decompose import mha_plan

        arguments = inspect.signature(func).bind(*args, **kwargs).arguments
        fn, inputs, _ = mha_plan(arguments, value=lambda t: t)
        if fn is None:
            return self._other_op(func, args, kwargs)
        with self:
            return fn(*inputs)

    def __torch_function__(self, func, types_, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func in _TRANSPOSE_FUNCS and self._transposes(func, args, kwargs):
            out = func(*args, **kwargs)
            self.views[id(out)] = (out, args[0])
            return out
        if func in _CONV_FUNCS:
            a = _CONV_SIGNATURE.bind(*args, **kwargs).arguments
            param = self._candidate(a["weight"])
            if param is not None and param.dim() == _CONV_FUNCS[func] + 2:
                groups = a.get("groups", 1)
                rule = self._rule(param, "out_in", groups)
                if rule is not None:
                    conv = [a.get(k, d) for k, d in (("stride", 1), ("padding", 0), ("dilation", 1))]
                    return _conv_call(rule, a["input"], param, a.get("bias"), *conv, groups)
        if func is F.multi_head_attention_forward:
            return self._attention(func, args, kwargs)
        if func in _LINEAR_FUNCS:
            given = dict(zip(GEMM_ARGS["linear"], args, strict=False)) | kwargs
            param, layout = self._operand(given.get("weight"), "out_in")
            rule = self._rule(param, layout) if param is not None else None
            if rule is not None:
                return rule(given.get("input"), param if layout == "out_in" else param.t(), given.get("bias"))
        if func in _GEMM_FUNCS:
            return self._gemm(func, args, kwargs)
        return self._other_op(func, args, kwargs)

    def _other_op(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        """Run ``func`` as it is. Where it takes a candidate weight (or a transpose of one), that is
        a use of the weight besides its GEMM (SPEC §10: used by more than one node, the weight is
        dense), as the graph the backend reads has it: a dense GEMM, ``W.square()`` in a penalty,
        an in-place ``W.clamp_()``, ``F.embedding`` of a weight that a head reuses. Not a use: an op
        whose result holds no tensor (``W.size()``, ``W.is_leaf``), and a cast of the weight (or its
        transpose) that returns it itself, or ``requires_grad_``, which the backend looks through."""
        out = func(*args, **kwargs)
        if not holds_tensor(out):
            return out
        name = getattr(func, "__name__", None)
        itself = args[0] if args and out is args[0] and (name in CASTS or name == "requires_grad_") else None
        used = {}
        for value in itertools.chain(args, kwargs.values()):
            for item in value if isinstance(value, (list, tuple)) else (value,):
                param, _ = self._operand(item, "out_in")
                if param is not None and param.requires_grad and item is not itself:
                    used[id(param)] = param
        for param in used.values():
            self.uses.is_dense(param, None)
        return out

    def _gemm(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        """``mm``/``matmul``/``addmm``/``@``, operands given by position or keyword, through the rule of
        a 2-D candidate right operand; dense with ``beta``/``alpha`` or another weight."""
        names = _GEMM_FUNCS[func]
        given = dict(zip(names, args, strict=False)) | kwargs
        if len(args) <= len(names) and given.keys() == set(names):
            bias, a, b = (given["input"] if len(names) == 3 else None, given[names[-2]], given[names[-1]])
            param, layout = self._operand(b, "in_out")
            rule = self._rule(param, layout) if param is not None and param.dim() == 2 else None
            if rule is not None:
                out = rule(a, param if layout == "out_in" else param.t(), None)
                return out if bias is None else add_bias(bias, out)
        return self._other_op(func, args, kwargs)

    def _operand(self, operand: Any, layout: str) -> tuple[nn.Parameter | None, str]:
        """The candidate parameter behind a GEMM's weight operand and its layout: ``layout`` where
        the operand is the parameter, the other one where it is the parameter's transpose."""
        param = self._candidate(operand)
        if param is not None:
            return param, layout
        view = self.views.get(id(operand))
        if view is not None and view[0] is operand:
            return view[1], "in_out" if layout == "out_in" else "out_in"
        return None, layout


def add_bias(bias: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``addmm``'s bias added to the sparse GEMM's output in that output's dtype: under autocast
    the sum stays in the autocast dtype, as dense ``addmm`` returns it (an fp32 bias promoted it)."""
    return bias.to(out.dtype) + out


def _route_gemms(module: nn.Module, mode: _GemmInterceptor, config: SparsityConfig) -> None:
    """Run ``module.forward`` under ``mode`` where it is not active already (a submodule called in the
    model's forward); transposed views are forgotten after the call that entered it. The routed
    forward carries ``config``, which a later ``sparsify`` checks its own against."""
    forward: Callable = module.forward

    @functools.wraps(forward)
    def routed(*args: Any, **kwargs: Any) -> Any:
        if any(active is mode for active in torch.overrides._get_current_function_mode_stack()):
            return forward(*args, **kwargs)
        try:
            with mode:
                return forward(*args, **kwargs)
        finally:
            mode.views.clear()

    routed.nmsparse_config = config  # type: ignore[attr-defined]
    module.forward = routed


def _earlier_options(model: nn.Module) -> set[SparsityConfig]:
    """The options an earlier ``sparsify`` gave ``model``: its swapped layers' and routed forwards'."""
    found = set()
    for module in model.modules():
        forward = module.__dict__.get("forward")  # set on the instance: a routed forward, or a layer model's
        for holder in (module, getattr(forward, "__self__", None)):
            if isinstance(holder, (SparseLinear, SparseConvNd)) and hasattr(holder, "rule"):
                found.add(holder.rule.config)
        if hasattr(forward, "nmsparse_config"):
            found.add(forward.nmsparse_config)
    return found


def _eligible_backward(
    weight: nn.Parameter, rows: int, cols: int, groups: int, config: SparsityConfig, tied: bool, name: str
) -> str | None:
    """The backward mode for a weight with ``rows`` = O and ``cols`` = K (per group), or ``None``
    if it stays dense (SPEC §10; a grouped conv needs ``O/groups`` divisible by ``m`` too)."""
    if tied or weight.dtype not in FLOAT_DTYPES or not weight.numel():  # a frozen weight: dense at the call
        return None
    if config.name_filter_reason(name) is not None or cols % config.m:
        return None
    if (rows // groups) % config.m:
        return None if groups > 1 else "dense"
    return config.backward


def sparsify(model: nn.Module, **options: Any) -> nn.Module:
    """Make ``model`` train with N:M sparse GEMMs in eager mode, in place; returns ``model``.

    ``nn.Linear`` and ``nn.Conv1d/2d/3d`` children are swapped for ``SparseLinear`` and
    ``SparseConvNd`` (transposed convolutions stay dense; a model that is such a layer runs its
    sparse forward in place). Every other weight (``nn.MultiheadAttention``'s projections, GPT-2's
    ``Conv1D``, a raw convolution kernel) is routed through the same rule while ``model``'s forward
    runs: as the weight of ``F.linear`` (``W.t()`` there: ``[in, out]``) or ``F.conv1d/2d/3d``, or the right operand of
    ``mm``/``matmul``/``addmm``/``@`` (``W``: ``[in, out]``; ``W.t()``, ``W.T``, ``W.mT``,
    ``W.permute(1, 0)``: ``[out, in]``), as is a swapped module's weight used outside the module,
    through the module's rule. Options as ``SparsityConfig``.
    Do not deep-copy (or pickle) a model after ``sparsify``: the routed forward keeps its rules.
    A second call with the same options changes nothing; with others it raises ``ValueError``.
    A ``torch.func.functional_call`` stand-in Parameter of a swapped layer's shape runs on the layer's
    own state here, and counts its steps, where the backend gives it a state of its own; a
    plain-tensor or view stand-in (fast weights) runs dense in both (README, "Checkpoints": other
    new Parameters in a layer's place).
    """
    from nmcompile.state import DEFAULT_REGISTRY, LayerSpec

    config = SparsityConfig.from_options(options)
    earlier = ", ".join(map(str, _earlier_options(model) - {config}))
    if earlier:
        raise ValueError(
            f"reference.sparsify: the model is sparsified already, with other options ({earlier}), "
            "which the layers it changed keep: sparsify a fresh copy of the dense model"
        )
    lazy = [name for name, p in model.named_parameters() if nn.parameter.is_lazy(p)]
    if lazy:
        raise ValueError(
            f"reference.sparsify: {', '.join(lazy)} uninitialized (a lazy module): run one forward first, "
            "which gives them their shapes and the module its class"
        )
    registry = DEFAULT_REGISTRY
    index = {id(p): i for i, (_, p) in enumerate(model.named_parameters())}
    counts: dict[int, int] = {}  # modules holding each parameter: a module under two names is one
    for module in model.modules():
        for p in module.parameters(recurse=False):
            counts[id(p)] = counts.get(id(p), 0) + 1
    uses = _ForwardUses(model, registry)

    def rule_for(name: str, weight: nn.Parameter, layout: str, owner: nn.Module, groups: int = 1) -> _Rule | None:
        rows, cols = (weight.shape[1], weight.shape[0]) if layout == "in_out" else weight.shape[:2]
        backward = _eligible_backward(weight, rows, cols, groups, config, counts[id(weight)] > 1, name)
        if backward is None:
            return None
        spec = LayerSpec(name, index[id(weight)], rows, backward, layout, groups, config)
        return _Rule(lambda: registry.get_or_create(weight, spec, owner), weight, backward, config, uses)

    others: dict[int, tuple[str, nn.Parameter, nn.Module]] = {}  # 2-D weights no swapped module owns
    # a swapped module's weight -> the weight, its rule, groups, name, and the module in its place
    swapped: dict[int, tuple[nn.Parameter, _Rule, int, str, nn.Module]] = {}
    placed: dict[int, nn.Module] = {}  # id of each module seen -> the module in its place, for its other names
    for mod_name, module in list(model.named_modules(remove_duplicate=False)):
        if id(module) in placed:  # a module under a second name: whatever replaced it goes there too
            if placed[id(module)] is not module:
                _replace(model, mod_name, placed[id(module)])
            continue
        placed[id(module)] = module
        prefix = f"{mod_name}." if mod_name else ""
        swap = {nn.Linear: SparseLinear, nn.Conv1d: SparseConvNd, nn.Conv2d: SparseConvNd, nn.Conv3d: SparseConvNd}
        if type(module) in swap and id(module.weight) in index:  # not a computed weight (old weight_norm)
            new = swap[type(module)](module)  # owns the state: model.eval() reaches it
            _take_module_state(module, new)
            owner = new if mod_name else model  # the model is the layer: it keeps its class, runs new's forward
            registry.rehome(module, owner)  # a checkpoint loaded before sparsify is held for the old module
            rule = rule_for(prefix + "weight", module.weight, "out_in", owner, getattr(module, "groups", 1))
            if rule is None:
                registry.rehome(owner, module)
            else:
                new.rule = rule
                swapped[id(module.weight)] = (
                    module.weight,
                    rule,
                    getattr(module, "groups", 1),
                    prefix + "weight",
                    owner,
                )
                if mod_name:
                    _replace(model, mod_name, new)
                    placed[id(module)] = new
                else:
                    model.forward = new.forward
            continue
        for pname, p in module.named_parameters(recurse=False):
            if 2 <= p.dim() <= 5 and id(p) not in others:  # matrices, and F.conv1d/2d/3d weights
                others[id(p)] = (prefix + pname, p, module)
    if others or swapped:

        def make_rule(p: nn.Parameter, layout: str, groups: int) -> _Rule | None:
            """A weight's rule for a GEMM of ``layout`` and ``groups``; a swapped module's weight used
            outside the module (``F.linear(x, fc.weight)``) shares the module's rule where the GEMM is
            the module's own kind, and has a rule (and state) of its own otherwise (``x @ fc.weight``)."""
            if id(p) in swapped:
                _, rule, own_groups, name, owner = swapped[id(p)]
                if (layout, groups) == ("out_in", own_groups):
                    return rule
            else:
                name, _, owner = others[id(p)]
            rule = rule_for(name, p, layout, owner, groups)
            registry.warn_restarted()
            return rule

        candidates = {key: p for key, (_, p, _) in others.items()} | {key: p for key, (p, *_) in swapped.items()}
        mode = _GemmInterceptor(candidates, make_rule, uses)
        # The model, and each module holding a weight the mode routes: an activation checkpoint reruns
        # a block's forward in the backward, outside the model's (nn.MultiheadAttention's projections).
        owners = {id(module): module for _, _, module in others.values() if module is not model}
        for module in (model, *owners.values()):
            _route_gemms(module, mode, config)
    registry.warn_restarted()
    return model


# What a swapped-in layer takes from the module it replaces besides its parameters: training mode,
# buffers and every hook (forward, backward, state_dict).
_MODULE_STATE = tuple(key for key in vars(nn.Module()) if key not in ("_parameters", "_modules"))


def _take_module_state(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` the ``_MODULE_STATE`` of ``old``, the same dicts (the user's hook handles still
    remove their hooks); a hook that torch called with ``old`` (``register_load_state_dict_pre_hook``
    wraps it with a weak reference to its module) is called with ``new``."""
    for key in _MODULE_STATE:
        value = getattr(old, key)
        if isinstance(value, dict):
            for hook_id, hook in value.items():
                if isinstance(hook, _WrappedHook) and hook.with_module and hook.module() is old:
                    value[hook_id] = _WrappedHook(hook.hook, new)
        setattr(new, key, value)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# --- SPEC §8: schedules -------------------------------------------------------------------------


def effective_n(config: Any, step: int) -> int:
    """N in force at training step ``step``: with structure decay, ``m`` (dense) before
    ``dense_steps``, then the sequence above over equal frames up to ``total_steps −
    finetune_steps``; else ``n`` (mask decay's masks keep it: ``α = 1`` makes them dense)."""
    if step < config.dense_steps and config.structure_decay:
        return config.m
    if not config.structure_decay:
        return config.n
    sequence = structure_sequence(config.n, config.m)
    span = config.total_steps - config.finetune_steps - config.dense_steps
    frame = (step - config.dense_steps) * len(sequence) // span
    return sequence[min(frame, len(sequence) - 1)]


def decay_alpha(config: Any, step: int) -> float:
    """SPEC §8 mask decay factor ``α(t)`` (``t`` counted from ``dense_steps``; 1 before it)."""
    t = step - config.dense_steps
    if t < 0:
        return 1.0
    if config.mask_decay == "linear":
        return max(0.0, 1.0 - config.mask_decay_rate * t)
    return math.exp(-config.mask_decay_rate * t)


# --- SPEC §7: minimum-variance unbiased gradient pruning ----------------------------------------

MVUE_RULES = {"mvue12": (1, 2, 1), "mvue24": (2, 4, 1), "mvue24_approx": (2, 4, 2)}  # n, m, uniforms/block
_M32 = 0xFFFFFFFF


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """``h · c mod 2³²`` for int64 ``h < 2³²`` without overflowing int64."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) on int64 tensors holding values below 2³²."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x7FEB352D)
    h = h ^ (h >> 15)
    h = _mul32(h, 0x846CA68B)
    return h ^ (h >> 16)


def prune_key(seed: int, layer_index: int) -> int:
    """The 32-bit key of a layer's MVUE random stream, from ``(seed, layer index)``."""
    digest = hashlib.blake2b(f"mvue:{seed}:{layer_index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def counter_uniforms_at(key: int, step: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Entries ``index`` (int64, any shape) of the uniform stream in ``[0, 1)`` of ``(key, step)``: a
    counter-based hash of ``(key, step, index)``.

    Pure tensor arithmetic: the same numbers eagerly and inside a compiled graph, on any device,
    with no generator state, so a resumed run or another rank draws them again (SPEC §5, §7).
    """
    step_seed = _mix32((step.to(device=index.device, dtype=torch.int64) & _M32) ^ key)
    h = _mix32(_mix32((index & _M32) ^ step_seed) ^ (index >> 32))
    return (h >> 8).to(torch.float32) * (2.0**-24)


def counter_uniforms(key: int, step: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` uniforms of the stream of ``(key, step)`` (``counter_uniforms_at``)."""
    return counter_uniforms_at(key, step, torch.arange(count, dtype=torch.int64, device=step.device))


_Columns = tuple[torch.Tensor, ...]  # a block's entries, one tensor each (entry i of every block)


# ``mvue24`` samples a block as dominant once its largest entry passes this share of the others' sum.
NEAR_TIE = 1 - 2**-18


def _last_positive(p: _Columns, otherwise: torch.Tensor) -> torch.Tensor:
    """Index of the last entry with ``p > 0`` (``otherwise`` where none is)."""
    index = otherwise
    for i, p_i in enumerate(p):
        index = torch.where(p_i > 0, i, index)
    return index


def _cover(p: _Columns, u: torch.Tensor, last: torch.Tensor, second_unit: bool = False) -> torch.Tensor:
    """Index of the interval holding ``u`` (``u + 1`` with ``second_unit``) when a block's ``p``
    are laid end to end, the ends summed in order in fp32 (as the kernels do). ``end − 1 ≤ u``
    stands for ``end ≤ u + 1`` (exact, where ``u + 1`` would round); a point past the rounded ends
    falls in ``last`` (the last entry with ``p > 0``), never in an entry of probability 0."""
    index, end = torch.zeros_like(u, dtype=torch.int64), torch.zeros_like(u)
    for p_i in p[:-1]:
        end = end + p_i
        index += (end - 1 if second_unit else end) <= u
    return torch.minimum(index, last)


def _choose(index: torch.Tensor, x: _Columns) -> torch.Tensor:
    """``x[index]`` per block."""
    out = x[-1]
    for i in range(len(x) - 2, -1, -1):
        out = torch.where(index == i, x[i], out)
    return out


def _ratio(x: torch.Tensor, y: torch.Tensor, otherwise: float) -> torch.Tensor:
    """``x / y``, ``otherwise`` where ``y`` is 0."""
    return torch.where(y > 0, x / torch.where(y > 0, y, 1.0), otherwise)


def _divided(a: torch.Tensor, p: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``a / p`` where ``kept`` and ``p > 0``, else 0."""
    return torch.where(kept, _ratio(a, p, 0.0), 0.0)


def _mvue12(a: _Columns, u: _Columns) -> _Columns:
    mag = [x.abs() for x in a]
    total = mag[0] + mag[1]
    keep_first = u[0] < _ratio(mag[0], total, 0.0)
    return (
        torch.where(keep_first, torch.sign(a[0]) * total, 0.0),
        torch.where(keep_first, 0.0, torch.sign(a[1]) * total),
    )


def _sums(x: _Columns) -> tuple[torch.Tensor, _Columns]:
    """The total of each block of 4 and, for each entry, the sum of the other three, both from the
    pair sums ``x0 + x1``, ``x2 + x3``: summed, not the total less the entry, which cancels when the
    entry dominates (a biased MVUE). The kernels (``common._sums4``) add in the same order."""
    x0, x1, x2, x3 = x
    s01, s23 = x0 + x1, x2 + x3
    return s01 + s23, (x1 + s23, x0 + s23, s01 + x3, s01 + x2)


def _mvue24(a: _Columns, u: _Columns) -> _Columns:
    """SPEC §7 optimal 2:4. A block whose largest entry is within 2⁻¹⁸ of the sum of the others
    (``NEAR_TIE``) is sampled as dominant: still unbiased, its variance off the optimum by about
    2⁻¹⁸, and with that margin fp32 rounding of the interval ends can neither keep one entry twice
    nor drop the dominant one (at an exact tie both cases keep the same)."""
    mag = [x.abs() for x in a]
    total, others = _sums(mag)
    top = torch.maximum(torch.maximum(mag[0], mag[1]), torch.maximum(mag[2], mag[3]))
    top_index = torch.full_like(top, 3, dtype=torch.int64)
    for i in (2, 1, 0):  # the first maximum (which one does not matter: either way the rule is unbiased)
        top_index = torch.where(mag[i] == top, i, top_index)
    rest = _choose(top_index, others)
    dominant = top > rest * NEAR_TIE
    kept_whole = [dominant & (top_index == i) for i in range(4)]
    p = [
        torch.where(kept_whole[i], 1.0, torch.where(dominant, _ratio(m, rest, 1 / 3), _ratio(2 * m, total, 0.5)))
        for i, m in enumerate(mag)
    ]
    # Laid end to end: a dominant entry's others fill one unit (it is kept at the second point).
    laid = [torch.where(w, 0.0, p_i) for w, p_i in zip(kept_whole, p, strict=True)]
    last = _last_positive(laid, top_index)
    first = _cover(laid, u[0], last)
    second = torch.where(dominant, top_index, _cover(laid, u[0], last, second_unit=True))
    return tuple(_divided(a[i], p[i], (first == i) | (second == i)) for i in range(4))


def _mvue24_approx(a: _Columns, u: _Columns) -> _Columns:
    mag = [x.abs() for x in a]
    total, others = _sums(mag)  # others_i = (1 − p_i) · total, without the cancellation of 1 − p_i
    p = [_ratio(m, total, 0.25) for m in mag]
    first = _cover(p, u[0], _last_positive(p, torch.zeros_like(u[0], dtype=torch.int64)))
    left = _choose(first, others)
    q = [torch.where(first == i, 0.0, _ratio(m, left, 1 / 3)) for i, m in enumerate(mag)]
    second = _cover(q, u[1], _last_positive(q, first))
    # P(i first) + Σ_j P(j first, then i), with p_j / (1 − p_j) as mag_j / others_j
    beside = _sums([_ratio(m, o, 0.0) for m, o in zip(mag, others, strict=True)])[1]
    inclusion = [p_i + p_i * s_i for p_i, s_i in zip(p, beside, strict=True)]
    return tuple(_divided(a[i], inclusion[i], (first == i) | (second == i)) for i in range(4))


_MVUE = {"mvue12": _mvue12, "mvue24": _mvue24, "mvue24_approx": _mvue24_approx}


def _unsampled_where_not_finite(a: _Columns, pruned: _Columns) -> _Columns:
    """``pruned``, except in blocks whose magnitudes do not sum to a finite fp32 (a NaN or inf entry,
    or entries past fp32's range together): no draw is unbiased there, so such a block comes out as
    its total (NaN or inf, with ``a_0``'s sign) at its first entry and 0 elsewhere. A non-finite
    ``dY`` thus reaches ``dW`` in every draw, as in a dense step, where ``GradScaler`` sees it."""
    total = a[0].abs() + a[1].abs() if len(a) == 2 else _sums([x.abs() for x in a])[0]  # as the rules sum it
    finite = total < torch.inf
    first = torch.where(finite, pruned[0], torch.where(a[0] < 0, -total, total))
    return (first, *(torch.where(finite, p, 0.0) for p in pruned[1:]))


def mvue_prune_with(
    grad: torch.Tensor, rule: str, dim: int, uniforms: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """SPEC §7 ``rule`` on blocks of ``m`` consecutive entries along ``dim`` (zero-padded at the end,
    never dropped); ``uniforms(index)`` supplies the random numbers at the stream positions
    ``index`` (int64), ``k`` per block in block order (the blocks of ``grad.movedim(dim, -1)`` in
    memory order): block ``b`` of column ``o`` (of ``B`` blocks a column) draws ``(o·B + b)·k + j``.

    The rules run on the blocks' entries as ``m`` strided views (entry ``i`` of every block), so
    every step is elementwise over whole tensors: no per-block reductions, gathers or scatters. The
    positions are laid out as the blocks are, so a compiled graph hashes its uniforms where it uses
    them, without a transpose (the CPU's ``mvue12`` ran 7 times slower through one).
    """
    _, m, k = MVUE_RULES[rule]
    moved = grad.movedim(dim, 0)
    size, rest = moved.shape[0], moved.shape[1:]
    count, ones = (size + -size % m) // m, (1,) * len(rest)
    blocks = F.pad(moved, (0, 0) * len(rest) + (0, -size % m)).reshape(count, m, *rest)  # no branch on a symbolic size
    column = torch.arange(rest.numel(), dtype=torch.int64, device=grad.device).reshape(rest)
    block = torch.arange(count, dtype=torch.int64, device=grad.device).reshape(count, *ones)
    draw = torch.arange(k, dtype=torch.int64, device=grad.device).reshape(k, 1, *ones)
    u = uniforms((column * count + block) * k + draw).to(grad.device).unbind(0)
    a = tuple(x.float() for x in blocks.unbind(1))
    pruned = _unsampled_where_not_finite(a, _MVUE[rule](a, u))
    out = torch.stack([x.to(grad.dtype) for x in pruned], dim=1).reshape(count * m, *rest)
    return out[:size].movedim(0, dim)


def mvue_prune(
    grad: torch.Tensor, n: int, m: int, dim: int = 0, generator: torch.Generator | None = None, approx: bool = False
) -> torch.Tensor:
    """Minimum-variance unbiased N:M pruning of ``grad`` (SPEC §7): ``1:2``, or ``2:4`` (optimal, or
    ``approx=True`` for the two-draw rule), in blocks of ``m`` consecutive entries along ``dim``.

    ``E[mvue_prune(g)] = g`` elementwise; each block keeps ``n`` entries (all its nonzeros where it has fewer),
    a block whose magnitudes sum to NaN or inf only that sum, at its first entry.
    """
    rule = {(1, 2): "mvue12", (2, 4): "mvue24_approx" if approx else "mvue24"}.get((n, m))
    if rule is None or (approx and rule != "mvue24_approx"):
        raise ValueError(f"mvue_prune supports 1:2 and 2:4 (approx only for 2:4), got {n}:{m} approx={approx}")
    device = generator.device if generator else grad.device  # a generator's draws come from its own device
    return mvue_prune_with(
        grad, rule, dim, lambda index: torch.rand(index.numel(), generator=generator, device=device)[index.to(device)]
    )
