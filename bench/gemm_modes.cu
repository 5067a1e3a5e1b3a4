/// @file gemm_modes.cu
/// @brief gemm_modes: the gradient GEMMs of lce's backward strategies, at their shapes, timed in
/// the ways lce could call cuBLAS — what a scale known only on the device costs, and how far
/// cuBLAS's first choice is from the fastest of its candidates. Not a suite: a probe that
/// decides how detail/cublas.cuh calls cuBLAS (bench/NOTES.md has its runs).
///
/// Ways, timed in turn (6 rounds of 3 runs each, the L2 flushed before every run, the median
/// of each way's 18 runs), so that the clock's drift under the power cap falls on all alike:
///   ex_device  cublasGemmEx, alpha and beta in device memory (lce's calls: alpha is computed on
///              the device; the kernel cannot be told that beta is 0)
///   ex_host    cublasGemmEx, alpha and beta from the host
///   lt_first   cuBLASLt, host scalars, 32 MiB workspace, the heuristic's first algorithm
///   lt_best    the same, the fastest of the heuristic's first 8 (lce_bench's floor)
/// cuBLASLt's alpha-vector pointer modes (an alpha per row of C on the device, beta 0 or from
/// the host) offered no algorithm for these bf16 GEMMs on an H200 with CUDA 13.0.
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "common/cuda_check.cuh"
#include "lt_floor.cuh"

namespace {

using lce_example::device_buffer;

__global__ void fill_random(__nv_bfloat16* p, std::size_t count, std::uint32_t seed, float scale) {
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < count;
       i += std::size_t{gridDim.x} * blockDim.x) {
    std::uint32_t h = static_cast<std::uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    p[i] = __float2bfloat16(scale * (static_cast<float>(h & 0xFFFF) / 32768.0f - 1.0f));
  }
}

void check(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) {
    std::fprintf(stderr, "%s: status %d\n", what, static_cast<int>(s));
    std::exit(1);
  }
}

struct gemm_case {
  const char* name;
  cublasOperation_t ta, tb;
  std::int64_t m, n, k, lda, ldb, ldc;
  bool fp32_out;
  float beta;
};

struct probe {
  cublasHandle_t handle;
  cublasLtHandle_t lt;
  cudaStream_t stream;
  lce_example::l2_flusher flusher;
  device_buffer<unsigned char> workspace{32u << 20};
  device_buffer<float> scalars{2};  // alpha, beta in device memory
};

}  // namespace

