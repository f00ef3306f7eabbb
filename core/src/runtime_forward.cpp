// Runtime: the model's forward over its layers, the public dispatch and combine, and the
// router updates after a step.
#include "runtime_internal.hpp"

#include <algorithm>
#include <cmath>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <system_error>
#include <thread>
#include <vector>

#include "switchyard/bootstrap.hpp"
#include "switchyard/checkpoint.hpp"
#include "switchyard/io.hpp"
#include "switchyard/memory_budget.hpp"
#include "switchyard/reference.hpp"
#include "switchyard/status.hpp"
#include "token_exchange.hpp"

namespace switchyard {

using namespace runtime_detail;

void Runtime::forward_blocks(const TensorView& x, const TensorView& y, bool world_blocks,
                             int index) {
  check_layer(index, "forward");
  const std::int64_t H = model(index).hidden();
  // Host tensors, or tensors on the layers' device, which the layers take as they are.
  const Device device = layer(0, index).data_path().device();
  x.require_on(x.device() == device ? device : Device::host(), "input tokens", DType::kF32,
               {-1, H});
  y.require_on(x.device(), "output", DType::kF32, {x.dim(0), H});
  const auto* x_begin = x.data_as<const float>();
  const auto* y_begin = y.data_as<const float>();
  if (x.numel() > 0 && x_begin < y_begin + y.numel() && y_begin < x_begin + x.numel()) {
    throw Error(ErrorCode::kInvalidArgument,
                "output: shares memory with the input tokens (the layer reads every token "
                "after it starts writing results; give y memory of its own)");
  }
  const TensorView& ids = state_->token_ids;
  if (ids.data() != nullptr) require_token_ids(ids, x.dim(0));
  // Each local rank's staging buffers for host tokens on a device layer, made before the
  // ranks' threads use them.
  if (x.device() != device) state_->device_rows.resize(static_cast<std::size_t>(num_local_ranks()));
  run_blocks(x.dim(0), world_blocks, index, [&](int local, std::int64_t first, std::int64_t count) {
    if (ids.data() != nullptr) layer(local, index).set_token_ids(id_rows(ids, first, count));
    forward_block(local, index, rows(x, first, count), rows(y, first, count));
  });
  update_routers(index);
}

namespace {

/// Forgets `set_token_ids`' ids when the call that uses them ends, however it ends.
class TokenIdsOfOneCall {
 public:
  explicit TokenIdsOfOneCall(TensorView& ids) : ids_(ids) {}
  ~TokenIdsOfOneCall() { ids_ = TensorView{}; }
  TokenIdsOfOneCall(const TokenIdsOfOneCall&) = delete;
  TokenIdsOfOneCall& operator=(const TokenIdsOfOneCall&) = delete;

