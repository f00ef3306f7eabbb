// The expert-parallel load balancer. Loads are compared as float32, as the published
// algorithm computes them, so that ties fall the same way; every choice takes the first of
// equals (the earliest expert in load order, the lowest-numbered pack).
#include "switchyard/expert_balancer.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>

#include "switchyard/status.hpp"

namespace switchyard {

namespace {

/// Where `balanced_packing` put each item: its pack and its place in the pack.
struct Packing {
  std::vector<int> pack, place;
};

/// Packs n weighted items into `packs` packs of n / packs items each: heaviest item first,
/// each into the lightest pack that still has room.
Packing balanced_packing(std::span<const float> weight, int packs) {
  const auto n = static_cast<int>(weight.size());
  const int per_pack = n / packs;
  Packing out{std::vector<int>(weight.size()), std::vector<int>(weight.size(), 0)};
  if (per_pack == 1) {
    std::iota(out.pack.begin(), out.pack.end(), 0);
    return out;
  }
  std::vector<int> order(weight.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    return weight[static_cast<std::size_t>(a)] > weight[static_cast<std::size_t>(b)];
  });
  std::vector<float> pack_weight(static_cast<std::size_t>(packs), 0.0f);
  std::vector<int> pack_items(static_cast<std::size_t>(packs), 0);
  for (const int item : order) {
    int lightest = -1;
    for (int p = 0; p < packs; ++p) {
      const auto at = static_cast<std::size_t>(p);
      if (pack_items[at] == per_pack) continue;
      if (lightest < 0 || pack_weight[at] < pack_weight[static_cast<std::size_t>(lightest)])
        lightest = p;
    }
    const auto at = static_cast<std::size_t>(lightest);
    out.pack[static_cast<std::size_t>(item)] = lightest;
    out.place[static_cast<std::size_t>(item)] = pack_items[at]++;
    pack_weight[at] += weight[static_cast<std::size_t>(item)];
  }
  return out;
}

/// `physical` slots for the experts of `weight`: one each, then each further slot to the
/// expert with the highest load per copy.
struct Replicas {
  std::vector<int> expert_of_slot, replica_of_slot, copies;
};

Replicas replicate(std::span<const float> weight, int physical) {
  const auto n = static_cast<int>(weight.size());
  Replicas out;
  out.expert_of_slot.resize(static_cast<std::size_t>(physical));
  out.replica_of_slot.assign(static_cast<std::size_t>(physical), 0);
  out.copies.assign(weight.size(), 1);
  std::iota(out.expert_of_slot.begin(), out.expert_of_slot.begin() + n, 0);
  for (int slot = n; slot < physical; ++slot) {
    int best = 0;
    float most = weight[0] / static_cast<float>(out.copies[0]);
    for (int e = 1; e < n; ++e) {
      const float per_copy = weight[static_cast<std::size_t>(e)] /
                             static_cast<float>(out.copies[static_cast<std::size_t>(e)]);
      if (per_copy > most) {
        most = per_copy;
        best = e;
      }
    }
    out.expert_of_slot[static_cast<std::size_t>(slot)] = best;
    out.replica_of_slot[static_cast<std::size_t>(slot)] =
        out.copies[static_cast<std::size_t>(best)]++;
  }
  return out;
}

/// The inverse of a permutation.
std::vector<int> inverse(std::span<const int> permutation) {
  std::vector<int> out(permutation.size());
  for (std::size_t i = 0; i < permutation.size(); ++i)
    out[static_cast<std::size_t>(permutation[i])] = static_cast<int>(i);
  return out;
}

/// The hierarchical plan: groups of experts packed onto nodes, replicas made within each
/// node, the node's slots packed onto its ranks. One node and one group: the global plan.
ExpertSlots hierarchical(std::span<const float> weight, int physical, int groups, int nodes,
                         int ranks) {
  const auto E = static_cast<int>(weight.size());
  const int group_size = E / groups, groups_per_node = groups / nodes;
  const int slots_per_rank = physical / ranks, experts_per_node = E / nodes;
  const int slots_per_node = physical / nodes, ranks_per_node = ranks / nodes;
  // 1. Groups onto nodes by their summed load. A node's experts are renumbered ("node
  //    order") so that node k holds [k·E/nodes, (k+1)·E/nodes).
  std::vector<float> group_load(static_cast<std::size_t>(groups), 0.0f);
  for (int e = 0; e < E; ++e)
    group_load[static_cast<std::size_t>(e / group_size)] += weight[static_cast<std::size_t>(e)];
  const Packing group_packing = balanced_packing(group_load, nodes);
  std::vector<int> node_order_of(weight.size());
  for (int e = 0; e < E; ++e) {
    const auto g = static_cast<std::size_t>(e / group_size);
    node_order_of[static_cast<std::size_t>(e)] =
        (group_packing.pack[g] * groups_per_node + group_packing.place[g]) * group_size +
        e % group_size;
  }
  const std::vector<int> expert_at = inverse(node_order_of);
  ExpertSlots out;
  out.num_experts = E;
  out.slots_per_rank = slots_per_rank;
  out.expert_of_slot.resize(static_cast<std::size_t>(physical));
  out.replica_of_slot.resize(static_cast<std::size_t>(physical));
  out.copies.resize(weight.size());
  for (int node = 0; node < nodes; ++node) {
    // 2. Replicas within the node.
    std::vector<float> node_load(static_cast<std::size_t>(experts_per_node));
    const int first_of_node = node * experts_per_node;
    auto expert_of = [&](int i) {
      const int at = first_of_node + i;
      return static_cast<std::size_t>(expert_at[static_cast<std::size_t>(at)]);
    };
    for (int i = 0; i < experts_per_node; ++i)
      node_load[static_cast<std::size_t>(i)] = weight[expert_of(i)];
    const Replicas replicas = replicate(node_load, slots_per_node);
    // 3. The node's slots onto its ranks by load per copy.
    std::vector<float> slot_load(static_cast<std::size_t>(slots_per_node));
    for (int s = 0; s < slots_per_node; ++s) {
      const auto i = static_cast<std::size_t>(replicas.expert_of_slot[static_cast<std::size_t>(s)]);
      slot_load[static_cast<std::size_t>(s)] =
          node_load[i] / static_cast<float>(replicas.copies[i]);
    }
    const Packing slot_packing = balanced_packing(slot_load, ranks_per_node);
    for (int s = 0; s < slots_per_node; ++s) {
      const auto at = static_cast<std::size_t>(s);
      const int placed =
          node * slots_per_node + slot_packing.pack[at] * slots_per_rank + slot_packing.place[at];
      out.expert_of_slot[static_cast<std::size_t>(placed)] =
          static_cast<int>(expert_of(replicas.expert_of_slot[at]));
      out.replica_of_slot[static_cast<std::size_t>(placed)] = replicas.replica_of_slot[at];
    }
    for (int i = 0; i < experts_per_node; ++i) {
      out.copies[expert_of(i)] = replicas.copies[static_cast<std::size_t>(i)];
    }
  }
  return out;
}

/// A max-flow network (Dinic's algorithm) with real capacities: small (experts + ranks + 2
/// nodes), built once per split and reused for every bound of the bisection.
class FlowNetwork {
 public:
  explicit FlowNetwork(int nodes) : first_(static_cast<std::size_t>(nodes), -1) {}
  /// An edge from → to of capacity `capacity`; its index (the reverse edge is index + 1).
  int add_edge(int from, int to, double capacity) {
    edges_.push_back({to, first_[static_cast<std::size_t>(from)], capacity, 0});
    first_[static_cast<std::size_t>(from)] = static_cast<int>(edges_.size()) - 1;
    edges_.push_back({from, first_[static_cast<std::size_t>(to)], 0, 0});
    first_[static_cast<std::size_t>(to)] = static_cast<int>(edges_.size()) - 1;
    return static_cast<int>(edges_.size()) - 2;
  }
  void set_capacity(int edge, double capacity) {
    edges_[static_cast<std::size_t>(edge)].capacity = capacity;
  }
  double flow(int edge) const { return edges_[static_cast<std::size_t>(edge)].flow; }
  /// The maximum flow from `source` to `sink` (flows start from 0).
  double max_flow(int source, int sink) {
    for (Edge& e : edges_) e.flow = 0;
    double total = 0;
    while (levels(source, sink)) {
      next_ = first_;
      for (double pushed = push(source, sink, kUnbounded); pushed > 0;
           pushed = push(source, sink, kUnbounded)) {
        total += pushed;
      }
    }
    return total;
  }
  static constexpr double kUnbounded = 1e300;

