#pragma once
/// \file
/// One expert-parallel MoE layer on one rank: route → dispatch → experts → combine.

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "switchyard/buffer.hpp"
#include "switchyard/data_path.hpp"
#include "switchyard/expert_kernel.hpp"
#include "switchyard/placement.hpp"
#include "switchyard/router.hpp"
#include "switchyard/router_logits.hpp"
#include "switchyard/status.hpp"
#include "switchyard/tensor.hpp"
#include "switchyard/transport.hpp"

namespace switchyard {

/// Wall time of each phase of the last forward, in seconds.
struct LayerTimings {
  double route_s = 0;     ///< logits and router
  double layout_s = 0;    ///< grouping rows per destination and per local expert
  double dispatch_s = 0;  ///< counts exchange and alltoallv of rows and metadata
  double experts_s = 0;   ///< expert kernel
  double combine_s = 0;   ///< partial sums, alltoallv back, final sum
};

/// Bytes of the last forward that left this rank for another (self-sends not counted).
struct LayerTraffic {
  std::uint64_t dispatch_bytes = 0;  ///< token rows and their (expert, weight) metadata
  std::uint64_t combine_bytes = 0;   ///< partial result rows
  std::int64_t rows_sent = 0;        ///< token rows dispatched to other ranks
};

/// What `dispatch` produced and `combine` needs: the layout of this step and the rows this
/// rank received, grouped per local expert. Owned by the caller and reused across steps
/// (buffers only grow). Must not be shared by two layers at once.
class DispatchHandle {
 public:
  /// Received rows grouped per local expert, [A,H], A = sum of rows_per_expert(): f32 after
  /// `MoELayer::dispatch` (in the layer's own forward, the kernel's `input_dtype`).
  TensorView expert_input() noexcept;
  /// A buffer of the same shape as expert_input() for the experts' results: f32 after
  /// `MoELayer::dispatch` (in the layer's own forward, the kernel's `output_dtype`).
  TensorView expert_output() noexcept;
  /// Rows per local expert (host memory).
  std::span<const std::int64_t> rows_per_expert() const noexcept {
    return {rows_per_expert_.data(), rows_per_expert_.size()};
  }
  /// The first row of each local expert's block in expert_input() and expert_output()
  /// (host memory): the running sum of rows_per_expert(), each block padded to a multiple of
  /// the layer's `expert_alignment` (`[runtime] expert_alignment`, for grouped GEMMs) with
  /// zero rows that no slot reads.
  std::span<const std::int64_t> expert_first_row() const noexcept {
    return {expert_first_row_.data(), expert_first_row_.size()};
  }

