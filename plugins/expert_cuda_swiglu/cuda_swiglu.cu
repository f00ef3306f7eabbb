// expert_cuda_swiglu: SwiGLU experts, y = down(silu(gate·x) ⊙ up·x), on a CUDA device
// through cuBLAS with float32 accumulation. BF16 checkpoints stay BF16 on the device
// (tensor cores): the kernel takes BF16 rows (the layer groups them so: input_dtype), or
// rounds f32 rows to BF16; gate and up run as one GEMM per expert against their stacked
// weights [2F,H] and write BF16 projections, one kernel fuses silu(g)·u in f32 and rounds
// it to BF16, and the down GEMM writes f32 rows. F32 weights (and F16, widened exactly to
// F32 when uploaded) run the same sequence in F32 without tensor cores.
// Stream-ordered: the work starts after what the caller's stream holds and the caller's
// stream waits for all of it. In between, the experts run on kExpertLanes streams of their
// own (expert e on lane e mod kExpertLanes), so that the GEMMs of small experts, each too
// small to fill the device, overlap. The weights are copied to the device once, when the
// kernel is created.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "cuda_probe.hpp"
#include "device_scratch.hpp"
#include "switchyard/bootstrap.hpp"
#include "switchyard/plugin.hpp"

namespace switchyard::cuda_swiglu {
namespace {

void check(cudaError_t e, const std::string& what) {
  if (e != cudaSuccess) {
    throw Error(ErrorCode::kSystem,
                "cuda_swiglu: " + what + ": " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
  }
}

void check(cublasStatus_t s, const std::string& what) {
  if (s != CUBLAS_STATUS_SUCCESS) {
    throw Error(ErrorCode::kSystem, "cuda_swiglu: " + what + ": " + cublasGetStatusName(s) + " (" +
                                        cublasGetStatusString(s) + ")");
  }
}

__device__ float silu_times(float g, float u) { return g / (1.0f + expf(-g)) * u; }

__device__ float to_float(float v) { return v; }
__device__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

/// Four elements from a quad of f32 or bf16 (read-only cache).
__device__ float4 load_quad(const float4* p) { return __ldg(p); }
__device__ float4 load_quad(const uint2* p) {
  const uint2 b = __ldg(p);
  return make_float4(__uint_as_float(b.x << 16), __uint_as_float(b.x & 0xffff0000u),
                     __uint_as_float(b.y << 16), __uint_as_float(b.y & 0xffff0000u));
}

/// act[i, f] = silu(g) · u with g = h[i, f], u = h[i, F + f] (h = [n, 2F], the projections'
/// type: f32, or bf16 with bf16 weights), in the activation type (bf16 or f32).
template <typename Projection, typename Act>
__global__ void silu_times_up(const Projection* h, std::int64_t n, std::int64_t F, Act* act) {
  const std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n * F) return;
  const std::int64_t row = i / F, f = i % F;
  const float v = silu_times(to_float(h[row * 2 * F + f]), to_float(h[row * 2 * F + F + f]));
  if constexpr (sizeof(Act) == 2) {
    act[i] = __float2bfloat16_rn(v);
  } else {
    act[i] = v;
  }
}

/// silu_times_up four elements at a time (F a multiple of 4, buffers 16-byte aligned): Quad
/// is float4 for f32 projections, uint2 for bf16 ones.
template <typename Quad, typename Act>
__global__ void silu_times_up_x4(const Quad* __restrict__ h, std::int64_t n, std::int64_t F4,
                                 Act* __restrict__ act) {
  const std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n * F4) return;
  const std::int64_t row = i / F4, f = i % F4;
  const float4 g = load_quad(h + row * 2 * F4 + f), u = load_quad(h + row * 2 * F4 + F4 + f);
  const float4 v = make_float4(silu_times(g.x, u.x), silu_times(g.y, u.y), silu_times(g.z, u.z),
                               silu_times(g.w, u.w));
  if constexpr (sizeof(Act) == 2) {
    auto* out = reinterpret_cast<__nv_bfloat162*>(act) + 2 * i;
    out[0] = __halves2bfloat162(__float2bfloat16_rn(v.x), __float2bfloat16_rn(v.y));
    out[1] = __halves2bfloat162(__float2bfloat16_rn(v.z), __float2bfloat16_rn(v.w));
  } else {
    reinterpret_cast<float4*>(act)[i] = v;
  }
}

__global__ void to_bf16(const float* in, std::int64_t n, __nv_bfloat16* out) {
  const std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) out[i] = __float2bfloat16_rn(in[i]);
}

