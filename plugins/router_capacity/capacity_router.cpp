// router_capacity: the `capacity` policy of docs/routing.md (GShard/Switch/Megatron): the
// token-choice top-k of the core, then per expert at most C = ceil(T·k/E·capacity_factor)
// assignments over this rank's tokens; the others are dropped (expert -1, weight 0).
// With num_groups >= 0 the selection is node-limited first, as in router_node_limited.
#include <cmath>
#include <memory>

#include "switchyard/plugin.hpp"
#include "switchyard/token_choice_router.hpp"

namespace switchyard::capacity {
namespace {

void declare_options(ConfigSchema& s) {
  declare_token_choice_options(s);
  declare_group_limit_options(s, -1);  // node limiting before the capacity, when set
  s.add("capacity_factor", ConfigType::kFloat, ConfigValue{1.0},
        "C = ceil(T · top_k / E · capacity_factor) assignments per expert; must be > 0",
        checks::positive());
  s.add("drop_policy", ConfigType::kString, ConfigValue{std::string("probs")},
        "which assignments an over-full expert keeps: probs (largest weights; ties: lower "
        "token) or position (first in token order)",
        checks::one_of({"probs", "position"}));
}

std::unique_ptr<Router> create(const RouterCreateArgs& args) {
  const double factor = args.options->get_float("capacity_factor");
  if (!(factor > 0) || !std::isfinite(factor)) {
    args.options->fail("capacity_factor", "must be a finite number > 0");
  }
  const CapacityDropPolicy policy = args.options->get_string("drop_policy") == "position"
                                        ? CapacityDropPolicy::kPosition
                                        : CapacityDropPolicy::kProbs;
  auto scratch = std::make_shared<CapacityScratch>();
  return make_token_choice_router(
      args, "capacity",
      [=](RoutingPlan& plan) { return apply_expert_capacity(plan, factor, policy, *scratch); },
      group_limit_from_options(args));
}

}  // namespace
}  // namespace switchyard::capacity

SWITCHYARD_ROUTER_PLUGIN(
    "capacity", "0.1.0",
    "token-choice top-k with a per-expert capacity (drop by probs or position)",
    ::switchyard::capacity::declare_options, ::switchyard::capacity::create)
