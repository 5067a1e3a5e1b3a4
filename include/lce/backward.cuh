/// @file backward.cuh
/// @brief lce::backward — dX, dW, db of the linear cross-entropy from the forward's lse, by
/// chunked recomputation of the logits; never an n×v buffer.
#pragma once

#include <cublas_v2.h>

#include <cstddef>
#include <type_traits>

#include "args.hpp"
#include "config.hpp"
#include "detail/validate.hpp"
#include "detail/workspace.hpp"
#include "device/chunked_backward.cuh"
#include "device/empty_batch.cuh"
#include "device/launch.cuh"
#include "options.hpp"
#include "status.hpp"

LCE_NAMESPACE_BEGIN

namespace detail {
/// Null checks; with n = 0 the per-row pointers (x, targets, lse) may be null.
template <class Element, class Grad>
cudaError_t validate_backward_args(const backward_args<Element, Grad>& a,
                                   const problem& s) noexcept {
  const bool rows = s.n > 0;
  if (a.x == nullptr && rows) return invalid("args.x must not be null");
  if (a.w == nullptr) return invalid("args.w must not be null");
  if (a.targets == nullptr && rows) return invalid("args.targets must not be null");
  if (a.lse == nullptr && rows)
    return invalid("args.lse must not be null (pass the forward's lse)");
  return cudaSuccess;
}

/// The gradient outputs (shared with forward_backward).
template <class Element, class Grad>
void gradient_buffers(const Element* dx, const Grad* dw, const Grad* db, const problem& s,
                      buffer_list& out) noexcept {
  out.add(matrix_buffer("args.dx", dx, s.n, s.d, s.dx_stride()));
  out.add(matrix_buffer("args.dw", dw, s.v, s.d, s.dw_stride()));
  out.add(vector_buffer("args.db", db, s.v));
}

/// The buffers lce::backward reads and writes, for the alignment and overlap checks.
template <class Element, class Grad>
void backward_buffers(const backward_args<Element, Grad>& a, const problem& s,
                      const loss_options& o, buffer_list& in, buffer_list& out) noexcept {
  in.add(matrix_buffer("args.x", a.x, s.n, s.d, s.x_stride()));
  in.add(matrix_buffer("args.w", a.w, s.v, s.d, s.w_stride()));
  in.add(vector_buffer("args.bias", a.bias, s.v));
  in.add(vector_buffer("args.targets", a.targets, s.n));
  in.add(vector_buffer("args.lse", a.lse, s.n));
  in.add(vector_buffer("args.grad", a.grad, o.reduction == lce::reduction::none ? s.n : 1));
  in.add(vector_buffer("args.class_weight", a.class_weight, s.v));
  gradient_buffers(a.dx, a.dw, a.db, s, out);
  out.add(vector_buffer("args.status", a.status, 1));
}

template <class Element, class Grad>
constexpr void check_backward_types() noexcept {
  static_assert(is_supported_element_v<Element>, "Element must be float, __half or __nv_bfloat16");
  static_assert(std::is_same_v<Grad, Element> || std::is_same_v<Grad, float>,
                "Grad (type of dW and db) must be Element or float");
}
}  // namespace detail

/// @brief Workspace bytes lce::backward needs: a pure function of the shape and options.
/// Within `bopt.memory_budget` unless one minimal chunk alone exceeds it, or the fp32 dX
/// accumulator of vocab_chunked would leave the chunk narrower than it (see backward_choice).
template <class Element, class Grad = Element>
[[nodiscard]] std::size_t backward_workspace_size(const problem& shape,
                                                  const backward_options& bopt = {}) noexcept {
  detail::check_backward_types<Element, Grad>();
  detail::workspace_layout layout;
  return device::make_backward_plan<Element, Grad>(shape, bopt, layout).bytes;
}

