#include "switchyard/topology.hpp"

#include <map>
#include <sstream>

#include "switchyard/status.hpp"

namespace switchyard {

Topology::Topology(std::vector<int> node_of_rank) : node_of_rank_(std::move(node_of_rank)) {
  std::map<int, int> renumber;
  for (int& node : node_of_rank_) {
    auto [it, inserted] = renumber.try_emplace(node, static_cast<int>(renumber.size()));
    node = it->second;
  }
  num_nodes_ = static_cast<int>(renumber.size());
}

Topology Topology::uniform(int ranks, int ranks_per_node) {
  if (ranks < 0 || ranks_per_node < 1) {
    throw Error(ErrorCode::kInvalidArgument, "topology: ranks_per_node must be >= 1 (got " +
                                                 std::to_string(ranks_per_node) + ")");
  }
  std::vector<int> nodes(static_cast<std::size_t>(ranks));
  for (int r = 0; r < ranks; ++r) nodes[static_cast<std::size_t>(r)] = r / ranks_per_node;
  return Topology(std::move(nodes));
}

Topology Topology::from_host_names(const std::vector<std::string>& host_names) {
  std::map<std::string, int> ids;
  std::vector<int> nodes;
  for (const auto& name : host_names) {
    nodes.push_back(ids.try_emplace(name, static_cast<int>(ids.size())).first->second);
  }
  return Topology(std::move(nodes));
}

std::vector<int> Topology::ranks_on(int node) const {
  std::vector<int> ranks;
  for (int r = 0; r < size(); ++r) {
    if (node_of_rank_[static_cast<std::size_t>(r)] == node) ranks.push_back(r);
  }
  return ranks;
}

std::string Topology::describe() const {
  std::ostringstream out;
  out << size() << (size() == 1 ? " rank" : " ranks") << " on " << num_nodes_
      << (num_nodes_ == 1 ? " node" : " nodes") << ":";
  for (int n = 0; n < num_nodes_; ++n) {
    auto ranks = ranks_on(n);
    out << (n ? "," : "") << " node " << n << " = rank" << (ranks.size() > 1 ? "s " : " ");
    // Print runs of consecutive ranks as a-b.
    for (std::size_t i = 0; i < ranks.size();) {
      std::size_t j = i;
      while (j + 1 < ranks.size() && ranks[j + 1] == ranks[j] + 1) ++j;
      out << (i ? " " : "") << ranks[i];
      if (j > i) out << "-" << ranks[j];
      i = j + 1;
    }
  }
  return out.str();
}

}  // namespace switchyard
