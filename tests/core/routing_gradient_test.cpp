// The routing gradients against central finite differences in float64: the weights of
// every score form (softmax before or after the selection, sigmoid, normalised, scaled,
// with a dropped slot sharing the normalisation, masked experts), and the aux and z losses
// as docs/routing.md defines them (written here from the definitions, in float64).
#include <doctest/doctest.h>

#include <cmath>
#include <functional>
#include <random>
#include <vector>

#include "switchyard/routing_gradient.hpp"

using namespace switchyard;
namespace rg = switchyard::routing_gradient;

namespace {

/// max |a - b| / max |b|.
double relative_error(const std::vector<double>& a, const std::vector<double>& b) {
  double diff = 0, scale = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, std::abs(a[i] - b[i]));
    scale = std::max(scale, std::abs(b[i]));
  }
  return diff / scale;
}

/// Central differences of f at z, step h, with one Richardson step (error O(h^4)).
std::vector<double> finite_differences(const std::function<double(const std::vector<double>&)>& f,
                                       std::vector<double> z, double h) {
  std::vector<double> g(z.size(), 0.0);
  for (std::size_t i = 0; i < z.size(); ++i) {
    if (!std::isfinite(z[i])) continue;
    auto central = [&](double step) {
      const double saved = z[i];
      z[i] = saved + step;
      const double up = f(z);
      z[i] = saved - step;
      const double down = f(z);
      z[i] = saved;
      return (up - down) / (2 * step);
    };
    g[i] = (4 * central(h / 2) - central(h)) / 3;
  }
  return g;
}

std::vector<double> random_values(std::size_t n, unsigned seed, double spread = 1.5) {
  std::mt19937 generator(seed);
  std::normal_distribution<double> normal(0.0, spread);
  std::vector<double> v(n);
  for (auto& x : v) x = normal(generator);
  return v;
}

}  // namespace

TEST_CASE("weights: every score form against finite differences in float64") {
  constexpr int E = 7, k = 3;
  const std::vector<int> selected = {4, 1, 6};
  for (const rg::ScoreFunction score : {rg::ScoreFunction::kSoftmax, rg::ScoreFunction::kSigmoid,
                                        rg::ScoreFunction::kSqrtSoftplus}) {
    for (const bool pre_softmax : {true, false}) {
      if (score != rg::ScoreFunction::kSoftmax && !pre_softmax) continue;  // a softmax option
      for (const bool normalize : {false, true}) {
        for (const double scale : {1.0, 2.5}) {
          for (const bool dropped : {false, true}) {
            CAPTURE(static_cast<int>(score));
            CAPTURE(pre_softmax);
            CAPTURE(normalize);
            CAPTURE(scale);
            CAPTURE(dropped);
            const rg::WeightForm form{score, pre_softmax, normalize, scale};
            const std::vector<double> z = random_values(E, 11);
            std::vector<double> g = random_values(k, 12, 1.0);
            if (dropped) g[1] = 0;  // capacity dropped slot 1: no gradient of its own
            auto loss = [&](const std::vector<double>& at) {
              std::vector<double> w(k);
              if (score == rg::ScoreFunction::kSqrtSoftplus) {
                // DeepSeek-V4's weights written out: √log(1 + e^z) of the selected logits,
                // normalised, scaled.
                double sum = 0;
                for (int j = 0; j < k; ++j) {
                  w[static_cast<std::size_t>(j)] = std::sqrt(std::log(
                      1 +
                      std::exp(
                          at[static_cast<std::size_t>(selected[static_cast<std::size_t>(j)])])));
                  sum += w[static_cast<std::size_t>(j)];
                }
                for (double& v : w) v = (normalize ? v / (sum + 1e-20) : v) * scale;
              } else {
                rg::weights(form, at.data(), E, selected.data(), k, w.data());
              }
              double sum = 0;
              for (int j = 0; j < k; ++j)
                sum += g[static_cast<std::size_t>(j)] * w[static_cast<std::size_t>(j)];
              return sum;
            };
            std::vector<double> dz(E, 0.0), scratch(E + 2 * k);
            rg::weights_backward(form, z.data(), E, selected.data(), k, g.data(), dz.data(),
                                 scratch.data());
            CHECK(relative_error(dz, finite_differences(loss, z, 1e-3)) <= 1e-6);
            // The float path against the same float64 differences.
            std::vector<float> zf(z.begin(), z.end()), gf(g.begin(), g.end()), dzf(E, 0.0f),
                scratch_f(E + 2 * k);
            rg::weights_backward(form, zf.data(), E, selected.data(), k, gf.data(), dzf.data(),
                                 scratch_f.data());
            CHECK(relative_error(std::vector<double>(dzf.begin(), dzf.end()),
                                 finite_differences(loss, std::vector<double>(zf.begin(), zf.end()),
                                                    1e-3)) <= 1e-4);
          }
        }
      }
    }
  }
}

