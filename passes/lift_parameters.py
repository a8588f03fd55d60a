"""Lifting pre-pass: Parameters that dynamo installed as graph attributes become graph inputs.

Dynamo lifts a module's Parameters into graph inputs, which is where ``find_targets`` looks for
weights, except where it prepares Inductor's freezing (``torch._inductor.config.freezing`` under
``no_grad``, or ``torch._dynamo.config.prepare_freezing``): there each Parameter is a ``get_attr``
of the graph, and left so, the model's GEMMs would run dense (an eval of a sparse-trained model
on its unmasked weights). Each such Parameter becomes a placeholder after dynamo's own, fed by the
backend at every call, as a lifted Parameter would be; Inductor then freezes none of them.
"""

from __future__ import annotations

import dataclasses

from torch import fx, nn


@dataclasses.dataclass
class LiftedParameters:
    """The graph with its attribute Parameters as inputs, and those Parameters in input order
    (each given after the graph's own inputs)."""

    gm: fx.GraphModule
    params: list[nn.Parameter]


def lift_parameters(gm: fx.GraphModule) -> LiftedParameters:
    """A copy of ``gm`` whose ``get_attr`` nodes of Parameters are placeholders after its own, one
    per Parameter, named as the first such node and carrying its dynamo source; ``gm`` itself
    where it reads none. Node metadata, dynamo's ``grapharg`` included, is kept."""
    attributes = [(n, _attribute(gm, n.target)) for n in gm.graph.find_nodes(op="get_attr")]
    found = [(node, value) for node, value in attributes if isinstance(value, nn.Parameter)]
    if not found:
        return LiftedParameters(gm, [])
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        env[node] = graph.node_copy(node, env.__getitem__)
    sources = getattr(gm, "_param_name_to_source", {})
    inputs: dict[int, fx.Node] = {}
    params: list[nn.Parameter] = []
    for node, param in found:
        if id(param) not in inputs:
            placeholder = inputs[id(param)] = graph.placeholder(node.name)
            placeholder.meta = dict(node.meta)
            if node.target in sources:
                placeholder._dynamo_source = sources[node.target]  # type: ignore[attr-defined]
            params.append(param)
        env[node] = inputs[id(param)]
    for node in gm.graph.nodes:
        if node not in env:
            env[node] = graph.node_copy(node, env.__getitem__)
    lifted = fx.GraphModule(gm, graph)
    lifted.meta = dict(gm.meta)
    return LiftedParameters(lifted, params)


def _attribute(gm: fx.GraphModule, target: str) -> object:
    """``gm``'s attribute at the dotted ``target``, or ``None``."""
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj
