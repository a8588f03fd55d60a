"""Lowering pass: sparse GEMM nodes onto the fused Triton kernels or 2:4 tensor cores where they apply.

Runs on the graph ``insert_masks`` wrote, before AOTAutograd, so the partitioner sees the fused
op's own autograd: the forward saves ``W`` and ``P`` (a mask only where the op takes one,
``transposable``) and the backward graph holds
one kernel per product (``<layer>_bwd_input_grad``, ``<layer>_bwd_weight_grad``). Each
``<layer>_fwd_gemm = nmsparse.sparse_linear(x, W, b, <layer>_fwd_masked, P, ...)`` becomes
``nmsparse.triton_linear(x, W, b, None, P, ...)`` (the mask nodes go; the kernels rank ``F`` in
registers), or takes the mask itself where it is not N:M along ``K`` alone (``transposable``).
Option ``kernels``: ``auto`` lowers on CUDA, ``triton`` also under ``TRITON_INTERPRET=1`` on the
CPU (tests), ``portable`` never. ``sparse24`` lowers to ``nmsparse.sparse24_linear`` (2:4 sparse
tensor cores) where the N:M pattern is 2:4, the compute dtype fp16/bf16 and the GPU sm80+, and
falls back as ``auto`` elsewhere; ``auto`` takes it where both paths can run a layer and a timed
step (``kernels.measure``) finds 2:4 faster, and is not timed under
``torch.use_deterministic_algorithms``, where it keeps Triton. Every sparse GEMM gets a ``KernelChoice`` saying what
and why.
A linear GEMM that stays portable keeps its graph, except that on the CPU ``<layer>_fwd_masked``
becomes ``nmsparse.cpu_masked_weight`` (the C mask kernel: fp32, M=4) where that kernel applies,
and its ``KernelChoice`` reason ends in ``CPU_MASK_NOTE``; there, for a 2-D input, the GEMM becomes
``nmsparse.cpu_linear``, whose forward AOTAutograd inlines.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import fx

from nmcompile.options import SparsityConfig, power_of_two, structure_sequence

from .utils import autocast_dtype, example_value, size_hint

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU_MASK_NOTE = "forward mask: C kernel"  # the report's note on a portable layer whose W ⊙ F the C kernel writes
DETERMINISTIC_NOTE = "torch.use_deterministic_algorithms is on (kernels='sparse24' names 2:4)"


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    """Which implementation a sparse GEMM runs on, and why not a faster one."""

    kernel: str  # "triton", "sparse24" or "portable"
    reason: str  # why not a faster path; for "sparse24", which of its GEMMs stay dense


def _interpreting() -> bool:
    """Whether the kernels run under Triton's CPU interpreter (imported only once triton is known)."""
    from nmcompile.kernels.common import interpreting

    return interpreting()


def _weight(node: fx.Node) -> torch.Tensor | None:
    """The example value of a ``sparse_linear`` node's weight (through ``.t()`` of an ``[in, out]`` one)."""
    weight_node = node.args[1]
    if isinstance(weight_node, fx.Node) and weight_node.target is torch.t:
        weight_node = weight_node.args[0]
    return example_value(weight_node)


def _triton_blocker(node: fx.Node, config: SparsityConfig) -> str | None:
    """Why ``node`` (a ``sparse_linear``) cannot run on the Triton kernels, or ``None`` if it can."""
    if config.kernels == "portable":
        return "kernels='portable'"
    from nmcompile.kernels import triton_installed

    if not triton_installed():
        return "triton is not installed"
    weight = _weight(node)  # x has the weight's dtype, or autocast's (checked at launch)
    if weight is None:
        return "weight shape unknown"
    if weight.device.type != "cuda" and not (config.kernels == "triton" and _interpreting()):
        return "not on CUDA (kernels='triton' with TRITON_INTERPRET=1 runs the kernels on the CPU)"
    if not power_of_two(config.m):
        return f"m={config.m} is not a power of two (register tiles need one)"
    return _dtype_blocker(weight)


def _dtype_blocker(weight: torch.Tensor) -> str | None:
    """Why the Triton kernels (the GEMMs and the 2:4 operand writer) cannot read ``weight``, or ``None``."""
    return None if weight.dtype in _DTYPES else f"weight dtype {weight.dtype} (the kernels take fp32, fp16, bf16)"


