"""Per-GEMM timings of the FFN's first Linear (``T x d -> d_ff``): forward, input gradient, weight gradient."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

import torch

import nmcompile  # noqa: F401  (registers torch.ops.nmsparse)
from benchmarks.common import Row, Size, failure, measure, set_ratios, unavailable
from nmcompile import reference

N, M = 2, 4
SRSTE_LAMBDA = 2e-4
PRUNE_STEP, PRUNE_KEY = 1, 7  # the MVUE stream (step, key) of both 2:4 weight-gradient rows
OPS = ("forward", "input grad", "weight grad")
GEMM_ROWS = (
    "dense",
    "reference",
    "portable",
    "triton",
    "triton fused",
    "sparse24",
    "sparse24 gemm",
    "sparse24 gemm, best alg",
)
GPU_ROWS = GEMM_ROWS[3:]  # new kernels on a GPU: a failure is reported, not fatal

Gemms = dict[str, Callable[[], torch.Tensor]]

# Every sparse row derives the masks its GEMM needs from W inside the timed call (F for all three, Bi-Mask's
# B for the input gradient), as the Triton kernels do from their arguments. A training step computes F
# once, so the three rows of one implementation count it three times.


def _dense(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor, perm: torch.Tensor) -> Gemms:
    """The three dense GEMMs of ``Y = X Wᵀ``: the baseline."""
    return {"forward": lambda: x @ w.t(), "input grad": lambda: dy @ w, "weight grad": lambda: dy.t() @ x}


def _reference(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor, perm: torch.Tensor) -> Gemms:
    """The GEMMs as ``nmcompile.reference`` runs them: SPEC masks (float64 sort), ``W⊙mask``, dense GEMM."""

    def forward() -> torch.Tensor:
        return x @ torch.where(reference.nm_mask(w, N, M, dim=1), w, 0).t()

    def input_grad() -> torch.Tensor:
        bmask = reference.backward_mask(w, reference.nm_mask(w, N, M, dim=1), perm, N, M)
        return dy @ torch.where(bmask, w, 0)

    def weight_grad() -> torch.Tensor:
        return dy.t() @ x + SRSTE_LAMBDA * torch.where(reference.nm_mask(w, N, M, dim=1), 0, w)

    return {"forward": forward, "input grad": input_grad, "weight grad": weight_grad}


def _portable(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor, perm: torch.Tensor) -> Gemms:
    """The GEMMs as the portable backend's graphs compute them (``W ⊙ F`` from the C mask kernel where
    ``lower_kernels`` uses it, else from ``nmcompile.ops``' composite mask, and the backward's helpers
    on it, which pick the C Bi-Mask kernel by the same rule), each ``torch.compile``d as the backend's are."""
    from nmcompile.kernels import cpu_mask
    from nmcompile.ops import input_grad_weight, masked_weight, nm_mask, srste_term

    c_kernel = cpu_mask.blocker(w, M) is None

    def masked() -> torch.Tensor:
        return torch.ops.nmsparse.cpu_masked_weight(w, N) if c_kernel else masked_weight(w, nm_mask(w, N, M, 1))

    def forward() -> torch.Tensor:
        return x @ masked().t()

    def input_grad() -> torch.Tensor:
        return dy @ input_grad_weight(w, masked(), perm, N, M)

    def weight_grad() -> torch.Tensor:
        return dy.t() @ x + SRSTE_LAMBDA * srste_term(w, masked())

    return {
        "forward": torch.compile(forward),
        "input grad": torch.compile(input_grad),
        "weight grad": torch.compile(weight_grad),
    }


def _triton(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor, perm: torch.Tensor) -> Gemms:
    """The Triton path's ops as a lowered layer calls them: from ``SPLIT_TOKENS`` tokens on, the masked
    operand (or pruned ``dY``) from one Triton pass and a dense cuBLAS GEMM, below it the fused kernels."""
    from nmcompile.kernels.ops import triton_input_grad, triton_weight_grad

    forward = torch.ops.nmsparse.triton_linear.nograd  # what the compiled forward graph calls
    return {
        "forward": lambda: forward(x, w, None, None, None, N, M, 0.0, "fc1"),
        "input grad": lambda: triton_input_grad(dy, w, None, perm, N, M),
        "weight grad": lambda: triton_weight_grad(dy, x, w, None, N, M, SRSTE_LAMBDA, "none", 0),
    }


def _triton_fused(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor, perm: torch.Tensor) -> Gemms:
    """The fused Triton kernels of ``nmcompile.kernels`` (masks ranked inside each GEMM tile), imported
    here: a failing import costs only these rows."""
    from nmcompile.kernels import sparse_input_grad, sparse_linear_forward, sparse_weight_grad

    return {
        "forward": lambda: sparse_linear_forward(x, w, None, N, M),
        "input grad": lambda: sparse_input_grad(dy, w, N, M, perm=perm),
        "weight grad": lambda: sparse_weight_grad(dy, x, w, N, M, srste_lambda=SRSTE_LAMBDA),
    }


