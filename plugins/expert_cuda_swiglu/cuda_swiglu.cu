// expert_cuda_swiglu: SwiGLU experts, y = down(silu(gate·x) ⊙ up·x), on a CUDA device
// through cuBLAS with float32 accumulation. BF16 checkpoints stay BF16 on the device
// (tensor cores): the kernel takes BF16 rows (the layer groups them so: input_dtype), or
// rounds f32 rows to BF16; gate and up run as one GEMM against the stacked weights [2F,H]
// and write BF16 projections, one kernel fuses silu(g)·u in f32 and rounds it to BF16, and
// the down GEMM writes BF16 rows (the layer takes them so: output_dtype) or f32 rows. F32
// weights (and F16, widened exactly to F32 when uploaded) run the same sequence in F32
// without tensor cores. FP8 block-scaled weights (DeepSeek-V3's) are dequantised and rounded
// to BF16 when uploaded and then run as BF16: there is no FP8 GEMM here yet, so they take
// BF16's device memory.
// The GEMMs are split into pieces (gemm_plan.hpp): one per expert (`gemm = "per_expert"`),
// or steps of the same rows of many experts, each one batched cuBLAS call, and each
// expert's short rest (`gemm = "batched"`), or runs of experts with all their rows, each
// one grouped cuBLAS call (`gemm = "grouped"`; for f32 outputs with bf16 weights its down
// GEMM writes bf16, the only result type cuBLAS's grouped GEMM has for bf16, widened).
// Stream-ordered: the work starts after what the caller's stream holds and the caller's
// stream waits for all of it. In between, the pieces run on kExpertLanes streams of the
// kernel's own, so that small GEMMs, each too small to fill the device, overlap. The weights are
// copied to the device once, when the kernel is created.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "cuda_probe.hpp"
#include "device_scratch.hpp"
#include "gemm_plan.hpp"
#include "switchyard/bootstrap.hpp"
#include "switchyard/plugin.hpp"

