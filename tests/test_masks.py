"""Masks, permutation score/search and candidate seeding against SPEC §2, §4 and §5.

Every oracle here is written independently of ``nmcompile.reference``: plain Python loops over
groups, blocks and permutations, so the library is checked against the SPEC text, not itself.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import nmcompile  # noqa: F401  (registers the nmsparse:: custom ops)
from nmcompile import reference
from nmcompile.options import SparsityConfig
from nmcompile.state import LayerSpec, LayerState, candidate_generator

NM_PAIRS = [(1, 2), (2, 4), (1, 4), (3, 4), (2, 8), (5, 8), (1, 16)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (shape, dim): the size along ``dim`` is 16 or 32, divisible by every m in NM_PAIRS.
SHAPES_DIMS = [
    ((16, 3), 0),
    ((3, 16), 1),
    ((2, 32), -1),
    ((16, 2, 3), 0),
    ((2, 16, 3), 1),
    ((2, 3, 16), -1),
]
KINDS = ["randn", "ties", "zeros", "specials"]


# ---------------------------------------------------------------------------------------------
# Independent oracles
# ---------------------------------------------------------------------------------------------


def make_input(kind: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A test tensor: Gaussian, many ties (integers -2..2), all zeros, or ties mixed with NaN/±inf."""
    g = torch.Generator().manual_seed(seed)
    if kind == "randn":
        return torch.randn(shape, generator=g).to(dtype)
    if kind == "zeros":
        return torch.zeros(shape, dtype=dtype)
    a = torch.randint(-2, 3, shape, generator=g).double()
    if kind == "specials":
        u = torch.rand(shape, generator=g)
        a = torch.where(u < 0.15, torch.nan, a)
        a = torch.where((u >= 0.15) & (u < 0.3), -torch.nan, a)
        a = torch.where((u >= 0.3) & (u < 0.45), torch.inf, a)
        a = torch.where((u >= 0.45) & (u < 0.55), -torch.inf, a)
    return a.to(dtype)


def _get(nested: list, index: tuple[int, ...]) -> float:
    for i in index:
        nested = nested[i]
    return nested  # type: ignore[return-value]


def _mag(x: float) -> float:
    """SPEC §2 magnitude: ``|x|``, with NaN as the largest magnitude (+inf)."""
    return math.inf if math.isnan(x) else abs(x)


def brute_nm_mask(a: torch.Tensor, n: int, m: int, dim: int) -> torch.Tensor:
    """SPEC §2 by loops: in each group of ``m`` along ``dim`` keep the ``n`` largest ``|a|``, ties to lower index."""
    shape = tuple(a.shape)
    dim = dim % len(shape)
    values = a.double().tolist()  # exact for every float dtype
    keep = torch.zeros(shape, dtype=torch.bool)
    others = [range(s) if d != dim else range(1) for d, s in enumerate(shape)]
    for base in itertools.product(*others):
        for g in range(shape[dim] // m):
            members = []
            for j in range(m):
                idx = list(base)
                idx[dim] = g * m + j
                members.append(tuple(idx))
            # Largest magnitude first; among equal magnitudes the lower index first.
            ranked = sorted(range(m), key=lambda j, members=members: (-_mag(_get(values, members[j])), j))
            for j in ranked[:n]:
                keep[members[j]] = True
    return keep


def _groups(mask: torch.Tensor, m: int, dim: int) -> torch.Tensor:
    moved = mask.movedim(dim, -1)
    return moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)


def all_valid_blocks(n: int, m: int) -> list[tuple[tuple[int, int], ...]]:
    """Every ``m×m`` block (as its kept ``(row, col)`` cells) with exactly ``n`` kept per row and per column."""
    blocks = []
    for cells in itertools.combinations(itertools.product(range(m), range(m)), n * m):
        rows = [0] * m
        cols = [0] * m
        for r, c in cells:
            rows[r] += 1
            cols[c] += 1
        if all(x == n for x in rows) and all(x == n for x in cols):
            blocks.append(cells)
    return blocks


