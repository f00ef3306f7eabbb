// `switchyard route`: the [router] section applied to logits from a file, for researchers
// comparing policies without a model or a transport.
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "commands.hpp"
#include "switchyard/io.hpp"
#include "switchyard/plugin.hpp"
#include "switchyard/runtime.hpp"
#include "switchyard/stream.hpp"

namespace switchyard::tool {
namespace {

constexpr const char* kRouteUsage =
    "usage: switchyard route CONFIG --logits L.npy --out DIR [--token-ids IDS.npy]\n"
    "                        [--set section.key=value]...\n"
    "  routes float32 logits [T,E] with the [router] section of CONFIG (a file holding only\n"
    "  [router] is enough; [runtime] ranks and ranks_per_node give the placement; a policy\n"
    "  that routes by token id, hash, takes the tokens' ids, int32 or int64 [T]) and writes\n"
    "  DIR/experts.npy (int32 [T,K]), DIR/weights.npy (float32 [T,K]), DIR/counts.npy\n"
    "  (int64 [E]), DIR/stats.json, and with bias_update_rate > 0 DIR/bias.npy (the bias\n"
    "  after one update from these counts)\n";

std::string json_array(const std::vector<std::int64_t>& values) {
  std::string out = "[";
  for (std::size_t i = 0; i < values.size(); ++i) {
    if (i != 0) out += ", ";
    out += std::to_string(values[i]);
  }
  return out + "]";
}

}  // namespace

int route_command(const std::vector<std::string>& given) {
  // The one optional flag, taken out before the required ones are parsed.
  std::vector<std::string> args = given;
  const std::string token_ids_path = take_optional_flag(args, "--token-ids", "");
  const auto line = parse_config_command_line(args, {"--logits", "--out"}, kRouteUsage);
  if (!line) return kExitUsage;
  const std::string& logits_path = line->values[0];
  const std::string& out_dir = line->values[1];

  const Config config = load_config(line->config_path, line->sets);
  config.check_sections(config_sections());
  const PluginRegistry registry(
      PluginRegistry::default_search_path(configured_plugin_dirs(config)));
  const ResolvedConfig settings(config, registry);
  const ConfigSection& router_options = settings.section("router");
  const ConfigSection& runtime_options = settings.section("runtime");

  const HostTensor logits = read_npy_f32_matrix(logits_path, -1, "--logits");
  const std::int64_t T = logits.shape()[0];
  const auto E = static_cast<int>(logits.shape()[1]);
  if (router_options.has("num_experts") && router_options.get_int("num_experts") != E) {
    router_options.fail("num_experts",
                        "is " + std::to_string(router_options.get_int("num_experts")) + " but " +
                            logits_path + " has " + std::to_string(E) + " experts (columns)");
  }
  RouterCreateArgs router_args;
  router_args.options = &router_options;
  router_args.num_experts = E;
  const auto router = registry.create_router(router_options.get_string("policy"), router_args);

  // The placement node-limited policies see: [runtime] ranks, in nodes of ranks_per_node.
  const int ranks = static_cast<int>(runtime_options.get_int("ranks"));
  const int per_node = static_cast<int>(runtime_options.get_int("ranks_per_node"));
  const Topology topology = Topology::uniform(ranks, per_node > 0 ? per_node : ranks);
  RouteInput input;
  input.logits = logits.view();
  input.topology = &topology;
  HostTensor token_ids;
  if (!token_ids_path.empty()) {
    token_ids = read_npy(token_ids_path);
    if ((token_ids.dtype() != DType::kI32 && token_ids.dtype() != DType::kI64) ||
        token_ids.shape() != std::vector<std::int64_t>{T}) {
      throw Error(ErrorCode::kInvalidArgument, "--token-ids: " + token_ids_path +
                                                   " must be int32 or int64 [" + std::to_string(T) +
                                                   "] (one id per row of the logits)");
    }
    input.token_ids = token_ids.view();
  }
  RoutingPlan plan;
  HostStream stream;
  router->route(input, plan, stream);
  stream.synchronize();

  const std::filesystem::path dir(out_dir);
  std::filesystem::create_directories(dir);
  const std::int64_t K = plan.slots;
  write_npy(dir / "experts.npy", TensorView(plan.experts.data(), DType::kI32, {T, K}));
  write_npy(dir / "weights.npy", TensorView(plan.weights.data(), DType::kF32, {T, K}));
  write_npy(dir / "counts.npy",
            TensorView(plan.counts.data(), DType::kI64, {static_cast<std::int64_t>(E)}));
  const RouterStats& stats = router->stats();
  // Every number with full precision (%.17g round-trips a double).
  char numbers[256];
  std::snprintf(numbers, sizeof numbers,
                "  \"dropped\": %lld,\n  \"imbalance\": %.17g,\n  \"aux_loss\": %.17g,\n"
                "  \"z_loss\": %.17g\n",
                static_cast<long long>(stats.dropped), stats.imbalance, stats.aux_loss,
                stats.z_loss);
  const std::string json = "{\n  \"counts\": " + json_array(stats.counts) + ",\n" + numbers + "}\n";
  write_file_atomically(dir / "stats.json", [&](std::ostream& out) { out << json; });

  std::printf(
      "routed %lld tokens over %d experts with %s (K = %lld): imbalance %.3f, dropped "
      "%lld, aux_loss %.4f, z_loss %.4f\n",
      static_cast<long long>(T), E, router->name().c_str(), static_cast<long long>(K),
      stats.imbalance, static_cast<long long>(stats.dropped), stats.aux_loss, stats.z_loss);
  if (router->updates_from_counts()) {
    router->update(stats.counts);
    const auto bias = router->bias();
    write_npy(dir / "bias.npy", TensorView(const_cast<float*>(bias.data()), DType::kF32,
                                           {static_cast<std::int64_t>(bias.size())}));
  }
  std::printf("wrote %s\n", dir.string().c_str());
  return kExitOk;
}

}  // namespace switchyard::tool
