// router_expert_choice: hand-worked choices on the public 4x4 logits (probabilities from
// NumPy in float64), ties, tokens no expert takes, and the EP layer.
#include <doctest/doctest.h>

#include <limits>
#include <vector>

#include "router_support.hpp"
#include "switchyard/plugin.hpp"
#include "test_support.hpp"

using namespace switchyard;

namespace {

test::MadeRouter make(const std::string& settings, int experts) {
  return test::make_router("expert_choice", settings, experts);
}

RoutingPlan route(Router& router, std::vector<float> logits, std::int64_t tokens) {
  return test::route_logits(router, std::move(logits), tokens);
}

}  // namespace

TEST_CASE("each expert takes its C best tokens; rows list experts in ascending order") {
  // softmax(z) rows (NumPy, float64): [.2329 .2548 .2306 .2816] [.2666 .2946 .2205 .2183]
  // [.1961 .1942 .3201 .2896] [.1711 .1728 .3117 .3445]. k = 2 → capacity factor 2,
  // C = ceil(4·2/4) = 2: e0 and e1 take tokens 1, 0; e2 and e3 take tokens 2, 3.
  auto m = make("top_k = 2\n", 4);
  const RoutingPlan p = route(
      *m.router,
      {.11f, .2f, .1f, .3f, .3f, .4f, .11f, .1f, .11f, .1f, .6f, .5f, .1f, .11f, .7f, .8f}, 4);
  CHECK(p.slots == 4);
  CHECK(std::vector<std::int32_t>(p.experts.begin(), p.experts.end()) ==
        std::vector<std::int32_t>{0, 1, -1, -1, 0, 1, -1, -1, 2, 3, -1, -1, 2, 3, -1, -1});
  CHECK(p.weights[0] == doctest::Approx(0.2329).epsilon(1e-3));
  CHECK(p.weights[13] == doctest::Approx(0.3445).epsilon(1e-3));
  CHECK(p.weights[2] == 0.0f);
  CHECK(std::vector<std::int64_t>(p.counts.begin(), p.counts.end()) ==
        std::vector<std::int64_t>{2, 2, 2, 2});
  CHECK(m.router->stats().imbalance == 1.0);
}

TEST_CASE("ties go to the lower token; a token may get no expert; T = 0 is empty") {
  // All equal, E = 2, capacity factor 1: C = ceil(3/2) = 2, both experts take tokens 0, 1.
  auto m = make("top_k = 1\n", 2);
  const RoutingPlan p = route(*m.router, std::vector<float>(6, 0.0f), 3);
  CHECK(std::vector<std::int32_t>(p.experts.begin(), p.experts.end()) ==
        std::vector<std::int32_t>{0, 1, 0, 1, -1, -1});
  const RoutingPlan none = route(*m.router, {}, 0);
  CHECK(none.num_tokens == 0);
  CHECK(m.router->stats().aux_loss == 0.0);
  auto wide = make("top_k = 1\ncapacity_factor = 2.0\n", 2);  // C = 3: every token, both
  const RoutingPlan all = route(*wide.router, std::vector<float>(6, 0.0f), 3);
  CHECK(std::vector<std::int32_t>(all.experts.begin(), all.experts.end()) ==
        std::vector<std::int32_t>{0, 1, 0, 1, 0, 1});
  CHECK_THROWS_WITH_AS(make("capacity_factor = 0.0\n", 2), doctest::Contains("capacity_factor"),
                       Error);
}

TEST_CASE("under nan_policy = mask an expert takes its next best token instead") {
  // T = 4, E = 2, capacity_factor 1.5: C = ceil(4 · 1.5 / 2) = 3. Expert 0's logit is masked
  // for token 0; token 1's probability for expert 0 underflows to 0 (e^-200), so it ties
  // with the masked token's 0 and would lose the tie on index: expert 0 must still take it.
  // p[:,1] by hand: t0 1 (its only finite logit), t1 1, t2 1/(1+e) = .2689, t3 1/(1+e²) =
  // .1192, so expert 1 takes tokens 0, 1, 2.
  const float nan = std::numeric_limits<float>::quiet_NaN();
  auto m = make("top_k = 1\ncapacity_factor = 1.5\nnan_policy = \"mask\"\n", 2);
  const RoutingPlan p = route(*m.router, {nan, 0.0f, -200.0f, 0.0f, 1.0f, 0.0f, 2.0f, 0.0f}, 4);
  CHECK(std::vector<std::int32_t>(p.experts.begin(), p.experts.end()) ==
        std::vector<std::int32_t>{1, -1, 0, 1, 0, 1, 0, -1});
  CHECK(std::vector<std::int64_t>(p.counts.begin(), p.counts.end()) ==
        std::vector<std::int64_t>{3, 3});
  CHECK(p.weights[2] == 0.0f);  // token 1, expert 0: taken with its (underflowed) p
  CHECK(p.weights[4] == doctest::Approx(0.7311).epsilon(1e-3));
  CHECK(p.weights[5] == doctest::Approx(0.2689).epsilon(1e-3));
}
