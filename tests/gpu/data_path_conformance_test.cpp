// The data-path conformance suite (tests/plugins/data_path_conformance.hpp) on the CUDA data
// path, through the plugin loader, on one of its own streams: the same hand-worked bytes the
// host data path gives.
#include <doctest/doctest.h>

#include "data_path_conformance.hpp"
#include "switchyard/plugin.hpp"

using namespace switchyard;

TEST_CASE("the cuda data path passes the data-path conformance suite") {
  PluginRegistry registry(PluginRegistry::default_search_path());
  DataPathCreateArgs args;
  const std::shared_ptr<DataPath> path = registry.create_data_path("cuda", args);
  REQUIRE(path->device().kind == Device::Kind::kCuda);
  auto stream = path->create_stream(false);
  conformance::run_data_path_suite(*path, *stream);
}
