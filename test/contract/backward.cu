// CPU contract tests of lce::backward: argument validation, strategy/Grad checks and the
// two-phase workspace protocol. No GPU: every call here returns before launching anything.
#include <functional>
#include <string>
#include <vector>

#include "contract/common.hpp"

namespace {

using lce_test::check_invalid;
using lce_test::check_success;
using lce_test::fake_handle;
using lce_test::fake_pointer;
using lce_test::fake_workspace;

template <class Element, class Grad>
lce::backward_args<Element, Grad> valid_backward_args() {
  lce::backward_args<Element, Grad> a;
  a.x = fake_pointer<const Element>(1);
  a.w = fake_pointer<const Element>(2);
  a.bias = fake_pointer<const Element>(3);
  a.targets = fake_pointer<const std::int64_t>(4);
  a.lse = fake_pointer<const float>(5);
  a.grad = fake_pointer<const float>(6);
  a.dx = fake_pointer<Element>(7);
  a.dw = fake_pointer<Grad>(8);
  a.db = fake_pointer<Grad>(9);
  return a;
}

struct backward_call {
  lce::problem shape{300, 72, 127, 0, 0, 0, 0};
  lce::loss_options options{};
  lce::backward_options bopt{};
  cublasHandle_t handle = fake_handle();
};

const lce::backward_strategy all_strategies[] = {lce::backward_strategy::automatic,
                                                 lce::backward_strategy::vocab_chunked,
                                                 lce::backward_strategy::row_chunked};

template <class Element, class Grad>
void check_size_query(const lce::problem& shape, std::size_t budget);

template <class Element, class Grad>
void check_size_queries() {
  const lce::problem shapes[] = {lce::problem{1, 16, 1}, lce::problem{7, 72, 3},
                                 lce::problem{300, 1000, 127, 1003, 1008, 1001, 1005},
                                 lce::problem{4097, 2304, 50257}, lce::problem{4097, 72, 128256}};
  for (const lce::problem& shape : shapes) {
    for (const std::size_t budget : {std::size_t{1} << 20, std::size_t{256} << 20}) {
      CAPTURE(shape.n, shape.d, shape.v, budget);
      check_size_query<Element, Grad>(shape, budget);
    }
  }
}

template <class Element, class Grad>
void check_size_query(const lce::problem& shape, std::size_t budget) {
  constexpr bool fp32_grad = std::is_same_v<Grad, float>;
  const lce::backward_args<Element, Grad> args = valid_backward_args<Element, Grad>();
  for (const lce::backward_strategy strategy : all_strategies) {
    CAPTURE(lce_test::strategy_name(strategy));
    lce::backward_options bopt;
    bopt.strategy = strategy;
    bopt.memory_budget = budget;
    std::size_t bytes = 12345;
    const cudaError_t status =
        lce::backward(nullptr, bytes, args, shape, lce::loss_options{}, bopt, fake_handle());
    if (strategy == lce::backward_strategy::row_chunked && !fp32_grad) {
      check_invalid(status, "strategy");
      continue;
    }
    check_success(status);
    CHECK(bytes > 0);
    CHECK(bytes == lce::backward_workspace_size<Element, Grad>(shape, bopt));
    // The budget bounds the workspace whenever one minimal chunk fits in it.
    if (budget >= (std::size_t{256} << 20)) CHECK(bytes <= budget);
    // A smaller budget never asks for more memory.
    lce::backward_options larger = bopt;
    larger.memory_budget = budget * 4;
    CHECK(lce::backward_workspace_size<Element, Grad>(shape, larger) >= bytes);

    std::size_t short_bytes = bytes - 1;
    check_invalid(lce::backward(fake_workspace(), short_bytes, args, shape, lce::loss_options{},
                                bopt, fake_handle()),
                  "workspace_bytes");
  }
}

template <class Element, class Grad>
void check_invalid_arguments() {
  struct invalid_case {
    const char* argument;
    std::function<void(lce::backward_args<Element, Grad>&, backward_call&)> mutate;
  };
  const std::vector<invalid_case> cases{
      {"shape.d", [](auto&, auto& c) { c.shape.d = 0; }},
      {"shape.v", [](auto&, auto& c) { c.shape.v = 0; }},
      {"shape.v", [](auto&, auto& c) { c.shape.v = -3; }},
      {"ldx", [](auto&, auto& c) { c.shape.ldx = c.shape.d - 1; }},
      {"ldw", [](auto&, auto& c) { c.shape.ldw = c.shape.d - 3; }},
      {"lddx", [](auto&, auto& c) { c.shape.lddx = c.shape.d - 1; }},
      {"lddw", [](auto&, auto& c) { c.shape.lddw = 1; }},
      {"args.x", [](auto& a, auto&) { a.x = nullptr; }},
      {"args.w", [](auto& a, auto&) { a.w = nullptr; }},
      {"args.targets", [](auto& a, auto&) { a.targets = nullptr; }},
      {"args.lse", [](auto& a, auto&) { a.lse = nullptr; }},
      {"handle", [](auto&, auto& c) { c.handle = nullptr; }},
      {"strategy stored", [](auto&, auto& c) { c.bopt.strategy = lce::backward_strategy::stored; }},
      {"reduction", [](auto&, auto& c) { c.options.reduction = static_cast<lce::reduction>(-1); }},
      {"strategy",
       [](auto&, auto& c) { c.bopt.strategy = static_cast<lce::backward_strategy>(9); }},
  };
  for (std::size_t i = 0; i < cases.size(); ++i) {
    const invalid_case& tc = cases[i];
    CAPTURE(i, tc.argument);
    lce::backward_args<Element, Grad> args = valid_backward_args<Element, Grad>();
    backward_call call;
    tc.mutate(args, call);
    std::size_t bytes = 0;
    check_invalid(
        lce::backward(nullptr, bytes, args, call.shape, call.options, call.bopt, call.handle),
        tc.argument);
    std::size_t ample = lce_test::unlimited_bytes;
    check_invalid(lce::backward(fake_workspace(), ample, args, call.shape, call.options, call.bopt,
                                call.handle),
                  tc.argument);
  }
}

}  // namespace

