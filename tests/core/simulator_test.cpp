// The routing simulator: its byte accounting equals what the runtime's layer measures on
// the same logits and placement; under uniform routing its distinct nodes and remote
// copies per token match their closed forms; node-limited routing keeps every token on
// at most M nodes; the H800 prediction against DeepEP's published internode bandwidth;
// the time model by hand; bad input refused before any work.
#include <doctest/doctest.h>

#include <cmath>
#include <memory>
#include <vector>

#include "router_support.hpp"
#include "switchyard/layer.hpp"
#include "switchyard/runtime.hpp"
#include "switchyard/simulator.hpp"
#include "test_support.hpp"

using namespace switchyard;
using sim::Accounting;

namespace {

/// A setting whose routers come from the real loader with `settings` as [router] lines;
/// the configuration sections are kept alive beside them.
sim::RouterSetting setting(const std::string& policy, const std::string& settings, int experts) {
  auto made = std::make_shared<std::vector<test::MadeRouter>>();
  return {policy + " " + settings, [=] {
            made->push_back(test::make_router(policy, settings, experts));
            return made->back().router;
          }};
}

/// C(n - m, k) / C(n, k): the chance that k of n distinct items avoid m given ones.
double avoid(int n, int m, int k) {
  double p = 1;
  for (int i = 0; i < k; ++i) p *= static_cast<double>(n - m - i) / (n - i);
  return p;
}

/// Copies per token that cross nodes, under `accounting`.
double inter_node_copies(const sim::ClusterSpec& spec, const sim::Traffic& t, Accounting a) {
  const int W = spec.world();
  double copies = 0;
  for (int s = 0; s < W; ++s) {
    for (int d = 0; d < W; ++d) {
      if (s / spec.gpus_per_node == d / spec.gpus_per_node) continue;
      copies +=
          static_cast<double>(t.copies[static_cast<int>(a)][static_cast<std::size_t>(s * W + d)]);
    }
  }
  return copies / static_cast<double>(t.tokens);
}

sim::ClusterSpec cluster(int nodes, int gpus, int experts, std::int64_t hidden) {
  sim::ClusterSpec spec;
  spec.nodes = nodes;
  spec.gpus_per_node = gpus;
  spec.num_experts = experts;
  spec.hidden = hidden;
  spec.links = sim::link_preset("h800");
  return spec;
}

}  // namespace

