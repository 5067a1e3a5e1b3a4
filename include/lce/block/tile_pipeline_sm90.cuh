/// @file tile_pipeline_sm90.cuh
/// @brief The sm_90a mainloop shared by the fused kernels: tiles of Z = X·Wᵀ (128 rows ×
/// BlockV vocabulary rows, fp32) computed by warpgroup MMA from shared memory fed by bulk
/// tensor copies, handed to an epilogue in registers.
///
/// Block of three warpgroups. Warpgroup 0 is the producer: one thread streams the (128, 64) box
/// of X and the (BlockV, 64) box of W of every K step into a Stages-deep ring of shared-memory
/// stages (128-byte swizzle, zero fill outside the tensor maps), each stage guarded by a "full"
/// mbarrier (transaction bytes) and an "empty" one (consumer arrivals). Warpgroups 1 and 2 each
/// own 64 rows: they run wgmma over the stages into 64 × BlockV fp32 accumulators in registers
/// and give each finished tile to their epilogue, while the producer already loads the next.
///
/// With Config::cluster_m = 2 the grid's blocks pair up in clusters of two along the rows
/// (blocks 2i and 2i + 1: adjacent row tiles, the same vocabulary split, so the same W tiles in
/// the same order). Each block's producer loads its own X box and half of the W box (BlockV/2
/// rows: the W tensor map's box is that high), multicast into the same stage of both blocks; a
/// stage's "full" barrier counts all its bytes, and its "empty" barrier also waits for the
/// peer's consumers (one arrival per consumer warp, sent across the cluster), because the
/// peer's producer writes into it.
#pragma once

#include <cuda.h>

#include <cstdint>

#include "../arch/sm90.cuh"

LCE_NAMESPACE_BEGIN
namespace block {

/// The vocabulary tiles [begin, end) of split `y` when `tiles` tiles are spread over `splits`
/// splits as evenly as they go: ⌊tiles/splits⌋ each, one more for the first tiles mod splits.
struct tile_range {
  std::int64_t begin, end;
};
__host__ __device__ constexpr tile_range split_range(std::int64_t tiles, std::int64_t splits,
                                                     std::int64_t y) noexcept {
  const std::int64_t base = tiles / splits, extra = tiles % splits;
  const std::int64_t begin = y * base + (y < extra ? y : extra);
  return {begin, begin + base + (y < extra ? 1 : 0)};
}

/// Row tiles whose blocks run together while their splits advance: blocks start in linear
/// order (x fastest), and with x the row tile the ~132 resident blocks would each stream their
/// own X tile once per vocabulary tile (132 × 1 MiB at d = 4096, past the 50 MiB L2, so from
/// HBM each time). In groups of 16 row tiles the resident blocks hold 16 X tiles and ~8 splits'
/// W tiles, which stay in L2. A multiple of every cluster size, so a cluster's blocks keep one
/// split and consecutive row tiles. LCE_SM90_RASTER_ROWS overrides it (0: the grid's own
/// order, every row tile in one group), for measuring the order against another.
#ifndef LCE_SM90_RASTER_ROWS
#define LCE_SM90_RASTER_ROWS 16
#endif
inline constexpr unsigned raster_group_rows = LCE_SM90_RASTER_ROWS;
static_assert(raster_group_rows % 2 == 0, "whole clusters of up to 2 blocks in a group");

/// The (row tile, split) of block `linear` (in launch order, x fastest) of a grid of (`rows`
/// row tiles, `splits` splits) in groups of `group` row tiles (0: one group of all): the
/// blocks of a group take its row tiles split by split, then the next group's. A bijection
/// onto the grid; a grid of at most one group keeps x as the row tile and y as the split; with
/// an even group and an even `rows`, the two blocks of a cluster (x, x + 1), x even, keep one
/// split and consecutive row tiles (test/contract checks both).
struct grid_tile {
  std::int64_t row_tile;
  std::int64_t split;
};
__host__ __device__ constexpr grid_tile raster_tile(unsigned linear, unsigned rows, unsigned splits,
                                                    unsigned group) noexcept {
  group = group == 0 ? rows : group;
  const unsigned first = linear / (group * splits) * group;
  const unsigned height = rows - first < group ? rows - first : group;
  const unsigned j = linear - first * splits;
  return {static_cast<std::int64_t>(first + j % height), static_cast<std::int64_t>(j / height)};
}

/// This block's (row tile, split): raster_tile in groups of raster_group_rows.
__device__ __forceinline__ grid_tile grid_tile_of_block() {
  return raster_tile(blockIdx.y * gridDim.x + blockIdx.x, gridDim.x, gridDim.y, raster_group_rows);
}

/// EpilogueBytes: shared memory the epilogue keeps beside the stages (`shared_storage::epilogue`,
/// 1024-byte aligned), e.g. a staging tile for bulk stores.
template <class Element, class Config, int EpilogueBytes = 0>
struct tile_pipeline_sm90 {
  static constexpr int block_m = Config::block_m;  // 128: two consumer warpgroups of 64 rows
  static constexpr int block_v = Config::block_v;
  static constexpr int block_k = Config::block_k;  // 64: one 128-byte swizzle row
  static constexpr int stages = Config::stages;
  static constexpr int threads = Config::threads;  // 384
  static constexpr int frag = block_v / 2;         // accumulators per consumer thread
  static constexpr int a_bytes = block_m * block_k * 2;
  static constexpr int b_bytes = block_v * block_k * 2;
  static constexpr unsigned stage_bytes = a_bytes + b_bytes;
  static constexpr int consumers = 256;
  static constexpr int cluster_m = Config::cluster_m;
  /// Rows of the W map's box: each block of a cluster loads its share of the W tile.
  static constexpr int w_box_rows = block_v / cluster_m;
  /// Arrivals that release a stage: every local consumer thread, and with a cluster one per
  /// consumer warp of the peer.
  static constexpr unsigned empty_arrivals = consumers + (cluster_m > 1 ? consumers / 32 : 0);
  static_assert(sizeof(Element) == 2, "the sm_90a pipeline takes 16-bit elements");
  static_assert(block_m == 128 && block_k == 64 && threads == 384, "fixed warpgroup layout");

