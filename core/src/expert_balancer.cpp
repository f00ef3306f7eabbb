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
  /// The nodes `from` reaches through edges with residual capacity.
  std::vector<bool> reachable(int from) const {
    std::vector<bool> reached(first_.size(), false);
    std::vector<int> queue{from};
    reached[static_cast<std::size_t>(from)] = true;
    for (std::size_t i = 0; i < queue.size(); ++i) {
      for (int e = first_[static_cast<std::size_t>(queue[i])]; e >= 0;
           e = edges_[static_cast<std::size_t>(e)].next) {
        const Edge& edge = edges_[static_cast<std::size_t>(e)];
        if (residual(edge) > kEpsilon && !reached[static_cast<std::size_t>(edge.to)]) {
          reached[static_cast<std::size_t>(edge.to)] = true;
          queue.push_back(edge.to);
        }
      }
    }
    return reached;
  }
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

/// The min-max split of each expert's load over the ranks that hold its copies: source →
/// expert (its load) → each rank holding a copy (unbounded) → sink (the bound on a rank's
/// load). The bound is feasible when the maximum flow carries the whole load.
class LoadSplit {
 public:
  LoadSplit(const ExpertSlots& slots, std::span<const double> load)
      : load_(load),
        experts_(slots.num_experts),
        ranks_(slots.num_ranks()),
        network_(experts_ + ranks_ + 2),
        pair_edge_(static_cast<std::size_t>(slots.num_slots()), -1),
        rank_edge_(static_cast<std::size_t>(ranks_)) {
    for (int e = 0; e < experts_; ++e) {
      total_ += load_[static_cast<std::size_t>(e)];
      if (load_[static_cast<std::size_t>(e)] > 0)
        network_.add_edge(source_, 1 + e, load_[static_cast<std::size_t>(e)]);
    }
    // One edge per (expert, rank) pair holding it, in slot order.
    const int S = slots.num_slots(), per_rank = slots.slots_per_rank;
    for (int s = 0; s < S; ++s) {
      const int e = slots.expert_of_slot[static_cast<std::size_t>(s)], r = s / per_rank;
      int same = -1;
      for (int t = r * per_rank; t < s; ++t) {
        if (slots.expert_of_slot[static_cast<std::size_t>(t)] == e)
          same = pair_edge_[static_cast<std::size_t>(t)];
      }
      pair_edge_[static_cast<std::size_t>(s)] =
          same >= 0 ? same : network_.add_edge(1 + e, 1 + experts_ + r, FlowNetwork::kUnbounded);
    }
    for (int r = 0; r < ranks_; ++r)
      rank_edge_[static_cast<std::size_t>(r)] = network_.add_edge(1 + experts_ + r, sink(), 0);
  }

  double total() const noexcept { return total_; }

  /// Whether some split keeps every rank at or below `bound` (the network keeps that flow).
  bool feasible(double bound) {
    for (const int edge : rank_edge_) network_.set_capacity(edge, bound);
    return network_.max_flow(source_, sink()) >= total_ * (1 - 1e-12);
  }

  /// The smallest feasible bound, within 1e-9 of the total load, at most `above` (a
  /// feasible bound: e.g. the most loaded rank under even shares).
  double min_bound(double above) {
    double low = total_ / ranks_, high = above;
    if (feasible(low)) return low;
    while (high - low > total_ * 1e-9) {
      const double middle = 0.5 * (low + high);
      (feasible(middle) ? high : low) = middle;
    }
    return high;
  }

  /// After `feasible` failed: the ranks the source still reaches through unsaturated edges
  /// (the overloaded side of a minimum cut), whose experts have nowhere else to go.
  std::vector<bool> overloaded_ranks() const {
    const std::vector<bool> reached = network_.reachable(source_);
    std::vector<bool> out(static_cast<std::size_t>(ranks_));
    for (int r = 0; r < ranks_; ++r) {
      const int node = 1 + experts_ + r;
      out[static_cast<std::size_t>(r)] = reached[static_cast<std::size_t>(node)];
    }
    return out;
  }

  /// The shares of the flow the last `feasible` left: each (expert, rank) pair's flow over
  /// the expert's load, split evenly over its copies on that rank.
  void write_shares(ExpertSlots& slots) const {
    std::vector<int> copies_on_edge(
        static_cast<std::size_t>(*std::max_element(pair_edge_.begin(), pair_edge_.end()) + 1), 0);
    for (const int edge : pair_edge_) ++copies_on_edge[static_cast<std::size_t>(edge)];
    slots.share_of_slot.resize(static_cast<std::size_t>(slots.num_slots()));
    for (int s = 0; s < slots.num_slots(); ++s) {
      const auto e = static_cast<std::size_t>(slots.expert_of_slot[static_cast<std::size_t>(s)]);
      slots.share_of_slot[static_cast<std::size_t>(s)] = 1.0 / slots.copies[e];
      if (load_[e] <= 0) continue;
      const int edge = pair_edge_[static_cast<std::size_t>(s)];
      slots.share_of_slot[static_cast<std::size_t>(s)] =
          network_.flow(edge) / load_[e] / copies_on_edge[static_cast<std::size_t>(edge)];
    }
  }

 private:
  int sink() const noexcept { return experts_ + ranks_ + 1; }
  std::span<const double> load_;
  int experts_, ranks_;
  FlowNetwork network_;
  std::vector<int> pair_edge_, rank_edge_;
  double total_ = 0;
  static constexpr int source_ = 0;
};

