// The data-path conformance suite (data_path_conformance.hpp) on the core's host data path,
// on an inline stream and on a queued one (the stream a stream-ordered transport gets). The
// CUDA data path runs the same suite in tests/gpu.
#include <doctest/doctest.h>

#include "data_path_conformance.hpp"

using namespace switchyard;

TEST_CASE("the host data path passes the data-path conformance suite") {
  for (const bool queued : {false, true}) {
    CAPTURE(queued);
    auto path = make_host_data_path();
    auto stream = path->create_stream(queued);
    conformance::run_data_path_suite(*path, *stream);
  }
}
