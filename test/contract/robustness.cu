// CPU contract tests of the robustness checks (docs/robustness.md): n = 0, pointer alignment,
// overlapping buffers, the device_status helpers. No GPU: every call here returns before
// launching anything.
#include <string>
#include <type_traits>

#include "contract/common.hpp"

namespace {

using lce_test::check_invalid;
using lce_test::check_success;
using lce_test::fake_handle;
using lce_test::fake_pointer;
using lce_test::fake_workspace;

template <class T>
T* offset_bytes(T* p, std::ptrdiff_t bytes) {
  using byte = std::conditional_t<std::is_const_v<T>, const char, char>;
  return reinterpret_cast<T*>(reinterpret_cast<byte*>(p) + bytes);
}

template <class Element>
lce::forward_args<Element> forward_args_all() {
  lce::forward_args<Element> a;
  a.x = fake_pointer<const Element>(1);
  a.w = fake_pointer<const Element>(2);
  a.bias = fake_pointer<const Element>(3);
  a.targets = fake_pointer<const std::int64_t>(4);
  a.loss = fake_pointer<float>(5);
  a.token_loss = fake_pointer<float>(6);
  a.lse = fake_pointer<float>(7);
  a.class_weight = fake_pointer<const float>(8);
  a.z_loss = fake_pointer<float>(9);
  a.token_z_loss = fake_pointer<float>(10);
  a.argmax = fake_pointer<std::int64_t>(11);
  a.correct = fake_pointer<std::int64_t>(12);
  a.entropy = fake_pointer<float>(13);
  a.target_logprob = fake_pointer<float>(14);
  a.status = fake_pointer<lce::device_status>(15);
  return a;
}

template <class Element, class Grad>
lce::backward_args<Element, Grad> backward_args_all() {
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
  a.class_weight = fake_pointer<const float>(10);
  a.status = fake_pointer<lce::device_status>(11);
  return a;
}

template <class Element, class Grad>
lce::forward_backward_args<Element, Grad> forward_backward_args_all() {
  lce::forward_backward_args<Element, Grad> a;
  const lce::forward_args<Element> f = forward_args_all<Element>();
  a.x = f.x;
  a.w = f.w;
  a.bias = f.bias;
  a.targets = f.targets;
  a.loss = f.loss;
  a.token_loss = f.token_loss;
  a.lse = f.lse;
  a.class_weight = f.class_weight;
  a.z_loss = f.z_loss;
  a.token_z_loss = f.token_z_loss;
  a.argmax = f.argmax;
  a.correct = f.correct;
  a.entropy = f.entropy;
  a.target_logprob = f.target_logprob;
  a.status = f.status;
  a.dx = fake_pointer<Element>(16);
  a.dw = fake_pointer<Grad>(17);
  a.db = fake_pointer<Grad>(18);
  return a;
}

const lce::problem shape{300, 72, 127, 80, 75, 77, 73};

}  // namespace

TEST_CASE("device_status is a plain struct; check_status reports the count", "[contract][status]") {
  STATIC_REQUIRE(std::is_trivially_copyable_v<lce::device_status>);
  STATIC_REQUIRE(std::is_standard_layout_v<lce::device_status>);
  STATIC_REQUIRE(sizeof(lce::device_status) == 32);
  lce::device_status s{};
  check_success(lce::check_status(s));
  s.invalid_targets = 12345;
  const cudaError_t status = lce::check_status(s);
  const std::string message = lce::last_error_message();
  CAPTURE(message);
  CHECK(status == cudaErrorInvalidValue);
  CHECK(message.rfind("lce: 12345 rows have a target outside [0, v)", 0) == 0);
  s.invalid_targets = 0;
  check_success(lce::check_status(s));  // and the message is cleared again
  check_invalid(lce::clear_status(nullptr), "d_status");
}

TEMPLATE_TEST_CASE("n = 0: valid, the size query is non-zero, per-row pointers may be null",
                   "[contract][empty]", float, __half, __nv_bfloat16) {
  const lce::problem empty{0, 72, 127};
  for (const auto red : {lce::reduction::mean, lce::reduction::sum, lce::reduction::none}) {
    lce::loss_options options;
    options.reduction = red;
    CAPTURE(static_cast<int>(red));
    lce::forward_args<TestType> fa = forward_args_all<TestType>();
    std::size_t bytes = 0;
    check_success(lce::forward<TestType>(nullptr, bytes, fa, empty, options));
    CHECK(bytes > 0);  // so that a caller's cudaMalloc(bytes) returns a non-null workspace
    CHECK(bytes == lce::forward_workspace_size<TestType>(empty));
    fa.x = nullptr;
    fa.targets = nullptr;
    fa.token_loss = nullptr;
    fa.lse = nullptr;
    check_success(lce::forward<TestType>(nullptr, bytes, fa, empty, options));
    fa.w = nullptr;
    check_invalid(lce::forward<TestType>(nullptr, bytes, fa, empty, options), "args.w");

    for (const auto strategy :
         {lce::backward_strategy::automatic, lce::backward_strategy::vocab_chunked,
          lce::backward_strategy::row_chunked}) {
      lce::backward_options bopt;
      bopt.strategy = strategy;
      lce::backward_args<TestType, float> ba = backward_args_all<TestType, float>();
      ba.x = nullptr;
      ba.targets = nullptr;
      ba.lse = nullptr;
      ba.grad = nullptr;
      ba.dx = nullptr;
      bytes = 0;
      check_success(lce::backward(nullptr, bytes, ba, empty, options, bopt, fake_handle()));
      CHECK(bytes > 0);
      CHECK(bytes == (lce::backward_workspace_size<TestType, float>(empty, bopt)));
      lce::forward_backward_args<TestType, float> fba =
          forward_backward_args_all<TestType, float>();
      fba.x = nullptr;
      fba.targets = nullptr;
      fba.token_loss = nullptr;
      bytes = 0;
      check_success(
          lce::forward_backward(nullptr, bytes, fba, empty, options, bopt, fake_handle()));
      CHECK(bytes > 0);
      CHECK(bytes == (lce::forward_backward_workspace_size<TestType, float>(empty, bopt)));
    }
  }
}

