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
/// @tparam BlockM  rows of X per tile (a multiple of 16·WarpsM for tensor cores)
/// @tparam BlockV  vocabulary rows of W per tile (a multiple of 32, and of 16·WarpsV)
/// @tparam BlockK  depth of one shared-memory stage (multiple of 16)
/// @tparam WarpsM, WarpsV  warp grid; a tensor-core warp computes (BlockM/WarpsM, BlockV/WarpsV)
/// @tparam Stages  cp.async pipeline depth (>= 2): stages in flight while one is consumed
template <int BlockM, int BlockV, int BlockK, int WarpsM, int WarpsV, int Stages = 2>
struct tile_config {
  static constexpr int block_m = BlockM;
  static constexpr int block_v = BlockV;
  static constexpr int block_k = BlockK;
  static constexpr int warps_m = WarpsM;
  static constexpr int warps_v = WarpsV;
  static constexpr int stages = Stages;
  static constexpr int threads = 32 * WarpsM * WarpsV;
  static_assert(Stages >= 2, "the pipeline needs at least two stages");
};

/// @brief Default configuration per element type. 16-bit types: tensor cores (mma.sync
/// through WMMA), 128×128 tiles, warp tiles of 64×32, a 4-stage cp.async pipeline (80 KiB of
/// shared memory, two blocks per SM). float: exact FFMA (never TF32), 64×128 tiles.
template <class Element>
struct default_config : tile_config<128, 128, 32, 2, 4, 4> {};
template <>
struct default_config<float> : tile_config<64, 128, 16, 2, 4, 2> {};

/// @brief Whether `Element` is one of the supported element types.
template <class Element>
inline constexpr bool is_supported_element_v =
    std::is_same_v<Element, float> || std::is_same_v<Element, __half> ||
    std::is_same_v<Element, __nv_bfloat16>;

LCE_NAMESPACE_END
