"""Options of the ``nmsparse`` backend: defaults, validation messages, and where errors surface."""

from __future__ import annotations

import dataclasses
import importlib
import math
import re

import pytest
import torch

import nmcompile
from nmcompile.options import SparsityConfig, SparsityConfigError


def _bad(key: str, value: object) -> str:
    """A ``match`` pattern requiring the message to say that option ``key`` has the bad ``value``."""
    return re.escape(f"option {key}={value!r} is invalid")


def test_defaults():
    """SPEC §4–§6 defaults: 2:4, bimask, 100 candidates every 100 steps, SR-STE 2e-4, seed 0, Inductor."""
    c = SparsityConfig()
    assert (c.n, c.m, c.backward) == (2, 4, "bimask")
    assert (c.perm_candidates, c.perm_interval, c.perm_swaps) == (100, 100, 0)
    assert c.srste_lambda == 2e-4 and isinstance(c.srste_lambda, float)
    assert c.seed == 0
    assert c.include == () and c.exclude == ()
    assert c.inner == "inductor"
    assert SparsityConfig.from_options(None) == c
    assert SparsityConfig.from_options({}) == c


def test_config_error_is_value_error():
    """A bad option is a ValueError (SparsityConfigError subclasses it) naming the option it rejects."""
    assert issubclass(SparsityConfigError, ValueError)
    with pytest.raises(SparsityConfigError) as info:
        SparsityConfig(m=1)
    assert info.value.option == "m"
    with pytest.raises(SparsityConfigError) as info:
        SparsityConfig.from_options({"n": 2, "bogus": 1})
    assert info.value.option == "bogus"


@pytest.mark.parametrize("m", [1, 33, 0, -4, 2.0, 4.0, True, "4", None])
def test_bad_m(m):
    """SPEC §2: m must be an int in 2..32."""
    with pytest.raises(ValueError, match=_bad("m", m)):
        SparsityConfig(m=m)


@pytest.mark.parametrize("n,m", [(0, 4), (5, 4), (-1, 4), (3, 2), (2.0, 4), (True, 4)])
def test_bad_n(n, m):
    """SPEC §2: n must be an int with 1 <= n <= m."""
    with pytest.raises(ValueError, match=_bad("n", n)):
        SparsityConfig(n=n, m=m)


@pytest.mark.parametrize("backward", ["bogus", "Bimask", "", None, "transposed"])
def test_bad_backward(backward):
    """SPEC §4: backward is one of bimask, transposable, dense."""
    with pytest.raises(ValueError, match=_bad("backward", backward)):
        SparsityConfig(backward=backward)


@pytest.mark.parametrize("value", [-1, -100, 1.5, True])
def test_bad_perm_candidates(value):
    """SPEC §5: perm_candidates is an int >= 0."""
    with pytest.raises(ValueError, match=_bad("perm_candidates", value)):
        SparsityConfig(perm_candidates=value)


@pytest.mark.parametrize("value", [-1, 1.5, True, "4", None])
def test_bad_perm_swaps(value):
    """``perm_swaps`` (SPEC §5's named better search) is an int >= 0."""
    with pytest.raises(SparsityConfigError, match=_bad("perm_swaps", value)) as info:
        SparsityConfig(perm_swaps=value)
    assert info.value.option == "perm_swaps"


@pytest.mark.parametrize("backward", ["transposable", "dense"])
def test_perm_swaps_needs_bimask(backward):
    """Only Bi-Mask has a permutation: ``perm_swaps`` with another backward is an error (nothing
    would read it), 0 is not."""
    with pytest.raises(SparsityConfigError, match=_bad("perm_swaps", 5) + ".*backward='bimask'"):
        SparsityConfig(backward=backward, perm_swaps=5)
    assert SparsityConfig(backward=backward, perm_swaps=0).perm_swaps == 0
    assert SparsityConfig(perm_swaps=5).perm_swaps == 5


@pytest.mark.parametrize("value", [0, -3, 2.0, True])
def test_bad_perm_interval(value):
    """SPEC §5: perm_interval is an int >= 1 (0 would never advance the schedule)."""
    with pytest.raises(ValueError, match=_bad("perm_interval", value)):
        SparsityConfig(perm_interval=value)


@pytest.mark.parametrize("value", [-1e-4, -1, math.nan, math.inf, -math.inf, 10**400, "2e-4", True])
def test_bad_srste_lambda(value):
    """SPEC §6: srste_lambda is a finite float >= 0."""
    with pytest.raises(ValueError, match=_bad("srste_lambda", value)):
        SparsityConfig(srste_lambda=value)


