// transport_mpi: one process per rank, started by an MPI launcher (mpirun, srun).
// Collectives run on the core's peer-exchange engine (peer_exchange.hpp): non-blocking
// point-to-point messages, one per peer (split into chunks of at most
// `mpi_max_message_bytes`, so more than 2^31-1 bytes per peer work), tested until done or
// the timeout passes; a timeout names the missing peers. This file supplies only how to
// post, test and cancel one MPI message.
// Reductions gather every contribution and combine them in rank order, so their bits are
// the same on every rank and every transport.
#include <dlfcn.h>

// The C API only: Open MPI's deprecated C++ bindings would need libmpi_cxx.
#define OMPI_SKIP_MPICXX 1
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "switchyard/collectives.hpp"
#include "switchyard/peer_exchange.hpp"
#include "switchyard/plugin.hpp"

namespace switchyard::mpi {
namespace {

void declare_options(ConfigSchema& s) {
  s.add("mpi_max_message_bytes", ConfigType::kInt, ConfigValue{std::int64_t{INT_MAX}},
        "largest single MPI message; longer per-peer payloads are sent in chunks",
        checks::int_range(1, INT_MAX));
}

bool started_by_mpi_launcher() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE"}) {
    if (std::getenv(v) != nullptr) return true;
  }
  return false;
}

Status probe() {
  if (started_by_mpi_launcher()) return {};
  return {ErrorCode::kUnavailable,
          "the mpi transport needs an MPI launcher; start with `mpirun -np N switchyard run CONFIG "
          "--set runtime.transport=mpi` (as root add --allow-run-as-root --oversubscribe)"};
}

void check_mpi(int rc, const std::string& what) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING] = {};
  int length = 0;
  MPI_Error_string(rc, text, &length);
  throw Error(ErrorCode::kSystem, "mpi " + what + ": " + text);
}

