/// @file forward_backward.cuh
/// @brief lce::forward_backward — loss and gradients in one call (upstream gradient 1), for
/// callers that need no separate backward.
#pragma once

#include <algorithm>

#include "backward.cuh"
#include "device/stored.cuh"
#include "forward.cuh"

LCE_NAMESPACE_BEGIN

namespace detail {
/// Whether the stored forward can run with these types (bias, class weights and the device
/// are only known at the launch): 16-bit elements and a Config with an sm_90a kernel.
template <class Element, class Config>
inline constexpr bool can_store = sizeof(Element) == 2 &&
                                  !std::is_void_v<typename sm90_config_of<Config>::type>;

struct forward_backward_plan {
  device::forward_plan forward;
  std::size_t lse = 0;
  std::size_t backward = 0;             ///< offset of the backward's workspace
  device::backward_plan backward_plan;  ///< the chunked plan; with `stored`, its fallback
  bool stored = false;                  ///< the stored strategy: asked for, or automatic's choice
  device::stored_plan stored_plan;      ///< from the same offset as backward_plan
  std::size_t bytes = 0;
};

/// `bias_or_weights`: the call passes a bias or class weights, so the stored forward cannot run
/// and the chunked plan takes the whole budget.
template <class Element, class Grad, class Config>
forward_backward_plan make_forward_backward_plan(const problem& s, const backward_options& b,
                                                 bool bias_or_weights = false) noexcept {
  forward_backward_plan p;
  workspace_layout layout;
  p.forward = device::make_forward_plan<Config>(s, layout);
  p.lse = layout.reserve<float>(static_cast<std::size_t>(s.n));
  p.backward = layout.reserve<char>(0);
  workspace_layout stored_layout;
  const device::stored_plan whole =
      device::make_stored_plan<Element>(s, s.n, 0, device::stored_tile_cols<Config>(),
                                        stored_layout, device::stored_offsets_possible<Element>);
  const bool fits = whole.bytes <= b.memory_budget;
  // Where the n rows do not fit, row chunks as tall as the budget holds; each chunk adds to
  // dW and db: the caller's where they are fp32, else fp32 accumulators within the budget.
  device::stored_plan chunks;
  if constexpr (can_store<Element, Config>) {
    if (!fits) {
      chunks = device::make_stored_chunk_plan<Element, Config>(s, b.memory_budget,
                                                               !std::is_same_v<Grad, float>);
    }
  }
  // automatic takes stored where it can run (16-bit elements, a Config with an sm_90a kernel,
  // no bias or class weights; the device is seen at the launch, which falls back to the
  // chunked plan) within the budget: in one chunk, or in chunks of at least min_stored_chunk rows
  // (below that the passes over the fp32 dW weigh on the GEMMs). 3 GEMMs and no recomputation.
  // Asked for, stored runs in chunks where it can and in one chunk otherwise, whatever the
  // budget.
  p.stored = !bias_or_weights &&
             (b.strategy == backward_strategy::stored ||
              (b.strategy == backward_strategy::automatic && can_store<Element, Config> &&
               (fits || chunks.rows >= std::min(s.n, device::min_stored_chunk))));
  if (p.stored) p.stored_plan = !fits && chunks.rows > 0 ? chunks : whole;
  // The chunked plan: the call's, or with stored its fallback, within the stored space.
  workspace_layout backward_layout;
  p.backward_plan = device::make_backward_plan<Element, Grad>(
      s, p.stored ? device::stored_fallback_options(b, p.stored_plan.bytes) : b, backward_layout);
  p.bytes = p.backward + (p.stored ? std::max(p.backward_plan.bytes, p.stored_plan.bytes)
                                   : p.backward_plan.bytes);
  return p;
}
}  // namespace detail

