// transport_ucx: one process per rank, UCP tag messages between every pair of ranks.
// Worker addresses are exchanged through the core's bootstrap store (MASTER_ADDR/PORT).
// A collective posts one receive and one send per peer, tagged with the communicator,
// the collective's sequence number and the sender, then progresses the worker until all
// complete or the timeout passes; a timeout names the peers whose data never came.
#include <ucp/api/ucp.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <span>
#include <thread>

#include "switchyard/bootstrap.hpp"
#include "switchyard/collectives.hpp"
#include "switchyard/plugin.hpp"

namespace switchyard::ucx {
namespace {

using Clock = std::chrono::steady_clock;

[[noreturn]] void fail(const std::string& what, ucs_status_t status) {
  throw Error(ErrorCode::kUnavailable, "ucx " + what + ": " + ucs_status_string(status));
}

// Tag layout: [communicator id: 20 bits][collective number: 28 bits][sender rank: 16 bits].
constexpr int kSenderBits = 16;
constexpr int kSeqBits = 28;
constexpr std::uint64_t kMaxRanks = std::uint64_t{1} << kSenderBits;

ucp_tag_t make_tag(std::uint32_t comm_id, std::uint64_t seq, int sender) {
  return (static_cast<ucp_tag_t>(comm_id & 0xfffff) << (kSeqBits + kSenderBits)) |
         ((seq & ((std::uint64_t{1} << kSeqBits) - 1)) << kSenderBits) |
         static_cast<ucp_tag_t>(sender);
}

/// The process-wide UCX state: context, worker, one endpoint per world rank.
class Context {
 public:
  Context(const LaunchInfo& info, double timeout_s)
      : timeout_s_(timeout_s), world_rank_(info.rank) {
    if (static_cast<std::uint64_t>(info.world_size) > kMaxRanks) {
      throw Error(ErrorCode::kInvalidArgument, "ucx transport supports at most 65536 ranks");
    }
    store_ = std::make_unique<BootstrapStore>(info, timeout_s);
    ucp_config_t* config = nullptr;
    ucs_status_t status = ucp_config_read(nullptr, nullptr, &config);  // honours UCX_TLS etc.
    if (status != UCS_OK) fail("reading the configuration (UCX_* variables)", status);
    ucp_params_t params{};
    params.field_mask = UCP_PARAM_FIELD_FEATURES;
    params.features = UCP_FEATURE_TAG;
    status = ucp_init(&params, config, &context_);
    ucp_config_release(config);
    if (status != UCS_OK) {
      const char* tls = std::getenv("UCX_TLS");
      fail(std::string("init") + (tls ? " with UCX_TLS=" + std::string(tls) : std::string()) +
               " (`ucx_info -d` lists the transports UCX finds here)",
           status);
    }
    ucp_worker_params_t worker_params{};
    worker_params.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    worker_params.thread_mode = UCS_THREAD_MODE_SINGLE;
    status = ucp_worker_create(context_, &worker_params, &worker_);
    if (status != UCS_OK) fail("creating a worker", status);
    ucp_address_t* address = nullptr;
    std::size_t length = 0;
    status = ucp_worker_get_address(worker_, &address, &length);
    if (status != UCS_OK) fail("getting the worker address", status);
    const std::string mine(reinterpret_cast<const char*>(address), length);
    ucp_worker_release_address(worker_, address);

    char host[256] = {};
    ::gethostname(host, sizeof host - 1);
    const auto addresses = store_->allgather("ucx-worker-address", mine);
    host_names_ = store_->allgather("host-name", host);
    endpoints_.assign(addresses.size(), nullptr);
    for (std::size_t r = 0; r < addresses.size(); ++r) {
      if (static_cast<int>(r) == world_rank_) continue;
      ucp_ep_params_t ep_params{};
      ep_params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS;
      ep_params.address = reinterpret_cast<const ucp_address_t*>(addresses[r].data());
      status = ucp_ep_create(worker_, &ep_params, &endpoints_[r]);
      if (status != UCS_OK) fail("connecting to rank " + std::to_string(r), status);
    }
    // Nobody needs the store past this point, but rank 0 keeps serving until it exits.
    store_->barrier("ucx-connected");
  }

