// GPU tests of sizes whose element counts exceed 2^31 (int64 indexing in the kernels, the
// launchers, the cuBLAS calls and the grids), tag [huge]: about 50 GB of device memory at the
// peak (an H200 holds them) and well under a minute.
//   N·V > 2^31: 16384 × 64 × 262144 (fp32 and bf16)
//   V·D > 2^31: 32 × 8192 × 262144 (bf16; dW has 2^31 elements)
//   N·D > 2^31: 262160 × 8192 × 256 (bf16; X, dX and the fp32 dX accumulator)
// Every output is compared in full with the fp64 GPU reference; that reference and the library
// are both checked against the fp64 CPU reference on sampled rows (lse, per-token loss, dX).
#include <cmath>
#include <cstdio>
#include <vector>

#include "support/runner.cuh"

namespace {

using namespace lce_test;

/// lse_i, loss_i and dX_i = g·Σ_k (p_k − [k = y])·W_k of one row, in fp64 on the CPU, from the
/// device inputs (plain options, upstream 1: g = 1/n_valid for mean, 1 otherwise).
struct cpu_row {
  double lse = 0.0, loss = 0.0;
  std::vector<double> dx;
};

template <class Element>
cpu_row reference_row(const problem_data<Element>& data, const std::vector<Element>& w,
                      const std::vector<double>& bias, std::int64_t i) {
  const lce::problem& s = data.shape;
  std::vector<Element> xr(static_cast<std::size_t>(s.d));
  LCE_TEST_CUDA(cudaMemcpy(xr.data(), data.x.data() + i * s.x_stride(), xr.size() * sizeof(Element),
                           cudaMemcpyDeviceToHost));
  std::vector<double> x(xr.size());
  for (std::size_t j = 0; j < x.size(); ++j) x[j] = to_double(xr[j]);
  std::vector<double> z(static_cast<std::size_t>(s.v));
  double m = -INFINITY;
  for (std::int64_t k = 0; k < s.v; ++k) {
    const Element* wk = w.data() + k * s.w_stride();
    double acc = bias.empty() ? 0.0 : bias[static_cast<std::size_t>(k)];
    for (std::int64_t j = 0; j < s.d; ++j) acc += x[static_cast<std::size_t>(j)] * to_double(wk[j]);
    z[static_cast<std::size_t>(k)] = acc;
    m = std::max(m, acc);
  }
  double sum = 0.0;
  for (double value : z) sum += std::exp(value - m);
  cpu_row r;
  r.lse = m + std::log(sum);
  const std::int64_t y = data.h_targets[static_cast<std::size_t>(i)];
  r.dx.assign(static_cast<std::size_t>(s.d), 0.0);
  if (y == data.spec.ignore_index) return r;
  r.loss = r.lse - z[static_cast<std::size_t>(y)];
  const double g =
      data.spec.reduction == lce::reduction::mean ? 1.0 / static_cast<double>(data.n_valid) : 1.0;
  for (std::int64_t k = 0; k < s.v; ++k) {
    const double dz = g * (std::exp(z[static_cast<std::size_t>(k)] - r.lse) - (k == y ? 1.0 : 0.0));
    const Element* wk = w.data() + k * s.w_stride();
    for (std::int64_t j = 0; j < s.d; ++j)
      r.dx[static_cast<std::size_t>(j)] += dz * to_double(wk[j]);
  }
  return r;
}

double rel_l2(const std::vector<double>& a, const std::vector<double>& ref) {
  double e = 0.0, n = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    e += (a[i] - ref[i]) * (a[i] - ref[i]);
    n += ref[i] * ref[i];
  }
  return n > 0.0 ? std::sqrt(e / n) : std::sqrt(e);
}

