/// @file forward.cuh
/// @brief Device-wide forward: the fused tiled-matmul + online-lse kernel, the per-row combine
/// and the loss reduction, enqueued on one stream. Internal layer of lce::forward.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../args.hpp"
#include "../detail/workspace.hpp"
#include "../kernel/elementwise.cuh"
#include "../kernel/forward_finalize.cuh"
#include "../kernel/fused_forward.cuh"
#include "../status.hpp"

LCE_NAMESPACE_BEGIN
namespace device {

/// Vocabulary splits are chosen so that the grid holds about this many blocks, enough to fill
/// any current GPU several times over; the choice depends on the shape only, which keeps the
/// workspace size a pure function of the shape.
inline constexpr std::int64_t forward_target_blocks = 1024;

/// Grid and workspace regions of one forward.
struct forward_plan {
  std::int64_t row_tiles = 0, vocab_tiles = 0, tiles_per_split = 0, splits = 0;
  std::size_t scalars = 0, partial = 0, target_logit = 0, ce = 0, token_z_loss = 0, argmax = 0;
  std::size_t bytes = 0;
};

template <class Config>
forward_plan make_forward_plan(const problem& s, detail::workspace_layout& layout) noexcept {
  forward_plan p;
  p.row_tiles = (s.n + Config::block_m - 1) / Config::block_m;
  p.vocab_tiles = (s.v + Config::block_v - 1) / Config::block_v;
  const std::int64_t wanted =
      (forward_target_blocks + p.row_tiles - 1) / std::max<std::int64_t>(p.row_tiles, 1);
  const std::int64_t splits = std::clamp<std::int64_t>(wanted, 1, p.vocab_tiles);
  p.tiles_per_split = (p.vocab_tiles + splits - 1) / splits;
  p.splits = (p.vocab_tiles + p.tiles_per_split - 1) / p.tiles_per_split;
  const auto n = static_cast<std::size_t>(s.n);
  p.scalars = layout.reserve<kernel::loss_scalars>(1);
  p.partial = layout.reserve<thread::row_stats>(static_cast<std::size_t>(p.splits) * n);
  p.target_logit = layout.reserve<float>(n);
  p.ce = layout.reserve<float>(n);
  p.token_z_loss = layout.reserve<float>(n);
  p.argmax = layout.reserve<std::int64_t>(n);
  p.bytes = layout.bytes();
  return p;
}

inline thread::target_view make_target_view(const std::int64_t* targets,
                                            const loss_options& o) noexcept {
  return {targets, o.shift_seq_len, o.ignore_index};
}

inline thread::logit_transform make_transform(const loss_options& o) noexcept {
  return {1.0f / o.temperature, o.softcap};
}

/// Per-row outputs: the caller's buffers, the workspace's where the reduction needs them.
template <class Element>
kernel::row_outputs make_row_outputs(void* ws, const forward_plan& plan,
                                     const forward_args<Element>& a) noexcept {
  return {a.lse,
          a.token_loss,
          a.token_z_loss ? a.token_z_loss : detail::at<float>(ws, plan.token_z_loss),
          a.argmax ? a.argmax : detail::at<std::int64_t>(ws, plan.argmax),
          a.entropy,
          a.target_logprob,
          detail::at<float>(ws, plan.ce)};
}

inline kernel::row_loss_params make_row_loss_params(const std::int64_t* targets, const problem& s,
                                                    const loss_options& o,
                                                    const float* class_weight,
                                                    const kernel::loss_scalars* scalars) noexcept {
  return {make_target_view(targets, o), s.v, class_weight, o.label_smoothing, o.z_loss, scalars};
}

/// Enqueues the scalars of a loss (valid rows, weight sums, gradient normalizer); counts the
/// invalid targets into `status` when it is not null.
inline cudaError_t run_loss_scalars(const std::int64_t* targets, const float* class_weight,
                                    const float* grad, const problem& s, const loss_options& o,
                                    kernel::loss_scalars* out, device_status* status,
                                    cudaStream_t stream) noexcept {
  constexpr int threads = 512;
  const kernel::loss_scalars_params p{make_target_view(targets, o), s.n, s.v, class_weight, grad,
                                      o.reduction, out, status};
  kernel::loss_scalars_kernel<threads><<<1, threads, 0, stream>>>(p);
  LCE_CHECK_LAUNCH("loss_scalars_kernel");
  return cudaSuccess;
}

/// Enqueues the deterministic reduction: loss, z_loss (mean/sum only) and correct.
inline cudaError_t run_reduce_loss(const kernel::row_outputs& rows, const std::int64_t* targets,
                                   const problem& s, const loss_options& o,
                                   const kernel::loss_scalars* scalars, float* loss,
                                   float* z_loss, std::int64_t* correct,
                                   cudaStream_t stream) noexcept {
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

/// Enqueues the forward. Arguments are already validated.
template <class Element, class Config>
cudaError_t run_forward(void* d_workspace, const forward_plan& plan,
                        const forward_args<Element>& a, const problem& s,
                        const loss_options& o, cudaStream_t stream) noexcept {
  using fused = kernel::fused_forward<Element, Config>;
  auto* scalars = detail::at<kernel::loss_scalars>(d_workspace, plan.scalars);
  LCE_RETURN_IF_ERROR(
      run_loss_scalars(a.targets, a.class_weight, nullptr, s, o, scalars, a.status, stream));

  auto aligned = [](const Element* p, std::int64_t ld) {
    return reinterpret_cast<std::uintptr_t>(p) % 16 == 0 && (ld * sizeof(Element)) % 16 == 0;
  };
  typename fused::params fp{};
  fp.op = {a.x, a.w, s.x_stride(), s.w_stride(), s.n, s.v, s.d, aligned(a.x, s.x_stride()),
           aligned(a.w, s.w_stride())};
  fp.bias = a.bias;
  fp.class_weight = a.class_weight;
  fp.transform = make_transform(o);
  fp.targets = make_target_view(a.targets, o);
  fp.partial = detail::at<thread::row_stats>(d_workspace, plan.partial);
  fp.target_logit = detail::at<float>(d_workspace, plan.target_logit);
  fp.tiles_per_split = plan.tiles_per_split;
  const dim3 grid(static_cast<unsigned>(plan.row_tiles), static_cast<unsigned>(plan.splits));
  constexpr int smem_bytes = static_cast<int>(sizeof(typename fused::shared_storage));
  if constexpr (smem_bytes > 48 * 1024) {
    LCE_RETURN_IF_ERROR(cudaFuncSetAttribute(kernel::fused_forward_kernel<Element, Config>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             smem_bytes));
  }
  kernel::fused_forward_kernel<Element, Config><<<grid, Config::threads, smem_bytes, stream>>>(fp);
  LCE_CHECK_LAUNCH("fused_forward_kernel");

  constexpr int combine_threads = 256;
  const kernel::combine_params cp{fp.partial, fp.target_logit, s.n, plan.splits,
                                  make_row_loss_params(a.targets, s, o, a.class_weight, scalars),
                                  make_row_outputs(d_workspace, plan, a)};
  const auto combine_blocks = static_cast<unsigned>((s.n + combine_threads - 1) / combine_threads);
  kernel::combine_rows_kernel<combine_threads><<<combine_blocks, combine_threads, 0, stream>>>(cp);
  LCE_CHECK_LAUNCH("combine_rows_kernel");

  return run_reduce_loss(cp.out, a.targets, s, o, scalars, a.loss, a.z_loss, a.correct, stream);
}

}  // namespace device
LCE_NAMESPACE_END
