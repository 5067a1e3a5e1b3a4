/// @file tile_store_sm90.cuh
/// @brief 16-bit tiles out of the sm_90a pipeline's accumulators through shared memory: each
/// consumer warpgroup writes its 64 × BlockV values into a staging tile with `stmatrix` (8 × 8
/// blocks in the accumulator fragment's own layout, 16 bytes a lane, 128-byte swizzle), and one
/// of its threads sends the tile out as 64 × 64 bulk tensor stores (TMA) while the next tile's
/// MMAs run. Written from registers instead, every pair of a thread is its own 4-byte store
/// (eight half-filled sectors a warp instruction), or costs four shuffles per 16 bytes to
/// assemble rows. The tensor map clips rows and columns outside the matrix.
///
/// The staging takes BlockM·BlockV·2 bytes beside the pipeline's stages (64 KiB at BlockV = 256),
/// so a kernel that uses it runs with the stages that fit next to it (staged_pipeline).
#pragma once

#include <cstdint>
#include <type_traits>

#include "../config.hpp"
#include "tile_pipeline_sm90.cuh"

LCE_NAMESPACE_BEGIN
namespace block {

/// The pipeline of `Config`, with a staging tile beside its stages when `Staged`: as many of the
/// Config's stages as fit in 227 KiB next to it (3 of 48 KiB at BlockV = 256; 6 of 32 KiB at 128).
template <class Element, class Config, bool Staged>
struct staged_pipeline {
  static constexpr int staging_bytes = Staged ? Config::block_m * Config::block_v * 2 : 0;
  static constexpr int stage_bytes = (Config::block_m + Config::block_v) * Config::block_k * 2;
  /// 227 KiB less the staging, the alignment slack and the barriers.
  static constexpr int fitting_stages = (227 * 1024 - 2 * 1024 - staging_bytes) / stage_bytes;
  static constexpr int stages = Config::stages < fitting_stages ? Config::stages : fitting_stages;
  using config =
      std::conditional_t<Staged, sm90_tile_config<Config::block_v, stages, Config::cluster_m>,
                         Config>;
  using type = tile_pipeline_sm90<Element, config, staging_bytes>;
};

/// One consumer warpgroup's side of the staging tile. Per tile: acquire(), then stmatrix of
/// each four column octets of each fragment row (address), then release(map, col0, ...).
/// finish() before the block exits.
template <int BlockV>
struct tile_store_sm90 {
  /// Columns of a store box: one 128-byte swizzle row of 16-bit values.
  static constexpr int box_cols = 64;
  static constexpr int box_bytes = 64 * box_cols * 2;
  static_assert(BlockV % box_cols == 0, "whole boxes of 64 columns");

  std::uint32_t staging = 0;      ///< this warpgroup's 64 × BlockV tile (shared address)
  std::uint32_t lane_offset = 0;  ///< this lane's stmatrix row in box 0, fragment row 0
  int half = 0;
  int row0 = 0;  ///< the matrix row of the staging's first row

  /// `epilogue_smem`: the pipeline's shared_storage::epilogue (both warpgroups' tiles);
  /// `row0_`: the matrix row of warpgroup `half_`'s first row.
  __device__ __forceinline__ tile_store_sm90(unsigned char* epilogue_smem, int half_, int row0_)
      : half(half_), row0(row0_) {
    const int t = static_cast<int>(threadIdx.x) % 128;
    staging = arch::sm90::smem_address(epilogue_smem) + half_ * (64 * BlockV * 2);
    // Lane l writes row l % 8 of matrix l / 8 of its warp's 16 rows: 128 bytes a row in a box,
    // its 16-byte chunk XOR (row % 8) under the 128-byte swizzle.
    const int lane = t % 32, row = 16 * (t / 32) + lane % 8;
    lane_offset = static_cast<std::uint32_t>(row * 128 + (((lane / 8) ^ (lane % 8)) * 16));
  }

  /// The address of this lane's stmatrix row for fragment row h (0, 1) and the column octets
  /// j4 .. j4 + 3 (j4 a multiple of 4; octet j: tile columns 8j .. 8j + 7): box j4 / 8, chunk
  /// (j4 % 8 + lane / 8) XOR (row % 8); fragment row 1 lies 8 rows below (the same row % 8).
  __device__ __forceinline__ std::uint32_t address(int h, int j4) const {
    const std::uint32_t chunk_flip = (j4 % 8) != 0 ? 64u : 0u;
    return staging + static_cast<std::uint32_t>((j4 / 8) * box_bytes + h * 8 * 128) +
           (lane_offset ^ chunk_flip);
  }

  /// Stores the packed pairs of octets j4 .. j4 + 3 of fragment row h.
  __device__ __forceinline__ void put(int h, int j4, const std::uint32_t (&packed)[4]) const {
    arch::sm90::stmatrix_x4(address(h, j4), packed[0], packed[1], packed[2], packed[3]);
  }

  /// Before a tile's values are written: the previous tile's bulk stores have read the staging.
  __device__ __forceinline__ void acquire() const {
    if (threadIdx.x % 128 == 0) arch::sm90::bulk_wait_group_read<0>();
    arch::sm90::named_barrier_sync<128>(1 + half);
  }

  /// After: the tile goes out to `map` at columns col0 .. col0 + BlockV − 1 of rows row0 ..
  /// row0 + 63, in boxes of 64 columns, from the warpgroup's first thread.
  __device__ __forceinline__ void release(const void* map, int col0) const {
    arch::sm90::fence_proxy_async_shared();
    arch::sm90::named_barrier_sync<128>(1 + half);
    if (threadIdx.x % 128 == 0) {
#pragma unroll
      for (int b = 0; b < BlockV / box_cols; ++b) {
        arch::sm90::tma_store_2d(map, staging + b * box_bytes, col0 + b * box_cols, row0);
      }
      arch::sm90::bulk_commit_group();
    }
  }

  /// The warpgroup's last stores have completed.
  __device__ __forceinline__ void finish() const {
    if (threadIdx.x % 128 == 0) arch::sm90::bulk_wait_group<0>();
  }
};

}  // namespace block
LCE_NAMESPACE_END