/// Checks `rows` sampled rows of the library's and the GPU reference's lse, token loss and dX
/// (a forward_backward run) against the CPU reference.
template <class Element, class Grad>
void check_sampled_rows(const problem_data<Element>& data, run_outputs<Element, Grad>& out,
                        int rows) {
  const lce::problem& s = data.shape;
  const std::vector<Element> w = data.w.download();  // host copy in the element type
  std::vector<double> bias;
  if (data.spec.bias) bias = download_as_double(data.bias);
  const std::vector<float> lse = out.lse.download();
  const std::vector<float> token_loss = out.token_loss.download();
  const std::vector<double> ref_lse = data.ref_lse.download();
  for (int k = 0; k < rows; ++k) {
    // Spread over the rows, the last one included (the largest offsets).
    const std::int64_t i = rows == 1 ? s.n - 1 : (s.n - 1) * k / (rows - 1);
    const cpu_row r = reference_row(data, w, bias, i);
    const auto u = static_cast<std::size_t>(i);
    std::vector<Element> dx_row(static_cast<std::size_t>(s.d));
    LCE_TEST_CUDA(cudaMemcpy(dx_row.data(), out.dx.ptr() + i * s.dx_stride(),
                             dx_row.size() * sizeof(Element), cudaMemcpyDeviceToHost));
    std::vector<double> dx(dx_row.size());
    for (std::size_t j = 0; j < dx.size(); ++j) dx[j] = to_double(dx_row[j]);
    std::vector<double> ref_dx(static_cast<std::size_t>(s.d));
    LCE_TEST_CUDA(cudaMemcpy(ref_dx.data(), data.ref_dx.data() + i * s.d,
                             ref_dx.size() * sizeof(double), cudaMemcpyDeviceToHost));
    CAPTURE(i, r.lse, lse[u], ref_lse[u], r.loss, token_loss[u]);
    CHECK(rel_error(ref_lse[u], r.lse) <= 1e-12);  // the GPU reference
    CHECK(rel_error(lse[u], r.lse) <= loss_tolerance<Element>());
    CHECK(std::fabs(token_loss[u] - r.loss) <= loss_tolerance<Element>() * (1.0 + r.loss));
    CHECK(rel_l2(ref_dx, r.dx) <= 1e-10);
    CHECK(rel_l2(dx, r.dx) <= grad_tolerance<Element>());
  }
}

bool fits(double gigabytes) {
  std::size_t free = 0, total = 0;
  LCE_TEST_CUDA(cudaMemGetInfo(&free, &total));
  if (static_cast<double>(free) >= gigabytes * 1e9) return true;
  WARN("not enough device memory: " << free / 1e9 << " GB free, " << gigabytes << " GB needed");
  return false;
}

template <class Element>
void run_huge(const case_spec& spec, double gigabytes, int sampled_rows) {
  if (!fits(gigabytes)) return;
  problem_data<Element> data(spec, fresh_seed());
  data.use_unit_upstream();
  data.compute_reference(true);
  INFO(data.describe());
  REQUIRE(data.reference_on_gpu);
  gpu_context ctx;
  const std::size_t budget = lce::backward_options{}.memory_budget;
  {
    const run_spec how{op_kind::forward_backward, lce::backward_strategy::vocab_chunked, budget};
    run_outputs<Element, Element> out(data, how);
    LCE_TEST_REQUIRE_OK(run_op(data, how, ctx, out));
    check_run(data, how, out);
    check_sampled_rows(data, out, sampled_rows);
  }
  {
    const run_spec how{op_kind::forward_backward, lce::backward_strategy::row_chunked, budget};
    run_outputs<Element, float> out(data, how);
    LCE_TEST_REQUIRE_OK(run_op(data, how, ctx, out));
    check_run(data, how, out);
  }
  {
    const run_spec how{op_kind::forward};
    run_outputs<Element, Element> out(data, how);
    LCE_TEST_REQUIRE_OK(run_op(data, how, ctx, out));
    check_run(data, how, out);
  }
  std::printf("RESULT op=huge dtype=%s shape=%s nv=%.3g vd=%.3g nd=%.3g ok\n",
              element_name<Element>(), spec.shape_string().c_str(),
              static_cast<double>(spec.n) * static_cast<double>(spec.v),
              static_cast<double>(spec.v) * static_cast<double>(spec.d),
              static_cast<double>(spec.n) * static_cast<double>(spec.d));
  std::fflush(stdout);
}

}  // namespace

TEMPLATE_TEST_CASE("huge: n·v > 2^31 (16384 × 64 × 262144)", "[gpu][huge]", float, __nv_bfloat16) {
  // fp64 Z of the GPU reference: 34 GB.
  run_huge<TestType>(case_spec{16384, 64, 262144}, 40.0, 12);
}

TEST_CASE("huge: v·d > 2^31 (32 × 8192 × 262144, bf16)", "[gpu][huge]") {
  // W and dW in bf16 (4.3 GB each), fp32 dW (8.6 GB), fp64 W and dW of the reference (17 GB
  // each).
  run_huge<__nv_bfloat16>(case_spec{32, 8192, 262144}.no_bias(), 56.0, 2);
}

TEST_CASE("huge: n·d > 2^31 (262160 × 8192 × 256, bf16)", "[gpu][huge]") {
  // X and dX in bf16 (4.3 GB each), the fp32 dX accumulator (8.6 GB), fp64 X and dX of the
  // reference (17 GB each).
  run_huge<__nv_bfloat16>(case_spec{262160, 8192, 256}.sum().ignoring(0.0), 56.0, 3);
}
