/// @file sm90.cuh
/// @brief Hopper (sm_90a) primitives of the fused kernels (block/tile_pipeline_sm90.cuh):
/// mbarriers, the bulk tensor copy (TMA), shared-memory matrix descriptors, warpgroup MMA
/// (wgmma), setmaxnreg, and the fast exp2/softcap of their epilogues. Outside an sm_90a device
/// pass the sm_90a-only instructions compile to nothing; the launchers only pick the kernels
/// that use them on a device that runs sm_90a code (device::sm90_kernel_runs).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "../version.hpp"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LCE_SM90A 1
#endif

LCE_NAMESPACE_BEGIN
namespace arch::sm90 {

__device__ inline std::uint32_t smem_address(const void* p) noexcept {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

// ---- mbarrier ----------------------------------------------------------------------------

__device__ inline void barrier_init(std::uint64_t* bar, unsigned count) noexcept {
#if defined(LCE_SM90A)
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_address(bar)), "r"(count)
               : "memory");
#endif
}

/// Makes initialized barriers visible to the copy engine (the async proxy).
__device__ inline void barrier_init_fence() noexcept {
#if defined(LCE_SM90A)
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

/// Arrives once and announces `bytes` of incoming transactions for the current phase.
__device__ inline void barrier_arrive_expect_tx(std::uint64_t* bar, unsigned bytes) noexcept {
#if defined(LCE_SM90A)
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_address(bar)),
               "r"(bytes)
               : "memory");
#endif
}

__device__ inline void barrier_arrive(std::uint64_t* bar) noexcept {
#if defined(LCE_SM90A)
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_address(bar)) : "memory");
#endif
}

/// Waits until the phase of parity `parity` has completed.
__device__ inline void barrier_wait(std::uint64_t* bar, unsigned parity) noexcept {
#if defined(LCE_SM90A)
  const std::uint32_t addr = smem_address(bar);
  std::uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(addr), "r"(parity)
        : "memory");
  } while (done == 0);
#endif
}

/// Arrives once on the barrier at the same shared-memory offset as `bar` in block `cta` of the
/// cluster. Default semantics (release at CTA scope): the stage's readers are wgmma operations
/// already waited for; a cluster-scope release would fence every memory operation of the thread
/// on each call.
__device__ inline void barrier_arrive_cluster(std::uint64_t* bar, unsigned cta) noexcept {
#if defined(LCE_SM90A)
  asm volatile(
      "{\n.reg .b32 remote;\n"
      "mapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [remote];\n}\n" ::"r"(smem_address(bar)),
      "r"(cta)
      : "memory");
#endif
}

// ---- thread block clusters -------------------------------------------------------------------

/// This block's rank in its cluster.
__device__ inline unsigned cluster_rank() noexcept {
  unsigned rank = 0;
#if defined(LCE_SM90A)
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(rank));
#endif
  return rank;
}

/// Every thread of every block of the cluster arrives and waits (release / acquire): barrier
/// initializations before it are visible cluster-wide after it, and no block leaves while a
/// peer may still write its shared memory.
__device__ inline void cluster_sync() noexcept {
#if defined(LCE_SM90A)
  asm volatile(
      "barrier.cluster.arrive.release.aligned;\n"
      "barrier.cluster.wait.acquire.aligned;\n" ::
          : "memory");
#endif
}

// ---- bulk tensor copy ----------------------------------------------------------------------

/// Copies the box at (c0 innermost, c1) of the tensor map into shared memory; completion is
/// counted in bytes on `bar`. Out-of-bounds elements arrive as zeros.
__device__ inline void tma_load_2d(void* dst, const void* tensor_map, int c0, int c1,
                                   std::uint64_t* bar) noexcept {
#if defined(LCE_SM90A)
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(smem_address(dst)),
      "l"(reinterpret_cast<std::uint64_t>(tensor_map)), "r"(c0), "r"(c1), "r"(smem_address(bar))
      : "memory");
#endif
}

/// tma_load_2d into the same shared-memory offsets (`dst`, `bar`) of every block of the
/// cluster in `cta_mask`: each receives the box and counts its bytes on its own barrier.
__device__ inline void tma_load_2d_multicast(void* dst, const void* tensor_map, int c0, int c1,
                                             std::uint64_t* bar, std::uint16_t cta_mask) noexcept {
#if defined(LCE_SM90A)
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      ".multicast::cluster [%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(smem_address(dst)),
      "l"(reinterpret_cast<std::uint64_t>(tensor_map)), "r"(c0), "r"(c1), "r"(smem_address(bar)),
      "h"(cta_mask)
      : "memory");
#endif
}

