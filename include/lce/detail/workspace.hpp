/// @file workspace.hpp
/// @brief Carving of the caller's workspace into 256-byte aligned regions. The same plan
/// serves the size query and the launch, so the two can never disagree.
#pragma once

#include <cstddef>

#include "../version.hpp"

LCE_NAMESPACE_BEGIN
namespace detail {

/// Sequential allocator of byte offsets inside one workspace.
class workspace_layout {
 public:
  static constexpr std::size_t alignment = 256;

  /// Reserves `count` objects of type T; returns their byte offset.
  template <class T>
  std::size_t reserve(std::size_t count) noexcept {
    const std::size_t offset = (bytes_ + alignment - 1) / alignment * alignment;
    bytes_ = offset + count * sizeof(T);
    return offset;
  }
  [[nodiscard]] std::size_t bytes() const noexcept { return bytes_; }

 private:
  std::size_t bytes_ = 0;
};

/// Typed pointer at `offset` bytes into `base`.
template <class T>
T* at(void* base, std::size_t offset) noexcept {
  return reinterpret_cast<T*>(static_cast<char*>(base) + offset);
}

}  // namespace detail
LCE_NAMESPACE_END
