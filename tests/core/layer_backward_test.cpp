// MoELayer::backward on in-process ranks against central finite differences of a dense
// float64 MoE written here (the routing decisions held at the forward's): dx, the gate's
// gradient summed over ranks, and every expert's weight gradients.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

#include "switchyard/layer.hpp"
#include "switchyard/runtime.hpp"
#include "test_support.hpp"

using namespace switchyard;

namespace {

constexpr std::int64_t T = 7, H = 6, F = 5;
constexpr int E = 4, K = 2;

/// The model's parameters in double: gate [E,H], then per expert gate, up [F,H], down [H,F].
struct Parameters {
  std::vector<double> gate;
  std::vector<std::vector<double>> w1, w3, w2;
};

double silu(double a) { return a / (1 + std::exp(-a)); }

/// Σ dy ⊙ y of the dense layer with the plan's experts held; `sigmoid`: weights are
/// sigmoid(z) normalised over the selected, else softmax(z) over all experts.
double loss(const Parameters& p, const std::vector<double>& x, const std::vector<int>& experts,
            const std::vector<float>& dy, bool sigmoid) {
  double total = 0;
  for (std::int64_t t = 0; t < T; ++t) {
    double z[E];
    for (int e = 0; e < E; ++e) {
      z[e] = 0;
      for (std::int64_t h = 0; h < H; ++h)
        z[e] +=
            x[static_cast<std::size_t>(t * H + h)] * p.gate[static_cast<std::size_t>(e * H + h)];
    }
    double w[K];
    double max = z[0], sum = 0;
    for (int e = 1; e < E; ++e) max = std::max(max, z[e]);
    for (int e = 0; e < E; ++e) sum += std::exp(z[e] - max);
    double selected_sum = 0;
    for (int j = 0; j < K; ++j) {
      const int e = experts[static_cast<std::size_t>(t * K + j)];
      w[j] = sigmoid ? 1 / (1 + std::exp(-z[e])) : std::exp(z[e] - max) / sum;
      selected_sum += w[j];
    }
    for (int j = 0; j < K; ++j) {
      if (sigmoid) w[j] /= (selected_sum + 1e-20);
      const auto e = static_cast<std::size_t>(experts[static_cast<std::size_t>(t * K + j)]);
      std::vector<double> act(static_cast<std::size_t>(F));
      for (std::int64_t f = 0; f < F; ++f) {
        double a = 0, b = 0;
        for (std::int64_t h = 0; h < H; ++h) {
          a +=
              p.w1[e][static_cast<std::size_t>(f * H + h)] * x[static_cast<std::size_t>(t * H + h)];
          b +=
              p.w3[e][static_cast<std::size_t>(f * H + h)] * x[static_cast<std::size_t>(t * H + h)];
        }
        act[static_cast<std::size_t>(f)] = silu(a) * b;
      }
      for (std::int64_t h = 0; h < H; ++h) {
        double y = 0;
        for (std::int64_t f = 0; f < F; ++f)
          y += p.w2[e][static_cast<std::size_t>(h * F + f)] * act[static_cast<std::size_t>(f)];
        total += dy[static_cast<std::size_t>(t * H + h)] * w[j] * y;
      }
    }
  }
  return total;
}

std::vector<double> widen(const TensorView& t) {
  return {t.data_as<const float>(), t.data_as<const float>() + t.numel()};
}

/// The runtime's model (one layer, every expert) in double.
Parameters parameters_of(Runtime& runtime) {
  Parameters p;
  p.gate = widen(runtime.model().gate().view());
  for (const auto& w : runtime.model().experts(0, E)) {
    p.w1.push_back(widen(w.gate));
    p.w3.push_back(widen(w.up));
    p.w2.push_back(widen(w.down));
  }
  return p;
}

}  // namespace

