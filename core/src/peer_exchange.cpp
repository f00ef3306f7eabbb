#include "switchyard/peer_exchange.hpp"

#include <algorithm>
#include <cstring>

#include "switchyard/status.hpp"

namespace switchyard {

std::string describe_ranks(const PeerMessaging& messaging, const std::vector<int>& ranks) {
  const std::vector<int>* world = messaging.world_ranks();
  std::string text = world == nullptr ? "rank(s) " : "world rank(s) ";
  for (std::size_t i = 0; i < ranks.size(); ++i) {
    if (i > 0) text += ", ";
    text +=
        std::to_string(world == nullptr ? ranks[i] : (*world)[static_cast<std::size_t>(ranks[i])]);
  }
  return text;
}

void PeerExchange::start(PeerMessaging& messaging, int me, std::uint64_t seq,
                         const AlltoallvBuffers& b, double timeout_s, const char* op) {
  release();
  messaging_ = &messaging;
  op_ = op;
  timeout_s_ = timeout_s;
  problem_.reset();
  messages_.clear();
  handles_.clear();
  pending_ = 0;
  const std::size_t n = b.send_counts.size();
  for (std::size_t p = 0; p < n; ++p) {
    if (static_cast<int>(p) == me) {
      if (b.send_counts[p] != b.recv_counts[p]) {
        record("rank sends itself " + std::to_string(b.send_counts[p]) + " bytes but expects " +
               std::to_string(b.recv_counts[p]));
      } else if (b.send_counts[p] != 0) {
        std::memcpy(b.recv + b.recv_offsets[p], b.send + b.send_offsets[p], b.send_counts[p]);
      }
      continue;
    }
    post(static_cast<int>(p), true, b.recv + b.recv_offsets[p], b.recv_counts[p], seq);
    post(static_cast<int>(p), false, const_cast<std::byte*>(b.send + b.send_offsets[p]),
         b.send_counts[p], seq);
  }
  deadline_ = std::chrono::steady_clock::now() +
              std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                  std::chrono::duration<double>(timeout_s));
}

void PeerExchange::post(int peer, bool receive, std::byte* data, std::size_t bytes,
                        std::uint64_t seq) {
  // Chunks of one peer share the collective's tag; both libraries keep their order
  // between a pair of ranks. Empty payloads post nothing: the sizes are agreed on.
  const std::size_t chunk = std::max<std::size_t>(1, messaging_->max_message_bytes());
  for (std::size_t offset = 0; offset < bytes; offset += chunk) {
    const PeerMessage m{peer, receive, data + offset, std::min(chunk, bytes - offset)};
    messages_.push_back(m);
    handles_.push_back(nullptr);
    handles_.back() = messaging_->post(m, seq);
    ++pending_;
  }
}

void PeerExchange::record(std::string what) {
  if (!problem_) problem_ = std::move(what);
}

bool PeerExchange::test() {
  if (pending_ > 0) {
    messaging_->progress();
    for (std::size_t i = 0; i < handles_.size(); ++i) {
      if (handles_[i] == nullptr) continue;
      const PeerMessage& m = messages_[i];
      const PeerMessageStatus status = messaging_->test(handles_[i], m);
      if (status.state == PeerMessageStatus::State::kPending) continue;
      handles_[i] = nullptr;
      --pending_;
      if (status.state == PeerMessageStatus::State::kFailed) {
        // A broken connection will not heal: end now instead of waiting for the deadline.
        const std::string what = std::string(messaging_->name()) + " " + op_ + ": " +
                                 (m.receive ? "receive from " : "send to ") +
                                 describe_ranks(*messaging_, {m.peer}) + " failed: " + status.error;
        release();
        throw Error(ErrorCode::kPeerFailed, what);
      }
      if (m.receive && (status.truncated || status.received_bytes != m.bytes)) {
        record("rank " + std::to_string(m.peer) + " sent " +
               (status.truncated ? std::string("more than the")
                                 : std::string("a different size than the")) +
               " " + std::to_string(m.bytes) + " bytes expected");
      }
    }
  }
  if (pending_ == 0) {
    if (problem_) {
      throw Error(ErrorCode::kInvalidArgument,
                  std::string(messaging_->name()) + " " + op_ + ": " + *problem_);
    }
    return true;
  }
  if (std::chrono::steady_clock::now() > deadline_) {
    std::vector<int> missing;
    for (std::size_t i = 0; i < handles_.size(); ++i) {
      if (handles_[i] != nullptr) missing.push_back(messages_[i].peer);
    }
    std::sort(missing.begin(), missing.end());
    missing.erase(std::unique(missing.begin(), missing.end()), missing.end());
    throw Error(ErrorCode::kTimeout, std::string(messaging_->name()) + " " + op_ +
                                         ": timed out after " + format_seconds(timeout_s_) +
                                         " waiting for " + describe_ranks(*messaging_, missing) +
                                         " (dead, stuck, or not calling the same collective)");
  }
  return false;
}

void PeerExchange::wait() {
  while (!test()) {
  }
}

void PeerExchange::release() noexcept {
  if (messaging_ == nullptr) return;
  for (std::size_t i = 0; i < handles_.size(); ++i) {
    if (handles_[i] == nullptr) continue;
    messaging_->cancel(handles_[i], messages_[i]);
    handles_[i] = nullptr;
  }
  pending_ = 0;
}

void PeerTransport::run(const AlltoallvBuffers& buffers, const char* op) {
  check_usable(op);
  blocking_.start(messaging(), rank(), next_seq_++, buffers, timeout_s_, op);
  blocking_.wait();
}

void PeerTransport::do_alltoall(const void* send, void* recv, std::size_t bytes_per_peer,
                                Stream& /*stream*/) {
  run(alltoall_as_alltoallv(send, recv, bytes_per_peer, size(), scratch_), "alltoall");
}

void PeerTransport::do_alltoallv(const AlltoallvBuffers& buffers, Stream& /*stream*/) {
  run(buffers, "alltoallv");
}

std::unique_ptr<TransportRequest> PeerTransport::do_ialltoallv(const AlltoallvBuffers& buffers) {
  check_usable("ialltoallv");
  auto exchange = std::make_unique<PeerExchange>();
  exchange->start(messaging(), rank(), next_seq_++, buffers, timeout_s_, "ialltoallv");
  return std::make_unique<PolledRequest<PeerExchange, void>>(keep_alive_, std::move(exchange));
}

void PeerTransport::do_allreduce(void* data, std::size_t count, DType dtype, ReduceOp op,
                                 Stream& /*stream*/) {
  allreduce_through_alltoall(*this, data, count, dtype, op, scratch_);
}

}  // namespace switchyard
