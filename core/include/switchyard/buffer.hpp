#pragma once
/// \file
/// Memory the layer reuses from step to step: allocators (host here; pinned host and CUDA
/// device come from the CUDA plugin) and typed buffers that only ever grow.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <span>
#include <string>
#include <utility>

#include "switchyard/status.hpp"
#include "switchyard/tensor.hpp"

namespace switchyard {

/// A source of memory on one device. Implementations are thread-safe.
class Allocator {
 public:
  virtual ~Allocator() = default;
  /// Where the memory lives (host for pageable and pinned host memory).
  virtual Device device() const noexcept = 0;
  /// Whether the host may read and write the memory directly.
  virtual bool host_accessible() const noexcept = 0;
  /// `bytes` bytes aligned to 64; throws `Error(kSystem)` when out of memory.
  virtual void* allocate(std::size_t bytes) = 0;
  /// Returns memory from `allocate(bytes)`. Never throws.
  virtual void deallocate(void* data, std::size_t bytes) noexcept = 0;
  /// "host", "cuda_pinned", "cuda:0", for messages.
  virtual std::string name() const = 0;
};

/// The process's host allocator (aligned operator new). Lives for the whole process.
Allocator& host_allocator() noexcept;

/// Buffers grown so far in this process, all threads (each growth is one allocation);
/// benchmarks read it before and after steps that must allocate nothing.
std::uint64_t buffer_allocations() noexcept;

namespace detail {
void count_buffer_allocation() noexcept;
}  // namespace detail

/// A typed array from an `Allocator`. `resize` grows the capacity when needed and never
/// shrinks it, so a buffer sized once for the largest step is reused without allocating.
/// Growing keeps the contents only for host-accessible memory. Element access through
/// `operator[]`, `begin`/`end` and `assign` is for host-accessible buffers only. Copying
/// copies the elements (host-accessible buffers only); moving moves the memory.
template <typename T>
class Buffer {
 public:
  explicit Buffer(Allocator& allocator = host_allocator()) noexcept : allocator_(&allocator) {}
  Buffer(std::initializer_list<T> values) : Buffer() {
    resize(values.size());
    std::copy(values.begin(), values.end(), data_);
  }
  ~Buffer() { release(); }
  Buffer(const Buffer& other) : allocator_(other.allocator_) { *this = other; }
  Buffer& operator=(const Buffer& other) {
    if (this == &other) return *this;
    other.require_host("copy");
    resize(other.size_);
    if (size_ != 0) std::memcpy(data_, other.data_, size_ * sizeof(T));
    return *this;
  }
  Buffer(Buffer&& other) noexcept { swap(other); }
  Buffer& operator=(Buffer&& other) noexcept {
    swap(other);
    return *this;
  }

  /// Sets the size to `n` elements; allocates only when `n` exceeds the capacity.
  void resize(std::size_t n) {
    if (n > capacity_) {
      T* grown = static_cast<T*>(allocator_->allocate(n * sizeof(T)));
      detail::count_buffer_allocation();
      if (size_ != 0 && allocator_->host_accessible()) {
        std::memcpy(grown, data_, size_ * sizeof(T));
      }
      release();
      data_ = grown;
      capacity_ = n;
    }
    size_ = n;
  }
  /// Sets the size to `n` and every element to `value` (host-accessible buffers).
  void assign(std::size_t n, const T& value) {
    require_host("assign");
    resize(n);
    std::fill(data_, data_ + n, value);
  }

  T* data() noexcept { return data_; }
  const T* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }
  bool empty() const noexcept { return size_ == 0; }
  std::size_t capacity() const noexcept { return capacity_; }
  /// Bytes held: the capacity in bytes.
  std::size_t capacity_bytes() const noexcept { return capacity_ * sizeof(T); }
  Device device() const noexcept { return allocator_->device(); }
  Allocator& allocator() const noexcept { return *allocator_; }
  T& operator[](std::size_t i) noexcept { return data_[i]; }
  const T& operator[](std::size_t i) const noexcept { return data_[i]; }
  T* begin() noexcept { return data_; }
  T* end() noexcept { return data_ + size_; }
  const T* begin() const noexcept { return data_; }
  const T* end() const noexcept { return data_ + size_; }
  /// The elements as a host span (host-accessible buffers; throws otherwise).
  std::span<const T> host_span() const {
    require_host("host_span");
    return {data_, size_};
  }

 private:
  void require_host(const char* what) const {
    if (!allocator_->host_accessible()) {
      throw Error(ErrorCode::kInvalidArgument, std::string("Buffer::") + what + ": memory of " +
                                                   allocator_->name() +
                                                   " is not accessible from the host");
    }
  }
  void release() noexcept {
    if (data_ != nullptr) allocator_->deallocate(data_, capacity_ * sizeof(T));
    data_ = nullptr;
    capacity_ = 0;
    size_ = 0;
  }
  void swap(Buffer& other) noexcept {
    std::swap(allocator_, other.allocator_);
    std::swap(data_, other.data_);
    std::swap(size_, other.size_);
    std::swap(capacity_, other.capacity_);
  }

  Allocator* allocator_ = &host_allocator();
  T* data_ = nullptr;
  std::size_t size_ = 0;
  std::size_t capacity_ = 0;
};

}  // namespace switchyard
