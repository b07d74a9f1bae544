#!/usr/bin/env bash
# Everything that needs a GPU, in one go: the CUDA tests of every package, then the GPU reports.
#   bash bench/run_gpu_suite.sh OUTDIR [ops|buffer|credit|train|tune ...]   (default: all)
# Run from the repository root with otca_fast importable (installed, or PYTHONPATH=.: the link
# otca_fast/kernels -> ../kernels makes the Triton kernels otca_fast.kernels).
set -uo pipefail
out=${1:?usage: run_gpu_suite.sh OUTDIR [parts...]}
shift
parts=${*:-"tests ops buffer credit tune train"}
mkdir -p "$out"
status=0
run() {  # name, command...
    local name=$1
    shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "!! $name exited $rc"; status=1; }
}
for part in $parts; do
    case $part in
        tests) run gpu_tests python3 -m pytest -q -p no:cacheprovider -rs tests/test_ops_gpu.py tests/test_ops_validation.py \
                   tests/test_buffer.py tests/test_credit_trajectory.py tests/test_models.py tests/test_rewards.py \
                   tests/test_rewards_models.py -k "gpu or cuda or GPU or CUDA" ;;
        ops) run gpu_report python3 bench/gpu_report.py --json "$out/gpu_report.json" ;;
        buffer) run gpu_buffer_report python3 bench/gpu_buffer_report.py --markdown "$out/buffer_gpu.md" ;;
        credit) run gpu_credit_report python3 bench/gpu_credit_report.py --json "$out/gpu_credit_report.json" ;;
        tune) run tune_block python3 bench/tune_block.py ;;
        train) run gpu_train_report python3 bench/gpu_train_report.py ;;
        *) echo "unknown part $part"; status=1 ;;
    esac
done
exit $status
