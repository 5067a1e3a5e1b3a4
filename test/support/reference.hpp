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

/// @brief The loss options of the reference (lce::loss_options beyond ignore_index and
/// reduction, in double; the defaults give the plain loss). See options.hpp for the math.
struct reference_options {
  double label_smoothing = 0.0;    ///< α
  double z_loss = 0.0;             ///< s of s·lse²
  double softcap = 0.0;            ///< c > 0: z ← c·tanh(z/c); 0: off
  double temperature = 1.0;        ///< τ: z ← z/τ before the softcap
  std::int64_t shift_seq_len = 0;  ///< T > 0: row r is scored against targets[r + 1]
  double filter_eps = 0.0;         ///< backward: dZ entries (not the target's) with p < it are 0
  /// With filter_eps: rows with an entry (not the target's) whose p is within this relative
  /// distance of filter_eps are listed in reference_output::filter_boundary_rows — there the
  /// device's rounding of p may decide the other way than the fp64 reference.
  double filter_band = 1e-3;
};

/// The reference options of a library lce::loss_options (float → double is exact).
inline reference_options reference_options_of(const lce::loss_options& o) {
  reference_options r;
  r.label_smoothing = static_cast<double>(o.label_smoothing);
  r.z_loss = static_cast<double>(o.z_loss);
  r.softcap = static_cast<double>(o.softcap);
  r.temperature = static_cast<double>(o.temperature);
  r.shift_seq_len = o.shift_seq_len;
  r.filter_eps = static_cast<double>(o.filter_eps);
  return r;
}

/// @brief Inputs of the reference, dense row-major in double (convert rounded 16-bit inputs
/// with to_double so that the reference sees exactly what the kernel sees).
struct reference_input {
  std::int64_t n = 0;
  std::int64_t d = 0;
  std::int64_t v = 0;
  std::vector<double> x;              ///< [n, d]
  std::vector<double> w;              ///< [v, d]
  std::vector<double> bias;           ///< [v], or empty for no bias
  std::vector<std::int64_t> targets;  ///< [n], unshifted (the caller's targets)
  std::int64_t ignore_index = -100;
  lce::reduction reduction = lce::reduction::mean;
  reference_options options;         ///< label smoothing, z-loss, softcap, temperature, shift
  std::vector<double> class_weight;  ///< [v], or empty for no class weights (all 1)
  /// Also compute dx_mag, dw_mag and db_mag (twice the gradient work).
  bool magnitudes = false;
};

/// @brief Outputs of the reference. The gradient vectors are empty unless requested.
struct reference_output {
  std::vector<std::int64_t> targets;   ///< [n] effective targets (after the causal shift)
  std::vector<double> lse;             ///< [n] log Σ_k exp(z_ik), every row (ignored ones too)
  std::vector<double> token_loss;      ///< [n] ce_i + zl_i for valid rows; 0 for ignored rows
  std::vector<double> token_ce;        ///< [n] the cross-entropy part alone (0 for ignored rows)
  std::vector<double> token_z_loss;    ///< [n] s·lse_i² (0 for ignored rows)
  std::vector<double> entropy;         ///< [n] −Σ p log p of softmax(z_i), every row
  std::vector<double> target_logprob;  ///< [n] z_{i,y_i} − lse_i (0 for ignored rows)
  std::vector<std::int64_t> argmax;    ///< [n] first index of max_k z_ik, every row
  std::vector<double> max_logit;       ///< [n] max_k z_ik
  std::vector<double> second_logit;    ///< [n] the second largest z_ik (−inf when v = 1)
  double loss = 0.0;                   ///< mean or sum over valid rows; the sum for reduction none
  double z_loss = 0.0;                 ///< the z-loss part of `loss` alone
  std::int64_t n_valid = 0;            ///< rows whose effective target is not ignore_index
  double ce_denom = 0.0;               ///< Σ_valid w_{y_i} (= n_valid without class weights)
  std::int64_t correct = 0;            ///< valid rows with argmax == target
  std::vector<double> row_scale;       ///< [n] dL/d(ce_i) (g_i of dZ_i = g_i (p − onehot) plain)
  std::vector<double> row_scale_z;     ///< [n] dL/d(zl_i)
  std::vector<double> dx;              ///< [n, d]
  std::vector<double> dw;              ///< [v, d]
  std::vector<double> db;              ///< [v]
  std::vector<double> db_abs;          ///< [v] Σ_i |dZ_iv| (the target's: |p term|): db's scale
  std::vector<std::int64_t> filter_boundary_rows;  ///< see reference_options::filter_band
  /// With `magnitudes`: the same sums as dx, dw, db over m_iv·|·| instead of dZ_iv·(·), where
  /// m_iv is the sum of the magnitudes of the terms that form dZ_iv (g·p and g·[v = y] are
  /// both counted, so m stays large where p − onehot cancels). An error of relative size u in
  /// each term moves an output by at most u times its magnitude: the conditioning of dx, dw, db.
  std::vector<double> dx_mag, dw_mag, db_mag;
};

