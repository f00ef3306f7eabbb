// A runtime hosting a model of several MoE layers: one set of transports and one set of
// step buffers per rank whatever L is, the chain through the layers, the layer index on
// every entry point, and checkpoints of every layer written and read back.
#include <doctest/doctest.h>

#include <set>

#include "switchyard/checkpoint.hpp"
#include "switchyard/io.hpp"
#include "switchyard/runtime.hpp"
#include "switchyard/status.hpp"
#include "test_support.hpp"

using namespace switchyard;

namespace {

Config model_config(int ranks, const std::string& layers, std::int64_t hidden = 24) {
  Config c;
  c.set("runtime", "ranks", std::int64_t{ranks});
  c.set("runtime", "timeout_s", 60.0);
  c.set("router", "top_k", std::int64_t{2});
  c.set("router", "normalize", true);  // Qwen-MoE's norm_topk_prob
  c.set("model", "num_experts", std::int64_t{8});
  c.set("model", "hidden", hidden);
  c.set("model", "ffn_hidden", std::int64_t{40});
  c.set("model", "seed", std::int64_t{3});
  if (!layers.empty()) c.set("model", "layers", layers);
  return c;
}

/// One layer's MoE over x [T,H] in double precision from its weights alone: softmax over the
/// experts, the top two renormalised, SwiGLU experts (no router or reference code).
HostTensor dense_layer_float64(const ModelWeights& m, const HostTensor& x) {
  const std::int64_t T = x.shape()[0], H = m.hidden(), F = m.ffn_hidden();
  const int E = m.num_experts();
  HostTensor y(DType::kF32, {T, H});
  const float* gate = m.gate().data<float>();
  for (std::int64_t t = 0; t < T; ++t) {
    const float* row = x.data<float>() + t * H;
    std::vector<double> p(static_cast<std::size_t>(E));
    double top = -1e300;
    for (int e = 0; e < E; ++e) {
      double s = 0;
      for (std::int64_t h = 0; h < H; ++h) s += static_cast<double>(gate[e * H + h]) * row[h];
      p[static_cast<std::size_t>(e)] = s;
      top = std::max(top, s);
    }
    double sum = 0;
    for (double& v : p) sum += (v = std::exp(v - top));
    for (double& v : p) v /= sum;
    int first = 0, second = -1;
    for (int e = 1; e < E; ++e) {
      if (p[static_cast<std::size_t>(e)] > p[static_cast<std::size_t>(first)]) first = e;
    }
    for (int e = 0; e < E; ++e) {
      if (e != first &&
          (second < 0 || p[static_cast<std::size_t>(e)] > p[static_cast<std::size_t>(second)]))
        second = e;
    }
    std::vector<double> out(static_cast<std::size_t>(H), 0.0);
    const double norm = p[static_cast<std::size_t>(first)] + p[static_cast<std::size_t>(second)];
    for (int e : {first, second}) {
      const SwigluExpertWeights w = m.experts(e, 1)[0];
      const float *g = w.gate.data_as<float>(), *u = w.up.data_as<float>(),
                  *d = w.down.data_as<float>();
      const double weight = p[static_cast<std::size_t>(e)] / norm;
      for (std::int64_t f = 0; f < F; ++f) {
        double a = 0, b = 0;
        for (std::int64_t h = 0; h < H; ++h) {
          a += static_cast<double>(g[f * H + h]) * row[h];
          b += static_cast<double>(u[f * H + h]) * row[h];
        }
        const double act = a / (1 + std::exp(-a)) * b;
        for (std::int64_t h = 0; h < H; ++h) {
          out[static_cast<std::size_t>(h)] += weight * d[h * F + f] * act;
        }
      }
    }
    for (std::int64_t h = 0; h < H; ++h) {
      y.data<float>()[t * H + h] = static_cast<float>(out[static_cast<std::size_t>(h)]);
    }
  }
  return y;
}

}  // namespace

