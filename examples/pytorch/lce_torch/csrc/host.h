// host.h: the host-side helpers the operators share (lce_torch.cpp and, with NCCL,
// nccl_ops.cpp): the `outputs` bits, argument normalization into lce's option types, and the
// allocation and packing of the operators' outputs. Host compiler only (ATen).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "lce_torch.h"

namespace lce_torch {

/// Bits of the `outputs` argument: the optional forward outputs to compute.
enum output_bit : std::int64_t {
  want_token_loss = 1,
  want_lse = 2,
  want_z_loss = 4,
  want_token_z_loss = 8,
  want_argmax = 16,
  want_correct = 32,
  want_entropy = 64,
  want_target_logprob = 128,
};

using forward_result = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                  at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using gradient_result = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

inline bool supported(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

/// A [rows, cols] matrix lce can read with a row stride: unit column stride and rows that do
/// not overlap. Anything else (a transposed view, a broadcast) is copied to a dense layout.
inline at::Tensor row_major(const at::Tensor& t) {
  const bool unit_columns = t.size(1) <= 1 || t.stride(1) == 1;
  const bool disjoint_rows = t.size(0) <= 1 || t.stride(0) >= t.size(1);
  return unit_columns && disjoint_rows ? t : t.contiguous();
}

inline std::int64_t row_stride(const at::Tensor& t) {
  return t.size(0) > 1 ? t.stride(0) : t.size(1);
}

inline lce::loss_options make_options(std::int64_t ignore_index, std::int64_t reduction,
                                      double label_smoothing, double z_loss, double softcap,
                                      double temperature, std::int64_t shift_seq_len,
                                      double filter_eps) {
  TORCH_CHECK_VALUE(reduction >= 0 && reduction <= 2,
                    "lce_torch: reduction must be 0 (mean), 1 (sum) or 2 (none), got ", reduction);
  lce::loss_options o;
  o.ignore_index = ignore_index;
  o.reduction = static_cast<lce::reduction>(reduction);
  o.label_smoothing = static_cast<float>(label_smoothing);
  o.z_loss = static_cast<float>(z_loss);
  o.softcap = static_cast<float>(softcap);
  o.temperature = static_cast<float>(temperature);
  o.shift_seq_len = shift_seq_len;
  o.filter_eps = static_cast<float>(filter_eps);
  return o;  // lce validates the values (ranges, shift dividing n) and names the bad one
}

/// `stored_allowed`: false where the operator has no forward to store from.
inline lce::backward_options make_backward_options(std::int64_t strategy,
                                                   std::int64_t memory_budget,
                                                   bool stored_allowed = true) {
  TORCH_CHECK_VALUE(strategy >= 0 && strategy <= 3,
                    "lce_torch: strategy must be 0 (auto), 1 (vocab_chunked), 2 (row_chunked) "
                    "or 3 (stored), got ",
                    strategy);
  TORCH_CHECK_VALUE(stored_allowed || strategy != 3,
                    "lce_torch: strategy 3 (stored) is not available here: this operator has "
                    "no forward to store from (the forward_backward operator has)");
  lce::backward_options b;
  b.strategy = static_cast<lce::backward_strategy>(strategy);
  if (memory_budget >= 0) b.memory_budget = static_cast<std::size_t>(memory_budget);
  return b;
}

/// Checks and normalizes the inputs shared by every operator.
inline call make_call(const at::Tensor& x_in, const at::Tensor& weight_in,
                      const std::optional<at::Tensor>& bias, const at::Tensor& target,
                      const std::optional<at::Tensor>& class_weight,
                      const lce::loss_options& options, std::int64_t vocab_size = -1) {
  // A shard (vocab_size >= 0): the weight and bias are this rank's rows; class weights and
  // shape.v are the global vocabulary's.
  const bool shard = vocab_size >= 0;
  const char* weight_name = shard ? "weight_shard" : "weight";
  TORCH_CHECK_VALUE(x_in.is_cuda(), "lce_torch: x must be a CUDA tensor, got ", x_in.device());
  TORCH_CHECK_VALUE(x_in.dim() == 2, "lce_torch: x must be [n, d], got ", x_in.sizes());
  TORCH_CHECK_VALUE(weight_in.dim() == 2, "lce_torch: ", weight_name, " must be ",
                    shard ? "[rows, d]" : "[v, d]", ", got ", weight_in.sizes());
  TORCH_CHECK_VALUE(supported(x_in.scalar_type()),
                    "lce_torch: x must be float32, float16 or bfloat16, got ", x_in.scalar_type());
  TORCH_CHECK_VALUE(weight_in.scalar_type() == x_in.scalar_type(), "lce_torch: ", weight_name,
                    " must have x's dtype (", x_in.scalar_type(), "), got ",
                    weight_in.scalar_type());
  TORCH_CHECK_VALUE(weight_in.device() == x_in.device(), "lce_torch: ", weight_name, " is on ",
                    weight_in.device(), ", x on ", x_in.device());
  TORCH_CHECK_VALUE(weight_in.size(1) == x_in.size(1), "lce_torch: x is ", x_in.sizes(), " and ",
                    weight_name, " ", weight_in.sizes(), ": their last dimensions differ");
  call c;
  c.x = row_major(x_in);
  c.weight = row_major(weight_in);
  const std::int64_t n = c.x.size(0), rows = c.weight.size(0);
  const std::int64_t v = shard ? vocab_size : rows;
  c.shape.n = n;
  c.shape.d = c.x.size(1);
  c.shape.v = v;
  c.shape.ldx = row_stride(c.x);
  c.shape.ldw = row_stride(c.weight);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == rows, "lce_torch: bias must be [", rows,
                      shard ? "] (this rank's rows)" : "]", ", got ", bias->sizes());
    TORCH_CHECK_VALUE(bias->scalar_type() == x_in.scalar_type(),
                      "lce_torch: bias must have x's dtype (", x_in.scalar_type(), "), got ",
                      bias->scalar_type());
    TORCH_CHECK_VALUE(bias->device() == x_in.device(), "lce_torch: bias is on ", bias->device(),
                      ", x on ", x_in.device());
    c.bias = bias->contiguous();
  }
  TORCH_CHECK_VALUE(target.numel() == n, "lce_torch: target must have ", n,
                    " elements (one per row of x), got ", target.sizes());
  TORCH_CHECK_VALUE(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt,
                    "lce_torch: target must be int64 (or int32), got ", target.scalar_type());
  TORCH_CHECK_VALUE(target.device() == x_in.device(), "lce_torch: target is on ", target.device(),
                    ", x on ", x_in.device());
  c.targets = target.reshape({n}).to(at::kLong).contiguous();
  if (class_weight.has_value() && class_weight->defined()) {
    TORCH_CHECK_VALUE(class_weight->dim() == 1 && class_weight->size(0) == v,
                      "lce_torch: class_weight must be ", shard ? "the global [" : "[", v,
                      "], got ", class_weight->sizes());
    TORCH_CHECK_VALUE(class_weight->device() == x_in.device(), "lce_torch: class_weight is on ",
                      class_weight->device(), ", x on ", x_in.device());
    c.class_weight = class_weight->to(at::kFloat).contiguous();
  }
  c.options = options;
  return c;
}

