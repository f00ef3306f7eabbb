// expert_cuda_swiglu against a float64 computation on the host from the same inputs: with
// f32 weights y = down(silu(gate·x) ⊙ up·x); with bf16 weights the kernel's documented
// roundings (rows, the gate and up projections and the silu·up product to bf16) are applied
// in the reference, so the remaining difference is float32 accumulation (and a projection
// that rounds the other way). Random data, never zeros; the output is poisoned with NaN
// first; experts with no rows in between. With bf16 weights the kernel also takes bf16 rows
// (what the layer hands it), which give the same bits as the f32 rows they round from, and
// writes bf16 outputs (what the layer takes from it), the reference rounded to bf16. Each
// way of splitting the GEMMs (gemm = per_expert, batched, batched with at most two experts a
// call, grouped, grouped with at most two experts a call; grouped with bf16 weights also
// rounds the outputs to bf16) on histograms that make batched steps of 128 rows, an expert
// left standing alone, and short rests.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda_test_support.hpp"
#include "switchyard/config.hpp"
#include "switchyard/plugin.hpp"

using namespace switchyard;

namespace {

float round_bf16(float v) { return bf16_to_float(float_to_bf16(v)); }

struct Expert {
  std::vector<float> gate, up, down;                // f32 values (bf16-exact when bf16)
  std::vector<std::uint16_t> gate16, up16, down16;  // bf16 bits
};

std::vector<float> reference(const std::vector<float>& x, const std::vector<std::int64_t>& rows,
                             const std::vector<Expert>& experts, std::int64_t H, std::int64_t F,
                             bool bf16, bool bf16_out) {
  std::vector<float> y(x.size());
  std::int64_t row = 0;
  for (std::size_t e = 0; e < experts.size(); ++e) {
    for (std::int64_t i = 0; i < rows[e]; ++i, ++row) {
      std::vector<double> act(static_cast<std::size_t>(F));
      for (std::int64_t f = 0; f < F; ++f) {
        double g = 0, u = 0;
        for (std::int64_t h = 0; h < H; ++h) {
          const double xv = bf16 ? round_bf16(x[static_cast<std::size_t>(row * H + h)])
                                 : x[static_cast<std::size_t>(row * H + h)];
          g += xv * experts[e].gate[static_cast<std::size_t>(f * H + h)];
          u += xv * experts[e].up[static_cast<std::size_t>(f * H + h)];
        }
        if (bf16) {
          g = round_bf16(static_cast<float>(g));
          u = round_bf16(static_cast<float>(u));
        }
        const double a = g / (1.0 + std::exp(-g)) * u;
        act[static_cast<std::size_t>(f)] = bf16 ? round_bf16(static_cast<float>(a)) : a;
      }
      for (std::int64_t h = 0; h < H; ++h) {
        double sum = 0;
        for (std::int64_t f = 0; f < F; ++f)
          sum += act[static_cast<std::size_t>(f)] *
                 experts[e].down[static_cast<std::size_t>(h * F + f)];
        y[static_cast<std::size_t>(row * H + h)] =
            bf16_out ? round_bf16(static_cast<float>(sum)) : static_cast<float>(sum);
      }
    }
  }
  return y;
}

}  // namespace

