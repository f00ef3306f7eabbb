// A token goes once to each rank that holds any of its experts: its row in the payload
// dtype, and beside it, in a metadata buffer, its K (local expert, weight) slots. Partial
// sums are formed on the expert side, so the combine sends back one row per dispatched row.
// A rank's rows for itself never pass through the transport: they are packed straight into
// its receive buffer and their partial sums written straight among its returned rows.
#include "token_exchange.hpp"

#include <algorithm>
#include <cmath>
#include <string>

#include "layer_internal.hpp"
#include "switchyard/status.hpp"

namespace switchyard {

using namespace layer_detail;

Stream& TokenExchange::stream() const noexcept { return *parts_.workspace->stream; }

std::optional<Error> TokenExchange::check_plan(const RoutingPlan& plan) const {
  const std::int64_t T = plan.num_tokens;
  const int K = plan.slots;
  const int E = parts_.placement->num_experts();
  if (K < 1 || plan.experts.size() != to_size(T * K) || plan.weights.size() != to_size(T * K)) {
    return Error(ErrorCode::kInvalidArgument, "routing plan shape does not match " +
                                                  std::to_string(T) + " tokens x " +
                                                  std::to_string(K) + " slots");
  }
  const Device device = parts_.data_path->device();
  if (plan.device() != device) {
    return Error(ErrorCode::kInvalidArgument, "routing plan is in " + device_name(plan.device()) +
                                                  " memory, the layer's data path runs on " +
                                                  device_name(device));
  }
  // Expert ids are checked here when the host can read the plan; a device data path checks
  // them in its layout.
  if (!plan.experts.allocator().host_accessible()) return std::nullopt;
  return check_routing_plan_values(plan, E);
}

namespace {

std::string plan_slot(std::int64_t token, std::int64_t slot) {
  return "routing plan: token " + std::to_string(token) + " slot " + std::to_string(slot);
}

}  // namespace

Error expert_out_of_range(std::int64_t token, std::int64_t slot, std::int64_t expert,
                          int num_experts) {
  return Error(ErrorCode::kInvalidArgument, plan_slot(token, slot) + " has expert " +
                                                std::to_string(expert) + ", outside 0.." +
                                                std::to_string(num_experts - 1));
}

std::optional<Error> check_routing_plan_values(const RoutingPlan& plan, int num_experts) {
  const auto K = static_cast<std::int64_t>(plan.slots);
  const int E = num_experts;
  for (std::size_t i = 0; i < plan.experts.size(); ++i) {
    const std::int32_t e = plan.experts[i];
    const auto at = static_cast<std::int64_t>(i);
    if (e < -1 || e >= E) return expert_out_of_range(at / K, at % K, e, E);
    // A NaN or infinite weight would reach y through every expert row it scales.
    if (e >= 0 && !std::isfinite(plan.weights[i])) {
      const float w = plan.weights[i];
      return Error(ErrorCode::kInvalidArgument, plan_slot(at / K, at % K) + " has weight " +
                                                    (std::isnan(w) ? "NaN"
                                                     : w > 0       ? "+Inf"
                                                                   : "-Inf") +
                                                    ", not a finite number");
    }
  }
  return std::nullopt;
}

void TokenExchange::agree_counts(const RoutingPlan& plan, int chunks, const Error* local_error) {
  count_rows(plan, chunks, local_error);
  exchange_counts(local_error);
}

void TokenExchange::assume_worst_case(std::int64_t num_tokens, int slots, std::int64_t block_rows) {
  failure_agreed_ = false;
  plan_error_.reset();
  LayerWorkspace& ws = *parts_.workspace;
  const std::size_t R = ranks(), W = counts_width();
  chunks_ = 1;
  num_tokens_ = num_tokens;
  slots_ = slots;
  worst_case_rows_ = block_rows;
  ws.rows_to_table.resize(R * W);
  ws.rows_from_table.resize(R * W);
  for (std::size_t p = 0; p < R; ++p) {
    // Rows, then slots per local expert: each may get every row of the block.
    std::fill_n(ws.rows_to_table.data() + p * W, W, block_rows);
    std::fill_n(ws.rows_from_table.data() + p * W, W, block_rows);
  }
}

void TokenExchange::count_failure() {
  LayerWorkspace& ws = *parts_.workspace;
  num_tokens_ = 0;
  ws.rows_to_table.assign(ws.rows_to_table.size(), -1);  // tells every peer that this rank failed
}

void TokenExchange::count_rows(const RoutingPlan& plan, int chunks, const Error* local_error) {
  failure_agreed_ = false;
  plan_error_.reset();
  if (local_error == nullptr) {
    plan_error_ = check_plan(plan);
    if (plan_error_) local_error = &*plan_error_;
  }
  LayerWorkspace& ws = *parts_.workspace;
  const std::size_t R = ranks();
  const auto n = static_cast<std::size_t>(chunks);
  const std::size_t W = counts_width();
  chunks_ = chunks;
  worst_case_rows_ = 0;
  num_tokens_ = local_error ? 0 : plan.num_tokens;
  slots_ = plan.slots;
  ws.rows_to_table.resize(R * n * W);
  ws.rows_from_table.resize(R * n * W);
  if (local_error == nullptr) {
    // Per peer one block of its chunks' counts, [chunks, W] each: the rows it gets, then
    // the slots for each of its local experts (so that it sizes its grouping without
    // counting what arrived).
    const int E = parts_.placement->num_experts();
    ws.chunk_counts.resize(R + static_cast<std::size_t>(E));
    std::fill(ws.rows_to_table.begin(), ws.rows_to_table.end(), 0);
    for (int c = 0; c < chunks; ++c) {
      LayoutCountsArgs counts;
      counts.experts = plan.experts.data() + first_token(c) * slots_;
      counts.num_tokens = first_token(c + 1) - first_token(c);
      counts.slots = slots_;
      counts.placement = parts_.placement;
      counts.rows_to = ws.chunk_counts.data();
      counts.slots_to_expert = ws.chunk_counts.data() + R;
      parts_.data_path->layout_counts(counts, stream());  // written when it returns
      for (std::size_t p = 0; p < R; ++p) {
        std::int64_t* block = ws.rows_to_table.data() + (p * n + static_cast<std::size_t>(c)) * W;
        block[0] = ws.chunk_counts[p];
        const int first = parts_.placement->first_expert(static_cast<int>(p));
        const int local = parts_.placement->num_local(static_cast<int>(p));
        for (int j = 0; j < local; ++j) block[1 + j] = counts.slots_to_expert[first + j];
      }
    }
  } else {
    count_failure();
  }
}

void TokenExchange::exchange_counts(const Error* local_error) {
  if (local_error == nullptr && plan_error_) local_error = &*plan_error_;
  LayerWorkspace& ws = *parts_.workspace;
  const std::size_t R = ranks();
  const auto n = static_cast<std::size_t>(chunks_);
  const std::size_t W = counts_width();
  const std::size_t bytes = n * W * sizeof(std::int64_t);
  if (parts_.data_path->device().kind == Device::Kind::kHost) {
    parts_.transport->alltoall(ws.rows_to_table.data(), ws.rows_from_table.data(), bytes, stream());
    stream().synchronize();  // the counts are read on the host
  } else {
    // Device rows: the counts are host (staging) memory, exchanged by the blocking form.
    parts_.transport->alltoall(ws.rows_to_table.data(), ws.rows_from_table.data(), bytes);
  }
  // From here every rank of the group knows whether any rank failed: they all stop at
  // this same point, and the group stays usable for the next step. What the step queued
  // before (copies of the caller's plan and tokens) finishes before the caller gets back.
  if (local_error != nullptr) {
    failure_agreed_ = true;
    LayerWorkspace::wait_quietly(stream());
    throw *local_error;
  }
  for (std::size_t p = 0; p < R; ++p) {
    if (ws.rows_from_table[p * n * W] < 0) {
      failure_agreed_ = true;
      LayerWorkspace::wait_quietly(stream());
      throw Error(ErrorCode::kPeerFailed, "MoE dispatch: world rank " +
                                              std::to_string(parts_.first_world_rank + p) +
                                              " failed before dispatch and reports the cause");
    }
  }
}

void TokenExchange::stage(const TokenRange& tokens, int c, DispatchHandle& h) {
  const LayerWorkspace& ws = *parts_.workspace;
  const std::size_t R = ranks(), self = me();
  const auto n = static_cast<std::size_t>(chunks_);
  const std::int64_t H = parts_.hidden;
  const int K = tokens.slots;
  const std::size_t row_bytes = payload_row_bytes(parts_.payload_dtype, H);
  const std::size_t meta_bytes = to_size(K) * sizeof(SlotMeta);
  h.use_memory(parts_.data_path->allocator(), parts_.data_path->staging_allocator());
  h.hidden_ = H;
  h.num_tokens_ = tokens.count;
  h.slots_ = K;
  h.payload_dtype_ = parts_.payload_dtype;
  for (auto* b : {&h.rows_to_, &h.rows_from_, &h.rows_to_offset_, &h.rows_from_offset_})
    b->resize(R);
  std::int64_t S = 0, N = 0;
  const std::size_t W = counts_width();
  // This rank's local experts get the slots every peer counted for them.
  const int L = parts_.placement->num_local(parts_.transport->rank());
  h.rows_per_expert_.resize(static_cast<std::size_t>(L));
  std::fill(h.rows_per_expert_.begin(), h.rows_per_expert_.end(), 0);
  for (std::size_t p = 0; p < R; ++p) {
    const std::int64_t* to = ws.rows_to_table.data() + (p * n + static_cast<std::size_t>(c)) * W;
    const std::int64_t* from =
        ws.rows_from_table.data() + (p * n + static_cast<std::size_t>(c)) * W;
    for (int l = 0; l < L; ++l) h.rows_per_expert_[static_cast<std::size_t>(l)] += from[1 + l];
    h.rows_to_[p] = to[0];
    h.rows_from_[p] = from[0];
    h.rows_to_offset_[p] = S;
    h.rows_from_offset_[p] = N;
    S += h.rows_to_[p];
    N += h.rows_from_[p];
  }
  const std::int64_t self_rows = h.rows_to_[self];
  peer_exchange(h.rows_to_, self, row_bytes, /*compact=*/true, h.send_bytes_, h.send_offsets_);
  peer_exchange(h.rows_from_, self, row_bytes, /*compact=*/false, h.recv_bytes_, h.recv_offsets_);
  peer_exchange(h.rows_to_, self, meta_bytes, /*compact=*/false, h.meta_send_bytes_,
                h.meta_send_offsets_);
  peer_exchange(h.rows_from_, self, meta_bytes, /*compact=*/false, h.meta_recv_bytes_,
                h.meta_recv_offsets_);

  h.send_row_token_.resize(to_size(S));
  h.send_meta_.resize(to_size(S * K));
  h.send_rows_.resize(to_size(S - self_rows) * row_bytes);
  h.recv_rows_.resize(to_size(N) * row_bytes);
  h.recv_meta_.resize(to_size(N * K));
  LayoutArgs layout;
  layout.experts = tokens.experts;
  layout.weights = tokens.weights;
  layout.num_tokens = tokens.count;
  layout.slots = K;
  layout.placement = parts_.placement;
  layout.rows_to_offset = {h.rows_to_offset_.data(), R};
  layout.send_row_token = h.send_row_token_.data();
  layout.send_meta = h.send_meta_.data();
  layout.block_rows = worst_case_rows_;
  if (worst_case_rows_ > 0) {
    h.first_bad_slot_.resize(1);
    layout.first_bad_slot = h.first_bad_slot_.data();
  }
  parts_.data_path->layout(layout, stream());
  if (parts_.slot_order) place_slot_rows(tokens, h);
  // One run per destination: the peers' into the send buffer, this rank's own in place.
  h.pack_runs_.resize(R);
  for (std::size_t p = 0; p < R; ++p) {
    std::byte* rows = p == self
                          ? h.recv_rows_.data() + to_size(h.rows_from_offset_[self]) * row_bytes
                          : h.send_rows_.data() + h.send_offsets_[p];
    h.pack_runs_[p] = {h.rows_to_offset_[p], h.rows_to_[p], rows};
  }
  PackArgs pack;
  pack.x = tokens.x;
  pack.hidden = H;
  pack.send_row_token = h.send_row_token_.data();
  pack.num_rows = S;
  pack.dtype = parts_.payload_dtype;
  parts_.data_path->pack_runs(pack, {h.pack_runs_.data(), R}, stream());
  if (self_rows > 0) {
    parts_.data_path->copy(h.recv_meta_.data() + h.rows_from_offset_[self] * K,
                           h.send_meta_.data() + h.rows_to_offset_[self] * K,
                           to_size(self_rows * K) * sizeof(SlotMeta), stream());
  }
}

AlltoallvBuffers TokenExchange::row_buffers(DispatchHandle& h) const {
  return {h.send_rows_.data(),       span_of(h.send_bytes_), span_of(h.send_offsets_),
          h.recv_rows_.data(),       span_of(h.recv_bytes_), span_of(h.recv_offsets_),
          parts_.data_path->device()};
}

AlltoallvBuffers TokenExchange::meta_buffers(DispatchHandle& h) const {
  return {reinterpret_cast<const std::byte*>(h.send_meta_.data()),
          span_of(h.meta_send_bytes_),
          span_of(h.meta_send_offsets_),
          reinterpret_cast<std::byte*>(h.recv_meta_.data()),
          span_of(h.meta_recv_bytes_),
          span_of(h.meta_recv_offsets_),
          parts_.data_path->device()};
}

AlltoallvBuffers TokenExchange::back_buffers(DispatchHandle& h) const {
  return {h.partial_at_,
          span_of(h.back_send_bytes_),
          span_of(h.back_send_offsets_),
          h.combined_at_,
          span_of(h.back_recv_bytes_),
          span_of(h.back_recv_offsets_),
          parts_.data_path->device()};
}

bool TokenExchange::staged() const noexcept {
  return parts_.data_path->device().kind != Device::Kind::kHost &&
         !parts_.transport->capabilities().device_memory;
}

namespace {

/// Bytes from the start of an exchange buffer to the end of its last part.
std::size_t exchange_extent(std::span<const std::size_t> counts,
                            std::span<const std::size_t> offsets) {
  std::size_t end = 0;
  for (std::size_t p = 0; p < counts.size(); ++p) {
    if (counts[p] != 0) end = std::max(end, offsets[p] + counts[p]);
  }
  return end;
}

}  // namespace

void TokenExchange::send_staged(std::span<const AlltoallvBuffers> exchanges,
                                std::span<Buffer<std::byte>* const> received, DispatchHandle& h) {
  // What the device packed goes to host memory (one wait for all of it), the host
  // transport moves it, and the peers' parts go back to the device behind the stream's
  // later work. Nothing of this rank's own rows moves: the data path wrote them in place.
  std::size_t send_bytes = 0;
  for (const AlltoallvBuffers& b : exchanges)
    send_bytes += exchange_extent(b.send_counts, b.send_offsets);
  h.staged_send_.resize(send_bytes);
  std::size_t at = 0;
  for (const AlltoallvBuffers& b : exchanges) {
    const std::size_t bytes = exchange_extent(b.send_counts, b.send_offsets);
    if (bytes != 0) parts_.data_path->copy(h.staged_send_.data() + at, b.send, bytes, stream());
    at += bytes;
  }
  stream().synchronize();
  at = 0;
  for (std::size_t i = 0; i < exchanges.size(); ++i) {
    const AlltoallvBuffers& b = exchanges[i];
    Buffer<std::byte>& recv = *received[i];
    recv.resize(exchange_extent(b.recv_counts, b.recv_offsets));
    parts_.transport->alltoallv({h.staged_send_.data() + at, b.send_counts, b.send_offsets,
                                 recv.data(), b.recv_counts, b.recv_offsets, Device::host()});
    at += exchange_extent(b.send_counts, b.send_offsets);
    for (std::size_t p = 0; p < b.recv_counts.size(); ++p) {
      if (p == me() || b.recv_counts[p] == 0) continue;
      parts_.data_path->copy(b.recv + b.recv_offsets[p], recv.data() + b.recv_offsets[p],
                             b.recv_counts[p], stream());
    }
  }
}

void TokenExchange::send_rows(DispatchHandle& h, Stream* on) {
  Transport& transport = *parts_.transport;
  if (staged()) {
    const std::array<AlltoallvBuffers, 2> exchanges{row_buffers(h), meta_buffers(h)};
    const std::array<Buffer<std::byte>*, 2> received{&h.staged_rows_, &h.staged_meta_};
    send_staged(exchanges, received, h);
  } else if (on != nullptr) {
    // One collective: a device transport moves the rows and their slots together.
    const std::array<AlltoallvBuffers, 2> exchanges{row_buffers(h), meta_buffers(h)};
    transport.alltoallv_group(exchanges, *on);
  } else {
    transport.alltoallv(row_buffers(h));
    transport.alltoallv(meta_buffers(h));
  }
}

void TokenExchange::send_back(DispatchHandle& h, Stream* on) {
  if (staged()) {
    const std::array<AlltoallvBuffers, 1> exchanges{back_buffers(h)};
    const std::array<Buffer<std::byte>*, 1> received{&h.staged_back_};
    send_staged(exchanges, received, h);
  } else if (on != nullptr) {
    parts_.transport->alltoallv(back_buffers(h), *on);
  } else {
    parts_.transport->alltoallv(back_buffers(h));
  }
}

const std::byte* TokenExchange::host_zeros(std::size_t bytes) {
  if (zeros_.size() < bytes) {
    LayerWorkspace::wait_quietly(stream());  // queued copies may still read the old zeros
    zeros_.assign(bytes, std::byte{0});
  }
  return zeros_.data();
}

void TokenExchange::group(DispatchHandle& h, ExpertRowDTypes dtypes, std::int64_t alignment,
                          bool finite_blocks) {
  // Group the received rows per local expert (stable: source rank, then source token).
  const std::int64_t H = parts_.hidden;
  const int K = h.slots_;
  const std::int64_t N =
      static_cast<std::int64_t>(h.recv_meta_.size()) / static_cast<std::int64_t>(K ? K : 1);
  // The rows per local expert came with the counts (`stage`): nothing is counted again.
  // Each expert's block holds them, padded to a multiple of `alignment`.
  const int L = parts_.placement->num_local(parts_.transport->rank());
  h.expert_first_row_.resize(static_cast<std::size_t>(L));
  block_rows_.resize(static_cast<std::size_t>(L));
  std::int64_t A = 0;
  for (int l = 0; l < L; ++l) {
    const std::int64_t rows = h.rows_per_expert_[static_cast<std::size_t>(l)];
    h.expert_first_row_[static_cast<std::size_t>(l)] = A;
    block_rows_[static_cast<std::size_t>(l)] = (rows + alignment - 1) / alignment * alignment;
    A += block_rows_[static_cast<std::size_t>(l)];
  }
  h.expert_input_.resize(to_size(A * H));
  h.expert_output_.resize(to_size(A * H));
  h.assignment_of_slot_.resize(to_size(N * K));
  const bool worst_case = worst_case_rows_ > 0;
  if (worst_case && finite_blocks &&
      (h.expert_input_.data() != zeroed_rows_ ||
       h.expert_input_.capacity_bytes() != zeroed_bytes_)) {
    // Memory no step wrote yet may hold any bits: zeroed once per allocation.
    zeroed_rows_ = h.expert_input_.data();
    zeroed_bytes_ = h.expert_input_.capacity_bytes();
    parts_.data_path->copy(h.expert_input_.data(), host_zeros(zeroed_bytes_), zeroed_bytes_,
                           stream());
  }
  if (alignment > 1) {
    // Each block's padding rows (fewer than `alignment`) are zero; the grouping writes the
    // rows before them.
    const std::size_t row_bytes = to_size(H) * dtype_size(dtypes.input);
    const std::byte* zeros = host_zeros(to_size(alignment - 1) * row_bytes);
    auto* rows = reinterpret_cast<std::byte*>(h.expert_input_.data());
    for (int l = 0; l < L; ++l) {
      const auto at = static_cast<std::size_t>(l);
      const std::int64_t used = h.rows_per_expert_[at], padding = block_rows_[at] - used;
      if (padding == 0) continue;
      parts_.data_path->copy(rows + to_size(h.expert_first_row_[at] + used) * row_bytes, zeros,
                             to_size(padding) * row_bytes, stream());
    }
  }
  GroupArgs group;
  group.rows = h.recv_rows_.data();
  group.meta = h.recv_meta_.data();
  group.num_rows = N;
  group.slots = K;
  group.hidden = H;
  group.dtype = parts_.payload_dtype;
  group.num_local_experts = L;
  // The blocks' sizes: a data path places expert l's rows at the sum of those before it.
  group.rows_per_expert = block_rows_.data();
  // Sized in f32 rows whatever the dtype: the combine may reuse them (place_partials).
  group.expert_input = reinterpret_cast<std::byte*>(h.expert_input_.data());
  group.expert_input_dtype = dtypes.input;
  group.assignment_of_slot = h.assignment_of_slot_.data();
  h.expert_input_dtype_ = dtypes.input;
  // Its buffer holds f32 rows whatever the dtype, as the input's does.
  h.expert_output_dtype_ = dtypes.output;
  if (worst_case) {
    h.rows_in_block_.resize(static_cast<std::size_t>(L));
    group.rows_in_block = h.rows_in_block_.data();
  }
  parts_.data_path->group_by_expert(group, stream());
}

void TokenExchange::place_partials(DispatchHandle& h, bool in_expert_buffers) {
  const std::int64_t H = parts_.hidden;
  const int K = h.slots_;
  const std::int64_t N = static_cast<std::int64_t>(h.recv_meta_.size()) / (K ? K : 1);
  const std::int64_t S = static_cast<std::int64_t>(h.send_row_token_.size());
  const std::size_t self = me();
  const std::size_t row_bytes = to_size(H) * dtype_size(parts_.combine_dtype);
  // The partial sums of this rank's own rows go straight to their place among the
  // returned rows; the partials buffer holds the others'.
  const std::size_t partial_bytes = to_size(N - h.rows_from_[self]) * row_bytes;
  const std::size_t combined_bytes = to_size(S) * row_bytes;
  // In expert buffers: the expert input rows are dead once the experts ran, and hold both
  // when they fit (A >= N rows of f32; the reduce reads the expert output rows meanwhile).
  const std::size_t dead_bytes = in_expert_buffers ? h.expert_input_.size() * sizeof(float) : 0;
  if (partial_bytes + combined_bytes <= dead_bytes) {
    h.partial_at_ = reinterpret_cast<std::byte*>(h.expert_input_.data());
    h.combined_at_ = h.partial_at_ + partial_bytes;
  } else {
    h.partial_rows_.resize(partial_bytes);
    h.combined_rows_.resize(combined_bytes);
    h.partial_at_ = h.partial_rows_.data();
    h.combined_at_ = h.combined_rows_.data();
  }
  // Back to the token's rank: the dispatch counts reversed.
  peer_exchange(h.rows_from_, self, row_bytes, /*compact=*/true, h.back_send_bytes_,
                h.back_send_offsets_);
  peer_exchange(h.rows_to_, self, row_bytes, /*compact=*/false, h.back_recv_bytes_,
                h.back_recv_offsets_);
}

std::array<TokenExchange::PartialRows, 3> TokenExchange::partial_segments(
    const DispatchHandle& h) const {
  const std::size_t self = me();
  const int K = h.slots_;
  const std::int64_t N = static_cast<std::int64_t>(h.recv_meta_.size()) / (K ? K : 1);
  const std::int64_t self_first = h.rows_from_offset_[self], self_rows = h.rows_from_[self];
  const std::size_t row_bytes = to_size(parts_.hidden) * dtype_size(parts_.combine_dtype);
  return {PartialRows{0, self_first, h.partial_at_},
          PartialRows{self_first, self_rows,
                      h.combined_at_ + to_size(h.rows_to_offset_[self]) * row_bytes},
          PartialRows{self_first + self_rows, N - self_first - self_rows,
                      h.partial_at_ + to_size(self_first) * row_bytes}};
}

void TokenExchange::reduce(DispatchHandle& h, const TensorView& expert_output, const TensorView& y,
                           bool in_expert_buffers, const SlotMeta* meta) {
  if (meta == nullptr) meta = h.recv_meta_.data();
  const std::int64_t H = parts_.hidden;
  const int K = h.slots_;
  const std::int64_t A = static_cast<std::int64_t>(h.expert_input_.size()) / H;
  // Shapes are checked on every rank before anything is sent; a mismatch is a caller bug
  // that would otherwise corrupt memory.
  const Device device = parts_.data_path->device();
  const DType output_dtype = expert_output.dtype() == DType::kBF16 ? DType::kBF16 : DType::kF32;
  expert_output.require_on(device, "MoE combine expert_output", output_dtype, {A, H});
  y.require_on(device, "MoE combine y", DType::kF32, {h.num_tokens_, H});
  if (parts_.slot_order) {
    reduce_per_slot(h, expert_output, meta);
    return;
  }
  place_partials(h, in_expert_buffers);
  for (const PartialRows& rows : partial_segments(h)) {
    if (rows.count == 0) continue;
    WeightedReduceArgs args;
    args.expert_output = static_cast<const std::byte*>(expert_output.data());
    args.expert_output_dtype = output_dtype;
    args.meta = meta + rows.first * K;
    args.assignment_of_slot = h.assignment_of_slot_.data() + rows.first * K;
    args.num_rows = rows.count;
    args.slots = K;
    args.hidden = H;
    args.combine_dtype = parts_.combine_dtype;
    args.partial_rows = rows.out;
    parts_.data_path->weighted_reduce(args, stream());
  }
}

void TokenExchange::sum(DispatchHandle& h, float* y) {
  if (parts_.slot_order) {
    sum_per_slot(h, y);
    return;
  }
  // Rows arrive in (expert rank, token) order, so each token sums its partials in
  // ascending rank order: the same on every transport.
  UnpermuteSumArgs args;
  args.combined_rows = h.combined_at_;
  args.send_row_token = h.send_row_token_.data();
  args.num_rows = static_cast<std::int64_t>(h.send_row_token_.size());
  args.hidden = parts_.hidden;
  args.combine_dtype = parts_.combine_dtype;
  args.y = y;
  args.num_tokens = h.num_tokens_;
  parts_.data_path->unpermute_sum(args, stream());
}

void TokenExchange::place_slot_rows(const TokenRange& tokens, DispatchHandle& h) {
  // A row sent to peer p lists its slots on p in routing order, and p returns one row per
  // kept slot in that order: the j-th returned row of a send row is its token's j-th k
  // whose slot lives on p.
  const std::size_t R = ranks();
  const int K = tokens.slots;
  h.slot_rows_to_.resize(R);
  h.slot_position_.resize(to_size(tokens.count * K));
  std::fill(h.slot_position_.begin(), h.slot_position_.end(), -1);
  std::int64_t returned = 0;
  for (std::size_t p = 0; p < R; ++p) {
    const std::int64_t first = returned;
    for (std::int64_t i = h.rows_to_offset_[p]; i < h.rows_to_offset_[p] + h.rows_to_[p]; ++i) {
      const std::int64_t t = h.send_row_token_[to_size(i)];
      for (int k = 0; k < K; ++k) {
        const std::int32_t slot = tokens.experts[t * K + k];
        if (slot >= 0 && parts_.placement->rank_of(slot) == static_cast<int>(p))
          h.slot_position_[to_size(t * K + k)] = returned++;
      }
    }
    h.slot_rows_to_[p] = returned - first;
  }
}

void TokenExchange::reduce_per_slot(DispatchHandle& h, const TensorView& expert_output,
                                    const SlotMeta* meta) {
  if (meta == nullptr) meta = h.recv_meta_.data();
  const std::int64_t H = parts_.hidden;
  const int K = h.slots_;
  const std::size_t R = ranks(), self = me();
  const std::size_t row_bytes = to_size(H) * dtype_size(parts_.combine_dtype);
  // The rows this rank returns to each peer: one per kept slot of the rows it sent.
  h.slot_rows_from_.resize(R);
  std::int64_t total = 0;
  for (std::size_t p = 0; p < R; ++p) {
    std::int64_t kept = 0;
    for (std::int64_t i = h.rows_from_offset_[p]; i < h.rows_from_offset_[p] + h.rows_from_[p];
         ++i) {
      for (int j = 0; j < K; ++j) kept += meta[i * K + j].local_expert >= 0 ? 1 : 0;
    }
    h.slot_rows_from_[p] = kept;
    total += kept;
  }
  std::int64_t returned_to_me = 0;
  for (std::size_t p = 0; p < R; ++p) returned_to_me += h.slot_rows_to_[p];
  h.partial_rows_.resize(to_size(total - h.slot_rows_from_[self]) * row_bytes);
  h.combined_rows_.resize(to_size(returned_to_me) * row_bytes);
  h.partial_at_ = h.partial_rows_.data();
  h.combined_at_ = h.combined_rows_.data();
  peer_exchange(h.slot_rows_from_, self, row_bytes, /*compact=*/true, h.back_send_bytes_,
                h.back_send_offsets_);
  peer_exchange(h.slot_rows_to_, self, row_bytes, /*compact=*/false, h.back_recv_bytes_,
                h.back_recv_offsets_);
  // This rank's own rows go straight among its returned rows.
  std::int64_t self_first = 0;
  for (std::size_t p = 0; p < self; ++p) self_first += h.slot_rows_to_[p];
  const bool bf16_out = expert_output.dtype() == DType::kBF16;
  const bool bf16_back = parts_.combine_dtype == DType::kBF16;
  const std::int64_t* assignment = h.assignment_of_slot_.data();
  for (std::size_t p = 0; p < R; ++p) {
    std::byte* out = p == self ? h.combined_at_ + to_size(self_first) * row_bytes
                               : h.partial_at_ + h.back_send_offsets_[p];
    for (std::int64_t i = h.rows_from_offset_[p]; i < h.rows_from_offset_[p] + h.rows_from_[p];
         ++i) {
      for (int j = 0; j < K; ++j) {
        const SlotMeta slot = meta[i * K + j];
        if (slot.local_expert < 0) continue;
        const std::int64_t a = assignment[i * K + j];
        for (std::int64_t e = 0; e < H; ++e) {
          const float o =
              bf16_out ? bf16_to_float(expert_output.data_as<const std::uint16_t>()[a * H + e])
                       : expert_output.data_as<const float>()[a * H + e];
          const float v = slot.weight * o;
          if (bf16_back) {
            reinterpret_cast<std::uint16_t*>(out)[e] = float_to_bf16(v);
          } else {
            reinterpret_cast<float*>(out)[e] = v;
          }
        }
        out += row_bytes;
      }
    }
  }
}

void TokenExchange::sum_per_slot(DispatchHandle& h, float* y) {
  const std::int64_t H = parts_.hidden, T = h.num_tokens_;
  const int K = h.slots_;
  const bool bf16_back = parts_.combine_dtype == DType::kBF16;
  const std::size_t row_bytes = to_size(H) * dtype_size(parts_.combine_dtype);
  for (std::int64_t t = 0; t < T; ++t) {
    float* out = y + t * H;
    std::fill_n(out, H, 0.0f);
    for (int k = 0; k < K; ++k) {
      const std::int64_t row = h.slot_position_[to_size(t * K + k)];
      if (row < 0) continue;
      const std::byte* in = h.combined_at_ + to_size(row) * row_bytes;
      for (std::int64_t e = 0; e < H; ++e) {
        out[e] += bf16_back ? bf16_to_float(reinterpret_cast<const std::uint16_t*>(in)[e])
                            : reinterpret_cast<const float*>(in)[e];
      }
    }
  }
}

void TokenExchange::return_slot_values(const DispatchHandle& h, std::int64_t num_tokens, int slots,
                                       const std::int32_t* plan_experts,
                                       const std::int64_t* send_row_token, const float* per_slot,
                                       float* out) {
  LayerWorkspace& ws = *parts_.workspace;
  const int K = slots;
  const std::size_t self = me();
  const std::size_t slot_bytes = to_size(K) * sizeof(float);
  const std::int64_t S = static_cast<std::int64_t>(h.send_row_token_.size());
  ws.d_sent_weights.resize(to_size(S * K));
  peer_exchange(h.rows_from_, self, slot_bytes, /*compact=*/false, ws.d_weight_send_bytes,
                ws.d_weight_send_offsets);
  peer_exchange(h.rows_to_, self, slot_bytes, /*compact=*/false, ws.d_weight_recv_bytes,
                ws.d_weight_recv_offsets);
  std::copy_n(per_slot + h.rows_from_offset_[self] * K, h.rows_from_[self] * K,
              ws.d_sent_weights.data() + h.rows_to_offset_[self] * K);
  const AlltoallvBuffers buffers{reinterpret_cast<const std::byte*>(per_slot),
                                 span_of(ws.d_weight_send_bytes),
                                 span_of(ws.d_weight_send_offsets),
                                 reinterpret_cast<std::byte*>(ws.d_sent_weights.data()),
                                 span_of(ws.d_weight_recv_bytes),
                                 span_of(ws.d_weight_recv_offsets),
                                 Device::host()};
  if (parts_.data_path->device().kind == Device::Kind::kHost) {
    parts_.transport->alltoallv(buffers, stream());
    stream().synchronize();
  } else {
    parts_.transport->alltoallv(buffers);  // host memory, beside a device stream
  }
  // A sent row's slots are its token's plan slots on the row's rank, in plan order.
  std::fill_n(out, num_tokens * K, 0.0f);
  for (std::size_t rank = 0; rank < h.rows_to_.size(); ++rank) {
    const std::int64_t first = h.rows_to_offset_[rank];
    for (std::int64_t i = first; i < first + h.rows_to_[rank]; ++i) {
      const std::int64_t t = send_row_token[to_size(i)];
      const std::int32_t* experts = plan_experts + t * K;
      int slot = 0;
      for (int j = 0; j < K; ++j) {
        if (experts[j] < 0 || parts_.placement->rank_of(experts[j]) != static_cast<int>(rank)) {
          continue;
        }
        out[t * K + j] = ws.d_sent_weights[to_size(i * K + slot++)];
      }
    }
  }
}

void TokenExchange::count_traffic() {
  const LayerWorkspace& ws = *parts_.workspace;
  const std::size_t R = ranks(), self = me(), n = static_cast<std::size_t>(chunks_);
  std::int64_t rows_sent = 0, rows_received = 0;
  for (std::size_t p = 0; p < R; ++p) {
    if (p == self) continue;
    for (std::size_t c = 0; c < n; ++c) {
      rows_sent += ws.rows_to_table[(p * n + c) * counts_width()];
      rows_received += ws.rows_from_table[(p * n + c) * counts_width()];
    }
  }
  const std::size_t row_bytes = payload_row_bytes(parts_.payload_dtype, parts_.hidden);
  const std::size_t meta_bytes = to_size(slots_) * sizeof(SlotMeta);
  const std::size_t back_bytes = to_size(parts_.hidden) * dtype_size(parts_.combine_dtype);
  traffic_.rows_sent = rows_sent;  // the worst-case mode's: whole blocks, padding too
  const std::size_t counts_bytes =
      worst_case_rows_ > 0 ? 0 : (R - 1) * n * counts_width() * sizeof(std::int64_t);
  traffic_.dispatch_bytes =
      counts_bytes + static_cast<std::uint64_t>(rows_sent) * (row_bytes + meta_bytes);
  traffic_.combine_bytes = static_cast<std::uint64_t>(rows_received) * back_bytes;
}

}  // namespace switchyard
