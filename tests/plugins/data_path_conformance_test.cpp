// The data-path conformance suite (data_path_conformance.hpp) on the core's host data path,
// on an inline stream and on a queued one (the stream a stream-ordered transport gets), and
// on the pretend device of the fixture plugins. The CUDA data path runs the same suite in
// tests/gpu.
#include <doctest/doctest.h>

#include "data_path_conformance.hpp"
#include "switchyard/plugin.hpp"

using namespace switchyard;

TEST_CASE("the host data path passes the data-path conformance suite") {
  for (const bool queued : {false, true}) {
    CAPTURE(queued);
    auto path = make_host_data_path();
    auto stream = path->create_stream(queued);
    conformance::run_data_path_suite(*path, *stream);
  }
}

TEST_CASE("the pretend device's data path passes the suite: queued streams, device memory") {
  // tests/fixtures/plugins: host memory labelled cuda:0 whose streams run their work later on
  // a thread of their own, so a primitive that writes after it says it has, or a stream
  // that does not wait for another's event, reads or leaves the poison.
  PluginRegistry registry({SWITCHYARD_FIXTURE_PLUGIN_DIR});
  std::shared_ptr<DataPath> path = registry.create_data_path("pretend_cuda", {});
  CHECK(path->device() == Device::cuda(0));
  auto stream = path->create_stream(true);
  conformance::run_data_path_suite(*path, *stream);
}
