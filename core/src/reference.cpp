#include "switchyard/reference.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

#include "switchyard/status.hpp"

namespace switchyard {

void dense_moe_reference(const ModelWeights& model, const RoutingPlan& plan, const TensorView& x,
                         const TensorView& y) {
  const std::int64_t H = model.hidden(), F = model.ffn_hidden(), T = plan.num_tokens;
  const int K = plan.slots;
  x.require("reference x", DType::kF32, {T, H});
  y.require("reference y", DType::kF32, {T, H});
  const auto experts = model.experts(0, model.num_experts());
  // The experts widened to f32 once (the checkpoint may hold bf16, f16 or block-scaled FP8).
  std::vector<std::vector<float>> widened(experts.size() * 3);
  for (std::size_t e = 0; e < experts.size(); ++e) {
    const TensorView* parts[3] = {&experts[e].gate, &experts[e].up, &experts[e].down};
    const TensorView* scales[3] = {&experts[e].gate_scale, &experts[e].up_scale,
                                   &experts[e].down_scale};
    for (int p = 0; p < 3; ++p) {
      auto& dst = widened[e * 3 + static_cast<std::size_t>(p)];
      dst.resize(static_cast<std::size_t>(parts[p]->numel()));
      widen_expert_weight(*parts[p], *scales[p], dst.data());
    }
  }
  // The shared expert, widened likewise, when the layer has one.
  const std::int64_t Fs = model.shared_ffn_hidden();
  std::vector<std::vector<float>> shared(model.has_shared_expert() ? 3 : 0);
  std::vector<float> shared_gate;
  if (model.has_shared_expert()) {
    const SharedExpertWeights s = model.shared_expert();
    const TensorView* parts[3] = {&s.weights.gate, &s.weights.up, &s.weights.down};
    const TensorView* scales[3] = {&s.weights.gate_scale, &s.weights.up_scale,
                                   &s.weights.down_scale};
    for (std::size_t p = 0; p < 3; ++p) {
      shared[p].resize(static_cast<std::size_t>(parts[p]->numel()));
      widen_expert_weight(*parts[p], *scales[p], shared[p].data());
    }
    if (s.gate.data() != nullptr) {
      shared_gate.assign(s.gate.data_as<const float>(), s.gate.data_as<const float>() + H);
    }
  }
  std::vector<double> hidden(static_cast<std::size_t>(std::max(F, Fs)));
  std::vector<double> acc(static_cast<std::size_t>(H));
  // acc += w · down(silu(gate·row) ⊙ up·row) for an expert of inner width `width`.
  auto add_expert = [&](const float* gate, const float* up, const float* down, std::int64_t width,
                        const float* row, double w) {
    for (std::int64_t f = 0; f < width; ++f) {
      double g = 0, u = 0;
      for (std::int64_t h = 0; h < H; ++h) {
        g += static_cast<double>(gate[f * H + h]) * row[h];
        u += static_cast<double>(up[f * H + h]) * row[h];
      }
      hidden[static_cast<std::size_t>(f)] = g / (1.0 + std::exp(-g)) * u;  // silu(g) * u
    }
    for (std::int64_t h = 0; h < H; ++h) {
      double d = 0;
      for (std::int64_t f = 0; f < width; ++f)
        d += static_cast<double>(down[h * width + f]) * hidden[static_cast<std::size_t>(f)];
      acc[static_cast<std::size_t>(h)] += w * d;
    }
  };
  const float* xs = x.data_as<const float>();
  float* ys = y.data_as<float>();
  for (std::int64_t t = 0; t < T; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0);
    const float* row = xs + t * H;
    for (int j = 0; j < K; ++j) {
      const auto slot = static_cast<std::size_t>(t * K + j);
      const int e = plan.experts[slot];
      if (e < 0) continue;
      const auto first = static_cast<std::size_t>(e) * 3;
      add_expert(widened[first].data(), widened[first + 1].data(), widened[first + 2].data(), F,
                 row, plan.weights[slot]);
    }
    if (!shared.empty()) {
      double scale = 1;
      if (!shared_gate.empty()) {
        double logit = 0;
        for (std::int64_t h = 0; h < H; ++h) logit += static_cast<double>(shared_gate[h]) * row[h];
        scale = 1 / (1 + std::exp(-logit));
      }
      add_expert(shared[0].data(), shared[1].data(), shared[2].data(), Fs, row, scale);
    }
    for (std::int64_t h = 0; h < H; ++h)
      ys[t * H + h] = static_cast<float>(acc[static_cast<std::size_t>(h)]);
  }
}

}  // namespace switchyard
