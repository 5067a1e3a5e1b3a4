// lce_bench: Google Benchmark suite of lce in bf16, against the cuBLAS floor and the naive path.
// Row names: <op>/<impl>/bf16/<N>x<D>x<V>[/<family>[/<strategy>/<budget>]] (bench/RESULTS.md
// explains each row and counter). Every timed run starts with a flushed L2 and is timed by CUDA
// events (manual time). Quick run: lce_bench --benchmark_filter=4096x2048
// The data are drawn from a fresh seed (reported in the context); LCE_BENCH_SEED=<n> fixes it.

#include <benchmark/benchmark.h>
#include <cuda_bf16.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <lce/lce.cuh>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "common/cuda_check.cuh"
#include "common/data.cuh"
#include "common/naive.cuh"
#include "lt_floor.cuh"

/// Forward tile configurations besides the default: the mma.sync kernel everywhere (no sm_90a
/// kernel), and the sm_90a kernel with 128-wide vocabulary tiles in every case (the default
/// takes 256-wide ones without bias and class weights). Outside the anonymous namespace:
/// kernels on them have hidden visibility, which needs linkage.
namespace lce_bench_configs {
struct mma_sync_config : lce::tile_config<128, 128, 32, 2, 4, 4> {};
struct sm90_narrow_config : lce::tile_config<128, 128, 32, 2, 4, 4> {
  using sm90 = lce::sm90_tile_config<128, 6>;
};
/// The default's 256-wide tiles without clusters (each block loads its whole W box).
struct sm90_single_config : lce::tile_config<128, 128, 32, 2, 4, 4> {
  using sm90 = lce::sm90_tile_config<256, 4, 1>;
};
}  // namespace lce_bench_configs

namespace {

using namespace lce_example;
using lce_bench_configs::mma_sync_config;
using lce_bench_configs::sm90_narrow_config;
using lce_bench_configs::sm90_single_config;
using bf16 = __nv_bfloat16;
using lce_bench::lt_gemm;

constexpr int warmup_runs = 3;
constexpr int floor_runs = 10;       // timed runs of each floor, once per shape and data family
constexpr int floor_candidates = 8;  // cuBLASLt heuristic algorithms timed for each floor GEMM
constexpr std::size_t floor_workspace = std::size_t{64} << 20;  // cuBLASLt's, as torch's
constexpr std::size_t memory_margin = std::size_t{512} << 20;   // cuBLAS workspace, fragmentation

const lce::problem shapes[] = {
    {4096, 2048, 32768},   // quick
    {8192, 2304, 256000},  // Gemma 2
    {8192, 4096, 128256},  // Llama 3 8B
    {8192, 3584, 152064},  // Qwen 2 7B
};

/// The Llama 3 head at other token counts (8192 is in `shapes`): how each strategy scales
/// with n, fwd+bwd rows of the LM family only.
const lce::problem scaling_shapes[] = {
    {2048, 4096, 128256},
    {32768, 4096, 128256},  // 8 × 4096 tokens
    {65536, 4096, 128256},
};

std::string shape_name(const lce::problem& s) {
  return std::to_string(s.n) + "x" + std::to_string(s.d) + "x" + std::to_string(s.v);
}

double ndv(const lce::problem& s) {
  return static_cast<double>(s.n) * static_cast<double>(s.d) * static_cast<double>(s.v);
}

/// Process-wide CUDA state, created on first use (after the device check in main).
struct context {
  cuda_stream stream;
  cublas_handle handle;
  cublasLtHandle_t lt = nullptr;  // for the floor; lives as long as the process
  l2_flusher flusher;
  event_timer timer;
  std::uint64_t seed = 0;

  static context& get() {
    static context instance;
    return instance;
  }

