// The bootstrap store with its ranks as threads of this process, and the launcher
// variables.
#include <doctest/doctest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
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
  i.store_token = "test-job-token-0123456789";
  return i;
}

/// A raw TCP client that speaks the store's frames by hand (as a stranger would).
class RawClient {
 public:
  explicit RawClient(int port) {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<std::uint16_t>(port));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    for (int tries = 0; tries < 200; ++tries) {
      if (::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) return;
      ::close(fd_);
      fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    FAIL("cannot connect to the store");
  }
  ~RawClient() { ::close(fd_); }
  RawClient(const RawClient&) = delete;
  RawClient& operator=(const RawClient&) = delete;

  void send_bytes(const std::string& bytes) {
    (void)!::send(fd_, bytes.data(), bytes.size(), MSG_NOSIGNAL);
  }
  /// One frame as the protocol lays it out: op, u64 key length, key, u64 value length, value.
  static std::string frame(std::uint8_t op, const std::string& key, const std::string& value,
                           std::optional<std::uint64_t> announced_key = std::nullopt) {
    std::string f(1, static_cast<char>(op));
    const std::uint64_t k = announced_key.value_or(key.size()), v = value.size();
    f.append(reinterpret_cast<const char*>(&k), 8);
    f += key;
    f.append(reinterpret_cast<const char*>(&v), 8);
    f += value;
    return f;
  }
  /// Everything the server sends until it closes the connection or 2 s pass; `closed` says
  /// which.
  std::string read_until_closed(bool& closed) {
    std::string got;
    char buf[4096];
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
    closed = false;
    while (std::chrono::steady_clock::now() < deadline) {
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, 50) <= 0) continue;
      const ssize_t n = ::recv(fd_, buf, sizeof buf, 0);
      if (n <= 0) {
        closed = true;
        break;
      }
      got.append(buf, static_cast<std::size_t>(n));
    }
    return got;
  }

 private:
  int fd_ = -1;
};

constexpr std::uint8_t kHelloOp = 1, kSetOp = 2, kTryGetOp = 3, kMissingOp = 4;

}  // namespace

