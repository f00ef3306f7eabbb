#pragma once
/// \file
/// The all-to-all engine of host point-to-point transports (MPI, UCX), written once: the
/// self-copy, message chunking, the deadline, the size checks, the "timed out waiting for
/// rank(s) ..." error, the wait loop, and a `Transport` base whose collectives all run on
/// it. A transport supplies only how to post, test and cancel one message
/// (`PeerMessaging`).

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "switchyard/collectives.hpp"
#include "switchyard/transport.hpp"

namespace switchyard {

/// One message of an exchange: all or a chunk of what this rank sends to or receives from
/// one peer.
struct PeerMessage {
  int peer = 0;
  bool receive = false;
  std::byte* data = nullptr;
  std::size_t bytes = 0;
};

/// The state of a posted message.
struct PeerMessageStatus {
  enum class State { kPending, kDone, kFailed };
  State state = State::kPending;
  std::size_t received_bytes = 0;  ///< a done receive: how many bytes arrived
  bool truncated = false;          ///< a receive whose sender sent more than expected
  std::string error;  ///< kFailed: what went wrong; the exchange ends at once (kPeerFailed)
};

/// What a host point-to-point transport supplies: posting, testing and cancelling one
/// message. Handles are opaque (an `MPI_Request`, a UCP request pointer) and never null
/// for a posted message. Used by one thread at a time.
class PeerMessaging {
 public:
  virtual ~PeerMessaging() = default;
  /// Posts `message` of collective number `seq`; errors throw `Error`.
  virtual void* post(const PeerMessage& message, std::uint64_t seq) = 0;
  /// Lets the library progress, once per poll of an exchange.
  virtual void progress() {}
  /// Tests a posted message; once it is not pending, the handle is released.
  virtual PeerMessageStatus test(void* handle, const PeerMessage& message) = 0;
  /// Cancels and releases a message that is still posted. Never throws.
  virtual void cancel(void* handle, const PeerMessage& message) noexcept = 0;
  /// Largest single message; longer per-peer payloads are sent in chunks of this size.
  virtual std::size_t max_message_bytes() const noexcept { return SIZE_MAX; }
  /// Transport name for messages, e.g. "mpi".
  virtual std::string_view name() const noexcept = 0;
  /// The world rank of each rank of this communicator, for messages; null when the
  /// communicator is the world itself.
  virtual const std::vector<int>* world_ranks() const noexcept { return nullptr; }
};

/// "rank(s) 1, 2" for ranks of the world, "world rank(s) 5, 7" for ranks of a split
/// communicator (translated through `messaging.world_ranks()`).
std::string describe_ranks(const PeerMessaging& messaging, const std::vector<int>& ranks);

/// One all-to-all in flight over a `PeerMessaging`. Reusable from one collective to the
/// next: its lists do not allocate once they have grown.
class PeerExchange {
 public:
  PeerExchange() = default;
  PeerExchange(const PeerExchange&) = delete;
  PeerExchange& operator=(const PeerExchange&) = delete;
  ~PeerExchange() { release(); }

  /// Copies this rank's own block and posts every receive and send of `buffers` (counts
  /// already checked), as collective `seq` of a communicator where this rank is `me`.
  void start(PeerMessaging& messaging, int me, std::uint64_t seq, const AlltoallvBuffers& buffers,
             double timeout_s, const char* op);
  /// Progresses; true when every message is complete. Throws `Error` on a failed or wrong-size
  /// message (kInvalidArgument), or when the deadline passes (kTimeout, naming the peers).
  bool test();
  /// Polls `test()` until it is true (or throws).
  void wait();

 private:
  void post(int peer, bool receive, std::byte* data, std::size_t bytes, std::uint64_t seq);
  void record(std::string what);
  /// Cancels whatever is still posted (after a failure or before a restart).
  void release() noexcept;

  PeerMessaging* messaging_ = nullptr;
  const char* op_ = "";
  double timeout_s_ = 0;
  std::vector<PeerMessage> messages_;
  std::vector<void*> handles_;  // null once complete
  std::size_t pending_ = 0;
  std::optional<std::string> problem_;
  std::chrono::steady_clock::time_point deadline_;
};

/// A host-synchronous transport whose collectives all run on `PeerExchange`: alltoall,
/// alltoallv, ialltoallv, allreduce (in rank order: deterministic) and barrier. A
/// subclass supplies the messaging, the communicator's identity and `split`/`abort`.
class PeerTransport : public Transport {
 public:
  /// `keep_alive` (the library's session) is held by every request so that it outlives
  /// them.
  PeerTransport(std::shared_ptr<void> keep_alive, double timeout_s)
      : keep_alive_(std::move(keep_alive)), timeout_s_(timeout_s) {}
  TransportCapabilities capabilities() const noexcept override { return {}; }
  void barrier() override { barrier_through_alltoall(*this, scratch_); }

 protected:
  void do_alltoall(const void* send, void* recv, std::size_t bytes_per_peer,
                   Stream& stream) override;
  void do_alltoallv(const AlltoallvBuffers& buffers, Stream& stream) override;
  std::unique_ptr<TransportRequest> do_ialltoallv(const AlltoallvBuffers& buffers) override;
  void do_allreduce(void* data, std::size_t count, DType dtype, ReduceOp op,
                    Stream& stream) override;
  /// This communicator's messaging (it lives as long as the transport).
  virtual PeerMessaging& messaging() noexcept = 0;
  /// Throws before a collective starts when this communicator cannot run one (aborted).
  virtual void check_usable(const char* /*op*/) const {}
  /// How many collectives this communicator has started (the next one's number).
  std::uint64_t collectives_started() const noexcept { return next_seq_; }
  double timeout_s() const noexcept { return timeout_s_; }

 private:
  void run(const AlltoallvBuffers& buffers, const char* op);
  std::shared_ptr<void> keep_alive_;
  double timeout_s_;
  std::uint64_t next_seq_ = 0;
  CollectiveScratch scratch_;
  PeerExchange blocking_;  // reused by every blocking collective
};

}  // namespace switchyard
