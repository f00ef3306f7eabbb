// router_topk against hand-computed cases and an independent, sort-based implementation
// of docs/routing.md's `topk`.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "router_support.hpp"
#include "switchyard/io.hpp"
#include "switchyard/plugin.hpp"
#include "switchyard/status.hpp"
#include "test_support.hpp"

using namespace switchyard;

namespace {

test::MadeRouter make(const std::string& settings, int experts,
                      const std::vector<float>& checkpoint_bias = {}) {
  return test::make_router("topk", settings, experts, checkpoint_bias);
}

using test::values;

RoutingPlan route(Router& router, std::vector<float> logits, std::int64_t tokens) {
  return test::route_logits(router, std::move(logits), tokens);
}

struct Settings {
  int k = 2;
  bool sigmoid = false;
  bool pre_softmax = true;
  bool normalize = false;
  float scale = 1.0f;
  std::vector<float> bias;
};

Settings settings(int k, bool sigmoid = false, bool pre_softmax = true, bool normalize = false,
                  float scale = 1.0f, std::vector<float> bias = {}) {
  return Settings{k, sigmoid, pre_softmax, normalize, scale, std::move(bias)};
}

/// docs/routing.md's topk written independently: sort experts by (score desc, index asc).
void reference_topk(const Settings& s, const std::vector<float>& z, int E,
                    std::vector<int>& experts, std::vector<float>& weights) {
  const std::size_t T = z.size() / static_cast<std::size_t>(E);
  experts.assign(T * static_cast<std::size_t>(s.k), -1);
  weights.assign(experts.size(), 0.0f);
  for (std::size_t t = 0; t < T; ++t) {
    std::vector<float> score(static_cast<std::size_t>(E));
    const float* row = &z[t * static_cast<std::size_t>(E)];
    if (s.sigmoid) {
      for (int e = 0; e < E; ++e)
        score[static_cast<std::size_t>(e)] = 1.0f / (1.0f + std::exp(-row[e]));
    } else if (s.pre_softmax) {
      const float m = *std::max_element(row, row + E);
      float sum = 0;
      for (int e = 0; e < E; ++e) sum += score[static_cast<std::size_t>(e)] = std::exp(row[e] - m);
      for (auto& v : score) v /= sum;
    } else {
      std::copy(row, row + E, score.begin());
    }
    std::vector<int> order(static_cast<std::size_t>(E));
    std::iota(order.begin(), order.end(), 0);
    auto key = [&](int e) {
      return score[static_cast<std::size_t>(e)] +
             (s.bias.empty() ? 0.0f : s.bias[static_cast<std::size_t>(e)]);
    };
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return key(a) > key(b); });
    std::vector<float> w(static_cast<std::size_t>(s.k));
    for (int j = 0; j < s.k; ++j)
      w[static_cast<std::size_t>(j)] =
          score[static_cast<std::size_t>(order[static_cast<std::size_t>(j)])];
    if (!s.sigmoid && !s.pre_softmax) {
      const float m = *std::max_element(w.begin(), w.end());
      float sum = 0;
      for (auto& v : w) sum += v = std::exp(v - m);
      for (auto& v : w) v /= sum;
    }
    if (s.normalize) {
      const float sum = std::accumulate(w.begin(), w.end(), 0.0f);
      for (auto& v : w) v /= sum + 1e-20f;
    }
    for (int j = 0; j < s.k; ++j) {
      experts[t * static_cast<std::size_t>(s.k) + static_cast<std::size_t>(j)] =
          order[static_cast<std::size_t>(j)];
      weights[t * static_cast<std::size_t>(s.k) + static_cast<std::size_t>(j)] =
          w[static_cast<std::size_t>(j)] * s.scale;
    }
  }
}

}  // namespace

TEST_CASE("softmax top-2 by hand") {
  auto m = make("top_k = 2\n", 4);
  const RoutingPlan plan = route(*m.router, {1, 2, 3, 4}, 1);
  CHECK(plan.slots == 2);
  CHECK(values(plan.experts) == std::vector<std::int32_t>{3, 2});
  const double denom = std::exp(1.0) + std::exp(2.0) + std::exp(3.0) + std::exp(4.0);
  CHECK(plan.weights[0] == doctest::Approx(std::exp(4.0) / denom));
  CHECK(plan.weights[1] == doctest::Approx(std::exp(3.0) / denom));
  CHECK(values(plan.counts) == std::vector<std::int64_t>{0, 0, 1, 1});
}

