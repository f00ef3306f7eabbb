// datapath_cuda: the layer's data-path primitives (data_path.hpp) on one CUDA device, with
// the same results as the host data path: the same rows in the same order, the same
// payload encodings (bf16 round-to-nearest-even; FP8 E4M3 with one f32 scale per 128
// elements, saturating), and sums taken in the same order (slot order in the weighted
// reduce, row order in the unpermute-sum). Router logits use the host's summation order
// (16 fused multiply-add lanes added pairwise), so they are the host's bits.
//
// Every primitive is enqueued on the caller's CUDA stream. The host waits only where it
// must read a result: the per-rank row counts (layout_counts, for the transport's counts)
// and the rows per local expert (count_groups, to size the grouping); both come back
// through pinned memory.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cuda_probe.hpp"
#include "device_routing.cuh"
#include "device_scratch.hpp"
#include "switchyard/data_path.hpp"
#include "switchyard/placement.hpp"
#include "switchyard/plugin.hpp"

namespace switchyard::cuda_path {
namespace {

std::string cuda_text(cudaError_t e) {
  return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw Error(ErrorCode::kSystem, std::string("cuda data path: ") + what + ": " + cuda_text(e));
}

/// Checks the launch of the kernel just enqueued.
void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

constexpr float kFp8Max = 448.0f;
constexpr unsigned long long kNoBadSlot = ~0ull;
constexpr int kFp8Block = static_cast<int>(kFp8BlockSize);

// ---------------------------------------------------------------------------------------
// Streams, events and memory.

class CudaEvent final : public StreamEvent {
 public:
  explicit CudaEvent(int device) : device_(device) {
    check(cudaSetDevice(device_), "selecting the device");
    check(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming), "creating an event");
  }
  ~CudaEvent() override { cudaEventDestroy(event_); }
  bool query() noexcept override { return cudaEventQuery(event_) != cudaErrorNotReady; }
  void synchronize() override { check(cudaEventSynchronize(event_), "waiting for an event"); }
  cudaEvent_t get() const { return event_; }

 private:
  int device_;
  cudaEvent_t event_ = nullptr;
};

class CudaStream final : public Stream {
 public:
  explicit CudaStream(int device) : device_(device) {
    check(cudaSetDevice(device_), "selecting the device");
    check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "creating a stream");
  }
  /// The caller's `stream`, borrowed: left alone on destruction.
  CudaStream(int device, cudaStream_t stream) : device_(device), stream_(stream), owned_(false) {}
  ~CudaStream() override {
    if (!owned_) return;
    cudaStreamSynchronize(stream_);
    cudaStreamDestroy(stream_);
  }
  Device device() const noexcept override { return Device::cuda(device_); }
  void* native_handle() const noexcept override { return stream_; }
  void synchronize() override { check(cudaStreamSynchronize(stream_), "synchronizing the stream"); }
  bool idle() noexcept override { return cudaStreamQuery(stream_) != cudaErrorNotReady; }
  std::unique_ptr<StreamEvent> create_event() override {
    return std::make_unique<CudaEvent>(device_);
  }
  void record(StreamEvent& event) override {
    check(cudaEventRecord(static_cast<CudaEvent&>(event).get(), stream_), "recording an event");
  }
  void wait(StreamEvent& event) override {
    check(cudaStreamWaitEvent(stream_, static_cast<CudaEvent&>(event).get(), 0),
          "ordering the stream after an event");
  }

 private:
  int device_;
  cudaStream_t stream_ = nullptr;
  bool owned_ = true;
};

cudaStream_t native(Stream& stream) { return static_cast<cudaStream_t>(stream.native_handle()); }

class DeviceAllocator final : public Allocator {
 public:
  explicit DeviceAllocator(int device) : device_(device) {}
  Device device() const noexcept override { return Device::cuda(device_); }
  bool host_accessible() const noexcept override { return false; }
  void* allocate(std::size_t bytes) override {
    check(cudaSetDevice(device_), "selecting the device");
    void* p = nullptr;
    check(cudaMalloc(&p, std::max<std::size_t>(bytes, 1)),
          ("allocating " + std::to_string(bytes) + " bytes of device memory").c_str());
    return p;
  }
  void deallocate(void* data, std::size_t /*bytes*/) noexcept override { cudaFree(data); }
  std::string name() const override { return "cuda:" + std::to_string(device_); }

 private:
  int device_;
};

class PinnedAllocator final : public Allocator {
 public:
  Device device() const noexcept override { return Device::host(); }
  bool host_accessible() const noexcept override { return true; }
  void* allocate(std::size_t bytes) override {
    void* p = nullptr;
    check(cudaMallocHost(&p, std::max<std::size_t>(bytes, 1)),
          ("allocating " + std::to_string(bytes) + " bytes of pinned memory").c_str());
    return p;
  }
  void deallocate(void* data, std::size_t /*bytes*/) noexcept override { cudaFreeHost(data); }
  std::string name() const override { return "cuda_pinned"; }
};

template <typename T>
using Scratch = cuda_common::DeviceScratch<T>;

// ---------------------------------------------------------------------------------------
// Kernels.

/// ExpertPlacement's contiguous placement, as data for device code.
struct Placement {
  int num_experts;
  int num_ranks;
  __host__ __device__ int rank_of(int expert) const {
    const int base = num_experts / num_ranks;
    const int extra = num_experts % num_ranks;
    const int boundary = extra * (base + 1);
    if (expert < boundary) return expert / (base + 1);
    return extra + (expert - boundary) / base;
  }
  __host__ __device__ int first_expert(int rank) const {
    const int base = num_experts / num_ranks;
    const int extra = num_experts % num_ranks;
    return rank * base + (rank < extra ? rank : extra);
  }
};

Placement placement_of(const ExpertPlacement& p) { return {p.num_experts(), p.num_ranks()}; }

/// Whether a slot before j of this token goes to rank d already.
__device__ bool earlier_slot_same_rank(const std::int32_t* ex, int j, int d, Placement p) {
  for (int i = 0; i < j; ++i)
    if (ex[i] >= 0 && p.rank_of(ex[i]) == d) return true;
  return false;
}

/// sends[d * T + t] = 1 when token t sends a row to rank d. An expert id outside -1..E-1
/// is recorded in *bad (1 + the first such slot's index) and the token sends nothing.
__global__ void mark_sends(const std::int32_t* experts, std::int64_t T, int K, Placement p,
                           std::int32_t* sends, unsigned long long* bad) {
  const std::int64_t t = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (t >= T) return;
  const std::int32_t* ex = experts + t * K;
  for (int j = 0; j < K; ++j) {
    if (ex[j] < -1 || ex[j] >= p.num_experts) {
      atomicMin(bad, static_cast<unsigned long long>(t * K + j));
      return;
    }
  }
  for (int j = 0; j < K; ++j) {
    if (ex[j] < 0) continue;
    const int d = p.rank_of(ex[j]);
    if (!earlier_slot_same_rank(ex, j, d, p)) sends[d * T + t] = 1;
  }
}

/// rows_to[d] = Σ_t sends[d * T + t], from the exclusive scan of sends.
__global__ void rank_totals(const std::int32_t* sends, const std::int64_t* scanned, std::int64_t T,
                            int R, std::int64_t* rows_to) {
  const int d = blockIdx.x * blockDim.x + threadIdx.x;
  if (d >= R) return;
  const std::int64_t last = static_cast<std::int64_t>(d) * T + T - 1;
  rows_to[d] = T == 0 ? 0 : scanned[last] - scanned[static_cast<std::int64_t>(d) * T] + sends[last];
}

