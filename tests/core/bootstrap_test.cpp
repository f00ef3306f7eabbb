// The bootstrap store with its ranks as threads of this process, and the launcher
// variables.
#include <doctest/doctest.h>

#include <cstdlib>
#include <optional>
#include <thread>

#include "switchyard/bootstrap.hpp"
#include "switchyard/status.hpp"
#include "test_support.hpp"

using namespace switchyard;

namespace {

LaunchInfo info(int rank, int world, int port) {
  LaunchInfo i;
  i.rank = rank;
  i.world_size = world;
  i.master_addr = "127.0.0.1";
  i.master_port = port;
  return i;
}

}  // namespace

TEST_CASE("set, get, barrier and allgather across ranks") {
  const int port = test::free_port();
  std::vector<std::vector<std::string>> gathered(3);
  std::vector<std::string> got(3);
  auto errors = test::on_threads(3, [&](int r) {
    BootstrapStore store(info(r, 3, port), 10);
    if (r == 2) store.set("id", std::string("unique\0id", 9));
    got[static_cast<std::size_t>(r)] = store.get("id");  // waits until rank 2 set it
    store.barrier("after-get");
    gathered[static_cast<std::size_t>(r)] = store.allgather("names", "rank-" + std::to_string(r));
    store.barrier("done");  // rank 0 serves until everyone has read
  });
  for (const auto& e : errors) CHECK_FALSE(e.has_value());
  for (int r = 0; r < 3; ++r) {
    CHECK(got[static_cast<std::size_t>(r)] == std::string("unique\0id", 9));
    CHECK(gathered[static_cast<std::size_t>(r)] ==
          std::vector<std::string>{"rank-0", "rank-1", "rank-2"});
  }
}

TEST_CASE("a barrier that a rank never reaches times out naming it") {
  const int port = test::free_port();
  auto errors = test::on_threads(3, [&](int r) {
    BootstrapStore store(info(r, 3, port), 1.0);
    if (r == 1) {
      std::this_thread::sleep_for(
          std::chrono::milliseconds(2500));  // keeps its connection, skips the barrier
      return;
    }
    store.barrier("b");
  });
  for (int r : {0, 2}) {
    REQUIRE(errors[static_cast<std::size_t>(r)].has_value());
    CHECK(errors[static_cast<std::size_t>(r)]->code() == ErrorCode::kTimeout);
    CHECK(errors[static_cast<std::size_t>(r)]->message() ==
          "bootstrap barrier 'b': timed out after 1 s waiting for rank(s) 1 (never started, or a "
          "wrong "
          "RANK/WORLD_SIZE?)");
  }
}

TEST_CASE("disagreeing world sizes and a rank claimed twice are refused") {
  const int port = test::free_port();
  auto errors = test::on_threads(2, [&](int r) {
    BootstrapStore store(info(r, r == 0 ? 2 : 5, port), 1);
    store.barrier("b");
  });
  REQUIRE(errors[1].has_value());
  CHECK(errors[1]->message() ==
        "bootstrap store: rank 1 was started with WORLD_SIZE=5 but rank 0 with WORLD_SIZE=2; every "
        "rank needs "
        "the same");
  REQUIRE(errors[0].has_value());
  CHECK(errors[0]->code() == ErrorCode::kTimeout);

  const int port2 = test::free_port();
  auto twice = test::on_threads(3, [&](int r) {
    BootstrapStore store(info(r == 2 ? 1 : r, 3, port2), 1);
    store.barrier("b");
  });
  int duplicates = 0;
  for (const auto& e : twice) {
    if (e && e->message().find("two processes claim RANK=1") != std::string::npos) ++duplicates;
  }
  CHECK(duplicates == 1);
}

TEST_CASE("without MASTER_ADDR and MASTER_PORT the store says how to launch") {
  LaunchInfo i;
  i.world_size = 2;
  CHECK_THROWS_WITH_AS(BootstrapStore(i, 1), doctest::Contains("switchyard launch -n N"), Error);
}

TEST_CASE("launcher variables: torchrun's names first, then Open MPI's, then Slurm's") {
  for (const char* v :
       {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
        "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"}) {
    unsetenv(v);
  }
  CHECK_FALSE(LaunchInfo::from_environment().has_value());
  setenv("SLURM_PROCID", "3", 1);
  setenv("SLURM_NTASKS", "8", 1);
  auto slurm = LaunchInfo::from_environment();
  REQUIRE(slurm.has_value());
  CHECK(slurm->source == "Slurm");
  CHECK(slurm->rank == 3);
  CHECK(slurm->world_size == 8);
  CHECK_FALSE(slurm->has_store());
  setenv("OMPI_COMM_WORLD_RANK", "1", 1);
  setenv("OMPI_COMM_WORLD_SIZE", "2", 1);
  CHECK(LaunchInfo::from_environment()->source == "Open MPI");
  setenv("RANK", "2", 1);
  setenv("WORLD_SIZE", "4", 1);
  setenv("LOCAL_RANK", "0", 1);
  setenv("LOCAL_WORLD_SIZE", "2", 1);
  setenv("MASTER_ADDR", "127.0.0.1", 1);
  setenv("MASTER_PORT", "29500", 1);
  auto torch = LaunchInfo::from_environment();
  REQUIRE(torch.has_value());
  CHECK(torch->source == "RANK/WORLD_SIZE");
  CHECK(torch->rank == 2);
  CHECK(torch->local_world_size == 2);
  CHECK(torch->has_store());
  setenv("RANK", "4", 1);
  CHECK_THROWS_WITH_AS(LaunchInfo::from_environment(),
                       doctest::Contains("RANK=4 is not below WORLD_SIZE=4"), Error);
  setenv("RANK", "two", 1);
  CHECK_THROWS_WITH_AS(LaunchInfo::from_environment(),
                       doctest::Contains("RANK=two: expected an integer"), Error);
  for (const char* v :
       {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
        "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"}) {
    unsetenv(v);
  }
}
