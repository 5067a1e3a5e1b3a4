// Self-checks of the fp64 CPU reference's loss options and extra outputs (label smoothing,
// class weights, z-loss, softcap, temperature, causal shift; z_loss, entropy, argmax, correct,
// target_logprob): against textbook formulas written with softmax directly, finite differences
// of the whole reference, and invariances between options.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <vector>

#include "support/device_buffer.hpp"
#include "support/reference.hpp"

namespace {

using lce::reduction;
using lce_test::reference_input;
using lce_test::reference_options;
using lce_test::reference_output;

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

std::vector<double> random_weights(lce_test::random_source& rng, std::int64_t v) {
  return rng.uniforms(static_cast<std::size_t>(v), 0.25, 2.0);
}

reference_options all_options(std::int64_t seq_len) {
  reference_options o;
  o.label_smoothing = 0.2;
  o.z_loss = 0.03;
  o.softcap = 2.0;
  o.temperature = 0.8;
  o.shift_seq_len = seq_len;
  return o;
}

std::vector<double> upstream_for(lce_test::random_source& rng, reduction red, std::int64_t n) {
  if (red == reduction::none) return rng.uniforms(static_cast<std::size_t>(n), -1.5, 2.0);
  return {rng.uniform(0.5, 2.0)};
}

const char* name(reduction r) {
  return r == reduction::mean ? "mean" : r == reduction::sum ? "sum" : "none";
}

/// Everything of two reference outputs, equal to relative `tol` (0: bit for bit).
void check_same(const reference_output& a, const reference_output& b, double tol) {
  CHECK(a.targets == b.targets);
  CHECK(a.argmax == b.argmax);
  CHECK(a.n_valid == b.n_valid);
  CHECK(a.correct == b.correct);
  CHECK(lce_test::rel_error(a.loss, b.loss) <= tol);
  CHECK(lce_test::rel_error(a.z_loss, b.z_loss) <= tol);
  CHECK(lce_test::rel_frobenius(a.lse, b.lse) <= tol);
  CHECK(lce_test::rel_frobenius(a.token_loss, b.token_loss) <= tol);
  CHECK(lce_test::rel_frobenius(a.token_z_loss, b.token_z_loss) <= tol);
  CHECK(lce_test::rel_frobenius(a.entropy, b.entropy) <= tol);
  CHECK(lce_test::rel_frobenius(a.target_logprob, b.target_logprob) <= tol);
  CHECK(lce_test::rel_frobenius(a.dx, b.dx) <= tol);
  CHECK(lce_test::rel_frobenius(a.dw, b.dw) <= tol);
  CHECK(lce_test::rel_frobenius(a.db, b.db) <= tol);
}

}  // namespace

