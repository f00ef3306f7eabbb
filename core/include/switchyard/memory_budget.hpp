#pragma once
/// \file
/// How much memory this process may use, and the check a configuration's estimate must
/// pass before anything is allocated: a layer that cannot fit is refused with the keys
/// and the bytes, instead of allocating until the machine runs out.

#include <cstdint>
#include <string>

namespace switchyard {

/// The least of: physical memory, RLIMIT_AS, RLIMIT_DATA and the cgroup's memory.max
/// (v2) or memory.limit_in_bytes (v1), whichever exist. Never 0.
std::uint64_t memory_limit_bytes();

/// Sizes as "768 GiB", "1.5 MiB", "512 B".
std::string format_bytes(long double bytes);

/// Throws `Error(kInvalidArgument)` "`what`: needs `format_bytes(bytes)` (`how`), more than
/// the `limit` this process may use" when `bytes` > `memory_limit_bytes()`. `bytes` is a
/// long double so that products of configured sizes cannot overflow before the check.
void check_fits_in_memory(long double bytes, const std::string& what, const std::string& how);

}  // namespace switchyard
