"""Smoke test of the training-step benchmark (``python -m benchmarks.step``) at its tiny size on CPU."""

from __future__ import annotations

import copy
import importlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import EMULATED_ALGS, c_mask_kernels, interpreted, record_alg_ids

from benchmarks import gemm, step
from benchmarks.common import SIZES, Row
from benchmarks.gemm import GEMM_ROWS, OPS
from nmcompile import reference
from nmcompile.kernels import cpu_mask
from nmcompile.kernels.srste import srste_add

UNMEASURED = {
    "nmsparse triton": "needs CUDA",
    "nmsparse sparse24": "not on CUDA (2:4 tensor cores need sm80+)",
}


def test_step_benchmark_tiny_cpu(tmp_path, capsys):
    """Every row of both blocks is printed and written; measured rows have finite medians, the rest a
    reason; each block gets its amortised search cost line, from the written medians (which of its
    two forms depends on timing noise: ``test_search_cost_is_the_search_row_minus_the_portable_row``)."""
    path = tmp_path / "bench.json"
    step.main(["--device", "cpu", "--size", "tiny", "--json", str(path)])
    out = capsys.readouterr().out
    data = json.loads(path.read_text())
    assert data["header"]["torch"] and "tiny" in data["header"]["size"]
    rows = [r for r in data["rows"] if r["kind"] == "step"]
    for block in step.BLOCKS:
        by_name = {r["name"]: r for r in rows if r["block"] == block}
        assert tuple(by_name) == step.STEP_ROWS
        for name, row in by_name.items():
            assert f"| {block} | {name} |" in out
            if name in UNMEASURED:
                assert row["reason"] == UNMEASURED[name] and row["median_ms"] is None
            else:
                assert row["reason"] is None and math.isfinite(row["median_ms"]) and row["median_ms"] > 0, row
                assert row["peak_mem_mib"] is None  # CPU: not measured per row
        assert by_name["dense inductor"]["ratios"]["dense inductor"] == 1.0
        assert by_name["reference eager"]["ratios"]["reference eager"] == 1.0
    assert data["search"] == step.search_costs([Row(**r) for r in rows])
    for line, block in zip(data["search"], step.BLOCKS, strict=True):
        assert line.startswith(f"- {block}: ") and line in out
    gemms = [r for r in data["rows"] if r["kind"] == "gemm"]
    assert [(r["op"], r["name"]) for r in gemms] == [(op, name) for op in OPS for name in GEMM_ROWS]
    for row in gemms:
        assert f"| {row['op']} | {row['name']} |" in out
        if row["name"] in gemm.GPU_ROWS:
            reason = "needs CUDA" if row["name"].startswith("triton") else "not on CUDA (2:4 tensor cores need sm80+)"
            assert row["reason"] == reason and row["median_ms"] is None
        else:
            assert math.isfinite(row["median_ms"]) and row["median_ms"] > 0, row
            assert row["ratios"]["dense"] > 0 and row["ratios"]["reference"] > 0


@interpreted
def test_gemm_rows_time_the_same_work():
    """The reference and portable GEMM rows compute the same sparse results, which differ from dense."""
    g = torch.Generator().manual_seed(0)
    x, w, dy = torch.randn(8, 16, generator=g), torch.randn(32, 16, generator=g), torch.randn(8, 32, generator=g)
    perm = torch.randperm(32, generator=g)
    dense, ref, portable = (gemm.IMPLEMENTATIONS[name](x, w, dy, perm) for name in ("dense", "reference", "portable"))
    for op in OPS:
        torch.testing.assert_close(portable[op](), ref[op](), msg=op)
        assert not torch.allclose(dense[op](), ref[op]()), op
    # The 2:4 rows' ops (dense GEMMs off a GPU): the same forward and input gradient; the weight
    # gradient is the reference's with dY pruned by MVUE 2:4 (step 1, key 7, as the row runs it).
    sparse24 = gemm.IMPLEMENTATIONS["sparse24"](x, w, dy, perm)
    for op in ("forward", "input grad"):
        torch.testing.assert_close(sparse24[op](), ref[op](), msg=op)
    pruned = torch.ops.nmsparse.mvue_prune(dy, torch.tensor(1), 7, "mvue24")
    srste = gemm.SRSTE_LAMBDA * torch.where(reference.nm_mask(w, 2, 4, dim=1), 0, w)
    torch.testing.assert_close(sparse24["weight grad"](), pruned.t() @ x + srste)


