/// @file chunked_backward.cuh
/// @brief Device-wide backward by recomputation in chunks (docs/algorithm.md):
/// - vocab_chunked: for each slice of Vc vocabulary rows, Z_c = X·W_cᵀ (fp32), dZ_c in place,
///   dW_c = dZ_cᵀ·X, db_c = dZ_cᵀ·1, dX += dZ_c·W_c (fp32 accumulator): a chunk buffer of
///   n·Vc floats, dW written once.
/// - row_chunked: for each slice of Nc rows, Z_c = X_c·Wᵀ (whole rows), dZ_c in place,
///   dX_c = dZ_c·W, dW += dZ_cᵀ·X_c and db += dZ_cᵀ·1 into fp32 dW/db. Whole rows also give the
///   lse, so forward_backward needs no separate forward: 3 GEMMs in all.
/// GEMMs run on cuBLAS with fp32 accumulation; the lse and dZ epilogues are lce's own kernels.
/// On sm_90a with 16-bit inputs the recompute and dZ are one lce kernel instead
/// (kernel/logit_grad_sm90.cuh) writing 16-bit dZ, no fp32 chunk, so each chunk covers twice
/// the plan's columns (vocab_chunked) or rows (row_chunked with the lse given).
/// The stored strategy (no recompute) is device/stored.cuh.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../args.hpp"
#include "../config.hpp"
#include "../detail/cublas.cuh"
#include "../detail/tensor_map.hpp"
#include "../detail/workspace.hpp"
#include "../kernel/elementwise.cuh"
#include "../kernel/logit_grad.cuh"
#include "../kernel/logit_grad_sm90.cuh"
#include "../kernel/row_lse.cuh"
#include "../options.hpp"
#include "../thread/finish_row.cuh"
#include "../thread/loss_scalars.cuh"
#include "../thread/row_grad.cuh"
#include "launch.cuh"

/// The fewest vocabulary splits of the sm_90a recompute's grid (where the chunk has as many
/// tiles). Its tiles are independent (the lse is given: no statistics to combine), and with one
/// split the ~132 resident blocks would hold as many different row tiles, each block streaming
/// its own X tile (1 MiB at d = 4096) from HBM once per vocabulary tile — at n = 32768 a chunk
/// of 16 tiles took one split. Four splits put the resident blocks on ~33 row tiles, in the
/// groups of block::raster_tile. bench/NOTES.md v18 has the runs (1, 4 and 8 compared).
#ifndef LCE_RECOMPUTE_MIN_SPLITS
#define LCE_RECOMPUTE_MIN_SPLITS 4
#endif

