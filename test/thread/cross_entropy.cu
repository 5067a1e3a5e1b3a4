// CPU tests of thread/cross_entropy.cuh: per-token loss, per-row gradient scale and the logit
// gradient, the loss options (logit transform, smoothing, class weights, z-loss, causal shift),
// against the same formulas in double and finite differences.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <lce/thread/cross_entropy.cuh>
#include <lce/thread/online_lse.cuh>
#include <lce/thread/row_stats.cuh>
#include <limits>
#include <vector>

#include "support/device_buffer.hpp"
#include "support/formulas.hpp"

namespace {
using lce::reduction;
using lce::thread::in_vocabulary;
using lce::thread::is_valid_target;
using lce_test::logit_grad;
using lce_test::row_grad_scale;
using lce_test::token_loss;
}  // namespace

TEST_CASE("is_valid_target and in_vocabulary", "[thread][cross_entropy]") {
  CHECK(is_valid_target(0, -100));
  CHECK_FALSE(is_valid_target(-100, -100));
  CHECK_FALSE(is_valid_target(7, 7));  // ignore_index may be a vocabulary id (PyTorch allows it)
  CHECK(in_vocabulary(0, 1));
  CHECK_FALSE(in_vocabulary(1, 1));
  CHECK_FALSE(in_vocabulary(-1, 5));
  CHECK(in_vocabulary(128255, 128256));
  CHECK_FALSE(in_vocabulary(std::int64_t{1} << 40, 128256));
}

TEST_CASE("token_loss: valid, ignored and out-of-range targets", "[thread][cross_entropy]") {
  SECTION("valid target: lse - z_y") {
    CHECK(token_loss(5.0f, 3.0f, 2, 10, -100) == 2.0f);
    CHECK(token_loss(5.0f, 5.0f, 0, 1, -100) == 0.0f);  // V = 1: exactly 0
  }
  SECTION("ignored rows give exactly 0, whatever lse and z hold") {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    CHECK(token_loss(5.0f, 3.0f, -100, 10, -100) == 0.0f);
    CHECK(token_loss(nan, nan, -100, 10, -100) == 0.0f);
    CHECK(token_loss(5.0f, 3.0f, 3, 10, 3) == 0.0f);  // ignore_index inside the vocabulary
  }
  SECTION("a target outside [0, v) that is not ignore_index is treated as ignored") {
    CHECK(token_loss(5.0f, 3.0f, 10, 10, -100) == 0.0f);
    CHECK(token_loss(5.0f, 3.0f, -1, 10, -100) == 0.0f);
    CHECK(token_loss(5.0f, 3.0f, -100, 10, -1) == 0.0f);  // -100 is not ignored here: invalid
    CHECK(token_loss(5.0f, 3.0f, std::int64_t{1} << 40, 10, -100) == 0.0f);
  }
}

TEST_CASE("is_scored_target and is_invalid_target partition the non-ignored targets",
          "[thread][cross_entropy]") {
  using lce::thread::is_invalid_target;
  using lce::thread::is_scored_target;
  const std::int64_t v = 10;
  for (const std::int64_t ignore : {std::int64_t{-100}, std::int64_t{3}, std::int64_t{-1}}) {
    for (const std::int64_t y :
         {std::int64_t{-100}, std::int64_t{-1}, std::int64_t{0}, std::int64_t{3}, std::int64_t{9},
          std::int64_t{10}, std::int64_t{1} << 40, std::numeric_limits<std::int64_t>::min()}) {
      CAPTURE(ignore, y);
      const bool ignored = y == ignore;
      const bool inside = y >= 0 && y < v;
      CHECK(is_scored_target(y, ignore, v) == (!ignored && inside));
      CHECK(is_invalid_target(y, ignore, v) == (!ignored && !inside));
    }
  }
}

