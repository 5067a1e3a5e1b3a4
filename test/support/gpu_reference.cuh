/// @file gpu_reference.cuh
/// @brief fp64 reference of linear cross-entropy on the GPU, for shapes the CPU reference cannot
/// afford (N·V·D up to ~1e12): a plain shared-memory-tiled fp64 GEMM (independent of cuBLAS,
/// which the library itself uses) and row kernels for lse, per-token loss, dZ and db.
/// Z (then dZ, in place) is materialized in fp64: the caller must have N·V·8 bytes free.
/// Every function synchronizes the device and throws on error (tests only).
#pragma once

#include <cmath>
#include <cstdint>
#include <lce/options.hpp>
#include <stdexcept>
#include <vector>

#include "device_buffer.hpp"
#include "reference.hpp"

namespace lce_test {
namespace gpu_ref {

inline constexpr int gemm_tile = 64;    // (BM, BN) = (64, 64)
inline constexpr int gemm_tile_k = 16;  // BK
inline constexpr int gemm_threads = 256;
inline constexpr int row_threads = 256;

/// C[i, j] = Σ_k A(i, k) B(k, j) with A(i, k) = a[i·a_i + k·a_k], B(k, j) = b[k·b_k + j·b_j]
/// and C row-major with stride ldc: any transpose through the strides. Each thread owns a 4×4
/// sub-tile strided by 16 so that the stores of a warp are coalesced.
template <class T>
__global__ void __launch_bounds__(gemm_threads)
    gemm_kernel(std::int64_t m, std::int64_t n, std::int64_t k, const T* a, std::int64_t a_i,
                std::int64_t a_k, const T* b, std::int64_t b_k, std::int64_t b_j, T* c,
                std::int64_t ldc) {
  __shared__ T as[gemm_tile_k][gemm_tile + 1];  // (BK, BM)
  __shared__ T bs[gemm_tile_k][gemm_tile + 1];  // (BK, BN)
  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % 16;
  const int ty = tid / 16;
  const std::int64_t row0 = static_cast<std::int64_t>(blockIdx.y) * gemm_tile;
  const std::int64_t col0 = static_cast<std::int64_t>(blockIdx.x) * gemm_tile;
  T acc[4][4] = {};
  for (std::int64_t k0 = 0; k0 < k; k0 += gemm_tile_k) {
    for (int e = tid; e < gemm_tile * gemm_tile_k; e += gemm_threads) {
      // Walk the contiguous dimension of each operand with consecutive threads.
      int ii = a_k == 1 ? e / gemm_tile_k : e % gemm_tile;
      int kk = a_k == 1 ? e % gemm_tile_k : e / gemm_tile;
      std::int64_t gi = row0 + ii;
      std::int64_t gk = k0 + kk;
      as[kk][ii] = (gi < m && gk < k) ? a[gi * a_i + gk * a_k] : T(0);
      const int jj = b_j == 1 ? e % gemm_tile : e / gemm_tile_k;
      kk = b_j == 1 ? e / gemm_tile : e % gemm_tile_k;
      const std::int64_t gj = col0 + jj;
      gk = k0 + kk;
      bs[kk][jj] = (gj < n && gk < k) ? b[gk * b_k + gj * b_j] : T(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < gemm_tile_k; ++kk) {
      T av[4];
      T bv[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) av[r] = as[kk][ty + 16 * r];
#pragma unroll
      for (int q = 0; q < 4; ++q) bv[q] = bs[kk][tx + 16 * q];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[r][q] += av[r] * bv[q];
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const std::int64_t i = row0 + ty + 16 * r;
    if (i >= m) continue;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const std::int64_t j = col0 + tx + 16 * q;
      if (j < n) c[i * ldc + j] = acc[r][q];
    }
  }
}

/// Block-wide reduction of one value per thread (row_threads threads), result in every thread.
template <class T, class Op>
__device__ T block_reduce(T value, Op op, T* scratch) {
  const int tid = static_cast<int>(threadIdx.x);
  scratch[tid] = value;
  __syncthreads();
  for (int stride = row_threads / 2; stride > 0; stride /= 2) {
    if (tid < stride) scratch[tid] = op(scratch[tid], scratch[tid + stride]);
    __syncthreads();
  }
  const T out = scratch[0];
  __syncthreads();
  return out;
}

struct max_op {
  template <class T>
  __device__ T operator()(T a, T b) const {
    return a > b ? a : b;
  }
};
struct sum_op {
  template <class T>
  __device__ T operator()(T a, T b) const {
    return a + b;
  }
};

struct min_op {
  template <class T>
  __device__ T operator()(T a, T b) const {
    return a < b ? a : b;
  }
};

/// Scalars of the loss options the row kernels need.
struct row_params {
  std::int64_t v = 0;
  std::int64_t ignore_index = -100;
  double label_smoothing = 0.0;
  double z_loss = 0.0;
  double softcap = 0.0;
  double temperature = 1.0;
  double weight_total = 0.0;  ///< Σ_v w_v (v without class weights)
  double filter_eps = 0.0;    ///< dZ entries (not the target's) with p below it are 0
};

/// Per-row outputs of lse_rows_kernel (device pointers, [n] each).
struct row_outputs {
  double* lse;
  double* token_loss;
  double* token_z_loss;
  double* entropy;
  double* target_logprob;
  double* max_logit;
  std::int64_t* argmax;
};

/// One block per row: Z_i ← softcap((Z_i + b)/τ) in place, then lse, entropy, argmax and the
/// loss terms of the row (`targets` are the effective ones, after any causal shift).
template <class T>
__global__ void __launch_bounds__(row_threads)
    lse_rows_kernel(T* z, const T* bias, const T* class_weight, const std::int64_t* targets,
                    row_params prm, row_outputs out) {
  __shared__ T scratch[row_threads];
  __shared__ std::int64_t index_scratch[row_threads];
  const std::int64_t i = blockIdx.x;
  const std::int64_t v = prm.v;
  T* zi = z + i * v;
  T m = -INFINITY;
  for (std::int64_t j = threadIdx.x; j < v; j += row_threads) {
    T value = (zi[j] + (bias != nullptr ? bias[j] : T(0))) / T(prm.temperature);
    if (prm.softcap > 0.0) value = T(prm.softcap) * tanh(value / T(prm.softcap));
    zi[j] = value;
    m = value > m ? value : m;
  }
  m = block_reduce(m, max_op{}, scratch);
  T s = 0;
  std::int64_t first = v;
  for (std::int64_t j = threadIdx.x; j < v; j += row_threads) {
    s += exp(zi[j] - m);
    if (zi[j] == m && j < first) first = j;
  }
  s = block_reduce(s, sum_op{}, scratch);
  first = block_reduce(first, min_op{}, index_scratch);
  const T l = m + log(s);
  T entropy = 0;
  T smooth = 0;  // Σ_v w_v·(lse − z_v)
  for (std::int64_t j = threadIdx.x; j < v; j += row_threads) {
    const T logp = zi[j] - l;
    entropy -= exp(logp) * logp;
    smooth += (class_weight != nullptr ? class_weight[j] : T(1)) * (l - zi[j]);
  }
  entropy = block_reduce(entropy, sum_op{}, scratch);
  smooth = block_reduce(smooth, sum_op{}, scratch);
  if (threadIdx.x == 0) {
    out.lse[i] = l;
    out.entropy[i] = entropy;
    out.max_logit[i] = m;
    out.argmax[i] = first;
    const std::int64_t y = targets[i];
    T loss = 0;
    T zl = 0;
    T logprob = 0;
    if (y != prm.ignore_index) {
      if (y < 0 || y >= v) {
        loss = zl = logprob = T(NAN);
      } else {
        const T w_y = class_weight != nullptr ? class_weight[y] : T(1);
        const T alpha = prm.label_smoothing;
        zl = T(prm.z_loss) * l * l;
        loss = (T(1) - alpha) * w_y * (l - zi[y]) + alpha / T(v) * smooth + zl;
        logprob = zi[y] - l;
      }
    }
    out.token_loss[i] = loss;
    out.token_z_loss[i] = zl;
    out.target_logprob[i] = logprob;
  }
}

/// One block per row: Z_i (the transformed logits) ← dL/draw_i, in place:
/// [g_ce·((1 − α)·w_y·(p − onehot) + (α/V)·(Σw·p − w)) + g_z·2·s·lse·p] · dz/draw.
template <class T>
__global__ void __launch_bounds__(row_threads)
    dz_rows_kernel(T* z, const T* class_weight, const std::int64_t* targets, const T* lse,
                   const T* scale_ce, const T* scale_z, row_params prm) {
  const std::int64_t i = blockIdx.x;
  const std::int64_t v = prm.v;
  T* zi = z + i * v;
  const T g_ce = scale_ce[i];
  const T g_z = scale_z[i];
  const T l = lse[i];
  const std::int64_t y = targets[i];
  const bool skip = g_ce == T(0) && g_z == T(0);
  const T w_y = (skip || class_weight == nullptr) ? T(1) : class_weight[y];
  const T alpha = prm.label_smoothing;
  for (std::int64_t j = threadIdx.x; j < v; j += row_threads) {
    if (skip) {
      zi[j] = T(0);
      continue;
    }
    const T zj = zi[j];
    const T p = exp(zj - l);
    if (j != y && p < T(prm.filter_eps)) {  // gradient filtering
      zi[j] = T(0);
      continue;
    }
    const T w_j = class_weight != nullptr ? class_weight[j] : T(1);
    const T d_ce = (T(1) - alpha) * w_y * (p - (j == y ? T(1) : T(0))) +
                   alpha / T(v) * (T(prm.weight_total) * p - w_j);
    const T d_z = T(2) * T(prm.z_loss) * l * p;
    T deriv = T(1) / T(prm.temperature);
    if (prm.softcap > 0.0) {
      const T t = zj / T(prm.softcap);
      deriv *= T(1) - t * t;
    }
    zi[j] = (g_ce * d_ce + g_z * d_z) * deriv;
  }
}

/// db_j = Σ_i dZ_ij (or Σ_i |dZ_ij| with Abs), one thread per column (coalesced across the
/// warp).
template <class T, bool Abs = false>
__global__ void column_sum_kernel(const T* dz, std::int64_t n, std::int64_t v, T* db) {
  const std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= v) return;
  T acc = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const T x = dz[i * v + j];
    acc += Abs ? (x < 0 ? -x : x) : x;
  }
  db[j] = acc;
}

/// dst [rows, cols] dense double ← src [rows, ld] of any element type.
template <class S>
__global__ void to_dense_double_kernel(const S* src, std::int64_t rows, std::int64_t cols,
                                       std::int64_t ld, double* dst) {
  const std::int64_t total = rows * cols;
  for (std::int64_t e = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t r = e / cols;
    const std::int64_t c = e % cols;
    dst[e] = to_double(src[r * ld + c]);
  }
}

inline unsigned grid_for(std::int64_t elements, int threads) {
  const std::int64_t blocks = (elements + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 65536 * 8 ? (blocks > 0 ? blocks : 1) : 65536 * 8);
}

}  // namespace gpu_ref

