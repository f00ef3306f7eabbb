// transport_inproc: every rank is a thread of this process; collectives copy directly
// between the ranks' buffers through a shared rendezvous (see inproc_world.hpp).
// With `inproc_async = true` it is stream-ordered: data collectives are queued on the
// caller's host stream and run later by that stream's progress thread.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <optional>

#include "inproc_world.hpp"
#include "switchyard/collectives.hpp"
#include "switchyard/plugin.hpp"

namespace switchyard::inproc {
namespace {

struct AlltoallArgument {
  const std::byte* send;
  std::size_t bytes_per_peer;
};

struct AllreduceArgument {
  const void* data;
  std::size_t count;
  DType dtype;
  ReduceOp op;
};

void declare_options(ConfigSchema& s) {
  s.add("inproc_async", ConfigType::kBool, ConfigValue{false},
        "stream-ordered mode: data collectives are queued on the host stream and completed "
        "by its progress thread (tests that the core never assumes synchronous completion)");
}

class InprocRequest;
class InprocTransport;

/// A data collective waiting on a stream: its arguments, copied at enqueue time, and the
/// sequence number it was given in call order.
struct QueuedOp {
  enum class Kind { kAlltoall, kAlltoallv, kAllreduce };
  InprocTransport* transport = nullptr;
  Kind kind = Kind::kAlltoall;
  std::uint64_t seq = 0;
  AlltoallvBuffers buffers;  // alltoallv; alltoall uses send/recv
  std::size_t bytes_per_peer = 0;
  void* data = nullptr;  // allreduce
  std::size_t count = 0;
  DType dtype = DType::kF32;
  ReduceOp op = ReduceOp::kSum;
  std::vector<std::byte> scratch;  // allreduce partial result
  std::atomic<bool> busy{false};
};

class InprocTransport final : public Transport {
 public:
  InprocTransport(std::shared_ptr<World> world, int rank, bool stream_ordered)
      : world_(std::move(world)),
        rank_(rank),
        stream_ordered_(stream_ordered),
        queued_(kMaxQueued) {}

  int rank() const noexcept override { return rank_; }
  int size() const noexcept override { return world_->size(); }
  const Topology& topology() const noexcept override { return world_->topology(); }
  TransportCapabilities capabilities() const noexcept override {
    TransportCapabilities caps;
    caps.stream_ordered = stream_ordered_;
    caps.world_size_from_config = true;
    return caps;
  }
  std::string name() const override { return "inproc"; }

  void barrier() override { run_barrier(*world_, next_seq_++, rank_); }

  std::unique_ptr<Transport> split(int color, int key) override {
    auto [new_world, new_rank] = run_split(*world_, next_seq_++, rank_, color, key);
    if (color < 0) return nullptr;
    return std::make_unique<InprocTransport>(std::move(new_world), new_rank, stream_ordered_);
  }

  void abort(const std::string& reason) noexcept override { world_->abort(reason); }

  World& world() { return *world_; }

 protected:
  void do_alltoall(const void* send, void* recv, std::size_t bytes_per_peer,
                   Stream& stream) override {
    QueuedOp& op = take_op(stream);
    op.kind = QueuedOp::Kind::kAlltoall;
    op.buffers.send = static_cast<const std::byte*>(send);
    op.buffers.recv = static_cast<std::byte*>(recv);
    op.bytes_per_peer = bytes_per_peer;
    submit(op, stream);
  }

  void do_alltoallv(const AlltoallvBuffers& buffers, Stream& stream) override {
    QueuedOp& op = take_op(stream);
    op.kind = QueuedOp::Kind::kAlltoallv;
    op.buffers = buffers;
    submit(op, stream);
  }

  std::unique_ptr<TransportRequest> do_ialltoallv(const AlltoallvBuffers& buffers) override;

  void do_allreduce(void* data, std::size_t count, DType dtype, ReduceOp op_kind,
                    Stream& stream) override {
    reduce_into(nullptr, nullptr, 0, dtype, op_kind);  // rejects unsupported dtypes at once
    QueuedOp& op = take_op(stream);
    op.kind = QueuedOp::Kind::kAllreduce;
    op.data = data;
    op.count = count;
    op.dtype = dtype;
    op.op = op_kind;
    submit(op, stream);
  }

 private:
  friend class InprocRequest;

