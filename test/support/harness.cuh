/// @file harness.cuh
/// @brief Shared machinery of the GPU tests: random inputs generated on the device (NaN in
/// the padding of strided inputs), the fp64 reference (CPU for small shapes, GPU for large
/// ones) from the very same rounded inputs, on-device comparison of an output against it
/// (relative Frobenius error, non-finite count, writes outside the output's columns) and
/// the RESULT lines the closing note collects.
#pragma once

#include <cublas_v2.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <lce/lce.cuh>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "device_buffer.hpp"
#include "gpu_reference.cuh"
#include "reference.hpp"
#include "tolerance.hpp"

namespace lce_test {

// ---------------------------------------------------------------------------------------------
// Device-side random data.

namespace harness_detail {

__host__ __device__ inline std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

/// Standard normal number `index` of the stream `seed` (Box–Muller on two hashed uniforms).
__device__ inline double hashed_normal(std::uint64_t seed, std::uint64_t index) {
  const std::uint64_t h1 = splitmix64(seed ^ splitmix64(2 * index));
  const std::uint64_t h2 = splitmix64(seed ^ splitmix64(2 * index + 1));
  const double u1 = (static_cast<double>(h1 >> 11) + 1.0) * 0x1.0p-53;  // (0, 1]
  const double u2 = static_cast<double>(h2 >> 11) * 0x1.0p-53;          // [0, 1)
  return sqrt(-2.0 * log(u1)) * cospi(2.0 * u2);
}

/// m[r, c] = stddev · N(0, 1) for c < cols; the padding columns c ∈ [cols, ld) get NaN bytes,
/// so that a kernel that lets padding into its arithmetic produces NaN.
template <class T>
__global__ void fill_normal_kernel(T* m, std::int64_t rows, std::int64_t cols, std::int64_t ld,
                                   double stddev, std::uint64_t seed) {
  const std::int64_t total = rows * ld;
  for (std::int64_t e = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t r = e / ld;
    const std::int64_t c = e - r * ld;
    if (c < cols) {
      m[e] = from_double<T>(stddev * hashed_normal(seed, static_cast<std::uint64_t>(r * cols + c)));
    } else {
      unsigned char* bytes = reinterpret_cast<unsigned char*>(m + e);
      for (std::size_t b = 0; b < sizeof(T); ++b) bytes[b] = 0xFF;
    }
  }
}

/// Accumulators of one comparison.
struct compare_accumulator {
  double err2;                   // Σ (out − ref)² over finite outputs
  double ref2;                   // Σ ref²
  unsigned long long max_err;    // bits of max |out − ref| (non-negative doubles order as ints)
  unsigned long long max_ref;    // bits of max |ref|
  unsigned long long nonfinite;  // outputs that are NaN or ±inf
  unsigned long long padding;    // padding elements that are no longer all 0xFF bytes
};

template <class T>
__device__ bool all_ones(const T& value) {
  const unsigned char* bytes = reinterpret_cast<const unsigned char*>(&value);
  for (std::size_t b = 0; b < sizeof(T); ++b) {
    if (bytes[b] != 0xFF) return false;
  }
  return true;
}

constexpr int compare_threads = 256;

template <class T>
__global__ void __launch_bounds__(compare_threads)
    compare_kernel(const T* out, std::int64_t rows, std::int64_t cols, std::int64_t ld,
                   const double* ref, compare_accumulator* acc) {
  double err2 = 0.0;
  double ref2 = 0.0;
  double max_err = 0.0;
  double max_ref = 0.0;
  unsigned long long nonfinite = 0;
  unsigned long long padding = 0;
  const std::int64_t total = rows * ld;
  for (std::int64_t e = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t r = e / ld;
    const std::int64_t c = e - r * ld;
    if (c >= cols) {
      padding += all_ones(out[e]) ? 0 : 1;
      continue;
    }
    const double o = to_double(out[e]);
    const double x = ref[r * cols + c];
    ref2 += x * x;
    max_ref = fmax(max_ref, fabs(x));
    if (!isfinite(o)) {
      ++nonfinite;
      continue;
    }
    const double diff = o - x;
    err2 += diff * diff;
    max_err = fmax(max_err, fabs(diff));
  }
  __shared__ double s_double[4][compare_threads];
  __shared__ unsigned long long s_count[2][compare_threads];
  const int t = static_cast<int>(threadIdx.x);
  s_double[0][t] = err2;
  s_double[1][t] = ref2;
  s_double[2][t] = max_err;
  s_double[3][t] = max_ref;
  s_count[0][t] = nonfinite;
  s_count[1][t] = padding;
  __syncthreads();
  for (int stride = compare_threads / 2; stride > 0; stride /= 2) {
    if (t < stride) {
      s_double[0][t] += s_double[0][t + stride];
      s_double[1][t] += s_double[1][t + stride];
      s_double[2][t] = fmax(s_double[2][t], s_double[2][t + stride]);
      s_double[3][t] = fmax(s_double[3][t], s_double[3][t + stride]);
      s_count[0][t] += s_count[0][t + stride];
      s_count[1][t] += s_count[1][t + stride];
    }
    __syncthreads();
  }
  if (t == 0) {
    atomicAdd(&acc->err2, s_double[0][0]);
    atomicAdd(&acc->ref2, s_double[1][0]);
    atomicMax(&acc->max_err, static_cast<unsigned long long>(__double_as_longlong(s_double[2][0])));
    atomicMax(&acc->max_ref, static_cast<unsigned long long>(__double_as_longlong(s_double[3][0])));
    atomicAdd(&acc->nonfinite, s_count[0][0]);
    atomicAdd(&acc->padding, s_count[1][0]);
  }
}

inline double bits_to_double(unsigned long long bits) {
  double out = 0.0;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

}  // namespace harness_detail

/// Fills a [rows, ld] device matrix with stddev·N(0, 1) in its first `cols` columns and NaN
/// bytes in the rest.
template <class T>
void fill_normal(T* d_m, std::int64_t rows, std::int64_t cols, std::int64_t ld, double stddev,
                 std::uint64_t seed) {
  if (rows * ld == 0) return;
  harness_detail::fill_normal_kernel<T>
      <<<gpu_ref::grid_for(rows * ld, 256), 256>>>(d_m, rows, cols, ld, stddev, seed);
  LCE_TEST_CUDA(cudaGetLastError());
  LCE_TEST_CUDA(cudaDeviceSynchronize());
}

// ---------------------------------------------------------------------------------------------
// Comparison.

/// @brief Result of comparing an output with its reference.
struct compare_stats {
  double rel = 0.0;  ///< ‖out − ref‖_F / ‖ref‖_F (absolute when ref is 0), finite outputs
  double max_abs = 0.0;              ///< max |out − ref| over finite outputs
  double ref_norm = 0.0;             ///< ‖ref‖_F
  double max_ref = 0.0;              ///< max |ref|
  unsigned long long nonfinite = 0;  ///< NaN/inf outputs (an unwritten poisoned one counts)
  unsigned long long padding = 0;    ///< padding elements (columns ≥ cols) that were written
};

/// Compares the device output [rows, ld] (first `cols` columns) with the dense fp64 device
/// reference [rows, cols]. The padding must still hold the 0xFF poison bytes.
template <class T>
compare_stats compare_device(const T* d_out, std::int64_t rows, std::int64_t cols, std::int64_t ld,
                             const double* d_ref) {
  LCE_TEST_CUDA(cudaDeviceSynchronize());
  device_buffer<harness_detail::compare_accumulator> acc(1);
  acc.zero();
  if (rows * ld > 0) {
    harness_detail::compare_kernel<T>
        <<<gpu_ref::grid_for(rows * ld, harness_detail::compare_threads),
           harness_detail::compare_threads>>>(d_out, rows, cols, ld, d_ref, acc.data());
    LCE_TEST_CUDA(cudaGetLastError());
  }
  const harness_detail::compare_accumulator a = acc.download()[0];
  compare_stats s;
  s.ref_norm = std::sqrt(a.ref2);
  s.rel = a.ref2 > 0.0 ? std::sqrt(a.err2 / a.ref2) : std::sqrt(a.err2);
  s.max_abs = harness_detail::bits_to_double(a.max_err);
  s.max_ref = harness_detail::bits_to_double(a.max_ref);
  s.nonfinite = a.nonfinite;
  s.padding = a.padding;
  return s;
}

/// Checks one output against its reference: every element finite, the padding untouched and
/// the relative Frobenius error within `tolerance`. Returns the error for the RESULT line.
template <class T>
double check_output(const char* name, const T* d_out, std::int64_t rows, std::int64_t cols,
                    std::int64_t ld, const double* d_ref, double tolerance) {
  const compare_stats s = compare_device(d_out, rows, cols, ld, d_ref);
  INFO(name << ": rel=" << s.rel << " max_abs=" << s.max_abs << " ref_norm=" << s.ref_norm
            << " max_ref=" << s.max_ref << " nonfinite=" << s.nonfinite
            << " padding_written=" << s.padding << " tolerance=" << tolerance);
  CHECK(s.nonfinite == 0);
  CHECK(s.padding == 0);
  CHECK(s.rel <= tolerance);
  return s.rel;
}

/// Checks that an output is exactly zero everywhere (and finite, padding untouched).
template <class T>
void check_exact_zero(const char* name, const T* d_out, std::int64_t rows, std::int64_t cols,
                      std::int64_t ld, const double* d_zero_ref) {
  const compare_stats s = compare_device(d_out, rows, cols, ld, d_zero_ref);
  INFO(name << ": max_abs=" << s.max_abs << " nonfinite=" << s.nonfinite
            << " padding_written=" << s.padding);
  CHECK(s.nonfinite == 0);
  CHECK(s.padding == 0);
  CHECK(s.max_abs == 0.0);
}

/// Reads the [1] loss and compares it with the reference (relative, absolute when it is 0).
inline double check_loss(const float* d_loss, double reference, double tolerance) {
  float loss = 0.0f;
  LCE_TEST_CUDA(cudaDeviceSynchronize());
  LCE_TEST_CUDA(cudaMemcpy(&loss, d_loss, sizeof(float), cudaMemcpyDeviceToHost));
  const double err = rel_error(loss, reference);
  INFO("loss=" << loss << " reference=" << reference << " rel=" << err);
  CHECK(std::isfinite(loss));
  CHECK(err <= tolerance);
  return err;
}

// ---------------------------------------------------------------------------------------------
// Test cases and their data.

inline const char* reduction_name(lce::reduction r) {
  return r == lce::reduction::mean ? "mean" : r == lce::reduction::sum ? "sum" : "none";
}

inline const char* strategy_name(lce::backward_strategy s) {
  return s == lce::backward_strategy::automatic       ? "automatic"
         : s == lce::backward_strategy::vocab_chunked ? "vocab_chunked"
         : s == lce::backward_strategy::row_chunked   ? "row_chunked"
                                                      : "stored";
}

/// @brief One test problem. Built fluently: case_spec{4097, 2304, 50257}.no_bias().sum().
struct case_spec {
  std::int64_t n = 1, d = 16, v = 1;
  bool bias = true;
  lce::reduction reduction = lce::reduction::mean;
  double ignore_fraction = 0.2;
  std::int64_t ignore_index = -100;
  std::int64_t x_pad = 0, w_pad = 0, dx_pad = 0, dw_pad = 0;
  double logit_scale = 2.0;  ///< std of the logits (X ~ N(0, 1), W ~ N(0, scale/√D))
  // Loss options (the defaults give the plain loss).
  float label_smoothing = 0.0f;
  float z_loss = 0.0f;
  float softcap = 0.0f;
  float temperature = 1.0f;
  std::int64_t shift_seq_len = 0;
  bool class_weights = false;  ///< random class weights in [0.25, 2]
  bool accumulate = false;
  float filter_eps = 0.0f;  ///< gradient filtering (loss_options::filter_eps)

