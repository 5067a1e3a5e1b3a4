/// @file stored.cuh
/// @brief Device-wide `stored` strategy (docs/algorithm.md §5.5): the lean sm_90a forward keeps
/// e^{z − m} of every logit in the element type with each (row, tile) maximum m, and the
/// backward forms dZ over them in place (kernel/stored_grad.cuh) before the gradient GEMMs — no
/// recomputation. All rows at once (after lce's own forward), or in row chunks within the budget
/// (run_stored_chunks: forward, combine and backward chunk by chunk, dW and db added to in
/// fp32). Serves
/// lce::forward_backward and lce::nccl::forward_backward (a vocabulary window and a partial dX).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../args.hpp"
#include "../config.hpp"
#include "../detail/cublas.cuh"
#include "../detail/stored_exp.hpp"
#include "../detail/workspace.hpp"
#include "../kernel/elementwise.cuh"
#include "../kernel/forward_finalize.cuh"
#include "../kernel/stored_grad.cuh"
#include "../kernel/stored_offset.cuh"
#include "../options.hpp"
#include "../thread/finish_row.cuh"
#include "../thread/loss_scalars.cuh"
#include "../thread/row_stats.cuh"
#include "chunked_backward.cuh"
#include "forward.cuh"
#include "launch.cuh"

