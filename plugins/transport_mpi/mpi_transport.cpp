// transport_mpi: one process per rank, started by an MPI launcher (mpirun, srun).
// Collectives are non-blocking point-to-point messages, one per peer (split into chunks of
// at most `mpi_max_message_bytes`, so more than 2^31-1 bytes per peer work), progressed
// with MPI_Testsome until done or the timeout passes; a timeout names the missing peers.
// Reductions gather every contribution and combine them in rank order, so their bits are
// the same on every rank and every transport.
#include <dlfcn.h>

// The C API only: Open MPI's deprecated C++ bindings would need libmpi_cxx.
#define OMPI_SKIP_MPICXX 1
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <optional>

#include "switchyard/collectives.hpp"
#include "switchyard/plugin.hpp"

namespace switchyard::mpi {
namespace {

using Clock = std::chrono::steady_clock;

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

/// Initialises MPI once per process and finalises it when the last communicator goes.
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
  }
  ~Session() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (owns_ && !finalized) MPI_Finalize();
  }
  int tag_limit() const { return tag_limit_; }

 private:
  bool owns_ = false;
  int tag_limit_ = 32767;
};

class MpiTransport;

/// One all-to-all in flight. Reused from one collective to the next, so that its request
/// lists do not allocate once they have grown.
class Exchange {
 public:
  Exchange() = default;
  Exchange(const Exchange&) = delete;
  Exchange& operator=(const Exchange&) = delete;
  ~Exchange() { release(); }

  /// Posts the receives and sends of one collective on `comm`, where this rank is `me`.
  void start(MPI_Comm comm, int me, int tag, std::size_t max_message, double timeout_s,
             const AlltoallvBuffers& b, const char* op) {
    release();
    op_ = op;
    timeout_s_ = timeout_s;
    problem_.reset();
    requests_.clear();
    is_recv_.clear();
    peer_.clear();
    size_.clear();
    pending_ = 0;
    const std::size_t n = b.send_counts.size();
    for (std::size_t p = 0; p < n; ++p) {
      if (static_cast<int>(p) == me) {
        if (b.send_counts[p] != b.recv_counts[p]) {
          problem_ = "rank sends itself " + std::to_string(b.send_counts[p]) +
                     " bytes but expects " + std::to_string(b.recv_counts[p]);
        } else if (b.send_counts[p] != 0) {
          std::memcpy(b.recv + b.recv_offsets[p], b.send + b.send_offsets[p], b.send_counts[p]);
        }
        continue;
      }
      post(b.recv + b.recv_offsets[p], b.recv_counts[p], static_cast<int>(p), true, comm, tag,
           max_message);
      post(const_cast<std::byte*>(b.send + b.send_offsets[p]), b.send_counts[p],
           static_cast<int>(p), false, comm, tag, max_message);
    }
    deadline_ = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                   std::chrono::duration<double>(timeout_s));
  }

  bool test() {
    if (pending_ > 0) {
      int completed = 0;
      indices_.resize(requests_.size());
      statuses_.resize(requests_.size());
      check_mpi(MPI_Testsome(static_cast<int>(requests_.size()), requests_.data(), &completed,
                             indices_.data(), statuses_.data()),
                op_);
      if (completed != MPI_UNDEFINED) {
        for (int i = 0; i < completed; ++i) {
          const auto idx = static_cast<std::size_t>(indices_[static_cast<std::size_t>(i)]);
          --pending_;
          if (!is_recv_[idx]) continue;
          int count = 0;
          MPI_Get_count(&statuses_[static_cast<std::size_t>(i)], MPI_BYTE, &count);
          if (statuses_[static_cast<std::size_t>(i)].MPI_ERROR != MPI_SUCCESS &&
              statuses_[static_cast<std::size_t>(i)].MPI_ERROR != 0) {
            record("receive from rank " + std::to_string(peer_[idx]) + " failed");
          } else if (static_cast<std::size_t>(count) != size_[idx]) {
            record("rank " + std::to_string(peer_[idx]) +
                   " sent a different number of bytes than expected");
          }
        }
      }
    }
    if (pending_ == 0) {
      if (problem_)
        throw Error(ErrorCode::kInvalidArgument, std::string("mpi ") + op_ + ": " + *problem_);
      return true;
    }
    if (Clock::now() > deadline_) {
      std::vector<int> missing;
      for (std::size_t i = 0; i < requests_.size(); ++i) {
        if (requests_[i] != MPI_REQUEST_NULL &&
            std::find(missing.begin(), missing.end(), peer_[i]) == missing.end()) {
          missing.push_back(peer_[i]);
        }
      }
      std::sort(missing.begin(), missing.end());
      std::string peers;
      for (int p : missing) {
        if (!peers.empty()) peers += ", ";
        peers += std::to_string(p);
      }
      throw Error(ErrorCode::kTimeout, std::string("mpi ") + op_ + ": timed out after " +
                                           format_seconds(timeout_s_) + " waiting for rank(s) " +
                                           peers +
                                           " (dead, stuck, or not calling the same collective)");
    }
    return false;
  }

  void wait() {
    while (!test()) {
    }
  }

 private:
  void post(std::byte* data, std::size_t bytes, int peer, bool receive, MPI_Comm comm, int tag,
            std::size_t max_message) {
    // Chunks of one peer share the tag; MPI keeps their order between a pair of ranks.
    for (std::size_t offset = 0; offset < bytes; offset += max_message) {
      const int n = static_cast<int>(std::min(max_message, bytes - offset));
      MPI_Request r = MPI_REQUEST_NULL;
      if (receive) {
        check_mpi(MPI_Irecv(data + offset, n, MPI_BYTE, peer, tag, comm, &r), op_);
      } else {
        check_mpi(MPI_Isend(data + offset, n, MPI_BYTE, peer, tag, comm, &r), op_);
      }
      requests_.push_back(r);
      is_recv_.push_back(receive);
      peer_.push_back(peer);
      size_.push_back(static_cast<std::size_t>(n));
      ++pending_;
    }
  }
  /// Cancels the receives and frees every request still posted (after a failure).
  void release() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;
    for (std::size_t i = 0; i < requests_.size(); ++i) {
      if (requests_[i] == MPI_REQUEST_NULL) continue;
      if (is_recv_[i]) MPI_Cancel(&requests_[i]);
      MPI_Request_free(&requests_[i]);
    }
  }
  void record(std::string what) {
    if (!problem_) problem_ = std::move(what);
  }

  const char* op_ = "";
  double timeout_s_ = 0;
  std::vector<MPI_Request> requests_;
  std::vector<char> is_recv_;
  std::vector<int> peer_;
  std::vector<std::size_t> size_;
  std::vector<int> indices_;
  std::vector<MPI_Status> statuses_;
  std::size_t pending_ = 0;
  std::optional<std::string> problem_;
  Clock::time_point deadline_;
};

