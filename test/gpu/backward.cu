// GPU tests of lce::backward against the fp64 reference (CPU for small shapes, GPU for large),
// for every strategy, Grad = Element and Grad = float, each reduction, with and without bias,
// strided inputs and outputs, poisoned outputs and workspace.
#include <cstring>
#include <string>
#include <vector>

#include "support/harness.cuh"

namespace {

using namespace lce_test;

/// One way of running the backward.
struct variant {
  lce::backward_strategy strategy;
  std::size_t budget;
  std::string label;
};

constexpr std::size_t small_budget = std::size_t{1} << 20;  // forces many chunks

/// automatic, vocab_chunked and (fp32 dW only) row_chunked, each also with a 1 MiB budget
/// when `with_small_budget`.
template <class Grad>
std::vector<variant> variants(bool with_small_budget) {
  const std::size_t default_budget = lce::backward_options{}.memory_budget;
  std::vector<variant> out{
      {lce::backward_strategy::automatic, default_budget, "automatic"},
      {lce::backward_strategy::vocab_chunked, default_budget, "vocab_chunked"}};
  if (with_small_budget) {
    out.push_back({lce::backward_strategy::vocab_chunked, small_budget, "vocab_chunked/1MiB"});
  }
  if constexpr (std::is_same_v<Grad, float>) {
    out.push_back({lce::backward_strategy::row_chunked, default_budget, "row_chunked"});
    if (with_small_budget) {
      out.push_back({lce::backward_strategy::row_chunked, small_budget, "row_chunked/1MiB"});
    }
  }
  return out;
}

/// The reference lse rounded to fp32: what a forward would hand to the backward.
template <class Element>
device_buffer<float> reference_lse(const problem_data<Element>& data) {
  const std::vector<double> lse = data.ref_lse.download();
  return device_buffer<float>(std::vector<float>(lse.begin(), lse.end()));
}

struct wanted {
  bool dx = true, dw = true, db = true;
};

template <class Element, class Grad>
lce::backward_args<Element, Grad> make_args(const problem_data<Element>& data, const float* d_lse,
                                            outputs<Element, Grad>& out, wanted want) {
  lce::backward_args<Element, Grad> args;
  args.x = data.x.data();
  args.w = data.w.data();
  args.bias = data.bias_pointer();
  args.targets = data.targets.data();
  args.lse = d_lse;
  args.grad = data.grad_pointer();
  args.dx = want.dx ? out.dx.data() : nullptr;
  args.dw = want.dw ? out.dw.data() : nullptr;
  args.db = want.db ? out.db.data() : nullptr;
  return args;
}

/// Checks the requested gradients against the reference.
template <class Element, class Grad>
measured check_gradients(const problem_data<Element>& data, outputs<Element, Grad>& out,
                         wanted want) {
  const double tol = grad_tolerance<Element>();
  const lce::problem& s = data.shape;
  measured m;
  if (want.dx)
    m.dx = check_output("dx", out.dx.data(), s.n, s.d, s.dx_stride(), data.ref_dx.data(), tol);
  if (want.dw)
    m.dw = check_output("dw", out.dw.data(), s.v, s.d, s.dw_stride(), data.ref_dw.data(), tol);
  if (want.db)
    m.db = check_output("db", out.db.data(), 1, s.v, s.v, data.ref_db.data(), db_tolerance(data));
  return m;
}

/// Size query, launch on the context's stream with a poisoned workspace and outputs, check.
template <class Element, class Grad>
measured run_backward(const problem_data<Element>& data, gpu_context& ctx, const float* d_lse,
                      const variant& how, outputs<Element, Grad>& out, wanted want = {}) {
  INFO("strategy=" << how.label << " grad=" << element_name<Grad>());
  const lce::backward_args<Element, Grad> args = make_args(data, d_lse, out, want);
  lce::backward_options bopt;
  bopt.strategy = how.strategy;
  bopt.memory_budget = how.budget;
  std::size_t bytes = 0;
  LCE_TEST_REQUIRE_OK(
      lce::backward(nullptr, bytes, args, data.shape, data.options, bopt, ctx.handle()));
  REQUIRE(bytes == (lce::backward_workspace_size<Element, Grad>(data.shape, bopt)));
  void* ws = ctx.workspace(bytes);
  out.poison();
  LCE_TEST_REQUIRE_OK(
      lce::backward(ws, bytes, args, data.shape, data.options, bopt, ctx.handle(), ctx.stream()));
  ctx.synchronize();
  LCE_TEST_CUDA(cudaGetLastError());
  return check_gradients(data, out, want);
}

template <class Element, class Grad>
void run_all_variants(const problem_data<Element>& data, gpu_context& ctx, const float* d_lse,
                      bool with_small_budget) {
  outputs<Element, Grad> out(data.shape, true);
  for (const variant& how : variants<Grad>(with_small_budget)) {
    const measured m = run_backward(data, ctx, d_lse, how, out);
    print_result<Element, Grad>("backward", data.spec, how.label.c_str(), m);
  }
}

const std::vector<case_spec>& small_cases() {
  static const std::vector<case_spec> cases{
      case_spec{1, 16, 1},
      case_spec{7, 16, 3}.no_bias().sum().ignore_id(1),
      case_spec{7, 72, 127}.none().padded(8, 3, 5, 7),
      case_spec{300, 72, 3}.no_bias().padded(8, 3, 5, 7),
      case_spec{300, 1000, 127}.sum(),
      case_spec{4097, 16, 127}.none(),
      case_spec{4097, 72, 1}.padded(8, 3, 5, 7),
      case_spec{1, 2304, 50257}.no_bias(),
      case_spec{7, 72, 50257}.none().padded(8, 3, 5, 7),
      case_spec{300, 16, 4097}.sum().scaled(6.0),
  };
  return cases;
}

const std::vector<case_spec>& large_cases() {
  static const std::vector<case_spec> cases{
      case_spec{4097, 2304, 50257}.no_bias(),
      case_spec{300, 1000, 128256}.none().padded(8, 3, 5, 7),
      case_spec{4097, 72, 128256}.sum(),
  };
  return cases;
}

}  // namespace

