// One MoE layer on one rank: the sequence route → layout → counts exchange → dispatch →
// experts → weighted reduce → combine → sum. The data-path primitives do the work
// (data_path.hpp); this file only orders them around the transport's exchanges.
//
// A token goes once to each rank that holds any of its experts: its row in the payload
// dtype, and beside it, in a metadata buffer, its K (local expert, weight) slots. Partial
// sums are formed on the expert side, so the combine sends back one row per dispatched row.
// A rank's rows for itself never pass through the transport: they are packed straight into
// its receive buffer and their partial sums written straight among its returned rows.
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
  for (const auto* b : {&rows_to_, &rows_from_, &rows_to_offset_, &rows_from_offset_,
                        &rows_per_expert_, &send_row_token_, &assignment_of_slot_})
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
  for (auto* b :
       {&rows_to_, &rows_from_, &rows_to_offset_, &rows_from_offset_, &rows_per_expert_}) {
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
  send_meta_ = Buffer<SlotMeta>(device);
  recv_meta_ = Buffer<SlotMeta>(device);
  send_row_token_ = Buffer<std::int64_t>(device);
  assignment_of_slot_ = Buffer<std::int64_t>(device);
  expert_input_ = Buffer<float>(device);
  expert_output_ = Buffer<float>(device);
}

