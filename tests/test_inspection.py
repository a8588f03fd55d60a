"""explain, the report table, graph names, exports and NMSPARSE_DUMP_DIR."""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import re
import sys

import pytest
import torch
import torch.utils.checkpoint
from conftest import (
    MLP,
    CheckpointedPair,
    SelectivePair,
    assert_close,
    cpu_mask_note,
    save_ops_named,
    sgd_step_both,
    train_and_compare,
)
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

import nmcompile
from nmcompile import reference
from nmcompile.inspection import IN_PLACE_NOTE
from nmcompile.kernels import cpu_mask


def _names(gm: torch.fx.GraphModule) -> set[str]:
    return {node.name for node in gm.graph.nodes}


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
@pytest.mark.parametrize("c_kernel", [True, False], ids=["c_kernel", "composite"])
def test_graph_nodes_say_what_they_are(inner, c_kernel, monkeypatch):
    """Forward and backward graphs after AOTAutograd carry <layer>_fwd_masked, _bwd_perm, _bwd_mask,
    ..., and the backward's inputs the names of the forward outputs they are; with the C mask
    kernels (CPU, fp32, M=4) the Bi-Mask backward weight is one ``_bwd_mask`` node, and the forward
    GEMM the inlined ``addmm``, whose op kept ``W ⊙ F`` saved where a composite mask would not."""
    if not c_kernel:
        monkeypatch.setattr(cpu_mask, "blocker", lambda weight, m: "off for this test")
    elif (why := cpu_mask.blocker(torch.zeros(4, 4), 4)) is not None:
        pytest.skip(f"C mask kernel unavailable: {why}")
    report = nmcompile.explain(MLP(), torch.randn(4, 32), inner=inner)
    fwd, bwd = _names(report.forward_graph), _names(report.backward_graph)
    assert {"fc1_weight", "fc1_perm", "fc1_fwd_masked", "fc1_fwd_gemm", "fc2_fwd_masked", "head_fwd_gemm"} <= fwd
    assert "head_perm" in fwd  # O=16 is divisible by 4: Bi-Mask backward, so a permutation input
    assert {"fc2_bwd_mask", "fc2_bwd_input_grad", "fc2_bwd_weight_grad", "fc2_bwd_srste"} <= bwd
    assert {"fc1_bwd_weight_grad", "fc1_bwd_bias_grad"} <= bwd
    assert "fc1_bwd_mask" not in bwd  # the input does not require grad: no dX GEMM for fc1
    # The backward's inputs carry the names of the forward outputs they are, suffixed where the
    # backward has a node of that name too (SR-STE's ``fc1_bwd_srste`` is partly computed forward).
    saved = {n.name for n in report.backward_graph.graph.find_nodes(op="placeholder") if "tangents" not in n.name}
    outputs = {str(a) for a in report.forward_graph.graph.output_node().args[0]}
    assert {"fc2_weight", "fc2_perm"} <= saved
    # Inductor's partitioner saves W ⊙ F and makes the Bi-Mask weight backward (not the weight and
    # SR-STE's bool mask, forward): the inlined GEMM keeps that only where the C kernels read W ⊙ F.
    assert inner == "aot_eager" or "fc2_fwd_masked" in saved
    # With the C kernels the forward GEMM is inlined (``cpu_linear``): the node is the ``addmm`` itself;
    # else the op's overload without the autograd wrapper, which the compiled forward calls.
    gemm = next(n for n in report.forward_graph.graph.nodes if n.name == "fc1_fwd_gemm")
    assert gemm.target is (torch.ops.aten.addmm.default if c_kernel else torch.ops.nmsparse.sparse_linear.nograd)
    assert {name if name in outputs else re.sub(r"_\d+$", "", name) for name in saved} <= outputs
    masks = [n for n in report.backward_graph.graph.nodes if n.name.startswith("fc2_bwd_mask")]
    targets = {str(n.target) for n in masks}
    if c_kernel:
        assert targets == {"nmsparse.cpu_bimask_weight.default"} and "fc2_bwd_perm" not in bwd
        return
    # The composite mask op decomposes into plain comparisons Inductor can fuse: no sort, no topk.
    assert "fc2_bwd_perm" in bwd
    # Of the nodes a step decomposed into, its result takes the plain name (the first had: the scalar
    # 0 of ``where(F, W, 0)``, the backward input ``fc2_fwd_masked_1``, ``fc2_bwd_mask`` a detach).
    forward_nodes = {n.name: n for n in report.forward_graph.graph.nodes}
    backward_nodes = {n.name: n for n in report.backward_graph.graph.nodes}
    assert forward_nodes["fc2_fwd_masked"].target is torch.ops.aten.where.self
    assert forward_nodes["fc2_fwd_mask"].meta["val"].dtype == torch.bool
    assert backward_nodes["fc2_bwd_mask"].meta["val"].dtype == torch.bool
    assert backward_nodes["fc2_bwd_input_grad"].target is torch.ops.aten.mm.default
    assert not {name for name in saved if name.startswith("fc2_fwd_masked_")}
    assert {"aten.gt.Tensor", "aten.ge.Tensor", "aten.lt.Scalar", "aten.where.self"} <= targets
    assert not any("sort" in t or "topk" in t for t in targets)


