"""Where the 2:4 path's overhead goes: each piece of its three ops timed alone, at FFN fc1 size.

``python -m benchmarks.parts24``: on CUDA (sm80+), bf16, 8192 tokens x 4096 -> 16384, the median of
``triton.testing.do_bench`` for each masked-operand kernel, each ``dY`` pass, each compression and
each GEMM (cuSPARSELt's fastest algorithm and algorithm 0) of ``kernels.ops.sparse24_*``, beside the
dense GEMMs. The ``sparse24`` per-GEMM rows of ``benchmarks.step`` are the sums; this says which part costs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from benchmarks.common import SIZES
from benchmarks.gemm import PRUNE_KEY, PRUNE_STEP, M, N, fc1_operands, sparse24_problems

PARTS = (
    "forward: W ⊙ F (operand kernel)",
    "forward: compress W ⊙ F",
    "forward: sparse GEMM, fastest alg",
    "forward: sparse GEMM, alg 0",
    "forward: dense GEMM",
    "input grad: (W[P] ⊙ Bp)ᵀ (operand kernel)",
    "input grad: dY[:, P] (index_select)",
    "input grad: compress",
    "input grad: sparse GEMM, fastest alg",
    "input grad: dense GEMM",
    "weight grad: mvue24(dY)ᵀ (MVUE kernel)",
    "weight grad: compress",
    "weight grad: sparse GEMM, fastest alg",
    "weight grad: dense GEMM",
    "Triton path: W ⊙ B (operand kernel, rows in place)",
    "Triton path: mvue24(dY) (MVUE kernel)",
)


def parts() -> dict[str, Callable[[], object]]:
    """Each piece of the 2:4 ops on fc1's operands (set up once, before timing)."""
    from nmcompile.kernels import sparse24
    from nmcompile.kernels.mvue import mvue_prune
    from nmcompile.kernels.operand24 import backward_operand, forward_operand, input_grad_operand

    x, w, dy, perm = fc1_operands(SIZES["full"], torch.device("cuda"))
    problems = sparse24_problems(x, w, dy, perm)
    packed = {op: sparse24.compress(operand) for op, (operand, _, _) in problems.items()}
    best = {op: sparse24.fastest_alg(packed[op], b, transpose_result=t) for op, (_, b, t) in problems.items()}

    def compress(op: str) -> Callable[[], object]:
        return lambda: sparse24.compress(problems[op][0])

    def mm(op: str, alg_id: int) -> Callable[[], object]:
        _, b, transpose = problems[op]
        return lambda: sparse24.compressed_mm(packed[op], b, transpose_result=transpose, alg_id=alg_id)

    return dict(
        zip(
            PARTS,
            (
                lambda: forward_operand(w, N, M),
                compress("forward"),
                mm("forward", best["forward"]),
                mm("forward", 0),
                lambda: x @ w.t(),
                lambda: input_grad_operand(w, N, M, perm=perm),
                lambda: dy.index_select(1, perm),
                compress("input grad"),
                mm("input grad", best["input grad"]),
                lambda: dy @ w,
                lambda: mvue_prune(dy, PRUNE_STEP, PRUNE_KEY, "mvue24", transpose=True),
                compress("weight grad"),
                mm("weight grad", best["weight grad"]),
                lambda: dy.t() @ x,
                lambda: backward_operand(w, N, M, perm=perm),
                lambda: mvue_prune(dy, PRUNE_STEP, PRUNE_KEY, "mvue24"),
            ),
            strict=True,
        )
    )


def main() -> None:
    """Print a markdown table of the pieces' median times; needs an sm80+ GPU."""
    if not torch.cuda.is_available():
        sys.exit("benchmarks.parts24 needs CUDA")
    from triton.testing import do_bench

    print("| part | median ms |\n|---|---|")
    for name, fn in parts().items():
        print(f"| {name} | {do_bench(fn, warmup=25, rep=200, return_mode='median'):.3f} |", flush=True)


if __name__ == "__main__":
    main()
