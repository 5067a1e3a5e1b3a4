/// @file reference.hpp
/// @brief fp64 CPU reference of linear cross-entropy: per-token loss, lse, reduced loss and the
/// gradients dX, dW, db. Plain single-threaded loops, written from the math (DESIGN.md §1), not
/// from the library's formulas; for small shapes (N·V·D up to ~5e8).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <lce/options.hpp>
#include <limits>
#include <stdexcept>
#include <vector>

namespace lce_test {

/// @brief Inputs of the reference, dense row-major in double (convert rounded 16-bit inputs
/// with to_double so that the reference sees exactly what the kernel sees).
struct reference_input {
  std::int64_t n = 0;
  std::int64_t d = 0;
  std::int64_t v = 0;
  std::vector<double> x;              ///< [n, d]
  std::vector<double> w;              ///< [v, d]
  std::vector<double> bias;           ///< [v], or empty for no bias
  std::vector<std::int64_t> targets;  ///< [n]
  std::int64_t ignore_index = -100;
  lce::reduction reduction = lce::reduction::mean;
};

/// @brief Outputs of the reference. The gradient vectors are empty unless requested.
struct reference_output {
  std::vector<double> lse;         ///< [n] log Σ_k exp(Z_ik), every row (ignored ones too)
  std::vector<double> token_loss;  ///< [n] lse − Z_{i,y_i}; 0 for ignored rows
  double loss = 0.0;               ///< mean or sum over valid rows; the sum for reduction none
  std::int64_t n_valid = 0;        ///< rows whose target is not ignore_index
  std::vector<double> row_scale;   ///< [n] g_i of dZ_i = g_i (softmax(Z_i) − onehot(y_i))
  std::vector<double> dx;          ///< [n, d]
  std::vector<double> dw;          ///< [v, d]
  std::vector<double> db;          ///< [v]
};

namespace detail {

inline void check_input(const reference_input& in) {
  const auto n = static_cast<std::size_t>(in.n);
  const auto d = static_cast<std::size_t>(in.d);
  const auto v = static_cast<std::size_t>(in.v);
  if (in.n <= 0 || in.d <= 0 || in.v <= 0) throw std::invalid_argument("reference: empty shape");
  if (in.x.size() != n * d || in.w.size() != v * d || in.targets.size() != n ||
      !(in.bias.empty() || in.bias.size() == v)) {
    throw std::invalid_argument("reference: input sizes do not match the shape");
  }
}

/// z[k] = Σ_j x_i[j] w_k[j] + b[k] for one row i.
inline void row_logits(const reference_input& in, std::int64_t i, std::vector<double>& z) {
  const double* xi = in.x.data() + i * in.d;
  for (std::int64_t k = 0; k < in.v; ++k) {
    const double* wk = in.w.data() + k * in.d;
    double acc = 0.0;
    for (std::int64_t j = 0; j < in.d; ++j) acc += xi[j] * wk[j];
    z[static_cast<std::size_t>(k)] =
        acc + (in.bias.empty() ? 0.0 : in.bias[static_cast<std::size_t>(k)]);
  }
}

inline double log_sum_exp(const std::vector<double>& z) {
  double m = -std::numeric_limits<double>::infinity();
  for (double value : z) m = std::max(m, value);
  if (m == -std::numeric_limits<double>::infinity()) return m;
  double s = 0.0;
  for (double value : z) s += std::exp(value - m);
  return m + std::log(s);
}

}  // namespace detail

/// @brief Upstream-gradient scale of each row: 0 when ignored; u/n_valid for mean (0 when no
/// row is valid), u for sum, u_i for none. `upstream` is empty (u = 1), [1] or [n] (none).
inline std::vector<double> reference_row_scale(const std::vector<std::int64_t>& targets,
                                               std::int64_t ignore_index, lce::reduction red,
                                               const std::vector<double>& upstream) {
  const std::size_t n = targets.size();
  std::int64_t n_valid = 0;
  for (std::int64_t y : targets) n_valid += y != ignore_index ? 1 : 0;
  if (!(upstream.empty() || upstream.size() == 1 || upstream.size() == n)) {
    throw std::invalid_argument("reference: upstream must have 0, 1 or n values");
  }
  if (red != lce::reduction::none && upstream.size() > 1) {
    throw std::invalid_argument("reference: upstream of mean/sum is a scalar");
  }
  std::vector<double> g(n, 0.0);
  for (std::size_t i = 0; i < n; ++i) {
    if (targets[i] == ignore_index) continue;
    const double u = upstream.empty() ? 1.0 : upstream.size() == 1 ? upstream[0] : upstream[i];
    g[i] = red == lce::reduction::mean ? u / static_cast<double>(n_valid) : u;
  }
  return g;
}

/// @brief Forward, and with `gradients` the backward with upstream gradient `upstream`.
/// A valid target outside [0, v) throws (the reference defines no result for it).
inline reference_output reference(const reference_input& in, bool gradients,
                                  const std::vector<double>& upstream = {}) {
  detail::check_input(in);
  const auto n = static_cast<std::size_t>(in.n);
  const auto d = static_cast<std::size_t>(in.d);
  const auto v = static_cast<std::size_t>(in.v);

  reference_output out;
  out.lse.assign(n, 0.0);
  out.token_loss.assign(n, 0.0);
  std::vector<double> z(v);
  double total = 0.0;
  for (std::size_t i = 0; i < n; ++i) {
    detail::row_logits(in, static_cast<std::int64_t>(i), z);
    out.lse[i] = detail::log_sum_exp(z);
    const std::int64_t y = in.targets[i];
    if (y == in.ignore_index) continue;
    if (y < 0 || y >= in.v) throw std::invalid_argument("reference: target out of range");
    out.token_loss[i] = out.lse[i] - z[static_cast<std::size_t>(y)];
    total += out.token_loss[i];
    ++out.n_valid;
  }
  out.loss = in.reduction == lce::reduction::mean
                 ? (out.n_valid > 0 ? total / static_cast<double>(out.n_valid) : 0.0)
                 : total;
  if (!gradients) return out;

  out.row_scale = reference_row_scale(in.targets, in.ignore_index, in.reduction, upstream);
  out.dx.assign(n * d, 0.0);
  out.dw.assign(v * d, 0.0);
  out.db.assign(v, 0.0);
  for (std::size_t i = 0; i < n; ++i) {
    const double g = out.row_scale[i];
    if (g == 0.0) continue;  // ignored row (or zero upstream): contributes exactly nothing
    detail::row_logits(in, static_cast<std::int64_t>(i), z);
    const double* xi = in.x.data() + i * d;
    double* dxi = out.dx.data() + i * d;
    for (std::size_t k = 0; k < v; ++k) {
      const double p = std::exp(z[k] - out.lse[i]);
      const double dz = g * (p - (static_cast<std::int64_t>(k) == in.targets[i] ? 1.0 : 0.0));
      const double* wk = in.w.data() + k * d;
      double* dwk = out.dw.data() + k * d;
      for (std::size_t j = 0; j < d; ++j) {
        dxi[j] += dz * wk[j];
        dwk[j] += dz * xi[j];
      }
      out.db[k] += dz;
    }
  }
  return out;
}

/// The scalar objective whose gradient `reference(in, true, upstream)` returns:
/// u·loss for mean/sum, Σ_i u_i·loss_i for none (finite-difference checks use it).
inline double reference_objective(const reference_input& in, const std::vector<double>& upstream) {
  const reference_output out = reference(in, false);
  if (in.reduction != lce::reduction::none) {
    return (upstream.empty() ? 1.0 : upstream[0]) * out.loss;
  }
  double total = 0.0;
  for (std::size_t i = 0; i < out.token_loss.size(); ++i) {
    total += (upstream.empty()       ? 1.0
              : upstream.size() == 1 ? upstream[0]
                                     : upstream[i]) *
             out.token_loss[i];
  }
  return total;
}

}  // namespace lce_test