TEST_CASE("the simulator's bytes per rank equal what the runtime's layer measures") {
  // World 4 as two emulated nodes of 2 ranks; the logits the runtime computes from its
  // gate, given to the simulator rank by rank.
  struct Variant {
    std::string policy, router;
    int ep_size;
    const char* payload;
  };
  for (const Variant& v : {Variant{"topk", "top_k = 3", 0, "bf16"},
                           Variant{"node_limited", "top_k = 2\nmax_groups = 1", 0, "fp8"},
                           Variant{"topk", "top_k = 2", 2, "f32"},
                           Variant{"capacity", "top_k = 2\ncapacity_factor = 0.5", 0, "bf16"}}) {
    CAPTURE(v.policy);
    CAPTURE(v.ep_size);
    Config config;
    config.set("runtime", "ranks", std::int64_t{4});
    config.set("runtime", "ranks_per_node", std::int64_t{2});
    config.set("runtime", "ep_size", std::int64_t{v.ep_size});
    config.set("runtime", "payload_dtype", std::string(v.payload));
    config.set("runtime", "combine_dtype", std::string("bf16"));
    config.set("runtime", "timeout_s", 60.0);
    config.set("router", "policy", v.policy);
    for (const auto& line : {v.router}) {
      std::string text(line);
      std::size_t start = 0;
      while (start < text.size()) {
        const std::size_t end = text.find('\n', start);
        std::string item = text.substr(start, end == std::string::npos ? end : end - start);
        item.erase(std::remove(item.begin(), item.end(), ' '), item.end());
        config.set_from_command_line("router." + item);
        if (end == std::string::npos) break;
        start = end + 1;
      }
    }
    config.set("model", "num_experts", std::int64_t{8});
    config.set("model", "hidden", std::int64_t{256});
    config.set("model", "ffn_hidden", std::int64_t{16});
    Runtime runtime(config);
    constexpr std::int64_t T = 37;
    const HostTensor x = synthetic_tokens(T, 256, 4);
    HostTensor y(DType::kF32, {T, 256});
    runtime.forward(x.view(), y.view());

    std::vector<std::vector<float>> logits(4);
    std::vector<TensorView> views;
    for (int r = 0; r < 4; ++r) {
      const auto [first, count] = token_block(T, 4, r);
      logits[static_cast<std::size_t>(r)].resize(static_cast<std::size_t>(count * 8));
      compute_router_logits(
          TensorView(const_cast<float*>(x.data<float>()) + first * 256, DType::kF32, {count, 256}),
          runtime.model().gate().view(), logits[static_cast<std::size_t>(r)].data());
      views.emplace_back(logits[static_cast<std::size_t>(r)].data(), DType::kF32,
                         std::initializer_list<std::int64_t>{count, 8});
    }
    sim::ClusterSpec spec = cluster(2, 2, 8, 256);
    spec.ep_size = v.ep_size;
    spec.payload_dtype = parse_payload_dtype(v.payload);
    spec.combine_dtype = DType::kBF16;
    sim::Simulator simulator(spec, sim::LogitsSource::synthetic("normal", 8, 1, 1),
                             {setting(v.policy, v.router, 8)});
    const sim::Traffic t = simulator.step_on(views)[0];
    for (int r = 0; r < 4; ++r) {
      CAPTURE(r);
      CHECK(t.layer_dispatch_bytes[static_cast<std::size_t>(r)] ==
            runtime.layer(r).traffic().dispatch_bytes);
      CHECK(t.layer_combine_bytes[static_cast<std::size_t>(r)] ==
            runtime.layer(r).traffic().combine_bytes);
    }
    CHECK(t.tokens == T);
  }
}

TEST_CASE("uniform routing, E = 256, k = 8 on 8 nodes × 8 GPUs: the closed forms within 1 %") {
  constexpr int E = 256, k = 8, G = 8, R = 64;
  const sim::ClusterSpec spec = cluster(G, 8, E, 1024);
  sim::Simulator simulator(spec, sim::LogitsSource::synthetic("normal", E, 512, 7),
                           {setting("topk", "top_k = 8", E)});
  const sim::Traffic t = simulator.step(0)[0];
  REQUIRE(t.tokens == R * 512);
  const double tokens = static_cast<double>(t.tokens);
  // A token's 8 experts are a uniform 8-subset of the 256: a node (32 experts) or a rank
  // (4) is missed with probability C(E - m, k) / C(E, k).
  const double nodes = G * (1 - avoid(E, E / G, k));
  const double ranks = R * (1 - avoid(E, E / R, k));
  CHECK(static_cast<double>(t.distinct_nodes) / tokens == doctest::Approx(nodes).epsilon(0.01));
  CHECK(static_cast<double>(t.distinct_ranks) / tokens == doctest::Approx(ranks).epsilon(0.01));
  // Copies leaving the token's node: per expert k (G - 1) / G; per rank the other nodes'
  // ranks hit; per node the other nodes hit.
  CHECK(inter_node_copies(spec, t, Accounting::kPerExpert) ==
        doctest::Approx(k * (G - 1.0) / G).epsilon(0.01));
  CHECK(inter_node_copies(spec, t, Accounting::kPerRank) ==
        doctest::Approx((R - R / G) * (1 - avoid(E, E / R, k))).epsilon(0.01));
  CHECK(inter_node_copies(spec, t, Accounting::kPerNode) ==
        doctest::Approx((G - 1) * (1 - avoid(E, E / G, k))).epsilon(0.01));
  CHECK(static_cast<double>(t.remote_nodes) / tokens ==
        doctest::Approx((G - 1) * (1 - avoid(E, E / G, k))).epsilon(0.01));
  // Uniform load: every expert near k T / E.
  CHECK(t.imbalance() < 1.15);
  CHECK(t.max_nodes_per_token == G);  // some token reaches every node

  SUBCASE("node-limited, M = 4: no token reaches more than 4 nodes") {
    sim::Simulator limited(spec, sim::LogitsSource::synthetic("normal", E, 512, 7),
                           {setting("node_limited", "top_k = 8\nmax_groups = 4", E)});
    const sim::Traffic l = limited.step(0)[0];
    CHECK(l.max_nodes_per_token == 4);
    CHECK(static_cast<double>(l.distinct_nodes) / static_cast<double>(l.tokens) < 4.0);
    CHECK(inter_node_copies(spec, l, Accounting::kPerNode) <
          inter_node_copies(spec, t, Accounting::kPerNode));
  }
}

