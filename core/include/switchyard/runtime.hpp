#pragma once
/// \file
/// The runtime: a validated configuration, the plugins it names, the model (one or more
/// MoE layers over the same EP and DP groups), and the layers of every rank hosted by this
/// process.

#include <array>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "switchyard/config.hpp"
#include "switchyard/layer.hpp"
#include "switchyard/model.hpp"
#include "switchyard/plugin.hpp"
#include "switchyard/router.hpp"

namespace switchyard {

/// The sections a configuration may have: runtime, router, experts, model, input, output,
/// check, simulate.
std::span<const std::string_view> config_sections() noexcept;
/// The core's keys of `section` (plugin keys are added by `ResolvedConfig`).
ConfigSchema core_schema(std::string_view section);

/// Every section of a configuration validated against the core schema plus the schema of
/// the plugin it selects ([runtime] transport, [router] policy, [experts] kernel).
class ResolvedConfig {
 public:
  /// Throws `Error(kInvalidArgument)` with the origin of the first bad value, or the
  /// registry's error when a selected plugin is missing.
  ResolvedConfig(const Config& config, const PluginRegistry& registry);
  const ConfigSection& section(std::string_view name) const;
  std::span<const ConfigSection> sections() const noexcept { return sections_; }

 private:
  std::vector<ConfigSection> sections_;
};

/// The folders `[runtime] plugin_dirs` names (relative ones resolved against the config
/// file's folder), for `PluginRegistry::default_search_path`.
std::vector<std::filesystem::path> configured_plugin_dirs(const Config& config);

/// Rows of `num_tokens` owned by `rank` of `ranks`: contiguous blocks, the first
/// `num_tokens mod ranks` ranks get one row more. Returns {first row, row count}.
std::pair<std::int64_t, std::int64_t> token_block(std::int64_t num_tokens, int ranks, int rank);

/// Routing statistics over all ranks of the EP group.
struct GlobalRouterStats {
  std::vector<std::int64_t> counts;  ///< [E] kept assignments, summed over ranks
  std::int64_t tokens = 0;
  std::int64_t dropped = 0;
  double imbalance = 0;  ///< max(counts) / mean(counts)
  /// The Switch loss over all ranks' tokens, from the summed probabilities and counts
  /// (equal to the single-rank loss on the concatenated tokens).
  double aux_loss = 0;
  double z_loss = 0;  ///< mean over all ranks' tokens of logsumexp(z)²
};

/// One local rank's share of a `Runtime::dispatch`.
struct DispatchPart {
  int world_rank = 0;
  /// The rank's first expert slot: without a slot map, the global id of its first expert.
  int first_expert = 0;
  int num_local_experts = 0;  ///< its slots: first_expert .. first_expert + this - 1
  /// [num_local_experts] the global id of the expert each local slot holds (copies of a
  /// replicated expert hold its weights).
  std::vector<int> local_experts;
  std::int64_t first_token = 0;  ///< its first row of the dispatched tokens
  std::int64_t num_tokens = 0;   ///< its rows of them
  RoutingPlan plan;              ///< its rows of the given routing (host)
  /// The rows the rank received, grouped per local expert (`expert_input()`,
  /// `rows_per_expert()`), and `expert_output()`, a buffer for the experts' results: in
  /// the data path's memory (on its device for a device data path).
  DispatchHandle handle;
  /// A device data path's copy of `plan`, and its copies of host tokens (dispatch) and
  /// host y rows (combine), in the data path's memory.
  RoutingPlan device_plan;
  Buffer<float> staged_rows;
};

/// What `Runtime::rebalance` did to one layer.
struct RebalanceReport {
  int layer = 0;  ///< layer index
  int slots = 0;  ///< expert slots of an EP group (the same before and after)
  /// max / mean of the EP ranks' load since the last rebalance: the (token, expert)
  /// assignments their slots took, summed over the world.
  double imbalance_before = 0;
  /// The same for that load under the new placement and its copies' shares (what the next
  /// steps see when the load stays as it was).
  double imbalance_planned = 0;
  std::int64_t moved_experts = 0;    ///< expert copies sent to a new rank, per EP group
  std::uint64_t received_bytes = 0;  ///< weight bytes this process's ranks received
};

/// What `Runtime::dispatch` fills and `Runtime::combine` reads: one part per local rank.
/// Owned by the caller and reusable: buffers only grow, so views of a part's rows stay
/// valid until the next `dispatch` with it. One thread at a time.
struct ProcessDispatch {
  std::vector<DispatchPart> parts;
  std::int64_t num_tokens = 0;  ///< T of the dispatched tokens
  int layer = 0;                ///< the model layer (index) it was dispatched for
  bool combinable = false;      ///< a dispatch succeeded and has not been combined yet
};

/// The gradients of the model's parameters from `Runtime::backward` (host f32). Owned by
/// the caller and reused: tensors are allocated on the first call only.
struct ModelGradients {
  HostTensor gate;  ///< [E,H] the router's gate weight, summed over the world
  /// [E]: per expert {gate, up} [F,H] and down [H,F], summed over its DP group;
  /// default-constructed tensors (`size_bytes() == 0`) for the experts no rank of this
  /// process holds.
  std::vector<std::array<HostTensor, 3>> experts;
  /// The layer's shared expert, {gate, up} [Fs,H] and down [H,Fs], summed over the world
  /// (every rank computes it on its own tokens); empty tensors when there is none.
  std::array<HostTensor, 3> shared_expert;
  HostTensor shared_expert_gate;  ///< [1,H] for a gated shared expert (Qwen2-MoE), else empty
};

/// Writable views of the model's parameters, for an optimizer step (`Runtime::parameters`):
/// host f32, laid out as `ModelGradients`. The layers and expert kernels read these same
/// tensors, so a change is seen by the next forward. Valid while the runtime lives.
struct ModelParameters {
  TensorView gate;  ///< [E,H] the router's gate weight
  /// [E]: per expert {gate, up} [F,H] and down [H,F]; empty views for the experts no rank
  /// of this process holds.
  std::vector<std::array<TensorView, 3>> experts;
  /// The shared expert's {gate, up, down} and gate [1,H], as `ModelGradients`; empty views
  /// when there is none.
  std::array<TensorView, 3> shared_expert;
  TensorView shared_expert_gate;
};

/// Built from a configuration; owns the plugin registry, the model weights, the transports
/// of the ranks this process hosts (several for the in-process transport) and, per such
/// rank, one `MoELayer` per MoE layer of the model. A model is L MoE layers (`[model]
/// layers`; one by default) over the same EP and DP groups: the process creates one world
/// transport and one EP and DP split per rank whatever L is, and the layers of a rank
/// share one data path and one set of step buffers (`LayerWorkspace`); each layer has its
/// own gate, bias, router state, experts and statistics. Layers are named by their index
/// 0..L-1 (`layer_ids()` gives the checkpoint's layer numbers). Methods are called from
/// one thread; `run_on_ranks` runs a function on every local rank concurrently.
class Runtime {
 public:
  /// Validates `config`, loads plugins from the standard search path plus
  /// `[runtime] plugin_dirs`, loads or initialises the model and builds the layers.
  /// Throws `Error` with a message that says what to fix; nothing is left running.
  explicit Runtime(const Config& config);
  ~Runtime();
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  const ResolvedConfig& settings() const noexcept;
  const PluginRegistry& plugins() const noexcept;
  /// The weights of model layer `layer` (index 0..L-1).
  const ModelWeights& model(int layer = 0) const;
  /// L, the number of MoE layers of the model.
  int num_layers() const noexcept;
  /// The checkpoint's layer number of each layer index (`[model] layers`; {0} by default).
  std::span<const int> layer_ids() const noexcept;
  const Topology& topology() const noexcept;
  int world_size() const noexcept;
  int num_local_ranks() const noexcept;
  /// World rank of local rank `local`.
  int world_rank(int local) const;
  /// Model layer `index` of local rank `local`.
  MoELayer& layer(int local, int index = 0);
  /// Ranks per EP group (`[runtime] ep_size`, default the world size). The world is
  /// dp × ep: EP groups are blocks of ep consecutive ranks and hold every expert once;
  /// expert weights are replicated across the dp groups.
  int ep_size() const noexcept;
  /// The communicator of all ranks, of local rank `local`.
  Transport& world_transport(int local);
  /// The data-parallel group of local rank `local`: the ranks holding the same experts
  /// (for gradient allreduce).
  Transport& dp_transport(int local);

