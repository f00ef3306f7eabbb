#include "switchyard/placement.hpp"

#include "switchyard/status.hpp"

namespace switchyard {

ExpertPlacement::ExpertPlacement(int num_experts, int num_ranks)
    : num_experts_(num_experts), num_ranks_(num_ranks) {
  if (num_experts < 1 || num_ranks < 1) {
    throw Error(ErrorCode::kInvalidArgument, "expert placement needs at least one expert and rank");
  }
}

int ExpertPlacement::first_expert(int rank) const noexcept {
  const int base = num_experts_ / num_ranks_;
  const int extra = num_experts_ % num_ranks_;
  return rank * base + (rank < extra ? rank : extra);
}

int ExpertPlacement::num_local(int rank) const noexcept {
  return num_experts_ / num_ranks_ + (rank < num_experts_ % num_ranks_ ? 1 : 0);
}

int ExpertPlacement::rank_of(int expert) const noexcept {
  const int base = num_experts_ / num_ranks_;
  const int extra = num_experts_ % num_ranks_;
  const int boundary = extra * (base + 1);
  if (expert < boundary) return expert / (base + 1);
  return extra + (expert - boundary) / base;
}

}  // namespace switchyard
