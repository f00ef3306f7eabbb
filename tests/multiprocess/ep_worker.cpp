// One rank of a multi-process job that runs the MoE forward, where rank
// SWITCHYARD_TEST_DIE_RANK (if set) kills itself with SIGKILL in the middle of a step: the
// test of what the surviving ranks do. SWITCHYARD_TEST_DIE_AT says where: "dispatch"
// (default: between routing and dispatch, its peers already waiting in the dispatch) or
// "combine" (after the dispatch, its peers waiting in the combine) or "backward" (after a
// training forward, its peers waiting in the backward's dispatch of dy) or "rebalance"
// (after a forward, its peers in `Runtime::rebalance`; without a rank to kill, every rank
// rebalances and forwards again). Rank
// SWITCHYARD_TEST_STOP_RANK (if set) stops itself with SIGSTOP after the forward instead.
// Rank SWITCHYARD_TEST_LATE_RANK (if set) sleeps a second after the forward, so that it
// shuts its runtime down after the others.
// usage: ep_worker CONFIG [section.key=value]...
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>

#include "switchyard/runtime.hpp"
#include "switchyard/status.hpp"

int main(int argc, char** argv) {
  using namespace switchyard;
  if (argc < 2) {
    std::fprintf(stderr, "usage: ep_worker CONFIG [section.key=value]...\n");
    return 2;
  }
  try {
    Config config = Config::from_file(argv[1]);
    for (int i = 2; i < argc; ++i) config.set_from_command_line(argv[i]);
    Runtime runtime(config);
    try {
      const int die_rank = std::getenv("SWITCHYARD_TEST_DIE_RANK")
                               ? std::atoi(std::getenv("SWITCHYARD_TEST_DIE_RANK"))
                               : -1;
      const char* die_at = std::getenv("SWITCHYARD_TEST_DIE_AT");
      const bool in_combine = die_at != nullptr && std::string(die_at) == "combine";
      const bool in_backward = die_at != nullptr && std::string(die_at) == "backward";
      const bool in_rebalance = die_at != nullptr && std::string(die_at) == "rebalance";
      const std::int64_t T = 64;
      const HostTensor x = synthetic_tokens(T, runtime.model().hidden(), 1);
      HostTensor y(DType::kF32, {T, runtime.model().hidden()});
      if (in_rebalance) {
        runtime.forward(x.view(), y.view());
        if (runtime.world_rank(0) == die_rank) std::raise(SIGKILL);
        const auto reports = runtime.rebalance();
        runtime.forward(x.view(), y.view());
        std::printf("rank %d: rebalance done, %lld expert copies moved\n", runtime.world_rank(0),
                    static_cast<long long>(reports.front().moved_experts));
        std::fflush(stdout);
        return 0;
      }
      if (in_backward) {
        const HostTensor dy = synthetic_tokens(T, runtime.model().hidden(), 2);
        HostTensor dx(DType::kF32, {T, runtime.model().hidden()});
        ModelGradients gradients;
        runtime.set_training(true);
        runtime.forward(x.view(), y.view());
        if (runtime.world_rank(0) == die_rank) std::raise(SIGKILL);
        runtime.backward(x.view(), dy.view(), dx.view(), gradients);
        std::printf("rank %d: backward done\n", runtime.world_rank(0));
        std::fflush(stdout);
        return 0;
      }
      runtime.run_on_ranks([&](int local) {
        const int rank = runtime.world_rank(local);
        const auto [first, count] = token_block(T, runtime.world_size(), rank);
        TensorView in(const_cast<float*>(x.data<float>()) + first * x.shape()[1], DType::kF32,
                      {count, x.shape()[1]});
        TensorView out(y.data<float>() + first * y.shape()[1], DType::kF32, {count, y.shape()[1]});
        if (in_combine) {
          // The public two-phase path: every rank dispatches, then combines identity
          // "experts" (the received rows themselves); the dying rank never combines.
          RoutingPlan plan;
          DispatchHandle handle;
          runtime.layer(local).route(in, plan);
          runtime.layer(local).dispatch(in, plan, handle);
          if (rank == die_rank) std::raise(SIGKILL);
          runtime.layer(local).combine(handle, handle.expert_input(), out);
          return;
        }
        if (rank == die_rank) {
          RoutingPlan plan;
          runtime.layer(local).route(in, plan);
          std::raise(SIGKILL);  // dies with its peers already waiting in the dispatch
        }
        runtime.layer(local).forward(in, out);
      });
      std::printf("rank %d: forward done\n", runtime.world_rank(0));
      std::fflush(stdout);
      // SWITCHYARD_TEST_STOP_RANK: that rank stops (SIGSTOP) after its last collective,
      // before the runtime shuts down: its peers must still end in bounded time.
      if (const char* stop = std::getenv("SWITCHYARD_TEST_STOP_RANK");
          stop != nullptr && std::atoi(stop) == runtime.world_rank(0)) {
        std::raise(SIGSTOP);
      }
      if (const char* late = std::getenv("SWITCHYARD_TEST_LATE_RANK");
          late != nullptr && std::atoi(late) == runtime.world_rank(0)) {
        std::this_thread::sleep_for(std::chrono::seconds(1));
      }
    } catch (const Error& e) {
      std::fprintf(stderr, "ep_worker: %s\n", e.what());
      std::fflush(stderr);
      runtime.abort(e.what());  // with MPI: ends the job, non-zero
      return 1;
    }
    return 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "ep_worker: %s\n", e.what());
    return 1;
  }
}
