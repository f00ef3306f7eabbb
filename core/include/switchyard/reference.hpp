#pragma once
/// \file
/// The dense single-process reference an EP result is checked against.

#include "switchyard/model.hpp"
#include "switchyard/router.hpp"
#include "switchyard/tensor.hpp"

namespace switchyard {

/// y[t] = Σ_j weights[t,j] · expert_{experts[t,j]}(x[t]) over the slots of `plan`
/// (expert -1 contributes nothing), plus the layer's shared expert (times sigmoid(x·gate)
/// when it has a gate) when it has one, evaluating each SwiGLU expert with plain loops in
/// double precision. x, y: f32 [T,H] host contiguous. Independent of any kernel plugin.
void dense_moe_reference(const ModelWeights& model, const RoutingPlan& plan, const TensorView& x,
                         const TensorView& y);

}  // namespace switchyard
