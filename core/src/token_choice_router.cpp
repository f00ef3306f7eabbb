// The token-choice routing of docs/routing.md, written once for the policy plugins: softmax,
// sigmoid or √softplus scores, optional selection bias, top-k selection (ties to the lower expert),
// weights, normalisation and scale, the statistics and bias balancing; and the per-expert
// capacity limit that the capacity policy applies after the selection.
#include "switchyard/token_choice_router.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "switchyard/io.hpp"
#include "switchyard/placement.hpp"
#include "switchyard/routing_gradient.hpp"
#include "switchyard/routing_rows.hpp"
#include "switchyard/status.hpp"

namespace switchyard {

using routing_gradient::ScoreFunction;

ScoreFunction score_function(const ConfigSection& o) {
  const std::string& name = o.get_string("score");
  return name == "sigmoid"        ? ScoreFunction::kSigmoid
         : name == "sqrtsoftplus" ? ScoreFunction::kSqrtSoftplus
                                  : ScoreFunction::kSoftmax;
}

float elementwise_scores(ScoreFunction score, const float* z, int n, float* s,
                         bool skip_non_finite) noexcept {
  return score == ScoreFunction::kSigmoid ? sigmoid_row(z, n, s, skip_non_finite)
                                          : sqrt_softplus_row(z, n, s, skip_non_finite);
}

HostTensor read_npy_option(const ConfigSection& o, std::string_view key) {
  try {
    return read_npy(o.get_path(key));
  } catch (const Error& e) {
    o.fail(key, e.message());
  }
}

void declare_loss_options(ConfigSchema& s) {
  s.add("aux_loss_coeff", ConfigType::kFloat, ConfigValue{0.0},
        "backward: weight of the aux (load-balancing) loss in the router's gradient");
  s.add("z_loss_coeff", ConfigType::kFloat, ConfigValue{0.0},
        "backward: weight of the z loss in the router's gradient");
}

double loss_coefficient(const ConfigSection& o, std::string_view key) {
  const double v = o.get_float(key);
  if (!std::isfinite(v) || v < 0) o.fail(key, "must be a finite number >= 0");
  return v;
}

void declare_token_choice_options(ConfigSchema& s) {
  using T = ConfigType;
  s.add("top_k", T::kInt, ConfigValue{std::int64_t{2}}, "experts per token, 1..num_experts");
  s.add("score", T::kString, ConfigValue{std::string("softmax")},
        "score function: softmax, sigmoid, or sqrtsoftplus (DeepSeek-V4: the square root of "
        "softplus; like sigmoid, a bias shifts selection only)",
        checks::one_of({"softmax", "sigmoid", "sqrtsoftplus"}));
  s.add("pre_softmax", T::kBool, ConfigValue{true},
        "softmax: true = softmax over all experts then top-k; false = top-k of logits then "
        "softmax over the k (Mixtral)");
  s.add("normalize", T::kBool, std::nullopt,
        "divide the selected weights by their sum (default: false for softmax, true for "
        "sigmoid and sqrtsoftplus)");
  s.add("scale", T::kFloat, ConfigValue{1.0}, "multiplies the final weights");
  s.add("bias", T::kString, std::nullopt,
        ".npy float32 [E] added to the scores for selection only (default: the checkpoint's "
        "e_score_correction_bias, if any)");
  s.add("bias_update_rate", T::kFloat, ConfigValue{0.0},
        "auxiliary-loss-free balancing: update() moves the bias by this step (0: off)");
  s.add("nan_policy", T::kString, ConfigValue{std::string("error")},
        "NaN or Inf logits: error, or mask (that expert is never selected for that token)",
        checks::one_of({"error", "mask"}));
  declare_loss_options(s);
}

namespace {

class TokenChoiceRouter final : public Router {
 public:
  TokenChoiceRouter(const RouterCreateArgs& args, std::string policy, SelectionLimit limit,
                    std::optional<GroupLimit> groups)
      : policy_(std::move(policy)),
        groups_(groups),
        logits_name_("router " + policy_ + " logits"),
        d_weights_name_("router " + policy_ + " backward d_weights"),
        d_logits_name_("router " + policy_ + " backward d_logits"),
        limit_(std::move(limit)),
        num_experts_(args.num_experts) {
    const ConfigSection& o = *args.options;
    top_k_ = checked_top_k(o, num_experts_);
    if (groups_) {
      if (groups_->num_groups < 0 || groups_->max_groups < 1) {
        throw Error(ErrorCode::kInvalidArgument, "router " + policy_ +
                                                     ": num_groups must be >= 0 and max_groups "
                                                     ">= 1");
      }
      if (groups_->num_groups > 0) {
        const int G = groups_->num_groups;
        if (num_experts_ % G != 0) {
          o.fail("num_groups", "must divide the number of experts " + std::to_string(num_experts_) +
                                   " (got " + std::to_string(G) + ")");
        }
        check_group_sizes(std::vector<int>(static_cast<std::size_t>(G), num_experts_ / G), o);
      }
    }
    score_ = score_function(o);
    elementwise_ = score_ != ScoreFunction::kSoftmax;
    pre_softmax_ = o.get_bool("pre_softmax");
    normalize_ = o.has("normalize") ? o.get_bool("normalize") : elementwise_;
    scale_ = static_cast<float>(o.get_float("scale"));
    if (!std::isfinite(scale_)) o.fail("scale", "must be finite");
    update_rate_ = static_cast<float>(o.get_float("bias_update_rate"));
    if (!(update_rate_ >= 0) || !std::isfinite(update_rate_)) {
      o.fail("bias_update_rate", "must be a finite number >= 0");
    }
    mask_non_finite_ = o.get_string("nan_policy") == "mask";
    aux_loss_coeff_ = loss_coefficient(o, "aux_loss_coeff");
    z_loss_coeff_ = loss_coefficient(o, "z_loss_coeff");
    if (o.has("bias")) {
      const auto path = o.get_path("bias");
      const HostTensor bias = read_npy_option(o, "bias");
      if (bias.dtype() != DType::kF32 || bias.shape().size() != 1 ||
          bias.shape()[0] != num_experts_) {
        o.fail("bias", path.string() + " must be float32 [" + std::to_string(num_experts_) +
                           "] (one entry per expert)");
      }
      bias_.assign(bias.data<float>(), bias.data<float>() + num_experts_);
    } else if (!args.checkpoint_bias.empty()) {
      if (static_cast<int>(args.checkpoint_bias.size()) != num_experts_) {
        throw Error(ErrorCode::kInvalidArgument, "router " + policy_ + ": checkpoint bias has " +
                                                     std::to_string(args.checkpoint_bias.size()) +
                                                     " entries for " +
                                                     std::to_string(num_experts_) + " experts");
      }
      bias_.assign(args.checkpoint_bias.begin(), args.checkpoint_bias.end());
    } else if (update_rate_ > 0) {
      bias_.assign(static_cast<std::size_t>(num_experts_), 0.0f);
    }
    for (std::size_t e = 0; e < bias_.size(); ++e) {
      if (!std::isfinite(bias_[e])) {
        throw Error(ErrorCode::kInvalidArgument, "router " + policy_ + ": bias of expert " +
                                                     std::to_string(e) + " is not finite");
      }
    }
    const auto E = static_cast<std::size_t>(num_experts_);
    probabilities_.resize(E);
    sigmoid_scores_.resize(E);
    selection_.resize(E);
    chosen_.resize(static_cast<std::size_t>(top_k_));
    chosen_values_.resize(static_cast<std::size_t>(top_k_));
    plain_.resize(static_cast<std::size_t>(top_k_));
    stats_.counts.assign(E, 0);
    stats_.probability_sums.assign(E, 0.0);
    stats_.aux_counts.assign(E, 0);
    stats_.top_k = top_k_;
    prob_sum_.assign(E, 0.0);
    plain_counts_.assign(E, 0);
  }