@pytest.mark.parametrize("value", [-1, 2**63, 1.5, 0.0, "0", True])
def test_bad_seed(value):
    """SPEC §5: seed is a non-negative int (it seeds the candidate generator)."""
    with pytest.raises(ValueError, match=_bad("seed", value)):
        SparsityConfig(seed=value)


@pytest.mark.parametrize("key", ["include", "exclude"])
@pytest.mark.parametrize("value", [3, [1], ["fc1", 2], {"fc1"}, None, b"fc1"])
def test_bad_include_exclude_type(key, value):
    """SPEC §10: include/exclude are a regex string or a list of regex strings."""
    with pytest.raises(ValueError, match=_bad(key, value)):
        SparsityConfig(**{key: value})


@pytest.mark.parametrize("key", ["include", "exclude"])
@pytest.mark.parametrize("value,bad", [("(", "("), (["fc1", "[a-"], "[a-"), ("*x", "*x")])
def test_bad_include_exclude_regex(key, value, bad):
    """SPEC §10: include/exclude patterns must compile as regular expressions; the message names the bad one."""
    with pytest.raises(ValueError, match=_bad(key, bad)):
        SparsityConfig(**{key: value})


@pytest.mark.parametrize("value", ["eager", "Inductor", "", None])
def test_bad_inner(value):
    """The inner compiler is inductor or aot_eager."""
    with pytest.raises(ValueError, match=_bad("inner", value)):
        SparsityConfig(inner=value)


def test_unknown_key_lists_known_options():
    """An unknown option is a ValueError that names it and lists the known options."""
    with pytest.raises(ValueError, match=_bad("nn", 2)) as info:
        SparsityConfig.from_options({"nn": 2})
    message = str(info.value)
    for known in ("n", "m", "backward", "perm_candidates", "perm_interval", "srste_lambda", "seed", "inner"):
        assert repr(known) in message
    with pytest.raises(ValueError, match=_bad("backwards", "dense")):
        SparsityConfig.from_options(backwards="dense")


@pytest.mark.parametrize("options", ["n=2", [("n", 2)], 5])
def test_options_that_are_not_a_mapping_are_a_clear_error(options):
    """``options=`` must be a mapping: anything else is a SparsityConfigError naming its type, also
    through ``torch.compile`` (it was a TypeError, wrapped in BackendCompilerFailed)."""
    with pytest.raises(SparsityConfigError, match=f"must be a mapping .*got {type(options).__name__}"):
        SparsityConfig.from_options(options)
    torch._dynamo.reset()
    compiled = torch.compile(torch.nn.Linear(8, 4), backend="nmsparse", options=options)
    with pytest.raises(SparsityConfigError, match="must be a mapping"):
        compiled(torch.randn(2, 8))


def test_valid_edge_values():
    """Edge values inside the ranges are accepted: n=m=32, 1:2, zero SR-STE, no candidates, single-string include."""
    c = SparsityConfig(n=32, m=32)
    assert (c.n, c.m) == (32, 32)
    c = SparsityConfig(n=1, m=2)
    assert (c.n, c.m) == (1, 2)
    c = SparsityConfig(srste_lambda=0)
    assert c.srste_lambda == 0.0 and isinstance(c.srste_lambda, float)
    c = SparsityConfig(mask_decay="linear", mask_decay_rate=1)  # an int rate is a float, as an int λ is
    assert c.mask_decay_rate == 1.0 and isinstance(c.mask_decay_rate, float)
    c = SparsityConfig(perm_candidates=0, perm_interval=1, seed=2**63 - 1)
    assert (c.perm_candidates, c.perm_interval, c.seed) == (0, 1, 2**63 - 1)
    c = SparsityConfig(include=r"fc\d", exclude=["head", "emb"])
    assert c.include == (r"fc\d",) and c.exclude == ("head", "emb")
    for mode in ("bimask", "transposable", "dense"):
        assert SparsityConfig.from_options({"backward": mode}).backward == mode
    for inner in ("inductor", "aot_eager"):
        assert SparsityConfig.from_options(inner=inner).inner == inner


def test_from_options_merges_mapping_and_keywords():
    """Keywords override the mapping; an existing config passes through."""
    c = SparsityConfig.from_options({"n": 1, "m": 8}, n=3)
    assert (c.n, c.m) == (3, 8)
    assert SparsityConfig.from_options(c) is c
    assert SparsityConfig.from_options(c, backward="dense") == SparsityConfig(n=3, m=8, backward="dense")


