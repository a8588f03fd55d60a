"""The C mask kernels (``nmcompile/kernels/cpu_mask.py``: forward, and Bi-Mask backward) against
SPEC §2, §4 and the reference, and their place in the portable CPU graphs (``passes/lower_kernels.py``,
``nmcompile.ops.input_grad_weight``)."""

from __future__ import annotations

import copy
import re
import shutil
import warnings

import pytest
import torch
from conftest import MLP, NOT_ON_CUDA
from torch import nn

import nmcompile
from nmcompile import reference
from nmcompile.kernels import cpu_mask

pytestmark = pytest.mark.skipif(cpu_mask._compiler() is None, reason="no C compiler found ($CC, cc or gcc)")


def test_the_kernels_build_where_a_compiler_is_found():
    """With a C compiler the kernels build and load: a build error must fail here, not skip this
    module and leave every CPU graph on the slower rank comparisons unnoticed."""
    library = cpu_mask._library()
    assert not isinstance(library, str), library


def _special(rows: int, cols: int) -> torch.Tensor:
    """Gaussian weights with the cases SPEC §2 names: ties, NaN, ±0, ±inf, and an all-zero group."""
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows * cols))
    w[0, :4] = torch.tensor([1.0, -1.0, 1.0, -1.0])  # ties: the lower indices win
    w[1, :4] = torch.tensor([float("nan"), 0.5, float("nan"), 2.0])  # NaN ranks largest
    w[2, :4] = torch.tensor([0.0, -0.0, 0.0, -0.0])
    w[3, :4] = torch.tensor([float("-inf"), 3.0, float("inf"), float("nan")])
    return w


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(4, 4), (5, 12), (8, 64), (64, 36)], ids=str)
def test_kernel_equals_reference_bit_for_bit(shape, n):
    """``W ⊙ F`` equals ``where(reference.nm_mask(W), W, +0.0)`` in every bit (NaN payloads and the
    sign of kept zeros included), for an even and an odd number of groups (the scalar tail); the mask
    launcher (the permutation search's) gives ``reference.nm_mask`` itself, kept zeros included."""
    w = _special(*shape)
    fmask = reference.nm_mask(w, n, 4, 1)
    expected = torch.where(fmask, w, 0.0)
    out = cpu_mask.nm4_masked_weight(w, n)
    assert torch.equal(out.view(torch.int32), expected.view(torch.int32))
    assert int((out != 0).sum()) <= n * w.numel() // 4
    mask = cpu_mask.nm4_mask(w, n)
    assert mask.dtype == torch.bool and torch.equal(mask, fmask)
    assert int(mask.sum()) == n * w.numel() // 4 and int(mask[2, :4].sum()) == n  # kept zeros, which W ⊙ F hides


def test_kernel_reads_strided_and_grad_weights():
    """A transposed view (the ``[in, out]`` layout's ``W.t()``) and a weight that requires grad."""
    w = _special(16, 8).t().requires_grad_()
    out = cpu_mask.nm4_masked_weight(w, 2)
    expected = torch.where(reference.nm_mask(w.detach(), 2, 4, 1), w.detach(), 0.0)
    assert torch.equal(out.view(torch.int32), expected.view(torch.int32))
    assert out.is_contiguous() and not out.requires_grad


@pytest.mark.parametrize(
    ("weight", "n", "message"),
    [
        (torch.zeros(4, 8, dtype=torch.float64), 2, "fp32 on the CPU"),
        (torch.zeros(4, 6), 2, "divisible by 4"),
        (torch.zeros(()), 2, "divisible by 4"),
        (torch.zeros(4, 8), 0, "n must be in 1..4"),
        (torch.zeros(4, 8), 5, "n must be in 1..4"),
    ],
)
@pytest.mark.parametrize("launcher", ["nm4_masked_weight", "nm4_mask"])
def test_launcher_rejects_bad_inputs(launcher, weight, n, message):
    with pytest.raises(ValueError, match=message):
        getattr(cpu_mask, launcher)(weight, n)