TEMPLATE_TEST_CASE("backward matches the fp64 CPU reference on small and odd shapes",
                   "[gpu][backward]", float, __half, __nv_bfloat16) {
  const case_spec spec = GENERATE(from_range(small_cases()));
  problem_data<TestType> data(spec, fresh_seed());
  data.compute_reference(true);
  INFO(data.describe());
  const device_buffer<float> lse = reference_lse(data);
  gpu_context ctx;
  SECTION("Grad = Element") { run_all_variants<TestType, TestType>(data, ctx, lse.data(), true); }
  SECTION("Grad = float") { run_all_variants<TestType, float>(data, ctx, lse.data(), true); }
}

TEMPLATE_TEST_CASE("backward matches the fp64 GPU reference on large shapes",
                   "[gpu][backward][large]", float, __half, __nv_bfloat16) {
  const case_spec spec = GENERATE(from_range(large_cases()));
  problem_data<TestType> data(spec, fresh_seed());
  data.compute_reference(true);
  INFO(data.describe());
  REQUIRE(data.reference_on_gpu);
  const device_buffer<float> lse = reference_lse(data);
  gpu_context ctx;
  const bool with_small_budget = spec.d <= 128;  // many chunks stay cheap only for a small D
  run_all_variants<TestType, TestType>(data, ctx, lse.data(), with_small_budget);
  run_all_variants<TestType, float>(data, ctx, lse.data(), with_small_budget);
}

TEMPLATE_TEST_CASE("backward: a null upstream gradient means 1", "[gpu][backward]", float, __half,
                   __nv_bfloat16) {
  const auto red = GENERATE(lce::reduction::mean, lce::reduction::sum, lce::reduction::none);
  problem_data<TestType> data(case_spec{300, 72, 1000}.with_reduction(red).padded(0, 0, 5, 0),
                              fresh_seed());
  data.use_unit_upstream();
  data.compute_reference(true);
  INFO(data.describe());
  const device_buffer<float> lse = reference_lse(data);
  gpu_context ctx;
  run_all_variants<TestType, TestType>(data, ctx, lse.data(), false);
  run_all_variants<TestType, float>(data, ctx, lse.data(), false);
}

