// GPU tests of the loss options (label smoothing, class weights, ignore_index, z-loss, softcap,
// temperature, causal shift, accumulate) and of the extra outputs (z_loss, token_z_loss, argmax,
// correct, entropy, target_logprob), for forward, backward and forward_backward with every
// strategy, against the fp64 references (CPU for the small shapes, GPU otherwise).
//
// Test names: "options small: ..." (tag [small], tiny shapes: the compute-sanitizer subset),
// "options medium: ..." (300×1000×4097), "options large: ..." (1030×2304×50257, tag [large])
// and "options: the GPU reference ..." (tag [reference]). Every run prints a RESULT line with
// op=, dtype=, grad=, shape=, strategy=, reduction=, options= and the errors of each output.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "support/harness.cuh"
#include "support/runner.cuh"

namespace {

using namespace lce_test;

// ---------------------------------------------------------------------------------------------
// Cases.

/// The named option combinations, on a base shape whose n is a multiple of `seq_len`.
std::vector<case_spec> combinations(const case_spec& base, std::int64_t seq_len,
                                    lce::reduction single_reduction) {
  const case_spec b = base.with_reduction(single_reduction);
  return {
      b.smoothing(0.1f),
      b.weighted(),
      b.with_z_loss(1e-2f),
      b.capped(3.0f),
      b.with_temperature(0.7f),
      b.with_temperature(2.5f).sum(),
      b.shifted(seq_len),
      b.ignore_id(2).ignoring(0.3),
      // The combination of the brief: smoothing + weights + ignore_index + z-loss + softcap,
      // per-token losses.
      base.smoothing(0.1f).weighted().ignore_id(2).with_z_loss(1e-2f).capped(3.0f).none(),
      // Everything at once, reduced.
      base.smoothing(0.2f)
          .weighted()
          .with_z_loss(1e-3f)
          .capped(5.0f)
          .with_temperature(1.5f)
          .shifted(seq_len),
      base.smoothing(0.05f)
          .with_z_loss(1e-4f)
          .capped(30.0f)
          .with_temperature(0.8f)
          .shifted(seq_len)
          .sum(),
      // accumulate: plain and with every option.
      b.accumulating(),
      base.smoothing(0.1f)
          .weighted()
          .with_z_loss(1e-2f)
          .capped(3.0f)
          .shifted(seq_len)
          .none()
          .accumulating(),
  };
}

const std::vector<case_spec>& small_cases() {
  static const std::vector<case_spec> cases = [] {
    std::vector<case_spec> out;
    for (const case_spec& c :
         combinations(case_spec{7, 72, 127}.padded(8, 3, 5, 7), 7, lce::reduction::mean))
      out.push_back(c);
    for (const case_spec& c : combinations(case_spec{64, 16, 3}.no_bias(), 16, lce::reduction::sum))
      out.push_back(c);
    return out;
  }();
  return cases;
}

const std::vector<case_spec>& medium_cases() {
  static const std::vector<case_spec> cases =
      combinations(case_spec{300, 1000, 4097}.padded(8, 3, 5, 7), 75, lce::reduction::none);
  return cases;
}

const std::vector<case_spec>& large_cases() {
  static const std::vector<case_spec> cases{
      case_spec{1030, 2304, 50257}
          .smoothing(0.1f)
          .weighted()
          .ignore_id(2)
          .with_z_loss(1e-2f)
          .capped(5.0f)
          .none(),
      case_spec{1030, 2304, 50257}
          .no_bias()
          .smoothing(0.1f)
          .with_z_loss(1e-4f)
          .with_temperature(0.7f)
          .capped(30.0f)
          .shifted(103),
      case_spec{1030, 2304, 50257}.weighted().capped(30.0f).shifted(103).sum().accumulating(),
  };
  return cases;
}

// ---------------------------------------------------------------------------------------------
// Outputs and their checks.

/// Every output of the options, poisoned before each run (0xFF bytes: NaN, or −1 for int64).
template <class Element, class Grad>
struct option_outputs {
  device_buffer<float> loss{1}, z_loss{1};
  device_buffer<std::int64_t> correct{1};
  device_buffer<float> token_loss, lse, token_z_loss, entropy, target_logprob;
  device_buffer<std::int64_t> argmax;
  device_buffer<Element> dx;
  device_buffer<Grad> dw, db;

