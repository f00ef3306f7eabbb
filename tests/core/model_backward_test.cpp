// Runtime::backward_model through a model of three MoE layers (with and without a gated
// shared expert per layer) on in-process worlds 1-4
// (EP groups of the world and of half of it) against central finite differences of the
// float64 chain written here: each layer a dense softmax top-2 MoE with the routing the
// forward chose held, its router losses over each EP group added, the output of layer l
// the input of layer l+1 (or, with `[model] residual`, h + MoE(h) the next one's). Checks dx
// and every layer's gate and expert gradients.
#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "switchyard/io.hpp"
#include "switchyard/runtime.hpp"
#include "test_support.hpp"

using namespace switchyard;

namespace {

constexpr std::int64_t T = 7, H = 5, F = 4, Fs = 3;
constexpr int E = 4, K = 2, L = 3;
constexpr double kAuxCoeff = 0.2, kZCoeff = 0.05;
constexpr float kWeightScale = 2.5F;

/// One layer's parameters in double: gate [E,H], per expert gate, up [F,H] and down [H,F],
/// and, when it has one, its gated shared expert (gate, up [Fs,H], down [H,Fs], gate [1,H]).
struct LayerParameters {
  std::vector<double> gate;
  std::vector<std::vector<double>> w1, w3, w2;
  std::vector<double> s1, s3, s2, shared_gate;  // empty: no shared expert
};

/// What the forward decided for one layer: the experts [T,K] per token, and per EP group
/// its plain top-k counts [E] (the aux loss's constants).
struct LayerDecisions {
  std::vector<int> experts;
  std::vector<std::vector<std::int64_t>> group_counts;
};

std::vector<double> widen(const TensorView& t) {
  return {t.data_as<const float>(), t.data_as<const float>() + t.numel()};
}

double silu(double a) { return a / (1 + std::exp(-a)); }

/// y [T,H] of one layer over x [T,H]; adds the layer's router losses to `losses`.
std::vector<double> dense_layer(const LayerParameters& p, const LayerDecisions& d,
                                const std::vector<double>& x,
                                const std::vector<int>& group_of_token, double& losses) {
  std::vector<double> y(static_cast<std::size_t>(T * H), 0.0);
  const int groups = static_cast<int>(d.group_counts.size());
  std::vector<double> aux(static_cast<std::size_t>(groups), 0.0), zl(aux), tokens(aux);
  for (std::int64_t t = 0; t < T; ++t) {
    const double* row = x.data() + t * H;
    double z[E], top = -1e300, sum = 0;
    for (int e = 0; e < E; ++e) {
      z[e] = 0;
      for (std::int64_t h = 0; h < H; ++h)
        z[e] += row[h] * p.gate[static_cast<std::size_t>(e * H + h)];
      top = std::max(top, z[e]);
    }
    for (int e = 0; e < E; ++e) sum += std::exp(z[e] - top);
    const auto g = static_cast<std::size_t>(group_of_token[static_cast<std::size_t>(t)]);
    for (int e = 0; e < E; ++e) {
      aux[g] += std::exp(z[e] - top) / sum *
                static_cast<double>(d.group_counts[g][static_cast<std::size_t>(e)]);
    }
    const double lse = top + std::log(sum);
    zl[g] += lse * lse;
    tokens[g] += 1;
    for (int j = 0; j < K; ++j) {
      const int e = d.experts[static_cast<std::size_t>(t * K + j)];
      const auto ue = static_cast<std::size_t>(e);
      const double weight = std::exp(z[e] - top) / sum;
      double act[F];
      for (std::int64_t f = 0; f < F; ++f) {
        double a = 0, b = 0;
        for (std::int64_t h = 0; h < H; ++h) {
          a += p.w1[ue][static_cast<std::size_t>(f * H + h)] * row[h];
          b += p.w3[ue][static_cast<std::size_t>(f * H + h)] * row[h];
        }
        act[f] = silu(a) * b;
      }
      for (std::int64_t h = 0; h < H; ++h) {
        double out = 0;
        for (std::int64_t f = 0; f < F; ++f)
          out += p.w2[ue][static_cast<std::size_t>(h * F + f)] * act[f];
        y[static_cast<std::size_t>(t * H + h)] += weight * out;
      }
    }
  }
  if (!p.s1.empty()) {  // + sigmoid(x·g) ⊙ shared(x), Qwen2-MoE's shared expert
    for (std::int64_t t = 0; t < T; ++t) {
      const double* row = x.data() + t * H;
      double logit = 0;
      for (std::int64_t h = 0; h < H; ++h)
        logit += row[h] * p.shared_gate[static_cast<std::size_t>(h)];
      const double scale = 1 / (1 + std::exp(-logit));
      double act[Fs];
      for (std::int64_t f = 0; f < Fs; ++f) {
        double a = 0, b = 0;
        for (std::int64_t h = 0; h < H; ++h) {
          a += p.s1[static_cast<std::size_t>(f * H + h)] * row[h];
          b += p.s3[static_cast<std::size_t>(f * H + h)] * row[h];
        }
        act[f] = silu(a) * b;
      }
      for (std::int64_t h = 0; h < H; ++h) {
        double out = 0;
        for (std::int64_t f = 0; f < Fs; ++f)
          out += p.s2[static_cast<std::size_t>(h * Fs + f)] * act[f];
        y[static_cast<std::size_t>(t * H + h)] += scale * out;
      }
    }
  }
  for (std::size_t g = 0; g < aux.size(); ++g) {
    if (tokens[g] == 0) continue;
    losses += kAuxCoeff * aux[g] * E / (K * tokens[g] * tokens[g]) + kZCoeff * zl[g] / tokens[g];
  }
  return y;
}

/// `f` throws Error(kInvalidArgument) whose message contains `words`.
void expect_refusal(const std::string& words, const std::function<void()>& f) {
  const Error error = test::error_of(f);
  CHECK(error.code() == ErrorCode::kInvalidArgument);
  CHECK_MESSAGE(error.message().find(words) != std::string::npos, error.message());
}

/// The random model of `seed` (layer l drawn from seed + l) with a gated shared expert per
/// layer, as a checkpoint in Qwen2-MoE naming ("model.layers.{l}.mlp.").
std::filesystem::path write_shared_expert_model(const std::filesystem::path& dir,
                                                std::uint64_t seed) {
  std::map<std::string, HostTensor> tensors;
  for (int l = 0; l < L; ++l) {
    const std::string prefix = "model.layers." + std::to_string(l) + ".mlp.";
    const ModelWeights routed = ModelWeights::random(E, H, F, seed + static_cast<std::uint64_t>(l));
    const ModelWeights shared =
        ModelWeights::random(1, H, Fs, seed + 100 + static_cast<std::uint64_t>(l));
    auto copy = [](const TensorView& v) {
      HostTensor t(DType::kF32, {v.dim(0), v.dim(1)});
      std::copy_n(v.data_as<const float>(), v.numel(), t.data<float>());
      return t;
    };
    tensors.emplace(prefix + "gate.weight", routed.gate());
    for (int e = 0; e < E; ++e) {
      const SwigluExpertWeights w = routed.experts(e, 1)[0];
      const TensorView parts[3] = {w.gate, w.up, w.down};
      for (int which = 0; which < 3; ++which)
        tensors.emplace(expert_tensor_name(CheckpointFormat::kDeepseek, prefix, e, which),
                        copy(parts[which]));
    }
    const SwigluExpertWeights s = shared.experts(0, 1)[0];
    tensors.emplace(prefix + "shared_expert.gate_proj.weight", copy(s.gate));
    tensors.emplace(prefix + "shared_expert.up_proj.weight", copy(s.up));
    tensors.emplace(prefix + "shared_expert.down_proj.weight", copy(s.down));
    tensors.emplace(prefix + "shared_expert_gate.weight", shared.gate());
  }
  write_safetensors(dir / "shared.safetensors", tensors);
  return dir / "shared.safetensors";
}

}  // namespace

