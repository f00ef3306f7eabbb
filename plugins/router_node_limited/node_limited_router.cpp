// router_node_limited: the `node_limited` policy of ROUTING.md (DeepSeek-V3 group-limited
// routing): per token keep the max_groups best groups of experts, then the token-choice
// top-k among them. Groups are the nodes of the EP group's placement when it spans several
// nodes (so max_groups bounds the nodes a token's dispatch reaches), or num_groups blocks.
#include "switchyard/plugin.hpp"
#include "switchyard/token_choice_router.hpp"

namespace switchyard::node_limited {
namespace {

void declare_options(ConfigSchema& s) {
  declare_token_choice_options(s);
  s.add("num_groups", ConfigType::kInt, ConfigValue{std::int64_t{0}},
        "G: groups of E/G consecutive experts (must divide E); 0: the nodes of the placement",
        checks::int_range(0, 1 << 16));
  s.add("max_groups", ConfigType::kInt, ConfigValue{std::int64_t{1}},
        "M: groups (nodes) a token may use, 1..G, with M groups holding at least top_k experts",
        checks::int_range(1, 1 << 16));
  s.add("group_score", ConfigType::kString, std::nullopt,
        "max, top2_sum or topk_sum (of the k/M largest); default top2_sum with a bias, else max",
        checks::one_of({"max", "top2_sum", "topk_sum"}));
}

std::unique_ptr<Router> create(const RouterCreateArgs& args) {
  const ConfigSection& o = *args.options;
  GroupLimit groups;
  groups.num_groups = static_cast<int>(o.get_int("num_groups"));
  groups.max_groups = static_cast<int>(o.get_int("max_groups"));
  const bool has_bias = o.has("bias") || !args.checkpoint_bias.empty();
  const std::string score =
      o.has("group_score") ? o.get_string("group_score") : (has_bias ? "top2_sum" : "max");
  groups.score = score == "max"        ? GroupScore::kMax
                 : score == "top2_sum" ? GroupScore::kTop2Sum
                                       : GroupScore::kTopkSum;
  return make_token_choice_router(args, "node_limited", {}, groups);
}

}  // namespace
}  // namespace switchyard::node_limited

SWITCHYARD_ROUTER_PLUGIN("node_limited", "0.1.0",
                         "token-choice top-k within the best max_groups groups (nodes) per token",
                         ::switchyard::node_limited::declare_options,
                         ::switchyard::node_limited::create)
