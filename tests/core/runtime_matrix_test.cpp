// The EP forward equals the dense single-process reference across world sizes, expert
// counts, top-k, uneven placements, ranks without tokens, and checkpoints in both naming
// conventions stored as F32 and BF16.
#include <doctest/doctest.h>

#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <span>
#include <vector>

#include "switchyard/io.hpp"
#include "switchyard/reference.hpp"
#include "switchyard/runtime.hpp"
#include "switchyard/status.hpp"
#include "test_support.hpp"

using namespace switchyard;

namespace {

constexpr double kTolerance = 1e-5;

/// Runs the EP forward and the reference; returns the relative difference.
double ep_versus_reference(Runtime& runtime, std::int64_t tokens, std::uint64_t seed) {
  const HostTensor x = synthetic_tokens(tokens, runtime.model().hidden(), seed);
  HostTensor y(DType::kF32, {tokens, runtime.model().hidden()});
  HostTensor reference(DType::kF32, {tokens, runtime.model().hidden()});
  // Poison the output: every row must be written.
  std::fill(y.data<float>(), y.data<float>() + y.numel(), std::nanf(""));
  runtime.forward(x.view(), y.view());
  runtime.reference_forward(x.view(), reference.view());
  return test::relative_difference(y, reference);
}

Config base_config(int ranks, int experts, int top_k) {
  Config c;
  c.set("runtime", "ranks", std::int64_t{ranks});
  c.set("runtime", "timeout_s", 60.0);
  c.set("router", "top_k", std::int64_t{top_k});
  c.set("model", "num_experts", std::int64_t{experts});
  c.set("model", "hidden", std::int64_t{24});
  c.set("model", "ffn_hidden", std::int64_t{40});
  c.set("model", "seed", std::int64_t{experts * 100 + top_k});
  return c;
}

}  // namespace

TEST_CASE("EP forward equals the dense reference for R x E x k") {
  for (int ranks : {1, 2, 3, 4}) {
    for (int experts : {1, 4, 8, 16}) {
      for (int top_k : {1, 2, 4}) {
        if (top_k > experts) continue;
        CAPTURE(ranks);
        CAPTURE(experts);
        CAPTURE(top_k);
        Runtime runtime(base_config(ranks, experts, top_k));
        CHECK(runtime.world_size() == ranks);
        CHECK(ep_versus_reference(runtime, 53, static_cast<std::uint64_t>(ranks)) <= kTolerance);
        // Every kept assignment was counted once.
        const auto stats = runtime.global_router_stats();
        std::int64_t total = 0;
        for (auto c : stats.counts) total += c;
        CHECK(total == 53 * top_k);
      }
    }
  }
}

TEST_CASE("ranks with zero tokens, and no tokens at all") {
  for (std::int64_t tokens : {0, 1, 2, 3}) {
    CAPTURE(tokens);
    Runtime runtime(base_config(4, 8, 2));
    CHECK(ep_versus_reference(runtime, tokens, 9) <= kTolerance);
    const auto stats = runtime.global_router_stats();
    CHECK(stats.tokens == tokens);
  }
}

TEST_CASE("experts not divisible by ranks, and fewer experts than ranks") {
  for (auto [ranks, experts] :
       {std::pair{3, 4}, std::pair{3, 8}, std::pair{4, 2}, std::pair{4, 3}}) {
    CAPTURE(ranks);
    CAPTURE(experts);
    Runtime runtime(base_config(ranks, experts, std::min(2, experts)));
    CHECK(ep_versus_reference(runtime, 41, 4) <= kTolerance);
  }
}

TEST_CASE("sigmoid scores with normalisation and scale, Mixtral-style softmax") {
  Config sigmoid = base_config(3, 8, 2);
  sigmoid.set("router", "score", std::string("sigmoid"));
  sigmoid.set("router", "scale", 2.5);
  Runtime a(sigmoid);
  CHECK(ep_versus_reference(a, 30, 1) <= kTolerance);
  Config mixtral = base_config(2, 8, 2);
  mixtral.set("router", "pre_softmax", false);
  Runtime b(mixtral);
  CHECK(ep_versus_reference(b, 30, 2) <= kTolerance);
}

TEST_CASE("checkpoints: both naming conventions, F32 and BF16, with a prefix") {
  test::TempDir dir;
  const ModelWeights source = ModelWeights::random(6, 20, 28, 77);
  for (const std::string format : {"mixtral", "deepseek"}) {
    for (DType dtype : {DType::kF32, DType::kBF16}) {
      for (int ranks : {1, 4}) {
        CAPTURE(format);
        CAPTURE(dtype_name(dtype));
        CAPTURE(ranks);
        const auto path = dir / (format + std::string(dtype_name(dtype)) + ".safetensors");
        write_safetensors(path,
                          test::checkpoint_tensors(source, format, dtype, "model.layers.5.mlp."));
        Config c;
        c.set("runtime", "ranks", std::int64_t{ranks});
        c.set("router", "top_k", std::int64_t{2});
        c.set("model", "weights", path.string());
        c.set("model", "format", format);
        c.set("model", "prefix", std::string("model.layers.5.mlp."));
        Runtime runtime(c);
        CHECK(runtime.model().num_experts() == 6);
        CHECK(runtime.model().hidden() == 20);
        CHECK(runtime.model().ffn_hidden() == 28);
        CHECK(ep_versus_reference(runtime, 37, 5) <= kTolerance);
      }
    }
  }
}

TEST_CASE("EP forward equals the layer NumPy computes on its own, for every stored dtype") {
  // examples/checkpoint/make_checkpoint.py writes the checkpoint and tokens, and computes
  // the layer's output in float64 without any Switchyard code: the expected values share
  // nothing with the router, the loader or the reference under test.
  test::TempDir dir;
  struct Case {
    const char* format;
    const char* dtype;
    double scale;
  };
  for (const Case c :
       {Case{"deepseek", "bf16", 2.5}, Case{"deepseek", "f16", 1.0}, Case{"deepseek", "f32", 1.0},
        Case{"mixtral", "bf16", 1.0}, Case{"mixtral", "f16", 1.0}, Case{"mixtral", "f32", 1.0}}) {
    CAPTURE(c.format);
    CAPTURE(c.dtype);
    const auto out = dir / (std::string(c.format) + c.dtype);
    REQUIRE(test::run_command("/usr/bin/python3 " SWITCHYARD_SOURCE_DIR
                              "/examples/checkpoint/make_checkpoint.py " +
                              out.string() + " --format " + c.format + " --dtype " + c.dtype +
                              " --scale " + std::to_string(c.scale) +
                              " --experts 7 --hidden 20 --ffn 12 --tokens 33 --top-k 3")
                .exit_code == 0);
    const HostTensor x = read_npy(out / "x.npy");
    const HostTensor expected = read_npy(out / "expected.npy");
    const bool deepseek = std::string(c.format) == "deepseek";
    for (int ranks : {1, 2, 3, 4}) {
      for (int ep : {ranks, ranks % 2 == 0 ? ranks / 2 : ranks}) {
        CAPTURE(ranks);
        CAPTURE(ep);
        Config config;
        config.set("runtime", "ranks", std::int64_t{ranks});
        config.set("runtime", "ep_size", std::int64_t{ep});
        config.set("router", "top_k", std::int64_t{3});
        config.set("router", "scale", c.scale);
        if (deepseek) {
          config.set("router", "score", std::string("sigmoid"));
        } else {
          config.set("router", "pre_softmax", false);
        }
        config.set("model", "weights", (out / "layer.safetensors").string());
        config.set("model", "format", std::string(c.format));
        config.set(
            "model", "prefix",
            std::string(deepseek ? "model.layers.3.mlp." : "model.layers.3.block_sparse_moe."));
        Runtime runtime(config);
        HostTensor y(DType::kF32, x.shape());
        runtime.forward(x.view(), y.view());
        CHECK(test::relative_difference(y, expected) <= kTolerance);
      }
    }
  }
}

TEST_CASE("a DeepSeek checkpoint's e_score_correction_bias steers selection") {
  test::TempDir dir;
  const ModelWeights source = ModelWeights::random(8, 16, 16, 3);
  std::vector<float> bias(8, 0.0f);
  bias[5] = 10.0f;  // far above any softmax probability difference
  write_safetensors(dir / "ds.safetensors",
                    test::checkpoint_tensors(source, "deepseek", DType::kF32, "", bias));
  Config c;
  c.set("runtime", "ranks", std::int64_t{2});
  c.set("router", "top_k", std::int64_t{2});
  c.set("model", "weights", (dir / "ds.safetensors").string());
  c.set("model", "format", std::string("deepseek"));
  Runtime runtime(c);
  CHECK(std::vector<float>(runtime.layer(0).router().bias().begin(),
                           runtime.layer(0).router().bias().end()) == bias);
  CHECK(ep_versus_reference(runtime, 20, 8) <= kTolerance);
  CHECK(runtime.global_router_stats().counts[5] == 20);  // every token picked expert 5
}