  case_spec(std::int64_t n_, std::int64_t d_, std::int64_t v_) : n(n_), d(d_), v(v_) {}
  case_spec filtered(float eps) const {
    auto c = *this;
    c.filter_eps = eps;
    return c;
  }
  case_spec smoothing(float alpha) const {
    auto c = *this;
    c.label_smoothing = alpha;
    return c;
  }
  case_spec with_z_loss(float scale) const {
    auto c = *this;
    c.z_loss = scale;
    return c;
  }
  case_spec capped(float cap) const {
    auto c = *this;
    c.softcap = cap;
    return c;
  }
  case_spec with_temperature(float tau) const {
    auto c = *this;
    c.temperature = tau;
    return c;
  }
  case_spec shifted(std::int64_t seq_len) const {
    auto c = *this;
    c.shift_seq_len = seq_len;
    return c;
  }
  case_spec weighted() const {
    auto c = *this;
    c.class_weights = true;
    return c;
  }
  case_spec accumulating() const {
    auto c = *this;
    c.accumulate = true;
    return c;
  }
  [[nodiscard]] bool has_options() const {
    return label_smoothing != 0.0f || z_loss != 0.0f || softcap != 0.0f || temperature != 1.0f ||
           shift_seq_len != 0 || class_weights || accumulate || filter_eps != 0.0f;
  }
  /// Short name of the options, e.g. "smoothing=0.1,weights,z_loss=0.01" ("plain" for none).
  [[nodiscard]] std::string options_string() const {
    std::ostringstream os;
    const char* sep = "";
    auto item = [&](const char* name, auto value, bool with_value = true) {
      os << sep << name;
      if (with_value) os << "=" << value;
      sep = ",";
    };
    if (label_smoothing != 0.0f) item("smoothing", label_smoothing);
    if (class_weights) item("weights", 0, false);
    if (ignore_index != -100) item("ignore_index", ignore_index);
    if (z_loss != 0.0f) item("z_loss", z_loss);
    if (softcap != 0.0f) item("softcap", softcap);
    if (temperature != 1.0f) item("temperature", temperature);
    if (shift_seq_len != 0) item("shift", shift_seq_len);
    if (accumulate) item("accumulate", 0, false);
    if (filter_eps != 0.0f) item("filter_eps", filter_eps);
    const std::string out = os.str();
    return out.empty() ? "plain" : out;
  }
  case_spec no_bias() const {
    auto c = *this;
    c.bias = false;
    return c;
  }
  case_spec with_reduction(lce::reduction r) const {
    auto c = *this;
    c.reduction = r;
    return c;
  }
  case_spec sum() const { return with_reduction(lce::reduction::sum); }
  case_spec none() const { return with_reduction(lce::reduction::none); }
  case_spec ignoring(double fraction) const {
    auto c = *this;
    c.ignore_fraction = fraction;
    return c;
  }
  case_spec ignore_id(std::int64_t id) const {
    auto c = *this;
    c.ignore_index = id;
    return c;
  }
  case_spec padded(std::int64_t x, std::int64_t w, std::int64_t dx, std::int64_t dw) const {
    auto c = *this;
    c.x_pad = x;
    c.w_pad = w;
    c.dx_pad = dx;
    c.dw_pad = dw;
    return c;
  }
  case_spec scaled(double s) const {
    auto c = *this;
    c.logit_scale = s;
    return c;
  }