TEST_CASE("layer backward on 1-3 ranks: dx, the gate's and the experts' gradients") {
  // `training`: the forward keeps its rows, outputs and projections for the backward;
  // otherwise the backward dispatches x again and recomputes them.
  for (const bool training : {false, true})
    for (const bool sigmoid : {false, true}) {
      for (const int ranks : {1, 2, 3}) {
        CAPTURE(training);
        CAPTURE(sigmoid);
        CAPTURE(ranks);
        Config config;
        config.set("runtime", "ranks", std::int64_t{ranks});
        config.set("runtime", "timeout_s", 60.0);
        config.set("router", "top_k", std::int64_t{K});
        if (sigmoid) config.set("router", "score", std::string("sigmoid"));
        config.set("model", "num_experts", std::int64_t{E});
        config.set("model", "hidden", std::int64_t{H});
        config.set("model", "ffn_hidden", std::int64_t{F});
        config.set("model", "seed", std::int64_t{3});
        Runtime runtime(config);
        runtime.set_training(training);
        const HostTensor x = synthetic_tokens(T, H, 5);
        const HostTensor dy = synthetic_tokens(T, H, 6);
        HostTensor y(DType::kF32, {T, H}), dx(DType::kF32, {T, H});
        runtime.forward(x.view(), y.view());
        for (int r = 0; r < ranks; ++r) REQUIRE(runtime.layer(r).kept_for_backward() == training);

        // Gradients per local rank: the gate's [E,H] and its experts', summed afterwards.
        std::vector<HostTensor> d_gates;
        std::vector<std::vector<HostTensor>> expert_grads(static_cast<std::size_t>(ranks));
        std::vector<std::vector<SwigluExpertGradients>> d_experts(static_cast<std::size_t>(ranks));
        std::vector<int> experts(static_cast<std::size_t>(T * K));
        for (int r = 0; r < ranks; ++r) {
          d_gates.emplace_back(DType::kF32, std::vector<std::int64_t>{E, H});
          const ExpertPlacement& placement = runtime.layer(r).placement();
          auto& g = expert_grads[static_cast<std::size_t>(r)];
          for (int e = 0; e < placement.num_local(r); ++e) {
            g.emplace_back(DType::kF32, std::vector<std::int64_t>{F, H});
            g.emplace_back(DType::kF32, std::vector<std::int64_t>{F, H});
            g.emplace_back(DType::kF32, std::vector<std::int64_t>{H, F});
          }
          for (int e = 0; e < placement.num_local(r); ++e) {
            d_experts[static_cast<std::size_t>(r)].push_back(
                {g[static_cast<std::size_t>(3 * e)].view(),
                 g[static_cast<std::size_t>(3 * e + 1)].view(),
                 g[static_cast<std::size_t>(3 * e + 2)].view()});
          }
          const auto [first, count] = token_block(T, ranks, r);
          const RoutingPlan& plan = runtime.layer(r).last_plan();
          REQUIRE(plan.num_tokens == count);
          for (std::int64_t i = 0; i < count * K; ++i) {
            experts[static_cast<std::size_t>(first * K + i)] =
                plan.experts[static_cast<std::size_t>(i)];
          }
        }
        runtime.run_on_ranks([&](int r) {
          const auto [first, count] = token_block(T, ranks, r);
          auto rows = [&](const HostTensor& m) {
            return TensorView(const_cast<float*>(m.data<float>()) + first * H, DType::kF32,
                              {count, H});
          };
          LayerGradients out;
          out.dx = rows(dx);
          out.d_experts = d_experts[static_cast<std::size_t>(r)];
          out.d_gate = d_gates[static_cast<std::size_t>(r)].view();
          runtime.layer(r).backward(rows(x), rows(dy), out);
        });

        Parameters p = parameters_of(runtime);
        std::vector<double> xs = widen(x.view());
        const std::vector<float> dys(dy.data<float>(), dy.data<float>() + dy.numel());
        auto f = [&] { return loss(p, xs, experts, dys, sigmoid); };
        test::Agreement ax, agate, aexperts;
        for (std::size_t i = 0; i < xs.size(); ++i)
          ax.add(dx.data<float>()[i], test::central_difference(xs, i, f));
        for (std::size_t i = 0; i < p.gate.size(); ++i) {
          double sum = 0;
          for (const auto& g : d_gates) sum += g.data<float>()[i];
          agate.add(sum, test::central_difference(p.gate, i, f));
        }
        for (int r = 0; r < ranks; ++r) {
          const ExpertPlacement& placement = runtime.layer(r).placement();
          for (int j = 0; j < placement.num_local(r); ++j) {
            const auto e = static_cast<std::size_t>(placement.first_expert(r) + j);
            std::vector<double>* tensors[3] = {&p.w1[e], &p.w3[e], &p.w2[e]};
            for (int which = 0; which < 3; ++which) {
              const HostTensor& got = expert_grads[static_cast<std::size_t>(r)]
                                                  [static_cast<std::size_t>(3 * j + which)];
              for (std::size_t i = 0; i < tensors[which]->size(); ++i) {
                aexperts.add(got.data<float>()[i], test::central_difference(*tensors[which], i, f));
              }
            }
          }
        }
        CHECK(ax.relative() <= 1e-4);
        CHECK(agate.relative() <= 1e-4);
        CHECK(aexperts.relative() <= 1e-4);
      }
    }
}

