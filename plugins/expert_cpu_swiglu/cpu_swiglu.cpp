// expert_cpu_swiglu: SwiGLU experts, y = down(silu(gate·x) ⊙ up·x), float32, three GEMMs
// per local expert through OpenBLAS over its contiguous rows (the backward: six, and two more
// when the forward did not save the projections). Weights stay in their checkpoint dtype (f32,
// bf16, f16, or FP8 E4M3 with 128x128 block scales); the others are widened (FP8 dequantised)
// one matrix at a time into a reused f32 panel just before their GEMM.
#include <cblas.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <thread>
#include <vector>

#include "switchyard/bootstrap.hpp"
#include "switchyard/plugin.hpp"

namespace switchyard::cpu_swiglu {
namespace {

void declare_options(ConfigSchema& s) {
  s.add("blas_threads", ConfigType::kInt, ConfigValue{std::int64_t{0}},
        "OpenBLAS threads (process-wide setting; 0: the hardware threads divided among the "
        "ranks that share them, unless OPENBLAS_NUM_THREADS or OMP_NUM_THREADS says)",
        checks::int_range(0, 1024));
}

/// Kernels alive in this process: one per local rank (several with the inproc transport).
std::atomic<int> live_kernels{0};

/// blas_threads = 0. OpenBLAS's threads serve the whole process, and ranks that call it at
/// once wait on one another's spinning threads: the demo's four in-process ranks on two
/// cores spent 1.0-1.2 ms in their experts with OpenBLAS's default (70-185 ms while the
/// machine was busy) and 0.22-0.28 ms with one thread. So the hardware threads are divided
/// among the ranks that share them, this process's kernels times the launcher's ranks on
/// this node; one rank alone keeps OpenBLAS's own choice, and so does a user who set it.
void share_blas_threads(int kernels_in_process) {
  for (const char* set_by_user : {"OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS"}) {
    if (std::getenv(set_by_user) != nullptr) return;
  }
  int ranks_on_node = 1;
  try {
    if (const auto info = LaunchInfo::from_environment()) ranks_on_node = info->local_world_size;
  } catch (const Error&) {
    // Malformed launcher variables are the transport's to report.
  }
  const int sharing = std::max(1, kernels_in_process) * std::max(1, ranks_on_node);
  if (sharing == 1) return;
  const int hardware = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  openblas_set_num_threads(std::max(1, hardware / sharing));
}

class CpuSwigluKernel final : public ExpertKernel {
 public:
  explicit CpuSwigluKernel(const ExpertCreateArgs& args)
      : hidden_(args.hidden),
        ffn_hidden_(args.ffn_hidden),
        experts_(args.experts.begin(), args.experts.end()) {
    const std::int64_t H = hidden_, F = ffn_hidden_;
    for (std::size_t e = 0; e < experts_.size(); ++e) {
      const std::string which = "cpu_swiglu local expert " + std::to_string(e);
      require_expert_weight(experts_[e].gate, experts_[e].gate_scale, which + " gate", F, H);
      require_expert_weight(experts_[e].up, experts_[e].up_scale, which + " up", F, H);
      require_expert_weight(experts_[e].down, experts_[e].down_scale, which + " down", H, F);
    }
    const std::int64_t threads =
        args.options != nullptr ? args.options->get_int("blas_threads") : 0;
    // More threads than the machine has only oversubscribe it, and enough of them make
    // OpenBLAS fail to start its pool.
    const auto hardware =
        static_cast<std::int64_t>(std::max(1u, std::thread::hardware_concurrency()));
    if (threads > hardware) {
      args.options->fail("blas_threads", "must be at most the " + std::to_string(hardware) +
                                             " hardware threads of this machine (got " +
                                             std::to_string(threads) + ")");
    }
    const int kernels = ++live_kernels;
    if (threads > 0) {
      openblas_set_num_threads(static_cast<int>(threads));
    } else {
      share_blas_threads(kernels);
    }
  }
  ~CpuSwigluKernel() override { --live_kernels; }
  CpuSwigluKernel(const CpuSwigluKernel&) = delete;
  CpuSwigluKernel& operator=(const CpuSwigluKernel&) = delete;

  std::string name() const override { return "cpu_swiglu"; }
  int num_local_experts() const noexcept override { return static_cast<int>(experts_.size()); }
  /// Host memory, host-synchronous, f32 rows; saves the gate and up projections of each
  /// row ([gate·x | up·x], 2F columns) for its backward.
  ExpertKernelCapabilities capabilities() const noexcept override {
    ExpertKernelCapabilities c;
    c.saved_columns = 2 * std::int64_t{ffn_hidden_};
    c.backward = true;
    c.masked_rows = true;
    return c;
  }