def _bimask_expected(masked: torch.Tensor, perm: torch.Tensor, n: int) -> torch.Tensor:
    """SPEC §4 by definition: ``where(nm_mask((W⊙F)[P], dim=0), (W⊙F)[P], +0.0)`` put back in row order."""
    permuted = masked.index_select(0, perm)
    expected = torch.empty_like(masked)
    expected[perm] = torch.where(reference.nm_mask(permuted, n, 4, 0), permuted, 0.0)
    return expected


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(4, 4), (8, 13), (16, 36), (32, 4, 3, 3), (256, 520)], ids=str)
def test_bimask_kernel_equals_reference_bit_for_bit(shape, n):
    """``W ⊙ B`` from ``W ⊙ F``: every bit as SPEC §4's formula, with ties, NaN, ±0 and ±inf inside one
    permuted group of rows, columns that fill 8-wide vectors and a scalar tail (13, 36, 520), conv
    weights (groups along ``O`` at every ``(c, kh, kw)``), and the multi-threaded size (256 x 520)."""
    generator = torch.Generator().manual_seed(n * shape[0])
    masked = torch.randn(shape, generator=generator).reshape(shape[0], -1)
    masked[torch.rand(masked.shape, generator=generator) < 0.3] = 0.0  # pruned by F: zeros of W ⊙ F
    perm = torch.randperm(shape[0], generator=generator)
    group = perm[:4]  # one permuted group of rows, not adjacent in memory
    masked[group, 0] = torch.tensor([1.0, -1.0, 1.0, -1.0])  # ties: the lower slot of the group wins
    masked[group, 1] = torch.tensor([float("nan"), 0.5, float("nan"), 2.0])  # NaN ranks largest
    masked[group, 2] = torch.tensor([0.0, -0.0, 0.0, -0.0])
    masked[group, 3] = torch.tensor([float("-inf"), 3.0, float("inf"), float("nan")])
    masked = masked.reshape(shape)
    out = cpu_mask.nm4_bimask_weight(masked, perm, n)
    assert torch.equal(out.view(torch.int32), _bimask_expected(masked, perm, n).view(torch.int32))
    kept_per_group = (out.index_select(0, perm) != 0).reshape(shape[0] // 4, 4, -1).sum(1)
    assert int(kept_per_group.max()) <= n


def test_bimask_kernel_is_the_backward_mask_of_the_reference():
    """On a real weight: ``W ⊙ B`` with ``B = reference.backward_mask(W, F, P)``, which is ``⊆ F``."""
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(3))
    f = reference.nm_mask(w, 2, 4, 1)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(4))
    out = cpu_mask.nm4_bimask_weight(torch.where(f, w, 0.0), perm, 2)
    expected = torch.where(reference.backward_mask(w, f, perm, 2, 4), w, 0.0)
    assert torch.equal(out.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("op", ["cpu_masked_weight", "cpu_bimask_weight"])
def test_graph_ops_are_registered_without_autograd_history(op):
    """The graph nodes ``nmsparse.cpu_masked_weight`` and ``cpu_bimask_weight`` pass ``opcheck``
    (schema, fake, aliasing, AOT dispatch; NaN-free weights, which its comparison needs) on a
    transposed weight that requires grad, give the launchers' bits on SPEC §2's special values, and
    return tensors with no autograd history: they are never differentiated (``ops.gradless_op``)."""
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(5))
    fn = getattr(torch.ops.nmsparse, op).default
    for base in (torch.randn(16, 8, generator=torch.Generator().manual_seed(6)), _special(16, 8)):
        w = base.t().requires_grad_()
        masked = cpu_mask.nm4_masked_weight(base, 2).t().requires_grad_()
        args = (w, 1, torch.tensor(3)) if op == "cpu_masked_weight" else (masked, perm, 2)
        if not base.isnan().any():
            torch.library.opcheck(fn, args)
        out = fn(*args)
        expected = (
            cpu_mask.nm4_masked_weight(w, 3)
            if op == "cpu_masked_weight"
            else _bimask_expected(masked.detach(), perm, 2)
        )
        assert torch.equal(out.view(torch.int32), expected.view(torch.int32))
        assert out.grad_fn is None and not out.requires_grad


