"""Custom ops of the rewritten graphs (namespace ``nmsparse``) and the autograd of the sparse GEMM.

``nm_mask`` is a composite op (aten ops Inductor fuses); ``transposable_mask`` an opaque mask node.
``sparse_linear`` is the N:M GEMM ``Y = X (W⊙F)ᵀ + b`` (``cpu_linear`` the same op, whose forward
AOTAutograd inlines where the C mask kernels run) and ``sparse_conv`` its convolution twin;
their backward is plain torch code traced by AOTAutograd, each step wrapped in
``fx.traceback.annotate`` so the backward graph shows it as its own, named node
(``<layer>_bwd_perm``, ``<layer>_bwd_mask``, ...; see ``passes.name_nodes``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch._prims_common import make_channels_last_strides_for, make_contiguous_strides_for, suggest_memory_format
from torch.fx.traceback import annotate

from nmcompile import reference

NAME_KEY = "nmsparse"


FORWARD_NAME_KEY = "nmsparse_forward"
"""The key of ``inline_linear_forward``'s annotations. AOTAutograd copies the annotation of a
forward op's first node onto every backward node of that op, its own key winning, so the forward
steps of the sparse GEMM, inlined, need a key the backward's own (``NAME_KEY``) does not share."""


def role(layer: str, what: str, key: str = NAME_KEY) -> dict[str, str]:
    """The annotation that names a node ``<layer>_<what>`` in the rewritten graphs."""
    return {key: f"{layer}_{what}"}


def node_role(node: torch.fx.Node) -> str | None:
    """The ``<layer>_<what>`` a node of a rewritten graph is named by: its own annotation, or on a node
    of the forward, that of the inlined forward GEMM (backward nodes carry a copy of it)."""
    custom = node.meta.get("custom")
    if not isinstance(custom, dict):
        return None
    if NAME_KEY in custom:
        return custom[NAME_KEY]
    return custom.get(FORWARD_NAME_KEY) if node.meta.get("partitioner_tag") != "is_backward" else None


HOST_READ = (torch.Tag.cudagraph_unsafe,)
"""Tags of the ops that take the step or the N in force as a CPU tensor: most read it on the host,
where a CUDA graph (``mode="reduce-overhead"``) would replay the value it recorded, and the portable
``sparse_linear``/``sparse_conv`` only carry it to their backward, but a CPU input inside a CUDA
graph partition is itself unsafe (pytorch/pytorch#190233). So Inductor keeps them out of its graphs
and runs them each step, graphing the rest."""

_LIBRARY = torch.library.Library("nmsparse", "FRAGMENT")


def gradless_op(name: str) -> Callable[[Callable[..., torch.Tensor]], torch._ops.OpOverload]:
    """Decorator: ``fn`` as the op ``nmsparse::<name>`` (schema from its annotations, tagged ``HOST_READ``),
    for a step the graphs never differentiate (a mask; a GEMM of the backward). Its autograd key falls
    through, so outputs carry no history (a double backward through an eager call drops its term;
    compiled graphs refuse double backward), and a call skips ``torch.library.custom_op``'s Python
    autograd wrapper, which runs even under ``no_grad``: 7 µs of the 17 µs a ``cpu_masked_weight`` call
    took (2-core AMD EPYC, torch 2.13), several calls per layer and step. Returns the op overload."""

    def define(fn: Callable[..., torch.Tensor]) -> torch._ops.OpOverload:
        def kernel(*args: Any, **kwargs: Any) -> torch.Tensor:
            with torch._C._AutoDispatchBelowAutograd():  # the torch ops inside record nothing either
                return fn(*args, **kwargs)

        schema = torch.library.infer_schema(fn, mutates_args=())
        _LIBRARY.define(f"{name}{schema}", tags=(torch.Tag.pt2_compliant_tag, *HOST_READ))
        _LIBRARY.impl(name, kernel, "CompositeExplicitAutograd")
        _LIBRARY.impl(name, torch.library.fallthrough_kernel, "Autograd")
        packet, _, overload = name.partition(".")
        return getattr(getattr(torch.ops.nmsparse, packet), overload or "default")

    return define