  ~Context() {
    for (ucp_ep_h ep : endpoints_) {
      if (ep == nullptr) continue;
      ucp_request_param_t param{};
      param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      param.flags = UCP_EP_CLOSE_FLAG_FORCE;  // do not wait for peers that may be gone
      ucs_status_ptr_t request = ucp_ep_close_nbx(ep, &param);
      const auto deadline = Clock::now() + std::chrono::seconds(1);
      while (UCS_PTR_IS_PTR(request) && ucp_request_check_status(request) == UCS_INPROGRESS &&
             Clock::now() < deadline) {
        ucp_worker_progress(worker_);
      }
      if (UCS_PTR_IS_PTR(request)) ucp_request_free(request);
    }
    if (worker_ != nullptr) ucp_worker_destroy(worker_);
    if (context_ != nullptr) ucp_cleanup(context_);
  }

  ucp_worker_h worker() const { return worker_; }
  ucp_ep_h endpoint(int world_rank) const {
    return endpoints_[static_cast<std::size_t>(world_rank)];
  }
  double timeout_s() const { return timeout_s_; }
  const std::vector<std::string>& host_names() const { return host_names_; }

 private:
  double timeout_s_;
  int world_rank_;
  std::unique_ptr<BootstrapStore> store_;
  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  std::vector<ucp_ep_h> endpoints_;
  std::vector<std::string> host_names_;
};

/// One all-to-all in flight: a receive and a send per peer. Reused from one collective to
/// the next, so that its request lists do not allocate once they have grown.
class Exchange {
 public:
  Exchange() = default;
  Exchange(const Exchange&) = delete;
  Exchange& operator=(const Exchange&) = delete;
  ~Exchange() { release(); }

  /// Posts the receives and sends of one collective. `members[p]` is the world rank of
  /// rank p of the communicator; `me` is this rank in it.
  void start(Context& context, std::span<const int> members, int me, std::uint32_t comm_id,
             std::uint64_t seq, const AlltoallvBuffers& b, const char* op) {
    release();
    context_ = &context;
    op_ = op;
    buffers_ = b;
    problem_.reset();
    const std::size_t n = members.size();
    recvs_.assign(n, nullptr);
    sends_.assign(n, nullptr);
    const auto tag_mask = ~ucp_tag_t{0};
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
      ucp_request_param_t param{};
      param.op_attr_mask = UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
      if (b.recv_counts[p] != 0) {
        recvs_[p] = ucp_tag_recv_nbx(context.worker(), b.recv + b.recv_offsets[p], b.recv_counts[p],
                                     make_tag(comm_id, seq, static_cast<int>(p)), tag_mask, &param);
        if (UCS_PTR_IS_ERR(recvs_[p])) {
          const ucs_status_t status = UCS_PTR_STATUS(recvs_[p]);
          recvs_[p] = nullptr;
          fail(std::string(op) + " receive", status);
        }
      }
      if (b.send_counts[p] != 0) {
        sends_[p] = ucp_tag_send_nbx(context.endpoint(members[p]), b.send + b.send_offsets[p],
                                     b.send_counts[p], make_tag(comm_id, seq, me), &param);
        if (UCS_PTR_IS_ERR(sends_[p])) {
          const ucs_status_t status = UCS_PTR_STATUS(sends_[p]);
          sends_[p] = nullptr;
          fail(std::string(op) + " send", status);
        }
      }
    }
    deadline_ = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                   std::chrono::duration<double>(context.timeout_s()));
  }