TEST_CASE("backward_model through 3 layers on worlds 1-4 x EP groups: central differences") {
  // `recompute`: the layers keep only their inputs and dispatch them again in the backward;
  // `residual`: each layer's output is h + MoE(h); `shared`: every layer has a gated shared
  // expert (read from a checkpoint).
  test::TempDir dir;
  for (const bool shared : {false, true})
    for (const bool residual : {false, true})
      for (const bool recompute : {false, true})
        for (const int world : {1, 2, 3, 4}) {
          for (const int ep : {world, world / 2}) {
            if (ep < 1 || world % ep != 0 || (ep == world / 2 && world == 1)) continue;
            CAPTURE(shared);
            CAPTURE(residual);
            CAPTURE(recompute);
            CAPTURE(world);
            CAPTURE(ep);
            Config config;
            config.set("runtime", "ranks", std::int64_t{world});
            config.set("runtime", "ep_size", std::int64_t{ep});
            config.set("runtime", "timeout_s", 60.0);
            config.set("runtime", "recompute", recompute);
            config.set("router", "top_k", std::int64_t{K});
            config.set("router", "aux_loss_coeff", kAuxCoeff);
            config.set("router", "z_loss_coeff", kZCoeff);
            config.set("model", "num_experts", std::int64_t{E});
            config.set("model", "hidden", std::int64_t{H});
            config.set("model", "ffn_hidden", std::int64_t{F});
            config.set("model", "seed", std::int64_t{world * 10 + ep});
            config.set("model", "layers", std::string("0-2"));
            config.set("model", "residual", residual);
            if (shared) {
              if (residual != recompute) continue;  // two of the four combinations suffice
              config.set("model", "format", std::string("deepseek"));
              config.set("model", "prefix", std::string("model.layers.{layer}.mlp."));
              config.set(
                  "model", "weights",
                  write_shared_expert_model(dir.path(), static_cast<std::uint64_t>(world * 10 + ep))
                      .string());
            }
            Runtime runtime(config);
            REQUIRE(runtime.num_layers() == L);
            // Random weights shrink the activations about 100-fold per layer (no residual here);
            // larger weights keep every layer's gradients far from rounding noise.
            for (int l = 0; l < L; ++l) {
              const ModelParameters weights = runtime.parameters(l);
              for (const auto& expert : weights.experts) {
                for (const TensorView& w : expert) {
                  for (std::int64_t i = 0; i < w.numel(); ++i)
                    w.data_as<float>()[i] *= kWeightScale;
                }
              }
              REQUIRE((weights.shared_expert[0].data() != nullptr) == shared);
              for (const TensorView& w : weights.shared_expert) {
                if (w.data() == nullptr) continue;  // no shared expert
                for (std::int64_t i = 0; i < w.numel(); ++i) w.data_as<float>()[i] *= kWeightScale;
              }
            }
            runtime.set_training(true);
            const HostTensor x = synthetic_tokens(T, H, 25);
            const HostTensor dy = synthetic_tokens(T, H, 26);
            HostTensor y(DType::kF32, {T, H}), dx(DType::kF32, {T, H});
            runtime.forward_model(x.view(), y.view());

            std::vector<int> group_of_token(T);
            std::vector<LayerDecisions> decisions(L);
            std::vector<LayerParameters> p(L);
            for (int l = 0; l < L; ++l) {
              auto& d = decisions[static_cast<std::size_t>(l)];
              d.experts.resize(static_cast<std::size_t>(T * K));
              d.group_counts.assign(static_cast<std::size_t>(world / ep),
                                    std::vector<std::int64_t>(E, 0));
              for (int r = 0; r < world; ++r) {
                const auto [first, count] = token_block(T, world, r);
                const RoutingPlan& plan = runtime.layer(r, l).last_plan();
                REQUIRE(plan.num_tokens == count);
                for (std::int64_t i = 0; i < count * K; ++i)
                  d.experts[static_cast<std::size_t>(first * K + i)] =
                      plan.experts[static_cast<std::size_t>(i)];
                for (std::int64_t t = first; t < first + count; ++t)
                  group_of_token[static_cast<std::size_t>(t)] = r / ep;
                const auto& aux = runtime.layer(r, l).router().stats().aux_counts;
                for (int e = 0; e < E; ++e)
                  d.group_counts[static_cast<std::size_t>(r / ep)][static_cast<std::size_t>(e)] +=
                      aux[static_cast<std::size_t>(e)];
              }
              auto& lp = p[static_cast<std::size_t>(l)];
              lp.gate = widen(runtime.model(l).gate().view());
              for (const auto& w : runtime.model(l).experts(0, E)) {
                lp.w1.push_back(widen(w.gate));
                lp.w3.push_back(widen(w.up));
                lp.w2.push_back(widen(w.down));
              }
              if (shared) {
                const SharedExpertWeights sw = runtime.model(l).shared_expert();
                lp.s1 = widen(sw.weights.gate);
                lp.s3 = widen(sw.weights.up);
                lp.s2 = widen(sw.weights.down);
                lp.shared_gate = widen(sw.gate);
              }
            }
            std::vector<ModelGradients> gradients;
            runtime.backward_model(x.view(), dy.view(), dx.view(), gradients);
            REQUIRE(gradients.size() == static_cast<std::size_t>(L));

            std::vector<double> xs = widen(x.view());
            const std::vector<double> dys = widen(dy.view());
            // The chain in double: y_L, and the loss Σ dy ⊙ y_L + every layer's router losses.
            auto chain = [&](double& losses) {
              std::vector<double> h = xs;
              for (int l = 0; l < L; ++l) {
                std::vector<double> out =
                    dense_layer(p[static_cast<std::size_t>(l)],
                                decisions[static_cast<std::size_t>(l)], h, group_of_token, losses);
                if (residual) {
                  for (std::size_t i = 0; i < out.size(); ++i) out[i] += h[i];
                }
                h = std::move(out);
              }
              return h;
            };
            auto f = [&] {
              double losses = 0;
              const std::vector<double> h = chain(losses);
              for (std::size_t i = 0; i < h.size(); ++i) losses += dys[i] * h[i];
              return losses;
            };
            double unused = 0;
            const std::vector<double> y_chain = chain(unused);
            test::Agreement ay;
            for (std::size_t i = 0; i < y_chain.size(); ++i) ay.add(y.data<float>()[i], y_chain[i]);
            CHECK(ay.relative() <= 1e-5);
            test::Agreement ax;
            for (std::size_t i = 0; i < xs.size(); ++i)
              ax.add(dx.data<float>()[i], test::central_difference(xs, i, f));
            CHECK(ax.relative() <= 1e-4);
            for (int l = 0; l < L; ++l) {
              CAPTURE(l);
              auto& lp = p[static_cast<std::size_t>(l)];
              const ModelGradients& g = gradients[static_cast<std::size_t>(l)];
              test::Agreement agate, aexperts;
              for (std::size_t i = 0; i < lp.gate.size(); ++i)
                agate.add(g.gate.data<float>()[i], test::central_difference(lp.gate, i, f));
              for (std::size_t e = 0; e < static_cast<std::size_t>(E); ++e) {
                std::vector<double>* tensors[3] = {&lp.w1[e], &lp.w3[e], &lp.w2[e]};
                for (std::size_t which = 0; which < 3; ++which) {
                  const HostTensor& got = g.experts[e][which];
                  REQUIRE(got.numel() == static_cast<std::int64_t>(tensors[which]->size()));
                  for (std::size_t i = 0; i < tensors[which]->size(); ++i)
                    aexperts.add(got.data<float>()[i],
                                 test::central_difference(*tensors[which], i, f));
                }
              }
              CHECK(agate.relative() <= 1e-4);
              CHECK(aexperts.relative() <= 1e-4);
              if (!shared) {
                CHECK(g.shared_expert[0].size_bytes() == 0);
                continue;
              }
              test::Agreement ashared, ashared_gate;
              std::vector<double>* tensors[3] = {&lp.s1, &lp.s3, &lp.s2};
              for (std::size_t which = 0; which < 3; ++which) {
                const HostTensor& got = g.shared_expert[which];
                REQUIRE(got.numel() == static_cast<std::int64_t>(tensors[which]->size()));
                for (std::size_t i = 0; i < tensors[which]->size(); ++i)
                  ashared.add(got.data<float>()[i],
                              test::central_difference(*tensors[which], i, f));
              }
              REQUIRE(g.shared_expert_gate.numel() == H);
              for (std::size_t i = 0; i < lp.shared_gate.size(); ++i) {
                ashared_gate.add(g.shared_expert_gate.data<float>()[i],
                                 test::central_difference(lp.shared_gate, i, f));
              }
              CHECK(ashared.relative() <= 1e-4);
              CHECK(ashared_gate.relative() <= 1e-4);
            }
          }
        }
}