/// @brief What the backward will do for a shape and options: the strategy `automatic`
/// resolves to, the chunk extent (vocabulary rows for vocab_chunked, token rows for
/// row_chunked, 0 for stored), the workspace, and the kernel that recomputes the chunks.
struct backward_choice {
  backward_strategy strategy;
  std::int64_t chunk;           ///< planned extent; the sm_90a fused recompute takes twice as many
  std::size_t workspace_bytes;  ///< everything the backward asks for, accumulators included
  /// The part of workspace_bytes that is an fp32 accumulator (vocab_chunked with 16-bit inputs:
  /// dX, n·d·4 bytes). It counts against memory_budget, except where it would narrow the
  /// vocabulary chunk below min(2048, max(d, what the whole budget holds)) columns: then it takes
  /// an allowance beyond the budget (workspace_bytes > memory_budget says so).
  std::size_t accumulator_bytes;
  /// Whether the chunks are recomputed by the sm_90a kernel that fuses Z and dZ (16-bit dZ, twice
  /// the planned extent per chunk) rather than by a cuBLAS GEMM into the fp32 chunk and lce's dZ
  /// kernel; `reason` says why (static text). The device's part is queried (and cached), as by
  /// choose_forward.
  bool fused_recompute = false;
  const char* reason = "";
};

namespace detail {
/// The predicate of the sm_90a fused recompute (kernel/logit_grad_sm90.cuh) for a shape on the
/// current device: sets c.fused_recompute and c.reason.
template <class Element, class Config>
void choose_recompute(backward_choice& c, const problem& shape, bool bias_or_weights) noexcept {
  using sm90 = typename sm90_config_of<Config>::type;
  using general = typename sm90_general_config_of<Config>::type;
  c.fused_recompute = false;
  if constexpr (sizeof(Element) != 2) {
    c.reason = "fp32 elements: a cuBLAS GEMM recomputes each chunk (the fused kernel takes 16-bit)";
  } else if constexpr (std::is_void_v<sm90>) {
    c.reason = "the Config has no sm_90a tile configuration: a cuBLAS GEMM recomputes each chunk";
  } else {
    switch (device::sm90_can_run<Element, kernel::logit_grad_sm90_kernel<Element, sm90, false>,
                                 kernel::logit_grad_sm90_kernel<Element, general, true>>(
        shape, bias_or_weights)) {
      case device::sm90_verdict::row_stride:
        c.reason = "a row stride of X or W is not a multiple of 16 bytes: a cuBLAS GEMM recomputes";
        break;
      case device::sm90_verdict::device:
        c.reason =
            "the current device is not of compute capability 9.0, or this binary has no sm_90a "
            "code: a cuBLAS GEMM recomputes each chunk";
        break;
      case device::sm90_verdict::runs:
        c.fused_recompute = true;
        c.reason =
            "the sm_90a kernel recomputes each chunk and forms its dZ (X and W 16-byte "
            "aligned at the launch)";
        break;
    }
  }
}
}  // namespace detail

/// @brief What lce::backward<Element, Grad, Config> will do for a shape and options: the
/// strategy, chunk and workspace (a pure function of the arguments), and which kernel
/// recomputes the chunks on the current device (`bias_or_weights`: a bias or class weights
/// will be passed). Launches nothing.
template <class Element, class Grad = Element, class Config = default_config<Element>>
[[nodiscard]] backward_choice choose_backward(const problem& shape,
                                              const backward_options& bopt = {},
                                              bool bias_or_weights = false) noexcept {
  detail::check_backward_types<Element, Grad>();
  detail::workspace_layout layout;
  const device::backward_plan plan = device::make_backward_plan<Element, Grad>(shape, bopt, layout);
  backward_choice c{plan.strategy, plan.chunk, plan.bytes, plan.accumulator_bytes};
  detail::choose_recompute<Element, Config>(c, shape, bias_or_weights);
  return c;
}

