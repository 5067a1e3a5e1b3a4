/// @file tolerance.hpp
/// @brief Acceptance thresholds (DESIGN.md §4), as relative Frobenius errors against an fp64
/// reference computed from the same rounded inputs.
#pragma once

#include <type_traits>

namespace lce_test {

/// Loss, per-token loss and lse: fp32 accumulation on exact inputs.
template <class Element>
constexpr double loss_tolerance() {
  return std::is_same_v<Element, float> ? 1e-5 : 1e-4;
}

/// dX, dW, db: exact fp32 for float; the 16-bit types round dZ and the outputs.
template <class Element>
constexpr double grad_tolerance() {
  return std::is_same_v<Element, float> ? 1e-5 : 1e-2;
}

/// The fp64 GPU reference against the fp64 CPU reference: only summation order differs.
constexpr double reference_tolerance = 1e-12;

}  // namespace lce_test
