"""Eligibility pass (SPEC §10): which GEMM-like nodes become N:M sparse, which stay dense and why.

Pure analysis: the graph is not changed. Each GEMM-like node (``linear``, ``mm``, ``addmm``,
``matmul`` and their method forms, ``conv1d/2d/3d``, and transposed convolutions, which stay
dense) becomes one ``GemmTarget`` row of the report.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
import torch.distributed.tensor
import torch.nn.functional as F
from torch import fx

from nmcompile.options import SparsityConfig
from nmcompile.reference import FLOAT_DTYPES, MVUE_RULES, autocast_to

from .utils import (
    DENSE_REASON,
    autocast_dtype,
    consumers,
    divisible,
    example_value,
    gemm_operands,
    identifier,
    is_noop_cast,
    is_transpose,
    op_name,
    size_hint,
)

_FUNCTIONS = {
    torch._C._nn.linear: "linear",
    F.linear: "linear",
    torch.mm: "mm",
    torch.matmul: "matmul",
    torch.linalg.matmul: "matmul",  # an alias of matmul, its own function
    operator.matmul: "matmul",
    torch.addmm: "addmm",
    torch.conv1d: "conv1d",
    torch.conv2d: "conv2d",
    torch.conv3d: "conv3d",
    torch.conv_transpose1d: "conv_transpose1d",
    torch.conv_transpose2d: "conv_transpose2d",
    torch.conv_transpose3d: "conv_transpose3d",
}
_METHODS = {"mm": "mm", "matmul": "matmul", "__matmul__": "matmul", "addmm": "addmm"}
_FUSED_ATTENTION = {
    F.multi_head_attention_forward: "multi_head_attention",
    torch._transformer_encoder_layer_fwd: "transformer_encoder_layer",
    torch._native_multi_head_attention: "native_multi_head_attention",
}
_FUNCTORCH_REASON = "inside a torch.func transform (vmap, grad, jvp): left dense"
_FUNCTORCH_WRAPS = {"_add_batch_dim", "_wrap_for_grad", "_make_dual"}  # a weight entering a transform


@dataclasses.dataclass(frozen=True)
class ConvInfo:
    """Geometry of a convolution node: kernel size, stride, padding (ints or a string), dilation,
    and whether the input is one unbatched sample (``[C, *spatial]``, as ``F.conv2d`` allows)."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: Any
    dilation: tuple[int, ...]
    groups: int
    unbatched: bool = False

    def describe(self) -> str:
        """The conv's geometry for the report, as ``k3x3 s1x1 p1x1 d1x1 g1``."""
        pad = self.padding if isinstance(self.padding, str) else "x".join(map(str, self.padding))
        return (
            f"k{'x'.join(map(str, self.kernel))} s{'x'.join(map(str, self.stride))} p{pad} "
            f"d{'x'.join(map(str, self.dilation))} g{self.groups}"
        )


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """A graph input that is an ``nn.Parameter``: its name (as ``named_parameters()`` spells it),
    its layer index (for seeding, SPEC §5), the tensor, the module that owns it (if known), the
    names under which other modules share it (tied weights), and, where it is an embedding's table
    whose lookup this graph may not hold (a graph break or a separate compile between them), how
    that is known."""

    name: str
    index: int
    param: torch.Tensor
    owner: torch.nn.Module | None
    shared_as: tuple[str, ...] = ()
    lookup: str = ""


