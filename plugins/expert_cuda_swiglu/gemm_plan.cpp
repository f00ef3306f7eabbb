#include "gemm_plan.hpp"

#include <algorithm>
#include <numeric>
#include <string>

#include "switchyard/status.hpp"

namespace switchyard::cuda_swiglu {

GemmSplit parse_gemm_split(std::string_view name) {
  if (name == "per_expert") return GemmSplit::kPerExpert;
  if (name == "batched") return GemmSplit::kBatched;
  if (name == "grouped") return GemmSplit::kGrouped;
  throw Error(ErrorCode::kInvalidArgument,
              "cuda_swiglu: gemm must be \"per_expert\", \"batched\" or \"grouped\", not \"" +
                  std::string(name) + "\"");
}

namespace {

/// Into how many parts `count` experts go at most `max_batch` a part (0: no limit).
std::size_t parts_of(std::size_t count, std::int64_t max_batch) {
  const auto limit = static_cast<std::size_t>(max_batch);
  return max_batch == 0 ? 1 : (count + limit - 1) / limit;
}

/// The size of part `part` of `count` experts in `parts` parts, as equal as they come, the
/// earlier parts the larger.
std::size_t part_size(std::size_t count, std::size_t parts, std::size_t part) {
  return count / parts + (part < count % parts ? 1 : 0);
}

}  // namespace

void GemmPlan::make(std::span<const std::int64_t> rows_per_expert, GemmSplit split,
                    std::int64_t granule, int lanes, std::int64_t max_batch) {
  if (lanes < 1 || granule < 1 || max_batch < 0) {
    throw Error(ErrorCode::kInternal,
                "cuda_swiglu: a GEMM plan needs lanes >= 1, granule >= 1 and max_batch >= 0");
  }
  for (const std::int64_t n : rows_per_expert) {
    if (n < 0) throw Error(ErrorCode::kInternal, "cuda_swiglu: a negative row count");
  }
  pieces_.clear();
  experts_.clear();
  groups_.clear();
  if (split == GemmSplit::kPerExpert) {
    for (std::size_t e = 0; e < rows_per_expert.size(); ++e) {
      if (rows_per_expert[e] == 0) continue;
      experts_.push_back(static_cast<int>(e));
      add_piece(0, rows_per_expert[e], static_cast<int>(e % static_cast<std::size_t>(lanes)),
                experts_.size() - 1);
    }
    return;
  }
  if (split == GemmSplit::kGrouped) {
    runs(rows_per_expert, max_batch);
  } else {
    staircase(rows_per_expert, granule, max_batch);
  }
  balance_lanes(lanes);
}

void GemmPlan::add_piece(std::int64_t first_row, std::int64_t rows, int lane,
                         std::size_t expert_at) {
  pieces_.push_back(GemmPiece{first_row, rows, lane, expert_at, experts_.size() - expert_at});
}

void GemmPlan::add_step(std::int64_t first_row, std::int64_t rows, std::size_t expert_at,
                        std::int64_t max_batch) {
  const std::size_t count = experts_.size() - expert_at;
  const std::size_t parts = parts_of(count, max_batch);
  std::size_t at = expert_at;
  for (std::size_t part = 0; part < parts; ++part) {
    const std::size_t size = part_size(count, parts, part);
    pieces_.push_back(GemmPiece{first_row, rows, 0, at, size});
    at += size;
  }
}

void GemmPlan::runs(std::span<const std::int64_t> rows_per_expert, std::int64_t max_batch) {
  for (std::size_t e = 0; e < rows_per_expert.size(); ++e) {
    if (rows_per_expert[e] > 0) experts_.push_back(static_cast<int>(e));
  }
  const std::size_t count = experts_.size();
  if (count == 0) return;
  const std::size_t parts = parts_of(count, max_batch);
  std::size_t at = 0;
  for (std::size_t part = 0; part < parts; ++part) {
    GemmPiece piece;
    piece.expert_at = at;
    piece.expert_count = part_size(count, parts, part);
    piece.grouped = true;
    piece.group_at = groups_.size();
    for (std::size_t j = at; j < at + piece.expert_count; ++j) {
      const std::int64_t n = rows_per_expert[static_cast<std::size_t>(experts_[j])];
      piece.rows += n;
      if (piece.group_count > 0 && groups_.back().rows == n) {
        ++groups_.back().count;
      } else {
        groups_.push_back(GemmGroup{n, 1});
        ++piece.group_count;
      }
    }
    pieces_.push_back(piece);
    at += piece.expert_count;
  }
}

void GemmPlan::staircase(std::span<const std::int64_t> rows_per_expert, std::int64_t granule,
                         std::int64_t max_batch) {
  const std::size_t count = rows_per_expert.size();
  // The rows of each expert that whole granules cover, and the distinct heights of those.
  whole_.resize(count);
  heights_.clear();
  for (std::size_t e = 0; e < count; ++e) {
    whole_[e] = rows_per_expert[e] / granule * granule;
    if (whole_[e] > 0) heights_.push_back(whole_[e]);
  }
  std::sort(heights_.begin(), heights_.end());
  heights_.erase(std::unique(heights_.begin(), heights_.end()), heights_.end());

  std::int64_t below = 0;
  int alone = -1;  // the expert left alone on the highest steps, if any
  for (const std::int64_t height : heights_) {
    const std::size_t at = experts_.size();
    for (std::size_t e = 0; e < count; ++e) {
      if (whole_[e] >= height) experts_.push_back(static_cast<int>(e));
    }
    if (experts_.size() - at == 1) {
      // The last expert standing takes all its remaining rows at once: a batch of one is a
      // plain GEMM, and one taller GEMM beats several short ones.
      alone = experts_[at];
      add_piece(below, rows_per_expert[static_cast<std::size_t>(alone)] - below, 0, at);
      break;
    }
    add_step(below, height - below, at, max_batch);
    below = height;
  }
  // Each expert's rest: fewer rows than a granule.
  for (std::size_t e = 0; e < count; ++e) {
    if (static_cast<int>(e) == alone || rows_per_expert[e] == whole_[e]) continue;
    experts_.push_back(static_cast<int>(e));
    add_piece(whole_[e], rows_per_expert[e] - whole_[e], 0, experts_.size() - 1);
  }
}

/// Largest piece first onto the least loaded lane (the lower lane on ties).
void GemmPlan::balance_lanes(int lanes) {
  auto work = [](const GemmPiece& p) {
    return p.grouped ? p.rows : p.rows * static_cast<std::int64_t>(p.expert_count);
  };
  order_.resize(pieces_.size());
  std::iota(order_.begin(), order_.end(), std::size_t{0});
  // A stable order without std::stable_sort, which may allocate: ties by index.
  std::sort(order_.begin(), order_.end(), [&](std::size_t a, std::size_t b) {
    const std::int64_t wa = work(pieces_[a]), wb = work(pieces_[b]);
    return wa != wb ? wa > wb : a < b;
  });
  load_.assign(static_cast<std::size_t>(lanes), 0);
  for (const std::size_t i : order_) {
    const auto lane =
        static_cast<std::size_t>(std::min_element(load_.begin(), load_.end()) - load_.begin());
    pieces_[i].lane = static_cast<int>(lane);
    load_[lane] += work(pieces_[i]);
  }
}

void GemmPlan::fill_table(std::span<const std::int64_t> rows_per_expert,
                          const GemmOperands& operands, std::span<std::uint64_t> table) {
  if (table.size() < table_words() || operands.gate_up.size() < rows_per_expert.size() ||
      operands.down.size() < rows_per_expert.size()) {
    throw Error(ErrorCode::kInternal, "cuda_swiglu: a GEMM table or its operands are too small");
  }
  first_row_.assign(rows_per_expert.size() + 1, 0);
  for (std::size_t e = 0; e < rows_per_expert.size(); ++e)
    first_row_[e + 1] = first_row_[e] + rows_per_expert[e];
  auto address = [](const void* base, std::int64_t row, std::size_t row_bytes) {
    return static_cast<std::uint64_t>(reinterpret_cast<std::uintptr_t>(base) +
                                      static_cast<std::uintptr_t>(row) * row_bytes);
  };
  for (std::size_t i = 0; i < pieces_.size(); ++i) {
    const GemmPiece& p = pieces_[i];
    const std::size_t m = p.expert_count;
    std::uint64_t* column = table.data() + table_at(i);
    for (std::size_t j = 0; j < m; ++j) {
      const auto e = static_cast<std::size_t>(experts_[p.expert_at + j]);
      const std::int64_t row = first_row_[e] + p.first_row;
      column[kStartRow * m + j] = static_cast<std::uint64_t>(row);
      column[kGateUpWeights * m + j] = address(operands.gate_up[e], 0, 0);
      column[kGateUpRows * m + j] = address(operands.rows, row, operands.row_bytes);
      column[kGateUpProjected * m + j] =
          address(operands.projected, row, operands.projected_row_bytes);
      column[kDownWeights * m + j] = address(operands.down[e], 0, 0);
      column[kDownAct * m + j] = address(operands.act, row, operands.act_row_bytes);
      column[kDownOut * m + j] =
          p.grouped && operands.grouped_out != nullptr
              ? address(operands.grouped_out, row, operands.grouped_out_row_bytes)
              : address(operands.out, row, operands.out_row_bytes);
    }
  }
}

}  // namespace switchyard::cuda_swiglu
