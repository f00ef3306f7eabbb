#pragma once
/// \file
/// The layer's data path as primitives over views: router logits, layout, pack (gather +
/// payload conversion), group by expert, weighted reduce and the final unpermute-sum.
/// `MoELayer` only sequences them around the transport's exchanges. The host
/// implementation is in core (`make_host_data_path()`); a device implementation comes as a
/// plugin and takes device pointers and a stream of the same device.
///
/// Every pointer below lives on the data path's `device()` unless it says "host". Each
/// function is ordered on `stream`; the host implementation is host-synchronous (done when
/// it returns). A function that writes host memory (`layout_counts`' rows per destination,
/// `count_groups`' rows per expert) has written it when it returns: it waits for the stream,
/// and the caller reads the result without waiting again. Host memory a function reads
/// (`LayoutArgs::rows_to_offset`, `GroupArgs::rows_per_expert`) is read when it is called
/// or stays untouched until the stream has passed the call.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string_view>

#include "switchyard/buffer.hpp"
#include "switchyard/router.hpp"
#include "switchyard/stream.hpp"
#include "switchyard/tensor.hpp"

namespace switchyard {

class ExpertPlacement;

/// The dtype of dispatched token rows (`[runtime] payload_dtype`). FP8 is E4M3 with one
/// float32 scale per 128 elements of a row, as the GPU EP libraries send it.
enum class PayloadDType : std::uint8_t { kF32, kBF16, kFP8 };
/// "f32", "bf16", "fp8".
std::string_view payload_dtype_name(PayloadDType dtype) noexcept;
/// Parses "f32", "bf16" or "fp8"; throws `Error(kInvalidArgument)` otherwise.
PayloadDType parse_payload_dtype(std::string_view name);
/// Elements of a row that share one FP8 scale.
inline constexpr std::int64_t kFp8BlockSize = 128;
/// Bytes of one row of `hidden` elements in `dtype`, a multiple of 4: the encoded elements,
/// then zero bytes up to the multiple (every data path writes them, so rows are the same
/// bytes everywhere). FP8 rows hold the ceil(hidden/128) float32 scales first, then the
/// `hidden` E4M3 bytes.
std::size_t payload_row_bytes(PayloadDType dtype, std::int64_t hidden) noexcept;

/// (`float_to_fp8_e4m3` and `fp8_e4m3_to_float`, the element conversions, are in tensor.hpp.)

/// (local expert, weight) of one slot of a dispatched row; local expert -1 marks an empty
/// slot. Metadata travels in its own buffer of these, [rows, K], beside the payload rows.
struct SlotMeta {
  std::int32_t local_expert;
  float weight;
};

/// Per-destination row counts: each token goes once to every rank that holds one of its
/// experts; and, when asked, the kept slots per expert (the rows each expert will get),
/// which travel with the row counts so that the receiver knows its grouping's sizes.
struct LayoutCountsArgs {
  const std::int32_t* experts = nullptr;  ///< [T,K], -1 = dropped
  std::int64_t num_tokens = 0;            ///< T
  int slots = 0;                          ///< K
  const ExpertPlacement* placement = nullptr;
  std::int64_t* rows_to = nullptr;  ///< host [R], written
  /// host [E], written when not null: slots of `experts` naming each expert
  std::int64_t* slots_to_expert = nullptr;
};

/// The permutation of the dispatch: which token each send row holds and its slots.
struct LayoutArgs {
  const std::int32_t* experts = nullptr;  ///< [T,K]
  const float* weights = nullptr;         ///< [T,K]
  std::int64_t num_tokens = 0;
  int slots = 0;
  const ExpertPlacement* placement = nullptr;
  std::span<const std::int64_t> rows_to_offset;  ///< host [R]: first send row of each rank
  std::int64_t* send_row_token = nullptr;        ///< [S], written: token of each send row
  SlotMeta* send_meta = nullptr;                 ///< [S,K], written: slots in routing order
  /// The worst-case layout (`[runtime] max_tokens_per_rank`) when > 0: rank p's rows are
  /// [p·block_rows, p·block_rows + its count) whatever their count, so that nothing of the
  /// layout is read back by the host (`rows_to_offset` is unused); the rest of each block
  /// is padding: token -1, every slot (-1, 0). S = ranks · block_rows, and no rank may get
  /// more than block_rows rows (at most T: the caller keeps T ≤ block_rows). A token with
  /// an expert id outside -1..E-1 sends nothing, and the first such slot's index t·K+k is
  /// written to `first_bad_slot` ([1], -1 when none; not null in this layout).
  std::int64_t block_rows = 0;
  std::int64_t* first_bad_slot = nullptr;
};

/// Gathers the tokens of the send rows and converts them to the payload dtype. A send row
/// of token -1 (the worst-case layout's padding) is written as zero bytes.
struct PackArgs {
  const float* x = nullptr;  ///< [T,H] f32
  std::int64_t hidden = 0;
  const std::int64_t* send_row_token = nullptr;  ///< [S]
  std::int64_t num_rows = 0;                     ///< S
  PayloadDType dtype = PayloadDType::kF32;
  std::byte* rows = nullptr;  ///< [S, payload_row_bytes], written
};

/// One run of send rows for `DataPath::pack_runs`: rows [first_row, first_row + num_rows)
/// of the send-row order (their tokens ascending), written to `rows`.
struct PackRun {
  std::int64_t first_row = 0;
  std::int64_t num_rows = 0;
  std::byte* rows = nullptr;  ///< [num_rows, payload_row_bytes], written
};

/// Groups received rows per local expert (stable: by arrival order), converting them to
/// f32 (or to bf16 for a kernel that asks for it: `ExpertKernel::input_dtype`), and records
/// where each (row, slot) went.
struct GroupArgs {
  const std::byte* rows = nullptr;  ///< [N, payload_row_bytes]
  const SlotMeta* meta = nullptr;   ///< [N,K]
  std::int64_t num_rows = 0;        ///< N
  int slots = 0;                    ///< K
  std::int64_t hidden = 0;
  PayloadDType dtype = PayloadDType::kF32;
  int num_local_experts = 0;  ///< L
  /// host [L], read when the call is made: `count_groups`' result
  const std::int64_t* rows_per_expert = nullptr;
  /// [A,H] in `expert_input_dtype`, written (A = sum of rows_per_expert).
  std::byte* expert_input = nullptr;
  std::int64_t* assignment_of_slot = nullptr;  ///< [N,K], written: row in expert_input or -1
  /// f32, or bf16: each element decoded and rounded to nearest even as `float_to_bf16` (a
  /// bf16 payload's elements copied as they are).
  DType expert_input_dtype = DType::kF32;
  /// [L] optional (null: not wanted), written: the rows placed in each expert's block, for
  /// blocks sized by a worst case rather than by counts (`ExpertBatch::valid_rows`).
  std::int64_t* rows_in_block = nullptr;
};

/// Counts the expert rows the grouping will produce, so that the caller can size them.
struct GroupCountArgs {
  const SlotMeta* meta = nullptr;  ///< [N,K]
  std::int64_t num_rows = 0;
  int slots = 0;
  int num_local_experts = 0;
  std::int64_t* rows_per_expert = nullptr;  ///< host [L], written
};

/// The weighted sum of the expert results of each received row, in slot order, converted
/// to the combine dtype (f32 or bf16).
struct WeightedReduceArgs {
  const std::byte* expert_output = nullptr;          ///< [A,H] in expert_output_dtype
  const SlotMeta* meta = nullptr;                    ///< [N,K]
  const std::int64_t* assignment_of_slot = nullptr;  ///< [N,K]
  std::int64_t num_rows = 0;
  int slots = 0;
  std::int64_t hidden = 0;
  DType combine_dtype = DType::kF32;
  std::byte* partial_rows = nullptr;  ///< [N,H] in combine_dtype, written
  /// f32, or bf16 (`ExpertKernel::output_dtype`): each element widened to f32 exactly, then
  /// summed as f32 rows are.
  DType expert_output_dtype = DType::kF32;
};

/// y[t] = sum of the combined rows of token t, in row order (the ranks' order). Rows of
/// token -1 (the worst-case layout's padding) are skipped.
struct UnpermuteSumArgs {
  const std::byte* combined_rows = nullptr;      ///< [S,H] in combine_dtype
  const std::int64_t* send_row_token = nullptr;  ///< [S]
  std::int64_t num_rows = 0;                     ///< S
  std::int64_t hidden = 0;
  DType combine_dtype = DType::kF32;
  float* y = nullptr;  ///< [T,H] f32, written (tokens with no row get 0)
  std::int64_t num_tokens = 0;
};

/// The slots of received rows and where each went among the grouped rows, for the
/// backward's primitives (`DataPath::scale_grouped_rows`, `slot_dot_products`).
struct SlotRowsArgs {
  const SlotMeta* meta = nullptr;                    ///< [N,K]
  const std::int64_t* assignment_of_slot = nullptr;  ///< [N,K]: its grouped row, or -1
  std::int64_t num_rows = 0;                         ///< N
  int slots = 0;                                     ///< K
  std::int64_t hidden = 0;                           ///< H
};

/// For data paths: throws `Error(kInvalidArgument)` saying "`what` in DTYPE; f32 or bf16
/// only" unless `dtype` is one of the two dtypes of expert rows (`GroupArgs::
/// expert_input_dtype`, `WeightedReduceArgs::expert_output_dtype`).
void require_expert_row_dtype(DType dtype, std::string_view what);

/// The data-path primitives on one device. Implementations are stateless apart from
/// scratch; one thread calls a given instance at a time.
class DataPath {
 public:
  virtual ~DataPath() = default;
  virtual Device device() const noexcept = 0;
  /// Memory on `device()` for the layer's rows, slots and plans (device memory for a GPU
  /// data path).
  virtual Allocator& allocator() noexcept = 0;
  /// Host memory for what the host reads back each step (per-peer counts, rows per
  /// expert): pinned for a GPU data path, so that the copies are asynchronous.
  virtual Allocator& staging_allocator() noexcept = 0;
  /// A new stream on `device()` for a layer's work. `queued`: the layer's transport is
  /// stream-ordered and needs a stream it can enqueue on (host: a queued `HostStream`).
  virtual std::unique_ptr<Stream> create_stream(bool queued) = 0;
  /// A `Stream` over a stream of `device()` the caller owns (CUDA: its `cudaStream_t`),
  /// borrowed: destroying the returned object leaves it alone. For entry points that order
  /// their work after the caller's (`Stream::wait`) and the caller's after theirs. The
  /// default throws `Error(kUnavailable)`: the host data path has no streams to borrow.
  virtual std::unique_ptr<Stream> borrow_stream(void* native_handle);
  /// logits [T,E] = x [T,H] · gateᵀ, f32, each token's logits independent of T and rank.
  virtual void router_logits(const TensorView& x, const TensorView& gate, const TensorView& logits,
                             Stream& stream) = 0;
  virtual void layout_counts(const LayoutCountsArgs& args, Stream& stream) = 0;
  virtual void layout(const LayoutArgs& args, Stream& stream) = 0;
  virtual void pack(const PackArgs& args, Stream& stream) = 0;
  /// `pack` of several runs at once (one per destination rank), each into its own buffer;
  /// `args.num_rows` and `args.rows` are unused. The host data path reads each token's row
  /// of x once for all runs that hold it; this default packs run after run.
  virtual void pack_runs(const PackArgs& args, std::span<const PackRun> runs, Stream& stream) {
    for (const PackRun& run : runs) {
      if (run.num_rows == 0) continue;
      PackArgs one = args;
      one.send_row_token = args.send_row_token + run.first_row;
      one.num_rows = run.num_rows;
      one.rows = run.rows;
      pack(one, stream);
    }
  }
  virtual void count_groups(const GroupCountArgs& args, Stream& stream) = 0;
  virtual void group_by_expert(const GroupArgs& args, Stream& stream) = 0;
  virtual void weighted_reduce(const WeightedReduceArgs& args, Stream& stream) = 0;
  virtual void unpermute_sum(const UnpermuteSumArgs& args, Stream& stream) = 0;
  /// The backward's primitives. scaled [A,H] f32: every grouped row a named by a slot gets
  /// that slot's weight times rows[a] (the product rounded to f32); rows no slot names are
  /// left as they are. The default throws `Error(kUnavailable)`: a data path without them
  /// cannot run the layer's backward.
  virtual void scale_grouped_rows(const SlotRowsArgs& args, const float* rows, float* scaled,
                                  Stream& stream);
  /// dots [N·K] f32: for each (row, slot) i with a grouped row a, <rows[a], outputs[a]> (a
  /// sum over h ascending, in f32), else 0. rows, outputs [A,H] f32. The default throws
  /// `Error(kUnavailable)`.
  virtual void slot_dot_products(const SlotRowsArgs& args, const float* rows, const float* outputs,
                                 float* dots, Stream& stream);
  /// Copies `bytes` from `src` to `dst`, each in host memory or in this data path's memory,
  /// ordered on `stream` (e.g. a device plan from a host router's plan). The host memory
  /// must stay untouched until the stream has passed the copy.
  virtual void copy(void* dst, const void* src, std::size_t bytes, Stream& stream) = 0;
  /// Queues the routing of `logits` [T,E] (on `device()`) as `spec` says into `plan` (on
  /// `device()`, resized here), the same as the host policy computes, and returns without
  /// waiting: true, or false when this data path does not route (the host data path: host
  /// routers do). A token with a NaN or infinite logit gets no expert (-1 in every slot, so
  /// that the layout that follows stays valid). The caller then waits for the stream (the
  /// counts' wait, which it needs anyway) and calls `finish_route_token_choice`.
  virtual bool route_token_choice(const TokenChoiceSpec& /*spec*/, const TensorView& /*logits*/,
                                  RoutingPlan& /*plan*/, Stream& /*stream*/) {
    return false;
  }
  /// After a `route_token_choice` that returned true, once the caller waited for its
  /// stream: the statistics' counts and sums in `stats` (host; `counts`, `tokens`,
  /// `probability_sums`, `aux_counts`, `z_loss_sum`, `top_k`), as the host policy gives them.
  /// Throws `Error(kInvalidArgument)` for a NaN or infinite logit with the host policies'
  /// message (the first one). The default throws `Error(kInternal)`: a data path that
  /// routes implements both.
  virtual void finish_route_token_choice(RouterStats& stats);
};

/// A new host implementation (host-synchronous). Each layer owns one: its scratch is not
/// shared between ranks.
std::unique_ptr<DataPath> make_host_data_path();

}  // namespace switchyard
