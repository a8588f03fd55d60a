#!/usr/bin/env bash
# The GPU checks of docs/benchmarks.md in one call of a lent CUDA machine (the default stages' limits add
# up to 555 s: run it with timeout_s 600 as a session's first device call).
#
# Runs in the repository root under the machine's own python3 (its torch and triton; nothing can be
# installed there): installs nmcompile without dependencies, then runs the stages named in STAGES, each
# under its own time limit so that a slow one cannot take the rest with it:
#   cslt_dump     python -m benchmarks.cslt_dump: the library's own 2:4 compression of known operands,
#                 saved to $OUT/cslt_layout.pt for working out the GPU's cuSPARSELt layout on a CPU;
#   cuda_tests    the CUDA-only tests (they skip in CI) and the kernel tests that matter most on CUDA
#                 tensors, each test in a pytest process of its own;
#   parts24       python -m benchmarks.parts24: each piece of the 2:4 ops timed alone;
#   late_tests    tests written after the last GPU run whose tensors go to CUDA there: every GPU tile of
#                 every kernel, reads past the operands, two runs bitwise identical (in one process
#                 and in two), the GEMMs' fixed tile under deterministic mode, the MVUE rules at
#                 interval ends and on blocks that sum to NaN or inf, layers in plain and selective
#                 activation-checkpoint regions on the kernels;
#   bench_resnet  the step benchmark for the ResNet block;
#   split         python -m benchmarks.split: fused Triton GEMMs against operand + cuBLAS at 128, 512
#                 and 2048 tokens;
#   bench_steps   the step benchmark's FFN rows (no per-GEMM rows);
#   and, only when named: bench_ffn (the FFN step and per-GEMM rows, 190 s), cslt_probe (python -m
#   benchmarks.cslt_probe: which cuSPARSELt products and searches this GPU runs) and bench_graphs
#   (the FFN step rows under torch.compile's mode="reduce-overhead": CUDA graphs around the sparse
#   ops, which stay out of them).
# STAGES (default "cslt_dump cuda_tests parts24 bench_steps") picks and orders the stages, so a
# second device call can run what the first left out: STAGES="late_tests bench_resnet split bench_graphs".
# Logs, the FFN JSON and the layout dump go to $OUT (the device tool brings back 8 files: env.txt,
# stages.txt and at most 6 more), or to ./gpu-checks without it.
# Usage: [STAGES="..."] bash benchmarks/gpu_checks.sh [python]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
STAGES=${STAGES:-"cslt_dump cuda_tests parts24 bench_steps"}
OUT=${OUT:-gpu-checks}
KNOWN="cslt_dump cuda_tests late_tests cslt_probe bench_ffn bench_steps split parts24 bench_resnet bench_graphs"
for name in $STAGES; do  # a misspelt stage stops the run before any device time is spent
    [[ " $KNOWN " == *" $name "* ]] || { echo "unknown stage $name in STAGES=\"$STAGES\" (known: $KNOWN)" >&2; exit 2; }
done
mkdir -p "$OUT"
for name in $KNOWN; do rm -f "$OUT/$name.log"; done
: >"$OUT/stages.txt"  # this run's stages only (./gpu-checks may hold an earlier run's)
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
if ! "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . >/tmp/nmcompile-install.log 2>&1; then
    tail -n 5 /tmp/nmcompile-install.log; echo "pip install -e failed: linking nmcompile/passes and using PYTHONPATH" | tee -a "$OUT/stages.txt"
    ln -sfn ../passes nmcompile/passes
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

