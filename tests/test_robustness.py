"""Models and inputs from the wild (issue 8): graph breaks, dynamic shapes, mixed precision,
standard torch.nn blocks, bad inputs, and no memory growth over many steps."""

from __future__ import annotations

import collections
import copy
import functools
import gc
import inspect
import math
import re
import subprocess
import sys
import warnings
import weakref
import zlib
from pathlib import Path

import pytest
import torch
from conftest import (
    MLP,
    InOut,
    assert_close,
    assert_grads_close,
    compile_blocks_alone,
    cpu_mask_note,
    interpreted,
    sgd_step_both,
    train_against,
    train_and_compare,
)
from nmcompile.passes import lift_parameters
from nmcompile.passes.utils import divisible
from torch import nn
from torch._dynamo.utils import counters

import nmcompile
from nmcompile import reference
from nmcompile.state import DEFAULT_REGISTRY


def _backend(**options):
    return nmcompile.backend(inner="aot_eager", **options)


class Branchy(nn.Module):
    """A print and a data-dependent branch: dynamo splits forward into several graphs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if h.sum() > 0:
            h = h * 2
        print(end="")
        return self.c(torch.relu(self.b(h)))


def test_graph_breaks_keep_one_state_per_layer():
    """Several graphs, one state per weight (keyed by parameter), results equal the reference."""
    counters.clear()
    train_and_compare(Branchy, (4, 16), perm_interval=2, inner="aot_eager")
    assert counters["stats"]["unique_graphs"] >= 3


def test_dynamic_shapes_one_graph_and_reference_agreement():
    """dynamic=True, changing batch and sequence length (token counts not divisible by 4 included,
    so MVUE pads): one training graph; every shape matches the reference. (Sizes 0 and 1 are
    their own symbolic pattern in dynamo and would compile once more.) An MLP on ``[batch, seq,
    32]``: attention under ``dynamic=True`` is the encoder-layer test's."""
    base = MLP()
    ref = reference.sparsify(copy.deepcopy(base), grad_prune="mvue24")
    mine = copy.deepcopy(base)
    compiled = torch.compile(mine, backend=_backend(grad_prune="mvue24"), dynamic=True)
    counters.clear()
    for batch, seq in [(2, 8), (3, 5), (3, 7), (4, 3), (2, 9)]:  # token counts 16, 15, 21, 12, 18
        x = torch.randn(batch, seq, 32)
        y_ref, y = ref(x), compiled(x)
        assert_close(y, y_ref, what=f"output {batch}x{seq}")
        y_ref.square().mean().backward()
        y.square().mean().backward()
        assert_grads_close(mine, ref, what=f"{batch}x{seq}")
        ref.zero_grad(), mine.zero_grad()
    assert counters["stats"]["unique_graphs"] == 1


def test_weights_with_symbolic_sizes_stay_dense():
    """Under dynamo's ``force_parameter_static_shapes=False``, a Parameter given to a compiled function
    is traced with symbolic sizes: one graph serves every weight size, so no N:M decision taken for
    the first size holds (K=18 raised in ``nm_mask``, O=20 indexed out of range). SPEC §10: sizes
    not provably divisible by m leave the GEMM dense, with the reason; every size then runs right."""
    records = []
    config = nmcompile.SparsityConfig.from_options({"inner": "aot_eager"})
    compiled = torch.compile(
        nn.functional.linear, backend=nmcompile.NMSparseBackend(config, on_compile=records.append), dynamic=True
    )
    with torch._dynamo.config.patch(force_parameter_static_shapes=False):
        for out_features, in_features in [(32, 16), (32, 18), (20, 16)]:
            w = nn.Parameter(torch.randn(out_features, in_features))
            x = torch.randn(4, in_features, requires_grad=True)
            y = compiled(x, w)
            y.square().sum().backward()
            x_dense, w_dense = x.detach().requires_grad_(), w.detach().requires_grad_()
            nn.functional.linear(x_dense, w_dense).square().sum().backward()
            assert torch.equal(y, nn.functional.linear(x_dense, w_dense))
            assert torch.equal(x.grad, x_dense.grad) and torch.equal(w.grad, w_dense.grad)
    [row] = [row for record in records for row in record.rows]
    assert not row.sparse
    assert re.fullmatch(r"weight sizes \[s\d+, s\d+\] are symbolic: N:M needs sizes known at compile time", row.reason)


class _LazyHead(nn.Module):
    """A lazy layer compiled before its first call, and a lazy auxiliary head only some calls use."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.aux = nn.LazyLinear(16), nn.LazyLinear(8)

    def forward(self, x, use_aux: bool = False):
        h = torch.relu(self.fc(x))
        return self.aux(h) if use_aux else h


class _WithRaw(MLP):
    """An MLP with a raw weight used by ``matmul``, which ``sparsify`` routes through the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.raw = nn.Parameter(torch.randn(16, 16) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) @ self.raw


@pytest.mark.parametrize(
    "make", [_WithRaw, lambda: nn.Linear(32, 16)], ids=["swapped_and_routed", "the_model_is_a_layer"]
)
def test_reference_sparsify_again_with_other_options_raises(make):
    """``reference.sparsify`` again with other options raised nothing and left the layers it had
    changed with the first options (a model with two option sets); now it says so. Again with the
    same options changes nothing: the model trains as after one call."""
    torch.manual_seed(0)
    base, x = make(), torch.randn(8, 32)
    once = reference.sparsify(copy.deepcopy(base), perm_interval=2)
    twice = reference.sparsify(reference.sparsify(copy.deepcopy(base), perm_interval=2), perm_interval=2)
    for model in (once, twice):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            model(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    with torch.no_grad():
        assert torch.equal(once(x), twice(x))
    states = [nmcompile.sparsity_state(model) for model in (once, twice)]
    assert states[0].keys() == states[1].keys() and states[0]
    for name, state in states[0].items():
        assert state["step"] == states[1][name]["step"] == 3 and torch.equal(state["perm"], states[1][name]["perm"])
    for options in ({"n": 1, "m": 4}, {"perm_interval": 2, "exclude": "fc2"}):
        with pytest.raises(ValueError, match=r"reference.sparsify: the model is sparsified already, with other optio"):
            reference.sparsify(once, **options)


def test_lazy_modules_train_and_report_before_they_have_shapes():
    """A lazy layer compiled before its first call trains as the reference sparsifies it once it has
    its shape; ``explain`` lists a lazy head no forward has run yet (it raised, asking autograd for
    the gradient of an uninitialized parameter); ``reference.sparsify`` asks for a forward first."""
    torch.manual_seed(0)
    model = _LazyHead()
    with pytest.raises(ValueError, match=r"reference.sparsify: fc.weight, fc.bias, aux.weight, aux.bias uninit"):
        reference.sparsify(copy.deepcopy(model))
    compiled = torch.compile(model, backend=_backend())
    x = torch.randn(4, 32)
    y = compiled(x)
    rows = nmcompile.explain(model, x, inner="aot_eager").rows
    assert [(r.name, r.sparse, r.reason) for r in rows] == [
        ("fc.weight", True, "2:4, backward=bimask"),
        ("aux.weight", False, "uninitialized (a lazy module not run yet): its first forward gives it a shape"),
    ]
    ref = reference.sparsify(nn.Linear(32, 16))
    with torch.no_grad():
        ref.weight.copy_(model.fc.weight)
        ref.bias.copy_(model.fc.bias)
    assert_close(y, torch.relu(ref(x)), what="lazy layer's first output")
    y.square().mean().backward()
    torch.relu(ref(x)).square().mean().backward()
    assert_close(model.fc.weight.grad, ref.weight.grad, what="lazy layer's weight gradient")


@pytest.mark.parametrize("kernels", ["portable", pytest.param("triton", marks=interpreted)])
@pytest.mark.parametrize(
    ("layer", "x"),
    [
        (lambda: nn.Linear(32, 16, bias=False), torch.randn(8, 32)),
        (lambda: nn.Linear(32, 16), torch.randn(8, 32)),
        (lambda: nn.Conv2d(8, 16, 3), torch.randn(2, 8, 6, 6)),
    ],
    ids=["linear", "linear_bias", "conv"],
)
def test_an_input_of_another_dtype_than_the_weight_raises_as_in_eager(kernels, layer, x):
    """An fp16 input to an fp32 layer, outside autocast, raises eager's own error: the GEMM stays as
    traced, with the reason in the report (the sparse ops cast the weight to the input's dtype, so
    the model trained in fp16 where eager and dense compile raise); dynamo's trace raises it for a
    convolution, before the backend. Under autocast the layer is sparse."""
    model, x = layer(), x.half()
    with pytest.raises(RuntimeError) as eager:
        model(x)
    records = []
    backend = nmcompile.NMSparseBackend(
        nmcompile.SparsityConfig(kernels=kernels, inner="aot_eager"), on_compile=records.append
    )
    with pytest.raises(RuntimeError, match=re.escape(str(eager.value))):
        torch.compile(model, backend=backend)(x)
    why = "input dtype torch.float16 is not the weight's torch.float32 outside autocast"
    why += ": left as traced, it raises as in eager"
    assert [(row.sparse, row.reason) for r in records for row in r.rows] == ([] if x.dim() == 4 else [(False, why)])
    torch._dynamo.reset()
    records.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.compile(model, backend=backend)(x).float().sum().backward()
    assert [row.sparse for row in records[0].rows] == [True]


def test_autocast_leaves_float64_alone_as_eager_does():
    """CPU autocast casts floating point but float64: a float64 model under it computes in float64,
    as eager does, in the backend and the reference (both computed in bf16); a float64 input to an
    fp32 layer meets a bf16 weight, and an int64 one an fp32 weight, so they raise as in eager (the
    backend and the reference trained in bf16)."""
    autocast = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    for layer, x in ((nn.Linear(32, 16), torch.randn(8, 32)), (nn.Conv2d(8, 16, 3), torch.randn(2, 8, 6, 6))):
        model, x = layer.double(), x.double()
        ref = reference.sparsify(copy.deepcopy(model))
        compiled = torch.compile(copy.deepcopy(model), backend=_backend())
        with autocast():
            expected, actual, dense = ref(x), compiled(x), model(x)
        assert expected.dtype == actual.dtype == dense.dtype == torch.float64
        assert torch.equal(actual, expected)
        rows = nmcompile.explain(model, x, inner="aot_eager").rows
        assert [row.sparse for row in rows] == [True]
    records = []
    backend = nmcompile.NMSparseBackend(nmcompile.SparsityConfig(inner="aot_eager"), on_compile=records.append)
    for x in (torch.randn(8, 32).double(), torch.ones(8, 32, dtype=torch.int64)):
        torch._dynamo.reset()
        model = nn.Linear(32, 16)
        with autocast(), pytest.raises(RuntimeError) as eager:
            model(x)
        for run in (reference.sparsify(copy.deepcopy(model)), torch.compile(model, backend=backend)):
            with autocast(), pytest.raises(RuntimeError, match=re.escape(str(eager.value))):
                run(x)
    why = "input dtype torch.float64 is not the weight's torch.float32 under autocast to torch.bfloat16"
    assert records[0].rows[0].reason == f"{why} (which leaves float64 alone): left as traced, it raises as in eager"


@pytest.mark.filterwarnings("ignore:aten..where. an autograd kernel was not registered")  # meta only: no values
def test_a_training_forward_on_meta_weights_runs():
    """A model built on the meta device (shapes only: FLOP counting, a meta init before
    ``to_empty``) runs a training forward and backward as dense ``torch.compile`` does: no
    permutation search (it ranked values there and raised), the step counted, ``kept_fraction`` NaN.
    Its ``state_dict()`` and ``explain`` then work (they copied the meta permutation to the CPU and
    raised), the state dict carrying a meta permutation, as its parameters are meta, which another
    meta model loads; a model with values refuses it with a warning and keeps its own state. The
    reference runs one too (it asked autocast about the meta device, which raised)."""
    with torch.device("meta"):
        model, other, ref = MLP(), MLP(), MLP()
    compiled = torch.compile(model, backend=_backend())
    x = torch.randn(4, 32, device="meta")
    y = compiled(x)
    y.sum().backward()
    assert y.shape == (4, 16) and model.fc1.weight.grad.is_meta
    reference.sparsify(ref)(x).sum().backward()
    assert ref.fc1.weight.grad.is_meta and nmcompile.sparsity_state(ref)["fc2.weight"]["step"] == 1
    state = nmcompile.sparsity_state(model)["fc2.weight"]
    assert state["step"] == 1 and math.isnan(state["kept_fraction"])
    saved = model.state_dict()
    perm = saved._metadata["fc2"]["nmsparse"]["weight"]["perm"]
    assert perm.is_meta and perm.shape == (64,)
    rows = {row.name: row for row in nmcompile.explain(model, x, inner="aot_eager").rows}
    assert rows["fc2.weight"].sparse and rows["fc2.weight"].now == "t=1 2:4"
    other.load_state_dict(saved)
    torch.compile(other, backend=_backend())(x).sum().backward()
    assert nmcompile.sparsity_state(other)["fc2.weight"]["step"] == 2
    values = collections.OrderedDict((key, torch.zeros(tensor.shape)) for key, tensor in saved.items())
    values._metadata = saved._metadata
    with_values = MLP()
    with_values.load_state_dict(values)
    with pytest.warns(UserWarning, match="fc2.weight is a meta tensor"):
        torch.compile(with_values, backend=_backend())(torch.randn(4, 32)).sum().backward()
    assert nmcompile.sparsity_state(with_values)["fc2.weight"]["step"] == 1


class _MoE(nn.Module):
    """Top-1 routing by boolean masks, each expert's output scaled by its gate: each expert sees a
    data-dependent number of tokens."""

    def __init__(self, d: int = 32, experts: int = 2) -> None:
        super().__init__()
        self.router = nn.Linear(d, experts)
        self.experts = nn.ModuleList(nn.Linear(d, d) for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = self.router(x).softmax(-1)
        choice = gates.argmax(-1)
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            chosen = choice == i
            out[chosen] = expert(x[chosen]) * gates[chosen, i, None]
        return out


@pytest.mark.parametrize(("inner", "grad_prune"), [("aot_eager", "mvue24"), ("inductor", "none")])
def test_moe_experts_with_data_dependent_token_counts(inner, grad_prune):
    """With dynamo's capture_dynamic_output_shape_ops (README), boolean-mask routing stays in the
    graph: the experts' token counts are unbacked sizes, MVUE pads them, and training matches the
    reference; the report prints the unknown size as ``?``. (Inductor with MVUE on unbacked sizes
    compiles for 80 s on a cold cache, so Inductor runs without it.)"""
    torch.manual_seed(0)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        train_and_compare(_MoE, (16, 32), steps=3, grad_prune=grad_prune, inner=inner)
        report = nmcompile.explain(_MoE(), torch.randn(16, 32), grad_prune=grad_prune, inner=inner)
    rows = {row.name: row for row in report.rows}
    assert rows["experts.0.weight"].sparse and rows["experts.1.weight"].sparse
    assert rows["experts.0.weight"].input_shape == (None, 32)
    assert "| ?x32 " in str(report) and "None" not in str(report)


def test_hitting_dynamos_recompile_limit_warns_that_the_layers_train_dense():
    """Past recompile_limit dynamo runs a frame eagerly and calls no backend: nmsparse turns dynamo's
    log line into a warning for the functions it compiled (steps stop at the compiled calls), and
    stays quiet for a function only another backend compiled."""

    class Other(nn.Module):  # code of its own: dynamo's frame ids are per code object
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    model, other = MLP(16, 32, 16), Other()  # built-in containers would share wrap_inline's frame
    compiled = torch.compile(model, backend=_backend(), dynamic=False)
    plain = torch.compile(other, backend="aot_eager", dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=2), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in (4, 5, 6, 7):
            plain(torch.randn(batch, 16)).sum().backward()
        assert not [str(w.message) for w in caught if "nmsparse" in str(w.message)]
        for batch in (4, 5, 6, 7):
            compiled(torch.randn(batch, 16)).sum().backward()
    ours = [str(w.message) for w in caught if "nmsparse" in str(w.message)]
    assert len(ours) == 1  # at batch 6: dynamo then skips the frame for good, with no second log line
    assert ours[0].startswith("nmsparse: dynamo hit its recompile_limit (2) for 'forward' (")
    assert "an nmsparse model there trains dense and its layers' steps stop" in ours[0]
    assert "'inner' wrapper" not in ours[0]  # a class of one's own: its forward is its own code
    assert {v["step"] for v in nmcompile.sparsity_state(model).values()} == {2}


def test_a_function_nmsparse_compiled_without_sparse_layers_hitting_the_limit_does_not_warn():
    """A whole training step compiled with nmsparse also hands it the optimizer's ``step``, whose
    graphs hold no GEMM: OneCycleLR's new ``lr`` and ``betas`` each step recompile it to the limit.
    Running it eagerly loses nothing, so no warning (it warned that the model trains dense, while the
    layers went on stepping); the model's own forward still warns at its limit."""
    model = MLP(16, 32, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=20)
    compiled_step = torch.compile(opt.step, backend=_backend())
    compiled = torch.compile(model, backend=_backend(), dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=2), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            compiled(torch.randn(4, 16)).sum().backward()
            compiled_step()
            schedule.step()
            opt.zero_grad()
        assert not [str(w.message) for w in caught if "nmsparse" in str(w.message)]
        assert {v["step"] for v in nmcompile.sparsity_state(model).values()} == {4}
        for batch in (5, 6):
            compiled(torch.randn(batch, 16)).sum().backward()
    ours = [str(w.message) for w in caught if "nmsparse" in str(w.message)]
    assert len(ours) == 1 and ours[0].startswith("nmsparse: dynamo hit its recompile_limit (2) for 'forward' (")


class _DensePrefix(nn.Module):
    """A forward whose first graph holds no GEMM (an embedding's lookup, mask preparation), then a
    graph break, then its layer: refused at the limit, the frame runs the resume eagerly too."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * 2
        torch._dynamo.graph_break()
        return self.fc(x)


@pytest.mark.parametrize("case", ["dense first graph", "frozen first"])
def test_the_limit_warns_where_the_code_had_gemms_sparse_or_not(case):
    """Past the limit the warning comes for code that gave nmsparse GEMMs, even where every graph
    of it so far was dense: a forward's GEMM-free first graph before a graph break, or a model
    compiled frozen (linear probing) and unfrozen since (both went quiet when the warning was
    limited to code with sparse graphs)."""
    model = _DensePrefix() if case == "dense first graph" else MLP(16, 32, 16).requires_grad_(False)
    compiled = torch.compile(model, backend=_backend(), dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=2), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if case == "frozen first":
            for batch in (4, 5):
                compiled(torch.randn(batch, 16))
            model.requires_grad_(True)
        for batch in (4, 5, 6, 7):
            compiled(torch.randn(batch, 16)).sum().backward()
    ours = [str(w.message) for w in caught if str(w.message).startswith("nmsparse: dynamo hit its recompile_limit")]
    assert len(ours) == 1, ours


def test_another_backend_hitting_the_recompile_limit_on_shared_code_warns():
    """Another backend's compiles of the same code (a second instance of the model class) hitting
    the limit warn too: dynamo then stops compiling that code for every backend, so the nmsparse
    model's new shape runs eagerly (its step stays), while its compiled shape still steps."""
    model, twin = MLP(16, 32, 16), MLP(16, 32, 16)
    compiled = torch.compile(model, backend=_backend(), dynamic=False)
    plain = torch.compile(twin, backend="aot_eager", dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=2), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(torch.randn(4, 16)).sum().backward()
        for batch in (4, 5, 6):
            plain(torch.randn(batch, 16)).sum().backward()
        ours = [str(w.message) for w in caught if "nmsparse" in str(w.message)]
        assert len(ours) == 1 and ours[0].startswith("nmsparse: dynamo hit its recompile_limit (2) for 'forward' (")
        compiled(torch.randn(5, 16)).sum().backward()
        assert {v["step"] for v in nmcompile.sparsity_state(model).values()} == {1}
        compiled(torch.randn(4, 16)).sum().backward()
    assert {v["step"] for v in nmcompile.sparsity_state(model).values()} == {2}


@pytest.mark.parametrize("isolated", ["other", "nmsparse", "both"])
def test_an_isolated_compile_hitting_the_recompile_limit_warns_only_for_nmsparse(isolated):
    """With ``isolate_recompiles=True`` on either wrapper the two have code caches of their own:
    another backend's wrapper passing its limit stops no nmsparse compile, so nmsparse says nothing
    (it warned that its model trains dense, advising the option in use) and its model steps at new
    shapes; the nmsparse wrapper passing its own limit warns."""
    model, twin = MLP(16, 32, 16), MLP(16, 32, 16)
    ours, other = isolated in ("nmsparse", "both"), isolated in ("other", "both")
    compiled = torch.compile(model, backend=_backend(), dynamic=False, isolate_recompiles=ours)
    plain = torch.compile(twin, backend="aot_eager", dynamic=False, isolate_recompiles=other)
    with torch._dynamo.config.patch(recompile_limit=2), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(torch.randn(4, 16)).sum().backward()
        for batch in (4, 5, 6):
            plain(torch.randn(batch, 16)).sum().backward()
        compiled(torch.randn(5, 16)).sum().backward()
        assert not [str(w.message) for w in caught if "nmsparse" in str(w.message)]
        assert {v["step"] for v in nmcompile.sparsity_state(model).values()} == {2}
        compiled(torch.randn(6, 16)).sum().backward()
    ours = [str(w.message) for w in caught if "nmsparse" in str(w.message)]
    assert len(ours) == 1 and ours[0].startswith("nmsparse: dynamo hit its recompile_limit (2) for 'forward' (")
    assert {v["step"] for v in nmcompile.sparsity_state(model).values()} == {2}


@pytest.mark.parametrize("isolated", [False, True])
def test_torch_nn_modules_compiled_directly_share_one_limit(isolated):
    """Dynamo compiles every ``torch.nn`` module given to ``torch.compile`` itself through one
    ``inner`` wrapper, so models of other widths in one process (a sweep) count together: past the
    limit the next trains dense, and the warning says why; ``isolate_recompiles=True`` gives each
    wrapper a limit of its own, and every model trains sparse."""
    models = [nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 8)) for width in (16, 24, 32)]
    with torch._dynamo.config.patch(recompile_limit=2), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for model in models:
            compiled = torch.compile(model, backend=_backend(), dynamic=False, isolate_recompiles=isolated)
            compiled(torch.randn(4, model[0].in_features)).sum().backward()
    ours = [str(w.message) for w in caught if str(w.message).startswith("nmsparse: dynamo hit its recompile_limit")]
    trained = ["0.weight" in nmcompile.sparsity_state(model) for model in models]
    if isolated:
        assert not ours and trained == [True, True, True]
    else:
        assert len(ours) == 1 and trained == [True, True, False]
        assert ours[0].startswith("nmsparse: dynamo hit its recompile_limit (2) for 'inner' (")
        assert "every torch.nn module given to torch.compile itself (nn.Sequential, say) counts too" in ours[0]


