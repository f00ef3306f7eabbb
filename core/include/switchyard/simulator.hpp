#pragma once
/// \file
/// The routing simulator: the real router plugins on synthetic or recorded logits for a
/// cluster of nodes × GPUs, the traffic their decisions cause under three byte
/// accountings, and the dispatch and combine time a link model predicts. No model weights
/// and no transport: the experts' placement and the routers are the runtime's own.
/// docs/simulator.md describes the model and its calibration.

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "switchyard/data_path.hpp"
#include "switchyard/placement.hpp"
#include "switchyard/router.hpp"
#include "switchyard/tensor.hpp"
#include "switchyard/topology.hpp"

namespace switchyard::sim {

/// One kind of link of one GPU, in each direction (full duplex): the bandwidth it
/// sustains for large transfers, and a fixed latency per phase.
struct Link {
  double gb_per_s = 0;  ///< 1e9 bytes per second
  double latency_us = 0;
};

/// A node's links per GPU: `intra` to the other GPUs of its node (NVLink, xGMI, shared
/// memory), `nic` to other nodes (a GPU's own NIC, or its share of the node's).
struct LinkModel {
  std::string name;
  Link intra;
  Link nic;
};

/// The named presets: "h800", "h100", "b200", "cpu" (docs/simulator.md lists their
/// numbers and sources). Throws `Error(kInvalidArgument)` naming the presets otherwise.
LinkModel link_preset(std::string_view name);
std::vector<std::string> link_preset_names();

/// How dispatched copies of a token are counted.
enum class Accounting : int {
  kPerExpert = 0,  ///< one copy per (token, expert)
  kPerRank = 1,    ///< one per (token, destination rank): what Switchyard's layer sends
  /// one per (token, destination node), sent to the GPU of the same local index there and
  /// forwarded inside the node to the token's ranks: a two-level dispatch
  kPerNode = 2,
};
inline constexpr int kNumAccountings = 3;
/// "per expert", "per rank", "per node".
std::string_view accounting_name(Accounting accounting) noexcept;

/// The simulated cluster and layer.
struct ClusterSpec {
  int nodes = 1;
  int gpus_per_node = 8;
  /// Ranks per expert-parallel group: blocks of consecutive ranks, each holding every
  /// expert once (placed as the runtime places them). 0: the whole world.
  int ep_size = 0;
  int num_experts = 8;
  std::int64_t hidden = 4096;
  PayloadDType payload_dtype = PayloadDType::kBF16;
  DType combine_dtype = DType::kBF16;  ///< f32 or bf16
  LinkModel links;
  int world() const noexcept { return nodes * gpus_per_node; }
  int group_size() const noexcept { return ep_size > 0 ? ep_size : world(); }
};
/// Throws `Error(kInvalidArgument)` saying what cannot be simulated (an EP size that does
/// not divide nodes × GPUs, a link without bandwidth, ...).
void validate(const ClusterSpec& spec);

/// Logits for the simulated ranks: synthetic, or rows of a recorded [T,E] array split over
/// the ranks in blocks (`token_block`).
class LogitsSource {
 public:
  /// "normal" (independent N(0,1): uniform expert popularity), "zipf:S" (expert e's logits
  /// shifted by -S·ln(e + 1): popularity falling with e), "hot:N:DELTA" (N experts spread
  /// evenly over the ids shifted by +DELTA). Throws `Error(kInvalidArgument)` otherwise.
  static LogitsSource synthetic(std::string_view spec, int num_experts,
                                std::int64_t tokens_per_rank, std::uint64_t seed);
  /// Recorded logits [T,E] (copied), split over `ranks`.
  static LogitsSource recorded(const TensorView& logits, int ranks);
  int num_experts() const noexcept { return num_experts_; }
  /// The tokens rank `rank` routes each step.
  std::int64_t tokens(int rank) const noexcept;
  /// Writes rank `rank`'s logits of step `step` into `out` [tokens(rank), E]. Synthetic
  /// logits are a pure function of (seed, step, rank); recorded ones repeat every step.
  /// Thread-safe.
  void fill(int step, int rank, float* out) const;
  /// "normal", "zipf:1.2", ... or "recorded [T,E]".
  const std::string& describe() const noexcept { return description_; }

