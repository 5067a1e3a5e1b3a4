// CPU tests of thread/row_stats.cuh: the mergeable per-row statistics (online lse, Σ p·z for
// the entropy, Σ w·z for label smoothing, first argmax), against the same quantities computed
// directly in double, for every push/merge order the kernels may use.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <functional>
#include <lce/thread/row_stats.cuh>
#include <limits>
#include <numeric>
#include <vector>

#include "support/device_buffer.hpp"

namespace {

using lce::thread::row_entropy;
using lce::thread::row_lse;
using lce::thread::row_stats;
using lce::thread::row_stats_identity;
using lce::thread::row_stats_merge;
using lce::thread::row_stats_push;

constexpr float inf = std::numeric_limits<float>::infinity();
constexpr float nan_f = std::numeric_limits<float>::quiet_NaN();

/// The statistics of (z, w) computed directly in double.
struct direct_stats {
  double lse = -std::numeric_limits<double>::infinity();
  double entropy = 0.0;
  double sum_wz = 0.0;
  std::int64_t argmax = -1;
  double max_abs = 0.0;  ///< max |z| (for tolerances)
};

direct_stats direct(const std::vector<float>& z, const std::vector<float>& w) {
  direct_stats s;
  double m = -std::numeric_limits<double>::infinity();
  for (std::size_t k = 0; k < z.size(); ++k) {
    if (z[k] == -inf) continue;
    if (static_cast<double>(z[k]) > m) {
      m = z[k];
      s.argmax = static_cast<std::int64_t>(k);
    }
    s.max_abs = std::max(s.max_abs, std::fabs(static_cast<double>(z[k])));
  }
  for (std::size_t k = 0; k < z.size(); ++k) {
    if (z[k] != -inf) s.sum_wz += static_cast<double>(w[k]) * static_cast<double>(z[k]);
  }
  if (s.argmax < 0) return s;
  double sum = 0.0;
  for (float value : z) sum += std::exp(static_cast<double>(value) - m);
  s.lse = m + std::log(sum);
  for (float value : z) {
    if (value == -inf) continue;
    const double logp = static_cast<double>(value) - s.lse;
    s.entropy -= std::exp(logp) * logp;
  }
  return s;
}

row_stats push_range(row_stats s, const std::vector<float>& z, const std::vector<float>& w,
                     std::size_t begin, std::size_t end) {
  for (std::size_t k = begin; k < end; ++k)
    s = row_stats_push(s, static_cast<std::int64_t>(k), z[k], w[k]);
  return s;
}

/// fp32 accumulation of `count` terms of magnitude up to `scale`.
double lse_tolerance(std::size_t count, double reference) {
  return 4e-7 * static_cast<double>(count) + 1e-6 * std::fabs(reference) + 1e-6;
}
double entropy_tolerance(std::size_t count, double max_abs) {
  return 4e-7 * static_cast<double>(count) * (1.0 + max_abs) + 1e-5;
}
double sum_wz_tolerance(std::size_t count, const std::vector<float>& z,
                        const std::vector<float>& w) {
  double total = 0.0;
  for (std::size_t k = 0; k < z.size(); ++k)
    total += std::fabs(static_cast<double>(z[k]) * static_cast<double>(w[k]));
  return 1.2e-7 * static_cast<double>(count) * total + 1e-6;
}

void check_against_direct(const row_stats& s, const std::vector<float>& z,
                          const std::vector<float>& w) {
  const direct_stats ref = direct(z, w);
  const float lse = row_lse(s);
  const float entropy = row_entropy(s, lse);
  CAPTURE(z.size(), ref.lse, lse, ref.entropy, entropy, ref.sum_wz, s.sum_wz, ref.argmax, s.argmax);
  CHECK(s.argmax == ref.argmax);
  CHECK(std::fabs(lse - ref.lse) <= lse_tolerance(z.size(), ref.lse));
  CHECK(std::fabs(entropy - ref.entropy) <= entropy_tolerance(z.size(), ref.max_abs));
  CHECK(std::fabs(s.sum_wz - ref.sum_wz) <= sum_wz_tolerance(z.size(), z, w));
  // 0 ≤ H ≤ log(count), up to the rounding the tolerance allows.
  CHECK(entropy >= -entropy_tolerance(z.size(), ref.max_abs));
  CHECK(entropy <=
        std::log(static_cast<double>(z.size())) + entropy_tolerance(z.size(), ref.max_abs));
}

/// Values on a coarse grid, so that the maximum is often tied.
std::vector<float> tied_values(lce_test::random_source& rng, std::size_t count, int levels,
                               double scale) {
  std::vector<float> z(count);
  for (float& value : z)
    value = static_cast<float>(scale * static_cast<double>(rng.integer(-levels, levels)) / levels);
  return z;
}

std::vector<float> random_values(lce_test::random_source& rng, std::size_t count, double scale) {
  std::vector<float> z(count);
  for (float& value : z) value = static_cast<float>(rng.uniform(-scale, scale));
  return z;
}

std::vector<float> random_weights(lce_test::random_source& rng, std::size_t count, bool unit) {
  std::vector<float> w(count, 1.0f);
  if (!unit) {
    for (float& value : w) value = static_cast<float>(rng.uniform(0.0, 2.0));
  }
  return w;
}

/// Splits [0, count) into random contiguous pieces, pushes each into its own state, then merges
/// the pieces in a random binary tree in a random order (the kernels merge tile, warp and
/// split results in several orders).
row_stats random_tree(lce_test::random_source& rng, const std::vector<float>& z,
                      const std::vector<float>& w) {
  std::vector<row_stats> parts;
  std::size_t begin = 0;
  while (begin < z.size()) {
    const auto len = static_cast<std::size_t>(
        rng.integer(0, static_cast<std::int64_t>(std::min<std::size_t>(z.size() - begin, 40))));
    parts.push_back(push_range(row_stats_identity(), z, w, begin, begin + len));
    begin += len;
    if (rng.bernoulli(0.1)) parts.push_back(row_stats_identity());  // empty pieces too
  }
  if (parts.empty()) return row_stats_identity();
  while (parts.size() > 1) {
    const auto i =
        static_cast<std::size_t>(rng.integer(0, static_cast<std::int64_t>(parts.size()) - 1));
    auto j = static_cast<std::size_t>(rng.integer(0, static_cast<std::int64_t>(parts.size()) - 2));
    if (j >= i) ++j;
    const row_stats merged = rng.bernoulli(0.5) ? row_stats_merge(parts[i], parts[j])
                                                : row_stats_merge(parts[j], parts[i]);
    parts[std::min(i, j)] = merged;
    parts.erase(parts.begin() + static_cast<std::ptrdiff_t>(std::max(i, j)));
  }
  return parts[0];
}

}  // namespace

