// One MoE layer on one rank: the sequence route → layout → counts exchange → dispatch →
// experts → weighted reduce → combine → sum. The data-path primitives do the work
// (data_path.hpp) and `TokenExchange` keeps the exchanges' books (token_exchange.hpp); the
// layer only orders them. This file: construction, routing, the public dispatch and combine
// and the expert steps; the forward sequence is in layer_forward.cpp, the backward in
// layer_backward.cpp.
//
// Two expert paths: the grouped one copies the received rows per local expert into f32
// rows for `ExpertKernel::forward` and reduces its results per row (what the public
// `dispatch` / `combine` expose); the fused one, for a kernel that `fuses_weighted_rows`,
// hands it the received rows and their slots and takes back each row's weighted partial
// sum, with no expert-grouped rows in between. Both give the same bits.
#include "switchyard/layer.hpp"

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstring>
#include <optional>
#include <utility>

#include "layer_internal.hpp"
#include "switchyard/status.hpp"
#include "token_exchange.hpp"

namespace switchyard {

using namespace layer_detail;

TensorView DispatchHandle::expert_input() noexcept {
  const std::int64_t rows = hidden_ ? static_cast<std::int64_t>(expert_input_.size()) / hidden_ : 0;
  return TensorView(expert_input_.data(), expert_input_dtype_, {rows, hidden_},
                    expert_input_.device());
}

TensorView DispatchHandle::expert_output() noexcept {
  const std::int64_t rows =
      hidden_ ? static_cast<std::int64_t>(expert_output_.size()) / hidden_ : 0;
  return TensorView(expert_output_.data(), expert_output_dtype_, {rows, hidden_},
                    expert_output_.device());
}

std::size_t DispatchHandle::capacity_bytes() const noexcept {
  std::size_t bytes = 0;
  for (const auto* b :
       {&rows_to_, &rows_from_, &rows_to_offset_, &rows_from_offset_, &rows_per_expert_,
        &send_row_token_, &assignment_of_slot_, &rows_in_block_, &first_bad_slot_})
    bytes += b->capacity_bytes();
  for (const auto* b :
       {&send_bytes_, &send_offsets_, &recv_bytes_, &recv_offsets_, &meta_send_bytes_,
        &meta_send_offsets_, &meta_recv_bytes_, &meta_recv_offsets_, &back_send_bytes_,
        &back_send_offsets_, &back_recv_bytes_, &back_recv_offsets_})
    bytes += b->capacity_bytes();
  for (const auto* b : {&send_rows_, &recv_rows_, &partial_rows_, &combined_rows_})
    bytes += b->capacity_bytes();
  bytes += send_meta_.capacity_bytes() + recv_meta_.capacity_bytes() + pack_runs_.capacity_bytes();
  bytes += expert_input_.capacity_bytes() + expert_output_.capacity_bytes();
  return bytes;
}

std::shared_ptr<LayerWorkspace> make_layer_workspace() {
  return std::make_shared<LayerWorkspace>();
}

std::size_t workspace_bytes(const LayerWorkspace& workspace) noexcept { return workspace.bytes(); }

std::size_t MoELayer::own_buffer_bytes() const noexcept {
  return kept_handle_.capacity_bytes() + logits_.capacity_bytes() + plan_.experts.capacity_bytes() +
         plan_.weights.capacity_bytes() + plan_.counts.capacity_bytes() +
         saved_columns_.capacity_bytes();
}

Stream& MoELayer::stream() noexcept { return *workspace_->stream; }

std::size_t MoELayer::buffer_bytes() const noexcept {
  return own_buffer_bytes() + workspace_->bytes();
}

void DispatchHandle::use_memory(Allocator& device, Allocator& staging) {
  if (&send_rows_.allocator() == &device && &rows_to_.allocator() == &staging) return;
  for (auto* b : {&rows_to_, &rows_from_, &rows_to_offset_, &rows_from_offset_, &rows_per_expert_,
                  &expert_first_row_}) {
    *b = Buffer<std::int64_t>(staging);
  }
  for (auto* b : {&send_bytes_, &send_offsets_, &recv_bytes_, &recv_offsets_, &meta_send_bytes_,
                  &meta_send_offsets_, &meta_recv_bytes_, &meta_recv_offsets_, &back_send_bytes_,
                  &back_send_offsets_, &back_recv_bytes_, &back_recv_offsets_}) {
    *b = Buffer<std::size_t>(staging);
  }
  for (auto* b : {&send_rows_, &recv_rows_, &partial_rows_, &combined_rows_}) {
    *b = Buffer<std::byte>(device);
  }
  for (auto* b : {&staged_send_, &staged_rows_, &staged_meta_, &staged_back_}) {
    *b = Buffer<std::byte>(staging);
  }
  send_meta_ = Buffer<SlotMeta>(device);
  recv_meta_ = Buffer<SlotMeta>(device);
  for (auto* b : {&send_row_token_, &assignment_of_slot_, &rows_in_block_, &first_bad_slot_})
    *b = Buffer<std::int64_t>(device);
  expert_input_ = Buffer<float>(device);
  expert_output_ = Buffer<float>(device);
}

MoELayer::MoELayer(MoELayerParts parts)
    : parts_(std::move(parts)),
      workspace_(parts_.workspace ? parts_.workspace : make_layer_workspace()) {
  if (parts_.transport == nullptr || !parts_.router || !parts_.experts) {
    throw Error(ErrorCode::kInvalidArgument, "MoELayer needs a transport, a router and experts");
  }
  parts_.gate.require("MoELayer gate", DType::kF32, {num_experts(), -1});
  hidden_ = parts_.gate.dim(1);
  const int rank = parts_.transport->rank();
  if (parts_.placement.num_ranks() != parts_.transport->size()) {
    throw Error(ErrorCode::kInvalidArgument,
                "MoELayer: placement over " + std::to_string(parts_.placement.num_ranks()) +
                    " ranks but the EP group has " + std::to_string(parts_.transport->size()));
  }
  if (parts_.router->num_experts() != num_experts()) {
    throw Error(ErrorCode::kInvalidArgument,
                "MoELayer: router configured for " + std::to_string(parts_.router->num_experts()) +
                    " experts, model has " + std::to_string(num_experts()));
  }
  if (!parts_.slot_map.empty()) {
    if (parts_.slot_map.num_slots() != parts_.placement.num_experts()) {
      throw Error(ErrorCode::kInvalidArgument,
                  "MoELayer: the slot map has " + std::to_string(parts_.slot_map.num_slots()) +
                      " slots but the placement " + std::to_string(parts_.placement.num_experts()));
    }
    if (parts_.max_tokens_per_rank > 0) {
      throw Error(ErrorCode::kUnavailable,
                  "MoELayer: a shuffled or replicated expert placement does not run in the "
                  "worst-case mode (max_tokens_per_rank) yet");
    }
  }
  if (parts_.combine_order == CombineOrder::kSlot && parts_.max_tokens_per_rank > 0) {
    throw Error(ErrorCode::kUnavailable,
                "MoELayer: the slot-order combine does not run in the worst-case mode "
                "(max_tokens_per_rank) yet");
  }
  if (parts_.experts->num_local_experts() != parts_.placement.num_local(rank)) {
    throw Error(ErrorCode::kInvalidArgument,
                "MoELayer: expert kernel holds " +
                    std::to_string(parts_.experts->num_local_experts()) + " experts, rank " +
                    std::to_string(rank) + " should hold " +
                    std::to_string(parts_.placement.num_local(rank)));
  }
  if (parts_.combine_dtype != DType::kF32 && parts_.combine_dtype != DType::kBF16) {
    throw Error(ErrorCode::kInvalidArgument, "MoELayer: combine dtype must be f32 or bf16, not " +
                                                 std::string(dtype_name(parts_.combine_dtype)));
  }
  // What the kernel does, read once: every use below and in the steps is of this value.
  expert_caps_ = parts_.experts->capabilities();
  expert_load_.assign(static_cast<std::size_t>(num_experts()), 0);
  slot_load_.assign(static_cast<std::size_t>(parts_.placement.num_experts()), 0);
  for (const auto& [wanted, rows] : {std::pair{expert_caps_.input_dtype, "input"},
                                     std::pair{expert_caps_.output_dtype, "output"}}) {
    if (wanted != DType::kF32 && wanted != DType::kBF16) {
      throw Error(ErrorCode::kInvalidArgument, "MoELayer: expert plugin \"" +
                                                   parts_.experts->name() + "\" asks for " +
                                                   std::string(dtype_name(wanted)) + " " + rows +
                                                   " rows; the layer gives f32 or bf16");
    }
  }
  // The layer's buffers live where its data path runs: every plugin it calls must take
  // that memory.
  data_path_ = parts_.data_path ? parts_.data_path : make_host_data_path();
  const Device device = data_path_->device();
  if (parts_.combine_order == CombineOrder::kSlot && device.kind != Device::Kind::kHost) {
    throw Error(ErrorCode::kUnavailable,
                "MoELayer: the slot-order combine runs on the host data path; the " +
                    device_name(device) + " data path sums partials in rank order");
  }
  if (!parts_.slot_map.empty() && device.kind != Device::Kind::kHost) {
    throw Error(ErrorCode::kUnavailable,
                "MoELayer: a shuffled or replicated expert placement runs on the host data path; "
                "the " +
                    device_name(device) + " data path does not translate experts to slots yet");
  }
  const ExecutionCapabilities router = parts_.router->capabilities();
  // A host router behind a device data path routes a host copy of the logits.
  route_on_host_ =
      device.kind != Device::Kind::kHost && !router.device_memory && router.host_memory;
  if (!route_on_host_) {
    require_accepted_memory(router, device, "router plugin \"" + parts_.router->name() + "\"",
                            "the router logits");
  }
  require_accepted_memory(expert_caps_.execution, device,
                          "expert plugin \"" + parts_.experts->name() + "\"",
                          "the expert input rows");
  const TransportCapabilities transport = parts_.transport->capabilities();
  // The per-peer counts are exchanged in host memory, where the host reads them; a device
  // data path's rows go through host staging memory when the transport takes no device
  // memory (several ranks on one GPU over inproc, MPI or UCX).
  if (!transport.host_memory) {
    throw Error(ErrorCode::kInvalidArgument,
                "MoELayer: transport plugin \"" + parts_.transport->name() +
                    "\" must take host memory, for the per-peer counts");
  }
  if (parts_.max_tokens_per_rank < 0) {
    throw Error(ErrorCode::kInvalidArgument, "MoELayer: max_tokens_per_rank must be >= 0, not " +
                                                 std::to_string(parts_.max_tokens_per_rank));
  }
  if (parts_.chunks < 1) {
    throw Error(ErrorCode::kInvalidArgument,
                "MoELayer: chunks must be at least 1, not " + std::to_string(parts_.chunks));
  }
  if (parts_.shared_expert) {
    if (device.kind != Device::Kind::kHost) {
      throw Error(ErrorCode::kInvalidArgument,
                  "MoELayer: the layer's shared expert runs on the host data path only (the "
                  "model has one; [runtime] data_path = \"host\")");
    }
    if (parts_.shared_expert->num_local_experts() != 1) {
      throw Error(ErrorCode::kInvalidArgument,
                  "MoELayer: the shared expert's kernel must hold exactly one expert");
    }
    if (parts_.shared_expert_gate.data() != nullptr) {
      parts_.shared_expert_gate.require("MoELayer shared expert gate", DType::kF32, {1, hidden_});
    }
  }
  logits_ = Buffer<float>(data_path_->allocator());
  plan_ = RoutingPlan(data_path_->allocator());
  kept_handle_.use_memory(data_path_->allocator(), data_path_->staging_allocator());
  if (workspace_->data_path == nullptr) {
    // The first layer of the workspace gives it its memory and stream.
    for (auto* counts :
         {&workspace_->rows_to_table, &workspace_->rows_from_table, &workspace_->chunk_counts}) {
      *counts = Buffer<std::int64_t>(data_path_->staging_allocator());
    }
    workspace_->host_logits = Buffer<float>(data_path_->staging_allocator());
    workspace_->host_plan = RoutingPlan(data_path_->staging_allocator());
    workspace_->stream = data_path_->create_stream(transport.stream_ordered);
    if (workspace_->stream == nullptr || workspace_->stream->device() != device) {
      throw Error(ErrorCode::kInternal,
                  "MoELayer: the data path gave no stream on " + device_name(device));
    }
    workspace_->data_path = data_path_;
  } else if (workspace_->data_path != data_path_) {
    throw Error(ErrorCode::kInvalidArgument,
                "MoELayer: layers that share a workspace must share their data path");
  }
  TokenExchange::Parts exchange;
  exchange.transport = parts_.transport;
  exchange.data_path = data_path_.get();
  exchange.workspace = workspace_.get();
  exchange.placement = &parts_.placement;
  exchange.slot_order = parts_.combine_order == CombineOrder::kSlot;
  exchange.hidden = hidden_;
  exchange.payload_dtype = parts_.payload_dtype;
  exchange.combine_dtype = parts_.combine_dtype;
  exchange.first_world_rank = parts_.first_world_rank;
  exchange_ = std::make_unique<TokenExchange>(exchange);
  gate_ = parts_.gate;
  if (parts_.gate.device() != device) {
    // The gate goes where the logits are computed (once).
    device_gate_ = Buffer<float>(data_path_->allocator());
    device_gate_.resize(to_size(parts_.gate.numel()));
    data_path_->copy(device_gate_.data(), parts_.gate.data(), to_size(parts_.gate.numel()) * 4,
                     *workspace_->stream);
    host_ready();
    gate_ = TensorView(device_gate_.data(), DType::kF32, {parts_.gate.dim(0), hidden_}, device);
  }
}

MoELayer::~MoELayer() {
  // (Reports of worst-case steps left pending are dropped: nobody is left to tell.)
  // Work a failed step left on the stream may still write this layer's buffers.
  if (workspace_ && workspace_->stream) LayerWorkspace::wait_quietly(*workspace_->stream);
}

bool MoELayer::last_failure_agreed() const noexcept {
  return exchange_->failure_agreed() || worst_case_failed_in_step_;
}

const LayerTraffic& MoELayer::traffic() const noexcept { return exchange_->traffic(); }

void MoELayer::route(const TensorView& x, RoutingPlan& plan) {
  route_queued(x, plan);
  if (device_routing_pending_) {
    host_ready();
    finish_device_routing();
  }
}

void MoELayer::finish_device_routing() {
  if (!device_routing_pending_) return;
  device_routing_pending_ = false;
  data_path_->finish_route_token_choice(device_stats_);
  parts_.router->adopt_stats(device_stats_);
}

void MoELayer::agree_counts(const RoutingPlan& plan, int chunks, const Error* local_error) {
  if (!device_routing_pending_) {
    exchange_->agree_counts(plan, chunks, local_error);
    return;
  }
  // The routing's report comes with the counts' wait: a bad logit found there fails the
  // step in the counts exchange, on every rank together, as a routing error does.
  std::optional<Error> routing_error;
  exchange_->count_rows(plan, chunks, local_error);
  if (local_error != nullptr) host_ready();  // nothing was counted: wait here
  try {
    finish_device_routing();
  } catch (const Error& e) {
    if (local_error == nullptr) {
      routing_error = e;
      local_error = &*routing_error;
      exchange_->count_failure();
    }
  }
  exchange_->exchange_counts(local_error);
}

void MoELayer::set_token_ids(const TensorView& token_ids) {
  if (token_ids.data() != nullptr && token_ids.device().kind != Device::Kind::kHost) {
    throw Error(ErrorCode::kInvalidArgument, "token ids: host memory expected, got " +
                                                 device_name(token_ids.device()) + " memory");
  }
  token_ids_ = token_ids;
}

TensorView MoELayer::take_token_ids() { return std::exchange(token_ids_, TensorView{}); }

void MoELayer::route_queued(const TensorView& x, RoutingPlan& plan) {
  backward_ready_ = false;  // logits_ are about to be another routing's
  x.require_on(data_path_->device(), "MoE input x", DType::kF32, {-1, hidden_});
  const std::int64_t T = x.dim(0);
  const std::int64_t E = num_experts();
  logits_.resize(to_size(T * E));
  const TensorView logits(logits_.data(), DType::kF32, {T, E}, logits_.device());
  data_path_->router_logits(x, gate_, logits, *workspace_->stream);
  if (route_on_host_) {
    // The device data path computes the host policy where it can, else the host does.
    const auto spec = parts_.router->token_choice_spec(&parts_.transport->topology());
    if (spec && data_path_->route_token_choice(*spec, logits, plan, *workspace_->stream)) {
      device_routing_pending_ = true;
      return;
    }
    route_through_host(logits, plan);
    return;
  }
  RouteInput input;
  input.logits = logits;
  input.topology = &parts_.transport->topology();
  input.token_ids = take_token_ids();
  if (!parts_.router->capabilities().stream_ordered) host_ready();
  parts_.router->route(input, plan, *workspace_->stream);
  host_ready();
}

void MoELayer::route_through_host(const TensorView& logits, RoutingPlan& plan) {
  const std::int64_t T = logits.dim(0), E = logits.dim(1);
  workspace_->host_logits.resize(to_size(T * E));
  data_path_->copy(workspace_->host_logits.data(), logits.data(), to_size(T * E) * sizeof(float),
                   *workspace_->stream);
  host_ready();
  RouteInput input;
  input.logits = TensorView(workspace_->host_logits.data(), DType::kF32, {T, E});
  input.topology = &parts_.transport->topology();
  input.token_ids = take_token_ids();
  parts_.router->route(input, workspace_->host_plan, host_stream_);
  plan.num_tokens = workspace_->host_plan.num_tokens;
  plan.slots = workspace_->host_plan.slots;
  plan.experts.resize(workspace_->host_plan.experts.size());
  plan.weights.resize(workspace_->host_plan.weights.size());
  plan.counts.resize(workspace_->host_plan.counts.size());
  data_path_->copy(plan.experts.data(), workspace_->host_plan.experts.data(),
                   workspace_->host_plan.experts.size() * sizeof(std::int32_t),
                   *workspace_->stream);
  data_path_->copy(plan.weights.data(), workspace_->host_plan.weights.data(),
                   workspace_->host_plan.weights.size() * sizeof(float), *workspace_->stream);
  data_path_->copy(plan.counts.data(), workspace_->host_plan.counts.data(),
                   workspace_->host_plan.counts.size() * sizeof(std::int64_t), *workspace_->stream);
  host_ready();  // the host plan is rewritten by the next step
}

void MoELayer::reset_load() noexcept {
  std::fill(expert_load_.begin(), expert_load_.end(), 0);
  std::fill(slot_load_.begin(), slot_load_.end(), 0);
}

void MoELayer::count_load(const RoutingPlan& plan) {
  if (!plan.experts.allocator().host_accessible()) return;
  const int E = num_experts();
  for (std::size_t i = 0; i < plan.experts.size(); ++i) {
    const std::int32_t e = plan.experts[i];
    if (e >= 0 && e < E) ++expert_load_[static_cast<std::size_t>(e)];
  }
  if (parts_.slot_map.empty()) {
    std::copy(expert_load_.begin(), expert_load_.end(), slot_load_.begin());  // slot e is e
    return;
  }
  // The translation counted this forward's slots (`slot_plan`).
  for (std::size_t s = 0; s < slot_load_.size(); ++s) slot_load_[s] += slot_plan_.counts[s];
}

const RoutingPlan& MoELayer::slot_plan(const RoutingPlan& plan) {
  const ExpertSlotMap& map = parts_.slot_map;
  if (map.empty()) return plan;
  if (!plan.experts.allocator().host_accessible()) {
    throw Error(ErrorCode::kUnavailable,
                "MoE layer: a shuffled or replicated expert placement needs a routing plan in "
                "host memory");
  }
  const std::int64_t T = plan.num_tokens;
  const int K = plan.slots, E = map.num_experts();
  if (K < 1 || plan.experts.size() != to_size(T * K) || plan.weights.size() != to_size(T * K)) {
    throw Error(ErrorCode::kInvalidArgument, "routing plan shape does not match " +
                                                 std::to_string(T) + " tokens x " +
                                                 std::to_string(K) + " slots");
  }
  slot_plan_.num_tokens = T;
  slot_plan_.slots = K;
  slot_plan_.experts.resize(plan.experts.size());
  slot_plan_.weights.resize(plan.weights.size());
  slot_plan_.counts.assign(static_cast<std::size_t>(map.num_slots()), 0);
  std::copy_n(plan.weights.data(), plan.weights.size(), slot_plan_.weights.data());
  const int origin = parts_.transport->rank();
  for (std::int64_t t = 0; t < T; ++t) {
    for (int k = 0; k < K; ++k) {
      const std::size_t at = to_size(t * K + k);
      const std::int32_t e = plan.experts[at];
      if (e < -1 || e >= E) throw expert_out_of_range(t, k, e, E);
      const int slot = e < 0 ? -1 : map.choose_slot(origin, t, e);
      slot_plan_.experts[at] = slot;
      if (slot >= 0) ++slot_plan_.counts[static_cast<std::size_t>(slot)];
    }
  }
  return slot_plan_;
}

void MoELayer::dispatch(const TensorView& x, const RoutingPlan& plan, DispatchHandle& handle,
                        const Error* refused) {
  worst_case_failed_in_step_ = false;
  std::optional<Error> input_error;
  if (refused != nullptr) {
    input_error = *refused;
  } else {
    try {
      x.require_on(data_path_->device(), "MoE dispatch input x", DType::kF32,
                   {plan.num_tokens, hidden_});
    } catch (const Error& e) {
      input_error = e;
    }
  }
  const RoutingPlan* routed = &plan;
  if (!input_error) {
    try {
      routed = &slot_plan(plan);
    } catch (const Error& e) {
      input_error = e;
    }
  }
  auto start = Clock::now();
  agree_counts(*routed, 1, input_error ? &*input_error : nullptr);
  exchange_->count_traffic();
  timings_.dispatch_s = seconds_since(start);
  start = Clock::now();
  exchange_->stage({x.data_as<const float>(), routed->experts.data(), routed->weights.data(),
                    routed->num_tokens, routed->slots},
                   0, handle);
  timings_.layout_s = seconds_since(start);
  start = Clock::now();
  exchange_->send_rows(handle, &stream());
  data_path_ready();  // the host data path reads what arrived
  timings_.dispatch_s += seconds_since(start);
  start = Clock::now();
  exchange_->group(handle, {}, parts_.expert_alignment);
  host_ready();  // returns when the grouped rows are written
  timings_.layout_s += seconds_since(start);
}

void MoELayer::combine(DispatchHandle& h, const TensorView& expert_output, const TensorView& y) {
  combine_with(h, expert_output, y, h.recv_meta_.data());
}

void MoELayer::combine_with(DispatchHandle& h, const TensorView& expert_output, const TensorView& y,
                            const SlotMeta* meta) {
  const auto start = Clock::now();
  exchange_->reduce(h, expert_output, y, /*in_expert_buffers=*/false, meta);
  exchange_->send_back(h, &stream());
  data_path_ready();
  exchange_->sum(h, y.data_as<float>());
  host_ready();  // returns when y is written
  timings_.combine_s = seconds_since(start);
}

bool MoELayer::saves_for_backward() const noexcept {
  return training_ && !parts_.recompute && data_path_->device().kind == Device::Kind::kHost;
}

void MoELayer::run_grouped_experts(DispatchHandle& h, bool save, bool worst_case) {
  ExpertBatch batch;
  batch.input = h.expert_input();
  batch.rows_per_expert = h.rows_per_expert();
  batch.output = h.expert_output();
  if (worst_case) batch.valid_rows = h.rows_in_block_.data();
  const std::int64_t columns = expert_caps_.saved_columns;
  if (save && columns > 0) {
    const std::int64_t A = batch.input.dim(0);
    saved_columns_.resize(to_size(A * columns));
    batch.saved = TensorView(saved_columns_.data(), DType::kF32, {A, columns});
  }
  if (!expert_caps_.execution.stream_ordered) host_ready();
  parts_.experts->forward(batch, *workspace_->stream);
  data_path_ready();
}

void MoELayer::run_fused_experts(DispatchHandle& h) {
  exchange_->place_partials(h, /*in_expert_buffers=*/false);
  const int K = h.slots_;
  const std::size_t row_bytes = payload_row_bytes(parts_.payload_dtype, hidden_);
  if (!expert_caps_.execution.stream_ordered) host_ready();
  for (const TokenExchange::PartialRows& rows : exchange_->partial_segments(h)) {
    if (rows.count == 0) continue;
    WeightedRowsBatch batch;
    batch.rows = h.recv_rows_.data() + to_size(rows.first) * row_bytes;
    batch.dtype = parts_.payload_dtype;
    batch.meta = h.recv_meta_.data() + rows.first * K;
    batch.num_rows = rows.count;
    batch.slots = K;
    batch.hidden = hidden_;
    batch.partial_dtype = parts_.combine_dtype;
    batch.partials = rows.out;
    parts_.experts->forward_weighted(batch, *workspace_->stream);
  }
  data_path_ready();
}

void MoELayer::run_shared_expert(const TensorView& x) {
  const std::int64_t T = x.dim(0), H = hidden_;
  shared_rows_[0] = T;
  workspace_->shared_output.resize(to_size(T * H));
  ExpertBatch batch{x, shared_rows_,
                    TensorView(workspace_->shared_output.data(), DType::kF32, {T, H})};
  parts_.shared_expert->forward(batch, stream());
  host_ready();
  shared_expert_scales(x);
}

void MoELayer::add_shared_expert(const TensorView& y) {
  const std::int64_t T = y.dim(0), H = hidden_;
  const float* scales = workspace_->shared_scales.data();
  const float* out = workspace_->shared_output.data();
  float* ys = y.data_as<float>();
  for (std::int64_t t = 0; t < T; ++t) {
    for (std::int64_t h = 0; h < H; ++h) ys[t * H + h] += scales[t] * out[t * H + h];
  }
}

const float* MoELayer::shared_expert_scales(const TensorView& x) {
  const std::int64_t T = x.dim(0), H = hidden_;
  const float* xs = x.data_as<const float>();
  const float* gate = parts_.shared_expert_gate.data_as<const float>();
  workspace_->shared_scales.resize(to_size(T));
  float* scales = workspace_->shared_scales.data();
  for (std::int64_t t = 0; t < T; ++t) {
    float logit = 0;
    if (gate != nullptr) {
      for (std::int64_t h = 0; h < H; ++h) logit += xs[t * H + h] * gate[h];
    }
    scales[t] = gate != nullptr ? 1.0f / (1.0f + std::exp(-logit)) : 1.0f;
  }
  return scales;
}

}  // namespace switchyard
