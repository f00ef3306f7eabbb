#pragma once
// The exchange bookkeeping of one MoE layer, private to the core: the per-peer row counts
// and the agreement, in their exchange, that some rank failed; the byte layouts of the rows,
// their slots and the partial sums that come back; where each lives in a `DispatchHandle`;
// grouping per local expert and the weighted reduce; and the traffic of a step. `MoELayer`
// only orders these calls (with the experts between them); the data path does the work.
#include <array>
#include <cstdint>
#include <exception>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "switchyard/data_path.hpp"
#include "switchyard/layer.hpp"
#include "switchyard/placement.hpp"
#include "switchyard/transport.hpp"

namespace switchyard {

/// The first expert id outside 0..num_experts-1 (-1 is an unused slot) or non-finite
/// weight of a plan the host can read, as an error naming its token and slot; nothing if
/// none.
std::optional<Error> check_routing_plan_values(const RoutingPlan& plan, int num_experts);
/// "routing plan: token t slot k has expert e, outside 0..E-1" (`Error(kInvalidArgument)`).
Error expert_out_of_range(std::int64_t token, std::int64_t slot, std::int64_t expert,
                          int num_experts);

class TokenExchange {
 public:
  /// The layer's transport, data path, placement and dtypes; `workspace` holds the counts
  /// table and the stream (shared by the layers of a rank, which run one at a time). All
  /// are borrowed and outlive the exchange.
  struct Parts {
    Transport* transport = nullptr;
    DataPath* data_path = nullptr;
    LayerWorkspace* workspace = nullptr;
    const ExpertPlacement* placement = nullptr;
    std::int64_t hidden = 0;
    PayloadDType payload_dtype = PayloadDType::kF32;
    DType combine_dtype = DType::kF32;
    int first_world_rank = 0;  // names peers by their world rank in errors
    bool slot_order = false;   // the slot-order combine (CombineOrder::kSlot), host only
  };
  explicit TokenExchange(const Parts& parts)
      : parts_(parts), counts_width_(1 + static_cast<std::size_t>(parts.placement->max_local())) {}

  /// Consecutive tokens of a step and their routing.
  struct TokenRange {
    const float* x = nullptr;               // [count, H]
    const std::int32_t* experts = nullptr;  // [count, slots]
    const float* weights = nullptr;         // [count, slots]
    std::int64_t count = 0;
    int slots = 0;
  };

  /// The first problem of a plan's shape, device, expert ids or weights; nothing if none.
  std::optional<Error> check_plan(const RoutingPlan& plan) const;

  /// Counts the rows each of `chunks` equal token ranges of `plan` sends to every peer, and
  /// the slots for each of the peer's local experts, and exchanges all counts at once.
  /// That exchange also carries a failure: with `local_error` (or a bad plan) this rank
  /// sends -1s and throws its error; a rank that receives -1s
  /// throws `Error(kPeerFailed)`. Every rank throws at this same point, so the group
  /// stays usable (`failure_agreed`). Collective.
  void agree_counts(const RoutingPlan& plan, int chunks, const Error* local_error);
  /// `agree_counts` in two steps, for a caller that learns of a failure in between (after
  /// the counts' wait): the counts (or, with `local_error` or a bad plan, the failure)...
  void count_rows(const RoutingPlan& plan, int chunks, const Error* local_error);
  /// ... replaced by the failure when the caller found one since ...
  void count_failure();
  /// ... then exchanged; every rank throws here together when some rank failed.
  void exchange_counts(const Error* local_error);
  /// The worst-case mode's counts instead of `agree_counts` (nothing exchanged, nothing
  /// read back): every peer gets and sends a block of `block_rows` rows, of which each of
  /// a peer's local experts may take all; `stage` then lays out rows in these blocks
  /// (`LayoutArgs::block_rows`). One chunk of `num_tokens` tokens (0 for a rank whose
  /// input was refused: it still serves its experts).
  void assume_worst_case(std::int64_t num_tokens, int slots, std::int64_t block_rows);
  /// The first token of chunk c of the agreed step (c = chunks: its token count).
  std::int64_t first_token(int c) const noexcept { return num_tokens_ * c / chunks_; }
  /// True when the last `agree_counts` threw because some rank failed.
  bool failure_agreed() const noexcept { return failure_agreed_; }

  /// Readies h for chunk c of the agreed step: its counts, layout and packed rows (this
  /// rank's own already in place in the receive buffer), receive buffers sized.
  void stage(const TokenRange& tokens, int c, DispatchHandle& h);
  /// The exchanges of a staged handle: its rows and their slots out, then (after `reduce`
  /// or the fused experts filled the partial sums) the partial sums back. `stream` null:
  /// the blocking forms (on a thread of their own). A device data path over a transport
  /// of host memory only goes through host staging memory (`staged()`): the host waits for
  /// the device's rows, the transport's blocking form moves them, and the copies back to
  /// the device are queued on the layer's stream.
  void send_rows(DispatchHandle& h, Stream* stream);
  void send_back(DispatchHandle& h, Stream* stream);

