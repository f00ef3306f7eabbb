// libFuzzer target: the bootstrap store's wire protocol, as a client on the same machine
// would speak it. One store (rank 0 of a 64-rank job) serves for the whole run; each input
// is sent on a fresh connection, after a correct hello when its first byte is odd (so that
// the requests behind the token are reached), and the reply is read until the store
// closes the connection. A crash or sanitizer report in the store's thread ends the run.
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <memory>
#include <string>

#include "fuzz_support.hpp"
#include "switchyard/bootstrap.hpp"

namespace {

constexpr const char* kToken = "fuzzing-token-0123456789";

int store_port() {
  static const int port = switchyard::free_loopback_port();
  return port;
}

switchyard::BootstrapStore& store() {
  static auto* s = [] {
    switchyard::LaunchInfo info;
    info.rank = 0;
    info.world_size = 64;
    info.master_addr = "127.0.0.1";
    info.master_port = store_port();
    info.store_token = kToken;
    return new switchyard::BootstrapStore(info, 10);  // lives for the whole run
  }();
  return *s;
}

std::string frame(std::uint8_t op, const std::string& key, const std::string& value) {
  std::string f(1, static_cast<char>(op));
  const std::uint64_t k = key.size(), v = value.size();
  f.append(reinterpret_cast<const char*>(&k), 8);
  f += key;
  f.append(reinterpret_cast<const char*>(&v), 8);
  f += value;
  return f;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  store();
  static int next_rank = 0;
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<std::uint16_t>(store_port()));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd);
    return 0;
  }
  std::string bytes;
  if (size > 0 && (data[0] & 1) != 0) {
    next_rank = next_rank % 63 + 1;  // ranks 1..63; rank 0 is the store's own client
    bytes = frame(1, std::to_string(next_rank) + " 64", kToken);
  }
  bytes.append(reinterpret_cast<const char*>(data), size);
  std::size_t sent = 0;
  while (sent < bytes.size()) {
    const ssize_t n = ::send(fd, bytes.data() + sent, bytes.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) break;
    sent += static_cast<std::size_t>(n);
  }
  ::shutdown(fd, SHUT_WR);
  char reply[65536];
  for (int polls = 0; polls < 200; ++polls) {  // until the store hangs up (at most 2 s)
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 10) <= 0) continue;
    if (::recv(fd, reply, sizeof reply, 0) <= 0) break;
  }
  ::close(fd);
  return 0;
}