TEST_CASE("weights: by hand, the softmax over two selected logits") {
  // z = (0, ln 3): Mixtral's post-softmax weights (1/4, 3/4); with g = (1, 0) the gradient
  // is w0 (1 - w0) = 3/16 at z0 and -w0 w1 = -3/16 at z1.
  const double z[2] = {0.0, std::log(3.0)};
  const int selected[2] = {0, 1};
  const double g[2] = {1.0, 0.0};
  double dz[2] = {0, 0}, scratch[6];
  rg::weights_backward(rg::WeightForm{rg::ScoreFunction::kSoftmax, false, false, 1.0}, z, 2,
                       selected, 2, g, dz, scratch);
  CHECK(dz[0] == doctest::Approx(3.0 / 16));
  CHECK(dz[1] == doctest::Approx(-3.0 / 16));
}

TEST_CASE("weights: masked experts get no gradient, the others as without them") {
  constexpr int E = 5, k = 2;
  std::vector<double> z = random_values(E, 3);
  z[2] = -INFINITY;
  const std::vector<int> selected = {0, 3};
  const std::vector<double> g = {0.7, -1.3};
  const rg::WeightForm form{rg::ScoreFunction::kSoftmax, true, true, 1.0};
  auto loss = [&](const std::vector<double>& at) {
    double w[k];
    rg::weights(form, at.data(), E, selected.data(), k, w);
    return g[0] * w[0] + g[1] * w[1];
  };
  std::vector<double> dz(E, 0.0), scratch(E + 2 * k);
  rg::weights_backward(form, z.data(), E, selected.data(), k, g.data(), dz.data(), scratch.data());
  CHECK(dz[2] == 0.0);
  CHECK(relative_error(dz, finite_differences(loss, z, 1e-3)) <= 1e-6);
}

TEST_CASE("aux and z losses: against finite differences of their definitions") {
  // T tokens over E experts, plain top-k counts c held fixed (they are piecewise constant).
  constexpr int T = 6, E = 5, k = 2;
  const std::vector<double> z = random_values(T * E, 21);
  const std::vector<std::int64_t> counts = {3, 1, 4, 2, 2};
  for (const rg::ScoreFunction score : {rg::ScoreFunction::kSoftmax, rg::ScoreFunction::kSigmoid,
                                        rg::ScoreFunction::kSqrtSoftplus}) {
    CAPTURE(static_cast<int>(score));
    const double aux_coeff = 0.7, z_coeff = 0.05;
    // The element-wise scores written out: sigmoid, √log(1 + e^z).
    auto elementwise = [&](double v) {
      return score == rg::ScoreFunction::kSigmoid ? 1 / (1 + std::exp(-v))
                                                  : std::sqrt(std::log(1 + std::exp(v)));
    };
    // aux = E / (k T^2) sum_e (sum_t P[t,e]) c_e, P = softmax(z) or s / sum s;
    // z = mean_t logsumexp(z_t)^2 — written out here.
    auto loss = [&](const std::vector<double>& at) {
      double aux = 0, zl = 0;
      for (int t = 0; t < T; ++t) {
        const double* row = at.data() + t * E;
        double max = row[0];
        for (int e = 1; e < E; ++e) max = std::max(max, row[e]);
        double sum_exp = 0, sum_scores = 0;
        for (int e = 0; e < E; ++e) {
          sum_exp += std::exp(row[e] - max);
          sum_scores += elementwise(row[e]);
        }
        for (int e = 0; e < E; ++e) {
          const double p = score != rg::ScoreFunction::kSoftmax ? elementwise(row[e]) / sum_scores
                                                                : std::exp(row[e] - max) / sum_exp;
          aux += p * static_cast<double>(counts[static_cast<std::size_t>(e)]);
        }
        const double lse = max + std::log(sum_exp);
        zl += lse * lse;
      }
      return aux_coeff * aux * E / (k * double(T) * T) + z_coeff * zl / T;
    };
    std::vector<double> dz(T * E, 0.0), scratch(E);
    for (int t = 0; t < T; ++t) {
      rg::losses_backward(score, z.data() + t * E, E, k, T, counts, aux_coeff, z_coeff,
                          dz.data() + t * E, scratch.data());
    }
    CHECK(relative_error(dz, finite_differences(loss, z, 1e-3)) <= 1e-6);
  }
}
