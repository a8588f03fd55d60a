"""Every Triton kernel against the reference (SPEC §2, §4–§7), on small and ragged shapes.

Without CUDA the kernels run under ``TRITON_INTERPRET=1`` (set in conftest); masks must match the
reference exactly, GEMMs within the dtype's tolerance. With CUDA the same tests run on the GPU, and
``test_real_sizes_on_cuda`` adds sizes the interpreter would take minutes for.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import triton
import triton.language as tl
from conftest import (
    DOMINANT_BLOCKS,
    assert_close,
    boundary_draws,
    deterministic_algorithms,
    launched_wide,
    lone_nonzero_blocks,
    non_finite_blocks,
)

from nmcompile import kernels, reference
from nmcompile.kernels import common
from nmcompile.kernels.operand24 import backward_operand, forward_operand
from nmcompile.kernels.srste import srste_add
from nmcompile.ops import masked_weight
from nmcompile.options import SparsityConfig
from nmcompile.state import LayerSpec, LayerState

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# GEMM shapes (T, O, K, n, m): ragged T, O, K against the 16/32 tiles, several N:M.
GEMMS = [(5, 8, 8, 2, 4), (37, 20, 40, 1, 4), (33, 24, 64, 3, 8), (17, 32, 32, 1, 2), (9, 32, 96, 5, 32)]


# Tolerance relative to a result's scale: about two roundings in the dtype (fp32: summation order).
EPS = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_within_one_rounding(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Each entry of ``got`` within one step of ``expected``'s (16-bit) dtype at that entry's own
    magnitude: an elementwise result computed in fp32 and rounded once. Triton's interpreter
    (3.9) truncates fp32 to bf16 where a GPU rounds to nearest; one step covers both."""
    finfo = torch.finfo(expected.dtype)
    magnitude = expected.float().abs().clamp_min(finfo.tiny)
    step = finfo.eps * torch.exp2(torch.floor(torch.log2(magnitude)))
    error = (got.float() - expected.float()).abs()
    worst = (error / step).max().item() if error.numel() else 0.0
    assert worst <= 1, f"{worst:.2f} steps of {expected.dtype} from the expected value"


def _randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


def _perm(size: int, seed: int = 1) -> torch.Tensor:
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


# --- standalone kernels: exact -----------------------------------------------------------------


MASKS = [((5, 8), 2, 4, 1), ((37, 40), 1, 4, 1), ((8, 13), 2, 4, 0), ((64, 96), 3, 8, 1), ((32, 33), 5, 32, 0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "n", "m", "dim"), [*MASKS, ((16, 70), 1, 2, 1)])
def test_nm_mask_exact(dtype, shape, n, m, dim):
    """Ties (zeros, repeated values), NaN (ranks as +inf) and inf: the same mask as the reference."""
    a = _randn(*shape, dtype=dtype)
    a[0, :3] = 0
    a[1, 1] = float("nan")
    a[2, :2] = float("inf")
    a[3] = 1.5
    got = kernels.nm_mask(a, n, m, dim)
    assert got.dtype == torch.bool and got.is_contiguous()
    assert torch.equal(got.cpu(), reference.nm_mask(a.cpu(), n, m, dim))


@pytest.mark.parametrize("dim", [-1, -2])
def test_nm_mask_negative_dim(dim):
    """``dim`` -1 and -2, which the launcher accepts, mean dims 1 and 0, as in the reference."""
    a = _randn(8, 12)
    assert torch.equal(kernels.nm_mask(a, 2, 4, dim).cpu(), reference.nm_mask(a.cpu(), 2, 4, dim))


@pytest.mark.parametrize("dim", [1, 0])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_nm_mask_every_tie_pattern_of_groups_of_four(n, dim):
    """Groups of 4 rank from their 6 pairwise comparisons (``common._keep4``): every group drawn
    from 0, ±1, -2, inf and NaN (6⁴ of them: all ties, sign flips, NaN against inf) gives the
    reference's mask, along either dim."""
    values = torch.tensor([0.0, 1.0, -1.0, -2.0, float("inf"), float("nan")])
    groups = torch.cartesian_prod(*[torch.arange(6)] * 4)
    a = values[groups]
    a = a if dim == 1 else a.t().contiguous()
    got = kernels.nm_mask(a.to(DEVICE), n, 4, dim)
    assert torch.equal(got.cpu(), reference.nm_mask(a, n, 4, dim))


@pytest.mark.parametrize("dim", [1, 0])
@pytest.mark.parametrize(
    ("n", "m"), [(1, 2), (2, 2), *[(n, 8) for n in range(1, 9)], (3, 16), (9, 16), (5, 32), (31, 32)]
)
def test_nm_mask_tie_heavy_groups_of_other_sizes(n, m, dim):
    """Other groups rank in ``min(n, m - n)`` passes (``common._keep_by_passes``: the top ``n``, or
    the bottom ``m - n`` and the rest kept): 64 rows of groups drawn from 0, ±1, -2, inf and NaN,
    so most entries tie, give the reference's mask for every ``n`` of 2:8 and both sides of
    ``m / 2`` of the larger groups, along either dim."""
    values = torch.tensor([0.0, 1.0, -1.0, -2.0, float("inf"), float("nan")])
    a = values[torch.randint(0, 6, (64, 4 * m), generator=torch.Generator().manual_seed(m))]
    a = a if dim == 1 else a.t().contiguous()
    got = kernels.nm_mask(a.to(DEVICE), n, m, dim)
    assert torch.equal(got.cpu(), reference.nm_mask(a, n, m, dim))


def test_nm_mask_counts():
    """Exactly n kept per group, on a non-contiguous view too."""
    a = _randn(24, 64).t()
    mask = kernels.nm_mask(a, 3, 8, dim=0)
    assert torch.equal(mask.reshape(8, 8, 24).sum(1).cpu(), torch.full((8, 24), 3))
    assert torch.equal(mask.cpu(), reference.nm_mask(a.cpu(), 3, 8, 0))


@pytest.mark.parametrize(("rows", "cols", "n", "m"), [(8, 12, 2, 4), (40, 24, 1, 4), (64, 72, 3, 8), (12, 5, 1, 2)])
def test_permutation_scores_exact(rows, cols, n, m):
    """One launch scores every candidate exactly as SPEC §5; the search keeps the same winner."""
    fmask = torch.rand(rows, cols, generator=torch.Generator().manual_seed(rows)) > 0.4
    candidates = [torch.randperm(rows, generator=torch.Generator().manual_seed(s)) for s in range(9)]
    got = kernels.permutation_scores(fmask.to(DEVICE), torch.stack(candidates), n, m)
    assert got.tolist() == [reference.permutation_score(fmask, c, n, m) for c in candidates]
    current = torch.arange(rows)
    best, score = kernels.search_permutation(fmask.to(DEVICE), current, candidates, n, m)
    ref_best, ref_score = reference.search_permutation(fmask, current, candidates, n, m)
    assert torch.equal(best.cpu(), ref_best) and score == ref_score


