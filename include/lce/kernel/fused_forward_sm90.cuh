/// @file fused_forward_sm90.cuh
/// @brief The fused forward kernel for sm_90a: the same contract as fused_forward.cuh (tiles of
/// Z = X·Wᵀ + b folded into per-row streaming statistics, no logit in global memory), built on
/// Hopper's bulk tensor copies and warpgroup MMA.
///
/// Block of three warpgroups. Warpgroup 0 is the producer: one thread streams the (128, 64)
/// tile of X and the (BlockV, 64) tile of W of every K step into a Stages-deep ring of shared
/// memory stages (128-byte swizzle, zero fill outside the matrices), each stage guarded by a
/// "full" mbarrier (transaction bytes) and an "empty" one (consumer arrivals). Warpgroups 1
/// and 2 each own 64 rows: they run wgmma over the stages into 64 × BlockV fp32 accumulators in
/// registers, then fold the finished tile into their rows' row_stats without leaving
/// registers (a quad of lanes shares a row), while the producer already loads the next tile.
///
/// Grid: (row tiles of 128, vocabulary splits), as the mma.sync kernel; block (i, s) writes
/// `partial[s·n + row]` and the target logit of rows whose target lies in its range.
#pragma once

#include <cuda.h>

#include <climits>
#include <cstdint>

#include "../detail/sm90.cuh"
#include "../thread/cross_entropy.cuh"
#include "../thread/row_stats.cuh"

LCE_NAMESPACE_BEGIN
namespace kernel {

template <class Element, class Config>
struct fused_forward_sm90 {
  static constexpr int block_m = Config::block_m;  // 128: two consumer warpgroups of 64 rows
  static constexpr int block_v = Config::block_v;
  static constexpr int block_k = Config::block_k;  // 64: one 128-byte swizzle row
  static constexpr int stages = Config::stages;
  static constexpr int threads = Config::threads;  // 384
  static constexpr int frag = block_v / 2;         // accumulators per consumer thread
  static constexpr int a_bytes = block_m * block_k * 2;
  static constexpr int b_bytes = block_v * block_k * 2;
  static constexpr unsigned stage_bytes = a_bytes + b_bytes;
  static constexpr int consumers = 256;
  static_assert(sizeof(Element) == 2, "the sm_90a kernel takes 16-bit elements");
  static_assert(block_m == 128 && block_k == 64 && threads == 384, "fixed warpgroup layout");

  struct shared_storage {
    alignas(1024) unsigned char a[stages][a_bytes];
    alignas(1024) unsigned char b[stages][b_bytes];
    std::uint64_t full[stages];
    std::uint64_t empty[stages];
  };
  /// Dynamic shared memory to request: the storage plus slack to align it to 1024 bytes.
  static constexpr int smem_bytes = static_cast<int>(sizeof(shared_storage)) + 1024;

  struct params {
    CUtensorMap x_map;  ///< X [n, d]: boxes of (block_m rows, block_k)
    CUtensorMap w_map;  ///< W [v, d]: boxes of (block_v rows, block_k)
    std::int64_t n, v, d;
    const Element* bias;            ///< [v] or null
    const float* class_weight;      ///< [v] or null
    thread::logit_transform transform;
    thread::target_view targets;
    thread::row_stats* partial;     ///< [splits, n]
    float* target_logit;            ///< [n]
    std::int64_t tiles_per_split;
  };

  /// Whether full tiles take the lean epilogue (no bias, no class weights; softcap allowed).
  __host__ __device__ static bool lean_epilogue(const params& p) noexcept {
    return p.bias == nullptr && p.class_weight == nullptr;
  }

