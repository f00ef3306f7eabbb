// Once steps of the largest sizes have run, MoELayer::forward allocates nothing: every
// buffer is reused, by one layer and by all the layers of a model. Checked with replaced operator
// new and malloc & co. that count the allocations of every thread (the stream's progress thread
// too) while the ranks are inside forward().
#include <doctest/doctest.h>

#include <barrier>
#include <cstdlib>
#include <functional>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "allocation_counter.hpp"
#include "switchyard/io.hpp"
#include "switchyard/runtime.hpp"
#include "test_support.hpp"

using namespace switchyard;

TEST_CASE("the counter sees allocations, also those made inside libswitchyard") {
  test::start_counting_allocations();
  void* p = ::operator new(64);
  const long explicit_new = test::stop_counting_allocations().ours;
  ::operator delete(p);
  CHECK(explicit_new == 1);
  test::start_counting_allocations();
  const Topology t = Topology::uniform(6, 2);  // builds a std::vector in the library
  const long in_library = test::stop_counting_allocations().ours;
  CHECK(t.num_nodes() == 3);
  CHECK(in_library >= 1);
#if !defined(__SANITIZE_ADDRESS__)
  // malloc on another thread counts too.
  test::start_counting_allocations();
  std::thread([] {
    void* q = std::malloc(32);
    std::free(q);
  }).join();
  CHECK(test::stop_counting_allocations().ours >= 2);  // the thread's state and the malloc
#endif
}

namespace {

/// Each local rank's gradients: the gate's [E,H] and its local experts'.
struct RankGradients {
  std::vector<HostTensor> gates;
  std::vector<ExpertGradientStorage> experts;
  RankGradients(Runtime& runtime, std::int64_t E, std::int64_t H, std::int64_t F) {
    for (int r = 0; r < runtime.num_local_ranks(); ++r) {
      gates.emplace_back(DType::kF32, std::vector<std::int64_t>{E, H});
      experts.emplace_back(runtime.layer(r).placement().num_local(r), H, F);
    }
  }
};

/// Warms up with `step` on x then x2 on every local rank, then counts the allocations of
/// three more steps (x2, x, x2) on every thread while all ranks are inside them: none.
void check_steps_allocate_nothing(Runtime& runtime, const HostTensor& x, const HostTensor& x2,
                                  const std::function<void(const HostTensor&, int)>& step) {
  for (const HostTensor* input : {&x, &x2}) {
    runtime.run_on_ranks([&](int local) { step(*input, local); });
  }
  for (const HostTensor* input : {&x2, &x, &x2}) {
    // The rank threads exist before counting starts and end after it stops.
    std::barrier sync(runtime.num_local_ranks());
    test::AllocationCounts counts;
    runtime.run_on_ranks([&](int local) {
      sync.arrive_and_wait();
      if (local == 0) test::start_counting_allocations();
      sync.arrive_and_wait();
      step(*input, local);
      sync.arrive_and_wait();
      if (local == 0) counts = test::stop_counting_allocations();
    });
    CHECK(counts.ours == 0);
    CHECK(counts.vendor == 0);
  }
}

}  // namespace

TEST_CASE("forward allocates nothing after the first steps, on any thread") {
  for (auto [ranks, async] : {std::pair{1, false}, std::pair{3, false}, std::pair{3, true}}) {
    CAPTURE(ranks);
    CAPTURE(async);
    Config config;
    config.set("runtime", "ranks", std::int64_t{ranks});
    config.set("runtime", "inproc_async", async);
    config.set("router", "top_k", std::int64_t{2});
    config.set("model", "num_experts", std::int64_t{6});
    Runtime runtime(config);
    const std::int64_t T = 50;
    const int H = runtime.model().hidden();
    const HostTensor x = synthetic_tokens(T, H, 1);
    const HostTensor x2 = synthetic_tokens(T, H, 2);  // other tokens, other routing
    HostTensor y(DType::kF32, {T, H});
    // Warm-up: buffers grow to the largest sizes these inputs need.
    runtime.forward(x.view(), y.view());
    runtime.forward(x2.view(), y.view());

    for (const HostTensor* input : {&x2, &x, &x2}) {
      // The rank threads exist before counting starts and end after it stops.
      std::barrier sync(ranks);
      test::AllocationCounts counts;
      runtime.run_on_ranks([&](int local) {
        const auto [first, count] = token_block(T, runtime.world_size(), runtime.world_rank(local));
        TensorView in(const_cast<float*>(input->data<float>()) + first * H, DType::kF32,
                      {count, H});
        TensorView out(y.data<float>() + first * H, DType::kF32, {count, H});
        sync.arrive_and_wait();
        if (local == 0) test::start_counting_allocations();
        sync.arrive_and_wait();
        runtime.layer(local).forward(in, out);
        sync.arrive_and_wait();
        if (local == 0) counts = test::stop_counting_allocations();
      });
      CHECK(counts.ours == 0);
      CHECK(counts.vendor == 0);  // OpenBLAS does not allocate per call here
    }
  }
}

