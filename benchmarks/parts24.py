"""Where the 2:4 path's overhead goes: each piece of its three ops timed alone, at FFN fc1 size.

``python -m benchmarks.parts24``: on CUDA (sm80+), bf16, 8192 tokens x 4096 -> 16384, the median of
``triton.testing.do_bench`` for each masked-operand kernel, each ``dY`` pass (``dY[:, P]`` also by
``index_select``), each compression and each GEMM (cuSPARSELt's fastest algorithm and algorithm 0)
of ``kernels.ops.sparse24_*``, beside the dense GEMMs. Each compression twice: as the ops run it
(``sparse24.compress``: the Triton kernel ``compress24`` where its layout check passed) and by
``torch._cslt_compress``; and each operand written compressed in its kernel's own pass, as the ops
write it where the check passed (where it declined, into PyTorch's sm8x layout, timed only: a
line under the table says so). The ``sparse24`` per-GEMM rows of ``benchmarks.step`` are the sums; this
says which part costs. Two more columns split each median: the GPU time of the piece's kernels
(``torch.profiler``) and the host's time per call when calls are queued back to back. A piece whose
host time exceeds its kernels' is launch-bound (cuSPARSELt plans each call on the host). Only
capturing the ops in CUDA graphs would hide that, and they stay out of graphs for now
(``nmcompile.ops.HOST_READ``). The last rows time the Triton path's passes: ``W ⊙ B`` and MVUE at
2:4, and both masked weights at 2:8 (groups of 8 rank in passes, ``common._keep_by_passes``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import SIZES
from benchmarks.gemm import PRUNE_KEY, PRUNE_STEP, M, N, fc1_operands, sparse24_problems

PARTS = (
    "forward: W ⊙ F (operand kernel)",
    "forward: W ⊙ F written compressed (operand kernel, as the op runs it where checked)",
    "forward: compress W ⊙ F (sparse24.compress)",
    "forward: compress W ⊙ F (torch._cslt_compress)",
    "forward: sparse GEMM, fastest alg",
    "forward: sparse GEMM, alg 0",
    "forward: dense GEMM",
    "input grad: (W[P] ⊙ Bp)ᵀ (operand kernel)",
    "input grad: (W[P] ⊙ Bp)ᵀ written compressed (operand kernel, as the op runs it where checked)",
    "input grad: dY[:, P]ᵀ (gather_t kernel)",
    "input grad: dY[:, P] (index_select, before gather_t)",
    "input grad: compress (sparse24.compress)",
    "input grad: compress (torch._cslt_compress)",
    "input grad: sparse GEMM, fastest alg",
    "input grad: dense GEMM",
    "weight grad: mvue24(dY)ᵀ (MVUE kernel)",
    "weight grad: mvue24(dY)ᵀ written compressed (MVUE kernel, as the op runs it where checked)",
    "weight grad: compress (sparse24.compress)",
    "weight grad: compress (torch._cslt_compress)",
    "weight grad: sparse GEMM, fastest alg",
    "weight grad: dense GEMM",
    "Triton path: W ⊙ B (operand kernel, rows in place)",
    "Triton path: mvue24(dY) (MVUE kernel)",
    "Triton path, 2:8: W ⊙ F (operand kernel)",
    "Triton path, 2:8: W ⊙ B (operand kernel, rows in place)",
)


TUNED = (
    ("operand24", "masked_operand_kernel"),
    ("mvue", "mvue_kernel"),
    ("gather_t", "gather_t_kernel"),
    ("compress24", "compress24_kernel"),
)
"""The autotuned Triton kernels of the 2:4 ops and the Triton path's passes (module, kernel)."""


def chosen_configs() -> list[str]:
    """The config the autotuner chose for each distinct launch of those kernels so far, one line
    each: which row of ``python -m benchmarks.ptx`` (registers, spills, shuffles) a timing belongs to."""
    lines = []
    for module, name in TUNED:
        kernel = getattr(importlib.import_module(f"nmcompile.kernels.{module}"), name)
        for key, config in kernel.cache.items():
            args = ", ".join(f"{k}={v}" for k, v in zip(kernel.keys, key, strict=False))
            lines.append(f"- {name}({args}): {config}")
    return lines


