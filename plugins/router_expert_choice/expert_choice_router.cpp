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
#include "switchyard/routing_gradient.hpp"
#include "switchyard/routing_rows.hpp"
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
  declare_loss_options(s);
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
    aux_loss_coeff_ = loss_coefficient(o, "aux_loss_coeff");
    z_loss_coeff_ = loss_coefficient(o, "z_loss_coeff");
    const auto E = static_cast<std::size_t>(num_experts_);
    stats_.counts.assign(E, 0);
    stats_.probability_sums.assign(E, 0.0);
    stats_.aux_counts.assign(E, 0);
    stats_.top_k = top_k_;
    tile_.resize(static_cast<std::size_t>(kTileTokens) * E);
    plain_values_.resize(E);
    plain_.resize(static_cast<std::size_t>(top_k_));
    plain_top_.resize(static_cast<std::size_t>(top_k_));
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
    std::fill(stats_.probability_sums.begin(), stats_.probability_sums.end(), 0.0);
    std::fill(stats_.aux_counts.begin(), stats_.aux_counts.end(), 0);
    // p by expert: columns_[e][t] = p[t,e], or -inf where the logit is masked (that expert
    // then takes another token). Rows are computed a tile of tokens at a time and written
    // to the columns a cache line at a time.
    columns_.resize(TE);
    double z_loss = 0;
    for (std::int64_t t0 = 0; t0 < T; t0 += kTileTokens) {
      const std::int64_t rows = std::min<std::int64_t>(kTileTokens, T - t0);
      for (std::int64_t i = 0; i < rows; ++i) {
        z_loss += token_scores(z + (t0 + i) * E, &tile_[static_cast<std::size_t>(i * E)]);
      }
      write_tile_to_columns(z, T, t0, rows);
    }

    // Each expert takes its C best tokens: select in the expert's column of p, where a
    // masked (token, expert) is -inf so that the expert takes another token instead.
    const std::int64_t C = std::min<std::int64_t>(
        T, static_cast<std::int64_t>(std::ceil(static_cast<double>(T) * capacity_factor_ / E)));
    plan.num_tokens = T;
    plan.slots = E;
    plan.experts.resize(TE);  // every row is written in full below
    plan.weights.resize(TE);
    plan.counts.assign(static_cast<std::size_t>(E), 0);
    chosen_.resize(static_cast<std::size_t>(E) * static_cast<std::size_t>(C));
    row_begin_.assign(static_cast<std::size_t>(T) + 1, 0);
    for (int e = 0; e < E; ++e) {
      int* chosen = chosen_.data() + static_cast<std::size_t>(e) * static_cast<std::size_t>(C);
      const int taken =
          select_top_c(columns_.data() + static_cast<std::size_t>(e) * static_cast<std::size_t>(T),
                       static_cast<int>(T), static_cast<int>(C), chosen, top_c_scratch_);
      plan.counts[static_cast<std::size_t>(e)] = taken;
      for (int n = 0; n < taken; ++n) ++row_begin_[static_cast<std::size_t>(chosen[n]) + 1];
    }
    // The (token, expert) pairs grouped by token (a counting sort; experts stay ascending),
    // then every row written once, in order.
    for (std::int64_t t = 0; t < T; ++t)
      row_begin_[static_cast<std::size_t>(t) + 1] += row_begin_[static_cast<std::size_t>(t)];
    by_token_.resize(static_cast<std::size_t>(row_begin_.back()));
    next_slot_.assign(row_begin_.begin(), row_begin_.end() - 1);
    for (int e = 0; e < E; ++e) {
      const int* chosen =
          chosen_.data() + static_cast<std::size_t>(e) * static_cast<std::size_t>(C);
      for (std::int64_t n = 0; n < plan.counts[static_cast<std::size_t>(e)]; ++n)
        by_token_[static_cast<std::size_t>(next_slot_[static_cast<std::size_t>(chosen[n])]++)] = e;
    }
    for (std::int64_t t = 0; t < T; ++t) {
      const auto row = static_cast<std::size_t>(t) * static_cast<std::size_t>(E);
      const std::int64_t begin = row_begin_[static_cast<std::size_t>(t)];
      const std::int64_t end = row_begin_[static_cast<std::size_t>(t) + 1];
      for (std::int64_t j = begin; j < end; ++j) {
        const int e = by_token_[static_cast<std::size_t>(j)];
        plan.experts[row + static_cast<std::size_t>(j - begin)] = e;
        plan.weights[row + static_cast<std::size_t>(j - begin)] =
            columns_[static_cast<std::size_t>(e) * static_cast<std::size_t>(T) +
                     static_cast<std::size_t>(t)];
      }
      std::fill(&plan.experts[row + static_cast<std::size_t>(end - begin)], &plan.experts[row] + E,
                -1);
      std::fill(&plan.weights[row + static_cast<std::size_t>(end - begin)], &plan.weights[row] + E,
                0.0f);
    }
    finish_stats(plan, T, z_loss);
  }

  /// A slot's weight is p[t,e] of softmax(z_t): the gradient through the experts that
  /// took the token, plus the losses' (docs/routing.md).
  void backward(const RouteGradientInput& in, const TensorView& d_logits) override {
    const int E = num_experts_;
    in.logits.require("router expert_choice logits", DType::kF32, {-1, E});
    const std::int64_t T = in.logits.dim(0);
    const RoutingPlan* plan = &require_backward_plan(in, E, "expert_choice");
    in.d_weights.require("router expert_choice backward d_weights", DType::kF32, {T, E});
    d_logits.require("router expert_choice backward d_logits", DType::kF32, {T, E});
    const RouterLossScope scope = router_loss_scope(in, stats_, E, "expert_choice");
    const std::int64_t loss_tokens = scope.tokens;
    const std::span<const std::int64_t> aux_counts = scope.aux_counts;
    const routing_gradient::WeightForm form{routing_gradient::ScoreFunction::kSoftmax, true, false,
                                            1.0};
    gradient_scratch_.resize(3 * static_cast<std::size_t>(E));
    taken_.resize(static_cast<std::size_t>(E));
    taken_gradient_.resize(static_cast<std::size_t>(E));
    for (std::int64_t t = 0; t < T; ++t) {
      const float* row = in.logits.data_as<const float>() + t * E;
      float* dz = d_logits.data_as<float>() + t * E;
      std::fill(dz, dz + E, 0.0f);
      int taken = 0;
      for (int slot = 0; slot < E; ++slot) {
        const std::int32_t e = plan->experts[static_cast<std::size_t>(t * E + slot)];
        if (e < 0) continue;
        taken_[static_cast<std::size_t>(taken)] = e;
        taken_gradient_[static_cast<std::size_t>(taken++)] =
            in.d_weights.data_as<const float>()[t * E + slot];
      }
      routing_gradient::weights_backward(form, row, E, taken_.data(), taken, taken_gradient_.data(),
                                         dz, gradient_scratch_.data());
      routing_gradient::losses_backward(routing_gradient::ScoreFunction::kSoftmax, row, E, top_k_,
                                        loss_tokens, aux_counts, aux_loss_coeff_, z_loss_coeff_, dz,
                                        gradient_scratch_.data());
    }
  }

 private:
  /// columns_[e][t0 + i] = tile_[i][e] for i < rows, or -inf where the logit is masked.
  void write_tile_to_columns(const float* z, std::int64_t T, std::int64_t t0, std::int64_t rows) {
    const int E = num_experts_;
    for (int e = 0; e < E; ++e) {
      float* column = &columns_[static_cast<std::size_t>(e) * static_cast<std::size_t>(T) +
                                static_cast<std::size_t>(t0)];
      for (std::int64_t i = 0; i < rows; ++i)
        column[i] = tile_[static_cast<std::size_t>(i * E + e)];
      if (!mask_non_finite_) continue;
      for (std::int64_t i = 0; i < rows; ++i) {
        if (!std::isfinite(z[(t0 + i) * E + e]))
          column[i] = -std::numeric_limits<float>::infinity();
      }
    }
  }

  /// p[t,:] = softmax over the token's finite logits (masked ones 0); accumulates the aux
  /// sums; returns logsumexp² for the z-loss (0 when every logit is masked).
  double token_scores(const float* row, float* p) {
    const int E = num_experts_;
    const double lse = softmax_row(row, E, p, mask_non_finite_);
    if (std::isinf(lse)) return 0.0;
    accumulate_row(p, E, stats_.probability_sums.data());
    // The plain top-k of p for the aux loss (ties: lower expert index).
    const float* values = p;
    if (mask_non_finite_) {
      for (int e = 0; e < E; ++e) {
        plain_values_[static_cast<std::size_t>(e)] =
            std::isfinite(row[e]) ? p[e] : -std::numeric_limits<float>::infinity();
      }
      values = plain_values_.data();
    }
    const int found = select_top_k(values, E, top_k_, plain_.data(), plain_top_.data());
    for (int j = 0; j < found; ++j)
      ++stats_.aux_counts[static_cast<std::size_t>(plain_[static_cast<std::size_t>(j)])];
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
  double aux_loss_coeff_ = 0;
  double z_loss_coeff_ = 0;
  std::vector<float> gradient_scratch_;            // backward: [3E]
  std::vector<int> taken_;                         // backward: the experts that took a token
  std::vector<float> taken_gradient_;              // backward: their weights' gradients
  static constexpr std::int64_t kTileTokens = 16;  // a cache line of floats per column
  std::vector<float> tile_;                        // [kTileTokens,E] p of a tile of tokens
  std::vector<float> columns_;                     // [E,T] p by expert, -inf where masked
  std::vector<int> chosen_;                        // [E,C] the tokens each expert takes
  std::vector<std::int64_t> row_begin_;            // [T+1] first pair of each token in by_token_
  std::vector<std::int64_t> next_slot_;            // [T] next free entry of each token in by_token_
  std::vector<int> by_token_;                      // the experts of each token, ascending
  TopCScratch top_c_scratch_;
  std::vector<float> plain_values_;  // [E] p with masked experts at -inf
  std::vector<int> plain_;           // [k] this token's plain top-k
  std::vector<float> plain_top_;
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
