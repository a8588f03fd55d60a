"""Shared pieces of the benchmarks: sizes, result rows, timing, peak memory and markdown tables."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils import benchmark


@dataclasses.dataclass(frozen=True)
class Size:
    """Problem sizes of one ``--size``, and its timing budget per row."""

    d_model: int
    d_ff: int
    tokens: int
    channels: int
    spatial: int
    batch: int
    dtype: torch.dtype
    warmup_steps: int
    min_run_time: float  # timed seconds per row, split over the rounds: blocked_autorange on CPU, do_bench on CUDA
    rounds: int  # interleaved timing rounds over a table's rows

    def describe(self) -> str:
        """The sizes in words, for the table header."""
        return (
            f"FFN {self.tokens} tokens x d_model {self.d_model}, d_ff {self.d_ff}; "
            f"ResNet block batch {self.batch} x {self.channels} channels x {self.spatial}x{self.spatial}"
        )


SIZES = {
    "tiny": Size(64, 256, 64, 16, 8, 2, torch.float32, warmup_steps=2, min_run_time=0.06, rounds=2),
    "small": Size(512, 2048, 1024, 64, 16, 8, torch.float32, warmup_steps=3, min_run_time=1.0, rounds=5),
    "full": Size(4096, 16384, 8192, 256, 56, 32, torch.bfloat16, warmup_steps=3, min_run_time=1.5, rounds=3),
}


@dataclasses.dataclass
class Row:
    """One line of a result table; a row that was not measured has ``median_ms=None`` and a ``reason``."""

    kind: str  # "step" (a whole training step) or "gemm" (one GEMM of the FFN's fc1)
    block: str  # "ffn" or "resnet"; "ffn.fc1" for GEMM rows
    op: str | None  # GEMM rows: "forward", "input grad" or "weight grad"
    name: str
    median_ms: float | None = None
    ratios: dict[str, float] = dataclasses.field(default_factory=dict)  # baseline row name -> median / its median
    peak_mem_mib: float | None = None  # CUDA only
    reason: str | None = None


def positive_int(text: str) -> int:
    """An ``argparse`` type: an int >= 1 (a count of tokens, jobs, ...), else a usage error."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return value


