"""FX graph passes of the ``nmsparse`` backend, usable on any ``torch.fx.GraphModule``.

Each module holds one pass with one entry function: ``inline_subgraphs`` (nested compile regions
and activation-checkpoint regions inlined, so their GEMMs can be rewritten), ``lift_parameters``
(Parameters dynamo made graph attributes, under Inductor's freezing, into graph inputs),
``decompose_attention`` (fused attention ops into ``F.linear`` + SDPA), ``lookup_tables`` (the
weights a graph reads as embedding tables, which the backend notes before deciding),
``find_targets`` (eligibility analysis, SPEC §10), ``insert_masks``
(rewrite GEMM nodes into mask, permutation and sparse-GEMM nodes), ``lower_kernels`` (sparse GEMMs
onto the fused Triton kernels or 2:4 tensor cores, forward masks onto the C kernel on the CPU),
``outline_regions`` (selective checkpoint regions made subgraphs again after the rewrite),
``name_nodes`` (readable node names in the graphs AOTAutograd produces). ``utils`` holds the
helpers they share (node-name spelling, example values, symbolic sizes, the graph copy, a
parameter's uses through casts and transposes, a GEMM node's operands).
"""

from .decompose import decompose_attention
from .find_targets import GemmTarget, ParamInfo, TargetAnalysis, find_targets
from .inline_subgraphs import inline_subgraphs
from .insert_masks import GRAPH_FUNCTIONS, StateInput, insert_masks
from .lift_parameters import LiftedParameters, lift_parameters
from .lookup_tables import lookup_tables
from .lower_kernels import KernelChoice, lower_kernels
from .name_nodes import name_nodes
from .outline_regions import outline_regions

__all__ = [
    "GRAPH_FUNCTIONS",
    "GemmTarget",
    "KernelChoice",
    "LiftedParameters",
    "ParamInfo",
    "StateInput",
    "TargetAnalysis",
    "decompose_attention",
    "find_targets",
    "inline_subgraphs",
    "insert_masks",
    "lift_parameters",
    "lookup_tables",
    "lower_kernels",
    "name_nodes",
    "outline_regions",
]