TEST_CASE("row_grad_scale", "[thread][cross_entropy]") {
  SECTION("ignored rows scale by 0 for every reduction") {
    for (reduction r : {reduction::mean, reduction::sum, reduction::none}) {
      CHECK(row_grad_scale(2.0f, false, 5, r) == 0.0f);
    }
  }
  SECTION("mean divides by the number of valid rows") {
    CHECK(row_grad_scale(1.0f, true, 4, reduction::mean) == 0.25f);
    CHECK(row_grad_scale(3.0f, true, 3, reduction::mean) == 1.0f);
  }
  SECTION("mean with no valid row is 0, never inf or NaN") {
    const float g = row_grad_scale(1.0f, true, 0, reduction::mean);
    CHECK(g == 0.0f);
    CHECK(std::isfinite(g));
    CHECK(row_grad_scale(1.0f, false, 0, reduction::mean) == 0.0f);
  }
  SECTION("sum and none pass the upstream gradient through") {
    CHECK(row_grad_scale(0.75f, true, 9, reduction::sum) == 0.75f);
    CHECK(row_grad_scale(-2.5f, true, 9, reduction::none) == -2.5f);
    CHECK(row_grad_scale(1.0f, true, 0, reduction::sum) == 1.0f);
  }
}

TEST_CASE("logit_grad matches g (softmax - onehot) in double", "[thread][cross_entropy]") {
  const std::uint64_t seed = lce_test::fresh_seed();
  CAPTURE(seed);
  lce_test::random_source rng(seed);
  for (int trial = 0; trial < 50; ++trial) {
    const auto v = static_cast<std::size_t>(rng.integer(1, 300));
    const double scale = trial % 2 == 0 ? 3.0 : 60.0;
    std::vector<float> z(v);
    for (float& value : z) value = static_cast<float>(rng.uniform(-scale, scale));
    const auto y = static_cast<std::size_t>(rng.integer(0, static_cast<std::int64_t>(v) - 1));
    const float g = static_cast<float>(rng.uniform(0.1, 2.0));
    CAPTURE(trial, v, scale, y, g);

    lce::thread::lse_state s = lce::thread::lse_identity();
    for (float value : z) s = lce_test::lse_push(s, value);
    const float lse = lce::thread::lse_value(s);

    double m = -1e300;
    for (float value : z) m = std::max(m, static_cast<double>(value));
    double sum = 0.0;
    for (float value : z) sum += std::exp(static_cast<double>(value) - m);
    const double lse_ref = m + std::log(sum);

    // fp32 rounds lse to half an ulp of |lse| (2e-6 at 60), so each probability carries a
    // relative error of about (1 + |lse|)·1.2e-7; p − 1 at the target inherits it absolutely.
    const double rel_p = (1.0 + std::fabs(lse_ref)) * 2.4e-7;
    double row_sum = 0.0;
    for (std::size_t k = 0; k < v; ++k) {
      const float got = logit_grad(z[k], lse, k == y, g);
      const double p = std::exp(z[k] - lse_ref);
      const double ref = g * (p - (k == y ? 1.0 : 0.0));
      REQUIRE(std::isfinite(got));
      row_sum += got;
      CAPTURE(k, got, ref);
      CHECK(std::fabs(got - ref) <= g * (rel_p * p + 1.2e-7));
    }
    CHECK(std::fabs(row_sum) <= g * (rel_p + 1.2e-7 * static_cast<double>(v)));
  }
}

TEST_CASE("logit_grad edge cases", "[thread][cross_entropy]") {
  const float inf = std::numeric_limits<float>::infinity();
  CHECK(logit_grad(2.0f, 2.0f, true, 1.0f) == 0.0f);   // V = 1: p = 1 at the target
  CHECK(logit_grad(2.0f, 2.0f, false, 0.5f) == 0.5f);  // p = 1 off target
  CHECK(logit_grad(-inf, 3.0f, false, 1.0f) == 0.0f);  // a masked logit has p = 0
  CHECK(logit_grad(-inf, 3.0f, true, 2.0f) == -2.0f);
  CHECK(logit_grad(-200.0f, 0.0f, false, 1.0f) == 0.0f);  // underflow to 0, not NaN
  CHECK(logit_grad(1.0f, 3.0f, true, 0.0f) == 0.0f);      // g = 0 (ignored row): exactly 0
  CHECK(logit_grad(1.0f, 3.0f, false, 0.0f) == 0.0f);
}

// ---------------------------------------------------------------------------------------------
// The loss options: logit transform (temperature, softcap), row_loss (label smoothing, class
// weights, z-loss), row_grad_scales / row_grad_coeffs / logit_grad, shifted_target.

