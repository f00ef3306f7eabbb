#pragma once
// How expert_cuda_swiglu splits one forward's GEMMs into cuBLAS calls (plain C++, so that the
// plan is tested on machines without a GPU: tests/plugins/cuda_swiglu_plan_test.cpp).
//
// The rows of the local experts arrive grouped, expert after expert, in counts that differ.
// cuBLAS batches GEMMs of one shape only, so the batched plan cuts the histogram of counts
// into a staircase: a step is the same rows [first_row, first_row + rows) of every expert
// that has them, one batched GEMM; what is left of each expert (fewer rows than a granule)
// is a GEMM of its own. The grouped plan gives cuBLAS's grouped GEMM, which takes a shape per
// GEMM, runs of consecutive experts with all their rows. A piece writes rows no other piece
// writes, so pieces may run in any order, on any stream.
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

namespace switchyard::cuda_swiglu {

/// How the GEMMs are split.
enum class GemmSplit {
  kPerExpert,  ///< one piece per expert with rows (expert e on lane e mod lanes)
  kBatched,    ///< staircase steps batched across experts, then each expert's short rest
  kGrouped,    ///< runs of consecutive experts, all their rows, one grouped call a run
};

/// `"per_expert"`, `"batched"` or `"grouped"` (the `[experts] gemm` option); throws
/// `Error(kInvalidArgument)` on anything else.
GemmSplit parse_gemm_split(std::string_view name);

/// Rows [first_row, first_row + rows) of each of the piece's experts, counted from the
/// expert's own first row: one cuBLAS call (batched when there are several experts), run on
/// `lane`. A grouped piece instead holds every row of each of its experts, which are
/// consecutive among the experts with rows, so that their rows lie back to back: `rows` is
/// their sum, one block from the first expert's first row (first_row 0), and its cuBLAS call
/// is grouped (GemmPlan::groups()).
struct GemmPiece {
  std::int64_t first_row = 0;
  std::int64_t rows = 0;      ///< > 0; the same for every expert of the piece, unless grouped
  int lane = 0;               ///< in [0, lanes)
  std::size_t expert_at = 0;  ///< where its experts start in GemmPlan::experts()
  std::size_t expert_count = 0;
  bool grouped = false;
  std::size_t group_at = 0;  ///< grouped: where its groups start in GemmPlan::groups()
  std::size_t group_count = 0;

