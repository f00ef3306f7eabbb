#pragma once
// The transport conformance suite: every case runs on every rank of a communicator and
// checks what that rank sees. A transport's test supplies a driver that runs a case on
// N ranks (threads for inproc; processes for multi-process transports).

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "switchyard/transport.hpp"

namespace switchyard::conformance {

/// A case: runs on one rank, with that rank's stream. Cases synchronize the stream before
/// they read results, so they hold for stream-ordered transports too.
using Case = std::function<void(Transport&, Stream&)>;

struct NamedCase {
  std::string name;
  Case run;
};

/// The cases every transport must pass on a healthy communicator, in order.
std::vector<NamedCase> standard_cases();

}  // namespace switchyard::conformance