TEST_CASE("backward_model needs a forward_model in training mode on the same tokens") {
  Config config;
  config.set("runtime", "ranks", std::int64_t{2});
  config.set("runtime", "timeout_s", 60.0);
  config.set("model", "num_experts", std::int64_t{E});
  config.set("model", "hidden", std::int64_t{H});
  config.set("model", "ffn_hidden", std::int64_t{F});
  config.set("model", "layers", std::string("0,1"));
  Runtime runtime(config);
  const HostTensor x = synthetic_tokens(T, H, 1);
  HostTensor y(DType::kF32, {T, H}), dx(DType::kF32, {T, H});
  std::vector<ModelGradients> gradients;
  // Inference keeps no layer inputs.
  runtime.forward_model(x.view(), y.view());
  expect_refusal("training mode",
                 [&] { runtime.backward_model(x.view(), y.view(), dx.view(), gradients); });
  runtime.set_training(true);
  runtime.forward_model(x.view(), y.view());
  // Another T, or a single layer's forward since, is refused too.
  const HostTensor fewer = synthetic_tokens(T - 1, H, 1);
  HostTensor fewer_dx(DType::kF32, {T - 1, H});
  expect_refusal("the last one had 7", [&] {
    runtime.backward_model(fewer.view(), fewer.view(), fewer_dx.view(), gradients);
  });
  runtime.backward_model(x.view(), y.view(), dx.view(), gradients);
  CHECK(gradients.size() == 2);
  runtime.forward(x.view(), y.view(), 1);
  expect_refusal("training mode",
                 [&] { runtime.backward_model(x.view(), y.view(), dx.view(), gradients); });
}