  __device__ __forceinline__ void operator()(const params& p, shared_storage& s) const {
    const int warpgroup = static_cast<int>(threadIdx.x) / 128;
    const std::int64_t row0 = static_cast<std::int64_t>(blockIdx.x) * block_m;
    const std::int64_t vocab_tiles = (p.v + block_v - 1) / block_v;
    const std::int64_t tile_begin = static_cast<std::int64_t>(blockIdx.y) * p.tiles_per_split;
    const std::int64_t tile_end = min(vocab_tiles, tile_begin + p.tiles_per_split);
    const int k_tiles = static_cast<int>((p.d + block_k - 1) / block_k);

    if (threadIdx.x == 0) {
      for (int st = 0; st < stages; ++st) {
        detail::sm90::barrier_init(&s.full[st], 1);
        detail::sm90::barrier_init(&s.empty[st], consumers);
      }
      detail::sm90::barrier_init_fence();
    }
    __syncthreads();

    if (warpgroup == 0) {
      detail::sm90::set_max_registers_dec<40>();
      if (threadIdx.x == 0) produce(p, s, row0, tile_begin, tile_end, k_tiles);
    } else {
      detail::sm90::set_max_registers_inc<232>();
      consume(p, s, warpgroup - 1, row0, tile_begin, tile_end, k_tiles);
    }
  }

 private:
  __device__ __forceinline__ static void produce(const params& p, shared_storage& s, std::int64_t row0,
                                 std::int64_t tile_begin, std::int64_t tile_end, int k_tiles) {
    detail::sm90::tma_prefetch_descriptor(&p.x_map);
    detail::sm90::tma_prefetch_descriptor(&p.w_map);
    unsigned it = 0;
    for (std::int64_t tile = tile_begin; tile < tile_end; ++tile) {
      for (int k = 0; k < k_tiles; ++k, ++it) {
        const unsigned st = it % stages;
        // A fresh barrier counts as having completed the phase before its first: round 0
        // passes at once, round r waits for the consumers' release of round r − 1.
        detail::sm90::barrier_wait(&s.empty[st], ((it / stages) & 1u) ^ 1u);
        detail::sm90::barrier_arrive_expect_tx(&s.full[st], stage_bytes);
        detail::sm90::tma_load_2d(s.a[st], &p.x_map, k * block_k, static_cast<int>(row0),
                                  &s.full[st]);
        detail::sm90::tma_load_2d(s.b[st], &p.w_map, k * block_k,
                                  static_cast<int>(tile * block_v), &s.full[st]);
      }
    }
  }