namespace {

using lce::thread::grad_coeffs;
using lce::thread::logit_transform;
using lce::thread::row_grad_coeffs;
using lce::thread::row_grad_scales;
using lce::thread::row_loss;
using lce::thread::row_scales;
using lce::thread::shifted_target;

/// z = softcap(raw/τ) in double.
double transform_double(double raw, double tau, double cap) {
  const double u = raw / tau;
  return cap > 0.0 ? cap * std::tanh(u / cap) : u;
}

logit_transform make_transform(float tau, float cap) {
  logit_transform t;
  t.inv_temperature = 1.0f / tau;
  t.softcap = cap;
  return t;
}

/// The two loss terms of one valid row in double, from its (transformed) logits:
/// ce = (1 − α)·w_y·(lse − z_y) + (α/V)·Σ_v w_v·(lse − z_v), zl = s·lse².
struct double_terms {
  double ce;
  double zl;
  double lse;
};

double_terms loss_double(const std::vector<double>& z, std::size_t y, const std::vector<double>& w,
                         double alpha, double s) {
  double m = -1e300;
  for (double value : z) m = std::max(m, value);
  double sum = 0.0;
  for (double value : z) sum += std::exp(value - m);
  const double lse = m + std::log(sum);
  double smooth = 0.0;
  for (std::size_t k = 0; k < z.size(); ++k) smooth += w[k] * (lse - z[k]);
  const double ce =
      (1.0 - alpha) * w[y] * (lse - z[y]) + alpha / static_cast<double>(z.size()) * smooth;
  return {ce, s * lse * lse, lse};
}

/// A random row: logits, target, class weights (or all 1), smoothing and z-loss scale.
struct row_case {
  std::vector<float> z;
  std::vector<float> w;
  std::size_t y;
  float alpha;
  float s;
};

row_case random_row(lce_test::random_source& rng, int trial) {
  row_case c;
  const auto v = static_cast<std::size_t>(rng.integer(1, 40));
  const double scale = trial % 3 == 0 ? 1.0 : trial % 3 == 1 ? 5.0 : 20.0;
  c.z.resize(v);
  for (float& value : c.z) value = static_cast<float>(rng.uniform(-scale, scale));
  c.w.assign(v, 1.0f);
  if (trial % 2 == 1) {
    for (float& value : c.w) value = static_cast<float>(rng.uniform(0.1, 3.0));
  }
  c.y = static_cast<std::size_t>(rng.integer(0, static_cast<std::int64_t>(v) - 1));
  const float alphas[] = {0.0f, 0.1f, 0.5f, 1.0f};
  const float scales[] = {0.0f, 1e-4f, 0.05f};
  c.alpha = alphas[trial % 4];
  c.s = scales[(trial / 4) % 3];
  return c;
}

std::vector<double> to_doubles(const std::vector<float>& values) {
  return std::vector<double>(values.begin(), values.end());
}

/// The float statistics a kernel would have for the row: lse, Σ w·z, w_sum.
struct float_stats {
  float lse;
  float sum_wz;
  float w_sum;
};

float_stats stats_of(const row_case& c) {
  lce::thread::row_stats st = lce::thread::row_stats_identity();
  float w_sum = 0.0f;
  for (std::size_t k = 0; k < c.z.size(); ++k) {
    st = lce::thread::row_stats_push(st, static_cast<std::int64_t>(k), c.z[k], c.w[k]);
    w_sum += c.w[k];
  }
  return {lce::thread::row_lse(st), st.sum_wz, w_sum};
}

}  // namespace

TEST_CASE("logit_transform: defaults are the identity", "[thread][cross_entropy][options]") {
  const logit_transform t{};
  for (float raw : {-1e30f, -3.5f, 0.0f, 1.0f, 77.25f, 1e30f}) {
    CHECK(t(raw) == raw);
    CHECK(t.derivative(t(raw)) == 1.0f);
  }
}

TEST_CASE("logit_transform: an infinite or NaN logit becomes NaN, never finite or masked",
          "[thread][cross_entropy][options]") {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (const float tau : {1.0f, 0.5f, 2.5f}) {
    for (const float cap : {0.0f, 1.0f, 30.0f}) {
      const logit_transform t = make_transform(tau, cap);
      CAPTURE(tau, cap);
      CHECK(std::isnan(t(inf)));   // softcap would turn +inf into c
      CHECK(std::isnan(t(-inf)));  // would mask the class
      CHECK(std::isnan(t(nan)));
      if (cap > 0.0f) CHECK(std::isnan(t.derivative(t(inf))));
      CHECK(std::isfinite(t(1e38f)));  // large but finite stays finite
    }
  }
  // 1/τ overflowing a finite raw value is an overflow: NaN as well.
  CHECK(std::isnan(make_transform(1e-3f, 0.0f)(3e38f)));
}

