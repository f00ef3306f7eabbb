// transport_nccl (and datapath_cuda) on the machine at hand. Without a usable GPU (CI): the
// plugins load, `switchyard plugins` lists them with their probe's reason, and selecting one
// ends the run with exit code 1 and that reason. With one: the conformance suite at world 1 on host
// memory (staged through the device); device memory is covered by tests/gpu.
#include <doctest/doctest.h>

#include <string>

#include "switchyard/plugin.hpp"
#include "test_support.hpp"
#include "transport_conformance.hpp"

using namespace switchyard;

namespace {

const PluginInfo* find_nccl(const PluginRegistry& registry) {
  registry.load_all();
  for (const PluginInfo& info : registry.available()) {
    if (info.kind == PluginKind::kTransport && info.name == "nccl") return &info;
  }
  return nullptr;
}

}  // namespace

TEST_CASE("nccl: without a GPU it is listed with the reason and selecting it exits 1") {
  const PluginRegistry registry(PluginRegistry::default_search_path());
  const PluginInfo* nccl = find_nccl(registry);
  REQUIRE_MESSAGE(nccl != nullptr, "the nccl plugin was built but not found");
  if (nccl->probe.ok()) {
    MESSAGE("a CUDA device is usable here; the no-GPU messages are not checked");
    return;
  }
  const std::string why = nccl->probe.message;
  CHECK(why.find("no CUDA device is usable") != std::string::npos);

  const auto listed = test::run_tool("plugins");
  CHECK(listed.exit_code == 0);
  CHECK(listed.output.find("nccl") != std::string::npos);
  CHECK(listed.output.find("why: " + why) != std::string::npos);

  const auto run = test::run_tool("run " SWITCHYARD_SOURCE_DIR
                                  "/examples/configs/demo.toml --set runtime.transport=nccl");
  CHECK(run.exit_code == 1);
  CHECK(run.output.find("no CUDA device is usable") != std::string::npos);

  // The CUDA data path says the same, listed and selected.
  CHECK(listed.output.find("datapath   cuda") != std::string::npos);
  const auto on_gpu = test::run_tool("run " SWITCHYARD_SOURCE_DIR
                                     "/examples/configs/demo.toml --set runtime.data_path=cuda");
  CHECK(on_gpu.exit_code == 1);
  CHECK(on_gpu.output.find("datapath plugin \"cuda\"") != std::string::npos);
  CHECK(on_gpu.output.find("no CUDA device is usable") != std::string::npos);
}

TEST_CASE("nccl: the conformance suite at world 1 on host memory, where a GPU is usable") {
  const PluginRegistry registry(PluginRegistry::default_search_path());
  const PluginInfo* nccl = find_nccl(registry);
  REQUIRE(nccl != nullptr);
  if (!nccl->probe.ok()) {
    MESSAGE("skipped here: " << nccl->probe.message);
    return;
  }
  Config config;
  const ConfigSection options =
      config.section("runtime", registry.options(PluginKind::kTransport, "nccl"));
  TransportCreateArgs args;
  args.options = &options;
  args.timeout_s = 60;
  auto ranks = registry.create_transport("nccl", args);
  REQUIRE(ranks.size() == 1);
  for (const auto& c : conformance::standard_cases()) {
    CAPTURE(c.name);
    HostStream stream;
    c.run(*ranks[0], stream);
  }
}
