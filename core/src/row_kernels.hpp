#pragma once
// The row kernels of the host data path and its helpers: private to the core (the host
// data path, the identity experts) and its tests.
#include <cstddef>
#include <cstdint>

#include "switchyard/data_path.hpp"

namespace switchyard {

namespace detail {
/// The row kernels of the host data path. Each is defined by its scalar form: bf16 is
/// `float_to_bf16` / `bf16_to_float` per element; a sum starts at 0.0f and adds the rows
/// in order, each product `weight · element` and each sum rounded to f32 on its own (no
/// fused multiply-add). Every instruction set gives the same bits. `streaming`: the output
/// is large and read later from memory, so its stores may bypass the caches; call `fence`
/// after a pass of streaming calls, before another thread or process reads the output.
struct RowKernels {
  /// out[h] = float_to_bf16(in[h]), h < n.
  void (*encode_bf16)(const float* in, std::int64_t n, std::uint16_t* out, bool streaming);
  /// out[h] = bf16_to_float(in[h]), h < n.
  void (*decode_bf16)(const std::uint16_t* in, std::int64_t n, float* out, bool streaming);
  /// out[h] = Σ_i weights[i] · rows[i][h], i < count.
  void (*weighted_sum)(const float* const* rows, const float* weights, int count, std::int64_t n,
                       float* out, bool streaming);
  /// The same sum, stored as bf16.
  void (*weighted_sum_bf16)(const float* const* rows, const float* weights, int count,
                            std::int64_t n, std::uint16_t* out, bool streaming);
  /// out[h] = Σ_i rows[i][h], i < count.
  void (*sum)(const float* const* rows, int count, std::int64_t n, float* out, bool streaming);
  /// out[h] = Σ_i bf16_to_float(rows[i][h]), i < count.
  void (*sum_bf16)(const std::uint16_t* const* rows, int count, std::int64_t n, float* out,
                   bool streaming);
  /// out[h] = in[h], h < n (the ranges do not overlap).
  void (*copy)(const float* in, std::int64_t n, float* out, bool streaming);
  /// Orders the streaming stores before what follows.
  void (*fence)();
};
/// Passes that write at least this many bytes stream their stores past the caches: what
/// they write is read later, from memory, by another pass or by the transport.
inline constexpr std::size_t kStreamingBytes = std::size_t{16} << 20;
/// out [hidden] f32 = the payload row `in` (payload_row_bytes(dtype, hidden)) decoded, on the
/// calling thread, with the row kernels (`streaming` as they take it).
void decode_payload_row(const std::byte* in, std::int64_t hidden, PayloadDType dtype, float* out,
                        bool streaming);
/// Asks the caches for `bytes` at `at` ahead of their use (a hint; no effect on results).
/// Passes that visit rows by index, in an order the hardware prefetcher does not follow
/// across rows, call it for the next row.
inline void prefetch(const void* at, std::size_t bytes) noexcept {
  const auto* p = static_cast<const char*>(at);
  for (std::size_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(p + offset, 0, 3);
}
/// The instruction sets the row kernels come in.
enum class RowKernelIsa { kPortable, kAvx512 };
/// The fastest row kernels this processor runs.
const RowKernels& row_kernels();
/// The row kernels for `isa` (tests compare them); throws `Error(kUnavailable)` when this
/// processor lacks it.
const RowKernels& row_kernels(RowKernelIsa isa);
}  // namespace detail

}  // namespace switchyard
