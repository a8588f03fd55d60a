"""Helpers the passes share, and the backend and the report with them: node-name spelling, example
values, proven divisibility and size hints of symbolic sizes, and a graph copy that keeps dynamo's
sources."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from nmcompile.reference import autocast_in_force

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