  /// The dtypes of the expert rows (f32 or bf16).
  struct ExpertRowDTypes {
    DType input = DType::kF32;
    DType output = DType::kF32;
  };
  /// Groups the received rows per local expert into `dtypes.input` rows and sizes the
  /// expert output rows for `dtypes.output`; each expert's block starts at a multiple of
  /// `alignment` rows, the rows between zero. In the worst-case mode each block holds as
  /// many rows as the expert may get, and the rows of each that are tokens go to
  /// `h.rows_in_block_` (device); with `finite_blocks` the rest hold finite values (zeros
  /// or an earlier step's rows), for a kernel that computes whole blocks.
  void group(DispatchHandle& h, ExpertRowDTypes dtypes, std::int64_t alignment = 1,
             bool finite_blocks = false);

  /// Received rows [first, first + count) whose partial sums go to `out`, contiguous.
  struct PartialRows {
    std::int64_t first = 0, count = 0;
    std::byte* out = nullptr;
  };
  /// Where the partial sums and the returned rows of h go, and the combine's byte counts.
  /// `in_expert_buffers` (the forward owns the expert rows): in the expert input rows,
  /// dead by then, when they fit.
  void place_partials(DispatchHandle& h, bool in_expert_buffers);
  /// A placed handle's received rows in three runs: those before this rank's own, its own
  /// (summed straight into the returned rows), those after.
  std::array<PartialRows, 3> partial_segments(const DispatchHandle& h) const;
  /// The weighted partial sums of the grouped `expert_output` [A,H] (f32 or bf16) with the
  /// slots `meta` (null: the handle's own), placed as `place_partials` does. Checks the
  /// shapes of expert_output and y [T,H] first.
  void reduce(DispatchHandle& h, const TensorView& expert_output, const TensorView& y,
              bool in_expert_buffers, const SlotMeta* meta = nullptr);
  /// y [h's tokens, H] = the returned rows summed per token.
  void sum(DispatchHandle& h, float* y);

 private:
  /// The slot-order combine's bookkeeping after a stage: where each (token, k) of
  /// `tokens`' plan comes back among the returned rows, and the rows each peer returns.
  void place_slot_rows(const TokenRange& tokens, DispatchHandle& h);
  /// The slot-order reduce: every kept (row, slot)'s weighted output, in the peers' order.
  void reduce_per_slot(DispatchHandle& h, const TensorView& expert_output, const SlotMeta* meta);
  /// The slot-order sum: y[t] = its returned rows in routing order (k = 0, 1, ...).
  void sum_per_slot(DispatchHandle& h, float* y);

 public:
  /// Sends each (received row, slot)'s value `per_slot` [N,K] back to the token's rank
  /// and writes it at the token's plan slot of `out` [T,K] (0 for slots of no expert).
  /// The plan [T,K] (its experts) and h's send rows' tokens as the host reads them;
  /// per_slot and out host memory.
  void return_slot_values(const DispatchHandle& h, std::int64_t num_tokens, int slots,
                          const std::int32_t* plan_experts, const std::int64_t* send_row_token,
                          const float* per_slot, float* out);

  /// The traffic of the agreed step to other ranks: the counts, rows and slots out, the
  /// partial sums back.
  void count_traffic();
  const LayerTraffic& traffic() const noexcept { return traffic_; }

 private:
  Stream& stream() const noexcept;
  /// Counts per peer and chunk in the counts exchange: its rows, then the slots for each of
  /// its local experts (as many as the rank with the most).
  std::size_t counts_width() const noexcept { return counts_width_; }
  /// True when the rows go through host staging memory (see `send_rows`).
  bool staged() const noexcept;
  /// The exchanges `exchanges` of device buffers through host memory, each receiving into
  /// `received[i]` (host, sized here) before its peers' parts are copied to the device.
  void send_staged(std::span<const AlltoallvBuffers> exchanges,
                   std::span<Buffer<std::byte>* const> received, DispatchHandle& h);
  AlltoallvBuffers row_buffers(DispatchHandle& h) const;
  AlltoallvBuffers meta_buffers(DispatchHandle& h) const;
  AlltoallvBuffers back_buffers(DispatchHandle& h) const;
  std::size_t ranks() const noexcept { return static_cast<std::size_t>(parts_.transport->size()); }
  std::size_t me() const noexcept { return static_cast<std::size_t>(parts_.transport->rank()); }

  Parts parts_;
  std::size_t counts_width_;
  std::vector<std::int64_t> block_rows_;  // group: rows of each expert's block (host)
  /// At least `bytes` zero bytes of host memory, left untouched until the stream has
  /// passed the copies that read them (a growth waits for it first).
  const std::byte* host_zeros(std::size_t bytes);
  std::vector<std::byte> zeros_;  // group: the padding rows' source (host)
  // group: the expert input buffer whose every byte was zeroed (the worst-case mode's
  // blocks with `finite_blocks`), so that it is zeroed once, not every step.
  const void* zeroed_rows_ = nullptr;
  std::size_t zeroed_bytes_ = 0;
  std::int64_t num_tokens_ = 0;
  std::int64_t worst_case_rows_ = 0;  // the worst-case mode's rows per peer; 0: counted
  int slots_ = 0;
  int chunks_ = 1;
  bool failure_agreed_ = false;
  std::optional<Error> plan_error_;  // what count_rows found wrong with the plan
  LayerTraffic traffic_;
};

}  // namespace switchyard