namespace {

/// The router's losses over each EP group, with the plain top-k counts of the forward
/// held: aux_coeff · E / (k T_g²) Σ_e (Σ_t P[t,e]) c_g[e] + z_coeff · mean_t lse², P softmax.
double group_losses(const Parameters& p, const std::vector<double>& x,
                    const std::vector<int>& group_of_token, int groups, double aux_coeff,
                    double z_coeff, const std::vector<std::vector<std::int64_t>>& counts) {
  double total = 0;
  for (int g = 0; g < groups; ++g) {
    double aux = 0, zl = 0;
    std::int64_t tokens = 0;
    for (std::int64_t t = 0; t < T; ++t) {
      if (group_of_token[static_cast<std::size_t>(t)] != g) continue;
      ++tokens;
      double z[E], max = -1e300, sum = 0;
      for (int e = 0; e < E; ++e) {
        z[e] = 0;
        for (std::int64_t h = 0; h < H; ++h)
          z[e] +=
              x[static_cast<std::size_t>(t * H + h)] * p.gate[static_cast<std::size_t>(e * H + h)];
        max = std::max(max, z[e]);
      }
      for (int e = 0; e < E; ++e) sum += std::exp(z[e] - max);
      for (int e = 0; e < E; ++e)
        aux +=
            std::exp(z[e] - max) / sum *
            static_cast<double>(counts[static_cast<std::size_t>(g)][static_cast<std::size_t>(e)]);
      const double lse = max + std::log(sum);
      zl += lse * lse;
    }
    if (tokens == 0) continue;
    total +=
        aux_coeff * aux * E / (K * double(tokens) * double(tokens)) + z_coeff * zl / double(tokens);
  }
  return total;
}

}  // namespace

