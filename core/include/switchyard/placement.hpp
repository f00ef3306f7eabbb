#pragma once
/// \file
/// Where the experts of a layer live: contiguous blocks of experts over the ranks of an EP
/// group.

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

}  // namespace switchyard
