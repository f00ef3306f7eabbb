// How expert_cuda_swiglu splits its GEMMs into cuBLAS calls (plain C++: runs without a
// GPU). Hand-worked plans, then properties on many histograms of row counts: every row of
// every expert in exactly one piece, batched steps in whole granules, grouped runs of
// consecutive experts, lanes in range.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <utility>
#include <vector>

#include "allocation_counter.hpp"
#include "gemm_plan.hpp"
#include "switchyard/config.hpp"
#include "switchyard/plugin.hpp"
#include "switchyard/status.hpp"

using namespace switchyard;
using namespace switchyard::cuda_swiglu;

namespace {

struct Expected {
  std::vector<int> experts;
  std::int64_t first_row, rows;
  int lane;
};

/// The plan of `rows` (a fresh plan each time).
GemmPlan plan_of(const std::vector<std::int64_t>& rows, GemmSplit split, std::int64_t granule,
                 int lanes, std::int64_t max_batch = 0) {
  GemmPlan plan;
  plan.make(rows, split, granule, lanes, max_batch);
  return plan;
}

std::vector<int> experts_of(const GemmPlan& plan, const GemmPiece& piece) {
  const auto experts = plan.experts(piece);
  return {experts.begin(), experts.end()};
}

void check_plan(const GemmPlan& plan, const std::vector<Expected>& expected) {
  const auto got = plan.pieces();
  REQUIRE(got.size() == expected.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    CAPTURE(i);
    CHECK(experts_of(plan, got[i]) == expected[i].experts);
    CHECK(got[i].first_row == expected[i].first_row);
    CHECK(got[i].rows == expected[i].rows);
    CHECK(got[i].lane == expected[i].lane);
  }
}

/// The row count of each GEMM of `piece`, expert by expert: its rows for every expert, or
/// for a grouped piece each group's rows, as many times as the group has experts.
std::vector<std::int64_t> problem_rows(const GemmPlan& plan, const GemmPiece& piece) {
  if (!piece.grouped) return std::vector<std::int64_t>(piece.expert_count, piece.rows);
  std::vector<std::int64_t> rows;
  for (const GemmGroup& g : plan.groups(piece)) rows.insert(rows.end(), g.count, g.rows);
  return rows;
}

/// How many pieces cover each row of each expert.
std::vector<std::vector<int>> coverage(const std::vector<std::int64_t>& rows,
                                       const GemmPlan& plan) {
  std::vector<std::vector<int>> covered(rows.size());
  for (std::size_t e = 0; e < rows.size(); ++e)
    covered[e].assign(static_cast<std::size_t>(rows[e]), 0);
  for (const GemmPiece& p : plan.pieces()) {
    const std::vector<std::int64_t> counts = problem_rows(plan, p);
    REQUIRE(counts.size() == p.expert_count);
    for (std::size_t j = 0; j < counts.size(); ++j) {
      const int e = plan.experts(p)[j];
      REQUIRE(e >= 0);
      REQUIRE(static_cast<std::size_t>(e) < rows.size());
      REQUIRE(p.first_row >= 0);
      REQUIRE(p.first_row + counts[j] <= rows[static_cast<std::size_t>(e)]);
      for (std::int64_t r = p.first_row; r < p.first_row + counts[j]; ++r)
        ++covered[static_cast<std::size_t>(e)][static_cast<std::size_t>(r)];
    }
  }
  return covered;
}

std::vector<std::pair<std::int64_t, int>> groups_of(const GemmPlan& plan, const GemmPiece& piece) {
  std::vector<std::pair<std::int64_t, int>> groups;
  for (const GemmGroup& g : plan.groups(piece)) groups.emplace_back(g.rows, g.count);
  return groups;
}

}  // namespace

