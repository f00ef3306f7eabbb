// transport_nccl: one process per rank, one GPU per process (local rank mod the visible
// devices), NCCL communicators. The unique id travels through the core's bootstrap store
// (MASTER_ADDR/MASTER_PORT with torchrun's, Open MPI's or Slurm's rank variables, so it
// works under `switchyard launch`, torchrun and `mpirun -x MASTER_ADDR -x MASTER_PORT`);
// a world of one needs no launcher.
//
// Communicators are non-blocking (ncclConfig_t::blocking = 0), so that creating, splitting
// and every collective is bounded by the timeout. Exchanges of device memory are
// stream-ordered (`stream_ordered = true`): alltoallv (and several of them, e.g. rows and
// their slots, as one group: `alltoallv_group`) is grouped ncclSend/ncclRecv queued on the
// caller's stream, and the call returns without waiting. A watchdog thread per communicator
// keeps their timeout: it polls an event after each exchange and ncclCommGetAsyncError, and
// past the deadline, or on an asynchronous NCCL error, aborts the communicator
// (ncclCommAbort, which ends its kernels, so the caller's stream drains) and keeps an error
// naming the operation and the communicator's ranks for `raise_stream_error` (the layer asks
// after each wait) and every later call. Host-memory collectives (the counts, statistics,
// split, barrier) poll an event themselves and return when done: never a hang.
//
// Device memory is NCCL's.
// Host memory (the runtime's small control exchanges: counts, statistics) is staged
// through a device buffer. Reductions gather every contribution (ncclAllGather) and add
// them in rank order on the host, so their bits equal every other transport's.
#include <cuda_runtime.h>
#include <nccl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <numeric>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "cuda_probe.hpp"
#include "switchyard/bootstrap.hpp"
#include "switchyard/collectives.hpp"
#include "switchyard/plugin.hpp"
#include "switchyard/transport.hpp"

namespace switchyard::nccl {
namespace {

using Clock = std::chrono::steady_clock;

std::string cuda_text(cudaError_t e) {
  return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
}

void check_cuda(cudaError_t e, const std::string& what) {
  if (e == cudaSuccess) return;
  throw Error(ErrorCode::kSystem, "nccl transport: " + what + ": " + cuda_text(e));
}

std::string nccl_text(ncclResult_t r, ncclComm_t comm) {
  std::string text = ncclGetErrorString(r);
  const char* last = comm != nullptr ? ncclGetLastError(comm) : nullptr;
  if (last != nullptr && *last != '\0') text += " (" + std::string(last) + ")";
  return text;
}

/// "ranks 0-3" or "ranks 0, 2, 5": the world ranks of a communicator, for messages.
std::string describe_ranks(const std::vector<int>& world_ranks) {
  bool consecutive = true;
  for (std::size_t i = 1; i < world_ranks.size(); ++i)
    consecutive = consecutive && world_ranks[i] == world_ranks[i - 1] + 1;
  if (world_ranks.size() == 1) return "rank " + std::to_string(world_ranks[0]);
  if (consecutive && !world_ranks.empty()) {
    return "ranks " + std::to_string(world_ranks.front()) + "-" +
           std::to_string(world_ranks.back());
  }
  std::string out = "ranks ";
  for (std::size_t i = 0; i < world_ranks.size(); ++i)
    out += (i ? ", " : "") + std::to_string(world_ranks[i]);
  return out;
}

ncclDataType_t nccl_type(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return ncclFloat32;
    case DType::kF64:
      return ncclFloat64;
    case DType::kI32:
      return ncclInt32;
    case DType::kI64:
      return ncclInt64;
    default:
      break;
  }
  throw Error(ErrorCode::kInvalidArgument,
              "nccl transport: allreduce supports f32, f64, i32 and i64");
}

/// One NCCL communicator, its device and the state shared by the operations on it.
class Communicator {
 public:
  Communicator(ncclComm_t comm, int device, std::vector<int> world_ranks, double timeout_s)
      : comm_(comm), device_(device), world_ranks_(std::move(world_ranks)), timeout_s_(timeout_s) {
    check_cuda(cudaSetDevice(device_), "selecting device " + std::to_string(device_));
    check_cuda(cudaStreamCreateWithFlags(&staging_stream_, cudaStreamNonBlocking),
               "creating a stream");
    check_cuda(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming), "creating an event");
  }
  ~Communicator() {
    stop_watchdog();
    cudaSetDevice(device_);
    for (cudaEvent_t event : free_events_) cudaEventDestroy(event);
    for (const Watched& w : watched_) cudaEventDestroy(w.event);
    if (comm_ != nullptr) {
      // A communicator whose peers are gone cannot be finalised collectively: abort it.
      if (aborted_) {
        ncclCommAbort(comm_);
      } else {
        ncclCommFinalize(comm_);
        ncclResult_t state = ncclInProgress;
        const auto deadline = Clock::now() + std::chrono::seconds(2);
        while (ncclCommGetAsyncError(comm_, &state) == ncclSuccess && state == ncclInProgress &&
               Clock::now() < deadline)
          std::this_thread::yield();
        if (state == ncclSuccess) {
          ncclCommDestroy(comm_);
        } else {
          ncclCommAbort(comm_);
        }
      }
    }
    if (staging_ != nullptr) cudaFree(staging_);
    if (done_ != nullptr) cudaEventDestroy(done_);
    if (staging_stream_ != nullptr) cudaStreamDestroy(staging_stream_);
  }
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  ncclComm_t comm() const { return comm_; }
  int device() const { return device_; }
  const std::vector<int>& world_ranks() const { return world_ranks_; }
  double timeout_s() const { return timeout_s_; }
  cudaStream_t staging_stream() const { return staging_stream_; }

