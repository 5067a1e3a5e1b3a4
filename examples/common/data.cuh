/// @file data.cuh
/// @brief Device-side generators of the three data families of DESIGN.md §4 (X [n, d],
/// W [v, d] in the element type, int64 targets [n]), from a counter-based hash: the same seed
/// gives the same data on any GPU, and a W of 10⁹ elements takes milliseconds.
///
/// - flat: X and W i.i.d. N(0, 1/√d) (variance), so every logit has variance d·(1/√d)² = 1;
///   targets uniform. The softmax is nearly uniform: loss ≈ ln v + 1/2.
/// - peaked: flat, then for about half of the rows i (chosen by hash), one row of W is set to
///   a multiple of x_i, W[t_i] = β·x_i with β = (ln v + 4)/‖x_i‖², and t_i is the target of
///   row i (t_i distinct across rows). The target logit is ln v + 4 while the other logits
///   keep variance ~1, so those rows put ~97% of their mass on the target; loss ≈ half of
///   the flat one.
/// - lm: a Zipf prior plus a few strong candidates per row, aiming at the entropy of a trained
///   LM (1–3 nats; ~1.9 on average, 0.9–3.7 across rows, estimated offline for v = 32k…256k).
///   * Prior: token id k has frequency rank k (as in byte-pair vocabularies, roughly). Column 0
///     is a shared direction: X[i, 0] = 1 and W[k, 0] = −ln(k + 1), which adds the log of a
///     Zipf(1) probability (up to a constant) to every logit. The other columns are flat
///     noise with logit variance 1: (d − 1)·σ⁴ = 1.
///   * Candidates: row i gets K = min(4, v / n) candidate tokens, distinct across rows and
///     drawn among the n·K most frequent ids (a random permutation of [0, n·K)). Candidate j
///     of row i gets the logit L_ij = ln Z_tail + δ_i − j exactly, by adding a multiple of x_i
///     to that token's row of W over columns 1…d−1 (‖β·x_i‖ ≈ a third of the noise, so the
///     row still looks random to every other row: cross-talk ~0.35 in logit std). Here
///     ln Z_tail = ln H_v + 1/2 is the expected log partition function of the prior plus the
///     noise and δ_i ~ U[0.5, 3.5] sets how confident the row is.
///   * Targets are drawn from the row's distribution, approximately: candidate j with weight
///     e^(δ_i − j), the prior with weight 1 (its expected share); a draw from the prior is
///     k = ⌊(v + 1)^u⌋ − 1, the continuous approximation of Zipf(1). The loss is a little
///     above the entropy: 2.0–2.3 nats in a CPU emulation of small shapes.
/// For v < n (no room for distinct targets), peaked uses rows i < v only and lm has no
/// candidates (Zipf prior and noise only).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <lce/options.hpp>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>

#include "cuda_check.cuh"