TEST_CASE("ties go to the lower expert index") {
  auto m = make("top_k = 3\n", 5);
  const RoutingPlan plan = route(*m.router, {0, 1, 1, 0, 1}, 1);
  CHECK(values(plan.experts) == std::vector<std::int32_t>{1, 2, 4});
  auto zeros = route(*m.router, std::vector<float>(5, 0.0f), 1);
  CHECK(values(zeros.experts) == std::vector<std::int32_t>{0, 1, 2});
}

TEST_CASE("Mixtral: top-k of logits, softmax over the k") {
  auto m = make("top_k = 2\npre_softmax = false\n", 4);
  const RoutingPlan plan = route(*m.router, {0.5f, 3.0f, -1.0f, 2.0f}, 1);
  CHECK(values(plan.experts) == std::vector<std::int32_t>{1, 3});
  CHECK(plan.weights[0] == doctest::Approx(1.0 / (1.0 + std::exp(-1.0))));
  CHECK(plan.weights[0] + plan.weights[1] == doctest::Approx(1.0));
}

TEST_CASE("sigmoid normalises by default; bias selects but does not weigh") {
  auto m = make("top_k = 2\nscore = \"sigmoid\"\n", 3, {0.0f, 0.0f, 5.0f});
  const RoutingPlan plan = route(*m.router, {2.0f, 1.0f, -1.0f}, 1);
  CHECK(values(plan.experts) == std::vector<std::int32_t>{2, 0});  // the bias lifts expert 2
  const double s2 = 1 / (1 + std::exp(1.0)), s0 = 1 / (1 + std::exp(-2.0));
  CHECK(plan.weights[0] == doctest::Approx(s2 / (s2 + s0)));
  CHECK(plan.weights[1] == doctest::Approx(s0 / (s2 + s0)));
  auto unnormalised = make("top_k = 2\nscore = \"sigmoid\"\nnormalize = false\nscale = 2.5\n", 3);
  const RoutingPlan p2 = route(*unnormalised.router, {2.0f, 1.0f, -1.0f}, 1);
  CHECK(p2.weights[0] == doctest::Approx(2.5 * s0));
}

TEST_CASE("sqrtsoftplus (DeepSeek-V4): √softplus scores, normalised, bias selects only") {
  // Hand-worked: s = √log(1 + e^z) per expert; the bias lifts expert 2 into the top 2; the
  // weights are the selected scores over their sum, times the scale; z above 20 is its own
  // softplus.
  auto m = make("top_k = 2\nscore = \"sqrtsoftplus\"\nscale = 1.5\n", 4, {0.0f, 0.0f, 3.0f, 0.0f});
  const RoutingPlan plan = route(*m.router, {2.0f, 1.0f, -1.0f, 30.0f}, 1);
  CHECK(values(plan.experts) == std::vector<std::int32_t>{3, 2});
  const double s3 = std::sqrt(30.0), s2 = std::sqrt(std::log(1 + std::exp(-1.0)));
  CHECK(plan.weights[0] == doctest::Approx(1.5 * s3 / (s3 + s2)));
  CHECK(plan.weights[1] == doctest::Approx(1.5 * s2 / (s3 + s2)));
  // Not normalised when asked; the aux loss's P is s / Σ s.
  auto plain = make("top_k = 1\nscore = \"sqrtsoftplus\"\nnormalize = false\n", 2);
  const RoutingPlan p2 = route(*plain.router, {0.5f, -0.5f}, 1);
  CHECK(p2.experts[0] == 0);
  CHECK(p2.weights[0] == doctest::Approx(std::sqrt(std::log(1 + std::exp(0.5)))));
  const double a = std::sqrt(std::log(1 + std::exp(0.5))),
               b = std::sqrt(std::log(1 + std::exp(-0.5)));
  CHECK(plain.router->stats().probability_sums[0] == doctest::Approx(a / (a + b)));
  // The device routings do not know it: a device data path routes it on the host.
  CHECK_FALSE(m.router->token_choice_spec(nullptr).has_value());
}