MoELayer::MoELayer(MoELayerParts parts)
    : parts_(std::move(parts)),
      workspace_(parts_.workspace ? parts_.workspace : make_layer_workspace()) {
  if (parts_.transport == nullptr || !parts_.router || !parts_.experts) {
    throw Error(ErrorCode::kInvalidArgument, "MoELayer needs a transport, a router and experts");
  }
  parts_.gate.require("MoELayer gate", DType::kF32, {parts_.placement.num_experts(), -1});
  hidden_ = parts_.gate.dim(1);
  const int rank = parts_.transport->rank();
  if (parts_.placement.num_ranks() != parts_.transport->size()) {
    throw Error(ErrorCode::kInvalidArgument,
                "MoELayer: placement over " + std::to_string(parts_.placement.num_ranks()) +
                    " ranks but the EP group has " + std::to_string(parts_.transport->size()));
  }
  if (parts_.router->num_experts() != parts_.placement.num_experts()) {
    throw Error(ErrorCode::kInvalidArgument,
                "MoELayer: router configured for " + std::to_string(parts_.router->num_experts()) +
                    " experts, model has " + std::to_string(parts_.placement.num_experts()));
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
  if (!(device.kind == Device::Kind::kHost ? transport.host_memory : transport.device_memory)) {
    throw Error(ErrorCode::kInvalidArgument,
                "MoELayer: transport plugin \"" + parts_.transport->name() + "\" does not take " +
                    device_name(device) + " memory, where the layer's data path puts its rows");
  }
  if (device.kind != Device::Kind::kHost && !transport.host_memory) {
    // The per-peer counts are exchanged in host memory, where the host reads them.
    throw Error(ErrorCode::kInvalidArgument,
                "MoELayer: transport plugin \"" + parts_.transport->name() +
                    "\" must also take host memory, for the per-peer counts");
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
    workspace_->chunk_rows_to = Buffer<std::int64_t>(data_path_->staging_allocator());
    workspace_->chunk_rows_from = Buffer<std::int64_t>(data_path_->staging_allocator());
    workspace_->host_logits = Buffer<float>(data_path_->staging_allocator());
    workspace_->host_plan = RoutingPlan(data_path_->staging_allocator());
    workspace_->handle.use_memory(data_path_->allocator(), data_path_->staging_allocator());
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

void MoELayer::route(const TensorView& x, RoutingPlan& plan) {
  backward_ready_ = false;  // logits_ are about to be another routing's
  x.require_on(data_path_->device(), "MoE input x", DType::kF32, {-1, hidden_});
  const std::int64_t T = x.dim(0);
  const std::int64_t E = parts_.placement.num_experts();
  logits_.resize(to_size(T * E));
  const TensorView logits(logits_.data(), DType::kF32, {T, E}, logits_.device());
  data_path_->router_logits(x, gate_, logits, *workspace_->stream);
  if (route_on_host_) {
    // The device data path computes the host policy where it can, else the host does.
    const auto spec = parts_.router->token_choice_spec(&parts_.transport->topology());
    if (spec &&
        data_path_->route_token_choice(*spec, logits, plan, device_stats_, *workspace_->stream)) {
      parts_.router->adopt_stats(device_stats_);
      return;
    }
    route_through_host(logits, plan);
    return;
  }
  RouteInput input;
  input.logits = logits;
  input.topology = &parts_.transport->topology();
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

void MoELayer::forward(const TensorView& x, const TensorView& y) {
  auto start = Clock::now();
  // A routing failure on one rank must not leave the others waiting in the dispatch, so
  // it is carried to them in the counts exchange instead of being thrown at once.
  std::optional<Error> routing_error;
  try {
    route(x, plan_);
  } catch (const Error& e) {
    routing_error = e;
  }
  timings_.route_s = seconds_since(start);
  forward_routed(x, plan_, y, routing_error ? &*routing_error : nullptr);
  backward_ready_ = true;  // plan_ and logits_ are this forward's
}

void MoELayer::forward(const TensorView& x, const RoutingPlan& plan, const TensorView& y) {
  backward_ready_ = false;  // no router ran: nothing to differentiate through it
  std::optional<Error> input_error;
  try {
    x.require_on(data_path_->device(), "MoE input x", DType::kF32, {plan.num_tokens, hidden_});
  } catch (const Error& e) {
    input_error = e;
  }
  timings_.route_s = 0;
  forward_routed(x, plan, y, input_error ? &*input_error : nullptr);
}

bool MoELayer::fused_experts() const noexcept { return expert_caps_.fuses_weighted_rows; }

void MoELayer::forward_routed(const TensorView& x, const RoutingPlan& plan, const TensorView& y,
                              const Error* routing_error) {
  std::optional<Error> output_error;
  if (routing_error == nullptr) {
    try {
      y.require_on(data_path_->device(), "MoE output y", DType::kF32, {x.dim(0), hidden_});
      if (x.numel() > 0 && x.data() == y.data()) {
        throw Error(ErrorCode::kInvalidArgument, "MoE input x and output y must not alias");
      }
    } catch (const Error& e) {
      output_error = e;
      routing_error = &*output_error;
    }
  }
  kept_for_backward_ = false;
  const bool save = saves_for_backward();
  if (parts_.chunks > 1 && data_path_->device().kind == Device::Kind::kHost && !save) {
    forward_chunks(x, plan, y, routing_error);
    add_shared_expert(x, y);
    return;
  }
  const bool fused = fused_experts() && !save;
  // A kept forward holds its rows in the layer's own handle until the backward.
  DispatchHandle& h = save ? kept_handle_ : workspace_->handle;
  dispatch_checked(x, plan, h, routing_error, /*group=*/!fused, forward_expert_dtypes(save));

  auto start = Clock::now();
  if (fused) {
    weigh_rows(h);
    timings_.experts_s = seconds_since(start);
    start = Clock::now();
  } else {
    run_grouped_experts(h, save);
    timings_.experts_s = seconds_since(start);
    start = Clock::now();
    // The expert rows stay alive for the backward when they are kept.
    reduce_rows(h, h.expert_output(), y, /*in_expert_buffers=*/!save);
  }
  parts_.transport->alltoallv(back_buffers(h), *workspace_->stream);
  host_ready();
  sum_rows(h, y.data_as<float>());
  timings_.combine_s = seconds_since(start);
  add_shared_expert(x, y);
  kept_for_backward_ = save;
}

void MoELayer::add_shared_expert(const TensorView& x, const TensorView& y) {
  if (!parts_.shared_expert) return;
  const auto start = Clock::now();
  const std::int64_t T = x.dim(0), H = hidden_;
  shared_rows_[0] = T;
  workspace_->shared_output.resize(to_size(T * H));
  float* out = workspace_->shared_output.data();
  ExpertBatch batch{x, shared_rows_, TensorView(out, DType::kF32, {T, H})};
  parts_.shared_expert->forward(batch, stream());
  host_ready();
  const float* scales = shared_expert_scales(x);
  float* ys = y.data_as<float>();
  for (std::int64_t t = 0; t < T; ++t) {
    for (std::int64_t h = 0; h < H; ++h) ys[t * H + h] += scales[t] * out[t * H + h];
  }
  timings_.experts_s += seconds_since(start);
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

MoELayer::ExpertRowDTypes MoELayer::forward_expert_dtypes(bool save) const noexcept {
  if (save) return {};
  return {expert_caps_.input_dtype, expert_caps_.output_dtype};
}

bool MoELayer::saves_for_backward() const noexcept {
  return training_ && !parts_.recompute && data_path_->device().kind == Device::Kind::kHost;
}

void MoELayer::run_grouped_experts(DispatchHandle& h, bool save) {
  ExpertBatch batch;
  batch.input = h.expert_input();
  batch.rows_per_expert = h.rows_per_expert();
  batch.output = h.expert_output();
  const std::int64_t columns = expert_caps_.saved_columns;
  if (save && columns > 0) {
    const std::int64_t A = batch.input.dim(0);
    saved_columns_.resize(to_size(A * columns));
    batch.saved = TensorView(saved_columns_.data(), DType::kF32, {A, columns});
  }
  if (!expert_caps_.execution.stream_ordered) host_ready();
  parts_.experts->forward(batch, *workspace_->stream);
  host_ready();
}

void MoELayer::weigh_rows(DispatchHandle& h) {
  place_partials(h, /*in_expert_buffers=*/false);
  const int K = h.slots_;
  const std::size_t row_bytes = payload_row_bytes(parts_.payload_dtype, hidden_);
  if (!expert_caps_.execution.stream_ordered) host_ready();
  for (const PartialRows& rows : partial_segments(h)) {
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
  host_ready();
}

void MoELayer::dispatch(const TensorView& x, const RoutingPlan& plan, DispatchHandle& handle,
                        const Error* refused) {
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
  dispatch_checked(x, plan, handle, input_error ? &*input_error : nullptr, /*group=*/true,
                   ExpertRowDTypes{});
}

std::optional<Error> MoELayer::check_plan(const RoutingPlan& plan) const {
  const std::int64_t T = plan.num_tokens;
  const int K = plan.slots;
  const int E = parts_.placement.num_experts();
  if (K < 1 || plan.experts.size() != to_size(T * K) || plan.weights.size() != to_size(T * K)) {
    return Error(ErrorCode::kInvalidArgument, "routing plan shape does not match " +
                                                  std::to_string(T) + " tokens x " +
                                                  std::to_string(K) + " slots");
  }
  if (plan.device() != data_path_->device()) {
    return Error(ErrorCode::kInvalidArgument, "routing plan is in " + device_name(plan.device()) +
                                                  " memory, the layer's data path runs on " +
                                                  device_name(data_path_->device()));
  }
  // Expert ids are checked here when the host can read the plan; a device data path checks
  // them in its layout.
  if (!plan.experts.allocator().host_accessible()) return std::nullopt;
  for (std::size_t i = 0; i < plan.experts.size(); ++i) {
    const std::int32_t e = plan.experts[i];
    if (e < -1 || e >= E) {
      return Error(ErrorCode::kInvalidArgument,
                   "routing plan: token " + std::to_string(i / to_size(K)) + " slot " +
                       std::to_string(i % to_size(K)) + " has expert " + std::to_string(e) +
                       ", outside 0.." + std::to_string(E - 1));
    }
    // A NaN or infinite weight would reach y through every expert row it scales.
    if (e >= 0 && !std::isfinite(plan.weights[i])) {
      return Error(ErrorCode::kInvalidArgument,
                   "routing plan: token " + std::to_string(i / to_size(K)) + " slot " +
                       std::to_string(i % to_size(K)) + " has weight " +
                       (std::isnan(plan.weights[i]) ? "NaN"
                        : plan.weights[i] > 0       ? "+Inf"
                                                    : "-Inf") +
                       ", not a finite number");
    }
  }
  return std::nullopt;
}

void MoELayer::dispatch_checked(const TensorView& x, const RoutingPlan& plan, DispatchHandle& h,
                                const Error* local_error, bool group, ExpertRowDTypes dtypes) {
  failure_agreed_ = false;
  std::optional<Error> plan_error;
  if (local_error == nullptr) {
    plan_error = check_plan(plan);
    if (plan_error) local_error = &*plan_error;
  }
  exchange_counts(plan, h, local_error);
  send_rows(x, plan, h, group, dtypes);
}

void MoELayer::exchange_counts(const RoutingPlan& plan, DispatchHandle& h,
                               const Error* local_error) {
  auto start = Clock::now();
  Transport& transport = *parts_.transport;
  const auto r_size = static_cast<std::size_t>(transport.size());
  h.use_memory(data_path_->allocator(), data_path_->staging_allocator());
  h.hidden_ = hidden_;
  h.num_tokens_ = local_error ? 0 : plan.num_tokens;
  h.slots_ = plan.slots;
  h.payload_dtype_ = parts_.payload_dtype;
  h.rows_to_.resize(r_size);
  if (local_error == nullptr) {
    LayoutCountsArgs counts;
    counts.experts = plan.experts.data();
    counts.num_tokens = plan.num_tokens;
    counts.slots = plan.slots;
    counts.placement = &parts_.placement;
    counts.rows_to = h.rows_to_.data();
    data_path_->layout_counts(counts, *workspace_->stream);
  } else {
    h.rows_to_.assign(r_size, -1);  // tells every peer that this rank failed
  }
  timings_.layout_s = seconds_since(start);

  start = Clock::now();
  h.rows_from_.resize(r_size);
  if (data_path_->device().kind == Device::Kind::kHost) {
    transport.alltoall(h.rows_to_.data(), h.rows_from_.data(), sizeof(std::int64_t),
                       *workspace_->stream);
    host_ready();  // the counts are read on the host
  } else {
    // Device rows: the counts are host (staging) memory, exchanged by the blocking form.
    host_ready();
    transport.alltoall(h.rows_to_.data(), h.rows_from_.data(), sizeof(std::int64_t));
  }
  timings_.dispatch_s = seconds_since(start);
  // From here every rank of the group knows whether any rank failed: they all stop at
  // this same point, and the group stays usable for the next step.
  if (local_error != nullptr) {
    failure_agreed_ = true;
    throw *local_error;
  }
  for (std::size_t p = 0; p < r_size; ++p) {
    if (h.rows_from_[p] < 0) {
      failure_agreed_ = true;
      throw Error(ErrorCode::kPeerFailed, "MoE dispatch: world rank " +
                                              std::to_string(parts_.first_world_rank + p) +
                                              " failed before dispatch and reports the cause");
    }
  }
}

void MoELayer::send_rows(const TensorView& x, const RoutingPlan& plan, DispatchHandle& h,
                         bool group, ExpertRowDTypes dtypes) {
  const TokenRange all{x.data_as<const float>(), plan.experts.data(), plan.weights.data(),
                       h.num_tokens_, plan.slots};
  stage_rows(all, h);
  auto start = Clock::now();
  Transport& transport = *parts_.transport;
  transport.alltoallv(row_buffers(h), *workspace_->stream);
  transport.alltoallv(meta_buffers(h), *workspace_->stream);
  host_ready();  // the host data path reads what arrived
  timings_.dispatch_s += seconds_since(start);
  count_dispatch_traffic(h);
  if (group) group_rows(h, dtypes);
}

void MoELayer::count_dispatch_traffic(const DispatchHandle& h) {
  const int me = parts_.transport->rank();
  traffic_.dispatch_bytes = 0;
  traffic_.rows_sent = 0;
  for (std::size_t p = 0; p < h.rows_to_.size(); ++p) {
    if (static_cast<int>(p) == me) continue;
    traffic_.dispatch_bytes += sizeof(std::int64_t) + h.send_bytes_[p] + h.meta_send_bytes_[p];
    traffic_.rows_sent += h.rows_to_[p];
  }
}

AlltoallvBuffers MoELayer::row_buffers(DispatchHandle& h) const {
  return {h.send_rows_.data(), span_of(h.send_bytes_), span_of(h.send_offsets_),
          h.recv_rows_.data(), span_of(h.recv_bytes_), span_of(h.recv_offsets_),
          data_path_->device()};
}

AlltoallvBuffers MoELayer::meta_buffers(DispatchHandle& h) const {
  return {reinterpret_cast<const std::byte*>(h.send_meta_.data()),
          span_of(h.meta_send_bytes_),
          span_of(h.meta_send_offsets_),
          reinterpret_cast<std::byte*>(h.recv_meta_.data()),
          span_of(h.meta_recv_bytes_),
          span_of(h.meta_recv_offsets_),
          data_path_->device()};
}

AlltoallvBuffers MoELayer::back_buffers(DispatchHandle& h) const {
  return {h.partial_at_,       span_of(h.back_send_bytes_), span_of(h.back_send_offsets_),
          h.combined_at_,      span_of(h.back_recv_bytes_), span_of(h.back_recv_offsets_),
          data_path_->device()};
}

void MoELayer::stage_rows(const TokenRange& tokens, DispatchHandle& h) {
  auto start = Clock::now();
  Transport& transport = *parts_.transport;
  const auto r_size = static_cast<std::size_t>(transport.size());
  const std::int64_t H = hidden_;
  const int K = tokens.slots;
  const std::size_t row_bytes = payload_row_bytes(parts_.payload_dtype, H);
  const std::size_t meta_bytes = to_size(K) * sizeof(SlotMeta);

  h.rows_to_offset_.resize(r_size);
  h.rows_from_offset_.resize(r_size);
  std::int64_t S = 0, N = 0;
  for (std::size_t p = 0; p < r_size; ++p) {
    h.rows_to_offset_[p] = S;
    h.rows_from_offset_[p] = N;
    S += h.rows_to_[p];
    N += h.rows_from_[p];
  }
  // This rank's own rows are packed straight into its receive buffer and their slots
  // copied there: the exchanges skip them.
  const auto me = static_cast<std::size_t>(transport.rank());
  const std::int64_t self_rows = h.rows_to_[me];
  peer_exchange(h.rows_to_, me, row_bytes, /*compact=*/true, h.send_bytes_, h.send_offsets_);
  peer_exchange(h.rows_from_, me, row_bytes, /*compact=*/false, h.recv_bytes_, h.recv_offsets_);
  peer_exchange(h.rows_to_, me, meta_bytes, /*compact=*/false, h.meta_send_bytes_,
                h.meta_send_offsets_);
  peer_exchange(h.rows_from_, me, meta_bytes, /*compact=*/false, h.meta_recv_bytes_,
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
  layout.placement = &parts_.placement;
  layout.rows_to_offset = {h.rows_to_offset_.data(), r_size};
  layout.send_row_token = h.send_row_token_.data();
  layout.send_meta = h.send_meta_.data();
  data_path_->layout(layout, *workspace_->stream);
  const std::int64_t self_first = h.rows_to_offset_[me];
  // One run per destination: the peers' into the send buffer, this rank's own in place.
  h.pack_runs_.resize(r_size);
  for (std::size_t p = 0; p < r_size; ++p) {
    std::byte* rows = p == me ? h.recv_rows_.data() + to_size(h.rows_from_offset_[me]) * row_bytes
                              : h.send_rows_.data() + h.send_offsets_[p];
    h.pack_runs_[p] = {h.rows_to_offset_[p], h.rows_to_[p], rows};
  }
  PackArgs pack;
  pack.x = tokens.x;
  pack.hidden = H;
  pack.send_row_token = h.send_row_token_.data();
  pack.num_rows = S;
  pack.dtype = parts_.payload_dtype;
  data_path_->pack_runs(pack, {h.pack_runs_.data(), r_size}, *workspace_->stream);
  if (self_rows > 0) {
    data_path_->copy(h.recv_meta_.data() + h.rows_from_offset_[me] * K,
                     h.send_meta_.data() + self_first * K,
                     to_size(self_rows * K) * sizeof(SlotMeta), *workspace_->stream);
  }
  timings_.layout_s += seconds_since(start);
}

void MoELayer::group_rows(DispatchHandle& h, ExpertRowDTypes dtypes) {
  // Group the received rows per local expert (stable: source rank, then source token).
  auto start = Clock::now();
  const int me = parts_.transport->rank();
  const std::int64_t H = hidden_;
  const int K = h.slots_;
  const std::int64_t N =
      static_cast<std::int64_t>(h.recv_meta_.size()) / static_cast<std::int64_t>(K ? K : 1);
  const int L = parts_.placement.num_local(me);
  h.rows_per_expert_.resize(static_cast<std::size_t>(L));
  GroupCountArgs count;
  count.meta = h.recv_meta_.data();
  count.num_rows = N;
  count.slots = K;
  count.num_local_experts = L;
  count.rows_per_expert = h.rows_per_expert_.data();
  data_path_->count_groups(count, *workspace_->stream);
  std::int64_t A = 0;
  for (int l = 0; l < L; ++l) A += h.rows_per_expert_[static_cast<std::size_t>(l)];
  h.expert_input_.resize(to_size(A * H));
  h.expert_output_.resize(to_size(A * H));
  h.assignment_of_slot_.resize(to_size(N * K));
  GroupArgs group;
  group.rows = h.recv_rows_.data();
  group.meta = h.recv_meta_.data();
  group.num_rows = N;
  group.slots = K;
  group.hidden = H;
  group.dtype = parts_.payload_dtype;
  group.num_local_experts = L;
  group.rows_per_expert = h.rows_per_expert_.data();
  // Sized in f32 rows whatever the dtype: the combine may reuse them (place_partials).
  group.expert_input = reinterpret_cast<std::byte*>(h.expert_input_.data());
  group.expert_input_dtype = dtypes.input;
  group.assignment_of_slot = h.assignment_of_slot_.data();
  h.expert_input_dtype_ = dtypes.input;
  // Its buffer holds f32 rows whatever the dtype, as the input's does.
  h.expert_output_dtype_ = dtypes.output;
  data_path_->group_by_expert(group, *workspace_->stream);
  timings_.layout_s += seconds_since(start);
}

void MoELayer::combine(DispatchHandle& h, const TensorView& expert_output, const TensorView& y) {
  combine_with(h, expert_output, y, h.recv_meta_.data());
}

void MoELayer::combine_with(DispatchHandle& h, const TensorView& expert_output, const TensorView& y,
                            const SlotMeta* meta) {
  auto start = Clock::now();
  reduce_rows(h, expert_output, y, /*in_expert_buffers=*/false, meta);
  parts_.transport->alltoallv(back_buffers(h), *workspace_->stream);
  host_ready();
  sum_rows(h, y.data_as<float>());
  timings_.combine_s = seconds_since(start);
}

void MoELayer::reduce_rows(DispatchHandle& h, const TensorView& expert_output, const TensorView& y,
                           bool in_expert_buffers, const SlotMeta* meta) {
  if (meta == nullptr) meta = h.recv_meta_.data();
  const std::int64_t H = hidden_;
  const int K = h.slots_;
  const std::int64_t A = static_cast<std::int64_t>(h.expert_input_.size()) / H;
  // Shapes are checked on every rank before anything is sent; a mismatch is a caller bug
  // that would otherwise corrupt memory.
  const DType output_dtype = expert_output.dtype() == DType::kBF16 ? DType::kBF16 : DType::kF32;
  expert_output.require_on(data_path_->device(), "MoE combine expert_output", output_dtype, {A, H});
  y.require_on(data_path_->device(), "MoE combine y", DType::kF32, {h.num_tokens_, H});
  place_partials(h, in_expert_buffers);
  for (const PartialRows& rows : partial_segments(h)) {
    if (rows.count == 0) continue;
    WeightedReduceArgs reduce;
    reduce.expert_output = static_cast<const std::byte*>(expert_output.data());
    reduce.expert_output_dtype = output_dtype;
    reduce.meta = meta + rows.first * K;
    reduce.assignment_of_slot = h.assignment_of_slot_.data() + rows.first * K;
    reduce.num_rows = rows.count;
    reduce.slots = K;
    reduce.hidden = H;
    reduce.combine_dtype = parts_.combine_dtype;
    reduce.partial_rows = rows.out;
    data_path_->weighted_reduce(reduce, *workspace_->stream);
  }
}

void MoELayer::place_partials(DispatchHandle& h, bool in_expert_buffers) {
  const std::int64_t H = hidden_;
  const int K = h.slots_;
  const std::int64_t N = static_cast<std::int64_t>(h.recv_meta_.size()) / (K ? K : 1);
  const std::int64_t S = static_cast<std::int64_t>(h.send_row_token_.size());
  const auto me = static_cast<std::size_t>(parts_.transport->rank());
  const std::size_t row_bytes = to_size(H) * dtype_size(parts_.combine_dtype);
  // The partial sums of this rank's own rows go straight to their place among the
  // returned rows; the partials buffer holds the others'.
  const std::size_t partial_bytes = to_size(N - h.rows_from_[me]) * row_bytes;
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
  peer_exchange(h.rows_from_, me, row_bytes, /*compact=*/true, h.back_send_bytes_,
                h.back_send_offsets_);
  peer_exchange(h.rows_to_, me, row_bytes, /*compact=*/false, h.back_recv_bytes_,
                h.back_recv_offsets_);
  traffic_.combine_bytes = 0;
  for (std::size_t p = 0; p < h.back_send_bytes_.size(); ++p) {
    traffic_.combine_bytes += h.back_send_bytes_[p];
  }
}

std::array<MoELayer::PartialRows, 3> MoELayer::partial_segments(const DispatchHandle& h) const {
  const auto me = static_cast<std::size_t>(parts_.transport->rank());
  const int K = h.slots_;
  const std::int64_t N = static_cast<std::int64_t>(h.recv_meta_.size()) / (K ? K : 1);
  const std::int64_t self_first = h.rows_from_offset_[me], self_rows = h.rows_from_[me];
  const std::size_t row_bytes = to_size(hidden_) * dtype_size(parts_.combine_dtype);
  return {PartialRows{0, self_first, h.partial_at_},
          PartialRows{self_first, self_rows,
                      h.combined_at_ + to_size(h.rows_to_offset_[me]) * row_bytes},
          PartialRows{self_first + self_rows, N - self_first - self_rows,
                      h.partial_at_ + to_size(self_first) * row_bytes}};
}

void MoELayer::sum_rows(DispatchHandle& h, float* y) {
  // Rows arrive in (expert rank, token) order, so each token sums its partials in
  // ascending rank order: the same on every transport.
  UnpermuteSumArgs sum;
  sum.combined_rows = h.combined_at_;
  sum.send_row_token = h.send_row_token_.data();
  sum.num_rows = static_cast<std::int64_t>(h.send_row_token_.size());
  sum.hidden = hidden_;
  sum.combine_dtype = parts_.combine_dtype;
  sum.y = y;
  sum.num_tokens = h.num_tokens_;
  data_path_->unpermute_sum(sum, *workspace_->stream);
}

}  // namespace switchyard
