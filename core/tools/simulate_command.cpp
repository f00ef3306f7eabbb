// `switchyard simulate`: the routing simulator (switchyard/simulator.hpp) on a cluster the
// [simulate] section describes, with a table on stdout, a JSON file and a self-contained
// HTML report.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "commands.hpp"
#include "simulate_report.hpp"
#include "switchyard/io.hpp"
#include "switchyard/plugin.hpp"
#include "switchyard/runtime.hpp"
#include "switchyard/simulator.hpp"

namespace switchyard::tool {
namespace {

constexpr const char* kSimulateUsage =
    "usage: switchyard simulate CONFIG [--json OUT] [--html OUT]\n"
    "                           [--compare SETTING [SETTING ...]] [--set section.key=value]...\n"
    "  routes [simulate] steps of synthetic or recorded logits with the real router plugins\n"
    "  on nodes × gpus_per_node ranks and predicts the dispatch and combine time from a link\n"
    "  model. --compare runs the same logits through several router settings, each\n"
    "  'key=value,key=value' over the [router] section (e.g. policy=topk\n"
    "  policy=node_limited,max_groups=4). --json writes every number, --html a report\n"
    "  that opens in a browser by itself.\n";

using sim::Accounting;
using sim::kNumAccountings;
using Json = nlohmann::ordered_json;

constexpr Accounting kAccountings[kNumAccountings] = {Accounting::kPerExpert, Accounting::kPerRank,
                                                      Accounting::kPerNode};

/// One router setting: its label and the resolved configuration its routers read.
struct Setting {
  std::string label;
  std::shared_ptr<const ResolvedConfig> settings;
  int redundant_experts = -1;  // -1: [simulate] redundant_experts
};

/// The [router] section with "key=value,key=value" applied.
Setting resolve_setting(const Config& base, const std::string& spec,
                        const PluginRegistry& registry) {
  Config config = base;
  int redundant = -1;
  std::size_t start = 0;
  while (start <= spec.size()) {
    const std::size_t comma = spec.find(',', start);
    const std::string item =
        spec.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    if (item.find('=') == std::string::npos || item.front() == '=') {
      std::string message = "--compare '" + spec;
      message += "': expected key=value,key=value over [router], not '";
      message += item;
      message += "'";
      throw Error(ErrorCode::kInvalidArgument, message);
    }
    if (item.rfind("redundant_experts=", 0) == 0) {
      // Not a router key: the placement's copies.
      const auto value = parse_integer_flag("simulate", "--compare redundant_experts",
                                            item.substr(item.find('=') + 1), 0, 1 << 20);
      if (!value) throw Error(ErrorCode::kInvalidArgument, "--compare '" + spec + "': bad value");
      redundant = static_cast<int>(*value);
    } else {
      config.set_from_command_line("router." + item);
    }
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return {spec, std::make_shared<const ResolvedConfig>(config, registry), redundant};
}

std::string human_bytes(double bytes) {
  const char* units[] = {"B", "KB", "MB", "GB", "TB"};
  int u = 0;
  while (bytes >= 1000 && u < 4) {
    bytes /= 1000;
    ++u;
  }
  char text[32];
  std::snprintf(text, sizeof text, "%.3g %s", bytes, units[u]);
  return text;
}

/// Progress on stderr: a bar on a terminal, a line per step otherwise.
class Progress {
 public:
  Progress(int steps, int ranks) : steps_(steps), ranks_(ranks), tty_(isatty(2) == 1) {}
  void update(int step, int rank) {
    if (!tty_) return;
    const int total = steps_ * ranks_, done = step * ranks_ + rank;
    const int width = 40, filled = static_cast<int>(static_cast<long long>(done) * width / total);
    const auto now = std::chrono::steady_clock::now();
    if (filled == last_filled_ && now - last_ < std::chrono::milliseconds(200)) return;
    last_filled_ = filled;
    last_ = now;
    std::fprintf(stderr, "\r[%s%s] step %d/%d, rank %d/%d", std::string(filled, '#').c_str(),
                 std::string(width - filled, ' ').c_str(), step + 1, steps_, rank, ranks_);
    std::fflush(stderr);
  }
  void step_done(int step, double seconds) {
    if (tty_) {
      if (step + 1 == steps_) std::fputs("\n", stderr);
      return;
    }
    std::fprintf(stderr, "simulate: step %d/%d routed in %.2f s\n", step + 1, steps_, seconds);
  }

 private:
  int steps_, ranks_;
  bool tty_;
  int last_filled_ = -1;
  std::chrono::steady_clock::time_point last_{};
};

std::string simulator_logits_description(const ConfigSection& simulate, bool recorded) {
  if (recorded) return simulate.get_path("logits").filename().string();
  return simulate.get_string("logits") + ", " +
         std::to_string(simulate.get_int("tokens_per_rank")) + " tokens per rank, seed " +
         std::to_string(simulate.get_int("seed"));
}

Json link_json(const sim::Link& link) {
  return Json{{"gb_per_s", link.gb_per_s}, {"latency_us", link.latency_us}};
}

/// The numbers of one setting over one step (or all steps: `with_pictures` false).
Json traffic_json(const sim::ClusterSpec& spec, const sim::Traffic& t, int slots,
                  bool with_pictures) {
  Json j;
  j["tokens"] = t.tokens;
  j["assignments"] = t.assignments;
  j["dropped"] = t.dropped;
  j["imbalance"] = t.imbalance();
  j["rank_imbalance"] = t.rank_imbalance();
  j["rank_imbalance_floor"] = t.rank_imbalance_floor;
  j["tokens_per_expert"] = t.tokens_per_expert;
  j["tokens_per_rank"] = t.tokens_per_rank;
  j["tokens_per_node"] = t.tokens_per_node;
  const double tokens = t.tokens > 0 ? static_cast<double>(t.tokens) : 1.0;
  j["nodes_per_token"] = static_cast<double>(t.distinct_nodes) / tokens;
  j["remote_nodes_per_token"] = static_cast<double>(t.remote_nodes) / tokens;
  j["ranks_per_token"] = static_cast<double>(t.distinct_ranks) / tokens;
  j["max_nodes_per_token"] = t.max_nodes_per_token;
  Json accountings = Json::array();
  for (const Accounting a : kAccountings) {
    const sim::ByteSplit bytes = sim::dispatch_bytes(spec, t, a, slots);
    const sim::PhaseTime dispatch = sim::predict(spec, t, a, slots, /*combine=*/false);
    const sim::PhaseTime combine = sim::predict(spec, t, a, slots, /*combine=*/true);
    std::int64_t copies = 0;
    for (const auto c : t.copies[static_cast<int>(a)]) copies += c;
    accountings.push_back(
        Json{{"name", sim::accounting_name(a)},
             {"copies", copies},
             {"intra_node_bytes", bytes.intra},
             {"inter_node_bytes", bytes.inter},
             {"inter_node_bytes_per_token", static_cast<double>(bytes.inter) / tokens},
             {"dispatch_s", dispatch.seconds},
             {"dispatch_bottleneck", dispatch.bottleneck},
             {"combine_s", combine.seconds},
             {"combine_bottleneck", combine.bottleneck}});
  }
  j["accountings"] = accountings;
  if (!with_pictures) {
    // Every accounting's matrices in bytes: node × node, and rank × rank up to 256 ranks.
    Json matrices = Json::object();
    for (const Accounting a : kAccountings) {
      Json m{{"node", sim::node_matrix(spec, t, a, slots)}};
      if (spec.world() <= 256) {
        const std::uint64_t row = sim::dispatch_copy_bytes(spec, a, slots);
        std::vector<std::uint64_t> bytes;
        for (const auto c : t.copies[static_cast<int>(a)]) {
          bytes.push_back(static_cast<std::uint64_t>(c) * row);
        }
        m["rank"] = std::move(bytes);
      }
      matrices[std::string(sim::accounting_name(a))] = std::move(m);
    }
    j["dispatch_bytes"] = std::move(matrices);
    // Per rank and resource, as Switchyard sends (per rank) and two-level (per node).
    Json resources = Json::object();
    for (const Accounting a : {Accounting::kPerRank, Accounting::kPerNode}) {
      Json phases = Json::object();
      for (const bool combine : {false, true}) {
        Json ranks = Json::array();
        for (const auto& r : sim::resource_times(spec, t, a, slots, combine)) {
          ranks.push_back(Json{{"nic_send_s", r.nic_send},
                               {"nic_receive_s", r.nic_receive},
                               {"intra_send_s", r.intra_send},
                               {"intra_receive_s", r.intra_receive}});
        }
        phases[combine ? "combine" : "dispatch"] = std::move(ranks);
      }
      resources[std::string(sim::accounting_name(a))] = std::move(phases);
    }
    j["resource_seconds"] = std::move(resources);
    return j;
  }
  // Rank × rank bytes as Switchyard sends them, or node × node for large clusters.
  const bool by_rank = spec.world() <= 64;
  const auto n = static_cast<std::size_t>(by_rank ? spec.world() : spec.nodes);
  std::vector<std::uint64_t> heat;
  if (by_rank) {
    const std::uint64_t row = sim::dispatch_copy_bytes(spec, Accounting::kPerRank, slots);
    for (const auto c : t.copies[static_cast<int>(Accounting::kPerRank)]) {
      heat.push_back(static_cast<std::uint64_t>(c) * row);
    }
  } else {
    heat = sim::node_matrix(spec, t, Accounting::kPerRank, slots);
  }
  j["heatmap"] = Json{{"by", by_rank ? "rank" : "node"}, {"size", n}, {"bytes", heat}};
  Json sample = Json::array();
  for (const auto& [rank, experts] : t.sample) {
    sample.push_back(Json{{"rank", rank}, {"experts", experts}});
  }
  j["sample"] = sample;
  return j;
}

void print_table(const sim::ClusterSpec& spec, const std::vector<Setting>& settings,
                 const std::vector<sim::Traffic>& totals, const std::vector<int>& slots,
                 int steps) {
  std::printf(
      "%d nodes × %d GPUs (EP groups of %d), %d experts, hidden %lld, %s dispatch, "
      "%s combine, links '%s': intra %.0f GB/s, NIC %.0f GB/s per GPU; %d step%s\n",
      spec.nodes, spec.gpus_per_node, spec.group_size(), spec.num_experts,
      static_cast<long long>(spec.hidden),
      std::string(payload_dtype_name(spec.payload_dtype)).c_str(),
      std::string(dtype_name(spec.combine_dtype)).c_str(), spec.links.name.c_str(),
      spec.links.intra.gb_per_s, spec.links.nic.gb_per_s, steps, steps == 1 ? "" : "s");
  int width = 14;
  for (const auto& setting : settings)
    width = std::max(width, static_cast<int>(setting.label.size()));
  std::printf("%-*s %9s %9s %6s %7s %7s %12s %12s %12s %11s %11s %11s\n", width, "router setting",
              "imbalance", "rank load", "floor", "dropped", "nodes/t", "inter B/tok", "inter B/tok",
              "inter B/tok", "dispatch", "dispatch", "combine");
  std::printf("%-*s %9s %9s %6s %7s %7s %12s %12s %12s %11s %11s %11s\n", width, "", "(experts)",
              "(max/mean)", "", "", "", "per expert", "per rank", "per node", "per rank",
              "per node", "per rank");
  for (std::size_t s = 0; s < settings.size(); ++s) {
    const sim::Traffic& t = totals[s];
    const double tokens = t.tokens > 0 ? static_cast<double>(t.tokens) : 1.0;
    double inter[kNumAccountings];
    for (const Accounting a : kAccountings) {
      inter[static_cast<int>(a)] =
          static_cast<double>(sim::dispatch_bytes(spec, t, a, slots[s]).inter) / tokens;
    }
    const double per_step = 1.0 / steps;
    std::printf(
        "%-*s %9.3f %9.3f %6.3f %7lld %7.2f %12s %12s %12s %9.3fms %9.3fms %9.3fms\n", width,
        settings[s].label.c_str(), t.imbalance(), t.rank_imbalance(), t.rank_imbalance_floor,
        static_cast<long long>(t.dropped), static_cast<double>(t.distinct_nodes) / tokens,
        human_bytes(inter[0]).c_str(), human_bytes(inter[1]).c_str(), human_bytes(inter[2]).c_str(),
        1e3 * per_step * sim::predict(spec, t, Accounting::kPerRank, slots[s], false).seconds,
        1e3 * per_step * sim::predict(spec, t, Accounting::kPerNode, slots[s], false).seconds,
        1e3 * per_step * sim::predict(spec, t, Accounting::kPerRank, slots[s], true).seconds);
  }
  for (std::size_t s = 0; s < settings.size(); ++s) {
    std::printf(
        "%s: dispatch bound by the %s (per rank), the %s (per node)\n", settings[s].label.c_str(),
        sim::predict(spec, totals[s], Accounting::kPerRank, slots[s], false).bottleneck.c_str(),
        sim::predict(spec, totals[s], Accounting::kPerNode, slots[s], false).bottleneck.c_str());
  }
  std::printf("(times are per step: the sum over steps divided by the steps)\n");
}

}  // namespace

int simulate_command(const std::vector<std::string>& args) {
  std::string config_path, json_path, html_path;
  std::vector<std::string> sets, compare;
  for (std::size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--json" && i + 1 < args.size()) {
      json_path = args[++i];
    } else if (args[i] == "--html" && i + 1 < args.size()) {
      html_path = args[++i];
    } else if (args[i] == "--set" && i + 1 < args.size()) {
      sets.push_back(args[++i]);
    } else if (args[i] == "--compare") {
      while (i + 1 < args.size() && args[i + 1].rfind("--", 0) != 0) compare.push_back(args[++i]);
      if (compare.empty()) {
        std::fputs(kSimulateUsage, stderr);
        return kExitUsage;
      }
    } else if (config_path.empty() && args[i].rfind("--", 0) != 0) {
      config_path = args[i];
    } else {
      std::fputs(kSimulateUsage, stderr);
      return kExitUsage;
    }
  }
  if (config_path.empty()) {
    std::fputs(kSimulateUsage, stderr);
    return kExitUsage;
  }