  struct shared_storage {
    alignas(1024) unsigned char a[stages][a_bytes];
    alignas(1024) unsigned char b[stages][b_bytes];
    alignas(1024) unsigned char epilogue[EpilogueBytes > 0 ? EpilogueBytes : 1];
    std::uint64_t full[stages];
    std::uint64_t empty[stages];
  };
  /// Dynamic shared memory to request: the storage plus slack to align it to 1024 bytes.
  static constexpr int smem_bytes = static_cast<int>(sizeof(shared_storage)) + 1024;
  static_assert(smem_bytes <= 227 * 1024,
                "the stages and the epilogue's bytes exceed a block's "
                "shared memory");

  /// The shared storage inside the dynamic shared memory, aligned to 1024 bytes.
  __device__ static shared_storage& storage(unsigned char* smem) {
    const auto base = reinterpret_cast<std::uintptr_t>(smem);
    return *reinterpret_cast<shared_storage*>((base + 1023) & ~std::uintptr_t{1023});
  }

  /// The body of a __global__ kernel on this pipeline: the functor `Kernel` over the dynamic
  /// shared memory. Built without sm_90a features (e.g. plain sm_90, or sm_80), a static shared
  /// marker instead tells the launcher (device::sm90_kernel_runs reads sharedSizeBytes) not to
  /// pick this build; should it run anyway, thread t < 128 of the block of row tile i
  /// (grid_tile_of_block) calls `fallback(i·128 + t)` to poison its row's outputs (NaN rather
  /// than garbage).
  template <class Kernel, class Params, class Fallback>
  __device__ __forceinline__ static void run_kernel(const Params& p, Fallback&& fallback) {
#if defined(LCE_SM90A)
    extern __shared__ __align__(128) unsigned char smem[];
    Kernel{}(p, storage(smem));
    (void)fallback;
#else
    __shared__ volatile int not_sm90a[4];
    if (threadIdx.x == 0) not_sm90a[0] = 1;
    const std::int64_t row = grid_tile_of_block().row_tile * block_m + threadIdx.x;
    if (threadIdx.x < block_m) fallback(row);
#endif
  }