/// Copies the box at (c0 innermost, c1) of the tensor map from shared address `src` to global
/// memory, in this thread's bulk async-group (commit with bulk_commit_group). Elements outside
/// the tensor map are not written. The writes of `src` must be made visible to the async proxy
/// first (fence_proxy_async_shared, then a barrier of the writing threads).
__device__ inline void tma_store_2d(const void* tensor_map, std::uint32_t src, int c0,
                                    int c1) noexcept {
#if defined(LCE_SM90A)
  asm volatile(
      "cp.async.bulk.tensor.2d.global.shared::cta.tile.bulk_group [%0, {%1, %2}], [%3];\n" ::"l"(
          reinterpret_cast<std::uint64_t>(tensor_map)),
      "r"(c0), "r"(c1), "r"(src)
      : "memory");
#endif
}

/// Closes this thread's bulk async-group of stores issued since the last commit.
__device__ inline void bulk_commit_group() noexcept {
#if defined(LCE_SM90A)
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
#endif
}

/// Waits until at most `Pending` of this thread's committed bulk groups still read their shared
/// memory source (which may then be overwritten).
template <int Pending>
__device__ inline void bulk_wait_group_read() noexcept {
#if defined(LCE_SM90A)
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(Pending) : "memory");
#endif
}

/// Waits until at most `Pending` of this thread's committed bulk groups are incomplete (their
/// global writes done).
template <int Pending>
__device__ inline void bulk_wait_group() noexcept {
#if defined(LCE_SM90A)
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(Pending) : "memory");
#endif
}

/// Makes this thread's generic-proxy writes of shared memory visible to the async proxy (the
/// bulk copies that read them next).
__device__ inline void fence_proxy_async_shared() noexcept {
#if defined(LCE_SM90A)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

/// A barrier of `Threads` threads (whole warps) on hardware barrier `id` (1–15; 0 is
/// __syncthreads's).
template <int Threads>
__device__ inline void named_barrier_sync(int id) noexcept {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "n"(Threads) : "memory");
}

/// Stores four 8×8 matrices of 16-bit pairs to shared memory (`stmatrix...x4`): register i of
/// each thread is its pair (row lane/4, columns 2·(lane%4), +1) of matrix i, the layout of a
/// wgmma accumulator fragment; lanes 8i to 8i + 7 give the addresses of matrix i's 8 rows
/// (16 bytes each).
__device__ inline void stmatrix_x4(std::uint32_t address, std::uint32_t r0, std::uint32_t r1,
                                   std::uint32_t r2, std::uint32_t r3) noexcept {
#if defined(LCE_SM90A)
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(address),
               "r"(r0), "r"(r1), "r"(r2), "r"(r3)
               : "memory");
#endif
}

__device__ inline void tma_prefetch_descriptor(const void* tensor_map) noexcept {
#if defined(LCE_SM90A)
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<std::uint64_t>(tensor_map))
               : "memory");
#endif
}

// ---- fast math of the epilogues --------------------------------------------------------------

/// Two floats rounded to a packed pair of the 16-bit element type (low half: `a`).
template <class Element>
__device__ __forceinline__ std::uint32_t pack_pair(float a, float b) noexcept {
  if constexpr (std::is_same_v<Element, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<const std::uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(a, b);
    return *reinterpret_cast<const std::uint32_t*>(&v);
  }
}

/// Stores two floats as a pair of the 16-bit element type at a 4-byte aligned `at`.
template <class Element>
__device__ __forceinline__ void store_pair(Element* at, float a, float b) noexcept {
  *reinterpret_cast<std::uint32_t*>(at) = pack_pair<Element>(a, b);
}

