// Router logits on the host: logits[t, e] = Σ_h x[t, h] · gate[e, h], at the speed of a
// GEMM but with one summation order for every (t, e), whatever the instruction set and
// however the tokens are split over ranks:
//   - 16 lanes: lane l accumulates, with a fused multiply-add, the products of the h with
//     h mod 16 == l, h ascending; the row is padded with zeros to a multiple of 16 (the
//     padding's fma(0, 0, acc) is part of the definition);
//   - the lanes are then summed pairwise: l and l + 8, then + 4, + 2, + 1.
// The AVX-512 kernel keeps a lane per vector element; the AVX2 kernel runs lanes 0-7 and
// 8-15 as two passes; the portable one does the same with std::fma. All three give the
// same bits (fma rounds once everywhere). Blocks of tokens × experts share their loads.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "switchyard/router_logits.hpp"
#include "switchyard/status.hpp"

namespace switchyard {
namespace {

constexpr int kLanes = 16;

/// The fixed pairwise sum of the 16 lanes.
float sum_lanes(const float* lane) {
  float s8[8], s4[4], s2[2];
  for (int i = 0; i < 8; ++i) s8[i] = lane[i] + lane[i + 8];
  for (int i = 0; i < 4; ++i) s4[i] = s8[i] + s8[i + 4];
  for (int i = 0; i < 2; ++i) s2[i] = s4[i] + s4[i + 2];
  return s2[0] + s2[1];
}

struct LogitsArgs {
  const float* x;
  const float* gate;
  std::int64_t T, E, H;
  float* logits;
};

void logits_portable(const LogitsArgs& a) {
  float lane[kLanes];
  for (std::int64_t t = 0; t < a.T; ++t) {
    const float* row = a.x + t * a.H;
    for (std::int64_t e = 0; e < a.E; ++e) {
      const float* w = a.gate + e * a.H;
      std::fill(lane, lane + kLanes, 0.0f);
      for (std::int64_t h0 = 0; h0 < a.H; h0 += kLanes) {
        for (int l = 0; l < kLanes; ++l) {
          const std::int64_t h = h0 + l;
          lane[l] = h < a.H ? std::fma(row[h], w[h], lane[l]) : std::fma(0.0f, 0.0f, lane[l]);
        }
      }
      a.logits[t * a.E + e] = sum_lanes(lane);
    }
  }
}

// Tokens and experts per block: the accumulators stay in registers (the block loops are
// unrolled for that; at -O2 GCC would keep them in memory).
constexpr int kAvx512Tokens = 6, kAvx512Experts = 4;
constexpr int kAvx2Tokens = 3, kAvx2Experts = 4;

/// Rows first .. first+N-1 of a [count, H] matrix. Past the end, a block repeats the last
/// row: computed, never stored.
template <int N>
void block_rows(const float* base, std::int64_t first, std::int64_t count, std::int64_t H,
                const float* (&rows)[N]) {
  for (int i = 0; i < N; ++i) rows[i] = base + std::min(first + i, count - 1) * H;
}

/// Elements of h per pass of the AVX-512 kernel: a token block's slice of x stays in the
/// first-level cache while every expert block passes over it.
constexpr std::int64_t kAvx512Slice = 512;

// Per token block, the kernel walks h in slices; within a slice, every expert block loads
// its 16-lane accumulators from a small array, runs the slice's FMAs, and stores them back.
// Each lane sees the same FMAs in the same order as one pass over all of h, so the bits
// are those of the definition; the slices keep x in the first-level cache instead of
// re-reading a block's rows from the second level for every expert block.
__attribute__((target("avx512f"))) void logits_avx512(const LogitsArgs& a) {
  const std::int64_t full = a.H / kLanes * kLanes;
  const auto tail = static_cast<__mmask16>((1u << (a.H - full)) - 1u);
  // Lanes of a token block against a group of experts (whole expert blocks: the repeated
  // rows of a block past E are computed into their own lanes and never stored).
  constexpr std::int64_t kGroup = 64;
  static_assert(kGroup % kAvx512Experts == 0);
  alignas(64) float lanes[kAvx512Tokens][kGroup][kLanes];
  for (std::int64_t t0 = 0; t0 < a.T; t0 += kAvx512Tokens) {
    const float* rows[kAvx512Tokens];
    block_rows(a.x, t0, a.T, a.H, rows);
    for (std::int64_t g0 = 0; g0 < a.E; g0 += kGroup) {
      const std::int64_t group_end = std::min(a.E, g0 + kGroup);
      std::fill(&lanes[0][0][0], &lanes[0][0][0] + sizeof lanes / sizeof(float), 0.0f);
      for (std::int64_t first = 0; first < a.H; first += kAvx512Slice) {
        const std::int64_t last = std::min(a.H, first + kAvx512Slice);
        for (std::int64_t e0 = g0; e0 < group_end; e0 += kAvx512Experts) {
          const float* ws[kAvx512Experts];
          block_rows(a.gate, e0, a.E, a.H, ws);
          const std::int64_t at = e0 - g0;
          __m512 acc[kAvx512Tokens][kAvx512Experts];
#pragma GCC unroll 16
          for (int i = 0; i < kAvx512Tokens; ++i)
#pragma GCC unroll 16
            for (int j = 0; j < kAvx512Experts; ++j) acc[i][j] = _mm512_load_ps(lanes[i][at + j]);
          // Whole groups of 16, then the last one masked (the zero padding).
          for (std::int64_t h = first; h < last; h += kLanes) {
            const __mmask16 mask = h < full ? static_cast<__mmask16>(0xffff) : tail;
            __m512 xv[kAvx512Tokens];
#pragma GCC unroll 16
            for (int i = 0; i < kAvx512Tokens; ++i)
              xv[i] = _mm512_maskz_loadu_ps(mask, rows[i] + h);
#pragma GCC unroll 16
            for (int j = 0; j < kAvx512Experts; ++j) {
              const __m512 wv = _mm512_maskz_loadu_ps(mask, ws[j] + h);
#pragma GCC unroll 16
              for (int i = 0; i < kAvx512Tokens; ++i) {
                acc[i][j] = _mm512_fmadd_ps(xv[i], wv, acc[i][j]);
              }
            }
          }
#pragma GCC unroll 16
          for (int i = 0; i < kAvx512Tokens; ++i)
#pragma GCC unroll 16
            for (int j = 0; j < kAvx512Experts; ++j) _mm512_store_ps(lanes[i][at + j], acc[i][j]);
        }
      }
      for (int i = 0; i < kAvx512Tokens && t0 + i < a.T; ++i) {
        for (std::int64_t e = g0; e < group_end; ++e) {
          a.logits[(t0 + i) * a.E + e] = sum_lanes(lanes[i][e - g0]);
        }
      }
    }
  }
}

/// Eight elements from h (zeros past H).
__attribute__((target("avx2,fma"))) __m256 load_half(const float* row, std::int64_t h,
                                                     std::int64_t H) {
  if (h + 8 <= H) return _mm256_loadu_ps(row + h);
  alignas(32) float padded[8] = {};
  for (std::int64_t k = h; k < H; ++k) padded[k - h] = row[k];
  return _mm256_load_ps(padded);
}

__attribute__((target("avx2,fma"))) void logits_avx2(const LogitsArgs& a) {
  alignas(32) float lane[kLanes];
  for (std::int64_t t0 = 0; t0 < a.T; t0 += kAvx2Tokens) {
    for (std::int64_t e0 = 0; e0 < a.E; e0 += kAvx2Experts) {
      const float* rows[kAvx2Tokens];
      const float* ws[kAvx2Experts];
      block_rows(a.x, t0, a.T, a.H, rows);
      block_rows(a.gate, e0, a.E, a.H, ws);
      __m256 halves[2][kAvx2Tokens][kAvx2Experts];
#pragma GCC unroll 16
      for (int half = 0; half < 2; ++half) {
        __m256 acc[kAvx2Tokens][kAvx2Experts];
#pragma GCC unroll 16
        for (auto& r : acc)
          for (auto& v : r) v = _mm256_setzero_ps();
        for (std::int64_t group = 0; group < a.H; group += kLanes) {
          const std::int64_t h = group + static_cast<std::int64_t>(half) * 8;
          __m256 xv[kAvx2Tokens];
#pragma GCC unroll 16
          for (int i = 0; i < kAvx2Tokens; ++i) xv[i] = load_half(rows[i], h, a.H);
#pragma GCC unroll 16
          for (int j = 0; j < kAvx2Experts; ++j) {
            const __m256 wv = load_half(ws[j], h, a.H);
#pragma GCC unroll 16
            for (int i = 0; i < kAvx2Tokens; ++i) acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
          }
        }
#pragma GCC unroll 16
        for (int i = 0; i < kAvx2Tokens; ++i)
#pragma GCC unroll 16
          for (int j = 0; j < kAvx2Experts; ++j) halves[half][i][j] = acc[i][j];
      }
      for (int i = 0; i < kAvx2Tokens && t0 + i < a.T; ++i) {
        for (int j = 0; j < kAvx2Experts && e0 + j < a.E; ++j) {
          _mm256_store_ps(lane, halves[0][i][j]);
          _mm256_store_ps(lane + 8, halves[1][i][j]);
          a.logits[(t0 + i) * a.E + e0 + j] = sum_lanes(lane);
        }
      }
    }
  }
}

using LogitsKernel = void (*)(const LogitsArgs&);

LogitsKernel pick_kernel() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return logits_avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return logits_avx2;
  return logits_portable;
}

LogitsArgs logits_args(const TensorView& x, const TensorView& gate, float* logits) {
  return LogitsArgs{x.data_as<const float>(),
                    gate.data_as<const float>(),
                    x.dim(0),
                    gate.dim(0),
                    x.dim(1),
                    logits};
}

}  // namespace

void compute_router_logits(const TensorView& x, const TensorView& gate, float* logits) {
  static const LogitsKernel kernel = pick_kernel();
  const LogitsArgs a = logits_args(x, gate, logits);
  if (a.T == 0 || a.E == 0) return;
  kernel(a);
}

namespace detail {
void compute_router_logits_with(const TensorView& x, const TensorView& gate, float* logits,
                                RouterLogitsIsa isa) {
  const LogitsArgs a = logits_args(x, gate, logits);
  if (a.T == 0 || a.E == 0) return;
  switch (isa) {
    case RouterLogitsIsa::kPortable:
      logits_portable(a);
      return;
    case RouterLogitsIsa::kAvx2:
      if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) break;
      logits_avx2(a);
      return;
    case RouterLogitsIsa::kAvx512:
      if (!__builtin_cpu_supports("avx512f")) break;
      logits_avx512(a);
      return;
  }
  throw Error(ErrorCode::kUnavailable, "router logits: this processor lacks the instructions");
}
}  // namespace detail

}  // namespace switchyard
