// The per-token routing kernels of routing_rows.hpp. Loops run over blocks of kLanes
// independent lanes with a scalar tail, so that the compiler vectorises them at the project's
// optimisation level without reordering any floating-point sum it is not told to. This file
// is compiled with -fno-trapping-math (core/CMakeLists.txt): without it GCC may not turn
// vector_exp's comparisons into selects, and nothing here reads floating-point flags.
#include "switchyard/routing_rows.hpp"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace switchyard {
namespace {

constexpr int kLanes = 16;
constexpr int kSpanLanes = 8;  // group spans are short: fewer lanes to merge
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Each kernel is built for AVX-512, AVX2 and the baseline ISA and picked at load time. The
// file is compiled without FMA contraction (core/CMakeLists.txt), so every version computes
// the same bits: only the vector width differs.
// Under ThreadSanitizer only the baseline build: the clones are picked by ifunc resolvers
// that run while the library is being relocated, before the sanitizer's runtime is ready.
#if defined(__SANITIZE_THREAD__)
#define SWITCHYARD_ROW_KERNEL
#else
#define SWITCHYARD_ROW_KERNEL __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
// Helpers of the kernels are forced inline so that each build of a kernel compiles them for
// its own instruction set.
#define SWITCHYARD_ROW_HELPER __attribute__((always_inline)) inline

/// The largest of v[0..n), ignoring NaN; -inf when there is none.
SWITCHYARD_ROW_HELPER float span_max(const float* v, int n) noexcept {
  float lanes[kSpanLanes];
  for (float& l : lanes) l = kNegInf;
  int e = 0;
  for (; e + kSpanLanes <= n; e += kSpanLanes) {
    for (int l = 0; l < kSpanLanes; ++l) lanes[l] = v[e + l] > lanes[l] ? v[e + l] : lanes[l];
  }
  for (; e < n; ++e) lanes[0] = v[e] > lanes[0] ? v[e] : lanes[0];
  float m = lanes[0];
  for (int l = 1; l < kSpanLanes; ++l) m = lanes[l] > m ? lanes[l] : m;
  return m;
}

/// The sum of the two largest of v[0..n) (-inf entries left out; -inf when all are).
SWITCHYARD_ROW_HELPER float span_top2_sum(const float* v, int n) noexcept {
  // Per lane the two largest values; then the lanes merged pairwise.
  float first[kSpanLanes], second[kSpanLanes];
  for (int l = 0; l < kSpanLanes; ++l) first[l] = second[l] = kNegInf;
  int e = 0;
  for (; e + kSpanLanes <= n; e += kSpanLanes) {
    for (int l = 0; l < kSpanLanes; ++l) {
      const float x = v[e + l];
      const float low = x < first[l] ? x : first[l];
      second[l] = low > second[l] ? low : second[l];
      first[l] = x > first[l] ? x : first[l];
    }
  }
  for (; e < n; ++e) {
    const float low = v[e] < first[0] ? v[e] : first[0];
    second[0] = low > second[0] ? low : second[0];
    first[0] = v[e] > first[0] ? v[e] : first[0];
  }
  for (int width = kSpanLanes / 2; width >= 1; width /= 2) {
    for (int l = 0; l < width; ++l) {
      const float a = first[l], b = first[l + width];
      const float high_second = second[l] > second[l + width] ? second[l] : second[l + width];
      const float low_first = a < b ? a : b;
      first[l] = a > b ? a : b;
      second[l] = low_first > high_second ? low_first : high_second;
    }
  }
  if (first[0] == kNegInf) return kNegInf;
  return second[0] == kNegInf ? first[0] : first[0] + second[0];
}

SWITCHYARD_ROW_KERNEL float row_max(const float* z, int n, bool skip_non_finite) noexcept {
  float lanes[kLanes];
  for (float& l : lanes) l = kNegInf;
  int e = 0;
  if (!skip_non_finite) {
    for (; e + kLanes <= n; e += kLanes) {
      for (int l = 0; l < kLanes; ++l) lanes[l] = z[e + l] > lanes[l] ? z[e + l] : lanes[l];
    }
  }
  for (; e < n; ++e) {
    if (!skip_non_finite || std::isfinite(z[e])) lanes[0] = z[e] > lanes[0] ? z[e] : lanes[0];
  }
  float m = lanes[0];
  for (int l = 1; l < kLanes; ++l) m = lanes[l] > m ? lanes[l] : m;
  return m;
}

/// Σ lanes, added pairwise (a fixed order: the same bits for every vector width).
template <typename T>
T pairwise_sum(T* lanes) noexcept {
  for (int width = kLanes / 2; width >= 1; width /= 2) {
    for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  }
  return lanes[0];
}

/// Writes exp(z - max) to p (when kWrite) and returns their sum in float64. Inlined into
/// the two kernels below (multi-versioned functions cannot be templates).
template <bool kWrite>
SWITCHYARD_ROW_HELPER double exp_sum(const float* z, int n, float max, float* p,
                                     bool skip_non_finite) noexcept {
  double lanes[kLanes] = {};
  int e = 0;
  if (!skip_non_finite) {
    for (; e + kLanes <= n; e += kLanes) {
      float x[kLanes];
      for (int l = 0; l < kLanes; ++l) x[l] = vector_exp(z[e + l] - max);
      for (int l = 0; l < kLanes; ++l) lanes[l] += static_cast<double>(x[l]);
      if constexpr (kWrite) {
        for (int l = 0; l < kLanes; ++l) p[e + l] = x[l];
      }
    }
  }
  for (; e < n; ++e) {
    const float x = !skip_non_finite || std::isfinite(z[e]) ? vector_exp(z[e] - max) : 0.0f;
    lanes[0] += static_cast<double>(x);
    if constexpr (kWrite) p[e] = x;
  }
  return pairwise_sum(lanes);
}

SWITCHYARD_ROW_KERNEL double exp_sum_writing(const float* z, int n, float max, float* p,
                                             bool skip_non_finite) noexcept {
  return exp_sum<true>(z, n, max, p, skip_non_finite);
}

SWITCHYARD_ROW_KERNEL double exp_sum_only(const float* z, int n, float max,
                                          bool skip_non_finite) noexcept {
  return exp_sum<false>(z, n, max, nullptr, skip_non_finite);
}

}  // namespace

