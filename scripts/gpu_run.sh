#!/usr/bin/env bash
# One call on the lent GPU machine: configure and build for sm_90a against .deps (Catch2 and
# Google Benchmark packed by ../shared/tools/gpu-deps.sh), run the gpu-labelled tests,
# compute-sanitizer on the small GPU tests, the example and the benchmarks; logs go to $OUT,
# a short table is printed last.
#   usage: scripts/gpu_run.sh [all|test|bench|example|sanitize|pytorch|focus|sass|profile]...
#          (default: all; pytorch, focus, sass and profile run only when named)
#   env:   BENCH_FILTER (Google Benchmark filter), EXAMPLE_ARGS, SANITIZE_FILTER (Catch2
#          test spec that replaces every executable's selection under compute-sanitizer),
#          SANITIZE_TOOLS (default: memcheck racecheck initcheck synccheck), BUILD_DIR,
#          BUILD_TARGETS (default: all targets).
#          GPU_TEST_ARGS: extra ctest arguments of the test step, e.g. "-E gpu_huge" to
#          leave the [huge] sizes out (ctest -R gpu_huge runs them alone).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${OUT:-$root/gpu-out}
mkdir -p "$out"
build=${BUILD_DIR:-build-gpu}
steps=${*:-all}
has() { [[ " $steps " == *" all "* || " $steps " == *" $1 "* ]]; }
export LD_LIBRARY_PATH="$root/.deps/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
summary=()

# At most 8 files come back from $OUT: build.log, ctest-gpu.log, results.txt, sanitize.log,
# example.log, bench.log, pytest.log, summary.txt.
summary+=("$(nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader)")
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$root/.deps/usr" \
  -DCMAKE_CUDA_ARCHITECTURES=90a >"$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
start=$SECONDS
# shellcheck disable=SC2086
cmake --build "$build" -j16 ${BUILD_TARGETS:+--target $BUILD_TARGETS} >>"$out/build.log" 2>&1 || { grep -E "error|Error" "$out/build.log" | head -40; exit 1; }
summary+=("build: ok in $((SECONDS - start)) s")

if has test; then
  start=$SECONDS
  # shellcheck disable=SC2086
  ctest --test-dir "$build" -L gpu --output-on-failure -j2 ${GPU_TEST_ARGS:-} >"$out/ctest-gpu.log" 2>&1
  rc=$?
  summary+=("gpu tests: rc=$rc, $(grep -E 'tests passed|tests failed' "$out/ctest-gpu.log" | tail -1) ($((SECONDS - start)) s)")
  grep -h '^RESULT' "$build"/Testing/Temporary/LastTest.log >"$out/results.txt" 2>/dev/null || true
  [[ $rc -ne 0 ]] && grep -E "FAILED|failed|REQUIRE|with expansion" -A3 "$out/ctest-gpu.log" | head -60
fi

if [[ " $steps " == *" focus "* ]]; then
  # One test executable (FOCUS_TEST, default gpu_forward) with a Catch2 filter, time-boxed:
  # the quick check of a new kernel before the whole suite.
  exe=$(find "$build" -type f -name "${FOCUS_TEST:-gpu_forward}" -perm -u+x | head -1)
  start=$SECONDS
  timeout "${FOCUS_TIMEOUT_S:-180}" "$exe" "${FOCUS_FILTER:-*}" >"$out/focus.log" 2>&1
  rc=$?
  summary+=("focus ${FOCUS_TEST:-gpu_forward} '${FOCUS_FILTER:-*}': rc=$rc, $(grep -E 'test cases' "$out/focus.log" | tail -1) ($((SECONDS - start)) s)")
  grep -h '^RESULT' "$out/focus.log" >>"$out/results.txt" 2>/dev/null || true
  [[ $rc -ne 0 ]] && grep -E "FAILED|REQUIRE|with expansion|Timeout|error" -A3 "$out/focus.log" | head -60
fi

if [[ " $steps " == *" sass "* ]]; then
  # Instruction mix of the fused forward kernels (HGMMA = wgmma, HMMA = mma.sync, spills).
  exe=$(find "$build" -type f -name gpu_forward -perm -u+x | head -1)
  cuobjdump -sass "$exe" >"$out/sass.tmp" 2>/dev/null
  awk '/Function :/ {f=$3} /HGMMA|HMMA|LDL|STL|MUFU.EX2|SYNCS|UTMALDG/ {split($2,a,"."); c[f" "a[1]]++}
       END {for (k in c) print c[k], k}' "$out/sass.tmp" | grep fused_forward | sort -k2 >"$out/sass.txt"
  rm -f "$out/sass.tmp"
  summary+=("sass: $(wc -l <"$out/sass.txt") kernel/opcode counts in sass.txt")
fi

