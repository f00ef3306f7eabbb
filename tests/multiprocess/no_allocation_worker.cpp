// One rank of a multi-process job: after two warm-up steps, MoELayer::forward must make
// no allocation, also with the transport of this job (mpi or ucx). Exits 1 if it does.
// usage: no_allocation_worker section.key=value...
#include <algorithm>
#include <cstdio>

#include "allocation_counter.hpp"
#include "switchyard/runtime.hpp"
#include "switchyard/status.hpp"

int main(int argc, char** argv) {
  using namespace switchyard;
  try {
    Config config;
    config.set("model", "num_experts", std::int64_t{6});
    for (int i = 1; i < argc; ++i) config.set_from_command_line(argv[i]);
    Runtime runtime(config);
    const std::int64_t T = 50;
    const int H = runtime.model().hidden();
    const auto [first, count] = token_block(T, runtime.world_size(), runtime.world_rank(0));
    const HostTensor x = synthetic_tokens(T, H, 1);
    const HostTensor x2 = synthetic_tokens(T, H, 2);
    HostTensor y(DType::kF32, {T, H});
    auto rows = [&](const HostTensor& t) {
      return TensorView(const_cast<float*>(t.data<float>()) + first * H, DType::kF32, {count, H});
    };
    long worst = 0, excluded = 0;
    for (int step = 0; step < 5; ++step) {
      const HostTensor& input = step % 2 ? x2 : x;
      if (step >= 2) test::start_counting_allocations();
      runtime.layer(0).forward(rows(input), rows(y));
      if (step >= 2) {
        const test::AllocationCounts counts = test::stop_counting_allocations();
        if (counts.ours > 0) {
          std::printf("rank %d step %d: the first allocation came from:\n%s", runtime.world_rank(0),
                      step, test::first_counted_allocation());
        }
        worst = std::max(worst, counts.ours);
        excluded += counts.vendor;
      }
    }
    std::printf(
        "rank %d: most allocations by Switchyard in one step after warm-up: %ld (all threads, "
        "malloc & co. and operator new); made inside vendor library calls, excluded: %ld in 3 "
        "steps\n",
        runtime.world_rank(0), worst, excluded);
    return worst == 0 ? 0 : 1;
  } catch (const Error& e) {
    std::fprintf(stderr, "no_allocation_worker: %s\n", e.what());
    return 1;
  }
}
