// transport_inproc against the conformance suite, on 1 to 4 ranks, plus its failure modes.
#include <doctest/doctest.h>

#include <chrono>
#include <limits>
#include <memory>
#include <optional>
#include <thread>

#include "switchyard/plugin.hpp"
#include "switchyard/status.hpp"
#include "test_support.hpp"
#include "transport_conformance.hpp"

using namespace switchyard;

namespace {

PluginRegistry& registry() {
  static PluginRegistry r(PluginRegistry::default_search_path());
  return r;
}

std::vector<std::shared_ptr<Transport>> inproc(int ranks, double timeout_s, bool async = false) {
  Config config;
  config.set("runtime", "inproc_async", async);
  const ConfigSection options =
      config.section("runtime", registry().options(PluginKind::kTransport, "inproc"));
  TransportCreateArgs args;
  args.options = &options;
  args.requested_ranks = ranks;
  args.timeout_s = timeout_s;
  args.ranks_per_node = 2;
  return registry().create_transport("inproc", args);
}

std::vector<std::optional<Error>> on_ranks(std::vector<std::shared_ptr<Transport>>& ranks,
                                           const std::function<void(Transport&)>& fn) {
  return test::on_threads(static_cast<int>(ranks.size()),
                          [&](int r) { fn(*ranks[static_cast<std::size_t>(r)]); });
}

}  // namespace

TEST_CASE("inproc passes the transport conformance suite, host-synchronous and stream-ordered") {
  for (bool async : {false, true}) {
    for (int n : {1, 2, 3, 4}) {
      auto ranks = inproc(n, 30, async);
      CHECK(ranks[0]->capabilities().stream_ordered == async);
      for (const auto& c : conformance::standard_cases()) {
        CAPTURE(async);
        CAPTURE(n);
        CAPTURE(c.name);
        auto errors = on_ranks(ranks, [&](Transport& t) {
          // Queued: the collectives run on the stream's progress thread, not the caller's.
          HostStream stream(async ? HostStream::Mode::kQueued : HostStream::Mode::kInline);
          c.run(t, stream);
        });
        for (const auto& error : errors) {
          CHECK_MESSAGE(!error.has_value(), (error ? error->what() : ""));
        }
      }
    }
  }
}

TEST_CASE("stream-ordered inproc returns before the exchange is done") {
  auto ranks = inproc(2, 30, /*async=*/true);
  auto errors = on_ranks(ranks, [](Transport& t) {
    HostStream stream(HostStream::Mode::kQueued);
    std::int64_t send[2] = {t.rank() * 10, t.rank() * 10 + 1}, recv[2] = {-1, -1};
    if (t.rank() == 1) std::this_thread::sleep_for(std::chrono::milliseconds(300));
    t.alltoall(send, recv, sizeof(std::int64_t), stream);
    // Rank 1 joins 300 ms later: rank 0's exchange cannot have completed yet.
    if (t.rank() == 0) CHECK_FALSE(stream.idle());
    stream.synchronize();
    CHECK(recv[0] == t.rank());
    CHECK(recv[1] == 10 + t.rank());
  });
  for (const auto& e : errors) CHECK_FALSE(e.has_value());
}

TEST_CASE("a stream-ordered timeout is reported by synchronize, naming the missing rank") {
  auto ranks = inproc(2, 0.3, /*async=*/true);
  auto errors = on_ranks(ranks, [](Transport& t) {
    if (t.rank() == 1) return;
    HostStream stream(HostStream::Mode::kQueued);
    std::int64_t send[2] = {}, recv[2] = {};
    t.alltoall(send, recv, sizeof(std::int64_t), stream);
    stream.synchronize();
  });
  REQUIRE(errors[0].has_value());
  CHECK(errors[0]->code() == ErrorCode::kTimeout);
  CHECK(errors[0]->message().find("waiting for rank(s) 1 to arrive") != std::string::npos);
}

TEST_CASE("inproc topology emulates nodes") {
  auto ranks = inproc(5, 1);
  CHECK(ranks[0]->topology().num_nodes() == 3);
  CHECK(ranks[4]->topology().node_of(4) == 2);
}

TEST_CASE("a rank that never arrives ends in a timeout naming it, not a hang") {
  auto ranks = inproc(3, 0.3);
  const auto start = std::chrono::steady_clock::now();
  auto errors = on_ranks(ranks, [](Transport& t) {
    if (t.rank() == 2) return;  // skips the barrier
    t.barrier();
  });
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  CHECK(seconds < 5);
  // The first rank to time out says so (kTimeout) and aborts the communicator; the other
  // wakes with kPeerFailed carrying the same reason, unless it timed out at the same moment.
  int timeouts = 0;
  for (int r : {0, 1}) {
    REQUIRE(errors[static_cast<std::size_t>(r)].has_value());
    const ErrorCode code = errors[static_cast<std::size_t>(r)]->code();
    CHECK((code == ErrorCode::kTimeout || code == ErrorCode::kPeerFailed));
    timeouts += code == ErrorCode::kTimeout ? 1 : 0;
    CHECK(errors[static_cast<std::size_t>(r)]->message().find("inproc barrier") !=
          std::string::npos);
    CHECK(errors[static_cast<std::size_t>(r)]->message().find("waiting for rank(s) 2 to arrive") !=
          std::string::npos);
  }
  CHECK(timeouts >= 1);
}

