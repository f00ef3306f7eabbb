// GPU measurements for BENCHMARKS.md, each against the device's own reference in the same
// run (tests/gpu/run.sh runs both modes and prints the table):
//
//   bench_gpu kernels
//     permute (the data path's pack, f32 and bf16 payloads) and unpermute-sum bandwidth
//     against a device-to-device copy of the same bytes; the experts (cuda_swiglu, bf16
//     weights, on bf16 rows as the layer groups them into bf16 outputs as the layer takes
//     them, each way of splitting the GEMMs, on even row counts and on the counts of uniform
//     routing; and from f32 rows, and into f32 outputs) in TFLOP/s
//     against one cuBLAS BF16 GEMM of the same FLOPs (the faster of f32 and bf16 results),
//     timed in turn with each measurement (the same clocks for both); at
//     T = 8192 tokens for (E = 8, k = 2, H = 4096, F = 14336) and (E = 64, k = 8, H = 2048,
//     F = 1408).
//   bench_gpu layer CHECKPOINT TOKENS.npy TOP_K OUT.npy [ITERS [GEMM]]
//     the whole layer at world 1 (NCCL, the CUDA data path, cuda_swiglu with [experts] gemm,
//     batch_granule and batch_experts from GEMM = NAME[:GRANULE[:EXPERTS]], or its defaults,
//     Mixtral routing: softmax over the k selected logits) on a
//     Mixtral-format checkpoint and f32 tokens;
//     prints the median ms per forward and writes the output (tests/gpu/mixtral_compare.py
//     compares both with Hugging Face's MixtralSparseMoeBlock on the same weights).
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "switchyard/config.hpp"
#include "switchyard/io.hpp"
#include "switchyard/layer.hpp"
#include "switchyard/model.hpp"
#include "switchyard/plugin.hpp"

using namespace switchyard;

namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "bench_gpu: %s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

void check(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) {
    std::fprintf(stderr, "bench_gpu: %s: %s\n", what, cublasGetStatusString(s));
    std::exit(1);
  }
}

/// `text` for a cell of a Markdown table: no '|' in it.
std::string table_cell(std::string text) {
  std::replace(text.begin(), text.end(), '|', '/');
  return text;
}

/// Milliseconds of one `run` on `stream`, between events recorded on it before and after.
double once_ms(cudaStream_t stream, const std::function<void()>& run) {
  cudaEvent_t start, stop;
  check(cudaEventCreate(&start), "event");
  check(cudaEventCreate(&stop), "event");
  check(cudaEventRecord(start, stream), "record");
  run();
  check(cudaEventRecord(stop, stream), "record");
  check(cudaEventSynchronize(stop), "sync");
  float ms = 0;
  check(cudaEventElapsedTime(&ms, start, stop), "elapsed");
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return ms;
}

