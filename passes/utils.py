"""Helpers the passes share, and the backend and the report with them: node-name spelling, example
values, proven divisibility and size hints of symbolic sizes, and a graph copy that keeps dynamo's
sources."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from nmcompile.reference import CASTS, GEMM_ARGS, autocast_in_force, holds_tensor, swaps_dims

DENSE_REASON = "nmsparse_dense_reason"  # node meta: why a fused op was left as it is
CHECKPOINT_REGION = "nmsparse_checkpoint_region"  # node meta: the checkpoint region it was inlined from
RECOMPUTE_TAGS = ("recompute", "ac_graph_id")  # node meta AOTAutograd reads for activation checkpointing


def identifier(name: str) -> str:
    """A node-name-safe spelling of a parameter or module name: ``blocks.0.fc1`` -> ``blocks_0_fc1``."""
    ident = re.sub(r"\W", "_", name)
    return ident if ident[:1].isalpha() else f"layer_{ident}"


def example_value(node: Any) -> Any:
    """The example (fake) value dynamo or a tracer recorded for ``node``, if any."""
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None


def autocast_dtype(node: fx.Node, device_type: str) -> torch.dtype | None:
    """The dtype ``device_type``'s autocast computes ``node`` in, or ``None`` where it is off: that of
    the innermost ``torch.autocast`` region for the device open at ``node`` (a region inside the
    compiled code, which dynamo records as enter and exit nodes), else of the one around the compile
    (``reference.autocast_in_force``: ``None`` for a device autocast does not know, meta)."""
    closed: set[fx.Node] = set()
    before = node.prev
    while before.op != "root":
        if before.target is torch.amp.autocast_mode._exit_autocast:
            closed.add(before.args[0])
        elif before.target is torch.amp.autocast_mode._enter_autocast and before not in closed:
            device, dtype, enabled = before.args[:3]
            if device == device_type:
                return (dtype or torch.get_autocast_dtype(device_type)) if enabled else None
        before = before.prev
    return autocast_in_force(device_type)


def divisible(size: Any, m: int) -> bool:
    """``size % m == 0``, proven: a symbolic size is decided from its sympy expression, without a
    guard (``s0*8`` is divisible by 4, a bare ``s0`` is not provably so) (SPEC §10)."""
    if isinstance(size, torch.SymInt):
        return statically_known_true(size % m == 0)
    return size % m == 0


def size_hint(value: Any) -> int | None:
    """An int for a size, using the example hint of a symbolic size without installing a guard
    (``None`` for an unbacked one). Reads the node's hint itself: the helpers for it differ
    between torch releases, and the GPU image's torch (2.11) lacks 2.13's ``optimization_hint``."""
    if isinstance(value, int):
        return value
    return value.node.hint if isinstance(value, torch.SymInt) else None


def copy_graph_module(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[fx.Node, fx.Node]]:
    """A new ``GraphModule`` with a copy of ``gm``'s graph, dynamo sources and metadata kept, but
    dynamo's ``grapharg`` (its weak reference to the real input, a Parameter, would outlive the
    compile in the copy, and ``torch.utils.swap_tensors`` refuses a tensor with weak references)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, env))
    for old, new in env.items():
        new.meta.pop("grapharg", None)
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source  # type: ignore[attr-defined]
    new_gm = fx.GraphModule(gm, graph)
    new_gm.meta = dict(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        new_gm._param_name_to_source = gm._param_name_to_source  # type: ignore[attr-defined]
    return new_gm, env


def join_region(node: fx.Node, first: fx.Node) -> None:
    """The nodes a pass made in place of ``node`` (from ``first.next`` up to ``node``) join
    ``node``'s activation-checkpoint region, if it has one (``inline_subgraphs``): recomputed in the
    backward as its other nodes are. A node already tagged keeps its policy (the masked weight,
    saved)."""
    if CHECKPOINT_REGION not in node.meta:
        return
    made = first.next
    while made is not node:
        for key in (*RECOMPUTE_TAGS, CHECKPOINT_REGION):
            if key in node.meta:
                made.meta.setdefault(key, node.meta[key])
        made = made.next


def free_attribute_name(gm: fx.GraphModule, base: str) -> str:
    """``base``, or ``base_<k>`` with the first ``k`` that names no attribute of ``gm``."""
    name, k = base, 0
    while hasattr(gm, name):
        k += 1
        name = f"{base}_{k}"
    return name


def grad_modes(gm: fx.GraphModule) -> dict[fx.Node, bool]:
    """Whether each node can train where the graph sets the mode: dynamo records a ``torch.no_grad()``
    or ``torch.enable_grad()`` block inside a forward as ``torch._C._set_grad_enabled`` calls, and a
    ``torch.inference_mode(mode)`` block as an enter/exit pair: it sets grad to ``not mode``, and
    nothing under ``inference_mode()`` trains, ``enable_grad()`` or not; the exit restores both.
    Nodes in the caller's mode are left out. A layer under ``no_grad()`` or ``inference_mode()`` in
    a training forward (a teacher branch) trains no step, as in the reference."""
    modes: dict[fx.Node, bool] = {}
    grad: bool | None = None  # as the graph set it; None: the caller's
    inference: bool | None = None
    entered: list[tuple[bool | None, bool | None]] = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch._C._set_grad_enabled:
            grad = bool(node.args[0])
        elif node.op == "call_function" and node.target is torch.autograd.grad_mode._enter_inference_mode:
            entered.append((grad, inference))
            inference = bool(node.args[0])
            grad = not inference
        elif node.op == "call_function" and node.target is torch.autograd.grad_mode._exit_inference_mode:
            grad, inference = entered.pop() if entered else (None, None)
        elif inference:
            modes[node] = False
        elif grad is not None:
            modes[node] = grad
    return modes


_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_TRANSPOSE_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")


def is_transpose(node: fx.Node) -> bool:
    """``W.t()``, ``W.T``, ``W.transpose(0, 1)``, ``W.permute(1, 0)`` of a 2-D tensor (``swaps_dims``)."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in ("T", "mT")
    if node.op not in ("call_method", "call_function"):
        return False
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", None)
    return isinstance(name, str) and swaps_dims(name, node.args[1:], dict(node.kwargs))


def is_noop_cast(node: Any) -> bool:
    """A cast that returns its tensor itself, as eager PyTorch does when nothing changes: ``W.to(x.dtype)``,
    ``W.type_as(x)``, ``W.float()``, ``W.contiguous()`` of a weight already so (same dtype, device
    and strides, no ``copy=True``). Eagerly the GEMM then gets the Parameter, as the reference sees it.
    Dynamo ran the cast on the fake of its tensor, so the fake it recorded is that fake itself exactly
    then, whichever overload and argument spelling (``W.to(dtype, True)`` is ``non_blocking``)."""
    if not isinstance(node, fx.Node) or node.op != "call_method" or node.target not in CASTS:
        return False
    source = example_value(node.args[0])
    return isinstance(source, torch.Tensor) and example_value(node) is source


def consumers(node: fx.Node, transposed: bool = False) -> list[fx.Node]:
    """Nodes that use a parameter, looking through no-op casts of it and one transpose, as
    ``find_targets`` looks back through them from a GEMM's operand. A node whose value holds no
    tensor (``W.is_leaf``, ``W.nbytes``, which dynamo keeps as ``getattr``) reads metadata only: no use."""
    out = []
    for user in node.users:
        value = example_value(user)
        if value is not None and not holds_tensor(value):
            continue
        if is_noop_cast(user) and user.args[0] is node:  # not x.to(W): W there is another argument
            out.extend(consumers(user, transposed))
        elif not transposed and is_transpose(user):
            out.extend(consumers(user, True))
        else:
            out.append(user)
    return out


def op_name(node: fx.Node) -> str:
    """``bmm`` for ``torch.bmm``, ``cond`` for the higher-order op, a method's own name."""
    if node.op == "call_method":
        return str(node.target)
    return getattr(node.target, "__name__", None) or getattr(node.target, "_name", None) or str(node.target)


def gemm_operands(node: fx.Node, kind: str) -> tuple[Any, Any, Any, dict]:
    """``(x, weight operand, bias, other arguments)`` of a GEMM-like node; for a convolution the
    other arguments are ``stride``, ``padding``, ``dilation``, ``groups`` with defaults filled in."""
    args, kwargs = list(node.args), dict(node.kwargs)
    if kind.startswith("conv"):
        dims = int(kind[-2])
        names = _CONV_TRANSPOSE_ARGS if "transpose" in kind else _CONV_ARGS
        given = dict(zip(names, args, strict=False)) | kwargs
        given.pop("output_padding", None)
        defaults = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
        given = defaults | given
        for key in ("stride", "dilation") + (() if isinstance(given["padding"], str) else ("padding",)):
            value = given[key]
            given[key] = tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims
        return given.pop("input"), given.pop("weight"), given.pop("bias"), given
    names = GEMM_ARGS[kind]
    given = dict(zip(names, args, strict=False))
    given |= {key: kwargs.pop(key) for key in names if key in kwargs}  # F.linear(x, weight=W), torch.mm(x, mat2=W)
    if kind == "addmm":
        return given.get("mat1"), given.get("mat2"), given.get("input"), kwargs
    return given.get("input"), given.get(names[1]), given.get("bias"), kwargs
