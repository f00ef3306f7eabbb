// The per-token routing kernels against independent references: the exponential against
// float64 std::exp, softmax and log-sum-exp against float64 sums, and the top-k selection
// against a full sort of (value descending, index ascending) — over sizes that take each
// path (small rows, class bounds of 8, 32 and 128, masked entries, ties, NaN).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "switchyard/routing_rows.hpp"

using namespace switchyard;

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

/// The k largest non-(-inf), non-NaN entries by a full sort: value descending, index ascending.
std::vector<int> sorted_top_k(const std::vector<float>& v, int k) {
  std::vector<int> order;
  for (int e = 0; e < static_cast<int>(v.size()); ++e) {
    if (!std::isnan(v[static_cast<std::size_t>(e)]) && v[static_cast<std::size_t>(e)] != -kInf)
      order.push_back(e);
  }
  std::sort(order.begin(), order.end(), [&](int a, int b) {
    const float va = v[static_cast<std::size_t>(a)], vb = v[static_cast<std::size_t>(b)];
    return va != vb ? va > vb : a < b;
  });
  if (static_cast<int>(order.size()) > k) order.resize(static_cast<std::size_t>(k));
  return order;
}

std::vector<int> kernel_top_k(const std::vector<float>& v, int k) {
  std::vector<int> out(static_cast<std::size_t>(k), -1);
  std::vector<float> top(static_cast<std::size_t>(k));
  const int found = select_top_k(v.data(), static_cast<int>(v.size()), k, out.data(), top.data());
  out.resize(static_cast<std::size_t>(found));
  for (int j = 0; j < found; ++j)
    CHECK(top[static_cast<std::size_t>(j)] ==
          v[static_cast<std::size_t>(out[static_cast<std::size_t>(j)])]);
  return out;
}

}  // namespace

TEST_CASE("vector_exp is within 2 ulp of exp over the float range, with its edges") {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> anywhere(-87.0f, 88.5f);
  std::vector<float> xs = {0.0f, -0.0f, 1.0f, -1.0f, 0.5f, 1e-8f, -1e-8f, 88.0f, -87.0f};
  for (int i = 0; i < 200000; ++i) xs.push_back(anywhere(rng));
  for (float x : xs) {
    const double exact = std::exp(static_cast<double>(x));
    const float got = vector_exp(x);
    const double ulp = static_cast<double>(std::nextafter(static_cast<float>(exact), kInf)) -
                       static_cast<double>(static_cast<float>(exact));
    REQUIRE(std::abs(static_cast<double>(got) - exact) <= 2.0 * ulp);
  }
  CHECK(vector_exp(-1000.0f) == 0.0f);
  CHECK(vector_exp(-kInf) == 0.0f);
  CHECK(vector_exp(89.0f) == kInf);
  CHECK(vector_exp(kInf) == kInf);
  CHECK(std::isnan(vector_exp(std::numeric_limits<float>::quiet_NaN())));
}

TEST_CASE("softmax_row and log_sum_exp_row match float64, masking non-finite logits") {
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (int n : {1, 3, 8, 15, 16, 17, 64, 257}) {
    std::vector<float> z(static_cast<std::size_t>(n)), p(static_cast<std::size_t>(n));
    for (auto& v : z) v = normal(rng);
    if (n > 3) {
      z[1] = std::numeric_limits<float>::quiet_NaN();
      z[2] = -kInf;
    }
    double max = -kInf;
    for (float v : z) {
      if (std::isfinite(v)) max = std::max(max, static_cast<double>(v));
    }
    double sum = 0;
    for (float v : z) {
      if (std::isfinite(v)) sum += std::exp(static_cast<double>(v) - max);
    }
    const double lse = max + std::log(sum);
    CHECK(softmax_row(z.data(), n, p.data(), true) == doctest::Approx(lse).epsilon(1e-7));
    CHECK(log_sum_exp_row(z.data(), n, true) == doctest::Approx(lse).epsilon(1e-7));
    for (int e = 0; e < n; ++e) {
      const float v = z[static_cast<std::size_t>(e)];
      const double expected = std::isfinite(v) ? std::exp(static_cast<double>(v) - lse) : 0.0;
      CHECK(p[static_cast<std::size_t>(e)] == doctest::Approx(expected).epsilon(1e-6));
    }
  }
  std::vector<float> masked = {std::numeric_limits<float>::quiet_NaN(), kInf};
  std::vector<float> p(2, 1.0f);
  CHECK(softmax_row(masked.data(), 2, p.data(), true) == -std::numeric_limits<double>::infinity());
  CHECK(p[0] == 0.0f);
  CHECK(p[1] == 0.0f);
}