  option_outputs(const lce::problem& s, bool gradients)
      : token_loss(static_cast<std::size_t>(s.n)),
        lse(static_cast<std::size_t>(s.n)),
        token_z_loss(static_cast<std::size_t>(s.n)),
        entropy(static_cast<std::size_t>(s.n)),
        target_logprob(static_cast<std::size_t>(s.n)),
        argmax(static_cast<std::size_t>(s.n)) {
    if (gradients) {
      dx = device_buffer<Element>(static_cast<std::size_t>(s.n * s.dx_stride()));
      dw = device_buffer<Grad>(static_cast<std::size_t>(s.v * s.dw_stride()));
      db = device_buffer<Grad>(static_cast<std::size_t>(s.v));
    }
  }
  void poison() {
    for (auto* b : {&loss, &z_loss, &token_loss, &lse, &token_z_loss, &entropy, &target_logprob})
      b->poison();
    correct.poison();
    argmax.poison();
    dx.poison();
    dw.poison();
    db.poison();
  }
};

/// Errors of one run (negative: not measured).
struct option_errors {
  double loss = -1, z_loss = -1, lse = -1, token_loss = -1, token_z_loss = -1, entropy = -1,
         target_logprob = -1, dx = -1, dw = -1, db = -1;
  long long argmax_mismatch = -1;  ///< rows whose argmax differs from the reference's
  long long correct = -1;          ///< the library's count
  long long ref_correct = -1;
};

template <class Element, class Grad = Element>
void print_options_result(const char* op, const case_spec& spec, const char* strategy,
                          const option_errors& m) {
  auto count = [](long long c) { return c < 0 ? std::string("-") : std::to_string(c); };
  std::printf(
      "RESULT op=%s dtype=%s grad=%s shape=%s strategy=%s reduction=%s bias=%d ignore=%g"
      " options=%s"
      " loss=%s z_loss=%s lse=%s token_loss=%s token_z_loss=%s entropy=%s target_logprob=%s"
      " argmax_mismatch=%s correct=%s/%s dx=%s dw=%s db=%s\n",
      op, element_name<Element>(), element_name<Grad>(), spec.shape_string().c_str(), strategy,
      reduction_name(spec.reduction), spec.bias ? 1 : 0, spec.ignore_fraction,
      spec.options_string().c_str(), format_error(m.loss).c_str(), format_error(m.z_loss).c_str(),
      format_error(m.lse).c_str(), format_error(m.token_loss).c_str(),
      format_error(m.token_z_loss).c_str(), format_error(m.entropy).c_str(),
      format_error(m.target_logprob).c_str(), count(m.argmax_mismatch).c_str(),
      count(m.correct).c_str(), count(m.ref_correct).c_str(), format_error(m.dx).c_str(),
      format_error(m.dw).c_str(), format_error(m.db).c_str());
  std::fflush(stdout);
}

/// The transformed logit z_ik in fp64 from the device inputs (for argmax near-ties).
template <class Element>
double reference_logit(const problem_data<Element>& data, std::int64_t i, std::int64_t k) {
  const lce::problem& s = data.shape;
  std::vector<Element> xr(static_cast<std::size_t>(s.d));
  std::vector<Element> wr(static_cast<std::size_t>(s.d));
  LCE_TEST_CUDA(cudaMemcpy(xr.data(), data.x.data() + i * s.x_stride(), xr.size() * sizeof(Element),
                           cudaMemcpyDeviceToHost));
  LCE_TEST_CUDA(cudaMemcpy(wr.data(), data.w.data() + k * s.w_stride(), wr.size() * sizeof(Element),
                           cudaMemcpyDeviceToHost));
  double acc = 0.0;
  for (std::size_t j = 0; j < xr.size(); ++j) acc += to_double(xr[j]) * to_double(wr[j]);
  if (data.spec.bias) {
    Element b;
    LCE_TEST_CUDA(cudaMemcpy(&b, data.bias.data() + k, sizeof(Element), cudaMemcpyDeviceToHost));
    acc += to_double(b);
  }
  return detail::transform_logit(acc, reference_options_of(data.options));
}

/// Argmax read back against the reference: exact, except where the library's pick is within
/// 1e-3 (relative) of the reference maximum, a near-tie that fp32 logits may resolve either
/// way. `correct` must be the count of valid rows whose read-back argmax is the target (and
/// within the number of differing rows of the reference's count). Returns the number of rows
/// that differ from the reference (near-ties included).
template <class Element>
long long check_argmax_and_correct(const problem_data<Element>& data, const std::int64_t* d_argmax,
                                   const std::int64_t* d_correct, long long* correct_out) {
  const std::int64_t n = data.shape.n;
  std::vector<std::int64_t> argmax(static_cast<std::size_t>(n));
  LCE_TEST_CUDA(cudaDeviceSynchronize());
  LCE_TEST_CUDA(cudaMemcpy(argmax.data(), d_argmax, argmax.size() * sizeof(std::int64_t),
                           cudaMemcpyDeviceToHost));
  long long mismatches = 0;
  long long far = 0;
  std::int64_t expected_correct = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const auto r = static_cast<std::size_t>(i);
    const std::int64_t got = argmax[r];
    const std::int64_t want = data.ref_argmax[r];
    const std::int64_t y = data.h_effective_targets[r];
    if (y != data.spec.ignore_index && got == y) ++expected_correct;
    if (got == want) continue;
    ++mismatches;
    if (got < 0 || got >= data.shape.v) {
      ++far;
      UNSCOPED_INFO("row " << i << ": argmax " << got << " outside [0, v)");
      continue;
    }
    const double z_max = data.ref_max_logit[r];
    const double z_got = reference_logit(data, i, got);
    const double gap = z_max - z_got;
    if (!(gap <= 1e-3 * std::max(1.0, std::fabs(z_max)))) {
      ++far;
      UNSCOPED_INFO("row " << i << ": argmax " << got << " (z=" << z_got << "), reference " << want
                           << " (z=" << z_max << ")");
    }
  }
  CHECK(far == 0);
  if (d_correct != nullptr) {
    std::int64_t correct = -2;
    LCE_TEST_CUDA(cudaMemcpy(&correct, d_correct, sizeof(correct), cudaMemcpyDeviceToHost));
    INFO("correct=" << correct << " from the argmax read back=" << expected_correct
                    << " reference=" << data.ref_correct << " argmax mismatches=" << mismatches);
    CHECK(correct == expected_correct);
    CHECK(std::llabs(correct - data.ref_correct) <= mismatches);
    *correct_out = correct;
  }
  return mismatches;
}

