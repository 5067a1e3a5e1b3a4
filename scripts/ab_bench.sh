#!/usr/bin/env bash
# A/B timing of the library against an older commit, in one device call (both builds in one
# process lifetime of the machine, interleaved runs). Prepare here, run there:
#   here:   git archive <ref> | (rm -rf ab-base && mkdir ab-base && tar -x -C ab-base)
#   device: BENCH_FILTER='<regex>' [RUNS=2] [BUDGETS=160,205] bash scripts/ab_bench.sh
#           (carry [".deps", "ab-base"]; ab-base is ignored by git, so name it in carry)
# Prints, per run and build, every matching lce_bench row's median_ms and ratio_to_floor.
# BUDGETS sets LCE_BENCH_VOCAB_BUDGETS for this tree's build only (older builds lack it).
# AB_TREES="ab-base ab-other" compares several ignored trees (each carried) with this one.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${OUT:-$root/gpu-out}
mkdir -p "$out"
export LD_LIBRARY_PATH="$root/.deps/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
read -r -a trees <<<"${AB_TREES:-ab-base}"
for t in "${trees[@]}"; do
  [[ -d $t ]] || { echo "ab_bench: no $t/ (see the header)" >&2; exit 2; }
done
build() {
  cmake -S "$1" -B "$2" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$root/.deps/usr" \
    -DCMAKE_CUDA_ARCHITECTURES=90a >"$out/configure-$(basename "$2").log" 2>&1 &&
    cmake --build "$2" --target lce_bench -j$((16 / (${#trees[@]} + 1))) \
      >"$out/build-$(basename "$2").log" 2>&1
  echo "build $2: rc=$?"
}
builds=()
for t in "${trees[@]}"; do
  build "$t" "build-$t" &
  builds+=("build-$t")
done
build . build-gpu &
builds+=(build-gpu)
wait
filter=${BENCH_FILTER:?set BENCH_FILTER}
for ((i = 1; i <= ${RUNS:-2}; ++i)); do
  for b in "${builds[@]}"; do
    echo "== $b, run $i"
    budgets=""
    [[ $b == build-gpu ]] && budgets=${BUDGETS:-}
    LCE_BENCH_VOCAB_BUDGETS=$budgets "$b/bench/lce_bench" --benchmark_filter="$filter" \
      --benchmark_counters_tabular=true 2>&1 | grep -E "^(fwd|bwd|fwdbwd)/" |
      awk '{print $1, "median_ms=" $(NF-1), "ratio=" $NF}'
  done
done