def test_backend_factory_validates_at_construction():
    """nmcompile.backend(...) checks its options when built, before any compile."""
    with pytest.raises(ValueError, match=_bad("n", 5)):
        nmcompile.backend(m=3, n=5)
    with pytest.raises(ValueError, match=_bad("backward", "bogus")):
        nmcompile.backend(backward="bogus")
    assert nmcompile.backend(n=1, m=4).config == SparsityConfig(n=1, m=4)


def test_backend_class_takes_only_a_config():
    """``NMSparseBackend(config)`` built directly checks that it was given a ``SparsityConfig``
    (a mapping there used to fail only inside the first compile, as an AttributeError)."""
    with pytest.raises(SparsityConfigError, match=r"NMSparseBackend takes a SparsityConfig, got dict \{'n': 2\}"):
        nmcompile.NMSparseBackend({"n": 2})
    assert nmcompile.NMSparseBackend(SparsityConfig(n=1)).config == SparsityConfig(n=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"registry": "oops"}, "NMSparseBackend registry= takes a StateRegistry, got str"),
        ({"on_compile": 5}, "NMSparseBackend on_compile= takes a callable or None, got int 5"),
        ({"on_failure": "log"}, "NMSparseBackend on_failure= takes a callable or None, got str 'log'"),
    ],
)
def test_backend_class_checks_its_registry_and_callbacks(kwargs, message):
    """The registry and callbacks are checked where the backend is built (they used to fail only inside
    the first compile, as a BackendCompilerFailed)."""
    with pytest.raises(SparsityConfigError, match=re.escape(message)):
        nmcompile.NMSparseBackend(SparsityConfig(), **kwargs)
    records = []
    built = nmcompile.NMSparseBackend(SparsityConfig(), on_compile=records.append, on_failure=None)
    assert built.on_compile == records.append and built.on_failure is None


def test_string_backend_bad_option_raises_value_error_before_tracing(monkeypatch):
    """A bad option through backend="nmsparse" reaches the caller as ValueError, before find_targets runs."""
    from torch._dynamo.exc import BackendCompilerFailed

    backend_module = importlib.import_module("nmcompile.backend")

    def must_not_run(*args, **kwargs):
        pytest.fail("find_targets was called despite an invalid option")

    monkeypatch.setattr(backend_module, "find_targets", must_not_run)
    torch._dynamo.reset()
    try:
        model = torch.nn.Linear(8, 4)
        compiled = torch.compile(model, backend="nmsparse", options={"backward": "bogus"})
        with pytest.raises(ValueError, match=_bad("backward", "bogus")) as info:
            compiled(torch.randn(2, 8))
        assert not isinstance(info.value, BackendCompilerFailed)
        assert isinstance(info.value, SparsityConfigError)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("string_backend", [True, False], ids=["string", "object"])
def test_compile_mode_sets_up_the_inner_inductor_compile(monkeypatch, string_backend):
    """``torch.compile(mode=...)`` reaches the inner Inductor compile, forward and backward, as that
    mode's settings (reduce-overhead: CUDA graphs, which Inductor leaves out for CPU tensors); the
    numbers stay those of the default mode."""
    import torch._inductor.compile_fx as compile_fx

    seen = []
    original = compile_fx.compile_fx_inner

    def recording(*args, **kwargs):
        seen.append(torch._inductor.config.triton.cudagraphs)
        return original(*args, **kwargs)

    monkeypatch.setattr(compile_fx, "compile_fx_inner", recording)
    torch.manual_seed(0)
    model = torch.nn.Linear(32, 16)
    x = torch.randn(8, 32)
    outputs, grads = [], []
    with torch._inductor.utils.fresh_cache():  # compiled, not served from an earlier test's cache entry
        for mode in ("default", "reduce-overhead"):
            torch._dynamo.reset()
            y = torch.compile(model, backend="nmsparse" if string_backend else nmcompile.backend(), mode=mode)(x)
            y.square().sum().backward()
            outputs.append(y.detach())
            grads.append(model.weight.grad)
            model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    assert seen == [False, False, True, True]
    assert torch.equal(outputs[0], outputs[1])
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize(
    "backend,kwargs,message",
    [
        ("nmsparse", {"mode": "fastest"}, "mode='fastest' is invalid for nmsparse: allowed ['default', "),
        ("object", {"mode": "bogus"}, "mode='bogus' is invalid"),
        ("aot_eager", {"mode": "max-autotune"}, "with inner='aot_eager' leave mode out"),
        ("object", {"options": {"n": 1}}, "options={'n': 1} with a nmcompile.backend(...) object"),
    ],
)
def test_bad_compile_mode_or_options_raise_value_error(backend, kwargs, message):
    """An unknown ``mode``, a mode with ``inner="aot_eager"``, or ``options=`` beside a backend object
    (whose options are fixed) raise a ``SparsityConfigError`` at the first call, unwrapped."""
    from torch._dynamo.exc import BackendCompilerFailed

    chosen = {"nmsparse": "nmsparse", "object": nmcompile.backend(), "aot_eager": nmcompile.backend(inner="aot_eager")}
    torch._dynamo.reset()
    compiled = torch.compile(torch.nn.Linear(8, 4), backend=chosen[backend], **kwargs)
    with pytest.raises(SparsityConfigError, match=re.escape(message)) as info:
        compiled(torch.randn(2, 8))
    assert not isinstance(info.value, BackendCompilerFailed)
    torch._dynamo.reset()


