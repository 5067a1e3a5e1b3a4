/// @file vocab_parallel.cuh
/// @brief lce::nccl — the linear cross-entropy with W sharded by vocabulary rows across the
/// ranks of an NCCL communicator (Megatron-LM's vocabulary-parallel cross-entropy), with the
/// exactness of the single-GPU launchers and no logits on any rank. docs/vocab_parallel.md.
///
/// Every rank holds the full X [n, d], the targets [n] (global ids), the class weights [v]
/// (global), the upstream gradient, and rows [v_begin, v_end) of W, of the bias, and of dW
/// and db. Per row, the ranks combine their partial (max, Σ exp) and the target logit with
/// O(n) bytes of all-reduce; per-row outputs and the reduced loss come out identical on every
/// rank. The backward writes this rank's dW/db rows and all-reduces (or reduce-scatters) dX.
///
/// Collective: every rank of `shard.comm` must make the same call, in the same order, with the
/// same shape, options and set of requested outputs (null or not); one call per rank (a
/// thread or a process per GPU). The calls issue kernels between collectives, so they must not
/// be made inside an ncclGroupStart/ncclGroupEnd of the caller.
#pragma once

#include <cublas_v2.h>
#include <nccl.h>

#include <cstddef>
#include <type_traits>

#include "../args.hpp"
#include "../backward.cuh"
#include "../config.hpp"
#include "../detail/validate.hpp"
#include "../forward.cuh"
#include "../forward_backward.cuh"
#include "../options.hpp"
#include "../status.hpp"
#include "device.cuh"
#include "shard.hpp"

