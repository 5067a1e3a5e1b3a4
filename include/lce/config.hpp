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

/// @brief Tile configuration of the sm_90a fused forward (TMA + wgmma, warp-specialized): a
/// producer warpgroup streams (128, 64) tiles of X and (BlockV, 64) tiles of W into a
/// Stages-deep mbarrier pipeline; two consumer warpgroups each compute 64 rows × BlockV with
/// wgmma and fold them into the row statistics in registers.
/// @tparam BlockV    vocabulary rows per tile: 128 or 256
/// @tparam Stages    shared-memory stages ((128 + BlockV)·128 bytes each)
/// @tparam ClusterM  blocks per thread-block cluster along the rows, 1 or 2: with 2, the two
///                   blocks of a cluster compute adjacent row tiles against the same W tiles,
///                   and each loads half of every W box and multicasts it to both (a third
///                   less traffic from L2 into the SMs)
template <int BlockV, int Stages, int ClusterM = 1>
struct sm90_tile_config {
  static constexpr int block_m = 128;
  static constexpr int block_v = BlockV;
  static constexpr int block_k = 64;
  static constexpr int stages = Stages;
  static constexpr int threads = 384;
  static constexpr int cluster_m = ClusterM;
  static_assert(BlockV == 128 || BlockV == 256, "BlockV must be 128 or 256");
  static_assert(ClusterM == 1 || ClusterM == 2, "ClusterM must be 1 or 2");
  static_assert(Stages >= 2 && (128 + BlockV) * 128 * Stages <= 220 * 1024,
                "the stages must fit in shared memory");
};

/// @brief Default configuration per element type. 16-bit types: tensor cores (mma.sync
/// through WMMA), 128×128 tiles, warp tiles of 64×32, a 4-stage cp.async pipeline (80 KiB of
/// shared memory, two blocks per SM); on sm_90a devices the forward runs the `sm90` (or, with a
/// bias or class weights, `sm90_general`) configuration instead; a Config without an `sm90`
/// member keeps the mma.sync kernel everywhere. float: exact FFMA (never TF32), 64×128 tiles.
template <class Element>
struct default_config : tile_config<128, 128, 32, 2, 4, 4> {
  /// Without bias and class weights (softcap and temperature allowed): 256-wide tiles, in
  /// clusters of two blocks that share each W box by multicast, which halves that operand's
  /// L2-to-SM traffic.
  using sm90 = sm90_tile_config<256, 4, 2>;
  /// With a bias or class weights: their per-column loads need the registers of a narrower
  /// tile.
  using sm90_general = sm90_tile_config<128, 6, 2>;
};
template <>
struct default_config<float> : tile_config<64, 128, 16, 2, 4, 2> {};

/// @brief The sm_90a configuration a Config carries (its `sm90` member), or void.
template <class Config, class = void>
struct sm90_config_of {
  using type = void;
};
template <class Config>
struct sm90_config_of<Config, std::void_t<typename Config::sm90>> {
  using type = typename Config::sm90;
};

/// @brief The sm_90a configuration for a forward with bias or class weights: the Config's
/// `sm90_general` member, else its `sm90` one (void if neither).
template <class Config, class = void>
struct sm90_general_config_of {
  using type = typename sm90_config_of<Config>::type;
};
template <class Config>
struct sm90_general_config_of<Config, std::void_t<typename Config::sm90_general>> {
  using type = typename Config::sm90_general;
};

/// @brief Whether `Element` is one of the supported element types.
template <class Element>
inline constexpr bool is_supported_element_v =
    std::is_same_v<Element, float> || std::is_same_v<Element, __half> ||
    std::is_same_v<Element, __nv_bfloat16>;

LCE_NAMESPACE_END