 private:
  friend class MoELayer;
  friend class TokenExchange;
  friend class LayerWorkspace;
  /// Bytes its buffers hold.
  std::size_t capacity_bytes() const noexcept;
  /// Takes the data path's memory for the buffers on its device (once; they then grow).
  void use_memory(Allocator& device, Allocator& staging);
  std::int64_t hidden_ = 0;
  std::int64_t num_tokens_ = 0;
  int slots_ = 0;
  PayloadDType payload_dtype_ = PayloadDType::kF32;
  DType expert_input_dtype_ = DType::kF32;   // of expert_input_'s rows (f32 or bf16)
  DType expert_output_dtype_ = DType::kF32;  // of expert_output_'s rows (f32 or bf16)
  // Per destination / source rank (host staging memory): rows, first row, and the
  // exchanges' byte counts.
  Buffer<std::int64_t> rows_to_, rows_from_;
  Buffer<std::int64_t> rows_to_offset_, rows_from_offset_;
  Buffer<std::size_t> send_bytes_, send_offsets_, recv_bytes_, recv_offsets_;
  Buffer<std::size_t> meta_send_bytes_, meta_send_offsets_, meta_recv_bytes_, meta_recv_offsets_;
  // Dispatched rows in (destination rank, token) order: payload, slots, and token of each.
  Buffer<std::byte> send_rows_;
  Buffer<PackRun> pack_runs_;  // host: where each destination's rows are packed
  Buffer<SlotMeta> send_meta_;
  Buffer<std::int64_t> send_row_token_;
  // Received rows in (source rank, source token) order, and their slots.
  Buffer<std::byte> recv_rows_;
  Buffer<SlotMeta> recv_meta_;
  // Expert-grouped rows and, per (received row, slot), its index in them (-1: empty).
  Buffer<std::int64_t> rows_per_expert_, expert_first_row_;
  Buffer<float> expert_input_, expert_output_;
  Buffer<std::int64_t> assignment_of_slot_;
  // The worst-case mode (device memory): each expert block's rows that are tokens, and the
  // first slot of the plan with an expert id outside the range (-1: none).
  Buffer<std::int64_t> rows_in_block_, first_bad_slot_;
  // Combine: the exchange's byte counts, and its rows in the combine dtype (their own
  // buffers, or the expert rows' when the layer reuses those).
  Buffer<std::size_t> back_send_bytes_, back_send_offsets_, back_recv_bytes_, back_recv_offsets_;
  Buffer<std::byte> partial_rows_, combined_rows_;
  std::byte* partial_at_ = nullptr;
  std::byte* combined_at_ = nullptr;
  // The slot-order combine (`MoELayerParts::combine_order`, host): one returned row per
  // kept (token, slot); per peer the rows it returns and this rank returns, and for each
  // (token, k) of the plan its row among the returned ones (-1: dropped).
  Buffer<std::int64_t> slot_rows_to_, slot_rows_from_, slot_position_;
  // Host staging of the exchanges when the data path is a device's and the transport takes
  // host memory only: what this rank sends, and what it receives of the rows, their slots
  // and the partial sums (apart, as their copies to the device may still be queued).
  Buffer<std::byte> staged_send_, staged_rows_, staged_meta_, staged_back_;
};

/// The step buffers of a rank's layers: the stream they run on, the step's counts, the
/// exchange buffers of a forward's chunks in flight (when it keeps nothing for the
/// backward), and the backward's scratch. Layers of one rank run one after another, so the
/// L layers of a model share one workspace (see `MoELayerParts::workspace`) and their step
/// memory does not grow with L. Defined in the core's layer_internal.hpp; made by
/// `make_layer_workspace`, used by one thread at a time.
class LayerWorkspace;
class TokenExchange;
/// A new, empty workspace; its buffers take the memory of the first layer's data path.
std::shared_ptr<LayerWorkspace> make_layer_workspace();
/// Bytes a workspace's buffers hold (their peak, as they only grow).
std::size_t workspace_bytes(const LayerWorkspace& workspace) noexcept;

/// How a layer's combine orders a token's sum (`MoELayerParts::combine_order`).
enum class CombineOrder : std::uint8_t { kRank, kSlot };

/// The parts a layer is built from. The layer borrows `transport` and `gate`; it shares
/// ownership of the router and the kernel.
struct MoELayerParts {
  Transport* transport = nullptr;  ///< the EP group
  std::shared_ptr<Router> router;
  /// This rank's local experts per `placement`: one per slot (a slot's weights are its
  /// logical expert's, per `slot_map`).
  std::shared_ptr<ExpertKernel> experts;
  TensorView gate;  ///< f32 [E,H]
  /// The expert slots over the EP group's ranks: E of them (slot e is expert e) without a
  /// `slot_map`, else the map's S.
  ExpertPlacement placement;
  /// Which logical expert each slot holds and each copy's share of its tokens (a shuffled
  /// or replicated placement: `ExpertSlotMap`); empty: slot e is expert e. Each routed
  /// (token, expert) goes to the slot `ExpertSlotMap::choose_slot` names for (this rank,
  /// the token's index in the forward, the expert), decided by the token's own rank, and
  /// its row carries that slot: the receiver never chooses. The router, its statistics and
  /// its gradients stay in logical experts. Host data path; not in the worst-case mode.
  ExpertSlotMap slot_map;
  /// The data-path primitives (a datapath plugin's); null: the core's host data path.
  std::shared_ptr<DataPath> data_path;
  PayloadDType payload_dtype = PayloadDType::kF32;  ///< dtype of dispatched rows
  DType combine_dtype = DType::kF32;  ///< dtype of the partial sums sent back (f32, bf16)
  /// `forward` splits the tokens into this many chunks and pipelines them: the exchanges
  /// of one chunk run on a communication thread while this thread packs, groups, runs the
  /// experts of and sums another. The same y for every value (routing sees all tokens).
  /// Host data path only; a device data path runs one chunk.
  int chunks = 1;
  /// `dispatch` (the caller's experts): each local expert's rows start at a multiple of
  /// this in the grouped rows, the gaps zero (`DispatchHandle::expert_first_row`).
  std::int64_t expert_alignment = 1;
  /// The worst-case mode when > 0 (`[runtime] max_tokens_per_rank`): no rank's forward
  /// has more tokens than this (more is refused), so every exchange moves a fixed block of
  /// this many rows per peer (padding included) and each local expert's rows a block of
  /// ranks × this many, and the host reads nothing back: a forward on a device data path
  /// with a stream-ordered transport queues its whole step without a host wait (DeepEP's
  /// low-latency mode, for decoding and CUDA graphs). The price: the padding's bytes, and
  /// checks that need the host (NaN logits, bad expert ids in a device plan, the routing
  /// statistics) come after the step (`MoELayer::finish_worst_case_steps`). Training
  /// forwards (their backward needs the step's routing statistics) and `dispatch` count as
  /// usual. 0: off.
  std::int64_t max_tokens_per_rank = 0;
  /// How y sums a token's expert outputs. kRank (the default): each expert rank sends
  /// back one partial sum per token (its slots, in routing order), summed in rank order:
  /// fewest bytes, but the bits depend on which experts share a rank. kSlot: each rank
  /// sends back every kept slot's weighted output, summed per token in routing order (k =
  /// 0, 1, ...): the same bits for every placement of the experts (contiguous, shuffled,
  /// replicated, rebalanced), for up to K / (ranks per token) times the combine's bytes.
  /// Host data path; not fused; not in the worst-case mode.
  CombineOrder combine_order = CombineOrder::kRank;
  /// With chunks: true runs the exchanges on a thread of their own, overlapping the other
  /// chunks' work; false runs them on the calling thread, chunk after chunk (no overlap,
  /// but each chunk's rows stay in the caches from pass to pass: the faster choice where
  /// every core already runs a rank). The same y either way.
  bool overlap_exchanges = true;
  /// In training mode (`MoELayer::set_training`): false keeps the forward's received
  /// rows and the kernel's saved columns (`ExpertKernel::saved_columns`) for the backward,
  /// which then neither dispatches x again nor recomputes them; true keeps only the plan.
  /// (`[runtime] recompute`.)
  bool recompute = false;
  /// The world rank of the EP group's rank 0 (groups are blocks of consecutive world
  /// ranks), so that messages name world ranks.
  int first_world_rank = 0;
  /// Step buffers shared with the other layers of this rank, which must use the same
  /// `data_path` object (null: the layer's own). What a training forward keeps for the
  /// backward is always the layer's own.
  std::shared_ptr<LayerWorkspace> workspace;
  /// The layer's shared expert (`SharedExpertWeights`) as a kernel holding it as its one
  /// local expert: every forward runs it over this rank's own tokens and adds its output
  /// to the routed experts'; nothing of it is dispatched. Null: none. Host data path only.
  std::shared_ptr<ExpertKernel> shared_expert;
  /// [1,H] f32 host: the shared expert's output is scaled per token by sigmoid(x·gate)
  /// (Qwen2-MoE's `shared_expert_gate`); empty: added as it is.
  TensorView shared_expert_gate;
};

/// The first NaN or infinite value of the f32 host matrix m [T,H] (contiguous) as an
/// `Error(kInvalidArgument)` "<what>: token t feature h is NaN"; nothing when all are finite.
std::optional<Error> first_non_finite(const TensorView& m, std::string_view what);

/// Where `MoELayer::backward` puts the gradients of one step on one rank (host memory, dx on
/// a device data path's device; owned by the caller).
struct LayerGradients {
  TensorView dx;  ///< [T,H] f32, written: through the experts and through the router
  /// This rank's local experts' weight gradients, added to (see `ExpertKernel::backward`).
  std::span<const SwigluExpertGradients> d_experts;
  TensorView d_gate;  ///< [E,H] f32, added to: the router's gate weight
  /// The scope of the router's aux and z losses (`RouteGradientInput`): the EP group's
  /// tokens and plain top-k counts; 0 and empty: this rank's own.
  std::int64_t loss_tokens = 0;
  std::span<const std::int64_t> loss_aux_counts;
  /// With a shared expert (`MoELayerParts::shared_expert`): its weight gradients, added to
  /// (f32, gate and up [Fs,H], down [H,Fs]), and, when it is gated, its gate's [1,H].
  SwigluExpertGradients d_shared_expert = {};
  TensorView d_shared_expert_gate = {};
};

/// One MoE layer on one rank of an EP group. Every rank of the group calls `forward` (or
/// `dispatch` then `combine`) the same number of times, each with its own tokens (T may
/// differ per rank, and be 0). Buffers are reused: after the first step with the largest
/// T, a step allocates nothing. Not thread-safe: one thread per layer.
class MoELayer {
 public:
  explicit MoELayer(MoELayerParts parts);
  ~MoELayer();
  MoELayer(const MoELayer&) = delete;
  MoELayer& operator=(const MoELayer&) = delete;

