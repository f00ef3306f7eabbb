// Placement as data: a layer whose experts sit on shuffled or replicated slots gives the
// contiguous placement's output bit for bit, its replicated experts' gradients sum to the
// unreplicated ones, and each (token, expert) goes to the slot the documented hash names.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <iterator>
#include <numeric>
#include <string>
#include <vector>

#include "switchyard/io.hpp"
#include "switchyard/placement.hpp"
#include "switchyard/runtime.hpp"
#include "switchyard/status.hpp"
#include "test_support.hpp"

using namespace switchyard;

namespace {

constexpr int kExperts = 8;
constexpr std::int64_t kHidden = 24;
constexpr std::int64_t kTokens = 61;

Config slots_config(int ranks) {
  Config c;
  c.set("runtime", "ranks", std::int64_t{ranks});
  c.set("runtime", "timeout_s", 60.0);
  c.set("router", "top_k", std::int64_t{3});
  c.set("model", "num_experts", std::int64_t{kExperts});
  c.set("model", "hidden", kHidden);
  c.set("model", "ffn_hidden", std::int64_t{40});
  c.set("model", "seed", std::int64_t{17});
  // Every placement sums a token's outputs in routing order: the same bits for all.
  c.set("runtime", "combine_order", std::string("slot"));
  // Experts whose rows are computed one by one (the fixture's SwiGLU): a row's bits do not
  // depend on how many rows its expert's batch has. OpenBLAS's do (it takes another kernel
  // for small matrices), so with cpu_swiglu a replica's share of rows can move the last bit.
  c.set("runtime", "plugin_dirs", std::vector<std::string>{SWITCHYARD_FIXTURE_PLUGIN_DIR});
  c.set("experts", "kernel", std::string("pretend_swiglu"));
  return c;
}

/// A plan-experts folder holding one layer's slots and shares.
void write_placement(const std::filesystem::path& dir, std::vector<std::int32_t> expert_of_slot,
                     std::vector<double> share_of_slot) {
  std::filesystem::create_directories(dir);
  const auto S = static_cast<std::int64_t>(expert_of_slot.size());
  write_npy(dir / "expert_of_slot.npy", TensorView(expert_of_slot.data(), DType::kI32, {1, S}));
  write_npy(dir / "share_of_slot.npy", TensorView(share_of_slot.data(), DType::kF64, {1, S}));
}

/// The starting placement of the rebalance tests: 12 slots on 4 ranks, experts 0 and 1 both
/// on rank 0, the extra slots copying cold experts 4..7.
Config skewed_start(const test::TempDir& dir) {
  write_placement(dir / "start", {0, 1, 2, 3, 4, 5, 6, 7, 4, 5, 6, 7},
                  {1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5});
  Config c = slots_config(4);
  c.set("runtime", "placement", (dir / "start").string());
  return c;
}

/// T tokens whose features lean towards experts a and b (their gate rows added, 6 times):
/// top-2 routing sends nearly every token to both.
HostTensor leaning_on(const Runtime& runtime, std::int64_t T, int a, int b, std::uint64_t seed) {
  HostTensor x = synthetic_tokens(T, kHidden, seed);
  const float* gate = runtime.model().gate().data<float>();
  for (std::int64_t t = 0; t < T; ++t) {
    for (std::int64_t h = 0; h < kHidden; ++h)
      x.data<float>()[t * kHidden + h] += 6.0f * (gate[a * kHidden + h] + gate[b * kHidden + h]);
  }
  return x;
}

HostTensor forward(Runtime& runtime) {
  const HostTensor x = synthetic_tokens(kTokens, kHidden, 5);
  HostTensor y(DType::kF32, {kTokens, kHidden});
  runtime.forward(x.view(), y.view());
  return y;
}

bool same_bits(const HostTensor& a, const HostTensor& b) {
  return a.numel() == b.numel() &&
         std::memcmp(a.data<float>(), b.data<float>(), a.size_bytes()) == 0;
}

/// The slot the documented choice names, written here from the documentation of
/// `ExpertSlotMap::choose_slot` (not from its code): SplitMix64's finaliser of
/// (rank << 40) ^ token ^ (expert << 24), its top 53 bits as a point in [0, 1), placed
/// among the running sums of the expert's copies' shares in slot order.
int documented_slot(int rank, std::int64_t token, int expert, const std::vector<int>& slots_of,
                    const std::vector<double>& shares) {
  std::uint64_t z =
      (std::uint64_t(rank) << 40) ^ std::uint64_t(token) ^ (std::uint64_t(expert) << 24);
  z += 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  z ^= z >> 31;
  const double point = static_cast<double>(z >> 11) / 9007199254740992.0;
  double running = 0;
  for (const int slot : slots_of) {
    running += shares[static_cast<std::size_t>(slot)];
    if (point < running) return slot;
  }
  return slots_of.back();
}

}  // namespace

