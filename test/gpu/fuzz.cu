// Seeded fuzz test: random (shape, element type, dW type, options, op, strategy, budget,
// alignment, invalid targets) cases against the fp64 CPU reference.
//
// The seed is printed; LCE_FUZZ_SEED=<n> replays a run, LCE_FUZZ_CASE=<k> runs only case k of
// it, LCE_FUZZ_CASES=<count> changes the number of cases (default 500). Every failure prints
// its case in full (with the replay command) and the run continues; the test fails at the end
// if any case failed.
//
// Tolerances: the standard ones (tolerance.hpp) plus a conditioning term, so that tiny random
// shapes cannot fail by cancellation alone: each output may also miss by κ times its
// magnitude (reference.hpp: dx_mag, dw_mag, db_mag; for the losses Σ (1 + 2|lse| + |loss|)),
// κ = the unit roundoff of dZ's storage type + 2^-14 (fp32 rounding of logits and lse). The
// dedicated tests keep the tight tolerances; here the point is breadth.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "support/runner.cuh"

namespace {

using namespace lce_test;

std::uint64_t env_u64(const char* name, std::uint64_t fallback) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0' ? std::strtoull(value, nullptr, 0) : fallback;
}

std::uint64_t mix(std::uint64_t seed, std::uint64_t k) {
  return harness_detail::splitmix64(seed ^ harness_detail::splitmix64(k + 0x5EEDull));
}

/// One random case.
struct fuzz_case {
  int element = 0;  ///< 0 fp32, 1 fp16, 2 bf16
  bool fp32_grad = true;
  run_spec how;
  case_spec spec{1, 1, 1};
  int invalid = 0;  ///< invalid targets planted
  std::uint64_t data_seed = 0;

  [[nodiscard]] std::string describe() const {
    std::ostringstream os;
    os << (element == 0   ? "fp32"
           : element == 1 ? "fp16"
                          : "bf16")
       << " grad=" << (fp32_grad ? "fp32" : "element") << " " << how.describe() << " "
       << spec.describe() << " scale=" << spec.logit_scale << " invalid_targets=" << invalid
       << " data_seed=" << data_seed;
    return os.str();
  }
};

std::int64_t log_uniform(random_source& rng, std::int64_t lo, std::int64_t hi) {
  const double x = std::exp(
      rng.uniform(std::log(static_cast<double>(lo)), std::log(static_cast<double>(hi) + 1.0)));
  return std::min<std::int64_t>(hi, std::max<std::int64_t>(lo, static_cast<std::int64_t>(x)));
}

