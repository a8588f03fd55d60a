"""Training-step benchmark of dense, reference and nmsparse runs of an FFN and a ResNet block (docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn
from torch._inductor import list_mode_options

import nmcompile
from benchmarks.common import SIZES, Row, Size, check_writable, environment, measure, set_ratios, table, unavailable
from benchmarks.gemm import gemm_rows
from nmcompile import reference
from nmcompile.backend import NMSparseBackend
from nmcompile.options import SparsityConfig

SEARCH_ROW = "nmsparse portable, search every step"  # minus "nmsparse portable": one permutation search
MVUE_ROW = "nmsparse portable, mvue24"  # minus "nmsparse portable": the MVUE pruning of dY
STEP_ROWS = (
    "dense eager",
    "dense inductor",
    "reference eager",
    "nmsparse portable",
    "nmsparse portable, composite mask",
    SEARCH_ROW,
    MVUE_ROW,
    "nmsparse triton",
    "nmsparse sparse24",
)
GUARDED_ROWS = ("nmsparse triton", "nmsparse sparse24")  # GPU-only, new kernels: a failure is reported, not fatal
EAGER_ROWS = ("dense eager", "reference eager")
BLOCKS = ("ffn", "resnet")


class FFNBlock(nn.Module):
    """Transformer FFN block on ``[tokens, d_model]``: ``x + fc2(gelu(fc1(norm(x))))``."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class BasicBlock(nn.Module):
    """ResNet basic block on NCHW: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + x)``, 3x3 convs without bias."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + x)


def make_block(block: str, size: Size) -> tuple[nn.Module, tuple[int, ...]]:
    """The initial block of that name and its input shape (the output has the same shape)."""
    if block == "ffn":
        return FFNBlock(size.d_model, size.d_ff), (size.tokens, size.d_model)
    return BasicBlock(size.channels), (size.batch, size.channels, size.spatial, size.spatial)


def _prepare(
    name: str, model: nn.Module, device: torch.device, dtype: torch.dtype, mode: str = "default"
) -> Callable[[torch.Tensor], torch.Tensor] | str:
    """What runs ``model``'s forward for the row ``name`` (``model`` is the row's own copy), or why it
    cannot run; compiled rows use ``torch.compile``'s ``mode``, and other modes leave the eager rows out."""
    if name in EAGER_ROWS and mode != "default":
        return f"eager, so not run with --mode {mode}"
    if name == "dense eager":
        return model
    compile_mode = {} if mode == "default" else {"mode": mode}
    if name == "dense inductor":
        return torch.compile(model, **compile_mode)
    if name == "reference eager":
        return reference.sparsify(model, n=2, m=4)
    if name == "nmsparse portable, composite mask":
        if device.type != "cpu":
            return "CPU only (the C mask kernels this row turns off run on the CPU)"
        # A backend object of its own: nmcompile.backend(...) gives the portable row's, whose graphs
        # (with the C kernels) dynamo would reuse for this row's model of the same class.
        own = NMSparseBackend(SparsityConfig(n=2, m=4, kernels="portable"))
        return _composite_mask(torch.compile(model, backend=own, **compile_mode))
    if name == SEARCH_ROW:
        if device.type != "cpu":
            return "CPU only (keeps the GPU run in its time limit; there a search is one mask and one scoring launch)"
        backend = nmcompile.backend(n=2, m=4, kernels="portable", perm_interval=1)
        return torch.compile(model, backend=backend, **compile_mode)
    if name == MVUE_ROW:
        if device.type != "cpu":
            return "CPU only (keeps the GPU run in its time limit; there the rule is one Triton kernel, in parts24)"
        backend = nmcompile.backend(n=2, m=4, kernels="portable", grad_prune="mvue24")
        return torch.compile(model, backend=backend, **compile_mode)
    kernels = name.removeprefix("nmsparse ")
    why = unavailable(kernels, device, dtype)
    if why is not None:
        return why
    # The 2:4 row prunes dY with MVUE 2:4, so that its weight-gradient GEMM is 2:4 too.
    recipe = {"grad_prune": "mvue24"} if kernels == "sparse24" else {}
    try:
        backend = nmcompile.backend(n=2, m=4, kernels=kernels, **recipe)
    except ValueError as exc:
        return f"not available: {exc}"
    return torch.compile(model, backend=backend, **compile_mode)


def _composite_mask(
    run: Callable[[torch.Tensor], torch.Tensor] | str,
) -> Callable[[torch.Tensor], torch.Tensor] | str:
    """``run`` compiled with the C mask kernels turned off (the lowering and the traced backward ask
    their ``blocker`` at compile time), so the same run shows what they save against the composite masks."""
    if isinstance(run, str):
        return run
    from nmcompile.kernels import cpu_mask

    def forward(x: torch.Tensor) -> torch.Tensor:
        # AOTAutograd's cache would serve the portable row's graphs where the forward graphs are the
        # same (convolutions keep the composite forward mask): its key does not see the patch.
        with (
            mock.patch.object(cpu_mask, "blocker", lambda weight, m: "off for this row"),
            torch._functorch.config.patch(enable_autograd_cache=False),
        ):
            return run(x)

    return forward