class _Cond(nn.Module):
    """A ``torch.cond`` on the data picks one of two layers."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.fa, self.fb = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return torch.cond(h.sum() > 0, lambda t: self.fa(t), lambda t: self.fb(t), (h,))


def test_cond_branches_run_dense_in_the_reference_as_in_the_backend():
    """torch traces ``torch.cond`` branches with dynamo even in eager mode: the reference runs their
    layers dense, as the backend leaves them (it raised UncapturedHigherOrderOpError on its set of
    seen weights). Both branches taken; outputs and gradients agree at every step."""
    torch.manual_seed(0)
    base = _Cond()
    ref = reference.sparsify(copy.deepcopy(base))
    mine = copy.deepcopy(base)
    compiled = torch.compile(mine, backend=_backend())
    taken = set()
    for step, scale in enumerate((5.0, -5.0, 5.0, -5.0)):
        x = torch.randn(8, 16) + scale * base.inp.weight.sum(0).sign().detach()
        with torch.no_grad():
            w = mine.inp.weight
            taken.add(bool(nn.functional.linear(x, w * reference.nm_mask(w, 2, 4, 1), mine.inp.bias).sum() > 0))
        y_ref, y = ref(x), compiled(x)
        assert_close(y, y_ref, what=f"step {step} output")
        y_ref.square().mean().backward()
        y.square().mean().backward()
        sgd_step_both(ref, mine, 0.05)
    for (name, p_ref), p in zip(ref.named_parameters(), mine.parameters(), strict=True):
        assert_close(p, p_ref, what=name)
    assert taken == {True, False}
    assert {k: v["step"] for k, v in nmcompile.sparsity_state(compiled).items()} == {"inp.weight": 4}
    assert {k: v["step"] for k, v in nmcompile.sparsity_state(ref).items()} == {
        "inp.weight": 4, "fa.weight": 0, "fb.weight": 0,  # states made by sparsify, never run
    }  # fmt: skip


def test_symbolic_divisibility_is_decided_without_guards():
    """SPEC §10: s0·8 is provably divisible by 4, s0 is not; no guard is installed either way."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv()
    s0 = env.create_symintnode(env.create_symbol(12, ConstantSource("s0")), hint=12)
    assert divisible(s0 * 8, 4) and divisible(s0 * 2 + 4, 2) and not divisible(s0, 4)
    assert divisible(12, 4) and not divisible(10, 4)
    assert not env.guards


