// The bootstrap store: rank 0 serves a key-value map over TCP from a background thread;
// clients poll it with short requests, so no request ever blocks the server and every
// client wait is bounded by its own deadline.
//
// Frame: u8 op, u64 length, key bytes, u64 length, value bytes (little-endian lengths).
// Reply: u8 status (0 ok, 1 not found, 2 error), u64 length, bytes.
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>

#include "switchyard/bootstrap.hpp"
#include "switchyard/status.hpp"

namespace switchyard {
namespace {

enum Op : std::uint8_t { kHello = 1, kSet = 2, kTryGet = 3, kMissing = 4 };
enum Reply : std::uint8_t { kOk = 0, kNotFound = 1, kFailed = 2 };

using Clock = std::chrono::steady_clock;

std::string errno_text() { return std::strerror(errno); }

/// Writes all of `data`; false on error.
bool write_all(int fd, const void* data, std::size_t n) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    p += w;
    n -= static_cast<std::size_t>(w);
  }
  return true;
}

/// Reads exactly n bytes before `deadline`; false on EOF, error or timeout.
bool read_all(int fd, void* data, std::size_t n, Clock::time_point deadline) {
  char* p = static_cast<char*>(data);
  while (n > 0) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    if (left <= 0) return false;
    pollfd pfd{fd, POLLIN, 0};
    const int ready = ::poll(&pfd, 1, static_cast<int>(std::min<long long>(left, 1000)));
    if (ready < 0 && errno == EINTR) continue;
    if (ready < 0) return false;
    if (ready == 0) continue;
    const ssize_t r = ::recv(fd, p, n, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    p += r;
    n -= static_cast<std::size_t>(r);
  }
  return true;
}

bool write_field(int fd, const std::string& s) {
  const std::uint64_t n = s.size();
  return write_all(fd, &n, sizeof n) && write_all(fd, s.data(), s.size());
}

bool read_field(int fd, std::string& s, Clock::time_point deadline) {
  std::uint64_t n = 0;
  if (!read_all(fd, &n, sizeof n, deadline) || n > (std::uint64_t{1} << 32)) return false;
  s.resize(n);
  return read_all(fd, s.data(), n, deadline);
}

Clock::time_point after(double seconds) {
  return Clock::now() +
         std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

std::string join(const std::vector<int>& v) {
  std::string s;
  for (int x : v) {
    if (!s.empty()) s += ", ";
    s += std::to_string(x);
  }
  return s;
}

addrinfo* resolve(const std::string& host, int port, bool passive) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  if (passive) hints.ai_flags = AI_PASSIVE;
  addrinfo* result = nullptr;
  const int rc = ::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &result);
  if (rc != 0) {
    throw Error(ErrorCode::kInvalidArgument,
                "bootstrap store: cannot resolve MASTER_ADDR=" + host + ": " + gai_strerror(rc));
  }
  return result;
}

/// Rank 0's server: a map and the ranks that said hello.
class Server {
 public:
  Server(const std::string& addr, int port, int world_size) : world_size_(world_size) {
    addrinfo* ai = resolve(addr, port, true);
    std::string last_error = "no address";
    for (addrinfo* a = ai; a != nullptr; a = a->ai_next) {
      const int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
      if (fd < 0) continue;
      const int one = 1;
      ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
      if (::bind(fd, a->ai_addr, a->ai_addrlen) == 0 && ::listen(fd, 256) == 0) {
        listen_fd_ = fd;
        break;
      }
      last_error = errno_text();
      ::close(fd);
    }
    ::freeaddrinfo(ai);
    if (listen_fd_ < 0) {
      throw Error(ErrorCode::kUnavailable,
                  "bootstrap store: rank 0 cannot listen on " + addr + ":" + std::to_string(port) +
                      ": " + last_error + " (is another job using MASTER_PORT? pick a free one)");
    }
    if (::pipe2(wake_, O_CLOEXEC) != 0) throw Error(ErrorCode::kSystem, "pipe: " + errno_text());
    thread_ = std::thread([this] { serve(); });
  }