TEST_CASE("configuration that does not fit the model is refused") {
  test::TempDir dir;
  Config c = base_config(2, 4, 5);  // top_k > num_experts
  CHECK_THROWS_WITH_AS(Runtime{c}, doctest::Contains("router.top_k: must be in 1..4"), Error);
  const ModelWeights source = ModelWeights::random(4, 8, 8, 3);
  write_safetensors(dir / "m.safetensors",
                    test::checkpoint_tensors(source, "mixtral", DType::kF32, ""));
  Config mismatch;
  mismatch.set("model", "weights", (dir / "m.safetensors").string());
  mismatch.set("model", "hidden", std::int64_t{16});
  CHECK_THROWS_WITH_AS(Runtime{mismatch},
                       doctest::Contains("model.hidden: is 16 but the checkpoint has 8"), Error);
}

TEST_CASE("repeated steps give bit-identical results") {
  Runtime runtime(base_config(3, 8, 2));
  const HostTensor x = synthetic_tokens(40, 24, 1);
  HostTensor first(DType::kF32, {40, 24}), second(DType::kF32, {40, 24});
  runtime.forward(x.view(), first.view());
  runtime.forward(x.view(), second.view());
  CHECK(std::equal(first.data<float>(), first.data<float>() + first.numel(), second.data<float>()));
}

TEST_CASE("EP x DP: ep_size splits the world; DP groups reduce across EP groups") {
  Config c = base_config(4, 8, 2);
  c.set("runtime", "ep_size", std::int64_t{2});
  Runtime runtime(c);
  CHECK(runtime.ep_size() == 2);
  CHECK(ep_versus_reference(runtime, 45, 3) <= kTolerance);
  std::vector<double> sums(4);
  runtime.run_on_ranks([&](int local) {
    const int rank = runtime.world_rank(local);
    CHECK(runtime.layer(local).transport().size() == 2);  // EP group: ranks {0,1} or {2,3}
    CHECK(runtime.layer(local).transport().rank() == rank % 2);
    CHECK(runtime.layer(local).placement().num_local(rank % 2) == 4);  // 8 experts over 2 ranks
    Transport& dp = runtime.dp_transport(local);
    CHECK(dp.size() == 2);  // DP group: ranks {0,2} or {1,3}
    double value = rank;
    dp.allreduce(&value, 1, DType::kF64, ReduceOp::kSum);
    sums[static_cast<std::size_t>(rank)] = value;
  });
  CHECK(sums == std::vector<double>{2, 4, 2, 4});
  Config bad = base_config(4, 8, 2);
  bad.set("runtime", "ep_size", std::int64_t{3});
  CHECK_THROWS_WITH_AS(Runtime{bad},
                       doctest::Contains("runtime.ep_size: must divide the world size 4 (got 3)"),
                       Error);
}

TEST_CASE("bad input changes nothing: after NaN tokens on one rank the next step works") {
  Runtime runtime(base_config(3, 8, 2));
  HostTensor x = synthetic_tokens(30, 24, 5);
  HostTensor y(DType::kF32, {30, 24});
  x.data<float>()[15 * 24 + 1] = std::nanf("");  // row 15: rank 1's row 5
  CHECK_THROWS_WITH_AS(
      runtime.forward(x.view(), y.view()),
      doctest::Contains("rank 1 (input rows 10..19): router topk: logit of token 5"), Error);
  CHECK(ep_versus_reference(runtime, 30, 5) <= kTolerance);
}

TEST_CASE("stream-ordered transport: the EP matrix holds, bit-identical to host-synchronous") {
  for (int ranks : {1, 2, 3, 4}) {
    for (int experts : {4, 8}) {
      for (int top_k : {1, 2, 4}) {
        CAPTURE(ranks);
        CAPTURE(experts);
        CAPTURE(top_k);
        Config sync_config = base_config(ranks, experts, top_k);
        Config async_config = sync_config;
        async_config.set("runtime", "inproc_async", true);
        Runtime sync_runtime(sync_config), async_runtime(async_config);
        CHECK(async_runtime.world_transport(0).capabilities().stream_ordered);
        CHECK(ep_versus_reference(async_runtime, 53, 4) <= kTolerance);
        const HostTensor x = synthetic_tokens(53, 24, 6);
        HostTensor a(DType::kF32, {53, 24}), b(DType::kF32, {53, 24});
        sync_runtime.forward(x.view(), a.view());
        async_runtime.forward(x.view(), b.view());
        CHECK(std::equal(a.data<float>(), a.data<float>() + a.numel(), b.data<float>()));
      }
    }
  }
}

TEST_CASE("payload dtypes on a BF16 checkpoint: bf16 within 1e-2, fp8 within 8e-2") {
  test::TempDir dir;
  const ModelWeights source = ModelWeights::random(8, 256, 96, 21);
  const auto path = dir / "bf16.safetensors";
  write_safetensors(path, test::checkpoint_tensors(source, "deepseek", DType::kBF16, ""));
  struct Case {
    const char* payload;
    const char* combine;
    double tolerance;
  };
  for (const Case& k : {Case{"f32", "f32", 1e-5}, Case{"bf16", "f32", 1e-2},
                        Case{"fp8", "f32", 8e-2}, Case{"bf16", "bf16", 1e-2}}) {
    for (bool async : {false, true}) {
      CAPTURE(k.payload);
      CAPTURE(k.combine);
      CAPTURE(async);
      Config c;
      c.set("runtime", "ranks", std::int64_t{3});
      c.set("runtime", "payload_dtype", std::string(k.payload));
      c.set("runtime", "combine_dtype", std::string(k.combine));
      c.set("runtime", "inproc_async", async);
      c.set("router", "top_k", std::int64_t{3});
      c.set("model", "weights", path.string());
      c.set("model", "format", std::string("deepseek"));
      Runtime runtime(c);
      const double error = ep_versus_reference(runtime, 64, 3);
      const std::string what = std::string(k.payload) + " payload, " + k.combine +
                               " combine: relative error " + std::to_string(error);
      MESSAGE(what);
      CHECK(error <= k.tolerance);
      if (std::string(k.payload) != "f32") CHECK(error > 0);  // the rows were converted
    }
  }
}

TEST_CASE("a bf16 payload sends half the bytes of an f32 one") {
  std::uint64_t bytes[2] = {};
  int i = 0;
  for (const char* payload : {"f32", "bf16"}) {
    Config c = base_config(2, 4, 2);
    c.set("runtime", "payload_dtype", std::string(payload));
    Runtime runtime(c);
    const HostTensor x = synthetic_tokens(32, 24, 1);
    HostTensor y(DType::kF32, {32, 24});
    runtime.forward(x.view(), y.view());
    const LayerTraffic t = runtime.total_traffic();
    // Row payload only: the counts (per peer: its rows and the slots for each of its 2
    // experts, 8 bytes each) and the slots (8 bytes per slot) stay.
    bytes[i++] = t.dispatch_bytes - static_cast<std::uint64_t>(t.rows_sent) * 2 * 8 - 2 * 3 * 8;
  }
  CHECK(bytes[0] == 2 * bytes[1]);
}

TEST_CASE("a datapath plugin runs the layer's primitives; an unknown one is a clear error") {
  Config c = base_config(3, 8, 2);
  c.set("runtime", "plugin_dirs", std::vector<std::string>{SWITCHYARD_FIXTURE_PLUGIN_DIR});
  c.set("runtime", "data_path", std::string("forwarding"));
  Runtime runtime(c);
  void* library = dlopen(SWITCHYARD_FIXTURE_PLUGIN_DIR "/libswitchyard-datapath-forwarding.so",
                         RTLD_NOW | RTLD_NOLOAD);
  REQUIRE(library != nullptr);
  auto calls = reinterpret_cast<long (*)()>(dlsym(library, "switchyard_fixture_pack_calls"));
  REQUIRE(reinterpret_cast<void*>(calls) != nullptr);
  const long before = calls();
  CHECK(ep_versus_reference(runtime, 30, 2) <= kTolerance);
  // The fixture packs run by run (the default `pack_runs`): one pack per destination rank
  // on each of three ranks.
  CHECK(calls() - before == 9);
  dlclose(library);

  Config missing = base_config(1, 4, 1);
  missing.set("runtime", "data_path", std::string("tpu"));
  CHECK_THROWS_WITH_AS(Runtime{missing},
                       doctest::Contains("runtime.data_path: datapath plugin \"tpu\" not found"),
                       Error);
}

TEST_CASE("the group's aux and z losses equal the single-rank losses on the same tokens") {
  const HostTensor x = synthetic_tokens(61, 24, 13);
  double aux[2] = {}, z[2] = {};
  int i = 0;
  for (int ranks : {1, 3}) {
    Runtime runtime(base_config(ranks, 8, 2));
    HostTensor y(DType::kF32, {61, 24});
    runtime.forward(x.view(), y.view());
    const auto stats = runtime.global_router_stats();
    aux[i] = stats.aux_loss;
    z[i] = stats.z_loss;
    ++i;
  }
  CHECK(aux[0] > 1.0);  // random logits are not perfectly balanced
  CHECK(aux[1] == doctest::Approx(aux[0]).epsilon(1e-12));
  CHECK(z[1] == doctest::Approx(z[0]).epsilon(1e-12));
}

