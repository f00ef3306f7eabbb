// router_expert_choice: the `expert_choice` policy of docs/routing.md (Zhou et al. 2022): each
// expert takes the C = ceil(T · capacity_factor / E) tokens with the largest softmax
// probability p[t,e] (ties: lower token index). K = E slots: row t lists the experts that
// took token t in ascending order, padded with -1; weights are p[t,e]. A token may get no
// expert. Statistics as docs/routing.md defines them (the aux loss of the plain top-k of p).
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "switchyard/plugin.hpp"
#include "switchyard/token_choice_router.hpp"

namespace switchyard::expert_choice {
namespace {

void declare_options(ConfigSchema& s) {
  using T = ConfigType;
  s.add("top_k", T::kInt, ConfigValue{std::int64_t{2}},
        "k: the default capacity factor, and the k of the aux loss's plain top-k");
  s.add("capacity_factor", T::kFloat, std::nullopt,
        "C = ceil(T · capacity_factor / E) tokens per expert; default top_k", checks::positive());
  s.add("nan_policy", T::kString, ConfigValue{std::string("error")},
        "NaN or Inf logits: error, or mask (that expert never takes that token)",
        checks::one_of({"error", "mask"}));
}

class ExpertChoiceRouter final : public Router {
 public:
  explicit ExpertChoiceRouter(const RouterCreateArgs& args) : num_experts_(args.num_experts) {
    const ConfigSection& o = *args.options;
    top_k_ = checked_top_k(o, num_experts_);
    capacity_factor_ = o.has("capacity_factor") ? o.get_float("capacity_factor") : top_k_;
    if (!(capacity_factor_ > 0) || !std::isfinite(capacity_factor_)) {
      o.fail("capacity_factor", "must be a finite number > 0");
    }
    mask_non_finite_ = o.get_string("nan_policy") == "mask";
    const auto E = static_cast<std::size_t>(num_experts_);
    stats_.counts.assign(E, 0);
    stats_.probability_sums.assign(E, 0.0);
    stats_.aux_counts.assign(E, 0);
    stats_.top_k = top_k_;
    taken_.assign(E, 0);
  }

  std::string name() const override { return "expert_choice"; }
  int num_experts() const noexcept override { return num_experts_; }
  int slots_per_token() const noexcept override { return num_experts_; }
  const RouterStats& stats() const noexcept override { return stats_; }
  std::span<const float> bias() const noexcept override { return {}; }
  void update(std::span<const std::int64_t> /*global_counts*/) override {}

  // Host-synchronous: done when it returns.
  void route(const RouteInput& input, RoutingPlan& plan, Stream& /*stream*/) override {
    input.logits.require("router expert_choice logits", DType::kF32, {-1, num_experts_});
    const std::int64_t T = input.logits.dim(0);
    const int E = num_experts_;
    const float* z = input.logits.data_as<const float>();
    if (!mask_non_finite_) require_finite_logits(z, T, E, policy_name_);
    const auto TE = static_cast<std::size_t>(T * E);
    probabilities_.resize(TE);
    std::fill(stats_.probability_sums.begin(), stats_.probability_sums.end(), 0.0);
    std::fill(stats_.aux_counts.begin(), stats_.aux_counts.end(), 0);
    double z_loss = 0;
    for (std::int64_t t = 0; t < T; ++t)
      z_loss += token_scores(z + t * E, &probabilities_[static_cast<std::size_t>(t * E)]);

    // Each expert takes its C best tokens.
    const std::int64_t C = std::min<std::int64_t>(
        T, static_cast<std::int64_t>(std::ceil(static_cast<double>(T) * capacity_factor_ / E)));
    plan.num_tokens = T;
    plan.slots = E;
    plan.experts.assign(TE, -1);
    plan.weights.assign(TE, 0.0f);
    plan.counts.assign(static_cast<std::size_t>(E), 0);
    order_.resize(static_cast<std::size_t>(T));
    for (int e = 0; e < E; ++e) {
      std::iota(order_.begin(), order_.end(), std::int64_t{0});
      auto better = [&](std::int64_t a, std::int64_t b) {
        const float pa = probabilities_[static_cast<std::size_t>(a * E + e)];
        const float pb = probabilities_[static_cast<std::size_t>(b * E + e)];
        return pa != pb ? pa > pb : a < b;
      };
      std::partial_sort(order_.begin(), order_.begin() + C, order_.end(), better);
      for (std::int64_t n = 0; n < C; ++n) {
        const std::int64_t t = order_[static_cast<std::size_t>(n)];
        const auto at = static_cast<std::size_t>(t * E + e);
        if (!std::isfinite(z[at])) continue;  // masked: never taken
        // Slot e of row t for now; rows are compacted below (ascending expert order).
        plan.experts[at] = e;
        plan.weights[at] = probabilities_[at];
        ++plan.counts[static_cast<std::size_t>(e)];
      }
    }
    for (std::int64_t t = 0; t < T; ++t) {
      std::int32_t* ex = &plan.experts[static_cast<std::size_t>(t * E)];
      float* w = &plan.weights[static_cast<std::size_t>(t * E)];
      int next = 0;
      for (int e = 0; e < E; ++e) {
        if (ex[e] < 0) continue;
        ex[next] = ex[e];
        w[next] = w[e];
        if (next != e) {
          ex[e] = -1;
          w[e] = 0.0f;
        }
        ++next;
      }
    }
    finish_stats(plan, T, z_loss);
  }