TEST_CASE("a model's layers share the transports, the data path and the step buffers") {
  Runtime runtime(model_config(3, "0-3"));
  REQUIRE(runtime.num_layers() == 4);
  CHECK(std::vector<int>(runtime.layer_ids().begin(), runtime.layer_ids().end()) ==
        std::vector<int>{0, 1, 2, 3});
  for (int local = 0; local < runtime.num_local_ranks(); ++local) {
    std::set<const Transport*> transports;
    std::set<const DataPath*> paths;
    std::set<const LayerWorkspace*> workspaces;
    std::set<const Router*> routers;
    for (int l = 0; l < runtime.num_layers(); ++l) {
      transports.insert(&runtime.layer(local, l).transport());
      paths.insert(&runtime.layer(local, l).data_path());
      workspaces.insert(&runtime.layer(local, l).workspace());
      routers.insert(&runtime.layer(local, l).router());
    }
    CHECK(transports.size() == 1);  // one EP split per rank, not one per layer
    CHECK(paths.size() == 1);
    CHECK(workspaces.size() == 1);
    CHECK(routers.size() == 4);  // each layer its own router state
  }
  const std::string message = test::error_message([&] { runtime.layer(0, 4); });
  CHECK(message.find("layer 4 does not exist") != std::string::npos);
  CHECK(message.find("4 MoE layers (indices 0..3)") != std::string::npos);
  HostTensor x = synthetic_tokens(5, 24, 1), y(DType::kF32, {5, 24});
  CHECK(test::error_message([&] {
          runtime.forward(x.view(), y.view(), -1);
        }).find("forward: layer -1 does not exist") != std::string::npos);
}

TEST_CASE("random layers: layer 0 is the one-layer model, the others draw apart") {
  Runtime one(model_config(1, ""));
  Runtime many(model_config(1, "0,5"));
  CHECK(many.layer_ids()[1] == 5);
  const auto same = [](const ModelWeights& a, const ModelWeights& b) {
    return std::equal(a.gate().data<float>(), a.gate().data<float>() + a.gate().numel(),
                      b.gate().data<float>());
  };
  CHECK(same(one.model(), many.model(0)));
  CHECK_FALSE(same(many.model(0), many.model(1)));
}

TEST_CASE("the chain through the layers: forward_model, per-layer forwards, float64") {
  for (int ranks : {1, 2, 4}) {
    CAPTURE(ranks);
    Runtime runtime(model_config(ranks, "2,4,7"));
    const std::int64_t T = 37, H = 24;
    const HostTensor x = synthetic_tokens(T, static_cast<int>(H), 8);
    HostTensor y(DType::kF32, {T, H}), a(DType::kF32, {T, H}), b(DType::kF32, {T, H});
    runtime.forward_model(x.view(), y.view());
    runtime.forward(x.view(), a.view(), 0);
    runtime.forward(a.view(), b.view(), 1);
    runtime.forward(b.view(), a.view(), 2);
    CHECK(std::equal(y.data<float>(), y.data<float>() + y.numel(), a.data<float>()));
    // Independent: the chain in double precision from the weights alone.
    HostTensor h = x;
    for (int l = 0; l < 3; ++l) h = dense_layer_float64(runtime.model(l), h);
    CHECK(test::relative_difference(y, h) <= 1e-5);
    HostTensor reference(DType::kF32, {T, H});
    runtime.reference_model(x.view(), reference.view());
    CHECK(test::relative_difference(y, reference) <= 1e-5);
    // Each layer's statistics are its own.
    CHECK(runtime.global_router_stats(1).tokens == T);
    CHECK(runtime.global_router_stats(1).counts != runtime.global_router_stats(2).counts);
  }
}

