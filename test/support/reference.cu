// Self-checks of the fp64 CPU reference (support/reference.hpp): every GPU result is judged
// against it, so it is checked here against independent formulas and finite differences.
#include <catch2/catch.hpp>
#include <cmath>
#include <lce/thread/cross_entropy.cuh>
#include <lce/thread/online_lse.cuh>
#include <vector>

#include "support/device_buffer.hpp"
#include "support/formulas.hpp"
#include "support/reference.hpp"

namespace {

using lce::reduction;
using lce_test::reference_input;

reference_input random_input(lce_test::random_source& rng, std::int64_t n, std::int64_t d,
                             std::int64_t v, bool bias, double ignore_fraction, reduction red,
                             double logit_scale = 1.0) {
  reference_input in;
  in.n = n;
  in.d = d;
  in.v = v;
  in.x = rng.normals(static_cast<std::size_t>(n * d), 1.0);
  in.w =
      rng.normals(static_cast<std::size_t>(v * d), logit_scale / std::sqrt(static_cast<double>(d)));
  if (bias) in.bias = rng.normals(static_cast<std::size_t>(v), 0.5);
  in.targets = rng.targets(n, v, ignore_fraction, in.ignore_index);
  in.reduction = red;
  return in;
}

std::vector<double> upstream_for(lce_test::random_source& rng, reduction red, std::int64_t n) {
  if (red == reduction::none) return rng.uniforms(static_cast<std::size_t>(n), -1.5, 2.0);
  return {rng.uniform(0.5, 2.0)};
}

const char* name(reduction r) {
  return r == reduction::mean ? "mean" : r == reduction::sum ? "sum" : "none";
}

}  // namespace

TEST_CASE("reference loss matches the textbook formula", "[reference]") {
  const std::uint64_t seed = lce_test::fresh_seed();
  CAPTURE(seed);
  lce_test::random_source rng(seed);
  const reduction red = GENERATE(reduction::mean, reduction::sum, reduction::none);
  CAPTURE(name(red));
  const reference_input in = random_input(rng, 9, 6, 11, true, 0.25, red);
  const auto out = lce_test::reference(in, false);

  double total = 0.0;
  std::int64_t valid = 0;
  for (std::int64_t i = 0; i < in.n; ++i) {
    // -log softmax(z)_y without the max shift: safe for these small logits.
    std::vector<double> z(static_cast<std::size_t>(in.v));
    double denom = 0.0;
    for (std::int64_t k = 0; k < in.v; ++k) {
      double acc = in.bias[static_cast<std::size_t>(k)];
      for (std::int64_t j = 0; j < in.d; ++j) acc += in.x[i * in.d + j] * in.w[k * in.d + j];
      z[static_cast<std::size_t>(k)] = acc;
      denom += std::exp(acc);
    }
    CHECK(out.lse[static_cast<std::size_t>(i)] == Approx(std::log(denom)).epsilon(1e-13));
    const std::int64_t y = in.targets[static_cast<std::size_t>(i)];
    if (y == in.ignore_index) {
      CHECK(out.token_loss[static_cast<std::size_t>(i)] == 0.0);
      continue;
    }
    const double loss = -std::log(std::exp(z[static_cast<std::size_t>(y)]) / denom);
    CHECK(out.token_loss[static_cast<std::size_t>(i)] == Approx(loss).epsilon(1e-12));
    CHECK(out.token_loss[static_cast<std::size_t>(i)] >= 0.0);
    total += loss;
    ++valid;
  }
  CHECK(out.n_valid == valid);
  const double expected =
      red == reduction::mean ? (valid > 0 ? total / static_cast<double>(valid) : 0.0) : total;
  CHECK(out.loss == Approx(expected).epsilon(1e-12));
}

