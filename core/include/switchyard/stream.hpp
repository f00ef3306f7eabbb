#pragma once
/// \file
/// Streams: ordered queues of work on one device, crossing the plugin interfaces as opaque
/// handles. No CUDA type appears here; a CUDA stream is a `Stream` whose `native_handle()`
/// is its `cudaStream_t`.
///
/// Ordering contract, for every interface that takes a `Stream&`:
/// - The operation reads and writes its buffers in stream order: after all work enqueued
///   earlier on the stream, before all work enqueued later.
/// - A *stream-ordered* plugin (capability `stream_ordered`) may return before the work is
///   done; the host must not touch the operation's buffers until `synchronize()` returns
///   (or `idle()` is true). A *host-synchronous* plugin finishes the work before it returns;
///   the core synchronizes the stream before it calls one, so such a plugin never sees
///   unfinished work.
/// - Errors of enqueued work are reported by the next `synchronize()` of that stream.

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "switchyard/tensor.hpp"

namespace switchyard {

class HostStream;

/// A point in a stream's work, for observing completion without waiting for everything
/// enqueued later: `Stream::record` places it after the work enqueued so far. Created by
/// `Stream::create_event` (once; reuse it). Not thread-safe.
class StreamEvent {
 public:
  virtual ~StreamEvent() = default;
  /// True once the work before the last `record` has completed (true before any record).
  /// Never blocks, never throws.
  virtual bool query() noexcept = 0;
  /// Blocks until the work before the last `record` has completed. Errors of that work are
  /// reported by the stream's `synchronize()`, not here.
  virtual void synchronize() = 0;
};

/// What a router or expert kernel accepts and how it runs; the core checks these before it
/// calls, never the plugin's name.
struct ExecutionCapabilities {
  bool host_memory = true;      ///< takes buffers in host memory
  bool device_memory = false;   ///< takes buffers in CUDA device memory
  bool stream_ordered = false;  ///< enqueues on the stream and returns before the work is done
};

/// Throws `Error(kInvalidArgument)` naming `plugin` and `buffer` unless `caps` accepts
/// memory on `device`.
void require_accepted_memory(const ExecutionCapabilities& caps, Device device,
                             const std::string& plugin, const char* buffer);
/// "host" or "cuda:N".
std::string device_name(Device device);

/// An ordered queue of work on one device. Owned by whoever created it; plugins borrow it
/// for the duration of a call. Not thread-safe: one thread enqueues on a stream at a time.
class Stream {
 public:
  virtual ~Stream() = default;
  /// The device whose memory the work on this stream reads and writes.
  virtual Device device() const noexcept = 0;
  /// The vendor handle (`cudaStream_t` for CUDA), or null for host streams.
  virtual void* native_handle() const noexcept = 0;
  /// Blocks until all work enqueued so far has completed, then throws the first error that
  /// work raised (once; the stream is usable afterwards).
  virtual void synchronize() = 0;
  /// True when all work enqueued so far has completed. Never blocks, never throws.
  virtual bool idle() noexcept = 0;
  /// This stream as a host work queue, or null when it is not one (a CUDA stream).
  virtual HostStream* as_host() noexcept { return nullptr; }
  /// A new event of this stream (allocates: create once and reuse).
  virtual std::unique_ptr<StreamEvent> create_event() = 0;
  /// Places `event` (created by this stream) after all work enqueued so far. Never blocks.
  virtual void record(StreamEvent& event) = 0;
  /// Orders the work enqueued on this stream from now on after the work before `event`'s
  /// last `record` (an event of any stream of the same device). A device stream queues the
  /// wait and returns at once (CUDA: `cudaStreamWaitEvent`); this default waits for the
  /// event on the host.
  virtual void wait(StreamEvent& event) { event.synchronize(); }
};

/// A stream of host work. Inline streams run each task at once on the caller (the
/// synchronous host stream); queued streams hand tasks to their own progress thread, which
/// runs them in order, so that `enqueue` returns before the work is done. Enqueueing never
/// allocates once the queue has grown to the number of tasks in flight.
class HostStream final : public Stream {
 public:
  enum class Mode { kInline, kQueued };
  /// A task: a plain function and its argument. The argument must stay valid until the
  /// task has run.
  using TaskFn = void (*)(void* argument);

  explicit HostStream(Mode mode = Mode::kInline);
  /// Waits for queued work (its errors are dropped) and stops the progress thread.
  ~HostStream() override;
  HostStream(const HostStream&) = delete;
  HostStream& operator=(const HostStream&) = delete;

  Device device() const noexcept override { return Device::host(); }
  void* native_handle() const noexcept override { return nullptr; }
  void synchronize() override;
  bool idle() noexcept override;
  HostStream* as_host() noexcept override { return this; }
  std::unique_ptr<StreamEvent> create_event() override;
  void record(StreamEvent& event) override;

  Mode mode() const noexcept { return mode_; }
  /// Runs `fn(argument)` after all earlier work: at once on an inline stream (an error is
  /// thrown to the caller), later on the progress thread of a queued one (an error is kept
  /// for `synchronize()`, and tasks enqueued after a failed one are skipped until then).
  void enqueue(TaskFn fn, void* argument);

 private:
  struct Task {
    TaskFn fn;
    void* argument;
  };
  void progress_loop();
  class Event;
  /// Blocks until `completed_` reaches `ticket`.
  void wait_for(std::uint64_t ticket);

  const Mode mode_;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<Task> queue_;      // ring buffer; grows when full
  std::size_t head_ = 0;         // next task to run
  std::size_t count_ = 0;        // tasks queued, not yet finished
  std::uint64_t enqueued_ = 0;   // tasks ever enqueued
  std::uint64_t completed_ = 0;  // tasks ever finished (run or skipped)
  bool stopping_ = false;
  std::exception_ptr error_;
  std::thread worker_;  // started by the first enqueue of a queued stream
};

}  // namespace switchyard
