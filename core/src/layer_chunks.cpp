// MoELayer's chunk pipeline (`MoELayerParts::chunks`): the tokens' rows in chunks whose
// exchanges run on a thread of their own (or the calling thread) while this thread packs,
// groups, runs the experts of and sums another; the same y as one chunk.
#include "layer_internal.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <optional>
#include <utility>

#include "switchyard/status.hpp"

namespace switchyard {

using namespace layer_detail;

void MoELayer::ExchangeTask::run(void* task) noexcept {
  auto& t = *static_cast<ExchangeTask*>(task);
  try {
    Transport& transport = *t.layer->parts_.transport;
    if (t.back) {
      transport.alltoallv(t.layer->back_buffers(*t.handle));
    } else {
      transport.alltoallv(t.layer->row_buffers(*t.handle));
      transport.alltoallv(t.layer->meta_buffers(*t.handle));
    }
  } catch (...) {
    t.error = std::current_exception();
  }
}

void MoELayer::forward_chunks(const TensorView& x, const RoutingPlan& plan, const TensorView& y,
                              const Error* routing_error) {
  failure_agreed_ = false;
  auto start = Clock::now();
  Transport& transport = *parts_.transport;
  const auto r_size = static_cast<std::size_t>(transport.size());
  const int n = parts_.chunks;
  const bool fused = fused_experts();
  const auto chunks = static_cast<std::size_t>(n);
  std::optional<Error> planerror;
  const Error* local_error = routing_error;
  if (local_error == nullptr) {
    planerror = check_plan(plan);
    if (planerror) local_error = &*planerror;
  }
  const std::int64_t T = local_error ? 0 : plan.num_tokens;
  const int K = plan.slots;
  const std::int64_t H = hidden_;
  auto first_token = [&](int c) { return T * c / n; };

  // Every chunk's row counts in one exchange, which also tells every rank whether any
  // rank failed (as the unchunked counts exchange does).
  workspace_->chunk_rows_to.resize(r_size * chunks);
  workspace_->chunk_rows_from.resize(r_size * chunks);
  workspace_->handle.rows_to_.resize(r_size);
  for (int c = 0; c < n && local_error == nullptr; ++c) {
    LayoutCountsArgs counts;
    counts.experts = plan.experts.data() + first_token(c) * K;
    counts.num_tokens = first_token(c + 1) - first_token(c);
    counts.slots = K;
    counts.placement = &parts_.placement;
    counts.rows_to = workspace_->handle.rows_to_.data();
    data_path_->layout_counts(counts, *workspace_->stream);
    for (std::size_t p = 0; p < r_size; ++p) {
      workspace_->chunk_rows_to[p * chunks + static_cast<std::size_t>(c)] =
          workspace_->handle.rows_to_[p];
    }
  }
  if (local_error != nullptr) workspace_->chunk_rows_to.assign(r_size * chunks, -1);
  timings_.layout_s = seconds_since(start);
  start = Clock::now();
  transport.alltoall(workspace_->chunk_rows_to.data(), workspace_->chunk_rows_from.data(),
                     chunks * sizeof(std::int64_t), *workspace_->stream);
  host_ready();
  timings_.dispatch_s = seconds_since(start);
  if (local_error != nullptr) {
    failure_agreed_ = true;
    throw *local_error;
  }
  for (std::size_t p = 0; p < r_size; ++p) {
    if (workspace_->chunk_rows_from[p * chunks] < 0) {
      failure_agreed_ = true;
      throw Error(ErrorCode::kPeerFailed, "MoE dispatch: world rank " +
                                              std::to_string(parts_.first_world_rank + p) +
                                              " failed before dispatch and reports the cause");
    }
  }

  // Up to three chunks are in flight: one exchanging its rows, one being staged, one
  // whose partial sums travel back.
  const std::size_t in_flight = std::min<std::size_t>(chunks, 3);
  if (!workspace_->exchange_stream)
    workspace_->exchange_stream = std::make_unique<HostStream>(HostStream::Mode::kQueued);
  while (workspace_->chunk_slots.size() < in_flight) {
    auto slot = std::make_unique<ChunkSlot>();
    slot->dispatched = workspace_->exchange_stream->create_event();
    slot->combined = workspace_->exchange_stream->create_event();
    workspace_->chunk_slots.push_back(std::move(slot));
  }
  auto slot_of = [&](int c) -> ChunkSlot& {
    return *workspace_->chunk_slots[static_cast<std::size_t>(c) % in_flight];
  };
  // With overlap the exchanges run on the exchange thread; without, on this thread where
  // they are launched (the same order on every rank, so the collectives still match).
  const bool overlap = parts_.overlap_exchanges;
  auto launch = [&](ExchangeTask& task, StreamEvent& done) {
    if (overlap) {
      workspace_->exchange_stream->enqueue(&ExchangeTask::run, &task);
      workspace_->exchange_stream->record(done);
    } else {
      ExchangeTask::run(&task);
    }
  };
  auto wait = [&](StreamEvent& done, ExchangeTask& task) {
    if (overlap) done.synchronize();
    if (task.error) std::rethrow_exception(std::exchange(task.error, nullptr));
  };
  auto start_dispatch = [&](int c) {
    ChunkSlot& slot = slot_of(c);
    DispatchHandle& h = slot.handle;
    h.use_memory(data_path_->allocator(), data_path_->staging_allocator());
    const std::int64_t first = first_token(c);
    h.hidden_ = H;
    h.num_tokens_ = first_token(c + 1) - first;
    h.slots_ = K;
    h.payload_dtype_ = parts_.payload_dtype;
    h.rows_to_.resize(r_size);
    h.rows_from_.resize(r_size);
    for (std::size_t p = 0; p < r_size; ++p) {
      h.rows_to_[p] = workspace_->chunk_rows_to[p * chunks + static_cast<std::size_t>(c)];
      h.rows_from_[p] = workspace_->chunk_rows_from[p * chunks + static_cast<std::size_t>(c)];
    }
    stage_rows({x.data_as<const float>() + first * H, plan.experts.data() + first * K,
                plan.weights.data() + first * K, h.num_tokens_, K},
               h);
    slot.dispatch = {this, &h, false, nullptr};
    launch(slot.dispatch, *slot.dispatched);
  };
  auto finish = [&](int c) {
    ChunkSlot& slot = slot_of(c);
    wait(*slot.combined, slot.combine);
    const auto sum_start = Clock::now();
    sum_rows(slot.handle, y.data_as<float>() + first_token(c) * H);
    timings_.combine_s += seconds_since(sum_start);
  };

  timings_.experts_s = 0;
  timings_.combine_s = 0;
  try {
    start_dispatch(0);
    for (int c = 0; c < n; ++c) {
      if (c + 1 < n) start_dispatch(c + 1);  // packs while chunk c's rows travel
      ChunkSlot& slot = slot_of(c);
      start = Clock::now();
      wait(*slot.dispatched, slot.dispatch);
      timings_.dispatch_s += seconds_since(start);
      if (fused) {
        start = Clock::now();
        weigh_rows(slot.handle);
        timings_.experts_s += seconds_since(start);
        start = Clock::now();
      } else {
        group_rows(slot.handle, forward_expert_dtypes(/*save=*/false));
        start = Clock::now();
        run_grouped_experts(slot.handle);
        timings_.experts_s += seconds_since(start);
        start = Clock::now();
        const TensorView chunk_y(y.data_as<float>() + first_token(c) * H, DType::kF32,
                                 {slot.handle.num_tokens_, H});
        reduce_rows(slot.handle, slot.handle.expert_output(), chunk_y, /*in_expert_buffers=*/true);
      }
      slot.combine = {this, &slot.handle, true, nullptr};
      launch(slot.combine, *slot.combined);
      timings_.combine_s += seconds_since(start);
      if (c > 0) finish(c - 1);  // sums chunk c-1 while chunk c's partials travel
    }
    finish(n - 1);
  } catch (...) {
    // The exchanges already queued reference the chunk buffers: let them end first.
    try {
      workspace_->exchange_stream->synchronize();
    } catch (...) {  // NOLINT(bugprone-empty-catch): the first error is the one to report
    }
    throw;
  }
  // Rows to and from other ranks over all chunks: rows out, partial sums back.
  std::int64_t rows_sent = 0, rows_received = 0;
  for (std::size_t p = 0; p < r_size; ++p) {
    if (static_cast<int>(p) == transport.rank()) continue;
    for (std::size_t c = 0; c < chunks; ++c) {
      rows_sent += workspace_->chunk_rows_to[p * chunks + c];
      rows_received += workspace_->chunk_rows_from[p * chunks + c];
    }
  }
  const std::size_t row_bytes = payload_row_bytes(parts_.payload_dtype, H);
  const std::size_t meta_bytes = static_cast<std::size_t>(K) * sizeof(SlotMeta);
  const std::size_t back_bytes = static_cast<std::size_t>(H) * dtype_size(parts_.combine_dtype);
  traffic_.rows_sent = rows_sent;
  traffic_.dispatch_bytes = (r_size - 1) * chunks * sizeof(std::int64_t) +
                            static_cast<std::uint64_t>(rows_sent) * (row_bytes + meta_bytes);
  traffic_.combine_bytes = static_cast<std::uint64_t>(rows_received) * back_bytes;
}

std::optional<Error> first_non_finite(const TensorView& m, std::string_view what) {
  const float* data = m.data_as<const float>();
  const std::int64_t H = m.dim(1);
  for (std::int64_t i = 0; i < m.dim(0) * H; ++i) {
    if (!std::isfinite(data[i])) {
      return Error(ErrorCode::kInvalidArgument,
                   std::string(what) + ": token " + std::to_string(i / H) + " feature " +
                       std::to_string(i % H) + " is " + (std::isnan(data[i]) ? "NaN" : "infinite"));
    }
  }
  return std::nullopt;
}

}  // namespace switchyard