  std::string name() const override { return policy_; }
  int num_experts() const noexcept override { return num_experts_; }
  int slots_per_token() const noexcept override { return top_k_; }
  const RouterStats& stats() const noexcept override { return stats_; }
  std::span<const float> bias() const noexcept override { return bias_; }

  // Host-synchronous: done when it returns.
  void route(const RouteInput& input, RoutingPlan& plan, Stream& /*stream*/) override {
    input.logits.require(logits_name_, DType::kF32, {-1, num_experts_});
    const std::int64_t T = input.logits.dim(0);
    const int E = num_experts_, K = top_k_;
    const float* z = input.logits.data_as<const float>();
    if (!mask_non_finite_) require_finite_logits(z, T, E, policy_);
    plan.num_tokens = T;
    plan.slots = K;
    plan.experts.assign(static_cast<std::size_t>(T * K), -1);
    plan.weights.assign(static_cast<std::size_t>(T * K), 0.0f);
    plan.counts.assign(static_cast<std::size_t>(E), 0);
    std::fill(prob_sum_.begin(), prob_sum_.end(), 0.0);
    std::fill(plain_counts_.begin(), plain_counts_.end(), 0);
    double z_loss = 0;

    constexpr float kNegInf = -std::numeric_limits<float>::infinity();
    const bool mask = mask_non_finite_;
    float* probabilities = probabilities_.data();  // P of the aux loss
    float* selection = selection_.data();
    const bool select_on_scores = selects_on_scores();
    for (std::int64_t t = 0; t < T; ++t) {
      const float* row = z + t * E;
      const Choice choice = choose(row, select_on_scores, input.topology);
      if (choice.picked < 0) continue;  // every expert masked: the token is routed nowhere
      const float* scores = choice.scores;
      const float* values = choice.values;
      const int picked = choice.picked;
      z_loss += choice.lse * choice.lse;

      float* w = &plan.weights[static_cast<std::size_t>(t * K)];
      std::int32_t* ex = &plan.experts[static_cast<std::size_t>(t * K)];
      if (!elementwise_ && !pre_softmax_) {
        // Softmax over the selected logits only (Mixtral).
        float max_logit = -std::numeric_limits<float>::infinity();
        for (int j = 0; j < picked; ++j)
          max_logit = std::max(max_logit, row[chosen_[static_cast<std::size_t>(j)]]);
        float sum = 0;
        for (int j = 0; j < picked; ++j) {
          w[j] = vector_exp(row[chosen_[static_cast<std::size_t>(j)]] - max_logit);
          sum += w[j];
        }
        for (int j = 0; j < picked; ++j) w[j] /= sum;
      } else {
        for (int j = 0; j < picked; ++j)
          w[j] = scores[static_cast<std::size_t>(chosen_[static_cast<std::size_t>(j)])];
      }
      if (normalize_) {
        float sum = 0;
        for (int j = 0; j < picked; ++j) sum += w[j];
        for (int j = 0; j < picked; ++j) w[j] /= (sum + 1e-20f);
      }
      for (int j = 0; j < picked; ++j) {
        w[j] *= scale_;
        ex[j] = chosen_[static_cast<std::size_t>(j)];
        ++plan.counts[static_cast<std::size_t>(ex[j])];
      }

      // The aux loss's sums: P, and the plain top-k of P (no bias, no groups).
      accumulate_row(probabilities, E, prob_sum_.data());
      const int* plain = chosen_.data();
      int plain_found = picked;
      if (values != probabilities) {
        const float* plain_values = probabilities;
        if (mask) {
          for (int e = 0; e < E; ++e)
            selection[e] = std::isfinite(row[e]) ? probabilities[e] : kNegInf;
          plain_values = selection;
        }
        plain_found = select_top_k(plain_values, E, K, plain_.data(), chosen_values_.data());
        plain = plain_.data();
      }
      for (int j = 0; j < plain_found; ++j) ++plain_counts_[static_cast<std::size_t>(plain[j])];
    }
    const std::int64_t dropped = limit_ ? limit_(plan) : 0;
    finish_stats(plan, T, z_loss, dropped);
  }

