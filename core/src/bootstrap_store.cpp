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
#include <pwd.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>
#include <string_view>
#include <thread>

#include "switchyard/bootstrap.hpp"
#include "switchyard/status.hpp"

namespace switchyard {
namespace {

enum Op : std::uint8_t { kHello = 1, kSet = 2, kTryGet = 3, kMissing = 4 };
enum Reply : std::uint8_t { kOk = 0, kNotFound = 1, kFailed = 2 };

using Clock = std::chrono::steady_clock;

/// What a frame may hold. A client that has not yet presented the job's token may send
/// only a small HELLO, so a stranger can make rank 0 hold at most a few hundred bytes.
constexpr std::uint64_t kMaxKeyBytes = 1024;
constexpr std::uint64_t kMaxValueBytes = std::uint64_t{1} << 20;
constexpr std::uint64_t kMaxHelloKeyBytes = 64;
constexpr std::uint64_t kMaxHelloValueBytes = 512;
constexpr std::uint64_t kMaxReplyBytes = kMaxValueBytes + 64;
/// All values together: far above what start-up needs (addresses, ids, host names).
constexpr std::size_t kMaxStoredBytes = std::size_t{64} << 20;
/// Strangers' connections held at once; the oldest is dropped for a new one.
constexpr std::size_t kMaxUnauthenticated = 256;
/// A connection must present the token, and finish any frame it started, this fast.
constexpr double kConnectionDeadlineS = 5.0;

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
  if (!read_all(fd, &n, sizeof n, deadline) || n > kMaxReplyBytes) return false;
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

/// Compares without an early exit, so timing does not tell how much of a guess was right.
bool same_secret(const std::string& a, const std::string& b) {
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  const std::size_t n = std::min(a.size(), b.size());
  for (std::size_t i = 0; i < n; ++i)
    diff = static_cast<unsigned char>(
        diff | (static_cast<unsigned char>(a[i]) ^ static_cast<unsigned char>(b[i])));
  return diff == 0;
}

std::uint64_t load_u64(const char* p) {
  std::uint64_t v = 0;
  std::memcpy(&v, p, sizeof v);
  return v;
}

std::optional<int> parse_int(std::string_view text) {
  int value = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size()) return std::nullopt;
  return value;
}

/// Rank 0's server: a map, served to the ranks that presented the job's token. One thread
/// runs an event loop over non-blocking sockets, so no client, however slow or hostile,
/// holds up another; a malformed or oversized frame closes that connection only.
class Server {
 public:
  Server(const std::string& addr, int port, int world_size, std::string token)
      : world_size_(world_size), token_(std::move(token)) {
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
    ::fcntl(listen_fd_, F_SETFL, ::fcntl(listen_fd_, F_GETFL) | O_NONBLOCK);
    if (::pipe2(wake_, O_CLOEXEC) != 0) throw Error(ErrorCode::kSystem, "pipe: " + errno_text());
    thread_ = std::thread([this] { serve(); });
  }

