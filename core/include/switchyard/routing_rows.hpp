#pragma once
/// \file
/// The per-token kernels every routing policy is made of (docs/routing.md), written once:
/// softmax and sigmoid scores of one token's logits, its log-sum-exp for the z-loss, and
/// the top-k selection with ties to the lower expert index. Host memory, float32; no
/// allocation; safe to call from any thread on disjoint outputs.
///
/// They are written to be fast on a CPU, because routing runs once per token per layer:
/// the exponential is a polynomial the compiler vectorises (within 2 ulp of the correctly
/// rounded exp; BENCHMARKS.md, "Routing"), sums run over 8 lanes, and the selection keeps a
/// sorted list of k so that most experts cost one compare.

#include <bit>
#include <cstdint>
#include <vector>

namespace switchyard {

/// exp(x) in float32 within 2 ulp where the result is a normal float (results below
/// FLT_MIN are rounded to subnormals; 0 below about -87.34), +inf above about 88.72, NaN
/// for NaN. Inline and branch-free so that loops over it vectorise.
inline float vector_exp(float x) noexcept {
  // exp(x) = 2^n · exp(r), n = round(x / ln 2), |r| <= ln2 / 2; exp(r) by Cephes' expf
  // polynomial; 2^n as two factors built in the exponent bits (n ranges over [-126, 128]).
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 · 2^23: adding and subtracting it rounds
  constexpr float kMax = 88.7228394f, kMin = -87.3365479f;
  float c = x < kMax ? x : kMax;  // NaN takes kMax here; it is restored at the end
  c = c > kMin ? c : kMin;
  const float n = (c * kLog2e + kRound) - kRound;
  const float r = (c - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const auto whole = static_cast<std::int32_t>(n);
  const std::int32_t half = whole >> 1;
  const float scale_a = std::bit_cast<float>(static_cast<std::uint32_t>(half + 127) << 23);
  const float scale_b = std::bit_cast<float>(static_cast<std::uint32_t>(whole - half + 127) << 23);
  float result = (p * scale_a) * scale_b;
  result = x < kMin ? 0.0f : result;
  result = x >= kMax ? __builtin_inff() : result;
  return x == x ? result : x;  // NOLINT(misc-redundant-expression): NaN test
}

/// p[e] = softmax of the row z[0..n) in float32 (exp(z - max) / Σ); returns the row's
/// log-sum-exp in float64 (the z-loss term; the sum of the float32 exponentials is taken in
/// float64). With `skip_non_finite`, non-finite logits get p = 0 and are left out of the
/// sums; a row with none finite gets p = 0 everywhere and returns -inf.
double softmax_row(const float* z, int n, float* p, bool skip_non_finite) noexcept;

/// The row's log-sum-exp in float64, like `softmax_row` without writing probabilities.
double log_sum_exp_row(const float* z, int n, bool skip_non_finite) noexcept;

/// s[e] = 1 / (1 + exp(-z[e])); with `skip_non_finite`, non-finite logits get s = 0.
/// Returns Σ s (float32, over 8 lanes).
float sigmoid_row(const float* z, int n, float* s, bool skip_non_finite) noexcept;

/// s[e] = √softplus(z[e]) (softplus(z) = log1p(exp(z)), z itself above 20, as PyTorch's);
/// with `skip_non_finite`, non-finite logits get s = 0. Returns Σ s (float32, in order).
float sqrt_softplus_row(const float* z, int n, float* s, bool skip_non_finite) noexcept;

/// Writes to out[0..found) the indices of the k largest values of v[0..n) in descending
/// order, ties to the lower index, and their values to top[0..found). Entries equal to -inf
/// (or NaN) are never selected: policies mark what a token may not use with -inf. Returns
/// found = min(k, number of selectable entries). O(n) compares plus O(k) per insertion.
int select_top_k(const float* v, int n, int k, int* out, float* top) noexcept;

/// Reusable scratch of `select_top_c` (grows once to the largest n).
struct TopCScratch {
  std::vector<float> maxima;
  std::vector<int> candidates;
  std::vector<float> values;
};

/// Writes to out[0..found) the indices of the c largest entries of v[0..n) — larger value,
/// then lower index — in ascending index order; -inf and NaN are never selected, and found =
/// min(c, selectable entries). For large c (an expert's capacity over a batch of tokens):
/// O(n) passes, then a selection among the entries at or above a bound that c entries
/// reach (typically 2c–3c of them). Allocates only when `scratch` grows.
int select_top_c(const float* v, int n, int c, int* out, TopCScratch& scratch);

/// The group scores of docs/routing.md (node_limited): scores[g] = the sum of the `take`
/// largest values of group g = v[group_begin[g] .. group_begin[g+1]) (-inf entries left out;
/// -inf when a group has none), for g < num_groups. `take` = 1 is the group's maximum,
/// 2 its top2_sum. `index` and `top` are scratch of `take` entries.
void score_groups(const float* v, const int* group_begin, int num_groups, int take, int* index,
                  float* top, float* scores) noexcept;

/// The index of the first NaN or infinite value of v[0..n), or n when all are finite.
std::int64_t first_non_finite(const float* v, std::int64_t n) noexcept;

/// out[e] = in[e] · factor. `out` may be `in`.
void scale_row(const float* in, int n, float factor, float* out) noexcept;

/// out[e] = a[e] + b[e] (scores plus selection bias). `out` may be `a`.
void add_row(const float* a, const float* b, int n, float* out) noexcept;

/// sums[e] += p[e] in float64 (the aux loss's Σ_t P[t,e]).
void accumulate_row(const float* p, int n, double* sums) noexcept;

}  // namespace switchyard
