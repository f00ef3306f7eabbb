// The core's configuration keys. Plugin keys are declared by the plugins themselves.
#include <array>
#include <tuple>
#include <vector>

#include "switchyard/runtime.hpp"
#include "switchyard/status.hpp"

namespace switchyard {

std::span<const std::string_view> config_sections() noexcept {
  static constexpr std::array<std::string_view, 8> kSections = {
      "runtime", "router", "experts", "model", "input", "output", "check", "simulate"};
  return kSections;
}

ConfigSchema core_schema(std::string_view section) {
  using T = ConfigType;
  ConfigSchema s;
  if (section == "runtime") {
    s.add("transport", T::kString, ConfigValue{std::string("inproc")},
          "transport plugin: inproc (ranks as threads of this process), mpi (under mpirun), ucx "
          "(under switchyard launch), nccl (one GPU per rank, under switchyard launch, mpirun or "
          "torchrun; with data_path = cuda)");
    s.add("ranks", T::kInt, ConfigValue{std::int64_t{1}},
          "number of ranks for the inproc transport (other transports take it from the launcher)",
          checks::int_range(1, 1024));
    s.add("ep_size", T::kInt, ConfigValue{std::int64_t{0}},
          "ranks per expert-parallel group; must divide the world size (0: the whole world)",
          checks::int_range(0, 1 << 20));
    s.add("ranks_per_node", T::kInt, ConfigValue{std::int64_t{0}},
          "emulate nodes of this many consecutive ranks (0: all ranks of a host on one node)",
          checks::int_range(0, 1 << 20));
    s.add("timeout_s", T::kFloat, ConfigValue{300.0},
          "bound in seconds on every wait for a peer; a missing peer is an error after it (at "
          "most a week)",
          checks::seconds_up_to(kMaxTimeoutSeconds));
    s.add("data_path", T::kString, ConfigValue{std::string("host")},
          "where the layer's data path (logits, layout, pack, group, reduce, sum) runs: host "
          "(built into the core) or a datapath plugin");
    s.add("payload_dtype", T::kString, ConfigValue{std::string("f32")},
          "dtype of dispatched token rows: f32, bf16, or fp8 (E4M3, one f32 scale per 128 "
          "elements)",
          checks::one_of({"f32", "bf16", "fp8"}));
    s.add("combine_dtype", T::kString, ConfigValue{std::string("f32")},
          "dtype of the partial sums sent back in the combine: f32 or bf16",
          checks::one_of({"f32", "bf16"}));
    s.add("expert_alignment", T::kInt, ConfigValue{std::int64_t{1}},
          "dispatch for the caller's experts: each local expert's received rows start at a "
          "multiple of this (zero rows between), for grouped GEMMs",
          checks::int_range(1, 4096));
    s.add("max_tokens_per_rank", T::kInt, ConfigValue{std::int64_t{0}},
          "the worst-case mode when > 0: no rank forwards more tokens than this, so every "
          "exchange moves fixed blocks of this many rows per peer and the host reads nothing "
          "back (a device forward without a host wait; checks come after the step); 0: off",
          checks::int_range(0, std::int64_t{1} << 30));
    s.add("combine_order", T::kString, ConfigValue{std::string{"rank"}},
          "how y sums a token's expert outputs: \"rank\" (each expert rank returns one partial "
          "sum per token, summed in rank order: fewest bytes) or \"slot\" (every kept slot's "
          "output returned and summed in routing order: the same bits for every placement of "
          "the experts, for up to K / ranks-per-token times the combine's bytes; host data path)",
          checks::one_of({"rank", "slot"}));
    s.add("redundant_experts", T::kInt, ConfigValue{std::int64_t{0}},
          "extra expert copies per EP group (0: one slot per expert, contiguous): the slots, "
          "E + this rounded up to a multiple of the EP size, are placed by the expert "
          "balancer, from an even load until Runtime::rebalance measures one",
          checks::int_range(0, 1 << 20));
    s.add("placement", T::kString, ConfigValue{std::string{}},
          "a folder written by `switchyard plan-experts` (expert_of_slot.npy, share_of_slot.npy: "
          "one row per MoE layer, or one row for all): the experts' slots on the EP group's "
          "ranks; empty: contiguous (or placed for redundant_experts)");
    s.add("chunks", T::kInt, ConfigValue{std::int64_t{1}},
          "split each step's tokens into this many chunks and pipeline them: one chunk's "
          "exchange overlaps another's experts (same results for every value; host data path)",
          checks::int_range(1, 1024));
    s.add("overlap", T::kBool, ConfigValue{true},
          "with chunks: run the exchanges on a thread of their own, overlapping the other "
          "chunks' work (true), or on the calling thread, chunk after chunk (false: for "
          "machines where every core already runs a rank; the chunks' rows stay in the caches)");
    s.add("recompute", T::kBool, ConfigValue{false},
          "training (Runtime::set_training): false keeps the received rows and the experts' "
          "projections from the forward for the backward (memory: per rank A x (H + 2 F) "
          "floats for its A received (row, expert) pairs; the forward then runs unchunked); "
          "true keeps only the routing and recomputes the rest (the backward dispatches x "
          "again and runs the projections again)");
    s.add("plugin_dirs", T::kStringList, ConfigValue{std::vector<std::string>{}},
          "extra plugin folders, searched after SWITCHYARD_PLUGIN_PATH and before the install's");
  } else if (section == "router") {
    s.add("policy", T::kString, ConfigValue{std::string("topk")},
          "routing policy plugin (see docs/routing.md)");
    s.add("num_experts", T::kInt, std::nullopt,
          "E, optional: when set it must equal the model's (or, for switchyard route, the "
          "logits' columns)",
          checks::int_range(1, 1 << 16));
  } else if (section == "experts") {
    s.add("kernel", T::kString, ConfigValue{std::string("cpu_swiglu")}, "expert kernel plugin");
  } else if (section == "model") {
    s.add("weights", T::kString, std::nullopt,
          "the checkpoint: a safetensors file, a sharded checkpoint's "
          "model.safetensors.index.json, or a folder holding either; unset: random weights "
          "from seed");
    s.add("format", T::kString, ConfigValue{std::string("mixtral")},
          "tensor names in the checkpoint: mixtral or deepseek (also Qwen-MoE)",
          checks::one_of({"mixtral", "deepseek"}));
    s.add("prefix", T::kString, ConfigValue{std::string()},
          "prefix of a layer's tensor names, e.g. model.layers.3.block_sparse_moe.; {layer} "
          "stands for the layer's number (model.layers.{layer}.mlp.)");
    s.add("layers", T::kString, ConfigValue{std::string()},
          "the model's MoE layers, run in this order: numbers and ranges, e.g. \"3-60\" or "
          "\"0,2,4\" (empty: one layer; random weights draw each layer from seed and its "
          "number)");
    s.add("residual", T::kBool, ConfigValue{false},
          "true: each layer of the chain adds its input to its output (a transformer's "
          "residual stream: h + MoE(h)), in run, backward and the model's forward, backward "
          "and reference; false: the output of layer l is the input of layer l+1");
    s.add("num_experts", T::kInt, ConfigValue{std::int64_t{8}},
          "E for random weights (with a checkpoint: taken from it, must agree if set)",
          checks::int_range(1, 1 << 16));
    s.add("hidden", T::kInt, ConfigValue{std::int64_t{64}},
          "H for random weights (with a checkpoint: taken from it, must agree if set)",
          checks::int_range(1, 1 << 20));
    s.add("ffn_hidden", T::kInt, ConfigValue{std::int64_t{128}},
          "F, the expert's inner width, for random weights (with a checkpoint: must agree if set)",
          checks::int_range(1, 1 << 22));
    s.add("seed", T::kInt, ConfigValue{std::int64_t{1}}, "seed of the random weights");
    s.add("dtype", T::kString, ConfigValue{std::string("f32")},
          "dtype of the random expert weights: f32, or bf16 (the same draw rounded); a "
          "checkpoint keeps its own",
          checks::one_of({"f32", "bf16"}));
  } else if (section == "input") {
    s.add("tokens", T::kString, std::nullopt,
          ".npy file of float32 tokens [T,H]; unset: num_tokens synthetic tokens");
    s.add("num_tokens", T::kInt, ConfigValue{std::int64_t{64}}, "T of the synthetic tokens",
          checks::int_range(0, std::int64_t{1} << 40));
    s.add("seed", T::kInt, ConfigValue{std::int64_t{2}}, "seed of the synthetic tokens");
  } else if (section == "output") {
    s.add("path", T::kString, std::nullopt,
          ".npy file that receives the float32 result [T,H] in input row order");
  } else if (section == "check") {
    s.add("tolerance", T::kFloat, ConfigValue{1e-5},
          "--check fails when max|y - reference| / max|reference| exceeds this",
          checks::positive());
  } else if (section == "simulate") {
    // `switchyard simulate` (docs/simulator.md); the layer's shape comes from [model].
    s.add("nodes", T::kInt, ConfigValue{std::int64_t{1}}, "nodes of the simulated cluster",
          checks::int_range(1, 1 << 14));
    s.add("gpus_per_node", T::kInt, ConfigValue{std::int64_t{8}}, "ranks (GPUs) per node",
          checks::int_range(1, 1024));
    s.add("ep_size", T::kInt, ConfigValue{std::int64_t{0}},
          "ranks per expert-parallel group; must divide nodes × gpus_per_node (0: all of them)",
          checks::int_range(0, 1 << 16));
    s.add("tokens_per_rank", T::kInt, ConfigValue{std::int64_t{4096}},
          "tokens each rank routes per step (synthetic logits)",
          checks::int_range(1, std::int64_t{1} << 24));
    s.add("redundant_experts", T::kInt, ConfigValue{std::int64_t{0}},
          "redundant expert copies per EP group, placed by the expert-parallel load balancer "
          "from the first step's load (0: the contiguous placement); also a --compare key",
          checks::int_range(0, 1 << 20));
    s.add("steps", T::kInt, ConfigValue{std::int64_t{1}}, "steps to simulate",
          checks::int_range(1, 10000));
    s.add("logits", T::kString, ConfigValue{std::string("normal")},
          "router logits: normal, zipf:S (skewed popularity), hot:N:DELTA (N favoured experts), "
          "or a .npy file of float32 [T,E] split over the ranks");
    s.add("seed", T::kInt, ConfigValue{std::int64_t{1}}, "seed of the synthetic logits");
    s.add("payload_dtype", T::kString, std::nullopt,
          "dtype of dispatched rows: f32, bf16 or fp8 (default: [runtime] payload_dtype)",
          checks::one_of({"f32", "bf16", "fp8"}));
    s.add("combine_dtype", T::kString, std::nullopt,
          "dtype of the rows sent back: f32 or bf16 (default: [runtime] combine_dtype)",
          checks::one_of({"f32", "bf16"}));
    s.add("preset", T::kString, ConfigValue{std::string("h800")},
          "link model: h800, h100, b200 or cpu (the keys below override its numbers)");
    s.add("intra_gb_per_s", T::kFloat, std::nullopt,
          "intra-node bandwidth per GPU and direction, GB/s (1e9 bytes/s)", checks::positive());
    s.add("intra_latency_us", T::kFloat, std::nullopt, "intra-node latency per phase, us");
    s.add("nic_gb_per_s", T::kFloat, std::nullopt,
          "NIC bandwidth per GPU and direction, GB/s (1e9 bytes/s)", checks::positive());
    s.add("nic_latency_us", T::kFloat, std::nullopt, "inter-node latency per phase, us");
    s.add("dense_params", T::kInt, ConfigValue{std::int64_t{0}},
          "training step: the data-parallel (replicated) parameters of the model: attention, "
          "norms, embeddings",
          checks::int_range(0, std::int64_t{1} << 44));
    s.add("moe_layers", T::kInt, ConfigValue{std::int64_t{1}},
          "training step: MoE layers of the model, each routed as the simulated one",
          checks::int_range(1, 1 << 12));
    s.add("expert_params", T::kInt, std::nullopt,
          "training step: parameters of one expert (default: 3 · hidden · ffn_hidden, SwiGLU)",
          checks::int_range(0, std::int64_t{1} << 40));
    s.add("sample_tokens", T::kInt, ConfigValue{std::int64_t{24}},
          "tokens whose routing the HTML report draws", checks::int_range(0, 256));
  } else {
    throw Error(ErrorCode::kInternal, "no schema for section " + std::string(section));
  }
  return s;
}

namespace {
/// The plugins a section selects: (kind, selecting key, built-in value that is no plugin).
std::vector<std::tuple<PluginKind, std::string_view, std::string_view>> plugin_keys(
    std::string_view section) {
  if (section == "runtime") {
    return {{PluginKind::kTransport, "transport", ""},
            {PluginKind::kDataPath, "data_path", "host"}};
  }
  if (section == "router") return {{PluginKind::kRouter, "policy", ""}};
  if (section == "experts") return {{PluginKind::kExpert, "kernel", ""}};
  return {};
}
}  // namespace

ResolvedConfig::ResolvedConfig(const Config& config, const PluginRegistry& registry) {
  config.check_sections(config_sections());
  for (std::string_view name : config_sections()) {
    ConfigSchema schema = core_schema(name);
    // First pass with the core keys only, to learn which plugins own the other keys.
    const ConfigSection core = config.section(name, schema, /*reject_unknown=*/false);
    for (const auto& [kind, key, builtin] : plugin_keys(name)) {
      const std::string& plugin = core.get_string(key);
      if (!builtin.empty() && plugin == builtin) continue;
      try {
        schema.merge(registry.options(kind, plugin));
      } catch (const Error& e) {
        if (e.code() == ErrorCode::kInternal) throw;
        throw Error(e.code(), core.origin(key).describe() + ": " + std::string(name) + "." +
                                  std::string(key) + ": " + e.message());
      }
    }
    sections_.push_back(config.section(name, schema));
  }
}

const ConfigSection& ResolvedConfig::section(std::string_view name) const {
  for (const auto& s : sections_) {
    if (s.name() == name) return s;
  }
  throw Error(ErrorCode::kInternal, "no section " + std::string(name));
}

}  // namespace switchyard