  /// Held by the thread that uses the communicator for the whole of an operation, so that
  /// the watchdog never aborts (frees) it in the middle of a call; recursive, because a
  /// failing operation aborts it itself.
  std::recursive_mutex& in_use() { return in_use_; }

  /// Throws if the communicator was aborted (the watchdog's error first, once); makes its
  /// device current.
  void enter(const char* op) {
    raise_stream_error();
    if (aborted_) {
      throw Error(ErrorCode::kPeerFailed,
                  std::string("nccl ") + op + " on " + describe_ranks(world_ranks_) +
                      ": the communicator was aborted (" + abort_reason_ + ")");
    }
    check_cuda(cudaSetDevice(device_), "selecting device " + std::to_string(device_));
  }

  /// Hands the work enqueued on `stream` so far to the watchdog: it aborts the
  /// communicator when that work is not done within the timeout or NCCL reports an
  /// asynchronous error (a peer died), and the error waits for `raise_stream_error`.
  /// Nothing waits here: the caller goes on queuing work behind the exchange.
  void watch(cudaStream_t stream, const char* op) {
    std::lock_guard lock(watch_mutex_);
    cudaEvent_t event = nullptr;
    if (free_events_.empty()) {
      check_cuda(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "creating an event");
    } else {
      event = free_events_.back();
      free_events_.pop_back();
    }
    const cudaError_t recorded = cudaEventRecord(event, stream);
    if (recorded != cudaSuccess) {
      free_events_.push_back(event);
      check_cuda(recorded, std::string(op) + ": recording an event");
    }
    watched_.push_back({event, Clock::now() + to_duration(timeout_s_), op});
    if (!watchdog_.joinable()) watchdog_ = std::thread([this] { watch_loop(); });
    watch_changed_.notify_all();
  }

  /// Throws, once, what the watchdog found (see `Transport::raise_stream_error`).
  void raise_stream_error() {
    std::lock_guard lock(watch_mutex_);
    if (stream_error_) {
      const Error error = *stream_error_;
      stream_error_.reset();
      throw error;
    }
  }

  /// Checks the result of an NCCL call; ncclInProgress (non-blocking) is fine.
  void check(ncclResult_t r, const char* op) {
    if (r == ncclSuccess || r == ncclInProgress) return;
    fail(ErrorCode::kSystem, op, nccl_text(r, comm_));
  }