TEMPLATE_TEST_CASE(
    "pointers must be aligned to their element size; offsets by whole elements "
    "are accepted",
    "[contract][alignment]", float, __half, __nv_bfloat16) {
  const lce::forward_args<TestType> good = forward_args_all<TestType>();
  std::size_t bytes = 0;
  check_success(lce::forward<TestType>(nullptr, bytes, good, shape));
  SECTION("one element off (breaks 16-byte vector loads, not the element): accepted") {
    lce::forward_args<TestType> a = good;
    a.x = good.x + 1;
    a.w = good.w + 1;
    a.bias = good.bias + 1;
    a.token_loss = good.token_loss + 1;
    check_success(lce::forward<TestType>(nullptr, bytes, a, shape));
    lce::problem odd = shape;
    odd.ldx = shape.d + 1;
    odd.ldw = shape.d + 3;
    check_success(lce::forward<TestType>(nullptr, bytes, a, odd));
  }
  SECTION("one byte off: rejected, naming the argument") {
    struct bad_case {
      const char* argument;
      void (*mutate)(lce::forward_args<TestType>&);
    };
    const bad_case cases[] = {
        {"args.x", [](lce::forward_args<TestType>& a) { a.x = offset_bytes(a.x, 1); }},
        {"args.w", [](lce::forward_args<TestType>& a) { a.w = offset_bytes(a.w, 1); }},
        {"args.bias", [](lce::forward_args<TestType>& a) { a.bias = offset_bytes(a.bias, 1); }},
        {"args.targets",
         [](lce::forward_args<TestType>& a) { a.targets = offset_bytes(a.targets, 4); }},
        {"args.loss", [](lce::forward_args<TestType>& a) { a.loss = offset_bytes(a.loss, 2); }},
        {"args.argmax",
         [](lce::forward_args<TestType>& a) { a.argmax = offset_bytes(a.argmax, 4); }},
        {"args.status",
         [](lce::forward_args<TestType>& a) { a.status = offset_bytes(a.status, 4); }},
    };
    for (const bad_case& c : cases) {
      CAPTURE(c.argument);
      lce::forward_args<TestType> a = good;
      c.mutate(a);
      check_invalid(lce::forward<TestType>(nullptr, bytes, a, shape), c.argument);
      const std::string message = lce::last_error_message();
      CHECK(message.find("aligned") != std::string::npos);
    }
  }
  SECTION("backward: gradients one byte off are rejected") {
    lce::backward_args<TestType, float> b = backward_args_all<TestType, float>();
    check_success(lce::backward(nullptr, bytes, b, shape, {}, {}, fake_handle()));
    b.dw = offset_bytes(b.dw, 2);
    check_invalid(lce::backward(nullptr, bytes, b, shape, {}, {}, fake_handle()), "args.dw");
  }
}

