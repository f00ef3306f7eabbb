// The router conformance suite: every routing policy, through the plugin loader, on the
// cases docs/routing.md pins down for all of them (T = 0, T = 1, k = E, ties, all-equal logits,
// large T, determinism), with its invariants checked independently of the policy.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <set>
#include <vector>

#include "router_support.hpp"
#include "switchyard/plugin.hpp"
#include "test_support.hpp"

using namespace switchyard;

namespace {

struct Policy {
  const char* name;
  const char* settings;  // beyond top_k
  bool token_choice;
};

const Policy kPolicies[] = {
    {"topk", "", true},
    {"capacity", "capacity_factor = 100.0\n", true},  // no drops: behaves as topk
    {"node_limited", "num_groups = 2\nmax_groups = 2\n", true},
    {"expert_choice", "", false},
};

test::MadeRouter make(const Policy& p, int k, int experts) {
  return test::make_router(p.name, "top_k = " + std::to_string(k) + "\n" + p.settings, experts);
}

RoutingPlan route(Router& router, std::vector<float> logits, std::int64_t tokens) {
  return test::route_logits(router, std::move(logits), tokens);
}

/// The invariants of every plan: shape, -1 exactly where the weight is 0 and nothing else,
/// no expert twice in a row, counts equal to the occurrences, stats agree.
void check_plan(const Router& router, const RoutingPlan& plan, std::int64_t T) {
  const int E = router.num_experts();
  const int K = router.slots_per_token();
  REQUIRE(plan.num_tokens == T);
  REQUIRE(plan.slots == K);
  REQUIRE(plan.experts.size() == static_cast<std::size_t>(T * K));
  REQUIRE(plan.weights.size() == plan.experts.size());
  std::vector<std::int64_t> counts(static_cast<std::size_t>(E), 0);
  for (std::int64_t t = 0; t < T; ++t) {
    std::set<int> seen;
    for (int j = 0; j < K; ++j) {
      const auto i = static_cast<std::size_t>(t * K + j);
      const int e = plan.experts[i];
      CHECK(e >= -1);
      CHECK(e < E);
      if (e < 0) {
        CHECK(plan.weights[i] == 0.0f);
        continue;
      }
      CHECK(std::isfinite(plan.weights[i]));
      CHECK(seen.insert(e).second);
      ++counts[static_cast<std::size_t>(e)];
    }
  }
  CHECK(std::vector<std::int64_t>(plan.counts.begin(), plan.counts.end()) == counts);
  CHECK(router.stats().counts == counts);
  CHECK(router.stats().tokens == T);
}

}  // namespace

TEST_CASE("every policy: T = 0, T = 1, k = E, large T, and the same plan twice") {
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  for (const Policy& p : kPolicies) {
    CAPTURE(p.name);
    for (auto [E, k] : {std::pair{4, 1}, std::pair{8, 2}, std::pair{8, 8}}) {
      CAPTURE(E);
      CAPTURE(k);
      auto m = make(p, k, E);
      for (std::int64_t T : {0, 1, 5, 2000}) {
        CAPTURE(T);
        std::vector<float> z(static_cast<std::size_t>(T * E));
        for (auto& v : z) v = normal(rng);
        const RoutingPlan first = route(*m.router, z, T);
        check_plan(*m.router, first, T);
        const RoutingPlan again = route(*m.router, z, T);
        CHECK(std::equal(first.experts.begin(), first.experts.end(), again.experts.begin()));
        CHECK(std::equal(first.weights.begin(), first.weights.end(), again.weights.begin()));
        if (p.token_choice && T > 0) {
          std::int64_t kept = 0;
          for (auto c : first.counts) kept += c;
          CHECK(kept == T * k);  // nothing dropped in these settings
        }
      }
    }
  }
}

TEST_CASE("every policy: all-equal logits break ties to the lower index; aux_loss is 1") {
  for (const Policy& p : kPolicies) {
    CAPTURE(p.name);
    for (int k : {1, 2, 4}) {
      CAPTURE(k);
      const int E = 8;
      const std::int64_t T = 16;
      auto m = make(p, k, E);
      const RoutingPlan plan = route(*m.router, std::vector<float>(T * E, 0.25f), T);
      check_plan(*m.router, plan, T);
      if (p.token_choice) {
        for (std::int64_t t = 0; t < T; ++t) {
          for (int j = 0; j < k; ++j) CHECK(plan.experts[static_cast<std::size_t>(t * k + j)] == j);
        }
      } else {
        // Each expert takes the first C = ceil(T·k/E) tokens.
        const std::int64_t C = (T * k + E - 1) / E;
        for (int e = 0; e < E; ++e) CHECK(plan.counts[static_cast<std::size_t>(e)] == C);
        CHECK(plan.experts[0] == 0);
      }
      // Uniform probabilities 1/8 are exact in float: the loss is exactly 1.
      CHECK(m.router->stats().aux_loss == 1.0);
    }
  }
}

TEST_CASE("every policy: z_loss matches a float64 computation; NaN names token and expert") {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  const int E = 8;
  const std::int64_t T = 50;
  std::vector<float> z(static_cast<std::size_t>(T * E));
  for (auto& v : z) v = normal(rng);
  double expected = 0;
  for (std::int64_t t = 0; t < T; ++t) {
    double m = -1e300, s = 0;
    for (int e = 0; e < E; ++e)
      m = std::max(m, static_cast<double>(z[static_cast<std::size_t>(t * E + e)]));
    for (int e = 0; e < E; ++e)
      s += std::exp(static_cast<double>(z[static_cast<std::size_t>(t * E + e)]) - m);
    expected += (m + std::log(s)) * (m + std::log(s));
  }
  expected /= static_cast<double>(T);
  for (const Policy& p : kPolicies) {
    CAPTURE(p.name);
    auto m = make(p, 2, E);
    route(*m.router, z, T);
    CHECK(m.router->stats().z_loss == doctest::Approx(expected).epsilon(1e-6));
    std::vector<float> bad = z;
    bad[static_cast<std::size_t>(3 * E + 5)] = std::nanf("");
    CHECK_THROWS_WITH_AS(route(*m.router, bad, T), doctest::Contains("token 3, expert 5 is NaN"),
                         Error);
    CHECK_THROWS_WITH_AS(make(p, E + 1, E), doctest::Contains("top_k: must be in 1..8"), Error);
  }
}