inline at::Tensor optional_output(bool wanted, at::IntArrayRef sizes, const at::TensorOptions& o) {
  return wanted ? at::empty(sizes, o) : at::Tensor();
}

inline forward_outputs make_forward_outputs(const call& c, std::int64_t outputs) {
  const auto f32 = c.x.options().dtype(at::kFloat);
  const auto i64 = c.x.options().dtype(at::kLong);
  const std::int64_t n = c.shape.n;
  const bool reduced = c.options.reduction != lce::reduction::none;
  forward_outputs o;
  o.loss = optional_output(reduced, {}, f32);
  o.token_loss = optional_output(!reduced || (outputs & want_token_loss), {n}, f32);
  o.lse = optional_output(outputs & want_lse, {n}, f32);
  o.z_loss = optional_output(reduced && (outputs & want_z_loss), {}, f32);
  o.token_z_loss = optional_output(outputs & want_token_z_loss, {n}, f32);
  o.argmax = optional_output(outputs & want_argmax, {n}, i64);
  o.correct = optional_output(outputs & want_correct, {}, i64);
  o.entropy = optional_output(outputs & want_entropy, {n}, f32);
  o.target_logprob = optional_output(outputs & want_target_logprob, {n}, f32);
  return o;
}

/// The operator schema returns tensors, never None: an output not computed is empty ([0]).
inline at::Tensor or_empty(const at::Tensor& t, const call& c, at::ScalarType dtype) {
  return t.defined() ? t : at::empty({0}, c.x.options().dtype(dtype));
}

inline forward_result to_result(const call& c, const forward_outputs& o) {
  return {or_empty(o.loss, c, at::kFloat),          or_empty(o.token_loss, c, at::kFloat),
          or_empty(o.lse, c, at::kFloat),           or_empty(o.z_loss, c, at::kFloat),
          or_empty(o.token_z_loss, c, at::kFloat),  or_empty(o.argmax, c, at::kLong),
          or_empty(o.correct, c, at::kLong),        or_empty(o.entropy, c, at::kFloat),
          or_empty(o.target_logprob, c, at::kFloat)};
}

inline gradient_result to_result(const call& c, const gradients& g) {
  return {or_empty(g.dx, c, c.x.scalar_type()), or_empty(g.dw, c, c.x.scalar_type()),
          or_empty(g.db, c, c.x.scalar_type())};
}

/// The upstream gradient as lce reads it: fp32, dense, [1] (mean/sum) or [n] (none).
inline at::Tensor upstream(const std::optional<at::Tensor>& grad, const call& c) {
  if (!grad.has_value() || !grad->defined()) return at::Tensor();
  const std::int64_t expected = c.options.reduction == lce::reduction::none ? c.shape.n : 1;
  TORCH_CHECK_VALUE(grad->numel() == expected, "lce_torch: grad must have ", expected,
                    " element(s) for this reduction, got ", grad->sizes());
  TORCH_CHECK_VALUE(grad->device() == c.x.device(), "lce_torch: grad is on ", grad->device(),
                    ", x on ", c.x.device());
  return grad->reshape({expected}).to(at::kFloat).contiguous();
}

inline at::Tensor checked_lse(const at::Tensor& lse, const call& c) {
  TORCH_CHECK_VALUE(lse.numel() == c.shape.n && lse.scalar_type() == at::kFloat,
                    "lce_torch: lse must be the forward's float32 [", c.shape.n, "], got ",
                    lse.scalar_type(), " ", lse.sizes());
  TORCH_CHECK_VALUE(lse.device() == c.x.device(), "lce_torch: lse is on ", lse.device(), ", x on ",
                    c.x.device());
  return lse.reshape({c.shape.n}).contiguous();
}

}  // namespace lce_torch
