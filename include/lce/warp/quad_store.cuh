/// @file quad_store.cuh
/// @brief 16-byte row stores from a wgmma accumulator fragment: a quad of lanes (four lanes
/// sharing a row) holds, for each group of 4 column octets, 4 × 4 packed pairs (lane q: pairs
/// 2q and 2q + 1 of every octet). Two butterfly exchanges (shfl.xor 1, then 2) transpose them
/// so that lane q holds the whole octet 4·g + q, which it writes with one 16-byte store: a quad
/// writes 64 contiguous bytes of a row (two full 32-byte sectors), where pair stores write
/// 4-byte pieces of eight rows per instruction and half-fill each sector.
#pragma once

#include <cstdint>

#include "../version.hpp"

LCE_NAMESPACE_BEGIN
namespace warp {

/// Lane q of the quad passes `w[k]` = the packed pair 2q (+1) of octet 4·g + k of its row;
/// returns with w = the 8 elements of octet 4·g + q. Every lane of the warp must call it.
__device__ __forceinline__ void quad_transpose(std::uint32_t (&w)[4], int quad) {
  const bool b0 = (quad & 1) != 0, b1 = (quad & 2) != 0;
  // Swap lane bit 0 with word bit 0, then lane bit 1 with word bit 1.
#pragma unroll
  for (int hi = 0; hi < 2; ++hi) {
    const std::uint32_t send = b0 ? w[2 * hi] : w[2 * hi + 1];
    const std::uint32_t recv = __shfl_xor_sync(0xffffffffu, send, 1);
    if (b0) {
      w[2 * hi] = recv;
    } else {
      w[2 * hi + 1] = recv;
    }
  }
#pragma unroll
  for (int lo = 0; lo < 2; ++lo) {
    const std::uint32_t send = b1 ? w[lo] : w[2 + lo];
    const std::uint32_t recv = __shfl_xor_sync(0xffffffffu, send, 2);
    if (b1) {
      w[lo] = recv;
    } else {
      w[2 + lo] = recv;
    }
  }
}

/// Stores one row of a full tile of `BlockV` columns: `pair(j)` gives this lane's packed pair
/// of octet j (columns 8·j + 2·quad, + 1). `out` is the row's tile start, 16-byte aligned;
/// `store` false (a row past the end) only skips the stores — the lane still shuffles.
template <int BlockV, class Element, class Pair>
__device__ __forceinline__ void quad_store_row(Element* out, int quad, bool store, Pair&& pair) {
#pragma unroll
  for (int g = 0; g < BlockV / 32; ++g) {
    std::uint32_t w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) w[k] = pair(4 * g + k);
    quad_transpose(w, quad);
    if (store) {
      *reinterpret_cast<uint4*>(out + 8 * (4 * g + quad)) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
}

}  // namespace warp
LCE_NAMESPACE_END