/// @brief C [m, n] (row stride ldc) = A·B in fp64 with A(i, k) = a[i·a_i + k·a_k] and
/// B(k, j) = b[k·b_k + j·b_j]. Synchronizes; throws on error.
inline void gpu_dgemm(std::int64_t m, std::int64_t n, std::int64_t k, const double* a,
                      std::int64_t a_i, std::int64_t a_k, const double* b, std::int64_t b_k,
                      std::int64_t b_j, double* c, std::int64_t ldc) {
  const std::int64_t tiles_m = (m + gpu_ref::gemm_tile - 1) / gpu_ref::gemm_tile;
  const std::int64_t tiles_n = (n + gpu_ref::gemm_tile - 1) / gpu_ref::gemm_tile;
  if (tiles_m > 65535 || tiles_n > 0x7fffffff) throw std::invalid_argument("gpu_dgemm: too large");
  const dim3 grid(static_cast<unsigned>(tiles_n), static_cast<unsigned>(tiles_m));
  gpu_ref::gemm_kernel<double>
      <<<grid, gpu_ref::gemm_threads>>>(m, n, k, a, a_i, a_k, b, b_k, b_j, c, ldc);
  LCE_TEST_CUDA(cudaGetLastError());
  LCE_TEST_CUDA(cudaDeviceSynchronize());
}

