// GPU test of the fp64 GPU reference (support/gpu_reference.cuh) against the fp64 CPU
// reference: the large-shape tests trust it, so it is checked here on small and odd shapes.
#include <vector>

#include "support/harness.cuh"

namespace {

using namespace lce_test;

/// C = A·B on the host with the same stride convention as gpu_dgemm.
std::vector<double> host_gemm(std::int64_t m, std::int64_t n, std::int64_t k,
                              const std::vector<double>& a, std::int64_t a_i, std::int64_t a_k,
                              const std::vector<double>& b, std::int64_t b_k, std::int64_t b_j) {
  std::vector<double> c(static_cast<std::size_t>(m * n), 0.0);
  for (std::int64_t i = 0; i < m; ++i) {
    for (std::int64_t j = 0; j < n; ++j) {
      double acc = 0.0;
      for (std::int64_t p = 0; p < k; ++p) {
        acc += a[static_cast<std::size_t>(i * a_i + p * a_k)] *
               b[static_cast<std::size_t>(p * b_k + j * b_j)];
      }
      c[static_cast<std::size_t>(i * n + j)] = acc;
    }
  }
  return c;
}

}  // namespace

TEST_CASE("gpu_dgemm matches a host GEMM for every transpose and odd sizes", "[gpu][reference]") {
  const std::uint64_t seed = fresh_seed();
  CAPTURE(seed);
  random_source rng(seed);
  struct dims {
    std::int64_t m, n, k;
  };
  const auto s = GENERATE(dims{1, 1, 1}, dims{1, 7, 3}, dims{65, 130, 17}, dims{129, 3, 200},
                          dims{64, 64, 16}, dims{200, 257, 1});
  const bool a_t = GENERATE(false, true);
  const bool b_t = GENERATE(false, true);
  CAPTURE(s.m, s.n, s.k, a_t, b_t);
  const std::vector<double> a = rng.normals(static_cast<std::size_t>(s.m * s.k));
  const std::vector<double> b = rng.normals(static_cast<std::size_t>(s.k * s.n));
  // A stored [m, k] (a_i = k, a_k = 1) or transposed [k, m] (a_i = 1, a_k = m); same for B.
  const std::int64_t a_i = a_t ? 1 : s.k;
  const std::int64_t a_k = a_t ? s.m : 1;
  const std::int64_t b_k = b_t ? 1 : s.n;
  const std::int64_t b_j = b_t ? s.k : 1;
  const std::vector<double> expected = host_gemm(s.m, s.n, s.k, a, a_i, a_k, b, b_k, b_j);
  const device_buffer<double> d_a(a);
  const device_buffer<double> d_b(b);
  device_buffer<double> d_c(static_cast<std::size_t>(s.m * s.n));
  d_c.poison();
  gpu_dgemm(s.m, s.n, s.k, d_a.data(), a_i, a_k, d_b.data(), b_k, b_j, d_c.data(), s.n);
  const std::vector<double> got = d_c.download();
  CHECK(all_finite(got));
  CHECK(rel_frobenius(got, expected) <= reference_tolerance);
}

TEMPLATE_TEST_CASE("the GPU fp64 reference matches the CPU fp64 reference", "[gpu][reference]",
                   float, __half, __nv_bfloat16) {
  const case_spec spec = GENERATE(
      case_spec{1, 16, 1}, case_spec{7, 72, 3}.no_bias().sum(),
      case_spec{65, 130, 257}.none().padded(8, 3, 0, 0), case_spec{300, 1000, 127}.ignore_id(2),
      case_spec{130, 72, 1000}.ignoring(1.0), case_spec{4097, 16, 300}.scaled(20.0).sum());
  problem_data<TestType> data(spec, fresh_seed());
  INFO(data.describe());

  data.compute_reference(true);
  REQUIRE_FALSE(data.reference_on_gpu);
  const double cpu_loss = data.ref_loss;
  const std::vector<double> lse = data.ref_lse.download();
  const std::vector<double> token_loss = data.ref_token_loss.download();
  const std::vector<double> dx = data.ref_dx.download();
  const std::vector<double> dw = data.ref_dw.download();
  const std::vector<double> db = data.ref_db.download();

  data.compute_reference(true, true);
  REQUIRE(data.reference_on_gpu);
  CHECK(rel_error(data.ref_loss, cpu_loss) <= reference_tolerance);
  CHECK(rel_frobenius(data.ref_lse.download(), lse) <= reference_tolerance);
  CHECK(rel_frobenius(data.ref_token_loss.download(), token_loss) <= reference_tolerance);
  CHECK(rel_frobenius(data.ref_dx.download(), dx) <= reference_tolerance);
  CHECK(rel_frobenius(data.ref_dw.download(), dw) <= reference_tolerance);
  CHECK(rel_frobenius(data.ref_db.download(), db) <= reference_tolerance);
  CHECK(all_finite(data.ref_dx.download()));
  CHECK(all_finite(data.ref_dw.download()));
}