  /// Queued ops per rank; a caller that runs further ahead waits for its stream.
  static constexpr std::size_t kMaxQueued = 16;

  /// The next op record, with this collective's sequence number taken in call order.
  QueuedOp& take_op(Stream& stream) {
    if (stream.as_host() == nullptr) {
      throw Error(ErrorCode::kInvalidArgument, "inproc: needs a host stream");
    }
    QueuedOp& op = queued_[next_op_++ % kMaxQueued];
    if (op.busy.load(std::memory_order_acquire)) stream.synchronize();
    op.transport = this;
    op.seq = next_seq_++;
    return op;
  }

  /// Runs `op` now (host-synchronous mode) or queues it on the stream.
  void submit(QueuedOp& op, Stream& stream) {
    if (!stream_ordered_) {
      run(op);
      return;
    }
    op.busy.store(true, std::memory_order_release);
    stream.as_host()->enqueue(&InprocTransport::run_queued, &op);
  }

  static void run_queued(void* argument) {
    auto* op = static_cast<QueuedOp*>(argument);
    struct Release {
      QueuedOp* op;
      ~Release() { op->busy.store(false, std::memory_order_release); }
    } release{op};
    op->transport->run(*op);
  }

  void run(QueuedOp& op) {
    switch (op.kind) {
      case QueuedOp::Kind::kAlltoall:
        return run_alltoall(op);
      case QueuedOp::Kind::kAlltoallv:
        return run_alltoallv(op);
      case QueuedOp::Kind::kAllreduce:
        return run_allreduce(op);
    }
  }

  void run_alltoall(QueuedOp& op) {
    const std::uint64_t seq = op.seq;
    const std::size_t bytes_per_peer = op.bytes_per_peer;
    const AlltoallArgument mine{op.buffers.send, bytes_per_peer};
    world_->arrive(seq, rank_, &mine, "alltoall");
    auto posted = world_->wait_all_arrived(seq, "alltoall");
    DepartOnThrow reading(*world_, seq, rank_);
    std::optional<Error> problem;
    for (std::size_t p = 0; p < posted.size(); ++p) {
      const auto* peer = static_cast<const AlltoallArgument*>(posted[p]);
      if (peer->bytes_per_peer != bytes_per_peer) {
        problem = Error(ErrorCode::kInvalidArgument,
                        "inproc alltoall: rank " + std::to_string(p) + " sends " +
                            std::to_string(peer->bytes_per_peer) + " bytes per peer, rank " +
                            std::to_string(rank_) + " expects " + std::to_string(bytes_per_peer));
        continue;
      }
      if (bytes_per_peer != 0) {
        std::memcpy(op.buffers.recv + p * bytes_per_peer,
                    peer->send + static_cast<std::size_t>(rank_) * bytes_per_peer, bytes_per_peer);
      }
    }
    reading.release();
    finish(seq, "alltoall");
    if (problem) throw *problem;
  }

  void run_alltoallv(QueuedOp& op) {
    inproc::run_alltoallv(*world_, op.seq, rank_, op.buffers, "inproc");
  }

  void run_allreduce(QueuedOp& op) {
    const AllreduceArgument mine{op.data, op.count, op.dtype, op.op};
    const std::size_t bytes = op.count * dtype_size(op.dtype);
    op.scratch.resize(bytes);
    world_->arrive(op.seq, rank_, &mine, "allreduce");
    auto posted = world_->wait_all_arrived(op.seq, "allreduce");
    DepartOnThrow reading(*world_, op.seq, rank_);
    std::optional<Error> problem;
    // Rank order, so that every rank computes the same bits.
    for (std::size_t p = 0; p < posted.size(); ++p) {
      const auto* peer = static_cast<const AllreduceArgument*>(posted[p]);
      if (peer->count != op.count || peer->dtype != op.dtype || peer->op != op.op) {
        problem =
            Error(ErrorCode::kInvalidArgument, "inproc allreduce: rank " + std::to_string(p) +
                                                   " passed a different count, dtype or operation");
        break;
      }
      if (p == 0) {
        if (bytes) std::memcpy(op.scratch.data(), peer->data, bytes);
        continue;
      }
      reduce_into(op.scratch.data(), peer->data, op.count, op.dtype, op.op);
    }
    reading.release();
    finish(op.seq, "allreduce");  // peers have read `data`; now it may be overwritten
    if (problem) throw *problem;
    if (bytes) std::memcpy(op.data, op.scratch.data(), bytes);
  }

