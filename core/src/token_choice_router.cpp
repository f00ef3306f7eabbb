// The token-choice routing of docs/routing.md, written once for the policy plugins: softmax or
// sigmoid scores, optional selection bias, top-k selection (ties to the lower expert),
// weights, normalisation and scale, the statistics and bias balancing; and the per-expert
// capacity limit that the capacity policy applies after the selection.
#include "switchyard/token_choice_router.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "switchyard/io.hpp"
#include "switchyard/layer.hpp"
#include "switchyard/status.hpp"

namespace switchyard {
namespace {}  // namespace

void declare_token_choice_options(ConfigSchema& s) {
  using T = ConfigType;
  s.add("top_k", T::kInt, ConfigValue{std::int64_t{2}}, "experts per token, 1..num_experts");
  s.add("score", T::kString, ConfigValue{std::string("softmax")},
        "score function: softmax or sigmoid", checks::one_of({"softmax", "sigmoid"}));
  s.add("pre_softmax", T::kBool, ConfigValue{true},
        "softmax: true = softmax over all experts then top-k; false = top-k of logits then "
        "softmax over the k (Mixtral)");
  s.add("normalize", T::kBool, std::nullopt,
        "divide the selected weights by their sum (default: false for softmax, true for sigmoid)");
  s.add("scale", T::kFloat, ConfigValue{1.0}, "multiplies the final weights");
  s.add("bias", T::kString, std::nullopt,
        ".npy float32 [E] added to the scores for selection only (default: the checkpoint's "
        "e_score_correction_bias, if any)");
  s.add("bias_update_rate", T::kFloat, ConfigValue{0.0},
        "auxiliary-loss-free balancing: update() moves the bias by this step (0: off)");
  s.add("nan_policy", T::kString, ConfigValue{std::string("error")},
        "NaN or Inf logits: error, or mask (that expert is never selected for that token)",
        checks::one_of({"error", "mask"}));
}

namespace {

class TokenChoiceRouter final : public Router {
 public:
  TokenChoiceRouter(const RouterCreateArgs& args, std::string policy, SelectionLimit limit,
                    std::optional<GroupLimit> groups)
      : policy_(std::move(policy)),
        groups_(groups),
        logits_name_("router " + policy_ + " logits"),
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
    sigmoid_ = o.get_string("score") == "sigmoid";
    pre_softmax_ = o.get_bool("pre_softmax");
    normalize_ = o.has("normalize") ? o.get_bool("normalize") : sigmoid_;
    scale_ = static_cast<float>(o.get_float("scale"));
    if (!std::isfinite(scale_)) o.fail("scale", "must be finite");
    update_rate_ = static_cast<float>(o.get_float("bias_update_rate"));
    if (!(update_rate_ >= 0) || !std::isfinite(update_rate_)) {
      o.fail("bias_update_rate", "must be a finite number >= 0");
    }
    mask_non_finite_ = o.get_string("nan_policy") == "mask";
    if (o.has("bias")) {
      const auto path = o.get_path("bias");
      HostTensor bias;
      try {
        bias = read_npy(path);
      } catch (const Error& e) {
        o.fail("bias", e.message());
      }
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
    scores_.resize(E);
    selection_.resize(E);
    valid_.resize(E);
    selectable_.resize(E);
    chosen_.resize(static_cast<std::size_t>(top_k_));
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

    for (std::int64_t t = 0; t < T; ++t) {
      const float* row = z + t * E;
      int num_valid = 0;
      for (int e = 0; e < E; ++e) {
        valid_[static_cast<std::size_t>(e)] = std::isfinite(row[e]);
        num_valid += valid_[static_cast<std::size_t>(e)] ? 1 : 0;
      }
      if (num_valid == 0) continue;  // every expert masked: the token is routed nowhere
      std::copy(valid_.begin(), valid_.end(), selectable_.begin());

      // Scores (float32, as the reference implementations compute them).
      if (sigmoid_) {
        for (int e = 0; e < E; ++e)
          scores_[static_cast<std::size_t>(e)] = 1.0f / (1.0f + std::exp(-row[e]));
      } else if (pre_softmax_) {
        softmax(row, scores_.data());
      } else {
        for (int e = 0; e < E; ++e) scores_[static_cast<std::size_t>(e)] = row[e];
      }
      for (int e = 0; e < E; ++e) {
        selection_[static_cast<std::size_t>(e)] =
            scores_[static_cast<std::size_t>(e)] +
            (bias_.empty() ? 0.0f : bias_[static_cast<std::size_t>(e)]);
      }
      if (groups_) limit_groups(input.topology);
      const int picked = select_top(selection_.data(), chosen_.data(), selectable_.data());

      float* w = &plan.weights[static_cast<std::size_t>(t * K)];
      std::int32_t* ex = &plan.experts[static_cast<std::size_t>(t * K)];
      if (!sigmoid_ && !pre_softmax_) {
        // Softmax over the selected logits only (Mixtral).
        float max_logit = -std::numeric_limits<float>::infinity();
        for (int j = 0; j < picked; ++j)
          max_logit = std::max(max_logit, row[chosen_[static_cast<std::size_t>(j)]]);
        float sum = 0;
        for (int j = 0; j < picked; ++j) {
          w[j] = std::exp(row[chosen_[static_cast<std::size_t>(j)]] - max_logit);
          sum += w[j];
        }
        for (int j = 0; j < picked; ++j) w[j] /= sum;
      } else {
        for (int j = 0; j < picked; ++j)
          w[j] = scores_[static_cast<std::size_t>(chosen_[static_cast<std::size_t>(j)])];
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

      accumulate_losses(row, z_loss);
    }
    const std::int64_t dropped = limit_ ? limit_(plan) : 0;
    finish_stats(plan, T, z_loss, dropped);
  }

  bool updates_from_counts() const noexcept override { return update_rate_ > 0; }

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
    group_scores_.resize(G);
    group_top_.resize(static_cast<std::size_t>(top_k_) + 2);
    group_kept_.resize(G);
  }