TEST_CASE("Runtime::backward: world 1-4 × EP groups of world and world/2, with the losses") {
  // Also on the pretend device (tests/fixtures/plugins: host memory labelled cuda:0, its
  // streams' work queued on a thread of their own) with its SwiGLU experts.
  for (const int world : {1, 2, 3, 4}) {
    for (const int ep : {world, world / 2}) {
      for (const bool pretend_device : {false, true}) {
        if (ep < 1 || world % ep != 0) continue;
        CAPTURE(world);
        CAPTURE(ep);
        CAPTURE(pretend_device);
        Config config;
        if (pretend_device) {
          config.set("runtime", "plugin_dirs",
                     std::vector<std::string>{SWITCHYARD_FIXTURE_PLUGIN_DIR});
          config.set("runtime", "data_path", std::string("pretend_cuda"));
          config.set("experts", "kernel", std::string("pretend_swiglu"));
        }
        config.set("runtime", "ranks", std::int64_t{world});
        config.set("runtime", "ep_size", std::int64_t{ep});
        config.set("runtime", "timeout_s", 60.0);
        config.set("router", "top_k", std::int64_t{K});
        config.set("router", "aux_loss_coeff", 0.2);
        config.set("router", "z_loss_coeff", 0.05);
        config.set("model", "num_experts", std::int64_t{E});
        config.set("model", "hidden", std::int64_t{H});
        config.set("model", "ffn_hidden", std::int64_t{F});
        config.set("model", "seed", std::int64_t{world * 10 + ep});
        Runtime runtime(config);
        const HostTensor x = synthetic_tokens(T, H, 15);
        const HostTensor dy = synthetic_tokens(T, H, 16);
        HostTensor y(DType::kF32, {T, H}), dx(DType::kF32, {T, H});
        runtime.forward(x.view(), y.view());
        // The decisions and the groups' plain top-k counts, as the forward made them.
        std::vector<int> experts(static_cast<std::size_t>(T * K)), group_of_token(T);
        std::vector<std::vector<std::int64_t>> counts(static_cast<std::size_t>(world / ep),
                                                      std::vector<std::int64_t>(E, 0));
        for (int r = 0; r < world; ++r) {
          const auto [first, count] = token_block(T, world, r);
          const RoutingPlan& plan = runtime.layer(r).last_plan();
          for (std::int64_t i = 0; i < count * K; ++i)
            experts[static_cast<std::size_t>(first * K + i)] =
                plan.experts[static_cast<std::size_t>(i)];
          for (std::int64_t t = first; t < first + count; ++t)
            group_of_token[static_cast<std::size_t>(t)] = r / ep;
          const auto& aux = runtime.layer(r).router().stats().aux_counts;
          for (int e = 0; e < E; ++e)
            counts[static_cast<std::size_t>(r / ep)][static_cast<std::size_t>(e)] +=
                aux[static_cast<std::size_t>(e)];
        }
        ModelGradients gradients;
        runtime.backward(x.view(), dy.view(), dx.view(), gradients);

        Parameters p = parameters_of(runtime);
        std::vector<double> xs = widen(x.view());
        const std::vector<float> dys(dy.data<float>(), dy.data<float>() + dy.numel());
        // Each DP group computes the same experts on its own tokens: the layer's loss is the
        // sum over all tokens, which the dense loss already is.
        auto f = [&] {
          return loss(p, xs, experts, dys, false) +
                 group_losses(p, xs, group_of_token, world / ep, 0.2, 0.05, counts);
        };
        test::Agreement ax, agate, aexperts;
        for (std::size_t i = 0; i < xs.size(); ++i)
          ax.add(dx.data<float>()[i], test::central_difference(xs, i, f));
        for (std::size_t i = 0; i < p.gate.size(); ++i)
          agate.add(gradients.gate.data<float>()[i], test::central_difference(p.gate, i, f));
        for (int e = 0; e < E; ++e) {
          std::vector<double>* tensors[3] = {&p.w1[static_cast<std::size_t>(e)],
                                             &p.w3[static_cast<std::size_t>(e)],
                                             &p.w2[static_cast<std::size_t>(e)]};
          for (int which = 0; which < 3; ++which) {
            const HostTensor& got =
                gradients.experts[static_cast<std::size_t>(e)][static_cast<std::size_t>(which)];
            REQUIRE(got.numel() == static_cast<std::int64_t>(tensors[which]->size()));
            for (std::size_t i = 0; i < tensors[which]->size(); ++i)
              aexperts.add(got.data<float>()[i], test::central_difference(*tensors[which], i, f));
          }
        }
        CHECK(ax.relative() <= 1e-4);
        CHECK(agate.relative() <= 1e-4);
        CHECK(aexperts.relative() <= 1e-4);
      }
    }
  }
}

