"""Naming pass: give the nodes AOTAutograd produced the names their annotations carry.

Nodes made from the rewritten graph or from the sparse GEMM's backward carry
``meta["custom"]["nmsparse"] = "<layer>_<role>"`` (``fc1_fwd_mask``, ``fc1_bwd_perm``, ...), and
those of an inlined forward GEMM (``cpu_linear``) the same under ``ops.FORWARD_NAME_KEY``;
this pass renames them so that printed graphs say what each node is.
"""

from __future__ import annotations

import torch
from torch import fx

from nmcompile.ops import node_role

_GEMM_SUFFIX = {  # by op name: the Triton ops are registered only once the lowering pass used them
    "nmsparse::sparse_linear": "fwd_gemm",
    "nmsparse::cpu_linear": "fwd_gemm",
    "nmsparse::triton_linear": "fwd_gemm",
    "nmsparse::sparse24_linear": "fwd_gemm",
    "nmsparse::sparse_conv": "fwd_conv",
}


def _argument(node: fx.Node, name: str) -> object:
    """The value of the schema argument ``name`` of an op-overload node."""
    names = [a.name for a in node.target._schema.arguments]  # type: ignore[union-attr]
    index = names.index(name)
    return node.args[index] if index < len(node.args) else node.kwargs[name]


def name_nodes(gm: fx.GraphModule) -> fx.GraphModule:
    """Rename annotated ``call_function`` nodes of ``gm`` in place (unique suffixes where repeated).

    ``nmsparse.sparse_linear`` / ``cpu_linear`` / ``triton_linear`` / ``sparse24_linear`` /
    ``sparse_conv`` nodes are named ``<layer>_fwd_gemm`` / ``<layer>_fwd_conv`` from their ``layer``
    argument. Of the nodes a step decomposed into (``where(F, W, 0)`` into a scalar 0 and the
    ``where``), the last, its result, takes the plain name; those before it count back from ``_1``.
    """
    stepped = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        op_name = node.target._schema.name if isinstance(node.target, torch._ops.OpOverload) else None
        suffix = _GEMM_SUFFIX.get(op_name)
        if suffix is not None:
            node._rename(f"{_argument(node, 'layer')}_{suffix}")
        elif (role := node_role(node)) is not None:
            stepped.append((node, role))
    for node, role in reversed(stepped):
        node._rename(role)
    gm.recompile()
    return gm