TEST_CASE("sigmoid_row matches float64 and returns the sum") {
  std::vector<float> z = {-100.0f, -5.0f, -0.5f, 0.0f, 0.25f, 3.0f, 20.0f, 100.0f, 1.5f,
                          -2.0f,   7.0f,  -7.0f, 0.1f, 0.2f,  0.3f, 0.4f,  0.5f};
  std::vector<float> s(z.size());
  const float sum = sigmoid_row(z.data(), static_cast<int>(z.size()), s.data(), false);
  double expected_sum = 0;
  for (std::size_t e = 0; e < z.size(); ++e) {
    const double expected = 1.0 / (1.0 + std::exp(-static_cast<double>(z[e])));
    expected_sum += expected;
    CHECK(s[e] == doctest::Approx(expected).epsilon(1e-6));
  }
  CHECK(sum == doctest::Approx(expected_sum).epsilon(1e-6));
}

TEST_CASE("select_top_k equals a full sort: every path, ties, -inf and NaN") {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> coarse(0, 6);  // many ties
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  for (int n : {1, 2, 7, 31, 32, 33, 100, 128, 255, 256, 257, 512, 1000, 1024}) {
    for (int k : {1, 2, 3, 8, 9, 16, 32, 33}) {
      if (k > n) continue;
      for (int trial = 0; trial < 20; ++trial) {
        std::vector<float> v(static_cast<std::size_t>(n));
        for (auto& x : v) x = trial % 3 == 0 ? static_cast<float>(coarse(rng)) : normal(rng);
        if (trial % 4 == 1) {
          // Contiguous runs of -inf (groups left out) and scattered masked entries.
          std::fill(v.begin(), v.begin() + n / 2, -kInf);
          for (auto& x : v) {
            if (unit(rng) < 0.1f) x = std::numeric_limits<float>::quiet_NaN();
          }
        }
        if (trial % 5 == 2) std::sort(v.begin(), v.end());  // ascending: every entry inserts
        CAPTURE(n);
        CAPTURE(k);
        CAPTURE(trial);
        REQUIRE(kernel_top_k(v, k) == sorted_top_k(v, k));
      }
    }
  }
  // All equal: the k lowest indices; all -inf: none.
  std::vector<float> equal(300, 0.25f);
  std::vector<int> first8(8);
  std::iota(first8.begin(), first8.end(), 0);
  CHECK(kernel_top_k(equal, 8) == first8);
  CHECK(kernel_top_k(std::vector<float>(300, -kInf), 8).empty());
}

