// GPU tests of the robustness contract (docs/robustness.md): invalid targets (treated as
// ignored, counted in device_status), NaN/Inf inputs (NaN loss for the affected rows), extreme
// logits, degenerate shapes (n = 0, v = 1, d = 1, n = 1), misaligned pointers and odd leading
// dimensions, and bitwise determinism of every output of every strategy.
//
// Tests tagged [sanitize] use tiny shapes: scripts/gpu_run.sh runs them under compute-sanitizer.
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "support/runner.cuh"

namespace {

using namespace lce_test;

template <class T>
void set_element(T* d_ptr, std::int64_t index, T value) {
  LCE_TEST_CUDA(cudaMemcpy(d_ptr + index, &value, sizeof(T), cudaMemcpyHostToDevice));
}

template <class T>
std::vector<double> download_doubles(const offset_buffer<T>& b) {
  const std::vector<T> host = b.download();
  std::vector<double> out(host.size());
  for (std::size_t i = 0; i < host.size(); ++i) out[i] = to_double(host[i]);
  return out;
}

template <class T>
std::vector<unsigned char> bytes_of(const offset_buffer<T>& b) {
  const std::vector<T> host = b.download();
  std::vector<unsigned char> out(host.size() * sizeof(T));
  if (!host.empty()) std::memcpy(out.data(), host.data(), out.size());
  return out;
}

/// The invalid targets a test plants.
std::vector<std::int64_t> invalid_values(std::int64_t v) {
  return {v, -1, std::int64_t{1} << 40, std::numeric_limits<std::int64_t>::min(), v + 7, -2};
}

template <class T>
bool any_nan(const std::vector<T>& values) {
  for (const T& x : values)
    if (std::isnan(to_double(x))) return true;
  return false;
}

}  // namespace

TEMPLATE_TEST_CASE("robustness small: a target outside [0, v) is ignored and counted",
                   "[gpu][robustness][sanitize]", float, __half, __nv_bfloat16) {
  const case_spec spec = GENERATE(from_range(quick_subset(
      std::vector<case_spec>{case_spec{60, 40, 300}.shifted(6).smoothing(0.1f).weighted(),
                             case_spec{48, 16, 127}.none().no_bias(), case_spec{64, 72, 300},
                             case_spec{64, 24, 130}.sum().ignore_id(3).with_z_loss(1e-3f)},
      2)));
  problem_data<TestType> data(spec, fresh_seed());
  data.use_unit_upstream();
  std::vector<std::int64_t> dirty = data.h_targets;
  std::vector<std::int64_t> clean = dirty;
  const std::vector<std::int64_t> bad = invalid_values(spec.v);
  std::uint64_t expected = 0;
  for (std::size_t k = 0; k < bad.size(); ++k) {
    const std::size_t index = 1 + 4 * k;
    dirty[index] = bad[k];
    clean[index] = spec.ignore_index;
    // With the causal shift, targets[i] is used by row i − 1 unless i starts a sequence.
    const bool used = spec.shift_seq_len == 0 || index % spec.shift_seq_len != 0;
    expected += used ? 1 : 0;
  }
  if (spec.shift_seq_len > 0) {  // one that no row reads: never counted
    dirty[static_cast<std::size_t>(spec.shift_seq_len)] = -5;
    clean[static_cast<std::size_t>(spec.shift_seq_len)] = spec.ignore_index;
  }
  // The reference sees the invalid rows as ignored; the library sees the invalid targets.
  data.h_targets = clean;
  data.compute_reference(true);
  data.targets.upload(dirty);
  INFO(data.describe() << " invalid rows=" << expected);
  gpu_context ctx;
  for (const run_spec& how : all_runs<float>()) {
    run_outputs<TestType, float> out(data, how);
    LCE_TEST_REQUIRE_OK(run_op(data, how, ctx, out));
    check_run(data, how, out);
    lce::device_status status = out.read_status();
    CHECK(status.invalid_targets == expected);
    CHECK(status.reserved[0] == 0);
    // Counts accumulate across calls until the caller clears them.
    LCE_TEST_REQUIRE_OK(run_op(data, how, ctx, out));
    status = out.read_status();
    CHECK(status.invalid_targets == 2 * expected);
    const cudaError_t code = lce::check_status(status);
    const std::string message = lce::last_error_message();
    CAPTURE(message);
    CHECK(code == cudaErrorInvalidValue);
    CHECK(message.find(std::to_string(2 * expected) + " rows") != std::string::npos);
    LCE_TEST_REQUIRE_OK(lce::clear_status(out.status.data(), ctx.stream()));
    ctx.synchronize();
    CHECK(out.read_status().invalid_targets == 0);
    CHECK(lce::check_status(out.read_status()) == cudaSuccess);
  }
}

