// transport_ucx: one process per rank, UCP tag messages between every pair of ranks.
// Worker addresses are exchanged through the core's bootstrap store (MASTER_ADDR/PORT).
// Collectives run on the core's peer-exchange engine (peer_exchange.hpp): one receive and
// one send per peer, tagged with the communicator, the collective's sequence number and
// the sender, progressed until all complete or the timeout passes. This file supplies only
// how to post, test and cancel one UCP message.
#include <ucp/api/ucp.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>

#include "switchyard/bootstrap.hpp"
#include "switchyard/collectives.hpp"
#include "switchyard/peer_exchange.hpp"
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
/// The world communicator's id; split communicators derive odd ids from it.
constexpr std::uint32_t kWorldCommId = 1;

ucp_tag_t make_tag(std::uint32_t comm_id, std::uint64_t seq, int sender) {
  return (static_cast<ucp_tag_t>(comm_id & 0xfffff) << (kSeqBits + kSenderBits)) |
         ((seq & ((std::uint64_t{1} << kSeqBits) - 1)) << kSenderBits) |
         static_cast<ucp_tag_t>(sender);
}

/// The process-wide UCX state: context, worker, one endpoint per world rank. Endpoints
/// are created with peer error handling: a peer that dies or resets its connection is
/// reported to `on_peer_error` (and its messages fail) instead of UCX aborting this
/// process, as it otherwise may inside a shared-memory transport.
class Context {
 public:
  Context(const LaunchInfo& info, double timeout_s)
      : timeout_s_(timeout_s), world_rank_(info.rank) {
    if (static_cast<std::uint64_t>(info.world_size) > kMaxRanks) {
      throw Error(ErrorCode::kInvalidArgument, "ucx transport supports at most 65536 ranks");
    }
    store_ = BootstrapStore::shared(info, timeout_s);
    const std::string round = "ucx-" + std::to_string(store_->next_round()) + "/";
    // UCX's shared-memory transports report a dead peer only when asked to; without it an
    // endpoint with peer error handling would skip them (TCP over loopback instead). UCX
    // reads these per transport from the environment; a value the user set is kept.
    ::setenv("UCX_POSIX_ERROR_HANDLING", "y", /*overwrite=*/0);
    ::setenv("UCX_SYSV_ERROR_HANDLING", "y", /*overwrite=*/0);
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
    const auto addresses = store_->allgather(round + "worker-address", mine);
    host_names_ = store_->allgather(round + "host-name", host);
    endpoints_.assign(addresses.size(), nullptr);
    peers_.assign(addresses.size(), Peer{});
    for (std::size_t r = 0; r < peers_.size(); ++r) peers_[r].world_rank = static_cast<int>(r);
    for (std::size_t r = 0; r < addresses.size(); ++r) {
      if (static_cast<int>(r) == world_rank_) continue;
      ucp_ep_params_t ep_params{};
      ep_params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS |
                             UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
      ep_params.address = reinterpret_cast<const ucp_address_t*>(addresses[r].data());
      ep_params.err_mode = UCP_ERR_HANDLING_MODE_PEER;
      ep_params.err_handler.cb = &Context::on_peer_error;
      ep_params.err_handler.arg = &peers_[r];
      status = ucp_ep_create(worker_, &ep_params, &endpoints_[r]);
      if (status != UCS_OK) fail("connecting to rank " + std::to_string(r), status);
    }
    // Nobody needs this round past this point; rank 0 keeps serving for later runtimes.
    store_->barrier(round + "connected");
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
  /// UCS_OK, or the error UCX reported for the connection to `world_rank`.
  ucs_status_t peer_status(int world_rank) const {
    return peers_[static_cast<std::size_t>(world_rank)].status;
  }
  ucp_ep_h endpoint(int world_rank) const {
    return endpoints_[static_cast<std::size_t>(world_rank)];
  }
  double timeout_s() const { return timeout_s_; }
  const std::vector<std::string>& host_names() const { return host_names_; }

 private:
  struct Peer {
    int world_rank = -1;
    ucs_status_t status = UCS_OK;
  };
  /// Called inside ucp_worker_progress (on the thread using the transport).
  static void on_peer_error(void* arg, ucp_ep_h /*ep*/, ucs_status_t status) {
    auto* peer = static_cast<Peer*>(arg);
    if (peer->status == UCS_OK) peer->status = status;
  }

  double timeout_s_;
  int world_rank_;
  std::vector<Peer> peers_;  // sized once, before the endpoints point into it
  std::shared_ptr<BootstrapStore> store_;
  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  std::vector<ucp_ep_h> endpoints_;
  std::vector<std::string> host_names_;
};

/// Posting, testing and cancelling UCP tag messages for one communicator: `members[p]` is
/// the world rank of its rank p, and tags carry its id, the collective and the sender.
class UcxMessaging final : public PeerMessaging {
 public:
  UcxMessaging(Context& context, const std::vector<int>& members, int me, std::uint32_t comm_id)
      : context_(context), members_(members), me_(me), comm_id_(comm_id) {}