 private:
  /// p[t,:] = softmax over the token's finite logits (masked ones 0); accumulates the aux
  /// sums; returns logsumexp² for the z-loss.
  double token_scores(const float* row, float* p) {
    const int E = num_experts_;
    float max_logit = -std::numeric_limits<float>::infinity();
    for (int e = 0; e < E; ++e) {
      if (std::isfinite(row[e])) max_logit = std::max(max_logit, row[e]);
    }
    if (!std::isfinite(max_logit)) {
      std::fill(p, p + E, 0.0f);
      return 0.0;
    }
    float sum = 0;
    double sum_d = 0;
    for (int e = 0; e < E; ++e) {
      p[e] = std::isfinite(row[e]) ? std::exp(row[e] - max_logit) : 0.0f;
      sum += p[e];
      if (std::isfinite(row[e])) sum_d += std::exp(static_cast<double>(row[e]) - max_logit);
    }
    for (int e = 0; e < E; ++e) {
      p[e] /= sum;
      stats_.probability_sums[static_cast<std::size_t>(e)] += p[e];
    }
    // The plain top-k of p for the aux loss (ties: lower expert index).
    std::fill(taken_.begin(), taken_.end(), 0);
    for (int j = 0; j < top_k_; ++j) {
      int best = -1;
      for (int e = 0; e < E; ++e) {
        if (!std::isfinite(row[e]) || taken_[static_cast<std::size_t>(e)]) continue;
        if (best < 0 || p[e] > p[best]) best = e;
      }
      if (best < 0) break;
      ++stats_.aux_counts[static_cast<std::size_t>(best)];
      taken_[static_cast<std::size_t>(best)] = 1;
    }
    const double lse = max_logit + std::log(sum_d);
    return lse * lse;
  }

  void finish_stats(const RoutingPlan& plan, std::int64_t T, double z_loss) {
    std::copy(plan.counts.begin(), plan.counts.end(), stats_.counts.begin());
    stats_.dropped = 0;
    stats_.tokens = T;
    stats_.z_loss_sum = z_loss;
    finish_router_stats(stats_);
  }

  const std::string policy_name_ = "expert_choice";
  int num_experts_;
  int top_k_ = 1;
  double capacity_factor_ = 1;
  bool mask_non_finite_ = false;
  std::vector<float> probabilities_;  // [T,E]
  std::vector<std::int64_t> order_;   // [T] token order for one expert
  std::vector<char> taken_;           // [E] in this token's plain top-k
  RouterStats stats_;
};

std::unique_ptr<Router> create(const RouterCreateArgs& args) {
  return std::make_unique<ExpertChoiceRouter>(args);
}

}  // namespace
}  // namespace switchyard::expert_choice

SWITCHYARD_ROUTER_PLUGIN("expert_choice", "0.1.0",
                         "each expert takes its C best tokens by softmax probability",
                         ::switchyard::expert_choice::declare_options,
                         ::switchyard::expert_choice::create)