double softmax_row(const float* z, int n, float* p, bool skip_non_finite) noexcept {
  const float max = row_max(z, n, skip_non_finite);
  if (max == kNegInf) {
    for (int e = 0; e < n; ++e) p[e] = 0.0f;
    return -std::numeric_limits<double>::infinity();
  }
  const double sum = exp_sum_writing(z, n, max, p, skip_non_finite);
  scale_row(p, n, static_cast<float>(1.0 / sum), p);
  return static_cast<double>(max) + std::log(sum);
}

double log_sum_exp_row(const float* z, int n, bool skip_non_finite) noexcept {
  const float max = row_max(z, n, skip_non_finite);
  if (max == kNegInf) return -std::numeric_limits<double>::infinity();
  return static_cast<double>(max) + std::log(exp_sum_only(z, n, max, skip_non_finite));
}

SWITCHYARD_ROW_KERNEL float sigmoid_row(const float* z, int n, float* s,
                                        bool skip_non_finite) noexcept {
  float lanes[kLanes] = {};
  int e = 0;
  if (!skip_non_finite) {
    for (; e + kLanes <= n; e += kLanes) {
      float x[kLanes];
      for (int l = 0; l < kLanes; ++l) x[l] = 1.0f / (1.0f + vector_exp(-z[e + l]));
      for (int l = 0; l < kLanes; ++l) lanes[l] += x[l];
      for (int l = 0; l < kLanes; ++l) s[e + l] = x[l];
    }
  }
  for (; e < n; ++e) {
    s[e] = !skip_non_finite || std::isfinite(z[e]) ? 1.0f / (1.0f + vector_exp(-z[e])) : 0.0f;
    lanes[0] += s[e];
  }
  return pairwise_sum(lanes);
}