TEST_CASE("row_stats_identity is the empty set", "[thread][row_stats]") {
  const row_stats e = row_stats_identity();
  CHECK(e.max == -inf);
  CHECK(e.sum == 0.0f);
  CHECK(e.sum_pz == 0.0f);
  CHECK(e.sum_wz == 0.0f);
  CHECK(e.argmax == -1);
  CHECK(row_lse(e) == -inf);
}

TEST_CASE("row_stats: merging empty states gives the empty state, never NaN",
          "[thread][row_stats]") {
  const row_stats m = row_stats_merge(row_stats_identity(), row_stats_identity());
  CHECK(m.max == -inf);
  CHECK(m.sum == 0.0f);
  CHECK(m.sum_pz == 0.0f);
  CHECK(m.sum_wz == 0.0f);
  CHECK(m.argmax == -1);
  CHECK_FALSE(std::isnan(m.sum));
  // -inf pushes (masked columns) leave the empty state empty.
  row_stats s = row_stats_identity();
  s = row_stats_push(s, 3, -inf, 1.0f);
  s = row_stats_push(s, 4, -inf, 2.0f);
  CHECK(s.max == -inf);
  CHECK(s.sum == 0.0f);
  CHECK(s.argmax == -1);
  CHECK(row_lse(s) == -inf);
}