  /// Waits, bounded by the timeout, until the communicator has no call in progress (after
  /// init, split or a group of operations).
  void wait_ready(const char* op) {
    const auto deadline = Clock::now() + to_duration(timeout_s_);
    for (;;) {
      ncclResult_t state = ncclSuccess;
      check(ncclCommGetAsyncError(comm_, &state), op);
      if (state == ncclSuccess) return;
      if (state != ncclInProgress) fail(ErrorCode::kPeerFailed, op, nccl_text(state, comm_));
      if (Clock::now() > deadline) time_out(op);
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }

  /// Waits, bounded by the timeout, until the work enqueued on `stream` so far is done,
  /// watching the communicator for asynchronous errors (a peer that died or aborted).
  void wait_done(cudaStream_t stream, const char* op) {
    check_cuda(cudaEventRecord(done_, stream), std::string(op) + ": recording an event");
    const auto deadline = Clock::now() + to_duration(timeout_s_);
    for (;;) {
      const cudaError_t q = cudaEventQuery(done_);
      if (q == cudaSuccess) return;
      if (q != cudaErrorNotReady) fail(ErrorCode::kSystem, op, cuda_text(q));
      ncclResult_t state = ncclSuccess;
      ncclCommGetAsyncError(comm_, &state);
      if (state != ncclSuccess && state != ncclInProgress)
        fail(ErrorCode::kPeerFailed, op, nccl_text(state, comm_));
      if (Clock::now() > deadline) time_out(op);
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }

  /// A device buffer of at least `bytes` for staging host memory (grows, never shrinks).
  std::byte* staging(std::size_t bytes) {
    if (bytes > staging_bytes_) {
      if (staging_ != nullptr) check_cuda(cudaFree(staging_), "freeing the staging buffer");
      staging_ = nullptr;
      check_cuda(cudaMalloc(reinterpret_cast<void**>(&staging_), bytes),
                 "allocating " + std::to_string(bytes) + " bytes of staging memory");
      staging_bytes_ = bytes;
    }
    return staging_;
  }

  void abort(const std::string& reason) noexcept {
    const std::lock_guard use(in_use_);
    if (aborted_) return;
    aborted_ = true;
    abort_reason_ = reason;
    cudaSetDevice(device_);
    ncclCommAbort(comm_);
    comm_ = nullptr;
  }

  [[noreturn]] void fail(ErrorCode code, const char* op, const std::string& why) {
    const std::string message = std::string("nccl ") + op + " on " + describe_ranks(world_ranks_) +
                                ": " + why + "; the communicator was aborted";
    abort(why);
    throw Error(code, message);
  }

  [[noreturn]] void time_out(const char* op) {
    fail(ErrorCode::kTimeout, op,
         "not complete after " + std::to_string(timeout_s_) +
             " s (runtime.timeout_s): a rank did not take part or is stuck");
  }

  static Clock::duration to_duration(double seconds) {
    // Clamp so that huge timeouts do not overflow the clock.
    const double bounded = std::min(seconds, 1e9);
    return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(bounded));
  }

 private:
  /// The watchdog: polls the watched events and the communicator's asynchronous error.
  void watch_loop() {
    cudaSetDevice(device_);
    std::unique_lock lock(watch_mutex_);
    while (!stopping_) {
      if (watched_.empty()) {
        watch_changed_.wait(lock);
        continue;
      }
      const auto now = Clock::now();
      const char* late = nullptr;
      for (auto it = watched_.begin(); it != watched_.end();) {
        if (cudaEventQuery(it->event) == cudaSuccess) {
          free_events_.push_back(it->event);
          it = watched_.erase(it);
          continue;
        }
        if (now > it->deadline && late == nullptr) late = it->op;
        ++it;
      }
      // The communicator is only read while no caller is inside an operation (which
      // bounds its own waits).
      if (!watched_.empty() && in_use_.try_lock()) {
        std::optional<Error> failure;
        ncclResult_t state = ncclSuccess;
        if (!aborted_ && comm_ != nullptr) ncclCommGetAsyncError(comm_, &state);
        auto fail_watched = [&](ErrorCode code, const char* op, const std::string& why) {
          std::string message = "nccl ";
          message.append(op).append(" on ").append(describe_ranks(world_ranks_));
          message.append(": ").append(why).append("; the communicator was aborted");
          failure = Error(code, message);
          abort(why);
        };
        if (state != ncclSuccess && state != ncclInProgress) {
          fail_watched(ErrorCode::kPeerFailed, watched_.front().op, nccl_text(state, comm_));
        } else if (late != nullptr) {
          fail_watched(ErrorCode::kTimeout, late,
                       "not complete after " + std::to_string(timeout_s_) +
                           " s (runtime.timeout_s): a rank did not take part or is stuck");
        }
        in_use_.unlock();
        if (failure) {
          // Aborted: its kernels end, and nothing more is watched.
          if (!stream_error_) stream_error_ = failure;
          for (const Watched& w : watched_) free_events_.push_back(w.event);
          watched_.clear();
        }
      }
      lock.unlock();
      std::this_thread::sleep_for(std::chrono::microseconds(200));
      lock.lock();
    }
  }

  void stop_watchdog() noexcept {
    {
      std::lock_guard lock(watch_mutex_);
      stopping_ = true;
    }
    watch_changed_.notify_all();
    if (watchdog_.joinable()) watchdog_.join();
  }

  /// Work handed to the watchdog: done when `event` is.
  struct Watched {
    cudaEvent_t event;
    Clock::time_point deadline;
    const char* op;
  };

  std::recursive_mutex in_use_;
  std::mutex watch_mutex_;  // guards the members below it
  std::condition_variable watch_changed_;
  std::vector<Watched> watched_;
  std::vector<cudaEvent_t> free_events_;
  std::optional<Error> stream_error_;
  bool stopping_ = false;
  std::thread watchdog_;

  ncclComm_t comm_;
  int device_;
  std::vector<int> world_ranks_;
  double timeout_s_;
  cudaStream_t staging_stream_ = nullptr;
  cudaEvent_t done_ = nullptr;
  std::byte* staging_ = nullptr;
  std::size_t staging_bytes_ = 0;
  bool aborted_ = false;
  std::string abort_reason_;
};

/// out = the `ranks` contributions of `count` elements in `gathered` combined in rank order
/// (the same bits as every other transport's reductions).
void reduce_in_rank_order(const std::byte* gathered, std::size_t count, DType dtype, ReduceOp op,
                          int ranks, void* out) {
  const std::size_t bytes = count * dtype_size(dtype);
  std::memcpy(out, gathered, bytes);
  for (int r = 1; r < ranks; ++r)
    reduce_into(out, gathered + static_cast<std::size_t>(r) * bytes, count, dtype, op);
}

ncclConfig_t nonblocking_config() {
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  return config;
}

/// A host alltoallv in flight: the staged copies and the exchange are enqueued on the
/// communicator's staging stream; done when that stream has passed them.
class StagedRequest final : public TransportRequest {
 public:
  explicit StagedRequest(Communicator& communicator) : communicator_(communicator) {}
  ~StagedRequest() override {
    if (!done_) {
      try {
        wait();
      } catch (...) {  // destructors do not throw; the error was the caller's to collect
      }
    }
  }
  void wait() override {
    if (done_) return;
    done_ = true;
    const std::lock_guard use(communicator_.in_use());
    communicator_.wait_done(communicator_.staging_stream(), "ialltoallv");
  }
  bool test() override {
    if (done_) return true;
    if (cudaStreamQuery(communicator_.staging_stream()) == cudaErrorNotReady) return false;
    wait();
    return true;
  }