namespace lce_example {

enum class data_family { flat, peaked, lm };

inline const char* to_string(data_family f) noexcept {
  switch (f) {
    case data_family::flat:
      return "flat";
    case data_family::peaked:
      return "peaked";
    case data_family::lm:
      return "lm";
  }
  return "?";
}

/// Parses "flat", "peaked" or "lm"; false for anything else.
inline bool parse_family(const std::string& text, data_family& out) noexcept {
  for (data_family f : {data_family::flat, data_family::peaked, data_family::lm}) {
    if (text == to_string(f)) {
      out = f;
      return true;
    }
  }
  return false;
}

/// A fresh 64-bit seed from std::random_device.
inline std::uint64_t fresh_seed() {
  std::random_device device;
  return (static_cast<std::uint64_t>(device()) << 32) ^ device();
}

namespace detail {

/// splitmix64's finalizer: a bijective 64-bit mix with full avalanche.
__host__ __device__ inline std::uint64_t mix64(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

/// Independent random streams of one seed, one per quantity drawn.
enum stream_id : std::uint64_t {
  stream_x = 1,
  stream_w,
  stream_targets,
  stream_rows,
  stream_confidence,
};

__host__ __device__ inline std::uint64_t hash(std::uint64_t seed, std::uint64_t stream,
                                              std::uint64_t index) {
  return mix64(mix64(seed ^ (stream * 0x9e3779b97f4a7c15ull)) + index);
}

/// Uniform in [0, 1) with 24 random bits.
__host__ __device__ inline float uniform(std::uint64_t seed, std::uint64_t stream,
                                         std::uint64_t index) {
  return static_cast<float>(hash(seed, stream, index) >> 40) * 0x1p-24f;
}

/// Standard normal by Box–Muller from the two 24-bit halves of one hash (|value| < 5.8).
__host__ __device__ inline float normal(std::uint64_t seed, std::uint64_t stream,
                                        std::uint64_t index) {
  const std::uint64_t h = hash(seed, stream, index);
  const float u1 = static_cast<float>((h >> 40) + 1) * 0x1p-24f;  // (0, 1]
  const float u2 = static_cast<float>(h & 0xFFFFFFu) * 0x1p-24f;  // [0, 1)
  return sqrtf(-2.0f * logf(u1)) * cosf(6.28318531f * u2);
}

template <class Element>
__host__ __device__ inline Element from_float(float value) {
  if constexpr (std::is_same_v<Element, __nv_bfloat16>)
    return __float2bfloat16_rn(value);
  else if constexpr (std::is_same_v<Element, __half>)
    return __float2half_rn(value);
  else
    return value;
}

template <class Element>
__host__ __device__ inline float to_float(Element value) {
  if constexpr (std::is_same_v<Element, __nv_bfloat16>)
    return __bfloat162float(value);
  else if constexpr (std::is_same_v<Element, __half>)
    return __half2float(value);
  else
    return value;
}

/// The bijection s ↦ (a·s + b) mod m of [0, m), a coprime to m: distinct tokens for distinct
/// slots, scattered over [0, m).
struct permutation {
  std::int64_t a = 1, b = 0, m = 1;
  __host__ __device__ std::int64_t operator()(std::int64_t s) const {
    // a, b, s < m < 2^31: no overflow in 64 bits
    const auto product = static_cast<std::uint64_t>(a) * static_cast<std::uint64_t>(s);
    return static_cast<std::int64_t>((product + static_cast<std::uint64_t>(b)) %
                                     static_cast<std::uint64_t>(m));
  }
};

inline permutation make_permutation(std::int64_t m, std::uint64_t seed) {
  permutation p;
  p.m = std::max<std::int64_t>(m, 1);
  p.a = static_cast<std::int64_t>(mix64(seed) % static_cast<std::uint64_t>(p.m)) | 1;
  while (std::gcd(p.a, p.m) != 1) ++p.a;
  p.b = static_cast<std::int64_t>(mix64(seed + 1) % static_cast<std::uint64_t>(p.m));
  return p;
}

/// Everything that defines one draw; every value below is a pure function of it.
struct family_params {
  data_family family = data_family::flat;
  std::uint64_t seed = 0;
  std::int64_t n = 0, d = 0, v = 0;
  float sigma = 0.0f;         ///< std of the noise entries of X and W
  bool zipf = false;          ///< lm: column 0 carries the Zipf prior
  int candidates = 0;         ///< lm: candidates per row (K)
  float log_tail = 0.0f;      ///< lm: ln Z_tail
  float peaked_logit = 0.0f;  ///< peaked: the target logit of a peaked row
  permutation tokens;         ///< slot ↦ token (peaked: row i ↦ token; lm: i·K + j ↦ token)
  std::int64_t slots = 0;     ///< planted (row, token) pairs: peaked n' = min(n, v), lm n·K
};

inline family_params make_family_params(data_family family, const lce::problem& shape,
                                        std::uint64_t seed) {
  family_params p;
  p.family = family;
  p.seed = seed;
  p.n = shape.n;
  p.d = shape.d;
  p.v = shape.v;
  const double v = static_cast<double>(shape.v);
  if (family == data_family::lm) {
    p.zipf = shape.d > 1;
    const double noise_columns = static_cast<double>(p.zipf ? shape.d - 1 : shape.d);
    p.sigma = static_cast<float>(std::pow(noise_columns, -0.25));
    p.candidates = p.zipf ? static_cast<int>(std::min<std::int64_t>(4, shape.v / shape.n)) : 0;
    // ln(H_v · E[e^g]) with H_v ≈ ln v + γ + 1/(2v) and g ~ N(0, 1)
    p.log_tail = static_cast<float>(std::log(std::log(v) + 0.5772156649 + 0.5 / v) + 0.5);
    p.slots = shape.n * p.candidates;
    p.tokens = make_permutation(p.slots, seed);
  } else {
    p.sigma = static_cast<float>(std::pow(static_cast<double>(shape.d), -0.25));
    if (family == data_family::peaked) {
      p.peaked_logit = static_cast<float>(std::log(v) + 4.0);
      p.slots = std::min(shape.n, shape.v);
    }
    p.tokens = make_permutation(shape.v, seed);
  }
  return p;
}

/// Whether row i of the peaked family is peaked (about half of them; rows < v only).
__host__ __device__ inline bool is_peaked_row(const family_params& p, std::int64_t i) {
  return i < p.v && uniform(p.seed, stream_rows, static_cast<std::uint64_t>(i)) < 0.5f;
}

/// δ_i of the lm family: how far the top candidate stands above the prior's mass.
__host__ __device__ inline float confidence_of(const family_params& p, std::int64_t i) {
  return 0.5f + 3.0f * uniform(p.seed, stream_confidence, static_cast<std::uint64_t>(i));
}

/// X[e / d, e % d] before planting: noise; with the Zipf prior, column 0 is 1.
__host__ __device__ inline float x_value(const family_params& p, std::int64_t e) {
  if (p.zipf && e % p.d == 0) return 1.0f;
  return p.sigma * normal(p.seed, stream_x, static_cast<std::uint64_t>(e));
}

/// W[e / d, e % d] before planting: noise; with the Zipf prior, W[k, 0] = −ln(k + 1).
__host__ __device__ inline float w_value(const family_params& p, std::int64_t e) {
  if (p.zipf && e % p.d == 0) return -logf(static_cast<float>(e / p.d + 1));
  return p.sigma * normal(p.seed, stream_w, static_cast<std::uint64_t>(e));
}

/// What planting slot s does: give token `token` the logit `logit` in row `row`, by
/// W[token, first:] ← keep·W[token, first:] + β·x_row[first:]. peaked: W[t] becomes β·x_i
/// (keep 0, first 0); lm: the noise and the prior column stay (keep 1, first 1).
struct plant {
  std::int64_t row = -1;  ///< -1: the slot plants nothing (a row that is not peaked)
  std::int64_t token = 0;
  float logit = 0.0f;
  float keep = 0.0f;
  std::int64_t first = 0;
};

__host__ __device__ inline plant plant_of(const family_params& p, std::int64_t slot) {
  plant out;
  if (p.family == data_family::lm) {
    out.row = slot / p.candidates;
    out.logit = p.log_tail + confidence_of(p, out.row) - static_cast<float>(slot % p.candidates);
    out.keep = 1.0f;
    out.first = 1;
  } else if (is_peaked_row(p, slot)) {
    out.row = slot;
    out.logit = p.peaked_logit;
  }
  out.token = p.tokens(slot);
  return out;
}

/// The target of row i.
__host__ __device__ inline std::int64_t target_of(const family_params& p, std::int64_t i) {
  const float u = uniform(p.seed, stream_targets, static_cast<std::uint64_t>(i));
  const float v = static_cast<float>(p.v);
  std::int64_t y = static_cast<std::int64_t>(u * v);  // flat
  if (p.family == data_family::peaked && is_peaked_row(p, i)) {
    y = p.tokens(i);
  } else if (p.family == data_family::lm) {
    // Candidate j has weight e^(δ − j), the prior weight 1: walk the cumulative weights.
    const float delta = confidence_of(p, i);
    float total = 1.0f;
    for (int j = 0; j < p.candidates; ++j) total += expf(delta - static_cast<float>(j));
    float mass = u * total;
    y = -1;
    for (int j = 0; j < p.candidates && y < 0; ++j) {
      mass -= expf(delta - static_cast<float>(j));
      if (mass < 0.0f) y = p.tokens(i * p.candidates + j);
    }
    if (y < 0) {  // from the prior: Zipf(1) by the continuous inverse CDF, from a fresh draw
      const float u2 = uniform(p.seed, stream_targets, static_cast<std::uint64_t>(p.n + i));
      y = static_cast<std::int64_t>(expf(u2 * log1pf(v))) - 1;
    }
  }
  return y < 0 ? 0 : y >= p.v ? p.v - 1 : y;  // float rounding can reach v
}

template <class Element>
__global__ void fill_x_kernel(family_params p, Element* x) {
  const std::int64_t count = p.n * p.d;
  for (std::int64_t e = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; e < count;
       e += std::int64_t{gridDim.x} * blockDim.x)
    x[e] = from_float<Element>(x_value(p, e));
}

template <class Element>
__global__ void fill_w_kernel(family_params p, Element* w) {
  const std::int64_t count = p.v * p.d;
  for (std::int64_t e = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; e < count;
       e += std::int64_t{gridDim.x} * blockDim.x)
    w[e] = from_float<Element>(w_value(p, e));
}

constexpr int plant_threads = 256;

/// One block per planting slot (each writes its own row of W): β = (logit − keep·x·W[t]) /
/// ‖x[first:]‖², from the rows as stored (rounded), so that x·W[t] = logit up to the rounding
/// of the new row.
template <class Element>
__global__ void __launch_bounds__(plant_threads)
    plant_logits_kernel(family_params p, const Element* x, Element* w) {
  using reduce = cub::BlockReduce<double, plant_threads>;
  __shared__ typename reduce::TempStorage storage;
  __shared__ double beta;
  const plant pl = plant_of(p, blockIdx.x);
  if (pl.row < 0) return;
  const Element* xr = x + pl.row * p.d;
  Element* wt = w + pl.token * p.d;

  double dot = 0.0;   // x · (keep·W[t]) over all columns
  double norm = 0.0;  // ‖x[first:]‖²
  for (std::int64_t c = threadIdx.x; c < p.d; c += plant_threads) {
    const double xv = to_float(xr[c]);
    dot += xv * pl.keep * to_float(wt[c]);
    if (c >= pl.first) norm += xv * xv;
  }
  dot = reduce(storage).Sum(dot);
  __syncthreads();  // storage is reused
  norm = reduce(storage).Sum(norm);
  if (threadIdx.x == 0) beta = norm > 0.0 ? (pl.logit - dot) / norm : 0.0;
  __syncthreads();
  for (std::int64_t c = pl.first + threadIdx.x; c < p.d; c += plant_threads) {
    const double value = pl.keep * to_float(wt[c]) + beta * to_float(xr[c]);
    wt[c] = from_float<Element>(static_cast<float>(value));
  }
}

__global__ void fill_targets_kernel(family_params p, std::int64_t* targets) {
  const std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x;
  if (i < p.n) targets[i] = target_of(p, i);
}

inline unsigned grid_for(std::int64_t count, int threads) {
  return static_cast<unsigned>(std::clamp<std::int64_t>((count + threads - 1) / threads, 1, 65536));
}

}  // namespace detail

/// @brief Fills X [n, d], W [v, d] (dense, row-major) and targets [n] with one draw of
/// `family` (see the file comment), enqueued on `stream`. Throws on a launch error.
/// @tparam Element  float, __half or __nv_bfloat16
template <class Element>
void generate(data_family family, const lce::problem& shape, std::uint64_t seed, Element* d_x,
              Element* d_w, std::int64_t* d_targets, cudaStream_t stream = nullptr) {
  const detail::family_params p = detail::make_family_params(family, shape, seed);
  constexpr int threads = 256;
  detail::fill_x_kernel<<<detail::grid_for(shape.n * shape.d, threads), threads, 0, stream>>>(p,
                                                                                              d_x);
  LCE_EXAMPLE_CHECK_LAUNCH();
  detail::fill_w_kernel<<<detail::grid_for(shape.v * shape.d, threads), threads, 0, stream>>>(p,
                                                                                              d_w);
  LCE_EXAMPLE_CHECK_LAUNCH();
  if (p.slots > 0) {
    detail::plant_logits_kernel<Element>
        <<<static_cast<unsigned>(p.slots), detail::plant_threads, 0, stream>>>(p, d_x, d_w);
    LCE_EXAMPLE_CHECK_LAUNCH();
  }
  detail::fill_targets_kernel<<<detail::grid_for(shape.n, threads), threads, 0, stream>>>(
      p, d_targets);
  LCE_EXAMPLE_CHECK_LAUNCH();
}

}  // namespace lce_example