  /// y [T,H] = MoE(x [T,H]); both f32 contiguous in the data path's memory (host, or its
  /// device for a device data path), not aliased. Runs on the layer's `stream()` and
  /// returns when y is written. Collective over the EP group. If routing fails on any
  /// rank (bad shape, NaN logits), every rank throws: the failing one its own error, the
  /// others `Error(kPeerFailed)`; nothing is sent.
  void forward(const TensorView& x, const TensorView& y);
  /// The same forward, returning once y's last work is queued on `stream()` instead of
  /// when it is done: `done` (an event of `stream()`, from its `create_event`) is recorded
  /// after it, and y is written when `done.query()` is true or `done.synchronize()`
  /// returns (or when later work on `stream()` has run). On a device data path the host
  /// then waits once per forward, for the counts. Failures as in `forward`.
  void forward(const TensorView& x, const TensorView& y, StreamEvent& done);
  /// The same forward ordered on a stream of the caller's, `caller` (of the data path's
  /// device; e.g. `DataPath::borrow_stream` of the framework's current stream): the layer's
  /// work starts after the work queued on `caller` before the call (x written), and work
  /// the caller queues on `caller` afterwards runs after y is written. Returns without
  /// waiting for y; on a device data path the host waits once, for the counts. Failures as
  /// in `forward`.
  void forward(const TensorView& x, const TensorView& y, Stream& caller);
  /// The same forward with the routing given: `plan` (on the data path's device, for x's
  /// T tokens) instead of the layer's router (a plan shared between layers, replayed, or a
  /// benchmark's fixed routing). Collective; failures as in `forward`.
  void forward(const TensorView& x, const RoutingPlan& plan, const TensorView& y);