/// Each rank's load with every expert's load split evenly over its copies.
double most_loaded_evenly(const ExpertSlots& slots, std::span<const double> load) {
  ExpertSlots even = slots;
  even.share_of_slot.clear();
  const std::vector<double> loads = rank_loads(even, load);
  return *std::max_element(loads.begin(), loads.end());
}

/// Numbers each expert's copies 0, 1, ... in slot order.
void renumber_replicas(ExpertSlots& slots) {
  std::vector<int> next(static_cast<std::size_t>(slots.num_experts), 0);
  for (int s = 0; s < slots.num_slots(); ++s) {
    const auto at = static_cast<std::size_t>(s);
    slots.replica_of_slot[at] = next[static_cast<std::size_t>(slots.expert_of_slot[at])]++;
  }
}

}  // namespace

void split_expert_load(ExpertSlots& slots, std::span<const double> load) {
  const auto S = static_cast<std::size_t>(slots.num_slots());
  slots.share_of_slot.resize(S);
  for (std::size_t s = 0; s < S; ++s)
    slots.share_of_slot[s] = 1.0 / slots.copies[static_cast<std::size_t>(slots.expert_of_slot[s])];
  if (slots.num_ranks() < 2) return;
  LoadSplit split(slots, load);
  if (split.total() <= 0) return;
  split.feasible(split.min_bound(most_loaded_evenly(slots, load)));
  split.write_shares(slots);
}

int refine_expert_slots(ExpertSlots& slots, std::span<const double> load, int ranks_per_block) {
  const int R = slots.num_ranks(), per_rank = slots.slots_per_rank;
  if (R < 2 || ranks_per_block < 2 || R % ranks_per_block != 0) return 0;
  const auto rank_of = [per_rank](int slot) { return slot / per_rank; };
  const auto holds = [&](int rank, int expert) {
    for (int s = rank * per_rank; s < (rank + 1) * per_rank; ++s)
      if (slots.expert_of_slot[static_cast<std::size_t>(s)] == expert) return true;
    return false;
  };
  int swaps = 0;
  // Each swap strictly lowers the bound, so the loop ends; the cap bounds its time.
  for (int round = 0; round < 4 * slots.num_slots(); ++round) {
    LoadSplit split(slots, load);
    if (split.total() <= 0) break;
    const double bound = split.min_bound(most_loaded_evenly(slots, load));
    if (bound <= split.total() / R * (1 + 1e-6)) break;
    split.feasible(bound);
    ExpertSlots current = slots;
    split.write_shares(current);
    const std::vector<double> loads = rank_loads(current, load);
    // Just below the bound, the cut: the overloaded ranks and, through the flow, every
    // expert confined to them.
    split.feasible(bound * (1 - 1e-6));
    const std::vector<bool> overloaded = split.overloaded_ranks();
    // Candidates to move out: copies on overloaded ranks, highest load per copy first.
    // Candidates to move in: the lightest slot of each rank outside the cut, least loaded
    // rank first, in the same block (node) as the overloaded rank.
    std::vector<int> out_slots, in_ranks;
    for (int s = 0; s < slots.num_slots(); ++s)
      if (overloaded[static_cast<std::size_t>(rank_of(s))]) out_slots.push_back(s);
    for (int r = 0; r < R; ++r)
      if (!overloaded[static_cast<std::size_t>(r)]) in_ranks.push_back(r);
    const auto per_copy = [&](int s) {
      const auto e = static_cast<std::size_t>(slots.expert_of_slot[static_cast<std::size_t>(s)]);
      return load[e] / slots.copies[e];
    };
    std::stable_sort(out_slots.begin(), out_slots.end(),
                     [&](int a, int b) { return per_copy(a) > per_copy(b); });
    std::stable_sort(in_ranks.begin(), in_ranks.end(), [&](int a, int b) {
      return loads[static_cast<std::size_t>(a)] < loads[static_cast<std::size_t>(b)];
    });
    bool improved = false;
    constexpr int kTries = 8;
    for (int i = 0; i < std::min<int>(kTries, static_cast<int>(out_slots.size())) && !improved;
         ++i) {
      const int from = out_slots[static_cast<std::size_t>(i)];
      const int moving = slots.expert_of_slot[static_cast<std::size_t>(from)];
      int tried = 0;
      for (const int to_rank : in_ranks) {
        if (tried == kTries) break;
        if (to_rank / ranks_per_block != rank_of(from) / ranks_per_block || holds(to_rank, moving))
          continue;
        // The lightest expert of that rank that the overloaded rank does not hold.
        int to = -1;
        for (int s = to_rank * per_rank; s < (to_rank + 1) * per_rank; ++s) {
          const int e = slots.expert_of_slot[static_cast<std::size_t>(s)];
          if (holds(rank_of(from), e)) continue;
          if (to < 0 || load[static_cast<std::size_t>(e)] <
                            load[static_cast<std::size_t>(
                                slots.expert_of_slot[static_cast<std::size_t>(to)])])
            to = s;
        }
        if (to < 0) continue;
        ++tried;
        std::swap(slots.expert_of_slot[static_cast<std::size_t>(from)],
                  slots.expert_of_slot[static_cast<std::size_t>(to)]);
        LoadSplit trial(slots, load);
        if (trial.feasible(bound * (1 - 1e-4))) {
          improved = true;
          ++swaps;
          break;
        }
        std::swap(slots.expert_of_slot[static_cast<std::size_t>(from)],
                  slots.expert_of_slot[static_cast<std::size_t>(to)]);
      }
    }
    if (!improved) break;
  }
  if (swaps > 0) renumber_replicas(slots);
  split_expert_load(slots, load);
  return swaps;
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
  if (shape.refine)
    refine_expert_slots(slots, load, by_nodes ? R / shape.num_nodes : R);
  else
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
