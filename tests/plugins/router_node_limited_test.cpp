// router_node_limited: hand-worked group choices for each group score, groups from the
// placement's nodes, and the configuration errors of docs/routing.md.
#include <doctest/doctest.h>

#include <vector>

#include "router_support.hpp"
#include "switchyard/plugin.hpp"
#include "test_support.hpp"

using namespace switchyard;

namespace {

test::MadeRouter make(const std::string& settings, int experts) {
  return test::make_router("node_limited", settings, experts);
}

std::vector<std::int32_t> route(Router& router, std::vector<float> logits, std::int64_t tokens,
                                const Topology* topology = nullptr) {
  return test::values(test::route_logits(router, std::move(logits), tokens, topology).experts);
}

}  // namespace

TEST_CASE("group scores by hand: max and top2_sum pick different groups") {
  // Groups {0,1} and {2,3}; softmax scores exp(z)/sum: 1, 2.718, 2.226, 2.226 (unnormalised).
  // max: group 0 (2.718 > 2.226); top2_sum: group 1 (4.451 > 3.718).
  const std::vector<float> z = {0.0f, 1.0f, 0.8f, 0.8f};
  auto by_max = make("top_k = 2\nnum_groups = 2\nmax_groups = 1\ngroup_score = \"max\"\n", 4);
  CHECK(route(*by_max.router, z, 1) == std::vector<std::int32_t>{1, 0});
  auto by_sum = make("top_k = 2\nnum_groups = 2\nmax_groups = 1\ngroup_score = \"top2_sum\"\n", 4);
  CHECK(route(*by_sum.router, z, 1) == std::vector<std::int32_t>{2, 3});  // tie: lower index first
  // topk_sum with k = 2, M = 1 sums the 2 largest: the same as top2_sum here.
  auto by_topk = make("top_k = 2\nnum_groups = 2\nmax_groups = 1\ngroup_score = \"topk_sum\"\n", 4);
  CHECK(route(*by_topk.router, z, 1) == std::vector<std::int32_t>{2, 3});
  // With M = G nothing is excluded: plain top-k.
  auto all = make("top_k = 2\nnum_groups = 2\nmax_groups = 2\n", 4);
  CHECK(route(*all.router, z, 1) == std::vector<std::int32_t>{1, 2});
}

TEST_CASE("the public 4x4 logits with two groups of two and one group per token") {
  auto m = make("top_k = 2\nnum_groups = 2\nmax_groups = 1\n", 4);
  const std::vector<float> z = {.11f, .2f, .1f, .3f, .3f, .4f,  .11f, .1f,
                                .11f, .1f, .6f, .5f, .1f, .11f, .7f,  .8f};
  CHECK(route(*m.router, z, 4) == std::vector<std::int32_t>{3, 2, 1, 0, 2, 3, 3, 2});
}

TEST_CASE("groups from the placement: the experts of one node") {
  // 4 ranks, 2 per node; 8 experts placed 2 per rank: node 0 holds 0-3, node 1 holds 4-7.
  const Topology topology = Topology::uniform(4, 2);
  auto m = make("top_k = 2\nmax_groups = 1\n", 8);
  // Expert 7 is the single best, but experts 0 and 1 together (max score) ... with "max" the
  // group of the best expert wins: node 1.
  const std::vector<float> z = {1.0f, 0.9f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 1.1f};
  CHECK(route(*m.router, z, 1, &topology) == std::vector<std::int32_t>{7, 4});
  // On one node there is nothing to limit to without num_groups.
  const Topology one_node = Topology::uniform(4, 4);
  CHECK_THROWS_WITH_AS(route(*m.router, z, 1, &one_node),
                       doctest::Contains("set router.num_groups"), Error);
}

TEST_CASE("impossible group settings are configuration errors") {
  CHECK_THROWS_WITH_AS(make("num_groups = 3\nmax_groups = 1\n", 8),
                       doctest::Contains("router.num_groups: must divide the number of experts 8"),
                       Error);
  CHECK_THROWS_WITH_AS(make("top_k = 4\nnum_groups = 4\nmax_groups = 1\n", 8),
                       doctest::Contains("fewer than top_k = 4"), Error);
  CHECK_THROWS_WITH_AS(make("num_groups = 2\nmax_groups = 3\n", 8),
                       doctest::Contains("router.max_groups: must be in 1..2"), Error);
  CHECK_THROWS_WITH_AS(
      make("top_k = 1\nnum_groups = 8\nmax_groups = 1\ngroup_score = \"top2_sum\"\n", 8),
      doctest::Contains("top2_sum needs at least 2 experts per group"), Error);
}