  bool updates_from_counts() const noexcept override { return update_rate_ > 0; }

  void backward(const RouteGradientInput& in, const TensorView& d_logits) override {
    in.logits.require(logits_name_, DType::kF32, {-1, num_experts_});
    const std::int64_t T = in.logits.dim(0);
    const int E = num_experts_, K = top_k_;
    const RoutingPlan* plan = &require_backward_plan(in, K, policy_);
    in.d_weights.require(d_weights_name_, DType::kF32, {T, K});
    d_logits.require(d_logits_name_, DType::kF32, {T, E});
    const RouterLossScope scope = router_loss_scope(in, stats_, E, policy_);
    const std::int64_t loss_tokens = scope.tokens;
    const std::span<const std::int64_t> aux_counts = scope.aux_counts;
    const routing_gradient::WeightForm form{score_, pre_softmax_, normalize_, scale_};
    gradient_scratch_.resize(static_cast<std::size_t>(E) + 2 * static_cast<std::size_t>(K));
    selected_gradient_.resize(static_cast<std::size_t>(K));
    const float* z = in.logits.data_as<const float>();
    const float* d_weights = in.d_weights.data_as<const float>();
    float* dz_all = d_logits.data_as<float>();
    const bool on_scores = selects_on_scores();
    for (std::int64_t t = 0; t < T; ++t) {
      const float* row = z + t * E;
      float* dz = dz_all + t * E;
      std::fill(dz, dz + E, 0.0f);
      const Choice choice = choose(row, on_scores, in.topology);
      if (choice.picked < 0) continue;
      // Each selected expert's weight gradient: its slot's in the plan, or 0 when capacity
      // dropped it (the selection keeps its share of the normalisation).
      const std::int32_t* experts = plan->experts.data() + t * K;
      int kept = 0;
      for (int j = 0; j < choice.picked; ++j) {
        float g = 0;
        for (int slot = 0; slot < K; ++slot) {
          if (experts[slot] == chosen_[static_cast<std::size_t>(j)]) {
            g = d_weights[t * K + slot];
            ++kept;
          }
        }
        selected_gradient_[static_cast<std::size_t>(j)] = g;
      }
      for (int slot = 0; slot < K; ++slot) kept -= experts[slot] >= 0 ? 1 : 0;
      if (kept != 0) {
        throw Error(ErrorCode::kInvalidArgument,
                    "router " + policy_ +
                        " backward: the plan is not this router's routing of "
                        "these logits (token " +
                        std::to_string(t) + ")");
      }
      routing_gradient::weights_backward(form, row, E, chosen_.data(), choice.picked,
                                         selected_gradient_.data(), dz, gradient_scratch_.data());
      routing_gradient::losses_backward(score_, row, E, K, loss_tokens, aux_counts, aux_loss_coeff_,
                                        z_loss_coeff_, dz, gradient_scratch_.data());
    }
  }

