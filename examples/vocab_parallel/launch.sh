#!/usr/bin/env bash
# Starts one vocab_parallel process per visible GPU of this node, with RANK, WORLD_SIZE,
# LOCAL_RANK and the rendezvous file LCE_NCCL_ID_FILE in its environment, and waits for them;
# when one fails, the others are stopped. Arguments after the executable go to every process.
#
#   launch.sh [path/to/vocab_parallel] [--n 8192 --d 2304 --v 256000 ...]
#
# Several nodes: run launch.sh on each with NNODES, NODE_RANK and the same LCE_NCCL_ID_FILE on a
# file system every node sees (or the same LCE_NCCL_ID, 256 hex digits, made by any process with
# ncclGetUniqueId). GPUS_PER_NODE overrides the count of visible GPUs (CUDA_VISIBLE_DEVICES or
# nvidia-smi -L).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
exe=vocab_parallel
if [[ $# -gt 0 && $1 != --* ]]; then exe=$1; shift; fi
if [[ $exe != */* ]]; then
  exe=$(command -v "$exe" || find "$here/../.." -type f -name vocab_parallel -perm -u+x | head -1)
fi
[[ -x $exe ]] || { echo "launch.sh: vocab_parallel executable not found" >&2; exit 1; }

if [[ -n ${GPUS_PER_NODE:-} ]]; then
  gpus=$GPUS_PER_NODE
elif [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
  IFS=, read -ra visible <<<"$CUDA_VISIBLE_DEVICES"
  gpus=${#visible[@]}
else
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
fi
[[ $gpus -gt 0 ]] || { echo "launch.sh: no GPU visible" >&2; exit 1; }
nnodes=${NNODES:-1}
node_rank=${NODE_RANK:-0}
world=$((nnodes * gpus))

if [[ -z ${LCE_NCCL_ID:-} && -z ${LCE_NCCL_ID_FILE:-} ]]; then
  if [[ $nnodes -gt 1 ]]; then
    echo "launch.sh: with several nodes, set LCE_NCCL_ID_FILE to a path on a shared file system" >&2
    exit 1
  fi
  rendezvous_dir=$(mktemp -d)
  trap 'rm -rf "$rendezvous_dir"' EXIT
  export LCE_NCCL_ID_FILE=$rendezvous_dir/nccl-id
fi
# A stale id from an earlier run would send the other ranks to a dead communicator.
[[ $node_rank -eq 0 && -n ${LCE_NCCL_ID_FILE:-} ]] && rm -f "$LCE_NCCL_ID_FILE"

pids=()
for ((i = 0; i < gpus; i++)); do
  RANK=$((node_rank * gpus + i)) WORLD_SIZE=$world LOCAL_RANK=$i "$exe" "$@" &
  pids+=($!)
done
status=0
for ((left = ${#pids[@]}; left > 0; left--)); do
  wait -n  # any of the ranks (the only children of this shell)
  rc=$?
  if [[ $rc -ne 0 && $status -eq 0 ]]; then
    status=$rc
    echo "launch.sh: a rank exited with status $rc; stopping the others" >&2
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; done
  fi
done
exit $status
