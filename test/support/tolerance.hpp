/// @file tolerance.hpp
/// @brief Acceptance thresholds (DESIGN.md §4), as relative Frobenius errors against an fp64
/// reference computed from the same rounded inputs.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <type_traits>
#include <vector>

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

/// Unit roundoff of the type dZ is stored in before the gradient GEMMs (bf16: 8 significant
/// bits, fp16: 11, fp32: 24).
template <class Element>
constexpr double unit_roundoff() {
  if constexpr (std::is_same_v<Element, float>)
    return 0x1p-24;
  else if constexpr (std::is_same_v<Element, __half>)
    return 0x1p-11;
  else
    return 0x1p-8;
}

/// db = Σ_i dZ_i is a column sum whose terms cancel (Σ_i p_iv against the count of targets
/// v), worst for a tiny vocabulary where p_iv is O(1): seen on an H200, bf16, 64×16×3,
/// reduction sum, the column sums 70× smaller than Σ_i |dZ_iv|, db off by 1.4–1.6e-2 while dX
/// and dW met 2e-3. Rounding each dZ to the storage type can move column v by at most
/// u·Σ_i |dZ_iv|; so db may miss by grad_tolerance plus that bound, relative to ‖db‖:
///   tol = grad_tolerance + u·‖Σ_i |dZ_i|‖ / ‖Σ_i dZ_i‖.
/// Without cancellation the ratio is ~1 and the bound adds u (0.4% in bf16).
/// In fp32 the storage rounding is not the largest per-entry error: p = exp(z − lse) carries
/// the rounding of z − lse (an ulp of |lse| ~ 5, relative to p) and of the approximate exp2,
/// tens of ulps of p; so fp32 takes 32·2⁻²⁴ per entry, and the target's entry p − 1 counts
/// as |p| (seen on an H200, fp32 5×8×2, reduction none: db off by 1.2e-5 with Σ|dZ| 4× ‖db‖).
template <class Element>
double db_tolerance(const std::vector<double>& db, const std::vector<double>& db_abs) {
  double ref = 0.0, mass = 0.0;
  for (std::size_t i = 0; i < db.size(); ++i) {
    ref += db[i] * db[i];
    mass += db_abs[i] * db_abs[i];
  }
  const double entry_error =
      std::is_same_v<Element, float> ? 32.0 * unit_roundoff<Element>() : unit_roundoff<Element>();
  // db = 0 exactly (v = 1: p = 1 at the target): the comparison is absolute, and so is the
  // bound (seen on an H200: fp32 300×1×1, sum of 236 rows, db 1.03e-5 where it is 0).
  if (ref == 0.0) return grad_tolerance<Element>() + entry_error * std::sqrt(mass);
  return grad_tolerance<Element>() + entry_error * std::sqrt(mass / ref);
}

/// A confident row's loss ℓ = lse − z_t is a difference of two numbers of size |lse| computed
/// in fp32, so it carries an absolute error of a few ulps of |lse| however exact the kernel
/// is: relative to ℓ that is ~u·|lse|/ℓ, and the target's gradient entry p_t − 1 (|p_t − 1|
/// = 1 − e^{−ℓ}) takes the same relative error (seen on an H100, fp32 1×1×2: ℓ = 0.0034, loss
/// off by 5.1e-5, dX by 7.3e-5 with |lse| ~ 3). This is the slack to add to the relative
/// tolerances of the loss and of the gradients: 16·u·‖lse‖/‖ℓ‖ and 16·u·‖lse‖/‖1 − e^{−ℓ}‖
/// over the rows that count (`valid`). For rows of typical loss (ℓ ≳ 1, |lse| ~ 10) it is
/// ~1e-6, below the fp32 tolerances, so only near-certain rows loosen the comparison.
struct cancellation {
  double loss = 0.0;
  double grad = 0.0;
};
inline cancellation cancellation_slack(const std::vector<double>& lse,
                                       const std::vector<double>& token_loss,
                                       const std::vector<bool>& valid) {
  double lse2 = 0.0, loss2 = 0.0, grad2 = 0.0;
  for (std::size_t i = 0; i < lse.size() && i < token_loss.size() && i < valid.size(); ++i) {
    if (!valid[i]) continue;
    lse2 += lse[i] * lse[i];
    loss2 += token_loss[i] * token_loss[i];
    const double g = -std::expm1(-std::fabs(token_loss[i]));
    grad2 += g * g;
  }
  constexpr double k = 16.0 * 0x1p-24;
  cancellation out;
  if (lse2 == 0.0) return out;
  out.loss = loss2 > 0.0 ? k * std::sqrt(lse2 / loss2) : 0.0;
  out.grad = grad2 > 0.0 ? k * std::sqrt(lse2 / grad2) : 0.0;
  return out;
}

/// The fp64 GPU reference against the fp64 CPU reference: only summation order differs.
constexpr double reference_tolerance = 1e-12;

}  // namespace lce_test
