"""The 2:4 sparse-tensor-core path (``kernels="sparse24"``).

On the CPU (``TRITON_INTERPRET=1`` from conftest): the masked-operand and MVUE kernels write the
three GEMMs' sparse operands exactly as the reference defines them, 2:4 along their last dim, and
PyTorch's CUTLASS compression layout round-trips them; the ``sparse24`` ops train like the
reference when their GEMMs run dense (the lowering is forced past its device check); and the
lowering falls back with a reason. On a CUDA sm80+ GPU the compressed GEMMs are checked against
dense ones and a bf16 model trains close to the portable path.
"""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
import triton
from conftest import (
    EMULATED_ALGS,
    MLP,
    NOT_ON_CUDA,
    assert_close,
    cpu_mask_note,
    cuda_autocast_losses,
    deterministic_algorithms,
    interpreted,
    launched_wide,
    record_alg_ids,
    train_and_compare,
)
from torch import nn
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_from_dense_cutlass,
    sparse_semi_structured_to_dense_cutlass,
)

import nmcompile
from nmcompile import reference
from nmcompile.kernels import operand24, sparse24
from nmcompile.kernels import ops as kernel_ops
from nmcompile.kernels.common import interpreting
from nmcompile.kernels.gather_t import gather_t
from nmcompile.kernels.mvue import mvue_prune
from nmcompile.kernels.operand24 import backward_operand, forward_operand, input_grad_operand
from nmcompile.kernels.srste import srste_add
from nmcompile.ops import masked_weight

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SM80 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (O, K, n, m): ragged O against the 16/32 tiles; every 2:4-compatible pattern the kernels take.
SHAPES = [(20, 16, 2, 4), (36, 64, 1, 4), (64, 32, 2, 8), (8, 32, 1, 2)]


def _randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device=DEVICE, dtype=dtype)


def is_24(a: torch.Tensor) -> bool:
    """Whether ``a`` (2-D) has at most two nonzeros in every aligned group of four along its last dim."""
    cols = a.shape[-1]
    padded = torch.nn.functional.pad(a, (0, -cols % 4)) if cols % 4 else a
    return bool(((padded != 0).reshape(a.shape[0], -1, 4).sum(-1) <= 2).all())


def _perm(size: int) -> torch.Tensor:
    return torch.randperm(size, generator=torch.Generator().manual_seed(1)).to(DEVICE)


def _roundtrip(a: torch.Tensor) -> torch.Tensor:
    """``a`` through CUTLASS's compressed layout (values + metadata) and back (fp16/bf16 only)."""
    packed, meta = sparse_semi_structured_from_dense_cutlass(a)
    assert packed.shape == (a.shape[0], a.shape[1] // 2)
    return sparse_semi_structured_to_dense_cutlass(packed, meta)


def test_fits_24():
    """An N:M pattern is 2:4 when no aligned group of four can hold more than two kept entries: each
    N:M group meeting an aligned four can put ``min(n, overlap)`` of its kept entries there (its
    overlap is contiguous), over one period of both groupings. m need not be a power of two (1:3,
    2:12 are 2:4; it said not, blaming the pattern for the kernels' limit)."""
    for m in range(2, 33):
        for n in range(1, m + 1):
            period = math.lcm(m, 4)
            most = max(
                sum(min(n, len(set(range(w, w + 4)) & set(range(g, g + m)))) for g in range(0, period, m))
                for w in range(0, period, 4)
            )
            assert sparse24.fits_24(n, m) is (most <= 2), (n, m)
    cases = ((1, 3), (2, 12), (2, 6), (3, 12), (2, 2))
    assert [sparse24.fits_24(*p) for p in cases] == [True, True, False, False, False]


def test_is_24():
    a = torch.tensor([[1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0], [1.0, 0.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0]])
    assert is_24(a[:1]) and not is_24(a)
    assert is_24(torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 1.0]]))  # ragged end: padded with zeros
    assert not is_24(torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0]]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("O", "K", "n", "m"), SHAPES)