def test_compiled_caller_of_the_backward_helper_has_one_graph():
    """``torch.compile(fullgraph=True)`` of code calling ``ops.input_grad_weight`` (as the benchmark's
    portable rows do) traces the kernel choice as a constant: no graph break, no Dynamo warning."""
    from nmcompile.ops import input_grad_weight

    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(6))
    masked = cpu_mask.nm4_masked_weight(w, 2)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(7))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        out = torch.compile(lambda: input_grad_weight(w, masked, perm, 2, 4), fullgraph=True)()
    expected = torch.where(reference.backward_mask(w, reference.nm_mask(w, 2, 4, 1), perm, 2, 4), w, 0.0)
    assert torch.equal(out.view(torch.int32), expected.view(torch.int32))


def test_kernels_give_the_same_bits_on_one_and_two_threads():
    """Above the size where the kernels go multi-threaded, the thread count changes nothing."""
    w = _special(512, 512)
    perm = torch.randperm(512, generator=torch.Generator().manual_seed(5))
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            masked = cpu_mask.nm4_masked_weight(w, 2)
            results.append((masked, cpu_mask.nm4_bimask_weight(masked, perm, 2)))
            assert torch.equal(cpu_mask.nm4_mask(w, 2), reference.nm_mask(w, 2, 4, 1))
    finally:
        torch.set_num_threads(threads)
    (fwd_1, bwd_1), (fwd_2, bwd_2) = results
    expected = torch.where(reference.nm_mask(w, 2, 4, 1), w, 0.0)
    assert torch.equal(fwd_1.view(torch.int32), expected.view(torch.int32))
    assert torch.equal(fwd_1.view(torch.int32), fwd_2.view(torch.int32))
    assert torch.equal(bwd_1.view(torch.int32), _bimask_expected(expected, perm, 2).view(torch.int32))
    assert torch.equal(bwd_1.view(torch.int32), bwd_2.view(torch.int32))


@pytest.mark.parametrize(
    ("masked", "perm", "n", "message"),
    [
        (torch.zeros(4, 8, dtype=torch.float64), torch.arange(4), 2, "fp32 on the CPU"),
        (torch.zeros(6, 8), torch.arange(6), 2, "O divisible by 4"),
        (torch.zeros(8), torch.arange(8), 2, "O divisible by 4"),
        (torch.zeros(4, 8), torch.arange(4, dtype=torch.int32), 2, "perm must be int64 \\[4\\]"),
        (torch.zeros(4, 8), torch.arange(8), 2, "perm must be int64 \\[4\\]"),
        (torch.zeros(4, 8), torch.tensor([0, 1, 2, 4]), 2, "not a permutation of 0..3"),
        (torch.zeros(4, 8), torch.tensor([0, 1, 2, -1]), 2, "not a permutation of 0..3"),
        (torch.zeros(4, 8), torch.tensor([0, 1, 1, 3]), 2, "not a permutation of 0..3"),
        (torch.zeros(4, 8), torch.arange(4), 0, "n must be in 1..4"),
        (torch.zeros(4, 8), torch.arange(4), 5, "n must be in 1..4"),
    ],
)
def test_bimask_launcher_rejects_bad_inputs(masked, perm, n, message):
    """Bad shapes, dtypes and permutations raise before the C code could read or write out of bounds."""
    with pytest.raises(ValueError, match=message):
        cpu_mask.nm4_bimask_weight(masked, perm, n)


@pytest.fixture
def rebuild(monkeypatch):
    """``monkeypatch`` for the build's helpers, with the library cache cleared around the test, so the
    library is built again under the patches and, after the test, again without them."""
    cpu_mask._library.cache_clear()
    yield monkeypatch
    cpu_mask._library.cache_clear()  # before monkeypatch's own teardown undoes the patches


