#pragma once
// What the files of Runtime share: its state (the transports, the model and its layers,
// the step buffers) and small helpers. Private to the core. The files: runtime.cpp
// (building from a configuration, the accessors, the executor of local ranks),
// runtime_forward.cpp (the model's forward, dispatch and combine), runtime_training.cpp
// (backward, parameters, checkpoints), runtime_diagnostics.cpp (the reference, statistics,
// timings, traffic).
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "switchyard/buffer.hpp"
#include "switchyard/expert_balancer.hpp"
#include "switchyard/runtime.hpp"
#include "switchyard/status.hpp"

namespace switchyard {

struct Runtime::State {
  std::shared_ptr<const PluginRegistry> registry;
  std::unique_ptr<ResolvedConfig> settings;
  std::vector<int> layer_ids;        // the checkpoint's number of each layer index
  std::vector<ModelWeights> models;  // per layer index
  std::vector<std::shared_ptr<Transport>> transports;     // world, one per local rank
  std::vector<std::shared_ptr<Transport>> ep_transports;  // this rank's EP group
  std::vector<std::shared_ptr<Transport>> dp_transports;  // this rank's DP group
  int ep_size = 1;
  std::vector<std::vector<std::unique_ptr<MoELayer>>> layers;  // [layer][local rank]
  // Per local rank: the step buffers (and with them the data path) its layers share.
  std::vector<std::shared_ptr<LayerWorkspace>> workspaces;
  ExpertPlacement placement;             // the expert slots over an EP group's ranks
  std::vector<ExpertSlotMap> slot_maps;  // per layer index: each slot's expert (empty: slot e = e)
  // Per layer index, per local rank: the weights its expert kernel holds, one per slot
  // (views of `models`, or of `slot_storage` once a rebalance moved them there).
  std::vector<std::vector<std::vector<SwigluExpertWeights>>> slot_weights;
  std::vector<std::vector<std::vector<HostTensor>>> slot_storage;
  // forward_model's activations between layers (host, grown once).
  HostTensor chain_in, chain_out;
  bool training = false;
  // In training, the input of every layer but the first of the last forward_model, kept for
  // backward_model ([L-1] of [T,H], grown once), and that forward's T (-1: none yet).
  std::vector<HostTensor> layer_inputs;
  std::int64_t layer_inputs_tokens = -1;
  // backward_model's gradients between layers (host, grown once).
  HostTensor chain_grad_in, chain_grad_out;
  std::vector<std::vector<std::int64_t>> group_counts;  // per local rank, for bias updates
  // set_token_ids' ids for the next forward call (empty: none).
  TensorView token_ids;
  /// Per local rank: its block of tokens and outputs on the layer's device, when the layer
  /// runs on a device and the caller's tensors are host memory.
  struct DeviceRows {
    Buffer<float> x, y, dy, dx;  // dy and dx: the backward's
  };
  std::vector<std::unique_ptr<DeviceRows>> device_rows;
  /// Per local rank, the backward's gradients before the sums: the gate's [E,H], its local
  /// experts' (gate, up, down each, with their views), and the loss scope (E counts + tokens).
  struct RankGradients {
    HostTensor gate;
    ExpertGradientStorage experts;
    std::vector<std::int64_t> scope;
    ExpertGradientStorage shared;  // the layer's shared expert, when it has one
    HostTensor shared_gate;        // [1,H], when that expert is gated
  };
  std::vector<RankGradients> rank_gradients;
};

namespace runtime_detail {

/// After a collective step whose failures every local rank learned together (collected per
/// rank instead of thrown through `run_on_ranks`, which would abort the transports): throws
/// the first rank's own failure, else the first `kPeerFailed`; nothing when none failed.
void throw_agreed_failure(const std::vector<std::optional<Error>>& agreed);

/// What the expert balancer is asked for in an EP group of `ep` ranks whose first ranks lie
/// on `world`'s nodes: its nodes (hierarchical when they and the router's expert groups
/// divide evenly, as `balance_experts` decides), the router's `num_groups` when its policy
/// has them (node_limited), and `redundant` extra slots.
ExpertBalanceShape balance_shape(const ConfigSection& router, const Topology& world, int ep,
                                 int redundant);

/// `buffer` as an f32 [rows, cols] matrix in `path`'s memory (made there on first use,
/// grown when needed): where a device layer takes the caller's host rows.
inline TensorView device_matrix(Buffer<float>& buffer, DataPath& path, std::int64_t rows,
                                std::int64_t cols) {
  if (buffer.device() != path.device()) buffer = Buffer<float>(path.allocator());
  buffer.resize(static_cast<std::size_t>(rows * cols));
  return TensorView(buffer.data(), DType::kF32, {rows, cols}, path.device());
}

/// The same holding a copy of the host matrix `from`, queued on `stream`.
inline TensorView device_copy(Buffer<float>& buffer, DataPath& path, const TensorView& from,
                              Stream& stream) {
  const TensorView to = device_matrix(buffer, path, from.dim(0), from.dim(1));
  path.copy(to.data(), from.data(), static_cast<std::size_t>(from.numel()) * sizeof(float), stream);
  return to;
}

/// Copies the device matrix `from` into the host matrix `to` and waits for it.
inline void copy_back(DataPath& path, const TensorView& from, const TensorView& to,
                      Stream& stream) {
  path.copy(to.data(), from.data(), static_cast<std::size_t>(from.numel()) * sizeof(float), stream);
  stream.synchronize();
}

/// Checks `set_token_ids`' ids against the call's tokens: i32 or i64 [tokens], host.
inline void require_token_ids(const TensorView& ids, std::int64_t tokens) {
  ids.require("token ids", ids.dtype() == DType::kI64 ? DType::kI64 : DType::kI32, {tokens});
}

/// Entries [first, first + count) of checked token ids.
inline TensorView id_rows(const TensorView& ids, std::int64_t first, std::int64_t count) {
  return TensorView(static_cast<std::byte*>(ids.data()) + first * dtype_size(ids.dtype()),
                    ids.dtype(), {count});
}

/// Rows [first, first + count) of a contiguous f32 [T,H] matrix.
inline TensorView rows(const TensorView& m, std::int64_t first, std::int64_t count) {
  return TensorView(m.data_as<float>() + first * m.dim(1), DType::kF32, {count, m.dim(1)},
                    m.device());
}

/// into += from, both f32 [T,H] (contiguous).
inline void add_rows(const TensorView& from, const TensorView& into) {
  const float* a = from.data_as<const float>();
  float* b = into.data_as<float>();
  for (std::int64_t i = 0; i < into.numel(); ++i) b[i] += a[i];
}

/// `storage` as an f32 [rows,cols] view, reallocated only when it is too small.
inline TensorView grown_matrix(HostTensor& storage, std::int64_t rows, std::int64_t cols) {
  if (storage.numel() < rows * cols) storage = HostTensor(DType::kF32, {rows, cols});
  return {storage.data<float>(), DType::kF32, {rows, cols}};
}

/// Element (t, k) of a strided [T,K] view.
template <typename T>
T element(const TensorView& m, std::int64_t t, std::int64_t k) {
  return m.data_as<const T>()[t * m.stride(0) + k * m.stride(1)];
}

/// An int64 expert id as the plan's int32: -1 stays -1, ids beyond int32 become -2 (which
/// the plan's check would refuse as out of range; `Runtime::dispatch` names them first).
inline std::int32_t narrowed_expert_id(std::int64_t id) {
  return id >= -1 && id <= INT32_MAX ? static_cast<std::int32_t>(id) : -2;
}

/// Checks one [A,H] f32 tensor per part, named by `what`.
inline void require_part_rows(const ProcessDispatch& d, std::span<const TensorView> tensors,
                              std::int64_t hidden, const std::string& what) {
  if (tensors.size() != d.parts.size()) {
    throw Error(ErrorCode::kInvalidArgument,
                what + ": one per local rank: " + std::to_string(d.parts.size()) + " expected, " +
                    std::to_string(tensors.size()) + " given");
  }
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const std::int64_t A = const_cast<DispatchHandle&>(d.parts[i].handle).expert_input().dim(0);
    tensors[i].require(what + " of local rank " + std::to_string(i), DType::kF32, {A, hidden});
  }
}

}  // namespace runtime_detail
}  // namespace switchyard
