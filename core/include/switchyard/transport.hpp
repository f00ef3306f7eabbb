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
#include "switchyard/stream.hpp"
#include "switchyard/tensor.hpp"
#include "switchyard/topology.hpp"

namespace switchyard {

/// What a transport can do. The core checks these before it calls, never the plugin's name.
struct TransportCapabilities {
  bool host_memory = true;      ///< buffers may live in host memory (pageable or pinned)
  bool device_memory = false;   ///< buffers may live in CUDA device memory
  bool async_progress = false;  ///< non-blocking operations progress without wait()/test()
  /// Collectives on a stream enqueue and return before the work is done (see stream.hpp).
  /// False: they finish before returning (host-synchronous).
  bool stream_ordered = false;
  /// `allreduce` gives the same bits on every rank and run (contributions combined in rank
  /// order). Code that needs bit-identical results across ranks requires it.
  bool deterministic_reductions = true;
  /// The world size is `[runtime] ranks` (ranks are threads of this process), not the
  /// launcher's.
  bool world_size_from_config = false;
};

/// One rank's side of an all-to-all with a different byte count per peer.
/// All arrays have `size()` entries, indexed by peer rank. Counts and offsets are in
/// bytes. `send_counts[p]` on this rank must equal `recv_counts[me]` on rank p. The count
/// and offset arrays are host memory; `send` and `recv` live on `device`.
struct AlltoallvBuffers {
  const std::byte* send = nullptr;
  std::span<const std::size_t> send_counts;
  std::span<const std::size_t> send_offsets;
  std::byte* recv = nullptr;
  std::span<const std::size_t> recv_counts;
  std::span<const std::size_t> recv_offsets;
  Device device = Device::host();  ///< where `send` and `recv` live
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
/// with matching arguments. A peer that does not arrive within the transport's timeout
/// makes the call (or, for stream-ordered work, the stream's `synchronize()`) throw
/// `Error(kTimeout)` naming the operation and the missing ranks; it never hangs.
/// One thread at a time may call into a given Transport object.
///
/// Data collectives come in two forms. With a `Stream&`, the buffers live on the stream's
/// device and the work is ordered on the stream (see stream.hpp): a host-synchronous
/// transport has finished when it returns, a stream-ordered one may not have, and the
/// buffers must not be touched until the stream is synchronized. Without a stream, the
/// buffers are host memory and the call blocks until they may be reused. Both check the
/// arguments and the transport's capabilities first and throw `Error(kInvalidArgument)`
/// naming the transport and the buffer when they do not fit; the plugin implements the
/// protected `do_*` functions and never sees a call that failed those checks.
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
  /// Plugin name, e.g. "inproc", for messages only.
  virtual std::string name() const = 0;

  /// Fixed-size all-to-all: sends `bytes_per_peer` bytes from `send + p*bytes_per_peer`
  /// to rank p, receives rank p's block into `recv + p*bytes_per_peer`.
  void alltoall(const void* send, void* recv, std::size_t bytes_per_peer, Stream& stream);
  void alltoall(const void* send, void* recv, std::size_t bytes_per_peer);
  /// Variable-size all-to-all (see `AlltoallvBuffers`); `buffers.device` must be the
  /// stream's device.
  void alltoallv(const AlltoallvBuffers& buffers, Stream& stream);
  void alltoallv(const AlltoallvBuffers& buffers);
  /// Several `alltoallv`s as one collective, in order, on the stream: a device transport
  /// moves them together (NCCL: one group), so that a token's row and its slots travel in
  /// one exchange. Each is checked as `alltoallv` checks it, all before any moves.
  void alltoallv_group(std::span<const AlltoallvBuffers> exchanges, Stream& stream);
  /// Non-blocking host `alltoallv`, driven by the returned request; the spans in `buffers`
  /// and the memory they describe must outlive the request.
  std::unique_ptr<TransportRequest> ialltoallv(const AlltoallvBuffers& buffers);
  /// In-place reduction of `count` elements of `dtype` (f32, f64, i32, i64) over all
  /// ranks, on the stream's device. With `deterministic_reductions` the result is
  /// bit-identical on every rank: contributions are combined in rank order.
  void allreduce(void* data, std::size_t count, DType dtype, ReduceOp op, Stream& stream);
  void allreduce(void* data, std::size_t count, DType dtype, ReduceOp op);

  /// Throws, once, the error of this communicator's stream-ordered work that failed after it
  /// was enqueued (a peer that did not come within the timeout, an asynchronous error), so
  /// that a caller that has waited for its stream learns that the stream holds no exchange
  /// result; does nothing otherwise. For transports whose failures a stream's
  /// `synchronize()` cannot report (a CUDA stream does not know of NCCL's watchdog). The
  /// default does nothing.
  virtual void raise_stream_error() {}
  /// Returns when every rank has called it. Host control operation: blocking.
  virtual void barrier() = 0;
  /// Collective: splits into sub-communicators of the ranks that passed the same `color`,
  /// ordered by (`key`, old rank). A negative color takes part but gets nullptr. Host
  /// control operation: blocking.
  virtual std::unique_ptr<Transport> split(int color, int key) = 0;
  /// Marks the communicator failed from this rank (e.g. after an exception), so that
  /// peers blocked in or later entering a collective fail fast with kPeerFailed instead
  /// of waiting for the timeout where the transport can tell them. Never throws.
  virtual void abort(const std::string& reason) noexcept = 0;

 protected:
  /// The plugin's collectives, called only with checked arguments (see above).
  virtual void do_alltoall(const void* send, void* recv, std::size_t bytes_per_peer,
                           Stream& stream) = 0;
  virtual void do_alltoallv(const AlltoallvBuffers& buffers, Stream& stream) = 0;
  /// The default runs `do_alltoallv` for each exchange in order.
  virtual void do_alltoallv_group(std::span<const AlltoallvBuffers> exchanges, Stream& stream);
  virtual std::unique_ptr<TransportRequest> do_ialltoallv(const AlltoallvBuffers& buffers) = 0;
  virtual void do_allreduce(void* data, std::size_t count, DType dtype, ReduceOp op,
                            Stream& stream) = 0;

 private:
  /// Throws unless this transport accepts memory on `device` ("buffer" names it).
  void require_memory(Device device, const char* op, const char* buffer) const;
  /// `alltoallv`'s checks of `buffers` on `stream`.
  void check_alltoallv(const AlltoallvBuffers& buffers, const Stream& stream) const;
};

}  // namespace switchyard
