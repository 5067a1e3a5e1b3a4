// CPU contract tests of lce::forward_backward: argument validation and the two-phase
// workspace protocol. No GPU: every call here returns before launching anything.
#include <functional>
#include <vector>

#include "contract/common.hpp"

namespace {

using lce_test::check_invalid;
using lce_test::check_success;
using lce_test::fake_handle;
using lce_test::fake_pointer;
using lce_test::fake_workspace;

template <class Element, class Grad>
lce::forward_backward_args<Element, Grad> valid_forward_backward_args() {
  lce::forward_backward_args<Element, Grad> a;
  a.x = fake_pointer<const Element>(1);
  a.w = fake_pointer<const Element>(2);
  a.bias = fake_pointer<const Element>(3);
  a.targets = fake_pointer<const std::int64_t>(4);
  a.loss = fake_pointer<float>(5);
  a.token_loss = fake_pointer<float>(6);
  a.lse = fake_pointer<float>(7);
  a.dx = fake_pointer<Element>(8);
  a.dw = fake_pointer<Grad>(9);
  a.db = fake_pointer<Grad>(10);
  return a;
}

struct call_state {
  lce::problem shape{300, 72, 127};
  lce::loss_options options{};
  lce::backward_options bopt{};
  cublasHandle_t handle = fake_handle();
};

template <class Element, class Grad>
void check_size_query(const lce::problem& shape, lce::backward_strategy strategy) {
  constexpr bool fp32_grad = std::is_same_v<Grad, float>;
  CAPTURE(shape.n, shape.d, shape.v, lce_test::strategy_name(strategy));
  const auto args = valid_forward_backward_args<Element, Grad>();
  lce::backward_options bopt;
  bopt.strategy = strategy;
  std::size_t bytes = 12345;
  const cudaError_t status =
      lce::forward_backward(nullptr, bytes, args, shape, lce::loss_options{}, bopt, fake_handle());
  if (strategy == lce::backward_strategy::row_chunked && !fp32_grad) {
    check_invalid(status, "strategy");
    return;
  }
  check_success(status);
  const bool bias_or_weights = args.bias != nullptr || args.class_weight != nullptr;
  CHECK(bytes == lce::forward_backward_workspace_size<Element, Grad>(shape, bopt, bias_or_weights));
  // Without the bias, the query without the flag.
  auto plain = args;
  plain.bias = nullptr;
  std::size_t plain_bytes = 0;
  check_success(lce::forward_backward(nullptr, plain_bytes, plain, shape, lce::loss_options{}, bopt,
                                      fake_handle()));
  CHECK(plain_bytes == lce::forward_backward_workspace_size<Element, Grad>(shape, bopt));
  // It holds the forward's and the backward's workspaces (and n floats of lse).
  CHECK(bytes >= lce::forward_workspace_size<Element>(shape));
  CHECK(bytes >= lce::backward_workspace_size<Element, Grad>(shape, bopt));
  std::size_t short_bytes = bytes - 1;
  check_invalid(lce::forward_backward(fake_workspace(), short_bytes, args, shape,
                                      lce::loss_options{}, bopt, fake_handle()),
                "workspace_bytes");
}

template <class Element, class Grad>
void check_invalid_arguments() {
  struct invalid_case {
    const char* argument;
    std::function<void(lce::forward_backward_args<Element, Grad>&, call_state&)> mutate;
  };
  const std::vector<invalid_case> cases{
      {"shape.d", [](auto&, auto& c) { c.shape.d = -4; }},
      {"shape.v", [](auto&, auto& c) { c.shape.v = 0; }},
      {"ldx", [](auto&, auto& c) { c.shape.ldx = 3; }},
      {"ldw", [](auto&, auto& c) { c.shape.ldw = c.shape.d - 1; }},
      {"lddx", [](auto&, auto& c) { c.shape.lddx = c.shape.d - 1; }},
      {"lddw", [](auto&, auto& c) { c.shape.lddw = c.shape.d - 1; }},
      {"args.x", [](auto& a, auto&) { a.x = nullptr; }},
      {"args.w", [](auto& a, auto&) { a.w = nullptr; }},
      {"args.targets", [](auto& a, auto&) { a.targets = nullptr; }},
      {"args.loss", [](auto& a, auto&) { a.loss = nullptr; }},
      {"args.token_loss",
       [](auto& a, auto& c) {
         a.token_loss = nullptr;
         c.options.reduction = lce::reduction::none;
       }},
      {"handle", [](auto&, auto& c) { c.handle = nullptr; }},
      {"strategy",
       [](auto&, auto& c) { c.bopt.strategy = static_cast<lce::backward_strategy>(4); }},
  };
  for (std::size_t i = 0; i < cases.size(); ++i) {
    const invalid_case& tc = cases[i];
    CAPTURE(i, tc.argument);
    auto args = valid_forward_backward_args<Element, Grad>();
    call_state call;
    tc.mutate(args, call);
    std::size_t bytes = 0;
    check_invalid(lce::forward_backward(nullptr, bytes, args, call.shape, call.options, call.bopt,
                                        call.handle),
                  tc.argument);
    std::size_t ample = lce_test::unlimited_bytes;
    check_invalid(lce::forward_backward(fake_workspace(), ample, args, call.shape, call.options,
                                        call.bopt, call.handle),
                  tc.argument);
  }
}

}  // namespace