  // Everything is checked before any routing: the config, the cluster, the logits and
  // every router setting.
  const Config config = load_config(config_path, sets);
  const PluginRegistry registry(
      PluginRegistry::default_search_path(configured_plugin_dirs(config)));
  const ResolvedConfig resolved(config, registry);
  const ConfigSection& simulate = resolved.section("simulate");
  const ConfigSection& model = resolved.section("model");
  const ConfigSection& runtime = resolved.section("runtime");

  sim::ClusterSpec spec;
  spec.nodes = static_cast<int>(simulate.get_int("nodes"));
  spec.gpus_per_node = static_cast<int>(simulate.get_int("gpus_per_node"));
  spec.ep_size = static_cast<int>(simulate.get_int("ep_size"));
  spec.hidden = model.get_int("hidden");
  spec.payload_dtype =
      parse_payload_dtype(simulate.has("payload_dtype") ? simulate.get_string("payload_dtype")
                                                        : runtime.get_string("payload_dtype"));
  const std::string combine = simulate.has("combine_dtype") ? simulate.get_string("combine_dtype")
                                                            : runtime.get_string("combine_dtype");
  spec.combine_dtype = combine == "bf16" ? DType::kBF16 : DType::kF32;
  try {
    spec.links = sim::link_preset(simulate.get_string("preset"));
  } catch (const Error& e) {
    simulate.fail("preset", e.message());
  }
  if (simulate.has("intra_gb_per_s"))
    spec.links.intra.gb_per_s = simulate.get_float("intra_gb_per_s");
  if (simulate.has("intra_latency_us")) {
    spec.links.intra.latency_us = simulate.get_float("intra_latency_us");
  }
  if (simulate.has("nic_gb_per_s")) spec.links.nic.gb_per_s = simulate.get_float("nic_gb_per_s");
  if (simulate.has("nic_latency_us"))
    spec.links.nic.latency_us = simulate.get_float("nic_latency_us");
  // The logits: a recorded file (E from its columns) or synthetic (E from [model]).
  const std::string& logits_spec = simulate.get_string("logits");
  const bool recorded = logits_spec.size() > 4 && logits_spec.ends_with(".npy");
  spec.num_experts = static_cast<int>(model.get_int("num_experts"));
  HostTensor recorded_logits;
  if (recorded) {
    recorded_logits = read_npy_f32_matrix(simulate.get_path("logits"), -1, "[simulate] logits");
    const auto E = static_cast<int>(recorded_logits.shape()[1]);
    if (model.origin("num_experts").kind != ConfigOrigin::Kind::kDefault &&
        model.get_int("num_experts") != E) {
      model.fail("num_experts", "is " + std::to_string(model.get_int("num_experts")) + " but " +
                                    simulate.get_path("logits").string() + " has " +
                                    std::to_string(E) + " experts (columns)");
    }
    spec.num_experts = E;
  }
  try {
    sim::validate(spec);
  } catch (const Error& e) {
    throw Error(e.code(), config_path + ": [simulate]: " + e.message());
  }
  std::optional<sim::LogitsSource> logits;
  if (recorded) {
    logits = sim::LogitsSource::recorded(recorded_logits.view(), spec.world());
  } else {
    try {
      logits = sim::LogitsSource::synthetic(logits_spec, spec.num_experts,
                                            simulate.get_int("tokens_per_rank"),
                                            static_cast<std::uint64_t>(simulate.get_int("seed")));
    } catch (const Error& e) {
      simulate.fail("logits", e.message());
    }
  }