NO_GRAD_OVERLOADS: dict[torch._ops.OpOverload, torch._ops.OpOverload] = {}
"""Each sparse GEMM op (``sparse_linear``, ``sparse_conv``, the lowered ``triton_linear`` and
``sparse24_linear``; ``gemm_op``) mapped to its ``nograd`` overload, for AOTAutograd's decomposition
table (``backend._decompositions``). The table sits below the op's autograd, which still traces the
sparse backward, so the compiled graphs call the overload: the same function, without
``custom_op``'s Python autograd wrapper: 11 µs per layer and step (2-core AMD EPYC, torch 2.13)."""


_LIBRARY.define("nm_mask(Tensor a, int n, int m, int dim, Tensor? n_eff=None) -> Tensor")


@torch.library.impl(_LIBRARY, "nm_mask", "CompositeImplicitAutograd")
def nm_mask(a: torch.Tensor, n: int, m: int, dim: int, n_eff: torch.Tensor | None = None) -> torch.Tensor:
    """SPEC §2 N:M magnitude mask along ``dim``, by rank counting (M comparisons per entry, no sort).

    Entry ``i`` of a group is kept when fewer than ``n`` entries rank above it, where ``j`` ranks
    above ``i`` if ``|a_j| > |a_i|``, or ``|a_j| == |a_i|`` and ``j < i``; NaN ranks as +inf.
    ``n_eff`` (a 0-d tensor) overrides ``n`` where a schedule changes N between steps (SPEC §8).
    Composite (plain aten ops, no sort or ``topk``), so Inductor fuses it into one loop over ``W``.
    """
    if dim % a.dim() == a.dim() - 1 and m <= _UNROLL_M:
        # Groups along the contiguous dim (the forward mask): Inductor's CPU loop over them is
        # scalar code, where int32 counts and a bool stack are cheapest (selects become branches).
        entries, limit = _groups(a, m, dim).unbind(-1), _limit(n, n_eff)
        keep = [_count_above(entries, i, select=False) < limit for i in range(m)]
        return torch.stack(keep, -1).reshape(a.shape)
    return nm_keep(a, n, m, dim, n_eff) > 0


def nm_keep(a: torch.Tensor, n: int, m: int, dim: int, n_eff: torch.Tensor | None = None) -> torch.Tensor:
    """``nm_mask`` as 0/1 floats, for consumers that fuse it into their own loop: Inductor's CPU
    vector code loads and stores bool vectors 10–30x slower than floats."""
    groups, limit = _groups(a, m, dim), _limit(n, n_eff)
    dim %= a.dim()
    if m <= _UNROLL_M:
        entries = groups.unbind(dim + 1)
        keep = [torch.where(_count_above(entries, i, select=True) < limit, 1.0, 0.0) for i in range(m)]
        return torch.stack(keep, dim + 1).reshape(a.shape)
    mine, other = groups.unsqueeze(dim + 2), groups.unsqueeze(dim + 1)  # axes (i, j) at dim + 1, dim + 2
    j = torch.arange(m, device=a.device).reshape(m, *([1] * (a.dim() - dim - 1)))
    above = torch.where(j < j.unsqueeze(1), other >= mine, other > mine)
    return torch.where(torch.where(above, 1.0, 0.0).sum(dim + 2) < limit, 1.0, 0.0).reshape(a.shape)


_UNROLL_M = 8  # up to this M the M·(M−1) comparisons are written out one by one