TEST_CASE("shuffled and replicated placements give the contiguous placement's bits") {
  for (int ranks : {1, 2, 3, 4}) {
    CAPTURE(ranks);
    test::TempDir dir;
    Runtime contiguous(slots_config(ranks));
    const HostTensor expected = forward(contiguous);
    // The slot order only reorders the sum: the rank-order combine is within rounding.
    Config by_rank = slots_config(ranks);
    by_rank.set("runtime", "combine_order", std::string("rank"));
    Runtime rank_order(by_rank);
    CHECK(test::relative_difference(forward(rank_order), expected) <= 1e-6);

    // Shuffled: one slot per expert, in another order (S = 8 divides 1, 2 and 4 ranks; 3
    // ranks take 9 slots, expert 0 twice).
    std::vector<std::int32_t> shuffled{5, 2, 7, 0, 3, 6, 1, 4};
    std::vector<double> shuffled_shares(8, 1.0);
    if (ranks == 3) {
      shuffled.push_back(0);
      shuffled_shares[3] = 0.5;  // expert 0: slots 3 and 8
      shuffled_shares.push_back(0.5);
    }
    write_placement(dir / "shuffled", shuffled, shuffled_shares);
    // Replicated: 12 slots, experts 1, 3 and 6 twice or three times, uneven shares.
    std::vector<std::int32_t> replicated{1, 0, 3, 6, 2, 1, 4, 5, 3, 7, 1, 6};
    std::vector<double> replicated_shares{0.5, 1, 0.7, 0.6, 1, 0.3, 1, 1, 0.3, 1, 0.2, 0.4};
    write_placement(dir / "replicated", replicated, replicated_shares);

    for (const char* name : {"shuffled", "replicated"}) {
      CAPTURE(name);
      if (std::string(name) == "replicated" && 12 % ranks != 0) continue;
      Config c = slots_config(ranks);
      c.set("runtime", "placement", (dir / name).string());
      Runtime placed(c);
      CHECK(same_bits(forward(placed), expected));
      // The production kernel: within rounding (OpenBLAS's bits follow the batch's size).
      Config blas = c;
      blas.set("experts", "kernel", std::string("cpu_swiglu"));
      Runtime placed_blas(blas);
      CHECK(test::relative_difference(forward(placed_blas), expected) <= 1e-6);
      // The copies took tokens: every slot of the EP group got some.
      std::vector<std::int64_t> slot_load(
          static_cast<std::size_t>(placed.layer(0).placement().num_experts()), 0);
      for (int local = 0; local < placed.num_local_ranks(); ++local) {
        MoELayer& layer = placed.layer(local);
        const RoutingPlan& slots = layer.slot_plan(layer.last_plan());
        for (std::size_t s = 0; s < slot_load.size(); ++s) slot_load[s] += slots.counts[s];
      }
      for (const std::int64_t load : slot_load) CHECK(load > 0);
    }
    // The balancer's placement for redundant copies, and with chunks.
    Config redundant = slots_config(ranks);
    redundant.set("runtime", "redundant_experts", std::int64_t{4});
    redundant.set("runtime", "chunks", std::int64_t{3});
    Runtime balanced(redundant);
    CHECK(balanced.layer(0).slot_map().num_slots() % ranks == 0);
    CHECK(balanced.layer(0).slot_map().num_slots() >= kExperts + 4);
    CHECK(same_bits(forward(balanced), expected));
  }
}

