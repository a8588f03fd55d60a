"""``kernels='auto'`` between the Triton kernels and 2:4 tensor cores: the timed step of
``nmcompile.kernels.measure`` and the lowering's choice from it.

On the CPU both device checks are forced open (the Triton kernels then run under the
interpreter, the 2:4 ops with dense GEMMs), so what is tested is the choice, its report, the
graph and the timing harness itself; which path is faster on a GPU is for the benchmarks.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from conftest import MLP, cpu_mask_note, deterministic_algorithms, interpreted, train_and_compare

import nmcompile
from nmcompile.kernels import measure

# (in, out) of MLP()'s three layers: fc1, fc2, head.
SHAPES = {"fc1": (32, 64), "fc2": (64, 64), "head": (64, 16)}


@pytest.fixture
def both_paths(monkeypatch):
    """Let ``auto`` consider both paths on CPU tensors: every check but the device's passes."""
    lowering = sys.modules["nmcompile.passes.lower_kernels"]  # the package re-exports the function
    monkeypatch.setattr(lowering, "_sparse24_blocker", lambda node, config: None)
    monkeypatch.setattr(lowering, "_triton_blocker", lambda node, config: None)
    return lowering


def _timed(monkeypatch, times: dict[str, float]) -> list[tuple[str, measure.LinearCase]]:
    """Replace the timing with fixed figures per candidate; returns the calls made."""
    calls = []

    def step_ms(kernels, case):
        calls.append((kernels, case))
        return times[kernels]

    monkeypatch.setattr(measure, "step_ms", step_ms)
    return calls


def _kernels(x: torch.Tensor, **options) -> set[str]:
    rows = nmcompile.explain(MLP(), x, kernels="auto", inner="aot_eager", **options).rows
    return {r.kernel for r in rows}


@interpreted
def test_auto_takes_2_4_where_it_measures_faster(both_paths, monkeypatch):
    calls = _timed(monkeypatch, {"sparse24": 1.5, "triton": 2.0})
    report = nmcompile.explain(MLP(), torch.randn(8, 32), kernels="auto", grad_prune="mvue24", inner="aot_eager")
    assert {r.kernel for r in report.rows} == {"sparse24 (a step measured 1.5 ms on 2:4 tensor cores, 2 ms on Triton)"}
    targets = {str(n.target) for n in report.forward_graph.graph.nodes}
    assert "nmsparse.sparse24_linear.nograd" in targets and not any("triton_linear" in t for t in targets)
    # Each layer's case, both candidates: shapes [O, K] and x, the options the ops read.
    cases = {case.weight_shape: case for _, case in calls}
    assert sorted(kernels for kernels, _ in calls) == ["sparse24"] * 3 + ["triton"] * 3
    assert set(cases) == {(out, inp) for inp, out in SHAPES.values()}
    fc1 = cases[(64, 32)]
    assert fc1.x_shape == (8, 32) and fc1.x_dtype == torch.float32 and fc1.autocast is None
    assert (fc1.n, fc1.m, fc1.has_bias, fc1.load_mask, fc1.bimask) == (2, 4, True, False, True)
    assert (fc1.grad_prune, fc1.srste_lambda, fc1.n_eff) == ("mvue24", 2e-4, False)


@interpreted
def test_auto_keeps_triton_where_2_4_measures_slower(both_paths, monkeypatch):
    _timed(monkeypatch, {"sparse24": 2.5, "triton": 2.0})
    kernels = _kernels(torch.randn(8, 32), grad_prune="mvue24", backward="dense")
    assert kernels == {"triton (not 2:4: a step measured 2.5 ms on 2:4 tensor cores, 2 ms on Triton)"}
    _timed(monkeypatch, {"sparse24": 1.0, "triton": 2.0})
    kernels = _kernels(torch.randn(8, 32), backward="dense")  # no MVUE, dense input gradient: the report says so
    assert kernels == {
        "sparse24 (dense: input gradient (backward='dense'), weight gradient (grad_prune='none'); "
        "a step measured 1 ms on 2:4 tensor cores, 2 ms on Triton)"
    }


@interpreted
def test_auto_without_a_timing_keeps_triton(both_paths, monkeypatch):
    """A timing that fails, or an input shape without a size hint: Triton, and the report says why."""

    def fail(kernels, case):
        raise RuntimeError("cuSPARSELt: out of memory\nmore")

    monkeypatch.setattr(measure, "step_ms", fail)
    assert _kernels(torch.randn(8, 32)) == {"triton (2:4 not measured: RuntimeError: cuSPARSELt: out of memory)"}
    calls = _timed(monkeypatch, {"sparse24": 1.0, "triton": 2.0})
    monkeypatch.setattr(both_paths, "size_hint", lambda size: None)
    unknown = "triton (2:4 not measured: the input's shape is unknown or has no size hint)"
    assert _kernels(torch.randn(8, 32)) == {unknown}
    assert calls == []


