// The host data path's row kernels: every instruction set gives the bits of the scalar
// definition in data_path.hpp, written out again here element by element (bf16 by bit
// arithmetic, sums from 0.0f in row order with each product and sum rounded), on lengths
// around the 16-element vectors and on values that exercise rounding ties, NaN,
// infinities and subnormals.
#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "row_kernels.hpp"
#include "switchyard/data_path.hpp"
#include "switchyard/status.hpp"

using namespace switchyard;
using detail::RowKernelIsa;
using detail::RowKernels;

namespace {

/// bf16 by hand: round to nearest, ties to even; a NaN keeps its sign and top mantissa
/// bits and becomes quiet.
std::uint16_t bf16_by_hand(float value) {
  const auto bits = std::bit_cast<std::uint32_t>(value);
  if (std::isnan(value)) return static_cast<std::uint16_t>((bits >> 16) | 0x40u);
  const std::uint32_t upper = bits >> 16, lower = bits & 0xffffu;
  const bool up = lower > 0x8000u || (lower == 0x8000u && (upper & 1u) != 0);
  return static_cast<std::uint16_t>(upper + (up ? 1u : 0u));
}

float from_bf16(std::uint16_t bits) {
  return std::bit_cast<float>(static_cast<std::uint32_t>(bits) << 16);
}

std::vector<float> awkward_values(std::size_t n, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::uniform_int_distribution<int> pick(0, 9);
  std::vector<float> v(n);
  for (auto& x : v) {
    switch (pick(rng)) {
      case 0:  // an exact tie between two bf16 values, odd or even below
        x = std::bit_cast<float>((std::bit_cast<std::uint32_t>(normal(rng)) & 0xffff0000u) |
                                 0x8000u);
        break;
      case 1:
        x = std::numeric_limits<float>::denorm_min() * static_cast<float>(pick(rng) + 1);
        break;
      case 2:
        x = pick(rng) < 5 ? std::numeric_limits<float>::infinity()
                          : -std::numeric_limits<float>::quiet_NaN();
        break;
      case 3:
        x = std::bit_cast<float>(0x7f800001u);  // signalling NaN
        break;
      default:
        x = normal(rng);
    }
  }
  return v;
}

std::vector<RowKernelIsa> available_isas() {
  std::vector<RowKernelIsa> isas{RowKernelIsa::kPortable};
  try {
    (void)detail::row_kernels(RowKernelIsa::kAvx512);
    isas.push_back(RowKernelIsa::kAvx512);
  } catch (const Error&) {
    MESSAGE("this processor has no AVX-512: only the portable kernels run");
  }
  return isas;
}

bool same_bits(const float* a, const float* b, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) {
    if (std::bit_cast<std::uint32_t>(a[i]) != std::bit_cast<std::uint32_t>(b[i])) return false;
  }
  return true;
}

}  // namespace

TEST_CASE("row kernels: bf16 encode and decode are the documented rounding, on every ISA") {
  std::mt19937 rng(11);
  for (const RowKernelIsa isa : available_isas()) {
    for (const bool streaming : {false, true}) {
      const RowKernels& k = detail::row_kernels(isa);
      for (const std::int64_t n : {0, 1, 15, 16, 17, 33, 2053}) {
        CAPTURE(n);
        CAPTURE(streaming);
        const auto in = awkward_values(static_cast<std::size_t>(n), rng);
        std::vector<std::uint16_t> encoded(static_cast<std::size_t>(n) + 1, 0xabcd);
        k.encode_bf16(in.data(), n, encoded.data(), streaming);
        for (std::int64_t h = 0; h < n; ++h) {
          CAPTURE(h);
          REQUIRE(encoded[static_cast<std::size_t>(h)] ==
                  bf16_by_hand(in[static_cast<std::size_t>(h)]));
        }
        CHECK(encoded[static_cast<std::size_t>(n)] == 0xabcd);  // nothing written past n
        std::vector<float> decoded(static_cast<std::size_t>(n) + 1, 7.0f);
        k.decode_bf16(encoded.data(), n, decoded.data(), streaming);
        k.fence();
        for (std::int64_t h = 0; h < n; ++h) {
          const float want = from_bf16(encoded[static_cast<std::size_t>(h)]);
          REQUIRE(same_bits(&decoded[static_cast<std::size_t>(h)], &want, 1));
        }
        CHECK(decoded[static_cast<std::size_t>(n)] == 7.0f);
        std::vector<float> copied(static_cast<std::size_t>(n) + 1, 5.0f);
        k.copy(in.data(), n, copied.data(), streaming);
        k.fence();
        CHECK(same_bits(copied.data(), in.data(), static_cast<std::size_t>(n)));
        CHECK(copied[static_cast<std::size_t>(n)] == 5.0f);
      }
    }
  }
}