/// @brief What lce::forward_backward will do for a shape and options (as choose_backward for
/// lce::backward): `stored` where asked for or where automatic takes it, else the chunked
/// plan's strategy and chunk; workspace_bytes is the whole call's. With `bias_or_weights` (a
/// bias or class weights are passed) the stored strategy cannot run and the chunked plan's
/// strategy is reported, in the same workspace. The strategy does not consult the device (a
/// device without the sm_90a kernel also falls back from stored); `fused_recompute` and
/// `reason` do, as choose_backward's.
template <class Element, class Grad = Element, class Config = default_config<Element>>
[[nodiscard]] backward_choice choose_forward_backward(const problem& shape,
                                                      const backward_options& bopt = {},
                                                      bool bias_or_weights = false) noexcept {
  detail::check_backward_types<Element, Grad>();
  const auto plan =
      detail::make_forward_backward_plan<Element, Grad, Config>(shape, bopt, bias_or_weights);
  if (plan.stored && detail::can_store<Element, Config>) {
    const std::int64_t rows = plan.stored_plan.rows < shape.n ? plan.stored_plan.rows : 0;
    backward_choice c{backward_strategy::stored, rows, plan.bytes,
                      plan.stored_plan.accumulator_bytes};
    c.reason = rows > 0 ? "stored in row chunks: no recomputation (on a device without the "
                          "sm_90a kernel the launch runs the chunked plan)"
                        : "stored: no recomputation (on a device without the sm_90a kernel the "
                          "launch runs the chunked plan)";
    return c;
  }
  backward_choice c{plan.backward_plan.strategy, plan.backward_plan.chunk, plan.bytes,
                    plan.backward_plan.accumulator_bytes};
  if (c.strategy == backward_strategy::row_chunked) {
    c.reason =
        "row_chunked in one pass: a cuBLAS GEMM recomputes each chunk (its lse comes "
        "from the same chunk)";
    return c;
  }
  detail::choose_recompute<Element, Config>(c, shape, bias_or_weights);
  return c;
}

/// @brief Workspace bytes of lce::forward_backward: the forward's, n floats for the lse, and
/// the backward's. `bias_or_weights`: the call will pass a bias or class weights (the stored
/// strategy cannot run, the chunked plan takes the budget); a call with them also runs in the
/// size queried without the flag, its chunked plan then within that smaller space.
template <class Element, class Grad = Element, class Config = default_config<Element>>
[[nodiscard]] std::size_t forward_backward_workspace_size(const problem& shape,
                                                          const backward_options& bopt = {},
                                                          bool bias_or_weights = false) noexcept {
  detail::check_backward_types<Element, Grad>();
  return detail::make_forward_backward_plan<Element, Grad, Config>(shape, bopt, bias_or_weights)
      .bytes;
}