  void* post(const PeerMessage& m, std::uint64_t seq) override {
    const int peer_world_rank = members_[static_cast<std::size_t>(m.peer)];
    if (const ucs_status_t broken = context_.peer_status(peer_world_rank); broken != UCS_OK) {
      throw Error(ErrorCode::kPeerFailed, "ucx: the connection to world rank " +
                                              std::to_string(peer_world_rank) +
                                              " failed earlier: " + ucs_status_string(broken));
    }
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FLAG_NO_IMM_CMPL;  // always a request to test
    ucs_status_ptr_t request =
        m.receive ? ucp_tag_recv_nbx(context_.worker(), m.data, m.bytes,
                                     make_tag(comm_id_, seq, m.peer), ~ucp_tag_t{0}, &param)
                  : ucp_tag_send_nbx(context_.endpoint(members_[static_cast<std::size_t>(m.peer)]),
                                     m.data, m.bytes, make_tag(comm_id_, seq, me_), &param);
    if (UCS_PTR_IS_ERR(request)) fail(m.receive ? "receive" : "send", UCS_PTR_STATUS(request));
    return request;
  }

  void progress() override { ucp_worker_progress(context_.worker()); }

  PeerMessageStatus test(void* request, const PeerMessage& m) override {
    PeerMessageStatus result;
    ucp_tag_recv_info_t info{};
    const ucs_status_t s =
        m.receive ? ucp_tag_recv_request_test(request, &info) : ucp_request_check_status(request);
    if (s == UCS_INPROGRESS) {
      // A tag receive is bound to no endpoint, so UCX never fails it: fail it here once the
      // sender's connection is known to be broken.
      const ucs_status_t broken = context_.peer_status(members_[static_cast<std::size_t>(m.peer)]);
      if (!m.receive || broken == UCS_OK) return result;
      cancel(request, m);
      result.state = PeerMessageStatus::State::kFailed;
      result.error = std::string("its connection broke (") + ucs_status_string(broken) + ")";
      return result;
    }
    ucp_request_free(request);
    if (s == UCS_ERR_MESSAGE_TRUNCATED) {
      result.state = PeerMessageStatus::State::kDone;
      result.truncated = true;
    } else if (s != UCS_OK) {
      result.state = PeerMessageStatus::State::kFailed;
      result.error = ucs_status_string(s);
    } else {
      result.state = PeerMessageStatus::State::kDone;
      result.received_bytes = info.length;
    }
    return result;
  }

  void cancel(void* request, const PeerMessage& /*m*/) noexcept override {
    ucp_request_cancel(context_.worker(), request);
    ucp_request_free(request);
  }

  std::string_view name() const noexcept override { return "ucx"; }
  const std::vector<int>* world_ranks() const noexcept override {
    return comm_id_ == kWorldCommId ? nullptr : &members_;
  }

 private:
  Context& context_;
  const std::vector<int>& members_;
  int me_;
  std::uint32_t comm_id_;
};

class UcxTransport final : public PeerTransport {
 public:
  UcxTransport(std::shared_ptr<Context> context, std::vector<int> members, int rank,
               std::uint32_t comm_id, Topology topology)
      : PeerTransport(context, context->timeout_s()),
        context_(std::move(context)),
        members_(std::move(members)),
        rank_(rank),
        comm_id_(comm_id),
        topology_(std::move(topology)),
        messaging_(*context_, members_, rank_, comm_id_) {}

  int rank() const noexcept override { return rank_; }
  int size() const noexcept override { return static_cast<int>(members_.size()); }
  const Topology& topology() const noexcept override { return topology_; }
  std::string name() const override { return "ucx"; }

  std::unique_ptr<Transport> split(int color, int key) override {
    const std::uint64_t split_seq = collectives_started();
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
    auto child_id = static_cast<std::uint32_t>((h & 0xffffe) | 1);
    if (child_id == kWorldCommId) child_id = 3;
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

 protected:
  PeerMessaging& messaging() noexcept override { return messaging_; }
  void check_usable(const char* op) const override {
    if (aborted_)
      throw Error(ErrorCode::kPeerFailed, std::string("ucx ") + op + ": " + abort_reason_);
  }

 private:
  std::shared_ptr<Context> context_;
  std::vector<int> members_;  // world rank of each rank of this communicator
  int rank_;
  std::uint32_t comm_id_;
  Topology topology_;
  UcxMessaging messaging_;
  bool aborted_ = false;
  std::string abort_reason_;
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
  ranks.push_back(std::make_unique<UcxTransport>(context, std::move(members), info.rank,
                                                 kWorldCommId, std::move(topology)));
  return ranks;
}

}  // namespace
}  // namespace switchyard::ucx

SWITCHYARD_TRANSPORT_PLUGIN("ucx", "0.1.0",
                            "one process per rank, UCP tag messages (shared memory, TCP, RDMA)",
                            nullptr, ::switchyard::ucx::probe, ::switchyard::ucx::create)
