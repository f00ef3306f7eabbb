// The routing kernel of device_routing.cuh. Each step names the host function whose
// arithmetic it repeats; the order of every sum is the host's.
#include <cstdint>

#include "device_routing.cuh"

namespace switchyard::cuda_path {
namespace {

constexpr int kWarp = 32;
constexpr int kLanes = 16;  // routing_rows.cpp's kLanes
constexpr unsigned kAll = 0xffffffffu;

__device__ float negative_infinity() { return __int_as_float(static_cast<int>(0xff800000u)); }
__device__ float positive_infinity() { return __int_as_float(0x7f800000); }

/// routing_rows.hpp's vector_exp, operation by operation, each rounded on its own.
__device__ float exp_poly(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;
  constexpr float kMax = 88.7228394f, kMin = -87.3365479f;
  float c = x < kMax ? x : kMax;
  c = c > kMin ? c : kMin;
  const float n = __fsub_rn(__fadd_rn(__fmul_rn(c, kLog2e), kRound), kRound);
  const float r = __fsub_rn(__fsub_rn(c, __fmul_rn(n, kLn2Hi)), __fmul_rn(n, kLn2Lo));
  float q = 1.9875691500e-4f;
  q = __fadd_rn(__fmul_rn(q, r), 1.3981999507e-3f);
  q = __fadd_rn(__fmul_rn(q, r), 8.3334519073e-3f);
  q = __fadd_rn(__fmul_rn(q, r), 4.1665795894e-2f);
  q = __fadd_rn(__fmul_rn(q, r), 1.6666665459e-1f);
  q = __fadd_rn(__fmul_rn(q, r), 5.0000001201e-1f);
  q = __fadd_rn(__fadd_rn(__fmul_rn(__fmul_rn(q, r), r), r), 1.0f);
  const int whole = static_cast<int>(n);
  const int half = whole >> 1;
  const float scale_a = __int_as_float((half + 127) << 23);
  const float scale_b = __int_as_float((whole - half + 127) << 23);
  float result = __fmul_rn(__fmul_rn(q, scale_a), scale_b);
  result = x < kMin ? 0.0f : result;
  result = x >= kMax ? positive_infinity() : result;
  return x == x ? result : x;
}

/// The float64 sum of a[0..n) in routing_rows.cpp's order: 16 lanes over the full blocks of
/// 16, the tail into lane 0, then the lanes added pairwise. Every lane of the warp calls it;
/// all get the sum.
__device__ double lane_sum_double(const float* a, int n, int lane) {
  const int full = n - n % kLanes;
  double acc = 0.0;
  if (lane < kLanes) {
    for (int e = lane; e < full; e += kLanes) acc = __dadd_rn(acc, static_cast<double>(a[e]));
    if (lane == 0) {
      for (int e = full; e < n; ++e) acc = __dadd_rn(acc, static_cast<double>(a[e]));
    }
  }
  for (int width = kLanes / 2; width >= 1; width /= 2) {
    const double other = __shfl_down_sync(kAll, acc, width);
    if (lane < width) acc = __dadd_rn(acc, other);
  }
  return __shfl_sync(kAll, acc, 0);
}

/// The same for float lanes (sigmoid_row's sum).
__device__ float lane_sum_float(const float* a, int n, int lane) {
  const int full = n - n % kLanes;
  float acc = 0.0f;
  if (lane < kLanes) {
    for (int e = lane; e < full; e += kLanes) acc = __fadd_rn(acc, a[e]);
    if (lane == 0) {
      for (int e = full; e < n; ++e) acc = __fadd_rn(acc, a[e]);
    }
  }
  for (int width = kLanes / 2; width >= 1; width /= 2) {
    const float other = __shfl_down_sync(kAll, acc, width);
    if (lane < width) acc = __fadd_rn(acc, other);
  }
  return __shfl_sync(kAll, acc, 0);
}

/// True when (a, ia) comes before (b, ib): larger value, then lower index.
__device__ bool before(float a, int ia, float b, int ib) { return a > b || (a == b && ia < ib); }

/// select_top_k: the k largest of v[0..n) (ties: lower index; -inf never), into chosen[]
/// (the same in every lane). Returns how many were found.
__device__ int warp_top_k(const float* v, int n, int k, int lane, int* chosen) {
  unsigned taken = 0;  // bit i: this lane's element lane + 32 i is chosen
  int found = 0;
  for (; found < k; ++found) {
    float best = negative_infinity();
    int best_index = n;
    for (int i = 0, e = lane; e < n; ++i, e += kWarp) {
      if ((taken >> i) & 1u) continue;
      if (v[e] > negative_infinity() && before(v[e], e, best, best_index)) {
        best = v[e];
        best_index = e;
      }
    }
    for (int offset = kWarp / 2; offset >= 1; offset /= 2) {
      const float other = __shfl_xor_sync(kAll, best, offset);
      const int other_index = __shfl_xor_sync(kAll, best_index, offset);
      if (before(other, other_index, best, best_index)) {
        best = other;
        best_index = other_index;
      }
    }
    if (best_index >= n) break;
    chosen[found] = best_index;
    if (best_index % kWarp == lane) taken |= 1u << (best_index / kWarp);
  }
  return found;
}

}  // namespace

__global__ void route_token_choice_kernel(DeviceRouteParams p) {
  extern __shared__ float shared[];
  const int warp = static_cast<int>(threadIdx.x) / kWarp;
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const std::int64_t t = static_cast<std::int64_t>(blockIdx.x) * kRouteWarps + warp;
  if (t >= p.tokens) return;  // the whole warp leaves together
  const int E = p.experts, K = p.top_k;
  float* prob = shared + static_cast<std::size_t>(warp) * 3 * E;  // P
  float* sig = prob + E;                                          // sigmoid scores s
  float* sel = sig + E;                                           // selection values
  const float* z = p.logits + t * E;

  // require_finite_logits: a bad token is reported (lowest index) and gets no expert, so
  // that the layout after it stays valid until the host reads the report.
  bool bad = false;
  for (int e = lane; e < E; e += kWarp) {
    if (!isfinite(z[e])) {
      atomicMin(p.first_bad, static_cast<unsigned long long>(t * E + e));
      bad = true;
    }
  }
  if (__any_sync(kAll, bad)) {
    for (int j = lane; j < K; j += kWarp) {
      p.plan_experts[t * K + j] = -1;
      p.plan_weights[t * K + j] = 0.0f;
    }
    return;
  }

  // row_max (order does not matter for a maximum).
  float max = negative_infinity();
  for (int e = lane; e < E; e += kWarp) max = fmaxf(max, z[e]);
  for (int offset = kWarp / 2; offset >= 1; offset /= 2)
    max = fmaxf(max, __shfl_xor_sync(kAll, max, offset));

  // exp_sum: exp(z - max) into P, its float64 sum, the log-sum-exp.
  for (int e = lane; e < E; e += kWarp) prob[e] = exp_poly(__fsub_rn(z[e], max));
  __syncwarp();
  const double sum = lane_sum_double(prob, E, lane);
  const double lse = static_cast<double>(max) + log(sum);
  if (lane == 0) atomicAdd(p.z_loss_sum, lse * lse);

  const float* scores = nullptr;
  if (p.sigmoid) {
    // sigmoid_row, then P = s · (1 / Σ s).
    for (int e = lane; e < E; e += kWarp)
      sig[e] = __fdiv_rn(1.0f, __fadd_rn(1.0f, exp_poly(-z[e])));
    __syncwarp();
    const float total = lane_sum_float(sig, E, lane);
    const float factor = __fdiv_rn(1.0f, total);
    for (int e = lane; e < E; e += kWarp) prob[e] = __fmul_rn(sig[e], factor);
    scores = sig;
  } else {
    const float factor = static_cast<float>(1.0 / sum);
    for (int e = lane; e < E; e += kWarp) prob[e] = __fmul_rn(prob[e], factor);
    scores = p.pre_softmax ? prob : z;
  }
  __syncwarp();

  // Selection values: scores + bias, then the group limit.
  const float* values = scores;
  if (p.bias != nullptr || p.groups > 0) {
    for (int e = lane; e < E; e += kWarp)
      sel[e] = p.bias != nullptr ? __fadd_rn(scores[e], p.bias[e]) : scores[e];
    __syncwarp();
    if (p.groups > 0) {
      // Lane g scores group g: the sum of its `group_take` largest values, descending
      // (score_groups: max, top2_sum, or the sum from 0 of the top values in order).
      float score = negative_infinity();
      if (lane < p.groups) {
        float top[32];
        int n = 0;
        for (int e = p.group_begin[lane]; e < p.group_begin[lane + 1]; ++e) {
          const float v = sel[e];
          if (!(v > negative_infinity())) continue;
          if (n == p.group_take && !(v > top[n - 1])) continue;
          int i = n < p.group_take ? n++ : p.group_take - 1;
          for (; i > 0 && top[i - 1] < v; --i) top[i] = top[i - 1];
          top[i] = v;
        }
        if (n > 0) {
          if (p.group_take == 1) {
            score = top[0];
          } else if (p.group_take == 2) {
            score = n == 1 ? top[0] : __fadd_rn(top[0], top[1]);
          } else {
            score = 0.0f;
            for (int i = 0; i < n; ++i) score = __fadd_rn(score, top[i]);
          }
        }
      }
      // The max_groups best groups (ties: lower group; a group of only -inf may be kept after
      // every better one, as on the host); the others' experts become -inf.
      unsigned kept = 0;
      for (int m = 0; m < p.max_groups; ++m) {
        float best = ((kept >> lane) & 1u) || lane >= p.groups ? negative_infinity() : score;
        int best_group = ((kept >> lane) & 1u) || lane >= p.groups ? kWarp : lane;
        for (int offset = kWarp / 2; offset >= 1; offset /= 2) {
          const float other = __shfl_xor_sync(kAll, best, offset);
          const int other_group = __shfl_xor_sync(kAll, best_group, offset);
          if (other_group < kWarp && (best_group >= kWarp || other > best ||
                                      (other == best && other_group < best_group))) {
            best = other;
            best_group = other_group;
          }
        }
        if (best_group >= kWarp) break;
        kept |= 1u << best_group;
      }
      for (int g = 0; g < p.groups; ++g) {
        if ((kept >> g) & 1u) continue;
        for (int e = p.group_begin[g] + lane; e < p.group_begin[g + 1]; e += kWarp)
          sel[e] = negative_infinity();
      }
    }
    __syncwarp();
    values = sel;
  }

  // The top k and their weights (token_choice_router.cpp's route).
  int chosen[32];
  const int picked = warp_top_k(values, E, K, lane, chosen);
  if (lane == 0) {
    float w[32];
    if (!p.sigmoid && !p.pre_softmax) {
      float max_logit = negative_infinity();
      for (int j = 0; j < picked; ++j) max_logit = fmaxf(max_logit, z[chosen[j]]);
      float total = 0.0f;
      for (int j = 0; j < picked; ++j) {
        w[j] = exp_poly(__fsub_rn(z[chosen[j]], max_logit));
        total = __fadd_rn(total, w[j]);
      }
      for (int j = 0; j < picked; ++j) w[j] = __fdiv_rn(w[j], total);
    } else {
      for (int j = 0; j < picked; ++j) w[j] = scores[chosen[j]];
    }
    if (p.normalize) {
      float total = 0.0f;
      for (int j = 0; j < picked; ++j) total = __fadd_rn(total, w[j]);
      for (int j = 0; j < picked; ++j) w[j] = __fdiv_rn(w[j], __fadd_rn(total, 1e-20f));
    }
    for (int j = 0; j < K; ++j) {
      const bool used = j < picked;
      p.plan_experts[t * K + j] = used ? chosen[j] : -1;
      p.plan_weights[t * K + j] = used ? __fmul_rn(w[j], p.scale) : 0.0f;
      if (used) atomicAdd(p.counts + chosen[j], 1ull);
    }
  }

  // The aux loss's sums: P, and the plain top-k of P (the chosen experts when the
  // selection values are P itself).
  for (int e = lane; e < E; e += kWarp)
    atomicAdd(p.probability_sums + e, static_cast<double>(prob[e]));
  const bool plain_is_chosen = values == prob;
  int plain[32];
  const int plain_found = plain_is_chosen ? picked : warp_top_k(prob, E, K, lane, plain);
  if (lane == 0) {
    for (int j = 0; j < plain_found; ++j)
      atomicAdd(p.aux_counts + (plain_is_chosen ? chosen[j] : plain[j]), 1ull);
  }
}

}  // namespace switchyard::cuda_path