  /// The blocks of `rows` rows the row kernels cover: one per expert, or one for a grouped
  /// piece; block j starts at the table's start row j.
  std::size_t row_blocks() const noexcept { return grouped ? 1 : expert_count; }
};

/// In a grouped piece, `count` consecutive experts of `rows` rows each: one group of
/// cuBLAS's grouped GEMM (a group shares its shape).
struct GemmGroup {
  std::int64_t rows = 0;
  int count = 0;
};

/// The addresses one forward's GEMMs work on: each local expert's weights, and the
/// forward's row buffers, which hold the experts' rows back to back, expert after expert.
struct GemmOperands {
  std::span<const void* const> gate_up;  ///< per local expert: [gate; up], [2F,H]
  std::span<const void* const> down;     ///< per local expert: [H,F]
  const void* rows = nullptr;            ///< x [N,H]
  std::size_t row_bytes = 0;
  void* projected = nullptr;  ///< [N,2F]
  std::size_t projected_row_bytes = 0;
  void* act = nullptr;  ///< silu(gate)·up, [N,F]
  std::size_t act_row_bytes = 0;
  void* out = nullptr;  ///< y [N,H]
  std::size_t out_row_bytes = 0;
  /// Where the down GEMMs of grouped pieces write instead of `out`, when set ([N,H]):
  /// cuBLAS's grouped GEMM writes bf16 results only from bf16 operands, so the kernel
  /// widens those rows into `out` afterwards.
  void* grouped_out = nullptr;
  std::size_t grouped_out_row_bytes = 0;
};

/// The columns of a piece's table, one word per expert of the piece each: the expert's first
/// row of the piece in the forward's rows, then the A, B and C addresses of its gate/up GEMM
/// (weights, rows, projections) and of its down GEMM (weights, activations, outputs): what
/// a batched cuBLAS call reads from device memory.
enum GemmTableColumn : std::size_t {
  kStartRow,
  kGateUpWeights,
  kGateUpRows,
  kGateUpProjected,
  kDownWeights,
  kDownAct,
  kDownOut,
  kGemmTableColumns
};

/// The pieces of one forward: every row of every expert in exactly one piece. Kept by the
/// kernel and made again each forward: once it has held a plan as large, making one (and
/// its table) allocates nothing. Not thread-safe.
class GemmPlan {
 public:
  /// Plans `rows_per_expert` (entries >= 0) over `lanes` (>= 1) lanes. With `kBatched`, step
  /// heights are multiples of `granule` (> 0) except where one expert is left, which takes
  /// all its remaining rows in one piece; a step of more than `max_batch` experts (> 0; 0:
  /// no limit) is cut into the fewest pieces of at most that many, as equal as they come
  /// (the earlier pieces one expert larger), so that pieces on several lanes overlap one
  /// another's memory-bound work; lanes are given largest piece first to the least loaded
  /// lane. With `kGrouped`, the experts with rows are cut into the fewest runs of at most
  /// `max_batch` (0: one run), as equal as they come, and a run's experts of equal counts
  /// next to one another form one group; lanes as above. Deterministic: the same counts
  /// give the same plan.
  void make(std::span<const std::int64_t> rows_per_expert, GemmSplit split, std::int64_t granule,
            int lanes, std::int64_t max_batch = 0);

  std::span<const GemmPiece> pieces() const noexcept { return pieces_; }
  /// Words of this plan's table: kGemmTableColumns per expert of each piece.
  std::size_t table_words() const noexcept { return kGemmTableColumns * experts_.size(); }
  /// Where the table of pieces()[i] starts; column c of it is at + c·expert_count.
  std::size_t table_at(std::size_t i) const noexcept {
    return kGemmTableColumns * pieces_[i].expert_at;
  }
  /// Writes this plan's table (table_words() words) for `rows_per_expert` (the counts the
  /// plan was made from) over `operands`.
  void fill_table(std::span<const std::int64_t> rows_per_expert, const GemmOperands& operands,
                  std::span<std::uint64_t> table);
  /// The local expert indices of `piece`, ascending; never empty.
  std::span<const int> experts(const GemmPiece& piece) const noexcept {
    return std::span<const int>(experts_).subspan(piece.expert_at, piece.expert_count);
  }
  /// The groups of a grouped `piece`, in its experts' order (their counts add up to its
  /// experts); empty for other pieces.
  std::span<const GemmGroup> groups(const GemmPiece& piece) const noexcept {
    return std::span<const GemmGroup>(groups_).subspan(piece.group_at, piece.group_count);
  }

 private:
  void staircase(std::span<const std::int64_t> rows_per_expert, std::int64_t granule,
                 std::int64_t max_batch);
  void runs(std::span<const std::int64_t> rows_per_expert, std::int64_t max_batch);
  void balance_lanes(int lanes);
  /// A piece of the experts from `expert_at` to the end of experts_.
  void add_piece(std::int64_t first_row, std::int64_t rows, int lane, std::size_t expert_at);
  /// The step of the experts from `expert_at` to the end of experts_, in pieces of at most
  /// `max_batch` experts (0: one piece).
  void add_step(std::int64_t first_row, std::int64_t rows, std::size_t expert_at,
                std::int64_t max_batch);

  std::vector<GemmPiece> pieces_;
  std::vector<int> experts_;
  std::vector<GemmGroup> groups_;
  // Scratch, kept for its capacity.
  std::vector<std::int64_t> whole_, heights_, load_, first_row_;
  std::vector<std::size_t> order_;
};

}  // namespace switchyard::cuda_swiglu