@dataclasses.dataclass
class GemmTarget:
    """One GEMM-like node and the decision taken for it."""

    node: fx.Node
    op: str
    param_name: str | None = None
    layer_index: int = 0  # the weight's position in named_parameters(): seeds its random streams
    weight: fx.Node | None = None  # the parameter placeholder
    operand: fx.Node | None = None  # the weight operand of the node: the placeholder or its transpose
    layout: str = ""  # "out_in" (W as [O, K]) or "in_out" (W stored as [K, O])
    x: fx.Node | None = None
    bias: Any = None
    add_bias: bool = False  # addmm: bias added after the GEMM rather than fused
    weight_shape: tuple[int, int] | None = None  # (O, K)
    input_shape: tuple | None = None
    tokens: int | None = None  # rows of the (implicit) GEMM: tokens, or batch × output positions
    input_grad: bool = True  # whether the input needs a gradient: else no dX GEMM runs (a first layer)
    weight_grad: bool = True  # whether the weight needs a gradient: else no dW GEMM runs (frozen, or under no_grad)
    conv: ConvInfo | None = None
    dynamic: dict[str, int] = dataclasses.field(default_factory=dict)  # symbolic sizes: value first seen
    sparse: bool = False
    backward: str = "dense"
    reason: str = ""
    prefix: str = ""  # a numbered node-name prefix, where another sparse layer's name spells the same

    def uses_outside_forward(self) -> list[str]:
        """The uses of this GEMM's weight, itself inside a module's call, that the compiled code
        makes outside that call: in a function that calls the model (a training step compiled
        whole), ops outside every module's call (``p.clamp_()``, a penalty on the loss, a logged
        norm), and another call of the model (a target forward under ``no_grad``), which dynamo's
        module stack keys tell apart (``<id>``, ``<id>@1``): of a module above the layer, since a
        layer called twice inside the forward (reached as ``model.forward(x)``, its stack starting
        at the layer) is sharing, not another call. (In a module's own compiled forward its own ops
        are outside every call too: the caller tells the two apart.)"""
        stack = self.node.meta.get("nn_module_stack")
        if self.weight is None or not stack:
            return []
        outer = next(iter(stack))
        found = set()
        for use in consumers(self.weight):
            keys = list(use.meta.get("nn_module_stack") or {})
            if not keys:
                found.add(op_name(use))
            elif min(len(keys), len(stack)) > 1 and keys[0] != outer and keys[0].split("@")[0] == outer.split("@")[0]:
                found.add("another call of the model")
        return sorted(found)

    @property
    def layer(self) -> str:
        """Node-name prefix for this layer, e.g. ``blocks_0_fc1`` for ``blocks.0.fc1.weight``."""
        if self.prefix:
            return self.prefix
        name = self.param_name or self.node.name
        return identifier(name[: -len(".weight")] if name.endswith(".weight") else name)

    def flops(
        self, n: int, m: int, alpha: float | None = None, grad_prune: str = "none"
    ) -> dict[str, tuple[int, int] | None]:
        """Dense vs N:M-executable FLOPs of the forward, input-gradient and weight-gradient GEMMs, at
        ``n`` (the N in force) and mask-decay factor ``alpha``: while ``α > 0`` the forward and
        input-gradient GEMMs are not sparse (the weight gradient is, with ``grad_prune``, over the
        tokens zero-padded to whole blocks (SPEC §7): a single token keeps 2 of a block of 4, more
        than its dense GEMM); 0 for a gradient that is not computed."""
        if self.weight_shape is None or self.tokens is None:
            return {"forward": None, "input_grad": None, "weight_grad": None}
        O, K = self.weight_shape
        dense = 2 * self.tokens * O * K
        masked = self.sparse and not alpha
        bwd_sparse = masked and self.backward in ("bimask", "transposable")
        pruned = dense
        if self.sparse and grad_prune != "none":
            kept, block, _ = MVUE_RULES[grad_prune]
            pruned = 2 * O * K * (-(-self.tokens // block) * kept)
        return {
            "forward": (dense, dense * n // m if masked else dense),
            "input_grad": ((dense, dense * n // m if bwd_sparse else dense) if self.input_grad else (0, 0)),
            "weight_grad": (dense, pruned) if self.weight_grad else (0, 0),
        }


@dataclasses.dataclass
class TargetAnalysis:
    """Result of ``find_targets``: every GEMM-like node with its decision, and for parameters no
    such node takes, what uses them instead (by parameter name; the report's reason)."""

    targets: list[GemmTarget]
    other_uses: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def sparse(self) -> list[GemmTarget]:
        """The targets that run sparse (the rest stay dense, each with its reason)."""
        return [t for t in self.targets if t.sparse]


def _shape(node: Any) -> tuple | None:
    value = example_value(node)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _dynamic_sizes(*nodes: Any) -> dict[str, int]:
    """The symbols (dynamic sizes) in the shapes of ``nodes``, each with the value it had when the
    graph was traced; unbacked ones (data-dependent, no such value) are left out."""
    found: dict[str, int] = {}
    for node in nodes:
        value = example_value(node)
        for size in value.shape if isinstance(value, torch.Tensor) else ():
            if isinstance(size, torch.SymInt):
                env = size.node.shape_env  # torch 2.13 renamed var_to_val; the GPU image's 2.11 has only it
                values = env.backed_var_to_val if hasattr(env, "backed_var_to_val") else env.var_to_val
                found |= {str(s): int(values[s]) for s in size.node.expr.free_symbols if s in values}
    return dict(sorted(found.items()))


def _gemm_kind(node: fx.Node) -> str | None:
    if node.op == "call_function":
        return _FUNCTIONS.get(node.target) or _FUSED_ATTENTION.get(node.target)  # type: ignore[arg-type]
    if node.op == "call_method":
        return _METHODS.get(node.target)  # type: ignore[arg-type]
    return None


def _through_casts(node: Any) -> Any:
    """``node`` less the no-op casts applied to it (``is_noop_cast``)."""
    while is_noop_cast(node):
        node = node.args[0]
    return node


def _operand_placeholder(operand: Any) -> tuple[fx.Node | None, bool]:
    """The placeholder behind a GEMM operand (itself or its transpose, through no-op casts either
    side of it), and whether it is transposed."""
    node = _through_casts(operand)
    transposed = isinstance(node, fx.Node) and is_transpose(node)
    node = _through_casts(node.args[0]) if transposed else node
    return (node if isinstance(node, fx.Node) and node.op == "placeholder" else None), transposed


def find_targets(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    config: SparsityConfig,
    params: Mapping[str, ParamInfo],
    module_forward: bool = True,
) -> TargetAnalysis:
    """Decide for every GEMM-like node of ``gm`` whether it becomes N:M sparse (SPEC §4, §10).

    ``params`` maps placeholder names to the parameters they carry; placeholders not in it are
    activations or buffers. ``example_inputs`` are matched to placeholders by position.
    ``module_forward``: ``gm`` is (part of) a module's own forward, all one forward of the model
    (``False``: a function that calls modules, where uses in separate calls under ``no_grad`` are no
    tie; ``_inference_calls``).
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = dict(zip(placeholders, example_inputs, strict=False))
    separate = {ph for ph in placeholders if _inference_calls(consumers(ph), module_forward)}
    targets = []
    depth = 0  # of torch.func transforms (vmap, grad, jvp) around the node
    for node in gm.graph.nodes:
        kind = _gemm_kind(node)
        function = getattr(node.target, "__name__", "") if node.op == "call_function" else ""
        if kind is not None:
            target = _decide(node, kind, config, params, values, separate)
            if depth:  # the shapes inside are a sample's, and grads flow through the transform's levels
                target.tokens = None  # so the FLOPs are unknown (shown "?"), not a sample's and 0 for the gradients
                if target.param_name is not None:
                    # The custom op's autograd would run per vmapped sample (SR-STE added B times).
                    target.sparse, target.backward = False, "dense"
                    target.reason = _FUNCTORCH_REASON
            targets.append(target)
        elif function.endswith("_increment_nesting"):
            depth += 1
        elif function.endswith("_decrement_nesting"):
            depth -= 1
        elif node.op == "call_function" and node.target is torch.ops.higher_order.tag_activation_checkpoint:
            targets += _checkpointed(gm, node, config, params, values)
    named = {target.param_name for target in targets}
    other_uses = {}
    for placeholder in placeholders:
        info = params.get(placeholder.name)
        if info is not None and info.name not in named and (reason := _other_use(placeholder)) is not None:
            other_uses[info.name] = reason
    _distinct_layers(targets)
    return TargetAnalysis(targets, other_uses)


def _distinct_layers(targets: list[GemmTarget]) -> None:
    """Number the node-name prefix of a sparse layer whose name spells another's (``a.b_c`` and
    ``a_b.c`` both give ``a_b_c``): each layer names its own nodes, and its kernel is its own."""
    owners: dict[str, str | None] = {}
    for target in (t for t in targets if t.sparse):
        base = layer = target.layer
        count = 1
        while owners.setdefault(layer, target.param_name) != target.param_name:
            count += 1
            layer = f"{base}_{count}"
        if layer != base:
            target.prefix = layer


def _other_use(placeholder: fx.Node) -> str | None:
    """Why a parameter that no GEMM above takes stays dense: the ops that use it instead, or the
    subgraph (``torch.cond``, ...) it is passed into, which the rewrite does not reach into."""
    users = consumers(placeholder)
    if not users:
        return None
    subgraph = next((u for u in users if isinstance(u.target, torch._ops.HigherOrderOperator)), None)
    if subgraph is not None:
        return f"passed into {op_name(subgraph)} (a subgraph the rewrite does not reach into): left dense"
    names = {op_name(user) for user in users}
    if names & _FUNCTORCH_WRAPS:
        return _FUNCTORCH_REASON
    fused = next((u for u in users if u.op == "call_function" and u.target in _FUSED_ATTENTION), None)
    if fused is not None:  # the attention op's own row says why it stays fused
        kind = _FUSED_ATTENTION[fused.target]
        return f"a weight of the fused {kind}: " + fused.meta.get(DENSE_REASON, "its projections run dense inside it")
    gemm = next((kind for kind in map(_gemm_kind, users) if kind is not None), None)
    if gemm is not None:
        return f"the input (left) operand of {gemm}, not its weight"
    ops = ", ".join(sorted(names))
    return f"used by {ops}, not by a GEMM nmsparse rewrites (linear, matmul, mm, addmm, conv1d/2d/3d)"


_SELECTIVE_REASON = (
    "inside a selective activation-checkpoint region (checkpoint with a context_fn) nested with another region: "
    "left dense"
)


def _checkpointed(
    gm: fx.GraphModule, node: fx.Node, config: SparsityConfig, params: Mapping[str, ParamInfo], values: Mapping
) -> list[GemmTarget]:
    """The GEMMs of a selective activation-checkpoint region (``torch.utils.checkpoint`` with a
    ``context_fn``: a subgraph whose policy AOTAutograd decides op by op, which ``inline_subgraphs``
    keeps whole where it lies inside another region or holds one): reported, with shapes and FLOPs,
    but left dense, since the rewrite does not reach into subgraphs."""
    body = getattr(gm, node.args[0].target)
    inner = [n for n in body.graph.nodes if n.op == "placeholder"]
    outer = dict(zip(inner, node.args[1:], strict=False))
    inner_params = {
        ph.name: params[arg.name] for ph, arg in outer.items() if isinstance(arg, fx.Node) and arg.name in params
    }
    inner_values = {ph: values.get(arg) for ph, arg in outer.items() if values.get(arg) is not None}
    targets = []
    for sub in body.graph.nodes:
        kind = _gemm_kind(sub)
        if kind is not None:
            target = _decide(sub, kind, config, inner_params, inner_values)
            if target.param_name is not None:
                target.sparse, target.backward = False, "dense"
                target.reason = _SELECTIVE_REASON
            targets.append(target)
    return targets


def _decide(
    node: fx.Node,
    kind: str,
    config: SparsityConfig,
    params: Mapping[str, ParamInfo],
    values: Mapping[fx.Node, Any],
    separate: Collection[fx.Node] = (),
) -> GemmTarget:
    """The decision for the GEMM-like ``node``; ``separate``: weights whose uses are no tie
    (``_inference_calls``)."""
    target = GemmTarget(node=node, op=kind)
    if kind in _FUSED_ATTENTION.values():
        target.reason = node.meta.get(DENSE_REASON, f"fused {kind}: its projections run dense inside it")
        return target
    x, w, bias, extra = gemm_operands(node, kind)
    target.x, target.bias, target.input_shape = x, bias, _shape(x)
    target.dynamic = _dynamic_sizes(x, w, node)
    in_autograd = getattr(example_value(node), "requires_grad", True)  # run with grad on, of an operand needing one
    target.input_grad = in_autograd and getattr(example_value(x), "requires_grad", True)
    target.weight_grad = in_autograd and getattr(example_value(w), "requires_grad", True)
    if kind.startswith("conv"):
        return _decide_conv(target, w, extra, config, params, values, separate)
    placeholder, transposed = _operand_placeholder(w)
    info = params.get(placeholder.name) if placeholder is not None else None
    if info is None:
        left, _ = _operand_placeholder(x)
        left_param = params.get(left.name) if left is not None else None
        if left_param is not None:
            target.param_name, target.reason = left_param.name, "parameter is the left operand"
            target.input_grad, target.weight_grad = target.weight_grad, target.input_grad
            target.input_shape = _shape(w)
        elif placeholder is None:
            target.reason = "no parameter operand"
        else:
            target.reason = "weight is not an nn.Parameter (input or buffer)"
        _dense_gemm_size(target, _shape(x), _shape(w), left_param is not None)
        return target
    value = values.get(placeholder, info.param)
    target.param_name, target.weight, target.operand = info.name, placeholder, w
    target.layer_index = info.index
    target.layout = "out_in" if transposed == (kind != "linear") else "in_out"  # F.linear(x, W.t()): W is [in, out]
    if value.dim() != 2:
        target.reason = "weight is not a 2-D [out, in] or [in, out] operand"
        _dense_gemm_size(target, target.input_shape, _shape(w), False)
        return target
    rows, cols = value.shape if target.layout == "out_in" else value.shape[::-1]
    target.weight_shape = (rows, cols)
    x_shape = target.input_shape
    if x_shape is not None and len(x_shape) >= 1:
        numel = 1
        for size in x_shape[:-1]:
            numel *= size
        target.tokens = size_hint(numel)
    reason = _dtype_mismatch(target, value) or _dense_reason(
        value, cols, info, placeholder, kind, extra, config, separate=placeholder in separate
    )
    if reason:
        target.reason = reason
        return target
    target.add_bias = kind == "addmm"
    _mark_sparse(target, rows, config)
    return target


def _dense_gemm_size(target: GemmTarget, x_shape: tuple | None, w_shape: tuple | None, left: bool) -> None:
    """``weight_shape`` and ``tokens`` of a GEMM-like node that takes no 2-D parameter as its weight,
    for its FLOPs. ``K`` is ``x``'s last size; ``O`` the output's last one (1 for a vector ``w``), or, for
    a parameter as the left operand (``W @ x``), its rows; ``tokens`` the rest of the output."""
    out = _shape(target.node)
    if x_shape is None or w_shape is None or out is None or not x_shape or (left and len(x_shape) != 2):
        return
    x_sizes, w_sizes, out_sizes = (tuple(map(size_hint, shape)) for shape in (x_shape, w_shape, out))
    if None in x_sizes + w_sizes + out_sizes:
        return
    if left:
        rows, k = x_sizes
    else:
        rows, k = (out_sizes[-1] if len(w_sizes) > 1 else 1), x_sizes[-1]
    target.weight_shape = (rows, k)
    target.tokens = math.prod(out_sizes) // rows if rows else 0


def _mark_sparse(target: GemmTarget, rows: int, config: SparsityConfig) -> None:
    """Sparse forward; the backward mode unless ``O % m`` rules out an N:M mask along ``O`` (SPEC §4)."""
    target.sparse = True
    target.backward = config.backward
    if config.backward != "dense" and not divisible(rows, config.m):
        target.backward = "dense"
        target.reason = (
            f"O={rows} not divisible by m={config.m}: no N:M mask along O, so the backward uses W⊙F (dense backward)"
        )
    else:
        target.reason = f"{config.n}:{config.m}, backward={config.backward}"


def _dtype_mismatch(target: GemmTarget, weight: torch.Tensor) -> str | None:
    """Why a GEMM whose input and weight meet in different dtypes stays as traced: their own dtypes,
    or under autocast the ones it gives them (it leaves float64 alone). There eager PyTorch raises,
    and so does the GEMM left as it is (the sparse ops would cast the weight). Dynamo's trace lets
    such a ``linear``/``mm`` through, not a convolution (its fake kernel raises)."""
    x = example_value(target.x)
    if not isinstance(x, torch.Tensor):
        return None
    autocast = autocast_dtype(target.node, weight.device.type)
    if autocast_to(x.dtype, autocast) == autocast_to(weight.dtype, autocast):
        return None
    mismatch = f"input dtype {x.dtype} is not the weight's {weight.dtype}"
    where = f"under autocast to {autocast} (which leaves float64 alone)" if autocast else "outside autocast"
    return f"{mismatch} {where}: left as traced, it raises as in eager"


def _dense_reason(
    value: torch.Tensor,
    cols: int,
    info: ParamInfo,
    placeholder: fx.Node,
    kind: str,
    extra: dict,
    config: SparsityConfig,
    k_name: str = "K",
    separate: bool = False,
) -> str | None:
    """Why a parameter GEMM stays dense (SPEC §10), or ``None`` if it can be sparsified;
    ``separate``: the weight's uses are separate inference calls, no tie (``_inference_calls``)."""
    if value.dtype not in FLOAT_DTYPES:
        return f"dtype {value.dtype} is not floating point"
    if isinstance(value, torch.distributed.tensor.DTensor):
        return "a DTensor weight (tensor parallelism): nmsparse's ops have no sharding rules"
    if 0 in value.shape:
        return f"empty weight {list(value.shape)}: nothing to prune"
    if not value.requires_grad:
        return "frozen parameter (requires_grad=False)"
    filtered = config.name_filter_reason(info.name)
    if filtered:
        return filtered
    traced = example_value(placeholder)
    if traced is not None and any(isinstance(size, torch.SymInt) for size in traced.shape):
        # dynamo's force_parameter_static_shapes=False: one graph for every weight size
        return f"weight sizes {list(traced.shape)} are symbolic: N:M needs sizes known at compile time"
    if info.shared_as:  # tied by the modules, whichever graphs the uses fall into
        return f"tied: parameter shared with {', '.join(info.shared_as)}"
    uses = consumers(placeholder)
    if len(uses) > 1 and not separate:  # two GEMMs (a tie in one graph), or a GEMM and another op
        return f"tied: parameter used by {len(uses)} nodes ({', '.join(sorted(map(op_name, uses)))})"
    if info.lookup:  # the embedding's lookup in another graph (a tied output head)
        return f"tied: also the table of an embedding lookup ({info.lookup})"
    if extra:
        return f"{kind} with extra arguments {sorted(extra)}"
    if not divisible(cols, config.m):
        return f"{k_name}={cols} not divisible by m={config.m}"
    return None


def _inference_calls(uses: list[fx.Node], module_forward: bool) -> bool:
    """Whether a weight's several uses are GEMMs run without autograd, each in another call of a
    module (dynamo's module-stack keys ``<id>``, ``<id>@1``, ... of the outermost module called), as
    in a compiled generate or test-time-augmentation function: each call masks the weight alike and
    none trains, as the reference runs them, one forward each. Inside a module's own forward
    (``module_forward``) every use is of one forward, as the reference's, so several are a tie (a
    block run three times, a teacher called twice under ``no_grad``); so are two uses in one call."""
    if module_forward or len(uses) < 2:
        return False
    outer = []
    for use in uses:
        keys = list(use.meta.get("nn_module_stack") or {})
        if _gemm_kind(use) is None or getattr(example_value(use), "requires_grad", True) or not keys:
            return False
        outer.append(keys[0])
    return len(set(outer)) == len(outer)


def _decide_conv(
    target: GemmTarget,
    w: Any,
    extra: dict,
    config: SparsityConfig,
    params: Mapping[str, ParamInfo],
    values: Mapping[fx.Node, Any],
    separate: Collection[fx.Node] = (),
) -> GemmTarget:
    """SPEC §1/§10 for a convolution: ``W`` ``[O, C/groups, *k]``, N:M along ``C`` per kernel position."""
    source = _through_casts(w)
    info = params.get(source.name) if isinstance(source, fx.Node) and source.op == "placeholder" else None
    value = values.get(source, info.param) if info is not None else example_value(w)
    if info is None and not isinstance(value, torch.Tensor):
        target.reason = "weight is not an nn.Parameter"
        return target
    groups = extra["groups"]
    unbatched = target.input_shape is not None and len(target.input_shape) == value.dim() - 1
    geometry = (extra["stride"], extra["padding"], extra["dilation"], groups, unbatched)
    target.conv = ConvInfo(tuple(value.shape[2:]), *geometry)
    rows, cols = value.shape[0], value.shape[1]
    if "transpose" in target.op:  # W [C_in, C_out/groups, *k]: O = C_out, reduced over C_in/groups
        rows, cols = cols * groups, rows // groups
    k = 1
    for size in value.shape[2:]:
        k *= size
    shape = (size_hint(rows), size_hint(cols * k))  # a weight that is no parameter may have dynamic sizes
    target.weight_shape = shape if None not in shape else None
    # Rows of the implicit GEMM: batch × output positions (a transposed conv: input positions).
    positions = target.input_shape if "transpose" in target.op else _shape(target.node)
    if positions is not None:
        count = 1
        for size in positions[1:] if unbatched else (positions[0], *positions[2:]):
            count *= size
        target.tokens = size_hint(count)
    if info is None:
        target.reason = "weight is not an nn.Parameter"
        return target
    target.param_name, target.weight, target.operand, target.layout = info.name, source, w, "out_in"
    target.layer_index = info.index
    if "transpose" in target.op:
        target.reason = "transposed convolution"
        return target
    k_name = "C/groups" if groups > 1 else "C"
    reason = _dense_reason(value, cols, info, source, target.op, {}, config, k_name, source in separate)
    if reason is None and groups > 1 and not divisible(rows // groups, config.m):
        reason = f"grouped conv: O/groups={rows // groups} not divisible by m={config.m}"
    if reason:
        target.reason = reason
        return target
    _mark_sparse(target, rows, config)
    return target
