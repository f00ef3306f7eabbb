#include "router_support.hpp"

#include "switchyard/plugin.hpp"
#include "switchyard/stream.hpp"

namespace switchyard::test {
namespace {
PluginRegistry& registry() {
  static PluginRegistry r(PluginRegistry::default_search_path());
  return r;
}
}  // namespace

MadeRouter make_router(const std::string& policy, const std::string& settings, int experts,
                       const std::vector<float>& checkpoint_bias) {
  MadeRouter m;
  const Config c = Config::from_string("[router]\n" + settings, "router.toml");
  m.options = c.section("router", registry().options(PluginKind::kRouter, policy));
  RouterCreateArgs args;
  args.options = &m.options;
  args.num_experts = experts;
  args.checkpoint_bias = checkpoint_bias;
  m.router = registry().create_router(policy, args);
  return m;
}

RoutingPlan route_logits(Router& router, std::vector<float> logits, std::int64_t tokens,
                         const Topology* topology) {
  RoutingPlan plan;
  RouteInput in;
  in.logits = TensorView(logits.data(), DType::kF32, {tokens, router.num_experts()});
  in.topology = topology;
  HostStream stream;
  router.route(in, plan, stream);
  return plan;
}

}  // namespace switchyard::test