TEST_CASE("H800 preset against DeepEP's published internode dispatch: within 15 %") {
  // DeepEP's internode test: 4096 tokens per rank, hidden 7168, top-8 of 256 experts in at
  // most 4 nodes, FP8; its bandwidth counts tokens × distinct nodes (the local one too) ×
  // hidden bytes over the dispatch time. Published: 58 GB/s at 32 ranks, 51 at 64.
  for (const auto& [nodes, published] : {std::pair{4, 58.0}, std::pair{8, 51.0}}) {
    CAPTURE(nodes);
    sim::ClusterSpec spec = cluster(nodes, 8, 256, 7168);
    spec.payload_dtype = PayloadDType::kFP8;
    sim::Simulator simulator(spec, sim::LogitsSource::synthetic("normal", 256, 4096, 3),
                             {setting("node_limited", "top_k = 8\nmax_groups = 4", 256)});
    const sim::Traffic t = simulator.step(0)[0];
    const double counted_bytes_per_rank =
        static_cast<double>(t.distinct_nodes) * 7168.0 / static_cast<double>(spec.world());
    const sim::PhaseTime dispatch = sim::predict(spec, t, Accounting::kPerNode, 8, false);
    const double gb_per_s = counted_bytes_per_rank / dispatch.seconds / 1e9;
    MESSAGE(nodes << " nodes: predicted " << gb_per_s << " GB/s (DeepEP " << published
                  << "), bound by the " << dispatch.bottleneck);
    CHECK(gb_per_s == doctest::Approx(published).epsilon(0.15));
    CHECK(dispatch.bottleneck.rfind("NIC", 0) == 0);
  }
}

TEST_CASE("the time model by hand: bytes / bandwidth + latency of the busiest resource") {
  // 2 nodes × 2 GPUs, hidden 1000 f32 (4000-byte rows), k = 1: rank 0 sends 3 copies to
  // rank 2 (other node) and 5 to rank 1 (same node).
  sim::ClusterSpec spec = cluster(2, 2, 4, 1000);
  spec.payload_dtype = PayloadDType::kF32;
  spec.combine_dtype = DType::kF32;
  spec.links = {"test", {10.0, 2.0}, {1.0, 7.0}};
  sim::Traffic t;
  for (auto& c : t.copies) c.assign(16, 0);
  t.copies[1][0 * 4 + 2] = 3;
  t.copies[1][0 * 4 + 1] = 5;
  const std::uint64_t row = 4000 + 8;  // payload + one (expert, weight) slot
  CHECK(sim::dispatch_copy_bytes(spec, Accounting::kPerRank, 1) == row);
  const sim::PhaseTime d = sim::predict(spec, t, Accounting::kPerRank, 1, false);
  // NIC: 3 × 4008 B at 1 GB/s + 7 us = 19.024 us; intra: 5 × 4008 at 10 GB/s + 2 us = 4.004 us.
  CHECK(d.seconds == doctest::Approx(3 * 4008 / 1e9 + 7e-6));
  CHECK(d.bottleneck == "NIC send of rank 0 (node 0)");
  const sim::PhaseTime c = sim::predict(spec, t, Accounting::kPerRank, 1, true);
  CHECK(c.seconds == doctest::Approx(3 * 4000 / 1e9 + 7e-6));
  // Rank 2 sends what rank 0 receives: a tie, named by the lower rank.
  CHECK(c.bottleneck == "NIC receive of rank 0 (node 0)");
  const sim::ByteSplit split = sim::dispatch_bytes(spec, t, Accounting::kPerRank, 1);
  CHECK(split.inter == 3 * row);
  CHECK(split.intra == 5 * row);
  CHECK(sim::node_matrix(spec, t, Accounting::kPerRank, 1) ==
        std::vector<std::uint64_t>{5 * row, 3 * row, 0, 0});
  CHECK(sim::predict(spec, sim::Traffic{}, Accounting::kPerRank, 1, false).bottleneck == "none");
}

