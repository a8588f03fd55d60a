"""Decomposition pre-pass: fused attention ops that hide their projection GEMMs are rewritten into
``F.linear`` + ``scaled_dot_product_attention`` so that ``find_targets`` can see the projections.

Dynamo keeps ``F.multi_head_attention_forward`` (``nn.MultiheadAttention`` in training or with
grad) and ``torch._transformer_encoder_layer_fwd`` (``nn.TransformerEncoderLayer``'s inference
fast path) as single nodes. Self-attention with packed projections — what ``nn.MultiheadAttention``
and ``nn.TransformerEncoderLayer`` use — is decomposed following PyTorch's own formulas; any
other variant stays fused, and ``node.meta["nmsparse_dense_reason"]`` says why.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from .utils import DENSE_REASON, example_value, join_region

_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = masked out) as the additive float mask PyTorch's attention uses."""
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def _dropout(weights: torch.Tensor, p: Any) -> torch.Tensor:
    """Attention-weight dropout with a dynamic ``p`` (a graph value under ``dynamic=True``)."""
    return F.dropout(weights, p=p) if p > 0.0 else weights


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, p: Any, causal: bool) -> torch.Tensor:
    """``scaled_dot_product_attention`` with a dynamic dropout ``p``."""
    return F.scaled_dot_product_attention(q, k, v, mask, p, causal)


def _layer_norm(x: torch.Tensor, shape: tuple, w: Any, b: Any, eps: Any) -> torch.Tensor:
    """``layer_norm`` with a dynamic ``eps``."""
    return F.layer_norm(x, shape, w, b, eps)


# Where dynamo passes a float as a graph value (``dynamic=True``), tracing the formulas below keeps
# these three as calls, which AOTAutograd then traces with the symbolic float.
for _helper in (_dropout, _sdpa, _layer_norm):
    torch.fx.wrap(_helper.__name__)


