/// @file runner.cuh
/// @brief One entry point for the robustness, fuzz and huge-size GPU tests: run lce::forward,
/// lce::backward or lce::forward_backward (any strategy) on a problem_data, with every output
/// of the options, a device_status, and optionally every pointer offset by one element (so
/// that no base pointer is 16-byte aligned). Outputs are poisoned before each run.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "harness.cuh"

namespace lce_test {

/// LCE_TEST_QUICK=1 in the environment (scripts/gpu_run.sh sets it for compute-sanitizer):
/// the robustness tests run fewer variants of each case.
inline bool quick_mode() {
  const char* value = std::getenv("LCE_TEST_QUICK");
  return value != nullptr && *value != '\0' && *value != '0';
}

enum class op_kind { forward, backward, forward_backward };

inline const char* op_name(op_kind k) {
  return k == op_kind::forward    ? "forward"
         : k == op_kind::backward ? "backward"
                                  : "forward_backward";
}

/// What to run: the op, and for backward/forward_backward the strategy and memory budget.
struct run_spec {
  op_kind op = op_kind::forward;
  lce::backward_strategy strategy = lce::backward_strategy::automatic;
  std::size_t budget = lce::backward_options{}.memory_budget;
  bool misaligned = false;  ///< every input and output pointer one element past an aligned one

  [[nodiscard]] bool gradients() const { return op != op_kind::forward; }
  [[nodiscard]] bool forward_outputs() const { return op != op_kind::backward; }
  [[nodiscard]] lce::backward_options backward_options() const {
    lce::backward_options b;
    b.strategy = strategy;
    b.memory_budget = budget;
    return b;
  }
  [[nodiscard]] std::string describe() const {
    std::string s = op_name(op);
    if (gradients()) {
      s +=
          std::string(" strategy=") + strategy_name(strategy) + " budget=" + std::to_string(budget);
    }
    if (misaligned) s += " misaligned";
    return s;
  }
};

/// A device buffer with room for `offset` leading elements: `ptr()` is data() + offset.
template <class T>
struct offset_buffer {
  device_buffer<T> storage;
  std::size_t offset = 0, count = 0;
  offset_buffer() = default;
  offset_buffer(std::size_t count_, std::size_t offset_)
      : storage(count_ + offset_), offset(offset_), count(count_) {
    storage.zero();  // the leading element too: initcheck sees no uninitialized byte
  }
  [[nodiscard]] T* ptr() { return count == 0 ? nullptr : storage.data() + offset; }
  [[nodiscard]] const T* ptr() const { return count == 0 ? nullptr : storage.data() + offset; }
  void poison() { storage.poison(); }
  [[nodiscard]] std::vector<T> download() const {
    const std::vector<T> all = storage.download();
    return std::vector<T>(all.begin() + static_cast<std::ptrdiff_t>(offset), all.end());
  }
};

/// Every output of one run, and the inputs copied to offset buffers when misaligned.
template <class Element, class Grad>
struct run_outputs {
  offset_buffer<float> loss, z_loss, token_loss, lse, token_z_loss, entropy, target_logprob;
  offset_buffer<std::int64_t> argmax, correct;
  offset_buffer<Element> dx;
  offset_buffer<Grad> dw, db;
  device_buffer<lce::device_status> status{1};
  // Misaligned copies of the inputs (empty when aligned).
  offset_buffer<Element> x, w, bias;
  offset_buffer<std::int64_t> targets;
  offset_buffer<float> lse_in;

  run_outputs(const problem_data<Element>& data, const run_spec& how) {
    const lce::problem& s = data.shape;
    const std::size_t off = how.misaligned ? 1 : 0;
    const auto n = static_cast<std::size_t>(s.n);
    const auto v = static_cast<std::size_t>(s.v);
    loss = offset_buffer<float>(1, off);
    z_loss = offset_buffer<float>(1, off);
    correct = offset_buffer<std::int64_t>(1, off);
    token_loss = offset_buffer<float>(n, off);
    lse = offset_buffer<float>(n, off);
    token_z_loss = offset_buffer<float>(n, off);
    entropy = offset_buffer<float>(n, off);
    target_logprob = offset_buffer<float>(n, off);
    argmax = offset_buffer<std::int64_t>(n, off);
    if (how.gradients()) {
      dx = offset_buffer<Element>(static_cast<std::size_t>(s.n * s.dx_stride()), off);
      dw = offset_buffer<Grad>(static_cast<std::size_t>(s.v * s.dw_stride()), off);
      db = offset_buffer<Grad>(v, off);
    }
    status.zero();
    if (how.misaligned) {
      x = copy_offset(data.x, off);
      w = copy_offset(data.w, off);
      if (data.spec.bias) bias = copy_offset(data.bias, off);
      targets = copy_offset(data.targets, off);
    }
  }

