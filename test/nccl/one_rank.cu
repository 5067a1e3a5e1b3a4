// GPU tests of lce::nccl on one GPU: a communicator of one rank, whose shard is the whole
// vocabulary. forward_backward with every strategy (the stored one included: the shard's
// forward keeps its values, the backward forms dZ over them and reduces the partial dX through
// the collective) and the backward from the reference lse, against the fp64 reference, with
// the options that change the stored path (softcap, smoothing, z-loss, temperature, shift,
// reduction none) and the fallbacks (a bias). The two-rank suite (nccl/vocab_parallel.cu) covers
// shards and uneven splits on two GPUs.
#include <nccl.h>

#include <lce/nccl/vocab_parallel.cuh>
#include <string>
#include <vector>

#include "support/harness.cuh"

namespace {

using namespace lce_test;

/// The communicator of device 0 alone, created once and never destroyed (a destructor would
/// run after main, when the CUDA runtime may be gone).
ncclComm_t one_rank_comm() {
  static ncclComm_t comm = [] {
    ncclComm_t c = nullptr;
    const int devices[1] = {0};
    const ncclResult_t r = ncclCommInitAll(&c, 1, devices);
    if (r != ncclSuccess)
      throw std::runtime_error(std::string("ncclCommInitAll: ") + ncclGetErrorString(r));
    return c;
  }();
  return comm;
}

struct variant {
  lce::backward_strategy strategy;
  std::size_t budget;
  std::string label;
};

template <class Grad>
std::vector<variant> variants() {
  const std::size_t budget = lce::backward_options{}.memory_budget;
  std::vector<variant> out{
      {lce::backward_strategy::automatic, budget, "automatic"},
      {lce::backward_strategy::vocab_chunked, std::size_t{1} << 20, "vocab_chunked/1MiB"},
      {lce::backward_strategy::stored, budget, "stored"},
      {lce::backward_strategy::automatic, std::size_t{1} << 40,
       "automatic/unbounded"}};  // automatic takes stored
  if constexpr (std::is_same_v<Grad, float>)
    out.push_back({lce::backward_strategy::row_chunked, std::size_t{1} << 20, "row_chunked/1MiB"});
  return out;
}

template <class Element, class Grad>
measured check_gradients(const problem_data<Element>& data, outputs<Element, Grad>& out) {
  const lce::problem& s = data.shape;
  const double grad_tol = grad_tolerance<Element>();
  measured m;
  m.dx = check_output("dx", out.dx.data(), s.n, s.d, s.dx_stride(), data.ref_dx.data(), grad_tol);
  m.dw = check_output("dw", out.dw.data(), s.v, s.d, s.dw_stride(), data.ref_dw.data(), grad_tol);
  m.db = check_output("db", out.db.data(), 1, s.v, s.v, data.ref_db.data(), db_tolerance(data));
  return m;
}

template <class Element, class Grad>
void run_forward_backward(const problem_data<Element>& data, gpu_context& ctx, const variant& how) {
  INFO("nccl one rank forward_backward, " << how.label << " grad=" << element_name<Grad>());
  const lce::problem& s = data.shape;
  const bool reduced = data.spec.reduction != lce::reduction::none;
  outputs<Element, Grad> out(s, true);
  lce::forward_backward_args<Element, Grad> a;
  a.x = data.x.data();
  a.w = data.w.data();
  a.bias = data.bias_pointer();
  a.targets = data.targets.data();
  a.class_weight = data.class_weight_pointer();
  a.loss = reduced ? out.loss.data() : nullptr;
  a.token_loss = out.token_loss.data();
  a.lse = out.lse.data();
  a.dx = out.dx.data();
  a.dw = out.dw.data();
  a.db = out.db.data();
  lce::nccl::vocab_shard shard;
  shard.comm = one_rank_comm();
  shard.v_begin = 0;
  shard.v_end = s.v;
  lce::backward_options bopt;
  bopt.strategy = how.strategy;
  bopt.memory_budget = how.budget;
  std::size_t bytes = 0;
  LCE_TEST_REQUIRE_OK(
      lce::nccl::forward_backward(nullptr, bytes, a, s, shard, data.options, bopt, ctx.handle()));
  REQUIRE(bytes == (lce::nccl::forward_backward_workspace_size<Element, Grad>(
                       s, shard, bopt, a.bias != nullptr || a.class_weight != nullptr)));
  void* ws = ctx.workspace(bytes);
  out.poison();
  LCE_TEST_REQUIRE_OK(lce::nccl::forward_backward(ws, bytes, a, s, shard, data.options, bopt,
                                                  ctx.handle(), ctx.stream()));
  ctx.synchronize();
  LCE_TEST_CUDA(cudaGetLastError());
  measured m = check_gradients(data, out);
  const double loss_tol = loss_tolerance<Element>();
  if (reduced) m.loss = check_loss(out.loss.data(), data.ref_loss, loss_tol);
  m.lse = check_output("lse", out.lse.data(), s.n, 1, 1, data.ref_lse.data(), loss_tol);
  m.token_loss = check_output("token_loss", out.token_loss.data(), s.n, 1, 1,
                              data.ref_token_loss.data(), loss_tol);
  print_result<Element, Grad>("nccl_forward_backward/1rank", data.spec, how.label.c_str(), m);
}

const std::vector<case_spec>& cases() {
  static const std::vector<case_spec> all{
      case_spec{300, 72, 1000}.no_bias(),
      case_spec{300, 72, 1000}.no_bias().capped(20.0f).smoothing(0.1f).with_z_loss(1e-3f),
      case_spec{257, 136, 4099}.no_bias().none().with_temperature(0.8f).shifted(257),
      case_spec{300, 72, 1000}.sum().no_bias().padded(8, 3, 5, 7),
      case_spec{300, 72, 1000},  // a bias: stored falls back to the chunked plan
  };
  return all;
}

}  // namespace

