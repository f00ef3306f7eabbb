#pragma once
// Token-choice routing on the device (data_path.hpp's route_token_choice): one warp per
// token computes exactly what the host policy computes (core/src/token_choice_router.cpp
// and routing_rows.cpp), bit for bit. It uses the same exponential polynomial, the same 16
// lanes added pairwise, and every add and multiply rounded separately (no FMA contraction),
// so the same experts are chosen with the same weights. Only the float64 statistics sums
// are added atomically, in no fixed order.
#include <cuda_runtime.h>

#include <cstdint>

namespace switchyard::cuda_path {

/// What the routing kernel reads and writes (device pointers unless noted).
struct DeviceRouteParams {
  const float* logits = nullptr;  ///< [T,E]
  std::int64_t tokens = 0;
  int experts = 0;  ///< E <= 1024
  int top_k = 1;    ///< k <= 32
  bool sigmoid = false, pre_softmax = true, normalize = false;
  float scale = 1.0f;
  const float* bias = nullptr;       ///< [E] or null
  const int* group_begin = nullptr;  ///< [G+1] or null
  int groups = 0, max_groups = 0, group_take = 1;
  std::int32_t* plan_experts = nullptr;      ///< [T,k]
  float* plan_weights = nullptr;             ///< [T,k]
  unsigned long long* counts = nullptr;      ///< [E]
  unsigned long long* aux_counts = nullptr;  ///< [E]
  double* probability_sums = nullptr;        ///< [E]
  double* z_loss_sum = nullptr;              ///< [1]
  unsigned long long* first_bad = nullptr;   ///< [1] first non-finite logit's index, or ~0
};

/// Warps per block of the routing kernel, and its dynamic shared memory per block.
inline constexpr int kRouteWarps = 4;
inline std::size_t route_shared_bytes(int experts) {
  return static_cast<std::size_t>(kRouteWarps) * 3 * static_cast<std::size_t>(experts) *
         sizeof(float);
}

/// Routes every token; launch with blocks of 32·kRouteWarps threads, one warp per token.
__global__ void route_token_choice_kernel(DeviceRouteParams p);

}  // namespace switchyard::cuda_path