TEST_CASE(
    "bias balancing at run time: skewed experts even out, the bias is the same on every rank") {
  // Three experts favoured by +2.0 (see write_skewed_routing_case).
  test::TempDir dir;
  const int H = 24;
  const std::int64_t T = 1200;
  const HostTensor x = test::write_skewed_routing_case(dir.path(), T);
  Config c;
  c.set("runtime", "ranks", std::int64_t{3});
  c.set("router", "top_k", std::int64_t{2});
  c.set("router", "bias_update_rate", 0.01);
  c.set("model", "weights", (dir / "skewed.safetensors").string());
  c.set("model", "format", std::string("deepseek"));
  Runtime runtime(c);
  HostTensor y(DType::kF32, {T, H});
  runtime.forward(x.view(), y.view());
  const double first = runtime.global_router_stats().imbalance;
  double last = first;
  for (int step = 1; step < 200; ++step) {
    runtime.forward(x.view(), y.view());
    last = runtime.global_router_stats().imbalance;
  }
  MESSAGE("imbalance " << first << " -> " << last);
  CHECK(first > 2.0);
  CHECK(last < 1.3);
  const auto bias0 = runtime.layer(0).router().bias();
  CHECK(bias0[0] < 0);  // a favoured expert was pushed down
  for (int r = 1; r < 3; ++r) {
    const auto bias = runtime.layer(r).router().bias();
    CHECK(std::equal(bias.begin(), bias.end(), bias0.begin(), bias0.end()));
  }
}

TEST_CASE(
    "capacity policy in the EP layer: dropped slots are not sent, fully dropped tokens get 0") {
  for (int ranks : {1, 3}) {
    CAPTURE(ranks);
    Config c = base_config(ranks, 8, 2);
    c.set("router", "policy", std::string("capacity"));
    c.set("router", "capacity_factor", 0.25);
    Runtime runtime(c);
    const std::int64_t T = 90;
    const HostTensor x = synthetic_tokens(T, 24, 4);
    HostTensor y(DType::kF32, {T, 24}), reference(DType::kF32, {T, 24});
    runtime.forward(x.view(), y.view());
    runtime.reference_forward(x.view(), reference.view());
    CHECK(test::relative_difference(y, reference) <= kTolerance);
    const auto stats = runtime.global_router_stats();
    CHECK(stats.dropped > 0);
    std::int64_t kept = 0;
    for (auto n : stats.counts) kept += n;
    CHECK(kept + stats.dropped == T * 2);
    // A token whose every slot was dropped has a zero row; count them from the plans.
    std::int64_t zero_rows = 0, empty_tokens = 0;
    for (std::int64_t t = 0; t < T; ++t) {
      bool zero = true;
      for (int h = 0; h < 24; ++h) zero = zero && y.data<float>()[t * 24 + h] == 0.0f;
      zero_rows += zero ? 1 : 0;
    }
    for (int local = 0; local < runtime.num_local_ranks(); ++local) {
      const RoutingPlan& plan = runtime.layer(local).last_plan();
      for (std::int64_t t = 0; t < plan.num_tokens; ++t) {
        bool any = false;
        for (int j = 0; j < plan.slots; ++j)
          any = any || plan.experts[static_cast<std::size_t>(t * 2 + j)] >= 0;
        empty_tokens += any ? 0 : 1;
      }
    }
    CHECK(empty_tokens > 0);
    CHECK(zero_rows == empty_tokens);
  }
}

TEST_CASE("node-limited in the EP layer: no token's dispatch reaches more nodes than max_groups") {
  // 4 ranks in nodes of 2; 8 experts, 2 per rank; top-4 within one node. Checked from what
  // each rank received (each received row is matched to its token), not from the router.
  for (int max_groups : {1, 2}) {
    CAPTURE(max_groups);
    Config c = base_config(4, 8, 4);
    c.set("runtime", "ranks_per_node", std::int64_t{2});
    c.set("router", "policy", std::string("node_limited"));
    c.set("router", "max_groups", std::int64_t{max_groups});
    Runtime runtime(c);
    const std::int64_t T = 64;
    const int H = 24;
    const HostTensor x = synthetic_tokens(T, H, 8);
    std::vector<std::vector<int>> nodes_of_token(static_cast<std::size_t>(T));
    std::mutex mutex;
    runtime.run_on_ranks([&](int local) {
      const auto [first, count] = token_block(T, 4, runtime.world_rank(local));
      const TensorView block(const_cast<float*>(x.data<float>()) + first * H, DType::kF32,
                             {count, H});
      MoELayer& layer = runtime.layer(local);
      RoutingPlan plan;
      DispatchHandle handle;
      layer.route(block, plan);
      layer.dispatch(block, plan, handle);
      const TensorView rows = handle.expert_input();
      const int node = runtime.topology().node_of(runtime.world_rank(local));
      std::lock_guard<std::mutex> lock(mutex);
      for (std::int64_t r = 0; r < rows.dim(0); ++r) {
        const float* row = rows.data_as<const float>() + r * H;
        std::int64_t token = -1;
        for (std::int64_t t = 0; t < T && token < 0; ++t) {
          if (std::equal(row, row + H, x.data<float>() + t * H)) token = t;
        }
        REQUIRE(token >= 0);
        auto& nodes = nodes_of_token[static_cast<std::size_t>(token)];
        if (std::find(nodes.begin(), nodes.end(), node) == nodes.end()) nodes.push_back(node);
      }
    });
    std::size_t most = 0;
    for (const auto& nodes : nodes_of_token) most = std::max(most, nodes.size());
    CHECK(most == static_cast<std::size_t>(max_groups));  // reached, never exceeded
    CHECK(ep_versus_reference(runtime, T, 8) <= kTolerance);
  }
}

TEST_CASE("expert choice in the EP layer: K = E slots, tokens no expert took get 0") {
  for (int ranks : {1, 3}) {
    CAPTURE(ranks);
    Config c = base_config(ranks, 8, 2);
    c.set("router", "policy", std::string("expert_choice"));
    c.set("router", "capacity_factor", 1.0);
    Runtime runtime(c);
    CHECK(runtime.layer(0).router().slots_per_token() == 8);
    CHECK(ep_versus_reference(runtime, 45, 6) <= kTolerance);
  }
}

TEST_CASE("expert choice: the group's aux loss uses top_k, not the K = E slots") {
  const HostTensor x = synthetic_tokens(40, 24, 21);
  double aux[2] = {};
  int i = 0;
  for (int ranks : {1, 2}) {
    Config c = base_config(ranks, 8, 2);
    c.set("router", "policy", std::string("expert_choice"));
    Runtime runtime(c);
    HostTensor y(DType::kF32, {40, 24});
    runtime.forward(x.view(), y.view());
    aux[i++] = runtime.global_router_stats().aux_loss;
    if (ranks == 1) CHECK(aux[0] == doctest::Approx(runtime.layer(0).router().stats().aux_loss));
  }
  CHECK(aux[0] > 0.9);  // about 1 with k = 2; with K = E it would be about 1/4
  CHECK(aux[1] == doctest::Approx(aux[0]).epsilon(1e-12));
}

