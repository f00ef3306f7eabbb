#pragma once
// CUDA helpers of the gpu-labelled tests: checked calls, a Stream over a cudaStream_t, and
// device buffers filled from and read back to host vectors.
#include <cuda_runtime.h>
#include <doctest/doctest.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "switchyard/status.hpp"
#include "switchyard/stream.hpp"

namespace switchyard::test {

inline void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    throw Error(ErrorCode::kSystem, std::string(what) + ": " + cudaGetErrorString(e));
  }
}
#define SWITCHYARD_CUDA_CHECK(call) ::switchyard::test::cuda_check((call), #call)

class CudaEvent final : public StreamEvent {
 public:
  CudaEvent() { SWITCHYARD_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming)); }
  ~CudaEvent() override { cudaEventDestroy(event_); }
  bool query() noexcept override { return cudaEventQuery(event_) == cudaSuccess; }
  void synchronize() override { SWITCHYARD_CUDA_CHECK(cudaEventSynchronize(event_)); }
  cudaEvent_t get() const { return event_; }

 private:
  cudaEvent_t event_ = nullptr;
};

/// A CUDA stream of device 0 as a switchyard Stream.
class CudaStream final : public Stream {
 public:
  CudaStream() {
    SWITCHYARD_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  }
  ~CudaStream() override { cudaStreamDestroy(stream_); }
  Device device() const noexcept override { return Device::cuda(0); }
  void* native_handle() const noexcept override { return stream_; }
  void synchronize() override { SWITCHYARD_CUDA_CHECK(cudaStreamSynchronize(stream_)); }
  bool idle() noexcept override { return cudaStreamQuery(stream_) == cudaSuccess; }
  std::unique_ptr<StreamEvent> create_event() override { return std::make_unique<CudaEvent>(); }
  void record(StreamEvent& event) override {
    SWITCHYARD_CUDA_CHECK(cudaEventRecord(static_cast<CudaEvent&>(event).get(), stream_));
  }
  cudaStream_t get() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

/// Device memory holding `count` elements of T.
template <typename T>
class DeviceArray {
 public:
  explicit DeviceArray(std::size_t count) : count_(count) {
    SWITCHYARD_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&data_), bytes() + 1));
  }
  explicit DeviceArray(const std::vector<T>& host) : DeviceArray(host.size()) {
    SWITCHYARD_CUDA_CHECK(cudaMemcpy(data_, host.data(), bytes(), cudaMemcpyHostToDevice));
  }
  ~DeviceArray() { cudaFree(data_); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  T* get() const { return data_; }
  std::size_t bytes() const { return count_ * sizeof(T); }
  /// Fills the memory with 0xff bytes: NaN for floats, -1 for integers (poison), and waits
  /// for the whole device: the code under test runs on streams of its own (non-blocking,
  /// not ordered after the legacy stream), which must not start before the poison is in.
  void poison() {
    SWITCHYARD_CUDA_CHECK(cudaMemset(data_, 0xff, bytes()));
    SWITCHYARD_CUDA_CHECK(cudaDeviceSynchronize());
  }
  /// The values, after everything queued on any stream of the device: a test reads what
  /// the code under test left, whatever stream it queued its work on. (A host-synchronous
  /// entry point has waited already; the primitives' tests read right after queuing.)
  std::vector<T> to_host() const {
    std::vector<T> host(count_);
    SWITCHYARD_CUDA_CHECK(cudaDeviceSynchronize());
    SWITCHYARD_CUDA_CHECK(cudaMemcpy(host.data(), data_, bytes(), cudaMemcpyDeviceToHost));
    return host;
  }
  /// The values as they are now, ordered after nothing but the legacy stream: for checking
  /// that an entry point returned only when its output was written.
  std::vector<T> to_host_as_returned() const {
    std::vector<T> host(count_);
    SWITCHYARD_CUDA_CHECK(cudaMemcpy(host.data(), data_, bytes(), cudaMemcpyDeviceToHost));
    return host;
  }

 private:
  T* data_ = nullptr;
  std::size_t count_;
};

}  // namespace switchyard::test