def test_name_filter_reason_include_exclude():
    """SPEC §10: include/exclude use re.search on parameter names; None keeps, a reason names the pattern (repr)."""
    fc1 = "encoder.layers.0.fc1.weight"
    fc2 = "encoder.layers.1.fc2.weight"
    head = "head.weight"

    everything = SparsityConfig()
    assert everything.name_filter_reason(fc1) is None
    assert everything.name_filter_reason(head) is None

    include = SparsityConfig(include=[r"fc\d"])
    assert include.name_filter_reason(fc1) is None  # matched in the middle: search, not match
    assert include.name_filter_reason(fc2) is None
    reason = include.name_filter_reason(head)
    assert reason is not None and repr(r"fc\d") in reason and "include" in reason

    anchored = SparsityConfig(include="^fc1")
    reason = anchored.name_filter_reason(fc1)
    assert reason is not None and repr("^fc1") in reason

    exclude = SparsityConfig(exclude=[r"layers\.1\.", "head"])
    assert exclude.name_filter_reason(fc1) is None
    reason = exclude.name_filter_reason(fc2)
    assert reason is not None and repr(r"layers\.1\.") in reason and "exclude" in reason
    reason = exclude.name_filter_reason(head)
    assert reason is not None and "'head'" in reason

    both = SparsityConfig(include="encoder", exclude="fc2")
    assert both.name_filter_reason(fc1) is None
    reason = both.name_filter_reason(fc2)  # included, but exclude wins
    assert reason is not None and repr("fc2") in reason
    reason = both.name_filter_reason(head)
    assert reason is not None and repr("encoder") in reason


def test_srste_default_resolves_against_mask_decay():
    """srste_lambda unset: 2e-4, or 0 with mask decay (SPEC §6); explicit > 0 with mask decay is an error."""
    assert SparsityConfig().srste_lambda == 2e-4
    assert SparsityConfig(mask_decay="linear").srste_lambda == 0.0
    assert SparsityConfig(mask_decay="exponential", srste_lambda=0).srste_lambda == 0.0
    with pytest.raises(ValueError, match=r"srste_lambda=0\.0002 .*mask decay replaces SR-STE"):
        SparsityConfig(mask_decay="linear", srste_lambda=2e-4)


def test_a_rebuilt_config_resolves_an_unset_srste_lambda_again():
    """A config rebuilt with another mask_decay (``from_options`` with keywords,
    ``dataclasses.replace``) chooses the unset λ again; a λ the user gave is kept, and checked."""
    for rebuild in (SparsityConfig.from_options, dataclasses.replace):
        assert rebuild(SparsityConfig(), mask_decay="linear").srste_lambda == 0.0
        assert rebuild(SparsityConfig(mask_decay="linear"), mask_decay="none").srste_lambda == 2e-4
        assert rebuild(SparsityConfig(srste_lambda=0), mask_decay="none").srste_lambda == 0.0
        with pytest.raises(ValueError, match=r"srste_lambda=0\.001 .*mask decay replaces SR-STE"):
            rebuild(SparsityConfig(srste_lambda=1e-3), mask_decay="linear")


