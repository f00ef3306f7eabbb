// The whole EP layer on one GPU at world 1 — NCCL, the CUDA data path, cuda_swiglu, a host
// router fed a copy of the logits — against the dense float64 reference on the same plan
// (dense_moe_reference: plain loops, independent of every plugin). Payloads f32, bf16 and
// fp8; partial sums f32 and bf16; f32 and bf16 experts; cuda_swiglu's GEMMs per expert,
// batched and grouped. Random weights and tokens; the output poisoned first. And worlds of
// 1-4 in-process ranks sharing the GPU (rows through pinned host memory).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "cuda_test_support.hpp"
#include "switchyard/config.hpp"
#include "switchyard/layer.hpp"
#include "switchyard/model.hpp"
#include "switchyard/plugin.hpp"
#include "switchyard/reference.hpp"
#include "switchyard/runtime.hpp"

using namespace switchyard;

namespace {

struct Difference {
  float worst = 0;    ///< max |y - reference|
  float largest = 0;  ///< max |reference|
};

/// NCCL at world 1.
std::shared_ptr<Transport> nccl_world_1(PluginRegistry& registry) {
  Config config;
  const ConfigSection runtime_options =
      config.section("runtime", registry.options(PluginKind::kTransport, "nccl"));
  TransportCreateArgs transport_args;
  transport_args.options = &runtime_options;
  transport_args.timeout_s = 60;
  return registry.create_transport("nccl", transport_args)[0];
}

/// One forward of the layer (`transport`, the CUDA data path, cuda_swiglu with
/// `expert_options`, top-K routing on the host) on tokens x [T,H], against
/// dense_moe_reference on the plan the layer used (x copied: views of it are writable).
Difference layer_against_reference(PluginRegistry& registry, Transport& transport,
                                   const ModelWeights& model, int K, std::vector<float> x,
                                   PayloadDType payload, DType combine,
                                   const ConfigSection* expert_options) {
  const int E = model.num_experts();
  const std::int64_t H = model.hidden(), T = static_cast<std::int64_t>(x.size()) / H;
  Config config;
  config.set("router", "top_k", std::int64_t{K});
  const ConfigSection router_options =
      config.section("router", registry.options(PluginKind::kRouter, "topk"));
  RouterCreateArgs router_args;
  router_args.options = &router_options;
  router_args.num_experts = E;
  const auto experts = model.experts(0, E);
  ExpertCreateArgs expert_args;
  expert_args.options = expert_options;
  expert_args.hidden = static_cast<int>(H);
  expert_args.ffn_hidden = model.ffn_hidden();
  expert_args.experts = experts;
  test::DeviceArray<float> d_x(x), d_y(x.size());

  MoELayerParts parts;
  parts.transport = &transport;
  parts.router = registry.create_router("topk", router_args);
  parts.experts = registry.create_expert("cuda_swiglu", expert_args);
  REQUIRE(parts.experts->capabilities().input_dtype == model.experts(0, 1)[0].gate.dtype());
  parts.gate = model.gate().view();
  parts.placement = ExpertPlacement(E, 1);
  parts.data_path = registry.create_data_path("cuda", DataPathCreateArgs{});
  parts.payload_dtype = payload;
  parts.combine_dtype = combine;
  MoELayer layer(parts);
  d_y.poison();
  layer.forward(TensorView(d_x.get(), DType::kF32, {T, H}, Device::cuda(0)),
                TensorView(d_y.get(), DType::kF32, {T, H}, Device::cuda(0)));
  const auto got = d_y.to_host_as_returned();  // forward returns when y is written

  // The plan the layer used, back on the host, and the reference on it.
  const RoutingPlan& device_plan = layer.last_plan();
  RoutingPlan plan;
  plan.num_tokens = device_plan.num_tokens;
  plan.slots = device_plan.slots;
  plan.experts.resize(device_plan.experts.size());
  plan.weights.resize(device_plan.weights.size());
  SWITCHYARD_CUDA_CHECK(cudaMemcpy(plan.experts.data(), device_plan.experts.data(),
                                   plan.experts.size() * sizeof(std::int32_t),
                                   cudaMemcpyDeviceToHost));
  SWITCHYARD_CUDA_CHECK(cudaMemcpy(plan.weights.data(), device_plan.weights.data(),
                                   plan.weights.size() * sizeof(float), cudaMemcpyDeviceToHost));
  std::vector<float> expected(x.size());
  dense_moe_reference(model, plan, TensorView(x.data(), DType::kF32, {T, H}),
                      TensorView(expected.data(), DType::kF32, {T, H}));
  Difference d;
  for (float v : expected) d.largest = std::max(d.largest, std::fabs(v));
  for (std::size_t i = 0; i < got.size(); ++i) {
    REQUIRE(std::isfinite(got[i]));
    d.worst = std::max(d.worst, std::fabs(got[i] - expected[i]));
  }
  MESSAGE("largest |difference| " << d.worst << " of max |y| " << d.largest);
  return d;
}

std::vector<float> random_tokens(std::int64_t T, std::int64_t H) {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(static_cast<std::size_t>(T * H));
  for (auto& v : x) {
    while (v == 0) v = normal(rng);
  }
  return x;
}

}  // namespace

