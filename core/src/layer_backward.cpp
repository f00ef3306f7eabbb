// MoELayer's backward: dy dispatched with the forward's layout, the kernel's backward over
// the grouped rows, the rows' input gradients combined back with unit weights, the slot
// weights' gradients returned to their tokens' ranks, and the router's backward; plus the
// backward halves of the public dispatch and combine.
#include "layer_internal.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <optional>
#include <utility>

#include "switchyard/status.hpp"
#include "token_exchange.hpp"

namespace switchyard {

using namespace layer_detail;

SlotRowsArgs MoELayer::slot_rows(const DispatchHandle& h) const {
  SlotRowsArgs args;
  args.meta = h.recv_meta_.data();
  args.assignment_of_slot = h.assignment_of_slot_.data();
  args.num_rows = h.slots_ > 0 ? static_cast<std::int64_t>(h.recv_meta_.size()) / h.slots_ : 0;
  args.slots = h.slots_;
  args.hidden = hidden_;
  return args;
}

void MoELayer::scale_rows(const DispatchHandle& h, const TensorView& rows,
                          const TensorView& weighted) const {
  data_path_->scale_grouped_rows(slot_rows(h), rows.data_as<const float>(),
                                 weighted.data_as<float>(), *workspace_->stream);
}

void MoELayer::slot_dot_products(const DispatchHandle& h, const TensorView& rows,
                                 const TensorView& outputs) {
  workspace_->d_slot_weights.resize(h.recv_meta_.size());
  data_path_->slot_dot_products(slot_rows(h), rows.data_as<const float>(),
                                outputs.data_as<const float>(), workspace_->d_slot_weights.data(),
                                *workspace_->stream);
}

void MoELayer::combine_unweighted(DispatchHandle& h, const TensorView& rows, const TensorView& y,
                                  const SlotMeta* host_meta) {
  // The combine with the handle's slots at unit weight (a copy: the handle keeps its own).
  const std::size_t NK = h.recv_meta_.size();
  workspace_->unit_meta.resize(NK);
  for (std::size_t i = 0; i < NK; ++i) workspace_->unit_meta[i] = {host_meta[i].local_expert, 1.0f};
  const SlotMeta* meta = workspace_->unit_meta.data();
  if (data_path_->device().kind != Device::Kind::kHost) {
    BackwardHostSide& host = workspace_->backward_host;
    if (host.device_unit_meta.device() != data_path_->device()) {
      host.device_unit_meta = Buffer<SlotMeta>(data_path_->allocator());
    }
    host.device_unit_meta.resize(NK);
    data_path_->copy(host.device_unit_meta.data(), meta, NK * sizeof(SlotMeta), stream());
    meta = host.device_unit_meta.data();
  }
  combine_with(h, rows, y, meta);
}

void MoELayer::combine_backward(DispatchHandle& handle, const RoutingPlan& plan,
                                const TensorView& expert_output, const TensorView& dy,
                                const TensorView& d_expert_output, const TensorView& d_weights) {
  if (data_path_->device().kind != Device::Kind::kHost) {
    throw Error(ErrorCode::kUnavailable, "MoE combine backward: needs the host data path");
  }
  const std::int64_t T = plan.num_tokens, H = hidden_;
  const std::int64_t A = static_cast<std::int64_t>(handle.expert_input_.size()) / H;
  expert_output.require("MoE combine backward expert_output", DType::kF32, {A, H});
  dy.require("MoE combine backward dy", DType::kF32, {T, H});
  d_expert_output.require("MoE combine backward d_expert_output", DType::kF32, {A, H});
  d_weights.require("MoE combine backward d_weights", DType::kF32, {T, plan.slots});
  const std::optional<Error> bad = first_non_finite(dy, "dy");
  dispatch(dy, plan, workspace_->backward_dy, bad ? &*bad : nullptr);
  host_ready();
  const TensorView d_rows = workspace_->backward_dy.expert_input();
  scale_rows(workspace_->backward_dy, d_rows, d_expert_output);
  slot_dot_products(workspace_->backward_dy, d_rows, expert_output);
  // The dispatch sent dy to the plan's slots (with a slot map, slot_plan_ holds them).
  const RoutingPlan& routed = parts_.slot_map.empty() ? plan : slot_plan_;
  exchange_->return_slot_values(workspace_->backward_dy, plan.num_tokens, plan.slots,
                                routed.experts.data(),
                                workspace_->backward_dy.send_row_token_.data(),
                                workspace_->d_slot_weights.data(), d_weights.data_as<float>());
}

void MoELayer::dispatch_backward(DispatchHandle& handle, const TensorView& d_expert_input,
                                 const TensorView& dx) {
  if (data_path_->device().kind != Device::Kind::kHost) {
    throw Error(ErrorCode::kUnavailable, "MoE dispatch backward: needs the host data path");
  }
  combine_unweighted(handle, d_expert_input, dx, handle.recv_meta_.data());
}

void MoELayer::backward(const TensorView& x, const TensorView& dy, const LayerGradients& out) {
  const Device device = data_path_->device();
  const bool on_device = device.kind != Device::Kind::kHost;
  if (parts_.shared_expert && (out.d_shared_expert.gate.data() == nullptr ||
                               (parts_.shared_expert_gate.data() != nullptr &&
                                out.d_shared_expert_gate.data() == nullptr))) {
    throw Error(ErrorCode::kInvalidArgument,
                "MoE backward: the layer has a shared expert: LayerGradients::d_shared_expert "
                "(and, for its gate, d_shared_expert_gate) must be given");
  }
  if (!expert_caps_.backward) {
    throw Error(ErrorCode::kUnavailable,
                "MoE backward: expert plugin \"" + parts_.experts->name() + "\" has no backward");
  }
  if (!backward_ready_) {
    throw Error(ErrorCode::kInvalidArgument,
                "MoE backward: follows a forward(x, y) that routed its tokens; the last "
                "forward failed, had a given plan (its backward: combine_backward and "
                "dispatch_backward), or route() ran since");
  }
  const RoutingPlan& plan = plan_;
  const std::int64_t T = plan.num_tokens, H = hidden_;
  const int K = plan.slots;
  const int E = num_experts();
  x.require_on(device, "MoE backward x", DType::kF32, {T, H});
  dy.require_on(device, "MoE backward dy", DType::kF32, {T, H});
  out.dx.require_on(device, "MoE backward dx", DType::kF32, {T, H});
  out.d_gate.require("MoE backward d_gate", DType::kF32, {E, H});

  // A device data path's tokens, plan and logits, read by the host parts of the backward
  // (the checks, the weights' bookkeeping, the router's backward) from host copies.
  BackwardHostSide& host = workspace_->backward_host;
  if (on_device && host.device_row_weights.device() != device) {
    host = BackwardHostSide(data_path_->staging_allocator(), data_path_->allocator());
  }
  auto copy_to_host = [&](auto& into, const auto* from, std::size_t n) {
    into.resize(n);
    if (n > 0) data_path_->copy(into.data(), from, n * sizeof(*from), stream());
  };
  if (on_device) {
    copy_to_host(host.x, x.data_as<const float>(), to_size(T * H));
    copy_to_host(host.dy, dy.data_as<const float>(), to_size(T * H));
    host_ready();
  }
  const TensorView host_x = on_device ? TensorView(host.x.data(), DType::kF32, {T, H}) : x;
  const TensorView host_dy = on_device ? TensorView(host.dy.data(), DType::kF32, {T, H}) : dy;

  // The forward's rows (kept, or dispatched again) and dy's rows, grouped per local expert
  // in the same order. A bad dy stops every rank at the first dispatch's count exchange.
  const bool kept = kept_for_backward_;
  const std::optional<Error> bad = first_non_finite(host_dy, "dy");
  if (!kept) dispatch(x, plan, workspace_->backward_x, bad ? &*bad : nullptr);
  dispatch(dy, plan, workspace_->backward_dy, kept && bad ? &*bad : nullptr);
  DispatchHandle& hx = kept ? kept_handle_ : workspace_->backward_x;
  DispatchHandle& hd = workspace_->backward_dy;
  const TensorView rows = hx.expert_input();
  const TensorView d_rows = hd.expert_input();
  // The rows' output buffer (the forward's outputs are not needed) takes their gradients.
  const TensorView d_inputs = hx.expert_output();
  const std::int64_t A = rows.dim(0);
  const std::int64_t NK = static_cast<std::int64_t>(hd.recv_meta_.size());
  const SlotMeta* meta = hd.recv_meta_.data();
  const std::int64_t* assignment = hd.assignment_of_slot_.data();
  if (on_device) {
    copy_to_host(host.meta, meta, to_size(NK));
    copy_to_host(host.assignment, assignment, to_size(NK));
    host_ready();
    meta = host.meta.data();
    assignment = host.assignment.data();
  }

  // Each grouped row stands for one (token, local expert) slot: the kernel applies the
  // slot's weight to dy and gives <dy, expert output>, the weight's gradient.
  workspace_->grouped_weights.resize(to_size(A));
  workspace_->d_grouped_weights.resize(to_size(A));
  for (std::int64_t i = 0; i < NK; ++i) {
    const std::int64_t a = assignment[to_size(i)];
    if (a >= 0) workspace_->grouped_weights[to_size(a)] = meta[to_size(i)].weight;
  }
  float* row_weights = workspace_->grouped_weights.data();
  float* d_row_weights = workspace_->d_grouped_weights.data();
  if (on_device) {
    host.device_row_weights.resize(to_size(2 * A));
    row_weights = host.device_row_weights.data();
    d_row_weights = row_weights + A;
    data_path_->copy(row_weights, workspace_->grouped_weights.data(), to_size(A) * sizeof(float),
                     stream());
  }
  ExpertGradientBatch batch{rows, hx.rows_per_expert(), d_rows, d_inputs, out.d_experts};
  batch.row_weights = TensorView(row_weights, DType::kF32, {A}, device);
  batch.d_row_weights = TensorView(d_row_weights, DType::kF32, {A}, device);
  const std::int64_t columns = expert_caps_.saved_columns;
  if (kept && columns > 0) {
    batch.saved = TensorView(saved_columns_.data(), DType::kF32, {A, columns});
  }
  if (!expert_caps_.execution.stream_ordered) host_ready();
  parts_.experts->backward(batch, *workspace_->stream);
  if (on_device) {
    data_path_->copy(workspace_->d_grouped_weights.data(), d_row_weights,
                     to_size(A) * sizeof(float), stream());
  }
  host_ready();
  workspace_->d_slot_weights.resize(to_size(NK));
  for (std::int64_t i = 0; i < NK; ++i) {
    const std::int64_t a = assignment[to_size(i)];
    workspace_->d_slot_weights[to_size(i)] =
        a >= 0 ? workspace_->d_grouped_weights[to_size(a)] : 0.0f;
  }
  // The rows' input gradients come back summed per token; the weights' gradients to their
  // tokens' ranks.
  combine_unweighted(hd, d_inputs, out.dx, meta);
  // The slots dy went to (the dispatch above translated plan_ into slot_plan_).
  const std::int32_t* plan_experts =
      parts_.slot_map.empty() ? plan.experts.data() : slot_plan_.experts.data();
  const std::int64_t* send_row_token = hd.send_row_token_.data();
  const float* logits = logits_.data();
  const RoutingPlan* host_plan = &plan;
  if (on_device) {
    copy_to_host(host.send_row_token, send_row_token, hd.send_row_token_.size());
    copy_to_host(host.logits, logits, to_size(T * E));
    copy_to_host(host.dx, out.dx.data_as<const float>(), to_size(T * H));
    RoutingPlan& p = workspace_->host_plan;
    p.num_tokens = T;
    p.slots = K;
    copy_to_host(p.experts, plan.experts.data(), plan.experts.size());
    copy_to_host(p.weights, plan.weights.data(), plan.weights.size());
    copy_to_host(p.counts, plan.counts.data(), plan.counts.size());
    host_ready();
    plan_experts = p.experts.data();
    send_row_token = host.send_row_token.data();
    logits = host.logits.data();
    host_plan = &p;
  }
  workspace_->d_plan_weights.resize(to_size(T * K));
  exchange_->return_slot_values(hd, T, K, plan_experts, send_row_token,
                                workspace_->d_slot_weights.data(),
                                workspace_->d_plan_weights.data());

  // The router (on the host): d logits from the weights' gradients (at the forward's
  // logits), then through the logits' GEMM.
  Transport& transport = *parts_.transport;
  workspace_->d_logits.resize(to_size(T * E));
  RouteGradientInput route;
  route.logits = TensorView(const_cast<float*>(logits), DType::kF32, {T, E});
  route.topology = &transport.topology();
  route.plan = host_plan;
  route.d_weights = TensorView(workspace_->d_plan_weights.data(), DType::kF32, {T, K});
  route.loss_tokens = out.loss_tokens;
  route.loss_aux_counts = out.loss_aux_counts;
  parts_.router->backward(route, TensorView(workspace_->d_logits.data(), DType::kF32, {T, E}));
  const TensorView host_dx = on_device ? TensorView(host.dx.data(), DType::kF32, {T, H}) : out.dx;
  accumulate_router_gradients(host_x, parts_.gate, workspace_->d_logits.data(), host_dx,
                              out.d_gate);
  if (on_device) {
    data_path_->copy(out.dx.data(), host.dx.data(), to_size(T * H) * sizeof(float), stream());
    host_ready();  // returns when dx is written
  }
  backward_shared_expert(x, dy, out);
}

void MoELayer::backward_shared_expert(const TensorView& x, const TensorView& dy,
                                      const LayerGradients& out) {
  if (!parts_.shared_expert) return;
  // y += s ⊙ shared(x) with s = sigmoid(x·g) per token (1 without a gate): the kernel's
  // backward with s as the rows' weights gives d x through the expert, its weights'
  // gradients and <dy, shared(x)> per token; then ds through the sigmoid.
  const std::int64_t T = x.dim(0), H = hidden_;
  const float* gate = parts_.shared_expert_gate.data_as<const float>();
  const float* xs = x.data_as<const float>();
  shared_rows_[0] = T;
  workspace_->shared_output.resize(to_size(T * H));
  workspace_->d_shared_scales.resize(to_size(T));
  const float* scales = shared_expert_scales(x);
  ExpertGradientBatch batch{x, shared_rows_, dy,
                            TensorView(workspace_->shared_output.data(), DType::kF32, {T, H}),
                            std::span<const SwigluExpertGradients>(&out.d_shared_expert, 1)};
  batch.row_weights = TensorView(const_cast<float*>(scales), DType::kF32, {T});
  batch.d_row_weights = TensorView(workspace_->d_shared_scales.data(), DType::kF32, {T});
  parts_.shared_expert->backward(batch, stream());
  host_ready();
  float* dx = out.dx.data_as<float>();
  const float* d_input = workspace_->shared_output.data();
  float* d_gate = out.d_shared_expert_gate.data_as<float>();
  for (std::int64_t t = 0; t < T; ++t) {
    for (std::int64_t h = 0; h < H; ++h) dx[t * H + h] += d_input[t * H + h];
    if (gate == nullptr) continue;
    const float dz = workspace_->d_shared_scales[to_size(t)] * scales[t] * (1.0f - scales[t]);
    for (std::int64_t h = 0; h < H; ++h) {
      dx[t * H + h] += dz * gate[h];
      d_gate[h] += dz * xs[t * H + h];
    }
  }
}

}  // namespace switchyard