TEMPLATE_TEST_CASE("forward_backward size query: launches nothing, matches the size function",
                   "[contract][forward_backward]", float, __half, __nv_bfloat16) {
  const lce::problem shapes[] = {lce::problem{1, 16, 1}, lce::problem{7, 72, 3, 80, 75, 81, 77},
                                 lce::problem{4097, 2304, 50257}, lce::problem{300, 1000, 128256}};
  for (const lce::problem& shape : shapes) {
    for (const auto strategy :
         {lce::backward_strategy::automatic, lce::backward_strategy::vocab_chunked,
          lce::backward_strategy::row_chunked}) {
      check_size_query<TestType, TestType>(shape, strategy);
      check_size_query<TestType, float>(shape, strategy);
    }
  }
}

TEMPLATE_TEST_CASE("forward_backward rejects invalid arguments by name",
                   "[contract][forward_backward]", float, __half, __nv_bfloat16) {
  SECTION("Grad = Element") { check_invalid_arguments<TestType, TestType>(); }
  SECTION("Grad = float") { check_invalid_arguments<TestType, float>(); }
}

TEMPLATE_TEST_CASE("forward_backward: row_chunked with 16-bit dW is rejected",
                   "[contract][forward_backward]", __half, __nv_bfloat16) {
  lce::backward_options bopt;
  bopt.strategy = lce::backward_strategy::row_chunked;
  const auto args = valid_forward_backward_args<TestType, TestType>();
  std::size_t bytes = 0;
  check_invalid(lce::forward_backward(nullptr, bytes, args, lce::problem{300, 72, 127}, {}, bopt,
                                      fake_handle()),
                "strategy");
  std::size_t ample = lce_test::unlimited_bytes;
  check_invalid(lce::forward_backward(fake_workspace(), ample, args, lce::problem{300, 72, 127}, {},
                                      bopt, fake_handle()),
                "strategy");
}