  void finish(std::uint64_t seq, const char* op) {
    world_->depart(seq, rank_);
    world_->wait_all_departed(seq, op);
  }

  std::shared_ptr<World> world_;
  const int rank_;
  const bool stream_ordered_;
  std::uint64_t next_seq_ = 0;
  std::size_t next_op_ = 0;
  std::vector<QueuedOp> queued_;
};

class InprocRequest final : public TransportRequest {
 public:
  InprocRequest(InprocTransport& transport, std::uint64_t seq, const AlltoallvBuffers& buffers)
      : transport_(transport), seq_(seq), buffers_(buffers) {}
  ~InprocRequest() override {
    if (done_) return;
    try {
      wait();
    } catch (...) {
      // A destructor cannot report; the communicator is failing and later calls say why.
    }
  }

  void wait() override {
    if (done_) return;
    World& world = transport_.world();
    if (!pulled_) {
      const auto posted = world.wait_all_arrived(seq_, "ialltoallv");
      DepartOnThrow reading(world, seq_, transport_.rank());
      problem_ = pull_alltoallv(posted, transport_.rank(), buffers_, "inproc");
      reading.release();
      pulled_ = true;
      world.depart(seq_, transport_.rank());
    }
    world.wait_all_departed(seq_, "ialltoallv");
    complete();
  }

  /// The copy of the caller's buffers that peers read while the request is in flight.
  const AlltoallvBuffers& buffers() const noexcept { return buffers_; }

  bool test() override {
    if (done_) return true;
    World& world = transport_.world();
    if (!pulled_) {
      const auto posted = world.try_all_arrived(seq_, "ialltoallv");
      if (!posted) return false;
      DepartOnThrow reading(world, seq_, transport_.rank());
      problem_ = pull_alltoallv(*posted, transport_.rank(), buffers_, "inproc");
      reading.release();
      pulled_ = true;
      world.depart(seq_, transport_.rank());
    }
    if (!world.all_departed(seq_)) return false;
    complete();
    return true;
  }

 private:
  void complete() {
    done_ = true;
    if (problem_) throw *problem_;
  }
  InprocTransport& transport_;
  const std::uint64_t seq_;
  const AlltoallvBuffers buffers_;
  bool pulled_ = false;
  bool done_ = false;
  std::optional<Error> problem_;
};

std::unique_ptr<TransportRequest> InprocTransport::do_ialltoallv(const AlltoallvBuffers& buffers) {
  const std::uint64_t seq = next_seq_++;
  auto request = std::make_unique<InprocRequest>(*this, seq, buffers);
  // The request's copy of `buffers` is what peers read: it lives as long as the request.
  world_->arrive(seq, rank_, &request->buffers(), "ialltoallv");
  return request;
}

std::vector<std::unique_ptr<Transport>> create(const TransportCreateArgs& args) {
  const int n = args.requested_ranks;
  if (n < 1) throw Error(ErrorCode::kInvalidArgument, "inproc transport: ranks must be >= 1");
  if (!(args.timeout_s > 0 && args.timeout_s <= kMaxTimeoutSeconds)) {
    throw Error(ErrorCode::kInvalidArgument, "inproc transport: timeout_s must be in (0, " +
                                                 format_seconds(kMaxTimeoutSeconds) + "] (got " +
                                                 std::to_string(args.timeout_s) + ")");
  }
  Topology topology = args.ranks_per_node > 0
                          ? Topology::uniform(n, args.ranks_per_node)
                          : Topology(std::vector<int>(static_cast<std::size_t>(n), 0));
  auto world = std::make_shared<World>(n, args.timeout_s, std::move(topology),
                                       std::make_shared<AbortState>());
  const bool stream_ordered = args.options != nullptr && args.options->get_bool("inproc_async");
  std::vector<std::unique_ptr<Transport>> ranks;
  for (int r = 0; r < n; ++r) {
    ranks.push_back(std::make_unique<InprocTransport>(world, r, stream_ordered));
  }
  return ranks;
}

}  // namespace
}  // namespace switchyard::inproc

SWITCHYARD_TRANSPORT_PLUGIN("inproc", "0.1.0",
                            "ranks as threads of one process, copying through shared memory",
                            ::switchyard::inproc::declare_options, nullptr,
                            ::switchyard::inproc::create)
