#include "switchyard/buffer.hpp"

#include <atomic>
#include <new>

namespace switchyard {
namespace {

constexpr std::align_val_t kAlignment{64};

class HostAllocator final : public Allocator {
 public:
  Device device() const noexcept override { return Device::host(); }
  bool host_accessible() const noexcept override { return true; }
  void* allocate(std::size_t bytes) override {
    try {
      return ::operator new(bytes == 0 ? 1 : bytes, kAlignment);
    } catch (const std::bad_alloc&) {
      throw Error(ErrorCode::kSystem,
                  "host allocator: out of memory allocating " + std::to_string(bytes) + " bytes");
    }
  }
  void deallocate(void* data, std::size_t /*bytes*/) noexcept override {
    ::operator delete(data, kAlignment);
  }
  std::string name() const override { return "host"; }
};

}  // namespace

namespace {
std::atomic<std::uint64_t> grown_buffers{0};
}  // namespace

std::uint64_t buffer_allocations() noexcept { return grown_buffers.load(); }

void detail::count_buffer_allocation() noexcept {
  grown_buffers.fetch_add(1, std::memory_order_relaxed);
}

Allocator& host_allocator() noexcept {
  static HostAllocator allocator;
  return allocator;
}

}  // namespace switchyard
