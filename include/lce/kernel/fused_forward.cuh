/// @file fused_forward.cuh
/// @brief The fused forward kernel: tiles of Z = X·Wᵀ + b computed on chip and folded into a
/// per-row streaming statistics (online lse, entropy and smoothing sums, argmax); no logit
/// ever reaches global memory.
///
/// Grid: (row tiles, vocabulary splits). Block (i, s) owns rows [i·BlockM, (i+1)·BlockM) and a
/// contiguous range of vocabulary tiles; it writes one partial row_stats per row to
/// `partial[s·n + row]`, and the target logit of every row whose target falls in its range.
#pragma once

#include <climits>
#include <cstdint>

#include "../block/tile_matmul.cuh"
#include "../thread/cross_entropy.cuh"
#include "../thread/row_stats.cuh"
#include "../warp/reduce.cuh"

LCE_NAMESPACE_BEGIN
namespace kernel {

template <class Element, class Config>
struct fused_forward {
  using mainloop = block::tile_matmul<Element, Config>;
  using shared_storage = typename mainloop::shared_storage;
  static constexpr int warps = Config::threads / 32;
  static constexpr int rows_per_warp = Config::block_m / warps;
  static constexpr int cols_per_lane = Config::block_v / 32;
  static_assert(Config::block_m % warps == 0, "BlockM must be a multiple of the warp count");
  static_assert(Config::block_v % 32 == 0, "BlockV must be a multiple of 32");
  static_assert(rows_per_warp <= 32, "a warp keeps one row's state per lane");

  struct params {
    block::tile_operands<Element> op;
    const Element* bias;        ///< [v] or null
    const float* class_weight;  ///< [v] or null (Σ w·z for label smoothing)
    thread::logit_transform transform;
    thread::target_view targets;
    thread::row_stats* partial;    ///< [splits, n]
    float* target_logit;           ///< [n]; written by the block whose range holds the target
    std::int64_t tiles_per_split;  ///< vocabulary tiles per block
  };

  __device__ void operator()(const params& p, shared_storage& s) const {
    const int lane = static_cast<int>(threadIdx.x) % 32;
    const int warp = static_cast<int>(threadIdx.x) / 32;
    const std::int64_t row0 = static_cast<std::int64_t>(blockIdx.x) * Config::block_m;
    const std::int64_t vocab_tiles = (p.op.v + Config::block_v - 1) / Config::block_v;
    const std::int64_t tile_begin = static_cast<std::int64_t>(blockIdx.y) * p.tiles_per_split;
    const std::int64_t tile_end = min(vocab_tiles, tile_begin + p.tiles_per_split);

    // Lane i < rows_per_warp keeps the running statistics and the target of the warp's row i,
    // so that nothing per row stays live in registers across the mainloop.
    const std::int64_t my_row = row0 + warp * rows_per_warp + lane;
    const bool owns_row = lane < rows_per_warp && my_row < p.op.n;
    thread::row_stats my_stats = thread::row_stats_identity();
    const std::int64_t my_target = owns_row ? p.targets(my_row) : -1;

    for (std::int64_t t = tile_begin; t < tile_end; ++t) {
      const std::int64_t vocab0 = t * Config::block_v;
      mainloop::run(s, p.op, row0, vocab0);

      float bias[cols_per_lane];
      float weight[cols_per_lane];
#pragma unroll
      for (int j = 0; j < cols_per_lane; ++j) {
        const std::int64_t v = vocab0 + lane + 32 * j;
        const bool in = v < p.op.v;
        bias[j] = (p.bias != nullptr && in) ? static_cast<float>(p.bias[v]) : 0.0f;
        weight[j] = in ? (p.class_weight != nullptr ? p.class_weight[v] : 1.0f) : 0.0f;
      }
#pragma unroll 2
      for (int i = 0; i < rows_per_warp; ++i) {
        const int r = warp * rows_per_warp + i;
        float z[cols_per_lane];
        float local_max = -INFINITY;
#pragma unroll
        for (int j = 0; j < cols_per_lane; ++j) {
          const int c = lane + 32 * j;
          z[j] = (vocab0 + c < p.op.v) ? p.transform(s.acc[r * mainloop::acc_stride + c] + bias[j])
                                       : -INFINITY;
          local_max = thread::nan_max(local_max, z[j]);
        }
        const float tile_max = warp::allreduce_max(local_max);
        float sum = 0.0f, sum_pz = 0.0f, sum_wz = 0.0f;
        int first = INT_MAX;  // first column holding the maximum
#pragma unroll
        for (int j = 0; j < cols_per_lane; ++j) {
          if (z[j] != -INFINITY) {  // masked columns contribute nothing (and no −inf·0)
            const float e = expf(z[j] - tile_max);
            sum += e;
            sum_pz += e * z[j];
            sum_wz += weight[j] * z[j];
          }
          if (z[j] == tile_max && first == INT_MAX) first = lane + 32 * j;
        }
        const thread::row_stats tile{tile_max, warp::allreduce_sum(sum),
                                     warp::allreduce_sum(sum_pz), warp::allreduce_sum(sum_wz),
                                     vocab0 + min_over_warp(first)};
        if (lane == i && tile_max != -INFINITY) my_stats = thread::row_stats_merge(my_stats, tile);
        // The target logit comes from the same fp32 tile that feeds the lse.
        const std::int64_t offset = __shfl_sync(0xffffffffu, my_target, i) - vocab0;
        if (offset >= 0 && offset < Config::block_v && vocab0 + offset < p.op.v) {
#pragma unroll
          for (int j = 0; j < cols_per_lane; ++j) {
            if (offset == lane + 32 * j) p.target_logit[row0 + r] = z[j];
          }
        }
      }
      __syncthreads();  // the accumulator tile is read; the next mainloop may overwrite it
    }

    if (owns_row) p.partial[static_cast<std::int64_t>(blockIdx.y) * p.op.n + my_row] = my_stats;
  }

 private:
  /// Smallest column over the warp (within one tile, so an int). A NaN tile maximum matches no
  /// column; the argmax is then meaningless, as the lse is NaN.
  __device__ static int min_over_warp(int x) {
    return static_cast<int>(__reduce_min_sync(0xffffffffu, static_cast<unsigned>(x)));
  }
};

/// Shared memory is dynamic (sizeof(shared_storage) bytes, which may exceed 48 KiB: the
/// launcher raises the limit). Two blocks per SM: one's epilogue overlaps the other's
/// mainloop.
template <class Element, class Config>
__global__ void __launch_bounds__(Config::threads, 2) LCE_KERNEL_VISIBILITY
    fused_forward_kernel(const typename fused_forward<Element, Config>::params p) {
  using storage_t = typename fused_forward<Element, Config>::shared_storage;
  extern __shared__ __align__(128) unsigned char smem[];
  fused_forward<Element, Config>{}(p, *reinterpret_cast<storage_t*>(smem));
}

}  // namespace kernel
LCE_NAMESPACE_END