TEST_CASE("logit_transform: value matches softcap(raw/τ) in double",
          "[thread][cross_entropy][options]") {
  const std::uint64_t seed = lce_test::fresh_seed();
  CAPTURE(seed);
  lce_test::random_source rng(seed);
  for (const float tau : {1.0f, 0.5f, 0.7f, 2.5f}) {
    for (const float cap : {0.0f, 1.0f, 5.0f, 30.0f}) {
      const logit_transform t = make_transform(tau, cap);
      for (int trial = 0; trial < 200; ++trial) {
        const float raw = static_cast<float>(rng.uniform(-80.0, 80.0));
        const double ref = transform_double(raw, tau, cap);
        const float got = t(raw);
        CAPTURE(tau, cap, raw, ref, got);
        CHECK(std::fabs(got - ref) <= 1e-6 * std::fabs(ref) + 1e-30);
        if (cap > 0.0f) CHECK(std::fabs(got) <= cap);
      }
    }
  }
}

TEST_CASE("logit_transform: derivative matches finite differences",
          "[thread][cross_entropy][options]") {
  const std::uint64_t seed = lce_test::fresh_seed();
  CAPTURE(seed);
  lce_test::random_source rng(seed);
  for (const float tau : {1.0f, 0.5f, 0.7f, 2.5f}) {
    for (const float cap : {0.0f, 1.0f, 5.0f, 30.0f}) {
      const logit_transform t = make_transform(tau, cap);
      for (int trial = 0; trial < 200; ++trial) {
        const float raw = static_cast<float>(rng.uniform(-60.0, 60.0));
        const double h = 1e-4 * (1.0 + std::fabs(raw));
        const double fd =
            (transform_double(raw + h, tau, cap) - transform_double(raw - h, tau, cap)) / (2.0 * h);
        const float got = t.derivative(t(raw));
        CAPTURE(tau, cap, raw, fd, got);
        CHECK(std::isfinite(got));
        CHECK(got >= 0.0f);
        // z/c carries ~1 ulp: 1 − (z/c)² is good to ~2.4e-7 absolute (times 1/τ).
        CHECK(std::fabs(got - fd) <= (1e-6 + 1e-6 * std::fabs(fd)) / tau);
      }
    }
  }
  SECTION("saturation: derivative 0, value ±c, never NaN") {
    const logit_transform t = make_transform(1.0f, 3.0f);
    for (float raw : {1e4f, -1e4f, 1e30f, -1e30f}) {
      CHECK(std::fabs(t(raw)) == 3.0f);
      CHECK(t.derivative(t(raw)) == 0.0f);
    }
  }
  SECTION("temperature alone: derivative is exactly 1/τ") {
    const logit_transform t = make_transform(0.7f, 0.0f);
    CHECK(t.derivative(12.0f) == 1.0f / 0.7f);
    CHECK(t.derivative(-3.0f) == 1.0f / 0.7f);
  }
}