def _mha(static: dict[str, Any]):
    """``F.multi_head_attention_forward`` for batched self-attention with packed projections."""
    heads, embed = static["num_heads"], static["embed_dim"]
    dropout_p, dynamic_p = static["dropout_p"], static["dynamic_p"]  # dynamic_p: node_p carries it
    need_weights = static["need_weights"]
    mask_bool, kpm_bool = static["attn_mask_bool"], static["kpm_bool"]
    has_mask, has_kpm, has_in_bias = static["has_attn_mask"], static["has_kpm"], static["has_in_bias"]
    use_causal_hint = static["is_causal"] and not has_kpm and not need_weights

    def attention(query, in_w, in_b, out_w, out_b, attn_mask, key_padding_mask, node_p):
        tgt, bsz = query.shape[0], query.shape[1]
        head = embed // heads
        proj = F.linear(query, in_w, in_b if has_in_bias else None)
        q, k, v = proj.unflatten(-1, (3, embed)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
        mask = None
        if has_mask and not use_causal_hint:
            mask = _additive(attn_mask, q.dtype) if mask_bool else attn_mask
            if static["attn_mask_dim"] == 2:
                mask = mask.unsqueeze(0)
        q = q.view(tgt, bsz * heads, head).transpose(0, 1)
        k = k.view(k.shape[0], bsz * heads, head).transpose(0, 1)
        v = v.view(v.shape[0], bsz * heads, head).transpose(0, 1)
        src = k.shape[1]
        if has_kpm:
            kpm = _additive(key_padding_mask, q.dtype) if kpm_bool else key_padding_mask
            kpm = kpm.view(bsz, 1, 1, src).expand(-1, heads, -1, -1).reshape(bsz * heads, 1, src)
            mask = kpm if mask is None else mask + kpm
        if need_weights:
            scores = torch.bmm(q * math.sqrt(1.0 / float(head)), k.transpose(-2, -1))
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            if dynamic_p:
                weights = _dropout(weights, node_p)
            elif dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.bmm(weights, v).transpose(0, 1).contiguous().view(tgt * bsz, embed)
            out = F.linear(out, out_w, out_b).view(tgt, bsz, embed)
            weights = weights.view(bsz, heads, tgt, src)
            return out, weights.mean(dim=1) if static["average_attn_weights"] else weights
        if mask is not None:
            one_batch = not has_kpm and (static["attn_mask_dim"] == 2 or static["attn_mask_rows"] == 1)
            mask = mask.unsqueeze(0) if one_batch else mask.view(bsz, heads, mask.shape[-2], src)
        q, k, v = q.view(bsz, heads, tgt, head), k.view(bsz, heads, src, head), v.view(bsz, heads, src, head)
        sdpa, p = (_sdpa, node_p) if dynamic_p else (F.scaled_dot_product_attention, dropout_p)
        out = sdpa(q, k, v, mask, p, use_causal_hint)
        out = out.permute(2, 0, 1, 3).contiguous().view(bsz * tgt, embed)
        return F.linear(out, out_w, out_b).view(tgt, bsz, embed), None

    return attention


def _encoder_layer(static: dict[str, Any]):
    """``torch._transformer_encoder_layer_fwd`` (batch-first) as the unfused formula the layer runs
    off its fast path, a mask added to the attention scores as ``F.multi_head_attention_forward``
    adds it. The mask is what ``merge_masks`` made of the layer's masks (a bool one turned additive):
    ``[B, L]`` key padding (mask type 1), or ``[B, heads, L, L]`` (2); ``[L, L]`` (0) also works."""
    embed, heads = static["embed_dim"], static["num_heads"]
    activation = F.gelu if static["use_gelu"] else F.relu
    norm = _layer_norm if isinstance(static["eps"], fx.Node) else F.layer_norm
    mask_type, mask_bool = static["mask_type"], static["mask_bool"]

    def layer(src, qkv_w, qkv_b, proj_w, proj_b, n1_w, n1_b, n2_w, n2_b, w1, b1, w2, b2, eps, mask):
        def self_attention(h):
            bsz, tgt = h.shape[0], h.shape[1]
            q, k, v = F.linear(h, qkv_w, qkv_b).view(bsz, tgt, 3, heads, embed // heads).permute(2, 0, 3, 1, 4)
            scores_bias = None
            if mask_type is not None:
                scores_bias = _additive(mask, q.dtype) if mask_bool else mask
                if mask_type == 1:  # key padding [B, L], over every head and query
                    scores_bias = scores_bias.view(bsz, 1, 1, tgt)
                elif mask_type == 0:  # one [L, L] mask for every batch entry and head
                    scores_bias = scores_bias.view(1, 1, tgt, tgt)
            out = F.scaled_dot_product_attention(q, k, v, scores_bias).transpose(1, 2).reshape(bsz, tgt, embed)
            return F.linear(out, proj_w, proj_b)

        def feed_forward(h):
            return F.linear(activation(F.linear(h, w1, b1)), w2, b2)

        x = src
        if static["norm_first"]:
            x = x + self_attention(norm(x, (embed,), n1_w, n1_b, eps))
            return x + feed_forward(norm(x, (embed,), n2_w, n2_b, eps))
        x = norm(x + self_attention(x), (embed,), n1_w, n1_b, eps)
        return norm(x + feed_forward(x), (embed,), n2_w, n2_b, eps)

    return layer


def mha_plan(arguments: dict[str, Any], value: Any = example_value) -> tuple[Any, list[Any], str | None]:
    """For ``F.multi_head_attention_forward``'s bound ``arguments``: the decomposed function and its
    inputs, or ``(None, [], reason)`` when the call stays fused. ``value`` maps an argument to a
    tensor with its shape and dtype (an example value for graph nodes, itself for real tensors)."""
    a = dict(_MHA_SIGNATURE.bind(**arguments).arguments)
    for name, parameter in _MHA_SIGNATURE.parameters.items():
        a.setdefault(name, parameter.default)
    query = value(a["query"])
    checks = [
        (a["query"] is a["key"] is a["value"], "query, key and value that differ (not self-attention)"),
        (not a["use_separate_proj_weight"], "separate q/k/v projection weights"),
        (a["bias_k"] is None and a["bias_v"] is None and not a["add_zero_attn"], "bias_k/bias_v/add_zero_attn"),
        (a["static_k"] is None and a["static_v"] is None, "static_k/static_v"),
        (isinstance(query, torch.Tensor) and query.dim() == 3, "unbatched input"),
        (not (a["is_causal"] and a["attn_mask"] is None), "is_causal without attn_mask"),
    ]
    for ok, why in checks:
        if not ok:
            return None, [], f"multi_head_attention_forward with {why}: projections run dense inside the fused op"
    mask = value(a["attn_mask"]) if a["attn_mask"] is not None else None
    kpm = value(a["key_padding_mask"]) if a["key_padding_mask"] is not None else None
    # Under dynamic=True dynamo passes the dropout probability as a graph value: an input of the formula.
    node_p = a["dropout_p"] if a["training"] and isinstance(a["dropout_p"], fx.Node) else None
    static = {
        "num_heads": a["num_heads"], "embed_dim": a["embed_dim_to_check"],
        "dropout_p": a["dropout_p"] if a["training"] and node_p is None else 0.0, "dynamic_p": node_p is not None,
        "need_weights": a["need_weights"], "is_causal": a["is_causal"],
        "average_attn_weights": a["average_attn_weights"], "has_in_bias": a["in_proj_bias"] is not None,
        "has_attn_mask": mask is not None, "has_kpm": kpm is not None,
        "attn_mask_bool": mask is not None and mask.dtype == torch.bool,
        "attn_mask_dim": mask.dim() if mask is not None else 0,
        "attn_mask_rows": mask.shape[0] if mask is not None else 0,
        "kpm_bool": kpm is not None and kpm.dtype == torch.bool,
    }  # fmt: skip
    inputs = [a["query"], a["in_proj_weight"], a["in_proj_bias"], a["out_proj_weight"], a["out_proj_bias"],
              a["attn_mask"], a["key_padding_mask"], node_p]  # fmt: skip
    return _mha(static), inputs, None


def _mha_plan(node: fx.Node) -> tuple[Any, list[Any], str | None]:
    return mha_plan(_MHA_SIGNATURE.bind(*node.args, **node.kwargs).arguments)


def _encoder_plan(node: fx.Node) -> tuple[Any, list[Any], str | None]:
    (src, embed, heads, qkv_w, qkv_b, proj_w, proj_b, use_gelu, norm_first, eps, n1_w, n1_b, n2_w, n2_b,
     w1, b1, w2, b2, *rest) = node.args  # fmt: skip
    mask = rest[0] if rest else node.kwargs.get("mask")
    mask_type = rest[1] if len(rest) > 1 else node.kwargs.get("mask_type")
    mask_value = example_value(mask) if mask is not None else None
    if mask is not None and not (mask_type in (0, 1, 2) and mask_value.dim() == (2, 2, 4)[mask_type]):
        why = f"transformer encoder fast path with a mask of type {mask_type}"
        return None, [], f"{why}: projections run dense inside the fused op"
    static = {"embed_dim": embed, "num_heads": heads, "eps": eps, "use_gelu": use_gelu, "norm_first": norm_first,
              "mask_type": mask_type if mask is not None else None,
              "mask_bool": mask_value is not None and mask_value.dtype == torch.bool}  # fmt: skip
    inputs = [src, qkv_w, qkv_b, proj_w, proj_b, n1_w, n1_b, n2_w, n2_b, w1, b1, w2, b2, eps, mask]
    return _encoder_layer(static), inputs, None


_PLANS = {F.multi_head_attention_forward: _mha_plan, torch._transformer_encoder_layer_fwd: _encoder_plan}


def _inline(graph: fx.Graph, node: fx.Node, fn: Any, inputs: list[Any]) -> None:
    """Replace ``node`` with the symbolically traced graph of ``fn(*inputs)``."""
    names = list(inspect.signature(fn).parameters)
    concrete = {name: value for name, value in zip(names, inputs, strict=True) if not isinstance(value, fx.Node)}
    traced = fx.symbolic_trace(fn, concrete_args=concrete)
    for check in traced.graph.find_nodes(op="call_function", target=torch.fx._symbolic_trace._assert_is_none):
        traced.graph.erase_node(check)  # a None argument's guard: AOTAutograd's cache refuses graphs with one
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    env = {p: value for p, value in zip(placeholders, inputs, strict=True) if p.name not in concrete}
    first = node.prev
    with graph.inserting_before(node):
        out = graph.graph_copy(traced.graph, env)
    join_region(node, first)
    if isinstance(out, fx.Node):
        node.replace_all_uses_with(out)
    else:  # a tuple, read through getitem nodes; an entry may be None (no attention weights)
        for reader in list(node.users):
            value = out[reader.args[1]]
            for use in list(reader.users):
                use.args = fx.map_arg(use.args, lambda n, r=reader, v=value: v if n is r else n)
                use.kwargs = fx.map_arg(use.kwargs, lambda n, r=reader, v=value: v if n is r else n)
            graph.erase_node(reader)
    graph.erase_node(node)


def decompose_attention(gm: fx.GraphModule) -> PassResult:
    """Decompose the supported fused attention nodes of ``gm`` in place: ``gm``, and whether any
    changed (``modified``), as ``torch.fx.passes.infra`` passes return.

    Works on the (copied) dynamo graph before ``find_targets``; the new nodes have no example
    values until the caller propagates them.
    """
    changed = False
    for node in list(gm.graph.nodes):
        plan = _PLANS.get(node.target) if node.op == "call_function" else None  # type: ignore[arg-type]
        if node.op == "call_function" and node.target is torch._native_multi_head_attention:
            node.meta[DENSE_REASON] = "native multi-head attention fast path: projections run dense inside it"
        if plan is None:
            continue
        fn, inputs, reason = plan(node)
        if fn is None:
            node.meta[DENSE_REASON] = reason
            continue
        _inline(gm.graph, node, fn, inputs)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, changed)
