/// @file stored_offset.cuh
/// @brief The `stored` strategy with one offset per row (docs/algorithm.md §5.5): the forward
/// keeps E = e^{z − c} with c = z_target + 20, known before it (stored_offset_kernel), instead
/// of e^{z − m} with one maximum per (row, tile). Then dZ = diag(f)·E except at the target, with
/// f = a·e^{c − lse}/τ per row, so no pass over the n·V values forms dZ: dW = Eᵀ·(f ⊙ X) and
/// db = Eᵀ·f take the row scale on their n-long side, and dX = diag(f)·(E·W) takes it after an
/// fp32 GEMM (scale_rows_kernel), rounded once. The target's entry stays out of E (0 there,
/// stored_fix_kernel) and is added exactly: t = (a·p_y − b)/τ in fp32 from the forward's fp32
/// target logit (p_y − 1 is never formed from a 16-bit p_y), to dX's row as t·W_y before its
/// one rounding, and to dW's and db's target rows after their GEMMs (target_grad_kernel, rows
/// grouped by target in row order). A 16-bit dW row that is some row's target is rounded
/// twice, its large target part once.
///
/// Range: the element types keep fp32's exponent (bf16) or are not used here (fp16's e^{z − c}
/// would overflow at z − c > 11: the offset path takes bf16 only). e^{z − c} is finite for
/// z − c < 88 and every term with p > e^{−67} survives (z ≥ max − 47 > c − 87). A row whose
/// maximum lies more than 60 above c (its target ~80 nats below the row's best) is flagged by
/// the forward and recomputed whole by stored_fix_kernel (V dot products of length d).
#pragma once

#include <cmath>
#include <cstdint>

#include "../thread/cross_entropy.cuh"
#include "../thread/row_grad.cuh"
#include "../warp/reduce.cuh"