TEST_CASE("row_loss matches the loss in double", "[thread][cross_entropy][options]") {
  const std::uint64_t seed = lce_test::fresh_seed();
  CAPTURE(seed);
  lce_test::random_source rng(seed);
  for (int trial = 0; trial < 300; ++trial) {
    const row_case c = random_row(rng, trial);
    const auto v = static_cast<std::int64_t>(c.z.size());
    const float_stats fs = stats_of(c);
    const std::vector<double> w = to_doubles(c.w);
    const double_terms ref = loss_double(to_doubles(c.z), c.y, w, c.alpha, c.s);
    const auto got = row_loss(fs.lse, c.z[c.y], fs.sum_wz, c.w[c.y], fs.w_sum, v, c.alpha, c.s);
    double magnitude = c.w[c.y] * (std::fabs(ref.lse) + std::fabs(c.z[c.y]));
    for (std::size_t k = 0; k < c.z.size(); ++k)
      magnitude +=
          c.alpha / static_cast<double>(v) * w[k] * (std::fabs(ref.lse) + std::fabs(c.z[k]));
    CAPTURE(trial, v, c.y, c.alpha, c.s, ref.ce, got.ce, ref.zl, got.z_loss);
    CHECK(std::fabs(got.ce - ref.ce) <= 2e-6 * magnitude + 1e-6);
    CHECK(std::fabs(got.z_loss - ref.zl) <=
          1e-6 * (std::fabs(ref.zl) + c.s * (1.0 + std::fabs(ref.lse))));
    CHECK(got.ce >= -2e-6 * magnitude - 1e-6);  // never negative beyond rounding
  }
  SECTION("without options it is the plain token loss, bit for bit") {
    for (int trial = 0; trial < 50; ++trial) {
      const float lse = static_cast<float>(rng.uniform(-5.0, 30.0));
      const float zy = lse - static_cast<float>(rng.uniform(0.0, 20.0));
      const auto got = row_loss(lse, zy, 123.0f, 1.0f, 77.0f, 77, 0.0f, 0.0f);
      CHECK(got.ce == token_loss(lse, zy, 3, 77, -100));
      CHECK(got.z_loss == 0.0f);
    }
  }
  SECTION("α = 1 ignores the target; z-loss is s·lse²") {
    const auto a = row_loss(2.0f, 1.5f, 10.0f, 3.0f, 8.0f, 4, 1.0f, 0.5f);
    const auto b = row_loss(2.0f, -7.0f, 10.0f, 0.25f, 8.0f, 4, 1.0f, 0.5f);
    CHECK(a.ce == b.ce);
    CHECK(a.ce == Approx(1.0 / 4.0 * (8.0 * 2.0 - 10.0)));
    CHECK(a.z_loss == 2.0f);
  }
}

TEST_CASE("row_grad_scales", "[thread][cross_entropy][options]") {
  using lce::reduction;
  SECTION("ignored rows: zero scales for every reduction") {
    for (reduction r : {reduction::mean, reduction::sum, reduction::none}) {
      const row_scales g = row_grad_scales(2.0f, false, 4.0f, 5.0f, r);
      CHECK(g.ce == 0.0f);
      CHECK(g.z == 0.0f);
    }
  }
  SECTION("mean: ce by Σ w_y, z-loss by n_valid") {
    const row_scales g = row_grad_scales(3.0f, true, 2.5f, 4.0f, reduction::mean);
    CHECK(g.ce == Approx(3.0 / 2.5));
    CHECK(g.z == Approx(3.0 / 4.0));
  }
  SECTION("mean with zero denominators: 0, never inf or NaN") {
    const row_scales g = row_grad_scales(1.0f, true, 0.0f, 0.0f, reduction::mean);
    CHECK(g.ce == 0.0f);
    CHECK(g.z == 0.0f);
  }
  SECTION("sum and none pass the upstream gradient to both terms") {
    for (reduction r : {reduction::sum, reduction::none}) {
      const row_scales g = row_grad_scales(-1.75f, true, 2.5f, 4.0f, r);
      CHECK(g.ce == -1.75f);
      CHECK(g.z == -1.75f);
    }
  }
}

