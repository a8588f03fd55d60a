"""Shared fixtures and small models for the nmcompile tests."""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import types
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.sparse._semi_structured_conversions import sparse_semi_structured_to_dense_cutlass
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

if not torch.cuda.is_available():  # Triton kernels run on the CPU through the interpreter (set before import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import nmcompile
from nmcompile import reference
from nmcompile.kernels.common import interpreting

# The kernel tests hold fp32 GEMMs to fp32 tolerances, and the Triton GEMMs follow torch's TF32 switch
# (``common.input_precision``): keep it off, as torch's default is, also where TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1.
torch.backends.cuda.matmul.allow_tf32 = False

# Tests that lower CPU tensors onto the Triton kernels need the interpreter, which is on only without
# CUDA; on a GPU machine the CUDA tests cover the kernels instead.
interpreted = pytest.mark.skipif(not interpreting(), reason="Triton kernels on CPU tensors need TRITON_INTERPRET=1")
# The report's reason why a CPU weight's GEMM stays portable instead of running on Triton.
NOT_ON_CUDA = "not on CUDA (kernels='triton' with TRITON_INTERPRET=1 runs the kernels on the CPU)"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts with empty dynamo caches and counters and a fixed seed."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


class MLP(nn.Module):
    def __init__(self, d_in: int = 32, hidden: int = 64, d_out: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(nn.functional.gelu(self.fc1(x)))))