TEST_CASE("a training step (forward and backward) allocates nothing after the first steps") {
  // Training mode: the forward keeps its rows and projections (recompute off), or not.
  for (const bool recompute : {false, true})
    for (const int ranks : {1, 3}) {
      CAPTURE(recompute);
      CAPTURE(ranks);
      Config config;
      config.set("runtime", "ranks", std::int64_t{ranks});
      config.set("runtime", "recompute", recompute);
      config.set("router", "top_k", std::int64_t{2});
      config.set("router", "aux_loss_coeff", 0.01);
      config.set("model", "num_experts", std::int64_t{6});
      Runtime runtime(config);
      runtime.set_training(true);
      const std::int64_t T = 50;
      const int H = runtime.model().hidden(), E = 6, F = runtime.model().ffn_hidden();
      const HostTensor x = synthetic_tokens(T, H, 1);
      const HostTensor x2 = synthetic_tokens(T, H, 2);
      const HostTensor dy = synthetic_tokens(T, H, 3);
      HostTensor y(DType::kF32, {T, H}), dx(DType::kF32, {T, H});
      const RankGradients grads(runtime, E, H, F);  // allocated once here
      auto step = [&](const HostTensor& input, int local) {
        const auto [first, count] = token_block(T, ranks, local);
        TensorView in(const_cast<float*>(input.data<float>()) + first * H, DType::kF32, {count, H});
        TensorView grad(const_cast<float*>(dy.data<float>()) + first * H, DType::kF32, {count, H});
        LayerGradients out;
        out.dx = TensorView(dx.data<float>() + first * H, DType::kF32, {count, H});
        out.d_experts = grads.experts[static_cast<std::size_t>(local)].views();
        out.d_gate = grads.gates[static_cast<std::size_t>(local)].view();
        runtime.layer(local).forward(
            in, TensorView(y.data<float>() + first * H, DType::kF32, {count, H}));
        runtime.layer(local).backward(in, grad, out);
      };
      check_steps_allocate_nothing(runtime, x, x2, step);
    }
}

namespace {

/// A 2-layer checkpoint (layers 1 and 2, DeepSeek naming) whose experts are FP8 with block
/// scales and whose layers have a sigmoid-gated shared expert: the values are the random
/// model's, rounded; only the paths they take matter here.
std::filesystem::path write_fp8_shared_checkpoint(const std::filesystem::path& dir, int E, int H,
                                                  int F) {
  std::map<std::string, HostTensor> tensors;
  auto fp8 = [](const TensorView& w) {
    HostTensor codes(DType::kF8E4M3, {w.dim(0), w.dim(1)});
    for (std::int64_t i = 0; i < w.numel(); ++i)
      codes.data<std::uint8_t>()[i] = float_to_fp8_e4m3(w.data_as<const float>()[i] * 64);
    HostTensor scales(DType::kF32, {(w.dim(0) + 127) / 128, (w.dim(1) + 127) / 128});
    std::fill_n(scales.data<float>(), scales.numel(), 1.0f / 64);
    return std::pair{std::move(codes), std::move(scales)};
  };
  for (const int layer : {1, 2}) {
    const ModelWeights m = ModelWeights::random(E, H, F, static_cast<std::uint64_t>(layer));
    const std::string p = "model.layers." + std::to_string(layer) + ".mlp.";
    tensors.emplace(p + "gate.weight", m.gate());
    for (int e = 0; e < E; ++e) {
      const SwigluExpertWeights w = m.experts(e, 1)[0];
      const TensorView parts[3] = {w.gate, w.up, w.down};
      for (int which = 0; which < 3; ++which) {
        auto [codes, scales] = fp8(parts[which]);
        const std::string name = expert_tensor_name(CheckpointFormat::kDeepseek, p, e, which);
        tensors.emplace(name, std::move(codes));
        tensors.emplace(name.substr(0, name.size() - 6) + "weight_scale_inv", std::move(scales));
      }
    }
    const SwigluExpertWeights shared = m.experts(0, 1)[0];
    const char* names[3] = {"gate_proj", "up_proj", "down_proj"};
    const TensorView parts[3] = {shared.gate, shared.up, shared.down};
    for (int which = 0; which < 3; ++which) {
      HostTensor copy(DType::kF32, {parts[which].dim(0), parts[which].dim(1)});
      std::copy_n(parts[which].data_as<const float>(), copy.numel(), copy.data<float>());
      tensors.emplace(p + "shared_expert." + names[which] + ".weight", std::move(copy));
    }
    HostTensor gate(DType::kF32, {1, H});
    std::copy_n(m.gate().data<float>(), H, gate.data<float>());
    tensors.emplace(p + "shared_expert_gate.weight", std::move(gate));
  }
  write_safetensors(dir / "model.safetensors", tensors);
  return dir / "model.safetensors";
}

}  // namespace

