#pragma once
/// \file
/// The token-choice routing of docs/routing.md written once, for the policy plugins to compose:
/// scores (softmax, sigmoid or √softplus), selection bias, top-k selection with ties to the lower
/// expert index, weights (pre/post softmax, normalise, scale), statistics (counts,
/// imbalance, aux and z losses and their sums), bias balancing, and the per-expert
/// capacity limit. Host memory, float32.

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "switchyard/config.hpp"
#include "switchyard/plugin.hpp"
#include "switchyard/router.hpp"
#include "switchyard/routing_gradient.hpp"

namespace switchyard {

/// `[router] top_k` of `options`, checked to be in 1..num_experts (a configuration error
/// naming the key otherwise). Shared by every policy.
int checked_top_k(const ConfigSection& options, int num_experts);

/// Throws `Error(kInvalidArgument)` naming `policy` and the first NaN or infinite logit
/// (token and expert) of `logits` [T,E]. Shared by every policy under nan_policy = error.
void require_finite_logits(const float* logits, std::int64_t tokens, int num_experts,
                           const std::string& policy);

/// Declares the token-choice keys of [router]: top_k, score, pre_softmax, normalize,
/// scale, bias, bias_update_rate, nan_policy, and the loss coefficients.
void declare_token_choice_options(ConfigSchema& schema);

/// Declares aux_loss_coeff and z_loss_coeff (default 0): the weights of the aux and z
/// losses' gradients in `Router::backward`. Every policy with a backward declares them.
void declare_loss_options(ConfigSchema& schema);
/// A loss coefficient of `options`: finite and >= 0 (a configuration error otherwise).
double loss_coefficient(const ConfigSection& options, std::string_view key);

/// `[router] score` of `options` (softmax, sigmoid or sqrtsoftplus).
routing_gradient::ScoreFunction score_function(const ConfigSection& options);
/// The element-wise scores `score` (sigmoid or √softplus, routing_rows.hpp) of z [n] into
/// s [n]; with `skip_non_finite`, non-finite logits score 0. Returns Σ s.
float elementwise_scores(routing_gradient::ScoreFunction score, const float* z, int n, float* s,
                         bool skip_non_finite) noexcept;
/// The .npy file the path option `key` names; a file that cannot be read fails the option
/// (a configuration error naming the key).
HostTensor read_npy_option(const ConfigSection& options, std::string_view key);

/// What a policy does to a plan after the top-k selection (e.g. capacity); returns the
/// number of assignments it dropped. Called once per `route`; must not allocate once its
/// scratch has grown.
using SelectionLimit = std::function<std::int64_t(RoutingPlan& plan)>;

/// How a group of experts is scored for group limiting (docs/routing.md, node_limited).
enum class GroupScore {
  kMax,      ///< the largest selection score in the group
  kTop2Sum,  ///< the sum of the two largest
  kTopkSum,  ///< the sum of the k/M largest (at least 1)
};

/// Group-limited selection (DeepSeek-V3): per token, keep the `max_groups` best groups
/// (ties: lower group index) and select the top-k among their experts only.
struct GroupLimit {
  /// G: experts [g·E/G, (g+1)·E/G) form group g (G must divide E). 0: the groups are the
  /// nodes of the placement — the experts the EP layer places on each node, from
  /// `RouteInput::topology` (contiguous placement over its ranks); that needs several nodes.
  int num_groups = 0;
  int max_groups = 1;  ///< M, 1..G, with the M smallest groups holding at least k experts
  GroupScore score = GroupScore::kMax;
};

/// Declares num_groups, max_groups and group_score (docs/routing.md, node_limited) with
/// `num_groups_default` (0 means "the nodes of the placement" for node_limited; for
/// policies where grouping is optional, -1 means "off").
void declare_group_limit_options(ConfigSchema& schema, std::int64_t num_groups_default);
/// The group limit those keys describe, or none when num_groups is -1 (off).
std::optional<GroupLimit> group_limit_from_options(const RouterCreateArgs& args);

/// A host-synchronous router of the token-choice family named `policy`, configured from
/// `args.options` (the keys above), limiting the selection to groups when `groups` is
/// set, and applying `limit` (if any) after the selection. Throws
/// `Error(kInvalidArgument)` naming the key for a bad configuration.
std::unique_ptr<Router> make_token_choice_router(const RouterCreateArgs& args, std::string policy,
                                                 SelectionLimit limit = {},
                                                 std::optional<GroupLimit> groups = {});

/// Which assignments an over-full expert keeps.
enum class CapacityDropPolicy {
  kProbs,     ///< the largest final weights (ties: lower token index)
  kPosition,  ///< the first in token order
};

/// C = ceil(T · k / E · capacity_factor).
std::int64_t expert_capacity(std::int64_t tokens, int top_k, int num_experts,
                             double capacity_factor) noexcept;

/// Reusable scratch of `apply_expert_capacity`.
struct CapacityScratch {
  std::vector<std::int64_t> offsets;  ///< [E+1] over-full experts' first slot in `slots`
  std::vector<std::int64_t> fill;     ///< [E] next free entry per expert
  std::vector<std::int64_t> slots;    ///< over-full experts' assignments, by expert
};

/// Keeps at most C assignments per expert of `plan` (host) and turns the others into
/// expert -1, weight 0, in place (kept weights are not renormalised); updates
/// `plan.counts`. Returns how many it dropped.
std::int64_t apply_expert_capacity(RoutingPlan& plan, double capacity_factor,
                                   CapacityDropPolicy policy, CapacityScratch& scratch);

}  // namespace switchyard
