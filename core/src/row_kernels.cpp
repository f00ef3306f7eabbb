// Row kernels of the host data path: bf16 encode and decode, weighted sums and sums of
// rows. Each computes exactly what the scalar definition in data_path.hpp says (products
// and sums rounded one at a time, in the rows' order, from 0.0f), so the AVX-512 and the
// portable kernels give the same bits; this file is built with -ffp-contract=off so that
// no compiler fuses a product into a sum behind our back.
#include <immintrin.h>

#include <bit>
#include <cstdint>
#include <cstring>

#include "row_kernels.hpp"
#include "switchyard/data_path.hpp"
#include "switchyard/status.hpp"

namespace switchyard::detail {
namespace {

inline std::uint16_t encode_one(float value) {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    return static_cast<std::uint16_t>((bits >> 16) | 0x0040u);  // quiet NaN
  }
  return static_cast<std::uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

inline float decode_one(std::uint16_t bits) {
  return std::bit_cast<float>(static_cast<std::uint32_t>(bits) << 16);
}

// ---- portable -------------------------------------------------------------------------

void encode_bf16_portable(const float* in, std::int64_t n, std::uint16_t* out, bool /*streaming*/) {
  for (std::int64_t h = 0; h < n; ++h) out[h] = encode_one(in[h]);
}

void decode_bf16_portable(const std::uint16_t* in, std::int64_t n, float* out, bool /*streaming*/) {
  for (std::int64_t h = 0; h < n; ++h) out[h] = decode_one(in[h]);
}

inline float weighted_at(const float* const* rows, const float* weights, int count,
                         std::int64_t h) {
  float sum = 0.0f;
  for (int i = 0; i < count; ++i) sum = sum + weights[i] * rows[i][h];
  return sum;
}

void weighted_sum_portable(const float* const* rows, const float* weights, int count,
                           std::int64_t n, float* out, bool /*streaming*/) {
  for (std::int64_t h = 0; h < n; ++h) out[h] = weighted_at(rows, weights, count, h);
}

void weighted_sum_bf16_portable(const float* const* rows, const float* weights, int count,
                                std::int64_t n, std::uint16_t* out, bool /*streaming*/) {
  for (std::int64_t h = 0; h < n; ++h) out[h] = encode_one(weighted_at(rows, weights, count, h));
}

inline float sum_at(const float* const* rows, int count, std::int64_t h) {
  float sum = 0.0f;
  for (int i = 0; i < count; ++i) sum = sum + rows[i][h];
  return sum;
}

inline float sum_at(const std::uint16_t* const* rows, int count, std::int64_t h) {
  float sum = 0.0f;
  for (int i = 0; i < count; ++i) sum = sum + decode_one(rows[i][h]);
  return sum;
}

void sum_portable(const float* const* rows, int count, std::int64_t n, float* out,
                  bool /*streaming*/) {
  for (std::int64_t h = 0; h < n; ++h) out[h] = sum_at(rows, count, h);
}

void sum_bf16_portable(const std::uint16_t* const* rows, int count, std::int64_t n, float* out,
                       bool /*streaming*/) {
  for (std::int64_t h = 0; h < n; ++h) out[h] = sum_at(rows, count, h);
}

void copy_portable(const float* in, std::int64_t n, float* out, bool /*streaming*/) {
  if (n > 0) std::memcpy(out, in, static_cast<std::size_t>(n) * sizeof(float));
}

void fence_portable() {}

// ---- AVX-512 (F and BW): 16 elements per step, the scalar code for the tail -------------

#define SWITCHYARD_AVX512 __attribute__((target("avx512f,avx512bw")))
// GCC 12 reports its own headers' _mm512_undefined_* operands as maybe-uninitialized.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

SWITCHYARD_AVX512 inline __m256i encode16(__m512 values) {
  const __m512i bits = _mm512_castps_si512(values);
  const __m512i magnitude = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff));
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(magnitude, _mm512_set1_epi32(0x7f800000));
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(
      _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
  const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
  rounded = _mm512_mask_mov_epi32(rounded, nan, quiet);
  return _mm512_cvtepi32_epi16(rounded);
}

/// bf16 bits of a rounded as encode16 does, one in each 32-bit lane.
SWITCHYARD_AVX512 inline __m512i round_bf16_lanes(__m512 values) {
  const __m512i bits = _mm512_castps_si512(values);
  const __m512i high = _mm512_srli_epi32(bits, 16);
  const __m512i magnitude = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff));
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(magnitude, _mm512_set1_epi32(0x7f800000));
  const __m512i odd = _mm512_and_si512(high, _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(
      _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
  return _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(high, _mm512_set1_epi32(0x40)));
}

