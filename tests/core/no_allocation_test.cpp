// Once steps of the largest sizes have run, MoELayer::forward allocates nothing: every
// buffer is reused. Checked with replaced operator new and malloc & co. that count the
// allocations of every thread (the stream's progress thread too) while the ranks are
// inside forward().
#include <doctest/doctest.h>

#include <barrier>
#include <cstdlib>
#include <thread>
#include <vector>

#include "allocation_counter.hpp"
#include "switchyard/runtime.hpp"

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
      // Each rank's gradients, allocated once here.
      std::vector<HostTensor> gates, weights;
      std::vector<std::vector<SwigluExpertGradients>> views(static_cast<std::size_t>(ranks));
      for (int r = 0; r < ranks; ++r) {
        gates.emplace_back(DType::kF32, std::vector<std::int64_t>{E, H});
        for (int e = 0; e < runtime.layer(r).placement().num_local(r); ++e) {
          for (const auto& shape : {std::vector<std::int64_t>{F, H}, {F, H}, {H, F}})
            weights.emplace_back(DType::kF32, shape);
        }
      }
      std::size_t next = 0;
      for (int r = 0; r < ranks; ++r) {
        for (int e = 0; e < runtime.layer(r).placement().num_local(r); ++e, next += 3) {
          views[static_cast<std::size_t>(r)].push_back(
              {weights[next].view(), weights[next + 1].view(), weights[next + 2].view()});
        }
      }
      auto step = [&](const HostTensor& input, int local) {
        const auto [first, count] = token_block(T, ranks, local);
        TensorView in(const_cast<float*>(input.data<float>()) + first * H, DType::kF32, {count, H});
        TensorView grad(const_cast<float*>(dy.data<float>()) + first * H, DType::kF32, {count, H});
        LayerGradients out;
        out.dx = TensorView(dx.data<float>() + first * H, DType::kF32, {count, H});
        out.d_experts = views[static_cast<std::size_t>(local)];
        out.d_gate = gates[static_cast<std::size_t>(local)].view();
        runtime.layer(local).forward(
            in, TensorView(y.data<float>() + first * H, DType::kF32, {count, H}));
        runtime.layer(local).backward(in, grad, out);
      };
      for (const HostTensor* input : {&x, &x2}) {
        runtime.run_on_ranks([&](int local) { step(*input, local); });
      }
      for (const HostTensor* input : {&x2, &x, &x2}) {
        std::barrier sync(ranks);
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
}