def test_recipe_defaults():
    c = SparsityConfig()
    assert (c.grad_prune, c.mask_decay, c.mask_decay_rate, c.structure_decay) == ("none", "none", 2e-4, False)
    assert (c.dense_steps, c.finetune_steps, c.total_steps) == (0, 0, None)
    assert c.kernels == "auto"
    kernels = ("auto", "triton", "portable", "sparse24")
    assert {SparsityConfig(kernels=k).kernels for k in kernels} == set(kernels)


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"grad_prune": "topk"}, "grad_prune"),
        ({"grad_prune": "mvue48"}, "grad_prune"),
        ({"kernels": "cuda"}, "kernels"),
        ({"kernels": None}, "kernels"),
        ({"mask_decay": "cosine"}, "mask_decay"),
        ({"mask_decay": "linear", "mask_decay_rate": 0}, "mask_decay_rate"),
        ({"mask_decay": "linear", "mask_decay_rate": math.inf}, "mask_decay_rate"),
        ({"mask_decay": "linear", "mask_decay_rate": 10**400}, "mask_decay_rate"),
        ({"structure_decay": 1}, "structure_decay"),
        ({"structure_decay": True}, "total_steps"),
        ({"structure_decay": True, "total_steps": 10, "dense_steps": 5, "finetune_steps": 5}, "total_steps"),
        (
            {"structure_decay": True, "n": 1, "m": 8, "total_steps": 12, "dense_steps": 6, "finetune_steps": 3},
            "total_steps",
        ),
        ({"structure_decay": True, "n": 1, "m": 32, "total_steps": 3}, "total_steps"),
        ({"structure_decay": True, "total_steps": True}, "total_steps"),
        ({"mask_decay": "linear", "dense_steps": True}, "dense_steps"),
        ({"mask_decay": "linear", "mask_decay_rate": math.nan}, "mask_decay_rate"),
        ({"mask_decay": "linear", "mask_decay_rate": True}, "mask_decay_rate"),
        ({"total_steps": 0}, "total_steps"),
        ({"total_steps": 100}, "total_steps"),  # read by structure decay only
        ({"mask_decay": "none", "mask_decay_rate": 0.1}, "mask_decay_rate"),  # read by mask decay only
        ({"dense_steps": 10}, "dense_steps"),
        ({"mask_decay": "linear", "dense_steps": -1}, "dense_steps"),
        ({"mask_decay": "linear", "finetune_steps": 5}, "finetune_steps"),
    ],
)
def test_bad_recipe_options(options, key):
    """SPEC §7/§8 options: each bad value or combination is a ValueError naming the key."""
    with pytest.raises(ValueError, match=f"nmsparse option {key}="):
        SparsityConfig(**options)


def test_valid_recipes():
    c = SparsityConfig(
        n=1,
        m=8,
        structure_decay=True,
        total_steps=100,
        dense_steps=10,
        finetune_steps=10,
        mask_decay="exponential",
        grad_prune="mvue24",
    )
    assert c.structure_decay and c.total_steps == 100 and c.srste_lambda == 0.0


def test_structure_decay_needs_a_step_per_stage():
    """SPEC §8's equal frames are at least one step each: the shortest schedule walks every N:M of the
    sequence once (1:8: 7, 4, 2, 1), and the error says how many steps it needs."""
    from nmcompile.reference import effective_n

    c = SparsityConfig(n=1, m=8, structure_decay=True, total_steps=7, dense_steps=2, finetune_steps=1)
    assert [effective_n(c, t) for t in range(8)] == [8, 8, 7, 4, 2, 1, 1, 1]
    # Mask decay's masks keep N through dense_steps (α = 1 makes them dense), as sparsity_state says.
    decay = SparsityConfig(n=1, m=8, mask_decay="linear", dense_steps=2)
    assert [effective_n(decay, t) for t in range(4)] == [1, 1, 1, 1]
    message = "at least dense_steps + finetune_steps + 4 (a step for each of 7:8 -> 4:8 -> 2:8 -> 1:8)"
    with pytest.raises(ValueError, match=re.escape(message)):
        SparsityConfig(n=1, m=8, structure_decay=True, total_steps=6, dense_steps=2, finetune_steps=1)


@pytest.mark.parametrize(
    ("n", "m", "walk"),
    [(1, 8, [7, 4, 2, 1]), (2, 4, [3, 2]), (1, 4, [3, 2, 1]), (3, 4, [3]), (4, 4, [4]), (3, 8, [7, 4, 3]),
     (1, 32, [31, 16, 8, 4, 2, 1]), (5, 6, [5]), (1, 6, [5, 3, 1])],
)  # fmt: skip
def test_structure_sequence_walks_from_m_minus_1_halving_to_n(n, m, walk):
    """SPEC §8: ``(m−1):m → m/2:m → m/4:m → … → n:m``; a target of ``m−1`` or ``m`` (dense) is
    the whole walk, and a dense target never runs sparser than itself."""
    from nmcompile.options import structure_sequence
    from nmcompile.reference import effective_n

    assert structure_sequence(n, m) == walk
    c = SparsityConfig(n=n, m=m, structure_decay=True, total_steps=len(walk))
    assert [effective_n(c, t) for t in range(len(walk) + 1)] == [*walk, n]


def test_power_of_two():
    """The one M test the kernel paths share (register tiles need power-of-two extents)."""
    from nmcompile.options import power_of_two

    assert [m for m in range(0, 33) if power_of_two(m)] == [1, 2, 4, 8, 16, 32]
