/// @file launch.cuh
/// @brief What every device-wide launcher shares (the forward, the chunked backward and the
/// vocabulary-parallel layer): the kernel parameters made from the loss options, the
/// loss-scalars step that every call begins with, the device check, and the grid, probe and
/// cluster launch of the sm_90a kernels.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>

#include "../args.hpp"
#include "../detail/device_check.hpp"
#include "../detail/tensor_map.hpp"
#include "../kernel/loss_scalars.cuh"
#include "../options.hpp"
#include "../status.hpp"
#include "../thread/cross_entropy.cuh"
#include "../thread/finish_row.cuh"
#include "../thread/loss_scalars.cuh"

LCE_NAMESPACE_BEGIN
namespace device {

inline thread::target_view make_target_view(const std::int64_t* targets,
                                            const loss_options& o) noexcept {
  return {targets, o.shift_seq_len, o.ignore_index};
}

inline thread::logit_transform make_transform(const loss_options& o) noexcept {
  return {1.0f / o.temperature, o.softcap};
}

inline thread::row_loss_params make_row_loss_params(const std::int64_t* targets, const problem& s,
                                                    const loss_options& o,
                                                    const float* class_weight,
                                                    const thread::loss_scalars* scalars) noexcept {
  return {make_target_view(targets, o), s.v, class_weight, o.label_smoothing, o.z_loss, scalars};
}

/// Enqueues the scalars of a loss (valid rows, weight sums, gradient normalizer); counts the
/// invalid targets into `status` when it is not null.
inline cudaError_t run_loss_scalars(const std::int64_t* targets, const float* class_weight,
                                    const float* grad, const problem& s, const loss_options& o,
                                    thread::loss_scalars* out, device_status* status,
                                    cudaStream_t stream) noexcept {
  constexpr int threads = 512;
  const kernel::loss_scalars_params p{
      make_target_view(targets, o), s.n, s.v, class_weight, grad, o.reduction, out, status};
  kernel::loss_scalars_kernel<threads><<<1, threads, 0, stream>>>(p);
  LCE_CHECK_LAUNCH("loss_scalars_kernel");
  return cudaSuccess;
}

/// @brief Whether the current device runs this translation unit's lce kernels
/// (detail::check_device), probed with loss_scalars_kernel: every call that launches kernels
/// launches it, and without this check its launch would be the first to fail, with a bare
/// "no kernel image".
inline cudaError_t check_current_device() noexcept {
  static std::atomic<std::uint64_t> verified{0};
  return detail::check_device(reinterpret_cast<const void*>(kernel::loss_scalars_kernel<512>),
                              verified);
}

/// Grid of a fused kernel (the forward, the sm_90a recompute): (row tiles, vocabulary splits of
/// tiles_per_split tiles).
struct forward_grid {
  std::int64_t row_tiles = 0, vocab_tiles = 0, tiles_per_split = 0, splits = 0;
};

/// SM count the sm_90a grids are balanced for (H100 SXM and H200). A constant, so that the
/// workspace size stays a function of the shape alone; on a device with another count the grid
/// is as correct, only less evenly spread.
inline constexpr std::int64_t nominal_sms = 132;
/// Most vocabulary splits of an sm_90a grid (the partial statistics hold splits·n states).
inline constexpr std::int64_t max_sm90_splits = 64;

/// Grid of an sm_90a kernel (block::tile_pipeline_sm90::run_split): row tiles (rounded up to a
/// multiple of the cluster's `cluster_m` blocks) × vocabulary splits, where split y gets
/// ⌊T/splits⌋ or ⌈T/splits⌉ of the T vocabulary tiles. Blocks run one per SM, so the
/// kernel's time is about ⌈blocks / SMs⌉ waves of T/splits tiles each: the number of splits
/// minimizes that (plus a tenth of a tile per block for its pipeline fill and drain). At
/// 8192 × 256000 with 128 × 256 tiles: 33 splits, 2112 blocks = 16 full waves, 0.3% above
/// T·rows/SMs, where 16 splits (1024 blocks, 7.8 waves) lose 4%. `min_splits`: the fewest
/// splits considered (as many as there are tiles where those are fewer), for a kernel whose
/// resident blocks should share row tiles (the recompute, LCE_RECOMPUTE_MIN_SPLITS).
inline forward_grid make_balanced_grid(const problem& s, int block_m, int block_v,
                                       int cluster_m = 1, std::int64_t min_splits = 1) noexcept {
  forward_grid g;
  g.row_tiles = (s.n + block_m - 1) / block_m;
  g.row_tiles = (g.row_tiles + cluster_m - 1) / cluster_m * cluster_m;
  g.vocab_tiles = (s.v + block_v - 1) / block_v;
  g.splits = 1;
  double best = -1.0;
  const std::int64_t most = std::max<std::int64_t>(std::min(g.vocab_tiles, max_sm90_splits), 1);
  for (std::int64_t splits = std::clamp<std::int64_t>(min_splits, 1, most); splits <= most;
       ++splits) {
    const auto waves = static_cast<double>((g.row_tiles * splits + nominal_sms - 1) / nominal_sms);
    const double cost =
        waves * (static_cast<double>(g.vocab_tiles) / static_cast<double>(splits) + 0.1);
    if (best < 0.0 || cost < best) {
      best = cost;
      g.splits = splits;
    }
  }
  g.tiles_per_split = (g.vocab_tiles + g.splits - 1) / g.splits;  // the most any split gets
  return g;
}

/// Whether `kernel` (an sm_90a kernel) runs on device `device`: compute capability 9.0 and the
/// kernel's code built for sm_90a (binary version 90, and no static shared memory: the build
/// without sm_90a features, e.g. plain sm_90, carries a static marker instead).
inline bool sm90_kernel_runs_on(const void* kernel, int device) noexcept {
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  if (major != 9 || minor != 0) return false;
  cudaFuncAttributes attributes{};
  if (cudaFuncGetAttributes(&attributes, kernel) != cudaSuccess || attributes.binaryVersion != 90 ||
      attributes.sharedSizeBytes != 0) {
    (void)cudaGetLastError();
    return false;
  }
  return true;
}

/// @brief The can_implement predicate of an sm_90a kernel as far as the device decides it:
/// whether `Kernel` runs on the current device (sm90_kernel_runs_on). A kernel's attributes on a
/// device never change, so the verdict is kept per kernel and device (devices 0–63; bit d of
/// `known` and `runs`): after the first call on a device, a launch pays one cudaGetDevice.
/// What the device does not decide (16-bit elements, a Config with an sm_90a tile
/// configuration, operands the copy engine can read) is checked by the caller.
template <auto Kernel>
bool sm90_kernel_runs() noexcept {
  static std::atomic<std::uint64_t> known{0};
  static std::atomic<std::uint64_t> runs{0};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  const std::uint64_t bit = device >= 0 && device < 64 ? std::uint64_t{1} << device : 0;
  if (bit != 0 && (known.load(std::memory_order_acquire) & bit) != 0)
    return (runs.load(std::memory_order_relaxed) & bit) != 0;
  const bool verdict = sm90_kernel_runs_on(reinterpret_cast<const void*>(Kernel), device);
  if (bit != 0) {
    if (verdict) runs.fetch_or(bit, std::memory_order_relaxed);
    known.fetch_or(bit, std::memory_order_release);
  }
  return verdict;
}

/// Whether rows of `ld` elements of `Element` meet the tensor maps' stride rule (a multiple of
/// 16 bytes); the base pointer's 16-byte alignment is only known at the launch.
template <class Element>
constexpr bool tensor_map_stride_ok(std::int64_t ld) noexcept {
  return (static_cast<std::uint64_t>(ld) * sizeof(Element)) % 16 == 0;
}

/// The first condition of an sm_90a kernel's predicate that fails for a shape on the current
/// device (sm90_can_run), or `runs`.
enum class sm90_verdict : int {
  runs = 0,        ///< the kernel runs (provided X and W are 16-byte aligned at the launch)
  row_stride = 1,  ///< a row stride of X or W is not a multiple of 16 bytes
  device = 2,      ///< the device is not of compute capability 9.0, or no sm_90a code was built
};

/// @brief The part of the predicate of an sm_90a kernel pair (Lean: no bias, no class weights;
/// General: the general epilogue, taken with `general`) that the shape and the device decide:
/// row strides of X and W the tensor maps take (tensor_map_stride_ok), then sm90_kernel_runs of
/// the kernel that would run. 16-bit elements and a Config with an sm_90a tile configuration are
/// the caller's compile-time part; the pointers' alignment is seen at the launch.
template <class Element, auto Lean, auto General>
sm90_verdict sm90_can_run(const problem& shape, bool general) noexcept {
  if (!tensor_map_stride_ok<Element>(shape.x_stride()) ||
      !tensor_map_stride_ok<Element>(shape.w_stride()))
    return sm90_verdict::row_stride;
  const bool runs = general ? sm90_kernel_runs<General>() : sm90_kernel_runs<Lean>();
  return runs ? sm90_verdict::runs : sm90_verdict::device;
}

/// The tensor maps of an sm_90a kernel's operands (Config: its sm_90a tile configuration): X
/// rows [rows, d] in boxes of (block_m, block_k), W rows [cols, d] in boxes of
/// (block_v / cluster_m, block_k), each block of a cluster loading its share. False where the
/// copy engine cannot read them (alignment, strides, sizes: detail::encode_tile_map).
template <class Config, class Element>
bool encode_operand_maps(CUtensorMap* x_map, const Element* x, std::int64_t rows, std::int64_t ldx,
                         CUtensorMap* w_map, const Element* w, std::int64_t cols, std::int64_t ldw,
                         std::int64_t d) noexcept {
  return detail::encode_tile_map(x_map, x, rows, d, ldx, Config::block_m, Config::block_k) &&
         detail::encode_tile_map(w_map, w, cols, d, ldw, Config::block_v / Config::cluster_m,
                                 Config::block_k);
}

/// Launches an sm_90a kernel (one block of `threads` per SM, `smem` bytes of dynamic shared
/// memory) on `blocks`, in clusters of `cluster_m` blocks along x when cluster_m > 1.
template <class Params>
cudaError_t launch_sm90(void (*kernel)(Params), dim3 blocks, int threads, int smem, int cluster_m,
                        cudaStream_t stream, const Params& p) noexcept {
  cudaLaunchConfig_t config{};
  config.gridDim = blocks;
  config.blockDim = dim3(static_cast<unsigned>(threads));
  config.dynamicSmemBytes = static_cast<std::size_t>(smem);
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeClusterDimension;
  attribute[0].val.clusterDim.x = static_cast<unsigned>(cluster_m);
  attribute[0].val.clusterDim.y = 1;
  attribute[0].val.clusterDim.z = 1;
  config.attrs = attribute;
  config.numAttrs = cluster_m > 1 ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, p);
}

/// Sets `kernel`'s dynamic shared memory to `smem` bytes and launches it on `grid` (row tiles ×
/// vocabulary splits), in clusters of Config::cluster_m blocks: the launch of every sm_90a
/// kernel of the library.
template <class Config, class Params>
cudaError_t launch_sm90_grid(void (*kernel)(Params), const forward_grid& grid, int threads,
                             int smem, cudaStream_t stream, const Params& p) noexcept {
  LCE_RETURN_IF_ERROR(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 blocks(static_cast<unsigned>(grid.row_tiles), static_cast<unsigned>(grid.splits));
  return launch_sm90(kernel, blocks, threads, smem, Config::cluster_m, stream, p);
}

}  // namespace device
LCE_NAMESPACE_END
