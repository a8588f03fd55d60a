"""Naming pass: give the nodes AOTAutograd produced the names their annotations carry.

Nodes made from the rewritten graph or from the sparse GEMM's backward carry
``meta["custom"]["nmsparse"] = "<layer>_<role>"`` (``fc1_fwd_mask``, ``fc1_bwd_perm``, ...);
this pass renames them so that printed graphs say what each node is.
"""

from __future__ import annotations

import torch
from torch import fx

from nmcompile.ops import NAME_KEY


def name_nodes(gm: fx.GraphModule) -> fx.GraphModule:
    """Rename annotated ``call_function`` nodes of ``gm`` in place (unique suffixes where repeated).

    ``nmsparse.sparse_linear`` / ``sparse_conv`` nodes are named ``<layer>_fwd_gemm`` /
    ``<layer>_fwd_conv`` from their ``layer`` argument.
    """
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        custom = node.meta.get("custom")
        if node.target is torch.ops.nmsparse.sparse_linear.default:
            node._rename(f"{node.args[-1]}_fwd_gemm")
        elif node.target is torch.ops.nmsparse.sparse_conv.default:
            node._rename(f"{node.args[-1]}_fwd_conv")
        elif isinstance(custom, dict) and NAME_KEY in custom:
            node._rename(custom[NAME_KEY])
    gm.recompile()
    return gm
