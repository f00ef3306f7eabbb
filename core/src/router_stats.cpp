#include <algorithm>
#include <string>

#include "switchyard/router.hpp"
#include "switchyard/status.hpp"

namespace switchyard {

void finish_router_stats(RouterStats& stats) noexcept {
  const auto E = static_cast<double>(stats.counts.size());
  std::int64_t total = 0, most = 0;
  for (auto c : stats.counts) {
    total += c;
    most = std::max(most, c);
  }
  stats.imbalance = total > 0 ? static_cast<double>(most) * E / static_cast<double>(total) : 0.0;
  if (stats.tokens == 0 || stats.top_k < 1) {
    stats.aux_loss = 0;
    stats.z_loss = 0;
    return;
  }
  double aux = 0;
  for (std::size_t e = 0; e < stats.probability_sums.size() && e < stats.aux_counts.size(); ++e) {
    aux += stats.probability_sums[e] * static_cast<double>(stats.aux_counts[e]);
  }
  const auto T = static_cast<double>(stats.tokens);
  stats.aux_loss = aux * E / (stats.top_k * T * T);
  stats.z_loss = stats.z_loss_sum / T;
}

const RoutingPlan& require_backward_plan(const RouteGradientInput& in, int slots,
                                         std::string_view policy) {
  const std::int64_t T = in.logits.dim(0);
  const RoutingPlan* plan = in.plan;
  if (plan == nullptr || plan->num_tokens != T || plan->slots != slots ||
      !plan->experts.allocator().host_accessible()) {
    throw Error(ErrorCode::kInvalidArgument,
                "router " + std::string(policy) +
                    " backward: needs the forward's plan in host memory for " + std::to_string(T) +
                    " tokens x " + std::to_string(slots) + " slots");
  }
  return *plan;
}

RouterLossScope router_loss_scope(const RouteGradientInput& in, const RouterStats& stats,
                                  int num_experts, std::string_view policy) {
  RouterLossScope scope;
  scope.tokens = in.loss_tokens > 0 ? in.loss_tokens : stats.tokens;
  scope.aux_counts = in.loss_aux_counts.empty() ? std::span<const std::int64_t>(stats.aux_counts)
                                                : in.loss_aux_counts;
  if (scope.aux_counts.size() != static_cast<std::size_t>(num_experts)) {
    throw Error(ErrorCode::kInvalidArgument,
                "router " + std::string(policy) +
                    " backward: " + std::to_string(scope.aux_counts.size()) + " aux counts for " +
                    std::to_string(num_experts) + " experts");
  }
  return scope;
}

void Router::backward(const RouteGradientInput& /*input*/, const TensorView& /*d_logits*/) {
  throw Error(ErrorCode::kUnavailable, "router " + name() + " has no backward pass");
}

void Router::adopt_stats(const RouterStats& /*computed*/) {
  throw Error(ErrorCode::kUnavailable,
              "router " + name() + ": its statistics cannot come from a device data path");
}

}  // namespace switchyard
