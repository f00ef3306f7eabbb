#pragma once
/// \file
/// The weights of one MoE layer: router gate, optional selection bias, SwiGLU experts, and
/// an optional shared expert.

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "switchyard/expert_kernel.hpp"
#include "switchyard/tensor.hpp"

namespace switchyard {

class Checkpoint;

/// Tensor naming conventions of checkpoints.
enum class CheckpointFormat {
  /// `{prefix}gate.weight`, `{prefix}experts.{e}.w1/w3/w2.weight` (gate/up/down).
  kMixtral,
  /// `{prefix}gate.weight`, optional `{prefix}gate.e_score_correction_bias`,
  /// `{prefix}experts.{e}.gate_proj/up_proj/down_proj.weight` (DeepSeek, Qwen-MoE), and
  /// optionally a shared expert: `{prefix}shared_experts.gate_proj/up_proj/down_proj.weight`
  /// (DeepSeek) or `{prefix}shared_expert.*` with `{prefix}shared_expert_gate.weight`
  /// (Qwen2-MoE). FP8 weights have `....weight_scale_inv` beside them.
  kDeepseek,
};

/// A layer's shared expert (DeepSeek's `shared_experts`, Qwen2-MoE's `shared_expert`): each
/// token's own rank computes it, it is never dispatched, and its output is added to the
/// routed experts', times sigmoid(x · gate) when there is a gate (Qwen2-MoE).
struct SharedExpertWeights {
  SwigluExpertWeights weights;  ///< gate, up [Fs,H], down [H,Fs] (FP8 with block scales)
  TensorView gate;              ///< [1,H] f32, or empty (added as it is)
};

/// The checkpoint name of one expert's weight: `which` 0 gate, 1 up, 2 down; e.g.
/// "{prefix}experts.3.w1.weight" (Mixtral) or "{prefix}experts.3.gate_proj.weight".
std::string expert_tensor_name(CheckpointFormat format, const std::string& prefix, int expert,
                               int which);

/// Weights of one MoE layer in host memory: the router gate (and bias) in f32, the experts in
/// the checkpoint's dtype (f32, bf16, f16, or f8_e4m3 with its block scales; random weights
/// f32 or bf16), never widened, so a BF16 or FP8 checkpoint takes its own size in memory. Shared by
/// every in-process rank; changed only by training, between steps, through `Runtime::parameters()`.
class ModelWeights {
 public:
  /// Deterministic random weights (uniform in ±1/sqrt(fan_in)) from `seed`, identical on
  /// every machine. `expert_dtype` f32 or bf16 (the same draw rounded to nearest even); the
  /// gate is f32 either way.
  static ModelWeights random(int num_experts, int hidden, int ffn_hidden, std::uint64_t seed,
                             DType expert_dtype = DType::kF32);
  /// Loads from a safetensors file, a sharded checkpoint's index or a folder holding
  /// either (`Checkpoint`); F32, BF16, F16 and F8_E4M3 (with `weight_scale_inv`) expert
  /// tensors are accepted, the gate is widened to f32 and the experts are kept as stored. Shapes
  /// are taken from `{prefix}gate.weight` [E,H] and expert 0's gate [F,H]; every other
  /// tensor must agree. Throws `Error(kNotFound)` for a missing file or tensor and
  /// `Error(kInvalidArgument)` for a wrong shape or truncated file, naming the tensor.
  static ModelWeights load(const std::filesystem::path& path, CheckpointFormat format,
                           const std::string& prefix);
  /// The same from an open checkpoint (one file or shards, see `Checkpoint`): reads only
  /// this layer's tensors, opening only the shards that hold them.
  static ModelWeights load(Checkpoint& checkpoint, CheckpointFormat format,
                           const std::string& prefix);

  int num_experts() const noexcept { return num_experts_; }
  int hidden() const noexcept { return hidden_; }
  int ffn_hidden() const noexcept { return ffn_hidden_; }
  /// Router gate [E,H]; logits = x · gateᵀ.
  const HostTensor& gate() const noexcept { return gate_; }
  /// Selection bias [E] from the checkpoint; empty when it has none.
  const std::vector<float>& bias() const noexcept { return bias_; }
  /// Views of experts [first, first+count), valid while this object lives.
  std::vector<SwigluExpertWeights> experts(int first, int count) const;
  /// True when the layer has a shared expert (from its checkpoint).
  bool has_shared_expert() const noexcept { return !shared_.empty(); }
  /// Fs, the shared expert's inner width (0 without one).
  int shared_ffn_hidden() const noexcept { return shared_ffn_hidden_; }
  /// Views of the shared expert, valid while this object lives. Throws
  /// `Error(kInvalidArgument)` when there is none.
  SharedExpertWeights shared_expert() const;
  /// The checkpoint names of the shared expert's matrix `which` (0 gate, 1 up, 2 down) and
  /// of its gate, under `prefix`, in the naming it was read with: DeepSeek's
  /// "{prefix}shared_experts.gate_proj.weight" or Qwen2-MoE's "{prefix}shared_expert....";
  /// the gate is "{prefix}shared_expert_gate.weight".
  std::string shared_expert_tensor_name(const std::string& prefix, int which) const;
  static std::string shared_expert_gate_name(const std::string& prefix) {
    return prefix + "shared_expert_gate.weight";
  }
  /// Bytes of every weight of the layer as held in memory (block scales included).
  std::size_t weight_bytes() const noexcept;
  /// "random (seed 7)" or "mixtral checkpoint model.safetensors".
  const std::string& description() const noexcept { return description_; }

 private:
  int num_experts_ = 0;
  int hidden_ = 0;
  int ffn_hidden_ = 0;
  HostTensor gate_;
  std::vector<float> bias_;
  std::vector<HostTensor> gate_proj_, up_proj_, down_proj_;
  // FP8 weights' block scales, one per matrix above (empty tensors for other dtypes).
  std::vector<HostTensor> gate_scale_, up_scale_, down_scale_;
  int shared_ffn_hidden_ = 0;
  std::vector<HostTensor> shared_, shared_scales_;  // gate, up, down; empty: none
  HostTensor shared_gate_;                          // [1,H] or empty
  std::string shared_naming_;  // "shared_experts." (DeepSeek) or "shared_expert." (Qwen2)
  std::string description_;
};

/// Deterministic synthetic tokens f32 [T,H], uniform in [-1, 1), the same on every machine.
HostTensor synthetic_tokens(std::int64_t num_tokens, int hidden, std::uint64_t seed);

}  // namespace switchyard
