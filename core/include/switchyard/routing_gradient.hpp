#pragma once
/// \file
/// Gradients of the routing weights and of the router's losses with respect to the
/// logits, for a fixed selection (the forward's decisions), as docs/routing.md defines the
/// weights and losses. Templates on the precision: the routers run them in float, tests in
/// double against finite differences. Rows with non-finite logits (masked experts) get no
/// gradient there. Plain functions of their arguments; thread-safe.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace switchyard::routing_gradient {

/// The score of each expert from its logit (`[router] score`, docs/routing.md): softmax
/// over the experts, or one of the element-wise scores: sigmoid(z), or √softplus(z)
/// (DeepSeek-V4; softplus as PyTorch's, z itself above 20).
enum class ScoreFunction : std::uint8_t { kSoftmax, kSigmoid, kSqrtSoftplus };

/// How a token-choice policy turns logits into the weights of its selected experts.
struct WeightForm {
  ScoreFunction score = ScoreFunction::kSoftmax;
  bool pre_softmax = true;  ///< softmax: over all experts, else over the selected logits
  bool normalize = false;   ///< divided by (their sum + 1e-20)
  double scale = 1.0;       ///< multiplies the final weights
};

namespace detail {
template <typename Real>
bool usable(Real z) {
  return std::isfinite(z);
}
/// softmax of z [n] over its finite entries into p (0 elsewhere).
template <typename Real>
void softmax(const Real* z, int n, Real* p) {
  Real max = -INFINITY;
  for (int e = 0; e < n; ++e) {
    if (usable(z[e]) && z[e] > max) max = z[e];
  }
  Real sum = 0;
  for (int e = 0; e < n; ++e) {
    p[e] = usable(z[e]) ? std::exp(z[e] - max) : Real(0);
    sum += p[e];
  }
  for (int e = 0; e < n; ++e) p[e] /= sum;
}
template <typename Real>
Real sigmoid(Real z) {
  return Real(1) / (Real(1) + std::exp(-z));
}
/// √softplus(z), softplus(z) = log(1 + e^z) (z itself above 20, as PyTorch's).
template <typename Real>
Real sqrt_softplus(Real z) {
  return std::sqrt(z > Real(20) ? z : std::log1p(std::exp(z)));
}
/// An element-wise score of z.
template <typename Real>
Real score(ScoreFunction f, Real z) {
  return f == ScoreFunction::kSigmoid ? sigmoid(z) : sqrt_softplus(z);
}
/// d score/dz given z and its score s: s (1 - s) for the sigmoid; sigmoid(z) / (2 s) for
/// √softplus (softplus' = sigmoid; 0 where s underflowed to 0, as its limit).
template <typename Real>
Real score_derivative(ScoreFunction f, Real z, Real s) {
  if (f == ScoreFunction::kSigmoid) return s * (Real(1) - s);
  return s > Real(0) ? (z > Real(20) ? Real(1) : sigmoid(z)) / (Real(2) * s) : Real(0);
}
}  // namespace detail

/// The final weights of one token: `selected` [k] expert ids (selection order) from logits
/// z [E]. The forward of `weights_backward`, for tests and recomputation.
template <typename Real>
void weights(const WeightForm& form, const Real* z, int E, const int* selected, int k, Real* w) {
  std::vector<Real> p(static_cast<std::size_t>(E));
  if (form.score != ScoreFunction::kSoftmax) {
    for (int j = 0; j < k; ++j) w[j] = detail::score(form.score, z[selected[j]]);
  } else if (form.pre_softmax) {
    detail::softmax(z, E, p.data());
    for (int j = 0; j < k; ++j) w[j] = p[static_cast<std::size_t>(selected[j])];
  } else {
    for (int j = 0; j < k; ++j) p[static_cast<std::size_t>(j)] = z[selected[j]];
    detail::softmax(p.data(), k, w);
  }
  if (form.normalize) {
    Real sum = 0;
    for (int j = 0; j < k; ++j) sum += w[j];
    for (int j = 0; j < k; ++j) w[j] /= (sum + Real(1e-20));
  }
  for (int j = 0; j < k; ++j) w[j] *= static_cast<Real>(form.scale);
}

