// `switchyard launch -n N [--ranks-per-node M] [--grace S] -- COMMAND...`: starts N local
// processes with the launcher variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
// MASTER_ADDR, MASTER_PORT), prefixes their output with the rank, and if one fails, stops
// the others and fails too.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "commands.hpp"
#include "switchyard/bootstrap.hpp"
#include "switchyard/status.hpp"

namespace switchyard::tool {
namespace {

/// The signal that asked the launcher to stop (SIGINT, SIGTERM, SIGHUP), or 0.
volatile std::sig_atomic_t stop_signal = 0;
void on_signal(int signal) {
  if (stop_signal == 0) stop_signal = signal;
}

struct Child {
  pid_t pid = -1;
  int output = -1;      // read end of the child's stdout+stderr
  std::string partial;  // an unfinished line
  bool running = true;
  bool stopped = false;  // stopped by a signal (SIGSTOP, SIGTSTP), not yet continued
  int stop_signal = 0;
  int exit_code = 0;
};

/// Sends `signal` to every running child's process group; a stopped child is continued
/// too, or it would only see the signal when someone else wakes it.
void signal_children(const std::vector<Child>& children, int signal) {
  for (const auto& c : children) {
    if (!c.running || c.pid <= 0) continue;
    ::kill(-c.pid, signal);
    if (signal != SIGKILL) ::kill(-c.pid, SIGCONT);
  }
}

/// Kills the children started so far, waits for them, and throws: a launch that cannot
/// start rank `rank` (`call` failed with `error`) leaves none behind.
[[noreturn]] void abandon_start(std::vector<Child>& children, int rank, const char* call,
                                int error) {
  signal_children(children, SIGKILL);
  for (auto& c : children) {
    if (c.pid > 0) ::waitpid(c.pid, nullptr, 0);
    if (c.output >= 0) ::close(c.output);
  }
  throw Error(ErrorCode::kSystem, "launch: cannot start rank " + std::to_string(rank) + ": " +
                                      call + ": " + std::strerror(error) + "; the " +
                                      std::to_string(rank) +
                                      " rank(s) already started were stopped");
}

void forward_lines(Child& child, int rank, const char* data, std::size_t n) {
  child.partial.append(data, n);
  std::size_t start = 0;
  for (std::size_t nl; (nl = child.partial.find('\n', start)) != std::string::npos;
       start = nl + 1) {
    std::printf("[rank %d] %.*s\n", rank, static_cast<int>(nl - start),
                child.partial.data() + start);
  }
  child.partial.erase(0, start);
  std::fflush(stdout);
}

}  // namespace

int launch_command(const std::vector<std::string>& args) {
  int n = 0, per_node = 0;
  double grace_s = 2.0;
  std::size_t i = 0;
  for (; i < args.size() && args[i] != "--"; ++i) {
    if ((args[i] == "-n" || args[i] == "--ranks") && i + 1 < args.size()) {
      const auto value = parse_integer_flag("launch", "-n", args[++i], 1, 4096);
      if (!value) return kExitUsage;
      n = static_cast<int>(*value);
    } else if (args[i] == "--ranks-per-node" && i + 1 < args.size()) {
      const auto value = parse_integer_flag("launch", "--ranks-per-node", args[++i], 1, 4096);
      if (!value) return kExitUsage;
      per_node = static_cast<int>(*value);
    } else if (args[i] == "--grace" && i + 1 < args.size()) {
      const auto value = parse_seconds_flag("launch", "--grace", args[++i], 0.0, 3600.0);
      if (!value) return kExitUsage;
      grace_s = *value;
    } else {
      break;
    }
  }
  if (n < 1 || per_node < 0 || i >= args.size() || args[i] != "--" || i + 1 >= args.size()) {
    std::fprintf(
        stderr,
        "usage: switchyard launch -n N [--ranks-per-node M] [--grace SECONDS] -- COMMAND "
        "[ARGS]...\n"
        "  starts N processes of COMMAND with RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,\n"
        "  MASTER_ADDR and MASTER_PORT set; M > 0 emulates nodes of M ranks\n"
        "  (SWITCHYARD_RUNTIME_RANKS_PER_NODE); when a rank fails, the others get SECONDS (default "
        "2)\n"
        "  to report and exit, then are terminated\n");
    return kExitUsage;
  }
  std::vector<char*> argv;
  for (std::size_t a = i + 1; a < args.size(); ++a)
    argv.push_back(const_cast<char*>(args[a].c_str()));
  argv.push_back(nullptr);

  const int port = free_loopback_port();
  // A fresh secret per job: only these ranks can use the store (see bootstrap.hpp).
  const std::string token = new_store_token();
  const int local_size = per_node > 0 ? per_node : n;
  for (int signal : {SIGINT, SIGTERM, SIGHUP}) std::signal(signal, on_signal);
  const pid_t launcher = ::getpid();
  std::vector<Child> children(static_cast<std::size_t>(n));
  for (int r = 0; r < n; ++r) {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) abandon_start(children, r, "pipe", errno);
    const pid_t pid = ::fork();
    if (pid < 0) {
      const int error = errno;
      ::close(fds[0]);
      ::close(fds[1]);
      abandon_start(children, r, "fork", error);
    }
    if (pid == 0) {
      // Dies with the launcher, even when it is killed with SIGKILL and cannot stop us.
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != launcher) ::_exit(128 + SIGKILL);
      for (int signal : {SIGINT, SIGTERM, SIGHUP}) std::signal(signal, SIG_DFL);
      ::setpgid(0, 0);  // its own process group, so that stopping it stops its children too
      ::dup2(fds[1], 1);
      ::dup2(fds[1], 2);
      ::setenv("RANK", std::to_string(r).c_str(), 1);
      ::setenv("WORLD_SIZE", std::to_string(n).c_str(), 1);
      ::setenv("LOCAL_RANK", std::to_string(r % local_size).c_str(), 1);
      const int node_first = r / local_size * local_size;
      ::setenv("LOCAL_WORLD_SIZE", std::to_string(std::min(local_size, n - node_first)).c_str(), 1);
      ::setenv("MASTER_ADDR", "127.0.0.1", 1);
      ::setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
      ::setenv("SWITCHYARD_STORE_TOKEN", token.c_str(), 1);
      if (per_node > 0)
        ::setenv("SWITCHYARD_RUNTIME_RANKS_PER_NODE", std::to_string(per_node).c_str(), 1);
      ::execvp(argv[0], argv.data());
      std::fprintf(stderr, "switchyard launch: cannot run %s: %s\n", argv[0], std::strerror(errno));
      ::_exit(127);
    }
    ::close(fds[1]);
    ::setpgid(pid, pid);
    children[static_cast<std::size_t>(r)].pid = pid;
    children[static_cast<std::size_t>(r)].output = fds[0];
  }

  using Clock = std::chrono::steady_clock;
  int first_failure = -1;
  bool terminated = false, killed = false;
  Clock::time_point failed_at, all_exited_at;
  char buffer[65536];
  while (true) {
    std::vector<pollfd> fds;
    std::vector<int> ranks;
    for (int r = 0; r < n; ++r) {
      if (children[static_cast<std::size_t>(r)].output >= 0) {
        fds.push_back({children[static_cast<std::size_t>(r)].output, POLLIN, 0});
        ranks.push_back(r);
      }
    }
    bool any_running = false;
    for (const auto& c : children) any_running = any_running || c.running;
    if (any_running) all_exited_at = Clock::now();
    // Done when every rank exited and its output is drained (or only a leftover
    // grandchild still holds the pipe after a second).
    if (!any_running && (fds.empty() || Clock::now() - all_exited_at > std::chrono::seconds(1)))
      break;
    if (!fds.empty())
      ::poll(fds.data(), fds.size(), 100);
    else
      ::usleep(100000);
    for (std::size_t f = 0; f < fds.size(); ++f) {
      if (fds[f].revents == 0) continue;
      Child& c = children[static_cast<std::size_t>(ranks[f])];
      const ssize_t got = ::read(c.output, buffer, sizeof buffer);
      if (got > 0) {
        forward_lines(c, ranks[f], buffer, static_cast<std::size_t>(got));
      } else {
        if (!c.partial.empty()) forward_lines(c, ranks[f], "\n", 1);
        ::close(c.output);
        c.output = -1;
      }
    }
    for (int r = 0; r < n; ++r) {
      Child& c = children[static_cast<std::size_t>(r)];
      if (!c.running) continue;
      int status = 0;
      if (::waitpid(c.pid, &status, WNOHANG | WUNTRACED | WCONTINUED) != c.pid) continue;
      if (WIFSTOPPED(status) || WIFCONTINUED(status)) {
        c.stopped = WIFSTOPPED(status);
        c.stop_signal = c.stopped ? WSTOPSIG(status) : 0;
        continue;
      }
      c.running = false;
      c.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      if (c.exit_code != 0 && first_failure < 0 && !terminated) {
        first_failure = r;
        failed_at = Clock::now();
        if (WIFSIGNALED(status)) {
          std::fprintf(stderr,
                       "switchyard launch: rank %d was killed by signal %d; stopping the others\n",
                       r, WTERMSIG(status));
        } else {
          std::fprintf(stderr, "switchyard launch: rank %d exited with %d; stopping the others\n",
                       r, c.exit_code);
        }
      }
    }
    // Ranks that finished cleanly while every other one is stopped: nothing can move the job
    // on (a rank stopped after its last collective), so it fails like a failed rank.
    bool any_finished = false, all_left_stopped = true, any_left = false;
    for (const auto& c : children) {
      any_finished = any_finished || (!c.running && c.exit_code == 0);
      if (c.running) {
        any_left = true;
        all_left_stopped = all_left_stopped && c.stopped;
      }
    }
    if (first_failure < 0 && any_finished && any_left && all_left_stopped) {
      for (int r = 0; r < n; ++r) {
        const Child& c = children[static_cast<std::size_t>(r)];
        if (!c.running) continue;
        if (first_failure < 0) first_failure = r;
        std::fprintf(stderr,
                     "switchyard launch: rank %d is stopped (signal %d) while the others have "
                     "finished; stopping it\n",
                     r, c.stop_signal);
      }
      failed_at = Clock::now();
    }
    if (stop_signal != 0 && first_failure < 0) {
      first_failure = n;  // not a rank: the launcher itself was interrupted
      failed_at = Clock::now() - std::chrono::hours(1);
    }
    // Give the others `grace_s` to report and exit by themselves, then terminate them.
    if (first_failure >= 0 && !terminated &&
        Clock::now() - failed_at >= std::chrono::duration<double>(grace_s)) {
      signal_children(children, SIGTERM);
      terminated = true;
      failed_at = Clock::now();
    }
    if (terminated && !killed && Clock::now() - failed_at >= std::chrono::seconds(5)) {
      signal_children(children, SIGKILL);
      killed = true;
    }
  }
  if (first_failure < 0) return kExitOk;
  if (first_failure == n) return 128 + stop_signal;  // the shell's convention
  return children[static_cast<std::size_t>(first_failure)].exit_code;
}

}  // namespace switchyard::tool