  [[nodiscard]] lce::problem shape() const {
    return lce::problem{n,
                        d,
                        v,
                        x_pad ? d + x_pad : 0,
                        w_pad ? d + w_pad : 0,
                        dx_pad ? d + dx_pad : 0,
                        dw_pad ? d + dw_pad : 0};
  }
  [[nodiscard]] double nvd() const {
    return static_cast<double>(n) * static_cast<double>(v) * static_cast<double>(d);
  }
  [[nodiscard]] std::string shape_string() const {
    std::ostringstream os;
    os << n << "x" << d << "x" << v;
    return os.str();
  }
  [[nodiscard]] std::string describe() const {
    std::ostringstream os;
    os << shape_string() << " bias=" << bias << " reduction=" << reduction_name(reduction)
       << " ignore=" << ignore_fraction << " ignore_index=" << ignore_index
       << " pads(x,w,dx,dw)=" << x_pad << "," << w_pad << "," << dx_pad << "," << dw_pad;
    if (has_options()) os << " options=" << options_string();
    return os.str();
  }
};

/// CPU reference up to this N·V·D (one pass ≈ N·V·D fp64 multiply-adds on one core).
inline constexpr double cpu_reference_limit = 5e8;

/// @brief Inputs of one case on the device, the upstream gradient, and the reference outputs
/// (fp64, dense, on the device), computed from exactly these rounded inputs.
template <class Element>
struct problem_data {
  case_spec spec;
  std::uint64_t seed;
  lce::problem shape;
  lce::loss_options options;
  device_buffer<Element> x;  // [n, ldx]
  device_buffer<Element> w;  // [v, ldw]
  device_buffer<Element> bias;
  std::vector<std::int64_t> h_targets;  // the caller's (unshifted) targets
  device_buffer<std::int64_t> targets;
  std::vector<std::int64_t> h_effective_targets;  // after the causal shift, if any
  std::vector<float> h_class_weight;              // [v] or empty
  device_buffer<float> class_weight;
  std::vector<double> upstream;  // what the reference uses: {} (= 1), [1] or [n]
  device_buffer<float> d_upstream;