  /// Calls `fn(local)` for every local rank, each in its own thread when there are
  /// several, and waits. If any throws, the transports are aborted so that the others
  /// stop too, and the root-cause error is rethrown (not a peer's kPeerFailed).
  void run_on_ranks(const std::function<void(int local)>& fn);

  /// After a failure: tells every transport of this process that it failed (see
  /// `Transport::abort`), so that peers stop instead of waiting for their timeout; with
  /// MPI this ends the job. Call it after reporting the error. Never throws.
  void abort(const std::string& reason) noexcept;

  /// Forward over global tokens x [T,H]: each local rank takes its `token_block` and
  /// writes its rows of y [T,H]. When the router balances by bias
  /// (`updates_from_counts`), the kept counts are then summed over each EP group and every
  /// rank updates its router with the same sums, so the bias stays identical on all ranks.
  /// x and y are host tensors, or both on the device of the data path (`[runtime]
  /// data_path`), which the layers take as they are; returns when y is written.
  void forward(const TensorView& x, const TensorView& y, int layer = 0);
  /// The ids [T] (i32 or i64, host) of the tokens that the next `forward`,
  /// `forward_local_tokens` (also `_on_stream`) or `forward_model` takes (T as its x's), for
  /// layers whose
  /// router routes by them (`[router] policy = "hash"`): every local rank gets its block, as
  /// of x, and in `forward_model` every layer the same ids. Borrowed until that call, which
  /// uses and forgets them.
  void set_token_ids(const TensorView& token_ids);
  /// The whole model over global tokens x [T,H]: every MoE layer in order, the output of
  /// layer l the input of layer l+1, into y [T,H] (as `forward` per layer); with
  /// `[model] residual = true` each layer's output is h + MoE_l(h). With one layer and no
  /// residual the same as `forward`. x and y must not overlap. Collective.
  void forward_model(const TensorView& x, const TensorView& y);
  /// `[model] residual`: the chain of `forward_model` is h + MoE_l(h).
  bool residual() const;
  /// Bytes of step buffers this process's layers hold (each shared workspace once, plus
  /// every layer's own logits, plan and kept rows): their peak, as buffers only grow.
  std::size_t step_buffer_bytes() const noexcept;
  /// Forward over this process's tokens x [T,H]: its local ranks take consecutive blocks
  /// of them (`token_block` over the local ranks) and write their rows of y [T,H]. With
  /// one rank per process (mpirun, `switchyard launch`), x is that rank's own tokens;
  /// with every rank in this process, the same as `forward`. Collective; router updates
  /// as in `forward`.
  void forward_local_tokens(const TensorView& x, const TensorView& y, int layer = 0);
  /// `forward_local_tokens` ordered on a stream of the caller's on the data path's device,
  /// `caller_stream` (its native handle: a `cudaStream_t` for CUDA; see
  /// `MoELayer::forward(x, y, caller)`): every local rank's work starts after the work
  /// queued on it before the call, and work queued on it afterwards runs after y is
  /// written. x and y on the device. Returns without waiting for y: the host waits only for
  /// the counts. Collective; router updates as in `forward`.
  void forward_local_tokens_on_stream(const TensorView& x, const TensorView& y, void* caller_stream,
                                      int layer = 0);
  /// The dispatch alone, for experts the caller computes: this process's tokens x [T,H]
  /// f32 (host, or on the data path's device) with the routing `experts` [T,K] int32 or
  /// int64 (-1: unused slot) and `weights` [T,K] f32 (host, any strides), split among the local
  /// ranks as in `forward_local_tokens`. Each part's handle then holds the rows its rank received,
  /// per local expert, in the data path's memory (device views for a device data path;
  /// `rows_per_expert()` on the host); returns when they are written. Refused with
  /// `Error(kInvalidArgument)` on every rank together, before any row moves: shapes, expert ids
  /// outside 0..E-1, non-finite weights, and NaN or infinite host tokens (tokens on the device are
  /// not read by the host). Collective.
  void dispatch(const TensorView& x, const TensorView& experts, const TensorView& weights,
                ProcessDispatch& dispatched, int layer = 0);
  /// Weighs the experts' results, sends them back and sums them per token into y [T,H]
  /// (f32, host or on the data path's device; returns when it is written).
  /// `expert_outputs` has one [A,H] f32 tensor per part in the data path's memory, in the
  /// order of its `expert_input()` (a part's own `expert_output()` may be given). Once per
  /// dispatch.
  /// Arguments are checked before anything is sent; with one rank per process a rank that
  /// refuses leaves its peers to their timeout. Collective.
  void combine(ProcessDispatch& dispatched, std::span<const TensorView> expert_outputs,
               const TensorView& y);

