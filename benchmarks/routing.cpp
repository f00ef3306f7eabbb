// How fast do the routing policies route? Times `Router::route` of the real router plugins
// (what `switchyard route` and the EP layer call) on float32 logits [T,E] drawn from a
// standard normal distribution, against two reference points measured in the same run:
//   read:  reading the logits once (a sum of every value) — the memory floor;
//   sort:  a plain full sort of every row (std::sort of the E expert indices by logit,
//          descending, ties to the lower index), then the first k — the naive router;
//   softmax: softmax_row over every row (one exponential per logit, which every policy
//          needs at least for the z-loss's log-sum-exp).
// Prints, per policy, the median of the runs, tokens per second, the speed-up over the
// sort and the ratio to the read.
// usage: routing [tokens] [experts] [top_k] [runs] [policy label filter]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "switchyard/config.hpp"
#include "switchyard/plugin.hpp"
#include "switchyard/router.hpp"
#include "switchyard/routing_rows.hpp"
#include "switchyard/stream.hpp"
#include "switchyard/topology.hpp"

namespace {

/// Cases timed round by round (every case once per round, so that a slow spell of a shared
/// machine touches them alike); the median of each over the rounds.
class Rounds {
 public:
  void add(std::function<void()> run) { cases_.push_back({std::move(run), {}}); }
  void time(int rounds) {
    for (auto& c : cases_) c.run();  // warm-up: scratch grows, pages are touched
    for (int r = 0; r < rounds; ++r) {
      for (auto& c : cases_) {
        const auto start = std::chrono::steady_clock::now();
        c.run();
        c.seconds.push_back(
            std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
      }
    }
  }
  double median(std::size_t i) const {
    std::vector<double> t = cases_[i].seconds;
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
  }

 private:
  struct Case {
    std::function<void()> run;
    std::vector<double> seconds;
  };
  std::vector<Case> cases_;
};

struct Policy {
  const char* label;
  const char* name;         // the router plugin
  std::string router_toml;  // its [router] options
};

}  // namespace

int main(int argc, char** argv) {
  using namespace switchyard;
  const std::int64_t T = argc > 1 ? std::atoll(argv[1]) : 65536;
  const int E = argc > 2 ? std::atoi(argv[2]) : 256;
  const int k = argc > 3 ? std::atoi(argv[3]) : 8;
  const int runs = argc > 4 ? std::atoi(argv[4]) : 5;
  const std::string only = argc > 5 ? argv[5] : "";
  const auto TE = static_cast<std::size_t>(T) * static_cast<std::size_t>(E);

  std::vector<float> logits(TE);
  std::mt19937 rng(2024);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (auto& v : logits) v = normal(rng);

  // Volatile sinks keep the reference loops from being optimised away.
  volatile float read_sink = 0;
  Rounds rounds;
  rounds.add([&] {
    float lanes[16] = {};
    for (std::size_t i = 0; i + 16 <= TE; i += 16) {
      for (int l = 0; l < 16; ++l) lanes[l] += logits[i + static_cast<std::size_t>(l)];
    }
    read_sink = std::accumulate(lanes, lanes + 16, 0.0f);
  });

  std::vector<int> order(static_cast<std::size_t>(E));
  std::vector<std::int32_t> sorted_experts(static_cast<std::size_t>(T) * k);
  rounds.add([&] {
    for (std::int64_t t = 0; t < T; ++t) {
      const float* row = &logits[static_cast<std::size_t>(t) * E];
      std::iota(order.begin(), order.end(), 0);
      std::sort(order.begin(), order.end(),
                [row](int a, int b) { return row[a] != row[b] ? row[a] > row[b] : a < b; });
      std::copy(order.begin(), order.begin() + k, &sorted_experts[static_cast<std::size_t>(t) * k]);
    }
  });

  std::vector<float> probabilities(static_cast<std::size_t>(E));
  volatile double softmax_sink = 0;
  rounds.add([&] {
    double lse = 0;
    for (std::int64_t t = 0; t < T; ++t)
      lse += softmax_row(&logits[static_cast<std::size_t>(t) * E], E, probabilities.data(), false);
    softmax_sink = lse;
  });

  const std::string common = "top_k = " + std::to_string(k) + "\n";
  const std::vector<Policy> policies = {
      {"topk softmax", "topk", common},
      {"topk softmax, Mixtral (pre_softmax = false)", "topk", "pre_softmax = false\n" + common},
      {"topk sigmoid", "topk", "score = \"sigmoid\"\n" + common},
      {"node_limited softmax G=8 M=4", "node_limited", "num_groups = 8\nmax_groups = 4\n" + common},
      {"node_limited sigmoid G=8 M=4, bias, top2_sum (DeepSeek-V3)", "node_limited",
       "score = \"sigmoid\"\nnum_groups = 8\nmax_groups = 4\ngroup_score = \"top2_sum\"\n"
       "bias_update_rate = 0.001\n" +
           common},
      {"capacity softmax 1.25, probs", "capacity", "capacity_factor = 1.25\n" + common},
      {"capacity softmax 1.25, position", "capacity",
       "capacity_factor = 1.25\ndrop_policy = \"position\"\n" + common},
      {"expert_choice (capacity_factor = k)", "expert_choice", common},
  };

  const PluginRegistry registry(PluginRegistry::default_search_path());
  const Topology topology = Topology::uniform(1, 1);
  HostStream stream;
  RouteInput input;
  input.logits = TensorView(logits.data(), DType::kF32, {T, E});
  input.topology = &topology;
  struct Timed {
    const Policy* policy;
    ConfigSection options;
    std::shared_ptr<Router> router;
    RoutingPlan plan;
  };
  std::vector<std::unique_ptr<Timed>> timed;
  for (const Policy& p : policies) {
    if (std::string(p.label).find(only) == std::string::npos) continue;
    const Config config = Config::from_string("[router]\n" + p.router_toml, "bench.toml");
    auto t = std::make_unique<Timed>();
    t->policy = &p;
    t->options = config.section("router", registry.options(PluginKind::kRouter, p.name));
    RouterCreateArgs args;
    args.options = &t->options;
    args.num_experts = E;
    t->router = registry.create_router(p.name, args);
    Timed* raw = t.get();
    rounds.add([&, raw] {
      raw->router->route(input, raw->plan, stream);
      stream.synchronize();
    });
    timed.push_back(std::move(t));
  }
  rounds.time(runs);

  const double read_s = rounds.median(0), sort_s = rounds.median(1);
  const double softmax_s = rounds.median(2);
  std::printf("routing T = %lld tokens, E = %d experts, k = %d; median of %d rounds\n",
              static_cast<long long>(T), E, k, runs);
  std::printf("read the logits once:     %9.2f ms\n", read_s * 1e3);
  std::printf("std::sort every row:      %9.2f ms  %12.0f tokens/s\n", sort_s * 1e3,
              static_cast<double>(T) / sort_s);
  std::printf("softmax_row every row:    %9.2f ms  (%.2f× read)\n\n", softmax_s * 1e3,
              softmax_s / read_s);
  std::printf("| policy | ms | tokens/s | speed-up over sort | × read | × softmax |\n");
  std::printf("| --- | --- | --- | --- | --- | --- |\n");
  for (std::size_t i = 0; i < timed.size(); ++i) {
    const double s = rounds.median(i + 3);
    std::printf("| %s | %.2f | %.3g | %.1f× | %.1f× | %.1f× |\n", timed[i]->policy->label, s * 1e3,
                static_cast<double>(T) / s, sort_s / s, s / read_s, s / softmax_s);
  }
  return 0;
}