@pytest.fixture
def tf32_matmuls():
    """``torch.set_float32_matmul_precision("high")`` (TF32 on CUDA) for one test, then the setting back."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision(before)


def test_search_with_swaps_on_the_device_as_on_the_cpu(tf32_matmuls):
    """``perm_swaps`` after the search on the kernels' device (CUDA: the Triton mask and scores, then
    float32 batched matmuls with TF32 allowed, exact on these integer sums) picks the CPU's
    permutation, which scores above the search's alone; the layer's state keeps it on its device."""
    weight = torch.randn(256, 96, generator=torch.Generator().manual_seed(4))
    perms = {}
    for device, swaps in [("cpu", 0), ("cpu", 6), (DEVICE, 6)]:
        config = SparsityConfig(perm_candidates=10, perm_swaps=swaps)
        state = LayerState(LayerSpec("fc.weight", 2, 256, "bimask", config=config), torch.device(device), None)
        state.begin_training_step(weight.to(device))
        assert state.perm.device.type == device
        perms[device, swaps] = state.perm.cpu()
    assert torch.equal(perms[DEVICE, 6], perms["cpu", 6])
    fmask = reference.nm_mask(weight, 2, 4, 1)
    assert reference.permutation_score(fmask, perms["cpu", 6], 2, 4) > reference.permutation_score(
        fmask, perms["cpu", 0], 2, 4
    )


def test_permutation_search_keeps_current_on_ties():
    """A mask every permutation scores the same: the current permutation stays (SPEC §5)."""
    fmask = torch.ones(8, 4, dtype=torch.bool, device=DEVICE)
    current = _perm(8, seed=5).cpu()
    best, score = kernels.search_permutation(fmask, current, [torch.arange(8), torch.arange(8).flip(0)], 2, 4)
    assert torch.equal(best, current) and score == 2 * 2 * 4


def test_permutation_scores_conv_mask():
    """A conv mask ``[O, C, kh, kw]``: every ``(c, kh, kw)`` is a column."""
    fmask = torch.rand(8, 3, 3, 3, generator=torch.Generator().manual_seed(0)) > 0.5
    candidates = [torch.randperm(8, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    got = kernels.permutation_scores(fmask.to(DEVICE), torch.stack(candidates), 2, 4)
    assert got.tolist() == [reference.permutation_score(fmask, c, 2, 4) for c in candidates]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", ["mvue12", "mvue24", "mvue24_approx"])
@pytest.mark.parametrize(("tokens", "channels"), [(8, 5), (37, 19), (70, 33)])
def test_mvue_prune_matches_portable_op(dtype, rule, tokens, channels):
    """Same kept entries as the portable op for the same ``(key, step)`` (the counter hash), values
    within one rounding; zero blocks and a dominant entry included; a ragged end is zero-padded."""
    g = _randn(tokens, channels, dtype=dtype)
    g[:4, 0] = 0
    g[4:8, 1] = torch.tensor([10.0, 0.1, 0.1, 0.2], dtype=dtype)
    key, step = reference.prune_key(3, 5), 123457
    expected = torch.ops.nmsparse.mvue_prune(g.cpu(), torch.tensor(step), key, rule)
    got = kernels.mvue_prune(g, step, key, rule).cpu()
    assert torch.equal(got != 0, expected != 0)
    if dtype == torch.float32:  # a GPU divides within 2 ulp and fuses multiply-adds
        assert_close(got, expected, rel=EPS[dtype])
    else:
        assert_within_one_rounding(got, expected)
    n, m = (1, 2) if rule == "mvue12" else (2, 4)
    padded = torch.nn.functional.pad((got != 0).t(), (0, (-tokens) % m))
    assert int(padded.reshape(channels, -1, m).sum(-1).max()) <= n


@pytest.mark.parametrize(("rule", "tokens"), [("mvue24", 65), ("mvue12", 33), ("mvue24_approx", 129)])
def test_mvue_prune_last_ragged_block_past_a_whole_tile_of_blocks(rule, tokens):
    """``T`` one token past a multiple of 64 (of 32 for blocks of 2): the ragged last block starts a
    new tile of blocks, and is pruned and written like the others (the grid had left it out)."""
    g = _randn(tokens, 6)
    key, step = reference.prune_key(3, 5), 11
    expected = torch.ops.nmsparse.mvue_prune(g.cpu(), torch.tensor(step), key, rule)
    got = kernels.mvue_prune(g, step, key, rule).cpu()
    assert torch.equal(got != 0, expected != 0)
    assert_close(got, expected, rel=EPS[torch.float32])


@pytest.mark.parametrize("rule", ["mvue24", "mvue24_approx"])
def test_mvue_prune_where_one_entry_dwarfs_the_rest(rule):
    """Blocks where an fp32 total less the largest entry cancels: the kernel keeps the entries the
    portable op keeps, each within 1e-6 of its value (both sum the other entries instead; the
    portable op's values are checked exactly in ``test_recipes``)."""
    g = torch.tensor(DOMINANT_BLOCKS).t().repeat(1, 16).to(DEVICE)
    key, step = reference.prune_key(1, 2), 77
    expected = torch.ops.nmsparse.mvue_prune(g.cpu(), torch.tensor(step), key, rule)
    got = kernels.mvue_prune(g, step, key, rule).cpu()
    assert torch.equal(got != 0, expected != 0)
    assert torch.allclose(got, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("rule", ["mvue12", "mvue24", "mvue24_approx"])
def test_mvue_prune_keeps_a_lone_nonzero_as_is(rule):
    """A block whose only nonzero sits at any position keeps it unchanged at every step, as the
    portable op does (``test_recipes``): its inclusion probability is 1. On a GPU, whose fp32
    division is ``div.full.f32`` (``|a| / |a|`` can come out an ulp below 1), within 2⁻²¹."""
    m = 2 if rule == "mvue12" else 4
    g = lone_nonzero_blocks(m).repeat(1, 8).to(DEVICE)
    for step in range(4):
        got = kernels.mvue_prune(g, step, reference.prune_key(1, 2), rule)
        assert torch.equal(got != 0, g != 0), step
        assert torch.equal(got, g) if common.interpreting() else torch.allclose(got, g, rtol=2**-21, atol=0), step


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy, on the blocks fed on purpose
@pytest.mark.parametrize("rule", ["mvue12", "mvue24", "mvue24_approx"])
def test_mvue_prune_keeps_the_sum_of_a_non_finite_block_at_its_first_entry(rule):
    """Blocks whose magnitudes sum to NaN or inf come out as the portable op makes them, exactly on
    every device (no division decides them): that sum at the first entry, with its sign, the rest 0
    (``test_recipes``), at every step, in every column, beside finite blocks; also written transposed."""
    m = 2 if rule == "mvue12" else 4
    bad, expected = non_finite_blocks(m)
    g = torch.cat([bad, _randn(4 * m).cpu()])[:, None].repeat(1, 5).to(DEVICE)
    key = reference.prune_key(1, 2)
    for step in range(3):
        got = kernels.mvue_prune(g, step, key, rule).cpu()
        transposed = kernels.mvue_prune(g, step, key, rule, transpose=True).cpu()
        portable = torch.ops.nmsparse.mvue_prune(g.cpu(), torch.tensor(step), key, rule)
        for out in (got, transposed.t()):
            torch.testing.assert_close(out[: len(bad)], expected[:, None].expand(-1, 5), rtol=0, atol=0, equal_nan=True)
        assert torch.equal(got[len(bad) :] != 0, portable[len(bad) :] != 0)


@triton.jit
def _rule_on_draws(a_ptr, u_ptr, out_ptr, count, RULE: tl.constexpr, BLOCK: tl.constexpr):
    """``common``'s 2:4 rule ``RULE`` (2: mvue24, 3: mvue24_approx) on given blocks and uniforms:
    ``a`` and ``out`` ``[4, count]``, ``u`` ``[2, count]``, column ``j`` one block."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < count
    a = (
        tl.load(a_ptr + offs, mask=ok, other=0.0),
        tl.load(a_ptr + count + offs, mask=ok, other=0.0),
        tl.load(a_ptr + 2 * count + offs, mask=ok, other=0.0),
        tl.load(a_ptr + 3 * count + offs, mask=ok, other=0.0),
    )
    u0 = tl.load(u_ptr + offs, mask=ok, other=0.0)
    if RULE == 2:
        out = common.mvue24(a, u0)
    else:
        out = common.mvue24_approx(a, u0, tl.load(u_ptr + count + offs, mask=ok, other=0.0))
    tl.store(out_ptr + offs, out[0], mask=ok)
    tl.store(out_ptr + count + offs, out[1], mask=ok)
    tl.store(out_ptr + 2 * count + offs, out[2], mask=ok)
    tl.store(out_ptr + 3 * count + offs, out[3], mask=ok)


def _kept_values(a: torch.Tensor, rule: str) -> torch.Tensor:
    """The value each entry of the 2:4 blocks ``a`` ``[4, B]`` (finite) takes where a draw keeps it,
    in float64 from SPEC §7 (it does not depend on the draw): ``mvue24``, a dominant entry as is
    (sampled so within 2⁻¹⁸ of a tie, ``reference.NEAR_TIE``) and the others ``sign·rest``, else
    ``sign·S/2``; ``mvue24_approx``, ``a_i / π_i`` with ``π_i = p_i + Σ_j p_j p_i / (1 − p_j)``."""
    a = a.double()
    mag = a.abs()
    total = mag.sum(0)
    if rule == "mvue24":
        top, top_index = mag.max(0)
        rest = total - top
        dominant = top > rest * reference.NEAR_TIE
        whole = dominant & (torch.arange(4)[:, None] == top_index)
        return torch.where(whole, a, a.sign() * torch.where(dominant, rest, total / 2))
    p = mag / total
    ratio = torch.where(p < 1, p / (1 - p), 0.0)
    inclusion = p + p * (ratio.sum(0) - ratio)
    return torch.where(inclusion > 0, a / inclusion, 0.0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy, on the inf blocks fed on purpose
@pytest.mark.parametrize("rule", ["mvue24", "mvue24_approx"])
def test_mvue24_rules_match_the_reference_at_uniforms_beside_every_interval_end(rule):
    """The kernels' 2:4 rules at the uniforms where rounding decides (``test_recipes`` checks the
    reference against SPEC §7 there), and in NaN, inf and fp32-overflowing blocks.

    On every device: each block keeps exactly two entries (all its nonzeros where it has fewer), a
    dominant entry among them, each at its SPEC §7 value within 1e-5, and the non-finite and
    overflowing blocks come out NaN, inf and zero where the reference's do. Under the interpreter,
    whose fp32 division is IEEE's as torch's, the kept entries and values also equal the
    reference's bit for bit. A GPU divides with ``div.full.f32`` (within 2 ulp) and fuses
    multiply-adds, so there a uniform within an ulp or two of an interval end can fall in the
    neighbouring entry: another draw of the same rule."""
    a, u = boundary_draws(rule, count=60 if common.interpreting() else 300)
    position = torch.arange(4)[:, None] == torch.arange(64) % 4
    a[:, -64:] = torch.where(position, float("nan"), a[:, -64:])
    a[:, -128:-64] = torch.where(position, float("inf"), a[:, -128:-64])
    a[:, -192:-128] = a[:, -192:-128].sign() * 1e38
    k = 1 if rule == "mvue24" else 2
    expected = reference.mvue_prune_with(a, rule, 0, lambda index: u[:k].t().reshape(-1)[index])
    got = torch.empty(a.shape, device=DEVICE)
    count = a.shape[1]
    _rule_on_draws[(triton.cdiv(count, 4096),)](
        a.to(DEVICE), u.to(DEVICE), got, count, RULE=2 if rule == "mvue24" else 3, BLOCK=4096
    )
    got = got.cpu()
    assert torch.equal(got.isnan(), expected.isnan()) and torch.equal(got.isinf(), expected.isinf())
    assert torch.equal(got[:, -192:-128] == 0, expected[:, -192:-128] == 0)
    finite, kept = a[:, :-192], got[:, :-192]
    assert torch.equal((kept != 0).sum(0), (finite != 0).sum(0).clamp(max=2))
    values, at = _kept_values(finite, rule), kept != 0
    assert torch.all((kept.double() - values)[at].abs() <= 1e-5 * values[at].abs())
    if rule == "mvue24":
        top, top_index = finite.abs().max(0)
        dominant = top > (finite.abs().sum(0) - top) * (1 + 2**-16)
        assert torch.all(kept.gather(0, top_index[None])[0][dominant] != 0)
    if common.interpreting():
        assert torch.equal(got.nan_to_num(), expected.nan_to_num())


def test_mvue_prune_changes_with_step_and_key():
    g = _randn(64, 8)
    a, b, c = (kernels.mvue_prune(g, s, k, "mvue24") for s, k in ((0, 1), (1, 1), (0, 2)))
    assert not torch.equal(a != 0, b != 0) and not torch.equal(a != 0, c != 0)
    assert torch.equal(a, kernels.mvue_prune(g, 0, 1, "mvue24"))


# --- the three GEMMs ----------------------------------------------------------------------------


def _portable_forward(x, w, b, n, m, mask=None, alpha=None):
    fmask = reference.nm_mask(w, n, m, 1) if mask is None else mask
    b, alpha = (t.cpu() if t is not None else None for t in (b, alpha))
    masked = masked_weight(w.cpu(), fmask.cpu())
    return torch.ops.nmsparse.sparse_linear(x.cpu(), w.cpu(), b, masked, None, n, m, 0.0, "t", None, alpha)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("T", "O", "K", "n", "m"), GEMMS)
def test_forward(dtype, T, O, K, n, m):
    """``X (W⊙F)ᵀ + b`` with ``F`` ranked in registers; also mask decay and a loaded mask."""
    x, w, b = _randn(T, K, dtype=dtype), _randn(O, K, dtype=dtype, seed=1), _randn(O, dtype=dtype, seed=2)
    alpha = torch.tensor(0.3, device=DEVICE)
    other = ~reference.nm_mask(w.cpu(), n, m, 1)
    decayed = kernels.sparse_linear_forward(x, w, None, n, m, alpha=alpha)
    for got, expected in [
        (kernels.sparse_linear_forward(x, w, b, n, m), _portable_forward(x, w, b, n, m)),
        (decayed, _portable_forward(x, w, None, n, m, None, alpha)),
        (kernels.sparse_linear_forward(x, w, b, n, m, mask=other.to(DEVICE)), _portable_forward(x, w, b, n, m, other)),
    ]:
        assert got.dtype == dtype and got.shape == (T, O)
        assert_close(got.cpu().float(), expected.float(), rel=EPS[dtype])


@pytest.mark.parametrize(("T", "O", "K", "n", "m"), GEMMS)
def test_gemms_exact_on_integers(T, O, K, n, m):
    """Small integers make every product and sum exact in fp32, so the in-register masks show up
    bit for bit: forward, Bi-Mask input gradient and SR-STE weight gradient equal the reference."""
    g = torch.Generator().manual_seed(T)
    x, w, dy = (torch.randint(-8, 9, shape, generator=g).float() for shape in ((T, K), (O, K), (T, O)))
    w += torch.rand(O, K, generator=g).mul(0.5).round().mul(0.25)  # distinct magnitudes and exact ties
    perm = torch.randperm(O, generator=g)
    fmask = reference.nm_mask(w, n, m, 1)
    on = lambda t: t.to(DEVICE)  # noqa: E731
    assert torch.equal(kernels.sparse_linear_forward(on(x), on(w), None, n, m).cpu(), x @ (w * fmask).t())
    if O % m == 0:
        bmask = reference.backward_mask(w, fmask, perm, n, m)
        assert torch.equal(kernels.sparse_input_grad(on(dy), on(w), n, m, perm=on(perm)).cpu(), dy @ (w * bmask))
    assert torch.equal(kernels.sparse_input_grad(on(dy), on(w), n, m).cpu(), dy @ (w * fmask))
    lam = 0.5
    got = kernels.sparse_weight_grad(on(dy), on(x), on(w), n, m, srste_lambda=lam).cpu()
    assert torch.equal(got, dy.t() @ x + lam * (w * ~fmask))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("T", "O", "K", "n", "m"), [s for s in GEMMS if s[1] % s[4] == 0])
def test_input_grad(dtype, T, O, K, n, m):
    """Bi-Mask ``dY[:, P] (W[P] ⊙ Bp)`` (B = scatter(Bp) ∧ F), ``dense`` ``dY (W⊙F)``, a loaded
    (transposable) mask, and mask decay, against the reference masks."""
    dy, w = _randn(T, O, dtype=dtype), _randn(O, K, dtype=dtype, seed=1)
    perm, alpha = _perm(O), torch.tensor(0.25, device=DEVICE)
    wc, fmask = w.cpu().float(), reference.nm_mask(w.cpu(), n, m, 1)
    bmask = reference.backward_mask(w.cpu(), fmask, perm.cpu(), n, m)
    tmask = reference.transposable_mask(w.cpu(), n, m) if m <= 8 else fmask
    cases = [
        (kernels.sparse_input_grad(dy, w, n, m, perm=perm), wc * bmask),
        (kernels.sparse_input_grad(dy, w, n, m), wc * fmask),
        (kernels.sparse_input_grad(dy, w, n, m, mask=tmask.to(DEVICE)), wc * tmask),
        (kernels.sparse_input_grad(dy, w, n, m, perm=perm, alpha=alpha), torch.where(bmask, wc, 0.25 * wc)),
    ]
    for got, effective in cases:
        expected = dy.cpu().float() @ effective.to(dtype).float()
        assert got.dtype == dtype and got.shape == (T, K)
        assert_close(got.cpu().float(), expected, rel=EPS[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("T", "O", "K", "n", "m"), GEMMS)
@pytest.mark.parametrize("rule", ["none", "mvue12", "mvue24", "mvue24_approx"])
def test_weight_grad(dtype, T, O, K, n, m, rule):
    """``prune(dY)ᵀ X + λ(1−F)⊙W``: MVUE fused in the load (same stream as the portable op), SR-STE
    in the epilogue; the output in the weight's dtype."""
    dy, x, w = _randn(T, O, dtype=dtype), _randn(T, K, dtype=dtype, seed=1), _randn(O, K, dtype=dtype, seed=2)
    key, step, lam = 99, 7, 0.1
    pruned = dy.cpu() if rule == "none" else torch.ops.nmsparse.mvue_prune(dy.cpu(), torch.tensor(step), key, rule)
    fmask = reference.nm_mask(w.cpu(), n, m, 1)
    expected = pruned.float().t() @ x.cpu().float() + lam * (w.cpu().float() * ~fmask)
    got = kernels.sparse_weight_grad(dy, x, w, n, m, srste_lambda=lam, grad_prune=rule, step=step, key=key)
    assert got.dtype == dtype and got.shape == (O, K)
    assert_close(got.cpu().float(), expected, rel=EPS[dtype])
    plain = kernels.sparse_weight_grad(dy, x, w, n, m, mask=~fmask.to(DEVICE), srste_lambda=lam).cpu().float()
    assert_close(plain, dy.cpu().float().t() @ x.cpu().float() + lam * (w.cpu().float() * fmask), rel=EPS[dtype])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy, on the inf fed on purpose
@pytest.mark.parametrize("rule", ["mvue12", "mvue24", "mvue24_approx"])
def test_weight_grad_with_mvue_keeps_an_overflowed_dy_column_non_finite(rule):
    """An inf in a ``dY`` column (as an fp16 overflow leaves one) makes that row of the fused MVUE
    weight gradient non-finite in every entry, as the dense product does, so ``GradScaler`` skips
    the step; the other rows are the pruned product's."""
    dy, x, w = _randn(16, 8), _randn(16, 8, seed=1), _randn(8, 8, seed=2)
    dy[5, 0] = float("inf")
    got = kernels.sparse_weight_grad(dy, x, w, 2, 4, grad_prune=rule, step=3, key=5).cpu()
    expected = torch.ops.nmsparse.mvue_prune(dy.cpu(), torch.tensor(3), 5, rule).t() @ x.cpu()
    assert not got[0].isfinite().any() and got[1:].isfinite().all()
    assert_close(got[1:], expected[1:], rel=EPS[torch.float32])


def test_weight_grad_under_mixed_dtypes():
    """Autocast: bf16 activations and gradient with an fp32 weight; F from the fp32 weight, dW fp32."""
    dy, x, w = _randn(20, 8, dtype=torch.bfloat16), _randn(20, 16, dtype=torch.bfloat16, seed=1), _randn(8, 16, seed=2)
    got = kernels.sparse_weight_grad(dy, x, w, 2, 4, srste_lambda=0.5)
    expected = dy.cpu().float().t() @ x.cpu().float() + 0.5 * w.cpu() * ~reference.nm_mask(w.cpu(), 2, 4, 1)
    assert got.dtype == torch.float32
    assert_close(got.cpu(), expected, rel=EPS[torch.bfloat16])


def test_wide_index_is_chosen_where_an_offset_can_pass_int32():
    """Offsets reach 2³¹ for a contiguous 131072 x 16384 activation, or a view whose rows lie 2³⁰
    elements apart (shapes only: meta tensors); a tile past each edge counts too."""
    from nmcompile.kernels.common import wide_index

    def meta(shape, stride=None):
        return torch.empty_strided(shape, stride or torch.empty(shape, device="meta").stride(), device="meta")

    assert wide_index(meta((131072, 16384)))
    assert wide_index(meta((8, 64)), meta((3, 32), (2**30 + 64, 1)))
    assert not wide_index(meta((8192, 16384)), meta((16384, 4096)))
    edge = (2**31 - 1 - (64 + 256)) // 64 - 256  # rows of a [R, 64] tensor whose last offset stays in int32
    assert not wide_index(meta((edge, 64))) and wide_index(meta((edge + 1, 64)))


def _nan_padded(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` as a view into a buffer that goes on past it along ``dim`` with NaN: a kernel that reads
    past ``t`` (a load without its bound) gives NaN, where whatever memory lay there could hide it."""
    shape = list(t.shape)
    shape[dim] += 300  # more than the largest tile
    view = torch.full(shape, float("nan"), dtype=t.dtype, device=t.device).narrow(dim, 0, t.shape[dim])
    view.copy_(t)
    return view


def test_kernels_read_nothing_past_their_operands():
    """Operands whose rows or columns go on with NaN past ``T``, ``O`` or ``K`` give what their
    contiguous copies give: forward (``x``, ``W`` past ``K`` = 8, a ragged K tile), Bi-Mask and dense
    input gradients (``W`` past ``O`` = 8), weight gradient (``dY``, ``x`` past ``T`` = 5)."""
    T, O, K = 5, 8, 8
    x, w, dy = _randn(T, K), _randn(O, K, seed=1), _randn(T, O, seed=2)
    forward = kernels.sparse_linear_forward(x, w, None, 2, 4)
    assert_close(forward.cpu(), x.cpu() @ (w.cpu() * reference.nm_mask(w.cpu(), 2, 4, 1)).t())
    assert torch.equal(kernels.sparse_linear_forward(_nan_padded(x, 1), w, None, 2, 4), forward)
    assert torch.equal(kernels.sparse_linear_forward(x, _nan_padded(w, 1), None, 2, 4), forward)
    for perm in (_perm(O), None):
        expected = kernels.sparse_input_grad(dy, w, 2, 4, perm=perm)
        assert torch.equal(kernels.sparse_input_grad(dy, _nan_padded(w, 0), 2, 4, perm=perm), expected)
    expected = kernels.sparse_weight_grad(dy, x, w, 2, 4, srste_lambda=0.1)
    assert torch.equal(kernels.sparse_weight_grad(dy, _nan_padded(x, 0), w, 2, 4, srste_lambda=0.1), expected)
    assert torch.equal(kernels.sparse_weight_grad(_nan_padded(dy, 0), x, w, 2, 4, srste_lambda=0.1), expected)


def test_forward_takes_int64_offsets_where_only_its_output_needs_them(monkeypatch):
    """``WIDE`` counts the output ``Y`` ``[T, O]`` too: small ``x`` and ``W`` can give a ``Y`` past 2³¹
    elements (T = 131072, O = 16384, K = 64). Checked with ``INDEX_LIMIT`` between the offsets of the
    inputs (about 2.8e3) and of the output (about 2.1e4), by the ``WIDE`` the kernel is launched with."""
    from nmcompile.kernels import sparse_forward

    call = lambda: kernels.sparse_linear_forward(_randn(64, 8), _randn(64, 8, seed=1), None, 2, 4)  # noqa: E731
    assert launched_wide(monkeypatch, sparse_forward.sparse_forward_kernel, 10_000, call) == [True]


def test_strided_perm_and_bias_give_what_their_contiguous_copies_give():
    """A ``perm`` or ``bias`` that is a strided view: the kernels read both as contiguous, so the
    launchers hand them over contiguous (they were read with the wrong stride: errors up to 4)."""
    from nmcompile.kernels.operand24 import backward_operand, input_grad_operand

    dy, w, x = _randn(12, 16), _randn(16, 32, seed=2), _randn(12, 32, seed=3)
    perm = _perm(16)
    strided_perm = torch.stack([perm, perm.flip(0)], 1)[:, 0]
    bias = _randn(16, 2, seed=4)[:, 0]
    assert strided_perm.stride() == bias.stride() == (2,)
    for call in (
        lambda p: kernels.sparse_input_grad(dy, w, 2, 4, perm=p),
        lambda p: backward_operand(w, 2, 4, perm=p),
        lambda p: input_grad_operand(w, 2, 4, perm=p),
    ):
        assert torch.equal(call(strided_perm), call(perm))
    expected = kernels.sparse_linear_forward(x, w, bias.contiguous(), 2, 4)
    assert torch.equal(kernels.sparse_linear_forward(x, w, bias, 2, 4), expected)


def test_wide_offsets_give_the_same_results(monkeypatch):
    """With ``INDEX_LIMIT`` at 0 every launch computes offsets in int64 (``WIDE``): forward, both
    gradients, MVUE, the masked operands, SR-STE and the mask kernel give bit for bit what the int32
    path gives, permuted and transposed operands included."""
    from nmcompile.kernels import common
    from nmcompile.kernels.operand24 import backward_operand, forward_operand, input_grad_operand
    from nmcompile.kernels.srste import srste_add

    dy, w = _randn(20, 8), _randn(8, 16, seed=2)
    xt = _randn(16, 20, seed=3).t()  # a column-major view
    alpha = torch.tensor(0.3, device=DEVICE)

    def run():
        return [
            kernels.sparse_linear_forward(xt, w, torch.ones(8, device=DEVICE), 2, 4),
            kernels.sparse_input_grad(dy, w, 2, 4, perm=_perm(8), alpha=alpha),
            kernels.sparse_weight_grad(dy, xt, w, 2, 4, srste_lambda=0.1, grad_prune="mvue24", step=3, key=5),
            kernels.mvue_prune(dy.t().contiguous().t(), 4, 9, "mvue12", transpose=True),
            forward_operand(w.t().contiguous().t(), 2, 4, alpha=alpha),
            backward_operand(w, 2, 4, perm=_perm(8)),
            input_grad_operand(w, 2, 4, perm=_perm(8)),
            srste_add(w, xt[:8], 2, 4, 0.1),
            kernels.nm_mask(xt, 1, 4, 0),
            kernels.nm_mask(xt, 2, 4, 1),
        ]

    narrow = run()
    monkeypatch.setattr(common, "INDEX_LIMIT", 0)
    assert common.wide_index(dy)
    for got, expected in zip(run(), narrow, strict=True):
        assert torch.equal(got, expected)


def _ints(*shape: int, seed: int = 0) -> torch.Tensor:
    """Small integers (plus exact quarters, for distinct magnitudes): every GEMM sum exact in fp32."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(-8, 9, shape, generator=g).float() + torch.rand(shape, generator=g).mul(4).round().mul(0.25)
    return t.to(DEVICE)


def _exact(buffers: tuple[torch.Tensor, torch.Tensor | None]) -> list[tuple[torch.Tensor, bool]]:
    """A compressed result's buffers (values, metadata where apart) as exact ``_tile_cases`` entries."""
    return [(t, True) for t in buffers if t is not None]


def _tile_cases(module: str, tile: dict) -> list[tuple[torch.Tensor, bool]]:
    """Each launch of ``module``'s kernel that the test below runs, as ``(result, exact)``: on shapes
    ragged against every GPU tile (T 37 or 70, O 24 or 33, K 40; GEMMs on small integers), and the
    compressed outputs on shapes the layouts take (multiples of 32 x 64 or 128 x 128)."""
    from nmcompile.kernels import operand24
    from nmcompile.kernels.gather_t import gather_t
    from nmcompile.kernels.mvue import mvue_prune_compressed
    from nmcompile.kernels.srste import srste_add

    x, w, dy, perm = _ints(37, 40), _ints(24, 40, seed=1), _ints(37, 24, seed=2), _perm(24)
    alpha = torch.tensor(0.25, device=DEVICE)
    if module == "nm_mask":
        return [(kernels.nm_mask(x, 2, 4, 1), True), (kernels.nm_mask(_randn(40, 37), 3, 8, 0), True)]
    if module == "perm_score":
        fmask = torch.rand(40, 24, generator=torch.Generator().manual_seed(0)).to(DEVICE) > 0.4
        candidates = torch.stack([torch.randperm(40, generator=torch.Generator().manual_seed(s)) for s in range(9)])
        return [(kernels.permutation_scores(fmask, candidates.to(DEVICE), 2, 4), True)]
    if module == "mvue":
        g = _randn(70, 33)
        out = [(kernels.mvue_prune(g, 3, 5, rule), True) for rule in ("mvue12", "mvue24", "mvue24_approx")]
        out.append((kernels.mvue_prune(g, 3, 5, "mvue24", transpose=True), True))
        for layout, (T, O) in (("cutlass", (192, 96)), ("cusparselt", (128, 128))):
            out += _exact(mvue_prune_compressed(_randn(T, O).half(), 3, 5, "mvue24", layout))
        return out
    if module == "sparse_forward":
        b = _ints(24, seed=3)
        return [
            (kernels.sparse_linear_forward(x, w, b, 2, 4), True),
            (kernels.sparse_linear_forward(x, w, None, 3, 8, alpha=alpha), True),
        ]
    if module == "input_grad":
        return [
            (kernels.sparse_input_grad(dy, w, 2, 4, perm=perm), True),
            (kernels.sparse_input_grad(dy, w, 2, 4, alpha=alpha), True),
        ]
    if module == "weight_grad":
        return [
            (kernels.sparse_weight_grad(dy, x, w, 2, 4, srste_lambda=0.5), True),
            (kernels.sparse_weight_grad(dy, x, w, 2, 4, grad_prune="mvue24", step=3, key=5), False),
        ]
    if module == "srste":
        return [(srste_add(_ints(24, 40, seed=4), w, 2, 4, 0.5), True)]
    if module == "gather_t":
        return [(gather_t(_randn(70, 24), perm), True)]
    out = [
        (operand24.forward_operand(w, 2, 4, alpha=alpha), True),
        (operand24.backward_operand(w, 2, 4, perm=perm), True),
        (operand24.input_grad_operand(w, 2, 4, perm=perm), True),
    ]
    config = [triton.Config(tile)]
    for layout, (O, K) in (("cutlass", (128, 192)), ("cusparselt", (128, 128)), ("cusparselt_sm90", (128, 128))):
        w16, compress = _randn(O, K).half(), 1 + operand24.LAYOUTS.index(layout)
        if operand24._whole_groups(config, {}, M=4, COMPRESS=compress, TRANSPOSED=False):  # as a GPU prunes
            out += _exact(operand24.forward_operand_compressed(w16, 2, 4, layout))
        if operand24._whole_groups(config, {}, M=4, COMPRESS=compress, TRANSPOSED=True):
            out += _exact(operand24.input_grad_operand_compressed(w16, 2, 4, layout, perm=_perm(O)))
    return out


def _gpu_tiles() -> list[tuple[str, str, dict]]:
    """``(module, kernel, tile)`` for every tile a kernel tries on a GPU (compress24's: test_compress24)."""
    kernels_of = {
        "nm_mask": "nm_mask_kernel", "perm_score": "perm_score_kernel", "mvue": "mvue_kernel",
        "sparse_forward": "sparse_forward_kernel", "input_grad": "input_grad_kernel",
        "weight_grad": "weight_grad_kernel", "srste": "srste_kernel", "gather_t": "gather_t_kernel",
        "operand24": "masked_operand_kernel",
    }  # fmt: skip
    out = []
    for module, kernel in kernels_of.items():
        mod = importlib.import_module(f"nmcompile.kernels.{module}")
        tiles = mod.TILES + [tile for tile, _ in getattr(mod, "THREAD_TILES", [])]
        out += [(module, kernel, tile) for tile in tiles]
    return out


@pytest.mark.parametrize(
    ("module", "kernel", "tile"),
    _gpu_tiles(),
    ids=lambda v: "x".join(map(str, v.values())) if isinstance(v, dict) else v,
)
def test_every_gpu_tile_gives_the_interpreter_tiles_results(module, kernel, tile, monkeypatch):
    """The interpreter runs one small tile, so the bounds of tiles past ``T``, ``O`` or ``K`` at the
    sizes a GPU picks never ran: each GPU tile, as the kernel's only config, gives what the small tile
    gives (checked against the reference above), bit for bit; an MVUE-pruned weight gradient, whose
    sums a tile orders, within fp32 round-off."""
    expected = _tile_cases(module, tile)
    monkeypatch.setattr(
        getattr(importlib.import_module(f"nmcompile.kernels.{module}"), kernel), "configs", [triton.Config(tile)]
    )
    got = _tile_cases(module, tile)
    assert len(got) == len(expected) > 0
    for (result, exact), (want, _) in zip(got, expected, strict=True):
        if exact:
            assert torch.equal(result, want)
        else:
            assert_close(result.cpu(), want.cpu(), rel=EPS[torch.float32])


@pytest.mark.parametrize("module", ["sparse_forward", "input_grad", "weight_grad"])
def test_gemms_run_their_first_config_untimed_under_deterministic_algorithms(module, monkeypatch):
    """Each GEMM tile sums in its own order, so a tile picked by timing could round differently in
    the next process: under ``torch.use_deterministic_algorithms`` a GEMM kernel runs its first
    config and times none; outside it the autotuner picks, as before."""
    mod = importlib.import_module(f"nmcompile.kernels.{module}")
    autotuner = getattr(mod, f"{module}_kernel")
    first, second = mod.TILES[0], mod.TILES[1]
    monkeypatch.setattr(autotuner, "configs", [triton.Config(first)])
    expected = _tile_cases(module, first)
    monkeypatch.setattr(autotuner, "configs", [triton.Config(first), triton.Config(second)])
    timed, tiles, run = [], [], autotuner.fn.run
    monkeypatch.setattr(autotuner, "run", lambda *args, **kwargs: timed.append(kwargs))

    def record(*args, **kwargs):
        tiles.append({key: kwargs[key] for key in first})
        return run(*args, **kwargs)

    monkeypatch.setattr(autotuner.fn, "run", record)
    with deterministic_algorithms(True):
        got = _tile_cases(module, first)
    assert timed == [] and tiles == [first] * len(expected)
    for (result, _), (want, _) in zip(got, expected, strict=True):
        assert torch.equal(result, want)
    _tile_cases(module, first)
    assert len(timed) == len(expected) and len(tiles) == len(expected)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: kernels.nm_mask(torch.zeros(4, 6), 2, 4, 1), "not divisible by m=4"),
        (lambda: kernels.nm_mask(torch.zeros(4, 6), 1, 3, 1), "m a power of two"),
        (lambda: kernels.nm_mask(torch.zeros(4, 8, dtype=torch.float64), 2, 4, 1), "must be one of"),
        (lambda: kernels.sparse_linear_forward(torch.zeros(3, 8), torch.zeros(4, 12), None, 2, 4), r"\[O, K=8\]"),
        (lambda: kernels.sparse_linear_forward(torch.zeros(3, 8), torch.zeros(4, 8), torch.zeros(5), 2, 4), "bias"),
        (lambda: kernels.sparse_input_grad(torch.zeros(3, 6), torch.zeros(6, 8), 2, 4, perm=torch.arange(6)), "perm"),
        (lambda: kernels.sparse_weight_grad(torch.zeros(3, 4), torch.zeros(2, 8), torch.zeros(4, 8), 2, 4), "x "),
        (
            lambda: kernels.sparse_weight_grad(
                torch.zeros(4, 4), torch.zeros(4, 8), torch.zeros(4, 8), 2, 4, grad_prune="topk"
            ),
            "grad_prune",
        ),
        (lambda: kernels.mvue_prune(torch.zeros(4, 4, 4), 0, 0, "mvue24"), "2-D"),
        (
            lambda: kernels.sparse_linear_forward(torch.zeros(3, 8), torch.zeros(4, 8), None, 2, 4, alpha=0.5),
            "alpha must be a 0-d float32 tensor on cpu, got 0.5",
        ),
        (
            lambda: kernels.sparse_input_grad(torch.zeros(3, 4), torch.zeros(4, 8), 2, 4, alpha=torch.zeros(3)),
            r"alpha must be .*, got 'torch.float32 \(3,\) on cpu'",
        ),
        (lambda: kernels.permutation_scores(torch.ones(6, 4, dtype=torch.bool), torch.zeros(1, 6), 2, 4), "O % m"),
        (lambda: kernels.sparse_linear_forward(torch.zeros(3, 6), torch.zeros(4, 6), None, 2, 4), "K % m == 0"),
        # n and m are compiled in: a float n ranked 2.5 as 3, a tensor or numpy int failed inside Triton
        (
            lambda: kernels.sparse_linear_forward(torch.zeros(3, 8), torch.zeros(4, 8), None, 2.5, 4),
            r"take n and m as Python ints, got n=2\.5, m=4",
        ),
        (lambda: kernels.sparse_input_grad(torch.zeros(3, 4), torch.zeros(4, 8), torch.tensor(2), 4), "Python ints"),
        (lambda: forward_operand(torch.zeros(4, 8), 2, 4.0), r"got n=2, m=4\.0"),
        (lambda: kernels.nm_mask(torch.zeros(4, 8), True, 4, 1), "got n=True"),
        (lambda: kernels.sparse_input_grad(torch.zeros(3, 4), torch.zeros(6, 8), 2, 4), r"\[O=4, K\]"),
        (lambda: kernels.sparse_weight_grad(torch.zeros(3, 4), torch.zeros(3, 6), torch.zeros(4, 6), 2, 4), "K % m"),
        (
            lambda: kernels.sparse_weight_grad(torch.zeros(3, 4), torch.zeros(3, 8).half(), torch.zeros(4, 8), 2, 4),
            "in dy's dtype",
        ),
        # A tensor on another device (meta: the one other device a CPU-only torch has) is named
        (lambda: kernels.sparse_linear_forward(torch.zeros(3, 8), _meta(4, 8), None, 2, 4), "x on cpu, weight on meta"),
        (lambda: kernels.sparse_linear_forward(torch.zeros(3, 8), torch.zeros(4, 8), _meta(4), 2, 4), "bias on meta"),
        (
            lambda: kernels.sparse_input_grad(torch.zeros(3, 4), torch.zeros(4, 8), 2, 4, perm=_meta(4).long()),
            "weight on cpu, perm on meta",
        ),
        (lambda: kernels.sparse_input_grad(_meta(3, 4), torch.zeros(4, 8), 2, 4), "dy on meta, weight on cpu"),
        (
            lambda: kernels.sparse_weight_grad(torch.zeros(3, 4), _meta(3, 8), torch.zeros(4, 8), 2, 4),
            "x on meta",
        ),
        (lambda: srste_add(_meta(4, 8), torch.zeros(4, 8), 2, 4, 0.1), "grad on meta, weight on cpu"),
        (lambda: forward_operand(torch.zeros(4, 8), 2, 4, mask=_meta(4, 8).bool()), "mask on meta"),
        (
            lambda: backward_operand(torch.zeros(4, 8), 2, 4, perm=_meta(4).long()),
            "weight on cpu, perm on meta",
        ),
        (
            lambda: kernels.permutation_scores(torch.ones(8, 4, dtype=torch.bool), torch.rand(1, 8), 2, 4),
            r"integer perms \[P, O\], got torch.bool \(8, 4\) and torch.float32 \(1, 8\)",
        ),
        (lambda: kernels.permutation_scores(torch.tensor(True), torch.zeros(1, 1).long(), 1, 2), "bool mask"),
        (
            lambda: kernels.search_permutation(
                torch.ones(8, 4, dtype=torch.bool), torch.arange(8), [torch.arange(4)], 2, 4
            ),
            r"candidates must have current's shape \(8,\)",
        ),
    ],
)
def test_launchers_check_inputs(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def _meta(*shape: int) -> torch.Tensor:
    """A float32 tensor on the meta device: another device than the CPU, with no data."""
    return torch.zeros(shape, device="meta")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: real-size kernels on the GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_real_sizes_on_cuda(dtype):
    """Transformer-FFN sizes on the GPU: the three GEMMs against the portable ops' math."""
    T, O, K, n, m = 2048, 4096, 1024, 2, 4
    x, w, dy = _randn(T, K, dtype=dtype), _randn(O, K, dtype=dtype, seed=1), _randn(T, O, dtype=dtype, seed=2)
    perm = _perm(O)
    fmask = torch.ops.nmsparse.nm_mask(w, n, m, 1)
    assert torch.equal(kernels.nm_mask(w, n, m, 1), fmask)
    y = kernels.sparse_linear_forward(x, w, None, n, m)
    assert_close(y.float(), (x.float() @ (w * fmask).float().t()), rel=2e-2)
    bmask = reference.backward_mask(w, fmask, perm, n, m)
    dx = kernels.sparse_input_grad(dy, w, n, m, perm=perm)
    assert_close(dx.float(), dy.float() @ (w * bmask).float(), rel=2e-2)
    dw = kernels.sparse_weight_grad(dy, x, w, n, m, grad_prune="mvue24", step=3, key=5)
    pruned = torch.ops.nmsparse.mvue_prune(dy, torch.tensor(3), 5, "mvue24")
    assert_close(dw.float(), (pruned.float().t() @ x.float()), rel=2e-2)


@pytest.mark.parametrize("perm", [True, False], ids=["bimask", "dense"])
def test_input_grad_op_is_split_at_any_batch_size(perm, monkeypatch):
    """A lowered layer's input gradient runs masked operand + GEMM even at 8 tokens, far below
    ``SPLIT_TOKENS`` (the fused kernel gains little from fewer tokens), with the reference's math;
    the forward still runs fused there."""
    from nmcompile.kernels import ops

    T, O, K, n, m = 8, 16, 32, 2, 4
    assert T < ops.SPLIT_TOKENS
    w, dy, x = _randn(O, K, seed=1).to(DEVICE), _randn(T, O, seed=2).to(DEVICE), _randn(T, K, seed=3).to(DEVICE)
    p = _perm(O).to(DEVICE) if perm else None
    calls = []

    def counted(name: str):
        real = getattr(ops, name)

        def run(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)

        return run

    for name in ("backward_operand", "forward_operand"):
        monkeypatch.setattr(ops, name, counted(name))
    dx = ops.triton_input_grad(dy, w, None, p, n, m)
    assert calls == ["backward_operand" if perm else "forward_operand"]
    fmask = reference.nm_mask(w.cpu(), n, m, dim=1)
    mask = reference.backward_mask(w.cpu(), fmask, p.cpu(), n, m) if perm else fmask
    assert_close(dx.cpu(), dy.cpu() @ (w.cpu() * mask))
    ops.triton_linear(x, w, None, None, None, n, m, 0.0, "fc1")
    assert calls == ["backward_operand" if perm else "forward_operand"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the Triton ops on large batches")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_split_ops_at_real_sizes_on_cuda(dtype):
    """The lowered Triton ops from ``SPLIT_TOKENS`` tokens on: masked operand (or pruned ``dY``) from
    one Triton pass, then a cuBLAS GEMM, against the portable ops' math."""
    from nmcompile.kernels import ops

    T, O, K, n, m = 2048, 4096, 1024, 2, 4
    assert T >= ops.SPLIT_TOKENS
    x, w, dy = _randn(T, K, dtype=dtype), _randn(O, K, dtype=dtype, seed=1), _randn(T, O, dtype=dtype, seed=2)
    perm = _perm(O)
    fmask = torch.ops.nmsparse.nm_mask(w, n, m, 1)
    y = ops.triton_linear(x, w, None, None, None, n, m, 0.0, "fc1")
    assert_close(y.float(), (x.float() @ (w * fmask).float().t()), rel=2e-2)
    bmask = reference.backward_mask(w, fmask, perm, n, m)
    assert_close(ops.triton_input_grad(dy, w, None, perm, n, m).float(), dy.float() @ (w * bmask).float(), rel=2e-2)
    dw = ops.triton_weight_grad(dy, x, w, None, n, m, 0.0, "mvue24", 5, None, torch.tensor(3))
    pruned = torch.ops.nmsparse.mvue_prune(dy, torch.tensor(3), 5, "mvue24")
    assert_close(dw.float(), (pruned.float().t() @ x.float()), rel=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the portable op's CUDA kernel")
@pytest.mark.parametrize("rule", ["mvue12", "mvue24", "mvue24_approx"])
def test_portable_mvue_op_on_cuda_prunes_as_on_the_cpu(rule):
    """``nmsparse::mvue_prune`` on CUDA (the Triton MVUE kernel) keeps the entries the composite op
    keeps on the CPU, values within one rounding, on a convolution's token view of ``dY``."""
    dy = _randn(8, 64, 14, 14, dtype=torch.bfloat16)
    tokens = dy.movedim(1, -1).reshape(-1, 64)
    got = torch.ops.nmsparse.mvue_prune(tokens, torch.tensor(7), 11, rule).cpu()
    expected = torch.ops.nmsparse.mvue_prune(tokens.cpu(), torch.tensor(7), 11, rule)
    assert torch.equal(got != 0, expected != 0)
    assert_within_one_rounding(got, expected)