  /// First of the two fragment rows a consumer thread holds, relative to the whole matrix
  /// (the block's row tile, grid_tile_of_block): row 16·(t/32) + (t%32)/4 of its
  /// warpgroup's 64; the other is +8.
  __device__ __forceinline__ static std::int64_t fragment_row0(int half) {
    const int t = static_cast<int>(threadIdx.x) % 128;
    return grid_tile_of_block().row_tile * block_m + half * 64 + (t / 32) * 16 + (t % 32) / 4;
  }
  /// Which pair of columns of every group of 8 a consumer thread holds (t % 4).
  __device__ __forceinline__ static int fragment_quad() {
    return static_cast<int>(threadIdx.x) % 128 % 4;
  }

  /// The block's share of a grid (row tiles, vocabulary splits; device::make_balanced_grid), at
  /// grid_tile_of_block's (row tile i, split y): rows from i·128; of the T = ceil(cols / BlockV)
  /// vocabulary tiles, split y of gridDim.y gets ⌊T/splits⌋ + (y < T mod splits) consecutive
  /// ones; K = d.
  template <class MakeEpilogue>
  __device__ __forceinline__ static void run_split(const CUtensorMap* x_map,
                                                   const CUtensorMap* w_map, shared_storage& s,
                                                   std::int64_t cols, std::int64_t d,
                                                   MakeEpilogue&& make_epilogue) {
    const grid_tile at = grid_tile_of_block();
    const std::int64_t row0 = at.row_tile * block_m;
    const std::int64_t vocab_tiles = (cols + block_v - 1) / block_v;
    const tile_range tiles = split_range(vocab_tiles, gridDim.y, at.split);
    const std::int64_t tile_begin = tiles.begin, tile_end = tiles.end;
    const int k_tiles = static_cast<int>((d + block_k - 1) / block_k);
    run(x_map, w_map, s, row0, tile_begin, tile_end, k_tiles,
        static_cast<MakeEpilogue&&>(make_epilogue));
  }

  /// Runs the pipeline over vocabulary tiles [tile_begin, tile_end) (tile t: rows t·BlockV of
  /// the W map) for the 128 rows from row0 of the X map, K in k_tiles steps of 64. Each
  /// consumer warpgroup h ∈ {0, 1} makes its epilogue with make_epilogue(h), then calls
  /// epilogue.tile(acc, t) for every tile (thread t of the warpgroup holds rows
  /// 16·(t/32) + (t%32)/4 and +8 of its 64 at acc[4j + 2h + e], columns 8j + 2(t%4) + e) and
  /// epilogue.finish() at the end. Called by all threads of the block.
  template <class MakeEpilogue>
  __device__ __forceinline__ static void run(const CUtensorMap* x_map, const CUtensorMap* w_map,
                                             shared_storage& s, std::int64_t row0,
                                             std::int64_t tile_begin, std::int64_t tile_end,
                                             int k_tiles, MakeEpilogue&& make_epilogue) {
    const int warpgroup = static_cast<int>(threadIdx.x) / 128;
    if (threadIdx.x == 0) {
      for (int st = 0; st < stages; ++st) {
        arch::sm90::barrier_init(&s.full[st], 1);
        arch::sm90::barrier_init(&s.empty[st], empty_arrivals);
      }
      arch::sm90::barrier_init_fence();
    }
    if constexpr (cluster_m > 1) {
      arch::sm90::cluster_sync();  // the peer's barriers exist before anything targets them
    } else {
      __syncthreads();
    }

    if (warpgroup == 0) {
      arch::sm90::set_max_registers_dec<40>();
      if (threadIdx.x == 0) produce(x_map, w_map, s, row0, tile_begin, tile_end, k_tiles);
    } else {
      arch::sm90::set_max_registers_inc<232>();
      auto epilogue = make_epilogue(warpgroup - 1);
      consume(s, warpgroup - 1, tile_begin, tile_end, k_tiles, epilogue);
      epilogue.finish();
    }
    if constexpr (cluster_m > 1) {
      __syncwarp();
      arch::sm90::cluster_sync();  // no block leaves while its peer may still signal it
    }
  }