/// Adds to dz [E] the gradient of one token's loss through its weights: `d_weights` [k] is
/// dL/d(final weight) per selected position (0 for a slot that was dropped afterwards: it
/// still shares the normalisation). `scratch` holds at least E + 2k values.
template <typename Real>
void weights_backward(const WeightForm& form, const Real* z, int E, const int* selected, int k,
                      const Real* d_weights, Real* dz, Real* scratch) {
  Real* p = scratch;          // [E]: softmax over all experts (pre-softmax)
  Real* score = scratch + E;  // [k]: the selected scores
  Real* d_score = score + k;  // [k]
  const bool elementwise = form.score != ScoreFunction::kSoftmax;
  if (elementwise) {
    for (int j = 0; j < k; ++j) score[j] = detail::score(form.score, z[selected[j]]);
  } else if (form.pre_softmax) {
    detail::softmax(z, E, p);
    for (int j = 0; j < k; ++j) score[j] = p[selected[j]];
  } else {
    for (int j = 0; j < k; ++j) d_score[j] = z[selected[j]];
    detail::softmax(d_score, k, score);
  }
  const auto scale = static_cast<Real>(form.scale);
  for (int j = 0; j < k; ++j) d_score[j] = scale * d_weights[j];
  if (form.normalize) {
    // w_j = s_j / (S + eps): dL/ds_i = (g_i - sum_j g_j w_j) / (S + eps).
    Real sum = 0, weighted = 0;
    for (int j = 0; j < k; ++j) sum += score[j];
    const Real denominator = sum + Real(1e-20);
    for (int j = 0; j < k; ++j) weighted += d_score[j] * score[j] / denominator;
    for (int j = 0; j < k; ++j) d_score[j] = (d_score[j] - weighted) / denominator;
  }
  if (elementwise) {
    for (int j = 0; j < k; ++j) {
      dz[selected[j]] +=
          d_score[j] * detail::score_derivative(form.score, z[selected[j]], score[j]);
    }
  } else if (form.pre_softmax) {
    // p = softmax(z): dz_e = p_e (dp_e - sum_f dp_f p_f), dp nonzero on the selection only.
    Real dot = 0;
    for (int j = 0; j < k; ++j) dot += d_score[j] * score[j];
    for (int e = 0; e < E; ++e) {
      if (detail::usable(z[e])) dz[e] -= p[e] * dot;
    }
    for (int j = 0; j < k; ++j) dz[selected[j]] += score[j] * d_score[j];
  } else {
    Real dot = 0;
    for (int j = 0; j < k; ++j) dot += d_score[j] * score[j];
    for (int j = 0; j < k; ++j) dz[selected[j]] += score[j] * (d_score[j] - dot);
  }
}

/// The losses' part that depends on the logits, over a group of `tokens` tokens (all
/// ranks of the EP group): aux = E / (k·tokens²) · Σ_e (Σ_t P[t,e]) · counts[e] with the
/// plain top-k counts held fixed, and z = (1/tokens) Σ_t logsumexp(z_t)². Adds
/// aux_coeff · d aux/dz + z_coeff · d z/dz for one token to dz [E]. P is softmax(z), or
/// s / Σ s for element-wise scores s. `scratch` holds at least E values.
template <typename Real>
void losses_backward(ScoreFunction score, const Real* z, int E, int top_k, std::int64_t tokens,
                     std::span<const std::int64_t> aux_counts, double aux_coeff, double z_coeff,
                     Real* dz, Real* scratch) {
  if (tokens <= 0 || (aux_coeff == 0 && z_coeff == 0)) return;
  Real* p = scratch;
  const Real T = static_cast<Real>(tokens);
  if (aux_coeff != 0) {
    // dL/dP[e] = a_e, the same for every token.
    const Real a_scale =
        static_cast<Real>(aux_coeff) * static_cast<Real>(E) / (static_cast<Real>(top_k) * T * T);
    if (score != ScoreFunction::kSoftmax) {
      Real sum = 0;
      for (int e = 0; e < E; ++e) {
        p[e] = detail::usable(z[e]) ? detail::score(score, z[e]) : Real(0);
        sum += p[e];
      }
      // P_f = s_f / S: dL/ds_e = (a_e - Σ_f a_f P_f) / S; then ds/dz.
      Real dot = 0;
      for (int e = 0; e < E; ++e)
        dot += a_scale * static_cast<Real>(aux_counts[static_cast<std::size_t>(e)]) * p[e] / sum;
      for (int e = 0; e < E; ++e) {
        if (!detail::usable(z[e])) continue;
        const Real a = a_scale * static_cast<Real>(aux_counts[static_cast<std::size_t>(e)]);
        dz[e] += (a - dot) / sum * detail::score_derivative(score, z[e], p[e]);
      }
    } else {
      detail::softmax(z, E, p);
      Real dot = 0;
      for (int e = 0; e < E; ++e)
        dot += a_scale * static_cast<Real>(aux_counts[static_cast<std::size_t>(e)]) * p[e];
      for (int e = 0; e < E; ++e) {
        if (!detail::usable(z[e])) continue;
        const Real a = a_scale * static_cast<Real>(aux_counts[static_cast<std::size_t>(e)]);
        dz[e] += p[e] * (a - dot);
      }
    }
  }
  if (z_coeff != 0) {
    // d/dz_e of lse² / T = 2 lse softmax(z)_e / T.
    Real max = -INFINITY;
    for (int e = 0; e < E; ++e) {
      if (detail::usable(z[e]) && z[e] > max) max = z[e];
    }
    Real sum = 0;
    for (int e = 0; e < E; ++e) sum += detail::usable(z[e]) ? std::exp(z[e] - max) : Real(0);
    const Real lse = max + std::log(sum);
    detail::softmax(z, E, p);
    const Real c = static_cast<Real>(z_coeff) * Real(2) * lse / T;
    for (int e = 0; e < E; ++e) {
      if (detail::usable(z[e])) dz[e] += c * p[e];
    }
  }
}

}  // namespace switchyard::routing_gradient
