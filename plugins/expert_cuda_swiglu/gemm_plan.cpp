#include "gemm_plan.hpp"

#include <algorithm>
#include <numeric>
#include <string>

#include "switchyard/status.hpp"

namespace switchyard::cuda_swiglu {

GemmSplit parse_gemm_split(std::string_view name) {
  if (name == "per_expert") return GemmSplit::kPerExpert;
  if (name == "batched") return GemmSplit::kBatched;
  throw Error(ErrorCode::kInvalidArgument,
              "cuda_swiglu: gemm must be \"per_expert\" or "
              "\"batched\", not \"" +
                  std::string(name) + "\"");
}

namespace {

std::vector<GemmPiece> staircase(std::span<const std::int64_t> rows_per_expert,
                                 std::int64_t granule) {
  const auto experts = static_cast<int>(rows_per_expert.size());
  // The rows of each expert that whole granules cover, and the distinct heights of those.
  std::vector<std::int64_t> whole(rows_per_expert.size());
  std::vector<std::int64_t> heights;
  for (int e = 0; e < experts; ++e) {
    whole[static_cast<std::size_t>(e)] =
        rows_per_expert[static_cast<std::size_t>(e)] / granule * granule;
    if (whole[static_cast<std::size_t>(e)] > 0)
      heights.push_back(whole[static_cast<std::size_t>(e)]);
  }
  std::sort(heights.begin(), heights.end());
  heights.erase(std::unique(heights.begin(), heights.end()), heights.end());

  std::vector<GemmPiece> pieces;
  std::vector<bool> finished(rows_per_expert.size(), false);
  std::int64_t below = 0;
  for (const std::int64_t height : heights) {
    GemmPiece step;
    for (int e = 0; e < experts; ++e) {
      if (whole[static_cast<std::size_t>(e)] >= height) step.experts.push_back(e);
    }
    if (step.experts.size() == 1) {
      // The last expert standing takes all its remaining rows at once: a batch of one is a
      // plain GEMM, and one taller GEMM beats several short ones.
      const int e = step.experts[0];
      step.first_row = below;
      step.rows = rows_per_expert[static_cast<std::size_t>(e)] - below;
      finished[static_cast<std::size_t>(e)] = true;
      pieces.push_back(std::move(step));
      break;
    }
    step.first_row = below;
    step.rows = height - below;
    pieces.push_back(std::move(step));
    below = height;
  }
  // Each expert's rest: fewer rows than a granule.
  for (int e = 0; e < experts; ++e) {
    const auto i = static_cast<std::size_t>(e);
    if (finished[i] || rows_per_expert[i] == whole[i]) continue;
    pieces.push_back(GemmPiece{{e}, whole[i], rows_per_expert[i] - whole[i], 0});
  }
  return pieces;
}

/// Largest piece first onto the least loaded lane (the lower lane on ties).
void balance_lanes(std::vector<GemmPiece>& pieces, int lanes) {
  auto work = [](const GemmPiece& p) {
    return p.rows * static_cast<std::int64_t>(p.experts.size());
  };
  std::vector<std::size_t> order(pieces.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](std::size_t a, std::size_t b) { return work(pieces[a]) > work(pieces[b]); });
  std::vector<std::int64_t> load(static_cast<std::size_t>(lanes), 0);
  for (const std::size_t i : order) {
    const auto lane =
        static_cast<std::size_t>(std::min_element(load.begin(), load.end()) - load.begin());
    pieces[i].lane = static_cast<int>(lane);
    load[lane] += work(pieces[i]);
  }
}

}  // namespace

std::vector<GemmPiece> plan_gemm_pieces(std::span<const std::int64_t> rows_per_expert,
                                        GemmSplit split, std::int64_t granule, int lanes) {
  if (lanes < 1 || granule < 1) {
    throw Error(ErrorCode::kInternal, "cuda_swiglu: a GEMM plan needs lanes >= 1 and granule >= 1");
  }
  for (const std::int64_t n : rows_per_expert) {
    if (n < 0) throw Error(ErrorCode::kInternal, "cuda_swiglu: a negative row count");
  }
  if (split == GemmSplit::kPerExpert) {
    std::vector<GemmPiece> pieces;
    for (std::size_t e = 0; e < rows_per_expert.size(); ++e) {
      if (rows_per_expert[e] == 0) continue;
      pieces.push_back(GemmPiece{{static_cast<int>(e)},
                                 0,
                                 rows_per_expert[e],
                                 static_cast<int>(e % static_cast<std::size_t>(lanes))});
    }
    return pieces;
  }
  std::vector<GemmPiece> pieces = staircase(rows_per_expert, granule);
  balance_lanes(pieces, lanes);
  return pieces;
}

}  // namespace switchyard::cuda_swiglu