  // Host-synchronous: done when it returns.
  void forward(const ExpertBatch& batch, Stream& /*stream*/) override {
    const std::int64_t H = hidden_, F = ffn_hidden_;
    const std::int64_t largest =
        check_expert_batch(batch, H, experts_.size(), Device::host(), names_);
    gate_out_.resize(static_cast<std::size_t>(largest * F));
    up_out_.resize(static_cast<std::size_t>(largest * F));
    if (batch.saved.data() != nullptr) {
      batch.saved.require(names_.saved, DType::kF32, {batch.input.dim(0), 2 * F});
    }

    const float* x = batch.input.data_as<const float>();
    float* y = batch.output.data_as<float>();
    float* saved = batch.saved.data_as<float>();
    std::int64_t row = 0;
    for (std::size_t e = 0; e < experts_.size(); ++e) {
      const std::int64_t block = batch.rows_per_expert[e];
      // Of a worst-case block only its valid rows (host memory: this kernel is the host's).
      const std::int64_t n =
          batch.valid_rows != nullptr ? std::min(block, batch.valid_rows[e]) : block;
      const std::int64_t first = row;
      row += block;
      if (n <= 0) continue;
      const float* xe = x + first * H;
      float* ye = y + first * H;
      const int in = static_cast<int>(n), h = static_cast<int>(H), f = static_cast<int>(F);
      // In place of the gate projection (saved first when wanted).
      activate(e, xe, n, gate_out_.data(), nullptr,
               saved != nullptr ? saved + first * 2 * F : nullptr);
      // [n,H] = act [n,F] · downᵀ.
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, in, h, f, 1.0f, gate_out_.data(), f,
                  as_f32(experts_[e].down, experts_[e].down_scale), f, 0.0f, ye, h);
    }
  }

