# The test executables of lce. Included by test/CMakeLists.txt, which defines
# lce_add_test(NAME <name> SOURCES <files...> [GPU]): CPU tests link support/main.cpp, GPU tests
# (label gpu, SKIP_RETURN_CODE 77 without a device) support/gpu_main.cpp.
# Few translation units on purpose: each one that includes lce.cuh compiles the kernels for
# every architecture.

# CPU: thread/ formulas and the fp64 reference's self-checks (no library kernels).
lce_add_test(NAME thread
  SOURCES thread/online_lse.cu thread/row_stats.cu thread/cross_entropy.cu support/reference.cu
    support/reference_options.cu)

# CPU: argument validation and the workspace protocol of the public API (launches nothing),
# the robustness checks (n = 0, alignment, overlapping buffers, device_status) and the verdicts
# of the device check.
lce_add_test(NAME contract
  SOURCES contract/forward.cu contract/backward.cu contract/forward_backward.cu
    contract/robustness.cu contract/device_check.cu)
# The contract tests never launch a kernel, so their device code is built as compute_80 PTX
# only: one device pass and no ptxas, 40% of the time of an "80;90a" build. The same kernels
# (default configurations, every element and gradient type) are built for every architecture,
# through ptxas, by the GPU tests below.
set_property(TARGET contract PROPERTY CUDA_ARCHITECTURES 80-virtual)

# GPU: against the fp64 references; the GPU reference's own check rides with the forward.
lce_add_test(NAME gpu_forward GPU
  SOURCES gpu/forward.cu support/gpu_reference.cu)
lce_add_test(NAME gpu_backward GPU
  SOURCES gpu/backward.cu)
lce_add_test(NAME gpu_forward_backward GPU
  SOURCES gpu/forward_backward.cu)
# GPU: the loss options and their outputs, every strategy and element type. The tag [small]
# (or the name filter "options small*") selects the quick subset for compute-sanitizer.
lce_add_test(NAME gpu_options GPU
  SOURCES gpu/options.cu)
# GPU: the robustness contract (docs/robustness.md): invalid targets and device_status,
# NaN/Inf inputs, extreme logits, degenerate shapes (n = 0, v = 1, d = 1), misaligned pointers,
# bitwise determinism of every output and strategy. [sanitize]: the compute-sanitizer subset.
lce_add_test(NAME gpu_robustness GPU
  SOURCES gpu/robustness.cu)
# GPU: seeded fuzz, 500 random cases against the fp64 CPU reference (LCE_FUZZ_SEED replays).
lce_add_test(NAME gpu_fuzz GPU
  SOURCES gpu/fuzz.cu)
# GPU: element counts beyond 2^31 (n·v, v·d, n·d), tag [huge]: ~50 GB of device memory, < 1 min.
lce_add_test(NAME gpu_huge GPU
  SOURCES gpu/huge.cu)
# The [huge] sizes take ~50 GB of device memory: never alongside another GPU test.
set_tests_properties(gpu_huge PROPERTIES RUN_SERIAL TRUE)

# The vocabulary-parallel layer (include/lce/nccl/), when NCCL is found: its argument contract
# on the CPU, the sharded results against the fp64 references on two GPUs (label gpu;
# skipped with fewer than 2 devices), and one rank on one GPU. The GPU test drives both devices from one process: one
# host thread per rank, communicators from ncclCommInitAll.
if(TARGET lce::nccl)
  add_library(lce_multi_gpu_test_main STATIC support/gpu_main.cpp)
  target_compile_definitions(lce_multi_gpu_test_main PRIVATE LCE_TEST_MIN_DEVICES=2)
  target_link_libraries(lce_multi_gpu_test_main PUBLIC lce::lce Catch2::Catch2 PRIVATE lce_warnings)

  lce_add_test(NAME nccl_contract SOURCES nccl/contract.cu)
  target_link_libraries(nccl_contract PRIVATE lce::nccl)
  # Launches nothing, as the contract test: PTX only (nccl_vocab_parallel builds the kernels).
  set_property(TARGET nccl_contract PROPERTY CUDA_ARCHITECTURES 80-virtual)
  set_tests_properties(nccl_contract PROPERTIES LABELS "cpu;nccl")

  add_executable(nccl_vocab_parallel nccl/vocab_parallel.cu)
  target_include_directories(nccl_vocab_parallel PRIVATE "${CMAKE_CURRENT_SOURCE_DIR}")
  target_link_libraries(nccl_vocab_parallel PRIVATE lce::nccl lce_warnings lce_multi_gpu_test_main
    Catch2::Catch2 CUDA::cublas)
  add_test(NAME nccl_vocab_parallel COMMAND nccl_vocab_parallel)
  set_tests_properties(nccl_vocab_parallel PROPERTIES LABELS "gpu;nccl" SKIP_RETURN_CODE 77
    TIMEOUT 1500 ENVIRONMENT "NCCL_NVLS_ENABLE=0")

  # One GPU: a communicator of one rank (every strategy, the stored one included).
  lce_add_test(NAME nccl_one_rank GPU SOURCES nccl/one_rank.cu)
  target_link_libraries(nccl_one_rank PRIVATE lce::nccl)
  set_tests_properties(nccl_one_rank PROPERTIES LABELS "gpu;nccl" ENVIRONMENT "NCCL_NVLS_ENABLE=0")
else()
  message(STATUS "lce: NCCL not found: the nccl_contract, nccl_vocab_parallel and nccl_one_rank tests are skipped")
endif()

# GPU: a binary built for sm_80 and plain sm_90 (no "a"): on an H100/H200 the launcher must
# skip the sm_90a kernels (their builds without wgmma/TMA) and run the mma.sync kernel.
lce_add_test(NAME gpu_arch_fallback GPU
  SOURCES gpu/arch_fallback.cu support/gpu_reference.cu)
set_property(TARGET gpu_arch_fallback PROPERTY CUDA_ARCHITECTURES 80 90)

# GPU: a binary with sm_80 SASS only (no PTX): on a device of another major architecture the
# launcher's device check must refuse with a message that names the fix (an 8.x device runs it).
lce_add_test(NAME gpu_no_kernel_image GPU
  SOURCES gpu/no_kernel_image.cu)
set_property(TARGET gpu_no_kernel_image PROPERTY CUDA_ARCHITECTURES 80-real)