double median_of(std::vector<double> times) {
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

/// Median milliseconds of `run` on `stream` over `iters` runs after 2 warm-ups.
double median_ms(cudaStream_t stream, int iters, const std::function<void()>& run) {
  for (int i = 0; i < 2; ++i) run();
  std::vector<double> times;
  for (int i = 0; i < iters; ++i) times.push_back(once_ms(stream, run));
  return median_of(std::move(times));
}

/// Medians (ms) of `a` and of `b` on `stream`, timed in turn (a, b, a, b, ...) after 2
/// warm-ups of each, so that both run at the same clocks: a GPU's clocks move with its
/// temperature and power over a run, and a ratio of two medians taken minutes apart moved
/// by ±10 % between runs.
std::pair<double, double> paired_median_ms(cudaStream_t stream, int iters,
                                           const std::function<void()>& a,
                                           const std::function<void()>& b) {
  std::vector<double> times_a, times_b;
  for (int i = 0; i < 2; ++i) {
    a();
    b();
  }
  for (int i = 0; i < iters; ++i) {
    times_a.push_back(once_ms(stream, a));
    times_b.push_back(once_ms(stream, b));
  }
  return {median_of(std::move(times_a)), median_of(std::move(times_b))};
}

/// A hash of (i, seed) as a float in [-0.5, 0.5): cheap reproducible fill values.
__device__ float hash_unit(std::size_t i, std::uint32_t seed) {
  std::uint32_t x = static_cast<std::uint32_t>(i) * 2654435761u + seed;
  x ^= x >> 13;
  x *= 0x5bd1e995u;
  x ^= x >> 15;
  return static_cast<float>(x & 0xffffff) / 16777216.0f - 0.5f;
}

__global__ void fill(float* p, std::size_t n, std::uint32_t seed) {
  const std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (i < n) p[i] = hash_unit(i, seed) * 0.2f;
}

__global__ void fill_bf16(__nv_bfloat16* p, std::size_t n, std::uint32_t seed) {
  const std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  if (i < n) p[i] = __float2bfloat16_rn(hash_unit(i, seed) * 0.05f);
}

unsigned grid_for(std::size_t n) { return static_cast<unsigned>((n + 255) / 256); }

struct Shape {
  int E, k;
  std::int64_t H, F;
};

struct Stream final : switchyard::Stream {
  cudaStream_t s = nullptr;
  Stream() { check(cudaStreamCreate(&s), "stream"); }
  Device device() const noexcept override { return Device::cuda(0); }
  void* native_handle() const noexcept override { return s; }
  void synchronize() override { check(cudaStreamSynchronize(s), "sync"); }
  bool idle() noexcept override { return cudaStreamQuery(s) == cudaSuccess; }
  std::unique_ptr<StreamEvent> create_event() override { return nullptr; }
  void record(StreamEvent&) override {}
};

int kernels() {
  PluginRegistry registry(PluginRegistry::default_search_path());
  auto path = registry.create_data_path("cuda", DataPathCreateArgs{});
  Stream stream;
  cublasHandle_t cublas;
  check(cublasCreate(&cublas), "cublas");
  check(cublasSetStream(cublas, stream.s), "cublas stream");
  const std::int64_t T = 8192;
  std::printf(
      "| shape | measure | ms | rate | reference | ratio |\n| --- | --- | --- | --- | --- | --- "
      "|\n");
  for (const Shape shape : {Shape{8, 2, 4096, 14336}, Shape{64, 8, 2048, 1408}}) {
    const std::int64_t H = shape.H, F = shape.F, S = T * shape.k;
    char label[64];
    std::snprintf(label, sizeof label, "E=%d k=%d H=%lld F=%lld", shape.E, shape.k,
                  static_cast<long long>(H), static_cast<long long>(F));
    // Permute: S rows gathered from T tokens (each token k times).
    float *x, *rows, *copy;
    std::int64_t* token;
    check(cudaMalloc(&x, T * H * 4), "x");
    check(cudaMalloc(&rows, S * H * 4), "rows");
    check(cudaMalloc(&copy, S * H * 4), "copy");
    check(cudaMalloc(&token, S * 8), "tokens");
    fill<<<grid_for(T * H), 256, 0, stream.s>>>(x, T * H, 1);
    std::vector<std::int64_t> host_token(static_cast<std::size_t>(S));
    for (std::int64_t s = 0; s < S; ++s) host_token[static_cast<std::size_t>(s)] = (s * 7919) % T;
    check(cudaMemcpy(token, host_token.data(), S * 8, cudaMemcpyHostToDevice), "tokens");
    const double copy_ms = median_ms(stream.s, 20, [&] {
      check(cudaMemcpyAsync(copy, rows, S * H * 4, cudaMemcpyDeviceToDevice, stream.s), "copy");
    });
    const double copy_gbs = 2.0 * S * H * 4 / (copy_ms * 1e6);
    for (PayloadDType dtype : {PayloadDType::kF32, PayloadDType::kBF16}) {
      PackArgs pack{x, H, token, S, dtype, reinterpret_cast<std::byte*>(rows)};
      const double ms = median_ms(stream.s, 20, [&] { path->pack(pack, stream); });
      const double bytes =
          static_cast<double>(S * H) * 4 + static_cast<double>(S) * payload_row_bytes(dtype, H);
      std::printf("| %s | permute %s | %.3f | %.0f GB/s | copy %.0f GB/s | %.0f%% |\n", label,
                  std::string(payload_dtype_name(dtype)).c_str(), ms, bytes / (ms * 1e6), copy_gbs,
                  100.0 * bytes / (ms * 1e6) / copy_gbs);
    }
    UnpermuteSumArgs sum{
        reinterpret_cast<const std::byte*>(rows), token, S, H, DType::kF32, copy, T};
    const double unpermute_ms = median_ms(stream.s, 20, [&] { path->unpermute_sum(sum, stream); });
    const double unpermute_bytes = static_cast<double>(S * H) * 4 + static_cast<double>(T * H) * 4;
    std::printf("| %s | unpermute-sum f32 | %.3f | %.0f GB/s | copy %.0f GB/s | %.0f%% |\n", label,
                unpermute_ms, unpermute_bytes / (unpermute_ms * 1e6), copy_gbs,
                100.0 * unpermute_bytes / (unpermute_ms * 1e6) / copy_gbs);
    cudaFree(x);
    cudaFree(copy);
    cudaFree(token);

    // Experts: S rows over E bf16 experts (even counts, and the counts of uniform routing),
    // each way of splitting the GEMMs, against one GEMM of the same FLOPs.
    std::vector<std::vector<std::uint16_t>> host(static_cast<std::size_t>(shape.E) * 3);
    std::vector<SwigluExpertWeights> views;
    for (int e = 0; e < shape.E; ++e) {
      for (int m = 0; m < 3; ++m) {
        auto& w = host[static_cast<std::size_t>(e * 3 + m)];
        w.resize(static_cast<std::size_t>(H * F));
        std::uint32_t state = static_cast<std::uint32_t>(e * 3 + m + 1);
        for (auto& v : w) {
          state = state * 1664525u + 1013904223u;
          v = float_to_bf16((static_cast<float>(state >> 8) / 16777216.0f - 0.5f) * 0.05f);
        }
      }
      views.push_back(
          {TensorView(host[static_cast<std::size_t>(e * 3)].data(), DType::kBF16, {F, H}),
           TensorView(host[static_cast<std::size_t>(e * 3 + 1)].data(), DType::kBF16, {F, H}),
           TensorView(host[static_cast<std::size_t>(e * 3 + 2)].data(), DType::kBF16, {H, F})});
    }
    ExpertCreateArgs args;
    args.hidden = static_cast<int>(H);
    args.ffn_hidden = static_cast<int>(F);
    args.experts = views;
    // Each way of splitting the GEMMs: per expert; batched steps of 128 and of 64 rows, a
    // step in one call; steps of 128 rows in calls of at most 8 and at most 2 experts
    // ("batched GRANULE/EXPERTS"); grouped, every expert in one call, and at most 8 experts
    // a call ("grouped/EXPERTS").
    struct Split {
      const char* gemm;
      std::int64_t granule, batch_experts;
      const char* name;
    };
    const Split splits[] = {
        {"per_expert", 128, 0, "per_expert"}, {"batched", 128, 0, "batched 128"},
        {"batched", 64, 0, "batched 64"},     {"batched", 128, 8, "batched 128/8"},
        {"batched", 128, 2, "batched 128/2"}, {"grouped", 128, 0, "grouped"},
        {"grouped", 128, 8, "grouped/8"}};
    float* out;
    check(cudaMalloc(&out, S * H * 4), "out");
    // Rows per expert: even, and as uniform routing gives them (each token to k distinct
    // experts, seeded), which the batched split cuts into steps and rests.
    std::vector<std::int64_t> even(static_cast<std::size_t>(shape.E), S / shape.E);
    std::vector<std::int64_t> routed(static_cast<std::size_t>(shape.E), 0);
    std::uint32_t state = 7;
    for (std::int64_t t = 0; t < T; ++t) {
      std::vector<int> chosen;
      while (static_cast<int>(chosen.size()) < shape.k) {
        state = state * 1664525u + 1013904223u;
        const int e = static_cast<int>((state >> 8) % static_cast<std::uint32_t>(shape.E));
        if (std::find(chosen.begin(), chosen.end(), e) == chosen.end()) chosen.push_back(e);
      }
      for (const int e : chosen) ++routed[static_cast<std::size_t>(e)];
    }
    // The reference first, so that each experts row is printed as soon as it is measured.
    const double flops =
        6.0 * static_cast<double>(S) * static_cast<double>(H) * static_cast<double>(F);
    __nv_bfloat16 *a, *b;
    float* c;
    check(cudaMalloc(&a, S * H * 2), "a");
    check(cudaMalloc(&b, 3 * F * H * 2), "b");
    check(cudaMalloc(&c, S * 3 * F * 4), "c");
    fill_bf16<<<grid_for(S * H), 256, 0, stream.s>>>(a, S * H, 3);
    fill_bf16<<<grid_for(3 * F * H), 256, 0, stream.s>>>(b, 3 * F * H, 4);
    const float one = 1, zero = 0;
    // The reference is the faster of writing f32 and bf16 results (the experts write both),
    // timed again beside each experts measurement.
    auto reference_gemm = [&](cudaDataType_t c_type) {
      check(cublasGemmEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(3 * F),
                         static_cast<int>(S), static_cast<int>(H), &one, b, CUDA_R_16BF,
                         static_cast<int>(H), a, CUDA_R_16BF, static_cast<int>(H), &zero, c, c_type,
                         static_cast<int>(3 * F), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
            "reference GEMM");
    };
    const cudaDataType_t reference_type =
        median_ms(stream.s, 10, [&] { reference_gemm(CUDA_R_32F); }) <=
                median_ms(stream.s, 10, [&] { reference_gemm(CUDA_R_16BF); })
            ? CUDA_R_32F
            : CUDA_R_16BF;
    // One row per measurement, printed at once, each timed in turn with the reference; a
    // split that fails (a cuBLAS call it makes refused, say) gets a row saying so, and the
    // others are still measured.
    auto experts_row = [&](const std::string& measure, const std::function<void()>& forward) {
      try {
        const auto [ms, gemm_ms] =
            paired_median_ms(stream.s, 15, forward, [&] { reference_gemm(reference_type); });
        std::printf("| %s | %s | %.3f | %.0f TFLOP/s | one GEMM %.0f TFLOP/s | %.0f%% |\n", label,
                    measure.c_str(), ms, flops / (ms * 1e9), flops / (gemm_ms * 1e9),
                    100.0 * gemm_ms / ms);
      } catch (const Error& e) {
        std::printf("| %s | %s | failed: %s | | | |\n", label, measure.c_str(),
                    table_cell(e.what()).c_str());
      }
      std::fflush(stdout);
    };
    // The rows as the layer hands them over (grouped straight into bf16: input_dtype) and
    // the outputs as it takes them (bf16: output_dtype); and f32 rows the kernel rounds
    // itself, f32 outputs.
    __nv_bfloat16 *rows16, *out16;
    check(cudaMalloc(&rows16, S * H * 2), "rows16");
    check(cudaMalloc(&out16, S * H * 2), "out16");
    fill_bf16<<<grid_for(S * H), 256, 0, stream.s>>>(rows16, S * H, 5);
    // per_expert, the split measured before, first: a split that spoils the device cannot
    // cost its rows.
    for (const Split& split : splits) {
      Config config;
      config.set("experts", "gemm", std::string(split.gemm));
      config.set("experts", "batch_granule", split.granule);
      config.set("experts", "batch_experts", split.batch_experts);
      const ConfigSection options =
          config.section("experts", registry.options(PluginKind::kExpert, "cuda_swiglu"));
      args.options = &options;  // read when the kernel is created, not after
      std::shared_ptr<ExpertKernel> experts;
      try {
        experts = registry.create_expert("cuda_swiglu", args);
      } catch (const Error& e) {
        for (const char* counts : {"even", "routed"}) {
          std::printf("| %s | experts (cuda_swiglu, bf16, %s, %s counts) | failed: %s | | | |\n",
                      label, split.name, counts, table_cell(e.what()).c_str());
        }
      }
      args.options = nullptr;
      if (experts == nullptr) continue;
      for (const auto* counts : {&even, &routed}) {
        const ExpertBatch batch{TensorView(rows16, DType::kBF16, {S, H}, Device::cuda(0)), *counts,
                                TensorView(out16, DType::kBF16, {S, H}, Device::cuda(0))};
        experts_row(std::string("experts (cuda_swiglu, bf16, ") + split.name + ", " +
                        (counts == &even ? "even" : "routed") + " counts)",
                    [&] { experts->forward(batch, stream); });
      }
      if (std::string(split.gemm) == "per_expert") {
        const ExpertBatch f32_batch{TensorView(rows, DType::kF32, {S, H}, Device::cuda(0)), even,
                                    TensorView(out, DType::kF32, {S, H}, Device::cuda(0))};
        experts_row("experts from f32 rows (per_expert, even counts, rounded in the kernel)",
                    [&] { experts->forward(f32_batch, stream); });
        const ExpertBatch f32_out_batch{TensorView(rows16, DType::kBF16, {S, H}, Device::cuda(0)),
                                        even,
                                        TensorView(out, DType::kF32, {S, H}, Device::cuda(0))};
        experts_row("experts into f32 outputs (per_expert, even counts)",
                    [&] { experts->forward(f32_out_batch, stream); });
      }
    }
    cudaFree(rows16);
    cudaFree(out16);
    cudaFree(a);
    cudaFree(b);
    cudaFree(c);
    cudaFree(out);
    cudaFree(rows);
  }
  cublasDestroy(cublas);
  return 0;
}

int layer(const std::string& checkpoint, const std::string& tokens_path, int top_k,
          const std::string& out_path, int iters, const std::string& gemm) {
  PluginRegistry registry(PluginRegistry::default_search_path());
  const ModelWeights model = ModelWeights::load(checkpoint, CheckpointFormat::kMixtral, "");
  const HostTensor tokens = read_npy_f32_matrix(tokens_path, model.hidden(), "tokens");
  const std::int64_t T = tokens.shape()[0], H = model.hidden();
  Config config;
  config.set("router", "top_k", std::int64_t{top_k});
  config.set("router", "pre_softmax", false);  // Mixtral: softmax over the k selected logits
  // GEMM: NAME[:GRANULE[:EXPERTS]], the [experts] gemm, batch_granule and batch_experts.
  if (!gemm.empty()) {
    const std::size_t first = gemm.find(':');
    config.set("experts", "gemm", gemm.substr(0, first));
    if (first != std::string::npos) {
      const std::size_t second = gemm.find(':', first + 1);
      config.set("experts", "batch_granule",
                 std::int64_t{std::atoll(gemm.substr(first + 1, second - first - 1).c_str())});
      if (second != std::string::npos) {
        config.set("experts", "batch_experts",
                   std::int64_t{std::atoll(gemm.substr(second + 1).c_str())});
      }
    }
  }
  const ConfigSection runtime =
      config.section("runtime", registry.options(PluginKind::kTransport, "nccl"));
  TransportCreateArgs transport_args;
  transport_args.options = &runtime;
  transport_args.timeout_s = 120;
  auto transport = registry.create_transport("nccl", transport_args)[0];
  const ConfigSection router =
      config.section("router", registry.options(PluginKind::kRouter, "topk"));
  RouterCreateArgs router_args;
  router_args.options = &router;
  router_args.num_experts = model.num_experts();
  const auto expert_views = model.experts(0, model.num_experts());
  ExpertCreateArgs expert_args;
  expert_args.hidden = static_cast<int>(H);
  expert_args.ffn_hidden = model.ffn_hidden();
  expert_args.experts = expert_views;
  const ConfigSection experts =
      config.section("experts", registry.options(PluginKind::kExpert, "cuda_swiglu"));
  expert_args.options = &experts;
  MoELayerParts parts;
  parts.transport = transport.get();
  parts.router = registry.create_router("topk", router_args);
  parts.experts = registry.create_expert("cuda_swiglu", expert_args);
  parts.gate = model.gate().view();
  parts.placement = ExpertPlacement(model.num_experts(), 1);
  parts.data_path = registry.create_data_path("cuda", DataPathCreateArgs{});
  parts.payload_dtype = PayloadDType::kBF16;
  MoELayer moe(parts);
  float *x, *y;
  check(cudaMalloc(&x, T * H * 4), "x");
  check(cudaMalloc(&y, T * H * 4), "y");
  check(cudaMemcpy(x, tokens.data<float>(), T * H * 4, cudaMemcpyHostToDevice), "tokens");
  const TensorView xv(x, DType::kF32, {T, H}, Device::cuda(0)),
      yv(y, DType::kF32, {T, H}, Device::cuda(0));
  const auto s = static_cast<cudaStream_t>(moe.stream().native_handle());
  const double ms = median_ms(s, iters, [&] { moe.forward(xv, yv); });
  std::vector<float> result(static_cast<std::size_t>(T * H));
  check(cudaMemcpy(result.data(), y, T * H * 4, cudaMemcpyDeviceToHost), "y");
  write_npy(out_path, TensorView(result.data(), DType::kF32, {T, H}));
  const LayerTimings t = moe.timings();
  // The split this run used and the plugin's default, each as NAME:GRANULE:EXPERTS.
  auto split_of = [](const ConfigSection& section) {
    return section.get_string("gemm") + ":" + std::to_string(section.get_int("batch_granule")) +
           ":" + std::to_string(section.get_int("batch_experts"));
  };
  const ConfigSection defaults =
      Config().section("experts", registry.options(PluginKind::kExpert, "cuda_swiglu"));
  std::printf(
      "layer_ms=%.3f route_ms=%.3f layout_ms=%.3f dispatch_ms=%.3f experts_ms=%.3f "
      "combine_ms=%.3f gemm=%s default_gemm=%s\n",
      ms, t.route_s * 1e3, t.layout_s * 1e3, t.dispatch_s * 1e3, t.experts_s * 1e3,
      t.combine_s * 1e3, split_of(experts).c_str(), split_of(defaults).c_str());
  if (std::getenv("SWITCHYARD_BENCH_WORST_CASE") != nullptr) {
    // The same layer in the worst-case mode ([runtime] max_tokens_per_rank = T): its time,
    // and whether its y is the counted forward's bytes.
    MoELayerParts fixed = parts;
    fixed.max_tokens_per_rank = T;
    MoELayer worst_case(fixed);
    const auto ws = static_cast<cudaStream_t>(worst_case.stream().native_handle());
    const double worst_ms = median_ms(ws, iters, [&] { worst_case.forward(xv, yv); });
    worst_case.finish_worst_case_steps();
    std::vector<float> again(result.size());
    check(cudaMemcpy(again.data(), y, T * H * 4, cudaMemcpyDeviceToHost), "y");
    const bool same = std::memcmp(again.data(), result.data(), again.size() * 4) == 0;
    // cuBLAS may pick other kernels for the worst case's larger blocks: the largest
    // difference relative to the largest |y| says how far apart they are.
    double most = 0, largest = 0;
    for (std::size_t i = 0; i < again.size(); ++i) {
      most = std::max(most, std::abs(static_cast<double>(again[i]) - result[i]));
      largest = std::max(largest, std::abs(static_cast<double>(result[i])));
    }
    std::printf("worst_case_ms=%.3f worst_case_same=%d worst_case_rel=%.3e\n", worst_ms,
                same ? 1 : 0, largest > 0 ? most / largest : most);
  }
  cudaFree(x);
  cudaFree(y);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const std::string mode = argc > 1 ? argv[1] : "";
    if (mode == "kernels") return kernels();
    if (mode == "layer" && argc >= 6)
      return layer(argv[2], argv[3], std::atoi(argv[4]), argv[5],
                   argc > 6 ? std::atoi(argv[6]) : 10, argc > 7 ? argv[7] : "");
    std::fprintf(stderr,
                 "usage: bench_gpu kernels | bench_gpu layer CHECKPOINT TOKENS.npy TOP_K OUT.npy "
                 "[ITERS [GEMM]]\n");
    return 2;
  } catch (const Error& e) {
    std::fprintf(stderr, "bench_gpu: %s\n", e.what());
    return 1;
  }
}
