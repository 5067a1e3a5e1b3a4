/// @file fused_forward_sm90.cuh
/// @brief The fused forward kernel for sm_90a: the same contract as fused_forward.cuh (tiles of
/// Z = X·Wᵀ + b folded into per-row streaming statistics, no logit in global memory), on the
/// TMA + wgmma pipeline of block/tile_pipeline_sm90.cuh. The epilogue folds each finished tile
/// into its rows' row_stats without leaving registers (a quad of lanes shares a row).
///
/// Grid: (row tiles of 128, vocabulary splits) from device::make_balanced_grid — row tiles
/// rounded up to the cluster's size, split s holding ⌊T/splits⌋ or ⌈T/splits⌉ of the T
/// vocabulary tiles (block::split_range), in block::grid_tile_of_block's order; the block of
/// (row tile i, split s) writes `partial[s·n + row]` and the target logit of rows whose target
/// lies in its range (rows past n: nothing).
#pragma once

#include <cuda.h>

#include <climits>
#include <cstdint>
#include <type_traits>

#include "../block/tile_pipeline_sm90.cuh"
#include "../block/tile_store_sm90.cuh"
#include "../detail/stored_exp.hpp"
#include "../thread/cross_entropy.cuh"
#include "../thread/row_stats.cuh"
#include "stored_offset.cuh"

LCE_NAMESPACE_BEGIN
namespace kernel {

/// General = false: the lean epilogue only (no bias, no class weights; partial tiles masked);
/// General = true: the general one (bias, class weights) on every tile. Two kernels, so that
/// the lean one's registers are not sized for the general fold (which spills at 256 columns).
/// Store (lean only): each tile's e^{z − m} and m also go to `params::store` (detail::stored_exp),
/// for the `stored` backward strategy.
template <class Element, class Config, bool General = false, bool Store = false>
struct fused_forward_sm90 {
  static_assert(!(General && Store), "the stored values come from the lean epilogue");
  /// Store: the values leave through a staging tile (block/tile_store_sm90.cuh), beside
  /// fewer stages.
  using pipeline = typename block::staged_pipeline<Element, Config, Store>::type;
  using shared_storage = typename pipeline::shared_storage;
  static constexpr int block_v = pipeline::block_v;
  static constexpr int frag = pipeline::frag;

  struct params {
    CUtensorMap x_map;  ///< X [n, d]: boxes of (block_m rows, block_k)
    CUtensorMap w_map;  ///< W [v, d]: boxes of (block_v rows, block_k)
    std::int64_t n, v, d;
    const Element* bias;        ///< [v] or null
    const float* class_weight;  ///< [v] or null
    thread::logit_transform transform;
    thread::target_view targets;
    thread::row_stats* partial;  ///< [splits, n]
    float* target_logit;         ///< [n]
    /// Σp·z, Σw·z and the argmax are wanted (entropy, label smoothing, argmax or correct);
    /// without them the lean epilogue leaves them out (0, 0 and the tile's first column).
    bool extras;
    detail::stored_exp<Element> store;  ///< Store only
    /// Store only: store.values [n, v] (row stride store.ld) in boxes of 64 rows ×
    /// block::tile_store_sm90::box_cols, 128-byte swizzle (the staging tile's layout).
    CUtensorMap store_map;
  };
  using tile_store = block::tile_store_sm90<block_v>;

  /// The epilogue of one consumer warpgroup: the statistics of its thread's two rows.
  struct epilogue {
    const params& p;
    int quad;
    std::int64_t rows[2];
    std::int64_t target[2];
    thread::row_stats stats[2];
    /// Store with per-row offsets (detail::stored_exp::offset): each row's c, or +inf past n.
    float offset[2] = {0.0f, 0.0f};
    /// Store: the warpgroup's side of the staging tile.
    tile_store out;

    __device__ __forceinline__ epilogue(const params& p_, int half, shared_storage& s)
        : p(p_),
          out(s.epilogue, half,
              static_cast<int>(block::grid_tile_of_block().row_tile * pipeline::block_m +
                               half * 64)) {
      quad = pipeline::fragment_quad();
      rows[0] = pipeline::fragment_row0(half);
      rows[1] = rows[0] + 8;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        target[h] = rows[h] < p.n ? p.targets(rows[h]) : -1;
        stats[h] = thread::row_stats_identity();
        if constexpr (Store) {
          if (p.store.offset != nullptr)
            offset[h] = rows[h] < p.n ? p.store.offset[rows[h]] : INFINITY;
        }
      }
    }