@pytest.mark.parametrize(
    ("precision", "model"), [("autocast_bf16", MLP), ("autocast_bf16", InOut), ("bf16", MLP), ("fp16", MLP)]
)
def test_mixed_precision_matches_reference(precision, model):
    """Autocast (bf16) and bf16/fp16 parameters: masks from the parameter's own values; the compiled
    model agrees with the reference within bf16 tolerance, through 3 optimizer steps. Under autocast
    the output is bf16, as the dense model's, also where GPT-2's ``addmm`` adds an fp32 bias after
    the sparse GEMM (the sum came out fp32)."""
    base = model()
    ref, mine = reference.sparsify(copy.deepcopy(base), grad_prune="mvue24"), copy.deepcopy(base)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is not None:
        ref.to(dtype)
        mine.to(dtype)
    compiled = torch.compile(mine, backend=_backend(grad_prune="mvue24"))
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (ref, mine)]
    for _ in range(3):
        x = torch.randn(8, 32, dtype=dtype or torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast_bf16"):
            y_ref, y = ref(x), compiled(x)
        assert y.dtype == y_ref.dtype == (dtype or torch.bfloat16)
        assert_close(y.float(), y_ref.float(), rel=1e-2, what="output")
        y_ref.float().square().mean().backward()
        y.float().square().mean().backward()
        for (name, p_ref), p in zip(ref.named_parameters(), mine.parameters(), strict=True):
            assert p.grad.dtype == p.dtype
            assert_close(p.grad.float(), p_ref.grad.float(), rel=1e-2, what=name)
        for opt in opts:
            opt.step()
            opt.zero_grad()
    w = mine.fc1.weight.detach() if model is MLP else mine.proj.weight.detach()
    f = nmcompile.ops.nm_mask(w, 2, 4, 1)
    assert torch.equal(f, reference.nm_mask(w, 2, 4, 1))  # from the parameter's own (low-precision) values


@pytest.mark.parametrize("masks", [False, True], ids=["no_mask", "masks"])
@pytest.mark.parametrize("dynamic", [None, True], ids=["auto", "dynamic"])
@pytest.mark.parametrize("mode", ["train", "eval", "eval_no_grad"])
def test_transformer_encoder_layer_including_attention_projections(mode, dynamic, masks):
    """nn.TransformerEncoderLayer: the MultiheadAttention projections are sparse too, in training,
    in eval, and on the fused inference fast path (eval + no_grad), also given a causal and a key
    padding mask (the fast path's merged mask; it ran dense before); also with ``dynamic=True``,
    where dynamo passes the dropout probability and the LayerNorm eps as graph values."""
    torch._dynamo.reset()
    base = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
    ref, mine = reference.sparsify(copy.deepcopy(base)), copy.deepcopy(base)
    compiled = torch.compile(mine, backend=_backend(perm_interval=1), dynamic=dynamic)
    for _ in range(2):  # train a little so the masks and permutations are not trivial
        x = torch.randn(2, 8, 32)
        ref(x).square().mean().backward()
        compiled(x).square().mean().backward()
    for model in (ref, mine):
        for p in model.parameters():
            p.data -= 0.05 * p.grad
            p.grad = None
    if mode != "train":
        ref.eval()
        mine.eval()
    x = torch.randn(2, 8, 32)
    kwargs = {}
    if masks:
        padding = torch.tensor([[False] * 8, [False] * 5 + [True] * 3])
        kwargs = {"src_mask": torch.triu(torch.ones(8, 8, dtype=torch.bool), 1), "src_key_padding_mask": padding}
    with torch.set_grad_enabled(mode != "eval_no_grad"):
        out = compiled(x, **kwargs)
        assert_close(out, ref(x, **kwargs), what=mode)
        assert (out - mine(x, **kwargs)).abs().max() > 0.01  # not the dense layer's output
    state = nmcompile.sparsity_state(mine)
    assert set(state) == {"self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight", "linear2.weight"}
    assert all(s["step"] == 2 + (mode == "train") for s in state.values())


def test_attention_dropout_as_a_graph_value_is_applied():
    """``dynamic=True``: the MultiheadAttention dropout probability enters the graph as a value; the
    decomposed attention still applies it (p=1 zeroes the attention, leaving the output bias) and
    the projections stay sparse."""
    torch._dynamo.reset()
    mha = nn.MultiheadAttention(16, 4, batch_first=True, dropout=1.0)
    compiled = torch.compile(mha, backend=_backend(), dynamic=True)
    x = torch.randn(2, 5, 16)
    for need_weights in (True, False):
        out, _ = compiled(x, x, x, need_weights=need_weights)
        out.sum().backward()
        assert_close(out, mha.out_proj.bias.detach().expand(2, 5, 16), what=f"need_weights={need_weights}")
    assert sorted(nmcompile.sparsity_state(mha)) == ["in_proj_weight", "out_proj.weight"]


def test_attention_decomposition_equals_pytorch_when_dense():
    """The decomposed attention is PyTorch's formula: with every layer excluded, outputs and
    attention weights equal eager nn.MultiheadAttention (masks, need_weights, ``is_causal`` with a
    key padding mask) and the fast path."""
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    q = torch.randn(2, 5, 32)
    kpm = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    mask = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    almost_causal = mask.clone()
    almost_causal[4, 1] = True  # with a key padding mask, PyTorch applies the mask it is given, not the hint
    compiled = torch.compile(mha, backend=_backend(exclude=".*"))
    causal_kpm = {"attn_mask": almost_causal, "key_padding_mask": kpm, "need_weights": False, "is_causal": True}
    for kwargs in ({}, {"key_padding_mask": kpm}, {"attn_mask": mask, "need_weights": False}, causal_kpm):
        out, weights = compiled(q, q, q, **kwargs)
        ref_out, ref_weights = mha(q, q, q, **kwargs)
        assert_close(out, ref_out, what=str(kwargs))
        if ref_weights is not None:
            assert_close(weights, ref_weights, what="attention weights")
    torch._dynamo.reset()  # the graphs above count towards the recompile limit of the layer's below
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0, norm_first=True).eval()
    fast = torch.compile(layer, backend=_backend(exclude=".*"))
    float_causal = nn.Transformer.generate_square_subsequent_mask(5)
    per_head = torch.zeros(2 * 4, 5, 5)  # 3-D: one mask per batch entry and head
    per_head[torch.arange(8), torch.arange(8) % 5, (torch.arange(8) + 1) % 5] = float("-inf")
    fast_path_masks = (
        {},
        {"src_key_padding_mask": kpm},
        {"src_mask": float_causal, "is_causal": True},
        {"src_mask": mask, "src_key_padding_mask": kpm},
        {"src_mask": per_head, "src_key_padding_mask": torch.zeros(2, 5).masked_fill(kpm, float("-inf"))},
    )
    with torch.no_grad():
        for kwargs in fast_path_masks:  # the fused kernel's result, with each of merge_masks' mask types
            assert_close(fast(q, **kwargs), layer(q, **kwargs), what=f"fast path {list(kwargs)}")
        scores_bias = torch.zeros(5, 5).fill_diagonal_(0.5)  # the fused kernel takes it as a bool mask
        fused = layer(q, src_mask=scores_bias)
        unfused = layer.train()(q, src_mask=scores_bias)  # dropout 0: the module's own formula
        assert (fused - unfused).abs().max() > 0.1
        assert_close(fast.eval()(q, src_mask=scores_bias), unfused, what="a float mask is added, as off the fast path")


@pytest.mark.filterwarnings("ignore:Support for mismatched src_key_padding_mask and src_mask is deprecated")
def test_mismatched_mask_dtypes_leave_the_encoder_layer_dense_unless_the_warning_is_reordered():
    """A float causal mask with a bool padding mask: ``torch.nn`` warns, the warning is a graph break
    in ``torch.nn``'s code, and the whole encoder layer (its feed-forward layers too) trains eagerly
    and dense, as the README says; with ``warnings.warn`` among dynamo's reorderable logging
    functions, the README's remedy, it trains sparse, as the reference does."""
    torch.manual_seed(0)
    base = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
    x = torch.randn(2, 6, 32)
    masks = {"src_mask": nn.Transformer.generate_square_subsequent_mask(6), "is_causal": True}
    masks["src_key_padding_mask"] = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    for reordered in (False, True):
        torch._dynamo.reset()
        ref, mine = reference.sparsify(copy.deepcopy(base)), copy.deepcopy(base)
        logging_functions = {*torch._dynamo.config.reorderable_logging_functions, *([warnings.warn] * reordered)}
        with torch._dynamo.config.patch(reorderable_logging_functions=logging_functions):
            out = torch.compile(mine, backend=_backend())(x, **masks)
        if reordered:
            assert_close(out, ref(x, **masks))
            assert sorted(nmcompile.sparsity_state(mine)) == [
                "linear1.weight", "linear2.weight", "self_attn.in_proj_weight", "self_attn.out_proj.weight"
            ]  # fmt: skip
        else:
            assert_close(out, base(x, **masks))
            assert nmcompile.sparsity_state(mine) == {}