/// 32 bf16: a's 16 then b's 16. One pack and one permute where two narrowing moves would
/// take four slow operations.
SWITCHYARD_AVX512 inline __m512i encode32(__m512 a, __m512 b) {
  // packus interleaves per 128-bit lane: a0-3 b0-3 a4-7 b4-7 ...; the lanes hold at most
  // 0xffff, so nothing saturates.
  const __m512i packed = _mm512_packus_epi32(round_bf16_lanes(a), round_bf16_lanes(b));
  return _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7), packed);
}

SWITCHYARD_AVX512 inline __m512 decode16(const std::uint16_t* in) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

/// A store of 16 floats (or 16 bf16), streaming past the caches when asked and aligned.
SWITCHYARD_AVX512 inline void store16(float* out, __m512 v, bool streaming) {
  if (streaming && (reinterpret_cast<std::uintptr_t>(out) & 63) == 0) {
    _mm512_stream_ps(out, v);
  } else {
    _mm512_storeu_ps(out, v);
  }
}

SWITCHYARD_AVX512 inline void store16(std::uint16_t* out, __m256i v, bool streaming) {
  if (streaming && (reinterpret_cast<std::uintptr_t>(out) & 31) == 0) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(out), v);
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), v);
  }
}

/// A store of 32 bf16, streaming past the caches when asked and aligned.
SWITCHYARD_AVX512 inline void store32(std::uint16_t* out, __m512i v, bool streaming) {
  if (streaming && (reinterpret_cast<std::uintptr_t>(out) & 63) == 0) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(out), v);
  } else {
    _mm512_storeu_si512(out, v);
  }
}

SWITCHYARD_AVX512 void encode_bf16_avx512(const float* in, std::int64_t n, std::uint16_t* out,
                                          bool streaming) {
  std::int64_t h = 0;
  for (; h + 32 <= n; h += 32) {
    store32(out + h, encode32(_mm512_loadu_ps(in + h), _mm512_loadu_ps(in + h + 16)), streaming);
  }
  for (; h + 16 <= n; h += 16) store16(out + h, encode16(_mm512_loadu_ps(in + h)), streaming);
  for (; h < n; ++h) out[h] = encode_one(in[h]);
}

SWITCHYARD_AVX512 void decode_bf16_avx512(const std::uint16_t* in, std::int64_t n, float* out,
                                          bool streaming) {
  std::int64_t h = 0;
  for (; h + 16 <= n; h += 16) store16(out + h, decode16(in + h), streaming);
  for (; h < n; ++h) out[h] = decode_one(in[h]);
}

SWITCHYARD_AVX512 inline __m512 weighted16(const float* const* rows, const float* weights,
                                           int count, std::int64_t h) {
  __m512 sum = _mm512_setzero_ps();
  for (int i = 0; i < count; ++i) {
    sum =
        _mm512_add_ps(sum, _mm512_mul_ps(_mm512_set1_ps(weights[i]), _mm512_loadu_ps(rows[i] + h)));
  }
  return sum;
}

// The sums below run four blocks of 16 side by side: each block's sum is a chain of
// dependent adds, and four independent chains keep the adder busy (the same operations,
// so the same bits, as one block at a time).

/// The weighted sums of elements h..h+64, as four blocks of 16.
SWITCHYARD_AVX512 inline void weighted64(const float* const* rows, const float* weights, int count,
                                         std::int64_t h, __m512 (&sums)[4]) {
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  for (int i = 0; i < count; ++i) {
    const __m512 w = _mm512_set1_ps(weights[i]);
    const float* row = rows[i] + h;
    s0 = _mm512_add_ps(s0, _mm512_mul_ps(w, _mm512_loadu_ps(row)));
    s1 = _mm512_add_ps(s1, _mm512_mul_ps(w, _mm512_loadu_ps(row + 16)));
    s2 = _mm512_add_ps(s2, _mm512_mul_ps(w, _mm512_loadu_ps(row + 32)));
    s3 = _mm512_add_ps(s3, _mm512_mul_ps(w, _mm512_loadu_ps(row + 48)));
  }
  sums[0] = s0;
  sums[1] = s1;
  sums[2] = s2;
  sums[3] = s3;
}

SWITCHYARD_AVX512 void weighted_sum_avx512(const float* const* rows, const float* weights,
                                           int count, std::int64_t n, float* out, bool streaming) {
  std::int64_t h = 0;
  for (; h + 64 <= n; h += 64) {
    __m512 sums[4];
    weighted64(rows, weights, count, h, sums);
    for (std::int64_t b = 0; b < 4; ++b) store16(out + h + 16 * b, sums[b], streaming);
  }
  for (; h + 16 <= n; h += 16) store16(out + h, weighted16(rows, weights, count, h), streaming);
  for (; h < n; ++h) out[h] = weighted_at(rows, weights, count, h);
}

