// The fault suite, plugin part: a library planted in a searched folder runs no code unless
// a configuration selects it from a trusted folder. The planted library is the marker
// fixture, whose constructor creates a file when (and only when) it is loaded.
#include <doctest/doctest.h>
#include <sys/stat.h>

#include <chrono>
#include <filesystem>
#include <string>

#include "test_support.hpp"

using namespace switchyard;

namespace {

const std::string kTool = SWITCHYARD_TOOL_PATH;
const std::filesystem::path kMarkerPlugin =
    std::filesystem::path(SWITCHYARD_FIXTURE_PLUGIN_DIR).parent_path() / "marker_plugin" /
    "libswitchyard-router-marker.so";

/// A folder holding a copy of the marker plugin, and the file its constructor would create.
struct PlantedFolder {
  test::TempDir dir;
  std::filesystem::path plugins = dir / "plugins";
  std::filesystem::path marker = dir / "loaded";
  PlantedFolder() {
    std::filesystem::create_directory(plugins);
    std::filesystem::permissions(plugins, std::filesystem::perms(0755));
    std::filesystem::copy_file(kMarkerPlugin, plugins / kMarkerPlugin.filename());
    std::filesystem::permissions(plugins / kMarkerPlugin.filename(), std::filesystem::perms(0755));
  }
  test::CommandResult tool(const std::string& arguments) const {
    return test::run_command("SWITCHYARD_TEST_MARKER=" + marker.string() + " " + kTool + " " +
                             arguments + " 2>&1");
  }
};

}  // namespace

TEST_CASE("run and config check load only the plugins the configuration selects") {
  PlantedFolder planted;
  test::write_text(planted.dir / "moe.toml",
                   "[runtime]\nplugin_dirs = [\"plugins\"]\nranks = 2\n[model]\nnum_experts = 4\n"
                   "hidden = 8\nffn_hidden = 8\n[input]\nnum_tokens = 6\n");
  const auto check = planted.tool("config check " + (planted.dir / "moe.toml").string());
  INFO(check.output);
  CHECK(check.exit_code == 0);
  const auto run = planted.tool("run " + (planted.dir / "moe.toml").string());
  INFO(run.output);
  CHECK(run.exit_code == 0);
  CHECK_FALSE(std::filesystem::exists(planted.marker));
  // Listing every plugin is what `plugins` is for: there, a trusted folder's files load.
  const auto list = planted.tool("plugins --dir " + planted.plugins.string());
  CHECK(std::filesystem::exists(planted.marker));
}

TEST_CASE("a folder others can write is not searched, and its files never load") {
  PlantedFolder planted;
  std::filesystem::permissions(planted.plugins, std::filesystem::perms(0777));
  const auto list = planted.tool("plugins --dir " + planted.plugins.string());
  INFO(list.output);
  CHECK(list.exit_code == 0);
  CHECK(list.output.find(planted.plugins.string()) != std::string::npos);
  CHECK(list.output.find("folder not searched: folder is writable by group or others") !=
        std::string::npos);
  CHECK_FALSE(std::filesystem::exists(planted.marker));
  // A trusted folder inside it is not trusted either: its parent can swap it.
  std::filesystem::create_directory(planted.plugins / "inner");
  std::filesystem::permissions(planted.plugins / "inner", std::filesystem::perms(0755));
  std::filesystem::copy_file(planted.plugins / kMarkerPlugin.filename(),
                             planted.plugins / "inner" / kMarkerPlugin.filename());
  const auto inner = planted.tool("plugins --dir " + (planted.plugins / "inner").string());
  INFO(inner.output);
  CHECK(inner.output.find("which is writable by group or others") != std::string::npos);
  CHECK_FALSE(std::filesystem::exists(planted.marker));
}

TEST_CASE("a plugin file others can write is refused") {
  PlantedFolder planted;
  std::filesystem::permissions(planted.plugins / kMarkerPlugin.filename(),
                               std::filesystem::perms(0666));
  const auto list = planted.tool("plugins --dir " + planted.plugins.string());
  INFO(list.output);
  CHECK(list.output.find("not loaded: file is writable by group or others") != std::string::npos);
  CHECK_FALSE(std::filesystem::exists(planted.marker));
}

TEST_CASE("a FIFO named like a plugin is refused without being opened") {
  PlantedFolder planted;
  std::filesystem::remove(planted.plugins / kMarkerPlugin.filename());
  REQUIRE(::mkfifo((planted.plugins / "libswitchyard-router-fifo.so").c_str(), 0600) == 0);
  const auto start = std::chrono::steady_clock::now();
  const auto list = planted.tool("plugins --dir " + planted.plugins.string());
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  INFO(list.output);
  CHECK(list.exit_code == 0);
  CHECK(list.output.find("libswitchyard-router-fifo.so\n    unavailable: not loaded: not a "
                         "regular file") != std::string::npos);
  CHECK(seconds < 10);
}