TEST_CASE("a training step's EP and DP parts by hand, and pure DP for comparison") {
  // 2 nodes × 2 GPUs, EP groups of 2 (one per node), 4 experts: each rank holds 2 experts;
  // its DP group is the rank of the same index on the other node. Links: intra 10 GB/s,
  // 2 us; NIC 1 GB/s, 7 us.
  sim::ClusterSpec spec = cluster(2, 2, 4, 1000);
  spec.ep_size = 2;
  spec.payload_dtype = PayloadDType::kF32;
  spec.combine_dtype = DType::kF32;
  spec.links = {"test", {10.0, 2.0}, {1.0, 7.0}};
  // A ring all-reduce: 2 (n-1)/n of the bytes through the slower link, 2 (n-1) latencies.
  CHECK(sim::predict_allreduce(spec, 1000000, 4, 2).seconds ==
        doctest::Approx(1.5e6 / 1e9 + 6 * 7e-6));
  CHECK(sim::predict_allreduce(spec, 1000000, 2, 2).seconds ==
        doctest::Approx(1e6 / 10e9 + 2 * 2e-6));
  CHECK(sim::predict_allreduce(spec, 1000000, 1, 2).seconds == 0);
  // One layer's traffic over 2 steps: rank 0 sent 6 rows to rank 1 (intra).
  sim::Traffic t;
  for (auto& c : t.copies) c.assign(16, 0);
  t.copies[1][0 * 4 + 1] = 6;
  t.layer_dispatch_bytes = {6 * 4008 + 64, 64, 64, 64};
  t.layer_combine_bytes = {0, 6 * 4000, 0, 0};
  const sim::TrainingStep step =
      sim::predict_training_step(spec, t, 1, /*moe_layers=*/3, /*dense_params=*/250000,
                                 /*expert_params=*/1000, /*steps=*/2);
  // EP: forward and backward of 3 layers, each a dispatch (6 × 4008 B at 10 GB/s + 2 us
  // over the 2 steps) and a combine (6 × 4000 B), per step: as the table, the sum over the
  // steps divided by them.
  CHECK(step.ep_seconds ==
        doctest::Approx(2 * 3 * ((6 * 4008 / 10e9 + 2e-6) + (6 * 4000 / 10e9 + 2e-6)) / 2));
  CHECK(step.ep_bytes_per_rank == 2 * 3 * (6 * 4008 + 64) / 2);
  // DP: 1 MB of dense gradients over all 4 ranks (crossing nodes); the 2 local experts of
  // 3 layers, 24 KB, over the DP group of 2 (on two nodes).
  CHECK(step.dp_seconds == doctest::Approx((1.5e6 / 1e9 + 6 * 7e-6) + (24000 / 1e9 + 2 * 7e-6)));
  CHECK(step.dp_bytes_per_rank == 1500000 + 24000);
  // Pure DP: 1 MB + 4 experts × 3 layers × 4 KB over all 4 ranks.
  CHECK(step.pure_dp_seconds == doctest::Approx(1.5 * 1048000 / 1e9 + 6 * 7e-6));
  CHECK(step.pure_dp_bytes_per_rank == 1572000);
}

