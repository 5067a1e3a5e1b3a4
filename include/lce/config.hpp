/// @file config.hpp
/// @brief Tile configurations of the fused forward kernel: a constexpr value type per element
/// type, overridable by the caller through the launcher's `Config` template parameter.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "version.hpp"

LCE_NAMESPACE_BEGIN

/// @brief Shape of the block tile of Z = X·Wᵀ that one thread block computes at a time.
/// @tparam BlockM  rows of X per tile (multiple of 32 for tensor cores, 16 for SIMT)
/// @tparam BlockV  vocabulary rows of W per tile (multiple of 64 for tensor cores, 128 SIMT)
/// @tparam BlockK  depth of one shared-memory stage (multiple of 16)
/// @tparam WarpsM, WarpsV  warp grid; a tensor-core warp computes (BlockM/WarpsM, BlockV/WarpsV)
template <int BlockM, int BlockV, int BlockK, int WarpsM, int WarpsV>
struct tile_config {
  static constexpr int block_m = BlockM;
  static constexpr int block_v = BlockV;
  static constexpr int block_k = BlockK;
  static constexpr int warps_m = WarpsM;
  static constexpr int warps_v = WarpsV;
  static constexpr int threads = 32 * WarpsM * WarpsV;
};

/// @brief Default configuration per element type: tensor cores (mma.sync through WMMA) for
/// 16-bit types, exact fp32 FFMA for float (never TF32).
template <class Element>
struct default_config : tile_config<64, 128, 32, 2, 4> {};
template <>
struct default_config<float> : tile_config<64, 128, 16, 2, 4> {};

/// @brief Whether `Element` is one of the supported element types.
template <class Element>
inline constexpr bool is_supported_element_v =
    std::is_same_v<Element, float> || std::is_same_v<Element, __half> ||
    std::is_same_v<Element, __nv_bfloat16>;

LCE_NAMESPACE_END