/// dst [rows, cols] dense fp64 copy of a device matrix with row stride ld.
template <class S>
device_buffer<double> gpu_to_dense_double(const S* src, std::int64_t rows, std::int64_t cols,
                                          std::int64_t ld) {
  device_buffer<double> dst(static_cast<std::size_t>(rows * cols));
  if (rows * cols == 0) return dst;
  gpu_ref::to_dense_double_kernel<S>
      <<<gpu_ref::grid_for(rows * cols, 256), 256>>>(src, rows, cols, ld, dst.data());
  LCE_TEST_CUDA(cudaGetLastError());
  LCE_TEST_CUDA(cudaDeviceSynchronize());
  return dst;
}

/// @brief Outputs of the GPU reference, in device memory (fp64, dense), plus the reduced loss
/// and the host copies the tests need.
struct gpu_reference_output {
  device_buffer<double> lse;             ///< [n]
  device_buffer<double> token_loss;      ///< [n] ce + z-loss (0 for ignored rows)
  device_buffer<double> token_z_loss;    ///< [n]
  device_buffer<double> entropy;         ///< [n]
  device_buffer<double> target_logprob;  ///< [n]
  device_buffer<double> row_scale;       ///< [n] dL/d(ce_i) (with gradients)
  device_buffer<double> row_scale_z;     ///< [n] dL/d(zl_i) (with gradients)
  device_buffer<double> dx;              ///< [n, d] (with gradients)
  device_buffer<double> dw;              ///< [v, d] (with gradients)
  device_buffer<double> db;              ///< [v] (with gradients)
  device_buffer<double> db_abs;          ///< [v] Σ_i |dZ_iv| (with gradients)
  std::vector<std::int64_t> targets;     ///< [n] effective targets (host)
  std::vector<std::int64_t> argmax;      ///< [n] first maximum of z (host)
  std::vector<double> max_logit;         ///< [n] max z (host)
  double loss = 0.0;
  double z_loss = 0.0;
  std::int64_t n_valid = 0;
  std::int64_t correct = 0;
};

