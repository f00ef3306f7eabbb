// The host router logits: every kernel (AVX-512, AVX2, portable) gives the bits of the
// documented order, written out again here as plain scalar code, on shapes that exercise
// the block and lane edges; a token's logits do not depend on the rows computed with it;
// and they are within float32 rounding of a float64 dot product.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "switchyard/layer.hpp"
#include "switchyard/status.hpp"
#include "switchyard/tensor.hpp"

using namespace switchyard;

namespace {

/// The order layer.hpp documents: 16 fma lanes over h mod 16, zero padding, pairwise sum.
float documented_logit(const float* x, const float* w, std::int64_t H) {
  float lane[16] = {};
  const std::int64_t padded = (H + 15) / 16 * 16;
  for (std::int64_t h = 0; h < padded; ++h) {
    const float a = h < H ? x[h] : 0.0f, b = h < H ? w[h] : 0.0f;
    lane[h % 16] = std::fma(a, b, lane[h % 16]);
  }
  for (int width = 8; width >= 1; width /= 2)
    for (int i = 0; i < width; ++i) lane[i] = lane[i] + lane[i + width];
  return lane[0];
}

std::vector<float> random_values(std::size_t n, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = normal(rng);
  return v;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace

TEST_CASE("router logits: every kernel gives the documented order's bits") {
  std::mt19937 rng(11);
  struct Shape {
    std::int64_t T, E, H;
  };
  for (const Shape s :
       {Shape{1, 1, 1}, Shape{5, 3, 7}, Shape{7, 9, 16}, Shape{13, 64, 100}, Shape{4, 8, 2048},
        Shape{33, 17, 129}, Shape{7, 6, 1100}, Shape{5, 70, 40}}) {
    CAPTURE(s.T);
    CAPTURE(s.E);
    CAPTURE(s.H);
    const auto x = random_values(static_cast<std::size_t>(s.T * s.H), rng);
    const auto gate = random_values(static_cast<std::size_t>(s.E * s.H), rng);
    std::vector<float> expected(static_cast<std::size_t>(s.T * s.E));
    for (std::int64_t t = 0; t < s.T; ++t)
      for (std::int64_t e = 0; e < s.E; ++e)
        expected[static_cast<std::size_t>(t * s.E + e)] =
            documented_logit(x.data() + t * s.H, gate.data() + e * s.H, s.H);
    const TensorView xv(const_cast<float*>(x.data()), DType::kF32, {s.T, s.H});
    const TensorView gv(const_cast<float*>(gate.data()), DType::kF32, {s.E, s.H});
    std::vector<float> got(expected.size(), std::nanf(""));
    compute_router_logits(xv, gv, got.data());
    CHECK(same_bits(got, expected));
    for (auto isa : {detail::RouterLogitsIsa::kPortable, detail::RouterLogitsIsa::kAvx2,
                     detail::RouterLogitsIsa::kAvx512}) {
      CAPTURE(static_cast<int>(isa));
      std::fill(got.begin(), got.end(), std::nanf(""));
      try {
        detail::compute_router_logits_with(xv, gv, got.data(), isa);
      } catch (const Error& e) {
        MESSAGE("not on this processor: " << e.what());
        continue;
      }
      CHECK(same_bits(got, expected));
    }
    // Within float32 rounding of the float64 dot product.
    for (std::int64_t t = 0; t < s.T; ++t) {
      for (std::int64_t e = 0; e < s.E; ++e) {
        double dot = 0, magnitude = 0;
        for (std::int64_t h = 0; h < s.H; ++h) {
          const double p = static_cast<double>(x[static_cast<std::size_t>(t * s.H + h)]) *
                           gate[static_cast<std::size_t>(e * s.H + h)];
          dot += p;
          magnitude += std::fabs(p);
        }
        CHECK(std::fabs(expected[static_cast<std::size_t>(t * s.E + e)] - dot) <=
              1e-6 * magnitude + 1e-30);
      }
    }
  }
}

TEST_CASE("router logits: a token's logits do not depend on the rows computed with it") {
  std::mt19937 rng(5);
  const std::int64_t T = 23, E = 10, H = 77;
  const auto x = random_values(static_cast<std::size_t>(T * H), rng);
  const auto gate = random_values(static_cast<std::size_t>(E * H), rng);
  const TensorView gv(const_cast<float*>(gate.data()), DType::kF32, {E, H});
  std::vector<float> all(static_cast<std::size_t>(T * E));
  compute_router_logits(TensorView(const_cast<float*>(x.data()), DType::kF32, {T, H}), gv,
                        all.data());
  for (std::int64_t first = 0; first < T; first += 5) {
    const std::int64_t count = std::min<std::int64_t>(5, T - first);
    std::vector<float> part(static_cast<std::size_t>(count * E));
    compute_router_logits(
        TensorView(const_cast<float*>(x.data() + first * H), DType::kF32, {count, H}), gv,
        part.data());
    CHECK(std::memcmp(part.data(), all.data() + first * E, part.size() * sizeof(float)) == 0);
  }
}

TEST_CASE("router backward GEMMs: within float32 rounding of float64 sums, and added to") {
  // Shapes across the register blocks (4 rows × 16 columns), the dx slices (512 columns)
  // and the d_gate token slices (64 tokens), with their ragged edges.
  struct Shape {
    std::int64_t T, E, H;
  };
  for (const Shape s : {Shape{1, 1, 1}, Shape{7, 5, 37}, Shape{130, 9, 600}, Shape{65, 64, 16}}) {
    CAPTURE(s.T);
    CAPTURE(s.E);
    CAPTURE(s.H);
    std::mt19937 rng(static_cast<unsigned>(s.T * 131 + s.E * 7 + s.H));
    auto x = random_values(static_cast<std::size_t>(s.T * s.H), rng);
    auto gate = random_values(static_cast<std::size_t>(s.E * s.H), rng);
    auto d_logits = random_values(static_cast<std::size_t>(s.T * s.E), rng);
    auto dx = random_values(static_cast<std::size_t>(s.T * s.H), rng);  // added to
    auto d_gate = random_values(static_cast<std::size_t>(s.E * s.H), rng);
    const auto dx0 = dx, d_gate0 = d_gate;
    accumulate_router_gradients(TensorView(x.data(), DType::kF32, {s.T, s.H}),
                                TensorView(gate.data(), DType::kF32, {s.E, s.H}), d_logits.data(),
                                TensorView(dx.data(), DType::kF32, {s.T, s.H}),
                                TensorView(d_gate.data(), DType::kF32, {s.E, s.H}));
    // Each element against its float64 sum; the bound scales with the sum of |terms|.
    for (std::int64_t t = 0; t < s.T; ++t) {
      for (std::int64_t h = 0; h < s.H; ++h) {
        double sum = dx0[t * s.H + h], magnitude = std::fabs(sum);
        for (std::int64_t e = 0; e < s.E; ++e) {
          const double term = double{d_logits[t * s.E + e]} * gate[e * s.H + h];
          sum += term;
          magnitude += std::fabs(term);
        }
        REQUIRE(std::fabs(dx[t * s.H + h] - sum) <=
                1e-6 * static_cast<double>(s.E + 1) * magnitude + 1e-30);
      }
    }
    for (std::int64_t e = 0; e < s.E; ++e) {
      for (std::int64_t h = 0; h < s.H; ++h) {
        double sum = d_gate0[e * s.H + h], magnitude = std::fabs(sum);
        for (std::int64_t t = 0; t < s.T; ++t) {
          const double term = double{d_logits[t * s.E + e]} * x[t * s.H + h];
          sum += term;
          magnitude += std::fabs(term);
        }
        REQUIRE(std::fabs(d_gate[e * s.H + h] - sum) <=
                1e-6 * static_cast<double>(s.T + 1) * magnitude + 1e-30);
      }
    }
  }
}