TEST_CASE("reference gradients match central finite differences", "[reference]") {
  const std::uint64_t seed = lce_test::fresh_seed();
  CAPTURE(seed);
  lce_test::random_source rng(seed);
  const reduction red = GENERATE(reduction::mean, reduction::sum, reduction::none);
  const bool bias = GENERATE(false, true);
  CAPTURE(name(red), bias);
  reference_input in = random_input(rng, 4, 3, 5, bias, 0.0, red, 2.0);
  in.targets[1] = in.ignore_index;  // one ignored row: its gradient must be exactly zero
  const std::vector<double> upstream = upstream_for(rng, red, in.n);
  const auto out = lce_test::reference(in, true, upstream);

  const double h = 1e-6;
  auto check = [&](std::vector<double>& param, const std::vector<double>& grad, const char* what) {
    REQUIRE(param.size() == grad.size());
    for (std::size_t e = 0; e < param.size(); ++e) {
      const double saved = param[e];
      param[e] = saved + h;
      const double up = lce_test::reference_objective(in, upstream);
      param[e] = saved - h;
      const double down = lce_test::reference_objective(in, upstream);
      param[e] = saved;
      const double fd = (up - down) / (2.0 * h);
      CAPTURE(what, e, fd, grad[e]);
      CHECK(std::fabs(fd - grad[e]) <= 1e-7 * (1.0 + std::fabs(grad[e])));
    }
  };
  check(in.x, out.dx, "dx");
  check(in.w, out.dw, "dw");
  if (bias) check(in.bias, out.db, "db");
  for (std::int64_t j = 0; j < in.d; ++j)
    CHECK(out.dx[static_cast<std::size_t>(1 * in.d + j)] == 0.0);
}

TEST_CASE("reference: ignored rows are dropped rows", "[reference]") {
  const std::uint64_t seed = lce_test::fresh_seed();
  CAPTURE(seed);
  lce_test::random_source rng(seed);
  const reduction red = GENERATE(reduction::mean, reduction::sum);
  const std::int64_t ignore_index = GENERATE(std::int64_t{-100}, std::int64_t{2});
  CAPTURE(name(red), ignore_index);
  reference_input in = random_input(rng, 12, 5, 7, true, 0.0, red);
  in.ignore_index = ignore_index;
  for (std::size_t i = 0; i < in.targets.size(); i += 3) in.targets[i] = ignore_index;
  const std::vector<double> upstream{1.25};
  const auto full = lce_test::reference(in, true, upstream);

  reference_input kept = in;
  kept.x.clear();
  kept.targets.clear();
  for (std::int64_t i = 0; i < in.n; ++i) {
    if (in.targets[static_cast<std::size_t>(i)] == ignore_index) continue;
    kept.targets.push_back(in.targets[static_cast<std::size_t>(i)]);
    kept.x.insert(kept.x.end(), in.x.begin() + i * in.d, in.x.begin() + (i + 1) * in.d);
  }
  kept.n = static_cast<std::int64_t>(kept.targets.size());
  const auto part = lce_test::reference(kept, true, upstream);

  CHECK(full.n_valid == kept.n);
  CHECK(full.loss == Approx(part.loss).epsilon(1e-13));
  CHECK(lce_test::rel_frobenius(full.dw, part.dw) <= 1e-13);
  CHECK(lce_test::rel_frobenius(full.db, part.db) <= 1e-13);
  std::size_t k = 0;
  for (std::int64_t i = 0; i < in.n; ++i) {
    const bool ignored = in.targets[static_cast<std::size_t>(i)] == ignore_index;
    CHECK(full.token_loss[static_cast<std::size_t>(i)] == (ignored ? 0.0 : part.token_loss[k]));
    for (std::int64_t j = 0; j < in.d; ++j) {
      const double g = full.dx[static_cast<std::size_t>(i * in.d + j)];
      if (ignored) {
        CHECK(g == 0.0);
      } else {
        CHECK(g == Approx(part.dx[k * static_cast<std::size_t>(in.d) + static_cast<std::size_t>(j)])
                       .epsilon(1e-12));
      }
    }
    if (!ignored) ++k;
  }
}

TEST_CASE("reference: an all-ignored batch gives loss 0 and zero gradients, no NaN",
          "[reference]") {
  const std::uint64_t seed = lce_test::fresh_seed();
  CAPTURE(seed);
  lce_test::random_source rng(seed);
  const reduction red = GENERATE(reduction::mean, reduction::sum, reduction::none);
  CAPTURE(name(red));
  const reference_input in = random_input(rng, 6, 4, 9, true, 1.0, red);
  const auto out = lce_test::reference(in, true, upstream_for(rng, red, in.n));
  CHECK(out.n_valid == 0);
  CHECK(out.loss == 0.0);
  CHECK(lce_test::all_finite(out.lse));
  for (double value : out.token_loss) CHECK(value == 0.0);
  for (double value : out.dx) CHECK(value == 0.0);
  for (double value : out.dw) CHECK(value == 0.0);
  for (double value : out.db) CHECK(value == 0.0);
}