def test_blocker_reasons():
    """The lowering asks ``blocker`` first: every case that keeps the composite mask has its reason."""
    assert cpu_mask.blocker(torch.zeros(4, 8), 4) is None
    assert cpu_mask.blocker(torch.zeros(4, 8, device="meta"), 4) == "weight on meta"
    assert cpu_mask.blocker(torch.zeros(4, 8, dtype=torch.bfloat16), 4) == (
        "weight dtype torch.bfloat16 (the C kernel takes fp32)"
    )
    assert cpu_mask.blocker(torch.zeros(4, 8), 8) == "m=8 (the C kernel is written for m=4)"


def test_no_compiler_is_a_reason(rebuild):
    rebuild.setattr(cpu_mask, "_compiler", lambda: None)
    assert cpu_mask.blocker(torch.zeros(4, 8), 4) == "no C compiler found ($CC, cc or gcc)"
    with pytest.raises(RuntimeError, match="no C compiler"):
        cpu_mask.nm4_masked_weight(torch.zeros(4, 8), 2)


@pytest.mark.parametrize("cc", ["/nonexistent/clang", "gcc -m64"])
def test_a_cc_that_names_no_executable_warns_and_falls_back(monkeypatch, cc):
    """``$CC`` set to a wrong path or to a command with arguments builds with ``cc``/``gcc``, with a
    warning naming it (it fell back without a word); a ``$CC`` that resolves is the one used."""
    fallback = shutil.which("cc") or shutil.which("gcc")
    monkeypatch.setenv("CC", cc)
    with pytest.warns(UserWarning, match=re.escape(f"$CC={cc!r} is not an executable")):
        assert cpu_mask._compiler() == fallback
    monkeypatch.setenv("CC", fallback)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_mask._compiler() == fallback


def test_unwritable_cache_is_a_reason_not_a_crash(tmp_path, rebuild):
    """A cache directory that cannot be made (here: below a file) leaves the composite mask, with why."""
    blocker_file = tmp_path / "file"
    blocker_file.write_text("")
    rebuild.setattr(cpu_mask, "_cache_dir", lambda: blocker_file / "nmcompile")
    reason = cpu_mask.blocker(torch.zeros(4, 8), 4)
    assert reason is not None and reason.startswith("the C mask kernel could not be built or loaded")


def test_broken_compiler_is_a_reason(tmp_path, rebuild):
    """A compiler that fails gives its error as the reason."""
    rebuild.setattr(cpu_mask, "_cache_dir", lambda: tmp_path)
    rebuild.setattr(cpu_mask, "_compiler", lambda: "false")
    assert cpu_mask.blocker(torch.zeros(4, 8), 4) == "the C mask kernel did not build: "
    assert list(tmp_path.iterdir()) == []  # the temporary build directory is gone


def test_build_is_cached_by_source_and_cpu(tmp_path, rebuild):
    """A fresh cache directory gets one library named by the key; a second process-level build reuses it."""
    rebuild.setattr(cpu_mask, "_cache_dir", lambda: tmp_path)
    first = cpu_mask._library()
    built = sorted(tmp_path.iterdir())
    assert len(built) == 1 and built[0].name.startswith("nm4_mask_") and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    cpu_mask._library.cache_clear()
    second = cpu_mask._library()
    assert first._name == second._name == str(built[0]) and built[0].stat().st_mtime_ns == stamp


def test_without_openmp_the_kernels_build_single_threaded(tmp_path, rebuild):
    """Where ``-fopenmp`` does not build or load, the library is built without it, and computes the same."""
    rebuild.setattr(cpu_mask, "_cache_dir", lambda: tmp_path)
    build = cpu_mask._build
    rebuild.setattr(cpu_mask, "_build", lambda cc, flags: "no OpenMP" if "-fopenmp" in flags else build(cc, flags))
    assert cpu_mask.blocker(torch.zeros(4, 8), 4) is None
    assert len(list(tmp_path.iterdir())) == 1
    w = _special(512, 512)
    expected = torch.where(reference.nm_mask(w, 2, 4, 1), w, 0.0)
    assert torch.equal(cpu_mask.nm4_masked_weight(w, 2).view(torch.int32), expected.view(torch.int32))


