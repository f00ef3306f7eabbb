#pragma once
// Shared by the GPU plugins (a header, not a plugin): device memory that grows to the
// largest size asked for and is then reused, so that a step allocates nothing.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <string>

#include "switchyard/status.hpp"

namespace switchyard::cuda_common {

/// `count` elements of T on the current device, kept across calls (grows, never shrinks;
/// the contents do not survive growing). Not thread-safe.
template <typename T>
class DeviceScratch {
 public:
  DeviceScratch() = default;
  ~DeviceScratch() { cudaFree(data_); }
  DeviceScratch(const DeviceScratch&) = delete;
  DeviceScratch& operator=(const DeviceScratch&) = delete;

  /// At least `count` elements; throws `Error(kSystem)` when the device is out of memory.
  T* get(std::size_t count) {
    if (count > capacity_) {
      cudaFree(data_);
      data_ = nullptr;
      capacity_ = 0;
      const std::size_t bytes = std::max<std::size_t>(count, 1) * sizeof(T);
      const cudaError_t e = cudaMalloc(reinterpret_cast<void**>(&data_), bytes);
      if (e != cudaSuccess) {
        throw Error(ErrorCode::kSystem, "allocating " + std::to_string(bytes) +
                                            " bytes of device memory: " + cudaGetErrorString(e));
      }
      capacity_ = count;
    }
    return data_;
  }

 private:
  T* data_ = nullptr;
  std::size_t capacity_ = 0;
};

}  // namespace switchyard::cuda_common
