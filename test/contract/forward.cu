// CPU contract tests of lce::forward: argument validation and the two-phase workspace
// protocol. No GPU: every call here must return before launching anything.
#include <algorithm>
#include <functional>
#include <string>
#include <vector>

#include "contract/common.hpp"

namespace {

using lce_test::check_invalid;
using lce_test::check_success;
using lce_test::fake_pointer;
using lce_test::fake_workspace;

template <class Element>
lce::forward_args<Element> valid_forward_args() {
  lce::forward_args<Element> a;
  a.x = fake_pointer<const Element>(1);
  a.w = fake_pointer<const Element>(2);
  a.bias = fake_pointer<const Element>(3);
  a.targets = fake_pointer<const std::int64_t>(4);
  a.loss = fake_pointer<float>(5);
  a.token_loss = fake_pointer<float>(6);
  a.lse = fake_pointer<float>(7);
  return a;
}

struct forward_call {
  lce::problem shape{300, 72, 127};
  lce::loss_options options{};
};

}  // namespace

TEMPLATE_TEST_CASE("forward size query: launches nothing, matches forward_workspace_size",
                   "[contract][forward]", float, __half, __nv_bfloat16) {
  const auto shape =
      GENERATE(lce::problem{1, 16, 1}, lce::problem{7, 72, 3}, lce::problem{300, 1000, 127},
               lce::problem{4097, 2304, 50257}, lce::problem{4097, 72, 128256, 80, 75, 0, 0},
               lce::problem{1, 2304, 128256});
  const auto red = GENERATE(lce::reduction::mean, lce::reduction::sum, lce::reduction::none);
  CAPTURE(shape.n, shape.d, shape.v, static_cast<int>(red));
  lce::forward_args<TestType> args = valid_forward_args<TestType>();
  lce::loss_options options;
  options.reduction = red;
  std::size_t bytes = 12345;
  check_success(lce::forward<TestType>(nullptr, bytes, args, shape, options));
  CHECK(bytes == lce::forward_workspace_size<TestType>(shape));
  if (red != lce::reduction::none) CHECK(bytes > 0);
  // O(n · splits), never O(n · v): splits are at most 1024 (forward_workspace_size's doc), each
  // holding one partial row state; plus a few per-row scalars.
  const auto n = static_cast<std::size_t>(shape.n);
  CHECK(bytes <= sizeof(lce::thread::row_stats) * n * 1024 + 64 * n + 8192);

  SECTION("optional outputs do not change the size") {
    args.lse = nullptr;
    if (red != lce::reduction::none) args.token_loss = nullptr;
    args.bias = nullptr;
    std::size_t again = 0;
    check_success(lce::forward<TestType>(nullptr, again, args, shape, options));
    CHECK(again == bytes);
  }
  SECTION("a short workspace is rejected before any launch") {
    if (bytes > 0) {
      std::size_t short_bytes = bytes - 1;
      check_invalid(lce::forward<TestType>(fake_workspace(), short_bytes, args, shape, options),
                    "workspace_bytes");
    }
    std::size_t zero = 0;
    if (bytes > 0) {
      check_invalid(lce::forward<TestType>(fake_workspace(), zero, args, shape, options),
                    "workspace_bytes");
    }
  }
}

