#pragma once
/// \file
/// Which rank runs on which node.

#include <span>
#include <string>
#include <vector>

namespace switchyard {

/// The placement of the ranks of one communicator on nodes. Nodes are numbered 0..N-1 in
/// order of their lowest rank. Immutable after construction; safe to share between threads.
class Topology {
 public:
  Topology() = default;
  /// `node_of_rank[r]` is the node of rank r; node ids are renumbered by first appearance.
  explicit Topology(std::vector<int> node_of_rank);
  /// `ranks` ranks, `ranks_per_node` consecutive ranks per node (the last node may hold fewer).
  static Topology uniform(int ranks, int ranks_per_node);
  /// One node per distinct host name, numbered in order of first appearance.
  static Topology from_host_names(const std::vector<std::string>& host_names);

  int size() const noexcept { return static_cast<int>(node_of_rank_.size()); }
  int num_nodes() const noexcept { return num_nodes_; }
  int node_of(int rank) const { return node_of_rank_.at(static_cast<std::size_t>(rank)); }
  /// The ranks on `node`, ascending.
  std::vector<int> ranks_on(int node) const;
  std::span<const int> node_of_rank() const noexcept { return node_of_rank_; }
  /// "4 ranks on 2 nodes: node 0 = ranks 0-1, node 1 = ranks 2-3".
  std::string describe() const;

 private:
  std::vector<int> node_of_rank_;
  int num_nodes_ = 0;
};

}  // namespace switchyard