int main(int argc, char** argv) {
  // argv[1], when given: only the cases whose name contains it.
  const std::string only = argc > 1 ? argv[1] : "";
  probe p;
  check(cublasCreate(&p.handle), "create");
  check(cublasLtCreate(&p.lt), "lt create");
  LCE_EXAMPLE_CHECK(cudaStreamCreate(&p.stream));
  check(cublasSetStream(p.handle, p.stream), "stream");
  // Llama 3 (d 4096, v 128256) and Gemma 2 (d 2304, v 256000) heads, n = 8192 and 32768: the
  // stored strategy's dW and dX, the lean default's per-chunk dW and dX (its dZ chunks 7936 and
  // 4096 columns wide), the floor's dW and dX.
  const gemm_case cases[] = {
      {"llama8k stored dW   bf16", CUBLAS_OP_N, CUBLAS_OP_T, 4096, 128256, 8192, 4096, 128256, 4096,
       false, 0.f},
      {"llama8k stored dX   fp32", CUBLAS_OP_N, CUBLAS_OP_N, 4096, 7424, 128256, 4096, 128256, 4096,
       true, 0.f},
      {"llama8k floor dX    bf16", CUBLAS_OP_N, CUBLAS_OP_N, 4096, 8192, 128256, 4096, 128256, 4096,
       false, 0.f},
      {"llama8k lean dW     bf16", CUBLAS_OP_N, CUBLAS_OP_T, 4096, 7936, 8192, 4096, 7936, 4096,
       false, 0.f},
      {"llama8k lean dX+=   fp32", CUBLAS_OP_N, CUBLAS_OP_N, 4096, 8192, 7936, 4096, 7936, 4096,
       true, 1.f},
      {"gemma8k stored dW   bf16", CUBLAS_OP_N, CUBLAS_OP_T, 2304, 256000, 8192, 2304, 256000, 2304,
       false, 0.f},
      {"gemma8k stored dX   fp32", CUBLAS_OP_N, CUBLAS_OP_N, 2304, 7168, 256000, 2304, 256000, 2304,
       true, 0.f},
      // The per-row-offset form's dX row chunks (device::stored_dx_chunk_rows): the first as
      // many fp32 rows as the maxima's region holds, the second the rest, against two halves
      // and the whole n in one GEMM (fp32 and bf16 out).
      {"llama8k dX 768 fp32", CUBLAS_OP_N, CUBLAS_OP_N, 4096, 768, 128256, 4096, 128256, 4096, true,
       0.f},
      {"llama8k dX 4096 fp32", CUBLAS_OP_N, CUBLAS_OP_N, 4096, 4096, 128256, 4096, 128256, 4096,
       true, 0.f},
      {"llama8k dX 8192 fp32", CUBLAS_OP_N, CUBLAS_OP_N, 4096, 8192, 128256, 4096, 128256, 4096,
       true, 0.f},
      {"gemma8k dX 1024 fp32", CUBLAS_OP_N, CUBLAS_OP_N, 2304, 1024, 256000, 2304, 256000, 2304,
       true, 0.f},
      {"gemma8k dX 4096 fp32", CUBLAS_OP_N, CUBLAS_OP_N, 2304, 4096, 256000, 2304, 256000, 2304,
       true, 0.f},
      {"gemma8k floor dX bf16", CUBLAS_OP_N, CUBLAS_OP_N, 2304, 8192, 256000, 2304, 256000, 2304,
       false, 0.f},
      {"qwen8k dX 1280 fp32", CUBLAS_OP_N, CUBLAS_OP_N, 3584, 1280, 152064, 3584, 152064, 3584,
       true, 0.f},
      {"qwen8k dX 6912 fp32", CUBLAS_OP_N, CUBLAS_OP_N, 3584, 6912, 152064, 3584, 152064, 3584,
       true, 0.f},
      {"qwen8k dX 4096 fp32", CUBLAS_OP_N, CUBLAS_OP_N, 3584, 4096, 152064, 3584, 152064, 3584,
       true, 0.f},
      {"qwen8k floor dX bf16", CUBLAS_OP_N, CUBLAS_OP_N, 3584, 8192, 152064, 3584, 152064, 3584,
       false, 0.f},
      {"llama2k dX 256 fp32", CUBLAS_OP_N, CUBLAS_OP_N, 4096, 256, 128256, 4096, 128256, 4096, true,
       0.f},
      {"llama2k dX 1792 fp32", CUBLAS_OP_N, CUBLAS_OP_N, 4096, 1792, 128256, 4096, 128256, 4096,
       true, 0.f},
      {"llama2k dX 1024 fp32", CUBLAS_OP_N, CUBLAS_OP_N, 4096, 1024, 128256, 4096, 128256, 4096,
       true, 0.f},
      {"llama2k floor dX bf16", CUBLAS_OP_N, CUBLAS_OP_N, 4096, 2048, 128256, 4096, 128256, 4096,
       false, 0.f},
      {"llama32k lean dW    bf16", CUBLAS_OP_N, CUBLAS_OP_T, 4096, 4096, 32768, 4096, 4096, 4096,
       false, 0.f},
      {"llama32k lean dX+=  fp32", CUBLAS_OP_N, CUBLAS_OP_N, 4096, 32768, 4096, 4096, 4096, 4096,
       true, 1.f},
  };
  std::size_t max_a = 0, max_b = 0, max_c = 0;
  for (const auto& c : cases) {
    max_a = std::max<std::size_t>(max_a, c.lda * (c.ta == CUBLAS_OP_N ? c.k : c.m));
    max_b = std::max<std::size_t>(max_b, c.ldb * (c.tb == CUBLAS_OP_N ? c.n : c.k));
    max_c = std::max<std::size_t>(max_c, c.ldc * c.n);
  }
  device_buffer<__nv_bfloat16> a(max_a), b(max_b);
  device_buffer<float> out(max_c);  // fp32 or bf16 C: the fp32 size holds either
  fill_random<<<4096, 256>>>(a.data(), max_a, 1u, 1.0f);
  fill_random<<<4096, 256>>>(b.data(), max_b, 2u, 0.5f);
  const float alpha = 1.0f / 8192;
  LCE_EXAMPLE_CHECK(cudaMemset(out.data(), 0, max_c * sizeof(float)));
  LCE_EXAMPLE_CHECK(cudaDeviceSynchronize());
  std::printf("%-26s %9s %9s %9s %9s  (ms)\n", "gemm", "ex_device", "ex_host", "lt_first",
              "lt_best");
  for (const auto& c : cases) {
    if (std::string(c.name).find(only) == std::string::npos) continue;
    const float scal[2] = {alpha, c.beta};
    LCE_EXAMPLE_CHECK(cudaMemcpy(p.scalars.data(), scal, sizeof(scal), cudaMemcpyHostToDevice));
    const cudaDataType_t ct = c.fp32_out ? CUDA_R_32F : CUDA_R_16BF;
    auto ex = [&](cublasPointerMode_t mode) {  // one launch
      check(cublasSetPointerMode(p.handle, mode), "pointer mode");
      const void* pa = mode == CUBLAS_POINTER_MODE_DEVICE
                           ? static_cast<const void*>(p.scalars.data())
                           : static_cast<const void*>(&scal[0]);
      const void* pb = mode == CUBLAS_POINTER_MODE_DEVICE
                           ? static_cast<const void*>(p.scalars.data() + 1)
                           : static_cast<const void*>(&scal[1]);
      check(cublasGemmEx(p.handle, c.ta, c.tb, static_cast<int>(c.m), static_cast<int>(c.n),
                         static_cast<int>(c.k), pa, a.data(), CUDA_R_16BF, static_cast<int>(c.lda),
                         b.data(), CUDA_R_16BF, static_cast<int>(c.ldb), pb, out.data(), ct,
                         static_cast<int>(c.ldc), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
            "gemmex");
    };
    // The floor's GEMM class (bench/lt_floor.cuh): host scalars, alpha 1, this case's beta.
    lce_bench::lt_gemm lt(p.lt, c.ta, c.tb, c.m, c.n, c.k, c.lda, c.ldb, c.ldc, ct, c.beta);
    lt.tune(a.data(), b.data(), out.data(), p.workspace.data(), p.workspace.bytes(), 8, 7, p.stream,
            p.flusher);
    const std::function<void(cudaStream_t)> ways[4] = {
        [&](cudaStream_t) { ex(CUBLAS_POINTER_MODE_DEVICE); },
        [&](cudaStream_t) { ex(CUBLAS_POINTER_MODE_HOST); },
        [&](cudaStream_t s) { lt.run_first(a.data(), b.data(), out.data(), s); },
        [&](cudaStream_t s) { lt.run(a.data(), b.data(), out.data(), s); }};
    // Rounds of the four ways in turn, 3 runs each, so that the clock's drift under the power
    // cap (the GPU slows as it warms) falls on every way alike; the median of all of a way's runs.
    std::vector<double> t[4];
    for (int round = 0; round < 6; ++round) {
      for (int way = 0; way < 4; ++way) {
        const std::vector<double> ms = lce_example::time_runs(ways[way], 0, 3, p.stream, p.flusher);
        t[way].insert(t[way].end(), ms.begin(), ms.end());
      }
    }
    std::printf("%-26s %9.3f %9.3f %9.3f %9.3f\n", c.name, lce_example::median(t[0]),
                lce_example::median(t[1]), lce_example::median(t[2]), lce_example::median(t[3]));
    std::fflush(stdout);
  }
  return 0;
}