  std::optional<TokenChoiceSpec> token_choice_spec(const Topology* topology) override {
    // The device routings know softmax and sigmoid scores.
    if (limit_ || mask_non_finite_ || score_ == ScoreFunction::kSqrtSoftplus) return std::nullopt;
    TokenChoiceSpec spec;
    spec.policy = policy_;
    spec.top_k = top_k_;
    spec.sigmoid = score_ == ScoreFunction::kSigmoid;
    spec.pre_softmax = pre_softmax_;
    spec.normalize = normalize_;
    spec.scale = scale_;
    spec.bias = bias_;
    if (groups_) {
      assign_groups(topology);
      if (group_begin_.empty()) return std::nullopt;  // groups of scattered experts
      spec.group_begin = group_begin_;
      spec.max_groups = groups_->max_groups;
      spec.group_take = group_take_;
    }
    return spec;
  }

  void adopt_stats(const RouterStats& computed) override {
    std::copy(computed.counts.begin(), computed.counts.end(), stats_.counts.begin());
    stats_.dropped = 0;
    stats_.tokens = computed.tokens;
    std::copy(computed.probability_sums.begin(), computed.probability_sums.end(),
              stats_.probability_sums.begin());
    std::copy(computed.aux_counts.begin(), computed.aux_counts.end(), stats_.aux_counts.begin());
    stats_.z_loss_sum = computed.z_loss_sum;
    finish_router_stats(stats_);
  }

  void update(std::span<const std::int64_t> global_counts) override {
    if (update_rate_ <= 0) return;
    if (static_cast<int>(global_counts.size()) != num_experts_) {
      throw Error(ErrorCode::kInvalidArgument, "router " + policy_ + " update: expected " +
                                                   std::to_string(num_experts_) + " counts, got " +
                                                   std::to_string(global_counts.size()));
    }
    double total = 0;
    for (auto c : global_counts) total += static_cast<double>(c);
    const double mean = total / num_experts_;
    for (int e = 0; e < num_experts_; ++e) {
      const double diff = mean - static_cast<double>(global_counts[static_cast<std::size_t>(e)]);
      const float sign = diff > 0 ? 1.0f : (diff < 0 ? -1.0f : 0.0f);
      bias_[static_cast<std::size_t>(e)] += update_rate_ * sign;
    }
  }

 private:
  /// A token's scores and selection (`choose`).
  struct Choice {
    int picked = -1;                ///< experts selected into chosen_; -1: every one masked
    const float* scores = nullptr;  ///< what the weights come from: P, sigmoid scores or z
    const float* values = nullptr;  ///< what was selected on: the scores or selection_
    double lse = 0;                 ///< the row's logsumexp
  };

  /// The selection values are the scores themselves unless a bias, masking or group
  /// limiting changes them: then they are written to selection_.
  bool selects_on_scores() const noexcept { return bias_.empty() && !mask_non_finite_ && !groups_; }