def _sparse24(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor, perm: torch.Tensor) -> Gemms:
    """The 2:4 path's ops: masked operand written by a Triton kernel, compressed, sparse-tensor-core GEMM;
    the weight gradient with MVUE 2:4 pruning of ``dY`` (the one sparse operand it has)."""
    from nmcompile.kernels.ops import sparse24_input_grad, sparse24_weight_grad

    step = torch.tensor(PRUNE_STEP)
    forward = torch.ops.nmsparse.sparse24_linear.nograd  # what the compiled forward graph calls

    def weight_grad() -> torch.Tensor:
        return sparse24_weight_grad(dy, x, w, None, N, M, SRSTE_LAMBDA, "mvue24", PRUNE_KEY, None, step)

    return {
        "forward": lambda: forward(x, w, None, None, None, N, M, 0.0, "fc1"),
        "input grad": lambda: sparse24_input_grad(dy, w, None, perm, N, M),
        "weight grad": weight_grad,
    }


def sparse24_problems(
    x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor, perm: torch.Tensor
) -> dict[str, tuple[torch.Tensor, torch.Tensor, bool]]:
    """Per GEMM, what the ``sparse24`` ops hand the 2:4 library: the sparse operand as written (before
    compression), the dense operand and ``transpose_result``."""
    from nmcompile.kernels.gather_t import gather_t
    from nmcompile.kernels.mvue import mvue_prune
    from nmcompile.kernels.operand24 import forward_operand, input_grad_operand

    return {
        "forward": (forward_operand(w, N, M), x.t(), True),
        "input grad": (input_grad_operand(w, N, M, perm=perm), gather_t(dy, perm), True),
        "weight grad": (mvue_prune(dy, PRUNE_STEP, PRUNE_KEY, "mvue24", transpose=True), x, False),
    }


def _sparse24_gemm(
    x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor, perm: torch.Tensor, search: bool = False
) -> Gemms:
    """The 2:4 GEMMs alone: the ``sparse24`` rows' operands written, permuted and compressed before
    timing, so that row minus this one is their mask, permutation, MVUE and compression overhead.
    With ``search``, each GEMM runs the cuSPARSELt algorithm ``search_alg`` times fastest for it
    (what the ``sparse24`` ops run, ``fastest_alg``), instead of algorithm 0."""
    from nmcompile.kernels import sparse24

    gemms: Gemms = {}
    for op, (operand, b, transpose) in sparse24_problems(x, w, dy, perm).items():
        a = sparse24.compress(operand)
        alg_id = sparse24.search_alg(a, b, transpose_result=transpose) if search else 0
        if search:
            print(f"[benchmarks] ffn.fc1 {op} sparse24 gemm: alg_id {alg_id} measured fastest", file=sys.stderr)
        gemms[op] = functools.partial(sparse24.compressed_mm, a, b, transpose_result=transpose, alg_id=alg_id)
    return gemms


IMPLEMENTATIONS = {
    "dense": _dense,
    "reference": _reference,
    "portable": _portable,
    "triton": _triton,
    "triton fused": _triton_fused,
    "sparse24": _sparse24,
    "sparse24 gemm": _sparse24_gemm,
    "sparse24 gemm, best alg": functools.partial(_sparse24_gemm, search=True),
}


def fc1_operands(size: Size, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` ``[T, d]``, ``w`` ``[d_ff, d]``, ``dy`` ``[T, d_ff]`` and a permutation of the ``d_ff``
    rows: fc1's operands, the same for a given size in every GEMM benchmark."""
    generator = torch.Generator().manual_seed(2)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * scale).to(device, size.dtype)

    x, dy = randn(size.tokens, size.d_model), randn(size.tokens, size.d_ff)
    w = randn(size.d_ff, size.d_model, scale=size.d_model**-0.5)
    return x, w, dy, torch.randperm(size.d_ff, generator=generator).to(device)


def gemm_rows(size: Size, device: torch.device) -> list[Row]:
    """Time forward, input gradient and weight gradient of ``fc1`` for every implementation."""
    x, w, dy, perm = fc1_operands(size, device)
    gemms: dict[str, Gemms] = {}
    reasons: dict[str, str] = {}
    for name, make in IMPLEMENTATIONS.items():
        why = unavailable(name, device, size.dtype)
        if why is None:
            try:
                gemms[name] = make(x, w, dy, perm)
                continue
            except ImportError as exc:
                why = f"not available: {exc}"
            except Exception as exc:  # a GPU row's set-up (operands written, compressed) fails alone
                if name not in GPU_ROWS:
                    raise
                why = failure(exc)
        reasons[name] = why
    rows: list[Row] = []
    with torch.no_grad():
        for op in OPS:
            group = [Row("gemm", "ffn.fc1", op, name, reason=reasons.get(name)) for name in GEMM_ROWS]
            jobs = [(row, gemms[row.name][op]) for row in group if row.name in gemms]
            measure(jobs, device, size, guarded=GPU_ROWS)
            set_ratios(group, ("dense", "reference"))
            rows += group
    return rows
