"""Outlining post-pass: selective activation-checkpoint regions made regions again after the rewrite.

``inline_subgraphs`` inlines ``torch.utils.checkpoint`` regions so that their GEMMs are rewritten
like any others, marking each node with its region (``CHECKPOINT_REGION``). A plain region's nodes
also carry the recompute tags AOTAutograd would give them, and can stay inlined. A selective
region's (given a ``context_fn``) policy is decided op by op as AOTAutograd traces the region, so
it must reach AOTAutograd whole: here its nodes, the sparse ops among them, become the body of a
``tag_activation_checkpoint`` call again, with the region's ``context_fn`` and arguments. In a
graph with one, the plain regions are made calls again too: AOTAutograd numbers the regions it
traces in graph order, and its partitioner saves the output of a region that a later-numbered one
reads, which tags numbered apart from its count would miss. The masked weights ``W ⊙ F`` (and the
nodes only they read) are computed before the call and passed in: saved, as outside any region,
not recomputed from the mask.
"""

from __future__ import annotations

import operator

import torch
from torch import fx
from torch.fx.passes.utils.fuser_utils import fuse_as_graphmodule, validate_partition
from torch.utils.checkpoint import CheckpointPolicy

from .inline_subgraphs import CheckpointRegion
from .utils import CHECKPOINT_REGION, RECOMPUTE_TAGS, free_attribute_name


def outline_regions(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with the nodes of each region ``inline_subgraphs`` inlined made a
    ``tag_activation_checkpoint`` call of a subgraph again, in place, where any region is selective;
    ``gm`` as it is otherwise."""
    regions: dict[CheckpointRegion, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        region = node.meta.get(CHECKPOINT_REGION)
        if region is not None:
            regions.setdefault(region, []).append(node)
    if not any(region.selective for region in regions):
        return gm
    for k, (region, nodes) in enumerate(regions.items()):
        saved = _saved_inputs(nodes)
        for node in saved:
            del node.meta[CHECKPOINT_REGION]
            node.meta.pop("ac_graph_id", None)
            if node.meta.get("recompute") == CheckpointPolicy.PREFER_RECOMPUTE:
                del node.meta["recompute"]
        body_nodes = [n for n in nodes if n not in saved]
        if body_nodes:
            _outline(gm, region, body_nodes, f"wrap_body_{k}")
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


def _outline(gm: fx.GraphModule, region: CheckpointRegion, nodes: list[fx.Node], name: str) -> None:
    """Replace ``nodes`` (in graph order, one region) by a ``tag_activation_checkpoint`` call of a
    subgraph module of them named ``name``; a region that would depend on itself through nodes
    outside it keeps its nodes, recomputed as a plain checkpoint region's."""
    if not validate_partition(nodes):
        for node in nodes:
            node.meta.setdefault("recompute", CheckpointPolicy.PREFER_RECOMPUTE)
        return
    body, inputs, outputs = fuse_as_graphmodule(gm, nodes, name, always_return_tuple=True)
    body.meta.update(region.body_meta)
    for node in body.graph.nodes:  # AOTAutograd tags the body's ops as it traces the call
        for key in (CHECKPOINT_REGION, *RECOMPUTE_TAGS):
            node.meta.pop(key, None)
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
        last.meta = {key: value for key, value in out.meta.items() if key not in (CHECKPOINT_REGION, *RECOMPUTE_TAGS)}
        out.replace_all_uses_with(last, delete_user_cb=lambda user: user not in inside)
    for node in reversed(nodes):
        gm.graph.erase_node(node)
