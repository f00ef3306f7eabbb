#pragma once
// The data-path conformance suite: every primitive of `DataPath` on hand-worked cases whose
// expected bytes are written out in the suite (router logits, layout counts and layout,
// pack of f32, bf16 and fp8 rows with their padding, pack_runs, count_groups and
// group_by_expert into f32 and bf16 expert rows, weighted_reduce from f32 and bf16 expert
// rows into f32 and bf16 partials, unpermute_sum, the backward's scaled rows and slot dot
// products (or kUnavailable, for a data path without them), copy, and the refusal of
// expert rows in another dtype). The buffers live in the data path's own memory (its allocator) and
// reach the host through its `copy`, so the same cases run on the host data path and, in tests/gpu,
// on the CUDA one.
#include "switchyard/data_path.hpp"
#include "switchyard/stream.hpp"

namespace switchyard::conformance {

/// Runs every case on `path`, on `stream` (one of the path's, doctest CHECKs, one SUBCASE
/// per primitive).
void run_data_path_suite(DataPath& path, Stream& stream);

}  // namespace switchyard::conformance
