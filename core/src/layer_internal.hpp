#pragma once
// What the files of MoELayer share (layer.cpp: construction, routing, the public dispatch and
// combine, the experts; layer_forward.cpp: the forward sequence; layer_backward.cpp: the
// backward; token_exchange.cpp: the exchange bookkeeping): small helpers and the step buffers
// of a rank's layers. Private to the core.
#include <chrono>
#include <cstdint>
#include <exception>
#include <memory>
#include <span>
#include <vector>

#include "switchyard/buffer.hpp"
#include "switchyard/layer.hpp"

namespace switchyard::layer_detail {

using Clock = std::chrono::steady_clock;
inline double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

inline std::size_t to_size(std::int64_t v) { return static_cast<std::size_t>(v); }

inline std::span<const std::size_t> span_of(const Buffer<std::size_t>& b) {
  return {b.data(), b.size()};
}

/// Byte counts and offsets of an exchange of `rows[p]` rows of `row_bytes` per peer that
/// skips this rank's own block (`self`): the layer moves its own rows in place, so the
/// transport copies only what crosses ranks. `compact`: the buffer holds no self block (a
/// send side); else the self block keeps its place in it (a receive side, where the layer
/// writes it directly).
inline void peer_exchange(const Buffer<std::int64_t>& rows, std::size_t self, std::size_t row_bytes,
                          bool compact, Buffer<std::size_t>& counts, Buffer<std::size_t>& offsets) {
  counts.resize(rows.size());
  offsets.resize(rows.size());
  std::size_t offset = 0;
  for (std::size_t p = 0; p < rows.size(); ++p) {
    const std::size_t bytes = to_size(rows[p]) * row_bytes;
    counts[p] = p == self ? 0 : bytes;
    offsets[p] = offset;
    if (p != self || !compact) offset += bytes;
  }
}

/// One chunk of a forward in flight: its exchange state, and the tasks that run its
/// dispatch and combine exchanges (on the exchange thread, or inline on the layer's stream).
struct ExchangeTask {
  TokenExchange* exchange = nullptr;
  DispatchHandle* handle = nullptr;
  Stream* stream = nullptr;  // null: the blocking forms, on the exchange thread
  bool back = false;         // the combine's exchange, else the dispatch's
  std::exception_ptr error;
  static void run(void* task) noexcept;
};
struct ChunkSlot {
  DispatchHandle handle;
  ExchangeTask dispatch, combine;
  std::unique_ptr<StreamEvent> dispatched, combined;
};

}  // namespace switchyard::layer_detail

namespace switchyard {

/// The step buffers the layers of one rank share (see `MoELayerParts::workspace`).
/// A device data path's backward: host copies (staging memory) of what its host parts read,
/// and the rows' weights and unit-weight slots in the data path's memory.
struct BackwardHostSide {
  BackwardHostSide() = default;
  BackwardHostSide(Allocator& staging, Allocator& device)
      : x(staging),
        dy(staging),
        dx(staging),
        logits(staging),
        meta(staging),
        assignment(staging),
        send_row_token(staging),
        device_row_weights(device),
        device_unit_meta(device) {}
  std::size_t bytes() const noexcept {
    return x.capacity_bytes() + dy.capacity_bytes() + dx.capacity_bytes() +
           logits.capacity_bytes() + meta.capacity_bytes() + assignment.capacity_bytes() +
           send_row_token.capacity_bytes() + device_row_weights.capacity_bytes() +
           device_unit_meta.capacity_bytes();
  }
  Buffer<float> x, dy, dx, logits;  // [T,H] and [T,E]
  Buffer<SlotMeta> meta;            // dy's received slots [N,K]
  Buffer<std::int64_t> assignment, send_row_token;
  Buffer<float> device_row_weights;   // [2A]: each grouped row's weight, then its gradient
  Buffer<SlotMeta> device_unit_meta;  // [N,K] at weight 1
};

class LayerWorkspace {
 public:
  LayerWorkspace() = default;
  LayerWorkspace(const LayerWorkspace&) = delete;
  LayerWorkspace& operator=(const LayerWorkspace&) = delete;
  /// Waits for the stream's work first: after a failed step it may still write the buffers
  /// declared below it, which go before it.
  ~LayerWorkspace() {
    if (exchange_stream) wait_quietly(*exchange_stream);
    if (stream) wait_quietly(*stream);
  }
  static void wait_quietly(Stream& s) noexcept {
    try {
      s.synchronize();
    } catch (...) {  // NOLINT(bugprone-empty-catch): the step that failed reported it
    }
  }

  std::size_t bytes() const noexcept {
    std::size_t total = rows_to_table.capacity_bytes() + rows_from_table.capacity_bytes() +
                        chunk_counts.capacity_bytes();
    for (const auto& slot : chunk_slots) total += slot->handle.capacity_bytes();
    for (const auto* h : {&backward_x, &backward_dy}) total += h->capacity_bytes();
    for (const auto* b :
         {&host_logits, &d_slot_weights, &d_sent_weights, &grouped_weights, &d_grouped_weights,
          &d_plan_weights, &d_logits, &shared_output, &shared_scales, &d_shared_scales}) {
      total += b->capacity_bytes();
    }
    for (const auto* b : {&d_weight_send_bytes, &d_weight_send_offsets, &d_weight_recv_bytes,
                          &d_weight_recv_offsets}) {
      total += b->capacity_bytes();
    }
    total += unit_meta.capacity_bytes() + backward_host.bytes();
    return total + host_plan.experts.capacity_bytes() + host_plan.weights.capacity_bytes() +
           host_plan.counts.capacity_bytes();
  }

  /// The data path whose memory the buffers take (set by the first layer; declared first,
  /// so that it outlives them).
  std::shared_ptr<DataPath> data_path;
  std::unique_ptr<Stream> stream;
  // A host router behind a device data path: its logits and plan.
  Buffer<float> host_logits;
  RoutingPlan host_plan;
  // The counts of a step: rows to and from each peer per chunk [R, chunks], and one
  // chunk's [R] as the data path counts them.
  Buffer<std::int64_t> rows_to_table, rows_from_table, chunk_counts;
  // A forward's chunks in flight (one unless it pipelines), when it keeps nothing for the
  // backward, and the stream whose thread runs their exchanges.
  std::vector<std::unique_ptr<layer_detail::ChunkSlot>> chunk_slots;
  std::unique_ptr<HostStream> exchange_stream;
  // Backward: the forward's rows (when it kept none) and dy's rows with its layout; per
  // received (row, slot) the weight's gradient; the same for the sent rows once they came
  // back; the exchange's byte counts; the plan's weight gradients and the logits'.
  DispatchHandle backward_x, backward_dy;
  Buffer<float> d_slot_weights, d_sent_weights;
  // Per grouped row [A]: its slot's weight and that weight's gradient.
  Buffer<float> grouped_weights, d_grouped_weights;
  Buffer<SlotMeta> unit_meta;  // a handle's slots at weight 1, for the unit-weight combine
  BackwardHostSide backward_host;
  Buffer<std::size_t> d_weight_send_bytes, d_weight_send_offsets, d_weight_recv_bytes,
      d_weight_recv_offsets;
  Buffer<float> d_plan_weights, d_logits;
  // The shared expert's output rows [T,H] (in the backward: its input gradient), and per
  // token its gate's scale and that scale's gradient.
  Buffer<float> shared_output, shared_scales, d_shared_scales;
};

}  // namespace switchyard
