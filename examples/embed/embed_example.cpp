// Embedding Switchyard in a C++ program: build a runtime from a configuration, run the
// MoE layer forward on 2 in-process ranks, and check it against the dense reference.
// Then use dispatch and combine on their own, as a framework with its own expert
// computation (and autograd) would.
#include <atomic>
#include <cmath>
#include <cstdio>
#include <vector>

#include <switchyard/model.hpp>
#include <switchyard/runtime.hpp>
#include <switchyard/status.hpp>

int main() {
  try {
    switchyard::Config config = switchyard::Config::from_string(R"(
      [runtime]
      transport = "inproc"
      ranks = 2
      [router]
      policy = "topk"
      top_k = 2
      [model]
      num_experts = 4
      hidden = 32
      ffn_hidden = 64
    )",
                                                                "embedded.toml");
    config.set("model", "seed", std::int64_t{7});  // API values override the text
    switchyard::Runtime runtime(config);

    const int hidden = runtime.model().hidden();
    switchyard::HostTensor x = switchyard::synthetic_tokens(100, hidden, /*seed=*/3);
    switchyard::HostTensor y(switchyard::DType::kF32, {100, hidden});
    switchyard::HostTensor reference(switchyard::DType::kF32, {100, hidden});
    runtime.forward(x.view(), y.view());
    runtime.reference_forward(x.view(), reference.view());

    double diff = 0, scale = 0;
    for (std::int64_t i = 0; i < y.numel(); ++i) {
      diff = std::max(
          diff, static_cast<double>(std::fabs(y.data<float>()[i] - reference.data<float>()[i])));
      scale = std::max(scale, static_cast<double>(std::fabs(reference.data<float>()[i])));
    }
    std::printf("forward on %d ranks: max relative difference to the reference %.3g\n",
                runtime.world_size(), diff / scale);
    if (!(diff / scale <= 1e-5)) return 1;

    // dispatch / combine with the caller's own "experts": here the identity, so each token
    // comes back as (sum of its routing weights) * x.
    const std::int64_t T = 10;
    std::atomic<bool> ok{true};
    runtime.run_on_ranks([&](int local) {
      switchyard::MoELayer& layer = runtime.layer(local);
      switchyard::RoutingPlan plan;
      switchyard::DispatchHandle handle;
      const auto [first, count] =
          switchyard::token_block(T, runtime.world_size(), runtime.world_rank(local));
      switchyard::TensorView tokens(x.data<float>() + first * hidden, switchyard::DType::kF32,
                                    {count, hidden});
      std::vector<float> out(static_cast<std::size_t>(count * hidden));
      switchyard::TensorView result(out.data(), switchyard::DType::kF32, {count, hidden});
      layer.route(tokens, plan);
      layer.dispatch(tokens, plan, handle);
      layer.combine(handle, handle.expert_input(), result);  // identity experts
      for (std::int64_t t = 0; t < count; ++t) {
        float weight_sum = 0;
        for (int j = 0; j < plan.slots; ++j)
          weight_sum += plan.weights[static_cast<std::size_t>(t * plan.slots + j)];
        for (int h = 0; h < hidden; ++h) {
          const float expected = weight_sum * tokens.data_as<float>()[t * hidden + h];
          if (std::fabs(out[static_cast<std::size_t>(t * hidden + h)] - expected) > 1e-5f)
            ok = false;
        }
      }
    });
    std::printf("dispatch/combine with identity experts: %s\n", ok.load() ? "ok" : "MISMATCH");
    return ok.load() ? 0 : 1;
  } catch (const switchyard::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