  // Host-synchronous. For each expert, with A = x·gateᵀ, B = x·upᵀ, S = silu(A),
  // Hh = S ⊙ B and G = w ⊙ d_output (w the rows' weights): d w = <d_output·down, Hh> per row;
  // d down += Gᵀ·Hh; dHh = G·down; dB = dHh ⊙ S;
  // dA = dHh ⊙ B ⊙ silu'(A); d gate += dAᵀ·x; d up += dBᵀ·x; d x = dA·gate + dB·up.
  // A and B come from the forward's saved rows when given, else are recomputed from x (two
  // GEMMs).
  void backward(const ExpertGradientBatch& batch, Stream& /*stream*/) override {
    const std::int64_t H = hidden_, F = ffn_hidden_;
    const std::int64_t largest =
        check_expert_gradient_batch(batch, H, F, experts_.size(), Device::host(), names_);
    const auto buffer = static_cast<std::size_t>(largest * F);
    gate_out_.resize(buffer);
    up_out_.resize(buffer);
    activation_.resize(buffer);
    d_activation_.resize(buffer);
    const float* x = batch.input.data_as<const float>();
    const float* g = batch.d_output.data_as<const float>();
    float* dx = batch.d_input.data_as<float>();
    std::int64_t row = 0;
    for (std::size_t e = 0; e < experts_.size(); ++e) {
      const auto n = batch.rows_per_expert[e];
      if (n == 0) continue;
      const float* xe = x + row * H;
      const float* ge = g + row * H;
      float* dxe = dx + row * H;
      const SwigluExpertGradients& d = batch.d_weights[e];
      const int in = static_cast<int>(n), h = static_cast<int>(H), f = static_cast<int>(F);
      // Keeps the projections for dA, dB (from the forward's when it saved them).
      const float* saved = batch.saved.data_as<const float>();
      activate(e, xe, n, activation_.data(), saved != nullptr ? saved + row * 2 * F : nullptr);
      // dHh before the rows' weights [n,F] = dy [n,H] · down [H,F]; a row's weight gradient
      // <dy, Hh·downᵀ> is <dy·down, Hh>: F products instead of the output's H.
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, in, f, h, 1.0f, ge, h,
                  as_f32(experts_[e].down, experts_[e].down_scale), f, 0.0f, d_activation_.data(),
                  f);
      const auto rows = static_cast<std::size_t>(n), width = static_cast<std::size_t>(F);
      if (float* dw = batch.d_row_weights.data_as<float>(); dw != nullptr) {
        for (std::size_t r = 0; r < rows; ++r) {
          float dot = 0;
          for (std::size_t c = 0; c < width; ++c)
            dot += d_activation_[r * width + c] * activation_[r * width + c];
          dw[static_cast<std::size_t>(row) + r] = dot;
        }
      }
      // With the weights w: G = w ⊙ dy, so dHh = w ⊙ (dy·down) and d down += dyᵀ·(w ⊙ Hh).
      if (const float* w = batch.row_weights.data_as<const float>(); w != nullptr) {
        for (std::size_t r = 0; r < rows; ++r) {
          const float weight = w[static_cast<std::size_t>(row) + r];
          for (std::size_t c = 0; c < width; ++c) {
            activation_[r * width + c] *= weight;
            d_activation_[r * width + c] *= weight;
          }
        }
      }
      // d down [H,F] += dyᵀ [H,n] · (w ⊙ Hh) [n,F].
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, h, f, in, 1.0f, ge, h,
                  activation_.data(), f, 1.0f, d.down.data_as<float>(), f);
      for (std::int64_t i = 0; i < n * F; ++i) {
        const auto k = static_cast<std::size_t>(i);
        const float a = gate_out_[k], b = up_out_[k], dh = d_activation_[k];
        const float sigma = 1.0f / (1.0f + std::exp(-a));
        gate_out_[k] = dh * b * sigma * (1.0f + a * (1.0f - sigma));  // dA
        up_out_[k] = dh * a * sigma;                                  // dB
      }
      // d gate [F,H] += dAᵀ · x; d up += dBᵀ · x; dx [n,H] = dA · gate + dB · up.
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, f, h, in, 1.0f, gate_out_.data(), f, xe,
                  h, 1.0f, d.gate.data_as<float>(), h);
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, f, h, in, 1.0f, up_out_.data(), f, xe, h,
                  1.0f, d.up.data_as<float>(), h);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, in, h, f, 1.0f, gate_out_.data(), f,
                  as_f32(experts_[e].gate, experts_[e].gate_scale), h, 0.0f, dxe, h);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, in, h, f, 1.0f, up_out_.data(), f,
                  as_f32(experts_[e].up, experts_[e].up_scale), h, 1.0f, dxe, h);
      row += n;
    }
  }

 private:
  /// The gate and up projections of expert e's n rows xe into gate_out_ and up_out_
  /// [n,F]: computed, or copied from `saved` [n,2F] (gate | up per row) when given. With
  /// `save`, also copied there. Then silu(gate) ⊙ up into `activation` (which may be
  /// gate_out_ itself).
  void activate(std::size_t e, const float* xe, std::int64_t n, float* activation,
                const float* saved = nullptr, float* save = nullptr) {
    const int in = static_cast<int>(n), h = hidden_, f = ffn_hidden_;
    const auto F = static_cast<std::size_t>(f);
    if (saved != nullptr) {
      for (std::size_t r = 0; r < static_cast<std::size_t>(n); ++r) {
        std::copy_n(saved + 2 * F * r, F, gate_out_.data() + F * r);
        std::copy_n(saved + 2 * F * r + F, F, up_out_.data() + F * r);
      }
    } else {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, in, f, h, 1.0f, xe, h,
                  as_f32(experts_[e].gate, experts_[e].gate_scale), h, 0.0f, gate_out_.data(), f);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, in, f, h, 1.0f, xe, h,
                  as_f32(experts_[e].up, experts_[e].up_scale), h, 0.0f, up_out_.data(), f);
    }
    if (save != nullptr) {
      for (std::size_t r = 0; r < static_cast<std::size_t>(n); ++r) {
        std::copy_n(gate_out_.data() + F * r, F, save + 2 * F * r);
        std::copy_n(up_out_.data() + F * r, F, save + 2 * F * r + F);
      }
    }
    for (std::int64_t i = 0; i < n * ffn_hidden_; ++i) {
      const float a = gate_out_[static_cast<std::size_t>(i)];
      activation[i] = a / (1.0f + std::exp(-a)) * up_out_[static_cast<std::size_t>(i)];
    }
  }

  /// The weight as f32: itself, or widened (FP8: dequantised) into the panel (valid until
  /// the next call).
  const float* as_f32(const TensorView& w, const TensorView& scales) {
    if (w.dtype() == DType::kF32) return w.data_as<const float>();
    panel_.resize(static_cast<std::size_t>(w.numel()));
    widen_expert_weight(w, scales, panel_.data());
    return panel_.data();
  }

  int hidden_;
  int ffn_hidden_;
  std::vector<SwigluExpertWeights> experts_;
  const ExpertBatchNames names_{"cpu_swiglu"};
  std::vector<float> gate_out_, up_out_;
  std::vector<float> activation_, d_activation_;  // backward: Hh and dHh [n,F]
  std::vector<float> panel_;                      // one widened weight matrix
};

std::unique_ptr<ExpertKernel> create(const ExpertCreateArgs& args) {
  return std::make_unique<CpuSwigluKernel>(args);
}

}  // namespace
}  // namespace switchyard::cpu_swiglu

SWITCHYARD_EXPERT_PLUGIN("cpu_swiglu", "0.1.0", "SwiGLU experts in float32 on the CPU (OpenBLAS)",
                         ::switchyard::cpu_swiglu::declare_options, nullptr,
                         ::switchyard::cpu_swiglu::create)