def _sparse24_blocker(node: fx.Node, config: SparsityConfig) -> str | None:
    """Why ``node`` cannot run on 2:4 sparse tensor cores under ``kernels='sparse24'``, or ``None``."""
    from nmcompile.kernels import sparse24, triton_installed

    if not triton_installed():
        return "triton is not installed (its kernels write the 2:4 operands)"
    if not sparse24.fits_24(config.n, config.m):
        return f"{config.n}:{config.m} is not a 2:4 pattern (at most 2 kept in every 4)"
    if not power_of_two(config.m):
        return f"m={config.m} is not a power of two (the Triton kernels that write the 2:4 operands need one)"
    if config.mask_decay != "none":
        return "mask decay keeps pruned weights (scaled by alpha), so W is not 2:4"
    weight = _weight(node)
    if weight is None:
        return "weight shape unknown"
    if (why := _dtype_blocker(weight)) is not None:
        return why
    return sparse24.blocker(weight.device, _autocast_dtype(node, weight) or weight.dtype)


def _autocast_dtype(node: fx.Node, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype CUDA autocast computes ``node``'s GEMM in, or ``None`` (not on CUDA, or no autocast)."""
    return autocast_dtype(node, "cuda") if weight.device.type == "cuda" else None


def _dense_parts(node: fx.Node, config: SparsityConfig) -> str:
    """Which GEMMs of the ``sparse24`` layer ``node`` stay dense under ``config``, as a report note
    (structure decay's stages whose N is not 2:4, such as 3:4, run the forward and input gradient
    dense; a layer whose ``O`` the N:M does not divide has a dense backward whatever ``backward``)."""
    from nmcompile.kernels.sparse24 import fits_24

    transposable = node.args[3].args[1].target is torch.ops.nmsparse.transposable_mask.default
    dense_backward = node.args[4] is None and not transposable  # no P, no transposable mask: W ⊙ F
    dense = []
    if config.structure_decay:
        walk = ([config.m] if config.dense_steps else []) + structure_sequence(config.n, config.m)
        stages = "/".join(f"{n}:{config.m}" for n in walk if not fits_24(n, config.m))
        if stages:
            gemms = "forward" if dense_backward else "forward and input gradient"
            dense.append(f"{gemms} at {stages} (structure decay)")
    if config.backward == "dense":
        dense.append("input gradient (backward='dense')")
    elif dense_backward:
        dense.append(f"input gradient (O not divisible by m={config.m}: the backward uses W ⊙ F)")
    if config.grad_prune == "none":
        dense.append("weight gradient (grad_prune='none')")
    return "dense: " + ", ".join(dense) if dense else ""


def _linear_case(node: fx.Node, config: SparsityConfig) -> Any:
    """The ``kernels.measure.LinearCase`` of one ``sparse_linear`` node, or ``None`` where ``x``'s
    shape is unknown or has no size hint (an unbacked size)."""
    from nmcompile.kernels.measure import LinearCase

    x, weight = example_value(node.args[0]), _weight(node)
    x_shape = tuple(size_hint(size) for size in x.shape) if x is not None else (None,)
    if None in x_shape:
        return None
    load_mask = node.args[3].args[1].target is not torch.ops.nmsparse.nm_mask.default  # transposable
    out_in = tuple(example_value(node.args[1]).shape)  # [O, K], also where W is an [in, out] weight's .t()
    return LinearCase(
        x_shape, x.dtype, out_in, weight.dtype, weight.device, _autocast_dtype(node, weight),
        config.n, config.m, node.args[2] is not None, load_mask,
        node.args[4] is not None, node.args[9] is not None, node.args[11] is not None, node.args[7], config.grad_prune,
    )  # fmt: skip


def _measured(node: fx.Node, config: SparsityConfig) -> KernelChoice:
    """``auto`` where both the Triton kernels and 2:4 tensor cores can run a layer: the one whose
    timed training step (``kernels.measure``) is faster; Triton where the timing cannot be taken, or
    must not be: under ``torch.use_deterministic_algorithms`` two processes could time differently,
    pick differently and round differently."""
    from nmcompile.kernels import measure

    if torch.are_deterministic_algorithms_enabled():
        return KernelChoice("triton", f"2:4 not measured: {DETERMINISTIC_NOTE}")
    case = _linear_case(node, config)
    if case is None:
        return KernelChoice("triton", "2:4 not measured: the input's shape is unknown or has no size hint")
    try:
        ms = {kernels: measure.step_ms(kernels, case) for kernels in measure.CANDIDATES}
    except Exception as exc:  # a report instead of a crash: the layer keeps the Triton kernels
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        return KernelChoice("triton", f"2:4 not measured: {type(exc).__name__}: {first_line}")
    figures = f"a step measured {ms['sparse24']:.3g} ms on 2:4 tensor cores, {ms['triton']:.3g} ms on Triton"
    if ms["sparse24"] < ms["triton"]:
        return KernelChoice("sparse24", "; ".join(part for part in (_dense_parts(node, config), figures) if part))
    return KernelChoice("triton", f"not 2:4: {figures}")


def _choose(node: fx.Node, config: SparsityConfig) -> KernelChoice:
    """The implementation of one ``sparse_linear``: 2:4 if asked for and possible, else Triton, else
    portable; under ``auto``, 2:4 where both can run it and 2:4 measures faster."""
    not_24 = ""
    if config.kernels == "sparse24":
        why = _sparse24_blocker(node, config)
        if why is None:
            return KernelChoice("sparse24", _dense_parts(node, config))
        not_24 = f"not 2:4: {why}"
    why = _triton_blocker(node, config)
    if why is not None:
        return KernelChoice("portable", f"{not_24}; {why}" if not_24 else why)
    if config.kernels == "auto" and _sparse24_blocker(node, config) is None:
        return _measured(node, config)
    return KernelChoice("triton", not_24)


def _cpu_forward_mask(graph: fx.Graph, masked: fx.Node, config: SparsityConfig) -> bool:
    """``<layer>_fwd_masked = W ⊙ nm_mask(W)`` onto the C kernel where it applies (CPU, fp32, M=4):
    Inductor's CPU code for groups along the contiguous dim is scalar and 8x slower. Returns
    whether it applied."""
    mask = masked.args[1]
    if mask.target is not torch.ops.nmsparse.nm_mask.default or mask.args[3] != 1 or len(mask.users) != 1:
        return False
    from nmcompile.kernels import cpu_mask

    weight, n, n_eff = mask.args[0], mask.args[1], mask.args[4]
    value = example_value(weight)
    if value is None or cpu_mask.blocker(value, config.m) is not None:
        return False
    _replace(graph, masked, torch.ops.nmsparse.cpu_masked_weight.default, (weight, n, n_eff))
    graph.erase_node(mask)
    return True


def _inlinable(node: fx.Node) -> bool:
    """Whether a portable ``sparse_linear`` whose ``W ⊙ F`` the C kernel writes becomes ``cpu_linear``
    (its forward inlined, ``ops.inline_linear_forward``): where ``x`` is 2-D. An N-D ``x`` reaches the
    inlined ``addmm`` through a 2-D view, and AOTAutograd's partitioner, which takes a tensor read
    only through views and pointwise ops as cheap to recompute, then saved that view and ReLU's bool
    mask where the opaque op's input was saved alone (a 3-D FFN under Inductor saved 10% more, as
    dense Inductor does)."""
    x = example_value(node.args[0])
    return x is not None and x.dim() == 2


def _replace(graph: fx.Graph, node: fx.Node, target: Any, args: tuple) -> fx.Node:
    """A call of ``target`` in ``node``'s place, with its metadata and name (which readers of the graph
    and ``name_nodes`` go by); ``node`` is erased."""
    with graph.inserting_before(node):
        new = graph.call_function(target, args)
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    name = node.name
    graph.erase_node(node)
    new._rename(name)
    return new


def lower_kernels(gm: fx.GraphModule, config: SparsityConfig) -> tuple[fx.GraphModule, dict[str, KernelChoice]]:
    """Lower ``gm``'s sparse GEMMs in place where ``config.kernels`` and the operands allow.

    Returns ``gm`` and ``{layer: KernelChoice}`` for every sparse GEMM and convolution.
    """
    choices: dict[str, KernelChoice] = {}
    graph = gm.graph
    for node in list(graph.nodes):
        if node.target is torch.ops.nmsparse.sparse_conv.default:
            choices[node.args[12]] = KernelChoice("portable", "convolution: ATen/cuDNN with the portable masks")
            continue
        if node.target is not torch.ops.nmsparse.sparse_linear.default:
            continue
        layer = node.args[8]
        choices[layer] = choice = _choose(node, config)
        if choice.kernel == "portable":
            if _cpu_forward_mask(graph, node.args[3], config):
                choices[layer] = dataclasses.replace(choice, reason=f"{choice.reason}; {CPU_MASK_NOTE}")
                if _inlinable(node):
                    _replace(graph, node, torch.ops.nmsparse.cpu_linear.default, node.args)
            continue
        import nmcompile.kernels.ops  # noqa: F401  (registers nmsparse::triton_* and sparse24_*)

        target = {"triton": torch.ops.nmsparse.triton_linear, "sparse24": torch.ops.nmsparse.sparse24_linear}
        masked = node.args[3]  # W ⊙ mask: the lowered ops take the mask itself, or rank it in registers
        mask = masked.args[1]
        in_registers = mask.target is torch.ops.nmsparse.nm_mask.default
        args: tuple[Any, ...] = (*node.args[:3], None if in_registers else mask, *node.args[4:])
        _replace(graph, node, target[choice.kernel].default, args)
        for unused in (masked, mask):
            if not unused.users:
                graph.erase_node(unused)
    graph.lint()
    gm.recompile()
    return gm, choices
