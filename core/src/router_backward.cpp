// The router's two GEMMs of the backward on the host: dx += d_logits · gate and
// d_gate += d_logitsᵀ · x. Each output element is one chain of multiply-adds in a fixed
// order (dx: experts ascending; d_gate: tokens ascending), so the bits do not depend on how
// the work is blocked. Register blocks of 4 rows × 16 columns keep their accumulators in
// vector registers; the reused operand is walked in slices that stay in the caches.
#include <algorithm>
#include <cstdint>

#include "switchyard/router_logits.hpp"

namespace switchyard {
namespace {

using Vec8 = float __attribute__((vector_size(32)));

struct GradientArgs {
  const float* x;         // [T,H]
  const float* gate;      // [E,H]
  const float* d_logits;  // [T,E]
  float* dx;              // [T,H]
  float* d_gate;          // [E,H]
  std::int64_t T, E, H;
};

constexpr int kBlockRows = 4;
constexpr std::int64_t kColumns = 16;  // two Vec8 per row of a block
// dx: gate columns per slice (E × 512 floats: 128 KiB for E = 64, in the second-level
// cache while every token block passes over it). d_gate: tokens per slice of x.
constexpr std::int64_t kGateSlice = 512;
constexpr std::int64_t kTokenSlice = 64;

// Loads and stores through memcpy (rows need not be 32-byte aligned); no vector type in a
// signature, whose ABI would depend on the instruction set.
inline __attribute__((always_inline)) void load8(Vec8& v, const float* p) {
  __builtin_memcpy(&v, p, sizeof v);
}
inline __attribute__((always_inline)) void store8(float* p, const Vec8& v) {
  __builtin_memcpy(p, &v, sizeof v);
}

/// out[r, c0..c0+16) += Σ_{k in [k0,k1)} coef(r, k) · in[k, c0..c0+16) for `rows` rows
/// (≤ 4), k ascending. `coef(r, k)` = coefs[r * coef_row + k * coef_col].
inline __attribute__((always_inline)) void block16(const float* coefs, std::int64_t coef_row,
                                                   std::int64_t coef_col, const float* in,
                                                   std::int64_t in_stride, std::int64_t k0,
                                                   std::int64_t k1, float* out,
                                                   std::int64_t out_stride, int rows) {
  Vec8 acc[kBlockRows][2] = {};
  for (int r = 0; r < rows; ++r) {
    load8(acc[r][0], out + r * out_stride);
    load8(acc[r][1], out + r * out_stride + 8);
  }
  for (std::int64_t k = k0; k < k1; ++k) {
    Vec8 lo, hi;
    load8(lo, in + k * in_stride);
    load8(hi, in + k * in_stride + 8);
    for (int r = 0; r < kBlockRows; ++r) {
      if (r >= rows) break;
      const float c = coefs[r * coef_row + k * coef_col];
      acc[r][0] += c * lo;
      acc[r][1] += c * hi;
    }
  }
  for (int r = 0; r < rows; ++r) {
    store8(out + r * out_stride, acc[r][0]);
    store8(out + r * out_stride + 8, acc[r][1]);
  }
}

/// The same for the last H mod 16 columns, one element at a time in the same order.
inline __attribute__((always_inline)) void block_tail(const float* coefs, std::int64_t coef_row,
                                                      std::int64_t coef_col, const float* in,
                                                      std::int64_t in_stride, std::int64_t k0,
                                                      std::int64_t k1, float* out,
                                                      std::int64_t out_stride, int rows,
                                                      std::int64_t columns) {
  for (int r = 0; r < rows; ++r) {
    for (std::int64_t c = 0; c < columns; ++c) {
      float acc = out[r * out_stride + c];
      for (std::int64_t k = k0; k < k1; ++k)
        acc += coefs[r * coef_row + k * coef_col] * in[k * in_stride + c];
      out[r * out_stride + c] = acc;
    }
  }
}

/// out [rows_total, H] += coefs · in [K, H] over k in [k0, k1), in row blocks of 4.
inline __attribute__((always_inline)) void accumulate(const float* coefs, std::int64_t coef_row,
                                                      std::int64_t coef_col, const float* in,
                                                      std::int64_t k0, std::int64_t k1, float* out,
                                                      std::int64_t rows_total, std::int64_t c0,
                                                      std::int64_t c1, std::int64_t H) {
  for (std::int64_t r0 = 0; r0 < rows_total; r0 += kBlockRows) {
    const int rows = static_cast<int>(std::min<std::int64_t>(kBlockRows, rows_total - r0));
    const float* block_coefs = coefs + r0 * coef_row;
    float* block_out = out + r0 * H;
    std::int64_t c = c0;
    for (; c + kColumns <= c1; c += kColumns) {
      block16(block_coefs, coef_row, coef_col, in + c, H, k0, k1, block_out + c, H, rows);
    }
    if (c < c1)
      block_tail(block_coefs, coef_row, coef_col, in + c, H, k0, k1, block_out + c, H, rows,
                 c1 - c);
  }
}

inline __attribute__((always_inline)) void gradients(const GradientArgs& a) {
  // dx [T,H] += d_logits [T,E] · gate [E,H]: rows are tokens, k runs over experts.
  for (std::int64_t c0 = 0; c0 < a.H; c0 += kGateSlice) {
    accumulate(a.d_logits, a.E, 1, a.gate, 0, a.E, a.dx, a.T, c0, std::min(a.H, c0 + kGateSlice),
               a.H);
  }
  // d_gate [E,H] += d_logitsᵀ [E,T] · x [T,H]: rows are experts, k runs over tokens, a
  // slice of tokens at a time (each slice continues every element's chain in order).
  for (std::int64_t t0 = 0; t0 < a.T; t0 += kTokenSlice) {
    accumulate(a.d_logits, 1, a.E, a.x, t0, std::min(a.T, t0 + kTokenSlice), a.d_gate, a.E, 0, a.H,
               a.H);
  }
}

__attribute__((target("avx2,fma"))) void gradients_avx2(const GradientArgs& a) { gradients(a); }
void gradients_portable(const GradientArgs& a) { gradients(a); }

}  // namespace

void accumulate_router_gradients(const TensorView& x, const TensorView& gate, const float* d_logits,
                                 const TensorView& dx, const TensorView& d_gate) {
  const GradientArgs args{x.data_as<const float>(),
                          gate.data_as<const float>(),
                          d_logits,
                          dx.data_as<float>(),
                          d_gate.data_as<float>(),
                          x.dim(0),
                          gate.dim(0),
                          x.dim(1)};
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) {
    gradients_avx2(args);
  } else {
    gradients_portable(args);
  }
}

}  // namespace switchyard