 private:
  struct Edge {
    int to, next;
    double capacity, flow;
  };
  static constexpr double kEpsilon = 1e-12;
  double residual(const Edge& e) const { return e.capacity - e.flow; }
  bool levels(int source, int sink) {
    level_.assign(first_.size(), -1);
    std::vector<int> queue{source};
    level_[static_cast<std::size_t>(source)] = 0;
    for (std::size_t i = 0; i < queue.size(); ++i) {
      const int u = queue[i];
      for (int e = first_[static_cast<std::size_t>(u)]; e >= 0;
           e = edges_[static_cast<std::size_t>(e)].next) {
        const Edge& edge = edges_[static_cast<std::size_t>(e)];
        if (residual(edge) > kEpsilon && level_[static_cast<std::size_t>(edge.to)] < 0) {
          level_[static_cast<std::size_t>(edge.to)] = level_[static_cast<std::size_t>(u)] + 1;
          queue.push_back(edge.to);
        }
      }
    }
    return level_[static_cast<std::size_t>(sink)] >= 0;
  }
  double push(int u, int sink, double limit) {
    if (u == sink) return limit;
    for (int& e = next_[static_cast<std::size_t>(u)]; e >= 0;
         e = edges_[static_cast<std::size_t>(e)].next) {
      Edge& edge = edges_[static_cast<std::size_t>(e)];
      if (residual(edge) <= kEpsilon ||
          level_[static_cast<std::size_t>(edge.to)] != level_[static_cast<std::size_t>(u)] + 1) {
        continue;
      }
      const double pushed = push(edge.to, sink, std::min(limit, residual(edge)));
      if (pushed > 0) {
        edge.flow += pushed;
        edges_[static_cast<std::size_t>(e ^ 1)].flow -= pushed;
        return pushed;
      }
    }
    return 0;
  }
  std::vector<Edge> edges_;
  std::vector<int> first_, next_, level_;
};

}  // namespace

