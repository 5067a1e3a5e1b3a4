/// @file forward.cuh
/// @brief Device-wide forward: the fused tiled-matmul + online-lse kernel, the per-row combine
/// and the loss reduction, enqueued on one stream. Internal layer of lce::forward.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../args.hpp"
#include "../detail/workspace.hpp"
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
  std::size_t partial = 0, target_logit = 0, token_loss = 0;
  std::size_t bytes = 0;
};

template <class Config>
forward_plan make_forward_plan(const problem& s, detail::workspace_layout& layout) noexcept {
  forward_plan p;
  p.row_tiles = (s.n + Config::block_m - 1) / Config::block_m;
  p.vocab_tiles = (s.v + Config::block_v - 1) / Config::block_v;
  const std::int64_t wanted = (forward_target_blocks + p.row_tiles - 1) / p.row_tiles;
  const std::int64_t splits = std::clamp<std::int64_t>(wanted, 1, p.vocab_tiles);
  p.tiles_per_split = (p.vocab_tiles + splits - 1) / splits;
  p.splits = (p.vocab_tiles + p.tiles_per_split - 1) / p.tiles_per_split;
  p.partial = layout.reserve<thread::lse_state>(static_cast<std::size_t>(p.splits * s.n));
  p.target_logit = layout.reserve<float>(static_cast<std::size_t>(s.n));
  p.token_loss = layout.reserve<float>(static_cast<std::size_t>(s.n));
  p.bytes = layout.bytes();
  return p;
}

/// Enqueues the deterministic mean/sum of the token losses into `loss`.
inline cudaError_t run_reduce_loss(const float* token_loss, const std::int64_t* targets,
                                   const problem& s, const loss_options& o, float* loss,
                                   cudaStream_t stream) noexcept {
  constexpr int reduce_threads = 512;
  const kernel::reduce_params rp{token_loss, targets, s.n, o.ignore_index, o.reduction, loss};
  kernel::reduce_loss_kernel<reduce_threads><<<1, reduce_threads, 0, stream>>>(rp);
  LCE_CHECK_LAUNCH("reduce_loss_kernel");
  return cudaSuccess;
}

/// Enqueues the forward. Arguments are already validated; `lse` may be null.
template <class Element, class Config>
cudaError_t run_forward(void* d_workspace, const forward_plan& plan,
                        const forward_args<Element>& a, const problem& s,
                        const loss_options& o, cudaStream_t stream) noexcept {
  using fused = kernel::fused_forward<Element, Config>;
  auto aligned = [](const Element* p, std::int64_t ld) {
    return reinterpret_cast<std::uintptr_t>(p) % 16 == 0 && (ld * sizeof(Element)) % 16 == 0;
  };
  typename fused::params fp{};
  fp.op = {a.x, a.w, s.x_stride(), s.w_stride(), s.n, s.v, s.d, aligned(a.x, s.x_stride()),
           aligned(a.w, s.w_stride())};
  fp.bias = a.bias;
  fp.targets = a.targets;
  fp.partial = detail::at<thread::lse_state>(d_workspace, plan.partial);
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
  float* token_loss = a.token_loss ? a.token_loss : detail::at<float>(d_workspace, plan.token_loss);
  const kernel::combine_params cp{fp.partial, fp.target_logit, a.targets, s.n, s.v,
                                  plan.splits, o.ignore_index, a.lse, token_loss};
  const auto combine_blocks = static_cast<unsigned>((s.n + combine_threads - 1) / combine_threads);
  kernel::combine_rows_kernel<combine_threads><<<combine_blocks, combine_threads, 0, stream>>>(cp);
  LCE_CHECK_LAUNCH("combine_rows_kernel");

  if (o.reduction != lce::reduction::none && a.loss != nullptr)
    return run_reduce_loss(token_loss, a.targets, s, o, a.loss, stream);
  return cudaSuccess;
}

}  // namespace device
LCE_NAMESPACE_END