TEST_CASE("step buffers of 16 layers are within 10 % of one layer's") {
  // Every layer forwards the same routing (a plan given, as `switchyard bench --routing
  // uniform` does), so any growth with L is memory a layer holds of its own. Under the
  // layers' own routers the shared buffers grow to the largest layer's step instead.
  const std::int64_t T = 256, H = 512;
  std::size_t bytes[2] = {0, 0};
  int i = 0;
  for (const char* layers : {"", "0-15"}) {
    Runtime runtime(model_config(2, layers, H));
    const HostTensor x = synthetic_tokens(2 * T, static_cast<int>(H), 2);
    runtime.run_on_ranks([&](int local) {
      RoutingPlan plan;
      plan.num_tokens = T;
      plan.slots = 2;
      plan.experts.resize(static_cast<std::size_t>(2 * T));
      plan.weights.resize(static_cast<std::size_t>(2 * T));
      for (std::int64_t t = 0; t < 2 * T; ++t) {
        plan.experts[static_cast<std::size_t>(t)] = static_cast<std::int32_t>((t * 3 + t / 2) % 8);
        plan.weights[static_cast<std::size_t>(t)] = 0.5f;
      }
      const TensorView rows(const_cast<float*>(x.data<float>()) + local * T * H, DType::kF32,
                            {T, H});
      HostTensor y(DType::kF32, {T, H});
      RoutingPlan routed;
      for (int l = 0; l < runtime.num_layers(); ++l) {
        runtime.layer(local, l).route(rows, routed);  // each layer's logits, as in a forward
        runtime.layer(local, l).forward(rows, plan, y.view());
      }
    });
    bytes[i++] = runtime.step_buffer_bytes();
  }
  MESSAGE("step buffers: 1 layer " << bytes[0] << " B, 16 layers " << bytes[1] << " B");
  CHECK(bytes[0] > 0);
  CHECK(static_cast<double>(bytes[1]) <= 1.10 * static_cast<double>(bytes[0]));
}

TEST_CASE("save_model writes every layer under its own prefix and loads back") {
  test::TempDir dir;
  Config config = model_config(2, "1,3");
  config.set("model", "format", std::string("deepseek"));
  config.set("model", "prefix", std::string("model.layers.{layer}.mlp."));
  Runtime runtime(config);
  runtime.save_model(dir / "saved.safetensors");
  Checkpoint saved(dir / "saved.safetensors");
  CHECK(saved.contains("model.layers.1.mlp.gate.weight"));
  CHECK(saved.contains("model.layers.3.mlp.experts.7.down_proj.weight"));
  CHECK_FALSE(saved.contains("model.layers.0.mlp.gate.weight"));

  Config reload = model_config(3, "1,3");
  reload.set("model", "format", std::string("deepseek"));
  reload.set("model", "prefix", std::string("model.layers.{layer}.mlp."));
  reload.set("model", "weights", (dir / "saved.safetensors").string());
  Runtime loaded(reload);
  const HostTensor x = synthetic_tokens(20, 24, 4);
  HostTensor y1(DType::kF32, {20, 24}), y2(DType::kF32, {20, 24});
  runtime.forward_model(x.view(), y1.view());
  loaded.forward_model(x.view(), y2.view());
  CHECK(test::relative_difference(y2, y1) <= 1e-6);

  // {layer} without a list of layers is refused, naming both keys.
  Config unlisted = reload;
  unlisted.set("model", "layers", std::string());
  CHECK(test::error_message([&] { Runtime r(unlisted); }).find("model.layers must say") !=
        std::string::npos);

  // Layers without {layer} in the prefix would write one layer's names twice: refused.
  Config unnamed = model_config(2, "1,3");
  Runtime same_names(unnamed);
  const Error error = test::error_of([&] { same_names.save_model(dir / "unnamed.safetensors"); });
  CHECK(error.code() == ErrorCode::kInvalidArgument);
  CHECK(error.message().find("names no {layer}") != std::string::npos);
  CHECK_FALSE(std::filesystem::exists(dir / "unnamed.safetensors"));
}
