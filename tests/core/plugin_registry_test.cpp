#include <doctest/doctest.h>

#include <algorithm>

#include "switchyard/plugin.hpp"
#include "switchyard/status.hpp"
#include "test_support.hpp"

using namespace switchyard;

namespace {

const PluginRejection* rejection(const PluginRegistry& r, const std::string& file) {
  for (const auto& rej : r.rejected()) {
    if (rej.path.filename() == file) return &rej;
  }
  return nullptr;
}

}  // namespace

TEST_CASE("the built plugins load and pass their checks") {
  PluginRegistry registry(PluginRegistry::default_search_path());
  registry.load_all();
  CHECK(registry.rejected().empty());
  CHECK(registry.find(PluginKind::kTransport, "inproc").version == "0.1.0");
  CHECK(registry.find(PluginKind::kRouter, "topk").path.filename() ==
        "libswitchyard-router-topk.so");
  CHECK(registry.find(PluginKind::kExpert, "cpu_swiglu").probe.ok());
  // Transports that need a launcher load, and say why they cannot work outside one.
  std::vector<const char*> launched;
  if (SWITCHYARD_TEST_HAVE_MPI) launched.push_back("mpi");
  if (SWITCHYARD_TEST_HAVE_UCX) launched.push_back("ucx");
  for (const char* name : launched) {
    const auto it = std::find_if(registry.available().begin(), registry.available().end(),
                                 [&](const PluginInfo& p) { return p.name == name; });
    REQUIRE(it != registry.available().end());
    if (!it->probe.ok()) {
      CHECK(it->probe.code == ErrorCode::kUnavailable);
      CHECK(test::error_of([&] { registry.find(PluginKind::kTransport, name); })
                .message()
                .find("launch") != std::string::npos);
    }
  }
  const ConfigSchema topk = registry.options(PluginKind::kRouter, "topk");
  REQUIRE(topk.find("top_k") != nullptr);
  CHECK_FALSE(topk.find("top_k")->doc.empty());
}

TEST_CASE("every broken fixture is rejected with its reason, and the scan goes on") {
  test::TempDir extra;
  // Not ELF at all, and a name that does not follow the convention.
  test::write_text(extra / "libswitchyard-router-garbage.so", "this is not a shared library");
  test::write_text(extra / "libswitchyard-thing.so", "");
  PluginRegistry registry({SWITCHYARD_FIXTURE_PLUGIN_DIR, extra.path(), "/nonexistent/plugins"});
  CHECK(registry.available().empty());  // nothing is loaded before it is asked for
  registry.load_all();

  const auto* wrongabi = rejection(registry, "libswitchyard-router-wrongabi.so");
  REQUIRE(wrongabi != nullptr);
  CHECK(wrongabi->code == ErrorCode::kAbiMismatch);
  CHECK(
      wrongabi->reason.find("exports switchyard_plugin_v99 but this core loads plugin interface 10 "
                            "(switchyard_plugin_v10)") != std::string::npos);

  // Built for interface 1: both versions are named.
  const auto* abiv1 = rejection(registry, "libswitchyard-router-abiv1.so");
  REQUIRE(abiv1 != nullptr);
  CHECK(abiv1->code == ErrorCode::kAbiMismatch);
  CHECK(
      abiv1->reason.find("exports switchyard_plugin_v1 but this core loads plugin interface 10") !=
      std::string::npos);

  // A missing symbol is found at scan time (immediate binding), not at the first call.
  const auto* unresolved = rejection(registry, "libswitchyard-router-unresolved.so");
  REQUIRE(unresolved != nullptr);
  CHECK(unresolved->reason.find("cannot be loaded") != std::string::npos);
  CHECK(unresolved->reason.find("switchyard_fixture_symbol_nobody_defines") != std::string::npos);

  const auto* abifield = rejection(registry, "libswitchyard-router-abifield.so");
  REQUIRE(abifield != nullptr);
  CHECK(abifield->code == ErrorCode::kAbiMismatch);
  CHECK(abifield->reason.find("declares plugin interface 99, this core needs 10") !=
        std::string::npos);

  const auto* otherbuild = rejection(registry, "libswitchyard-router-otherbuild.so");
  REQUIRE(otherbuild != nullptr);
  CHECK(otherbuild->code == ErrorCode::kAbiMismatch);
  CHECK(otherbuild->reason.find("built as \"switchyard 0.0.1; some other compiler\"") !=
        std::string::npos);
  CHECK(otherbuild->reason.find(core_build_id()) != std::string::npos);

  const auto* misnamed = rejection(registry, "libswitchyard-router-misnamed.so");
  REQUIRE(misnamed != nullptr);
  CHECK(misnamed->reason == "declares name \"something_else\" but its file name says \"misnamed\"");

  const auto* kind = rejection(registry, "libswitchyard-router-kindmismatch.so");
  REQUIRE(kind != nullptr);
  CHECK(kind->reason == "declares kind \"expert\" but its file name says \"router\"");

  const auto* noentry = rejection(registry, "libswitchyard-router-noentry.so");
  REQUIRE(noentry != nullptr);
  CHECK(noentry->code == ErrorCode::kNotFound);
  CHECK(noentry->reason.find("does not export the entry point switchyard_plugin_v10") !=
        std::string::npos);

  const auto* garbage = rejection(registry, "libswitchyard-router-garbage.so");
  REQUIRE(garbage != nullptr);
  CHECK(garbage->reason.find("cannot be loaded") != std::string::npos);

  const auto* badname = rejection(registry, "libswitchyard-thing.so");
  REQUIRE(badname != nullptr);
  CHECK(badname->reason.find("libswitchyard-<kind>-<name>.so") != std::string::npos);

  // The throwing fixture is well-formed and loads; only its factory misbehaves. The
  // forwarding data path and the three pretend-device plugins are the good ones there.
  CHECK(registry.available().size() == 5);
  CHECK(registry.find(PluginKind::kRouter, "throws").version == "9.9.9");
  CHECK(registry.find(PluginKind::kDataPath, "forwarding").version == "1.0.0");
  CHECK(registry.find(PluginKind::kDataPath, "pretend_cuda").version == "1.0.0");
  CHECK(registry.find(PluginKind::kTransport, "pretend_device").version == "1.0.0");
  CHECK(registry.find(PluginKind::kExpert, "pretend_swiglu").version == "1.0.0");
}

