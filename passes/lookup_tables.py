"""Lookup-table pass: the weights a graph reads as embedding tables.

Pure analysis, run before ``find_targets``: a GEMM on such a weight in another graph is a head tied
to the embedding, which the backend notes so that that graph leaves it dense.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import fx

from .find_targets import ParamInfo
from .utils import consumers, op_name

_LOOKUPS = {"embedding", "embedding_bag"}  # F.embedding, F.embedding_bag, torch.embedding: a weight read as a table


def lookup_tables(gm: fx.GraphModule, params: Mapping[str, ParamInfo]) -> list[str]:
    """The parameter placeholders of ``gm`` that an embedding lookup reads as its table: a GEMM
    on one of them in another graph is a head tied to the embedding."""
    return [
        node.name
        for node in gm.graph.nodes
        if node.op == "placeholder" and node.name in params and any(op_name(u) in _LOOKUPS for u in consumers(node))
    ]
