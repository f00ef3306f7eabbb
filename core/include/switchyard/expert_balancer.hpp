#pragma once
/// \file
/// Load balance by replication: where E logical experts go on the physical expert slots of
/// an EP group's ranks, given each expert's measured load. DeepSeek's expert-parallel load
/// balancer (EPLB), written anew: replicate the experts with the highest load per copy,
/// then pack the copies onto ranks so that each rank's load is as even as greedy packing
/// makes it; hierarchically (expert groups to nodes first, then copies to the ranks of a
/// node) when the expert groups divide evenly over the nodes, globally otherwise.

#include <cstdint>
#include <span>
#include <vector>

namespace switchyard {

/// What the balancer is asked for: the group's shape and how many copies to add.
struct ExpertBalanceShape {
  int num_ranks = 1;  ///< ranks of the EP group
  int num_nodes = 1;  ///< nodes they are on (equal blocks of consecutive ranks)
  /// Groups of consecutive experts that routing limits tokens to (DeepSeek-V3's
  /// `n_group`); the hierarchical plan keeps a group's experts on one node. 1: none.
  int num_groups = 1;
  /// Extra physical slots beyond one per expert (`[runtime] redundant_experts`). The
  /// total, E + redundant, is rounded up to a multiple of `num_ranks` (the rounding adds
  /// replicas), so that every rank holds the same number of slots.
  int redundant_experts = 0;
  /// Whether to improve the published algorithm's placement by swapping slots between
  /// ranks (of one node, when hierarchical) where that lowers the most loaded rank
  /// (`refine_expert_slots`). Off: exactly the published placement.
  bool refine = true;
};

/// A placement of E logical experts on S physical slots, `slots_per_rank` per rank: rank r
/// holds slots [r·slots_per_rank, (r+1)·slots_per_rank).
struct ExpertSlots {
  int num_experts = 0;
  int slots_per_rank = 0;
  /// [S] the logical expert of each slot.
  std::vector<int> expert_of_slot;
  /// [S] which copy of its expert a slot holds (0 .. copies - 1).
  std::vector<int> replica_of_slot;
  /// [E] copies of each expert (each ≥ 1; they sum to S).
  std::vector<int> copies;
  /// [S] the share of its expert's tokens each slot takes (an expert's shares sum to 1):
  /// set by `balance_experts` so that the ranks' loads are as even as the placement lets
  /// them be (a min-max flow), rather than the same 1/copies for every copy.
  std::vector<double> share_of_slot;

  int num_slots() const noexcept { return static_cast<int>(expert_of_slot.size()); }
  int num_ranks() const noexcept { return slots_per_rank > 0 ? num_slots() / slots_per_rank : 0; }
};

/// The slots of `shape` for per-expert `load` [E] (tokens routed to each expert over some
/// window; any non-negative numbers). Hierarchical when `num_nodes` > 1 divides
/// `num_groups`, E divides into `num_groups`, and the ranks divide over the nodes; global
/// (one node, one group) otherwise. The same as the published algorithm on its examples
/// (tests/core/expert_balancer_test.cpp), ties broken the same way: the first of equal
/// loads, the lowest-numbered of equally loaded ranks. Throws `Error(kInvalidArgument)` for
/// an empty or negative load, or shapes below 1.
ExpertSlots balance_experts(std::span<const double> load, const ExpertBalanceShape& shape);

/// Each rank's load under `slots` when every expert's load splits over its copies by
/// their shares: [ranks].
std::vector<double> rank_loads(const ExpertSlots& slots, std::span<const double> load);

/// Sets `slots.share_of_slot` for `load` [E]: the split of each expert's tokens over its
/// copies that minimises the most loaded rank (found by bisection over the bound, each a
/// max-flow from experts to the ranks that hold them), within 1e-9 of the total load.
/// Loads of 0 split evenly. `balance_experts` calls it; a caller that keeps a placement and
/// measures a new load calls it again.
void split_expert_load(ExpertSlots& slots, std::span<const double> load);

/// Improves `slots` for `load` [E]: while the min-max split (`split_expert_load`) leaves
/// a rank above the mean, finds the ranks of a minimum cut (the overloaded ones, whose
/// experts have no copy elsewhere) and swaps a copy there with the lightest expert of a
/// less loaded rank in the same block of `ranks_per_block` consecutive ranks (a node),
/// keeping a swap only when it lowers the bound. Copies per expert stay as they are;
/// replicas are renumbered in slot order and the shares set. The published packing places
/// copies by equal shares, so a few heavy single copies can share ranks that the flow
/// cannot relieve (e.g. 64 ranks, E = 256 + 64, zipf-skewed load: 1.29 → 1.0x). Returns
/// the swaps made.
int refine_expert_slots(ExpertSlots& slots, std::span<const double> load, int ranks_per_block);

/// max / mean of `rank_loads` (1 is perfect balance; 0 without load).
double load_imbalance(std::span<const double> rank_load);

}  // namespace switchyard
