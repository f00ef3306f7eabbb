// `switchyard backward`: the layer's forward on the [input] tokens, then its backward with
// dy from a file; writes dx, the gate's gradient and the experts' gradients (rank 0).
#include <cstdio>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "commands.hpp"
#include "switchyard/io.hpp"
#include "switchyard/runtime.hpp"

namespace switchyard::tool {
namespace {

constexpr const char* kBackwardUsage =
    "usage: switchyard backward CONFIG --grad-output DY.npy --out DIR [--set "
    "section.key=value]...\n"
    "  runs the layer forward on the [input] tokens, then backward with dy = dL/dy from\n"
    "  DY.npy (float32 [T,H], the tokens' T), and writes DIR/dx.npy (float32 [T,H]),\n"
    "  DIR/d_gate.npy (float32 [E,H]) and DIR/d_experts.safetensors (float32, the\n"
    "  checkpoint's tensor names); one process per rank under a launcher, rank 0 writes\n";

}  // namespace

int backward_command(const std::vector<std::string>& args) {
  const auto line = parse_config_command_line(args, {"--grad-output", "--out"}, kBackwardUsage);
  if (!line) return kExitUsage;
  const std::string& dy_path = line->values[0];
  const std::string& out_dir = line->values[1];
  Runtime runtime(load_config(line->config_path, line->sets));
  return run_reporting_errors(runtime, [&] {
    const ModelWeights& model = runtime.model();
    const std::int64_t H = model.hidden();
    std::string description;
    const HostTensor x = read_input_tokens(runtime, description);
    const std::int64_t T = x.shape()[0];
    const HostTensor dy = read_npy_f32_matrix(dy_path, H, "--grad-output");
    if (dy.shape()[0] != T) {
      throw Error(ErrorCode::kInvalidArgument, "--grad-output " + dy_path + " has " +
                                                   std::to_string(dy.shape()[0]) +
                                                   " rows; the input has " + std::to_string(T) +
                                                   " tokens (" + description + ")");
    }
    HostTensor y(DType::kF32, {T, H}), dx(DType::kF32, {T, H});
    ModelGradients gradients;
    runtime.set_training(true);  // the forward keeps its rows unless [runtime] recompute
    runtime.forward(x.view(), y.view());
    runtime.backward(x.view(), dy.view(), dx.view(), gradients);
    runtime.gather_rows(dx.view());
    runtime.gather_expert_gradients(gradients);
    if (runtime.world_rank(0) != 0) return kExitOk;

    const ConfigSection& options = runtime.settings().section("model");
    const CheckpointFormat format = options.get_string("format") == "mixtral"
                                        ? CheckpointFormat::kMixtral
                                        : CheckpointFormat::kDeepseek;
    const std::string& prefix = options.get_string("prefix");
    std::map<std::string, HostTensor> experts;
    for (std::size_t e = 0; e < gradients.experts.size(); ++e) {
      for (std::size_t w = 0; w < 3; ++w) {
        experts.emplace(
            expert_tensor_name(format, prefix, static_cast<int>(e), static_cast<int>(w)),
            gradients.experts[e][w]);
      }
    }
    const std::filesystem::path dir(out_dir);
    std::filesystem::create_directories(dir);
    write_npy(dir / "dx.npy", dx.view());
    write_npy(dir / "d_gate.npy", gradients.gate.view());
    write_safetensors(dir / "d_experts.safetensors", experts);
    std::printf(
        "backward of %lld tokens (%s) on %d rank%s: wrote %s/dx.npy, d_gate.npy, "
        "d_experts.safetensors\n",
        static_cast<long long>(T), description.c_str(), runtime.world_size(),
        runtime.world_size() == 1 ? "" : "s", dir.string().c_str());
    return kExitOk;
  });
}

}  // namespace switchyard::tool
