"""Rewrite pass: each sparse GEMM node becomes explicit mask, permutation and sparse-GEMM nodes.

``linear(x, W, b)`` turns into ``<layer>_fwd_mask = nmsparse.nm_mask(W)`` (or the transposable
mask), ``<layer>_fwd_masked = W ⊙ mask``, state inputs (``<layer>_perm`` for Bi-Mask; ``_n_eff``,
``_alpha``, ``_step`` for the recipes of SPEC §7–§8), and ``<layer>_fwd_gemm =
nmsparse.sparse_linear(x, W, b, masked, perm, ...)`` whose autograd holds the backward masks;
``conv2d(x, W, b, ...)`` likewise into ``<layer>_fwd_conv = nmsparse.sparse_conv(...)``.
The dynamo graph is copied first, never edited in place.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx
from torch.utils.checkpoint import CheckpointPolicy

from nmcompile.ops import NAME_KEY, masked_weight
from nmcompile.options import SparsityConfig
from nmcompile.reference import add_bias, conv_padding, prune_key
from nmcompile.state import alpha_dtype, graph_input_kinds

from .find_targets import GemmTarget, TargetAnalysis
from .utils import copy_graph_module, example_value, gemm_operands, join_region

# The plain Python functions (not torch ops) this pass calls in the graph, for the compile caches'
# allowlist: AOTAutograd's cache refuses a graph calling any function it does not know.
GRAPH_FUNCTIONS = (masked_weight, add_bias)


@dataclasses.dataclass(frozen=True)
class StateInput:
    """A graph input appended for layer state: which target it serves and what it holds."""

    target: GemmTarget
    kind: str  # "perm", "n_eff", "alpha" or "step" (see nmcompile.state.graph_input_kinds)
    name: str
    example: Any  # static-shape (fake) example value of the input


def _named(graph: fx.Graph, target: Any, args: tuple, name: str, annotate: bool = True) -> fx.Node:
    """A new node called ``name``; ``annotate`` also tags it so AOTAutograd's nodes keep the name.

    The sparse GEMM is not tagged: AOTAutograd copies a forward node's tag onto the nodes of its
    backward, which would hide the backward's own names; ``name_nodes`` names it from its args.
    """
    node = graph.call_function(target, args)
    node._rename(name)
    if annotate:
        node.meta["custom"] = {NAME_KEY: name}
    return node


def _conv(
    graph: fx.Graph, target: GemmTarget, x: Any, w: fx.Node, bias: Any, masked: fx.Node, perm: Any,
    config: SparsityConfig, recipe: tuple,
) -> fx.Node:  # fmt: skip
    """``nmsparse.sparse_conv`` with explicit padding; ``"same"`` that needs asymmetric padding
    becomes an ``F.pad`` of the input (``<layer>_same_pad``) first, as PyTorch itself does. An
    unbatched input gets a batch of one around the op (``<layer>_batch``, ``<layer>_unbatch``)."""
    conv, layer = target.conv, target.layer
    assert conv is not None
    if conv.unbatched:
        x = _named(graph, torch.unsqueeze, (x, 0), f"{layer}_batch")
    padding, pad = conv_padding(conv.padding, conv.kernel, conv.dilation)
    if pad is not None:
        x = _named(graph, F.pad, (x, pad), f"{layer}_same_pad")
    geometry = (list(conv.stride), padding, list(conv.dilation), conv.groups)
    args = (x, w, bias, masked, perm, *geometry, config.n, config.m, config.srste_lambda, layer, *recipe)
    out = _named(graph, torch.ops.nmsparse.sparse_conv.default, args, f"{layer}_fwd_conv", annotate=False)
    return _named(graph, torch.squeeze, (out, 0), f"{layer}_unbatch") if conv.unbatched else out


def _state_example(kind: str, target: GemmTarget, weight: torch.Tensor) -> torch.Tensor:
    """An example value of a state input, as ``LayerState.graph_inputs`` makes them for ``weight``."""
    if kind == "perm":
        return torch.arange(target.weight_shape[0], device=weight.device)  # type: ignore[index]
    if kind == "alpha":
        return torch.ones((), dtype=alpha_dtype(weight.dtype), device=weight.device)
    return torch.zeros((), dtype=torch.int64)


def insert_masks(
    gm: fx.GraphModule, analysis: TargetAnalysis, config: SparsityConfig, fake_mode: Any = None
) -> tuple[fx.GraphModule, list[StateInput]]:
    """Rewrite the sparse targets of ``analysis`` in a copy of ``gm``.

    Returns the new module and the state inputs appended after the original placeholders, layer
    by layer in ``graph_input_kinds`` order; the caller passes those tensors after the user's
    inputs. ``fake_mode`` makes their example values (static shapes) so AOTAutograd can trace them.
    """
    new_gm, env = copy_graph_module(gm)
    graph = new_gm.graph
    n, m = config.n, config.m
    states: list[StateInput] = []
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    last_input = placeholders[-1] if placeholders else None  # none: a graph of no inputs, no targets
    for target in analysis.sparse:
        layer = target.layer
        node, weight = env[target.node], env[target.weight]
        x, _, bias, _ = gemm_operands(node, target.op)  # current operands: earlier rewrites replaced some
        weight_value = example_value(weight)
        inputs: dict[str, fx.Node] = {}
        for kind in graph_input_kinds(target.backward, config):
            with graph.inserting_after(last_input):
                # graph.placeholder would snake-case the name (fcOut -> fc_out), unlike the layer's other nodes
                last_input = graph.create_node("placeholder", f"{layer}_{kind}", name=f"{layer}_{kind}")
            last_input.target = last_input.name  # the argument name: unique where two layers' names collide
            last_input._dynamo_source = None  # type: ignore[attr-defined]
            example = _state_example(kind, target, weight_value)
            if fake_mode is not None:
                example = fake_mode.from_tensor(example, static_shapes=True)
            last_input.meta["example_value"] = example
            inputs[kind] = last_input
            states.append(StateInput(target, kind, last_input.name, example))
        perm, n_eff = inputs.get("perm"), inputs.get("n_eff")
        recipe = (
            n_eff,
            inputs.get("alpha"),
            inputs.get("step"),
            config.grad_prune,
            prune_key(config.seed, target.layer_index),
        )
        first = node.prev  # the nodes made below come after it
        with graph.inserting_before(node):
            w = weight if target.layout == "out_in" else _named(graph, torch.t, (weight,), f"{layer}_weight_t")
            if target.backward == "transposable":
                mask_op, mask_args = torch.ops.nmsparse.transposable_mask.default, (w, n, m, n_eff)
            else:
                mask_op, mask_args = torch.ops.nmsparse.nm_mask.default, (w, n, m, 1, n_eff)
            mask = _named(graph, mask_op, mask_args, f"{layer}_fwd_mask")
            masked = _named(graph, masked_weight, (w, mask), f"{layer}_fwd_masked")
            # Saved for the backward, not recomputed there from the smaller bool mask: Inductor's
            # CPU code loads bool vectors 10-30x slower than floats.
            masked.meta["recompute"] = CheckpointPolicy.MUST_SAVE
            if target.conv is not None:
                out = _conv(graph, target, x, w, bias, masked, perm, config, recipe)
            else:
                fused_bias = None if target.add_bias else bias
                args = (x, w, fused_bias, masked, perm, n, m, config.srste_lambda, layer, *recipe)
                out = _named(graph, torch.ops.nmsparse.sparse_linear.default, args, f"{layer}_fwd_gemm", annotate=False)
                if target.add_bias:
                    out = _named(graph, add_bias, (bias, out), f"{layer}_fwd_bias")
        if "example_value" in node.meta:  # the same output: user code's method calls on it stay cacheable
            out.meta["example_value"] = node.meta["example_value"]
        join_region(node, first)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        operand = env[target.operand]  # the weight, or its transpose and no-op casts, now unused
        while operand is not weight and not operand.users:
            source = operand.args[0]
            graph.erase_node(operand)
            operand = source
    graph.lint()
    new_gm.recompile()
    return new_gm, states