void split_expert_load(ExpertSlots& slots, std::span<const double> load) {
  const int E = slots.num_experts, R = slots.num_ranks(), S = slots.num_slots();
  slots.share_of_slot.assign(static_cast<std::size_t>(S), 0.0);
  for (int s = 0; s < S; ++s) {
    const auto e = static_cast<std::size_t>(slots.expert_of_slot[static_cast<std::size_t>(s)]);
    slots.share_of_slot[static_cast<std::size_t>(s)] = 1.0 / slots.copies[e];
  }
  double total = 0;
  for (int e = 0; e < E; ++e) total += load[static_cast<std::size_t>(e)];
  if (total <= 0 || R < 2) return;
  // Source → expert (its load) → each rank holding a copy (unbounded) → sink (the bound).
  const int source = 0, sink = E + R + 1;
  FlowNetwork network(E + R + 2);
  std::vector<int> expert_edge(static_cast<std::size_t>(E), -1),
      rank_edge(static_cast<std::size_t>(R));
  for (int e = 0; e < E; ++e) {
    if (load[static_cast<std::size_t>(e)] > 0)
      expert_edge[static_cast<std::size_t>(e)] =
          network.add_edge(source, 1 + e, load[static_cast<std::size_t>(e)]);
  }
  // One edge per (expert, rank) pair holding it, in slot order.
  std::vector<int> pair_edge(static_cast<std::size_t>(S), -1);
  for (int s = 0; s < S; ++s) {
    const int e = slots.expert_of_slot[static_cast<std::size_t>(s)], r = s / slots.slots_per_rank;
    int same = -1;
    for (int t = r * slots.slots_per_rank; t < s; ++t) {
      if (slots.expert_of_slot[static_cast<std::size_t>(t)] == e)
        same = pair_edge[static_cast<std::size_t>(t)];
    }
    pair_edge[static_cast<std::size_t>(s)] =
        same >= 0 ? same : network.add_edge(1 + e, 1 + E + r, FlowNetwork::kUnbounded);
  }
  for (int r = 0; r < R; ++r)
    rank_edge[static_cast<std::size_t>(r)] = network.add_edge(1 + E + r, sink, 0);
  auto feasible = [&](double bound) {
    for (const int edge : rank_edge) network.set_capacity(edge, bound);
    return network.max_flow(source, sink) >= total * (1 - 1e-12);
  };
  const std::vector<double> even = rank_loads(slots, load);
  double low = total / R, high = *std::max_element(even.begin(), even.end());
  if (feasible(low)) {
    high = low;
  } else {
    while (high - low > total * 1e-9) {
      const double middle = 0.5 * (low + high);
      (feasible(middle) ? high : low) = middle;
    }
  }
  feasible(high);
  // Each (expert, rank) pair's flow, over the expert's load, split over its copies there.
  std::vector<int> copies_on_edge(
      static_cast<std::size_t>(*std::max_element(pair_edge.begin(), pair_edge.end()) + 1), 0);
  for (const int edge : pair_edge) ++copies_on_edge[static_cast<std::size_t>(edge)];
  for (int s = 0; s < S; ++s) {
    const auto e = static_cast<std::size_t>(slots.expert_of_slot[static_cast<std::size_t>(s)]);
    if (load[e] <= 0) continue;
    slots.share_of_slot[static_cast<std::size_t>(s)] =
        network.flow(pair_edge[static_cast<std::size_t>(s)]) / load[e] /
        copies_on_edge[static_cast<std::size_t>(pair_edge[static_cast<std::size_t>(s)])];
  }
}

