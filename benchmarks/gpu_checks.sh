#!/usr/bin/env bash
# The GPU checks of docs/benchmarks.md in one call of a lent CUDA machine (stage limits add up to 9 min
# 10 s; not yet timed on a GPU).
#
# Runs in the repository root under the machine's own python3 (its torch and triton; nothing can be
# installed there): installs nmcompile without dependencies, then, each stage with its own time
# limit so that a slow one cannot take the rest with it:
#   1. the CUDA-only tests (they skip in CI);
#   2. python -m benchmarks.step --device cuda --size full, FFN block (step and per-GEMM rows);
#   3. the same for the ResNet block;
#   4. the kernel and 2:4 test files on CUDA tensors.
# Logs and JSON go to $OUT (the device tool brings them back), or to ./gpu-checks without it.
# Usage: bash benchmarks/gpu_checks.sh [python]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
OUT=${OUT:-gpu-checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

stage() {  # stage NAME SECONDS COMMAND...: run COMMAND under a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: rc=$rc in $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/stages.txt"
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    "$PY" -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__,
torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# An editable install maps passes/ to nmcompile.passes; where pip cannot build one, a link does.
if ! "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1; then
    echo "pip install -e failed (see install.log): linking nmcompile/passes and using PYTHONPATH" | tee -a "$OUT/stages.txt"
    ln -sfn ../passes nmcompile/passes
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

CUDA_TESTS=(
    "tests/test_kernels.py::test_real_sizes_on_cuda"
    "tests/test_lowering.py::test_auto_lowers_on_cuda_under_autocast"
    "tests/test_sparse24.py::test_semi_structured_mm_on_cuda"
    "tests/test_sparse24.py::test_searched_alg_gives_the_same_product_on_cuda"
    "tests/test_sparse24.py::test_sparse24_trains_like_portable_on_cuda"
)
stage cuda_tests 150 "$PY" -m pytest -q -p no:cacheprovider -rA "${CUDA_TESTS[@]}"
stage bench_ffn 200 "$PY" -m benchmarks.step --device cuda --size full --block ffn --json "$OUT/ffn.json"
stage bench_resnet 100 "$PY" -m benchmarks.step --device cuda --size full --block resnet --json "$OUT/resnet.json"
stage kernel_tests 100 "$PY" -m pytest -q -p no:cacheprovider -x tests/test_kernels.py tests/test_sparse24.py

echo
cat "$OUT/stages.txt"
for log in cuda_tests kernel_tests; do
    echo "== $log"
    grep -E "passed|failed|skipped|error|PASSED|FAILED|ERROR" "$OUT/$log.log" | tail -n 12
done
for log in bench_ffn bench_resnet; do
    echo "== $log"
    sed -n '/^## Training step/,$p' "$OUT/$log.log"
done