TEST_CASE("asking for a rejected or missing plugin explains everything in one message") {
  PluginRegistry registry({SWITCHYARD_FIXTURE_PLUGIN_DIR, "/nonexistent/plugins"});
  const Error e = test::error_of([&] { registry.find(PluginKind::kRouter, "wrongabi"); });
  CHECK(e.code() == ErrorCode::kNotFound);
  const std::string m = e.message();
  CHECK(
      m.rfind("router plugin \"wrongabi\" not found (looked for libswitchyard-router-wrongabi.so).",
              0) == 0);
  // The others of the kind are named, not loaded.
  CHECK(m.find("router plugins found: ") != std::string::npos);
  CHECK(m.find(" throws (") != std::string::npos);
  // Its own file's rejection comes first among the rejections.
  const auto first_rejection = m.find("rejected:\n    ");
  REQUIRE(first_rejection != std::string::npos);
  const std::string line =
      m.substr(first_rejection, m.find('\n', first_rejection + 14) - first_rejection);
  CHECK(
      line.find("libswitchyard-router-wrongabi.so: ABI mismatch: exports switchyard_plugin_v99") !=
      std::string::npos);
  CHECK(m.find("searched: " SWITCHYARD_FIXTURE_PLUGIN_DIR " /nonexistent/plugins (missing)") !=
        std::string::npos);

  const Error none = test::error_of([&] { registry.find(PluginKind::kRouter, "topk"); });
  CHECK(none.message().find(" throws (") != std::string::npos);
  (void)registry.find(PluginKind::kRouter, "throws");  // once loaded, with its version
  CHECK(test::error_of([&] { registry.find(PluginKind::kRouter, "topk"); })
            .message()
            .find(" throws 9.9.9 (") != std::string::npos);
  const Error no_kind = test::error_of([&] { registry.find(PluginKind::kTransport, "mpi"); });
  CHECK(no_kind.message().find("transport plugins found: pretend_device (") != std::string::npos);
  const PluginRegistry empty({"/nonexistent/plugins"});
  const Error nothing = test::error_of([&] { empty.find(PluginKind::kTransport, "mpi"); });
  CHECK(nothing.message().find("transport plugins found: none") != std::string::npos);
}

TEST_CASE("a factory that throws is reported, not propagated raw") {
  PluginRegistry registry({SWITCHYARD_FIXTURE_PLUGIN_DIR});
  RouterCreateArgs args;
  args.num_experts = 4;
  const Error e = test::error_of([&] { registry.create_router("throws", args); });
  CHECK(e.code() == ErrorCode::kInternal);
  CHECK(e.message().find("router plugin \"throws\"") != std::string::npos);
  CHECK(e.message().find("threw from its factory instead of returning a status: unexpected "
                         "exception: fixture factory exploded") != std::string::npos);
}

TEST_CASE("the first plugin of a name wins; later ones are recorded as shadowed") {
  const auto builtin = PluginRegistry::default_search_path().back();
  PluginRegistry once({builtin});
  PluginRegistry registry({builtin, builtin});
  once.load_all();
  registry.load_all();
  CHECK(registry.available().size() == once.available().size());
  CHECK(registry.rejected().size() == once.available().size());
  CHECK(registry.rejected()[0].reason.find("shadowed by") != std::string::npos);
}

TEST_CASE("SWITCHYARD_PLUGIN_PATH comes first in the search path") {
  setenv("SWITCHYARD_PLUGIN_PATH", "/first:/second", 1);
  const std::filesystem::path config_dir = "/from/config";
  const auto path = PluginRegistry::default_search_path(std::span(&config_dir, 1));
  unsetenv("SWITCHYARD_PLUGIN_PATH");
  REQUIRE(path.size() == 4);
  CHECK(path[0] == "/first");
  CHECK(path[1] == "/second");
  CHECK(path[2] == "/from/config");
  CHECK(path[3].filename() == "switchyard");
}