if [[ " $steps " == *" profile "* ]]; then
  # Per-kernel time of one lce_bench row under Nsight Compute (hardware counters work on the
  # Firecracker machines; clocks left alone): PROFILE_FILTER picks the row (default: the Gemma 2
  # backward, vocab_chunked), PROFILE_LAUNCHES how many kernel launches to profile after the
  # first PROFILE_SKIP (the floor's GEMMs and the warm-ups come first). First run 2026-11-28
  # with PROFILE_SKIP=0 PROFILE_LAUNCHES=300 (bench/RESULTS.md: where the backward's time goes).
  exe=$(find "$build" -type f -name lce_bench -perm -u+x | head -1)
  start=$SECONDS
  timeout "${PROFILE_TIMEOUT_S:-300}" ncu --clock-control none --metrics gpu__time_duration.sum \
    --launch-skip "${PROFILE_SKIP:-40}" --launch-count "${PROFILE_LAUNCHES:-120}" \
    --print-summary per-kernel \
    "$exe" --benchmark_filter="${PROFILE_FILTER:-bwd/lce/bf16/8192x2304x256000/lm/vocab_chunked/256MiB}" \
    --benchmark_min_time=0.01 >"$out/profile.log" 2>&1
  summary+=("profile: rc=$?, $(grep -c 'gpu__time_duration' "$out/profile.log") kernel summaries ($((SECONDS - start)) s)")
  grep -E "^  [a-zA-Z_].*\(|gpu__time_duration" "$out/profile.log" | cut -c1-160 | head -40
fi

if has sanitize; then
  # Small cases only (LCE_TEST_QUICK trims the robustness variants), each executable with its
  # own selection; the fuzz test runs 12 random cases (memcheck and initcheck only: its kernels
  # are the ones the other selections already race- and sync-check). Target: < 3 min in all.
  export LCE_TEST_QUICK=1
  selection=(
    "gpu_forward|*optional*,*all-ignored*"
    "gpu_backward|*optional*,*all-ignored*"
    "gpu_forward_backward|*optional*,*all-ignored*"
    "gpu_options|*all-ignored*"
    "gpu_robustness|[sanitize]"
    "gpu_fuzz|*"
  )
  start=$SECONDS
  for tool in ${SANITIZE_TOOLS:-memcheck racecheck initcheck synccheck}; do
    for item in "${selection[@]}"; do
      t=${item%%|*}
      filter=${SANITIZE_FILTER:-${item#*|}}
      [[ $t == gpu_fuzz && ( $tool == racecheck || $tool == synccheck ) ]] && continue
      exe=$(find "$build" -type f -name "$t" -perm -u+x | head -1)
      [[ -z $exe ]] && continue
      log="$out/sanitize-$tool-$t.tmp"
      LCE_FUZZ_CASES=12 compute-sanitizer --tool "$tool" --error-exitcode 9 "$exe" "$filter" \
        >"$log" 2>&1
      rc=$?
      summary+=("compute-sanitizer $tool $t: rc=$rc, $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|test cases' "$log" | tr '\n' ' ')")
      { echo "=== $tool $t (rc=$rc)"; tail -40 "$log"; } >>"$out/sanitize.log"
      rm -f "$log"
    done
  done
  summary+=("compute-sanitizer: $((SECONDS - start)) s")
  unset LCE_TEST_QUICK
fi

if has example; then
  exe=$(find "$build" -type f -name lm_head_step -perm -u+x | head -1)
  "$exe" ${EXAMPLE_ARGS:-} >"$out/example.log" 2>&1
  summary+=("example: rc=$? (see example.log)")
  tail -25 "$out/example.log"
fi

if has bench; then
  exe=$(find "$build" -type f -name lce_bench -perm -u+x | head -1)
  "$exe" --benchmark_filter="${BENCH_FILTER:-.}" --benchmark_counters_tabular=true \
    >"$out/bench.log" 2>&1
  summary+=("bench: rc=$?")
  cat "$out/bench.log" | cut -c1-230 | tail -60
fi

if [[ " $steps " == *" pytorch "* && -d examples/pytorch/tests ]]; then
  start=$SECONDS
  (cd examples/pytorch && MAX_JOBS=16 timeout "${PYTORCH_BUILD_S:-200}" python3 setup.py \
    build_ext --inplace) >"$out/pytest.log" 2>&1
  summary+=("PyTorch binding build: rc=$? ($((SECONDS - start)) s)")
  PYTHONUNBUFFERED=1 timeout "${PYTORCH_TEST_S:-300}" python3 -m pytest -q -rs -p no:cacheprovider \
    examples/pytorch/tests >>"$out/pytest.log" 2>&1
  summary+=("pytest (PyTorch binding): rc=$?, $(tail -1 "$out/pytest.log") ($((SECONDS - start)) s)")
  tail -15 "$out/pytest.log"
fi

printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
