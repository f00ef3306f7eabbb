// Runtime: building from a configuration, the accessors, and the executor of local ranks.
#include "switchyard/runtime.hpp"

#include "runtime_internal.hpp"

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
#include "switchyard/expert_balancer.hpp"
#include "switchyard/io.hpp"
#include "switchyard/memory_budget.hpp"
#include "switchyard/reference.hpp"
#include "switchyard/status.hpp"

namespace switchyard {

using namespace runtime_detail;

std::pair<std::int64_t, std::int64_t> token_block(std::int64_t num_tokens, int ranks, int rank) {
  const std::int64_t base = num_tokens / ranks;
  const std::int64_t extra = num_tokens % ranks;
  const std::int64_t first = rank * base + std::min<std::int64_t>(rank, extra);
  return {first, base + (rank < extra ? 1 : 0)};
}

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

namespace {

/// Each layer's slot map from `[runtime] placement` (a plan-experts folder) or
/// `redundant_experts` (the balancer's placement for an even load); empty maps otherwise.
std::vector<ExpertSlotMap> initial_slot_maps(const ConfigSection& runtime,
                                             const ConfigSection& router, const Topology& world,
                                             const std::vector<ModelWeights>& models, int ep) {
  const auto layers = models.size();
  std::vector<ExpertSlotMap> maps(layers);
  const int E = models.front().num_experts();
  const std::string& folder = runtime.get_string("placement");
  const auto redundant = static_cast<int>(runtime.get_int("redundant_experts"));
  if (!folder.empty()) {
    const std::string where = runtime.origin("placement").describe() + ": runtime.placement";
    const std::filesystem::path dir(folder);
    HostTensor slots, shares;
    try {
      slots = read_npy(dir / "expert_of_slot.npy");
      shares = read_npy(dir / "share_of_slot.npy");
    } catch (const Error& e) {
      throw Error(e.code(), where + ": " + e.message());
    }
    if (slots.dtype() != DType::kI32 || slots.shape().size() != 2 ||
        shares.dtype() != DType::kF64 || shares.shape() != slots.shape() ||
        (slots.shape()[0] != 1 && slots.shape()[0] != static_cast<std::int64_t>(layers))) {
      throw Error(ErrorCode::kInvalidArgument,
                  where +
                      ": expert_of_slot.npy (int32) and share_of_slot.npy (float64) must be "
                      "[layers, slots] with one row per MoE layer (" +
                      std::to_string(layers) + ") or one row for all");
    }
    const std::int64_t S = slots.shape()[1];
    if (S % ep != 0) {
      throw Error(ErrorCode::kInvalidArgument,
                  where + ": " + std::to_string(S) + " slots do not divide over the EP group's " +
                      std::to_string(ep) + " ranks (plan the placement for " + std::to_string(ep) +
                      " ranks)");
    }
    for (std::size_t l = 0; l < layers; ++l) {
      const std::int64_t row = slots.shape()[0] == 1 ? 0 : static_cast<std::int64_t>(l);
      const std::int32_t* expert = slots.data<std::int32_t>() + row * S;
      const double* share = shares.data<double>() + row * S;
      try {
        maps[l] = ExpertSlotMap(E, std::vector<int>(expert, expert + S),
                                std::vector<double>(share, share + S));
      } catch (const Error& e) {
        throw Error(e.code(), where + ": layer " + std::to_string(l) + ": " + e.message());
      }
    }
    return maps;
  }
  if (redundant == 0) return maps;
  const ExpertBalanceShape shape = runtime_detail::balance_shape(router, world, ep, redundant);
  const ExpertSlots even =
      balance_experts(std::vector<double>(static_cast<std::size_t>(E), 1.0), shape);
  for (auto& map : maps) map = ExpertSlotMap(E, even.expert_of_slot, even.share_of_slot);
  return maps;
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
  state_->slot_maps = initial_slot_maps(runtime, router, state_->transports.front()->topology(),
                                        state_->models, ep);
  state_->placement =
      ExpertPlacement(state_->slot_maps.front().empty() ? model.num_experts()
                                                        : state_->slot_maps.front().num_slots(),
                      ep);

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
      state_->slot_weights.resize(state_->models.size());
      state_->slot_storage.resize(state_->models.size());
      state_->slot_weights[l].push_back(
          model_slot_weights(static_cast<int>(l), static_cast<int>(local)));
      state_->slot_storage[l].emplace_back();
      expert_args.experts = state_->slot_weights[l].back();
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
      parts.slot_map = state_->slot_maps[l];
      parts.combine_order =
          runtime.get_string("combine_order") == "slot" ? CombineOrder::kSlot : CombineOrder::kRank;
      parts.first_world_rank = state_->transports[local]->rank() / ep * ep;
      parts.data_path = data_path;
      parts.workspace = state_->workspaces.back();
      parts.payload_dtype = parse_payload_dtype(runtime.get_string("payload_dtype"));
      parts.combine_dtype =
          runtime.get_string("combine_dtype") == "bf16" ? DType::kBF16 : DType::kF32;
      parts.chunks = static_cast<int>(runtime.get_int("chunks"));
      parts.expert_alignment = runtime.get_int("expert_alignment");
      parts.max_tokens_per_rank = runtime.get_int("max_tokens_per_rank");
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
  runtime_detail::throw_agreed_failure(agreed);
}

void runtime_detail::throw_agreed_failure(const std::vector<std::optional<Error>>& agreed) {
  const std::optional<Error>* peer_failure = nullptr;
  for (const auto& e : agreed) {
    if (!e) continue;
    if (e->code() != ErrorCode::kPeerFailed) throw *e;
    if (peer_failure == nullptr) peer_failure = &e;
  }
  if (peer_failure != nullptr) throw **peer_failure;
}

}  // namespace switchyard
