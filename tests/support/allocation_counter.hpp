#pragma once
// Counts the allocations of the whole process while counting is on: `operator new` (every
// form) and malloc, calloc, realloc, posix_memalign, aligned_alloc and memalign, on every
// thread, inside plugins too. Linking allocation_counter.cpp into an executable replaces
// those functions (forwarding to glibc's own). Allocations whose call stack passes through
// a vendor library (Open MPI and its components, UCX, OpenBLAS, PMIx, hwloc, libevent) are
// counted apart: those libraries allocate inside their own calls.

namespace switchyard::test {

struct AllocationCounts {
  long ours = 0;    ///< made by Switchyard's code (core, plugins, the program)
  long vendor = 0;  ///< made inside a vendor library's call, excluded from `ours`
};

/// Starts counting from zero, on every thread.
void start_counting_allocations() noexcept;
/// Stops counting; returns what every thread allocated since the start.
AllocationCounts stop_counting_allocations() noexcept;
/// The call stack ("library:symbol" per line, mangled) of the first allocation counted as
/// Switchyard's since the last start; empty if none.
const char* first_counted_allocation() noexcept;

}  // namespace switchyard::test