def _training_step(
    model: nn.Module, run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dy: torch.Tensor
) -> Callable[[], None]:
    """One step: ``run`` forward, backward of the fixed output gradient ``dy``, SGD momentum, zero_grad."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        run(x).backward(dy)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def step_rows(block: str, size: Size, device: torch.device, mode: str = "default") -> list[Row]:
    """One row per implementation in ``STEP_ROWS``, each on a fresh copy of the same initial block and
    data; ``mode``: ``torch.compile``'s, for the compiled rows."""
    # The rows' compiled models live side by side (timing interleaves them); dynamo guards each cache
    # entry on its backend, so no row reuses another's graph.
    torch._dynamo.reset()
    torch.manual_seed(0)
    base, shape = make_block(block, size)
    base = base.to(device, size.dtype)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=generator).to(device, size.dtype)
    # The gradient of a mean-type loss: weights drift slowly and stay finite over many steps.
    dy = (torch.randn(shape, generator=generator) / x.numel()).to(device, size.dtype)
    rows, jobs = [], []
    for name in STEP_ROWS:
        row = Row("step", block, None, name)
        model = copy.deepcopy(base)
        run = _prepare(name, model, device, size.dtype, mode)
        if isinstance(run, str):
            row.reason = run
        else:
            jobs.append((row, _training_step(model, run, x, dy)))
        rows.append(row)
    print(f"[benchmarks.step] {block}: compiling and timing {len(jobs)} rows", file=sys.stderr, flush=True)
    # Under another mode every compiled row runs torch's code for that mode, which can fail where
    # ours does not (mode="lite" fails the dense ResNet backward on the CPU, torch 2.13): the row says so.
    measure(jobs, device, size, guarded=GUARDED_ROWS if mode == "default" else STEP_ROWS)
    set_ratios(rows, ("dense inductor", "reference eager"))
    return rows


def search_costs(rows: list[Row]) -> list[str]:
    """Per block, what a permutation search adds to a step (the search-every-step row minus the
    portable row) and its share of a portable step at the default ``perm_interval``."""
    interval = SparsityConfig().perm_interval
    lines = []
    for block in dict.fromkeys(row.block for row in rows):
        medians = {row.name: row.median_ms for row in rows if row.block == block}
        every, portable = medians.get(SEARCH_ROW), medians.get("nmsparse portable")
        if every is None or portable is None:
            continue
        extra = every - portable
        if extra <= 0:  # the two medians' noise is larger than the search
            lines.append(f"- {block}: no search cost measured (a search step took {-extra:.2f} ms less: timing noise)")
            continue
        lines.append(
            f"- {block}: a search step takes {extra:.2f} ms more than a step without one; at the default "
            f"perm_interval={interval} that is {extra / interval:.3f} ms per step, "
            f"{100 * extra / interval / portable:.2f}% of the portable step"
        )
    return lines


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line; the defaults follow the device (``small`` on CPU, ``full`` on CUDA)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=tuple(SIZES), help="default: small on CPU, full on CUDA")
    parser.add_argument("--json", type=Path, help="also write every row, and the header, to this JSON file")
    parser.add_argument("--block", choices=(*BLOCKS, "all"), default="all")
    parser.add_argument(
        "--mode",
        choices=tuple(list_mode_options()),
        default="default",
        help="torch.compile's mode for the compiled rows (reduce-overhead: CUDA graphs); other than default, "
        "the eager rows are left out",
    )
    parser.add_argument(
        "--gemm", action=argparse.BooleanOptionalAction, default=True, help="the per-GEMM rows (FFN only)"
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    if args.json is not None:  # before the run, not after it
        check_writable(parser, "--json", args.json)
    if args.mode == "reduce-overhead" and args.device == "cpu":
        parser.error("--mode reduce-overhead: CUDA graphs do not apply on the CPU (its rows would be --mode default's)")
    args.size = args.size or ("full" if args.device == "cuda" else "small")
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    """Run the benchmark, print the tables, optionally write JSON; returns the rows."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device, size = torch.device(args.device), SIZES[args.size]
    header = environment(device, args.size, size, shlex.join(["python", "-m", "benchmarks.step", *argv]))
    blocks = BLOCKS if args.block == "all" else (args.block,)
    steps = [row for block in blocks for row in step_rows(block, size, device, args.mode)]
    print("# nmcompile training-step benchmark\n")
    print("\n".join(f"- {key}: {value}" for key, value in header.items()))
    print("\n## Training step (forward + backward + SGD momentum step)\n")
    print(table(steps, "block", ("dense inductor", "reference eager")))
    searches = search_costs(steps)
    if searches:
        print("\nPermutation search, amortised (the medians above leave it out):\n")
        print("\n".join(searches))
    sys.stdout.flush()  # the step table stands even if a time limit ends the GEMM rows
    wants_gemms = "ffn" in blocks and args.gemm
    if wants_gemms and args.mode != "default":
        print(f"\nPer-GEMM rows left out: they time eager calls and default-mode compiles, not --mode {args.mode}.")
    gemms = gemm_rows(size, device) if wants_gemms and args.mode == "default" else []
    if gemms:
        print(f"\n## Per-GEMM: FFN fc1 ({size.tokens} x {size.d_model} -> {size.d_ff})\n")
        print(table(gemms, "GEMM", ("dense", "reference")))
    if args.json is not None:
        rows = [dataclasses.asdict(row) for row in steps + gemms]
        record = {"header": header, "rows": rows, "search": searches}
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return steps + gemms


if __name__ == "__main__":
    main()