fuzz_case draw_case(std::uint64_t case_seed) {
  random_source rng(case_seed);
  fuzz_case c;
  c.element = static_cast<int>(rng.integer(0, 2));
  c.fp32_grad = c.element == 0 || rng.bernoulli(0.5);
  std::int64_t n = log_uniform(rng, 1, 256);
  std::int64_t d = log_uniform(rng, 1, 192);
  std::int64_t v = log_uniform(rng, 1, 2048);
  while (static_cast<double>(n) * static_cast<double>(d) * static_cast<double>(v) > 2e6) {
    if (v > 64)
      v /= 2;
    else if (d > 16)
      d /= 2;
    else
      n /= 2;
  }
  c.spec = case_spec{n, d, v};
  case_spec& s = c.spec;
  s.bias = rng.bernoulli(0.5);
  s.reduction = static_cast<lce::reduction>(rng.integer(0, 2));
  const double ignore_choices[] = {0.0, 0.0, 0.2, 0.5, 1.0};
  s.ignore_fraction = ignore_choices[rng.integer(0, 4)];
  if (rng.bernoulli(0.1)) s.ignore_index = rng.integer(0, v - 1);
  if (rng.bernoulli(0.25)) {
    s.x_pad = rng.integer(0, 9);
    s.w_pad = rng.integer(0, 9);
    s.dx_pad = rng.integer(0, 9);
    s.dw_pad = rng.integer(0, 9);
  }
  const double scales[] = {0.1, 2.0, 2.0, 2.0, 8.0};
  s.logit_scale = scales[rng.integer(0, 4)];
  if (rng.bernoulli(0.3)) s.label_smoothing = static_cast<float>(rng.uniform(0.0, 0.3));
  if (rng.bernoulli(0.2)) s.class_weights = true;
  if (rng.bernoulli(0.2))
    s.z_loss = static_cast<float>(std::exp(rng.uniform(std::log(1e-4), std::log(1e-2))));
  if (rng.bernoulli(0.25)) s.softcap = static_cast<float>(rng.uniform(5.0, 50.0));
  if (rng.bernoulli(0.2)) s.temperature = static_cast<float>(rng.uniform(0.5, 2.0));
  if (rng.bernoulli(0.15)) {  // a sequence length that divides n
    std::vector<std::int64_t> divisors;
    for (std::int64_t t = 1; t <= n; ++t)
      if (n % t == 0) divisors.push_back(t);
    s.shift_seq_len = divisors[static_cast<std::size_t>(
        rng.integer(0, static_cast<std::int64_t>(divisors.size()) - 1))];
  }
  const int op = static_cast<int>(rng.integer(0, 2));
  c.how.op = op == 0 ? op_kind::forward : op == 1 ? op_kind::backward : op_kind::forward_backward;
  const int strategy = static_cast<int>(rng.integer(0, c.fp32_grad ? 2 : 1));
  c.how.strategy = static_cast<lce::backward_strategy>(strategy);
  if (c.how.op == op_kind::forward_backward && rng.bernoulli(0.3))
    c.how.strategy = lce::backward_strategy::stored;
  const std::size_t budgets[] = {lce::backward_options{}.memory_budget, std::size_t{1} << 20,
                                 std::size_t{64} << 10};
  c.how.budget = budgets[rng.integer(0, 2)];
  c.how.misaligned = rng.bernoulli(0.15);
  if (c.how.gradients() && rng.bernoulli(0.15)) s.accumulate = true;
  if (rng.bernoulli(0.1))
    c.invalid = static_cast<int>(rng.integer(1, std::min<std::int64_t>(3, n)));
  c.data_seed = rng.engine()();
  return c;
}

/// Collects the failures of one case as text.
struct verdict {
  std::vector<std::string> failures;
  void check(bool ok, const std::string& what) {
    if (!ok) failures.push_back(what);
  }
};

/// ‖out − ref‖ ≤ tol·‖ref‖ + kappa·‖mag‖ + floor, and every element finite, padding untouched.
template <class T>
void check_vector(verdict& v, const char* name, const T* d_out, std::int64_t rows,
                  std::int64_t cols, std::int64_t ld, const double* d_ref, double tol, double kappa,
                  const std::vector<double>& mag, double floor) {
  const compare_stats s = compare_device(d_out, rows, cols, ld, d_ref);
  double mag_norm = 0.0;
  for (double m : mag) mag_norm += m * m;
  mag_norm = std::sqrt(mag_norm);
  const double abs_err = s.ref_norm > 0.0 ? s.rel * s.ref_norm : s.rel;
  const double allowed = tol * s.ref_norm + kappa * mag_norm + floor;
  std::ostringstream os;
  os << name << ": abs error " << abs_err << " > allowed " << allowed << " (ref norm " << s.ref_norm
     << ", magnitude " << mag_norm << ", nonfinite " << s.nonfinite << ", padding written "
     << s.padding << ")";
  v.check(s.nonfinite == 0 && s.padding == 0 && abs_err <= allowed, os.str());
}

