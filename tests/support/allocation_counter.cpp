#include "allocation_counter.hpp"

#include <dlfcn.h>
#include <execinfo.h>

#include <atomic>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>

// glibc's own allocator entry points, which the replacements below forward to.
extern "C" {
void* __libc_malloc(std::size_t size);
void* __libc_calloc(std::size_t count, std::size_t size);
void* __libc_realloc(void* p, std::size_t size);
void* __libc_memalign(std::size_t alignment, std::size_t size);
void __libc_free(void* p);
}

namespace {

std::atomic<bool> counting{false};
std::atomic<long> ours{0};
std::atomic<long> vendor{0};
thread_local bool inside = false;  // this thread is already classifying an allocation
// Where the first allocation counted as ours came from (frames as "object:symbol").
char first_ours[2048];
std::atomic<bool> first_recorded{false};

bool is_vendor_library(const char* path) {
  static const char* const kVendors[] = {"libmpi",      "libopen-pal", "libopen-rte", "mca_",
                                         "libucp",      "libucs",      "libuct",      "libucm",
                                         "libopenblas", "libpmix",     "libhwloc",    "libevent"};
  for (const char* v : kVendors) {
    if (std::strstr(path, v) != nullptr) return true;
  }
  return false;
}

/// Records one allocation if counting, attributed through the caller's stack.
void record() noexcept {
  if (!counting.load(std::memory_order_relaxed) || inside) return;
  inside = true;
  void* frames[24];
  const int n = backtrace(frames, 24);
  bool from_vendor = false;
  for (int i = 1; i < n && !from_vendor; ++i) {
    Dl_info info;
    if (dladdr(frames[i], &info) != 0 && info.dli_fname != nullptr) {
      from_vendor = is_vendor_library(info.dli_fname);
    }
  }
  (from_vendor ? vendor : ours).fetch_add(1, std::memory_order_relaxed);
  if (!from_vendor && !first_recorded.exchange(true)) {
    std::size_t used = 0;
    for (int i = 1; i < n && used + 200 < sizeof first_ours; ++i) {
      Dl_info info;
      if (dladdr(frames[i], &info) == 0) continue;
      const char* object = info.dli_fname ? std::strrchr(info.dli_fname, '/') : nullptr;
      const int written =
          std::snprintf(first_ours + used, sizeof first_ours - used, "%s:%s\n",
                        object ? object + 1 : "?", info.dli_sname ? info.dli_sname : "?");
      if (written > 0) used += static_cast<std::size_t>(written);
    }
  }
  inside = false;
}

#if defined(SWITCHYARD_COUNT_OPERATOR_NEW_ONLY)
// Sanitizer builds: AddressSanitizer owns malloc and friends, so only operator new is
// replaced, and it allocates through the sanitizer.
void* allocate(std::size_t size) noexcept {
  record();
  return std::malloc(size == 0 ? 1 : size);
}
void* allocate_aligned(std::size_t size, std::size_t alignment) noexcept {
  record();
  return std::aligned_alloc(alignment, (size + alignment - 1) / alignment * alignment);
}
void release(void* p) noexcept { std::free(p); }
#else
void* allocate(std::size_t size) noexcept {
  record();
  return __libc_malloc(size == 0 ? 1 : size);
}
void* allocate_aligned(std::size_t size, std::size_t alignment) noexcept {
  record();
  return __libc_memalign(alignment, size == 0 ? 1 : size);
}
void release(void* p) noexcept { __libc_free(p); }
#endif

}  // namespace

namespace switchyard::test {
void start_counting_allocations() noexcept {
  // backtrace() loads its unwinder on first use; do that before counting.
  void* frame[1];
  backtrace(frame, 1);
  ours = 0;
  vendor = 0;
  first_ours[0] = '\0';
  first_recorded = false;
  counting = true;
}
AllocationCounts stop_counting_allocations() noexcept {
  counting = false;
  return {ours.load(), vendor.load()};
}
const char* first_counted_allocation() noexcept { return first_ours; }
}  // namespace switchyard::test

#if !defined(SWITCHYARD_COUNT_OPERATOR_NEW_ONLY)
extern "C" {
void* malloc(std::size_t size) {
  record();
  return __libc_malloc(size);
}
void* calloc(std::size_t count, std::size_t size) {
  record();
  return __libc_calloc(count, size);
}
void* realloc(void* p, std::size_t size) {
  record();
  return __libc_realloc(p, size);
}
void free(void* p) { __libc_free(p); }
int posix_memalign(void** out, std::size_t alignment, std::size_t size) {
  record();
  void* p = __libc_memalign(alignment, size);
  if (p == nullptr) return ENOMEM;
  *out = p;
  return 0;
}
void* aligned_alloc(std::size_t alignment, std::size_t size) {
  record();
  return __libc_memalign(alignment, size);
}
void* memalign(std::size_t alignment, std::size_t size) {
  record();
  return __libc_memalign(alignment, size);
}
}
#endif

// GCC cannot see that these replace the global operators as a set.
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"

void* operator new(std::size_t size) {
  if (void* p = allocate(size)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t size) { return operator new(size); }
void* operator new(std::size_t size, const std::nothrow_t&) noexcept { return allocate(size); }
void* operator new[](std::size_t size, const std::nothrow_t&) noexcept { return allocate(size); }
void* operator new(std::size_t size, std::align_val_t a) {
  if (void* p = allocate_aligned(size, static_cast<std::size_t>(a))) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t size, std::align_val_t a) { return operator new(size, a); }
void operator delete(void* p) noexcept { release(p); }
void operator delete[](void* p) noexcept { release(p); }
void operator delete(void* p, std::size_t) noexcept { release(p); }
void operator delete[](void* p, std::size_t) noexcept { release(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { release(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { release(p); }
void operator delete(void* p, std::align_val_t) noexcept { release(p); }
void operator delete[](void* p, std::align_val_t) noexcept { release(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { release(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { release(p); }