  // Reference (dense fp64 on the device).
  bool reference_on_gpu = false;
  double ref_loss = 0.0;
  std::int64_t n_valid = 0;
  device_buffer<double> ref_lse, ref_token_loss, ref_dx, ref_dw, ref_db;
  device_buffer<double> ref_db_abs;  ///< Σ_i |dZ_iv| of the reference (db_tolerance)
  // Reference of the options' outputs.
  double ref_z_loss = 0.0;
  std::int64_t ref_correct = 0;
  device_buffer<double> ref_token_z_loss, ref_entropy, ref_target_logprob;
  std::vector<std::int64_t> ref_argmax;  // host
  std::vector<double> ref_max_logit;     // host
  /// Set before compute_reference (CPU reference only): also the gradient magnitudes
  /// (reference_output::dx_mag, dw_mag, db_mag), kept on the host.
  bool magnitudes = false;
  std::vector<double> ref_dx_mag, ref_dw_mag, ref_db_mag;
  double ref_ce_denom = 0.0;  ///< CPU reference only: Σ_valid w_{y_i}
  /// CPU reference only: rows with a p within reference_options::filter_band of filter_eps.
  std::vector<std::int64_t> ref_filter_boundary_rows;

  problem_data(const case_spec& s, std::uint64_t seed_) : spec(s), seed(seed_), shape(s.shape()) {
    options.ignore_index = s.ignore_index;
    options.reduction = s.reduction;
    options.label_smoothing = s.label_smoothing;
    options.z_loss = s.z_loss;
    options.softcap = s.softcap;
    options.temperature = s.temperature;
    options.shift_seq_len = s.shift_seq_len;
    options.accumulate = s.accumulate;
    options.filter_eps = s.filter_eps;
    random_source rng(seed);
    x = device_buffer<Element>(static_cast<std::size_t>(s.n * shape.x_stride()));
    w = device_buffer<Element>(static_cast<std::size_t>(s.v * shape.w_stride()));
    fill_normal(x.data(), s.n, s.d, shape.x_stride(), 1.0, rng.engine()());
    fill_normal(w.data(), s.v, s.d, shape.w_stride(),
                s.logit_scale / std::sqrt(static_cast<double>(s.d)), rng.engine()());
    if (s.bias) {
      bias = device_buffer<Element>(static_cast<std::size_t>(s.v));
      fill_normal(bias.data(), 1, s.v, s.v, 0.5, rng.engine()());
    }
    h_targets = rng.targets(s.n, s.v, s.ignore_fraction, s.ignore_index);
    targets = device_buffer<std::int64_t>(h_targets);
    h_effective_targets = reference_effective_targets(h_targets, s.shift_seq_len, s.ignore_index);
    for (std::int64_t y : h_effective_targets) n_valid += y != s.ignore_index ? 1 : 0;
    if (s.class_weights) {
      for (std::int64_t k = 0; k < s.v; ++k)
        h_class_weight.push_back(static_cast<float>(rng.uniform(0.25, 2.0)));
      class_weight = device_buffer<float>(h_class_weight);
    }
    choose_upstream(rng);
  }