  __device__ __forceinline__ static void consume(const params& p, shared_storage& s, int half, std::int64_t row0,
                                 std::int64_t tile_begin, std::int64_t tile_end, int k_tiles) {
    const int t = static_cast<int>(threadIdx.x) % 128;
    const int quad = t % 4;
    // Fragment rows of this thread: rows[0] and rows[0] + 8 of the warpgroup's 64.
    std::int64_t rows[2];
    rows[0] = row0 + half * 64 + (t / 32) * 16 + (t % 32) / 4;
    rows[1] = rows[0] + 8;
    std::int64_t target[2];
    thread::row_stats stats[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      target[h] = rows[h] < p.n ? p.targets(rows[h]) : -1;
      stats[h] = thread::row_stats_identity();
    }

    const bool plain = lean_epilogue(p);
    float acc[frag];
    unsigned it = 0;
    const int a_offset = half * 64 * 128;  // this warpgroup's 64 rows of 128 bytes
    for (std::int64_t tile = tile_begin; tile < tile_end; ++tile) {
      unsigned previous = 0;
      for (int k = 0; k < k_tiles; ++k, ++it) {
        const unsigned st = it % stages;
        detail::sm90::barrier_wait(&s.full[st], (it / stages) & 1u);
        const std::uint64_t da = detail::sm90::smem_descriptor_sw128(s.a[st] + a_offset);
        const std::uint64_t db = detail::sm90::smem_descriptor_sw128(s.b[st]);
        detail::sm90::wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < block_k / 16; ++kk) {
          detail::sm90::wgmma_m64k16<Element, block_v>(acc, da + 2 * kk, db + 2 * kk,
                                                       (k > 0 || kk > 0) ? 1 : 0);
        }
        detail::sm90::wgmma_commit();
        if (k > 0) {  // step k − 1's MMAs are done: its stage may be refilled
          detail::sm90::wgmma_wait<1>();
          detail::sm90::barrier_arrive(&s.empty[previous]);
        }
        previous = st;
      }
      detail::sm90::wgmma_wait<0>();
#pragma unroll
      for (int i = 0; i < frag; ++i) detail::sm90::register_fence(acc[i]);
      detail::sm90::barrier_arrive(&s.empty[previous]);
      // Full tiles of the plain case (no bias, no class weights, no softcap) take the lean
      // epilogue: no masks, no per-column loads, no tanh; it fits the registers beside the tile.
      if (plain && tile * block_v + block_v <= p.v) {
        if (p.transform.softcap > 0.0f) {
          fold_plain_tile<true>(p, acc, tile * block_v, quad, rows, target, stats);
        } else {
          fold_plain_tile<false>(p, acc, tile * block_v, quad, rows, target, stats);
        }
      } else {
        fold_tile(p, acc, tile * block_v, quad, rows, target, stats);
      }
    }

#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (rows[h] < p.n && quad == 0) {
        p.partial[static_cast<std::int64_t>(blockIdx.y) * p.n + rows[h]] = stats[h];
      }
    }
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

  /// Sums of the quad (the four lanes sharing a row), and the merge into the row's state.
  __device__ __forceinline__ static void merge_quad(float mx, float sum, float sum_pz,
                                                    float sum_wz, int first, std::int64_t vocab0,
                                                    thread::row_stats& stats) {
#pragma unroll
    for (int lane_mask = 1; lane_mask <= 2; lane_mask *= 2) {
      sum += __shfl_xor_sync(0xffffffffu, sum, lane_mask);
      sum_pz += __shfl_xor_sync(0xffffffffu, sum_pz, lane_mask);
      sum_wz += __shfl_xor_sync(0xffffffffu, sum_wz, lane_mask);
      first = min(first, __shfl_xor_sync(0xffffffffu, first, lane_mask));
    }
    if (mx != -INFINITY) {
      stats = thread::row_stats_merge(stats,
                                      thread::row_stats{mx, sum, sum_pz, sum_wz, vocab0 + first});
    }
  }

  /// c·tanh(x/c)·… for the lean epilogue: x = raw/τ, z = c·tanh(x/c), with tanh from one
  /// exponential and one reciprocal on the special-function unit, (1 − e)/(1 + e) with
  /// e = e^{−2|y|}, and its Taylor series below |y| < 2⁻⁸ where 1 − e would cancel. Absolute
  /// error of z about c·10⁻⁷ (tanhf's is c·6·10⁻⁸); the backward's tanhf sees the same logits
  /// to that precision.
  __device__ __forceinline__ static float fast_softcap(float raw, float scale, float cap) {
    constexpr float two_log2e = 2.0f * 1.4426950408889634f;
    const float y = raw * scale;  // x/c = raw/(τ·c)
    const float ay = fabsf(y);
    float e;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(-two_log2e * ay));
    float t = __fdividef(1.0f - e, 1.0f + e);
    if (ay < 0.00390625f) t = ay * fmaf(-ay * ay, 1.0f / 3.0f, 1.0f);
    return copysignf(cap * t, y);
  }

  /// The lean epilogue of a full tile without bias or class weights: z = acc/τ (softcapped if
  /// Softcap), then e^{z−max} as 2^{z·log2e − max·log2e} on the special-function unit. A NaN
  /// or +inf logit still turns the row's sum into NaN (fmaxf drops NaN from the max, but
  /// z − max does not).
  template <bool Softcap>
  __device__ __forceinline__ static void fold_plain_tile(const params& p, float (&acc)[frag],
                                                         std::int64_t vocab0, int quad,
                                                         const std::int64_t (&rows)[2],
                                                         const std::int64_t (&target)[2],
                                                         thread::row_stats (&stats)[2]) {
    constexpr float log2e = 1.4426950408889634f;
    const float inv_t = p.transform.inv_temperature;
    const float cap = p.transform.softcap;
    const float cap_scale = Softcap ? inv_t / cap : 0.0f;
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int i = 0; i < frag; ++i) {
      if constexpr (Softcap) {
        acc[i] = fast_softcap(acc[i], cap_scale, cap);
      } else {
        acc[i] *= inv_t;
      }
      mx[(i / 2) % 2] = fmaxf(mx[(i / 2) % 2], acc[i]);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
    }
    write_targets(p, acc, vocab0, quad, rows, target);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float shift = -mx[h] * log2e;
      float sum = 0.0f, sum_pz = 0.0f, sum_z = 0.0f;
      int first = INT_MAX;
