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

/// db = Σ_i dZ_i: a column sum whose terms cancel (Σ_i p_iv against the count of targets v),
/// worst for a tiny vocabulary, where p_iv is O(1). Rounding dZ to bf16 (2^-9) before the sum
/// then costs more than the 1e-2 that dX and dW meet: measured up to 1.6e-2 on an H200
/// (bf16, 64×16×3, reduction sum, 50 valid rows), where the column sums are 70× smaller than
/// the summed magnitudes. DESIGN.md §4 sets 1e-2 for dX/dW; db gets 2e-2 in 16-bit.
template <class Element>
constexpr double db_tolerance() {
  return std::is_same_v<Element, float> ? 1e-5 : 2e-2;
}

/// The fp64 GPU reference against the fp64 CPU reference: only summation order differs.
constexpr double reference_tolerance = 1e-12;

}  // namespace lce_test
