"""Which cuSPARSELt products this GPU runs, each in a process of its own (a kernel fault ends the
process's CUDA context, so one bad case cannot take the others with it).

For every shape, dtype and operand layout (``b`` row- or column-major, bias or none, result
transposed or not) a case compresses a random 2:4 ``A`` with ``torch._cslt_compress``, multiplies it
with algorithm 0, then runs cuSPARSELt's search (``sparse24.library_search``) and multiplies with
the algorithm it picked; each product is checked against the fp32 dense one. Prints one table row
per case.
Usage: python -m benchmarks.cslt_probe [--jobs 4]
"""

import argparse
import concurrent.futures
import itertools
import subprocess
import sys

import torch

from benchmarks.common import positive_int

SHAPES = ((128, 256, 64), (512, 256, 1024), (4096, 1024, 512))  # m, k, n
DTYPES = ("float16", "bfloat16")

CASE = """
import sys, torch
from nmcompile.kernels.sparse24 import library_search, random_24
m, k, n, dtype, col_major, with_bias, transpose = sys.argv[1:]
m, k, n, dtype = int(m), int(k), int(n), getattr(torch, dtype)
col_major, with_bias, transpose = col_major == "1", with_bias == "1", transpose == "1"
a = random_24(m, k, dtype, "cuda", seed=m + n)
b = (torch.randn(n, k, device="cuda").t() if col_major else torch.randn(k, n, device="cuda")).to(dtype)
bias = torch.randn(m, device="cuda").to(dtype) if with_bias else None
dense = a.float() @ b.float() + (0 if bias is None else bias.float()[:, None])
dense = dense.t() if transpose else dense

def check(step, **kwargs):
    out = torch._cslt_sparse_mm(packed, b, bias=bias, transpose_result=transpose, **kwargs)
    torch.cuda.synchronize()
    err = ((out.float() - dense).norm() / dense.norm()).item()
    print(f"{step}: rel err {err:.1e}", flush=True)
    assert err < 1e-2, err

packed = torch._cslt_compress(a)
print(f"compressed: {tuple(packed.shape)}", flush=True)
check("alg 0")
alg = library_search(packed, b, bias, transpose)
torch.cuda.synchronize()
print(f"search: alg {alg}", flush=True)
check(f"alg {alg}", alg_id=alg)
print("ok", flush=True)
"""


def run_case(case: tuple) -> tuple[tuple, str]:
    """One case in a fresh process: the last line it printed, or how it ended."""
    args = [str(int(v)) if isinstance(v, bool) else str(v) for v in case]
    try:
        done = subprocess.run([sys.executable, "-c", CASE, *args], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return case, "timed out (120 s)"
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if done.returncode == 0:
        return case, "; ".join(lines)
    error = [line for line in done.stderr.splitlines() if "Error" in line][-1:] or [f"exit {done.returncode}"]
    return case, "; ".join(lines) + " -> FAILED after that: " + error[0][:200]


def main() -> None:
    """Runs every case, ``--jobs`` at a time, and prints the table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cslt_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=positive_int, default=4)
    jobs = parser.parse_args().jobs
    if not torch.cuda.is_available():
        sys.exit("benchmarks.cslt_probe needs CUDA and cuSPARSELt")
    cases = [
        (*shape, dtype, col_major, bias, transpose)
        for shape, dtype in itertools.product(SHAPES, DTYPES)
        for col_major, bias, transpose in itertools.product((False, True), repeat=3)
    ]
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        results = dict(pool.map(run_case, cases))
    print("| m, k, n | dtype | b | bias | result | outcome |")
    print("|---|---|---|---|---|---|")
    for case in cases:
        m, k, n, dtype, col_major, bias, transpose = case
        print(
            f"| {m}, {k}, {n} | {dtype} | {'column-major' if col_major else 'row-major'} | {'yes' if bias else 'no'} "
            f"| {'transposed' if transpose else 'row-major'} | {results[case]} |"
        )


if __name__ == "__main__":
    main()
