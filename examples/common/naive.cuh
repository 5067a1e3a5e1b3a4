/// @file naive.cuh
/// @brief The path users compare lce with, as PyTorch eager runs `F.cross_entropy(x @ w.T, y)`
/// and its backward: the full N×V logit matrix in the element type (bf16 logits for bf16
/// inputs), then a softmax cross-entropy kernel, then two more GEMMs:
///   Z = X·Wᵀ (cuBLAS, fp32 accumulation, stored as Element)          [n, v]
///   per row: lse in fp32, loss_i = lse_i − Z[i, y_i],
///            dZ = g·(softmax(Z) − onehot(y)) written over Z as Element
///   dX = dZ·W, dW = dZᵀ·X (cuBLAS)
/// with g = 1/n_valid (mean), 1 (sum, none). Ignored rows have loss 0 and dZ = 0.
/// The caller provides a workspace of naive::workspace_size() bytes (the N×V logits and a few
/// vectors), so that the extra memory of this path is explicit; it throws on any error.
#pragma once

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <lce/args.hpp>
#include <lce/options.hpp>
#include <stdexcept>
#include <type_traits>

#include "cuda_check.cuh"

namespace lce_example::naive {

namespace detail {

template <class T>
constexpr cudaDataType_t cuda_type() noexcept {
  return std::is_same_v<T, float> ? CUDA_R_32F
                                  : (std::is_same_v<T, __half> ? CUDA_R_16F : CUDA_R_16BF);
}

template <class T>
__device__ inline float to_float(T value) {
  return static_cast<float>(value);
}

/// Running {max, Σ exp(z − max)} of a set of logits; merge() combines two such sets.
struct lse_state {
  float max = -INFINITY;
  float sum = 0.0f;