TEST_CASE("row_stats: the empty state is an identity on both sides", "[thread][row_stats]") {
  const std::uint64_t seed = lce_test::fresh_seed();
  CAPTURE(seed);
  lce_test::random_source rng(seed);
  for (int trial = 0; trial < 50; ++trial) {
    const std::size_t count = static_cast<std::size_t>(rng.integer(1, 50));
    const std::vector<float> z = random_values(rng, count, 30.0);
    const std::vector<float> w = random_weights(rng, count, false);
    const row_stats a = push_range(row_stats_identity(), z, w, 0, count);
    for (const row_stats& m :
         {row_stats_merge(a, row_stats_identity()), row_stats_merge(row_stats_identity(), a)}) {
      CHECK(m.max == a.max);
      CHECK(m.sum == a.sum);
      CHECK(m.sum_pz == a.sum_pz);
      CHECK(m.sum_wz == a.sum_wz);
      CHECK(m.argmax == a.argmax);
    }
  }
}

TEST_CASE("row_stats: a single element", "[thread][row_stats]") {
  const row_stats s = row_stats_push(row_stats_identity(), 17, 2.5f, 0.5f);
  CHECK(s.max == 2.5f);
  CHECK(s.sum == 1.0f);
  CHECK(s.sum_pz == 2.5f);
  CHECK(s.sum_wz == 1.25f);
  CHECK(s.argmax == 17);
  CHECK(row_lse(s) == 2.5f);
  CHECK(row_entropy(s, row_lse(s)) == 0.0f);  // a one-point distribution has no entropy
}

TEST_CASE("row_stats: pushes match the direct double computation", "[thread][row_stats]") {
  const std::uint64_t seed = lce_test::fresh_seed();
  CAPTURE(seed);
  lce_test::random_source rng(seed);
  for (int trial = 0; trial < 200; ++trial) {
    const std::size_t count = static_cast<std::size_t>(rng.integer(1, 1000));
    const double scale = trial % 3 == 0 ? 1.0 : trial % 3 == 1 ? 20.0 : 300.0;
    const bool ties = trial % 4 == 0;
    const std::vector<float> z =
        ties ? tied_values(rng, count, 4, scale) : random_values(rng, count, scale);
    const std::vector<float> w = random_weights(rng, count, trial % 2 == 0);
    CAPTURE(trial, count, scale, ties);
    check_against_direct(push_range(row_stats_identity(), z, w, 0, count), z, w);
  }
}

TEST_CASE("row_stats: merge order and grouping do not matter (incl. argmax ties)",
          "[thread][row_stats]") {
  const std::uint64_t seed = lce_test::fresh_seed();
  CAPTURE(seed);
  lce_test::random_source rng(seed);
  for (int trial = 0; trial < 200; ++trial) {
    const std::size_t count = static_cast<std::size_t>(rng.integer(1, 600));
    const bool ties = trial % 2 == 0;
    const std::vector<float> z =
        ties ? tied_values(rng, count, 3, 10.0) : random_values(rng, count, 40.0);
    const std::vector<float> w = random_weights(rng, count, trial % 3 == 0);
    CAPTURE(trial, count, ties);
    const row_stats sequential = push_range(row_stats_identity(), z, w, 0, count);
    for (int order = 0; order < 4; ++order) {
      CAPTURE(order);
      const row_stats tree = random_tree(rng, z, w);
      // The first maximum, whatever the grouping: exact.
      CHECK(tree.argmax == sequential.argmax);
      CHECK(tree.max == sequential.max);
      check_against_direct(tree, z, w);
    }
  }
}

TEST_CASE("row_stats: ties of the maximum keep the smaller index in either merge order",
          "[thread][row_stats]") {
  const row_stats a = row_stats_push(row_stats_identity(), 9, 4.0f, 1.0f);
  const row_stats b = row_stats_push(row_stats_identity(), 2, 4.0f, 1.0f);
  const row_stats c = row_stats_push(row_stats_identity(), 5, 3.0f, 1.0f);
  CHECK(row_stats_merge(a, b).argmax == 2);
  CHECK(row_stats_merge(b, a).argmax == 2);
  CHECK(row_stats_merge(row_stats_merge(c, a), b).argmax == 2);
  CHECK(row_stats_merge(c, row_stats_merge(a, b)).argmax == 2);
  CHECK(row_stats_merge(a, c).argmax == 9);
  CHECK(row_stats_merge(c, a).argmax == 9);
  // Within one state: pushes in decreasing index order still give the smallest index.
  row_stats s = row_stats_identity();
  for (std::int64_t k = 10; k >= 0; --k) s = row_stats_push(s, k, 1.0f, 1.0f);
  CHECK(s.argmax == 0);
  s = row_stats_identity();
  for (std::int64_t k = 0; k <= 10; ++k) s = row_stats_push(s, k, 1.0f, 1.0f);
  CHECK(s.argmax == 0);
  CHECK(row_lse(s) == Approx(1.0 + std::log(11.0)).epsilon(1e-6));
  CHECK(row_entropy(s, row_lse(s)) == Approx(std::log(11.0)).epsilon(1e-5));
  // An empty state's argmax (-1) never wins a tie.
  CHECK(row_stats_merge(row_stats_identity(), b).argmax == 2);
  CHECK(row_stats_merge(b, row_stats_identity()).argmax == 2);
}