 private:
  context() {
    LCE_EXAMPLE_CHECK(cublasSetStream(handle, stream));  // for the naive GEMMs
    lce_bench::lt_check(cublasLtCreate(&lt), "Create");
    const char* fixed = std::getenv("LCE_BENCH_SEED");
    seed = fixed != nullptr && *fixed != '\0' ? std::strtoull(fixed, nullptr, 0) : fresh_seed();
  }
};

/// Throws (and so skips the row) unless `bytes` more fit in free device memory.
void require_memory(std::size_t bytes) {
  const std::size_t free = free_device_bytes();
  if (bytes + memory_margin > free) {
    char message[160];
    std::snprintf(message, sizeof(message), "not enough device memory: needs %.2f GiB, %.2f free",
                  gib(bytes + memory_margin), gib(free));
    throw std::runtime_error(message);
  }
}

/// Inputs of one (shape, family). One is kept at a time: rows are registered grouped by shape
/// and family, so a row mostly finds its data ready.
struct dataset {
  lce::problem shape;
  data_family family;
  device_buffer<bf16> x, w;
  device_buffer<std::int64_t> targets;

  static const dataset& get(const lce::problem& s, data_family f) {
    static std::unique_ptr<dataset> cached;
    if (!cached || cached->family != f || cached->shape.n != s.n || cached->shape.d != s.d ||
        cached->shape.v != s.v) {
      cached.reset();
      const auto n = static_cast<std::size_t>(s.n), d = static_cast<std::size_t>(s.d),
                 v = static_cast<std::size_t>(s.v);
      require_memory((n + v) * d * sizeof(bf16) + n * sizeof(std::int64_t));
      cached.reset(new dataset{s, f, device_buffer<bf16>(n * d), device_buffer<bf16>(v * d),
                               device_buffer<std::int64_t>(n)});
      context& ctx = context::get();
      const std::uint64_t seed = detail::mix64(
          ctx.seed ^
          detail::mix64(static_cast<std::uint64_t>(s.n * 1000003 + s.d * 1009 + s.v) * 4 +
                        static_cast<std::uint64_t>(f)));
      generate(f, s, seed, cached->x.data(), cached->w.data(), cached->targets.data(), ctx.stream);
      LCE_EXAMPLE_CHECK(cudaStreamSynchronize(ctx.stream));
    }
    return *cached;
  }
};

/// The floor: the three GEMMs alone, each with the fastest of cuBLASLt's heuristic algorithms
/// (lt_floor.cuh) for its shape, timed on the data of the rows it divides (the data change the
/// GEMMs' power draw, so their clocks), into preallocated buffers (dZ is the Z buffer: its
/// contents do not change the GEMMs' work).
struct floor_setup {
  lce::problem shape;
  const bf16* x = nullptr;
  const bf16* w = nullptr;
  device_buffer<bf16> z, dx, dw;
  device_buffer<unsigned char> workspace;
  std::unique_ptr<lt_gemm> z_gemm, dx_gemm, dw_gemm;

