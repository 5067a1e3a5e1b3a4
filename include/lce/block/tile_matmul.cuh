/// @file tile_matmul.cuh
/// @brief Block-wide tiled matmul: one (BlockM, BlockV) tile of Z = X·Wᵀ with fp32
/// accumulation, left in shared memory for the epilogue. 16-bit inputs run on the tensor cores
/// (mma.sync through WMMA fragments); fp32 inputs run on FFMA so that the result is exact to
/// fp32 (no TF32). The K loop is a Config::stages-deep cp.async pipeline.
#pragma once

#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "tile_loader.cuh"

LCE_NAMESPACE_BEGIN
namespace block {

/// @brief Where the operands of a tile come from.
template <class Element>
struct tile_operands {
  const Element* x;  ///< [n, ldx]
  const Element* w;  ///< [v, ldw]
  std::int64_t ldx, ldw, n, v, d;
  bool x_aligned;  ///< 16-byte chunks of X rows are 16-byte aligned
  bool w_aligned;
};

/// @brief The mainloop. Use: `run(storage, ops, row0, vocab0)`, then read
/// `storage.acc[r * acc_stride + c]` for r < BlockM, c < BlockV; call `__syncthreads()` before
/// the next `run` (the accumulator tile shares memory with the operand stages).
template <class Element, class Config>
struct tile_matmul {
  static constexpr int bm = Config::block_m;
  static constexpr int bv = Config::block_v;
  static constexpr int bk = Config::block_k;
  static constexpr int threads = Config::threads;
  static constexpr bool tensor_cores = !std::is_same_v<Element, float>;
  /// 16 bytes of padding per shared row keeps cp.async aligned and spreads the banks.
  static constexpr int stride = bk + 16 / static_cast<int>(sizeof(Element));
  static constexpr int acc_stride = bv + 4;

  static constexpr int stages = Config::stages;
  struct stage_storage {
    Element x[stages][bm * stride];  // (BlockM, BlockK) per stage
    Element w[stages][bv * stride];  // (BlockV, BlockK) per stage
  };
  union shared_storage {
    stage_storage stages;
    float acc[bm * acc_stride];  // (BlockM, BlockV)
  };

  using x_loader = tile_loader<Element, bm, bk, stride, threads>;
  using w_loader = tile_loader<Element, bv, bk, stride, threads>;

  // Tensor-core warp tile.
  static constexpr int warp_m = bm / Config::warps_m;
  static constexpr int warp_v = bv / Config::warps_v;
  static constexpr int frags_m = warp_m / 16;
  static constexpr int frags_v = warp_v / 16;
  // FFMA thread tile: a 16 × (threads/16) grid of threads, columns interleaved by 16.
  static constexpr int threads_v = 16;
  static constexpr int threads_m = threads / threads_v;
  static constexpr int thread_m = bm / threads_m;
  static constexpr int thread_v = bv / threads_v;

  static_assert(bk % 16 == 0, "BlockK must be a multiple of 16");
  static_assert(!tensor_cores || (warp_m % 16 == 0 && warp_v % 16 == 0),
                "tensor-core warp tiles must be multiples of 16");
  static_assert(tensor_cores || (bm % threads_m == 0 && bv % threads_v == 0),
                "FFMA tile must divide among the threads");

