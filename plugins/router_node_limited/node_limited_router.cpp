// router_node_limited: the `node_limited` policy of docs/routing.md (DeepSeek-V3 group-limited
// routing): per token keep the max_groups best groups of experts, then the token-choice
// top-k among them. Groups are the nodes of the EP group's placement when it spans several
// nodes (so max_groups bounds the nodes a token's dispatch reaches), or num_groups blocks.
#include "switchyard/plugin.hpp"
#include "switchyard/token_choice_router.hpp"

namespace switchyard::node_limited {
namespace {

void declare_options(ConfigSchema& s) {
  declare_token_choice_options(s);
  declare_group_limit_options(s, 0);
}

std::unique_ptr<Router> create(const RouterCreateArgs& args) {
  return make_token_choice_router(args, "node_limited", {}, group_limit_from_options(args));
}

}  // namespace
}  // namespace switchyard::node_limited

SWITCHYARD_ROUTER_PLUGIN("node_limited", "0.1.0",
                         "token-choice top-k within the best max_groups groups (nodes) per token",
                         ::switchyard::node_limited::declare_options,
                         ::switchyard::node_limited::create)