/// @brief Gradients of the linear cross-entropy: dX = dZ·W, dW = dZᵀ·X, db = Σ_i dZ_i with
/// dZ = g·(softmax(Z) − onehot(y)), recomputing Z chunk by chunk from the saved lse.
///
/// @tparam Element  float, __half or __nv_bfloat16 (x, w, bias, dx)
/// @tparam Grad     Element or float (dw, db); float is required by row_chunked
/// @tparam Config   tile configuration (config.hpp) of the sm_90a recompute; use the forward's
///                  that built the lse (its tiles fix the accumulation order the recompute
///                  repeats)
/// @param[in]     d_workspace      device workspace (256-byte aligned) or null: size query,
///                                 launches nothing
/// @param[in,out] workspace_bytes  in: available; out (size query): needed
/// @param[in]     args             device pointers; dx, dw, db each optional
/// @param[in]     shape            n, d, v and leading dimensions
/// @param[in]     options          the forward's loss_options (the same values)
/// @param[in]     bopt             strategy and memory budget (docs/algorithm.md, "Strategies")
/// @param[in]     handle           cuBLAS handle for the GEMMs; its stream and pointer mode are
///                                 set for the call and restored before returning
/// @param[in]     stream           every launch and GEMM is enqueued on it, in order
/// @return cudaSuccess, cudaErrorInvalidValue naming a bad argument, or a launch/cuBLAS error.
///
/// Never allocates, synchronizes or reads back to the host (capturable, provided the cuBLAS
/// handle is). Overwrites dx, dw and db (adds into them with options.accumulate). Deterministic
/// for a given strategy and chunk size. A target outside [0, v) that is not ignore_index is
/// treated as ignored (zero gradient, not in n_valid) and counted into `args.status` when given.
/// n = 0 launches no kernel: dW and db are zeroed by memsets (untouched with accumulate).
/// Pointers must be aligned to their element size; outputs must not overlap inputs, each other
/// or the workspace (checked). docs/robustness.md has the whole contract.
/// Accumulation is fp32 throughout; dX accumulates in fp32 (workspace) across vocabulary
/// chunks. vocab_chunked: workspace ≈ n·Vc·4 + (16-bit elements: n·d·4) bytes. row_chunked:
/// workspace ≈ Nc·v·4 bytes, dW/db accumulated in fp32 (dW is read and rewritten once per row
/// chunk, so small chunks cost bandwidth). Either: 3 GEMMs (Z, dX, dW) and a GEMV for db.
/// The upstream gradient `grad` is [1] (mean/sum) or [n] (none); null means 1. Ignored rows
/// get zero gradient; with mean, the cross-entropy part is divided by Σ_valid w_{y_i} (the
/// number of valid rows without class weights) and the z-loss part by n_valid (0 if none).
template <class Element, class Grad, class Config = default_config<Element>>
[[nodiscard]] cudaError_t backward(void* d_workspace, std::size_t& workspace_bytes,
                                   const backward_args<Element, Grad>& args, const problem& shape,
                                   const loss_options& options, const backward_options& bopt,
                                   cublasHandle_t handle, cudaStream_t stream = nullptr) noexcept {
  detail::check_backward_types<Element, Grad>();
  detail::clear_error();
  LCE_RETURN_IF_ERROR(detail::validate_problem(shape));
  LCE_RETURN_IF_ERROR(detail::validate_options(options, shape));
  LCE_RETURN_IF_ERROR(detail::validate_backward_options(bopt, std::is_same_v<Grad, float>));
  LCE_RETURN_IF_ERROR(detail::validate_backward_args(args, shape));
  detail::buffer_list inputs, outputs;
  detail::backward_buffers(args, shape, options, inputs, outputs);
  LCE_RETURN_IF_ERROR(detail::validate_buffers(inputs, outputs));
  if (handle == nullptr) return detail::invalid("handle (cuBLAS) must not be null");
  detail::workspace_layout layout;
  const device::backward_plan plan = device::make_backward_plan<Element, Grad>(shape, bopt, layout);
  LCE_RETURN_IF_ERROR(
      detail::two_phase_workspace(d_workspace, workspace_bytes, plan.bytes, inputs, outputs));
  if (d_workspace == nullptr) return cudaSuccess;  // the size query
  if (shape.n == 0) return device::run_empty_backward(args, shape, options, stream);
  if (args.dx == nullptr && args.dw == nullptr && args.db == nullptr) return cudaSuccess;
  LCE_RETURN_IF_ERROR(device::check_current_device());
  detail::cublas_scope scope(handle, stream);
  if (scope.status() != CUBLAS_STATUS_SUCCESS)
    return detail::cublas_failure(scope.status(), "handle setup");
  return device::run_backward<Element, Grad, Config>(d_workspace, plan, args, shape, options,
                                                     handle, stream);
}

LCE_NAMESPACE_END
