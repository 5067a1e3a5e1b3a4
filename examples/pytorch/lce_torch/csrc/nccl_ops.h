// nccl_ops.h: what the vocabulary-parallel operators (nccl_ops.cpp, host compiler) and their
// per-element launch files (nccl_ops_<dtype>.cu, nvcc) share. Compiled only when NCCL is found
// (load.py defines LCE_TORCH_WITH_NCCL). Host-only: ATen, nccl.h and lce's host-side types.
#pragma once

#include <nccl.h>

#include <cstdint>

#include "lce_torch.h"

namespace lce_torch {

/// One vocabulary-parallel call, checked by nccl_ops.cpp: `c` as for the single-GPU operators
/// except that c.weight and c.bias are this rank's rows [v_begin, v_end), c.class_weight is the
/// global [V] vector and c.shape.v the global vocabulary size V.
struct shard_call {
  call c;
  ncclComm_t comm = nullptr;
  std::int64_t v_begin = 0, v_end = 0;
  bool scatter_dx = false;  ///< dX reduce-scattered (rows of this rank) instead of all-reduced
};

// Defined once per element type (nccl_ops_fp32.cu, nccl_ops_fp16.cu, nccl_ops_bf16.cu).
#define LCE_TORCH_DECLARE_NCCL_ENTRY_POINTS(suffix)                                    \
  void nccl_forward_##suffix(const shard_call& s, const forward_outputs& out);         \
  void nccl_backward_##suffix(const shard_call& s, const gradients& g);                \
  void nccl_forward_backward_##suffix(const shard_call& s, const forward_outputs& out, \
                                      const gradients& g);

LCE_TORCH_DECLARE_NCCL_ENTRY_POINTS(fp32)
LCE_TORCH_DECLARE_NCCL_ENTRY_POINTS(fp16)
LCE_TORCH_DECLARE_NCCL_ENTRY_POINTS(bf16)

#undef LCE_TORCH_DECLARE_NCCL_ENTRY_POINTS

}  // namespace lce_torch
