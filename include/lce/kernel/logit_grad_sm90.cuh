/// @file logit_grad_sm90.cuh
/// @brief The backward's recompute fused with the logit gradient, for sm_90a: tiles of
/// Z = X·Wᵀ of a chunk on the TMA + wgmma pipeline (block/tile_pipeline_sm90.cuh), turned into
/// dZ = (a·p − b·[v = y] − c)·dz/draw in registers and stored in the element type, divided by
/// alpha (as kernel/logit_grad.cuh stores it). It replaces the recompute GEMM into an fp32
/// chunk plus logit_grad_kernel's pass over it.
///
/// Two epilogues: the lean one (General = false: no bias, no class weights; e^{z−lse} on the
/// special-function unit) and the general one (General = true: bias and class weights, the
/// exact logit_transform and expf of kernel/logit_grad.cuh). Each recomputes z with the same
/// wgmma accumulation order and the same transform as the forward epilogue that built the lse
/// (kernel/fused_forward_sm90.cuh: lean with lean, general with general), so the row maximum
/// recomputes bitwise and z − lse is exactly 0 there: at extreme logits (|z| ~ 1e30, where an
/// ulp of z is ~1e23) the softmax stays one-hot instead of depending on rounding.
///
/// Grid: (row tiles of 128, splits of the chunk's vocabulary tiles).
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "../block/tile_pipeline_sm90.cuh"
#include "../block/tile_store_sm90.cuh"
#include "../thread/cross_entropy.cuh"
#include "../thread/row_grad.cuh"

LCE_NAMESPACE_BEGIN
namespace kernel {

/// The lean epilogue's dZ leaves through a staging tile (block/tile_store_sm90.cuh), beside
/// fewer stages; the general one's with pair stores from registers.
template <class Element, class Config, bool General = false>
struct logit_grad_sm90 {
  using pipeline = typename block::staged_pipeline<Element, Config, !General>::type;
  using shared_storage = typename pipeline::shared_storage;
  static constexpr int block_v = pipeline::block_v;
  static constexpr int frag = pipeline::frag;

  struct params {
    CUtensorMap x_map;  ///< the chunk's X rows [grad.row0, grad.row0 + rows): (block_m, block_k)
    CUtensorMap w_map;  ///< the chunk's W rows [grad.vocab0, grad.vocab0 + grad.cols)
    std::int64_t rows, d;
    Element* dz;       ///< [rows, ldz]: chunk row r, column c at dz[r·ldz + c]
    std::int64_t ldz;  ///< even; lean: a multiple of 8, dz 16-byte aligned
    /// Lean: dz [rows, grad.cols] in boxes of 64 rows × tile_store::box_cols, 128-byte swizzle
    CUtensorMap dz_map;
    thread::logit_grad_params<Element> grad;  ///< row0, vocab0, cols, v, options (bias and class
                                              ///< weights only with General)
  };
  using tile_store = block::tile_store_sm90<block_v>;

  struct epilogue {
    const params& p;
    int quad;
    std::int64_t rows[2];  ///< chunk-local
    thread::row_grad rg[2];
    tile_store out;  ///< lean only

    __device__ __forceinline__ epilogue(const params& p_, int half, shared_storage& s)
        : p(p_),
          out(s.epilogue, half,
              static_cast<int>(block::grid_tile_of_block().row_tile * pipeline::block_m +
                               half * 64)) {
      quad = pipeline::fragment_quad();
      rows[0] = pipeline::fragment_row0(half);  // chunk-local: the X map starts at the chunk
      rows[1] = rows[0] + 8;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        rg[h] = rows[h] < p.rows ? thread::make_row_grad(p.grad, p.grad.row0 + rows[h])
                                 : thread::row_grad{-1, 0.0f, {0.0f, 0.0f, 0.0f}, false};
      }
    }

    __device__ __forceinline__ void tile(float (&acc)[frag], std::int64_t t) {
      if constexpr (General) {
        store_tile_general(acc, t);
      } else if (p.grad.filter_eps > 0.0f) {
        if (p.grad.transform.softcap > 0.0f) {
          store_tile<true, true>(acc, t);
        } else {
          store_tile<false, true>(acc, t);
        }
      } else if (p.grad.transform.softcap > 0.0f) {
        store_tile<true, false>(acc, t);
      } else {
        store_tile<false, false>(acc, t);
      }
    }

