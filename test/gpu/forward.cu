// GPU tests of lce::forward against the fp64 reference (CPU for small shapes, GPU for large),
// with fresh random inputs, poisoned outputs and NaN-padded strided inputs.
#include <cstring>
#include <vector>

#include "support/harness.cuh"

namespace {

using namespace lce_test;

/// Runs lce::forward on `data` with the chosen optional outputs and checks what it wrote.
template <class Element>
measured run_forward(problem_data<Element>& data, gpu_context& ctx, bool with_lse,
                     bool with_token_loss, outputs<Element, Element>& out) {
  const bool reduced = data.spec.reduction != lce::reduction::none;
  lce::forward_args<Element> args;
  args.x = data.x.data();
  args.w = data.w.data();
  args.bias = data.bias_pointer();
  args.targets = data.targets.data();
  args.loss = reduced ? out.loss.data() : nullptr;
  args.token_loss = with_token_loss || !reduced ? out.token_loss.data() : nullptr;
  args.lse = with_lse ? out.lse.data() : nullptr;

  std::size_t bytes = 0;
  LCE_TEST_REQUIRE_OK(lce::forward<Element>(nullptr, bytes, args, data.shape, data.options));
  REQUIRE(bytes == lce::forward_workspace_size<Element>(data.shape));
  void* ws = ctx.workspace(bytes);
  out.poison();
  LCE_TEST_REQUIRE_OK(
      lce::forward<Element>(ws, bytes, args, data.shape, data.options, ctx.stream()));
  ctx.synchronize();
  LCE_TEST_CUDA(cudaGetLastError());

  const double tol = loss_tolerance<Element>();
  const std::int64_t n = data.spec.n;
  measured m;
  if (args.loss != nullptr) m.loss = check_loss(out.loss.data(), data.ref_loss, tol);
  if (args.lse != nullptr)
    m.lse =
        check_output("lse", out.lse.data(), n, 1, 1, data.ref_lse.data(), tol, lse_norm_floor(n));
  if (args.token_loss != nullptr) {
    m.token_loss =
        check_output("token_loss", out.token_loss.data(), n, 1, 1, data.ref_token_loss.data(), tol);
  }
  return m;
}

const std::vector<case_spec>& small_cases() {
  static const std::vector<case_spec> cases{
      case_spec{1, 16, 1},
      case_spec{7, 16, 3}.no_bias().sum().ignore_id(1),
      case_spec{7, 72, 127}.none().padded(8, 3, 0, 0),
      case_spec{300, 72, 3}.no_bias().padded(8, 3, 0, 0),
      case_spec{300, 1000, 127}.sum(),
      case_spec{300, 2304, 127}.padded(8, 3, 0, 0).scaled(6.0),
      case_spec{4097, 16, 127}.none(),
      case_spec{4097, 72, 1}.padded(8, 3, 0, 0),
      case_spec{1, 2304, 50257}.no_bias(),
      case_spec{7, 1000, 50257}.none().padded(8, 3, 0, 0),
      case_spec{7, 72, 128256}.sum(),
  };
  return cases;
}

const std::vector<case_spec>& large_cases() {
  static const std::vector<case_spec> cases{
      case_spec{4097, 2304, 50257}.no_bias(),
      case_spec{300, 1000, 128256}.none().padded(8, 3, 0, 0),
      case_spec{4097, 72, 128256}.sum(),
  };
  return cases;
}

}  // namespace

TEMPLATE_TEST_CASE("forward matches the fp64 CPU reference on small and odd shapes",
                   "[gpu][forward]", float, __half, __nv_bfloat16) {
  const case_spec spec = GENERATE(from_range(small_cases()));
  problem_data<TestType> data(spec, fresh_seed());
  data.compute_reference(false);
  INFO(data.describe());
  gpu_context ctx;
  outputs<TestType, TestType> out(data.shape, false);
  print_result<TestType>("forward", spec, "-", run_forward(data, ctx, true, true, out));
}

TEMPLATE_TEST_CASE("forward matches the fp64 GPU reference on large shapes",
                   "[gpu][forward][large]", float, __half, __nv_bfloat16) {
  const case_spec spec = GENERATE(from_range(large_cases()));
  problem_data<TestType> data(spec, fresh_seed());
  data.compute_reference(false);
  INFO(data.describe());
  REQUIRE(data.reference_on_gpu);
  gpu_context ctx;
  outputs<TestType, TestType> out(data.shape, false);
  print_result<TestType>("forward", spec, "-", run_forward(data, ctx, true, true, out));
}