TEST_CASE("matches the independent implementation on random logits") {
  test::TempDir dir;
  const int E = 12;
  const std::int64_t T = 64;
  const HostTensor logits = synthetic_tokens(T, E, 99);
  std::vector<float> z(logits.data<float>(), logits.data<float>() + T * E);
  for (auto& v : z) v *= 4.0f;
  HostTensor bias(DType::kF32, {E});
  for (int e = 0; e < E; ++e) bias.data<float>()[e] = 0.05f * static_cast<float>(e % 5) - 0.1f;
  write_npy(dir / "bias.npy", bias.view());
  const std::string bias_line = "bias = \"" + (dir / "bias.npy").string() + "\"\n";
  const std::vector<float> bias_values(bias.data<float>(), bias.data<float>() + E);

  struct Variant {
    std::string toml;
    Settings settings;
  };
  const std::vector<Variant> variants = {
      {"top_k = 1\n", settings(1)},
      {"top_k = 4\n", settings(4)},
      {"top_k = 4\nnormalize = true\nscale = 1.5\n", settings(4, false, true, true, 1.5f)},
      {"top_k = 2\npre_softmax = false\n", settings(2, false, false)},
      {"top_k = 3\nscore = \"sigmoid\"\n", settings(3, true, true, true)},
      {"top_k = 3\nscore = \"sigmoid\"\n" + bias_line,
       settings(3, true, true, true, 1.0f, bias_values)},
      {"top_k = 2\n" + bias_line, settings(2, false, true, false, 1.0f, bias_values)},
      {"top_k = 12\n", settings(12)},
  };
  for (const auto& v : variants) {
    CAPTURE(v.toml);
    auto m = make(v.toml, E);
    const RoutingPlan plan = route(*m.router, z, T);
    std::vector<int> experts;
    std::vector<float> weights;
    reference_topk(v.settings, z, E, experts, weights);
    CHECK(std::equal(experts.begin(), experts.end(), plan.experts.begin()));
    for (std::size_t i = 0; i < weights.size(); ++i) {
      CHECK(plan.weights[i] == doctest::Approx(weights[i]).epsilon(1e-6));
    }
    std::vector<std::int64_t> counts(E, 0);
    for (int e : experts) ++counts[static_cast<std::size_t>(e)];
    CHECK(values(plan.counts) == counts);
    CHECK(m.router->stats().counts == counts);
  }
}

TEST_CASE("statistics: imbalance, aux_loss and z_loss") {
  auto m = make("top_k = 1\n", 4);
  // Uniform logits: P = 1/4 everywhere; every token's plain top-1 is expert 0.
  route(*m.router, std::vector<float>(4 * 4, 0.0f), 4);
  const RouterStats& s = m.router->stats();
  CHECK(s.counts == std::vector<std::int64_t>{4, 0, 0, 0});
  CHECK(s.imbalance == doctest::Approx(4.0));
  CHECK(s.aux_loss == doctest::Approx(1.0));  // E/(k T^2) * (T/4 * T) = 1
  CHECK(s.z_loss == doctest::Approx(std::log(4.0) * std::log(4.0)));
  CHECK(s.dropped == 0);
  // Perfect balance with confident routing: aux_loss close to 1 from above.
  std::vector<float> z(4 * 4, -20.0f);
  for (int t = 0; t < 4; ++t) z[static_cast<std::size_t>(t * 4 + t)] = 20.0f;
  route(*m.router, z, 4);
  CHECK(m.router->stats().imbalance == doctest::Approx(1.0));
  CHECK(m.router->stats().aux_loss == doctest::Approx(1.0).epsilon(1e-6));
  // No tokens: empty plan, zero statistics.
  const RoutingPlan empty = route(*m.router, {}, 0);
  CHECK(empty.experts.empty());
  CHECK(m.router->stats().aux_loss == 0);
}