class _Trainer:
    """A trainer whose compiled method clips and trains the model it holds as ``self.model``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def step(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            for p in self.model.parameters():
                p.clamp_(-0.2, 0.2)
        loss = self.model(x).square().mean()
        loss.backward()
        return loss


@pytest.mark.parametrize("reach", ["argument", "trainer attribute"])
def test_a_compiled_training_step_that_clips_the_weights_warns_that_they_train_dense(reach):
    """WGAN-style clipping (``p.clamp_()`` under ``no_grad``) inside a training step compiled whole
    with nmsparse puts a second use of each weight in the graph: a tie (SPEC §10), so the layers
    train dense, which the reference (it sees the forward only) does not. That was silent; it now
    warns, once per weight, naming the ops and the remedy, which trains as the reference does;
    the model an argument of the step or a trainer's ``self.model``."""
    torch.manual_seed(0)
    model = MLP(16, 32, 16)
    ref_model = reference.sparsify(copy.deepcopy(model))

    def step(forward, owner, x):
        with torch.no_grad():
            for p in owner.parameters():
                p.clamp_(-0.2, 0.2)
        loss = forward(x).square().mean()
        loss.backward()
        return loss

    backend = nmcompile.backend(inner="aot_eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if reach == "argument":
            torch.compile(step, backend=backend)(model, model, torch.randn(4, 16))
        else:
            torch.compile(_Trainer(model).step, backend=backend)(torch.randn(4, 16))
    ours = sorted(str(w.message) for w in caught if str(w.message).startswith("nmsparse:"))
    assert len(ours) == 3 and ours[0].startswith(
        "nmsparse: fc1.weight trains dense: the compiled function also uses it outside the model's forward (clamp_)"
    )
    assert "compile the model itself with nmsparse and the rest of the step without it" in ours[0]
    assert nmcompile.sparsity_state(model) == {}
    torch._dynamo.reset()
    model = MLP(16, 32, 16)
    model.load_state_dict(ref_model.state_dict())
    compiled = torch.compile(model, backend=nmcompile.backend(inner="aot_eager"))
    for _ in range(2):
        x = torch.randn(4, 16)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loss = step(compiled, model, x)
        assert_close(loss, step(ref_model, ref_model, x), what="the remedy: the model compiled")
    assert {k: v["step"] for k, v in nmcompile.sparsity_state(model).items()} == dict.fromkeys(
        ("fc1.weight", "fc2.weight", "head.weight"), 2
    )


def test_a_compiled_step_that_runs_the_model_twice_warns_for_the_second_call():
    """A step compiled whole that runs the model twice (a target under ``no_grad``, then the
    training forward) holds two GEMMs of each weight in one graph, a tie: it warns, once per weight
    (it was silent). A weight shared inside the forward (called twice there) does not warn, also
    where the forward is reached as ``model.forward(x)`` (it warned), and the model compiled alone
    in the same step trains its other layers sparse."""

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.shared = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.shared(torch.relu(self.shared(self.fc(x))))

    def step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = model(x)
        loss = (model(x) - target).square().mean()
        loss.backward()
        return loss

    for whole in (True, False):
        model = Shared()
        compiled = torch.compile(step if whole else model, backend=nmcompile.backend(inner="aot_eager"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled(model, torch.randn(4, 16)) if whole else step(compiled, torch.randn(4, 16))
        ours = sorted(str(w.message) for w in caught if "outside the model's forward" in str(w.message))
        expected = [f"nmsparse: {name}.weight trains dense: the compiled function also uses it outside the model's "
                    "forward (another call of the model)" for name in ("fc", "shared")]  # fmt: skip
        assert len(ours) == (2 if whole else 0) and all(m.startswith(e) for m, e in zip(ours, expected, strict=False))
        assert sorted(nmcompile.sparsity_state(model)) == ([] if whole else ["fc.weight"])
        torch._dynamo.reset()
    model = Shared()  # reached as model.forward(x), the stacks start at the shared layer: sharing
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(lambda x: model.forward(x), backend=nmcompile.backend(inner="aot_eager"))(torch.randn(4, 16))
    assert not [w for w in caught if "outside the model's forward" in str(w.message)]


def _augmented(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Test-time augmentation: the model's mean output over an input and its flip."""
    return (model(x) + model(x.flip(-1))) / 2


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A plain function named ``forward`` that calls the model twice (not a module's forward)."""
    return model(x) - model(x.flip(-1))


@pytest.mark.parametrize("fn", [_augmented, forward], ids=["augmented", "named_forward"])
def test_a_compiled_inference_function_that_calls_the_model_twice_masks_every_call(fn):
    """A function compiled whole that calls a sparse-trained model twice under ``no_grad`` (test-time
    augmentation, a decoding loop) holds two GEMMs of each weight in one graph, but none trains:
    each call masks the weight, as the reference runs two forwards (the weights ran dense, with a
    warning about training). Two uses of a weight inside one call stay a tie. A plain function
    named ``forward(model, x)`` is such a function too (dynamo's code name alone made it a tie)."""
    base = MLP(16, 32, 16)
    ref = reference.sparsify(copy.deepcopy(base))
    mine = copy.deepcopy(base)
    train_against(ref, mine, torch.compile(mine, backend=nmcompile.backend()), shape=(4, 16), steps=2)
    ref.eval(), mine.eval()
    x = torch.randn(4, 16)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expected = fn(ref, x)
        assert (fn(copy.deepcopy(base).eval(), x) - expected).abs().max() > 1e-2  # dense weights differ
        records = []
        backend = nmcompile.NMSparseBackend(nmcompile.SparsityConfig(), on_compile=records.append)
        assert_close(torch.compile(fn, backend=backend)(mine, x), expected, what="two calls")
    assert not [str(w.message) for w in caught if str(w.message).startswith("nmsparse")]
    (record,) = records
    assert [(row.name, row.sparse) for row in record.rows] == [
        (name, True) for _ in range(2) for name in ("fc1.weight", "fc2.weight", "head.weight")
    ]
    assert {name: s["step"] for name, s in nmcompile.sparsity_state(mine).items()} == dict.fromkeys(
        ("fc1.weight", "fc2.weight", "head.weight"), 2
    )


class _Distill(nn.Module):
    """A student and a teacher that the forward calls twice under ``no_grad`` (a tie, SPEC §10)."""

    def __init__(self) -> None:
        super().__init__()
        self.teacher, self.student = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = self.teacher(x) + self.teacher(x.flip(-1))
        return self.student(x) - t


def _logged(forward):
    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        return forward(self, *args, **kwargs)

    return wrapper


@pytest.mark.parametrize("spelling", ["decorated", "closure", "partial"])
def test_a_forward_decorated_or_set_on_the_instance_is_a_modules_forward(spelling):
    """A module's forward under a ``functools.wraps`` decorator (dynamo compiles the wrapper's
    code), or set on the instance as a closure or a ``functools.partial``, is a module's forward:
    a teacher called twice in it under ``no_grad`` stays a tie, dense, as in the reference's one
    forward, with no warning about code outside the forward (the decorated one was taken for a
    function and warned; the others masked the teacher per call)."""

    class Decorated(_Distill):
        @_logged
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x)

    torch._dynamo.reset()
    model = Decorated() if spelling == "decorated" else _Distill()
    if spelling == "closure":
        model.forward = lambda x: _Distill.forward(model, x)
    elif spelling == "partial":

        def forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return _Distill.forward(module, x)

        model.forward = functools.partial(forward, model)
    compiled = torch.compile(model, backend=nmcompile.backend(inner="aot_eager"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            compiled(torch.randn(8, 16)).square().mean().backward()
    assert not [str(w.message) for w in caught if str(w.message).startswith("nmsparse")]
    assert sorted(nmcompile.sparsity_state(model)) == ["student.weight"]


def test_a_compiled_inference_function_calling_a_single_layer_twice_masks_every_call():
    """The same for a model that is one layer (its module stack has one entry per call, ``<id>`` and
    ``<id>@1``), and for a function calling the model and one of its layers: each call masked, as
    the reference's (they ran the dense weight, silently). A block run twice inside a module's own
    compiled forward stays a tie, as in the reference's one forward (a review found it masked)."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Sequential(nn.Linear(16, 16), nn.ReLU())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.block(self.block(x))

    x = torch.randn(4, 16)
    base = nn.Linear(16, 16)
    ref = reference.sparsify(copy.deepcopy(base))
    mine = copy.deepcopy(base)
    train_against(ref, mine, torch.compile(mine, backend=nmcompile.backend()), shape=(4, 16), steps=2)
    ref.eval(), mine.eval()
    with torch.no_grad():
        expected = ref(x) + ref(x.flip(-1))
        assert (base(x) + base(x.flip(-1)) - expected).abs().max() > 1e-2  # the dense weight differs
        compiled = torch.compile(lambda m, t: m(t) + m(t.flip(-1)), backend=nmcompile.backend())
        assert_close(compiled(mine, x), expected, what="a single layer called twice")
    base = MLP(16, 16, 16)
    ref = reference.sparsify(copy.deepcopy(base)).eval()
    mine = copy.deepcopy(base).eval()
    with torch.no_grad():
        expected = ref(x) + ref.fc1(x).sum()
        compiled = torch.compile(lambda m, t: m(t) + m.fc1(t).sum(), backend=nmcompile.backend())
        assert_close(compiled(mine, x), expected, what="the model and its layer")
    base = Twice()
    ref = reference.sparsify(copy.deepcopy(base)).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference warns of the tie at its first forward
        ref(x)
        expected = ref(x)
        assert_close(torch.compile(base.eval(), backend=nmcompile.backend())(x), expected, what="a tie in one forward")
        assert torch.equal(base(x), expected)  # dense


def test_lstm_is_reported_dense_and_tied_head_is_dense():
    """nn.LSTM runs dense with a reason; an output head tied to the embedding stays dense (SPEC §10)."""

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(40, 32)
            self.lstm = nn.LSTM(32, 32, batch_first=True)
            self.head = nn.Linear(32, 40, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, idx):
            return self.head(self.lstm(self.emb(idx))[0])

    model = LM()
    report = nmcompile.explain(model, torch.randint(0, 40, (2, 6)), inner="aot_eager")
    rows = {r.name: r for r in report.rows}
    assert "recurrent" in rows["lstm.weight_ih_l0"].reason and not rows["lstm.weight_ih_l0"].sparse
    assert not any(r.sparse for r in report.rows)
    compiled = torch.compile(model, backend=_backend())
    out = compiled(torch.randint(0, 40, (2, 6)))
    out.sum().backward()
    assert out.shape == (2, 6, 40) and nmcompile.sparsity_state(model) == {}


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(32, 32)
        self.rnn = nn.LSTM(32, 32, batch_first=True)
        self.fc = nn.Linear(32, 16)

    def forward(self, x):
        return self.fc(self.rnn(self.pre(x))[0])


@pytest.mark.parametrize("allow_rnn", [False, True])
def test_layers_around_an_lstm(allow_rnn):
    """Dynamo (torch 2.13) compiles nothing of a forward that calls an LSTM: every layer trains
    dense and the report says why. Under ``allow_rnn`` the layers around it are sparse and the
    LSTM's weights are reported as used by ``lstm``."""
    torch._dynamo.reset()
    x = torch.randn(2, 4, 32)
    with torch._dynamo.config.patch(allow_rnn=allow_rnn):
        model = _Recurrent()
        torch.compile(model, backend=_backend())(x).sum().backward()
        rows = {r.name: (r.sparse, r.reason) for r in nmcompile.explain(model, x, inner="aot_eager").rows}
    sparse = ["fc.weight", "pre.weight"] if allow_rnn else []
    assert sorted(nmcompile.sparsity_state(model)) == sparse
    assert sorted(name for name, (is_sparse, _) in rows.items() if is_sparse) == sparse
    lstm = rows["rnn.weight_ih_l0"]
    assert lstm[0] is False
    assert lstm[1].startswith("used by lstm" if allow_rnn else "LSTM: dynamo does not trace")
    if not allow_rnn:
        assert rows["pre.weight"][1].startswith("not a GEMM operand in any compiled graph")


class _BrokenBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        torch._dynamo.graph_break()  # dynamo compiles the rest once and reuses it for every block
        return x + self.fc2(h)


class _BrokenBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_BrokenBlock() for _ in range(3)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


@pytest.mark.parametrize("option", [{"exclude": r"^blocks\.2\."}, {"include": r"^blocks\.2\."}])
def test_name_filters_hold_where_dynamo_reuses_a_block_graph(option):
    """A graph break inside a repeated block makes dynamo reuse the block's graphs for every
    block, whatever its name: blocks the filter decides otherwise for run the graph rewritten for
    them (eagerly, with a warning), so exactly the admitted layers are sparse, as the reference."""
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="dynamo reuses a compiled graph"):
        ref_state, state = train_and_compare(_BrokenBlocks, (8, 32), steps=3, inner="aot_eager", **option)
    admitted = [f"blocks.{i}.fc{j}.weight" for i in range(3) for j in (1, 2) if (i == 2) == ("include" in option)]
    assert sorted(state) == sorted(ref_state) == admitted
    assert {name: s["step"] for name, s in state.items()} == dict.fromkeys(admitted, 3)
    assert all(torch.equal(state[name]["perm"], ref_state[name]["perm"]) for name in admitted)


def test_a_users_backend_that_calls_nmsparse_names_weights_from_the_compiled_model():
    """A backend of the user's own that hands each graph to nmsparse (to log it, say), with a graph
    break inside the blocks: the weights keep the compiled model's names and indices, so
    ``include`` admits what it names and the layers train as the reference (a rule that took only
    nmsparse's own backends for the model's compile named them inside each block: dense)."""
    options = {"inner": "aot_eager", "include": r"^blocks\.1\.", "grad_prune": "mvue24", "perm_interval": 1}
    seen = []

    def logging_backend(gm, example_inputs):
        seen.append(len(gm.graph.nodes))
        return nmcompile.backend(**options)(gm, example_inputs)

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _BrokenBlocks()
    ref = reference.sparsify(copy.deepcopy(model), **options)
    train_against(ref, model, torch.compile(model, backend=logging_backend))
    state = nmcompile.sparsity_state(model)
    assert {name: s["layer_index"] for name, s in state.items()} == {"blocks.1.fc1.weight": 4, "blocks.1.fc2.weight": 6}
    assert seen


def test_a_compiled_function_given_the_model_compiled_alike_names_weights_past_a_graph_break():
    """A compiled function given the model compiled with the same backend, a graph break inside
    its blocks: every graph names its weights from the model, so ``include`` admits the layers it
    names and they train as the reference."""
    options = {"inner": "aot_eager", "include": r"^blocks\.[12]\.", "grad_prune": "mvue24", "perm_interval": 1}
    backend = nmcompile.backend(**options)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _BrokenBlocks()
    ref = reference.sparsify(copy.deepcopy(model), **options)
    step = torch.compile(lambda net, x: net(x), backend=backend)
    compiled = torch.compile(model, backend=backend)
    train_against(ref, model, lambda x: step(compiled, x))
    state = nmcompile.sparsity_state(model)
    expected = {f"blocks.{i}.fc{j}.weight": 4 * i + 2 * (j - 1) for i in (1, 2) for j in (1, 2)}
    assert {name: s["layer_index"] for name, s in state.items()} == expected


def test_a_compiled_function_given_a_plain_model_names_weights_past_a_graph_break():
    """A compiled function given the plain model, a graph break inside its blocks: dynamo compiles
    each block's frames on their own, and their weights are named within the model called inside
    the function, not within the block, so ``include`` admits the layers it names, with their
    layer indices, and they train as the reference (they were ``fc1.weight`` in every block: the
    filter missed them, and they ran dense)."""
    options = {"inner": "aot_eager", "include": r"^blocks\.[12]\.", "grad_prune": "mvue24", "perm_interval": 1}
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _BrokenBlocks()
    ref = reference.sparsify(copy.deepcopy(model), **options)
    step = torch.compile(lambda net, x: net(x), backend=nmcompile.backend(**options))
    train_against(ref, model, lambda x: step(model, x))
    state = nmcompile.sparsity_state(model)
    expected = {f"blocks.{i}.fc{j}.weight": 4 * i + 2 * (j - 1) for i in (1, 2) for j in (1, 2)}
    assert {name: s["layer_index"] for name, s in state.items()} == expected


@pytest.mark.parametrize("how", ["torch.compile(model.forward)", "model.forward = torch.compile(model.forward)"])
def test_a_compiled_forward_method_names_weights_past_a_graph_break(how):
    """``torch.compile(model.forward)`` (and the same set on the instance): a graph break inside the
    blocks names their weights within the model, with its layer indices, so ``include`` admits them
    and they train as the reference (they were named within each block and ran dense)."""
    options = {"inner": "aot_eager", "include": r"^blocks\.[12]\.", "grad_prune": "mvue24", "perm_interval": 1}
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _BrokenBlocks()
    ref = reference.sparsify(copy.deepcopy(model), **options)
    compiled = torch.compile(model.forward, backend=nmcompile.backend(**options))
    if how.startswith("model.forward ="):
        model.forward = compiled
        compiled = model
    train_against(ref, model, compiled)
    state = nmcompile.sparsity_state(model)
    expected = {f"blocks.{i}.fc{j}.weight": 4 * i + 2 * (j - 1) for i in (1, 2) for j in (1, 2)}
    assert {name: s["layer_index"] for name, s in state.items()} == expected


def test_a_compiled_function_run_inside_another_compile_names_weights_as_alone():
    """An nmsparse-compiled function called from a disabled helper in a module that another backend
    compiled: the other compile's modules do not name the weights (they were ``model.blocks...``,
    so ``include`` admitted none and the layers trained dense); the model's names do, as alone."""

    @torch.compiler.disable
    def run_disabled(step, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return step(model, x)

    class Trainer(nn.Module):
        def __init__(self, model: nn.Module, step) -> None:
            super().__init__()
            self.model, self.step = model, step

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return run_disabled(self.step, self.model, x)

    options = {"inner": "aot_eager", "include": r"^blocks\.1\."}
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _BrokenBlocks()
    ref = reference.sparsify(copy.deepcopy(model), **options)
    trainer = Trainer(model, torch.compile(lambda net, x: net(x), backend=nmcompile.backend(**options)))
    outer = torch.compile(lambda t, x: t(x), backend="eager")
    train_against(ref, model, lambda x: outer(trainer, x))
    assert sorted(nmcompile.sparsity_state(model)) == ["blocks.1.fc1.weight", "blocks.1.fc2.weight"]


def test_explain_names_weights_from_a_model_compiled_in_place_with_another_backend():
    """``explain`` of a model compiled in place with another backend (``model.compile()``), a graph
    break inside its blocks: the rows are the plain model's, full names and filters alike."""
    option = {"inner": "aot_eager", "include": r"^blocks\.[12]\."}
    torch.manual_seed(0)
    model = _BrokenBlocks()
    torch._dynamo.reset()
    plain = nmcompile.explain(copy.deepcopy(model), torch.randn(8, 32), **option)
    model.compile(backend="aot_eager")
    torch._dynamo.reset()
    compiled = nmcompile.explain(model, torch.randn(8, 32), **option)
    expected = sorted((r.name, r.sparse) for r in plain.rows)
    assert sorted((r.name, r.sparse) for r in compiled.rows) == expected
    assert [name for name, sparse in expected if sparse] == [f"blocks.{i}.fc{j}.weight" for i in (1, 2) for j in (1, 2)]


def test_blocks_compiled_alone_under_an_nmsparse_compile_of_the_model_keep_their_options_past_a_graph_break():
    """Blocks compiled with nmsparse options of their own inside a model compiled with others: a
    graph break in each block makes dynamo run it as a frame of its own, compiled with the block's
    options, which then also name its weights (within the block, as README says of blocks compiled
    one by one): its ``include`` matches, and it trains as the per-block reference."""
    inner = {"inner": "aot_eager", "n": 1, "m": 4, "include": "^fc1", "grad_prune": "mvue24"}
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _BrokenBlocks()
    ref = compile_blocks_alone(model, inner)
    train_against(ref, model, torch.compile(model, backend=_backend()))
    for block in model.blocks:
        state = nmcompile.sparsity_state(block)
        assert {name: (s["n"], s["layer_index"]) for name, s in state.items()} == {"fc1.weight": (1, 0)}


@pytest.mark.parametrize("grad_prune", ["mvue24", "mvue12"])
def test_mvue_streams_are_each_layers_own_where_dynamo_reuses_a_block_graph(grad_prune):
    """A graph compiled for the first block and run for the others holds that block's MVUE keys:
    each block still prunes dY with the stream of its own ``(seed, layer index, step)`` (SPEC §7),
    as the reference (later blocks pruned with the first block's random numbers, dW 9 off)."""
    torch._dynamo.reset()
    _, state = train_and_compare(_BrokenBlocks, (8, 32), steps=3, inner="aot_eager", grad_prune=grad_prune)
    assert [state[f"blocks.{i}.fc1.weight"]["layer_index"] for i in range(3)] == [0, 4, 8]


def test_explain_lists_the_blocks_that_run_a_reused_graph():
    """``explain`` of blocks with a graph break inside, called in a loop: the blocks that run the
    graph dynamo compiled for another block are rows of their own, sparse, saying whose graph they
    run (they were listed as in no compiled graph, so dense, while training ran them sparse)."""
    torch._dynamo.reset()
    report = nmcompile.explain(_BrokenBlocks(), torch.randn(8, 32), inner="aot_eager")
    rows = {r.name: r for r in report.rows}
    assert sorted(rows) == sorted(f"blocks.{i}.fc{j}.weight" for i in range(3) for j in (1, 2))
    assert not report.untraced and all(r.sparse and r.backward == "bimask" for r in rows.values())
    reused = {name: r.reason for name, r in rows.items() if r.reason != "2:4, backward=bimask"}
    assert reused.keys() >= {"blocks.2.fc1.weight", "blocks.2.fc2.weight"}
    for name, reason in reused.items():
        assert re.fullmatch(rf"2:4, backward=bimask; runs the graph compiled for blocks\.[01]\.{name[-10:]}", reason)


@pytest.mark.parametrize("option", [{"include": r"^blocks\.2\."}, {"exclude": r"^blocks\.2\."}])
def test_explain_lists_the_blocks_that_run_a_block_graph_rewritten_for_them(option):
    """``explain`` where a name filter decides otherwise for the last block, which runs the graph
    dynamo compiled for another block: its weights are rows of their own, sparse or dense as the
    filter says, naming the graph they run rewritten for them (they were listed as in no compiled
    graph, so dense, while training ran them sparse)."""
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="dynamo reuses a compiled graph"):
        report = nmcompile.explain(_BrokenBlocks(), torch.randn(8, 32), inner="aot_eager", **option)
    rows = {r.name: r for r in report.rows}
    assert sorted(rows) == sorted(f"blocks.{i}.fc{j}.weight" for i in range(3) for j in (1, 2))
    included = "include" in option
    for j in (1, 2):
        for i in range(2):
            row = rows[f"blocks.{i}.fc{j}.weight"]
            assert row.sparse != included and not row.reason.endswith("(eagerly)")
        row = rows[f"blocks.2.fc{j}.weight"]
        assert row.sparse == included
        if included:
            compiled_for = rf"runs the graph compiled for blocks\.[01]\.fc{j}\.weight"
            rewritten = rf"2:4, backward=bimask; {compiled_for}, rewritten for its weights \(eagerly\)"
        else:
            excluded = re.escape(f"name matched by exclude pattern {option['exclude']!r}")
            rewritten = rf"{excluded}; in the graph compiled for blocks\.[01]\.fc{j}\.weight"
        assert re.fullmatch(rewritten, row.reason), row.reason


def test_explain_gives_every_block_that_runs_another_blocks_graph_its_dense_rows():
    """``explain`` where the filter leaves every block but the first dense: each later block's
    weights, also of blocks after the first to run another block's graph, are dense rows naming
    that graph (they read "not a GEMM operand in any compiled graph")."""
    pattern = r"^blocks\.0\."
    torch._dynamo.reset()
    report = nmcompile.explain(_BrokenBlocks(), torch.randn(8, 32), inner="aot_eager", include=pattern)
    rows = {r.name: r for r in report.rows}
    assert sorted(rows) == sorted(f"blocks.{i}.fc{j}.weight" for i in range(3) for j in (1, 2))
    assert [name for name, row in rows.items() if row.sparse] == ["blocks.0.fc1.weight", "blocks.0.fc2.weight"]
    unmatched = re.escape(f"name not matched by include={[pattern]!r}")
    for j in (1, 2):
        graph = rf"; in the graph compiled for blocks\.[01]\.fc{j}\.weight"
        assert re.fullmatch(unmatched + graph, rows[f"blocks.2.fc{j}.weight"].reason)


def test_the_dumped_report_lists_the_blocks_that_run_another_blocks_graph(monkeypatch, tmp_path):
    """``NMSPARSE_DUMP_DIR``: a compile's ``report.txt`` is written again as blocks that run its
    graph (rewritten for them or not) join its table (it was written once, at the compile, so
    the layers those blocks train sparse were missing)."""
    monkeypatch.setenv("NMSPARSE_DUMP_DIR", str(tmp_path))
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="dynamo reuses a compiled graph"):
        torch.compile(_BrokenBlocks(), backend=_backend(include=r"^blocks\.2\."))(torch.randn(8, 32))
    reports = "".join(path.read_text() for path in tmp_path.glob("*/report.txt"))
    for j in (1, 2):
        compiled_for = rf"runs the graph compiled for blocks\.[01]\.fc{j}\.weight"
        assert re.search(rf"blocks\.2\.fc{j}\.weight .*{compiled_for}", reports)


def test_a_reused_block_graph_walks_the_model_once_per_call(monkeypatch):
    """A graph reused by every block meets new weights at each block's first call: each call
    builds the model's parameter table once, however many weights it looks up (a build per lookup
    made that first step quadratic in the blocks)."""
    backend_module = sys.modules["nmcompile.backend"]
    torch._dynamo.reset()
    compiled = torch.compile(_BrokenBlocks(), backend=_backend())
    compiled(torch.randn(8, 32)).sum().backward()
    builds, calls = [], []
    tables = backend_module._root_tables
    monkeypatch.setattr(backend_module, "_root_tables", lambda *args: builds.append(1) or tables(*args))
    call = backend_module._Runner.__call__
    monkeypatch.setattr(backend_module._Runner, "__call__", lambda self, *args: calls.append(1) or call(self, *args))
    model = _BrokenBlocks()  # new weights for the same graphs
    torch.compile(model, backend=_backend())(torch.randn(8, 32)).sum().backward()
    assert 6 <= len(calls) and 0 < len(builds) <= len(calls)
    assert sorted(nmcompile.sparsity_state(model)) == [f"blocks.{i}.fc{j}.weight" for i in range(3) for j in (1, 2)]


def test_a_reused_block_graph_finds_each_blocks_state_once(monkeypatch):
    """The graph reused by every block keeps the state found for each block's weight: after the
    first steps, no call searches the registry or the model again (the last call's weight alone was
    kept, so every block's call searched both: 68 µs per call, now 29, on the CPU under cProfile)."""
    state_module = sys.modules["nmcompile.state"]
    torch._dynamo.reset()
    model = _BrokenBlocks()
    compiled = torch.compile(model, backend=_backend())
    for _ in range(2):  # dynamo compiles the graphs again at the second call (new runners)
        compiled(torch.randn(8, 32)).sum().backward()
    finds, lookups = [], []
    find = state_module.StateRegistry.get_or_create
    monkeypatch.setattr(state_module.StateRegistry, "get_or_create", lambda self, *a: finds.append(1) or find(self, *a))
    lookup = sys.modules["nmcompile.backend"]._CallTables.lookup
    monkeypatch.setattr(
        sys.modules["nmcompile.backend"]._CallTables, "lookup", lambda self, *a: lookups.append(1) or lookup(self, *a)
    )
    for _ in range(3):
        compiled(torch.randn(8, 32)).sum().backward()
    assert finds == lookups == []
    assert {s["step"] for s in nmcompile.sparsity_state(model).values()} == {5}
    assert len(nmcompile.sparsity_state(model)) == 6


class _ItemBreak(nn.Module):
    """A Python float from ``.item()``, then a graph break: from the second call dynamo hands the
    backend, besides the two layers' graphs, one with no inputs and no nodes."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(32, 64), nn.Linear(64, 16)

    def forward(self, x):
        h = torch.relu(self.a(x))
        scale = h.abs().mean().item()
        torch._dynamo.graph_break()
        return self.b(h / (scale + 1))


def test_a_graph_of_no_inputs_compiles():
    """A graph with no placeholders (``graph(): return ()``) compiles instead of failing the
    sparsifying pass, and both layers train sparse like the reference (SPEC §10: no exception)."""
    torch._dynamo.reset()
    _, state = train_and_compare(_ItemBreak, (8, 32), steps=3, inner="aot_eager")
    assert sorted(state) == ["a.weight", "b.weight"]


class _Aliased(nn.Module):
    """One ``nn.Linear`` registered under two names (``alias`` and ``a``), called once."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(32, 64), nn.Linear(64, 16)
        self.alias = self.a

    def forward(self, x):
        return self.b(torch.relu(self.alias(x)))


def test_a_weight_given_as_an_argument_trains_sparse_and_counts_its_steps():
    """README: a weight that reaches a compiled function only as an argument has no owning module, so
    every grad-enabled forward is a training step (a search each step here) and a no-grad one is not;
    its name is the argument's source and its layer index that name's CRC-32."""
    torch.manual_seed(0)
    model = nn.Linear(16, 8)
    backend = nmcompile.backend(inner="aot_eager", perm_interval=1)
    fn = torch.compile(lambda x, w: torch.nn.functional.linear(x, w), backend=backend)
    for _ in range(3):
        fn(torch.randn(4, 16), model.weight).sum().backward()
    x = torch.randn(4, 16)
    with torch.no_grad():
        y = fn(x, model.weight)
    state = nmcompile.sparsity_state(model)["weight"]
    assert (state["step"], state["last_search_step"], state["layer_index"]) == (3, 2, zlib.crc32(b"L['w']"))
    w = model.weight.detach()
    assert_close(y, x @ (w * reference.nm_mask(w, 2, 4, dim=1)).t(), what="no-grad forward")


def test_a_module_under_two_names_is_not_a_tie():
    """SPEC §10: a tie is a parameter two modules share, or one graph uses twice. A module
    registered under a second name is neither: the backend and the reference both sparsify it
    (the reference counted its two registrations as a tie, and left it dense)."""
    torch._dynamo.reset()
    ref_state, state = train_and_compare(_Aliased, (8, 32), steps=3, inner="aot_eager")
    assert sorted(state) == sorted(ref_state) == ["a.weight", "b.weight"]


def test_a_tie_made_after_compiling_runs_dense():
    """``b.weight = a.weight`` after the first compile: dynamo reuses the graph (its guards read
    shapes), and the tied weight, now both GEMMs' weight, runs dense (SPEC §10) and counts no step."""
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    compiled = torch.compile(model, backend=_backend())
    x = torch.randn(8, 32)
    compiled(x).sum().backward()
    model[2].weight = model[0].weight
    model.zero_grad()
    with pytest.warns(UserWarning, match=r"sparse now: none"):
        out = compiled(x)
    out.square().sum().backward()
    dense = copy.deepcopy(model)
    dense.zero_grad()
    expected = dense(x)
    expected.square().sum().backward()
    assert_close(out, expected, what="output")
    assert_close(model[0].weight.grad, dense[0].weight.grad, what="tied weight grad")
    assert nmcompile.sparsity_state(model)["0.weight"]["step"] == 1


def test_reference_keeps_a_layer_called_twice_in_one_forward_dense():
    """SPEC §10 in the reference: a Linear applied twice in one forward, or a raw weight two
    ``F.linear`` calls use, runs dense from its second use on, with no state, as the compiled
    backend keeps it; the first forward's first use was sparse (the warning says so). Calls of a
    layer on its own, outside the model's forward, are separate steps and stay sparse."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.fc = nn.Linear(16, 16), nn.Linear(16, 16)
            self.raw = nn.Parameter(torch.randn(16, 16) / 4)

        def forward(self, x):
            h = self.lin(torch.relu(self.lin(self.fc(x))))
            return nn.functional.linear(torch.relu(nn.functional.linear(h, self.raw)), self.raw)

    torch.manual_seed(0)
    base = Twice()
    ref, mine = reference.sparsify(copy.deepcopy(base)), copy.deepcopy(base)
    compiled = torch.compile(mine, backend=_backend())
    x = torch.randn(4, 16)
    with pytest.warns(UserWarning, match="is used by more than one op in one forward") as caught:
        ref(x).sum().backward()
    assert sorted(str(w.message).split()[1] for w in caught) == ["lin.weight", "raw"]
    assert sorted(nmcompile.sparsity_state(ref)) == ["fc.weight"]
    assert nmcompile.sparsity_state(ref)["fc.weight"]["step"] == 1
    compiled(x).sum().backward()
    assert sorted(nmcompile.sparsity_state(mine)) == ["fc.weight"]
    for _ in range(2):
        x = torch.randn(4, 16)
        ref.zero_grad(), mine.zero_grad()
        out_ref, out = ref(x), compiled(x)
        out_ref.square().sum().backward(), out.square().sum().backward()
        assert_close(out, out_ref, what="output")
        assert_grads_close(mine, ref)
    assert nmcompile.sparsity_state(ref)["fc.weight"]["step"] == 3
    ref.fc(x), ref.fc(x)  # the layer alone: two steps, still sparse
    assert nmcompile.sparsity_state(ref)["fc.weight"]["step"] == 5


class _TwoLayouts(nn.Module):
    """A weight used as ``[out, in]`` and as ``[in, out]`` (``h @ W``): a raw one in both, a tied
    autoencoder's ``nn.Linear`` (called, then its weight as the decoder; ``hidden`` 30 leaves the
    decoder's K indivisible by 4), or a Linear's weight used only as ``[in, out]``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, hidden = kind, 30 if kind == "tied_indivisible" else 32
        if kind == "raw":
            self.raw = nn.Parameter(torch.randn(32, 16) / 4)
        else:
            self.fc = nn.Linear(32, 16, bias=False) if kind == "other_layout_only" else nn.Linear(16, hidden)
        self.head = nn.Linear(32 if kind == "other_layout_only" else 16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "raw":
            return self.head(torch.relu(nn.functional.linear(x, self.raw)) @ self.raw)
        if self.kind == "other_layout_only":
            return self.head(x @ self.fc.weight)
        return self.head(torch.relu(self.fc(x)) @ self.fc.weight)


@pytest.mark.parametrize(
    ("kind", "dropped"),
    [("raw", "raw"), ("tied", "fc.weight"), ("tied_indivisible", "fc.weight"), ("other_layout_only", None)],
)
def test_reference_weight_in_two_layouts_is_dense_as_the_backend_keeps_it(kind, dropped):
    """SPEC §10 across layouts: a weight in two GEMMs, one using it as ``[in, out]``, is dense in
    both (the backend: "tied"). The reference kept the first GEMM's state and step (a raw weight),
    or did not count the ``[in, out]`` use of a swapped layer's weight at all, eligible or not (a
    tied autoencoder's encoder stayed sparse); it now drops both, with a warning (the first forward's
    first use ran sparse: not compared), which names the forward's line. Used only as
    ``[in, out]``, a Linear's weight is sparse with a state of that layout, as in the backend (the
    reference ran it dense)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state_ref, _ = train_and_compare(lambda: _TwoLayouts(kind), (4, 16), 3, settle=True, inner="aot_eager")
    tied = [w for w in caught if "more than one op" in str(w.message)]
    assert [str(w.message).split()[1] for w in tied] == ([] if dropped is None else [dropped])
    forward = inspect.getsourcelines(_TwoLayouts.forward)
    lines = range(forward[1], forward[1] + len(forward[0]))
    assert all(w.filename == __file__ and w.lineno in lines for w in tied)  # the user's line, not torch's
    if dropped is None:
        assert sorted(state_ref) == ["fc.weight", "head.weight"] and state_ref["fc.weight"]["perm"].shape == (32,)
    else:
        assert sorted(state_ref) == ["head.weight"]


class _OtherUses(nn.Module):
    """A weight used by a GEMM and by another op in one forward: a penalty on it after its layer
    runs or before (also through a property that gives a tensor, ``W.mH``), an in-place clip, a
    dtype template (``x.type_as(W)``), the weight of an ``nn.Embedding`` that the head reuses (GPT's
    tie); or only queries of its metadata and casts that change nothing, which are no use."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.emb, self.fc = nn.Embedding(8, 16), nn.Linear(16, 16)
        self.head = nn.Linear(8 if kind == "embedding_tie" else 16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, penalty = self.fc.weight, 0.0
        if self.kind == "penalty_first":
            penalty = w.square().sum()
        if self.kind == "clip":
            with torch.no_grad():
                w.clamp_(-1.0, 1.0)
        h = self.emb((x.detach().abs() * 3).long().clamp(max=7)).sum(1) + x
        if self.kind == "metadata":
            assert w.shape[0] == w.size(1) == torch.numel(w) // 16 and w.dim() == 2 and w.dtype == x.dtype
            assert w.requires_grad and w.is_leaf and w.nbytes == 1024 and w.type() == x.type()
            h = nn.functional.linear(h, w.to(x.dtype).contiguous(), self.fc.bias)
        else:
            h = self.fc(h.type_as(w) if self.kind == "dtype_template" else h)
        if self.kind in ("penalty_after", "property"):
            penalty = (w.mH if self.kind == "property" else w).square().sum()
        out = nn.functional.linear(torch.relu(h), self.emb.weight) if self.kind == "embedding_tie" else h
        return self.head(torch.relu(out)) + penalty / 100


@pytest.mark.parametrize(
    ("kind", "tie"),
    [
        ("penalty_after", "fc.weight (linear, square)"),
        ("penalty_first", "fc.weight (linear, square)"),
        ("property", "fc.weight (getattr, linear)"),
        ("clip", "fc.weight (clamp_, linear)"),
        ("dtype_template", "fc.weight (linear, type_as)"),
        ("embedding_tie", "emb.weight (embedding, linear)"),
        ("metadata", None),
    ],
)
def test_reference_weight_used_by_another_op_is_dense_as_the_backend_keeps_it(kind, tie):
    """SPEC §10: a weight that the forward also uses in another op is tied: the backend leaves its
    GEMM dense ("used by 2 nodes"), and now the reference does too, dropping the layer's state with
    a warning (it counted GEMM uses only, and trained these sparse). Its shape, dtype or size, and a
    cast that returns it, are no use in either: the layer stays sparse (the backend counted the
    ``getattr`` nodes dynamo keeps for ``W.is_leaf`` and ``W.nbytes`` as uses; the reference, the
    in-place clip and ``W.mH`` as none). Ties inside the compiled forward do not warn as uses
    outside it would."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state_ref, _ = train_and_compare(lambda: _OtherUses(kind), (4, 16), 3, settle=True, inner="aot_eager")
    dense, _, ops = (tie or "").partition(" ")
    tied = [str(w.message).split()[1] for w in caught if "more than one op" in str(w.message)]
    assert tied == ([dense] if tie else [])
    assert not [w for w in caught if "outside the model's forward" in str(w.message)]  # a tie in the forward
    assert sorted(state_ref) == sorted({"fc.weight", "head.weight"} - {dense})
    rows = {r.name: r for r in nmcompile.explain(_OtherUses(kind), torch.randn(4, 16), inner="aot_eager").rows}
    assert not tie or rows[dense].reason == f"tied: parameter used by 2 nodes {ops}"  # x.type_as(W): (linear, linear)


def test_reference_swapped_layers_keep_hooks_and_eval_mode():
    """``reference.sparsify`` swaps ``nn.Linear`` for ``SparseLinear`` keeping the module's hooks (the
    user's handle still removes them) and its eval mode: a model with a forward hook on a layer
    trains as the compiled backend trains it, and an eval-mode forward with grad counts no step."""

    class Hooked(MLP):
        def __init__(self) -> None:
            super().__init__()
            self.fc1.register_forward_hook(lambda module, args, out: 2 * out)

    train_and_compare(Hooked, (4, 32), steps=2, inner="aot_eager")
    model = MLP().eval()
    handle = model.fc2.register_forward_pre_hook(lambda module, args: (args[0] + 1,))
    loads = []  # torch calls this hook with its module, held weakly: now the SparseLinear
    model.fc2.register_load_state_dict_pre_hook(lambda module, *args: loads.append(type(module).__name__))
    reference.sparsify(model)
    assert type(model.fc2) is reference.SparseLinear and not model.fc2.training
    model(torch.randn(4, 32)).sum().backward()
    assert {s["step"] for s in nmcompile.sparsity_state(model).values()} == {0}
    handle.remove()
    assert not model.fc2._forward_pre_hooks
    gc.collect()  # the replaced nn.Linear is gone
    model.load_state_dict(model.state_dict())
    assert loads == ["SparseLinear"]


@pytest.mark.parametrize("graph_break", [False, True])
def test_tied_head_is_dense_across_a_graph_break(graph_break):
    """A head sharing the embedding's weight stays dense also where a graph break puts the
    embedding and the head in different graphs: ties are read from the modules, not one graph."""

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.fc = nn.Embedding(32, 16), nn.Linear(16, 16)
            self.head = nn.Linear(16, 32, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, idx):
            h = torch.relu(self.fc(self.emb(idx)))
            if graph_break:
                torch._dynamo.graph_break()
            return self.head(h)

    rows = nmcompile.explain(LM(), torch.randint(0, 32, (4, 8)), inner="aot_eager").rows
    assert [(r.name, r.sparse, r.reason) for r in rows] == [
        ("fc.weight", True, "2:4, backward=bimask"),
        ("emb.weight", False, "tied: parameter shared with head.weight"),
    ]


class _HeadOnEmbedding(nn.Module):
    """A language model whose head reads the embedding's weight itself, a graph break between them."""

    def __init__(self, head: str) -> None:
        super().__init__()
        self.head = head
        self.emb, self.fc = nn.Embedding(32, 16), nn.Linear(16, 16)

    def forward(self, idx):
        h = self.emb(idx)
        torch._dynamo.graph_break()
        h = torch.relu(self.fc(h))
        return nn.functional.linear(h, self.emb.weight) if self.head == "linear" else h @ self.emb.weight.t()


def _train_lm_both(compiled_forward, mine: nn.Module, ref: nn.Module, steps: int = 3) -> None:
    """Train ``mine`` (through ``compiled_forward``) and ``ref`` side by side on token inputs; outputs
    and every gradient agree at each step."""
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (mine, ref)]
    for step in range(steps):
        idx = torch.randint(0, 32, (4, 8))
        y_mine, y_ref = compiled_forward(idx), ref(idx)
        assert_close(y_mine, y_ref, what=f"step {step} output")
        y_mine.square().mean().backward()
        y_ref.square().mean().backward()
        assert_grads_close(mine, ref, what=f"step {step}")
        for opt in opts:
            opt.step()
            opt.zero_grad()


@pytest.mark.parametrize("head", ["linear", "matmul"])
def test_head_reading_the_embedding_weight_is_dense_across_a_graph_break(head):
    """SPEC §10: a head that reads an ``nn.Embedding``'s weight itself (``F.linear(h, self.emb.weight)``,
    ``h @ self.emb.weight.t()``) is tied to the lookup also where a graph break puts the two in
    different graphs: dense, as in the reference, which sees both uses in one forward (the backend
    used to prune the vocabulary matrix 2:4 there)."""
    rows = nmcompile.explain(_HeadOnEmbedding(head), torch.randint(0, 32, (4, 8)), inner="aot_eager").rows
    assert [(r.name, r.sparse, r.reason) for r in rows] == [
        ("fc.weight", True, "2:4, backward=bimask"),
        ("emb.weight", False, "tied: also the table of an embedding lookup (read by one in another compiled graph)"),
    ]
    torch.manual_seed(0)
    mine = _HeadOnEmbedding(head)
    ref = reference.sparsify(copy.deepcopy(mine))
    with pytest.warns(UserWarning, match="emb.weight is used by more than one op in one forward"):  # the reference's
        _train_lm_both(torch.compile(mine, backend=_backend()), mine, ref)
    assert nmcompile.sparsity_state(mine).keys() == nmcompile.sparsity_state(ref).keys() == {"fc.weight"}


def test_an_embedding_weight_used_only_as_a_gemm_weight_is_sparse():
    """An ``nn.Embedding`` that is never looked up and whose weight a GEMM takes (a prototype or
    class-embedding classifier) is a GEMM weight like any: sparse, as in the reference (it was
    called tied for its module's class)."""

    class Prototypes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.proto = nn.Linear(16, 32), nn.Embedding(16, 32)

        def forward(self, x):
            return nn.functional.linear(torch.relu(self.fc(x)), self.proto.weight)

    rows = nmcompile.explain(Prototypes(), torch.randn(4, 16), inner="aot_eager").rows
    assert [(r.name, r.sparse) for r in rows] == [("fc.weight", True), ("proto.weight", True)]
    state_ref, state = train_and_compare(Prototypes, (4, 16), steps=2, inner="aot_eager")
    assert sorted(state_ref) == sorted(state) == ["fc.weight", "proto.weight"]


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc = nn.Embedding(32, 16), nn.Linear(16, 16)

    def forward(self, idx):
        return torch.relu(self.fc(self.emb(idx)))


class _Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(16, 16), nn.Linear(16, 32, bias=False)

    def forward(self, h):
        return self.head(torch.relu(self.fc(h)))


class _EncoderDecoder(nn.Module):
    """An output head tied to the embedding of another module, as blocks compiled one by one hold it."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.dec = _Encoder(), _Decoder()
        self.dec.head.weight = self.enc.emb.weight

    def forward(self, idx):
        return self.dec(self.enc(idx))


def test_head_tied_to_an_embedding_compiled_apart_is_dense():
    """A head sharing the weight of an embedding that another compiled module looks up (encoder and
    decoder compiled apart) stays dense: the registry remembers the weights compiled graphs read as
    embedding tables. It trains as the reference of the whole model (no permutation candidates:
    their seeds follow each compile's layer index); ``explain`` of the decoder says why."""
    torch.manual_seed(0)
    mine = _EncoderDecoder()
    ref = reference.sparsify(copy.deepcopy(mine), perm_candidates=0)
    enc = torch.compile(mine.enc, backend=_backend(perm_candidates=0))
    dec = torch.compile(mine.dec, backend=_backend(perm_candidates=0))
    _train_lm_both(lambda idx: dec(enc(idx)), mine, ref)
    assert (
        sorted(nmcompile.sparsity_state(mine))
        == sorted(nmcompile.sparsity_state(ref))
        == [
            "dec.fc.weight",
            "enc.fc.weight",
        ]
    )
    rows = {r.name: r for r in nmcompile.explain(mine.dec, torch.randn(4, 8, 16), inner="aot_eager").rows}
    why = "tied: also the table of an embedding lookup (read by one in another compiled graph)"
    assert not rows["head.weight"].sparse and rows["head.weight"].reason == why


def test_embedding_lookup_compiled_after_its_tied_head_warns():
    """Where the head's graph was compiled before any graph read its weight as an embedding table
    (the decoder called first), the head ran sparse: a warning says so, the head's state is dropped,
    and from the next call its graph runs it dense (rewritten, eagerly, until a recompile), with the
    other layers' states going on; ``forward_weights`` and checkpoints leave the head out, and the
    output is the dense head's (a recompile left the cached sparse graph training a dropped state)."""
    model = _EncoderDecoder()
    enc, dec = (torch.compile(m, backend=_backend()) for m in (model.enc, model.dec))
    dec(torch.randn(4, 8, 16)).sum().backward()
    assert sorted(nmcompile.sparsity_state(model)) == ["dec.fc.weight", "enc.emb.weight"]  # the head's weight
    with pytest.warns(UserWarning, match=r"^nmsparse: emb.weight is read by an embedding lookup here"):
        enc(torch.randint(0, 32, (4, 8))).sum().backward()
    h = torch.randn(4, 8, 16)
    with pytest.warns(UserWarning, match="dynamo reuses a compiled graph for weights that include/exclude or a weight"):
        y = dec(h)
    y.sum().backward()
    masked = nmcompile.forward_weights(model)["dec.fc.weight"]
    with torch.no_grad():
        hidden = torch.relu(nn.functional.linear(h, masked, model.dec.fc.bias))
        assert_close(y, nn.functional.linear(hidden, model.enc.emb.weight), what="the dense head's output")
    dec(torch.randn(4, 8, 16)).sum().backward()
    torch._dynamo.reset()
    dec(torch.randn(4, 8, 16)).sum().backward()
    steps = {name: state["step"] for name, state in nmcompile.sparsity_state(model).items()}
    assert steps == {"dec.fc.weight": 4, "enc.fc.weight": 1}
    assert "enc.emb.weight" not in nmcompile.forward_weights(model)
    assert "nmsparse" not in model.state_dict()._metadata["dec.head"]


class _TwoTables(nn.Module):
    """Token and position embeddings in two graphs (a graph break between them)."""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(32, 16), nn.Embedding(8, 16)
        self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 32)

    def forward(self, idx):
        h = torch.relu(self.fc1(self.tok(idx)))
        torch._dynamo.graph_break()
        return self.fc2(h + self.pos(torch.arange(idx.shape[1])))


@pytest.mark.parametrize("case", ["own_table", "second_instance", "excluded_head"])
def test_a_table_read_later_leaves_graphs_it_changes_nothing_for_compiled(case):
    """A graph that reads a new embedding table makes compiled graphs decide their ties again, which
    changes nothing for a graph's own table (the first graph's lookup, once the second graph's
    moved the count; a second model of the class, whose lookup runs the first one's graph) or for
    a head the name filter leaves out: they keep their compiled code, no warning (they ran the
    graph rewritten for them, eagerly, saying a tie sparsified otherwise)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if case == "second_instance":
            for model in (_TwoTables(), _TwoTables()):
                compiled = torch.compile(model, backend=_backend())
                for _ in range(2):
                    compiled(torch.randint(0, 32, (4, 8))).sum().backward()
            expected = {"fc1.weight": 2, "fc2.weight": 2}
        elif case == "own_table":
            model = _TwoTables()
            compiled = torch.compile(model, backend=_backend())
            for _ in range(3):
                compiled(torch.randint(0, 32, (4, 8))).sum().backward()
            expected = {"fc1.weight": 3, "fc2.weight": 3}
        else:
            model = _EncoderDecoder()
            enc = torch.compile(model.enc, backend=_backend())  # an exclude that matches nothing there warns
            dec = torch.compile(model.dec, backend=_backend(exclude="head"))
            dec(torch.randn(4, 8, 16)).sum().backward()
            enc(torch.randint(0, 32, (4, 8))).sum().backward()
            for _ in range(2):
                dec(torch.randn(4, 8, 16)).sum().backward()
            expected = {"dec.fc.weight": 3, "enc.fc.weight": 1}
    assert not [str(w.message) for w in caught if str(w.message).startswith("nmsparse")]
    assert {name: s["step"] for name, s in nmcompile.sparsity_state(model).items()} == expected


def test_a_checkpointed_head_recomputes_as_it_ran_when_its_table_appears_in_between():
    """A head run under a non-reentrant activation checkpoint, then its embedding's lookup compiled
    for the first time before the backward: the recompute runs the head as its forward did
    (sparse), not the dense graph the next forward gets (which raised ``CheckpointError``)."""
    model = _EncoderDecoder()
    enc, dec = (torch.compile(m, backend=_backend()) for m in (model.enc, model.dec))
    h = torch.randn(4, 8, 16)
    out = torch.utils.checkpoint.checkpoint(dec, h, use_reentrant=False)
    masked = nmcompile.forward_weights(model)
    with pytest.warns(UserWarning, match=r"^nmsparse: emb.weight is read by an embedding lookup here"):
        (out.square().sum() + enc(torch.randint(0, 32, (4, 8))).sum()).backward()
    hidden = torch.relu(nn.functional.linear(h, masked["dec.fc.weight"], model.dec.fc.bias))
    assert_close(out, nn.functional.linear(hidden, masked["enc.emb.weight"]), what="the checkpointed sparse head")
    assert model.dec.fc.weight.grad is not None and torch.count_nonzero(model.enc.emb.weight.grad) > 0


def test_weight_used_besides_its_gemm_is_dense_with_the_ops_named():
    """SPEC §10: a parameter used by more than one node stays dense, also where the second node is not
    a GEMM (a penalty on ``W`` in the forward); the reason names the nodes, and the model trains as
    the reference with that layer excluded."""

    class Penalised(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 8)

        def forward(self, x):
            return self.b(torch.relu(self.a(x))) + 1e-3 * self.a.weight.square().sum()

    rows = nmcompile.explain(Penalised(), torch.randn(4, 16), inner="aot_eager").rows
    assert [(r.name, r.sparse, r.reason) for r in rows] == [
        ("a.weight", False, "tied: parameter used by 2 nodes (linear, square)"),
        ("b.weight", True, "2:4, backward=bimask"),
    ]
    train_and_compare(Penalised, (4, 16), steps=2, inner="aot_eager", reference_options={"exclude": ("a",)})


def test_empty_weights_run_dense_with_a_reason():
    """SPEC §10, never an exception: ``nn.Linear(0, 4)`` and ``nn.Linear(4, 0)`` (zero-size weights,
    which plain PyTorch trains) run dense with a reason beside a sparse layer, as in the reference."""

    class Empty(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.none_in, self.none_out = nn.Linear(8, 8), nn.Linear(0, 8), nn.Linear(8, 0)

        def forward(self, x):
            return self.fc(x) + self.none_in(x[:, :0]) + self.none_out(x).sum()

    rows = nmcompile.explain(Empty(), torch.randn(4, 8), inner="aot_eager").rows
    assert [(r.name, r.sparse, r.reason) for r in rows] == [
        ("fc.weight", True, "2:4, backward=bimask"),
        ("none_in.weight", False, "empty weight [8, 0]: nothing to prune"),
        ("none_out.weight", False, "empty weight [0, 8]: nothing to prune"),
    ]
    train_and_compare(Empty, (4, 8), steps=2, inner="aot_eager")


@pytest.mark.parametrize(("inner", "first"), [("aot_eager", False), ("inductor", True), ("inductor", False)])
def test_backward_with_retain_graph_runs_as_the_reference(inner, first):
    """Two losses on one output, the first ``backward(retain_graph=True)`` (a GAN or multi-loss
    loop), at the first call or after an ordinary step: gradients equal the reference's. It failed
    with Inductor at the first call (its backward, compiled with the forward, donated buffers), and
    after an ordinary step with both (as dense ``torch.compile(backend="aot_eager")`` does)."""
    torch.manual_seed(0)
    base = MLP()
    ref = reference.sparsify(copy.deepcopy(base))
    mine = copy.deepcopy(base)
    compiled = torch.compile(mine, backend=nmcompile.backend(inner=inner))
    for retain in (first, not first, True):
        x = torch.randn(4, 32)
        for model in (ref, compiled):
            out = model(x)
            out.square().mean().backward(retain_graph=retain)
            if retain:
                out.abs().mean().backward()
        assert_grads_close(mine, ref, rel=1e-5 if inner == "inductor" else 0)
        sgd_step_both(ref, mine, lr=0.05)


@pytest.mark.parametrize("srste_lambda", [0.0, 2e-4])
def test_weights_updated_between_a_forward_and_its_backward(srste_lambda):
    """A weight updated in place after a ``backward(retain_graph=True)`` and before the graph's second
    backward: eager autograd (and the reference) raises, as the backward reads the weight; the
    compiled backward reads it, and so raises, only for SR-STE's term. Without it, the second
    backward gives the gradients at the weights of the forward (the README's bad-inputs table)."""
    base = MLP()
    ref, mine = reference.sparsify(copy.deepcopy(base), srste_lambda=srste_lambda), copy.deepcopy(base)
    compiled = torch.compile(mine, backend=nmcompile.backend(inner="aot_eager", srste_lambda=srste_lambda))
    x = torch.randn(4, 32)
    for model, params in ((ref, ref.parameters()), (compiled, mine.parameters())):
        out = model(x)
        out.square().mean().backward(retain_graph=True)
        with torch.no_grad():
            for p in params:
                p.sub_(0.1 * p.grad)
                p.grad = None
        if model is ref or srste_lambda:
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                out.abs().mean().backward()
        else:
            out.abs().mean().backward()
    if not srste_lambda:
        at_forward = reference.sparsify(copy.deepcopy(base), srste_lambda=0.0)
        at_forward(x).abs().mean().backward()
        assert_grads_close(mine, at_forward, rel=0)


class _CastWeights(nn.Module):
    """Weights passed through casts: ``how`` names the expression each GEMM's weight goes through."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.fc, self.mm = nn.Parameter(torch.randn(32, 16) / 4), nn.Parameter(torch.randn(16, 32) / 6)
        self.conv = nn.Parameter(torch.randn(8, 16, 3) / 7)
        self.head = nn.Linear(32, 8)  # sparse whatever the casts do

    def _cast(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return {
            "to": lambda: w.to(x.dtype),
            "type_as": lambda: w.type_as(x),
            "float": lambda: w.float().contiguous(),
            "device": lambda: w.to(x.device, memory_format=torch.contiguous_format),
            "copy": lambda: w.to(x.dtype, copy=True),
            "non_blocking": lambda: w.to(x.dtype, True),
            "positional_copy": lambda: w.to(x.device, x.dtype, False, True),
            "double": lambda: w.double().to(x.dtype),
        }[self.how]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(nn.functional.linear(x, self._cast(self.fc, x)))
        h = torch.mm(h, self._cast(self.mm, h).t().to(h.dtype))
        h = nn.functional.conv1d(h.unsqueeze(-1).expand(-1, -1, 4), self._cast(self.conv, h), padding=1)
        return self.head(h.flatten(1))


@pytest.mark.parametrize(
    ("how", "sparse"),
    [
        ("to", True),
        ("type_as", True),
        ("float", True),
        ("device", True),
        ("non_blocking", True),
        ("copy", False),
        ("positional_copy", False),
        ("double", False),
    ],
)
def test_weights_through_casts_that_change_nothing_are_sparse(how, sparse):
    """``W.to(x.dtype)``, ``W.type_as(x)``, ``W.float().contiguous()``, ``W.to(device)`` of a weight
    already so return the Parameter itself eagerly, so the reference sparsifies the GEMM; the backend
    looks through them (it left such a weight dense, "used by to"), in front of a transpose too, and
    ``W.to(dtype, True)`` (``non_blocking`` by position: it was read as ``copy``). A copy
    (``copy=True``, by keyword or position, a round trip through float64) is another tensor: dense in both."""
    train_and_compare(lambda: _CastWeights(how), (4, 16), steps=3, inner="aot_eager")
    rows = {r.name: r for r in nmcompile.explain(_CastWeights(how), torch.randn(4, 16), inner="aot_eager").rows}
    assert [rows[name].sparse for name in ("fc", "mm", "conv", "head.weight")] == [sparse, sparse, sparse, True]
    assert sparse or rows["fc"].reason.startswith(f"used by {'double' if how == 'double' else 'to'}")


class _GemmForms(nn.Module):
    """Raw weights as the right operand of ``mm``/``matmul``/``addmm`` given by keyword, of the method
    ``b.addmm(x, W)``, and a stacked 3-D weight as ``matmul``'s right operand."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.w = nn.Parameter(torch.randn(4, 16, 32) / 4 if form == "stacked" else torch.randn(16, 32) / 4)
        self.b = nn.Parameter(torch.randn(32) / 4)
        self.head = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = {
            "mm_keyword": lambda: torch.mm(x, mat2=self.w) + self.b,
            "matmul_keyword": lambda: torch.matmul(input=x, other=self.w) + self.b,
            "linalg_matmul": lambda: torch.linalg.matmul(x, self.w) + self.b,
            "addmm_keyword": lambda: torch.addmm(self.b, mat2=self.w, mat1=x),
            "addmm_method": lambda: self.b.addmm(x, self.w),
            "addmm_method_keyword": lambda: self.b.addmm(mat1=x, mat2=self.w),
            "addmm_alpha": lambda: torch.addmm(self.b, x, self.w, alpha=2),
            "stacked": lambda: torch.matmul(x.expand(4, -1, -1), self.w).sum(0) + self.b,
        }[self.form]()
        return self.head(torch.relu(h))


@pytest.mark.parametrize(
    ("form", "reason"),
    [
        ("mm_keyword", None),
        ("matmul_keyword", None),
        ("linalg_matmul", None),
        ("addmm_keyword", None),
        ("addmm_method", None),
        ("addmm_method_keyword", None),
        ("addmm_alpha", "addmm with extra arguments ['alpha']"),
        ("stacked", "weight is not a 2-D [out, in] or [in, out] operand"),
    ],
)
def test_gemm_operands_by_keyword_or_method_train_as_the_reference(form, reason):
    """SPEC §1: ``W`` as the right operand of ``mm``/``matmul``/``addmm`` is eligible however it is
    passed. Both left it dense given by keyword (the backend's report called it the left operand);
    the reference left ``b.addmm(x, W)`` dense where the backend sparsified it, and raised on a 3-D
    weight as ``matmul``'s right operand (dense in the backend, as eager runs it). ``torch.linalg.matmul``,
    an alias of ``matmul`` with a function of its own, was dense in both, and missing from the report."""
    train_and_compare(lambda: _GemmForms(form), (4, 16), steps=3, inner="aot_eager")
    row = next(
        r for r in nmcompile.explain(_GemmForms(form), torch.randn(4, 16), inner="aot_eager").rows if r.name == "w"
    )
    assert (row.sparse, row.reason) == (True, "2:4, backward=bimask") if reason is None else (False, reason)


class _WeightsOfModules(nn.Module):
    """``nn.Linear`` and ``nn.Conv1d`` whose weights the parent's forward uses itself, without calling
    the modules (``F.linear(x, self.fc.weight)``), the linear one through a transpose."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.conv, self.head = nn.Linear(16, 32), nn.Conv1d(32, 8, 3, padding=1), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(x @ self.fc.weight.t() + self.fc.bias)
        h = nn.functional.conv1d(h.unsqueeze(-1).expand(-1, -1, 4), self.conv.weight, self.conv.bias, padding=1)
        return self.head(h.flatten(1))


def test_weights_of_modules_used_outside_them_train_as_the_reference():
    """The backend sparsifies a GEMM on a module's weight whether or not the module is called; the
    reference now does too (it swapped the module and left its weight's other GEMMs dense)."""
    state_ref, _ = train_and_compare(_WeightsOfModules, (4, 16), steps=3, inner="aot_eager")
    assert set(state_ref) == {"fc.weight", "conv.weight", "head.weight"}


class _Attention(nn.Module):
    """Self-attention through ``nn.MultiheadAttention`` (with or without the weights) or a whole
    ``nn.TransformerEncoderLayer``, batch first."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        if kind == "encoder_layer":
            self.attn = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        else:
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "encoder_layer":
            return self.attn(x)
        return self.attn(x, x, x, need_weights=self.kind == "weights")[0]


@pytest.mark.parametrize("kind", ["plain", "weights", "encoder_layer"])
@pytest.mark.parametrize("shape", [(0, 6, 32), (2, 0, 32)])
def test_empty_batch_or_sequence_through_attention(kind, shape):
    """README "Bad inputs": a zero-size batch gives an empty output, through the backend's
    attention decomposition too (its reshapes named no size as -1 there); so does an empty
    sequence. The layers are sparse and step; every gradient is finite. (With a padding mask torch
    itself cannot reshape an empty batch, eagerly too.)"""
    model = _Attention(kind)
    out = torch.compile(model, backend=_backend())(torch.randn(*shape))
    out.sum().backward()
    assert out.shape == shape
    states = nmcompile.sparsity_state(model)
    assert len(states) == (4 if kind == "encoder_layer" else 2) and {v["step"] for v in states.values()} == {1}
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


def test_bad_inputs_have_documented_behaviour():
    """Non-float weights, zero-size batches, NaN/Inf, and a layer whose shapes change."""

    class IntWeight(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(8, 16, dtype=torch.int64), requires_grad=False)

        def forward(self, x):
            return x @ self.w.t()

    rows = nmcompile.explain(IntWeight(), torch.ones(2, 16, dtype=torch.int64), inner="aot_eager").rows
    assert rows[0].reason == "dtype torch.int64 is not floating point"

    model = MLP()
    compiled = torch.compile(model, backend=_backend())
    empty = compiled(torch.randn(0, 32))
    empty.sum().backward()  # zero-size batch: empty output; dW is the SR-STE term alone
    assert empty.shape == (0, 16)
    f = reference.nm_mask(model.fc1.weight.detach(), 2, 4, 1)
    assert_close(model.fc1.weight.grad, 2e-4 * model.fc1.weight.detach() * ~f, what="dW on an empty batch")

    with torch.no_grad():
        model.fc1.weight[0, 0] = float("nan")
    assert nmcompile.ops.nm_mask(model.fc1.weight, 2, 4, 1)[0, 0]  # NaN is never hidden by the mask
    assert math.isnan(compiled(torch.randn(4, 32)).sum().item())  # the loss goes NaN, as dense
    with torch.no_grad():
        model.fc1.weight[0, 0] = 0.0
    x = torch.randn(4, 32)
    x[0, 0] = float("inf")
    dense = copy.deepcopy(model)
    assert torch.equal(compiled(x).isfinite(), reference.sparsify(dense)(x).isfinite())

    model.fc2 = nn.Linear(64, 48)  # a layer changes shape: recompile, fresh state for the new weight
    model.head = nn.Linear(48, 16)
    compiled(torch.randn(4, 32)).sum().backward()
    assert nmcompile.sparsity_state(model)["fc2.weight"]["perm"].shape == (48,)


def test_a_weight_resized_through_data_has_no_state_until_its_next_compile():
    """``param.data = `` a tensor with fewer rows leaves the old state behind: ``sparsity_state`` and
    ``state_dict`` leave that weight out (they raised IndexError, or saved a permutation the new
    shape refuses) until the next compiled forward gives it a fresh state."""
    model = MLP()
    compiled = torch.compile(model, backend=_backend())
    compiled(torch.randn(4, 32)).sum().backward()
    for p in model.parameters():
        p.grad = None
    model.fc1.weight.data = torch.randn(32, 32)
    model.fc1.bias.data = torch.randn(32)
    model.fc2.weight.data = torch.randn(64, 32)  # K only: its state stays
    state = nmcompile.sparsity_state(model)
    assert "fc1.weight" not in state and state["fc2.weight"]["step"] == 1
    saved = model.state_dict()._metadata["fc1"]
    assert nmcompile.state.METADATA_KEY not in saved
    compiled(torch.randn(4, 32)).sum().backward()
    state = nmcompile.sparsity_state(model)
    assert state["fc1.weight"]["perm"].shape == (32,) and state["fc1.weight"]["step"] == 1
    assert state["fc2.weight"]["step"] == 2


_WITHOUT_TRITON = r"""
import copy, sys
sys.modules["triton"] = None  # as on a machine without Triton: importing it fails
import torch
import nmcompile
from nmcompile import reference
torch.manual_seed(0)
base = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
for kernels in ("auto", "triton", "sparse24"):
    rows = nmcompile.explain(copy.deepcopy(base), torch.randn(8, 32), inner="aot_eager", kernels=kernels).rows
    print(kernels, sorted({row.kernel for row in rows}))
ref, mine = reference.sparsify(copy.deepcopy(base)), copy.deepcopy(base)
compiled = torch.compile(mine, backend="nmsparse")
for _ in range(3):
    x = torch.randn(8, 32)
    for model in (ref, compiled):
        model(x).square().mean().backward()
    with torch.no_grad():
        for p, q in zip(ref.parameters(), mine.parameters(), strict=True):
            p -= 0.05 * p.grad
            q -= 0.05 * q.grad
            p.grad = q.grad = None
print("max weight difference", max((p - q).abs().max().item() for p, q in zip(ref.parameters(), mine.parameters())))
from benchmarks import common, step  # the CPU benchmark imports too
print("benchmark triton", common.environment(torch.device("cpu"), "tiny", common.SIZES["tiny"], "")["triton"])
"""


def test_without_triton_installed_trains_on_the_portable_path():
    """Where ``import triton`` fails (Triton has no wheel for the platform), compiling still works:
    every layer is portable with that reason, training follows the reference, and the CPU benchmark
    imports."""
    root = Path(__file__).resolve().parent.parent  # where ``benchmarks`` imports from
    command = [sys.executable, "-c", _WITHOUT_TRITON]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    why = "triton is not installed"
    note = cpu_mask_note()
    assert lines[0] == f"auto ['portable ({why}{note})']"
    assert lines[1] == f"triton ['portable ({why}{note})']"
    assert lines[2] == f"sparse24 ['portable (not 2:4: {why} (its kernels write the 2:4 operands); {why}{note})']"
    difference = float(lines[3].removeprefix("max weight difference "))
    assert difference <= 1e-6
    assert lines[4] == "benchmark triton not installed"


def _train(compiled, opt, x: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        compiled(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_a_deleted_model_and_its_first_input_are_freed_while_dynamo_keeps_the_graph():
    """The compiled graph outlives the model in dynamo's cache (no ``torch._dynamo.reset()``); it
    must not keep the weights, the model or the first call's input (its example inputs) alive."""
    model = MLP(16, 32, 8)
    compiled = torch.compile(model, backend=_backend())
    x = torch.randn(8, 16)
    compiled(x).sum().backward()
    refs = [weakref.ref(model.fc1.weight), weakref.ref(model), weakref.ref(x)]
    del model, compiled, x
    gc.collect()
    assert [ref() is None for ref in refs] == [True, True, True]


def test_no_memory_growth_over_1000_steps():
    """1,000 training steps hold memory flat; states die with their parameters."""
    model = MLP(16, 32, 8)
    compiled = torch.compile(model, backend=_backend(perm_interval=50))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(8, 16)
    _train(compiled, opt, x, 100)
    gc.collect()
    objects, memory = len(gc.get_objects()), _rss()
    _train(compiled, opt, x, 900)
    gc.collect()
    assert len(gc.get_objects()) - objects < 2000
    assert _rss() - memory < 32 * 2**20
    assert nmcompile.sparsity_state(model)["fc1.weight"]["step"] == 1000
    weight = weakref.ref(model.fc1.weight)
    state = weakref.ref(DEFAULT_REGISTRY.get(model.fc1.weight))
    del model, compiled, opt
    torch._dynamo.reset()
    gc.collect()
    assert weight() is None and state() is None, "the layer state must not keep its weight (or itself) alive"


def test_an_eval_under_inductor_freezing_runs_the_forward_masks():
    """Under ``torch._inductor.config.freezing`` a ``no_grad`` compile gets the Parameters as graph
    attributes, not inputs; the backend lifts them into inputs, so a sparse-trained model's eval
    masks its weights as the reference does (it had run the dense weights)."""
    base = MLP()
    ref = reference.sparsify(copy.deepcopy(base), n=2, m=4)
    mine = copy.deepcopy(base)
    compiled = torch.compile(mine, backend=nmcompile.backend(n=2, m=4))
    train_against(ref, mine, compiled, shape=(8, 32), steps=2)
    ref.eval(), mine.eval()
    x = torch.randn(8, 32)
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):
        expected = ref(x)
        assert (mine(x) - expected).abs().max() > 1e-2  # the dense weights give another output
        assert_close(compiled(x), expected, what="frozen eval")
    assert {name: s["step"] for name, s in nmcompile.sparsity_state(mine).items()} == {
        "fc1.weight": 2,
        "fc2.weight": 2,
        "head.weight": 2,
    }


class TiedPair(nn.Module):
    """Two layers sharing one weight (a tie: dense, SPEC §10) and a third of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 8)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_lift_parameters_gives_each_attribute_parameter_one_input_with_its_source():
    """The pass on the graph dynamo hands a backend under freezing: one placeholder per Parameter
    (a tied one once), after the caller's inputs, named as its attribute and carrying its source;
    fed those Parameters, the graph computes what the model does."""
    captured = []

    def backend(gm, example_inputs):
        captured.append(lift_parameters(gm))
        return gm.forward

    model, x = TiedPair().eval(), torch.randn(4, 16)
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):
        torch.compile(model, backend=backend)(x)
        (lifted,) = captured
        inputs = [n for n in lifted.gm.graph.nodes if n.op == "placeholder"]
        names = ["l_x_", *(f"l__self___{layer}_{kind}" for layer in "abc" for kind in ("weight", "bias"))]
        assert [n.name for n in inputs] == [name for name in names if name != "l__self___b_weight"]
        assert [getattr(n, "_dynamo_source", None) is not None for n in inputs] == [False] + [True] * 5
        assert inputs[1]._dynamo_source.name == "L['self']._modules['a']._parameters['weight']"
        params = [model.a.weight, model.a.bias, model.b.bias, model.c.weight, model.c.bias]
        assert all(p is q for p, q in zip(lifted.params, params, strict=True))
        assert not [n for n in lifted.gm.graph.nodes if n.op == "get_attr"] and not list(lifted.gm.parameters())
        assert torch.equal(lifted.gm(x, *lifted.params)[0], model(x))


def test_a_tied_model_evaluates_alike_frozen_or_not():
    """Lifted Parameters keep their ties: the tied pair stays dense and the third layer sparse,
    with Inductor's freezing or without it."""
    model, x = TiedPair(), torch.randn(4, 16)
    compiled = torch.compile(model, backend=nmcompile.backend(n=2, m=4))
    compiled(x).sum().backward()
    model.eval()
    with torch.no_grad():
        expected = compiled(x)
        with torch._inductor.config.patch(freezing=True):
            assert torch.equal(compiled(x), expected)
    assert list(nmcompile.sparsity_state(model)) == ["c.weight"]


@pytest.mark.parametrize("grad_prune", ["none", "mvue24"])
def test_a_model_traced_with_prepare_freezing_trains_as_the_reference(grad_prune):
    """``torch._dynamo.config.prepare_freezing`` makes every Parameter a graph attribute, in training
    too: lifted into inputs, the layers train sparse under their own names."""
    with torch._dynamo.config.patch(prepare_freezing=True):
        _, state_mine = train_and_compare(MLP, (8, 32), steps=3, n=2, m=4, grad_prune=grad_prune)
    assert sorted(state_mine) == ["fc1.weight", "fc2.weight", "head.weight"]


@pytest.mark.parametrize("grad_prune", ["none", "mvue24"])
def test_a_step_compiled_with_compiled_autograd_trains_as_the_reference(grad_prune):
    """With ``torch._dynamo.config.compiled_autograd`` the backward of a compiled step is traced into a
    graph of its own that nmsparse compiles too; it holds no weight GEMM (the sparse ops' backward
    is as AOTAutograd traced it), and training matches the reference."""
    base = MLP()
    ref = reference.sparsify(copy.deepcopy(base), n=2, m=4, grad_prune=grad_prune)
    mine = copy.deepcopy(base)

    def step(x: torch.Tensor) -> torch.Tensor:
        loss = mine(x).square().mean()
        loss.backward()
        return loss

    counters.clear()
    with torch._dynamo.config.patch(compiled_autograd=True):  # read by torch.compile
        step = torch.compile(step, backend=nmcompile.backend(n=2, m=4, grad_prune=grad_prune))
        for i in range(3):
            x = torch.randn(8, 32)
            loss = ref(x).square().mean()
            assert_close(step(x), loss, what=f"step {i} loss")
            loss.backward()
            assert_grads_close(mine, ref, what=f"step {i}")
            sgd_step_both(ref, mine, 0.05)
    assert counters["compiled_autograd"]["captures"] >= 1
    assert {name: s["step"] for name, s in nmcompile.sparsity_state(mine).items()} == {
        "fc1.weight": 3,
        "fc2.weight": 3,
        "head.weight": 3,
    }


def test_blocks_in_a_nested_compile_region_train_as_the_reference():
    """Blocks whose forward is a ``torch.compiler.nested_compile_region``: dynamo inlines the first
    call and hands the backend the others as ``invoke_subgraph`` calls of one subgraph; inlined
    there too, every block trains as the reference, under its own name (blocks 1 and 2 trained dense)."""

    class Region(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(32, 32)

        @torch.compiler.nested_compile_region
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.fc(x))

    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(Region() for _ in range(3))
            self.head = nn.Linear(32, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = block(x)
            return self.head(x)

    _, state_mine = train_and_compare(Stack, (8, 32), steps=3, n=2, m=4)
    assert sorted(state_mine) == ["blocks.0.fc.weight", "blocks.1.fc.weight", "blocks.2.fc.weight", "head.weight"]