TEST_CASE("reference with options matches the textbook formulas", "[reference][options]") {
  const std::uint64_t seed = lce_test::fresh_seed();
  CAPTURE(seed);
  lce_test::random_source rng(seed);
  const reduction red = GENERATE(reduction::mean, reduction::sum, reduction::none);
  const bool weighted = GENERATE(false, true);
  const std::int64_t seq_len = GENERATE(std::int64_t{0}, std::int64_t{4});
  CAPTURE(name(red), weighted, seq_len);
  reference_input in = random_input(rng, 12, 6, 11, true, 0.25, red, 2.0);
  in.options = all_options(seq_len);
  if (weighted) in.class_weight = random_weights(rng, in.v);
  const reference_options& o = in.options;
  const auto out = lce_test::reference(in, false);

  double ce_total = 0.0;
  double z_total = 0.0;
  double weight_total = 0.0;
  std::int64_t valid = 0;
  std::int64_t correct = 0;
  const auto v = static_cast<std::size_t>(in.v);
  for (std::int64_t i = 0; i < in.n; ++i) {
    const auto r = static_cast<std::size_t>(i);
    // Logits, then softmax directly (no max shift: |z| ≤ softcap = 2).
    std::vector<double> z(v);
    double denom = 0.0;
    for (std::size_t k = 0; k < v; ++k) {
      double acc = in.bias[k];
      for (std::int64_t j = 0; j < in.d; ++j)
        acc += in.x[r * static_cast<std::size_t>(in.d) + static_cast<std::size_t>(j)] *
               in.w[k * static_cast<std::size_t>(in.d) + static_cast<std::size_t>(j)];
      z[k] = o.softcap * std::tanh(acc / o.temperature / o.softcap);
      denom += std::exp(z[k]);
    }
    std::vector<double> p(v);
    double entropy = 0.0;
    for (std::size_t k = 0; k < v; ++k) {
      p[k] = std::exp(z[k]) / denom;
      entropy -= p[k] * std::log(p[k]);
    }
    const auto arg = static_cast<std::int64_t>(std::max_element(z.begin(), z.end()) - z.begin());
    CHECK(out.lse[r] == Approx(std::log(denom)).epsilon(1e-13));
    CHECK(out.entropy[r] == Approx(entropy).epsilon(1e-12));
    CHECK(out.argmax[r] == arg);
    // The effective target: the next row's, except at the end of a sequence.
    std::int64_t y = in.targets[r];
    if (seq_len > 0) y = (i % seq_len == seq_len - 1) ? in.ignore_index : in.targets[r + 1];
    CHECK(out.targets[r] == y);
    if (y == in.ignore_index) {
      CHECK(out.token_loss[r] == 0.0);
      CHECK(out.token_z_loss[r] == 0.0);
      CHECK(out.target_logprob[r] == 0.0);
      continue;
    }
    const auto yk = static_cast<std::size_t>(y);
    // −Σ_v q_v·w_v·log p_v with q = (1 − α)·onehot(y) + α/V (PyTorch's label_smoothing, weight=).
    double ce = 0.0;
    for (std::size_t k = 0; k < v; ++k) {
      const double q = (1.0 - o.label_smoothing) * (k == yk ? 1.0 : 0.0) +
                       o.label_smoothing / static_cast<double>(v);
      const double wk = weighted ? in.class_weight[k] : 1.0;
      ce -= q * wk * std::log(p[k]);
    }
    const double zl = o.z_loss * std::log(denom) * std::log(denom);
    CHECK(out.token_loss[r] == Approx(ce + zl).epsilon(1e-12));
    CHECK(out.token_z_loss[r] == Approx(zl).epsilon(1e-12));
    CHECK(out.target_logprob[r] == Approx(std::log(p[yk])).epsilon(1e-12));
    CHECK(out.token_loss[r] >= 0.0);
    ce_total += ce;
    z_total += zl;
    weight_total += weighted ? in.class_weight[yk] : 1.0;
    ++valid;
    correct += arg == y ? 1 : 0;
  }
  CHECK(out.n_valid == valid);
  CHECK(out.correct == correct);
  CHECK(out.ce_denom == Approx(weight_total).epsilon(1e-14));
  if (red == reduction::mean) {
    const double ce_mean = weight_total > 0.0 ? ce_total / weight_total : 0.0;
    const double z_mean = valid > 0 ? z_total / static_cast<double>(valid) : 0.0;
    CHECK(out.loss == Approx(ce_mean + z_mean).epsilon(1e-12));
    CHECK(out.z_loss == Approx(z_mean).epsilon(1e-12));
  } else {
    CHECK(out.loss == Approx(ce_total + z_total).epsilon(1e-12));
    CHECK(out.z_loss == Approx(z_total).epsilon(1e-12));
  }
}

TEST_CASE("reference gradients with every option match central finite differences",
          "[reference][options]") {
  const std::uint64_t seed = lce_test::fresh_seed();
  CAPTURE(seed);
  lce_test::random_source rng(seed);
  const reduction red = GENERATE(reduction::mean, reduction::sum, reduction::none);
  const bool bias = GENERATE(false, true);
  const bool weighted = GENERATE(false, true);
  CAPTURE(name(red), bias, weighted);
  reference_input in = random_input(rng, 6, 3, 5, bias, 0.0, red, 2.0);
  in.options = all_options(3);      // rows 2 and 5 are sequence ends: ignored
  in.targets[1] = in.ignore_index;  // row 0 is scored against it: ignored too
  if (weighted) in.class_weight = random_weights(rng, in.v);
  const std::vector<double> upstream = upstream_for(rng, red, in.n);
  const auto out = lce_test::reference(in, true, upstream);
  REQUIRE(out.n_valid == 3);

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
  for (const std::int64_t ignored_row : {0, 2, 5}) {
    for (std::int64_t j = 0; j < in.d; ++j)
      CHECK(out.dx[static_cast<std::size_t>(ignored_row * in.d + j)] == 0.0);
  }
}