  /// Scores one token's logits (P of the aux loss into probabilities_) and selects its
  /// top-k into chosen_, in selection order, as `route` and `backward` both need.
  Choice choose(const float* row, bool select_on_scores, const Topology* topology) {
    constexpr float kNegInf = -std::numeric_limits<float>::infinity();
    const int E = num_experts_;
    const bool mask = mask_non_finite_;
    float* probabilities = probabilities_.data();
    Choice c;
    if (elementwise_) {
      c.lse = log_sum_exp_row(row, E, mask);
      if (std::isinf(c.lse)) return c;
      const float sum = elementwise_scores(score_, row, E, sigmoid_scores_.data(), mask);
      c.scores = sigmoid_scores_.data();
      scale_row(c.scores, E, 1.0f / sum, probabilities);  // P = s / Σ s
    } else {
      c.lse = softmax_row(row, E, probabilities, mask);
      if (std::isinf(c.lse)) return c;
      c.scores = pre_softmax_ ? probabilities : row;
    }
    c.values = c.scores;
    if (!select_on_scores) {
      float* selection = selection_.data();
      if (bias_.empty()) {
        std::copy(c.scores, c.scores + E, selection);
      } else {
        add_row(c.scores, bias_.data(), E, selection);
      }
      if (mask) {
        for (int e = 0; e < E; ++e) {
          if (!std::isfinite(row[e])) selection[e] = kNegInf;
        }
      }
      if (groups_) limit_groups(topology);
      c.values = selection;
    }
    c.picked = select_top_k(c.values, E, top_k_, chosen_.data(), chosen_values_.data());
    return c;
  }

  /// Throws unless the M smallest groups hold at least k experts.
  void check_group_sizes(std::vector<int> sizes, const ConfigSection& o) const {
    const int G = static_cast<int>(sizes.size());
    if (groups_->max_groups > G) {
      o.fail("max_groups", "must be in 1.." + std::to_string(G) + " (the number of groups) (got " +
                               std::to_string(groups_->max_groups) + ")");
    }
    std::sort(sizes.begin(), sizes.end());
    int smallest = 0;
    for (int g = 0; g < groups_->max_groups; ++g) smallest += sizes[static_cast<std::size_t>(g)];
    if (smallest < top_k_) {
      o.fail("max_groups", std::to_string(groups_->max_groups) + " groups can hold " +
                               std::to_string(smallest) +
                               " experts, fewer than top_k = " + std::to_string(top_k_));
    }
    if (groups_->score == GroupScore::kTop2Sum && sizes.front() < 2) {
      o.fail("group_score", "top2_sum needs at least 2 experts per group");
    }
  }

  /// The group of every expert: fixed blocks, or the nodes of the placement.
  void assign_groups(const Topology* topology) {
    if (!group_of_.empty() && (groups_->num_groups > 0 || grouped_for_ == topology)) return;
    const int E = num_experts_;
    group_of_.assign(static_cast<std::size_t>(E), 0);
    if (groups_->num_groups > 0) {
      const int per = E / groups_->num_groups;
      for (int e = 0; e < E; ++e) group_of_[static_cast<std::size_t>(e)] = e / per;
      group_sizes_.assign(static_cast<std::size_t>(groups_->num_groups), per);
    } else {
      if (topology == nullptr || topology->num_nodes() < 2) {
        throw Error(ErrorCode::kInvalidArgument,
                    "router " + policy_ +
                        ": the EP group is on one node, so there are no nodes to limit to; set "
                        "router.num_groups (or emulate nodes with runtime.ranks_per_node)");
      }
      const ExpertPlacement placement(E, topology->size());
      group_sizes_.assign(static_cast<std::size_t>(topology->num_nodes()), 0);
      for (int e = 0; e < E; ++e) {
        const int g = topology->node_of(placement.rank_of(e));
        group_of_[static_cast<std::size_t>(e)] = g;
        ++group_sizes_[static_cast<std::size_t>(g)];
      }
      if (groups_->max_groups > topology->num_nodes() || [&] {
            std::vector<int> sorted = group_sizes_;
            std::sort(sorted.begin(), sorted.end());
            int smallest = 0;
            for (int g = 0; g < groups_->max_groups && g < static_cast<int>(sorted.size()); ++g)
              smallest += sorted[static_cast<std::size_t>(g)];
            return smallest < top_k_;
          }()) {
        throw Error(ErrorCode::kInvalidArgument,
                    "router " + policy_ + ": max_groups = " + std::to_string(groups_->max_groups) +
                        " nodes of this placement (" + std::to_string(topology->num_nodes()) +
                        " nodes) cannot hold top_k = " + std::to_string(top_k_) + " experts");
      }
      grouped_for_ = topology;
    }
    const auto G = group_sizes_.size();
    group_take_ = groups_->score == GroupScore::kMax ? 1
                  : groups_->score == GroupScore::kTop2Sum
                      ? 2
                      : std::max(1, top_k_ / groups_->max_groups);
    // Consecutive groups (group_of_ non-decreasing and every group present) get spans.
    group_begin_.clear();
    bool consecutive = group_of_.front() == 0;
    for (std::size_t e = 1; e < group_of_.size(); ++e)
      consecutive =
          consecutive && (group_of_[e] == group_of_[e - 1] || group_of_[e] == group_of_[e - 1] + 1);
    if (consecutive && group_of_.back() + 1 == static_cast<int>(G)) {
      group_begin_.assign(G + 1, num_experts_);
      for (int e = num_experts_ - 1; e >= 0; --e)
        group_begin_[static_cast<std::size_t>(group_of_[static_cast<std::size_t>(e)])] = e;
    }
    group_scores_.resize(G);
    group_members_.resize(static_cast<std::size_t>(group_take_));
    group_top_.resize(G * static_cast<std::size_t>(group_take_));
    group_found_.resize(G);
    group_kept_.resize(G);
  }