  /// Upstream gradient of backward: random in [0.5, 2]; per row for reduction none. fp16 with
  /// mean gets a loss scale of about n_valid (as fp16 training does): g = u/n_valid would
  /// push dX and dW into fp16 subnormals and measure underflow, not the library.
  void choose_upstream(random_source& rng) {
    std::vector<float> values;
    if (spec.reduction == lce::reduction::none) {
      for (std::int64_t i = 0; i < spec.n; ++i)
        values.push_back(static_cast<float>(rng.uniform(0.5, 2.0)));
    } else {
      double u = rng.uniform(0.5, 2.0);
      if (std::is_same_v<Element, __half> && spec.reduction == lce::reduction::mean) {
        u *= static_cast<double>(n_valid > 0 ? n_valid : 1);
      }
      values.push_back(static_cast<float>(u));
    }
    upstream.assign(values.begin(), values.end());
    d_upstream = device_buffer<float>(values);
  }

  /// Switches to the implicit upstream gradient 1 (null `grad`; what forward_backward uses).
  void use_unit_upstream() {
    upstream.clear();
    d_upstream = device_buffer<float>();
  }

  [[nodiscard]] const float* grad_pointer() const {
    return upstream.empty() ? nullptr : d_upstream.data();
  }
  [[nodiscard]] const Element* bias_pointer() const { return spec.bias ? bias.data() : nullptr; }
  [[nodiscard]] const float* class_weight_pointer() const {
    return spec.class_weights ? class_weight.data() : nullptr;
  }
  [[nodiscard]] std::vector<double> class_weight_double() const {
    return std::vector<double>(h_class_weight.begin(), h_class_weight.end());
  }