  __device__ void add(float z) {
    if (z > max) {
      sum = sum * __expf(max - z) + 1.0f;
      max = z;
    } else {
      sum += __expf(z - max);
    }
  }
  __device__ static lse_state merge(const lse_state& a, const lse_state& b) {
    if (a.max == -INFINITY) return b;  // also keeps two empty states from giving NaN
    if (b.max == -INFINITY) return a;
    const float m = fmaxf(a.max, b.max);
    return {m, a.sum * __expf(a.max - m) + b.sum * __expf(b.max - m)};
  }
};

struct merge_lse {
  __device__ lse_state operator()(const lse_state& a, const lse_state& b) const {
    return lse_state::merge(a, b);
  }
};

constexpr int threads = 512;

/// Rows whose target is not ignore_index; one block.
__global__ void __launch_bounds__(threads)
    count_valid_kernel(const std::int64_t* targets, std::int64_t n, std::int64_t ignore_index,
                       long long* n_valid) {
  using reduce = cub::BlockReduce<long long, threads>;
  __shared__ typename reduce::TempStorage storage;
  long long count = 0;
  for (std::int64_t i = threadIdx.x; i < n; i += threads) count += targets[i] != ignore_index;
  count = reduce(storage).Sum(count);
  if (threadIdx.x == 0) *n_valid = count;
}

/// 16 bytes of logits: the unit of the softmax kernel's loads and stores.
template <class Element>
struct alignas(16) pack {
  static constexpr int size = 16 / sizeof(Element);
  Element values[size];
};

/// One block per row: lse and loss of the row, then dZ over the row's logits, in place.
/// Rows whose byte length is a multiple of 16 are read and written 16 bytes per thread (as
/// PyTorch's softmax kernels do); the rest of a row, or all of it otherwise, element-wise.
template <class Element>
__global__ void __launch_bounds__(threads)
    softmax_cross_entropy_kernel(Element* logits, std::int64_t v, const std::int64_t* targets,
                                 std::int64_t ignore_index, const long long* n_valid,
                                 lce::reduction reduction, float* token_loss, float* lse_out) {
  using reduce = cub::BlockReduce<lse_state, threads>;
  constexpr int width = pack<Element>::size;
  __shared__ typename reduce::TempStorage storage;
  __shared__ float row_lse;
  const std::int64_t i = blockIdx.x;
  Element* z = logits + i * v;
  auto* z_packs = reinterpret_cast<pack<Element>*>(z);
  const std::int64_t packs = v * sizeof(Element) % 16 == 0 ? v / width : 0;
  const std::int64_t y = targets[i];
  const bool valid = y != ignore_index;

  lse_state state;
  for (std::int64_t p = threadIdx.x; p < packs; p += threads) {
    const pack<Element> in = z_packs[p];
#pragma unroll
    for (int e = 0; e < width; ++e) state.add(to_float(in.values[e]));
  }
  for (std::int64_t k = packs * width + threadIdx.x; k < v; k += threads) state.add(to_float(z[k]));
  // Out-of-range targets read nothing and give NaN, as lce does.
  float target_logit = NAN;
  if (threadIdx.x == 0 && y >= 0 && y < v) target_logit = to_float(z[y]);
  state = reduce(storage).Reduce(state, merge_lse{});  // barrier: every read of z is done
  if (threadIdx.x == 0) {
    row_lse = state.max + logf(state.sum);
    if (lse_out != nullptr) lse_out[i] = row_lse;
    token_loss[i] = valid ? row_lse - target_logit : 0.0f;
  }
  __syncthreads();

  const float scale = !valid                              ? 0.0f
                      : reduction == lce::reduction::mean ? 1.0f / static_cast<float>(*n_valid)
                                                          : 1.0f;
  const float lse = row_lse;
  auto grad = [&](float logit, std::int64_t k) {
    const float p = scale != 0.0f ? __expf(logit - lse) : 0.0f;
    return static_cast<Element>(scale * (p - (k == y ? 1.0f : 0.0f)));
  };
  for (std::int64_t p = threadIdx.x; p < packs; p += threads) {
    pack<Element> io = z_packs[p];
#pragma unroll
    for (int e = 0; e < width; ++e) io.values[e] = grad(to_float(io.values[e]), p * width + e);
    z_packs[p] = io;
  }
  for (std::int64_t k = packs * width + threadIdx.x; k < v; k += threads)
    z[k] = grad(to_float(z[k]), k);
}

/// loss = Σ token_loss (sum) or Σ / n_valid (mean; 0 when no row is valid); one block.
__global__ void __launch_bounds__(threads)
    reduce_loss_kernel(const float* token_loss, std::int64_t n, const long long* n_valid,
                       lce::reduction reduction, float* loss) {
  using reduce = cub::BlockReduce<float, threads>;
  __shared__ typename reduce::TempStorage storage;
  float sum = 0.0f;
  for (std::int64_t i = threadIdx.x; i < n; i += threads) sum += token_loss[i];
  sum = reduce(storage).Sum(sum);
  if (threadIdx.x == 0) {
    const long long count = *n_valid;
    *loss = reduction == lce::reduction::sum ? sum
            : count > 0                      ? sum / static_cast<float>(count)
                                             : 0.0f;
  }
}

/// Column-major C[m, n] = op(A)·op(B) through cublasGemmEx with fp32 accumulation (a
/// row-major [r, c] matrix is a column-major [c, r] one).
template <class AB, class C>
void gemm(cublasHandle_t handle, cublasOperation_t op_a, cublasOperation_t op_b, std::int64_t m,
          std::int64_t n, std::int64_t k, const AB* a, std::int64_t lda, const AB* b,
          std::int64_t ldb, C* c, std::int64_t ldc) {
  const float alpha = 1.0f;
  const float beta = 0.0f;
  LCE_EXAMPLE_CHECK(cublasGemmEx(
      handle, op_a, op_b, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), &alpha, a,
      cuda_type<AB>(), static_cast<int>(lda), b, cuda_type<AB>(), static_cast<int>(ldb), &beta, c,
      cuda_type<C>(), static_cast<int>(ldc), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

constexpr std::size_t align(std::size_t bytes) noexcept { return (bytes + 255) / 256 * 256; }

}  // namespace detail

/// @brief Z [n, v] = X·Wᵀ, the first of the three GEMMs of the naive path (alone, the three are
/// the cuBLAS floor of the benchmarks). Like the two below: dense row-major matrices, the
/// handle's stream, fp32 accumulation.
template <class Element>
void logits_gemm(cublasHandle_t handle, const lce::problem& s, const Element* x, const Element* w,
                 Element* z) {  // Zᵀ [v, n] = W·Xᵀ in cuBLAS's column-major terms
  detail::gemm(handle, CUBLAS_OP_T, CUBLAS_OP_N, s.v, s.n, s.d, w, s.d, x, s.d, z, s.v);
}

/// @brief dX [n, d] = dZ·W.
template <class Element>
void grad_x_gemm(cublasHandle_t handle, const lce::problem& s, const Element* dz, const Element* w,
                 Element* dx) {  // dXᵀ [d, n] = Wᵀ·dZᵀ
  detail::gemm(handle, CUBLAS_OP_N, CUBLAS_OP_N, s.d, s.n, s.v, w, s.d, dz, s.v, dx, s.d);
}

/// @brief dW [v, d] = dZᵀ·X, stored as Grad (Element or float).
template <class Element, class Grad>
void grad_w_gemm(cublasHandle_t handle, const lce::problem& s, const Element* dz, const Element* x,
                 Grad* dw) {  // dWᵀ [d, v] = Xᵀ·dZ
  detail::gemm(handle, CUBLAS_OP_N, CUBLAS_OP_T, s.d, s.v, s.n, x, s.d, dz, s.v, dw, s.d);
}

/// @brief Bytes of workspace naive::forward_backward needs: the n×v logits in `Element`
/// (4.2 GB for 8192×256000 in bf16), n floats of per-token loss and a counter.
template <class Element>
std::size_t workspace_size(const lce::problem& shape) noexcept {
  const auto n = static_cast<std::size_t>(shape.n);
  return detail::align(n * static_cast<std::size_t>(shape.v) * sizeof(Element)) +
         detail::align(n * sizeof(float)) + sizeof(long long);
}

/// @brief Loss (and lse, token_loss where given) and the gradients dX, dW (upstream gradient 1)
/// through the full logit matrix. Same arguments as lce::forward_backward, dense matrices only
/// (leading dimensions 0), no bias. Enqueued on `stream` (the handle's stream is set to it).
/// @tparam Element  float, __half or __nv_bfloat16: X, W, the logits, dX
/// @tparam Grad     Element or float: dW
template <class Element, class Grad>
void forward_backward(void* d_workspace, const lce::forward_backward_args<Element, Grad>& args,
                      const lce::problem& shape, const lce::loss_options& options,
                      cublasHandle_t handle, cudaStream_t stream) {
  if (args.bias != nullptr || args.db != nullptr)
    throw std::invalid_argument("naive::forward_backward: no bias");
  if (shape.ldx != 0 || shape.ldw != 0 || shape.lddx != 0 || shape.lddw != 0)
    throw std::invalid_argument("naive::forward_backward: dense matrices only");
  const std::int64_t n = shape.n, v = shape.v;
  auto* base = static_cast<char*>(d_workspace);
  auto* logits = reinterpret_cast<Element*>(base);
  base += detail::align(static_cast<std::size_t>(n * v) * sizeof(Element));
  float* token_loss = args.token_loss != nullptr ? args.token_loss : reinterpret_cast<float*>(base);
  base += detail::align(static_cast<std::size_t>(n) * sizeof(float));
  auto* n_valid = reinterpret_cast<long long*>(base);

  LCE_EXAMPLE_CHECK(cublasSetStream(handle, stream));
  logits_gemm(handle, shape, args.x, args.w, logits);

  detail::count_valid_kernel<<<1, detail::threads, 0, stream>>>(args.targets, n,
                                                                options.ignore_index, n_valid);
  LCE_EXAMPLE_CHECK_LAUNCH();
  detail::softmax_cross_entropy_kernel<Element>
      <<<static_cast<unsigned>(n), detail::threads, 0, stream>>>(
          logits, v, args.targets, options.ignore_index, n_valid, options.reduction, token_loss,
          args.lse);
  LCE_EXAMPLE_CHECK_LAUNCH();
  if (args.loss != nullptr && options.reduction != lce::reduction::none) {
    detail::reduce_loss_kernel<<<1, detail::threads, 0, stream>>>(token_loss, n, n_valid,
                                                                  options.reduction, args.loss);
    LCE_EXAMPLE_CHECK_LAUNCH();
  }

  if (args.dx != nullptr) grad_x_gemm(handle, shape, logits, args.w, args.dx);
  if (args.dw != nullptr) grad_w_gemm(handle, shape, logits, args.x, args.dw);
}

}  // namespace lce_example::naive