  /// Keeps the M best groups of this token (by the selection values in selection_, -inf
  /// for masked experts) and sets the selection value of every other expert to -inf.
  void limit_groups(const Topology* topology) {
    assign_groups(topology);
    const int G = static_cast<int>(group_sizes_.size());
    const int M = groups_->max_groups;
    const int take = group_take_;
    constexpr float kNone = -std::numeric_limits<float>::infinity();
    if (!group_begin_.empty()) {
      // Groups of consecutive experts (the usual placement): vector kernels per span.
      score_groups(selection_.data(), group_begin_.data(), G, take, group_members_.data(),
                   group_top_.data(), group_scores_.data());
      std::fill(group_kept_.begin(), group_kept_.end(), 0);
    } else {
      score_scattered_groups(G, take);
    }
    for (int m = 0; m < M; ++m) {
      int best = -1;
      for (int g = 0; g < G; ++g) {
        if (group_kept_[static_cast<std::size_t>(g)]) continue;
        if (best < 0 || group_scores_[static_cast<std::size_t>(g)] >
                            group_scores_[static_cast<std::size_t>(best)])
          best = g;
      }
      if (best < 0) break;
      group_kept_[static_cast<std::size_t>(best)] = 1;
    }
    if (!group_begin_.empty()) {
      for (int g = 0; g < G; ++g) {
        if (group_kept_[static_cast<std::size_t>(g)]) continue;
        std::fill(selection_.begin() + group_begin_[static_cast<std::size_t>(g)],
                  selection_.begin() + group_begin_[static_cast<std::size_t>(g) + 1], kNone);
      }
      return;
    }
    for (int e = 0; e < num_experts_; ++e) {
      if (!group_kept_[static_cast<std::size_t>(group_of_[static_cast<std::size_t>(e)])])
        selection_[static_cast<std::size_t>(e)] = kNone;
    }
  }

  /// Group scores when a group's experts are not consecutive: one pass over the experts,
  /// each group keeping its `take` largest values, descending.
  void score_scattered_groups(int G, int take) {
    constexpr float kNone = -std::numeric_limits<float>::infinity();
    std::fill(group_found_.begin(), group_found_.end(), 0);
    for (int e = 0; e < num_experts_; ++e) {
      const float v = selection_[static_cast<std::size_t>(e)];
      if (!(v > kNone)) continue;
      const auto g = static_cast<std::size_t>(group_of_[static_cast<std::size_t>(e)]);
      float* top = &group_top_[g * static_cast<std::size_t>(take)];
      int& n = group_found_[g];
      if (n == take && !(v > top[take - 1])) continue;
      int i = n < take ? n++ : take - 1;
      for (; i > 0 && top[i - 1] < v; --i) top[i] = top[i - 1];
      top[i] = v;
    }
    for (int g = 0; g < G; ++g) {
      const int n = group_found_[static_cast<std::size_t>(g)];
      const float* top = &group_top_[static_cast<std::size_t>(g) * static_cast<std::size_t>(take)];
      float score = n == 0 ? kNone : 0.0f;
      for (int i = 0; i < n; ++i) score += top[i];
      group_scores_[static_cast<std::size_t>(g)] = score;
      group_kept_[static_cast<std::size_t>(g)] = 0;
    }
  }