TEST_CASE("two-level accounting by hand: one NIC copy per node, forwarded inside it") {
  // 2 nodes × 2 GPUs, 4 experts (one per rank), one recorded token (rank 0 gets it, the
  // others none) sent to experts 1, 2 and 3 (top-3, expert 0's logit lowest).
  std::vector<float> logits = {-5.0f, 3.0f, 2.0f, 1.0f};
  sim::ClusterSpec spec = cluster(2, 2, 4, 64);
  sim::Simulator simulator(
      spec, sim::LogitsSource::recorded(TensorView(logits.data(), DType::kF32, {1, 4}), 4),
      {setting("topk", "top_k = 3", 4)});
  const sim::Traffic t = simulator.step(0)[0];
  auto copies = [&](Accounting a, int s, int d) {
    return t.copies[static_cast<int>(a)][static_cast<std::size_t>(s * 4 + d)];
  };
  // Rank 0's token: experts 1 (rank 1, same node), 2 and 3 (ranks 2, 3 on node 1).
  CHECK(copies(Accounting::kPerRank, 0, 1) == 1);
  CHECK(copies(Accounting::kPerRank, 0, 2) == 1);
  CHECK(copies(Accounting::kPerRank, 0, 3) == 1);
  // Two-level: rank 0 → rank 2 (node 1, local index 0) once, rank 2 → rank 3 forwards.
  CHECK(copies(Accounting::kPerNode, 0, 1) == 1);
  CHECK(copies(Accounting::kPerNode, 0, 2) == 1);
  CHECK(copies(Accounting::kPerNode, 0, 3) == 0);
  CHECK(copies(Accounting::kPerNode, 2, 3) == 1);
}

TEST_CASE("synthetic logits: hot and zipf experts get the load, recorded ones split in blocks") {
  const sim::ClusterSpec spec = cluster(1, 4, 16, 64);
  sim::Simulator hot(spec, sim::LogitsSource::synthetic("hot:2:3.0", 16, 2000, 1),
                     {setting("topk", "top_k = 2", 16)});
  const sim::Traffic h = hot.step(0)[0];
  // Experts 0 and 8 are favoured by +3 on their logits.
  for (int e = 0; e < 16; ++e) {
    if (e == 0 || e == 8) continue;
    CHECK(h.tokens_per_expert[0] > 5 * h.tokens_per_expert[static_cast<std::size_t>(e)]);
    CHECK(h.tokens_per_expert[8] > 5 * h.tokens_per_expert[static_cast<std::size_t>(e)]);
  }
  sim::Simulator zipf(spec, sim::LogitsSource::synthetic("zipf:1.0", 16, 2000, 1),
                      {setting("topk", "top_k = 2", 16)});
  const sim::Traffic z = zipf.step(0)[0];
  CHECK(z.tokens_per_expert[0] > z.tokens_per_expert[3]);
  CHECK(z.tokens_per_expert[3] > z.tokens_per_expert[15]);
  CHECK(z.imbalance() > 2.0);
  // Steps differ, the same step repeats.
  const auto a = sim::LogitsSource::synthetic("normal", 4, 3, 9);
  std::vector<float> s0(12), s0_again(12), s1(12);
  a.fill(0, 2, s0.data());
  a.fill(0, 2, s0_again.data());
  a.fill(1, 2, s1.data());
  CHECK(s0 == s0_again);
  CHECK(s0 != s1);
  std::vector<float> recorded(10 * 2);
  for (std::size_t i = 0; i < recorded.size(); ++i) recorded[i] = static_cast<float>(i);
  const auto r = sim::LogitsSource::recorded(TensorView(recorded.data(), DType::kF32, {10, 2}), 3);
  CHECK(r.tokens(0) == 4);
  CHECK(r.tokens(2) == 3);
  std::vector<float> block(6);
  r.fill(5, 2, block.data());
  CHECK(block == std::vector<float>{14, 15, 16, 17, 18, 19});
}