# The CUDA tests run each under a per-test limit (pytest-timeout). On an H200
# (2026-12-04) a first real-size test compiles and autotunes its kernels for over 45 s, the FFN stage
# took 160 s and the ResNet one 51 s: the limits below leave room for that.
# Each test runs in a pytest process of its own: a kernel fault ends a process's CUDA context, and
# on the H200 (2026-12-04) one such fault turned every later test of the same process into an error.
# The tests that never ran on a GPU first, then the 2:4 library ones, then the many-compile kernel
# tests (run 4's stage ran out in test_real_sizes_on_cuda, over 100 s on its own, before the last two).
CUDA_TESTS=(
    "tests/test_sparse24.py::test_backward_operand_is_w_times_b_in_place"
    "tests/test_recipes.py::test_decay_steps_on_cuda_do_not_synchronise"
    "tests/test_lowering.py::test_auto_lowers_on_cuda_under_autocast"
    "tests/test_compress24.py::test_compress24_multiplies_as_the_library_compression_on_cuda"
    "tests/test_sparse24.py::test_semi_structured_mm_on_cuda"
    "tests/test_sparse24.py::test_searched_alg_gives_the_same_product_on_cuda"
    "tests/test_sparse24.py::test_sparse24_trains_like_portable_on_cuda"
    "tests/test_kernels.py::test_real_sizes_on_cuda"
    "tests/test_kernels.py::test_mvue_prune_matches_portable_op"
    "tests/test_kernels.py::test_nm_mask_every_tie_pattern_of_groups_of_four"
    "tests/test_kernels.py::test_nm_mask_tie_heavy_groups_of_other_sizes"
    "tests/test_kernels.py::test_split_ops_at_real_sizes_on_cuda"
    "tests/test_kernels.py::test_permutation_scores_exact"
    "tests/test_kernels.py::test_portable_mvue_op_on_cuda_prunes_as_on_the_cpu"
)
# Written after run 4 (2026-12-04), never run on a GPU: each GPU tile as a kernel's only config against
# the autotuned launch (30 compiles), operands as views into NaN-padded buffers, two runs under
# torch.use_deterministic_algorithms, bit for bit, and the MVUE 2:4 rules at interval ends and on NaN;
# then (2026-12-06) the MVUE rules on blocks that sum to NaN or inf, and layers in plain and selective
# activation-checkpoint regions on the kernels; (2026-12-07) perm_swaps' sweeps on CUDA tensors.
LATE_TESTS=(
    "tests/test_kernels.py::test_every_gpu_tile_gives_the_interpreter_tiles_results"
    "tests/test_kernels.py::test_kernels_read_nothing_past_their_operands"
    "tests/test_recipes.py::test_deterministic_algorithms_make_two_runs_bitwise_identical"
    "tests/test_kernels.py::test_gemms_run_their_first_config_untimed_under_deterministic_algorithms"
    "tests/test_recipes.py::test_resume_in_a_new_process_is_bitwise_identical"
    "tests/test_kernels.py::test_mvue24_rules_match_the_reference_at_uniforms_beside_every_interval_end"
    "tests/test_kernels.py::test_mvue_prune_keeps_the_sum_of_a_non_finite_block_at_its_first_entry"
    "tests/test_kernels.py::test_weight_grad_with_mvue_keeps_an_overflowed_dy_column_non_finite"
    "tests/test_lowering.py::test_checkpoint_regions_on_cuda_lower_and_train_as_portable"
    "tests/test_kernels.py::test_search_with_swaps_on_the_device_as_on_the_cpu"
)
# shellcheck disable=SC2016  # expanded by the inner bash
EACH_TEST='py=$1; limit=$2; shift 2; rc=0; for t in "$@"; do "$py" -m pytest -q -p no:cacheprovider -rA $limit "$t" || rc=1; done; exit $rc'
# The per-test limit where pytest-timeout is installed (the GPU image has it; a CPU dry run may not).
PER_TEST=$("$PY" -c "import pytest_timeout" 2>/dev/null && echo "--timeout 200")

for name in $STAGES; do
    case $name in
        cuda_tests) stage cuda_tests 320 bash -c "$EACH_TEST" each_test "$PY" "$PER_TEST" "${CUDA_TESTS[@]}" ;;
        late_tests) stage late_tests 270 bash -c "$EACH_TEST" each_test "$PY" "$PER_TEST" "${LATE_TESTS[@]}" ;;
        cslt_probe) stage cslt_probe 60 "$PY" -m benchmarks.cslt_probe --jobs 12 ;;
        cslt_dump) stage cslt_dump 30 "$PY" -m benchmarks.cslt_dump "$OUT/cslt_layout.pt" ;;
        bench_steps)
            stage bench_steps 120 "$PY" -m benchmarks.step --device cuda --size full --block ffn --no-gemm --json "$OUT/ffn.json" ;;
        bench_ffn) stage bench_ffn 190 "$PY" -m benchmarks.step --device cuda --size full --block ffn --json "$OUT/ffn.json" ;;
        split) stage split 60 "$PY" -m benchmarks.split --tokens 128 512 2048 ;;
        parts24) stage parts24 85 "$PY" -m benchmarks.parts24 ;;
        bench_resnet) stage bench_resnet 70 "$PY" -m benchmarks.step --device cuda --size full --block resnet ;;
        bench_graphs)
            stage bench_graphs 150 "$PY" -m benchmarks.step --device cuda --size full --block ffn --mode reduce-overhead --no-gemm ;;
    esac
done

echo
cat "$OUT/stages.txt"
for log in cuda_tests late_tests; do
    [[ -f "$OUT/$log.log" ]] || continue
    echo "== $log"
    grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed|skipped|error)|Timeout" "$OUT/$log.log" | tail -n 40
done
for log in cslt_probe split parts24; do
    [[ -f "$OUT/$log.log" ]] || continue
    echo "== $log"
    grep -E "^\|" "$OUT/$log.log"
done
for log in bench_ffn bench_steps bench_resnet bench_graphs; do
    [[ -f "$OUT/$log.log" ]] || continue
    echo "== $log"
    sed -n '/^## Training step/,$p' "$OUT/$log.log"
done