def unavailable(kernels: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the GPU-only implementation ``kernels`` (``triton`` or ``sparse24``, and their GEMM-only rows)
    cannot run on ``device`` in ``dtype``, or ``None`` (also for every other implementation)."""
    if kernels.startswith("triton") and device.type != "cuda":
        return "needs CUDA"
    if kernels.startswith("sparse24"):
        from nmcompile.kernels import sparse24

        return sparse24.blocker(device, dtype)
    return None


def _samples(fn: Callable[[], Any], device: torch.device, seconds: float) -> list[float]:
    """Per-call milliseconds of a warmed-up ``fn`` over about ``seconds``: CPU blocks, or CUDA events."""
    if device.type != "cuda":
        timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        return [t * 1e3 for t in timer.blocked_autorange(min_run_time=seconds).times]
    from triton.testing import do_bench

    return do_bench(fn, rep=max(1, round(seconds * 1e3)), return_mode="all")


def _peak_memory(fn: Callable[[], Any], device: torch.device) -> float | None:
    """On CUDA, the memory one call of ``fn`` allocates above what was allocated before it (MiB)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def failure(exc: Exception) -> str:
    """A row's reason for the exception that stopped it: its type and first line."""
    message = str(exc).strip().splitlines()
    return f"failed: {type(exc).__name__}: {message[0] if message else ''}"


def _fail(row: Row, exc: Exception, guard: bool) -> None:
    """With ``guard``, record ``exc`` as the row's reason so that the run goes on; without, re-raise it."""
    if not guard:
        raise exc
    row.reason = failure(exc)


def measure(
    jobs: Sequence[tuple[Row, Callable[[], Any]]], device: torch.device, size: Size, guarded: Sequence[str] = ()
) -> None:
    """Warm every job up (compiles happen here), then time them in ``size.rounds`` interleaved rounds."""
    # Interleaving spreads the slow spells of a shared machine over all rows instead of one; a row's
    # median is over all its samples. A row named in ``guarded`` (GPU-only rows with new kernels) gets
    # its exception as its reason instead of ending the run.
    live: list[tuple[Row, Callable[[], Any], list[float]]] = []
    for row, fn in jobs:
        start = time.perf_counter()
        try:
            for _ in range(size.warmup_steps):
                fn()
            row.peak_mem_mib = _peak_memory(fn, device)
            live.append((row, fn, []))
        except Exception as exc:
            _fail(row, exc, row.name in guarded)
        # Progress on stderr: a run cut off by a time limit still shows how far it got.
        done = "warmed up" if row.reason is None else row.reason
        seconds = time.perf_counter() - start
        print(f"[benchmarks] {row.block} {row.op or 'step'} {row.name}: {done} in {seconds:.1f} s", file=sys.stderr)
    for _ in range(size.rounds):
        for row, fn, times in live:
            if row.reason is None:
                try:
                    times += _samples(fn, device, size.min_run_time / size.rounds)
                except Exception as exc:
                    _fail(row, exc, row.name in guarded)
    for row, _, times in live:
        if row.reason is None:
            row.median_ms = statistics.median(times)


def set_ratios(rows: Sequence[Row], baselines: Sequence[str]) -> None:
    """Give each measured row its median over each measured baseline row's median (below 1: faster)."""
    medians = {row.name: row.median_ms for row in rows}
    for row in rows:
        if row.median_ms is not None:
            row.ratios = {b: row.median_ms / medians[b] for b in baselines if medians.get(b) is not None}


def _cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one, else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _triton_version() -> str:
    """Triton's version, or why there is none: the CPU rows run without it."""
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def environment(device: torch.device, size_name: str, size: Size, command: str) -> dict[str, str]:
    """What a reader needs to compare two runs: device, versions, sizes, dtype, command and date."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        name = f"{torch.cuda.get_device_name(device)} (sm{major}{minor})"
    else:
        name = f"CPU, {_cpu_name()} ({os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads)"
    return {
        "device": name,
        # Other processes slow the timings down; a load average near the CPU count at start says so.
        "load average at start": f"{os.getloadavg()[0]:.2f} (1 min)",
        "torch": torch.__version__,
        "triton": _triton_version(),
        "size": f"{size_name}: {size.describe()}",
        "dtype": str(size.dtype).removeprefix("torch."),
        "command": command,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _number(value: float | None, digits: int) -> str:
    """``value`` with ``digits`` decimals, two significant digits below 0.1, ``-`` when there is none."""
    if value is None:
        return "-"
    return f"{value:.2g}" if abs(value) < 0.1 else f"{value:.{digits}f}"


def table(rows: Sequence[Row], first: str, baselines: Sequence[str]) -> str:
    """A markdown table of ``rows``; ``first`` is the label column (``block`` or ``GEMM``)."""
    header = [first, "row", "median ms", *(f"vs {b}" for b in baselines), "peak MiB", "note"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            row.op if row.kind == "gemm" else row.block,
            row.name,
            _number(row.median_ms, 3),
            *(_number(row.ratios.get(b), 2) for b in baselines),
            _number(row.peak_mem_mib, 1),
            row.reason or "",
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def check_writable(parser: argparse.ArgumentParser, name: str, path: Path) -> None:
    """A usage error, before any work, where ``path`` could not be written as a file at the end: its
    directory missing, a directory itself, a place where no file can be made (``/proc``, also for
    root, whom ``os.access`` lets through). It is opened for appending: what is there stays."""
    if not path.parent.is_dir():
        parser.error(f"{name} {path}: no directory {path.parent}")
    try:
        path.open("a").close()
    except OSError as err:
        parser.error(f"{name} {path}: not a file that can be written ({err.strerror})")
