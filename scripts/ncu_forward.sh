#!/usr/bin/env bash
# The forward kernels under Nsight Compute, one launch each (clocks left alone), and the
# cuBLASLt GEMM of `fwd/cublas` (flat data: its pick may differ from the floor lce's rows are
# divided by; bench/RESULTS.md gives the command that profiles a row's own floor):
# SpeedOfLight, compute workload (tensor pipe), warp state (stall reasons), launch and
# occupancy sections, the wgmma pipe's active cycles and the MUFU
# (XU pipe) instruction count. One log per row under $OUT.
#   usage: scripts/ncu_forward.sh [bench filter]...   (default: Llama 3 and Gemma 2, the lean
#          and softcap forwards, the stored forward inside forward_backward, and fwd/cublas)
#   env:   BUILD_DIR (default build-gpu; lce_bench is built there against .deps),
#          NCU_EXTRA (more ncu arguments, e.g. "--section MemoryWorkloadAnalysis")
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root" || exit 1
out=${OUT:-$root/gpu-out}
build=${BUILD_DIR:-build-gpu}
mkdir -p "$out"
export LD_LIBRARY_PATH="$root/.deps/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$root/.deps/usr" \
  -DCMAKE_CUDA_ARCHITECTURES=90a >"$out/ncu-build.log" 2>&1 &&
  cmake --build "$build" -j16 --target lce_bench >>"$out/ncu-build.log" 2>&1 ||
  { tail -30 "$out/ncu-build.log"; exit 1; }
exe=$(find "$build" -type f -name lce_bench -perm -u+x | head -1)
rows=("$@")
if ((${#rows[@]} == 0)); then
  rows=(fwd/cublas/bf16/8192x4096x128256/ fwd/lce/bf16/8192x4096x128256/lm/
        fwd/cublas/bf16/8192x2304x256000/ fwd/lce/bf16/8192x2304x256000/lm/
        fwd/lce_softcap30/bf16/8192x2304x256000/lm/
        fwdbwd/lce/bf16/8192x4096x128256/lm/stored/)
fi
for row in "${rows[@]}"; do
  # cuBLASLt's rows time 8 heuristic candidates of each floor GEMM first: skip past them.
  if [[ $row == *cublas* ]]; then kernels='regex:nvjet|xmma|cutlass|gemm'; skip=300
  else kernels='regex:fused_forward_sm90'; skip=5; fi
  log="$out/ncu-$(echo "$row" | tr '/' '_' | tr -s '_').log"
  # shellcheck disable=SC2086
  timeout 240 ncu --clock-control none -k "$kernels" --launch-skip "$skip" --launch-count 1 \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats \
    --section LaunchStats --section Occupancy ${NCU_EXTRA:-} \
    --metrics sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_xu.sum,smsp__inst_executed.sum \
    "$exe" --benchmark_filter="^$row" --benchmark_min_time=4 >"$log" 2>&1
  echo "== $row (rc=$?)"
  grep -E "^  [a-zA-Z_].*\(|Duration|Compute \(SM\) Throughput|Memory Throughput|gmma_cycles|pipe_xu|inst_executed.sum|Registers Per|Stall|Achieved Occupancy|Max Bandwidth|Mem Busy|Mem Pipes|L2 Hit|Shared" "$log" | cut -c1-150 | head -28
done
