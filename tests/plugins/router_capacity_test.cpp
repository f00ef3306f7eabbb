// router_capacity: the public golden vectors, capacity arithmetic, and properties checked
// against a brute-force recount over random logits.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "router_support.hpp"
#include "switchyard/plugin.hpp"
#include "switchyard/token_choice_router.hpp"
#include "test_support.hpp"

using namespace switchyard;

namespace {

test::MadeRouter make(const std::string& settings, int experts) {
  return test::make_router("capacity", settings, experts);
}

RoutingPlan route(Router& router, std::vector<float> logits, std::int64_t tokens) {
  return test::route_logits(router, std::move(logits), tokens);
}

/// The kept (token, expert) pairs, sorted.
std::vector<std::pair<int, int>> kept(const RoutingPlan& plan) {
  std::vector<std::pair<int, int>> out;
  for (std::int64_t t = 0; t < plan.num_tokens; ++t) {
    for (int j = 0; j < plan.slots; ++j) {
      const int e = plan.experts[static_cast<std::size_t>(t * plan.slots + j)];
      if (e >= 0) out.emplace_back(static_cast<int>(t), e);
    }
  }
  std::sort(out.begin(), out.end());
  return out;
}

const std::vector<float> kGolden = {.11f, .2f, .1f, .3f, .3f, .4f,  .11f, .1f,
                                    .11f, .1f, .6f, .5f, .1f, .11f, .7f,  .8f};

}  // namespace

TEST_CASE("public golden vectors: softmax, pre_softmax, k = 2, capacity factor 1 (C = 2)") {
  auto probs = make("top_k = 2\ncapacity_factor = 1.0\ndrop_policy = \"probs\"\n", 4);
  const RoutingPlan p = route(*probs.router, kGolden, 4);
  CHECK(kept(p) ==
        std::vector<std::pair<int, int>>{{0, 1}, {1, 0}, {1, 1}, {2, 2}, {2, 3}, {3, 2}, {3, 3}});
  CHECK(probs.router->stats().dropped == 1);
  CHECK(std::vector<std::int64_t>(p.counts.begin(), p.counts.end()) ==
        std::vector<std::int64_t>{1, 2, 2, 2});
  // The dropped slot keeps its place in the row: expert -1, weight 0.
  CHECK(p.experts[0] == -1);
  CHECK(p.weights[0] == 0.0f);

  auto position = make("top_k = 2\ncapacity_factor = 1.0\ndrop_policy = \"position\"\n", 4);
  CHECK(kept(route(*position.router, kGolden, 4)) ==
        std::vector<std::pair<int, int>>{{0, 1}, {0, 3}, {1, 0}, {1, 1}, {2, 2}, {2, 3}, {3, 2}});
}

TEST_CASE("capacity is ceil(T·k/E·factor); T = 0 is empty; a bad factor is refused") {
  CHECK(expert_capacity(4, 2, 4, 1.0) == 2);
  CHECK(expert_capacity(10, 2, 4, 1.25) == 7);  // 6.25 rounds up
  CHECK(expert_capacity(3, 1, 8, 1.0) == 1);
  auto m = make("top_k = 2\n", 4);
  const RoutingPlan empty = route(*m.router, {}, 0);
  CHECK(empty.num_tokens == 0);
  CHECK(m.router->stats().dropped == 0);
  CHECK_THROWS_WITH_AS(make("capacity_factor = 0.0\n", 4), doctest::Contains("capacity_factor"),
                       Error);
  CHECK_THROWS_WITH_AS(make("drop_policy = \"random\"\n", 4), doctest::Contains("drop_policy"),
                       Error);
}

TEST_CASE("random logits: no expert over C, and each keeps its heaviest (or first) assignments") {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.5f);
  for (const char* policy : {"probs", "position"}) {
    for (double factor : {0.5, 1.0, 1.25}) {
      CAPTURE(policy);
      CAPTURE(factor);
      const int E = 8, k = 2;
      const std::int64_t T = 97;
      std::vector<float> z(static_cast<std::size_t>(T * E));
      for (auto& v : z) v = normal(rng);
      // Uncapped selection from topk with the same scores, for the brute-force recount.
      auto topk = test::make_router("topk", "top_k = 2\n", E);
      const RoutingPlan full = route(*topk.router, z, T);
      auto m = make("top_k = 2\ncapacity_factor = " + std::to_string(factor) +
                        "\ndrop_policy = \"" + policy + "\"\n",
                    E);
      const RoutingPlan capped = route(*m.router, z, T);
      const auto C = static_cast<std::int64_t>(std::ceil(static_cast<double>(T) * k / E * factor));
      std::int64_t dropped = 0;
      for (int e = 0; e < E; ++e) {
        // Brute force: this expert's assignments in token order with their weights.
        std::vector<std::pair<float, std::int64_t>> mine;
        for (std::int64_t i = 0; i < T * k; ++i) {
          if (full.experts[static_cast<std::size_t>(i)] == e) {
            mine.emplace_back(full.weights[static_cast<std::size_t>(i)], i);
          }
        }
        if (std::string(policy) == "probs") {
          std::stable_sort(mine.begin(), mine.end(),
                           [](const auto& a, const auto& b) { return a.first > b.first; });
        }
        const std::size_t keep = std::min<std::size_t>(mine.size(), static_cast<std::size_t>(C));
        dropped += static_cast<std::int64_t>(mine.size() - keep);
        for (std::size_t n = 0; n < mine.size(); ++n) {
          const auto i = static_cast<std::size_t>(mine[n].second);
          CHECK(capped.experts[i] == (n < keep ? e : -1));
        }
        CHECK(capped.counts[static_cast<std::size_t>(e)] == static_cast<std::int64_t>(keep));
      }
      CHECK(m.router->stats().dropped == dropped);
      if (factor < 1.0) CHECK(dropped > 0);
    }
  }
}

TEST_CASE("capacity composes with node limiting: groups first, then the capacity") {
  // Groups {0,1} and {2,3}, one per token: the 4x4 logits pick 3,2 / 1,0 / 2,3 / 3,2 (see
  // the node_limited test); C = 2 leaves expert 2 and 3 with three each: drop the lightest.
  auto m = make("top_k = 2\nnum_groups = 2\nmax_groups = 1\ncapacity_factor = 1.0\n", 4);
  const RoutingPlan p = route(*m.router, kGolden, 4);
  CHECK(std::vector<std::int64_t>(p.counts.begin(), p.counts.end()) ==
        std::vector<std::int64_t>{1, 1, 2, 2});
  CHECK(m.router->stats().dropped == 2);
  // Softmax weights (NumPy, float64): expert 3 gets token 0 .2816, token 2 .2896, token 3
  // .3445; expert 2 gets token 0 .2306, token 2 .3201, token 3 .3117: token 0 loses both.
  CHECK(kept(p) ==
        std::vector<std::pair<int, int>>{{1, 0}, {1, 1}, {2, 2}, {2, 3}, {3, 2}, {3, 3}});
}