LCE_NAMESPACE_BEGIN
namespace kernel {

/// How far above the target logit a row's offset lies, and how far above the offset a row's
/// maximum may lie before the row is recomputed.
inline constexpr float stored_offset_lead = 20.0f;
inline constexpr float stored_offset_limit = 60.0f;

/// The fp32 dot product of two 16-bit rows of length d, by a warp (every lane gets it).
template <class Element>
__device__ inline float warp_dot(const Element* a, const Element* b, std::int64_t d) {
  float sum = 0.0f;
  for (std::int64_t k = threadIdx.x % 32; k < d; k += 32)
    sum = fmaf(static_cast<float>(a[k]), static_cast<float>(b[k]), sum);
  return warp::allreduce_sum(sum);
}

template <class Element>
struct stored_offset_params {
  const Element* x;  ///< the chunk's rows [rows, ldx]
  const Element* w;  ///< [v, ldw]
  std::int64_t rows, d, v, ldx, ldw;
  thread::target_view targets;  ///< by global row (row_offset: the chunk's first)
  thread::logit_transform transform;
  float* offset;  ///< [rows] out: z_target/τ + lead, or +inf for a row without a scored target
  int* flagged;   ///< [rows] out: 0 (the forward sets 1)
};

/// One warp per row of the chunk: the row's offset before the forward that stores against it.
template <class Element>
__global__ void LCE_KERNEL_VISIBILITY stored_offset_kernel(const stored_offset_params<Element> p) {
  const std::int64_t warps = static_cast<std::int64_t>(gridDim.x) * (blockDim.x / 32);
  for (std::int64_t r =
           static_cast<std::int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
       r < p.rows; r += warps) {
    const std::int64_t y = p.targets(r);
    float c = INFINITY;  // e^{z − ∞} = 0: an ignored row stores zeros
    if (thread::is_scored_target(y, p.targets.ignore_index, p.v)) {
      c = p.transform(warp_dot(p.x + r * p.ldx, p.w + y * p.ldw, p.d)) + stored_offset_lead;
    }
    if (threadIdx.x % 32 == 0) {
      p.offset[r] = c;
      p.flagged[r] = 0;
    }
  }
}

template <class Element>
struct stored_fix_params {
  thread::logit_grad_params<Element> grad;  ///< lse, targets, scalars, options; row0: the chunk's
  Element* values;                          ///< [rows, ld] the stored E of the chunk
  std::int64_t ld;
  const float* offset;        ///< [rows]
  const int* flagged;         ///< [rows]
  const float* target_logit;  ///< [n] the forward's fp32 target logits, by global row
  const Element* x;           ///< the chunk's rows [rows, ldx]
  const Element* w;           ///< [v, ldw]
  std::int64_t d, ldx, ldw;
  Element* x_scaled;  ///< [rows, ld_scaled] out: f ⊙ X
  std::int64_t ld_scaled;
  float* scale;          ///< [rows] out: f
  Element* scale_16bit;  ///< [rows] out: f in the element type (db's vector)
  float* target_grad;    ///< [rows] out: t, the target's entry of dZ/alpha (0: none)
  std::int64_t* target;  ///< [rows] out: the target's column, or −1
};

/// One block per row of the chunk, after the forward and its combine (the lse): the row scale
/// f, the target's entry t (and 0 in its place in E), f ⊙ x. A flagged row (its offset lay too
/// far below the row's maximum) is recomputed whole with f = 1/τ: E = a·p off the target.
template <class Element, int Threads>
__global__ void __launch_bounds__(Threads) LCE_KERNEL_VISIBILITY
    stored_fix_kernel(const stored_fix_params<Element> p) {
  const std::int64_t r = blockIdx.x;
  const std::int64_t row = p.grad.row0 + r;
  const thread::row_grad rg = thread::make_row_grad(p.grad, row);
  const float inv_t = p.grad.transform.inv_temperature;
  const float c = p.offset[r];
  const bool scored = thread::is_scored_target(rg.y, p.grad.targets.ignore_index, p.grad.v);
  const bool has_target = rg.active && scored;
  Element* e = p.values + r * p.ld;
  float f = 0.0f;
  bool recompute = false;
  if (has_target) {
    f = inv_t * rg.coeffs.p * expf(c - rg.lse);
    recompute = p.flagged[r] != 0 || !(f > 0.0f) || !isfinite(f);
  }
  if (recompute) {
    // dZ = f·E with f = 1/τ: E = a·p·τ·dz/draw off the target (dz/draw = (1 − (z/c)²)/τ under
    // a softcap, else 1/τ), every column from its recomputed logit.
    f = inv_t;
    const thread::logit_transform& tf = p.grad.transform;
    const int warp = static_cast<int>(threadIdx.x) / 32;
    for (std::int64_t col = warp; col < p.grad.v; col += Threads / 32) {
      if (col == rg.y) continue;  // the same for the whole warp
      const float z = tf(warp_dot(p.x + r * p.ldx, p.w + col * p.ldw, p.d));
      const float g =
          thread::logit_grad_of_prob(rg.coeffs, thread::softmax_prob(z, rg.lse), false, 1.0f);
      if (threadIdx.x % 32 == 0) e[col] = static_cast<Element>(g * tf.derivative(z) / inv_t);
    }
  }
  if (threadIdx.x == 0) {
    // The target's entry, exact: (a·p_y − b)/τ from the fp32 target logit; E holds 0 there.
    float t = 0.0f;
    if (has_target) {
      const float z_target = p.target_logit[row];
      const float p_target = thread::softmax_prob(z_target, rg.lse);
      t = (rg.coeffs.p * p_target - rg.coeffs.target) * p.grad.transform.derivative(z_target);
      e[rg.y] = static_cast<Element>(0.0f);
    }
    p.target_grad[r] = t;
    p.target[r] = has_target ? rg.y : -1;
    p.scale[r] = f;
    p.scale_16bit[r] = static_cast<Element>(f);
  }
  for (std::int64_t k = threadIdx.x; k < p.d; k += Threads)
    p.x_scaled[r * p.ld_scaled + k] =
        static_cast<Element>(f * static_cast<float>(p.x[r * p.ldx + k]));
}

/// dX's rows: out[r, k] = f_r·in[r, k] + alpha·t_r·W[y_r, k], rounded once; `in` dense fp32
/// [rows, cols] = alpha·(E·W) of the rows, out with row stride ld.
template <class Element>
struct scale_rows_params {
  const float* in;
  const float* scale;          ///< [rows] f
  const float* target_grad;    ///< [rows] t
  const std::int64_t* target;  ///< [rows] y, or −1
  const Element* w;
  std::int64_t ldw;
  const float* alpha;  ///< device scalar
  std::int64_t rows, cols;
  Element* out;
  std::int64_t ld;
};

/// Rows by blocks (grid-stride), columns by threads: no division per element.
template <class Element>
__global__ void LCE_KERNEL_VISIBILITY scale_rows_kernel(const scale_rows_params<Element> p) {
  const float alpha = *p.alpha;
  for (std::int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const float f = p.scale[r];
    const std::int64_t y = p.target[r];
    const float* in = p.in + r * p.cols;
    Element* out = p.out + r * p.ld;
    if (y >= 0) {
      const float t = alpha * p.target_grad[r];
      const Element* wy = p.w + y * p.ldw;
      for (std::int64_t k = threadIdx.x; k < p.cols; k += blockDim.x)
        out[k] = static_cast<Element>(fmaf(t, static_cast<float>(wy[k]), f * in[k]));
    } else {
      for (std::int64_t k = threadIdx.x; k < p.cols; k += blockDim.x)
        out[k] = static_cast<Element>(f * in[k]);
    }
  }
}

/// The rows of a chunk grouped by target in row order, in O(rows + V) work (the target_grad
/// kernel's input): a counting sort whose within-group order is restored by rank, so that
/// every group's sum runs in row order and is the same run to run.
///   1. target_count_kernel: start[y] = rows with target y (start and fill zeroed before);
///   2. scan_sums_kernel, exclusive_scan_kernel: start[y] = rows with a smaller target,
///      start[v] = the total (the tiles' totals in `sums`);
///   3. target_place_kernel: each row to a slot of its group (the order inside a group is
///      the atomics', not fixed);
///   4. target_order_kernel: each row to start[y] + its rank among its group's rows — the
///      ranks read the group (k² loads for a group of k, a warp's loads broadcast where its
///      rows share one group: 2048 warps × 65536 loads when all 65536 rows of a chunk share one
///      target).
struct target_group_params {
  const std::int64_t* target;  ///< [rows] −1: none
  std::int64_t rows, v;
  int* start;    ///< [v + 1]
  int* fill;     ///< [v]
  int* grouped;  ///< [rows] by group, unordered inside one
  int* ordered;  ///< [rows] by group, in row order inside one
  int* sums;     ///< [scan_tiles(v + 1)] the scan's tile totals
};

template <int Threads>
__global__ void __launch_bounds__(Threads) LCE_KERNEL_VISIBILITY
    target_count_kernel(const target_group_params p) {
  for (std::int64_t r = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       r < p.rows; r += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t y = p.target[r];
    if (y >= 0) atomicAdd(p.start + y, 1);
  }
}

/// The in-place exclusive prefix sum of the counts (v + 1 ints, 0.5–1 MiB) in tiles of
/// scan_tile_ints, by two kernels: scan_sums_kernel writes each tile's total, then
/// exclusive_scan_kernel, a block per tile, starts from the totals of the tiles before its own.
/// (One block carrying the sum from tile to tile pays every tile's load latency in a row;
/// bench/NOTES.md v20 has the timing.)
inline constexpr int scan_threads = 1024;
inline constexpr int scan_per_thread = 8;
inline constexpr std::int64_t scan_tile_ints = std::int64_t{scan_threads} * scan_per_thread;

/// The tiles of a scan over `count` ints (the totals scan_sums_kernel writes).
constexpr std::int64_t scan_tiles(std::int64_t count) noexcept {
  return (count + scan_tile_ints - 1) / scan_tile_ints;
}

/// The block's sum of `value`, in every thread (Threads a multiple of 32, at most 1024).
template <int Threads>
__device__ __forceinline__ int block_sum(int value, int* warp_total) {
  const int lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
#pragma unroll
  for (int o = 16; o > 0; o /= 2) value += __shfl_xor_sync(0xffffffffu, value, o);
  if (lane == 0) warp_total[warp] = value;
  __syncthreads();
  int total = 0;
#pragma unroll
  for (int w = 0; w < Threads / 32; ++w) total += warp_total[w];
  return total;
}

/// sums[b] = the total of tile b of a[0, count): a block per tile. (Templates, as every kernel
/// of the library, so that a header included by several translation units defines them once.)
template <int Threads = scan_threads>
__global__ void __launch_bounds__(Threads) LCE_KERNEL_VISIBILITY
    scan_sums_kernel(const int* a, std::int64_t count, int* sums) {
  static_assert(Threads == scan_threads, "scan_tile_ints ints a block");
  __shared__ int warp_total[scan_threads / 32];
  const std::int64_t first = blockIdx.x * scan_tile_ints + threadIdx.x;
  int sum = 0;
#pragma unroll
  for (int j = 0; j < scan_per_thread; ++j) {  // coalesced: a warp reads 128 bytes at a time
    const std::int64_t i = first + static_cast<std::int64_t>(j) * scan_threads;
    sum += i < count ? a[i] : 0;
  }
  const int total = block_sum<scan_threads>(sum, warp_total);
  if (threadIdx.x == 0) sums[blockIdx.x] = total;
}

/// a[i] = Σ a[0, i) in place, a block per tile of scan_tile_ints (scan_tiles(count) blocks),
/// after scan_sums_kernel: each thread scans 8 consecutive ints, the block scans the threads'
/// sums, and the tile starts from the totals of the tiles before it.
template <int Threads = scan_threads>
__global__ void __launch_bounds__(Threads) LCE_KERNEL_VISIBILITY
    exclusive_scan_kernel(int* a, std::int64_t count, const int* sums) {
  static_assert(Threads == scan_threads, "scan_tile_ints ints a block");
  constexpr int warps = scan_threads / 32;
  __shared__ int warp_total[warps];
  const int lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  // The tiles before this one: a few dozen totals (v ≤ 2^31 would be 262144), a thread each.
  int before = 0;
  for (int t = static_cast<int>(threadIdx.x); t < static_cast<int>(blockIdx.x); t += scan_threads)
    before += sums[t];
  const int carry = block_sum<scan_threads>(before, warp_total);
  __syncthreads();  // warp_total is written again below
  const std::int64_t first =
      blockIdx.x * scan_tile_ints + static_cast<std::int64_t>(threadIdx.x) * scan_per_thread;
  int v[scan_per_thread];
  int sum = 0;
#pragma unroll
  for (int j = 0; j < scan_per_thread; ++j) {
    v[j] = first + j < count ? a[first + j] : 0;
    sum += v[j];
  }
  // Inclusive scan of the threads' sums within the warp, then across the warps' totals.
  int inclusive = sum;
#pragma unroll
  for (int o = 1; o < 32; o *= 2) {
    const int other = __shfl_up_sync(0xffffffffu, inclusive, o);
    if (lane >= o) inclusive += other;
  }
  if (lane == 31) warp_total[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int total = lane < warps ? warp_total[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o *= 2) {
      const int other = __shfl_up_sync(0xffffffffu, total, o);
      if (lane >= o) total += other;
    }
    if (lane < warps) warp_total[lane] = total;  // inclusive over the warps
  }
  __syncthreads();
  int running = carry + inclusive - sum + (warp > 0 ? warp_total[warp - 1] : 0);
#pragma unroll
  for (int j = 0; j < scan_per_thread; ++j) {
    if (first + j < count) a[first + j] = running;
    running += v[j];
  }
}

template <int Threads>
__global__ void __launch_bounds__(Threads) LCE_KERNEL_VISIBILITY
    target_place_kernel(const target_group_params p) {
  for (std::int64_t r = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       r < p.rows; r += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t y = p.target[r];
    if (y >= 0) p.grouped[p.start[y] + atomicAdd(p.fill + y, 1)] = static_cast<int>(r);
  }
}

template <int Threads>
__global__ void __launch_bounds__(Threads) LCE_KERNEL_VISIBILITY
    target_order_kernel(const target_group_params p) {
  const int total = p.start[p.v];
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const int r = p.grouped[i];
    const std::int64_t y = p.target[r];
    const int begin = p.start[y], end = p.start[y + 1];
    int rank = 0;
    for (int j = begin; j < end; ++j) rank += p.grouped[j] < r ? 1 : 0;
    p.ordered[begin + rank] = r;
  }
}

