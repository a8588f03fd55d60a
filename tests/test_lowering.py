"""The lowering pass: sparse GEMMs on the Triton kernels train exactly like the reference and the
portable path, the graphs show the kernels and no saved mask, and the report names the kernel.

Without CUDA, ``kernels="triton"`` runs the kernels through the interpreter (``TRITON_INTERPRET=1``
from conftest); ``kernels="auto"`` stays portable there, with the reason in the report.
"""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch
from conftest import (
    MLP,
    MODELS,
    NOT_ON_CUDA,
    CheckpointedPair,
    SelectivePair,
    assert_close,
    cpu_mask_note,
    cuda_autocast_losses,
    interpreted,
    train_and_compare,
)
from nmcompile.passes import lower_kernels
from torch import fx, nn

import nmcompile


@interpreted
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"grad_prune": "mvue24"},
        {"grad_prune": "mvue12", "n": 1, "m": 8},
        {"grad_prune": "mvue24_approx", "srste_lambda": 0.01},
        {"backward": "transposable"},
        {"backward": "dense"},
        {"mask_decay": "linear", "mask_decay_rate": 0.2},
        {"backward": "dense", "mask_decay": "linear", "mask_decay_rate": 0.2},
        {"structure_decay": True, "total_steps": 4, "perm_interval": 1},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "bimask",
)
@pytest.mark.parametrize("split", [False, True], ids=["fused", "split"])
def test_triton_path_matches_reference(options, split, monkeypatch):
    """3 SGD steps of an MLP on the Triton kernels: outputs, every gradient and the weights agree
    with the eager reference at every step (fp32 tolerance). ``split``: every GEMM as a large
    batch runs it, masked operand (or pruned ``dY``) from a Triton pass, then a dense GEMM."""
    if split:
        monkeypatch.setattr("nmcompile.kernels.ops.SPLIT_TOKENS", 0)
    train_and_compare(MLP, (8, 32), steps=3, kernels="triton", inner="aot_eager", **options)


@interpreted
@pytest.mark.parametrize("model", ["block", "inout"])
def test_triton_path_other_layouts(model):
    """Attention projections (3-D activations) and [in, out]/addmm weights lower too."""
    make, shape = MODELS[model]
    train_and_compare(make, shape, steps=2, kernels="triton", inner="aot_eager")


@interpreted
@pytest.mark.parametrize("make", [CheckpointedPair, SelectivePair], ids=["plain", "selective"])
def test_triton_path_in_checkpoint_regions_matches_reference(make):
    """Layers in a plain or a selective activation-checkpoint region lower onto the Triton kernels
    too (the lowering keeps the region's tags; the selective region is made whole again around the
    kernel ops): 3 SGD steps with MVUE agree with the eager reference."""
    train_and_compare(make, (4, 16), steps=3, kernels="triton", inner="aot_eager", grad_prune="mvue24")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("make", [CheckpointedPair, SelectivePair], ids=["plain", "selective"])
def test_checkpoint_regions_on_cuda_lower_and_train_as_portable(make):
    """On a GPU, layers in plain and selective checkpoint regions lower as elsewhere (fp32 onto
    Triton; under bf16 autocast each onto its measured path, the 2:4 cores included) and 3 training
    steps stay close to the portable path."""
    base = make(width=256, out=256).cuda()
    portable = cuda_autocast_losses(base, kernels="portable", grad_prune="mvue24")
    assert cuda_autocast_losses(base, kernels="auto", grad_prune="mvue24") == pytest.approx(portable, rel=2e-2)
    rows = nmcompile.explain(base, torch.randn(64, 256, device="cuda")).rows
    assert len(rows) == 3 and {r.kernel for r in rows} == {"triton"}