  /// The ids [T] (i32 or i64, host) of the tokens of the next `forward` or `route`, for a
  /// router that routes by them (`Router::needs_token_ids`: hash routing). Borrowed until
  /// that call, which uses and forgets them. Throws `Error(kInvalidArgument)` for device
  /// memory.
  void set_token_ids(const TensorView& token_ids);
  /// Logits and router only: fills `plan` for x [T,H]. Local, not collective.
  void route(const TensorView& x, RoutingPlan& plan);
  /// Sends each token once to every rank that holds one of its experts, with its list of
  /// (local expert, weight); fills `handle` with the received rows grouped per local
  /// expert (in the data path's memory) and returns when they are written. Collective.
  /// `refused`: this rank's caller found its input bad (e.g. a NaN token); every rank then
  /// throws together before any row moves, this one `*refused`, the others
  /// `Error(kPeerFailed)` (as for a bad plan or a bad x).
  void dispatch(const TensorView& x, const RoutingPlan& plan, DispatchHandle& handle,
                const Error* refused = nullptr);
  /// Weights and sums the expert results per received row, sends the partial sums back
  /// and sums them per token into y [T,H] (tokens with no kept expert get 0); returns when
  /// y is written. Collective. `expert_output` is [A,H] in the order of
  /// `handle.expert_input()`, f32 or bf16 (each element widened exactly before it is
  /// weighed).
  void combine(DispatchHandle& handle, const TensorView& expert_output, const TensorView& y);