/// The targets' entries into dW and db, after their GEMMs: for each column y that is the
/// target of rows of the chunk, dW[y, :] += alpha·Σ t_r·x_r and db[y] += alpha·Σ t_r over those
/// rows in row order (target_group: `ordered` from `start[y]`) — one block per group and column
/// slice (the blocks of its first slot; grid (rows, ⌈d / (8·Threads)⌉)), no atomics,
/// so the sums are the same run to run. Grad: dW's and db's
/// type (fp32 accumulators, or the caller's 16-bit ones, then rounded a second time).
template <class Element, class Grad>
struct target_grad_params {
  const std::int64_t* target;  ///< [rows] −1: none
  const int* start;            ///< [v + 1] target_group's
  const int* ordered;          ///< [rows] target_group's
  const float* target_grad;    ///< [rows] t
  const Element* x;            ///< the chunk's rows [rows, ldx]
  std::int64_t rows, v, d, ldx;
  const float* alpha;
  Grad* dw;  ///< [v, lddw] or null
  std::int64_t lddw;
  Grad* db;  ///< [v] or null
};

/// Columns a thread of target_grad_kernel sums at a time: a block's column slice is
/// target_grad_per_thread·Threads wide.
inline constexpr int target_grad_per_thread = 8;

template <class Element, class Grad, int Threads>
__global__ void __launch_bounds__(Threads) LCE_KERNEL_VISIBILITY
    target_grad_kernel(const target_grad_params<Element, Grad> p) {
  constexpr int per_thread = target_grad_per_thread;
  const int slot = static_cast<int>(blockIdx.x);
  if (slot >= p.start[p.v]) return;  // slots past the rows with a target
  const std::int64_t y = p.target[p.ordered[slot]];
  const int begin = p.start[y], end = p.start[y + 1];
  if (slot != begin) return;  // the group's first slot's block does it
  const float alpha = *p.alpha;
  float db_sum = 0.0f;  // thread 0's of the blocks of column slice 0
  // Column slices of per_thread·Threads by blockIdx.y, so that a large group (a frequent
  // token's rows) is summed by gridDim.y blocks at once; rows in row order within each.
  constexpr std::int64_t slice = static_cast<std::int64_t>(per_thread) * Threads;
  for (std::int64_t k0 = blockIdx.y * slice; k0 < p.d; k0 += gridDim.y * slice) {
    float acc[per_thread] = {};
#pragma unroll 4
    for (int i = begin; i < end; ++i) {
      const std::int64_t row = p.ordered[i];
      const float t = p.target_grad[row];
      if (k0 == 0 && threadIdx.x == 0) db_sum += t;
#pragma unroll
      for (int j = 0; j < per_thread; ++j) {
        const std::int64_t k = k0 + threadIdx.x + static_cast<std::int64_t>(j) * Threads;
        if (k < p.d) acc[j] = fmaf(t, static_cast<float>(p.x[row * p.ldx + k]), acc[j]);
      }
    }
    if (p.dw != nullptr) {
#pragma unroll
      for (int j = 0; j < per_thread; ++j) {
        const std::int64_t k = k0 + threadIdx.x + static_cast<std::int64_t>(j) * Threads;
        if (k < p.d) {
          Grad& o = p.dw[y * p.lddw + k];
          o = static_cast<Grad>(static_cast<float>(o) + alpha * acc[j]);
        }
      }
    }
  }
  if (p.db != nullptr && blockIdx.y == 0 && threadIdx.x == 0)
    p.db[y] = static_cast<Grad>(static_cast<float>(p.db[y]) + alpha * db_sum);
}

}  // namespace kernel
LCE_NAMESPACE_END