TEMPLATE_TEST_CASE("backward: dx, dw and db are each optional", "[gpu][backward]", float, __half,
                   __nv_bfloat16) {
  problem_data<TestType> data(case_spec{300, 72, 1000}.padded(8, 3, 5, 7), fresh_seed());
  data.compute_reference(true);
  INFO(data.describe());
  const device_buffer<float> lse = reference_lse(data);
  gpu_context ctx;
  const wanted subsets[] = {{true, false, false},
                            {false, true, false},
                            {false, false, true},
                            {false, true, true},
                            {true, false, true}};
  for (const wanted want : subsets) {
    CAPTURE(want.dx, want.dw, want.db);
    {
      outputs<TestType, TestType> out(data.shape, true);
      for (const variant& how : variants<TestType>(true))
        (void)run_backward(data, ctx, lse.data(), how, out, want);
    }
    {
      outputs<TestType, float> out(data.shape, true);
      for (const variant& how : variants<float>(true))
        (void)run_backward(data, ctx, lse.data(), how, out, want);
    }
  }
}

TEMPLATE_TEST_CASE("backward: an all-ignored batch gives exactly zero gradients", "[gpu][backward]",
                   float, __half, __nv_bfloat16) {
  const auto red = GENERATE(lce::reduction::mean, lce::reduction::sum, lce::reduction::none);
  problem_data<TestType> data(
      case_spec{300, 72, 127}.with_reduction(red).ignoring(1.0).padded(8, 3, 5, 7), fresh_seed());
  data.compute_reference(true);
  INFO(data.describe());
  REQUIRE(data.n_valid == 0);
  const device_buffer<float> lse = reference_lse(data);
  gpu_context ctx;
  const lce::problem& s = data.shape;
  auto check_zero = [&](auto& out) {
    check_exact_zero("dx", out.dx.data(), s.n, s.d, s.dx_stride(), data.ref_dx.data());
    check_exact_zero("dw", out.dw.data(), s.v, s.d, s.dw_stride(), data.ref_dw.data());
    check_exact_zero("db", out.db.data(), 1, s.v, s.v, data.ref_db.data());
  };
  {
    outputs<TestType, TestType> out(data.shape, true);
    for (const variant& how : variants<TestType>(true)) {
      (void)run_backward(data, ctx, lse.data(), how, out);
      check_zero(out);
    }
  }
  {
    outputs<TestType, float> out(data.shape, true);
    for (const variant& how : variants<float>(true)) {
      (void)run_backward(data, ctx, lse.data(), how, out);
      check_zero(out);
    }
  }
}

TEMPLATE_TEST_CASE("backward is deterministic for a given strategy and budget", "[gpu][backward]",
                   float, __half, __nv_bfloat16) {
  problem_data<TestType> data(case_spec{300, 1000, 50257}, fresh_seed());
  data.compute_reference(false, true);
  INFO(data.describe());
  const device_buffer<float> lse = reference_lse(data);
  gpu_context ctx;
  auto check = [&](auto grad_tag) {
    using Grad = decltype(grad_tag);
    for (const variant& how : variants<Grad>(true)) {
      INFO("strategy=" << how.label << " grad=" << element_name<Grad>());
      outputs<TestType, Grad> first(data.shape, true);
      outputs<TestType, Grad> second(data.shape, true);
      for (auto* out : {&first, &second}) {
        const auto args = make_args(data, lse.data(), *out, wanted{});
        lce::backward_options bopt;
        bopt.strategy = how.strategy;
        bopt.memory_budget = how.budget;
        std::size_t bytes = 0;
        LCE_TEST_REQUIRE_OK(
            lce::backward(nullptr, bytes, args, data.shape, data.options, bopt, ctx.handle()));
        out->poison();
        LCE_TEST_REQUIRE_OK(lce::backward(ctx.workspace(bytes), bytes, args, data.shape,
                                          data.options, bopt, ctx.handle(), ctx.stream()));
        ctx.synchronize();
      }
      CHECK(std::memcmp(first.dx.download().data(), second.dx.download().data(),
                        first.dx.bytes()) == 0);
      CHECK(std::memcmp(first.dw.download().data(), second.dw.download().data(),
                        first.dw.bytes()) == 0);
      CHECK(std::memcmp(first.db.download().data(), second.db.download().data(),
                        first.db.bytes()) == 0);
    }
  };
  check(TestType{});
  check(float{});
}

