#pragma once
/// \file
/// The router's GEMMs on the host: logits = x · gateᵀ with a fixed summation order, and
/// their backward.

#include "switchyard/tensor.hpp"

namespace switchyard {

/// Router logits [T,E] = x [T,H] · gateᵀ [H,E], float32 host, with a fixed summation order
/// so that a token's logits do not depend on which rank or how many tokens compute them.
/// The host data path's `router_logits`.
/// The order: per (t, e), 16 lanes (lane l takes the h with h mod 16 == l, ascending, each
/// by a fused multiply-add, the row padded with zeros to a multiple of 16), then the lanes
/// summed pairwise (l + 8, + 4, + 2, + 1). The same bits on every processor; the kernel is
/// chosen once (AVX-512, AVX2 with FMA, or portable). Runs on the calling thread.
void compute_router_logits(const TensorView& x, const TensorView& gate, float* logits);

/// The router's GEMMs backward, f32 host contiguous: dx [T,H] += d_logits [T,E] · gate
/// [E,H] and d_gate [E,H] += d_logitsᵀ · x [T,H]. Each element is one chain of
/// multiply-adds in a fixed order (dx over e ascending, d_gate over t ascending), so its
/// bits depend on the inputs only (on one machine). Runs on the calling thread.
void accumulate_router_gradients(const TensorView& x, const TensorView& gate, const float* d_logits,
                                 const TensorView& dx, const TensorView& d_gate);

namespace detail {
/// The instruction sets `compute_router_logits` chooses from.
enum class RouterLogitsIsa { kPortable, kAvx2, kAvx512 };
/// `compute_router_logits` with the kernel for `isa` (tests and benchmarks compare them);
/// throws `Error(kUnavailable)` when this processor lacks it.
void compute_router_logits_with(const TensorView& x, const TensorView& gate, float* logits,
                                RouterLogitsIsa isa);
}  // namespace detail

}  // namespace switchyard
