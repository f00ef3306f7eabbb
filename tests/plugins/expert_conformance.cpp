#include "expert_conformance.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>

#include "switchyard/config.hpp"
#include "switchyard/status.hpp"

namespace switchyard::conformance {
namespace {

constexpr std::int64_t kHidden = 160, kFfn = 136;  // not multiples of FP8's 128 blocks
constexpr int kExperts = 3;
const std::vector<std::int64_t> kRows = {5, 0, 7};  // the middle expert has no rows
constexpr std::int64_t kN = 12;

class HostKernelMemory final : public KernelMemory {
 public:
  Device device() const override { return Device::host(); }
  void* allocate(std::size_t bytes) override {
    blocks_.emplace_back(std::max<std::size_t>(bytes, 1));
    return blocks_.back().data();
  }
  void to_device(void* dst, const void* src, std::size_t bytes) override {
    std::memcpy(dst, src, bytes);
  }
  void to_host(void* dst, const void* src, std::size_t bytes) override {
    std::memcpy(dst, src, bytes);
  }
  Stream& stream() override { return stream_; }

 private:
  std::vector<std::vector<std::byte>> blocks_;
  HostStream stream_{HostStream::Mode::kInline};
};

/// The value of an FP8 E4M3 (fn) code, from the format's definition (bias 7, 3 mantissa
/// bits, subnormals at exponent 0, 0x7f/0xff NaN): the suite's own decoding.
double e4m3_value(std::uint8_t code) {
  const int exponent = (code >> 3) & 0xf, mantissa = code & 7;
  if (exponent == 0xf && mantissa == 7) return std::nan("");
  const double magnitude = exponent == 0 ? mantissa / 8.0 * std::ldexp(1.0, -6)
                                         : (1 + mantissa / 8.0) * std::ldexp(1.0, exponent - 7);
  return (code & 0x80) != 0 ? -magnitude : magnitude;
}

/// One matrix as the kernel is given it (in `dtype`, FP8 with its block scales) and as the
/// suite reads it: the exact value of every stored element, in double.
struct Matrix {
  HostTensor stored, scales;
  std::vector<double> value;
};

Matrix make_matrix(std::mt19937& rng, std::int64_t rows, std::int64_t cols, DType dtype) {
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  const float bound = 1.0f / std::sqrt(static_cast<float>(cols));
  std::vector<float> w(static_cast<std::size_t>(rows * cols));
  for (float& v : w) v = uniform(rng) * bound;
  Matrix m;
  m.stored = HostTensor(dtype, {rows, cols});
  m.value.resize(w.size());
  if (dtype == DType::kF32) {
    std::copy(w.begin(), w.end(), m.stored.data<float>());
    std::copy(w.begin(), w.end(), m.value.begin());
  } else if (dtype == DType::kBF16) {
    for (std::size_t i = 0; i < w.size(); ++i) {
      const std::uint16_t bits = float_to_bf16(w[i]);
      m.stored.data<std::uint16_t>()[i] = bits;
      std::uint32_t wide = static_cast<std::uint32_t>(bits) << 16;
      float f = 0;
      std::memcpy(&f, &wide, sizeof f);
      m.value[i] = f;
    }
  } else {  // FP8: per 128×128 block, scale = amax / 448
    REQUIRE(dtype == DType::kF8E4M3);
    const std::int64_t br = (rows + 127) / 128, bc = (cols + 127) / 128;
    m.scales = HostTensor(DType::kF32, {br, bc});
    for (std::int64_t i = 0; i < br; ++i) {
      for (std::int64_t j = 0; j < bc; ++j) {
        float amax = 0;
        for (std::int64_t r = i * 128; r < std::min(rows, (i + 1) * 128); ++r)
          for (std::int64_t c = j * 128; c < std::min(cols, (j + 1) * 128); ++c)
            amax = std::max(amax, std::abs(w[static_cast<std::size_t>(r * cols + c)]));
        m.scales.data<float>()[i * bc + j] = amax / 448.0f;
      }
    }
    for (std::int64_t r = 0; r < rows; ++r) {
      for (std::int64_t c = 0; c < cols; ++c) {
        const auto k = static_cast<std::size_t>(r * cols + c);
        const float scale = m.scales.data<float>()[(r / 128) * bc + c / 128];
        const std::uint8_t code = float_to_fp8_e4m3(w[k] / scale);
        m.stored.data<std::uint8_t>()[k] = code;
        m.value[k] = e4m3_value(code) * scale;
      }
    }
  }
  return m;
}

/// The local experts of a case, in one weight dtype.
struct Experts {
  std::vector<std::array<Matrix, 3>> matrices;  // gate, up [F,H], down [H,F]
  std::vector<SwigluExpertWeights> views;
};

Experts make_experts(std::uint32_t seed, DType dtype) {
  std::mt19937 rng(seed);
  Experts e;
  for (int i = 0; i < kExperts; ++i) {
    e.matrices.push_back({make_matrix(rng, kFfn, kHidden, dtype),
                          make_matrix(rng, kFfn, kHidden, dtype),
                          make_matrix(rng, kHidden, kFfn, dtype)});
  }
  auto scales = [](const Matrix& m) {
    return m.scales.size_bytes() == 0 ? TensorView{} : m.scales.view();
  };
  for (const auto& m : e.matrices) {
    SwigluExpertWeights w{m[0].stored.view(), m[1].stored.view(), m[2].stored.view()};
    w.gate_scale = scales(m[0]);
    w.up_scale = scales(m[1]);
    w.down_scale = scales(m[2]);
    e.views.push_back(w);
  }
  return e;
}

std::vector<float> random_rows(std::int64_t rows, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  std::vector<float> v(static_cast<std::size_t>(rows * kHidden));
  for (float& x : v) x = uniform(rng);
  return v;
}

/// Expert e of the case on one row, in double; with `act` also its activations
/// (silu(a)·b, and a, b) for the backward.
struct Activations {
  std::vector<double> a, b, h;
};

std::vector<double> expert_output(ExpertMath math, const Experts& experts, int e, const float* x,
                                  Activations* keep = nullptr) {
  std::vector<double> y(static_cast<std::size_t>(kHidden), 0.0);
  if (math == ExpertMath::kIdentity) {
    for (std::int64_t h = 0; h < kHidden; ++h) y[static_cast<std::size_t>(h)] = x[h];
    return y;
  }
  const auto& m = experts.matrices[static_cast<std::size_t>(e)];
  Activations act;
  act.a.resize(kFfn);
  act.b.resize(kFfn);
  act.h.resize(kFfn);
  for (std::int64_t f = 0; f < kFfn; ++f) {
    double a = 0, b = 0;
    for (std::int64_t h = 0; h < kHidden; ++h) {
      a += m[0].value[static_cast<std::size_t>(f * kHidden + h)] * x[h];
      b += m[1].value[static_cast<std::size_t>(f * kHidden + h)] * x[h];
    }
    const auto k = static_cast<std::size_t>(f);
    act.a[k] = a;
    act.b[k] = b;
    act.h[k] = a / (1 + std::exp(-a)) * b;
  }
  for (std::int64_t h = 0; h < kHidden; ++h) {
    double s = 0;
    for (std::int64_t f = 0; f < kFfn; ++f)
      s += m[2].value[static_cast<std::size_t>(h * kFfn + f)] * act.h[static_cast<std::size_t>(f)];
    y[static_cast<std::size_t>(h)] = s;
  }
  if (keep != nullptr) *keep = std::move(act);
  return y;
}

/// max |got - expected| / max |expected|.
double relative(const std::vector<float>& got, const std::vector<double>& expected) {
  double diff = 0, scale = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    diff = std::max(diff, std::abs(got[i] - expected[i]));
    scale = std::max(scale, std::abs(expected[i]));
  }
  return scale == 0 ? diff : diff / scale;
}

/// A buffer of the kernel's memory with a host copy.
template <typename T>
struct Mirror {
  std::vector<T> host;
  void* device = nullptr;
  KernelMemory* memory = nullptr;
  Mirror(KernelMemory& m, std::vector<T> values) : host(std::move(values)), memory(&m) {
    device = m.allocate(host.size() * sizeof(T));
    if (!host.empty()) m.to_device(device, host.data(), host.size() * sizeof(T));
  }
  std::vector<T>& read() {
    if (!host.empty()) memory->to_host(host.data(), device, host.size() * sizeof(T));
    return host;
  }
  TensorView view(DType dtype, std::vector<std::int64_t> shape) const {
    return {device, dtype, std::move(shape), memory->device()};
  }
};

std::shared_ptr<ExpertKernel> create(const KernelUnderTest& k, const Experts& experts) {
  ExpertCreateArgs args;
  args.hidden = static_cast<int>(kHidden);
  args.ffn_hidden = k.math == ExpertMath::kSwiglu ? static_cast<int>(kFfn) : 0;
  args.experts = experts.views;
  auto kernel = k.create(args);
  REQUIRE(kernel != nullptr);
  REQUIRE(kernel->num_local_experts() == kExperts);
  return kernel;
}

std::vector<DType> dtypes_of(const KernelUnderTest& k) {
  return k.math == ExpertMath::kSwiglu ? k.weight_dtypes : std::vector<DType>{DType::kF32};
}

void forward_case(const KernelUnderTest& k) {
  for (const DType dtype : dtypes_of(k)) {
    CAPTURE(dtype_name(dtype));
    const Experts experts = make_experts(21, dtype);
    auto kernel = create(k, experts);
    const ExpertKernelCapabilities caps = kernel->capabilities();
    auto memory = k.memory();
    const std::vector<float> x = random_rows(kN, 5);
    Mirror<float> xs(*memory, x);
    Mirror<float> y(*memory, std::vector<float>(x.size(), std::nanf("")));  // poisoned
    kernel->forward(
        {xs.view(DType::kF32, {kN, kHidden}), kRows, y.view(DType::kF32, {kN, kHidden})},
        memory->stream());
    memory->stream().synchronize();
    std::vector<double> expected;
    std::int64_t row = 0;
    for (int e = 0; e < kExperts; ++e) {
      for (std::int64_t i = 0; i < kRows[static_cast<std::size_t>(e)]; ++i, ++row) {
        const auto out = expert_output(k.math, experts, e, x.data() + row * kHidden);
        expected.insert(expected.end(), out.begin(), out.end());
      }
    }
    const std::vector<float> first = y.read();
    CHECK(relative(first, expected) <= k.tolerance(dtype));
    // The same bits again.
    kernel->forward(
        {xs.view(DType::kF32, {kN, kHidden}), kRows, y.view(DType::kF32, {kN, kHidden})},
        memory->stream());
    memory->stream().synchronize();
    CHECK(std::memcmp(y.read().data(), first.data(), first.size() * sizeof(float)) == 0);
    // bf16 rows, when the kernel asks for them, are the f32 rows rounded: the same bits.
    if (caps.input_dtype == DType::kBF16) {
      std::vector<std::uint16_t> rounded(x.size());
      for (std::size_t i = 0; i < x.size(); ++i) rounded[i] = float_to_bf16(x[i]);
      Mirror<std::uint16_t> xb(*memory, rounded);
      kernel->forward(
          {xb.view(DType::kBF16, {kN, kHidden}), kRows, y.view(DType::kF32, {kN, kHidden})},
          memory->stream());
      memory->stream().synchronize();
      CHECK(std::memcmp(y.read().data(), first.data(), first.size() * sizeof(float)) == 0);
    }
    // bf16 outputs, when the kernel offers them: the float64 result within bf16's rounding.
    if (caps.output_dtype == DType::kBF16) {
      Mirror<std::uint16_t> yb(*memory, std::vector<std::uint16_t>(x.size(), 0x7fc0));
      kernel->forward(
          {xs.view(DType::kF32, {kN, kHidden}), kRows, yb.view(DType::kBF16, {kN, kHidden})},
          memory->stream());
      memory->stream().synchronize();
      std::vector<float> widened(x.size());
      const auto& bits = yb.read();
      for (std::size_t i = 0; i < bits.size(); ++i) widened[i] = bf16_to_float(bits[i]);
      CHECK(relative(widened, expected) <= std::max(k.tolerance(dtype), 1e-2));
    }
  }
}

void empty_and_bad_batches_case(const KernelUnderTest& k) {
  const Experts experts = make_experts(22, DType::kF32);
  auto kernel = create(k, experts);
  auto memory = k.memory();
  Mirror<float> none(*memory, {});
  const std::vector<std::int64_t> zeros = {0, 0, 0};
  CHECK_NOTHROW(kernel->forward(
      {none.view(DType::kF32, {0, kHidden}), zeros, none.view(DType::kF32, {0, kHidden})},
      memory->stream()));
  memory->stream().synchronize();

  Mirror<float> x(*memory, random_rows(3, 6)), y(*memory, std::vector<float>(3 * kHidden));
  auto refused = [&](const ExpertBatch& batch) {
    ErrorCode code = ErrorCode::kOk;
    try {
      kernel->forward(batch, memory->stream());
      memory->stream().synchronize();
    } catch (const Error& e) {
      code = e.code();
    }
    CHECK(code == ErrorCode::kInvalidArgument);
  };
  const std::vector<std::int64_t> wrong_sum = {1, 1, 0}, wrong_count = {3}, ok = {1, 2, 0};
  refused({x.view(DType::kF32, {3, kHidden}), wrong_sum, y.view(DType::kF32, {3, kHidden})});
  refused({x.view(DType::kF32, {3, kHidden}), wrong_count, y.view(DType::kF32, {3, kHidden})});
  if (k.math == ExpertMath::kSwiglu) {  // identity experts take rows of any width
    refused({x.view(DType::kF32, {3, kHidden - 1}), ok, y.view(DType::kF32, {3, kHidden - 1})});
  }
  refused({x.view(DType::kF32, {3, kHidden}), ok, y.view(DType::kF32, {2, kHidden})});
}

void fused_case(const KernelUnderTest& k) {
  const Experts experts = make_experts(23, DType::kF32);
  auto kernel = create(k, experts);
  auto memory = k.memory();
  // Rows as they arrive (f32 payload), K = 2 slots each: some empty, one row with none.
  constexpr int K = 2;
  const std::int64_t rows = 6;
  const std::vector<float> x = random_rows(rows, 7);
  const std::vector<SlotMeta> meta = {{0, 0.5f},  {2, 0.25f}, {2, 1.0f},   {-1, 0.0f},
                                      {-1, 0.0f}, {-1, 0.0f}, {1, -0.75f}, {0, 0.125f},
                                      {0, 2.0f},  {1, 1.5f},  {-1, 3.0f},  {2, 0.5f}};
  const std::size_t row_bytes = payload_row_bytes(PayloadDType::kF32, kHidden);
  std::vector<std::byte> payload(static_cast<std::size_t>(rows) * row_bytes);
  for (std::int64_t r = 0; r < rows; ++r) {
    std::memcpy(payload.data() + static_cast<std::size_t>(r) * row_bytes, x.data() + r * kHidden,
                static_cast<std::size_t>(kHidden) * sizeof(float));
  }
  Mirror<std::byte> p(*memory, payload);
  Mirror<SlotMeta> m(*memory, meta);
  Mirror<float> partials(*memory, std::vector<float>(x.size(), std::nanf("")));
  WeightedRowsBatch batch;
  batch.rows = static_cast<const std::byte*>(p.device);
  batch.dtype = PayloadDType::kF32;
  batch.meta = static_cast<const SlotMeta*>(m.device);
  batch.num_rows = rows;
  batch.slots = K;
  batch.hidden = kHidden;
  batch.partial_dtype = DType::kF32;
  batch.partials = static_cast<std::byte*>(partials.device);
  if (!kernel->capabilities().fuses_weighted_rows) {
    ErrorCode code = ErrorCode::kOk;
    try {
      kernel->forward_weighted(batch, memory->stream());
    } catch (const Error& e) {
      code = e.code();
    }
    CHECK(code == ErrorCode::kUnavailable);
    return;
  }
  kernel->forward_weighted(batch, memory->stream());
  memory->stream().synchronize();
  std::vector<double> expected(x.size(), 0.0);
  for (std::int64_t r = 0; r < rows; ++r) {
    for (int j = 0; j < K; ++j) {
      const SlotMeta& s = meta[static_cast<std::size_t>(r * K + j)];
      if (s.local_expert < 0) continue;
      const auto out = expert_output(k.math, experts, s.local_expert, x.data() + r * kHidden);
      for (std::int64_t h = 0; h < kHidden; ++h)
        expected[static_cast<std::size_t>(r * kHidden + h)] +=
            s.weight * out[static_cast<std::size_t>(h)];
    }
  }
  CHECK(relative(partials.read(), expected) <= k.tolerance(DType::kF32));
  // A local expert outside the kernel's is refused.
  Mirror<SlotMeta> bad(*memory, std::vector<SlotMeta>(meta.size(), SlotMeta{kExperts, 1.0f}));
  batch.meta = static_cast<const SlotMeta*>(bad.device);
  ErrorCode code = ErrorCode::kOk;
  try {
    kernel->forward_weighted(batch, memory->stream());
    memory->stream().synchronize();
  } catch (const Error& e) {
    code = e.code();
  }
  CHECK(code == ErrorCode::kInvalidArgument);
}

void backward_case(const KernelUnderTest& k) {
  for (const DType dtype : dtypes_of(k)) {
    CAPTURE(dtype_name(dtype));
    const Experts experts = make_experts(24, dtype);
    auto kernel = create(k, experts);
    const ExpertKernelCapabilities caps = kernel->capabilities();
    auto memory = k.memory();
    const bool swiglu = k.math == ExpertMath::kSwiglu;
    const std::vector<float> x = random_rows(kN, 8), g = random_rows(kN, 9);
    std::vector<float> w(static_cast<std::size_t>(kN));
    for (std::int64_t r = 0; r < kN; ++r)
      w[static_cast<std::size_t>(r)] = 0.25f * static_cast<float>(r % 5) - 0.5f;
    Mirror<float> xs(*memory, x), gs(*memory, g), ws(*memory, w);
    Mirror<float> dx(*memory, std::vector<float>(x.size(), std::nanf("")));
    Mirror<float> dw(*memory, std::vector<float>(w.size(), std::nanf("")));
    // Weight gradients start at 0.25: the kernel adds to them.
    std::vector<Mirror<float>> grads;
    grads.reserve(kExperts * 3);
    std::vector<SwigluExpertGradients> views;
    if (swiglu) {
      for (int e = 0; e < kExperts; ++e) {
        for (int i = 0; i < 3; ++i)
          grads.emplace_back(*memory,
                             std::vector<float>(static_cast<std::size_t>(kFfn * kHidden), 0.25f));
        views.push_back({grads[grads.size() - 3].view(DType::kF32, {kFfn, kHidden}),
                         grads[grads.size() - 2].view(DType::kF32, {kFfn, kHidden}),
                         grads[grads.size() - 1].view(DType::kF32, {kHidden, kFfn})});
      }
    }
    ExpertGradientBatch batch{
        xs.view(DType::kF32, {kN, kHidden}), kRows, gs.view(DType::kF32, {kN, kHidden}),
        dx.view(DType::kF32, {kN, kHidden}), views, ws.view(DType::kF32, {kN}),
        dw.view(DType::kF32, {kN})};
    if (!caps.backward) {
      ErrorCode code = ErrorCode::kOk;
      try {
        kernel->backward(batch, memory->stream());
      } catch (const Error& e) {
        code = e.code();
      }
      CHECK(code == ErrorCode::kUnavailable);
      return;
    }
    kernel->backward(batch, memory->stream());
    memory->stream().synchronize();

    // The float64 gradients of L = Σ_r w_r <g_r, expert(x_r)>, derived by hand:
    // dL/dy_r = w_r g_r; d w_r = <g_r, y_r>; for SwiGLU with a = gate·x, b = up·x,
    // h = silu(a)·b: d down += (w g) hᵀ; dh = downᵀ (w g); da = dh · b · silu'(a);
    // db = dh · silu(a); d gate += da xᵀ; d up += db xᵀ; dx = gateᵀ da + upᵀ db.
    std::vector<double> e_dx(x.size(), 0.0), e_dw(w.size(), 0.0);
    std::vector<std::vector<double>> e_grads(static_cast<std::size_t>(swiglu ? 3 * kExperts : 0),
                                             std::vector<double>(kFfn * kHidden, 0.25));
    std::int64_t row = 0;
    for (int e = 0; e < kExperts; ++e) {
      for (std::int64_t i = 0; i < kRows[static_cast<std::size_t>(e)]; ++i, ++row) {
        const float* xr = x.data() + row * kHidden;
        const float* gr = g.data() + row * kHidden;
        const double wr = w[static_cast<std::size_t>(row)];
        Activations act;
        const auto y = expert_output(k.math, experts, e, xr, &act);
        double dot = 0;
        for (std::int64_t h = 0; h < kHidden; ++h) dot += gr[h] * y[static_cast<std::size_t>(h)];
        e_dw[static_cast<std::size_t>(row)] = dot;
        double* dxr = e_dx.data() + row * kHidden;
        if (!swiglu) {
          for (std::int64_t h = 0; h < kHidden; ++h) dxr[h] = wr * gr[h];
          continue;
        }
        const auto& m = experts.matrices[static_cast<std::size_t>(e)];
        auto& d_gate = e_grads[static_cast<std::size_t>(3 * e)];
        auto& d_up = e_grads[static_cast<std::size_t>(3 * e + 1)];
        auto& d_down = e_grads[static_cast<std::size_t>(3 * e + 2)];
        for (std::int64_t f = 0; f < kFfn; ++f) {
          const auto fk = static_cast<std::size_t>(f);
          double dh = 0;
          for (std::int64_t h = 0; h < kHidden; ++h) {
            const double gy = wr * gr[h];
            d_down[static_cast<std::size_t>(h * kFfn + f)] += gy * act.h[fk];
            dh += m[2].value[static_cast<std::size_t>(h * kFfn + f)] * gy;
          }
          const double a = act.a[fk], sig = 1 / (1 + std::exp(-a));
          const double da = dh * act.b[fk] * sig * (1 + a * (1 - sig));
          const double db = dh * a * sig;
          for (std::int64_t h = 0; h < kHidden; ++h) {
            const auto fh = static_cast<std::size_t>(f * kHidden + h);
            d_gate[fh] += da * xr[h];
            d_up[fh] += db * xr[h];
            dxr[h] += m[0].value[fh] * da + m[1].value[fh] * db;
          }
        }
      }
    }
    const double tolerance = k.tolerance(dtype);
    CHECK(relative(dx.read(), e_dx) <= tolerance);
    CHECK(relative(dw.read(), e_dw) <= tolerance);
    for (std::size_t i = 0; i < grads.size(); ++i) {
      CAPTURE(i);
      CHECK(relative(grads[i].read(), e_grads[i]) <= tolerance);
    }

    // From the forward's saved columns: the same bits as recomputed.
    if (caps.saved_columns > 0) {
      Mirror<float> y(*memory, std::vector<float>(x.size()));
      Mirror<float> saved(*memory,
                          std::vector<float>(static_cast<std::size_t>(kN * caps.saved_columns)));
      ExpertBatch forward{xs.view(DType::kF32, {kN, kHidden}), kRows,
                          y.view(DType::kF32, {kN, kHidden})};
      forward.saved = saved.view(DType::kF32, {kN, caps.saved_columns});
      kernel->forward(forward, memory->stream());
      const std::vector<float> recomputed_dx = dx.read(), recomputed_dw = dw.read();
      std::vector<std::vector<float>> recomputed;
      for (auto& grad : grads) {
        std::fill(grad.host.begin(), grad.host.end(), 0.25f);
        memory->to_device(grad.device, grad.host.data(), grad.host.size() * sizeof(float));
      }
      batch.saved = saved.view(DType::kF32, {kN, caps.saved_columns});
      kernel->backward(batch, memory->stream());
      memory->stream().synchronize();
      CHECK(dx.read() == recomputed_dx);
      CHECK(dw.read() == recomputed_dw);
      for (std::size_t i = 0; i < grads.size(); ++i) {
        CAPTURE(i);
        CHECK(relative(grads[i].read(), e_grads[i]) <= tolerance);
      }
    }
  }
}

}  // namespace

std::unique_ptr<KernelMemory> host_kernel_memory() { return std::make_unique<HostKernelMemory>(); }

void run_expert_kernel_suite(const KernelUnderTest& kernel) {
  CAPTURE(kernel.name);
  SUBCASE("grouped forward against float64, in every weight dtype") { forward_case(kernel); }
  SUBCASE("no rows, and bad batches refused") { empty_and_bad_batches_case(kernel); }
  SUBCASE("the fused form, or kUnavailable") { fused_case(kernel); }
  SUBCASE("backward against float64 gradients, saved or recomputed, or kUnavailable") {
    backward_case(kernel);
  }
}

std::function<std::shared_ptr<ExpertKernel>(const ExpertCreateArgs&)> plugin_kernel(
    const std::string& name, const std::string& settings) {
  return [name, settings](const ExpertCreateArgs& given) {
    static PluginRegistry registry(PluginRegistry::default_search_path());
    const Config config = Config::from_string("[experts]\n" + settings);
    const ConfigSection options =
        config.section("experts", registry.options(PluginKind::kExpert, name));
    ExpertCreateArgs args = given;
    args.options = &options;  // read when the kernel is created
    return registry.create_expert(name, args);
  };
}

}  // namespace switchyard::conformance