def test_forward_operand_is_w_times_f(dtype, O, K, n, m):
    """``W ⊙ F`` exactly as the reference's mask picks it, 2:4 along ``K``, NaN and ties included."""
    w = _randn(O, K, dtype=dtype)
    w[0, :4] = torch.tensor([1.0, 1.0, 1.0, float("nan")], dtype=dtype)
    fmask = reference.nm_mask(w.cpu(), n, m, dim=1)
    got = forward_operand(w, n, m).cpu()
    assert got.dtype == dtype and got.is_contiguous()
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(torch.where(fmask, w.cpu(), 0)))
    assert is_24(torch.nan_to_num(got, nan=1.0))
    given = forward_operand(w, n, m, mask=~fmask.to(DEVICE), dtype=torch.float32).cpu()
    assert torch.equal(torch.nan_to_num(given), torch.nan_to_num(torch.where(~fmask, w.cpu(), 0).float()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("O", "K", "n", "m"), SHAPES)
def test_input_grad_operand_is_permuted_backward_mask(dtype, O, K, n, m):
    """``(W[P] ⊙ Bp)ᵀ`` with ``Bp`` the reference Bi-Mask in permuted order: 2:4 along ``O``."""
    if O % m:
        O = O + (-O) % m
    w = _randn(O, K, dtype=dtype)
    perm = _perm(O)
    fmask = reference.nm_mask(w.cpu(), n, m, dim=1)
    bmask = reference.backward_mask(w.cpu(), fmask, perm.cpu(), n, m)
    got = input_grad_operand(w, n, m, perm=perm).cpu()
    assert got.shape == (K, O) and got.is_contiguous()
    assert torch.equal(got, torch.where(bmask, w.cpu(), 0)[perm.cpu()].t())
    assert is_24(got)


def test_operand_configs_hold_whole_row_groups():
    """The operand kernel's GPU configs with few rows (K as wide as the threads) are pruned where a
    group of ``M`` rows would not fit in ``BLOCK_O``, and, for the transposed operand written
    compressed, where 16 rows (one metadata word) would not; in cuSPARSELt's sm90 layout (``COMPRESS``
    3), where 16 rows (``W ⊙ F``) or 32 (the transposed operand) would not. A config of 32 rows
    always stays."""
    configs = [triton.Config({"BLOCK_O": rows, "BLOCK_K": 1024}) for rows in (4, 8, 16, 32)]
    for m, kept in ((2, [4, 8, 16, 32]), (4, [4, 8, 16, 32]), (8, [8, 16, 32]), (32, [32])):
        pruned = operand24._whole_groups(configs, {}, M=m, COMPRESS=0, TRANSPOSED=True)
        assert [c.kwargs["BLOCK_O"] for c in pruned] == kept
        pruned = operand24._whole_groups(configs, {}, M=m, COMPRESS=2, TRANSPOSED=False)
        assert [c.kwargs["BLOCK_O"] for c in pruned] == kept
        pruned = operand24._whole_groups(configs, {}, M=m, COMPRESS=1, TRANSPOSED=True)
        assert [c.kwargs["BLOCK_O"] for c in pruned] == [b for b in kept if b >= 16]
        pruned = operand24._whole_groups(configs, {}, M=m, COMPRESS=3, TRANSPOSED=False)
        assert [c.kwargs["BLOCK_O"] for c in pruned] == [b for b in kept if b >= 16]
        pruned = operand24._whole_groups(configs, {}, M=m, COMPRESS=3, TRANSPOSED=True)
        assert [c.kwargs["BLOCK_O"] for c in pruned] == [32]
    assert {"M", "COMPRESS", "TRANSPOSED"} <= set(operand24.masked_operand_kernel.keys)  # a choice per pruning


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("O", "K", "n", "m"), [(16, 32, 2, 4), (24, 40, 1, 8), (8, 64, 3, 8)])
@pytest.mark.parametrize("decay", [False, True])
def test_backward_operand_is_w_times_b_in_place(dtype, O, K, n, m, decay):
    """The Triton path's input-gradient operand: ``W ⊙ B`` with the reference Bi-Mask ``B``, rows in
    ``W``'s order (``dY · (W ⊙ B)`` needs no gather); with mask decay ``α W`` where ``B`` prunes,
    rounded once to ``W``'s dtype; from a given forward mask too; a fp32 output of a bf16 ``W``."""
    w = _randn(O, K, dtype=dtype)
    perm = _perm(O)
    fmask = reference.nm_mask(w.cpu(), n, m, dim=1)
    bmask = reference.backward_mask(w.cpu(), fmask, perm.cpu(), n, m)
    alpha = torch.tensor(0.375, device=DEVICE) if decay else None
    pruned = (w.cpu().float() * 0.375).to(dtype) if decay else torch.zeros_like(w.cpu())
    expected = torch.where(bmask, w.cpu(), pruned)
    # α W rounded to bf16: the interpreter's fp32 -> bf16 cast truncates (README, "Tests"), one ulp.
    ulp = 2**-7 if decay and dtype == torch.bfloat16 else 0.0

    def same(got: torch.Tensor, want: torch.Tensor) -> None:
        assert got.dtype == want.dtype and torch.equal(got != 0, want != 0)
        torch.testing.assert_close(got.cpu(), want, rtol=ulp, atol=0)

    got = backward_operand(w, n, m, perm=perm, alpha=alpha)
    assert got.shape == (O, K)
    same(got, expected)
    same(backward_operand(w, n, m, perm=perm, mask=fmask.to(DEVICE), alpha=alpha), expected)
    same(backward_operand(w, n, m, perm=perm, alpha=alpha, dtype=torch.float32), expected.float())
    same(forward_operand(w, n, m, alpha=alpha), torch.where(fmask, w.cpu(), pruned))