  /// Keeps the M best groups of this token (scores in selection_) in selectable_.
  void limit_groups(const Topology* topology) {
    assign_groups(topology);
    const int G = static_cast<int>(group_sizes_.size());
    const int M = groups_->max_groups;
    const int take = groups_->score == GroupScore::kMax       ? 1
                     : groups_->score == GroupScore::kTop2Sum ? 2
                                                              : std::max(1, top_k_ / M);
    constexpr float kNone = -std::numeric_limits<float>::infinity();
    for (int g = 0; g < G; ++g) {
      // The `take` largest selection scores of the group's valid experts, kept descending.
      int n = 0;
      for (int e = 0; e < num_experts_; ++e) {
        if (group_of_[static_cast<std::size_t>(e)] != g || !valid_[static_cast<std::size_t>(e)])
          continue;
        const float v = selection_[static_cast<std::size_t>(e)];
        if (n < take) {
          group_top_[static_cast<std::size_t>(n++)] = v;
        } else if (v > group_top_[static_cast<std::size_t>(n - 1)]) {
          group_top_[static_cast<std::size_t>(n - 1)] = v;
        } else {
          continue;
        }
        for (int i = n - 1; i > 0 && group_top_[static_cast<std::size_t>(i)] >
                                         group_top_[static_cast<std::size_t>(i - 1)];
             --i) {
          std::swap(group_top_[static_cast<std::size_t>(i)],
                    group_top_[static_cast<std::size_t>(i - 1)]);
        }
      }
      float score = n == 0 ? kNone : 0.0f;
      for (int i = 0; i < n; ++i) score += group_top_[static_cast<std::size_t>(i)];
      group_scores_[static_cast<std::size_t>(g)] = score;
      group_kept_[static_cast<std::size_t>(g)] = 0;
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
    for (int e = 0; e < num_experts_; ++e) {
      if (!group_kept_[static_cast<std::size_t>(group_of_[static_cast<std::size_t>(e)])])
        selectable_[static_cast<std::size_t>(e)] = 0;
    }
  }

  /// softmax over the valid experts of `row`; invalid ones get 0.
  void softmax(const float* row, float* out) const {
    float max_logit = -std::numeric_limits<float>::infinity();
    for (int e = 0; e < num_experts_; ++e) {
      if (valid_[static_cast<std::size_t>(e)]) max_logit = std::max(max_logit, row[e]);
    }
    float sum = 0;
    for (int e = 0; e < num_experts_; ++e) {
      out[e] = valid_[static_cast<std::size_t>(e)] ? std::exp(row[e] - max_logit) : 0.0f;
      sum += out[e];
    }
    for (int e = 0; e < num_experts_; ++e) out[e] /= sum;
  }

  /// Indices of the k largest valid entries, descending, ties to the lower index.
  /// Returns how many were found (fewer than k when experts are masked).
  int select_top(const float* values, int* out, const char* allowed) {
    int found = 0;
    for (int j = 0; j < top_k_; ++j) {
      int best = -1;
      for (int e = 0; e < num_experts_; ++e) {
        if (!allowed[e]) continue;
        if (std::find(out, out + found, e) != out + found) continue;
        if (best < 0 || values[e] > values[best]) best = e;
      }
      if (best < 0) break;
      out[found++] = best;
    }
    return found;
  }

  /// Adds one token's share to the aux-loss and z-loss sums.
  void accumulate_losses(const float* row, double& z_loss) {
    // P: softmax probabilities, or sigmoid scores normalised over the experts.
    if (sigmoid_) {
      float sum = 0;
      for (int e = 0; e < num_experts_; ++e) {
        if (!valid_[static_cast<std::size_t>(e)]) scores_[static_cast<std::size_t>(e)] = 0;
        sum += scores_[static_cast<std::size_t>(e)];
      }
      for (int e = 0; e < num_experts_; ++e) scores_[static_cast<std::size_t>(e)] /= sum;
    } else {
      softmax(row, scores_.data());
    }
    const int picked = select_top(scores_.data(), plain_.data(), valid_.data());
    for (int j = 0; j < picked; ++j)
      ++plain_counts_[static_cast<std::size_t>(plain_[static_cast<std::size_t>(j)])];
    for (int e = 0; e < num_experts_; ++e)
      prob_sum_[static_cast<std::size_t>(e)] += scores_[static_cast<std::size_t>(e)];
    double max_logit = -std::numeric_limits<double>::infinity();
    for (int e = 0; e < num_experts_; ++e) {
      if (valid_[static_cast<std::size_t>(e)])
        max_logit = std::max(max_logit, static_cast<double>(row[e]));
    }
    double sum = 0;
    for (int e = 0; e < num_experts_; ++e) {
      if (valid_[static_cast<std::size_t>(e)])
        sum += std::exp(static_cast<double>(row[e]) - max_logit);
    }
    const double lse = max_logit + std::log(sum);
    z_loss += lse * lse;
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
  std::vector<float> group_scores_, group_top_;
  std::vector<char> group_kept_;
  std::string logits_name_;  // for shape errors, built once: routing allocates nothing
  SelectionLimit limit_;
  int num_experts_;
  int top_k_ = 1;
  bool sigmoid_ = false;
  bool pre_softmax_ = true;
  bool normalize_ = false;
  float scale_ = 1.0f;
  float update_rate_ = 0.0f;
  bool mask_non_finite_ = false;
  std::vector<float> bias_;
  // Per-token scratch, sized once.
  std::vector<float> scores_, selection_;
  std::vector<char> valid_;       // finite logit
  std::vector<char> selectable_;  // valid and in a kept group
  std::vector<int> chosen_, plain_;
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
  std::int64_t dropped = 0;
  for (int e = 0; e < E; ++e) {
    if (plan.counts[static_cast<std::size_t>(e)] <= C) continue;
    // This expert's assignments (slot indices) in token order.
    scratch.slots.clear();
    for (std::int64_t i = 0; i < T * K; ++i) {
      if (plan.experts[static_cast<std::size_t>(i)] == e) scratch.slots.push_back(i);
    }
    if (policy == CapacityDropPolicy::kProbs) {
      // Largest final weight first; ties: lower token index (the slots are in token order).
      std::stable_sort(scratch.slots.begin(), scratch.slots.end(),
                       [&](std::int64_t a, std::int64_t b) {
                         return plan.weights[static_cast<std::size_t>(a)] >
                                plan.weights[static_cast<std::size_t>(b)];
                       });
    }
    for (std::size_t n = static_cast<std::size_t>(C); n < scratch.slots.size(); ++n) {
      const auto i = static_cast<std::size_t>(scratch.slots[n]);
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
  for (std::int64_t i = 0; i < tokens * num_experts; ++i) {
    if (std::isfinite(z[i])) continue;
    throw Error(ErrorCode::kInvalidArgument,
                "router " + policy + ": logit of token " + std::to_string(i / num_experts) +
                    ", expert " + std::to_string(i % num_experts) + " is " +
                    (std::isnan(z[i]) ? "NaN" : "infinite") +
                    " (router.nan_policy = \"mask\" skips such experts instead)");
  }
}

}  // namespace switchyard