namespace switchyard::cuda_swiglu {
namespace {

// `what` is a view: the message is built on failure only, so that a forward's checks
// allocate nothing.
void check(cudaError_t e, std::string_view what) {
  if (e != cudaSuccess) {
    throw Error(ErrorCode::kSystem, "cuda_swiglu: " + std::string(what) + ": " +
                                        cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
  }
}

void check(cublasStatus_t s, std::string_view what) {
  if (s != CUBLAS_STATUS_SUCCESS) {
    throw Error(ErrorCode::kSystem, "cuda_swiglu: " + std::string(what) + ": " +
                                        cublasGetStatusName(s) + " (" + cublasGetStatusString(s) +
                                        ")");
  }
}

__device__ float silu_times(float g, float u) { return g / (1.0f + expf(-g)) * u; }

__device__ float to_float(float v) { return v; }
__device__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

/// v into f32, or into bf16 rounded to nearest even.
__device__ void store(float v, float* out) { *out = v; }
__device__ void store(float v, __nv_bfloat16* out) { *out = __float2bfloat16_rn(v); }

/// Four elements of T moved as one: float4 for f32, uint2 for bf16.
template <typename T>
struct QuadOf;
template <>
struct QuadOf<float> {
  using type = float4;
};
template <>
struct QuadOf<__nv_bfloat16> {
  using type = uint2;
};

/// Four elements from a quad of f32 or bf16 (read-only cache).
__device__ float4 load_quad(const float4* p) { return __ldg(p); }
__device__ float4 load_quad(const uint2* p) {
  const uint2 b = __ldg(p);
  return make_float4(__uint_as_float(b.x << 16), __uint_as_float(b.x & 0xffff0000u),
                     __uint_as_float(b.y << 16), __uint_as_float(b.y & 0xffff0000u));
}

/// Four elements into a quad of f32, or of bf16 rounded to nearest even.
__device__ void store_quad(float4 v, float4* p) { *p = v; }
__device__ void store_quad(float4 v, uint2* p) {
  auto* pair = reinterpret_cast<__nv_bfloat162*>(p);
  pair[0] = __halves2bfloat162(__float2bfloat16_rn(v.x), __float2bfloat16_rn(v.y));
  pair[1] = __halves2bfloat162(__float2bfloat16_rn(v.z), __float2bfloat16_rn(v.w));
}

// The row kernels below work on a piece's rows: `rows` rows from each of its row blocks,
// block j (blockIdx.y) from row starts[j] of the forward's rows (a block per expert, or one
// for a grouped piece, whose experts' rows lie back to back).

/// act[row, f] = silu(g) · u with g = h[row, f], u = h[row, F + f] (h = [N, 2F], the
/// projections' type: f32, or bf16 with bf16 weights), in the activation type (bf16 or f32).
template <typename Projection, typename Act>
__global__ void silu_times_up(const Projection* h, const std::int64_t* starts, std::int64_t rows,
                              std::int64_t F, Act* act) {
  const std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (i >= rows * F) return;
  const std::int64_t row = starts[blockIdx.y] + i / F, f = i % F;
  store(silu_times(to_float(h[row * 2 * F + f]), to_float(h[row * 2 * F + F + f])),
        act + row * F + f);
}

/// silu_times_up four elements at a time (F a multiple of 4, buffers 16-byte aligned), in
/// quads of the projections' and the activations' types.
template <typename Quad, typename ActQuad>
__global__ void silu_times_up_x4(const Quad* __restrict__ h, const std::int64_t* starts,
                                 std::int64_t rows, std::int64_t F4, ActQuad* __restrict__ act) {
  const std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (i >= rows * F4) return;
  const std::int64_t row = starts[blockIdx.y] + i / F4, f = i % F4;
  const float4 g = load_quad(h + row * 2 * F4 + f), u = load_quad(h + row * 2 * F4 + F4 + f);
  const float4 v = make_float4(silu_times(g.x, u.x), silu_times(g.y, u.y), silu_times(g.z, u.z),
                               silu_times(g.w, u.w));
  store_quad(v, act + row * F4 + f);
}

/// out[row, c] = in[row, c] in out's type (f32 rounded to bf16, or bf16 widened to f32
/// exactly), rows of H columns.
template <typename In, typename Out>
__global__ void convert_rows(const In* in, const std::int64_t* starts, std::int64_t rows,
                             std::int64_t H, Out* out) {
  const std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (i >= rows * H) return;
  const std::int64_t at = (starts[blockIdx.y] + i / H) * H + i % H;
  store(to_float(in[at]), out + at);
}

/// convert_rows four elements at a time (H4 quads a row, buffers 16-byte aligned).
template <typename InQuad, typename OutQuad>
__global__ void convert_rows_x4(const InQuad* __restrict__ in, const std::int64_t* starts,
                                std::int64_t rows, std::int64_t H4, OutQuad* __restrict__ out) {
  const std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (i >= rows * H4) return;
  const std::int64_t quad = (starts[blockIdx.y] + i / H4) * H4 + i % H4;
  store_quad(load_quad(in + quad), out + quad);
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

unsigned blocks_for(std::int64_t n, int threads) {
  return static_cast<unsigned>(std::max<std::int64_t>(1, (n + threads - 1) / threads));
}

/// The grid of a row kernel over piece `p`'s rows (`p.rows` rows of each of its row blocks),
/// `per_row` threads a row.
dim3 piece_grid(const GemmPiece& p, std::int64_t per_row, int threads) {
  return dim3(blocks_for(p.rows * per_row, threads), static_cast<unsigned>(p.row_blocks()));
}

void declare_options(ConfigSchema& s) {
  s.add("gemm", ConfigType::kString, ConfigValue{std::string("per_expert")},
        "how the experts' GEMMs are split into cuBLAS calls: per_expert (one GEMM per expert, "
        "on 8 streams), batched (the same rows of many experts in one batched GEMM, then "
        "each expert's rest of under batch_granule rows) or grouped (all rows of many experts "
        "in one grouped GEMM; with bf16 weights the outputs are rounded to bf16)",
        checks::one_of({"per_expert", "batched", "grouped"}));
  s.add("batch_granule", ConfigType::kInt, ConfigValue{std::int64_t{128}},
        "with gemm = batched: the batched steps' heights are multiples of this many rows "
        "(smaller leaves shorter rests, larger makes fewer, taller steps)",
        checks::int_range(1, 1 << 20));
  s.add("batch_experts", ConfigType::kInt, ConfigValue{std::int64_t{0}},
        "with gemm = batched or grouped: at most this many experts in one call, a step (or "
        "the experts) of more cut into several on different streams, so that one's "
        "silu(gate)·up overlaps another's GEMMs (0: every expert of a step in one call)",
        checks::int_range(0, 1 << 20));
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
      : hidden_(args.hidden),
        ffn_hidden_(args.ffn_hidden),
        split_(args.options != nullptr ? parse_gemm_split(args.options->get_string("gemm"))
                                       : GemmSplit::kPerExpert),
        batch_granule_(args.options != nullptr ? args.options->get_int("batch_granule") : 128),
        batch_experts_(args.options != nullptr ? args.options->get_int("batch_experts") : 0) {
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
    // FP8 weights become BF16 on the device (see the top of this file).
    bf16_ = !args.experts.empty() && (args.experts[0].gate.dtype() == DType::kBF16 ||
                                      args.experts[0].gate.dtype() == DType::kF8E4M3);
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
      upload(w.gate, w.gate_scale, d.gate_up);
      upload(w.up, w.up_scale,
             static_cast<std::byte*>(d.gate_up) + static_cast<std::size_t>(F * H) * element);
      upload(w.down, w.down_scale, d.down);
      weights_.push_back(d);
      gate_up_weights_.push_back(d.gate_up);
      down_weights_.push_back(d.down);
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
    for (const Table& t : tables_) {
      cudaEventDestroy(t.released);
      cudaFreeHost(t.host);
      cudaFree(t.device);
    }
    for (const Weights& d : weights_) {
      cudaFree(d.gate_up);
      cudaFree(d.down);
    }
  }

  std::string name() const override { return "cuda_swiglu"; }
  int num_local_experts() const noexcept override { return static_cast<int>(weights_.size()); }
  /// Device memory, stream-ordered. BF16 weights take BF16 rows (the GEMMs round f32 rows
  /// to BF16 anyway) and write BF16 outputs where the layer lets them (the down GEMM writes
  /// them directly: half the bytes written, and read by the weighted reduce); f32 rows and
  /// outputs are taken as well. No backward yet.
  ExpertKernelCapabilities capabilities() const noexcept override {
    ExpertKernelCapabilities c;
    c.execution.host_memory = false;
    c.execution.device_memory = true;
    c.execution.stream_ordered = true;
    c.input_dtype = bf16_ ? DType::kBF16 : DType::kF32;
    c.output_dtype = c.input_dtype;
    return c;
  }

  void forward(const ExpertBatch& batch, Stream& stream) override {
    const std::int64_t H = hidden_, F = ffn_hidden_;
    check_expert_batch(batch, H, weights_.size(), Device::cuda(device_), names_,
                       capabilities().input_dtype, capabilities().output_dtype);
    const std::int64_t N = batch.input.dim(0);
    if (N == 0) return;
    check(cudaSetDevice(device_), "selecting the device");
    const auto s = static_cast<cudaStream_t>(stream.native_handle());
    const bool bf16_rows = batch.input.dtype() == DType::kBF16;
    const std::size_t element = bf16_ ? 2 : 4;
    // BF16 weights take BF16 rows: f32 rows are rounded piece by piece on the piece's lane,
    // so that the rounding overlaps other lanes' GEMMs.
    auto* rounded =
        bf16_ && !bf16_rows
            ? reinterpret_cast<__nv_bfloat16*>(rows_.get(static_cast<std::size_t>(N * H) * 2))
            : nullptr;
    const auto* x = rounded != nullptr ? reinterpret_cast<const std::byte*>(rounded)
                                       : static_cast<const std::byte*>(batch.input.data());
    const std::size_t x_element = bf16_ || bf16_rows ? 2 : 4;
    // The projections [N,2F] and activations [N,F] in the weights' type (bf16 halves what
    // silu·up reads back); a piece writes only its own rows of them.
    auto* projected = projected_.get(static_cast<std::size_t>(N * 2 * F) * element);
    auto* act = act_.get(static_cast<std::size_t>(N * F) * element);
    auto* y = static_cast<std::byte*>(batch.output.data());
    const bool bf16_out = batch.output.dtype() == DType::kBF16;
    // Grouped pieces with bf16 weights and f32 outputs: the down GEMM's bf16 results (the
    // only result type of cuBLAS's grouped GEMM for bf16), widened into y.
    const bool narrow_grouped_out = split_ == GemmSplit::kGrouped && bf16_ && !bf16_out;
    auto* grouped_out =
        narrow_grouped_out ? grouped_out_.get(static_cast<std::size_t>(N * H) * 2) : nullptr;

    plan_.make(batch.rows_per_expert, split_, batch_granule_, kExpertLanes, batch_experts_);
    const std::span<const GemmPiece> pieces = plan_.pieces();
    for (const GemmPiece& p : pieces) {
      // A piece's row blocks are the y dimension of its row kernels' grids.
      if (p.row_blocks() > 65535) {
        throw Error(ErrorCode::kInternal, "cuda_swiglu: too many experts in a piece");
      }
    }
    // The pieces' table (gemm_plan.hpp), written in pinned memory and copied to the device
    // on the caller's stream: the row kernels read the start rows from it, batched GEMMs
    // their pointer arrays.
    const std::size_t words = plan_.table_words();
    Table& table = free_table(words);
    GemmOperands operands;
    operands.gate_up = gate_up_weights_;
    operands.down = down_weights_;
    operands.rows = x;
    operands.row_bytes = static_cast<std::size_t>(H) * x_element;
    operands.projected = projected;
    operands.projected_row_bytes = static_cast<std::size_t>(2 * F) * element;
    operands.act = act;
    operands.act_row_bytes = static_cast<std::size_t>(F) * element;
    operands.out = y;
    operands.out_row_bytes = static_cast<std::size_t>(H) * (bf16_out ? 2 : sizeof(float));
    operands.grouped_out = grouped_out;
    operands.grouped_out_row_bytes = static_cast<std::size_t>(H) * 2;
    plan_.fill_table(batch.rows_per_expert, operands, std::span<std::uint64_t>(table.host, words));
    check(cudaMemcpyAsync(table.device, table.host, words * sizeof(std::uint64_t),
                          cudaMemcpyHostToDevice, s),
          "copying the GEMM pointers to the device");

    // Fork: every lane used starts after the caller's stream (the rows and the table).
    std::array<bool, kExpertLanes> used{};
    for (const GemmPiece& p : pieces) used[static_cast<std::size_t>(p.lane)] = true;
    check(cudaEventRecord(rows_ready_, s), "recording an event");
    for (int l = 0; l < kExpertLanes; ++l) {
      if (!used[static_cast<std::size_t>(l)]) continue;
      check(cudaStreamWaitEvent(lanes_[static_cast<std::size_t>(l)].stream, rows_ready_),
            "ordering the expert streams");
    }
    for (std::size_t i = 0; i < pieces.size(); ++i) {
      const GemmPiece& p = pieces[i];
      Lane& lane = lanes_[static_cast<std::size_t>(p.lane)];
      const std::uint64_t* on_host = table.host + plan_.table_at(i);
      const std::uint64_t* on_device = table.device + plan_.table_at(i);
      const auto* starts = reinterpret_cast<const std::int64_t*>(on_device + kStartRow);
      if (rounded != nullptr) {
        convert_rows_into(batch.input.data_as<const float>(), starts, p, H, rounded, lane.stream,
                          "rounding the rows to bf16");
      }
      const cudaDataType_t type = bf16_ ? CUDA_R_16BF : CUDA_R_32F;
      // Row-major [n,2F] = x [n,H] · [gate; up]ᵀ, as column-major [2F,n] = Wᵀ(col) · x(col).
      gemm(p, on_host, on_device, kGateUpWeights, GemmShape{2 * F, H, type, type}, lane,
           "gate and up GEMM");
      silu_times_up_into(projected, starts, p, F, act, lane.stream);
      // Row-major [n,H] = act [n,F] · downᵀ.
      const bool narrow = p.grouped && grouped_out != nullptr;
      gemm(p, on_host, on_device, kDownWeights,
           GemmShape{H, F, type, narrow || bf16_out ? CUDA_R_16BF : CUDA_R_32F}, lane, "down GEMM");
      if (narrow) {
        convert_rows_into(reinterpret_cast<const __nv_bfloat16*>(grouped_out), starts, p, H,
                          batch.output.data_as<float>(), lane.stream,
                          "widening the grouped GEMM's outputs to f32");
      }
    }
    // Join: the caller's stream waits for every lane used; the table is free again when
    // the caller's stream gets there.
    for (int l = 0; l < kExpertLanes; ++l) {
      if (!used[static_cast<std::size_t>(l)]) continue;
      Lane& lane = lanes_[static_cast<std::size_t>(l)];
      check(cudaEventRecord(lane.done, lane.stream), "recording an event");
      check(cudaStreamWaitEvent(s, lane.done), "joining the expert streams");
    }
    check(cudaEventRecord(table.released, s), "recording an event");
  }

 private:
  struct Weights {
    void* gate_up = nullptr;  // [2F,H]: gate rows, then up rows
    void* down = nullptr;     // [H,F]
  };

  /// A stream of the experts' own, with its cuBLAS handle.
  struct Lane {
    cudaStream_t stream = nullptr;
    cublasHandle_t cublas = nullptr;
    cudaEvent_t done = nullptr;
  };

  /// The output width, inner size and types of one of the two GEMMs.
  struct GemmShape {
    std::int64_t out, inner;
    cudaDataType_t in_type, out_type;
  };

  /// The host arrays of a grouped cuBLAS call, one entry per group (kept for their
  /// capacity: filling them again allocates nothing). cuBLAS reads them during the call.
  struct GroupedArguments {
    std::vector<cublasOperation_t> transpose, keep;
    std::vector<int> out, rows, inner, size;
    std::vector<float> one, zero;

    void assign(std::span<const GemmGroup> groups, int out_width, int inner_size) {
      const std::size_t g = groups.size();
      transpose.assign(g, CUBLAS_OP_T);
      keep.assign(g, CUBLAS_OP_N);
      out.assign(g, out_width);
      inner.assign(g, inner_size);
      one.assign(g, 1.0f);
      zero.assign(g, 0.0f);
      rows.resize(g);
      size.resize(g);
      for (std::size_t i = 0; i < g; ++i) {
        rows[i] = static_cast<int>(groups[i].rows);
        size[i] = groups[i].count;
      }
    }
  };

  /// One GEMM of piece `p` on its lane: a plain cublasGemmEx for one expert (pointers from
  /// the host table), else one batched call over the piece's experts, or one grouped call
  /// for a grouped piece (pointer arrays from the device table). `column` is the table
  /// column of the A pointers (B and C follow).
  void gemm(const GemmPiece& p, const std::uint64_t* on_host, const std::uint64_t* on_device,
            std::size_t column, const GemmShape& shape, Lane& lane, const char* what) {
    const float one = 1.0f, zero = 0.0f;
    const std::size_t m = p.expert_count;
    const auto out = static_cast<int>(shape.out), inner = static_cast<int>(shape.inner),
               n = static_cast<int>(p.rows);
    auto pointers = [&](std::size_t c) {
      return reinterpret_cast<void* const*>(on_device + c * m);
    };
    cublasStatus_t status;
    if (p.grouped) {
      const std::span<const GemmGroup> groups = plan_.groups(p);
      GroupedArguments& a = grouped_arguments_;
      a.assign(groups, out, inner);
      // Column-major, as below: lda = ldb = inner, ldc = out.
      status = cublasGemmGroupedBatchedEx(
          lane.cublas, a.transpose.data(), a.keep.data(), a.out.data(), a.rows.data(),
          a.inner.data(), a.one.data(), pointers(column), shape.in_type, a.inner.data(),
          pointers(column + 1), shape.in_type, a.inner.data(), a.zero.data(), pointers(column + 2),
          shape.out_type, a.out.data(), static_cast<int>(groups.size()), a.size.data(),
          CUBLAS_COMPUTE_32F);
    } else if (m == 1) {
      auto pointer = [&](std::size_t c) {
        return reinterpret_cast<void*>(static_cast<std::uintptr_t>(on_host[c]));
      };
      status = cublasGemmEx(lane.cublas, CUBLAS_OP_T, CUBLAS_OP_N, out, n, inner, &one,
                            pointer(column), shape.in_type, inner, pointer(column + 1),
                            shape.in_type, inner, &zero, pointer(column + 2), shape.out_type, out,
                            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    } else {
      status =
          cublasGemmBatchedEx(lane.cublas, CUBLAS_OP_T, CUBLAS_OP_N, out, n, inner, &one,
                              pointers(column), shape.in_type, inner, pointers(column + 1),
                              shape.in_type, inner, &zero, pointers(column + 2), shape.out_type,
                              out, static_cast<int>(m), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    }
    if (status == CUBLAS_STATUS_SUCCESS) return;  // the message is built on failure only
    check(status,
          std::string(what) + " of local expert" + (m == 1 ? " " : "s ") +
              std::to_string(plan_.experts(p).front()) +
              (m == 1 ? "" : ".." + std::to_string(plan_.experts(p).back())) +
              (p.grouped ? ", all their rows"
                         : ", rows " + std::to_string(p.first_row) + "+" + std::to_string(p.rows)));
  }

  /// The rows of piece `p` of `in` converted to Out (f32 rounded to bf16, or bf16 widened
  /// to f32) into the same rows of `out`, on `stream`.
  template <typename In, typename Out>
  static void convert_rows_into(const In* in, const std::int64_t* starts, const GemmPiece& p,
                                std::int64_t H, Out* out, cudaStream_t stream, const char* what) {
    const int threads = 256;
    if (H % 4 == 0 && aligned16(in) && aligned16(out)) {
      convert_rows_x4<<<piece_grid(p, H / 4, threads), threads, 0, stream>>>(
          reinterpret_cast<const typename QuadOf<In>::type*>(in), starts, p.rows, H / 4,
          reinterpret_cast<typename QuadOf<Out>::type*>(out));
    } else {
      convert_rows<<<piece_grid(p, H, threads), threads, 0, stream>>>(in, starts, p.rows, H, out);
    }
    check(cudaGetLastError(), what);
  }

  /// act = silu(gate) · up of the rows of piece `p` (projections bf16 with bf16 weights,
  /// else f32), on `stream`.
  void silu_times_up_into(const std::byte* projected, const std::int64_t* starts,
                          const GemmPiece& p, std::int64_t F, std::byte* act,
                          cudaStream_t stream) const {
    const int threads = 256;
    if (F % 4 == 0 && aligned16(projected) && aligned16(act)) {
      const dim3 grid = piece_grid(p, F / 4, threads);
      if (bf16_) {
        silu_times_up_x4<<<grid, threads, 0, stream>>>(reinterpret_cast<const uint2*>(projected),
                                                       starts, p.rows, F / 4,
                                                       reinterpret_cast<uint2*>(act));
      } else {
        silu_times_up_x4<<<grid, threads, 0, stream>>>(reinterpret_cast<const float4*>(projected),
                                                       starts, p.rows, F / 4,
                                                       reinterpret_cast<float4*>(act));
      }
    } else {
      const dim3 grid = piece_grid(p, F, threads);
      if (bf16_) {
        silu_times_up<<<grid, threads, 0, stream>>>(
            reinterpret_cast<const __nv_bfloat16*>(projected), starts, p.rows, F,
            reinterpret_cast<__nv_bfloat16*>(act));
      } else {
        silu_times_up<<<grid, threads, 0, stream>>>(reinterpret_cast<const float*>(projected),
                                                    starts, p.rows, F,
                                                    reinterpret_cast<float*>(act));
      }
    }
    check(cudaGetLastError(), "silu(gate)·up");
  }

  /// A table of GEMM pointers: written on the host (pinned), copied to the device on the
  /// caller's stream; free again once `released` (recorded after the forward's join) has
  /// passed.
  struct Table {
    std::uint64_t* host = nullptr;
    std::uint64_t* device = nullptr;
    std::size_t words = 0;
    cudaEvent_t released = nullptr;
  };

  /// A table of at least `words` words that no forward still reads. Never waits while one
  /// of kMaxTables is free; tables are added up to that, then the oldest is waited for.
  Table& free_table(std::size_t words) {
    auto is_free = [](const Table& t) {
      const cudaError_t e = cudaEventQuery(t.released);
      if (e == cudaErrorNotReady) {
        // Not an error, but the runtime may still report it as the last one, which the
        // launch checks that follow would take for theirs.
        static_cast<void>(cudaGetLastError());
        return false;
      }
      check(e, "asking whether a GEMM table is free");
      return true;
    };
    Table* pick = nullptr;
    for (Table& t : tables_) {
      if (!is_free(t)) continue;
      if (t.words >= words) return t;
      if (pick == nullptr) pick = &t;
    }
    if (pick == nullptr && tables_.size() < kMaxTables) {
      tables_.emplace_back();
      pick = &tables_.back();
      check(cudaEventCreateWithFlags(&pick->released, cudaEventDisableTiming), "creating an event");
    }
    if (pick == nullptr) {
      pick = &tables_[next_wait_++ % tables_.size()];
      check(cudaEventSynchronize(pick->released), "waiting for a GEMM table");
      if (pick->words >= words) return *pick;
    }
    cudaFreeHost(pick->host);
    cudaFree(pick->device);
    pick->host = nullptr;
    pick->device = nullptr;
    pick->words = 0;
    const std::size_t grown = std::max<std::size_t>(words, 1024);
    check(cudaMallocHost(&pick->host, grown * sizeof(std::uint64_t)), "allocating a GEMM table");
    check(cudaMalloc(&pick->device, grown * sizeof(std::uint64_t)), "allocating a GEMM table");
    pick->words = grown;
    return *pick;
  }

  void require_weight(const TensorView& w, const std::string& which, std::int64_t rows,
                      std::int64_t cols) const {
    const DType d = w.dtype();
    if (d != DType::kF32 && d != DType::kBF16 && d != DType::kF16 && d != DType::kF8E4M3) {
      throw Error(ErrorCode::kInvalidArgument,
                  "cuda_swiglu: " + which + " is " + std::string(dtype_name(d)) +
                      "; f32, bf16, f16 and block-scaled f8_e4m3 weights are supported");
    }
    if ((d == DType::kBF16 || d == DType::kF8E4M3) != bf16_) {
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
  void upload(const TensorView& w, const TensorView& block_scales, void* device) {
    const auto count = static_cast<std::size_t>(w.numel());
    if (w.dtype() == DType::kF8E4M3) {
      std::vector<float> widened(count);
      widen_expert_weight(w, block_scales, widened.data());
      std::vector<std::uint16_t> rounded(count);
      for (std::size_t i = 0; i < count; ++i) rounded[i] = float_to_bf16(widened[i]);
      check(cudaMemcpy(device, rounded.data(), count * 2, cudaMemcpyHostToDevice),
            "uploading weights");
      return;
    }
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
  GemmSplit split_;
  /// Batched steps come in whole multiples of this many rows (a GEMM tile's height).
  std::int64_t batch_granule_;
  /// At most this many experts in one batched call (0: no limit).
  std::int64_t batch_experts_;
  static constexpr int kExpertLanes = 8;
  static constexpr std::size_t kMaxTables = 16;

  std::array<Lane, kExpertLanes> lanes_;
  cudaEvent_t rows_ready_ = nullptr;
  std::vector<Weights> weights_;
  const ExpertBatchNames names_{"cuda_swiglu"};
  cuda_common::DeviceScratch<std::byte> rows_, projected_, act_, grouped_out_;
  std::deque<Table> tables_;
  // Reused each forward (a forward allocates nothing once it has run at the largest sizes).
  GemmPlan plan_;
  GroupedArguments grouped_arguments_;
  // Each local expert's weights on the device, as the plan's table takes them.
  std::vector<const void*> gate_up_weights_, down_weights_;
  std::size_t next_wait_ = 0;
};

std::unique_ptr<ExpertKernel> create(const ExpertCreateArgs& args) {
  cuda_common::cuda_probe().throw_if_error();
  return std::make_unique<CudaSwigluKernel>(args);
}

}  // namespace
}  // namespace switchyard::cuda_swiglu

SWITCHYARD_EXPERT_PLUGIN(
    "cuda_swiglu", "0.1.0",
    "SwiGLU experts on a CUDA device (cuBLAS, bf16 weights on tensor cores, f32 accumulation; "
    "fp8 block-scaled weights are widened to bf16 when uploaded: no fp8 GEMM yet)",
    ::switchyard::cuda_swiglu::declare_options, ::switchyard::cuda_common::cuda_probe,
    ::switchyard::cuda_swiglu::create)
