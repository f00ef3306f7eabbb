#pragma once
/// \file
/// The expert computation interface: a grouped batch of rows, contiguous per local expert.

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "switchyard/data_path.hpp"
#include "switchyard/stream.hpp"
#include "switchyard/tensor.hpp"

namespace switchyard {

/// Rows and columns of a block-scaled FP8 weight that share one scale.
inline constexpr std::int64_t kWeightScaleBlock = 128;

/// The weights of one SwiGLU expert, borrowed from their owner (the runtime's model), in
/// the checkpoint's dtype (f32, bf16, f16, or f8_e4m3 with block scales).
/// `down(silu(gate·x) ⊙ up·x)`.
struct SwigluExpertWeights {
  TensorView gate;  ///< [F,H]
  TensorView up;    ///< [F,H]
  TensorView down;  ///< [H,F]
  /// For f8_e4m3 weights, each matrix's block scales, f32 [ceil(rows/128), ceil(cols/128)]
  /// (DeepSeek-V3's `weight_scale_inv`: an element's value is its FP8 value times the scale
  /// of its 128×128 block); empty views for other dtypes.
  TensorView gate_scale = {}, up_scale = {}, down_scale = {};
};

/// ceil(n / kWeightScaleBlock): the block scales along a dimension of n elements.
constexpr std::int64_t weight_scale_blocks(std::int64_t n) noexcept {
  return (n + kWeightScaleBlock - 1) / kWeightScaleBlock;
}

/// Checks one expert matrix as a kernel takes it: `weight` [rows, cols] in f32, bf16, f16
/// or f8_e4m3, and `block_scales` given exactly for f8_e4m3, f32 [weight_scale_blocks(rows),
/// weight_scale_blocks(cols)]. Throws `Error(kInvalidArgument)` naming `what`; allocates
/// nothing unless it throws (kernels check each matrix as they widen it).
void require_expert_weight(const TensorView& weight, const TensorView& block_scales,
                           std::string_view what, std::int64_t rows, std::int64_t cols);

/// Widens one expert matrix `weight` [rows, cols] (f32, bf16, f16, or f8_e4m3 with its
/// `block_scales`, see `SwigluExpertWeights`) to f32 at `dst` [rows, cols]: its values
/// exactly, times their block's scale for FP8. Throws `Error(kInvalidArgument)` for FP8
/// without scales of the right shape, or scales on another dtype.
void widen_expert_weight(const TensorView& weight, const TensorView& block_scales, float* dst);

/// Gradients of one SwiGLU expert's weights, in f32 with the weights' shapes, owned by the
/// caller; a kernel's `backward` adds to them.
struct SwigluExpertGradients {
  TensorView gate;  ///< [F,H] f32
  TensorView up;    ///< [F,H] f32
  TensorView down;  ///< [H,F] f32
};

/// Owned f32 gradients of `num_experts` SwiGLU experts (gate and up [F,H], down [H,F]
/// each), zero-filled, with the views a backward adds to (`views()` for
/// `ExpertGradientBatch::d_weights` or `LayerGradients::d_experts`). The views stay valid
/// when the storage is moved.
class ExpertGradientStorage {
 public:
  ExpertGradientStorage() = default;
  ExpertGradientStorage(int num_experts, std::int64_t hidden, std::int64_t ffn_hidden);
  std::span<const SwigluExpertGradients> views() const noexcept { return views_; }
  /// Per expert gate, up, down, in that order: [3 × num_experts].
  std::span<HostTensor> tensors() noexcept { return tensors_; }
  std::span<const HostTensor> tensors() const noexcept { return tensors_; }
  void zero() noexcept;

