#include "switchyard/runtime.hpp"

#include <algorithm>
#include <cmath>
#include <exception>
#include <map>
#include <mutex>
#include <optional>
#include <system_error>
#include <thread>

#include "switchyard/bootstrap.hpp"
#include "switchyard/checkpoint.hpp"
#include "switchyard/io.hpp"
#include "switchyard/memory_budget.hpp"
#include "switchyard/reference.hpp"
#include "switchyard/status.hpp"

namespace switchyard {

std::pair<std::int64_t, std::int64_t> token_block(std::int64_t num_tokens, int ranks, int rank) {
  const std::int64_t base = num_tokens / ranks;
  const std::int64_t extra = num_tokens % ranks;
  const std::int64_t first = rank * base + std::min<std::int64_t>(rank, extra);
  return {first, base + (rank < extra ? 1 : 0)};
}

struct Runtime::State {
  std::shared_ptr<const PluginRegistry> registry;
  std::unique_ptr<ResolvedConfig> settings;
  std::vector<int> layer_ids;        // the checkpoint's number of each layer index
  std::vector<ModelWeights> models;  // per layer index
  std::vector<std::shared_ptr<Transport>> transports;     // world, one per local rank
  std::vector<std::shared_ptr<Transport>> ep_transports;  // this rank's EP group
  std::vector<std::shared_ptr<Transport>> dp_transports;  // this rank's DP group
  int ep_size = 1;
  std::vector<std::vector<std::unique_ptr<MoELayer>>> layers;  // [layer][local rank]
  // Per local rank: the step buffers (and with them the data path) its layers share.
  std::vector<std::shared_ptr<LayerWorkspace>> workspaces;
  ExpertPlacement placement;
  // forward_model's activations between layers (host, grown once).
  HostTensor chain_in, chain_out;
  bool training = false;
  // In training, the input of every layer but the first of the last forward_model, kept for
  // backward_model ([L-1] of [T,H], grown once), and that forward's T (-1: none yet).
  std::vector<HostTensor> layer_inputs;
  std::int64_t layer_inputs_tokens = -1;
  // backward_model's gradients between layers (host, grown once).
  HostTensor chain_grad_in, chain_grad_out;
  std::vector<std::vector<std::int64_t>> group_counts;  // per local rank, for bias updates
  /// Per local rank: its block of tokens and outputs on the layer's device, when the layer
  /// runs on a device and the caller's tensors are host memory.
  struct DeviceRows {
    Buffer<float> x, y;
  };
  std::vector<std::unique_ptr<DeviceRows>> device_rows;
  /// Per local rank, the backward's gradients before the sums: the gate's [E,H], its local
  /// experts' (gate, up, down each, with their views), and the loss scope (E counts + tokens).
  struct RankGradients {
    HostTensor gate;
    ExpertGradientStorage experts;
    std::vector<std::int64_t> scope;
  };
  std::vector<RankGradients> rank_gradients;
};

namespace {}  // namespace

std::vector<std::filesystem::path> configured_plugin_dirs(const Config& config) {
  const ConfigSection runtime =
      config.section("runtime", core_schema("runtime"), /*reject_unknown=*/false);
  std::vector<std::filesystem::path> dirs;
  for (const auto& d : runtime.get_string_list("plugin_dirs")) {
    std::filesystem::path p(d);
    if (p.is_relative() && runtime.origin("plugin_dirs").kind == ConfigOrigin::Kind::kFile) {
      p = std::filesystem::path(runtime.origin("plugin_dirs").where).parent_path() / p;
    }
    dirs.push_back(p);
  }
  return dirs;
}

namespace {

/// The model's MoE layers: random weights (layer l from the seed and l), or each layer's
/// tensors from the checkpoint, reading only those layers' tensors.
std::vector<ModelWeights> load_models(const ConfigSection& model, const std::vector<int>& ids) {
  std::vector<ModelWeights> layers;
  if (!model.has("weights")) {
    // Checked before allocating: L x E x (gate, up, down) of F x H, plus the routers' gates.
    const long double L = static_cast<long double>(ids.size());
    const long double E = static_cast<long double>(model.get_int("num_experts"));
    const long double H = static_cast<long double>(model.get_int("hidden"));
    const long double F = static_cast<long double>(model.get_int("ffn_hidden"));
    const int element = model.get_string("dtype") == "bf16" ? 2 : 4;
    const bool many = ids.size() > 1;
    check_fits_in_memory(
        L * (E * 3 * H * F * element + E * H * 4),
        model.origin("num_experts").describe() +
            ": model.num_experts, model.hidden, model.ffn_hidden" + (many ? ", model.layers" : ""),
        "random weights: " + format_bytes(L * E * 3 * H * F * element) + " for " +
            (many ? std::to_string(ids.size()) + " layers x " : std::string()) +
            std::to_string(model.get_int("num_experts")) + " experts x 3 x " +
            std::to_string(model.get_int("hidden")) + " x " +
            std::to_string(model.get_int("ffn_hidden")) + " x " + std::to_string(element) +
            (many ? " bytes, and the routers' gates" : " bytes, and the router's gate"));
    for (const int id : ids) {
      // Layer 0 keeps the seed's weights of a one-layer model; the others draw apart.
      const auto seed = static_cast<std::uint64_t>(model.get_int("seed")) +
                        0x9e3779b97f4a7c15ULL * static_cast<std::uint64_t>(id);
      layers.push_back(ModelWeights::random(
          static_cast<int>(model.get_int("num_experts")), static_cast<int>(model.get_int("hidden")),
          static_cast<int>(model.get_int("ffn_hidden")), seed,
          model.get_string("dtype") == "bf16" ? DType::kBF16 : DType::kF32));
    }
    return layers;
  }
  const auto format = model.get_string("format") == "mixtral" ? CheckpointFormat::kMixtral
                                                              : CheckpointFormat::kDeepseek;
  const std::string& prefix = model.get_string("prefix");
  try {
    Checkpoint checkpoint(model.get_path("weights"));
    for (const int id : ids) {
      layers.push_back(ModelWeights::load(checkpoint, format, layer_prefix(prefix, id)));
    }
  } catch (const Error& e) {
    throw Error(e.code(), model.origin("weights").describe() + ": model.weights: " + e.message());
  }
  // Sizes given explicitly must agree with the checkpoint, and every layer with the first.
  for (const ModelWeights& weights : layers) {
    const std::pair<const char*, int> sizes[] = {{"num_experts", weights.num_experts()},
                                                 {"hidden", weights.hidden()},
                                                 {"ffn_hidden", weights.ffn_hidden()}};
    for (const auto& [key, actual] : sizes) {
      if (model.origin(key).kind != ConfigOrigin::Kind::kDefault && model.get_int(key) != actual) {
        model.fail(key, "is " + std::to_string(model.get_int(key)) + " but the checkpoint has " +
                            std::to_string(actual));
      }
    }
    const ModelWeights& first = layers.front();
    if (weights.num_experts() != first.num_experts() || weights.hidden() != first.hidden() ||
        weights.ffn_hidden() != first.ffn_hidden()) {
      model.fail("layers", "layers differ in shape: " + first.description() +
                               " has E=" + std::to_string(first.num_experts()) +
                               " H=" + std::to_string(first.hidden()) + " F=" +
                               std::to_string(first.ffn_hidden()) + ", " + weights.description() +
                               " has E=" + std::to_string(weights.num_experts()) +
                               " H=" + std::to_string(weights.hidden()) +
                               " F=" + std::to_string(weights.ffn_hidden()));
    }
  }
  return layers;
}

}  // namespace

Runtime::Runtime(const Config& given) : state_(std::make_unique<State>()) {
  // SWITCHYARD_<SECTION>_<KEY> variables apply to embedders as to the tool; the launcher's
  // node emulation (SWITCHYARD_RUNTIME_RANKS_PER_NODE) is one of them.
  Config config = given;
  config.apply_environment(config_sections());
  config.check_sections(config_sections());
  state_->registry = std::make_shared<const PluginRegistry>(
      PluginRegistry::default_search_path(configured_plugin_dirs(config)));
  state_->settings = std::make_unique<ResolvedConfig>(config, *state_->registry);
  const ConfigSection& runtime = state_->settings->section("runtime");
  const ConfigSection& router = state_->settings->section("router");
  const ConfigSection& experts = state_->settings->section("experts");

  const ConfigSection& model_options = state_->settings->section("model");
  state_->layer_ids =
      parse_layer_list(model_options.get_string("layers"),
                       model_options.origin("layers").describe() + ": model.layers");
  if (model_options.get_string("prefix").find("{layer}") != std::string::npos &&
      model_options.get_string("layers").empty()) {
    model_options.fail("prefix",
                       "names {layer}, so model.layers must say which layers are MoE "
                       "layers (e.g. \"0-47\")");
  }
  state_->models = load_models(model_options, state_->layer_ids);
  const ModelWeights& model = state_->models.front();
  if (router.has("num_experts") && router.get_int("num_experts") != model.num_experts()) {
    router.fail("num_experts", "is " + std::to_string(router.get_int("num_experts")) +
                                   " but the model has " + std::to_string(model.num_experts()) +
                                   " experts");
  }

  TransportCreateArgs transport_args;
  transport_args.options = &runtime;
  transport_args.requested_ranks = static_cast<int>(runtime.get_int("ranks"));
  transport_args.timeout_s = runtime.get_float("timeout_s");
  transport_args.ranks_per_node = static_cast<int>(runtime.get_int("ranks_per_node"));
  const std::string& transport_name = runtime.get_string("transport");
  state_->transports = state_->registry->create_transport(transport_name, transport_args);
  const int world = state_->transports.front()->size();
  const bool world_from_launcher =
      !state_->transports.front()->capabilities().world_size_from_config;
  if (world_from_launcher && runtime.origin("ranks").kind != ConfigOrigin::Kind::kDefault &&
      runtime.get_int("ranks") != world) {
    runtime.fail("ranks",
                 "is " + std::to_string(runtime.get_int("ranks")) + " but the launcher started " +
                     std::to_string(world) + " ranks; with the " + transport_name +
                     " transport the world size comes from the launcher, so drop runtime.ranks");
  }
  const int ep =
      runtime.get_int("ep_size") > 0 ? static_cast<int>(runtime.get_int("ep_size")) : world;
  if (world % ep != 0) {
    runtime.fail("ep_size", "must divide the world size " + std::to_string(world) + " (got " +
                                std::to_string(ep) + ")");
  }
  state_->ep_size = ep;
  state_->placement = ExpertPlacement(model.num_experts(), ep);

  // EP groups are blocks of ep consecutive ranks; DP groups take one rank of each block.
  state_->ep_transports.resize(state_->transports.size());
  state_->dp_transports.resize(state_->transports.size());
  run_on_ranks([&](int local) {
    Transport& t = *state_->transports[static_cast<std::size_t>(local)];
    state_->ep_transports[static_cast<std::size_t>(local)] = t.split(t.rank() / ep, t.rank());
    state_->dp_transports[static_cast<std::size_t>(local)] = t.split(t.rank() % ep, t.rank());
  });

  const std::size_t num_local = state_->ep_transports.size();
  state_->layers.resize(state_->models.size());
  for (std::size_t local = 0; local < num_local; ++local) {
    const auto& transport = state_->ep_transports[local];
    const int rank = transport->rank();
    // One data path and one set of step buffers per rank, shared by all its layers.
    std::shared_ptr<DataPath> data_path;
    if (const std::string& path = runtime.get_string("data_path"); path != "host") {
      DataPathCreateArgs data_path_args;
      data_path_args.options = &runtime;
      data_path_args.rank = state_->transports[local]->rank();
      // Ranks of this process first (in-process transports), else the launcher's local rank.
      const auto launch = LaunchInfo::from_environment();
      data_path_args.local_rank =
          num_local > 1 || !launch ? static_cast<int>(local) : launch->local_rank;
      data_path = state_->registry->create_data_path(path, data_path_args);
    } else {
      data_path = make_host_data_path();
    }
    state_->workspaces.push_back(make_layer_workspace());
    for (std::size_t l = 0; l < state_->models.size(); ++l) {
      const ModelWeights& weights = state_->models[l];
      RouterCreateArgs router_args;
      router_args.options = &router;
      router_args.num_experts = weights.num_experts();
      router_args.checkpoint_bias = weights.bias();
      auto router_instance =
          state_->registry->create_router(router.get_string("policy"), router_args);

      ExpertCreateArgs expert_args;
      expert_args.options = &experts;
      expert_args.hidden = weights.hidden();
      expert_args.ffn_hidden = weights.ffn_hidden();
      const auto local_experts =
          weights.experts(state_->placement.first_expert(rank), state_->placement.num_local(rank));
      expert_args.experts = local_experts;
      auto kernel = state_->registry->create_expert(experts.get_string("kernel"), expert_args);

      MoELayerParts parts;
      if (weights.has_shared_expert()) {
        // The same kernel plugin, holding the shared expert as its one local expert.
        const SharedExpertWeights shared = weights.shared_expert();
        ExpertCreateArgs shared_args;
        shared_args.options = &experts;
        shared_args.hidden = weights.hidden();
        shared_args.ffn_hidden = weights.shared_ffn_hidden();
        shared_args.experts = std::span<const SwigluExpertWeights>(&shared.weights, 1);
        parts.shared_expert =
            state_->registry->create_expert(experts.get_string("kernel"), shared_args);
        parts.shared_expert_gate = shared.gate;
      }
      parts.transport = transport.get();
      parts.router = std::move(router_instance);
      parts.experts = std::move(kernel);
      parts.gate = weights.gate().view();
      parts.placement = state_->placement;
      parts.first_world_rank = state_->transports[local]->rank() / ep * ep;
      parts.data_path = data_path;
      parts.workspace = state_->workspaces.back();
      parts.payload_dtype = parse_payload_dtype(runtime.get_string("payload_dtype"));
      parts.combine_dtype =
          runtime.get_string("combine_dtype") == "bf16" ? DType::kBF16 : DType::kF32;
      parts.chunks = static_cast<int>(runtime.get_int("chunks"));
      parts.overlap_exchanges = runtime.get_bool("overlap");
      parts.recompute = runtime.get_bool("recompute");
      state_->layers[l].push_back(std::make_unique<MoELayer>(std::move(parts)));
    }
  }
}

Runtime::~Runtime() {
  // Layers borrow the transports; split communicators go before the world's. The staged
  // device rows hold memory of the layers' data paths, so they go first.
  if (!state_) return;
  state_->device_rows.clear();
  state_->layers.clear();
  state_->workspaces.clear();
  state_->ep_transports.clear();
  state_->dp_transports.clear();
}

const ResolvedConfig& Runtime::settings() const noexcept { return *state_->settings; }
const PluginRegistry& Runtime::plugins() const noexcept { return *state_->registry; }
const ModelWeights& Runtime::model(int layer) const {
  check_layer(layer, "model");
  return state_->models[static_cast<std::size_t>(layer)];
}
int Runtime::num_layers() const noexcept { return static_cast<int>(state_->models.size()); }
std::span<const int> Runtime::layer_ids() const noexcept { return state_->layer_ids; }
void Runtime::check_layer(int layer, const char* what) const {
  if (layer < 0 || layer >= num_layers()) {
    throw Error(ErrorCode::kInvalidArgument,
                std::string(what) + ": layer " + std::to_string(layer) + " does not exist; the " +
                    "model has " + std::to_string(num_layers()) +
                    (num_layers() == 1
                         ? " MoE layer (index 0)"
                         : " MoE layers (indices 0.." + std::to_string(num_layers() - 1) + ")"));
  }
}
const Topology& Runtime::topology() const noexcept {
  return state_->transports.front()->topology();
}
int Runtime::world_size() const noexcept { return state_->transports.front()->size(); }
int Runtime::num_local_ranks() const noexcept {
  return static_cast<int>(state_->transports.size());
}
int Runtime::world_rank(int local) const {
  return state_->transports.at(static_cast<std::size_t>(local))->rank();
}
MoELayer& Runtime::layer(int local, int index) {
  check_layer(index, "layer");
  return *state_->layers[static_cast<std::size_t>(index)].at(static_cast<std::size_t>(local));
}
void Runtime::abort(const std::string& reason) noexcept {
  for (const auto& t : state_->transports) t->abort(reason);
}

int Runtime::ep_size() const noexcept { return state_->ep_size; }
Transport& Runtime::world_transport(int local) {
  return *state_->transports.at(static_cast<std::size_t>(local));
}
Transport& Runtime::dp_transport(int local) {
  return *state_->dp_transports.at(static_cast<std::size_t>(local));
}

void Runtime::gather_rows(const TensorView& y) {
  const int world = world_size();
  if (num_local_ranks() == world) return;  // every row is already in this process
  const std::int64_t T = y.dim(0);
  const std::size_t row_bytes = static_cast<std::size_t>(y.dim(1)) * sizeof(float);
  run_on_ranks([&](int local) {
    Transport& t = world_transport(local);
    const auto n = static_cast<std::size_t>(world);
    std::vector<std::size_t> send_counts(n, 0), send_offsets(n, 0), recv_counts(n, 0),
        recv_offsets(n, 0);
    const auto [first, count] = token_block(T, world, t.rank());
    send_counts[0] = static_cast<std::size_t>(count) * row_bytes;
    send_offsets[0] = static_cast<std::size_t>(first) * row_bytes;
    if (t.rank() == 0) {
      for (int r = 0; r < world; ++r) {
        const auto [f, c] = token_block(T, world, r);
        recv_counts[static_cast<std::size_t>(r)] = static_cast<std::size_t>(c) * row_bytes;
        recv_offsets[static_cast<std::size_t>(r)] = static_cast<std::size_t>(f) * row_bytes;
      }
    }
    auto* bytes = static_cast<std::byte*>(y.data());
    t.alltoallv({bytes, send_counts, send_offsets, bytes, recv_counts, recv_offsets});
  });
}

void Runtime::gather_expert_gradients(ModelGradients& gradients) {
  const int world = world_size();
  if (num_local_ranks() == world) return;
  const std::int64_t H = model().hidden(), F = model().ffn_hidden();
  const std::size_t expert_floats = static_cast<std::size_t>(3 * F * H);
  const int ep = ep_size();
  run_on_ranks([&](int local) {
    Transport& t = world_transport(local);
    const auto n = static_cast<std::size_t>(world);
    std::vector<std::size_t> send_counts(n, 0), send_offsets(n, 0), recv_counts(n, 0),
        recv_offsets(n, 0);
    const ExpertPlacement& placement = layer(local).placement();
    const int r = t.rank();
    std::vector<float> send, recv;
    if (r != 0 && r < ep) {
      // This rank's experts: gate, up, down of each, in order.
      for (int j = 0; j < placement.num_local(r); ++j) {
        for (const HostTensor& w :
             gradients.experts[static_cast<std::size_t>(placement.first_expert(r)) +
                               static_cast<std::size_t>(j)]) {
          send.insert(send.end(), w.data<float>(), w.data<float>() + w.numel());
        }
      }
      send_counts[0] = send.size() * sizeof(float);
    }
    if (r == 0) {
      std::size_t offset = 0;
      for (int q = 1; q < ep; ++q) {
        recv_counts[static_cast<std::size_t>(q)] =
            static_cast<std::size_t>(placement.num_local(q)) * expert_floats * sizeof(float);
        recv_offsets[static_cast<std::size_t>(q)] = offset;
        offset += recv_counts[static_cast<std::size_t>(q)];
      }
      recv.resize(offset / sizeof(float));
    }
    t.alltoallv({reinterpret_cast<const std::byte*>(send.data()), send_counts, send_offsets,
                 reinterpret_cast<std::byte*>(recv.data()), recv_counts, recv_offsets});
    if (r != 0) return;
    const float* at = recv.data();
    for (int q = 1; q < ep; ++q) {
      for (int j = 0; j < placement.num_local(q); ++j) {
        auto& into = gradients.experts[static_cast<std::size_t>(placement.first_expert(q)) +
                                       static_cast<std::size_t>(j)];
        const std::vector<std::int64_t> shapes[3] = {{F, H}, {F, H}, {H, F}};
        for (std::size_t w = 0; w < 3; ++w) {
          if (into[w].numel() != F * H) into[w] = HostTensor(DType::kF32, shapes[w]);
          std::copy_n(at, F * H, into[w].data<float>());
          at += F * H;
        }
      }
    }
  });
}

ModelParameters Runtime::parameters(int index) {
  check_layer(index, "parameters");
  for (int local = 0; local < num_local_ranks(); ++local) {
    if (layer(local, index).data_path().device().kind != Device::Kind::kHost) {
      throw Error(ErrorCode::kUnavailable,
                  "parameters: training updates the host weights, but this runtime's data path "
                  "keeps its own device copy ([runtime] data_path = \"host\" to train)");
    }
  }
  ModelWeights& m = state_->models[static_cast<std::size_t>(index)];
  ModelParameters p;
  p.gate = m.gate().view();
  p.experts.resize(static_cast<std::size_t>(m.num_experts()));
  for_each_held_expert(index, [&](int expert, const SwigluExpertWeights& w) {
    if (w.gate.dtype() != DType::kF32) {
      throw Error(ErrorCode::kInvalidArgument,
                  "parameters: the experts' weights are " +
                      std::string(dtype_name(w.gate.dtype())) +
                      "; training updates f32 weights (an f32 checkpoint, or [model] dtype = "
                      "\"f32\" for random weights)");
    }
    p.experts[static_cast<std::size_t>(expert)] = {w.gate, w.up, w.down};
  });
  return p;
}

void Runtime::for_each_held_expert(
    int index,
    const std::function<void(int expert, const SwigluExpertWeights& weights)>& fn) const {
  for (int local = 0; local < num_local_ranks(); ++local) {
    const MoELayer& l =
        *state_->layers[static_cast<std::size_t>(index)][static_cast<std::size_t>(local)];
    const int ep_rank = l.transport().rank();
    const int first = l.placement().first_expert(ep_rank);
    const auto held = model(index).experts(first, l.placement().num_local(ep_rank));
    for (std::size_t j = 0; j < held.size(); ++j) fn(first + static_cast<int>(j), held[j]);
  }
}

void Runtime::save_model(const std::filesystem::path& path) {
  const ConfigSection& options = settings().section("model");
  const CheckpointFormat format = options.get_string("format") == "mixtral"
                                      ? CheckpointFormat::kMixtral
                                      : CheckpointFormat::kDeepseek;
  // Checked alike on every rank, before the collectives.
  if (num_layers() > 1 && options.get_string("prefix").find("{layer}") == std::string::npos) {
    throw Error(ErrorCode::kInvalidArgument,
                "save_model: the model has " + std::to_string(num_layers()) +
                    " layers but model.prefix \"" + options.get_string("prefix") +
                    "\" names no {layer}, so their tensors would have the same names (e.g. "
                    "prefix = \"model.layers.{layer}.mlp.\")");
  }
  std::map<std::string, HostTensor> tensors;
  for (int index = 0; index < num_layers(); ++index) {
    const ModelWeights& m = model(index);
    // The held experts widened to f32, gathered like gradients to world rank 0.
    ModelGradients copy;
    copy.experts.resize(static_cast<std::size_t>(m.num_experts()));
    for_each_held_expert(index, [&](int expert, const SwigluExpertWeights& held) {
      const TensorView weights[3] = {held.gate, held.up, held.down};
      const TensorView scales[3] = {held.gate_scale, held.up_scale, held.down_scale};
      for (std::size_t w = 0; w < 3; ++w) {
        HostTensor f32(DType::kF32, {weights[w].dim(0), weights[w].dim(1)});
        widen_expert_weight(weights[w], scales[w], f32.data<float>());
        copy.experts[static_cast<std::size_t>(expert)][w] = std::move(f32);
      }
    });
    gather_expert_gradients(copy);
    if (world_rank(0) != 0) continue;
    const std::string prefix = layer_prefix(options.get_string("prefix"),
                                            state_->layer_ids[static_cast<std::size_t>(index)]);
    tensors.emplace(prefix + "gate.weight", m.gate());
    for (int e = 0; e < m.num_experts(); ++e) {
      for (int w = 0; w < 3; ++w) {
        tensors.emplace(
            expert_tensor_name(format, prefix, e, w),
            std::move(copy.experts[static_cast<std::size_t>(e)][static_cast<std::size_t>(w)]));
      }
    }
    if (format == CheckpointFormat::kDeepseek && !m.bias().empty()) {
      HostTensor bias(DType::kF32, {m.num_experts()});
      std::copy(m.bias().begin(), m.bias().end(), bias.data<float>());
      tensors.emplace(prefix + "gate.e_score_correction_bias", std::move(bias));
    }
  }
  if (world_rank(0) == 0) write_safetensors(path, tensors);
}

void Runtime::set_training(bool training) {
  state_->training = training;
  state_->layer_inputs_tokens = -1;
  for (auto& layers : state_->layers) {
    for (auto& l : layers) l->set_training(training);
  }
}

void Runtime::run_on_ranks(const std::function<void(int local)>& fn) {
  const int n = num_local_ranks();
  if (n == 1) {
    fn(0);
    return;
  }
  std::mutex mutex;
  std::exception_ptr root_cause, peer_failure;
  // Nothing may escape a rank's thread (that would terminate the process), not even an
  // allocation failing while a failure is reported: the handler falls back to a fixed text.
  static const std::string kFallback = "a rank failed (and there was no memory to say more)";
  auto body = [&](int local) noexcept {
    try {
      fn(local);
    } catch (...) {
      const std::exception_ptr thrown = std::current_exception();
      bool peer_failed = false;
      try {
        std::rethrow_exception(thrown);
      } catch (const Error& e) {
        peer_failed = e.code() == ErrorCode::kPeerFailed;
      } catch (...) {
      }
      {
        std::lock_guard<std::mutex> lock(mutex);
        auto& slot = peer_failed ? peer_failure : root_cause;
        if (!slot) slot = thrown;
      }
      Transport& transport = *state_->transports[static_cast<std::size_t>(local)];
      try {
        std::string message;
        try {
          std::rethrow_exception(thrown);
        } catch (...) {
          message = Status::from_current_exception().message;
        }
        transport.abort("rank " + std::to_string(world_rank(local)) + " failed: " + message);
      } catch (...) {
        transport.abort(kFallback);
      }
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(static_cast<std::size_t>(n));
  for (int local = 0; local < n; ++local) {
    try {
      threads.emplace_back(body, local);
    } catch (const std::system_error& e) {
      // The ranks already running wait for this one in their first collective: end them.
      const std::string why =
          "cannot start the thread of local rank " + std::to_string(local) + " of " +
          std::to_string(n) + ": " + e.what() +
          " (fewer [runtime] ranks, or allow more memory and threads: ulimit -v, ulimit -u)";
      for (auto& transport : state_->transports) transport->abort(why);
      for (auto& t : threads) t.join();
      throw Error(ErrorCode::kSystem, why);
    }
  }
  for (auto& t : threads) t.join();
  if (root_cause) std::rethrow_exception(root_cause);
  if (peer_failure) std::rethrow_exception(peer_failure);
}

namespace {
TensorView rows(const TensorView& m, std::int64_t first, std::int64_t count) {
  return TensorView(m.data_as<float>() + first * m.dim(1), DType::kF32, {count, m.dim(1)});
}
}  // namespace

void Runtime::run_blocks(std::int64_t num_tokens, bool world_blocks, int index,
                         const std::function<void(int, std::int64_t, std::int64_t)>& step) {
  // Failures every rank saw together (bad input) are collected here rather than thrown
  // through run_on_ranks, which would abort the transports: bad input changes nothing.
  std::vector<std::optional<Error>> agreed(static_cast<std::size_t>(num_local_ranks()));
  run_on_ranks([&](int local) {
    const int rank = world_rank(local);
    const auto [first, count] = world_blocks ? token_block(num_tokens, world_size(), rank)
                                             : token_block(num_tokens, num_local_ranks(), local);
    try {
      step(local, first, count);
    } catch (const Error& e) {
      // Say which rows the failing rank held; token numbers in the message are local to
      // that block.
      Error located =
          e.code() == ErrorCode::kPeerFailed
              ? e
              : Error(e.code(), "rank " + std::to_string(rank) + " (input rows " +
                                    std::to_string(first) + ".." +
                                    std::to_string(first + count - 1) + "): " + e.message());
      if (!layer(local, index).last_failure_agreed()) throw located;
      agreed[static_cast<std::size_t>(local)] = std::move(located);
    }
  });
  const std::optional<Error>* peer_failure = nullptr;
  for (const auto& e : agreed) {
    if (!e) continue;
    if (e->code() != ErrorCode::kPeerFailed) throw *e;
    if (peer_failure == nullptr) peer_failure = &e;
  }
  if (peer_failure != nullptr) throw **peer_failure;
}

void Runtime::forward_blocks(const TensorView& x, const TensorView& y, bool world_blocks,
                             int index) {
  check_layer(index, "forward");
  const std::int64_t H = model(index).hidden();
  x.require("input tokens", DType::kF32, {-1, H});
  y.require("output", DType::kF32, {x.dim(0), H});
  const auto* x_begin = x.data_as<const float>();
  const auto* y_begin = y.data_as<const float>();
  if (x.numel() > 0 && x_begin < y_begin + y.numel() && y_begin < x_begin + x.numel()) {
    throw Error(ErrorCode::kInvalidArgument,
                "output: shares memory with the input tokens (the layer reads every token "
                "after it starts writing results; give y memory of its own)");
  }
  run_blocks(x.dim(0), world_blocks, index, [&](int local, std::int64_t first, std::int64_t count) {
    forward_block(local, index, rows(x, first, count), rows(y, first, count));
  });
  update_routers(index);
}

void Runtime::forward(const TensorView& x, const TensorView& y, int layer) {
  state_->layer_inputs_tokens = -1;  // a layer's own forward ends what backward_model may use
  forward_blocks(x, y, /*world_blocks=*/true, layer);
}

void Runtime::forward_local_tokens(const TensorView& x, const TensorView& y, int layer) {
  state_->layer_inputs_tokens = -1;
  forward_blocks(x, y, /*world_blocks=*/false, layer);
}

namespace {

/// into += from, both f32 [T,H] (contiguous).
void add_rows(const TensorView& from, const TensorView& into) {
  const float* a = from.data_as<const float>();
  float* b = into.data_as<float>();
  for (std::int64_t i = 0; i < into.numel(); ++i) b[i] += a[i];
}

/// `storage` as an f32 [rows,cols] view, reallocated only when it is too small.
TensorView grown_matrix(HostTensor& storage, std::int64_t rows, std::int64_t cols) {
  if (storage.numel() < rows * cols) storage = HostTensor(DType::kF32, {rows, cols});
  return {storage.data<float>(), DType::kF32, {rows, cols}};
}

}  // namespace

bool Runtime::residual() const { return settings().section("model").get_bool("residual"); }

void Runtime::forward_model(const TensorView& x, const TensorView& y) {
  const std::int64_t H = model().hidden();
  x.require("input tokens", DType::kF32, {-1, H});
  y.require("output", DType::kF32, {x.dim(0), H});
  const std::int64_t T = x.dim(0);
  const int L = num_layers();
  // Training keeps every layer's input for backward_model; inference alternates two buffers.
  State& s = *state_;
  s.layer_inputs_tokens = -1;
  if (s.training) s.layer_inputs.resize(static_cast<std::size_t>(L - 1));
  TensorView in = x;
  for (int index = 0; index < L; ++index) {
    TensorView out = y;
    if (index + 1 < L) {
      HostTensor& storage = s.training       ? s.layer_inputs[static_cast<std::size_t>(index)]
                            : index % 2 == 0 ? s.chain_out
                                             : s.chain_in;
      out = grown_matrix(storage, T, H);
    }
    forward(in, out, index);
    if (residual()) add_rows(in, out);
    in = out;
  }
  if (s.training) s.layer_inputs_tokens = T;  // after forward, which resets it
}

void Runtime::backward_model(const TensorView& x, const TensorView& dy, const TensorView& dx,
                             std::vector<ModelGradients>& gradients) {
  const std::int64_t H = model().hidden();
  x.require("input tokens", DType::kF32, {-1, H});
  const std::int64_t T = x.dim(0);
  dy.require("dy", DType::kF32, {T, H});
  dx.require("dx", DType::kF32, {T, H});
  State& s = *state_;
  const int L = num_layers();
  if (L > 1 && s.layer_inputs_tokens != T) {
    throw Error(ErrorCode::kInvalidArgument,
                "backward_model follows a forward_model in training mode (set_training(true)) "
                "on the same " +
                    std::to_string(T) + " tokens; " +
                    (s.layer_inputs_tokens < 0
                         ? std::string("there was none since training was set")
                         : "the last one had " + std::to_string(s.layer_inputs_tokens)));
  }
  gradients.resize(static_cast<std::size_t>(L));
  // Layer l's dx is layer l-1's dy; the first layer's is the caller's dx.
  TensorView upstream = dy;
  for (int index = L - 1; index >= 0; --index) {
    const TensorView in =
        index == 0 ? x : grown_matrix(s.layer_inputs[static_cast<std::size_t>(index - 1)], T, H);
    TensorView out = dx;
    if (index > 0) out = grown_matrix(index % 2 == 0 ? s.chain_grad_out : s.chain_grad_in, T, H);
    backward(in, upstream, out, gradients[static_cast<std::size_t>(index)], index);
    if (residual()) add_rows(upstream, out);  // the identity path's gradient
    upstream = out;
  }
}

std::size_t Runtime::step_buffer_bytes() const noexcept {
  std::size_t bytes = 0;
  for (const auto& workspace : state_->workspaces) bytes += workspace_bytes(*workspace);
  for (const auto& layers : state_->layers) {
    for (const auto& l : layers) bytes += l->own_buffer_bytes();
  }
  return bytes;
}

namespace {

/// Element (t, k) of a strided [T,K] view.
template <typename T>
T element(const TensorView& m, std::int64_t t, std::int64_t k) {
  return m.data_as<const T>()[t * m.stride(0) + k * m.stride(1)];
}

}  // namespace

void Runtime::dispatch(const TensorView& x, const TensorView& experts, const TensorView& weights,
                       ProcessDispatch& dispatched, int index) {
  check_layer(index, "dispatch");
  const std::int64_t H = model(index).hidden();
  dispatched.combinable = false;
  dispatched.layer = index;
  x.require("input x", DType::kF32, {-1, H});
  const std::int64_t T = x.dim(0);
  experts.require_strided("experts", DType::kI32, {T, -1});
  const std::int64_t K = experts.dim(1);
  weights.require_strided("weights", DType::kF32, {T, K});
  if (K < 1) throw Error(ErrorCode::kInvalidArgument, "experts: needs at least one slot per token");
  for (int local = 0; local < num_local_ranks(); ++local) {
    if (layer(local, index).data_path().device().kind != Device::Kind::kHost) {
      throw Error(ErrorCode::kUnavailable,
                  "dispatch and combine need the host data path ([runtime] data_path = "
                  "\"host\"); a device data path runs the whole layer with forward");
    }
  }
  dispatched.parts.resize(static_cast<std::size_t>(num_local_ranks()));
  dispatched.num_tokens = T;
  run_blocks(T, /*world_blocks=*/false, index,
             [&](int local, std::int64_t first, std::int64_t count) {
               MoELayer& l = layer(local, index);
               DispatchPart& part = dispatched.parts[static_cast<std::size_t>(local)];
               const int ep_rank = l.transport().rank();
               part.world_rank = world_rank(local);
               part.first_expert = l.placement().first_expert(ep_rank);
               part.num_local_experts = l.placement().num_local(ep_rank);
               part.first_token = first;
               part.num_tokens = count;
               RoutingPlan& plan = part.plan;
               plan.num_tokens = count;
               plan.slots = static_cast<int>(K);
               plan.experts.resize(static_cast<std::size_t>(count * K));
               plan.weights.resize(static_cast<std::size_t>(count * K));
               for (std::int64_t t = 0; t < count; ++t) {
                 for (std::int64_t k = 0; k < K; ++k) {
                   plan.experts[static_cast<std::size_t>(t * K + k)] =
                       element<std::int32_t>(experts, first + t, k);
                   plan.weights[static_cast<std::size_t>(t * K + k)] =
                       element<float>(weights, first + t, k);
                 }
               }
               const TensorView block = rows(x, first, count);
               const std::optional<Error> bad_token = first_non_finite(block, "input x");
               l.dispatch(block, plan, part.handle, bad_token ? &*bad_token : nullptr);
             });
  dispatched.combinable = true;
}

void Runtime::combine(ProcessDispatch& dispatched, std::span<const TensorView> expert_outputs,
                      const TensorView& y) {
  const std::int64_t H = model().hidden();
  if (!dispatched.combinable) {
    throw Error(ErrorCode::kInvalidArgument,
                "combine needs a dispatch of its own: this one failed, was already combined, "
                "or never ran");
  }
  if (expert_outputs.size() != dispatched.parts.size()) {
    throw Error(ErrorCode::kInvalidArgument, "combine takes one expert output per local rank: " +
                                                 std::to_string(dispatched.parts.size()) +
                                                 " expected, " +
                                                 std::to_string(expert_outputs.size()) + " given");
  }
  y.require("output y", DType::kF32, {dispatched.num_tokens, H});
  for (std::size_t i = 0; i < expert_outputs.size(); ++i) {
    const std::int64_t A = dispatched.parts[i].handle.expert_input().dim(0);
    expert_outputs[i].require("expert output of local rank " + std::to_string(i), DType::kF32,
                              {A, H});
  }
  dispatched.combinable = false;
  run_on_ranks([&](int local) {
    DispatchPart& part = dispatched.parts[static_cast<std::size_t>(local)];
    layer(local, dispatched.layer)
        .combine(part.handle, expert_outputs[static_cast<std::size_t>(local)],
                 rows(y, part.first_token, part.num_tokens));
  });
}

namespace {

/// Checks one [A,H] f32 tensor per part, named by `what`.
void require_part_rows(const ProcessDispatch& d, std::span<const TensorView> tensors,
                       std::int64_t hidden, const std::string& what) {
  if (tensors.size() != d.parts.size()) {
    throw Error(ErrorCode::kInvalidArgument,
                what + ": one per local rank: " + std::to_string(d.parts.size()) + " expected, " +
                    std::to_string(tensors.size()) + " given");
  }
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const std::int64_t A = const_cast<DispatchHandle&>(d.parts[i].handle).expert_input().dim(0);
    tensors[i].require(what + " of local rank " + std::to_string(i), DType::kF32, {A, hidden});
  }
}

}  // namespace

void Runtime::combine_backward(ProcessDispatch& dispatched,
                               std::span<const TensorView> expert_outputs, const TensorView& dy,
                               std::span<const TensorView> d_expert_outputs,
                               const TensorView& d_weights) {
  const std::int64_t H = model().hidden();
  if (dispatched.parts.empty()) {
    throw Error(ErrorCode::kInvalidArgument, "combine backward needs a dispatch");
  }
  const int K = dispatched.parts.front().plan.slots;
  dy.require("dy", DType::kF32, {dispatched.num_tokens, H});
  d_weights.require("d_weights", DType::kF32, {dispatched.num_tokens, K});
  require_part_rows(dispatched, expert_outputs, H, "expert output");
  require_part_rows(dispatched, d_expert_outputs, H, "expert output gradient");
  run_blocks(dispatched.num_tokens, /*world_blocks=*/false, dispatched.layer,
             [&](int local, std::int64_t first, std::int64_t count) {
               DispatchPart& part = dispatched.parts[static_cast<std::size_t>(local)];
               const auto i = static_cast<std::size_t>(local);
               layer(local, dispatched.layer)
                   .combine_backward(
                       part.handle, part.plan, expert_outputs[i], rows(dy, first, count),
                       d_expert_outputs[i],
                       TensorView(d_weights.data_as<float>() + first * K, DType::kF32, {count, K}));
             });
}

void Runtime::dispatch_backward(ProcessDispatch& dispatched,
                                std::span<const TensorView> d_expert_inputs, const TensorView& dx) {
  const std::int64_t H = model().hidden();
  dx.require("dx", DType::kF32, {dispatched.num_tokens, H});
  require_part_rows(dispatched, d_expert_inputs, H, "expert input gradient");
  run_on_ranks([&](int local) {
    DispatchPart& part = dispatched.parts[static_cast<std::size_t>(local)];
    layer(local, dispatched.layer)
        .dispatch_backward(part.handle, d_expert_inputs[static_cast<std::size_t>(local)],
                           rows(dx, part.first_token, part.num_tokens));
  });
}

void Runtime::backward(const TensorView& x, const TensorView& dy, const TensorView& dx,
                       ModelGradients& gradients, int layer) {
  backward_blocks(x, dy, dx, gradients, /*world_blocks=*/true, layer);
}

void Runtime::backward_local_tokens(const TensorView& x, const TensorView& dy, const TensorView& dx,
                                    ModelGradients& gradients, int layer) {
  backward_blocks(x, dy, dx, gradients, /*world_blocks=*/false, layer);
}

void Runtime::backward_blocks(const TensorView& x, const TensorView& dy, const TensorView& dx,
                              ModelGradients& gradients, bool world_blocks, int index) {
  check_layer(index, "backward");
  const ModelWeights& m = model(index);
  if (m.has_shared_expert()) {  // every rank alike, before any collective
    throw Error(ErrorCode::kUnavailable,
                "backward: layer " + std::to_string(index) +
                    " has a shared expert, whose backward is not built yet (such a model runs "
                    "forward only)");
  }
  const std::int64_t H = m.hidden(), F = m.ffn_hidden();
  const int E = m.num_experts();
  x.require("input tokens", DType::kF32, {-1, H});
  const std::int64_t T = x.dim(0);
  dy.require("dy", DType::kF32, {T, H});
  dx.require("dx", DType::kF32, {T, H});
  for (int local = 0; local < num_local_ranks(); ++local) {
    const auto [first, count] = world_blocks ? token_block(T, world_size(), world_rank(local))
                                             : token_block(T, num_local_ranks(), local);
    if (!layer(local, index).backward_ready()) {
      throw Error(ErrorCode::kInvalidArgument,
                  "backward: rank " + std::to_string(world_rank(local)) +
                      " has no forward to differentiate (backward follows a forward on the "
                      "same x, which finished)");
    }
    if (layer(local, index).last_plan().num_tokens != count) {
      throw Error(ErrorCode::kInvalidArgument,
                  "backward: rank " + std::to_string(world_rank(local)) + " holds " +
                      std::to_string(count) + " of these " + std::to_string(T) +
                      " tokens, but its last forward routed " +
                      std::to_string(layer(local, index).last_plan().num_tokens) +
                      " (backward follows a forward on the same x)");
    }
  }
  auto& ranks = state_->rank_gradients;
  ranks.resize(static_cast<std::size_t>(num_local_ranks()));
  for (int local = 0; local < num_local_ranks(); ++local) {
    auto& r = ranks[static_cast<std::size_t>(local)];
    const int experts =
        layer(local, index).placement().num_local(layer(local, index).transport().rank());
    if (r.gate.numel() != E * H) r.gate = HostTensor(DType::kF32, {E, H});
    if (r.experts.views().size() != static_cast<std::size_t>(experts)) {
      r.experts = ExpertGradientStorage(experts, H, F);
    }
    std::fill_n(r.gate.data<float>(), r.gate.numel(), 0.0f);
    r.experts.zero();
    r.scope.resize(static_cast<std::size_t>(E) + 1);
  }
  run_blocks(T, world_blocks, index, [&](int local, std::int64_t first, std::int64_t count) {
    auto& r = ranks[static_cast<std::size_t>(local)];
    // The losses' scope: the EP group's plain top-k counts and tokens.
    const RouterStats& stats = layer(local, index).router().stats();
    std::copy(stats.aux_counts.begin(), stats.aux_counts.end(), r.scope.begin());
    r.scope[static_cast<std::size_t>(E)] = stats.tokens;
    state_->ep_transports[static_cast<std::size_t>(local)]->allreduce(
        r.scope.data(), r.scope.size(), DType::kI64, ReduceOp::kSum);
    LayerGradients out;
    out.dx = rows(dx, first, count);
    out.d_experts = r.experts.views();
    out.d_gate = r.gate.view();
    out.loss_tokens = r.scope[static_cast<std::size_t>(E)];
    out.loss_aux_counts = {r.scope.data(), static_cast<std::size_t>(E)};
    layer(local, index).backward(rows(x, first, count), rows(dy, first, count), out);
    // Deterministic sums (rank order): the gate over the world, experts over the DP group.
    world_transport(local).allreduce(r.gate.data<float>(), static_cast<std::size_t>(E * H),
                                     DType::kF32, ReduceOp::kSum);
    for (auto& t : r.experts.tensors()) {
      dp_transport(local).allreduce(t.data<float>(), static_cast<std::size_t>(t.numel()),
                                    DType::kF32, ReduceOp::kSum);
    }
  });
  if (gradients.gate.numel() != E * H) gradients.gate = HostTensor(DType::kF32, {E, H});
  std::copy_n(ranks.front().gate.data<float>(), E * H, gradients.gate.data<float>());
  gradients.experts.resize(static_cast<std::size_t>(E));
  for (int local = 0; local < num_local_ranks(); ++local) {
    const MoELayer& l = layer(local, index);
    const int ep_rank = l.transport().rank();
    const int first_expert = l.placement().first_expert(ep_rank);
    const auto& r = ranks[static_cast<std::size_t>(local)];
    for (std::size_t j = 0; j < r.experts.views().size(); ++j) {
      auto& into = gradients.experts[static_cast<std::size_t>(first_expert) + j];
      for (std::size_t w = 0; w < 3; ++w) {
        const HostTensor& from = r.experts.tensors()[3 * j + w];
        if (into[w].numel() != from.numel()) into[w] = HostTensor(DType::kF32, from.shape());
        std::copy_n(from.data<float>(), from.numel(), into[w].data<float>());
      }
    }
  }
}

void Runtime::forward_block(int local, int index, const TensorView& x, const TensorView& y) {
  MoELayer& l = layer(local, index);
  DataPath& path = l.data_path();
  if (x.device() == path.device()) {
    l.forward(x, y);
    return;
  }
  // Host tokens, device layer: through device buffers of this rank (grown once).
  auto& staged = state_->device_rows;
  staged.resize(static_cast<std::size_t>(num_local_ranks()));
  auto& d = staged[static_cast<std::size_t>(local)];
  if (!d) {
    d = std::make_unique<State::DeviceRows>();
    d->x = Buffer<float>(path.allocator());
    d->y = Buffer<float>(path.allocator());
  }
  const std::int64_t T = x.dim(0), H = x.dim(1);
  const auto bytes = static_cast<std::size_t>(T * H) * sizeof(float);
  d->x.resize(static_cast<std::size_t>(T * H));
  d->y.resize(static_cast<std::size_t>(T * H));
  path.copy(d->x.data(), x.data(), bytes, l.stream());
  l.forward(TensorView(d->x.data(), DType::kF32, {T, H}, path.device()),
            TensorView(d->y.data(), DType::kF32, {T, H}, path.device()));
  path.copy(y.data(), d->y.data(), bytes, l.stream());
  l.stream().synchronize();
}

void Runtime::update_routers(int index) {
  if (!layer(0, index).router().updates_from_counts()) return;
  const auto E = static_cast<std::size_t>(model(index).num_experts());
  state_->group_counts.resize(static_cast<std::size_t>(num_local_ranks()));
  run_on_ranks([&](int local) {
    Router& router = layer(local, index).router();
    auto& sums = state_->group_counts[static_cast<std::size_t>(local)];
    sums.assign(router.stats().counts.begin(), router.stats().counts.end());
    sums.resize(E);
    // Integer sums: the same on every rank, so every rank's bias moves the same way.
    state_->ep_transports[static_cast<std::size_t>(local)]->allreduce(sums.data(), E, DType::kI64,
                                                                      ReduceOp::kSum);
    router.update(sums);
  });
}

void Runtime::reference_forward(const TensorView& x, const TensorView& y, int index) const {
  const ModelWeights& m = model(index);
  x.require("input tokens", DType::kF32, {-1, m.hidden()});
  y.require("reference output", DType::kF32, {x.dim(0), m.hidden()});
  const ConfigSection& router_options = state_->settings->section("router");
  RouterCreateArgs args;
  args.options = &router_options;
  args.num_experts = m.num_experts();
  args.checkpoint_bias = m.bias();
  auto router = state_->registry->create_router(router_options.get_string("policy"), args);
  const int world = world_size();
  std::vector<float> logits;
  RoutingPlan plan;
  HostStream stream;
  // Route each rank's block the way that rank does, then evaluate it densely.
  for (int rank = 0; rank < world; ++rank) {
    const auto [first, count] = token_block(x.dim(0), world, rank);
    const TensorView block = rows(x, first, count);
    logits.resize(static_cast<std::size_t>(count * m.num_experts()));
    compute_router_logits(block, m.gate().view(), logits.data());
    RouteInput input;
    input.logits = TensorView(logits.data(), DType::kF32, {count, m.num_experts()});
    input.topology = &topology();
    router->route(input, plan, stream);
    dense_moe_reference(m, plan, block, rows(y, first, count));
  }
}

void Runtime::reference_model(const TensorView& x, const TensorView& y) const {
  const std::int64_t H = model().hidden();
  x.require("input tokens", DType::kF32, {-1, H});
  y.require("reference output", DType::kF32, {x.dim(0), H});
  HostTensor in(DType::kF32, {x.dim(0), H});
  std::copy_n(x.data_as<const float>(), x.numel(), in.data<float>());
  for (int index = 0; index < num_layers(); ++index) {
    reference_forward(in.view(), y, index);
    if (residual()) add_rows(in.view(), y);
    std::copy_n(y.data_as<const float>(), y.numel(), in.data<float>());
  }
}

GlobalRouterStats Runtime::global_router_stats(int index) {
  check_layer(index, "global_router_stats");
  const int E = model(index).num_experts();
  const auto e_size = static_cast<std::size_t>(E);
  GlobalRouterStats result;
  std::vector<double> probability_sums(e_size, 0.0);
  std::vector<std::int64_t> aux_counts(e_size, 0);
  double z_loss_sum = 0;
  std::mutex mutex;
  run_on_ranks([&](int local) {
    const RouterStats& s = layer(local, index).router().stats();
    // [counts E | aux counts E | dropped | tokens] and [probability sums E | z-loss sum].
    std::vector<std::int64_t> ints(2 * e_size + 2, 0);
    std::vector<double> reals(e_size + 1, 0.0);
    std::copy(s.counts.begin(), s.counts.end(), ints.begin());
    std::copy(s.aux_counts.begin(), s.aux_counts.end(), ints.begin() + E);
    ints[2 * e_size] = s.dropped;
    ints[2 * e_size + 1] = s.tokens;
    std::copy(s.probability_sums.begin(), s.probability_sums.end(), reals.begin());
    reals[e_size] = s.z_loss_sum;
    world_transport(local).allreduce(ints.data(), ints.size(), DType::kI64, ReduceOp::kSum);
    world_transport(local).allreduce(reals.data(), reals.size(), DType::kF64, ReduceOp::kSum);
    if (local != 0) return;
    std::lock_guard<std::mutex> lock(mutex);
    result.counts.assign(ints.begin(), ints.begin() + E);
    aux_counts.assign(ints.begin() + E, ints.begin() + 2 * static_cast<std::ptrdiff_t>(E));
    result.dropped = ints[2 * e_size];
    result.tokens = ints[2 * e_size + 1];
    probability_sums.assign(reals.begin(), reals.begin() + E);
    z_loss_sum = reals[e_size];
  });
  // The losses of all ranks' tokens from the summed parts, as one router would compute them.
  RouterStats sums;
  sums.counts = result.counts;
  sums.tokens = result.tokens;
  sums.probability_sums = std::move(probability_sums);
  sums.aux_counts = std::move(aux_counts);
  sums.z_loss_sum = z_loss_sum;
  sums.top_k = layer(0, index).router().stats().top_k;
  finish_router_stats(sums);
  result.imbalance = sums.imbalance;
  result.aux_loss = sums.aux_loss;
  result.z_loss = sums.z_loss;
  return result;
}

LayerTimings Runtime::max_timings(int index) {
  check_layer(index, "max_timings");
  LayerTimings result;
  run_on_ranks([&](int local) {
    MoELayer& l = layer(local, index);
    const LayerTimings& t = l.timings();
    double v[5] = {t.route_s, t.layout_s, t.dispatch_s, t.experts_s, t.combine_s};
    world_transport(local).allreduce(v, 5, DType::kF64, ReduceOp::kMax);
    if (local == 0) result = {v[0], v[1], v[2], v[3], v[4]};
  });
  return result;
}

LayerTraffic Runtime::total_traffic(int index) {
  check_layer(index, "total_traffic");
  LayerTraffic result;
  run_on_ranks([&](int local) {
    MoELayer& l = layer(local, index);
    const LayerTraffic& t = l.traffic();
    std::int64_t v[3] = {static_cast<std::int64_t>(t.dispatch_bytes),
                         static_cast<std::int64_t>(t.combine_bytes), t.rows_sent};
    world_transport(local).allreduce(v, 3, DType::kI64, ReduceOp::kSum);
    if (local == 0) {
      result = {static_cast<std::uint64_t>(v[0]), static_cast<std::uint64_t>(v[1]), v[2]};
    }
  });
  return result;
}

}  // namespace switchyard
