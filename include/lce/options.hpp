/// @file options.hpp
/// @brief Host-side descriptions of a problem and of the loss: shapes, leading dimensions,
/// reduction, ignore_index and the backward strategy.
#pragma once

#include <cstddef>
#include <cstdint>

#include "version.hpp"

LCE_NAMESPACE_BEGIN

/// @brief Shape of one linear cross-entropy problem. Matrices are row-major.
///
/// X is [n, d] with row stride `ldx`, W is [v, d] with row stride `ldw`, dX [n, d] has row
/// stride `lddx` and dW [v, d] row stride `lddw`. A leading dimension of 0 means "dense" (= d).
struct problem {
  std::int64_t n = 0;     ///< tokens (rows of X)
  std::int64_t d = 0;     ///< hidden size
  std::int64_t v = 0;     ///< vocabulary size (rows of W)
  std::int64_t ldx = 0;   ///< row stride of X in elements, >= d (0: d)
  std::int64_t ldw = 0;   ///< row stride of W in elements, >= d (0: d)
  std::int64_t lddx = 0;  ///< row stride of dX in elements, >= d (0: d)
  std::int64_t lddw = 0;  ///< row stride of dW in elements, >= d (0: d)

  [[nodiscard]] constexpr std::int64_t x_stride() const noexcept { return ldx ? ldx : d; }
  [[nodiscard]] constexpr std::int64_t w_stride() const noexcept { return ldw ? ldw : d; }
  [[nodiscard]] constexpr std::int64_t dx_stride() const noexcept { return lddx ? lddx : d; }
  [[nodiscard]] constexpr std::int64_t dw_stride() const noexcept { return lddw ? lddw : d; }
};

/// @brief How per-token losses are combined (PyTorch's `reduction=`).
enum class reduction : int {
  mean = 0,  ///< sum over valid rows / number of valid rows (0 when every row is ignored)
  sum = 1,   ///< sum over valid rows
  none = 2,  ///< per-token losses only; the upstream gradient is a vector of n values
};

/// @brief Options that change the loss. Defaults reproduce `F.cross_entropy(x @ w.T, y)`.
///
/// The logits of row i are z = softcap((x_i·Wᵀ + b) / temperature); with α the label
/// smoothing, w the class weights (1 when absent), V the vocabulary size and
/// lse = log Σ_v exp(z_v), a valid row's loss is
///   (1 − α)·w_y·(lse − z_y) + (α/V)·Σ_v w_v·(lse − z_v) + z_loss·lse²
/// (PyTorch's `label_smoothing` and `weight=`, PaLM's z-loss). Reduction mean divides the
/// cross-entropy part by Σ_valid w_{y_i} (n_valid without weights) and the z-loss part by
/// n_valid (as Liger-Kernel does); an all-ignored batch gives 0.
struct loss_options {
  std::int64_t ignore_index = -100;  ///< rows whose target equals this contribute nothing
  lce::reduction reduction = lce::reduction::mean;
  float label_smoothing = 0.0f;  ///< α in [0, 1]
  float z_loss = 0.0f;           ///< scale s >= 0 of the z-loss s·lse² (Liger's lse_square_scale)
  float softcap = 0.0f;          ///< c > 0: z ← c·tanh(z/c) (Gemma 2); 0: off; < 0 rejected
  float temperature = 1.0f;      ///< τ > 0: z ← z/τ, applied before the softcap
  /// Causal shift for a [B, T] batch flattened to n = B·T rows: 0 = off; T > 0: row b·T + t is
  /// scored against targets[b·T + t + 1], and the last position of each sequence is ignored
  /// (n must be a multiple of T). The caller passes the unshifted targets.
  std::int64_t shift_seq_len = 0;
  /// Gradients are added into dx, dw and db instead of overwriting them (accumulation over
  /// micro-batches, fp32 main-grad buffers).
  bool accumulate = false;
  /// Gradient filtering, opt-in and approximate (Cut Cross-Entropy's `filter_eps`): in the
  /// backward, every entry of dZ whose softmax probability p_v is below filter_eps, except the
  /// target's, is taken as 0 (its label-smoothing and z-loss terms with it). 0, the default,
  /// computes every entry. In [0, 1). The forward and the loss do not depend on it. lce's
  /// gradient GEMMs do not skip zero tiles, so no work is saved: it exists to compare with
  /// filtering peers (bench/RESULTS.md reports its speed and gradient error).
  float filter_eps = 0.0f;
};

/// @brief How the backward pass is organised (docs/algorithm.md, "Strategies").
enum class backward_strategy : int {
  /// row_chunked when dW/db are fp32 and the budget holds chunks of at least
  /// min(n, 1024) whole rows; vocab_chunked otherwise. In lce::forward_backward, `stored`
  /// first (16-bit elements, a Config with an sm_90a kernel) where all rows' values fit the
  /// budget, or where row chunks of at least min(n, device::min_stored_chunk) rows do (with a
  /// 16-bit dW, beside fp32 dW/db accumulators of v·(d+1)·4 bytes)
  automatic = 0,
  /// recompute a vocabulary slice of Z for all rows; dW written once per slice. Backward:
  /// 3 GEMMs (Z, dX, dW) + a GEMV for db; forward_backward: 4 GEMMs (the forward's Z too)
  vocab_chunked = 1,
  /// recompute whole rows of Z for a row slice; dW/db accumulate in fp32 across slices (fp32
  /// dW only). Backward: 3 GEMMs; forward_backward: 3 GEMMs, the lse taken from the same rows
  row_chunked = 2,
  /// no recomputation (lce::forward_backward only): the sm_90a forward also stores, per logit,
  /// e^{z − m} in the element type with the fp32 maximum m of its (row, vocabulary tile); a
  /// pass turns them into dZ in place (the target's entry from the exact fp32 target logit),
  /// then dX and dW are GEMMs over it: 3 GEMMs and about n·v·2 bytes of workspace — row
  /// chunks within the budget where that does not fit (each chunk adds to dW: the caller's fp32
  /// one, or fp32 accumulators in the budget for a 16-bit dW), else whatever the budget. Where it
  /// does not apply (fp32 inputs, bias or class weights, no
  /// sm_90a kernel) the automatic strategy runs instead: within the budget where the size query
  /// is told of a bias or class weights, else within the stored values' space (never less than
  /// the default budget).
  stored = 3,
};

/// @brief The enumerator's name: "automatic", "vocab_chunked", "row_chunked" or "stored"
/// ("unknown" for a value outside the enumeration).
[[nodiscard]] constexpr const char* to_string(backward_strategy s) noexcept {
  switch (s) {
    case backward_strategy::automatic:
      return "automatic";
    case backward_strategy::vocab_chunked:
      return "vocab_chunked";
    case backward_strategy::row_chunked:
      return "row_chunked";
    case backward_strategy::stored:
      return "stored";
  }
  return "unknown";
}

/// @brief Options of the backward pass that change cost, never the result (up to rounding).
struct backward_options {
  backward_strategy strategy = backward_strategy::automatic;
  /// Upper bound on the workspace the backward may ask for, in bytes. The chunk size is the
  /// largest that fits; the workspace never drops below what one minimal chunk needs. The fp32
  /// dX accumulator of vocab_chunked (n·d·4 bytes with 16-bit inputs, O(n·d) like X) counts
  /// against it until it would narrow the vocabulary chunk below min(2048, max(d, what the
  /// whole budget holds)) columns; beyond that (large n) it takes an allowance of its own
  /// (lce::choose_backward reports it).
  std::size_t memory_budget = std::size_t{256} << 20;
};

LCE_NAMESPACE_END