/// to_bf16 four elements at a time (n4 quads, buffers 16-byte aligned).
__global__ void to_bf16_x4(const float4* __restrict__ in, std::int64_t n4,
                           __nv_bfloat162* __restrict__ out) {
  const std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n4) return;
  const float4 v = __ldg(in + i);
  out[2 * i] = __halves2bfloat162(__float2bfloat16_rn(v.x), __float2bfloat16_rn(v.y));
  out[2 * i + 1] = __halves2bfloat162(__float2bfloat16_rn(v.z), __float2bfloat16_rn(v.w));
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

unsigned blocks_for(std::int64_t n, int threads) {
  return static_cast<unsigned>(std::max<std::int64_t>(1, (n + threads - 1) / threads));
}

/// Host f16 bits to f32 (exact).
float f16_to_f32(std::uint16_t bits) {
  const std::uint32_t sign = (bits & 0x8000u) << 16;
  std::uint32_t exponent = (bits >> 10) & 0x1fu;
  std::uint32_t mantissa = bits & 0x3ffu;
  std::uint32_t out = 0;
  if (exponent == 0x1f) {
    out = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    out = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa != 0) {
    // Subnormal: normalise.
    exponent = 113;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    out = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
  } else {
    out = sign;
  }
  float f;
  std::memcpy(&f, &out, sizeof f);
  return f;
}

class CudaSwigluKernel final : public ExpertKernel {
 public:
  explicit CudaSwigluKernel(const ExpertCreateArgs& args)
      : hidden_(args.hidden), ffn_hidden_(args.ffn_hidden) {
    int devices = 0;
    check(cudaGetDeviceCount(&devices), "counting devices");
    const auto info = LaunchInfo::from_environment();
    device_ = (info ? info->local_rank : 0) % devices;
    check(cudaSetDevice(device_), "selecting device " + std::to_string(device_));
    for (Lane& lane : lanes_) {
      check(cudaStreamCreateWithFlags(&lane.stream, cudaStreamNonBlocking), "creating a stream");
      check(cudaEventCreateWithFlags(&lane.done, cudaEventDisableTiming), "creating an event");
      check(cublasCreate(&lane.cublas), "creating a cuBLAS handle");
      check(cublasSetStream(lane.cublas, lane.stream), "setting the stream");
    }
    check(cudaEventCreateWithFlags(&rows_ready_, cudaEventDisableTiming), "creating an event");
    bf16_ = !args.experts.empty() && args.experts[0].gate.dtype() == DType::kBF16;
    const std::int64_t H = hidden_, F = ffn_hidden_;
    const std::size_t element = bf16_ ? 2 : 4;
    for (std::size_t e = 0; e < args.experts.size(); ++e) {
      const SwigluExpertWeights& w = args.experts[e];
      const std::string which = "cuda_swiglu local expert " + std::to_string(e);
      require_weight(w.gate, which + " gate", F, H);
      require_weight(w.up, which + " up", F, H);
      require_weight(w.down, which + " down", H, F);
      Weights d;
      check(cudaMalloc(&d.gate_up, static_cast<std::size_t>(2 * F * H) * element),
            "allocating weights");
      check(cudaMalloc(&d.down, static_cast<std::size_t>(H * F) * element), "allocating weights");
      upload(w.gate, d.gate_up);
      upload(w.up, static_cast<std::byte*>(d.gate_up) + static_cast<std::size_t>(F * H) * element);
      upload(w.down, d.down);
      weights_.push_back(d);
    }
  }
  ~CudaSwigluKernel() override {
    cudaSetDevice(device_);
    for (Lane& lane : lanes_) {
      if (lane.stream != nullptr) cudaStreamSynchronize(lane.stream);
      if (lane.cublas != nullptr) cublasDestroy(lane.cublas);
      if (lane.done != nullptr) cudaEventDestroy(lane.done);
      if (lane.stream != nullptr) cudaStreamDestroy(lane.stream);
    }
    if (rows_ready_ != nullptr) cudaEventDestroy(rows_ready_);
    for (const Weights& d : weights_) {
      cudaFree(d.gate_up);
      cudaFree(d.down);
    }
  }

  std::string name() const override { return "cuda_swiglu"; }
  int num_local_experts() const noexcept override { return static_cast<int>(weights_.size()); }
  ExecutionCapabilities capabilities() const noexcept override {
    ExecutionCapabilities c;
    c.host_memory = false;
    c.device_memory = true;
    c.stream_ordered = true;
    return c;
  }
  /// BF16 weights take BF16 rows (the GEMMs round f32 rows to BF16 anyway).
  DType input_dtype() const noexcept override { return bf16_ ? DType::kBF16 : DType::kF32; }