TEMPLATE_TEST_CASE("forward rejects invalid arguments by name", "[contract][forward]", float,
                   __half, __nv_bfloat16) {
  struct invalid_case {
    const char* argument;
    std::function<void(lce::forward_args<TestType>&, forward_call&)> mutate;
  };
  const std::vector<invalid_case> cases{
      {"shape.n", [](auto&, auto& c) { c.shape.n = -7; }},
      {"shape.d", [](auto&, auto& c) { c.shape.d = 0; }},
      {"shape.d", [](auto&, auto& c) { c.shape.d = -1; }},
      {"shape.v", [](auto&, auto& c) { c.shape.v = 0; }},
      {"shape.v", [](auto&, auto& c) { c.shape.v = -128256; }},
      {"shape.n", [](auto&, auto& c) { c.shape.n = std::int64_t{1} << 40; }},
      {"shape.v", [](auto&, auto& c) { c.shape.v = std::int64_t{1} << 40; }},
      {"ldx", [](auto&, auto& c) { c.shape.ldx = c.shape.d - 1; }},
      {"ldx", [](auto&, auto& c) { c.shape.ldx = -1; }},
      {"ldw", [](auto&, auto& c) { c.shape.ldw = c.shape.d - 1; }},
      {"args.x", [](auto& a, auto&) { a.x = nullptr; }},
      {"args.w", [](auto& a, auto&) { a.w = nullptr; }},
      {"args.targets", [](auto& a, auto&) { a.targets = nullptr; }},
      {"args.loss",
       [](auto& a, auto& c) {
         a.loss = nullptr;
         c.options.reduction = lce::reduction::mean;
       }},
      {"args.loss",
       [](auto& a, auto& c) {
         a.loss = nullptr;
         c.options.reduction = lce::reduction::sum;
       }},
      {"args.token_loss",
       [](auto& a, auto& c) {
         a.token_loss = nullptr;
         c.options.reduction = lce::reduction::none;
       }},
      {"reduction", [](auto&, auto& c) { c.options.reduction = static_cast<lce::reduction>(7); }},
  };
  for (std::size_t i = 0; i < cases.size(); ++i) {
    const invalid_case& tc = cases[i];
    CAPTURE(i, tc.argument);
    lce::forward_args<TestType> args = valid_forward_args<TestType>();
    forward_call call;
    tc.mutate(args, call);
    // As a size query ...
    std::size_t bytes = 0;
    check_invalid(lce::forward<TestType>(nullptr, bytes, args, call.shape, call.options),
                  tc.argument);
    // ... and as a launch with ample workspace: rejected before anything is enqueued.
    std::size_t ample = lce_test::unlimited_bytes;
    check_invalid(lce::forward<TestType>(fake_workspace(), ample, args, call.shape, call.options),
                  tc.argument);
  }
}

TEMPLATE_TEST_CASE("forward: the size bound in the message is the bound enforced",
                   "[contract][forward][limits]", float, __half, __nv_bfloat16) {
  // (2^31 - 65) / 2: cuBLAS takes int sizes, and a 16-bit view of an fp32 chunk doubles its
  // leading dimension (docs/api.md, lce::problem).
  constexpr std::int64_t bound = 1073741791;
  // Small other extents, so that the fake buffers (64 GiB apart) stay disjoint.
  struct extent_case {
    const char* name;
    std::int64_t lce::problem::*member;
    const char* message;
  };
  const extent_case cases[] = {
      {"n", &lce::problem::n, "shape.n, shape.d and shape.v must each be at most 1073741791"},
      {"d", &lce::problem::d, "shape.n, shape.d and shape.v must each be at most 1073741791"},
      {"v", &lce::problem::v, "shape.n, shape.d and shape.v must each be at most 1073741791"},
      {"ldx", &lce::problem::ldx, "leading dimensions must be at most 1073741791"},
      {"ldw", &lce::problem::ldw, "leading dimensions must be at most 1073741791"},
  };
  const lce::forward_args<TestType> args = valid_forward_args<TestType>();
  for (const extent_case& tc : cases) {
    CAPTURE(tc.name);
    lce::problem shape{2, 1, 3};
    shape.*tc.member = bound;
    std::size_t bytes = 0;
    check_success(lce::forward<TestType>(nullptr, bytes, args, shape));
    CHECK(bytes > 0);
    shape.*tc.member = bound + 1;
    check_invalid(lce::forward<TestType>(nullptr, bytes, args, shape), tc.message);
  }
}

TEMPLATE_TEST_CASE("forward: workspace pointer and error-message lifetime", "[contract][forward]",
                   float, __half, __nv_bfloat16) {
  const lce::forward_args<TestType> args = valid_forward_args<TestType>();
  const lce::problem shape{300, 72, 127};
  std::size_t bytes = lce_test::unlimited_bytes;
  SECTION("a misaligned workspace is rejected") {
    void* misaligned = static_cast<char*>(fake_workspace()) + 4;
    check_invalid(lce::forward<TestType>(misaligned, bytes, args, shape), "d_workspace");
  }
  SECTION("a successful call clears the previous message") {
    lce::forward_args<TestType> bad = args;
    bad.x = nullptr;
    check_invalid(lce::forward<TestType>(nullptr, bytes, bad, shape), "args.x");
    check_success(lce::forward<TestType>(nullptr, bytes, args, shape));
  }
  SECTION("several bad arguments: one of them is named, on one line") {
    lce::forward_args<TestType> bad = args;
    bad.x = nullptr;
    const cudaError_t status =
        lce::forward<TestType>(nullptr, bytes, bad, lce::problem{-1, 72, 127});
    const std::string message = lce::last_error_message();
    CAPTURE(message);
    CHECK(status == cudaErrorInvalidValue);
    CHECK((message.find("shape.n") != std::string::npos ||
           message.find("args.x") != std::string::npos));
    CHECK(message.find('\n') == std::string::npos);
  }
  SECTION("reduction none needs no loss pointer") {
    lce::forward_args<TestType> a = args;
    a.loss = nullptr;
    lce::loss_options options;
    options.reduction = lce::reduction::none;
    check_success(lce::forward<TestType>(nullptr, bytes, a, shape, options));
  }
  SECTION("ignore_index may be any value, including a vocabulary id") {
    lce::loss_options options;
    options.ignore_index = 5;
    check_success(lce::forward<TestType>(nullptr, bytes, args, shape, options));
  }
}