/// A tile configuration without an sm_90a part (the api.md example of a custom tile). Outside
/// the anonymous namespace: kernels on it have hidden visibility, which needs linkage.
struct mma_sync_only_config : lce::tile_config<128, 128, 32, 2, 4, 4> {};

// backward compiles and plans with it: its fused recompute is then never instantiated, the
// cuBLAS recompute runs.
TEMPLATE_TEST_CASE("backward with a Config without an sm_90a kernel: size query",
                   "[contract][backward][config]", float, __half, __nv_bfloat16) {
  const lce::problem shape{300, 72, 127};
  const lce::backward_args<TestType, float> args = valid_backward_args<TestType, float>();
  const lce::backward_options bopt;
  std::size_t bytes = 0;
  check_success(lce::backward<TestType, float, mma_sync_only_config>(
      nullptr, bytes, args, shape, lce::loss_options{}, bopt, fake_handle()));
  CHECK(bytes == (lce::backward_workspace_size<TestType, float>(shape, bopt)));
  const lce::backward_choice c =
      lce::choose_backward<TestType, float, mma_sync_only_config>(shape, bopt);
  CHECK_FALSE(c.fused_recompute);
  std::size_t short_bytes = bytes - 1;
  check_invalid(
      lce::backward<TestType, float, mma_sync_only_config>(
          fake_workspace(), short_bytes, args, shape, lce::loss_options{}, bopt, fake_handle()),
      "workspace_bytes");
}

TEMPLATE_TEST_CASE("backward size query: launches nothing, matches backward_workspace_size",
                   "[contract][backward]", float, __half, __nv_bfloat16) {
  SECTION("Grad = Element") { check_size_queries<TestType, TestType>(); }
  SECTION("Grad = float") { check_size_queries<TestType, float>(); }
}

TEMPLATE_TEST_CASE("backward rejects invalid arguments by name", "[contract][backward]", float,
                   __half, __nv_bfloat16) {
  SECTION("Grad = Element") { check_invalid_arguments<TestType, TestType>(); }
  SECTION("Grad = float") { check_invalid_arguments<TestType, float>(); }
}