TEST_CASE("the batched plan of a hand-worked histogram: steps, the last expert standing, rests") {
  // Granule 4. Whole granules: 8, 0, 4, 12, 0, 8 rows, so steps at heights 4, 8, 12:
  // [0,4) of experts 0 2 3 5; [4,8) of 0 3 5; from 8 expert 3 stands alone and takes its
  // rows 8..12 (5 rows). Rests: expert 0's row 8, expert 4's rows 0..2. Lanes by work
  // (rows × experts: 16, 12, 5, 1, 3), largest first onto the least loaded of three lanes:
  // 16→0, 12→1, 5→2, 3→2 (load 8), 1→2 (load 9 < 12).
  const std::vector<std::int64_t> rows{9, 0, 4, 13, 3, 8};
  check_plan(plan_of(rows, GemmSplit::kBatched, 4, 3), {{{0, 2, 3, 5}, 0, 4, 0},
                                                        {{0, 3, 5}, 4, 4, 1},
                                                        {{3}, 8, 5, 2},
                                                        {{0}, 8, 1, 2},
                                                        {{4}, 0, 3, 2}});
  // One piece per expert with rows, expert e on lane e mod 3.
  check_plan(plan_of(rows, GemmSplit::kPerExpert, 4, 3),
             {{{0}, 0, 9, 0}, {{2}, 0, 4, 2}, {{3}, 0, 13, 0}, {{4}, 0, 3, 1}, {{5}, 0, 8, 2}});
}

TEST_CASE("batched steps cut into pieces of at most max_batch experts, as equal as they come") {
  // The histogram above, at most 2 experts a call: [0,4) of 0 2 3 5 in two pieces, 0 2 and
  // 3 5; [4,8) of 0 3 5 in two, 0 3 and 5 (the earlier piece the larger); the last expert
  // standing and the rests as before. Work: 8, 8, 8, 4, 5, 1, 3; largest first, ties in
  // order, onto the least loaded of three lanes: 8→0, 8→1, 8→2, 5→0 (13), 4→1 (12),
  // 3→2 (11), 1→2 (12).
  const std::vector<std::int64_t> rows{9, 0, 4, 13, 3, 8};
  check_plan(plan_of(rows, GemmSplit::kBatched, 4, 3, 2), {{{0, 2}, 0, 4, 0},
                                                           {{3, 5}, 0, 4, 1},
                                                           {{0, 3}, 4, 4, 2},
                                                           {{5}, 4, 4, 1},
                                                           {{3}, 8, 5, 0},
                                                           {{0}, 8, 1, 2},
                                                           {{4}, 0, 3, 2}});
  // Seven experts of equal counts, at most 3 a call: 3 pieces of 3, 2, 2 (not 3, 3, 1).
  const GemmPlan seven = plan_of(std::vector<std::int64_t>(7, 256), GemmSplit::kBatched, 128, 8, 3);
  REQUIRE(seven.pieces().size() == 3);
  CHECK(experts_of(seven, seven.pieces()[0]) == std::vector<int>{0, 1, 2});
  CHECK(experts_of(seven, seven.pieces()[1]) == std::vector<int>{3, 4});
  CHECK(experts_of(seven, seven.pieces()[2]) == std::vector<int>{5, 6});
  // A limit at or above a step's experts leaves it whole; per_expert ignores it.
  check_plan(plan_of(std::vector<std::int64_t>{256, 256, 256}, GemmSplit::kBatched, 128, 8, 3),
             {{{0, 1, 2}, 0, 256, 0}});
  CHECK(plan_of(rows, GemmSplit::kPerExpert, 4, 3, 2).pieces().size() ==
        plan_of(rows, GemmSplit::kPerExpert, 4, 3).pieces().size());
}