def _forward_targets(model: nn.Module, **options) -> tuple[dict[str, str], set[str]]:
    """The forward graph's ``{node name: target}`` and the report's ``kernel`` column."""
    x = torch.randn(8, 32, dtype=next(model.parameters()).dtype)
    report = nmcompile.explain(model, x, inner="aot_eager", **options)
    return {node.name: str(node.target) for node in report.forward_graph.graph.nodes}, {r.kernel for r in report.rows}


@pytest.mark.parametrize(("kernels", "why"), [("auto", NOT_ON_CUDA), ("portable", "kernels='portable'")])
def test_portable_graph_uses_the_kernel(kernels, why):
    """fp32 2:4 on the CPU: ``<layer>_fwd_masked`` is the C kernel and no ``<layer>_fwd_mask`` is
    left; the report's ``kernel`` column says so after the reason the GEMM is portable."""
    targets, column = _forward_targets(MLP(), kernels=kernels)
    for layer in ("fc1", "fc2", "head"):
        assert targets[f"{layer}_fwd_masked"] == "nmsparse.cpu_masked_weight.default"
        assert f"{layer}_fwd_mask" not in targets
    assert column == {f"portable ({why}; forward mask: C kernel)"}


@pytest.mark.parametrize(
    ("model", "options"),
    [
        (MLP(), {"n": 2, "m": 8}),  # the kernel is written for m=4
        (MLP().double(), {}),  # fp32 only
        (MLP(), {"backward": "transposable"}),  # F is not nm_mask along K alone
    ],
    ids=["m8", "fp64", "transposable"],
)
def test_other_layers_keep_the_composite_mask(model, options):
    targets, column = _forward_targets(model, **options)
    assert "nmsparse.cpu_masked_weight.default" not in targets.values()
    assert "fc1_fwd_mask" in targets and "fc1_fwd_masked" in targets
    assert not any("C kernel" in kernel for kernel in column)


@pytest.mark.parametrize(
    "options",
    [
        {"inner": "aot_eager"},
        {"structure_decay": True, "total_steps": 6, "n": 1, "inner": "aot_eager"},
        {"mask_decay": "linear", "mask_decay_rate": 0.2, "inner": "aot_eager"},
    ],
    ids=["bimask", "structure_decay", "mask_decay"],
)
def test_training_matches_the_composite_mask(options, monkeypatch):
    """4 SGD steps with the kernels and with the composite masks: identical losses and weights (N
    changing between steps under structure decay; pruned weights scaled by alpha under mask decay).
    Under Inductor, ``test_backend``'s reference comparisons of fp32 2:4 models run the kernel."""
    base = MLP()
    x = torch.randn(8, 32)
    calls, backward_calls = [], []
    launch, launch_backward = cpu_mask.nm4_masked_weight, cpu_mask.nm4_bimask_weight
    monkeypatch.setattr(cpu_mask, "nm4_masked_weight", lambda w, n: calls.append(n) or launch(w, n))
    monkeypatch.setattr(
        cpu_mask, "nm4_bimask_weight", lambda w, p, n: backward_calls.append(n) or launch_backward(w, p, n)
    )
    results = []
    for blocked in (False, True):
        if blocked:
            assert len(calls) == 4 * 3  # every step, every layer
            assert len(backward_calls) == 4 * 2  # every step, fc2 and head (fc1's input needs no gradient)
            if "structure_decay" in options:
                assert calls[::3] == [3, 3, 2, 2]  # n_eff read at each step: 3:4, then 2:4 (frames of 2 steps)
                assert backward_calls[::2] == [3, 3, 2, 2]
            calls.clear()
            backward_calls.clear()
            monkeypatch.setattr(cpu_mask, "blocker", lambda weight, m: "blocked by the test")
        torch._dynamo.reset()
        model = copy.deepcopy(base)
        compiled = torch.compile(model, backend=nmcompile.backend(**options))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for _ in range(4):
            loss = compiled(x).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
        results.append((torch.stack(losses), [p.detach().clone() for p in model.parameters()]))
    assert calls == backward_calls == []
    (losses_c, params_c), (losses_t, params_t) = results
    assert torch.equal(losses_c, losses_t)
    assert all(torch.equal(a, b) for a, b in zip(params_c, params_t, strict=True))