/// Initialises MPI once per process and finalises it when the process exits.
/// MPI_Finalize waits for every rank without a bound (a rank stopped after its last
/// collective would hold the job for ever), so the session first meets the other ranks in
/// a farewell bounded by the timeout: every rank reports to world rank 0, which answers
/// each; whoever is still missing at the deadline is named and the job is aborted. Rank 0
/// alone knows who is missing, so the others wait twice as long for its answer: a rank
/// that entered the farewell before rank 0 must not end the job first, naming rank 0 for
/// a rank rank 0 is still waiting for.
class Session {
 public:
  Session() {
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (!initialized) {
      // Open MPI loads its own components, which need libmpi's symbols visible globally;
      // this plugin was loaded with RTLD_LOCAL, so promote libmpi first.
      for (const char* name : {"libmpi.so.40", "libmpi.so"}) {
        if (dlopen(name, RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD) != nullptr) break;
      }
      int provided = 0;
      check_mpi(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SERIALIZED, &provided), "init");
      owns_ = true;
    }
    int tag_ub_flag = 0;
    int* tag_ub = nullptr;
    MPI_Comm_get_attr(MPI_COMM_WORLD, MPI_TAG_UB, &tag_ub, &tag_ub_flag);
    tag_limit_ = tag_ub_flag && tag_ub ? *tag_ub : 32767;
    if (owns_) check_mpi(MPI_Comm_dup(MPI_COMM_WORLD, &farewell_), "dup");
  }
  ~Session() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!owns_ || finalized) return;
    farewell();
    MPI_Comm_free(&farewell_);
    MPI_Finalize();
  }
  int tag_limit() const { return tag_limit_; }
  /// The farewell waits at most the longest timeout any communicator was created with.
  void bound_farewell_by(double timeout_s) { timeout_s_ = std::max(timeout_s_, timeout_s); }

 private:
  void farewell() noexcept {
    int rank = 0, size = 1;
    MPI_Comm_rank(farewell_, &rank);
    MPI_Comm_size(farewell_, &size);
    if (size == 1) return;
    const double wait_s = rank == 0 ? timeout_s_ : 2 * timeout_s_;
    const auto deadline = std::chrono::steady_clock::now() +
                          std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                              std::chrono::duration<double>(wait_s));
    std::vector<MPI_Request> requests;
    std::vector<char> bytes(static_cast<std::size_t>(size), 1);
    if (rank == 0) {
      for (int r = 1; r < size; ++r) {
        requests.push_back(MPI_REQUEST_NULL);
        MPI_Irecv(&bytes[static_cast<std::size_t>(r)], 1, MPI_BYTE, r, 0, farewell_,
                  &requests.back());
      }
    } else {
      requests.push_back(MPI_REQUEST_NULL);
      MPI_Isend(&bytes[0], 1, MPI_BYTE, 0, 0, farewell_, &requests.back());
      requests.push_back(MPI_REQUEST_NULL);
      MPI_Irecv(&bytes[1], 1, MPI_BYTE, 0, 1, farewell_, &requests.back());
    }
    std::vector<int> done(requests.size(), 0);
    auto all_done = [&] {
      bool all = true;
      for (std::size_t i = 0; i < requests.size(); ++i) {
        if (!done[i]) MPI_Test(&requests[i], &done[i], MPI_STATUS_IGNORE);
        all = all && done[i];
      }
      return all;
    };
    bool answered = false;
    while (std::chrono::steady_clock::now() < deadline) {
      if (all_done()) {
        if (rank != 0 || answered) return;
        // Everyone reported: release them all, then wait for the releases to go out.
        requests.clear();
        for (int r = 1; r < size; ++r) {
          requests.push_back(MPI_REQUEST_NULL);
          MPI_Isend(&bytes[0], 1, MPI_BYTE, r, 1, farewell_, &requests.back());
        }
        done.assign(requests.size(), 0);
        answered = true;
      }
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    std::string missing;
    if (rank == 0 && !answered) {
      for (std::size_t i = 0; i < requests.size(); ++i) {
        if (done[i]) continue;
        missing += (missing.empty() ? "" : ", ") + std::to_string(i + 1);
      }
    }
    std::fprintf(stderr,
                 "switchyard: mpi: at the end of the job, %s%s did not arrive within %g s "
                 "(stopped or stuck); ending the job with MPI_Abort\n",
                 rank == 0 ? "world rank(s) " : "world rank 0", rank == 0 ? missing.c_str() : "",
                 wait_s);
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 1);
  }

  bool owns_ = false;
  int tag_limit_ = 32767;
  MPI_Comm farewell_ = MPI_COMM_NULL;
  double timeout_s_ = 0;
};