/// @brief The forward (loss, token_loss, lse where given) followed by the gradients of the
/// returned loss (upstream gradient 1: of the mean or sum; for reduction none, of the sum of
/// the per-token losses). Same contracts as lce::forward and lce::backward: two-phase
/// workspace, no allocation, no synchronization, stream-ordered, deterministic; invalid
/// targets treated as ignored and counted once into `args.status`; n = 0 only memsets
/// (loss 0, dW and db 0 unless accumulating); the checks of docs/robustness.md.
/// With vocab_chunked the fused forward runs first (4 GEMMs of work in all); with
/// row_chunked each chunk of whole rows yields its own lse and loss, so the call does the
/// work of 3 GEMMs.
template <class Element, class Grad, class Config = default_config<Element>>
[[nodiscard]] cudaError_t forward_backward(void* d_workspace, std::size_t& workspace_bytes,
                                           const forward_backward_args<Element, Grad>& args,
                                           const problem& shape, const loss_options& options,
                                           const backward_options& bopt, cublasHandle_t handle,
                                           cudaStream_t stream = nullptr) noexcept {
  detail::check_backward_types<Element, Grad>();
  detail::clear_error();
  const forward_args<Element> fa = detail::forward_part(args);
  LCE_RETURN_IF_ERROR(detail::validate_problem(shape));
  LCE_RETURN_IF_ERROR(detail::validate_options(options, shape));
  LCE_RETURN_IF_ERROR(
      detail::validate_backward_options(bopt, std::is_same_v<Grad, float>, /*with_forward=*/true));
  LCE_RETURN_IF_ERROR(detail::validate_forward_args(fa, shape, options));
  detail::buffer_list inputs, outputs;
  detail::forward_buffers(fa, shape, options, inputs, outputs);
  detail::gradient_buffers(args.dx, args.dw, args.db, shape, outputs);
  LCE_RETURN_IF_ERROR(detail::validate_buffers(inputs, outputs));
  if (handle == nullptr) return detail::invalid("handle (cuBLAS) must not be null");
  const auto plan = detail::plan_for_call(
      [&](bool bias_or_weights) {
        return detail::make_forward_backward_plan<Element, Grad, Config>(shape, bopt,
                                                                         bias_or_weights);
      },
      args.bias != nullptr || args.class_weight != nullptr, d_workspace, workspace_bytes);
  LCE_RETURN_IF_ERROR(
      detail::two_phase_workspace(d_workspace, workspace_bytes, plan.bytes, inputs, outputs));
  if (d_workspace == nullptr) return cudaSuccess;  // the size query
  if (shape.n == 0) {
    LCE_RETURN_IF_ERROR(device::run_empty_forward(fa, options, stream));
    backward_args<Element, Grad> empty;
    empty.dw = args.dw;
    empty.db = args.db;
    return device::run_empty_backward(empty, shape, options, stream);
  }
  LCE_RETURN_IF_ERROR(device::check_current_device());

  float* lse = args.lse ? args.lse : detail::at<float>(d_workspace, plan.lse);
  forward_args<Element> fwd = fa;
  fwd.lse = lse;
  const bool gradients = args.dx != nullptr || args.dw != nullptr || args.db != nullptr;
  void* backward_ws = detail::at<char>(d_workspace, plan.backward);
  if (gradients && plan.stored && plan.stored_plan.rows < shape.n) {
    const backward_args<Element, Grad> ba = detail::backward_part(args, lse, nullptr);
    detail::cublas_scope scope(handle, stream);
    if (scope.status() != CUBLAS_STATUS_SUCCESS)
      return detail::cublas_failure(scope.status(), "handle setup");
    bool launched = false;
    LCE_RETURN_IF_ERROR((device::run_stored_chunks<Element, Grad, Config>(
        d_workspace, plan.forward, backward_ws, plan.stored_plan, fwd, ba, shape, options, handle,
        stream, launched)));
    if (launched) return cudaSuccess;
    // Elsewhere: the forward, then the fallback plan's backward from its lse (below).
  } else if (gradients && plan.stored) {
    // The forward stores e^{z − m} where its lean sm_90a kernel runs; elsewhere it runs as
    // usual and the fallback plan's backward follows, from its lse.
    detail::stored_exp<Element> st = device::stored_values<Element>(backward_ws, plan.stored_plan);
    const backward_args<Element, Grad> ba = detail::backward_part(args, lse, nullptr);
    if (device::stored_offset_form(ba, options)) {
      // One offset per row (kernel/stored_offset.cuh): dZ needs no pass over the values.
      st.offset = detail::at<float>(backward_ws, plan.stored_plan.offset);
      st.flagged = detail::at<int>(backward_ws, plan.stored_plan.flagged);
      LCE_RETURN_IF_ERROR(device::run_stored_offsets(
          args.x, args.w, args.targets, shape, options, 0,
          detail::at<float>(backward_ws, plan.stored_plan.offset), st.flagged, stream));
    }
    bool stored = false;
    LCE_RETURN_IF_ERROR((device::run_forward<Element, Config>(d_workspace, plan.forward, fwd, shape,
                                                              options, stream, &st, &stored)));
    detail::cublas_scope scope(handle, stream);
    if (scope.status() != CUBLAS_STATUS_SUCCESS)
      return detail::cublas_failure(scope.status(), "handle setup");
    if (stored) {
      return device::run_stored_backward(
          backward_ws, plan.stored_plan, st,
          detail::at<thread::loss_scalars>(d_workspace, plan.forward.scalars),
          detail::at<float>(d_workspace, plan.forward.target_logit), ba, shape,
          device::vocab_window{0, shape.v}, nullptr, options, handle, stream);
    }
    return device::run_backward<Element, Grad, Config>(backward_ws, plan.backward_plan, ba, shape,
                                                       options, handle, stream);
  }
  const bool rows_in_one_pass =
      gradients && plan.backward_plan.strategy == backward_strategy::row_chunked;
  if (!rows_in_one_pass) {
    LCE_RETURN_IF_ERROR((device::run_forward<Element, Config>(d_workspace, plan.forward, fwd, shape,
                                                              options, stream)));
  }
  if (!gradients) return cudaSuccess;

  // Invalid targets are counted once per call: by the forward's scalars when it runs, else by
  // the one-pass backward's.
  const backward_args<Element, Grad> ba =
      detail::backward_part(args, lse, rows_in_one_pass ? args.status : nullptr);
  const thread::row_outputs rows = device::make_row_outputs(d_workspace, plan.forward, fwd);
  {
    detail::cublas_scope scope(handle, stream);
    if (scope.status() != CUBLAS_STATUS_SUCCESS)
      return detail::cublas_failure(scope.status(), "handle setup");
    LCE_RETURN_IF_ERROR((device::run_backward<Element, Grad, Config>(
        backward_ws, plan.backward_plan, ba, shape, options, handle, stream,
        rows_in_one_pass ? &rows : nullptr)));
  }
  if (!rows_in_one_pass) return cudaSuccess;
  // The backward's scalars (valid rows, weight sums) serve the reduction of the one pass.
  const auto* scalars = detail::at<thread::loss_scalars>(backward_ws, plan.backward_plan.scalars);
  return device::run_reduce_loss(rows, args.targets, shape, options, scalars, args.loss,
                                 args.z_loss, args.correct, stream);
}

LCE_NAMESPACE_END
