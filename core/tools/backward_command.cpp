// `switchyard backward`: the model's forward on the [input] tokens, then its backward with
// dy from a file; writes dx and every layer's gate and expert gradients (rank 0).
#include <cstdio>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "commands.hpp"
#include "switchyard/checkpoint.hpp"
#include "switchyard/io.hpp"
#include "switchyard/runtime.hpp"

namespace switchyard::tool {
namespace {

constexpr const char* kBackwardUsage =
    "usage: switchyard backward CONFIG --grad-output DY.npy --out DIR [--set "
    "section.key=value]...\n"
    "  runs the model forward on the [input] tokens (its MoE layers in order), then\n"
    "  backward with dy = dL/dy of its output from DY.npy (float32 [T,H], the tokens' T),\n"
    "  and writes DIR/dx.npy (float32 [T,H]) and DIR/d_model.safetensors (float32: every\n"
    "  layer's gate and expert gradients under the checkpoint's tensor names); a one-layer\n"
    "  model also writes DIR/d_gate.npy (float32 [E,H]) and DIR/d_experts.safetensors.\n"
    "  One process per rank under a launcher; rank 0 writes.\n";

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
    std::vector<ModelGradients> gradients;
    runtime.set_training(true);  // keeps each layer's input, and its rows unless recompute
    runtime.forward_model(x.view(), y.view());
    runtime.backward_model(x.view(), dy.view(), dx.view(), gradients);
    runtime.gather_rows(dx.view());
    for (std::size_t l = 0; l < gradients.size(); ++l)
      runtime.gather_expert_gradients(gradients[l], static_cast<int>(l));
    if (runtime.world_rank(0) != 0) return kExitOk;

    const ConfigSection& options = runtime.settings().section("model");
    const CheckpointFormat format = options.get_string("format") == "mixtral"
                                        ? CheckpointFormat::kMixtral
                                        : CheckpointFormat::kDeepseek;
    // Named as the parameters they are the gradients of, so a reader pairs them by name.
    std::map<std::string, HostTensor> named;
    for (int l = 0; l < runtime.num_layers(); ++l) {
      const auto& g = gradients[static_cast<std::size_t>(l)];
      const std::string prefix = layer_prefix(options.get_string("prefix"),
                                              runtime.layer_ids()[static_cast<std::size_t>(l)]);
      named.emplace(prefix + "gate.weight", g.gate);
      for (std::size_t e = 0; e < g.experts.size(); ++e) {
        for (std::size_t w = 0; w < 3; ++w) {
          named.emplace(
              expert_tensor_name(format, prefix, static_cast<int>(e), static_cast<int>(w)),
              g.experts[e][w]);
        }
      }
      const ModelWeights& m = runtime.model(l);
      if (m.has_shared_expert()) {
        for (int w = 0; w < 3; ++w) {
          named.emplace(m.shared_expert_tensor_name(prefix, w),
                        g.shared_expert[static_cast<std::size_t>(w)]);
        }
        if (g.shared_expert_gate.size_bytes() != 0) {
          named.emplace(ModelWeights::shared_expert_gate_name(prefix), g.shared_expert_gate);
        }
      }
    }
    const std::filesystem::path dir(out_dir);
    std::filesystem::create_directories(dir);
    write_npy(dir / "dx.npy", dx.view());
    write_safetensors(dir / "d_model.safetensors", named);
    if (runtime.num_layers() == 1) {
      named.erase(layer_prefix(options.get_string("prefix"), runtime.layer_ids()[0]) +
                  "gate.weight");
      write_npy(dir / "d_gate.npy", gradients[0].gate.view());
      write_safetensors(dir / "d_experts.safetensors", named);
    }
    std::printf(
        "backward of %lld tokens (%s) through %d MoE layer%s on %d rank%s: wrote %s/dx.npy, "
        "d_model.safetensors%s\n",
        static_cast<long long>(T), description.c_str(), runtime.num_layers(),
        runtime.num_layers() == 1 ? "" : "s", runtime.world_size(),
        runtime.world_size() == 1 ? "" : "s", dir.string().c_str(),
        runtime.num_layers() == 1 ? ", d_gate.npy, d_experts.safetensors" : "");
    return kExitOk;
  });
}

}  // namespace switchyard::tool