TEST_CASE(
    "the grouped plan: runs of consecutive experts with all their rows, equal counts grouped") {
  // Experts with rows 0 2 3 4 5 (37 rows), in one run: five groups of one (no two
  // neighbours share a count).
  const std::vector<std::int64_t> rows{9, 0, 4, 13, 3, 8};
  const GemmPlan whole = plan_of(rows, GemmSplit::kGrouped, 4, 3);
  check_plan(whole, {{{0, 2, 3, 4, 5}, 0, 37, 0}});
  REQUIRE(whole.pieces().size() == 1);
  CHECK(whole.pieces()[0].grouped);
  CHECK(whole.pieces()[0].row_blocks() == 1);
  CHECK(groups_of(whole, whole.pieces()[0]) ==
        std::vector<std::pair<std::int64_t, int>>{{9, 1}, {4, 1}, {13, 1}, {3, 1}, {8, 1}});
  // At most two experts a run: 0 2 (13 rows), 3 4 (16), 5 (8); lanes by rows, largest
  // first: 16→0, 13→1, 8→2.
  const GemmPlan runs = plan_of(rows, GemmSplit::kGrouped, 4, 3, 2);
  check_plan(runs, {{{0, 2}, 0, 13, 1}, {{3, 4}, 0, 16, 0}, {{5}, 0, 8, 2}});
  CHECK(groups_of(runs, runs.pieces()[0]) ==
        std::vector<std::pair<std::int64_t, int>>{{9, 1}, {4, 1}});
  CHECK(groups_of(runs, runs.pieces()[1]) ==
        std::vector<std::pair<std::int64_t, int>>{{13, 1}, {3, 1}});
  CHECK(groups_of(runs, runs.pieces()[2]) == std::vector<std::pair<std::int64_t, int>>{{8, 1}});
  // Neighbours of equal counts share a group, across an expert without rows (0 1 3: 256
  // each); the granule plays no part.
  const GemmPlan equal = plan_of(std::vector<std::int64_t>{256, 256, 0, 256, 100, 100, 256},
                                 GemmSplit::kGrouped, 1, 8);
  check_plan(equal, {{{0, 1, 3, 4, 5, 6}, 0, 1224, 0}});
  CHECK(groups_of(equal, equal.pieces()[0]) ==
        std::vector<std::pair<std::int64_t, int>>{{256, 3}, {100, 2}, {256, 1}});
  CHECK(plan_of({0, 0}, GemmSplit::kGrouped, 128, 8).pieces().empty());
  // A run's work is its rows, not rows × experts: 0 1 (10 rows) and 2 (15) on two lanes,
  // the larger, 2, first onto lane 0.
  check_plan(plan_of(std::vector<std::int64_t>{5, 5, 15}, GemmSplit::kGrouped, 1, 2, 2),
             {{{0, 1}, 0, 10, 1}, {{2}, 0, 15, 0}});
  // Other splits have no groups.
  const GemmPlan batched = plan_of(rows, GemmSplit::kBatched, 4, 3);
  for (const GemmPiece& p : batched.pieces()) {
    CHECK_FALSE(p.grouped);
    CHECK(batched.groups(p).empty());
    CHECK(p.row_blocks() == p.expert_count);
  }
}

TEST_CASE("batched plans of equal counts, one expert, no rows, and rows under a granule") {
  // Equal whole-granule counts: one batched GEMM of every expert.
  check_plan(plan_of(std::vector<std::int64_t>{256, 256, 256}, GemmSplit::kBatched, 128, 8),
             {{{0, 1, 2}, 0, 256, 0}});
  // Equal counts with a rest: one step, then three rests on the next lanes.
  check_plan(plan_of(std::vector<std::int64_t>{130, 130, 130}, GemmSplit::kBatched, 128, 8),
             {{{0, 1, 2}, 0, 128, 0}, {{0}, 128, 2, 1}, {{1}, 128, 2, 2}, {{2}, 128, 2, 3}});
  // One expert with rows: one plain GEMM of all of them.
  check_plan(plan_of(std::vector<std::int64_t>{0, 300, 0}, GemmSplit::kBatched, 128, 8),
             {{{1}, 0, 300, 0}});
  CHECK(plan_of({0, 0}, GemmSplit::kBatched, 128, 8).pieces().empty());
  CHECK(plan_of({}, GemmSplit::kPerExpert, 128, 8).pieces().empty());
  // Nothing reaches a granule: every expert alone.
  check_plan(plan_of(std::vector<std::int64_t>{5, 7}, GemmSplit::kBatched, 128, 1),
             {{{0}, 0, 5, 0}, {{1}, 0, 7, 0}});
}