  /// The expert slots over the EP group's ranks (see `MoELayerParts::placement`).
  const ExpertPlacement& placement() const noexcept { return parts_.placement; }
  /// Which logical expert each slot holds (empty: slot e is expert e).
  const ExpertSlotMap& slot_map() const noexcept { return parts_.slot_map; }
  /// E, the logical experts the router chooses among.
  int num_experts() const noexcept {
    return parts_.slot_map.empty() ? parts_.placement.num_experts() : parts_.slot_map.num_experts();
  }
  /// The slots the last forward, dispatch or backward sent each (token, k) to: `plan`'s
  /// experts translated by the slot map ([T,K], -1 kept), or `plan` itself without one.
  /// Throws `Error(kInvalidArgument)` for an expert id outside -1..E-1.
  const RoutingPlan& slot_plan(const RoutingPlan& plan);
  /// The (token, expert) assignments this rank's forwards routed to each logical expert
  /// ([E]) and sent to each slot ([S]) since the layer was made or `reset_load` ran: the
  /// load `Runtime::rebalance` plans from. Forwards with a plan in device memory are not
  /// counted.
  std::span<const std::int64_t> expert_load() const noexcept { return expert_load_; }
  std::span<const std::int64_t> slot_load() const noexcept { return slot_load_; }
  void reset_load() noexcept;
  /// The parts the layer was built from (to build another layer like it, e.g. with other
  /// experts).
  const MoELayerParts& parts() const noexcept { return parts_; }

  /// The worst-case mode (`MoELayerParts::max_tokens_per_rank`) checks each forward after
  /// it ran, without a host wait: a later forward takes the reports of the steps that have
  /// finished, or this waits for all. A report holds the routing statistics of a device
  /// routing (the router's `stats()`: kept counts and imbalance; the aux and z losses are
  /// not gathered, 0), and two failures, thrown here or at the end of the later forward
  /// (after its work is queued, so that the EP group stays in step): tokens with a NaN or
  /// infinite router logit (they went to no expert; their y is the other terms' only) and
  /// a device plan's expert ids outside 0..E-1 (the token was not sent). Only the rank that
  /// found the failure throws. Nothing to do outside the worst-case mode.
  void finish_worst_case_steps();
  /// `finish_worst_case_steps` with the first failure returned instead of thrown (for a
  /// caller that must reach a collective first).
  std::optional<Error> wait_worst_case_steps();

  /// Training mode: forwards keep what `backward` needs (see `MoELayerParts::recompute`).
  /// A forward that keeps it runs unchunked and grouped (the same y).
  void set_training(bool training) noexcept { training_ = training; }
  bool training() const noexcept { return training_; }
  /// True when `backward` may follow: the last forward was `forward(x, y)` (the layer
  /// routed), it finished, and `route` has not run since.
  bool backward_ready() const noexcept { return backward_ready_; }
  /// True when the last forward kept its rows and projections for `backward`.
  bool kept_for_backward() const noexcept { return kept_for_backward_; }