def test_compressed_input_grad_operand_takes_int64_offsets_for_large_values(monkeypatch):
    """``WIDE`` counts the compressed values: for ``W`` ``[O, K]`` with small ``K`` the values
    ``[K, O / 2]`` have larger offsets than ``W``. Checked with ``INDEX_LIMIT`` between the two (about
    4.1e4 and 1.5e5, tile margins included), by the ``WIDE`` the kernel is launched with."""
    w, perm = _randn(1024, 32, dtype=torch.float16), _perm(1024)
    call = lambda: operand24.input_grad_operand_compressed(w, 2, 4, "cutlass", perm=perm)  # noqa: E731
    assert launched_wide(monkeypatch, operand24.masked_operand_kernel, 100_000, call) == [True]


def test_backward_operand_checks():
    w = _randn(16, 32)
    with pytest.raises(ValueError, match="needs perm"):
        backward_operand(w, 2, 4, perm=None)
    with pytest.raises(ValueError, match="perm must be int64"):
        backward_operand(w, 2, 4, perm=_perm(12))
    with pytest.raises(ValueError, match="alpha must be a 0-d float32"):
        backward_operand(w, 2, 4, perm=_perm(16), alpha=torch.tensor([0.5], device=DEVICE))
    with pytest.raises(ValueError, match="alpha must be a 0-d float32"):
        forward_operand(w, 2, 4, alpha=0.5)


def test_input_grad_operand_transposable_mask_and_checks():
    w = _randn(16, 32)
    tmask = reference.transposable_mask(w.cpu(), 2, 4).to(DEVICE)
    got = input_grad_operand(w, 2, 4, mask=tmask).cpu()
    assert torch.equal(got, torch.where(tmask.cpu(), w.cpu(), 0).t()) and is_24(got)
    with pytest.raises(ValueError, match="exactly one of perm"):
        input_grad_operand(w, 2, 4)
    with pytest.raises(ValueError, match="exactly one of perm"):
        input_grad_operand(w, 2, 4, perm=_perm(16), mask=tmask)
    with pytest.raises(ValueError, match="perm must be int64"):
        input_grad_operand(w, 2, 4, perm=_perm(16).int())
    with pytest.raises(ValueError, match="K must be divisible"):
        forward_operand(_randn(8, 6), 2, 4)
    with pytest.raises(ValueError, match="mask must be bool"):
        forward_operand(w, 2, 4, mask=tmask.float())
    with pytest.raises(ValueError, match="dtype must be one of"):
        forward_operand(w, 2, 4, dtype=torch.float64)


@pytest.mark.parametrize("rule", ["mvue12", "mvue24", "mvue24_approx"])
def test_weight_grad_operand_is_transposed_mvue(rule):
    """``mvue(dY)ᵀ`` ``[O, T]`` contiguous: the same pruned values as the untransposed kernel and the
    portable op (one counter stream), 2:4 along ``T`` (a ragged ``T`` included)."""
    dy = _randn(37, 24)
    key, step = reference.prune_key(3, 5), 11
    got = mvue_prune(dy, step, key, rule, transpose=True)
    assert got.shape == (24, 37) and got.is_contiguous()
    assert torch.equal(got, mvue_prune(dy, step, key, rule).t())
    expected = torch.ops.nmsparse.mvue_prune(dy.cpu(), torch.tensor(step), key, rule)
    assert torch.equal(got.cpu() != 0, expected.t() != 0)
    assert is_24(got.cpu())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("T", "O"), [(37, 20), (16, 16), (130, 72)])
@pytest.mark.parametrize("strided", [False, True])
def test_gather_t_is_the_transposed_column_gather(dtype, T, O, strided):
    """``gather_t(dY, P)`` is ``dY[:, P]ᵀ`` exactly, contiguous ``[O, T]``, for ragged tiles and a
    ``dY`` read through strides (every other column of a wider tensor)."""
    dy = _randn(T, 2 * O if strided else O, dtype=dtype, seed=T)[:, ::2] if strided else _randn(T, O, dtype=dtype)
    perm = _perm(O)
    out = gather_t(dy, perm)
    assert out.shape == (O, T) and out.is_contiguous()
    assert torch.equal(out, dy[:, perm].t())


def test_gather_t_wide_offsets_give_the_same_result(monkeypatch):
    """``WIDE`` (int64 offsets, forced by ``INDEX_LIMIT`` at 0) gathers bit for bit as int32 offsets."""
    from nmcompile.kernels import common

    dy, perm = _randn(40, 24, dtype=torch.bfloat16, seed=8), _perm(24)
    narrow = gather_t(dy, perm)
    monkeypatch.setattr(common, "INDEX_LIMIT", 0)
    assert common.wide_index(dy)
    assert torch.equal(gather_t(dy, perm), narrow)