  /// Computes the reference, on the CPU when N·V·D ≤ cpu_reference_limit (or `force_cpu`),
  /// else on the GPU. Gradients only when asked.
  /// Marks the rows ignored (targets ← ignore_index; without the causal shift only) and
  /// re-derives the counts; compute_reference again afterwards.
  void ignore_rows(const std::vector<std::int64_t>& rows) {
    REQUIRE(spec.shift_seq_len == 0);
    for (std::int64_t r : rows) h_targets[static_cast<std::size_t>(r)] = spec.ignore_index;
    targets = device_buffer<std::int64_t>(h_targets);
    h_effective_targets = h_targets;
    n_valid = 0;
    for (std::int64_t y : h_effective_targets) n_valid += y != spec.ignore_index ? 1 : 0;
  }

  void compute_reference(bool gradients, bool force_gpu = false) {
    reference_on_gpu = force_gpu || spec.nvd() > cpu_reference_limit;
    if (reference_on_gpu) {
      gpu_reference_output out =
          gpu_reference(x.data(), w.data(), bias_pointer(), targets.data(), h_targets, shape,
                        spec.ignore_index, spec.reduction, gradients, upstream,
                        reference_options_of(options), class_weight_double());
      ref_loss = out.loss;
      ref_lse = std::move(out.lse);
      ref_token_loss = std::move(out.token_loss);
      ref_dx = std::move(out.dx);
      ref_dw = std::move(out.dw);
      ref_db = std::move(out.db);
      ref_db_abs = std::move(out.db_abs);
      ref_z_loss = out.z_loss;
      ref_correct = out.correct;
      ref_token_z_loss = std::move(out.token_z_loss);
      ref_entropy = std::move(out.entropy);
      ref_target_logprob = std::move(out.target_logprob);
      ref_argmax = std::move(out.argmax);
      ref_max_logit = std::move(out.max_logit);
      return;
    }
    reference_input in;
    in.n = spec.n;
    in.d = spec.d;
    in.v = spec.v;
    in.x = download_dense(x, spec.n, spec.d, shape.x_stride());
    in.w = download_dense(w, spec.v, spec.d, shape.w_stride());
    if (spec.bias) in.bias = download_as_double(bias);
    in.targets = h_targets;
    in.ignore_index = spec.ignore_index;
    in.reduction = spec.reduction;
    in.options = reference_options_of(options);
    in.class_weight = class_weight_double();
    in.magnitudes = magnitudes;
    const reference_output out = reference(in, gradients, upstream);
    ref_dx_mag = out.dx_mag;
    ref_dw_mag = out.dw_mag;
    ref_db_mag = out.db_mag;
    ref_ce_denom = out.ce_denom;
    ref_filter_boundary_rows = out.filter_boundary_rows;
    ref_loss = out.loss;
    ref_lse = device_buffer<double>(out.lse);
    ref_token_loss = device_buffer<double>(out.token_loss);
    ref_z_loss = out.z_loss;
    ref_correct = out.correct;
    ref_token_z_loss = device_buffer<double>(out.token_z_loss);
    ref_entropy = device_buffer<double>(out.entropy);
    ref_target_logprob = device_buffer<double>(out.target_logprob);
    ref_argmax = out.argmax;
    ref_max_logit = out.max_logit;
    if (gradients) {
      ref_dx = device_buffer<double>(out.dx);
      ref_dw = device_buffer<double>(out.dw);
      ref_db = device_buffer<double>(out.db);
      ref_db_abs = device_buffer<double>(out.db_abs);
    }
  }

