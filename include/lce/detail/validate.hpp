/// @file validate.hpp
/// @brief Argument checks shared by the launchers; each failure names the argument.
#pragma once

#include <climits>
#include <cmath>
#include <cstdint>

#include "../options.hpp"
#include "../status.hpp"

LCE_NAMESPACE_BEGIN
namespace detail {

/// Largest extent the GEMMs accept (cuBLAS takes int sizes; a 16-bit view of an fp32 chunk
/// doubles its leading dimension).
inline constexpr std::int64_t max_extent = (std::int64_t{INT_MAX} - 64) / 2;

inline cudaError_t validate_problem(const problem& s) noexcept {
  if (s.n <= 0) return invalid("shape.n (tokens) must be positive");
  if (s.d <= 0) return invalid("shape.d (hidden size) must be positive");
  if (s.v <= 0) return invalid("shape.v (vocabulary size) must be positive");
  if (s.n > max_extent || s.d > max_extent || s.v > max_extent)
    return invalid("shape.n, shape.d and shape.v must each be below 2^30");
  if (s.ldx != 0 && s.ldx < s.d) return invalid("shape.ldx must be 0 (dense) or >= shape.d");
  if (s.ldw != 0 && s.ldw < s.d) return invalid("shape.ldw must be 0 (dense) or >= shape.d");
  if (s.lddx != 0 && s.lddx < s.d) return invalid("shape.lddx must be 0 (dense) or >= shape.d");
  if (s.lddw != 0 && s.lddw < s.d) return invalid("shape.lddw must be 0 (dense) or >= shape.d");
  if (s.x_stride() > max_extent || s.w_stride() > max_extent || s.dx_stride() > max_extent ||
      s.dw_stride() > max_extent)
    return invalid("leading dimensions must be below 2^30");
  return cudaSuccess;
}

inline cudaError_t validate_options(const loss_options& o, const problem& s) noexcept {
  const int r = static_cast<int>(o.reduction);
  if (r < 0 || r > 2) return invalid("options.reduction is not mean, sum or none");
  if (!(o.label_smoothing >= 0.0f && o.label_smoothing <= 1.0f))
    return invalid("options.label_smoothing must be in [0, 1]");
  if (!(o.z_loss >= 0.0f && std::isfinite(o.z_loss)))
    return invalid("options.z_loss must be finite and >= 0");
  if (!(o.softcap >= 0.0f && std::isfinite(o.softcap)))
    return invalid("options.softcap must be > 0 (or 0: no softcap)");
  if (!(o.temperature > 0.0f && std::isfinite(o.temperature)))
    return invalid("options.temperature must be finite and > 0");
  if (o.shift_seq_len < 0) return invalid("options.shift_seq_len must be >= 0");
  if (o.shift_seq_len > 0 && s.n % o.shift_seq_len != 0)
    return invalid("options.shift_seq_len must divide shape.n (rows are [B, T] flattened)");
  return cudaSuccess;
}

inline cudaError_t validate_backward_options(const backward_options& b, bool fp32_grad) noexcept {
  const int s = static_cast<int>(b.strategy);
  if (s < 0 || s > 2) return invalid("backward_options.strategy is not a known strategy");
  if (b.strategy == backward_strategy::row_chunked && !fp32_grad)
    return invalid("backward_options.strategy row_chunked needs fp32 dW/db (Grad = float)");
  return cudaSuccess;
}

/// The workspace check of the two-phase protocol.
inline cudaError_t validate_workspace(std::size_t given, std::size_t needed) noexcept {
  if (given < needed)
    return invalid("workspace_bytes is smaller than the size query returned");
  return cudaSuccess;
}

}  // namespace detail
LCE_NAMESPACE_END