float sqrt_softplus_row(const float* z, int n, float* s, bool skip_non_finite) noexcept {
  float sum = 0;
  for (int e = 0; e < n; ++e) {
    if (skip_non_finite && !std::isfinite(z[e])) {
      s[e] = 0.0f;
      continue;
    }
    s[e] = std::sqrt(z[e] > 20.0f ? z[e] : std::log1p(std::exp(z[e])));
    sum += s[e];
  }
  return sum;
}

namespace {

/// Writes to out the indices e in [begin, end) with v[e] > floor, in order; returns how many.
/// Branch-free; at most end - begin entries.
inline int gather_above_generic(const float* v, int begin, int end, float floor,
                                int* out) noexcept {
  int count = 0;
  for (int e = begin; e < end; ++e) {
    out[count] = e;
    count += v[e] > floor ? 1 : 0;
  }
  return count;
}

#if defined(__x86_64__)
/// gather_above_generic with AVX-512's compress-store, 16 entries per step.
__attribute__((target("avx512f"))) int gather_above_avx512(const float* v, int begin, int end,
                                                           float floor, int* out) noexcept {
  int count = 0;
  __m512i index =
      _mm512_add_epi32(_mm512_set1_epi32(begin),
                       _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  const __m512 threshold = _mm512_set1_ps(floor);
  int e = begin;
  for (; e + 16 <= end; e += 16) {
    const __mmask16 above = _mm512_cmp_ps_mask(_mm512_loadu_ps(v + e), threshold, _CMP_GT_OQ);
    _mm512_mask_compressstoreu_epi32(out + count, above, index);
    count += __builtin_popcount(above);
    index = _mm512_add_epi32(index, _mm512_set1_epi32(16));
  }
  return count + gather_above_generic(v, e, end, floor, out + count);
}
#endif

using GatherAbove = int (*)(const float*, int, int, float, int*) noexcept;
const GatherAbove gather_above = [] {
#if defined(__x86_64__)
  if (__builtin_cpu_supports("avx512f")) return GatherAbove{&gather_above_avx512};
#endif
  return GatherAbove{&gather_above_generic};
}();

/// The k best entries seen so far, best first: larger value, then lower index (so the
/// result does not depend on the order in which entries are offered).
class TopK {
 public:
  TopK(int k, int* out, float* top) noexcept : k_(k), out_(out), top_(top) {}
  int found() const noexcept { return found_; }
  /// Entries at or below this cannot enter (NaN never does).
  float floor() const noexcept { return floor_; }
  void set_floor(float floor) noexcept { floor_ = floor; }

  void offer(const float* v, int e) noexcept {
    const float x = v[e];
    if (!(x > floor_)) return;
    if (found_ == k_ && !before(x, e, top_[k_ - 1], out_[k_ - 1])) return;
    int i = found_ < k_ ? found_++ : k_ - 1;
    for (; i > 0 && before(x, e, top_[i - 1], out_[i - 1]); --i) {
      top_[i] = top_[i - 1];
      out_[i] = out_[i - 1];
    }
    top_[i] = x;
    out_[i] = e;
    // An entry equal to the k-th may still enter if its index is lower: keep it above floor.
    if (found_ == k_) floor_ = std::nextafter(top_[k_ - 1], kNegInf);
  }

  /// Offers v[e] for e in [begin, end): the indices of the entries above the floor are
  /// gathered a chunk at a time without branching, then offered.
  void offer_range(const float* v, int begin, int end) noexcept {
    constexpr int kChunk = 64;
    int candidates[kChunk];
    for (int chunk = begin; chunk < end; chunk += kChunk) {
      const int count = gather_above(v, chunk, std::min(end, chunk + kChunk), floor_, candidates);
      for (int c = 0; c < count; ++c) offer(v, candidates[c]);
    }
  }

 private:
  static bool before(float x, int ex, float y, int ey) noexcept {
    return x > y || (x == y && ex < ey);
  }
  int k_;
  int* out_;
  float* top_;
  int found_ = 0;
  float floor_ = kNegInf;
};

/// select_top_k for k <= S / 4 and n >= 4 S. The maxima of the S residue classes e mod S
/// (vectorised) give a bound that k entries are known to reach; only the entries at or
/// above it are offered.
template <int S>
SWITCHYARD_ROW_HELPER int select_top_k_by_classes(const float* v, int n, TopK& best,
                                                  int k) noexcept {
  float maxima[S];
  for (float& m : maxima) m = kNegInf;
  int e = 0;
  for (; e + S <= n; e += S) {
    for (int l = 0; l < S; ++l) maxima[l] = v[e + l] > maxima[l] ? v[e + l] : maxima[l];
  }
  for (int l = 0; e < n; ++e, ++l) maxima[l] = v[e] > maxima[l] ? v[e] : maxima[l];
  // The bound: the smallest of the maxima of k disjoint sets of classes. Where a set holds
  // only -inf (masked experts, groups left out), the k-th largest class maximum instead.
  float bound = std::numeric_limits<float>::infinity();
  for (int j = 0; j < k; ++j) {
    float m = kNegInf;
    for (int l = j * S / k; l < (j + 1) * S / k; ++l) m = maxima[l] > m ? maxima[l] : m;
    bound = m < bound ? m : bound;
  }
  if (!(bound > kNegInf)) {
    int index[S];
    float top[S];
    TopK best_classes(k, index, top);
    best_classes.offer_range(maxima, 0, S);
    bound = best_classes.found() == k ? top[k - 1] : kNegInf;
  }
  if (bound > kNegInf) best.set_floor(std::nextafter(bound, kNegInf));
  best.offer_range(v, 0, n);
  return best.found();
}

}  // namespace

SWITCHYARD_ROW_KERNEL int select_top_k(const float* v, int n, int k, int* out,
                                       float* top) noexcept {
  TopK best(k, out, top);
  if (k <= 2 && n >= 4 * 8) return select_top_k_by_classes<8>(v, n, best, k);
  if (k <= 8 && n >= 4 * 32) return select_top_k_by_classes<32>(v, n, best, k);
  if (k <= 32 && n >= 4 * 128) return select_top_k_by_classes<128>(v, n, best, k);
  best.offer_range(v, 0, n);
  return best.found();
}

namespace {

/// acc[e] = max(acc[e], v[e]).
SWITCHYARD_ROW_KERNEL void max_into(float* acc, const float* v, int n) noexcept {
  int e = 0;
  for (; e + kLanes <= n; e += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[e + l] = v[e + l] > acc[e + l] ? v[e + l] : acc[e + l];
  }
  for (; e < n; ++e) acc[e] = v[e] > acc[e] ? v[e] : acc[e];
}

}  // namespace

int select_top_c(const float* v, int n, int c, int* out, TopCScratch& scratch) {
  if (c <= 0 || n <= 0) return 0;
  // A bound that c entries reach, from the maxima of S >= 4c residue classes (as in
  // select_top_k): only the entries at or above it are candidates.
  float bound = kNegInf;
  // More classes per set (8 rather than 4) give a tighter bound where n allows it.
  int classes = 1;
  while (classes < 8 * c) classes *= 2;
  if (n / 4 < classes) classes /= 2;
  if (n / 4 >= classes) {
    scratch.maxima.assign(static_cast<std::size_t>(classes), kNegInf);
    float* maxima = scratch.maxima.data();
    int e = 0;
    for (; e + classes <= n; e += classes) max_into(maxima, v + e, classes);
    max_into(maxima, v + e, n - e);
    bound = std::numeric_limits<float>::infinity();
    for (int j = 0; j < c; ++j) {
      const int begin = static_cast<int>(static_cast<std::int64_t>(classes) * j / c);
      const int end = static_cast<int>(static_cast<std::int64_t>(classes) * (j + 1) / c);
      float m = kNegInf;
      for (int l = begin; l < end; ++l) m = maxima[l] > m ? maxima[l] : m;
      bound = m < bound ? m : bound;
    }
  }
  const float floor = bound > kNegInf ? std::nextafter(bound, kNegInf) : kNegInf;
  scratch.candidates.resize(static_cast<std::size_t>(n));
  int* candidates = scratch.candidates.data();
  const int count = gather_above(v, 0, n, floor, candidates);
  if (count <= c) {
    std::copy(candidates, candidates + count, out);
    return count;
  }
  // The c-th largest value among the candidates, then (in index order) every candidate
  // above it and the lowest-indexed ones equal to it.
  scratch.values.resize(static_cast<std::size_t>(count));
  float* values = scratch.values.data();
  for (int i = 0; i < count; ++i) values[i] = v[candidates[i]];
  std::nth_element(values, values + (c - 1), values + count, std::greater<>());
  const float cth = values[c - 1];
  int above = 0;
  for (int i = 0; i < count; ++i) above += v[candidates[i]] > cth ? 1 : 0;
  int found = 0, equal_left = c - above;
  for (int i = 0; i < count; ++i) {
    const float x = v[candidates[i]];
    if (x > cth || (x == cth && equal_left-- > 0)) out[found++] = candidates[i];
  }
  return found;
}

SWITCHYARD_ROW_KERNEL void score_groups(const float* v, const int* group_begin, int num_groups,
                                        int take, int* index, float* top, float* scores) noexcept {
  for (int g = 0; g < num_groups; ++g) {
    const float* span = v + group_begin[g];
    const int size = group_begin[g + 1] - group_begin[g];
    if (take == 1) {
      scores[g] = span_max(span, size);
    } else if (take == 2) {
      scores[g] = span_top2_sum(span, size);
    } else {
      const int n = select_top_k(span, size, take, index, top);
      float score = n == 0 ? kNegInf : 0.0f;
      for (int i = 0; i < n; ++i) score += top[i];
      scores[g] = score;
    }
  }
}

SWITCHYARD_ROW_KERNEL std::int64_t first_non_finite(const float* v, std::int64_t n) noexcept {
  constexpr std::int64_t kBlock = std::int64_t{4} * kLanes;
  std::int64_t e = 0;
  for (; e + kBlock <= n; e += kBlock) {
    // x - x is 0 for finite x and NaN for inf and NaN.
    int bad = 0;
    for (std::int64_t l = 0; l < kBlock; ++l) bad |= (v[e + l] - v[e + l]) == 0.0f ? 0 : 1;
    if (bad != 0) break;
  }
  for (; e < n; ++e) {
    if (!std::isfinite(v[e])) return e;
  }
  return n;
}

SWITCHYARD_ROW_KERNEL void scale_row(const float* in, int n, float factor, float* out) noexcept {
  int e = 0;
  for (; e + kLanes <= n; e += kLanes) {
    for (int l = 0; l < kLanes; ++l) out[e + l] = in[e + l] * factor;
  }
  for (; e < n; ++e) out[e] = in[e] * factor;
}

SWITCHYARD_ROW_KERNEL void add_row(const float* a, const float* b, int n, float* out) noexcept {
  int e = 0;
  for (; e + kLanes <= n; e += kLanes) {
    for (int l = 0; l < kLanes; ++l) out[e + l] = a[e + l] + b[e + l];
  }
  for (; e < n; ++e) out[e] = a[e] + b[e];
}

SWITCHYARD_ROW_KERNEL void accumulate_row(const float* p, int n, double* sums) noexcept {
  int e = 0;
  for (; e + kLanes <= n; e += kLanes) {
    for (int l = 0; l < kLanes; ++l) sums[e + l] += static_cast<double>(p[e + l]);
  }
  for (; e < n; ++e) sums[e] += static_cast<double>(p[e]);
}

}  // namespace switchyard