/// slots_to_expert[e] += 1 for every slot naming expert e (valid ids only; the marks
/// check the rest).
__global__ void expert_slot_totals(const std::int32_t* experts, std::int64_t n, int E,
                                   std::int64_t* slots_to_expert) {
  const std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const std::int32_t e = experts[i];
  if (e < 0 || e >= E) return;
  atomicAdd(reinterpret_cast<unsigned long long*>(slots_to_expert + e), 1ULL);
}

/// One thread per token: its send rows (first row of rank d: rows_to_offset[d], or
/// d · block_rows in the worst-case layout, plus the tokens before it that send to d) and
/// their slots in routing order. A token mark_sends found a bad id in sends nothing.
__global__ void write_layout(const std::int32_t* experts, const float* weights, std::int64_t T,
                             int K, Placement p, const std::int32_t* sends,
                             const std::int64_t* scanned, const std::int64_t* rows_to_offset,
                             std::int64_t block_rows, std::int64_t* send_row_token,
                             SlotMeta* send_meta) {
  const std::int64_t t = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (t >= T) return;
  const std::int32_t* ex = experts + t * K;
  const float* w = weights + t * K;
  for (int j = 0; j < K; ++j) {
    if (ex[j] < 0) continue;
    const int d = p.rank_of(ex[j]);
    if (sends[static_cast<std::int64_t>(d) * T + t] == 0) return;  // a bad id elsewhere
    const std::int64_t first = block_rows > 0 ? d * block_rows : rows_to_offset[d];
    const std::int64_t row = first + scanned[static_cast<std::int64_t>(d) * T + t] -
                             scanned[static_cast<std::int64_t>(d) * T];
    SlotMeta* slots = send_meta + row * K;
    if (!earlier_slot_same_rank(ex, j, d, p)) {
      send_row_token[row] = t;
      for (int k = 0; k < K; ++k) slots[k] = {-1, 0.0f};
    }
    int k = 0;
    while (slots[k].local_expert >= 0) ++k;
    slots[k] = {ex[j] - p.first_expert(d), w[j]};
  }
}

/// The worst-case layout's padding: row i of rank d's block of `block_rows` beyond its
/// rows_to[d] rows gets token -1 and empty slots.
__global__ void write_padding(const std::int64_t* rows_to, std::int64_t block_rows, int R, int K,
                              std::int64_t* send_row_token, SlotMeta* send_meta) {
  const std::int64_t s = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (s >= R * block_rows) return;
  if (s % block_rows < rows_to[s / block_rows]) return;
  send_row_token[s] = -1;
  for (int k = 0; k < K; ++k) send_meta[s * K + k] = {-1, 0.0f};
}

/// The worst-case layout's check: the first bad slot mark_sends found, or -1.
__global__ void write_first_bad(const unsigned long long* bad, std::int64_t* first_bad_slot) {
  *first_bad_slot = *bad == kNoBadSlot ? -1 : static_cast<std::int64_t>(*bad);
}

__device__ std::uint16_t to_bf16_bits(float v) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

__device__ float from_bf16_bits(std::uint16_t bits) {
  return __bfloat162float(__ushort_as_bfloat16(bits));
}

/// One block per send row: x[token] into the payload dtype.
__global__ void pack_rows(const float* x, std::int64_t H, const std::int64_t* send_row_token,
                          PayloadDType dtype, std::size_t row_bytes, std::byte* rows) {
  const std::int64_t s = blockIdx.x;
  std::byte* out = rows + static_cast<std::size_t>(s) * row_bytes;
  if (send_row_token[s] < 0) {  // the worst-case layout's padding: zero bytes
    for (std::size_t b = threadIdx.x; b < row_bytes; b += blockDim.x) out[b] = std::byte{0};
    return;
  }
  const float* in = x + send_row_token[s] * H;
  // The padding up to row_bytes is zero, as the host writes it.
  const std::size_t used = dtype == PayloadDType::kF32 ? static_cast<std::size_t>(H) * 4
                           : dtype == PayloadDType::kBF16
                               ? static_cast<std::size_t>(H) * 2
                               : static_cast<std::size_t>((H + kFp8Block - 1) / kFp8Block) * 4 +
                                     static_cast<std::size_t>(H);
  if (used + threadIdx.x < row_bytes) out[used + threadIdx.x] = std::byte{0};
  if (dtype == PayloadDType::kF32) {
    auto* o = reinterpret_cast<float*>(out);
    for (std::int64_t h = threadIdx.x; h < H; h += blockDim.x) o[h] = in[h];
  } else if (dtype == PayloadDType::kBF16) {
    auto* o = reinterpret_cast<std::uint16_t*>(out);
    for (std::int64_t h = threadIdx.x; h < H; h += blockDim.x) o[h] = to_bf16_bits(in[h]);
  } else {
    // One warp per block of 128 elements: amax, scale, codes.
    const std::int64_t blocks = (H + kFp8Block - 1) / kFp8Block;
    auto* scales = reinterpret_cast<float*>(out);
    auto* codes = reinterpret_cast<__nv_fp8_storage_t*>(out + blocks * sizeof(float));
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    for (std::int64_t b = warp; b < blocks; b += warps) {
      const std::int64_t first = b * kFp8Block;
      const std::int64_t last = min(H, first + kFp8Block);
      float amax = 0.0f;
      for (std::int64_t h = first + lane; h < last; h += 32) amax = fmaxf(amax, fabsf(in[h]));
      for (int offset = 16; offset > 0; offset /= 2)
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
      const float scale = amax > 0.0f ? amax / kFp8Max : 1.0f;
      if (lane == 0) scales[b] = scale;
      const float inverse = 1.0f / scale;
      for (std::int64_t h = first + lane; h < last; h += 32)
        codes[h] = __nv_cvt_float_to_fp8(in[h] * inverse, __NV_SATFINITE, __NV_E4M3);
    }
  }
}

// Four elements at a time: f32 and bf16 rows whose hidden size is a multiple of 4 and whose
// buffers are 16-byte aligned move as 16-byte loads (8-byte bf16 stores). Each element gets
// the same conversion and the same sums, in the same order, as in the scalar kernels.

__device__ uint2 to_bf16_x4(float4 v) {
  return make_uint2(to_bf16_bits(v.x) | (static_cast<unsigned>(to_bf16_bits(v.y)) << 16),
                    to_bf16_bits(v.z) | (static_cast<unsigned>(to_bf16_bits(v.w)) << 16));
}

__device__ float4 from_bf16_x4(uint2 b) {
  return make_float4(from_bf16_bits(static_cast<std::uint16_t>(b.x & 0xffffu)),
                     from_bf16_bits(static_cast<std::uint16_t>(b.x >> 16)),
                     from_bf16_bits(static_cast<std::uint16_t>(b.y & 0xffffu)),
                     from_bf16_bits(static_cast<std::uint16_t>(b.y >> 16)));
}

/// Quad q of row r of an f32 or bf16 payload of Q quads a row.
__device__ float4 load_quad(const std::byte* rows, std::int64_t r, std::int64_t Q, std::int64_t q,
                            bool bf16) {
  if (bf16) return from_bf16_x4(__ldg(reinterpret_cast<const uint2*>(rows) + r * Q + q));
  return __ldg(reinterpret_cast<const float4*>(rows) + r * Q + q);
}