TEMPLATE_TEST_CASE("backward under stream capture: graph replays give the reference",
                   "[gpu][backward][graph]", float, __half, __nv_bfloat16) {
  problem_data<TestType> data(case_spec{300, 72, 4097}.none().padded(8, 3, 5, 7), fresh_seed());
  data.compute_reference(true);
  INFO(data.describe());
  const device_buffer<float> lse = reference_lse(data);
  gpu_context ctx;
  auto capture_and_check = [&](auto grad_tag) {
    using Grad = decltype(grad_tag);
    for (const variant& how : variants<Grad>(true)) {
      INFO("strategy=" << how.label << " grad=" << element_name<Grad>());
      outputs<TestType, Grad> out(data.shape, true);
      const auto args = make_args(data, lse.data(), out, wanted{});
      lce::backward_options bopt;
      bopt.strategy = how.strategy;
      bopt.memory_budget = how.budget;
      std::size_t bytes = 0;
      LCE_TEST_REQUIRE_OK(
          lce::backward(nullptr, bytes, args, data.shape, data.options, bopt, ctx.handle()));
      void* ws = ctx.workspace(bytes);
      const captured_graph graph(ctx.stream(), [&] {
        return lce::backward(ws, bytes, args, data.shape, data.options, bopt, ctx.handle(),
                             ctx.stream());
      });
      INFO("lce: " << graph.message());
      REQUIRE(graph.status() == cudaSuccess);
      CHECK(graph.nodes() > 0);
      for (int replay = 0; replay < 2; ++replay) {
        CAPTURE(replay);
        out.poison();
        graph.launch(ctx.stream());
        const measured m = check_gradients(data, out, wanted{});
        if (replay == 0)
          print_result<TestType, Grad>("backward", data.spec, how.label.c_str(), m, "graph=1");
      }
    }
  };
  capture_and_check(TestType{});
  capture_and_check(float{});
}

TEMPLATE_TEST_CASE("backward leaves the cuBLAS handle as it found it", "[gpu][backward]", float,
                   __half, __nv_bfloat16) {
  problem_data<TestType> data(case_spec{64, 72, 300}, fresh_seed());
  data.compute_reference(true);
  const device_buffer<float> lse = reference_lse(data);
  gpu_context ctx;
  cudaStream_t other = nullptr;
  LCE_TEST_CUDA(cudaStreamCreateWithFlags(&other, cudaStreamNonBlocking));
  REQUIRE(cublasSetStream(ctx.handle(), other) == CUBLAS_STATUS_SUCCESS);
  REQUIRE(cublasSetPointerMode(ctx.handle(), CUBLAS_POINTER_MODE_DEVICE) == CUBLAS_STATUS_SUCCESS);
  outputs<TestType, float> out(data.shape, true);
  (void)run_backward(data, ctx, lse.data(), variants<float>(false)[0], out);
  cudaStream_t stream_after = nullptr;
  cublasPointerMode_t mode_after = CUBLAS_POINTER_MODE_HOST;
  CHECK(cublasGetStream(ctx.handle(), &stream_after) == CUBLAS_STATUS_SUCCESS);
  CHECK(cublasGetPointerMode(ctx.handle(), &mode_after) == CUBLAS_STATUS_SUCCESS);
  CHECK(stream_after == other);
  CHECK(mode_after == CUBLAS_POINTER_MODE_DEVICE);
  (void)cublasSetStream(ctx.handle(), nullptr);
  LCE_TEST_CUDA(cudaStreamDestroy(other));
}

TEMPLATE_TEST_CASE("backward: a size query enqueues nothing", "[gpu][backward][graph]", float,
                   __half, __nv_bfloat16) {
  problem_data<TestType> data(case_spec{300, 72, 127}, fresh_seed());
  gpu_context ctx;
  device_buffer<float> lse(300);
  outputs<TestType, float> out(data.shape, true);
  const auto args = make_args(data, lse.data(), out, wanted{});
  std::size_t bytes = 0;
  const captured_graph query(ctx.stream(), [&] {
    return lce::backward(nullptr, bytes, args, data.shape, data.options, lce::backward_options{},
                         ctx.handle(), ctx.stream());
  });
  REQUIRE(query.status() == cudaSuccess);
  CHECK(query.nodes() == 0);
  CHECK(bytes > 0);
  CHECK(cudaGetLastError() == cudaSuccess);
}
