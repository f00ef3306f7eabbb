// The expert-parallel load balancer against the published algorithm's own example and
// hand-worked cases, and its invariants on random loads.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <set>
#include <vector>

#include "switchyard/expert_balancer.hpp"
#include "switchyard/status.hpp"

using namespace switchyard;

TEST_CASE("the published example: DeepSeek's EPLB README, also vLLM's test_basic_rebalance") {
  // 12 experts in 4 groups, 16 slots on 8 ranks of 2 nodes: hierarchical. The expected
  // placements (expert of each slot) and copies are those printed in
  // github.com/deepseek-ai/eplb's README and asserted in vLLM's
  // tests/distributed/test_eplb_algo.py (test_basic_rebalance), one layer at a time.
  struct Case {
    std::vector<double> load;
    std::vector<int> expert_of_slot, copies;
  };
  const Case cases[] = {
      {{90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86},
       {5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1},
       {1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1}},
      {{20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27},
       {7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1},
       {1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1}},
  };
  for (const Case& c : cases) {
    const ExpertSlots slots = balance_experts(c.load, {8, 2, 4, 4, /*refine=*/false});
    CHECK(slots.slots_per_rank == 2);
    CHECK(slots.expert_of_slot == c.expert_of_slot);
    CHECK(slots.copies == c.copies);
    // Refined (the default): the same copies, no rank more loaded than in the published
    // placement with its best split.
    const ExpertSlots refined = balance_experts(c.load, {8, 2, 4, 4});
    CHECK(refined.copies == c.copies);
    CHECK(load_imbalance(rank_loads(refined, c.load)) <=
          load_imbalance(rank_loads(slots, c.load)) * (1 + 1e-9));
  }
}

TEST_CASE("refinement, worked by hand: two heavy single copies on one rank are split up") {
  // Rank 0 holds experts 0 and 1 (loads 10, 10), rank 1 experts 2 and 3 (1, 1): 20 and 2.
  // Rank 0 is the overloaded side of the cut; its heaviest copy (expert 0, the first of
  // equals) swaps with rank 1's lightest (expert 2, the first of equals): {2, 1} and
  // {0, 3}, 11 and 11.
  ExpertSlots slots;
  slots.num_experts = 4;
  slots.slots_per_rank = 2;
  slots.expert_of_slot = {0, 1, 2, 3};
  slots.replica_of_slot = {0, 0, 0, 0};
  slots.copies = {1, 1, 1, 1};
  const std::vector<double> load{10, 10, 1, 1};
  CHECK(refine_expert_slots(slots, load, 2) == 1);
  CHECK(slots.expert_of_slot == std::vector<int>{2, 1, 0, 3});
  CHECK(rank_loads(slots, load) == std::vector<double>{11, 11});
  // Blocks of one rank: nothing may move.
  slots.expert_of_slot = {0, 1, 2, 3};
  CHECK(refine_expert_slots(slots, load, 1) == 0);
  CHECK(slots.expert_of_slot == std::vector<int>{0, 1, 2, 3});
}

TEST_CASE("refinement on a skewed load where the published packing leaves ranks idle") {
  // 64 ranks, 256 experts with loads falling as (e + 1)^-3 (a few experts carry most
  // tokens) plus 64 extra slots: the published packing puts several heavy copies on the
  // same ranks and the flow cannot relieve them; the refined placement can.
  std::vector<double> load(256);
  for (std::size_t e = 0; e < load.size(); ++e)
    load[e] = std::round(1e6 * std::pow(static_cast<double>(e + 1), -3.0)) + 40;
  const ExpertSlots published = balance_experts(load, {64, 1, 1, 64, /*refine=*/false});
  const ExpertSlots refined = balance_experts(load, {64, 1, 1, 64});
  CHECK(refined.copies == published.copies);
  // Rank loads summed here from the shares, each expert's shares adding to 1.
  double total = 0;
  for (const double l : load) total += l;
  auto imbalance = [&](const ExpertSlots& slots) {
    std::vector<double> rank(64, 0.0), share_sum(256, 0.0);
    for (int s = 0; s < slots.num_slots(); ++s) {
      const auto e = static_cast<std::size_t>(slots.expert_of_slot[static_cast<std::size_t>(s)]);
      rank[static_cast<std::size_t>(s / slots.slots_per_rank)] +=
          load[e] * slots.share_of_slot[static_cast<std::size_t>(s)];
      share_sum[e] += slots.share_of_slot[static_cast<std::size_t>(s)];
    }
    for (const double sum : share_sum) CHECK(sum == doctest::Approx(1.0).epsilon(1e-9));
    return *std::max_element(rank.begin(), rank.end()) / (total / 64);
  };
  const double before = imbalance(published), after = imbalance(refined);
  CAPTURE(before);
  CAPTURE(after);
  CHECK(before > 1.2);
  CHECK(after <= 1.05);
}