TEST_CASE("cuda_swiglu equals a float64 SwiGLU, with f32 and with bf16 weights, each split") {
  static PluginRegistry registry(PluginRegistry::default_search_path());
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  struct Case {
    std::int64_t H, F;
    std::vector<std::int64_t> rows;
  };
  // Each way of splitting the GEMMs: per expert; batched, a step in one call; batched, at
  // most two experts a call (a step cut into pieces on several streams); grouped, every
  // expert in one call; grouped, at most two experts a call.
  struct Split {
    const char* gemm;
    std::int64_t batch_experts;
  };
  // Sizes that move four elements at a time, then odd sizes (element-wise kernels) with
  // more experts than the kernel has streams (a stream reused). Then histograms over the
  // 128-row granule of the batched split: steps [0,128) of experts 0 2 3 5 and [128,256) of
  // 0 3, rests of 44, 1, 4 and 5 rows; and (odd sizes) a step of experts 0 1 4, then 4 alone.
  for (const auto& [H, F, rows] : std::vector<Case>{{96, 160, {5, 0, 17, 1}},
                                                    {35, 50, {3, 9, 0, 4, 7, 1, 12, 2, 5}},
                                                    {64, 96, {300, 0, 129, 260, 5, 128}},
                                                    {35, 50, {130, 200, 3, 0, 260}}})
    for (const Split& split : {Split{"per_expert", 0}, Split{"batched", 0}, Split{"batched", 2},
                               Split{"grouped", 0}, Split{"grouped", 2}})
      for (bool bf16 : {false, true}) {
        CAPTURE(H);
        CAPTURE(F);
        CAPTURE(split.gemm);
        CAPTURE(split.batch_experts);
        CAPTURE(bf16);
        std::int64_t N = 0;
        for (auto r : rows) N += r;
        std::vector<Expert> experts(rows.size());
        std::vector<SwigluExpertWeights> views;
        for (auto& e : experts) {
          auto fill = [&](std::vector<float>& v, std::vector<std::uint16_t>& bits, std::size_t n,
                          float scale) {
            v.resize(n);
            bits.resize(n);
            for (std::size_t i = 0; i < n; ++i) {
              float w = 0;
              while (w == 0) w = normal(rng) * scale;
              bits[i] = float_to_bf16(w);
              v[i] = bf16 ? bf16_to_float(bits[i]) : w;
            }
          };
          fill(e.gate, e.gate16, static_cast<std::size_t>(F * H), 0.1f);
          fill(e.up, e.up16, static_cast<std::size_t>(F * H), 0.1f);
          fill(e.down, e.down16, static_cast<std::size_t>(H * F), 0.1f);
          if (bf16) {
            views.push_back({TensorView(e.gate16.data(), DType::kBF16, {F, H}),
                             TensorView(e.up16.data(), DType::kBF16, {F, H}),
                             TensorView(e.down16.data(), DType::kBF16, {H, F})});
          } else {
            views.push_back({TensorView(e.gate.data(), DType::kF32, {F, H}),
                             TensorView(e.up.data(), DType::kF32, {F, H}),
                             TensorView(e.down.data(), DType::kF32, {H, F})});
          }
        }
        Config config;
        config.set("experts", "gemm", std::string(split.gemm));
        config.set("experts", "batch_experts", split.batch_experts);
        const ConfigSection options =
            config.section("experts", registry.options(PluginKind::kExpert, "cuda_swiglu"));
        ExpertCreateArgs args;
        args.options = &options;
        args.hidden = static_cast<int>(H);
        args.ffn_hidden = static_cast<int>(F);
        args.experts = views;
        auto kernel = registry.create_expert("cuda_swiglu", args);
        CHECK(kernel->capabilities().execution.device_memory);
        CHECK(kernel->capabilities().input_dtype == (bf16 ? DType::kBF16 : DType::kF32));

        std::vector<float> x(static_cast<std::size_t>(N * H));
        for (auto& v : x) {
          while (v == 0) v = normal(rng);
        }
        test::DeviceArray<float> d_x(x), d_y(x.size());
        d_y.poison();
        test::CudaStream stream;
        ExpertBatch batch;
        batch.input = TensorView(d_x.get(), DType::kF32, {N, H}, Device::cuda(0));
        batch.rows_per_expert = rows;
        batch.output = TensorView(d_y.get(), DType::kF32, {N, H}, Device::cuda(0));
        kernel->forward(batch, stream);
        stream.synchronize();
        const auto got = d_y.to_host();
        const bool bf16_out = bf16 && std::string(split.gemm) == "grouped";
        const auto expected = reference(x, rows, experts, H, F, bf16, bf16_out);
        float largest = 0;
        for (float v : expected) largest = std::max(largest, std::fabs(v));
        const float tolerance = (bf16 ? 1e-2f : 1e-4f) * largest;
        float worst = 0;
        for (std::size_t i = 0; i < got.size(); ++i) {
          REQUIRE(std::isfinite(got[i]));
          worst = std::max(worst, std::fabs(got[i] - expected[i]));
        }
        MESSAGE("largest |difference| " << worst << " of max |y| " << largest);
        CHECK(worst <= tolerance);

        if (!bf16) {
          // F32 weights take f32 rows and write f32 outputs only.
          CHECK(kernel->capabilities().output_dtype == DType::kF32);
          batch.output = TensorView(d_y.get(), DType::kBF16, {N, H}, Device::cuda(0));
          CHECK_THROWS_AS(kernel->forward(batch, stream), Error);
          batch.output = TensorView(d_y.get(), DType::kF32, {N, H}, Device::cuda(0));
          batch.input = TensorView(d_x.get(), DType::kBF16, {N, H}, Device::cuda(0));
          CHECK_THROWS_AS(kernel->forward(batch, stream), Error);
          continue;
        }
        std::vector<std::uint16_t> x16(x.size());
        for (std::size_t i = 0; i < x.size(); ++i) x16[i] = float_to_bf16(x[i]);
        test::DeviceArray<std::uint16_t> d_x16(x16);
        d_y.poison();
        batch.input = TensorView(d_x16.get(), DType::kBF16, {N, H}, Device::cuda(0));
        kernel->forward(batch, stream);
        stream.synchronize();
        const auto from_bf16_rows = d_y.to_host();
        CHECK(std::memcmp(from_bf16_rows.data(), got.data(), got.size() * sizeof(float)) == 0);

        // BF16 outputs (what the layer hands it: output_dtype): the float64 SwiGLU rounded
        // to bf16, within the same tolerance; the grouped split's are the bits it widens for
        // f32 outputs.
        CHECK(kernel->capabilities().output_dtype == DType::kBF16);
        test::DeviceArray<std::uint16_t> d_y16(x.size());
        d_y16.poison();
        batch.output = TensorView(d_y16.get(), DType::kBF16, {N, H}, Device::cuda(0));
        kernel->forward(batch, stream);
        stream.synchronize();
        const auto got16 = d_y16.to_host();
        const auto expected16 = reference(x, rows, experts, H, F, bf16, /*bf16_out=*/true);
        float worst16 = 0;
        for (std::size_t i = 0; i < got16.size(); ++i) {
          const float v = bf16_to_float(got16[i]);
          REQUIRE(std::isfinite(v));
          worst16 = std::max(worst16, std::fabs(v - expected16[i]));
          if (bf16_out) REQUIRE(got16[i] == float_to_bf16(got[i]));
        }
        MESSAGE("bf16 outputs: largest |difference| " << worst16);
        CHECK(worst16 <= tolerance);
      }
}
