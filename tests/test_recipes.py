"""Recipes of SPEC §7–§9: MVUE gradient pruning, mask decay, structure decay, checkpoints."""

from __future__ import annotations

import copy
import gc
import io
import math
import operator
import os
import pickle
import re
import subprocess
import sys
import textwrap
import threading
import warnings
import weakref
from collections.abc import Callable

import pytest
import torch
import torch.nn.utils.parametrize
import torch.nn.utils.prune
from conftest import (
    DOMINANT_BLOCKS,
    MLP,
    assert_close,
    boundary_draws,
    deterministic_algorithms,
    lone_nonzero_blocks,
    non_finite_blocks,
    sgd_step_both,
    train_and_compare,
)
from test_conv import BasicBlock
from torch import nn
from torch._dynamo.utils import counters

import nmcompile
from nmcompile import reference
from nmcompile.state import DEFAULT_REGISTRY

SAMPLES = 20000


def _gradient() -> torch.Tensor:
    """``[T=16, 8]`` with hand-made 4-blocks along T: dominant, zeros, ties, one and two nonzeros."""
    g = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    g[0:4, 0] = torch.tensor([10.0, 0.1, -0.2, 0.3])  # one dominant element
    g[0:4, 1] = 0.0  # all zeros
    g[0:4, 2] = torch.tensor([1.0, 1.0, 1.0, 1.0])  # ties
    g[0:4, 3] = torch.tensor([2.0, -2.0, 2.0, -2.0])  # ties with signs
    g[0:4, 4] = torch.tensor([0.0, 0.0, 5.0, 0.0])  # a single nonzero
    g[0:4, 5] = torch.tensor([0.0, 3.0, 0.0, -1.0])  # two nonzeros
    g[4:8, 6] = torch.tensor([1.0, 1.0, 1.0, 0.5])  # max equals the sum of the others: not dominant
    g[8:12, 7] = torch.tensor([-4.0, 1.0, 1.0, 1.0])  # dominant by a little
    return g


def _samples(prune, g: torch.Tensor) -> torch.Tensor:
    """``SAMPLES`` independent prunings of ``g`` along dim 0: ``[SAMPLES, *g.shape]``."""
    out = prune(g.repeat(1, SAMPLES))  # columns are independent replicas; blocks run along dim 0
    return out.reshape(g.shape[0], SAMPLES, g.shape[1]).transpose(0, 1)


def _unbiased(samples: torch.Tensor, g: torch.Tensor) -> bool:
    """Every element's sample mean within 5 standard errors of the input (exact where the variance
    is 0). With 128 elements, a true unbiased rule fails this with probability < 1e-4."""
    mean, std = samples.double().mean(0), samples.double().std(0)
    bound = 5 * std / math.sqrt(samples.shape[0]) + 1e-5 * (1 + g.double().abs())
    return bool(((mean - g.double()).abs() <= bound).all())