 private:
  __device__ __forceinline__ static void produce(const CUtensorMap* x_map, const CUtensorMap* w_map,
                                                 shared_storage& s, std::int64_t row0,
                                                 std::int64_t tile_begin, std::int64_t tile_end,
                                                 int k_tiles) {
    arch::sm90::tma_prefetch_descriptor(x_map);
    arch::sm90::tma_prefetch_descriptor(w_map);
    unsigned it = 0;
    const unsigned rank = cluster_m > 1 ? arch::sm90::cluster_rank() : 0u;
    for (std::int64_t tile = tile_begin; tile < tile_end; ++tile) {
      for (int k = 0; k < k_tiles; ++k, ++it) {
        const unsigned st = it % stages;
        // A fresh barrier counts as having completed the phase before its first: round 0
        // passes at once, round r waits for the consumers' release of round r − 1.
        arch::sm90::barrier_wait(&s.empty[st], ((it / stages) & 1u) ^ 1u);
        arch::sm90::barrier_arrive_expect_tx(&s.full[st], stage_bytes);
        arch::sm90::tma_load_2d(s.a[st], x_map, k * block_k, static_cast<int>(row0), &s.full[st]);
        const int w_row = static_cast<int>(tile * block_v) + static_cast<int>(rank) * w_box_rows;
        if constexpr (cluster_m > 1) {
          // This block's half of the W box, into the same stage of both blocks.
          constexpr auto both = static_cast<std::uint16_t>((1u << cluster_m) - 1);
          arch::sm90::tma_load_2d_multicast(s.b[st] + rank * (b_bytes / cluster_m), w_map,
                                            k * block_k, w_row, &s.full[st], both);
        } else {
          arch::sm90::tma_load_2d(s.b[st], w_map, k * block_k, w_row, &s.full[st]);
        }
      }
    }
  }

  /// Releases a stage: every consumer thread arrives locally; with a cluster, lane 0 of each
  /// warp also arrives at the peer (the warp's reads of the stage are complete by then).
  __device__ __forceinline__ static void release(shared_storage& s, unsigned st) {
    arch::sm90::barrier_arrive(&s.empty[st]);
    if constexpr (cluster_m > 1) {
      __syncwarp();
      if (threadIdx.x % 32 == 0) {
        arch::sm90::barrier_arrive_cluster(&s.empty[st], arch::sm90::cluster_rank() ^ 1u);
      }
    }
  }

  template <class Epilogue>
  __device__ __forceinline__ static void consume(shared_storage& s, int half,
                                                 std::int64_t tile_begin, std::int64_t tile_end,
                                                 int k_tiles, Epilogue& epilogue) {
    float acc[frag];
    unsigned it = 0;
    const int a_offset = half * 64 * 128;  // this warpgroup's 64 rows of 128 bytes
    for (std::int64_t tile = tile_begin; tile < tile_end; ++tile) {
      unsigned previous = 0;
      for (int k = 0; k < k_tiles; ++k, ++it) {
        const unsigned st = it % stages;
        arch::sm90::barrier_wait(&s.full[st], (it / stages) & 1u);
        const std::uint64_t da = arch::sm90::smem_descriptor_sw128(s.a[st] + a_offset);
        const std::uint64_t db = arch::sm90::smem_descriptor_sw128(s.b[st]);
        arch::sm90::wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < block_k / 16; ++kk) {
          arch::sm90::wgmma_m64k16<Element, block_v>(acc, da + 2 * kk, db + 2 * kk,
                                                     (k > 0 || kk > 0) ? 1 : 0);
        }
        arch::sm90::wgmma_commit();
        if (k > 0) {  // step k − 1's MMAs are done: its stage may be refilled
          arch::sm90::wgmma_wait<1>();
          release(s, previous);
        }
        previous = st;
      }
      arch::sm90::wgmma_wait<0>();
#pragma unroll
      for (int i = 0; i < frag; ++i) arch::sm90::register_fence(acc[i]);
      release(s, previous);
      epilogue.tile(acc, tile);
    }
  }
};

}  // namespace block
LCE_NAMESPACE_END
