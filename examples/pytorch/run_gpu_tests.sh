#!/usr/bin/env bash
# lce_torch on the GPU machine, in one command from the repository root:
#
#   bash examples/pytorch/run_gpu_tests.sh [pytest arguments]
#
# 1. installs the peers' wheels carried in .whl/batch-* (examples/pytorch/tools/peer_wheels.sh):
#    every batch is stashed in $WHEEL_STASH (default /tmp/lce-wheels, kept while the machine
#    stays warm), split wheels are put back together once all their parts have arrived, and
#    the complete ones go to /tmp/peers/site-packages (on PYTHONPATH: quack fingerprints its
#    epilogues and takes code under a site-packages directory as installed; below any other
#    path it hashes cutlass's globals and fails to trace);
# 2. builds the extension in place (setup.py build_ext --inplace, all cores);
# 3. runs the pytest suite (examples/pytorch/tests; PYTEST=0 skips it); test_distributed.py and
#    test_fsdp_ddp.py run there with one-rank groups they make themselves, and again with
#    TORCHRUN=<k> ranks (k GPUs) under torchrun --nproc_per_node=<k> (log: torchrun.log);
# 4. with TINY_LM=1, runs examples/pytorch/train_tiny_lm.py (TINY_LM_ARGS adds arguments) and
#    keeps its log and PNG;
# 5. with PEERS=quick (one small shape) or PEERS=full (the shapes of bench/lce_bench.cu, every
#    data family), runs bench/peers.py and writes peers.csv (PEERS_ARGS adds arguments).
# Logs and the CSV go to $OUT (the device tool sets it) or build-pytorch/. The exit status is
# the build's, else pytest's, else peers.py's.
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
py=${PYTHON:-python3}
out=${OUT:-$root/build-pytorch}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

stash=${WHEEL_STASH:-/tmp/lce-wheels}
site=/tmp/peers/site-packages
if compgen -G "$root/.whl/batch-*/*" >/dev/null; then
  mkdir -p "$stash"
  cp "$root"/.whl/batch-*/* "$stash"/
fi
if [[ -d $stash ]]; then
  for first in "$stash"/*.whl.part-00; do
    [[ -e $first ]] || continue
    wheel=${first%.part-00}
    cat "$wheel".part-* >"$wheel.joined"
    check='import sys, zipfile; zipfile.ZipFile(sys.argv[1]).testzip()'
    if "$py" -c "$check" "$wheel.joined" 2>/dev/null; then
      mv "$wheel.joined" "$wheel" && rm -f "$wheel".part-*
    else
      rm -f "$wheel.joined"
      echo "run_gpu_tests: $(basename "$wheel"): parts missing; carry the other batches" >&2
    fi
  done
  if compgen -G "$stash/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" "$stash"/*.whl && export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
    # pip --target does not run .pth files; nvidia-cutlass-dsl's one puts its packages on the path
    if [[ -d $site/nvidia_cutlass_dsl/dsl_packages ]]; then
      export PYTHONPATH=$site/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH
    fi
  fi
fi

echo "run_gpu_tests: building lce_torch (log: $out/build.log)"
if ! (cd "$root/examples/pytorch" &&
      MAX_JOBS=${MAX_JOBS:-$(nproc)} "$py" setup.py build_ext --inplace) \
    >"$out/build.log" 2>&1; then
  tail -n 80 "$out/build.log"
  exit 1
fi

cd "$root"
status=0
if [[ ${PYTEST:-1} != 0 ]]; then
  "$py" -m pytest examples/pytorch/tests -q -rs -p no:cacheprovider "$@" 2>&1 | tee "$out/pytest.log"
  status=${PIPESTATUS[0]}
fi

if [[ ${TORCHRUN:-0} -gt 1 ]]; then
  "$py" -m torch.distributed.run --standalone --nproc_per_node="$TORCHRUN" -m pytest \
    examples/pytorch/tests/test_distributed.py examples/pytorch/tests/test_fsdp_ddp.py -q -rs \
    -p no:cacheprovider "$@" 2>&1 | tee "$out/torchrun.log"
  torchrun_status=${PIPESTATUS[0]}
  ((status == 0)) && status=$torchrun_status
fi

if [[ ${TINY_LM:-0} == 1 ]]; then
  # shellcheck disable=SC2086
  "$py" examples/pytorch/train_tiny_lm.py --out "$out/tiny_lm_loss.png" ${TINY_LM_ARGS:-} 2>&1 |
    tee "$out/tiny_lm.log"
  tiny_status=${PIPESTATUS[0]}
  ((status == 0)) && status=$tiny_status
fi

case ${PEERS:-none} in
  quick) peers_args=(--quick) ;;
  full) peers_args=() ;;
  *) exit "$status" ;;
esac
# shellcheck disable=SC2086
"$py" bench/peers.py "${peers_args[@]}" ${PEERS_ARGS:-} --csv "$out/peers.csv" 2>&1 |
  tee "$out/peers.log"
peers_status=${PIPESTATUS[0]}
((status != 0)) && exit "$status"
exit "$peers_status"