def _trajectory(kernels: str, steps: int = 3, **options) -> tuple[list[float], list[torch.Tensor]]:
    torch.manual_seed(0)
    model = MLP()
    compiled = torch.compile(model, backend=nmcompile.backend(kernels=kernels, **options))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(steps):
        x = torch.randn(16, 32, generator=torch.Generator().manual_seed(step))
        loss = compiled(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, [p.detach().clone() for p in model.parameters()]


@interpreted
@pytest.mark.parametrize("options", [{"grad_prune": "mvue24"}, {"backward": "transposable"}])
@pytest.mark.parametrize("split", [False, True], ids=["fused", "split"])
def test_lowered_trajectory_equals_portable_under_inductor(options, split, monkeypatch):
    """Inductor compiles around the opaque kernel ops: 3 SGD steps give the portable path's losses
    and weights within fp32 tolerance (MVUE draws the same random numbers on both paths), with the
    fused kernels and with the split ops."""
    if split:
        monkeypatch.setattr("nmcompile.kernels.ops.SPLIT_TOKENS", 0)
    losses_p, weights_p = _trajectory("portable", **options)
    torch._dynamo.reset()
    losses_t, weights_t = _trajectory("triton", **options)
    assert losses_t == pytest.approx(losses_p, rel=1e-6, abs=1e-7)
    for a, b in zip(weights_t, weights_p, strict=True):
        assert_close(a, b)


def _report(model: nn.Module, x: torch.Tensor, **options) -> nmcompile.Report:
    return nmcompile.explain(model, x, inner="aot_eager", **options)


@interpreted
def test_graphs_hold_kernels_and_no_mask():
    """Forward: ``<layer>_fwd_gemm = nmsparse.triton_linear.nograd(..., None, P, ...)`` (the op without its
    autograd wrapper, ``ops.NO_GRAD_OVERLOADS``) and no mask node;
    no bool tensor is saved for the backward; backward: one kernel per product, named (a step's
    result takes the plain name: ``dX`` is the view of the input-gradient kernel's 2-D output)."""
    report = _report(MLP(), torch.randn(8, 32), kernels="triton")
    fwd, bwd = report.forward_graph, report.backward_graph
    gemms = {n.name: n for n in fwd.graph.nodes if n.target is torch.ops.nmsparse.triton_linear.nograd}
    assert set(gemms) == {"fc1_fwd_gemm", "fc2_fwd_gemm", "head_fwd_gemm"}
    assert all(n.args[3] is None for n in gemms.values())
    assert not [n for n in fwd.graph.nodes if n.target is torch.ops.nmsparse.nm_mask.default]
    saved = next(n for n in fwd.graph.nodes if n.op == "output").args[0]
    assert all(n.meta["val"].dtype != torch.bool for n in saved if isinstance(n, torch.fx.Node))
    nodes = {n.name: n for n in bwd.graph.nodes if n.op == "call_function"}
    names = {name: n.target for name, n in nodes.items()}
    for layer in ("fc1", "fc2", "head"):
        assert names[f"{layer}_bwd_weight_grad"] is torch.ops.nmsparse.triton_weight_grad.default
    for layer in ("fc2", "head"):  # fc1's input needs no gradient
        assert names[f"{layer}_bwd_input_grad_1"] is torch.ops.nmsparse.triton_input_grad.default
        assert nodes[f"{layer}_bwd_input_grad"].args[0] is nodes[f"{layer}_bwd_input_grad_1"]
    assert not [t for t in names.values() if t is torch.ops.nmsparse.nm_mask.default]


@interpreted
def test_transposable_keeps_its_mask_node():
    """A transposable mask is not N:M along K alone: the kernels load it."""
    report = _report(MLP(), torch.randn(8, 32), kernels="triton", backward="transposable")
    gemm = next(n for n in report.forward_graph.graph.nodes if n.name == "fc2_fwd_gemm")
    assert gemm.target is torch.ops.nmsparse.triton_linear.nograd
    assert gemm.args[3].target is torch.ops.nmsparse.transposable_mask.default


@interpreted
def test_report_names_the_kernel():
    x = torch.randn(8, 32)
    rows = {r.name: r for r in _report(MLP(), x, kernels="triton").rows}
    assert {r.kernel for r in rows.values()} == {"triton"}
    assert "| kernel |" in str(_report(MLP(), x, kernels="triton")).splitlines()[0].replace("  ", "")
    portable = {r.kernel for r in _report(MLP(), x, kernels="portable").rows}
    assert portable == {f"portable (kernels='portable'{cpu_mask_note()})"}
    auto = {r.kernel for r in _report(MLP(), x).rows}  # CPU weights: auto never lowers them
    assert auto == {f"portable ({NOT_ON_CUDA}{cpu_mask_note()})"}


@interpreted
def test_report_kernel_reasons_for_unsupported_layers():
    """Convolutions, m not a power of two (also for a GEMM fed by another sparse GEMM), float64, and
    dense layers each get their own entry."""
    conv = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Flatten(), nn.Linear(16 * 36, 8))
    rows = {r.name: r for r in _report(conv, torch.randn(2, 8, 8, 8), kernels="triton").rows}
    assert rows["0.weight"].kernel.startswith("portable (convolution")
    assert rows["2.weight"].kernel == "triton"
    odd = nn.Sequential(nn.Linear(48, 48), nn.Linear(48, 48), nn.Linear(5, 5))
    rows = {r.name: r for r in _report(odd[:2], torch.randn(4, 48), kernels="triton", n=1, m=3).rows}
    assert {r.kernel for r in rows.values()} == {"portable (m=3 is not a power of two (register tiles need one))"}
    rows = _report(odd[2], torch.randn(4, 5), kernels="triton").rows
    assert rows[0].kernel == "-" and not rows[0].sparse
    doubles = _report(MLP().double(), torch.randn(8, 32, dtype=torch.float64), kernels="triton").rows
    assert {r.kernel for r in doubles} == {"portable (weight dtype torch.float64 (the kernels take fp32, fp16, bf16))"}


