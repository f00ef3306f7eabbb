// Runtime: rebalancing the experts' placement while running. The load the layers measured
// is summed over the world, the expert balancer plans new slots from it (the same plan on
// every rank: the same numbers in, no rank-local input), the weights of the slots that
// change rank move over each EP group's transport, and only when every rank has its new
// weights do the layers switch, all together.
#include <algorithm>
#include <cstring>
#include <optional>
#include <string>

#include "runtime_internal.hpp"
#include "switchyard/expert_balancer.hpp"
#include "switchyard/plugin.hpp"
#include "switchyard/status.hpp"

namespace switchyard {

namespace {

/// The six matrices of one expert's weights (gate, up, down, and their FP8 block scales,
/// empty for other dtypes), in the order they travel.
std::array<const TensorView*, 6> matrices(const SwigluExpertWeights& w) {
  return {&w.gate, &w.up, &w.down, &w.gate_scale, &w.up_scale, &w.down_scale};
}

/// Bytes of a contiguous view (0 for an empty one).
std::size_t bytes_of(const TensorView& m) {
  return m.data() == nullptr ? 0 : static_cast<std::size_t>(m.numel()) * dtype_size(m.dtype());
}

std::size_t expert_bytes(const SwigluExpertWeights& w) {
  std::size_t bytes = 0;
  for (const TensorView* m : matrices(w)) bytes += bytes_of(*m);
  return bytes;
}

/// The expert each slot of EP rank `rank` holds under `map` (identity when empty).
std::vector<int> experts_on(const ExpertSlotMap& map, const ExpertPlacement& slots, int rank) {
  std::vector<int> out;
  for (int s = slots.first_expert(rank); s < slots.first_expert(rank) + slots.num_local(rank); ++s)
    out.push_back(map.expert_of(s));
  return out;
}

}  // namespace

namespace runtime_detail {

ExpertBalanceShape balance_shape(const ConfigSection& router, const Topology& world, int ep,
                                 int redundant) {
  ExpertBalanceShape shape;
  shape.num_ranks = ep;
  shape.redundant_experts = redundant;
  std::vector<int> nodes;
  for (int r = 0; r < ep && r < world.size(); ++r) nodes.push_back(world.node_of(r));
  std::sort(nodes.begin(), nodes.end());
  shape.num_nodes =
      std::max<int>(1, static_cast<int>(std::unique(nodes.begin(), nodes.end()) - nodes.begin()));
  for (const ConfigSection::Entry& entry : router.entries()) {
    if (entry.key->name == "num_groups" && entry.value)
      shape.num_groups = std::max(1, static_cast<int>(router.get_int("num_groups")));
  }
  return shape;
}

}  // namespace runtime_detail

std::vector<SwigluExpertWeights> Runtime::model_slot_weights(int index, int local) const {
  const ExpertSlotMap& map = state_->slot_maps[static_cast<std::size_t>(index)];
  const ExpertPlacement& slots = state_->placement;
  const int rank = state_->ep_transports[static_cast<std::size_t>(local)]->rank();
  std::vector<SwigluExpertWeights> out;
  for (const int e : experts_on(map, slots, rank))
    out.push_back(model(index).experts(e, 1).front());
  return out;
}

void Runtime::switch_layer(int index, int local, std::vector<SwigluExpertWeights> views,
                           std::vector<HostTensor> storage) {
  const ConfigSection& experts_section = settings().section("experts");
  const ModelWeights& model_weights = model(index);
  MoELayer& old = layer(local, index);
  MoELayerParts parts = old.parts();
  ExpertCreateArgs args;
  args.options = &experts_section;
  args.hidden = static_cast<int>(model_weights.hidden());
  args.ffn_hidden = static_cast<int>(model_weights.ffn_hidden());
  args.experts = views;
  parts.experts = state_->registry->create_expert(experts_section.get_string("kernel"), args);
  parts.slot_map = state_->slot_maps[static_cast<std::size_t>(index)];
  const bool training = old.training();
  auto& slot = state_->layers[static_cast<std::size_t>(index)][static_cast<std::size_t>(local)];
  slot = std::make_unique<MoELayer>(std::move(parts));
  slot->set_training(training);
  state_->slot_weights[static_cast<std::size_t>(index)][static_cast<std::size_t>(local)] =
      std::move(views);
  state_->slot_storage[static_cast<std::size_t>(index)][static_cast<std::size_t>(local)] =
      std::move(storage);
}

std::vector<RebalanceReport> Runtime::rebalance() {
  // Checked alike on every rank, before any collective.
  for (int local = 0; local < num_local_ranks(); ++local) {
    if (layer(local).data_path().device().kind != Device::Kind::kHost) {
      throw Error(ErrorCode::kUnavailable,
                  "rebalance: a shuffled or replicated placement runs on the host data path");
    }
  }
  const int ep = ep_size();
  std::vector<RebalanceReport> reports;
  // Every layer's weights move first; the layers switch only when all have moved.
  struct Pending {
    ExpertSlotMap next;
    std::vector<std::vector<HostTensor>> storage;         // per local rank
    std::vector<std::vector<SwigluExpertWeights>> views;  // per local rank
  };
  std::vector<Pending> pending(static_cast<std::size_t>(num_layers()));
  for (int index = 0; index < num_layers(); ++index) {
    const ModelWeights& model_weights = model(index);
    const int E = model_weights.num_experts();
    const ExpertPlacement& slots = state_->placement;
    const int S = slots.num_experts();
    RebalanceReport report;
    report.layer = index;
    report.slots = S;

    // 1. The load since the last rebalance, summed over the world: [E] per expert, then
    //    [S] per slot (what each rank's slots carried).
    std::vector<std::vector<std::int64_t>> sums(static_cast<std::size_t>(num_local_ranks()));
    run_on_ranks([&](int local) {
      const MoELayer& l = layer(local, index);
      auto& sum = sums[static_cast<std::size_t>(local)];
      sum.assign(static_cast<std::size_t>(E) + static_cast<std::size_t>(S), 0);
      std::copy(l.expert_load().begin(), l.expert_load().end(), sum.begin());
      std::copy(l.slot_load().begin(), l.slot_load().end(), sum.begin() + E);
      world_transport(local).allreduce(sum.data(), sum.size(), DType::kI64, ReduceOp::kSum);
    });
    const std::vector<std::int64_t>& sum = sums.front();
    std::vector<double> load(static_cast<std::size_t>(E)), measured(static_cast<std::size_t>(ep));
    double total = 0;
    for (int e = 0; e < E; ++e)
      total += load[static_cast<std::size_t>(e)] =
          static_cast<double>(sum[static_cast<std::size_t>(e)]);
    for (int s = 0; s < S; ++s)
      measured[static_cast<std::size_t>(slots.rank_of(s))] +=
          static_cast<double>(sum[static_cast<std::size_t>(E) + static_cast<std::size_t>(s)]);
    report.imbalance_before = load_imbalance(measured);
    if (total <= 0) {  // nothing measured: the placement stays
      report.imbalance_planned = report.imbalance_before;
      reports.push_back(report);
      continue;
    }

    // 2. The new slots: as many as now, placed for the measured load.
    const ExpertBalanceShape shape =
        runtime_detail::balance_shape(settings().section("router"), topology(), ep, S - E);
    const ExpertSlots planned = balance_experts(load, shape);
    if (planned.num_slots() != S) {
      throw Error(ErrorCode::kInternal, "rebalance: planned " +
                                            std::to_string(planned.num_slots()) + " slots for " +
                                            std::to_string(S));
    }
    const ExpertSlotMap next(E, planned.expert_of_slot, planned.share_of_slot);
    report.imbalance_planned = load_imbalance(rank_loads(planned, load));
    const ExpertSlotMap& now = state_->slot_maps[static_cast<std::size_t>(index)];

    // 3. The weights of every slot whose rank does not hold its expert now come from the
    //    lowest EP rank that does, over the EP group.
    std::vector<std::vector<int>> held(static_cast<std::size_t>(ep)),
        wanted(static_cast<std::size_t>(ep));
    for (int r = 0; r < ep; ++r) {
      held[static_cast<std::size_t>(r)] = experts_on(now, slots, r);
      wanted[static_cast<std::size_t>(r)] = experts_on(next, slots, r);
    }
    auto holds = [&](int rank, int expert) {
      const auto& h = held[static_cast<std::size_t>(rank)];
      return std::find(h.begin(), h.end(), expert) != h.end();
    };
    auto source_of = [&](int expert) {
      for (int r = 0; r < ep; ++r)
        if (holds(r, expert)) return r;
      return -1;  // every expert has a slot: not reached
    };
    const std::size_t bytes_per_expert =
        expert_bytes(state_->slot_weights[static_cast<std::size_t>(index)].front().front());
    for (int r = 0; r < ep; ++r) {
      for (const int e : wanted[static_cast<std::size_t>(r)])
        if (!holds(r, e)) ++report.moved_experts;
    }
    Pending& move = pending[static_cast<std::size_t>(index)];
    move.next = next;
    auto& storage = move.storage;
    auto& views = move.views;
    storage.resize(static_cast<std::size_t>(num_local_ranks()));
    views.resize(static_cast<std::size_t>(num_local_ranks()));
    std::vector<std::uint64_t> received(static_cast<std::size_t>(num_local_ranks()), 0);
    std::vector<std::optional<Error>> agreed(static_cast<std::size_t>(num_local_ranks()));
    run_on_ranks([&](int local) {
      Transport& group = *state_->ep_transports[static_cast<std::size_t>(local)];
      const int me = group.rank();
      const auto R = static_cast<std::size_t>(ep);
      const auto& mine =
          state_->slot_weights[static_cast<std::size_t>(index)][static_cast<std::size_t>(local)];
      auto my_copy_of = [&](int expert) -> const SwigluExpertWeights& {
        const auto& h = held[static_cast<std::size_t>(me)];
        return mine[static_cast<std::size_t>(std::find(h.begin(), h.end(), expert) - h.begin())];
      };
      std::vector<std::size_t> send_counts(R, 0), send_offsets(R, 0), recv_counts(R, 0),
          recv_offsets(R, 0);
      std::vector<std::byte> send, recv;
      for (int q = 0; q < ep; ++q) {
        send_offsets[static_cast<std::size_t>(q)] = send.size();
        recv_offsets[static_cast<std::size_t>(q)] = recv.size();
        if (q == me) continue;
        for (const int e : wanted[static_cast<std::size_t>(q)]) {
          if (holds(q, e) || source_of(e) != me) continue;
          for (const TensorView* m : matrices(my_copy_of(e))) {
            const auto* from = static_cast<const std::byte*>(m->data());
            send.insert(send.end(), from, from + bytes_of(*m));
          }
        }
        for (const int e : wanted[static_cast<std::size_t>(me)]) {
          if (!holds(me, e) && source_of(e) == q) recv.resize(recv.size() + bytes_per_expert);
        }
        send_counts[static_cast<std::size_t>(q)] =
            send.size() - send_offsets[static_cast<std::size_t>(q)];
        recv_counts[static_cast<std::size_t>(q)] =
            recv.size() - recv_offsets[static_cast<std::size_t>(q)];
      }
      group.alltoallv({send.data(), send_counts, send_offsets, recv.data(), recv_counts,
                       recv_offsets, Device::host()});
      // The new slots' weights in storage of this rank's own: copied from what it holds, or
      // from what arrived (each peer's in the order of this rank's slots).
      auto& out = storage[static_cast<std::size_t>(local)];
      auto& slot_views = views[static_cast<std::size_t>(local)];
      std::vector<std::size_t> next_from(R, 0);
      int diverged = -1;
      const SwigluExpertWeights& shape_of = mine.front();  // every expert's shapes alike
      for (const int e : wanted[static_cast<std::size_t>(me)]) {
        const bool local_copy = holds(me, e);
        const std::byte* from = nullptr;
        if (!local_copy) {
          const auto q = static_cast<std::size_t>(source_of(e));
          from = recv.data() + recv_offsets[q] + next_from[q];
          next_from[q] += bytes_per_expert;
          received[static_cast<std::size_t>(local)] += bytes_per_expert;
          // The bytes must be this process's model's own: a difference means the processes'
          // weights diverged (in training, the kernels then view the model's).
          const SwigluExpertWeights model_copy = model(index).experts(e, 1).front();
          const std::byte* check = from;
          for (const TensorView* m : matrices(model_copy)) {
            if (std::memcmp(check, m->data(), bytes_of(*m)) != 0) diverged = e;
            check += bytes_of(*m);
          }
        }
        SwigluExpertWeights view;
        std::array<TensorView*, 6> into{&view.gate,       &view.up,       &view.down,
                                        &view.gate_scale, &view.up_scale, &view.down_scale};
        const auto source = local_copy ? matrices(my_copy_of(e)) : matrices(shape_of);
        for (std::size_t m = 0; m < 6; ++m) {
          if (bytes_of(*source[m]) == 0) continue;
          HostTensor tensor(
              source[m]->dtype(),
              std::vector<std::int64_t>(source[m]->shape().begin(), source[m]->shape().end()));
          const auto* bytes = local_copy ? static_cast<const std::byte*>(source[m]->data()) : from;
          std::memcpy(tensor.bytes(), bytes, tensor.size_bytes());
          if (!local_copy) from += tensor.size_bytes();
          *into[m] = tensor.view();
          out.push_back(std::move(tensor));
        }
        slot_views.push_back(view);
      }
      // Every rank has its weights before any switches: a rank that failed (or died) fails
      // this sum on every rank, and the previous placement stays.
      std::int64_t ok = diverged < 0 ? 1 : 0;
      world_transport(local).allreduce(&ok, 1, DType::kI64, ReduceOp::kSum);
      // Every rank knows the outcome here: a failure is reported, not thrown through the
      // ranks' threads (which would abort the transports); the runtime stays usable.
      if (diverged >= 0) {
        agreed[static_cast<std::size_t>(local)] =
            Error(ErrorCode::kInternal,
                  "rebalance: expert " + std::to_string(diverged) + "'s weights from rank " +
                      std::to_string(source_of(diverged)) +
                      " differ from this process's model: the processes' weights diverged; the "
                      "placement is unchanged");
      } else if (ok != world_size()) {
        agreed[static_cast<std::size_t>(local)] =
            Error(ErrorCode::kPeerFailed,
                  "rebalance: another rank's weights did not arrive intact; the placement is "
                  "unchanged");
      }
    });

    runtime_detail::throw_agreed_failure(agreed);
    for (const std::uint64_t bytes : received) report.received_bytes += bytes;
    reports.push_back(report);
  }

  // 4. Every rank switches: new kernels over the new slots, the same routers and buffers.
  //    In training the kernels view the model's tensors, which the optimizer updates in
  //    place (`parameters`) and which hold what arrived (checked above).
  for (int index = 0; index < num_layers(); ++index) {
    Pending& move = pending[static_cast<std::size_t>(index)];
    if (move.views.empty()) continue;  // nothing measured: the placement stays
    state_->slot_maps[static_cast<std::size_t>(index)] = move.next;
    for (int local = 0; local < num_local_ranks(); ++local) {
      const auto at = static_cast<std::size_t>(local);
      if (state_->training) {
        switch_layer(index, local, model_slot_weights(index, local), {});
      } else {
        switch_layer(index, local, std::move(move.views[at]), std::move(move.storage[at]));
      }
    }
  }
  return reports;
}

}  // namespace switchyard