/// The process's MPI session, made by the first transport and kept until the process exits:
/// MPI cannot be initialised again once finalised, and a process may delete its runtime and
/// build another. The plugin pins itself in memory, so that the session's destructor (the
/// farewell, then MPI_Finalize) runs at exit rather than when a registry unloads the plugin.
std::shared_ptr<Session> process_session(double timeout_s) {
  static std::mutex mutex;
  static std::shared_ptr<Session> session;
  const std::lock_guard<std::mutex> lock(mutex);
  if (!session) {
    Dl_info self{};
    if (::dladdr(reinterpret_cast<const void*>(&process_session), &self) != 0 &&
        self.dli_fname != nullptr) {
      ::dlopen(self.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
    }
    session = std::make_shared<Session>();
  }
  session->bound_farewell_by(timeout_s);
  return session;
}

/// Posting, testing and cancelling MPI point-to-point messages on one communicator; the
/// collective's number (modulo the tag limit) is the tag.
class MpiMessaging final : public PeerMessaging {
 public:
  MpiMessaging(MPI_Comm comm, int tag_limit, std::size_t max_message)
      : comm_(comm), tag_limit_(tag_limit), max_message_(max_message) {}

  void* post(const PeerMessage& m, std::uint64_t seq) override {
    const int tag = static_cast<int>(seq % static_cast<std::uint64_t>(tag_limit_));
    const int n = static_cast<int>(m.bytes);
    MPI_Request r = MPI_REQUEST_NULL;
    if (m.receive) {
      check_mpi(MPI_Irecv(m.data, n, MPI_BYTE, m.peer, tag, comm_, &r), "receive");
    } else {
      check_mpi(MPI_Isend(m.data, n, MPI_BYTE, m.peer, tag, comm_, &r), "send");
    }
    return to_handle(r);
  }

  PeerMessageStatus test(void* handle, const PeerMessage& m) override {
    MPI_Request r = from_handle(handle);
    int flag = 0;
    MPI_Status status{};
    check_mpi(MPI_Test(&r, &flag, &status), "test");
    PeerMessageStatus result;
    if (!flag) return result;
    if (m.receive && status.MPI_ERROR != MPI_SUCCESS && status.MPI_ERROR != 0) {
      result.state = PeerMessageStatus::State::kFailed;
      result.error = "MPI error " + std::to_string(status.MPI_ERROR);
      return result;
    }
    result.state = PeerMessageStatus::State::kDone;
    if (m.receive) {
      int count = 0;
      MPI_Get_count(&status, MPI_BYTE, &count);
      result.received_bytes = static_cast<std::size_t>(count);
    }
    return result;
  }

  void cancel(void* handle, const PeerMessage& m) noexcept override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;
    MPI_Request r = from_handle(handle);
    if (m.receive) MPI_Cancel(&r);
    MPI_Request_free(&r);
  }

  std::size_t max_message_bytes() const noexcept override { return max_message_; }
  std::string_view name() const noexcept override { return "mpi"; }
  const std::vector<int>* world_ranks() const noexcept override {
    return world_ranks_.empty() ? nullptr : &world_ranks_;
  }
  /// For a communicator split from the world: the world rank of each of its ranks.
  void set_world_ranks(std::vector<int> ranks) { world_ranks_ = std::move(ranks); }

 private:
  // Open MPI's MPI_Request is a pointer: it is the opaque handle itself.
  static_assert(std::is_pointer_v<MPI_Request>, "this plugin expects Open MPI's MPI_Request");
  static void* to_handle(MPI_Request r) { return static_cast<void*>(r); }
  static MPI_Request from_handle(void* h) { return static_cast<MPI_Request>(h); }

  MPI_Comm comm_;
  int tag_limit_;
  std::size_t max_message_;
  std::vector<int> world_ranks_;  // empty for the world itself
};