 private:
  TensorView& ids_;
};

}  // namespace

void Runtime::set_token_ids(const TensorView& token_ids) {
  if (token_ids.data() != nullptr && token_ids.device().kind != Device::Kind::kHost) {
    throw Error(ErrorCode::kInvalidArgument, "token ids: host memory expected, got " +
                                                 device_name(token_ids.device()) + " memory");
  }
  state_->token_ids = token_ids;
}

void Runtime::forward(const TensorView& x, const TensorView& y, int layer) {
  const TokenIdsOfOneCall ids(state_->token_ids);
  state_->layer_inputs_tokens = -1;  // a layer's own forward ends what backward_model may use
  forward_blocks(x, y, /*world_blocks=*/true, layer);
}

void Runtime::forward_local_tokens(const TensorView& x, const TensorView& y, int layer) {
  const TokenIdsOfOneCall ids(state_->token_ids);
  state_->layer_inputs_tokens = -1;
  forward_blocks(x, y, /*world_blocks=*/false, layer);
}

void Runtime::forward_local_tokens_on_stream(const TensorView& x, const TensorView& y,
                                             void* caller_stream, int index) {
  const TokenIdsOfOneCall forget_ids(state_->token_ids);
  check_layer(index, "forward");
  state_->layer_inputs_tokens = -1;
  const std::int64_t H = model(index).hidden();
  const Device device = layer(0, index).data_path().device();
  x.require_on(device, "input tokens", DType::kF32, {-1, H});
  y.require_on(device, "output", DType::kF32, {x.dim(0), H});
  const TensorView& ids = state_->token_ids;
  if (ids.data() != nullptr) require_token_ids(ids, x.dim(0));
  // Each rank's view of the caller's stream and its mark that x is written, all made here
  // before any rank queues its step: the ranks share the caller's stream, and a rank's wait
  // there for its y must come after every rank's mark, or the caller's stream would wait
  // for a step whose peers wait for it (without the counts' host wait, in the worst-case
  // mode, a rank may queue its whole step before another starts).
  const auto n = static_cast<std::size_t>(num_local_ranks());
  std::vector<std::unique_ptr<Stream>> callers;
  std::vector<std::unique_ptr<StreamEvent>> x_written, y_written;
  for (std::size_t local = 0; local < n; ++local) {
    MoELayer& l = layer(static_cast<int>(local), index);
    callers.push_back(l.data_path().borrow_stream(caller_stream));
    x_written.push_back(callers.back()->create_event());
    callers.back()->record(*x_written.back());
    y_written.push_back(l.stream().create_event());
  }
  run_blocks(x.dim(0), /*world_blocks=*/false, index,
             [&](int local, std::int64_t first, std::int64_t count) {
               MoELayer& l = layer(local, index);
               const auto at = static_cast<std::size_t>(local);
               if (ids.data() != nullptr) l.set_token_ids(id_rows(ids, first, count));
               l.stream().wait(*x_written[at]);
               l.forward(rows(x, first, count), rows(y, first, count), *y_written[at]);
             });
  for (std::size_t local = 0; local < n; ++local) callers[local]->wait(*y_written[local]);
  update_routers(index);
}

bool Runtime::residual() const { return settings().section("model").get_bool("residual"); }

void Runtime::forward_model(const TensorView& x, const TensorView& y) {
  const TokenIdsOfOneCall ids(state_->token_ids);
  const std::int64_t H = model().hidden();
  x.require("input tokens", DType::kF32, {-1, H});
  y.require("output", DType::kF32, {x.dim(0), H});
  const std::int64_t T = x.dim(0);
  const int L = num_layers();
  // Training keeps every layer's input for backward_model; inference alternates two buffers.
  State& s = *state_;
  s.layer_inputs_tokens = -1;
  if (s.training) s.layer_inputs.resize(static_cast<std::size_t>(L - 1));
  TensorView in = x;
  for (int index = 0; index < L; ++index) {
    TensorView out = y;
    if (index + 1 < L) {
      HostTensor& storage = s.training       ? s.layer_inputs[static_cast<std::size_t>(index)]
                            : index % 2 == 0 ? s.chain_out
                                             : s.chain_in;
      out = grown_matrix(storage, T, H);
    }
    forward_blocks(in, out, /*world_blocks=*/true, index);  // every layer the same ids
    if (residual()) add_rows(in, out);
    in = out;
  }
  if (s.training) s.layer_inputs_tokens = T;  // after forward, which resets it
}

std::size_t Runtime::step_buffer_bytes() const noexcept {
  std::size_t bytes = 0;
  for (const auto& workspace : state_->workspaces) bytes += workspace_bytes(*workspace);
  for (const auto& layers : state_->layers) {
    for (const auto& l : layers) bytes += l->own_buffer_bytes();
  }
  return bytes;
}

void Runtime::dispatch(const TensorView& x, const TensorView& experts, const TensorView& weights,
                       ProcessDispatch& dispatched, int index) {
  check_layer(index, "dispatch");
  const std::int64_t H = model(index).hidden();
  dispatched.combinable = false;
  dispatched.layer = index;
  const Device device = layer(0, index).data_path().device();
  x.require_on(x.device() == device ? device : Device::host(), "input x", DType::kF32, {-1, H});
  const std::int64_t T = x.dim(0);
  // int32 ids, or int64 (what PyTorch's topk gives): an id beyond int32 is out of range.
  const bool wide_ids = experts.dtype() == DType::kI64;
  experts.require_strided("experts", wide_ids ? DType::kI64 : DType::kI32, {T, -1});
  const std::int64_t K = experts.dim(1);
  weights.require_strided("weights", DType::kF32, {T, K});
  if (K < 1) throw Error(ErrorCode::kInvalidArgument, "experts: needs at least one slot per token");
  dispatched.parts.resize(static_cast<std::size_t>(num_local_ranks()));
  dispatched.num_tokens = T;
  run_blocks(
      T, /*world_blocks=*/false, index, [&](int local, std::int64_t first, std::int64_t count) {
        MoELayer& l = layer(local, index);
        DispatchPart& part = dispatched.parts[static_cast<std::size_t>(local)];
        const int ep_rank = l.transport().rank();
        part.world_rank = world_rank(local);
        part.first_expert = l.placement().first_expert(ep_rank);
        part.num_local_experts = l.placement().num_local(ep_rank);
        part.local_experts.resize(static_cast<std::size_t>(part.num_local_experts));
        for (int j = 0; j < part.num_local_experts; ++j)
          part.local_experts[static_cast<std::size_t>(j)] =
              expert_of_slot(index, part.first_expert + j);
        part.first_token = first;
        part.num_tokens = count;
        RoutingPlan& plan = part.plan;
        plan.num_tokens = count;
        plan.slots = static_cast<int>(K);
        plan.experts.resize(static_cast<std::size_t>(count * K));
        plan.weights.resize(static_cast<std::size_t>(count * K));
        std::optional<Error> refused;
        for (std::int64_t t = 0; t < count; ++t) {
          for (std::int64_t k = 0; k < K; ++k) {
            std::int32_t id = 0;
            if (wide_ids) {
              const auto wide = element<std::int64_t>(experts, first + t, k);
              id = narrowed_expert_id(wide);
              if (id == -2 && !refused) {
                refused = expert_out_of_range(t, k, wide, model(index).num_experts());
              }
            } else {
              id = element<std::int32_t>(experts, first + t, k);
            }
            plan.experts[static_cast<std::size_t>(t * K + k)] = id;
            plan.weights[static_cast<std::size_t>(t * K + k)] =
                element<float>(weights, first + t, k);
          }
        }
        const TensorView block = rows(x, first, count);
        // Tokens on the device are not read by the host: a NaN there reaches y.
        if (!refused && block.device().kind == Device::Kind::kHost) {
          refused = first_non_finite(block, "input x");
        }
        if (device.kind == Device::Kind::kHost) {
          l.dispatch(block, plan, part.handle, refused ? &*refused : nullptr);
          return;
        }
        // A device data path takes the plan (checked here, where the host can read
        // it) and host tokens in its own memory.
        if (!refused) refused = check_routing_plan_values(plan, model(index).num_experts());
        DataPath& path = l.data_path();
        if (part.device_plan.device() != device) part.device_plan = RoutingPlan(path.allocator());
        RoutingPlan& on_device = part.device_plan;
        on_device.num_tokens = count;
        on_device.slots = static_cast<int>(K);
        on_device.experts.resize(plan.experts.size());
        on_device.weights.resize(plan.weights.size());
        path.copy(on_device.experts.data(), plan.experts.data(),
                  plan.experts.size() * sizeof(std::int32_t), l.stream());
        path.copy(on_device.weights.data(), plan.weights.data(),
                  plan.weights.size() * sizeof(float), l.stream());
        const TensorView tokens = block.device() == device
                                      ? block
                                      : device_copy(part.staged_rows, path, block, l.stream());
        l.dispatch(tokens, on_device, part.handle, refused ? &*refused : nullptr);
      });
  dispatched.combinable = true;
}

void Runtime::combine(ProcessDispatch& dispatched, std::span<const TensorView> expert_outputs,
                      const TensorView& y) {
  const std::int64_t H = model().hidden();
  if (!dispatched.combinable) {
    throw Error(ErrorCode::kInvalidArgument,
                "combine needs a dispatch of its own: this one failed, was already combined, "
                "or never ran");
  }
  if (expert_outputs.size() != dispatched.parts.size()) {
    throw Error(ErrorCode::kInvalidArgument, "combine takes one expert output per local rank: " +
                                                 std::to_string(dispatched.parts.size()) +
                                                 " expected, " +
                                                 std::to_string(expert_outputs.size()) + " given");
  }
  const Device device = layer(0, dispatched.layer).data_path().device();
  y.require_on(y.device() == device ? device : Device::host(), "output y", DType::kF32,
               {dispatched.num_tokens, H});
  for (std::size_t i = 0; i < expert_outputs.size(); ++i) {
    const std::int64_t A = dispatched.parts[i].handle.expert_input().dim(0);
    expert_outputs[i].require_on(device, "expert output of local rank " + std::to_string(i),
                                 DType::kF32, {A, H});
  }
  dispatched.combinable = false;
  run_on_ranks([&](int local) {
    DispatchPart& part = dispatched.parts[static_cast<std::size_t>(local)];
    MoELayer& l = layer(local, dispatched.layer);
    const TensorView out = rows(y, part.first_token, part.num_tokens);
    if (out.device() == device) {
      l.combine(part.handle, expert_outputs[static_cast<std::size_t>(local)], out);
      return;
    }
    // Host y, device layer: summed in the data path's memory (the dispatch's token
    // staging, dead by now), then copied out.
    const TensorView summed = device_matrix(part.staged_rows, l.data_path(), part.num_tokens, H);
    l.combine(part.handle, expert_outputs[static_cast<std::size_t>(local)], summed);
    copy_back(l.data_path(), summed, out, l.stream());
  });
}

void Runtime::forward_block(int local, int index, const TensorView& x, const TensorView& y) {
  MoELayer& l = layer(local, index);
  DataPath& path = l.data_path();
  if (x.device() == path.device()) {
    l.forward(x, y);
    return;
  }
  // Host tokens, device layer: through device buffers of this rank (grown once).
  auto& d = state_->device_rows.at(static_cast<std::size_t>(local));
  if (!d) d = std::make_unique<State::DeviceRows>();
  const TensorView on_device = device_matrix(d->y, path, y.dim(0), y.dim(1));
  l.forward(device_copy(d->x, path, x, l.stream()), on_device);
  copy_back(path, on_device, y, l.stream());
}

void Runtime::update_routers(int index) {
  if (!layer(0, index).router().updates_from_counts()) return;
  const auto E = static_cast<std::size_t>(model(index).num_experts());
  state_->group_counts.resize(static_cast<std::size_t>(num_local_ranks()));
  // The worst-case mode's counts, waited for; a failure they report is thrown once the
  // collectives are done, outside run_on_ranks (which would abort the transports).
  std::vector<std::optional<Error>> late(static_cast<std::size_t>(num_local_ranks()));
  run_on_ranks([&](int local) {
    late[static_cast<std::size_t>(local)] = layer(local, index).wait_worst_case_steps();
    Router& router = layer(local, index).router();
    auto& sums = state_->group_counts[static_cast<std::size_t>(local)];
    sums.assign(router.stats().counts.begin(), router.stats().counts.end());
    sums.resize(E);
    // Integer sums: the same on every rank, so every rank's bias moves the same way.
    state_->ep_transports[static_cast<std::size_t>(local)]->allreduce(sums.data(), E, DType::kI64,
                                                                      ReduceOp::kSum);
    router.update(sums);
  });
  for (const std::optional<Error>& e : late)
    if (e) throw *e;
}

void Runtime::gather_rows(const TensorView& y) {
  const int world = world_size();
  if (num_local_ranks() == world) return;  // every row is already in this process
  const std::int64_t T = y.dim(0);
  const std::size_t row_bytes = static_cast<std::size_t>(y.dim(1)) * sizeof(float);
  run_on_ranks([&](int local) {
    Transport& t = world_transport(local);
    const auto n = static_cast<std::size_t>(world);
    std::vector<std::size_t> send_counts(n, 0), send_offsets(n, 0), recv_counts(n, 0),
        recv_offsets(n, 0);
    const auto [first, count] = token_block(T, world, t.rank());
    send_counts[0] = static_cast<std::size_t>(count) * row_bytes;
    send_offsets[0] = static_cast<std::size_t>(first) * row_bytes;
    if (t.rank() == 0) {
      for (int r = 0; r < world; ++r) {
        const auto [f, c] = token_block(T, world, r);
        recv_counts[static_cast<std::size_t>(r)] = static_cast<std::size_t>(c) * row_bytes;
        recv_offsets[static_cast<std::size_t>(r)] = static_cast<std::size_t>(f) * row_bytes;
      }
    }
    auto* bytes = static_cast<std::byte*>(y.data());
    t.alltoallv({bytes, send_counts, send_offsets, bytes, recv_counts, recv_offsets});
  });
}

}  // namespace switchyard
