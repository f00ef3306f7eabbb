// `switchyard plan-experts`: where each expert's copies go for a measured load (the
// expert-parallel load balancer), and how even the ranks' load becomes, for an engineer
// deciding how many redundant experts a skewed model needs.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "commands.hpp"
#include "switchyard/expert_balancer.hpp"
#include "switchyard/io.hpp"
#include "switchyard/placement.hpp"
#include "switchyard/plugin.hpp"
#include "switchyard/runtime.hpp"

namespace switchyard::tool {
namespace {

constexpr const char* kPlanUsage =
    "usage: switchyard plan-experts CONFIG --load LOAD.npy --out DIR [--redundant R]\n"
    "                               [--published] [--set section.key=value]...\n"
    "  places the experts of each layer of LOAD (tokens per expert, [E] or [layers, E], any\n"
    "  numeric dtype) on the ranks of CONFIG ([runtime] ranks, ranks_per_node; [router]\n"
    "  num_groups keeps a group's experts on one node) with R redundant copies (default 0;\n"
    "  the slots are rounded up to a multiple of the ranks), and writes DIR/expert_of_slot.npy\n"
    "  and DIR/replica_of_slot.npy (int32 [layers, slots]: rank r holds the slots\n"
    "  [r*S/ranks, (r+1)*S/ranks)), DIR/share_of_slot.npy (float64 [layers, slots]: each\n"
    "  copy's share of its expert's tokens), DIR/copies.npy (int32 [layers, E]) and\n"
    "  DIR/plan.json (each layer's rank loads and imbalance, contiguous and planned).\n"
    "  --published: DeepSeek's placement as published, without the refinement that swaps\n"
    "  copies off overloaded ranks\n";

/// LOAD as float64 [layers, E].
std::vector<std::vector<double>> read_load(const std::string& path) {
  const HostTensor raw = read_npy(path);
  const std::vector<std::int64_t>& shape = raw.shape();
  if (shape.empty() || shape.size() > 2 || shape.back() < 1) {
    throw Error(ErrorCode::kInvalidArgument,
                "--load: " + path + " must hold [E] or [layers, E] loads, E >= 1");
  }
  const std::int64_t layers = shape.size() == 2 ? shape[0] : 1, E = shape.back();
  auto value = [&](std::int64_t i) -> double {
    switch (raw.dtype()) {
      case DType::kF32:
        return raw.data<float>()[i];
      case DType::kF64:
        return raw.data<double>()[i];
      case DType::kI32:
        return raw.data<std::int32_t>()[i];
      case DType::kI64:
        return static_cast<double>(raw.data<std::int64_t>()[i]);
      default:
        throw Error(ErrorCode::kInvalidArgument, "--load: " + path + " is " +
                                                     std::string(dtype_name(raw.dtype())) +
                                                     "; float32, float64, int32 or int64 loads");
    }
  };
  std::vector<std::vector<double>> out(static_cast<std::size_t>(layers));
  for (std::int64_t l = 0; l < layers; ++l) {
    auto& row = out[static_cast<std::size_t>(l)];
    row.resize(static_cast<std::size_t>(E));
    for (std::int64_t e = 0; e < E; ++e) row[static_cast<std::size_t>(e)] = value(l * E + e);
  }
  return out;
}

std::string json_numbers(const std::vector<double>& values) {
  std::string out = "[";
  char number[32];
  for (std::size_t i = 0; i < values.size(); ++i) {
    std::snprintf(number, sizeof number, "%s%.17g", i == 0 ? "" : ", ", values[i]);
    out += number;
  }
  return out + "]";
}

}  // namespace

int plan_experts_command(const std::vector<std::string>& given) {
  std::vector<std::string> args = given;
  const std::string redundant_text = take_optional_flag(args, "--redundant", "0");
  const auto published = std::find(args.begin(), args.end(), "--published");
  const bool refine = published == args.end();
  if (!refine) args.erase(published);
  const auto line = parse_config_command_line(args, {"--load", "--out"}, kPlanUsage);
  if (!line) return kExitUsage;
  const auto redundant =
      parse_integer_flag("plan-experts", "--redundant", redundant_text, 0, 1 << 20);
  if (!redundant) return kExitUsage;

  const Config config = load_config(line->config_path, line->sets);
  config.check_sections(config_sections());
  const PluginRegistry registry(
      PluginRegistry::default_search_path(configured_plugin_dirs(config)));
  const ResolvedConfig settings(config, registry);
  const ConfigSection& runtime = settings.section("runtime");
  const ConfigSection& router = settings.section("router");
  const auto ranks = static_cast<int>(runtime.get_int("ranks"));
  const auto per_node = static_cast<int>(runtime.get_int("ranks_per_node"));
  ExpertBalanceShape shape;
  shape.num_ranks = ranks;
  shape.num_nodes = per_node > 0 ? (ranks + per_node - 1) / per_node : 1;
  // A group-limited policy's groups (node_limited's num_groups); other policies have none.
  for (const ConfigSection::Entry& entry : router.entries()) {
    if (entry.key->name == "num_groups" && entry.value)
      shape.num_groups = std::max(1, static_cast<int>(router.get_int("num_groups")));
  }
  shape.redundant_experts = static_cast<int>(*redundant);
  shape.refine = refine;

  const auto loads = read_load(line->values[0]);
  const auto E = static_cast<std::int64_t>(loads.front().size());
  const ExpertPlacement contiguous(static_cast<int>(E), ranks);
  std::vector<ExpertSlots> plans;
  std::string layers_json;
  for (std::size_t l = 0; l < loads.size(); ++l) {
    const std::vector<double>& load = loads[l];
    plans.push_back(balance_experts(load, shape));
    const ExpertSlots& plan = plans.back();
    std::vector<double> before(static_cast<std::size_t>(ranks), 0.0);
    for (std::int64_t e = 0; e < E; ++e)
      before[static_cast<std::size_t>(contiguous.rank_of(static_cast<int>(e)))] +=
          load[static_cast<std::size_t>(e)];
    const std::vector<double> after = rank_loads(plan, load);
    // No placement of these copies beats the hottest copy's load over the mean.
    double hottest_copy = 0, total = 0;
    for (std::int64_t e = 0; e < E; ++e) {
      const auto at = static_cast<std::size_t>(e);
      hottest_copy = std::max(hottest_copy, load[at] / plan.copies[at]);
      total += load[at];
    }
    const double floor =
        total > 0 ? std::max(1.0, hottest_copy * static_cast<double>(ranks) / total) : 0.0;
    std::printf(
        "layer %zu: %lld experts on %d slots (%d per rank, %d ranks, %d nodes): imbalance "
        "%.3f contiguous, %.3f planned (floor of these copies %.3f)\n",
        l, static_cast<long long>(E), plan.num_slots(), plan.slots_per_rank, ranks, shape.num_nodes,
        load_imbalance(before), load_imbalance(after), floor);
    char numbers[160];
    std::snprintf(numbers, sizeof numbers,
                  "\"imbalance_contiguous\": %.17g, \"imbalance_planned\": %.17g, "
                  "\"floor\": %.17g",
                  load_imbalance(before), load_imbalance(after), floor);
    layers_json += std::string(l == 0 ? "" : ",\n") +
                   "    {\"rank_load_contiguous\": " + json_numbers(before) +
                   ", \"rank_load_planned\": " + json_numbers(after) + ", " + numbers + "}";
  }
  const auto layers = static_cast<std::int64_t>(plans.size());
  const std::int64_t S = plans.front().num_slots();
  std::vector<std::int32_t> expert_of_slot, replica_of_slot, copies;
  std::vector<double> shares;
  for (const ExpertSlots& plan : plans) {
    shares.insert(shares.end(), plan.share_of_slot.begin(), plan.share_of_slot.end());
    expert_of_slot.insert(expert_of_slot.end(), plan.expert_of_slot.begin(),
                          plan.expert_of_slot.end());
    replica_of_slot.insert(replica_of_slot.end(), plan.replica_of_slot.begin(),
                           plan.replica_of_slot.end());
    copies.insert(copies.end(), plan.copies.begin(), plan.copies.end());
  }
  const std::filesystem::path dir(line->values[1]);
  std::filesystem::create_directories(dir);
  write_npy(dir / "expert_of_slot.npy",
            TensorView(expert_of_slot.data(), DType::kI32, {layers, S}));
  write_npy(dir / "replica_of_slot.npy",
            TensorView(replica_of_slot.data(), DType::kI32, {layers, S}));
  write_npy(dir / "copies.npy", TensorView(copies.data(), DType::kI32, {layers, E}));
  write_npy(dir / "share_of_slot.npy", TensorView(shares.data(), DType::kF64, {layers, S}));
  const std::string json =
      "{\n  \"ranks\": " + std::to_string(ranks) +
      ",\n  \"nodes\": " + std::to_string(shape.num_nodes) +
      ",\n  \"groups\": " + std::to_string(shape.num_groups) +
      ",\n  \"slots_per_rank\": " + std::to_string(plans.front().slots_per_rank) +
      ",\n  \"layers\": [\n" + layers_json + "\n  ]\n}\n";
  write_file_atomically(dir / "plan.json", [&](std::ostream& out) { out << json; });
  return kExitOk;
}

}  // namespace switchyard::tool