/// 2^x on the special-function unit (`ex2.approx.ftz`: relative error about 2⁻²², results
/// below 2⁻¹²⁶ flushed to zero).
__device__ __forceinline__ float fast_exp2(float x) noexcept {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

/// 1/x on the special-function unit (`rcp.approx.ftz`: about 1 ulp; 1/inf = 0, 1/0 = inf).
__device__ __forceinline__ float fast_rcp(float x) noexcept {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

/// c·tanh(y) for y = raw·scale (scale = 1/(τ·c)), as c − 2c/(1 + e^{2y}): one ex2, one
/// reciprocal and four FP32 instructions, no branch (the two-sided (1 − e)/(1 + e), e =
/// e^{−2|y|}, needs a series near 0, selects and the sign put back: twelve more, in an epilogue
/// that runs between MMAs). It saturates by itself: e^{2y} overflows to +inf (→ c) or
/// underflows to 0 (→ −c). Absolute error at most about c·2⁻²¹, from ex2's and the
/// reciprocal's relative errors. An infinite or NaN logit gives NaN, as thread::logit_transform
/// does (docs/robustness.md: never a finite wrong number): raw·0 + c is NaN exactly there.
__device__ __forceinline__ float fast_softcap(float raw, float scale, float cap) noexcept {
  constexpr float two_log2e = 2.0f * 1.4426950408889634f;
  const float r = fast_rcp(1.0f + fast_exp2(raw * (scale * two_log2e)));
  return fmaf(-2.0f * cap, r, fmaf(raw, 0.0f, cap));
}

// ---- warpgroup MMA -------------------------------------------------------------------------

/// Descriptor of a K-major operand tile in shared memory written with the 128-byte swizzle
/// (rows of 128 bytes, 8-row atoms of 1024 bytes, atom-aligned). Adding 2 to the descriptor
/// advances the start by 32 bytes: the next k16 slice of a 16-bit tile.
__device__ inline std::uint64_t smem_descriptor_sw128(const void* tile) noexcept {
  const std::uint64_t addr = smem_address(tile);
  std::uint64_t desc = (addr & 0x3FFFFu) >> 4;  // start address, 16-byte units
  desc |= std::uint64_t{1} << 16;               // leading byte offset (unused when swizzled)
  desc |= std::uint64_t{1024 >> 4} << 32;       // stride byte offset: one 8-row atom
  desc |= std::uint64_t{1} << 62;               // 128-byte swizzle
  return desc;
}

__device__ inline void wgmma_fence() noexcept {
#if defined(LCE_SM90A)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

__device__ inline void wgmma_commit() noexcept {
#if defined(LCE_SM90A)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

template <int Pending>
__device__ inline void wgmma_wait() noexcept {
#if defined(LCE_SM90A)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(Pending) : "memory");
#endif
}

/// Keeps the compiler from moving accesses of an accumulator register across a wgmma wait.
__device__ inline void register_fence(float& r) noexcept { asm volatile("" : "+f"(r)::"memory"); }

template <int Count>
__device__ inline void set_max_registers_inc() noexcept {
#if defined(LCE_SM90A)
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(Count));
#endif
}
template <int Count>
__device__ inline void set_max_registers_dec() noexcept {
#if defined(LCE_SM90A)
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(Count));
#endif
}

// D[64, N] (+)= A[64, 16]·B[N, 16]ᵀ, both K-major in shared memory, fp32 accumulators in the
// fragment layout of the warpgroup: thread t holds rows 16·(t/32) + (t%32)/4 (+8) and column
// pairs 8·j + 2·(t%4). scale_d = 0 overwrites D. One per N and input type.
// Generated by scripts/gen_wgmma.py: edit the script, not this block.
__device__ __forceinline__ void wgmma_m64n128k16_bf16(float (&d)[64], std::uint64_t desc_a,
                                                      std::uint64_t desc_b, int scale_d) {
#if defined(LCE_SM90A)
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
        "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
#else
  (void)d;
  (void)desc_a;
  (void)desc_b;
  (void)scale_d;
#endif
}

__device__ __forceinline__ void wgmma_m64n128k16_f16(float (&d)[64], std::uint64_t desc_a,
                                                     std::uint64_t desc_b, int scale_d) {
#if defined(LCE_SM90A)
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
        "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
#else
  (void)d;
  (void)desc_a;
  (void)desc_b;
  (void)scale_d;
#endif
}

__device__ __forceinline__ void wgmma_m64n256k16_bf16(float (&d)[128], std::uint64_t desc_a,
                                                      std::uint64_t desc_b, int scale_d) {
#if defined(LCE_SM90A)
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, "
      "%127}, "
      "%128, %129, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
        "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]),
        "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]),
        "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]),
        "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]),
        "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]),
        "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]),
        "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]),
        "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]),
        "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
#else
  (void)d;
  (void)desc_a;
  (void)desc_b;
  (void)scale_d;
#endif
}

__device__ __forceinline__ void wgmma_m64n256k16_f16(float (&d)[128], std::uint64_t desc_a,
                                                     std::uint64_t desc_b, int scale_d) {
#if defined(LCE_SM90A)
  asm volatile(
      "{\n.reg .pred p;\n"
      "setp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, "
      "%127}, "
      "%128, %129, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
        "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]),
        "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]),
        "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]),
        "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]),
        "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]),
        "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]),
        "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]),
        "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]),
        "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
#else
  (void)d;
  (void)desc_a;
  (void)desc_b;
  (void)scale_d;
#endif
}
// End of generated code.

/// D += A·Bᵀ for a 64×N tile of the element type.
template <class Element, int N>
__device__ __forceinline__ void wgmma_m64k16(float (&d)[N / 2], std::uint64_t desc_a,
                                             std::uint64_t desc_b, int scale_d) {
  if constexpr (std::is_same_v<Element, __nv_bfloat16>) {
    if constexpr (N == 256)
      wgmma_m64n256k16_bf16(d, desc_a, desc_b, scale_d);
    else
      wgmma_m64n128k16_bf16(d, desc_a, desc_b, scale_d);
  } else {
    if constexpr (N == 256)
      wgmma_m64n256k16_f16(d, desc_a, desc_b, scale_d);
    else
      wgmma_m64n128k16_f16(d, desc_a, desc_b, scale_d);
  }
}

}  // namespace arch::sm90
LCE_NAMESPACE_END
