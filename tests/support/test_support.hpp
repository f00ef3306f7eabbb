#pragma once
// Helpers shared by the tests: temporary folders, checkpoints written in both naming
// conventions, the dense comparison, and running the `switchyard` tool.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "switchyard/model.hpp"
#include "switchyard/status.hpp"
#include "switchyard/tensor.hpp"

namespace switchyard::test {

/// A fresh folder under the system temp dir, removed on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

/// The `Error` that `f` throws; an error with code kOk and message "no error" if none.
Error error_of(const std::function<void()>& f);
/// The message of the `Error` that `f` throws, or "no error".
std::string error_message(const std::function<void()>& f);

/// Runs fn(i) for i in 0..n-1, each on its own thread, and waits; returns the `Error`
/// each one threw, if any.
std::vector<std::optional<Error>> on_threads(int n, const std::function<void(int)>& fn);

/// Writes `text` to `path`.
void write_text(const std::filesystem::path& path, const std::string& text);

/// Tensors of `model` named as in a checkpoint of `format` ("mixtral" or "deepseek"),
/// stored as `dtype` (kF32, kBF16 or kF16). `bias` (deepseek only) adds
/// gate.e_score_correction_bias.
std::map<std::string, HostTensor> checkpoint_tensors(const ModelWeights& model,
                                                     const std::string& format, DType dtype,
                                                     const std::string& prefix,
                                                     const std::vector<float>& bias = {});

/// Largest |a-b| over all elements divided by the largest |b| (or 1 if b is all zero).
double relative_difference(const HostTensor& a, const HostTensor& b);

/// d f / d v[i] by central differences with one Richardson step (error O(h^4)), steps
/// h/2 and h; v[i] is restored.
double central_difference(std::vector<double>& v, std::size_t i, const std::function<double()>& f,
                          double h = 1e-3);

/// max |got - expected| / max |expected| over the pairs added: how gradients agree.
struct Agreement {
  double diff = 0, scale = 0;
  void add(double got, double expected) {
    diff = std::max(diff, std::abs(got - expected));
    scale = std::max(scale, std::abs(expected));
  }
  double relative() const { return diff / scale; }
};

/// Skewed routing for the bias-balancing tests: writes `dir/skewed.safetensors`, a
/// DeepSeek-format layer (E = 8, H = 24, F = 16) whose gate adds +2.0 to the logits of
/// experts 0-2 through feature 0, and returns `tokens` synthetic tokens with feature 0
/// set to 1.
HostTensor write_skewed_routing_case(const std::filesystem::path& dir, std::int64_t tokens);

/// Result of running a command.
struct CommandResult {
  int exit_code = -1;
  std::string output;  ///< stdout and stderr together
};
/// Runs `command` through the shell, capturing stdout and stderr.
CommandResult run_command(const std::string& command);
/// Runs the `switchyard` tool with `arguments` (already shell-quoted where needed).
CommandResult run_tool(const std::string& arguments);

}  // namespace switchyard::test