@interpreted
def test_auto_times_nothing_under_deterministic_algorithms(both_paths, monkeypatch):
    """Two processes could time the paths differently and round differently: under
    ``torch.use_deterministic_algorithms`` ``auto`` keeps Triton untimed and says why; the mode at
    compile time decides."""
    calls = _timed(monkeypatch, {"sparse24": 1.0, "triton": 2.0})
    with deterministic_algorithms(True):
        kernels = _kernels(torch.randn(8, 32), grad_prune="mvue24")
    why = "2:4 not measured: torch.use_deterministic_algorithms is on (kernels='sparse24' names 2:4)"
    assert kernels == {f"triton ({why})"}
    assert calls == []
    assert _kernels(torch.randn(8, 32), grad_prune="mvue24") == {
        "sparse24 (a step measured 1 ms on 2:4 tensor cores, 2 ms on Triton)"
    }
    assert len(calls) == 6


def test_auto_measures_nothing_where_2_4_cannot_run(monkeypatch):
    """On the CPU (or fp32, a non-2:4 N:M, mask decay) ``auto`` is as before: no timing, no note."""
    calls = _timed(monkeypatch, {"sparse24": 1.0, "triton": 2.0})
    kernels = _kernels(torch.randn(8, 32), grad_prune="mvue24")
    assert all(k.startswith("portable (not on CUDA") for k in kernels) and calls == []


def _case(**changes) -> measure.LinearCase:
    fields = dict(
        x_shape=(2, 4, 32), x_dtype=torch.float32, weight_shape=(16, 32), weight_dtype=torch.float32,
        device=torch.device("cpu"), autocast=None, n=2, m=4, has_bias=True, load_mask=False, bimask=True,
        n_eff=False, step=True, srste_lambda=2e-4, grad_prune="mvue24",
    )  # fmt: skip
    return measure.LinearCase(**{**fields, **changes})


@interpreted
@pytest.mark.parametrize(
    "changes",
    [{}, {"load_mask": True, "bimask": False, "has_bias": False}, {"n_eff": True, "grad_prune": "none"}],
    ids=["bimask-mvue", "transposable", "structure-decay"],
)
@pytest.mark.parametrize("kernels", ["triton", "sparse24"])
def test_step_ms_runs_each_candidate(kernels, changes):
    """The harness builds operands every op variant takes, runs forward and backward, and leaves the
    user's random stream alone; the figure is cached per case."""
    case = _case(**changes)
    measure.step_ms.cache_clear()
    state = torch.get_rng_state()
    ms = measure.step_ms(kernels, case)
    assert 0 < ms < 60_000 and torch.equal(torch.get_rng_state(), state)
    assert measure.step_ms(kernels, case) == ms and measure.step_ms.cache_info().hits == 1


@interpreted
def test_auto_times_real_steps_inside_the_compile(both_paths):
    """Unmocked: the timing runs inside ``torch.compile``'s backend (outside its fake mode) and the
    model still trains like the reference on whichever path each layer got."""
    measure.step_ms.cache_clear()
    train_and_compare(MLP, (8, 32), steps=2, kernels="auto", grad_prune="mvue24", inner="aot_eager")
    assert measure.step_ms.cache_info().misses == 6
    assert all("a step measured" in k for k in _kernels(torch.randn(8, 32), grad_prune="mvue24"))


@pytest.mark.parametrize("kernels", ["auto", "sparse24"])
def test_without_triton_every_layer_is_portable(kernels, monkeypatch):
    """Where Triton is not installed the lowering neither lowers nor times anything: portable, with the reason."""
    find_spec = importlib.util.find_spec

    def without_triton(name):
        return None if name == "triton" else find_spec(name)

    monkeypatch.setattr(importlib.util, "find_spec", without_triton)
    calls = _timed(monkeypatch, {"sparse24": 1.0, "triton": 2.0})
    rows = nmcompile.explain(MLP(), torch.randn(8, 32), kernels=kernels, inner="aot_eager").rows
    why = "triton is not installed"
    if kernels == "sparse24":
        why = f"not 2:4: {why} (its kernels write the 2:4 operands); {why}"
    assert {r.kernel for r in rows} == {f"portable ({why}{cpu_mask_note()})"} and calls == []
