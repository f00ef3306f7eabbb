// `switchyard`: run, check and inspect Switchyard MoE layers.
#include <cstdio>
#include <new>
#include <string>
#include <system_error>
#include <vector>

#include "commands.hpp"
#include "switchyard/status.hpp"
#include "switchyard/version.hpp"

namespace {

constexpr const char* kUsage = R"(usage: switchyard <command> [arguments]

commands:
  run CONFIG [--set section.key=value]... [--steps N] [--check] [--rebalance-every N]
        run the MoE layer forward over [input] and write [output] path;
        --check compares with the dense single-process reference;
        --rebalance-every N places the experts anew for the measured load every N
        steps (Runtime::rebalance; see [runtime] redundant_experts)
  plugins [--dir DIR]...
        list every plugin found, with kind, version, path and state, and every
        file that was rejected and why
  config check CONFIG [--set section.key=value]...
        validate a configuration (plugins, model, sizes) without running it
  config show CONFIG [--set section.key=value]...
        print every effective value and where it came from
  route CONFIG --logits L.npy --out DIR [--token-ids IDS.npy] [--set section.key=value]...
        apply the [router] section to float32 logits [T,E] and write the plan and stats
  bench CONFIG [--iters N] [--warmup N] [--routing uniform|router] [--tokens-per-rank N]
        [--json OUT] [--set section.key=value]...
        time dispatch + combine against the transport's raw alltoallv of the same bytes
        and a naive per-(token, expert) dispatcher, routing against one sgemm of the
        logits, the experts against one sgemm of their FLOPs (run under a launcher like
        `run`; the median over iterations of the slowest rank)
  backward CONFIG --grad-output DY.npy --out DIR [--set section.key=value]...
        the model forward on [input], then backward with dy from DY.npy; writes dx.npy
        and d_model.safetensors, every layer's gradients (rank 0, under a launcher
        like `run`)
  simulate CONFIG [--json OUT] [--html OUT] [--compare SETTING...] [--set ...]
        route synthetic or recorded logits with the real routers on a simulated cluster
        ([simulate] nodes, gpus_per_node, ...): expert load, traffic per rank and node
        under three accountings, predicted dispatch and combine time; --html writes a
        self-contained report
  plan-experts CONFIG --load LOAD.npy --out DIR [--redundant R] [--published] [--set ...]
        place each layer's experts, with R redundant copies, on the ranks of CONFIG
        from their measured load (DeepSeek's expert-parallel load balancer): writes
        the slots, copies and each layer's imbalance before and after
  launch -n N [--ranks-per-node M] [--grace SECONDS] -- COMMAND [ARGS]...
        start N local processes with RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
        MASTER_ADDR and MASTER_PORT set, output prefixed with the rank; when one
        fails, stop the others and fail
  --version, --help

Environment: SWITCHYARD_<SECTION>_<KEY>=value overrides the file; --set overrides both.
SWITCHYARD_PLUGIN_PATH adds plugin folders (colon-separated).
Exit codes: 0 ok, 1 error, 2 usage, 3 --check failed.
)";

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "--help" || args[0] == "-h" || args[0] == "help") {
    std::fputs(kUsage, args.empty() ? stderr : stdout);
    return args.empty() ? switchyard::tool::kExitUsage : switchyard::tool::kExitOk;
  }
  if (args[0] == "--version") {
    std::printf("switchyard %s (%s)\n", switchyard::core_version(), switchyard::core_build_id());
    return 0;
  }
  const std::string command = args[0];
  args.erase(args.begin());
  try {
    if (command == "run") return switchyard::tool::run_command(args);
    if (command == "plugins") return switchyard::tool::plugins_command(args);
    if (command == "config") return switchyard::tool::config_command(args);
    if (command == "launch") return switchyard::tool::launch_command(args);
    if (command == "route") return switchyard::tool::route_command(args);
    if (command == "bench") return switchyard::tool::bench_command(args);
    if (command == "simulate") return switchyard::tool::simulate_command(args);
    if (command == "backward") return switchyard::tool::backward_command(args);
    if (command == "plan-experts") return switchyard::tool::plan_experts_command(args);
  } catch (const switchyard::Error& e) {
    switchyard::tool::report_error(e);
    return switchyard::tool::kExitError;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr,
                 "switchyard %s: error (system): out of memory (the configuration, or a file it "
                 "names, needs more than this process may use; see ulimit -v and the cgroup's "
                 "memory.max)\n",
                 command.c_str());
    return switchyard::tool::kExitError;
  } catch (const std::system_error& e) {
    std::fprintf(stderr, "switchyard %s: error (system): %s\n", command.c_str(), e.what());
    return switchyard::tool::kExitError;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "switchyard: internal error: %s\n", e.what());
    return switchyard::tool::kExitError;
  }
  std::fprintf(stderr, "switchyard: unknown command '%s'\n\n%s", command.c_str(), kUsage);
  return switchyard::tool::kExitUsage;
}