TEST_CASE("each (token, expert) goes to the slot the documented hash names, on every rank") {
  // A test a rank-local choice fails: ranks seeded by their rank, or choosing the least
  // loaded copy they know of, send tokens elsewhere than this independent computation.
  test::TempDir dir;
  std::vector<std::int32_t> replicated{1, 0, 3, 6, 2, 1, 4, 5, 3, 7, 1, 6};
  std::vector<double> shares{0.5, 1, 0.7, 0.6, 1, 0.3, 1, 1, 0.3, 1, 0.2, 0.4};
  write_placement(dir / "p", replicated, shares);
  Config c = slots_config(4);
  c.set("runtime", "placement", (dir / "p").string());
  Runtime runtime(c);
  forward(runtime);
  std::vector<std::vector<int>> slots_of(kExperts);
  for (std::size_t s = 0; s < replicated.size(); ++s)
    slots_of[static_cast<std::size_t>(replicated[s])].push_back(static_cast<int>(s));
  std::int64_t checked = 0;
  for (int local = 0; local < runtime.num_local_ranks(); ++local) {
    MoELayer& layer = runtime.layer(local);
    const RoutingPlan& plan = layer.last_plan();
    const RoutingPlan& routed = layer.slot_plan(plan);
    const int rank = layer.transport().rank();
    for (std::int64_t t = 0; t < plan.num_tokens; ++t) {
      for (int k = 0; k < plan.slots; ++k) {
        const std::size_t at = static_cast<std::size_t>(t * plan.slots + k);
        const int expert = plan.experts[at];
        if (expert < 0) continue;
        CHECK(routed.experts[at] ==
              documented_slot(rank, t, expert, slots_of[static_cast<std::size_t>(expert)], shares));
        CHECK(routed.weights[at] == plan.weights[at]);
        ++checked;
      }
    }
  }
  CHECK(checked == kTokens * 3);
  // A placement every rank must hold alike: a slot naming no expert, an expert left out,
  // shares that do not sum to 1, and slots that do not divide over the ranks.
  auto refused = [&](std::vector<std::int32_t> slots, std::vector<double> s) {
    write_placement(dir / "bad", std::move(slots), std::move(s));
    Config bad = slots_config(4);
    bad.set("runtime", "placement", (dir / "bad").string());
    return test::error_message([&] { Runtime r(bad); });
  };
  CHECK(refused({0, 1, 2, 3, 4, 5, 6, 9}, std::vector<double>(8, 1.0))
            .find("slot 7 holds expert 9") != std::string::npos);
  CHECK(refused({0, 1, 2, 3, 4, 5, 6, 6}, {1, 1, 1, 1, 1, 1, 0.5, 0.5})
            .find("expert 7 has no slot") != std::string::npos);
  CHECK(
      refused({0, 1, 2, 3, 4, 5, 6, 7}, {1, 1, 1, 1, 1, 1, 1, 0.9}).find("expert 7's shares sum") !=
      std::string::npos);
  CHECK(refused({0, 1, 2, 3, 4, 5, 6, 7, 0, 1}, {0.5, 0.5, 1, 1, 1, 1, 1, 1, 0.5, 0.5})
            .find("do not divide over the EP group's 4 ranks") != std::string::npos);
}

