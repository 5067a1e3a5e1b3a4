/// @file args.hpp
/// @brief Pointer bundles of the host launchers. All pointers are device pointers; a null
/// optional output is not computed and costs nothing.
#pragma once

#include <cstdint>

#include "status.hpp"
#include "version.hpp"

LCE_NAMESPACE_BEGIN

/// @brief Inputs and outputs of lce::forward.
/// @tparam Element  float, __half or __nv_bfloat16
template <class Element>
struct forward_args {
  const Element* x = nullptr;             ///< [n, ldx] hidden states (required)
  const Element* w = nullptr;             ///< [v, ldw] classifier rows (required)
  const Element* bias = nullptr;          ///< [v] optional bias
  const std::int64_t* targets = nullptr;  ///< [n] target ids, or ignore_index (required)
  float* loss = nullptr;        ///< [1] reduced loss (mean/sum); required unless reduction none
  float* token_loss = nullptr;  ///< [n] per-token loss (0 for ignored rows); required for none
  float* lse = nullptr;         ///< [n] log-sum-exp of each row of Z (what backward needs)
  const float* class_weight = nullptr;  ///< [v] optional class weights (PyTorch `weight=`)
  float* z_loss = nullptr;              ///< [1] the reduced z-loss term alone (mean/sum)
  float* token_z_loss = nullptr;        ///< [n] s·lse² per token (0 for ignored rows)
  std::int64_t* argmax = nullptr;       ///< [n] predicted token (first maximum of z)
  std::int64_t* correct = nullptr;      ///< [1] valid rows whose argmax equals the target
  float* entropy = nullptr;             ///< [n] entropy of softmax(z), in nats
  float* target_logprob = nullptr;      ///< [n] log softmax(z)_y (0 for ignored rows)
  /// [1] optional: the count of rows with a target outside [0, v) is added to it
  device_status* status = nullptr;
};

/// @brief Inputs and outputs of lce::backward.
/// @tparam Element  element type of x, w, bias and dx
/// @tparam Grad     element type of dw and db: Element or float
template <class Element, class Grad = Element>
struct backward_args {
  const Element* x = nullptr;             ///< [n, ldx] (required)
  const Element* w = nullptr;             ///< [v, ldw] (required)
  const Element* bias = nullptr;          ///< [v] optional bias
  const std::int64_t* targets = nullptr;  ///< [n] (required)
  const float* lse = nullptr;             ///< [n] from the forward (required)
  /// Upstream gradient: [1] for mean/sum, [n] for reduction none; null means 1.
  const float* grad = nullptr;
  Element* dx = nullptr;                ///< [n, lddx] gradient of x (optional)
  Grad* dw = nullptr;                   ///< [v, lddw] gradient of w (optional)
  Grad* db = nullptr;                   ///< [v] gradient of bias (optional)
  const float* class_weight = nullptr;  ///< [v] the forward's class weights, if any
  /// [1] optional: the count of rows with a target outside [0, v) is added to it
  device_status* status = nullptr;
};

/// @brief Inputs and outputs of lce::forward_backward: the forward's outputs and the
/// gradients of the returned loss (upstream gradient 1).
template <class Element, class Grad = Element>
struct forward_backward_args {
  const Element* x = nullptr;
  const Element* w = nullptr;
  const Element* bias = nullptr;
  const std::int64_t* targets = nullptr;
  float* loss = nullptr;
  float* token_loss = nullptr;
  float* lse = nullptr;
  Element* dx = nullptr;
  Grad* dw = nullptr;
  Grad* db = nullptr;
  const float* class_weight = nullptr;
  float* z_loss = nullptr;
  float* token_z_loss = nullptr;
  std::int64_t* argmax = nullptr;
  std::int64_t* correct = nullptr;
  float* entropy = nullptr;
  float* target_logprob = nullptr;
  device_status* status = nullptr;  ///< counted once per call, as in forward_args
};

namespace detail {
/// The forward's part of forward_backward's arguments, field by field (by name, so that a
/// reordered member cannot slip through).
template <class Element, class Grad>
forward_args<Element> forward_part(const forward_backward_args<Element, Grad>& a) noexcept {
  forward_args<Element> f;
  f.x = a.x;
  f.w = a.w;
  f.bias = a.bias;
  f.targets = a.targets;
  f.loss = a.loss;
  f.token_loss = a.token_loss;
  f.lse = a.lse;
  f.class_weight = a.class_weight;
  f.z_loss = a.z_loss;
  f.token_z_loss = a.token_z_loss;
  f.argmax = a.argmax;
  f.correct = a.correct;
  f.entropy = a.entropy;
  f.target_logprob = a.target_logprob;
  f.status = a.status;
  return f;
}

/// The backward's part of forward_backward's arguments: the gradients of the returned loss
/// (upstream gradient 1) from `lse`; `status` where this pass counts invalid targets.
template <class Element, class Grad>
backward_args<Element, Grad> backward_part(const forward_backward_args<Element, Grad>& a,
                                           const float* lse, device_status* status) noexcept {
  backward_args<Element, Grad> b;
  b.x = a.x;
  b.w = a.w;
  b.bias = a.bias;
  b.targets = a.targets;
  b.lse = lse;
  b.grad = nullptr;
  b.dx = a.dx;
  b.dw = a.dw;
  b.db = a.db;
  b.class_weight = a.class_weight;
  b.status = status;
  return b;
}
}  // namespace detail

LCE_NAMESPACE_END