namespace {

/// A function the pretend data path plugin exports (tests/fixtures/plugins), loaded.
long pretend_counter(const char* symbol) {
  void* library = dlopen(SWITCHYARD_FIXTURE_PLUGIN_DIR "/libswitchyard-datapath-pretend_cuda.so",
                         RTLD_NOW | RTLD_NOLOAD);
  REQUIRE(library != nullptr);
  auto counter = reinterpret_cast<long (*)()>(dlsym(library, symbol));
  REQUIRE(reinterpret_cast<void*>(counter) != nullptr);
  const long value = counter();
  dlclose(library);
  return value;
}

/// Worlds of in-process ranks whose experts are pretend_swiglu (either memory): on the host
/// data path, or (`on_device`) on the pretend device's, 8 experts, top-3.
/// The transports of a device data path: `inproc` takes host memory only, so the rows go
/// through host staging memory; `pretend_device` takes device memory and is stream-ordered,
/// as NCCL is.
const char* const kDeviceTransports[] = {"inproc", "pretend_device"};

Config pretend_device_config(int ranks, int ep, const std::string& payload, bool on_device,
                             const std::string& transport = "inproc") {
  Config c = base_config(ranks, 8, 3);
  c.set("runtime", "ep_size", std::int64_t{ep});
  c.set("runtime", "plugin_dirs", std::vector<std::string>{SWITCHYARD_FIXTURE_PLUGIN_DIR});
  c.set("runtime", "payload_dtype", payload);
  c.set("experts", "kernel", std::string("pretend_swiglu"));
  if (on_device) {
    c.set("runtime", "data_path", std::string("pretend_cuda"));
    c.set("runtime", "transport", transport);
  }
  return c;
}

/// `pretend_device_config` in the worst-case mode: no rank forwards more than `max_tokens`.
Config worst_case_config(int ranks, int ep, const std::string& payload, bool on_device,
                         const std::string& transport, std::int64_t max_tokens) {
  Config c = pretend_device_config(ranks, ep, payload, on_device, transport);
  c.set("runtime", "max_tokens_per_rank", max_tokens);
  return c;
}

/// Each rank's layer forwards its own `per_rank` rows of x [ranks · per_rank, H] into y on
/// a thread of its own, handed device tensors and an event for y (a framework's forward);
/// returns the host waits of all ranks together, counted before anyone waits for y.
long forward_with_events(Runtime& runtime, int ranks, std::int64_t per_rank, HostTensor& x,
                         HostTensor& y) {
  const std::int64_t H = x.view().dim(1);
  std::vector<std::unique_ptr<StreamEvent>> written(static_cast<std::size_t>(ranks));
  const long waits_before = pretend_counter("switchyard_fixture_stream_waits");
  auto errors = test::on_threads(ranks, [&](int r) {
    MoELayer& layer = runtime.layer(r);
    const std::int64_t first = per_rank * r;
    written[static_cast<std::size_t>(r)] = layer.stream().create_event();
    layer.forward(
        TensorView(x.data<float>() + first * H, DType::kF32, {per_rank, H}, Device::cuda(0)),
        TensorView(y.data<float>() + first * H, DType::kF32, {per_rank, H}, Device::cuda(0)),
        *written[static_cast<std::size_t>(r)]);
  });
  const long waits = pretend_counter("switchyard_fixture_stream_waits") - waits_before;
  for (const auto& e : errors) CHECK_MESSAGE(!e.has_value(), (e ? e->what() : ""));
  for (auto& event : written) event->synchronize();
  return waits;
}

/// Runs `check(ranks, on_host, on_device, transport)` with runtimes of pretend_device_config
/// on the host data path and on the pretend device over each of `kDeviceTransports`, for
/// worlds 1-4 and EP 2 × DP 2, and each payload dtype.
template <typename Check>
void on_pretend_worlds(const Check& check) {
  struct Case {
    int ranks, ep;
  };
  for (const Case& k : {Case{1, 1}, Case{2, 2}, Case{3, 3}, Case{4, 4}, Case{4, 2}}) {
    for (const std::string payload : {"f32", "bf16", "fp8"}) {
      for (const std::string transport : kDeviceTransports) {
        CAPTURE(k.ranks);
        CAPTURE(k.ep);
        CAPTURE(payload);
        CAPTURE(transport);
        Runtime on_host(pretend_device_config(k.ranks, k.ep, payload, false));
        Runtime on_device(pretend_device_config(k.ranks, k.ep, payload, true, transport));
        check(k.ranks, on_host, on_device, transport);
      }
    }
  }
}

}  // namespace

TEST_CASE("the device path of the layer and the runtime, on a pretend device") {
  // Host memory labelled cuda:0 (tests/fixtures/plugins/pretend_device.cpp): the gate copied
  // to the device once, routing through a host copy of the logits, the per-peer counts in
  // host memory, host tokens staged through device buffers, and every shape check on device
  // tensors — the paths a GPU run takes, checked where no GPU is.
  for (const char* payload : {"f32", "bf16", "fp8"}) {
    for (const char* policy : {"topk", "node_limited", "capacity", "expert_choice"}) {
      CAPTURE(payload);
      CAPTURE(policy);
      Config c = base_config(1, 8, 2);
      c.set("runtime", "plugin_dirs", std::vector<std::string>{SWITCHYARD_FIXTURE_PLUGIN_DIR});
      c.set("runtime", "transport", std::string("pretend_device"));
      c.set("runtime", "data_path", std::string("pretend_cuda"));
      c.set("runtime", "payload_dtype", std::string(payload));
      c.set("experts", "kernel", std::string("pretend_swiglu"));
      c.set("router", "policy", std::string(policy));
      if (std::string(policy) == "node_limited") {
        c.set("router", "num_groups", std::int64_t{4});
        c.set("router", "max_groups", std::int64_t{2});
      }
      Runtime runtime(c);
      void* library =
          dlopen(SWITCHYARD_FIXTURE_PLUGIN_DIR "/libswitchyard-datapath-pretend_cuda.so",
                 RTLD_NOW | RTLD_NOLOAD);
      REQUIRE(library != nullptr);
      auto routes =
          reinterpret_cast<long (*)()>(dlsym(library, "switchyard_fixture_device_routes"));
      REQUIRE(reinterpret_cast<void*>(routes) != nullptr);
      const long before = routes();
      const double tolerance = std::string(payload) == "f32"    ? kTolerance
                               : std::string(payload) == "bf16" ? 2e-2
                                                                : 1e-1;
      CHECK(ep_versus_reference(runtime, 41, 3) <= tolerance);
      CHECK(runtime.global_router_stats().tokens == 41);
      // Token-choice policies without a capacity route "on the device"; the others through
      // the host.
      const bool on_device = std::string(policy) == "topk" || std::string(policy) == "node_limited";
      CHECK(routes() - before == (on_device ? 1 : 0));
      {
        HostTensor x = synthetic_tokens(41, 24, 3), y(DType::kF32, {41, 24});
        const long waits = pretend_counter("switchyard_fixture_stream_waits");
        runtime.forward(TensorView(x.data<float>(), DType::kF32, {41, 24}, Device::cuda(0)),
                        TensorView(y.data<float>(), DType::kF32, {41, 24}, Device::cuda(0)));
        // The host waits of a forward on device tensors: the counts (rows per destination
        // and per expert; a device routing's statistics and logit check come with them),
        // and y written. A host policy adds two: it reads the logits, then its plan is
        // copied up.
        CHECK(pretend_counter("switchyard_fixture_stream_waits") - waits == (on_device ? 2 : 4));
        // With an event for y instead of the wait: one host wait, for the counts.
        MoELayer& layer = runtime.layer(0);
        const std::unique_ptr<StreamEvent> y_written = layer.stream().create_event();
        HostTensor again(DType::kF32, {41, 24});
        std::fill(again.data<float>(), again.data<float>() + again.numel(), std::nanf(""));
        const long before_event = pretend_counter("switchyard_fixture_stream_waits");
        layer.forward(TensorView(x.data<float>(), DType::kF32, {41, 24}, Device::cuda(0)),
                      TensorView(again.data<float>(), DType::kF32, {41, 24}, Device::cuda(0)),
                      *y_written);
        CHECK(pretend_counter("switchyard_fixture_stream_waits") - before_event ==
              (on_device ? 1 : 3));
        y_written->synchronize();
        CHECK(std::memcmp(again.data<float>(), y.data<float>(), y.size_bytes()) == 0);
      }
      dlclose(library);
    }
  }
}

TEST_CASE(
    "several ranks on one pretend device: the device data path gives the host path's bytes, "
    "with one host wait for the counts") {
  // The pretend device's streams run their work later, on a thread of their own, so a host
  // read that does not wait for the stream reads stale bytes. Over inproc (host memory
  // only) the rows go between the ranks through host staging memory; over the
  // stream-ordered pretend_device transport they stay on the device and the streams. Both
  // runs use the same expert arithmetic (pretend_swiglu takes either memory), so y is the
  // same bytes.
  on_pretend_worlds([](int ranks, Runtime& on_host, Runtime& on_device,
                       const std::string& transport) {
    for (std::int64_t tokens : {53, 7}) {  // the second step reuses the buffers
      HostTensor x = synthetic_tokens(tokens, 24, static_cast<std::uint64_t>(tokens));
      HostTensor expected(DType::kF32, {tokens, 24});
      on_host.forward(x.view(), expected.view());
      // Host tokens staged through device buffers, and device tokens as they are.
      HostTensor staged(DType::kF32, {tokens, 24});
      std::fill(staged.data<float>(), staged.data<float>() + staged.numel(), std::nanf(""));
      on_device.forward(x.view(), staged.view());
      CHECK(std::memcmp(staged.data<float>(), expected.data<float>(), staged.size_bytes()) == 0);
      HostTensor y(DType::kF32, {tokens, 24});
      std::fill(y.data<float>(), y.data<float>() + y.numel(), std::nanf(""));
      const long waits_before = pretend_counter("switchyard_fixture_stream_waits");
      on_device.forward(TensorView(x.data<float>(), DType::kF32, {tokens, 24}, Device::cuda(0)),
                        TensorView(y.data<float>(), DType::kF32, {tokens, 24}, Device::cuda(0)));
      // Read as soon as forward returns: it returns when y is written.
      CHECK(std::memcmp(y.data<float>(), expected.data<float>(), y.size_bytes()) == 0);
      const long waits = pretend_counter("switchyard_fixture_stream_waits") - waits_before;
      if (transport == "pretend_device") {
        // Each rank: the counts (with the routing's report), and y written.
        CHECK(waits == 2 * ranks);
      } else {
        // Host staging adds, each rank, the rows out and the partial sums back through
        // host memory.
        CHECK(waits == 4 * ranks);
      }
    }
  });
}

