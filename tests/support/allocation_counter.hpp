#pragma once
// Counts, per thread, the allocations made through the global operator new. Linking
// allocation_counter.cpp into an executable replaces the global operators.

namespace switchyard::test {

/// Starts counting this thread's allocations from zero.
void start_counting_allocations() noexcept;
/// Stops counting; returns how many allocations this thread made since the start.
long stop_counting_allocations() noexcept;

}  // namespace switchyard::test
