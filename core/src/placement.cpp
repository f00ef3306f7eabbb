#include "switchyard/placement.hpp"

#include <cmath>
#include <string>
#include <utility>

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

ExpertSlotMap::ExpertSlotMap(int num_experts, std::vector<int> expert_of_slot,
                             std::vector<double> share_of_slot)
    : num_experts_(num_experts),
      expert_of_slot_(std::move(expert_of_slot)),
      share_of_slot_(std::move(share_of_slot)) {
  const auto S = expert_of_slot_.size();
  const auto E = static_cast<std::size_t>(num_experts);
  if (num_experts < 1 || S < E) {
    throw Error(ErrorCode::kInvalidArgument,
                "expert slot map: " + std::to_string(S) + " slots cannot hold " +
                    std::to_string(num_experts) + " experts (at least one slot each)");
  }
  if (!share_of_slot_.empty() && share_of_slot_.size() != S) {
    throw Error(ErrorCode::kInvalidArgument,
                "expert slot map: " + std::to_string(share_of_slot_.size()) + " shares for " +
                    std::to_string(S) + " slots");
  }
  std::vector<int> copies(E, 0);
  for (std::size_t s = 0; s < S; ++s) {
    const int e = expert_of_slot_[s];
    if (e < 0 || e >= num_experts) {
      throw Error(ErrorCode::kInvalidArgument,
                  "expert slot map: slot " + std::to_string(s) + " holds expert " +
                      std::to_string(e) + ", outside 0.." + std::to_string(num_experts - 1));
    }
    ++copies[static_cast<std::size_t>(e)];
  }
  first_of_expert_.assign(E + 1, 0);
  for (std::size_t e = 0; e < E; ++e) {
    if (copies[e] == 0) {
      throw Error(ErrorCode::kInvalidArgument,
                  "expert slot map: expert " + std::to_string(e) + " has no slot");
    }
    first_of_expert_[e + 1] = first_of_expert_[e] + copies[e];
  }
  if (share_of_slot_.empty()) {
    share_of_slot_.resize(S);
    for (std::size_t s = 0; s < S; ++s)
      share_of_slot_[s] = 1.0 / copies[static_cast<std::size_t>(expert_of_slot_[s])];
  }
  slots_by_expert_.resize(S);
  running_share_.resize(S);
  std::vector<int> next(first_of_expert_.begin(), first_of_expert_.end() - 1);
  for (std::size_t s = 0; s < S; ++s) {
    const double share = share_of_slot_[s];
    if (!(share >= 0) || !std::isfinite(share)) {
      throw Error(ErrorCode::kInvalidArgument, "expert slot map: slot " + std::to_string(s) +
                                                   "'s share is " + std::to_string(share) +
                                                   ", not a finite number >= 0");
    }
    slots_by_expert_[static_cast<std::size_t>(
        next[static_cast<std::size_t>(expert_of_slot_[s])]++)] = static_cast<int>(s);
  }
  for (std::size_t e = 0; e < E; ++e) {
    double sum = 0;
    for (int i = first_of_expert_[e]; i < first_of_expert_[e + 1]; ++i) {
      sum +=
          share_of_slot_[static_cast<std::size_t>(slots_by_expert_[static_cast<std::size_t>(i)])];
      running_share_[static_cast<std::size_t>(i)] = sum;
    }
    if (std::abs(sum - 1.0) > 1e-6) {
      throw Error(ErrorCode::kInvalidArgument, "expert slot map: expert " + std::to_string(e) +
                                                   "'s shares sum to " + std::to_string(sum) +
                                                   ", not 1");
    }
    // Whatever the rounding, every point in [0, 1) finds a copy.
    running_share_[static_cast<std::size_t>(first_of_expert_[e + 1] - 1)] = 2.0;
  }
  identity_ = S == E;
  for (std::size_t s = 0; s < S && identity_; ++s)
    identity_ = expert_of_slot_[s] == static_cast<int>(s);
}

std::span<const int> ExpertSlotMap::slots_of(int expert) const {
  if (identity_ && slots_by_expert_.empty()) return {};
  const auto at = static_cast<std::size_t>(expert);
  return std::span<const int>(slots_by_expert_)
      .subspan(static_cast<std::size_t>(first_of_expert_.at(at)),
               static_cast<std::size_t>(first_of_expert_.at(at + 1) - first_of_expert_[at]));
}

double replica_choice_point(int origin_rank, std::int64_t token, int expert) noexcept {
  std::uint64_t z = (static_cast<std::uint64_t>(origin_rank) << 40) ^
                    static_cast<std::uint64_t>(token) ^ (static_cast<std::uint64_t>(expert) << 24);
  z += 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) * 0x1.0p-53;
}

int ExpertSlotMap::choose_slot(int origin_rank, std::int64_t token, int expert) const noexcept {
  if (identity_) return expert;
  const auto at = static_cast<std::size_t>(expert);
  const int first = first_of_expert_[at], last = first_of_expert_[at + 1];
  if (last - first == 1) return slots_by_expert_[static_cast<std::size_t>(first)];
  const double point = replica_choice_point(origin_rank, token, expert);
  for (int i = first; i < last; ++i)
    if (point < running_share_[static_cast<std::size_t>(i)])
      return slots_by_expert_[static_cast<std::size_t>(i)];
  return slots_by_expert_[static_cast<std::size_t>(last - 1)];
}

}  // namespace switchyard
