"""Inlining pre-pass: subgraphs that hide a block's GEMMs from the rewrite are inlined into the graph.

Two higher-order ops hold GEMMs of whole blocks in a subgraph module, which the rewrite does not
reach into:

- ``invoke_subgraph``: dynamo inlines the first call of a ``torch.compiler.nested_compile_region``
  and hands the backend the later ones as calls of one shared subgraph. Inlined, as dynamo's own
  ``inline_invoke_subgraph`` option does, each block's layers are its own (the region is then
  compiled once per call, not once in all).
- ``tag_activation_checkpoint`` (``torch.utils.checkpoint`` inside the compiled code). AOTAutograd
  traces such a region inline, tagging each of its nodes ``recompute=PREFER_RECOMPUTE`` with one
  ``ac_graph_id`` per region, and the partitioner recomputes them in the backward. Inlined here
  with the same tags (which AOTAutograd copies onto the nodes it traces from them), the region is
  recomputed as before and its GEMMs are rewritten. A region given a ``context_fn`` (selective
  checkpointing), whose policy AOTAutograd decides op by op as it traces it, is inlined too, and
  ``outline_regions`` makes it a region again after the rewrite (with the plain regions of its
  graph, so that AOTAutograd numbers them all in graph order); one inside another region, or
  holding one, stays whole. Every inlined node is marked with its region (``CHECKPOINT_REGION``).
"""

from __future__ import annotations

import dataclasses
import itertools
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import fx
from torch.utils.checkpoint import CheckpointPolicy

from .utils import CHECKPOINT_REGION, free_attribute_name, grad_modes


@dataclasses.dataclass(frozen=True, eq=False)
class CheckpointRegion:
    """An activation-checkpoint region that ``inline_subgraphs`` inlined: what ``outline_regions``
    needs to make it one again (a selective one's body metadata holds its ``context_fn``)."""

    body_meta: dict[str, Any]
    kwargs: dict[str, Any]

    @property
    def selective(self) -> bool:
        """Whether the region has a ``context_fn``, whose policy AOTAutograd applies op by op."""
        return "_checkpoint_context_fn" in self.body_meta


def inline_subgraphs(gm: fx.GraphModule, recompute: bool = True) -> fx.GraphModule:
    """``gm`` with its ``invoke_subgraph`` calls and activation-checkpoint regions inlined, in
    place. A torch without dynamo's ``inline_invoke_subgraph`` pass keeps the ``invoke_subgraph``
    calls (their weights are then reported dense). ``recompute=False``, for a graph that runs
    without autograd, and a region where the graph turns grad off: plain regions' nodes get no
    recompute tags, which AOTAutograd's inference path would try to honour (and refuse on a random
    op: SDPA, dropout), with nothing to recompute."""
    try:
        from torch._higher_order_ops.passes.inline_invoke_subgraph import inline_invoke_subgraph
    except ImportError:
        pass
    else:
        gm = inline_invoke_subgraph(gm)
    modes = grad_modes(gm)  # where the graph sets none, the caller's, which ``recompute`` holds
    _inline_checkpoints(gm, itertools.count(1), lambda node: recompute and modes.get(node, True), top=True)
    return gm


def _inline_checkpoints(
    gm: fx.GraphModule, regions: itertools.count, recompute: Callable[[fx.Node], bool], top: bool = False
) -> None:
    """Inline ``gm``'s activation-checkpoint regions, nested ones first, numbering plain ones in
    graph order as AOTAutograd does (its partitioner saves the output of a region that the next one
    reads); ``recompute(node)``: whether the region called at ``node`` gets recompute tags (a nested
    one as the region holding it). Selective ones are inlined where ``gm`` is the top graph and hold
    no other region."""
    hop = torch.ops.higher_order.tag_activation_checkpoint
    for node in list(gm.graph.find_nodes(op="call_function", target=hop)):
        body = getattr(gm, str(node.args[0].target))
        marker = CheckpointRegion(dict(body.meta), dict(node.kwargs))
        if marker.selective and (not top or body.graph.find_nodes(op="call_function", target=hop)):
            continue
        tagged = recompute(node)
        _inline_checkpoints(body, regions, lambda _, tagged=tagged: tagged)
        region = None if marker.selective or not tagged else next(regions)
        env: dict[fx.Node, object] = dict(zip(body.graph.find_nodes(op="placeholder"), node.args[1:], strict=True))
        with gm.graph.inserting_before(node):
            for sub in body.graph.nodes:
                if sub.op in ("placeholder", "output"):
                    continue
                if sub.op == "get_attr":  # a nested subgraph kept whole: the module moves to gm
                    name = free_attribute_name(gm, str(sub.target))
                    gm.add_submodule(name, getattr(body, str(sub.target)))
                    copy = gm.graph.get_attr(name)
                    copy.meta = dict(sub.meta)
                else:
                    copy = gm.graph.node_copy(sub, env.__getitem__)
                copy.meta[CHECKPOINT_REGION] = marker
                if region is not None:
                    copy.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
                    copy.meta["ac_graph_id"] = region
                env[sub] = copy
        outputs = body.graph.output_node().args[0]
        for user in list(node.users):
            if user.op != "call_function" or user.target is not operator.getitem:
                raise AssertionError(f"an activation-checkpoint region's output is read by {user.format_node()}")
            user.replace_all_uses_with(env[outputs[user.args[1]]])
            gm.graph.erase_node(user)
        attribute = node.args[0]
        gm.graph.erase_node(node)
        if not attribute.users:
            gm.graph.erase_node(attribute)
            if not gm.graph.find_nodes(op="get_attr", target=attribute.target):  # copies of one body share it
                delattr(gm, str(attribute.target))
    gm.recompile()
