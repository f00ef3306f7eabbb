// router_hash: DeepSeek-V4's hash routing (docs/routing.md). A token's k experts are fixed
// by its id: row tid2eid[token id] of the table `[router] table` (.npy int32 [V, k]). Its
// weights are the score (`[router] score`: softmax over all experts, sigmoid or
// √softplus) of its logits at those experts, normalised and scaled as `normalize` and
// `scale` say, so the gate still learns through them. The statistics, the aux loss's sums
// and the backward are those of token choice with the table's choice held fixed.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "switchyard/plugin.hpp"
#include "switchyard/routing_gradient.hpp"
#include "switchyard/routing_rows.hpp"
#include "switchyard/token_choice_router.hpp"

namespace switchyard::hash {
namespace {

using routing_gradient::ScoreFunction;

void declare_options(ConfigSchema& s) {
  using T = ConfigType;
  s.add("table", T::kString, std::nullopt,
        ".npy int32 [V, k]: row v holds the k experts of the tokens whose id is v (tid2eid)");
  s.add("top_k", T::kInt, std::nullopt, "k; when set, must equal the table's columns");
  s.add("score", T::kString, ConfigValue{std::string("softmax")},
        "the weights' score of the logits: softmax (over all experts), sigmoid or sqrtsoftplus",
        checks::one_of({"softmax", "sigmoid", "sqrtsoftplus"}));
  s.add("normalize", T::kBool, std::nullopt,
        "divide the weights by their sum (default: false for softmax, true for sigmoid and "
        "sqrtsoftplus)");
  s.add("scale", T::kFloat, ConfigValue{1.0}, "multiplies the final weights");
  declare_loss_options(s);
}

class HashRouter final : public Router {
 public:
  explicit HashRouter(const RouterCreateArgs& args) : num_experts_(args.num_experts) {
    const ConfigSection& o = *args.options;
    if (!o.has("table")) o.fail("table", "hash routing needs its table (.npy int32 [V, k])");
    const auto path = o.get_path("table");
    const HostTensor table = read_npy_option(o, "table");
    if (table.dtype() != DType::kI32 || table.shape().size() != 2 || table.shape()[0] < 1 ||
        table.shape()[1] < 1 || table.shape()[1] > num_experts_) {
      o.fail("table", path.string() + " must be int32 [V, k] with V >= 1 and k in 1.." +
                          std::to_string(num_experts_) + " (the experts)");
    }
    vocabulary_ = table.shape()[0];
    top_k_ = static_cast<int>(table.shape()[1]);
    if (o.has("top_k") && o.get_int("top_k") != top_k_) {
      o.fail("top_k", "must equal the table's " + std::to_string(top_k_) + " columns (got " +
                          std::to_string(o.get_int("top_k")) + ")");
    }
    table_.assign(table.data<std::int32_t>(), table.data<std::int32_t>() + vocabulary_ * top_k_);
    for (std::int64_t v = 0; v < vocabulary_; ++v) {
      const std::int32_t* row = table_.data() + v * top_k_;
      for (int j = 0; j < top_k_; ++j) {
        const bool repeated = std::find(row, row + j, row[j]) != row + j;
        if (row[j] < 0 || row[j] >= num_experts_ || repeated) {
          o.fail("table",
                 path.string() + ": row " + std::to_string(v) + " names expert " +
                     std::to_string(row[j]) +
                     (repeated ? " twice" : ", outside 0.." + std::to_string(num_experts_ - 1)));
        }
      }
    }
    form_.score = score_function(o);
    form_.pre_softmax = true;
    form_.normalize =
        o.has("normalize") ? o.get_bool("normalize") : form_.score != ScoreFunction::kSoftmax;
    form_.scale = o.get_float("scale");
    if (!std::isfinite(form_.scale)) o.fail("scale", "must be finite");
    aux_loss_coeff_ = loss_coefficient(o, "aux_loss_coeff");
    z_loss_coeff_ = loss_coefficient(o, "z_loss_coeff");
    const auto E = static_cast<std::size_t>(num_experts_);
    scores_.resize(E);
    probabilities_.resize(E);
    stats_.counts.assign(E, 0);
    stats_.probability_sums.assign(E, 0.0);
    stats_.aux_counts.assign(E, 0);
    stats_.top_k = top_k_;
  }

