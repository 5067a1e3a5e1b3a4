// lm_head_step: one training step of a language model's head — the loss of
// softmax(X·Wᵀ) against the next tokens, and its gradients dX and dW — computed by
// lce::forward_backward without the N×V logit matrix, then by the naive path (the full logits
// through cuBLAS, as PyTorch eager does), with time, memory and the difference between the two.
//
//   lm_head_step [--n 8192] [--d 2304] [--v 256000] [--dtype bf16|fp16|fp32]
//                [--strategy auto|vocab|row|stored] [--grad element|fp32] [--budget-mib 256]
//                [--family lm|flat|peaked] [--seed S] [--iters 10]
//
// Exit status: 0 when the two paths agree, 2 when they differ beyond the expected rounding,
// 1 on an error or without a GPU.

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <lce/lce.cuh>
#include <string>
#include <type_traits>

#include "common/cuda_check.cuh"
#include "common/data.cuh"
#include "common/naive.cuh"
#include "common/norms.cuh"

namespace {

using namespace lce_example;

struct settings {
  lce::problem shape{8192, 2304, 256000};  // Gemma 2's head: d 2304, vocabulary 256000
  std::string dtype = "bf16";
  lce::backward_strategy strategy = lce::backward_strategy::automatic;
  bool fp32_grad = false;
  std::size_t budget_mib = 256;
  data_family family = data_family::lm;
  std::uint64_t seed = fresh_seed();
  int iters = 10;
};

constexpr int warmup_runs = 2;

/// Time, memory and results of one path.
struct step_result {
  double median_ms = 0.0;
  std::size_t workspace_bytes = 0;
  std::size_t measured_bytes = 0;
  float loss = 0.0f;
};

void print_result(const char* name, const step_result& r, double flops, double dx_norm,
                  double dw_norm, int iters) {
  std::printf("%s\n", name);
  std::printf("  loss         %.6f\n", static_cast<double>(r.loss));
  std::printf("  |dX|_F       %.6e\n", dx_norm);
  std::printf("  |dW|_F       %.6e\n", dw_norm);
  std::printf("  time         %.3f ms (median of %d), %.1f TFLOP/s for 6NDV\n", r.median_ms, iters,
              flops / (r.median_ms * 1e-3) * 1e-12);
  std::printf("  extra memory %.1f MiB workspace, %.1f MiB measured (cudaMemGetInfo)\n",
              mib(r.workspace_bytes), mib(r.measured_bytes));
}

template <class Element, class Grad>
int run(const settings& s) {
  const lce::problem& shape = s.shape;
  const auto n = static_cast<std::size_t>(shape.n);
  const auto d = static_cast<std::size_t>(shape.d);
  const auto v = static_cast<std::size_t>(shape.v);
  const double flops =
      6.0 * static_cast<double>(n) * static_cast<double>(d) * static_cast<double>(v);

  const cuda_stream stream;
  const cublas_handle handle;
  l2_flusher flusher;

  // Inputs: hidden states X [n, d], classifier W [v, d], next-token ids [n].
  device_buffer<Element> x(n * d);
  device_buffer<Element> w(v * d);
  device_buffer<std::int64_t> targets(n);
  generate(s.family, shape, s.seed, x.data(), w.data(), targets.data(), stream);

  // Outputs of lce: the mean loss and the gradients.
  device_buffer<float> loss(1);
  device_buffer<Element> dx(n * d);
  device_buffer<Grad> dw(v * d);

  lce::forward_backward_args<Element, Grad> args;
  args.x = x.data();
  args.w = w.data();
  args.targets = targets.data();
  args.loss = loss.data();
  args.dx = dx.data();
  args.dw = dw.data();
  const lce::loss_options options;  // mean over rows, ignore_index -100
  lce::backward_options bopt;
  bopt.strategy = s.strategy;
  bopt.memory_budget = s.budget_mib << 20;

  // 1. Size query: launches nothing, only sets workspace_bytes.
  step_result fused;
  LCE_EXAMPLE_CHECK(lce::forward_backward(nullptr, fused.workspace_bytes, args, shape, options,
                                          bopt, handle, stream));
  // 2. The caller owns the workspace (allocate it once, reuse it every step).
  memory_probe probe;
  probe.begin();
  device_buffer<unsigned char> workspace(fused.workspace_bytes);
  // 3. Run: stream-ordered, no allocation, no synchronization.
  auto lce_step = [&](cudaStream_t st) {
    LCE_EXAMPLE_CHECK(lce::forward_backward(workspace.data(), fused.workspace_bytes, args, shape,
                                            options, bopt, handle, st));
  };
  lce_step(stream);
  probe.end();
  fused.measured_bytes = probe.used_bytes();
  fused.median_ms = median(time_runs(lce_step, warmup_runs, s.iters, stream, flusher));
  fused.loss = loss.read();
  workspace = device_buffer<unsigned char>();  // give the memory back for the naive path
  print_result("lce::forward_backward", fused, flops, frobenius_norm(dx.data(), n * d),
               frobenius_norm(dw.data(), v * d), s.iters);

  // The naive path: the whole logit matrix, then softmax cross-entropy, then two GEMMs.
  const std::size_t naive_bytes = naive::workspace_size<Element>(shape);
  const std::size_t naive_outputs = sizeof(float) + n * d * sizeof(Element) + v * d * sizeof(Grad);
  const std::size_t margin = std::size_t{256} << 20;  // cuBLAS workspace and fragmentation
  const std::size_t free_bytes = free_device_bytes();
  if (naive_bytes + naive_outputs + margin > free_bytes) {
    std::printf(
        "naive: skipped, its %.2f GiB of logits (+ %.2f GiB of outputs) do not fit in "
        "%.2f GiB of free device memory\n",
        gib(naive_bytes), gib(naive_outputs), gib(free_bytes));
    return 0;
  }
  device_buffer<float> naive_loss(1);
  device_buffer<Element> naive_dx(n * d);
  device_buffer<Grad> naive_dw(v * d);
  lce::forward_backward_args<Element, Grad> naive_args = args;
  naive_args.loss = naive_loss.data();
  naive_args.dx = naive_dx.data();
  naive_args.dw = naive_dw.data();

  step_result naive_result;
  naive_result.workspace_bytes = naive_bytes;
  probe.begin();
  device_buffer<unsigned char> naive_workspace(naive_bytes);
  auto naive_step = [&](cudaStream_t st) {
    naive::forward_backward(naive_workspace.data(), naive_args, shape, options, handle, st);
  };
  naive_step(stream);
  probe.end();
  naive_result.measured_bytes = probe.used_bytes();
  naive_result.median_ms = median(time_runs(naive_step, warmup_runs, s.iters, stream, flusher));
  naive_result.loss = naive_loss.read();
  print_result("naive (cuBLAS logits in the element type + softmax kernel + 2 GEMMs)", naive_result,
               flops, frobenius_norm(naive_dx.data(), n * d),
               frobenius_norm(naive_dw.data(), v * d), s.iters);

  // Both paths round (the naive one stores the logits in the element type), so they differ by
  // rounding: ~1e-3 in the loss and ~1e-2 in the gradients for 16-bit types.
  const double loss_diff = std::fabs(static_cast<double>(fused.loss) - naive_result.loss) /
                           std::fabs(static_cast<double>(naive_result.loss));
  const double dx_diff = relative_difference(dx.data(), naive_dx.data(), n * d);
  const double dw_diff = relative_difference(dw.data(), naive_dw.data(), v * d);
  const bool fp32 = std::is_same_v<Element, float>;
  const double loss_tol = fp32 ? 1e-5 : 1e-2;
  const double grad_tol = fp32 ? 1e-4 : 5e-2;
  const bool agree = loss_diff <= loss_tol && dx_diff <= grad_tol && dw_diff <= grad_tol;
  std::printf("lce vs naive (relative): loss %.2e, dX %.2e, dW %.2e (Frobenius) -> %s\n", loss_diff,
              dx_diff, dw_diff, agree ? "agree" : "DIFFER");
  std::printf("lce is %.2fx the naive time, with %.1f MiB instead of %.1f MiB of extra memory\n",
              fused.median_ms / naive_result.median_ms, mib(fused.workspace_bytes),
              mib(naive_result.workspace_bytes));
  return agree ? 0 : 2;
}

[[noreturn]] void usage(const char* problem) {
  if (problem != nullptr) std::fprintf(stderr, "lm_head_step: %s\n", problem);
  std::fprintf(problem != nullptr ? stderr : stdout,
               "usage: lm_head_step [--flag value | --flag=value]...\n"
               "  --n, --d, --v   tokens, hidden size, vocabulary (8192, 2304, 256000: Gemma 2)\n"
               "  --dtype         bf16 | fp16 | fp32: X, W and dX (bf16)\n"
               "  --grad          element | fp32: dW (element)\n"
               "  --strategy      auto | vocab | row | stored: lce's backward (auto); row needs\n"
               "                  fp32 dW; stored keeps 16-bit values of the forward (n*v*2 B)\n"
               "  --budget-mib    memory budget of lce's backward in MiB (256)\n"
               "  --family        lm | flat | peaked: the random data (lm)\n"
               "  --seed          seed of the data (a fresh one by default, printed)\n"
               "  --iters         timed runs of each path, after 2 warm-up runs (10)\n"
               "exit status: 0 the paths agree, 2 they differ beyond rounding, 1 error/no GPU\n");
  std::exit(problem != nullptr ? 1 : 0);
}

std::int64_t parse_int(const std::string& flag, const std::string& text, std::int64_t min) {
  char* end = nullptr;
  const long long value = std::strtoll(text.c_str(), &end, 0);
  if (text.empty() || *end != '\0' || value < min)
    usage((flag + " needs an integer >= " + std::to_string(min) + ", not '" + text + "'").c_str());
  return value;
}

/// Flags as `--name value` or `--name=value`.
settings parse(int argc, char** argv) {
  settings s;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    std::string value;
    if (flag == "--help" || flag == "-h") usage(nullptr);
    if (const auto eq = flag.find('='); eq != std::string::npos) {
      value = flag.substr(eq + 1);
      flag = flag.substr(0, eq);
    } else if (i + 1 < argc) {
      value = argv[++i];
    } else {
      usage((flag + " needs a value").c_str());
    }
    bool known = true;
    if (flag == "--n") {
      s.shape.n = parse_int(flag, value, 1);
    } else if (flag == "--d") {
      s.shape.d = parse_int(flag, value, 1);
    } else if (flag == "--v") {
      s.shape.v = parse_int(flag, value, 1);
    } else if (flag == "--budget-mib") {
      s.budget_mib = static_cast<std::size_t>(parse_int(flag, value, 0));
    } else if (flag == "--iters") {
      s.iters = static_cast<int>(parse_int(flag, value, 1));
    } else if (flag == "--seed") {
      char* end = nullptr;
      s.seed = std::strtoull(value.c_str(), &end, 0);
      known = !value.empty() && *end == '\0';
    } else if (flag == "--dtype") {
      known = value == "bf16" || value == "fp16" || value == "fp32";
      s.dtype = value;
    } else if (flag == "--grad") {
      known = value == "element" || value == "fp32";
      s.fp32_grad = value == "fp32";
    } else if (flag == "--family") {
      known = parse_family(value, s.family);
    } else if (flag == "--strategy") {
      known = value == "auto" || value == "vocab" || value == "row" || value == "stored";
      s.strategy = value == "vocab"    ? lce::backward_strategy::vocab_chunked
                   : value == "row"    ? lce::backward_strategy::row_chunked
                   : value == "stored" ? lce::backward_strategy::stored
                                       : lce::backward_strategy::automatic;
    } else {
      usage(("unknown flag " + flag).c_str());
    }
    if (!known) usage(("unknown value '" + value + "' of " + flag).c_str());
  }
  if (s.strategy == lce::backward_strategy::row_chunked && !s.fp32_grad && s.dtype != "fp32")
    usage("--strategy row accumulates dW in fp32: it needs --grad fp32");
  return s;
}