  __device__ static void run(shared_storage& s, const tile_operands<Element>& op, std::int64_t row0,
                             std::int64_t vocab0) {
    const std::int64_t k_tiles = (op.d + bk - 1) / bk;
    // Prologue: stages 0 .. stages-2 in flight. Every step commits one group (possibly
    // empty), so "wait until stages-2 groups are pending" always means "stage kt landed".
#pragma unroll
    for (int st = 0; st < stages - 1; ++st) {
      if (st < k_tiles) load_stage(s, op, row0, vocab0, st, st);
      arch::sm80::cp_async_commit();
    }

    if constexpr (tensor_cores) {
      using namespace nvcuda;
      const int warp = static_cast<int>(threadIdx.x) / 32;
      const int wm = warp / Config::warps_v;
      const int wv = warp % Config::warps_v;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[frags_m][frags_v];
#pragma unroll
      for (int i = 0; i < frags_m; ++i)
#pragma unroll
        for (int j = 0; j < frags_v; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

      for (std::int64_t kt = 0; kt < k_tiles; ++kt) {
        const int cur = advance(s, op, row0, vocab0, kt, k_tiles);
        const Element* xs = s.stages.x[cur];
        const Element* ws = s.stages.w[cur];
#pragma unroll
        for (int kk = 0; kk < bk; kk += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, Element, wmma::row_major> a[frags_m];
          wmma::fragment<wmma::matrix_b, 16, 16, 16, Element, wmma::col_major> b[frags_v];
#pragma unroll
          for (int i = 0; i < frags_m; ++i)
            wmma::load_matrix_sync(a[i], xs + (wm * warp_m + i * 16) * stride + kk, stride);
#pragma unroll
          for (int j = 0; j < frags_v; ++j)
            wmma::load_matrix_sync(b[j], ws + (wv * warp_v + j * 16) * stride + kk, stride);
#pragma unroll
          for (int i = 0; i < frags_m; ++i)
#pragma unroll
            for (int j = 0; j < frags_v; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
        }
      }
      finish_pipeline();
#pragma unroll
      for (int i = 0; i < frags_m; ++i)
#pragma unroll
        for (int j = 0; j < frags_v; ++j)
          wmma::store_matrix_sync(
              s.acc + (wm * warp_m + i * 16) * acc_stride + wv * warp_v + j * 16, acc[i][j],
              acc_stride, wmma::mem_row_major);
    } else {
      const int tm = static_cast<int>(threadIdx.x) / threads_v;
      const int tv = static_cast<int>(threadIdx.x) % threads_v;
      float acc[thread_m][thread_v] = {};
      for (std::int64_t kt = 0; kt < k_tiles; ++kt) {
        const int cur = advance(s, op, row0, vocab0, kt, k_tiles);
        const float* xs = s.stages.x[cur];
        const float* ws = s.stages.w[cur];
#pragma unroll 4
        for (int k = 0; k < bk; ++k) {
          float a[thread_m];
          float b[thread_v];
#pragma unroll
          for (int i = 0; i < thread_m; ++i) a[i] = xs[(tm * thread_m + i) * stride + k];
#pragma unroll
          for (int j = 0; j < thread_v; ++j) b[j] = ws[(tv + j * threads_v) * stride + k];
#pragma unroll
          for (int i = 0; i < thread_m; ++i)
#pragma unroll
            for (int j = 0; j < thread_v; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
      }
      finish_pipeline();
#pragma unroll
      for (int i = 0; i < thread_m; ++i)
#pragma unroll
        for (int j = 0; j < thread_v; ++j)
          s.acc[(tm * thread_m + i) * acc_stride + tv + j * threads_v] = acc[i][j];
    }
    __syncthreads();  // the accumulator tile is complete and visible to every thread
  }

 private:
  __device__ static void load_stage(shared_storage& s, const tile_operands<Element>& op,
                                    std::int64_t row0, std::int64_t vocab0, std::int64_t kt,
                                    int stage) {
    x_loader::load(s.stages.x[stage], op.x, op.ldx, row0, op.n, kt * bk, op.d, op.x_aligned);
    w_loader::load(s.stages.w[stage], op.w, op.ldw, vocab0, op.v, kt * bk, op.d, op.w_aligned);
  }

  /// Waits for stage kt, then refills the stage consumed in step kt−1 with tile
  /// kt+stages−1. The barrier both publishes stage kt and retires every read of the stage
  /// being refilled. Returns the stage to compute on.
  __device__ static int advance(shared_storage& s, const tile_operands<Element>& op,
                                std::int64_t row0, std::int64_t vocab0, std::int64_t kt,
                                std::int64_t k_tiles) {
    arch::sm80::cp_async_wait<stages - 2>();
    __syncthreads();
    const std::int64_t next = kt + stages - 1;
    if (next < k_tiles) load_stage(s, op, row0, vocab0, next, static_cast<int>(next % stages));
    arch::sm80::cp_async_commit();
    return static_cast<int>(kt % stages);
  }

  /// Drains the pipeline and retires every read of the stages before the accumulator tile,
  /// which shares their memory, is written.
  __device__ static void finish_pipeline() {
    arch::sm80::cp_async_wait<0>();
    __syncthreads();
  }
};

}  // namespace block
LCE_NAMESPACE_END