  std::string name() const override { return "hash"; }
  int num_experts() const noexcept override { return num_experts_; }
  int slots_per_token() const noexcept override { return top_k_; }
  const RouterStats& stats() const noexcept override { return stats_; }
  std::span<const float> bias() const noexcept override { return {}; }
  void update(std::span<const std::int64_t> /*global_counts*/) override {}
  bool needs_token_ids() const noexcept override { return true; }

  // Host-synchronous: done when it returns.
  void route(const RouteInput& input, RoutingPlan& plan, Stream& /*stream*/) override {
    input.logits.require("router hash logits", DType::kF32, {-1, num_experts_});
    const std::int64_t T = input.logits.dim(0);
    const int E = num_experts_, K = top_k_;
    const float* z = input.logits.data_as<const float>();
    require_finite_logits(z, T, E, "hash");
    ids_.resize(static_cast<std::size_t>(T));
    read_token_ids(input.token_ids, T, ids_.data());
    plan.num_tokens = T;
    plan.slots = K;
    plan.experts.resize(static_cast<std::size_t>(T * K));
    plan.weights.resize(static_cast<std::size_t>(T * K));
    plan.counts.assign(static_cast<std::size_t>(E), 0);
    std::fill(stats_.probability_sums.begin(), stats_.probability_sums.end(), 0.0);
    std::fill(stats_.aux_counts.begin(), stats_.aux_counts.end(), 0);
    double z_loss = 0;
    for (std::int64_t t = 0; t < T; ++t) {
      const float* row = z + t * E;
      const std::int32_t* chosen = table_.data() + ids_[static_cast<std::size_t>(t)] * K;
      const double lse = probabilities_of(row);
      z_loss += lse * lse;
      const float* score =
          form_.score == ScoreFunction::kSoftmax ? probabilities_.data() : scores_.data();
      float* w = plan.weights.data() + t * K;
      std::int32_t* ex = plan.experts.data() + t * K;
      for (int j = 0; j < K; ++j) w[j] = score[chosen[j]];
      if (form_.normalize) {
        float sum = 0;
        for (int j = 0; j < K; ++j) sum += w[j];
        for (int j = 0; j < K; ++j) w[j] /= (sum + 1e-20f);
      }
      for (int j = 0; j < K; ++j) {
        w[j] *= static_cast<float>(form_.scale);
        ex[j] = chosen[j];
        ++plan.counts[static_cast<std::size_t>(chosen[j])];
        // The aux loss's counts: the table's choices (they are what loads the experts).
        ++stats_.aux_counts[static_cast<std::size_t>(chosen[j])];
      }
      for (int e = 0; e < E; ++e)
        stats_.probability_sums[static_cast<std::size_t>(e)] +=
            probabilities_[static_cast<std::size_t>(e)];
    }
    std::copy(plan.counts.data(), plan.counts.data() + E, stats_.counts.begin());
    stats_.dropped = 0;
    stats_.tokens = T;
    stats_.z_loss_sum = z_loss;
    finish_router_stats(stats_);
  }