TEMPLATE_TEST_CASE("nccl one rank: forward_backward with every strategy matches the reference",
                   "[gpu][nccl][one_rank]", float, __half, __nv_bfloat16) {
  const case_spec spec = GENERATE(from_range(cases()));
  problem_data<TestType> data(spec, fresh_seed());
  data.use_unit_upstream();
  data.compute_reference(true);
  INFO(data.describe());
  gpu_context ctx;
  for (const variant& how : variants<TestType>())
    run_forward_backward<TestType, TestType>(data, ctx, how);
  for (const variant& how : variants<float>())
    run_forward_backward<TestType, float>(data, ctx, how);
}

TEST_CASE("nccl one rank: stored is reported and rejected where it cannot run",
          "[gpu][nccl][one_rank]") {
  const lce::problem s{300, 72, 1000};
  lce::nccl::vocab_shard shard;
  shard.comm = one_rank_comm();
  shard.v_begin = 0;
  shard.v_end = s.v;
  lce::backward_options bopt;
  bopt.strategy = lce::backward_strategy::stored;
  // backward has no forward to store from: the named error, before any launch.
  lce::backward_args<__nv_bfloat16, __nv_bfloat16> a;
  device_buffer<__nv_bfloat16> x(static_cast<std::size_t>(s.n * s.d)),
      w(static_cast<std::size_t>(s.v * s.d));
  device_buffer<float> lse(static_cast<std::size_t>(s.n));
  device_buffer<std::int64_t> targets(static_cast<std::size_t>(s.n));
  device_buffer<__nv_bfloat16> dx(static_cast<std::size_t>(s.n * s.d));
  a.x = x.data();
  a.w = w.data();
  a.lse = lse.data();
  a.targets = targets.data();
  a.dx = dx.data();
  gpu_context ctx;
  std::size_t bytes = 0;
  const cudaError_t e =
      lce::nccl::backward(nullptr, bytes, a, s, shard, lce::loss_options{}, bopt, ctx.handle());
  CHECK(e == cudaErrorInvalidValue);
  CHECK(std::string(lce::last_error_message()).find("stored") != std::string::npos);
  // forward_backward's workspace holds the stored values of the shard.
  CHECK(lce::nccl::forward_backward_workspace_size<__nv_bfloat16>(s, shard, bopt) >=
        static_cast<std::size_t>(s.n) * s.v * 2);
}