LCE_NAMESPACE_BEGIN
namespace device {

/// Strategy, chunk extent and workspace regions of one backward.
struct backward_plan {
  backward_strategy strategy = backward_strategy::vocab_chunked;
  std::int64_t chunk = 0;     ///< vocabulary rows (vocab_chunked) or token rows (row_chunked)
  std::int64_t chunk_ld = 0;  ///< row stride of the fp32 chunk buffer, a multiple of 8
  bool dx_accumulator = false;
  std::size_t accumulator_bytes = 0;  ///< fp32 accumulators in the workspace (vocab_chunked dX)
  std::size_t scalars = 0, ones = 0, dx = 0, logits = 0;
  std::size_t bytes = 0;
};

inline constexpr std::int64_t vocab_chunk_granule = 128;
/// vocab_chunked reads and rewrites the fp32 dX accumulator (8·n·d bytes) once per chunk,
/// against 6·n·d·Vc FLOPs of GEMMs over the chunk (twice the columns on the sm_90a fused
/// path): below this many planned columns that pass costs more than ~5% of the chunk's GEMMs on
/// an H100/H200, and the dW GEMM (d × Vc tiles) no longer fills the GPU.
inline constexpr std::int64_t min_vocab_chunk = 2048;
/// row_chunked reads and rewrites the fp32 dW once per row chunk: below this many rows per
/// chunk that traffic rivals the GEMMs, and automatic picks vocab_chunked instead.
inline constexpr std::int64_t min_row_chunk = 1024;
/// stored in row chunks adds each chunk's dW GEMM to the fp32 dW (v·d·8 bytes of traffic per
/// chunk, in that GEMM's epilogue, against 6·r·v·d FLOPs of the chunk's GEMMs): automatic takes
/// such chunks from this many rows up, where they still beat vocab_chunked's recomputation
/// clearly (bench/NOTES.md has the timings); below it, the chunked plan.
inline constexpr std::int64_t min_stored_chunk = 768;

/// The options of the chunked plan where it is only the stored strategy's fallback (a bias,
/// class weights or a device without the sm_90a kernel): it runs within the stored values'
/// space rather than the whole budget (a budget is a bound, and the stored call then asks for
/// what it uses), but never in less than the default budget, so the lean plan of a small
/// problem stays what it would be without `stored`.
inline backward_options stored_fallback_options(const backward_options& b,
                                                std::size_t stored_bytes) noexcept {
  backward_options f = b;
  f.memory_budget =
      std::min(b.memory_budget, std::max(stored_bytes, backward_options{}.memory_budget));
  return f;
}

inline std::int64_t round_up(std::int64_t x, std::int64_t m) noexcept {
  return (x + m - 1) / m * m;
}

/// The width of the chunks when `total` goes in ⌈total/cap⌉ chunks of at most `cap`: near-equal
/// widths, rounded up to a multiple of `multiple` (a kernel's tile; `cap` is one too), the last
/// one taking the rest. Taking `cap` every time instead leaves a ragged last chunk whose few tiles
/// fill a fraction of the GPU (Llama 3's head at n = 8192: 16 chunks of 31 vocabulary tiles and one
/// of 5, 259 waves of 128-row tiles against 251 with 16 of 30 and one of 21).
inline std::int64_t balanced_chunk(std::int64_t total, std::int64_t cap,
                                   std::int64_t multiple) noexcept {
  if (total <= cap) return total;
  const std::int64_t chunks = (total + cap - 1) / cap;
  return std::min(cap, round_up((total + chunks - 1) / chunks, multiple));
}

template <class Element, class Grad>
backward_plan make_backward_plan(const problem& s, const backward_options& b,
                                 detail::workspace_layout& layout) noexcept {
  constexpr bool fp32_grad = std::is_same_v<Grad, float>;
  backward_plan p;
  p.scalars = layout.reserve<thread::loss_scalars>(1);
  p.ones = layout.reserve<Element>(static_cast<std::size_t>(s.n));
  const std::size_t fixed = layout.bytes() + 2 * detail::workspace_layout::alignment;
  const std::size_t avail = b.memory_budget > fixed ? b.memory_budget - fixed : 0;

  const std::int64_t row_ld = round_up(s.v, 8);
  const auto rows_fit = static_cast<std::int64_t>(avail / (static_cast<std::size_t>(row_ld) * 4));
  p.strategy = b.strategy;
  // stored: the plan is its fallback (forward_backward adds the stored regions).
  if (p.strategy == backward_strategy::automatic || p.strategy == backward_strategy::stored) {
    p.strategy = fp32_grad && rows_fit >= std::min(s.n, min_row_chunk)
                     ? backward_strategy::row_chunked
                     : backward_strategy::vocab_chunked;
  }
  if (p.strategy == backward_strategy::row_chunked) {
    p.chunk = std::clamp<std::int64_t>(rows_fit, 1, std::max<std::int64_t>(s.n, 1));
    p.chunk_ld = row_ld;
    p.logits = layout.reserve<float>(static_cast<std::size_t>(p.chunk * p.chunk_ld));
  } else {
    p.dx_accumulator = !std::is_same_v<Element, float>;
    std::size_t left = avail;
    if (p.dx_accumulator) {
      p.dx = layout.reserve<float>(static_cast<std::size_t>(s.n * s.d));
      p.accumulator_bytes = static_cast<std::size_t>(s.n * s.d) * 4;
      left = left > p.accumulator_bytes ? left - p.accumulator_bytes : 0;
    }
    // Whole granules of fp32 columns of all n rows within `bytes`.
    const auto cols_within = [&](std::size_t bytes) {
      const auto cols = static_cast<std::int64_t>(
          bytes / (static_cast<std::size_t>(std::max<std::int64_t>(s.n, 1)) * 4));
      return cols / vocab_chunk_granule * vocab_chunk_granule;
    };
    // The accumulator is O(n·d), like X itself: where it crowds the chunk (large n), it takes
    // an allowance of its own beyond the budget, and the chunk keeps as many columns as the
    // whole budget holds or as the accumulator has (d), up to min_vocab_chunk. Without that the
    // chunks shrink to one granule and the passes over the accumulator dominate the backward.
    const std::int64_t d_cols = s.d / vocab_chunk_granule * vocab_chunk_granule;
    const std::int64_t floor_cols =
        p.dx_accumulator ? std::min(min_vocab_chunk, std::max(cols_within(avail), d_cols)) : 0;
    const std::int64_t cols = std::max({cols_within(left), floor_cols, vocab_chunk_granule});
    p.chunk = std::min(cols, s.v);
    p.chunk_ld = round_up(p.chunk, 8);
    p.logits = layout.reserve<float>(static_cast<std::size_t>(s.n * p.chunk_ld));
  }
  p.bytes = layout.bytes();
  return p;
}

/// Enqueues the recompute of a chunk fused with its logit gradient on sm_90a (the chunk: X
/// rows `x_rows` [rows, ldx], W rows `w_rows` [gp.cols, ldw]; dZ to `dz` [rows, ldz], divided
/// by alpha), when it applies: 16-bit elements, an sm_90a device and operands the copy engine
/// can read. Without bias and class weights it runs the lean epilogue on the `sm90` tile
/// configuration, else the general one on `sm90_general` — the configurations, transforms and
/// accumulation order of the forward that built the lse (kernel/logit_grad_sm90.cuh says why
/// that matters). Sets `launched`; if false, nothing was enqueued.
template <class Element, class Config, bool General>
cudaError_t launch_logit_grad_sm90(const thread::logit_grad_params<Element>& gp,
                                   const Element* x_rows, std::int64_t rows, std::int64_t ldx,
                                   const Element* w_rows, std::int64_t ldw, std::int64_t d,
                                   Element* dz, std::int64_t ldz, bool& launched,
                                   cudaStream_t stream) noexcept {
  using fused = kernel::logit_grad_sm90<Element, Config, General>;
  constexpr auto entry = kernel::logit_grad_sm90_kernel<Element, Config, General>;
  if (ldz % 2 != 0 || !sm90_kernel_runs<entry>()) return cudaSuccess;
  typename fused::params fp{};
  if (!encode_operand_maps<Config>(&fp.x_map, x_rows, rows, ldx, &fp.w_map, w_rows, gp.cols, ldw,
                                   d)) {
    return cudaSuccess;
  }
  // The lean epilogue's bulk stores need dz as the copy engine writes it (16-byte aligned, ldz
  // a multiple of 8, as the plan lays it out); else the caller's cuBLAS path runs.
  if (!General && !detail::encode_tile_map(&fp.dz_map, dz, rows, gp.cols, ldz, 64,
                                           fused::tile_store::box_cols)) {
    return cudaSuccess;
  }
  problem tiles;
  tiles.n = rows;
  tiles.v = gp.cols;
  const forward_grid grid = make_balanced_grid(tiles, Config::block_m, Config::block_v,
                                               Config::cluster_m, LCE_RECOMPUTE_MIN_SPLITS);
  fp.rows = rows;
  fp.d = d;
  fp.dz = dz;
  fp.ldz = ldz;
  fp.grad = gp;
  LCE_RETURN_IF_ERROR(launch_sm90_grid<Config>(entry, grid, fused::pipeline::threads,
                                               fused::pipeline::smem_bytes, stream, fp));
  LCE_CHECK_LAUNCH("logit_grad_sm90_kernel");
  launched = true;
  return cudaSuccess;
}

template <class Element, class Config>
cudaError_t run_logit_grad_sm90(const thread::logit_grad_params<Element>& gp, const Element* x_rows,
                                std::int64_t rows, std::int64_t ldx, const Element* w_rows,
                                std::int64_t ldw, std::int64_t d, Element* dz, std::int64_t ldz,
                                bool& launched, cudaStream_t stream) noexcept {
  launched = false;
  // A Config without an sm_90a part (void) has no such kernel: the caller's cuBLAS path runs.
  using lean = typename sm90_config_of<Config>::type;
  using general = typename sm90_general_config_of<Config>::type;
  if constexpr (sizeof(Element) == 2 && !std::is_void_v<lean>) {
    if (gp.bias == nullptr && gp.class_weight == nullptr)
      return launch_logit_grad_sm90<Element, lean, false>(gp, x_rows, rows, ldx, w_rows, ldw, d, dz,
                                                          ldz, launched, stream);
  }
  if constexpr (sizeof(Element) == 2 && !std::is_void_v<general>) {
    return launch_logit_grad_sm90<Element, general, true>(gp, x_rows, rows, ldx, w_rows, ldw, d, dz,
                                                          ldz, launched, stream);
  }
  return cudaSuccess;
}

/// The vocabulary rows one backward covers: W, bias, dW and db hold `rows` rows whose global
/// ids start at `begin`. lce::backward covers the whole vocabulary ({0, v}); lce::nccl a shard.
/// Targets and class weights are always indexed by global id.
struct vocab_window {
  std::int64_t begin = 0;
  std::int64_t rows = 0;
};

/// The bias of a window as the logit-gradient kernels index it, by global vocabulary id:
/// rebased through an integer so that global id `begin` reads local 0 (only ids of the window
/// are ever read).
template <class Element>
const Element* bias_by_global_id(const Element* bias, std::int64_t begin) noexcept {
  if (bias == nullptr) return nullptr;
  return reinterpret_cast<const Element*>(reinterpret_cast<std::uintptr_t>(bias) -
                                          static_cast<std::uintptr_t>(begin) * sizeof(Element));
}

/// The logit-gradient parameters every dZ kernel takes (the chunk's extent aside).
template <class Element, class Grad>
thread::logit_grad_params<Element> make_logit_grad_params(const backward_args<Element, Grad>& a,
                                                          const problem& s, const loss_options& o,
                                                          const thread::loss_scalars* scalars,
                                                          std::int64_t vocab_begin) noexcept {
  thread::logit_grad_params<Element> gp{};
  gp.v = s.v;
  gp.bias = bias_by_global_id(a.bias, vocab_begin);
  gp.class_weight = a.class_weight;
  gp.targets = make_target_view(a.targets, o);
  gp.transform = make_transform(o);
  gp.smoothing = o.label_smoothing;
  gp.z_loss = o.z_loss;
  gp.lse = a.lse;
  gp.grad = a.grad;
  gp.grad_per_row = o.reduction == lce::reduction::none;
  gp.scalars = scalars;
  gp.reduction = o.reduction;
  gp.filter_eps = o.filter_eps;
  return gp;
}

/// The one chunked backward driver, for lce::backward, lce::forward_backward and lce::nccl.
/// Arguments are validated; the scope has set the handle's stream. `s` is the global problem
/// (n, d, v, strides); `window` the vocabulary rows of a.w, a.bias, a.dw and a.db.
/// dX: with `dx_partial` null, into the caller's a.dx (vocab_chunked accumulates in fp32 — the
/// caller's buffer when Element is float, else the plan's accumulator, converted once at the
/// end; row_chunked writes each chunk's rows once). With `dx_partial` (dense fp32 [n, d]), this
/// window's partial sum is written there, unconverted, for a collective to reduce; a.dx only
/// says whether dX is wanted.
/// With `fwd` (row_chunked over the whole vocabulary only), each chunk's lse and every per-row
/// forward output are computed from the recomputed rows before its dZ, so no separate forward
/// is needed (fwd->lse must be a.lse).
/// `o.accumulate`: the first write of dw, db (and dx without dx_partial) adds to what the
/// caller's buffers hold.
template <class Element, class Grad, class Config>
cudaError_t run_chunked_backward(void* ws, const backward_plan& plan,
                                 const backward_args<Element, Grad>& a, const problem& s,
                                 const vocab_window& window, float* dx_partial,
                                 const loss_options& o, cublasHandle_t handle, cudaStream_t stream,
                                 const thread::row_outputs* fwd = nullptr) noexcept {
  using detail::gemm;
  using detail::gemm_host_scalars;
  constexpr cublasOperation_t N = CUBLAS_OP_N;
  constexpr cublasOperation_t T = CUBLAS_OP_T;
  constexpr int grad_threads = 256;
  constexpr int grad_per_thread = 8;
  const std::int64_t n = s.n, d = s.d, v_local = window.rows;
  const std::int64_t ldx = s.x_stride(), ldw = s.w_stride();
  const std::int64_t lddx = s.dx_stride(), lddw = s.dw_stride();

  auto* scalars = detail::at<thread::loss_scalars>(ws, plan.scalars);
  // The GEMMs take alpha and beta from the device (scalars): Z = 1·X·Wᵀ + 0; the gradient
  // GEMMs multiply the alpha-normalized dZ back by alpha (vocab_chunked's own dX accumulator
  // excepted: it takes alpha in its conversion).
  const float* one = &scalars->one;
  const float* zero = &scalars->zero;
  const float* alpha = &scalars->alpha;
  auto* ones = detail::at<Element>(ws, plan.ones);
  auto* logits = detail::at<float>(ws, plan.logits);
  auto* dz = reinterpret_cast<const Element*>(logits);
  const std::int64_t ldz = plan.chunk_ld * static_cast<std::int64_t>(4 / sizeof(Element));

  const float* first_beta = o.accumulate ? one : zero;  // beta of a gradient's first write
  // A partial dX starts from zero: the caller's dX is added once, after the reduction.
  const float* dx_first_beta = dx_partial != nullptr ? zero : first_beta;
  LCE_RETURN_IF_ERROR(
      run_loss_scalars(a.targets, a.class_weight, a.grad, s, o, scalars, a.status, stream));
  if (a.db != nullptr) {
    kernel::fill_kernel<Element>
        <<<std::min<std::int64_t>((n + 255) / 256, 1024), 256, 0, stream>>>(ones, n, 1.0f);
    LCE_CHECK_LAUNCH("fill_kernel");
  }

  thread::logit_grad_params<Element> gp = make_logit_grad_params(a, s, o, scalars, window.begin);
  gp.logits = logits;
  gp.ld = plan.chunk_ld;

  if (plan.strategy == backward_strategy::vocab_chunked) {
    // dX accumulates over chunks in fp32: in the partial buffer, in the caller's buffer when
    // it is fp32, else in the workspace, converted once at the end.
    float* dx_acc = dx_partial;
    std::int64_t dx_ld = d;
    if (dx_acc == nullptr) {
      if constexpr (std::is_same_v<Element, float>) {
        dx_acc = a.dx;
        dx_ld = lddx;
      } else {
        dx_acc = detail::at<float>(ws, plan.dx);
      }
    }
    // The workspace's accumulator (16-bit dX) sums W_cᵀ·(dZ_c/alpha) and takes alpha and the
    // caller's dX once, in the final conversion: its GEMMs have host scalars (1, and beta 0 or
    // 1), so cuBLAS knows beta when it picks the kernel instead of one that reads beta from
    // the device (bench/gemm_modes.cu and bench/NOTES.md v18–v19 have the timings).
    const bool own_accumulator = dx_partial == nullptr && plan.dx_accumulator;
    const float* dx_beta0 =
        dx_partial == nullptr && !std::is_same_v<Element, float> ? zero : dx_first_beta;
    // sm_90a: the recompute and dZ in one kernel, no fp32 chunk. dZ is then 16-bit, so the
    // chunk buffer holds twice the columns (rows keep the fp32 row's bytes: ldz = 2·chunk_ld
    // elements): half the chunks, half the passes over the fp32 dX accumulator. Tried on the
    // first chunk; where it declines (fp32, another device, unaligned operands) every chunk
    // takes the fp32 route at the planned width.
    bool try_fused = true;
    const std::int64_t fused_cols =
        balanced_chunk(v_local, 2 * plan.chunk, 2 * vocab_chunk_granule);
    const std::int64_t plain_cols = balanced_chunk(v_local, plan.chunk, vocab_chunk_granule);
    std::int64_t vc = 0;
    for (std::int64_t v0 = 0; v0 < v_local; v0 += vc) {
      vc = std::min(try_fused ? fused_cols : plain_cols, v_local - v0);
      const Element* w_c = a.w + v0 * ldw;
      gp.cols = vc;
      gp.row0 = 0;
      gp.vocab0 = window.begin + v0;
      bool fused = false;
      if (try_fused) {
        LCE_RETURN_IF_ERROR((run_logit_grad_sm90<Element, Config>(
            gp, a.x, n, ldx, w_c, ldw, d, const_cast<Element*>(dz), ldz, fused, stream)));
        if (!fused) {
          try_fused = false;
          vc = std::min(plain_cols, v_local - v0);
          gp.cols = vc;
        }
      }
      if (!fused) {
        // Z_cᵀ [vc, n] = W_c · Xᵀ (column-major view of the row-major [n, vc] chunk)
        LCE_RETURN_IF_ERROR(
            gemm(handle, T, N, vc, n, d, one, w_c, ldw, a.x, ldx, zero, logits, plan.chunk_ld));
        kernel::logit_grad_kernel<Element, grad_threads, grad_per_thread>
            <<<static_cast<unsigned>(n), grad_threads, 0, stream>>>(gp);
        LCE_CHECK_LAUNCH("logit_grad_kernel");
      }
      if (a.dw != nullptr)  // dW_cᵀ [d, vc] = Xᵀ · dZ_c
        LCE_RETURN_IF_ERROR(gemm(handle, N, T, d, vc, n, alpha, a.x, ldx, dz, ldz, first_beta,
                                 a.dw + v0 * lddw, lddw));
      if (a.db != nullptr)  // db_c [vc, 1] = dZ_cᵀ · 1
        LCE_RETURN_IF_ERROR(
            gemm(handle, N, N, vc, 1, n, alpha, dz, ldz, ones, n, first_beta, a.db + v0, vc));
      if (a.dx != nullptr) {  // dXᵀ [d, n] += W_cᵀ · dZ_cᵀ
        if (own_accumulator) {
          LCE_RETURN_IF_ERROR(gemm_host_scalars(handle, N, N, d, n, vc, 1.0f, w_c, ldw, dz, ldz,
                                                v0 > 0 ? 1.0f : 0.0f, dx_acc, dx_ld));
        } else {
          LCE_RETURN_IF_ERROR(gemm(handle, N, N, d, n, vc, alpha, w_c, ldw, dz, ldz,
                                   v0 > 0 ? one : dx_beta0, dx_acc, dx_ld));
        }
      }
    }
    if (a.dx != nullptr && own_accumulator) {
      const auto blocks = static_cast<unsigned>(std::min<std::int64_t>((n * d + 255) / 256, 4096));
      kernel::convert_rows_kernel<Element>
          <<<blocks, 256, 0, stream>>>(dx_acc, n, d, a.dx, lddx, o.accumulate, alpha);
      LCE_CHECK_LAUNCH("convert_rows_kernel");
    }
    return cudaSuccess;
  }

  if constexpr (std::is_same_v<Grad, float>) {
    // sm_90a with the lse given: the recompute and dZ in one kernel. Its 16-bit dZ rows are
    // packed at stride chunk_ld elements, so the buffer holds twice the rows: half the chunks,
    // half the read-modify-write passes over the fp32 dW. Tried on the first chunk, as above.
    bool try_fused = fwd == nullptr;
    std::int64_t nr = 0;
    for (std::int64_t r0 = 0; r0 < n; r0 += nr) {
      nr = std::min(try_fused ? 2 * plan.chunk : plan.chunk, n - r0);
      const Element* x_c = a.x + r0 * ldx;
      const float* beta = r0 == 0 ? first_beta : one;
      gp.cols = v_local;
      gp.row0 = r0;
      gp.vocab0 = window.begin;
      bool fused = false;
      std::int64_t ldz_c = ldz;
      if (try_fused) {
        ldz_c = plan.chunk_ld;
        LCE_RETURN_IF_ERROR((run_logit_grad_sm90<Element, Config>(
            gp, x_c, nr, ldx, a.w, ldw, d, const_cast<Element*>(dz), ldz_c, fused, stream)));
        if (!fused) {
          try_fused = false;
          nr = std::min(plan.chunk, n - r0);
          ldz_c = ldz;
        }
      }
      if (!fused) {
        // Z_cᵀ [v_local, nr] = W · X_cᵀ
        LCE_RETURN_IF_ERROR(gemm(handle, T, N, v_local, nr, d, one, a.w, ldw, x_c, ldx, zero,
                                 logits, plan.chunk_ld));
      }
      if (fwd != nullptr) {
        constexpr int lse_threads = 512;
        const kernel::row_lse_params<Element> lp{
            logits,
            plan.chunk_ld,
            r0,
            a.bias,
            make_transform(o),
            make_row_loss_params(a.targets, s, o, a.class_weight, scalars),
            *fwd};
        kernel::row_lse_kernel<Element, lse_threads>
            <<<static_cast<unsigned>(nr), lse_threads, 0, stream>>>(lp);
        LCE_CHECK_LAUNCH("row_lse_kernel");
      }
      if (!fused) {
        kernel::logit_grad_kernel<Element, grad_threads, grad_per_thread>
            <<<static_cast<unsigned>(nr), grad_threads, 0, stream>>>(gp);
        LCE_CHECK_LAUNCH("logit_grad_kernel");
      }
      if (a.dx != nullptr) {  // dX_cᵀ [d, nr] = Wᵀ · dZ_cᵀ
        if (dx_partial != nullptr)
          LCE_RETURN_IF_ERROR(gemm(handle, N, N, d, nr, v_local, alpha, a.w, ldw, dz, ldz_c, zero,
                                   dx_partial + r0 * d, d));
        else
          LCE_RETURN_IF_ERROR(gemm(handle, N, N, d, nr, v_local, alpha, a.w, ldw, dz, ldz_c,
                                   first_beta, a.dx + r0 * lddx, lddx));
      }
      if (a.dw != nullptr)  // dWᵀ [d, v_local] += X_cᵀ · dZ_c
        LCE_RETURN_IF_ERROR(
            gemm(handle, N, T, d, v_local, nr, alpha, x_c, ldx, dz, ldz_c, beta, a.dw, lddw));
      if (a.db != nullptr)  // db [v_local, 1] += dZ_cᵀ · 1
        LCE_RETURN_IF_ERROR(
            gemm(handle, N, N, v_local, 1, nr, alpha, dz, ldz_c, ones, nr, beta, a.db, v_local));
    }
  }
  return cudaSuccess;
}

/// lce::backward's and lce::forward_backward's backward: the whole vocabulary, dX into the
/// caller's buffer (run_chunked_backward).
template <class Element, class Grad, class Config>
cudaError_t run_backward(void* ws, const backward_plan& plan, const backward_args<Element, Grad>& a,
                         const problem& s, const loss_options& o, cublasHandle_t handle,
                         cudaStream_t stream, const thread::row_outputs* fwd = nullptr) noexcept {
  return run_chunked_backward<Element, Grad, Config>(ws, plan, a, s, vocab_window{0, s.v}, nullptr,
                                                     o, handle, stream, fwd);
}

}  // namespace device
LCE_NAMESPACE_END