TEST_CASE("reference: neutral options reproduce the plain loss", "[reference][options]") {
  const std::uint64_t seed = lce_test::fresh_seed();
  CAPTURE(seed);
  lce_test::random_source rng(seed);
  const reduction red = GENERATE(reduction::mean, reduction::sum, reduction::none);
  CAPTURE(name(red));
  const reference_input plain = random_input(rng, 9, 6, 13, true, 0.25, red, 2.0);
  const std::vector<double> upstream = upstream_for(rng, red, plain.n);
  const auto base = lce_test::reference(plain, true, upstream);

  SECTION("α = 0, s = 0, c = 0, τ = 1, T = 0 and unit class weights: bit for bit") {
    reference_input in = plain;
    in.options.label_smoothing = 0.0;
    in.options.z_loss = 0.0;
    in.options.softcap = 0.0;
    in.options.temperature = 1.0;
    in.options.shift_seq_len = 0;
    in.class_weight.assign(static_cast<std::size_t>(in.v), 1.0);
    check_same(lce_test::reference(in, true, upstream), base, 0.0);
  }
  SECTION("the plain loss is lse − z_y of the raw logits") {
    for (std::int64_t i = 0; i < plain.n; ++i) {
      const auto r = static_cast<std::size_t>(i);
      const std::int64_t y = plain.targets[r];
      if (y == plain.ignore_index) continue;
      CHECK(base.token_loss[r] == Approx(-base.target_logprob[r]).epsilon(1e-14));
      CHECK(base.token_z_loss[r] == 0.0);
    }
    CHECK(base.z_loss == 0.0);
  }
  SECTION("options that vanish converge to the plain loss") {
    reference_input in = plain;
    in.options.label_smoothing = 1e-9;
    in.options.z_loss = 1e-12;
    in.options.softcap = 1e6;
    check_same(lce_test::reference(in, true, upstream), base, 1e-7);
  }
}

TEST_CASE("reference: temperature τ is the same as W/τ and b/τ", "[reference][options]") {
  const std::uint64_t seed = lce_test::fresh_seed();
  CAPTURE(seed);
  lce_test::random_source rng(seed);
  const reduction red = GENERATE(reduction::mean, reduction::sum, reduction::none);
  CAPTURE(name(red));
  reference_input in = random_input(rng, 10, 7, 12, true, 0.2, red, 3.0);
  in.options.temperature = 2.0;  // dividing by 2 is exact
  in.options.label_smoothing = 0.1;
  in.options.z_loss = 0.01;
  const std::vector<double> upstream = upstream_for(rng, red, in.n);
  const auto tempered = lce_test::reference(in, true, upstream);
  reference_input scaled = in;
  scaled.options.temperature = 1.0;
  for (double& value : scaled.w) value /= 2.0;
  for (double& value : scaled.bias) value /= 2.0;
  reference_output expected = lce_test::reference(scaled, true, upstream);
  // L(W) = L'(W/τ): dL/dW = dL'/dW' / τ, dL/db likewise; dL/dX is the same.
  for (double& value : expected.dw) value /= 2.0;
  for (double& value : expected.db) value /= 2.0;
  check_same(tempered, expected, 1e-13);
}

TEST_CASE("reference: class weights, z-loss and smoothing invariances", "[reference][options]") {
  const std::uint64_t seed = lce_test::fresh_seed();
  CAPTURE(seed);
  lce_test::random_source rng(seed);
  const reduction red = GENERATE(reduction::mean, reduction::sum);
  CAPTURE(name(red));
  const reference_input plain = random_input(rng, 11, 5, 9, true, 0.2, red, 2.0);
  const auto base = lce_test::reference(plain, true);

  SECTION("equal class weights c: mean unchanged, sum scaled by c") {
    reference_input in = plain;
    in.options.label_smoothing = 0.3;
    const auto smoothed = lce_test::reference(in, true);
    in.class_weight.assign(static_cast<std::size_t>(in.v), 2.5);
    const auto weighted = lce_test::reference(in, true);
    const double c = red == reduction::mean ? 1.0 : 2.5;
    CHECK(weighted.loss == Approx(c * smoothed.loss).epsilon(1e-13));
    CHECK(weighted.ce_denom == Approx(2.5 * static_cast<double>(smoothed.n_valid)).epsilon(1e-14));
    for (std::size_t e = 0; e < base.dw.size(); ++e)
      CHECK(weighted.dw[e] == Approx(c * smoothed.dw[e]).epsilon(1e-12).margin(1e-15));
  }
  SECTION("z-loss adds s·lse² per valid row (mean over n_valid), and only that") {
    reference_input in = plain;
    in.options.z_loss = 0.07;
    const auto zl = lce_test::reference(in, false);
    double total = 0.0;
    for (std::size_t i = 0; i < base.lse.size(); ++i) {
      if (base.targets[i] == plain.ignore_index) continue;
      total += 0.07 * base.lse[i] * base.lse[i];
      CHECK(zl.token_z_loss[i] == Approx(0.07 * base.lse[i] * base.lse[i]).epsilon(1e-14));
      CHECK(zl.token_loss[i] - zl.token_z_loss[i] == Approx(base.token_loss[i]).epsilon(1e-12));
    }
    const double expected =
        red == reduction::mean ? total / static_cast<double>(base.n_valid) : total;
    CHECK(zl.z_loss == Approx(expected).epsilon(1e-13));
    CHECK(zl.loss - zl.z_loss == Approx(base.loss).epsilon(1e-12));
  }
  SECTION("α = 1 with unit weights: the loss of a valid row does not depend on its target") {
    reference_input in = plain;
    in.options.label_smoothing = 1.0;
    const auto a = lce_test::reference(in, true);
    for (auto& y : in.targets) {
      if (y != in.ignore_index) y = (y + 3) % in.v;
    }
    const auto b = lce_test::reference(in, true);
    CHECK(lce_test::rel_frobenius(a.token_loss, b.token_loss) <= 1e-14);
    CHECK(lce_test::rel_frobenius(a.dx, b.dx) <= 1e-13);
    CHECK(lce_test::rel_frobenius(a.dw, b.dw) <= 1e-13);
  }
}