LCE_NAMESPACE_BEGIN
namespace device {

/// Workspace regions of the `stored` strategy's backward (lce::forward_backward): the values
/// e^{z − m} [rows, ld] in the element type, the tile maxima [rows, tiles] and the ones of db,
/// for `rows` rows at a time. rows = n: one chunk, after a forward over all rows. rows < n
/// (row chunks, when the n rows do not fit the budget): the forward runs chunk by
/// chunk, each chunk's kernel writing its vocabulary-split statistics to `partial` (`splits`
/// per row at most). The maxima are one per row and tile of `tile_cols` columns, the tile
/// width of the sm_90a kernel that writes them (stored_tile_cols).
struct stored_plan {
  std::size_t ones = 0, values = 0, tile_max = 0, partial = 0;
  std::int64_t ld = 0, tiles = 0, tile_cols = 0, rows = 0;
  /// The per-row-offset form (kernel/stored_offset.cuh): the offsets, the flags and the row
  /// scales [rows] each, and `ones` holds the 16-bit row scales. dX goes through fp32 in row
  /// chunks: the first, of dx_first_rows rows, in tile_max's region (the maxima are not used by
  /// this form; the region holds at least min(rows, 256) fp32 rows of d); each later one, of
  /// up to dx_rows rows, in the stored values of the chunk before it, which its GEMM has
  /// consumed (dx_in_values: a row of values holds a row of fp32 dX, v ≥ 2d; else every chunk
  /// uses the region, dx_rows = dx_first_rows).
  std::size_t offset = 0, flagged = 0, scale = 0, target_grad = 0, target = 0;
  /// The rows grouped by target (kernel::target_group_params): start [v + 1], fill [v],
  /// grouped and ordered [rows], ints, zeroed (start and fill) before each chunk's dW and db;
  /// in tile_max's region too, which holds them (stored_groups_bytes) and which dX's first
  /// chunk takes only after them.
  std::size_t groups = 0, group_zeroed_bytes = 0;
  std::int64_t dx_rows = 0, dx_first_rows = 0;
  bool dx_in_values = false;
  /// Row chunks with a 16-bit dW: fp32 dW [v, d] and db [v] that every chunk adds to,
  /// converted into the caller's once at the end (accumulator_bytes = v·(d+1)·4, 0 without).
  bool accumulators = false;
  std::size_t dw_acc = 0, db_acc = 0, accumulator_bytes = 0;
  std::size_t bytes = 0;
};

/// The columns of one stored tile maximum: the width of the Config's sm_90a tiles, whose
/// forward writes the maxima (vocab_chunk_granule for a Config without one: no stored forward
/// runs, only the fallback's).
template <class Config>
constexpr std::int64_t stored_tile_cols() noexcept {
  using sm90 = typename sm90_config_of<Config>::type;
  if constexpr (std::is_void_v<sm90>) {
    return vocab_chunk_granule;
  } else {
    return sm90::block_v;
  }
}

/// The fp32 rows of d that the per-row-offset form's region holds at least (beyond the
/// maxima where those are fewer bytes).
inline constexpr std::int64_t stored_dx_min_region_rows = 256;

/// The bytes of the targets' groups of a chunk of `rows` rows (kernel::target_group_params;
/// none without rows).
inline std::size_t stored_groups_bytes(const problem& s, std::int64_t rows) noexcept {
  if (rows <= 0) return 0;
  const auto sums = static_cast<std::size_t>(kernel::scan_tiles(s.v + 1));
  return (2 * static_cast<std::size_t>(s.v) + 1 + 2 * static_cast<std::size_t>(rows) + sums) *
         sizeof(int);
}

/// Whether a stored plan of this element type holds the per-row-offset form's regions (dX's
/// fp32 row chunks): bf16, and lce's own forward_backward (lce::nccl keeps the pass).
template <class Element>
inline constexpr bool stored_offsets_possible = std::is_same_v<Element, __nv_bfloat16>;

/// The stored regions for chunks of `rows` rows; `splits`: the most vocabulary splits a chunk's
/// forward uses (0 for one chunk, whose forward is lce's own); `tile_cols`: the columns of a
/// tile maximum (stored_tile_cols of the Config that stores). `offsets`: room for the
/// per-row-offset form's regions too (the maxima's region at least
/// min(rows, stored_dx_min_region_rows) fp32 rows of d and the targets' groups,
/// stored_groups_bytes, and rows·24 bytes of per-row arrays).
template <class Element>
stored_plan make_stored_plan(const problem& s, std::int64_t rows, std::int64_t splits,
                             std::int64_t tile_cols, detail::workspace_layout& layout,
                             bool offsets = false) noexcept {
  stored_plan p;
  p.rows = rows;
  const auto r = static_cast<std::size_t>(rows);
  p.ones = layout.reserve<Element>(r);
  p.ld = round_up(s.v, 8);
  p.tile_cols = tile_cols;
  p.tiles = (s.v + tile_cols - 1) / tile_cols;
  p.values = layout.reserve<Element>(r * static_cast<std::size_t>(p.ld));
  const std::size_t tile_max_bytes = r * static_cast<std::size_t>(p.tiles) * sizeof(float);
  const std::size_t row_bytes = static_cast<std::size_t>(s.d) * sizeof(float);
  const std::size_t groups_bytes = stored_groups_bytes(s, rows);
  const std::size_t region_bytes =
      offsets ? std::max({tile_max_bytes,
                          std::min<std::size_t>(r, stored_dx_min_region_rows) * row_bytes,
                          groups_bytes})
              : tile_max_bytes;
  p.tile_max = layout.reserve<char>(region_bytes);
  if (offsets) {
    // dX's row chunks: the first as many rows as the region holds (in multiples of 256 where
    // there are that many), the later ones as many as the values before them hold — with
    // Llama 3's 128256 × 4096, 15 times as many: two GEMMs, the second the larger.
    std::size_t first = std::min(r, region_bytes / row_bytes);
    if (first >= 256 && first < r) first = first / 256 * 256;
    p.dx_first_rows = static_cast<std::int64_t>(std::max<std::size_t>(first, 1));
    p.dx_in_values = static_cast<std::size_t>(p.ld) * sizeof(Element) >= row_bytes;
    p.dx_rows = p.dx_in_values ? rows : p.dx_first_rows;
    p.offset = layout.reserve<float>(r);
    p.flagged = layout.reserve<int>(r);
    p.scale = layout.reserve<float>(r);
    p.target_grad = layout.reserve<float>(r);
    p.target = layout.reserve<std::int64_t>(r);
    p.groups = p.tile_max;  // before dX's first chunk is written there
    p.group_zeroed_bytes = (2 * static_cast<std::size_t>(s.v) + 1) * sizeof(int);
  }
  p.partial = layout.reserve<thread::row_stats>(r * static_cast<std::size_t>(splits));
  p.bytes = layout.bytes();
  return p;
}

/// The rows of the per-row-offset form's fp32 dX chunk at row c0 of a chunk of `rows` rows,
/// `previous` the rows of the one before it: the first no more than the region holds, each
/// later one (dx_in_values) no more than the values of the one before it hold.
template <class Element>
std::int64_t stored_dx_chunk_rows(const stored_plan& p, const problem& s, std::int64_t c0,
                                  std::int64_t previous, std::int64_t rows) noexcept {
  if (c0 == 0) return std::min(p.dx_first_rows, rows);
  std::int64_t cr = std::min(p.dx_rows, rows - c0);
  if (p.dx_in_values) {
    const std::size_t held = static_cast<std::size_t>(previous) * static_cast<std::size_t>(p.ld) *
                             sizeof(Element) / (static_cast<std::size_t>(s.d) * sizeof(float));
    cr = std::min(cr, static_cast<std::int64_t>(held));
  }
  return cr;
}

/// Where a plan's values and tile maxima lie in its workspace `ws` (the per-row-offset form's
/// offset and flags are set by its caller).
template <class Element>
detail::stored_exp<Element> stored_values(void* ws, const stored_plan& p) noexcept {
  return {detail::at<Element>(ws, p.values), detail::at<float>(ws, p.tile_max), p.ld, p.tiles,
          p.tile_cols};
}

/// The stored plan in row chunks within `budget` (Element 16-bit, Config with an sm_90a
/// kernel): as many rows per chunk as the budget holds, in whole row tiles of the kernel. rows
/// is 0 where no chunk fits or where every row does (then one chunk is the plan). With
/// `fp32_accumulators` (a 16-bit dW, which cannot be added to chunk by chunk) the budget also
/// holds an fp32 dW and db (v·d·4 + v·4 bytes) ahead of the chunks' regions.
template <class Element, class Config>
stored_plan make_stored_chunk_plan(const problem& s, std::size_t budget,
                                   bool fp32_accumulators = false) noexcept {
  using config = typename sm90_config_of<Config>::type;
  const std::int64_t granule = std::int64_t{config::block_m} * config::cluster_m;
  const auto ld = static_cast<std::size_t>(round_up(s.v, 8));
  constexpr std::int64_t tile_cols = stored_tile_cols<Config>();
  const auto tiles = static_cast<std::size_t>((s.v + tile_cols - 1) / tile_cols);
  // values, the tile maxima, the 16-bit ones or row scales, offset, flag, scale, target entry
  // and column, the splits' statistics
  const std::size_t per_row = ld * sizeof(Element) + tiles * sizeof(float) + sizeof(Element) +
                              3 * sizeof(float) + sizeof(int) + sizeof(std::int64_t) +
                              static_cast<std::size_t>(max_sm90_splits) * sizeof(thread::row_stats);
  const std::size_t accumulators =
      fp32_accumulators
          ? static_cast<std::size_t>(s.v) * (static_cast<std::size_t>(s.d) + 1) * sizeof(float)
          : 0;
  const std::size_t slack = 11 * detail::workspace_layout::alignment + accumulators;
  const auto rows_within = [&](std::size_t more) {
    const std::size_t fixed = slack + more;
    const std::int64_t r =
        budget > fixed ? static_cast<std::int64_t>((budget - fixed) / per_row) : 0;
    return r / granule * granule;
  };
  std::int64_t rows = rows_within(0);
  // The per-row-offset form's region holds at least 256 fp32 rows of d and the targets' groups
  // (make_stored_plan): beyond the maxima only where those take fewer bytes.
  const std::size_t dx_region = static_cast<std::size_t>(stored_dx_min_region_rows) *
                                static_cast<std::size_t>(s.d) * sizeof(float);
  const std::size_t region =
      std::max(dx_region, stored_groups_bytes(s, std::max<std::int64_t>(rows, 0)));
  if (stored_offsets_possible<Element> &&
      static_cast<std::size_t>(std::max<std::int64_t>(rows, 0)) * tiles * sizeof(float) < region)
    rows = rows_within(region);
  if (rows <= 0 || rows >= s.n) return {};
  problem chunk = s;
  chunk.n = rows;
  std::int64_t splits =
      make_balanced_grid(chunk, config::block_m, config::block_v, config::cluster_m).splits;
  if (s.n % rows != 0) {  // the last, shorter chunk may take more splits
    chunk.n = s.n % rows;
    splits = std::max(
        splits,
        make_balanced_grid(chunk, config::block_m, config::block_v, config::cluster_m).splits);
  }
  detail::workspace_layout layout;
  std::size_t dw_acc = 0, db_acc = 0;
  if (fp32_accumulators) {
    dw_acc = layout.reserve<float>(static_cast<std::size_t>(s.v) * static_cast<std::size_t>(s.d));
    db_acc = layout.reserve<float>(static_cast<std::size_t>(s.v));
  }
  stored_plan p = make_stored_plan<Element>(s, rows, splits, tile_cols, layout,
                                            stored_offsets_possible<Element>);
  p.accumulators = fp32_accumulators;
  p.dw_acc = dw_acc;
  p.db_acc = db_acc;
  p.accumulator_bytes = accumulators;
  return p;
}

/// The backward's arguments with fp32 dW and db: `a` itself where they are fp32, else a copy
/// (by name) whose dw and db (where asked for) are the plan's accumulators.
template <class Element>
backward_args<Element, float> with_fp32_weight_grads(const backward_args<Element, float>& a, float*,
                                                     float*) noexcept {
  return a;
}
template <class Element, class Grad>
backward_args<Element, float> with_fp32_weight_grads(const backward_args<Element, Grad>& a,
                                                     float* dw, float* db) noexcept {
  backward_args<Element, float> f;
  f.x = a.x;
  f.w = a.w;
  f.bias = a.bias;
  f.targets = a.targets;
  f.lse = a.lse;
  f.grad = a.grad;
  f.dx = a.dx;
  f.dw = a.dw != nullptr ? dw : nullptr;
  f.db = a.db != nullptr ? db : nullptr;
  f.class_weight = a.class_weight;
  f.status = a.status;
  return f;
}

/// The rows of one stored backward: [r0, r0 + count) of the problem (count < 0: all n).
struct row_range {
  std::int64_t r0 = 0;
  std::int64_t count = -1;
};

/// Whether the stored strategy takes its per-row-offset form (kernel/stored_offset.cuh, no
/// pass over the n·V values): bf16 (fp16 cannot hold e^{z − c}), the whole vocabulary, a dX
/// that is not added to (it holds f ⊙ X until dX is written), and options under which dZ off
/// the target is a row scale times E (a softcap's derivative is stored into E by the forward)
/// — no label smoothing (a term on every column) and no filter_eps. Elsewhere the pass.
template <class Element, class Grad>
bool stored_offset_form(const backward_args<Element, Grad>& a, const loss_options& o) noexcept {
  return std::is_same_v<Element, __nv_bfloat16> && a.dx != nullptr && !o.accumulate &&
         o.label_smoothing == 0.0f && o.filter_eps == 0.0f;
}

/// Enqueues the offsets of rows [r0, r0 + s.n) (x: their first row) before the forward that
/// stores against them, and clears their flags (plan regions `offset`, `flagged`).
template <class Element>
cudaError_t run_stored_offsets(const Element* x, const Element* w, const std::int64_t* targets,
                               const problem& s, const loss_options& o, std::int64_t r0,
                               float* offset, int* flagged, cudaStream_t stream) noexcept {
  kernel::stored_offset_params<Element> p{x,
                                          w,
                                          s.n,
                                          s.d,
                                          s.v,
                                          s.x_stride(),
                                          s.w_stride(),
                                          make_target_view(targets, o),
                                          make_transform(o),
                                          offset,
                                          flagged};
  p.targets.row_offset = r0;
  constexpr int threads = 256;  // 8 rows a block
  const auto blocks = static_cast<unsigned>(std::min<std::int64_t>((s.n + 7) / 8, 65535));
  kernel::stored_offset_kernel<Element><<<blocks, threads, 0, stream>>>(p);
  LCE_CHECK_LAUNCH("stored_offset_kernel");
  return cudaSuccess;
}

/// The per-row-offset form of run_stored_backward (stored_offset_form holds, st.offset set):
/// the row scales, the targets' entries (out of E) and f ⊙ X (into the caller's dX rows), then
/// db = Eᵀ·f and dW = Eᵀ·(f ⊙ X) with the targets' entries added to their rows, and
/// dX = diag(f)·(E·W) + t·W_y in fp32 row chunks, rounded once.
template <class Element, class Grad>
cudaError_t run_stored_offset_backward(
    void* ws, const stored_plan& plan, const detail::stored_exp<Element>& st,
    const thread::loss_scalars* scalars, const float* target_logit,
    const backward_args<Element, Grad>& a, const problem& s, const loss_options& o,
    cublasHandle_t handle, cudaStream_t stream, std::int64_t r0, std::int64_t rows) noexcept {
  using detail::gemm;
  constexpr cublasOperation_t N = CUBLAS_OP_N;
  constexpr cublasOperation_t T = CUBLAS_OP_T;
  constexpr int threads = 256;
  const float* one = &scalars->one;
  const float* zero = &scalars->zero;
  const float* alpha = &scalars->alpha;
  const float* beta = r0 == 0 ? zero : one;
  auto* scale = detail::at<float>(ws, plan.scale);
  auto* scale_16bit = detail::at<Element>(ws, plan.ones);
  auto* target_grad = detail::at<float>(ws, plan.target_grad);
  auto* target = detail::at<std::int64_t>(ws, plan.target);
  const Element* x_c = a.x + r0 * s.x_stride();
  Element* x_scaled = a.dx + r0 * s.dx_stride();
  kernel::stored_fix_params<Element> fp{make_logit_grad_params(a, s, o, scalars, 0),
                                        st.values,
                                        st.ld,
                                        st.offset,
                                        st.flagged,
                                        target_logit,
                                        x_c,
                                        a.w,
                                        s.d,
                                        s.x_stride(),
                                        s.w_stride(),
                                        x_scaled,
                                        s.dx_stride(),
                                        scale,
                                        scale_16bit,
                                        target_grad,
                                        target};
  fp.grad.row0 = r0;
  fp.grad.cols = s.v;
  kernel::stored_fix_kernel<Element, threads>
      <<<static_cast<unsigned>(rows), threads, 0, stream>>>(fp);
  LCE_CHECK_LAUNCH("stored_fix_kernel");
  const Element* e = st.values;
  if (a.db != nullptr)  // db [v, 1] (+)= Eᵀ · f
    LCE_RETURN_IF_ERROR(
        gemm(handle, N, N, s.v, 1, rows, alpha, e, st.ld, scale_16bit, rows, beta, a.db, s.v));
  if (a.dw != nullptr)  // dWᵀ [d, v] (+)= (f ⊙ X_c)ᵀ · E
    LCE_RETURN_IF_ERROR(gemm(handle, N, T, s.d, s.v, rows, alpha, x_scaled, s.dx_stride(), e, st.ld,
                             beta, a.dw, s.dw_stride()));
  if (a.dw != nullptr || a.db != nullptr) {  // the targets' rows of dW and db
    auto* groups = detail::at<int>(ws, plan.groups);
    const kernel::target_group_params gp{target,
                                         rows,
                                         s.v,
                                         groups,
                                         groups + s.v + 1,
                                         groups + 2 * s.v + 1,
                                         groups + 2 * s.v + 1 + rows,
                                         groups + 2 * s.v + 1 + 2 * rows};
    LCE_RETURN_IF_ERROR(cudaMemsetAsync(groups, 0, plan.group_zeroed_bytes, stream));
    const auto row_blocks = static_cast<unsigned>(std::min<std::int64_t>((rows + 255) / 256, 1024));
    kernel::target_count_kernel<256><<<row_blocks, 256, 0, stream>>>(gp);
    LCE_CHECK_LAUNCH("target_count_kernel");
    const auto scan_blocks = static_cast<unsigned>(kernel::scan_tiles(s.v + 1));
    kernel::scan_sums_kernel<>
        <<<scan_blocks, kernel::scan_threads, 0, stream>>>(groups, s.v + 1, gp.sums);
    LCE_CHECK_LAUNCH("scan_sums_kernel");
    kernel::exclusive_scan_kernel<>
        <<<scan_blocks, kernel::scan_threads, 0, stream>>>(groups, s.v + 1, gp.sums);
    LCE_CHECK_LAUNCH("exclusive_scan_kernel");
    kernel::target_place_kernel<256><<<row_blocks, 256, 0, stream>>>(gp);
    LCE_CHECK_LAUNCH("target_place_kernel");
    kernel::target_order_kernel<256><<<row_blocks, 256, 0, stream>>>(gp);
    LCE_CHECK_LAUNCH("target_order_kernel");
    const kernel::target_grad_params<Element, Grad> tp{
        target, gp.start,     gp.ordered, target_grad, x_c,           rows, s.v,
        s.d,    s.x_stride(), alpha,      a.dw,        s.dw_stride(), a.db};
    constexpr std::int64_t slice = std::int64_t{kernel::target_grad_per_thread} * threads;
    const dim3 target_blocks(static_cast<unsigned>(rows),
                             static_cast<unsigned>((s.d + slice - 1) / slice));
    kernel::target_grad_kernel<Element, Grad, threads><<<target_blocks, threads, 0, stream>>>(tp);
    LCE_CHECK_LAUNCH("target_grad_kernel");
  }
  // dX_c by row chunks through fp32: alpha·(E·W)ᵀ [d, cr] = Wᵀ · Eᵀ, then scaled, the target's
  // row added, and rounded once into the caller's rows, which held f ⊙ X until the dW GEMM
  // above read it. The first chunk's fp32 rows go to the maxima's region, each later chunk's
  // into the values of the chunk before it (read by its GEMM already, stream-ordered): at
  // most as many fp32 rows as those values hold.
  auto* region = detail::at<float>(ws, plan.tile_max);
  std::int64_t cr = 0;
  for (std::int64_t c0 = 0; c0 < rows; c0 += cr) {
    float* chunk = c0 > 0 && plan.dx_in_values
                       ? reinterpret_cast<float*>(st.values + (c0 - cr) * st.ld)
                       : region;
    cr = stored_dx_chunk_rows<Element>(plan, s, c0, cr, rows);
    LCE_RETURN_IF_ERROR(gemm(handle, N, N, s.d, cr, s.v, alpha, a.w, s.w_stride(), e + c0 * st.ld,
                             st.ld, zero, chunk, s.d));
    const kernel::scale_rows_params<Element> sp{chunk,
                                                scale + c0,
                                                target_grad + c0,
                                                target + c0,
                                                a.w,
                                                s.w_stride(),
                                                alpha,
                                                cr,
                                                s.d,
                                                a.dx + (r0 + c0) * s.dx_stride(),
                                                s.dx_stride()};
    const auto blocks = static_cast<unsigned>(std::min<std::int64_t>(cr, 8192));
    kernel::scale_rows_kernel<Element><<<blocks, threads, 0, stream>>>(sp);
    LCE_CHECK_LAUNCH("scale_rows_kernel");
  }
  return cudaSuccess;
}

/// The stored strategy's backward over a range of rows and a vocabulary window (`window`: the
/// rows of a.w, a.bias, a.dw and a.db, as run_chunked_backward takes it), after the forward
/// wrote the range's values of the window into `st` (with a.lse, the forward's `scalars` and
/// fp32 `target_logit`, by global row): dZ in place over the stored values, then dX's rows =
/// dZ·W_window — into the caller's a.dx, or with `dx_partial` (dense fp32 [n, d]) the window's
/// partial sum for a collective to reduce — and dW += dZᵀ·X, db += dZᵀ·1, written (or, with
/// o.accumulate, added) by the first range (r0 = 0), added to by the others (fp32 dW and db
/// when there are several).
template <class Element, class Grad>
cudaError_t run_stored_backward(void* ws, const stored_plan& plan,
                                const detail::stored_exp<Element>& st,
                                const thread::loss_scalars* scalars, const float* target_logit,
                                const backward_args<Element, Grad>& a, const problem& s,
                                const vocab_window& window, float* dx_partial,
                                const loss_options& o, cublasHandle_t handle, cudaStream_t stream,
                                row_range range = {}) noexcept {
  using detail::gemm;
  constexpr cublasOperation_t N = CUBLAS_OP_N;
  constexpr cublasOperation_t T = CUBLAS_OP_T;
  constexpr int threads = 256;
  const std::int64_t r0 = range.r0;
  const std::int64_t rows = range.count < 0 ? s.n : range.count;
  const std::int64_t v = window.rows;
  const float* one = &scalars->one;
  const float* zero = &scalars->zero;
  const float* alpha = &scalars->alpha;
  const float* first_beta = o.accumulate ? one : zero;
  const float* beta = r0 == 0 ? first_beta : one;
  if (st.offset != nullptr) {
    if constexpr (std::is_same_v<Element, __nv_bfloat16>) {
      if (dx_partial != nullptr || window.begin != 0 || window.rows != s.v || a.dx == nullptr)
        return detail::invalid("stored per-row offsets: the whole vocabulary and the caller's dX");
      return run_stored_offset_backward(ws, plan, st, scalars, target_logit, a, s, o, handle,
                                        stream, r0, rows);
    } else {
      return detail::invalid("stored per-row offsets: bf16 only");
    }
  }
  kernel::stored_grad_params<Element> sp{make_logit_grad_params(a, s, o, scalars, window.begin), st,
                                         target_logit};
  sp.grad.row0 = r0;
  sp.grad.vocab0 = window.begin;
  sp.grad.cols = v;
  kernel::stored_grad_kernel<Element, threads>
      <<<static_cast<unsigned>(rows), threads, 0, stream>>>(sp);
  LCE_CHECK_LAUNCH("stored_grad_kernel");
  const Element* dz = st.values;
  const Element* x_c = a.x + r0 * s.x_stride();
  if (a.dx != nullptr) {  // dX_cᵀ [d, rows] = W_windowᵀ · dZ_cᵀ
    if (dx_partial != nullptr)
      LCE_RETURN_IF_ERROR(gemm(handle, N, N, s.d, rows, v, alpha, a.w, s.w_stride(), dz, st.ld,
                               zero, dx_partial + r0 * s.d, s.d));
    else
      LCE_RETURN_IF_ERROR(gemm(handle, N, N, s.d, rows, v, alpha, a.w, s.w_stride(), dz, st.ld,
                               first_beta, a.dx + r0 * s.dx_stride(), s.dx_stride()));
  }
  if (a.dw != nullptr)  // dWᵀ [d, v] (+)= X_cᵀ · dZ_c
    LCE_RETURN_IF_ERROR(gemm(handle, N, T, s.d, v, rows, alpha, x_c, s.x_stride(), dz, st.ld, beta,
                             a.dw, s.dw_stride()));
  if (a.db != nullptr) {  // db [v, 1] (+)= dZ_cᵀ · 1
    auto* ones = detail::at<Element>(ws, plan.ones);
    if (r0 == 0) {
      kernel::fill_kernel<Element>
          <<<std::min<std::int64_t>((rows + 255) / 256, 1024), 256, 0, stream>>>(ones, rows, 1.0f);
      LCE_CHECK_LAUNCH("fill_kernel");
    }
    LCE_RETURN_IF_ERROR(
        gemm(handle, N, N, v, 1, rows, alpha, dz, st.ld, ones, rows, beta, a.db, v));
  }
  return cudaSuccess;
}

/// Per-row outputs of rows [r0, ...): each pointer moved to the chunk's first row.
inline thread::row_outputs rows_from(thread::row_outputs r, std::int64_t r0) noexcept {
  const auto from = [r0](auto* p) { return p != nullptr ? p + r0 : p; };
  return {from(r.lse),    from(r.token_loss), from(r.token_z_loss),
          from(r.argmax), from(r.entropy),    from(r.target_logprob),
          from(r.ce)};
}

/// The stored strategy in row chunks (plan.rows < n; dW and db in fp32, which every chunk adds
/// to — the caller's, or for a 16-bit Grad the plan's accumulators, converted at the end): for each
/// chunk, the lean sm_90a forward over its rows stores their values, the rows' statistics are
/// combined into the lse and every per-row output, and run_stored_backward forms their gradients;
/// the loss is reduced over all rows at the end. `fa` is the forward's arguments with fa.lse set
/// (a.lse the same), `fplan` the forward plan of the whole problem in `fwd_ws` (its scalars, target
/// logits and per-row regions serve every chunk). `launched` is false, with nothing enqueued, where
/// the store kernel cannot run (a bias or class weights, a device without the sm_90a kernel,
/// operands its copy engine cannot read).
template <class Element, class Grad, class Config>
cudaError_t run_stored_chunks(void* fwd_ws, const forward_plan& fplan, void* ws,
                              const stored_plan& plan, const forward_args<Element>& fa,
                              const backward_args<Element, Grad>& a, const problem& s,
                              const loss_options& o, cublasHandle_t handle, cudaStream_t stream,
                              bool& launched) noexcept {
  using config = typename sm90_config_of<Config>::type;
  launched = false;
  if constexpr (std::is_void_v<config> || sizeof(Element) != 2) {
    return cudaSuccess;
  } else {
    if (fa.bias != nullptr || fa.class_weight != nullptr) return cudaSuccess;
    {  // the checks of the first launch, before anything is enqueued
      typename kernel::fused_forward_sm90<Element, config, false, true>::params probe{};
      problem first = s;
      first.n = std::min(plan.rows, s.n);
      if (!prepare_sm90_forward<Element, config, false, true>(probe, fa, first)) return cudaSuccess;
    }
    launched = true;
    auto* scalars = detail::at<thread::loss_scalars>(fwd_ws, fplan.scalars);
    auto* target_logit = detail::at<float>(fwd_ws, fplan.target_logit);
    auto* partial = detail::at<thread::row_stats>(ws, plan.partial);
    LCE_RETURN_IF_ERROR(
        run_loss_scalars(fa.targets, nullptr, nullptr, s, o, scalars, fa.status, stream));
    const thread::row_outputs all_rows = make_row_outputs(fwd_ws, fplan, fa);
    detail::stored_exp<Element> st = stored_values<Element>(ws, plan);
    // dW and db: the caller's where they are fp32, else the plan's fp32 accumulators (dense
    // [v, d]: the chunks see a problem whose dW stride is d), zeroed first where the chunks
    // add to them from the start (accumulate: the caller's values join in the conversion).
    float* dw_acc = nullptr;
    float* db_acc = nullptr;
    problem sg = s;
    if constexpr (!std::is_same_v<Grad, float>) {
      if (!plan.accumulators) return detail::invalid("stored row chunks: no fp32 accumulators");
      dw_acc = detail::at<float>(ws, plan.dw_acc);
      db_acc = detail::at<float>(ws, plan.db_acc);
      sg.lddw = s.d;
      if (o.accumulate) {
        if (a.dw != nullptr)
          LCE_RETURN_IF_ERROR(cudaMemsetAsync(
              dw_acc, 0, static_cast<std::size_t>(s.v * s.d) * sizeof(float), stream));
        if (a.db != nullptr)
          LCE_RETURN_IF_ERROR(
              cudaMemsetAsync(db_acc, 0, static_cast<std::size_t>(s.v) * sizeof(float), stream));
      }
    }
    const backward_args<Element, float> grads = with_fp32_weight_grads(a, dw_acc, db_acc);
    const bool offsets = stored_offset_form(grads, o);
    if (offsets) {
      st.offset = detail::at<float>(ws, plan.offset);
      st.flagged = detail::at<int>(ws, plan.flagged);
    }
    constexpr int combine_threads = 256;
    for (std::int64_t r0 = 0; r0 < s.n; r0 += plan.rows) {
      problem chunk = s;
      chunk.n = std::min(plan.rows, s.n - r0);
      forward_args<Element> fc = fa;
      fc.x = fa.x + r0 * s.x_stride();
      const forward_grid grid =
          make_balanced_grid(chunk, config::block_m, config::block_v, config::cluster_m);
      if (offsets) {
        LCE_RETURN_IF_ERROR(run_stored_offsets(fc.x, fa.w, fa.targets, chunk, o, r0,
                                               detail::at<float>(ws, plan.offset), st.flagged,
                                               stream));
      }
      bool ran = false;
      std::int64_t splits = 0;
      LCE_RETURN_IF_ERROR((run_fused_forward_sm90<Element, config, false, true>(
          grid, fc, chunk, o, 0, partial, target_logit + r0, ran, splits, stream, &st, r0)));
      if (!ran) return detail::invalid("stored forward: the sm_90a kernel stopped launching");
      thread::row_loss_params loss = make_row_loss_params(fa.targets, s, o, nullptr, scalars);
      loss.targets.row_offset = r0;
      const kernel::combine_params cp{partial, target_logit + r0,      chunk.n, splits,
                                      loss,    rows_from(all_rows, r0)};
      const auto blocks = static_cast<unsigned>((chunk.n + combine_threads - 1) / combine_threads);
      kernel::combine_rows_kernel<combine_threads><<<blocks, combine_threads, 0, stream>>>(cp);
      LCE_CHECK_LAUNCH("combine_rows_kernel");
      LCE_RETURN_IF_ERROR(run_stored_backward(ws, plan, st, scalars, target_logit, grads, sg,
                                              vocab_window{0, s.v}, nullptr, o, handle, stream,
                                              row_range{r0, chunk.n}));
    }
    if constexpr (!std::is_same_v<Grad, float>) {
      // The accumulators into the caller's dW [v, d] and db [1, v] (added to with accumulate).
      const auto convert = [&](const float* from, std::int64_t rows, std::int64_t cols, Grad* to,
                               std::int64_t ld) {
        constexpr int threads = 256;
        const auto blocks = static_cast<unsigned>(
            std::min<std::int64_t>((rows * cols + threads - 1) / threads, 4096));
        kernel::convert_rows_kernel<Element>
            <<<blocks, threads, 0, stream>>>(from, rows, cols, to, ld, o.accumulate);
        LCE_CHECK_LAUNCH("convert_rows_kernel");
        return cudaSuccess;
      };
      if (a.dw != nullptr) LCE_RETURN_IF_ERROR(convert(dw_acc, s.v, s.d, a.dw, s.dw_stride()));
      if (a.db != nullptr) LCE_RETURN_IF_ERROR(convert(db_acc, 1, s.v, a.db, s.v));
    }
    return run_reduce_loss(all_rows, fa.targets, s, o, scalars, fa.loss, fa.z_loss, fa.correct,
                           stream);
  }
}

}  // namespace device
LCE_NAMESPACE_END