__device__ void store_quad(std::byte* rows, std::int64_t r, std::int64_t Q, std::int64_t q,
                           bool bf16, float4 v) {
  if (bf16) {
    reinterpret_cast<uint2*>(rows)[r * Q + q] = to_bf16_x4(v);
  } else {
    reinterpret_cast<float4*>(rows)[r * Q + q] = v;
  }
}

/// a + b elementwise, each rounded once (no contraction).
__device__ float4 add_quad(float4 a, float4 b) {
  return make_float4(__fadd_rn(a.x, b.x), __fadd_rn(a.y, b.y), __fadd_rn(a.z, b.z),
                     __fadd_rn(a.w, b.w));
}

/// a + w·b elementwise, the product and the sum each rounded once.
__device__ float4 add_scaled_quad(float4 a, float w, float4 b) {
  return make_float4(__fadd_rn(a.x, __fmul_rn(w, b.x)), __fadd_rn(a.y, __fmul_rn(w, b.y)),
                     __fadd_rn(a.z, __fmul_rn(w, b.z)), __fadd_rn(a.w, __fmul_rn(w, b.w)));
}

constexpr int kQuadUnroll = 4;
/// Slots a row may have for write_groups_x4 (its slots' expert rows sit in shared memory).
constexpr int kQuadMaxSlots = 64;

/// pack_rows for f32/bf16 payloads by quads: one block per send row, kQuadUnroll loads in
/// flight per thread before their stores.
__global__ void pack_rows_x4(const float* __restrict__ x, std::int64_t Q,
                             const std::int64_t* __restrict__ send_row_token, bool bf16,
                             std::byte* __restrict__ rows) {
  const std::int64_t s = blockIdx.x;
  const std::int64_t stride = blockDim.x;
  if (send_row_token[s] < 0) {  // the worst-case layout's padding: zero bytes
    for (std::int64_t q = threadIdx.x; q < Q; q += stride)
      store_quad(rows, s, Q, q, bf16, make_float4(0.0f, 0.0f, 0.0f, 0.0f));
    return;
  }
  const auto* in = reinterpret_cast<const float4*>(x) + send_row_token[s] * Q;
  for (std::int64_t q0 = threadIdx.x; q0 < Q; q0 += kQuadUnroll * stride) {
    float4 v[kQuadUnroll];
#pragma unroll
    for (int u = 0; u < kQuadUnroll; ++u) {
      const std::int64_t q = q0 + u * stride;
      v[u] = q < Q ? __ldg(in + q) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
#pragma unroll
    for (int u = 0; u < kQuadUnroll; ++u) {
      const std::int64_t q = q0 + u * stride;
      if (q < Q) store_quad(rows, s, Q, q, bf16, v[u]);
    }
  }
}

/// write_groups for f32/bf16 payloads by quads: each quad of the row is read once and
/// written to the expert row of every slot (the slots' expert rows first, into shared
/// memory; K <= kQuadMaxSlots). Expert rows in f32 (`bf16_out` false) or bf16: a bf16
/// payload's bits are copied, an f32 payload's elements rounded to nearest even.
__global__ void write_groups_x4(const std::byte* __restrict__ rows, const SlotMeta* meta,
                                std::int64_t N, int K, std::int64_t Q, bool bf16,
                                const std::int64_t* scanned, const std::int64_t* expert_first,
                                bool bf16_out, std::byte* __restrict__ expert_input,
                                std::int64_t* assignment_of_slot) {
  __shared__ std::int64_t slot_at[kQuadMaxSlots];
  const std::int64_t r = blockIdx.x;
  const std::int64_t NK = N * K;
  for (int j = threadIdx.x; j < K; j += blockDim.x) {
    const std::int64_t i = r * K + j;
    const std::int32_t l = meta[i].local_expert;
    const std::int64_t at = l < 0 ? -1 : expert_first[l] + scanned[l * NK + i] - scanned[l * NK];
    slot_at[j] = at;
    assignment_of_slot[i] = at;
  }
  __syncthreads();
  if (bf16_out) {
    auto* out = reinterpret_cast<uint2*>(expert_input);
    for (std::int64_t q = threadIdx.x; q < Q; q += blockDim.x) {
      const uint2 v = bf16 ? __ldg(reinterpret_cast<const uint2*>(rows) + r * Q + q)
                           : to_bf16_x4(load_quad(rows, r, Q, q, false));
      for (int j = 0; j < K; ++j)
        if (slot_at[j] >= 0) out[slot_at[j] * Q + q] = v;
    }
    return;
  }
  auto* out = reinterpret_cast<float4*>(expert_input);
  for (std::int64_t q = threadIdx.x; q < Q; q += blockDim.x) {
    const float4 v = load_quad(rows, r, Q, q, bf16);
    for (int j = 0; j < K; ++j)
      if (slot_at[j] >= 0) out[slot_at[j] * Q + q] = v;
  }
}

/// reduce_rows by quads.
__global__ void reduce_rows_x4(const std::byte* __restrict__ expert_output, bool bf16_in,
                               const SlotMeta* meta, const std::int64_t* assignment, int K,
                               std::int64_t Q, bool bf16, std::byte* __restrict__ partial_rows) {
  const std::int64_t r = blockIdx.x;
  for (std::int64_t q = threadIdx.x; q < Q; q += blockDim.x) {
    float4 sum = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int j = 0; j < K; ++j) {
      const std::int64_t at = assignment[r * K + j];
      if (at < 0) continue;
      sum =
          add_scaled_quad(sum, meta[r * K + j].weight, load_quad(expert_output, at, Q, q, bf16_in));
    }
    store_quad(partial_rows, r, Q, q, bf16, sum);
  }
}

/// sum_token_rows by quads.
__global__ void sum_token_rows_x4(const std::byte* __restrict__ combined,
                                  const std::int64_t* rows_by_token,
                                  const std::int64_t* token_first, std::int64_t Q, bool bf16,
                                  float* __restrict__ y) {
  const std::int64_t t = blockIdx.x;
  const std::int64_t first = token_first[t], last = token_first[t + 1];
  for (std::int64_t q = threadIdx.x; q < Q; q += blockDim.x) {
    float4 sum = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (std::int64_t i = first; i < last; ++i)
      sum = add_quad(sum, load_quad(combined, rows_by_token[i], Q, q, bf16));
    reinterpret_cast<float4*>(y)[t * Q + q] = sum;
  }
}

/// Whether rows of H elements in these buffers can move by quads.
bool by_quads(std::int64_t H, std::initializer_list<const void*> buffers) {
  if (H % 4 != 0) return false;
  for (const void* b : buffers)
    if (reinterpret_cast<std::uintptr_t>(b) % 16 != 0) return false;
  return true;
}

/// Threads for a block that walks Q quads, each thread `per_thread` of them: a multiple of
/// 32 from 32 to 256.
unsigned threads_for_quads(std::int64_t Q, int per_thread) {
  const std::int64_t wanted = (Q + per_thread - 1) / per_thread;
  return static_cast<unsigned>(std::clamp<std::int64_t>((wanted + 31) / 32 * 32, 32, 256));
}

__device__ float decode_element(const std::byte* row, std::int64_t h, std::int64_t H,
                                PayloadDType dtype) {
  if (dtype == PayloadDType::kF32) return reinterpret_cast<const float*>(row)[h];
  if (dtype == PayloadDType::kBF16)
    return from_bf16_bits(reinterpret_cast<const std::uint16_t*>(row)[h]);
  const std::int64_t blocks = (H + kFp8Block - 1) / kFp8Block;
  const auto* scales = reinterpret_cast<const float*>(row);
  const auto* codes = reinterpret_cast<const __nv_fp8_storage_t*>(row + blocks * sizeof(float));
  const __half_raw half = __nv_cvt_fp8_to_halfraw(codes[h], __NV_E4M3);
  return __half2float(__half(half)) * scales[h / kFp8Block];
}