  /// The backward of the last `forward(x, y)`, given the same x [T,H] and dy = dL/dy
  /// [T,H] (f32 contiguous, where x is): dy goes to the experts' ranks with the forward's layout;
  /// there each (row, slot)'s expert runs its backward on weight · dy (adding the local
  /// experts' gradients), and the slot's weight gets <dy, expert output>; the rows' input
  /// gradients come back summed per token into dx; the weights' gradients come back to
  /// their tokens for the router's backward, whose d logits give dx += d logits · gate and
  /// d gate += d logitsᵀ · x. When the forward kept its rows (training mode, recompute
  /// off) the experts take its received rows and projections; otherwise x is dispatched
  /// again and the experts' projections recomputed (the same bits either way). The
  /// forward's logits are reused. Follows a `forward(x, y)` only (`backward_ready`):
  /// otherwise `Error(kInvalidArgument)`, before anything moves. A NaN or infinite dy
  /// is refused on every rank together, before anything moves (as bad input is in `forward`).
  /// On a device data path x, dy and dx are on its device (`out`'s other gradients in the
  /// memory its expert kernel takes); the experts' backward and the exchanges run there, and
  /// the router's backward on the host from copies of the logits, the plan, x and dx (the
  /// rows' slots and weights' gradients go through the host too). Returns when dx is
  /// written; allocates nothing once its buffers have grown. Collective over the EP group.
  void backward(const TensorView& x, const TensorView& dy, const LayerGradients& out);
  /// The backward of `combine` for a caller's own experts (autograd frameworks): given the
  /// `handle` and `plan` of the dispatch, the `expert_output` [A,H] that was combined and
  /// dy [T,H], writes d_expert_output [A,H] (each grouped row: its slot's weight · dy of
  /// its token) and d_weights [T,K] (each kept slot: <dy, its expert's output>; 0 for
  /// empty slots). Dispatches dy with the plan's layout. Host data path. Collective.
  void combine_backward(DispatchHandle& handle, const RoutingPlan& plan,
                        const TensorView& expert_output, const TensorView& dy,
                        const TensorView& d_expert_output, const TensorView& d_weights);
  /// The backward of `dispatch`: given d_expert_input [A,H] (per grouped row of `handle`),
  /// writes dx [T,H], per token the sum over the rows it was sent as. Leaves the handle
  /// as it was. Host data path. Collective.
  void dispatch_backward(DispatchHandle& handle, const TensorView& d_expert_input,
                         const TensorView& dx);
  /// The stream the layer's work is ordered on, from its data path: for the host data path
  /// a queued host stream when the transport is stream-ordered, else an inline one.
  Stream& stream() noexcept;
  Transport& transport() const noexcept { return *parts_.transport; }
  Router& router() const noexcept { return *parts_.router; }
  /// This rank's expert kernel.
  ExpertKernel& experts() const noexcept { return *parts_.experts; }
  /// Bytes the layer's step buffers hold (they only grow, so this is their peak): its own
  /// (`own_buffer_bytes`) and its workspace's, which it may share with other layers.
  std::size_t buffer_bytes() const noexcept;
  /// Bytes of the buffers only this layer holds: its logits and plan, and what a training
  /// forward kept for the backward.
  std::size_t own_buffer_bytes() const noexcept;
  /// The step buffers this layer uses (perhaps shared; see `MoELayerParts::workspace`).
  const LayerWorkspace& workspace() const noexcept { return *workspace_; }
  /// The data path the layer runs on (its device and memory).
  DataPath& data_path() const noexcept { return *data_path_; }
  /// The plan of the last `forward`.
  const RoutingPlan& last_plan() const noexcept { return plan_; }
  const LayerTimings& timings() const noexcept { return timings_; }
  /// True when the last `forward` or `dispatch` failed at the point where every rank of
  /// the EP group learns of it together (bad input on some rank, found before any data
  /// moved): every rank threw there, and the group is usable for the next step. In the
  /// worst-case mode, also when the forward threw after queuing its whole step (its own
  /// refused input, or a report): the group is in step too.
  bool last_failure_agreed() const noexcept;
  const LayerTraffic& traffic() const noexcept;

