// The whole EP layer on one GPU at world 1 — NCCL, the CUDA data path, cuda_swiglu, a host
// router fed a copy of the logits — against the dense float64 reference on the same plan
// (dense_moe_reference: plain loops, independent of every plugin). Payloads f32, bf16 and
// fp8; partial sums f32 and bf16; f32 and bf16 experts. Random weights and tokens; the output
// poisoned first.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "cuda_test_support.hpp"
#include "switchyard/layer.hpp"
#include "switchyard/model.hpp"
#include "switchyard/plugin.hpp"
#include "switchyard/reference.hpp"

using namespace switchyard;

TEST_CASE("MoELayer on a GPU at world 1 equals the dense reference") {
  static PluginRegistry registry(PluginRegistry::default_search_path());
  const int E = 16, H = 256, F = 384, K = 2;
  const std::int64_t T = 300;
  // f32 experts (f32 rows and GEMMs), and bf16 experts: the layer groups the rows straight
  // into bf16 for them (cuda_swiglu's input_dtype) and the GEMMs run on tensor cores.
  for (DType expert_dtype : {DType::kF32, DType::kBF16}) {
    CAPTURE(dtype_name(expert_dtype));
    const ModelWeights model = ModelWeights::random(E, H, F, 11, expert_dtype);

    Config config;
    config.set("router", "top_k", std::int64_t{K});
    const ConfigSection runtime_options =
        config.section("runtime", registry.options(PluginKind::kTransport, "nccl"));
    TransportCreateArgs transport_args;
    transport_args.options = &runtime_options;
    transport_args.timeout_s = 60;
    auto transport = registry.create_transport("nccl", transport_args)[0];
    const ConfigSection router_options =
        config.section("router", registry.options(PluginKind::kRouter, "topk"));
    RouterCreateArgs router_args;
    router_args.options = &router_options;
    router_args.num_experts = E;
    const auto experts = model.experts(0, E);
    ExpertCreateArgs expert_args;
    expert_args.hidden = H;
    expert_args.ffn_hidden = F;
    expert_args.experts = experts;
    REQUIRE(registry.create_expert("cuda_swiglu", expert_args)->input_dtype() == expert_dtype);

    std::mt19937 rng(5);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> x(static_cast<std::size_t>(T * H));
    for (auto& v : x) {
      while (v == 0) v = normal(rng);
    }
    test::DeviceArray<float> d_x(x), d_y(x.size());

    for (PayloadDType payload : {PayloadDType::kF32, PayloadDType::kBF16, PayloadDType::kFP8}) {
      for (DType combine : {DType::kF32, DType::kBF16}) {
        CAPTURE(payload_dtype_name(payload));
        CAPTURE(static_cast<int>(combine));
        MoELayerParts parts;
        parts.transport = transport.get();
        parts.router = registry.create_router("topk", router_args);
        parts.experts = registry.create_expert("cuda_swiglu", expert_args);
        parts.gate = model.gate().view();
        parts.placement = ExpertPlacement(E, 1);
        parts.data_path = registry.create_data_path("cuda", DataPathCreateArgs{});
        parts.payload_dtype = payload;
        parts.combine_dtype = combine;
        MoELayer layer(parts);
        d_y.poison();
        layer.forward(TensorView(d_x.get(), DType::kF32, {T, H}, Device::cuda(0)),
                      TensorView(d_y.get(), DType::kF32, {T, H}, Device::cuda(0)));
        const auto got = d_y.to_host();

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
                                         plan.weights.size() * sizeof(float),
                                         cudaMemcpyDeviceToHost));
        std::vector<float> expected(x.size());
        dense_moe_reference(model, plan, TensorView(x.data(), DType::kF32, {T, H}),
                            TensorView(expected.data(), DType::kF32, {T, H}));
        float largest = 0, worst = 0;
        for (float v : expected) largest = std::max(largest, std::fabs(v));
        for (std::size_t i = 0; i < got.size(); ++i) {
          REQUIRE(std::isfinite(got[i]));
          worst = std::max(worst, std::fabs(got[i] - expected[i]));
        }
        // f32 end to end: float32 accumulation only. bf16 anywhere: bf16 rounding (2^-8
        // relative); fp8 payloads: E4M3's 2^-4 relative per element of the rows.
        const bool bf16 = payload == PayloadDType::kBF16 || combine == DType::kBF16 ||
                          expert_dtype == DType::kBF16;
        const float relative = payload == PayloadDType::kFP8 ? 0.1f : bf16 ? 2e-2f : 1e-4f;
        MESSAGE("largest |difference| " << worst << " of max |y| " << largest);
        CHECK(worst <= relative * largest);
      }
    }
  }
}