/// Which forward outputs a run asks for.
enum class forward_outputs { all, minimal };

/// Checks the forward outputs a run asked for. The minimal set (loss, z_loss, correct; the
/// token losses for reduction none) has no argmax to read back: its `correct` must equal
/// `full_correct`, the count of a run with every output (the same kernels).
template <class Element, class Grad>
void check_forward_outputs(const problem_data<Element>& data, option_outputs<Element, Grad>& out,
                           forward_outputs which, option_errors& m, long long full_correct = -1) {
  const double tol = loss_tolerance<Element>();
  const std::int64_t n = data.shape.n;
  const bool reduced = data.spec.reduction != lce::reduction::none;
  if (reduced) {
    {
      INFO("loss");
      m.loss = check_loss(out.loss.data(), data.ref_loss, tol);
    }
    {
      INFO("z_loss");
      m.z_loss = check_loss(out.z_loss.data(), data.ref_z_loss, tol);
    }
  }
  if (which == forward_outputs::all || !reduced)
    m.token_loss =
        check_output("token_loss", out.token_loss.data(), n, 1, 1, data.ref_token_loss.data(), tol);
  if (which == forward_outputs::all) {
    m.lse =
        check_output("lse", out.lse.data(), n, 1, 1, data.ref_lse.data(), tol, lse_norm_floor(n));
    m.token_z_loss = check_output("token_z_loss", out.token_z_loss.data(), n, 1, 1,
                                  data.ref_token_z_loss.data(), tol);
    m.entropy = check_output("entropy", out.entropy.data(), n, 1, 1, data.ref_entropy.data(), tol);
    m.target_logprob = check_output("target_logprob", out.target_logprob.data(), n, 1, 1,
                                    data.ref_target_logprob.data(), tol);
  }
  m.ref_correct = data.ref_correct;
  if (which == forward_outputs::all) {
    m.argmax_mismatch =
        check_argmax_and_correct(data, out.argmax.data(), out.correct.data(), &m.correct);
  } else {
    std::int64_t correct = -2;
    LCE_TEST_CUDA(
        cudaMemcpy(&correct, out.correct.data(), sizeof(correct), cudaMemcpyDeviceToHost));
    INFO("correct (minimal outputs)=" << correct << " with every output=" << full_correct);
    CHECK(correct == full_correct);
    m.correct = correct;
  }
}

