#include <cblas.h>
#include <doctest/doctest.h>
#include <stdlib.h>  // setenv, unsetenv

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#include "switchyard/model.hpp"
#include "switchyard/plugin.hpp"
#include "switchyard/status.hpp"
#include "test_support.hpp"

using namespace switchyard;

namespace {

std::shared_ptr<ExpertKernel> make_kernel(const ModelWeights& model, int first, int count,
                                          std::int64_t blas_threads = 0) {
  static PluginRegistry registry(PluginRegistry::default_search_path());
  Config config;
  config.set("experts", "blas_threads", blas_threads);
  const ConfigSection options =
      config.section("experts", registry.options(PluginKind::kExpert, "cpu_swiglu"));
  const auto experts = model.experts(first, count);
  ExpertCreateArgs args;
  args.options = &options;  // read when the kernel is created
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

namespace {

/// One expert's weights in double, to differentiate the test's own forward.
struct DoubleExpert {
  std::vector<double> gate, up, down;  // [F,H], [F,H], [H,F]
};

DoubleExpert widen(const SwigluExpertWeights& w) {
  auto copy = [](const TensorView& t) {
    return std::vector<double>(t.data_as<const float>(), t.data_as<const float>() + t.numel());
  };
  return {copy(w.gate), copy(w.up), copy(w.down)};
}

/// Σ_h g[h] · down(silu(gate x) ⊙ up x)[h] in double.
double weighted_output(const DoubleExpert& w, const std::vector<double>& x, const float* g,
                       std::int64_t H, std::int64_t F) {
  double sum = 0;
  std::vector<double> act(static_cast<std::size_t>(F));
  for (std::int64_t f = 0; f < F; ++f) {
    double a = 0, b = 0;
    for (std::int64_t h = 0; h < H; ++h) {
      a += w.gate[static_cast<std::size_t>(f * H + h)] * x[static_cast<std::size_t>(h)];
      b += w.up[static_cast<std::size_t>(f * H + h)] * x[static_cast<std::size_t>(h)];
    }
    act[static_cast<std::size_t>(f)] = a / (1 + std::exp(-a)) * b;
  }
  for (std::int64_t h = 0; h < H; ++h) {
    double y = 0;
    for (std::int64_t f = 0; f < F; ++f)
      y += w.down[static_cast<std::size_t>(h * F + f)] * act[static_cast<std::size_t>(f)];
    sum += g[h] * y;
  }
  return sum;
}

/// Central difference of f with respect to v[i] (one Richardson step).

}  // namespace

TEST_CASE("backward: input and weight gradients against finite differences in float64") {
  // 3 local experts (rows 3, 0, 2), H = 6, F = 5; the loss is Σ_r w_r <G_r, y_r> with
  // row weights w (one of them 0); each row's weight gradient is <G_r, y_r>.
  constexpr std::int64_t H = 6, F = 5, N = 5;
  HostStream stream;
  const ModelWeights model = ModelWeights::random(3, H, F, 8);
  auto kernel = make_kernel(model, 0, 3);
  const std::vector<std::int64_t> rows = {3, 0, 2};
  const HostTensor x = synthetic_tokens(N, H, 2);
  const HostTensor g = synthetic_tokens(N, H, 3);
  HostTensor dx(DType::kF32, {N, H});
  // The gradients start at 0.25: the kernel adds to them.
  std::vector<HostTensor> grads;
  std::vector<SwigluExpertGradients> d_weights;
  for (int e = 0; e < 3; ++e) {
    for (const auto& shape : {std::vector<std::int64_t>{F, H}, {F, H}, {H, F}}) {
      grads.emplace_back(DType::kF32, shape);
      std::fill(grads.back().data<float>(), grads.back().data<float>() + grads.back().numel(),
                0.25f);
    }
  }
  for (int e = 0; e < 3; ++e) {
    d_weights.push_back({grads[3 * e].view(), grads[3 * e + 1].view(), grads[3 * e + 2].view()});
  }
  const std::vector<float> row_weights = {0.75f, -0.5f, 1.25f, 0.0f, 0.3f};
  HostTensor w_tensor(DType::kF32, {N}), d_row_weights(DType::kF32, {N});
  std::copy(row_weights.begin(), row_weights.end(), w_tensor.data<float>());
  kernel->backward(
      {x.view(), rows, g.view(), dx.view(), d_weights, w_tensor.view(), d_row_weights.view()},
      stream);

  const auto weights = model.experts(0, 3);
  test::Agreement input, weight, row_weight;
  std::int64_t row = 0;
  for (std::size_t e = 0; e < rows.size(); ++e) {
    DoubleExpert w = widen(weights[e]);
    std::vector<std::vector<double>> xs;
    for (std::int64_t i = 0; i < rows[e]; ++i) {
      xs.emplace_back(x.data<float>() + (row + i) * H, x.data<float>() + (row + i + 1) * H);
    }
    auto loss = [&] {
      double sum = 0;
      for (std::int64_t i = 0; i < rows[e]; ++i)
        sum += row_weights[static_cast<std::size_t>(row + i)] *
               weighted_output(w, xs[static_cast<std::size_t>(i)], g.data<float>() + (row + i) * H,
                               H, F);
      return sum;
    };
    for (std::int64_t i = 0; i < rows[e]; ++i) {
      row_weight.add(d_row_weights.data<float>()[row + i],
                     weighted_output(w, xs[static_cast<std::size_t>(i)],
                                     g.data<float>() + (row + i) * H, H, F));
    }
    for (std::int64_t i = 0; i < rows[e]; ++i) {
      for (std::int64_t h = 0; h < H; ++h) {
        input.add(dx.data<float>()[(row + i) * H + h],
                  test::central_difference(xs[static_cast<std::size_t>(i)],
                                           static_cast<std::size_t>(h), loss));
      }
    }
    std::vector<double>* tensors[3] = {&w.gate, &w.up, &w.down};
    for (int which = 0; which < 3; ++which) {
      const HostTensor& got = grads[3 * e + static_cast<std::size_t>(which)];
      for (std::size_t i = 0; i < tensors[which]->size(); ++i) {
        const double expected =
            rows[e] == 0 ? 0.0 : test::central_difference(*tensors[which], i, loss);
        weight.add(got.data<float>()[i] - 0.25, expected);
      }
    }
    row += rows[e];
  }
  CHECK(input.relative() <= 1e-4);
  CHECK(weight.relative() <= 1e-4);
  CHECK(row_weight.relative() <= 1e-5);
  // An expert without rows keeps its gradients as they were.
  for (int which = 0; which < 3; ++which) {
    const HostTensor& untouched = grads[3 + static_cast<std::size_t>(which)];
    CHECK(std::all_of(untouched.data<float>(), untouched.data<float>() + untouched.numel(),
                      [](float v) { return v == 0.25f; }));
  }
}

TEST_CASE("backward: bad gradient batches are refused; identity experts pass d_output on") {
  HostStream stream;
  const ModelWeights model = ModelWeights::random(2, 8, 4, 4);
  auto kernel = make_kernel(model, 0, 2);
  HostTensor x(DType::kF32, {3, 8}), g(DType::kF32, {3, 8}), dx(DType::kF32, {3, 8});
  const std::vector<std::int64_t> rows = {1, 2};
  CHECK_THROWS_WITH_AS(kernel->backward({x.view(), rows, g.view(), dx.view(), {}, {}}, stream),
                       doctest::Contains("0 weight gradients for 2 local experts"), Error);
  HostTensor narrow(DType::kF32, {3, 7});
  CHECK_THROWS_WITH_AS(kernel->backward({x.view(), rows, narrow.view(), dx.view(), {}, {}}, stream),
                       doctest::Contains("cpu_swiglu d_output: expected f32[3,8]"), Error);
  HostTensor wrong(DType::kF32, {8, 4});  // down is [H,F] = [8,4]; gate must be [4,8]
  HostTensor gate(DType::kF32, {4, 8}), up(DType::kF32, {4, 8}), down(DType::kF32, {8, 4});
  const std::vector<SwigluExpertGradients> bad = {{wrong.view(), up.view(), down.view()},
                                                  {gate.view(), up.view(), down.view()}};
  CHECK_THROWS_WITH_AS(kernel->backward({x.view(), rows, g.view(), dx.view(), bad, {}}, stream),
                       doctest::Contains("cpu_swiglu weight gradient: expected f32[4,8]"), Error);

  HostTensor short_weights(DType::kF32, {2});
  CHECK_THROWS_WITH_AS(
      kernel->backward({x.view(), rows, g.view(), dx.view(), {}, short_weights.view()}, stream),
      doctest::Contains("cpu_swiglu row weights: expected f32[3]"), Error);

  // Identity experts: d_input = w · d_output, d w = <d_output, input>, by hand.
  IdentityExperts identity(2);
  const HostTensor d = synthetic_tokens(3, 8, 1);
  const HostTensor in = synthetic_tokens(3, 8, 2);
  HostTensor w(DType::kF32, {3}), dw(DType::kF32, {3});
  w.data<float>()[0] = 2.0f;
  w.data<float>()[1] = -1.0f;
  w.data<float>()[2] = 0.5f;
  identity.backward({in.view(), rows, d.view(), dx.view(), {}, w.view(), dw.view()}, stream);
  for (int r = 0; r < 3; ++r) {
    double dot = 0;
    for (int h = 0; h < 8; ++h) {
      CHECK(dx.data<float>()[r * 8 + h] == w.data<float>()[r] * d.data<float>()[r * 8 + h]);
      dot += double{d.data<float>()[r * 8 + h]} * in.data<float>()[r * 8 + h];
    }
    CHECK(dw.data<float>()[r] == doctest::Approx(dot).epsilon(1e-6));
  }
  identity.backward({in.view(), rows, d.view(), dx.view(), {}}, stream);  // weights 1
  CHECK(std::equal(dx.data<float>(), dx.data<float>() + 24, d.data<float>()));
}

TEST_CASE("saved projections: the forward keeps [gate·x | up·x]; the backward takes them") {
  constexpr std::int64_t H = 6, F = 5, N = 5;
  HostStream stream;
  const ModelWeights model = ModelWeights::random(3, H, F, 4);
  auto kernel = make_kernel(model, 0, 3);
  REQUIRE(kernel->capabilities().saved_columns == 2 * F);
  const std::vector<std::int64_t> rows = {2, 3, 0};
  const HostTensor x = synthetic_tokens(N, H, 5);
  const HostTensor g = synthetic_tokens(N, H, 6);
  HostTensor y(DType::kF32, {N, H}), saved(DType::kF32, {N, 2 * F});
  kernel->forward({x.view(), rows, y.view(), saved.view()}, stream);
  // Each row's projections against float64 dot products with its expert's weights.
  const auto weights = model.experts(0, 3);
  std::int64_t row = 0;
  for (std::size_t e = 0; e < rows.size(); ++e) {
    for (std::int64_t i = 0; i < rows[e]; ++i, ++row) {
      for (std::int64_t f = 0; f < F; ++f) {
        double a = 0, b = 0;
        for (std::int64_t h = 0; h < H; ++h) {
          const double xv = x.data<float>()[row * H + h];
          a += double{weights[e].gate.data_as<const float>()[f * H + h]} * xv;
          b += double{weights[e].up.data_as<const float>()[f * H + h]} * xv;
        }
        CHECK(saved.data<float>()[row * 2 * F + f] == doctest::Approx(a).epsilon(1e-5));
        CHECK(saved.data<float>()[row * 2 * F + F + f] == doctest::Approx(b).epsilon(1e-5));
      }
    }
  }
  // The backward from the saved projections: the same bits as recomputing them.
  auto gradients = [&](const TensorView& from) {
    std::vector<HostTensor> grads;
    std::vector<SwigluExpertGradients> d_weights;
    for (int e = 0; e < 3; ++e) {
      for (const auto& shape : {std::vector<std::int64_t>{F, H}, {F, H}, {H, F}})
        grads.emplace_back(DType::kF32, shape);
    }
    for (std::size_t e = 0; e < 3; ++e)
      d_weights.push_back({grads[3 * e].view(), grads[3 * e + 1].view(), grads[3 * e + 2].view()});
    HostTensor dx(DType::kF32, {N, H});
    kernel->backward({x.view(), rows, g.view(), dx.view(), d_weights, {}, {}, from}, stream);
    grads.push_back(std::move(dx));
    return grads;
  };
  const auto from_saved = gradients(saved.view());
  const auto recomputed = gradients({});
  for (std::size_t i = 0; i < from_saved.size(); ++i) {
    CHECK(std::memcmp(from_saved[i].bytes(), recomputed[i].bytes(), from_saved[i].size_bytes()) ==
          0);
  }
  // A saved tensor of the wrong width is refused.
  HostTensor narrow(DType::kF32, {N, F});
  CHECK_THROWS_WITH_AS(kernel->forward({x.view(), rows, y.view(), narrow.view()}, stream),
                       doctest::Contains("saved projections"), Error);
}

TEST_CASE("blas_threads = 0: the hardware threads divided among the ranks sharing them") {
  for (const char* set_by_user : {"OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS"}) {
    if (std::getenv(set_by_user) != nullptr) {
      MESSAGE(set_by_user << " is set, which the kernel leaves alone: nothing to check");
      return;
    }
  }
  const int hardware = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  if (hardware == 1) MESSAGE("one hardware thread: every count below is 1");
  const ModelWeights model = ModelWeights::random(3, 8, 8, 4);
  // Three ranks in this process (the inproc transport's case).
  openblas_set_num_threads(hardware);
  {
    const auto a = make_kernel(model, 0, 1), b = make_kernel(model, 1, 1),
               c = make_kernel(model, 2, 1);
    CHECK(openblas_get_num_threads() == std::max(1, hardware / 3));
  }
  // One rank of a launched job with two ranks on this node.
  setenv("RANK", "0", 1);
  setenv("WORLD_SIZE", "2", 1);
  setenv("LOCAL_RANK", "0", 1);
  setenv("LOCAL_WORLD_SIZE", "2", 1);
  openblas_set_num_threads(hardware);
  { CHECK(make_kernel(model, 0, 1) != nullptr); }
  for (const char* v : {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"}) unsetenv(v);
  CHECK(openblas_get_num_threads() == std::max(1, hardware / 2));
  // One rank alone keeps OpenBLAS's choice; a count given is taken as it is.
  openblas_set_num_threads(hardware);
  { CHECK(make_kernel(model, 0, 1) != nullptr); }
  CHECK(openblas_get_num_threads() == hardware);
  {
    const auto a = make_kernel(model, 0, 1, 1), b = make_kernel(model, 1, 1, hardware);
    CHECK(openblas_get_num_threads() == hardware);
  }
}
