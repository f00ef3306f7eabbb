#include "switchyard/memory_budget.hpp"

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <limits>

#include "switchyard/status.hpp"

namespace switchyard {
namespace {

/// A number from a one-line cgroup file, or the maximum for "max" and missing files.
std::uint64_t cgroup_value(const char* path) {
  std::ifstream in(path);
  std::string text;
  if (!(in >> text) || text == "max") return std::numeric_limits<std::uint64_t>::max();
  try {
    return std::stoull(text);
  } catch (...) {
    return std::numeric_limits<std::uint64_t>::max();
  }
}

}  // namespace

std::uint64_t memory_limit_bytes() {
  std::uint64_t limit = std::numeric_limits<std::uint64_t>::max();
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGESIZE);
  if (pages > 0 && page > 0)
    limit = static_cast<std::uint64_t>(pages) * static_cast<std::uint64_t>(page);
  for (int resource : {RLIMIT_AS, RLIMIT_DATA}) {
    rlimit r{};
    if (::getrlimit(resource, &r) == 0 && r.rlim_cur != RLIM_INFINITY)
      limit = std::min<std::uint64_t>(limit, r.rlim_cur);
  }
  limit = std::min(limit, cgroup_value("/sys/fs/cgroup/memory.max"));
  limit = std::min(limit, cgroup_value("/sys/fs/cgroup/memory/memory.limit_in_bytes"));
  return std::max<std::uint64_t>(limit, 1);
}

std::string format_bytes(long double bytes) {
  static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  int unit = 0;
  while (bytes >= 1024 && unit < 6) {
    bytes /= 1024;
    ++unit;
  }
  char text[64];
  if (unit == 0 || bytes >= 100)
    std::snprintf(text, sizeof text, "%.0Lf %s", bytes, kUnits[unit]);
  else
    std::snprintf(text, sizeof text, "%.3Lg %s", bytes, kUnits[unit]);
  return text;
}

void check_fits_in_memory(long double bytes, const std::string& what, const std::string& how) {
  const std::uint64_t limit = memory_limit_bytes();
  if (bytes <= static_cast<long double>(limit)) return;
  throw Error(ErrorCode::kInvalidArgument,
              what + ": needs " + format_bytes(bytes) + " (" + how + "), more than the " +
                  format_bytes(static_cast<long double>(limit)) +
                  " this process may use (physical memory, ulimit and cgroup limits)");
}

}  // namespace switchyard