  std::vector<Setting> settings;
  if (compare.empty()) {
    // The configuration's own router, labelled by what it sets.
    std::string label = "policy=" + resolved.section("router").get_string("policy");
    for (const auto& entry : resolved.section("router").entries()) {
      if (!entry.value || entry.origin.kind == ConfigOrigin::Kind::kDefault ||
          entry.key->name == "policy") {
        continue;
      }
      std::string value = format_config_value(*entry.value);
      if (value.size() >= 2 && value.front() == '"') value = value.substr(1, value.size() - 2);
      label += "," + entry.key->name + "=" + value;
    }
    settings.push_back({label, std::make_shared<const ResolvedConfig>(config, registry)});
  } else {
    for (const auto& c : compare) settings.push_back(resolve_setting(config, c, registry));
  }
  std::vector<sim::RouterSetting> routers;
  for (const auto& setting : settings) {
    const ConfigSection& router = setting.settings->section("router");
    if (router.has("num_experts") && router.get_int("num_experts") != spec.num_experts) {
      router.fail("num_experts", "is " + std::to_string(router.get_int("num_experts")) +
                                     " but the logits have " + std::to_string(spec.num_experts) +
                                     " experts");
    }
    routers.push_back({setting.label,
                       [&registry, keep = setting.settings, E = spec.num_experts] {
                         const ConfigSection& options = keep->section("router");
                         RouterCreateArgs create;
                         create.options = &options;
                         create.num_experts = E;
                         return registry.create_router(options.get_string("policy"), create);
                       },
                       setting.redundant_experts >= 0
                           ? setting.redundant_experts
                           : static_cast<int>(simulate.get_int("redundant_experts"))});
  }
  sim::Simulator simulator(spec, std::move(*logits), std::move(routers),
                           static_cast<int>(simulate.get_int("sample_tokens")));
  std::vector<int> slots;
  for (std::size_t s = 0; s < settings.size(); ++s) slots.push_back(simulator.slots(s));