TEST_CASE("every row of every expert in exactly one piece, over many histograms") {
  std::mt19937 rng(11);
  for (int trial = 0; trial < 400; ++trial) {
    const int expert_count = 1 + static_cast<int>(rng() % 40);
    const std::int64_t granule = std::vector<std::int64_t>{1, 3, 16, 128}[rng() % 4];
    const int lanes = 1 + static_cast<int>(rng() % 9);
    const std::int64_t max_batch = std::vector<std::int64_t>{0, 1, 2, 5}[rng() % 4];
    std::vector<std::int64_t> rows(static_cast<std::size_t>(expert_count));
    for (auto& n : rows) {
      switch (rng() % 4) {
        case 0:
          n = 0;
          break;
        case 1:
          n = static_cast<std::int64_t>(rng() % 8);
          break;
        case 2:
          n = static_cast<std::int64_t>(rng() % 600);
          break;
        default:
          n = 256;
          break;
      }
    }
    CAPTURE(trial);
    for (const GemmSplit split :
         {GemmSplit::kPerExpert, GemmSplit::kBatched, GemmSplit::kGrouped}) {
      CAPTURE(static_cast<int>(split));
      const GemmPlan plan = plan_of(rows, split, granule, lanes, max_batch);
      std::size_t steps = 0;
      for (const GemmPiece& p : plan.pieces()) {
        const std::vector<int> experts = experts_of(plan, p);
        REQUIRE(!experts.empty());
        CHECK(p.rows > 0);
        CHECK(p.lane >= 0);
        CHECK(p.lane < lanes);
        for (std::size_t i = 1; i < experts.size(); ++i) CHECK(experts[i - 1] < experts[i]);
        if (max_batch > 0) CHECK(experts.size() <= static_cast<std::size_t>(max_batch));
        CHECK(p.grouped == (split == GemmSplit::kGrouped));
        if (p.grouped) {
          // Consecutive among the experts with rows, each whole, their rows back to back;
          // the groups follow the experts' counts, neighbouring groups of other counts.
          CHECK(p.first_row == 0);
          std::int64_t sum = 0;
          for (int e = experts.front(); e <= experts.back(); ++e) {
            const std::int64_t n = rows[static_cast<std::size_t>(e)];
            CHECK((n == 0 || std::find(experts.begin(), experts.end(), e) != experts.end()));
            sum += n;
          }
          CHECK(p.rows == sum);
          const std::vector<std::int64_t> counts = problem_rows(plan, p);
          REQUIRE(counts.size() == experts.size());
          for (std::size_t j = 0; j < counts.size(); ++j)
            CHECK(counts[j] == rows[static_cast<std::size_t>(experts[j])]);
          const auto groups = plan.groups(p);
          for (std::size_t g = 1; g < groups.size(); ++g)
            CHECK(groups[g].rows != groups[g - 1].rows);
          continue;
        }
        if (experts.size() > 1) {
          ++steps;
          CHECK(split == GemmSplit::kBatched);
          CHECK(p.first_row % granule == 0);
          CHECK(p.rows % granule == 0);
        } else if (split == GemmSplit::kBatched) {
          // A rest (under a granule, after the expert's whole granules), the last expert
          // standing (from a granule boundary to its last row), or, with a limit, a step's
          // piece of one expert (whole granules).
          const std::int64_t n = rows[static_cast<std::size_t>(experts[0])];
          CHECK(p.first_row % granule == 0);
          const bool to_the_end = p.first_row + p.rows == n;
          CHECK((to_the_end || (max_batch > 0 && p.rows % granule == 0)));
        }
      }
      for (const auto& expert : coverage(rows, plan))
        for (const int times : expert) REQUIRE(times == 1);
      if (split == GemmSplit::kGrouped) {
        // The fewest runs the limit allows.
        std::size_t with_rows = 0;
        for (auto n : rows) with_rows += n > 0 ? 1 : 0;
        const std::size_t fewest = max_batch == 0 || with_rows == 0
                                       ? (with_rows > 0 ? 1 : 0)
                                       : (with_rows + static_cast<std::size_t>(max_batch) - 1) /
                                             static_cast<std::size_t>(max_batch);
        CHECK(plan.pieces().size() == fewest);
      }
      // Without a limit, at most one step per distinct whole-granule height.
      std::vector<std::int64_t> heights;
      for (auto n : rows)
        if (n / granule > 0) heights.push_back(n / granule);
      std::sort(heights.begin(), heights.end());
      heights.erase(std::unique(heights.begin(), heights.end()), heights.end());
      if (max_batch == 0) CHECK(steps <= heights.size());
    }
  }
}

TEST_CASE("uniform routing at E=64, k=8, T=8192: batched steps take most rows, two of them") {
  // The shape the expert benchmark is held to: counts near 1024 ± 32, granule 128.
  std::mt19937 rng(5);
  std::vector<std::int64_t> rows(64, 0);
  for (int t = 0; t < 8192; ++t) {
    std::vector<int> chosen;
    while (chosen.size() < 8) {
      const int e = static_cast<int>(rng() % 64);
      if (std::find(chosen.begin(), chosen.end(), e) == chosen.end()) chosen.push_back(e);
    }
    for (int e : chosen) ++rows[static_cast<std::size_t>(e)];
  }
  const GemmPlan plan = plan_of(rows, GemmSplit::kBatched, 128, 8);
  std::int64_t batched = 0, steps = 0;
  for (const GemmPiece& p : plan.pieces()) {
    if (p.expert_count > 1) {
      batched += p.rows * static_cast<std::int64_t>(p.expert_count);
      ++steps;
    }
  }
  MESSAGE(steps << " batched steps hold " << batched << " of 65536 rows");
  CHECK(batched >= 65536 * 9 / 10);
  CHECK(steps <= 3);
}