/// grouped[l * N·K + i] = 1 when slot i goes to local expert l; throws nothing: an
/// out-of-range expert is flagged in *bad.
__global__ void mark_groups(const SlotMeta* meta, std::int64_t NK, int L, std::int32_t* grouped,
                            int* bad) {
  const std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (i >= NK) return;
  const std::int32_t l = meta[i].local_expert;
  if (l < 0) return;
  if (l >= L) {
    atomicMax(bad, l + 1);
    return;
  }
  grouped[l * NK + i] = 1;
}

/// One block per received row: decodes it into every expert row its slots were assigned
/// (stable: the position among the slots of the same expert, in (row, slot) order), in f32
/// or (`bf16_out`) bf16: a bf16 payload's bits copied, other elements rounded.
__global__ void write_groups(const std::byte* rows, const SlotMeta* meta, std::int64_t N, int K,
                             std::int64_t H, PayloadDType dtype, std::size_t row_bytes,
                             const std::int64_t* scanned, const std::int64_t* expert_first,
                             bool bf16_out, std::byte* expert_input,
                             std::int64_t* assignment_of_slot) {
  const std::int64_t r = blockIdx.x;
  const std::int64_t NK = N * K;
  const std::byte* row = rows + static_cast<std::size_t>(r) * row_bytes;
  for (int j = 0; j < K; ++j) {
    const std::int64_t i = r * K + j;
    const std::int32_t l = meta[i].local_expert;
    if (l < 0) {
      if (threadIdx.x == 0) assignment_of_slot[i] = -1;
      continue;
    }
    const std::int64_t at = expert_first[l] + scanned[l * NK + i] - scanned[l * NK];
    if (threadIdx.x == 0) assignment_of_slot[i] = at;
    if (bf16_out) {
      auto* out = reinterpret_cast<std::uint16_t*>(expert_input) + at * H;
      const auto* bits = reinterpret_cast<const std::uint16_t*>(row);
      for (std::int64_t h = threadIdx.x; h < H; h += blockDim.x)
        out[h] =
            dtype == PayloadDType::kBF16 ? bits[h] : to_bf16_bits(decode_element(row, h, H, dtype));
    } else {
      float* out = reinterpret_cast<float*>(expert_input) + at * H;
      for (std::int64_t h = threadIdx.x; h < H; h += blockDim.x)
        out[h] = decode_element(row, h, H, dtype);
    }
  }
}

/// per_expert[l] = Σ_i grouped[l * NK + i], from the scan.
__global__ void group_totals(const std::int32_t* grouped, const std::int64_t* scanned,
                             std::int64_t NK, int L, std::int64_t* per_expert) {
  const int l = blockIdx.x * blockDim.x + threadIdx.x;
  if (l >= L) return;
  const std::int64_t last = static_cast<std::int64_t>(l) * NK + NK - 1;
  per_expert[l] =
      NK == 0 ? 0 : scanned[last] - scanned[static_cast<std::int64_t>(l) * NK] + grouped[last];
}

/// One block per received row: Σ over its slots in order of weight · expert row (expert
/// rows in f32, or in bf16 widened exactly: `bf16_in`).
__global__ void reduce_rows(const std::byte* expert_output, bool bf16_in, const SlotMeta* meta,
                            const std::int64_t* assignment, int K, std::int64_t H, bool bf16,
                            std::byte* partial_rows) {
  const std::int64_t r = blockIdx.x;
  for (std::int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    float sum = 0.0f;
    for (int j = 0; j < K; ++j) {
      const std::int64_t at = assignment[r * K + j];
      if (at < 0) continue;
      const float v =
          bf16_in
              ? from_bf16_bits(reinterpret_cast<const std::uint16_t*>(expert_output)[at * H + h])
              : reinterpret_cast<const float*>(expert_output)[at * H + h];
      // No contraction into FMA: the same rounding as the host's loop.
      sum = __fadd_rn(sum, __fmul_rn(meta[r * K + j].weight, v));
    }
    if (bf16) {
      reinterpret_cast<std::uint16_t*>(partial_rows)[r * H + h] = to_bf16_bits(sum);
    } else {
      reinterpret_cast<float*>(partial_rows)[r * H + h] = sum;
    }
  }
}

/// One block per token: y[t] = Σ of its rows in row order (rows sorted by token, stably).
__global__ void sum_token_rows(const std::byte* combined, const std::int64_t* rows_by_token,
                               const std::int64_t* token_first, std::int64_t H, bool bf16,
                               float* y) {
  const std::int64_t t = blockIdx.x;
  const std::int64_t first = token_first[t], last = token_first[t + 1];
  for (std::int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    float sum = 0.0f;
    for (std::int64_t i = first; i < last; ++i) {
      const std::int64_t s = rows_by_token[i];
      sum = __fadd_rn(
          sum, bf16 ? from_bf16_bits(reinterpret_cast<const std::uint16_t*>(combined)[s * H + h])
                    : reinterpret_cast<const float*>(combined)[s * H + h]);
    }
    y[t * H + h] = sum;
  }
}

/// token_first[t] = first index in the token-sorted rows of token t (T+1 entries).
__global__ void token_bounds(const std::int64_t* sorted_tokens, std::int64_t S, std::int64_t T,
                             std::int64_t* token_first) {
  const std::int64_t t = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (t > T) return;
  // Lower bound of t in the sorted tokens, as unsigned: padding rows (token -1) sort last.
  std::int64_t lo = 0, hi = S;
  while (lo < hi) {
    const std::int64_t mid = (lo + hi) / 2;
    if (static_cast<std::uint64_t>(sorted_tokens[mid]) < static_cast<std::uint64_t>(t)) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  token_first[t] = lo;
}

/// The backward's scaling: scaled[g] = weight · rows[g] for the grouped row g of each
/// (row, slot) (one block each; a grouped row belongs to one slot), rounded as the host's
/// product (no contraction).
__global__ void scale_slot_rows(const SlotMeta* meta, const std::int64_t* assignment_of_slot,
                                std::int64_t H, const float* rows, float* scaled) {
  const std::int64_t i = blockIdx.x;
  const std::int64_t g = assignment_of_slot[i];
  if (g < 0) return;
  const float w = meta[i].weight;
  for (std::int64_t h = threadIdx.x; h < H; h += blockDim.x)
    scaled[g * H + h] = __fmul_rn(w, rows[g * H + h]);
}

/// dots[i] = Σ_h rows[g][h] · outputs[g][h] over h ascending in f32, each product and sum
/// rounded on its own as the host's loop does (one thread per slot: the order is the
/// result); 0 for a slot without a grouped row.
__global__ void slot_dots(const std::int64_t* assignment_of_slot, std::int64_t NK, std::int64_t H,
                          const float* rows, const float* outputs, float* dots) {
  const std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (i >= NK) return;
  const std::int64_t g = assignment_of_slot[i];
  float dot = 0.0f;
  if (g >= 0) {
    const float* r = rows + g * H;
    const float* o = outputs + g * H;
    for (std::int64_t h = 0; h < H; ++h) dot = __fadd_rn(dot, __fmul_rn(r[h], o[h]));
  }
  dots[i] = dot;
}

__global__ void iota(std::int64_t* out, std::int64_t n) {
  const std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) out[i] = i;
}