TEST_CASE("MoELayer on a GPU at world 1 equals the dense reference") {
  static PluginRegistry registry(PluginRegistry::default_search_path());
  const int E = 16, H = 256, F = 384, K = 2;
  const std::vector<float> x = random_tokens(300, H);
  auto transport = nccl_world_1(registry);
  // f32 experts (f32 rows and GEMMs), and bf16 experts: the layer groups the rows straight
  // into bf16 for them (cuda_swiglu's input_dtype), the GEMMs run on tensor cores, and the
  // reduce reads their bf16 outputs (output_dtype).
  for (DType expert_dtype : {DType::kF32, DType::kBF16}) {
    CAPTURE(dtype_name(expert_dtype));
    const ModelWeights model = ModelWeights::random(E, H, F, 11, expert_dtype);
    for (PayloadDType payload : {PayloadDType::kF32, PayloadDType::kBF16, PayloadDType::kFP8}) {
      for (DType combine : {DType::kF32, DType::kBF16}) {
        CAPTURE(payload_dtype_name(payload));
        CAPTURE(static_cast<int>(combine));
        const Difference d =
            layer_against_reference(registry, *transport, model, K, x, payload, combine, nullptr);
        // f32 end to end: float32 accumulation only. bf16 anywhere: bf16 rounding (2^-8
        // relative); fp8 payloads: E4M3's 2^-4 relative per element of the rows.
        const bool bf16 = payload == PayloadDType::kBF16 || combine == DType::kBF16 ||
                          expert_dtype == DType::kBF16;
        const float relative = payload == PayloadDType::kFP8 ? 0.1f : bf16 ? 2e-2f : 1e-4f;
        CHECK(d.worst <= relative * d.largest);
      }
    }
  }
}

TEST_CASE("the layer with cuda_swiglu's batched and grouped GEMMs equals the dense reference") {
  // 1200 tokens, top-2 of 8 experts: about 300 rows an expert, so the batched split makes
  // steps of 128 rows across experts and short rests; the grouped split, every expert in
  // one call and in calls of at most three.
  static PluginRegistry registry(PluginRegistry::default_search_path());
  const int E = 8, H = 128, F = 192, K = 2;
  const ModelWeights model = ModelWeights::random(E, H, F, 13, DType::kBF16);
  auto transport = nccl_world_1(registry);
  for (const auto& [gemm, batch_experts] :
       {std::pair{"batched", std::int64_t{0}}, std::pair{"grouped", std::int64_t{0}},
        std::pair{"grouped", std::int64_t{3}}}) {
    CAPTURE(gemm);
    CAPTURE(batch_experts);
    Config config;
    config.set("experts", "gemm", std::string(gemm));
    config.set("experts", "batch_experts", batch_experts);
    const ConfigSection split =
        config.section("experts", registry.options(PluginKind::kExpert, "cuda_swiglu"));
    const Difference d =
        layer_against_reference(registry, *transport, model, K, random_tokens(1200, H),
                                PayloadDType::kBF16, DType::kF32, &split);
    CHECK(d.worst <= 2e-2f * d.largest);
  }
}

TEST_CASE("several ranks on one GPU: in-process ranks over host staging equal the reference") {
  // Worlds 1-4 of in-process ranks (threads) share GPU 0: the CUDA data path and
  // cuda_swiglu on each, the rows between them through pinned host memory (inproc takes
  // no device memory). Device tokens, read back as soon as forward returns; and host
  // tokens staged by the runtime. f32 weights and payload: float32 accumulation only.
  const std::int64_t T = 257, H = 128;
  const std::vector<float> x = random_tokens(T, H);
  std::vector<float> world_1;
  for (const int ranks : {1, 2, 4}) {
    CAPTURE(ranks);
    Config config;
    config.set("runtime", "transport", std::string("inproc"));
    config.set("runtime", "ranks", std::int64_t{ranks});
    config.set("runtime", "data_path", std::string("cuda"));
    config.set("runtime", "timeout_s", 60.0);
    config.set("experts", "kernel", std::string("cuda_swiglu"));
    config.set("router", "top_k", std::int64_t{2});
    config.set("model", "num_experts", std::int64_t{8});
    config.set("model", "hidden", H);
    config.set("model", "ffn_hidden", std::int64_t{192});
    Runtime runtime(config);
    test::DeviceArray<float> d_x(x), d_y(x.size());
    d_y.poison();
    runtime.forward(TensorView(d_x.get(), DType::kF32, {T, H}, Device::cuda(0)),
                    TensorView(d_y.get(), DType::kF32, {T, H}, Device::cuda(0)));
    const std::vector<float> got = d_y.to_host_as_returned();  // written when forward returned
    std::vector<float> staged(x.size()), expected(x.size());
    runtime.forward(TensorView(const_cast<float*>(x.data()), DType::kF32, {T, H}),
                    TensorView(staged.data(), DType::kF32, {T, H}));
    runtime.reference_forward(TensorView(const_cast<float*>(x.data()), DType::kF32, {T, H}),
                              TensorView(expected.data(), DType::kF32, {T, H}));
    float worst = 0, largest = 0;
    for (std::size_t i = 0; i < got.size(); ++i) {
      REQUIRE(std::isfinite(got[i]));
      largest = std::max(largest, std::fabs(expected[i]));
      worst = std::max(worst, std::fabs(got[i] - expected[i]));
    }
    CHECK(worst <= 1e-4f * largest);
    CHECK(std::equal(staged.begin(), staged.end(), got.begin()));
    if (ranks == 1) world_1 = got;
    float apart = 0;
    for (std::size_t i = 0; i < got.size(); ++i)
      apart = std::max(apart, std::fabs(got[i] - world_1[i]));
    CHECK(apart <= 1e-4f * largest);  // cuBLAS may tile other row counts differently
  }
}
