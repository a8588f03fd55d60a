"""Property tests (hypothesis): mask invariants of SPEC §2, §4 and compiled/reference agreement on
random MLP shapes × N:M × backward modes."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import train_and_compare
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import nmcompile  # noqa: F401  (registers the ops)
from nmcompile import reference

nm_pairs = st.integers(2, 8).flatmap(lambda m: st.tuples(st.integers(1, m), st.just(m)))


@st.composite
def matrices(draw, nm=nm_pairs):
    """A weight with both dims multiples of m; values from a tiny integer range make many ties."""
    n, m = draw(nm)
    rows, cols = draw(st.integers(1, 4)) * m, draw(st.integers(1, 4)) * m
    seed = draw(st.integers(0, 2**31))
    generator = torch.Generator().manual_seed(seed)
    if draw(st.booleans()):
        w = torch.randint(-3, 4, (rows, cols), generator=generator).float()
    else:
        w = torch.randn(rows, cols, generator=generator)
    return w, n, m


def check_nm_mask(w: torch.Tensor, mask: torch.Tensor, n: int, m: int, dim: int) -> None:
    """SPEC §2: ``mask`` keeps exactly ``n`` of each group of ``m`` along ``dim``, none smaller in
    magnitude than an entry it drops."""
    groups_mag = w.abs().movedim(dim, -1).reshape(-1, m)
    groups_keep = mask.movedim(dim, -1).reshape(-1, m)
    assert (groups_keep.sum(1) == n).all(), "a group keeps other than n entries"
    kept = torch.where(groups_keep, groups_mag, torch.inf).min(1).values
    dropped = torch.where(groups_keep, -torch.inf, groups_mag).max(1).values
    assert (kept >= dropped).all(), "a group keeps an entry smaller than one it drops"


@settings(max_examples=60, deadline=None)
@given(matrices(), st.sampled_from([0, 1]))
def test_nm_mask_keeps_exactly_n_of_the_largest(case, dim):
    w, n, m = case
    for mask in (reference.nm_mask(w, n, m, dim), torch.ops.nmsparse.nm_mask(w, n, m, dim)):
        check_nm_mask(w, mask, n, m, dim)


@settings(max_examples=60, deadline=None)
@given(matrices(), st.integers(0, 2**31))
def test_bimask_backward_mask_is_within_forward_and_nm_along_o(case, seed):
    w, n, m = case
    perm = torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(seed))
    f = reference.nm_mask(w, n, m, 1)
    b = reference.backward_mask(w, f, perm, n, m)
    assert not (b & ~f).any()  # B ⊆ F
    per_block = b[perm].reshape(-1, m, w.shape[1]).sum(1)
    assert (per_block <= n).all()
    # B keeps min(n, kept) per block (SPEC §5's score); zero-valued kept weights tie with pruned
    # ones, so with zeros in W the count lies between the scores of F ∧ (W ≠ 0) and of F.
    upper = reference.permutation_score(f, perm, n, m)
    lower = reference.permutation_score(f & (w != 0), perm, n, m)
    assert lower <= int(b.sum()) <= upper
    if not (w == 0).any():
        assert int(b.sum()) == upper


@settings(max_examples=40, deadline=None)
@given(matrices(nm=st.integers(2, 6).flatmap(lambda m: st.tuples(st.integers(1, m), st.just(m)))))
def test_transposable_mask_is_nm_both_ways(case):
    w, n, m = case
    t = reference.transposable_mask(w, n, m)
    blocks = t.reshape(w.shape[0] // m, m, w.shape[1] // m, m).permute(0, 2, 1, 3)
    rows, cols = blocks.sum(-1), blocks.sum(-2)
    if m <= 4:
        assert (rows == n).all() and (cols == n).all()
    else:  # the greedy stops only where it must: every entry left out has a full row or column
        assert (rows <= n).all() and (cols <= n).all()
        full = (rows == n).unsqueeze(-1) | (cols == n).unsqueeze(-2)
        assert (blocks | full).all()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    nm=st.sampled_from([(2, 4), (1, 4), (1, 2), (2, 8)]),
    widths=st.lists(st.integers(1, 3), min_size=2, max_size=3),
    backward=st.sampled_from(["bimask", "transposable", "dense"]),
    tokens=st.integers(1, 9),
)
def test_random_mlps_compile_and_match_the_reference(nm, widths, backward, tokens):
    torch._dynamo.reset()
    n, m = nm
    sizes = [w * m * 2 for w in widths]

    def make() -> nn.Module:
        layers: list[nn.Module] = []
        for d_in, d_out in itertools.pairwise(sizes):
            layers += [nn.Linear(d_in, d_out), nn.Tanh()]
        return nn.Sequential(*layers)

    train_and_compare(make, (tokens, sizes[0]), steps=2, n=n, m=m, backward=backward, inner="aot_eager")


def test_the_mask_check_catches_a_wrong_mask():
    """``check_nm_mask`` can fail: a mask keeping a smaller entry, or other than N a group, is caught,
    and the right mask passes."""
    w = torch.tensor([[4.0, 3.0, 2.0, 1.0], [-1.0, 5.0, -6.0, 2.0]])
    check_nm_mask(w, torch.tensor([[True, True, False, False], [False, True, True, False]]), 2, 4, 1)
    with pytest.raises(AssertionError, match="smaller than one it drops"):
        check_nm_mask(w, torch.tensor([[True, False, True, False], [False, True, True, False]]), 2, 4, 1)
    with pytest.raises(AssertionError, match="other than n entries"):
        check_nm_mask(w, torch.tensor([[True, True, True, False], [False, True, True, False]]), 2, 4, 1)