/// logits[t, e] = Σ_h x[t, h] · gate[e, h] in the host's order (compute_router_logits):
/// 16 lanes, lane l a chain of fused multiply-adds over the h with h mod 16 == l (the row
/// padded with zeros to a multiple of 16), the lanes then added pairwise. The same bits
/// as the host, whatever the tokens computed together. A 16 × 16 tile of outputs per
/// block; the h-tiles of 16 start at multiples of 16, so element k of a tile is lane k.
__global__ void router_logits_kernel(const float* x, const float* gate, std::int64_t T, int E,
                                     std::int64_t H, float* logits) {
  constexpr int kTile = 16;
  __shared__ float xs[kTile][kTile + 1];
  __shared__ float gs[kTile][kTile + 1];
  const std::int64_t t = blockIdx.y * static_cast<std::int64_t>(kTile) + threadIdx.y;
  const int e = blockIdx.x * kTile + threadIdx.x;
  float lane[kTile];
#pragma unroll
  for (int k = 0; k < kTile; ++k) lane[k] = 0.0f;
  for (std::int64_t h0 = 0; h0 < H; h0 += kTile) {
    const std::int64_t hx = h0 + threadIdx.x;
    xs[threadIdx.y][threadIdx.x] = (t < T && hx < H) ? x[t * H + hx] : 0.0f;
    const int eg = blockIdx.x * kTile + threadIdx.y;
    gs[threadIdx.y][threadIdx.x] =
        (eg < E && hx < H) ? gate[static_cast<std::int64_t>(eg) * H + hx] : 0.0f;
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kTile; ++k)
      lane[k] = __fmaf_rn(xs[threadIdx.y][k], gs[threadIdx.x][k], lane[k]);
    __syncthreads();
  }
#pragma unroll
  for (int width = kTile / 2; width >= 1; width /= 2) {
#pragma unroll
    for (int k = 0; k < width; ++k) lane[k] = __fadd_rn(lane[k], lane[k + width]);
  }
  if (t < T && e < E) logits[t * E + e] = lane[0];
}

unsigned blocks_for(std::int64_t n, int threads) {
  return static_cast<unsigned>(std::max<std::int64_t>(1, (n + threads - 1) / threads));
}

// ---------------------------------------------------------------------------------------

class CudaDataPath final : public DataPath {
 public:
  explicit CudaDataPath(int device) : device_(device), allocator_(device) {
    check(cudaSetDevice(device_), "selecting the device");
    upload_done_ = std::make_unique<Event>();  // on this device: after cudaSetDevice
  }
  ~CudaDataPath() override = default;

  Device device() const noexcept override { return Device::cuda(device_); }
  Allocator& allocator() noexcept override { return allocator_; }
  Allocator& staging_allocator() noexcept override { return pinned_; }
  std::unique_ptr<Stream> create_stream(bool /*queued*/) override {
    return std::make_unique<CudaStream>(device_);
  }
  std::unique_ptr<Stream> borrow_stream(void* native_handle) override {
    // The legacy default stream (0) is a stream too: work on it orders as CUDA says.
    return std::make_unique<CudaStream>(device_, static_cast<cudaStream_t>(native_handle));
  }

  void router_logits(const TensorView& x, const TensorView& gate, const TensorView& logits,
                     Stream& stream) override {
    enter();
    const std::int64_t T = x.dim(0), H = x.dim(1);
    const int E = static_cast<int>(gate.dim(0));
    if (T == 0) return;
    const dim3 threads(16, 16);
    const dim3 grid(static_cast<unsigned>((E + 15) / 16), static_cast<unsigned>((T + 15) / 16));
    router_logits_kernel<<<grid, threads, 0, native(stream)>>>(
        x.data_as<const float>(), gate.data_as<const float>(), T, E, H, logits.data_as<float>());
    check_launch("router logits");
  }

  void layout_counts(const LayoutCountsArgs& a, Stream& stream) override {
    enter();
    const cudaStream_t s = native(stream);
    const int R = a.placement->num_ranks();
    mark_and_scan_sends(a.experts, a.num_tokens, a.slots, placement_of(*a.placement), s);
    // [R] rows per rank, then (when asked) [E] slots per expert: read back together.
    const int E = a.slots_to_expert != nullptr ? a.placement->num_experts() : 0;
    std::int64_t* totals = rank_totals_.get(static_cast<std::size_t>(R + E));
    rank_totals<<<blocks_for(R, 128), 128, 0, s>>>(sends_.get(0), scanned_.get(0), a.num_tokens, R,
                                                   totals);
    check_launch("rank totals");
    if (E > 0) {
      check(cudaMemsetAsync(totals + R, 0, static_cast<std::size_t>(E) * sizeof(std::int64_t), s),
            "clearing the expert totals");
      const std::int64_t n = a.num_tokens * a.slots;
      if (n > 0) {
        expert_slot_totals<<<blocks_for(n, 256), 256, 0, s>>>(a.experts, n, E, totals + R);
        check_launch("expert totals");
      }
    }
    unsigned long long bad = 0;
    check(cudaMemcpyAsync(&bad, bad_slot_.get(1), sizeof bad, cudaMemcpyDeviceToHost, s),
          "reading the check");
    host_totals_.resize(static_cast<std::size_t>(R + E));
    read_back(totals, host_totals_.size(), host_totals_.data(), s);
    std::copy_n(host_totals_.begin(), R, a.rows_to);
    if (E > 0) std::copy_n(host_totals_.begin() + R, E, a.slots_to_expert);
    if (bad != kNoBadSlot) {
      std::int32_t expert = 0;
      check(cudaMemcpy(&expert, a.experts + bad, sizeof expert, cudaMemcpyDeviceToHost),
            "reading the bad slot");
      throw Error(ErrorCode::kInvalidArgument,
                  "routing plan: token " +
                      std::to_string(bad / static_cast<unsigned long long>(a.slots)) + " slot " +
                      std::to_string(bad % static_cast<unsigned long long>(a.slots)) +
                      " has expert " + std::to_string(expert) + ", outside 0.." +
                      std::to_string(a.placement->num_experts() - 1));
    }
  }

  void layout(const LayoutArgs& a, Stream& stream) override {
    enter();
    const cudaStream_t s = native(stream);
    const int R = a.placement->num_ranks();
    const Placement p = placement_of(*a.placement);
    mark_and_scan_sends(a.experts, a.num_tokens, a.slots, p, s);
    std::int64_t* offsets = nullptr;
    if (a.block_rows == 0) {
      offsets = upload(a.rows_to_offset.data(), static_cast<std::size_t>(R), rank_offsets_, s);
    }
    if (a.num_tokens > 0) {
      write_layout<<<blocks_for(a.num_tokens, 128), 128, 0, s>>>(
          a.experts, a.weights, a.num_tokens, a.slots, p, sends_.get(0), scanned_.get(0), offsets,
          a.block_rows, a.send_row_token, a.send_meta);
      check_launch("layout");
    }
    if (a.block_rows == 0) return;
    // The worst-case layout: each block's rows beyond its count are padding, and the check
    // stays on the device for the caller to read after the step.
    std::int64_t* rows_to = rank_totals_.get(static_cast<std::size_t>(R));
    rank_totals<<<blocks_for(R, 128), 128, 0, s>>>(sends_.get(0), scanned_.get(0), a.num_tokens, R,
                                                   rows_to);
    check_launch("rank totals");
    const std::int64_t S = R * a.block_rows;
    write_padding<<<blocks_for(S, 128), 128, 0, s>>>(rows_to, a.block_rows, R, a.slots,
                                                     a.send_row_token, a.send_meta);
    check_launch("layout padding");
    write_first_bad<<<1, 1, 0, s>>>(bad_slot_.get(1), a.first_bad_slot);
    check_launch("layout check");
  }