def brute_score(fmask: torch.Tensor, perm: torch.Tensor, n: int, m: int) -> int:
    """SPEC §5 by loops: over columns and groups of ``m`` rows of ``F[P]``, sum ``min(n, kept)``."""
    rows = fmask.tolist()
    order = perm.tolist()
    O, K = fmask.shape
    total = 0
    for k in range(K):
        for g in range(O // m):
            kept = sum(1 for i in range(g * m, (g + 1) * m) if rows[order[i]][k])
            total += min(n, kept)
    return total


def random_perm(size: int, seed: int) -> torch.Tensor:
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# §2 N:M mask
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,m", NM_PAIRS)
@pytest.mark.parametrize("shape,dim", SHAPES_DIMS)
def test_reference_nm_mask_matches_brute_force(shape, dim, n, m, dtype):
    """SPEC §2: n largest |a| per group of m along dim, ties to lower index, NaN largest, exactly n kept."""
    for kind in KINDS:
        a = make_input(kind, shape, dtype, seed=n * 100 + m)
        got = reference.nm_mask(a, n, m, dim)
        assert got.dtype == torch.bool and got.shape == a.shape, kind
        assert torch.equal(got, brute_nm_mask(a, n, m, dim)), kind
        assert bool((_groups(got, m, dim).sum(-1) == n).all()), kind


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,m", NM_PAIRS)
@pytest.mark.parametrize("shape,dim", SHAPES_DIMS)
def test_custom_op_nm_mask_equals_reference(shape, dim, n, m, dtype):
    """SPEC §2: the rank-counting custom op gives the same exact mask as the reference (ties, NaN, inf)."""
    for kind in KINDS:
        a = make_input(kind, shape, dtype, seed=n * 100 + m + 1)
        got = torch.ops.nmsparse.nm_mask(a, n, m, dim)
        assert got.dtype == torch.bool and got.shape == a.shape, kind
        assert torch.equal(got, reference.nm_mask(a, n, m, dim)), kind


@pytest.mark.parametrize(
    "shape,dim,n,m", [((16, 32), 1, 2, 4), ((32, 16), 0, 2, 4), ((8, 16, 3), 1, 1, 8), ((32, 16), 0, 3, 16)]
)
def test_nm_mask_and_keep_compile_with_consumers(shape, dim, n, m):
    """Under Inductor, the composite masks fused into a consumer compile (Inductor 2.13's CPU vector
    code rejects some bool forms) and equal the reference: ``nm_mask`` in a ``where``, ``nm_keep``
    (its 0/1 float twin) in a product."""
    from nmcompile.ops import nm_keep, nm_mask  # the Python composites: dynamo traces their aten ops

    a = make_input("ties", shape, torch.float32, seed=3)
    expected = reference.nm_mask(a, n, m, dim)

    def fused(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mask = nm_mask(x, n, m, dim)
        return mask, torch.where(mask, x, 0), x * nm_keep(x, n, m, dim)

    mask, kept, product = torch.compile(fused, fullgraph=True)(a)
    assert torch.equal(mask, expected)
    assert torch.equal(kept, torch.where(expected, a, 0)) and torch.equal(product, torch.where(expected, a, 0))


def test_nm_mask_hand_cases():
    """SPEC §2 on hand-written groups: ties to lower index, NaN and +inf tie (lower index wins), sign ignored."""
    nan, inf = math.nan, math.inf
    a = torch.tensor(
        [
            [1.0, -1.0, 1.0, -1.0],  # all tie: 2:4 keeps indices 0, 1
            [0.5, -3.0, 3.0, 2.0],  # |-3| == |3|: keep 1 and 2
            [inf, 1.0, nan, 5.0],  # inf and NaN both largest
            [1.0, nan, 7.0, -inf],  # NaN (index 1) ties with -inf (index 3); both beat 7
            [0.0, -0.0, 0.0, 0.0],  # zeros: lowest indices
        ]
    )
    expected = torch.tensor(
        [
            [True, True, False, False],
            [False, True, True, False],
            [True, False, True, False],
            [False, True, False, True],
            [True, True, False, False],
        ]
    )
    assert torch.equal(reference.nm_mask(a, 2, 4, 1), expected)
    assert torch.equal(torch.ops.nmsparse.nm_mask(a, 2, 4, 1), expected)
    # 1:2 with +inf before NaN keeps +inf (lower index); NaN before +inf keeps NaN.
    b = torch.tensor([[inf, nan, nan, inf, -inf, nan]])
    expected_b = torch.tensor([[True, False, True, False, True, False]])
    assert torch.equal(reference.nm_mask(b, 1, 2, 1), expected_b)
    assert torch.equal(torch.ops.nmsparse.nm_mask(b, 1, 2, 1), expected_b)


@pytest.mark.parametrize(("n", "m"), [(16, 32), (1, 32), (5, 17), (31, 32)])
def test_nm_mask_ties_in_groups_wider_than_16(n, m):
    """SPEC §2's ties to the lower index hold in groups of up to 32 (the widest ``m`` allowed), where
    an unstable sort on the CPU reorders equal entries: all-equal groups keep their first ``n``, and
    tie-heavy groups match the loops."""
    equal = torch.full((3, 2 * m), -1.5)
    first = torch.zeros(2 * m, dtype=torch.bool)
    first[:n], first[m : m + n] = True, True
    assert torch.equal(reference.nm_mask(equal, n, m, 1), first.expand(3, -1))
    assert torch.equal(torch.ops.nmsparse.nm_mask(equal, n, m, 1), first.expand(3, -1))
    ties = make_input("ties", (4, 2 * m), torch.float32, seed=m)
    assert torch.equal(reference.nm_mask(ties, n, m, 1), brute_nm_mask(ties, n, m, 1))
    assert torch.equal(torch.ops.nmsparse.nm_mask(ties, n, m, 1), brute_nm_mask(ties, n, m, 1))


def test_nm_mask_non_contiguous_input():
    """SPEC §2 holds for a transposed (non-contiguous) view: same mask as on a contiguous copy."""
    a = make_input("ties", (12, 8), torch.float32, seed=3).t()
    expected = brute_nm_mask(a, 2, 4, 0)
    assert torch.equal(reference.nm_mask(a, 2, 4, 0), expected)
    assert torch.equal(torch.ops.nmsparse.nm_mask(a, 2, 4, 0), expected)


@pytest.mark.parametrize("shape,dim", [((3, 6), 1), ((6, 3), 0), ((2, 3, 10), -1)])
def test_nm_mask_rejects_size_not_divisible_by_m(shape, dim):
    """SPEC §2: ``A.shape[dim] % M == 0`` is required (ValueError otherwise), in the reference and the op."""
    a = torch.randn(shape)
    with pytest.raises(ValueError, match="divisible"):
        reference.nm_mask(a, 2, 4, dim)
    with pytest.raises(ValueError, match="divisible"):
        torch.ops.nmsparse.nm_mask(a, 2, 4, dim)


@pytest.mark.parametrize("n,m", [(0, 4), (5, 4)])
def test_reference_nm_mask_rejects_n_outside_1_to_m(n, m):
    """SPEC §2: ``1 <= N <= M`` is required."""
    with pytest.raises(ValueError, match=f"{n}:{m}"):
        reference.nm_mask(torch.randn(2, 8), n, m, 1)


# ---------------------------------------------------------------------------------------------
# §4 transposable mask
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n,m,expected",
    [(1, 2, 2), (2, 2, 1), (1, 3, 6), (2, 3, 6), (1, 4, 24), (2, 4, 90), (3, 4, 24), (4, 4, 1)],
)
def test_transposable_patterns_are_all_valid_blocks(n, m, expected):
    """SPEC §4: the enumerated patterns are exactly the blocks with n per row and column (90 for 2:4, 24 for 1:4)."""
    patterns = reference.transposable_patterns(n, m)
    assert patterns.shape == (expected, m * m)
    got = {tuple(p.tolist()) for p in patterns}
    assert len(got) == expected  # no duplicates
    mine = set()
    for cells in all_valid_blocks(n, m):
        flat = [False] * (m * m)
        for r, c in cells:
            flat[r * m + c] = True
        mine.add(tuple(flat))
    assert got == mine


@pytest.mark.parametrize(
    "n,m,shape", [(1, 2, (4, 6)), (1, 3, (6, 9)), (2, 3, (6, 3)), (1, 4, (8, 12)), (2, 4, (8, 12)), (3, 4, (4, 8))]
)
def test_transposable_mask_is_optimal_for_small_m(n, m, shape):
    """SPEC §4: for m <= 4 each m×m block has exactly n per row and column and keeps the maximum |w| sum."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    mask = reference.transposable_mask(w, n, m)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert torch.equal(torch.ops.nmsparse.transposable_mask(w, n, m), mask)
    valid = all_valid_blocks(n, m)
    mag = w.abs().tolist()
    keep = mask.tolist()
    O, K = shape
    for bo in range(0, O, m):
        for bk in range(0, K, m):
            for i in range(m):
                assert sum(keep[bo + i][bk + j] for j in range(m)) == n
                assert sum(keep[bo + j][bk + i] for j in range(m)) == n
            kept_sum = sum(mag[bo + i][bk + j] for i in range(m) for j in range(m) if keep[bo + i][bk + j])
            best = max(sum(mag[bo + r][bk + c] for r, c in cells) for cells in valid)
            assert kept_sum == pytest.approx(best, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize(("n", "m"), [(1, 2), (1, 4), (2, 4), (3, 4)])
def test_transposable_mask_keeps_a_nan_and_the_best_finite_rest(n, m):
    """SPEC §2, §4: an inf or NaN ranks largest, so it is kept; among the patterns that keep it the
    mask keeps the largest sum of the finite |w| (a NaN used to make every such pattern tie)."""
    generator = torch.Generator().manual_seed(m + n)
    patterns = reference.transposable_patterns(n, m)
    for trial in range(40):
        w = torch.randn(m, m, generator=generator, dtype=torch.float64)
        at = int(torch.randint(m * m, (1,), generator=generator))
        w.view(-1)[at] = (math.nan, math.inf, -math.inf)[trial % 3]
        keep = reference.transposable_mask(w, n, m).flatten()
        finite = w.abs().flatten().nan_to_num(posinf=0.0)
        best = max(float(finite[p].sum()) for p in patterns if p[at])
        assert bool(keep[at]) and float(finite[keep].sum()) == pytest.approx(best, rel=1e-12), (trial, at)
        assert torch.equal(torch.ops.nmsparse.transposable_mask(w, n, m).flatten(), keep)


def test_transposable_mask_of_float64_magnitudes_near_the_maximum():
    """Pattern sums of fp64 magnitudes near ``finfo.max`` are capped so they stay finite: a block
    whose best pattern keeps four 1e300 entries keeps them, where uncapped sums of the 1e308 entries
    overflow to inf and every pattern keeping both would tie (the first, keeping none of the 1e300)."""
    w = torch.zeros(4, 4, dtype=torch.float64)
    w[0, 0] = w[1, 1] = 1e308
    w[0, 2] = w[1, 3] = w[2, 0] = w[3, 1] = 1e300
    expected = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    assert torch.equal(reference.transposable_mask(w, 2, 4), expected)
    assert torch.equal(torch.ops.nmsparse.transposable_mask(w, 2, 4), expected)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_transposable_mask_greedy_for_m8(n):
    """SPEC §4 (greedy, m > 4): at most n kept per row and per column of each 8×8 block, the block
    maximum kept, and each block exactly the greedy procedure's choice."""
    m = 8
    w = torch.randn(16, 24, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    mask = reference.transposable_mask(w, n, m)
    assert torch.equal(torch.ops.nmsparse.transposable_mask(w, n, m), mask)
    blocks = mask.reshape(2, m, 3, m).permute(0, 2, 1, 3)  # [bo, bk, row, col]
    mags = w.abs().reshape(2, m, 3, m).permute(0, 2, 1, 3)
    assert bool((blocks.sum(-1) <= n).all())
    assert bool((blocks.sum(-2) <= n).all())
    for bo in range(2):
        for bk in range(3):
            top = int(mags[bo, bk].flatten().argmax())
            assert bool(blocks[bo, bk].flatten()[top])
            assert blocks[bo, bk].flatten().tolist() == _greedy_block(mags[bo, bk].flatten().tolist(), n, m)


def _greedy_block(magnitudes: list[float], n: int, m: int) -> list[bool]:
    """SPEC §4's greedy, written plainly: visit one block's entries by magnitude (descending, ties
    in index order) and keep each whose row and column both hold fewer than ``n`` kept."""
    keep, rows, cols = [False] * (m * m), [0] * m, [0] * m
    for i in sorted(range(m * m), key=lambda i: -magnitudes[i]):
        r, c = divmod(i, m)
        if rows[r] < n and cols[c] < n:
            keep[i], rows[r], cols[c] = True, rows[r] + 1, cols[c] + 1
    return keep


@pytest.mark.parametrize("shape,m", [((6, 8), 4), ((8, 6), 4), ((8, 12), 8), ((12, 16), 8)])
def test_transposable_mask_rejects_shapes_not_divisible_by_m(shape, m):
    """SPEC §4: transposable needs O % M == 0 and K % M == 0."""
    w = torch.randn(shape)
    with pytest.raises(ValueError, match="divisible"):
        reference.transposable_mask(w, 2, m)
    with pytest.raises(ValueError, match="divisible"):
        torch.ops.nmsparse.transposable_mask(w, 2, m)


# ---------------------------------------------------------------------------------------------
# §5 permutation score and search
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,m,O,K", [(1, 2, 6, 4), (2, 4, 8, 8), (1, 4, 12, 8), (3, 4, 8, 4), (2, 8, 16, 8)])
def test_permutation_score_matches_brute_force(n, m, O, K):
    """SPEC §5: score = sum over columns and groups of m rows of F[P] of min(n, kept); at most count(F)."""
    w = torch.randn(O, K, generator=torch.Generator().manual_seed(O + K))
    fmask = reference.nm_mask(w, n, m, 1)
    for seed in range(6):
        perm = torch.arange(O) if seed == 0 else random_perm(O, seed)
        score = reference.permutation_score(fmask, perm, n, m)
        assert isinstance(score, int)
        assert score == brute_score(fmask, perm, n, m)
        assert score <= int(fmask.sum())
        assert reference.permutation_score(fmask.to(torch.uint8), perm, n, m) == score  # as the search passes it


@pytest.mark.parametrize("m", [255, 256])
def test_permutation_score_counts_blocks_past_a_byte(m):
    """Blocks of 256 rows or more count in int64 (a byte holds at most 255); both sides of the switch
    match the brute force on a mask that keeps every entry of some blocks."""
    fmask = torch.rand(2 * m, 3, generator=torch.Generator().manual_seed(m)) < 0.9
    fmask[:m, 0] = True
    for n in (1, m - 1, m):
        perm = random_perm(2 * m, n)
        assert reference.permutation_score(fmask, perm, n, m) == brute_score(fmask, perm, n, m)


@pytest.mark.parametrize("per_batch", [1, 2, 5, 12])
@pytest.mark.parametrize("shape,n,m", [((16, 8), 2, 4), ((16, 4, 3), 1, 4), ((16, 8), 3, 8)])
def test_permutation_scores_in_batches_are_each_candidates_score(monkeypatch, per_batch, shape, n, m):
    """The search scores its candidates in batches of ``SCORE_CHUNK`` mask entries (one candidate,
    two, five with a shorter last batch, all 12): each score is the brute force's, for a linear and
    a conv mask, and the search picks the first best, as one at a time."""
    fmask = reference.nm_mask(torch.randn(shape, generator=torch.Generator().manual_seed(n + m)), n, m, 1)
    monkeypatch.setattr(reference, "SCORE_CHUNK", per_batch * fmask.numel())
    perms = torch.stack([random_perm(16, seed) for seed in range(12)])
    expected = [brute_score(fmask.reshape(16, -1), p, n, m) for p in perms]
    assert len(set(expected)) > 3, expected  # the candidates differ, so a mixed-up batch shows
    scores = reference.permutation_scores(fmask, perms, n, m)
    assert scores.dtype == torch.int64 and scores.tolist() == expected
    best, score = reference.search_permutation(fmask, perms[0], list(perms[1:]), n, m)
    first_best = max(range(12), key=lambda i: (expected[i], -i))
    assert torch.equal(best, perms[first_best]) and score == expected[first_best]


def test_permutation_score_hand_example():
    """SPEC §5 on a 4×3 mask with 1:2, for the identity and for a hand-picked permutation."""
    fmask = torch.tensor(
        [
            [1, 1, 0],
            [1, 0, 1],
            [0, 1, 1],
            [1, 0, 0],
        ],
        dtype=torch.bool,
    )
    # Identity, groups rows (0,1) and (2,3):
    #   col0: min(1, 1+1) + min(1, 0+1) = 2;  col1: min(1, 1+0) + min(1, 1+0) = 2;  col2: min(1, 0+1) + min(1, 1+0) = 2
    assert reference.permutation_score(fmask, torch.arange(4), 1, 2) == 6
    # P = [0, 2, 1, 3], groups rows (0,2) and (1,3):
    #   col0: min(1, 1+0) + min(1, 1+1) = 2;  col1: min(1, 1+1) + min(1, 0+0) = 1;  col2: min(1, 0+1) + min(1, 1+0) = 2
    assert reference.permutation_score(fmask, torch.tensor([0, 2, 1, 3]), 1, 2) == 5


def _split_mask() -> torch.Tensor:
    """8×4, 2:4 along K: rows 0-3 keep columns {0, 1}, rows 4-7 keep columns {2, 3}. count(F) = 16."""
    fmask = torch.zeros(8, 4, dtype=torch.bool)
    fmask[:4, :2] = True
    fmask[4:, 2:] = True
    return fmask


def test_permutation_score_maximum_is_count_of_f():
    """SPEC §5: the maximum score is count(F), reached when F[P] is already N:M along O."""
    fmask = _split_mask()
    # Identity: group rows 0-3: col0 min(2,4) + col1 min(2,4) + 0 + 0 = 4; rows 4-7 likewise 4 -> 8.
    assert reference.permutation_score(fmask, torch.arange(8), 2, 4) == 8
    # Interleaved: each group has 2 rows keeping {0,1} and 2 keeping {2,3}: 4 columns x min(2, 2) x 2 groups = 16.
    assert reference.permutation_score(fmask, torch.tensor([0, 4, 1, 5, 2, 6, 3, 7]), 2, 4) == 16 == int(fmask.sum())
    # A transposable mask is N:M along both dims, so the identity already scores count(F).
    for n, m in [(1, 4), (2, 4), (3, 4), (1, 2)]:
        t = reference.transposable_mask(torch.randn(8, 8, generator=torch.Generator().manual_seed(m + n)), n, m)
        assert reference.permutation_score(t, torch.arange(8), n, m) == int(t.sum()) == 8 * n * 8 // m


def test_search_permutation_returns_best_candidate():
    """SPEC §5: the search keeps the best-scoring of current and candidates."""
    fmask = _split_mask()
    current = torch.arange(8)
    good = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])  # score 16
    medium = torch.tensor([0, 1, 2, 4, 3, 5, 6, 7])  # groups: (2+2+1+1) + (1+1+2+2) = 12
    assert reference.permutation_score(fmask, medium, 2, 4) == 12
    best, score = reference.search_permutation(fmask, current, [medium, good, current.flip(0)], 2, 4)
    assert torch.equal(best, good)
    assert score == 16 == reference.permutation_score(fmask, best, 2, 4)


