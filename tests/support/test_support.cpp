#include "test_support.hpp"

#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <thread>

#include "switchyard/io.hpp"
#include "switchyard/status.hpp"

namespace switchyard::test {

TempDir::TempDir() {
  std::string pattern =
      (std::filesystem::temp_directory_path() / "switchyard-test-XXXXXX").string();
  if (mkdtemp(pattern.data()) == nullptr) throw Error(ErrorCode::kSystem, "mkdtemp failed");
  path_ = pattern;
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

Error error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e;
  }
  return Error(ErrorCode::kOk, "no error");
}

std::string error_message(const std::function<void()>& f) { return error_of(f).message(); }

std::vector<std::optional<Error>> on_threads(int n, const std::function<void(int)>& fn) {
  std::vector<std::optional<Error>> errors(static_cast<std::size_t>(n));
  std::vector<std::thread> threads;
  for (int i = 0; i < n; ++i) {
    threads.emplace_back([&, i] {
      try {
        fn(i);
      } catch (const Error& e) {
        errors[static_cast<std::size_t>(i)] = e;
      }
    });
  }
  for (auto& t : threads) t.join();
  return errors;
}

void write_text(const std::filesystem::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
}

namespace {
HostTensor convert(const TensorView& v, DType dtype) {
  std::vector<std::int64_t> shape(v.shape().begin(), v.shape().end());
  HostTensor out(dtype, shape);
  const float* src = v.data_as<const float>();
  const auto n = static_cast<std::size_t>(v.numel());
  if (dtype == DType::kF32) {
    std::copy(src, src + n, out.data<float>());
  } else if (dtype == DType::kBF16) {
    for (std::size_t i = 0; i < n; ++i) out.data<std::uint16_t>()[i] = float_to_bf16(src[i]);
  } else {
    throw Error(ErrorCode::kInvalidArgument, "checkpoint_tensors: f32 or bf16 only");
  }
  return out;
}
}  // namespace

std::map<std::string, HostTensor> checkpoint_tensors(const ModelWeights& model,
                                                     const std::string& format, DType dtype,
                                                     const std::string& prefix,
                                                     const std::vector<float>& bias) {
  const bool mixtral = format == "mixtral";
  std::map<std::string, HostTensor> tensors;
  tensors[prefix + "gate.weight"] = convert(model.gate().view(), dtype);
  const auto experts = model.experts(0, model.num_experts());
  for (std::size_t e = 0; e < experts.size(); ++e) {
    const std::string base = prefix + "experts." + std::to_string(e) + ".";
    tensors[base + (mixtral ? "w1" : "gate_proj") + ".weight"] = convert(experts[e].gate, dtype);
    tensors[base + (mixtral ? "w3" : "up_proj") + ".weight"] = convert(experts[e].up, dtype);
    tensors[base + (mixtral ? "w2" : "down_proj") + ".weight"] = convert(experts[e].down, dtype);
  }
  if (!bias.empty()) {
    HostTensor b(DType::kF32, {static_cast<std::int64_t>(bias.size())});
    std::copy(bias.begin(), bias.end(), b.data<float>());
    tensors[prefix + "gate.e_score_correction_bias"] = std::move(b);
  }
  return tensors;
}

double relative_difference(const HostTensor& a, const HostTensor& b) {
  double diff = 0, scale = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i) {
    const double d = std::fabs(static_cast<double>(a.data<float>()[i]) - b.data<float>()[i]);
    diff = std::isnan(d) ? INFINITY : std::max(diff, d);
    scale = std::max(scale, std::fabs(static_cast<double>(b.data<float>()[i])));
  }
  return diff / (scale > 0 ? scale : 1.0);
}

CommandResult run_command(const std::string& command) {
  CommandResult result;
  FILE* pipe = popen((command + " 2>&1").c_str(), "r");
  if (pipe == nullptr) return result;
  std::array<char, 4096> buffer;
  std::size_t n;
  while ((n = fread(buffer.data(), 1, buffer.size(), pipe)) > 0)
    result.output.append(buffer.data(), n);
  const int status = pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return result;
}

CommandResult run_tool(const std::string& arguments) {
  return run_command(std::string(SWITCHYARD_TOOL_PATH) + " " + arguments);
}

HostTensor write_skewed_routing_case(const std::filesystem::path& dir, std::int64_t tokens) {
  const int E = 8, H = 24;
  auto tensors = checkpoint_tensors(ModelWeights::random(E, H, 16, 5), "deepseek", DType::kF32, "");
  float* gate = tensors["gate.weight"].data<float>();
  for (int e = 0; e < E; ++e) gate[e * H] = e < 3 ? 2.0f : 0.0f;
  write_safetensors(dir / "skewed.safetensors", tensors);
  HostTensor x = synthetic_tokens(tokens, H, 3);
  for (std::int64_t t = 0; t < tokens; ++t) x.data<float>()[t * H] = 1.0f;
  return x;
}

double central_difference(std::vector<double>& v, std::size_t i, const std::function<double()>& f,
                          double h) {
  auto central = [&](double step) {
    const double saved = v[i];
    v[i] = saved + step;
    const double up = f();
    v[i] = saved - step;
    const double down = f();
    v[i] = saved;
    return (up - down) / (2 * step);
  };
  return (4 * central(h / 2) - central(h)) / 3;
}

}  // namespace switchyard::test