TEST_CASE("Runtime::backward on the pretend device: the host data path's bytes, every payload") {
  // The same experts (pretend_swiglu takes either memory) on the host data path and on the
  // pretend device, whose rows go between the in-process ranks through host staging memory
  // (inproc) or on the streams (pretend_device); host tensors (staged) and device tensors (as
  // they are).
  for (const int world : {1, 2, 3, 4}) {
    for (const std::string payload : {"f32", "bf16", "fp8"}) {
      CAPTURE(world);
      CAPTURE(payload);
      Config host;
      host.set("runtime", "ranks", std::int64_t{world});
      host.set("runtime", "ep_size", std::int64_t{world == 4 ? 2 : world});
      host.set("runtime", "timeout_s", 60.0);
      host.set("runtime", "payload_dtype", payload);
      host.set("runtime", "plugin_dirs", std::vector<std::string>{SWITCHYARD_FIXTURE_PLUGIN_DIR});
      host.set("experts", "kernel", std::string("pretend_swiglu"));
      host.set("router", "top_k", std::int64_t{K});
      host.set("router", "aux_loss_coeff", 0.2);
      host.set("model", "num_experts", std::int64_t{E});
      host.set("model", "hidden", std::int64_t{H});
      host.set("model", "ffn_hidden", std::int64_t{F});
      Config device = host;
      device.set("runtime", "data_path", std::string("pretend_cuda"));
      // Over the stream-ordered pretend_device transport the rows stay on the device.
      Config device_transport = device;
      device_transport.set("runtime", "transport", std::string("pretend_device"));
      HostTensor x = synthetic_tokens(T, H, 25), dy = synthetic_tokens(T, H, 26);
      auto run = [&](const Config& config, Device where, HostTensor& dx, ModelGradients& g) {
        Runtime runtime(config);
        runtime.set_training(true);
        HostTensor y(DType::kF32, {T, H});
        auto on = [&](HostTensor& m) {
          return TensorView(m.data<float>(), DType::kF32, {T, H}, where);
        };
        runtime.forward(on(x), on(y));
        std::fill(dx.data<float>(), dx.data<float>() + dx.numel(), std::nanf(""));
        runtime.backward(on(x), on(dy), on(dx), g);
      };
      HostTensor dx_host(DType::kF32, {T, H}), dx_staged(DType::kF32, {T, H}),
          dx_device(DType::kF32, {T, H}), dx_streams(DType::kF32, {T, H});
      ModelGradients on_host, staged, on_device, on_streams;
      run(host, Device::host(), dx_host, on_host);
      run(device, Device::host(), dx_staged, staged);
      run(device, Device::cuda(0), dx_device, on_device);
      run(device_transport, Device::cuda(0), dx_streams, on_streams);
      auto same = [](const HostTensor& a, const HostTensor& b) {
        return a.numel() == b.numel() &&
               std::memcmp(a.data<float>(), b.data<float>(), a.size_bytes()) == 0;
      };
      for (const ModelGradients* g : {&staged, &on_device, &on_streams}) {
        CHECK(same(g->gate, on_host.gate));
        for (int e = 0; e < E; ++e) {
          for (std::size_t w = 0; w < 3; ++w) {
            CHECK(same(g->experts[static_cast<std::size_t>(e)][w],
                       on_host.experts[static_cast<std::size_t>(e)][w]));
          }
        }
      }
      CHECK(same(dx_staged, dx_host));
      CHECK(same(dx_device, dx_host));
      CHECK(same(dx_streams, dx_host));
    }
  }
}

TEST_CASE("Runtime::backward refuses bad input on every rank, and the next one works") {
  Config config;
  config.set("runtime", "ranks", std::int64_t{3});
  config.set("runtime", "timeout_s", 60.0);
  config.set("model", "num_experts", std::int64_t{E});
  config.set("model", "hidden", std::int64_t{H});
  config.set("model", "ffn_hidden", std::int64_t{F});
  Runtime runtime(config);
  const HostTensor x = synthetic_tokens(T, H, 1);
  HostTensor dy = synthetic_tokens(T, H, 2);
  HostTensor y(DType::kF32, {T, H}), dx(DType::kF32, {T, H});
  ModelGradients gradients;
  runtime.forward(x.view(), y.view());
  dy.data<float>()[4 * H + 2] = std::nanf("");  // rank 1's (rows 3..4) token 1
  CHECK_THROWS_WITH_AS(runtime.backward(x.view(), dy.view(), dx.view(), gradients),
                       doctest::Contains("rank 1 (input rows 3..4): dy: token 1 feature 2 is NaN"),
                       Error);
  dy.data<float>()[4 * H + 2] = 0.5f;
  const HostTensor shorter = synthetic_tokens(T - 1, H, 1);
  HostTensor short_dy(DType::kF32, {T - 1, H}), short_dx(DType::kF32, {T - 1, H});
  CHECK_THROWS_WITH_AS(
      runtime.backward(shorter.view(), short_dy.view(), short_dx.view(), gradients),
      doctest::Contains("backward follows a forward on the same x"), Error);
  runtime.backward(x.view(), dy.view(), dx.view(), gradients);
  CHECK(gradients.gate.numel() == E * H);
}