TEMPLATE_TEST_CASE("backward: row_chunked needs fp32 dW/db", "[contract][backward]", float, __half,
                   __nv_bfloat16) {
  const lce::problem shape{300, 72, 127};
  lce::backward_options bopt;
  bopt.strategy = lce::backward_strategy::row_chunked;
  std::size_t bytes = 0;
  const auto float_args = valid_backward_args<TestType, float>();
  check_success(lce::backward(nullptr, bytes, float_args, shape, {}, bopt, fake_handle()));
  const auto same_args = valid_backward_args<TestType, TestType>();
  const cudaError_t status =
      lce::backward(nullptr, bytes, same_args, shape, {}, bopt, fake_handle());
  if constexpr (std::is_same_v<TestType, float>) {
    check_success(status);
  } else {
    check_invalid(status, "strategy");
    std::size_t ample = lce_test::unlimited_bytes;
    check_invalid(lce::backward(fake_workspace(), ample, same_args, shape, {}, bopt, fake_handle()),
                  "strategy");
  }
}

TEMPLATE_TEST_CASE("backward: null handle is rejected even for a size query",
                   "[contract][backward]", float, __half, __nv_bfloat16) {
  const auto args = valid_backward_args<TestType, TestType>();
  std::size_t bytes = 0;
  check_invalid(lce::backward(nullptr, bytes, args, lce::problem{7, 72, 3}, {}, {}, nullptr),
                "handle");
}

TEMPLATE_TEST_CASE("backward with no gradient requested enqueues nothing", "[contract][backward]",
                   float, __half, __nv_bfloat16) {
  // dx, dw and db are each optional; with none of them there is nothing to launch (this runs
  // without a GPU, so a launch or a cuBLAS call on the fake handle would fail or crash).
  auto args = valid_backward_args<TestType, TestType>();
  args.dx = nullptr;
  args.dw = nullptr;
  args.db = nullptr;
  std::size_t ample = lce_test::unlimited_bytes;
  check_success(
      lce::backward(fake_workspace(), ample, args, lce::problem{7, 72, 3}, {}, {}, fake_handle()));
}

namespace {

template <class Element, class Grad>
void check_invalid_options() {
  const lce::problem shape{300, 72, 127};
  for (const bool weighted : {false, true}) {
    lce::backward_args<Element, Grad> args = valid_backward_args<Element, Grad>();
    if (weighted) args.class_weight = fake_pointer<const float>(10);
    for (const lce_test::invalid_option& tc : lce_test::invalid_loss_options()) {
      for (const lce::backward_strategy strategy : all_strategies) {
        if (strategy == lce::backward_strategy::row_chunked && !std::is_same_v<Grad, float>)
          continue;
        CAPTURE(weighted, tc.argument, lce_test::describe(tc.options),
                lce_test::strategy_name(strategy));
        lce::backward_options bopt;
        bopt.strategy = strategy;
        std::size_t bytes = 0;
        check_invalid(lce::backward(nullptr, bytes, args, shape, tc.options, bopt, fake_handle()),
                      tc.argument);
        std::size_t ample = lce_test::unlimited_bytes;
        check_invalid(
            lce::backward(fake_workspace(), ample, args, shape, tc.options, bopt, fake_handle()),
            tc.argument);
      }
    }
  }
}

template <class Element, class Grad>
void check_valid_options() {
  const lce::problem shape{300, 72, 127};
  for (const bool weighted : {false, true}) {
    lce::backward_args<Element, Grad> args = valid_backward_args<Element, Grad>();
    if (weighted) args.class_weight = fake_pointer<const float>(10);
    for (const lce::loss_options& options : lce_test::valid_loss_options()) {
      for (const lce::backward_strategy strategy : all_strategies) {
        if (strategy == lce::backward_strategy::row_chunked && !std::is_same_v<Grad, float>)
          continue;
        CAPTURE(weighted, lce_test::describe(options), lce_test::strategy_name(strategy));
        lce::backward_options bopt;
        bopt.strategy = strategy;
        std::size_t bytes = 0;
        check_success(lce::backward(nullptr, bytes, args, shape, options, bopt, fake_handle()));
        CHECK(bytes > 0);
        CHECK(bytes <= bopt.memory_budget);
      }
    }
  }
}

}  // namespace