  void poison() {
    for (auto* b : {&loss, &z_loss, &token_loss, &lse, &token_z_loss, &entropy, &target_logprob})
      b->poison();
    argmax.poison();
    correct.poison();
    dx.poison();
    dw.poison();
    db.poison();
  }

  [[nodiscard]] lce::device_status read_status() const { return status.download()[0]; }

 private:
  template <class T>
  static offset_buffer<T> copy_offset(const device_buffer<T>& src, std::size_t off) {
    offset_buffer<T> out(src.size(), off);
    if (src.size() != 0)
      LCE_TEST_CUDA(cudaMemcpy(out.ptr(), src.data(), src.bytes(), cudaMemcpyDeviceToDevice));
    return out;
  }
};

/// Runs `how` on `data` (upstream gradient: data's, 1 for forward_backward; the backward's
/// lse: `d_lse`, the reference's rounded to fp32 when null). Returns the launch status; the
/// outputs are synchronized.
template <class Element, class Grad>
cudaError_t run_op(const problem_data<Element>& data, const run_spec& how, gpu_context& ctx,
                   run_outputs<Element, Grad>& out, const float* d_lse = nullptr,
                   bool poison = true) {
  const lce::problem& s = data.shape;
  const Element* x = how.misaligned ? out.x.ptr() : data.x.data();
  const Element* w = how.misaligned ? out.w.ptr() : data.w.data();
  const Element* bias = how.misaligned ? out.bias.ptr() : data.bias_pointer();
  const std::int64_t* targets = how.misaligned ? out.targets.ptr() : data.targets.data();
  if (poison) out.poison();
  std::size_t bytes = 0;
  cudaError_t status = cudaSuccess;
  const bool reduced = data.spec.reduction != lce::reduction::none;
  if (how.op == op_kind::backward) {
    if (d_lse == nullptr) {
      const std::vector<double> ref = data.ref_lse.download();
      out.lse_in = offset_buffer<float>(ref.size(), how.misaligned ? 1 : 0);
      const std::vector<float> rounded(ref.begin(), ref.end());
      if (!rounded.empty())
        LCE_TEST_CUDA(cudaMemcpy(out.lse_in.ptr(), rounded.data(), rounded.size() * sizeof(float),
                                 cudaMemcpyHostToDevice));
      d_lse = out.lse_in.ptr();
    }
    lce::backward_args<Element, Grad> a;
    a.x = x;
    a.w = w;
    a.bias = bias;
    a.targets = targets;
    a.lse = d_lse;
    a.grad = data.grad_pointer();
    a.dx = out.dx.ptr();
    a.dw = out.dw.ptr();
    a.db = out.db.ptr();
    a.class_weight = data.class_weight_pointer();
    a.status = out.status.data();
    const lce::backward_options bopt = how.backward_options();
    status = lce::backward(nullptr, bytes, a, s, data.options, bopt, ctx.handle());
    if (status == cudaSuccess)
      status = lce::backward(ctx.workspace(bytes), bytes, a, s, data.options, bopt, ctx.handle(),
                             ctx.stream());
  } else if (how.op == op_kind::forward) {
    lce::forward_args<Element> a;
    a.x = x;
    a.w = w;
    a.bias = bias;
    a.targets = targets;
    a.loss = reduced ? out.loss.ptr() : nullptr;
    a.token_loss = out.token_loss.ptr();
    a.lse = out.lse.ptr();
    a.class_weight = data.class_weight_pointer();
    a.z_loss = reduced ? out.z_loss.ptr() : nullptr;
    a.token_z_loss = out.token_z_loss.ptr();
    a.argmax = out.argmax.ptr();
    a.correct = out.correct.ptr();
    a.entropy = out.entropy.ptr();
    a.target_logprob = out.target_logprob.ptr();
    a.status = out.status.data();
    status = lce::forward<Element>(nullptr, bytes, a, s, data.options);
    if (status == cudaSuccess)
      status = lce::forward<Element>(ctx.workspace(bytes), bytes, a, s, data.options, ctx.stream());
  } else {
    lce::forward_backward_args<Element, Grad> a;
    a.x = x;
    a.w = w;
    a.bias = bias;
    a.targets = targets;
    a.loss = reduced ? out.loss.ptr() : nullptr;
    a.token_loss = out.token_loss.ptr();
    a.lse = out.lse.ptr();
    a.dx = out.dx.ptr();
    a.dw = out.dw.ptr();
    a.db = out.db.ptr();
    a.class_weight = data.class_weight_pointer();
    a.z_loss = reduced ? out.z_loss.ptr() : nullptr;
    a.token_z_loss = out.token_z_loss.ptr();
    a.argmax = out.argmax.ptr();
    a.correct = out.correct.ptr();
    a.entropy = out.entropy.ptr();
    a.target_logprob = out.target_logprob.ptr();
    a.status = out.status.data();
    const lce::backward_options bopt = how.backward_options();
    status = lce::forward_backward(nullptr, bytes, a, s, data.options, bopt, ctx.handle());
    if (status == cudaSuccess)
      status = lce::forward_backward(ctx.workspace(bytes), bytes, a, s, data.options, bopt,
                                     ctx.handle(), ctx.stream());
  }
  ctx.synchronize();
  LCE_TEST_CUDA(cudaGetLastError());
  return status;
}

/// Extra slack of a comparison, added to the relative tolerance: `abs_slack` is an absolute
/// error allowed per unit of ‖reference‖ (e.g. from the fp32 rounding of large logits).
struct slack {
  double loss = 0.0;  ///< added to the relative tolerance of loss, token_loss and lse
  double grad = 0.0;  ///< added to the relative tolerance of dx, dw and db
};

/// Checks loss, token_loss and lse (forward outputs) and dx, dw, db (gradients) of a run
/// against data's reference with the standard tolerances plus `extra`.
template <class Element, class Grad>
void check_run(const problem_data<Element>& data, const run_spec& how,
               run_outputs<Element, Grad>& out, slack extra = {}) {
  const lce::problem& s = data.shape;
  const cancellation c = cancellation_slack(data);
  const double ltol = loss_tolerance<Element>() + extra.loss + c.loss;
  const double gtol = grad_tolerance<Element>() + extra.grad + c.grad;
  INFO(how.describe());
  if (how.forward_outputs()) {
    if (data.spec.reduction != lce::reduction::none)
      check_loss(out.loss.ptr(), data.ref_loss, ltol);
    check_output("token_loss", out.token_loss.ptr(), s.n, 1, 1, data.ref_token_loss.data(), ltol);
    check_output("lse", out.lse.ptr(), s.n, 1, 1, data.ref_lse.data(), ltol, lse_norm_floor(s.n));
  }
  if (how.gradients()) {
    check_output("dx", out.dx.ptr(), s.n, s.d, s.dx_stride(), data.ref_dx.data(), gtol);
    check_output("dw", out.dw.ptr(), s.v, s.d, s.dw_stride(), data.ref_dw.data(), gtol);
    check_output("db", out.db.ptr(), 1, s.v, s.v, data.ref_db.data(),
                 db_tolerance(data) + extra.grad + c.grad);
  }
}

/// Every run_spec worth trying for Grad: forward; backward and forward_backward with
/// vocab_chunked (default and 1 MiB budget) and, for fp32 dW, row_chunked (the 1 MiB budgets
/// are left out in quick_mode()).
template <class Grad>
std::vector<run_spec> all_runs(bool misaligned = false) {
  std::vector<run_spec> out;
  const std::size_t budget = lce::backward_options{}.memory_budget;
  const bool small_budgets = !quick_mode();
  out.push_back({op_kind::forward, lce::backward_strategy::automatic, budget, misaligned});
  for (const op_kind op : {op_kind::backward, op_kind::forward_backward}) {
    out.push_back({op, lce::backward_strategy::vocab_chunked, budget, misaligned});
    if (small_budgets)
      out.push_back({op, lce::backward_strategy::vocab_chunked, std::size_t{1} << 20, misaligned});
    if constexpr (std::is_same_v<Grad, float>) {
      out.push_back({op, lce::backward_strategy::row_chunked, budget, misaligned});
      if (small_budgets)
        out.push_back({op, lce::backward_strategy::row_chunked, std::size_t{1} << 20, misaligned});
    }
  }
  out.push_back({op_kind::forward_backward, lce::backward_strategy::stored, budget, misaligned});
  return out;
}

/// Runs every run_spec of all_runs against data's reference with the standard tolerances:
/// fp32 gradients for every op, and for 16-bit inputs also gradients in the element type.
template <class Element>
void check_all_runs(const problem_data<Element>& data, gpu_context& ctx, bool misaligned = false) {
  for (const run_spec& how : all_runs<float>(misaligned)) {
    run_outputs<Element, float> out(data, how);
    LCE_TEST_REQUIRE_OK(run_op(data, how, ctx, out));
    check_run(data, how, out);
  }
  if constexpr (!std::is_same_v<Element, float>) {
    for (const run_spec& how : all_runs<Element>(misaligned)) {
      if (!how.gradients()) continue;
      run_outputs<Element, Element> out(data, how);
      LCE_TEST_REQUIRE_OK(run_op(data, how, ctx, out));
      check_run(data, how, out);
    }
  }
}

/// `cases`, or only its first `quick` entries in quick_mode().
template <class T>
std::vector<T> quick_subset(std::vector<T> cases, std::size_t quick) {
  if (quick_mode() && cases.size() > quick)
    cases.erase(cases.begin() + static_cast<std::ptrdiff_t>(quick), cases.end());
  return cases;
}

}  // namespace lce_test