template <class Element>
int run_with_grad(const settings& s) {
  if (s.fp32_grad && !std::is_same_v<Element, float>) return run<Element, float>(s);
  return run<Element, Element>(s);
}

}  // namespace

int main(int argc, char** argv) {
  const settings s = parse(argc, argv);
  if (const std::string why = cuda_device_problem(); !why.empty()) {
    std::fprintf(stderr, "lm_head_step: no usable CUDA device: %s\n", why.c_str());
    return 1;
  }
  try {
    cudaDeviceProp prop{};
    LCE_EXAMPLE_CHECK(cudaGetDeviceProperties(&prop, 0));
    std::printf(
        "lm_head_step on %s: N=%lld D=%lld V=%lld, %s, dW %s, strategy %s, budget %zu "
        "MiB, family %s, seed %llu\n",
        prop.name, static_cast<long long>(s.shape.n), static_cast<long long>(s.shape.d),
        static_cast<long long>(s.shape.v), s.dtype.c_str(), s.fp32_grad ? "fp32" : s.dtype.c_str(),
        lce::to_string(s.strategy), s.budget_mib, to_string(s.family),
        static_cast<unsigned long long>(s.seed));
    if (s.dtype == "fp32") return run_with_grad<float>(s);
    if (s.dtype == "fp16") return run_with_grad<__half>(s);
    return run_with_grad<__nv_bfloat16>(s);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "lm_head_step: %s\n", e.what());
    return 1;
  }
}