  /// The backward of `combine` for experts the caller computes (autograd): given the
  /// `dispatched` whose combine gave y, the `expert_outputs` it combined (one [A,H] per
  /// part) and dy [T,H] (this process's tokens): writes `d_expert_outputs` (one [A,H] per
  /// part: each row's slot weight · dy of its token) and d_weights [T,K] (<dy, expert
  /// output> per kept slot of the plan; 0 for empty ones). A NaN or infinite dy is refused
  /// on every rank together. Host data path. Collective.
  void combine_backward(ProcessDispatch& dispatched, std::span<const TensorView> expert_outputs,
                        const TensorView& dy, std::span<const TensorView> d_expert_outputs,
                        const TensorView& d_weights);
  /// The backward of `dispatch`: given one [A,H] gradient per part for its expert_input,
  /// writes dx [T,H] (per token, the sum over the rows it was sent as). Collective.
  void dispatch_backward(ProcessDispatch& dispatched, std::span<const TensorView> d_expert_inputs,
                         const TensorView& dx);

  /// Training mode for every layer of every local rank (`MoELayer::set_training`): its forwards
  /// keep what the backward needs, unless `[runtime] recompute = true`, and `forward_model`
  /// keeps each layer's input for `backward_model`. Off by default (a forward
  /// for inference keeps nothing); `backward` works after either.
  void set_training(bool training);