  void pack(const PackArgs& a, Stream& stream) override {
    enter();
    if (a.num_rows == 0) return;
    if (a.dtype != PayloadDType::kFP8 && by_quads(a.hidden, {a.x, a.rows})) {
      const std::int64_t Q = a.hidden / 4;
      pack_rows_x4<<<static_cast<unsigned>(a.num_rows), threads_for_quads(Q, kQuadUnroll), 0,
                     native(stream)>>>(a.x, Q, a.send_row_token, a.dtype == PayloadDType::kBF16,
                                       a.rows);
    } else {
      pack_rows<<<static_cast<unsigned>(a.num_rows), 256, 0, native(stream)>>>(
          a.x, a.hidden, a.send_row_token, a.dtype, payload_row_bytes(a.dtype, a.hidden), a.rows);
    }
    check_launch("pack");
  }

  void count_groups(const GroupCountArgs& a, Stream& stream) override {
    enter();
    const cudaStream_t s = native(stream);
    mark_and_scan_groups(a.meta, a.num_rows * a.slots, a.num_local_experts, s);
    std::int64_t* totals = expert_totals_.get(static_cast<std::size_t>(a.num_local_experts));
    group_totals<<<blocks_for(a.num_local_experts, 128), 128, 0, s>>>(
        grouped_.get(0), group_scanned_.get(0), a.num_rows * a.slots, a.num_local_experts, totals);
    check_launch("group totals");
    read_back(totals, static_cast<std::size_t>(a.num_local_experts), a.rows_per_expert, s);
    int bad = 0;
    check(cudaMemcpyAsync(&bad, bad_.get(1), sizeof bad, cudaMemcpyDeviceToHost, s),
          "reading the check");
    check(cudaStreamSynchronize(s), "count_groups");
    if (bad > 0) {
      throw Error(ErrorCode::kInternal, "MoE dispatch: received a row for local expert " +
                                            std::to_string(bad - 1) + " but this rank holds " +
                                            std::to_string(a.num_local_experts));
    }
  }

  void group_by_expert(const GroupArgs& a, Stream& stream) override {
    enter();
    require_expert_row_dtype(a.expert_input_dtype, "datapath_cuda: group_by_expert: expert rows");
    const cudaStream_t s = native(stream);
    const std::int64_t NK = a.num_rows * a.slots;
    mark_and_scan_groups(a.meta, NK, a.num_local_experts, s);
    // First expert row of each local expert: the host's counts, prefix-summed.
    first_host_.resize(static_cast<std::size_t>(a.num_local_experts));
    std::int64_t first = 0;
    for (int l = 0; l < a.num_local_experts; ++l) {
      first_host_[static_cast<std::size_t>(l)] = first;
      first += a.rows_per_expert[l];
    }
    std::int64_t* expert_first = upload(first_host_.data(), first_host_.size(), expert_first_, s);
    if (a.rows_in_block != nullptr) {
      // Blocks sized for a worst case: the rows each gets, for the kernel to read.
      group_totals<<<blocks_for(a.num_local_experts, 128), 128, 0, s>>>(
          grouped_.get(0), group_scanned_.get(0), NK, a.num_local_experts, a.rows_in_block);
      check_launch("rows in block");
    }
    if (a.num_rows == 0) return;
    const bool bf16_out = a.expert_input_dtype == DType::kBF16;
    // bf16 expert rows by quads are 8 bytes each: 8-byte alignment is enough for them.
    const bool quads = bf16_out ? a.hidden % 4 == 0 &&
                                      reinterpret_cast<std::uintptr_t>(a.expert_input) % 8 == 0 &&
                                      by_quads(a.hidden, {a.rows})
                                : by_quads(a.hidden, {a.rows, a.expert_input});
    if (a.dtype != PayloadDType::kFP8 && a.slots <= kQuadMaxSlots && quads) {
      const std::int64_t Q = a.hidden / 4;
      write_groups_x4<<<static_cast<unsigned>(a.num_rows), threads_for_quads(Q, 1), 0, s>>>(
          a.rows, a.meta, a.num_rows, a.slots, Q, a.dtype == PayloadDType::kBF16,
          group_scanned_.get(0), expert_first, bf16_out, a.expert_input, a.assignment_of_slot);
    } else {
      write_groups<<<static_cast<unsigned>(a.num_rows), 256, 0, s>>>(
          a.rows, a.meta, a.num_rows, a.slots, a.hidden, a.dtype,
          payload_row_bytes(a.dtype, a.hidden), group_scanned_.get(0), expert_first, bf16_out,
          a.expert_input, a.assignment_of_slot);
    }
    check_launch("group by expert");
  }

  void weighted_reduce(const WeightedReduceArgs& a, Stream& stream) override {
    enter();
    if (a.num_rows == 0) return;
    require_expert_row_dtype(a.expert_output_dtype,
                             "datapath_cuda: weighted_reduce: expert outputs");
    const bool bf16 = a.combine_dtype == DType::kBF16;
    const bool bf16_in = a.expert_output_dtype == DType::kBF16;
    if (by_quads(a.hidden, {a.expert_output, a.partial_rows})) {
      const std::int64_t Q = a.hidden / 4;
      reduce_rows_x4<<<static_cast<unsigned>(a.num_rows), threads_for_quads(Q, 1), 0,
                       native(stream)>>>(a.expert_output, bf16_in, a.meta, a.assignment_of_slot,
                                         a.slots, Q, bf16, a.partial_rows);
    } else {
      reduce_rows<<<static_cast<unsigned>(a.num_rows), 256, 0, native(stream)>>>(
          a.expert_output, bf16_in, a.meta, a.assignment_of_slot, a.slots, a.hidden, bf16,
          a.partial_rows);
    }
    check_launch("weighted reduce");
  }

  void scale_grouped_rows(const SlotRowsArgs& a, const float* rows, float* scaled,
                          Stream& stream) override {
    enter();
    const std::int64_t NK = a.num_rows * a.slots;
    if (NK == 0 || a.hidden == 0) return;
    scale_slot_rows<<<static_cast<unsigned>(NK), 256, 0, native(stream)>>>(
        a.meta, a.assignment_of_slot, a.hidden, rows, scaled);
    check_launch("scale grouped rows");
  }

  void slot_dot_products(const SlotRowsArgs& a, const float* rows, const float* outputs,
                         float* dots, Stream& stream) override {
    enter();
    const std::int64_t NK = a.num_rows * a.slots;
    if (NK == 0) return;
    slot_dots<<<blocks_for(NK, 128), 128, 0, native(stream)>>>(a.assignment_of_slot, NK, a.hidden,
                                                               rows, outputs, dots);
    check_launch("slot dot products");
  }

