// Built for sm_80 and plain sm_90 (no "a"): the sm_90a kernels of this binary are the builds
// without wgmma/TMA, which the launcher must recognise and skip (device::sm90_kernel_runs), so
// that an H100/H200 runs the mma.sync kernel here and still matches the fp64 reference.
#include "support/harness.cuh"

using namespace lce_test;

TEMPLATE_TEST_CASE("forward in a binary without sm_90a code falls back to the mma.sync kernel",
                   "[gpu][forward][arch]", __half, __nv_bfloat16) {
  const case_spec spec = GENERATE(case_spec{300, 1000, 4097}.no_bias(),
                                  case_spec{129, 72, 512}.no_bias().capped(5.0f));
  problem_data<TestType> data(spec, fresh_seed());
  data.compute_reference(false);
  INFO(data.describe());
  gpu_context ctx;
  outputs<TestType, TestType> out(data.shape, false);
  lce::forward_args<TestType> args{data.x.data(),       data.w.data(),   nullptr,
                                   data.targets.data(), out.loss.data(), out.token_loss.data(),
                                   out.lse.data()};
  std::size_t bytes = 0;
  LCE_TEST_REQUIRE_OK(lce::forward<TestType>(nullptr, bytes, args, data.shape, data.options));
  out.poison();
  LCE_TEST_REQUIRE_OK(lce::forward<TestType>(ctx.workspace(bytes), bytes, args, data.shape,
                                             data.options, ctx.stream()));
  ctx.synchronize();
  LCE_TEST_CUDA(cudaGetLastError());
  const double tol = loss_tolerance<TestType>();
  measured m;
  m.loss = check_loss(out.loss.data(), data.ref_loss, tol);
  m.lse = check_output("lse", out.lse.data(), spec.n, 1, 1, data.ref_lse.data(), tol,
                       lse_norm_floor(spec.n));
  m.token_loss = check_output("token_loss", out.token_loss.data(), spec.n, 1, 1,
                              data.ref_token_loss.data(), tol);
  print_result<TestType>("forward", spec, "-", m, "arch=sm_90-without-a");
}
