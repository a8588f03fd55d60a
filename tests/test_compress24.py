"""The 2:4 compression kernel (``kernels.compress24``) against PyTorch's CUTLASS conversion and a
lane-by-lane transcription of PyTorch's tile kernel (``tests/_tile24``), under the interpreter; its
use in ``sparse24.compress``; and on CUDA against ``torch._cslt_compress``."""

from __future__ import annotations

import functools
import types
import warnings

import pytest
import torch
import triton
from _tile24 import codes, sm90_kernel_meta, tile_kernel_meta
from conftest import interpreted
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_from_dense_cutlass,
    sparse_semi_structured_to_dense_cutlass,
)

from nmcompile.kernels import sparse24
from nmcompile.kernels.compress24 import TILES, compress24, compress24_kernel, compressed_numel

DTYPES = (torch.float16, torch.bfloat16)


def exact_24(rows: int, cols: int, dtype: torch.dtype, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    """Two nonzeros in every aligned group of four along the rows, at random places."""
    return sparse24.random_24(rows, cols, dtype, device, seed)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float32])
def test_random_24_has_two_nonzeros_per_group_of_both_signs(dtype):
    """The layout check's probe: exactly two nonzeros in every aligned group of four, magnitudes in
    [0.5, 1.5], about as many negative as positive, all six placements, reproducible by seed."""
    a = sparse24.random_24(256, 512, dtype, "cpu", seed=4)
    assert a.dtype == dtype and a.shape == (256, 512)
    kept = (a != 0).view(256, 128, 4)
    assert bool((kept.sum(-1) == 2).all())
    magnitudes = a[a != 0].abs().float()
    assert 0.5 <= magnitudes.min() and magnitudes.max() <= 1.5
    assert 0.45 < (a[a != 0] < 0).float().mean() < 0.55
    assert len(torch.unique(kept.view(-1, 4), dim=0)) == 6
    assert torch.equal(a, sparse24.random_24(256, 512, dtype, "cpu", seed=4))
    assert not torch.equal(a, sparse24.random_24(256, 512, dtype, "cpu", seed=5))


def any_zeros(rows: int, cols: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Each entry zero with probability 1/2: groups with 0 to 4 nonzeros, which the encoding also covers."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, cols, generator=generator)
    return torch.where(torch.rand(rows, cols, generator=generator) < 0.5, values, 0).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(32, 64), (64, 192), (96, 128)])
@pytest.mark.parametrize("make", [exact_24, any_zeros])
@interpreted
def test_cutlass_layout_is_torchs_conversion(dtype, shape, make):
    """Values and metadata bit for bit as ``sparse_semi_structured_from_dense_cutlass``, what
    ``torch._sparse_semi_structured_mm`` reads."""
    a = make(*shape, dtype)
    values, meta = compress24(a, "cutlass")
    ref_values, ref_meta = sparse_semi_structured_from_dense_cutlass(a)
    assert values.shape == ref_values.shape and meta.shape == ref_meta.shape and meta.dtype == torch.int16
    assert torch.equal(values.view(torch.int16), ref_values.view(torch.int16))
    assert torch.equal(meta, ref_meta)
    if make is exact_24:
        assert torch.equal(sparse_semi_structured_to_dense_cutlass(values, meta), a)


@pytest.mark.parametrize("shape", [(32, 64), (64, 128), (96, 192)])
def test_transcribed_tile_kernel_writes_torchs_cutlass_layout(shape):
    """The oracle's check: the transcribed tile kernel, with ``MetadataCutlass``, writes the metadata
    PyTorch's own CUTLASS conversion computes, so its shuffles and stores are read right."""
    a = exact_24(*shape, torch.float16, seed=1)
    ref_meta = sparse_semi_structured_from_dense_cutlass(a)[1]
    assert torch.equal(tile_kernel_meta(codes(a), "cutlass"), ref_meta.view(-1).long() & 0xFFFF)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(128, 128), (256, 384), (384, 256)])