namespace detail {

inline void check_input(const reference_input& in) {
  const auto n = static_cast<std::size_t>(in.n);
  const auto d = static_cast<std::size_t>(in.d);
  const auto v = static_cast<std::size_t>(in.v);
  if (in.n <= 0 || in.d <= 0 || in.v <= 0) throw std::invalid_argument("reference: empty shape");
  if (in.x.size() != n * d || in.w.size() != v * d || in.targets.size() != n ||
      !(in.bias.empty() || in.bias.size() == v) ||
      !(in.class_weight.empty() || in.class_weight.size() == v)) {
    throw std::invalid_argument("reference: input sizes do not match the shape");
  }
  const reference_options& o = in.options;
  if (!(o.label_smoothing >= 0.0 && o.label_smoothing <= 1.0) || !(o.z_loss >= 0.0) ||
      !(o.softcap >= 0.0) || !(o.temperature > 0.0) || o.shift_seq_len < 0 ||
      (o.shift_seq_len > 0 && in.n % o.shift_seq_len != 0)) {
    throw std::invalid_argument("reference: invalid options");
  }
}

/// The logit transform of options.hpp, in double: softcap(raw / τ).
inline double transform_logit(double raw, const reference_options& o) {
  const double u = raw / o.temperature;
  return o.softcap > 0.0 ? o.softcap * std::tanh(u / o.softcap) : u;
}

/// dz/draw at `raw`, from the raw value (d/du c·tanh(u/c) = 1 − tanh²(u/c)).
inline double transform_derivative(double raw, const reference_options& o) {
  const double u = raw / o.temperature;
  if (!(o.softcap > 0.0)) return 1.0 / o.temperature;
  const double t = std::tanh(u / o.softcap);
  return (1.0 - t * t) / o.temperature;
}

/// raw[k] = Σ_j x_i[j] w_k[j] + b[k] for one row i.
inline void row_raw_logits(const reference_input& in, std::int64_t i, std::vector<double>& raw) {
  const double* xi = in.x.data() + i * in.d;
  for (std::int64_t k = 0; k < in.v; ++k) {
    const double* wk = in.w.data() + k * in.d;
    double acc = 0.0;
    for (std::int64_t j = 0; j < in.d; ++j) acc += xi[j] * wk[j];
    raw[static_cast<std::size_t>(k)] =
        acc + (in.bias.empty() ? 0.0 : in.bias[static_cast<std::size_t>(k)]);
  }
}

/// z[k] = transform(raw[k]) for one row i (z = raw with the default options).
inline void row_logits(const reference_input& in, std::int64_t i, std::vector<double>& z) {
  row_raw_logits(in, i, z);
  for (double& value : z) value = transform_logit(value, in.options);
}

inline double log_sum_exp(const std::vector<double>& z) {
  double m = -std::numeric_limits<double>::infinity();
  for (double value : z) m = std::max(m, value);
  if (m == -std::numeric_limits<double>::infinity()) return m;
  double s = 0.0;
  for (double value : z) s += std::exp(value - m);
  return m + std::log(s);
}

inline double class_weight_of(const reference_input& in, std::size_t k) {
  return in.class_weight.empty() ? 1.0 : in.class_weight[k];
}

}  // namespace detail