namespace {

/// valid_forward_args plus every optional input and output of the loss options.
template <class Element>
lce::forward_args<Element> forward_args_with_options() {
  lce::forward_args<Element> a = valid_forward_args<Element>();
  a.class_weight = fake_pointer<const float>(8);
  a.z_loss = fake_pointer<float>(9);
  a.token_z_loss = fake_pointer<float>(10);
  a.argmax = fake_pointer<std::int64_t>(11);
  a.correct = fake_pointer<std::int64_t>(12);
  a.entropy = fake_pointer<float>(13);
  a.target_logprob = fake_pointer<float>(14);
  return a;
}

}  // namespace

TEMPLATE_TEST_CASE("forward rejects invalid loss options by name", "[contract][forward][options]",
                   float, __half, __nv_bfloat16) {
  const lce::problem shape{300, 72, 127};
  for (const bool with_outputs : {false, true}) {
    const lce::forward_args<TestType> args =
        with_outputs ? forward_args_with_options<TestType>() : valid_forward_args<TestType>();
    for (const lce_test::invalid_option& tc : lce_test::invalid_loss_options()) {
      CAPTURE(with_outputs, tc.argument, lce_test::describe(tc.options));
      std::size_t bytes = 0;
      check_invalid(lce::forward<TestType>(nullptr, bytes, args, shape, tc.options), tc.argument);
      std::size_t ample = lce_test::unlimited_bytes;
      check_invalid(lce::forward<TestType>(fake_workspace(), ample, args, shape, tc.options),
                    tc.argument);
    }
  }
}

TEMPLATE_TEST_CASE("forward accepts valid loss options and every optional output",
                   "[contract][forward][options]", float, __half, __nv_bfloat16) {
  const lce::problem shape{300, 72, 127};
  for (const bool with_outputs : {false, true}) {
    const lce::forward_args<TestType> args =
        with_outputs ? forward_args_with_options<TestType>() : valid_forward_args<TestType>();
    for (const lce::loss_options& options : lce_test::valid_loss_options()) {
      CAPTURE(with_outputs, lce_test::describe(options));
      std::size_t bytes = 0;
      check_success(lce::forward<TestType>(nullptr, bytes, args, shape, options));
      if (options.reduction != lce::reduction::none) CHECK(bytes > 0);
      // Still O(n · splits), never O(n · v).
      CHECK(bytes <= sizeof(lce::thread::row_stats) * 300 * 1024 + 64 * 300 + 8192);
    }
  }
}

