/// @file fused_forward.cuh
/// @brief The fused forward kernel: tiles of Z = X·Wᵀ + b computed on chip and folded into a
/// per-row online log-sum-exp; no logit ever reaches global memory.
///
/// Grid: (row tiles, vocabulary splits). Block (i, s) owns rows [i·BlockM, (i+1)·BlockM) and a
/// contiguous range of vocabulary tiles; it writes one partial lse state per row to
/// `partial[s·n + row]`, and the target logit of every row whose target falls in its range.
#pragma once

#include <cstdint>

#include "../block/tile_matmul.cuh"
#include "../thread/online_lse.cuh"
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
    const Element* bias;            ///< [v] or null
    const std::int64_t* targets;    ///< [n]
    thread::lse_state* partial;     ///< [splits, n]
    float* target_logit;            ///< [n]; written by the block whose range holds the target
    std::int64_t tiles_per_split;   ///< vocabulary tiles per block
  };

  __device__ void operator()(const params& p, shared_storage& s) const {
    const int lane = static_cast<int>(threadIdx.x) % 32;
    const int warp = static_cast<int>(threadIdx.x) / 32;
    const std::int64_t row0 = static_cast<std::int64_t>(blockIdx.x) * Config::block_m;
    const std::int64_t vocab_tiles = (p.op.v + Config::block_v - 1) / Config::block_v;
    const std::int64_t tile_begin = static_cast<std::int64_t>(blockIdx.y) * p.tiles_per_split;
    const std::int64_t tile_end = min(vocab_tiles, tile_begin + p.tiles_per_split);

    // Lane i < rows_per_warp keeps the running state and the target of the warp's row i, so
    // that nothing per row stays live in registers across the mainloop.
    const std::int64_t my_row = row0 + warp * rows_per_warp + lane;
    const bool owns_row = lane < rows_per_warp && my_row < p.op.n;
    thread::lse_state my_state = thread::lse_identity();
    const std::int64_t my_target = owns_row ? p.targets[my_row] : -1;

    for (std::int64_t t = tile_begin; t < tile_end; ++t) {
      const std::int64_t vocab0 = t * Config::block_v;
      mainloop::run(s, p.op, row0, vocab0);

      float bias[cols_per_lane];
#pragma unroll
      for (int j = 0; j < cols_per_lane; ++j) {
        const std::int64_t v = vocab0 + lane + 32 * j;
        bias[j] = (p.bias != nullptr && v < p.op.v) ? static_cast<float>(p.bias[v]) : 0.0f;
      }
#pragma unroll 2
      for (int i = 0; i < rows_per_warp; ++i) {
        const int r = warp * rows_per_warp + i;
        float z[cols_per_lane];
        float local_max = -INFINITY;
#pragma unroll
        for (int j = 0; j < cols_per_lane; ++j) {
          const int c = lane + 32 * j;
          z[j] = (vocab0 + c < p.op.v) ? s.acc[r * mainloop::acc_stride + c] + bias[j] : -INFINITY;
          local_max = thread::nan_max(local_max, z[j]);
        }
        const float tile_max = warp::allreduce_max(local_max);
        float local_sum = 0.0f;
        if (tile_max != -INFINITY) {
#pragma unroll
          for (int j = 0; j < cols_per_lane; ++j) local_sum += expf(z[j] - tile_max);
        }
        const float tile_sum = warp::allreduce_sum(local_sum);
        if (lane == i) my_state = thread::lse_merge(my_state, {tile_max, tile_sum});
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

    if (owns_row) p.partial[static_cast<std::int64_t>(blockIdx.y) * p.op.n + my_row] = my_state;
  }
};

template <class Element, class Config>
__global__ void __launch_bounds__(Config::threads, 2) LCE_KERNEL_VISIBILITY
    fused_forward_kernel(const typename fused_forward<Element, Config>::params p) {
  using storage_t = typename fused_forward<Element, Config>::shared_storage;
  extern __shared__ __align__(128) unsigned char smem[];
  fused_forward<Element, Config>{}(p, *reinterpret_cast<storage_t*>(smem));
}

}  // namespace kernel
LCE_NAMESPACE_END