 private:
  enum class Kind { kNormal, kZipf, kHot, kRecorded };
  Kind kind_ = Kind::kNormal;
  int num_experts_ = 0;
  int ranks_ = 1;
  std::int64_t tokens_per_rank_ = 0;
  std::uint64_t seed_ = 0;
  std::vector<float> shift_;     // [E] added to every token's logits (zipf, hot)
  std::vector<float> recorded_;  // [T,E]
  std::int64_t recorded_tokens_ = 0;
  std::string description_;
};

/// Predicted time of one phase under one accounting, and what bounds it.
struct PhaseTime {
  double seconds = 0;
  std::string bottleneck;  ///< e.g. "NIC send of rank 12 (node 1)"; "none" without traffic
};

/// What one router setting's decisions cost in one step (or summed over steps).
struct Traffic {
  std::int64_t tokens = 0;                      ///< routed, over all ranks
  std::int64_t assignments = 0;                 ///< kept (token, expert) pairs
  std::int64_t dropped = 0;                     ///< assignments the policy dropped (capacity)
  std::vector<std::int64_t> tokens_per_expert;  ///< [E] kept assignments, over all EP groups
  std::vector<std::int64_t> tokens_per_rank;    ///< [world] assignments its experts received
  std::vector<std::int64_t> tokens_per_node;    ///< [nodes]
  /// Per accounting: copies sent from rank to rank, [world × world] row-major (row = the
  /// sender; the diagonal stays 0: a rank's own rows do not travel).
  std::array<std::vector<std::int64_t>, kNumAccountings> copies;
  std::int64_t distinct_nodes = 0;  ///< Σ over tokens of the nodes its experts are on
  std::int64_t remote_nodes = 0;    ///< Σ of those other than the token's own node
  std::int64_t distinct_ranks = 0;  ///< Σ over tokens of the ranks its experts are on
  int max_nodes_per_token = 0;
  /// Per rank: the bytes its layer's dispatch and combine send to other ranks, as
  /// `LayerTraffic` counts them (rows with their slots, plus the count exchange).
  std::vector<std::uint64_t> layer_dispatch_bytes, layer_combine_bytes;
  /// A few tokens' routing for pictures: (source rank, expert ids with -1 for empty slots).
  std::vector<std::pair<int, std::vector<std::int32_t>>> sample;

  /// The best per-rank imbalance any placement of the setting's expert copies could reach:
  /// the hottest copy's load (an expert's load over its copies) over the mean rank load,
  /// at least 1; the worst EP group's (0 without assignments).
  double rank_imbalance_floor = 0;

