// The expert-kernel conformance suite (tests/plugins/expert_conformance.hpp) on the CUDA
// kernel, cuda_swiglu, in device memory on a stream of its own: f32 weights, and bf16 and
// FP8 block-scaled weights (which the kernel widens to bf16 when it uploads them and runs
// with bf16 rows and projections, hence the wider tolerance). It has neither the fused
// form nor a backward yet: the suite checks that both say kUnavailable.
#include <doctest/doctest.h>

#include <vector>

#include "cuda_test_support.hpp"
#include "expert_conformance.hpp"

using namespace switchyard;
using namespace switchyard::conformance;

namespace {

class CudaKernelMemory final : public KernelMemory {
 public:
  ~CudaKernelMemory() override {
    for (void* p : blocks_) cudaFree(p);
  }
  Device device() const override { return Device::cuda(0); }
  void* allocate(std::size_t bytes) override {
    void* p = nullptr;
    SWITCHYARD_CUDA_CHECK(cudaMalloc(&p, bytes == 0 ? 1 : bytes));
    blocks_.push_back(p);
    return p;
  }
  void to_device(void* dst, const void* src, std::size_t bytes) override {
    SWITCHYARD_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
  }
  void to_host(void* dst, const void* src, std::size_t bytes) override {
    stream_.synchronize();
    SWITCHYARD_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
  }
  Stream& stream() override { return stream_; }

 private:
  std::vector<void*> blocks_;
  test::CudaStream stream_;
};

}  // namespace

TEST_CASE("cuda_swiglu passes the expert-kernel conformance suite") {
  KernelUnderTest k;
  k.name = "cuda_swiglu";
  k.create = plugin_kernel("cuda_swiglu");
  k.weight_dtypes = {DType::kF32, DType::kBF16, DType::kF8E4M3};
  // f32: float32 accumulation; bf16 and FP8: rows, projections and silu·up rounded to bf16.
  k.tolerance = [](DType weights) { return weights == DType::kF32 ? 1e-4 : 3e-2; };
  k.memory = [] { return std::unique_ptr<KernelMemory>(std::make_unique<CudaKernelMemory>()); };
  run_expert_kernel_suite(k);
}
