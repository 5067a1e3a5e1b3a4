#!/usr/bin/env bash
# One device call that verifies a tree: the C++ GPU suites (scripts/gpu_run.sh test, NCCL
# one-rank test included when NCCL is found) and the PyTorch suite with the worked example
# (examples/pytorch/run_gpu_tests.sh, TINY_LM=1) built and run side by side (correctness only:
# no timing is read from this call). Every log goes into $OUT/logs.tgz (the device tool brings
# back at most 8 files); the summaries are printed.
#   env: VERIFY_S (seconds for both parts, default 540), BUILD_TARGETS and GPU_TEST_ARGS as
#        gpu_run.sh's (default: every gpu_* suite built, all but gpu_huge run; GPU_TEST_ARGS=
#        runs gpu_huge too), PYTEST_ARGS (pytest arguments),
#        SANITIZE=1 also runs gpu_run.sh's compute-sanitizer step after the tests.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${OUT:-$root/gpu-out}
mkdir -p "$out"
logs=$(mktemp -d)
mkdir -p "$logs/cpp" "$logs/py"
budget=${VERIFY_S:-540}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
# NCCL for lce::nccl's one-rank test: the nvidia-nccl package that PyTorch brings
NCCL_ROOT=${NCCL_ROOT:-$(python3 -c "import nvidia.nccl as m; print(list(m.__path__)[0])" 2>/dev/null)}
export NCCL_ROOT

steps="test"
[[ ${SANITIZE:-0} == 1 ]] && steps="test sanitize"
(
  export OUT=$logs/cpp
  export BUILD_TARGETS=${BUILD_TARGETS:-"gpu_forward gpu_backward gpu_forward_backward gpu_options gpu_robustness gpu_fuzz gpu_arch_fallback gpu_no_kernel_image gpu_huge nccl_one_rank nccl_vocab_parallel"}
  # set but empty (GPU_TEST_ARGS=) runs every suite, gpu_huge included
  export GPU_TEST_ARGS=${GPU_TEST_ARGS-"-E gpu_huge"}
  # shellcheck disable=SC2086
  timeout "$budget" bash scripts/gpu_run.sh $steps >"$logs/cpp/stdout.log" 2>&1
  echo "cpp: rc=$?" >>"$logs/cpp/stdout.log"
) &
(
  export OUT=$logs/py MAX_JOBS=8 TINY_LM=1
  # shellcheck disable=SC2086
  timeout "$budget" bash examples/pytorch/run_gpu_tests.sh ${PYTEST_ARGS:-} \
    >"$logs/py/stdout.log" 2>&1
  echo "py: rc=$?" >>"$logs/py/stdout.log"
) &
wait
echo "== C++"
tail -n 25 "$logs/cpp/stdout.log"
echo "== PyTorch"
grep -E "passed|failed|error|Error|skipped" "$logs/py/pytest.log" 2>/dev/null | tail -n 25
tail -n 12 "$logs/py/stdout.log"
tar -czf "$out/logs.tgz" -C "$logs" .