namespace {

template <typename T>
T* at_address(std::uint64_t word) {
  return reinterpret_cast<T*>(static_cast<std::uintptr_t>(word));
}

/// Runs a plan's table on the host as the kernel runs it on the device: per piece, the
/// gate/up GEMM of each expert of the piece from the table's addresses (rows × [2F,H]ᵀ; a
/// grouped piece's experts each with their own count), silu·up on the piece's row blocks
/// from the start-row column, the down GEMMs from the addresses; then, where grouped pieces
/// write `grouped_out` (non-null), their row blocks copied from it into `y`, as the kernel
/// widens them.
void run_table(const GemmPlan& plan, const std::vector<std::uint64_t>& table, std::int64_t H,
               std::int64_t F, std::vector<float>& projected, std::vector<float>& act,
               const float* grouped_out, std::vector<float>& y) {
  for (std::size_t i = 0; i < plan.pieces().size(); ++i) {
    const GemmPiece& p = plan.pieces()[i];
    const std::size_t m = p.expert_count;
    const std::uint64_t* column = table.data() + plan.table_at(i);
    const std::vector<std::int64_t> counts = problem_rows(plan, p);
    for (std::size_t j = 0; j < m; ++j) {
      const auto* gate_up = at_address<const float>(column[kGateUpWeights * m + j]);
      const auto* x = at_address<const float>(column[kGateUpRows * m + j]);
      auto* h = at_address<float>(column[kGateUpProjected * m + j]);
      for (std::int64_t r = 0; r < counts[j]; ++r)
        for (std::int64_t o = 0; o < 2 * F; ++o) {
          double sum = 0;
          for (std::int64_t c = 0; c < H; ++c) sum += double{gate_up[o * H + c]} * x[r * H + c];
          h[r * 2 * F + o] = static_cast<float>(sum);
        }
    }
    for (std::size_t b = 0; b < p.row_blocks(); ++b) {
      const auto start = static_cast<std::int64_t>(column[kStartRow * m + b]);
      for (std::int64_t r = start; r < start + p.rows; ++r)
        for (std::int64_t f = 0; f < F; ++f) {
          const double g = projected[static_cast<std::size_t>(r * 2 * F + f)];
          const double u = projected[static_cast<std::size_t>(r * 2 * F + F + f)];
          act[static_cast<std::size_t>(r * F + f)] = static_cast<float>(g / (1 + std::exp(-g)) * u);
        }
    }
    for (std::size_t j = 0; j < m; ++j) {
      const auto* down = at_address<const float>(column[kDownWeights * m + j]);
      const auto* a = at_address<const float>(column[kDownAct * m + j]);
      auto* out = at_address<float>(column[kDownOut * m + j]);
      for (std::int64_t r = 0; r < counts[j]; ++r)
        for (std::int64_t o = 0; o < H; ++o) {
          double sum = 0;
          for (std::int64_t f = 0; f < F; ++f) sum += double{down[o * F + f]} * a[r * F + f];
          out[r * H + o] = static_cast<float>(sum);
        }
    }
    if (!p.grouped || grouped_out == nullptr) continue;
    for (std::size_t b = 0; b < p.row_blocks(); ++b) {
      const auto start = static_cast<std::size_t>(column[kStartRow * m + b]);
      std::copy(
          grouped_out + start * static_cast<std::size_t>(H),
          grouped_out + (start + static_cast<std::size_t>(p.rows)) * static_cast<std::size_t>(H),
          y.begin() + static_cast<std::ptrdiff_t>(start * static_cast<std::size_t>(H)));
    }
  }
}

}  // namespace