TEST_CASE("row kernels: sums in row order, every product and sum rounded, on every ISA") {
  std::mt19937 rng(12);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (const RowKernelIsa isa : available_isas()) {
    const RowKernels& k = detail::row_kernels(isa);
    for (const std::int64_t n : {1, 16, 31, 100, 2048}) {
      for (const int count : {0, 1, 3, 8}) {
        const bool streaming = n == 2048;
        CAPTURE(n);
        CAPTURE(count);
        const auto N = static_cast<std::size_t>(n);
        std::vector<std::vector<float>> rows(static_cast<std::size_t>(count));
        std::vector<std::vector<std::uint16_t>> bf16_rows(rows.size());
        std::vector<const float*> row_ptrs;
        std::vector<const std::uint16_t*> bf16_ptrs;
        std::vector<float> weights;
        for (std::size_t i = 0; i < rows.size(); ++i) {
          rows[i].resize(N);
          bf16_rows[i].resize(N);
          for (std::size_t h = 0; h < N; ++h) {
            rows[i][h] = normal(rng) * 1000.0f;  // large terms: order and rounding show
            bf16_rows[i][h] = bf16_by_hand(rows[i][h]);
          }
          row_ptrs.push_back(rows[i].data());
          bf16_ptrs.push_back(bf16_rows[i].data());
          weights.push_back(normal(rng));
        }
        std::vector<float> want_weighted(N), want_sum(N), want_bf16_sum(N);
        for (std::size_t h = 0; h < N; ++h) {
          float weighted = 0.0f, sum = 0.0f, bf16_sum = 0.0f;
          for (std::size_t i = 0; i < rows.size(); ++i) {
            const float product = weights[i] * rows[i][h];
            weighted = weighted + product;
            sum = sum + rows[i][h];
            bf16_sum = bf16_sum + from_bf16(bf16_rows[i][h]);
          }
          want_weighted[h] = weighted;
          want_sum[h] = sum;
          want_bf16_sum[h] = bf16_sum;
        }
        std::vector<float> got(N, -1.0f);
        k.weighted_sum(row_ptrs.data(), weights.data(), count, n, got.data(), streaming);
        CHECK(same_bits(got.data(), want_weighted.data(), N));
        std::vector<std::uint16_t> got_bf16(N);
        k.weighted_sum_bf16(row_ptrs.data(), weights.data(), count, n, got_bf16.data(), streaming);
        bool bf16_ok = true;
        for (std::size_t h = 0; h < N; ++h)
          bf16_ok = bf16_ok && got_bf16[h] == bf16_by_hand(want_weighted[h]);
        CHECK(bf16_ok);
        k.sum(row_ptrs.data(), count, n, got.data(), streaming);
        k.fence();
        CHECK(same_bits(got.data(), want_sum.data(), N));
        k.sum_bf16(bf16_ptrs.data(), count, n, got.data(), streaming);
        k.fence();
        CHECK(same_bits(got.data(), want_bf16_sum.data(), N));
      }
    }
  }
}