template <class Element, class Grad>
verdict run_case(const fuzz_case& c, gpu_context& ctx) {
  verdict out;
  problem_data<Element> data(c.spec, c.data_seed);
  if (c.how.op == op_kind::forward_backward) data.use_unit_upstream();
  std::vector<std::int64_t> dirty = data.h_targets;
  std::uint64_t expected_invalid = 0;
  if (c.invalid > 0) {
    random_source rng(c.data_seed ^ 0xBADull);
    std::vector<std::int64_t> clean = dirty;
    for (int k = 0; k < c.invalid; ++k) {
      const auto i = static_cast<std::size_t>(rng.integer(0, c.spec.n - 1));
      if (clean[i] == c.spec.ignore_index && dirty[i] != c.spec.ignore_index) continue;  // taken
      dirty[i] = rng.bernoulli(0.5) ? c.spec.v + rng.integer(0, 5) : -1 - rng.integer(0, 5);
      if (dirty[i] == c.spec.ignore_index) dirty[i] = c.spec.v;
      clean[i] = c.spec.ignore_index;
    }
    const std::vector<std::int64_t> eff =
        reference_effective_targets(dirty, c.spec.shift_seq_len, c.spec.ignore_index);
    for (std::int64_t y : eff)
      expected_invalid += (y != c.spec.ignore_index && (y < 0 || y >= c.spec.v)) ? 1 : 0;
    data.h_targets = clean;
  }
  data.magnitudes = true;
  data.compute_reference(c.how.gradients());
  data.targets.upload(dirty);

  run_outputs<Element, Grad> o(data, c.how);
  o.poison();
  if (c.spec.accumulate) {  // accumulate into zeros (valid region), NaN padding untouched
    const lce::problem& s = data.shape;
    fill_normal(o.dx.ptr(), s.n, s.d, s.dx_stride(), 0.0, 1);
    fill_normal(o.dw.ptr(), s.v, s.d, s.dw_stride(), 0.0, 2);
    fill_normal(o.db.ptr(), 1, s.v, s.v, 0.0, 3);
  }
  const cudaError_t code = run_op(data, c.how, ctx, o, nullptr, false);
  out.check(code == cudaSuccess, std::string("launch failed: ") + lce::last_error_message());
  if (code != cudaSuccess) return out;
  out.check(o.read_status().invalid_targets == expected_invalid,
            "status.invalid_targets " + std::to_string(o.read_status().invalid_targets) +
                " != " + std::to_string(expected_invalid));

  const lce::problem& s = data.shape;
  constexpr double kappa_logits = 0x1p-14;
  if (c.how.forward_outputs()) {
    // Magnitude of each row's loss: (1 + 2|lse| + |loss|)·max w + 2·s·lse² for scored rows.
    const std::vector<double> lse = data.ref_lse.download();
    const std::vector<double> tl = data.ref_token_loss.download();
    double w_max = 1.0;
    for (float w : data.h_class_weight) w_max = std::max(w_max, static_cast<double>(w));
    std::vector<double> row_mag(lse.size(), 0.0), lse_mag(lse.size(), 0.0);
    double total = 0.0;
    const std::vector<std::int64_t> eff =
        reference_effective_targets(data.h_targets, c.spec.shift_seq_len, c.spec.ignore_index);
    for (std::size_t i = 0; i < lse.size(); ++i) {
      lse_mag[i] = 1.0 + 2.0 * std::fabs(lse[i]);
      if (eff[i] == c.spec.ignore_index) continue;
      row_mag[i] = lse_mag[i] * w_max + std::fabs(tl[i]) +
                   2.0 * static_cast<double>(c.spec.z_loss) * lse[i] * lse[i];
      total += row_mag[i];
    }
    const double ltol = loss_tolerance<Element>();
    if (c.spec.reduction != lce::reduction::none) {
      const double denom =
          c.spec.reduction == lce::reduction::mean
              ? std::max(std::min(data.ref_ce_denom, static_cast<double>(data.n_valid)), 1e-30)
              : 1.0;
      const double scale =
          c.spec.reduction == lce::reduction::mean ? (data.n_valid > 0 ? 1.0 / denom : 0.0) : 1.0;
      float loss = 0.0f;
      LCE_TEST_CUDA(cudaMemcpy(&loss, o.loss.ptr(), sizeof(float), cudaMemcpyDeviceToHost));
      const double err = std::fabs(static_cast<double>(loss) - data.ref_loss);
      const double allowed = ltol * std::fabs(data.ref_loss) + kappa_logits * total * scale;
      std::ostringstream os;
      os << "loss " << loss << " vs reference " << data.ref_loss << ": error " << err
         << " > allowed " << allowed;
      out.check(std::isfinite(loss) && err <= allowed, os.str());
    }
    check_vector(out, "token_loss", o.token_loss.ptr(), s.n, 1, 1, data.ref_token_loss.data(), ltol,
                 kappa_logits, row_mag, 0.0);
    check_vector(out, "lse", o.lse.ptr(), s.n, 1, 1, data.ref_lse.data(), ltol, kappa_logits,
                 lse_mag, 0.0);
  }
  if (c.how.gradients()) {
    const double gtol = grad_tolerance<Element>();
    const double kappa = unit_roundoff<Element>() + kappa_logits;
    // fp16 outputs of a mean over many rows can be subnormal: 2^-24 absolute per element.
    auto floor = [](std::int64_t count) {
      return std::is_same_v<Element, __half> ? 0x1p-24 * std::sqrt(static_cast<double>(count))
                                             : 0.0;
    };
    check_vector(out, "dx", o.dx.ptr(), s.n, s.d, s.dx_stride(), data.ref_dx.data(), gtol, kappa,
                 data.ref_dx_mag, floor(s.n * s.d));
    check_vector(out, "dw", o.dw.ptr(), s.v, s.d, s.dw_stride(), data.ref_dw.data(), gtol, kappa,
                 data.ref_dw_mag, floor(s.v * s.d));
    check_vector(out, "db", o.db.ptr(), 1, s.v, s.v, data.ref_db.data(), gtol, kappa,
                 data.ref_db_mag, floor(s.v));
  }
  return out;
}