TEST_CASE("reference: large logits stay finite", "[reference]") {
  const std::uint64_t seed = lce_test::fresh_seed();
  CAPTURE(seed);
  lce_test::random_source rng(seed);
  // |Z| up to ~1e3: exp would overflow without the max shift.
  const reference_input in = random_input(rng, 5, 8, 33, true, 0.2, reduction::mean, 400.0);
  const auto out = lce_test::reference(in, true);
  CHECK(lce_test::all_finite(out.lse));
  CHECK(lce_test::all_finite(out.token_loss));
  CHECK(std::isfinite(out.loss));
  CHECK(lce_test::all_finite(out.dx));
  CHECK(lce_test::all_finite(out.dw));
  CHECK(lce_test::all_finite(out.db));
  for (double value : out.token_loss) CHECK(value >= 0.0);
}

TEST_CASE("reference: db_abs bounds db and sums |dZ| column by column", "[reference]") {
  const std::uint64_t seed = lce_test::fresh_seed();
  CAPTURE(seed);
  lce_test::random_source rng(seed);
  const reduction red = GENERATE(reduction::mean, reduction::sum, reduction::none);
  CAPTURE(name(red));
  // A tiny vocabulary, where db's column sums cancel.
  const reference_input in = random_input(rng, 64, 16, 3, true, 0.2, red);
  const auto out = lce_test::reference(in, true, upstream_for(rng, red, in.n));
  REQUIRE(out.db_abs.size() == out.db.size());
  double ref = 0.0, mass = 0.0;
  for (std::size_t k = 0; k < out.db.size(); ++k) {
    CHECK(out.db_abs[k] >= std::fabs(out.db[k]));
    ref += out.db[k] * out.db[k];
    mass += out.db_abs[k] * out.db_abs[k];
  }
  CHECK(mass >= ref);
}

TEST_CASE("reference agrees with the library's thread formulas in fp32", "[reference]") {
  const std::uint64_t seed = lce_test::fresh_seed();
  CAPTURE(seed);
  lce_test::random_source rng(seed);
  const reference_input in = random_input(rng, 16, 24, 300, true, 0.2, reduction::mean, 3.0);
  const auto out = lce_test::reference(in, true);
  for (std::int64_t i = 0; i < in.n; ++i) {
    std::vector<float> z(static_cast<std::size_t>(in.v));
    lce::thread::lse_state s = lce::thread::lse_identity();
    for (std::int64_t k = 0; k < in.v; ++k) {
      double acc = in.bias[static_cast<std::size_t>(k)];
      for (std::int64_t j = 0; j < in.d; ++j) acc += in.x[i * in.d + j] * in.w[k * in.d + j];
      z[static_cast<std::size_t>(k)] = static_cast<float>(acc);
      s = lce_test::lse_push(s, z[static_cast<std::size_t>(k)]);
    }
    const float lse = lce::thread::lse_value(s);
    const std::int64_t y = in.targets[static_cast<std::size_t>(i)];
    const float zy = y >= 0 ? z[static_cast<std::size_t>(y)] : 0.0f;
    const float loss = lce_test::token_loss(lse, zy, y, in.v, in.ignore_index);
    CHECK(std::fabs(lse - out.lse[static_cast<std::size_t>(i)]) <= 1e-5 * (1.0 + std::fabs(lse)));
    CHECK(std::fabs(loss - out.token_loss[static_cast<std::size_t>(i)]) <=
          1e-5 * (1.0 + std::fabs(loss)));
    const float g =
        lce_test::row_grad_scale(1.0f, y != in.ignore_index, out.n_valid, lce::reduction::mean);
    CHECK(std::fabs(g - out.row_scale[static_cast<std::size_t>(i)]) <= 1e-7);
  }
}

TEST_CASE("reference_row_scale", "[reference]") {
  const std::vector<std::int64_t> targets{3, -100, 1, -100};
  using lce_test::reference_row_scale;
  CHECK(reference_row_scale(targets, -100, reduction::mean, {}) ==
        std::vector<double>{0.5, 0.0, 0.5, 0.0});
  CHECK(reference_row_scale(targets, -100, reduction::sum, {3.0}) ==
        std::vector<double>{3.0, 0.0, 3.0, 0.0});
  CHECK(reference_row_scale(targets, -100, reduction::none, {1.0, 2.0, 3.0, 4.0}) ==
        std::vector<double>{1.0, 0.0, 3.0, 0.0});
  CHECK(reference_row_scale({-100, -100}, -100, reduction::mean, {}) ==
        std::vector<double>{0.0, 0.0});
  CHECK_THROWS(reference_row_scale(targets, -100, reduction::mean, {1.0, 2.0, 3.0, 4.0}));
}