LCE_NAMESPACE_BEGIN
namespace nccl {

namespace impl {
struct forward_backward_plan {
  forward_plan forward;
  std::size_t lse = 0;
  std::size_t backward = 0;              ///< offset of the backward's workspace
  backward_plan backward_plan;           ///< the chunked plan; with `stored`, its fallback
  bool stored = false;                   ///< the stored strategy: asked for, or automatic's choice
  std::size_t stored_dx = 0;             ///< the stored backward's fp32 [n, d] partial dX
  lce::device::stored_plan stored_plan;  ///< the shard's stored values, after stored_dx
  std::size_t bytes = 0;
};

/// As lce::forward_backward's plan, on the shard: `stored` (its values of all n rows, no row
/// chunks) where asked for, or where automatic finds them and the partial dX within the budget.
template <class Element, class Grad, class Config>
forward_backward_plan make_forward_backward_plan(const problem& local, const backward_options& b,
                                                 bool bias_or_weights = false) noexcept {
  forward_backward_plan p;
  detail::workspace_layout layout;
  p.forward = make_forward_plan<Config>(local, layout);
  p.lse = layout.reserve<float>(static_cast<std::size_t>(local.n));
  p.backward = layout.reserve<char>(0);
  detail::workspace_layout stored_layout;
  const std::size_t stored_dx =
      stored_layout.reserve<float>(static_cast<std::size_t>(local.n * local.d));
  const lce::device::stored_plan stored = lce::device::make_stored_plan<Element>(
      local, local.n, 0, lce::device::stored_tile_cols<Config>(), stored_layout);
  const std::size_t stored_bytes = stored_layout.bytes();
  p.stored =
      !bias_or_weights && (b.strategy == backward_strategy::stored ||
                           (b.strategy == backward_strategy::automatic &&
                            detail::can_store<Element, Config> && stored_bytes <= b.memory_budget));
  if (p.stored) {
    p.stored_dx = stored_dx;
    p.stored_plan = stored;
  }
  // The chunked plan: the call's, or with stored its fallback, within the stored space.
  detail::workspace_layout backward_layout;
  p.backward_plan = make_backward_plan<Element, Grad>(
      local, p.stored ? lce::device::stored_fallback_options(b, stored_bytes) : b, backward_layout);
  p.bytes = p.backward +
            (p.stored ? std::max(p.backward_plan.bytes, stored_bytes) : p.backward_plan.bytes);
  return p;
}

/// The checks every launcher runs first, in the documented order (after its own args).
inline cudaError_t validate_common(const problem& shape, const vocab_shard& shard,
                                   const loss_options& options) noexcept {
  LCE_RETURN_IF_ERROR(detail::validate_problem(shape));
  LCE_RETURN_IF_ERROR(validate_shard(shard, shape));
  return detail::validate_options(options, shape);
}
}  // namespace impl

/// @brief Bytes per row that one rank contributes to the collectives of a call (a ring
/// all-reduce moves about 2·(k − 1)/k times this over each rank's links).
struct communication_volume {
  std::size_t forward_bytes_per_row;   ///< row max, Σ exp, target logit (12 B) + options
  std::size_t backward_bytes_per_row;  ///< the fp32 dX row: 4·d B
};

/// @brief Bytes per row of the forward's all-reductions for these outputs and options: 4 for
/// the row maximum, 4 for Σ exp and 4 for the target logit, plus 4 with `entropy` requested,
/// 4 with label smoothing (Σ w·z), 8 with `argmax` or `correct` (the int64 argmax candidate);
/// and 4·d per row of dX for the backward. A pure function.
template <class Element>
[[nodiscard]] communication_volume communication_bytes(const forward_args<Element>& args,
                                                       const problem& shape,
                                                       const loss_options& options) noexcept {
  return {impl::forward_bytes_per_row(args, options), impl::backward_bytes_per_row(shape)};
}

/// @brief Workspace bytes of lce::nccl::forward on this rank: the core forward's for the
/// shard (O(n·splits)) plus 28 B per row for the combine; a pure function of the shape and the
/// shard's size.
template <class Element, class Config = default_config<Element>>
[[nodiscard]] std::size_t forward_workspace_size(const problem& shape,
                                                 const vocab_shard& shard) noexcept {
  detail::workspace_layout layout;
  return impl::make_forward_plan<Config>(impl::local_problem(shape, shard), layout).bytes;
}

/// @brief Vocabulary-parallel forward: the loss and every output of forward_args, as
/// lce::forward computes them for the full W, on every rank.
///
/// @tparam Element  float, __half or __nv_bfloat16
/// @tparam Config   tile configuration of the fused kernel (default_config<Element>)
/// @param[in]     d_workspace      device workspace (256-byte aligned), or null for a size
///                                 query that only sets `workspace_bytes` and launches nothing
/// @param[in,out] workspace_bytes  in: bytes available; out (size query): bytes needed
/// @param[in]     args             x [n, ldx], targets [n] and class_weight [v] global; w
///                                 [v_end − v_begin, ldw] and bias [v_end − v_begin] the
///                                 shard's; the outputs are written on every rank
/// @param[in]     shape            n, d, the global vocabulary size v, leading dimensions
/// @param[in]     shard            communicator and this rank's rows [v_begin, v_end)
/// @param[in]     options          the loss options, with their global meaning
/// @param[in]     stream           every launch and collective is enqueued on it, in order
/// @return cudaSuccess; cudaErrorInvalidValue for a bad argument (lce::last_error_message()
///         names it); the error of a failed launch; cudaErrorUnknown for a failed NCCL call.
///
/// Per rank: the fused kernel over the shard (1/k of the GEMM), the merge of its vocabulary
/// splits, ncclAllReduce(max) of the row maxima (n floats), the local sums rescaled to the
/// global maximum, one grouped ncclAllReduce(sum) of [Σ exp, target logit (0 where this rank
/// does not own the target), Σ p·z (entropy only), Σ w·z (label smoothing only)] and, for
/// argmax/correct only, ncclAllReduce(min) of int64 candidates; then the core's finish_row with
/// the global V and the reduction. communication_bytes() gives the volume (12 B per row
/// without options). Never allocates, synchronizes or reads back to the host (capturable, as
/// NCCL collectives are). Deterministic for a fixed number of ranks and NCCL algorithm.
template <class Element, class Config = default_config<Element>>
[[nodiscard]] cudaError_t forward(void* d_workspace, std::size_t& workspace_bytes,
                                  const forward_args<Element>& args, const problem& shape,
                                  const vocab_shard& shard, const loss_options& options,
                                  cudaStream_t stream = nullptr) noexcept {
  static_assert(is_supported_element_v<Element>, "Element must be float, __half or __nv_bfloat16");
  detail::clear_error();
  LCE_RETURN_IF_ERROR(impl::validate_common(shape, shard, options));
  LCE_RETURN_IF_ERROR(detail::validate_forward_args(args, shape, options));
  impl::comm_info comm;
  LCE_RETURN_IF_ERROR(impl::validate_comm(shard, shape, false, comm));
  detail::workspace_layout layout;
  const impl::forward_plan plan =
      impl::make_forward_plan<Config>(impl::local_problem(shape, shard), layout);
  LCE_RETURN_IF_ERROR(detail::two_phase_workspace(d_workspace, workspace_bytes, plan.bytes));
  if (d_workspace == nullptr) return cudaSuccess;  // the size query
  LCE_RETURN_IF_ERROR(lce::device::check_current_device());
  return impl::run_forward<Element, Config>(d_workspace, plan, args, shape, shard, options, stream);
}

/// @brief Workspace bytes of lce::nccl::backward on this rank: the core backward's for the
/// shard within `bopt.memory_budget`, with an fp32 [n, d] partial dX always (the collective
/// reduces it; the core's own accumulator serves when it has one).
template <class Element, class Grad = Element>
[[nodiscard]] std::size_t backward_workspace_size(const problem& shape, const vocab_shard& shard,
                                                  const backward_options& bopt = {}) noexcept {
  detail::check_backward_types<Element, Grad>();
  detail::workspace_layout layout;
  return impl::make_backward_plan<Element, Grad>(impl::local_problem(shape, shard), bopt, layout)
      .bytes;
}

/// @brief Vocabulary-parallel backward: this rank's dW and db rows, and dX reduced over the
/// ranks, from the forward's (global) lse.
///
/// @param[in] args   x, targets, lse [n], grad, class_weight global (the same on every rank);
///                   w, bias the shard's; dw [v_end − v_begin, lddw] and db the shard's rows;
///                   dx [n, lddx] (all_reduce) or [n/k, lddx], rows [rank·n/k, (rank+1)·n/k)
///                   (reduce_scatter); each gradient optional (dx null: no collective)
/// @param[in] shard  communicator, rows, and `dx`, the reduction of dX
/// @param[in] bopt   strategy and memory budget of the shard's chunked backward
/// Other parameters and the return value: lce::backward.
///
/// The core's chunked backward over the shard: dZ of each recomputed chunk from the global lse,
/// n_valid, class weights and V, so every option keeps its global meaning; dW and db rows are
/// written once (vocab_chunked) or accumulated in fp32 (row_chunked, Grad = float). The
/// partial dX accumulates in fp32 (workspace), is reduced in fp32 with ncclAllReduce or
/// ncclReduceScatter (4·n·d bytes per rank), and rounded once into the caller's dX (added to
/// it after the reduction with options.accumulate). Never allocates, synchronizes or reads
/// back to the host.
template <class Element, class Grad, class Config = default_config<Element>>
[[nodiscard]] cudaError_t backward(void* d_workspace, std::size_t& workspace_bytes,
                                   const backward_args<Element, Grad>& args, const problem& shape,
                                   const vocab_shard& shard, const loss_options& options,
                                   const backward_options& bopt, cublasHandle_t handle,
                                   cudaStream_t stream = nullptr) noexcept {
  detail::check_backward_types<Element, Grad>();
  detail::clear_error();
  LCE_RETURN_IF_ERROR(impl::validate_common(shape, shard, options));
  LCE_RETURN_IF_ERROR(detail::validate_backward_options(bopt, std::is_same_v<Grad, float>));
  LCE_RETURN_IF_ERROR(detail::validate_backward_args(args, shape));
  if (handle == nullptr) return detail::invalid("handle (cuBLAS) must not be null");
  impl::comm_info comm;
  LCE_RETURN_IF_ERROR(impl::validate_comm(
      shard, shape, args.dx != nullptr && shard.dx == dx_reduction::reduce_scatter, comm));
  detail::workspace_layout layout;
  const impl::backward_plan plan =
      impl::make_backward_plan<Element, Grad>(impl::local_problem(shape, shard), bopt, layout);
  LCE_RETURN_IF_ERROR(detail::two_phase_workspace(d_workspace, workspace_bytes, plan.bytes));
  if (d_workspace == nullptr) return cudaSuccess;  // the size query
  if (args.dx == nullptr && args.dw == nullptr && args.db == nullptr) return cudaSuccess;
  LCE_RETURN_IF_ERROR(lce::device::check_current_device());
  detail::cublas_scope scope(handle, stream);
  if (scope.status() != CUBLAS_STATUS_SUCCESS)
    return detail::cublas_failure(scope.status(), "handle setup");
  return impl::run_backward<Element, Grad, Config>(d_workspace, plan, args, shape, shard, comm,
                                                   options, handle, stream);
}

/// @brief Workspace bytes of lce::nccl::forward_backward: the forward's, n floats for the lse,
/// and the backward's.
template <class Element, class Grad = Element, class Config = default_config<Element>>
[[nodiscard]] std::size_t forward_backward_workspace_size(const problem& shape,
                                                          const vocab_shard& shard,
                                                          const backward_options& bopt = {},
                                                          bool bias_or_weights = false) noexcept {
  detail::check_backward_types<Element, Grad>();
  return impl::make_forward_backward_plan<Element, Grad, Config>(impl::local_problem(shape, shard),
                                                                 bopt, bias_or_weights)
      .bytes;
}

/// @brief lce::nccl::forward, then lce::nccl::backward with upstream gradient 1 (of the mean or
/// sum; for reduction none, of the sum of the token losses): 4 GEMMs of work over the shard
/// with the chunked strategies; with `stored` (asked for, or automatic's choice where the
/// shard's values of all n rows and an fp32 [n, d] partial dX fit the budget; 16-bit
/// elements, no bias or class weights, an sm_90a device — else the chunked plan runs) the
/// shard's forward keeps e^{z − m} of its columns and the backward is one pass and GEMMs over
/// them: 3 GEMMs, as lce::forward_backward's. Arguments as those two (forward_backward_args: the
/// forward's pointers and dx, dw, db); `lse` is optional (kept in the workspace when null). With
/// dx, dw and db all null it runs the forward only.
template <class Element, class Grad, class Config = default_config<Element>>
[[nodiscard]] cudaError_t forward_backward(void* d_workspace, std::size_t& workspace_bytes,
                                           const forward_backward_args<Element, Grad>& args,
                                           const problem& shape, const vocab_shard& shard,
                                           const loss_options& options,
                                           const backward_options& bopt, cublasHandle_t handle,
                                           cudaStream_t stream = nullptr) noexcept {
  detail::check_backward_types<Element, Grad>();
  detail::clear_error();
  const forward_args<Element> fa = detail::forward_part(args);
  LCE_RETURN_IF_ERROR(impl::validate_common(shape, shard, options));
  LCE_RETURN_IF_ERROR(detail::validate_backward_options(bopt, std::is_same_v<Grad, float>,
                                                        /*with_forward=*/true));
  LCE_RETURN_IF_ERROR(detail::validate_forward_args(fa, shape, options));
  if (handle == nullptr) return detail::invalid("handle (cuBLAS) must not be null");
  impl::comm_info comm;
  LCE_RETURN_IF_ERROR(impl::validate_comm(
      shard, shape, args.dx != nullptr && shard.dx == dx_reduction::reduce_scatter, comm));
  const auto plan = detail::plan_for_call(
      [&](bool bias_or_weights) {
        return impl::make_forward_backward_plan<Element, Grad, Config>(
            impl::local_problem(shape, shard), bopt, bias_or_weights);
      },
      args.bias != nullptr || args.class_weight != nullptr, d_workspace, workspace_bytes);
  LCE_RETURN_IF_ERROR(detail::two_phase_workspace(d_workspace, workspace_bytes, plan.bytes));
  if (d_workspace == nullptr) return cudaSuccess;  // the size query
  LCE_RETURN_IF_ERROR(lce::device::check_current_device());

  float* lse = args.lse ? args.lse : detail::at<float>(d_workspace, plan.lse);
  forward_args<Element> fwd = fa;
  fwd.lse = lse;
  const bool gradients = args.dx != nullptr || args.dw != nullptr || args.db != nullptr;
  void* backward_ws = detail::at<char>(d_workspace, plan.backward);
  // The stored strategy: the shard's forward keeps e^{z − m} of its columns (where its lean
  // sm_90a kernel runs; elsewhere the fallback plan's backward follows).
  const std::int64_t v_local = shard.rows();
  const detail::stored_exp<Element> st =
      lce::device::stored_values<Element>(backward_ws, plan.stored_plan);
  const bool store = gradients && plan.stored;
  bool stored = false;
  LCE_RETURN_IF_ERROR(
      (impl::run_forward<Element, Config>(d_workspace, plan.forward, fwd, shape, shard, options,
                                          stream, store ? &st : nullptr, &stored)));
  if (!gradients) return cudaSuccess;
  const backward_args<Element, Grad> ba = detail::backward_part(args, lse, nullptr);
  detail::cublas_scope scope(handle, stream);
  if (scope.status() != CUBLAS_STATUS_SUCCESS)
    return detail::cublas_failure(scope.status(), "handle setup");
  if (stored) {
    float* dx_acc = detail::at<float>(backward_ws, plan.stored_dx);
    LCE_RETURN_IF_ERROR(lce::device::run_stored_backward(
        backward_ws, plan.stored_plan, st,
        detail::at<thread::loss_scalars>(d_workspace, plan.forward.local.scalars),
        detail::at<float>(d_workspace, plan.forward.local.target_logit), ba, shape,
        lce::device::vocab_window{shard.v_begin, v_local}, dx_acc, options, handle, stream));
    if (args.dx == nullptr) return cudaSuccess;
    return impl::run_reduce_dx(dx_acc, args.dx, shape, shard, comm, options, stream);
  }
  return impl::run_backward<Element, Grad, Config>(backward_ws, plan.backward_plan, ba, shape,
                                                   shard, comm, options, handle, stream);
}

}  // namespace nccl
LCE_NAMESPACE_END
