#include "switchyard/model.hpp"

#include <cmath>

#include "switchyard/checkpoint.hpp"
#include "switchyard/io.hpp"
#include "switchyard/status.hpp"

namespace switchyard {
namespace {

/// splitmix64: a tiny generator whose output is the same on every platform.
class SplitMix64 {
 public:
  explicit SplitMix64(std::uint64_t seed) : state_(seed) {}
  std::uint64_t next() {
    std::uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  /// Uniform in [-1, 1).
  float symmetric() {
    return static_cast<float>(static_cast<double>(next() >> 40) / static_cast<double>(1ULL << 23) -
                              1.0);
  }

 private:
  std::uint64_t state_;
};

/// A random [rows, cols] matrix in `dtype` (f32 or bf16: the f32 draw rounded).
HostTensor random_matrix(SplitMix64& rng, std::int64_t rows, std::int64_t cols,
                         DType dtype = DType::kF32) {
  HostTensor t(dtype, {rows, cols});
  const float scale = 1.0f / std::sqrt(static_cast<float>(cols));
  for (std::int64_t i = 0; i < rows * cols; ++i) {
    const float value = rng.symmetric() * scale;
    if (dtype == DType::kBF16) {
      t.data<std::uint16_t>()[i] = float_to_bf16(value);
    } else {
      t.data<float>()[i] = value;
    }
  }
  return t;
}

/// A view of `t`, or an empty view when it holds nothing (an absent optional tensor).
TensorView optional_view(const HostTensor& t) {
  return t.size_bytes() == 0 ? TensorView{} : t.view();
}

std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i != 0) s += ',';
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

}  // namespace

ModelWeights ModelWeights::random(int num_experts, int hidden, int ffn_hidden, std::uint64_t seed,
                                  DType expert_dtype) {
  if (num_experts < 1 || hidden < 1 || ffn_hidden < 1) {
    throw Error(ErrorCode::kInvalidArgument,
                "model: num_experts, hidden and ffn_hidden must be >= 1");
  }
  if (expert_dtype != DType::kF32 && expert_dtype != DType::kBF16) {
    throw Error(ErrorCode::kInvalidArgument, "model: random expert weights are f32 or bf16, not " +
                                                 std::string(dtype_name(expert_dtype)));
  }
  ModelWeights m;
  m.num_experts_ = num_experts;
  m.hidden_ = hidden;
  m.ffn_hidden_ = ffn_hidden;
  SplitMix64 rng(seed);
  m.gate_ = random_matrix(rng, num_experts, hidden);
  for (int e = 0; e < num_experts; ++e) {
    m.gate_proj_.push_back(random_matrix(rng, ffn_hidden, hidden, expert_dtype));
    m.up_proj_.push_back(random_matrix(rng, ffn_hidden, hidden, expert_dtype));
    m.down_proj_.push_back(random_matrix(rng, hidden, ffn_hidden, expert_dtype));
  }
  m.description_ = "random (seed " + std::to_string(seed) +
                   (expert_dtype == DType::kBF16 ? ", bf16 experts)" : ")");
  return m;
}

ModelWeights ModelWeights::load(const std::filesystem::path& path, CheckpointFormat format,
                                const std::string& prefix) {
  Checkpoint checkpoint(path);
  return load(checkpoint, format, prefix);
}

ModelWeights ModelWeights::load(Checkpoint& file, CheckpointFormat format,
                                const std::string& prefix) {
  const std::filesystem::path& path = file.path();
  // Checks a tensor's shape; returns it widened to f32 (`widen`) or in its own dtype.
  auto require_shape = [&](const std::string& name, std::vector<std::int64_t> expected,
                           bool widen = true) {
    if (!file.contains(name)) {
      throw Error(ErrorCode::kNotFound,
                  path.string() + ": tensor " + name + " not found (format " +
                      (format == CheckpointFormat::kMixtral ? "mixtral" : "deepseek") +
                      ", prefix \"" + prefix + "\")");
    }
    const SafetensorsEntry& entry = file.entry(name);
    bool ok = entry.shape.size() == expected.size();
    for (std::size_t i = 0; ok && i < expected.size(); ++i) {
      ok = expected[i] < 0 || expected[i] == entry.shape[i];
    }
    if (!ok) {
      throw Error(ErrorCode::kInvalidArgument, path.string() + ": tensor " + name + " has shape " +
                                                   shape_text(entry.shape) + ", expected " +
                                                   shape_text(expected));
    }
    if (widen) return file.read_f32(name);
    HostTensor raw = file.read(name);
    if (raw.dtype() != DType::kF32 && raw.dtype() != DType::kBF16 && raw.dtype() != DType::kF16 &&
        raw.dtype() != DType::kF8E4M3) {
      throw Error(ErrorCode::kInvalidArgument, path.string() + ": tensor " + name + " has dtype " +
                                                   std::string(dtype_name(raw.dtype())) +
                                                   "; weights must be F32, BF16, F16 or F8_E4M3");
    }
    return raw;
  };

  // An expert matrix in its stored dtype, and for FP8 its block scales (else empty).
  auto expert_matrix = [&](const std::string& name, std::int64_t rows, std::int64_t cols) {
    std::pair<HostTensor, HostTensor> out;
    out.first = require_shape(name, {rows, cols}, false);
    if (out.first.dtype() == DType::kF8E4M3) {
      const std::string scale =
          name.substr(0, name.size() - std::string("weight").size()) + "weight_scale_inv";
      if (!file.contains(scale)) {
        throw Error(ErrorCode::kNotFound, path.string() + ": tensor " + name +
                                              " is F8_E4M3 but its block scales " + scale +
                                              " are not in the checkpoint");
      }
      out.second = require_shape(scale, {weight_scale_blocks(rows), weight_scale_blocks(cols)});
    }
    return out;
  };

  const bool mixtral = format == CheckpointFormat::kMixtral;
  auto expert_tensor = [&](int e, int which) {
    return expert_tensor_name(format, prefix, e, which);
  };

  ModelWeights m;
  m.gate_ = require_shape(prefix + "gate.weight", {-1, -1});
  m.num_experts_ = static_cast<int>(m.gate_.shape()[0]);
  m.hidden_ = static_cast<int>(m.gate_.shape()[1]);
  if (m.num_experts_ < 1 || m.hidden_ < 1) {
    throw Error(ErrorCode::kInvalidArgument,
                path.string() + ": tensor " + prefix + "gate.weight is empty");
  }
  // Expert weights stay in the checkpoint's dtype, read one tensor at a time: loading holds
  // no copy beyond the tensor being read.
  if (!file.contains(expert_tensor(0, 0)) || file.entry(expert_tensor(0, 0)).shape.size() != 2) {
    require_shape(expert_tensor(0, 0), {-1, m.hidden_}, false);  // throws the message
  }
  m.ffn_hidden_ = static_cast<int>(file.entry(expert_tensor(0, 0)).shape[0]);
  const std::int64_t E = m.num_experts_, H = m.hidden_, F = m.ffn_hidden_;
  for (int e = 0; e < E; ++e) {
    std::vector<HostTensor>* into[3][2] = {{&m.gate_proj_, &m.gate_scale_},
                                           {&m.up_proj_, &m.up_scale_},
                                           {&m.down_proj_, &m.down_scale_}};
    for (int which = 0; which < 3; ++which) {
      auto [weight, scale] =
          expert_matrix(expert_tensor(e, which), which == 2 ? H : F, which == 2 ? F : H);
      into[which][0]->push_back(std::move(weight));
      into[which][1]->push_back(std::move(scale));
    }
  }
  const std::string bias_name = prefix + "gate.e_score_correction_bias";
  if (!mixtral && file.contains(bias_name)) {
    HostTensor bias = require_shape(bias_name, {E});
    m.bias_.assign(bias.data<float>(), bias.data<float>() + E);
  }
  // A shared expert, in DeepSeek's or Qwen2-MoE's naming, when the checkpoint has one.
  for (const std::string& shared : {prefix + "shared_experts.", prefix + "shared_expert."}) {
    if (mixtral || !file.contains(shared + "gate_proj.weight")) continue;
    const SafetensorsEntry& first = file.entry(shared + "gate_proj.weight");
    if (first.shape.size() != 2) require_shape(shared + "gate_proj.weight", {-1, H}, false);
    const std::int64_t Fs = first.shape[0];
    m.shared_ffn_hidden_ = static_cast<int>(Fs);
    m.shared_naming_ = shared.substr(prefix.size());
    static constexpr const char* kNames[3] = {"gate_proj", "up_proj", "down_proj"};
    for (int which = 0; which < 3; ++which) {
      auto [weight, scale] = expert_matrix(shared + kNames[which] + ".weight", which == 2 ? H : Fs,
                                           which == 2 ? Fs : H);
      m.shared_.push_back(std::move(weight));
      m.shared_scales_.push_back(std::move(scale));
    }
    if (file.contains(prefix + "shared_expert_gate.weight")) {
      m.shared_gate_ = require_shape(prefix + "shared_expert_gate.weight", {1, H});
    }
    break;
  }
  m.description_ = std::string(mixtral ? "mixtral" : "deepseek") + " checkpoint " +
                   file.description() + (prefix.empty() ? "" : ", prefix " + prefix);
  return m;
}

std::string expert_tensor_name(CheckpointFormat format, const std::string& prefix, int expert,
                               int which) {
  static constexpr const char* kMixtral[3] = {"w1", "w3", "w2"};
  static constexpr const char* kDeepseek[3] = {"gate_proj", "up_proj", "down_proj"};
  if (which < 0 || which > 2) {
    throw Error(
        ErrorCode::kInvalidArgument,
        "expert_tensor_name: which is 0, 1 or 2 (gate, up, down), not " + std::to_string(which));
  }
  const char* name = (format == CheckpointFormat::kMixtral ? kMixtral : kDeepseek)[which];
  return prefix + "experts." + std::to_string(expert) + "." + name + ".weight";
}

HostTensor synthetic_tokens(std::int64_t num_tokens, int hidden, std::uint64_t seed) {
  HostTensor t(DType::kF32, {num_tokens, hidden});
  SplitMix64 rng(seed);
  float* p = t.data<float>();
  for (std::int64_t i = 0; i < t.numel(); ++i) p[i] = rng.symmetric();
  return t;
}

std::vector<SwigluExpertWeights> ModelWeights::experts(int first, int count) const {
  if (first < 0 || count < 0 || first + count > num_experts_) {
    throw Error(ErrorCode::kInvalidArgument,
                "model: experts [" + std::to_string(first) + ", " + std::to_string(first + count) +
                    ") out of range for " + std::to_string(num_experts_) + " experts");
  }
  std::vector<SwigluExpertWeights> out;
  for (int e = first; e < first + count; ++e) {
    const auto i = static_cast<std::size_t>(e);
    SwigluExpertWeights w{gate_proj_[i].view(), up_proj_[i].view(), down_proj_[i].view()};
    if (i < gate_scale_.size()) {
      w.gate_scale = optional_view(gate_scale_[i]);
      w.up_scale = optional_view(up_scale_[i]);
      w.down_scale = optional_view(down_scale_[i]);
    }
    out.push_back(w);
  }
  return out;
}

SharedExpertWeights ModelWeights::shared_expert() const {
  if (shared_.empty()) {
    throw Error(ErrorCode::kInvalidArgument, "model: this layer has no shared expert");
  }
  SharedExpertWeights s;
  s.weights = {shared_[0].view(), shared_[1].view(), shared_[2].view()};
  s.weights.gate_scale = optional_view(shared_scales_[0]);
  s.weights.up_scale = optional_view(shared_scales_[1]);
  s.weights.down_scale = optional_view(shared_scales_[2]);
  s.gate = optional_view(shared_gate_);
  return s;
}

std::string ModelWeights::shared_expert_tensor_name(const std::string& prefix, int which) const {
  static constexpr const char* kNames[3] = {"gate_proj", "up_proj", "down_proj"};
  if (shared_.empty() || which < 0 || which > 2) {
    throw Error(ErrorCode::kInvalidArgument,
                "model: no shared expert matrix " + std::to_string(which) + " in this layer");
  }
  return prefix + shared_naming_ + kNames[which] + ".weight";
}

std::size_t ModelWeights::weight_bytes() const noexcept {
  std::size_t bytes = gate_.size_bytes() + bias_.size() * sizeof(float) + shared_gate_.size_bytes();
  for (const auto* list : {&gate_proj_, &up_proj_, &down_proj_, &gate_scale_, &up_scale_,
                           &down_scale_, &shared_, &shared_scales_}) {
    for (const HostTensor& t : *list) bytes += t.size_bytes();
  }
  return bytes;
}

}  // namespace switchyard
