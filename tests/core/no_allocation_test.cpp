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
