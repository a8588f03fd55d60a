"""The CPU mask pieces timed alone: the forward weight ``W ⊙ F``, Bi-Mask's backward weight ``W ⊙ B``
and the permutation search, each as Inductor compiles the composite ops (the search: as eager
runs them) and as the C kernels do it, and the greedy row swaps of ``perm_swaps``.

``python -m benchmarks.masks [--rows 2048] [--cols 512] [--threads 1 2] [--swaps 10]``: per thread
count, each piece's median time, its time per million weights and its ratio to Inductor's, then the
kept fraction (SPEC §5) of a Gaussian weight's identity permutation, of the search's and of the
swaps'. The README's mask, search and swap costs are these rows.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from unittest import mock

import torch

from benchmarks.common import SIZES, Row, environment, measure, positive_int, set_ratios, table
from nmcompile import ops, reference
from nmcompile.backend import _register_inductor_decomposition
from nmcompile.kernels import cpu_mask
from nmcompile.options import SparsityConfig
from nmcompile.state import LayerSpec, candidate_generator, nm_forward_mask, permutation_candidates

N, M, CANDIDATES = 2, 4, SparsityConfig().perm_candidates
SEARCH = f"search, {CANDIDATES} candidates"  # a piece whose time grows with the candidates too


def _inductor(fn: Callable) -> Callable:
    """``fn`` compiled by Inductor whole, with the C kernels out of its reach (the composite ops)."""
    _register_inductor_decomposition()
    compiled = torch.compile(fn, fullgraph=True)

    def run(*args: torch.Tensor) -> torch.Tensor:
        with mock.patch.object(cpu_mask, "blocker", lambda *_: "benchmarks.masks: the composite"):
            return compiled(*args)

    return run


def _search(weight: torch.Tensor, perm: torch.Tensor, c_kernel: bool = False) -> Callable[[], tuple[torch.Tensor, int]]:
    """The search step as ``LayerState.begin_training_step`` runs it on the CPU: the candidates
    drawn, the forward mask by the composite op (``c_kernel``: by ``state.nm_forward_mask``, the
    state's own choice, the C kernel for an fp32 weight), the current and candidate permutations scored."""

    spec = LayerSpec("weight", 0, weight.shape[0], "bimask")

    def run() -> tuple[torch.Tensor, int]:
        candidates = permutation_candidates(spec, candidate_generator(0, 0, 0))
        fmask = nm_forward_mask(weight, N, M) if c_kernel else ops.nm_mask(weight, N, M, 1)
        return reference.search_permutation(fmask, perm, candidates, N, M)

    return run


def _swaps(weight: torch.Tensor, perm: torch.Tensor, sweeps: int) -> Callable[[], torch.Tensor]:
    """The ``perm_swaps`` sweeps as ``LayerState.begin_training_step`` runs them after the search,
    from ``perm``; a generator of their own stands in for the search's (the draws cost the same)."""
    fmask = ops.nm_mask(weight, N, M, 1)

    def run() -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return reference.swap_rows(fmask, perm, N, M, sweeps, generator)

    return run


def kept_fractions(weight: torch.Tensor, sweeps: int) -> str:
    """SPEC §5's kept fraction of ``weight`` under the identity, the search's best permutation
    (from the identity) and that after ``sweeps`` swap sweeps: what the search and swaps buy."""
    fmask = reference.nm_mask(weight, N, M, 1)
    identity = torch.arange(weight.shape[0])
    searched, _ = _search(weight, identity)()
    swapped = _swaps(weight, searched, sweeps)()
    kept = fmask.sum().item()
    first, second, third = (reference.permutation_score(fmask, p, N, M) / kept for p in (identity, searched, swapped))
    return f"kept fraction: identity {first:.4f}, search {second:.4f}, search + {sweeps} swap sweeps {third:.4f}"


def mask_rows(rows: int, cols: int, seconds: float, sweeps: int) -> list[Row]:
    """Each piece on one ``[rows, cols]`` fp32 weight at the current thread count."""
    size = dataclasses.replace(SIZES["small"], min_run_time=seconds)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(rows, cols, generator=generator)
    perm = torch.randperm(rows, generator=generator)
    masked = ops.masked_weight(weight, reference.nm_mask(weight, N, M, 1))
    blocked = cpu_mask.blocker(weight, M)
    forward = _inductor(lambda w: ops.masked_weight(w, ops.nm_mask(w, N, M, 1)))
    backward = _inductor(lambda w_f, p: ops.input_grad_weight(w_f, w_f, p, N, M))
    pieces = {
        "W ⊙ F": {
            "inductor": lambda: forward(weight),
            "C kernel": lambda: cpu_mask.nm4_masked_weight(weight, N),
        },
        "W ⊙ B (Bi-Mask)": {
            "inductor": lambda: backward(masked, perm),
            "C kernel": lambda: cpu_mask.nm4_bimask_weight(masked, perm, N),
        },
        SEARCH: {"eager": _search(weight, perm), "C kernel": _search(weight, perm, True)},
        f"{sweeps} swap sweeps": {"eager": _swaps(weight, perm, sweeps)},
    }
    found: list[Row] = []
    for piece, ways in pieces.items():
        group = [Row("gemm", "masks", piece, name) for name in ways]
        for row in group:
            row.reason = blocked if row.name == "C kernel" else None
        measure([(row, ways[row.name]) for row in group if row.reason is None], torch.device("cpu"), size)
        set_ratios(group, ("inductor",))
        found += group
    return found


def per_million(rows: list[Row], weights: int) -> str:
    """Each measured mask row's time per million weights, a line each (the search's and the swaps'
    times grow with candidates and sweeps, not only with the weights)."""
    return "\n".join(
        f"- {row.op}, {row.name}: {row.median_ms * 1e6 / weights:.3f} ms per million weights"
        for row in rows
        if row.median_ms is not None and row.name != "eager" and row.op != SEARCH
    )


def main(argv: list[str] | None = None) -> list[Row]:
    """Print one table per thread count (CPU only: on CUDA the masks are Triton launches)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.masks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=positive_int, default=2048, help="the weight's rows O (default 2048)")
    parser.add_argument("--cols", type=positive_int, default=512, help="the weight's columns K (default 512)")
    parser.add_argument("--threads", type=positive_int, nargs="+", default=[1, 2], help="torch thread counts")
    parser.add_argument("--seconds", type=float, default=1.0, help="timed seconds per row (default 1.0)")
    parser.add_argument("--swaps", type=positive_int, default=10, help="perm_swaps sweeps timed (default 10)")
    args = parser.parse_args(argv)
    if args.rows % M or args.cols % M:
        parser.error(f"argument --rows/--cols: both must be multiples of {M}, got {args.rows} x {args.cols}")
    if not args.seconds > 0:
        parser.error(f"argument --seconds: must be > 0, got {args.seconds}")
    threads = torch.get_num_threads()
    found = []
    try:
        for count in args.threads:
            torch.set_num_threads(count)
            header = environment(torch.device("cpu"), "masks", SIZES["small"], "python -m benchmarks.masks")
            print(f"\n## {args.rows} x {args.cols} fp32 weight, {N}:{M}, {count} thread(s)\n")
            print(f"{header['device']}; torch {header['torch']}; load {header['load average at start']}\n")
            rows = mask_rows(args.rows, args.cols, args.seconds, args.swaps)
            print(table(rows, "piece", ("inductor",)))
            print("\n" + per_million(rows, args.rows * args.cols), flush=True)
            found += rows
    finally:
        torch.set_num_threads(threads)
    weight = torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(0))
    print("\n" + kept_fractions(weight, args.swaps))
    return found


if __name__ == "__main__":
    main()
