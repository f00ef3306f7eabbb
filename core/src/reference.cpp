#include "switchyard/reference.hpp"

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
  // The experts widened to f32 once (the checkpoint may hold bf16 or f16).
  std::vector<std::vector<float>> widened(experts.size() * 3);
  for (std::size_t e = 0; e < experts.size(); ++e) {
    const TensorView* parts[3] = {&experts[e].gate, &experts[e].up, &experts[e].down};
    for (int p = 0; p < 3; ++p) {
      auto& dst = widened[e * 3 + static_cast<std::size_t>(p)];
      dst.resize(static_cast<std::size_t>(parts[p]->numel()));
      widen_to_f32(parts[p]->data(), parts[p]->dtype(), dst.size(), dst.data());
    }
  }
  std::vector<double> hidden(static_cast<std::size_t>(F));
  std::vector<double> acc(static_cast<std::size_t>(H));
  const float* xs = x.data_as<const float>();
  float* ys = y.data_as<float>();
  for (std::int64_t t = 0; t < T; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0);
    const float* row = xs + t * H;
    for (int j = 0; j < K; ++j) {
      const auto slot = static_cast<std::size_t>(t * K + j);
      const int e = plan.experts[slot];
      if (e < 0) continue;
      const double w = plan.weights[slot];
      const float* gate = widened[static_cast<std::size_t>(e) * 3].data();
      const float* up = widened[static_cast<std::size_t>(e) * 3 + 1].data();
      const float* down = widened[static_cast<std::size_t>(e) * 3 + 2].data();
      for (std::int64_t f = 0; f < F; ++f) {
        double g = 0, u = 0;
        for (std::int64_t h = 0; h < H; ++h) {
          g += static_cast<double>(gate[f * H + h]) * row[h];
          u += static_cast<double>(up[f * H + h]) * row[h];
        }
        hidden[static_cast<std::size_t>(f)] = g / (1.0 + std::exp(-g)) * u;  // silu(g) * u
      }
      for (std::int64_t h = 0; h < H; ++h) {
        double d = 0;
        for (std::int64_t f = 0; f < F; ++f)
          d += static_cast<double>(down[h * F + f]) * hidden[static_cast<std::size_t>(f)];
        acc[static_cast<std::size_t>(h)] += w * d;
      }
    }
    for (std::int64_t h = 0; h < H; ++h)
      ys[t * H + h] = static_cast<float>(acc[static_cast<std::size_t>(h)]);
  }
}

}  // namespace switchyard