def test_search_permutation_tie_keeps_current_then_earliest():
    """SPEC §5: a tie with the current permutation keeps it; among equal better candidates the first wins."""
    fmask = _split_mask()
    current = torch.tensor([3, 2, 1, 0, 7, 6, 5, 4])  # score 8, like identity (same groups)
    same = torch.arange(8)  # same groups as current: score 8
    best, score = reference.search_permutation(fmask, current, [same], 2, 4)
    assert torch.equal(best, current) and score == 8
    first = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])
    second = torch.tensor([4, 0, 5, 1, 6, 2, 7, 3])  # rows reordered inside each group of first: also 16
    best, score = reference.search_permutation(fmask, current, [same, first, second], 2, 4)
    assert torch.equal(best, first) and score == 16
    best, _ = reference.search_permutation(fmask, current, [second, first], 2, 4)
    assert torch.equal(best, second)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (1, 2), (2, 8)])
def test_search_permutation_never_below_current(n, m):
    """SPEC §5: the result's score is the maximum over current and candidates, never below current."""
    O = 16
    fmask = reference.nm_mask(torch.randn(O, 16, generator=torch.Generator().manual_seed(n + m)), n, m, 1)
    for trial in range(4):
        current = random_perm(O, 1000 + trial)
        candidates = [random_perm(O, 10 * trial + i) for i in range(8)]
        best, score = reference.search_permutation(fmask, current, candidates, n, m)
        scores = [brute_score(fmask, p, n, m) for p in [current, *candidates]]
        assert score == max(scores) == brute_score(fmask, best, n, m)
        assert score >= scores[0]
        assert sorted(best.tolist()) == list(range(O))