  void forward(const ExpertBatch& batch, Stream& stream) override {
    const std::int64_t H = hidden_, F = ffn_hidden_;
    check_expert_batch(batch, H, weights_.size(), Device::cuda(device_), names_, input_dtype());
    const std::int64_t N = batch.input.dim(0);
    if (N == 0) return;
    check(cudaSetDevice(device_), "selecting the device");
    const auto s = static_cast<cudaStream_t>(stream.native_handle());
    const bool bf16_rows = batch.input.dtype() == DType::kBF16;
    const auto* x = static_cast<const std::byte*>(batch.input.data());
    const std::size_t x_element = bf16_rows ? 2 : 4;
    float* y = batch.output.data_as<float>();
    const std::size_t element = bf16_ ? 2 : 4;
    // BF16 weights take BF16 rows: f32 rows are converted per expert on its lane, so that
    // the conversion overlaps other lanes' GEMMs.
    __nv_bfloat16* converted =
        bf16_ && !bf16_rows
            ? reinterpret_cast<__nv_bfloat16*>(rows_.get(static_cast<std::size_t>(N * H) * 2))
            : nullptr;
    // Each lane's scratch holds its largest expert batch.
    std::array<std::int64_t, kExpertLanes> lane_rows{};
    for (std::size_t e = 0; e < weights_.size(); ++e) {
      std::int64_t& most = lane_rows[e % kExpertLanes];
      most = std::max(most, batch.rows_per_expert[e]);
    }
    // Fork: every lane used starts after the caller's stream.
    check(cudaEventRecord(rows_ready_, s), "recording an event");
    for (int l = 0; l < kExpertLanes; ++l) {
      if (lane_rows[static_cast<std::size_t>(l)] == 0) continue;
      check(cudaStreamWaitEvent(lanes_[static_cast<std::size_t>(l)].stream, rows_ready_),
            "ordering the expert streams");
    }
    const cudaDataType_t type = bf16_ ? CUDA_R_16BF : CUDA_R_32F;
    const float one = 1.0f, zero = 0.0f;
    std::int64_t row = 0;
    for (std::size_t e = 0; e < weights_.size(); ++e) {
      const std::int64_t n = batch.rows_per_expert[e];
      if (n == 0) continue;
      Lane& lane = lanes_[e % kExpertLanes];
      const std::int64_t most = lane_rows[e % kExpertLanes];
      // The projections in the weights' type: bf16 halves what silu·up reads back.
      void* projected = lane.projected.get(static_cast<std::size_t>(most * 2 * F) * element);
      void* act = lane.act.get(static_cast<std::size_t>(most * F) * element);
      const void* xe = x + static_cast<std::size_t>(row * H) * x_element;
      if (converted != nullptr) {
        to_bf16_into(reinterpret_cast<const float*>(x) + row * H, n * H, converted + row * H,
                     lane.stream);
        xe = converted + row * H;
      }
      // Row-major [n,2F] = x [n,H] · [gate; up]ᵀ, as column-major [2F,n] = Wᵀ(col) · x(col).
      check(cublasGemmEx(lane.cublas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(2 * F),
                         static_cast<int>(n), static_cast<int>(H), &one, weights_[e].gate_up, type,
                         static_cast<int>(H), xe, type, static_cast<int>(H), &zero, projected, type,
                         static_cast<int>(2 * F), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
            "gate and up GEMM of local expert " + std::to_string(e));
      silu_times_up_into(projected, n, F, act, lane.stream);
      // Row-major [n,H] = act [n,F] · downᵀ.
      check(cublasGemmEx(lane.cublas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(H),
                         static_cast<int>(n), static_cast<int>(F), &one, weights_[e].down, type,
                         static_cast<int>(F), act, type, static_cast<int>(F), &zero, y + row * H,
                         CUDA_R_32F, static_cast<int>(H), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
            "down GEMM of local expert " + std::to_string(e));
      row += n;
    }
    // Join: the caller's stream waits for every lane used.
    for (int l = 0; l < kExpertLanes; ++l) {
      if (lane_rows[static_cast<std::size_t>(l)] == 0) continue;
      Lane& lane = lanes_[static_cast<std::size_t>(l)];
      check(cudaEventRecord(lane.done, lane.stream), "recording an event");
      check(cudaStreamWaitEvent(s, lane.done), "joining the expert streams");
    }
  }

 private:
  struct Weights {
    void* gate_up = nullptr;  // [2F,H]: gate rows, then up rows
    void* down = nullptr;     // [H,F]
  };

  /// out = in rounded to bf16, `count` elements, on `stream`.
  static void to_bf16_into(const float* in, std::int64_t count, __nv_bfloat16* out,
                           cudaStream_t stream) {
    if (count % 4 == 0 && aligned16(in) && aligned16(out)) {
      to_bf16_x4<<<blocks_for(count / 4, 256), 256, 0, stream>>>(
          reinterpret_cast<const float4*>(in), count / 4, reinterpret_cast<__nv_bfloat162*>(out));
    } else {
      to_bf16<<<blocks_for(count, 256), 256, 0, stream>>>(in, count, out);
    }
    check(cudaGetLastError(), "converting the rows to bf16");
  }

  /// act = silu(gate) · up of n projected rows (bf16 with bf16 weights, else f32), on
  /// `stream`.
  void silu_times_up_into(const void* projected, std::int64_t n, std::int64_t F, void* act,
                          cudaStream_t stream) const {
    const unsigned threads = 256;
    if (F % 4 == 0 && aligned16(projected) && aligned16(act)) {
      const unsigned blocks = blocks_for(n * F / 4, static_cast<int>(threads));
      if (bf16_) {
        silu_times_up_x4<<<blocks, threads, 0, stream>>>(static_cast<const uint2*>(projected), n,
                                                         F / 4, static_cast<__nv_bfloat16*>(act));
      } else {
        silu_times_up_x4<<<blocks, threads, 0, stream>>>(static_cast<const float4*>(projected), n,
                                                         F / 4, static_cast<float*>(act));
      }
    } else {
      const unsigned blocks = blocks_for(n * F, static_cast<int>(threads));
      if (bf16_) {
        silu_times_up<<<blocks, threads, 0, stream>>>(static_cast<const __nv_bfloat16*>(projected),
                                                      n, F, static_cast<__nv_bfloat16*>(act));
      } else {
        silu_times_up<<<blocks, threads, 0, stream>>>(static_cast<const float*>(projected), n, F,
                                                      static_cast<float*>(act));
      }
    }
    check(cudaGetLastError(), "silu(gate)·up");
  }

  void require_weight(const TensorView& w, const std::string& which, std::int64_t rows,
                      std::int64_t cols) const {
    const DType d = w.dtype();
    if (d != DType::kF32 && d != DType::kBF16 && d != DType::kF16) {
      throw Error(ErrorCode::kInvalidArgument, "cuda_swiglu: " + which + " is " +
                                                   std::string(dtype_name(d)) +
                                                   "; f32, bf16 and f16 weights are supported");
    }
    if ((d == DType::kBF16) != bf16_) {
      throw Error(ErrorCode::kInvalidArgument,
                  "cuda_swiglu: " + which + " is " + std::string(dtype_name(d)) +
                      " but other weights are " + (bf16_ ? "bf16" : "not bf16"));
    }
    w.require(which, d, {rows, cols});
    if (w.device().kind != Device::Kind::kHost) {
      throw Error(ErrorCode::kInvalidArgument,
                  "cuda_swiglu: " + which + " must be host memory (it is uploaded)");
    }
  }

  /// Copies a host weight to the device in the kernel's dtype (bf16 stays bf16; f16 is
  /// widened to f32 exactly).
  void upload(const TensorView& w, void* device) {
    const auto count = static_cast<std::size_t>(w.numel());
    if (w.dtype() == DType::kF16) {
      std::vector<float> widened(count);
      const auto* bits = w.data_as<const std::uint16_t>();
      for (std::size_t i = 0; i < count; ++i) widened[i] = f16_to_f32(bits[i]);
      check(cudaMemcpy(device, widened.data(), count * 4, cudaMemcpyHostToDevice),
            "uploading weights");
      return;
    }
    check(cudaMemcpy(device, w.data(), count * dtype_size(w.dtype()), cudaMemcpyHostToDevice),
          "uploading weights");
  }

  int hidden_;
  int ffn_hidden_;
  int device_ = 0;
  bool bf16_ = false;
  /// A stream of the experts' own, with its cuBLAS handle and scratch.
  struct Lane {
    cudaStream_t stream = nullptr;
    cublasHandle_t cublas = nullptr;
    cudaEvent_t done = nullptr;
    cuda_common::DeviceScratch<std::byte> projected, act;
  };
  static constexpr int kExpertLanes = 8;

  std::array<Lane, kExpertLanes> lanes_;
  cudaEvent_t rows_ready_ = nullptr;
  std::vector<Weights> weights_;
  const ExpertBatchNames names_{"cuda_swiglu"};
  cuda_common::DeviceScratch<std::byte> rows_;
};

std::unique_ptr<ExpertKernel> create(const ExpertCreateArgs& args) {
  cuda_common::cuda_probe().throw_if_error();
  return std::make_unique<CudaSwigluKernel>(args);
}

}  // namespace
}  // namespace switchyard::cuda_swiglu

SWITCHYARD_EXPERT_PLUGIN(
    "cuda_swiglu", "0.1.0",
    "SwiGLU experts on a CUDA device (cuBLAS, bf16 weights on tensor cores, f32 accumulation)",
    nullptr, ::switchyard::cuda_common::cuda_probe, ::switchyard::cuda_swiglu::create)