TEMPLATE_TEST_CASE("forward: optional outputs may be null", "[gpu][forward]", float, __half,
                   __nv_bfloat16) {
  const auto red = GENERATE(lce::reduction::mean, lce::reduction::sum, lce::reduction::none);
  const bool with_lse = GENERATE(false, true);
  const bool with_token_loss = GENERATE(false, true);
  problem_data<TestType> data(case_spec{300, 72, 1000}.with_reduction(red), fresh_seed());
  data.compute_reference(false);
  INFO(data.describe() << " lse=" << with_lse << " token_loss=" << with_token_loss);
  gpu_context ctx;
  outputs<TestType, TestType> out(data.shape, false);
  (void)run_forward(data, ctx, with_lse, with_token_loss, out);
}

TEMPLATE_TEST_CASE("forward: an all-ignored batch gives loss 0, never NaN", "[gpu][forward]", float,
                   __half, __nv_bfloat16) {
  const auto red = GENERATE(lce::reduction::mean, lce::reduction::sum, lce::reduction::none);
  problem_data<TestType> data(case_spec{300, 72, 127}.with_reduction(red).ignoring(1.0),
                              fresh_seed());
  data.compute_reference(false);
  INFO(data.describe());
  REQUIRE(data.n_valid == 0);
  gpu_context ctx;
  outputs<TestType, TestType> out(data.shape, false);
  (void)run_forward(data, ctx, true, true, out);
  check_exact_zero("token_loss", out.token_loss.data(), 300, 1, 1, data.ref_token_loss.data());
  if (red != lce::reduction::none) {
    float loss = 1.0f;
    LCE_TEST_CUDA(cudaMemcpy(&loss, out.loss.data(), sizeof(float), cudaMemcpyDeviceToHost));
    CHECK(loss == 0.0f);
  }
}

TEMPLATE_TEST_CASE("forward is deterministic", "[gpu][forward]", float, __half, __nv_bfloat16) {
  problem_data<TestType> data(case_spec{300, 1000, 50257}, fresh_seed());
  INFO(data.describe());
  gpu_context ctx;
  std::vector<std::vector<float>> runs;
  for (int run = 0; run < 2; ++run) {
    outputs<TestType, TestType> out(data.shape, false);
    lce::forward_args<TestType> args{data.x.data(),       data.w.data(),   data.bias_pointer(),
                                     data.targets.data(), out.loss.data(), out.token_loss.data(),
                                     out.lse.data()};
    std::size_t bytes = 0;
    LCE_TEST_REQUIRE_OK(lce::forward<TestType>(nullptr, bytes, args, data.shape, data.options));
    out.poison();
    LCE_TEST_REQUIRE_OK(lce::forward<TestType>(ctx.workspace(bytes), bytes, args, data.shape,
                                               data.options, ctx.stream()));
    ctx.synchronize();
    std::vector<float> all = out.loss.download();
    const std::vector<float> lse = out.lse.download();
    const std::vector<float> token_loss = out.token_loss.download();
    all.insert(all.end(), lse.begin(), lse.end());
    all.insert(all.end(), token_loss.begin(), token_loss.end());
    runs.push_back(std::move(all));
  }
  REQUIRE(runs[0].size() == runs[1].size());
  CHECK(std::memcmp(runs[0].data(), runs[1].data(), runs[0].size() * sizeof(float)) == 0);
}

TEMPLATE_TEST_CASE("forward under stream capture: graph replays give the reference",
                   "[gpu][forward][graph]", float, __half, __nv_bfloat16) {
  problem_data<TestType> data(case_spec{300, 72, 4097}.padded(8, 3, 0, 0), fresh_seed());
  data.compute_reference(false);
  INFO(data.describe());
  gpu_context ctx;
  outputs<TestType, TestType> out(data.shape, false);
  lce::forward_args<TestType> args{data.x.data(),       data.w.data(),   data.bias_pointer(),
                                   data.targets.data(), out.loss.data(), out.token_loss.data(),
                                   out.lse.data()};
  std::size_t bytes = 0;
  LCE_TEST_REQUIRE_OK(lce::forward<TestType>(nullptr, bytes, args, data.shape, data.options));
  void* ws = ctx.workspace(bytes);
  const captured_graph graph(ctx.stream(), [&] {
    return lce::forward<TestType>(ws, bytes, args, data.shape, data.options, ctx.stream());
  });
  INFO("lce: " << graph.message());
  REQUIRE(graph.status() == cudaSuccess);
  CHECK(graph.nodes() > 0);
  const double tol = loss_tolerance<TestType>();
  for (int replay = 0; replay < 2; ++replay) {
    CAPTURE(replay);
    out.poison();
    graph.launch(ctx.stream());
    measured m;
    m.loss = check_loss(out.loss.data(), data.ref_loss, tol);
    m.lse = check_output("lse", out.lse.data(), data.spec.n, 1, 1, data.ref_lse.data(), tol,
                         lse_norm_floor(data.spec.n));
    m.token_loss = check_output("token_loss", out.token_loss.data(), data.spec.n, 1, 1,
                                data.ref_token_loss.data(), tol);
    if (replay == 0) print_result<TestType>("forward", data.spec, "-", m, "graph=1");
  }
}