  ~Server() {
    // Ranks still polling (the last barrier) need answers: wait briefly for them to hang up.
    const auto deadline = after(2.0);
    while (ranks_connected_.load() > 0 && Clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    const char byte = 1;
    (void)!::write(wake_[1], &byte, 1);
    thread_.join();
    for (const auto& c : connections_) ::close(c.fd);
    ::close(listen_fd_);
    ::close(wake_[0]);
    ::close(wake_[1]);
  }

 private:
  struct Connection {
    int fd = -1;
    bool authenticated = false;
    Clock::time_point deadline;  // to authenticate, or to finish a started frame
    std::string in;              // bytes of an unfinished frame
    std::string out;             // reply bytes not yet sent
    bool closing = false;        // close once `out` is sent
  };

  void serve() {
    std::vector<pollfd> fds;
    char chunk[16384];
    while (true) {
      fds.clear();
      fds.push_back({wake_[0], POLLIN, 0});
      fds.push_back({listen_fd_, POLLIN, 0});
      auto next_deadline = Clock::now() + std::chrono::seconds(1);
      for (const auto& c : connections_) {
        // A connection with a reply pending is not read: a client that never reads its
        // replies cannot make rank 0 queue more than one.
        const short events = c.out.empty() ? POLLIN : POLLOUT;
        fds.push_back({c.fd, events, 0});
        if (!c.authenticated || !c.in.empty()) next_deadline = std::min(next_deadline, c.deadline);
      }
      const auto wait_ms =
          std::chrono::duration_cast<std::chrono::milliseconds>(next_deadline - Clock::now())
              .count();
      if (::poll(fds.data(), fds.size(),
                 static_cast<int>(std::clamp<long long>(wait_ms, 0, 1000))) < 0) {
        if (errno == EINTR) continue;
        return;
      }
      if (fds[0].revents) return;
      const auto now = Clock::now();
      for (std::size_t i = 2; i < fds.size(); ++i) {
        Connection& c = connections_[i - 2];
        if (fds[i].revents & POLLOUT) flush(c);
        if ((fds[i].revents & POLLIN) && c.out.empty() && !c.closing) {
          const ssize_t got = ::recv(c.fd, chunk, sizeof chunk, 0);
          if (got > 0) {
            if (c.in.empty()) c.deadline = after(kConnectionDeadlineS);
            c.in.append(chunk, static_cast<std::size_t>(got));
            process(c);
            flush(c);
          } else if (got == 0 || (errno != EINTR && errno != EAGAIN)) {
            c.closing = true;
            c.out.clear();
          }
        } else if (fds[i].revents & (POLLERR | POLLHUP | POLLNVAL)) {
          c.closing = true;
          c.out.clear();
        }
        if ((!c.authenticated || !c.in.empty()) && now >= c.deadline) {
          c.closing = true;  // a stranger who never said the token, or a stalled frame
          c.out.clear();
        }
      }
      drop_closed();
      if (fds[1].revents & POLLIN) accept_all();
    }
  }

  void accept_all() {
    while (true) {
      const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
      if (fd < 0) return;  // EAGAIN, or out of descriptors: the next poll retries
      std::size_t strangers = 0;
      for (const auto& c : connections_) strangers += c.authenticated ? 0 : 1;
      if (strangers >= kMaxUnauthenticated) {
        for (auto& c : connections_) {
          if (!c.authenticated) {
            ::close(c.fd);
            c = connections_.back();
            connections_.pop_back();
            break;
          }
        }
      }
      Connection c;
      c.fd = fd;
      c.deadline = after(kConnectionDeadlineS);
      connections_.push_back(std::move(c));
    }
  }

  void drop_closed() {
    for (std::size_t i = 0; i < connections_.size();) {
      Connection& c = connections_[i];
      if (!c.closing || !c.out.empty()) {
        ++i;
        continue;
      }
      ::close(c.fd);
      if (auto it = rank_of_fd_.find(c.fd); it != rank_of_fd_.end()) {
        rank_of_fd_.erase(it);
        --ranks_connected_;
      }
      connections_.erase(connections_.begin() + static_cast<std::ptrdiff_t>(i));
    }
  }

  void flush(Connection& c) {
    while (!c.out.empty()) {
      const ssize_t sent = ::send(c.fd, c.out.data(), c.out.size(), MSG_NOSIGNAL);
      if (sent > 0) {
        c.out.erase(0, static_cast<std::size_t>(sent));
      } else if (sent < 0 && errno == EINTR) {
        continue;
      } else {
        if (sent < 0 && errno != EAGAIN) {
          c.out.clear();
          c.closing = true;
        }
        return;
      }
    }
  }

  /// Serves every complete frame in `c.in`; a bad one closes the connection.
  void process(Connection& c) {
    while (!c.closing) {
      const std::uint64_t key_limit = c.authenticated ? kMaxKeyBytes : kMaxHelloKeyBytes;
      const std::uint64_t value_limit = c.authenticated ? kMaxValueBytes : kMaxHelloValueBytes;
      if (c.in.size() < 9) return;
      const auto op = static_cast<std::uint8_t>(c.in[0]);
      const std::uint64_t key_size = load_u64(c.in.data() + 1);
      if (key_size > key_limit || (!c.authenticated && op != kHello)) return refuse(c);
      if (c.in.size() < 17 + key_size) return;
      const std::uint64_t value_size = load_u64(c.in.data() + 9 + key_size);
      if (value_size > value_limit) return refuse(c);
      const std::size_t frame = 17 + key_size + value_size;
      if (c.in.size() < frame) return;
      const std::string key = c.in.substr(9, key_size);
      const std::string value = c.in.substr(17 + key_size, value_size);
      c.in.erase(0, frame);
      serve_request(c, op, key, value);
    }
  }

  /// Closes a connection that broke the protocol, without a word: it may be a stranger.
  static void refuse(Connection& c) {
    c.in.clear();
    c.in.shrink_to_fit();
    c.closing = true;
  }

  void reply(Connection& c, Reply status, const std::string& body) {
    const std::uint64_t n = body.size();
    c.out.push_back(static_cast<char>(status));
    c.out.append(reinterpret_cast<const char*>(&n), sizeof n);
    c.out += body;
  }

  void serve_request(Connection& c, std::uint8_t op, const std::string& key,
                     const std::string& value) {
    switch (op) {
      case kHello:
        return hello(c, key, value);
      case kSet: {
        auto it = values_.find(key);
        const std::size_t old_bytes = it == values_.end() ? 0 : key.size() + it->second.size();
        if (stored_bytes_ - old_bytes + key.size() + value.size() > kMaxStoredBytes) {
          return reply(c, kFailed,
                       "the store holds " + std::to_string(stored_bytes_) +
                           " bytes and takes at most " + std::to_string(kMaxStoredBytes));
        }
        stored_bytes_ = stored_bytes_ - old_bytes + key.size() + value.size();
        values_[key] = value;
        return reply(c, kOk, "");
      }
      case kTryGet: {
        auto it = values_.find(key);
        return it == values_.end() ? reply(c, kNotFound, "") : reply(c, kOk, it->second);
      }
      case kMissing: {
        const auto count = parse_int(value);
        if (!count || *count < 1 || *count > world_size_) {
          return reply(c, kFailed,
                       "MISSING: count '" + value.substr(0, 32) + "' is not a number in 1.." +
                           std::to_string(world_size_));
        }
        std::string missing;
        for (int i = 0; i < *count; ++i) {
          if (values_.count(key + std::to_string(i)) == 0) missing += std::to_string(i) + " ";
        }
        return reply(c, kOk, missing);
      }
      default:
        reply(c, kFailed, "unknown request");
        c.closing = true;
    }
  }

  void hello(Connection& c, const std::string& key, const std::string& token) {
    if (!same_secret(token, token_)) {
      // Said, so that a rank started with another token knows why; then the door closes.
      reply(c, kFailed,
            "rank 0 refused the connection: its store token differs (every rank needs the same "
            "SWITCHYARD_STORE_TOKEN, or the same per-user token file)");
      c.closing = true;
      return;
    }
    const std::size_t space = key.find(' ');
    const auto rank = parse_int(std::string_view(key).substr(0, space));
    const auto world = space == std::string::npos
                           ? std::nullopt
                           : parse_int(std::string_view(key).substr(space + 1));
    if (!rank || !world) {
      reply(c, kFailed, "malformed hello");
      c.closing = true;
      return;
    }
    if (*world != world_size_) {
      reply(c, kFailed,
            "rank " + std::to_string(*rank) +
                " was started with WORLD_SIZE=" + std::to_string(*world) +
                " but rank 0 with WORLD_SIZE=" + std::to_string(world_size_) +
                "; every rank needs the same");
      return;
    }
    if (*rank < 0 || *rank >= world_size_) {
      reply(c, kFailed,
            "rank " + std::to_string(*rank) + " is outside 0.." + std::to_string(world_size_ - 1));
      return;
    }
    for (const auto& [other_fd, other_rank] : rank_of_fd_) {
      if (other_rank == *rank && other_fd != c.fd) {
        reply(c, kFailed, "two processes claim RANK=" + std::to_string(*rank));
        return;
      }
    }
    if (!c.authenticated) ++ranks_connected_;
    c.authenticated = true;
    rank_of_fd_[c.fd] = *rank;
    reply(c, kOk, "");
  }

  const int world_size_;
  const std::string token_;
  int listen_fd_ = -1;
  int wake_[2] = {-1, -1};
  std::vector<Connection> connections_;
  std::map<int, int> rank_of_fd_;
  std::map<std::string, std::string> values_;
  std::size_t stored_bytes_ = 0;
  std::atomic<int> ranks_connected_{0};
  std::thread thread_;
};

/// The per-user token file: `$XDG_CONFIG_HOME/switchyard/store-token`, else
/// `~/.config/switchyard/store-token`.
std::filesystem::path user_token_path() {
  if (const char* xdg = std::getenv("XDG_CONFIG_HOME"); xdg != nullptr && *xdg == '/')
    return std::filesystem::path(xdg) / "switchyard" / "store-token";
  const char* home = std::getenv("HOME");
  std::string home_dir = home != nullptr && *home == '/' ? home : "";
  if (home_dir.empty()) {
    if (const passwd* pw = ::getpwuid(::geteuid()); pw != nullptr && pw->pw_dir != nullptr)
      home_dir = pw->pw_dir;
  }
  if (home_dir.empty()) {
    throw Error(ErrorCode::kUnavailable,
                "bootstrap store: SWITCHYARD_STORE_TOKEN is not set and there is no home folder "
                "for a per-user token file; set SWITCHYARD_STORE_TOKEN on every rank");
  }
  return std::filesystem::path(home_dir) / ".config" / "switchyard" / "store-token";
}

/// Reads a token file that only its owner (this user) can read or write.
std::optional<std::string> read_token_file(const std::filesystem::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
  if (fd < 0) {
    if (errno == ENOENT) return std::nullopt;
    throw Error(ErrorCode::kUnavailable, "bootstrap store: cannot open the token file " +
                                             path.string() + ": " + errno_text() +
                                             " (it must be a regular file, not a link)");
  }
  struct stat st {};
  std::string why;
  if (::fstat(fd, &st) != 0) {
    why = errno_text();
  } else if (!S_ISREG(st.st_mode)) {
    why = "not a regular file";
  } else if (st.st_uid != ::geteuid()) {
    why = "owned by another user";
  } else if ((st.st_mode & 077) != 0) {
    why = "readable or writable by others (chmod 600 it)";
  }
  char text[600];
  ssize_t got = 0;
  if (why.empty()) {
    got = ::read(fd, text, sizeof text);
    if (got < 0) why = errno_text();
  }
  ::close(fd);
  std::string token(text, static_cast<std::size_t>(std::max<ssize_t>(got, 0)));
  while (!token.empty() && std::isspace(static_cast<unsigned char>(token.back()))) token.pop_back();
  if (why.empty() && (token.size() < kMinStoreTokenChars || token.size() > kMaxStoreTokenChars))
    why = "not a token of 16 to 512 characters";
  if (!why.empty())
    throw Error(ErrorCode::kUnavailable,
                "bootstrap store: the token file " + path.string() + " is " + why);
  return token;
}

/// This user's token: read from the token file, which is created (mode 600) at first use.
/// Ranks of one job on machines that share the home folder thus agree without being told.
std::string user_store_token() {
  const auto path = user_token_path();
  if (auto token = read_token_file(path)) return *token;
  std::error_code ec;
  std::filesystem::create_directories(path.parent_path(), ec);
  ::chmod(path.parent_path().c_str(), 0700);
  // Written aside and linked into place, so two ranks starting together end up with one.
  const std::string token = new_store_token() + "\n";
  const auto aside = path.string() + "." + new_store_token().substr(0, 16) + ".tmp";
  const int fd = ::open(aside.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) {
    throw Error(ErrorCode::kUnavailable, "bootstrap store: cannot create the token file " +
                                             path.string() + ": " + errno_text() +
                                             "; set SWITCHYARD_STORE_TOKEN on every rank instead");
  }
  const bool written =
      ::write(fd, token.data(), token.size()) == static_cast<ssize_t>(token.size());
  ::close(fd);
  const bool linked = written && (::link(aside.c_str(), path.c_str()) == 0 || errno == EEXIST);
  ::unlink(aside.c_str());
  if (!linked) {
    throw Error(ErrorCode::kUnavailable, "bootstrap store: cannot write the token file " +
                                             path.string() + ": " + errno_text() +
                                             "; set SWITCHYARD_STORE_TOKEN on every rank instead");
  }
  return *read_token_file(path);
}

}  // namespace

struct BootstrapStore::Impl {
  LaunchInfo info;
  double timeout_s;
  std::string where;  // addr:port for messages
  std::unique_ptr<Server> server;
  int fd = -1;
  std::mutex mutex;
  std::atomic<int> rounds{0};

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
  const std::string token = info.store_token.empty() ? user_store_token() : info.store_token;
  if (info.rank == 0)
    impl_->server =
        std::make_unique<Server>(info.master_addr, info.master_port, info.world_size, token);

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
    impl_->request(kHello, std::to_string(info.rank) + " " + std::to_string(info.world_size), token,
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

std::shared_ptr<BootstrapStore> BootstrapStore::shared(const LaunchInfo& info, double timeout_s) {
  // Never released before exit: a later runtime of this process reuses the store.
  static std::mutex mutex;
  static std::map<std::string, std::shared_ptr<BootstrapStore>> stores;
  const std::string job = info.master_addr + ":" + std::to_string(info.master_port) + " " +
                          std::to_string(info.rank) + "/" + std::to_string(info.world_size) + " " +
                          info.store_token;
  std::lock_guard<std::mutex> lock(mutex);
  auto& store = stores[job];
  if (!store) store = std::make_shared<BootstrapStore>(info, timeout_s);
  return store;
}

int BootstrapStore::next_round() noexcept { return impl_->rounds.fetch_add(1); }

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

std::string new_store_token() {
  unsigned char bytes[32];
  std::size_t have = 0;
  while (have < sizeof bytes) {
    const ssize_t got = ::getrandom(bytes + have, sizeof bytes - have, 0);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) throw Error(ErrorCode::kSystem, "getrandom: " + errno_text());
    have += static_cast<std::size_t>(got);
  }
  static constexpr char kHex[] = "0123456789abcdef";
  std::string token;
  for (unsigned char b : bytes) {
    token.push_back(kHex[b >> 4]);
    token.push_back(kHex[b & 15]);
  }
  return token;
}

int free_loopback_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw Error(ErrorCode::kSystem, "cannot find a free port: socket: " + errno_text());
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t length = sizeof addr;
  const bool found = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
                     ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &length) == 0;
  const std::string why = found ? "" : errno_text();
  ::close(fd);
  if (!found) throw Error(ErrorCode::kSystem, "cannot find a free port: " + why);
  return ntohs(addr.sin_port);
}

}  // namespace switchyard