  /// The backward of the last `forward(x, y)`, given the same global x [T,H] and
  /// dy = dL/dy [T,H]: writes dx [T,H] (each local rank its block) and the parameters'
  /// gradients (`ModelGradients`); the router's aux and z losses (their coefficients in
  /// [router]) are differentiated over each EP group. Bad input (shapes, NaN or infinite
  /// dy) is refused on every rank together. x, dy and dx are host tensors, or all on the
  /// device of a device data path (see `MoELayer::backward`); the gradients are host
  /// tensors. Collective.
  void backward(const TensorView& x, const TensorView& dy, const TensorView& dx,
                ModelGradients& gradients, int layer = 0);
  /// The backward of the last `forward_local_tokens(x, y)`: x, dy and dx are this
  /// process's tokens, split among its local ranks as there. Otherwise as `backward`.
  void backward_local_tokens(const TensorView& x, const TensorView& dy, const TensorView& dx,
                             ModelGradients& gradients, int layer = 0);
  /// The backward of the last `forward_model(x, y)` made in training mode (`set_training`),
  /// which kept every layer's input: dy [T,H] of the model's output passes backward through
  /// the layers in reverse, each layer's dx (plus its dy with a residual) the dy of the one
  /// before, into dx [T,H] (as `backward` per layer). `gradients` is resized to L; element l is
  /// layer l's. With one layer the same as `backward`. Throws `Error(kInvalidArgument)` when no
  /// such forward on T tokens came before. Collective.
  void backward_model(const TensorView& x, const TensorView& dy, const TensorView& dx,
                      std::vector<ModelGradients>& gradients);

  /// The parameters this process's ranks train (see `ModelParameters`), for an optimizer
  /// to update in place between steps (never while a forward or backward runs). The
  /// in-process ranks share one copy of the weights, so a process updates each tensor once,
  /// with the gradients of `backward` (which every rank holding the tensor sees alike);
  /// processes then stay identical. Throws `Error(kInvalidArgument)` when the experts are
  /// not f32 (a bf16 model: train an f32 copy), and `Error(kUnavailable)` for a device data
  /// path (it keeps its own copy of the gate).
  ModelParameters parameters(int layer = 0);
  /// Collective: writes the model as a safetensors checkpoint at `path` from world rank 0
  /// (others write nothing), in `[model] format` with its `prefix` (its "{layer}" replaced
  /// by each layer's number): per layer the gate, every expert's weights (gathered from
  /// EP group 0) in f32, the selection bias the checkpoint had (DeepSeek format), and the
  /// shared expert (in f32, FP8 ones dequantised) with its gate, named as it was read.
  /// `[model] weights = path` with the same `layers` loads it back. A model of several
  /// layers needs "{layer}" in its prefix (`Error(kInvalidArgument)` otherwise).
  void save_model(const std::filesystem::path& path);

  /// The dense single-process reference of the same computation (each rank's block
  /// routed as that rank routes it, experts evaluated directly in double precision).
  void reference_forward(const TensorView& x, const TensorView& y, int layer = 0) const;
  /// The dense reference of `forward_model`: `reference_forward` of every layer in order
  /// (with the residual when configured).
  void reference_model(const TensorView& x, const TensorView& y) const;

  /// Collective: copies every rank's `token_block` rows of y [T,H] to world rank 0, so
  /// that rank 0's y holds all rows. Nothing to do when this process hosts every rank.
  void gather_rows(const TensorView& y);

