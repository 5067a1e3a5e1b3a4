/// @file loss_scalars.cuh
/// @brief The scalars of a loss (valid rows, weight sums, the gradient normalizer): the record
/// kernel::loss_scalars_kernel writes once per call and every per-row epilogue reads.
#pragma once

#include "../version.hpp"

LCE_NAMESPACE_BEGIN
namespace thread {

/// Scalars of a loss, computed on the device so that nothing is read back.
struct loss_scalars {
  long long n_valid;   ///< rows whose (shifted) target is not ignore_index and is in [0, v)
  float weight_valid;  ///< Σ over valid rows of w_{y_i} (n_valid without class weights)
  float weight_sum;    ///< Σ_v w_v (v without class weights)
  /// The gradient normalizer: the largest |row scale| over valid rows. dZ is stored divided
  /// by alpha and the gradient GEMMs multiply it back, so 16-bit dZ keeps its precision even
  /// when the scales are tiny (fp16 with a mean over many rows).
  float alpha;
  float zero;  ///< 0, the beta of an overwriting GEMM (cuBLAS device pointer mode)
  float one;   ///< 1, the beta of an accumulating GEMM
};

}  // namespace thread
LCE_NAMESPACE_END