  /// Progresses; true when every request is complete. Throws on errors and timeout.
  bool test() {
    ucp_worker_progress(context_->worker());
    bool done = true;
    for (std::size_t p = 0; p < recvs_.size(); ++p) {
      if (recvs_[p] != nullptr) {
        ucp_tag_recv_info_t info{};
        const ucs_status_t s = ucp_tag_recv_request_test(recvs_[p], &info);
        if (s == UCS_INPROGRESS) {
          done = false;
        } else {
          ucp_request_free(recvs_[p]);
          recvs_[p] = nullptr;
          if (s == UCS_ERR_MESSAGE_TRUNCATED) {
            record("rank " + std::to_string(p) + " sent more than the " +
                   std::to_string(buffers_.recv_counts[p]) + " bytes expected");
          } else if (s != UCS_OK) {
            record("receive from rank " + std::to_string(p) + " failed: " + ucs_status_string(s));
          } else if (info.length != buffers_.recv_counts[p]) {
            record("rank " + std::to_string(p) + " sent " + std::to_string(info.length) +
                   " bytes, " + std::to_string(buffers_.recv_counts[p]) + " expected");
          }
        }
      }
      if (sends_[p] != nullptr) {
        const ucs_status_t s = ucp_request_check_status(sends_[p]);
        if (s == UCS_INPROGRESS) {
          done = false;
        } else {
          ucp_request_free(sends_[p]);
          sends_[p] = nullptr;
          if (s != UCS_OK)
            record("send to rank " + std::to_string(p) + " failed: " + ucs_status_string(s));
        }
      }
    }
    if (done) {
      if (problem_)
        throw Error(ErrorCode::kInvalidArgument, std::string("ucx ") + op_ + ": " + *problem_);
      return true;
    }
    if (Clock::now() > deadline_) {
      std::string peers;
      for (std::size_t p = 0; p < recvs_.size(); ++p) {
        if (recvs_[p] == nullptr && sends_[p] == nullptr) continue;
        if (!peers.empty()) peers += ", ";
        peers += std::to_string(p);
      }
      throw Error(ErrorCode::kTimeout, std::string("ucx ") + op_ + ": timed out after " +
                                           format_seconds(context_->timeout_s()) +
                                           " waiting for rank(s) " + peers +
                                           " (dead, stuck, or not calling the same collective)");
    }
    return false;
  }

  void wait() {
    while (!test()) {
    }
  }

 private:
  /// Cancels and frees whatever is still posted (after a failure).
  void release() {
    if (context_ == nullptr) return;
    for (auto* list : {&recvs_, &sends_}) {
      for (void*& r : *list) {
        if (r == nullptr) continue;
        ucp_request_cancel(context_->worker(), r);
        ucp_request_free(r);
        r = nullptr;
      }
    }
  }
  void record(std::string what) {
    if (!problem_) problem_ = std::move(what);
  }
  Context* context_ = nullptr;
  const char* op_ = "";
  AlltoallvBuffers buffers_;
  std::vector<void*> recvs_, sends_;
  std::optional<std::string> problem_;
  Clock::time_point deadline_;
};

using UcxRequest = PolledRequest<Exchange, Context>;

class UcxTransport final : public Transport {
 public:
  UcxTransport(std::shared_ptr<Context> context, std::vector<int> members, int rank,
               std::uint32_t comm_id, Topology topology)
      : context_(std::move(context)),
        members_(std::move(members)),
        rank_(rank),
        comm_id_(comm_id),
        topology_(std::move(topology)) {}

  int rank() const noexcept override { return rank_; }
  int size() const noexcept override { return static_cast<int>(members_.size()); }
  const Topology& topology() const noexcept override { return topology_; }
  TransportCapabilities capabilities() const noexcept override { return {}; }
  std::string name() const override { return "ucx"; }

  void barrier() override { barrier_through_alltoall(*this, scratch_); }

 protected:
  // Host-synchronous: every collective has finished when it returns.
  void do_alltoall(const void* send, void* recv, std::size_t bytes_per_peer,
                   Stream& /*stream*/) override {
    run(alltoall_as_alltoallv(send, recv, bytes_per_peer, size(), scratch_), "alltoall");
  }

  void do_alltoallv(const AlltoallvBuffers& b, Stream& /*stream*/) override { run(b, "alltoallv"); }

  std::unique_ptr<TransportRequest> do_ialltoallv(const AlltoallvBuffers& b) override {
    throw_if_aborted("ialltoallv");
    auto exchange = std::make_unique<Exchange>();
    exchange->start(*context_, members_, rank_, comm_id_, next_seq_++, b, "ialltoallv");
    return std::make_unique<UcxRequest>(context_, std::move(exchange));
  }