    /// dZ of one element of the lean epilogue (column `c`, chunk-local), before the store.
    /// Filter: loss_options::filter_eps > 0 (entries other than the target's with p below it
    /// are stored as 0); a separate instantiation, so the exact path pays nothing for it.
    template <bool Softcap, bool Filter>
    __device__ __forceinline__ float lean_grad(float raw, const thread::row_grad& r,
                                               bool is_target) const {
      constexpr float log2e = 1.4426950408889634f;
      const float inv_t = p.grad.transform.inv_temperature;
      float z, dzdraw;
      if constexpr (Softcap) {
        const float cap = p.grad.transform.softcap;
        z = arch::sm90::fast_softcap(raw, inv_t / cap, cap);
        const float q = z * (1.0f / cap);  // 1/cap: loop-invariant, hoisted
        dzdraw = inv_t * fmaf(-q, q, 1.0f);
      } else {
        z = raw * inv_t;
        dzdraw = inv_t;
      }
      // (z − lse)·log2e clamped at 0, NaN kept (thread::softmax_prob says why). The difference
      // first: z·log2e − lse·log2e in one fma would carry the rounding of lse·log2e, which at
      // |z| ~ 1e30 is ~1e22, not 0.
      const float e2 = (z - r.lse) * log2e;
      const float prob = arch::sm90::fast_exp2(e2 > 0.0f ? 0.0f : e2);
      float g = r.coeffs.p * prob - (is_target ? r.coeffs.target : 0.0f) - r.coeffs.weight;
      if constexpr (Filter) g = (!is_target && prob < p.grad.filter_eps) ? 0.0f : g;
      return r.active ? g * dzdraw : 0.0f;
    }

    /// The lean tile's dZ into the staging, then out by bulk stores (rows past the chunk and
    /// columns past grad.cols lie outside dz_map: not written).
    template <bool Softcap, bool Filter>
    __device__ __forceinline__ void store_tile(float (&acc)[frag], std::int64_t t) {
      const std::int64_t tile_col = t * block_v;
      out.acquire();
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const thread::row_grad& r = rg[h];
        // The target's tile-local column (or −1), so the loop compares columns only.
        const std::int64_t local = r.y - p.grad.vocab0 - tile_col;
        const int target_col = local >= 0 && local < block_v ? static_cast<int>(local) : -1;
        std::uint32_t packed[4];
#pragma unroll
        for (int j = 0; j < block_v / 8; ++j) {
          const int c = 8 * j + 2 * quad;  // tile-local column of the pair
          const float d0 = lean_grad<Softcap, Filter>(acc[4 * j + 2 * h], r, c == target_col);
          const float d1 =
              lean_grad<Softcap, Filter>(acc[4 * j + 2 * h + 1], r, c + 1 == target_col);
          packed[j % 4] = arch::sm90::pack_pair<Element>(d0, d1);
          if (j % 4 == 3) out.put(h, j - 3, packed);
        }
      }
      out.release(&p.dz_map, static_cast<int>(tile_col));
    }

    /// The general epilogue: z = transform(raw + b_v) and dZ as logit_grad_kernel forms it.
    __device__ __forceinline__ void store_tile_general(float (&acc)[frag], std::int64_t t) {
      const std::int64_t col0 = t * block_v + 2 * quad;  // chunk-local column of acc[…+0]
      const thread::logit_grad_params<Element>& g = p.grad;
#pragma unroll
      for (int j = 0; j < block_v / 8; ++j) {
        float b[2], w[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const std::int64_t c = col0 + 8 * j + e;
          const bool in = c < g.cols;
          b[e] = (g.bias != nullptr && in) ? static_cast<float>(g.bias[g.vocab0 + c]) : 0.0f;
          w[e] = (g.class_weight != nullptr && in) ? g.class_weight[g.vocab0 + c] : 1.0f;
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          if (rows[h] >= p.rows) continue;
          const thread::row_grad& r = rg[h];
          const std::int64_t c = col0 + 8 * j;
          if (c >= g.cols) continue;
          float d[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float z = g.transform(acc[4 * j + 2 * h + e] + b[e]);
            d[e] = r.active ? thread::logit_grad(r.coeffs, z, r.lse, g.vocab0 + c + e == r.y, w[e],
                                                 g.filter_eps) *
                                  g.transform.derivative(z)
                            : 0.0f;
          }
          Element* out = p.dz + rows[h] * p.ldz;
          if (c + 1 < g.cols) {
            arch::sm90::store_pair(out + c, d[0], d[1]);
          } else {
            out[c] = static_cast<Element>(d[0]);
          }
        }
      }
    }

    __device__ __forceinline__ void finish() {
      if constexpr (!General) out.finish();
    }
  };

  __device__ __forceinline__ void operator()(const params& p, shared_storage& s) const {
    pipeline::run_split(&p.x_map, &p.w_map, s, p.grad.cols, p.d,
                        [&](int half) { return epilogue(p, half, s); });
  }
};

/// One block per SM, with the pipeline's smem_bytes of dynamic shared memory. Without sm_90a
/// features (block::tile_pipeline_sm90::run_kernel) dZ reads NaN.
template <class Element, class Config, bool General>
__global__ void __launch_bounds__(Config::threads, 1) LCE_KERNEL_VISIBILITY
    logit_grad_sm90_kernel(const __grid_constant__
                           typename logit_grad_sm90<Element, Config, General>::params p) {
  using kernel_t = logit_grad_sm90<Element, Config, General>;
  kernel_t::pipeline::template run_kernel<kernel_t>(p, [&](std::int64_t row) {
    if (row < p.rows && block::grid_tile_of_block().split == 0) {
      for (std::int64_t c = 0; c < p.grad.cols; ++c)
        p.dz[row * p.ldz + c] = static_cast<Element>(NAN);
    }
  });
}

}  // namespace kernel
LCE_NAMESPACE_END