/// @brief The targets the loss uses: `targets` itself, or with the causal shift T > 0 the
/// next position's target (ignore_index for the last position of each sequence).
inline std::vector<std::int64_t> reference_effective_targets(
    const std::vector<std::int64_t>& targets, std::int64_t shift_seq_len,
    std::int64_t ignore_index) {
  if (shift_seq_len <= 0) return targets;
  const auto n = static_cast<std::int64_t>(targets.size());
  if (n % shift_seq_len != 0) throw std::invalid_argument("reference: n % shift_seq_len != 0");
  std::vector<std::int64_t> out(targets.size());
  for (std::int64_t r = 0; r < n; ++r) {
    out[static_cast<std::size_t>(r)] = r % shift_seq_len == shift_seq_len - 1
                                           ? ignore_index
                                           : targets[static_cast<std::size_t>(r + 1)];
  }
  return out;
}

/// @brief Upstream scales of the two loss terms of each row.
struct reference_scales {
  std::vector<double> ce;  ///< [n] dL/d(ce_i): 0 ignored; u/Σ_valid w_{y_i} mean; u sum; u_i none
  std::vector<double> z;   ///< [n] dL/d(zl_i): 0 ignored; u/n_valid mean; u sum; u_i none
};

/// @brief Scales of each row from the effective `targets`, `upstream` (empty = 1, [1], or [n]
/// for none) and the class weights (empty = 1). A zero denominator gives 0.
inline reference_scales reference_row_scales(const std::vector<std::int64_t>& targets,
                                             std::int64_t ignore_index, lce::reduction red,
                                             const std::vector<double>& upstream,
                                             const std::vector<double>& class_weight = {}) {
  const std::size_t n = targets.size();
  if (!(upstream.empty() || upstream.size() == 1 || upstream.size() == n)) {
    throw std::invalid_argument("reference: upstream must have 0, 1 or n values");
  }
  if (red != lce::reduction::none && upstream.size() > 1) {
    throw std::invalid_argument("reference: upstream of mean/sum is a scalar");
  }
  std::int64_t n_valid = 0;
  double weight_sum = 0.0;
  for (std::int64_t y : targets) {
    if (y == ignore_index) continue;
    ++n_valid;
    if (!class_weight.empty()) {
      if (y < 0 || static_cast<std::size_t>(y) >= class_weight.size()) {
        throw std::invalid_argument("reference: target out of range");
      }
      weight_sum += class_weight[static_cast<std::size_t>(y)];
    }
  }
  if (class_weight.empty()) weight_sum = static_cast<double>(n_valid);
  reference_scales g{std::vector<double>(n, 0.0), std::vector<double>(n, 0.0)};
  for (std::size_t i = 0; i < n; ++i) {
    if (targets[i] == ignore_index) continue;
    const double u = upstream.empty() ? 1.0 : upstream.size() == 1 ? upstream[0] : upstream[i];
    if (red == lce::reduction::mean) {
      g.ce[i] = weight_sum != 0.0 ? u / weight_sum : 0.0;
      g.z[i] = n_valid > 0 ? u / static_cast<double>(n_valid) : 0.0;
    } else {
      g.ce[i] = u;
      g.z[i] = u;
    }
  }
  return g;
}

/// @brief Upstream-gradient scale of each row without options: 0 when ignored; u/n_valid for
/// mean (0 when no row is valid), u for sum, u_i for none. `upstream` is empty (u = 1), [1] or
/// [n] (none).
inline std::vector<double> reference_row_scale(const std::vector<std::int64_t>& targets,
                                               std::int64_t ignore_index, lce::reduction red,
                                               const std::vector<double>& upstream) {
  return reference_row_scales(targets, ignore_index, red, upstream).ce;
}

