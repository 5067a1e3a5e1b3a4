/// @file tile_loader.cuh
/// @brief Copies a (Rows, BlockK) tile of a row-major global matrix into shared memory with
/// cp.async (16-byte, L2-only), zero-filling rows and columns outside the matrix.
#pragma once

#include <cstdint>

#include "../arch/sm80.cuh"

LCE_NAMESPACE_BEGIN
namespace block {

/// @brief Tile loader.
/// @tparam Element    element type
/// @tparam Rows       tile rows
/// @tparam BlockK     tile columns (depth)
/// @tparam SmemStride row stride of the shared tile in elements (BlockK plus padding; a
///                    multiple of 16 bytes)
/// @tparam Threads    threads that cooperate
template <class Element, int Rows, int BlockK, int SmemStride, int Threads>
struct tile_loader {
  static constexpr int vec = 16 / static_cast<int>(sizeof(Element));  // elements per 16 bytes
  static_assert(BlockK % vec == 0, "BlockK must be a multiple of 16 bytes");
  static_assert((SmemStride * sizeof(Element)) % 16 == 0, "shared rows must stay 16-byte aligned");
  static constexpr int chunks = Rows * BlockK / vec;

  /// @param smem     (Rows, SmemStride) destination
  /// @param g        matrix base; row r, column k at g[r * ld + k]
  /// @param row0     first row of the tile; rows >= rows_total are zero-filled
  /// @param k0       first column of the tile; columns >= depth are zero-filled
  /// @param aligned  every 16-byte chunk inside the matrix is 16-byte aligned in global memory
  __device__ static void load(Element* smem, const Element* __restrict__ g, std::int64_t ld,
                              std::int64_t row0, std::int64_t rows_total, std::int64_t k0,
                              std::int64_t depth, bool aligned) noexcept {
    for (int c = static_cast<int>(threadIdx.x); c < chunks; c += Threads) {
      const int r = c / (BlockK / vec);
      const int kc = (c % (BlockK / vec)) * vec;
      const std::int64_t gr = row0 + r;
      const std::int64_t gk = k0 + kc;
      Element* dst = smem + r * SmemStride + kc;
      if (aligned && gr < rows_total && gk + vec <= depth) {
        arch::sm80::cp_async_16(dst, g + gr * ld + gk);
      } else {
#pragma unroll
        for (int e = 0; e < vec; ++e) {
          dst[e] = (gr < rows_total && gk + e < depth) ? g[gr * ld + gk + e] : Element(0.0f);
        }
      }
    }
  }
};

}  // namespace block
LCE_NAMESPACE_END
