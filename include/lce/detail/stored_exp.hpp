/// @file stored_exp.hpp
/// @brief The layout of the values the `stored` backward strategy keeps: written by the
/// sm_90a forward (kernel/fused_forward_sm90.cuh), read and overwritten with dZ by
/// kernel/stored_grad.cuh.
#pragma once

#include <cstdint>

#include "../version.hpp"

LCE_NAMESPACE_BEGIN
namespace detail {

/// Where the forward of the `stored` backward strategy keeps, for every row and vocabulary tile
/// of `tile_cols` columns, the tile's row maximum m (fp32) and e^{z − m} of each of its logits
/// in the element type: values in (0, 1], so 16 bits keep a relative precision of 2⁻⁹ (bf16)
/// whatever the logit's magnitude, where a 16-bit logit would lose |z|·2⁻⁹ of z itself. With
/// the row's lse, p = e^{z − m}·e^{m − lse} (kernel/stored_grad.cuh).
template <class Element>
struct stored_exp {
  Element* values = nullptr;   ///< [n, ld], 16-byte aligned
  float* tile_max = nullptr;   ///< [n, tiles]
  std::int64_t ld = 0;         ///< a multiple of 8
  std::int64_t tiles = 0;      ///< ⌈v / tile_cols⌉
  std::int64_t tile_cols = 0;  ///< the forward kernel's block_v
  /// With per-row offsets (kernel/stored_offset.cuh): e^{z − c_row} is stored instead, c from
  /// `offset` [n] (tile_max unused), and the forward sets flagged[row] where the row's maximum
  /// lies more than kernel::stored_offset_limit above c.
  const float* offset = nullptr;
  int* flagged = nullptr;
};

}  // namespace detail
LCE_NAMESPACE_END
