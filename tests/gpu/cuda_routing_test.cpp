// Device routing (datapath_cuda's route_token_choice) against the host router plugins on
// the same logits: the same experts and the same weights bit for bit, the same counts and
// aux counts, and the float64 sums within rounding (they are added atomically on the
// device). Every token-choice setting of docs/routing.md that the device path takes: softmax
// before and after selection, sigmoid, bias, normalisation, scale, groups scored by max,
// top2_sum and topk_sum; E not a multiple of the lanes; NaN refused like the host.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cuda_test_support.hpp"
#include "switchyard/data_path.hpp"
#include "switchyard/plugin.hpp"
#include "switchyard/stream.hpp"

using namespace switchyard;

namespace {

PluginRegistry& registry() {
  static PluginRegistry r(PluginRegistry::default_search_path());
  return r;
}

std::shared_ptr<Router> host_router(const std::string& policy, const std::string& settings, int E) {
  static std::vector<std::unique_ptr<ConfigSection>> keep;  // options outlive the routers
  const Config c = Config::from_string("[router]\n" + settings, "router.toml");
  keep.push_back(std::make_unique<ConfigSection>(
      c.section("router", registry().options(PluginKind::kRouter, policy))));
  RouterCreateArgs args;
  args.options = keep.back().get();
  args.num_experts = E;
  return registry().create_router(policy, args);
}

}  // namespace

TEST_CASE("device routing equals the host routers bit for bit") {
  auto path = registry().create_data_path("cuda", DataPathCreateArgs{});
  test::CudaStream stream;
  std::mt19937 rng(17);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  struct Case {
    const char* policy;
    std::string settings;
    int E;
  };
  const std::vector<Case> cases = {
      {"topk", "top_k = 2\n", 8},
      {"topk", "top_k = 8\n", 256},
      {"topk", "top_k = 8\npre_softmax = false\n", 64},
      {"topk", "top_k = 6\nscore = \"sigmoid\"\nscale = 2.5\n", 1000},
      {"topk", "top_k = 4\nnormalize = true\nbias_update_rate = 0.01\n", 37},
      {"topk", "top_k = 32\nscore = \"sigmoid\"\nnormalize = false\n", 1024},
      {"node_limited", "top_k = 8\nnum_groups = 8\nmax_groups = 4\n", 256},
      {"node_limited",
       "top_k = 8\nscore = \"sigmoid\"\nnum_groups = 8\nmax_groups = 4\ngroup_score = "
       "\"top2_sum\"\nbias_update_rate = 0.001\n",
       256},
      {"node_limited", "top_k = 6\nnum_groups = 4\nmax_groups = 2\ngroup_score = \"topk_sum\"\n",
       64},
  };
  const std::int64_t T = 517;
  for (const Case& c : cases) {
    CAPTURE(c.policy);
    CAPTURE(c.settings);
    auto router = host_router(c.policy, c.settings, c.E);
    if (router->updates_from_counts()) {
      // A bias that is not zero: one update from skewed counts.
      std::vector<std::int64_t> counts(static_cast<std::size_t>(c.E));
      for (int e = 0; e < c.E; ++e) counts[static_cast<std::size_t>(e)] = e % 5;
      router->update(counts);
    }
    std::vector<float> logits(static_cast<std::size_t>(T * c.E));
    for (auto& v : logits) v = normal(rng);
    logits[5] = logits[6];  // a tie

    RoutingPlan host_plan;
    RouteInput input;
    input.logits = TensorView(logits.data(), DType::kF32, {T, c.E});
    HostStream host_stream;
    router->route(input, host_plan, host_stream);
    const RouterStats host_stats = router->stats();

    const auto spec = router->token_choice_spec(nullptr);
    REQUIRE(spec.has_value());
    test::DeviceArray<float> d_logits(logits);
    RoutingPlan device_plan(path->allocator());
    RouterStats device_stats;
    REQUIRE(path->route_token_choice(
        *spec, TensorView(d_logits.get(), DType::kF32, {T, c.E}, Device::cuda(0)), device_plan,
        stream));
    stream.synchronize();  // the statistics come with the stream's next wait
    path->finish_route_token_choice(device_stats);
    std::vector<std::int32_t> experts(host_plan.experts.size());
    std::vector<float> weights(host_plan.weights.size());
    SWITCHYARD_CUDA_CHECK(cudaMemcpy(experts.data(), device_plan.experts.data(), experts.size() * 4,
                                     cudaMemcpyDeviceToHost));
    SWITCHYARD_CUDA_CHECK(cudaMemcpy(weights.data(), device_plan.weights.data(), weights.size() * 4,
                                     cudaMemcpyDeviceToHost));
    CHECK(std::memcmp(experts.data(), host_plan.experts.data(), experts.size() * 4) == 0);
    CHECK(std::memcmp(weights.data(), host_plan.weights.data(), weights.size() * 4) == 0);
    CHECK(device_stats.counts == host_stats.counts);
    CHECK(device_stats.aux_counts == host_stats.aux_counts);
    for (int e = 0; e < c.E; ++e) {
      CHECK(
          device_stats.probability_sums[static_cast<std::size_t>(e)] ==
          doctest::Approx(host_stats.probability_sums[static_cast<std::size_t>(e)]).epsilon(1e-9));
    }
    CHECK(device_stats.z_loss_sum == doctest::Approx(host_stats.z_loss_sum).epsilon(1e-9));
  }
}

TEST_CASE("device routing refuses NaN logits with the host's message") {
  auto path = registry().create_data_path("cuda", DataPathCreateArgs{});
  test::CudaStream stream;
  auto router = host_router("topk", "top_k = 2\n", 8);
  std::vector<float> logits(8 * 10, 0.5f);
  logits[3 * 8 + 5] = std::numeric_limits<float>::quiet_NaN();
  logits[7 * 8 + 1] = std::numeric_limits<float>::infinity();
  test::DeviceArray<float> d_logits(logits);
  RoutingPlan plan(path->allocator());
  RouterStats stats;
  REQUIRE(path->route_token_choice(
      *router->token_choice_spec(nullptr),
      TensorView(d_logits.get(), DType::kF32, {10, 8}, Device::cuda(0)), plan, stream));
  stream.synchronize();
  CHECK_THROWS_WITH_AS(path->finish_route_token_choice(stats),
                       doctest::Contains("router topk: logit of token 3, expert 5 is NaN"), Error);
  // The bad tokens got no expert: the layout after the routing stays valid.
  std::vector<std::int32_t> experts(20);
  SWITCHYARD_CUDA_CHECK(
      cudaMemcpy(experts.data(), plan.experts.data(), 20 * 4, cudaMemcpyDeviceToHost));
  for (int t : {3, 7}) {
    CHECK(experts[static_cast<std::size_t>(2 * t)] == -1);
    CHECK(experts[static_cast<std::size_t>(2 * t + 1)] == -1);
  }
  CHECK(experts[0] >= 0);
}