#pragma unroll
      for (int j = block_v / 8 - 1; j >= 0; --j) {  // downwards: the last match is the first
#pragma unroll
        for (int e = 1; e >= 0; --e) {
          const float z = acc[4 * j + 2 * h + e];
          float ez;
          asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(ez) : "f"(fmaf(z, log2e, shift)));
          sum += ez;
          sum_pz = fmaf(ez, z, sum_pz);
          sum_z += z;
          first = (z == mx[h]) ? 8 * j + 2 * quad + e : first;
        }
      }
      merge_quad(mx[h], sum, sum_pz, sum_z, first, vocab0, stats[h]);
    }
  }

  /// Folds one finished tile (columns vocab0 + 8·j + 2·quad + e of rows[h] at
  /// acc[4·j + 2·h + e]) into the rows' statistics. The four lanes of a quad hold one row's
  /// columns between them and end with the same merged statistics.
  __device__ __forceinline__ static void fold_tile(const params& p, float (&acc)[frag], std::int64_t vocab0,
                                   int quad, const std::int64_t (&rows)[2],
                                   const std::int64_t (&target)[2],
                                   thread::row_stats (&stats)[2]) {
    const bool full_tile = vocab0 + block_v <= p.v;
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < block_v / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = 8 * j + 2 * quad + e;
        const bool in = full_tile || vocab0 + col < p.v;
        const float b = (p.bias != nullptr && in) ? static_cast<float>(p.bias[vocab0 + col]) : 0.0f;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float& z = acc[4 * j + 2 * h + e];
          z = in ? p.transform(z + b) : -INFINITY;
          mx[h] = thread::nan_max(mx[h], z);
        }
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mx[h] = thread::nan_max(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
      mx[h] = thread::nan_max(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
    }

    write_targets(p, acc, vocab0, quad, rows, target);

    float sum[2] = {0.0f, 0.0f}, sum_pz[2] = {0.0f, 0.0f}, sum_wz[2] = {0.0f, 0.0f};
    int first[2] = {INT_MAX, INT_MAX};
#pragma unroll
    for (int j = 0; j < block_v / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = 8 * j + 2 * quad + e;
        const bool in = full_tile || vocab0 + col < p.v;
        const float w = !in ? 0.0f : (p.class_weight != nullptr ? p.class_weight[vocab0 + col] : 1.0f);
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
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      merge_quad(mx[h], sum[h], sum_pz[h], sum_wz[h], first[h], vocab0, stats[h]);
    }
  }
};

/// Dynamic shared memory of fused_forward_sm90<Element, Config>::smem_bytes; one block per SM.
template <class Element, class Config>
__global__ void __launch_bounds__(Config::threads, 1) LCE_KERNEL_VISIBILITY
    fused_forward_sm90_kernel(const __grid_constant__ typename fused_forward_sm90<Element, Config>::params p) {
  using kernel_t = fused_forward_sm90<Element, Config>;
#if defined(LCE_SM90A)
  extern __shared__ __align__(128) unsigned char smem[];
  const auto base = reinterpret_cast<std::uintptr_t>(smem);
  auto* storage = reinterpret_cast<typename kernel_t::shared_storage*>(
      (base + 1023) & ~std::uintptr_t{1023});
  kernel_t{}(p, *storage);
#else
  // Built for a device without sm_90a features (e.g. sm_90 without "a"): the launcher does
  // not pick this kernel there, but should it run, its rows read NaN rather than garbage.
  const std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * kernel_t::block_m + threadIdx.x;
  if (threadIdx.x < kernel_t::block_m && row < p.n) {
    p.partial[static_cast<std::int64_t>(blockIdx.y) * p.n + row] =
        thread::row_stats{NAN, NAN, NAN, NAN, -1};
  }
#endif
}

}  // namespace kernel
LCE_NAMESPACE_END
