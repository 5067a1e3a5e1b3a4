/// @file lt_floor.cuh
/// @brief The floor of lce_bench: the fastest GEMM cuBLASLt offers for a shape. cuBLASLt's
/// heuristic proposes up to `candidates` algorithms for the given workspace; each is timed on
/// the caller's data (L2 flushed before every run) and the fastest is kept. A floor taken from
/// the first heuristic alone, or without a workspace, can be a few percent slower than what
/// the machine does (torch.matmul asks cuBLASLt with a workspace), and flatters every ratio.
#pragma once

#include <cublasLt.h>
#include <cuda_bf16.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/cuda_check.cuh"

namespace lce_bench {

inline void lt_check(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS)
    throw std::runtime_error(std::string("cuBLASLt: ") + what + " failed (status " +
                             std::to_string(static_cast<int>(status)) + ")");
}

/// One column-major GEMM C [m, n] = op(A)·op(B) + beta·C (bf16 in, `out` type out, fp32
/// accumulation, scalars from the host; the floor's beta is 0), with the fastest algorithm of
/// cuBLASLt's heuristic candidates, chosen by `tune` (run), or the heuristic's first (run_first).
class lt_gemm {
 public:
  lt_gemm(cublasLtHandle_t lt, cublasOperation_t ta, cublasOperation_t tb, std::int64_t m,
          std::int64_t n, std::int64_t k, std::int64_t lda, std::int64_t ldb, std::int64_t ldc,
          cudaDataType_t out, float beta = 0.0f)
      : lt_(lt), beta_(beta) {
    lt_check(cublasLtMatmulDescCreate(&op_, CUBLAS_COMPUTE_32F, CUDA_R_32F), "MatmulDescCreate");
    lt_check(cublasLtMatmulDescSetAttribute(op_, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)),
             "TRANSA");
    lt_check(cublasLtMatmulDescSetAttribute(op_, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)),
             "TRANSB");
    const bool a_t = ta != CUBLAS_OP_N, b_t = tb != CUBLAS_OP_N;
    lt_check(cublasLtMatrixLayoutCreate(&a_, CUDA_R_16BF, a_t ? k : m, a_t ? m : k, lda), "A");
    lt_check(cublasLtMatrixLayoutCreate(&b_, CUDA_R_16BF, b_t ? n : k, b_t ? k : n, ldb), "B");
    lt_check(cublasLtMatrixLayoutCreate(&c_, out, m, n, ldc), "C");
  }
  lt_gemm(const lt_gemm&) = delete;
  lt_gemm& operator=(const lt_gemm&) = delete;
  ~lt_gemm() {
    cublasLtMatrixLayoutDestroy(c_);
    cublasLtMatrixLayoutDestroy(b_);
    cublasLtMatrixLayoutDestroy(a_);
    cublasLtMatmulDescDestroy(op_);
  }

  /// Times every heuristic candidate (`runs` runs each after one warm-up, L2 flushed before
  /// each, the median kept) on these operands and keeps the fastest. Returns how many ran.
  int tune(const void* a, const void* b, void* c, void* workspace, std::size_t workspace_bytes,
           int candidates, int runs, cudaStream_t stream, lce_example::l2_flusher& flusher) {
    workspace_ = workspace;
    workspace_bytes_ = workspace_bytes;
    cublasLtMatmulPreference_t pref = nullptr;
    lt_check(cublasLtMatmulPreferenceCreate(&pref), "PreferenceCreate");
    lt_check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                  &workspace_bytes, sizeof(workspace_bytes)),
             "MAX_WORKSPACE_BYTES");
    std::vector<cublasLtMatmulHeuristicResult_t> found(static_cast<std::size_t>(candidates));
    int count = 0;
    const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(lt_, op_, a_, b_, c_, c_, pref,
                                                                 candidates, found.data(), &count);
    cublasLtMatmulPreferenceDestroy(pref);
    lt_check(status, "AlgoGetHeuristic");
    double best = std::numeric_limits<double>::infinity();
    int timed = 0;
    for (int i = 0; i < count; ++i) {
      if (found[static_cast<std::size_t>(i)].state != CUBLAS_STATUS_SUCCESS) continue;
      algo_ = found[static_cast<std::size_t>(i)].algo;
      if (launch(a, b, c, stream) != CUBLAS_STATUS_SUCCESS) continue;  // declined: skip it
      if (timed == 0) first_algo_ = algo_;
      const double ms = lce_example::median(
          lce_example::time_runs([&](cudaStream_t s) { lt_check(launch(a, b, c, s), "Matmul"); }, 0,
                                 runs, stream, flusher));
      ++timed;
      if (ms < best) {
        best = ms;
        best_algo_ = algo_;
      }
    }
    if (timed == 0) throw std::runtime_error("cuBLASLt: no algorithm ran for the floor");
    algo_ = best_algo_;
    return timed;
  }

  void run(const void* a, const void* b, void* c, cudaStream_t stream) {
    lt_check(launch(a, b, c, stream), "Matmul");
  }
  /// With the heuristic's first algorithm that ran (what a caller without tuning gets).
  void run_first(const void* a, const void* b, void* c, cudaStream_t stream) {
    lt_check(cublasLtMatmul(lt_, op_, &one_, a, a_, b, b_, &beta_, c, c_, c, c_, &first_algo_,
                            workspace_, workspace_bytes_, stream),
             "Matmul");
  }

 private:
  cublasStatus_t launch(const void* a, const void* b, void* c, cudaStream_t stream) {
    return cublasLtMatmul(lt_, op_, &one_, a, a_, b, b_, &beta_, c, c_, c, c_, &algo_, workspace_,
                          workspace_bytes_, stream);
  }

  cublasLtHandle_t lt_ = nullptr;
  cublasLtMatmulDesc_t op_ = nullptr;
  cublasLtMatrixLayout_t a_ = nullptr, b_ = nullptr, c_ = nullptr;
  cublasLtMatmulAlgo_t algo_{}, best_algo_{}, first_algo_{};
  float one_ = 1.0f, beta_ = 0.0f;
  void* workspace_ = nullptr;
  std::size_t workspace_bytes_ = 0;
};

}  // namespace lce_bench