  /// Collective over the world: places every layer's experts anew for the load its routers
  /// measured since the runtime was made or the last rebalance (`MoELayer::expert_load`,
  /// summed over all ranks; the same plan on every rank, as nothing rank-local enters it),
  /// with the slots it has (E + `[runtime] redundant_experts`, or the placement file's),
  /// by the expert balancer; sends each slot's weights that its new rank does not hold
  /// from the lowest EP rank that does, over the EP group's transport; and only when every
  /// rank of every layer has its new weights switches all layers, keeping their routers and
  /// buffers. The bytes that arrive are checked against this process's model (which holds
  /// every expert); a difference is an `Error(kInternal)` on that rank. In training the new
  /// kernels view the model's tensors, which `parameters` gives the optimizer; otherwise
  /// the moved copies. A layer with no load measured keeps its placement. A failure before
  /// the switch (a rank lost, a timeout, a difference) throws on every rank and leaves the
  /// previous placement in force. Between steps; host data path. The loads count from zero
  /// again afterwards.
  std::vector<RebalanceReport> rebalance();

  /// Collective: sends the expert gradients of layer `layer` from EP group 0's ranks to
  /// world rank 0, so that rank 0's `gradients.experts` holds every expert's: a replicated
  /// expert's copies summed (in slot order), or, with `sum_copies` false (tensors every copy
  /// holds alike, e.g. the weights), its first copy's. Nothing to do when this process hosts
  /// every rank.
  void gather_expert_gradients(ModelGradients& gradients, int layer = 0, bool sum_copies = true);

  /// The worst-case mode's reports (`MoELayer::finish_worst_case_steps`) of every layer of
  /// every local rank, waited for: throws the first failure they hold once all are taken.
  /// Local, not collective.
  void finish_worst_case_steps();
  /// Statistics of the last forward, reduced over all ranks (collective; call after
  /// `forward`).
  GlobalRouterStats global_router_stats(int layer = 0);
  /// The slowest rank's time per phase of layer `layer`'s last forward (collective).
  LayerTimings max_timings(int layer = 0);
  /// Bytes all ranks sent to other ranks in layer `layer`'s last forward (collective).
  LayerTraffic total_traffic(int layer = 0);

 private:
  /// Views of the model's weights for local rank `local`'s slots of layer `layer`.
  std::vector<SwigluExpertWeights> model_slot_weights(int layer, int local) const;
  /// Replaces local rank `local`'s layer `layer` with one over the current slot map whose
  /// kernel holds `views` (kept in `storage`, when they are its), keeping its parts.
  void switch_layer(int layer, int local, std::vector<SwigluExpertWeights> views,
                    std::vector<HostTensor> storage);
  /// The logical expert slot `slot` of layer `layer` holds.
  int expert_of_slot(int layer, int slot) const;
  /// Adds the three gradient tensors of one slot to its expert's in `gradients` (the first
  /// time an expert is `touched`, copies them there).
  static void add_slot_gradient(ModelGradients& gradients, std::vector<bool>& touched, int expert,
                                const HostTensor* slot_tensors);
  /// Calls `fn(expert, weights)` for every slot a local rank holds (its expert's global id;
  /// an expert twice when the rank holds two copies).
  void for_each_held_expert(
      int layer,
      const std::function<void(int expert, const SwigluExpertWeights& weights)>& fn) const;
  /// After a step of `layer`: group-summed kept counts to its routers that balance by bias.
  void update_routers(int layer);
  /// Throws `Error(kInvalidArgument)` unless 0 <= layer < L.
  void check_layer(int layer, const char* what) const;
  /// Runs `step(local, first, count)` on every local rank with its block of T rows (of the
  /// world's blocks when `world_blocks`, else of this process's). Failures every rank saw
  /// together (bad input) are rethrown after all ranks return, naming the failing rank's
  /// rows, without aborting the transports; any other failure is `run_on_ranks`'.
  void run_blocks(std::int64_t num_tokens, bool world_blocks, int layer,
                  const std::function<void(int, std::int64_t, std::int64_t)>& step);
  void forward_blocks(const TensorView& x, const TensorView& y, bool world_blocks, int layer);
  void backward_blocks(const TensorView& x, const TensorView& dy, const TensorView& dx,
                       ModelGradients& gradients, bool world_blocks, int layer);
  /// One local rank's block through its layer; host blocks of a device layer are staged
  /// through device buffers.
  void forward_block(int local, int layer, const TensorView& x, const TensorView& y);
  /// The same for the backward (`out.dx` a block of this process's dx).
  void backward_block(int local, int layer, const TensorView& x, const TensorView& dy,
                      LayerGradients& out);
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace switchyard