TEST_CASE("a timeout in a split communicator names world ranks and ends the other groups") {
  auto ranks = inproc(4, 0.5);
  auto errors = on_ranks(ranks, [](Transport& t) {
    auto group = t.split(t.rank() % 2, t.rank());  // {0, 2} and {1, 3}
    if (t.rank() == 2) return;                     // never reaches its group's barrier
    if (t.rank() == 0) {
      group->barrier();
      return;
    }
    group->barrier();  // ranks 1 and 3: their group is fine
    std::this_thread::sleep_for(std::chrono::milliseconds(400));
    t.barrier();  // waits for ranks 0 and 2 until rank 0's timeout ends every group
  });
  REQUIRE(errors[0].has_value());
  CHECK(errors[0]->code() == ErrorCode::kTimeout);
  CHECK(errors[0]->message() ==
        "inproc barrier (collective #0 of a 2-rank communicator): timed out after 0.5 s waiting "
        "for world rank(s) 2 to arrive");
  for (int r : {1, 3}) {
    REQUIRE(errors[static_cast<std::size_t>(r)].has_value());
    CHECK(errors[static_cast<std::size_t>(r)]->code() == ErrorCode::kPeerFailed);
    CHECK(errors[static_cast<std::size_t>(r)]->message() ==
          "inproc barrier: inproc barrier (collective #0 of a 2-rank communicator): timed out "
          "after 0.5 s waiting for world rank(s) 2 to arrive");
  }
}

TEST_CASE("tiny timeouts: a rank that gives up never leaves peers reading freed buffers") {
  // Heap buffers, freed as soon as each rank unwinds: a peer still copying from them is a
  // use-after-free that AddressSanitizer reports (this suite runs under it in CI).
  for (const double timeout_s : {1e-6, 0.002, 0.01}) {
    CAPTURE(timeout_s);
    for (int round = 0; round < 30; ++round) {
      auto ranks = inproc(4, timeout_s);
      auto errors = on_ranks(ranks, [&](Transport& t) {
        for (int step = 0; step < 4; ++step) {
          std::vector<std::size_t> counts(4, 4096), offsets{0, 4096, 8192, 12288};
          auto send = std::make_unique<std::vector<std::byte>>(4 * 4096, std::byte{1});
          auto recv = std::make_unique<std::vector<std::byte>>(4 * 4096);
          if ((t.rank() + round + step) % 3 == 0) std::this_thread::yield();
          t.alltoallv({send->data(), counts, offsets, recv->data(), counts, offsets});
          auto group = t.split(t.rank() % 2, t.rank());
          group->barrier();
        }
      });
      for (const auto& e : errors) {
        if (!e) continue;
        CHECK((e->code() == ErrorCode::kTimeout || e->code() == ErrorCode::kPeerFailed));
      }
    }
  }
}

TEST_CASE("a timeout outside (0, a week] is refused, not overflowed") {
  for (const double bad : {0.0, -1.0, 1e10, std::numeric_limits<double>::infinity(),
                           std::numeric_limits<double>::quiet_NaN()}) {
    CAPTURE(bad);
    CHECK_THROWS_WITH_AS(inproc(2, bad), doctest::Contains("timeout_s must be in (0, 604800 s]"),
                         Error);
  }
}

TEST_CASE("abort wakes the other ranks with kPeerFailed, also in split communicators") {
  auto ranks = inproc(4, 30);
  const auto start = std::chrono::steady_clock::now();
  auto errors = on_ranks(ranks, [](Transport& t) {
    auto sub = t.split(t.rank() % 2, t.rank());
    if (t.rank() == 0) {
      t.abort("rank 0 failed: test");
      return;
    }
    sub->barrier();  // rank 2 waits on rank 0 here; ranks 1 and 3 pass
    t.barrier();     // ranks 1 and 3 wait on rank 0 here
  });
  CHECK(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < 5);
  for (int r : {1, 2, 3}) {
    REQUIRE(errors[static_cast<std::size_t>(r)].has_value());
    CHECK(errors[static_cast<std::size_t>(r)]->code() == ErrorCode::kPeerFailed);
    CHECK(errors[static_cast<std::size_t>(r)]->message().find("rank 0 failed: test") !=
          std::string::npos);
  }
}

TEST_CASE("alltoallv with the wrong number of counts is refused before any exchange") {
  auto ranks = inproc(1, 1);
  std::vector<std::size_t> two(2, 0);
  AlltoallvBuffers b{nullptr, two, two, nullptr, two, two};
  CHECK_THROWS_WITH_AS(ranks[0]->alltoallv(b), doctest::Contains("one entry per rank"), Error);
}

namespace {
/// A stream that says it runs on a GPU: enough to see the capability checks refuse it.
class CudaLabelledStream final : public Stream {
 public:
  Device device() const noexcept override { return Device::cuda(0); }
  void* native_handle() const noexcept override { return nullptr; }
  void synchronize() override {}
  bool idle() noexcept override { return true; }
  std::unique_ptr<StreamEvent> create_event() override { return nullptr; }
  void record(StreamEvent&) override {}
};
}  // namespace

TEST_CASE("device memory is refused by a host transport, naming it and the buffer") {
  auto ranks = inproc(1, 1);
  CudaLabelledStream gpu;
  std::int64_t send = 1, recv = 0;
  CHECK_THROWS_WITH_AS(
      ranks[0]->alltoall(&send, &recv, sizeof send, gpu),
      "invalid argument: inproc alltoall: send/receive buffers in cuda:0 memory: the inproc "
      "transport takes only host memory",
      Error);
  std::vector<std::size_t> one(1, 0);
  HostStream host;
  AlltoallvBuffers on_gpu{nullptr, one, one, nullptr, one, one, Device::cuda(0)};
  CHECK_THROWS_WITH_AS(ranks[0]->alltoallv(on_gpu, host),
                       doctest::Contains("the buffers are in cuda:0 memory but the stream runs "
                                         "on host"),
                       Error);
  CHECK_THROWS_WITH_AS(ranks[0]->ialltoallv(on_gpu), doctest::Contains("takes host buffers"),
                       Error);
  CHECK(recv == 0);  // nothing ran
}