def _topk(g: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The minimum-MSE (biased) alternative: keep the ``n`` largest of every ``m`` along dim 0."""
    return torch.where(reference.nm_mask(g, n, m, dim=0), g, 0)


@pytest.mark.parametrize(("rule", "n", "m", "approx"), [("mvue12", 1, 2, False), ("mvue24", 2, 4, False),
                                                        ("mvue24_approx", 2, 4, True)])  # fmt: skip
def test_mvue_is_unbiased_and_keeps_n_per_block(rule, n, m, approx):
    """SPEC §7: E[prune(g)] = g elementwise (measured), while top-k of the same gradient is not;
    each block keeps min(n, nonzeros) entries."""
    g = _gradient()
    generator = torch.Generator().manual_seed(1)
    samples = _samples(lambda t: nmcompile.mvue_prune(t, n, m, dim=0, generator=generator, approx=approx), g)
    assert _unbiased(samples, g)
    assert not _unbiased(_samples(lambda t: _topk(t, n, m), g), g)
    blocks = samples.reshape(SAMPLES, 16 // m, m, 8)
    nonzero_in = (g.reshape(16 // m, m, 8) != 0).sum(1)
    assert torch.equal((blocks != 0).sum(2), nonzero_in.clamp(max=n).expand(SAMPLES, -1, -1))


def test_mvue24_variance_not_above_approx():
    """SPEC §7: the optimal 2:4 rule has no more variance than the two-draw approximation."""
    g = _gradient()
    generator = torch.Generator().manual_seed(2)
    optimal = _samples(lambda t: nmcompile.mvue_prune(t, 2, 4, generator=generator), g)
    approx = _samples(lambda t: nmcompile.mvue_prune(t, 2, 4, generator=generator, approx=True), g)
    assert optimal.var(0).sum() < approx.var(0).sum()


@pytest.mark.parametrize("approx", [False, True])
def test_mvue24_keeps_exact_values_where_one_entry_dwarfs_the_rest(approx):
    """SPEC §7: each kept entry is ``a_i / π_i`` with the rule's inclusion probability ``π_i``
    (here in float64), to fp32 rounding, also where the largest entry dwarfs the others. Taking
    their sum as the fp32 total less that entry made the small entries of ``(1000, 1e-3, 0, 0)``
    2.3% too small, and ``(300, 0.01, -0.02, 0)``'s 300 come out as 300.03 (approx): biased."""
    blocks = torch.tensor(DOMINANT_BLOCKS)
    mag = blocks.double().abs()
    top = mag.amax(1, keepdim=True)
    if approx:
        p = mag / mag.sum(1, keepdim=True)
        ratio = torch.where(p < 1, p / (1 - p), 0.0)
        inclusion = p + p * (ratio.sum(1, keepdim=True) - ratio)
    else:
        inclusion = torch.where(mag == top, 1.0, mag / (mag.sum(1, keepdim=True) - top))
    draws = 200
    expected = (blocks.double() / inclusion).t().repeat(1, draws)
    out = nmcompile.mvue_prune(
        blocks.t().repeat(1, draws), 2, 4, generator=torch.Generator().manual_seed(5), approx=approx
    )
    kept = out != 0
    assert bool((kept.sum(0) == 2).all())  # every block has at least 2 nonzeros
    assert torch.allclose(out[kept].double(), expected[kept], rtol=1e-6, atol=0)
    assert bool(kept[1:, 1::3].any(1).all())  # every small entry of the second block drawn at least once


@pytest.mark.parametrize("rule", ["mvue24", "mvue24_approx"])
def test_mvue24_draws_two_entries_at_uniforms_beside_every_interval_end(rule):
    """SPEC §7: every draw keeps exactly two entries (all nonzeros where a block has fewer), the
    dominant entry among them as is, and each kept entry is ``a_i / π_i``, also for the uniforms
    next to the ends of the sampling intervals. Ends summed in fp32 used to leave gaps and overlaps
    there: each of ``ROUNDING_BLOCKS`` kept one entry or dropped its dominant one at some uniform."""
    a, u = boundary_draws(rule)
    out = reference.mvue_prune_with(a, rule, 0, lambda index: u[: index.numel() // a.shape[1]].t().reshape(-1)[index])
    kept = out != 0
    assert torch.equal(kept.sum(0), (a != 0).sum(0).clamp(max=2))
    mag = a.double().abs()
    total, top = mag.sum(0), mag.amax(0)
    if rule == "mvue24":
        dominant = top > total - top
        inclusion = torch.where(dominant, torch.where(mag == top, 1.0, mag / (total - top)), 2 * mag / total)
        clear = (top > 1.001 * (total - top)) & (mag == top)
        assert torch.equal(out[clear], a[clear])
    else:
        p = mag / total
        ratio = torch.where(p < 1, p / (1 - p), 0.0)
        inclusion = p + p * (ratio.sum(0) - ratio)
    assert torch.allclose(out[kept].double(), (a.double() / inclusion)[kept], rtol=1e-5, atol=0)


@pytest.mark.parametrize("rule", ["mvue24", "mvue24_approx", "mvue12"])
def test_mvue_rules_keep_the_sum_of_a_non_finite_block_at_its_first_entry(rule):
    """README: a block whose magnitudes sum to NaN or inf (a NaN or inf entry, or finite entries past
    fp32's range together) comes out as that sum, with its first entry's sign, at its first entry
    and 0 elsewhere, in every draw: so a non-finite ``dY`` reaches ``dW`` as in a dense step. The
    finite blocks beside them are pruned as they are alone, with the same uniforms."""
    size, k = {"mvue12": (2, 1), "mvue24": (4, 1), "mvue24_approx": (4, 2)}[rule]
    draws = 200
    bad, expected = non_finite_blocks(size)
    good = _gradient()[:, 0]
    grad = torch.cat([bad, good])[:, None].repeat(1, draws)
    u = torch.rand(grad.numel() // size * k, generator=torch.Generator().manual_seed(0))
    out = reference.mvue_prune_with(grad, rule, 0, lambda index: u[index])
    torch.testing.assert_close(out[: len(bad)], expected[:, None].expand(-1, draws), rtol=0, atol=0, equal_nan=True)
    per_draw = u.view(draws, -1)[:, len(bad) // size * k :].reshape(-1)
    alone = reference.mvue_prune_with(good[:, None].repeat(1, draws), rule, 0, lambda index: per_draw[index])
    assert torch.equal(out[len(bad) :], alone)


@pytest.mark.parametrize(("n", "m", "approx"), [(1, 2, False), (2, 4, False), (2, 4, True)])
def test_mvue_in_fp16_keeps_at_most_twice_a_blocks_largest_entry(n, m, approx):
    """README: a kept value reaches up to twice its block's largest entry (``S/2`` of a block of
    equal entries), so an fp16 block of 32752s keeps 65504, fp16's largest, and one of 32768s
    keeps ``inf``; on random blocks every kept value stays within twice the block's largest."""
    generator = torch.Generator().manual_seed(5)
    for value, expected in ((32752.0, 65504.0), (32768.0, math.inf)):
        out = nmcompile.mvue_prune(torch.full((m, 64), value, dtype=torch.float16), n, m, 0, generator, approx)
        assert set(out.unique().tolist()) == {0.0, expected}
    grad = torch.rand(m, 4000, generator=generator, dtype=torch.float64) ** 4
    out = nmcompile.mvue_prune(grad, n, m, 0, generator, approx)
    assert bool((out.amax(0) <= 2 * grad.amax(0)).all())


def test_mvue24_samples_a_near_tie_as_dominant():
    """``reference.NEAR_TIE``: a largest entry within 2⁻¹⁸ of the sum of the others is kept as is
    in every draw, the others as ``±rest`` (the dominant case of SPEC §7); one 1/16 below that sum
    is sampled by the non-dominant case, kept with probability 2 · 1 / 2.0625, each as ``±S/2``."""
    near = torch.tensor([1.0, 0.5, 0.25, 0.25 + 2**-21])
    far = torch.tensor([1.0, 0.5, 0.25, 0.25 + 2**-4])
    out = nmcompile.mvue_prune(
        torch.stack([near, far], 1).repeat(1, 2000), 2, 4, generator=torch.Generator().manual_seed(4)
    )
    near_out, far_out = out[:, 0::2], out[:, 1::2]
    assert bool((near_out[0] == 1.0).all())
    assert set(near_out[1:][near_out[1:] != 0].tolist()) == {1.0 + 2**-21}
    dropped = int((far_out[0] == 0).sum())
    assert 20 <= dropped <= 105  # expected 2000 · 0.0625 / 2.0625 = 60.6
    assert set(far_out[far_out != 0].tolist()) == {1.03125}


@pytest.mark.parametrize(("rule", "n", "m", "approx"), [("mvue12", 1, 2, False), ("mvue24", 2, 4, False),
                                                        ("mvue24_approx", 2, 4, True)])  # fmt: skip
def test_mvue_keeps_a_lone_nonzero_as_is(rule, n, m, approx):
    """SPEC §7: a block whose only nonzero sits at any position keeps it unchanged in every draw (it
    is dominant with nothing beside it, so its inclusion probability is 1), and the zeros stay 0."""
    g = lone_nonzero_blocks(m).repeat(1, 250)
    out = nmcompile.mvue_prune(g, n, m, dim=0, generator=torch.Generator().manual_seed(8), approx=approx)
    assert torch.equal(out, g)


def test_mvue_pads_instead_of_dropping():
    """T % m != 0: zero padding for the pruning; shape kept, still unbiased, along any dim."""
    g = torch.randn(5, 7, generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(4)
    out = nmcompile.mvue_prune(g, 2, 4, dim=1, generator=generator)
    assert out.shape == g.shape
    samples = _samples(lambda t: nmcompile.mvue_prune(t, 2, 4, dim=0, generator=generator), g.t().contiguous())
    assert _unbiased(samples, g.t())
    with pytest.raises(ValueError, match="1:2 and 2:4"):
        nmcompile.mvue_prune(g, 1, 4)


@pytest.mark.parametrize(("shape", "dim"), [((8, 0), 0), ((0, 3), 0), ((5, 0, 2), 1), ((0,), 0)])
def test_mvue_of_an_empty_tensor_is_empty(shape, dim):
    """No entries along the blocks or no columns: an empty result of the same shape (the blocks'
    reshape once failed on zero columns)."""
    for n, m in ((1, 2), (2, 4)):
        out = nmcompile.mvue_prune(torch.randn(shape), n, m, dim=dim)
        assert out.shape == shape and out.dtype == torch.float32


def test_counter_uniforms_are_uniform_and_step_dependent():
    """The in-graph random stream: in [0, 1), mean ≈ 1/2, different per step and per key."""
    u = reference.counter_uniforms(7, torch.tensor(3), 100_000)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.005
    assert not torch.equal(u[:100], reference.counter_uniforms(7, torch.tensor(4), 100))
    assert not torch.equal(u[:100], reference.counter_uniforms(8, torch.tensor(3), 100))
    assert torch.equal(u[:100], reference.counter_uniforms(7, torch.tensor(3), 100))


def _lowbias32(x: int) -> int:
    """Chris Wellons' lowbias32 integer hash, in Python integers: an oracle for the tensor version."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@pytest.mark.parametrize(("key", "step"), [(0, 0), (7, 3), (0xFFFFFFFF, 2**33 + 5), (reference.prune_key(0, 1), 99)])
def test_counter_uniforms_are_the_documented_hash(key, step):
    """The MVUE stream is ``lowbias32(lowbias32((i mod 2³²) ^ s) ^ (i >> 32)) >> 8`` over 2²⁴ with
    ``s = lowbias32((step mod 2³²) ^ key)``: pinned by an independent computation, so that the kernels,
    a resumed run and another version of nmcompile draw the same numbers."""
    seed = _lowbias32((step & 0xFFFFFFFF) ^ key)
    expected = [(_lowbias32(_lowbias32(i ^ seed)) >> 8) * 2.0**-24 for i in range(64)]
    assert reference.counter_uniforms(key, torch.tensor(step), 64).tolist() == expected


@pytest.mark.parametrize(("rule", "shape", "dim"), [("mvue24_approx", (9, 3, 2), 0), ("mvue12", (3, 5), 1)])
def test_mvue_draws_its_stream_at_positions_laid_out_as_the_blocks(rule, shape, dim):
    """``mvue_prune_with`` asks for the uniforms of block ``b`` of column ``o`` (``B`` blocks a column,
    ``k`` draws a block) at stream positions ``(o·B + b)·k + j``, as a tensor ``[k, B, *columns]``
    shaped as the blocks, so a compiled graph hashes them where it uses them; ``counter_uniforms_at``
    of those positions is ``counter_uniforms`` read there."""
    _, m, k = reference.MVUE_RULES[rule]
    grad = torch.randn(shape)
    columns = grad.movedim(dim, 0).shape[1:]
    blocks = -(-shape[dim] // m)
    asked = []
    reference.mvue_prune_with(grad, rule, dim, lambda index: asked.append(index) or torch.rand(index.shape))
    o = torch.arange(columns.numel()).reshape(columns)
    b = torch.arange(blocks).reshape(-1, *[1] * len(columns))
    expected = torch.stack([(o * blocks + b) * k + j for j in range(k)])
    assert len(asked) == 1 and torch.equal(asked[0], expected)
    stream = reference.counter_uniforms(7, torch.tensor(3), expected.numel())
    assert torch.equal(reference.counter_uniforms_at(7, torch.tensor(3), expected), stream[expected])


@pytest.mark.parametrize("rule", ["mvue12", "mvue24", "mvue24_approx"])
def test_mvue_compiled_matches_reference(rule):
    """Fixed seed: compiled and reference agree on all (pruned) gradients and weights for 5 steps."""
    train_and_compare(MLP, (10, 32), grad_prune=rule, perm_interval=2, inner="aot_eager")


def test_all_recipes_together_compiled_matches_reference_on_convs():
    """bimask + mvue24 + mask decay on a conv block (BatchNorm, stride-2 downsample)."""
    options = {"grad_prune": "mvue24", "mask_decay": "linear", "mask_decay_rate": 0.2, "perm_interval": 2}
    train_and_compare(BasicBlock, (2, 16, 8, 8), inner="aot_eager", **options)


def test_weight_gradient_uses_the_pruned_dy_and_input_gradient_the_full_dy():
    """dW = mvue(dY)ᵀX with the layer's stream at this step; dX = dY·(W⊙B) from the unpruned dY."""
    layer = nn.Linear(16, 8, bias=False)
    compiled = torch.compile(layer, backend=nmcompile.backend(inner="aot_eager", grad_prune="mvue24", seed=5,
                                                              srste_lambda=0, backward="dense"))  # fmt: skip
    pruned_per_step = []
    for step in range(2):
        x = torch.randn(10, 16, requires_grad=True)
        dy = torch.randn(10, 8)
        compiled(x).backward(dy)
        key = reference.prune_key(5, 0)
        pruned = reference.mvue_prune_with(
            dy, "mvue24", 0, lambda index, s=step, k=key: reference.counter_uniforms_at(k, torch.tensor(s), index)
        )
        assert_close(layer.weight.grad, pruned.t() @ x.detach(), what=f"dW step {step}")
        w = layer.weight.detach()
        assert_close(x.grad, dy @ (w * reference.nm_mask(w, 2, 4, 1)), what="dX")
        pruned_per_step.append(pruned)
        layer.weight.grad = None
    assert not torch.equal(pruned_per_step[0], pruned_per_step[1]), "the stream must change with the step"
    report = nmcompile.explain(layer, torch.randn(10, 16).requires_grad_(), grad_prune="mvue24", inner="aot_eager")
    nodes = list(report.backward_graph.graph.nodes)
    assert not any(n.target is torch.ops.nmsparse.mvue_prune.default for n in nodes)  # on the CPU: the rule's steps
    prune = [n for n in nodes if n.name.startswith("weight_bwd_grad_prune")]
    assert prune[-1].name == "weight_bwd_grad_prune" and len(prune) > 100  # the step's result, the last
    others = [n.target for n in prune if n.target is not operator.getitem and not str(n.target).startswith("aten.")]
    assert others == [torch.ops.prims.inductor_force_stride_order.default]  # the token view made contiguous


class _Gained(nn.Module):
    """A first layer without bias, its outputs scaled per column before a sum."""

    def __init__(self, gain: torch.Tensor) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8, bias=False)
        self.register_buffer("gain", gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.fc(x) * self.gain).sum()


@pytest.mark.parametrize(("rule", "inner"), [("mvue24_approx", "inductor"), ("mvue24", "aot_eager"),
                                             ("mvue12", "aot_eager")])  # fmt: skip
def test_grad_scaler_skips_a_step_whose_pruned_dy_overflows_as_it_does_dense(rule, inner):
    """Column 0 of ``dY`` overflows under ``GradScaler``'s scale (2¹⁰⁰ · 1e30) in a first layer without
    bias, so its weight gradient is the only gradient to see it. The pruned ``dY`` keeps the inf, so
    the scaler skips the step and halves its scale, as for the dense model (the 2:4 rules once zeroed
    such blocks, and the step went ahead with that row's gradient lost)."""
    gain = torch.ones(8)
    gain[0] = 1e30
    dense = _Gained(gain)
    sparse = copy.deepcopy(dense)
    compiled = torch.compile(sparse, backend=nmcompile.backend(grad_prune=rule, inner=inner))
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    for model, run in ((dense, dense), (sparse, compiled)):
        before = model.fc.weight.detach().clone()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)
        scaler.scale(run(x)).backward()
        assert not model.fc.weight.grad.isfinite().all()
        scaler.step(opt)
        scaler.update()
        assert torch.equal(model.fc.weight, before) and scaler.get_scale() == 2.0**99
    rows = nmcompile.explain(sparse, x, grad_prune=rule, inner=inner).rows
    assert [(r.name, r.sparse) for r in rows] == [("fc.weight", True)]


def test_mvue_graphs_compile_with_inductors_gpu_opcount_threshold(monkeypatch):
    """Graphs with MVUE pruning compile with Inductor's realize_opcount_threshold at 30 (CPU default
    50 inlined the rule's values into every use: 51 s to compile a 3-layer MLP instead of 19 s);
    others keep Inductor's setting, and a threshold the user set wins."""
    import torch._inductor.compile_fx as compile_fx

    seen = []
    original = compile_fx.compile_fx_inner
    monkeypatch.setattr(
        compile_fx,
        "compile_fx_inner",
        lambda *a, **k: seen.append(torch._inductor.config.realize_opcount_threshold) or original(*a, **k),
    )
    layer = nn.Linear(16, 8)
    for grad_prune in ("mvue24", "none"):
        torch._dynamo.reset()
        with torch._inductor.utils.fresh_cache():
            compiled = torch.compile(layer, backend=nmcompile.backend(grad_prune=grad_prune))
            compiled(torch.randn(8, 16)).sum().backward()
    assert seen == [30, 30, None, None]  # forward and backward of each
    # a threshold the user set is left as it is (a third compile, at 40, took as long as these two)
    backend_module = sys.modules["nmcompile.backend"]  # the module (``nmcompile.backend`` is the function)
    mvue = nmcompile.SparsityConfig.from_options({"grad_prune": "mvue24"})
    assert backend_module._fusion_patches(mvue) == {"realize_opcount_threshold": 30}
    with torch._inductor.config.patch(realize_opcount_threshold=40):
        assert backend_module._fusion_patches(mvue) == {}


@pytest.mark.parametrize("curve", ["linear", "exponential"])
def test_mask_decay_forward_weights(curve):
    """SPEC §8: at step t the forward uses W ⊙ (F + (1−F)·α(t)), α = 1 before dense_steps."""
    layer = nn.Linear(16, 8)
    options = {"mask_decay": curve, "mask_decay_rate": 0.25, "dense_steps": 2, "inner": "aot_eager"}
    compiled = torch.compile(layer, backend=nmcompile.backend(**options))
    x = torch.randn(4, 16)
    w = layer.weight.detach()
    f = reference.nm_mask(w, 2, 4, 1)
    counters.clear()
    for t in range(9):
        expected_alpha = (
            1.0 if t < 2 else (max(0.0, 1 - 0.25 * (t - 2)) if curve == "linear" else math.exp(-0.25 * (t - 2)))
        )
        y = compiled(x)
        effective = w * (f + (~f) * expected_alpha)
        assert_close(y, x @ effective.t() + layer.bias, what=f"Y at step {t}")
        y.sum().backward()  # no optimizer: W stays, the schedule advances
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_mask_decay_float64_keeps_alpha_exact(inner):
    """A float64 layer takes α as float64: the forward and dX match the reference, which multiplies
    by the exact Python float, to float64 round-off (α = 0.9, 0.8, … rounded to fp32 were off by
    up to 2e-8 relative)."""
    torch.manual_seed(0)
    base = MLP(16, 32, 8).double()
    options = {"mask_decay": "linear", "mask_decay_rate": 0.1, "inner": inner}
    ref = reference.sparsify(copy.deepcopy(base), **options)
    mine = copy.deepcopy(base)
    compiled = torch.compile(mine, backend=nmcompile.backend(**options))
    for step in range(4):
        x = torch.randn(6, 16, dtype=torch.float64)
        x_ref, x_mine = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ref, y_mine = ref(x_ref), compiled(x_mine)
        torch.testing.assert_close(y_mine, y_ref, rtol=1e-13, atol=1e-14, msg=f"step {step} output")
        y_ref.square().sum().backward()
        y_mine.square().sum().backward()
        torch.testing.assert_close(x_mine.grad, x_ref.grad, rtol=1e-13, atol=1e-14, msg=f"step {step} dX")
        sgd_step_both(ref, mine, 0.1)
    assert nmcompile.sparsity_state(compiled)["fc1.weight"]["alpha"] == pytest.approx(1 - 0.1 * 4, abs=1e-15)


class _Blocks(nn.Module):
    """Two residual blocks, each run through ``calls`` (its compiled or reference module), inside a
    checkpoint where ``reentrant`` is set (as gradient checkpointing of compiled layers does)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16)) for _ in range(2))
        self.calls: list = list(self.blocks)
        self.reentrant: bool | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        for call in self.calls:
            x = x + (call(x) if self.reentrant is None else checkpoint(call, x, use_reentrant=self.reentrant))
        return x


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpoint_around_compiled_blocks_recomputes_the_same_step(reentrant):
    """A non-reentrant checkpoint reruns each block's forward inside the backward: that rerun uses
    the step, permutation, α and MVUE seed of the forward it recomputes and counts no step (it
    counted step t+1 and searched again, so gradients were off by up to 0.13). A reentrant
    checkpoint's first forward runs without grad and its rerun is the training step. Compiled and
    reference, checkpointed or not: equal gradients at every step, 4 steps counted."""
    options = {"perm_interval": 1, "grad_prune": "mvue24", "mask_decay": "linear", "mask_decay_rate": 0.1}
    base = _Blocks()
    runs = {}
    for kind in ("plain", "checkpointed"):
        for impl in ("compiled", "reference"):
            model = copy.deepcopy(base)
            if impl == "reference":  # per block, as compiled: each block's layers seed MVUE from 0
                model.calls = [reference.sparsify(block, **options) for block in model.blocks]
            else:
                backend = nmcompile.backend(inner="aot_eager", **options)
                model.calls = [torch.compile(block, backend=backend) for block in model.blocks]
            model.reentrant = reentrant if kind == "checkpointed" else None
            torch.manual_seed(1)
            grads = []
            for _ in range(4):
                x = torch.randn(8, 16, requires_grad=True)
                model(x).square().mean().backward()
                grads.append([p.grad.clone() for p in model.parameters()])
                with torch.no_grad():
                    for p in model.parameters():
                        p -= 0.05 * p.grad
                        p.grad = None
            state = nmcompile.sparsity_state(model)
            assert {s["step"] for s in state.values()} == {4} and len(state) == 4, (kind, impl)
            runs[kind, impl] = grads
    for key, grads in runs.items():
        for step, (got, expected) in enumerate(zip(grads, runs["plain", "reference"], strict=True)):
            for g, e in zip(got, expected, strict=True):
                assert_close(g, e, what=f"{key} step {step}")


def test_an_evaluation_on_another_thread_leaves_a_checkpoint_recompute_alone():
    """A no-grad forward of the blocks on another thread (a background evaluation) between a
    non-reentrant checkpoint's forward and its backward: the rerun still recomputes the training
    forward, as grad mode and the backward are per thread. It forgot that forward and ran a new
    step, which searched again and drew other MVUE numbers (weights 1e-2 off the run without it,
    where dense torch.compile's are equal)."""
    base = _Blocks()
    runs = {}
    for evaluate in (False, True):
        model = copy.deepcopy(base)
        backend = nmcompile.backend(inner="aot_eager", perm_interval=1, grad_prune="mvue24")
        model.calls = [torch.compile(block, backend=backend) for block in model.blocks]
        model.reentrant = False
        torch.manual_seed(1)
        runs[evaluate] = []
        for _ in range(3):
            loss = model(torch.randn(8, 16, requires_grad=True)).square().mean()
            if evaluate:
                thread = threading.Thread(target=_evaluate, args=(model.calls,))
                thread.start()
                thread.join()
            loss.backward()
            runs[evaluate].append([p.grad.clone() for p in model.parameters()])
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.05 * p.grad
                    p.grad = None
        state = nmcompile.sparsity_state(model)
        assert {(s["step"], s["last_search_step"]) for s in state.values()} == {(3, 2)}, evaluate
    for step, (got, expected) in enumerate(zip(runs[True], runs[False], strict=True)):
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=0, atol=0, msg=f"step {step}")


def _evaluate(calls: list) -> None:
    """Each block's forward under no grad, on ones (the global generator is the training's)."""
    with torch.no_grad():
        for call in calls:
            call(torch.ones(8, 16))


def test_mask_decay_input_gradient():
    """With mask decay, dX = dY · (W ⊙ (B + (1−B)·α)) for Bi-Mask."""
    layer = nn.Linear(16, 8, bias=False)
    compiled = torch.compile(layer, backend=nmcompile.backend(mask_decay="linear", mask_decay_rate=0.3,
                                                              inner="aot_eager"))  # fmt: skip
    for _ in range(2):
        compiled(torch.randn(3, 16)).sum().backward()
    alpha = nmcompile.sparsity_state(layer)["weight"]["alpha"]
    assert alpha == pytest.approx(0.4)
    x = torch.randn(3, 16, requires_grad=True)
    dy = torch.randn(3, 8)
    compiled(x).backward(dy)
    w = layer.weight.detach()
    f = reference.nm_mask(w, 2, 4, 1)
    b = reference.backward_mask(w, f, nmcompile.sparsity_state(layer)["weight"]["perm"], 2, 4)
    assert_close(x.grad, dy @ (w * (b + (~b) * alpha)), what="dX")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("decay", ["mask", "structure"])
@pytest.mark.parametrize("kernels", ["portable", "triton"])
def test_decay_steps_on_cuda_do_not_synchronise(kernels, decay):
    """A decay step hands α and the N in force to the graph without waiting for the GPU (a copy
    from pageable memory synchronises the stream, so every step would wait for the one before):
    CUDA's sync debug mode raises on any synchronising call in the steps after compiling and the
    step-0 search. The N in force stays a 0-d CPU tensor, which Inductor's GPU kernels read as a
    scalar argument."""
    torch.manual_seed(0)
    model = MLP(64, 128, 64).cuda()
    options = {"perm_interval": 1000, "kernels": kernels}
    if decay == "mask":
        options.update(mask_decay="linear", mask_decay_rate=0.1)
    else:
        options.update(structure_decay=True, total_steps=8)
    compiled = torch.compile(model, backend=nmcompile.backend(**options))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(32, 64, device="cuda")

    def step() -> None:
        optimizer.zero_grad()
        compiled(x).square().mean().backward()
        optimizer.step()

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    state = nmcompile.sparsity_state(model)["fc1.weight"]
    assert state["step"] == 5
    if decay == "mask":
        assert state["alpha"] == pytest.approx(0.5)
    else:
        assert state["n_effective"] == 2


def test_structure_decay_walks_7_4_2_1_of_8():
    """SPEC §8: target 1:8, frames of 8 steps between dense_steps=4 and total−finetune = 36."""
    layer = nn.Linear(16, 16)
    options = {"n": 1, "m": 8, "structure_decay": True, "total_steps": 40, "dense_steps": 4, "finetune_steps": 4,
               "inner": "aot_eager"}  # fmt: skip
    compiled = torch.compile(layer, backend=nmcompile.backend(**options))
    x = torch.randn(4, 16)
    w = layer.weight.detach()
    counters.clear()
    walk = []
    for t in range(40):
        n_t = 8 if t < 4 else [7, 4, 2, 1][min((t - 4) // 8, 3)]
        y = compiled(x)
        assert_close(y, x @ (w * reference.nm_mask(w, n_t, 8, 1)).t() + layer.bias, what=f"Y at step {t}")
        walk.append(nmcompile.sparsity_state(layer)["weight"]["n_effective"])
        y.sum().backward()
    # walk[t] is read after step t's forward, so it shows N of step t + 1
    assert walk[2:4] == [8, 7] and walk[10:12] == [7, 4] and walk[18:20] == [4, 2] and walk[26:28] == [2, 1]
    assert counters["stats"]["unique_graphs"] == 1


def test_report_rows_carry_the_n_in_force():
    """``LayerRow.n_effective`` is the N in force (structure decay), beside the option's target N:
    after 12 steps of a 1:8 walk, 4 (the ``now`` column's)."""
    layer = nn.Linear(16, 16)
    options = {"n": 1, "m": 8, "structure_decay": True, "total_steps": 40, "dense_steps": 4, "finetune_steps": 4,
               "inner": "aot_eager"}  # fmt: skip
    compiled = torch.compile(layer, backend=nmcompile.backend(**options))
    x = torch.randn(4, 16)
    for _ in range(12):
        compiled(x).sum().backward()
    (row,) = nmcompile.explain(layer, x, **options).rows
    assert (row.nm, row.now, row.n_effective, row.alpha) == ("1:8", "t=12 4:8", 4, None)


def test_structure_decay_with_the_transposable_mask_follows_the_reference():
    """Structure decay with ``backward="transposable"``: N walks 3, 2 of 4, and the compiled layers
    follow the reference at every step, so the transposable mask takes the N in force too (it was
    given only the target N, and no test combined the two options)."""
    train_and_compare(
        MLP, (8, 32), steps=4, backward="transposable", structure_decay=True, total_steps=4, inner="aot_eager"
    )


def test_report_shows_effective_nm_and_decay_factor():
    """The table's `now` column follows the schedule; FLOPs count no N:M GEMM while α > 0."""
    model = MLP()
    options = {"mask_decay": "linear", "mask_decay_rate": 0.5, "inner": "aot_eager"}
    compiled = torch.compile(model, backend=nmcompile.backend(**options))
    x = torch.randn(4, 32)
    row = next(r for r in nmcompile.explain(model, x, **options).rows if r.name == "fc1.weight")
    assert (row.now, row.alpha) == ("t=0 2:4 α=1", 1.0)
    assert row.flops["forward"][0] == row.flops["forward"][1]
    for _ in range(2):
        compiled(x).sum().backward()
    row = next(r for r in nmcompile.explain(model, x, **options).rows if r.name == "fc1.weight")
    assert (row.now, row.alpha) == ("t=2 2:4 α=0", 0.0)
    assert row.flops["forward"][1] == row.flops["forward"][0] // 2
    assert nmcompile.sparsity_state(model)["fc1.weight"]["step"] == 2, "explain must not advance the user's state"


def test_checkpoint_restores_state_loaded_before_or_after_compile():
    """state_dict() carries perm and step in _metadata (no extra keys); load_state_dict brings them
    back whether the model was compiled before the load or only afterwards, or sparsified by the
    reference only afterwards."""
    options = {"inner": "aot_eager", "perm_interval": 2, "grad_prune": "mvue24"}
    trained = MLP()
    compiled = torch.compile(trained, backend=nmcompile.backend(**options))
    for _ in range(3):
        compiled(torch.randn(4, 32)).sum().backward()
    checkpoint = trained.state_dict()
    assert set(checkpoint) == set(MLP().state_dict())
    assert nn.Module.load_state_dict(MLP(), checkpoint, strict=True) is not None  # a plain model loads it
    expected = nmcompile.sparsity_state(trained)
    late = MLP()
    late.load_state_dict(checkpoint)  # before compile
    torch.compile(late, backend=nmcompile.backend(**options))(torch.randn(4, 32))
    early = MLP()
    early_compiled = torch.compile(early, backend=nmcompile.backend(**options))
    early_compiled(torch.randn(4, 32))
    early.load_state_dict(checkpoint)  # after compile
    before_sparsify = MLP()
    before_sparsify.load_state_dict(checkpoint)  # held for the nn.Linear layers that sparsify swaps out
    reference.sparsify(before_sparsify, **options)
    for model, extra_steps in ((late, 1), (early, 0), (before_sparsify, 0)):
        got = nmcompile.sparsity_state(model)
        for name, s in expected.items():
            assert got[name]["step"] == s["step"] + extra_steps and torch.equal(got[name]["perm"], s["perm"])
    assert before_sparsify.state_dict()._metadata["fc1"]["nmsparse"]["weight"]["step"] == 3


@pytest.mark.parametrize("where", ["first call", "load_state_dict", "SparsityStates"])
def test_states_made_under_inference_mode_train_afterwards(where):
    """A checkpoint load or a ``SparsityStates`` load under ``torch.inference_mode()`` (in an
    evaluation routine), or a first compiled call there: the permutation it makes is no inference
    tensor, so the training steps after it run (the graphs save ``P`` for the backward: after
    either load each step raised "Inference tensors cannot be saved for backward") and give what
    the same calls under ``no_grad`` give, bit for bit."""
    options = {"inner": "aot_eager", "perm_interval": 2}
    torch.manual_seed(0)
    trained = MLP()
    compiled = torch.compile(trained, backend=nmcompile.backend(**options))
    for _ in range(3):
        compiled(torch.randn(4, 32)).sum().backward()
    checkpoint, states = copy.deepcopy(trained.state_dict()), nmcompile.SparsityStates(trained).state_dict()
    x = torch.randn(4, 32)
    results = []
    for mode in (torch.no_grad, torch.inference_mode):
        torch._dynamo.reset()  # a first call compiles under the mode (a graph compiled under the other was reused)
        torch.manual_seed(1)
        model = MLP()
        forward = torch.compile(model, backend=nmcompile.backend(**options))
        if where != "first call":
            forward(x).sum().backward()
        with mode():
            if where == "first call":
                forward(x)
            elif where == "load_state_dict":
                model.load_state_dict(checkpoint)
            else:
                nmcompile.SparsityStates(model).load_state_dict(states)
        losses = []
        for _ in range(3):
            loss = forward(x).square().mean()
            loss.backward()
            losses.append(loss.item())
        results.append((losses, [p.grad.clone() for p in model.parameters()], nmcompile.sparsity_state(model)))
    (losses, grads, state), (got_losses, got_grads, got_state) = results
    assert got_losses == losses
    assert all(torch.equal(a, b) for a, b in zip(got_grads, grads, strict=True))
    assert {k: (s["step"], s["perm"].tolist()) for k, s in got_state.items()} == {
        k: (s["step"], s["perm"].tolist()) for k, s in state.items()
    }


class _Wrapped(nn.Module):
    """``module.``-prefixed parameter names, as a DDP-wrapped model saves them."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.module = inner

    def forward(self, x):
        return self.module(x)


def test_checkpoint_keys_renamed_by_a_load_pre_hook_restore_the_states():
    """A load pre-hook that renames the checkpoint's keys (``consume_prefix_in_state_dict_if_present``
    on a DDP checkpoint) loads the states with the weights: the loaded weights are the ones torch
    counts after the hooks, not the caller's keys (the states were dropped, with no warning)."""
    from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

    options = {"inner": "aot_eager", "perm_interval": 2}
    trained = _Wrapped(MLP())
    compiled = torch.compile(trained, backend=nmcompile.backend(**options))
    for _ in range(3):
        compiled(torch.randn(4, 32)).sum().backward()
    expected = {name.removeprefix("module."): s for name, s in nmcompile.sparsity_state(trained).items()}
    model = MLP()
    model.register_load_state_dict_pre_hook(
        lambda module, state_dict, prefix, *args: consume_prefix_in_state_dict_if_present(state_dict, "module.")
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.load_state_dict(trained.state_dict())
    assert not [w for w in caught if "nmsparse" in str(w.message)]  # no layer restarts
    torch.compile(model, backend=nmcompile.backend(**options))(torch.randn(4, 32))
    got = nmcompile.sparsity_state(model)
    assert sorted(got) == sorted(expected) and len(got) == 3
    for name, s in expected.items():
        assert got[name]["step"] == s["step"] + 1 == 4 and torch.equal(got[name]["perm"], s["perm"]), name


@pytest.mark.parametrize("wrapped", [(True, False), (False, True)], ids=["wrapped_to_plain", "plain_to_wrapped"])
def test_checkpoint_moves_between_models_with_and_without_checkpoint_wrappers(wrapped):
    """torch's ``checkpoint_wrapper`` (activation checkpointing, as torchtitan applies it) strips its
    ``_checkpoint_wrapped_module`` step from state_dict keys but not from ``_metadata``: the states
    still find their layers when a checkpoint moves between a model with the wrappers and one
    without (every wrapped layer restarted at step 0, silently)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    def make(wrap: bool) -> nn.Module:
        torch.manual_seed(0)
        model = MLP()
        if wrap:
            model.fc1, model.fc2 = checkpoint_wrapper(model.fc1), checkpoint_wrapper(model.fc2)
        return model

    options = {"inner": "aot_eager", "perm_interval": 1}
    trained = make(wrapped[0])
    compiled = torch.compile(trained, backend=nmcompile.backend(**options))
    for _ in range(2):
        compiled(torch.randn(4, 32)).sum().backward()
    unwrap = lambda name: name.replace("._checkpoint_wrapped_module", "")  # noqa: E731
    expected = {unwrap(name): s for name, s in nmcompile.sparsity_state(trained).items()}
    model = make(wrapped[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.load_state_dict(trained.state_dict())
    with torch.no_grad():
        torch.compile(model, backend=nmcompile.backend(**options))(torch.randn(4, 32))
    got = {unwrap(name): s for name, s in nmcompile.sparsity_state(model).items()}
    assert sorted(got) == sorted(expected) == ["fc1.weight", "fc2.weight", "head.weight"]
    for name, s in expected.items():
        assert got[name]["step"] == s["step"] == 2 and torch.equal(got[name]["perm"], s["perm"]), name


@pytest.mark.parametrize(
    "perm,problem",
    [
        (torch.zeros(64, dtype=torch.int64), "is not a permutation of range(64)"),
        (torch.arange(1, 65), "is not a permutation of range(64)"),
        (torch.arange(32), "has 32 rows, the layer has 64"),
        (torch.arange(64, dtype=torch.int32), "is not an int64 tensor (torch.int32)"),
    ],
    ids=["repeated", "out_of_range", "short", "int32"],
)
def test_checkpoint_with_a_bad_permutation_is_refused(perm, problem):
    """The kernels index rows with ``P``: a checkpoint whose ``perm`` is no permutation of the
    layer's rows is refused with a warning naming the problem, and the layer keeps its state."""
    model = MLP()
    compiled = torch.compile(model, backend=nmcompile.backend(inner="aot_eager", perm_interval=1))
    for _ in range(2):
        compiled(torch.randn(4, 32)).sum().backward()
    before = nmcompile.sparsity_state(model)["fc1.weight"]
    checkpoint = model.state_dict()
    checkpoint._metadata["fc1"]["nmsparse"]["weight"] = {"perm": perm, "step": 9, "last_search_step": 9}
    with pytest.warns(UserWarning, match=re.escape(f"permutation for fc1.weight {problem}; keeping the current")):
        model.load_state_dict(checkpoint)
    after = nmcompile.sparsity_state(model)["fc1.weight"]
    assert after["step"] == before["step"] == 2 and torch.equal(after["perm"], before["perm"])


def test_grouped_conv_checkpoint_permutation_stays_in_its_groups():
    """A grouped convolution's permutation must keep each row inside its group (SPEC §5 per group)."""
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=2))
    compiled = torch.compile(model, backend=nmcompile.backend(inner="aot_eager"))
    compiled(torch.randn(1, 8, 6, 6)).sum().backward()
    checkpoint = model.state_dict()
    swapped = torch.tensor([4, 1, 2, 3, 0, 5, 6, 7])  # rows 0 and 4 trade groups
    checkpoint._metadata["0"]["nmsparse"]["weight"] = {"perm": swapped, "step": 5, "last_search_step": 0}
    with pytest.warns(UserWarning, match="moves rows between the 2 groups"):
        model.load_state_dict(checkpoint)
    assert nmcompile.sparsity_state(model)["0.weight"]["step"] == 1
    within = torch.tensor([1, 0, 2, 3, 4, 5, 7, 6])
    checkpoint._metadata["0"]["nmsparse"]["weight"] = {"perm": within, "step": 5, "last_search_step": 0}
    model.load_state_dict(checkpoint)
    state = nmcompile.sparsity_state(model)["0.weight"]
    assert state["step"] == 5 and torch.equal(state["perm"], within) and state["last_search_step"] == 0


def test_old_checkpoint_warns_once_and_starts_fresh():
    """A checkpoint without sparsity state loads; one warning; the layers restart at step 0."""
    model = MLP()
    compiled = torch.compile(model, backend=nmcompile.backend(inner="aot_eager", perm_interval=1))
    for _ in range(2):
        compiled(torch.randn(4, 32)).sum().backward()
    plain = {k: v.clone() for k, v in MLP().state_dict().items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.load_state_dict(plain)
        model.load_state_dict(plain)
    messages = [str(w.message) for w in caught if "nmsparse" in str(w.message)]
    assert len(messages) == 1 and "no sparsity state" in messages[0]
    assert "expected where sparse training starts from dense weights; to resume a sparse run" in messages[0]
    state = nmcompile.sparsity_state(model)["fc1.weight"]
    assert state["step"] == 0 and torch.equal(state["perm"], torch.arange(64))


@pytest.mark.parametrize("runner", ["compiled", "reference"])
def test_old_checkpoint_loaded_before_compile_warns_at_the_first_forward(runner):
    """Loaded into a fresh model before it is compiled (or sparsified), a checkpoint without
    sparsity state warns once the layers get their states: one warning naming every layer that
    restarts, and again for the next model loaded so; they start at step 0."""
    for _ in range(2):
        model = MLP()
        model.load_state_dict({k: v.clone() for k, v in MLP().state_dict().items()})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if runner == "compiled":
                run = torch.compile(model, backend=nmcompile.backend(inner="aot_eager"))
            else:
                run = reference.sparsify(model, n=2, m=4)
            run(torch.randn(4, 32)).sum().backward()
            run(torch.randn(4, 32)).sum().backward()
        messages = [str(w.message) for w in caught if "nmsparse" in str(w.message)]
        assert len(messages) == 1, messages
        assert "no sparsity state for fc1.weight, fc2.weight, head.weight;" in messages[0]
        assert [s["step"] for s in nmcompile.sparsity_state(model).values()] == [2, 2, 2]


def test_a_later_checkpoint_without_states_drops_one_held_for_the_first_forward():
    """Two loads before the first compiled forward, a trained checkpoint and then one without
    sparsity state: the last load wins, as after a forward. ``state_dict()`` holds no state, and
    the layers restart at step 0 with the old-checkpoint warning (the held state of the first load
    was saved and used, silently)."""
    _, checkpoint = _trained(3, {"inner": "aot_eager", "perm_interval": 1})
    model = MLP()
    model.load_state_dict(checkpoint)
    model.load_state_dict({k: v.clone() for k, v in MLP().state_dict().items()})
    assert not any("nmsparse" in entry for entry in model.state_dict()._metadata.values())  # nothing held
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        torch.compile(model, backend=nmcompile.backend(inner="aot_eager", perm_interval=1))(torch.randn(4, 32))
    messages = [str(w.message) for w in caught if "nmsparse" in str(w.message)]
    assert len(messages) == 1 and "no sparsity state for fc1.weight, fc2.weight, head.weight;" in messages[0]
    for state in nmcompile.sparsity_state(model).values():
        assert state["step"] == 0 and torch.equal(state["perm"], torch.arange(len(state["perm"])))


def _trained(steps: int, options: dict) -> tuple[nn.Module, dict]:
    """An MLP after ``steps`` compiled training steps, and its checkpoint."""
    model = MLP()
    compiled = torch.compile(model, backend=nmcompile.backend(**options))
    for _ in range(steps):
        compiled(torch.randn(4, 32)).sum().backward()
    return model, model.state_dict()


def test_assign_load_after_compile_moves_the_state_to_the_new_parameters():
    """``load_state_dict(..., assign=True)`` after the first compiled forward puts new Parameters in
    the module; the compiled graph (not recompiled) and the next checkpoint follow the loaded state."""
    options = {"inner": "aot_eager", "perm_interval": 2}
    trained, checkpoint = _trained(5, options)
    expected = nmcompile.sparsity_state(trained)
    model = MLP()
    compiled = torch.compile(model, backend=nmcompile.backend(**options))
    compiled(torch.randn(4, 32)).sum().backward()
    old = model.fc1.weight
    model.load_state_dict(checkpoint, assign=True)
    assert model.fc1.weight is not old
    compiled(torch.randn(4, 32)).sum().backward()
    got = nmcompile.sparsity_state(model)
    assert got.keys() == expected.keys()
    for name, s in expected.items():
        assert got[name]["step"] == s["step"] + 1 == 6 and torch.equal(got[name]["perm"], s["perm"]), name
    saved = model.state_dict()._metadata
    assert all(saved[name.rsplit(".", 1)[0]]["nmsparse"]["weight"]["step"] == 6 for name in expected)


def test_new_parameters_in_a_layers_place_keep_its_state():
    """``.double()`` under ``set_overwrite_module_params_on_conversion(True)`` and ``layer.weight =
    nn.Parameter(...)`` put new Parameters in the layers: the states (step, permutation) follow them,
    in ``sparsity_state``, the next checkpoint and the next step; a weight of other rows starts afresh,
    and so does a stand-in while the weight it stands in for lives (``torch.func.functional_call``)."""
    options = {"inner": "aot_eager", "perm_interval": 1}
    model, _ = _trained(3, options)
    compiled = torch.compile(model, backend=nmcompile.backend(**options))
    expected = nmcompile.sparsity_state(model)
    flag = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        old = weakref.ref(model.fc1.weight)
        model.double()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(flag)
    assert old() is None  # a new Parameter, and the old one is gone
    got = nmcompile.sparsity_state(model)
    assert {k: (s["step"], s["perm"].tolist()) for k, s in got.items()} == {
        k: (s["step"], s["perm"].tolist()) for k, s in expected.items()
    }
    assert model.state_dict()._metadata["fc1"]["nmsparse"]["weight"]["step"] == 3
    model.fc2.weight = nn.Parameter(model.fc2.weight.detach().clone())
    compiled(torch.randn(4, 32, dtype=torch.float64)).sum().backward()
    assert {k: s["step"] for k, s in nmcompile.sparsity_state(model).items()} == {k: 4 for k in expected}
    stand_ins = {name: nn.Parameter(p.detach().clone()) for name, p in model.named_parameters()}
    torch.func.functional_call(compiled, stand_ins, (torch.randn(4, 32, dtype=torch.float64),)).sum().backward()
    assert {k: s["step"] for k, s in nmcompile.sparsity_state(model).items()} == {k: 4 for k in expected}
    assert model.state_dict()._metadata["fc1"]["nmsparse"]["weight"]["step"] == 4  # the slot stays the model's
    model.head.weight = nn.Parameter(torch.randn(12, 64, dtype=torch.float64))  # other rows: a new state
    model.head.bias = nn.Parameter(torch.zeros(12, dtype=torch.float64))
    compiled(torch.randn(4, 32, dtype=torch.float64)).sum().backward()
    assert nmcompile.sparsity_state(model)["head.weight"]["step"] == 1


def test_a_new_parameter_in_a_layers_place_trains_as_the_reference():
    """``layer.weight = nn.Parameter(...)`` mid-training, the optimizer rebuilt and the last loss
    dropped: the backend's layer carries its state over to the new weight, and the reference runs
    the new weight on the layer's state; both search permutations on the new weight (the
    reference scored the Parameter it replaced), so weights and permutations stay equal."""
    options = {"perm_interval": 1, "perm_candidates": 8}
    torch.manual_seed(0)
    model = MLP()
    ref_model = reference.sparsify(copy.deepcopy(model), **options)
    compiled = torch.compile(model, backend=nmcompile.backend(inner="aot_eager", **options))
    replacement = torch.randn(64, 64, generator=torch.Generator().manual_seed(5)) * 0.1
    x = torch.randn(4, 32)
    for m, forward in ((model, compiled), (ref_model, ref_model)):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for step in range(4):
            if step == 2:
                m.fc2.weight = nn.Parameter(replacement.clone())
                opt, loss = torch.optim.SGD(m.parameters(), lr=0.1), None
            opt.zero_grad()
            loss = forward(x).square().mean()
            loss.backward()
            opt.step()
    for name, p in ref_model.named_parameters():
        assert_close(model.get_parameter(name), p, what=name)
    state = nmcompile.sparsity_state(model)["fc2.weight"]
    assert state["step"] == ref_model.fc2.rule.state.step == 4
    assert torch.equal(state["perm"], ref_model.fc2.rule.state.perm)


def test_fast_weights_through_functional_call_run_dense_in_both():
    """A MAML-style outer step: the query forward runs on fast weights ``p − lr·g`` (plain tensors)
    through ``torch.func.functional_call``. SPEC §10 rewrites Parameters only, so both the backend
    and the reference run it dense and count no step for it (the reference ran it sparse on the
    layer's state), and the outer gradients agree. A view (a sub-head's rows) is dense too."""
    torch.manual_seed(0)
    model = MLP()
    ref_model = reference.sparsify(copy.deepcopy(model), grad_prune="mvue24")
    compiled = torch.compile(model, backend=nmcompile.backend(inner="aot_eager", grad_prune="mvue24"))
    x, xq = torch.randn(8, 32), torch.randn(8, 32)

    def outer_step(params_of: nn.Module, forward) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        params = dict(params_of.named_parameters())
        grads = torch.autograd.grad(forward(x).square().mean(), list(params.values()))
        fast = {k: p - 0.1 * g for (k, p), g in zip(params.items(), grads, strict=True)}
        yq = torch.func.functional_call(forward, fast, (xq,))
        yq.square().mean().backward()
        dense = torch.func.functional_call(MLP(), {k: v.detach() for k, v in fast.items()}, (xq,))
        assert_close(yq, dense, what="the query forward on the fast weights: dense")
        return yq.detach(), {k: p.grad for k, p in params.items()}

    y_ref, grads_ref = outer_step(ref_model, ref_model)
    y, grads = outer_step(model, compiled)
    assert_close(y, y_ref, what="query output")
    for name, grad in grads.items():
        assert_close(grad, grads_ref[name], what=f"outer gradient of {name}")
    steps = {k: s["step"] for k, s in nmcompile.sparsity_state(model).items()}
    assert steps == {k: s["step"] for k, s in nmcompile.sparsity_state(ref_model).items()} == dict.fromkeys(steps, 1)
    views = {"head.weight": ref_model.head.weight[:8], "head.bias": ref_model.head.bias[:8]}  # a sub-head: views
    y_view = torch.func.functional_call(ref_model, views, (xq,))  # on the head's 16-row state it raised
    hidden = torch.relu(ref_model.fc2(nn.functional.gelu(ref_model.fc1(xq))))
    assert_close(y_view, nn.functional.linear(hidden, *views.values()), what="the sub-head, dense")
    assert nmcompile.sparsity_state(ref_model)["head.weight"]["step"] == 1


def test_a_new_parameter_tied_into_two_trained_layers_takes_one_state_at_most():
    """``a.weight = b.weight = p`` after training: ``p`` takes over the state of the layer it is asked
    for first (``a``), and never writes it into the other layer's checkpoint."""

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    model = Two()
    compiled = torch.compile(model, backend=nmcompile.backend(inner="aot_eager", perm_interval=1, perm_candidates=16))
    for _ in range(3):
        compiled(torch.randn(4, 16)).sum().backward()
    perms = {k: s["perm"] for k, s in nmcompile.sparsity_state(model).items()}
    assert not torch.equal(perms["a.weight"], perms["b.weight"])
    model.a.weight = model.b.weight = nn.Parameter(torch.randn(16, 16))
    metadata = model.state_dict()._metadata
    assert torch.equal(metadata["a"]["nmsparse"]["weight"]["perm"], perms["a.weight"])
    assert "nmsparse" not in metadata["b"]
    assert torch.equal(nmcompile.sparsity_state(model)["a.weight"]["perm"], perms["a.weight"])


class _Three(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _sgd_steps(model: nn.Module, forward, steps: int, seed: int) -> list[float]:
    """``steps`` plain SGD steps on a square loss, batches drawn from ``seed``; the losses."""
    generator, losses = torch.Generator().manual_seed(seed), []
    for _ in range(steps):
        loss = forward(torch.randn(5, 32, generator=generator)).square().mean()
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
        losses.append(loss.item())
    return losses


def _after_three_steps(make: Callable[[], nn.Module], options: dict) -> tuple[nn.Module, nn.Module, dict]:
    """A seeded ``make()`` model compiled with ``options`` after 3 SGD steps: it, its compiled
    wrapper, and each layer's permutation then."""
    torch.manual_seed(0)
    model = make()
    compiled = torch.compile(model, backend=nmcompile.backend(**options))
    _sgd_steps(model, compiled, 3, seed=1)
    return model, compiled, {k: s["perm"] for k, s in nmcompile.sparsity_state(model).items()}


def _resume_goes_on_as_the_run(make: Callable[[], nn.Module], compiled: nn.Module, checkpoint: dict, options: dict):
    """A fresh ``make()`` model loading ``checkpoint`` takes the same next 3 steps (losses) as the
    compiled run it was taken from, going on."""
    continued = _sgd_steps(compiled._orig_mod, compiled, 3, seed=3)
    resumed_model = make()
    resumed_model.load_state_dict(checkpoint)
    resumed = _sgd_steps(resumed_model, torch.compile(resumed_model, backend=nmcompile.backend(**options)), 3, seed=3)
    assert resumed == continued


def test_layers_that_swap_their_parameters_keep_the_states_in_checkpoints():
    """``fc1.weight, fc2.weight = fc2.weight, fc1.weight`` after training: each state follows its
    Parameter into the other layer's checkpoint, before the next step and after (both layers'
    states used to be left out of every checkpoint from then on), and a resume from one continues
    exactly as the run that was not stopped."""
    options = {"inner": "aot_eager", "perm_interval": 1, "perm_candidates": 8}
    model, compiled, perms = _after_three_steps(_Three, options)
    model.fc1.weight, model.fc2.weight = model.fc2.weight, model.fc1.weight
    metadata = model.state_dict()._metadata
    for layer, came_from in (("fc1", "fc2"), ("fc2", "fc1")):
        assert torch.equal(metadata[layer]["nmsparse"]["weight"]["perm"], perms[f"{came_from}.weight"])
    _sgd_steps(model, compiled, 2, seed=2)
    checkpoint = copy.deepcopy(model.state_dict())
    assert {k: v["nmsparse"]["weight"]["step"] for k, v in checkpoint._metadata.items() if "nmsparse" in v} == {
        "fc1": 5,
        "fc2": 5,
        "fc3": 5,
    }
    _resume_goes_on_as_the_run(_Three, compiled, checkpoint, options)


class _Projection(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(32, 32) / 32**0.5)

    def forward(self, x):
        return nn.functional.linear(x, self.W)


class _NamedApart(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.proj, self.fc3 = nn.Linear(32, 32), _Projection(), nn.Linear(32, 32)

    def forward(self, x):
        return self.fc3(torch.relu(self.proj(torch.relu(self.fc1(x)))))


def test_parameters_swapped_between_slots_of_different_names_keep_the_states_in_checkpoints():
    """``fc1.weight, proj.W = proj.W, fc1.weight``, checkpointed before the next step: each state
    follows its Parameter into the other slot's checkpoint entry (both were left out until the
    next step), and a resume from that checkpoint continues exactly as the run that went on."""
    options = {"inner": "aot_eager", "perm_interval": 1, "perm_candidates": 8}
    model, compiled, perms = _after_three_steps(_NamedApart, options)
    model.fc1.weight, model.proj.W = model.proj.W, model.fc1.weight
    checkpoint = copy.deepcopy(model.state_dict())
    assert torch.equal(checkpoint._metadata["fc1"]["nmsparse"]["weight"]["perm"], perms["proj.W"])
    assert torch.equal(checkpoint._metadata["proj"]["nmsparse"]["W"]["perm"], perms["fc1.weight"])
    _resume_goes_on_as_the_run(_NamedApart, compiled, checkpoint, options)


class _TwoSlots(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.W1, self.W2 = nn.Parameter(torch.randn(32, 32) / 6), nn.Parameter(torch.randn(32, 32) / 6)
        self.inner = nn.Linear(32, 32)

    def forward(self, x):
        return self.inner(torch.relu(nn.functional.linear(torch.relu(nn.functional.linear(x, self.W1)), self.W2)))


def test_swaps_inside_a_module_and_a_move_into_two_slots_keep_one_state_each():
    """Two slots of one module swapped (``W1, W2 = W2, W1``, as separate q/k/v weights) and a slot
    swapped with its child's (``W1 <-> inner.weight``): the checkpoint carries each state under its
    Parameter's new slot at once (none, or one, was carried). A Parameter then put into two slots
    gives its state to the first one only (README: a tied Parameter's state goes to one layer)."""
    options = {"inner": "aot_eager", "perm_interval": 1, "perm_candidates": 8}
    model, _, perms = _after_three_steps(_TwoSlots, options)

    def saved() -> dict[str, torch.Tensor]:
        metadata = model.state_dict()._metadata
        return {
            f"{module}.{name}".lstrip("."): entry["perm"]
            for module, local in metadata.items()
            for name, entry in local.get("nmsparse", {}).items()
        }

    model.W1, model.W2 = model.W2, model.W1
    got = saved()
    assert got.keys() == perms.keys() and all(torch.equal(got[a], perms[b]) for a, b in (("W1", "W2"), ("W2", "W1")))
    model.W1, model.inner.weight = model.inner.weight, model.W1
    got = saved()
    assert torch.equal(got["W1"], perms["inner.weight"]) and torch.equal(got["inner.weight"], perms["W2"])
    model.W2 = model.W1  # W1's Parameter (once inner.weight's) into a second slot as well
    got = saved()
    assert torch.equal(got["W1"], perms["inner.weight"]) and "W2" not in got


def test_a_layer_replaced_by_a_module_holding_its_parameters_keeps_its_state():
    """Module-swapping code (``new.weight = old.weight; model.fc1 = new``), the old module then
    collected: the state follows the weight to the new module, whose eval mode counts no step (three
    eval forwards with grad counted three) and whose checkpoint carries it (it was left out)."""
    model = _Three()
    compiled = torch.compile(model, backend=nmcompile.backend(inner="aot_eager"))
    _sgd_steps(model, compiled, 3, seed=1)
    new = nn.Linear(32, 32)
    new.weight, new.bias = model.fc1.weight, model.fc1.bias
    model.fc1 = new
    gc.collect()
    _sgd_steps(model, compiled, 2, seed=2)
    model.eval()
    for _ in range(3):
        compiled(torch.randn(5, 32)).sum().backward()
    assert {k: s["step"] for k, s in nmcompile.sparsity_state(model).items()} == {
        "fc1.weight": 5,
        "fc2.weight": 5,
        "fc3.weight": 5,
    }
    assert model.state_dict()._metadata["fc1"]["nmsparse"]["weight"]["step"] == 5


def test_an_ema_copy_takes_the_trained_schedule_from_sparsity_states():
    """An EMA (``AveragedModel`` of the compiled model) never trains, so its layers stay at the step
    it was copied at: under mask decay, α = 1 after 12 steps and its eval forward is dense. Loading
    the trained model's ``SparsityStates`` into it (README, "Copies and pickles") gives it their step
    and permutation: its eval forward is then its own weights under the trained schedule (α = 0)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = MLP()
    options = {"inner": "aot_eager", "mask_decay": "linear", "mask_decay_rate": 0.1}
    compiled = torch.compile(model, backend=nmcompile.backend(**options))
    ema = AveragedModel(compiled, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    _sgd_steps(model, compiled, 12, seed=1)
    for _ in range(3):
        ema.update_parameters(compiled)
    ema.eval()
    x = torch.randn(4, 32)
    plain = MLP().eval()
    plain.load_state_dict(ema.module._orig_mod.state_dict())
    with torch.no_grad():
        assert_close(ema(x), plain(x), what="the EMA's forward at its copy's step 0: dense")
    assert {k: (s["step"], s["alpha"]) for k, s in nmcompile.sparsity_state(ema.module).items()} == {
        name: (0, 1.0) for name in ("fc1.weight", "fc2.weight", "head.weight")
    }
    nmcompile.SparsityStates(ema.module).load_state_dict(nmcompile.SparsityStates(compiled).state_dict())
    with torch.no_grad():
        y = ema(x)
    states = nmcompile.sparsity_state(ema.module)
    assert {k: (s["step"], s["alpha"]) for k, s in states.items()} == {k: (12, 0.0) for k in states}
    plain.load_state_dict({**ema.module._orig_mod.state_dict(), **nmcompile.forward_weights(ema.module)})
    with torch.no_grad():
        assert_close(y, plain(x), what="the EMA's forward under the trained schedule")
    assert (nmcompile.forward_weights(ema.module)["fc2.weight"] == 0).float().mean() == 0.5


def test_an_assign_load_from_another_device_restores_the_checkpoint():
    """A CUDA-trained model loading a CPU-mapped checkpoint with ``assign=True``, then ``.cuda()``
    (emulated on the CPU: the states' device is another one during the load): the checkpoint's step
    and permutation are held through the load and restored after the move."""
    options = {"inner": "aot_eager", "perm_interval": 1, "perm_candidates": 4}
    model, checkpoint = _trained(3, options)
    expected = {k: (s["step"], s["perm"].tolist()) for k, s in nmcompile.sparsity_state(model).items()}
    compiled = torch.compile(model, backend=nmcompile.backend(**options))
    for _ in range(4):
        compiled(torch.randn(4, 32)).sum().backward()
    states = [DEFAULT_REGISTRY.get(p) for p in (model.fc1.weight, model.fc2.weight, model.head.weight)]
    for state in states:
        state.device = torch.device("meta")
    model.load_state_dict(checkpoint, assign=True)
    for state in states:
        state.device = torch.device("cpu")
    assert {k: (s["step"], s["perm"].tolist()) for k, s in nmcompile.sparsity_state(model).items()} == expected


def test_swapped_parameters_keep_the_state_and_checkpoints_load():
    """Under ``set_swap_module_params_on_conversion(True)`` torch swaps Parameters in place, which it
    refuses for a tensor with weak references: after compiled training ``.double()`` and
    ``load_state_dict`` work (no weak reference to a Parameter is kept), the states follow the
    swapped weights, and the load restores the checkpoint's states."""
    options = {"inner": "aot_eager", "perm_interval": 1}
    model, checkpoint = _trained(3, options)
    compiled = torch.compile(model, backend=nmcompile.backend(**options))
    expected = {k: (s["step"], s["perm"].tolist()) for k, s in nmcompile.sparsity_state(model).items()}
    flag = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        weight = model.fc1.weight
        model.double()
        assert model.fc1.weight is weight and weight.dtype == torch.float64
        assert {k: (s["step"], s["perm"].tolist()) for k, s in nmcompile.sparsity_state(model).items()} == expected
        compiled(torch.randn(4, 32, dtype=torch.float64)).sum().backward()
        assert {k: s["step"] for k, s in nmcompile.sparsity_state(model).items()} == {k: 4 for k in expected}
        model.load_state_dict(checkpoint)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(flag)
    assert {k: (s["step"], s["perm"].tolist()) for k, s in nmcompile.sparsity_state(model).items()} == expected
    shallow = copy.copy(model.fc1.weight)  # shares the __dict__ entries, not the state
    assert DEFAULT_REGISTRY.get(shallow) is None and DEFAULT_REGISTRY.get(model.fc1.weight) is not None


def test_checkpoint_saved_again_before_the_first_forward_keeps_the_state():
    """A state loaded but not yet used (no compiled forward since) is saved again as it was loaded."""
    _, checkpoint = _trained(3, {"inner": "aot_eager", "perm_interval": 1})
    resumed = MLP()
    resumed.load_state_dict(checkpoint)
    torch.compile(resumed, backend=nmcompile.backend(inner="aot_eager", perm_interval=1))
    again = resumed.state_dict()._metadata
    for module in ("fc1", "fc2"):
        saved, original = again[module]["nmsparse"]["weight"], checkpoint._metadata[module]["nmsparse"]["weight"]
        assert saved["step"] == original["step"] == 3 and torch.equal(saved["perm"], original["perm"])


def test_partial_load_keeps_the_state_of_weights_it_does_not_load():
    """A ``strict=False`` load of some keys resets only the layers whose weights it loads (and
    warns each time a trained layer is reset); the others keep step, permutation and schedule."""
    options = {"inner": "aot_eager", "perm_interval": 1, "mask_decay": "linear", "mask_decay_rate": 0.1}
    model, _ = _trained(5, options)
    before = nmcompile.sparsity_state(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.load_state_dict({"fc2.bias": torch.zeros(64)}, strict=False)
        model.load_state_dict({"fc1.weight": model.fc1.weight.detach().clone()}, strict=False)
    after = nmcompile.sparsity_state(model)
    assert after["fc2.weight"]["step"] == 5 and after["fc2.weight"]["alpha"] == before["fc2.weight"]["alpha"] == 0.5
    assert torch.equal(after["fc2.weight"]["perm"], before["fc2.weight"]["perm"])
    assert after["fc1.weight"]["step"] == 0 and after["fc1.weight"]["alpha"] == 1.0
    messages = [str(w.message) for w in caught if "nmsparse" in str(w.message)]
    assert len(messages) == 1 and "no sparsity state for fc1.weight;" in messages[0]
    compiled = torch.compile(model, backend=nmcompile.backend(**options))
    for _ in range(2):
        compiled(torch.randn(4, 32)).sum().backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.load_state_dict({"fc1.weight": model.fc1.weight.detach().clone()}, strict=False)
    assert [str(w.message) for w in caught if "nmsparse" in str(w.message)] == messages  # warned again


def test_trained_model_pickles_and_its_deepcopy_keeps_the_states():
    """After compiled training the whole model still pickles (``torch.save(model)``; states travel
    with ``state_dict()``), and ``copy.deepcopy`` (a best-model snapshot) holds the states of that
    moment: its checkpoint and its own compile carry them, while the original trains on."""
    options = {"inner": "aot_eager", "perm_interval": 1}
    model, _ = _trained(3, options)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    assert isinstance(pickle.loads(pickle.dumps(model)), MLP)
    expected = nmcompile.sparsity_state(model)
    snapshot = copy.deepcopy(model)
    torch.compile(model, backend=nmcompile.backend(**options))(torch.randn(4, 32)).sum().backward()
    assert nmcompile.sparsity_state(snapshot) == {}  # held for its first compiled forward (README)
    saved = snapshot.state_dict()._metadata
    for name, state in expected.items():
        entry = saved[name.rsplit(".", 1)[0]]["nmsparse"]["weight"]
        assert entry["step"] == state["step"] == 3 and torch.equal(entry["perm"], state["perm"]), name
    torch.compile(snapshot, backend=nmcompile.backend(**options))(torch.randn(4, 32)).sum().backward()
    assert {k: v["step"] for k, v in nmcompile.sparsity_state(snapshot).items()} == dict.fromkeys(expected, 4)
    assert {k: v["step"] for k, v in nmcompile.sparsity_state(model).items()} == dict.fromkeys(expected, 4)


def test_a_deepcopy_or_pickle_of_the_compiled_wrapper_keeps_the_backend_and_its_states():
    """``copy.deepcopy(torch.compile(model, backend=nmcompile.backend(...)))`` shares the backend, so
    the copy's states are the ones ``sparsity_state``/``state_dict`` read and its graphs are reused
    (a copied backend fails dynamo's backend check: each copy recompiled, the 9th ran dense);
    ``torch.save`` of the wrapper pickles the backend as its options."""
    torch._dynamo.reset()
    counters.clear()
    options = {"inner": "aot_eager", "perm_interval": 2}
    backend = nmcompile.backend(**options)
    assert copy.deepcopy(backend) is backend
    assert pickle.loads(pickle.dumps(backend)) is backend  # the shared backend of its options
    model = MLP()
    compiled = torch.compile(model, backend=backend)
    for _ in range(2):
        compiled(torch.randn(4, 32)).sum().backward()
    copies = [copy.deepcopy(compiled) for _ in range(10)]
    for c in copies:
        c(torch.randn(4, 32)).sum().backward()
    assert counters["stats"]["unique_graphs"] == 1
    for c in copies:
        assert {k: v["step"] for k, v in nmcompile.sparsity_state(c).items()} == dict.fromkeys(
            ["fc1.weight", "fc2.weight", "head.weight"], 3
        )
        assert c._orig_mod.state_dict()._metadata["fc1"]["nmsparse"]["weight"]["step"] == 3
    loaded = pickle.loads(pickle.dumps(compiled))  # a pickle carries no states: it starts afresh
    ref = reference.sparsify(copy.deepcopy(loaded._orig_mod), perm_interval=2)
    x = torch.randn(4, 32)
    assert_close(loaded(x), ref(x), what="unpickled wrapper's output")
    assert {k: v["step"] for k, v in nmcompile.sparsity_state(loaded).items()} == dict.fromkeys(
        ["fc1.weight", "fc2.weight", "head.weight"], 1
    )


_RESUME = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import MLP
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    OPTIONS = {{"inner": "aot_eager", "perm_interval": 4, "perm_swaps": 3, "grad_prune": "mvue24",
               "mask_decay": "linear", "mask_decay_rate": 0.05}}
    start, path, device = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    model = MLP().to(device)
    compiled = torch.compile(model, backend="nmsparse", options=OPTIONS)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if start:
        checkpoint = torch.load(path)
        model.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["opt"])
    for step in range(start, 30):
        data = torch.Generator().manual_seed(1000 + step)
        x, target = torch.randn(16, 32, generator=data).to(device), torch.randn(16, 16, generator=data).to(device)
        loss = torch.nn.functional.mse_loss(compiled(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(step, loss.item().hex())
        if step == 14 and not start:
            torch.save({{"model": model.state_dict(), "opt": opt.state_dict()}}, path)
    """
)


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))],
)
def test_resume_in_a_new_process_is_bitwise_identical(tmp_path, device):
    """Train 30 steps, checkpoint at 15 the ordinary way, resume in a fresh process: steps 16–30
    give bitwise the same losses (bimask with ``perm_swaps`` + mvue24 + mask decay). On CUDA each process compiles the
    Triton kernels afresh, so this also checks that deterministic mode leaves no choice to timing."""
    script = tmp_path / "resume.py"
    script.write_text(_RESUME.format(tests=str(__import__("pathlib").Path(__file__).parent)))
    checkpoint = tmp_path / "ckpt.pt"

    def run(start: int) -> dict[int, str]:
        env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # what deterministic cuBLAS asks for
        result = subprocess.run([sys.executable, str(script), str(start), str(checkpoint), device],
                                capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        return dict((int(a), b) for a, b in (line.split() for line in result.stdout.splitlines()))

    full = run(0)
    resumed = run(15)
    assert sorted(resumed) == list(range(15, 30))
    assert {step: full[step] for step in resumed} == resumed


class _EmbedMLP(nn.Module):
    """A token embedding, whose backward Inductor's CPU code adds up in thread order, then two Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.fc, self.head = nn.Embedding(64, 32), nn.Linear(32, 64), nn.Linear(64, 64)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(torch.nn.functional.gelu(self.fc(self.tok(idx))))


def _train_embed_mlp(device: str, global_seed: int) -> tuple[list[str], dict[str, torch.Tensor], dict]:
    """12 AdamW steps under the default inner compiler (Inductor): losses in hex, weights, states. The
    global generators are seeded with ``global_seed`` after the model is made: nothing should read them."""
    torch.manual_seed(0)
    model = _EmbedMLP().to(device)
    compiled = torch.compile(model, backend="nmsparse", options={"grad_prune": "mvue24", "perm_interval": 2})
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    torch.manual_seed(global_seed)
    data = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(12):
        idx = torch.randint(0, 64, (64, 32), generator=data).to(device)
        loss = torch.nn.functional.cross_entropy(compiled(idx).flatten(0, 1), idx.roll(1, 1).flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item().hex())
    return losses, {k: v.clone() for k, v in model.state_dict().items()}, nmcompile.sparsity_state(model)


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))],
)
def test_deterministic_algorithms_make_two_runs_bitwise_identical(device, monkeypatch):
    """Under ``torch.use_deterministic_algorithms(True)`` two Inductor-compiled sparse runs (Bi-Mask,
    permutation search, MVUE; the Triton kernels on CUDA) agree bit for bit, also with the global
    generators seeded differently: the backend adds no nondeterminism and draws no global random
    numbers. Without the mode, Inductor's CPU embedding backward (atomic adds) lets runs drift apart
    (README, Reproducibility)."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic cuBLAS asks for
    with deterministic_algorithms(True):
        losses_a, weights_a, states_a = _train_embed_mlp(device, global_seed=1)
        losses_b, weights_b, states_b = _train_embed_mlp(device, global_seed=2)
    assert losses_a == losses_b
    assert weights_a.keys() == weights_b.keys() and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert states_a.keys() == {"fc.weight", "head.weight"}
    for name, state in states_a.items():
        assert state["step"] == 12 and state["last_search_step"] == 10
        assert not torch.equal(state["perm"].cpu(), torch.arange(64)), "the search moved no row: nothing compared"
        assert torch.equal(state["perm"], states_b[name]["perm"])
        assert state["kept_fraction"] == states_b[name]["kept_fraction"]


class _ModelStateful:
    """A trainer's DCP ``Stateful`` for the model, as torchtitan's: its load goes through
    ``load_state_dict``, without the ``_metadata`` DCP dropped."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.model.load_state_dict(state_dict)


def _train(model: nn.Module, steps: int, start: int = 0) -> nn.Module:
    compiled = torch.compile(model, backend=nmcompile.backend(inner="aot_eager", perm_interval=2))
    for step in range(start, start + steps):
        compiled(torch.randn(4, 32, generator=torch.Generator().manual_seed(step))).sum().backward()
    return compiled


@pytest.mark.parametrize("target", ["fresh", "trained"])
@pytest.mark.parametrize("key", ["nmsparse", "layers"])
def test_dcp_carries_the_states_through_sparsity_states(tmp_path, key, target):
    """``dcp.save``/``dcp.load`` drop ``_metadata``: ``SparsityStates`` beside the model carries the
    states, into a fresh model (held until it compiles) or one already training (restored now).
    DCP loads in sorted key order: ``nmsparse`` after ``model``, ``layers`` before it, and the
    model's load then carries the loading model's states of before the load. Either way no
    old-checkpoint warning, and training goes on as the saved model does."""
    import torch.distributed.checkpoint as dcp

    torch._dynamo.reset()
    torch.manual_seed(0)
    saved = MLP()
    _train(saved, 3)
    dcp.save({"model": saved.state_dict(), key: nmcompile.SparsityStates(saved)}, checkpoint_id=tmp_path)
    loaded = MLP()
    if target == "trained":
        _train(loaded, 1, start=10)
    parts = {"model": _ModelStateful(loaded), key: nmcompile.SparsityStates(loaded)}
    for p in (*saved.parameters(), *loaded.parameters()):
        p.grad = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dcp.load(parts, checkpoint_id=tmp_path)
        _train(saved, 1, start=3)
        _train(loaded, 1, start=3)
    assert not [w for w in caught if "nmsparse" in str(w.message)]
    expected, got = nmcompile.sparsity_state(saved), nmcompile.sparsity_state(loaded)
    assert sorted(got) == sorted(expected) == ["fc1.weight", "fc2.weight", "head.weight"]
    for name, state in expected.items():
        assert got[name]["step"] == state["step"] == 4
        assert torch.equal(got[name]["perm"], state["perm"]), name
    for (name, p), q in zip(saved.named_parameters(), loaded.parameters(), strict=True):
        assert torch.equal(q, p) and torch.equal(q.grad, p.grad), name


@pytest.mark.parametrize("saved_wrapped", [True, False], ids=["wrapped_to_plain", "plain_to_wrapped"])
@pytest.mark.parametrize("wrapper", ["checkpoint_wrapper", "compiled_blocks"])
def test_sparsity_states_move_between_models_with_and_without_wrappers(wrapper, saved_wrapped):
    """``SparsityStates`` names each state as DCP names the weight, without the steps of torch's
    ``checkpoint_wrapper`` (``_checkpoint_wrapped_module``) and of a block compiled alone
    (``_orig_mod``): its states move between a model with these wrappers and one without, as the
    weights do through ``get_model_state_dict`` (every layer restarted at step 0, with a warning)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    options = {"inner": "aot_eager", "perm_interval": 1}

    def make(wrap: bool) -> nn.Module:
        torch.manual_seed(0)
        model = MLP()
        for name in ("fc1", "fc2") if wrap else ():
            block = getattr(model, name)
            if wrapper == "checkpoint_wrapper":
                setattr(model, name, checkpoint_wrapper(block))
            else:
                setattr(model, name, torch.compile(block, backend=nmcompile.backend(**options)))
        return model

    def plain_names(states: dict) -> dict:
        return {re.sub(r"\.(_checkpoint_wrapped_module|_orig_mod)", "", name): s for name, s in states.items()}

    torch._dynamo.reset()
    trained = make(saved_wrapped)
    compiled = torch.compile(trained, backend=nmcompile.backend(**options))
    for _ in range(2):
        compiled(torch.randn(4, 32)).sum().backward()
    expected = plain_names(nmcompile.sparsity_state(trained))
    saved = nmcompile.SparsityStates(trained).state_dict()
    model = make(not saved_wrapped)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nmcompile.SparsityStates(model).load_state_dict(saved)
        with torch.no_grad():
            torch.compile(model, backend=nmcompile.backend(**options))(torch.randn(4, 32))
    got = plain_names(nmcompile.sparsity_state(model))
    assert sorted(got) == sorted(expected) == ["fc1.weight", "fc2.weight", "head.weight"]
    for name, state in expected.items():
        assert got[name]["step"] == state["step"] == 2 and torch.equal(got[name]["perm"], state["perm"]), name


def test_sparsity_states_win_over_load_state_dict_until_the_layers_train():
    """README: states restored by ``SparsityStates`` win over a ``load_state_dict`` of the same
    weights until they train; after a training step an ordinary checkpoint's states load again."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MLP()
    _train(model, 2)
    early = copy.deepcopy(model.state_dict())
    early_state = nmcompile.sparsity_state(model)["fc1.weight"]
    _train(model, 2, start=2)
    states = nmcompile.SparsityStates(model).state_dict()
    later_perm = nmcompile.sparsity_state(model)["fc1.weight"]["perm"]
    assert not torch.equal(later_perm, early_state["perm"])  # the two checkpoints differ
    loaded = MLP()
    _train(loaded, 1, start=10)
    nmcompile.SparsityStates(loaded).load_state_dict(states)
    loaded.load_state_dict(early)
    state = nmcompile.sparsity_state(loaded)["fc1.weight"]
    assert state["step"] == 4 and torch.equal(state["perm"], later_perm)
    _train(loaded, 1, start=4)
    loaded.load_state_dict(early)
    state = nmcompile.sparsity_state(loaded)["fc1.weight"]
    assert state["step"] == 2 and torch.equal(state["perm"], early_state["perm"])
    _train(loaded, 2, start=2)  # back at the step SparsityStates restored: the load wins all the same
    assert nmcompile.sparsity_state(loaded)["fc1.weight"]["step"] == 4
    loaded.load_state_dict(early)
    assert nmcompile.sparsity_state(loaded)["fc1.weight"]["step"] == 2


class _Unit(nn.Module):
    """A parametrization that computes a new tensor, equal to the weight."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * 1.0


@pytest.mark.parametrize("how", ["prune", "parametrize"])
def test_a_trained_state_a_reparametrization_keeps_out_of_state_dict_is_warned_about(how):
    """``torch.nn.utils.prune`` or a parametrization moves a trained layer's Parameter out of its
    slot (to ``weight_orig``, ``parametrizations.weight.original``): ``state_dict`` cannot carry the
    layer's state then, and warns, naming the slot, where it had dropped it silently. Once the
    reparametrization is removed, the same Parameter is back and its state, step included, is
    saved again without a warning."""
    torch._dynamo.reset()
    model = MLP()
    _train(model, 2)
    if how == "prune":
        torch.nn.utils.prune.identity(model.fc1, "weight")
    else:
        torch.nn.utils.parametrize.register_parametrization(model.fc1, "weight", _Unit())
    with pytest.warns(UserWarning, match=r"state \(step, permutation\) of fc1\.weight is not in this state_dict"):
        checkpoint = model.state_dict()
    assert nmcompile.state.METADATA_KEY not in checkpoint._metadata["fc1"]
    if how == "prune":
        torch.nn.utils.prune.remove(model.fc1, "weight")
    else:
        torch.nn.utils.parametrize.remove_parametrizations(model.fc1, "weight")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checkpoint = model.state_dict()
    assert checkpoint._metadata["fc1"][nmcompile.state.METADATA_KEY]["weight"]["step"] == 2


def test_sparsity_states_for_weights_the_model_lacks_are_ignored_with_a_warning():
    """A states entry of another model: its names are listed in a warning, nothing else changes; a
    model's own state dict is a TypeError that says what to pass, and corrupt bytes a ValueError,
    also a dict whose entries are not layer states, which then restores no entry at all."""
    torch._dynamo.reset()
    saved = MLP()
    _train(saved, 1)
    states = nmcompile.SparsityStates(saved).state_dict()
    other = nn.Sequential(nn.Linear(32, 64))
    with pytest.warns(UserWarning, match=r"states for fc1\.weight, fc2\.weight, head\.weight, which the model"):
        nmcompile.SparsityStates(other).load_state_dict(states)
    assert nmcompile.sparsity_state(other) == {}
    with pytest.raises(TypeError, match=r"takes what SparsityStates.state_dict\(\) returns"):
        nmcompile.SparsityStates(saved).load_state_dict(saved.state_dict())
    other_bytes = io.BytesIO()
    torch.save([1, 2], other_bytes)
    for corrupt in (b"garbage", states["states"][:100], other_bytes.getvalue()):  # not a pickle, cut short, a list
        with pytest.raises(ValueError, match=r"the 'states' bytes are not what SparsityStates.state_dict\(\) writes"):
            nmcompile.SparsityStates(saved).load_state_dict({"states": corrupt})
    good = torch.load(io.BytesIO(states["states"]), weights_only=True)["fc1.weight"]
    wrong = {
        "a layer's state": 3,
        "without last_search_step, step": {"perm": good["perm"]},
        "a permutation that is a list": {**good, "perm": good["perm"].tolist()},
        "step -1": {**good, "step": -1},
        "step 2.0": {**good, "step": 2.0},
        "last_search_step -2": {**good, "last_search_step": -2},
    }
    before = nmcompile.sparsity_state(saved)
    fresh = MLP()
    for found, payload in wrong.items():  # a dict of other things: refused before anything loads
        bad = io.BytesIO()
        torch.save({"fc2.weight": good, "fc1.weight": payload}, bad)
        for model in (saved, fresh):  # states restored now, or held until the first compile
            with pytest.raises(ValueError, match=rf"writes \(a torch.save of a dict\); found 'fc1.weight': .*{found}"):
                nmcompile.SparsityStates(model).load_state_dict({"states": bad.getvalue()})
    after = nmcompile.sparsity_state(saved)
    assert {k: (v["step"], v["perm"].tolist()) for k, v in after.items()} == {
        k: (v["step"], v["perm"].tolist()) for k, v in before.items()
    }
    _train(fresh, 1)
    assert {v["step"] for v in nmcompile.sparsity_state(fresh).values()} == {1}