TEST_CASE("ranks of one pretend device, each with an event for y: one host wait per forward") {
  // A framework's forward: each rank's layer on its own thread, handed device tensors, y
  // marked by an event instead of waited for. The counts are the one thing the host reads.
  for (const int ranks : {1, 2, 3, 4}) {
    CAPTURE(ranks);
    constexpr std::int64_t kPerRank = 11, H = 24;
    Runtime on_host(pretend_device_config(ranks, ranks, "bf16", false));
    Runtime on_device(pretend_device_config(ranks, ranks, "bf16", true, "pretend_device"));
    const std::int64_t T = kPerRank * ranks;
    HostTensor x = synthetic_tokens(T, H, 31), expected(DType::kF32, {T, H}),
               y(DType::kF32, {T, H});
    on_host.forward(x.view(), expected.view());
    std::fill(y.data<float>(), y.data<float>() + y.numel(), std::nanf(""));
    CHECK(forward_with_events(on_device, ranks, kPerRank, x, y) == ranks);
    CHECK(std::memcmp(y.data<float>(), expected.data<float>(), y.size_bytes()) == 0);
  }
}

TEST_CASE(
    "forward on a caller's stream: after the work that writes x, before the work that reads y") {
  // The caller's stream (a pretend stream, queued: each piece of work runs 200 µs later on
  // its own thread) writes x, the forward is queued behind it on every rank, and the
  // caller's copy of y out runs after y is written. Out of order, the layers read NaN
  // tokens or the copy reads NaN rows. Over pretend_device the host waits once per rank,
  // for the counts.
  // In the worst-case mode (max_tokens_per_rank 20 >= a rank's tokens) it waits 0
  // times over pretend_device.
  for (const int ranks : {1, 3}) {
    for (const std::string transport : kDeviceTransports) {
      for (const std::int64_t max_tokens : {0, 20}) {
        CAPTURE(ranks);
        CAPTURE(transport);
        CAPTURE(max_tokens);
        constexpr std::int64_t T = 19, H = 24;
        Runtime on_host(pretend_device_config(ranks, ranks, "f32", false));
        Runtime on_device(worst_case_config(ranks, ranks, "f32", true, transport, max_tokens));
        HostTensor x = synthetic_tokens(T, H, 33), expected(DType::kF32, {T, H});
        on_host.forward_local_tokens(x.view(), expected.view());
        DataPath& path = on_device.layer(0).data_path();
        const std::unique_ptr<Stream> caller = path.create_stream(true);
        HostTensor x_device(DType::kF32, {T, H}), y_device(DType::kF32, {T, H}),
            y_out(DType::kF32, {T, H});
        for (HostTensor* m : {&x_device, &y_device, &y_out})
          std::fill(m->data<float>(), m->data<float>() + m->numel(), std::nanf(""));
        path.copy(x_device.data<float>(), x.data<float>(), x.size_bytes(), *caller);
        const long waits = pretend_counter("switchyard_fixture_stream_waits");
        on_device.forward_local_tokens_on_stream(
            TensorView(x_device.data<float>(), DType::kF32, {T, H}, Device::cuda(0)),
            TensorView(y_device.data<float>(), DType::kF32, {T, H}, Device::cuda(0)),
            caller->native_handle());
        // Over inproc the staging adds its two waits (rows out, partial sums back).
        CHECK(pretend_counter("switchyard_fixture_stream_waits") - waits ==
              (transport == "pretend_device" ? 1 : 3) * ranks - (max_tokens > 0 ? ranks : 0));
        path.copy(y_out.data<float>(), y_device.data<float>(), y_out.size_bytes(), *caller);
        caller->synchronize();
        CHECK(std::memcmp(y_out.data<float>(), expected.data<float>(), y_out.size_bytes()) == 0);
      }
    }
  }
  // The host data path has no streams to order after.
  Runtime on_host(pretend_device_config(2, 2, "f32", false));
  HostTensor x = synthetic_tokens(4, 24, 1), y(DType::kF32, {4, 24});
  HostStream stream;
  CHECK_THROWS_WITH_AS(on_host.forward_local_tokens_on_stream(x.view(), y.view(), &stream),
                       doctest::Contains("no streams of a caller"), Error);
}

TEST_CASE("a NaN token on one rank of a pretend device: found with the counts, every rank stops") {
  // The device routing's logit check comes back with the counts' wait; the failing rank
  // tells the others in the counts exchange, as on the host path, and the next step works.
  Runtime runtime(pretend_device_config(3, 3, "f32", true));
  HostTensor x = synthetic_tokens(30, 24, 5);
  HostTensor y(DType::kF32, {30, 24});
  x.data<float>()[14 * 24 + 3] = std::nanf("");  // rank 1's (rows 10..19) token 4
  CHECK_THROWS_WITH_AS(runtime.forward(x.view(), y.view()),
                       doctest::Contains("rank 1 (input rows 10..19): router topk: logit of "
                                         "token 4"),
                       Error);
  const HostTensor good = synthetic_tokens(30, 24, 5);
  runtime.forward(good.view(), y.view());
  CHECK(ep_versus_reference(runtime, 30, 5) <= 1e-5);
}

TEST_CASE("chunks: the pipelined forward gives the unchunked result for every payload") {
  struct Case {
    const char* payload;
    const char* combine;
  };
  for (int ranks : {1, 3}) {
    for (const Case& k : {Case{"f32", "f32"}, Case{"bf16", "f32"}, Case{"fp8", "bf16"}}) {
      for (bool async : {false, true}) {
        Config c = base_config(ranks, 8, 3);
        c.set("runtime", "payload_dtype", std::string(k.payload));
        c.set("runtime", "combine_dtype", std::string(k.combine));
        c.set("runtime", "inproc_async", async);
        Runtime unchunked(c);
        // 53 tokens: uneven chunks; 17 chunks: some ranks have empty chunks.
        for (int chunks : {2, 3, 17}) {
          // Exchanges on their own thread, or inline on the calling one.
          const bool overlap = chunks != 3;
          CAPTURE(ranks);
          CAPTURE(k.payload);
          CAPTURE(k.combine);
          CAPTURE(async);
          CAPTURE(chunks);
          CAPTURE(overlap);
          Config chunked_config = c;
          chunked_config.set("runtime", "chunks", std::int64_t{chunks});
          chunked_config.set("runtime", "overlap", overlap);
          Runtime chunked(chunked_config);
          for (std::int64_t tokens : {53, 20}) {  // the second step reuses the buffers
            const HostTensor x = synthetic_tokens(tokens, 24, 8);
            HostTensor a(DType::kF32, {tokens, 24}), b(DType::kF32, {tokens, 24});
            std::fill(b.data<float>(), b.data<float>() + b.numel(), std::nanf(""));
            unchunked.forward(x.view(), a.view());
            chunked.forward(x.view(), b.view());
            // The data path is the same per token; only OpenBLAS may round an expert row
            // differently when an expert's row count differs (its edge kernels).
            CHECK(test::relative_difference(a, b) <= 1e-6);
          }
          if (std::string(k.payload) == "f32") {
            CHECK(ep_versus_reference(chunked, 41, 9) <= kTolerance);
          }
        }
      }
    }
  }
}

TEST_CASE("chunks: a routing failure on one rank stops every rank, and the next step works") {
  Config c = base_config(3, 8, 2);
  c.set("runtime", "chunks", std::int64_t{4});
  Runtime runtime(c);
  HostTensor x = synthetic_tokens(30, 24, 5);
  HostTensor y(DType::kF32, {30, 24});
  x.data<float>()[15 * 24 + 3] = std::nanf("");  // a token of rank 1
  CHECK_THROWS_AS(runtime.forward(x.view(), y.view()), Error);
  const HostTensor good = synthetic_tokens(30, 24, 5);
  runtime.forward(good.view(), y.view());
  CHECK(ep_versus_reference(runtime, 30, 5) <= kTolerance);
}