SWITCHYARD_AVX512 void weighted_sum_bf16_avx512(const float* const* rows, const float* weights,
                                                int count, std::int64_t n, std::uint16_t* out,
                                                bool streaming) {
  std::int64_t h = 0;
  for (; h + 64 <= n; h += 64) {
    __m512 sums[4];
    weighted64(rows, weights, count, h, sums);
    store32(out + h, encode32(sums[0], sums[1]), streaming);
    store32(out + h + 32, encode32(sums[2], sums[3]), streaming);
  }
  for (; h + 16 <= n; h += 16) {
    store16(out + h, encode16(weighted16(rows, weights, count, h)), streaming);
  }
  for (; h < n; ++h) out[h] = encode_one(weighted_at(rows, weights, count, h));
}

/// 16 elements of a row as f32: loaded, or decoded from bf16.
SWITCHYARD_AVX512 inline __m512 load16(const float* in) { return _mm512_loadu_ps(in); }
SWITCHYARD_AVX512 inline __m512 load16(const std::uint16_t* in) { return decode16(in); }

/// out[h] = Σ_i rows[i][h] for f32 or bf16 rows.
template <typename Element>
SWITCHYARD_AVX512 void sum_rows_avx512(const Element* const* rows, int count, std::int64_t n,
                                       float* out, bool streaming) {
  std::int64_t h = 0;
  for (; h + 64 <= n; h += 64) {
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (int i = 0; i < count; ++i) {
      const Element* row = rows[i] + h;
      s0 = _mm512_add_ps(s0, load16(row));
      s1 = _mm512_add_ps(s1, load16(row + 16));
      s2 = _mm512_add_ps(s2, load16(row + 32));
      s3 = _mm512_add_ps(s3, load16(row + 48));
    }
    store16(out + h, s0, streaming);
    store16(out + h + 16, s1, streaming);
    store16(out + h + 32, s2, streaming);
    store16(out + h + 48, s3, streaming);
  }
  for (; h + 16 <= n; h += 16) {
    __m512 sum = _mm512_setzero_ps();
    for (int i = 0; i < count; ++i) sum = _mm512_add_ps(sum, load16(rows[i] + h));
    store16(out + h, sum, streaming);
  }
  for (; h < n; ++h) out[h] = sum_at(rows, count, h);
}

SWITCHYARD_AVX512 void sum_avx512(const float* const* rows, int count, std::int64_t n, float* out,
                                  bool streaming) {
  sum_rows_avx512(rows, count, n, out, streaming);
}

SWITCHYARD_AVX512 void sum_bf16_avx512(const std::uint16_t* const* rows, int count, std::int64_t n,
                                       float* out, bool streaming) {
  sum_rows_avx512(rows, count, n, out, streaming);
}

SWITCHYARD_AVX512 void copy_avx512(const float* in, std::int64_t n, float* out, bool streaming) {
  if (!streaming) {
    copy_portable(in, n, out, false);
    return;
  }
  std::int64_t h = 0;
  for (; h + 16 <= n; h += 16) store16(out + h, _mm512_loadu_ps(in + h), true);
  for (; h < n; ++h) out[h] = in[h];
}

// Streaming stores are weakly ordered: a fence before another thread or process reads.
SWITCHYARD_AVX512 void fence_avx512() { _mm_sfence(); }

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#undef SWITCHYARD_AVX512

const RowKernels kPortable{
    encode_bf16_portable, decode_bf16_portable, weighted_sum_portable, weighted_sum_bf16_portable,
    sum_portable,         sum_bf16_portable,    copy_portable,         fence_portable};
const RowKernels kAvx512{
    encode_bf16_avx512, decode_bf16_avx512, weighted_sum_avx512, weighted_sum_bf16_avx512,
    sum_avx512,         sum_bf16_avx512,    copy_avx512,         fence_avx512};

bool has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
}

}  // namespace

const RowKernels& row_kernels() {
  static const RowKernels& best = has_avx512() ? kAvx512 : kPortable;
  return best;
}

const RowKernels& row_kernels(RowKernelIsa isa) {
  switch (isa) {
    case RowKernelIsa::kPortable:
      return kPortable;
    case RowKernelIsa::kAvx512:
      if (has_avx512()) return kAvx512;
      break;
  }
  throw Error(ErrorCode::kUnavailable, "row kernels: this processor lacks the instructions");
}

}  // namespace switchyard::detail