  /// Adds another step's counts (not the sample).
  void accumulate(const Traffic& step);
  /// max / mean of tokens_per_expert (0 without assignments).
  double imbalance() const noexcept;
  /// max / mean of tokens_per_rank: the load of the slowest rank's experts over the mean.
  double rank_imbalance() const noexcept;
};

/// Bytes of one copy: dispatch (payload row plus its (expert, weight) slots: one slot per
/// expert copy, all K per rank or node copy) or combine (one row in the combine dtype).
std::uint64_t dispatch_copy_bytes(const ClusterSpec& spec, Accounting accounting, int slots);
std::uint64_t combine_copy_bytes(const ClusterSpec& spec);

/// Bytes per accounting over intra-node links and NICs, dispatch direction.
struct ByteSplit {
  std::uint64_t intra = 0;
  std::uint64_t inter = 0;
};
ByteSplit dispatch_bytes(const ClusterSpec& spec, const Traffic& traffic, Accounting accounting,
                         int slots);
/// Node × node dispatch bytes [nodes × nodes] (the diagonal: inside a node).
std::vector<std::uint64_t> node_matrix(const ClusterSpec& spec, const Traffic& traffic,
                                       Accounting accounting, int slots);
/// Seconds each rank's resources take in a phase: NIC send, NIC receive, intra-node send,
/// intra-node receive (bytes / bandwidth, plus the latency when they carry anything).
struct ResourceTimes {
  double nic_send = 0, nic_receive = 0, intra_send = 0, intra_receive = 0;
};
/// Per rank, for the dispatch (`combine` false) or the combine.
std::vector<ResourceTimes> resource_times(const ClusterSpec& spec, const Traffic& traffic,
                                          Accounting accounting, int slots, bool combine);

/// The slowest resource (each GPU's NIC and intra-node link, sending and receiving) for
/// the dispatch (`combine` false) or the combine: its bytes / bandwidth + latency. Every
/// resource works at once, so the slowest bounds the phase; ties name the lower rank.
PhaseTime predict(const ClusterSpec& spec, const Traffic& traffic, Accounting accounting, int slots,
                  bool combine);

/// A ring all-reduce of `bytes` per rank over `ranks` ranks, `ranks_per_node` of them on
/// each node (blocks of consecutive ranks): each rank sends and receives
/// 2 (n-1)/n · bytes in 2 (n-1) phases, over its NIC when the ring leaves its node (the
/// slower link bounds a ring that crosses nodes), else over its intra-node link. 0 for one
/// rank or no bytes.
PhaseTime predict_allreduce(const ClusterSpec& spec, std::uint64_t bytes, int ranks,
                            int ranks_per_node);

/// One training step's two parts (docs/simulator.md): the EP part, each MoE layer's
/// dispatch and combine in the forward and again in the backward, and the DP part, one
/// all-reduce of the replicated parameters' f32 gradients over every rank plus one of each
/// rank's experts' over its DP group (the ranks holding the same experts); and, for
/// comparison, pure data parallelism: every parameter replicated, one all-reduce of all.
struct TrainingStep {
  double ep_seconds = 0, dp_seconds = 0, pure_dp_seconds = 0;
  std::uint64_t ep_bytes_per_rank = 0;       ///< the most any rank sends in the EP part
  std::uint64_t dp_bytes_per_rank = 0;       ///< what each rank sends in the DP part
  std::uint64_t pure_dp_bytes_per_rank = 0;  ///< ... and under pure data parallelism
};
/// The step for one layer's `traffic` (summed over `steps` steps: the EP figures are its
/// mean), `moe_layers` such layers, `dense_params` replicated parameters and experts of
/// `expert_params` parameters each.
TrainingStep predict_training_step(const ClusterSpec& spec, const Traffic& traffic, int slots,
                                   int moe_layers, std::int64_t dense_params,
                                   std::int64_t expert_params, int steps = 1);

/// One router setting: a label and a factory called once per EP group (routers keep
/// state, such as a balancing bias, per group as the runtime's ranks do).
struct RouterSetting {
  std::string label;
  std::function<std::shared_ptr<Router>()> make_router;
  /// Redundant expert copies per EP group (`[simulate] redundant_experts`): 0 places the
  /// experts contiguously; more places them with `balance_experts` from the load the
  /// setting's routing measured in the first step simulated, as a rebalance from that
  /// step would, and keeps that placement. Each (token, expert) then goes to one copy,
  /// chosen from the token's global position and the expert (the same on every rank),
  /// each copy with its share of the expert's tokens (`ExpertSlots::share_of_slot`).
  int redundant_experts = 0;
};

/// Runs router settings over the same logits. Not thread-safe.
class Simulator {
 public:
  /// Validates everything before any work: the spec, the logits' expert count against
  /// each router's, and a first route of one token with each setting on each group's
  /// topology (so that a policy refusing the placement fails here).
  Simulator(ClusterSpec spec, LogitsSource logits, std::vector<RouterSetting> settings,
            int sample_tokens = 24);
  const ClusterSpec& spec() const noexcept { return spec_; }
  /// K: slots per token of setting `setting`'s router.
  int slots(std::size_t setting) const;
  /// Where EP group `group`'s expert copies are for setting `setting`, once its first step
  /// placed them (`RouterSetting::redundant_experts`); empty: the contiguous placement.
  const ExpertSlotMap& slot_map(std::size_t group, std::size_t setting) const {
    return groups_.at(group).slot_maps.at(setting);
  }
  /// Routes step `step` of every rank with every setting; one Traffic per setting.
  /// `progress(done, total)` is called after each rank.
  std::vector<Traffic> step(int step, const std::function<void(int, int)>& progress = nullptr);
  /// The same on logits given per world rank ([T_r, E] f32 each).
  std::vector<Traffic> step_on(std::span<const TensorView> logits_per_rank);

 private:
  struct Group {
    Topology topology;
    std::vector<std::shared_ptr<Router>> routers;  // per setting
    /// Per setting with redundant experts, once planned: the slots of its copies, chosen
    /// per token as the runtime chooses them; empty: contiguous.
    std::vector<ExpertSlotMap> slot_maps;
  };
  /// Plans the placement of setting `s` in group `g` from its routing of `logits_of`'s
  /// tokens (a pass of routing that counts nothing).
  void place_copies(std::size_t g, std::size_t s, const std::function<TensorView(int)>& logits_of);
  std::vector<Traffic> run(const std::function<TensorView(int rank)>& logits_of,
                           const std::function<void(int, int)>& progress);
  /// Counts rank `rank`'s routed tokens into `t`; `slot_map`: where each expert's copies
  /// are (empty: the contiguous placement).
  void account(int rank, const RoutingPlan& plan, const ExpertSlotMap& slot_map, Traffic& t);
  ClusterSpec spec_;
  LogitsSource logits_;
  std::vector<RouterSetting> settings_;
  std::vector<Group> groups_;
  int sample_tokens_ = 0;
  std::vector<float> scratch_;
  // Per rank / node: the last token (a running number) that reached it, or that sent a
  // node copy to it; finds a token's distinct ranks and nodes without clearing sets.
  std::int64_t token_stamp_ = 0;
  std::vector<std::int64_t> rank_stamp_, node_stamp_, node_sent_stamp_;
};

}  // namespace switchyard::sim