 private:
  friend class LayerWorkspace;
  /// `forward` after routing; `local_error`: this rank's routing or input failed.
  void forward_routed(const TensorView& x, const RoutingPlan& plan, const TensorView& y,
                      const Error* local_error, StreamEvent* done);
  /// `forward(x, y)`; with `done`, recorded after y's work instead of waiting for it.
  void forward(const TensorView& x, const TensorView& y, StreamEvent* done);
  /// The ids `set_token_ids` gave, handed to the router once (then empty).
  TensorView take_token_ids();
  TensorView token_ids_;
  /// Events of `forward(x, y, caller)`: y written, on `stream()` (made once).
  std::unique_ptr<StreamEvent> caller_y_written_;
  /// True when the next forward runs in the worst-case mode.
  bool worst_case_forward() const noexcept;
  /// The forward of the worst-case mode: fixed blocks, no host wait on a device data path.
  void forward_worst_case(const TensorView& x, const RoutingPlan& plan, const TensorView& y,
                          const Error* local_error, bool device_routed, StreamEvent* y_written);
  /// What the host checks of a worst-case forward once its stream has passed `done`.
  struct WorstCaseReport {
    std::unique_ptr<StreamEvent> done;
    Buffer<std::int64_t> words;  // host: [E] kept counts of a device routing, first bad slot
    std::int64_t tokens = 0;
    int slots = 0;
    bool device_routed = false;
    bool refused = false;  // the step threw this rank's own error: nothing more to tell
    bool pending = false;
  };
  /// Takes the pending reports in order, while their step has finished (or waiting for
  /// each when `wait`); the first failure found, if any.
  std::optional<Error> collect_worst_case_reports(bool wait);
  /// Worst-case steps whose reports may be pending at once; one more waits for the oldest.
  static constexpr std::size_t kWorstCaseReportsInFlight = 4;
  std::vector<WorstCaseReport> worst_case_reports_;  // a ring, oldest at next_report_
  std::size_t next_report_ = 0;
  bool worst_case_failed_in_step_ = false;  // the last forward threw after queuing its step
  /// The one forward sequence, in `chunks` pipelined chunks (1: a plain sequence); with
  /// `save`, the rows and projections stay in kept_handle_ for the backward.
  void forward_pipeline(const TensorView& x, const RoutingPlan& plan, const TensorView& y,
                        const Error* local_error, int chunks, bool save, StreamEvent* y_written);
  /// True when this forward keeps what the backward needs (training, recompute off).
  bool saves_for_backward() const noexcept;
  /// The grouped expert step: the kernel's `forward` over a grouped handle's expert rows;
  /// with `save`, the kernel's saved columns into saved_columns_.
  void run_grouped_experts(DispatchHandle& h, bool save, bool worst_case = false);
  /// The fused expert step: the kernel's weighted partial sums of the received rows, into
  /// the combine's send buffer.
  void run_fused_experts(DispatchHandle& h);
  /// The shared expert's output over x into the workspace (`shared_output`), and its scale
  /// per token sigmoid(x·gate), or 1 without a gate (`shared_scales`).
  void run_shared_expert(const TensorView& x);
  /// y += scale ⊙ the shared expert's output (after `run_shared_expert`).
  void add_shared_expert(const TensorView& y);
  /// Fills the workspace's `shared_scales` [T] for x and returns them.
  const float* shared_expert_scales(const TensorView& x);
  /// Its backward: out.dx += its input gradient, its weights' and gate's gradients added.
  void backward_shared_expert(const TensorView& x, const TensorView& dy, const LayerGradients& out);
  /// `combine` with the slots `meta` [N,K] in place of the handle's own.
  void combine_with(DispatchHandle& h, const TensorView& expert_output, const TensorView& y,
                    const SlotMeta* meta);
  /// The combine with the handle's slots at weight 1 (the backward of the dispatch).
  /// `host_meta`: h's received slots where the host reads them.
  void combine_unweighted(DispatchHandle& h, const TensorView& rows, const TensorView& y,
                          const SlotMeta* host_meta);
  /// Backward helpers over the data path's primitives: `weighted` [A,H] = each grouped row
  /// of `rows` times its slot's weight; per received (row, slot) <rows, outputs> of its
  /// grouped row into the workspace's `d_slot_weights`.
  SlotRowsArgs slot_rows(const DispatchHandle& h) const;
  void scale_rows(const DispatchHandle& h, const TensorView& rows,
                  const TensorView& weighted) const;
  void slot_dot_products(const DispatchHandle& h, const TensorView& rows,
                         const TensorView& outputs);
  /// Synchronizes the stream before host code or a host-synchronous plugin touches data.
  void host_ready() {
    stream().synchronize();
    transport().raise_stream_error();  // an exchange the stream ran may have been aborted
  }
  /// Waits for the stream where the next data-path call runs on the host at once (the host
  /// data path is host-synchronous); a device data path's calls queue behind the stream's
  /// work, and nothing waits.
  void data_path_ready() {
    if (data_path_->device().kind == Device::Kind::kHost) host_ready();
  }
  /// A host router behind a device data path: logits copied to the host, routed there,
  /// the plan copied to the device.
  void route_through_host(const TensorView& logits, RoutingPlan& plan);
  /// `route` without waiting for a device data path's routing: its statistics and its
  /// check of the logits come with the stream's next wait (`finish_device_routing`).
  void route_queued(const TensorView& x, RoutingPlan& plan);
  /// After the stream's wait: a queued device routing's statistics adopted by the router,
  /// or its error (NaN or infinite logits) thrown. Nothing when none is pending.
  void finish_device_routing();
  /// A step's counts agreed over the EP group (`TokenExchange::agree_counts`), with a
  /// queued device routing finished after the counts' wait: its error, if any, fails the
  /// step on every rank there.
  void agree_counts(const RoutingPlan& plan, int chunks, const Error* local_error);