TEST_CASE("Runtime::parameters: writes reach the next forward; save_model writes them back") {
  Config config;
  config.set("runtime", "ranks", std::int64_t{2});
  config.set("runtime", "ep_size", std::int64_t{2});
  config.set("router", "top_k", std::int64_t{K});
  config.set("model", "num_experts", std::int64_t{E});
  config.set("model", "hidden", std::int64_t{H});
  config.set("model", "ffn_hidden", std::int64_t{F});
  config.set("model", "format", std::string("deepseek"));
  config.set("model", "prefix", std::string("layers.0.mlp."));
  Runtime runtime(config);
  const HostTensor x = synthetic_tokens(T, H, 3);
  HostTensor y(DType::kF32, {T, H});
  ModelParameters p = runtime.parameters();
  REQUIRE(p.experts.size() == static_cast<std::size_t>(E));
  for (const auto& expert : p.experts) {  // both ranks are here: every expert is held
    for (const auto& w : expert) REQUIRE(w.data() != nullptr);
  }
  // Gate and up projections of every expert zeroed: silu(0)·0 = 0, so y must be exactly 0
  // whatever the routing (the layers and kernels read the written tensors).
  for (const auto& expert : p.experts) {
    for (int which = 0; which < 2; ++which) {
      const TensorView& w = expert[static_cast<std::size_t>(which)];
      std::fill_n(w.data_as<float>(), w.numel(), 0.0f);
    }
  }
  runtime.forward(x.view(), y.view());
  for (std::int64_t i = 0; i < y.numel(); ++i) REQUIRE(y.data<float>()[i] == 0.0f);

  // The checkpoint holds exactly what was written, under the configured names.
  p.gate.data_as<float>()[3] = 0.25f;
  p.experts[2][2].data_as<float>()[1] = -3.5f;
  const test::TempDir dir;
  const auto path = dir / "parameters.safetensors";
  runtime.save_model(path);
  const ModelWeights saved = ModelWeights::load(path, CheckpointFormat::kDeepseek, "layers.0.mlp.");
  CHECK(saved.gate().data<float>()[3] == 0.25f);
  const auto saved_experts = saved.experts(0, E);
  CHECK(saved_experts[2].down.data_as<float>()[1] == -3.5f);
  CHECK(saved_experts[1].gate.data_as<float>()[0] == 0.0f);
  for (int e = 0; e < E; ++e) {
    const TensorView* mine = p.experts[static_cast<std::size_t>(e)].data();
    const TensorView theirs[3] = {saved_experts[static_cast<std::size_t>(e)].gate,
                                  saved_experts[static_cast<std::size_t>(e)].up,
                                  saved_experts[static_cast<std::size_t>(e)].down};
    for (int w = 0; w < 3; ++w) {
      CHECK(std::memcmp(mine[w].data(), theirs[w].data(),
                        static_cast<std::size_t>(mine[w].numel()) * sizeof(float)) == 0);
    }
  }

  Config bf16 = config;
  bf16.set("model", "dtype", std::string("bf16"));
  Runtime narrow(bf16);
  CHECK_THROWS_WITH_AS(narrow.parameters(), doctest::Contains("training updates f32 weights"),
                       Error);
}