class _ReluFFN(nn.Module):
    """Two Linear layers with a ReLU between: ReLU's backward reads its output, or a bool mask."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("shape", [(8, 32), (2, 4, 32)], ids=["2d", "3d"])
def test_the_forward_gemm_is_inlined_for_2d_inputs_and_saves_what_the_op_saved(shape):
    """With the C mask kernels, a 2-D input's forward GEMM is the inlined ``addmm`` (``cpu_linear``);
    a 3-D one keeps the ``sparse_linear`` op: inlined, the GEMM read a 2-D view of the ReLU output,
    and Inductor's partitioner saved that view and ReLU's bool mask beside it. Either way the
    forward saves the ReLU output once and no bool activation."""
    if (why := cpu_mask.blocker(torch.zeros(4, 4), 4)) is not None:
        pytest.skip(f"C mask kernel unavailable: {why}")
    torch._dynamo.reset()  # static shapes: the other case compiled the same forward
    report = nmcompile.explain(_ReluFFN(), torch.randn(*shape))
    nodes = {n.name: n for n in report.forward_graph.graph.nodes}
    inlined = len(shape) == 2
    assert nodes["down_fwd_gemm"].target is (
        torch.ops.aten.addmm.default if inlined else torch.ops.nmsparse.sparse_linear.nograd
    )
    outputs = report.forward_graph.graph.output_node().args[0][1:]
    saved = [v.meta["val"] for v in outputs if isinstance(v, torch.fx.Node) and isinstance(v.meta["val"], torch.Tensor)]
    activations = [(tuple(v.shape), v.dtype) for v in saved if tuple(v.shape[:-1]) == shape[:-1] and v.shape[-1] == 64]
    assert activations == [((*shape[:-1], 64), torch.float32)]  # the ReLU output, no view of it
    assert not any(v.dtype == torch.bool and v.numel() == 8 * 64 for v in saved)  # no ReLU mask


def test_state_inputs_keep_the_layer_spelling():
    """A layer named in camel case (``fcOut``) has its state inputs as ``fcOut_perm``,
    ``fcOut_step``, beside ``fcOut_fwd_gemm``: FX's placeholder naming would give ``fc_out_perm``."""

    class Camel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fcOut = nn.Linear(16, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fcOut(x)

    report = nmcompile.explain(Camel(), torch.randn(4, 16), inner="aot_eager", grad_prune="mvue24")
    fwd = _names(report.forward_graph)
    assert {"fcOut_perm", "fcOut_step", "fcOut_fwd_gemm"} <= fwd
    assert not {"fc_out_perm", "fc_out_step"} & fwd


def test_table_rows_and_flops():
    """One row per GEMM-like node with shapes, decision, reason and dense→N:M FLOPs per GEMM; no
    input-gradient FLOPs for the first layer, whose input needs no gradient (no dX GEMM runs)."""
    report = nmcompile.explain(MLP(), torch.randn(4, 32), inner="aot_eager", n=1, m=4)
    rows = {r.name: r for r in report.rows}
    fc1 = rows["fc1.weight"]
    assert (fc1.op, fc1.weight_shape, fc1.input_shape, fc1.nm, fc1.backward) == (
        "linear",
        (64, 32),
        (4, 32),
        "1:4",
        "bimask",
    )
    dense = 2 * 4 * 64 * 32
    assert fc1.flops == {
        "forward": (dense, dense // 4),
        "input_grad": (0, 0),
        "weight_grad": (dense, dense),
    }
    fc2 = rows["fc2.weight"]
    dense = 2 * 4 * fc2.weight_shape[0] * fc2.weight_shape[1]
    assert fc2.flops["input_grad"] == (dense, dense // 4)
    x = torch.randn(4, 32, requires_grad=True)
    assert nmcompile.explain(MLP(), x, inner="aot_eager", n=1, m=4).rows[0].flops["input_grad"] == (16384, 4096)
    for backward, executable in (("transposable", 4096), ("dense", 16384)):  # a transposable dX is N:M too
        row = nmcompile.explain(MLP(), x, inner="aot_eager", n=1, m=4, backward=backward).rows[0]
        assert row.flops["input_grad"] == (16384, executable), backward
    table = str(report)
    header = table.splitlines()[0]
    for column in ("parameter", "op", "W [O,K]", "N:M", "status", "backward", "fwd FLOPs", "dX FLOPs", "why"):
        assert column in header
    assert "16.4K→4.1K" in table and "head.weight" in table


@pytest.mark.parametrize(("grad_prune", "block"), [("mvue24", 4), ("mvue12", 2), ("mvue24_approx", 4)])
def test_pruned_weight_gradient_flops_count_the_padded_tokens(grad_prune, block):
    """SPEC §7: ``dY`` is pruned over the tokens zero-padded to whole blocks, so the weight-gradient
    GEMM runs half of the padded tokens: half of T where T fills its blocks, more than half
    otherwise, and more than the dense GEMM for a single token in a block of 4."""
    for tokens in (1, 3, 5, 8):
        x = torch.randn(tokens, 16, requires_grad=True)
        row = nmcompile.explain(nn.Linear(16, 16), x, inner="aot_eager", grad_prune=grad_prune).rows[0]
        padded = -(-tokens // block) * block
        assert row.flops["weight_grad"] == (2 * tokens * 256, 2 * (padded // 2) * 256), tokens
    assert row.flops["weight_grad"] == (4096, 2048)  # T = 8: exactly half


class _Collide(nn.Module):
    """``a.b_c`` (an ``nn.Linear``) and ``a_b.c`` (a raw ``[in, out]`` weight) spell one node name."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.a_b = nn.Module(), nn.Module()
        self.a.b_c = nn.Linear(16, 16)
        self.a_b.c = nn.Parameter(torch.randn(16, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(torch.zeros(16), self.a.b_c(x), self.a_b.c)


class _CollideLinears(nn.Module):
    """``a.b_c`` and ``a_b.c``, both ``nn.Linear``: weights and biases whose names spell one node name."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.a_b = nn.Module(), nn.Module()
        self.a.b_c, self.a_b.c = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a_b.c(self.a.b_c(x))


def test_layers_whose_names_spell_one_node_name_name_their_own_nodes_and_kernels():
    """Two sparse layers whose names give one node-name prefix: the second is numbered, so each
    row shows its own kernel (the Linear's forward mask on the C kernel, the ``[in, out]``
    weight's decomposed) and each GEMM node and graph input says whose it is (its weight and bias
    inputs too, in both graphs)."""
    report = nmcompile.explain(_Collide(), torch.randn(4, 16), inner="aot_eager")
    inputs = [n.name for n in report.forward_graph.graph.nodes if n.op == "placeholder"]
    perms = ["a_b_c_perm", "a_b_c_2_perm"]
    assert inputs == ["a_b_c_weight", "a_b_c_bias", "l_x_", "a_b_c_2", *perms]
    linears = nmcompile.explain(_CollideLinears(), torch.randn(4, 8), inner="aot_eager")
    inputs = [n.name for n in linears.forward_graph.graph.nodes if n.op == "placeholder"]
    assert inputs == ["a_b_c_weight", "a_b_c_bias", "l_x_", "a_b_c_2_weight", "a_b_c_2_bias", *perms]
    saved = [n.name for n in linears.backward_graph.graph.nodes if n.op == "placeholder"]
    assert saved[:4] == ["a_b_c_weight", "l_x_", "a_b_c_2_weight", "a_b_c_2_perm"]
    portable = "portable (not on CUDA (kernels='triton' with TRITON_INTERPRET=1 runs the kernels on the CPU)"
    assert [(r.name, r.kernel) for r in report.rows] == [
        ("a.b_c.weight", f"{portable}{cpu_mask_note()})"),
        ("a_b.c", f"{portable})"),
    ]
    gemms = {n.name: n for n in report.forward_graph.graph.nodes if n.name.endswith("_fwd_gemm")}
    assert sorted(gemms) == ["a_b_c_2_fwd_gemm", "a_b_c_fwd_gemm"]
    assert gemms["a_b_c_2_fwd_gemm"].args[0] is gemms["a_b_c_fwd_gemm"]  # the addmm takes the Linear's output


class _GradBranches(nn.Module):
    """A frozen first layer, a layer under ``no_grad()``, and self-attention (decomposed by the backend)."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen, self.teacher = nn.Linear(16, 16).requires_grad_(False), nn.Linear(16, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.frozen(x)
        with torch.no_grad():
            t = self.teacher(h)
        return self.attn(h, h, h, need_weights=False)[0] + t


def test_flops_count_only_the_gradient_gemms_that_run():
    """A gradient GEMM that does not run counts 0: the frozen weight's dW, both of the layer under
    ``no_grad()`` (its input needs a gradient, but nothing is recorded there); the attention's
    ``out_proj``, whose input the backend's decomposition made, gets its dX (it had 0: the values
    propagated for new nodes were detached). As the backward graph shows."""
    report = nmcompile.explain(_GradBranches(), torch.randn(2, 4, 16, requires_grad=True), inner="aot_eager")
    rows = {r.name: r for r in report.rows}
    dense = 2 * 8 * 16 * 16
    assert rows["frozen.weight"].flops == {"forward": (dense,) * 2, "input_grad": (dense,) * 2, "weight_grad": (0, 0)}
    assert rows["teacher.weight"].flops == {"forward": (dense, dense // 2), "input_grad": (0, 0), "weight_grad": (0, 0)}
    out_proj = rows["attn.out_proj.weight"]
    assert out_proj.sparse and out_proj.flops["input_grad"] == (dense, dense // 2)
    assert out_proj.flops["weight_grad"] == (dense, dense)
    backward = {n.name for n in report.backward_graph.graph.nodes}
    assert "attn_out_proj_bwd_input_grad" in backward and not any(name.startswith("teacher") for name in backward)


@pytest.mark.parametrize("hook", ["register_full_backward_hook", "register_full_backward_pre_hook"])
def test_weights_of_modules_with_backward_hooks_say_why_they_run_dense(hook):
    """Dynamo (torch 2.13) runs a module with a backward hook eagerly: its weight's row says so;
    in an ``nn.Sequential`` no graph is compiled at all, and the other rows name the hooked module."""
    model = MLP()
    getattr(model.fc2, hook)(lambda *args: None)
    rows = {r.name: r for r in nmcompile.explain(model, torch.randn(4, 32), inner="aot_eager").rows}
    assert not rows["fc2.weight"].sparse and rows["fc2.weight"].reason.startswith("its module has a backward hook")
    assert rows["fc1.weight"].sparse and rows["head.weight"].sparse
    sequential = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    getattr(sequential[0], hook)(lambda *args: None)
    report = nmcompile.explain(sequential, torch.randn(4, 16), inner="aot_eager")
    assert report.records == [] and not any(r.sparse for r in report.rows)
    assert {r.name: r.reason for r in report.rows} == {
        "0.weight": "its module has a backward hook: dynamo (torch 2.13) does not trace it; it runs eagerly, dense",
        "2.weight": "not a GEMM operand in any compiled graph (or in code dynamo did not trace); a backward hook "
        "(on 0) can keep dynamo out of the code calling its module",
    }


@pytest.mark.parametrize("hook", ["register_module_full_backward_hook", "register_module_full_backward_pre_hook"])
def test_weights_under_a_global_module_backward_hook_say_why_they_run_dense(hook):
    """A backward hook on every module (``torch.nn.modules.module.register_module_full_backward_hook``)
    keeps dynamo (torch 2.13) out of every module's call, as dense ``torch.compile`` shows: the
    rows name it (they said "not a GEMM operand in any compiled graph"), and a compile warns. Removed,
    the model is sparse."""
    handle = getattr(torch.nn.modules.module, hook)(lambda *args: None)
    try:
        rows = nmcompile.explain(MLP(), torch.randn(4, 32), inner="aot_eager").rows
    finally:
        handle.remove()
    why = "a global module backward hook (register_module_full_backward_hook): dynamo (torch 2.13) does not trace"
    assert [(r.name, r.sparse, r.reason) for r in rows] == [
        (name, False, f"{why} the modules it hooks; they run eagerly, dense")
        for name in ("fc1.weight", "fc2.weight", "head.weight")
    ]
    assert all(r.sparse for r in nmcompile.explain(MLP(), torch.randn(4, 32), inner="aot_eager").rows)
    handle = getattr(torch.nn.modules.module, hook)(lambda *args: None)
    try:
        with pytest.warns(UserWarning, match=r"nmsparse: a global module backward hook .* train dense"):
            torch.compile(MLP(), backend=nmcompile.backend(inner="aot_eager"))(torch.randn(4, 32))
    finally:
        handle.remove()


def test_explain_says_why_an_in_place_compiled_sequential_trains_dense():
    """``model.compile()`` on a model whose forward is torch.nn's own (``nn.Sequential``) compiles
    nothing in torch 2.13, with any backend, so it trains dense and no backend can warn. ``explain``
    compiles as the model is compiled, finds no graph, and says why; the same model not compiled
    in place is sparsified."""
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(4, 16)
    assert all(r.sparse for r in nmcompile.explain(model, x, inner="aot_eager").rows)
    model.compile(backend=nmcompile.backend(inner="aot_eager"))
    model(x).sum().backward()
    assert nmcompile.sparsity_state(model) == {}
    report = nmcompile.explain(model, x, inner="aot_eager")
    assert report.records == [] and [r.name for r in report.rows] == ["0.weight", "2.weight"]
    assert {r.reason for r in report.rows} == {IN_PLACE_NOTE.format("Sequential")}


class _Scores(nn.Module):
    """Attention-like scores ``q @ xᵀ``: a sparse projection, then a GEMM of two activations."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x) @ x.transpose(-1, -2)


def test_table_lists_activation_matmuls_as_dense():
    """GEMMs without a parameter operand are rows too, dense, with the reason."""
    rows = nmcompile.explain(_Scores(), torch.randn(2, 8, 16), inner="aot_eager").rows
    assert [(r.name.startswith("<"), r.sparse, r.reason) for r in rows if r.op == "matmul"] == [
        (True, False, "weight is not an nn.Parameter (input or buffer)")
    ]
    dense = 2 * (2 * 8) * 8 * 16  # [2, 8, 16] @ [2, 16, 8]: per batch a [8, 16] "weight"; x needs no gradient
    assert (rows[1].weight_shape, rows[1].flops) == (
        (8, 16),
        {"forward": (dense, dense), "input_grad": (dense, dense), "weight_grad": (0, 0)},
    )


class _BufferWeights(nn.Module):
    """GEMMs whose weight is a buffer (``x @ B``, ``F.linear(x, B)``, ``B.t()`` as ``mm``'s weight)
    or a vector, beside a sparse layer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 32)
        self.register_buffer("proj", torch.randn(32, 8))
        self.register_buffer("out", torch.randn(4, 8))
        self.register_buffer("vec", torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x) @ self.proj
        z = nn.functional.linear(y, self.out)
        return torch.mm(z, self.out) @ self.out.t() @ self.vec


def test_dense_rows_without_a_parameter_weight_count_their_flops():
    """A GEMM with a buffer or an activation as its weight reports ``W [O,K]`` and FLOPs from its
    shapes (they were ``?``): ``K`` is the input's last size, ``O`` the output's (1 for a vector)."""
    rows = nmcompile.explain(_BufferWeights(), torch.randn(5, 16), inner="aot_eager").rows
    assert [(r.op, r.weight_shape) for r in rows] == [
        ("linear", (32, 16)),
        ("matmul", (8, 32)),
        ("linear", (4, 8)),
        ("mm", (8, 4)),
        ("matmul", (4, 8)),
        ("matmul", (1, 4)),
    ]
    for row in rows[1:]:
        dense = 2 * 5 * row.weight_shape[0] * row.weight_shape[1]
        assert row.flops == {"forward": (dense, dense), "input_grad": (dense, dense), "weight_grad": (0, 0)}
    assert "?" not in str(nmcompile.explain(_BufferWeights(), torch.randn(5, 16), inner="aot_eager"))


def test_a_vector_parameter_weight_counts_its_flops():
    """``x @ v`` with a Parameter ``v`` (no 2-D weight: dense) counts its FLOPs as it does with a
    buffer ``v``, and its weight gradient besides (it had no shape and ``?`` FLOPs)."""

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.v = nn.Parameter(torch.randn(16))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.v

    (row,) = nmcompile.explain(Probe(), torch.randn(20, 16), inner="aot_eager").rows
    dense = 2 * 20 * 16
    assert (row.name, row.sparse, row.weight_shape) == ("v", False, (1, 16))
    assert row.flops == {"forward": (dense, dense), "input_grad": (0, 0), "weight_grad": (dense, dense)}
    assert row.reason == "weight is not a 2-D [out, in] or [in, out] operand"


def test_convolution_with_a_buffer_kernel_counts_its_flops():
    """A convolution whose kernel is a buffer is a dense row with its geometry and implicit-GEMM
    FLOPs, as a parameter kernel's row has them."""

    class Blur(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("kernel", torch.ones(4, 1, 3, 3) / 9)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.conv2d(x, self.kernel, stride=2, padding=1, groups=4)

    (row,) = nmcompile.explain(Blur(), torch.randn(2, 4, 8, 8, requires_grad=True), inner="aot_eager").rows
    dense = 2 * (2 * 4 * 4) * 4 * 9  # batch × 4x4 output positions, O = 4, K = C/groups · 3·3
    assert (row.weight_shape, row.conv) == ((4, 9), "k3x3 s2x2 p1x1 d1x1 g4")
    assert row.reason == "weight is not an nn.Parameter"
    assert row.flops == {"forward": (dense, dense), "input_grad": (dense, dense), "weight_grad": (0, 0)}


def test_networkx_and_dot_exports():
    """to_networkx has prefixed nodes with edges from inputs; to_dot is one cluster per graph."""
    report = nmcompile.explain(MLP(), torch.randn(4, 32), inner="aot_eager")
    g = report.to_networkx()
    assert g.has_edge("0:forward:fc1_weight", "0:forward:fc1_fwd_masked")
    assert g.nodes["0:forward:fc1_fwd_masked"]["nmsparse"] == "fc1_fwd_masked"
    assert g.nodes["0:backward:fc2_bwd_mask"]["kind"] == "backward"
    dot = report.to_dot()
    assert dot.startswith("digraph nmsparse {") and dot.rstrip().endswith("}")
    assert 'subgraph "cluster_0_forward"' in dot and 'subgraph "cluster_0_backward"' in dot
    assert dot.count("->") == g.number_of_edges()
    assert '[label="fc1_weight"' in dot  # a placeholder's label is its name once
    assert '[label="fc1_fwd_masked\\n' in dot  # an op's label: its name, then what it calls


def test_explain_leaves_the_model_untouched():
    """No .grad, no state in the user's registry, BatchNorm running stats restored."""
    model = nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = nmcompile.explain(model, torch.randn(8, 32), inner="aot_eager")
    assert report.backward_graph is not None
    assert all(p.grad is None for p in model.parameters())
    assert nmcompile.sparsity_state(model) == {}
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_explain_rejects_bad_options():
    with pytest.raises(ValueError, match="backward='nope'"):
        nmcompile.explain(MLP(), torch.randn(4, 32), backward="nope")


def test_explain_takes_keyword_inputs_in_kwargs():
    """The forward's keyword inputs go in ``kwargs=`` (other keywords are options): a masked input
    reaches the model, and a ``kwargs`` that is not a mapping is a TypeError."""

    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x, mask=None):
            return self.fc(x if mask is None else x * mask)

    x, mask = torch.randn(4, 8), torch.zeros(4, 8)
    report = nmcompile.explain(Masked(), x, kwargs={"mask": mask}, n=1, inner="aot_eager")
    assert [(r.name, r.sparse, r.reason) for r in report.rows] == [("fc.weight", True, "1:4, backward=bimask")]
    assert any(n.name == "l_mask_" for n in report.forward_graph.graph.nodes if n.op == "placeholder")
    with pytest.raises(TypeError, match="kwargs= takes the forward's keyword inputs as a mapping"):
        nmcompile.explain(Masked(), x, kwargs=[mask])


def test_explain_and_state_on_odd_inputs():
    """A function is a TypeError that says what to pass; a model without GEMMs gets a table that says
    so; a frozen model's one graph is ``inference_graph`` (forward and backward are ``None``)."""
    fn = torch.compile(lambda x: x * 2, backend="nmsparse")
    for call in (lambda: nmcompile.explain(fn, torch.ones(2)), lambda: nmcompile.sparsity_state(fn)):
        with pytest.raises(TypeError, match=r"expected an nn.Module .* got function; for a compiled function"):
            call()
    report = nmcompile.explain(nn.Sequential(nn.LayerNorm(8), nn.ReLU()), torch.randn(2, 8), inner="aot_eager")
    assert report.rows == [] and str(report).endswith("(no GEMM-like node in this graph: nothing to sparsify)")
    frozen = nn.Linear(8, 8).requires_grad_(False)
    report = nmcompile.explain(frozen, torch.randn(2, 8), inner="aot_eager")
    assert report.forward_graph is None and report.backward_graph is None
    assert report.inference_graph is not None and report.rows[0].reason == "frozen parameter (requires_grad=False)"
    targets = {n.target for n in report.inference_graph.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.addmm.default in targets or torch.ops.aten.mm.default in targets


def test_dump_dir_writes_graphs_and_table(tmp_path, monkeypatch):
    """NMSPARSE_DUMP_DIR: every compile writes report.txt, forward.py, backward.py and graphs.dot."""
    monkeypatch.setenv("NMSPARSE_DUMP_DIR", str(tmp_path))
    model = MLP()
    compiled = torch.compile(model, backend="nmsparse", options={"inner": "aot_eager"})
    compiled(torch.randn(4, 32)).sum().backward()
    (directory,) = list(tmp_path.iterdir())
    assert {p.name for p in directory.iterdir()} == {"report.txt", "forward.py", "backward.py", "graphs.dot"}
    assert "fc1.weight" in (directory / "report.txt").read_text()
    assert "fc1_fwd_masked" in (directory / "forward.py").read_text()
    assert "fc2_bwd_mask" in (directory / "backward.py").read_text()


def test_dump_dir_that_cannot_be_written_warns_and_training_goes_on(tmp_path, monkeypatch):
    """A dump directory that cannot be made (under a regular file) warns and compiles without the
    dump: the model trains sparse (the OSError failed the compile, and the training loop)."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("NMSPARSE_DUMP_DIR", str(blocker / "dump"))
    model = MLP()
    compiled = torch.compile(model, backend="nmsparse", options={"inner": "aot_eager"})
    with pytest.warns(UserWarning, match="cannot write the NMSPARSE_DUMP_DIR dump under .*; compiling without it"):
        compiled(torch.randn(4, 32)).sum().backward()
    assert {name: s["step"] for name, s in nmcompile.sparsity_state(model).items()} == dict.fromkeys(
        ["fc1.weight", "fc2.weight", "head.weight"], 1
    )


def test_dumps_of_two_runs_with_one_process_id_stay_apart(tmp_path, monkeypatch):
    """Two runs whose compiles get the same directory name (a container's PID 1, counters and
    compile ids from 0 again) write two directories, each whole (the second wrote into the first's)."""
    from nmcompile import inspection

    monkeypatch.setenv("NMSPARSE_DUMP_DIR", str(tmp_path))
    for _ in range(2):
        torch._dynamo.reset()
        monkeypatch.setattr(inspection, "_dump_counter", itertools.count())
        compiled = torch.compile(MLP(), backend="nmsparse", options={"inner": "aot_eager"})
        compiled(torch.randn(4, 32)).sum().backward()
    first, second = sorted(tmp_path.iterdir(), key=lambda p: len(p.name))
    assert second.name == first.name + "_2"
    for directory in (first, second):
        assert {p.name for p in directory.iterdir()} == {"report.txt", "forward.py", "backward.py", "graphs.dot"}


@pytest.mark.parametrize(
    ("flops", "text"),
    [((999_936, 499_968), "1M→500K"), ((999, 999), "999"), ((1500, 750), "1.5K→750"), ((0, 0), "0"),
     ((2_500_000_000, 1_250_000_000), "2.5G→1.25G"), ((999_500, 999_500), "1M"), (None, "?")],
)  # fmt: skip
def test_flops_are_written_in_the_unit_that_keeps_them_under_1000(flops, text):
    """Three significant digits, in the smallest unit that keeps them under 1000 after rounding."""
    from nmcompile.inspection import _fmt_flops

    assert _fmt_flops(flops) == text


def test_report_under_dynamic_shapes_names_the_dynamic_sizes():
    """Under ``dynamic=True`` one compile serves every batch size: the table writes a dynamic size
    by its symbol and ends with a line giving the value each had when traced, at which the FLOPs
    are counted; a static compile's table has no such line."""
    records = []
    backend = nmcompile.NMSparseBackend(nmcompile.SparsityConfig(inner="aot_eager"), on_compile=records.append)
    model = torch.compile(_Scores(), backend=backend, dynamic=True)
    for batch in (2, 3):
        model(torch.randn(batch, 5, 16)).sum().backward()
    (record,) = records
    q, scores = record.rows
    by_value = {value: name for name, value in q.dynamic}
    assert sorted(by_value) == [2, 5] and scores.dynamic == q.dynamic
    assert q.input_dims == (by_value[2], by_value[5], "16") and q.input_shape == (2, 5, 16)
    assert q.flops["forward"] == (2 * 10 * 16 * 16, 10 * 16 * 16)
    assert scores.weight_shape == (5, 16) and scores.flops["forward"] == (2 * 10 * 5 * 16,) * 2
    table = str(record)
    assert f"| {by_value[2]}x{by_value[5]}x16 " in table
    seen = ", ".join(f"{name}={value}" for name, value in sorted(q.dynamic))
    assert table.endswith(f"dynamic sizes, as first seen: {seen}; the shapes and FLOPs above are at those values")
    static = str(nmcompile.explain(_Scores(), torch.randn(2, 5, 16), inner="aot_eager"))
    assert "dynamic sizes" not in static and "| 2x5x16 " in static


def test_explain_keeps_one_record_when_dynamo_restarts_its_analysis():
    """A float attribute that differs from an earlier compile of the same code (dropout's ``p``)
    makes dynamo restart its analysis with the float as an input: the backend is called for each
    attempt, and the report keeps the last, so each layer is one row (it listed both)."""

    class Net(nn.Module):  # code of its own: dynamo remembers the floats it saw per code object
        def __init__(self, p: float) -> None:
            super().__init__()
            self.fc1, self.drop, self.fc2 = nn.Linear(16, 32), nn.Dropout(p), nn.Linear(32, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(self.drop(self.fc1(x)))

    x = torch.randn(4, 16)
    first = nmcompile.explain(Net(0.1), x, inner="aot_eager")
    second = nmcompile.explain(Net(0.2), x, inner="aot_eager")
    assert [r.attempt for r in first.records] == [0] and [r.attempt for r in second.records] == [1]
    (record,) = second.records
    assert record.trace_id == f"{record.compile_id}_1" and record.graphs.keys() == {"forward", "backward"}
    assert [r.name for r in second.rows] == ["fc1.weight", "fc2.weight"]
    assert str(second).count("fc1.weight") == 1


def test_size_hint_reads_symbolic_sizes_without_a_guard():
    """A backed size and an expression of it give their example values; an unbacked size has none."""
    from nmcompile.passes.utils import size_hint
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    env = ShapeEnv()
    tokens = env.create_symintnode(env.create_symbol(7, ConstantSource("t"), DimDynamic.DYNAMIC), hint=7)
    assert (size_hint(5), size_hint(tokens), size_hint(tokens * 32 + 1)) == (5, 7, 225)
    assert size_hint(env.create_unbacked_symint()) is None and size_hint("7") is None
    assert not env.guards  # reading the hints installed no guard


class _Checkpointed(nn.Module):
    """``fc1`` inside ``torch.utils.checkpoint`` (with ``context_fn`` where given: selective); ``fc2``
    outside it."""

    def __init__(self, context_fn: object = None) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.options = {} if context_fn is None else {"context_fn": context_fn}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.utils.checkpoint.checkpoint(lambda t: torch.relu(self.fc1(t)), x, use_reentrant=False, **self.options)
        return self.fc2(h)


def _trains_as_reference_without_fc1(base: nn.Module, shape: tuple, **options) -> None:
    """Three SGD steps of ``base`` compiled give the gradients of the reference with ``fc1``
    excluded, and only ``fc2`` has a sparsity state."""
    ref = reference.sparsify(copy.deepcopy(base), exclude=[r"^fc1\."], **options)
    mine = copy.deepcopy(base)
    compiled = torch.compile(mine, backend=nmcompile.backend(inner="aot_eager", **options))
    for _ in range(3):
        x = torch.randn(*shape)
        for model in (ref, compiled):
            model(x).square().mean().backward()
        for p, q in zip(ref.parameters(), mine.parameters(), strict=True):
            assert_close(q.grad, p.grad)
        sgd_step_both(ref, mine, 0.1)
    assert set(nmcompile.sparsity_state(mine)) == {"fc2.weight"}


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_gemms_in_an_activation_checkpoint_region_train_sparse_and_are_recomputed(inner):
    """A ``torch.utils.checkpoint`` region inside the compiled code is inlined with AOTAutograd's own
    recompute tags: its layers train sparse, as the reference (they ran dense), and its activations
    are recomputed in the backward, not saved (the same model without the checkpoint saves both ReLUs'
    outputs)."""
    x = torch.randn(4, 16)
    saved = {}
    for checkpointed in (True, False):
        report = nmcompile.explain(CheckpointedPair(checkpointed), x, inner=inner)
        assert [(r.name, r.sparse) for r in report.rows] == [(f"fc{k}.weight", True) for k in (1, 2, 3)]
        outputs = report.records[0].graphs["forward"].graph.output_node().args[0]
        hidden = [o for o in outputs if isinstance(o, torch.fx.Node) and o.meta["val"].shape == (4, 32)]
        saved[checkpointed] = [o.name for o in hidden]
    assert saved[True] == [] and {"relu", "relu_1"} <= set(saved[False]), saved
    torch.manual_seed(0)
    _, states = train_and_compare(CheckpointedPair, (4, 16), steps=3, n=2, m=4, inner=inner, grad_prune="mvue24")
    assert sorted(states) == ["fc1.weight", "fc2.weight", "fc3.weight"]


class _CheckpointedEncoder(nn.Module):
    """An encoder layer (decomposed self-attention) in an activation-checkpoint region, or not."""

    def __init__(self, checkpointed: bool) -> None:
        super().__init__()
        self.checkpointed = checkpointed
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = (
            torch.utils.checkpoint.checkpoint(self.layer, x, use_reentrant=False)
            if self.checkpointed
            else self.layer(x)
        )
        return self.head(h)


def test_attention_in_an_activation_checkpoint_region_is_recomputed_and_trains_as_without_it():
    """The nodes the attention decomposition makes join the region: the forward saves no activation
    of the layer (it saved attention's q, k, v and output), and training gives the gradients of
    the same model without the checkpoint, exactly, and of the reference (which routes the
    attention's projections in the block's rerun too: it raised ``CheckpointError``)."""
    x = torch.randn(2, 4, 32)
    report = nmcompile.explain(_CheckpointedEncoder(True), x)
    assert all(row.sparse for row in report.rows) and len(report.rows) == 5
    outputs = report.records[0].graphs["forward"].graph.output_node().args[0]
    activations = [
        o.name for o in outputs if isinstance(o, torch.fx.Node) and o.op != "placeholder" and o.meta["val"].dim() >= 2
    ]
    assert [name for name in activations if not name.endswith("_fwd_masked")] == ["head_fwd_gemm"]
    torch.manual_seed(0)
    plain = _CheckpointedEncoder(False)
    checkpointed = copy.deepcopy(plain)
    checkpointed.checkpointed = True
    runs = [torch.compile(m, backend=nmcompile.backend(n=2, m=4)) for m in (plain, checkpointed)]
    for step in range(3):
        x = torch.randn(2, 4, 32)
        for run in runs:
            run(x).square().mean().backward()
        for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
            assert torch.equal(p.grad, q.grad), f"step {step}: {name}"
        sgd_step_both(plain, checkpointed, 0.1)
    _, states = train_and_compare(functools.partial(_CheckpointedEncoder, True), (2, 4, 32), steps=2, n=2, m=4)
    assert len(states) == 5


class _NormedRegion(nn.Module):
    """``fc1`` and a BatchNorm (running statistics updated in place) in a checkpoint region, or not."""

    def __init__(self, checkpointed: bool = True) -> None:
        super().__init__()
        self.checkpointed = checkpointed
        self.fc1, self.bn, self.fc2 = nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 8)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.fc1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.utils.checkpoint.checkpoint(self.body, x, use_reentrant=False) if self.checkpointed else self.body(x)
        return self.fc2(h)


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_a_checkpoint_region_that_updates_a_buffer_trains_as_without_the_checkpoint(inner):
    """A BatchNorm inside a checkpoint region updates its running statistics in the forward: the
    recomputed region reads them as the forward did, so gradients and statistics equal the same
    model's without the checkpoint (``inner="aot_eager"`` raised an in-place-modification error at
    the backward: AOTAutograd wrote the buffers back before the backward's recompute read them)."""
    torch.manual_seed(0)
    plain = _NormedRegion(False)
    checkpointed = copy.deepcopy(plain)
    checkpointed.checkpointed = True
    runs = [torch.compile(m, backend=nmcompile.backend(inner=inner)) for m in (plain, checkpointed)]
    for step in range(3):
        x = torch.randn(8, 8)
        for run in runs:
            run(x).square().mean().backward()
        for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
            assert_close(q.grad, p.grad, what=f"step {step}: {name}")
        sgd_step_both(plain, checkpointed, 0.1)
    assert_close(checkpointed.bn.running_mean, plain.bn.running_mean)
    assert_close(checkpointed.bn.running_var, plain.bn.running_var)
    assert int(checkpointed.bn.num_batches_tracked) == 3
    assert sorted(nmcompile.sparsity_state(checkpointed)) == ["fc1.weight", "fc2.weight"]


class _CheckpointsInARegion(nn.Module):
    """Blocks each run through one ``nested_compile_region`` function that checkpoints the block."""

    def __init__(self, blocks: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(32, 32) for _ in range(blocks))
        self.head = nn.Linear(32, 8)

    @torch.compiler.nested_compile_region
    def run(self, block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(block, h, use_reentrant=False).relu()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = self.run(block, x)
        return self.head(x)


def test_checkpoints_inside_a_nested_compile_region_called_three_times_train_as_the_reference():
    """Dynamo's later calls of the region share one checkpoint body once inlined; inlining the first
    removed the body the others still read (three calls and more failed to compile)."""
    _, states = train_and_compare(functools.partial(_CheckpointsInARegion, 3), (4, 32), steps=2, inner="aot_eager")
    assert sorted(states) == ["blocks.0.weight", "blocks.1.weight", "blocks.2.weight", "head.weight"]


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_gemms_in_a_selective_checkpoint_region_train_sparse_under_its_policy(inner):
    """A checkpoint given a ``context_fn`` (selective checkpointing) is inlined for the rewrite and
    made a region again after it (``outline_regions``): its layers train sparse, as the reference
    (they ran dense), and its policy, which sees each sparse GEMM as an ``nmsparse`` op, decides what
    the forward saves: those GEMMs' outputs where it saves them, no activation of the region where
    it recomputes all; the masked weights are saved, as everywhere."""
    x = torch.randn(4, 16)
    saved = {}
    for saves in ("", "nmsparse."):
        report = nmcompile.explain(SelectivePair(saves), x, inner=inner)
        assert [(r.name, r.sparse) for r in report.rows] == [(f"fc{k}.weight", True) for k in (1, 2, 3)]
        outputs = report.records[0].graphs["forward"].graph.output_node().args[0]
        hidden = [o for o in outputs if isinstance(o, torch.fx.Node) and o.meta["val"].shape == (4, 32)]
        saved[saves] = sorted(o.name for o in hidden if o.op != "placeholder")
    assert saved == {"": [], "nmsparse.": ["fc1_fwd_gemm", "fc2_fwd_gemm"]}
    torch.manual_seed(0)
    _, states = train_and_compare(SelectivePair, (4, 16), steps=3, inner=inner, grad_prune="mvue24")
    assert sorted(states) == ["fc1.weight", "fc2.weight", "fc3.weight"]


class _TwoRegions(nn.Module):
    """``fc0``, then ``fc1`` and ``fc2`` each in a checkpoint region of the kind ``order`` names
    (``"selective"``: a policy that recomputes everything)."""

    def __init__(self, order: tuple[str, str]) -> None:
        super().__init__()
        self.order = order
        self.fc0, self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 32)
        self.context_fn = functools.partial(create_selective_checkpoint_contexts, functools.partial(save_ops_named, ""))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc0(x)
        for kind, layer in zip(self.order, (self.fc1, self.fc2), strict=True):
            options = {"context_fn": self.context_fn} if kind == "selective" else {}
            x = torch.utils.checkpoint.checkpoint(
                lambda t, f=layer: f(t).relu().sin(), x, use_reentrant=False, **options
            )
        return x


@pytest.mark.parametrize("order", [("selective", "plain"), ("plain", "selective"), ("selective", "selective")])
def test_a_region_read_by_the_next_one_saves_its_output_as_dense_compile_does(order):
    """Two checkpoint regions in a row, one selective: the forward saves the first region's output,
    which the second reads, as dense ``torch.compile`` does (AOTAutograd's partitioner saves it where
    the reader's region number is the larger; plain regions numbered apart from the selective ones
    lost it after a selective region), and nothing else of the regions."""
    torch.manual_seed(0)
    report = nmcompile.explain(_TwoRegions(order), torch.randn(4, 16), inner="aot_eager")
    assert all(row.sparse for row in report.rows) and len(report.rows) == 3
    saved = report.records[0].graphs["forward"].graph.output_node().args[0][1:]  # after the model's output
    hidden = [o.name for o in saved if isinstance(o, torch.fx.Node) and o.meta["val"].shape == (4, 32)]
    assert sorted(name for name in hidden if not name.startswith("fc0")) == ["sin"], hidden
    torch.manual_seed(0)
    train_and_compare(functools.partial(_TwoRegions, order), (4, 16), steps=2, inner="aot_eager")


class _RegionBlocks(nn.Module):
    """Three blocks, each ``fc1``, a graph break (dynamo then reuses one graph for every block), and
    ``fc2`` in a selective and ``fc3`` in a plain checkpoint region."""

    class Block(nn.Module):
        def __init__(self, context_fn: object) -> None:
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)
            self.context_fn = context_fn

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.fc1(x).relu()
            torch._dynamo.graph_break()
            x = torch.utils.checkpoint.checkpoint(
                lambda t: self.fc2(t).relu().sin(), x, use_reentrant=False, context_fn=self.context_fn
            )
            return torch.utils.checkpoint.checkpoint(lambda t: self.fc3(t).relu().sin(), x, use_reentrant=False)

    def __init__(self) -> None:
        super().__init__()
        context_fn = functools.partial(create_selective_checkpoint_contexts, functools.partial(save_ops_named, ""))
        self.blocks = nn.ModuleList(self.Block(context_fn) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def test_a_reused_block_graph_with_checkpoint_regions_runs_its_variant_as_the_reference():
    """Where ``include`` makes dynamo's reused block graph sparsify another block otherwise, that
    block runs the graph rewritten for it eagerly, its checkpoint regions (made regions again)
    with it: it trains as the reference (the sparse ops' backward failed under the eager
    checkpoint, reading its saved tensors twice)."""
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="dynamo reuses a compiled graph"):
        _, states = train_and_compare(_RegionBlocks, (4, 32), steps=2, inner="aot_eager", include=r"^blocks\.1\.")
    assert sorted(states) == [f"blocks.1.fc{k}.weight" for k in (1, 2, 3)]


class _RandomRegion(nn.Module):
    """``fc`` then a checkpoint region holding a random op (dropout) or attention (SDPA)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.fc, self.drop = nn.Linear(8, 8), nn.Dropout(0.1)

    def body(self, h: torch.Tensor) -> torch.Tensor:
        if self.kind == "dropout":
            return self.drop(h).relu()
        h = h.view(2, 4, 2, 4).transpose(1, 2)
        return torch.nn.functional.scaled_dot_product_attention(h, h, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(self.body, self.fc(x), use_reentrant=False)


def _no_grad_call(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _enable_grad_call(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        y = model(x)
    return y * 2


@pytest.mark.parametrize("kind", ["dropout", "sdpa"])
@pytest.mark.parametrize("where", ["caller", "graph", "enable_grad"])
def test_a_checkpoint_region_with_a_random_op_compiles_under_no_grad(kind, where):
    """A plain checkpoint region holding dropout or attention, run without autograd (a validation
    pass): under the caller's ``no_grad``, under one inside the compiled function (whose graph starts
    with grad on), or under the caller's ``no_grad`` that the function turns back on around the
    model (AOTAutograd compiles the graph for inference all the same): its nodes get no recompute
    tags, which AOTAutograd's inference path refused on a random op (``BackendCompilerFailed``), and
    the output is the reference's, dropout's draws included."""
    torch.manual_seed(0)
    model = _RandomRegion(kind)  # in train mode: dropout draws
    ref = reference.sparsify(copy.deepcopy(model))
    backend = nmcompile.backend(inner="aot_eager")
    call = {"caller": lambda m, t: m(t), "graph": _no_grad_call, "enable_grad": _enable_grad_call}[where]
    compiled = torch.compile(call, backend=backend)
    x = torch.randn(2, 4, 8)
    outputs = []
    for run, module in ((call, ref), (compiled, model)):
        torch.manual_seed(1)
        with contextlib.nullcontext() if where == "graph" else torch.no_grad():
            outputs.append(run(module, x))
    assert_close(outputs[1], outputs[0])
    assert not outputs[1].requires_grad and not outputs[0].requires_grad


def test_gemm_in_a_selective_checkpoint_region_inside_another_region_is_reported_dense():
    """A selective checkpoint inside a plain one stays whole (its policy and the outer region's
    recompute cannot both hold once inlined): its layer is a report row with its shapes and reason
    (not "not a GEMM operand"), runs dense, and the layers outside train as usual: as the reference
    with that layer excluded."""

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op is torch.ops.aten.mm.default else CheckpointPolicy.PREFER_RECOMPUTE

    class Nested(_Checkpointed):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.utils.checkpoint.checkpoint(lambda t: super(Nested, self).forward(t), x, use_reentrant=False)

    torch.manual_seed(0)
    base = Nested(functools.partial(create_selective_checkpoint_contexts, policy))
    rows = {r.name: r for r in nmcompile.explain(base, torch.randn(4, 16), inner="aot_eager").rows}
    row = rows["fc1.weight"]
    assert not row.sparse and row.weight_shape == (32, 16) and row.flops["forward"] == (4096, 4096)
    assert row.reason == (
        "inside a selective activation-checkpoint region (checkpoint with a context_fn) nested with another region: "
        "left dense"
    )
    assert rows["fc2.weight"].sparse
    _trains_as_reference_without_fc1(base, (4, 16))


class _Vmapped(nn.Module):
    """``fc1`` applied per sample under ``torch.vmap``; ``fc2`` outside it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(torch.vmap(self.fc1)(x)))


def test_gemm_under_vmap_is_reported_dense():
    """A layer inside ``torch.vmap`` is left dense with its reason: the sparse op's autograd would
    run once per sample and add SR-STE's ``λ(1−F)⊙W`` to ``dW`` B times. It then trains exactly as
    the reference with that layer excluded; ``fc2`` outside the transform stays sparse. The shapes
    inside are a sample's, so its FLOPs are unknown (they were one sample's, and 0 for dX and dW)."""
    torch.manual_seed(0)
    base = _Vmapped()
    rows = {r.name: r for r in nmcompile.explain(base, torch.randn(5, 4, 16), inner="aot_eager").rows}
    assert not rows["fc1.weight"].sparse
    assert rows["fc1.weight"].reason == "inside a torch.func transform (vmap, grad, jvp): left dense"
    assert rows["fc1.weight"].flops == {"forward": None, "input_grad": None, "weight_grad": None}
    assert rows["fc2.weight"].sparse
    dense = 2 * 20 * 16 * 32
    assert rows["fc2.weight"].flops == {
        "forward": (dense, dense // 2),
        "input_grad": (dense, dense // 2),
        "weight_grad": (dense, dense),
    }
    _trains_as_reference_without_fc1(base, (5, 4, 16), srste_lambda=0.1)


class _VmappedBreak(_Vmapped):
    """``fc1`` under ``torch.vmap`` with a graph break inside the vmapped function."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def inner(t: torch.Tensor) -> torch.Tensor:
            y = self.fc1(t)
            torch._dynamo.graph_break()
            return torch.relu(y)

        return self.fc2(torch.vmap(inner)(x))


def test_graph_break_inside_vmap_runs():
    """Dynamo resumes a graph break inside ``vmap`` with code objects that cannot be hashed (it used
    to fail the compile with ``TypeError: unhashable type``); ``fc1`` runs eagerly and dense, and the
    model trains as the reference with ``fc1`` excluded."""
    torch.manual_seed(0)
    _trains_as_reference_without_fc1(_VmappedBreak(), (5, 4, 16))


class _LeftOperand(nn.Module):
    """A parameter as the left operand of ``@`` and of ``torch.mm`` (``W @ xᵀ``)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 16))
        self.v = nn.Parameter(torch.randn(8, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.w @ x.t()).t() + torch.mm(self.v, torch.relu(x).t()).t()


def test_left_operand_parameter_has_one_named_row():
    """A parameter used as the left operand is one report row under its own name, with that reason
    (it was an unnamed ``<matmul>`` row "not an nn.Parameter", plus a second "not a GEMM operand" row)."""
    rows = nmcompile.explain(_LeftOperand(), torch.randn(4, 16), inner="aot_eager").rows
    assert [(r.name, r.op, r.sparse, r.reason) for r in rows] == [
        ("w", "matmul", False, "parameter is the left operand"),
        ("v", "mm", False, "parameter is the left operand"),
    ]
    dense = 2 * 8 * 16 * 4  # W [8, 16] @ xᵀ [16, 4]; x needs no gradient: no dX GEMM
    for row, right in zip(rows, [(16, 4), (16, 4)], strict=True):
        assert (row.weight_shape, row.input_shape) == ((8, 16), right)
        assert row.flops == {"forward": (dense, dense), "input_grad": (0, 0), "weight_grad": (dense, dense)}


class _OtherUses(nn.Module):
    """Weights in the graph but in no GEMM the backend rewrites: ``einsum``, ``bmm``, a ``torch.cond``
    branch, an elementwise scale; an embedding; a weight the forward never touches."""

    def __init__(self) -> None:
        super().__init__()
        self.w_einsum, self.w_bmm = nn.Parameter(torch.randn(8, 16)), nn.Parameter(torch.randn(2, 16, 8))
        self.branch, self.scale = nn.Linear(16, 8), nn.Parameter(torch.randn(4, 8))
        self.emb, self.unused = nn.Embedding(10, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        y = torch.einsum("bk,ok->bo", x, self.w_einsum) + torch.bmm(x.expand(2, 4, 16), self.w_bmm).sum(0)
        y = y + torch.cond(x.sum() > 0, lambda t: self.branch(t), lambda t: -self.branch(t), (x,))
        return y * self.scale + self.emb(idx)


def test_weights_no_rewritten_gemm_takes_say_what_uses_them():
    """SPEC §10, each with its reason: a weight in a compiled graph that no rewritten GEMM takes is
    named with the ops that use it, or the subgraph it is passed into (it was "not a GEMM operand
    in any compiled graph"); embeddings and weights no graph used keep their own reasons."""
    rows = nmcompile.explain(_OtherUses(), torch.randn(4, 16), torch.arange(4), inner="aot_eager").rows
    reasons = {r.name: r.reason for r in rows}
    gemms = "not by a GEMM nmsparse rewrites (linear, matmul, mm, addmm, conv1d/2d/3d)"
    assert reasons == {
        "w_einsum": f"used by einsum, {gemms}",
        "w_bmm": f"used by bmm, {gemms}",
        "branch.weight": "passed into cond (a subgraph the rewrite does not reach into): left dense",
        "scale": f"used by mul, {gemms}",
        "emb.weight": "embedding lookup, not a GEMM",
        "unused.weight": "not a GEMM operand in any compiled graph (or in code dynamo did not trace)",
    }
    assert not any(r.sparse for r in rows)
    shapes = {r.name: r.weight_shape for r in rows if r.name in ("w_bmm", "scale", "unused.weight")}
    assert shapes == {"w_bmm": (2, 128), "scale": (4, 8), "unused.weight": (8, 8)}  # O × the other dims


def test_weights_used_by_other_ops_are_listed_under_a_heading_that_fits_them():
    """A ``weight_norm``'s parts are in the compiled graph, used by ``_weight_norm``: the report
    lists them under "weights no compiled graph uses as a GEMM weight" (it said "not in any
    compiled graph")."""
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(16, 8)), nn.Linear(8, 8))
    report = nmcompile.explain(model, torch.randn(4, 16), inner="aot_eager")
    heading, _, table = str(report).rpartition("weights no compiled graph uses as a GEMM weight:\n")
    assert heading and "not in any compiled graph" not in str(report)
    listed = {line.split("|")[0].strip(): line.split("|")[-1].strip() for line in table.splitlines()[2:]}
    gemms = "not by a GEMM nmsparse rewrites (linear, matmul, mm, addmm, conv1d/2d/3d)"
    parts = ("0.parametrizations.weight.original0", "0.parametrizations.weight.original1")  # g [8, 1], v [8, 16]
    assert listed == dict.fromkeys(parts, f"used by _weight_norm, {gemms}")
    assert {r.name for r in report.rows if r.sparse} == {"1.weight"}


def test_weights_of_a_fused_attention_say_why_it_stays_fused():
    """Cross-attention (``kdim``/``vdim``: separate projections) stays fused; its weights' rows give
    the fused op's reason (they said "the input (left) operand of multi_head_attention")."""

    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.MultiheadAttention(16, 4, kdim=8, vdim=8, batch_first=True)

        def forward(self, q, kv):
            return self.a(q, kv, kv)[0]

    rows = nmcompile.explain(Cross(), torch.randn(2, 5, 16), torch.randn(2, 3, 8), inner="aot_eager").rows
    why = "multi_head_attention_forward with query, key and value that differ (not self-attention): "
    why += "projections run dense inside the fused op"
    reasons = {r.name: r.reason for r in rows if r.name.startswith("a.")}
    assert reasons == {
        name: f"a weight of the fused multi_head_attention: {why}"
        for name in ("a.q_proj_weight", "a.k_proj_weight", "a.v_proj_weight", "a.out_proj.weight")
    }
    assert [r.reason for r in rows if r.op == "multi_head_attention"] == [why]


class _Transformed(nn.Module):
    """A stacked weight under ``vmap`` (ensembling), a weight under ``torch.func.grad``, and a
    parameter as the left operand of a parameter product."""

    def __init__(self) -> None:
        super().__init__()
        self.w, self.fc = nn.Parameter(torch.randn(3, 16, 16)), nn.Linear(16, 16)
        self.a, self.b = nn.Parameter(torch.randn(16, 16)), nn.Parameter(torch.randn(16, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ensemble = torch.vmap(nn.functional.linear)(x.expand(3, 4, 16), self.w).sum(0)
        g = torch.func.grad(lambda w: nn.functional.linear(x, w).square().sum())(self.fc.weight)
        return ensemble + g.sum() + x @ (self.a @ self.b).t()


def test_weights_entering_a_transform_or_a_left_operand_say_so():
    """Weights that enter a ``torch.func`` transform as arguments are reported as inside it (not as
    "used by _add_batch_dim"); a parameter that is a GEMM's left operand says so."""
    rows = nmcompile.explain(_Transformed(), torch.randn(4, 16), inner="aot_eager").rows
    reasons = {r.name: r.reason for r in rows if not r.name.startswith("<")}
    assert reasons["w"] == reasons["fc.weight"] == "inside a torch.func transform (vmap, grad, jvp): left dense"
    assert reasons["a"] == "the input (left) operand of matmul, not its weight"
    assert reasons["b"] == "2:4, backward=bimask"


@pytest.mark.parametrize("stance", ["eager_on_recompile", "force_eager", "eager_then_compile", "fail_on_recompile"])
def test_explain_under_a_compile_stance_compiles_on_the_side(stance):
    """Under ``torch.compiler.set_stance``, ``explain`` compiles on the side as under the default
    stance: ``eager_on_recompile`` ran the user's compiled graph instead (a real training step,
    and a search), ``force_eager`` and ``eager_then_compile`` compiled nothing (every weight dense
    in the report), ``fail_on_recompile`` raised. The user's stance is back afterwards."""
    model, x = MLP(), torch.randn(8, 32)
    compiled = torch.compile(model, backend=nmcompile.backend(inner="aot_eager", perm_interval=1))
    compiled(x).square().mean().backward()
    before = nmcompile.sparsity_state(model)
    with torch.compiler.set_stance(stance):
        report = nmcompile.explain(compiled, x, inner="aot_eager", perm_interval=1)
        assert torch._dynamo.eval_frame._stance.stance == stance
    assert [(row.name, row.sparse, row.now) for row in report.rows] == [
        (name, True, "t=1 2:4") for name in ("fc1.weight", "fc2.weight", "head.weight")
    ]
    after = nmcompile.sparsity_state(model)
    for name, state in before.items():
        assert after[name]["step"] == state["step"] == 1 and torch.equal(after[name]["perm"], state["perm"]), name


def test_explain_leaves_the_random_generator_alone():
    """explain's forward draws dropout masks from a forked generator: the user's next draws are
    the ones they would have been without it."""
    model = nn.Sequential(nn.Linear(32, 64), nn.Dropout(0.5), nn.Linear(64, 16))
    torch.manual_seed(3)
    expected = torch.rand(8)
    torch.manual_seed(3)
    nmcompile.explain(model, torch.randn(4, 32, generator=torch.Generator().manual_seed(0)), inner="aot_eager")
    assert torch.equal(torch.rand(8), expected)


def test_many_explain_calls_leave_the_user_model_sparse():
    """explain compiles in its own recompile region: ten calls (dynamo's limit is 8 entries a
    region) neither empty the report nor push the user's compiled model, recompiling for a new
    batch size afterwards, back to dense eager."""
    torch._dynamo.reset()
    model = MLP()
    compiled = torch.compile(model, backend=nmcompile.backend(inner="aot_eager"))
    x = torch.randn(4, 32)
    compiled(x).sum().backward()
    for _ in range(10):
        rows = nmcompile.explain(compiled, x, inner="aot_eager").rows
        assert sum(r.sparse for r in rows) == 3
    compiled(torch.randn(3, 32)).sum().backward()
    assert nmcompile.sparsity_state(model)["fc1.weight"]["step"] == 2


def test_explain_on_a_module_compiled_in_place_reports_its_own_compile():
    """``model.compile(...)`` routes ``model(...)`` through the user's compiled call: explain still
    compiles with its own options (here 1:4), reports the graph, and leaves the user's state at its
    step, which the user's next step then advances by one. It reported no graph and stepped the
    user's states before."""
    torch._dynamo.reset()
    model = MLP()
    model.compile(backend=nmcompile.backend(inner="aot_eager"))
    x = torch.randn(4, 32)
    model(x).sum().backward()
    report = nmcompile.explain(model, x, n=1, inner="aot_eager")
    assert report.forward_graph is not None
    assert [(r.name, r.sparse, r.reason) for r in report.rows] == [
        (name, True, "1:4, backward=bimask") for name in ("fc1.weight", "fc2.weight", "head.weight")
    ]
    assert model._compiled_call_impl is not None
    assert nmcompile.sparsity_state(model)["fc1.weight"]["step"] == 1
    model(x).sum().backward()
    assert {s["step"] for s in nmcompile.sparsity_state(model).values()} == {2}


def test_explain_on_a_torch_module_compiled_in_place_reports_that_nothing_compiles():
    """Dynamo (torch 2.13) compiles nothing of ``nn.Sequential(...).compile()``: the model trains
    dense, and explain, compiling it the same way, says so instead of showing a wrapper's graph."""
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    model.compile(backend=nmcompile.backend(inner="aot_eager"))
    x = torch.randn(4, 32)
    model(x).sum().backward()
    assert nmcompile.sparsity_state(model) == {}
    report = nmcompile.explain(model, x, inner="aot_eager")
    assert report.records == [] and str(report).startswith("(no graph compiled)")
    assert [(r.name, r.sparse) for r in report.rows] == [("0.weight", False), ("2.weight", False)]


class _WhileLoop(nn.Module):
    """A ``while_loop`` over a Linear in training: AOTAutograd (torch 2.13) cannot trace it, with any backend."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.cell, self.out = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch._higher_order_ops.while_loop import while_loop

        start = torch.zeros((), dtype=torch.int64)
        _, h = while_loop(lambda i, h: i < 3, lambda i, h: (i + 1, torch.tanh(self.cell(h))), (start, self.inp(x)))
        return self.out(h)


def test_a_graph_the_backend_cannot_compile_is_not_reported_sparse(tmp_path, monkeypatch):
    """Dynamo runs a graph whose backend compile raised eagerly, dense: ``explain`` lists no sparse row
    for it (it listed its layers sparse), and the graph's dump says that its compile failed."""
    monkeypatch.setenv("NMSPARSE_DUMP_DIR", str(tmp_path))
    model, x = _WhileLoop(), torch.randn(4, 16)
    report = nmcompile.explain(model, x, inner="aot_eager")
    assert not report.records and report.rows and not [row.name for row in report.rows if row.sparse]
    failed = sorted(tmp_path.glob("*/failed.txt"))  # dynamo retries the frame with a graph break
    assert failed and all(f.read_text().startswith("the backend's compile of this graph raised ") for f in failed)
    assert "inp.weight" in (failed[0].parent / "report.txt").read_text()
    assert torch.equal(torch.compile(model, backend=nmcompile.backend(inner="aot_eager"))(x), model(x))  # dense
    why = "the backend's compile of its graph raised DataDependentOutputException: aten._local_scalar_dense.default"
    assert {row.name: row.reason for row in report.rows} == {
        name: f"{why}; dynamo ran that code eagerly, dense" for name in ("inp.weight", "cell.weight", "out.weight")
    }


@pytest.mark.parametrize(
    ("message", "shown"),
    [("boom\nthe traceback's second line", "boom"), ("x" * 200, "x" * 157 + "..."), ("", "")],
)
def test_a_failed_compile_is_each_weights_reason_and_the_callbacks_news(monkeypatch, message, shown):
    """A weight whose only graph failed to compile says why in ``explain`` (it said "not a GEMM operand
    in any compiled graph"): the exception's first line, cut at 160 characters. ``on_failure`` gets
    the graph, its operands (the weights among them) and the exception; ``on_compile`` nothing. The
    exception is one that dynamo answers with a graph break (others reach the caller)."""
    unsupported = torch._subclasses.fake_tensor.UnsupportedOperatorException

    def fail(*args, **kwargs):
        raise unsupported(message)

    monkeypatch.setattr(sys.modules["nmcompile.backend"], "_compile_inner", fail)
    model, x = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8)), torch.randn(4, 16)
    report = nmcompile.explain(model, x, inner="aot_eager")
    why = f"the backend's compile of its graph raised UnsupportedOperatorException: {shown}"
    reason = f"{why}; dynamo ran that code eagerly, dense"
    assert not report.records and [(row.name, row.sparse, row.reason) for row in report.rows] == [
        ("0.weight", False, reason),
        ("2.weight", False, reason),
    ]
    compiled, failures = [], []
    backend = nmcompile.NMSparseBackend(
        nmcompile.SparsityConfig(inner="aot_eager"), on_compile=compiled.append,
        on_failure=lambda gm, operands, exc: failures.append((gm, operands, exc)),
    )  # fmt: skip
    torch._dynamo.reset()
    assert torch.equal(torch.compile(model, backend=backend)(x), model(x))  # dense, eagerly
    assert not compiled and failures
    gm, operands, exc = failures[0]
    assert isinstance(gm, torch.fx.GraphModule) and type(exc) is unsupported and str(exc) == message
    assert {id(p) for p in model.parameters()} <= {id(t) for t in operands}


def _saved_shapes(out: torch.Tensor) -> list[tuple[int, ...]]:
    """The shapes of the tensors the backward nodes behind ``out`` saved."""
    shapes, seen, stack = [], set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        shapes += [tuple(t.shape) for t in getattr(node, "saved_tensors", ()) or () if t is not None]
        stack += [parent for parent, _ in node.next_functions]
    return shapes


def test_a_checkpointed_model_does_not_load_the_plain_models_partition_from_the_cache(tmp_path, monkeypatch):
    """AOTAutograd's cache key hashes the graph's code, which an inlined checkpoint region can leave as
    the same model's without the checkpoint; the regions' tags join the key, so each model, compiled
    one after the other on a fresh cache, saves its own activations (the second loaded the first's
    partition: a hit where a miss belongs)."""
    from torch._dynamo.utils import counters

    class Scaled(CheckpointedPair):  # one graph code, checkpointed or not (the plain pair's differs)
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x * 2
            return self.fc3(
                torch.utils.checkpoint.checkpoint(self.body, x, use_reentrant=False)
                if self.checkpointed
                else self.body(x)
            )

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    x = torch.randn(4, 16)
    runs = []
    with torch._functorch.config.patch(enable_autograd_cache=True):
        for checkpointed in (False, True, False):
            torch._dynamo.reset()
            counters.clear()
            compiled = torch.compile(Scaled(checkpointed), backend=nmcompile.backend())
            saved = _saved_shapes(compiled(x)).count((4, 32))
            runs.append((saved, counters["aot_autograd"]["autograd_cache_hit"]))
    assert runs == [(2, 0), (0, 0), (2, 1)], runs


_CACHE_CASES = {
    "m=8": (lambda: nn.Linear(16, 8), (8, 16), {"m": 8}, torch.float32),
    "transposable": (lambda: nn.Linear(16, 8), (8, 16), {"backward": "transposable"}, torch.float32),
    "bf16": (lambda: nn.Linear(16, 8), (8, 16), {}, torch.bfloat16),
    "conv": (lambda: nn.Conv2d(8, 16, 3), (2, 8, 6, 6), {}, torch.float32),
}


@pytest.mark.parametrize("case", _CACHE_CASES)
def test_graphs_calling_the_rewrites_functions_are_served_from_the_autograd_cache(case, tmp_path, monkeypatch):
    """Where the rewrite keeps its plain ``masked_weight`` function in the graph (N:M other than
    2:4 on the CPU's mask kernel, transposable masks, low precision, convolutions), AOTAutograd's
    cache takes the graph (it refused it: every such compile bypassed the cache), and the second
    compile's hit gives the first's outputs and gradients."""
    from torch._dynamo.utils import counters

    make, shape, options, dtype = _CACHE_CASES[case]
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    x = torch.randn(shape, dtype=dtype)
    found, results = [], []
    with torch._functorch.config.patch(enable_autograd_cache=True):
        for _ in range(2):
            torch._dynamo.reset()
            counters.clear()
            torch.manual_seed(0)
            model = make().to(dtype)
            out = torch.compile(model, backend=nmcompile.backend(**options))(x)
            out.float().square().mean().backward()
            found.append(dict(counters["aot_autograd"]))
            results.append([out.detach(), *(p.grad for p in model.parameters())])
    assert [("autograd_cache_hit" in c, "autograd_cache_bypass" in c) for c in found] == [(False, False), (True, False)]
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_a_model_with_attention_is_served_from_the_autograd_cache(tmp_path, monkeypatch):
    """The attention decomposition leaves no ``_assert_is_none`` guard of its traced formula in the
    graph, which AOTAutograd's cache refuses: a second compile of an encoder layer hits the cache
    (every compile of a model with attention bypassed it)."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    x = torch.randn(2, 4, 32)
    found = []
    with torch._functorch.config.patch(enable_autograd_cache=True):
        for _ in range(2):
            torch._dynamo.reset()
            counters.clear()
            torch.manual_seed(0)
            torch.compile(_CheckpointedEncoder(False), backend=nmcompile.backend())(x)
            found.append(dict(counters["aot_autograd"]))
    assert [("autograd_cache_hit" in c, "autograd_cache_bypass" in c) for c in found] == [(False, False), (True, False)]