TEMPLATE_TEST_CASE("backward rejects invalid loss options by name", "[contract][backward][options]",
                   float, __half, __nv_bfloat16) {
  SECTION("Grad = Element") { check_invalid_options<TestType, TestType>(); }
  SECTION("Grad = float") { check_invalid_options<TestType, float>(); }
}

TEMPLATE_TEST_CASE("backward accepts valid loss options and class weights",
                   "[contract][backward][options]", float, __half, __nv_bfloat16) {
  SECTION("Grad = Element") { check_valid_options<TestType, TestType>(); }
  SECTION("Grad = float") { check_valid_options<TestType, float>(); }
}

// The fp32 dX accumulator of vocab_chunked is n·d·4 bytes: at large n it alone exceeds the
// default budget. It must not squeeze the vocabulary chunk to one granule (every chunk reads
// and rewrites the accumulator: at 8 × 4096 tokens of Llama 3 that made the backward 2.7× the
// GEMMs); it takes an allowance of its own instead, reported by choose_backward.
TEMPLATE_TEST_CASE(
    "backward plan: the dX accumulator never narrows the vocabulary chunk below "
    "min_vocab_chunk columns",
    "[contract][backward][plan]", __half, __nv_bfloat16) {
  const lce::backward_options bopt{lce::backward_strategy::automatic,
                                   lce::backward_options{}.memory_budget};
  const std::int64_t d = 4096, v = 128256;  // Llama 3 head
  std::int64_t previous_chunk = 0;
  for (const std::int64_t n : {std::int64_t{2048}, std::int64_t{8192}, std::int64_t{16384},
                               std::int64_t{32768}, std::int64_t{65536}}) {
    CAPTURE(n);
    const lce::problem shape{n, d, v};
    const lce::backward_choice c = lce::choose_backward<TestType, TestType>(shape, bopt);
    CHECK(c.strategy == lce::backward_strategy::vocab_chunked);
    const std::size_t accumulator = static_cast<std::size_t>(n * d) * 4;
    CHECK(c.accumulator_bytes == accumulator);
    // What the whole budget holds of fp32 columns of all rows, in whole granules; the plan may
    // get one granule less (the budget also holds the loss scalars and a column of ones).
    const std::int64_t budget_cols =
        static_cast<std::int64_t>(bopt.memory_budget / (static_cast<std::size_t>(n) * 4)) /
        lce::device::vocab_chunk_granule * lce::device::vocab_chunk_granule;
    CHECK(c.chunk >= std::min(lce::device::min_vocab_chunk,
                              std::max(budget_cols - lce::device::vocab_chunk_granule, d)));
    CHECK(c.chunk % lce::device::vocab_chunk_granule == 0);
    // The chunk buffer is never larger than the larger of the budget and the accumulator.
    const std::size_t chunk_bytes = static_cast<std::size_t>(n * c.chunk) * 4;
    CHECK(chunk_bytes <= std::max<std::size_t>(bopt.memory_budget, accumulator));
    CHECK(c.workspace_bytes >= chunk_bytes + accumulator);
    CHECK(c.workspace_bytes - accumulator - chunk_bytes < (std::size_t{1} << 20));
    if (accumulator + static_cast<std::size_t>(n * lce::device::min_vocab_chunk) * 4 <=
        bopt.memory_budget) {
      CHECK(c.workspace_bytes <= bopt.memory_budget);  // the accumulator fits beside the chunk
    }
    CHECK(lce::backward_workspace_size<TestType, TestType>(shape, bopt) == c.workspace_bytes);
    if (previous_chunk != 0) CHECK(c.chunk <= previous_chunk);
    previous_chunk = c.chunk;
  }
  // fp32 inputs accumulate dX in the caller's buffer: nothing of the kind in the workspace.
  const lce::backward_choice f = lce::choose_backward<float, float>(
      lce::problem{32768, 4096, 128256},
      lce::backward_options{lce::backward_strategy::vocab_chunked, bopt.memory_budget});
  CHECK(f.accumulator_bytes == 0);
  CHECK(f.workspace_bytes <= bopt.memory_budget);
}

