// CPU contract tests of the vocabulary-parallel layer (lce/nccl/vocab_parallel.cuh): argument
// validation in the documented order, the messages that name the bad argument, the workspace
// sizes and the communication volume. No GPU and no communicator: every call under test returns
// before it needs one (a null communicator is the last argument checked before the device).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <lce/nccl/vocab_parallel.cuh>

#include "contract/common.hpp"

namespace {

using lce_test::check_invalid;
using lce_test::fake_handle;
using lce_test::fake_pointer;
using lce_test::fake_workspace;
using lce_test::unlimited_bytes;

template <class Element>
lce::forward_args<Element> forward_args() {
  lce::forward_args<Element> a;
  a.x = fake_pointer<const Element>(1);
  a.w = fake_pointer<const Element>(2);
  a.targets = fake_pointer<const std::int64_t>(3);
  a.loss = fake_pointer<float>(4);
  a.lse = fake_pointer<float>(5);
  return a;
}

template <class Element, class Grad>
lce::backward_args<Element, Grad> backward_args() {
  lce::backward_args<Element, Grad> a;
  a.x = fake_pointer<const Element>(1);
  a.w = fake_pointer<const Element>(2);
  a.targets = fake_pointer<const std::int64_t>(3);
  a.lse = fake_pointer<const float>(5);
  a.dx = fake_pointer<Element>(6);
  a.dw = fake_pointer<Grad>(7);
  return a;
}

template <class Element, class Grad>
lce::forward_backward_args<Element, Grad> forward_backward_args() {
  lce::forward_backward_args<Element, Grad> a;
  a.x = fake_pointer<const Element>(1);
  a.w = fake_pointer<const Element>(2);
  a.targets = fake_pointer<const std::int64_t>(3);
  a.loss = fake_pointer<float>(4);
  a.dx = fake_pointer<Element>(6);
  a.dw = fake_pointer<Grad>(7);
  return a;
}

const lce::problem shape{300, 72, 1000};

lce::nccl::vocab_shard shard(std::int64_t begin, std::int64_t end) {
  lce::nccl::vocab_shard s;
  s.v_begin = begin;
  s.v_end = end;
  return s;  // comm null: the calls that pass every other check fail on it
}

/// Runs the three launchers (size query and launch) with `s`, `o` and checks each names `what`.
template <class Element>
void check_all_invalid(const lce::problem& p, const lce::nccl::vocab_shard& s,
                       const lce::loss_options& o, const std::string& what) {
  const lce::backward_options bopt{};
  for (void* ws : {static_cast<void*>(nullptr), fake_workspace()}) {
    std::size_t bytes = unlimited_bytes;
    check_invalid(lce::nccl::forward<Element>(ws, bytes, forward_args<Element>(), p, s, o), what);
    check_invalid(lce::nccl::backward<Element, Element>(
                      ws, bytes, backward_args<Element, Element>(), p, s, o, bopt, fake_handle()),
                  what);
    check_invalid(
        lce::nccl::forward_backward<Element, float>(
            ws, bytes, forward_backward_args<Element, float>(), p, s, o, bopt, fake_handle()),
        what);
  }
}

}  // namespace

/// A tile configuration without an sm_90a part (the api.md example of a custom tile). Outside
/// the anonymous namespace: kernels on it have hidden visibility, which needs linkage.
struct mma_sync_only_config : lce::tile_config<128, 128, 32, 2, 4, 4> {};

// Every launcher compiles with it (its fused recompute is then never instantiated) and checks
// its arguments as with the default.
TEMPLATE_TEST_CASE("nccl contract: a Config without an sm_90a kernel", "[nccl][contract][config]",
                   float, __half, __nv_bfloat16) {
  const lce::backward_options bopt{};
  const lce::nccl::vocab_shard s = shard(-1, 10);
  for (void* ws : {static_cast<void*>(nullptr), fake_workspace()}) {
    std::size_t bytes = unlimited_bytes;
    check_invalid(lce::nccl::forward<TestType, mma_sync_only_config>(
                      ws, bytes, forward_args<TestType>(), shape, s, {}),
                  "shard.v_begin");
    check_invalid(
        lce::nccl::backward<TestType, TestType, mma_sync_only_config>(
            ws, bytes, backward_args<TestType, TestType>(), shape, s, {}, bopt, fake_handle()),
        "shard.v_begin");
    check_invalid(
        lce::nccl::forward_backward<TestType, float, mma_sync_only_config>(
            ws, bytes, forward_backward_args<TestType, float>(), shape, s, {}, bopt, fake_handle()),
        "shard.v_begin");
  }
}