TEMPLATE_TEST_CASE("forward: a size query or a rejected call enqueues nothing",
                   "[gpu][forward][graph]", float, __half, __nv_bfloat16) {
  problem_data<TestType> data(case_spec{300, 72, 127}, fresh_seed());
  gpu_context ctx;
  outputs<TestType, TestType> out(data.shape, false);
  lce::forward_args<TestType> args{
      data.x.data(), data.w.data(), data.bias_pointer(), data.targets.data(), out.loss.data(),
      nullptr,       nullptr};
  std::size_t bytes = 0;
  const captured_graph query(ctx.stream(), [&] {
    return lce::forward<TestType>(nullptr, bytes, args, data.shape, data.options, ctx.stream());
  });
  REQUIRE(query.status() == cudaSuccess);
  CHECK(query.nodes() == 0);
  CHECK(bytes > 0);

  void* ws = ctx.workspace(bytes);
  std::size_t short_bytes = bytes - 1;
  const captured_graph rejected(ctx.stream(), [&] {
    const cudaError_t status =
        lce::forward<TestType>(ws, short_bytes, args, data.shape, data.options, ctx.stream());
    return status == cudaErrorInvalidValue ? cudaSuccess : cudaErrorUnknown;
  });
  CHECK(rejected.status() == cudaSuccess);
  CHECK(rejected.nodes() == 0);
  // Argument errors are not sticky CUDA errors.
  CHECK(cudaGetLastError() == cudaSuccess);
}

namespace {

/// Runs lce::forward<Element, Config> on a fresh problem and checks loss, lse and token loss.
template <class Element, class Config>
void check_forward_config(const case_spec& spec, const char* label) {
  problem_data<Element> data(spec, fresh_seed());
  data.compute_reference(false);
  INFO(data.describe() << " config " << label);
  gpu_context ctx;
  outputs<Element, Element> out(data.shape, false);
  const bool reduced = spec.reduction != lce::reduction::none;
  lce::forward_args<Element> args{data.x.data(),
                                  data.w.data(),
                                  data.bias_pointer(),
                                  data.targets.data(),
                                  reduced ? out.loss.data() : nullptr,
                                  out.token_loss.data(),
                                  out.lse.data()};
  args.class_weight = data.class_weight_pointer();
  std::size_t bytes = 0;
  LCE_TEST_REQUIRE_OK(
      (lce::forward<Element, Config>(nullptr, bytes, args, data.shape, data.options)));
  REQUIRE(bytes == (lce::forward_workspace_size<Element, Config>(data.shape)));
  out.poison();
  LCE_TEST_REQUIRE_OK((lce::forward<Element, Config>(ctx.workspace(bytes), bytes, args, data.shape,
                                                     data.options, ctx.stream())));
  ctx.synchronize();
  LCE_TEST_CUDA(cudaGetLastError());
  const double tol = loss_tolerance<Element>();
  measured m;
  if (reduced) m.loss = check_loss(out.loss.data(), data.ref_loss, tol);
  m.lse = check_output("lse", out.lse.data(), spec.n, 1, 1, data.ref_lse.data(), tol,
                       lse_norm_floor(spec.n));
  m.token_loss = check_output("token_loss", out.token_loss.data(), spec.n, 1, 1,
                              data.ref_token_loss.data(), tol);
  print_result<Element>("forward", spec, "-", m, label);
}

}  // namespace