def test_benchmark_row_without_the_kernel(monkeypatch):
    """``benchmarks.step``'s composite-mask row compiles without the kernels (forward and backward), its
    portable row with them (both layers: fc1's input is LayerNorm's output, so it has a gradient)."""
    from benchmarks import step

    calls = []
    launch, launch_backward = cpu_mask.nm4_masked_weight, cpu_mask.nm4_bimask_weight
    monkeypatch.setattr(cpu_mask, "nm4_masked_weight", lambda w, n: calls.append("fwd") or launch(w, n))
    monkeypatch.setattr(cpu_mask, "nm4_bimask_weight", lambda w, p, n: calls.append("bwd") or launch_backward(w, p, n))
    x = torch.randn(8, 32)
    for name, expected in (("nmsparse portable, composite mask", []), ("nmsparse portable", ["fwd"] * 2 + ["bwd"] * 2)):
        torch._dynamo.reset()
        model = step.FFNBlock(32, 64)
        step._prepare(name, model, torch.device("cpu"), torch.float32)(x).sum().backward()
        assert calls == expected, name
        calls.clear()


def test_the_autograd_cache_keeps_graphs_with_and_without_the_library_apart(tmp_path, rebuild):
    """A convolution keeps the composite forward mask, so its forward graph is the same with and
    without the library; its backward, which AOTAutograd traces from the op, calls the C Bi-Mask
    kernel only with it. The cache key says whether the library is there: a process without it
    compiles its own backward (it loaded one that calls the kernel, and raised in the backward)."""
    from torch._dynamo.utils import counters

    rebuild.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    base = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3))
    x = torch.randn(2, 8, 10, 10)
    found = cpu_mask._compiler
    hits, grads = [], []
    with torch._functorch.config.patch(enable_autograd_cache=True):
        for compiler in (found, lambda: None, found):
            rebuild.setattr(cpu_mask, "_compiler", compiler)
            cpu_mask._library.cache_clear()
            torch._dynamo.reset()
            counters.clear()
            model = copy.deepcopy(base)
            torch.compile(model, backend=nmcompile.backend())(x).square().mean().backward()
            hits.append(counters["aot_autograd"]["autograd_cache_hit"])
            grads.append([p.grad for p in model.parameters()])
    assert hits == [0, 0, 1]
    assert all(torch.equal(a, b) for a, b in zip(grads[0], grads[1], strict=True))


@pytest.mark.parametrize(
    ("case", "m", "c_kernel"),
    [("fp32", 4, True), ("fp32 [in, out] view", 4, True), ("bf16", 4, False), ("conv", 4, False), ("fp32", 8, False)],
)
def test_forward_mask_outside_the_graphs_is_the_references(case, m, c_kernel, monkeypatch):
    """``state.nm_forward_mask``, the ``F`` of the permutation search, ``sparsity_state`` and
    ``forward_weights``, is ``reference.nm_mask`` along the reduction dim: from the C kernel for a 2-D
    fp32 weight at M=4, from the composite op otherwise (a conv weight along ``C``, bf16, M=8)."""
    from nmcompile.state import nm_forward_mask

    w = _special(32, 48)
    if case == "fp32 [in, out] view":
        w = _special(48, 32).t()
    elif case == "bf16":
        w = w.bfloat16()
    elif case == "conv":
        w = w.reshape(32, 16, 3, 1)
    calls = []
    monkeypatch.setattr(cpu_mask, "nm4_mask", lambda w, n, launch=cpu_mask.nm4_mask: calls.append(n) or launch(w, n))
    for n in range(1, m + 1):
        assert torch.equal(nm_forward_mask(w, n, m), reference.nm_mask(w, n, m, 1)), n
    assert calls == (list(range(1, m + 1)) if c_kernel else [])