TEMPLATE_TEST_CASE("nccl contract: a bad shard is named", "[nccl][contract]", float, __half,
                   __nv_bfloat16) {
  check_all_invalid<TestType>(shape, shard(-1, 10), {}, "shard.v_begin");
  check_all_invalid<TestType>(shape, shard(10, 10), {}, "shard.v_begin");
  check_all_invalid<TestType>(shape, shard(20, 10), {}, "shard.v_begin");
  check_all_invalid<TestType>(shape, shard(500, 1001), {}, "shard.v_end");
  lce::nccl::vocab_shard bad_dx = shard(0, 500);
  bad_dx.dx = static_cast<lce::nccl::dx_reduction>(7);
  check_all_invalid<TestType>(shape, bad_dx, {}, "shard.dx");
}

TEMPLATE_TEST_CASE("nccl contract: checks run in order: shape, shard, options, args, comm",
                   "[nccl][contract]", float, __half, __nv_bfloat16) {
  lce::loss_options bad_options;
  bad_options.label_smoothing = 2.0f;
  // The shape is checked first, with the global vocabulary size.
  check_all_invalid<TestType>(lce::problem{300, 0, 1000}, shard(-1, 10), bad_options, "shape.d");
  check_all_invalid<TestType>(lce::problem{300, 72, 1000, 10}, shard(0, 10), {}, "shape.ldx");
  check_all_invalid<TestType>(shape, shard(-1, 10), bad_options, "shard.v_begin");
  check_all_invalid<TestType>(shape, shard(0, 10), bad_options, "options.label_smoothing");
  // Everything valid but the communicator.
  check_all_invalid<TestType>(shape, shard(0, 10), {}, "shard.comm");
  check_all_invalid<TestType>(shape, shard(990, 1000), {}, "shard.comm");
}

TEST_CASE("nccl contract: null arguments are named before the communicator", "[nccl][contract]") {
  using bf16 = __nv_bfloat16;
  const lce::nccl::vocab_shard s = shard(100, 400);
  std::size_t bytes = 0;
  auto fa = forward_args<bf16>();
  fa.w = nullptr;
  check_invalid(lce::nccl::forward<bf16>(nullptr, bytes, fa, shape, s, {}), "args.w");
  fa = forward_args<bf16>();
  fa.loss = nullptr;
  check_invalid(lce::nccl::forward<bf16>(nullptr, bytes, fa, shape, s, {}), "args.loss");
  auto ba = backward_args<bf16, float>();
  ba.lse = nullptr;
  check_invalid(lce::nccl::backward(nullptr, bytes, ba, shape, s, {}, {}, fake_handle()),
                "args.lse");
  check_invalid(
      lce::nccl::backward(nullptr, bytes, backward_args<bf16, bf16>(), shape, s, {}, {}, nullptr),
      "handle");
  lce::backward_options row_chunked;
  row_chunked.strategy = lce::backward_strategy::row_chunked;
  check_invalid(lce::nccl::backward(nullptr, bytes, backward_args<bf16, bf16>(), shape, s, {},
                                    row_chunked, fake_handle()),
                "row_chunked");
  check_invalid(lce::nccl::forward_backward(nullptr, bytes, forward_backward_args<bf16, bf16>(),
                                            shape, s, {}, {}, nullptr),
                "handle");
}

