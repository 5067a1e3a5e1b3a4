// lce_torch.h: what the operator registration (lce_torch.cpp, host compiler) and the per-element
// launch files (ops_<dtype>.cu, nvcc) share. Host-only: ATen tensors and lce's host-side
// option types, no CUDA headers.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <lce/options.hpp>

namespace lce_torch {

/// One call's inputs, already checked by lce_torch.cpp: x [n, ldx] and weight [v, ldw] with
/// unit column stride; bias [v], targets [n] (int64), class_weight [v] (fp32) dense. bias and
/// class_weight may be undefined tensors.
struct call {
  at::Tensor x, weight, bias, targets, class_weight;
  lce::problem shape;
  lce::loss_options options;
  lce::backward_options bopt;
  /// Grad = float (dW/db in fp32). Set when dw/db are fp32 tensors, or when no dw/db is asked
  /// for but the caller wants the fp32 strategies (row_chunked).
  bool fp32_grad = false;
};

/// The forward's outputs; an undefined tensor is not computed.
struct forward_outputs {
  at::Tensor loss, token_loss, lse, z_loss, token_z_loss, argmax, correct, entropy, target_logprob;
};

/// The backward's inputs (lse, upstream grad) and outputs; undefined: not given / not computed.
struct gradients {
  at::Tensor lse;   ///< [n] fp32 from the forward (backward only)
  at::Tensor grad;  ///< [1] or [n] fp32 upstream gradient; undefined means 1
  at::Tensor dx, dw, db;
};

/// What the backward does for a shape: lce::choose_backward, or lce::choose_forward_backward
/// (`with_forward`: the gradients in the forward, grad_in_forward and 'stored').
struct backward_plan_info {
  std::int64_t strategy = 0;
  std::int64_t chunk = 0;
  std::int64_t workspace_bytes = 0;
  std::int64_t accumulator_bytes = 0;
  bool fused_recompute = false;  ///< the sm_90a recompute + dZ kernel on the current device
  const char* reason = "";       ///< why (static text)
};

// Defined once per element type (ops_fp32.cu, ops_fp16.cu, ops_bf16.cu), so that the three
// instantiations of the library compile in parallel.
#define LCE_TORCH_DECLARE_ENTRY_POINTS(suffix)                                                   \
  void forward_##suffix(const call& c, const forward_outputs& out);                              \
  void backward_##suffix(const call& c, const gradients& g);                                     \
  void forward_backward_##suffix(const call& c, const forward_outputs& out, const gradients& g); \
  backward_plan_info choose_backward_##suffix(const lce::problem& shape,                         \
                                              const lce::backward_options& bopt, bool fp32_grad, \
                                              bool with_forward, bool bias_or_weights);          \
  std::int64_t forward_workspace_##suffix(const lce::problem& shape);                            \
  void scale_##suffix(const at::Tensor& t, const at::Tensor& scale);

LCE_TORCH_DECLARE_ENTRY_POINTS(fp32)
LCE_TORCH_DECLARE_ENTRY_POINTS(fp16)
LCE_TORCH_DECLARE_ENTRY_POINTS(bf16)

#undef LCE_TORCH_DECLARE_ENTRY_POINTS

}  // namespace lce_torch