  floor_setup(const lce::problem& s, data_family f) : shape(s) {
    const auto n = static_cast<std::size_t>(s.n), d = static_cast<std::size_t>(s.d),
               v = static_cast<std::size_t>(s.v);
    const dataset& data = dataset::get(s, f);
    require_memory(((n + v) * d + n * v) * sizeof(bf16) + floor_workspace);
    x = data.x.data();
    w = data.w.data();
    z = device_buffer<bf16>(n * v);
    dx = device_buffer<bf16>(n * d);
    dw = device_buffer<bf16>(v * d);
    workspace = device_buffer<unsigned char>(floor_workspace);
    context& ctx = context::get();
    constexpr cublasOperation_t N = CUBLAS_OP_N, T = CUBLAS_OP_T;
    // Column-major, as naive.cuh: Zᵀ [v, n] = W·Xᵀ, dXᵀ [d, n] = Wᵀ·dZᵀ, dWᵀ [d, v] = Xᵀ·dZ
    z_gemm = std::make_unique<lt_gemm>(ctx.lt, T, N, s.v, s.n, s.d, s.d, s.d, s.v, CUDA_R_16BF);
    dx_gemm = std::make_unique<lt_gemm>(ctx.lt, N, N, s.d, s.n, s.v, s.d, s.v, s.d, CUDA_R_16BF);
    dw_gemm = std::make_unique<lt_gemm>(ctx.lt, N, T, s.d, s.v, s.n, s.d, s.v, s.d, CUDA_R_16BF);
    z_gemm->tune(w, x, z.data(), workspace.data(), floor_workspace, floor_candidates, 3, ctx.stream,
                 ctx.flusher);
    dx_gemm->tune(w, z.data(), dx.data(), workspace.data(), floor_workspace, floor_candidates, 3,
                  ctx.stream, ctx.flusher);
    dw_gemm->tune(x, z.data(), dw.data(), workspace.data(), floor_workspace, floor_candidates, 3,
                  ctx.stream, ctx.flusher);
  }
  void forward(cudaStream_t stream) { z_gemm->run(w, x, z.data(), stream); }
  void forward_backward(cudaStream_t stream) {
    z_gemm->run(w, x, z.data(), stream);
    dx_gemm->run(w, z.data(), dx.data(), stream);
    dw_gemm->run(x, z.data(), dw.data(), stream);
  }
};

struct floor_times {
  double forward_ms = 0.0;           ///< 1 GEMM
  double forward_backward_ms = 0.0;  ///< 3 GEMMs
};

/// The floor of `s` on family `f`'s data, measured on first use and kept for the rest of the
/// process.
const floor_times& floor_of(const lce::problem& s, data_family f) {
  static std::map<std::string, floor_times> cache;
  const std::string key = shape_name(s) + "/" + to_string(f);
  if (auto it = cache.find(key); it != cache.end()) return it->second;
  context& ctx = context::get();
  floor_setup setup(s, f);
  floor_times t;
  t.forward_ms = median(time_runs([&](cudaStream_t st) { setup.forward(st); }, warmup_runs,
                                  floor_runs, ctx.stream, ctx.flusher));
  t.forward_backward_ms = median(time_runs([&](cudaStream_t st) { setup.forward_backward(st); },
                                           warmup_runs, floor_runs, ctx.stream, ctx.flusher));
  return cache.emplace(key, t).first->second;
}

/// Times `work()` once per benchmark iteration (L2 flushed before each, CUDA events around it)
/// after a few warm-up runs, and sets the counters.
template <class Work>
void measure(benchmark::State& state, Work&& work, double flops, double floor_ms,
             std::size_t extra_bytes) {
  context& ctx = context::get();
  for (int i = 0; i < warmup_runs; ++i) work();
  LCE_EXAMPLE_CHECK(cudaStreamSynchronize(ctx.stream));
  std::vector<double> ms;
  for (auto _ : state) {
    ctx.flusher.flush(ctx.stream);
    ctx.timer.start(ctx.stream);
    work();
    ctx.timer.stop(ctx.stream);
    const double t = ctx.timer.elapsed_ms();
    state.SetIterationTime(t * 1e-3);
    ms.push_back(t);
  }
  const double median_ms = median(ms);
  state.counters["TFLOP/s"] =
      benchmark::Counter(flops * 1e-12, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["median_ms"] = median_ms;
  state.counters["ratio_to_floor"] = median_ms / floor_ms;
  state.counters["extra_MiB"] = mib(extra_bytes);
}

/// Reads the loss back and reports it; a non-finite loss fails the row.
void report_loss(benchmark::State& state, const device_buffer<float>& loss) {
  const float value = loss.read();
  if (!std::isfinite(value)) throw std::runtime_error("the loss is not finite");
  state.counters["loss"] = value;
}

/// Runs a benchmark body; an exception (CUDA, cuBLAS or lce error, memory) skips the row.
template <class Body>
void guarded(benchmark::State& state, Body&& body) {
  try {
    body();
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

void bm_floor_forward(benchmark::State& state, lce::problem s) {
  guarded(state, [&] {
    const floor_times& floor = floor_of(s, data_family::flat);
    floor_setup setup(s, data_family::flat);
    context& ctx = context::get();
    measure(
        state, [&] { setup.forward(ctx.stream); }, 2 * ndv(s), floor.forward_ms, 0);
  });
}

void bm_floor_forward_backward(benchmark::State& state, lce::problem s) {
  guarded(state, [&] {
    const floor_times& floor = floor_of(s, data_family::flat);
    floor_setup setup(s, data_family::flat);
    context& ctx = context::get();
    measure(
        state, [&] { setup.forward_backward(ctx.stream); }, 6 * ndv(s), floor.forward_backward_ms,
        0);
  });
}

template <class Config = lce::default_config<bf16>>
void bm_lce_forward(benchmark::State& state, lce::problem s, data_family f,
                    lce::loss_options options = {}) {
  guarded(state, [&] {
    const floor_times& floor = floor_of(s, f);
    const dataset& data = dataset::get(s, f);
    context& ctx = context::get();
    device_buffer<float> loss(1);
    lce::forward_args<bf16> args;
    args.x = data.x.data();
    args.w = data.w.data();
    args.targets = data.targets.data();
    args.loss = loss.data();
    std::size_t bytes = 0;
    LCE_EXAMPLE_CHECK((lce::forward<bf16, Config>(nullptr, bytes, args, s, options)));
    require_memory(bytes);
    device_buffer<unsigned char> workspace(bytes);
    measure(
        state,
        [&] {
          LCE_EXAMPLE_CHECK(
              (lce::forward<bf16, Config>(workspace.data(), bytes, args, s, options, ctx.stream)));
        },
        2 * ndv(s), floor.forward_ms, bytes);
    report_loss(state, loss);
  });
}

/// The backward alone, from the lse of an untimed forward. Its floor is the 3-GEMM one: given
/// only the lse, a backward must recompute Z.
/// Σ (a − b)² and Σ b² over n elements, accumulated in fp64 into sums[0], sums[1].
template <class T>
__global__ void squared_difference_kernel(const T* a, const T* b, std::size_t n, double* sums) {
  double diff = 0.0, ref = 0.0;
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    const double x = static_cast<double>(static_cast<float>(a[i]));
    const double y = static_cast<double>(static_cast<float>(b[i]));
    diff += (x - y) * (x - y);
    ref += y * y;
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    diff += __shfl_down_sync(0xffffffffu, diff, offset);
    ref += __shfl_down_sync(0xffffffffu, ref, offset);
  }
  if (threadIdx.x % 32 == 0) {
    atomicAdd(&sums[0], diff);
    atomicAdd(&sums[1], ref);
  }
}

/// ‖a − b‖ / ‖b‖ of two device arrays.
template <class T>
double relative_error(const T* a, const T* b, std::size_t n, cudaStream_t stream) {
  device_buffer<double> sums(2);
  LCE_EXAMPLE_CHECK(cudaMemsetAsync(sums.data(), 0, 2 * sizeof(double), stream));
  squared_difference_kernel<T><<<1024, 256, 0, stream>>>(a, b, n, sums.data());
  LCE_EXAMPLE_CHECK(cudaGetLastError());
  double host[2] = {0.0, 0.0};
  LCE_EXAMPLE_CHECK(
      cudaMemcpyAsync(host, sums.data(), sizeof(host), cudaMemcpyDeviceToHost, stream));
  LCE_EXAMPLE_CHECK(cudaStreamSynchronize(stream));
  return host[1] > 0.0 ? std::sqrt(host[0] / host[1]) : 0.0;
}

/// `opt` with filter_eps > 0 (gradient filtering) also reports the relative Frobenius error of
/// dX and dW against the exact backward of the same data (`dx_err_vs_exact`, `dw_err_vs_exact`).
template <class Grad>
void bm_lce_backward(benchmark::State& state, lce::problem s, data_family f,
                     lce::backward_options bopt, lce::loss_options opt) {
  guarded(state, [&] {
    const floor_times& floor = floor_of(s, f);
    const dataset& data = dataset::get(s, f);
    context& ctx = context::get();
    const auto n = static_cast<std::size_t>(s.n), d = static_cast<std::size_t>(s.d),
               v = static_cast<std::size_t>(s.v);
    device_buffer<float> loss(1);
    device_buffer<float> lse(n);
    {
      lce::forward_args<bf16> fwd;
      fwd.x = data.x.data();
      fwd.w = data.w.data();
      fwd.targets = data.targets.data();
      fwd.loss = loss.data();
      fwd.lse = lse.data();
      std::size_t bytes = 0;
      LCE_EXAMPLE_CHECK(lce::forward(nullptr, bytes, fwd, s));
      device_buffer<unsigned char> workspace(bytes);
      LCE_EXAMPLE_CHECK(lce::forward(workspace.data(), bytes, fwd, s, {}, ctx.stream));
      LCE_EXAMPLE_CHECK(cudaStreamSynchronize(ctx.stream));
    }
    lce::backward_args<bf16, Grad> args;
    args.x = data.x.data();
    args.w = data.w.data();
    args.targets = data.targets.data();
    args.lse = lse.data();
    std::size_t bytes = 0;
    LCE_EXAMPLE_CHECK(lce::backward(nullptr, bytes, args, s, opt, bopt, ctx.handle, ctx.stream));
    require_memory(bytes + n * d * sizeof(bf16) + v * d * sizeof(Grad));
    device_buffer<bf16> dx(n * d);
    device_buffer<Grad> dw(v * d);
    args.dx = dx.data();
    args.dw = dw.data();
    device_buffer<unsigned char> workspace(bytes);
    measure(
        state,
        [&] {
          LCE_EXAMPLE_CHECK(
              lce::backward(workspace.data(), bytes, args, s, opt, bopt, ctx.handle, ctx.stream));
        },
        4 * ndv(s), floor.forward_backward_ms, bytes);
    if (opt.filter_eps > 0.0f) {
      require_memory(bytes + 2 * (n * d * sizeof(bf16) + v * d * sizeof(Grad)));
      device_buffer<bf16> dx_exact(n * d);
      device_buffer<Grad> dw_exact(v * d);
      lce::backward_args<bf16, Grad> exact = args;
      exact.dx = dx_exact.data();
      exact.dw = dw_exact.data();
      lce::loss_options exact_opt = opt;
      exact_opt.filter_eps = 0.0f;
      LCE_EXAMPLE_CHECK(lce::backward(workspace.data(), bytes, exact, s, exact_opt, bopt,
                                      ctx.handle, ctx.stream));
      state.counters["dx_err_vs_exact"] =
          relative_error(dx.data(), dx_exact.data(), n * d, ctx.stream);
      state.counters["dw_err_vs_exact"] =
          relative_error(dw.data(), dw_exact.data(), v * d, ctx.stream);
    }
  });
}

template <class Grad, class Config = lce::default_config<bf16>>
void bm_lce_forward_backward(benchmark::State& state, lce::problem s, data_family f,
                             lce::backward_options bopt, lce::loss_options options) {
  guarded(state, [&] {
    const floor_times& floor = floor_of(s, f);
    const dataset& data = dataset::get(s, f);
    context& ctx = context::get();
    const auto n = static_cast<std::size_t>(s.n), d = static_cast<std::size_t>(s.d),
               v = static_cast<std::size_t>(s.v);
    device_buffer<float> loss(1);
    lce::forward_backward_args<bf16, Grad> args;
    args.x = data.x.data();
    args.w = data.w.data();
    args.targets = data.targets.data();
    args.loss = loss.data();
    std::size_t bytes = 0;
    const auto run = [&](void* ws) {
      return lce::forward_backward<bf16, Grad, Config>(ws, bytes, args, s, options, bopt,
                                                       ctx.handle, ctx.stream);
    };
    LCE_EXAMPLE_CHECK(run(nullptr));
    require_memory(bytes + n * d * sizeof(bf16) + v * d * sizeof(Grad));
    device_buffer<bf16> dx(n * d);
    device_buffer<Grad> dw(v * d);
    args.dx = dx.data();
    args.dw = dw.data();
    device_buffer<unsigned char> workspace(bytes);
    measure(
        state, [&] { LCE_EXAMPLE_CHECK(run(workspace.data())); }, 6 * ndv(s),
        floor.forward_backward_ms, bytes);
    report_loss(state, loss);
  });
}

void bm_naive_forward_backward(benchmark::State& state, lce::problem s, data_family f) {
  guarded(state, [&] {
    const floor_times& floor = floor_of(s, f);
    const dataset& data = dataset::get(s, f);
    context& ctx = context::get();
    const auto n = static_cast<std::size_t>(s.n), d = static_cast<std::size_t>(s.d),
               v = static_cast<std::size_t>(s.v);
    const std::size_t bytes = naive::workspace_size<bf16>(s);
    require_memory(bytes + (n + v) * d * sizeof(bf16));
    device_buffer<float> loss(1);
    device_buffer<bf16> dx(n * d);
    device_buffer<bf16> dw(v * d);
    device_buffer<unsigned char> workspace(bytes);
    lce::forward_backward_args<bf16, bf16> args;
    args.x = data.x.data();
    args.w = data.w.data();
    args.targets = data.targets.data();
    args.loss = loss.data();
    args.dx = dx.data();
    args.dw = dw.data();
    measure(
        state,
        [&] { naive::forward_backward(workspace.data(), args, s, {}, ctx.handle, ctx.stream); },
        6 * ndv(s), floor.forward_backward_ms, bytes);
    report_loss(state, loss);
  });
}

/// One backward configuration: strategy, dW type (vocab_chunked bf16, row_chunked fp32) and
/// memory budget.
struct variant {
  lce::backward_strategy strategy;
  std::size_t budget_mib;
  bool fp32_dw = false;  // stored and vocab_chunked: Grad = float (stored: row chunks)
};

std::string variant_name(const variant& c) {
  if (c.strategy == lce::backward_strategy::stored) {
    // 0: every row at once (n·v·2 bytes, any budget); else row chunks in the budget, a 16-bit
    // dW adding up in fp32 accumulators inside it
    if (!c.fp32_dw)
      return c.budget_mib == 0 ? "stored" : "stored/" + std::to_string(c.budget_mib) + "MiB";
    return "stored_f32dw/" + std::to_string(c.budget_mib) + "MiB";  // row chunks in the budget
  }
  const char* strategy = c.strategy == lce::backward_strategy::row_chunked ? "row_chunked"
                         : c.fp32_dw                                       ? "vocab_chunked_f32dw"
                                                                           : "vocab_chunked";
  return std::string(strategy) + "/" + std::to_string(c.budget_mib) + "MiB";
}

std::vector<std::size_t> extra_budgets() {
  std::vector<std::size_t> mib;
  const char* list = std::getenv("LCE_BENCH_VOCAB_BUDGETS");
  for (const char* c = list; c != nullptr && *c != '\0';) {
    char* end = nullptr;
    const unsigned long long v = std::strtoull(c, &end, 10);
    if (end == c) break;
    if (v > 0) mib.push_back(static_cast<std::size_t>(v));
    c = *end == ',' ? end + 1 : end;
  }
  return mib;
}

template <class Fn, class... Args>
void add(const std::string& name, Fn&& fn, Args&&... args) {
  benchmark::RegisterBenchmark(name.c_str(), std::forward<Fn>(fn), std::forward<Args>(args)...)
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond);
}

void register_benchmarks() {
  constexpr std::size_t default_budget = lce::backward_options{}.memory_budget >> 20;
  for (const lce::problem& s : shapes) {
    const std::string shape = "/bf16/" + shape_name(s);
    add("fwd/cublas" + shape, bm_floor_forward, s);
    add("fwdbwd/cublas" + shape, bm_floor_forward_backward, s);
    for (data_family f : {data_family::flat, data_family::peaked, data_family::lm}) {
      const std::string rows = shape + "/" + to_string(f);
      add("fwd/lce" + rows, bm_lce_forward<>, s, f, lce::loss_options{});
      if (f == data_family::lm) {
        add("fwd/lce_mma_sync" + rows, bm_lce_forward<mma_sync_config>, s, f, lce::loss_options{});
        add("fwd/lce_sm90_128" + rows, bm_lce_forward<sm90_narrow_config>, s, f,
            lce::loss_options{});
        add("fwd/lce_sm90_nocluster" + rows, bm_lce_forward<sm90_single_config>, s, f,
            lce::loss_options{});
        // Gemma 2's final-logit softcap (30): the general epilogue (tanh per logit)
        lce::loss_options softcap;
        softcap.softcap = 30.0f;
        add("fwd/lce_softcap30" + rows, bm_lce_forward<>, s, f, softcap);
        add("fwd/lce_sm90_128_softcap30" + rows, bm_lce_forward<sm90_narrow_config>, s, f, softcap);
      }
      std::vector<variant> variants = {{lce::backward_strategy::vocab_chunked, default_budget},
                                       {lce::backward_strategy::row_chunked, default_budget}};
      // row_chunked re-reads and re-writes the fp32 dW once per row chunk: with the default
      // budget that is ~30 chunks at full scale; 1 GiB (the fast path's budget) and
      // 4 GiB show the cost of fewer chunks.
      if (f == data_family::lm) {
        variants.push_back({lce::backward_strategy::row_chunked, 1024});  // target 3's budget
        variants.push_back({lce::backward_strategy::row_chunked, 4096});
      }
      if (f != data_family::peaked) variants.push_back({lce::backward_strategy::stored, 0});
      if (f == data_family::lm) {
        // With an fp32 dW: stored row chunks at 256 MiB (~1000 rows a chunk on Llama 3), 512 MiB
        // and 1 GiB against what automatic runs at the default budget (vocab_chunked): the
        // evidence for device::min_stored_chunk.
        for (std::size_t mib : {std::size_t{256}, std::size_t{512}, std::size_t{1024}})
          variants.push_back({lce::backward_strategy::stored, mib, true});
        variants.push_back({lce::backward_strategy::vocab_chunked, default_budget, true});
      }
      // LCE_BENCH_VOCAB_BUDGETS="160,205": more vocab_chunked budgets (MiB) of the LM family,
      // for chunk-width experiments.
      if (f == data_family::lm) {
        for (std::size_t mib : extra_budgets())
          variants.push_back({lce::backward_strategy::vocab_chunked, mib});
      }
      for (const variant& c : variants) {
        const lce::backward_options bopt{c.strategy, c.budget_mib << 20};
        const std::string name = rows + "/" + variant_name(c);
        // The pass form of stored (filter_eps = FLT_MIN takes the call off the per-row-offset
        // form and drops only entries below 1.2e-38): the same run's comparison for the form
        // the bf16 calls take by default.
        lce::loss_options pass_form;
        pass_form.filter_eps = FLT_MIN;
        const bool pass_row = f == data_family::lm &&
                              c.strategy == lce::backward_strategy::stored &&
                              (c.budget_mib == 0 || (c.fp32_dw && c.budget_mib == 1024));
        if (c.fp32_dw) {
          add("fwdbwd/lce" + name, bm_lce_forward_backward<float>, s, f, bopt, lce::loss_options{});
          if (pass_row)
            add("fwdbwd/lce_pass" + name, bm_lce_forward_backward<float>, s, f, bopt, pass_form);
        } else if (c.strategy == lce::backward_strategy::stored) {  // forward_backward only
          add("fwdbwd/lce" + name, bm_lce_forward_backward<bf16>, s, f, bopt, lce::loss_options{});
          if (f == data_family::lm) {
            // 128-wide tiles: more L2→SM traffic per FLOP than the default's 256, but the stored
            // epilogue fits the registers there (no spills in the per-tile loop)
            add("fwdbwd/lce_sm90_128" + name, bm_lce_forward_backward<bf16, sm90_narrow_config>, s,
                f, bopt, lce::loss_options{});
            lce::loss_options softcap;  // Gemma 2 as trained
            softcap.softcap = 30.0f;
            add("fwdbwd/lce_softcap30" + name, bm_lce_forward_backward<bf16>, s, f, bopt, softcap);
            if (pass_row) {
              add("fwdbwd/lce_pass" + name, bm_lce_forward_backward<bf16>, s, f, bopt, pass_form);
              softcap.filter_eps = FLT_MIN;
              add("fwdbwd/lce_pass_softcap30" + name, bm_lce_forward_backward<bf16>, s, f, bopt,
                  softcap);
            }
          }
        } else if (c.strategy == lce::backward_strategy::row_chunked) {
          add("bwd/lce" + name, bm_lce_backward<float>, s, f, bopt, lce::loss_options{});
          add("fwdbwd/lce" + name, bm_lce_forward_backward<float>, s, f, bopt, lce::loss_options{});
        } else {
          add("bwd/lce" + name, bm_lce_backward<bf16>, s, f, bopt, lce::loss_options{});
          add("fwdbwd/lce" + name, bm_lce_forward_backward<bf16>, s, f, bopt, lce::loss_options{});
          if (c.budget_mib == default_budget) {
            // Gradient filtering at Cut Cross-Entropy's bf16 threshold 2⁻¹², opt-in: its time
            // and its dX/dW error against the exact backward, per data family.
            lce::loss_options filtered;
            filtered.filter_eps = 0x1p-12f;
            add("bwd/lce_filtered" + name, bm_lce_backward<bf16>, s, f, bopt, filtered);
          }
        }
      }
    }
    add("fwdbwd/naive" + shape + "/lm", bm_naive_forward_backward, s, data_family::lm);
  }
  for (const lce::problem& s : scaling_shapes) {
    const std::string rows = "/bf16/" + shape_name(s) + "/lm";
    add("fwdbwd/cublas/bf16/" + shape_name(s), bm_floor_forward_backward, s);
    add("fwd/lce" + rows, bm_lce_forward<>, s, data_family::lm, lce::loss_options{});
    const variant variants[] = {{lce::backward_strategy::vocab_chunked, default_budget},
                                {lce::backward_strategy::row_chunked, 1024},
                                {lce::backward_strategy::row_chunked, 4096},
                                {lce::backward_strategy::stored, 0},
                                {lce::backward_strategy::stored, 1024, true},
                                // bf16 dW at 4 GiB: what automatic ran before stored row chunks
                                // took fp32 accumulators, and those chunks
                                {lce::backward_strategy::vocab_chunked, 4096},
                                {lce::backward_strategy::stored, 4096}};
    for (const variant& c : variants) {
      const lce::backward_options bopt{c.strategy, c.budget_mib << 20};
      const std::string name = rows + "/" + variant_name(c);
      if (c.strategy == lce::backward_strategy::row_chunked || c.fp32_dw)
        add("fwdbwd/lce" + name, bm_lce_forward_backward<float>, s, data_family::lm, bopt,
            lce::loss_options{});
      else
        add("fwdbwd/lce" + name, bm_lce_forward_backward<bf16>, s, data_family::lm, bopt,
            lce::loss_options{});
    }
    for (std::size_t mib : extra_budgets()) {  // LCE_BENCH_VOCAB_BUDGETS, as above
      const lce::backward_options bopt{lce::backward_strategy::vocab_chunked, mib << 20};
      add("fwdbwd/lce" + rows + "/" + variant_name({lce::backward_strategy::vocab_chunked, mib}),
          bm_lce_forward_backward<bf16>, s, data_family::lm, bopt, lce::loss_options{});
    }
    add("fwdbwd/naive" + rows, bm_naive_forward_backward, s, data_family::lm);
  }
}

/// Whether --benchmark_list_tests was asked for (names only: no device needed).
bool listing_only(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--benchmark_list_tests" || arg == "--benchmark_list_tests=true") return true;
  }
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  const bool listing = listing_only(argc, argv);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  if (!listing) {
    if (const std::string why = cuda_device_problem(); !why.empty()) {
      std::fprintf(stderr, "lce_bench: no usable CUDA device: %s\n", why.c_str());
      return 1;
    }
    try {
      context& ctx = context::get();
      cudaDeviceProp prop{};
      LCE_EXAMPLE_CHECK(cudaGetDeviceProperties(&prop, 0));
      benchmark::AddCustomContext("gpu", prop.name);
      benchmark::AddCustomContext("l2_flush_bytes", std::to_string(ctx.flusher.bytes()));
      benchmark::AddCustomContext("data_seed", std::to_string(ctx.seed));
      benchmark::AddCustomContext("lce_version", LCE_VERSION_STRING);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "lce_bench: %s\n", e.what());
      return 1;
    }
  }
  register_benchmarks();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
