"""Fused Triton GEMMs against masked operand + dense GEMM, over token counts: what sets ``SPLIT_TOKENS``.

``python -m benchmarks.split --tokens 256 1024 4096``: FFN fc1 of the ``full`` size (d_model 4096 ->
d_ff 16384, bf16) on CUDA; per token count and GEMM, the dense GEMM, the fused kernel and the split
op (``kernels.ops`` with ``SPLIT_TOKENS`` at 0), and each one's ratio to dense. GPU only.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from unittest import mock

import torch

from benchmarks.common import SIZES, Row, measure, positive_int, set_ratios, table
from benchmarks.gemm import OPS, _dense, _triton, _triton_fused, fc1_operands

ROWS = ("dense", "fused", "split")


def split_rows(tokens: int, device: torch.device) -> list[Row]:
    """The three GEMMs of fc1 at ``tokens`` tokens, dense, fused and split."""
    size = dataclasses.replace(SIZES["full"], tokens=tokens, rounds=3, min_run_time=0.6)
    x, w, dy, perm = fc1_operands(size, device)
    gemms = {"dense": _dense(x, w, dy, perm), "fused": _triton_fused(x, w, dy, perm), "split": _triton(x, w, dy, perm)}
    rows: list[Row] = []
    with torch.no_grad(), mock.patch("nmcompile.kernels.ops.SPLIT_TOKENS", 0):
        for op in OPS:
            group = [Row("gemm", f"{tokens} tokens", op, name) for name in ROWS]
            measure([(row, gemms[row.name][op]) for row in group], device, size, guarded=ROWS[1:])
            set_ratios(group, ("dense",))
            rows += group
    return rows


def main(argv: list[str] | None = None) -> list[Row]:
    """Print one table per token count; needs CUDA."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.split", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=positive_int, nargs="+", default=[256, 1024, 4096])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks.split needs CUDA (the fused kernels run on the CPU only under the interpreter)")
    rows = []
    for tokens in args.tokens:
        found = split_rows(tokens, torch.device("cuda"))
        print(f"\n## FFN fc1 at {tokens} tokens\n\n{table(found, 'GEMM', ('dense',))}", flush=True)
        rows += found
    return rows


if __name__ == "__main__":
    main()