    __device__ __forceinline__ void tile(float (&acc)[frag], std::int64_t t) {
      const std::int64_t vocab0 = t * block_v;
      if constexpr (General) {
        fold_tile(p, acc, vocab0, quad, rows, target, stats);
      } else if (vocab0 + block_v <= p.v) {
        lean<false>(acc, vocab0);
      } else {
        lean<true>(acc, vocab0);  // the last, partial tile
      }
    }

    template <bool Masked>
    __device__ __forceinline__ void lean(float (&acc)[frag], std::int64_t vocab0) {
      if (p.transform.softcap > 0.0f) {
        if (p.extras) {
          fold_plain_tile<true, true, Masked, Store>(p, acc, vocab0, quad, rows, target, stats,
                                                     offset, *this);
        } else {
          fold_plain_tile<true, false, Masked, Store>(p, acc, vocab0, quad, rows, target, stats,
                                                      offset, *this);
        }
      } else if (p.extras) {
        fold_plain_tile<false, true, Masked, Store>(p, acc, vocab0, quad, rows, target, stats,
                                                    offset, *this);
      } else {
        fold_plain_tile<false, false, Masked, Store>(p, acc, vocab0, quad, rows, target, stats,
                                                     offset, *this);
      }
    }

    __device__ __forceinline__ void finish() {
      if constexpr (Store) out.finish();
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (rows[h] < p.n && quad == 0) {
          p.partial[block::grid_tile_of_block().split * p.n + rows[h]] = stats[h];
        }
      }
    }
  };

  __device__ __forceinline__ void operator()(const params& p, shared_storage& s) const {
    pipeline::run_split(&p.x_map, &p.w_map, s, p.v, p.d,
                        [&](int half) { return epilogue(p, half, s); });
  }

  /// Writes the target logits that lie in this tile: the thread holding a target's column
  /// selects it with compile-time register indices (a run-time index would spill the tile).
  /// It comes from the same fp32 tile that feeds the lse.
  __device__ __forceinline__ static void write_targets(const params& p, const float (&acc)[frag],
                                                       std::int64_t vocab0, int quad,
                                                       const std::int64_t (&rows)[2],
                                                       const std::int64_t (&target)[2]) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const std::int64_t local = target[h] - vocab0;
      if (local >= 0 && local < block_v && vocab0 + local < p.v &&
          static_cast<int>(local % 8) / 2 == quad) {
        const int jt = static_cast<int>(local / 8);
        const bool odd = (local % 2) != 0;
        float zt = 0.0f;
#pragma unroll
        for (int j = 0; j < block_v / 8; ++j) {
          zt = (j == jt) ? (odd ? acc[4 * j + 2 * h + 1] : acc[4 * j + 2 * h]) : zt;
        }
        p.target_logit[rows[h]] = zt;
      }
    }
  }

  /// Sums of the quad (the four lanes sharing a row), and the merge into the row's state
  /// (without Extras only the sum: Σp·z, Σw·z and `first` are not wanted).
  template <bool Extras = true>
  __device__ __forceinline__ static void merge_quad(float mx, float sum, float sum_pz, float sum_wz,
                                                    int first, std::int64_t vocab0,
                                                    thread::row_stats& stats) {
#pragma unroll
    for (int lane_mask = 1; lane_mask <= 2; lane_mask *= 2) {
      sum += __shfl_xor_sync(0xffffffffu, sum, lane_mask);
      if constexpr (Extras) {
        sum_pz += __shfl_xor_sync(0xffffffffu, sum_pz, lane_mask);
        sum_wz += __shfl_xor_sync(0xffffffffu, sum_wz, lane_mask);
        first = min(first, __shfl_xor_sync(0xffffffffu, first, lane_mask));
      }
    }
    if (mx != -INFINITY) {
      stats = thread::row_stats_merge(stats,
                                      thread::row_stats{mx, sum, sum_pz, sum_wz, vocab0 + first});
    }
  }

  /// The lean epilogue of a tile without bias or class weights: z = acc/τ (softcapped if
  /// Softcap), then e^{z−max} as 2^{(z − max)·log2e} on the special-function unit (the
  /// difference first, so the maximum's term is exactly 1 at any |z|; z·log2e − max·log2e as
  /// one fma would carry the rounding of max·log2e, ~1e22 at |z| ~ 1e30). A NaN
  /// or +inf logit still turns the row's sum into NaN (fmaxf drops NaN from the max, but
  /// z − max does not); so does −inf (through Σe·z with Extras, else through the tile's
  /// minimum). Without Extras a logit costs 6 instructions: scale, max, subtract, multiply,
  /// ex2, add. Masked (the last tile): columns at or past v become −inf and add nothing.
  template <bool Softcap, bool Extras, bool Masked, bool Stored>
  __device__ __forceinline__ static void fold_plain_tile(
      const params& p, float (&acc)[frag], std::int64_t vocab0, int quad,
      const std::int64_t (&rows)[2], const std::int64_t (&target)[2], thread::row_stats (&stats)[2],
      const float (&offset)[2], const epilogue& ep) {
    constexpr float log2e = 1.4426950408889634f;
    const float inv_t = p.transform.inv_temperature;
    const float cap = p.transform.softcap;
    const float cap_scale = Softcap ? inv_t / cap : 0.0f;
    const float inv_cap = Softcap ? 1.0f / cap : 0.0f;
    float mx[2] = {-INFINITY, -INFINITY};
    float lo[2] = {INFINITY, INFINITY};
    // Masked: this thread's column 8·j + e (of its quad's pair) is in range iff 8·j + e < limit.
    const int limit =
        Masked ? static_cast<int>(min(p.v - vocab0, static_cast<std::int64_t>(block_v))) - 2 * quad
               : block_v;
#pragma unroll
    for (int i = 0; i < frag; ++i) {
      if constexpr (Softcap) {
        acc[i] = arch::sm90::fast_softcap(acc[i], cap_scale, cap);
      } else {
        acc[i] *= inv_t;
      }
      bool in = true;
      if constexpr (Masked) {
        in = 8 * (i / 4) + i % 2 < limit;
        acc[i] = in ? acc[i] : -INFINITY;
      }
      mx[(i / 2) % 2] = fmaxf(mx[(i / 2) % 2], acc[i]);
      if constexpr ((!Extras || Masked) && !Softcap) {
        if (in) lo[(i / 2) % 2] = fminf(lo[(i / 2) % 2], acc[i]);
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
    }
    write_targets(p, acc, vocab0, quad, rows, target);
    if constexpr (Stored) ep.out.acquire();
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float sum = 0.0f, sum_pz = 0.0f, sum_z = 0.0f;
      int first = INT_MAX;
      // Stored: each four pairs of e^{z − m} go to the staging as soon as they are made, so
      // that no register holds them longer (the tile's accumulators are all live here).
      std::uint32_t packed[4] = {0u, 0u, 0u, 0u};
      const bool row_in = rows[h] < p.n;
      // What e^{z − max} is multiplied by before it is stored: 1 (with the tile's maximum kept
      // beside), or with a per-row offset c, e^{max − c} (so e^{z − c} is stored; a maximum
      // more than stored_offset_limit above c flags the row for recomputation, and the factor
      // stays finite). An ignored row's c is +inf: its values are 0.
      float factor = 1.0f;
      if constexpr (Stored) {
        if (p.store.offset != nullptr) {
          const float lead = mx[h] - offset[h];
          factor = arch::sm90::fast_exp2(fminf(lead, stored_offset_limit) * log2e);
          if (row_in && quad == 0 && lead > stored_offset_limit) p.store.flagged[rows[h]] = 1;
        } else if (row_in && quad == 0) {
          p.store.tile_max[rows[h] * p.store.tiles + vocab0 / block_v] = mx[h];
        }
      }
#pragma unroll
      for (int j = block_v / 8 - 1; j >= 0; --j) {  // downwards: the last match is the first
        float ez_pair[2];
#pragma unroll
        for (int e = 1; e >= 0; --e) {
          const float z = acc[4 * j + 2 * h + e];
          const float ez = arch::sm90::fast_exp2((z - mx[h]) * log2e);
          // fmaxf: a NaN logit stores 0 (its row's lse is NaN, which reaches its gradient;
          // an ignored row's 0·NaN must not reach dW)
          if constexpr (Stored) {
            float value = ez * factor;
            if constexpr (Softcap) {
              // With offsets the stored value carries dz/draw's (1 − (z/c)²), which varies
              // along the row (the pass form computes it from z instead).
              if (p.store.offset != nullptr) {
                const float u = z * inv_cap;
                value *= fmaf(-u, u, 1.0f);
              }
            }
            ez_pair[e] = fmaxf(value, 0.0f);
          }
          sum += ez;
          if constexpr (Extras) {
            // Masked: −inf columns (masked, or a −inf logit, which the minimum catches) add
            // nothing here; comparing z keeps no per-column mask alive between the loops.
            const bool in = !Masked || z != -INFINITY;
            sum_pz = in ? fmaf(ez, z, sum_pz) : sum_pz;
            sum_z += in ? z : 0.0f;
            first = (z == mx[h]) ? 8 * j + 2 * quad + e : first;
          }
        }
        if constexpr (Stored) {
          // Rows past n and columns past v lie outside store_map: the bulk store skips them.
          packed[j % 4] = arch::sm90::pack_pair<Element>(ez_pair[0], ez_pair[1]);
          if (j % 4 == 0) ep.out.put(h, j, packed);
        }
      }
      // −inf logits add e = 0 to the sum but 0·(−inf) = NaN to Σe·z: the row turns NaN, as
      // the general path's logit_transform makes it (an infinite logit is never finite loss).
      // (The softcap already maps ±inf to NaN.)
      if constexpr (Extras && !Masked) {
        if (sum_pz != sum_pz) sum = NAN;
      } else if constexpr (!Softcap) {
        if (lo[h] == -INFINITY) sum = NAN;
      }
      if constexpr (!Extras) first = 0;
      merge_quad<Extras>(mx[h], sum, sum_pz, sum_z, first, vocab0, stats[h]);
    }
    if constexpr (Stored) ep.out.release(&p.store_map, static_cast<int>(vocab0));
  }

  /// Calls f(j, e, col, in) for each column of a tile this thread holds: tile-local column
  /// col = 8·j + 2·quad + e (at acc[4·j + 2·h + e] of either row h); `in`: vocab0 + col < v,
  /// known true for a full tile.
  template <class F>
  __device__ __forceinline__ static void for_each_column(const params& p, std::int64_t vocab0,
                                                         int quad, bool full_tile, F&& f) {
#pragma unroll
    for (int j = 0; j < block_v / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = 8 * j + 2 * quad + e;
        f(j, e, col, full_tile || vocab0 + col < p.v);
      }
    }
  }

  /// Folds one finished tile (columns vocab0 + 8·j + 2·quad + e of rows[h] at
  /// acc[4·j + 2·h + e]) into the rows' statistics. The four lanes of a quad hold one row's
  /// columns between them and end with the same merged statistics.
  __device__ __forceinline__ static void fold_tile(const params& p, float (&acc)[frag],
                                                   std::int64_t vocab0, int quad,
                                                   const std::int64_t (&rows)[2],
                                                   const std::int64_t (&target)[2],
                                                   thread::row_stats (&stats)[2]) {
    const bool full_tile = vocab0 + block_v <= p.v;
    float mx[2] = {-INFINITY, -INFINITY};
    for_each_column(p, vocab0, quad, full_tile, [&](int j, int e, int col, bool in) {
      const float b = (p.bias != nullptr && in) ? static_cast<float>(p.bias[vocab0 + col]) : 0.0f;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float& z = acc[4 * j + 2 * h + e];
        z = in ? p.transform(z + b) : -INFINITY;
        mx[h] = thread::nan_max(mx[h], z);
      }
    });
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mx[h] = thread::nan_max(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
      mx[h] = thread::nan_max(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
    }

    write_targets(p, acc, vocab0, quad, rows, target);

    float sum[2] = {0.0f, 0.0f}, sum_pz[2] = {0.0f, 0.0f}, sum_wz[2] = {0.0f, 0.0f};
    int first[2] = {INT_MAX, INT_MAX};
    for_each_column(p, vocab0, quad, full_tile, [&](int j, int e, int col, bool in) {
      const float w =
          !in ? 0.0f : (p.class_weight != nullptr ? p.class_weight[vocab0 + col] : 1.0f);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float z = acc[4 * j + 2 * h + e];
        if (z != -INFINITY) {  // masked columns contribute nothing (and no −inf·0)
          const float ez = expf(z - mx[h]);
          sum[h] += ez;
          sum_pz[h] += ez * z;
          sum_wz[h] += w * z;
        }
        first[h] = (z == mx[h] && col < first[h]) ? col : first[h];
      }
    });
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      merge_quad(mx[h], sum[h], sum_pz[h], sum_wz[h], first[h], vocab0, stats[h]);
    }
  }
};

/// One block per SM, with the pipeline's smem_bytes of dynamic shared memory. Without sm_90a
/// features (block::tile_pipeline_sm90::run_kernel) its rows read NaN.
template <class Element, class Config, bool General, bool Store = false>
__global__ void __launch_bounds__(Config::threads, 1) LCE_KERNEL_VISIBILITY
    fused_forward_sm90_kernel(
        const __grid_constant__
        typename fused_forward_sm90<Element, Config, General, Store>::params p) {
  using kernel_t = fused_forward_sm90<Element, Config, General, Store>;
  kernel_t::pipeline::template run_kernel<kernel_t>(p, [&](std::int64_t row) {
    if (row < p.n) {
      p.partial[block::grid_tile_of_block().split * p.n + row] =
          thread::row_stats{NAN, NAN, NAN, NAN, -1};
    }
  });
}

}  // namespace kernel
LCE_NAMESPACE_END