TEST_CASE("backward from the kept forward and from recomputation: the same bits") {
  // Kept: training mode, recompute off (the forward runs unchunked and keeps its rows);
  // recomputed: recompute on. With bf16 rows, 3 chunks and EP groups of 2 in a world of 4.
  struct Run {
    HostTensor y{DType::kF32, {T, H}}, dx{DType::kF32, {T, H}};
    ModelGradients gradients;
  };
  auto run = [](bool recompute) {
    Config config;
    config.set("runtime", "ranks", std::int64_t{4});
    config.set("runtime", "ep_size", std::int64_t{2});
    config.set("runtime", "chunks", std::int64_t{3});
    config.set("runtime", "payload_dtype", std::string("bf16"));
    config.set("runtime", "recompute", recompute);
    config.set("router", "top_k", std::int64_t{K});
    config.set("router", "aux_loss_coeff", 0.1);
    config.set("model", "num_experts", std::int64_t{E});
    config.set("model", "hidden", std::int64_t{H});
    config.set("model", "ffn_hidden", std::int64_t{F});
    Runtime runtime(config);
    runtime.set_training(true);
    const HostTensor x = synthetic_tokens(T, H, 8);
    const HostTensor dy = synthetic_tokens(T, H, 9);
    Run r;
    for (int step = 0; step < 2; ++step) {  // the second step reuses every buffer
      runtime.forward(x.view(), r.y.view());
      for (int local = 0; local < 4; ++local)
        REQUIRE(runtime.layer(local).kept_for_backward() == !recompute);
      runtime.backward(x.view(), dy.view(), r.dx.view(), r.gradients);
    }
    return r;
  };
  const Run kept = run(false), recomputed = run(true);
  auto same = [](const HostTensor& a, const HostTensor& b) {
    return a.size_bytes() == b.size_bytes() &&
           std::memcmp(a.bytes(), b.bytes(), a.size_bytes()) == 0;
  };
  CHECK(same(kept.y, recomputed.y));
  CHECK(same(kept.dx, recomputed.dx));
  CHECK(same(kept.gradients.gate, recomputed.gradients.gate));
  for (int e = 0; e < E; ++e) {
    for (int w = 0; w < 3; ++w) {
      CHECK(same(
          kept.gradients.experts[static_cast<std::size_t>(e)][static_cast<std::size_t>(w)],
          recomputed.gradients.experts[static_cast<std::size_t>(e)][static_cast<std::size_t>(w)]));
    }
  }
  double largest = 0;
  for (std::int64_t i = 0; i < kept.dx.numel(); ++i)
    largest = std::max(largest, double{std::fabs(kept.dx.data<float>()[i])});
  CHECK(largest > 0);  // not all zero
}

TEST_CASE("layer backward follows a forward that routed: not a given plan, not after route()") {
  Config config;
  config.set("router", "top_k", std::int64_t{K});
  config.set("model", "num_experts", std::int64_t{E});
  config.set("model", "hidden", std::int64_t{H});
  config.set("model", "ffn_hidden", std::int64_t{F});
  Runtime runtime(config);
  MoELayer& layer = runtime.layer(0);
  const HostTensor x = synthetic_tokens(T, H, 1);
  const HostTensor dy = synthetic_tokens(T, H, 2);
  HostTensor y(DType::kF32, {T, H}), dx(DType::kF32, {T, H}), d_gate(DType::kF32, {E, H});
  const ExpertGradientStorage d_experts(E, H, F);
  LayerGradients out;
  out.dx = dx.view();
  out.d_experts = d_experts.views();
  out.d_gate = d_gate.view();
  CHECK_FALSE(layer.backward_ready());  // no forward yet
  layer.forward(x.view(), y.view());
  REQUIRE(layer.backward_ready());
  RoutingPlan plan = layer.last_plan();
  layer.forward(x.view(), plan, y.view());  // the same routing, given
  CHECK_THROWS_WITH_AS(layer.backward(x.view(), dy.view(), out),
                       doctest::Contains("had a given plan"), Error);
  layer.forward(x.view(), y.view());
  RoutingPlan other;
  layer.route(synthetic_tokens(3, H, 4).view(), other);  // the logits are another routing's
  CHECK_THROWS_WITH_AS(layer.backward(x.view(), dy.view(), out),
                       doctest::Contains("route() ran since"), Error);
  layer.forward(x.view(), y.view());
  CHECK_NOTHROW(layer.backward(x.view(), dy.view(), out));
}