 private:
  Communicator& communicator_;
  bool done_ = false;
};

class NcclTransport final : public Transport {
 public:
  NcclTransport(std::shared_ptr<Communicator> communicator, int rank, Topology topology)
      : communicator_(std::move(communicator)), rank_(rank), topology_(std::move(topology)) {}

  int rank() const noexcept override { return rank_; }
  int size() const noexcept override { return topology_.size(); }
  const Topology& topology() const noexcept override { return topology_; }
  TransportCapabilities capabilities() const noexcept override {
    TransportCapabilities c;
    c.host_memory = true;  // staged through device memory
    c.device_memory = true;
    c.async_progress = true;  // ialltoallv runs on its own stream
    c.stream_ordered = true;  // device exchanges; the watchdog keeps their timeout
    c.deterministic_reductions = true;
    return c;
  }
  std::string name() const override { return "nccl"; }

  void barrier() override {
    std::int32_t one = 1;
    allreduce(&one, 1, DType::kI32, ReduceOp::kSum);
  }

  void raise_stream_error() override { communicator_->raise_stream_error(); }

  std::unique_ptr<Transport> split(int color, int key) override {
    Communicator& c = *communicator_;
    const std::lock_guard use(c.in_use());
    c.enter("split");
    // Who lands where: every rank's (color, key), gathered through the parent.
    std::int64_t mine[2] = {color, key};
    std::vector<std::int64_t> all(2 * static_cast<std::size_t>(size()));
    gather_host(mine, sizeof mine, all.data(), "split");
    auto color_of = [&](int r) { return all[2 * static_cast<std::size_t>(r)]; };
    auto key_of = [&](int r) { return all[2 * static_cast<std::size_t>(r) + 1]; };
    std::vector<int> members;
    for (int r = 0; r < size(); ++r) {
      if (color >= 0 && color_of(r) == color) members.push_back(r);
    }
    std::stable_sort(members.begin(), members.end(),
                     [&](int a, int b) { return key_of(a) < key_of(b); });
    std::vector<int> world_ranks, nodes;
    int my_rank = 0;
    for (std::size_t i = 0; i < members.size(); ++i) {
      if (members[i] == rank_) my_rank = static_cast<int>(i);
      world_ranks.push_back(c.world_ranks()[static_cast<std::size_t>(members[i])]);
      nodes.push_back(topology_.node_of(members[i]));
    }
    ncclConfig_t config = nonblocking_config();
    ncclComm_t child = nullptr;
    c.check(ncclCommSplit(c.comm(), color < 0 ? NCCL_SPLIT_NOCOLOR : color, key, &child, &config),
            "split");
    c.wait_ready("split");
    if (color < 0 || child == nullptr) return nullptr;
    // The new communicator may still be connecting (non-blocking): wait for it too.
    auto communicator =
        std::make_shared<Communicator>(child, c.device(), std::move(world_ranks), c.timeout_s());
    communicator->wait_ready("split");
    return std::make_unique<NcclTransport>(std::move(communicator), my_rank,
                                           Topology(std::move(nodes)));
  }