 private:
  std::vector<HostTensor> tensors_;
  std::vector<SwigluExpertGradients> views_;
};

/// A grouped batch: rows [N,H] where the first `rows_per_expert[0]` rows go to local
/// expert 0, the next `rows_per_expert[1]` to local expert 1, and so on. `input` and
/// `output` are on the stream's device; `rows_per_expert` is host memory.
struct ExpertBatch {
  /// [N,H] f32, or in the kernel's `input_dtype` (bf16) when it asks for that; read only.
  TensorView input;
  std::span<const std::int64_t> rows_per_expert;  ///< [local experts], sums to N
  /// [N,H] f32, or in the kernel's `output_dtype` (bf16) when it asks for that; written.
  TensorView output;
  /// Optional [N, saved_columns] f32 (empty: not wanted): written with what the kernel's
  /// backward needs of each row beyond its input (for SwiGLU the gate and up projections),
  /// so that the backward does not recompute it (a training forward, `[runtime] recompute
  /// = false`).
  TensorView saved = {};  // a default: aggregate initialisers may leave it out
  /// Optional [local experts] on the stream's device (null: every row is real): blocks
  /// sized for a worst case (`[runtime] max_tokens_per_rank`), of which only the first
  /// valid_rows[e] rows of expert e's block are tokens; written by work queued before the
  /// kernel's, so read only by the kernel's own queued work. A kernel that
  /// `masked_rows` computes only those (a masked grouped GEMM); any other computes whole
  /// blocks (the rows beyond are finite, and their outputs are never read).
  const std::int64_t* valid_rows = nullptr;
};

/// The backward of a grouped batch: the forward's input rows and, per row, the loss's
/// gradient with respect to its output up to the row's weight: the gradient is
/// row_weights[r] · d_output[r] (the weight of the (token, expert) slot the row stands for;
/// 1 when `row_weights` is empty). The kernel writes the gradient with respect to each
/// input row, adds each local expert's weight gradients, and gives each row's
/// <d_output[r], output[r]> (the gradient of its weight). f32 on the stream's device;
/// `rows_per_expert` host memory, as in the forward.
struct ExpertGradientBatch {
  TensorView input;                                  ///< [N,H] the forward's, read only
  std::span<const std::int64_t> rows_per_expert;     ///< [local experts], sums to N
  TensorView d_output;                               ///< [N,H] read only
  TensorView d_input;                                ///< [N,H] written
  std::span<const SwigluExpertGradients> d_weights;  ///< [local experts], added to
  TensorView row_weights = {};                       ///< [N] optional (empty: all 1), read only
  TensorView d_row_weights = {};  ///< [N] optional (empty: not wanted): <d_output, output>
  /// [N, saved_columns] optional: what the forward saved of these rows (`ExpertBatch::
  /// saved`); empty: the kernel recomputes it from the input.
  TensorView saved = {};
};

/// Names of a kernel's tensors in its error messages, built once (checking allocates nothing).
struct ExpertBatchNames {
  explicit ExpertBatchNames(const std::string& kernel_name)
      : kernel(kernel_name),
        input(kernel_name + " input"),
        output(kernel_name + " output"),
        d_output(kernel_name + " d_output"),
        d_input(kernel_name + " d_input"),
        d_weight(kernel_name + " weight gradient"),
        saved(kernel_name + " saved projections"),
        row_weights(kernel_name + " row weights"),
        d_row_weights(kernel_name + " row weight gradients") {}
  std::string kernel, input, output, d_output, d_input, d_weight, saved, row_weights, d_row_weights;
};

/// Checks `batch` for a kernel with `num_experts` local experts of hidden size `hidden` whose
/// memory is on `device`: input [N,H] in f32 or `input_dtype` and output [N,H] in f32 or
/// `output_dtype` there, one row count per local expert, none negative, summing to N.
/// Returns the largest row count. Throws `Error(kInvalidArgument)` naming the kernel and
/// what does not fit. Written once for every kernel plugin.
std::int64_t check_expert_batch(const ExpertBatch& batch, std::int64_t hidden,
                                std::size_t num_experts, Device device,
                                const ExpertBatchNames& names, DType input_dtype = DType::kF32,
                                DType output_dtype = DType::kF32);

/// The fused form of a rank's expert work: the received token rows as they arrived, each
/// with its K (local expert, weight) slots, for a kernel that forms each row's weighted sum
/// of expert outputs itself, with no expert-grouped copy of the rows. All memory is on the
/// kernel's device.
///
/// partials[r] = Σ over the slots j of row r, in slot order, skipping empty ones, of
/// weight_j · expert_{local_expert_j}(row r decoded to f32); the sum as the host row kernels
/// define it (data_path.hpp: starting at 0, each product and each sum rounded to f32), then
/// rounded once to `partial_dtype`. These are the same bits as grouping the rows, `forward`
/// and the data path's weighted reduce, so a layer gives the same y on either path.
struct WeightedRowsBatch {
  const std::byte* rows = nullptr;          ///< [N, payload_row_bytes(dtype, H)], read only
  PayloadDType dtype = PayloadDType::kF32;  ///< of `rows`
  const SlotMeta* meta = nullptr;           ///< [N,K], read only; local expert -1: empty
  std::int64_t num_rows = 0;                ///< N
  int slots = 0;                            ///< K
  std::int64_t hidden = 0;                  ///< H
  DType partial_dtype = DType::kF32;        ///< f32 or bf16
  std::byte* partials = nullptr;            ///< [N,H] in `partial_dtype`, written
};

/// What an expert kernel does, as one value (`ExpertKernel::capabilities`): the layer reads
/// it once, when it is built, and checks it against its data path there.
struct ExpertKernelCapabilities {
  /// The memory the kernel takes and whether it enqueues on the stream (stream.hpp).
  ExecutionCapabilities execution;
  /// The dtype the kernel wants its input rows in: f32 (the default) or bf16, for a kernel
  /// that rounds its rows to bf16 anyway (tensor-core GEMMs). The layer's forward then
  /// groups the received rows straight into bf16 (rounded to nearest even, as
  /// `float_to_bf16`; a bf16 payload's elements as they are), which gives the kernel the
  /// same values as rounding f32 rows itself and moves half the bytes. `forward` takes f32
  /// rows too. Training forwards and `MoELayer::dispatch` hand over f32 rows.
  DType input_dtype = DType::kF32;
  /// The dtype the kernel writes its output rows in when the layer lets it: f32 (the
  /// default) or bf16, for a kernel whose results are bf16 anyway or that gains from
  /// writing half the bytes (tensor-core GEMMs with bf16 weights). The layer's forward then
  /// hands it a bf16 output buffer, and the weighted reduce widens each element exactly,
  /// so the layer's y is the same as from f32 outputs holding those bf16 values. `forward`
  /// takes f32 outputs too. Training forwards and `MoELayer::dispatch` hand over f32 outputs.
  DType output_dtype = DType::kF32;
  /// The kernel implements `forward_weighted`; the layer's forward then uses it instead of
  /// grouping the rows per expert, running `forward` and reducing.
  bool fuses_weighted_rows = false;
  /// Columns per row the forward can save for the backward (`ExpertBatch::saved`); 0: the
  /// kernel saves nothing (its backward needs only the input).
  std::int64_t saved_columns = 0;
  /// The kernel implements `backward`; without it the layer refuses to train.
  bool backward = false;
  /// The kernel reads `ExpertBatch::valid_rows` and computes only the rows it names.
  bool masked_rows = false;
};

/// Computes the experts of one rank. Not thread-safe: one thread calls it at a time.
class ExpertKernel {
 public:
  virtual ~ExpertKernel() = default;
  /// Kernel name, e.g. "cpu_swiglu".
  virtual std::string name() const = 0;
  virtual int num_local_experts() const noexcept = 0;
  /// What the kernel does (see `ExpertKernelCapabilities`); the same on every call.
  virtual ExpertKernelCapabilities capabilities() const noexcept { return {}; }
  /// Runs every local expert over its rows on `stream`. A host-synchronous kernel (the
  /// default) has finished when it returns; the core synchronizes the stream before it
  /// calls one. Allocates only when N grows. Throws `Error(kInvalidArgument)` on shape
  /// mismatch.
  virtual void forward(const ExpertBatch& batch, Stream& stream) = 0;
  /// The fused form (see `WeightedRowsBatch`), on `stream`, blocking like `forward`.
  /// Throws `Error(kUnavailable)` unless `capabilities().fuses_weighted_rows`, and
  /// `Error(kInvalidArgument)` for a local expert outside 0..num_local_experts()-1.
  virtual void forward_weighted(const WeightedRowsBatch& batch, Stream& stream);
  /// The backward of `forward` on the same rows (see `ExpertGradientBatch`): takes what the
  /// forward saved, or recomputes it from the input, writes d_input and adds the weight
  /// gradients (a kernel without weights takes an empty `d_weights`). Blocking like
  /// `forward`; allocates only when N grows. Throws `Error(kUnavailable)` for a kernel
  /// without a backward (the default) and `Error(kInvalidArgument)` on shape mismatch.
  virtual void backward(const ExpertGradientBatch& batch, Stream& stream);
};

/// Checks `batch` as `check_expert_batch` checks a forward batch, plus d_output and
/// d_input of the input's shape and one gradient set per local expert (f32: gate and up
/// [F,H], down [H,F]) unless `ffn_hidden` is 0 (a kernel without weights, which takes
/// none). Returns the largest row count.
std::int64_t check_expert_gradient_batch(const ExpertGradientBatch& batch, std::int64_t hidden,
                                         std::int64_t ffn_hidden, std::size_t num_experts,
                                         Device device, const ExpertBatchNames& names);

/// Experts that return their input: expert_e(x) = x for every local expert e. A layer with
/// them computes y[t] = Σ of t's kept weights · x[t] (up to the payload's and the combine
/// dtype's rounding), so it measures the data path alone (`switchyard bench`) and checks it
/// against a sum a test can write by hand. Host memory; fuses (`forward_weighted` decodes
/// each row once and sums its weights over it, one pass over the rows). Not thread-safe.
class IdentityExperts final : public ExpertKernel {
 public:
  explicit IdentityExperts(int num_local_experts);
  std::string name() const override { return "identity"; }
  int num_local_experts() const noexcept override { return num_local_experts_; }
  /// Host memory; fuses; has a backward.
  ExpertKernelCapabilities capabilities() const noexcept override {
    ExpertKernelCapabilities c;
    c.fuses_weighted_rows = true;
    c.backward = true;
    return c;
  }
  /// output = input.
  void forward(const ExpertBatch& batch, Stream& stream) override;
  void forward_weighted(const WeightedRowsBatch& batch, Stream& stream) override;
  /// d_input = row weight · d_output, d row weight = <d_output, input>; there are no
  /// weights (`d_weights` empty).
  void backward(const ExpertGradientBatch& batch, Stream& stream) override;

 private:
  int num_local_experts_;
  ExpertBatchNames names_{"identity experts"};
  Buffer<float> row_;                 // one decoded row
  std::vector<const float*> inputs_;  // [K], each the decoded row
  std::vector<float> weights_;        // [K]
};

}  // namespace switchyard