class Block(nn.Module):
    """A pre-norm transformer block written with nn.Linear: attention + MLP + LayerNorm."""

    def __init__(self, d: int = 32, heads: int = 4, ff: int = 64) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.ln1(x)

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        att = torch.softmax(split(self.q(h)) @ split(self.k(h)).transpose(-1, -2) / (d // self.heads) ** 0.5, -1)
        x = x + self.o((att @ split(self.v(h))).transpose(1, 2).reshape(b, t, d))
        return x + self.down(nn.functional.gelu(self.up(self.ln2(x))))


class Conv1D(nn.Module):
    """GPT-2's Conv1D: weight stored [in, out], applied with addmm."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out) * 0.1)
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return out.view(*x.shape[:-1], -1)


class Projection(nn.Module):
    """A [out, in] weight used as ``x @ W.t()``."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()


class InOut(nn.Module):
    """Layers in [in, out]/addmm layout and a transposed [out, in] matmul."""

    def __init__(self) -> None:
        super().__init__()
        self.c_fc = Conv1D(32, 64)
        self.proj = Projection(64, 32)
        self.c_out = Conv1D(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_out(torch.tanh(self.proj(torch.relu(self.c_fc(x)))))


MODELS = {
    "mlp": (MLP, (8, 32)),
    "block": (Block, (2, 8, 32)),
    "inout": (InOut, (8, 32)),
}


# 2:4 blocks (rows) whose largest entry dwarfs the rest, so that an fp32 total less that entry
# cancels (SPEC §7: the MVUE rules must stay unbiased there).
DOMINANT_BLOCKS = ((1000.0, 1e-3, 0.0, 0.0), (1e4, 1e-3, 2e-3, 3e-3), (300.0, 0.01, -0.02, 0.0))


# 2:4 blocks on which the fp32 ends of the old systematic sampling left a gap or an overlap at some
# uniform: the largest entry's probability rounded above 1 (one entry kept), a zero last entry took
# the slack (one kept), a last dominant entry was dropped, and the two-draw rule's second draw fell
# on a zero last entry (one kept).
ROUNDING_BLOCKS = (
    (0.005998578388243914, 0.004599669948220253, 0.00012723528197966516, 0.001271673128940165),
    (-5.517500176210888e-05, 0.00033199938479810953, -0.00014549971092492342, 0.0),
    (0.0005005800630897284, 0.0, 0.040941569954156876, -0.06432504206895828),
    (-188.73031616210938, 107.06975555419922, -43.010986328125, 0.0),
)


def boundary_draws(rule: str, count: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """MVUE 2:4 blocks with uniforms next to every end of their sampling intervals (SPEC §7, in
    float64), where rounding decides which entry a uniform falls in: ``(a [4, B], u [2, B])``, column
    ``j`` one block with its two uniforms. The blocks are ``ROUNDING_BLOCKS`` and ``count`` random
    ones: near-ties of the largest entry with the sum of the rest, dominant entries, zeros, signs."""
    g = torch.Generator().manual_seed(11)
    rand = torch.rand(count, 4, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(
        -3, 4, (count, 1), generator=g
    )
    third = count // 3
    rand[:third, 0] = rand[:third, 1:].sum(1) * (1 + torch.randint(-4, 5, (third,), generator=g) * 2.0**-24)
    rand[third : 2 * third, 0] *= 30
    rand[torch.rand(count, 4, generator=g) < 0.15] = 0
    rand *= torch.where(torch.rand(count, 4, generator=g) < 0.5, -1.0, 1.0)
    rand = rand[:, torch.randperm(4, generator=g)]
    blocks = torch.cat([torch.tensor(ROUNDING_BLOCKS), rand.float()]).double()
    mag = blocks.abs()
    total = mag.sum(1, keepdim=True)
    top = mag.amax(1, keepdim=True)
    near = torch.arange(-8, 9, dtype=torch.float64) * 2.0**-24

    def grid(u: torch.Tensor) -> torch.Tensor:
        """``u`` as a uniform can be: a whole multiple of 2⁻²⁴ in ``[0, 1)``."""
        return (u.clamp(0, 1 - 2.0**-24) * 2**24).floor() * 2.0**-24

    def points(p: torch.Tensor) -> torch.Tensor:
        """Uniforms around every interval end of ``p`` laid end to end, and around it less 1."""
        ends = p.cumsum(1)[:, :3]
        u = torch.cat([ends, ends - 1], 1)[:, :, None] + near
        return grid(torch.cat([u.flatten(1), torch.tensor([[0.0, 1.0]]).expand(len(p), 2)], 1))

    if rule == "mvue24":  # both layouts: a near-tie is sampled as dominant (reference.NEAR_TIE)
        dominant = top > total - top
        p = torch.where(dominant, torch.where(mag == top, 1.0, mag / (total - top)), 2 * mag / total).nan_to_num(0.0)
        others = torch.where(mag == top, 0.0, mag / (total - top)).nan_to_num(0.0)
        u0 = torch.cat([points(p), points(others)], 1)
        u = torch.stack([u0, torch.zeros_like(u0)])
    else:
        p = (mag / total).nan_to_num(0.0)
        first = points(p)
        u = [torch.stack([first, torch.full_like(first, x)]) for x in (0.0, 0.5, 1 - 2.0**-24)]
        for f in range(4):  # a first draw inside entry f's interval, the second around the ends of the rest
            middle = p.cumsum(1)[:, f] - p[:, f] / 2
            q = torch.where(torch.arange(4) == f, 0.0, mag / (total - mag[:, f : f + 1])).nan_to_num(0.0)
            second = points(q)
            u.append(torch.stack([grid(middle)[:, None].expand_as(second), second]))
        u = torch.cat(u, 2)
    a = blocks.float()[:, :, None].expand(-1, -1, u.shape[2])
    return a.permute(1, 0, 2).reshape(4, -1).contiguous(), u.float().reshape(2, -1).contiguous()


def launched_wide(monkeypatch, autotuned, index_limit: int, call) -> list[bool]:
    """The ``WIDE`` flag of each launch of ``autotuned`` (a kernel) that ``call()`` makes with the
    kernels' ``INDEX_LIMIT`` (2³¹) set to ``index_limit``: where int64 offsets start, on small shapes."""
    from nmcompile.kernels import common

    monkeypatch.setattr(common, "INDEX_LIMIT", index_limit)
    launched = []
    real = autotuned.run

    def spy(*args, **kwargs):
        launched.append(kwargs["WIDE"])
        return real(*args, **kwargs)

    monkeypatch.setattr(autotuned, "run", spy)
    call()
    return launched


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool, warn_only: bool = False) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(enabled, warn_only=warn_only)`` for the block; the setting
    found (warn-only included) is back afterwards, whatever the block raised."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def lone_nonzero_blocks(m: int) -> torch.Tensor:
    """``[m, 2m]`` MVUE test gradient (blocks along dim 0): column pairs ``2i, 2i + 1`` hold a block
    whose only nonzero (5 and −0.75) sits at position ``i``, so every position is covered."""
    lone = torch.zeros(m, 2 * m)
    for i in range(m):
        lone[i, 2 * i], lone[i, 2 * i + 1] = 5.0, -0.75
    return lone


NAN, INF = float("nan"), float("inf")
# MVUE blocks whose magnitudes sum to NaN or inf, and the value each keeps at its first entry: that
# sum, with the first entry's sign.
NON_FINITE_BLOCKS = {
    2: [([NAN, 1.0], NAN), ([1.0, -INF], INF), ([INF, NAN], NAN), ([0.0, NAN], NAN), ([-INF, 0.0], -INF),
        ([2e38, -3e38], INF), ([-2e38, 2e38], -INF)],
    4: [([NAN, 1.0, 2.0, 3.0], NAN), ([1.0, -INF, 2.0, 3.0], INF), ([INF, NAN, 0.0, 0.0], NAN),
        ([-INF, INF, 1.0, 0.0], -INF), ([0.0, 0.0, 0.0, NAN], NAN), ([-0.0, 0.0, -INF, 0.0], INF),
        ([2e38, -3e38, 1.0, 0.0], INF), ([1e38, 1e38, 1e38, 1e38], INF), ([-1e38, 0.0, 3e38, 0.0], -INF)],
}  # fmt: skip


def non_finite_blocks(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``NON_FINITE_BLOCKS`` of ``size`` laid end to end, and what every rule makes of them."""
    blocks, expected = [], []
    for block, value in NON_FINITE_BLOCKS[size]:
        blocks += block
        expected += [value] + [0.0] * (size - 1)
    return torch.tensor(blocks), torch.tensor(expected)


def train_and_compare(
    make_model, shape: tuple, steps: int = 5, channels_last: bool = False, reference_options: dict | None = None,
    settle: bool = False, **options,
) -> tuple:  # fmt: skip
    """Train ``reference.sparsify`` (with ``reference_options`` on top of ``options``) and
    ``torch.compile(backend=nmsparse)`` copies of one model side by side; outputs, input and parameter
    gradients must agree at every step, weights at the end. ``settle``: one forward and backward of
    each first, neither compared nor stepped (a weight's first use in the reference's first forward
    runs sparse before its second use shows that it is tied).

    SGD with momentum, not Adam: a parameter whose true gradient is zero (an attention key bias)
    gets round-off-sized gradients that Adam would scale up to full-size, sign-random updates.
    Returns ``(sparsity_state(reference), sparsity_state(compiled))``.
    """
    base = make_model()
    ref = reference.sparsify(copy.deepcopy(base), **{**options, **(reference_options or {})})
    mine = copy.deepcopy(base)
    compiled = torch.compile(mine, backend=nmcompile.backend(**options))
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    opt_mine = torch.optim.SGD(mine.parameters(), lr=0.05, momentum=0.9)
    if settle:
        x = torch.randn(shape)
        ref(x).sum().backward(), compiled(x).sum().backward()
        ref.zero_grad(), mine.zero_grad()
    for step in range(steps):
        x = torch.randn(shape)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        x_ref, x_mine = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ref, y_mine = ref(x_ref), compiled(x_mine)
        assert_close(y_mine, y_ref, what=f"step {step} output")
        y_ref.square().mean().backward()
        y_mine.square().mean().backward()
        assert_close(x_mine.grad, x_ref.grad, what=f"step {step} input grad")
        assert_grads_close(mine, ref, what=f"step {step}")
        for opt in (opt_ref, opt_mine):
            opt.step()
            opt.zero_grad()
    for (name, p_ref), p_mine in zip(ref.named_parameters(), mine.parameters(), strict=True):
        assert_close(p_mine, p_ref, what=f"weights of {name} after {steps} steps")
    state_ref, state_mine = nmcompile.sparsity_state(ref), nmcompile.sparsity_state(compiled)
    assert state_mine.keys() == state_ref.keys() and state_mine
    for name, s in state_mine.items():
        assert s["step"] == state_ref[name]["step"] == steps + settle, name
        assert torch.equal(s["perm"], state_ref[name]["perm"]), name
        assert s["backward"] == state_ref[name]["backward"], name
    return state_ref, state_mine


def sgd_step_both(ref: torch.nn.Module, mine: torch.nn.Module, lr: float) -> None:
    """One plain SGD step on each of two models with matching parameters, then their grads cleared."""
    with torch.no_grad():
        for p, q in zip(ref.parameters(), mine.parameters(), strict=True):
            p -= lr * p.grad
            q -= lr * q.grad
            p.grad = q.grad = None


def train_against(
    reference_model: torch.nn.Module, model: torch.nn.Module, compiled, shape: tuple = (8, 32), steps: int = 3
) -> None:
    """``steps`` SGD steps of ``compiled`` (a callable over ``model``'s weights) beside
    ``reference_model`` on random inputs of ``shape``: outputs and every gradient agree at each step."""
    for step in range(steps):
        x = torch.randn(shape)
        expected, actual = reference_model(x), compiled(x)
        assert_close(actual, expected, what=f"step {step} output")
        expected.square().mean().backward()
        actual.square().mean().backward()
        assert_grads_close(model, reference_model, what=f"step {step}")
        sgd_step_both(reference_model, model, 0.05)


def compile_blocks_alone(model: torch.nn.Module, options: dict, in_place: bool = False) -> torch.nn.Module:
    """Compile each of ``model.blocks`` alone with ``nmcompile.backend(**options)`` (wrapped, or
    ``in_place``), and return the per-block reference: a copy with each block sparsified alone."""
    ref = copy.deepcopy(model)
    for block in ref.blocks:
        reference.sparsify(block, **options)
    for i, block in enumerate(model.blocks):
        if in_place:
            block.compile(backend=nmcompile.backend(**options))
        else:
            model.blocks[i] = torch.compile(block, backend=nmcompile.backend(**options))
    return ref


def c_mask_kernels() -> bool:
    """Whether the C mask kernels build on this machine, so fp32 m=4 CPU graphs use them."""
    from nmcompile.kernels import cpu_mask

    return cpu_mask.blocker(torch.zeros(4, 4), 4) is None


def cpu_mask_note() -> str:
    """The end of the report's ``kernel`` entry for a portable fp32 layer with m=4 on the CPU:
    ``"; forward mask: C kernel"`` where the C mask kernel builds on this machine, else ``""``."""
    from nmcompile.passes.lower_kernels import CPU_MASK_NOTE

    return f"; {CPU_MASK_NOTE}" if c_mask_kernels() else ""


def assert_grads_close(mine: torch.nn.Module, ref: torch.nn.Module, what: str = "", rel: float = 1e-5) -> None:
    """Every parameter gradient of ``mine`` equals ``ref``'s (paired in order) within ``rel``."""
    for (name, p_ref), p_mine in zip(ref.named_parameters(), mine.parameters(), strict=True):
        assert_close(p_mine.grad, p_ref.grad, rel=rel, what=f"{what} grad of {name}".strip())


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5, what: str = "") -> None:
    """``|a - e| <= rel * max(1, max|e|)`` elementwise: fp32 tolerance relative to the tensor's scale."""
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel:g} x scale {scale:.3g}"


def cuda_autocast_losses(base: torch.nn.Module, steps: int = 3, **options) -> list[float]:
    """Losses of ``steps`` bf16-autocast SGD steps of a copy of the CUDA model ``base`` (inputs
    ``[1024, 256]``, seeded per step) compiled with ``nmcompile.backend(**options)``."""
    torch._dynamo.reset()
    model = copy.deepcopy(base)
    compiled = torch.compile(model, backend=nmcompile.backend(**options))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for step in range(steps):
        x = torch.randn(1024, 256, device="cuda", generator=torch.Generator("cuda").manual_seed(step))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compiled(x).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _storage_view(t: torch.Tensor, shape: tuple[int, int], column_major: bool) -> torch.Tensor:
    """``t``'s memory read as a dense ``shape`` matrix, the way a library given its pointer reads it."""
    strides = (1, shape[0]) if column_major else (shape[1], 1)
    return torch.as_strided(t, shape, strides, t.storage_offset())


def _cslt_compress(a):
    """``torch._cslt_compress`` (cuSPARSELtOps.cpp): ``A`` read row-major from its pointer."""
    return _storage_view(a, tuple(a.shape), column_major=False).clone()


EMULATED_ALGS = 2  # the emulated cuSPARSELt's algorithm ids: 0 and 1 (the same product)


def _cslt_sparse_mm(compressed, b, bias=None, transpose_result=False, alg_id=0):
    """``torch._cslt_sparse_mm`` as cuSPARSELtOps.cpp reads its operands: ``B`` row-major when
    contiguous, else column-major with leading dim ``K``; ``bias`` per row of ``A``; with
    ``transpose_result`` the ``[M, N]`` result stored column-major, which is ``[N, M]`` contiguous."""
    if not 0 <= alg_id < EMULATED_ALGS:
        raise RuntimeError(f"alg_id {alg_id} out of range")
    if compressed.dim() != 2:
        raise RuntimeError("compressed_A.dim() == 2 INTERNAL ASSERT FAILED")  # the library's [M, S] buffer
    dense_b = _storage_view(b, tuple(b.shape), column_major=not b.is_contiguous())
    out = compressed.float() @ dense_b.float() + (0 if bias is None else bias.float()[:, None])
    out = out.to(compressed.dtype)
    return out.t().contiguous() if transpose_result else out


def _cslt_sparse_mm_search(compressed, b, bias=None, transpose_result=False):
    """``torch._cslt_sparse_mm_search``: runs every algorithm on the operands and returns the
    fastest's id, here always the last."""
    for alg_id in range(EMULATED_ALGS):
        torch._cslt_sparse_mm(compressed, b, bias=bias, transpose_result=transpose_result, alg_id=alg_id)
    return EMULATED_ALGS - 1


def _mm_search(compressed, b, bias, alpha, out_dtype, transpose_result, /):
    """``torch._C._cusparselt.mm_search`` (pybind: positional only): the same search, returning the
    algorithm's id, the split-K factor and mode, and the number of algorithms."""
    assert alpha is None and out_dtype is None
    return _cslt_sparse_mm_search(compressed, b, bias=bias, transpose_result=transpose_result), 1, -1, EMULATED_ALGS


def _deprecated_search(*args, **kwargs):
    """``torch._cslt_sparse_mm_search`` where the build has ``mm_search``: not to be called."""
    raise AssertionError("torch._cslt_sparse_mm_search called although torch._C._cusparselt.mm_search exists")


def record_alg_ids(monkeypatch) -> list[int]:
    """The ``alg_id`` of every ``torch._cslt_sparse_mm`` call from now on (under ``emulated_24_library``)."""
    calls: list[int] = []
    emulated = torch._cslt_sparse_mm

    def recorded(*args, **kwargs):
        calls.append(kwargs.get("alg_id", 0))
        return emulated(*args, **kwargs)

    monkeypatch.setattr(torch, "_cslt_sparse_mm", recorded)
    return calls


def _cutlass_addmm(bias, packed, meta, b):
    """``torch._sparse_semi_structured_addmm`` (SparseSemiStructuredOps.cu): ``B`` row- or
    column-major, nothing else; ``bias`` per row of ``A``; a row-major result."""
    if 1 not in b.stride():
        raise RuntimeError(f"Invalid strides for mat2 argument: {b.stride()}")
    a = sparse_semi_structured_to_dense_cutlass(packed, meta)
    return (a.float() @ b.float() + (0 if bias is None else bias.float()[:, None])).to(a.dtype)


@pytest.fixture(params=["cusparselt", "cutlass"])
def emulated_24_library(request, monkeypatch):
    """``kernels.sparse24`` on CPU tensors against each library's operand contract, emulated from
    PyTorch's C++ sources (``cuSPARSELtOps.cpp``, ``SparseSemiStructuredOps.cu``): the padding,
    layouts, bias and transposed result are what is tested. Every 2:4 device check passes. The
    search is ``torch._C._cusparselt.mm_search``; the deprecated entry point fails if called. It
    compresses through the Triton kernels, on CPU tensors, so it needs the interpreter; on a GPU the
    CUDA tests run the real libraries instead."""
    from nmcompile.kernels import sparse24

    if not interpreting():
        pytest.skip("the emulated 2:4 libraries run the Triton kernels on CPU tensors: TRITON_INTERPRET=1")

    monkeypatch.setattr(sparse24, "blocker", lambda device, dtype: None)
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: request.param == "cusparselt")
    monkeypatch.setattr(torch, "_cslt_compress", _cslt_compress)
    monkeypatch.setattr(torch, "_cslt_sparse_mm", _cslt_sparse_mm)
    monkeypatch.setattr(torch, "_cslt_sparse_mm_search", _deprecated_search)
    monkeypatch.setattr(torch._C, "_cusparselt", types.SimpleNamespace(mm_search=_mm_search), raising=False)
    monkeypatch.setattr(torch, "_sparse_semi_structured_mm", lambda *args: _cutlass_addmm(None, *args))
    monkeypatch.setattr(torch, "_sparse_semi_structured_addmm", _cutlass_addmm)
    return request.param


class CheckpointedPair(nn.Module):
    """``fc1`` and ``fc2`` in one activation-checkpoint region (or none: ``checkpointed=False``), ``fc3``
    after it; ``width`` inputs, ``2 * width`` hidden, ``out`` outputs."""

    def __init__(self, checkpointed: bool = True, width: int = 16, out: int = 8) -> None:
        super().__init__()
        self.checkpointed = checkpointed
        hidden = 2 * width
        self.fc1, self.fc2, self.fc3 = nn.Linear(width, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, out)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc2(torch.relu(self.fc1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.utils.checkpoint.checkpoint(self.body, x, use_reentrant=False) if self.checkpointed else self.body(x)
        return self.fc3(h)


def save_ops_named(prefix: str, ctx: object, op: object, *args: object, **kwargs: object) -> CheckpointPolicy:
    """A selective-checkpoint policy: save the outputs of the ops whose name starts with ``prefix``
    (none for ``""``), recompute the rest."""
    return CheckpointPolicy.MUST_SAVE if prefix and str(op).startswith(prefix) else CheckpointPolicy.PREFER_RECOMPUTE


class SelectivePair(nn.Module):
    """``fc1`` and ``fc2`` in a selective checkpoint region whose policy saves the ops named
    ``saves...``; ``fc3`` after it; sizes as ``CheckpointedPair``'s."""

    def __init__(self, saves: str = "nmsparse.", width: int = 16, out: int = 8) -> None:
        super().__init__()
        hidden = 2 * width
        self.fc1, self.fc2, self.fc3 = nn.Linear(width, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, out)
        self.context_fn = functools.partial(
            create_selective_checkpoint_contexts, functools.partial(save_ops_named, saves)
        )

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x))).sin()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.utils.checkpoint.checkpoint(self.body, x, use_reentrant=False, context_fn=self.context_fn)
        return self.fc3(h)