template <class Element>
verdict run_element(const fuzz_case& c, gpu_context& ctx) {
  if (c.fp32_grad) return run_case<Element, float>(c, ctx);
  return run_case<Element, Element>(c, ctx);
}

}  // namespace

TEST_CASE("fuzz: random cases against the fp64 CPU reference", "[gpu][fuzz]") {
  const std::uint64_t seed = env_u64("LCE_FUZZ_SEED", fresh_seed());
  const std::uint64_t cases = env_u64("LCE_FUZZ_CASES", 500);
  const char* only = std::getenv("LCE_FUZZ_CASE");
  const bool single = only != nullptr && *only != '\0';
  const std::uint64_t first = single ? std::strtoull(only, nullptr, 0) : 0;
  const std::uint64_t last = single ? first + 1 : cases;
  std::printf("FUZZ seed=%llu cases=%llu (replay: LCE_FUZZ_SEED=%llu [LCE_FUZZ_CASE=<k>])\n",
              static_cast<unsigned long long>(seed), static_cast<unsigned long long>(last - first),
              static_cast<unsigned long long>(seed));
  std::fflush(stdout);
  gpu_context ctx;
  std::uint64_t failed = 0;
  int counts[3] = {0, 0, 0};
  for (std::uint64_t k = first; k < last; ++k) {
    const fuzz_case c = draw_case(mix(seed, k));
    ++counts[static_cast<int>(c.how.op)];
    verdict v;
    try {
      v = c.element == 0   ? run_element<float>(c, ctx)
          : c.element == 1 ? run_element<__half>(c, ctx)
                           : run_element<__nv_bfloat16>(c, ctx);
    } catch (const std::exception& e) {
      v.failures.push_back(std::string("exception: ") + e.what());
    }
    if (!v.failures.empty()) {
      ++failed;
      std::printf("FUZZ FAIL case=%llu: %s\n  replay: LCE_FUZZ_SEED=%llu LCE_FUZZ_CASE=%llu\n",
                  static_cast<unsigned long long>(k), c.describe().c_str(),
                  static_cast<unsigned long long>(seed), static_cast<unsigned long long>(k));
      for (const std::string& f : v.failures) std::printf("  %s\n", f.c_str());
      std::fflush(stdout);
    }
  }
  std::printf(
      "RESULT op=fuzz seed=%llu cases=%llu forward=%d backward=%d forward_backward=%d "
      "failed=%llu\n",
      static_cast<unsigned long long>(seed), static_cast<unsigned long long>(last - first),
      counts[0], counts[1], counts[2], static_cast<unsigned long long>(failed));
  std::fflush(stdout);
  INFO("seed=" << seed << ": " << failed << " failing cases (FUZZ FAIL lines above)");
  CHECK(failed == 0);
}