TEST_CASE("row_grad_coeffs and logit_grad match finite differences of the loss in double",
          "[thread][cross_entropy][options]") {
  const std::uint64_t seed = lce_test::fresh_seed();
  CAPTURE(seed);
  lce_test::random_source rng(seed);
  for (int trial = 0; trial < 300; ++trial) {
    const row_case c = random_row(rng, trial);
    const auto v = static_cast<std::int64_t>(c.z.size());
    const row_scales g{static_cast<float>(rng.uniform(-2.0, 2.0)),
                       static_cast<float>(rng.uniform(-2.0, 2.0))};
    const float_stats fs = stats_of(c);
    const grad_coeffs coeffs = row_grad_coeffs(g, fs.lse, c.w[c.y], fs.w_sum, v, c.alpha, c.s);
    const std::vector<double> w = to_doubles(c.w);
    std::vector<double> z = to_doubles(c.z);
    auto objective = [&]() {
      const double_terms t = loss_double(z, c.y, w, c.alpha, c.s);
      return static_cast<double>(g.ce) * t.ce + static_cast<double>(g.z) * t.zl;
    };
    const double lse = loss_double(z, c.y, w, c.alpha, c.s).lse;
    double w_max = 0.0;
    for (double value : w) w_max = std::max(w_max, value);
    // Scale of the gradient terms: |g_ce|·w_max·(1 + α) + |g_z|·2·s·|lse|.
    const double scale =
        std::fabs(g.ce) * w_max * 2.0 + std::fabs(g.z) * 2.0 * c.s * (1.0 + std::fabs(lse));
    const double rel_p = (1.0 + std::fabs(lse)) * 4e-7;  // fp32 lse → relative error of p
    double row_sum = 0.0;
    double row_sum_ref = 0.0;
    for (std::size_t k = 0; k < c.z.size(); ++k) {
      const double h = 1e-5;
      const double saved = z[k];
      z[k] = saved + h;
      const double up = objective();
      z[k] = saved - h;
      const double down = objective();
      z[k] = saved;
      const double fd = (up - down) / (2.0 * h);
      const float got = lce::thread::logit_grad(coeffs, c.z[k], fs.lse, k == c.y, c.w[k]);
      CAPTURE(trial, v, k, c.y, c.alpha, c.s, g.ce, g.z, fd, got);
      CHECK(std::isfinite(got));
      CHECK(std::fabs(got - fd) <= scale * (rel_p + 1e-6) + 1e-7);
      row_sum += got;
      row_sum_ref += fd;
    }
    // Σ_v dL/dz_v = g_z·2·s·lse + g_ce·(1 − α)·w_y·0 + ...: compare the sums too.
    CHECK(std::fabs(row_sum - row_sum_ref) <=
          scale * (rel_p + 1e-6) * static_cast<double>(v) + 1e-6);
  }
  SECTION("without options: the coefficients are {g, g, 0} and agree with the plain logit_grad") {
    const row_scales g{0.37f, 0.37f};
    const grad_coeffs c = row_grad_coeffs(g, 4.0f, 1.0f, 50.0f, 50, 0.0f, 0.0f);
    CHECK(c.p == 0.37f);
    CHECK(c.target == 0.37f);
    CHECK(c.weight == 0.0f);
    for (float z : {-10.0f, 0.0f, 3.9f}) {
      for (bool target : {false, true}) {
        const float a = lce::thread::logit_grad(c, z, 4.0f, target, 1.0f);
        const float b = lce_test::logit_grad(z, 4.0f, target, 0.37f);
        CHECK(std::fabs(a - b) <= 1e-7f);
      }
    }
  }
  SECTION("an ignored row (zero scales) gives exactly zero") {
    const grad_coeffs c = row_grad_coeffs(row_scales{0.0f, 0.0f}, 4.0f, 2.0f, 9.0f, 9, 0.3f, 0.1f);
    for (float z : {-10.0f, 0.0f, 3.9f}) {
      CHECK(lce::thread::logit_grad(c, z, 4.0f, true, 2.0f) == 0.0f);
      CHECK(lce::thread::logit_grad(c, z, 4.0f, false, 0.5f) == 0.0f);
    }
  }
}

TEST_CASE("the whole epilogue: dL/draw = logit_grad · derivative matches finite differences",
          "[thread][cross_entropy][options]") {
  // Raw logits → softcap(raw/τ) → loss with smoothing, class weights and z-loss, through the
  // very functions the kernels call, against the loss of the raw logits in double.
  const std::uint64_t seed = lce_test::fresh_seed();
  CAPTURE(seed);
  lce_test::random_source rng(seed);
  for (int trial = 0; trial < 200; ++trial) {
    row_case c = random_row(rng, trial);
    const float taus[] = {1.0f, 0.7f, 2.0f};
    const float caps[] = {0.0f, 3.0f, 15.0f};
    const float tau = taus[trial % 3];
    const float cap = caps[(trial / 3) % 3];
    const logit_transform t = make_transform(tau, cap);
    const std::vector<float> raw = c.z;
    for (std::size_t k = 0; k < raw.size(); ++k) c.z[k] = t(raw[k]);
    const auto v = static_cast<std::int64_t>(c.z.size());
    const row_scales g{static_cast<float>(rng.uniform(0.1, 2.0)),
                       static_cast<float>(rng.uniform(0.1, 2.0))};
    const float_stats fs = stats_of(c);
    const grad_coeffs coeffs = row_grad_coeffs(g, fs.lse, c.w[c.y], fs.w_sum, v, c.alpha, c.s);
    const std::vector<double> w = to_doubles(c.w);
    std::vector<double> r = to_doubles(raw);
    auto objective = [&]() {
      std::vector<double> z(r.size());
      for (std::size_t k = 0; k < r.size(); ++k) z[k] = transform_double(r[k], tau, cap);
      const double_terms terms = loss_double(z, c.y, w, c.alpha, c.s);
      return static_cast<double>(g.ce) * terms.ce + static_cast<double>(g.z) * terms.zl;
    };
    double w_max = 0.0;
    for (double value : w) w_max = std::max(w_max, value);
    const double lse = fs.lse;
    const double scale =
        (std::fabs(g.ce) * w_max * 2.0 + std::fabs(g.z) * 2.0 * c.s * (1.0 + std::fabs(lse))) / tau;
    const double rel_p = (1.0 + std::fabs(lse)) * 4e-7;
    for (std::size_t k = 0; k < raw.size(); ++k) {
      const double h = 1e-5;
      const double saved = r[k];
      r[k] = saved + h;
      const double up = objective();
      r[k] = saved - h;
      const double down = objective();
      r[k] = saved;
      const double fd = (up - down) / (2.0 * h);
      const float got =
          lce::thread::logit_grad(coeffs, c.z[k], fs.lse, k == c.y, c.w[k]) * t.derivative(c.z[k]);
      CAPTURE(trial, v, k, tau, cap, c.alpha, c.s, raw[k], fd, got);
      CHECK(std::fabs(got - fd) <= scale * (rel_p + 2e-6) + 1e-7);
    }
  }
}