  const int steps = static_cast<int>(simulate.get_int("steps"));
  Progress progress(steps, spec.world());
  std::vector<sim::Traffic> totals(settings.size());
  std::vector<Json> step_json(settings.size(), Json::array());
  for (int step = 0; step < steps; ++step) {
    const auto start = std::chrono::steady_clock::now();
    const std::vector<sim::Traffic> traffic =
        simulator.step(step, [&](int done, int) { progress.update(step, done); });
    progress.step_done(
        step, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    for (std::size_t s = 0; s < settings.size(); ++s) {
      totals[s].accumulate(traffic[s]);
      step_json[s].push_back(traffic_json(spec, traffic[s], slots[s], /*with_pictures=*/true));
    }
  }
  print_table(spec, settings, totals, slots, steps);
  // A training step's EP and DP parts (the seed's two roles), and pure DP for comparison.
  const int moe_layers = static_cast<int>(simulate.get_int("moe_layers"));
  const std::int64_t dense_params = simulate.get_int("dense_params");
  const std::int64_t expert_params = simulate.has("expert_params")
                                         ? simulate.get_int("expert_params")
                                         : 3 * spec.hidden * model.get_int("ffn_hidden");
  std::vector<sim::TrainingStep> training;
  for (std::size_t s = 0; s < settings.size(); ++s) {
    training.push_back(sim::predict_training_step(spec, totals[s], slots[s], moe_layers,
                                                  dense_params, expert_params, steps));
    const sim::TrainingStep& t = training.back();
    std::printf(
        "%s: a training step (%d MoE layer%s forward and backward, %lld dense parameters, "
        "%lld per expert): EP part %.3f ms (%s per rank through all-to-all), DP part %.3f ms "
        "(%s per rank all-reduced); pure DP instead: %.3f ms (%s per rank all-reduced)\n",
        settings[s].label.c_str(), moe_layers, moe_layers == 1 ? "" : "s",
        static_cast<long long>(dense_params), static_cast<long long>(expert_params),
        1e3 * t.ep_seconds, human_bytes(static_cast<double>(t.ep_bytes_per_rank)).c_str(),
        1e3 * t.dp_seconds, human_bytes(static_cast<double>(t.dp_bytes_per_rank)).c_str(),
        1e3 * t.pure_dp_seconds,
        human_bytes(static_cast<double>(t.pure_dp_bytes_per_rank)).c_str());
  }

  Json report;
  report["switchyard"] = core_version();
  report["cluster"] = Json{{"nodes", spec.nodes},
                           {"gpus_per_node", spec.gpus_per_node},
                           {"world", spec.world()},
                           {"ep_size", spec.group_size()},
                           {"num_experts", spec.num_experts},
                           {"hidden", spec.hidden},
                           {"payload_dtype", payload_dtype_name(spec.payload_dtype)},
                           {"combine_dtype", dtype_name(spec.combine_dtype)},
                           {"links", Json{{"preset", spec.links.name},
                                          {"intra", link_json(spec.links.intra)},
                                          {"nic", link_json(spec.links.nic)}}}};
  report["logits"] = simulator_logits_description(simulate, recorded);
  report["steps"] = steps;
  Json all = Json::array();
  for (std::size_t s = 0; s < settings.size(); ++s) {
    // EP group 0's slots (the report draws them): each slot's expert; empty: contiguous.
    const ExpertSlotMap& map = simulator.slot_map(0, s);
    const std::vector<int> expert_of_slot =
        map.empty() ? std::vector<int>{}
                    : std::vector<int>(map.expert_of_slot().begin(), map.expert_of_slot().end());
    all.push_back(Json{
        {"label", settings[s].label},
        {"slots", slots[s]},
        {"expert_of_slot", expert_of_slot},
        {"total", traffic_json(spec, totals[s], slots[s], /*with_pictures=*/false)},
        {"training_step", Json{{"moe_layers", moe_layers},
                               {"dense_params", dense_params},
                               {"expert_params", expert_params},
                               {"ep_s", training[s].ep_seconds},
                               {"ep_bytes_per_rank", training[s].ep_bytes_per_rank},
                               {"dp_s", training[s].dp_seconds},
                               {"dp_bytes_per_rank", training[s].dp_bytes_per_rank},
                               {"pure_dp_s", training[s].pure_dp_seconds},
                               {"pure_dp_bytes_per_rank", training[s].pure_dp_bytes_per_rank}}},
        {"steps", std::move(step_json[s])}});
  }
  report["settings"] = std::move(all);
  if (!json_path.empty()) {
    write_file_atomically(json_path, [&](std::ostream& out) { out << report.dump(1) << "\n"; });
    std::printf("wrote %s\n", json_path.c_str());
  }
  if (!html_path.empty()) {
    const std::string html = render_simulation_report(report.dump());
    write_file_atomically(html_path, [&](std::ostream& out) { out << html; });
    std::printf("wrote %s\n", html_path.c_str());
  }
  return kExitOk;
}

}  // namespace switchyard::tool
