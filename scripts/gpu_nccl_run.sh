#!/usr/bin/env bash
# One call on a lent multi-GPU machine for the vocabulary-parallel layer (issue 6): configure
# and build the NCCL targets for sm_90a against .deps (../shared/tools/gpu-deps.sh), run the
# NCCL tests (2 GPUs: nccl_vocab_parallel; skipped with fewer), the example through its
# launcher on every visible GPU, and the scaling benchmark on 1, 2 and 4 GPUs (those present);
# logs go to $OUT, a short table is printed last.
#   usage: scripts/gpu_nccl_run.sh [all|test|example|bench]...   (default: all)
#   env:   BUILD_DIR (build-gpu), TEST_FILTER (Catch2 spec for nccl_vocab_parallel, default all),
#          EXAMPLE_ARGS (default: the Gemma 2 head, uneven shards), BENCH_ARGS
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
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
summary+=("$gpus GPU(s): $(nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | xargs)")

# Files that come back from $OUT: build.log, ctest-nccl.log, nccl-results.txt, example.log,
# bench.log, summary.txt.
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$root/.deps/usr" \
  -DCMAKE_CUDA_ARCHITECTURES=90a >"$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
summary+=("$(grep -m1 'lce: NCCL' "$out/build.log")")
start=$SECONDS
cmake --build "$build" -j"$(nproc)" --target nccl_contract nccl_vocab_parallel vocab_parallel \
  vocab_parallel_bench lce_nccl_header_check >>"$out/build.log" 2>&1 ||
  { grep -E "error|Error" "$out/build.log" | head -40; exit 1; }
summary+=("build (NCCL targets): ok in $((SECONDS - start)) s")

if has test; then
  start=$SECONDS
  if [[ -n ${TEST_FILTER:-} ]]; then  # a subset: the executable directly
    "$build/test/nccl_vocab_parallel" "$TEST_FILTER" >"$out/ctest-nccl.log" 2>&1
  else
    ctest --test-dir "$build" -L nccl --output-on-failure >"$out/ctest-nccl.log" 2>&1
  fi
  rc=$?
  summary+=("nccl tests: rc=$rc, $(grep -E 'tests passed|tests failed' "$out/ctest-nccl.log" | tail -1) ($((SECONDS - start)) s)")
  grep -h '^RESULT' "$build"/Testing/Temporary/LastTest.log "$out/ctest-nccl.log" 2>/dev/null |
    sort -u >"$out/nccl-results.txt"
  summary+=("  RESULT lines: $(wc -l <"$out/nccl-results.txt"), worst errors: $(
    awk '{for (i = 1; i <= NF; i++) if ($i ~ /^(loss|lse|dx|dw|db)=/) { split($i, kv, "=");
         if (kv[2] != "-" && kv[2] + 0 > worst[kv[1]]) worst[kv[1]] = kv[2] + 0 } }
         END { for (k in worst) printf "%s=%.2e ", k, worst[k] }' "$out/nccl-results.txt")")
  [[ $rc -ne 0 ]] && grep -E "FAILED|failed|REQUIRE|with expansion" -A3 "$out/ctest-nccl.log" | head -60
fi

if has example; then
  launcher=examples/vocab_parallel/launch.sh
  exe="$build/examples/vocab_parallel"
  { echo "=== launch.sh ${EXAMPLE_ARGS:---uneven}"
    timeout 300 "$launcher" "$exe" ${EXAMPLE_ARGS:---uneven}
    echo "rc=$?"
    echo "=== launch.sh --n 4096 --reduce-scatter --dtype fp16"
    timeout 300 "$launcher" "$exe" --n 4096 --reduce-scatter --dtype fp16
    echo "rc=$?"; } >"$out/example.log" 2>&1
  summary+=("example (launch.sh, $gpus ranks): $(grep -c '^rc=0' "$out/example.log")/2 runs rc=0; $(
    grep -m1 'single-GPU' "$out/example.log")")
  grep '^\[rank' "$out/example.log" | cut -c1-250
fi

if has bench; then
  timeout 540 "$build/bench/vocab_parallel_bench" ${BENCH_ARGS:-} >"$out/bench.log" 2>&1
  summary+=("bench: rc=$?")
  cat "$out/bench.log"
fi

printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