// ---------------------------------------------------------------------------------------------
// accumulate: the gradient buffers are pre-filled with random values, the result must be the
// prefill plus the gradient.

__global__ void add_dense_kernel(const double* a, const double* b, double* out,
                                 std::int64_t count) {
  for (std::int64_t e = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < count;
       e += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    out[e] = a[e] + b[e];
}

/// The prefill of one gradient buffer (dense fp64 copy of what it holds before the call).
struct prefill {
  device_buffer<double> dx, dw, db;
};

/// Fills a [rows, ld] gradient buffer with N(0, rms of the reference gradient) (NaN bytes in
/// the padding) and returns its dense fp64 copy.
template <class T>
device_buffer<double> fill_like(T* d_out, std::int64_t rows, std::int64_t cols, std::int64_t ld,
                                const double* d_ref, std::uint64_t seed) {
  const compare_stats r = compare_device(d_ref, rows, cols, cols, d_ref);
  double rms = r.ref_norm / std::sqrt(static_cast<double>(rows * cols));
  if (!(rms > 0.0)) rms = 1.0;
  fill_normal(d_out, rows, cols, ld, rms, seed);
  return gpu_to_dense_double(d_out, rows, cols, ld);
}

template <class Element, class Grad>
prefill fill_gradients(const problem_data<Element>& data, option_outputs<Element, Grad>& out,
                       std::uint64_t seed) {
  const lce::problem& s = data.shape;
  prefill p;
  p.dx = fill_like(out.dx.data(), s.n, s.d, s.dx_stride(), data.ref_dx.data(), seed);
  p.dw = fill_like(out.dw.data(), s.v, s.d, s.dw_stride(), data.ref_dw.data(), seed + 1);
  p.db = fill_like(out.db.data(), 1, s.v, s.v, data.ref_db.data(), seed + 2);
  return p;
}

/// ‖out − (base + ref)‖ / ‖ref‖ (the error of the gradient itself, not of the sum), with the
/// usual finiteness and padding checks.
template <class T>
double check_accumulated(const char* name, const T* d_out, std::int64_t rows, std::int64_t cols,
                         std::int64_t ld, const device_buffer<double>& base, const double* d_ref,
                         double tolerance) {
  const std::int64_t count = rows * cols;
  device_buffer<double> expected(static_cast<std::size_t>(count));
  add_dense_kernel<<<gpu_ref::grid_for(count, 256), 256>>>(base.data(), d_ref, expected.data(),
                                                           count);
  LCE_TEST_CUDA(cudaGetLastError());
  const compare_stats s = compare_device(d_out, rows, cols, ld, expected.data());
  const double ref_norm = compare_device(d_ref, rows, cols, cols, d_ref).ref_norm;
  const double abs_err = s.ref_norm > 0.0 ? s.rel * s.ref_norm : s.rel;
  const double err = ref_norm > 0.0 ? abs_err / ref_norm : abs_err;
  INFO(name << " (accumulated): rel to the gradient=" << err << " max_abs=" << s.max_abs
            << " gradient_norm=" << ref_norm << " nonfinite=" << s.nonfinite
            << " padding_written=" << s.padding << " tolerance=" << tolerance);
  CHECK(s.nonfinite == 0);
  CHECK(s.padding == 0);
  CHECK(err <= tolerance);
  return err;
}

template <class Element, class Grad>
void check_gradients(const problem_data<Element>& data, option_outputs<Element, Grad>& out,
                     const prefill* base, option_errors& m) {
  const double tol = grad_tolerance<Element>();
  const lce::problem& s = data.shape;
  if (base != nullptr) {
    m.dx = check_accumulated("dx", out.dx.data(), s.n, s.d, s.dx_stride(), base->dx,
                             data.ref_dx.data(), tol);
    m.dw = check_accumulated("dw", out.dw.data(), s.v, s.d, s.dw_stride(), base->dw,
                             data.ref_dw.data(), tol);
    m.db = check_accumulated("db", out.db.data(), 1, s.v, s.v, base->db, data.ref_db.data(),
                             db_tolerance(data));
    return;
  }
  m.dx = check_output("dx", out.dx.data(), s.n, s.d, s.dx_stride(), data.ref_dx.data(), tol);
  m.dw = check_output("dw", out.dw.data(), s.v, s.d, s.dw_stride(), data.ref_dw.data(), tol);
  m.db = check_output("db", out.db.data(), 1, s.v, s.v, data.ref_db.data(), db_tolerance(data));
}

// ---------------------------------------------------------------------------------------------
// Runs.

struct variant {
  lce::backward_strategy strategy;
  std::size_t budget;
  std::string label;
};

constexpr std::size_t small_budget = std::size_t{1} << 20;  // forces several chunks

/// vocab_chunked for Grad = Element, row_chunked for Grad = float; each also with a small
/// budget when `with_small_budget`.
template <class Element, class Grad>
std::vector<variant> variants(bool with_small_budget) {
  const std::size_t budget = lce::backward_options{}.memory_budget;
  std::vector<variant> out;
  if constexpr (std::is_same_v<Grad, float>) {
    out.push_back({lce::backward_strategy::row_chunked, budget, "row_chunked"});
    if (with_small_budget)
      out.push_back({lce::backward_strategy::row_chunked, small_budget, "row_chunked/1MiB"});
  } else {
    out.push_back({lce::backward_strategy::vocab_chunked, budget, "vocab_chunked"});
    if (with_small_budget)
      out.push_back({lce::backward_strategy::vocab_chunked, small_budget, "vocab_chunked/1MiB"});
  }
  return out;
}

lce::backward_options options_of(const variant& how) {
  lce::backward_options bopt;
  bopt.strategy = how.strategy;
  bopt.memory_budget = how.budget;
  return bopt;
}

/// Runs the forward with every output (`all`) or the minimal set; returns `correct`.
template <class Element>
long long run_forward(const problem_data<Element>& data, gpu_context& ctx, forward_outputs which,
                      long long full_correct = -1) {
  INFO("forward, outputs=" << (which == forward_outputs::all ? "all" : "minimal"));
  option_outputs<Element, Element> out(data.shape, false);
  const bool reduced = data.spec.reduction != lce::reduction::none;
  const bool all = which == forward_outputs::all;
  lce::forward_args<Element> args;
  args.x = data.x.data();
  args.w = data.w.data();
  args.bias = data.bias_pointer();
  args.targets = data.targets.data();
  args.class_weight = data.class_weight_pointer();
  args.loss = reduced ? out.loss.data() : nullptr;
  args.z_loss = reduced ? out.z_loss.data() : nullptr;
  args.correct = out.correct.data();
  args.token_loss = all || !reduced ? out.token_loss.data() : nullptr;
  if (all) {
    args.lse = out.lse.data();
    args.token_z_loss = out.token_z_loss.data();
    args.argmax = out.argmax.data();
    args.entropy = out.entropy.data();
    args.target_logprob = out.target_logprob.data();
  }
  std::size_t bytes = 0;
  LCE_TEST_REQUIRE_OK(lce::forward<Element>(nullptr, bytes, args, data.shape, data.options));
  void* ws = ctx.workspace(bytes);
  out.poison();
  LCE_TEST_REQUIRE_OK(
      lce::forward<Element>(ws, bytes, args, data.shape, data.options, ctx.stream()));
  ctx.synchronize();
  LCE_TEST_CUDA(cudaGetLastError());
  option_errors m;
  check_forward_outputs(data, out, which, m, full_correct);
  if (all) print_options_result<Element>("forward", data.spec, "-", m);
  return m.correct;
}

/// The reference lse rounded to fp32: what a forward hands to the backward.
template <class Element>
device_buffer<float> reference_lse(const problem_data<Element>& data) {
  const std::vector<double> lse = data.ref_lse.download();
  return device_buffer<float>(std::vector<float>(lse.begin(), lse.end()));
}

template <class Element, class Grad>
void run_backward(const problem_data<Element>& data, gpu_context& ctx, const variant& how) {
  INFO("backward, strategy=" << how.label << " grad=" << element_name<Grad>());
  option_outputs<Element, Grad> out(data.shape, true);
  const device_buffer<float> lse = reference_lse(data);
  lce::backward_args<Element, Grad> args;
  args.x = data.x.data();
  args.w = data.w.data();
  args.bias = data.bias_pointer();
  args.targets = data.targets.data();
  args.lse = lse.data();
  args.grad = data.grad_pointer();
  args.dx = out.dx.data();
  args.dw = out.dw.data();
  args.db = out.db.data();
  args.class_weight = data.class_weight_pointer();
  const lce::backward_options bopt = options_of(how);
  std::size_t bytes = 0;
  LCE_TEST_REQUIRE_OK(
      lce::backward(nullptr, bytes, args, data.shape, data.options, bopt, ctx.handle()));
  void* ws = ctx.workspace(bytes);
  out.poison();
  prefill base;
  if (data.options.accumulate) base = fill_gradients(data, out, data.seed ^ 0xacc);
  LCE_TEST_REQUIRE_OK(
      lce::backward(ws, bytes, args, data.shape, data.options, bopt, ctx.handle(), ctx.stream()));
  ctx.synchronize();
  LCE_TEST_CUDA(cudaGetLastError());
  option_errors m;
  check_gradients(data, out, data.options.accumulate ? &base : nullptr, m);
  print_options_result<Element, Grad>("backward", data.spec, how.label.c_str(), m);
}

/// forward_backward needs the reference of the unit upstream gradient.
template <class Element, class Grad>
void run_forward_backward(const problem_data<Element>& data, gpu_context& ctx, const variant& how) {
  INFO("forward_backward, strategy=" << how.label << " grad=" << element_name<Grad>());
  REQUIRE(data.upstream.empty());
  option_outputs<Element, Grad> out(data.shape, true);
  const bool reduced = data.spec.reduction != lce::reduction::none;
  lce::forward_backward_args<Element, Grad> args;
  args.x = data.x.data();
  args.w = data.w.data();
  args.bias = data.bias_pointer();
  args.targets = data.targets.data();
  args.class_weight = data.class_weight_pointer();
  args.loss = reduced ? out.loss.data() : nullptr;
  args.z_loss = reduced ? out.z_loss.data() : nullptr;
  args.correct = out.correct.data();
  args.token_loss = out.token_loss.data();
  args.lse = out.lse.data();
  args.token_z_loss = out.token_z_loss.data();
  args.argmax = out.argmax.data();
  args.entropy = out.entropy.data();
  args.target_logprob = out.target_logprob.data();
  args.dx = out.dx.data();
  args.dw = out.dw.data();
  args.db = out.db.data();
  const lce::backward_options bopt = options_of(how);
  std::size_t bytes = 0;
  LCE_TEST_REQUIRE_OK(
      lce::forward_backward(nullptr, bytes, args, data.shape, data.options, bopt, ctx.handle()));
  void* ws = ctx.workspace(bytes);
  out.poison();
  prefill base;
  if (data.options.accumulate) base = fill_gradients(data, out, data.seed ^ 0xfb);
  LCE_TEST_REQUIRE_OK(lce::forward_backward(ws, bytes, args, data.shape, data.options, bopt,
                                            ctx.handle(), ctx.stream()));
  ctx.synchronize();
  LCE_TEST_CUDA(cudaGetLastError());
  option_errors m;
  check_forward_outputs(data, out, forward_outputs::all, m);
  check_gradients(data, out, data.options.accumulate ? &base : nullptr, m);
  print_options_result<Element, Grad>("forward_backward", data.spec, how.label.c_str(), m);
}

/// Forward (all outputs and the minimal set), backward with a random upstream gradient (the
/// harness's: fp16 with mean gets a loss scale), then forward_backward (upstream 1), with every
/// strategy.
template <class Element>
void run_case(const case_spec& spec, bool with_small_budget) {
  problem_data<Element> data(spec, fresh_seed());
  data.compute_reference(true);
  INFO(data.describe());
  gpu_context ctx;
  const long long correct = run_forward(data, ctx, forward_outputs::all);
  (void)run_forward(data, ctx, forward_outputs::minimal, correct);
  for (const variant& how : variants<Element, Element>(with_small_budget))
    run_backward<Element, Element>(data, ctx, how);
  for (const variant& how : variants<Element, float>(with_small_budget))
    run_backward<Element, float>(data, ctx, how);
  data.use_unit_upstream();
  data.compute_reference(true);
  for (const variant& how : variants<Element, Element>(with_small_budget))
    run_forward_backward<Element, Element>(data, ctx, how);
  for (const variant& how : variants<Element, float>(with_small_budget))
    run_forward_backward<Element, float>(data, ctx, how);
  // stored in row chunks of about half the rows (16-bit inputs on sm_90a; elsewhere, and with
  // a bias or class weights, its fallback): a 16-bit dW also gets room for its fp32
  // accumulators.
  const lce::problem& s = data.shape;
  const std::size_t half_rows =
      static_cast<std::size_t>((s.n + 1) / 2) * static_cast<std::size_t>((s.v + 7) / 8 * 8) * 2;
  const std::size_t accumulators =
      static_cast<std::size_t>(s.v) * static_cast<std::size_t>(s.d + 1) * 4 + 1024;
  run_forward_backward<Element, Element>(
      data, ctx, variant{lce::backward_strategy::stored, half_rows + accumulators, "stored/rows"});
  run_forward_backward<Element, float>(
      data, ctx, variant{lce::backward_strategy::stored, half_rows, "stored/rows"});
}

}  // namespace