class MpiTransport final : public PeerTransport {
 public:
  MpiTransport(std::shared_ptr<Session> session, MPI_Comm comm, Topology topology,
               std::size_t max_message, double timeout_s)
      : PeerTransport(session, timeout_s),
        session_(std::move(session)),
        comm_(comm),
        topology_(std::move(topology)),
        max_message_(max_message),
        messaging_(comm, session_->tag_limit(), max_message) {
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
    int same = MPI_UNEQUAL;
    MPI_Comm_compare(comm_, MPI_COMM_WORLD, &same);
    if (same != MPI_IDENT && same != MPI_CONGRUENT) {
      // Messages name world ranks: translate this communicator's ranks once.
      MPI_Group mine = MPI_GROUP_NULL, world = MPI_GROUP_NULL;
      MPI_Comm_group(comm_, &mine);
      MPI_Comm_group(MPI_COMM_WORLD, &world);
      std::vector<int> local(static_cast<std::size_t>(size_)), global(local.size());
      for (int r = 0; r < size_; ++r) local[static_cast<std::size_t>(r)] = r;
      MPI_Group_translate_ranks(mine, size_, local.data(), world, global.data());
      MPI_Group_free(&mine);
      MPI_Group_free(&world);
      messaging_.set_world_ranks(std::move(global));
    }
  }
  ~MpiTransport() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized && comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
  }

  int rank() const noexcept override { return rank_; }
  int size() const noexcept override { return size_; }
  const Topology& topology() const noexcept override { return topology_; }
  std::string name() const override { return "mpi"; }

  std::unique_ptr<Transport> split(int color, int key) override {
    // The group through a bounded exchange first (for the topology), then MPI's split.
    const std::vector<int> group = split_group(*this, color, key);
    MPI_Comm child = MPI_COMM_NULL;
    check_mpi(MPI_Comm_split(comm_, color < 0 ? MPI_UNDEFINED : color, key, &child), "split");
    if (group.empty()) return nullptr;
    std::vector<int> nodes;
    for (int old : group) nodes.push_back(topology_.node_of(old));
    return std::make_unique<MpiTransport>(session_, child, Topology(nodes), max_message_,
                                          timeout_s());
  }

  /// Ends the whole MPI job (MPI_Abort): with one process per rank there is nothing to
  /// unblock locally, and the launcher then stops every other rank.
  void abort(const std::string& reason) noexcept override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;
    // Said here, before the launcher kills the job: mpirun's own notice of an abort can be
    // lost when several ranks abort at once.
    std::fprintf(stderr, "switchyard: mpi: ending the job with MPI_Abort: %s\n", reason.c_str());
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 1);
  }

  /// Used once at creation, after the host names are known.
  void set_topology(Topology topology) { topology_ = std::move(topology); }

 protected:
  PeerMessaging& messaging() noexcept override { return messaging_; }

 private:
  std::shared_ptr<Session> session_;
  MPI_Comm comm_;
  Topology topology_;
  std::size_t max_message_;
  MpiMessaging messaging_;
  int rank_ = 0;
  int size_ = 1;
};

std::vector<std::unique_ptr<Transport>> create(const TransportCreateArgs& args) {
  probe().throw_if_error();
  const std::shared_ptr<Session> session = process_session(args.timeout_s);
  MPI_Comm world = MPI_COMM_NULL;
  check_mpi(MPI_Comm_dup(MPI_COMM_WORLD, &world), "dup");
  int size = 1;
  MPI_Comm_size(world, &size);
  const auto max_message = static_cast<std::size_t>(
      args.options != nullptr ? args.options->get_int("mpi_max_message_bytes") : INT_MAX);
  // Host names through a bounded exchange on the world communicator itself.
  auto provisional = std::make_unique<MpiTransport>(session, world, Topology::uniform(size, size),
                                                    max_message, args.timeout_s);
  Topology topology = Topology::uniform(size, args.ranks_per_node > 0 ? args.ranks_per_node : size);
  if (args.ranks_per_node <= 0) {
    char name[MPI_MAX_PROCESSOR_NAME] = {};
    int length = 0;
    MPI_Get_processor_name(name, &length);
    const auto n = static_cast<std::size_t>(size);
    std::vector<char> send(n * MPI_MAX_PROCESSOR_NAME), recv(send.size());
    for (std::size_t p = 0; p < n; ++p)
      std::memcpy(send.data() + p * MPI_MAX_PROCESSOR_NAME, name, MPI_MAX_PROCESSOR_NAME);
    provisional->alltoall(send.data(), recv.data(), MPI_MAX_PROCESSOR_NAME);
    std::vector<std::string> hosts;
    for (std::size_t p = 0; p < n; ++p)
      hosts.emplace_back(recv.data() + p * MPI_MAX_PROCESSOR_NAME);
    topology = Topology::from_host_names(hosts);
  }
  provisional->set_topology(std::move(topology));
  std::vector<std::unique_ptr<Transport>> ranks;
  ranks.push_back(std::move(provisional));
  return ranks;
}

}  // namespace
}  // namespace switchyard::mpi

SWITCHYARD_TRANSPORT_PLUGIN("mpi", "0.1.0",
                            "one process per rank, Open MPI point-to-point with timeouts",
                            ::switchyard::mpi::declare_options, ::switchyard::mpi::probe,
                            ::switchyard::mpi::create)