// choose_backward says which kernel recomputes the chunks: never the sm_90a one in this binary
// (PTX for compute_80 only), for a reason it names; the GPU suites check the sm_90a case.
TEST_CASE("choose_backward: the recompute kernel and why", "[contract][backward][choice]") {
  const lce::problem shape{8192, 4096, 128256};
  const auto says = [](const char* reason, const char* words) {
    return std::string(reason).find(words) != std::string::npos;
  };
  const lce::backward_choice f = lce::choose_backward<float, float>(shape);
  CHECK_FALSE(f.fused_recompute);
  CHECK(says(f.reason, "fp32"));
  for (const bool bias : {false, true}) {
    const lce::backward_choice b =
        lce::choose_backward<__nv_bfloat16, __nv_bfloat16>(shape, lce::backward_options{}, bias);
    CHECK_FALSE(b.fused_recompute);
    CHECK(says(b.reason, "compute capability 9.0"));
    CHECK(b.strategy == lce::backward_strategy::vocab_chunked);
  }
  lce::problem strided = shape;
  strided.ldw = 4097;
  CHECK(says(lce::choose_backward<__half>(strided).reason, "multiple of 16 bytes"));
  // forward_backward's one-pass row_chunked recomputes through cuBLAS whatever the device.
  lce::backward_options rows;
  rows.strategy = lce::backward_strategy::row_chunked;
  rows.memory_budget = std::size_t{1} << 30;
  const lce::backward_choice r = lce::choose_forward_backward<__nv_bfloat16, float>(shape, rows);
  CHECK(r.strategy == lce::backward_strategy::row_chunked);
  CHECK_FALSE(r.fused_recompute);
  CHECK(says(r.reason, "one pass"));
}

TEST_CASE("to_string names every backward_strategy", "[contract][options]") {
  CHECK(std::string(lce::to_string(lce::backward_strategy::automatic)) == "automatic");
  CHECK(std::string(lce::to_string(lce::backward_strategy::vocab_chunked)) == "vocab_chunked");
  CHECK(std::string(lce::to_string(lce::backward_strategy::row_chunked)) == "row_chunked");
  CHECK(std::string(lce::to_string(lce::backward_strategy::stored)) == "stored");
  CHECK(std::string(lce::to_string(static_cast<lce::backward_strategy>(7))) == "unknown");
  static_assert(lce::to_string(lce::backward_strategy::stored)[0] == 's');
}

// vocab_chunked's chunk widths (device::balanced_chunk): as many chunks as the cap needs, none
// wider than it, every one but the last a multiple of the tile, together exactly the total;
// Llama 3's head at n = 8192 (a cap of 31 tiles of 256) in 16 chunks of 30 tiles and one of 21.
TEST_CASE("vocab_chunked: chunk widths balanced under the cap", "[contract][backward]") {
  using lce::device::balanced_chunk;
  for (const std::int64_t total : {1, 100, 255, 256, 257, 4097, 32000, 128256, 151936, 256000}) {
    for (const std::int64_t cap : {128, 256, 2048, 4096, 7936, 16384}) {
      for (const std::int64_t multiple : {128, 256}) {
        if (cap % multiple != 0) continue;  // the precondition
        CAPTURE(total, cap, multiple);
        const std::int64_t w = balanced_chunk(total, cap, multiple);
        const std::int64_t chunks = (total + cap - 1) / cap;
        CHECK(w >= 1);
        CHECK(w <= cap);
        CHECK((total + w - 1) / w == chunks);
        if (chunks > 1) CHECK(w % multiple == 0);
      }
    }
  }
  CHECK(balanced_chunk(128256, 7936, 256) == 30 * 256);
  CHECK(128256 - 16 * 30 * 256 == 21 * 256);
}