namespace {

/// The test's own experts: f_e(v) = (e + 1)·v + e, element by element.
double hand_expert(int e, double v) { return (e + 1) * v + e; }

/// Runs the caller's experts (hand_expert) on every part's received rows into its
/// expert_output().
/// Each part's experts on its rows, expert j's block starting at `expert_first_row()[j]`
/// (a multiple of `alignment`, its padding rows zero, the blocks back to back).
void run_hand_experts(ProcessDispatch& d, std::int64_t alignment = 1) {
  for (auto& part : d.parts) {
    TensorView in = part.handle.expert_input();
    TensorView out = part.handle.expert_output();
    const std::int64_t H = in.dim(1);
    std::int64_t end = 0;
    for (int j = 0; j < part.num_local_experts; ++j) {
      const std::int64_t first = part.handle.expert_first_row()[static_cast<std::size_t>(j)];
      const std::int64_t rows = part.handle.rows_per_expert()[static_cast<std::size_t>(j)];
      CHECK(first == end);
      CHECK(first % alignment == 0);
      for (std::int64_t row = first; row < first + rows; ++row) {
        for (std::int64_t h = 0; h < H; ++h) {
          out.data_as<float>()[row * H + h] = static_cast<float>(
              hand_expert(part.first_expert + j, in.data_as<float>()[row * H + h]));
        }
      }
      end = first + (rows + alignment - 1) / alignment * alignment;
      for (std::int64_t i = (first + rows) * H; i < end * H; ++i) {
        CHECK(in.data_as<float>()[i] == 0.0f);  // padding
      }
    }
    CHECK(end == in.dim(0));
  }
}

}  // namespace

TEST_CASE("dispatch and combine with the caller's experts: y = sum of weighted f_e(x)") {
  // 11 tokens, 5 experts over 3 ranks (2, 2, 1 experts), two slots, one of them sometimes
  // unused; the routing is the test's own and y is summed here in double.
  constexpr std::int64_t T = 11, H = 24, K = 2;
  Runtime runtime(base_config(3, 5, 2));
  const HostTensor x = synthetic_tokens(T, H, 9);
  // The plan as a column slice of a wider int32 array: strides (4, 1).
  std::vector<std::int32_t> wide(static_cast<std::size_t>(T * 4), 99);
  std::vector<float> weights(static_cast<std::size_t>(T * K));
  for (std::int64_t t = 0; t < T; ++t) {
    wide[static_cast<std::size_t>(t * 4 + 1)] = static_cast<std::int32_t>(t % 5);
    wide[static_cast<std::size_t>(t * 4 + 2)] =
        t % 4 == 3
            ? -1
            : static_cast<std::int32_t>((t * 2 + 1) % 5 == t % 5 ? (t + 1) % 5 : (t * 2 + 1) % 5);
    weights[static_cast<std::size_t>(t * K)] = 0.25f + 0.01f * static_cast<float>(t);
    weights[static_cast<std::size_t>(t * K + 1)] =
        t % 4 == 3 ? 0.0f : 0.5f - 0.02f * static_cast<float>(t);
  }
  const std::int64_t wide_shape[] = {T, K}, wide_strides[] = {4, 1};
  const TensorView experts(wide.data() + 1, DType::kI32, wide_shape, wide_strides);
  const TensorView weight_view(weights.data(), DType::kF32, {T, K});

  ProcessDispatch d;
  runtime.dispatch(x.view(), experts, weight_view, d);
  REQUIRE(d.parts.size() == 3);
  CHECK(d.parts[0].first_expert == 0);
  CHECK(d.parts[0].num_local_experts == 2);
  CHECK(d.parts[1].first_expert == 2);
  CHECK(d.parts[2].first_expert == 4);
  CHECK(d.parts[2].num_local_experts == 1);
  CHECK(d.parts[1].first_token == 4);  // blocks of 4, 4, 3 tokens
  CHECK(d.parts[2].num_tokens == 3);
  // Rows per expert: the tokens routed to it (a token's two slots are distinct experts).
  std::vector<std::int64_t> tokens_of(5, 0);
  for (std::int64_t t = 0; t < T; ++t) {
    for (std::int64_t k = 1; k <= K; ++k) {
      const auto e = wide[static_cast<std::size_t>(t * 4 + k)];
      if (e >= 0) ++tokens_of[static_cast<std::size_t>(e)];
    }
  }
  for (const auto& part : d.parts) {
    for (int j = 0; j < part.num_local_experts; ++j) {
      CHECK(part.handle.rows_per_expert()[static_cast<std::size_t>(j)] ==
            tokens_of[static_cast<std::size_t>(part.first_expert + j)]);
    }
  }
  run_hand_experts(d);
  std::vector<TensorView> outputs;
  for (auto& part : d.parts) outputs.push_back(part.handle.expert_output());
  HostTensor y(DType::kF32, {T, H});
  std::fill(y.data<float>(), y.data<float>() + y.numel(), std::nanf(""));
  runtime.combine(d, outputs, y.view());
  double worst = 0;
  for (std::int64_t t = 0; t < T; ++t) {
    for (std::int64_t h = 0; h < H; ++h) {
      double expected = 0;
      for (std::int64_t k = 0; k < K; ++k) {
        const int e = wide[static_cast<std::size_t>(t * 4 + 1 + k)];
        if (e < 0) continue;
        expected += static_cast<double>(weights[static_cast<std::size_t>(t * K + k)]) *
                    hand_expert(e, x.data<float>()[t * H + h]);
      }
      worst = std::max(worst, std::abs(y.data<float>()[t * H + h] - expected) /
                                  std::max(1.0, std::abs(expected)));
    }
  }
  CHECK(worst <= 1e-6);

  // Once per dispatch.
  CHECK_THROWS_WITH_AS(runtime.combine(d, outputs, y.view()),
                       doctest::Contains("combine needs a dispatch of its own"), Error);
  // Arguments are checked before anything is sent.
  runtime.dispatch(x.view(), experts, weight_view, d);
  CHECK_THROWS_WITH_AS(runtime.combine(d, std::span(outputs).first(2), y.view()),
                       doctest::Contains("one expert output per local rank: 3 expected, 2 given"),
                       Error);
  std::vector<TensorView> short_outputs = outputs;
  short_outputs[1] = TensorView(outputs[1].data(), DType::kF32, {outputs[1].dim(0) - 1, H});
  CHECK_THROWS_WITH_AS(runtime.combine(d, short_outputs, y.view()),
                       doctest::Contains("expert output of local rank 1: expected f32["), Error);
  run_hand_experts(d);
  runtime.combine(d, outputs, y.view());  // still combinable after refused arguments
}

TEST_CASE("expert_alignment: each expert's rows start at a multiple of it, and y is the same") {
  // Grouped GEMMs want aligned blocks: [runtime] expert_alignment pads each local expert's
  // received rows with zero rows. The combine reads the same rows: the same bytes of y.
  constexpr std::int64_t T = 37, H = 24, K = 3;
  std::vector<std::int32_t> experts(static_cast<std::size_t>(T * K));
  std::vector<float> weights(static_cast<std::size_t>(T * K));
  for (std::int64_t i = 0; i < T * K; ++i) {
    experts[static_cast<std::size_t>(i)] = static_cast<std::int32_t>((i / K * 5 + i % K) % 8);
    weights[static_cast<std::size_t>(i)] = 0.2f + 0.01f * static_cast<float>(i % 13);
  }
  const TensorView e(experts.data(), DType::kI32, {T, K});
  const TensorView w(weights.data(), DType::kF32, {T, K});
  // A dispatch before, with other experts, leaves rows where the padding will be.
  std::vector<std::int32_t> before(experts);
  for (auto& v : before) v = (v + 3) % 8;
  const TensorView e_before(before.data(), DType::kI32, {T, K});
  for (const int ranks : {1, 2, 3}) {
    for (const bool on_device : {false, true}) {
      CAPTURE(ranks);
      CAPTURE(on_device);
      const HostTensor x = synthetic_tokens(T, H, 5);
      HostTensor expected(DType::kF32, {T, H}), y(DType::kF32, {T, H});
      auto run = [&](std::int64_t alignment, HostTensor& out) {
        Config c = pretend_device_config(ranks, ranks, "f32", on_device);
        c.set("runtime", "expert_alignment", alignment);
        Runtime runtime(c);
        ProcessDispatch d;
        runtime.dispatch(x.view(), e_before, w, d);
        runtime.dispatch(x.view(), e, w, d);
        run_hand_experts(d, alignment);
        std::vector<TensorView> outputs;
        for (auto& part : d.parts) outputs.push_back(part.handle.expert_output());
        runtime.combine(d, outputs, out.view());
      };
      run(1, expected);
      run(8, y);
      CHECK(std::memcmp(y.data<float>(), expected.data<float>(), y.size_bytes()) == 0);
    }
  }
}

