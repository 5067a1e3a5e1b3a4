/// @file args.hpp
/// @brief Pointer bundles of the host launchers. All pointers are device pointers; a null
/// optional output is not computed and costs nothing.
#pragma once

#include <cstdint>

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
  Element* dx = nullptr;  ///< [n, lddx] gradient of x (optional)
  Grad* dw = nullptr;     ///< [v, lddw] gradient of w (optional)
  Grad* db = nullptr;     ///< [v] gradient of bias (optional)
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
};

LCE_NAMESPACE_END