def parts() -> dict[str, Callable[[], object]]:
    """Each piece of the 2:4 ops on fc1's operands (set up once, before timing)."""
    from nmcompile.kernels import sparse24
    from nmcompile.kernels.gather_t import gather_t
    from nmcompile.kernels.mvue import mvue_prune, mvue_prune_compressed
    from nmcompile.kernels.operand24 import (
        backward_operand,
        forward_operand,
        forward_operand_compressed,
        input_grad_operand,
        input_grad_operand_compressed,
    )

    x, w, dy, perm = fc1_operands(SIZES["full"], torch.device("cuda"))
    problems = sparse24_problems(x, w, dy, perm)
    packed = {op: sparse24.compress(operand) for op, (operand, _, _) in problems.items()}
    best = {op: sparse24.fastest_alg(packed[op], b, transpose_result=t) for op, (_, b, t) in problems.items()}

    def compress(op: str) -> Callable[[], object]:
        return lambda: sparse24.compress(problems[op][0])

    def written_compressed(rows: int, cols: int, write: Callable[..., object]) -> Callable[[], object]:
        layout = sparse24.triton_layout(rows, cols, w.dtype, w.device) or ("cusparselt", None)
        return lambda: write(layout[0], numel=layout[1])

    def library_compress(op: str) -> Callable[[], object]:
        return lambda: torch._cslt_compress(problems[op][0].contiguous())

    def mm(op: str, alg_id: int) -> Callable[[], object]:
        _, b, transpose = problems[op]
        return lambda: sparse24.compressed_mm(packed[op], b, transpose_result=transpose, alg_id=alg_id)

    return dict(
        zip(
            PARTS,
            (
                lambda: forward_operand(w, N, M),
                written_compressed(*w.shape, lambda *a, **k: forward_operand_compressed(w, N, M, *a, **k)),
                compress("forward"),
                library_compress("forward"),
                mm("forward", best["forward"]),
                mm("forward", 0),
                lambda: x @ w.t(),
                lambda: input_grad_operand(w, N, M, perm=perm),
                written_compressed(
                    w.shape[1], w.shape[0], lambda *a, **k: input_grad_operand_compressed(w, N, M, *a, perm=perm, **k)
                ),
                lambda: gather_t(dy, perm),
                lambda: dy.index_select(1, perm),
                compress("input grad"),
                library_compress("input grad"),
                mm("input grad", best["input grad"]),
                lambda: dy @ w,
                lambda: mvue_prune(dy, PRUNE_STEP, PRUNE_KEY, "mvue24", transpose=True),
                written_compressed(
                    dy.shape[1],
                    dy.shape[0],
                    lambda *a, **k: mvue_prune_compressed(dy, PRUNE_STEP, PRUNE_KEY, "mvue24", *a, **k),
                ),
                compress("weight grad"),
                library_compress("weight grad"),
                mm("weight grad", best["weight grad"]),
                lambda: dy.t() @ x,
                lambda: backward_operand(w, N, M, perm=perm),
                lambda: mvue_prune(dy, PRUNE_STEP, PRUNE_KEY, "mvue24"),
                lambda: forward_operand(w, 2, 8),
                lambda: backward_operand(w, 2, 8, perm=perm),
            ),
            strict=True,
        )
    )


def device_ms(events: list, calls: int, device_type: DeviceType = DeviceType.CUDA) -> float:
    """Time per call of the profiled ``events`` that ran on ``device_type`` (kernels, copies, memsets)."""
    return sum(e.time_range.elapsed_us() for e in events if e.device_type == device_type) / calls / 1e3


def kernel_ms(fn: Callable[[], object], calls: int = 10) -> float:
    """GPU time of ``fn``'s kernels per call, host time left out."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return device_ms(prof.events(), calls)


def host_ms(fn: Callable[[], object], calls: int = 10) -> float:
    """The host's time per call of ``fn`` with the calls queued back to back (no sync between them)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e3


def _cell(measure: Callable[[Callable[[], object]], float], fn: Callable[[], object]) -> str:
    """``measure(fn)`` as a table cell, or why it failed: one piece's error leaves the others' rows."""
    try:
        return f"{measure(fn):.3f}"
    except Exception as exc:  # a profiler or library error on this machine
        return f"failed: {type(exc).__name__}"


def main() -> None:
    """Print a markdown table of the pieces' median times, kernel times and host times; needs an sm80+ GPU."""
    argparse.ArgumentParser(prog="python -m benchmarks.parts24", description=__doc__.split("\n\n")[0]).parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks.parts24 needs CUDA")
    from triton.testing import do_bench

    print("| part | median ms | GPU kernels ms | host ms per call |\n|---|---|---|---|")

    def median_ms(fn: Callable[[], object]) -> float:
        return do_bench(fn, warmup=25, rep=200, return_mode="median")

    for name, fn in parts().items():
        print(f"| {name} | {_cell(median_ms, fn)} | {_cell(kernel_ms, fn)} | {_cell(host_ms, fn)} |", flush=True)
    from nmcompile.kernels import sparse24

    checked = {f"[{r}, {c}]": found[0] if found else None for (r, c, _, _), found in sparse24._CHECKED.items()}
    print("\nAutotuned configs:\n" + "\n".join(chosen_configs()))
    print("\nLayout check: " + "; ".join(f"{shape}: {layout or 'declined'}" for shape, layout in checked.items()))
    if None in checked.values():
        print(
            "Where it declined the ops compress with torch._cslt_compress, and the 'written compressed' rows "
            "time the kernels writing PyTorch's sm8x cuSPARSELt layout, which this GPU's cuSPARSELt does not read."
        )


if __name__ == "__main__":
    main()