def test_sparse24_gemm_row_times_the_sparse24_rows_gemms(emulated_24_library):
    """The GEMM-only row (operands compressed before timing) computes what the ``sparse24`` rows'
    GEMMs do, here against the emulated libraries: their difference is only the overhead."""
    g = torch.Generator().manual_seed(0)
    x, w, dy = (torch.randn(*shape, generator=g).bfloat16() for shape in ((8, 64), (32, 64), (8, 32)))
    perm = torch.randperm(32, generator=g)
    ops, gemm_only = (gemm.IMPLEMENTATIONS[name](x, w, dy, perm) for name in ("sparse24", "sparse24 gemm"))
    for op in ("forward", "input grad"):
        assert torch.equal(gemm_only[op](), ops[op]()), op
    # The weight gradient adds SR-STE after its GEMM, in one pass: the rest of that row's overhead.
    assert torch.equal(srste_add(gemm_only["weight grad"](), w, 2, 4, gemm.SRSTE_LAMBDA), ops["weight grad"]())
    assert not torch.equal(gemm_only["forward"](), x @ w.t())


def test_best_alg_row_runs_the_searched_algorithms(emulated_24_library, monkeypatch):
    """The ``best alg`` row times the GEMM-only row's products, each with the algorithm id the
    library's search returned for it (CUTLASS: 0, its only one)."""
    g = torch.Generator().manual_seed(0)
    x, w, dy = (torch.randn(*shape, generator=g).bfloat16() for shape in ((8, 64), (32, 64), (8, 32)))
    perm = torch.randperm(32, generator=g)
    gemm_only = gemm.IMPLEMENTATIONS["sparse24 gemm"](x, w, dy, perm)
    best = gemm.IMPLEMENTATIONS["sparse24 gemm, best alg"](x, w, dy, perm)
    calls = record_alg_ids(monkeypatch)
    for op in OPS:
        assert torch.equal(best[op](), gemm_only[op]()), op
    assert calls == ([EMULATED_ALGS - 1, 0] * 3 if emulated_24_library == "cusparselt" else [])


def test_failed_gpu_row_set_up_is_a_reason(monkeypatch):
    """A GPU row whose set-up raises (its operands are written and compressed before timing) gets
    the error as its reason in every GEMM group, and the other rows are timed as usual."""

    def broken(*args):
        raise RuntimeError("CUDA error: misaligned address\nmore")

    monkeypatch.setitem(gemm.IMPLEMENTATIONS, "sparse24 gemm", broken)
    monkeypatch.setattr(gemm, "unavailable", lambda name, device, dtype: None if name == "sparse24 gemm" else "off")
    monkeypatch.setattr(gemm, "measure", lambda jobs, *args, **kwargs: [setattr(r, "median_ms", 1.0) for r, _ in jobs])
    rows = gemm.gemm_rows(SIZES["tiny"], torch.device("cpu"))
    failed = [r for r in rows if r.name == "sparse24 gemm"]
    assert [r.reason for r in failed] == ["failed: RuntimeError: CUDA error: misaligned address"] * 3
    assert all(r.median_ms is None for r in failed)
    assert all(r.reason == "off" and r.median_ms is None for r in rows if r.name != "sparse24 gemm")


