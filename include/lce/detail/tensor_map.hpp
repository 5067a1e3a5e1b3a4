/// @file tensor_map.hpp
/// @brief Host side of the bulk tensor copies: encodes the tensor map of a row-major 16-bit
/// matrix through the driver's cuTensorMapEncodeTiled, reached with
/// cudaGetDriverEntryPointByVersion (no link against libcuda).
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <type_traits>

#include "../version.hpp"

LCE_NAMESPACE_BEGIN
namespace detail {

/// The driver's encoder, or null when the driver does not offer it.
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() noexcept {
  static const PFN_cuTensorMapEncodeTiled_v12000 encoder = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      return static_cast<PFN_cuTensorMapEncodeTiled_v12000>(nullptr);
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encoder;
}

/// Encodes `map` for the matrix [rows, cols] at `base` with row stride `ld` elements, read in
/// boxes of (box_rows, box_cols) with the 128-byte swizzle; elements outside the matrix read
/// as zero. Returns false if the matrix does not meet the copy engine's rules (base 16-byte
/// aligned, row stride a multiple of 16 bytes, below 2⁴⁰ bytes, dimensions below 2³²).
template <class Element>
bool encode_tile_map(CUtensorMap* map, const Element* base, std::int64_t rows, std::int64_t cols,
                     std::int64_t ld, int box_rows, int box_cols) noexcept {
  static_assert(sizeof(Element) == 2, "16-bit elements");
  const auto encode = tensor_map_encoder();
  const std::uint64_t stride = static_cast<std::uint64_t>(ld) * sizeof(Element);
  if (encode == nullptr || reinterpret_cast<std::uintptr_t>(base) % 16 != 0 || stride % 16 != 0 ||
      stride >= (std::uint64_t{1} << 40) || rows <= 0 || cols <= 0 ||
      rows >= (std::int64_t{1} << 32) || cols >= (std::int64_t{1} << 32)) {
    return false;
  }
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {stride};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(box_cols), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUtensorMapDataType type = std::is_same_v<Element, __nv_bfloat16>
                                       ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                       : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  return encode(map, type, 2, const_cast<Element*>(base), dims, strides, box, element_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace detail
LCE_NAMESPACE_END
