// The fault suite, peer part: a rank killed with SIGKILL in the middle of a dispatch, a
// combine or a backward, under UCX (world 3 and 4, repeated: UCX once aborted survivors inside its
// shared-memory transport) and MPI, and with EP groups smaller than the world. Every
// survivor must end by itself within timeout_s + 5 s, exit non-zero, name the dead world
// rank, and never crash.
#include <doctest/doctest.h>

#include <chrono>
#include <cstdio>
#include <string>

#include "test_support.hpp"

using namespace switchyard;

namespace {

const std::string kTool = SWITCHYARD_TOOL_PATH;
const std::string kMpirun = SWITCHYARD_MPIRUN;
const std::string kWorker = SWITCHYARD_EP_WORKER;

/// Runs a job; returns its result and the seconds until every process had ended (printed
/// as "fault job: N s", the figure the README's reliability section reports).
std::pair<test::CommandResult, double> timed(const std::string& command) {
  const auto start = std::chrono::steady_clock::now();
  auto r = test::run_command(command);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("fault job: %.2f s, exit %d\n", seconds, r.exit_code);
  return {r, seconds};
}

/// A config with timeout_s = 2 and six experts.
std::string write_config(const test::TempDir& dir) {
  test::write_text(dir / "moe.toml", "[runtime]\ntimeout_s = 2\n[model]\nnum_experts = 6\n");
  return (dir / "moe.toml").string();
}

}  // namespace

TEST_CASE("ucx: a peer killed mid-dispatch or mid-combine never crashes a survivor") {
  test::TempDir dir;
  const std::string config = write_config(dir);
  for (const char* where : {"dispatch", "combine", "backward"}) {
    for (const int world : {3, 4}) {
      for (int round = 0; round < 2; ++round) {
        CAPTURE(where);
        CAPTURE(world);
        CAPTURE(round);
        // --grace 20: the survivors must end by themselves, not be stopped by the launcher.
        const auto [r, seconds] =
            timed("SWITCHYARD_TEST_DIE_RANK=1 SWITCHYARD_TEST_DIE_AT=" + std::string(where) + " " +
                  kTool + " launch -n " + std::to_string(world) + " --grace 20 -- " + kWorker +
                  " " + config + " runtime.transport=ucx 2>&1");
        INFO(r.output);
        CHECK(r.exit_code != 0);
        CHECK(r.output.find("rank 1 was killed by signal 9") != std::string::npos);
        CHECK(r.output.find("process_vm_readv") == std::string::npos);
        CHECK(r.output.find("by signal 6") == std::string::npos);  // no survivor aborted
        for (int survivor = 0; survivor < world; ++survivor) {
          if (survivor == 1) continue;
          const std::string report = "[rank " + std::to_string(survivor) + "] ep_worker: ";
          const auto at = r.output.find(report);
          REQUIRE(at != std::string::npos);
          const std::string line = r.output.substr(at, r.output.find('\n', at) - at);
          CHECK(line.find("world rank") != std::string::npos);
          CHECK(line.find(" 1") != std::string::npos);
        }
        CHECK(seconds < 2 + 5);
      }
    }
  }
}

TEST_CASE("mpi: a peer killed mid-combine or mid-backward ends the job non-zero in bounded time") {
  test::TempDir dir;
  const std::string config = write_config(dir);
  for (const char* where : {"combine", "backward"}) {
    CAPTURE(where);
    const auto [r, seconds] =
        timed("SWITCHYARD_TEST_DIE_RANK=1 SWITCHYARD_TEST_DIE_AT=" + std::string(where) + " " +
              kMpirun + " -x SWITCHYARD_TEST_DIE_RANK -x SWITCHYARD_TEST_DIE_AT -np 3 " + kWorker +
              " " + config + " runtime.transport=mpi 2>&1");
    INFO(r.output);
    CHECK(r.exit_code != 0);
    CHECK(r.output.find("forward done") == std::string::npos);
    CHECK(r.output.find("backward done") == std::string::npos);
    CHECK(seconds < 2 + 5);
  }
}

TEST_CASE("EP groups smaller than the world: the dead rank's group names its world rank") {
  test::TempDir dir;
  const std::string config = write_config(dir);
  // World 4 in EP groups of 2 ({0,1} and {2,3}): rank 3 dies, rank 2 waits for it.
  const auto [r, seconds] =
      timed("SWITCHYARD_TEST_DIE_RANK=3 " + kTool + " launch -n 4 --grace 20 -- " + kWorker + " " +
            config + " runtime.transport=ucx runtime.ep_size=2 2>&1");
  INFO(r.output);
  CHECK(r.exit_code != 0);
  CHECK(r.output.find("[rank 2] ep_worker: timeout: ucx alltoall: timed out after 2 s waiting for "
                      "world rank(s) 3 ") != std::string::npos);
  CHECK(seconds < 2 + 5);
}

TEST_CASE("mpi: a rank stopped after its last collective cannot hold the job for ever") {
  test::TempDir dir;
  const std::string config = write_config(dir);
  const auto [r, seconds] =
      timed("SWITCHYARD_TEST_STOP_RANK=2 " + kMpirun + " -x SWITCHYARD_TEST_STOP_RANK -np 3 " +
            kWorker + " " + config + " runtime.transport=mpi 2>&1");
  INFO(r.output);
  CHECK(r.exit_code != 0);
  CHECK(r.output.find("world rank(s) 2 did not arrive within 2 s (stopped or stuck)") !=
        std::string::npos);
  CHECK(seconds < 2 + 5);
}

TEST_CASE(
    "mpi: a stopped rank is named by rank 0 even when another rank waits longer than rank 0") {
  // Rank 0 shuts down a second after rank 1: rank 1's wait for rank 0's answer began
  // earlier, and must not end the job first, blaming rank 0 for the stopped rank 2 (under
  // load this happened by itself: 1 run in 3 with two busy cores).
  test::TempDir dir;
  const std::string config = write_config(dir);
  const auto [r, seconds] =
      timed("SWITCHYARD_TEST_STOP_RANK=2 SWITCHYARD_TEST_LATE_RANK=0 " + kMpirun +
            " -x SWITCHYARD_TEST_STOP_RANK -x SWITCHYARD_TEST_LATE_RANK -np 3 " + kWorker + " " +
            config + " runtime.transport=mpi 2>&1");
  INFO(r.output);
  CHECK(r.exit_code != 0);
  CHECK(r.output.find("world rank(s) 2 did not arrive within 2 s (stopped or stuck)") !=
        std::string::npos);
  CHECK(r.output.find("world rank 0 did not arrive") == std::string::npos);
  CHECK(seconds < 1 + 2 + 5);
}

TEST_CASE("ucx under launch: a rank stopped after its last collective is stopped in bounded time") {
  test::TempDir dir;
  const std::string config = write_config(dir);
  const auto [r, seconds] = timed("SWITCHYARD_TEST_STOP_RANK=2 " + kTool + " launch -n 3 -- " +
                                  kWorker + " " + config + " runtime.transport=ucx 2>&1");
  INFO(r.output);
  CHECK(r.exit_code != 0);
  CHECK(r.output.find("rank 2 is stopped (signal 19) while the others have finished") !=
        std::string::npos);
  CHECK(seconds < 2 + 5);
}