def _groups(a: torch.Tensor, m: int, dim: int) -> torch.Tensor:
    """``|a|`` (NaN as +inf, SPEC §2, detached) with the groups of ``m`` along ``dim`` on a new axis
    right after it, so memory order is kept."""
    if a.shape[dim] % m:
        raise ValueError(f"nm_mask: dim {dim} of size {a.shape[dim]} is not divisible by m={m}")
    dim %= a.dim()
    mag = a.detach().abs()
    mag = torch.where(mag >= 0, mag, torch.inf)  # only NaN fails; Inductor's CPU isnan is scalar code
    return mag.reshape(*a.shape[:dim], a.shape[dim] // m, m, *a.shape[dim + 1 :])


def n_in_force(n: int, n_eff: torch.Tensor | None) -> int:
    """The N a graph node applies, as a number: ``n_eff`` (structure decay's N of this step, SPEC §8;
    a 0-d CPU tensor, read without a device sync) where given, else ``n``."""
    return int(n_eff) if n_eff is not None else n


def _limit(n: int, n_eff: torch.Tensor | None) -> int | torch.Tensor:
    """The N in force: the schedule's ``n_eff`` where given, else ``n``. ``n_eff`` stays a 0-d CPU
    tensor, which eager and Inductor read as a scalar beside CUDA tensors: a copy to the GPU from
    pageable memory (``.to(device)``) would make each structure-decay step wait for the one before."""
    return n_eff if n_eff is not None else n


def _count_above(entries: tuple[torch.Tensor, ...], i: int, select: bool) -> torch.Tensor:
    """How many entries of each group rank above entry ``i`` (ties go to the lower index), as
    0/1 float selections (``select``: fast in vector code) or int32 casts (fast in scalar code)."""
    above = (other >= entries[i] if j < i else other > entries[i] for j, other in enumerate(entries) if j != i)
    return sum(torch.where(c, 1.0, 0.0) if select else c.to(torch.int32) for c in above)


def fresh_layout(t: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """``t`` with exactly the strides of a new tensor of its shape in ``memory_format``, as the fake
    kernels promise. ``contiguous()`` keeps any stride a dim of size 1 had, and such strides decide
    ``suggest_memory_format``: a 1x1 convolution's ``W ⊙ B`` of strides ``(16, 1, 16, 16)`` (its
    channels-last weight's) made ATen's convolution backward return channels-last where its meta,
    given the fake's ``(16, 1, 1, 1)``, promised NCHW, and Inductor's stride check failed."""
    if memory_format == torch.contiguous_format:
        strides = make_contiguous_strides_for(t.shape)
    else:
        strides = make_channels_last_strides_for(t.shape)
    return t if t.stride() == tuple(strides) else t.clone(memory_format=memory_format)


@gradless_op("transposable_mask")
def transposable_mask(w: torch.Tensor, n: int, m: int, n_eff: torch.Tensor | None = None) -> torch.Tensor:
    """SPEC §4 transposable mask of ``w`` ``[O, K]`` (N:M along both dims); ``n_eff`` as in ``nm_mask``."""
    return fresh_layout(reference.transposable_mask(w, n_in_force(n, n_eff), m))


@torch.library.register_fake(transposable_mask)
def _(w: torch.Tensor, n: int, m: int, n_eff: torch.Tensor | None = None) -> torch.Tensor:
    return torch.empty_like(w, dtype=torch.bool, memory_format=torch.contiguous_format)


@gradless_op("mvue_prune")
def mvue_prune(grad: torch.Tensor, step: torch.Tensor, key: int, rule: str) -> torch.Tensor:
    """SPEC §7 ``rule`` on a 2-D gradient ``[T, O]``, blocks along ``T``; random numbers from the
    counter-based stream ``(key, step)``, so the same step prunes the same way anywhere. On CUDA,
    where Triton is installed, one launch of the Triton MVUE kernel (the same stream; values within
    one rounding): the composite's ~30 passes over a conv's gradient cost a step 100x (H200)."""
    if grad.is_cuda and grad.dim() == 2:
        from nmcompile.kernels import triton_installed  # here, not at import: only CUDA needs the kernels

        if triton_installed():
            from nmcompile.kernels.mvue import mvue_prune as mvue_kernel

            return mvue_kernel(grad, int(step), key, rule)
    return fresh_layout(_mvue_composite(grad, step, key, rule))


def _mvue_composite(grad: torch.Tensor, step: torch.Tensor, key: int, rule: str) -> torch.Tensor:
    """SPEC §7 ``rule`` on ``grad`` ``[T, O]``, blocks along ``T``, as torch ops (the reference's),
    with the counter-based random stream ``(key, step)``."""
    return reference.mvue_prune_with(grad, rule, 0, lambda index: reference.counter_uniforms_at(key, step, index))


@torch.library.register_fake(mvue_prune)
def _(grad: torch.Tensor, step: torch.Tensor, key: int, rule: str) -> torch.Tensor:
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


def _compute_weight(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The (masked) weight in the GEMM's compute dtype, ``x``'s.

    The dtypes differ only under autocast (``find_targets`` leaves a GEMM with a real mismatch as
    traced, where it raises as in eager): only activations and bias are cast on the way in, so that every
    mask is chosen from the parameter's own values (SPEC §2), and the weight meets ``x`` here.
    """
    return weight.to(x.dtype)


def masked_weight(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``W ⊙ mask``: what the graph hands the portable sparse ops in place of the bool mask.

    Their backward reads the mask back as ``masked != 0`` (wrong only where ``W`` is 0, where every
    formula gives the same value), so it loads floats, never bools (slow in Inductor's CPU code).
    """
    return torch.where(mask, weight, 0)


def _decayed(weight: torch.Tensor, masked: torch.Tensor, alpha: torch.Tensor | None) -> torch.Tensor:
    """The GEMM's weight from ``W ⊙ mask``: itself, or with mask decay ``W ⊙ (mask + (1 − mask)·α)`` (SPEC §8)."""
    return masked if alpha is None else torch.where(masked != 0, masked, weight * alpha)


def input_grad_weight(
    weight: torch.Tensor,
    masked: torch.Tensor,
    perm: torch.Tensor | None,
    n: int,
    m: int,
    n_eff: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    layer: str = "",
) -> torch.Tensor:
    """The weight of the input-gradient GEMM ``dX = dY · W_B`` (SPEC §4, §8), ``masked`` = ``W ⊙ F``.

    With ``perm`` (Bi-Mask): ``(W[P] ⊙ Bp)[P⁻¹]``, ``Bp = nm_mask(|W⊙F|[P], dim=0) ∧ F[P]`` (for a
    conv at every ``(c, *k)``), which is ``W ⊙ B``: the GEMM takes the rows back to their places with
    a row gather of the weight instead of a column gather of ``dY``; on the CPU (fp32, M=4) one C
    kernel does it all (``kernels.cpu_mask``). Without ``perm``: ``W ⊙ F``. Mask decay
    lets the masked-out weights in scaled by ``α``. The steps are annotated as ``<layer>_bwd_*`` nodes.
    """
    if perm is not None:  # masked becomes W ⊙ B
        from nmcompile.kernels import cpu_mask

        if cpu_mask.blocker(masked, m) is None:  # CPU, fp32, M=4: the C kernel, gather and scatter included
            with annotate(role(layer, "bwd_mask")):
                masked = torch.ops.nmsparse.cpu_bimask_weight(masked, perm, n, n_eff)
        else:
            with annotate(role(layer, "bwd_perm")):
                kept = masked.index_select(0, perm)
            with annotate(role(layer, "bwd_mask")):
                b_perm = nm_keep(kept, n, m, 0, n_eff) > 0
            with annotate(role(layer, "bwd_input_grad")):
                masked = torch.where(b_perm, kept, 0).index_select(0, torch.argsort(perm))
    with annotate(role(layer, "bwd_input_grad")):
        return _decayed(weight, masked, alpha)


def srste_term(weight: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """SPEC §6's SR-STE direction ``(1 − F) ⊙ W`` from ``masked`` = ``W ⊙ F``."""
    return torch.where(masked != 0, 0, weight)


def _linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    masked: torch.Tensor,
    perm: torch.Tensor | None,
    n: int,
    m: int,
    srste_lambda: float,
    layer: str,
    n_eff: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    step: torch.Tensor | None = None,
    grad_prune: str = "none",
    prune_key: int = 0,
) -> torch.Tensor:
    """``Y = X (W⊙F)ᵀ + b`` for ``W`` ``[O, K]``, ``masked`` = ``W⊙F`` (``W ⊙ (F + (1−F)α)`` with
    mask decay); the backward follows from ``perm`` and the recipe arguments (see ``_sparse_backward``).
    The portable op ``sparse_linear`` (and its ``nograd`` overload, ``NO_GRAD_OVERLOADS``), and
    ``cpu_linear`` where the C mask kernels write ``masked`` for a 2-D ``x`` (``lower_kernels``): the
    same op, whose forward AOTAutograd inlines (``inline_linear_forward``)."""
    return F.linear(x, _compute_weight(_decayed(weight, masked, alpha), x), bias)


def linear_fake(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor | None,
    perm: torch.Tensor | None, n: int, m: int, srste_lambda: float, layer: str, n_eff: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None, step: torch.Tensor | None = None, grad_prune: str = "none", prune_key: int = 0,
) -> torch.Tensor:  # fmt: skip
    """Output metadata of ``sparse_linear`` and of its lowered twins, which share its signature."""
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


_LINEAR_SIGNATURE = inspect.signature(_linear)


def inline_linear_forward(*args: Any, **kwargs: Any) -> torch.Tensor:
    """``cpu_linear``'s forward as aten ops, for AOTAutograd's decomposition table: the op's autograd,
    above the table, still gives the sparse backward, while the forward GEMM becomes the ``addmm``
    (or ``mm``) of a dense graph, which the inner compiler calls without a Python dispatch (about 30
    µs per layer and step for the opaque op on a 2-core AMD EPYC). Only where the C kernels write
    and read ``masked``: their calls make the partitioner save it, where a composite mask fused into
    the GEMM's transpose was not, so the Bi-Mask backward weight was computed forward and saved with
    a bool SR-STE mask instead (5 bytes per weight for 4)."""
    bound = _LINEAR_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    with annotate(role(a["layer"], "fwd_weight", FORWARD_NAME_KEY)):
        used = _compute_weight(_decayed(a["weight"], a["masked"], a["alpha"]), a["x"])
    with annotate(role(a["layer"], "fwd_gemm", FORWARD_NAME_KEY)):
        return F.linear(a["x"], used, a["bias"])


def _conv_memory_format(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """The output layout ATen's convolution gives, which the real op and its fake agree on:
    channels-last where the input or the weight is, as cuDNN and every CPU 2-D kernel choose (a
    channels-last model fed NCHW inputs stays channels-last); a CPU 3-D convolution follows the
    input alone, as its meta does (ATen's kernels there choose by dtype, size and thread count, and
    the slow one gives a contiguous output whatever the weight's layout)."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if fmt is None:
        return torch.contiguous_format
    followed = [x, weight] if x.dim() == 4 or x.device.type == "cuda" else [x]
    return fmt if any(suggest_memory_format(t) == fmt for t in followed) else torch.contiguous_format


def _conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    masked: torch.Tensor,
    perm: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    n: int,
    m: int,
    srste_lambda: float,
    layer: str,
    n_eff: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    step: torch.Tensor | None = None,
    grad_prune: str = "none",
    prune_key: int = 0,
) -> torch.Tensor:
    """Convolution with ``W⊙F`` (``W`` ``[O, C/groups, *k]``, ``F`` N:M along ``C`` per position)."""
    used = _layout_of(weight, _compute_weight(_decayed(weight, masked, alpha), x))
    out = torch.ops.aten.convolution(x, used, bias, stride, padding, dilation, False, [0] * len(stride), groups)
    return fresh_layout(out, _conv_memory_format(x, weight))


def _layout_of(weight: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``w`` (a masked ``weight``) in ``weight``'s memory format, as eager's ``W ⊙ F`` is: ATen's
    convolution kernels sum in the order of the weight's layout, so a channels-last weight's masked
    copy made contiguous rounded otherwise (an ulp of bf16 in ``dX``)."""
    weight_format = suggest_memory_format(weight)
    return w if weight_format == torch.contiguous_format else w.contiguous(memory_format=weight_format)


def conv_fake(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, masked: torch.Tensor, perm: torch.Tensor | None,
    stride: list[int], padding: list[int], dilation: list[int], groups: int, n: int, m: int, srste_lambda: float,
    layer: str, n_eff: torch.Tensor | None = None, alpha: torch.Tensor | None = None, step: torch.Tensor | None = None,
    grad_prune: str = "none", prune_key: int = 0,
) -> torch.Tensor:  # fmt: skip
    """Output metadata of ``sparse_conv`` (and of its ``nograd`` overload)."""
    spatial = [
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, k, s, p, d in zip(x.shape[2:], weight.shape[2:], stride, padding, dilation, strict=True)
    ]
    shape = (x.shape[0], weight.shape[0], *spatial)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_conv_memory_format(x, weight))


def _prune_tokens(dy: torch.Tensor, channel_dim: int, step: torch.Tensor, key: int, rule: str) -> torch.Tensor:
    """``mvue_prune`` of the token view ``[T, O]`` of ``dy`` in a backward graph, in ``dy``'s shape. On
    the CPU, the composite rule itself, which the inner compiler fuses (run eagerly inside the op its
    steps took 5-9x the weight-gradient GEMM), on the token view made contiguous first: read through
    a convolution's NCHW strides, Inductor ran the rule in scalar loops (0.74 ms for a ``[8, 64, 16,
    16]`` dY, 0.25 ms after the copy). Elsewhere the op (on CUDA, one launch of the Triton kernel)."""
    tokens = dy.movedim(channel_dim, -1)
    if dy.device.type == "cpu":
        import torch._inductor.inductor_prims  # registers prims.inductor_force_stride_order

        contiguous = torch.ops.prims.inductor_force_stride_order(tokens, make_contiguous_strides_for(tokens.shape))
        pruned = _mvue_composite(contiguous.reshape(-1, tokens.shape[-1]), step, key, rule)
    else:
        pruned = torch.ops.nmsparse.mvue_prune(tokens.reshape(-1, tokens.shape[-1]), step, key, rule)
    return pruned.reshape(tokens.shape).movedim(-1, channel_dim)


def _sparse_backward(
    ctx: Any,
    saved: tuple[torch.Tensor, ...],
    dy: torch.Tensor,
    channel_dim: int,
    input_grad: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    weight_grad: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """SPEC §4, §6–§8 for a GEMM or convolution whose output channels lie along ``channel_dim`` of dY.

    - Input gradient: ``dX = input_grad(dY, input_grad_weight(W, W⊙F, P, ...))``: ``W ⊙ B`` with
      Bi-Mask's ``B``, else ``W ⊙ F`` (``F`` is the transposable mask in that mode).
    - Weight gradient, straight-through: ``dW = weight_grad(prune(dY)) + λ(1−F)⊙W``, ``prune`` the
      MVUE rule on the token view ``[T, O]`` of dY (or none).
    - ``db = Σ dY`` over all but channels (unpruned).

    ``saved``: ``ctx.saved_tensors``, read once by the caller (a checkpoint's saved-tensor hooks
    refuse a second read).
    """
    _, weight, masked, perm, n_eff, alpha, step = saved
    layer = ctx.layer
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        w_b = input_grad_weight(weight, masked, perm, ctx.n, ctx.m, n_eff, alpha, layer)
        with annotate(role(layer, "bwd_input_grad")):
            dx = input_grad(dy, w_b.to(dy.dtype))
    if ctx.needs_input_grad[1]:
        grad = dy
        if ctx.grad_prune != "none":
            with annotate(role(layer, "bwd_grad_prune")):
                grad = _prune_tokens(dy, channel_dim, step, ctx.prune_key, ctx.grad_prune)
        with annotate(role(layer, "bwd_weight_grad")):
            dw = weight_grad(grad)
        if ctx.srste_lambda:
            with annotate(role(layer, "bwd_srste")):
                dw = dw + ctx.srste_lambda * srste_term(weight, masked)
                weight_format = suggest_memory_format(weight)
                if weight_format != torch.contiguous_format:
                    # as the convolution's own dW: the sum, run eagerly (aot_eager), gives a 1x1
                    # kernel NCHW strides, which DDP's buckets of a channels-last weight warn about
                    dw = dw.clone(memory_format=weight_format)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        with annotate(role(layer, "bwd_bias_grad")):
            dims = [d for d in range(dy.dim()) if d != channel_dim % dy.dim()]
            db = dy.sum(dims) if dims else dy  # an unbatched linear: sum([]) would sum everything
    return dx, dw, db


def _save_common(ctx: Any, x, weight, bias, masked, perm, n, m, srste_lambda, layer, n_eff, alpha, step,
                 grad_prune, prune_key) -> None:  # fmt: skip
    ctx.save_for_backward(x, weight, masked, perm, n_eff, alpha, step)
    ctx.n, ctx.m, ctx.srste_lambda, ctx.layer = n, m, srste_lambda, layer
    ctx.grad_prune, ctx.prune_key = grad_prune, prune_key
    ctx.has_bias = bias is not None


def _setup_linear(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    _save_common(ctx, *inputs)


def _linear_backward(ctx: Any, dy: torch.Tensor) -> tuple:
    saved = ctx.saved_tensors
    x = saved[0]
    dx, dw, db = _sparse_backward(
        ctx,
        saved,
        dy,
        -1,
        input_grad=lambda g, w: g @ w,
        weight_grad=lambda g: g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1]),
    )
    return dx, dw, db, *([None] * 11)


def _setup_conv(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, weight, bias, masked, perm, stride, padding, dilation, groups, *rest = inputs
    _save_common(ctx, x, weight, bias, masked, perm, *rest)
    ctx.conv = (stride, padding, dilation, False, [0] * len(stride), groups)


def _conv_backward(ctx: Any, dy: torch.Tensor) -> tuple:
    saved = ctx.saved_tensors
    x, weight = saved[:2]

    def grads(g: torch.Tensor, w: torch.Tensor, mask: list[bool]) -> tuple:
        return torch.ops.aten.convolution_backward(g, x, _layout_of(weight, w), None, *ctx.conv, mask)

    dx, dw, db = _sparse_backward(
        ctx,
        saved,
        dy,
        1,
        input_grad=lambda g, w: grads(g, w, [True, False, False])[0],
        weight_grad=lambda g: grads(g, weight.to(g.dtype), [False, True, False])[1],
    )
    return dx, dw, db, *([None] * 15)


def _register_autocast(op: torch._ops.OpOverload, device_type: str) -> None:
    """Under autocast, run ``op`` with ``x`` and the bias cast to the autocast dtype in force (bf16
    or fp16) as ``F.linear``/``conv`` would (not from float64); the weight keeps its dtype so masks come from the
    parameter's own values, and meets the compute dtype in ``_compute_weight``.

    ``torch.library.register_autocast`` fixes one target dtype and casts every input; this reads the
    dtype at call time.
    """
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    key = getattr(torch._C.DispatchKey, key_name)

    def kernel(*args: Any) -> Any:
        dtype = torch.get_autocast_dtype(device_type)
        cast = list(args)
        for i in (0, 2):  # x and bias; the weight keeps its dtype for the masks
            if isinstance(cast[i], torch.Tensor):
                cast[i] = cast[i].to(reference.autocast_to(cast[i].dtype, dtype))
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*cast)

    op.py_impl(key)(kernel)
    _LIBRARY.impl(op.name().split("::")[1], lambda _keyset, *args: kernel(*args), key_name, with_keyset=True)


def gemm_op(
    name: str,
    fn: Callable[..., torch.Tensor],
    fake: Callable[..., torch.Tensor],
    backward: Callable[..., tuple],
    setup_context: Callable[..., None],
    nograd: bool = True,
) -> Any:
    """The sparse GEMM op ``nmsparse::<name>``: ``fn`` as a ``custom_op`` (tagged ``HOST_READ``) with
    the fake kernel ``fake``, the autograd ``backward``/``setup_context``, autocast on the CPU and
    CUDA (``_register_autocast``), and, unless ``nograd`` is off, its ``nograd`` overload for the
    compiled graphs (``NO_GRAD_OVERLOADS``). Returns the ``custom_op``."""
    op = torch.library.custom_op(f"nmsparse::{name}", fn, mutates_args=(), tags=HOST_READ)
    op.register_fake(fake)
    op.register_autograd(backward, setup_context=setup_context)
    overload = getattr(torch.ops.nmsparse, name).default
    for device in ("cpu", "cuda"):
        _register_autocast(overload, device)
    if nograd:
        NO_GRAD_OVERLOADS[overload] = gradless_op(f"{name}.nograd")(fn)
        torch.library.register_fake(NO_GRAD_OVERLOADS[overload])(fake)
    return op


sparse_linear = gemm_op("sparse_linear", _linear, linear_fake, _linear_backward, _setup_linear)
# The same op where the C mask kernels run and x is 2-D: AOTAutograd inlines its forward instead
# (``inline_linear_forward``), so it needs no ``nograd`` overload.
cpu_linear = gemm_op("cpu_linear", _linear, linear_fake, _linear_backward, _setup_linear, nograd=False)
sparse_conv = gemm_op("sparse_conv", _conv, conv_fake, _conv_backward, _setup_conv)
