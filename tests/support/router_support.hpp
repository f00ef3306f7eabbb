#pragma once
// Router plugins made through the real loader from a [router] snippet, and routing of
// logits given as a vector: what every router test needs.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "switchyard/config.hpp"
#include "switchyard/router.hpp"

namespace switchyard::test {

/// A router and the configuration section it was made from (it must outlive the router).
struct MadeRouter {
  ConfigSection options;
  std::shared_ptr<Router> router;
};

/// The `policy` plugin from the standard search path, configured by `settings` (lines of
/// a [router] section) for `experts` experts.
MadeRouter make_router(const std::string& policy, const std::string& settings, int experts,
                       const std::vector<float>& checkpoint_bias = {});

/// Routes `logits` [tokens, E] on a host stream.
RoutingPlan route_logits(Router& router, std::vector<float> logits, std::int64_t tokens,
                         const Topology* topology = nullptr);

/// A plan buffer's elements, to compare with expected vectors.
template <typename T>
std::vector<T> values(const Buffer<T>& b) {
  return {b.begin(), b.end()};
}

}  // namespace switchyard::test