TEST_CASE("dispatch and combine on the pretend device: the host path's bytes, at worlds 1-4") {
  // The caller's experts run on the received rows where they are (the pretend device's
  // memory is host memory); the device data path over inproc moves them through host
  // staging memory, over pretend_device on the streams. Host tokens and y are staged; device tokens
  // and y are taken as they are.
  constexpr std::int64_t T = 23, H = 24, K = 3;
  std::vector<std::int32_t> experts(static_cast<std::size_t>(T * K));
  std::vector<float> weights(static_cast<std::size_t>(T * K));
  for (std::int64_t i = 0; i < T * K; ++i) {
    // Slot 2 unused for every fifth token; the others distinct experts of 8.
    experts[static_cast<std::size_t>(i)] =
        i % K == 2 && (i / K) % 5 == 0 ? -1 : static_cast<std::int32_t>((i / K * 3 + i % K) % 8);
    weights[static_cast<std::size_t>(i)] = 0.1f + 0.01f * static_cast<float>(i % 17);
  }
  const TensorView e(experts.data(), DType::kI32, {T, K});
  const TensorView w(weights.data(), DType::kF32, {T, K});
  on_pretend_worlds([&](int /*ranks*/, Runtime& on_host, Runtime& on_device,
                        const std::string& /*transport*/) {
    HostTensor x = synthetic_tokens(T, H, 12);
    auto dispatch_and_combine = [&](Runtime& runtime, Device where, HostTensor& y) {
      ProcessDispatch d;
      runtime.dispatch(TensorView(x.data<float>(), DType::kF32, {T, H}, where), e, w, d);
      run_hand_experts(d);
      std::vector<TensorView> outputs;
      for (auto& part : d.parts) outputs.push_back(part.handle.expert_output());
      std::fill(y.data<float>(), y.data<float>() + y.numel(), std::nanf(""));
      runtime.combine(d, outputs, TensorView(y.data<float>(), DType::kF32, {T, H}, where));
    };
    HostTensor expected(DType::kF32, {T, H}), staged(DType::kF32, {T, H}),
        direct(DType::kF32, {T, H});
    dispatch_and_combine(on_host, Device::host(), expected);
    dispatch_and_combine(on_device, Device::host(), staged);
    dispatch_and_combine(on_device, Device::cuda(0), direct);
    CHECK(std::memcmp(staged.data<float>(), expected.data<float>(), expected.size_bytes()) == 0);
    CHECK(std::memcmp(direct.data<float>(), expected.data<float>(), expected.size_bytes()) == 0);
  });
  // Bad input is refused with the host path's messages (the plan checked on the host).
  Config c = base_config(3, 8, 3);
  c.set("runtime", "plugin_dirs", std::vector<std::string>{SWITCHYARD_FIXTURE_PLUGIN_DIR});
  c.set("experts", "kernel", std::string("pretend_swiglu"));
  c.set("runtime", "data_path", std::string("pretend_cuda"));
  Runtime runtime(c);
  HostTensor x = synthetic_tokens(T, H, 12);
  ProcessDispatch d;
  weights[4] = std::numeric_limits<float>::infinity();  // token 1 slot 1: rank 0's
  CHECK_THROWS_WITH_AS(runtime.dispatch(x.view(), e, w, d),
                       doctest::Contains("rank 0 (input rows 0..7): routing plan: token 1 slot 1 "
                                         "has weight +Inf, not a finite number"),
                       Error);
  weights[4] = 0.5f;
  x.data<float>()[9 * H + 2] = std::nanf("");  // rank 1's token 1
  CHECK_THROWS_WITH_AS(
      runtime.dispatch(x.view(), e, w, d),
      doctest::Contains("rank 1 (input rows 8..15): input x: token 1 feature 2 is NaN"), Error);
  x.data<float>()[9 * H + 2] = 0.5f;
  runtime.dispatch(x.view(), e, w, d);  // the next one works
  CHECK(d.combinable);
}

TEST_CASE("dispatch refuses bad input on every rank together, and the next one works") {
  constexpr std::int64_t T = 9, H = 24;
  Runtime runtime(base_config(3, 4, 2));
  HostTensor x = synthetic_tokens(T, H, 4);
  std::vector<std::int32_t> experts(static_cast<std::size_t>(T * 2));
  std::vector<float> weights(static_cast<std::size_t>(T * 2), 0.5f);
  for (std::int64_t t = 0; t < T; ++t) {
    experts[static_cast<std::size_t>(2 * t)] = static_cast<std::int32_t>(t % 4);
    experts[static_cast<std::size_t>(2 * t + 1)] = static_cast<std::int32_t>((t + 1) % 4);
  }
  const TensorView e(experts.data(), DType::kI32, {T, 2});
  const TensorView w(weights.data(), DType::kF32, {T, 2});
  ProcessDispatch d;

  x.data<float>()[4 * H + 5] = std::nanf("");  // rank 1's token 1
  CHECK_THROWS_WITH_AS(
      runtime.dispatch(x.view(), e, w, d),
      doctest::Contains("rank 1 (input rows 3..5): input x: token 1 feature 5 is NaN"), Error);
  CHECK_FALSE(d.combinable);
  x.data<float>()[4 * H + 5] = 1.0f;

  weights[7] = std::numeric_limits<float>::infinity();  // token 3 slot 1: rank 1's token 0
  CHECK_THROWS_WITH_AS(runtime.dispatch(x.view(), e, w, d),
                       doctest::Contains("rank 1 (input rows 3..5): routing plan: token 0 slot 1 "
                                         "has weight +Inf, not a finite number"),
                       Error);
  weights[7] = 0.5f;
  experts[16] = 4;  // token 8 slot 0: rank 2's token 2
  CHECK_THROWS_WITH_AS(runtime.dispatch(x.view(), e, w, d),
                       doctest::Contains("rank 2 (input rows 6..8): routing plan: token 2 slot 0 "
                                         "has expert 4, outside 0..3"),
                       Error);
  experts[16] = 0;
  std::vector<std::int32_t> three(static_cast<std::size_t>(T * 3), 0);
  CHECK_THROWS_WITH_AS(
      runtime.dispatch(x.view(), TensorView(three.data(), DType::kI32, {T, 3}), w, d),
      doctest::Contains("weights: expected f32[9,3] host tensor, got f32[9,2]"), Error);

  runtime.dispatch(x.view(), e, w, d);
  CHECK(d.combinable);
  // int64 ids (PyTorch's topk indices) route the same rows; one beyond int32 is refused
  // as out of range, by the rank that holds it.
  std::vector<std::int64_t> wide(experts.begin(), experts.end());
  ProcessDispatch from_wide;
  runtime.dispatch(x.view(), TensorView(wide.data(), DType::kI64, {T, 2}), w, from_wide);
  for (std::size_t i = 0; i < d.parts.size(); ++i) {
    const TensorView a = d.parts[i].handle.expert_input(),
                     b = from_wide.parts[i].handle.expert_input();
    REQUIRE(a.numel() == b.numel());
    CHECK(std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.numel()) * 4) == 0);
  }
  wide[5] = std::int64_t{1} << 40;  // token 2 slot 1: rank 0's
  CHECK_THROWS_WITH_AS(
      runtime.dispatch(x.view(), TensorView(wide.data(), DType::kI64, {T, 2}), w, from_wide),
      doctest::Contains("rank 0 (input rows 0..2): routing plan: token 2 slot 1 has expert "
                        "1099511627776, outside 0..3"),
      Error);
}

TEST_CASE("forward over this process's tokens: with every rank here, forward's bits") {
  Runtime runtime(base_config(3, 8, 2));
  const HostTensor x = synthetic_tokens(31, 24, 12);
  HostTensor a(DType::kF32, {31, 24}), b(DType::kF32, {31, 24});
  runtime.forward(x.view(), a.view());
  runtime.forward_local_tokens(x.view(), b.view());
  CHECK(std::memcmp(a.data<float>(), b.data<float>(), a.numel() * sizeof(float)) == 0);
}

TEST_CASE("worst-case mode on a pretend device: the host path's bytes with no host wait") {
  // max_tokens_per_rank fixes every exchange's size, so the host reads nothing back: over
  // the stream-ordered pretend_device transport a forward with an event for y queues its
  // whole step without one host wait (after the first, which grows the buffers). The
  // counted host path gives the expected bytes; padding rows must change nothing.
  for (const int ranks : {1, 2, 3, 4}) {
    for (const std::string payload : {"f32", "bf16", "fp8"}) {
      CAPTURE(ranks);
      CAPTURE(payload);
      constexpr std::int64_t kPerRank = 9, H = 24;
      Runtime on_host(pretend_device_config(ranks, ranks, payload, false));
      Runtime worst_case(worst_case_config(ranks, ranks, payload, true, "pretend_device", 12));
      const std::int64_t T = kPerRank * ranks;
      for (const std::uint64_t seed : {7, 8}) {
        HostTensor x = synthetic_tokens(T, H, seed), expected(DType::kF32, {T, H}),
                   y(DType::kF32, {T, H});
        on_host.forward(x.view(), expected.view());
        std::fill(y.data<float>(), y.data<float>() + y.numel(), std::nanf(""));
        const long waits = forward_with_events(worst_case, ranks, kPerRank, x, y);
        if (seed == 8) CHECK(waits == 0);
        CHECK(std::memcmp(y.data<float>(), expected.data<float>(), y.size_bytes()) == 0);
      }
      // The statistics come after the steps: the last step's, summed over the group.
      const GlobalRouterStats stats = worst_case.global_router_stats();
      CHECK(stats.tokens == T);
      std::int64_t kept = 0;
      for (const std::int64_t c : stats.counts) kept += c;
      CHECK(kept == 3 * T);
      // Every peer gets a whole block of 12 rows and their slots; nothing else moves.
      const std::uint64_t row = payload_row_bytes(parse_payload_dtype(payload), H);
      const std::uint64_t meta = 3 * sizeof(SlotMeta);
      CHECK(worst_case.layer(0).traffic().dispatch_bytes ==
            static_cast<std::uint64_t>(ranks - 1) * 12 * (row + meta));
      // A training forward counts its rows (its backward needs the step's statistics): the
      // counts' wait on every rank, the same y.
      for (int r = 0; r < ranks; ++r) worst_case.layer(r).set_training(true);
      HostTensor x = synthetic_tokens(T, H, 9), expected(DType::kF32, {T, H}),
                 y(DType::kF32, {T, H});
      on_host.forward(x.view(), expected.view());
      CHECK(forward_with_events(worst_case, ranks, kPerRank, x, y) == ranks);
      CHECK(std::memcmp(y.data<float>(), expected.data<float>(), y.size_bytes()) == 0);
    }
  }
}