  void do_allreduce(void* data, std::size_t count, DType dtype, ReduceOp op,
                    Stream& /*stream*/) override {
    allreduce_through_alltoall(*this, data, count, dtype, op, scratch_);
  }

 public:
  std::unique_ptr<Transport> split(int color, int key) override {
    const std::uint64_t split_seq = next_seq_;
    const std::vector<int> group = split_group(*this, color, key);
    if (group.empty()) return nullptr;
    std::vector<int> members;
    std::vector<int> nodes;
    int new_rank = -1;
    for (int old : group) {
      if (old == rank_) new_rank = static_cast<int>(members.size());
      members.push_back(members_[static_cast<std::size_t>(old)]);
      nodes.push_back(topology_.node_of(old));
    }
    // Every member derives the same id from the parent, the split's number and the color.
    std::uint64_t h = comm_id_ * 0x9e3779b97f4a7c15ULL ^ (split_seq + 1) * 0xbf58476d1ce4e5b9ULL ^
                      (static_cast<std::uint64_t>(color) + 7) * 0x94d049bb133111ebULL;
    h ^= h >> 29;
    const auto child_id = static_cast<std::uint32_t>((h & 0xffffe) | 1);
    return std::make_unique<UcxTransport>(context_, std::move(members), new_rank, child_id,
                                          Topology(nodes));
  }

  void abort(const std::string& reason) noexcept override {
    try {
      abort_reason_ = reason;
    } catch (...) {
    }
    aborted_ = true;
  }

 private:
  void throw_if_aborted(const char* op) const {
    if (aborted_)
      throw Error(ErrorCode::kPeerFailed, std::string("ucx ") + op + ": " + abort_reason_);
  }
  void run(const AlltoallvBuffers& b, const char* op) {
    throw_if_aborted(op);
    blocking_.start(*context_, members_, rank_, comm_id_, next_seq_++, b, op);
    blocking_.wait();
  }

  std::shared_ptr<Context> context_;
  std::vector<int> members_;  // world rank of each rank of this communicator
  int rank_;
  std::uint32_t comm_id_;
  Topology topology_;
  std::uint64_t next_seq_ = 0;
  bool aborted_ = false;
  std::string abort_reason_;
  CollectiveScratch scratch_;
  Exchange blocking_;  // reused by every blocking collective
};

Status probe() {
  try {
    auto info = LaunchInfo::from_environment();
    if (!info || !info->has_store()) {
      return {
          ErrorCode::kUnavailable,
          "the ucx transport needs MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE; start the ranks "
          "with `switchyard launch -n N -- switchyard run CONFIG --set runtime.transport=ucx`"};
    }
  } catch (...) {
    return Status::from_current_exception();
  }
  return {};
}

std::vector<std::unique_ptr<Transport>> create(const TransportCreateArgs& args) {
  const Status usable = probe();
  usable.throw_if_error();
  const LaunchInfo info = *LaunchInfo::from_environment();
  auto context = std::make_shared<Context>(info, args.timeout_s);
  Topology topology = args.ranks_per_node > 0
                          ? Topology::uniform(info.world_size, args.ranks_per_node)
                          : Topology::from_host_names(context->host_names());
  std::vector<int> members(static_cast<std::size_t>(info.world_size));
  for (int r = 0; r < info.world_size; ++r) members[static_cast<std::size_t>(r)] = r;
  std::vector<std::unique_ptr<Transport>> ranks;
  ranks.push_back(std::make_unique<UcxTransport>(context, std::move(members), info.rank, 1,
                                                 std::move(topology)));
  return ranks;
}

}  // namespace
}  // namespace switchyard::ucx

SWITCHYARD_TRANSPORT_PLUGIN("ucx", "0.1.0",
                            "one process per rank, UCP tag messages (shared memory, TCP, RDMA)",
                            nullptr, ::switchyard::ucx::probe, ::switchyard::ucx::create)