def test_gather_t_with_a_perm_that_is_no_permutation_writes_only_its_result():
    """Values of ``perm`` are not checked (that would sync the device every call): a repeated one
    gives wrong rows, each still a column of ``dY``, and no write outside the result (it wrote
    through uninitialised row indices: a segfault under the interpreter)."""
    dy = _randn(5, 8)
    out = gather_t(dy, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3], device=DEVICE))
    assert out.shape == (8, 5)
    columns = dy.t()
    assert all(bool((columns == row).all(1).any()) for row in out)


def test_gather_t_checks():
    dy = _randn(8, 12)
    with pytest.raises(ValueError, match=r"perm must be int64 \[12\]"):
        gather_t(dy, _perm(12).int())
    with pytest.raises(ValueError, match=r"perm must be int64 \[12\]"):
        gather_t(dy, _perm(8))
    with pytest.raises(ValueError, match="a must be 2-D"):
        gather_t(dy[0], _perm(12))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("O", "K", "n", "m"), SHAPES)
@pytest.mark.parametrize("loaded", [False, True], ids=["ranked", "loaded-mask"])
def test_srste_add_is_one_rounding_of_the_reference(dtype, O, K, n, m, loaded):
    """``G + λ (1 − F) ⊙ W`` summed in fp32 and rounded once to ``W``'s dtype, with ``F`` ranked from
    ``W`` as the reference does (or a given mask), for a ``G`` in another dtype."""
    w, g = _randn(O, K, dtype=dtype), _randn(O, K, dtype=torch.bfloat16, seed=4)
    mask = reference.nm_mask(_randn(O, K, seed=5).cpu(), n, m, 1).to(DEVICE) if loaded else None
    f = mask if loaded else reference.nm_mask(w.cpu(), n, m, 1).to(DEVICE)
    got = srste_add(g, w, n, m, 0.25, mask=mask)
    exact = g.float() + 0.25 * torch.where(f, 0.0, w.float())
    assert got.dtype == dtype
    if interpreting() and dtype != torch.bfloat16:  # numpy's fp32 arithmetic: bit for bit
        assert torch.equal(got, exact.to(dtype))
    else:  # the interpreter truncates fp32 -> bf16; a GPU may fuse λ·W + G into one FMA: one step of dtype
        assert ((got.float() - exact).abs() <= exact.abs() * torch.finfo(dtype).eps).all()