@interpreted
def test_cusparselt_layout_is_pytorchs_tile_kernel_layout(dtype, shape):
    """One buffer: the values as CUTLASS's, then the metadata where PyTorch's tile kernel puts it for
    cuSPARSELt (``MetadataCuSparseLt``), then zeros up to ``numel``."""
    rows, cols = shape
    a = exact_24(rows, cols, dtype, seed=rows + cols)
    need = compressed_numel(rows, cols)
    buffer, meta = compress24(a, "cusparselt", numel=need + 40)
    assert meta is None and buffer.shape == (rows, -(-(need + 40) // rows)) and buffer.dtype == dtype
    buffer = buffer.view(-1)
    values = buffer[: rows * cols // 2].view(rows, cols // 2)
    assert torch.equal(values, sparse_semi_structured_from_dense_cutlass(a)[0])
    words = buffer[rows * cols // 2 : need].view(torch.int16).long() & 0xFFFF
    assert torch.equal(words, tile_kernel_meta(codes(a), "cusparselt"))
    assert not buffer[need:].view(torch.int16).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(128, 128), (256, 384), (384, 256)])
@interpreted
def test_cusparselt_sm90_layout_is_torchaos_sm90_kernel_layout(dtype, shape):
    """cuSPARSELt's sm90 layout: the same row-major values, then the metadata where torchao's sm90
    sparsify kernel puts it (transcribed lane by lane, ``tests/_tile24.py``), then zeros."""
    rows, cols = shape
    a = exact_24(rows, cols, dtype, seed=rows + cols + 1)
    need = compressed_numel(rows, cols)
    buffer = compress24(a, "cusparselt_sm90", numel=need + 40)[0].view(-1)
    values = buffer[: rows * cols // 2].view(rows, cols // 2)
    assert torch.equal(values, sparse_semi_structured_from_dense_cutlass(a)[0])
    words = buffer[rows * cols // 2 : need].view(torch.int16).long() & 0xFFFF
    assert torch.equal(words, sm90_kernel_meta(codes(a)))
    assert not torch.equal(words, tile_kernel_meta(codes(a), "cusparselt"))
    assert not buffer[need:].view(torch.int16).any()


@pytest.mark.parametrize("tile", TILES, ids=lambda t: f"{t['BLOCK_R']}x{t['BLOCK_C']}")
@interpreted
def test_every_gpu_tile_writes_the_layouts(tile, monkeypatch):
    """The interpreter's one 16 x 32 tile divides every shape the launcher takes, so the stores of
    lanes past ``R`` or ``C`` never ran in the tests above. Each GPU tile, run as the only config:
    CUTLASS's layout for 32 x 192, cuSPARSELt's and its sm90 layout for 128 x 128, bit for bit, and
    nothing written past them (a store without its bound crashed the interpreter)."""
    monkeypatch.setattr(compress24_kernel, "configs", [triton.Config(tile)])
    a = any_zeros(32, 192, torch.float16)
    values, meta = compress24(a, "cutlass")
    ref_values, ref_meta = sparse_semi_structured_from_dense_cutlass(a)
    assert torch.equal(values.view(torch.int16), ref_values.view(torch.int16)) and torch.equal(meta, ref_meta)
    b = exact_24(128, 128, torch.float16, seed=3)
    need = compressed_numel(128, 128)
    oracles = {"cusparselt": lambda c: tile_kernel_meta(c, "cusparselt"), "cusparselt_sm90": sm90_kernel_meta}
    for layout, oracle in oracles.items():
        buffer = compress24(b, layout, numel=need + 40)[0].view(-1)
        assert torch.equal(buffer[: 128 * 64].view(128, 64), sparse_semi_structured_from_dense_cutlass(b)[0])
        assert torch.equal(buffer[128 * 64 : need].view(torch.int16).long() & 0xFFFF, oracle(codes(b)))
        assert not buffer[need:].view(torch.int16).any()


def test_sm90_transcription_places_every_code_once_in_its_16x32_tile():
    """The sm90 oracle's own check: each group's code lands in exactly one nibble, and the 32 words
    of each 16-row, 32-column tile hold exactly that tile's codes (as torchao's indexing says:
    256 bytes per 64 rows of a 32-column strip, 64 per 16 rows)."""
    rows, cols = 128, 128
    positions = _nibble_positions(rows, cols, "cusparselt_sm90").view(rows, cols // 4)
    assert torch.equal(positions.view(-1).sort().values, torch.arange(rows * cols // 4))
    r, strip = torch.arange(rows)[:, None], (torch.arange(cols // 4) // 8)[None, :]
    tile = (r // 64) * (cols // 32) * 4 + strip * 4 + (r % 64) // 16  # 128 nibbles (32 words) each
    assert torch.equal(positions // 128, tile)


@interpreted
def test_wide_offsets_give_the_same_buffers(monkeypatch):
    """With ``INDEX_LIMIT`` at 0 the kernels compute every offset in int64 (``WIDE``, for operands past
    2³¹ entries): every layout bit for bit as with int32 offsets, a strided operand and the MVUE
    and masked-operand kernels' compressed outputs included."""
    from nmcompile.kernels import common
    from nmcompile.kernels.mvue import mvue_prune_compressed
    from nmcompile.kernels.operand24 import forward_operand_compressed, input_grad_operand_compressed

    a = exact_24(128, 256, torch.bfloat16, seed=6)
    strided = exact_24(128, 512, torch.bfloat16, seed=7)[:, ::2]
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(8))

    def run() -> list[torch.Tensor]:
        return [
            *compress24(a, "cutlass"),
            compress24(a, "cusparselt")[0],
            compress24(a, "cusparselt_sm90")[0],
            *compress24(strided, "cutlass"),
            mvue_prune_compressed(a.t(), 2, 3, "mvue24", "cusparselt")[0],
            mvue_prune_compressed(a.t(), 2, 3, "mvue24", "cusparselt_sm90")[0],
            forward_operand_compressed(strided, 2, 4, "cusparselt_sm90")[0],
            input_grad_operand_compressed(a, 2, 4, "cusparselt", perm=perm)[0],
        ]

    narrow = run()
    monkeypatch.setattr(common, "INDEX_LIMIT", 0)
    for got, expected in zip(run(), narrow, strict=True):
        assert torch.equal(got.view(torch.int16), expected.view(torch.int16))


@pytest.mark.parametrize("rule", ["mvue24", "mvue24_approx"])
@pytest.mark.parametrize(
    ("layout", "T", "O", "dtype"),
    [
        ("cusparselt", 128, 128, torch.bfloat16),
        ("cusparselt_sm90", 256, 128, torch.float16),
        ("cutlass", 64, 96, torch.float16),
        ("cutlass", 128, 32, torch.bfloat16),
    ],
)
@interpreted
def test_mvue_written_compressed_is_the_compressed_mvue(rule, layout, T, O, dtype):
    """``mvue_prune_compressed``: the MVUE kernel's compressed ``prune(dY)ᵀ`` is ``compress24`` of its
    dense ``prune(dY)ᵀ`` bit for bit (same stream), for a row-major and a column-major ``dY``."""
    from nmcompile.kernels.mvue import mvue_prune, mvue_prune_compressed

    generator = torch.Generator().manual_seed(T + O)
    for dy in (torch.randn(T, O, generator=generator).to(dtype), torch.randn(O, T, generator=generator).to(dtype).t()):
        expected = compress24(mvue_prune(dy, 5, 13, rule, transpose=True), layout, numel=compressed_numel(O, T) + 4)
        got = mvue_prune_compressed(dy, 5, 13, rule, layout, numel=compressed_numel(O, T) + 4)
        for a, b in zip(got, expected, strict=True):
            assert (a is None and b is None) or torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("layout", ["cutlass", "cusparselt", "cusparselt_sm90"])
@pytest.mark.parametrize(("O", "K"), [(128, 256), (256, 128)])
@interpreted
def test_masked_operands_written_compressed_are_the_compressed_operands(layout, O, K):
    """``forward_operand_compressed`` and ``input_grad_operand_compressed``: the masked-operand
    kernel's compressed ``W ⊙ F`` and ``(W[P] ⊙ Bp)ᵀ`` (or ``(W ⊙ mask)ᵀ``, transposable) are
    ``compress24`` of the dense operands bit for bit, also from a loaded mask and in a cast dtype.
    The dense operands are the reference's (the dense kernel gives them bit for bit:
    ``test_kernels``), which costs the interpreter a third less."""
    from nmcompile import reference
    from nmcompile.kernels.operand24 import forward_operand_compressed, input_grad_operand_compressed

    generator = torch.Generator().manual_seed(O + K)
    w = torch.randn(O, K, generator=generator).bfloat16()
    perm, mask = torch.randperm(O, generator=generator), reference.nm_mask(w.float(), 2, 4, 1)
    transposable = reference.transposable_mask(w.float(), 2, 4)
    bimask = reference.backward_mask(w, mask, perm, 2, 4)
    cases = [
        (torch.where(mask, w, 0), forward_operand_compressed(w, 2, 4, layout)),
        (torch.where(transposable, w, 0), forward_operand_compressed(w, 2, 4, layout, mask=transposable)),
        (
            torch.where(mask, w, 0).half(),
            forward_operand_compressed(w.float(), 2, 4, layout, dtype=torch.float16),
        ),
        (torch.where(bimask, w, 0)[perm].t(), input_grad_operand_compressed(w, 2, 4, layout, perm=perm)),
        (
            torch.where(transposable, w, 0).t(),
            input_grad_operand_compressed(w, 2, 4, layout, mask=transposable),
        ),
    ]
    for dense, got in cases:
        for a, b in zip(got, compress24(dense.contiguous(), layout), strict=True):
            assert (a is None and b is None) or torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_masked_operands_written_compressed_need_a_24_pattern():
    from nmcompile.kernels.operand24 import forward_operand_compressed, input_grad_operand_compressed

    w = torch.randn(128, 128).half()
    with pytest.raises(ValueError, match=r"N:M that is 2:4.*got 3:4"):
        forward_operand_compressed(w, 3, 4, "cutlass")
    with pytest.raises(ValueError, match=r"N:M that is 2:4.*got 4:8"):
        input_grad_operand_compressed(w, 4, 8, "cutlass", perm=torch.arange(128))
    with pytest.raises(ValueError, match="exactly one of perm"):
        input_grad_operand_compressed(w, 2, 4, "cutlass")


def test_mvue_written_compressed_checks():
    from nmcompile.kernels.mvue import mvue_prune_compressed

    dy = torch.randn(64, 32).half()
    with pytest.raises(ValueError, match="blocks of 4 tokens"):
        mvue_prune_compressed(dy, 0, 0, "mvue12", "cutlass")
    with pytest.raises(ValueError, match="must be one of"):
        mvue_prune_compressed(dy.float(), 0, 0, "mvue24", "cutlass")
    with pytest.raises(ValueError, match=r"multiples of \(128, 128\)"):
        mvue_prune_compressed(dy, 0, 0, "mvue24", "cusparselt")
    with pytest.raises(ValueError, match="rule must be one of"):
        mvue_prune_compressed(dy, 0, 0, "topk", "cutlass")


@pytest.mark.parametrize("emulated_24_library", ["cutlass"], indirect=True)
@interpreted
def test_weight_grad_gemm_takes_the_mvue_kernels_compressed_operand(emulated_24_library, monkeypatch):
    """The 2:4 weight gradient ``prune(dY)ᵀ X`` with shapes the layout takes unpadded: the MVUE kernel
    writes the operand compressed (no dense ``prune(dY)ᵀ``, no separate compression) and the product
    is the one the dense operand, compressed, gives; other shapes take that dense way."""
    from nmcompile.kernels import ops as kernel_ops
    from nmcompile.kernels.mvue import mvue_prune

    calls = []
    compressed = kernel_ops.mvue_prune_compressed
    monkeypatch.setattr(
        kernel_ops, "mvue_prune_compressed", lambda *a, **k: calls.append(a[0].shape) or compressed(*a, **k)
    )
    generator = torch.Generator().manual_seed(2)
    for T, O, fused in ((64, 32, True), (48, 32, False)):
        dy, x = torch.randn(T, O, generator=generator).half(), torch.randn(T, 24, generator=generator).half()
        weight = torch.zeros(O, 24).half()  # only its dtype counts with srste_lambda=0
        got = kernel_ops.sparse24_weight_grad(dy, x, weight, None, 2, 4, 0.0, "mvue24", 7, None, torch.tensor(3))
        expected = sparse24.semi_structured_mm(mvue_prune(dy, 3, 7, "mvue24", transpose=True), x)
        assert torch.equal(got, expected)
        assert calls == ([(T, O)] if fused else []), (T, O)
        calls.clear()


def test_launcher_checks_its_operand():
    """Clear errors for what the kernel cannot compress."""
    a = exact_24(128, 128, torch.float16)
    with pytest.raises(ValueError, match="must be one of"):
        compress24(a.float(), "cutlass")
    with pytest.raises(ValueError, match="2-D"):
        compress24(a[0], "cutlass")
    with pytest.raises(ValueError, match="layout must be one of"):
        compress24(a, "csr")
    with pytest.raises(ValueError, match=r"cusparselt compression needs \[R, C\] multiples of \(128, 128\)"):
        compress24(a[:96], "cusparselt")
    with pytest.raises(ValueError, match=r"multiples of \(32, 64\)"):
        compress24(a[:, :96], "cutlass")
    with pytest.raises(ValueError, match="cannot hold"):
        compress24(a, "cusparselt", numel=compressed_numel(128, 128) - 1)


def test_compressed_numel_is_values_and_one_bit_per_entry():
    assert compressed_numel(128, 256) == 128 * 128 + 128 * 256 // 16


def _library_numel(rows: int, cols: int) -> int:
    """The emulated library's buffer size: ``[rows, 9 cols / 16 + 1]``, one column past the metadata."""
    return rows * (cols * 9 // 16 + 1)


def _oracle_meta(code: torch.Tensor, layout: str) -> torch.Tensor:
    """The transcribed kernel's metadata words for ``layout``: PyTorch's tile kernel (``cusparselt``)
    or torchao's sm90 kernel (``cusparselt_sm90``)."""
    return sm90_kernel_meta(code) if layout == "cusparselt_sm90" else tile_kernel_meta(code, "cusparselt")


@functools.cache
def _nibble_positions(rows: int, cols: int, layout: str) -> torch.Tensor:
    """Where the transcribed kernel puts the code of each group (row-major, ``[R C/4]``), as an index
    into the metadata's nibbles (word ``i``, nibble ``k``: ``4 i + k``): found bit by bit, each run
    of the oracle given one bit of every group's number as its code."""
    groups = rows * cols // 4
    ids = torch.arange(groups)
    number = torch.zeros(groups, dtype=torch.long)  # per nibble: the group whose code lands there
    for bit in range(max(groups - 1, 1).bit_length()):
        words = _oracle_meta(((ids >> bit) & 1).view(rows, cols // 4), layout)
        number |= (((words[:, None] >> (4 * torch.arange(4))) & 0xF).view(-1)) << bit
    positions = torch.empty(groups, dtype=torch.long)
    positions[number] = torch.arange(groups)
    return positions


def _tile_layout_compress(a: torch.Tensor, layout: str = "cusparselt") -> torch.Tensor:
    """An emulated ``torch._cslt_compress`` that writes ``layout`` (built from the oracles, not from
    ``compress24``): row-major values, then the metadata, then one spare column."""
    rows, cols = a.shape
    out = a.new_zeros(rows, _library_numel(rows, cols) // rows)
    buffer = out.view(-1)
    buffer[: rows * cols // 2] = sparse_semi_structured_from_dense_cutlass(a)[0].view(-1)
    meta = buffer[rows * cols // 2 : compressed_numel(rows, cols)].view(torch.int16)
    meta.copy_(_oracle_meta(codes(a), layout).to(torch.int16))
    return out


def _tile_layout_mm(
    buffer: torch.Tensor, b: torch.Tensor, bias=None, transpose_result=False, alg_id=0, layout="cusparselt"
):
    """An emulated ``torch._cslt_sparse_mm`` reading ``layout``: ``A`` ``[R, K]`` compressed into
    ``[R, S]``, ``b`` ``[K, N]``."""
    cols = b.shape[0]
    assert buffer.dim() == 2, "compressed_A.dim() == 2"  # cuSPARSELtOps.cpp's TORCH_INTERNAL_ASSERT
    rows = buffer.shape[0]
    buffer = buffer.view(-1)
    values = buffer[: rows * cols // 2].view(rows, cols // 4, 2)
    word = buffer[rows * cols // 2 : compressed_numel(rows, cols)].view(torch.int16).long() & 0xFFFF
    nibbles = ((word[:, None] >> (4 * torch.arange(4))) & 0xF).view(-1)
    code = nibbles[_nibble_positions(rows, cols, layout)].view(rows, cols // 4, 1)
    dense = torch.zeros(rows, cols // 4, 4, dtype=torch.float32)
    dense.scatter_(-1, code & 3, values[..., :1].float())
    dense.scatter_(-1, code >> 2, values[..., 1:].float())
    out = (dense.view(rows, cols) @ b.float() + (0 if bias is None else bias.float()[:, None])).to(b.dtype)
    return out.t().contiguous() if transpose_result else out


@pytest.fixture(params=["cusparselt", "cusparselt_sm90"])
def tile_layout_library(request, monkeypatch):
    """cuSPARSELt emulated with each transcribed kernel's layout (PyTorch's sm8x one, torchao's sm90
    one), every 2:4 device check passing; counts compressions."""
    calls = []

    def compress(a):
        calls.append(tuple(a.shape))
        return _tile_layout_compress(a, request.param)

    monkeypatch.setattr(sparse24, "blocker", lambda device, dtype: None)
    monkeypatch.setattr(sparse24, "_CHECKED", {})
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: True)
    monkeypatch.setattr(torch, "_cslt_compress", compress)
    monkeypatch.setattr(torch, "_cslt_sparse_mm", functools.partial(_tile_layout_mm, layout=request.param))
    monkeypatch.setattr(torch, "_cslt_sparse_mm_search", lambda *args, **kwargs: 0)  # one algorithm
    one_algorithm = types.SimpleNamespace(mm_search=lambda *args: (0, 1, -1, 1))  # alg_id, split-K, mode, count
    monkeypatch.setattr(torch._C, "_cusparselt", one_algorithm, raising=False)  # a CUDA build's real one
    monkeypatch.setattr(sparse24, "_FASTEST", {})
    return request.param, calls


def test_emulated_library_multiplies_what_it_compresses(tile_layout_library):
    """The emulation the next tests rely on: its compress and GEMM agree with a dense product."""
    a, b = exact_24(128, 256, torch.float16), torch.randn(256, 16).half()
    expected = (a.float() @ b.float()).half()
    assert torch.equal(torch._cslt_sparse_mm(torch._cslt_compress(a), b), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@interpreted
def test_layout_check_takes_a_library_with_that_layout(tile_layout_library, dtype, recwarn):
    """Where the library's own compression multiplies as one of ``compress24``'s layouts, the check
    returns that layout and the library's buffer size (the one ``compress24`` then fills), quietly:
    PyTorch's sm8x layout is tried first off sm90, so a library of the sm90 layout costs two tries,
    and the answer says why the first failed."""
    layout, calls = tile_layout_library
    tried = "" if layout == "cusparselt" else "PyTorch's sm8x one: they multiply differently"
    assert sparse24._layout_check(128, 256, dtype, torch.device("cpu")) == ((layout, _library_numel(128, 256)), tried)
    assert calls == [(128, 256)]
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize("emulated_24_library", ["cusparselt"], indirect=True)
@interpreted
def test_layout_check_declines_another_layout_saying_why(emulated_24_library):
    """Against a library with another layout (the row-major emulation), the check says no and why."""
    assert sparse24._layout_check(128, 256, torch.bfloat16, torch.device("cpu")) == (
        None,
        "PyTorch's sm8x one: they multiply differently; torchao's sm90 one: they multiply differently",
    )


@pytest.mark.parametrize("emulated_24_library", ["cusparselt"], indirect=True)
@interpreted
def test_failed_checks_warn_once_per_device(emulated_24_library, monkeypatch):
    """Each shape is checked once; the first that fails on a device warns, naming the shape and why,
    and the next shapes that fail there stay quiet (the same library fails them for the same reason)."""
    monkeypatch.setattr(sparse24, "_CHECKED", {})
    cpu = torch.device("cpu")
    with pytest.warns(RuntimeWarning) as caught:
        for rows, cols in ((128, 256), (256, 128), (128, 256), (384, 128)):
            assert sparse24._check_once(rows, cols, torch.bfloat16, cpu) is None
    assert len(caught) == 1
    assert str(caught[0].message) == (
        "nmcompile: no layout of the Triton 2:4 compression matches torch._cslt_compress for [128, 256] "
        "torch.bfloat16 on cpu (PyTorch's sm8x one: they multiply differently; torchao's sm90 one: they multiply "
        "differently); that shape, and any other that fails this check on cpu (not warned again), is compressed "
        "by torch._cslt_compress (slower)"
    )
    assert sparse24._CHECKED == {(r, c, torch.bfloat16, cpu): None for r, c in ((128, 256), (256, 128), (384, 128))}


def _check_on_any_device(monkeypatch) -> None:
    """``sparse24.checked_layout`` without its CUDA condition: CPU tensors take the check too."""
    monkeypatch.setattr(sparse24, "checked_layout", sparse24._check_once)


@interpreted
def test_compress_writes_the_checked_layout_once_per_shape(tile_layout_library, monkeypatch):
    """``sparse24.compress`` on a shape that passed the check: ``compress24``'s buffer, of the library's
    size; the check runs once per shape; the product is the dense one. Off CUDA nothing is checked."""
    layout, calls = tile_layout_library
    assert sparse24.checked_layout(128, 256, torch.float16, torch.device("cpu")) is None
    assert calls == []
    _check_on_any_device(monkeypatch)
    a, b = exact_24(128, 256, torch.float16, seed=3), torch.randn(256, 24).half()
    for _ in range(2):
        packed = sparse24.compress(a)
        assert packed.meta is None
        assert torch.equal(packed.packed, compress24(a, layout, numel=_library_numel(128, 256))[0])
        assert torch.equal(sparse24.compressed_mm(packed, b), (a.float() @ b.float()).half())
    assert calls == [(128, 256)]  # the check's probe; the operands never went to the library


@interpreted
def test_sparse24_ops_compressed_by_the_kernel_give_the_librarys_results(tile_layout_library, monkeypatch):
    """The three 2:4 ops (Bi-Mask, MVUE 2:4) at shapes of multiples of 128: with every operand
    written compressed by its kernel (the check passed) the forward, input and weight gradients are
    bit for bit those of the same ops with the library compressing, and the library compressed only
    the check's probes."""
    from nmcompile.kernels import ops as kernel_ops

    generator = torch.Generator().manual_seed(11)
    x, w, dy = (torch.randn(*shape, generator=generator).half() for shape in ((128, 256), (128, 256), (128, 128)))
    perm, step = torch.randperm(128, generator=generator), torch.tensor(3)

    def run() -> list[torch.Tensor]:
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = kernel_ops.sparse24_linear(xr, wr, None, None, perm, 2, 4, 0.01, "fc", None, None, step, "mvue24", 9)
        y.backward(dy)
        return [y.detach(), xr.grad, wr.grad]

    _, calls = tile_layout_library
    by_library = run()
    assert len(calls) == 3  # forward, input-gradient and weight-gradient operands
    calls.clear()
    _check_on_any_device(monkeypatch)
    written_compressed = []
    for name in ("forward_operand_compressed", "input_grad_operand_compressed", "mvue_prune_compressed"):
        writer = getattr(kernel_ops, name)
        monkeypatch.setattr(
            kernel_ops, name, lambda *a, _n=name, _w=writer, **k: written_compressed.append(_n) or _w(*a, **k)
        )
    by_kernel = run()
    assert sorted(calls) == [(128, 128), (128, 256), (256, 128)]  # one probe per shape
    assert written_compressed == [
        "forward_operand_compressed",
        "input_grad_operand_compressed",
        "mvue_prune_compressed",
    ]
    for got, expected, what in zip(by_kernel, by_library, ("y", "dx", "dw"), strict=True):
        assert torch.equal(got, expected), what


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(128, 128), (256, 512), (4096, 16384)])
def test_compress24_multiplies_as_the_library_compression_on_cuda(dtype, shape, monkeypatch):
    """On the GPU, with cuSPARSELt: the layout check takes the first of ``compress24``'s cuSPARSELt
    layouts (sm90's first on sm90) whose buffer gives the same product as ``torch._cslt_compress``'s,
    or warns where none does, and ``sparse24.compress`` multiplies as the library's own compression
    either way. The H200's cuSPARSELt (torch 2.11, 2026-12-04) did not read PyTorch's sm8x layout.
    Without cuSPARSELt (sm8x): the CUTLASS pair is PyTorch's conversion and multiplies as it."""
    if sparse24.blocker(torch.device("cuda"), dtype) is not None:
        pytest.skip(sparse24.blocker(torch.device("cuda"), dtype))
    rows, cols = shape
    a = exact_24(rows, cols, dtype, device="cuda")
    b = torch.randn(cols, 256, device="cuda").to(dtype)
    if torch.backends.cusparselt.is_available():
        monkeypatch.setattr(sparse24, "_CHECKED", {})
        theirs = torch._cslt_compress(a)
        expected = torch._cslt_sparse_mm(theirs, b)
        matching = [
            layout
            for layout in sparse24._candidates(a.device)
            if torch.equal(torch._cslt_sparse_mm(compress24(a, layout, numel=theirs.numel())[0], b), expected)
        ]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            found = sparse24.checked_layout(rows, cols, dtype, a.device)
        assert found == ((matching[0], theirs.numel()) if matching else None)
        assert [w.category for w in caught] == ([] if matching else [RuntimeWarning])
        assert torch.equal(sparse24.compressed_mm(sparse24.compress(a), b), expected)
    else:
        values, meta = compress24(a, "cutlass")
        ref_values, ref_meta = sparse_semi_structured_from_dense_cutlass(a)
        assert torch.equal(values, ref_values) and torch.equal(meta, ref_meta)
        assert torch.equal(
            torch._sparse_semi_structured_mm(values, meta, b), torch._sparse_semi_structured_mm(ref_values, ref_meta, b)
        )


def _emulated_dump(shapes, compress) -> dict:
    """A ``cslt_dump`` file's contents with ``compress`` as the library's compression."""
    from benchmarks.cslt_dump import fixed_places

    operands = {}
    for rows, cols in shapes:
        for seed in (0, 1, 2):
            dense = sparse24.random_24(rows, cols, torch.float16, "cpu", seed=seed)
            operands[rows, cols, "float16", seed] = (dense, compress(dense).view(torch.int16))
        fixed = fixed_places(rows, cols, torch.float16)
        operands[rows, cols, "float16", "fixed"] = (fixed, compress(fixed).view(torch.int16))
    return {"torch": torch.__version__, "device": "emulated", "operands": operands}


@interpreted
def test_cslt_layout_finds_the_tile_kernel_layout_where_the_library_writes_it(capsys):
    """``benchmarks.cslt_layout`` on buffers in PyTorch's sm8x layout (the transcribed tile kernel's,
    not ``compress24``'s): every value and word located, values row-major, words at ``compress24``'s places."""
    from benchmarks import cslt_layout

    maps = cslt_layout.report(_emulated_dump([(128, 128), (256, 128)], _tile_layout_compress))
    printed = capsys.readouterr().out
    assert "[128, 128] float16: values matched 8192/8192 (row-major: True); words matched 1024/1024;" in printed
    fixed = "[256, 128] float16, places 1 and 2 kept: 2048 words of that code after the values (2048 expected)"
    assert f"{fixed}, at offsets 0 to 2047 past them" in printed
    assert printed.count("the buffers are compress24's in cusparselt\n") == 2
    positions = _nibble_positions(256, 128, "cusparselt")[::4] // 4  # buffer place of each row-major word
    assert torch.equal(maps[256, 128, "float16"]["meta"][positions], torch.arange(256 * 128 // 16))


@interpreted
def test_cslt_layout_recovers_another_layout(capsys):
    """On a library that puts the metadata words in another order (a fixed random permutation of
    the sm8x places), the maps give that order, and the report says no layout of ours writes it."""
    from benchmarks import cslt_layout

    rows, cols = 128, 256
    half, words = rows * cols // 2, rows * cols // 16
    order = torch.randperm(words, generator=torch.Generator().manual_seed(4))

    def shuffled(dense: torch.Tensor) -> torch.Tensor:
        flat = _tile_layout_compress(dense).view(-1).clone()
        flat[half : half + words] = flat[half : half + words][order]
        return flat.view(rows, -1)

    found = cslt_layout.report(_emulated_dump([(rows, cols)], shuffled))[rows, cols, "float16"]
    dense = [sparse24.random_24(rows, cols, torch.float16, "cpu", seed=s) for s in (0, 1, 2)]
    tile = cslt_layout.layout_map(dense, [_tile_layout_compress(d) for d in dense])["meta"]
    assert torch.equal(found["meta"], tile[order]) and (found["meta"] >= 0).all()
    assert torch.equal(found["values"], torch.arange(half))
    assert "the buffers are compress24's in no layout" in capsys.readouterr().out


@interpreted
def test_cslt_layout_recognises_the_sm90_layout(capsys):
    """On buffers in torchao's sm90 layout (the transcribed kernel's): the values are located, the
    words are not (each mixes codes of two rows), and the report names ``compress24``'s sm90 layout."""
    from benchmarks import cslt_layout

    found = cslt_layout.report(
        _emulated_dump([(128, 128)], functools.partial(_tile_layout_compress, layout="cusparselt_sm90"))
    )[128, 128, "float16"]
    assert torch.equal(found["values"], torch.arange(128 * 64))
    assert "the buffers are compress24's in cusparselt_sm90\n" in capsys.readouterr().out