namespace {

template <class Element, class Grad>
lce::forward_backward_args<Element, Grad> forward_backward_args_with_options() {
  auto a = valid_forward_backward_args<Element, Grad>();
  a.class_weight = fake_pointer<const float>(11);
  a.z_loss = fake_pointer<float>(12);
  a.token_z_loss = fake_pointer<float>(13);
  a.argmax = fake_pointer<std::int64_t>(14);
  a.correct = fake_pointer<std::int64_t>(15);
  a.entropy = fake_pointer<float>(16);
  a.target_logprob = fake_pointer<float>(17);
  return a;
}

const lce::backward_strategy fb_strategies[] = {lce::backward_strategy::automatic,
                                                lce::backward_strategy::vocab_chunked,
                                                lce::backward_strategy::row_chunked};

template <class Element, class Grad>
void check_invalid_options() {
  const lce::problem shape{300, 72, 127};
  for (const bool with_outputs : {false, true}) {
    const auto args = with_outputs ? forward_backward_args_with_options<Element, Grad>()
                                   : valid_forward_backward_args<Element, Grad>();
    for (const lce_test::invalid_option& tc : lce_test::invalid_loss_options()) {
      for (const lce::backward_strategy strategy : fb_strategies) {
        if (strategy == lce::backward_strategy::row_chunked && !std::is_same_v<Grad, float>)
          continue;
        CAPTURE(with_outputs, tc.argument, lce_test::describe(tc.options),
                lce_test::strategy_name(strategy));
        lce::backward_options bopt;
        bopt.strategy = strategy;
        std::size_t bytes = 0;
        check_invalid(
            lce::forward_backward(nullptr, bytes, args, shape, tc.options, bopt, fake_handle()),
            tc.argument);
        std::size_t ample = lce_test::unlimited_bytes;
        check_invalid(lce::forward_backward(fake_workspace(), ample, args, shape, tc.options, bopt,
                                            fake_handle()),
                      tc.argument);
      }
    }
  }
}

template <class Element, class Grad>
void check_valid_options() {
  const lce::problem shape{300, 72, 127};
  for (const bool with_outputs : {false, true}) {
    const auto args = with_outputs ? forward_backward_args_with_options<Element, Grad>()
                                   : valid_forward_backward_args<Element, Grad>();
    for (const lce::loss_options& options : lce_test::valid_loss_options()) {
      for (const lce::backward_strategy strategy : fb_strategies) {
        if (strategy == lce::backward_strategy::row_chunked && !std::is_same_v<Grad, float>)
          continue;
        CAPTURE(with_outputs, lce_test::describe(options), lce_test::strategy_name(strategy));
        lce::backward_options bopt;
        bopt.strategy = strategy;
        std::size_t bytes = 0;
        check_success(
            lce::forward_backward(nullptr, bytes, args, shape, options, bopt, fake_handle()));
        CHECK(bytes > 0);
      }
    }
  }
}

}  // namespace

TEMPLATE_TEST_CASE("forward_backward rejects invalid loss options by name",
                   "[contract][forward_backward][options]", float, __half, __nv_bfloat16) {
  SECTION("Grad = Element") { check_invalid_options<TestType, TestType>(); }
  SECTION("Grad = float") { check_invalid_options<TestType, float>(); }
}

TEMPLATE_TEST_CASE("forward_backward accepts valid loss options and every optional output",
                   "[contract][forward_backward][options]", float, __half, __nv_bfloat16) {
  SECTION("Grad = Element") { check_valid_options<TestType, TestType>(); }
  SECTION("Grad = float") { check_valid_options<TestType, float>(); }
}

/// A tile configuration without an sm_90a kernel: the stored forward cannot run with it.
struct contract_mma_sync_config : lce::tile_config<128, 128, 32, 2, 4, 4> {};

// Every launcher compiles and plans with a Config that has no sm_90a part (the api.md example
// of a custom tile): the backward's fused recompute is then never instantiated.
TEMPLATE_TEST_CASE("forward_backward with a Config without an sm_90a kernel: size query",
                   "[contract][forward_backward][config]", float, __half, __nv_bfloat16) {
  const lce::problem shape{300, 72, 127};
  const auto args = valid_forward_backward_args<TestType, float>();
  lce::backward_options bopt;
  std::size_t bytes = 0;
  check_success(lce::forward_backward<TestType, float, contract_mma_sync_config>(
      nullptr, bytes, args, shape, lce::loss_options{}, bopt, fake_handle()));
  CHECK(bytes == (lce::forward_backward_workspace_size<TestType, float, contract_mma_sync_config>(
                     shape, bopt)));
  std::size_t short_bytes = bytes - 1;
  check_invalid(
      lce::forward_backward<TestType, float, contract_mma_sync_config>(
          fake_workspace(), short_bytes, args, shape, lce::loss_options{}, bopt, fake_handle()),
      "workspace_bytes");
}