TEST_CASE("sm_90a grid: balanced vocabulary splits fill whole waves and cover every tile once",
          "[contract][forward][grid]") {
  // The Gemma 2 head with the default 128 × 256 tiles in clusters of two: 33 splits of 30 or
  // 31 tiles, 64 · 33 = 2112 blocks = 16 waves of 132 (the old rule, 16 splits of 63 tiles,
  // ran 8 waves for 7.76 waves of work).
  const lce::device::forward_grid gemma =
      lce::device::make_balanced_grid(lce::problem{8192, 2304, 256000}, 128, 256, 2);
  CHECK(gemma.row_tiles == 64);
  CHECK(gemma.vocab_tiles == 1000);
  CHECK(gemma.splits == 33);
  CHECK(gemma.tiles_per_split == 31);
  CHECK(gemma.row_tiles * gemma.splits % lce::device::nominal_sms == 0);

  const auto shape =
      GENERATE(lce::problem{1, 16, 1}, lce::problem{7, 72, 3}, lce::problem{129, 72, 257},
               lce::problem{300, 1000, 4097}, lce::problem{4097, 2304, 50257},
               lce::problem{8192, 4096, 128256}, lce::problem{8192, 3584, 152064},
               lce::problem{100000, 64, 1000}, lce::problem{64, 64, 300});
  const int block_v = GENERATE(128, 256);
  const int cluster = GENERATE(1, 2);
  CAPTURE(shape.n, shape.v, block_v, cluster);
  const lce::device::forward_grid g = lce::device::make_balanced_grid(shape, 128, block_v, cluster);
  CHECK(g.row_tiles % cluster == 0);
  CHECK(g.row_tiles * 128 >= shape.n);
  CHECK((g.row_tiles - cluster) * 128 < shape.n);  // at most the cluster's rounding past n
  CHECK(g.vocab_tiles == (shape.v + block_v - 1) / block_v);
  CHECK(g.splits >= 1);
  CHECK(g.splits <= std::min<std::int64_t>(g.vocab_tiles, lce::device::max_sm90_splits));
  // The kernel's ranges (block::split_range): consecutive, non-empty, sizes within one of each
  // other, covering [0, vocab_tiles) exactly; the largest is tiles_per_split.
  std::int64_t next = 0, smallest = g.vocab_tiles, largest = 0;
  for (std::int64_t y = 0; y < g.splits; ++y) {
    const lce::block::tile_range r = lce::block::split_range(g.vocab_tiles, g.splits, y);
    CHECK(r.begin == next);
    CHECK(r.end > r.begin);
    smallest = std::min(smallest, r.end - r.begin);
    largest = std::max(largest, r.end - r.begin);
    next = r.end;
  }
  CHECK(next == g.vocab_tiles);
  CHECK(largest - smallest <= 1);
  CHECK(largest == g.tiles_per_split);
  // The forward's workspace holds the partial statistics of this grid's splits.
  if (block_v == 256 && cluster == 2) {
    CHECK(lce::forward_workspace_size<__nv_bfloat16>(shape) >=
          sizeof(lce::thread::row_stats) * static_cast<std::size_t>(shape.n * g.splits));
  }
}

TEST_CASE("sm_90a grid: the recompute's fewest splits", "[contract][forward][grid]") {
  // Llama 3's head at n = 32768, a lean chunk of 4096 columns (16 tiles of 256): waves alone
  // pick one split (256 blocks, 2 waves), so the 132 resident blocks hold 132 row tiles; with
  // the recompute's minimum they share row tiles, the waves within 5% of whole.
  const lce::problem chunk{32768, 4096, 4096};
  const auto lone = lce::device::make_balanced_grid(chunk, 128, 256, 2);
  CHECK(lone.splits == 1);
  const auto shared = lce::device::make_balanced_grid(chunk, 128, 256, 2, LCE_RECOMPUTE_MIN_SPLITS);
  CHECK(shared.splits >= LCE_RECOMPUTE_MIN_SPLITS);
  const std::int64_t sms = lce::device::nominal_sms;
  const std::int64_t waves = (shared.row_tiles * shared.splits + sms - 1) / sms;
  CHECK(static_cast<double>(waves * shared.tiles_per_split) <=
        1.05 * static_cast<double>(shared.row_tiles * 16) / static_cast<double>(sms));
  CHECK(sms / shared.splits <= 33);  // resident row tiles: ≤ 33 MiB of X at d = 4096
  // Fewer tiles than the minimum: one split per tile, no empty split.
  const auto narrow =
      lce::device::make_balanced_grid(lce::problem{32768, 4096, 512}, 128, 256, 2, 4);
  CHECK(narrow.splits == 2);
  CHECK(narrow.tiles_per_split == 1);
}

namespace {
/// A tile configuration without an sm_90a kernel.
struct contract_tiled_config : lce::tile_config<128, 128, 32, 2, 4, 4> {};

bool says(const char* reason, const char* words) {
  return std::string(reason).find(words) != std::string::npos;
}
}  // namespace