TEST_CASE("row_stats: -inf values change nothing but sum_wz stays finite", "[thread][row_stats]") {
  std::vector<float> z{1.0f, -inf, 3.0f, -inf, 2.0f};
  const std::vector<float> w{1.0f, 1.0f, 1.0f, 1.0f, 1.0f};
  const row_stats s = push_range(row_stats_identity(), z, w, 0, z.size());
  CHECK(s.argmax == 2);
  CHECK(std::isfinite(s.sum));
  CHECK(std::isfinite(s.sum_pz));
  CHECK(std::isfinite(s.sum_wz));
  const std::vector<float> finite{1.0f, 3.0f, 2.0f};
  const std::vector<float> ones{1.0f, 1.0f, 1.0f};
  const direct_stats ref = direct(finite, ones);
  CHECK(row_lse(s) == Approx(ref.lse).epsilon(1e-6));
  CHECK(row_entropy(s, row_lse(s)) == Approx(ref.entropy).epsilon(1e-5));
}

TEST_CASE("row_stats: NaN propagates through max, sum and the lse", "[thread][row_stats]") {
  const std::uint64_t seed = lce_test::fresh_seed();
  CAPTURE(seed);
  lce_test::random_source rng(seed);
  for (int trial = 0; trial < 20; ++trial) {
    const std::size_t count = static_cast<std::size_t>(rng.integer(2, 100));
    std::vector<float> z = random_values(rng, count, 10.0);
    const std::vector<float> w = random_weights(rng, count, true);
    const auto bad = static_cast<std::size_t>(rng.integer(0, static_cast<std::int64_t>(count) - 1));
    z[bad] = nan_f;
    CAPTURE(trial, count, bad);
    const row_stats sequential = push_range(row_stats_identity(), z, w, 0, count);
    CHECK(std::isnan(sequential.max));
    CHECK(std::isnan(row_lse(sequential)));
    const row_stats tree = random_tree(rng, z, w);
    CHECK(std::isnan(tree.max));
    CHECK(std::isnan(row_lse(tree)));
    CHECK(std::isnan(row_entropy(tree, row_lse(tree))));
  }
  // NaN in either operand of a merge, and against the empty state.
  const row_stats nan_state = row_stats_push(row_stats_identity(), 0, nan_f, 1.0f);
  const row_stats finite = row_stats_push(row_stats_identity(), 1, 5.0f, 1.0f);
  CHECK(std::isnan(row_lse(row_stats_merge(nan_state, finite))));
  CHECK(std::isnan(row_lse(row_stats_merge(finite, nan_state))));
  CHECK(std::isnan(row_lse(row_stats_merge(nan_state, row_stats_identity()))));
  CHECK(std::isnan(row_lse(row_stats_merge(row_stats_identity(), nan_state))));
  CHECK(std::isnan(row_lse(row_stats_push(finite, 2, nan_f, 1.0f))));
}

TEST_CASE("row_stats: large logits stay finite (no exp overflow)", "[thread][row_stats]") {
  const std::vector<float> z{1e30f, 1e30f - 1e24f, -1e30f, 5e29f};
  const std::vector<float> w{1.0f, 1.0f, 1.0f, 1.0f};
  const row_stats s = push_range(row_stats_identity(), z, w, 0, z.size());
  CHECK(std::isfinite(s.sum));
  CHECK(s.argmax == 0);
  CHECK(row_lse(s) == Approx(1e30).epsilon(1e-6));
  const row_stats split = row_stats_merge(push_range(row_stats_identity(), z, w, 2, 4),
                                          push_range(row_stats_identity(), z, w, 0, 2));
  CHECK(split.argmax == 0);
  CHECK(row_lse(split) == Approx(1e30).epsilon(1e-6));
}