TEST_CASE("free_loopback_port: a port of the loopback interface that can be bound") {
  const int port = free_loopback_port();
  CHECK(port > 0);
  CHECK(port <= 65535);
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  REQUIRE(fd >= 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<std::uint16_t>(port));
  CHECK(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
  ::close(fd);
}

TEST_CASE("set, get, barrier and allgather across ranks") {
  const int port = free_loopback_port();
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
  const int port = free_loopback_port();
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
  const int port = free_loopback_port();
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

  const int port2 = free_loopback_port();
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

TEST_CASE("a stranger without the job's token can neither read, write nor stall the store") {
  const int port = free_loopback_port();
  std::vector<std::string> got(2);
  std::vector<double> seconds(2);
  std::string stranger_saw, wrong_token_reply;
  bool closed_get = false, closed_huge = false, closed_wrong = false;
  std::atomic<bool> listening{false};
  auto errors = test::on_threads(3, [&](int r) {
    if (r == 2) {  // the stranger
      while (!listening) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      RawClient idle(port);
      idle.send_bytes(std::string(1, '\x01'));  // one byte of a frame, then nothing
      std::vector<std::unique_ptr<RawClient>> crowd;
      for (int i = 0; i < 100; ++i) crowd.push_back(std::make_unique<RawClient>(port));
      RawClient reader(port);
      reader.send_bytes(RawClient::frame(kTryGetOp, "secret", ""));
      stranger_saw = reader.read_until_closed(closed_get);
      RawClient huge(port);
      huge.send_bytes(RawClient::frame(kSetOp, "k", "v", std::uint64_t{1} << 32));
      (void)huge.read_until_closed(closed_huge);
      RawClient wrong(port);
      wrong.send_bytes(RawClient::frame(kHelloOp, "1 2", "not-the-token-0123456789"));
      wrong_token_reply = wrong.read_until_closed(closed_wrong);
      RawClient writer(port);  // its hello is refused, so its set must not land
      writer.send_bytes(RawClient::frame(kHelloOp, "1 2", "guess-guess-guess-guess") +
                        RawClient::frame(kSetOp, "secret", "injected"));
      bool closed = false;
      (void)writer.read_until_closed(closed);
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(r == 0 ? 0 : 300));
    const auto start = std::chrono::steady_clock::now();
    BootstrapStore store(info(r, 2, port), 10);
    listening = true;
    if (r == 0) store.set("secret", "worker-address");
    store.barrier("set");
    got[static_cast<std::size_t>(r)] = store.get("secret");
    seconds[static_cast<std::size_t>(r)] =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::this_thread::sleep_for(std::chrono::milliseconds(r == 0 ? 3000 : 0));
    store.barrier("done");
  });
  for (const auto& e : errors) CHECK_FALSE(e.has_value());
  CHECK(got[0] == "worker-address");
  CHECK(got[1] == "worker-address");
  CHECK(seconds[1] < 1.0);  // rank 1 was served while the stranger held its connections
  CHECK(closed_get);
  CHECK(stranger_saw.empty());  // no reply at all to a request before the token
  CHECK(closed_huge);
  CHECK(closed_wrong);
  CHECK(wrong_token_reply.find("store token differs") != std::string::npos);
  CHECK(wrong_token_reply.find("worker-address") == std::string::npos);
}

TEST_CASE("a malformed request from a rank gets an error reply, and the store serves on") {
  const int port = free_loopback_port();
  std::string reply, after;
  auto errors = test::on_threads(2, [&](int r) {
    BootstrapStore store(info(r, 3, port), 10);
    if (r == 1) {
      RawClient c(port);  // rank 2, speaking by hand
      c.send_bytes(RawClient::frame(kHelloOp, "2 3", "test-job-token-0123456789"));
      c.send_bytes(RawClient::frame(kMissingOp, "barrier/x/", "2abc"));
      c.send_bytes(RawClient::frame(kMissingOp, "barrier/x/", "1000000000"));
      c.send_bytes(RawClient::frame(kSetOp, "from-rank-2", "hello"));
      bool closed = false;
      reply = c.read_until_closed(closed);
      CHECK_FALSE(closed);
      after = store.get("from-rank-2");
      store.set("done", "");
    } else {
      (void)store.get("done");
    }
  });
  for (const auto& e : errors) CHECK_FALSE(e.has_value());
  CHECK(reply.find("count '2abc' is not a number in 1..3") != std::string::npos);
  CHECK(reply.find("count '1000000000' is not a number in 1..3") != std::string::npos);
  CHECK(after == "hello");
}

TEST_CASE("ranks with different tokens are told so") {
  const int port = free_loopback_port();
  auto errors = test::on_threads(2, [&](int r) {
    LaunchInfo i = info(r, 2, port);
    if (r == 1) i.store_token = "another-token-9876543210";
    BootstrapStore store(i, 2);
    store.barrier("b");
  });
  REQUIRE(errors[1].has_value());
  CHECK(errors[1]->message() ==
        "bootstrap store: rank 0 refused the connection: its store token differs (every rank "
        "needs the same SWITCHYARD_STORE_TOKEN, or the same per-user token file)");
}

TEST_CASE("without SWITCHYARD_STORE_TOKEN the ranks share a per-user token file, mode 600") {
  test::TempDir dir;
  setenv("XDG_CONFIG_HOME", dir.path().c_str(), 1);
  const int port = free_loopback_port();
  auto errors = test::on_threads(3, [&](int r) {
    LaunchInfo i = info(r, 3, port);
    i.store_token.clear();
    BootstrapStore store(i, 10);
    store.barrier("b");
  });
  for (const auto& e : errors) CHECK_FALSE(e.has_value());
  const auto file = dir / "switchyard" / "store-token";
  struct stat st {};
  REQUIRE(::stat(file.c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);
  CHECK(std::filesystem::file_size(file) == 65);  // 64 hex digits and a newline
  CHECK(std::distance(std::filesystem::directory_iterator(dir / "switchyard"),
                      std::filesystem::directory_iterator()) == 1);  // nothing left aside

  ::chmod(file.c_str(), 0644);
  LaunchInfo i = info(0, 1, free_loopback_port());
  i.store_token.clear();
  CHECK_THROWS_WITH_AS(BootstrapStore(i, 1),
                       doctest::Contains("store-token is readable or writable by others (chmod "
                                         "600 it)"),
                       Error);
  unsetenv("XDG_CONFIG_HOME");
}

TEST_CASE("SWITCHYARD_STORE_TOKEN is read, and a short one refused") {
  setenv("RANK", "0", 1);
  setenv("WORLD_SIZE", "1", 1);
  setenv("SWITCHYARD_STORE_TOKEN", "0123456789abcdef0123", 1);
  CHECK(LaunchInfo::from_environment()->store_token == "0123456789abcdef0123");
  setenv("SWITCHYARD_STORE_TOKEN", "short", 1);
  CHECK_THROWS_WITH_AS(LaunchInfo::from_environment(),
                       doctest::Contains("SWITCHYARD_STORE_TOKEN: 5 characters; a store token has "
                                         "16 to 512"),
                       Error);
  for (const char* v : {"RANK", "WORLD_SIZE", "SWITCHYARD_STORE_TOKEN"}) unsetenv(v);
}
