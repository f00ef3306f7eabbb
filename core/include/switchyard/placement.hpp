#pragma once
/// \file
/// Where the experts of a layer live: contiguous blocks of expert slots over the ranks of an
/// EP group, and which logical expert each slot holds (a copy of it, when the experts are
/// replicated).

#include <cstdint>
#include <span>
#include <vector>

namespace switchyard {

/// Contiguous placement of E experts over R ranks: the first `E mod R` ranks hold one
/// expert more; with E < R some ranks hold none.
class ExpertPlacement {
 public:
  ExpertPlacement() = default;
  ExpertPlacement(int num_experts, int num_ranks);
  int num_experts() const noexcept { return num_experts_; }
  int num_ranks() const noexcept { return num_ranks_; }
  int first_expert(int rank) const noexcept;
  int num_local(int rank) const noexcept;
  /// The most experts any rank holds (rank 0's: the first ranks hold one more).
  int max_local() const noexcept { return num_local(0); }
  int rank_of(int expert) const noexcept;

 private:
  int num_experts_ = 0;
  int num_ranks_ = 1;
};

/// Which logical expert each physical slot holds, and how each expert's tokens split over
/// its copies. The slots lie over the ranks as `ExpertPlacement(num_slots, ranks)` does
/// (rank r holds a contiguous block); with one slot per expert in expert order (`empty()`)
/// a slot is its expert and nothing is translated. A placement from the expert balancer
/// (`balance_experts`) or a file (`switchyard plan-experts`) is one instance, shuffled or
/// replicated. Immutable once made; safe to share between threads.
class ExpertSlotMap {
 public:
  /// No map: slot e holds expert e.
  ExpertSlotMap() = default;
  /// `expert_of_slot` [S] (every expert 0..E-1 at least once), `share_of_slot` [S] (each
  /// expert's shares ≥ 0 and summing to 1 within 1e-6; empty: 1/copies each). Throws
  /// `Error(kInvalidArgument)` naming the first slot or expert that breaks this.
  ExpertSlotMap(int num_experts, std::vector<int> expert_of_slot,
                std::vector<double> share_of_slot = {});

  /// True for the identity (no map given, or slot e holding expert e for every e with one
  /// copy each): the layer then routes to slots as it routes to experts.
  bool empty() const noexcept { return identity_; }
  int num_experts() const noexcept { return num_experts_; }
  int num_slots() const noexcept { return static_cast<int>(expert_of_slot_.size()); }
  /// [S] the logical expert of each slot.
  std::span<const int> expert_of_slot() const noexcept { return expert_of_slot_; }
  /// The logical expert of slot `slot` (without a map, `slot` itself).
  int expert_of(int slot) const noexcept {
    return expert_of_slot_.empty() ? slot : expert_of_slot_[static_cast<std::size_t>(slot)];
  }
  /// [S] each slot's share of its expert's tokens.
  std::span<const double> share_of_slot() const noexcept { return share_of_slot_; }
  /// The slots holding `expert`, in slot order.
  std::span<const int> slots_of(int expert) const;

  /// The slot that (token `token` of EP rank `origin_rank`, logical `expert`) goes to: a
  /// hash of the three, as a point in [0, 1), falls in one copy's share. Every rank computes
  /// the same slot from the same three numbers, whichever rank it is (nothing rank-local
  /// enters), and a copy gets its share of an expert's tokens up to the hash's spread.
  int choose_slot(int origin_rank, std::int64_t token, int expert) const noexcept;

 private:
  int num_experts_ = 0;
  bool identity_ = true;
  std::vector<int> expert_of_slot_;
  std::vector<double> share_of_slot_;
  std::vector<int> first_of_expert_;   // [E+1] into slots_by_expert_
  std::vector<int> slots_by_expert_;   // [S] slots grouped by expert, slot order within
  std::vector<double> running_share_;  // [S] cumulative shares, in slots_by_expert_ order
};

/// The point in [0, 1) of (origin rank, token, expert) that `ExpertSlotMap::choose_slot`
/// places among the copies' shares (a SplitMix64 finaliser of the three).
double replica_choice_point(int origin_rank, std::int64_t token, int expert) noexcept;

}  // namespace switchyard