// forward_backward's choice: stored where asked for, or where automatic finds its n·v·2 bytes
// within the budget (16-bit elements); the chunked plan otherwise, in the same workspace.
TEMPLATE_TEST_CASE("forward_backward choice: stored when asked for or when it fits the budget",
                   "[contract][forward_backward][plan]", __half, __nv_bfloat16) {
  const lce::problem shape{8192, 4096, 128256};  // Llama 3 head: stored values 2.1 GB
  const std::size_t stored_values = 8192ull * 128256 * 2;
  lce::backward_options bopt;  // automatic, 256 MiB: no room for stored
  lce::backward_choice c = lce::choose_forward_backward<TestType>(shape, bopt);
  CHECK(c.strategy == lce::backward_strategy::vocab_chunked);
  CHECK(c.workspace_bytes == lce::forward_backward_workspace_size<TestType>(shape, bopt));
  CHECK(c.workspace_bytes < stored_values);

  bopt.memory_budget = std::size_t{4} << 30;
  c = lce::choose_forward_backward<TestType>(shape, bopt);
  CHECK(c.strategy == lce::backward_strategy::stored);
  CHECK(c.workspace_bytes >= stored_values);
  CHECK(c.workspace_bytes == lce::forward_backward_workspace_size<TestType>(shape, bopt));
  // The budget is a bound: stored asks for its values (and the forward's few MiB), not the
  // 4 GiB; its fallback plan (a device without the sm_90a kernel) runs in that space.
  CHECK(c.workspace_bytes < stored_values + (std::size_t{64} << 20));
  // The same bound on the other heads of bench/: beyond the values, a row's tile maxima take
  // ⌈v/256⌉·4 bytes (one per 256-column tile of the default sm_90a kernel), Gemma 2's the most.
  for (const lce::problem head :
       {lce::problem{8192, 2304, 256000}, lce::problem{8192, 3584, 152064}}) {
    CAPTURE(head.d, head.v);
    const lce::backward_choice h = lce::choose_forward_backward<TestType>(head, bopt);
    CHECK(h.strategy == lce::backward_strategy::stored);
    CHECK(h.workspace_bytes <
          static_cast<std::size_t>(head.n * head.v) * 2 + (std::size_t{64} << 20));
  }
  // A bias or class weights: the chunked plan runs and takes the budget; the size query says
  // so when told.
  const lce::backward_choice fallback =
      lce::choose_forward_backward<TestType>(shape, bopt, /*bias_or_weights=*/true);
  CHECK(fallback.strategy != lce::backward_strategy::stored);
  CHECK(fallback.workspace_bytes ==
        lce::forward_backward_workspace_size<TestType>(shape, bopt, /*bias_or_weights=*/true));
  CHECK(fallback.workspace_bytes > c.workspace_bytes);
  CHECK(fallback.workspace_bytes <= bopt.memory_budget + (std::size_t{64} << 20));
  // The default budget: a problem whose stored values fit keeps the fallback plan it would
  // have without stored (not squeezed into the values' smaller space).
  {
    const lce::problem small{512, 4096, 128256};  // 125 MiB of stored values
    const lce::backward_options lean;
    CHECK(lce::choose_forward_backward<TestType>(small, lean).strategy ==
          lce::backward_strategy::stored);
    CHECK(lce::forward_backward_workspace_size<TestType>(small, lean) >=
          lce::forward_backward_workspace_size<TestType>(small, lean, /*bias_or_weights=*/true));
  }

  bopt.strategy = lce::backward_strategy::stored;  // asked for: whatever the budget
  bopt.memory_budget = std::size_t{1} << 20;
  c = lce::choose_forward_backward<TestType>(shape, bopt);
  CHECK(c.strategy == lce::backward_strategy::stored);
  CHECK(c.workspace_bytes >= stored_values);
  // ... but not with a Config that has no sm_90a kernel: its chunked plan runs.
  CHECK(lce::choose_forward_backward<TestType, TestType, contract_mma_sync_config>(shape, bopt)
            .strategy != lce::backward_strategy::stored);

  // Row chunks: with an fp32 dW, a budget below the n rows' values gives chunks of whole row
  // tiles, as tall as the budget holds; automatic takes them from min_stored_chunk rows up.
  {
    const std::int64_t ld = (shape.v + 7) / 8 * 8;
    lce::backward_options chunked;
    chunked.memory_budget = std::size_t{1} << 30;  // ~4000 of the 8192 rows
    const lce::backward_choice rows = lce::choose_forward_backward<TestType, float>(shape, chunked);
    CHECK(rows.strategy == lce::backward_strategy::stored);
    CHECK(rows.chunk > 0);
    CHECK(rows.chunk < shape.n);
    CHECK(rows.chunk % 128 == 0);
    CHECK(static_cast<std::size_t>(rows.chunk) * ld * 2 <= chunked.memory_budget);
    CHECK(static_cast<double>(rows.chunk + 256) * ld * 2 > 0.95 * chunked.memory_budget);
    CHECK(rows.accumulator_bytes == 0);  // dW is the caller's fp32
    CHECK(rows.workspace_bytes ==
          (lce::forward_backward_workspace_size<TestType, float>(shape, chunked)));
    // Its stored regions are within the budget; the forward's are outside it, as for every
    // strategy.
    lce::backward_options tiny = chunked;
    tiny.memory_budget = 0;
    CHECK(rows.workspace_bytes <=
          lce::forward_backward_workspace_size<TestType, float>(shape, tiny) +
              chunked.memory_budget);
    // A 16-bit dW is added to chunk by chunk in fp32 accumulators within the budget (v·d·4 +
    // v·4 bytes: 2 GB here, more than this 1 GiB): automatic runs the chunked plan, and stored,
    // asked for, all rows at once.
    CHECK(lce::choose_forward_backward<TestType, TestType>(shape, chunked).strategy !=
          lce::backward_strategy::stored);
    chunked.strategy = lce::backward_strategy::stored;
    const lce::backward_choice whole =
        lce::choose_forward_backward<TestType, TestType>(shape, chunked);
    CHECK(whole.strategy == lce::backward_strategy::stored);
    CHECK(whole.chunk == 0);
    CHECK(whole.workspace_bytes >= stored_values);
    // With room for the accumulators (n = 32768: 8 GiB of values; 4 GiB holds the 2 GiB of
    // accumulators and ~8000-row chunks), a 16-bit dW runs stored in row chunks too.
    {
      const lce::problem tall{32768, 4096, 128256};
      lce::backward_options four;
      four.memory_budget = std::size_t{4} << 30;
      const lce::backward_choice c16 = lce::choose_forward_backward<TestType>(tall, four);
      const std::size_t accumulators = std::size_t{128256} * (4096 + 1) * 4;
      CHECK(c16.strategy == lce::backward_strategy::stored);
      CHECK(c16.chunk >= lce::device::min_stored_chunk);
      CHECK(c16.chunk < tall.n);
      CHECK(c16.accumulator_bytes == accumulators);
      CHECK(c16.workspace_bytes <=
            lce::forward_backward_workspace_size<TestType>(tall, tiny) + four.memory_budget);
      CHECK(static_cast<std::size_t>(c16.chunk) * ld * 2 + accumulators <= four.memory_budget);
      // The same budget with an fp32 dW: no accumulators, so taller chunks.
      const lce::backward_choice c32 = lce::choose_forward_backward<TestType, float>(tall, four);
      CHECK(c32.strategy == lce::backward_strategy::stored);
      CHECK(c32.chunk > c16.chunk);
      CHECK(c32.accumulator_bytes == 0);
    }
    // automatic takes the row chunks exactly when they have min_stored_chunk rows or more
    // (the default budget: ~1000 rows on this shape); asked for, stored chunks below that too.
    for (const std::size_t mib : {std::size_t{128}, std::size_t{256}, std::size_t{512}}) {
      lce::backward_options opt;
      opt.memory_budget = mib << 20;
      const lce::backward_choice automatic =
          lce::choose_forward_backward<TestType, float>(shape, opt);
      opt.strategy = lce::backward_strategy::stored;
      const lce::backward_choice asked = lce::choose_forward_backward<TestType, float>(shape, opt);
      INFO("budget " << mib << " MiB: " << asked.chunk << " rows a chunk");
      CHECK(asked.strategy == lce::backward_strategy::stored);
      CHECK(asked.chunk > 0);
      CHECK((automatic.strategy == lce::backward_strategy::stored) ==
            (asked.chunk >= lce::device::min_stored_chunk));
    }
    lce::backward_options small;
    small.memory_budget = std::size_t{128} << 20;  // ~500 rows
    CHECK(lce::choose_forward_backward<TestType, float>(shape, small).strategy !=
          lce::backward_strategy::stored);
    // Not one row tile within the budget: stored, asked for, holds all rows at once.
    small.strategy = lce::backward_strategy::stored;
    small.memory_budget = std::size_t{16} << 20;
    CHECK(lce::choose_forward_backward<TestType, float>(shape, small).chunk == 0);
  }

  // fp32 inputs never store.
  lce::backward_options big;
  big.memory_budget = std::size_t{16} << 30;
  CHECK(lce::choose_forward_backward<float>(shape, big).strategy != lce::backward_strategy::stored);
}

