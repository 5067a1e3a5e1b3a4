/// @file device.cuh
/// @brief Device-wide layer of the vocabulary-parallel loss: workspace plans and the enqueued
/// sequences of kernels, GEMMs and NCCL collectives (docs/vocab_parallel.md). Internal layer of
/// lce/nccl/vocab_parallel.cuh.
#pragma once

#include <cublas_v2.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../args.hpp"
#include "../detail/cublas.cuh"
#include "../detail/workspace.hpp"
#include "../device/chunked_backward.cuh"
#include "../device/forward.cuh"
#include "../kernel/elementwise.cuh"
#include "../kernel/logit_grad.cuh"
#include "kernel.cuh"
#include "shard.hpp"

LCE_NAMESPACE_BEGIN
namespace nccl {
namespace impl {

inline constexpr int row_threads = 256;

inline unsigned row_blocks(std::int64_t n) noexcept {
  return static_cast<unsigned>((n + row_threads - 1) / row_threads);
}

// ---------------------------------------------------------------------------------------------
// Forward.

/// The core forward's regions for the shard, plus the buffers of the cross-rank combine.
struct forward_plan {
  lce::device::forward_plan local;
  std::size_t row_max = 0;  ///< [n] float
  std::size_t packed = 0;   ///< [max_packed_fields, n] float
  std::size_t argmax = 0;   ///< [n] int64 candidates
  std::size_t bytes = 0;
};

template <class Config>
forward_plan make_forward_plan(const problem& local, detail::workspace_layout& layout) noexcept {
  forward_plan p;
  const auto n = static_cast<std::size_t>(local.n);
  p.local = lce::device::make_forward_plan<Config>(local, layout);
  p.row_max = layout.reserve<float>(n);
  p.packed = layout.reserve<float>(max_packed_fields * n);
  p.argmax = layout.reserve<std::int64_t>(n);
  p.bytes = layout.bytes();
  return p;
}

/// What the forward's all-reductions carry for these outputs and options.
template <class Element>
packed_fields forward_fields(const forward_args<Element>& a, const loss_options& o) noexcept {
  return make_packed_fields(a.entropy != nullptr, o.label_smoothing != 0.0f);
}

template <class Element>
bool forward_needs_argmax(const forward_args<Element>& a) noexcept {
  return a.argmax != nullptr || a.correct != nullptr;
}

/// Bytes per row this rank contributes to the forward's all-reductions: the row maximum, the
/// packed fields, and the int64 argmax candidate when argmax or correct is requested.
template <class Element>
std::size_t forward_bytes_per_row(const forward_args<Element>& a, const loss_options& o) noexcept {
  return sizeof(float) * (1 + static_cast<std::size_t>(forward_fields(a, o).count)) +
         (forward_needs_argmax(a) ? sizeof(std::int64_t) : 0);
}

/// Enqueues the vocabulary-parallel forward. Validated arguments; `a.w`, `a.bias` are the
/// shard's, `a.targets` and `a.class_weight` global.
/// With `store` (the stored strategy), the shard's lean sm_90a kernel also writes it where it
/// runs; `*stored` says whether it did (see lce::device::run_fused_forward).
template <class Element, class Config>
cudaError_t run_forward(void* ws, const forward_plan& plan, const forward_args<Element>& a,
                        const problem& global, const vocab_shard& shard, const loss_options& o,
                        cudaStream_t stream, const detail::stored_exp<Element>* store = nullptr,
                        bool* stored = nullptr) noexcept {
  const problem local = local_problem(global, shard);
  const std::int64_t n = global.n;
  auto* scalars = detail::at<lce::thread::loss_scalars>(ws, plan.local.scalars);
  // Valid rows and weight sums over the global vocabulary: the same on every rank.
  LCE_RETURN_IF_ERROR(lce::device::run_loss_scalars(a.targets, a.class_weight, nullptr, global, o,
                                                    scalars, a.status, stream));

  // The fused kernel on the shard: its columns are shard-local (bias, class weights), its
  // targets shard-local through the view's offset.
  forward_args<Element> la = a;
  la.class_weight = a.class_weight != nullptr ? a.class_weight + shard.v_begin : nullptr;
  std::int64_t splits = 0;
  LCE_RETURN_IF_ERROR((lce::device::run_fused_forward<Element, Config>(
      ws, plan.local, la, local, o, shard.v_begin, splits, stream, store, stored)));

  auto* partial = detail::at<thread::row_stats>(ws, plan.local.partial);
  auto* row_max = detail::at<float>(ws, plan.row_max);
  auto* packed = detail::at<float>(ws, plan.packed);
  auto* argmax = detail::at<std::int64_t>(ws, plan.argmax);
  const bool with_argmax = forward_needs_argmax(a);
  const packed_fields fields = forward_fields(a, o);

  shard_combine_kernel<row_threads><<<row_blocks(n), row_threads, 0, stream>>>(
      shard_combine_params{partial, n, splits, row_max});
  LCE_CHECK_LAUNCH("shard_combine_kernel");
  const auto rows = static_cast<std::size_t>(n);
  LCE_NCCL_RETURN_IF_ERROR(
      ncclAllReduce(row_max, row_max, rows, ncclFloat32, ncclMax, shard.comm, stream),
      "ncclAllReduce (row maximum)", shard.comm);

  const thread::target_view targets = lce::device::make_target_view(a.targets, o);
  shard_pack_kernel<row_threads><<<row_blocks(n), row_threads, 0, stream>>>(shard_pack_params{
      partial, row_max, detail::at<float>(ws, plan.local.target_logit), targets, shard.v_begin,
      shard.v_end, n, fields, packed, with_argmax ? argmax : nullptr});
  LCE_CHECK_LAUNCH("shard_pack_kernel");
  // One launch for both reductions; ncclGroupEnd is reached whatever happens in between.
  LCE_NCCL_RETURN_IF_ERROR(ncclGroupStart(), "ncclGroupStart", shard.comm);
  ncclResult_t r = ncclAllReduce(packed, packed, rows * static_cast<std::size_t>(fields.count),
                                 ncclFloat32, ncclSum, shard.comm, stream);
  if (nccl_ok(r) && with_argmax)
    r = ncclAllReduce(argmax, argmax, rows, ncclInt64, ncclMin, shard.comm, stream);
  const ncclResult_t end = ncclGroupEnd();
  if (!nccl_ok(r)) return nccl_failure(r, "ncclAllReduce (row sums)", shard.comm);
  if (!nccl_ok(end)) return nccl_failure(end, "ncclGroupEnd (row sums)", shard.comm);

  const lce::thread::row_outputs out = lce::device::make_row_outputs(ws, plan.local, a);
  shard_finish_kernel<row_threads><<<row_blocks(n), row_threads, 0, stream>>>(shard_finish_params{
      row_max, packed, with_argmax ? argmax : nullptr, fields, n,
      lce::device::make_row_loss_params(a.targets, global, o, a.class_weight, scalars), out});
  LCE_CHECK_LAUNCH("shard_finish_kernel");
  return lce::device::run_reduce_loss(out, a.targets, global, o, scalars, a.loss, a.z_loss,
                                      a.correct, stream);
}

// ---------------------------------------------------------------------------------------------
// Backward.

/// The core backward's plan for the shard (strategy resolved), plus the fp32 [n, d] partial dX
/// that the collective reduces: the core plan's accumulator when it has one (vocab_chunked,
/// 16-bit elements), otherwise a region of its own, inside the budget.
struct backward_plan {
  lce::device::backward_plan local;
  std::size_t dx = 0;
  std::size_t bytes = 0;
};

template <class Element, class Grad>
backward_plan make_backward_plan(const problem& local, const backward_options& b,
                                 detail::workspace_layout& layout) noexcept {
  detail::workspace_layout probe;
  backward_options resolved = b;
  resolved.strategy = lce::device::make_backward_plan<Element, Grad>(local, b, probe).strategy;
  const bool core_accumulator =
      !std::is_same_v<Element, float> && resolved.strategy == backward_strategy::vocab_chunked;
  backward_plan p;
  if (!core_accumulator) p.dx = layout.reserve<float>(static_cast<std::size_t>(local.n * local.d));
  p.local = lce::device::make_backward_plan<Element, Grad>(local, resolved, layout);
  if (core_accumulator) p.dx = p.local.dx;
  p.bytes = layout.bytes();
  return p;
}

/// Bytes per row this rank contributes to the backward's collective on dX (fp32 rows).
inline std::size_t backward_bytes_per_row(const problem& global) noexcept {
  return sizeof(float) * static_cast<std::size_t>(global.d);
}

/// dX = Σ over ranks of this rank's partial sums `dx_acc` (dense fp32 [n, d]), in fp32 and in
/// place, all-reduced or reduce-scattered; then rounded once into the caller's dX (added to it
/// with accumulate, after the reduction: the caller's dX is not summed over ranks).
template <class Element>
cudaError_t run_reduce_dx(float* dx_acc, Element* dx, const problem& global,
                          const vocab_shard& shard, const comm_info& comm, const loss_options& o,
                          cudaStream_t stream) noexcept {
  const std::int64_t n = global.n, d = global.d;
  const std::int64_t lddx = global.dx_stride();
  float* rows = dx_acc;
  std::int64_t row_count = n;
  if (shard.dx == dx_reduction::all_reduce) {
    LCE_NCCL_RETURN_IF_ERROR(ncclAllReduce(dx_acc, dx_acc, static_cast<std::size_t>(n * d),
                                           ncclFloat32, ncclSum, shard.comm, stream),
                             "ncclAllReduce (dX)", shard.comm);
  } else {
    row_count = n / comm.ranks;
    rows = dx_acc + static_cast<std::int64_t>(comm.rank) * row_count * d;  // in place
    LCE_NCCL_RETURN_IF_ERROR(
        ncclReduceScatter(dx_acc, rows, static_cast<std::size_t>(row_count * d), ncclFloat32,
                          ncclSum, shard.comm, stream),
        "ncclReduceScatter (dX)", shard.comm);
  }
  const auto blocks =
      static_cast<unsigned>(std::min<std::int64_t>((row_count * d + 255) / 256, 4096));
  lce::kernel::convert_rows_kernel<Element>
      <<<blocks, 256, 0, stream>>>(rows, row_count, d, dx, lddx, o.accumulate);
  LCE_CHECK_LAUNCH("convert_rows_kernel");
  return cudaSuccess;
}

/// Enqueues the vocabulary-parallel backward: the core's chunked driver over the shard (dZ
/// from the global lse and loss scalars; the sm_90a fused recompute where it applies), dW/db of
/// the shard, the partial dX in fp32, then its reduction (run_reduce_dx). The handle's scope
/// is set.
template <class Element, class Grad, class Config>
cudaError_t run_backward(void* ws, const backward_plan& plan, const backward_args<Element, Grad>& a,
                         const problem& global, const vocab_shard& shard, const comm_info& comm,
                         const loss_options& o, cublasHandle_t handle,
                         cudaStream_t stream) noexcept {
  float* dx_acc = detail::at<float>(ws, plan.dx);  // dense [n, d] fp32 partial dX
  LCE_RETURN_IF_ERROR((lce::device::run_chunked_backward<Element, Grad, Config>(
      ws, plan.local, a, global, lce::device::vocab_window{shard.v_begin, shard.rows()}, dx_acc, o,
      handle, stream)));
  if (a.dx == nullptr) return cudaSuccess;
  return run_reduce_dx(dx_acc, a.dx, global, shard, comm, o, stream);
}

}  // namespace impl
}  // namespace nccl
LCE_NAMESPACE_END