TEST_CASE(
    "a plan's table addresses each piece's rows: run on the host, it is each expert's SwiGLU") {
  const std::int64_t H = 6, F = 5;
  std::mt19937 rng(17);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  for (int trial = 0; trial < 30; ++trial) {
    const std::size_t experts = 1 + rng() % 9;
    std::vector<std::int64_t> rows(experts);
    for (auto& n : rows) n = rng() % 3 == 0 ? 0 : static_cast<std::int64_t>(rng() % 23);
    std::int64_t N = 0;
    for (auto n : rows) N += n;
    std::vector<std::vector<float>> gate_up(experts), down(experts);
    std::vector<const void*> gate_up_at, down_at;
    for (std::size_t e = 0; e < experts; ++e) {
      gate_up[e].resize(static_cast<std::size_t>(2 * F * H));
      down[e].resize(static_cast<std::size_t>(H * F));
      for (auto& v : gate_up[e]) v = uniform(rng);
      for (auto& v : down[e]) v = uniform(rng);
      gate_up_at.push_back(gate_up[e].data());
      down_at.push_back(down[e].data());
    }
    std::vector<float> x(static_cast<std::size_t>(N * H));
    for (auto& v : x) v = uniform(rng);
    std::vector<float> projected(static_cast<std::size_t>(N * 2 * F)),
        act(static_cast<std::size_t>(N * F)),
        y(static_cast<std::size_t>(N * H), std::numeric_limits<float>::quiet_NaN());

    // Each expert's SwiGLU over its rows, straight from the counts.
    std::vector<double> expected(y.size());
    std::int64_t row = 0;
    for (std::size_t e = 0; e < experts; ++e)
      for (std::int64_t r = 0; r < rows[e]; ++r, ++row) {
        std::vector<double> a(static_cast<std::size_t>(F));
        for (std::int64_t f = 0; f < F; ++f) {
          double g = 0, u = 0;
          for (std::int64_t c = 0; c < H; ++c) {
            g += double{gate_up[e][static_cast<std::size_t>(f * H + c)]} *
                 x[static_cast<std::size_t>(row * H + c)];
            u += double{gate_up[e][static_cast<std::size_t>((F + f) * H + c)]} *
                 x[static_cast<std::size_t>(row * H + c)];
          }
          a[static_cast<std::size_t>(f)] = g / (1 + std::exp(-g)) * u;
        }
        for (std::int64_t o = 0; o < H; ++o) {
          double sum = 0;
          for (std::int64_t f = 0; f < F; ++f)
            sum += double{down[e][static_cast<std::size_t>(o * F + f)]} *
                   a[static_cast<std::size_t>(f)];
          expected[static_cast<std::size_t>(row * H + o)] = sum;
        }
      }

    std::vector<float> grouped_out(y.size());
    for (const auto& choice : {std::pair{GemmSplit::kPerExpert, std::int64_t{0}},
                               std::pair{GemmSplit::kBatched, std::int64_t{0}},
                               std::pair{GemmSplit::kBatched, std::int64_t{2}},
                               std::pair{GemmSplit::kGrouped, std::int64_t{0}},
                               std::pair{GemmSplit::kGrouped, std::int64_t{2}}})
      for (const bool narrow : {false, true}) {
        const GemmSplit split = choice.first;
        const std::int64_t max_batch = choice.second;
        if (narrow && split != GemmSplit::kGrouped) continue;
        CAPTURE(trial);
        CAPTURE(static_cast<int>(split));
        CAPTURE(max_batch);
        CAPTURE(narrow);
        GemmPlan plan;
        plan.make(rows, split, 4, 3, max_batch);
        std::vector<std::uint64_t> table(plan.table_words());
        GemmOperands operands;
        operands.gate_up = gate_up_at;
        operands.down = down_at;
        operands.rows = x.data();
        operands.row_bytes = static_cast<std::size_t>(H) * sizeof(float);
        operands.projected = projected.data();
        operands.projected_row_bytes = static_cast<std::size_t>(2 * F) * sizeof(float);
        operands.act = act.data();
        operands.act_row_bytes = static_cast<std::size_t>(F) * sizeof(float);
        operands.out = y.data();
        operands.out_row_bytes = static_cast<std::size_t>(H) * sizeof(float);
        if (narrow) {
          // The grouped pieces' down GEMMs write here (f32 standing in for the kernel's bf16).
          operands.grouped_out = grouped_out.data();
          operands.grouped_out_row_bytes = static_cast<std::size_t>(H) * sizeof(float);
        }
        plan.fill_table(rows, operands, table);
        std::fill(y.begin(), y.end(), std::numeric_limits<float>::quiet_NaN());
        std::fill(grouped_out.begin(), grouped_out.end(), std::numeric_limits<float>::quiet_NaN());
        run_table(plan, table, H, F, projected, act, narrow ? grouped_out.data() : nullptr, y);
        for (std::size_t i = 0; i < y.size(); ++i) {
          REQUIRE(std::isfinite(y[i]));  // every row written
          CHECK(std::fabs(y[i] - expected[i]) <= 1e-5 * (1 + std::fabs(expected[i])));
        }
      }
  }
}