// The stored strategy's per-row-offset form (device/stored.cuh, kernel/stored_offset.cuh):
// which calls take it, and a plan whose region for the tile maxima also holds dX's fp32 row
// chunks, with the per-row arrays beside it (and none of it in a plan without the form).
TEST_CASE("forward_backward plan: the stored per-row-offset form and its regions",
          "[contract][forward_backward][plan]") {
  using bf16 = __nv_bfloat16;
  lce::backward_args<bf16, bf16> a;
  a.dx = fake_pointer<bf16>(1);
  lce::loss_options o;
  CHECK(lce::device::stored_offset_form(a, o));
  o.softcap = 30.0f;  // its derivative goes into the stored values
  CHECK(lce::device::stored_offset_form(a, o));
  lce::loss_options smoothing;
  smoothing.label_smoothing = 0.1f;
  CHECK_FALSE(lce::device::stored_offset_form(a, smoothing));
  lce::loss_options filtered;
  filtered.filter_eps = 1e-4f;
  CHECK_FALSE(lce::device::stored_offset_form(a, filtered));
  lce::loss_options adding;
  adding.accumulate = true;  // dX holds the caller's values: no room for f ⊙ X
  CHECK_FALSE(lce::device::stored_offset_form(a, adding));
  lce::backward_args<bf16, bf16> no_dx;
  CHECK_FALSE(lce::device::stored_offset_form(no_dx, lce::loss_options{}));
  lce::backward_args<__half, __half> half;
  half.dx = fake_pointer<__half>(1);
  CHECK_FALSE(lce::device::stored_offset_form(half, lce::loss_options{}));

  for (const lce::problem s : {lce::problem{8192, 4096, 128256}, lce::problem{8192, 2304, 256000},
                               lce::problem{300, 72, 1000}, lce::problem{1, 16, 1}}) {
    CAPTURE(s.n, s.d, s.v);
    lce::detail::workspace_layout with, without;
    const auto p = lce::device::make_stored_plan<bf16>(s, s.n, 0, 256, with, true);
    const auto q = lce::device::make_stored_plan<bf16>(s, s.n, 0, 256, without, false);
    CHECK(p.dx_rows >= 1);
    CHECK(p.dx_rows <= s.n);
    CHECK(p.dx_first_rows >= 1);
    CHECK(p.dx_first_rows <= p.dx_rows);
    CHECK(p.dx_in_values == (s.v >= 2 * s.d));
    const std::size_t region = p.offset - p.tile_max;
    const auto fp32_rows = [&](std::int64_t rows) {
      return static_cast<std::size_t>(rows * s.d) * sizeof(float);
    };
    // the region at tile_max holds the tile maxima and the first dX chunk's fp32 rows
    CHECK(region >= fp32_rows(p.dx_first_rows));
    CHECK(region >= static_cast<std::size_t>(s.n * p.tiles) * sizeof(float));
    CHECK(p.tiles == (s.v + 255) / 256);
    // dX's chunks cover the rows in order, each in the region or in the values before it
    std::int64_t chunks = 0, cr = 0, c0 = 0;
    for (; c0 < s.n && chunks < s.n + 1; c0 += cr, ++chunks) {
      const std::int64_t previous = cr;
      cr = lce::device::stored_dx_chunk_rows<bf16>(p, s, c0, previous, s.n);
      REQUIRE(cr >= 1);
      CHECK(static_cast<std::size_t>(cr * s.d) * sizeof(float) <=
            (c0 > 0 && p.dx_in_values ? static_cast<std::size_t>(previous * p.ld) * sizeof(bf16)
                                      : region));
    }
    CHECK(c0 == s.n);
    // the maxima's region holds 1792 of Llama 3's rows, the values of those the other 6400
    if (s.v == 128256) CHECK(chunks == 2);
    if (s.v == 256000) CHECK(chunks == 2);
    CHECK(p.offset > 0);
    CHECK(p.target > p.target_grad);
    CHECK(p.bytes >= q.bytes);
    CHECK(q.offset == 0);
    // at most 256 fp32 rows of d and the per-row arrays beyond the form without it
    CHECK(p.bytes <= q.bytes + fp32_rows(std::min<std::int64_t>(s.n, 256)) +
                         static_cast<std::size_t>(s.n) * 24 + 6 * 256);
  }
}