  void abort(const std::string& reason) noexcept override { communicator_->abort(reason); }

 protected:
  void do_alltoall(const void* send, void* recv, std::size_t bytes_per_peer,
                   Stream& stream) override {
    AlltoallvBuffers b = alltoall_as_alltoallv(send, recv, bytes_per_peer, size(), scratch_);
    b.device = stream.device();
    do_alltoallv(b, stream);
  }

  void do_alltoallv(const AlltoallvBuffers& b, Stream& stream) override {
    do_alltoallv_group({&b, 1}, stream);
  }

  void do_alltoallv_group(std::span<const AlltoallvBuffers> exchanges, Stream& stream) override {
    Communicator& c = *communicator_;
    const std::lock_guard use(c.in_use());
    c.enter("alltoallv");
    if (stream.device().kind == Device::Kind::kCuda) {
      // Stream-ordered: one group of every exchange's sends and receives, queued behind the
      // work that wrote the send buffers; the watchdog keeps the timeout.
      const auto s = static_cast<cudaStream_t>(stream.native_handle());
      c.check(ncclGroupStart(), "alltoallv");
      for (const AlltoallvBuffers& b : exchanges) enqueue_pairs(b.send, b.recv, b, s, "alltoallv");
      c.check(ncclGroupEnd(), "alltoallv");
      c.wait_ready("alltoallv");
      c.watch(s, "alltoallv");
      return;
    }
    for (const AlltoallvBuffers& b : exchanges) host_alltoallv(b);
  }

  /// A host alltoallv, staged through device memory and blocking: the caller's stream has
  /// finished (host streams are host-synchronous).
  void host_alltoallv(const AlltoallvBuffers& b) {
    Communicator& c = *communicator_;
    enqueue_staged_alltoallv(b, "alltoallv");
    c.wait_done(c.staging_stream(), "alltoallv");
  }

  std::unique_ptr<TransportRequest> do_ialltoallv(const AlltoallvBuffers& b) override {
    Communicator& c = *communicator_;
    const std::lock_guard use(c.in_use());
    c.enter("ialltoallv");
    enqueue_staged_alltoallv(b, "ialltoallv");
    return std::make_unique<StagedRequest>(c);
  }