  ~Server() {
    // Ranks still polling (the last barrier) need answers: wait briefly for them to hang up.
    const auto deadline = after(2.0);
    while (connected_.load() > 0 && Clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    const char byte = 1;
    (void)!::write(wake_[1], &byte, 1);
    thread_.join();
    for (int fd : clients_) ::close(fd);
    ::close(listen_fd_);
    ::close(wake_[0]);
    ::close(wake_[1]);
  }

 private:
  void serve() {
    // `fds` keeps its capacity: once every rank has connected, waking up (a rank hanging
    // up while the job computes) allocates nothing.
    std::vector<pollfd> fds;
    while (true) {
      fds.clear();
      fds.push_back({wake_[0], POLLIN, 0});
      fds.push_back({listen_fd_, POLLIN, 0});
      for (int fd : clients_) fds.push_back({fd, POLLIN, 0});
      if (::poll(fds.data(), fds.size(), -1) < 0) {
        if (errno == EINTR) continue;
        return;
      }
      if (fds[0].revents) return;
      if (fds[1].revents & POLLIN) {
        const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
        if (fd >= 0) {
          clients_.push_back(fd);
          ++connected_;
        }
      }
      for (std::size_t i = 2; i < fds.size(); ++i) {
        if (fds[i].revents == 0) continue;
        if (!handle(fds[i].fd)) {
          ::close(fds[i].fd);
          clients_.erase(std::find(clients_.begin(), clients_.end(), fds[i].fd));
          rank_of_fd_.erase(fds[i].fd);
          --connected_;
        }
      }
    }
  }

  /// Serves one request; false when the connection is finished.
  bool handle(int fd) {
    const auto deadline = after(10);
    std::uint8_t op = 0;
    std::string key, value;
    if (!read_all(fd, &op, 1, deadline) || !read_field(fd, key, deadline) ||
        !read_field(fd, value, deadline)) {
      return false;
    }
    auto reply = [fd](Reply status, const std::string& body) {
      return ::send(fd, &status, 1, MSG_NOSIGNAL) == 1 && write_field(fd, body);
    };
    switch (op) {
      case kHello: {
        int rank = -1, world = -1;
        std::istringstream(key) >> rank >> world;
        if (world != world_size_) {
          return reply(kFailed, "rank " + std::to_string(rank) +
                                    " was started with WORLD_SIZE=" + std::to_string(world) +
                                    " but rank 0 with WORLD_SIZE=" + std::to_string(world_size_) +
                                    "; every rank needs the same");
        }
        if (rank < 0 || rank >= world_size_) {
          return reply(kFailed, "rank " + std::to_string(rank) + " is outside 0.." +
                                    std::to_string(world_size_ - 1));
        }
        for (const auto& [other_fd, other_rank] : rank_of_fd_) {
          if (other_rank == rank && other_fd != fd) {
            return reply(kFailed, "two processes claim RANK=" + std::to_string(rank));
          }
        }
        rank_of_fd_[fd] = rank;
        return reply(kOk, "");
      }
      case kSet:
        values_[key] = value;
        return reply(kOk, "");
      case kTryGet: {
        auto it = values_.find(key);
        return it == values_.end() ? reply(kNotFound, "") : reply(kOk, it->second);
      }
      case kMissing: {
        const int count = std::stoi(value);
        std::string missing;
        for (int i = 0; i < count; ++i) {
          if (values_.count(key + std::to_string(i)) == 0) missing += std::to_string(i) + " ";
        }
        return reply(kOk, missing);
      }
      default:
        return reply(kFailed, "unknown request");
    }
  }

  const int world_size_;
  int listen_fd_ = -1;
  int wake_[2] = {-1, -1};
  std::vector<int> clients_;
  std::map<int, int> rank_of_fd_;
  std::map<std::string, std::string> values_;
  std::atomic<int> connected_{0};
  std::thread thread_;
};

}  // namespace

struct BootstrapStore::Impl {
  LaunchInfo info;
  double timeout_s;
  std::string where;  // addr:port for messages
  std::unique_ptr<Server> server;
  int fd = -1;
  std::mutex mutex;

  /// One request and its reply; throws on a broken connection or a failed request.
  std::pair<Reply, std::string> request(Op op, const std::string& key, const std::string& value,
                                        const char* what) {
    std::lock_guard<std::mutex> lock(mutex);
    const auto deadline = after(timeout_s);
    std::uint8_t status = 0;
    std::string body;
    if (!write_all(fd, &op, 1) || !write_field(fd, key) || !write_field(fd, value) ||
        !read_all(fd, &status, 1, deadline) || !read_field(fd, body, deadline)) {
      throw Error(ErrorCode::kUnavailable, std::string("bootstrap store ") + what +
                                               ": lost the connection to the store at " + where +
                                               " (did rank 0 exit?)");
    }
    if (status == kFailed) throw Error(ErrorCode::kInvalidArgument, "bootstrap store: " + body);
    return {static_cast<Reply>(status), body};
  }