TEST_CASE("a replicated expert's gradients are the sum over its copies") {
  for (int ranks : {1, 2, 4}) {
    CAPTURE(ranks);
    test::TempDir dir;
    write_placement(dir / "p", {1, 0, 3, 6, 2, 1, 4, 5, 3, 7, 1, 6},
                    {0.5, 1, 0.7, 0.6, 1, 0.3, 1, 1, 0.3, 1, 0.2, 0.4});
    const HostTensor x = synthetic_tokens(kTokens, kHidden, 5);
    const HostTensor dy = synthetic_tokens(kTokens, kHidden, 6);
    auto gradients_of = [&](Runtime& runtime, HostTensor& dx) {
      HostTensor y(DType::kF32, {kTokens, kHidden});
      runtime.set_training(true);
      runtime.forward(x.view(), y.view());
      ModelGradients g;
      runtime.backward(x.view(), dy.view(), dx.view(), g);
      return g;
    };
    Runtime contiguous(slots_config(ranks));
    Config c = slots_config(ranks);
    c.set("runtime", "placement", (dir / "p").string());
    Runtime placed(c);
    HostTensor dx_contiguous(DType::kF32, {kTokens, kHidden}),
        dx_placed(DType::kF32, {kTokens, kHidden});
    const ModelGradients expected = gradients_of(contiguous, dx_contiguous);
    const ModelGradients got = gradients_of(placed, dx_placed);
    CHECK(test::relative_difference(dx_placed, dx_contiguous) <= 1e-6);
    CHECK(test::relative_difference(got.gate, expected.gate) <= 1e-6);
    for (int e = 0; e < kExperts; ++e) {
      CAPTURE(e);
      for (std::size_t w = 0; w < 3; ++w) {
        const auto& want = expected.experts[static_cast<std::size_t>(e)][w];
        const auto& have = got.experts[static_cast<std::size_t>(e)][w];
        REQUIRE(have.numel() == want.numel());
        CHECK(test::relative_difference(have, want) <= 1e-6);
      }
    }
  }
}