TEMPLATE_TEST_CASE("robustness small: NaN or Inf in x, w or b gives NaN for the affected rows",
                   "[gpu][robustness][sanitize]", float, __half, __nv_bfloat16) {
  const float softcap = GENERATE(0.0f, 30.0f);
  // The value by index: on the H200 run of 2026-11-28, GENERATE_COPY(nan, inf, -inf) in this
  // nvcc-compiled test yielded a finite garbage value (-2.6e-17), so nothing was injected.
  const int which = GENERATE(0, 1, 2);  // NaN, +inf, −inf
  const float inf = std::numeric_limits<float>::infinity();
  const float value = which == 0   ? std::numeric_limits<float>::quiet_NaN()
                      : which == 1 ? inf
                                   : -inf;
  const int where = GENERATE(0, 1, 2);  // x, w, bias
  REQUIRE(!std::isfinite(value));
  if (quick_mode() && (which == 2 || (softcap > 0.0f && where != 0))) return;
  case_spec spec = case_spec{32, 40, 200}.ignoring(0.0);
  if (softcap > 0.0f) spec = spec.capped(softcap);
  problem_data<TestType> data(spec, fresh_seed());
  data.use_unit_upstream();
  data.compute_reference(true);
  const std::int64_t bad_row = 3;
  const TestType bad = from_double<TestType>(static_cast<double>(value));
  if (where == 0) set_element(data.x.data(), bad_row * data.shape.x_stride() + 7, bad);
  if (where == 1) set_element(data.w.data(), 11 * data.shape.w_stride() + 2, bad);
  if (where == 2) set_element(data.bias.data(), 11, bad);
  INFO(data.describe() << " value=" << value << " in "
                       << (where == 0   ? "x"
                           : where == 1 ? "w"
                                        : "bias"));
  gpu_context ctx;
  for (const run_spec& how : all_runs<float>()) {
    if (how.budget != lce::backward_options{}.memory_budget) continue;
    INFO(how.describe());
    run_outputs<TestType, float> out(data, how);
    LCE_TEST_REQUIRE_OK(run_op(data, how, ctx, out));
    CHECK(out.read_status().invalid_targets == 0);
    if (how.forward_outputs()) {
      const std::vector<double> token_loss = download_doubles(out.token_loss);
      const std::vector<double> lse = download_doubles(out.lse);
      const std::vector<double> ref = data.ref_token_loss.download();
      for (std::int64_t i = 0; i < spec.n; ++i) {
        const auto r = static_cast<std::size_t>(i);
        CAPTURE(i, token_loss[r], lse[r]);
        if (where != 0 || i == bad_row) {  // a bad w or b reaches every row
          CHECK(std::isnan(token_loss[r]));
          CHECK(std::isnan(lse[r]));
        } else {
          CHECK(std::fabs(token_loss[r] - ref[r]) <= 1e-3 * (1.0 + std::fabs(ref[r])));
        }
      }
      CHECK(std::isnan(download_doubles(out.loss)[0]));
    }
    if (how.gradients()) {
      // The NaN reaches the gradients (never hidden): the bad row of dX, and every row of dW.
      const std::vector<double> dx = download_doubles(out.dx);
      const std::int64_t ldx = data.shape.dx_stride();
      for (std::int64_t i = 0; i < spec.n; ++i) {
        bool any_nan = false;
        for (std::int64_t j = 0; j < spec.d; ++j)
          any_nan = any_nan || std::isnan(dx[static_cast<std::size_t>(i * ldx + j)]);
        CAPTURE(i);
        CHECK(any_nan == (where != 0 || i == bad_row));
      }
      CHECK(any_nan(out.dw.download()));
      CHECK(any_nan(out.db.download()));
    }
  }
}