TEST_CASE("worst-case mode through every path: host tokens, EP x DP, host data path, inproc") {
  // The same y as the counted host path on the runtime's own forward (host tokens staged
  // through the device), over host staging (inproc), on EP 2 x DP 2, and on the host data
  // path itself (where the mode changes only the layout).
  struct Case {
    int ranks, ep;
    bool on_device;
    const char* transport;
  };
  for (const Case& k : {Case{3, 3, true, "inproc"}, Case{4, 2, true, "pretend_device"},
                        Case{4, 2, false, "inproc"}, Case{2, 2, false, "inproc"}}) {
    CAPTURE(k.ranks);
    CAPTURE(k.ep);
    CAPTURE(k.on_device);
    CAPTURE(k.transport);
    Runtime on_host(pretend_device_config(k.ranks, k.ep, "bf16", false));
    Runtime worst_case(worst_case_config(k.ranks, k.ep, "bf16", k.on_device, k.transport, 20));
    for (const std::int64_t tokens : {37, 0, 4 * k.ranks}) {
      CAPTURE(tokens);
      HostTensor x = synthetic_tokens(tokens, 24, 3), expected(DType::kF32, {tokens, 24}),
                 y(DType::kF32, {tokens, 24});
      on_host.forward(x.view(), expected.view());
      std::fill(y.data<float>(), y.data<float>() + y.numel(), std::nanf(""));
      worst_case.forward(x.view(), y.view());
      CHECK((tokens == 0 ||
             std::memcmp(y.data<float>(), expected.data<float>(), y.size_bytes()) == 0));
    }
  }
}

TEST_CASE("worst-case mode: a rank over the limit fails every rank; NaN logits only their own") {
  constexpr std::int64_t H = 24;
  Runtime on_host(pretend_device_config(3, 3, "f32", false));
  Runtime worst_case(worst_case_config(3, 3, "f32", true, "pretend_device", 8));
  // Rank 1 has 9 tokens, one more than the limit: it throws after serving its experts, its
  // rows tell the others, who throw when they see them (here at once: forward waits for
  // y), and the others' y is right.
  {
    const std::array<std::int64_t, 3> counts{5, 9, 8};
    HostTensor x = synthetic_tokens(22, H, 4), expected(DType::kF32, {22, H}),
               y(DType::kF32, {22, H});
    std::fill(y.data<float>(), y.data<float>() + y.numel(), std::nanf(""));
    std::array<std::int64_t, 4> first{0, 5, 14, 22};
    auto errors = test::on_threads(3, [&](int r) {
      const auto at = static_cast<std::size_t>(r);
      worst_case.layer(r).forward(TensorView(x.data<float>() + first[at] * H, DType::kF32,
                                             {counts[at], H}, Device::cuda(0)),
                                  TensorView(y.data<float>() + first[at] * H, DType::kF32,
                                             {counts[at], H}, Device::cuda(0)));
    });
    REQUIRE(errors[1].has_value());
    CHECK(std::string(errors[1]->what())
              .find("9 tokens on this rank, more than [runtime] "
                    "max_tokens_per_rank = 8") != std::string::npos);
    for (const std::size_t r : {0, 2}) {
      REQUIRE(errors[r].has_value());
      CHECK(errors[r]->code() == ErrorCode::kPeerFailed);
      CHECK(std::string(errors[r]->what()).find("world rank 1 refused its input") !=
            std::string::npos);
    }
    // Ranks 0 and 2 as the counted path gives them with rank 1's tokens absent.
    HostTensor expected_0(DType::kF32, {5, H}), expected_2(DType::kF32, {8, H});
    auto counted = test::on_threads(3, [&](int r) {
      const std::array<std::int64_t, 3> sent{5, 0, 8};
      const auto at = static_cast<std::size_t>(r);
      HostTensor* out = r == 0 ? &expected_0 : &expected_2;
      HostTensor none(DType::kF32, {0, H});
      on_host.layer(r).forward(
          TensorView(x.data<float>() + first[at] * H, DType::kF32, {sent[at], H}),
          r == 1 ? none.view() : out->view());
    });
    for (const auto& e : counted) CHECK_FALSE(e.has_value());
    CHECK(std::memcmp(y.data<float>(), expected_0.data<float>(), expected_0.size_bytes()) == 0);
    CHECK(std::memcmp(y.data<float>() + 14 * H, expected_2.data<float>(),
                      expected_2.size_bytes()) == 0);
  }
  // A NaN token on rank 2: routed on the device, it goes to no expert; rank 2 alone hears
  // of it, at the end of a later call (here the wait for the step's reports).
  {
    HostTensor x = synthetic_tokens(24, H, 6), y(DType::kF32, {24, H});
    x.data<float>()[(16 + 3) * H + 5] = std::nanf("");
    auto errors = test::on_threads(3, [&](int r) {
      MoELayer& layer = worst_case.layer(r);
      layer.forward(TensorView(x.data<float>() + 8 * r * H, DType::kF32, {8, H}, Device::cuda(0)),
                    TensorView(y.data<float>() + 8 * r * H, DType::kF32, {8, H}, Device::cuda(0)));
      layer.finish_worst_case_steps();
    });
    CHECK_FALSE(errors[0].has_value());
    CHECK_FALSE(errors[1].has_value());
    REQUIRE(errors[2].has_value());
    CHECK(
        std::string(errors[2]->what()).find("had a NaN or infinite logit and went to no expert") !=
        std::string::npos);
    // The reports are taken: the next step runs and reports nothing.
    const HostTensor good = synthetic_tokens(24, H, 6);
    HostTensor expected(DType::kF32, {24, H});
    on_host.forward(good.view(), expected.view());
    worst_case.forward(good.view(), y.view());
    CHECK(std::memcmp(y.data<float>(), expected.data<float>(), y.size_bytes()) == 0);
  }
}

TEST_CASE("worst-case mode: a device plan's bad expert id is reported after the step") {
  // Nobody reads a device plan on the host, so its ids are checked by the layout: the
  // token is not sent (its y is 0), and the rank hears of it with the step's report.
  constexpr std::int64_t H = 24, T = 4;
  constexpr int K = 3;
  Runtime worst_case(worst_case_config(2, 2, "f32", true, "pretend_device", 8));
  HostTensor x = synthetic_tokens(2 * T, H, 12), y(DType::kF32, {2 * T, H});
  std::fill(y.data<float>(), y.data<float>() + y.numel(), std::nanf(""));
  auto errors = test::on_threads(2, [&](int r) {
    MoELayer& layer = worst_case.layer(r);
    DataPath& path = layer.data_path();
    std::vector<std::int32_t> experts{0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 3, 5};
    if (r == 1) experts[2 * K + 1] = 99;  // token 2, slot 1
    const std::vector<float> weights(T * K, 0.25f);
    RoutingPlan plan(path.allocator());
    plan.num_tokens = T;
    plan.slots = K;
    plan.experts.resize(T * K);
    plan.weights.resize(T * K);
    path.copy(plan.experts.data(), experts.data(), experts.size() * 4, layer.stream());
    path.copy(plan.weights.data(), weights.data(), weights.size() * 4, layer.stream());
    layer.forward(TensorView(x.data<float>() + r * T * H, DType::kF32, {T, H}, Device::cuda(0)),
                  plan,
                  TensorView(y.data<float>() + r * T * H, DType::kF32, {T, H}, Device::cuda(0)));
    layer.finish_worst_case_steps();
  });
  CHECK_FALSE(errors[0].has_value());
  REQUIRE(errors[1].has_value());
  CHECK(std::string(errors[1]->what())
            .find("routing plan: token 2 slot 1 has an expert outside 0..7; the token was not "
                  "sent") != std::string::npos);
  for (std::int64_t h = 0; h < H; ++h) CHECK(y.data<float>()[(T + 2) * H + h] == 0.0f);
  for (std::int64_t i = 0; i < y.numel(); ++i) CHECK_FALSE(std::isnan(y.data<float>()[i]));
}