TEST_CASE("shifted_target", "[thread][cross_entropy][options]") {
  const std::vector<std::int64_t> targets{10, 11, 12, 13, 14, 15};
  SECTION("shift off: the row's own target") {
    for (std::int64_t r = 0; r < 6; ++r)
      CHECK(shifted_target(targets.data(), r, 0, -100) == 10 + r);
  }
  SECTION("T = 3: the next target, ignore_index at the end of each sequence") {
    const std::int64_t expected[] = {11, 12, -100, 14, 15, -100};
    for (std::int64_t r = 0; r < 6; ++r) {
      CAPTURE(r);
      CHECK(shifted_target(targets.data(), r, 3, -100) == expected[r]);
    }
  }
  SECTION("T = n: one sequence; only the last row is ignored") {
    for (std::int64_t r = 0; r < 5; ++r) CHECK(shifted_target(targets.data(), r, 6, -7) == 11 + r);
    CHECK(shifted_target(targets.data(), 5, 6, -7) == -7);
  }
  SECTION("T = 1: every row is the last of its sequence") {
    for (std::int64_t r = 0; r < 6; ++r) CHECK(shifted_target(targets.data(), r, 1, 42) == 42);
  }
  SECTION("T = 2 with ignore_index inside the vocabulary") {
    const std::int64_t expected[] = {11, 3, 13, 3, 15, 3};
    for (std::int64_t r = 0; r < 6; ++r)
      CHECK(shifted_target(targets.data(), r, 2, 3) == expected[r]);
  }
}

TEST_CASE("target_view is shifted_target", "[thread][cross_entropy][options]") {
  const std::vector<std::int64_t> targets{10, 11, 12, 13, 14, 15};
  for (const std::int64_t seq_len : {0, 1, 2, 3, 6}) {
    const lce::thread::target_view view{targets.data(), seq_len, -100};
    for (std::int64_t r = 0; r < 6; ++r) {
      CAPTURE(seq_len, r);
      CHECK(view(r) == shifted_target(targets.data(), r, seq_len, -100));
    }
  }
}

TEST_CASE("target_view with a vocabulary offset is shard-local for valid rows only",
          "[thread][cross_entropy][nccl]") {
  const std::vector<std::int64_t> targets{10, -100, 12, 3, 14, 15};
  const lce::thread::target_view view{targets.data(), 0, -100, 12};
  const std::int64_t expected[] = {-2, -100, 0, -9, 2, 3};
  for (std::int64_t r = 0; r < 6; ++r) CHECK(view(r) == expected[r]);
  // With the causal shift, the shifted-in ignore_index of a sequence end stays unshifted.
  const lce::thread::target_view shifted{targets.data(), 3, -100, 10};
  const std::int64_t expected_shifted[] = {-100, 2, -100, 4, 5, -100};
  for (std::int64_t r = 0; r < 6; ++r) CHECK(shifted(r) == expected_shifted[r]);
}