TEMPLATE_TEST_CASE("robustness: extreme logits match the fp64 reference, finite everywhere",
                   "[gpu][robustness][extreme]", float, __half, __nv_bfloat16) {
  std::vector<case_spec> specs{
      case_spec{64, 64, 300}.scaled(1e4),
      case_spec{64, 64, 300}.scaled(1e4).capped(30.0f),
      case_spec{64, 64, 300}.scaled(1e4).smoothing(0.1f).with_z_loss(1e-4f).none(),
      case_spec{33, 16, 1000}.scaled(3e3).with_temperature(0.5f).sum(),
  };
  if (std::is_same_v<TestType, __nv_bfloat16>) {
    // Near the top of the bf16 range: |z| ~ 1e30 (fp16 cannot hold w). Not for fp32 inputs:
    // there the issue asks for |z| up to 1e4, and at 1e30 an ulp of z (~1e23) is far above 1,
    // so p = e^{z − lse} of a recomputed z is not determined by the inputs (the H200 run of
    // 2026-11-28 showed 40% gradient errors at that scale; since then lce clamps z − lse at 0,
    // which keeps every output finite).
    specs.push_back(case_spec{64, 64, 300}.scaled(1e30));
    specs.push_back(case_spec{64, 64, 300}.scaled(1e30).no_bias());  // the lean sm_90a epilogues
    specs.push_back(case_spec{64, 64, 300}.scaled(1e30).capped(30.0f).smoothing(0.1f));
  }
  const case_spec spec = GENERATE_COPY(from_range(specs));
  problem_data<TestType> data(spec, fresh_seed());
  data.use_unit_upstream();
  data.compute_reference(true);
  INFO(data.describe());
  // The fp32 lse has an absolute error of about ulp(|z|); where a row has near-ties, p =
  // exp(z − lse) inherits it as a relative error ~|z|·2^-24. Capped at 0.05: at |z| ~ 1e30
  // softmax is exactly one-hot (gaps ≫ 1) and the check stays meaningful.
  double largest = 0.0;
  for (double l : data.ref_lse.download()) largest = std::max(largest, std::fabs(l));
  slack extra;
  extra.loss = 16 * 0x1p-24;
  if (std::is_same_v<TestType, float>) {
    // fp32 inputs: the GEMM's own rounding, about √d·u·|raw logit| per logit (raw ~ the
    // spec's scale), reaches the loss through dz/draw ≤ 1 (twice: lse and z_y). With a softcap
    // the loss is O(c), so this dominates: at scale 1e4, d = 64, it is ~1e-2 absolute.
    const double loss_scale = std::max(1.0, std::fabs(data.ref_loss));
    extra.loss = std::max(extra.loss, 2.0 * std::sqrt(static_cast<double>(spec.d)) * 0x1p-24 *
                                          spec.logit_scale / loss_scale);
  }
  extra.grad = std::min(4.0 * largest * 0x1p-24, 0.05);
  if (std::is_same_v<TestType, float>) {
    // fp32 inputs: the backward recomputes the raw logits by another GEMM (cuBLAS) than the
    // forward that built the lse (lce's kernel), so each p = e^{z − lse} carries the two
    // GEMMs' rounding, ~√d·u·|raw| through dz/draw ≤ 1 (the H200 run of 2026-11-28 saw 2.4e-5
    // with softcap 30 at scale 1e4 against a 1.8e-5 tolerance without this term). The 16-bit
    // paths recompute bitwise on sm_90a (kernel/logit_grad_sm90.cuh).
    extra.grad =
        std::max(extra.grad, std::sqrt(static_cast<double>(spec.d)) * 0x1p-24 * spec.logit_scale);
  }
  gpu_context ctx;
  // The backward takes an lse. At |z| ~ 1e30 the gradient is only determined by the inputs
  // together with the lse that lce's own forward returned (the recomputed row maximum equals it
  // bitwise, so z − lse = 0 there); the fp64 reference's lse rounded to fp32 differs from the
  // fp32 GEMM's maximum by an ulp (~1e23) on about half the rows, which makes p 0 or 1 by
  // chance (the H200 run of 2026-11-28 showed both outcomes on different builds). So at that
  // scale the backward gets lce::forward's lse, as a training step does; at 1e4 the
  // reference's.
  const bool use_forward_lse = spec.logit_scale > 1e20;
  run_spec forward_how;
  forward_how.op = op_kind::forward;
  run_outputs<TestType, float> forward_out(data, forward_how);
  if (use_forward_lse) LCE_TEST_REQUIRE_OK(run_op(data, forward_how, ctx, forward_out));
  for (const run_spec& how : all_runs<float>()) {
    if (how.budget != lce::backward_options{}.memory_budget) continue;
    run_outputs<TestType, float> out(data, how);
    const float* lse =
        use_forward_lse && how.op == op_kind::backward ? forward_out.lse.ptr() : nullptr;
    LCE_TEST_REQUIRE_OK(run_op(data, how, ctx, out, lse));
    check_run(data, how, out, extra);
  }
}

