// CPU tests of thread/cross_entropy.cuh: per-token loss, per-row gradient scale and the logit
// gradient, against the same formulas in double.
#include <catch2/catch.hpp>
#include <cmath>
#include <lce/thread/cross_entropy.cuh>
#include <lce/thread/online_lse.cuh>
#include <limits>
#include <vector>

#include "support/device_buffer.hpp"

namespace {
using lce::reduction;
using lce::thread::in_vocabulary;
using lce::thread::is_valid_target;
using lce::thread::logit_grad;
using lce::thread::row_grad_scale;
using lce::thread::token_loss;
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
  SECTION("a valid target outside [0, v) gives NaN, never a plausible number") {
    CHECK(std::isnan(token_loss(5.0f, 3.0f, 10, 10, -100)));
    CHECK(std::isnan(token_loss(5.0f, 3.0f, -1, 10, -100)));
    CHECK(std::isnan(token_loss(5.0f, 3.0f, -100, 10, -1)));  // -100 is not ignored here
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
    for (float value : z) s = lce::thread::lse_push(s, value);
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