def test_srste_add_checks():
    w = _randn(8, 16)
    with pytest.raises(ValueError, match="one \\[O, K\\] shape"):
        srste_add(_randn(8, 12), w, 2, 4, 0.1)
    with pytest.raises(ValueError, match="mask must be bool"):
        srste_add(_randn(8, 16), w, 2, 4, 0.1, mask=torch.ones(8, 16, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_operands_roundtrip_cutlass_layout(dtype):
    """The three operands, as the kernels write them, survive CUTLASS's compression layout bit for bit
    (the layout ``semi_structured_mm`` hands them to where cuSPARSELt is missing)."""
    w, dy = _randn(64, 64, dtype=dtype), _randn(64, 64, dtype=dtype, seed=2)
    operands = [
        forward_operand(w, 2, 4),
        input_grad_operand(w, 2, 4, perm=_perm(64)),
        mvue_prune(dy, 0, 7, "mvue24", transpose=True),
    ]
    for operand in operands:
        cpu = operand.cpu()
        assert torch.equal(_roundtrip(cpu), cpu)


def test_semi_structured_mm_checks():
    a = torch.zeros(32, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="do not chain"):
        sparse24.semi_structured_mm(a, torch.zeros(32, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="fp16 or bf16"):
        sparse24.semi_structured_mm(a.float(), torch.zeros(64, 8))
    with pytest.raises(ValueError, match="not on CUDA"):
        sparse24.semi_structured_mm(a, torch.zeros(64, 8, dtype=torch.float16))
    assert sparse24.blocker(torch.device("cpu"), torch.float16) == "not on CUDA (2:4 tensor cores need sm80+)"


def _ints(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Small integers (fp32): every product and sum below is exact in fp16 and bf16."""
    return torch.randint(-2, 3, (rows, cols), generator=torch.Generator().manual_seed(seed)).float()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("rows", "inner", "cols"), [(32, 64, 16), (20, 40, 30)], ids=["tiles", "ragged"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("transpose_result", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_semi_structured_mm_wrapper(emulated_24_library, dtype, rows, inner, cols, layout, transpose_result, with_bias):
    """``a @ b + bias`` exactly, in the layout asked for, for ``b`` row-major, column-major (``x.t()``)
    or a strided slice, ragged shapes padded and cut."""
    w, source = _ints(rows, inner, 0), _ints(inner + 8, cols + 8, 1).to(dtype)
    a = torch.where(reference.nm_mask(w, 2, 4, 1), w, 0.0).to(dtype)
    b = {
        "contiguous": source[:inner, :cols].contiguous(),
        "transposed": source[:inner, :cols].t().contiguous().t(),
        "sliced": source[:inner, :cols],
    }[layout]
    bias = torch.arange(rows, dtype=torch.float32) - 3 if with_bias else None
    got = sparse24.semi_structured_mm(a, b, bias=bias, transpose_result=transpose_result)
    expected = (a.float() @ b.float() + (0 if bias is None else bias[:, None])).to(dtype)
    if transpose_result:
        expected = expected.t()
        assert got.is_contiguous()
    assert got.dtype == dtype and torch.equal(got, expected)


def test_search_alg_picks_the_library_algorithm(emulated_24_library, monkeypatch):
    """``search_alg`` hands cuSPARSELt's search the operands ``compressed_mm`` would (padded), and
    ``compressed_mm`` passes the id it found on; CUTLASS has one algorithm, 0, and refuses others."""
    w, b = _ints(20, 40, 0), _ints(40, 30, 1).bfloat16()
    a = sparse24.compress(torch.where(reference.nm_mask(w, 2, 4, 1), w, 0.0).bfloat16())
    expected = sparse24.compressed_mm(a, b, transpose_result=True)
    if emulated_24_library == "cutlass":
        assert sparse24.search_alg(a, b, transpose_result=True) == 0
        with pytest.raises(ValueError, match="CUTLASS \\(no cuSPARSELt\\) has only algorithm 0"):
            sparse24.compressed_mm(a, b, alg_id=1)
        return
    calls = record_alg_ids(monkeypatch)
    alg_id = sparse24.search_alg(a, b, transpose_result=True)
    assert alg_id == EMULATED_ALGS - 1 and calls == list(range(EMULATED_ALGS))
    assert torch.equal(sparse24.compressed_mm(a, b, transpose_result=True, alg_id=alg_id), expected)
    assert calls[-1] == alg_id


@pytest.mark.parametrize("emulated_24_library", ["cusparselt"], indirect=True)
def test_search_without_mm_search_takes_the_deprecated_entry_point(emulated_24_library, monkeypatch):
    """A build whose ``torch._C._cusparselt`` has no ``mm_search`` searches with
    ``torch._cslt_sparse_mm_search``, on the same operands, to the same id."""
    w, b = _ints(20, 40, 0), _ints(40, 30, 1).bfloat16()
    a = sparse24.compress(torch.where(reference.nm_mask(w, 2, 4, 1), w, 0.0).bfloat16())
    searched, emulated = [], torch._C._cusparselt.mm_search

    def deprecated(packed, b_pad, bias=None, transpose_result=False):
        searched.append((packed, tuple(b_pad.shape), bias, transpose_result))
        return emulated(packed, b_pad, bias, None, None, transpose_result)[0]

    with_mm_search = sparse24.search_alg(a, b, transpose_result=True)
    monkeypatch.setattr(torch._C, "_cusparselt", types.SimpleNamespace(getVersionInt=lambda: 600))
    monkeypatch.setattr(torch, "_cslt_sparse_mm_search", deprecated)
    assert sparse24.search_alg(a, b, transpose_result=True) == with_mm_search == EMULATED_ALGS - 1
    assert len(searched) == 1 and searched[0][0] is a.packed and searched[0][1:] == ((64, 32), None, True)


def test_semi_structured_mm_runs_the_fastest_alg_searched_once(emulated_24_library, monkeypatch):
    """``semi_structured_mm`` runs the algorithm cuSPARSELt's search finds fastest (algorithm 0 ran the
    H200's FFN GEMMs no faster than dense), searching once per problem: shape, ``b``'s layout, bias;
    fp16 with a transposed result runs algorithm 0 unsearched (``search_fails``)."""
    monkeypatch.setattr(sparse24, "_FASTEST", {})
    w, b = _ints(20, 40, 0), _ints(40, 30, 1).bfloat16()
    a = torch.where(reference.nm_mask(w, 2, 4, 1), w, 0.0).bfloat16()
    if emulated_24_library == "cutlass":  # one algorithm: nothing to search
        assert torch.equal(sparse24.semi_structured_mm(a, b), (a.float() @ b.float()).bfloat16())
        assert list(sparse24._FASTEST.values()) == [0]
        return
    calls = record_alg_ids(monkeypatch)
    first = sparse24.semi_structured_mm(a, b, transpose_result=True)
    assert calls == [*range(EMULATED_ALGS), EMULATED_ALGS - 1]  # the search, then the product
    assert torch.equal(sparse24.semi_structured_mm(a, b, transpose_result=True), first)
    assert calls[EMULATED_ALGS + 1 :] == [EMULATED_ALGS - 1]  # no second search
    sparse24.semi_structured_mm(a, b.t().contiguous().t(), transpose_result=True)
    sparse24.semi_structured_mm(a, b, bias=torch.ones(20), transpose_result=True)
    assert len(calls) == 3 * (EMULATED_ALGS + 1) + 1 and len(sparse24._FASTEST) == 3
    half = sparse24.semi_structured_mm(a.half(), b.half(), transpose_result=True)
    assert calls[-1] == 0 and len(calls) == 3 * (EMULATED_ALGS + 1) + 2 and len(sparse24._FASTEST) == 4
    assert torch.equal(half, (a.float() @ b.float()).half().t())
    sparse24.semi_structured_mm(a.half(), b.half())  # fp16, result not transposed: searched
    assert calls[-EMULATED_ALGS - 1 :] == [*range(EMULATED_ALGS), EMULATED_ALGS - 1] and len(sparse24._FASTEST) == 5


@pytest.mark.parametrize("emulated_24_library", ["cusparselt"], indirect=True)
def test_deterministic_algorithms_run_algorithm_0_unsearched(emulated_24_library, monkeypatch):
    """Under ``torch.use_deterministic_algorithms`` cuSPARSELt runs algorithm 0, neither searched nor
    cached (a search by timing could pick another, which sums in another order, in the next
    process); outside it the search comes back."""
    monkeypatch.setattr(sparse24, "_FASTEST", {})
    w, b = _ints(20, 40, 0), _ints(40, 30, 1).bfloat16()
    a = torch.where(reference.nm_mask(w, 2, 4, 1), w, 0.0).bfloat16()
    calls = record_alg_ids(monkeypatch)
    with deterministic_algorithms(True):
        got = sparse24.semi_structured_mm(a, b, transpose_result=True)
    assert calls == [0] and sparse24._FASTEST == {}
    assert torch.equal(got, (a.float() @ b.float()).bfloat16().t())
    sparse24.semi_structured_mm(a, b, transpose_result=True)
    assert calls[1:] == [*range(EMULATED_ALGS), EMULATED_ALGS - 1]


def test_dense_operand_copies_only_what_the_libraries_cannot_read():
    x = torch.randn(8, 12)
    transposed = x.t()
    assert sparse24.dense_operand(x) is x
    assert sparse24.dense_operand(transposed) is transposed
    for unreadable in (x[:, :6], x.t()[:6], torch.randn(65)[1:].view(8, 8)):  # strided, strided, misaligned
        copied = sparse24.dense_operand(unreadable)
        assert copied.is_contiguous() and copied.data_ptr() % 16 == 0 and torch.equal(copied, unreadable)
        assert copied.data_ptr() != unreadable.data_ptr()


def test_blocker_on_hopper_needs_cusparselt(monkeypatch):
    """PyTorch's CUTLASS 2:4 GEMM runs on sm8x only: on sm90 the path needs cuSPARSELt."""
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, cusparselt, why in [
        ((9, 0), False, "sm90 and no cuSPARSELt in this torch build (its CUTLASS 2:4 GEMM runs on sm8x only)"),
        ((9, 0), True, None),
        ((8, 6), False, None),
        ((7, 5), True, "sm75 has no 2:4 sparse tensor cores (sm80+)"),
        ((9, 0), True, None),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda c=cusparselt: c)
        assert sparse24.blocker(cuda, bf16) == why
    assert sparse24.blocker(cuda, torch.float32).startswith("compute dtype torch.float32")


def test_op_matches_portable_op():
    """``sparse24_linear`` forward and all three gradients equal ``sparse_linear``'s (Bi-Mask, MVUE,
    SR-STE), with the GEMMs dense where there are no sparse tensor cores."""
    x, w, b, dy = _randn(12, 32), _randn(16, 32, seed=1), _randn(16, seed=2), _randn(12, 16, seed=3)
    perm, step = _perm(16), torch.tensor(3)
    results = []
    portable = (torch.ops.nmsparse.sparse_linear, masked_weight(w, reference.nm_mask(w, 2, 4, 1)))
    for op, mask in (portable, (kernel_ops.sparse24_linear, None)):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        y = op(*leaves, mask, perm, 2, 4, 0.01, "t", None, None, step, "mvue24", 9)
        y.backward(dy)
        results.append([y.detach(), *(t.grad for t in leaves)])
    for got, expected, what in zip(results[1], results[0], ("y", "dx", "dw", "db"), strict=True):
        assert_close(got, expected, rel=2e-6, what=what)


def test_structure_decay_stages_above_24_run_dense_gemms(emulated_24_library, monkeypatch):
    """Under structure decay the ``sparse24`` ops hand the 2:4 library only 2:4 operands: at N in force
    4 or 3 of 4 the forward and input gradient run dense on ``W ⊙ F`` (only MVUE's ``dYᵀ`` is
    compressed), at 2 all three; every result equals the portable op's at that N."""
    operands = []
    semi_structured_mm = sparse24.semi_structured_mm

    def recorded(a, b, **kwargs):
        operands.append(a)
        return semi_structured_mm(a, b, **kwargs)

    monkeypatch.setattr(sparse24, "semi_structured_mm", recorded)
    half = [_randn(*shape, seed=seed, dtype=torch.float16) for seed, shape in enumerate(((12, 32), (16, 32), (16,)))]
    dy, perm, step = _randn(12, 16, seed=3, dtype=torch.float16), _perm(16), torch.tensor(3)
    for n_eff, compressed in ((4, 1), (3, 1), (2, 3)):
        operands.clear()
        results = []
        for op, dtype in ((torch.ops.nmsparse.sparse_linear, torch.float32), (kernel_ops.sparse24_linear, None)):
            x, w, b = (t.to(dtype or t.dtype, copy=True).requires_grad_() for t in half)
            mask = masked_weight(w.detach(), reference.nm_mask(w.detach(), n_eff, 4, 1)) if dtype else None
            y = op(x, w, b, mask, perm, 2, 4, 0.01, "t", torch.tensor(n_eff), None, step, "mvue24", 9)
            y.backward(dy.to(y.dtype))
            results.append([y.detach(), x.grad, w.grad, b.grad])
        assert len(operands) == compressed and all(is_24(a) for a in operands), n_eff
        for got, expected, what in zip(results[1], results[0], ("y", "dx", "dw", "db"), strict=True):
            assert_close(got.float(), expected, rel=2e-3, what=f"{what} at {n_eff}:4")  # fp16 results


@pytest.fixture
def cpu_sparse24(monkeypatch):
    """Let the lowering choose ``sparse24`` on CPU tensors: every check but the device's (the ops then
    run their GEMMs dense, so the graphs, autograd and operands are what is tested)."""

    def blocker(node, config):
        why = original(node, config)
        return None if why is not None and why.startswith("not on CUDA") else why

    lowering = sys.modules["nmcompile.passes.lower_kernels"]  # the package re-exports the function
    original = lowering._sparse24_blocker
    monkeypatch.setattr(lowering, "_sparse24_blocker", blocker)


@interpreted
@pytest.mark.parametrize(
    "options",
    [
        {"grad_prune": "mvue24"},
        {"backward": "transposable", "grad_prune": "mvue12"},
        {"backward": "dense"},
        {},
        {"structure_decay": True, "total_steps": 3, "dense_steps": 1, "grad_prune": "mvue24"},
    ],
    ids=["mvue24", "transposable", "dense-backward", "no-grad-prune", "structure-decay"],
)
def test_sparse24_path_matches_reference(cpu_sparse24, options):
    """3 SGD steps on the ``sparse24`` ops: outputs, gradients and weights agree with the reference."""
    train_and_compare(MLP, (8, 32), steps=3, kernels="sparse24", inner="aot_eager", **options)


@interpreted
def test_report_and_graph_of_sparse24(cpu_sparse24):
    report = nmcompile.explain(MLP(), torch.randn(8, 32), kernels="sparse24", grad_prune="mvue24", inner="aot_eager")
    assert {r.kernel for r in report.rows} == {"sparse24"}
    targets = {str(n.target) for n in report.forward_graph.graph.nodes}
    assert "nmsparse.sparse24_linear.nograd" in targets and "fc1_fwd_mask" not in {
        n.name for n in report.forward_graph.graph.nodes
    }
    rows = nmcompile.explain(MLP(), torch.randn(8, 32), kernels="sparse24", inner="aot_eager").rows
    assert {r.kernel for r in rows} == {"sparse24 (dense: weight gradient (grad_prune='none'))"}
    decay = {"structure_decay": True, "total_steps": 10, "dense_steps": 2, "grad_prune": "mvue24"}
    rows = nmcompile.explain(MLP(), torch.randn(8, 32), kernels="sparse24", inner="aot_eager", **decay).rows
    assert {r.kernel for r in rows} == {"sparse24 (dense: forward and input gradient at 4:4/3:4 (structure decay))"}
    x64 = torch.randn(8, 32, dtype=torch.float64)
    doubles = nmcompile.explain(MLP().double(), x64, kernels="sparse24", inner="aot_eager").rows
    dtype = "weight dtype torch.float64 (the kernels take fp32, fp16, bf16)"
    assert {r.kernel for r in doubles} == {f"portable (not 2:4: {dtype}; {NOT_ON_CUDA if DEVICE == 'cpu' else dtype})"}


@interpreted
def test_report_names_the_dense_input_gradient_of_a_layer_o_does_not_divide(cpu_sparse24):
    """A layer whose ``O`` (10) is not divisible by m has a dense backward whatever ``backward``
    says: its ``kernel`` column names the dense input gradient (it read a plain ``sparse24``)."""

    class Narrow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 10)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    for backward in ("bimask", "transposable"):
        options = {"kernels": "sparse24", "grad_prune": "mvue24", "backward": backward, "inner": "aot_eager"}
        rows = {r.name: r for r in nmcompile.explain(Narrow(), torch.randn(8, 16), **options).rows}
        assert (rows["a.weight"].backward, rows["a.weight"].kernel) == (backward, "sparse24")
        note = "input gradient (O not divisible by m=4: the backward uses W ⊙ F)"
        assert (rows["b.weight"].backward, rows["b.weight"].kernel) == ("dense", f"sparse24 (dense: {note})")


def test_sparse24_fallback_reasons():
    """Where 2:4 is impossible the layer runs as ``auto`` would, and the report says why (a model on
    the CPU, on any machine: the reasons follow the weights' device)."""
    x, options = torch.randn(8, 32), {"kernels": "sparse24", "inner": "aot_eager"}
    kernels = {r.kernel for r in nmcompile.explain(MLP(), x, n=3, m=4, **options).rows}
    # fp32 weights with m=4 on the CPU: the forward mask runs on the C kernel where it builds
    auto = NOT_ON_CUDA + cpu_mask_note()
    assert kernels == {f"portable (not 2:4: 3:4 is not a 2:4 pattern (at most 2 kept in every 4); {auto})"}
    odd = nmcompile.explain(nn.Linear(48, 24), torch.randn(8, 48), n=1, m=3, **options).rows
    why = "m=3 is not a power of two (the Triton kernels that write the 2:4 operands need one)"
    assert [r.kernel for r in odd] == [f"portable (not 2:4: {why}; {NOT_ON_CUDA})"]
    decay = nmcompile.explain(MLP(), x, mask_decay="linear", mask_decay_rate=0.2, **options).rows
    reason = "mask decay keeps pruned weights (scaled by alpha), so W is not 2:4"
    assert {r.kernel for r in decay} == {f"portable (not 2:4: {reason}; {auto})"}
    plain = {r.kernel for r in nmcompile.explain(MLP(), x, **options).rows}
    assert plain == {f"portable (not 2:4: not on CUDA (2:4 tensor cores need sm80+); {auto})"}


@pytest.mark.skipif(not SM80, reason="needs a CUDA GPU with 2:4 sparse tensor cores (sm80+)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("rows", "inner", "cols"), [(128, 256, 64), (100, 200, 30), (4096, 1024, 512)])
@pytest.mark.parametrize("variant", ["plain", "linear", "sliced"])
def test_semi_structured_mm_on_cuda(dtype, rows, inner, cols, variant):
    """The compressed GEMM equals a dense GEMM of the same 2:4 operand (ragged shapes padded): plain;
    as the forward calls it (``b = x.t()``, bias, transposed result); and with a strided ``b``."""
    a = forward_operand(_randn(rows, inner + (-inner) % 4, dtype=dtype), 2, 4)
    wide = _randn(cols + 8, a.shape[1] + 8, dtype=dtype, seed=5)
    b = wide[:cols, : a.shape[1]].contiguous().t() if variant == "linear" else wide.t()[: a.shape[1], :cols]
    if variant == "plain":
        b = b.contiguous()
    bias = _randn(rows, seed=6) if variant == "linear" else None
    got = sparse24.semi_structured_mm(a, b, bias=bias, transpose_result=variant == "linear")
    expected = a.float() @ b.float() + (bias[:, None] if bias is not None else 0)
    expected = (expected.t() if variant == "linear" else expected).to(dtype)
    assert got.shape == expected.shape and (variant != "linear" or got.is_contiguous())
    assert_close(got.float(), expected.float(), rel=2e-2 if dtype == torch.bfloat16 else 4e-3)


@pytest.mark.skipif(not SM80, reason="needs a CUDA GPU with 2:4 sparse tensor cores (sm80+)")
def test_searched_alg_gives_the_same_product_on_cuda():
    """The algorithm cuSPARSELt's search picks for a forward-shaped product computes what algorithm 0
    does (the algorithms differ in speed, not in the sums they form: at most by rounding)."""
    a = sparse24.compress(forward_operand(_randn(1024, 512, dtype=torch.bfloat16), 2, 4))
    b = _randn(256, 512, dtype=torch.bfloat16, seed=5).t()
    alg_id = sparse24.search_alg(a, b, transpose_result=True)
    assert alg_id >= 0
    default = sparse24.compressed_mm(a, b, transpose_result=True)
    assert_close(sparse24.compressed_mm(a, b, transpose_result=True, alg_id=alg_id).float(), default.float(), rel=1e-2)


@pytest.mark.skipif(not SM80, reason="needs a CUDA GPU with 2:4 sparse tensor cores (sm80+)")
def test_sparse24_trains_like_portable_on_cuda():
    """bf16 autocast training for 3 steps: ``sparse24`` stays close to the portable path."""
    base = MLP(256, 512, 256).cuda()
    portable = cuda_autocast_losses(base, kernels="portable", grad_prune="mvue24")
    assert cuda_autocast_losses(base, kernels="sparse24", grad_prune="mvue24") == pytest.approx(portable, rel=2e-2)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        x = torch.randn(64, 256, device="cuda")
        rows = nmcompile.explain(base, x, kernels="sparse24", grad_prune="mvue24").rows
    assert {r.kernel for r in rows} == {"sparse24"}
