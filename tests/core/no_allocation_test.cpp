// Once steps of the largest sizes have run, MoELayer::forward allocates nothing: every
// buffer is reused.
// Checked by replacing the global operator new and counting, per thread, the allocations
// made while a rank thread is inside forward().
#include <doctest/doctest.h>

#include <atomic>
#include <cstdlib>
#include <new>

#include "switchyard/runtime.hpp"

namespace {
thread_local bool counting = false;
thread_local long allocations = 0;
}  // namespace

// GCC cannot see that these replace the global operators as a set.
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"

void* operator new(std::size_t size) {
  if (counting) ++allocations;
  if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t size) { return operator new(size); }
void* operator new(std::size_t size, const std::nothrow_t&) noexcept {
  if (counting) ++allocations;
  return std::malloc(size == 0 ? 1 : size);
}
void* operator new[](std::size_t size, const std::nothrow_t& tag) noexcept {
  return operator new(size, tag);
}
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }

using namespace switchyard;

TEST_CASE("the counter sees allocations, also those made inside libswitchyard") {
  counting = true;
  allocations = 0;
  void* p = ::operator new(64);
  counting = false;
  ::operator delete(p);
  CHECK(allocations == 1);
  counting = true;
  allocations = 0;
  const Topology t = Topology::uniform(6, 2);  // builds a std::vector in the library
  counting = false;
  CHECK(t.num_nodes() == 3);
  CHECK(allocations >= 1);
}

TEST_CASE("forward allocates nothing after the first step") {
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
        counting = true;
        allocations = 0;
        runtime.layer(local).forward(in, out);
        counting = false;
        counts[static_cast<std::size_t>(local)] = allocations;
      });
      for (long c : counts) CHECK(c == 0);
    }
  }
}