  [[nodiscard]] std::string describe() const {
    std::ostringstream os;
    os << element_name<Element>() << " " << spec.describe() << " seed=" << seed
       << " n_valid=" << n_valid << " reference=" << (reference_on_gpu ? "gpu" : "cpu");
    return os.str();
  }

 private:
  static std::vector<double> download_dense(const device_buffer<Element>& m, std::int64_t rows,
                                            std::int64_t cols, std::int64_t ld) {
    const std::vector<Element> host = m.download();
    std::vector<double> out(static_cast<std::size_t>(rows * cols));
    for (std::int64_t r = 0; r < rows; ++r) {
      for (std::int64_t c = 0; c < cols; ++c) {
        out[static_cast<std::size_t>(r * cols + c)] =
            to_double(host[static_cast<std::size_t>(r * ld + c)]);
      }
    }
    return out;
  }
};

/// db's tolerance for this problem (tolerance.hpp: db_tolerance), from the reference's
/// column sums and summed magnitudes.
template <class Element>
double db_tolerance(const problem_data<Element>& data) {
  return db_tolerance<Element>(data.ref_db.download(), data.ref_db_abs.download());
}

/// @brief Outputs of a forward/backward under test, poisoned before every run.
template <class Element, class Grad>
struct outputs {
  device_buffer<float> loss{1};
  device_buffer<float> token_loss;
  device_buffer<float> lse;
  device_buffer<Element> dx;
  device_buffer<Grad> dw;
  device_buffer<Grad> db;

  /// Gradient buffers only when `gradients`: a dW of 128256 × 2304 is 0.6 GB in 16 bits.
  outputs(const lce::problem& s, bool gradients)
      : token_loss(static_cast<std::size_t>(s.n)), lse(static_cast<std::size_t>(s.n)) {
    if (gradients) {
      dx = device_buffer<Element>(static_cast<std::size_t>(s.n * s.dx_stride()));
      dw = device_buffer<Grad>(static_cast<std::size_t>(s.v * s.dw_stride()));
      db = device_buffer<Grad>(static_cast<std::size_t>(s.v));
    }
  }

