// Once steps of the largest sizes have run, MoELayer::forward allocates nothing: every
// buffer is reused. Checked with a replaced global operator new that counts, per thread,
// the allocations made while a rank thread is inside forward().
#include <doctest/doctest.h>

#include <vector>

#include "allocation_counter.hpp"
#include "switchyard/runtime.hpp"

using namespace switchyard;

TEST_CASE("the counter sees allocations, also those made inside libswitchyard") {
  test::start_counting_allocations();
  void* p = ::operator new(64);
  const long explicit_new = test::stop_counting_allocations();
  ::operator delete(p);
  CHECK(explicit_new == 1);
  test::start_counting_allocations();
  const Topology t = Topology::uniform(6, 2);  // builds a std::vector in the library
  const long in_library = test::stop_counting_allocations();
  CHECK(t.num_nodes() == 3);
  CHECK(in_library >= 1);
}

TEST_CASE("forward allocates nothing after the first steps") {
  for (int ranks : {1, 3}) {
    CAPTURE(ranks);
    Config config;
    config.set("runtime", "ranks", std::int64_t{ranks});
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

    std::vector<long> counts(static_cast<std::size_t>(ranks), -1);
    for (const HostTensor* input : {&x2, &x, &x2}) {
      runtime.run_on_ranks([&](int local) {
        const auto [first, count] = token_block(T, runtime.world_size(), runtime.world_rank(local));
        TensorView in(const_cast<float*>(input->data<float>()) + first * H, DType::kF32,
                      {count, H});
        TensorView out(y.data<float>() + first * H, DType::kF32, {count, H});
        test::start_counting_allocations();
        runtime.layer(local).forward(in, out);
        counts[static_cast<std::size_t>(local)] = test::stop_counting_allocations();
      });
      for (long c : counts) CHECK(c == 0);
    }
  }
}