TEST_CASE("NaN and Inf logits: an error naming the token and expert, or masked") {
  auto m = make("top_k = 2\n", 4);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  CHECK(test::error_message([&] {
          route(*m.router, {0, 0, 0, 0, 0, 1, nan, 0}, 2);
        }).find("logit of token 1, expert 2 is NaN") != std::string::npos);
  CHECK(test::error_message([&] {
          route(*m.router, {0, std::numeric_limits<float>::infinity(), 0, 0}, 1);
        }).find("token 0, expert 1 is infinite") != std::string::npos);
  auto masked = make("top_k = 2\nnan_policy = \"mask\"\n", 4);
  const RoutingPlan plan = route(*masked.router, {5, nan, 4, 0, nan, nan, nan, 1}, 2);
  CHECK(values(plan.experts) ==
        std::vector<std::int32_t>{0, 2, 3, -1});  // token 1 has one usable expert
  CHECK(plan.weights[3] == 0.0f);
  CHECK(plan.weights[2] == doctest::Approx(1.0));
}

TEST_CASE("configuration errors are reported before any routing") {
  CHECK(test::error_message([] { make("top_k = 0\n", 4); }) ==
        "router.toml:2:9: router.top_k: must be in 1..4 (the number of experts) (got 0)");
  CHECK(test::error_message([] { make("top_k = 5\n", 4); }).find("router.top_k: must be in 1..4") !=
        std::string::npos);
  CHECK(test::error_message([] {
          make("score = \"softmax2\"\n", 4);
        }).find("router.score: must be one of") != std::string::npos);
  test::TempDir dir;
  HostTensor wrong(DType::kF32, {3});
  write_npy(dir / "b.npy", wrong.view());
  CHECK(test::error_message([&] {
          make("bias = \"" + (dir / "b.npy").string() + "\"\n", 4);
        }).find("router.bias: " + (dir / "b.npy").string() + " must be float32 [4]") !=
        std::string::npos);
  CHECK(test::error_message([] {
          make("top_k = 1\n", 2, {1.0f, 2.0f, 3.0f});
        }).find("checkpoint bias has 3 entries") != std::string::npos);
}

TEST_CASE("bias balancing moves the bias against the load") {
  auto m = make("top_k = 1\nbias_update_rate = 0.01\n", 3);
  CHECK(std::vector<float>(m.router->bias().begin(), m.router->bias().end()) ==
        std::vector<float>{0, 0, 0});
  const std::int64_t counts[] = {10, 5, 0};  // mean 5
  m.router->update(counts);
  CHECK(m.router->bias()[0] == doctest::Approx(-0.01));
  CHECK(m.router->bias()[1] == 0.0f);
  CHECK(m.router->bias()[2] == doctest::Approx(0.01));
  auto off = make("top_k = 1\n", 3);
  off.router->update(counts);
  CHECK(off.router->bias().empty());
}

TEST_CASE("a bias file takes precedence over the checkpoint's e_score_correction_bias") {
  test::TempDir dir;
  HostTensor file_bias(DType::kF32, {4});
  for (int e = 0; e < 4; ++e) file_bias.data<float>()[e] = e == 3 ? 5.0f : 0.0f;
  write_npy(dir / "bias.npy", file_bias.view());
  const std::vector<float> checkpoint_bias = {5.0f, 0.0f, 0.0f, 0.0f};
  // Only the checkpoint's: expert 0 is lifted.
  auto from_checkpoint = make("top_k = 1\n", 4, checkpoint_bias);
  CHECK(values(route(*from_checkpoint.router, {0, 1, 2, 3}, 1).experts) ==
        std::vector<std::int32_t>{0});
  // Both: the file wins, expert 3 is lifted.
  auto both =
      make("top_k = 1\nbias = \"" + (dir / "bias.npy").string() + "\"\n", 4, checkpoint_bias);
  CHECK(std::vector<float>(both.router->bias().begin(), both.router->bias().end()) ==
        std::vector<float>{0.0f, 0.0f, 0.0f, 5.0f});
  CHECK(values(route(*both.router, {3, 2, 1, 0}, 1).experts) == std::vector<std::int32_t>{3});
}