/// @brief The reference of reference.hpp, on the GPU, from the device inputs of the library
/// (any element type, leading dimensions from `shape`). `h_targets` is the host copy of the
/// caller's (unshifted) targets; `upstream` follows reference(): empty (1), [1], or [n] for
/// reduction none; `options` and `class_weight` (host, [v] or empty) as in reference_input.
template <class Element>
gpu_reference_output gpu_reference(const Element* d_x, const Element* d_w, const Element* d_bias,
                                   const std::int64_t* /*d_targets*/,
                                   const std::vector<std::int64_t>& h_targets,
                                   const lce::problem& shape, std::int64_t ignore_index,
                                   lce::reduction red, bool gradients,
                                   const std::vector<double>& upstream = {},
                                   const reference_options& options = {},
                                   const std::vector<double>& class_weight = {}) {
  const std::int64_t n = shape.n;
  const std::int64_t d = shape.d;
  const std::int64_t v = shape.v;
  if (static_cast<std::int64_t>(h_targets.size()) != n) {
    throw std::invalid_argument("gpu_reference: h_targets size");
  }
  if (!(class_weight.empty() || static_cast<std::int64_t>(class_weight.size()) == v)) {
    throw std::invalid_argument("gpu_reference: class_weight size");
  }
  const device_buffer<double> x = gpu_to_dense_double(d_x, n, d, shape.x_stride());
  const device_buffer<double> w = gpu_to_dense_double(d_w, v, d, shape.w_stride());
  device_buffer<double> bias;
  if (d_bias != nullptr) bias = gpu_to_dense_double(d_bias, 1, v, v);
  device_buffer<double> weights;
  if (!class_weight.empty()) weights = device_buffer<double>(class_weight);

  gpu_reference_output out;
  out.targets = reference_effective_targets(h_targets, options.shift_seq_len, ignore_index);
  const device_buffer<std::int64_t> targets(out.targets);
  gpu_ref::row_params prm;
  prm.v = v;
  prm.ignore_index = ignore_index;
  prm.label_smoothing = options.label_smoothing;
  prm.z_loss = options.z_loss;
  prm.softcap = options.softcap;
  prm.temperature = options.temperature;
  prm.filter_eps = options.filter_eps;
  prm.weight_total = 0.0;
  for (std::int64_t k = 0; k < v; ++k)
    prm.weight_total += class_weight.empty() ? 1.0 : class_weight[static_cast<std::size_t>(k)];

  const auto rows = static_cast<std::size_t>(n);
  out.lse = device_buffer<double>(rows);
  out.token_loss = device_buffer<double>(rows);
  out.token_z_loss = device_buffer<double>(rows);
  out.entropy = device_buffer<double>(rows);
  out.target_logprob = device_buffer<double>(rows);
  device_buffer<double> max_logit(rows);
  device_buffer<std::int64_t> argmax(rows);
  device_buffer<double> z(static_cast<std::size_t>(n * v));  // Z, then dZ in place

  // Z = X · Wᵀ: A = X (i stride d, k stride 1), B(k, j) = W[j, k].
  gpu_dgemm(n, v, d, x.data(), d, 1, w.data(), 1, d, z.data(), v);
  const gpu_ref::row_outputs row_out{
      out.lse.data(),     out.token_loss.data(),     out.token_z_loss.data(),
      out.entropy.data(), out.target_logprob.data(), max_logit.data(),
      argmax.data()};
  gpu_ref::lse_rows_kernel<double><<<static_cast<unsigned>(n), gpu_ref::row_threads>>>(
      z.data(), bias.data(), weights.data(), targets.data(), prm, row_out);
  LCE_TEST_CUDA(cudaGetLastError());
  LCE_TEST_CUDA(cudaDeviceSynchronize());

  out.argmax = argmax.download();
  out.max_logit = max_logit.download();
  const std::vector<double> token_loss = out.token_loss.download();
  const std::vector<double> token_z_loss = out.token_z_loss.download();
  double ce_total = 0.0;
  double z_total = 0.0;
  double ce_denom = 0.0;
  for (std::int64_t i = 0; i < n; ++i) {
    const auto r = static_cast<std::size_t>(i);
    const std::int64_t y = out.targets[r];
    if (y == ignore_index) continue;
    ce_total += token_loss[r] - token_z_loss[r];
    z_total += token_z_loss[r];
    ce_denom +=
        class_weight.empty() || y < 0 || y >= v ? 1.0 : class_weight[static_cast<std::size_t>(y)];
    out.correct += out.argmax[r] == y ? 1 : 0;
    ++out.n_valid;
  }
  if (red == lce::reduction::mean) {
    out.z_loss = out.n_valid > 0 ? z_total / static_cast<double>(out.n_valid) : 0.0;
    out.loss = (ce_denom != 0.0 ? ce_total / ce_denom : 0.0) + out.z_loss;
  } else {
    out.z_loss = z_total;
    out.loss = ce_total + z_total;
  }
  if (!gradients) return out;

  const reference_scales scales =
      reference_row_scales(out.targets, ignore_index, red, upstream, class_weight);
  out.row_scale = device_buffer<double>(scales.ce);
  out.row_scale_z = device_buffer<double>(scales.z);
  gpu_ref::dz_rows_kernel<double><<<static_cast<unsigned>(n), gpu_ref::row_threads>>>(
      z.data(), weights.data(), targets.data(), out.lse.data(), out.row_scale.data(),
      out.row_scale_z.data(), prm);
  LCE_TEST_CUDA(cudaGetLastError());
  out.db = device_buffer<double>(static_cast<std::size_t>(v));
  gpu_ref::column_sum_kernel<double>
      <<<static_cast<unsigned>((v + 255) / 256), 256>>>(z.data(), n, v, out.db.data());
  LCE_TEST_CUDA(cudaGetLastError());
  out.db_abs = device_buffer<double>(static_cast<std::size_t>(v));
  gpu_ref::column_sum_kernel<double, true>
      <<<static_cast<unsigned>((v + 255) / 256), 256>>>(z.data(), n, v, out.db_abs.data());
  LCE_TEST_CUDA(cudaGetLastError());
  LCE_TEST_CUDA(cudaDeviceSynchronize());

  out.dx = device_buffer<double>(static_cast<std::size_t>(n * d));
  out.dw = device_buffer<double>(static_cast<std::size_t>(v * d));
  // dX = dZ · W: A = dZ (i stride v, k stride 1), B(k, j) = W[k, j].
  gpu_dgemm(n, d, v, z.data(), v, 1, w.data(), d, 1, out.dx.data(), d);
  // dW = dZᵀ · X: A(i, k) = dZ[k, i] (i stride 1, k stride v), B(k, j) = X[k, j].
  gpu_dgemm(v, d, n, z.data(), 1, v, x.data(), d, 1, out.dw.data(), d);
  return out;
}

}  // namespace lce_test
