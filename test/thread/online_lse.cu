// CPU tests of thread/online_lse.cuh: the streaming log-sum-exp state, its merge and push,
// against log-sum-exp computed directly in double.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <lce/thread/online_lse.cuh>
#include <limits>
#include <numeric>
#include <vector>

#include "support/device_buffer.hpp"
#include "support/formulas.hpp"

namespace {

using lce::thread::lse_identity;
using lce::thread::lse_merge;
using lce::thread::lse_state;
using lce::thread::lse_value;
using lce_test::lse_push;

constexpr float inf = std::numeric_limits<float>::infinity();

/// log Σ exp(z) in double with the max shift.
double lse_double(const std::vector<float>& z) {
  double m = -std::numeric_limits<double>::infinity();
  for (float value : z) m = std::max(m, static_cast<double>(value));
  if (m == -std::numeric_limits<double>::infinity()) return m;
  double s = 0.0;
  for (float value : z) s += std::exp(static_cast<double>(value) - m);
  return m + std::log(s);
}

lse_state push_all(lse_state s, const std::vector<float>& z, std::size_t begin, std::size_t end) {
  for (std::size_t i = begin; i < end; ++i) s = lse_push(s, z[i]);
  return s;
}

/// fp32 accumulation of n terms: absolute error of the lse about n·eps in the worst case.
double lse_tolerance(std::size_t count, double reference) {
  return 4e-7 * static_cast<double>(count) + 1e-6 * std::fabs(reference) + 1e-6;
}

std::vector<float> random_values(lce_test::random_source& rng, std::size_t count, double lo,
                                 double hi) {
  std::vector<float> z(count);
  for (float& value : z) value = static_cast<float>(rng.uniform(lo, hi));
  return z;
}

}  // namespace

TEST_CASE("lse_identity is the empty set {-inf, 0}", "[thread][online_lse]") {
  const lse_state e = lse_identity();
  CHECK(e.max == -inf);
  CHECK(e.sum == 0.0f);
  CHECK(lse_value(e) == -inf);
}

TEST_CASE("merging two empty states gives the empty state, not NaN", "[thread][online_lse]") {
  const lse_state m = lse_merge(lse_identity(), lse_identity());
  CHECK(m.max == -inf);
  CHECK(m.sum == 0.0f);
  CHECK_FALSE(std::isnan(m.max));
  CHECK_FALSE(std::isnan(m.sum));
  CHECK(lse_value(m) == -inf);
}

TEST_CASE("the empty state is the identity of merge", "[thread][online_lse]") {
  const std::uint64_t seed = lce_test::fresh_seed();
  CAPTURE(seed);
  lce_test::random_source rng(seed);
  for (int trial = 0; trial < 100; ++trial) {
    const lse_state s = push_all(lse_identity(), random_values(rng, 5, -80.0, 80.0), 0, 5);
    const lse_state left = lse_merge(lse_identity(), s);
    const lse_state right = lse_merge(s, lse_identity());
    CHECK(left.max == s.max);
    CHECK(left.sum == s.sum);
    CHECK(right.max == s.max);
    CHECK(right.sum == s.sum);
  }
}

TEST_CASE("pushing -inf leaves the state unchanged", "[thread][online_lse]") {
  SECTION("empty state") {
    const lse_state s = lse_push(lse_identity(), -inf);
    CHECK(s.max == -inf);
    CHECK(s.sum == 0.0f);
    CHECK(lse_value(s) == -inf);
  }
  SECTION("non-empty state") {
    const lse_state s = lse_push(lse_push(lse_identity(), 3.5f), -2.0f);
    const lse_state t = lse_push(s, -inf);
    CHECK(t.max == s.max);
    CHECK(t.sum == s.sum);
  }
}

TEST_CASE("a single value gives lse == value exactly", "[thread][online_lse]") {
  for (float z : {0.0f, 1.0f, -1.0f, 80.0f, -80.0f, 1e30f, -1e30f}) {
    CAPTURE(z);
    const lse_state s = lse_push(lse_identity(), z);
    CHECK(s.max == z);
    CHECK(s.sum == 1.0f);
    CHECK(lse_value(s) == z);
  }
}

TEST_CASE("sequential push matches the double log-sum-exp", "[thread][online_lse]") {
  const std::uint64_t seed = lce_test::fresh_seed();
  CAPTURE(seed);
  lce_test::random_source rng(seed);
  struct range {
    double lo, hi;
  };
  const auto r = GENERATE(range{-1.0, 1.0}, range{-80.0, 80.0}, range{-200.0, 200.0},
                          range{-1e4, -1e4 + 30.0}, range{1e4, 1e4 + 30.0});
  const std::size_t count = GENERATE(1u, 2u, 7u, 128u, 1000u);
  CAPTURE(r.lo, r.hi, count);
  const std::vector<float> z = random_values(rng, count, r.lo, r.hi);
  const lse_state s = push_all(lse_identity(), z, 0, z.size());
  const double expected = lse_double(z);
  CHECK(std::isfinite(lse_value(s)));
  CHECK(std::fabs(lse_value(s) - expected) <= lse_tolerance(count, expected));
  // The max is exact and the sum of the shifted exponentials lies in [1, count].
  CHECK(s.max == *std::max_element(z.begin(), z.end()));
  CHECK(s.sum >= 1.0f);
  CHECK(s.sum <= static_cast<float>(count) * (1.0f + 1e-5f));
}

