#include <doctest/doctest.h>

#include <cmath>

#include "switchyard/model.hpp"
#include "switchyard/plugin.hpp"
#include "switchyard/status.hpp"

using namespace switchyard;

namespace {

std::shared_ptr<ExpertKernel> make_kernel(const ModelWeights& model, int first, int count) {
  static PluginRegistry registry(PluginRegistry::default_search_path());
  static const ConfigSection options =
      Config().section("experts", registry.options(PluginKind::kExpert, "cpu_swiglu"));
  const auto experts = model.experts(first, count);
  ExpertCreateArgs args;
  args.options = &options;
  args.hidden = model.hidden();
  args.ffn_hidden = model.ffn_hidden();
  args.experts = experts;
  return registry.create_expert("cpu_swiglu", args);
}

/// down(silu(gate x) * up x) for one row, in double.
std::vector<double> swiglu(const SwigluExpertWeights& w, const float* x, std::int64_t H,
                           std::int64_t F) {
  std::vector<double> act(static_cast<std::size_t>(F)), y(static_cast<std::size_t>(H), 0.0);
  for (std::int64_t f = 0; f < F; ++f) {
    double g = 0, u = 0;
    for (std::int64_t h = 0; h < H; ++h) {
      g += static_cast<double>(w.gate.data_as<float>()[f * H + h]) * x[h];
      u += static_cast<double>(w.up.data_as<float>()[f * H + h]) * x[h];
    }
    act[static_cast<std::size_t>(f)] = g / (1 + std::exp(-g)) * u;
  }
  for (std::int64_t h = 0; h < H; ++h) {
    for (std::int64_t f = 0; f < F; ++f)
      y[static_cast<std::size_t>(h)] +=
          w.down.data_as<float>()[h * F + f] * act[static_cast<std::size_t>(f)];
  }
  return y;
}

}  // namespace

TEST_CASE("grouped SwiGLU matches the per-row formula, empty groups included") {
  HostStream stream;
  const ModelWeights model = ModelWeights::random(6, 20, 36, 4);
  auto kernel = make_kernel(model, 2, 3);  // experts 2, 3, 4
  CHECK(kernel->num_local_experts() == 3);
  const std::vector<std::int64_t> rows = {4, 0, 7};
  const HostTensor x = synthetic_tokens(11, 20, 5);
  HostTensor y(DType::kF32, {11, 20});
  kernel->forward({x.view(), rows, y.view()}, stream);
  const auto weights = model.experts(2, 3);
  std::int64_t row = 0;
  for (std::size_t e = 0; e < rows.size(); ++e) {
    for (std::int64_t i = 0; i < rows[e]; ++i, ++row) {
      const auto expected = swiglu(weights[e], x.data<float>() + row * 20, 20, 36);
      for (int h = 0; h < 20; ++h) {
        CHECK(y.data<float>()[row * 20 + h] ==
              doctest::Approx(expected[static_cast<std::size_t>(h)]).epsilon(1e-5));
      }
    }
  }
  // No rows at all is fine.
  HostTensor empty_x(DType::kF32, {0, 20}), empty_y(DType::kF32, {0, 20});
  const std::vector<std::int64_t> none = {0, 0, 0};
  CHECK_NOTHROW(kernel->forward({empty_x.view(), none, empty_y.view()}, stream));
}

TEST_CASE("bad batches are refused") {
  HostStream stream;
  const ModelWeights model = ModelWeights::random(2, 8, 8, 4);
  auto kernel = make_kernel(model, 0, 2);
  HostTensor x(DType::kF32, {3, 8}), y(DType::kF32, {3, 8});
  const std::vector<std::int64_t> wrong_sum = {1, 1};
  CHECK_THROWS_WITH_AS(kernel->forward({x.view(), wrong_sum, y.view()}, stream),
                       doctest::Contains("row counts sum to 2"), Error);
  const std::vector<std::int64_t> wrong_len = {3};
  CHECK_THROWS_WITH_AS(kernel->forward({x.view(), wrong_len, y.view()}, stream),
                       doctest::Contains("1 row counts for 2"), Error);
  HostTensor narrow(DType::kF32, {3, 7});
  const std::vector<std::int64_t> ok = {1, 2};
  CHECK_THROWS_AS(kernel->forward({narrow.view(), ok, y.view()}, stream), Error);
}