@pytest.mark.parametrize("mode", ["default", "lite"])
def test_a_row_another_mode_breaks_is_a_reason(mode, monkeypatch):
    """Under a ``--mode`` other than the default, a compiled row that torch's code for that mode
    fails (``mode="lite"`` on the dense ResNet backward, CPU, torch 2.13) gets the error as its
    reason and the run goes on; under the default it ends the run, as before."""

    def broken(x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("expected size 16==16, stride 1==64 at dim=1")

    def prepare(name, model, device, dtype, mode="default"):
        return broken if name == "dense inductor" else model if name == "dense eager" else "off"

    monkeypatch.setattr(step, "_prepare", prepare)
    if mode == "default":
        with pytest.raises(AssertionError, match="expected size"):
            step.step_rows("resnet", SIZES["tiny"], torch.device("cpu"), mode)
        return
    rows = {row.name: row for row in step.step_rows("resnet", SIZES["tiny"], torch.device("cpu"), mode)}
    assert rows["dense inductor"].reason == "failed: AssertionError: expected size 16==16, stride 1==64 at dim=1"
    assert rows["dense eager"].median_ms > 0 and rows["dense eager"].ratios == {}


def test_composite_mask_row_compiles_its_own_graph(monkeypatch):
    """The composite-mask row's model (same class as the portable row's, same options) gets a graph
    of its own, compiled with the C mask kernels off: dynamo would otherwise reuse the portable
    row's graph for it, and the two rows would time the same thing."""
    from nmcompile.kernels import cpu_mask

    backend_module = sys.modules["nmcompile.backend"]
    compiled, compile_graph = [], backend_module.compile_graph

    def recorded(gm, *args, **kwargs):
        compiled.append(cpu_mask.blocker(torch.ones(4, 4), 4) == "off for this row")
        return compile_graph(gm, *args, **kwargs)

    monkeypatch.setattr(backend_module, "compile_graph", recorded)
    torch._dynamo.reset()
    base, shape = step.make_block("ffn", SIZES["tiny"])
    for name in ("nmsparse portable", "nmsparse portable, composite mask"):
        step._prepare(name, copy.deepcopy(base), torch.device("cpu"), torch.float32)(torch.randn(shape))
    assert compiled == [False, True]


@pytest.mark.skipif(not c_mask_kernels(), reason="the C mask kernels do not build here")
@pytest.mark.parametrize("block", step.BLOCKS)
def test_composite_mask_row_runs_no_c_mask_kernel(block, tmp_path, monkeypatch):
    """A training step of the composite-mask row calls none of the C mask kernels, and the portable
    row's calls the Bi-Mask one, also where the portable row compiled the same forward graph first
    (the ResNet block's convolutions keep the composite forward mask): AOTAutograd's cache, whose
    key does not see the patched ``blocker``, served that row the portable row's backward."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    base, shape = step.make_block(block, SIZES["tiny"])
    x = torch.randn(shape)
    ran = {}
    for name in ("nmsparse portable", "nmsparse portable, composite mask"):
        run = step._prepare(name, copy.deepcopy(base), torch.device("cpu"), torch.float32)
        with torch.profiler.profile() as profile:
            run(x).sum().backward()
        ran[name] = {e.name for e in profile.events() if e.name.startswith("nmsparse::cpu_")}
    assert "nmsparse::cpu_bimask_weight" in ran["nmsparse portable"]
    assert ran["nmsparse portable, composite mask"] == set()


def test_cpu_only_rows_have_a_reason_elsewhere():
    """Off the CPU the composite-mask row (the kernels it turns off are CPU-only), the search row and
    the MVUE row (the GPU run's time limit) are not run: they say why before anything touches that device, and
    the other rows prepare as usual."""
    model = torch.nn.Linear(8, 8)
    why = step._prepare("nmsparse portable, composite mask", model, torch.device("cuda"), torch.bfloat16)
    assert why == "CPU only (the C mask kernels this row turns off run on the CPU)"
    for row in (step.SEARCH_ROW, step.MVUE_ROW):
        why = step._prepare(row, model, torch.device("cuda"), torch.bfloat16)
        assert why.startswith("CPU only (keeps the GPU run in its time limit"), row
    assert step._prepare("dense eager", model, torch.device("cuda"), torch.bfloat16) is model


def test_gpu_checks_script_names_real_tests():
    """``benchmarks/gpu_checks.sh`` parses, every test it names exists, and it names every CUDA-only
    test of the suite (one that skips here), so a rename or a new GPU test cannot be left out."""
    root = Path(__file__).resolve().parent.parent
    script = root / "benchmarks" / "gpu_checks.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    named = set(re.findall(r'"(tests/test_\w+\.py)::(test_\w+)"', script.read_text()))
    cuda_only = set()
    for path in sorted((root / "tests").glob("test_*.py")):
        source = path.read_text()
        for match in re.finditer(r"\ndef (test_\w+)\(", source):
            decorators = source[source.rindex("\n\n", 0, match.start()) : match.start()]
            if "skipif" in decorators and ("cuda" in match.group(1) or "sm80" in decorators.lower()):
                cuda_only.add((f"tests/{path.name}", match.group(1)))
    for path, name in named:
        assert f"\ndef {name}(" in (root / path).read_text(), (path, name)
    assert len(cuda_only) == 10 and cuda_only <= named, cuda_only - named


def test_masks_benchmark_smoke(capsys):
    """``benchmarks.masks`` at a tiny size: every piece's rows, each C kernel against Inductor's
    composite (or the reason it is missing), and the thread count put back."""
    from benchmarks import masks

    threads = torch.get_num_threads()
    rows = masks.main(["--rows", "16", "--cols", "8", "--threads", "1", "--seconds", "0.01", "--swaps", "3"])
    assert [(row.op, row.name) for row in rows] == [
        ("W ⊙ F", "inductor"),
        ("W ⊙ F", "C kernel"),
        ("W ⊙ B (Bi-Mask)", "inductor"),
        ("W ⊙ B (Bi-Mask)", "C kernel"),
        ("search, 100 candidates", "eager"),
        ("search, 100 candidates", "C kernel"),
        ("3 swap sweeps", "eager"),
    ]
    blocked = cpu_mask.blocker(torch.zeros(16, 8), 4)
    for row in rows:
        assert (row.median_ms is None) == (row.reason is not None) == (row.name == "C kernel" and blocked is not None)
    assert rows[1].ratios.keys() <= {"inductor"} and rows[0].ratios == {"inductor": 1.0}
    out = capsys.readouterr().out
    assert "| piece | row | median ms | vs inductor |" in out and "W ⊙ F, inductor: " in out
    fractions = re.search(r"kept fraction: identity (\S+), search (\S+), search \+ 3 swap sweeps (\S+)\n", out)
    assert fractions and 0 < float(fractions[1]) <= float(fractions[2]) <= float(fractions[3]) <= 1, out[-300:]
    assert torch.get_num_threads() == threads
    with pytest.raises(SystemExit):
        masks.main(["--rows", "6"])


def test_gpu_checks_refuses_an_unknown_stage_before_it_starts(tmp_path):
    """A misspelt name in ``STAGES`` ends the script with status 2 and the known names, before it
    makes ``$OUT`` or installs anything (it was logged and skipped, the device time spent on the
    rest); every known name has its stage."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_checks.sh"
    env = {**os.environ, "STAGES": "cuda_test parts24", "OUT": str(tmp_path / "out")}
    run = subprocess.run(["bash", str(script), sys.executable], env=env, capture_output=True, text=True)
    assert run.returncode == 2 and not (tmp_path / "out").exists()
    known = re.search(r'KNOWN="([^"]+)"', script.read_text()).group(1).split()
    assert run.stderr == f'unknown stage cuda_test in STAGES="cuda_test parts24" (known: {" ".join(known)})\n'
    assert all(re.search(rf"\n\s+{name}\)", script.read_text()) for name in known)


def test_json_path_in_a_missing_directory_is_an_argument_error(tmp_path, capsys):
    """``--json`` into a directory that does not exist fails at parsing, before any row runs."""
    with pytest.raises(SystemExit) as info:
        step.parse_args(["--device", "cpu", "--json", str(tmp_path / "missing" / "out.json")])
    assert info.value.code == 2
    assert f"--json {tmp_path / 'missing' / 'out.json'}: no directory {tmp_path / 'missing'}" in capsys.readouterr().err
    assert step.parse_args(["--device", "cpu", "--json", str(tmp_path / "out.json")]).size == "small"
    with pytest.raises(SystemExit) as info:  # a directory: the run would end in IsADirectoryError
        step.parse_args(["--device", "cpu", "--json", str(tmp_path)])
    assert info.value.code == 2 and f"--json {tmp_path}: not a file that can be written" in capsys.readouterr().err
    if Path("/proc/self").is_dir():  # a directory where no file can be made, even by root (os.access said yes)
        with pytest.raises(SystemExit) as info:
            step.parse_args(["--device", "cpu", "--json", "/proc/nmcompile.json"])
        assert info.value.code == 2 and "--json /proc/nmcompile.json: not a file that can be written (" in (
            capsys.readouterr().err
        )


def test_reduce_overhead_on_the_cpu_is_an_argument_error(capsys):
    """``--mode reduce-overhead`` means CUDA graphs, which the CPU has not: it would silently give the
    default mode's rows. The other modes (``max-autotune`` tunes CPU GEMMs too) parse."""
    with pytest.raises(SystemExit) as info:
        step.parse_args(["--device", "cpu", "--mode", "reduce-overhead"])
    assert info.value.code == 2
    assert "--mode reduce-overhead: CUDA graphs do not apply on the CPU" in capsys.readouterr().err
    assert step.parse_args(["--device", "cpu", "--mode", "max-autotune"]).mode == "max-autotune"


@pytest.mark.parametrize(
    ("module", "argv", "message"),
    [
        ("split", ["--tokens", "256", "0"], "argument --tokens: expected an int >= 1, got '0'"),
        ("cslt_probe", ["--jobs", "-2"], "argument --jobs: expected an int >= 1, got '-2'"),
        ("cslt_dump", [], "the following arguments are required: OUT.pt"),
        ("cslt_dump", ["a.pt", "b.pt"], "unrecognized arguments: b.pt"),
        ("cslt_layout", ["/no/such/dump.pt"], "/no/such/dump.pt: no such file"),
        ("cslt_layout", [__file__], f"{__file__}: not a cslt_dump output (torch.load: "),
        ("cslt_layout", [__file__, "--save", "/no/such/maps.pt"], "--save /no/such/maps.pt: no directory /no/such"),
        ("ptx", ["--arch", "70"], "argument --arch: invalid choice: 70"),
    ],
)
def test_benchmark_scripts_reject_bad_arguments_before_running(module, argv, message, monkeypatch, capsys):
    """Each script's bad argument is a usage error (exit 2) naming it, before any work or CUDA check
    (they were tracebacks from the work: a thread pool of 0, ``torch.load``, ``ptxas``, a ``--save``
    into a missing directory after the report)."""
    main = importlib.import_module(f"benchmarks.{module}").main
    monkeypatch.setattr(sys, "argv", [module, *argv])
    with pytest.raises(SystemExit) as info:
        main(argv) if module in ("split", "ptx") else main()
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_search_cost_is_the_search_row_minus_the_portable_row():
    """A search step's extra time, and its share of a portable step at the default interval (100)."""
    rows = [
        Row("step", "ffn", None, "nmsparse portable", median_ms=10.0),
        Row("step", "ffn", None, step.SEARCH_ROW, median_ms=30.0),
        Row("step", "resnet", None, "nmsparse portable", median_ms=5.0),
        Row("step", "resnet", None, step.SEARCH_ROW, reason="failed"),
    ]
    assert step.search_costs(rows) == [
        "- ffn: a search step takes 20.00 ms more than a step without one; at the default "
        "perm_interval=100 that is 0.200 ms per step, 2.00% of the portable step"
    ]
    noisy = [
        Row("step", "ffn", None, "nmsparse portable", median_ms=10.0),
        Row("step", "ffn", None, step.SEARCH_ROW, median_ms=9.5),
    ]
    assert step.search_costs(noisy) == [
        "- ffn: no search cost measured (a search step took 0.50 ms less: timing noise)"
    ]


def run_ptx(*args: str) -> list[dict[str, str]]:
    """``python -m benchmarks.ptx *args`` in a process of its own (the suite's kernels are the
    interpreter's): one dict per config, keyed by the table's headers."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.ptx", *args], cwd=root, env=env, capture_output=True, text=True,
        timeout=900, check=True,
    )  # fmt: skip
    lines = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| ")]
    headers = [cell.strip() for cell in lines[0]]
    return [dict(zip(headers, (cell.strip() for cell in line), strict=True)) for line in lines[1:]]


@pytest.fixture(scope="module")
def ptx_table() -> list[dict[str, str]]:
    """``python -m benchmarks.ptx`` for every kernel (2:4)."""
    return run_ptx()


def _rows(table: list[dict[str, str]], *kernels: str) -> list[dict[str, str]]:
    return [row for row in table if row["kernel"] in kernels]


def test_every_triton_kernel_compiles_for_sm90(ptx_table):
    """Every autotuned Triton kernel of ``nmcompile.kernels`` is in ``benchmarks.ptx`` and each of its
    configs compiles for sm90 (the suite's runs are the interpreter's, which compiles nothing)."""
    import importlib
    import pkgutil

    import triton

    import nmcompile.kernels
    from benchmarks import ptx

    kernels = {
        (info.name, name)
        for info in pkgutil.iter_modules(nmcompile.kernels.__path__)
        for name, value in vars(importlib.import_module(f"nmcompile.kernels.{info.name}")).items()
        if isinstance(value, triton.runtime.Autotuner)
    }
    assert len(kernels) == 10
    assert kernels == {(v.module, v.kernel) for v in ptx.VARIANTS}
    compiled = {row["kernel"] for row in ptx_table}
    assert compiled == {v.name for v in ptx.VARIANTS}
    assert all(int(row["instructions"]) > 0 for row in ptx_table)


def test_mvue_kernel_compiles_to_no_data_exchange_between_threads(ptx_table):
    """``python -m benchmarks.ptx`` compiles the MVUE kernel for sm90 without a GPU: every config
    loads 128 bits at a time and has no warp shuffle, barrier, shared-memory store or register
    spill, so it can run at memory bandwidth. The kernel it replaced ran 14 shuffles per entry."""
    rows = _rows(ptx_table, "mvue24")
    assert len(rows) == 6 and {row["kernel"] for row in rows} == {"mvue24"}
    for row in rows:
        got = [row[key] for key in ("shuffles", "barriers", "shared stores", "widest load (bits)", "local stores")]
        assert got == ["0", "0", "0", "128", "0"], row["config"]
        assert 0 < int(row["registers"]) <= 255, row["config"]
        # 49.0 at most with the guards that keep rounding from breaking a draw and the value a block
        # summing to NaN or inf keeps (48.6 and 47.8 without them); 53 with a division per entry and
        # probability, 54 with a select on each output for those blocks
        assert float(row["instructions per entry"]) < 49.5, row


def test_bimask_operands_rank_without_data_exchange(ptx_table):
    """The Bi-Mask operand kernels, compiled for sm90 (Triton 3.9): ranking ``Bp`` across rows
    moves no data by warp shuffles in any config (the 64-wide tiles ran 8 per entry before groups
    of 4 were ranked by pairs), nothing spills, and ``W ⊙ B`` runs under 47 machine instructions
    per entry (47.7 to 91.4 before)."""
    rows = _rows(ptx_table, "W ⊙ B (Bi-Mask)", "(W[P] ⊙ Bp)ᵀ, compressed (cuSPARSELt)")
    assert len(rows) == 8
    for row in rows:
        assert (row["shuffles"], row["local stores"]) == ("0", "0"), row
        if row["kernel"] == "W ⊙ B (Bi-Mask)":
            assert float(row["instructions per entry"]) < 47, row


def test_groups_of_eight_rank_in_passes():
    """``--nm 2:8``: the N:M masks of 8 rank in 2 passes of two reductions (``common._keep_by_passes``,
    N a compile-time constant) instead of 8 of ranking every entry against every other: ``W ⊙ F``
    under 30 machine instructions per entry (39.6 to 48.0 before, Triton 3.9, sm90), ``W ⊙ B``
    under 81 (81.9 to 155.2); the kernels writing 2:4-compressed operands are left out."""
    rows = run_ptx("--nm", "2:8", "--kernel", "W ⊙ F", "--kernel", "W ⊙ B (Bi-Mask)",
                   "--kernel", "W ⊙ F, compressed (cuSPARSELt)")  # fmt: skip
    assert [row["kernel"] for row in rows] == ["W ⊙ F"] * 4 + ["W ⊙ B (Bi-Mask)"] * 4
    for row in rows:
        assert float(row["instructions per entry"]) < (30 if row["kernel"] == "W ⊙ F" else 81), row


def test_ptx_another_nm_of_only_compressing_kernels_is_a_usage_error(capsys):
    """At another N:M the kernels that write 2:4-compressed operands (the compressing operand and MVUE
    variants, ``compress24``) are left out (named under the table); asked for alone, that is a usage
    error naming them (it printed an empty table)."""
    from benchmarks import ptx

    with pytest.raises(SystemExit) as stopped:
        ptx.main(["--nm", "2:8", "--kernel", "compress24, CUTLASS", "--kernel", "W ⊙ F, compressed (cuSPARSELt)"])
    assert stopped.value.code == 2 and (
        "--nm 2:8: W ⊙ F, compressed (cuSPARSELt); compress24, CUTLASS write 2:4-compressed operands, at 2:4 only"
        in capsys.readouterr().err
    )


@pytest.mark.parametrize("nm", ["3:6", "0:4", "5:4", "2"])
def test_ptx_rejects_an_nm_the_kernels_do_not_take(nm, capsys):
    """``--nm`` must name an N:M the Triton kernels take; anything else stops with a usage error."""
    from benchmarks import ptx

    with pytest.raises(SystemExit) as stopped:
        ptx.main(["--nm", nm])
    assert stopped.value.code == 2 and "argument --nm: expected N:M" in capsys.readouterr().err


_MACHINE_CODE_SCRIPT = """
import itertools, re, subprocess, tempfile
from pathlib import Path
from triton import knobs
from benchmarks import ptx
variants = [v for v in ptx.VARIANTS if v.name in ("W ⊙ F", "mvue24")]
cubins = [asm["cubin"] for variant in variants for _, asm in itertools.islice(ptx._compile(variant, 90), 2)]
together = ptx.machine_code(cubins, "sm_90a")
with tempfile.TemporaryDirectory() as folder:
    for i, (cubin, (_, stl, count)) in enumerate(zip(cubins, together, strict=True)):
        path = Path(folder, f"{i}.cubin")
        path.write_bytes(cubin)
        sass = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", path], capture_output=True, text=True).stdout
        ops = re.findall(r"/\\*[0-9a-f]{4,}\\*/\\s+(?:@!?U?P\\w+\\s+)?([A-Z][A-Z0-9_.]*)", sass)
        assert (stl, count) == (sum(op.split(".")[0] == "STL" for op in ops), sum(op != "NOP" for op in ops))
        assert count > 100
print(len(together))
"""


def test_machine_code_of_kernels_read_together_is_each_kernels_own():
    """``benchmarks.ptx.machine_code`` disassembles all kernels' code in one ``nvdisasm`` run and splits
    it at their boundaries: each kernel's counts are what ``cuobjdump -sass`` of its own cubin counts
    (two configs each of two kernels, one after another)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", _MACHINE_CODE_SCRIPT], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "4"


def test_compression_and_gather_kernels_compile_to_wide_accesses(ptx_table):
    """The 2:4 path's two bandwidth kernels, compiled for sm90 as above: the compression loads 128
    bits at a time and shuffles nothing; the column gather also stores 128 bits at a time (its
    transposed tile goes out along ``T``, not one scattered entry per thread); none spills."""
    rows = _rows(ptx_table, "compress24, cuSPARSELt", "compress24, CUTLASS", "gather_t (dY[:, P]ᵀ)")
    assert len(rows) == 18
    for row in rows:
        assert (row["shuffles"], row["widest load (bits)"], row["local stores"]) == ("0", "128", "0"), row
        if row["kernel"].startswith("gather"):
            assert row["widest store (bits)"] == "128", row["config"]


def test_mode_reaches_every_compiled_row_and_leaves_eager_rows_out(monkeypatch):
    """``--mode reduce-overhead`` (CUDA graphs on a GPU) compiles each compiled row with that mode and
    reports the eager rows as not run; the default mode passes none, as before."""
    calls = []

    def fake_compile(model, **kwargs):
        calls.append(kwargs.get("mode"))
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    base, _ = step.make_block("ffn", SIZES["tiny"])
    for mode in ("reduce-overhead", "default"):
        calls.clear()
        device, dtype = torch.device("cpu"), torch.float32
        runs = {name: step._prepare(name, copy.deepcopy(base), device, dtype, mode) for name in step.STEP_ROWS}
        run = [name for name, prepared in runs.items() if not isinstance(prepared, str)]
        eager_run = mode == "default"
        assert run == [n for n in step.STEP_ROWS if n not in UNMEASURED and (eager_run or n not in step.EAGER_ROWS)]
        assert calls == [None if mode == "default" else mode] * 5  # dense inductor and the four portable rows
        if not eager_run:
            assert all(runs[name] == f"eager, so not run with --mode {mode}" for name in step.EAGER_ROWS)


def test_no_gemm_skips_the_per_gemm_rows(monkeypatch, capsys):
    """``--no-gemm`` prints the step table only (a GPU stage that wants the step rows alone)."""
    monkeypatch.setattr(step, "step_rows", lambda block, size, device, mode: [])
    monkeypatch.setattr(step, "gemm_rows", lambda size, device: pytest.fail("per-GEMM rows ran"))
    assert step.main(["--device", "cpu", "--size", "tiny", "--block", "ffn", "--no-gemm"]) == []
    assert "## Per-GEMM" not in capsys.readouterr().out


def test_another_mode_leaves_the_per_gemm_rows_out(monkeypatch, capsys):
    """Under a ``--mode`` other than default the per-GEMM rows, which time eager calls and
    default-mode compiles, are not run, and the output says so; ``--block resnet`` has none to leave."""
    monkeypatch.setattr(step, "step_rows", lambda block, size, device, mode: [])
    monkeypatch.setattr(step, "gemm_rows", lambda size, device: pytest.fail("per-GEMM rows ran"))
    assert step.main(["--device", "cpu", "--size", "tiny", "--block", "ffn", "--mode", "lite"]) == []
    out = capsys.readouterr().out
    assert "## Per-GEMM" not in out
    assert "\nPer-GEMM rows left out: they time eager calls and default-mode compiles, not --mode lite.\n" in out
    assert step.main(["--device", "cpu", "--size", "tiny", "--block", "resnet", "--mode", "lite"]) == []
    assert "Per-GEMM" not in capsys.readouterr().out


def test_parts24_device_time_sums_the_events_of_one_device():
    """``parts24``'s kernel column: real profiler events of this torch have the fields it reads, and
    only the asked device's events count (here the CPU's, the one device this machine profiles)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from benchmarks import parts24

    a = torch.randn(256, 256)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            a @ a
    events = prof.events()
    cpu_ms = parts24.device_ms(events, 3, DeviceType.CPU)
    expected = sum(e.time_range.elapsed_us() for e in events if e.device_type == DeviceType.CPU) / 3e3
    assert cpu_ms == pytest.approx(expected) and cpu_ms > 0
    assert parts24.device_ms(events, 3) == 0.0  # no CUDA events on this machine
    assert parts24._cell(lambda fn: fn(), lambda: 1.5) == "1.500"
    assert parts24._cell(lambda fn: fn(), lambda: 1 / 0) == "failed: ZeroDivisionError"


def test_parts24_names_the_config_autotuned_per_launch(monkeypatch):
    """Under its table ``parts24`` lists each autotuned launch: the kernel, its key's values by name
    (the extra dtype entries Triton appends are left out) and the config it chose."""
    import triton

    from benchmarks import parts24
    from nmcompile.kernels import compress24, gather_t, mvue, operand24

    for kernel in (operand24.masked_operand_kernel, mvue.mvue_kernel, gather_t.gather_t_kernel):
        monkeypatch.setattr(kernel, "cache", {})
    config = triton.Config({"BLOCK_R": 32, "BLOCK_C": 128}, num_warps=8)
    monkeypatch.setattr(compress24.compress24_kernel, "cache", {(4096, 16384, 2, "torch.bfloat16"): config})
    assert compress24.compress24_kernel.keys == ["R", "C", "LAYOUT"]
    assert parts24.chosen_configs() == [f"- compress24_kernel(R=4096, C=16384, LAYOUT=2): {config}"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cslt_dump_fixed_operand_keeps_places_1_and_2_with_exact_integers(dtype):
    """``cslt_dump``'s decodable operand: every group of four keeps places 1 and 2, and each kept
    value is an integer 1..251 that the dtype holds exactly (so a buffer's values can be traced)."""
    from benchmarks.cslt_dump import fixed_places

    a = fixed_places(128, 256, dtype)
    groups = a.float().view(128, 64, 4)
    assert not groups[..., 0].any() and not groups[..., 3].any()
    kept = groups[..., 1:3].reshape(-1)
    assert torch.equal(kept, torch.arange(1, kept.numel() + 1).remainder(251).add(1).float())


def test_cslt_dump_file_loads_under_torch_load_defaults(tmp_path):
    """The dump file reads back with ``torch.load``'s default ``weights_only=True``, as
    ``cslt_layout`` reads it (with ``torch.__version__`` itself in it, a ``TorchVersion``, it did not)."""
    from benchmarks.cslt_dump import fixed_places, payload

    dense = fixed_places(32, 64, torch.float16)
    operands = {(32, 64, "float16", "fixed"): (dense, torch.zeros(32, 40, dtype=torch.int16))}
    torch.save(payload(operands, "a GPU"), tmp_path / "dump.pt")
    loaded = torch.load(tmp_path / "dump.pt")
    assert loaded["torch"] == torch.__version__ and loaded["device"] == "a GPU"
    assert torch.equal(loaded["operands"][32, 64, "float16", "fixed"][0], dense)


def test_cslt_probe_reports_a_failed_case_in_its_row():
    """``cslt_probe`` runs each case (shape, dtype, ``b`` layout, bias, result layout) in a process of
    its own, and a case that fails shows what it printed and the error that ended it."""
    from benchmarks import cslt_probe

    def fake_run(args, capture_output, text, timeout):
        assert args[1] == "-c" and args[2] == cslt_probe.CASE and len(args) == 10
        failed = args[-4:] == ["float16", "0", "0", "1"]
        return subprocess.CompletedProcess(args, 1 if failed else 0, "alg 0: rel err 1e-03\n", "RuntimeError: boom\n")

    with mock.patch.object(cslt_probe.subprocess, "run", fake_run):
        case = (128, 256, 64, "float16", False, False, True)
        assert cslt_probe.run_case(case) == (case, "alg 0: rel err 1e-03 -> FAILED after that: RuntimeError: boom")
        assert cslt_probe.run_case((128, 256, 64, "bfloat16", False, False, True))[1] == "alg 0: rel err 1e-03"