TEMPLATE_TEST_CASE("nccl contract: workspace sizes are those of the shard's problem",
                   "[nccl][contract]", float, __half, __nv_bfloat16) {
  using Element = TestType;
  const lce::problem big{8192, 2304, 256000};
  for (const std::int64_t rows : {std::int64_t{1}, std::int64_t{127}, std::int64_t{64000},
                                  std::int64_t{128000}, std::int64_t{256000}}) {
    CAPTURE(rows);
    lce::problem local = big;
    local.v = rows;
    const lce::nccl::vocab_shard first = shard(0, rows);
    const lce::nccl::vocab_shard last = shard(big.v - rows, big.v);
    const std::size_t fwd = lce::nccl::forward_workspace_size<Element>(big, first);
    // A pure function of the shard's size, not of its position.
    CHECK(fwd == lce::nccl::forward_workspace_size<Element>(big, last));
    // The core forward's for the shard, plus 28 B per row (and alignment) for the combine.
    const std::size_t core_fwd = lce::forward_workspace_size<Element>(local);
    CHECK(fwd >= core_fwd + 28 * static_cast<std::size_t>(big.n));
    CHECK(fwd <= core_fwd + 28 * static_cast<std::size_t>(big.n) + 3 * 256);
    for (const std::size_t budget : {std::size_t{1} << 20, std::size_t{256} << 20}) {
      lce::backward_options bopt;
      bopt.memory_budget = budget;
      const std::size_t bwd = lce::nccl::backward_workspace_size<Element>(big, first, bopt);
      CHECK(bwd == lce::nccl::backward_workspace_size<Element>(big, last, bopt));
      // The partial dX [n, d] fp32 is always there; for 16-bit elements it is the core's own
      // accumulator (vocab_chunked), so the size is the core's.
      const std::size_t core_bwd = lce::backward_workspace_size<Element>(local, bopt);
      if constexpr (std::is_same_v<Element, float>) {
        CHECK(bwd >= static_cast<std::size_t>(big.n * big.d) * 4);
      } else {
        CHECK(bwd == core_bwd);
      }
      const std::size_t fb = lce::nccl::forward_backward_workspace_size<Element>(big, first, bopt);
      CHECK(fb >= fwd + bwd + 4 * static_cast<std::size_t>(big.n));
      CHECK(fb <= fwd + bwd + 4 * static_cast<std::size_t>(big.n) + 2 * 256);
    }
  }
}

// With a budget far above a shard's stored values, stored asks for those values (and the fp32
// partial dX), not for the budget: its chunked fallback runs in that space. A call with a bias
// or class weights cannot store; told so, the size query plans the chunked strategy in the
// whole budget.
TEST_CASE("nccl contract: stored's workspace is its values, not the budget", "[nccl][contract]") {
  const lce::problem big{8192, 4096, 128256};
  const lce::nccl::vocab_shard half = shard(0, 64128);
  const std::size_t values = std::size_t{8192} * 64128 * 2 + std::size_t{8192} * 4096 * 4;
  lce::backward_options bopt;
  bopt.memory_budget = std::size_t{4} << 30;
  const std::size_t stored =
      lce::nccl::forward_backward_workspace_size<__nv_bfloat16>(big, half, bopt);
  CHECK(stored >= values);
  CHECK(stored < values + (std::size_t{64} << 20));
  const std::size_t chunked =
      lce::nccl::forward_backward_workspace_size<__nv_bfloat16>(big, half, bopt, true);
  CHECK(chunked > stored);
  CHECK(chunked <= bopt.memory_budget + (std::size_t{256} << 20));
}

TEST_CASE("nccl contract: the forward communicates 3 floats per row without options",
          "[nccl][contract]") {
  using bf16 = __nv_bfloat16;
  const lce::problem gemma{8192, 2304, 256000};
  lce::forward_args<bf16> a = forward_args<bf16>();
  lce::loss_options o;
  CHECK(lce::nccl::communication_bytes(a, gemma, o).forward_bytes_per_row == 12);
  CHECK(lce::nccl::communication_bytes(a, gemma, o).backward_bytes_per_row == 4 * 2304);
  o.z_loss = 1e-4f;  // z-loss, class weights, softcap, temperature: nothing more
  o.softcap = 30.0f;
  a.class_weight = fake_pointer<const float>(9);
  a.token_loss = fake_pointer<float>(10);
  a.target_logprob = fake_pointer<float>(11);
  CHECK(lce::nccl::communication_bytes(a, gemma, o).forward_bytes_per_row == 12);
  o.label_smoothing = 0.1f;  // Σ w·z
  CHECK(lce::nccl::communication_bytes(a, gemma, o).forward_bytes_per_row == 16);
  a.entropy = fake_pointer<float>(12);  // Σ p·z
  CHECK(lce::nccl::communication_bytes(a, gemma, o).forward_bytes_per_row == 20);
  a.correct = fake_pointer<std::int64_t>(13);  // the int64 argmax candidate
  CHECK(lce::nccl::communication_bytes(a, gemma, o).forward_bytes_per_row == 28);
}
