// router_topk: the `topk` policy of docs/routing.md (softmax or sigmoid scores, optional
// selection bias, normalisation, scale), with its statistics and bias balancing. The
// algorithm is the core's token-choice routing (token_choice_router.hpp), with no limit.
#include "switchyard/plugin.hpp"
#include "switchyard/token_choice_router.hpp"

namespace switchyard::topk {
namespace {

std::unique_ptr<Router> create(const RouterCreateArgs& args) {
  return make_token_choice_router(args, "topk");
}

}  // namespace
}  // namespace switchyard::topk

SWITCHYARD_ROUTER_PLUGIN("topk", "0.1.0", "top-k of softmax or sigmoid scores, with optional bias",
                         ::switchyard::declare_token_choice_options, ::switchyard::topk::create)