  /// Polls until `MISSING(prefix)` is empty; a timeout names the missing ranks.
  void wait_for_all(const std::string& prefix, const std::string& what) {
    const auto deadline = after(timeout_s);
    auto pause = std::chrono::milliseconds(1);
    while (true) {
      const std::string missing =
          request(kMissing, prefix, std::to_string(info.world_size), what.c_str()).second;
      if (missing.empty()) return;
      if (Clock::now() >= deadline) {
        std::vector<int> ranks;
        std::istringstream in(missing);
        for (int r; in >> r;) ranks.push_back(r);
        throw Error(ErrorCode::kTimeout, "bootstrap " + what + ": timed out after " +
                                             format_seconds(timeout_s) + " waiting for rank(s) " +
                                             join(ranks) +
                                             " (never started, or a wrong RANK/WORLD_SIZE?)");
      }
      std::this_thread::sleep_for(pause);
      pause = std::min(pause * 2, std::chrono::milliseconds(50));
    }
  }
};

BootstrapStore::BootstrapStore(const LaunchInfo& info, double timeout_s)
    : impl_(std::make_unique<Impl>()) {
  if (!info.has_store()) {
    throw Error(
        ErrorCode::kUnavailable,
        "bootstrap store: MASTER_ADDR and MASTER_PORT are not set; start the ranks with "
        "`switchyard launch -n N -- ...` or set MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE");
  }
  impl_->info = info;
  impl_->timeout_s = timeout_s;
  impl_->where = info.master_addr + ":" + std::to_string(info.master_port);
  if (info.rank == 0)
    impl_->server = std::make_unique<Server>(info.master_addr, info.master_port, info.world_size);

  // Connect, retrying until rank 0 listens or the deadline passes.
  const auto deadline = after(timeout_s);
  std::string last_error;
  while (impl_->fd < 0) {
    addrinfo* ai = resolve(info.master_addr, info.master_port, false);
    for (addrinfo* a = ai; a != nullptr && impl_->fd < 0; a = a->ai_next) {
      const int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
      if (fd < 0) continue;
      if (::connect(fd, a->ai_addr, a->ai_addrlen) == 0) {
        const int one = 1;
        ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        impl_->fd = fd;
      } else {
        last_error = errno_text();
        ::close(fd);
      }
    }
    ::freeaddrinfo(ai);
    if (impl_->fd >= 0) break;
    if (Clock::now() >= deadline) {
      throw Error(ErrorCode::kTimeout,
                  "bootstrap store: rank " + std::to_string(info.rank) +
                      " could not reach the store at " + impl_->where + " within " +
                      format_seconds(timeout_s) + " (" + last_error +
                      "); is rank 0 running, and are MASTER_ADDR/MASTER_PORT right?");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  try {
    impl_->request(kHello, std::to_string(info.rank) + " " + std::to_string(info.world_size), "",
                   "hello");
  } catch (const Error& e) {
    if (e.code() == ErrorCode::kUnavailable) {
      throw Error(ErrorCode::kTimeout, "bootstrap store: no answer from " + impl_->where +
                                           " within " + format_seconds(timeout_s) +
                                           "; is something else listening on MASTER_PORT?");
    }
    throw;
  }
}

BootstrapStore::~BootstrapStore() {
  if (!impl_) return;
  if (impl_->fd >= 0) ::close(impl_->fd);  // hang up first, then (rank 0) stop serving
  impl_->server.reset();
}

int BootstrapStore::rank() const noexcept { return impl_->info.rank; }
int BootstrapStore::world_size() const noexcept { return impl_->info.world_size; }

void BootstrapStore::set(const std::string& key, const std::string& value) {
  impl_->request(kSet, key, value, "set");
}

std::string BootstrapStore::get(const std::string& key) {
  const auto deadline = after(impl_->timeout_s);
  auto pause = std::chrono::milliseconds(1);
  while (true) {
    auto [status, body] = impl_->request(kTryGet, key, "", "get");
    if (status == kOk) return body;
    if (Clock::now() >= deadline) {
      throw Error(ErrorCode::kTimeout, "bootstrap store get '" + key + "': timed out after " +
                                           format_seconds(impl_->timeout_s) + "; no rank set it");
    }
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::milliseconds(50));
  }
}

void BootstrapStore::barrier(const std::string& name) {
  const std::string prefix = "barrier/" + name + "/";
  set(prefix + std::to_string(rank()), "");
  impl_->wait_for_all(prefix, "barrier '" + name + "'");
}

std::vector<std::string> BootstrapStore::allgather(const std::string& name,
                                                   const std::string& value) {
  const std::string prefix = "allgather/" + name + "/";
  set(prefix + std::to_string(rank()), value);
  impl_->wait_for_all(prefix, "allgather '" + name + "'");
  std::vector<std::string> values;
  for (int r = 0; r < world_size(); ++r) values.push_back(get(prefix + std::to_string(r)));
  return values;
}

}  // namespace switchyard
