#pragma once
/// \file
/// The expert computation interface: a grouped batch of rows, contiguous per local expert.

#include <cstdint>
#include <span>
#include <string>

#include "switchyard/stream.hpp"
#include "switchyard/tensor.hpp"

namespace switchyard {

/// The weights of one SwiGLU expert, borrowed from their owner (the runtime's model), in
/// the checkpoint's dtype (f32, bf16 or f16). `down(silu(gate·x) ⊙ up·x)`.
struct SwigluExpertWeights {
  TensorView gate;  ///< [F,H]
  TensorView up;    ///< [F,H]
  TensorView down;  ///< [H,F]
};

/// A grouped batch: rows [N,H] where the first `rows_per_expert[0]` rows go to local
/// expert 0, the next `rows_per_expert[1]` to local expert 1, and so on. `input` and
/// `output` are f32 on the stream's device; `rows_per_expert` is host memory.
struct ExpertBatch {
  TensorView input;                               ///< [N,H], read only
  std::span<const std::int64_t> rows_per_expert;  ///< [local experts], sums to N
  TensorView output;                              ///< [N,H], written
};

/// Names of a kernel's tensors in its error messages, built once (checking allocates nothing).
struct ExpertBatchNames {
  explicit ExpertBatchNames(const std::string& kernel_name)
      : kernel(kernel_name), input(kernel_name + " input"), output(kernel_name + " output") {}
  std::string kernel, input, output;
};

/// Checks `batch` for a kernel with `num_experts` local experts of hidden size `hidden` whose
/// memory is on `device`: f32 input [N,H] and output [N,H] there, one row count per local
/// expert, none negative, summing to N. Returns the largest row count. Throws
/// `Error(kInvalidArgument)` naming the kernel and what does not fit. Written once for every
/// kernel plugin.
std::int64_t check_expert_batch(const ExpertBatch& batch, std::int64_t hidden,
                                std::size_t num_experts, Device device,
                                const ExpertBatchNames& names);

/// Computes the experts of one rank. Not thread-safe: one thread calls it at a time.
class ExpertKernel {
 public:
  virtual ~ExpertKernel() = default;
  /// Kernel name, e.g. "cpu_swiglu".
  virtual std::string name() const = 0;
  virtual int num_local_experts() const noexcept = 0;
  /// Memory kinds and stream behaviour (see stream.hpp).
  virtual ExecutionCapabilities capabilities() const noexcept { return {}; }
  /// Runs every local expert over its rows on `stream`. A host-synchronous kernel (the
  /// default) has finished when it returns; the core synchronizes the stream before it
  /// calls one. Allocates only when N grows. Throws `Error(kInvalidArgument)` on shape
  /// mismatch.
  virtual void forward(const ExpertBatch& batch, Stream& stream) = 0;
};

}  // namespace switchyard