TEST_CASE("a model's step through all its layers allocates nothing after the first steps") {
  // Four random f32 layers, inference and training (each layer's backward in reverse after
  // the forwards of all); and two layers with FP8 experts and a shared expert, inference.
  test::TempDir dir;
  const std::filesystem::path fp8 = write_fp8_shared_checkpoint(dir.path(), 6, 64, 128);
  for (const bool checkpoint : {false, true})
    for (const bool training : {false, true})
      for (const int ranks : {1, 3}) {
        if (checkpoint && training) continue;  // shared experts run forward only
        CAPTURE(checkpoint);
        CAPTURE(training);
        CAPTURE(ranks);
        Config config;
        config.set("runtime", "ranks", std::int64_t{ranks});
        config.set("router", "top_k", std::int64_t{2});
        config.set("model", "num_experts", std::int64_t{6});
        config.set("model", "layers", std::string(checkpoint ? "1,2" : "0-3"));
        if (checkpoint) {
          config.set("model", "weights", fp8.string());
          config.set("model", "format", std::string("deepseek"));
          config.set("model", "prefix", std::string("model.layers.{layer}.mlp."));
        }
        Runtime runtime(config);
        runtime.set_training(training);
        const int L = runtime.num_layers();
        const std::int64_t T = 50;
        const int H = runtime.model().hidden(), E = 6, F = runtime.model().ffn_hidden();
        const HostTensor x = synthetic_tokens(T, H, 1);
        const HostTensor x2 = synthetic_tokens(T, H, 2);
        const HostTensor dy = synthetic_tokens(T, H, 3);
        // Every layer's input (h[0] = x) and output, and the gradients, allocated here.
        std::vector<HostTensor> h;
        for (int l = 0; l <= L; ++l) h.emplace_back(DType::kF32, std::vector<std::int64_t>{T, H});
        HostTensor g0(DType::kF32, {T, H}), g1(DType::kF32, {T, H});
        const RankGradients grads(runtime, E, H, F);
        auto step = [&](const HostTensor& input, int local) {
          const auto [first, count] = token_block(T, ranks, local);
          auto rows = [&, first = first, count = count](const HostTensor& m) {
            return TensorView(const_cast<float*>(m.data<float>()) + first * H, DType::kF32,
                              {count, H});
          };
          std::copy_n(input.data<float>() + first * H, count * H, h[0].data<float>() + first * H);
          for (int l = 0; l < L; ++l) {
            runtime.layer(local, l).forward(rows(h[static_cast<std::size_t>(l)]),
                                            rows(h[static_cast<std::size_t>(l) + 1]));
          }
          if (!training) return;
          for (int l = L - 1; l >= 0; --l) {
            LayerGradients out;
            out.dx = rows(l % 2 == 0 ? g0 : g1);
            out.d_experts = grads.experts[static_cast<std::size_t>(local)].views();
            out.d_gate = grads.gates[static_cast<std::size_t>(local)].view();
            runtime.layer(local, l).backward(rows(h[static_cast<std::size_t>(l)]),
                                             l == L - 1 ? rows(dy) : rows(l % 2 == 0 ? g1 : g0),
                                             out);
          }
        };
        check_steps_allocate_nothing(runtime, x, x2, step);
      }
}