TEMPLATE_TEST_CASE("outputs must not overlap inputs, other outputs or the workspace",
                   "[contract][overlap]", float, __half, __nv_bfloat16) {
  std::size_t bytes = 0;
  SECTION("forward") {
    const lce::forward_args<TestType> good = forward_args_all<TestType>();
    check_success(lce::forward<TestType>(nullptr, bytes, good, shape));
    lce::forward_args<TestType> a = good;
    // lse written over the last row of x (strided: the bounding range counts).
    a.lse = reinterpret_cast<float*>(const_cast<TestType*>(good.x)) + 10;
    check_invalid(lce::forward<TestType>(nullptr, bytes, a, shape), "args.lse overlaps args.x");
    a = good;
    a.token_loss = good.lse + shape.n - 1;  // shares one float with lse
    check_invalid(lce::forward<TestType>(nullptr, bytes, a, shape),
                  "args.token_loss overlaps args.lse");
    a = good;
    a.token_loss = good.lse + shape.n;  // adjacent, not overlapping
    check_success(lce::forward<TestType>(nullptr, bytes, a, shape));
    a = good;
    a.status = reinterpret_cast<lce::device_status*>(const_cast<std::int64_t*>(good.targets));
    check_invalid(lce::forward<TestType>(nullptr, bytes, a, shape),
                  "args.status overlaps args.targets");
    a = good;
    a.w = good.x;  // inputs may share memory (e.g. tied weights): only read
    check_success(lce::forward<TestType>(nullptr, bytes, a, shape));
    a = good;
    a.loss = nullptr;  // reduction none never writes loss, so it may point anywhere
    lce::loss_options none;
    none.reduction = lce::reduction::none;
    a.loss = const_cast<float*>(good.class_weight);
    check_success(lce::forward<TestType>(nullptr, bytes, a, shape, none));
  }
  SECTION("forward: the workspace") {
    const lce::forward_args<TestType> good = forward_args_all<TestType>();
    check_success(lce::forward<TestType>(nullptr, bytes, good, shape));
    lce::forward_args<TestType> a = good;
    a.entropy = static_cast<float*>(fake_workspace()) + 7;
    std::size_t ample = lce_test::unlimited_bytes;
    check_invalid(lce::forward<TestType>(fake_workspace(), ample, a, shape),
                  "d_workspace overlaps args.entropy");
  }
  SECTION("backward") {
    const lce::backward_args<TestType, TestType> good = backward_args_all<TestType, TestType>();
    check_success(lce::backward(nullptr, bytes, good, shape, {}, {}, fake_handle()));
    lce::backward_args<TestType, TestType> b = good;
    b.dx = const_cast<TestType*>(good.x);  // in place: not supported
    check_invalid(lce::backward(nullptr, bytes, b, shape, {}, {}, fake_handle()),
                  "args.dx overlaps args.x");
    b = good;
    b.dw = const_cast<TestType*>(good.w) + shape.w_stride() * (shape.v - 1);
    check_invalid(lce::backward(nullptr, bytes, b, shape, {}, {}, fake_handle()),
                  "args.dw overlaps args.w");
    b = good;
    b.db = good.dw + 5;
    check_invalid(lce::backward(nullptr, bytes, b, shape, {}, {}, fake_handle()),
                  "args.dw overlaps args.db");
    b = good;
    b.db = reinterpret_cast<TestType*>(const_cast<float*>(good.lse));
    check_invalid(lce::backward(nullptr, bytes, b, shape, {}, {}, fake_handle()),
                  "args.db overlaps args.lse");
    b = good;
    std::size_t ample = lce_test::unlimited_bytes;
    b.dx = static_cast<TestType*>(fake_workspace());
    check_invalid(lce::backward(fake_workspace(), ample, b, shape, {}, {}, fake_handle()),
                  "d_workspace overlaps args.dx");
  }
  SECTION("forward_backward") {
    const lce::forward_backward_args<TestType, float> good =
        forward_backward_args_all<TestType, float>();
    check_success(lce::forward_backward(nullptr, bytes, good, shape, {}, {}, fake_handle()));
    lce::forward_backward_args<TestType, float> f = good;
    f.dw = f.lse;
    check_invalid(lce::forward_backward(nullptr, bytes, f, shape, {}, {}, fake_handle()),
                  "overlaps");
    f = good;
    f.dx = const_cast<TestType*>(good.x) + 1;
    check_invalid(lce::forward_backward(nullptr, bytes, f, shape, {}, {}, fake_handle()),
                  "args.dx overlaps args.x");
  }
}

TEMPLATE_TEST_CASE(
    "without a usable device, a launch that passes every argument check stops at "
    "the device check, before any kernel or cuBLAS call",
    "[contract][device_check]", float, __half, __nv_bfloat16) {
  int devices = 0;
  const cudaError_t count = cudaGetDeviceCount(&devices);
  (void)cudaGetLastError();
  if (count == cudaSuccess && devices > 0) {
    WARN("a CUDA device is present: fake pointers must not reach it, so this case is skipped");
    return;
  }
  const lce::problem shape{300, 72, 127};
  // Each failure must come from the device check ("lce: cudaGetDevice: ..." or the attribute
  // query), not from a launch ("lce: <kernel>: ...") or the fake cuBLAS handle (a crash).
  auto check_refused = [](cudaError_t status) {
    const std::string message = lce::last_error_message();
    CAPTURE(message);
    CHECK(status != cudaSuccess);
    CHECK(status != cudaErrorInvalidValue);
    CHECK((message.rfind("lce: cudaGetDevice: ", 0) == 0 ||
           message.rfind("lce: cudaDeviceGetAttribute: ", 0) == 0));
  };
  std::size_t ample = lce_test::unlimited_bytes;
  check_refused(
      lce::forward<TestType>(fake_workspace(), ample, forward_args_all<TestType>(), shape));
  check_refused(lce::backward(fake_workspace(), ample, backward_args_all<TestType, float>(), shape,
                              {}, {}, fake_handle()));
  check_refused(lce::forward_backward(fake_workspace(), ample,
                                      forward_backward_args_all<TestType, float>(), shape, {}, {},
                                      fake_handle()));
}