TEST_CASE("bad simulator input is refused before any work") {
  sim::ClusterSpec spec = cluster(2, 8, 16, 64);
  spec.ep_size = 6;
  CHECK(test::error_message([&] { sim::validate(spec); }) ==
        "ep_size 6 does not divide the 16 ranks (2 nodes × 8 GPUs)");
  CHECK(test::error_message([] { sim::link_preset("h900"); }) ==
        "unknown link preset 'h900' (presets: h800, h100, b200, cpu)");
  for (const char* bad : {"zipf", "zipf:-1", "hot:0:1", "hot:17:1", "hot:2", "uniform"}) {
    CAPTURE(bad);
    CHECK(test::error_message([&] {
            sim::LogitsSource::synthetic(bad, 16, 8, 1);
          }).find("expected normal, zipf:S") != std::string::npos);
  }
  spec.ep_size = 0;
  CHECK(test::error_message([&] {
          sim::Simulator(spec, sim::LogitsSource::synthetic("normal", 8, 4, 1),
                         {setting("topk", "top_k = 2", 16)});
        }) == "the logits have 8 experts (columns) but the model has 16");
  CHECK(test::error_message([&] {
          sim::Simulator(spec, sim::LogitsSource::synthetic("normal", 16, 4, 1),
                         {setting("topk", "top_k = 2", 12)});
        }).find("routes 12 experts but the logits have 16") != std::string::npos);
  // A policy that cannot take the placement fails at construction: 2 nodes, 3 groups.
  CHECK(test::error_message([&] {
          sim::Simulator(spec, sim::LogitsSource::synthetic("normal", 16, 4, 1),
                         {setting("node_limited", "top_k = 2\nmax_groups = 3", 16)});
        }).find("router setting 'node_limited") != std::string::npos);
}

TEST_CASE("redundant experts: the ranks' load evens out, and the copies chosen are the same") {
  // 2 nodes × 8 GPUs, 64 experts, top-4, a hot few (hot:4:2.0): contiguous ranks differ by
  // far more than placed copies do. Every token's copy comes from its position and expert,
  // so a second simulator gives the same traffic.
  const sim::ClusterSpec spec = cluster(2, 8, 64, 1024);
  auto run = [&] {
    std::vector<sim::RouterSetting> settings{setting("topk", "top_k = 4", 64),
                                             setting("topk", "top_k = 4", 64)};
    settings[1].redundant_experts = 16;
    sim::Simulator simulator(spec, sim::LogitsSource::synthetic("hot:4:2.0", 64, 2048, 5),
                             std::move(settings), 0);
    return simulator.step(0);
  };
  const std::vector<sim::Traffic> first = run(), again = run();
  const double contiguous = first[0].rank_imbalance(), placed = first[1].rank_imbalance();
  MESSAGE("rank imbalance contiguous " << contiguous << ", with 16 copies " << placed << " (floor "
                                       << first[1].rank_imbalance_floor << ")");
  CHECK(contiguous >= 1.5);
  CHECK(placed <= 1.2);
  CHECK(placed >= first[1].rank_imbalance_floor * (1 - 1e-9));
  // The experts' own load does not change; where it lands does.
  CHECK(first[1].tokens_per_expert == first[0].tokens_per_expert);
  CHECK(first[1].tokens_per_rank == again[1].tokens_per_rank);
  CHECK(first[1].copies == again[1].copies);
}

TEST_CASE("redundant experts at 8 nodes x 8 GPUs, 256 experts, top-8: 64 extra copies") {
  // The figure: with 64 copies (5 slots per rank) the most loaded rank is within
  // 10 % of the mean on both skews, where the contiguous placement is >= 1.5.
  const sim::ClusterSpec spec = cluster(8, 8, 256, 1024);
  for (const char* logits : {"zipf:1.2", "hot:8:2.0"}) {
    std::vector<sim::RouterSetting> settings{setting("topk", "top_k = 8", 256),
                                             setting("topk", "top_k = 8", 256)};
    settings[1].redundant_experts = 64;
    sim::Simulator simulator(spec, sim::LogitsSource::synthetic(logits, 256, 2048, 1),
                             std::move(settings), 0);
    const std::vector<sim::Traffic> traffic = simulator.step(0);
    const double contiguous = traffic[0].rank_imbalance(), placed = traffic[1].rank_imbalance();
    MESSAGE(std::string(logits) << ": rank imbalance contiguous " << contiguous
                                << ", with 64 copies " << placed << " (floor "
                                << traffic[1].rank_imbalance_floor << ")");
    CHECK(contiguous >= 1.5);
    CHECK(placed <= 1.10);
  }
}