def test_triton_without_cuda_or_interpreter_stays_portable(monkeypatch):
    """``kernels='triton'`` on CPU tensors without the interpreter: the portable path, with the reason."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rows = _report(MLP(), torch.randn(8, 32), kernels="triton").rows
    assert {r.kernel for r in rows} == {f"portable ({NOT_ON_CUDA}{cpu_mask_note()})"}


def test_pass_leaves_other_graphs_alone():
    """A graph without sparse GEMMs comes back unchanged, with no choices."""
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.ReLU()))
    code = gm.code
    out, choices = lower_kernels(gm, nmcompile.SparsityConfig(kernels="triton"))
    assert out.code == code and choices == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_lowers_on_cuda_under_autocast():
    """On a GPU, ``auto`` lowers: fp32 layers onto Triton; under bf16 autocast each layer onto the
    path its timed step found faster (2:4 tensor cores on sm80+), and 3 training steps stay close
    to the portable path."""
    base = MLP(256, 512, 256).cuda()
    portable = cuda_autocast_losses(base, kernels="portable", grad_prune="mvue24")
    assert cuda_autocast_losses(base, kernels="auto", grad_prune="mvue24") == pytest.approx(portable, rel=2e-2)
    rows = nmcompile.explain(base, torch.randn(64, 256, device="cuda")).rows
    assert {r.kernel for r in rows} == {"triton"}
    if torch.cuda.get_device_capability() >= (8, 0):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            rows = nmcompile.explain(base, torch.randn(64, 256, device="cuda"), grad_prune="mvue24").rows
        assert all(r.kernel.split(" ")[0] in ("triton", "sparse24") and "a step measured" in r.kernel for r in rows)


@interpreted
@pytest.mark.parametrize("kernels", ["triton", "triton split", "sparse24"])
def test_lowered_ops_follow_autocast(kernels, monkeypatch):
    """Under bf16 autocast the lowered op computes in bf16 as ``sparse_linear`` does (x and bias cast,
    the weight ranked in its own dtype): same output dtype, values and weight-gradient dtype; also on
    the Triton ops' split path (masked operand and cuBLAS GEMM, as from ``SPLIT_TOKENS`` tokens on)."""
    if kernels == "triton split":
        monkeypatch.setattr("nmcompile.kernels.ops.SPLIT_TOKENS", 0)
        kernels = "triton"
    if kernels == "sparse24":  # let the lowering choose 2:4 on the CPU (dense GEMMs)
        lowering = sys.modules["nmcompile.passes.lower_kernels"]
        monkeypatch.setattr(lowering, "_sparse24_blocker", lambda node, config: None)
    torch.manual_seed(0)
    base, x = MLP(), torch.randn(8, 32)
    outputs = []
    for name in ("portable", kernels):
        torch._dynamo.reset()
        model = copy.deepcopy(base)
        compiled = torch.compile(model, backend=nmcompile.backend(kernels=name, inner="aot_eager"))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = compiled(x)
        y.float().square().mean().backward()
        outputs.append((y, [p.grad for p in model.parameters()]))
    (y_ref, g_ref), (y, g) = outputs
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert_close(y.float(), y_ref.float(), rel=1.6e-2)
    for got, expected in zip(g, g_ref, strict=True):
        assert got.dtype == expected.dtype == torch.float32
        assert_close(got, expected, rel=3e-2)


def test_cuda_autocast_in_force_is_read_from_the_graphs_own_regions():
    """The 2:4 choice reads the CUDA autocast dtype a GEMM runs in from the innermost
    ``torch.autocast`` region of the graph open at it (a region inside the compiled forward), not
    only the one around the compile: it called a bf16 GEMM fp32, and so not 2:4."""
    from nmcompile.passes.lower_kernels import _autocast_dtype

    enter, exit_ = torch.amp.autocast_mode._enter_autocast, torch.amp.autocast_mode._exit_autocast
    graph = fx.Graph()
    nodes = {"x": graph.placeholder("x")}

    def relu(name: str, of: str) -> None:
        nodes[name] = graph.call_function(torch.relu, (nodes[of],))

    outer = graph.call_function(enter, ("cuda", torch.bfloat16, True, None))
    relu("bf16", "x")
    inner = graph.call_function(enter, ("cuda", None, False, None))
    relu("disabled", "bf16")
    graph.call_function(exit_, (inner,))
    relu("bf16 again", "disabled")
    cpu = graph.call_function(enter, ("cpu", torch.float16, True, None))
    relu("inside a CPU region", "bf16 again")
    graph.call_function(exit_, (cpu,))
    graph.call_function(exit_, (outer,))
    relu("outside", "inside a CPU region")
    graph.output(nodes["outside"])
    on_cuda = types.SimpleNamespace(device=torch.device("cuda"))
    got = {name: _autocast_dtype(node, on_cuda) for name, node in nodes.items() if name != "x"}
    assert got == {
        "bf16": torch.bfloat16,
        "disabled": None,
        "bf16 again": torch.bfloat16,
        "inside a CPU region": torch.bfloat16,
        "outside": None,
    }
    assert _autocast_dtype(nodes["bf16"], torch.zeros(1)) is None  # a CPU weight: no CUDA autocast