  void unpermute_sum(const UnpermuteSumArgs& a, Stream& stream) override {
    enter();
    const cudaStream_t s = native(stream);
    const std::int64_t S = a.num_rows, T = a.num_tokens;
    if (T == 0) return;
    // The send rows sorted by token, stably (radix sort keeps equal keys in row order).
    std::int64_t* rows = row_ids_.get(static_cast<std::size_t>(S) * 2);
    std::int64_t* sorted_rows = rows + S;
    std::int64_t* sorted_tokens = sorted_tokens_.get(static_cast<std::size_t>(S));
    if (S > 0) {
      iota<<<blocks_for(S, 256), 256, 0, s>>>(rows, S);
      check_launch("iota");
    }
    std::size_t temp_bytes = 0;
    // Keys of T + 1 values: padding rows' -1 has every bit set and sorts after token T-1.
    const int end_bit = bits_for(T + 1);
    check(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, a.send_row_token, sorted_tokens,
                                          rows, sorted_rows, static_cast<int>(S), 0, end_bit, s),
          "sizing the token sort");
    check(cub::DeviceRadixSort::SortPairs(temp_.get(temp_bytes), temp_bytes, a.send_row_token,
                                          sorted_tokens, rows, sorted_rows, static_cast<int>(S), 0,
                                          end_bit, s),
          "sorting rows by token");
    std::int64_t* token_first = token_first_.get(static_cast<std::size_t>(T) + 1);
    token_bounds<<<blocks_for(T + 1, 256), 256, 0, s>>>(sorted_tokens, S, T, token_first);
    check_launch("token bounds");
    const bool bf16 = a.combine_dtype == DType::kBF16;
    if (by_quads(a.hidden, {a.combined_rows, a.y})) {
      const std::int64_t Q = a.hidden / 4;
      sum_token_rows_x4<<<static_cast<unsigned>(T), threads_for_quads(Q, 1), 0, s>>>(
          a.combined_rows, sorted_rows, token_first, Q, bf16, a.y);
    } else {
      sum_token_rows<<<static_cast<unsigned>(T), 256, 0, s>>>(a.combined_rows, sorted_rows,
                                                              token_first, a.hidden, bf16, a.y);
    }
    check_launch("unpermute-sum");
  }

  bool route_token_choice(const TokenChoiceSpec& spec, const TensorView& logits, RoutingPlan& plan,
                          Stream& stream) override {
    const std::int64_t T = logits.dim(0);
    const int E = static_cast<int>(logits.dim(1)), K = spec.top_k;
    const int G = spec.group_begin.empty() ? 0 : static_cast<int>(spec.group_begin.size()) - 1;
    // The kernel's limits: a warp per token, a lane per group, k and group scores in
    // registers. Beyond them the host routes.
    if (E > 1024 || K > 32 || G > 32 || spec.group_take > 32) return false;
    enter();
    const cudaStream_t s = native(stream);
    plan.num_tokens = T;
    plan.slots = K;
    plan.experts.resize(static_cast<std::size_t>(T * K));
    plan.weights.resize(static_cast<std::size_t>(T * K));
    plan.counts.resize(static_cast<std::size_t>(E));
    // Counts and aux counts, then the sums, then the first bad logit, in one block of 8-byte
    // words.
    auto* words = route_words_.get(static_cast<std::size_t>(3 * E + 2));
    check(cudaMemsetAsync(words, 0, static_cast<std::size_t>(3 * E + 1) * 8, s),
          "clearing the statistics");
    check(cudaMemsetAsync(words + 3 * E + 1, 0xff, 8, s), "clearing the check");
    DeviceRouteParams p;
    p.logits = logits.data_as<const float>();
    p.tokens = T;
    p.experts = E;
    p.top_k = K;
    p.sigmoid = spec.sigmoid;
    p.pre_softmax = spec.pre_softmax;
    p.normalize = spec.normalize;
    p.scale = spec.scale;
    if (!spec.bias.empty()) {
      float* bias = route_bias_.get(spec.bias.size());
      check(cudaMemcpyAsync(bias, spec.bias.data(), spec.bias.size_bytes(), cudaMemcpyHostToDevice,
                            s),
            "uploading the bias");
      p.bias = bias;
    }
    if (G > 0) {
      int* begin = route_groups_.get(spec.group_begin.size());
      check(cudaMemcpyAsync(begin, spec.group_begin.data(), spec.group_begin.size_bytes(),
                            cudaMemcpyHostToDevice, s),
            "uploading the groups");
      p.group_begin = begin;
      p.groups = G;
      p.max_groups = spec.max_groups;
      p.group_take = spec.group_take;
    }
    p.plan_experts = plan.experts.data();
    p.plan_weights = plan.weights.data();
    p.counts = words;
    p.aux_counts = words + E;
    p.probability_sums = reinterpret_cast<double*>(words + 2 * E);
    p.z_loss_sum = reinterpret_cast<double*>(words + 3 * E);
    p.first_bad = words + 3 * E + 1;
    if (T > 0) {
      const auto blocks = static_cast<unsigned>((T + kRouteWarps - 1) / kRouteWarps);
      route_token_choice_kernel<<<blocks, 32 * kRouteWarps, route_shared_bytes(E), s>>>(p);
      check_launch("routing");
    }
    // The plan's counts are the kept counts (same bits: 8-byte counters).
    check(cudaMemcpyAsync(plan.counts.data(), words, static_cast<std::size_t>(E) * 8,
                          cudaMemcpyDeviceToDevice, s),
          "the plan's counts");
    // The statistics and the check come back with the stream's next wait (the caller's,
    // for the counts): into pinned memory, read by finish_route_token_choice.
    route_host_.resize(static_cast<std::size_t>(3 * E + 2));
    check(cudaMemcpyAsync(route_host_.data(), words, static_cast<std::size_t>(3 * E + 2) * 8,
                          cudaMemcpyDeviceToHost, s),
          "reading the statistics");
    pending_route_ = PendingRoute{std::string(spec.policy), logits.data_as<const float>(), T, E, K};
    return true;
  }

  void finish_route_token_choice(RouterStats& stats) override {
    if (!pending_route_) {
      throw Error(ErrorCode::kInternal, "finish_route_token_choice: no routing is pending");
    }
    const PendingRoute r = *pending_route_;
    pending_route_.reset();
    enter();
    const auto* words = reinterpret_cast<const std::uint64_t*>(route_host_.data());
    const std::int64_t E = r.experts;
    const std::uint64_t first_bad = words[3 * E + 1];
    if (first_bad != kNoBadSlot) {
      float value = 0;
      check(cudaMemcpy(&value, r.logits + first_bad, sizeof value, cudaMemcpyDeviceToHost),
            "reading the bad logit");
      throw Error(ErrorCode::kInvalidArgument,
                  "router " + r.policy + ": logit of token " +
                      std::to_string(first_bad / static_cast<std::uint64_t>(E)) + ", expert " +
                      std::to_string(first_bad % static_cast<std::uint64_t>(E)) + " is " +
                      (std::isnan(value) ? "NaN" : "infinite") +
                      " (router.nan_policy = \"mask\" skips such experts instead)");
    }
    stats.top_k = r.top_k;
    stats.tokens = r.tokens;
    stats.dropped = 0;
    stats.counts.assign(words, words + E);
    stats.aux_counts.assign(words + E, words + 2 * E);
    stats.probability_sums.resize(static_cast<std::size_t>(E));
    std::memcpy(stats.probability_sums.data(), words + 2 * E, static_cast<std::size_t>(E) * 8);
    std::memcpy(&stats.z_loss_sum, words + 3 * E, 8);
  }

  void copy(void* dst, const void* src, std::size_t bytes, Stream& stream) override {
    enter();
    if (bytes == 0) return;
    check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, native(stream)), "copy");
  }

 private:
  void enter() { check(cudaSetDevice(device_), "selecting the device"); }

  static int bits_for(std::int64_t values) {
    int bits = 1;
    while (bits < 63 && (std::int64_t{1} << bits) < values) ++bits;
    return bits;
  }

  /// sends_ [R, T] marks and scanned_ their exclusive scan (in one pass over R·T).
  void mark_and_scan_sends(const std::int32_t* experts, std::int64_t T, int K, Placement p,
                           cudaStream_t s) {
    const std::size_t n = static_cast<std::size_t>(p.num_ranks) * static_cast<std::size_t>(T);
    std::int32_t* sends = sends_.get(n);
    check(cudaMemsetAsync(sends, 0, n * sizeof(std::int32_t), s), "clearing the send marks");
    unsigned long long* bad = bad_slot_.get(1);
    check(cudaMemsetAsync(bad, 0xff, sizeof *bad, s), "clearing the check");
    if (T > 0) {
      mark_sends<<<blocks_for(T, 128), 128, 0, s>>>(experts, T, K, p, sends, bad);
      check_launch("mark sends");
    }
    exclusive_scan(sends, scanned_.get(n), n, s);
  }

  /// grouped_ [L, N·K] marks and group_scanned_ their exclusive scan.
  void mark_and_scan_groups(const SlotMeta* meta, std::int64_t NK, int L, cudaStream_t s) {
    const std::size_t n = static_cast<std::size_t>(L) * static_cast<std::size_t>(NK);
    std::int32_t* grouped = grouped_.get(n);
    check(cudaMemsetAsync(grouped, 0, n * sizeof(std::int32_t), s), "clearing the group marks");
    int* bad = bad_.get(1);
    check(cudaMemsetAsync(bad, 0, sizeof(int), s), "clearing the check");
    if (NK > 0) {
      mark_groups<<<blocks_for(NK, 256), 256, 0, s>>>(meta, NK, L, grouped, bad);
      check_launch("mark groups");
    }
    exclusive_scan(grouped, group_scanned_.get(n), n, s);
  }

  void exclusive_scan(const std::int32_t* in, std::int64_t* out, std::size_t n, cudaStream_t s) {
    if (n == 0) return;
    std::size_t temp_bytes = 0;
    check(cub::DeviceScan::ExclusiveSum(nullptr, temp_bytes, in, out, static_cast<std::int64_t>(n),
                                        s),
          "sizing a scan");
    check(cub::DeviceScan::ExclusiveSum(temp_.get(temp_bytes), temp_bytes, in, out,
                                        static_cast<std::int64_t>(n), s),
          "scanning");
  }

  /// Copies `count` device values to the host array `out` through pinned memory and waits
  /// (the host needs them now: these are the data path's only synchronisations).
  void read_back(const std::int64_t* device_values, std::size_t count, std::int64_t* out,
                 cudaStream_t s) {
    pinned_counts_.resize(count);
    check(cudaMemcpyAsync(pinned_counts_.data(), device_values, count * sizeof(std::int64_t),
                          cudaMemcpyDeviceToHost, s),
          "reading counts back");
    check(cudaStreamSynchronize(s), "waiting for the counts");
    std::copy(pinned_counts_.begin(), pinned_counts_.end(), out);
  }

  /// Copies `count` host values into `to` (grown to them) through pinned memory, on the
  /// stream; returns where they are.
  std::int64_t* upload(const std::int64_t* host_values, std::size_t count,
                       Scratch<std::int64_t>& to, cudaStream_t s) {
    std::int64_t* device_values = to.get(count);
    // The values `to` got last time again (the worst-case mode's fixed blocks, every step):
    // already there, nothing to wait for. (A grown scratch has a count it never had.)
    if (&to == last_upload_to_ && device_values == last_upload_at_ &&
        std::equal(host_values, host_values + count, last_upload_.begin(), last_upload_.end())) {
      return device_values;
    }
    last_upload_to_ = &to;
    last_upload_at_ = device_values;
    last_upload_.assign(host_values, host_values + count);
    // The pinned copy must stay untouched until the transfer ran: wait for the previous one.
    if (upload_pending_) check(cudaEventSynchronize(upload_done_->get()), "waiting for an upload");
    pinned_upload_.resize(count);
    std::copy(host_values, host_values + count, pinned_upload_.begin());
    check(cudaMemcpyAsync(device_values, pinned_upload_.data(), count * sizeof(std::int64_t),
                          cudaMemcpyHostToDevice, s),
          "uploading offsets");
    check(cudaEventRecord(upload_done_->get(), s), "recording an upload");
    upload_pending_ = true;
    return device_values;
  }

  /// A pinned host vector of int64 (grows, never shrinks).
  class PinnedVector {
   public:
    ~PinnedVector() { cudaFreeHost(data_); }
    void resize(std::size_t n) {
      if (n > capacity_) {
        cudaFreeHost(data_);
        data_ = nullptr;
        check(cudaMallocHost(reinterpret_cast<void**>(&data_),
                             std::max<std::size_t>(n, 1) * sizeof(std::int64_t)),
              "allocating pinned memory");
        capacity_ = n;
      }
      size_ = n;
    }
    std::int64_t* data() { return data_; }
    std::int64_t* begin() { return data_; }
    std::int64_t* end() { return data_ + size_; }

   private:
    std::int64_t* data_ = nullptr;
    std::size_t capacity_ = 0, size_ = 0;
  };

  class Event {
   public:
    Event() {
      check(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming), "creating an event");
    }
    ~Event() { cudaEventDestroy(event_); }
    cudaEvent_t get() const { return event_; }

   private:
    cudaEvent_t event_ = nullptr;
  };

  int device_;
  DeviceAllocator allocator_;
  PinnedAllocator pinned_;
  Scratch<std::int32_t> sends_, grouped_;
  Scratch<std::int64_t> scanned_, group_scanned_, rank_totals_, rank_offsets_, expert_totals_,
      expert_first_, row_ids_, sorted_tokens_, token_first_;
  Scratch<int> bad_;
  std::vector<std::int64_t> host_totals_;    // layout_counts' rows per rank and slots per expert
  Scratch<unsigned long long> bad_slot_;     // first slot with an invalid expert, or all ones
  Scratch<unsigned long long> route_words_;  // routing statistics and check
  Scratch<float> route_bias_;
  Scratch<int> route_groups_;
  PinnedVector route_host_;  // the statistics' words and the first bad logit, [3E + 2]
  /// What finish_route_token_choice needs of the routing queued last.
  struct PendingRoute {
    std::string policy;
    const float* logits = nullptr;
    std::int64_t tokens = 0;
    int experts = 0, top_k = 0;
  };
  std::optional<PendingRoute> pending_route_;
  Scratch<std::byte> temp_;
  PinnedVector pinned_counts_, pinned_upload_;
  std::unique_ptr<Event> upload_done_;
  bool upload_pending_ = false;
  // What `upload` copied last, and where: skipped when asked again.
  const Scratch<std::int64_t>* last_upload_to_ = nullptr;
  const std::int64_t* last_upload_at_ = nullptr;
  std::vector<std::int64_t> last_upload_;
  std::vector<std::int64_t> first_host_;
};

std::unique_ptr<DataPath> create(const DataPathCreateArgs& args) {
  cuda_common::cuda_probe().throw_if_error();
  int devices = 0;
  check(cudaGetDeviceCount(&devices), "counting devices");
  return std::make_unique<CudaDataPath>(args.local_rank % devices);
}

}  // namespace
}  // namespace switchyard::cuda_path

SWITCHYARD_DATA_PATH_PLUGIN("cuda", "0.1.0",
                            "the layer's data path on a CUDA device (layout, permute with bf16/fp8 "
                            "payloads, reduce, unpermute-sum)",
                            nullptr, ::switchyard::cuda_common::cuda_probe,
                            ::switchyard::cuda_path::create)