TEST_CASE("a hand-worked global plan: 4 experts, 2 ranks, 2 extra slots") {
  // Loads 10, 20, 30, 40. Extra slots go to the highest load per copy: expert 3 (40), then
  // expert 2 (30 > 20 = 40/2). Slot loads per copy: e0 10, e1 20, e2 15, e3 20, e3 20,
  // e2 15. Packed heaviest first into the lighter rank (ties: the lower rank): slot 1
  // (e1) → rank 0, slot 3 (e3) → 1, slot 4 (e3) → 0, slot 2 (e2) → 1, slot 5 (e2) → 1,
  // slot 0 (e0) → 0. Each rank then carries 50.
  const std::vector<double> load{10, 20, 30, 40};
  const ExpertSlots slots = balance_experts(load, {2, 1, 1, 2});
  CHECK(slots.expert_of_slot == std::vector<int>{1, 3, 0, 3, 2, 2});
  CHECK(slots.replica_of_slot == std::vector<int>{0, 1, 0, 0, 0, 1});
  CHECK(slots.copies == std::vector<int>{1, 1, 2, 2});
  CHECK(rank_loads(slots, load) == std::vector<double>{50, 50});
  CHECK(load_imbalance(rank_loads(slots, load)) == 1.0);
}

TEST_CASE("edge cases: no extra slots, more extra slots than experts, uneven, one node, one rank") {
  const std::vector<double> load{50, 50, 50, 50, 50, 50, 50, 50};
  // Equal loads and no extra slots: one copy each (vLLM's test_equal_weights).
  CHECK(balance_experts(load, {4, 2, 2, 0}).copies == std::vector<int>(8, 1));
  // R >= E: 8 experts, 12 extra slots on 4 ranks; a hot expert gets most of them.
  const std::vector<double> hot{1000, 1, 1, 1, 1, 1, 1, 1};
  const ExpertSlots many = balance_experts(hot, {4, 1, 1, 12});
  CHECK(many.num_slots() == 20);
  CHECK(many.copies[0] == 13);
  // E not divisible by the ranks: 6 experts on 4 ranks round up to 8 slots.
  const ExpertSlots uneven =
      balance_experts(std::vector<double>{10, 20, 30, 40, 50, 60}, {4, 1, 1, 0});
  CHECK(uneven.num_slots() == 8);
  CHECK(uneven.slots_per_rank == 2);
  // Groups that do not divide over the nodes: the global plan (vLLM's fallback case).
  const ExpertSlots fallback =
      balance_experts(std::vector<double>{10, 20, 30, 40, 50, 60}, {4, 2, 3, 2});
  CHECK(fallback.num_slots() == 8);
  // One rank: every slot on it.
  const ExpertSlots single = balance_experts(std::vector<double>{10, 20, 30, 40}, {1, 1, 1, 0});
  CHECK(std::set<int>(single.expert_of_slot.begin(), single.expert_of_slot.end()) ==
        std::set<int>{0, 1, 2, 3});
  CHECK_THROWS_AS(balance_experts(std::vector<double>{}, {1, 1, 1, 0}), Error);
  CHECK_THROWS_AS(balance_experts(std::vector<double>{1, -2}, {1, 1, 1, 0}), Error);
  CHECK_THROWS_AS(balance_experts(std::vector<double>{1, 2}, {0, 1, 1, 0}), Error);
}