TEST_CASE("planning again into a plan that held a larger one allocates nothing") {
  // The kernel plans every forward; after the first forwards of the largest counts it must
  // not allocate.
  const std::vector<std::int64_t> large{300, 0, 129, 260, 5, 128, 700, 1};
  const std::vector<std::int64_t> other{130, 3, 0, 260, 200, 128, 1, 1};
  // The table only takes addresses; nothing behind them is read here.
  const std::vector<const void*> weights(large.size(), nullptr);
  GemmOperands operands;
  operands.gate_up = weights;
  operands.down = weights;
  std::vector<std::uint64_t> table(std::size_t{7} * 4096);
  // Every split, with and without a limit on the experts of a call.
  const std::pair<GemmSplit, std::int64_t> splits[] = {
      {GemmSplit::kPerExpert, 0}, {GemmSplit::kBatched, 0}, {GemmSplit::kBatched, 2},
      {GemmSplit::kGrouped, 0},   {GemmSplit::kGrouped, 2}, {GemmSplit::kGrouped, 3}};
  GemmPlan plan;
  auto plan_and_fill = [&](const std::vector<std::int64_t>& rows,
                           const std::pair<GemmSplit, std::int64_t>& split) {
    plan.make(rows, split.first, 128, 8, split.second);
    plan.fill_table(rows, operands, table);
  };
  for (const auto& split : splits) plan_and_fill(large, split);
  test::start_counting_allocations();
  for (const auto& split : splits) {
    plan_and_fill(other, split);
    plan_and_fill(large, split);
  }
  const test::AllocationCounts counts = test::stop_counting_allocations();
  INFO(test::first_counted_allocation());
  CHECK(counts.ours == 0);
}

TEST_CASE("gemm names the split, and anything else is refused") {
  CHECK(parse_gemm_split("per_expert") == GemmSplit::kPerExpert);
  CHECK(parse_gemm_split("batched") == GemmSplit::kBatched);
  CHECK(parse_gemm_split("grouped") == GemmSplit::kGrouped);
  CHECK_THROWS_AS(parse_gemm_split("stacked"), Error);
  CHECK_THROWS_AS(plan_of(std::vector<std::int64_t>{1}, GemmSplit::kBatched, 0, 1), Error);
  CHECK_THROWS_AS(plan_of(std::vector<std::int64_t>{-1}, GemmSplit::kBatched, 4, 1), Error);
  CHECK_THROWS_AS(plan_of(std::vector<std::int64_t>{1}, GemmSplit::kBatched, 4, 1, -1), Error);
}

#if defined(SWITCHYARD_TEST_CUDA_PLUGINS)
TEST_CASE(
    "the cuda_swiglu plugin declares [experts] gemm (per_expert unless set, or batched or "
    "grouped), batch_granule and batch_experts") {
  // The plugin loads without a GPU; its options are read before a kernel is created.
  const PluginRegistry registry(PluginRegistry::default_search_path());
  const ConfigSchema schema = registry.options(PluginKind::kExpert, "cuda_swiglu");
  Config unset;
  CHECK(unset.section("experts", schema).get_string("gemm") == "per_expert");
  CHECK(unset.section("experts", schema).get_int("batch_granule") == 128);
  CHECK(unset.section("experts", schema).get_int("batch_experts") == 0);
  for (const char* name : {"batched", "grouped"}) {
    Config chosen;
    chosen.set("experts", "gemm", std::string(name));
    CHECK(chosen.section("experts", schema).get_string("gemm") == name);
  }
  Config other;
  other.set("experts", "gemm", std::string("stacked"));
  CHECK_THROWS_AS(other.section("experts", schema), Error);
  Config no_rows;
  no_rows.set("experts", "batch_granule", std::int64_t{0});
  CHECK_THROWS_AS(no_rows.section("experts", schema), Error);
  Config negative;
  negative.set("experts", "batch_experts", std::int64_t{-1});
  CHECK_THROWS_AS(negative.section("experts", schema), Error);
}
#endif
