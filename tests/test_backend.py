"""The compiled path against the reference and against SPEC (§2–§6, §10): numbers, state, recompiles."""

from __future__ import annotations

import copy
import functools
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import types
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import (
    MLP,
    MODELS,
    assert_close,
    assert_grads_close,
    c_mask_kernels,
    compile_blocks_alone,
    sgd_step_both,
    train_against,
    train_and_compare,
)
from test_conv import BasicBlock
from torch import nn
from torch._dynamo.utils import counters

import nmcompile
from nmcompile import reference
from nmcompile.state import LayerSpec, candidate_generator, permutation_candidates


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (2, 8)], ids=lambda nm: f"{nm[0]}:{nm[1]}")
@pytest.mark.parametrize("backward", ["bimask", "transposable", "dense"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_compiled_matches_reference(kind, backward, nm):
    """5 optimizer steps: outputs, every gradient, the weights and the permutations agree (fp32)."""
    cls, shape = MODELS[kind]
    train_and_compare(cls, shape, n=nm[0], m=nm[1], backward=backward, perm_interval=2, inner="aot_eager")


@pytest.mark.parametrize("kind", list(MODELS))
def test_compiled_matches_reference_inductor(kind):
    """The same agreement with the default inner compiler (Inductor) at the default options."""
    cls, shape = MODELS[kind]
    train_and_compare(cls, shape, perm_interval=2)


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
@pytest.mark.parametrize("grad_prune", ["none", "mvue24"])
def test_unbatched_linear_input_matches_reference(grad_prune, inner):
    """A 1-D input ``[K]`` (``F.linear`` takes it) trains like the reference, bias gradient included."""
    train_and_compare(MLP, (32,), grad_prune=grad_prune, inner=inner)


def test_no_candidates_keep_the_identity_permutation():
    """``perm_candidates=0``: each search scores only the current permutation, so it stays the
    identity, and training matches the reference searching the same way (SPEC §5)."""
    _, states = train_and_compare(MLP, (8, 32), steps=3, perm_candidates=0, perm_interval=1, inner="aot_eager")
    for name, state in states.items():
        assert torch.equal(state["perm"], torch.arange(state["perm"].numel())), name


def test_perm_swaps_train_like_the_reference():
    """``perm_swaps`` reaches both the backend and ``reference.sparsify``: with a search and its
    sweeps every step, outputs, gradients, weights and permutations agree, and the sweeps chose
    other permutations than the search alone."""
    options = dict(steps=3, perm_interval=1, inner="aot_eager")
    torch.manual_seed(0)
    _, swapped = train_and_compare(MLP, (8, 32), perm_swaps=4, **options)
    torch.manual_seed(0)
    _, searched = train_and_compare(MLP, (8, 32), **options)
    assert any(not torch.equal(swapped[name]["perm"], state["perm"]) for name, state in searched.items())


def test_n_equal_to_m_trains_as_the_dense_model():
    """``n == m`` (SPEC §2 allows it): every mask keeps every weight and the SR-STE term is 0, so
    outputs, gradients and weights are the dense model's."""
    dense = MLP()
    model = copy.deepcopy(dense)
    compiled = torch.compile(model, backend=nmcompile.backend(n=4, m=4, inner="aot_eager", perm_interval=1))
    train_against(dense, model, compiled)
    for (name, p_dense), p in zip(dense.named_parameters(), model.parameters(), strict=True):
        assert_close(p, p_dense, what=f"weights of {name}")


class _Colliding(nn.Module):
    """``a.b`` and ``a_b``: two layers whose node-name prefixes are both ``a_b``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Module()
        self.a.b = nn.Linear(16, 16)
        self.a_b = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a_b(torch.relu(self.a.b(x)))


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_layers_whose_node_names_collide_train_as_the_reference(inner):
    """Their state inputs get unique argument names (``a_b_perm``, ``a_b_perm_1``); two equal ones
    made the generated forward a ``SyntaxError``."""
    _, states = train_and_compare(_Colliding, (4, 16), steps=3, inner=inner, perm_interval=1)
    assert set(states) == {"a.b.weight", "a_b.weight"}


def test_layouts_are_sparsified():
    """``[in, out]``/addmm (GPT-2 Conv1D), ``x @ W.t()`` and ``F.linear`` weights are all rewritten."""
    report = nmcompile.explain(MODELS["inout"][0](), torch.randn(8, 32), inner="aot_eager")
    rows = {r.name: r for r in report.rows if r.name.endswith("weight")}
    assert {n: (r.op, r.weight_shape, r.sparse) for n, r in rows.items()} == {
        "c_fc.weight": ("addmm", (64, 32), True),
        "proj.weight": ("matmul", (32, 64), True),
        "c_out.weight": ("addmm", (16, 32), True),
    }


class _Spellings(nn.Module):
    """Weights that no nn.Linear/nn.Conv owns, used through each spelling of a GEMM the backend
    rewrites: ``W.mT``, ``W.permute(1, 0)``, ``F.conv1d`` and ``F.conv2d`` (stride, "same")."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(16, 16) / 4)
        self.b = nn.Parameter(torch.randn(16, 16) / 4)
        self.k1 = nn.Parameter(torch.randn(8, 4, 3) / 4)
        self.k2 = nn.Parameter(torch.randn(8, 4, 3, 3) / 4)

    def forward(self, x):
        h = torch.relu(x @ self.a.mT) @ self.b.permute(1, 0)
        seq = h.view(-1, 4, 4)
        y1 = nn.functional.conv1d(seq, self.k1, padding=1)
        y2 = nn.functional.conv2d(seq.unsqueeze(1).expand(-1, 4, -1, -1), self.k2, stride=2, padding=1)
        return y1.flatten(1).sum(1, keepdim=True) + y2.flatten(1)


class _LinearOfTransposed(nn.Module):
    """``F.linear(x, W.t())`` with ``W`` stored as ``[in, out]``, as ``x @ W`` would use it."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(32, 16) / 6)
        self.bias = nn.Parameter(torch.randn(16) / 6)

    def forward(self, x):
        return nn.functional.linear(x, self.w.t(), self.bias)


def test_linear_of_a_transposed_weight_is_sparse_along_its_in_dim():
    """``F.linear(x, W.t())`` is the GEMM ``x @ W``: the backend and the reference both sparsify
    ``W`` as an ``[in, out]`` weight, N:M along ``in`` (it stayed dense, with a reason that called
    the 2-D weight not 2-D)."""
    torch._dynamo.reset()
    ref_state, state = train_and_compare(_LinearOfTransposed, (8, 32), steps=3, inner="aot_eager", perm_interval=1)
    assert sorted(ref_state) == sorted(state) == ["w"]
    row = {r.name: r for r in nmcompile.explain(_LinearOfTransposed(), torch.randn(8, 32), inner="aot_eager").rows}["w"]
    assert row.sparse and row.weight_shape == (16, 32), row  # [O, K]: the groups run along W's 32 rows


def test_reference_routes_every_spelling_the_backend_sparsifies():
    """The oracle agrees with the backend on ``.mT``/``permute`` transposes and raw ``F.conv*d``
    kernels (it ran them dense, so the comparison could not check them), and on a model that is
    itself an ``nn.Linear`` or ``nn.Conv2d`` (it stayed dense, with an empty-named child)."""
    ref_state, state = train_and_compare(_Spellings, (6, 16), steps=3, inner="aot_eager", perm_interval=1)
    assert sorted(ref_state) == sorted(state) == ["a", "b", "k1", "k2"]
    for make, shape in ((lambda: nn.Linear(16, 8), (4, 16)), (lambda: nn.Conv2d(8, 8, 3), (2, 8, 5, 5))):
        torch._dynamo.reset()
        ref_state, state = train_and_compare(make, shape, steps=2, inner="aot_eager")
        assert list(ref_state) == list(state) == ["weight"] and ref_state["weight"]["step"] == 2
    layer = nn.Linear(16, 8)
    reference.sparsify(layer)
    assert "" not in layer._modules and isinstance(layer, nn.Linear)
    w = layer.weight.detach()
    x = torch.randn(4, 16)
    assert_close(layer(x), nn.functional.linear(x, torch.where(reference.nm_mask(w, 2, 4, 1), w, 0), layer.bias))


_TRANSPOSES = {
    "permute(-1, 0)": lambda w: w.permute(-1, 0),
    "permute(dims=(1, -2))": lambda w: torch.permute(w, dims=(1, -2)),
    "transpose(dim0=0, dim1=1)": lambda w: w.transpose(dim0=0, dim1=1),
    "transpose(-1, -2)": lambda w: w.transpose(-1, -2),
    "permute(0, 1)": lambda w: w.permute(0, 1),
    "transpose(1, 1)": lambda w: w.transpose(1, 1),
}


class _Transposed(nn.Module):
    """``x @ f(W)`` for one spelling ``f`` of a transpose (or of a view that is not one)."""

    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.spelling = spelling
        self.w = nn.Parameter(torch.randn(16, 16) / 4)

    def forward(self, x):
        return x @ _TRANSPOSES[self.spelling](self.w)


@pytest.mark.parametrize("spelling", list(_TRANSPOSES))
def test_backend_and_reference_agree_on_what_transposes_a_weight(spelling):
    """Negative dims and keywords spell a transpose too: the backend took only ``permute(1, 0)``
    and positional ``transpose`` for one (the reference any ``transpose``, ``transpose(1, 1)``
    included), so the two disagreed. An identity view leaves ``W`` dense in both, with a reason."""
    torch._dynamo.reset()
    transposes = spelling not in ("permute(0, 1)", "transpose(1, 1)")
    if transposes:
        ref_state, state = train_and_compare(lambda: _Transposed(spelling), (6, 16), steps=2, inner="aot_eager")
        assert list(ref_state) == list(state) == ["w"] and state["w"]["step"] == 2
    else:
        model, x = reference.sparsify(_Transposed(spelling)), torch.randn(6, 16)
        assert not nmcompile.sparsity_state(model)
        assert torch.equal(model(x), x @ _TRANSPOSES[spelling](model.w))
    row = {r.name: r for r in nmcompile.explain(_Transposed(spelling), torch.randn(6, 16), inner="aot_eager").rows}["w"]
    assert row.sparse == transposes, row
    if not transposes:
        assert row.reason.startswith(f"used by {spelling[: spelling.index('(')]}, not by a GEMM"), row


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
def test_reference_leaves_a_computed_weight_dense():
    """The hook-based ``torch.nn.utils.weight_norm`` computes ``weight`` from ``weight_v``/``weight_g``:
    the reference leaves the layer dense, as the backend does (it raised KeyError)."""

    def make() -> nn.Module:  # no deepcopy: weight_norm's computed weight refuses it
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 8))
        torch.nn.utils.weight_norm(model[0])
        return model

    ref, mine = reference.sparsify(make()), make()
    compiled = torch.compile(mine, backend=nmcompile.backend(inner="aot_eager"))
    for _ in range(2):
        x = torch.randn(4, 16)
        out_ref, out = ref(x), compiled(x)
        assert_close(out, out_ref, what="output")
        out_ref.square().sum().backward(), out.square().sum().backward()
        assert_grads_close(mine, ref)
    assert list(nmcompile.sparsity_state(ref)) == list(nmcompile.sparsity_state(mine)) == ["2.weight"]


def test_bimask_input_gradient_is_dy_times_w_masked_by_b():
    """SPEC §4: dX = dY · (W ⊙ B), B built independently from the permutation sparsity_state reports."""
    n, m = 2, 4
    layer = nn.Linear(32, 16)
    compiled = torch.compile(layer, backend=nmcompile.backend(inner="aot_eager", perm_candidates=50))
    x = torch.randn(6, 32, requires_grad=True)
    dy = torch.randn(6, 16)
    compiled(x).backward(dy)
    perm = nmcompile.sparsity_state(compiled)["weight"]["perm"]
    assert not torch.equal(perm, torch.arange(16)), "the search should have moved off identity"
    w = layer.weight.detach()
    # B per SPEC §4, computed here group by group: Bp = N:M of |W⊙F|[P] along rows, B[P[i]] = Bp[i].
    f = reference.nm_mask(w, n, m, dim=1)
    wf_perm = (w * f)[perm]
    bp = torch.zeros_like(f)
    for g in range(0, 16, m):
        for k in range(32):
            order = sorted(range(m), key=lambda i: (-abs(wf_perm[g + i, k].item()), i))
            for i in order[:n]:
                bp[g + i, k] = True
    b = torch.zeros_like(f)
    b[perm] = bp
    b &= f
    assert_close(x.grad, dy @ (w * b), what="dX")
    # and the forward used W ⊙ F
    assert_close(compiled(x), x @ (w * f).t() + layer.bias, what="Y")


def test_permutation_search_score_seed_and_identity():
    """SPEC §5: the chosen P is the best of identity + seeded candidates; same seed, same choice."""
    model = MLP()
    compiled = torch.compile(model, backend=nmcompile.backend(inner="aot_eager", seed=7, perm_candidates=20))
    compiled(torch.randn(4, 32)).sum().backward()
    state = nmcompile.sparsity_state(compiled)
    for index, (name, param) in enumerate(model.named_parameters()):
        if name not in state or state[name]["backward"] != "bimask":
            continue
        s = state[name]
        assert s["layer_index"] == index
        w = param.detach()  # unchanged: no optimizer step
        f = reference.nm_mask(w, 2, 4, dim=1)
        gen = nmcompile.state.candidate_generator(7, index, 0)
        candidates = [torch.randperm(w.shape[0], generator=gen) for _ in range(20)]
        identity = torch.arange(w.shape[0])
        scores = [reference.permutation_score(f, c, 2, 4) for c in candidates]
        best = max(scores)
        chosen = reference.permutation_score(f, s["perm"], 2, 4)
        base = reference.permutation_score(f, identity, 2, 4)
        assert chosen == max(best, base) >= base
        assert s["kept_fraction"] == pytest.approx(chosen / f.sum().item())
    again = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled_again = torch.compile(again, backend=nmcompile.backend(inner="aot_eager", seed=7, perm_candidates=20))
    compiled_again(torch.randn(4, 32)).sum().backward()
    for name, s in nmcompile.sparsity_state(compiled_again).items():
        assert torch.equal(s["perm"], state[name]["perm"])


def _search_weight(case: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    if case == "conv":
        return torch.randn(16, 8, 3, 3, generator=gen)
    if case == "ties_and_nan":  # few distinct magnitudes: the mask's tie rule decides most groups
        w = torch.randint(-2, 3, (64, 32), generator=gen).float()
        w[3, 5] = w[40, 17] = float("nan")
        return w
    w = torch.randn(64, 32, generator=gen)
    return w.t().contiguous() if case == "in_out" else w


@pytest.mark.parametrize("swaps", [0, 3])
@pytest.mark.parametrize("nm", [(2, 4), (1, 8)], ids=lambda nm: f"{nm[0]}:{nm[1]}")
@pytest.mark.parametrize("case", ["out_in", "in_out", "conv", "ties_and_nan"])
def test_layer_search_chooses_the_reference_permutation(case, nm, swaps, monkeypatch):
    """The layer's search builds ``F`` with the C forward kernel (a 2-D fp32 weight at M=4) or the
    composite mask op (no sort), and picks exactly the permutation ``reference.search_permutation``
    picks over ``reference.nm_mask``, ties and NaN included; a candidate beats the identity here, so
    the comparison is not vacuous. With ``perm_swaps``, ``reference.swap_rows`` then sweeps from it,
    drawing after the candidates from their generator, and raises the score further."""
    from nmcompile.kernels import cpu_mask

    n, m = nm
    param = _search_weight(case)
    layout = "in_out" if case == "in_out" else "out_in"
    rows = param.shape[1] if layout == "in_out" else param.shape[0]
    config = nmcompile.SparsityConfig(n=n, m=m, perm_candidates=16, perm_swaps=swaps)
    spec = LayerSpec("fc.weight", 3, rows, "bimask", layout=layout, config=config)
    state = nmcompile.state.LayerState(spec, torch.device("cpu"), None)
    c_masks = []
    monkeypatch.setattr(
        cpu_mask, "nm4_mask", lambda w, n, launch=cpu_mask.nm4_mask: c_masks.append(launch(w, n)) or c_masks[-1]
    )
    state.begin_training_step(param)
    w = param.t() if layout == "in_out" else param
    fmask = reference.nm_mask(w, n, m, dim=1)
    assert torch.equal(nmcompile.ops.nm_mask(w, n, m, 1), fmask)
    if m == 4 and case != "conv" and cpu_mask.blocker(w, m) is None:
        assert len(c_masks) == 1 and torch.equal(c_masks[0], fmask)
    else:
        assert c_masks == []
    identity = torch.arange(rows)
    generator = candidate_generator(0, 3, 0)
    expected, score = reference.search_permutation(fmask, identity, permutation_candidates(spec, generator), n, m)
    assert score > reference.permutation_score(fmask, identity, n, m)
    if swaps:
        expected = reference.swap_rows(fmask, expected, n, m, swaps, generator)
        assert reference.permutation_score(fmask, expected, n, m) > score
    assert torch.equal(state.perm, expected)


class _Trainer:
    """A training helper whose compiled method reaches the model through an attribute."""

    def __init__(self, model: nn.Module, backend) -> None:
        self.model = model
        self.loss = torch.compile(self._loss, backend=backend)

    def _loss(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).square().mean()


@pytest.mark.parametrize("grad_prune", ["none", "mvue24"])
@pytest.mark.parametrize("reach", ["attribute", "compiled_wrapper"])
def test_model_reached_through_an_attribute_or_a_compiled_wrapper_trains_as_the_reference(reach, grad_prune):
    """Dynamo names such parameters ``L['self'].model._modules['fc1']...`` or
    ``G['c']._orig_mod._modules[...]``: names and layer indices still follow the model's
    ``named_parameters()``, so ``exclude`` keeps ``fc2`` dense and every gradient (MVUE streams
    included) equals the reference's. The source text and its hash were used before."""
    torch._dynamo.reset()
    options = {"exclude": r"^fc2\.", "perm_interval": 2, "grad_prune": grad_prune}
    backend = nmcompile.backend(inner="aot_eager", **options)
    torch.manual_seed(0)
    base = MLP()
    ref = reference.sparsify(copy.deepcopy(base), **options)
    model = copy.deepcopy(base)
    if reach == "attribute":
        loss = _Trainer(model, backend).loss
    else:
        wrapped = torch.compile(model, backend=backend)
        loss = torch.compile(lambda x: wrapped(x).square().mean(), backend=backend)
    for step in range(4):
        x = torch.randn(8, 32, generator=torch.Generator().manual_seed(step))
        ref(x).square().mean().backward()
        loss(x).backward()
        assert_grads_close(model, ref, what=f"step {step}")
        sgd_step_both(ref, model, 0.1)
    state = nmcompile.sparsity_state(model)
    indices_and_steps = {name: (s["layer_index"], s["step"]) for name, s in state.items()}
    assert indices_and_steps == {"fc1.weight": (0, 4), "head.weight": (4, 4)}


def _loss_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).square().mean()


def _loss_of_with_a_graph_break(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    h = torch.relu(model.fc2(nn.functional.gelu(model.fc1(x))))
    torch._dynamo.graph_break()
    return model.head(h).square().mean()


@pytest.mark.parametrize("reach", ["argument", "argument_graph_break", "attribute"])
def test_models_given_to_one_compiled_function_each_find_their_own_modules(reach):
    """A compiled function given the model (``fn(model, x)``, also around a graph break, or a
    trainer's ``self.model``) runs one graph for every model of the class. The weights of models
    after the first are found along dynamo's source in the running function's frame, so their
    states have owners: an eval forward counts nothing, ``state_dict`` carries the states, a
    checkpoint loaded before their first call resumes them, and the gradients are the reference's.
    Before, only the first model had owners; the others counted eval forwards as steps, saved no
    state and dropped a loaded one."""
    torch._dynamo.reset()
    counters.clear()
    options = {"perm_interval": 1, "exclude": r"^fc2\.", "grad_prune": "mvue24"}
    backend = nmcompile.backend(inner="aot_eager", **options)
    torch.manual_seed(0)
    bases = [MLP() for _ in range(3)]
    refs = [reference.sparsify(copy.deepcopy(base), **options) for base in bases]
    models = [copy.deepcopy(base) for base in bases]
    if reach == "attribute":
        losses = [_Trainer(model, backend).loss for model in models]
    else:
        fn = torch.compile(_loss_of if reach == "argument" else _loss_of_with_a_graph_break, backend=backend)
        losses = [functools.partial(fn, model) for model in models]
    *training, resumed = range(3)
    for step in range(3):
        x = torch.randn(8, 32, generator=torch.Generator().manual_seed(step))
        for k in training:
            refs[k](x).square().mean().backward()
            losses[k](x).backward()
            assert_grads_close(models[k], refs[k], what=f"model {k} step {step}")
            sgd_step_both(refs[k], models[k], 0.1)
    for k in training:
        models[k].eval()
        losses[k](torch.randn(8, 32))  # grad enabled, eval mode: no step
        models[k].train()
    steps = {"fc1.weight": 3, "head.weight": 3}
    assert [{n: s["step"] for n, s in nmcompile.sparsity_state(models[k]).items()} for k in training] == [steps] * 2
    checkpoint = models[1].state_dict()
    assert sorted(checkpoint._metadata["fc1"][nmcompile.state.METADATA_KEY]) == ["weight"]
    models[resumed].load_state_dict(checkpoint)
    x = torch.randn(8, 32)
    for k in (1, resumed):  # the resumed model takes the step model 1 takes
        losses[k](x).backward()
    state, saved = nmcompile.sparsity_state(models[resumed]), nmcompile.sparsity_state(models[1])
    assert {n: (s["step"], s["layer_index"]) for n, s in state.items()} == {"fc1.weight": (4, 0), "head.weight": (4, 4)}
    assert all(torch.equal(state[n]["perm"], saved[n]["perm"]) for n in state)
    for (name, p), q in zip(models[1].named_parameters(), models[resumed].parameters(), strict=True):
        assert torch.equal(q.grad, p.grad), name
    assert counters["stats"]["unique_graphs"] == (1 if reach != "argument_graph_break" else 2)


@pytest.mark.parametrize("shared_backend", [False, True])
def test_two_instances_of_one_class_keep_their_own_states(shared_backend):
    """Dynamo gives the second instance the first one's compiled graph (same code, same shapes;
    two ``backend="nmsparse"`` compiles, or one backend object); each still trains on its own
    layer states, exactly as its own reference does."""
    torch._dynamo.reset()
    counters.clear()
    options = {"inner": "aot_eager", "perm_interval": 1, "mask_decay": "linear", "mask_decay_rate": 0.2}
    backend = nmcompile.backend(**options)
    pairs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        base = MLP()
        mine = copy.deepcopy(base)
        compiled = (
            torch.compile(mine, backend=backend)
            if shared_backend
            else torch.compile(mine, backend="nmsparse", options=options)
        )
        pairs.append((reference.sparsify(base, **options), mine, compiled))
    for _ in range(3):
        x = torch.randn(4, 32)
        for ref, mine, compiled in pairs:
            assert_close(compiled(x), ref(x))
            for model in (ref, compiled):
                model(x).square().mean().backward()
            sgd_step_both(ref, mine, 0.05)
    assert counters["stats"]["unique_graphs"] == 1
    for ref, mine, _ in pairs:
        got, expected = nmcompile.sparsity_state(mine), nmcompile.sparsity_state(ref)
        assert got.keys() == expected.keys()
        for name, state in got.items():
            assert state["step"] == expected[name]["step"] == 6 and torch.equal(state["perm"], expected[name]["perm"])


def test_equal_options_give_one_backend_past_the_recompile_limit():
    """``nmcompile.backend`` with equal options returns one object, so dynamo, which guards graphs on
    the backend's identity, reuses the graph for more models of one class than its recompile limit
    (each had been a recompile, then an eager, dense run); each model still trains its own states."""
    torch._dynamo.reset()
    assert nmcompile.backend(inner="aot_eager", include=["fc.*"]) is nmcompile.backend(
        include=("fc.*",), inner="aot_eager"
    )
    assert nmcompile.backend(inner="aot_eager") is not nmcompile.backend(inner="aot_eager", n=1)
    models = [MLP() for _ in range(torch._dynamo.config.recompile_limit + 2)]
    for model in models:
        torch.compile(model, backend=nmcompile.backend(inner="aot_eager"))(torch.randn(4, 32)).sum().backward()
    assert [sorted(nmcompile.sparsity_state(m)) for m in models] == [["fc1.weight", "fc2.weight", "head.weight"]] * len(
        models
    )
    assert all(s["step"] == 1 for m in models for s in nmcompile.sparsity_state(m).values())


def test_instances_sharing_graphs_of_two_backends_keep_their_own_states():
    """Two blocks of one class, each compiled with an evaluation backend (other options) and then a
    training one: dynamo reuses each backend's graph for the second block, which still trains on
    its own permutation and step (it used to fall back to the first block's state)."""

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.fc(x)

    torch.manual_seed(0)
    blocks = [Residual(), Residual()]
    evaluate, train = nmcompile.backend(inner="aot_eager", backward="dense"), nmcompile.backend(inner="aot_eager")
    x = torch.randn(4, 16)
    with torch.no_grad():
        for block in blocks:
            torch.compile(block, backend=evaluate)(x)
    compiled = [torch.compile(block, backend=train) for block in blocks]
    for _ in range(3):
        for model in compiled:
            model(x).sum().backward()
    candidates = permutation_candidates(LayerSpec("fc.weight", 0, 16, "bimask"), candidate_generator(0, 0, 0))  # step 0
    perms = []
    for block in blocks:
        state = nmcompile.sparsity_state(block)["fc.weight"]
        assert (state["step"], state["backward"], state["layer_index"]) == (3, "bimask", 0)
        fmask = reference.nm_mask(block.fc.weight.detach(), 2, 4, 1)
        best, _ = reference.search_permutation(fmask, torch.arange(16), candidates, 2, 4)
        assert torch.equal(state["perm"], best)
        perms.append(best)
    assert not torch.equal(*perms)


def test_blocks_compiled_in_place_count_their_own_steps():
    """``block.compile()`` for each of several blocks of one class: one graph, a state per block,
    each counting its own steps and following its own block's train/eval mode."""

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.relu(self.fc(x))

    blocks = nn.ModuleList(Residual() for _ in range(3))
    for block in blocks:
        block.compile(backend="nmsparse", options={"inner": "aot_eager"})

    def step() -> None:
        x = torch.randn(4, 16)
        for block in blocks:
            x = block(x)
        x.sum().backward()

    for _ in range(2):
        step()
    blocks[1].eval()
    step()
    assert [nmcompile.sparsity_state(b)["fc.weight"]["step"] for b in blocks] == [3, 2, 3]


def test_a_module_whose_compiled_call_closes_over_an_empty_cell_does_not_stop_a_compile():
    """A module on the stack whose ``_compiled_call_impl`` is a closure with a cell not yet set (a
    wrapper of the user's or another library's): the compile of a model run inside it, which reads
    such closures for the backend a module was compiled with, goes on and trains sparse (reading
    the empty cell raised ``ValueError: Cell is empty``)."""

    def wrap(call):
        def wrapped(*args, **kwargs):
            return call(*args, **kwargs) if args else late

        if not callable(call):  # never: ``late`` stays an empty cell of ``wrapped``'s closure
            late = None
        return wrapped

    inner = nn.Linear(16, 16)
    compiled = torch.compile(inner, backend=nmcompile.backend(inner="aot_eager"))

    class Outer(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return compiled(x)

    outer = Outer()
    outer._compiled_call_impl = wrap(outer._call_impl)
    assert [cell == types.CellType() for cell in outer._compiled_call_impl.__closure__] == [False, True]
    x = torch.randn(4, 16)
    out = outer(x)
    out.sum().backward()
    sparse = torch.where(reference.nm_mask(inner.weight, 2, 4, 1), inner.weight, 0)
    assert_close(out, torch.nn.functional.linear(x, sparse, inner.bias))
    assert nmcompile.sparsity_state(inner)["weight"]["step"] == 1


@pytest.mark.parametrize("spelling", ["wrapper", "in_place"])
def test_blocks_compiled_alone_keep_their_names_under_another_backends_compile_that_skips_them(spelling):
    """Blocks compiled one by one with nmsparse, run from a ``torch.compiler.disable``d method of a
    model compiled with another backend (which never traces them): their weights are named and
    indexed within each block, as without the outer compile, so ``include`` matches and they train
    as the per-block reference."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 16)
            self.out = nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.out(torch.relu(self.fc(x)))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(2))
            self.head = nn.Linear(16, 4)

        @torch.compiler.disable
        def body(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = block(x)
            return x

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x))

    options = {"inner": "aot_eager", "include": "^fc", "perm_interval": 1, "perm_candidates": 4, "grad_prune": "mvue24"}
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Model()
    ref = compile_blocks_alone(model, options, in_place=spelling == "in_place")
    train_against(ref, model, torch.compile(model, backend="aot_eager"), (8, 16))
    for block in model.blocks:
        state = nmcompile.sparsity_state(block)
        assert list(state) == ["fc.weight"]
        assert (state["fc.weight"]["step"], state["fc.weight"]["layer_index"]) == (3, 0)


def _train_beside_another_compile(other: str) -> tuple[list[float], dict]:
    """Losses and states of six SGD steps through one compiled MLP. After the third, a ``no_grad``
    pass through a second nmsparse compile of the same weights (``other``: ``"options"`` compiles
    the model with other options, ``"submodule"`` compiles ``fc2`` alone; ``"submodule_first"``
    makes that pass before the model is compiled; ``"submodule_first_reused"`` too, after another
    MLP trained a step, so the model runs the graph compiled for that one); the fifth step's new
    batch size recompiles the training wrapper."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MLP()
    options = {"inner": "aot_eager", "perm_interval": 2, "mask_decay": "linear", "mask_decay_rate": 0.1}
    if other == "submodule_first_reused":
        torch.compile(MLP(), backend=nmcompile.backend(**options))(torch.randn(8, 32)).sum().backward()
    if other.startswith("submodule_first"):
        with torch.no_grad():
            torch.compile(model.fc2, backend=nmcompile.backend(**options))(torch.randn(8, 64))
    compiled = torch.compile(model, backend=nmcompile.backend(**options))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(1)
    losses = []
    for step in range(6):
        x = torch.randn(8 if step < 4 else 12, 32, generator=generator)
        loss = compiled(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step == 2 and other in ("options", "submodule"):
            second = (
                torch.compile(model, backend=nmcompile.backend(**options, grad_prune="mvue24"))
                if other == "options"
                else torch.compile(model.fc2, backend=nmcompile.backend(**options))
            )
            with torch.no_grad():
                second(x if other == "options" else torch.randn(8, 64))
            assert {s["step"] for s in nmcompile.sparsity_state(model).values()} == {3}
    return losses, nmcompile.sparsity_state(model)


@pytest.mark.parametrize("other", ["options", "submodule", "submodule_first", "submodule_first_reused"])
def test_a_second_compile_of_the_same_weights_continues_their_states(other):
    """A compile with other options, or of a submodule (before the model's or after), shares each
    weight's progress (permutation, step) and keeps its own names and layer indices: the model
    trains exactly as without it, also after its wrapper recompiles (the states used to restart at
    step 0), and reports the model's layer indices; also where the model's graph was compiled for
    another model (the layer took the submodule compile's index 0 there, seeding as ``fc1``)."""
    expected_losses, expected = _train_beside_another_compile("none")
    losses, got = _train_beside_another_compile(other)
    assert losses == expected_losses
    assert got.keys() == expected.keys() == {"fc1.weight", "fc2.weight", "head.weight"}
    for name, state in got.items():
        assert state["step"] == expected[name]["step"] == 6
        assert state["layer_index"] == expected[name]["layer_index"]
        assert torch.equal(state["perm"], expected[name]["perm"])
    assert got["fc2.weight"]["layer_index"] == 2
    assert not torch.equal(got["fc2.weight"]["perm"], torch.arange(64))


def test_twenty_steps_no_recompile_and_search_schedule():
    """20 steps with new data: one graph, no recompiles; P changes only at search steps 0, 5, 10, 15."""
    model = MLP()
    compiled = torch.compile(model, backend=nmcompile.backend(inner="aot_eager", perm_interval=5))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    counters.clear()
    perms, searches = [], []
    for _ in range(20):
        compiled(torch.randn(16, 32)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        state = nmcompile.sparsity_state(compiled)["fc1.weight"]
        perms.append(state["perm"])
        searches.append(state["last_search_step"])
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["frames"]["total"] == counters["frames"]["ok"] == 1
    assert searches == [0] * 5 + [5] * 5 + [10] * 5 + [15] * 5
    for step in range(1, 20):
        if step % 5:
            assert torch.equal(perms[step], perms[step - 1]), f"P changed outside a search step at {step}"
    assert nmcompile.sparsity_state(compiled)["fc1.weight"]["step"] == 20


def test_gradient_accumulation_counts_micro_batches():
    """Steps are training forwards, not optimizer steps (README, "A training step"): 4 optimizer steps
    over 3 micro-batches each are 12 steps, and ``perm_interval=5`` searches at micro-batches 0, 5, 10."""
    model = MLP()
    compiled = torch.compile(model, backend=nmcompile.backend(inner="aot_eager", perm_interval=5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    searches = []
    for _ in range(4):
        for _ in range(3):
            (compiled(torch.randn(8, 32)).square().mean() / 3).backward()
            searches.append(nmcompile.sparsity_state(compiled)["fc1.weight"]["last_search_step"])
        opt.step()
        opt.zero_grad()
    assert searches == [0] * 5 + [5] * 5 + [10] * 2
    assert {s["step"] for s in nmcompile.sparsity_state(compiled).values()} == {12}


def test_eval_and_no_grad_count_nothing():
    """Only train-mode forwards with grad enabled are steps; eval() and no_grad run the forward mask only."""
    model = MLP()
    compiled = torch.compile(model, backend=nmcompile.backend(inner="aot_eager"))
    x = torch.randn(4, 32)
    compiled(x).sum().backward()
    model.eval()
    y_eval = compiled(x)
    with torch.no_grad():
        y_nograd = compiled(x)
    model.train()
    with torch.no_grad():
        y_train_nograd = compiled(x)
    assert {s["step"] for s in nmcompile.sparsity_state(compiled).values()} == {1}

    def masked(layer: nn.Linear, h: torch.Tensor) -> torch.Tensor:
        w = layer.weight.detach()
        return h @ (w * reference.nm_mask(w, 2, 4, 1)).t() + layer.bias

    expected = masked(model.head, torch.relu(masked(model.fc2, nn.functional.gelu(masked(model.fc1, x)))))
    ref_model = reference.sparsify(copy.deepcopy(model)).eval()
    for y in (y_eval, y_nograd, y_train_nograd):
        assert_close(y, ref_model(x), what="eval output")
        assert_close(y, expected, what="eval output vs W ⊙ F by hand")


def _decaying_outputs_match_the_reference(model: nn.Module, steps: int = 4) -> tuple[nn.Module, nn.Module]:
    """Train ``model`` compiled and its reference side by side under linear mask decay (each layer's
    step count shows in its output), asserting equal outputs at every step; both models."""
    options = dict(inner="aot_eager", mask_decay="linear", mask_decay_rate=0.25, srste_lambda=0.0)
    ref_model = reference.sparsify(copy.deepcopy(model), **options)
    compiled = torch.compile(model, backend=nmcompile.backend(**options))
    for step in range(steps):
        x = torch.randn(4, 16)
        expected, got = ref_model(x), compiled(x)
        assert_close(got, expected, what=f"output at step {step}")
        expected.sum().backward()
        got.sum().backward()
    return compiled, ref_model


class _TeacherStudent(nn.Module):
    """A teacher branch under ``no_grad()`` (or ``inference_mode()``) inside a training forward (as
    BYOL/DINO targets), and a layer under ``enable_grad()``, which trains even when the caller's mode
    is ``no_grad``."""

    def __init__(self, teacher_mode: Callable = torch.no_grad) -> None:
        super().__init__()
        self.student, self.teacher, self.probe = nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(16, 8)
        self.teacher_mode = teacher_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.teacher_mode():
            t = self.teacher(x)
        with torch.enable_grad():
            p = self.probe(x)
        return self.student(x) - t + p


@pytest.mark.parametrize("teacher_mode", [torch.no_grad, torch.inference_mode])
def test_grad_mode_blocks_inside_a_forward_decide_each_layers_steps(teacher_mode):
    """The grad mode a layer runs in decides its steps, also where the forward sets it: the teacher
    under ``no_grad()`` or ``inference_mode()`` counts none and keeps α = 1, as in the reference (it
    counted every step, its mask decaying); the layer under ``enable_grad()`` counts a step in a
    forward called under ``no_grad``. Dynamo keeps the blocks in one graph (``_set_grad_enabled``
    nodes, and an enter/exit pair for ``inference_mode``)."""
    counters.clear()
    compiled, ref_model = _decaying_outputs_match_the_reference(_TeacherStudent(teacher_mode))
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert_close(compiled(x), ref_model(x), what="output under no_grad")
    assert counters["stats"]["unique_graphs"] == 2  # one per grad mode of the caller, no graph break
    states = {k: (v["step"], v["alpha"]) for k, v in nmcompile.sparsity_state(compiled).items()}
    assert states == {"student.weight": (4, 0.0), "teacher.weight": (0, 1.0), "probe.weight": (5, 0.0)}
    assert states == {k: (v["step"], v["alpha"]) for k, v in nmcompile.sparsity_state(ref_model).items()}


class _InferenceBlocks(nn.Module):
    """Layers under ``inference_mode()`` with ``enable_grad()`` inside it (eager records nothing
    there), and under ``inference_mode(False)`` inside ``inference_mode()`` (grad back on)."""

    def __init__(self) -> None:
        super().__init__()
        self.student, self.frozen, self.probe = nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            with torch.enable_grad():
                t = self.frozen(x)
            with torch.inference_mode(False):
                p = self.probe(x.clone())
        return self.student(x) - t + p


def test_inference_mode_blocks_decide_steps_as_eager_grad_modes_do():
    """``inference_mode(False)`` sets grad on: its layer trains (it counted no step, its mask decay
    stalled, 0.2 off the reference by step 1); ``enable_grad()`` inside ``inference_mode()`` trains
    nothing, as eager (the backend counted steps, the reference raised on saving inference tensors)."""
    compiled, ref_model = _decaying_outputs_match_the_reference(model := _InferenceBlocks())
    assert model.frozen.weight.grad is None and ref_model.frozen.weight.grad is None
    assert_close(model.probe.weight.grad, ref_model.probe.weight.grad, what="the probe's gradient")
    states = {k: (v["step"], v["alpha"]) for k, v in nmcompile.sparsity_state(compiled).items()}
    assert states == {"student.weight": (4, 0.0), "frozen.weight": (0, 1.0), "probe.weight": (4, 0.0)}
    assert states == {k: (v["step"], v["alpha"]) for k, v in nmcompile.sparsity_state(ref_model).items()}


def test_a_layer_frozen_mid_training_runs_dense_as_in_the_reference():
    """SPEC §10 leaves frozen weights dense: freezing a layer that trained sparse makes dynamo
    recompile it dense (README), and the reference now does the same at the call (it kept the layer
    sparse and counted its steps); unfrozen, both go on from the steps counted before."""
    options = dict(inner="aot_eager", perm_interval=1, perm_candidates=8)
    model = MLP()
    ref_model = reference.sparsify(copy.deepcopy(model), **options)
    compiled = torch.compile(model, backend=nmcompile.backend(**options))
    for step, frozen in enumerate([False, True, True, False, False]):
        for m in (model, ref_model):
            m.fc2.requires_grad_(not frozen)
        x = torch.randn(4, 32)
        expected, got = ref_model(x), compiled(x)
        assert_close(got, expected, what=f"output at step {step}")
        expected.sum().backward()
        got.sum().backward()
    steps = {k: v["step"] for k, v in nmcompile.sparsity_state(compiled).items()}
    assert steps == {"fc1.weight": 5, "fc2.weight": 3, "head.weight": 5}
    assert steps == {k: v["step"] for k, v in nmcompile.sparsity_state(ref_model).items()}
    ref_perm = nmcompile.sparsity_state(ref_model)["fc2.weight"]["perm"]
    assert torch.equal(nmcompile.sparsity_state(compiled)["fc2.weight"]["perm"], ref_perm)


def test_a_layer_frozen_before_sparsify_and_unfrozen_later_trains_as_the_reference():
    """Gradual unfreezing: ``fc1`` frozen when the reference is made and the model compiled, then
    unfrozen. Both run it dense while frozen, with no state, then sparse from its first trainable
    step, with equal outputs and steps (the reference kept it a dense ``nn.Linear`` for good);
    ``head`` stays frozen and stateless in both."""
    options = dict(inner="aot_eager", perm_interval=2)
    model = MLP()
    for layer in (model.fc1, model.head):
        layer.requires_grad_(False)
    ref_model = reference.sparsify(copy.deepcopy(model), **options)
    compiled = torch.compile(model, backend=nmcompile.backend(**options))
    for step in range(5):
        if step == 2:
            model.fc1.requires_grad_(True)
            ref_model.fc1.requires_grad_(True)
        x = torch.randn(4, 32)
        expected, got = ref_model(x), compiled(x)
        assert_close(got, expected, what=f"output at step {step}")
        expected.square().sum().backward()
        got.square().sum().backward()
        with torch.no_grad():
            for p_ref, p_mine in zip(ref_model.parameters(), model.parameters(), strict=True):
                assert (p_ref.grad is None) == (p_mine.grad is None) == (not p_mine.requires_grad)
                if p_mine.grad is not None:
                    assert_close(p_mine.grad, p_ref.grad, what=f"gradient at step {step}")
                    p_ref -= 0.05 * p_ref.grad
                    p_mine -= 0.05 * p_mine.grad
                    p_ref.grad = p_mine.grad = None
        states = {k: v["step"] for k, v in nmcompile.sparsity_state(compiled).items()}
        assert states == {k: v["step"] for k, v in nmcompile.sparsity_state(ref_model).items()}
        assert ("fc1.weight" in states) == (step >= 2)
    assert states == {"fc1.weight": 3, "fc2.weight": 5}


@torch._functorch.config.patch(enable_autograd_cache=False)  # a cache hit would compile nothing
def test_a_graph_inductor_cannot_compile_runs_without_it(monkeypatch):
    """Where Inductor fails on a graph (torch 2.13 does on some dynamic-shape convolution
    backwards), the graph runs through AOTAutograd alone, with one warning, and trains as the
    reference does. The backward compiles with the forward, so its failure is caught at the first
    forward, before any backward runs; ``explain`` records the graphs that run."""
    from torch._inductor import compile_fx

    real = compile_fx.compile_fx_inner

    def fails_on_backward(graph, example_inputs, **kwargs):
        if kwargs.get("is_backward"):
            raise RuntimeError("lowering failed\nValueRangeError: Invalid ranges [0:-1]")
        return real(graph, example_inputs, **kwargs)

    monkeypatch.setattr(compile_fx, "compile_fx_inner", fails_on_backward)
    expected = [
        "nmsparse: Inductor could not compile a graph (RuntimeError: ValueRangeError: Invalid ranges [0:-1]); it "
        "runs through AOTAutograd without Inductor (as inner='aot_eager'): still sparse, not fused"
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(MLP(), backend=nmcompile.backend(perm_interval=2))(torch.randn(4, 32))
    assert [str(w.message) for w in caught if "nmsparse" in str(w.message)] == expected
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_and_compare(MLP, (4, 32), steps=3, grad_prune="mvue24", perm_interval=2)
    assert [str(w.message) for w in caught if "nmsparse" in str(w.message)] == expected
    with pytest.warns(UserWarning, match="nmsparse: Inductor could not compile a graph"):
        report = nmcompile.explain(MLP(), torch.randn(4, 32))
    backward = {n.name for n in report.backward_graph.graph.nodes}
    assert "fc2_bwd_input_grad" in backward and report.forward_graph is not None


def test_the_fallback_warning_names_the_cause_not_a_source_excerpt():
    """The warning quotes the last line of the error that reads ``SomeError: ...``: Inductor puts its
    lowering's error first and ends with a source excerpt (the warning quoted a row of carets)."""
    from nmcompile.backend import _cause

    lowering = "LoweringException: ValueError: not enough values\n  target: flex_attention\n    x = f(y)\n        ^^^^"
    assert _cause(RuntimeError(lowering)) == "LoweringException: ValueError: not enough values"
    assert _cause(RuntimeError("lowering failed\nValueRangeError: Invalid ranges [0:-1]")) == (
        "ValueRangeError: Invalid ranges [0:-1]"
    )
    assert _cause(RuntimeError("no named cause\n   ^^^")) == "no named cause"
    assert _cause(RuntimeError("")) == "" and len(_cause(RuntimeError("E" * 300))) == 200


def test_dynamos_restart_of_an_analysis_reaches_inductor_not_the_fallback():
    """A float made an input (LayerNorm's ``eps`` under ``dynamic=True``) makes dynamo restart its
    analysis from inside the backend; that request passes through, and the second attempt compiles
    with Inductor (the fallback took it for an Inductor failure and ran the graph unfused). Only
    the attempt that compiled reaches ``on_compile``."""

    class Normed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.norm = nn.Linear(16, 16), nn.LayerNorm(16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.fc(x))

    records = []
    backend = nmcompile.NMSparseBackend(nmcompile.SparsityConfig(), on_compile=records.append)
    model = Normed()
    ref = reference.sparsify(copy.deepcopy(model))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = torch.randn(8, 16)
        out = torch.compile(model, backend=backend, dynamic=True)(x)
    assert not [str(w.message) for w in caught if "nmsparse" in str(w.message)]
    assert [r.attempt for r in records] == [1] and records[0].graphs.keys() == {"forward", "backward"}
    assert_close(out, ref(x), what="output")


def test_reference_on_a_compiled_model_follows_its_modules_mode():
    """``reference.sparsify`` on a model already compiled with the same options takes over the
    weights' states with its own modules as their owners, so ``eval()`` reaches them: an eval-mode
    forward with grad enabled counts no step (it counted one, read from the replaced ``nn.Linear``)."""
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    torch.compile(model, backend=nmcompile.backend(inner="aot_eager"))(torch.randn(4, 16)).sum().backward()
    reference.sparsify(model, inner="aot_eager")
    assert type(model[0]) is reference.SparseLinear
    model.eval()
    model(torch.randn(4, 16)).sum().backward()
    assert {s["step"] for s in nmcompile.sparsity_state(model).values()} == {1}
    model.train()
    model(torch.randn(4, 16)).sum().backward()
    assert {s["step"] for s in nmcompile.sparsity_state(model).values()} == {2}


def test_unchanged_training_loop_learns():
    """AdamW, zero_grad, clipping, LR scheduler, eval/train switches: the loss falls on a learnable task."""
    torch.manual_seed(1)
    teacher = MLP()
    model = MLP()
    compiled = torch.compile(model, backend="nmsparse", options={"inner": "aot_eager", "perm_interval": 10})
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.5)
    x_val = torch.randn(64, 32)
    val = []
    counters.clear()
    for step in range(60):
        x = torch.randn(64, 32)
        with torch.no_grad():
            target = teacher(x)
        loss = nn.functional.mse_loss(compiled(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 10 == 9:
            model.eval()
            with torch.no_grad():
                val.append(nn.functional.mse_loss(compiled(x_val), teacher(x_val)).item())
            model.train()
    assert val[-1] < 0.5 * val[0], val
    assert nmcompile.sparsity_state(compiled)["fc1.weight"]["step"] == 60
    assert counters["stats"]["unique_graphs"] == 2  # one training graph, one no-grad graph


class Mixed(nn.Module):
    """Every SPEC §10 fallback in one model."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 32)
        self.fc = nn.Linear(32, 32)
        self.odd = nn.Linear(32, 30)  # K=30 not divisible by 4 downstream
        self.k_odd = nn.Linear(30, 32)
        self.frozen = nn.Linear(32, 32).requires_grad_(False)
        self.skip_me = nn.Linear(32, 32)
        self.head = nn.Linear(32, 10)
        self.tied = nn.Linear(32, 20, bias=False)
        self.tied.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.emb(idx)
        h = self.k_odd(self.odd(self.fc(h)))
        h = self.skip_me(self.frozen(h))
        return self.head(h), self.tied(h)


def test_fallbacks_are_reported_and_run():
    """10-output head: forward mask + dense backward; K%M, frozen, excluded, tied: dense, each with why."""
    model = Mixed()
    idx = torch.randint(0, 20, (4, 6))
    report = nmcompile.explain(model, idx, exclude=r"skip_me", inner="aot_eager")
    rows = {r.name: r for r in report.rows}
    assert rows["fc.weight"].sparse and rows["fc.weight"].backward == "bimask"
    assert rows["odd.weight"].sparse and rows["odd.weight"].backward == "dense"  # O=30
    assert "O=30 not divisible by m=4" in rows["odd.weight"].reason
    assert rows["head.weight"].sparse and rows["head.weight"].backward == "dense"
    assert "O=10" in rows["head.weight"].reason
    assert not rows["k_odd.weight"].sparse and "K=30 not divisible by m=4" in rows["k_odd.weight"].reason
    assert not rows["frozen.weight"].sparse and "frozen" in rows["frozen.weight"].reason
    assert not rows["skip_me.weight"].sparse and "exclude" in rows["skip_me.weight"].reason
    assert not rows["emb.weight"].sparse and "tied" in rows["emb.weight"].reason
    assert "0 sparse" not in str(report) and "head.weight" in str(report)
    # numbers: the compiled model equals the reference, which leaves the same layers dense
    ref = reference.sparsify(copy.deepcopy(model), exclude=r"skip_me")
    compiled = torch.compile(model, backend=nmcompile.backend(exclude=r"skip_me", inner="aot_eager"))
    out_ref, out = ref(idx), compiled(idx)
    for a, b in zip(out, out_ref, strict=True):
        assert_close(a, b, what="fallback outputs")
    sum(o.square().sum() for o in out).backward()
    sum(o.square().sum() for o in out_ref).backward()
    for (name, p_ref), p in zip(ref.named_parameters(), model.parameters(), strict=True):
        if p.requires_grad:
            assert_close(p.grad, p_ref.grad, what=name)
    assert set(nmcompile.sparsity_state(compiled)) == {"fc.weight", "odd.weight", "head.weight"}


def test_head_keeps_forward_mask_with_dense_backward():
    """A 10-output head: Y uses W ⊙ F, and dX = dY · (W ⊙ F) (no N:M mask along O=10)."""
    head = nn.Linear(32, 10)
    compiled = torch.compile(head, backend=nmcompile.backend(inner="aot_eager"))
    x = torch.randn(5, 32, requires_grad=True)
    dy = torch.randn(5, 10)
    y = compiled(x)
    y.backward(dy)
    wf = head.weight.detach() * reference.nm_mask(head.weight.detach(), 2, 4, 1)
    assert_close(y, x @ wf.t() + head.bias, what="Y")
    assert_close(x.grad, dy @ wf, what="dX")
    f = reference.nm_mask(head.weight.detach(), 2, 4, 1)
    expected_dw = dy.t() @ x.detach() + 2e-4 * head.weight.detach() * ~f
    assert_close(head.weight.grad, expected_dw, what="dW with SR-STE")


def test_include_selects_layers():
    """``include`` keeps only matching names sparse, and says nothing of names it does not match."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = nmcompile.explain(MLP(), torch.randn(4, 32), include=[r"^fc2\."], inner="aot_eager")
    assert not [w for w in caught if "matches no parameter" in str(w.message)]
    sparse = {r.name for r in report.rows if r.sparse}
    assert sparse == {"fc2.weight"}
    assert "not matched by include" in next(r.reason for r in report.rows if r.name == "fc1.weight")


@pytest.mark.parametrize("how", ["model", "function_given_the_model", "forward"])
def test_an_include_that_matches_no_parameter_warns(how):
    """An ``include`` that admits no parameter of the compiled model (a typo) warns that every
    layer stays dense, naming how the model spells its parameters: also where a compiled function
    reaches the model (given it, or ``torch.compile(model.forward)``), which warned nothing. A
    matching ``include`` there warns nothing, also for a graph that holds no layer it matches."""
    torch._dynamo.reset()
    model = MLP()
    pattern = r"^fc9\."
    message = (
        f"include={[pattern]} matches no parameter of the compiled model (its parameters are named as 'fc1.weight')"
    )

    def compiled(options: dict) -> Callable:
        backend = nmcompile.backend(inner="aot_eager", **options)
        if how == "model":
            return torch.compile(model, backend=backend)
        if how == "forward":
            return torch.compile(model.forward, backend=backend)
        step = torch.compile(lambda m, x: m.head(torch._dynamo.graph_break() or m.fc2(m.fc1(x))), backend=backend)
        return functools.partial(step, model)

    with pytest.warns(UserWarning, match=re.escape(message + ": every layer stays dense")):
        compiled({"include": pattern})(torch.randn(4, 32))
    assert nmcompile.sparsity_state(model) == {}
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiled({"include": r"^fc1\."})(torch.randn(4, 32))
    assert sorted(nmcompile.sparsity_state(model)) == ["fc1.weight"]


@pytest.mark.parametrize("how", ["model", "forward"])
def test_an_exclude_pattern_that_matches_no_parameter_warns(how):
    """Each ``exclude`` pattern that matches no parameter of the compiled model warns, naming it
    and how the model spells its parameters: a filter written with DDP's ``module.`` step for a
    plain model trained its layer sparse with nothing said. The pattern that matches warns nothing
    and keeps its layer dense."""
    torch._dynamo.reset()
    model = MLP()
    backend = nmcompile.backend(inner="aot_eager", exclude=[r"^fc2\.", r"^module\.head\."])
    compiled = torch.compile(model if how == "model" else model.forward, backend=backend)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(torch.randn(4, 32))
    messages = [str(w.message) for w in caught if "matches no parameter" in str(w.message)]
    assert messages == [
        "nmsparse exclude pattern '^module\\.head\\.' matches no parameter of the compiled model "
        "(its parameters are named as 'fc1.weight'): it keeps no layer dense"
    ]
    assert sorted(nmcompile.sparsity_state(model)) == ["fc1.weight", "head.weight"]


def test_entry_point_works_without_import():
    """``backend="nmsparse"`` resolves through the torch_dynamo_backends entry point alone."""
    code = (
        "import torch\n"
        "m = torch.nn.Linear(8, 8)\n"
        "y = torch.compile(m, backend='nmsparse', options={'inner': 'aot_eager'})(torch.randn(2, 8))\n"
        "import sys; assert 'nmcompile' in sys.modules\n"
        "from nmcompile import sparsity_state; assert sparsity_state(m)['weight']['step'] == 1\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


def test_a_checkout_no_install_maps_imports_its_passes(tmp_path):
    """The checkout on ``PYTHONPATH`` with no install mapping ``passes/`` to ``nmcompile.passes`` (``-S``
    skips the editable install's finder; a ``pip install .`` shadowed by ``python -m`` in the checkout
    is the same case) still imports the passes, from the checkout, and compiles."""
    root = Path(nmcompile.__file__).resolve().parent.parent
    site = sysconfig.get_paths()["purelib"]
    code = (
        "import sys, torch, nmcompile, nmcompile.passes\n"
        "from nmcompile.passes import find_targets\n"
        "print(nmcompile.passes.__file__)\n"
        "print(nmcompile.explain(torch.nn.Linear(8, 8), torch.randn(2, 8), inner='aot_eager').rows[0].reason)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), site])}
    result = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [str(root / "passes" / "__init__.py"), "2:4, backward=bimask"]


def test_another_checkout_takes_its_own_passes(tmp_path):
    """A second checkout run with a venv that holds this one's editable install (whose finder maps
    ``nmcompile.passes`` to this tree): the second checkout's package takes its own ``passes/``."""
    root = Path(nmcompile.__file__).resolve().parent.parent
    other = tmp_path / "other"
    for name in ("nmcompile", "passes"):
        shutil.copytree(root / name, other / name, ignore=shutil.ignore_patterns("__pycache__"))
    (other / "passes" / "__init__.py").write_text((root / "passes" / "__init__.py").read_text() + "MARK = 1\n")
    code = "import nmcompile.passes as p\nprint(p.__file__, p.MARK, __import__('nmcompile').__file__)"
    env = {**os.environ, "PYTHONPATH": str(other)}
    command = [sys.executable, "-c", code]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = [str(other / "passes" / "__init__.py"), "1", str(other / "nmcompile" / "__init__.py")]
    assert result.stdout.split() == expected


def test_aot_cache_serves_a_second_compile_of_the_same_nmcompile_only(monkeypatch):
    """Outside ``explain`` and dumps, a second compile of the same model (a restarted job) takes its
    forward and backward from AOTAutograd's cache and trains exactly as the first; the key carries a
    hash of nmcompile's sources (our ops' autograd, traced into the cached backward, is not in the
    graph), so an entry written by another nmcompile is not served. Tensor methods called on a
    sparse GEMM's output (``.relu()``, ``.view()``) keep the graph cacheable."""
    backend_module = sys.modules["nmcompile.backend"]  # the module (``nmcompile.backend`` is the function)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(32, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x).relu().view(-1)

    def train() -> list[torch.Tensor]:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = Net()
        compiled = torch.compile(model, backend=nmcompile.backend(grad_prune="mvue24", perm_interval=1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            optimizer.zero_grad()
            compiled(torch.randn(8, 32)).square().mean().backward()
            optimizer.step()
        return [p.detach().clone() for p in model.parameters()]

    def aot_cache() -> tuple[int, int]:
        return counters["aot_autograd"]["autograd_cache_miss"], counters["aot_autograd"]["autograd_cache_hit"]

    with torch._inductor.utils.fresh_cache():
        counters.clear()
        first = train()
        assert aot_cache() == (1, 0)
        second = train()
        assert aot_cache() == (1, 1)
        assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
        monkeypatch.setattr(backend_module, "_source_tag", lambda: "nmcompile-another-version")
        train()
        assert aot_cache() == (2, 1)
    torch._dynamo.reset()


def test_inductor_caches_graphs_and_aot_cache_stays_off():
    """A second compile of the same model hits Inductor's FX graph cache (forward and backward), with
    the mask decomposed into aten ops, and still records its graphs; AOTAutograd's own cache, a hit
    in which would skip the recording, is never consulted by a recorded compile (``explain``)."""
    with torch._inductor.utils.fresh_cache():
        counters.clear()
        nmcompile.explain(nn.Linear(16, 8), torch.randn(4, 16, requires_grad=True))
        assert counters["inductor"]["fxgraph_cache_miss"] == 2
        report = nmcompile.explain(nn.Linear(16, 8), torch.randn(4, 16, requires_grad=True))
        assert counters["inductor"]["fxgraph_cache_hit"] == 2
    assert not {key for key in counters["aot_autograd"] if key.startswith("autograd_cache")}
    for graph in (report.forward_graph, report.backward_graph):
        assert "nmsparse.nm_mask.default" not in {str(node.target) for node in graph.graph.nodes}
    backward = {str(node.target) for node in report.backward_graph.graph.nodes}
    if c_mask_kernels():  # Bi-Mask's B: the C kernel, else rank comparisons
        assert "nmsparse.cpu_bimask_weight.default" in backward
    else:
        assert "aten.ge.Tensor" in backward


@pytest.mark.parametrize("backward", ["bimask", "transposable"])
def test_backward_reads_masked_weight_not_bool_mask(backward):
    """The forward saves ``W ⊙ F`` (``<layer>_fwd_masked``) for the backward, which never loads a
    bool mask (slow vector loads in Inductor's CPU code), even where recomputing from one is smaller."""
    report = nmcompile.explain(MLP(), torch.randn(8, 32, requires_grad=True), backward=backward)
    assert {"fc1_fwd_masked", "fc2_fwd_masked", "head_fwd_masked"} <= {n.name for n in report.forward_graph.graph.nodes}
    saved = [n.meta["val"] for n in report.backward_graph.graph.nodes if n.op == "placeholder"]
    assert [t.dtype for t in saved if t.dtype == torch.bool] == []
    weights = [tuple(p.shape) for p in MLP().parameters() if p.dim() == 2]
    assert sorted(tuple(t.shape) for t in saved if t.dim() == 2 and tuple(t.shape) in weights) == sorted(weights * 2)


@pytest.mark.parametrize("alpha", [None, 0.25])
@pytest.mark.parametrize("use_perm", [True, False])
def test_masked_weight_stands_for_the_mask(alpha, use_perm):
    """``sparse_linear`` gets ``W ⊙ F`` and reads ``F`` back as ``W ⊙ F != 0``: with kept and pruned
    zeros (small integers, so fp32 is exact), Y, dX and dW equal the reference's formulas on the true
    ``F`` and ``B`` bit for bit, with mask decay too."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randint(-2, 3, (8, 16), generator=gen).float()
    w[0, :4] = 0.0  # a group of zeros: two of them kept
    x = torch.randint(-3, 4, (6, 16), generator=gen).float()
    dy = torch.randint(-3, 4, (6, 8), generator=gen).float()
    fmask = reference.nm_mask(w, 2, 4, 1)
    perm = torch.randperm(8, generator=gen) if use_perm else None
    bmask = reference.backward_mask(w, fmask, perm, 2, 4) if use_perm else fmask
    recipe = reference.Recipe(srste_lambda=0.5, alpha=alpha)
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    alpha_t = None if alpha is None else torch.tensor(alpha)
    masked = nmcompile.ops.masked_weight(w, fmask)
    y = torch.ops.nmsparse.sparse_linear(xl, wl, None, masked, perm, 2, 4, 0.5, "t", None, alpha_t)
    y.backward(dy)
    assert torch.equal(y, x @ recipe.weight(w, fmask).t())
    assert torch.equal(xl.grad, dy @ recipe.weight(w, bmask))
    assert torch.equal(wl.grad, recipe.srste(dy.t() @ x, w, fmask))


FORWARD_WEIGHT_CASES = {
    "mlp": (MLP, (8, 32), {}),
    "inout": (MODELS["inout"][0], (8, 32), {"backward": "transposable"}),
    "mask_decay": (MLP, (8, 32), {"mask_decay": "linear", "mask_decay_rate": 0.3}),
    "structure_decay": (MLP, (8, 32), {"structure_decay": True, "total_steps": 8}),
    "conv": (BasicBlock, (2, 16, 8, 8), {}),
}


def test_forward_weights_of_a_loaded_model_before_its_first_compile_warn():
    """A model loaded from a checkpoint holds its states until its first compiled forward, whose
    options say the N:M: ``forward_weights`` before it has none to give and says so (it returned
    ``{}`` silently, and an export loaded the dense weights); after a ``no_grad`` forward it gives
    the trained model's, at the checkpoint's step."""
    model = MLP()
    compiled = torch.compile(model, backend=nmcompile.backend(inner="aot_eager"))
    for _ in range(3):
        compiled(torch.randn(4, 32)).sum().backward()
    expected = nmcompile.forward_weights(model)
    fresh = MLP()
    fresh.load_state_dict(model.state_dict())
    with pytest.warns(UserWarning, match=r"forward_weights leaves out fc1.weight, fc2.weight, head.weight: their"):
        assert nmcompile.forward_weights(fresh) == {}
    with pytest.warns(UserWarning, match=r"loaded from a checkpoint or carried by a copy of the model, wait"):
        assert nmcompile.forward_weights(copy.deepcopy(model)) == {}
    with torch.no_grad():
        torch.compile(fresh, backend=nmcompile.backend(inner="aot_eager"))(torch.randn(4, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = nmcompile.forward_weights(fresh)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    assert {s["step"] for s in nmcompile.sparsity_state(fresh).values()} == {3}


def test_forward_weights_leave_out_layers_frozen_after_sparse_training():
    """A backbone frozen after sparse training (``requires_grad_(False)``, then the head fine-tuned)
    runs dense (SPEC §10), so ``forward_weights`` gives the head's alone: loaded over the plain
    model it computes the compiled eval forward (the frozen layers' masked weights were given too,
    0.39 off), and a fresh copy with frozen layers does not wait for their sparse forward."""
    torch.manual_seed(0)
    model = MLP()
    compiled = torch.compile(model, backend=nmcompile.backend(inner="aot_eager"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for frozen in (False, True):
        model.fc1.requires_grad_(not frozen), model.fc2.requires_grad_(not frozen)
        for _ in range(2):
            compiled(torch.randn(8, 32)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    weights = nmcompile.forward_weights(model)
    assert sorted(weights) == ["head.weight"]
    assert sorted(nmcompile.sparsity_state(model)) == ["fc1.weight", "fc2.weight", "head.weight"]
    plain = MLP()
    plain.load_state_dict({**model.state_dict(), **weights})
    x = torch.randn(8, 32)
    with torch.no_grad():
        assert_close(plain.eval()(x), compiled.eval()(x), rel=1e-6)
    fresh = MLP()
    fresh.load_state_dict(model.state_dict())
    fresh.fc1.requires_grad_(False), fresh.fc2.requires_grad_(False)
    with pytest.warns(UserWarning, match=r"forward_weights leaves out head.weight: their"):
        assert nmcompile.forward_weights(fresh) == {}


def test_forward_weights_leave_out_layers_a_later_compile_runs_dense():
    """A model trained sparse, then compiled again with options that leave a layer dense
    (``exclude``), runs that layer dense: ``forward_weights`` leaves it out, so the plain model
    computes the compiled eval forward (it gave the layer's old masked weight); its state
    stays for a sparse compile, and a forward of the first compile puts the layer back. ``explain``
    with such options, on its private states, changes none of this."""
    torch.manual_seed(0)
    model = MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    first = torch.compile(model, backend=nmcompile.backend(inner="aot_eager"))
    later = torch.compile(model, backend=nmcompile.backend(inner="aot_eager", exclude="fc2"))
    for compiled in (first, later):
        for _ in range(2):
            compiled(torch.randn(8, 32)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        if compiled is first:
            nmcompile.explain(model, torch.randn(8, 32), inner="aot_eager", exclude="fc2")
            assert "fc2.weight" in nmcompile.forward_weights(model)
    weights = nmcompile.forward_weights(model)
    assert sorted(weights) == ["fc1.weight", "head.weight"]
    assert nmcompile.sparsity_state(model)["fc2.weight"]["step"] == 2
    plain = MLP()
    plain.load_state_dict({**model.state_dict(), **weights})
    x = torch.randn(8, 32)
    with torch.no_grad():
        assert_close(plain.eval()(x), later.eval()(x), rel=1e-6)
        first(x)
    assert sorted(nmcompile.forward_weights(model)) == ["fc1.weight", "fc2.weight", "head.weight"]


@pytest.mark.parametrize("case", FORWARD_WEIGHT_CASES)
def test_forward_weights_give_a_plain_model_the_compiled_eval_forward(case):
    """After training, ``forward_weights`` loaded over a plain model's dense ``state_dict`` make it
    compute what the compiled model computes in eval (``state_dict`` itself keeps dense weights):
    2:4 weights keep 2 of each 4 along the reduction dim; with mask decay the pruned ones are
    scaled by α, not zero."""
    make, shape, options = FORWARD_WEIGHT_CASES[case]
    torch.manual_seed(0)
    model = make()
    compiled = torch.compile(model, backend=nmcompile.backend(inner="aot_eager", **options))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        compiled(torch.randn(shape)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    weights = nmcompile.forward_weights(compiled)
    state = nmcompile.sparsity_state(compiled)
    assert weights.keys() == state.keys() and weights
    plain = copy.deepcopy(make())
    plain.load_state_dict({**compiled._orig_mod.state_dict(), **weights})  # the wrapper's keys carry _orig_mod.
    model.eval()
    plain.eval()
    x = torch.randn(shape)
    with torch.no_grad():
        assert_close(plain(x), compiled(x), rel=1e-6, what=case)
    for name, w in weights.items():
        param = dict(model.named_parameters())[name]
        assert w.shape == param.shape and w.dtype == param.dtype
        matrix = w.t() if case == "inout" and "c_" in name else w
        kept = (matrix != 0).unflatten(1, (-1, 4)).sum(2)
        n = state[name]["n_effective"]
        if case == "mask_decay":
            assert (kept == 4).all(), name  # α(3) = 0.1: pruned weights scaled, not cut
            assert_close(w[w != param], param[w != param] * 0.1, what=name)
        else:
            assert (kept == n).all(), name
            assert_close(w[w != 0], param[w != 0], rel=0, what=name)
    assert {s["step"] for s in nmcompile.sparsity_state(compiled).values()} == {3}