TEST_CASE("invariants on random skewed loads: copies, replicas, groups kept on their node") {
  std::mt19937_64 rng(7);
  for (int trial = 0; trial < 50; ++trial) {
    const int nodes = 1 + static_cast<int>(rng() % 4);
    const int ranks = nodes * (1 + static_cast<int>(rng() % 4));
    const int groups = nodes * (1 + static_cast<int>(rng() % 3));
    const int E = groups * (1 + static_cast<int>(rng() % 5));
    const int extra = static_cast<int>(rng() % static_cast<unsigned>(2 * E));
    std::vector<double> load(static_cast<std::size_t>(E));
    for (auto& l : load) l = static_cast<double>(rng() % 1000) * static_cast<double>(rng() % 3 + 1);
    CAPTURE(nodes);
    CAPTURE(ranks);
    CAPTURE(groups);
    CAPTURE(E);
    CAPTURE(extra);
    const ExpertSlots slots = balance_experts(load, {ranks, nodes, groups, extra});
    CHECK(slots.num_slots() % ranks == 0);
    CHECK(slots.num_slots() >= E + extra);
    int total = 0;
    for (int e = 0; e < E; ++e) {
      const int copies = slots.copies[static_cast<std::size_t>(e)];
      CHECK(copies >= 1);
      total += copies;
      std::vector<int> replicas;
      for (int s = 0; s < slots.num_slots(); ++s) {
        if (slots.expert_of_slot[static_cast<std::size_t>(s)] == e)
          replicas.push_back(slots.replica_of_slot[static_cast<std::size_t>(s)]);
      }
      std::sort(replicas.begin(), replicas.end());
      std::vector<int> expected(static_cast<std::size_t>(copies));
      for (int i = 0; i < copies; ++i) expected[static_cast<std::size_t>(i)] = i;
      CHECK(replicas == expected);
    }
    CHECK(total == slots.num_slots());
    // Hierarchical: every copy of a group's experts on the group's one node.
    if (nodes > 1) {
      const int group_size = E / groups, slots_per_node = slots.num_slots() / nodes;
      std::vector<std::set<int>> nodes_of_group(static_cast<std::size_t>(groups));
      for (int s = 0; s < slots.num_slots(); ++s) {
        nodes_of_group[static_cast<std::size_t>(slots.expert_of_slot[static_cast<std::size_t>(s)] /
                                                group_size)]
            .insert(s / slots_per_node);
      }
      for (const auto& n : nodes_of_group) CHECK(n.size() == 1);
    }
  }
}

TEST_CASE("the copies' shares: a min-max split that an even one cannot reach, worked by hand") {
  // Rank 0 holds experts 0 and 1, rank 1 two copies of expert 0; loads 10 and 10. Even
  // shares (1/3 each) give rank 0 10/3 + 10 and rank 1 20/3; the best split sends all of
  // expert 0 to rank 1: 10 and 10.
  ExpertSlots slots;
  slots.num_experts = 2;
  slots.slots_per_rank = 2;
  slots.expert_of_slot = {0, 1, 0, 0};
  slots.replica_of_slot = {0, 0, 1, 2};
  slots.copies = {3, 1};
  const std::vector<double> load{10, 10};
  split_expert_load(slots, load);
  CHECK(slots.share_of_slot == std::vector<double>{0, 1, 0.5, 0.5});
  CHECK(rank_loads(slots, load) == std::vector<double>{10, 10});
  // The balancer's own plans: every expert's shares sum to 1, and no rank carries more
  // than under even shares.
  std::mt19937_64 rng(3);
  std::vector<double> skewed(64);
  for (std::size_t e = 0; e < skewed.size(); ++e)
    skewed[e] = 1e4 / static_cast<double>(e + 1) + static_cast<double>(rng() % 50);
  const ExpertSlots plan = balance_experts(skewed, {16, 2, 4, 16});
  std::vector<double> sums(64, 0.0);
  for (int s = 0; s < plan.num_slots(); ++s)
    sums[static_cast<std::size_t>(plan.expert_of_slot[static_cast<std::size_t>(s)])] +=
        plan.share_of_slot[static_cast<std::size_t>(s)];
  for (const double sum : sums) CHECK(sum == doctest::Approx(1.0).epsilon(1e-9));
  ExpertSlots even = plan;
  even.share_of_slot.clear();
  const std::vector<double> split = rank_loads(plan, skewed), evenly = rank_loads(even, skewed);
  CHECK(*std::max_element(split.begin(), split.end()) <=
        *std::max_element(evenly.begin(), evenly.end()) * (1 + 1e-9));
}