def brute_sweep(fmask: torch.Tensor, perm: torch.Tensor, n: int, m: int, generator, groups: int) -> torch.Tensor:
    """One ``perm_swaps`` sweep by loops: the blocks paired as ``swap_rows`` draws them (per group,
    a ``randperm`` of its blocks, taken two by two), and in each pair every swap of a row of one
    block with a row of the other scored by ``brute_score``; the best gain above 0, first in
    row-major order, is made."""
    flat = fmask.reshape(fmask.shape[0], -1)
    per_group = fmask.shape[0] // groups // m
    base = brute_score(flat, perm, n, m)
    result = perm.clone()
    for g in range(groups):
        picks = (torch.randperm(per_group, generator=generator)[: per_group // 2 * 2] + g * per_group).tolist()
        for first, second in zip(picks[::2], picks[1::2], strict=True):
            best, where = 0, None
            for i, j in itertools.product(range(m), range(m)):
                a, b = first * m + i, second * m + j
                trial = perm.clone()
                trial[a], trial[b] = perm[b], perm[a]
                gain = brute_score(flat, trial, n, m) - base
                if gain > best:
                    best, where = gain, (a, b)
            if where is not None:
                a, b = where
                result[a], result[b] = perm[b], perm[a]
    return result


@pytest.mark.parametrize(
    ("shape", "n", "m", "groups"),
    [((16, 8), 2, 4, 1), ((32, 12), 1, 4, 2), ((32, 16), 3, 8, 1), ((24, 8), 2, 4, 3), ((20, 6), 1, 2, 1),
     ((16, 4, 3), 2, 4, 1), ((64, 16), 8, 16, 2)],
)  # fmt: skip
def test_swap_rows_makes_each_pairs_best_swap(shape, n, m, groups):
    """``perm_swaps``: each sweep makes, in each random pair of blocks (inside a group; an odd block
    left out), the swap with the largest score gain above 0, first on ties, as the loops find it;
    a conv mask's columns are its ``(c, *k)`` positions."""
    moved = 0
    for seed in range(4):
        fmask = reference.nm_mask(torch.randn(shape, generator=torch.Generator().manual_seed(seed)), n, m, 1)
        size = shape[0] // groups
        perm = torch.cat([random_perm(size, 10 * seed + g) + g * size for g in range(groups)])
        got = reference.swap_rows(fmask, perm, n, m, 1, torch.Generator().manual_seed(seed), groups)
        want = brute_sweep(fmask, perm, n, m, torch.Generator().manual_seed(seed), groups)
        assert torch.equal(got, want), seed
        moved += int((got != perm).sum())
    assert moved, "no sweep made a swap: the comparison would be vacuous"


def test_swap_rows_never_lowers_the_score_and_keeps_rows_in_their_group():
    """Sweep by sweep the score never falls and rises over the run; the result is a permutation
    with every row in its group; ``sweeps`` sweeps draw as that many one-sweep calls on one
    generator; the inputs and the global RNG are left alone."""
    fmask = reference.nm_mask(torch.randn(64, 40, generator=torch.Generator().manual_seed(3)), 2, 4, 1)
    start = torch.cat([random_perm(32, 1), random_perm(32, 2) + 32])
    kept = start.clone()
    rng = torch.random.get_rng_state()
    generator = torch.Generator().manual_seed(9)
    perm, scores = start, [brute_score(fmask, start, 2, 4)]
    for _ in range(12):
        perm = reference.swap_rows(fmask, perm, 2, 4, 1, generator, groups=2)
        scores.append(brute_score(fmask, perm, 2, 4))
    assert scores == sorted(scores) and scores[-1] > scores[0]
    assert torch.equal(reference.swap_rows(fmask, start, 2, 4, 12, torch.Generator().manual_seed(9), 2), perm)
    assert sorted(perm.tolist()) == list(range(64)) and torch.equal(perm // 32, torch.arange(64) // 32)
    assert torch.equal(start, kept) and torch.equal(torch.random.get_rng_state(), rng)


def test_swap_rows_with_nothing_to_pair_or_no_sweeps_returns_the_permutation():
    """One block per group (nothing to pair) or ``sweeps=0``: the permutation back unchanged, a copy."""
    fmask = reference.nm_mask(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)), 2, 4, 1)
    perm = random_perm(8, 4)
    for sweeps, groups in [(5, 2), (0, 1)]:
        out = reference.swap_rows(fmask, perm, 2, 4, sweeps, torch.Generator(), groups)
        assert torch.equal(out, perm) and out.data_ptr() != perm.data_ptr()


def test_swap_rows_in_float64_chooses_as_in_float32(monkeypatch):
    """Rows too wide for float32's exact integers (``4·K > 2²⁴``) sweep in float64: the same swaps,
    shown here by lowering the threshold."""
    fmask = reference.nm_mask(torch.randn(32, 24, generator=torch.Generator().manual_seed(2)), 2, 4, 1)
    perm = random_perm(32, 5)
    narrow = reference.swap_rows(fmask, perm, 2, 4, 6, torch.Generator().manual_seed(1))
    monkeypatch.setattr(reference, "FLOAT32_EXACT", 8)
    original = torch.Tensor.to
    seen = []
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **k: seen.append(a[:1]) or original(t, *a, **k))
    wide = reference.swap_rows(fmask, perm, 2, 4, 6, torch.Generator().manual_seed(1))
    assert (torch.float64,) in seen and (torch.float32,) not in seen
    assert torch.equal(wide, narrow) and not torch.equal(narrow, perm)


