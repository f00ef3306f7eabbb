// One rank of a multi-process job: after two warm-up steps, MoELayer::forward, and a
// training step (forward and backward), must make no allocation, also with the transport
// of this job (mpi or ucx). Exits 1 if they do.
// usage: no_allocation_worker section.key=value...
#include <algorithm>
#include <cstdio>
#include <vector>

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

    // Training steps: a forward that keeps its rows, then the layer's backward, with the
    // gradients' memory made here once.
    MoELayer& layer = runtime.layer(0);
    layer.set_training(true);
    const int F = runtime.model().ffn_hidden(), E = runtime.model().num_experts();
    const HostTensor dy = synthetic_tokens(T, H, 3);
    HostTensor dx(DType::kF32, {T, H}), d_gate(DType::kF32, {E, H});
    const ExpertGradientStorage d_experts(layer.experts().num_local_experts(), H, F);
    LayerGradients out;
    out.dx = rows(dx);
    out.d_experts = d_experts.views();
    out.d_gate = d_gate.view();
    long worst_training = 0;
    for (int step = 0; step < 5; ++step) {
      const HostTensor& input = step % 2 ? x2 : x;
      if (step >= 2) test::start_counting_allocations();
      layer.forward(rows(input), rows(y));
      layer.backward(rows(input), rows(dy), out);
      if (step >= 2) {
        const test::AllocationCounts counts = test::stop_counting_allocations();
        if (counts.ours > 0) {
          std::printf("rank %d training step %d: the first allocation came from:\n%s",
                      runtime.world_rank(0), step, test::first_counted_allocation());
        }
        worst_training = std::max(worst_training, counts.ours);
      }
    }
    std::printf("rank %d: most allocations by Switchyard in one training step after warm-up: %ld\n",
                runtime.world_rank(0), worst_training);
    return worst == 0 && worst_training == 0 ? 0 : 1;
  } catch (const Error& e) {
    std::fprintf(stderr, "no_allocation_worker: %s\n", e.what());
    return 1;
  }
}
