/// @file cases.cuh
/// @brief Test cases and their data: case_spec (shape, layout and options of a case), problem_data
/// (its inputs, on the device, and the fp64 reference of every output), the outputs under
/// test, and the RESULT lines the closing notes collect.
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

#include "compare.cuh"
#include "device_buffer.hpp"
#include "device_data.cuh"
#include "gpu_reference.cuh"
#include "reference.hpp"
#include "tolerance.hpp"

namespace lce_test {

// ---------------------------------------------------------------------------------------------
// Test cases and their data.

inline const char* reduction_name(lce::reduction r) {
  return r == lce::reduction::mean ? "mean" : r == lce::reduction::sum ? "sum" : "none";
}

inline const char* strategy_name(lce::backward_strategy s) { return lce::to_string(s); }

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
    std::vector<std::int64_t> t = h_targets;
    for (std::int64_t r : rows) t[static_cast<std::size_t>(r)] = spec.ignore_index;
    set_targets(std::move(t));
  }
  /// Replaces the targets (without the causal shift only) and re-derives the counts;
  /// compute_reference again afterwards.
  void set_targets(std::vector<std::int64_t> t) {
    REQUIRE(spec.shift_seq_len == 0);
    REQUIRE(t.size() == h_targets.size());
    h_targets = std::move(t);
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

/// The fp32 cancellation slack of this problem's confident rows (tolerance.hpp:
/// cancellation_slack), over the rows whose target is not ignored.
template <class Element>
cancellation cancellation_slack(const problem_data<Element>& data) {
  std::vector<bool> valid(data.h_effective_targets.size());
  for (std::size_t i = 0; i < valid.size(); ++i)
    valid[i] = data.h_effective_targets[i] != data.options.ignore_index;
  return cancellation_slack(data.ref_lse.download(), data.ref_token_loss.download(), valid);
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

}  // namespace lce_test