TEST_CASE("score_groups: max, top2_sum and the sum of the top n per group") {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const std::vector<int> begin = {0, 5, 37, 37 + 64, 37 + 64 + 3, 37 + 64 + 3 + 40};
  const int groups = static_cast<int>(begin.size()) - 1;
  std::vector<float> v(static_cast<std::size_t>(begin.back()));
  for (auto& x : v) x = normal(rng);
  std::fill(v.begin() + 37 + 64, v.begin() + 37 + 64 + 3, -kInf);  // a group fully masked
  v[40] = -kInf;
  for (int take : {1, 2, 3}) {
    std::vector<float> scores(static_cast<std::size_t>(groups));
    std::vector<int> index(static_cast<std::size_t>(take));
    std::vector<float> top(static_cast<std::size_t>(take));
    score_groups(v.data(), begin.data(), groups, take, index.data(), top.data(), scores.data());
    for (int g = 0; g < groups; ++g) {
      std::vector<float> members(v.begin() + begin[static_cast<std::size_t>(g)],
                                 v.begin() + begin[static_cast<std::size_t>(g) + 1]);
      members.erase(std::remove(members.begin(), members.end(), -kInf), members.end());
      std::sort(members.begin(), members.end(), std::greater<>());
      CAPTURE(take);
      CAPTURE(g);
      if (members.empty()) {
        CHECK(scores[static_cast<std::size_t>(g)] == -kInf);
        continue;
      }
      double expected = 0;
      for (int i = 0; i < take && i < static_cast<int>(members.size()); ++i)
        expected += members[static_cast<std::size_t>(i)];
      CHECK(scores[static_cast<std::size_t>(g)] == doctest::Approx(expected).epsilon(1e-6));
    }
  }
}

TEST_CASE("first_non_finite finds the first NaN or infinity, or returns n") {
  std::vector<float> v(1000, 1.0f);
  CHECK(first_non_finite(v.data(), 1000) == 1000);
  v[777] = kInf;
  CHECK(first_non_finite(v.data(), 1000) == 777);
  v[5] = std::numeric_limits<float>::quiet_NaN();
  CHECK(first_non_finite(v.data(), 1000) == 5);
  v[999] = -kInf;
  CHECK(first_non_finite(v.data() + 900, 100) == 99);
  CHECK(first_non_finite(v.data(), 0) == 0);
}

TEST_CASE("scale_row, add_row and accumulate_row over rows with a tail") {
  std::vector<float> a(37), b(37), out(37);
  std::vector<double> sums(37, 1.0);
  for (int e = 0; e < 37; ++e) {
    a[static_cast<std::size_t>(e)] = static_cast<float>(e) * 0.5f;
    b[static_cast<std::size_t>(e)] = 2.0f - static_cast<float>(e);
  }
  add_row(a.data(), b.data(), 37, out.data());
  for (int e = 0; e < 37; ++e)
    CHECK(out[static_cast<std::size_t>(e)] == 2.0f - 0.5f * static_cast<float>(e));
  scale_row(a.data(), 37, 4.0f, out.data());
  for (int e = 0; e < 37; ++e)
    CHECK(out[static_cast<std::size_t>(e)] == 2.0f * static_cast<float>(e));
  accumulate_row(a.data(), 37, sums.data());
  for (int e = 0; e < 37; ++e) CHECK(sums[static_cast<std::size_t>(e)] == 1.0 + 0.5 * e);
}

TEST_CASE("select_top_c equals a full sort for large c, with ties and masked entries") {
  std::mt19937 rng(13);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> coarse(0, 3);
  TopCScratch scratch;
  for (int n : {1, 10, 100, 1000, 4096, 10000, 65536}) {
    for (int c : {1, 2, 7, 64, 256, 1000, 2048, 5000, 70000}) {
      for (int trial = 0; trial < 3; ++trial) {
        std::vector<float> v(static_cast<std::size_t>(n));
        for (auto& x : v) x = trial == 0 ? static_cast<float>(coarse(rng)) : normal(rng);
        if (trial == 2) {
          std::fill(v.begin(), v.begin() + n / 3, -kInf);
          v[static_cast<std::size_t>(n - 1)] = std::numeric_limits<float>::quiet_NaN();
        }
        std::vector<int> expected = sorted_top_k(v, c);
        std::sort(expected.begin(), expected.end());
        std::vector<int> got(static_cast<std::size_t>(std::min(n, c)));
        got.resize(static_cast<std::size_t>(select_top_c(v.data(), n, c, got.data(), scratch)));
        CAPTURE(n);
        CAPTURE(c);
        CAPTURE(trial);
        REQUIRE(got == expected);
      }
    }
  }
}
