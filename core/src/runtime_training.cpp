// Runtime: training (the backward of a layer and of the model, the backwards of dispatch
// and combine, parameters) and checkpoints.
#include "runtime_internal.hpp"

#include <algorithm>
#include <cmath>
#include <exception>
#include <map>
#include <mutex>
#include <optional>
#include <system_error>
#include <thread>

#include "switchyard/bootstrap.hpp"
#include "switchyard/checkpoint.hpp"
#include "switchyard/io.hpp"
#include "switchyard/memory_budget.hpp"
#include "switchyard/reference.hpp"
#include "switchyard/status.hpp"

namespace switchyard {

using namespace runtime_detail;

void Runtime::gather_expert_gradients(ModelGradients& gradients, int index, bool sum_copies) {
  const int world = world_size();
  if (num_local_ranks() == world) return;
  const std::int64_t H = model().hidden(), F = model().ffn_hidden();
  const std::size_t expert_floats = static_cast<std::size_t>(3 * F * H);
  const int ep = ep_size();
  const int E = model(index).num_experts();
  run_on_ranks([&](int local) {
    Transport& t = world_transport(local);
    const auto n = static_cast<std::size_t>(world);
    std::vector<std::size_t> send_counts(n, 0), send_offsets(n, 0), recv_counts(n, 0),
        recv_offsets(n, 0);
    const ExpertPlacement& placement = layer(local, index).placement();
    const int r = t.rank();
    std::vector<float> send, recv;
    if (r != 0 && r < ep) {
      // This rank's slots' gradients (its experts', summed over its copies of each): gate,
      // up, down of each slot's expert, in slot order.
      for (int j = 0; j < placement.num_local(r); ++j) {
        for (const HostTensor& w : gradients.experts[static_cast<std::size_t>(
                 expert_of_slot(index, placement.first_expert(r) + j))]) {
          send.insert(send.end(), w.data<float>(), w.data<float>() + w.numel());
        }
      }
      send_counts[0] = send.size() * sizeof(float);
    }
    if (r == 0) {
      std::size_t offset = 0;
      for (int q = 1; q < ep; ++q) {
        recv_counts[static_cast<std::size_t>(q)] =
            static_cast<std::size_t>(placement.num_local(q)) * expert_floats * sizeof(float);
        recv_offsets[static_cast<std::size_t>(q)] = offset;
        offset += recv_counts[static_cast<std::size_t>(q)];
      }
      recv.resize(offset / sizeof(float));
    }
    t.alltoallv({reinterpret_cast<const std::byte*>(send.data()), send_counts, send_offsets,
                 reinterpret_cast<std::byte*>(recv.data()), recv_counts, recv_offsets});
    if (r != 0) return;
    // Rank 0 holds its own slots' sums; each other rank's expert arrives once per slot it
    // holds of it, already summed there, so only its first slot of an expert counts.
    std::vector<bool> touched(static_cast<std::size_t>(E), false);
    for (int j = 0; j < placement.num_local(0); ++j)
      touched[static_cast<std::size_t>(expert_of_slot(index, placement.first_expert(0) + j))] =
          true;
    const std::vector<std::int64_t> shapes[3] = {{F, H}, {F, H}, {H, F}};
    HostTensor arrived[3];
    for (std::size_t w = 0; w < 3; ++w) arrived[w] = HostTensor(DType::kF32, shapes[w]);
    const float* at = recv.data();
    for (int q = 1; q < ep; ++q) {
      std::vector<bool> seen_from_q(static_cast<std::size_t>(E), false);
      for (int j = 0; j < placement.num_local(q); ++j, at += expert_floats) {
        const int expert = expert_of_slot(index, placement.first_expert(q) + j);
        if (seen_from_q[static_cast<std::size_t>(expert)]) continue;
        seen_from_q[static_cast<std::size_t>(expert)] = true;
        if (!sum_copies && touched[static_cast<std::size_t>(expert)]) continue;
        for (std::size_t w = 0; w < 3; ++w)
          std::copy_n(at + static_cast<std::int64_t>(w) * F * H, F * H, arrived[w].data<float>());
        add_slot_gradient(gradients, touched, expert, arrived);
      }
    }
  });
}

ModelParameters Runtime::parameters(int index) {
  check_layer(index, "parameters");
  for (int local = 0; local < num_local_ranks(); ++local) {
    if (layer(local, index).data_path().device().kind != Device::Kind::kHost) {
      throw Error(ErrorCode::kUnavailable,
                  "parameters: training updates the host weights, but this runtime's data path "
                  "keeps its own device copy ([runtime] data_path = \"host\" to train)");
    }
  }
  ModelWeights& m = state_->models[static_cast<std::size_t>(index)];
  ModelParameters p;
  p.gate = m.gate().view();
  p.experts.resize(static_cast<std::size_t>(m.num_experts()));
  for_each_held_expert(index, [&](int expert, const SwigluExpertWeights& w) {
    if (w.gate.dtype() != DType::kF32) {
      throw Error(ErrorCode::kInvalidArgument,
                  "parameters: the experts' weights are " +
                      std::string(dtype_name(w.gate.dtype())) +
                      "; training updates f32 weights (an f32 checkpoint, or [model] dtype = "
                      "\"f32\" for random weights)");
    }
    p.experts[static_cast<std::size_t>(expert)] = {w.gate, w.up, w.down};
  });
  if (m.has_shared_expert()) {
    const SharedExpertWeights shared = m.shared_expert();
    if (shared.weights.gate.dtype() != DType::kF32) {
      throw Error(ErrorCode::kInvalidArgument,
                  "parameters: the shared expert's weights are " +
                      std::string(dtype_name(shared.weights.gate.dtype())) +
                      "; training updates f32 weights (an f32 checkpoint)");
    }
    p.shared_expert = {shared.weights.gate, shared.weights.up, shared.weights.down};
    p.shared_expert_gate = shared.gate;
  }
  return p;
}

void Runtime::for_each_held_expert(
    int index,
    const std::function<void(int expert, const SwigluExpertWeights& weights)>& fn) const {
  for (int local = 0; local < num_local_ranks(); ++local) {
    const MoELayer& l =
        *state_->layers[static_cast<std::size_t>(index)][static_cast<std::size_t>(local)];
    const int ep_rank = l.transport().rank();
    const int first = l.placement().first_expert(ep_rank);
    for (int slot = first; slot < first + l.placement().num_local(ep_rank); ++slot) {
      const int expert = expert_of_slot(index, slot);
      fn(expert, model(index).experts(expert, 1).front());
    }
  }
}

void Runtime::save_model(const std::filesystem::path& path) {
  const ConfigSection& options = settings().section("model");
  const CheckpointFormat format = options.get_string("format") == "mixtral"
                                      ? CheckpointFormat::kMixtral
                                      : CheckpointFormat::kDeepseek;
  // Checked alike on every rank, before the collectives.
  if (num_layers() > 1 && options.get_string("prefix").find("{layer}") == std::string::npos) {
    throw Error(ErrorCode::kInvalidArgument,
                "save_model: the model has " + std::to_string(num_layers()) +
                    " layers but model.prefix \"" + options.get_string("prefix") +
                    "\" names no {layer}, so their tensors would have the same names (e.g. "
                    "prefix = \"model.layers.{layer}.mlp.\")");
  }
  std::map<std::string, HostTensor> tensors;
  for (int index = 0; index < num_layers(); ++index) {
    const ModelWeights& m = model(index);
    // The held experts widened to f32, gathered like gradients to world rank 0.
    ModelGradients copy;
    copy.experts.resize(static_cast<std::size_t>(m.num_experts()));
    for_each_held_expert(index, [&](int expert, const SwigluExpertWeights& held) {
      const TensorView weights[3] = {held.gate, held.up, held.down};
      const TensorView scales[3] = {held.gate_scale, held.up_scale, held.down_scale};
      for (std::size_t w = 0; w < 3; ++w) {
        HostTensor f32(DType::kF32, {weights[w].dim(0), weights[w].dim(1)});
        widen_expert_weight(weights[w], scales[w], f32.data<float>());
        copy.experts[static_cast<std::size_t>(expert)][w] = std::move(f32);
      }
    });
    gather_expert_gradients(copy, index, /*sum_copies=*/false);
    if (world_rank(0) != 0) continue;
    const std::string prefix = layer_prefix(options.get_string("prefix"),
                                            state_->layer_ids[static_cast<std::size_t>(index)]);
    tensors.emplace(prefix + "gate.weight", m.gate());
    for (int e = 0; e < m.num_experts(); ++e) {
      for (int w = 0; w < 3; ++w) {
        tensors.emplace(
            expert_tensor_name(format, prefix, e, w),
            std::move(copy.experts[static_cast<std::size_t>(e)][static_cast<std::size_t>(w)]));
      }
    }
    if (format == CheckpointFormat::kDeepseek && !m.bias().empty()) {
      HostTensor bias(DType::kF32, {m.num_experts()});
      std::copy(m.bias().begin(), m.bias().end(), bias.data<float>());
      tensors.emplace(prefix + "gate.e_score_correction_bias", std::move(bias));
    }
    if (m.has_shared_expert()) {  // every rank holds it: this rank's copy, in f32
      const SharedExpertWeights shared = m.shared_expert();
      const TensorView weights[3] = {shared.weights.gate, shared.weights.up, shared.weights.down};
      const TensorView scales[3] = {shared.weights.gate_scale, shared.weights.up_scale,
                                    shared.weights.down_scale};
      for (int w = 0; w < 3; ++w) {
        HostTensor f32(DType::kF32, {weights[w].dim(0), weights[w].dim(1)});
        widen_expert_weight(weights[w], scales[w], f32.data<float>());
        tensors.emplace(m.shared_expert_tensor_name(prefix, w), std::move(f32));
      }
      if (shared.gate.data() != nullptr) {
        HostTensor gate(DType::kF32, {1, m.hidden()});
        std::copy_n(shared.gate.data_as<const float>(), m.hidden(), gate.data<float>());
        tensors.emplace(ModelWeights::shared_expert_gate_name(prefix), std::move(gate));
      }
    }
  }
  if (world_rank(0) == 0) write_safetensors(path, tensors);
}

void Runtime::set_training(bool training) {
  // Training updates the model's tensors: kernels holding copies a rebalance moved view the
  // model's again (the same bytes, checked when they moved).
  if (training) {
    for (int index = 0; index < num_layers(); ++index) {
      for (int local = 0; local < num_local_ranks(); ++local) {
        if (!state_->slot_storage[static_cast<std::size_t>(index)][static_cast<std::size_t>(local)]
                 .empty()) {
          switch_layer(index, local, model_slot_weights(index, local), {});
        }
      }
    }
  }
  state_->training = training;
  state_->layer_inputs_tokens = -1;
  for (auto& layers : state_->layers) {
    for (auto& l : layers) l->set_training(training);
  }
}

void Runtime::backward_model(const TensorView& x, const TensorView& dy, const TensorView& dx,
                             std::vector<ModelGradients>& gradients) {
  const std::int64_t H = model().hidden();
  x.require("input tokens", DType::kF32, {-1, H});
  const std::int64_t T = x.dim(0);
  dy.require("dy", DType::kF32, {T, H});
  dx.require("dx", DType::kF32, {T, H});
  State& s = *state_;
  const int L = num_layers();
  if (L > 1 && s.layer_inputs_tokens != T) {
    throw Error(ErrorCode::kInvalidArgument,
                "backward_model follows a forward_model in training mode (set_training(true)) "
                "on the same " +
                    std::to_string(T) + " tokens; " +
                    (s.layer_inputs_tokens < 0
                         ? std::string("there was none since training was set")
                         : "the last one had " + std::to_string(s.layer_inputs_tokens)));
  }
  gradients.resize(static_cast<std::size_t>(L));
  // Layer l's dx is layer l-1's dy; the first layer's is the caller's dx.
  TensorView upstream = dy;
  for (int index = L - 1; index >= 0; --index) {
    const TensorView in =
        index == 0 ? x : grown_matrix(s.layer_inputs[static_cast<std::size_t>(index - 1)], T, H);
    TensorView out = dx;
    if (index > 0) out = grown_matrix(index % 2 == 0 ? s.chain_grad_out : s.chain_grad_in, T, H);
    backward(in, upstream, out, gradients[static_cast<std::size_t>(index)], index);
    if (residual()) add_rows(upstream, out);  // the identity path's gradient
    upstream = out;
  }
}

void Runtime::combine_backward(ProcessDispatch& dispatched,
                               std::span<const TensorView> expert_outputs, const TensorView& dy,
                               std::span<const TensorView> d_expert_outputs,
                               const TensorView& d_weights) {
  const std::int64_t H = model().hidden();
  if (dispatched.parts.empty()) {
    throw Error(ErrorCode::kInvalidArgument, "combine backward needs a dispatch");
  }
  const int K = dispatched.parts.front().plan.slots;
  dy.require("dy", DType::kF32, {dispatched.num_tokens, H});
  d_weights.require("d_weights", DType::kF32, {dispatched.num_tokens, K});
  require_part_rows(dispatched, expert_outputs, H, "expert output");
  require_part_rows(dispatched, d_expert_outputs, H, "expert output gradient");
  run_blocks(dispatched.num_tokens, /*world_blocks=*/false, dispatched.layer,
             [&](int local, std::int64_t first, std::int64_t count) {
               DispatchPart& part = dispatched.parts[static_cast<std::size_t>(local)];
               const auto i = static_cast<std::size_t>(local);
               layer(local, dispatched.layer)
                   .combine_backward(
                       part.handle, part.plan, expert_outputs[i], rows(dy, first, count),
                       d_expert_outputs[i],
                       TensorView(d_weights.data_as<float>() + first * K, DType::kF32, {count, K}));
             });
}

void Runtime::dispatch_backward(ProcessDispatch& dispatched,
                                std::span<const TensorView> d_expert_inputs, const TensorView& dx) {
  const std::int64_t H = model().hidden();
  dx.require("dx", DType::kF32, {dispatched.num_tokens, H});
  require_part_rows(dispatched, d_expert_inputs, H, "expert input gradient");
  run_on_ranks([&](int local) {
    DispatchPart& part = dispatched.parts[static_cast<std::size_t>(local)];
    layer(local, dispatched.layer)
        .dispatch_backward(part.handle, d_expert_inputs[static_cast<std::size_t>(local)],
                           rows(dx, part.first_token, part.num_tokens));
  });
}

void Runtime::backward(const TensorView& x, const TensorView& dy, const TensorView& dx,
                       ModelGradients& gradients, int layer) {
  backward_blocks(x, dy, dx, gradients, /*world_blocks=*/true, layer);
}

void Runtime::backward_local_tokens(const TensorView& x, const TensorView& dy, const TensorView& dx,
                                    ModelGradients& gradients, int layer) {
  backward_blocks(x, dy, dx, gradients, /*world_blocks=*/false, layer);
}

void Runtime::backward_blocks(const TensorView& x, const TensorView& dy, const TensorView& dx,
                              ModelGradients& gradients, bool world_blocks, int index) {
  check_layer(index, "backward");
  const ModelWeights& m = model(index);
  const std::int64_t H = m.hidden(), F = m.ffn_hidden();
  const int E = m.num_experts();
  // Host tensors, or tensors on the layers' device, which the layers take as they are.
  const Device device = layer(0, index).data_path().device();
  x.require_on(x.device() == device ? device : Device::host(), "input tokens", DType::kF32,
               {-1, H});
  const std::int64_t T = x.dim(0);
  dy.require_on(x.device(), "dy", DType::kF32, {T, H});
  dx.require_on(x.device(), "dx", DType::kF32, {T, H});
  if (x.device() != device) state_->device_rows.resize(static_cast<std::size_t>(num_local_ranks()));
  for (int local = 0; local < num_local_ranks(); ++local) {
    const auto [first, count] = world_blocks ? token_block(T, world_size(), world_rank(local))
                                             : token_block(T, num_local_ranks(), local);
    if (!layer(local, index).backward_ready()) {
      throw Error(ErrorCode::kInvalidArgument,
                  "backward: rank " + std::to_string(world_rank(local)) +
                      " has no forward to differentiate (backward follows a forward on the "
                      "same x, which finished)");
    }
    if (layer(local, index).last_plan().num_tokens != count) {
      throw Error(ErrorCode::kInvalidArgument,
                  "backward: rank " + std::to_string(world_rank(local)) + " holds " +
                      std::to_string(count) + " of these " + std::to_string(T) +
                      " tokens, but its last forward routed " +
                      std::to_string(layer(local, index).last_plan().num_tokens) +
                      " (backward follows a forward on the same x)");
    }
  }
  auto& ranks = state_->rank_gradients;
  ranks.resize(static_cast<std::size_t>(num_local_ranks()));
  for (int local = 0; local < num_local_ranks(); ++local) {
    auto& r = ranks[static_cast<std::size_t>(local)];
    const int experts =
        layer(local, index).placement().num_local(layer(local, index).transport().rank());
    if (r.gate.numel() != E * H) r.gate = HostTensor(DType::kF32, {E, H});
    if (r.experts.views().size() != static_cast<std::size_t>(experts)) {
      r.experts = ExpertGradientStorage(experts, H, F);
    }
    std::fill_n(r.gate.data<float>(), r.gate.numel(), 0.0f);
    r.experts.zero();
    r.scope.resize(static_cast<std::size_t>(E) + 1);
    if (m.has_shared_expert()) {
      const std::int64_t Fs = m.shared_ffn_hidden();
      if (r.shared.tensors().empty() || r.shared.tensors()[0].numel() != Fs * H) {
        r.shared = ExpertGradientStorage(1, H, Fs);
      }
      r.shared.zero();
      if (r.shared_gate.numel() != H) r.shared_gate = HostTensor(DType::kF32, {1, H});
      std::fill_n(r.shared_gate.data<float>(), H, 0.0f);
    }
  }
  run_blocks(T, world_blocks, index, [&](int local, std::int64_t first, std::int64_t count) {
    auto& r = ranks[static_cast<std::size_t>(local)];
    // The losses' scope: the EP group's plain top-k counts and tokens.
    const RouterStats& stats = layer(local, index).router().stats();
    std::copy(stats.aux_counts.begin(), stats.aux_counts.end(), r.scope.begin());
    r.scope[static_cast<std::size_t>(E)] = stats.tokens;
    state_->ep_transports[static_cast<std::size_t>(local)]->allreduce(
        r.scope.data(), r.scope.size(), DType::kI64, ReduceOp::kSum);
    LayerGradients out;
    out.dx = rows(dx, first, count);
    out.d_experts = r.experts.views();
    out.d_gate = r.gate.view();
    out.loss_tokens = r.scope[static_cast<std::size_t>(E)];
    out.loss_aux_counts = {r.scope.data(), static_cast<std::size_t>(E)};
    if (m.has_shared_expert()) {
      out.d_shared_expert = r.shared.views()[0];
      out.d_shared_expert_gate = r.shared_gate.view();
    }
    backward_block(local, index, rows(x, first, count), rows(dy, first, count), out);
    // Deterministic sums (rank order): the gate over the world, experts over the DP group.
    world_transport(local).allreduce(r.gate.data<float>(), static_cast<std::size_t>(E * H),
                                     DType::kF32, ReduceOp::kSum);
    for (auto& t : r.experts.tensors()) {
      dp_transport(local).allreduce(t.data<float>(), static_cast<std::size_t>(t.numel()),
                                    DType::kF32, ReduceOp::kSum);
    }
    // The shared expert: every rank computes it on its own tokens, so its gradients are
    // sums over the world.
    if (m.has_shared_expert()) {
      for (auto& t : r.shared.tensors()) {
        world_transport(local).allreduce(t.data<float>(), static_cast<std::size_t>(t.numel()),
                                         DType::kF32, ReduceOp::kSum);
      }
      world_transport(local).allreduce(r.shared_gate.data<float>(), static_cast<std::size_t>(H),
                                       DType::kF32, ReduceOp::kSum);
    }
  });
  if (gradients.gate.numel() != E * H) gradients.gate = HostTensor(DType::kF32, {E, H});
  std::copy_n(ranks.front().gate.data<float>(), E * H, gradients.gate.data<float>());
  for (HostTensor& t : gradients.shared_expert) t = HostTensor();
  gradients.shared_expert_gate = HostTensor();
  if (m.has_shared_expert()) {
    const auto& shared = ranks.front().shared.tensors();
    for (std::size_t w = 0; w < 3; ++w) gradients.shared_expert[w] = shared[w];
    if (m.shared_expert().gate.data() != nullptr) {
      gradients.shared_expert_gate = ranks.front().shared_gate;
    }
  }
  // Each slot's gradients into its expert's: copies of a replicated expert summed, in slot
  // order (the same order on every run, whatever the rank count).
  gradients.experts.resize(static_cast<std::size_t>(E));
  // A slot's DP replicas (the same EP rank in other EP groups) hold the same sums: each
  // slot counts once.
  std::vector<bool> touched(static_cast<std::size_t>(E), false);
  std::vector<bool> slot_done(static_cast<std::size_t>(layer(0, index).placement().num_experts()),
                              false);
  for (int local = 0; local < num_local_ranks(); ++local) {
    const MoELayer& l = layer(local, index);
    const int first_slot = l.placement().first_expert(l.transport().rank());
    const auto& r = ranks[static_cast<std::size_t>(local)];
    for (std::size_t j = 0; j < r.experts.views().size(); ++j) {
      const auto slot = static_cast<std::size_t>(first_slot) + j;
      if (slot_done[slot]) continue;
      slot_done[slot] = true;
      add_slot_gradient(gradients, touched, expert_of_slot(index, first_slot + static_cast<int>(j)),
                        &r.experts.tensors()[3 * j]);
    }
  }
}

int Runtime::expert_of_slot(int index, int slot) const {
  return state_->slot_maps[static_cast<std::size_t>(index)].expert_of(slot);
}

void Runtime::add_slot_gradient(ModelGradients& gradients, std::vector<bool>& touched, int expert,
                                const HostTensor* slot_tensors) {
  auto& into = gradients.experts[static_cast<std::size_t>(expert)];
  const bool first = !touched[static_cast<std::size_t>(expert)];
  touched[static_cast<std::size_t>(expert)] = true;
  for (std::size_t w = 0; w < 3; ++w) {
    const HostTensor& from = slot_tensors[w];
    if (into[w].numel() != from.numel()) into[w] = HostTensor(DType::kF32, from.shape());
    float* to = into[w].data<float>();
    const float* add = from.data<float>();
    if (first) {
      std::copy_n(add, from.numel(), to);
    } else {
      for (std::int64_t i = 0; i < from.numel(); ++i) to[i] += add[i];
    }
  }
}

void Runtime::backward_block(int local, int index, const TensorView& x, const TensorView& dy,
                             LayerGradients& out) {
  MoELayer& l = layer(local, index);
  DataPath& path = l.data_path();
  if (x.device() == path.device()) {
    l.backward(x, dy, out);
    return;
  }
  // Host tensors, device layer: through device buffers of this rank (grown once).
  auto& d = state_->device_rows.at(static_cast<std::size_t>(local));
  if (!d) d = std::make_unique<State::DeviceRows>();
  const TensorView host_dx = out.dx;
  out.dx = device_matrix(d->dx, path, host_dx.dim(0), host_dx.dim(1));
  l.backward(device_copy(d->x, path, x, l.stream()), device_copy(d->dy, path, dy, l.stream()), out);
  copy_back(path, out.dx, host_dx, l.stream());
  out.dx = host_dx;
}

}  // namespace switchyard