/// @brief Forward, and with `gradients` the backward with upstream gradient `upstream`.
/// A valid target outside [0, v) throws (the reference defines no result for it).
///
/// With z the transformed logits (softcap(raw/τ)), p = softmax(z), w the class weights, α the
/// smoothing and s the z-loss scale, a valid row's loss is ce + zl with
///   ce = (1 − α)·w_y·(lse − z_y) + (α/V)·Σ_v w_v·(lse − z_v),  zl = s·lse²,
/// and dL/draw_v = [g_ce·((1 − α)·w_y·(p_v − [v = y]) + (α/V)·(Σ_k w_k·p_v − w_v))
///                  + g_z·2·s·lse·p_v] · dz_v/draw_v.
inline reference_output reference(const reference_input& in, bool gradients,
                                  const std::vector<double>& upstream = {}) {
  detail::check_input(in);
  const auto n = static_cast<std::size_t>(in.n);
  const auto d = static_cast<std::size_t>(in.d);
  const auto v = static_cast<std::size_t>(in.v);
  const reference_options& opt = in.options;
  const double alpha = opt.label_smoothing;
  double weight_total = 0.0;  // Σ_v w_v
  for (std::size_t k = 0; k < v; ++k) weight_total += detail::class_weight_of(in, k);

  reference_output out;
  out.targets = reference_effective_targets(in.targets, opt.shift_seq_len, in.ignore_index);
  out.lse.assign(n, 0.0);
  out.token_loss.assign(n, 0.0);
  out.token_ce.assign(n, 0.0);
  out.token_z_loss.assign(n, 0.0);
  out.entropy.assign(n, 0.0);
  out.target_logprob.assign(n, 0.0);
  out.argmax.assign(n, -1);
  out.max_logit.assign(n, 0.0);
  out.second_logit.assign(n, 0.0);
  std::vector<double> z(v);
  double ce_total = 0.0;
  double z_total = 0.0;
  for (std::size_t i = 0; i < n; ++i) {
    detail::row_logits(in, static_cast<std::int64_t>(i), z);
    const double lse = detail::log_sum_exp(z);
    out.lse[i] = lse;
    double first = -std::numeric_limits<double>::infinity();
    double second = -std::numeric_limits<double>::infinity();
    std::int64_t arg = -1;
    double entropy = 0.0;
    for (std::size_t k = 0; k < v; ++k) {
      if (z[k] > first) {
        second = first;
        first = z[k];
        arg = static_cast<std::int64_t>(k);
      } else if (z[k] > second) {
        second = z[k];
      }
      const double logp = z[k] - lse;
      entropy -= std::exp(logp) * logp;
    }
    out.argmax[i] = arg;
    out.max_logit[i] = first;
    out.second_logit[i] = second;
    out.entropy[i] = entropy;

    const std::int64_t y = out.targets[i];
    if (y == in.ignore_index) continue;
    if (y < 0 || y >= in.v) throw std::invalid_argument("reference: target out of range");
    const auto yk = static_cast<std::size_t>(y);
    const double w_y = detail::class_weight_of(in, yk);
    double smooth = 0.0;  // Σ_v w_v·(lse − z_v)
    if (alpha != 0.0) {
      for (std::size_t k = 0; k < v; ++k) smooth += detail::class_weight_of(in, k) * (lse - z[k]);
    }
    const double ce = (1.0 - alpha) * w_y * (lse - z[yk]) + alpha / static_cast<double>(v) * smooth;
    const double zl = opt.z_loss * lse * lse;
    out.token_ce[i] = ce;
    out.token_z_loss[i] = zl;
    out.token_loss[i] = ce + zl;
    out.target_logprob[i] = z[yk] - lse;
    out.correct += arg == y ? 1 : 0;
    ce_total += ce;
    z_total += zl;
    out.ce_denom += w_y;
    ++out.n_valid;
  }
  if (in.reduction == lce::reduction::mean) {
    const double ce_mean = out.ce_denom != 0.0 ? ce_total / out.ce_denom : 0.0;
    out.z_loss = out.n_valid > 0 ? z_total / static_cast<double>(out.n_valid) : 0.0;
    out.loss = ce_mean + out.z_loss;
  } else {
    out.z_loss = z_total;
    out.loss = ce_total + z_total;
  }
  if (!gradients) return out;

  const reference_scales scales =
      reference_row_scales(out.targets, in.ignore_index, in.reduction, upstream, in.class_weight);
  out.row_scale = scales.ce;
  out.row_scale_z = scales.z;
  out.dx.assign(n * d, 0.0);
  out.dw.assign(v * d, 0.0);
  out.db.assign(v, 0.0);
  out.db_abs.assign(v, 0.0);
  if (in.magnitudes) {
    out.dx_mag.assign(n * d, 0.0);
    out.dw_mag.assign(v * d, 0.0);
    out.db_mag.assign(v, 0.0);
  }
  std::vector<double> raw(v);
  for (std::size_t i = 0; i < n; ++i) {
    const double g_ce = scales.ce[i];
    const double g_z = scales.z[i];
    // An ignored row (or a zero upstream) contributes exactly nothing.
    if (g_ce == 0.0 && g_z == 0.0) continue;
    const auto y = static_cast<std::size_t>(out.targets[i]);
    const double w_y = detail::class_weight_of(in, y);
    const double lse = out.lse[i];
    detail::row_raw_logits(in, static_cast<std::int64_t>(i), raw);
    const double* xi = in.x.data() + i * d;
    double* dxi = out.dx.data() + i * d;
    bool near_boundary = false;
    for (std::size_t k = 0; k < v; ++k) {
      const double p = std::exp(detail::transform_logit(raw[k], opt) - lse);
      if (k != y && opt.filter_eps > 0.0 && !near_boundary &&
          std::fabs(p - opt.filter_eps) <= opt.filter_band * opt.filter_eps) {
        near_boundary = true;
        out.filter_boundary_rows.push_back(static_cast<std::int64_t>(i));
      }
      if (k != y && p < opt.filter_eps) continue;  // gradient filtering: the entry is 0
      const double d_ce =
          (1.0 - alpha) * w_y * (p - (k == y ? 1.0 : 0.0)) +
          alpha / static_cast<double>(v) * (weight_total * p - detail::class_weight_of(in, k));
      const double d_z = 2.0 * opt.z_loss * lse * p;
      const double dz = (g_ce * d_ce + g_z * d_z) * detail::transform_derivative(raw[k], opt);
      const double* wk = in.w.data() + k * d;
      double* dwk = out.dw.data() + k * d;
      for (std::size_t j = 0; j < d; ++j) {
        dxi[j] += dz * wk[j];
        dwk[j] += dz * xi[j];
      }
      out.db[k] += dz;
      // The target's entry p − 1 cancels within itself too (p ≈ 1: fp32 rounds p, not the
      // difference), so its magnitude is that of its p term.
      const double p_term = k == y ? std::fabs(g_ce * (1.0 - alpha) * w_y * p *
                                               detail::transform_derivative(raw[k], opt))
                                   : 0.0;
      out.db_abs[k] += std::max(std::fabs(dz), p_term);
      if (in.magnitudes) {
        const double m_ce =
            (1.0 - alpha) * w_y * (p + (k == y ? 1.0 : 0.0)) +
            alpha / static_cast<double>(v) * (weight_total * p + detail::class_weight_of(in, k));
        // With a softcap, fp32 forms the derivative 1 − (z/c)² with an absolute (not
        // relative) error of a few ulp: a floor of 1/64 keeps it in the magnitude.
        const double deriv = std::fabs(detail::transform_derivative(raw[k], opt)) +
                             (opt.softcap > 0.0 ? 1.0 / (64.0 * opt.temperature) : 0.0);
        const double m = (std::fabs(g_ce) * m_ce + std::fabs(g_z * d_z)) * deriv;
        double* dxm = out.dx_mag.data() + i * d;
        double* dwm = out.dw_mag.data() + k * d;
        for (std::size_t j = 0; j < d; ++j) {
          dxm[j] += m * std::fabs(wk[j]);
          dwm[j] += m * std::fabs(xi[j]);
        }
        out.db_mag[k] += m;
      }
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
