/// @file compare.cuh
/// @brief On-device comparison of an output with its fp64 reference: relative Frobenius error,
/// largest difference, non-finite outputs, writes into the padding; and the loss check.
#pragma once

#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "device_buffer.hpp"
#include "gpu_reference.cuh"

namespace lce_test {

// ---------------------------------------------------------------------------------------------
// Comparison kernels.

namespace harness_detail {

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
/// `norm_floor`: the reference norm the error is measured against at least (see lse_norm_floor).
template <class T>
double check_output(const char* name, const T* d_out, std::int64_t rows, std::int64_t cols,
                    std::int64_t ld, const double* d_ref, double tolerance,
                    double norm_floor = 0.0) {
  compare_stats s = compare_device(d_out, rows, cols, ld, d_ref);
  if (norm_floor > s.ref_norm) {
    const double err = s.ref_norm > 0.0 ? s.rel * s.ref_norm : s.rel;  // Frobenius norm
    s.rel = err / norm_floor;
  }
  INFO(name << ": rel=" << s.rel << " max_abs=" << s.max_abs << " ref_norm=" << s.ref_norm
            << " norm_floor=" << norm_floor << " max_ref=" << s.max_ref << " nonfinite="
            << s.nonfinite << " padding_written=" << s.padding << " tolerance=" << tolerance);
  CHECK(s.nonfinite == 0);
  CHECK(s.padding == 0);
  CHECK(s.rel <= tolerance);
  return s.rel;
}

/// The norm an lse column of `rows` rows is measured against at least: one nat a row. An lse is
/// an absolute quantity (the loss adds its error as it is); where a row's lse lies near 0 by
/// cancellation — a vocabulary of one, lse = z = Σ x·w — a purely relative error divides
/// fp32's rounding of the dot product (~1e-7 of Σ|x·w|) by that small value (an fp32 row of
/// 1 × 16 × 1 read 1.5e-5 against 1e-5 for lse ≈ 0.0105).
inline double lse_norm_floor(std::int64_t rows) { return std::sqrt(static_cast<double>(rows)); }

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

}  // namespace lce_test