  void finish_stats(const RoutingPlan& plan, std::int64_t T, double z_loss, std::int64_t dropped) {
    std::copy(plan.counts.begin(), plan.counts.end(), stats_.counts.begin());
    stats_.dropped = dropped;
    stats_.tokens = T;
    std::copy(prob_sum_.begin(), prob_sum_.end(), stats_.probability_sums.begin());
    std::copy(plain_counts_.begin(), plain_counts_.end(), stats_.aux_counts.begin());
    stats_.z_loss_sum = z_loss;
    finish_router_stats(stats_);
  }

  std::string policy_;
  std::optional<GroupLimit> groups_;
  // Group of each expert, and the placement it was derived from (nodes: re-derived when
  // the topology changes).
  std::vector<int> group_of_;
  std::vector<int> group_sizes_;
  const Topology* grouped_for_ = nullptr;
  int group_take_ = 1;  // values a group's score sums: 1 (max), 2 (top2_sum) or k/M
  std::vector<float> group_scores_;
  std::vector<float> group_top_;  // [G, group_take_] a token's largest values per group
  std::vector<int> group_found_;  // [G] how many of them are set
  std::vector<int> group_begin_;  // [G+1] first expert of each group, when consecutive
  std::vector<int> group_members_;
  std::vector<char> group_kept_;
  std::string logits_name_;  // for shape errors, built once: routing allocates nothing
  std::string d_weights_name_, d_logits_name_;  // the same for the backward
  SelectionLimit limit_;
  int num_experts_;
  int top_k_ = 1;
  ScoreFunction score_ = ScoreFunction::kSoftmax;
  bool elementwise_ = false;  // sigmoid or sqrtsoftplus: scores per expert, P = s / Σ s
  bool pre_softmax_ = true;
  bool normalize_ = false;
  float scale_ = 1.0f;
  float update_rate_ = 0.0f;
  bool mask_non_finite_ = false;
  double aux_loss_coeff_ = 0;
  double z_loss_coeff_ = 0;
  std::vector<float> gradient_scratch_;   // backward: [E + 2K]
  std::vector<float> selected_gradient_;  // backward: [K] per selected position
  std::vector<float> bias_;
  // Per-token scratch, sized once.
  std::vector<float> probabilities_;   // P: softmax, or the normalised sigmoid scores
  std::vector<float> sigmoid_scores_;  // s: the element-wise scores
  std::vector<float> selection_;       // scores + bias; -inf where not selectable
  std::vector<int> chosen_, plain_;
  std::vector<float> chosen_values_;
  std::vector<double> prob_sum_;
  std::vector<std::int64_t> plain_counts_;
  RouterStats stats_;
};

}  // namespace

std::unique_ptr<Router> make_token_choice_router(const RouterCreateArgs& args, std::string policy,
                                                 SelectionLimit limit,
                                                 std::optional<GroupLimit> groups) {
  return std::make_unique<TokenChoiceRouter>(args, std::move(policy), std::move(limit), groups);
}

std::int64_t expert_capacity(std::int64_t tokens, int top_k, int num_experts,
                             double capacity_factor) noexcept {
  return static_cast<std::int64_t>(
      std::ceil(static_cast<double>(tokens) * top_k / num_experts * capacity_factor));
}

std::int64_t apply_expert_capacity(RoutingPlan& plan, double capacity_factor,
                                   CapacityDropPolicy policy, CapacityScratch& scratch) {
  const std::int64_t T = plan.num_tokens;
  const int K = plan.slots;
  const auto E = static_cast<int>(plan.counts.size());
  if (T == 0 || E == 0) return 0;
  const std::int64_t C = expert_capacity(T, K, E, capacity_factor);
  // Only over-full experts need their assignments: bucket those slots by expert, in token
  // order, in one pass (a counting sort over the over-full experts).
  scratch.offsets.assign(static_cast<std::size_t>(E) + 1, 0);
  std::int64_t over = 0;
  for (int e = 0; e < E; ++e) {
    scratch.offsets[static_cast<std::size_t>(e)] = over;
    if (plan.counts[static_cast<std::size_t>(e)] > C)
      over += plan.counts[static_cast<std::size_t>(e)];
  }
  scratch.offsets[static_cast<std::size_t>(E)] = over;
  if (over == 0) return 0;
  scratch.slots.resize(static_cast<std::size_t>(over));
  scratch.fill.assign(scratch.offsets.begin(), scratch.offsets.end() - 1);
  for (std::int64_t i = 0; i < T * K; ++i) {
    const std::int32_t e = plan.experts[static_cast<std::size_t>(i)];
    if (e < 0 || plan.counts[static_cast<std::size_t>(e)] <= C) continue;
    scratch.slots[static_cast<std::size_t>(scratch.fill[static_cast<std::size_t>(e)]++)] = i;
  }
  std::int64_t dropped = 0;
  for (int e = 0; e < E; ++e) {
    if (plan.counts[static_cast<std::size_t>(e)] <= C) continue;
    const auto begin = scratch.slots.begin() + scratch.offsets[static_cast<std::size_t>(e)];
    const auto end = scratch.slots.begin() + scratch.offsets[static_cast<std::size_t>(e) + 1];
    if (policy == CapacityDropPolicy::kProbs) {
      // The C largest final weights; ties: lower token index (slot order is token order).
      std::nth_element(begin, begin + C, end, [&](std::int64_t a, std::int64_t b) {
        const float wa = plan.weights[static_cast<std::size_t>(a)];
        const float wb = plan.weights[static_cast<std::size_t>(b)];
        return wa != wb ? wa > wb : a < b;
      });
    }
    for (auto it = begin + C; it != end; ++it) {
      const auto i = static_cast<std::size_t>(*it);
      plan.experts[i] = -1;
      plan.weights[i] = 0.0f;
      ++dropped;
    }
    plan.counts[static_cast<std::size_t>(e)] = C;
  }
  return dropped;
}

void declare_group_limit_options(ConfigSchema& s, std::int64_t num_groups_default) {
  s.add("num_groups", ConfigType::kInt, ConfigValue{num_groups_default},
        num_groups_default < 0
            ? "G: limit each token to max_groups groups of E/G consecutive experts (must divide "
              "E); -1: no group limit"
            : "G: groups of E/G consecutive experts (must divide E); 0: the nodes of the "
              "placement",
        checks::int_range(-1, 1 << 16));
  s.add("max_groups", ConfigType::kInt, ConfigValue{std::int64_t{1}},
        "M: groups (nodes) a token may use, 1..G, with M groups holding at least top_k experts",
        checks::int_range(1, 1 << 16));
  s.add("group_score", ConfigType::kString, std::nullopt,
        "max, top2_sum or topk_sum (of the k/M largest); default top2_sum with a bias, else max",
        checks::one_of({"max", "top2_sum", "topk_sum"}));
}

std::optional<GroupLimit> group_limit_from_options(const RouterCreateArgs& args) {
  const ConfigSection& o = *args.options;
  if (o.get_int("num_groups") < 0) return std::nullopt;
  GroupLimit groups;
  groups.num_groups = static_cast<int>(o.get_int("num_groups"));
  groups.max_groups = static_cast<int>(o.get_int("max_groups"));
  const bool has_bias = o.has("bias") || !args.checkpoint_bias.empty();
  const std::string score =
      o.has("group_score") ? o.get_string("group_score") : (has_bias ? "top2_sum" : "max");
  groups.score = score == "max"        ? GroupScore::kMax
                 : score == "top2_sum" ? GroupScore::kTop2Sum
                                       : GroupScore::kTopkSum;
  return groups;
}

int checked_top_k(const ConfigSection& o, int num_experts) {
  const std::int64_t k = o.get_int("top_k");
  if (k < 1 || k > num_experts) {
    o.fail("top_k", "must be in 1.." + std::to_string(num_experts) +
                        " (the number of experts) (got " + std::to_string(k) + ")");
  }
  return static_cast<int>(k);
}

void require_finite_logits(const float* z, std::int64_t tokens, int num_experts,
                           const std::string& policy) {
  const std::int64_t i = first_non_finite(z, tokens * num_experts);
  if (i < tokens * num_experts) {
    throw Error(ErrorCode::kInvalidArgument,
                "router " + policy + ": logit of token " + std::to_string(i / num_experts) +
                    ", expert " + std::to_string(i % num_experts) + " is " +
                    (std::isnan(z[i]) ? "NaN" : "infinite") +
                    " (router.nan_policy = \"mask\" skips such experts instead)");
  }
}

}  // namespace switchyard