  void do_allreduce(void* data, std::size_t count, DType dtype, ReduceOp op,
                    Stream& stream) override {
    Communicator& c = *communicator_;
    const std::lock_guard use(c.in_use());
    c.enter("allreduce");
    nccl_type(dtype);  // refuses what NCCL cannot carry
    const std::size_t bytes = count * dtype_size(dtype);
    gathered_.resize(bytes * static_cast<std::size_t>(size()));
    if (stream.device().kind == Device::Kind::kCuda) {
      // Gather on the device, combine in rank order on the host, copy the result back.
      const auto s = static_cast<cudaStream_t>(stream.native_handle());
      std::byte* device = c.staging(bytes * static_cast<std::size_t>(size()));
      c.check(ncclAllGather(data, device, bytes, ncclUint8, c.comm(), s), "allreduce");
      c.wait_ready("allreduce");
      check_cuda(
          cudaMemcpyAsync(gathered_.data(), device, gathered_.size(), cudaMemcpyDeviceToHost, s),
          "allreduce: copying the contributions");
      c.wait_done(s, "allreduce");
      reduce_in_rank_order(gathered_.data(), count, dtype, op, size(), host_result(bytes));
      check_cuda(cudaMemcpyAsync(data, result_.data(), bytes, cudaMemcpyHostToDevice, s),
                 "allreduce: copying the result");
      c.wait_done(s, "allreduce");
      return;
    }
    gather_host(data, bytes, gathered_.data(), "allreduce");
    reduce_in_rank_order(gathered_.data(), count, dtype, op, size(), data);
  }

 private:
  static std::size_t extent(std::span<const std::size_t> counts,
                            std::span<const std::size_t> offsets) {
    std::size_t end = 0;
    for (std::size_t p = 0; p < counts.size(); ++p)
      if (counts[p] != 0) end = std::max(end, offsets[p] + counts[p]);
    return end;
  }

  /// Enqueues, on the staging stream, the copy of `b`'s host send buffer to the device, the
  /// exchange, and the copy of what arrived back to `b`'s host receive buffer.
  void enqueue_staged_alltoallv(const AlltoallvBuffers& b, const char* op) {
    Communicator& c = *communicator_;
    const std::size_t send_bytes = extent(b.send_counts, b.send_offsets);
    const std::size_t recv_bytes = extent(b.recv_counts, b.recv_offsets);
    std::byte* device = c.staging(send_bytes + recv_bytes);
    const cudaStream_t s = c.staging_stream();
    check_cuda(cudaMemcpyAsync(device, b.send, send_bytes, cudaMemcpyHostToDevice, s),
               std::string(op) + ": staging the send buffer");
    exchange(device, device + send_bytes, b, s, op);
    check_cuda(cudaMemcpyAsync(b.recv, device + send_bytes, recv_bytes, cudaMemcpyDeviceToHost, s),
               std::string(op) + ": copying the received data back");
  }

  /// Enqueues the grouped sends and receives of `b`'s counts between `send` and `recv`
  /// (device memory) on `s`, and waits until NCCL has taken them (not for the exchange).
  void exchange(const std::byte* send, std::byte* recv, const AlltoallvBuffers& b, cudaStream_t s,
                const char* op) {
    Communicator& c = *communicator_;
    c.check(ncclGroupStart(), op);
    enqueue_pairs(send, recv, b, s, op);
    c.check(ncclGroupEnd(), op);
    c.wait_ready(op);
  }

  /// The sends and receives of `b`'s counts, inside the caller's group.
  void enqueue_pairs(const std::byte* send, std::byte* recv, const AlltoallvBuffers& b,
                     cudaStream_t s, const char* op) {
    Communicator& c = *communicator_;
    for (int p = 0; p < size(); ++p) {
      const auto q = static_cast<std::size_t>(p);
      if (b.send_counts[q] != 0)
        c.check(ncclSend(send + b.send_offsets[q], b.send_counts[q], ncclUint8, p, c.comm(), s),
                op);
      if (b.recv_counts[q] != 0)
        c.check(ncclRecv(recv + b.recv_offsets[q], b.recv_counts[q], ncclUint8, p, c.comm(), s),
                op);
    }
  }

  /// Every rank's `bytes` of host memory at `mine`, into `all` (host, size() · bytes).
  void gather_host(const void* mine, std::size_t bytes, void* all, const char* op) {
    Communicator& c = *communicator_;
    const auto n = static_cast<std::size_t>(size());
    std::byte* device = c.staging(bytes * (n + 1));
    const cudaStream_t s = c.staging_stream();
    check_cuda(cudaMemcpyAsync(device, mine, bytes, cudaMemcpyHostToDevice, s),
               std::string(op) + ": staging");
    c.check(ncclAllGather(device, device + bytes, bytes, ncclUint8, c.comm(), s), op);
    c.wait_ready(op);
    check_cuda(cudaMemcpyAsync(all, device + bytes, bytes * n, cudaMemcpyDeviceToHost, s),
               std::string(op) + ": copying back");
    c.wait_done(s, op);
  }

