#include "switchyard/stream.hpp"

#include "switchyard/status.hpp"

namespace switchyard {

std::string device_name(Device device) {
  return device.kind == Device::Kind::kHost ? std::string("host")
                                            : "cuda:" + std::to_string(device.ordinal);
}

void require_accepted_memory(const ExecutionCapabilities& caps, Device device,
                             const std::string& plugin, const char* buffer) {
  const bool accepted = device.kind == Device::Kind::kHost ? caps.host_memory : caps.device_memory;
  if (accepted) return;
  throw Error(ErrorCode::kInvalidArgument, plugin + ": " + buffer + " is in " +
                                               device_name(device) + " memory, which " + plugin +
                                               " does not accept");
}

HostStream::HostStream(Mode mode) : mode_(mode) {}

HostStream::~HostStream() {
  {
    std::unique_lock<std::mutex> lock(mutex_);
    changed_.wait(lock, [&] { return count_ == 0; });
    stopping_ = true;
  }
  changed_.notify_all();
  if (worker_.joinable()) worker_.join();
}

void HostStream::enqueue(TaskFn fn, void* argument) {
  if (mode_ == Mode::kInline) {
    fn(argument);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (count_ == queue_.size()) {
      // Grow the ring, keeping the order of what is queued.
      std::vector<Task> grown(queue_.empty() ? 8 : 2 * queue_.size());
      for (std::size_t i = 0; i < count_; ++i) grown[i] = queue_[(head_ + i) % queue_.size()];
      queue_ = std::move(grown);
      head_ = 0;
    }
    queue_[(head_ + count_) % queue_.size()] = {fn, argument};
    ++count_;
    ++enqueued_;
    if (!worker_.joinable()) worker_ = std::thread([this] { progress_loop(); });
  }
  changed_.notify_all();
}

void HostStream::progress_loop() {
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    changed_.wait(lock, [&] { return count_ > 0 || stopping_; });
    if (count_ == 0) return;
    const Task task = queue_[head_];
    const bool skip = error_ != nullptr;
    lock.unlock();
    std::exception_ptr failure;
    if (!skip) {
      try {
        task.fn(task.argument);
      } catch (...) {
        failure = std::current_exception();
      }
    }
    lock.lock();
    if (failure && !error_) error_ = failure;
    head_ = (head_ + 1) % queue_.size();
    --count_;
    ++completed_;
    changed_.notify_all();
  }
}

void HostStream::synchronize() {
  std::exception_ptr error;
  {
    std::unique_lock<std::mutex> lock(mutex_);
    changed_.wait(lock, [&] { return count_ == 0; });
    std::swap(error, error_);
  }
  if (error) std::rethrow_exception(error);
}

/// A ticket: the number of tasks enqueued when it was recorded.
class HostStream::Event final : public StreamEvent {
 public:
  explicit Event(HostStream& stream) : stream_(stream) {}
  bool query() noexcept override {
    std::lock_guard<std::mutex> lock(stream_.mutex_);
    return stream_.completed_ >= ticket_;
  }
  void synchronize() override { stream_.wait_for(ticket_); }

  HostStream& stream_;
  std::uint64_t ticket_ = 0;
};

std::unique_ptr<StreamEvent> HostStream::create_event() { return std::make_unique<Event>(*this); }

void HostStream::record(StreamEvent& event) {
  auto* mine = dynamic_cast<Event*>(&event);
  if (mine == nullptr || &mine->stream_ != this) {
    throw Error(ErrorCode::kInvalidArgument,
                "HostStream::record: the event belongs to another stream");
  }
  std::lock_guard<std::mutex> lock(mutex_);
  mine->ticket_ = enqueued_;  // inline work has always completed: both counters stay 0
}

void HostStream::wait_for(std::uint64_t ticket) {
  std::unique_lock<std::mutex> lock(mutex_);
  changed_.wait(lock, [&] { return completed_ >= ticket; });
}

bool HostStream::idle() noexcept {
  std::lock_guard<std::mutex> lock(mutex_);
  return count_ == 0;
}

}  // namespace switchyard
