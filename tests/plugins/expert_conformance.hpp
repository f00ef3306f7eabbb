#pragma once
// The expert-kernel conformance suite: what every `ExpertKernel` must do, checked against
// float64 computations written in the suite (never the kernel's own code). A kernel's test
// gives the suite a way to create the kernel and to reach its memory (host here; the GPU
// tests give device memory), and the suite runs every case its capabilities call for:
//
// - the grouped forward of 3 local experts (one of them with no rows) against the float64
//   experts, for every weight dtype the kernel takes (f32, bf16, FP8 with block scales;
//   H and F not multiples of 128), the output poisoned first; bf16 input rows give the bits
//   of the f32 rows they round from, when the kernel asks for bf16 rows;
// - no rows at all; the same bits twice; bad batches refused with kInvalidArgument;
// - the fused form (`forward_weighted`) against the float64 weighted sums, or kUnavailable;
// - the backward (d input, every weight's gradient added to what was there, each row's
//   weight gradient) against central differences of the float64 loss, the same bits from
//   the forward's saved columns as recomputed, or kUnavailable.
#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "switchyard/expert_kernel.hpp"
#include "switchyard/plugin.hpp"

namespace switchyard::conformance {

/// The memory of a kernel under test, from the suite's side. Buffers are owned by this
/// object and live until it goes.
class KernelMemory {
 public:
  virtual ~KernelMemory() = default;
  virtual Device device() const = 0;
  virtual void* allocate(std::size_t bytes) = 0;
  virtual void to_device(void* dst, const void* src, std::size_t bytes) = 0;
  virtual void to_host(void* dst, const void* src, std::size_t bytes) = 0;
  /// The stream the kernel runs on; the suite synchronizes it before reading results.
  virtual Stream& stream() = 0;
};

/// Host memory and an inline host stream.
std::unique_ptr<KernelMemory> host_kernel_memory();

/// What the experts compute.
enum class ExpertMath {
  kSwiglu,    ///< down(silu(gate·x) ⊙ up·x) of the weights given at creation
  kIdentity,  ///< x (no weights)
};

/// A kernel under test.
struct KernelUnderTest {
  std::string name;
  ExpertMath math = ExpertMath::kSwiglu;
  /// Creates the kernel over the given local experts (host weights, borrowed; f32, bf16 or
  /// f8_e4m3 with block scales, as `weight_dtypes` lists).
  std::function<std::shared_ptr<ExpertKernel>(const ExpertCreateArgs&)> create;
  /// The weight dtypes the kernel takes (SwiGLU kernels; ignored for identity).
  std::vector<DType> weight_dtypes = {DType::kF32};
  /// Relative tolerance of the forward and backward against float64, per weight dtype
  /// (its rounding of rows or projections included; f32 arithmetic is about 1e-6).
  std::function<double(DType weights)> tolerance = [](DType) { return 1e-5; };
  /// Creates the memory and stream the kernel's buffers live in.
  std::function<std::unique_ptr<KernelMemory>()> memory = host_kernel_memory;
};

/// Runs every case of the suite on `kernel` (doctest CHECKs, one SUBCASE per case).
void run_expert_kernel_suite(const KernelUnderTest& kernel);

/// A creator of a kernel plugin through the loader (the standard search path), with the
/// given [experts] settings (TOML).
std::function<std::shared_ptr<ExpertKernel>(const ExpertCreateArgs&)> plugin_kernel(
    const std::string& name, const std::string& settings = "");

}  // namespace switchyard::conformance
