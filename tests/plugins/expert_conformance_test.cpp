// The expert-kernel conformance suite (expert_conformance.hpp) on every host kernel: the
// cpu_swiglu plugin, through the loader, with f32, bf16 and FP8 block-scaled weights, and
// the core's IdentityExperts. The CUDA kernel runs the same suite in tests/gpu.
#include <doctest/doctest.h>

#include "expert_conformance.hpp"

using namespace switchyard;
using namespace switchyard::conformance;

TEST_CASE("cpu_swiglu passes the expert-kernel conformance suite") {
  KernelUnderTest k;
  k.name = "cpu_swiglu";
  k.create = plugin_kernel("cpu_swiglu", "blas_threads = 1\n");
  k.weight_dtypes = {DType::kF32, DType::kBF16, DType::kF8E4M3};
  run_expert_kernel_suite(k);
}

TEST_CASE("IdentityExperts passes the expert-kernel conformance suite") {
  KernelUnderTest k;
  k.name = "identity";
  k.math = ExpertMath::kIdentity;
  k.create = [](const ExpertCreateArgs& args) {
    return std::make_shared<IdentityExperts>(static_cast<int>(args.experts.size()));
  };
  run_expert_kernel_suite(k);
}