// choose_forward names the kernel and the first condition that ruled the sm_90a one out. This
// binary holds PTX for compute_80 only, so its sm_90a kernels never run, with or without a GPU:
// the device's verdict is "no" here on every machine (the GPU suites check the "yes").
TEST_CASE("choose_forward: the kernel and why", "[contract][forward][choice]") {
  const lce::problem shape{8192, 4096, 128256};
  const lce::forward_choice f = lce::choose_forward<float>(shape);
  CHECK(f.kernel == lce::forward_kernel::tiled);
  CHECK(says(f.reason, "fp32"));
  CHECK(f.workspace_bytes == lce::forward_workspace_size<float>(shape));

  const auto tiled = lce::choose_forward<__nv_bfloat16, contract_tiled_config>(shape);
  CHECK(tiled.kernel == lce::forward_kernel::tiled);
  CHECK(says(tiled.reason, "no sm_90a tile configuration"));
  CHECK(tiled.workspace_bytes ==
        (lce::forward_workspace_size<__nv_bfloat16, contract_tiled_config>(shape)));

  lce::problem strided = shape;
  strided.ldx = 4100;  // 8200 bytes: not a multiple of 16
  CHECK(says(lce::choose_forward<__half>(strided).reason, "multiple of 16 bytes"));
  strided.ldx = 4104;  // 8208 bytes
  strided.ldw = 4097;
  CHECK(says(lce::choose_forward<__half>(strided).reason, "multiple of 16 bytes"));

  for (const bool bias : {false, true}) {
    const lce::forward_choice b = lce::choose_forward<__nv_bfloat16>(shape, bias);
    CHECK(b.kernel == lce::forward_kernel::tiled);
    CHECK(says(b.reason, "compute capability 9.0"));
    // Asked twice (the device's verdict is cached): the same answer.
    CHECK(lce::choose_forward<__nv_bfloat16>(shape, bias).kernel == b.kernel);
  }
}

// The sm_90a kernels' block order (block::raster_tile): every (row tile, split) of the grid
// exactly once; a grid of at most one group in the launch's own order (x the row tile, y the
// split); and the two blocks of a cluster (x, x + 1 with x even: clusters of two along x) on
// one split and consecutive row tiles, which the W multicast needs.
TEST_CASE("block order of the sm_90a kernels: a bijection that keeps clusters together",
          "[contract][forward][raster]") {
  for (const unsigned group : {0u, 2u, 8u, 16u, 32u}) {
    for (const unsigned rows : {1u, 2u, 6u, 16u, 34u, 64u, 130u}) {
      for (const unsigned splits : {1u, 3u, 8u, 17u}) {
        CAPTURE(group, rows, splits);
        std::vector<int> seen(static_cast<std::size_t>(rows) * splits, 0);
        bool in_range = true, launch_order = true, clusters = true;
        for (unsigned y = 0; y < splits; ++y) {
          for (unsigned x = 0; x < rows; ++x) {
            const unsigned linear = y * rows + x;
            const lce::block::grid_tile t = lce::block::raster_tile(linear, rows, splits, group);
            if (t.row_tile < 0 || t.row_tile >= rows || t.split < 0 || t.split >= splits) {
              in_range = false;
              continue;
            }
            ++seen[static_cast<std::size_t>(t.split) * rows + static_cast<std::size_t>(t.row_tile)];
            if (group == 0 || rows <= group)
              launch_order = launch_order && t.row_tile == x && t.split == y;
            if (rows % 2 == 0 && x % 2 == 0) {
              const lce::block::grid_tile u =
                  lce::block::raster_tile(linear + 1, rows, splits, group);
              clusters = clusters && u.split == t.split && u.row_tile == t.row_tile + 1;
            }
          }
        }
        CHECK(in_range);
        CHECK(std::all_of(seen.begin(), seen.end(), [](int c) { return c == 1; }));
        CHECK(launch_order);
        CHECK(clusters);
      }
    }
  }
}

// The stored forward's staging tile (128 × BlockV values) beside the pipeline's stages: as many
// of the Config's stages as fit in a block's 227 KiB next to it, the lean kernel keeping all.
TEST_CASE("sm_90a stored forward: its staging tile and the stages beside it fit shared memory",
          "[contract][forward][sm90]") {
  using bf16 = __nv_bfloat16;
  using wide = lce::default_config<bf16>::sm90;  // BlockV 256, 4 stages
  using stored = lce::kernel::fused_forward_sm90<bf16, wide, false, true>;
  using lean = lce::kernel::fused_forward_sm90<bf16, wide, false, false>;
  CHECK(lean::pipeline::stages == wide::stages);
  CHECK(stored::pipeline::stages == 3);
  CHECK(sizeof(stored::shared_storage::epilogue) == 128 * 256 * 2);
  CHECK(stored::pipeline::smem_bytes <= 227 * 1024);
  // The lean kernel's placeholder for the epilogue region costs no more than its alignment.
  CHECK(lean::pipeline::smem_bytes <= wide::stages * (128 + 256) * 128 + 2 * 1024);
  using narrow = lce::sm90_tile_config<128, 6, 2>;
  using stored128 = lce::kernel::fused_forward_sm90<bf16, narrow, false, true>;
  CHECK(stored128::pipeline::stages == 6);
  CHECK(stored128::pipeline::smem_bytes <= 227 * 1024);
}
