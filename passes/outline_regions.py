"""Outlining post-pass: selective activation-checkpoint regions made regions again after the rewrite.

``inline_subgraphs`` inlines a ``torch.utils.checkpoint`` region given a ``context_fn`` so that its
GEMMs are rewritten like any others, marking its nodes (``SELECTIVE_REGION``). Its policy is
decided op by op as AOTAutograd traces the region, so the region must reach AOTAutograd whole:
here its nodes, the sparse ops among them, become the body of a ``tag_activation_checkpoint`` call
again, with the region's ``context_fn`` and arguments. The masked weights ``W ⊙ F`` (and the nodes
only they read) are computed before the call and passed in: saved, as outside any region, not
recomputed from the mask.
"""

from __future__ import annotations

import operator

import torch
from torch import fx
from torch.fx.passes.utils.fuser_utils import fuse_as_graphmodule, validate_partition
from torch.utils.checkpoint import CheckpointPolicy

from .inline_subgraphs import SelectiveRegion
from .utils import SELECTIVE_REGION, free_attribute_name


def outline_regions(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with the nodes of each region ``inline_subgraphs`` inlined from a selective checkpoint
    made a ``tag_activation_checkpoint`` call of a subgraph again, in place."""
    regions: dict[SelectiveRegion, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        region = node.meta.get(SELECTIVE_REGION)
        if region is not None:
            regions.setdefault(region, []).append(node)
    for k, (region, nodes) in enumerate(regions.items()):
        saved = _saved_inputs(nodes)
        body_nodes = [n for n in nodes if n not in saved]
        for node in saved:
            del node.meta[SELECTIVE_REGION]
        if body_nodes:
            _outline(gm, region, body_nodes, f"wrap_body_selective_{k}")
    gm.graph.lint()
    gm.recompile()
    return gm


def _saved_inputs(nodes: list[fx.Node]) -> set[fx.Node]:
    """The nodes of a region that the rewrite tags to be saved (``MUST_SAVE``: the masked weights),
    with the region's nodes they read, transitively (the mask, a transposed weight)."""
    inside = set(nodes)
    saved: set[fx.Node] = set()
    stack = [n for n in nodes if n.meta.get("recompute") == CheckpointPolicy.MUST_SAVE]
    while stack:
        node = stack.pop()
        if node not in saved:
            saved.add(node)
            stack.extend(arg for arg in node.all_input_nodes if arg in inside)
    return saved


def _outline(gm: fx.GraphModule, region: SelectiveRegion, nodes: list[fx.Node], name: str) -> None:
    """Replace ``nodes`` (in graph order, one region) by a ``tag_activation_checkpoint`` call of a
    subgraph module of them named ``name``; a region that would depend on itself through nodes
    outside it keeps its nodes, recomputed as a plain checkpoint region's."""
    if not validate_partition(nodes):
        for node in nodes:
            node.meta.setdefault("recompute", CheckpointPolicy.PREFER_RECOMPUTE)
        return
    body, inputs, outputs = fuse_as_graphmodule(gm, nodes, name, always_return_tuple=True)
    body.meta.update(region.body_meta)
    attribute = free_attribute_name(gm, name)
    gm.add_submodule(attribute, body)
    with gm.graph.inserting_after(nodes[-1]):
        body_node = gm.graph.get_attr(attribute)
    with gm.graph.inserting_after(body_node):
        call = gm.graph.call_function(
            torch.ops.higher_order.tag_activation_checkpoint, (body_node, *inputs), dict(region.kwargs)
        )
    call.meta["example_value"] = tuple(out.meta.get("example_value") for out in outputs)
    inside = set(nodes)
    last = call
    for index, out in enumerate(outputs):
        with gm.graph.inserting_after(last):
            last = gm.graph.call_function(operator.getitem, (call, index))
        last.meta = {key: value for key, value in out.meta.items() if key != SELECTIVE_REGION}
        out.replace_all_uses_with(last, delete_user_cb=lambda user: user not in inside)
    for node in reversed(nodes):
        gm.graph.erase_node(node)