TEMPLATE_TEST_CASE("options small: every option and output against the fp64 CPU reference",
                   "[gpu][options][small]", float, __half, __nv_bfloat16) {
  const case_spec spec = GENERATE(from_range(small_cases()));
  REQUIRE(spec.nvd() <= cpu_reference_limit);
  run_case<TestType>(spec, true);
}

TEMPLATE_TEST_CASE("options medium: every option and output on 300x1000x4097",
                   "[gpu][options][medium]", float, __half, __nv_bfloat16) {
  const case_spec spec = GENERATE(from_range(medium_cases()));
  run_case<TestType>(spec, true);
}

TEMPLATE_TEST_CASE("options large: combined options against the fp64 GPU reference",
                   "[gpu][options][large]", float, __half, __nv_bfloat16) {
  const case_spec spec = GENERATE(from_range(large_cases()));
  REQUIRE(spec.nvd() > cpu_reference_limit);
  run_case<TestType>(spec, false);
}

TEMPLATE_TEST_CASE("options small: an all-ignored batch gives zeros, never NaN",
                   "[gpu][options][small]", float, __half, __nv_bfloat16) {
  // Every row ignored (or shifted away): loss, z_loss, correct 0 and zero gradients, with
  // smoothing, weights and z-loss on (whose terms would otherwise be non-zero everywhere).
  const bool shifted = GENERATE(false, true);
  const auto red = GENERATE(lce::reduction::mean, lce::reduction::sum, lce::reduction::none);
  case_spec spec = case_spec{64, 72, 127}
                       .with_reduction(red)
                       .smoothing(0.1f)
                       .weighted()
                       .with_z_loss(1e-2f)
                       .capped(3.0f);
  spec = shifted ? spec.shifted(1).ignoring(0.0) : spec.ignoring(1.0);
  problem_data<TestType> data(spec, fresh_seed());
  data.use_unit_upstream();
  data.compute_reference(true);
  INFO(data.describe());
  REQUIRE(data.n_valid == 0);
  gpu_context ctx;
  CHECK(run_forward(data, ctx, forward_outputs::all) == 0);
  for (const variant& how : variants<TestType, TestType>(false)) {
    run_backward<TestType, TestType>(data, ctx, how);
    run_forward_backward<TestType, TestType>(data, ctx, how);
  }
  for (const variant& how : variants<TestType, float>(false)) {
    run_backward<TestType, float>(data, ctx, how);
    run_forward_backward<TestType, float>(data, ctx, how);
  }
}

