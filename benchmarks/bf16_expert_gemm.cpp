// How should the CPU expert kernel compute with BF16 weights? Times, for one expert's
// gate projection [n,F] = x [n,H] · Wᵀ with W [F,H] stored as BF16:
//   widen:  W widened to an f32 panel, then cblas_sgemm (what expert_cpu_swiglu does);
//   sbgemm: x rounded to BF16, then OpenBLAS's cblas_sbgemm (BF16 inputs, f32 output),
//           when the OpenBLAS in use exports it (found at run time: Debian 12's does not);
//   f32:    cblas_sgemm on f32 weights (the reference point, twice the weight memory).
// Prints the median of 7 runs of each, and the largest difference of sbgemm's result to
// widen's relative to the largest |result| (sbgemm also rounds the activations).
// usage: bf16_expert_gemm [rows] [hidden] [ffn]
#include <cblas.h>
#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "switchyard/tensor.hpp"

namespace {

template <typename F>
double median_seconds(F&& run) {
  std::vector<double> times;
  for (int i = 0; i < 7; ++i) {
    const auto start = std::chrono::steady_clock::now();
    run();
    times.push_back(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(times.begin(), times.end());
  return times[3];
}

}  // namespace

int main(int argc, char** argv) {
  using namespace switchyard;
  const int n = argc > 1 ? std::atoi(argv[1]) : 512;
  const int h = argc > 2 ? std::atoi(argv[2]) : 2048;
  const int f = argc > 3 ? std::atoi(argv[3]) : 1408;
  const auto nh = static_cast<std::size_t>(n) * static_cast<std::size_t>(h);
  const auto fh = static_cast<std::size_t>(f) * static_cast<std::size_t>(h);
  const auto nf = static_cast<std::size_t>(n) * static_cast<std::size_t>(f);
  std::vector<float> x(nh), w(fh), panel(fh), out_widen(nf), out_sb(nf), out_f32(nf);
  std::vector<std::uint16_t> w_bf16(fh), x_bf16(nh);
  unsigned state = 12345;
  auto uniform = [&] {
    state = state * 1664525u + 1013904223u;
    return static_cast<float>(state >> 8) / static_cast<float>(1u << 24) - 0.5f;
  };
  for (auto& v : x) v = uniform();
  for (std::size_t i = 0; i < fh; ++i) {
    w_bf16[i] = float_to_bf16(uniform());
    w[i] = bf16_to_float(w_bf16[i]);
  }

  const double widen = median_seconds([&] {
    widen_to_f32(w_bf16.data(), DType::kBF16, fh, panel.data());
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, f, h, 1.0f, x.data(), h, panel.data(),
                h, 0.0f, out_widen.data(), f);
  });
  using Sbgemm =
      void (*)(CBLAS_ORDER, CBLAS_TRANSPOSE, CBLAS_TRANSPOSE, blasint, blasint, blasint, float,
               const bfloat16*, blasint, const bfloat16*, blasint, float, float*, blasint);
  const auto sbgemm_fn = reinterpret_cast<Sbgemm>(dlsym(RTLD_DEFAULT, "cblas_sbgemm"));
  double sbgemm = 0;
  if (sbgemm_fn != nullptr) {
    sbgemm = median_seconds([&] {
      for (std::size_t i = 0; i < nh; ++i) x_bf16[i] = float_to_bf16(x[i]);
      sbgemm_fn(CblasRowMajor, CblasNoTrans, CblasTrans, n, f, h, 1.0f,
                reinterpret_cast<const bfloat16*>(x_bf16.data()), h,
                reinterpret_cast<const bfloat16*>(w_bf16.data()), h, 0.0f, out_sb.data(), f);
    });
  }
  const double f32 = median_seconds([&] {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, f, h, 1.0f, x.data(), h, w.data(), h,
                0.0f, out_f32.data(), f);
  });
  std::printf("rows %d, hidden %d, ffn %d, OpenBLAS %s\n", n, h, f, openblas_get_config());
  std::printf("widen + sgemm   %8.3f ms\n", widen * 1e3);
  if (sbgemm_fn != nullptr) {
    double diff = 0, scale = 0;
    for (std::size_t i = 0; i < nf; ++i) {
      diff = std::max(diff, static_cast<double>(std::fabs(out_sb[i] - out_widen[i])));
      scale = std::max(scale, static_cast<double>(std::fabs(out_widen[i])));
    }
    std::printf("bf16 x + sbgemm %8.3f ms  (%.2fx widen's time; max diff / max |y| = %.2e)\n",
                sbgemm * 1e3, sbgemm / widen, diff / scale);
  } else {
    std::printf("bf16 x + sbgemm  not exported by this OpenBLAS build\n");
  }
  std::printf("f32 sgemm       %8.3f ms  (%.2fx widen's time)\n", f32 * 1e3, f32 / widen);
  return 0;
}