TEST_CASE("rebalance: skewed load evened out, weights moved, the output's bits unchanged") {
  // 4 ranks, 8 experts and 4 extra slots (3 per rank), top-2. Every token's features lean
  // towards experts 0 and 1, which the starting placement puts both on rank 0 (the extra
  // slots copy cold experts 4..7): rank 0 carries about half of all assignments.
  test::TempDir dir;
  Runtime runtime(skewed_start(dir));
  Runtime contiguous(slots_config(4));
  const std::int64_t T = 2000;
  const HostTensor x = leaning_on(runtime, T, 0, 1, 11);
  HostTensor y(DType::kF32, {T, kHidden}), expected(DType::kF32, {T, kHidden});
  contiguous.forward(x.view(), expected.view());
  runtime.forward(x.view(), y.view());
  CHECK(same_bits(y, expected));
  // The measured load per rank, from the slots' loads summed here over the ranks.
  auto rank_imbalance = [&] {
    std::vector<double> per_rank(4, 0.0);
    for (int local = 0; local < 4; ++local) {
      const auto load = runtime.layer(local).slot_load();
      for (std::size_t s = 0; s < load.size(); ++s) per_rank[s / 3] += static_cast<double>(load[s]);
    }
    double most = 0, total = 0;
    for (const double l : per_rank) {
      most = std::max(most, l);
      total += l;
    }
    return most * 4 / total;
  };
  const double before = rank_imbalance();
  const std::vector<RebalanceReport> reports = runtime.rebalance();
  REQUIRE(reports.size() == 1);
  CHECK(reports[0].imbalance_before == doctest::Approx(before));
  CHECK(before >= 1.5);
  CHECK(reports[0].moved_experts > 0);
  // Each moved copy's gate, up and down, f32 [40,24] each.
  CHECK(reports[0].received_bytes ==
        static_cast<std::uint64_t>(reports[0].moved_experts) * 3 * 40 * 24 * sizeof(float));
  const ExpertSlotMap& placed = runtime.layer(0).slot_map();
  CHECK(placed.slots_of(0).size() + placed.slots_of(1).size() > 2);  // the hot ones copied
  for (int local = 0; local < 4; ++local) CHECK(runtime.layer(local).slot_load()[0] == 0);
  // The next step: the same bits, and the ranks' load within 15 % of the mean.
  std::fill_n(y.data<float>(), y.numel(), std::nanf(""));
  runtime.forward(x.view(), y.view());
  CHECK(same_bits(y, expected));
  const double after = rank_imbalance();
  MESSAGE("rank imbalance before " << before << ", after " << after << ", copies moved "
                                   << reports[0].moved_experts << " (planned "
                                   << reports[0].imbalance_planned << ")");
  CHECK(after <= 1.15);
  // The saved model is the model, whatever the placement: the same file as the contiguous
  // runtime's, byte for byte.
  runtime.save_model(dir / "placed.safetensors");
  contiguous.save_model(dir / "contiguous.safetensors");
  auto bytes_of = [](const std::filesystem::path& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  CHECK(bytes_of(dir / "placed.safetensors").size() > 1000);
  CHECK(bytes_of(dir / "placed.safetensors") == bytes_of(dir / "contiguous.safetensors"));
  // Training after an inference rebalance: the kernels view the model's tensors again (the
  // same bytes), so the optimizer's updates reach them.
  runtime.set_training(true);
  runtime.forward(x.view(), y.view());
  CHECK(same_bits(y, expected));
}

TEST_CASE("rebalance with data-parallel groups: every EP group moves alike, the bits stay") {
  // World 4 of 2 EP groups of 2 ranks, 8 experts + 2 slots (5 per rank): each group holds
  // every slot, and the load summed over the world places both groups the same.
  Config c = slots_config(4);
  c.set("runtime", "ep_size", std::int64_t{2});
  c.set("runtime", "redundant_experts", std::int64_t{2});
  Runtime runtime(c);
  Config plain = slots_config(4);
  plain.set("runtime", "ep_size", std::int64_t{2});
  Runtime contiguous(plain);
  const HostTensor x = synthetic_tokens(300, kHidden, 12);
  HostTensor y(DType::kF32, {300, kHidden}), expected(DType::kF32, {300, kHidden});
  contiguous.forward(x.view(), expected.view());
  runtime.forward(x.view(), y.view());
  CHECK(same_bits(y, expected));
  const std::vector<RebalanceReport> reports = runtime.rebalance();
  REQUIRE(reports.size() == 1);
  CHECK(reports[0].slots == 10);
  for (int local = 1; local < 4; ++local) {
    const auto a = runtime.layer(0).slot_map().expert_of_slot();
    const auto b = runtime.layer(local).slot_map().expert_of_slot();
    CHECK(std::vector<int>(a.begin(), a.end()) == std::vector<int>(b.begin(), b.end()));
  }
  std::fill_n(y.data<float>(), y.numel(), std::nanf(""));
  runtime.forward(x.view(), y.view());
  CHECK(same_bits(y, expected));
}

TEST_CASE("what a slot map does not run with yet is refused by name") {
  Config worst_case = slots_config(2);
  worst_case.set("runtime", "redundant_experts", std::int64_t{2});
  worst_case.set("runtime", "max_tokens_per_rank", std::int64_t{16});
  CHECK(test::error_message([&] {
          Runtime r(worst_case);
        }).find("does not run in the worst-case mode") != std::string::npos);
  Config device = slots_config(2);
  device.set("runtime", "redundant_experts", std::int64_t{2});
  device.set("runtime", "data_path", std::string("pretend_cuda"));
  CHECK(test::error_message([&] { Runtime r(device); }).find("runs on the host data path") !=
        std::string::npos);
}

TEST_CASE("rebalance over two nodes with expert groups: each group's copies stay on its node") {
  // 4 ranks on 2 emulated nodes, node-limited routing over 4 groups of 2 experts: the
  // balancer plans hierarchically (groups to nodes, copies within a node), as DeepSeek's does.
  Config c = slots_config(4);
  c.set("runtime", "ranks_per_node", std::int64_t{2});
  c.set("runtime", "redundant_experts", std::int64_t{4});
  c.set("router", "policy", std::string("node_limited"));
  c.set("router", "num_groups", std::int64_t{4});
  c.set("router", "max_groups", std::int64_t{2});
  Runtime runtime(c);
  Config plain = c;
  plain.set("runtime", "redundant_experts", std::int64_t{0});
  Runtime contiguous(plain);
  const HostTensor x = synthetic_tokens(200, kHidden, 13);
  HostTensor y(DType::kF32, {200, kHidden}), expected(DType::kF32, {200, kHidden});
  contiguous.forward(x.view(), expected.view());
  runtime.forward(x.view(), y.view());
  CHECK(same_bits(y, expected));
  runtime.rebalance();
  const auto slots = runtime.layer(0).slot_map().expert_of_slot();
  REQUIRE(slots.size() == 12);
  for (int group = 0; group < 4; ++group) {
    std::vector<int> nodes;
    for (std::size_t s = 0; s < slots.size(); ++s)
      if (slots[s] / 2 == group) nodes.push_back(static_cast<int>(s) / 6);
    CAPTURE(group);
    REQUIRE(!nodes.empty());
    CHECK(std::count(nodes.begin(), nodes.end(), nodes.front()) ==
          static_cast<std::ptrdiff_t>(nodes.size()));
  }
  runtime.forward(x.view(), y.view());
  CHECK(same_bits(y, expected));
}

TEST_CASE("rebalance in training: the optimizer's updates reach every copy, gradients summed") {
  test::TempDir dir;
  Runtime placed(skewed_start(dir));
  Runtime contiguous(slots_config(4));
  const HostTensor x = synthetic_tokens(120, kHidden, 21), dy = synthetic_tokens(120, kHidden, 22);
  HostTensor y(DType::kF32, {120, kHidden}), expected(DType::kF32, {120, kHidden});
  HostTensor dx(DType::kF32, {120, kHidden});
  auto step = [&](Runtime& runtime, HostTensor& out) {
    runtime.forward(x.view(), out.view());
    ModelGradients g;
    runtime.backward(x.view(), dy.view(), dx.view(), g);
    return g;
  };
  placed.set_training(true);
  contiguous.set_training(true);
  step(placed, y);
  const ModelGradients g = step(contiguous, expected);
  CHECK(same_bits(y, expected));
  const std::vector<RebalanceReport> reports = placed.rebalance();
  CHECK(reports.at(0).moved_experts > 0);
  // One SGD step with the same gradients on both: the rebalanced kernels must compute with
  // the updated weights, so the next forward gives the same bits again.
  for (Runtime* runtime : {&placed, &contiguous}) {
    ModelParameters p = runtime->parameters();
    for (std::size_t e = 0; e < p.experts.size(); ++e) {
      for (std::size_t w = 0; w < 3; ++w) {
        float* value = p.experts[e][w].data_as<float>();
        const float* grad = g.experts[e][w].data<float>();
        for (std::int64_t i = 0; i < p.experts[e][w].numel(); ++i) value[i] -= 0.5f * grad[i];
      }
    }
  }
  const ModelGradients after_placed = step(placed, y);
  const ModelGradients after_contiguous = step(contiguous, expected);
  CHECK(same_bits(y, expected));
  for (std::size_t e = 0; e < static_cast<std::size_t>(kExperts); ++e) {
    for (std::size_t w = 0; w < 3; ++w) {
      CHECK(test::relative_difference(after_placed.experts[e][w], after_contiguous.experts[e][w]) <=
            1e-6);
    }
  }
}

TEST_CASE("a rebalance that fails while the weights move leaves the previous placement") {
  // After a first rebalance the kernels hold moved copies; the model's tensors then change
  // under them (as when processes' weights diverge). The next rebalance, for another skew,
  // receives copies that differ from the model: the rank that sees it says so, every other
  // rank fails with it, and every layer keeps its placement and its kernels.
  test::TempDir dir;
  Runtime runtime(skewed_start(dir));
  const HostTensor first = leaning_on(runtime, 800, 0, 1, 31),
                   second = leaning_on(runtime, 800, 4, 6, 31);
  HostTensor y(DType::kF32, {800, kHidden}), before(DType::kF32, {800, kHidden});
  runtime.forward(first.view(), y.view());
  REQUIRE(runtime.rebalance().at(0).moved_experts > 0);
  const auto placed = runtime.layer(0).slot_map().expert_of_slot();
  const std::vector<int> placement(placed.begin(), placed.end());
  runtime.forward(second.view(), before.view());  // measures the second skew
  ModelParameters p = runtime.parameters();
  for (auto& expert : p.experts) expert[0].data_as<float>()[0] += 1.0f;
  const std::string error = test::error_message([&] { runtime.rebalance(); });
  CHECK(error.find("differ from this process's model") != std::string::npos);
  CHECK(error.find("the placement is unchanged") != std::string::npos);
  for (int local = 0; local < 4; ++local) {
    const auto now = runtime.layer(local).slot_map().expert_of_slot();
    CHECK(std::vector<int>(now.begin(), now.end()) == placement);
  }
  runtime.forward(second.view(), y.view());
  CHECK(same_bits(y, before));
}