# ---------------------------------------------------------------------------------------------
# §4 Bi-Mask backward mask
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("n,m,O,K", [(2, 4, 8, 8), (1, 4, 12, 8), (3, 4, 8, 12), (1, 2, 6, 4), (2, 8, 16, 16)])
def test_backward_mask_properties(n, m, O, K, dtype):
    """SPEC §4 bimask: B ⊆ F; B[P] <= n per m rows and column; count(B) = score; B[P] = nm_mask(|W⊙F|[P]) & F[P]."""
    w = torch.randn(O, K, generator=torch.Generator().manual_seed(O * K + n)).to(dtype)
    w = torch.where(w == 0, torch.ones((), dtype=dtype), w)  # no exact zeros
    fmask = reference.nm_mask(w, n, m, 1)
    for seed in range(4):
        perm = torch.arange(O) if seed == 0 else random_perm(O, seed)
        b = reference.backward_mask(w, fmask, perm, n, m)
        assert b.dtype == torch.bool and b.shape == w.shape
        assert not bool((b & ~fmask).any())
        bp = b[perm]
        assert bool((bp.reshape(O // m, m, K).sum(1) <= n).all())
        assert int(b.sum()) == reference.permutation_score(fmask, perm, n, m) == brute_score(fmask, perm, n, m)
        wf = torch.where(fmask, w, torch.zeros((), dtype=dtype)).abs()
        assert torch.equal(bp, reference.nm_mask(wf[perm], n, m, 0) & fmask[perm])
        # Each kept entry of B[P] beats (or ties at lower index) every dropped F-entry of its block.
        assert torch.equal(bp, brute_nm_mask(wf[perm], n, m, 0) & fmask[perm])


# ---------------------------------------------------------------------------------------------
# §5 seeding and the search schedule
# ---------------------------------------------------------------------------------------------


def test_candidate_generator_is_seeded_by_seed_layer_and_step():
    """SPEC §5: candidates depend on (seed, layer index, step) only; each of the three changes the draws."""
    base = torch.randperm(16, generator=candidate_generator(3, 5, 7))
    again = torch.randperm(16, generator=candidate_generator(3, 5, 7))
    assert torch.equal(base, again)
    for args in [(4, 5, 7), (3, 6, 7), (3, 5, 8), (5, 3, 7), (7, 5, 3)]:
        other = torch.randperm(16, generator=candidate_generator(*args))
        assert not torch.equal(base, other), args


def test_candidate_generator_leaves_global_rng_alone():
    """SPEC §5: candidates never come from the global RNG: drawing them leaves its state unchanged."""
    torch.manual_seed(1234)
    before = torch.random.get_rng_state()
    g = candidate_generator(0, 1, 2)
    draws = [torch.randperm(32, generator=g) for _ in range(5)]
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(99)  # the global seed does not influence the candidates
    again = candidate_generator(0, 1, 2)
    assert all(torch.equal(d, torch.randperm(32, generator=again)) for d in draws)


def _structured_weight() -> torch.Tensor:
    """8×8: rows 0-3 large in columns {0,1,4,5}, rows 4-7 large in {2,3,6,7}, so the identity scores poorly."""
    w = 0.01 * torch.randn(8, 8, generator=torch.Generator().manual_seed(11))
    w[:4, [0, 1, 4, 5]] += torch.arange(1.0, 17.0).reshape(4, 4)
    w[4:, [2, 3, 6, 7]] += torch.arange(1.0, 17.0).reshape(4, 4)
    return w


def _spec(backward: str) -> LayerSpec:
    config = SparsityConfig(n=2, m=4, perm_candidates=10, perm_interval=3, seed=1)
    return LayerSpec(name="w", index=0, rows=8, backward=backward, config=config)


def test_layer_state_search_schedule_and_reproduction():
    """SPEC §5: search at steps 0, 3, 6, 9 (every perm_interval from 0) with candidates from (seed, layer, step)."""
    weight = _structured_weight()
    fmask = reference.nm_mask(weight, 2, 4, 1)
    identity_score = reference.permutation_score(fmask, torch.arange(8), 2, 4)
    state = LayerState(_spec("bimask"), torch.device("cpu"), None)
    expected_perm = torch.arange(8)
    rng_before = torch.random.get_rng_state()
    seen = []
    for step in range(10):
        assert int(state.step) == step
        state.begin_training_step(weight)
        if step % 3 == 0:
            generator = candidate_generator(1, 0, step)
            candidates = [torch.randperm(8, generator=generator) for _ in range(10)]
            expected_perm, _ = reference.search_permutation(fmask, expected_perm, candidates, 2, 4)
            if step == 0:
                assert not torch.equal(expected_perm, torch.arange(8))  # the search has something to find
        seen.append(state.last_search_step)
        assert torch.equal(state.perm, expected_perm), step
        assert reference.permutation_score(fmask, state.perm, 2, 4) >= identity_score
        state.end_training_step()
    assert seen == [0, 0, 0, 3, 3, 3, 6, 6, 6, 9]
    assert int(state.step) == 10
    assert torch.equal(torch.random.get_rng_state(), rng_before)


def test_layer_state_search_scores_with_the_n_in_force():
    """SPEC §5 under structure decay (SPEC §8): each step's search masks and scores with that step's
    N (3:4, 2:4, then 1:4 over frames of one step), not the target's."""
    weight = torch.randn(16, 16, generator=torch.Generator().manual_seed(5))
    config = SparsityConfig(n=1, m=4, perm_candidates=20, perm_interval=1, seed=2, structure_decay=True,
                            total_steps=3)  # fmt: skip
    spec = LayerSpec(name="w", index=0, rows=16, backward="bimask", config=config)
    state = LayerState(spec, torch.device("cpu"), None)
    expected = torch.arange(16)
    for step, n in enumerate([3, 2, 1]):
        state.begin_training_step(weight)
        generator = candidate_generator(2, 0, step)
        candidates = [torch.randperm(16, generator=generator) for _ in range(20)]
        at_target, _ = reference.search_permutation(reference.nm_mask(weight, 1, 4, 1), expected, candidates, 1, 4)
        expected, _ = reference.search_permutation(reference.nm_mask(weight, n, 4, 1), expected, candidates, n, 4)
        assert torch.equal(state.perm, expected), step
        if step == 0:
            assert not torch.equal(at_target, expected)  # scoring at the target's N would choose otherwise
        state.end_training_step()


def test_layer_state_search_runs_once_per_step():
    """SPEC §5: calling begin_training_step twice in one search step does not search again."""
    weight = _structured_weight()
    state = LayerState(_spec("bimask"), torch.device("cpu"), None)
    state.begin_training_step(weight)
    after_first = state.perm.clone()
    state.perm.copy_(torch.arange(8))
    state.begin_training_step(weight)
    assert torch.equal(state.perm, torch.arange(8))
    assert not torch.equal(after_first, torch.arange(8))
    assert state.last_search_step == 0


@pytest.mark.parametrize("backward", ["dense", "transposable"])
def test_layer_state_without_bimask_never_searches(backward):
    """SPEC §4/§5: only bimask holds a searched permutation; "dense" and "transposable" keep the identity."""
    weight = _structured_weight()
    state = LayerState(_spec(backward), torch.device("cpu"), None)
    for _ in range(10):
        state.begin_training_step(weight)
        state.end_training_step()
    assert torch.equal(state.perm, torch.arange(8))
    assert state.last_search_step is None
    assert int(state.step) == 10