TEMPLATE_TEST_CASE("options: the GPU reference matches the CPU reference with every option",
                   "[gpu][options][reference][small]", float, __half, __nv_bfloat16) {
  const case_spec spec =
      GENERATE(case_spec{7, 16, 3}.smoothing(0.2f).weighted().with_z_loss(0.05f).sum(),
               case_spec{65, 130, 257}
                   .padded(8, 3, 0, 0)
                   .smoothing(0.1f)
                   .weighted()
                   .ignore_id(2)
                   .with_z_loss(1e-2f)
                   .capped(3.0f)
                   .none(),
               case_spec{300, 100, 1000}
                   .smoothing(0.2f)
                   .weighted()
                   .with_z_loss(1e-3f)
                   .capped(5.0f)
                   .with_temperature(1.5f)
                   .shifted(75),
               case_spec{130, 72, 1000}.with_temperature(0.7f).shifted(13).scaled(20.0).sum());
  problem_data<TestType> data(spec, fresh_seed());
  INFO(data.describe());
  data.compute_reference(true);
  REQUIRE_FALSE(data.reference_on_gpu);
  const double loss = data.ref_loss;
  const double z_loss = data.ref_z_loss;
  const std::int64_t correct = data.ref_correct;
  const std::vector<std::int64_t> argmax = data.ref_argmax;
  const std::vector<double> max_logit = data.ref_max_logit;
  const auto take = [](const device_buffer<double>& b) { return b.download(); };
  const std::vector<std::vector<double>> cpu{take(data.ref_lse),
                                             take(data.ref_token_loss),
                                             take(data.ref_token_z_loss),
                                             take(data.ref_entropy),
                                             take(data.ref_target_logprob),
                                             take(data.ref_dx),
                                             take(data.ref_dw),
                                             take(data.ref_db)};

  data.compute_reference(true, true);
  REQUIRE(data.reference_on_gpu);
  const std::vector<std::vector<double>> gpu{take(data.ref_lse),
                                             take(data.ref_token_loss),
                                             take(data.ref_token_z_loss),
                                             take(data.ref_entropy),
                                             take(data.ref_target_logprob),
                                             take(data.ref_dx),
                                             take(data.ref_dw),
                                             take(data.ref_db)};
  const char* names[] = {"lse", "token_loss", "token_z_loss", "entropy", "target_logprob", "dx",
                         "dw",  "db"};
  CHECK(rel_error(data.ref_loss, loss) <= reference_tolerance);
  CHECK(rel_error(data.ref_z_loss, z_loss) <= reference_tolerance);
  CHECK(data.ref_correct == correct);
  CHECK(data.ref_argmax == argmax);
  CHECK(rel_frobenius(data.ref_max_logit, max_logit) <= reference_tolerance);
  for (std::size_t k = 0; k < cpu.size(); ++k) {
    CAPTURE(names[k]);
    CHECK(all_finite(gpu[k]));
    CHECK(rel_frobenius(gpu[k], cpu[k]) <= reference_tolerance);
  }
}