TEMPLATE_TEST_CASE("robustness small: degenerate shapes v = 1, d = 1, n = 1",
                   "[gpu][robustness][sanitize]", float, __half, __nv_bfloat16) {
  const case_spec spec = GENERATE(from_range(quick_subset(
      std::vector<case_spec>{case_spec{1, 1, 1}, case_spec{7, 1, 127},
                             case_spec{1, 72, 300}.ignoring(0.0),
                             case_spec{5, 8, 2}.no_bias().none(), case_spec{1, 16, 1},
                             case_spec{300, 1, 1}.sum(), case_spec{1, 1, 2}.ignoring(0.0)},
      4)));
  problem_data<TestType> data(spec, fresh_seed());
  data.use_unit_upstream();
  data.compute_reference(true);
  INFO(data.describe());
  gpu_context ctx;
  check_all_runs(data, ctx);
}

TEMPLATE_TEST_CASE("robustness small: n = 0 launches no kernel; loss 0, dW and db 0",
                   "[gpu][robustness][sanitize]", float, __half, __nv_bfloat16) {
  const bool accumulate = GENERATE(false, true);
  const auto red = GENERATE(lce::reduction::mean, lce::reduction::sum, lce::reduction::none);
  const lce::problem shape{0, 72, 127, 0, 0, 0, 75};
  lce::loss_options options;
  options.reduction = red;
  options.accumulate = accumulate;
  INFO("accumulate=" << accumulate << " reduction=" << reduction_name(red));
  device_buffer<TestType> w(static_cast<std::size_t>(shape.v * shape.d));
  fill_normal(w.data(), shape.v, shape.d, shape.d, 0.1, fresh_seed());
  device_buffer<float> loss(1), z_loss(1);
  device_buffer<std::int64_t> correct(1);
  device_buffer<float> dw(static_cast<std::size_t>(shape.v * shape.dw_stride()));
  device_buffer<float> db(static_cast<std::size_t>(shape.v));
  device_buffer<lce::device_status> status(1);
  gpu_context ctx;
  for (int op = 0; op < 2; ++op) {
    loss.poison();
    z_loss.poison();
    correct.poison();
    dw.fill_bytes(0x3F);  // 0.75: what accumulate must leave alone
    db.fill_bytes(0x3F);
    status.zero();
    lce::forward_args<TestType> fa;  // x, targets and the per-row outputs null: n = 0
    fa.w = w.data();
    fa.loss = loss.data();
    fa.z_loss = z_loss.data();
    fa.correct = correct.data();
    fa.status = status.data();
    lce::forward_backward_args<TestType, float> fba;
    fba.w = w.data();
    fba.loss = loss.data();
    fba.z_loss = z_loss.data();
    fba.correct = correct.data();
    fba.dw = dw.data();
    fba.db = db.data();
    fba.status = status.data();
    std::size_t bytes = 0;
    LCE_TEST_REQUIRE_OK(
        op == 0 ? lce::forward<TestType>(nullptr, bytes, fa, shape, options)
                : lce::forward_backward(nullptr, bytes, fba, shape, options, {}, ctx.handle()));
    CHECK(bytes > 0);
    void* ws = ctx.workspace(bytes);
    // Captured into a graph: the call must enqueue memsets only, never a kernel.
    cudaGraph_t graph = nullptr;
    LCE_TEST_CUDA(cudaStreamBeginCapture(ctx.stream(), cudaStreamCaptureModeGlobal));
    const cudaError_t code =
        op == 0
            ? lce::forward<TestType>(ws, bytes, fa, shape, options, ctx.stream())
            : lce::forward_backward(ws, bytes, fba, shape, options, {}, ctx.handle(), ctx.stream());
    const std::string message = lce::last_error_message();
    LCE_TEST_CUDA(cudaStreamEndCapture(ctx.stream(), &graph));
    INFO("op=" << (op == 0 ? "forward" : "forward_backward") << " message=" << message);
    REQUIRE(code == cudaSuccess);
    std::size_t count = 0;
    LCE_TEST_CUDA(cudaGraphGetNodes(graph, nullptr, &count));
    std::vector<cudaGraphNode_t> nodes(count);
    if (count > 0) LCE_TEST_CUDA(cudaGraphGetNodes(graph, nodes.data(), &count));
    for (cudaGraphNode_t node : nodes) {
      cudaGraphNodeType type;
      LCE_TEST_CUDA(cudaGraphNodeGetType(node, &type));
      CHECK(type == cudaGraphNodeTypeMemset);
    }
    cudaGraphExec_t exec = nullptr;
    LCE_TEST_CUDA(cudaGraphInstantiate(&exec, graph, 0));
    LCE_TEST_CUDA(cudaGraphLaunch(exec, ctx.stream()));
    ctx.synchronize();
    (void)cudaGraphExecDestroy(exec);
    (void)cudaGraphDestroy(graph);
    if (red != lce::reduction::none) {
      CHECK(loss.download()[0] == 0.0f);
      CHECK(z_loss.download()[0] == 0.0f);
    }
    CHECK(correct.download()[0] == 0);
    CHECK(status.download()[0].invalid_targets == 0);
    if (op == 1) {
      const std::vector<float> hw = dw.download();
      const std::vector<float> hb = db.download();
      float expected_fill = 0.0f;
      const unsigned pattern = 0x3F3F3F3Fu;
      std::memcpy(&expected_fill, &pattern, sizeof(float));
      bool ok = true;
      for (std::int64_t k = 0; k < shape.v; ++k) {
        for (std::int64_t j = 0; j < shape.dw_stride(); ++j) {
          const float got = hw[static_cast<std::size_t>(k * shape.dw_stride() + j)];
          // Columns beyond d are padding: never written.
          const float want = (j < shape.d && !accumulate) ? 0.0f : expected_fill;
          ok = ok && std::memcmp(&got, &want, sizeof(float)) == 0;
        }
        ok = ok && hb[static_cast<std::size_t>(k)] == (accumulate ? expected_fill : 0.0f);
      }
      CHECK(ok);
    }
  }
}