  void* host_result(std::size_t bytes) {
    result_.resize(bytes);
    return result_.data();
  }

  std::shared_ptr<Communicator> communicator_;
  int rank_;
  Topology topology_;
  CollectiveScratch scratch_;                 // alltoall's counts and offsets, reused
  std::vector<std::byte> gathered_, result_;  // allreduce's, reused
};

void declare_options(ConfigSchema& /*schema*/) {}

/// Why this process cannot run NCCL, or ok.
Status probe() {
  const std::string unusable = cuda_common::cuda_unusable_reason();
  if (!unusable.empty()) return {ErrorCode::kUnavailable, unusable};
  try {
    const auto info = LaunchInfo::from_environment();
    if (info && info->world_size > 1 && !info->has_store()) {
      return {ErrorCode::kUnavailable,
              "the nccl transport exchanges its id through the bootstrap store: set MASTER_ADDR "
              "and MASTER_PORT (switchyard launch and torchrun do; with mpirun pass -x "
              "MASTER_ADDR=host -x MASTER_PORT=port)"};
    }
  } catch (...) {
    return Status::from_current_exception();
  }
  return {};
}

std::vector<std::unique_ptr<Transport>> create(const TransportCreateArgs& args) {
  probe().throw_if_error();
  const LaunchInfo info = LaunchInfo::from_environment().value_or(LaunchInfo{});
  int devices = 0;
  check_cuda(cudaGetDeviceCount(&devices), "counting devices");
  const int device = info.local_rank % devices;
  check_cuda(cudaSetDevice(device), "selecting device " + std::to_string(device));

  ncclUniqueId id{};
  std::vector<std::string> host_names(1);
  char host[256] = {};
  ::gethostname(host, sizeof host - 1);
  host_names[0] = host;
  std::shared_ptr<BootstrapStore> store;
  std::string round;  // this runtime's keys in the process's store
  if (info.world_size > 1) {
    store = BootstrapStore::shared(info, args.timeout_s);
    round = "nccl-" + std::to_string(store->next_round()) + "/";
    if (info.rank == 0) {
      const ncclResult_t r = ncclGetUniqueId(&id);
      if (r != ncclSuccess) {
        throw Error(ErrorCode::kSystem, "nccl transport: creating the unique id: " +
                                            std::string(ncclGetErrorString(r)));
      }
      store->set(round + "unique-id", std::string(reinterpret_cast<const char*>(&id), sizeof id));
    }
    const std::string bytes = store->get(round + "unique-id");
    std::memcpy(&id, bytes.data(), std::min(bytes.size(), sizeof id));
    host_names = store->allgather(round + "host-name", host);
  } else {
    const ncclResult_t r = ncclGetUniqueId(&id);
    if (r != ncclSuccess) {
      throw Error(ErrorCode::kSystem,
                  "nccl transport: creating the unique id: " + std::string(ncclGetErrorString(r)));
    }
  }
  std::vector<int> world_ranks(static_cast<std::size_t>(info.world_size));
  std::iota(world_ranks.begin(), world_ranks.end(), 0);
  ncclConfig_t config = nonblocking_config();
  ncclComm_t comm = nullptr;
  const ncclResult_t r = ncclCommInitRankConfig(&comm, info.world_size, id, info.rank, &config);
  if (r != ncclSuccess && r != ncclInProgress) {
    throw Error(ErrorCode::kSystem,
                "nccl init on " + describe_ranks(world_ranks) + ": " + nccl_text(r, comm));
  }
  auto communicator =
      std::make_shared<Communicator>(comm, device, std::move(world_ranks), args.timeout_s);
  communicator->wait_ready("init");
  if (store) store->barrier(round + "connected");
  Topology topology = args.ranks_per_node > 0
                          ? Topology::uniform(info.world_size, args.ranks_per_node)
                          : Topology::from_host_names(host_names);
  std::vector<std::unique_ptr<Transport>> ranks;
  ranks.push_back(
      std::make_unique<NcclTransport>(std::move(communicator), info.rank, std::move(topology)));
  return ranks;
}

}  // namespace
}  // namespace switchyard::nccl

SWITCHYARD_TRANSPORT_PLUGIN("nccl", "0.1.0",
                            "one process per GPU, NCCL communicators (device memory; host memory "
                            "staged)",
                            ::switchyard::nccl::declare_options, ::switchyard::nccl::probe,
                            ::switchyard::nccl::create)
