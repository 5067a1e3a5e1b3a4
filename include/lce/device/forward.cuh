/// @file forward.cuh
/// @brief Device-wide forward: the fused tiled-matmul + online-lse kernel, the per-row combine
/// and the loss reduction, enqueued on one stream. Internal layer of lce::forward.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../args.hpp"
#include "../config.hpp"
#include "../detail/stored_exp.hpp"
#include "../detail/tensor_map.hpp"
#include "../detail/workspace.hpp"
#include "../kernel/forward_finalize.cuh"
#include "../kernel/fused_forward.cuh"
#include "../kernel/fused_forward_sm90.cuh"
#include "../status.hpp"
#include "../thread/finish_row.cuh"
#include "../thread/loss_scalars.cuh"
#include "launch.cuh"

LCE_NAMESPACE_BEGIN
namespace device {

/// Vocabulary splits are chosen so that the grid holds about this many blocks, enough to fill
/// any current GPU several times over; the choice depends on the shape only, which keeps the
/// workspace size a pure function of the shape.
inline constexpr std::int64_t forward_target_blocks = 1024;

inline forward_grid make_forward_grid(const problem& s, int block_m, int block_v) noexcept {
  forward_grid g;
  g.row_tiles = (s.n + block_m - 1) / block_m;
  g.vocab_tiles = (s.v + block_v - 1) / block_v;
  const std::int64_t wanted =
      (forward_target_blocks + g.row_tiles - 1) / std::max<std::int64_t>(g.row_tiles, 1);
  const std::int64_t splits = std::clamp<std::int64_t>(wanted, 1, g.vocab_tiles);
  g.tiles_per_split = (g.vocab_tiles + splits - 1) / splits;
  g.splits = (g.vocab_tiles + g.tiles_per_split - 1) / g.tiles_per_split;
  return g;
}

/// Grids and workspace regions of one forward. `sm90` is the grid of the sm_90a kernel when
/// the Config has one (else all zero); the partial statistics are sized for either kernel, so
/// the workspace size does not depend on the device.
struct forward_plan {
  forward_grid grid, sm90, sm90_general;
  std::size_t scalars = 0, partial = 0, target_logit = 0, ce = 0, token_z_loss = 0, argmax = 0;
  std::size_t bytes = 0;
};

template <class Config>
forward_plan make_forward_plan(const problem& s, detail::workspace_layout& layout) noexcept {
  forward_plan p;
  p.grid = make_forward_grid(s, Config::block_m, Config::block_v);
  using sm90_config = typename sm90_config_of<Config>::type;
  using sm90_general_config = typename sm90_general_config_of<Config>::type;
  if constexpr (!std::is_void_v<sm90_config>) {
    p.sm90 =
        make_balanced_grid(s, sm90_config::block_m, sm90_config::block_v, sm90_config::cluster_m);
    p.sm90_general =
        make_balanced_grid(s, sm90_general_config::block_m, sm90_general_config::block_v,
                           sm90_general_config::cluster_m);
  }
  const auto n = static_cast<std::size_t>(s.n);
  const auto splits =
      static_cast<std::size_t>(std::max({p.grid.splits, p.sm90.splits, p.sm90_general.splits}));
  p.scalars = layout.reserve<thread::loss_scalars>(1);
  p.partial = layout.reserve<thread::row_stats>(splits * n);
  p.target_logit = layout.reserve<float>(n);
  p.ce = layout.reserve<float>(n);
  p.token_z_loss = layout.reserve<float>(n);
  p.argmax = layout.reserve<std::int64_t>(n);
  p.bytes = layout.bytes();
  return p;
}

/// Per-row outputs: the caller's buffers, the workspace's where the reduction needs them.
template <class Element>
thread::row_outputs make_row_outputs(void* ws, const forward_plan& plan,
                                     const forward_args<Element>& a) noexcept {
  return {a.lse,
          a.token_loss,
          a.token_z_loss ? a.token_z_loss : detail::at<float>(ws, plan.token_z_loss),
          a.argmax ? a.argmax : detail::at<std::int64_t>(ws, plan.argmax),
          a.entropy,
          a.target_logprob,
          detail::at<float>(ws, plan.ce)};
}

/// Enqueues the deterministic reduction: loss, z_loss (mean/sum only) and correct.
inline cudaError_t run_reduce_loss(const thread::row_outputs& rows, const std::int64_t* targets,
                                   const problem& s, const loss_options& o,
                                   const thread::loss_scalars* scalars, float* loss, float* z_loss,
                                   std::int64_t* correct, cudaStream_t stream) noexcept {
  const bool reduced = o.reduction != lce::reduction::none;
  if (!(reduced && (loss || z_loss)) && correct == nullptr) return cudaSuccess;
  constexpr int threads = 512;
  const kernel::reduce_params rp{rows.ce,
                                 rows.token_z_loss,
                                 rows.argmax,
                                 make_target_view(targets, o),
                                 s.n,
                                 o.reduction,
                                 scalars,
                                 reduced ? loss : nullptr,
                                 reduced ? z_loss : nullptr,
                                 correct};
  kernel::reduce_loss_kernel<threads><<<1, threads, 0, stream>>>(rp);
  LCE_CHECK_LAUNCH("reduce_loss_kernel");
  return cudaSuccess;
}

/// Whether the sm_90a kernel of `SM90Config` runs this forward: a device of compute capability
/// 9.0 with the kernel's sm_90a code loaded, and operands the copy engine can read (then `fp`
/// holds their tensor maps).
template <class Element, class SM90Config, bool General, bool Store>
bool prepare_sm90_forward(
    typename kernel::fused_forward_sm90<Element, SM90Config, General, Store>::params& fp,
    const forward_args<Element>& a, const problem& s) noexcept {
  if (!sm90_kernel_runs<kernel::fused_forward_sm90_kernel<Element, SM90Config, General, Store>>())
    return false;
  return encode_operand_maps<SM90Config>(&fp.x_map, a.x, s.n, s.x_stride(), &fp.w_map, a.w, s.v,
                                         s.w_stride(), s.d);
}

/// Enqueues the sm_90a kernel of `SM90Config` if it applies (see prepare_sm90_forward); sets
/// `launched` and `splits`. Store: the kernel also writes `*store` (stored_exp). `row_offset`:
/// the global row of a.x's row 0 when the call covers a chunk of rows (targets are indexed by
/// global row; everything else by the chunk's).
template <class Element, class SM90Config, bool General, bool Store = false>
cudaError_t run_fused_forward_sm90(const forward_grid& grid, const forward_args<Element>& a,
                                   const problem& s, const loss_options& o,
                                   std::int64_t vocab_offset, thread::row_stats* partial,
                                   float* target_logit, bool& launched, std::int64_t& splits,
                                   cudaStream_t stream,
                                   const detail::stored_exp<Element>* store = nullptr,
                                   std::int64_t row_offset = 0) noexcept {
  using fused = kernel::fused_forward_sm90<Element, SM90Config, General, Store>;
  constexpr auto entry = kernel::fused_forward_sm90_kernel<Element, SM90Config, General, Store>;
  typename fused::params fp{};
  launched = false;
  if (!prepare_sm90_forward<Element, SM90Config, General, Store>(fp, a, s)) return cudaSuccess;
  if constexpr (Store) {
    fp.store = *store;
    // stored_exp's values meet the copy engine's rules (16-byte aligned, ld a multiple of 8).
    if (!detail::encode_tile_map(&fp.store_map, store->values, s.n, s.v, store->ld, 64,
                                 fused::tile_store::box_cols)) {
      return detail::invalid(
          "stored values: no tensor map for their bulk stores (shape or layout)");
    }
  }
  fp.n = s.n;
  fp.v = s.v;
  fp.d = s.d;
  fp.bias = a.bias;
  fp.class_weight = a.class_weight;
  fp.transform = make_transform(o);
  fp.extras = a.entropy != nullptr || a.argmax != nullptr || a.correct != nullptr ||
              o.label_smoothing != 0.0f;
  fp.targets = make_target_view(a.targets, o);
  fp.targets.vocab_offset = vocab_offset;
  fp.targets.row_offset = row_offset;
  fp.partial = partial;
  fp.target_logit = target_logit;
  LCE_RETURN_IF_ERROR(launch_sm90_grid<SM90Config>(entry, grid, fused::pipeline::threads,
                                                   fused::pipeline::smem_bytes, stream, fp));
  LCE_CHECK_LAUNCH("fused_forward_sm90_kernel");
  launched = true;
  splits = grid.splits;
  return cudaSuccess;
}

/// Enqueues the fused kernel alone: the per-(split, row) statistics to plan.partial and the
/// target logits to plan.target_logit; the sm_90a kernel where it applies (Config::sm90 without
/// bias and class weights, Config::sm90_general with them), else the mma.sync / FFMA one. Sets
/// `splits` to the number of vocabulary splits it wrote. `vocab_offset` is the global id of
/// column 0 of `a.w` when it holds a vocabulary shard (lce/nccl/; a.w, a.bias, a.class_weight
/// and s.v are then the shard's), 0 otherwise.
/// With `store` (the stored strategy), the lean sm_90a kernel also writes it, when it runs
/// (16-bit elements, no bias or class weights, an sm_90a device): `*stored` says whether it did.
template <class Element, class Config>
cudaError_t run_fused_forward(void* d_workspace, const forward_plan& plan,
                              const forward_args<Element>& a, const problem& s,
                              const loss_options& o, std::int64_t vocab_offset,
                              std::int64_t& splits, cudaStream_t stream,
                              const detail::stored_exp<Element>* store = nullptr,
                              bool* stored = nullptr) noexcept {
  auto* partial = detail::at<thread::row_stats>(d_workspace, plan.partial);
  auto* target_logit = detail::at<float>(d_workspace, plan.target_logit);
  if (stored != nullptr) *stored = false;

  using sm90_config = typename sm90_config_of<Config>::type;
  if constexpr (!std::is_void_v<sm90_config> && sizeof(Element) == 2) {
    bool launched = false;
    if (store != nullptr && a.bias == nullptr && a.class_weight == nullptr) {
      LCE_RETURN_IF_ERROR((run_fused_forward_sm90<Element, sm90_config, false, true>(
          plan.sm90, a, s, o, vocab_offset, partial, target_logit, launched, splits, stream,
          store)));
      if (launched) {
        if (stored != nullptr) *stored = true;
        return cudaSuccess;
      }
    }
    if (a.bias == nullptr && a.class_weight == nullptr) {
      LCE_RETURN_IF_ERROR((run_fused_forward_sm90<Element, sm90_config, false>(
          plan.sm90, a, s, o, vocab_offset, partial, target_logit, launched, splits, stream)));
    } else {
      using general = typename sm90_general_config_of<Config>::type;
      LCE_RETURN_IF_ERROR((run_fused_forward_sm90<Element, general, true>(
          plan.sm90_general, a, s, o, vocab_offset, partial, target_logit, launched, splits,
          stream)));
    }
    if (launched) return cudaSuccess;
  }

  using fused = kernel::fused_forward<Element, Config>;
  auto aligned = [](const Element* p, std::int64_t ld) {
    return reinterpret_cast<std::uintptr_t>(p) % 16 == 0 && (ld * sizeof(Element)) % 16 == 0;
  };
  typename fused::params fp{};
  fp.op = {a.x,
           a.w,
           s.x_stride(),
           s.w_stride(),
           s.n,
           s.v,
           s.d,
           aligned(a.x, s.x_stride()),
           aligned(a.w, s.w_stride())};
  fp.bias = a.bias;
  fp.class_weight = a.class_weight;
  fp.transform = make_transform(o);
  fp.targets = make_target_view(a.targets, o);
  fp.targets.vocab_offset = vocab_offset;
  fp.partial = partial;
  fp.target_logit = target_logit;
  fp.tiles_per_split = plan.grid.tiles_per_split;
  const dim3 grid(static_cast<unsigned>(plan.grid.row_tiles),
                  static_cast<unsigned>(plan.grid.splits));
  constexpr int smem_bytes = static_cast<int>(sizeof(typename fused::shared_storage));
  if constexpr (smem_bytes > 48 * 1024) {
    LCE_RETURN_IF_ERROR(cudaFuncSetAttribute(kernel::fused_forward_kernel<Element, Config>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             smem_bytes));
  }
  kernel::fused_forward_kernel<Element, Config><<<grid, Config::threads, smem_bytes, stream>>>(fp);
  LCE_CHECK_LAUNCH("fused_forward_kernel");
  splits = plan.grid.splits;
  return cudaSuccess;
}

/// Enqueues the forward. Arguments are already validated. `store`, `stored`: see
/// run_fused_forward.
template <class Element, class Config>
cudaError_t run_forward(void* d_workspace, const forward_plan& plan, const forward_args<Element>& a,
                        const problem& s, const loss_options& o, cudaStream_t stream,
                        const detail::stored_exp<Element>* store = nullptr,
                        bool* stored = nullptr) noexcept {
  auto* scalars = detail::at<thread::loss_scalars>(d_workspace, plan.scalars);
  LCE_RETURN_IF_ERROR(
      run_loss_scalars(a.targets, a.class_weight, nullptr, s, o, scalars, a.status, stream));

  std::int64_t splits = 0;
  LCE_RETURN_IF_ERROR((run_fused_forward<Element, Config>(d_workspace, plan, a, s, o, 0, splits,
                                                          stream, store, stored)));

  constexpr int combine_threads = 256;
  const kernel::combine_params cp{detail::at<thread::row_stats>(d_workspace, plan.partial),
                                  detail::at<float>(d_workspace, plan.target_logit),
                                  s.n,
                                  splits,
                                  make_row_loss_params(a.targets, s, o, a.class_weight, scalars),
                                  make_row_outputs(d_workspace, plan, a)};
  const auto combine_blocks = static_cast<unsigned>((s.n + combine_threads - 1) / combine_threads);
  kernel::combine_rows_kernel<combine_threads><<<combine_blocks, combine_threads, 0, stream>>>(cp);
  LCE_CHECK_LAUNCH("combine_rows_kernel");

  return run_reduce_loss(cp.out, a.targets, s, o, scalars, a.loss, a.z_loss, a.correct, stream);
}

}  // namespace device
LCE_NAMESPACE_END
