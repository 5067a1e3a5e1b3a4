#!/usr/bin/env bash
# Downloads the wheels of lce's peers for an offline GPU machine into .whl/ at the repository
# root (ignored by git), in batches of at most 56 MiB: a device call carries 64 MiB at most,
# working tree included, so each batch travels in its own call (carry ".whl/batch-1", then
# ".whl/batch-2", ...), and examples/pytorch/run_gpu_tests.sh stashes them on the machine until
# every part of a split wheel is there.
#
#   bash examples/pytorch/tools/peer_wheels.sh            # Liger-Kernel, CCE: one batch
#   CUTEDSL=1 bash examples/pytorch/tools/peer_wheels.sh  # + quack-kernels, CuTe DSL: two
#   HF=1 bash examples/pytorch/tools/peer_wheels.sh       # + transformers and its dependencies
#                                                         #   (tests/test_hf.py; ~45 MiB)
#
# The versions are the ones bench/peers.py was written against. Target: CPython 3.12,
# manylinux x86_64, CUDA 13 (PYVER overrides the Python version). --no-deps: torch, triton,
# cuda-bindings, einops and protobuf are on the GPU machine already.
set -euo pipefail
root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
dest=$root/.whl
pyver=${PYVER:-3.12}
limit=$((56 << 20))
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

wheels=(liger-kernel==0.8.5 cut-cross-entropy==25.1.1)
if [[ ${CUTEDSL:-0} == 1 ]]; then
  cv=${CUTEDSL_VERSION:-4.7.1}  # quack-kernels 0.6.5 asks for >= 4.7 (4.8.1 and liger 0.8.5 ran too)
  wheels+=(quack-kernels==0.6.5 nvidia-cutlass-dsl=="$cv" nvidia-cutlass-dsl-libs-base=="$cv"
           nvidia-cutlass-dsl-libs-core=="$cv" nvidia-cutlass-dsl-libs-cu13=="$cv"
           apache-tvm-ffi torch-c-dlpack-ext)  # einops, protobuf: on the GPU machine already
fi
pip download --quiet --no-deps --only-binary=:all: --python-version "$pyver" \
  --platform manylinux_2_28_x86_64 -d "$tmp" "${wheels[@]}"
if [[ ${HF:-0} == 1 ]]; then
  # With its dependencies (tokenizers, huggingface-hub, ...), less those torch brings along:
  # a second numpy or typing_extensions on PYTHONPATH would shadow the machine's own.
  pip download --quiet --only-binary=:all: --python-version "$pyver" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$tmp" \
    -r "$root/examples/pytorch/tests/requirements-hf.txt"
  rm -f "$tmp"/numpy-* "$tmp"/typing_extensions-* "$tmp"/filelock-* "$tmp"/fsspec-*
fi

# Wheels over the limit are cut into parts (name.whl.part-00, -01, ...; cat restores them).
for w in "$tmp"/*.whl; do
  if (($(stat -c %s "$w") > limit)); then
    split -b "$limit" -d "$w" "$w.part-"
    rm "$w"
  fi
done

# First-fit batches of at most `limit` bytes.
rm -rf "$dest"
mkdir -p "$dest"
batch=1
used=0
for f in $(ls -S "$tmp"); do
  size=$(stat -c %s "$tmp/$f")
  if ((used + size > limit)); then
    batch=$((batch + 1))
    used=0
  fi
  mkdir -p "$dest/batch-$batch"
  mv "$tmp/$f" "$dest/batch-$batch/"
  used=$((used + size))
done
for b in "$dest"/batch-*; do
  echo "$(du -sh "$b" | cut -f1)  ${b#"$root"/}: $(ls "$b" | tr '\n' ' ')"
done