  void poison() {
    loss.poison();
    token_loss.poison();
    lse.poison();
    dx.poison();
    dw.poison();
    db.poison();
  }
};

/// Errors of one run, printed as one RESULT line (negative: not measured).
struct measured {
  double loss = -1, lse = -1, token_loss = -1, dx = -1, dw = -1, db = -1;
};

inline std::string format_error(double e) {
  if (e < 0) return "-";
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "%.2e", e);
  return buffer;
}

/// Prints `RESULT op=... dtype=... shape=NxDxV ... loss=... dx=...` to stdout.
template <class Element, class Grad = Element>
void print_result(const char* op, const case_spec& spec, const char* strategy, const measured& m,
                  const char* note = "") {
  std::printf(
      "RESULT op=%s dtype=%s grad=%s shape=%s strategy=%s reduction=%s bias=%d pads=%d %s"
      " loss=%s lse=%s token_loss=%s dx=%s dw=%s db=%s\n",
      op, element_name<Element>(), element_name<Grad>(), spec.shape_string().c_str(), strategy,
      reduction_name(spec.reduction), spec.bias ? 1 : 0,
      (spec.x_pad | spec.w_pad | spec.dx_pad | spec.dw_pad) != 0 ? 1 : 0, note,
      format_error(m.loss).c_str(), format_error(m.lse).c_str(), format_error(m.token_loss).c_str(),
      format_error(m.dx).c_str(), format_error(m.dw).c_str(), format_error(m.db).c_str());
  std::fflush(stdout);
}

// ---------------------------------------------------------------------------------------------
// Resources.

/// A cuBLAS handle, a non-blocking stream (so that work on the legacy default stream is never
/// implicitly ordered with the library's) and a workspace that grows on demand.
class gpu_context {
 public:
  gpu_context() {
    if (cublasCreate(&handle_) != CUBLAS_STATUS_SUCCESS) throw std::runtime_error("cublasCreate");
    LCE_TEST_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  }
  gpu_context(const gpu_context&) = delete;
  gpu_context& operator=(const gpu_context&) = delete;
  ~gpu_context() {
    (void)cudaStreamDestroy(stream_);
    (void)cublasDestroy(handle_);
  }
  [[nodiscard]] cublasHandle_t handle() const { return handle_; }
  [[nodiscard]] cudaStream_t stream() const { return stream_; }
  /// A workspace of at least `bytes` bytes (poisoned: the library must not rely on its
  /// contents).
  void* workspace(std::size_t bytes) {
    if (bytes > workspace_.size() || workspace_.empty()) {
      workspace_ = device_buffer<unsigned char>(bytes > 0 ? bytes : 1);
    }
    workspace_.poison();
    return workspace_.data();
  }
  void synchronize() const { LCE_TEST_CUDA(cudaStreamSynchronize(stream_)); }

 private:
  cublasHandle_t handle_ = nullptr;
  cudaStream_t stream_ = nullptr;
  device_buffer<unsigned char> workspace_;
};

/// @brief A CUDA graph captured from a stream (global capture mode: any allocation or
/// synchronization inside the captured calls fails the capture) and its executable.
class captured_graph {
 public:
  /// Captures what `enqueue` puts on `stream`; `enqueue` returns the cudaError_t of the calls
  /// under test, reported by status() (the capture is always ended, even when they fail).
  template <class Enqueue>
  captured_graph(cudaStream_t stream, Enqueue&& enqueue) {
    LCE_TEST_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    status_ = enqueue();
    message_ = lce::last_error_message();
    const cudaError_t end = cudaStreamEndCapture(stream, &graph_);
    if (status_ == cudaSuccess) status_ = end;
    if (status_ == cudaSuccess) status_ = cudaGraphInstantiate(&exec_, graph_, 0);
  }
  captured_graph(const captured_graph&) = delete;
  captured_graph& operator=(const captured_graph&) = delete;
  ~captured_graph() {
    if (exec_ != nullptr) (void)cudaGraphExecDestroy(exec_);
    if (graph_ != nullptr) (void)cudaGraphDestroy(graph_);
  }
  [[nodiscard]] cudaError_t status() const { return status_; }
  [[nodiscard]] const std::string& message() const { return message_; }
  [[nodiscard]] std::size_t nodes() const {
    std::size_t count = 0;
    if (graph_ != nullptr) LCE_TEST_CUDA(cudaGraphGetNodes(graph_, nullptr, &count));
    return count;
  }
  void launch(cudaStream_t stream) const {
    LCE_TEST_CUDA(cudaGraphLaunch(exec_, stream));
    LCE_TEST_CUDA(cudaStreamSynchronize(stream));
  }

 private:
  cudaGraph_t graph_ = nullptr;
  cudaGraphExec_t exec_ = nullptr;
  cudaError_t status_ = cudaSuccess;
  std::string message_;
};

/// Requires an lce call to succeed, printing the library's message otherwise.
#define LCE_TEST_REQUIRE_OK(expr)                 \
  do {                                            \
    const cudaError_t lce_test_status_ = (expr);  \
    INFO("lce: " << ::lce::last_error_message()); \
    REQUIRE(lce_test_status_ == cudaSuccess);     \
  } while (0)

}  // namespace lce_test