  MoELayerParts parts_;
  // The step buffers, shared with the other layers of this rank (see LayerWorkspace).
  std::shared_ptr<LayerWorkspace> workspace_;
  std::shared_ptr<DataPath> data_path_;
  // The exchange bookkeeping (counts, failure agreement, byte layouts, traffic).
  std::unique_ptr<TokenExchange> exchange_;
  std::int64_t hidden_ = 0;
  TensorView gate_;                      // the gate on the data path's device
  Buffer<float> device_gate_;            // its copy there, when the caller's gate is host memory
  bool route_on_host_ = false;           // a host router with a device data path
  HostStream host_stream_;               // for the host router
  RouterStats device_stats_;             // of a route the device data path computed
  bool device_routing_pending_ = false;  // queued; finish_device_routing not yet called
  Buffer<float> logits_;
  RoutingPlan plan_;
  RoutingPlan slot_plan_;                              // plan translated to slots (with a slot map)
  std::vector<std::int64_t> expert_load_, slot_load_;  // see expert_load()
  /// Adds a forward's assignments to the loads (with a slot map, after `slot_plan(plan)`).
  void count_load(const RoutingPlan& plan);
  // The exchange of a training forward that keeps its rows for the backward (a forward that
  // keeps nothing uses the workspace's).
  DispatchHandle kept_handle_;
  // The last forward routed its tokens and finished: plan_ and logits_ are its own.
  bool backward_ready_ = false;
  // Training: the kernel's saved columns of kept_handle_'s expert rows [A, saved_columns],
  // and whether the last forward kept kept_handle_'s rows for the backward.
  Buffer<float> saved_columns_;
  bool training_ = false;
  bool kept_for_backward_ = false;
  LayerTimings timings_;
  std::array<std::int64_t, 1> shared_rows_{};  // the shared expert's batch: all T rows
  ExpertKernelCapabilities expert_caps_;       // parts_.experts', read once
};

}  // namespace switchyard