  void backward(const RouteGradientInput& in, const TensorView& d_logits) override {
    in.logits.require("router hash logits", DType::kF32, {-1, num_experts_});
    const std::int64_t T = in.logits.dim(0);
    const int E = num_experts_, K = top_k_;
    const RoutingPlan* plan = &require_backward_plan(in, K, "hash");
    in.d_weights.require("router hash backward d_weights", DType::kF32, {T, K});
    d_logits.require("router hash backward d_logits", DType::kF32, {T, E});
    const RouterLossScope scope = router_loss_scope(in, stats_, E, "hash");
    scratch_.resize(static_cast<std::size_t>(E) + 2 * static_cast<std::size_t>(K));
    const float* z = in.logits.data_as<const float>();
    float* dz_all = d_logits.data_as<float>();
    std::vector<int> chosen(static_cast<std::size_t>(K));
    for (std::int64_t t = 0; t < T; ++t) {
      float* dz = dz_all + t * E;
      std::fill(dz, dz + E, 0.0f);
      // The plan's experts are the table's row for this token (the choice is fixed).
      for (int j = 0; j < K; ++j) chosen[static_cast<std::size_t>(j)] = plan->experts[t * K + j];
      routing_gradient::weights_backward(form_, z + t * E, E, chosen.data(), K,
                                         in.d_weights.data_as<const float>() + t * K, dz,
                                         scratch_.data());
      routing_gradient::losses_backward(form_.score, z + t * E, E, K, scope.tokens,
                                        scope.aux_counts, aux_loss_coeff_, z_loss_coeff_, dz,
                                        scratch_.data());
    }
  }

 private:
  /// The tokens' ids [T] (i32 or i64, host) into `out`, each checked against the table.
  void read_token_ids(const TensorView& ids, std::int64_t T, std::int64_t* out) const {
    if (ids.data() == nullptr && T > 0) {
      throw Error(ErrorCode::kInvalidArgument,
                  "router hash: routes by token id, and no token ids were given (pass the "
                  "tokens' ids [T] with them)");
    }
    if (T == 0) return;
    const DType dtype = ids.dtype() == DType::kI64 ? DType::kI64 : DType::kI32;
    ids.require("router hash token ids", dtype, {T});
    for (std::int64_t t = 0; t < T; ++t) {
      const std::int64_t v = dtype == DType::kI64 ? ids.data_as<const std::int64_t>()[t]
                                                  : ids.data_as<const std::int32_t>()[t];
      if (v < 0 || v >= vocabulary_) {
        throw Error(ErrorCode::kInvalidArgument,
                    "router hash: token " + std::to_string(t) + " has id " + std::to_string(v) +
                        ", outside the table's ids 0.." + std::to_string(vocabulary_ - 1));
      }
      out[t] = v;
    }
  }

  /// P of one token (softmax, or s / Σ s for the element-wise scores) into probabilities_,
  /// s into scores_; returns the row's logsumexp.
  double probabilities_of(const float* row) {
    const int E = num_experts_;
    if (form_.score == ScoreFunction::kSoftmax)
      return softmax_row(row, E, probabilities_.data(), false);
    const float sum = elementwise_scores(form_.score, row, E, scores_.data(), false);
    for (int e = 0; e < E; ++e)
      probabilities_[static_cast<std::size_t>(e)] = scores_[static_cast<std::size_t>(e)] / sum;
    return log_sum_exp_row(row, E, false);
  }

  int num_experts_;
  int top_k_ = 0;
  std::int64_t vocabulary_ = 0;
  std::vector<std::int32_t> table_;  // [V, k]
  routing_gradient::WeightForm form_;
  double aux_loss_coeff_ = 0, z_loss_coeff_ = 0;
  std::vector<float> scores_, probabilities_, scratch_;
  std::vector<std::int64_t> ids_;
  RouterStats stats_;
};

std::unique_ptr<Router> create(const RouterCreateArgs& args) {
  return std::make_unique<HashRouter>(args);
}

}  // namespace
}  // namespace switchyard::hash

SWITCHYARD_ROUTER_PLUGIN("hash", "0.1.0",
                         "DeepSeek-V4's hash routing: each token's experts from a table of its "
                         "id, weighted by the score of its logits there",
                         ::switchyard::hash::declare_options, ::switchyard::hash::create)
