// `switchyard plugins` and `switchyard config check|show`.
#include <cstdio>
#include <string>

#include "commands.hpp"
#include "switchyard/plugin.hpp"
#include "switchyard/runtime.hpp"

namespace switchyard::tool {

int plugins_command(const std::vector<std::string>& args) {
  std::vector<std::filesystem::path> dirs;
  for (std::size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--dir" && i + 1 < args.size()) {
      dirs.emplace_back(args[++i]);
    } else {
      std::fprintf(stderr, "usage: switchyard plugins [--dir DIR]...\n");
      return kExitUsage;
    }
  }
  const PluginRegistry registry(PluginRegistry::default_search_path(dirs));
  registry.load_all();  // listing them all is what this command is for
  std::printf("%-10s %-14s %-8s %-12s %s\n", "KIND", "NAME", "VERSION", "STATE", "PATH");
  for (const auto& p : registry.available()) {
    std::printf("%-10s %-14s %-8s %-12s %s\n", std::string(plugin_kind_name(p.kind)).c_str(),
                p.name.c_str(), p.version.c_str(), p.probe.ok() ? "ok" : "unavailable",
                p.path.string().c_str());
    if (!p.probe.ok()) std::printf("           why: %s\n", p.probe.message.c_str());
  }
  if (registry.available().empty()) std::printf("(no plugins found)\n");
  if (!registry.rejected().empty()) {
    std::printf("\nrejected:\n");
    for (const auto& r : registry.rejected()) {
      std::printf("  %s\n    %s: %s\n", r.path.string().c_str(),
                  std::string(error_code_name(r.code)).c_str(), r.reason.c_str());
    }
  }
  std::printf("\nsearched:\n");
  for (const auto& dir : registry.search_path()) {
    std::error_code ec;
    std::printf("  %s%s\n", dir.string().c_str(),
                std::filesystem::is_directory(dir, ec) ? "" : " (missing)");
  }
  return kExitOk;
}

namespace {

void show(const ResolvedConfig& settings) {
  for (const auto& section : settings.sections()) {
    std::printf("[%s]\n", section.name().c_str());
    for (const auto& entry : section.entries()) {
      std::string line = entry.value ? entry.key->name + " = " + format_config_value(*entry.value)
                                     : "# " + entry.key->name + " (unset)";
      std::printf("%-40s # %s; %s\n", line.c_str(), entry.origin.describe().c_str(),
                  entry.key->doc.c_str());
    }
    std::printf("\n");
  }
}

}  // namespace

int config_command(const std::vector<std::string>& args) {
  if (args.size() < 2 || (args[0] != "check" && args[0] != "show")) {
    std::fprintf(stderr,
                 "usage: switchyard config check|show CONFIG [--set section.key=value]...\n");
    return kExitUsage;
  }
  std::vector<std::string> sets;
  for (std::size_t i = 2; i < args.size(); ++i) {
    if (args[i] == "--set" && i + 1 < args.size()) {
      sets.push_back(args[++i]);
    } else {
      std::fprintf(stderr, "switchyard config: unexpected argument '%s'\n", args[i].c_str());
      return kExitUsage;
    }
  }
  const Config config = load_config(args[1], sets);
  if (args[0] == "show") {
    // Only the schemas are needed: no model, no transport, so it works on any machine.
    config.check_sections(config_sections());
    const PluginRegistry registry(
        PluginRegistry::default_search_path(configured_plugin_dirs(config)));
    show(ResolvedConfig(config, registry));
    return kExitOk;
  }
  const Runtime runtime(config);  // builds everything a run would, then stops
  std::printf("%s: ok (%d ranks, %d experts, hidden %d, ffn_hidden %d)\n", args[1].c_str(),
              runtime.world_size(), runtime.model().num_experts(), runtime.model().hidden(),
              runtime.model().ffn_hidden());
  return kExitOk;
}

}  // namespace switchyard::tool