TEST_CASE("reference: the causal shift is the shifted targets", "[reference][options]") {
  const std::uint64_t seed = lce_test::fresh_seed();
  CAPTURE(seed);
  lce_test::random_source rng(seed);
  const reduction red = GENERATE(reduction::mean, reduction::sum, reduction::none);
  const std::int64_t seq_len = GENERATE(std::int64_t{1}, std::int64_t{3}, std::int64_t{12});
  CAPTURE(name(red), seq_len);
  reference_input in = random_input(rng, 12, 5, 9, true, 0.2, red, 2.0);
  in.options.shift_seq_len = seq_len;
  in.options.label_smoothing = 0.1;
  const std::vector<double> upstream = upstream_for(rng, red, in.n);
  const auto shifted = lce_test::reference(in, true, upstream);

  reference_input manual = in;
  manual.options.shift_seq_len = 0;
  for (std::int64_t r = 0; r < in.n; ++r) {
    manual.targets[static_cast<std::size_t>(r)] =
        r % seq_len == seq_len - 1 ? in.ignore_index : in.targets[static_cast<std::size_t>(r + 1)];
  }
  check_same(shifted, lce_test::reference(manual, true, upstream), 0.0);
  std::int64_t sequence_ends = 0;
  for (std::int64_t r = 0; r < in.n; ++r) {
    if (r % seq_len == seq_len - 1) {
      ++sequence_ends;
      CHECK(shifted.token_loss[static_cast<std::size_t>(r)] == 0.0);
    }
  }
  CHECK(shifted.n_valid <= in.n - sequence_ends);

  SECTION("n not a multiple of T is rejected") {
    reference_input bad = in;
    bad.options.shift_seq_len = 5;
    CHECK_THROWS(lce_test::reference(bad, false));
  }
}

TEST_CASE("reference: a large softcap and a small one", "[reference][options]") {
  const std::uint64_t seed = lce_test::fresh_seed();
  CAPTURE(seed);
  lce_test::random_source rng(seed);
  reference_input in = random_input(rng, 8, 6, 40, true, 0.0, reduction::mean, 30.0);
  in.options.softcap = 1.5;
  const auto out = lce_test::reference(in, true);
  for (std::size_t i = 0; i < out.lse.size(); ++i) {
    // |z| ≤ c: lse ≤ c + log V, entropy within [0, log V]
    CHECK(out.lse[i] <= 1.5 + std::log(40.0) + 1e-12);
    CHECK(out.max_logit[i] <= 1.5);
    CHECK(out.entropy[i] >= 0.0);
    CHECK(out.entropy[i] <= std::log(40.0) + 1e-12);
  }
  CHECK(lce_test::all_finite(out.dx));
  CHECK(lce_test::all_finite(out.dw));
}

TEST_CASE("reference_row_scales with class weights", "[reference][options]") {
  using lce_test::reference_row_scales;
  const std::vector<std::int64_t> targets{3, -100, 1, 0};
  const std::vector<double> weights{0.5, 2.0, 9.0, 1.5};
  const auto mean = reference_row_scales(targets, -100, reduction::mean, {3.0}, weights);
  const double w = 1.5 + 2.0 + 0.5;  // w_3 + w_1 + w_0
  CHECK(mean.ce == std::vector<double>{3.0 / w, 0.0, 3.0 / w, 3.0 / w});
  CHECK(mean.z == std::vector<double>{1.0, 0.0, 1.0, 1.0});
  const auto sum = reference_row_scales(targets, -100, reduction::sum, {2.0}, weights);
  CHECK(sum.ce == std::vector<double>{2.0, 0.0, 2.0, 2.0});
  CHECK(sum.z == sum.ce);
  const auto none =
      reference_row_scales(targets, -100, reduction::none, {1.0, 2.0, 3.0, 4.0}, weights);
  CHECK(none.ce == std::vector<double>{1.0, 0.0, 3.0, 4.0});
  CHECK(none.z == none.ce);
  const auto empty = reference_row_scales({-100, -100}, -100, reduction::mean, {}, {1.0});
  CHECK(empty.ce == std::vector<double>{0.0, 0.0});
  CHECK(empty.z == std::vector<double>{0.0, 0.0});
}