TEST_CASE("merge is order independent: random partitions and merge trees", "[thread][online_lse]") {
  const std::uint64_t seed = lce_test::fresh_seed();
  CAPTURE(seed);
  lce_test::random_source rng(seed);
  for (int trial = 0; trial < 200; ++trial) {
    const auto count = static_cast<std::size_t>(rng.integer(1, 600));
    const double scale = trial % 2 == 0 ? 80.0 : 5.0;
    std::vector<float> z = random_values(rng, count, -scale, scale);
    const double expected = lse_double(z);
    CAPTURE(trial, count, scale);

    // Random cut points, some parts empty.
    std::vector<std::size_t> cuts{0, count};
    const auto parts = rng.integer(1, 12);
    for (std::int64_t p = 0; p < parts; ++p) {
      cuts.push_back(static_cast<std::size_t>(rng.integer(0, static_cast<std::int64_t>(count))));
    }
    std::sort(cuts.begin(), cuts.end());
    std::vector<lse_state> states;
    for (std::size_t c = 0; c + 1 < cuts.size(); ++c) {
      states.push_back(push_all(lse_identity(), z, cuts[c], cuts[c + 1]));
    }
    // Merge random neighbours (any binary tree over the ordered parts), then also in a random
    // permutation of the parts (commutativity).
    std::vector<lse_state> tree = states;
    while (tree.size() > 1) {
      const auto i =
          static_cast<std::size_t>(rng.integer(0, static_cast<std::int64_t>(tree.size()) - 2));
      tree[i] = lse_merge(tree[i], tree[i + 1]);
      tree.erase(tree.begin() + static_cast<std::ptrdiff_t>(i) + 1);
    }
    std::vector<lse_state> shuffled = states;
    std::shuffle(shuffled.begin(), shuffled.end(), rng.engine());
    lse_state folded = lse_identity();
    for (const lse_state& s : shuffled) folded = lse_merge(folded, s);

    const float sequential = lse_value(push_all(lse_identity(), z, 0, count));
    CHECK(std::fabs(lse_value(tree[0]) - expected) <= lse_tolerance(count, expected));
    CHECK(std::fabs(lse_value(folded) - expected) <= lse_tolerance(count, expected));
    CHECK(std::fabs(lse_value(tree[0]) - sequential) <= 2 * lse_tolerance(count, expected));
    CHECK(tree[0].max == folded.max);
  }
}

TEST_CASE("large magnitudes do not overflow or underflow", "[thread][online_lse]") {
  // exp(±1e3) overflows float: the max shift must keep every exponent <= 0.
  const std::vector<float> z{1000.0f, 999.0f, -1000.0f, 998.5f};
  const lse_state s = push_all(lse_identity(), z, 0, z.size());
  CHECK(std::isfinite(s.sum));
  CHECK(std::fabs(lse_value(s) - lse_double(z)) <= 1e-4);
  const std::vector<float> tiny{-1000.0f, -1001.0f, -1002.0f};
  const lse_state t = push_all(lse_identity(), tiny, 0, tiny.size());
  CHECK(std::fabs(lse_value(t) - lse_double(tiny)) <= 1e-4);
  // Merging states of very different magnitude: the smaller one vanishes, no NaN.
  const lse_state big = lse_push(lse_identity(), 1e30f);
  const lse_state small = lse_push(lse_identity(), -1e30f);
  const lse_state both = lse_merge(small, big);
  CHECK(both.max == 1e30f);
  CHECK(both.sum == 1.0f);
}

TEST_CASE("NaN propagates through push and merge", "[thread][online_lse]") {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const lse_state finite = lse_push(lse_push(lse_identity(), 1.0f), 2.0f);
  SECTION("push NaN into a non-empty state") {
    CHECK(std::isnan(lse_value(lse_push(finite, nan))));
  }
  SECTION("push a value into a NaN state") {
    const lse_state s = lse_push(finite, nan);
    CHECK(std::isnan(lse_value(lse_push(s, 5.0f))));
    CHECK(std::isnan(lse_value(lse_push(s, -inf))));
  }
  SECTION("merge with a NaN state, either side") {
    const lse_state bad{nan, 1.0f};
    CHECK(std::isnan(lse_value(lse_merge(finite, bad))));
    CHECK(std::isnan(lse_value(lse_merge(bad, finite))));
  }
  SECTION("push NaN into the empty state") {
    // A NaN logit must never be silently dropped, even as the first value of a row.
    CHECK(std::isnan(lse_value(lse_push(lse_identity(), nan))));
    CHECK(std::isnan(lse_value(lse_merge(lse_identity(), lse_state{nan, 1.0f}))));
    CHECK(std::isnan(lse_value(lse_merge(lse_state{nan, 1.0f}, lse_identity()))));
  }
  SECTION("a NaN sum propagates") {
    CHECK(std::isnan(lse_value(lse_merge(finite, lse_state{0.0f, nan}))));
  }
}