using MpiRequest = PolledRequest<Exchange, Session>;

class MpiTransport final : public Transport {
 public:
  MpiTransport(std::shared_ptr<Session> session, MPI_Comm comm, Topology topology,
               std::size_t max_message, double timeout_s)
      : session_(std::move(session)),
        comm_(comm),
        topology_(std::move(topology)),
        max_message_(max_message),
        timeout_s_(timeout_s) {
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  ~MpiTransport() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized && comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
  }

  int rank() const noexcept override { return rank_; }
  int size() const noexcept override { return size_; }
  const Topology& topology() const noexcept override { return topology_; }
  TransportCapabilities capabilities() const noexcept override { return {}; }
  std::string name() const override { return "mpi"; }

  void barrier() override { barrier_through_alltoall(*this, scratch_); }

 protected:
  // Host-synchronous: every collective has finished when it returns.
  void do_alltoall(const void* send, void* recv, std::size_t bytes_per_peer,
                   Stream& /*stream*/) override {
    run(alltoall_as_alltoallv(send, recv, bytes_per_peer, size(), scratch_), "alltoall");
  }

  void do_alltoallv(const AlltoallvBuffers& b, Stream& /*stream*/) override { run(b, "alltoallv"); }

  std::unique_ptr<TransportRequest> do_ialltoallv(const AlltoallvBuffers& b) override {
    auto exchange = std::make_unique<Exchange>();
    exchange->start(comm_, rank_, next_tag(), max_message_, timeout_s_, b, "ialltoallv");
    return std::make_unique<MpiRequest>(session_, std::move(exchange));
  }

  void do_allreduce(void* data, std::size_t count, DType dtype, ReduceOp op,
                    Stream& /*stream*/) override {
    allreduce_through_alltoall(*this, data, count, dtype, op, scratch_);
  }

 public:
  std::unique_ptr<Transport> split(int color, int key) override {
    // The group through a bounded exchange first (for the topology), then MPI's split.
    const std::vector<int> group = split_group(*this, color, key);
    MPI_Comm child = MPI_COMM_NULL;
    check_mpi(MPI_Comm_split(comm_, color < 0 ? MPI_UNDEFINED : color, key, &child), "split");
    if (group.empty()) return nullptr;
    std::vector<int> nodes;
    for (int old : group) nodes.push_back(topology_.node_of(old));
    return std::make_unique<MpiTransport>(session_, child, Topology(nodes), max_message_,
                                          timeout_s_);
  }

  /// Ends the whole MPI job (MPI_Abort): with one process per rank there is nothing to
  /// unblock locally, and the launcher then stops every other rank.
  void abort(const std::string& reason) noexcept override {
    (void)reason;
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Abort(MPI_COMM_WORLD, 1);
  }

  /// Used once at creation, after the host names are known.
  void set_topology(Topology topology) { topology_ = std::move(topology); }

 private:
  int next_tag() {
    return static_cast<int>(next_seq_++ % static_cast<std::uint64_t>(session_->tag_limit()));
  }
  void run(const AlltoallvBuffers& b, const char* op) {
    blocking_.start(comm_, rank_, next_tag(), max_message_, timeout_s_, b, op);
    blocking_.wait();
  }

  std::shared_ptr<Session> session_;
  MPI_Comm comm_;
  Topology topology_;
  std::size_t max_message_;
  double timeout_s_;
  int rank_ = 0;
  int size_ = 1;
  std::uint64_t next_seq_ = 0;
  CollectiveScratch scratch_;
  Exchange blocking_;  // reused by every blocking collective
};

std::vector<std::unique_ptr<Transport>> create(const TransportCreateArgs& args) {
  probe().throw_if_error();
  auto session = std::make_shared<Session>();
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