TEMPLATE_TEST_CASE("robustness small: misaligned base pointers and odd leading dimensions",
                   "[gpu][robustness][sanitize]", float, __half, __nv_bfloat16) {
  const case_spec spec = GENERATE(from_range(quick_subset(
      std::vector<case_spec>{case_spec{37, 72, 300}.padded(1, 3, 5, 7), case_spec{9, 33, 129}.sum(),
                             case_spec{37, 70, 300}.none()},
      2)));
  problem_data<TestType> data(spec, fresh_seed());
  data.use_unit_upstream();
  data.compute_reference(true);
  INFO(data.describe());
  gpu_context ctx;
  check_all_runs(data, ctx, true);
}

namespace {

/// Two runs of `how` on the same inputs; every output must match byte for byte.
template <class Element, class Grad>
void check_bitwise_reproducible(const problem_data<Element>& data, const run_spec& how,
                                gpu_context& ctx) {
  INFO(how.describe() << " grad=" << element_name<Grad>());
  run_outputs<Element, Grad> first(data, how);
  run_outputs<Element, Grad> second(data, how);
  LCE_TEST_REQUIRE_OK(run_op(data, how, ctx, first));
  LCE_TEST_REQUIRE_OK(run_op(data, how, ctx, second));
  const bool fwd = how.forward_outputs();
  if (fwd) {
    CHECK(bytes_of(first.loss) == bytes_of(second.loss));
    CHECK(bytes_of(first.z_loss) == bytes_of(second.z_loss));
    CHECK(bytes_of(first.token_loss) == bytes_of(second.token_loss));
    CHECK(bytes_of(first.lse) == bytes_of(second.lse));
    CHECK(bytes_of(first.token_z_loss) == bytes_of(second.token_z_loss));
    CHECK(bytes_of(first.entropy) == bytes_of(second.entropy));
    CHECK(bytes_of(first.target_logprob) == bytes_of(second.target_logprob));
    CHECK(bytes_of(first.argmax) == bytes_of(second.argmax));
    CHECK(bytes_of(first.correct) == bytes_of(second.correct));
  }
  if (how.gradients()) {
    CHECK(bytes_of(first.dx) == bytes_of(second.dx));
    CHECK(bytes_of(first.dw) == bytes_of(second.dw));
    CHECK(bytes_of(first.db) == bytes_of(second.db));
  }
  CHECK(first.read_status().invalid_targets == second.read_status().invalid_targets);
}

}  // namespace

TEMPLATE_TEST_CASE("robustness: every output of every strategy is bitwise reproducible",
                   "[gpu][robustness][determinism]", float, __half, __nv_bfloat16) {
  const case_spec spec = GENERATE(
      case_spec{300, 256, 4097}.padded(8, 3, 5, 7),
      case_spec{300, 256, 4097}.smoothing(0.1f).weighted().with_z_loss(1e-3f).capped(30.0f).none(),
      case_spec{300, 128, 2000}.shifted(50).with_temperature(0.7f).sum());
  problem_data<TestType> data(spec, fresh_seed());
  data.use_unit_upstream();
  data.compute_reference(false);  // the backward's lse input
  std::vector<std::int64_t> targets = data.h_targets;
  targets[3] = spec.v + 1;  // an invalid target too: its count must be reproducible as well
  data.targets.upload(targets);
  INFO(data.describe());
  gpu_context ctx;
  for (const run_spec& how : all_runs<float>())
    check_bitwise_reproducible<TestType, float>(data, how, ctx);
  if constexpr (!std::is_same_v<TestType, float>) {
    for (const run_spec& how : all_runs<TestType>())
      if (how.gradients()) check_bitwise_reproducible<TestType, TestType>(data, how, ctx);
  }
}
