#pragma once
/// \file
/// The abstract communication interface. Every transport plugin (in-process, MPI, UCX,
/// NCCL) implements it; the scheduler and all collective algorithms use only this.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "switchyard/status.hpp"
#include "switchyard/tensor.hpp"
#include "switchyard/topology.hpp"

namespace switchyard {

/// What a transport can do.
struct TransportCapabilities {
  bool host_memory = true;      ///< buffers may live in host memory
  bool device_memory = false;   ///< buffers may live in CUDA device memory
  bool async_progress = false;  ///< non-blocking operations progress without wait()/test()
};

/// One rank's side of an all-to-all with a different byte count per peer.
/// All arrays have `size()` entries, indexed by peer rank. Counts and offsets are in
/// bytes. `send_counts[p]` on this rank must equal `recv_counts[me]` on rank p.
struct AlltoallvBuffers {
  const std::byte* send = nullptr;
  std::span<const std::size_t> send_counts;
  std::span<const std::size_t> send_offsets;
  std::byte* recv = nullptr;
  std::span<const std::size_t> recv_counts;
  std::span<const std::size_t> recv_offsets;
};

/// Reductions for `allreduce`.
enum class ReduceOp : std::uint8_t { kSum, kMax, kMin };

/// A non-blocking operation in flight. The buffers it was started with must stay valid
/// and untouched until `wait()` returns or `test()` returns true. Destroying a request
/// that has not completed waits for it. Not thread-safe: one thread drives a request.
class TransportRequest {
 public:
  virtual ~TransportRequest() = default;
  /// Blocks until the operation completes; throws `Error` (timeout, peer failure).
  virtual void wait() = 0;
  /// Makes progress without blocking; true once complete. Throws like `wait()`.
  virtual bool test() = 0;
};

/// A communicator: `size()` ranks that run the same sequence of collective calls.
///
/// Contract for every collective: all ranks of the communicator call it in the same order
/// with matching arguments; it returns when this rank's part is done and its buffers may
/// be reused. A peer that does not arrive within the transport's timeout makes the call
/// throw `Error(kTimeout)` naming the operation and the missing ranks; it never hangs.
/// One thread at a time may call into a given Transport object.
class Transport {
 public:
  virtual ~Transport() = default;

  /// This rank's index in 0..size()-1.
  virtual int rank() const noexcept = 0;
  /// Number of ranks in this communicator.
  virtual int size() const noexcept = 0;
  /// Node placement of the ranks of this communicator.
  virtual const Topology& topology() const noexcept = 0;
  virtual TransportCapabilities capabilities() const noexcept = 0;
  /// Plugin name, e.g. "inproc".
  virtual std::string name() const = 0;

  /// Fixed-size all-to-all: sends `bytes_per_peer` bytes from `send + p*bytes_per_peer`
  /// to rank p, receives rank p's block into `recv + p*bytes_per_peer`. Blocking.
  virtual void alltoall(const void* send, void* recv, std::size_t bytes_per_peer) = 0;
  /// Variable-size all-to-all (see `AlltoallvBuffers`). Blocking.
  virtual void alltoallv(const AlltoallvBuffers& buffers) = 0;
  /// Non-blocking `alltoallv`; the spans in `buffers` and the memory they describe must
  /// outlive the request.
  virtual std::unique_ptr<TransportRequest> ialltoallv(const AlltoallvBuffers& buffers) = 0;
  /// In-place reduction of `count` elements of `dtype` (f32, f64, i32, i64) over all
  /// ranks. The result is bit-identical on every rank: contributions are combined in
  /// rank order. Blocking.
  virtual void allreduce(void* data, std::size_t count, DType dtype, ReduceOp op) = 0;
  /// Returns when every rank has called it.
  virtual void barrier() = 0;
  /// Collective: splits into sub-communicators of the ranks that passed the same `color`,
  /// ordered by (`key`, old rank). A negative color takes part but gets nullptr.
  virtual std::unique_ptr<Transport> split(int color, int key) = 0;
  /// Marks the communicator failed from this rank (e.g. after an exception), so that
  /// peers blocked in or later entering a collective fail fast with kPeerFailed instead
  /// of waiting for the timeout where the transport can tell them. Never throws.
  virtual void abort(const std::string& reason) noexcept = 0;
};

}  // namespace switchyard