TEMPLATE_TEST_CASE("options: gradient filtering (filter_eps) matches the filtered fp64 reference",
                   "[gpu][options][filter]", float, __half, __nv_bfloat16) {
  // Each kernel that forms dZ: the sm_90a lean epilogue (no bias: with and without softcap),
  // its general one (bias; class weights with smoothing), and the dZ kernel after a cuBLAS
  // recompute (fp32, sm_80 builds, the one-pass row_chunked forward_backward).
  const case_spec spec = GENERATE(
      case_spec{64, 64, 300}.filtered(1e-3f), case_spec{129, 72, 1000}.no_bias().filtered(1e-3f),
      case_spec{300, 136, 4097}.no_bias().capped(30.0f).scaled(6.0).filtered(0x1p-12f),
      case_spec{200, 520, 3001}.weighted().smoothing(0.1f).with_z_loss(1e-3f).filtered(1e-3f));
  const std::uint64_t seed = fresh_seed();
  problem_data<TestType> data(spec, seed);
  data.use_unit_upstream();
  data.compute_reference(true);
  // A p within 0.1% of eps may be rounded across it on the device (fp32 logits carry ~1e-6
  // relative error, 16-bit recomputes the same) and flip one entry between kept and 0, which
  // alone exceeds the fp32 tolerance: such rows are ignored here, in both references.
  REQUIRE_FALSE(data.reference_on_gpu);
  const std::vector<std::int64_t> boundary = data.ref_filter_boundary_rows;
  CAPTURE(boundary.size());
  if (!boundary.empty()) {
    data.ignore_rows(boundary);
    data.compute_reference(true);
  }
  INFO(data.describe());
  // The filter must change the gradient here (else this test would not test it): the same
  // data's exact reference differs.
  case_spec exact_spec = spec;
  exact_spec.filter_eps = 0.0f;
  problem_data<TestType> exact(exact_spec, seed);
  exact.use_unit_upstream();
  if (!boundary.empty()) exact.ignore_rows(boundary);
  exact.compute_reference(true);
  const std::vector<double> filtered_dw = data.ref_dw.download(),
                            exact_dw = exact.ref_dw.download();
  double diff = 0.0, norm = 0.0;
  for (std::size_t i = 0; i < exact_dw.size(); ++i) {
    diff += (filtered_dw[i] - exact_dw[i]) * (filtered_dw[i] - exact_dw[i]);
    norm += exact_dw[i] * exact_dw[i];
  }
  const double filter_effect = std::sqrt(diff / norm);
  CAPTURE(filter_effect);
  CHECK(filter_effect > 0.0);
  std::printf("RESULT op=filter dtype=%s shape=%lldx%lldx%lld eps=%g dw_change_vs_exact=%.3g\n",
              element_name<TestType>(), static_cast<long long>(spec.n),
              static_cast<long long>(spec.d), static_cast<long long>(spec.v),
              static_cast<double>(spec.filter_eps), filter_effect);

  gpu_context ctx;
  check_all_runs(data, ctx);
}