// The 16-bit tile configurations without an sm_90a kernel (mma.sync on every device) and with
// the narrow sm_90a tiles (128 vocabulary rows) in every case (the default takes 256-wide ones
// without bias and class weights). Named namespace: kernels instantiated on them have hidden
// visibility, which needs external linkage.
namespace lce_test_configs {
struct mma_sync_only : lce::tile_config<128, 128, 32, 2, 4, 4> {};
struct sm90_narrow : lce::tile_config<128, 128, 32, 2, 4, 4> {
  using sm90 = lce::sm90_tile_config<128, 6>;
};
// The default's tiles without clusters (each block loads its whole W box).
struct sm90_single : lce::tile_config<128, 128, 32, 2, 4, 4> {
  using sm90 = lce::sm90_tile_config<256, 4, 1>;
  using sm90_general = lce::sm90_tile_config<128, 6, 1>;
};
}  // namespace lce_test_configs
using lce_test_configs::mma_sync_only;
using lce_test_configs::sm90_narrow;
using lce_test_configs::sm90_single;

TEMPLATE_TEST_CASE("forward with a caller-chosen tile configuration", "[gpu][forward][config]",
                   float, __half, __nv_bfloat16) {
  // Smaller tiles than the default (and another warp grid): the Config parameter is public.
  using small_tiles = lce::tile_config<32, 64, 16, 1, 2>;
  const case_spec spec = GENERATE(case_spec{300, 72, 1000}.padded(8, 3, 0, 0),
                                  case_spec{7, 1000, 4097}.sum(), case_spec{33, 16, 3}.none());
  check_forward_config<TestType, small_tiles>(spec, "config=32x64x16/1x2");
}

TEMPLATE_TEST_CASE(
    "forward: the mma.sync and the sm_90a kernels (both tile widths) agree with "
    "the reference",
    "[gpu][forward][config]", __half, __nv_bfloat16) {
  // On an sm_90a device the default Config runs the wgmma kernel; mma_sync_only keeps the
  // mma.sync kernel there too, so both are checked on the same machine.
  const case_spec spec =
      GENERATE(case_spec{1, 16, 1}, case_spec{129, 72, 257}.sum(), case_spec{300, 1000, 4097},
               case_spec{255, 2304, 50257}.none(), case_spec{4097, 64, 1000}.no_bias(),
               case_spec{300, 136, 3000}.padded(8, 8, 0, 0),
               // the lean epilogue with softcap and temperature (no bias)
               case_spec{300, 1000, 4097}.no_bias().capped(30.0f),
               case_spec{129, 72, 512}.no_bias().capped(5.0f).with_temperature(0.7f).scaled(6.0),
               case_spec{257, 2304, 1024}.no_bias().with_temperature(1.7f),
               // the general epilogue: class weights and smoothing
               case_spec{200, 520, 3001}.no_bias().weighted().smoothing(0.1f));
  check_forward_config<TestType, lce::default_config<TestType>>(spec, "config=default");
  check_forward_config<TestType, mma_sync_only>(spec, "config=mma.sync");
  check_forward_config<TestType, sm90_narrow>(spec, "config=sm90-128");
  check_forward_config<TestType, sm90_single>(spec, "config=sm90-no-cluster");
}

// The visible choice (choose_forward, choose_backward) agrees with the device: this binary has
// sm_90a code, so on a device of compute capability 9.0 the sm_90a kernels are named.
TEST_CASE("choose_forward and choose_backward name the sm_90a kernels on an sm_90a device",
          "[gpu][forward][choice]") {
  int device = 0, major = 0, minor = 0;
  LCE_TEST_CUDA(cudaGetDevice(&device));
  LCE_TEST_CUDA(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  LCE_TEST_CUDA(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  const bool sm90a = major == 9 && minor == 0;
  const lce::problem shape{8192, 4096, 128256};
  const lce::forward_choice lean = lce::choose_forward<__nv_bfloat16>(shape);
  const lce::forward_choice general = lce::choose_forward<__nv_bfloat16>(shape, true);
  const lce::backward_choice backward = lce::choose_backward<__nv_bfloat16>(shape);
  INFO(lean.reason << " | " << general.reason << " | " << backward.reason);
  CHECK(lean.kernel == (sm90a ? lce::forward_kernel::sm90 : lce::forward_kernel::tiled));
  CHECK(general.kernel == (sm90a ? lce::forward_kernel::sm90_general : lce::forward_kernel::tiled));
  CHECK(backward.fused_recompute == sm90a);
  CHECK(lce::choose_forward<float>(shape).kernel == lce::forward_kernel::tiled);
}