ExpertSlots balance_experts(std::span<const double> load, const ExpertBalanceShape& shape) {
  const auto E = static_cast<int>(load.size());
  if (E == 0) throw Error(ErrorCode::kInvalidArgument, "expert balancer: no experts' load");
  if (shape.num_ranks < 1 || shape.num_nodes < 1 || shape.num_groups < 1 ||
      shape.redundant_experts < 0) {
    throw Error(ErrorCode::kInvalidArgument,
                "expert balancer: ranks, nodes and groups must be >= 1 and redundant experts "
                ">= 0, not " +
                    std::to_string(shape.num_ranks) + ", " + std::to_string(shape.num_nodes) +
                    ", " + std::to_string(shape.num_groups) + ", " +
                    std::to_string(shape.redundant_experts));
  }
  std::vector<float> weight(load.size());
  for (std::size_t e = 0; e < load.size(); ++e) {
    if (!(load[e] >= 0) || !std::isfinite(load[e])) {
      throw Error(ErrorCode::kInvalidArgument, "expert balancer: expert " + std::to_string(e) +
                                                   "'s load is " + std::to_string(load[e]) +
                                                   ", not a finite number >= 0");
    }
    weight[e] = static_cast<float>(load[e]);
  }
  const int R = shape.num_ranks;
  const int physical = (E + shape.redundant_experts + R - 1) / R * R;
  const bool by_nodes = shape.num_nodes > 1 && shape.num_groups % shape.num_nodes == 0 &&
                        E % shape.num_groups == 0 && R % shape.num_nodes == 0;
  ExpertSlots slots = by_nodes
                          ? hierarchical(weight, physical, shape.num_groups, shape.num_nodes, R)
                          : hierarchical(weight, physical, 1, 1, R);
  split_expert_load(slots, load);
  return slots;
}

std::vector<double> rank_loads(const ExpertSlots& slots, std::span<const double> load) {
  std::vector<double> out(static_cast<std::size_t>(slots.num_ranks()), 0.0);
  for (int s = 0; s < slots.num_slots(); ++s) {
    const auto at = static_cast<std::size_t>(s);
    const auto e = static_cast<std::size_t>(slots.expert_of_slot[at]);
    const double share =
        slots.share_of_slot.empty() ? 1.0 / slots.copies[e] : slots.share_of_slot[at];
    out[static_cast<std::size_t>(s / slots.slots_per_rank)] += load[e] * share;
  }
  return out;
}

double load_imbalance(std::span<const double> rank_load) {
  if (rank_load.empty()) return 0;
  double most = 0, total = 0;
  for (const double l : rank_load) {
    most = std::max(most, l);
    total += l;
  }
  return total > 0 ? most * static_cast<double>(rank_load.size()) / total : 0.0;
}

}  // namespace switchyard
