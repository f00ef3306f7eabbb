// The C API (switchyard/switchyard.h) over the C++ runtime. Every entry point catches
// everything: a C++ exception never crosses into C; it becomes a status and this thread's
// last-error message.
// The entry points are this library's only exports (it is built with hidden visibility).
#define SWITCHYARD_C_EXPORT __attribute__((visibility("default")))
#include "switchyard/switchyard.h"

#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "switchyard/dlpack.hpp"
#include "switchyard/layer.hpp"
#include "switchyard/plugin.hpp"
#include "switchyard/runtime.hpp"
#include "switchyard/status.hpp"
#include "switchyard/version.hpp"

static_assert(static_cast<int>(switchyard::ErrorCode::kInternal) == SWITCHYARD_INTERNAL,
              "the C status codes mirror ErrorCode");

struct switchyard_runtime {
  std::unique_ptr<switchyard::Runtime> runtime;
  switchyard::ModelGradients gradients;  // of the last switchyard_backward
  bool has_gradients = false;
  // What switchyard_gradient and switchyard_parameter views point to: per tensor
  // (gate, then gate, up, down of each expert), its shape and strides.
  std::vector<switchyard::DLTensorShape> gradient_shapes, parameter_shapes;
  switchyard::Config config;  // as created: the plugin listing searches the same folders
  std::unique_ptr<switchyard::PluginRegistry> plugins;  // filled by switchyard_plugin_count
  std::vector<std::string> plugin_strings;              // what switchyard_plugin_get points to
};

struct switchyard_dispatch_handle {
  switchyard_runtime* runtime = nullptr;
  switchyard::ProcessDispatch dispatched;
  std::vector<switchyard::DLTensorShape> shapes;  // per part: expert input, expert output
};

namespace {

thread_local std::string last_error;

/// Runs `body`; an exception becomes its status, with its message kept for this thread.
template <typename Body>
switchyard_status guarded(Body&& body) noexcept {
  try {
    last_error.clear();
    body();
    return SWITCHYARD_OK;
  } catch (...) {
    const switchyard::Status status = switchyard::Status::from_current_exception();
    try {
      last_error = status.message;
    } catch (...) {
      last_error.clear();  // no memory for the words; the code still says what kind
    }
    return static_cast<switchyard_status>(status.code);
  }
}

void require(bool condition, const char* what) {
  if (!condition) throw switchyard::Error(switchyard::ErrorCode::kInvalidArgument, what);
}

switchyard::Config with_overrides(switchyard::Config config, const char* const* overrides,
                                  size_t n) {
  require(n == 0 || overrides != nullptr, "overrides is NULL but n_overrides is not 0");
  for (size_t i = 0; i < n; ++i) {
    require(overrides[i] != nullptr, "an override is NULL");
    config.set_from_command_line(overrides[i]);
  }
  return config;
}

switchyard_runtime* make_runtime(switchyard::Config config) {
  auto handle = std::make_unique<switchyard_runtime>();
  handle->runtime = std::make_unique<switchyard::Runtime>(config);
  handle->config = std::move(config);
  return handle.release();
}

/// A float32 host matrix [T,H] from a DLTensor, named `what` in errors.
switchyard::TensorView matrix(const DLTensor* t, const char* what, std::int64_t hidden) {
  require(t != nullptr, "a tensor argument is NULL");
  switchyard::TensorView view = switchyard::from_dlpack(*t);
  view.require(what, switchyard::DType::kF32, {-1, hidden});
  return view;
}

/// A float32 matrix [T,H] from a DLTensor in host memory or on the device of `runtime`'s
/// data path (the runtime's forward checks which), named `what` in errors.
switchyard::TensorView matrix_on_any_device(const DLTensor* t, const char* what,
                                            std::int64_t hidden) {
  require(t != nullptr, "a tensor argument is NULL");
  switchyard::TensorView view = switchyard::from_dlpack(*t);
  view.require_on(view.device(), what, switchyard::DType::kF32, {-1, hidden});
  return view;
}

/// The index of `which` of `expert` among the model's tensors (gate, then gate, up, down
/// of each expert), checked.
std::size_t tensor_index(const switchyard_runtime* runtime, int which, int expert) {
  require(runtime != nullptr, "runtime must not be NULL");
  if (which == SWITCHYARD_TENSOR_GATE) return 0;
  require(which == SWITCHYARD_TENSOR_EXPERT_GATE || which == SWITCHYARD_TENSOR_EXPERT_UP ||
              which == SWITCHYARD_TENSOR_EXPERT_DOWN,
          "which: not a switchyard_tensor");
  const int experts = runtime->runtime->model().num_experts();
  if (expert < 0 || expert >= experts) {
    throw switchyard::Error(switchyard::ErrorCode::kInvalidArgument,
                            "expert " + std::to_string(expert) + " out of range for " +
                                std::to_string(experts) + " experts");
  }
  return 1 + 3 * static_cast<std::size_t>(expert) + static_cast<std::size_t>(which) - 1;
}

[[noreturn]] void not_held(int expert) {
  throw switchyard::Error(
      switchyard::ErrorCode::kNotFound,
      "expert " + std::to_string(expert) + " is held by no rank of this process");
}

}  // namespace

extern "C" {

const char* switchyard_version(void) { return switchyard::core_version(); }

int switchyard_api_version(void) { return SWITCHYARD_C_API_VERSION; }

const char* switchyard_last_error(void) { return last_error.c_str(); }

const char* switchyard_status_name(switchyard_status status) {
  if (status < SWITCHYARD_OK || status > SWITCHYARD_INTERNAL) return "unknown status";
  return switchyard::error_code_name(static_cast<switchyard::ErrorCode>(status)).data();
}

switchyard_status switchyard_runtime_create_from_file(const char* path,
                                                      const char* const* overrides,
                                                      size_t n_overrides,
                                                      switchyard_runtime** out) {
  if (out != nullptr) *out = nullptr;
  return guarded([&] {
    require(path != nullptr && out != nullptr, "path and out must not be NULL");
    *out =
        make_runtime(with_overrides(switchyard::Config::from_file(path), overrides, n_overrides));
  });
}

switchyard_status switchyard_runtime_create_from_string(const char* toml, const char* source_name,
                                                        const char* const* overrides,
                                                        size_t n_overrides,
                                                        switchyard_runtime** out) {
  if (out != nullptr) *out = nullptr;
  return guarded([&] {
    require(toml != nullptr && out != nullptr, "toml and out must not be NULL");
    *out = make_runtime(with_overrides(
        switchyard::Config::from_string(toml, source_name != nullptr ? source_name : "<string>"),
        overrides, n_overrides));
  });
}

void switchyard_runtime_destroy(switchyard_runtime* runtime) {
  // Destructors of the runtime do not throw; a stray exception still must not reach C.
  try {
    delete runtime;
  } catch (...) {
  }
}

switchyard_status switchyard_runtime_world_size(const switchyard_runtime* runtime, int* out) {
  return guarded([&] {
    require(runtime != nullptr && out != nullptr, "runtime and out must not be NULL");
    *out = runtime->runtime->world_size();
  });
}

switchyard_status switchyard_runtime_hidden(const switchyard_runtime* runtime, int64_t* out) {
  return guarded([&] {
    require(runtime != nullptr && out != nullptr, "runtime and out must not be NULL");
    *out = runtime->runtime->model().hidden();
  });
}

switchyard_status switchyard_runtime_num_experts(const switchyard_runtime* runtime, int* out) {
  return guarded([&] {
    require(runtime != nullptr && out != nullptr, "runtime and out must not be NULL");
    *out = runtime->runtime->model().num_experts();
  });
}

switchyard_status switchyard_forward(switchyard_runtime* runtime, const DLTensor* x, DLTensor* y) {
  return switchyard_forward_layer(runtime, 0, x, y);
}

switchyard_status switchyard_forward_layer(switchyard_runtime* runtime, int layer,
                                           const DLTensor* x, DLTensor* y) {
  return guarded([&] {
    require(runtime != nullptr, "runtime must not be NULL");
    const std::int64_t H = runtime->runtime->model().hidden();
    const switchyard::TensorView in = matrix_on_any_device(x, "input x", H);
    const switchyard::TensorView out = matrix_on_any_device(y, "output y", H);
    runtime->runtime->forward_local_tokens(in, out, layer);
  });
}

switchyard_status switchyard_forward_with_ids(switchyard_runtime* runtime, int layer,
                                              const DLTensor* x, const DLTensor* token_ids,
                                              DLTensor* y) {
  return guarded([&] {
    require(runtime != nullptr && token_ids != nullptr, "runtime and token_ids must not be NULL");
    const std::int64_t H = runtime->runtime->model().hidden();
    const switchyard::TensorView in = matrix_on_any_device(x, "input x", H);
    const switchyard::TensorView out = matrix_on_any_device(y, "output y", H);
    runtime->runtime->set_token_ids(switchyard::from_dlpack(*token_ids));
    runtime->runtime->forward_local_tokens(in, out, layer);
  });
}

switchyard_status switchyard_forward_on_stream(switchyard_runtime* runtime, int layer,
                                               const DLTensor* x, DLTensor* y, void* stream) {
  return guarded([&] {
    require(runtime != nullptr, "runtime must not be NULL");
    const std::int64_t H = runtime->runtime->model().hidden();
    const switchyard::TensorView in = matrix_on_any_device(x, "input x", H);
    const switchyard::TensorView out = matrix_on_any_device(y, "output y", H);
    runtime->runtime->forward_local_tokens_on_stream(in, out, stream, layer);
  });
}

switchyard_status switchyard_rebalance(switchyard_runtime* runtime,
                                       switchyard_rebalance_report* reports, size_t capacity,
                                       size_t* count) {
  return guarded([&] {
    require(runtime != nullptr && count != nullptr, "runtime and count must not be NULL");
    require(reports != nullptr || capacity == 0, "reports must not be NULL when capacity > 0");
    const std::vector<switchyard::RebalanceReport> done = runtime->runtime->rebalance();
    *count = done.size();
    for (std::size_t i = 0; i < done.size() && i < capacity; ++i) {
      reports[i] = {done[i].layer,
                    done[i].slots,
                    done[i].imbalance_before,
                    done[i].imbalance_planned,
                    done[i].moved_experts,
                    done[i].received_bytes};
    }
  });
}

switchyard_status switchyard_finish_worst_case_steps(switchyard_runtime* runtime) {
  return guarded([&] {
    require(runtime != nullptr, "runtime must not be NULL");
    runtime->runtime->finish_worst_case_steps();
  });
}

switchyard_status switchyard_runtime_num_layers(const switchyard_runtime* runtime, int* out) {
  return guarded([&] {
    require(runtime != nullptr && out != nullptr, "runtime and out must not be NULL");
    *out = runtime->runtime->num_layers();
  });
}

switchyard_status switchyard_reference_forward(const switchyard_runtime* runtime, const DLTensor* x,
                                               DLTensor* y) {
  return guarded([&] {
    require(runtime != nullptr, "runtime must not be NULL");
    const std::int64_t H = runtime->runtime->model().hidden();
    runtime->runtime->reference_forward(matrix(x, "input x", H), matrix(y, "output y", H));
  });
}

switchyard_status switchyard_route(switchyard_runtime* runtime, const DLTensor* x,
                                   DLTensor* experts, DLTensor* weights) {
  return guarded([&] {
    require(runtime != nullptr && experts != nullptr && weights != nullptr,
            "runtime, experts and weights must not be NULL");
    switchyard::MoELayer& layer = runtime->runtime->layer(0);
    const switchyard::TensorView tokens = matrix(x, "input x", runtime->runtime->model().hidden());
    switchyard::RoutingPlan plan;
    layer.route(tokens, plan);
    require(plan.device().kind == switchyard::Device::Kind::kHost,
            "switchyard_route needs the host data path ([runtime] data_path = \"host\")");
    const std::int64_t T = plan.num_tokens, K = plan.slots;
    switchyard::TensorView out_experts = switchyard::from_dlpack(*experts);
    switchyard::TensorView out_weights = switchyard::from_dlpack(*weights);
    out_experts.require("experts", switchyard::DType::kI32, {T, K});
    out_weights.require("weights", switchyard::DType::kF32, {T, K});
    // The caller's tensors may be strided (a column slice of a larger array).
    auto* e = out_experts.data_as<std::int32_t>();
    auto* w = out_weights.data_as<float>();
    for (std::int64_t t = 0; t < T; ++t) {
      for (std::int64_t k = 0; k < K; ++k) {
        e[t * out_experts.stride(0) + k * out_experts.stride(1)] = plan.experts.data()[t * K + k];
        w[t * out_weights.stride(0) + k * out_weights.stride(1)] = plan.weights.data()[t * K + k];
      }
    }
  });
}

switchyard_status switchyard_dispatch_handle_create(switchyard_runtime* runtime,
                                                    switchyard_dispatch_handle** out) {
  if (out != nullptr) *out = nullptr;
  return guarded([&] {
    require(runtime != nullptr && out != nullptr, "runtime and out must not be NULL");
    auto handle = std::make_unique<switchyard_dispatch_handle>();
    handle->runtime = runtime;
    *out = handle.release();
  });
}

void switchyard_dispatch_handle_destroy(switchyard_dispatch_handle* handle) {
  try {
    delete handle;
  } catch (...) {
  }
}

switchyard_status switchyard_dispatch(switchyard_dispatch_handle* handle, const DLTensor* x,
                                      const DLTensor* experts, const DLTensor* weights) {
  return guarded([&] {
    require(handle != nullptr && experts != nullptr && weights != nullptr,
            "handle, experts and weights must not be NULL");
    switchyard::Runtime& runtime = *handle->runtime->runtime;
    runtime.dispatch(matrix(x, "input x", runtime.model().hidden()),
                     switchyard::from_dlpack(*experts), switchyard::from_dlpack(*weights),
                     handle->dispatched);
  });
}

switchyard_status switchyard_dispatch_part_count(const switchyard_dispatch_handle* handle,
                                                 size_t* out) {
  return guarded([&] {
    require(handle != nullptr && out != nullptr, "handle and out must not be NULL");
    *out = handle->dispatched.parts.size();
  });
}

switchyard_status switchyard_dispatch_part_get(switchyard_dispatch_handle* handle, size_t index,
                                               switchyard_dispatch_part* out) {
  return guarded([&] {
    require(handle != nullptr && out != nullptr, "handle and out must not be NULL");
    auto& parts = handle->dispatched.parts;
    if (index >= parts.size()) {
      throw switchyard::Error(switchyard::ErrorCode::kInvalidArgument,
                              "part index " + std::to_string(index) + " is not below " +
                                  std::to_string(parts.size()) + " (the last dispatch's parts)");
    }
    handle->shapes.resize(2 * parts.size());
    switchyard::DispatchPart& part = parts[index];
    *out = switchyard_dispatch_part{};
    out->world_rank = part.world_rank;
    out->first_expert = part.first_expert;
    out->num_local_experts = part.num_local_experts;
    out->first_token = part.first_token;
    out->num_tokens = part.num_tokens;
    out->rows_per_expert = part.handle.rows_per_expert().data();
    out->expert_first_row = part.handle.expert_first_row().data();
    out->local_experts = part.local_experts.data();
    out->expert_input =
        switchyard::to_dlpack(part.handle.expert_input(), handle->shapes[2 * index]);
    out->expert_output =
        switchyard::to_dlpack(part.handle.expert_output(), handle->shapes[2 * index + 1]);
  });
}

switchyard_status switchyard_combine(switchyard_dispatch_handle* handle,
                                     const DLTensor* const* expert_outputs, size_t n_outputs,
                                     DLTensor* y) {
  return guarded([&] {
    require(handle != nullptr, "handle must not be NULL");
    require(n_outputs == 0 || expert_outputs != nullptr,
            "expert_outputs is NULL but n_outputs is not 0");
    switchyard::Runtime& runtime = *handle->runtime->runtime;
    std::vector<switchyard::TensorView> outputs;
    if (n_outputs == 0) {
      for (auto& part : handle->dispatched.parts) outputs.push_back(part.handle.expert_output());
    } else {
      for (size_t i = 0; i < n_outputs; ++i) {
        require(expert_outputs[i] != nullptr, "an expert output is NULL");
        outputs.push_back(switchyard::from_dlpack(*expert_outputs[i]));
      }
    }
    runtime.combine(handle->dispatched, outputs, matrix(y, "output y", runtime.model().hidden()));
  });
}

switchyard_status switchyard_last_stats(switchyard_runtime* runtime, switchyard_stats* out) {
  return switchyard_layer_stats(runtime, 0, out);
}

switchyard_status switchyard_layer_stats(switchyard_runtime* runtime, int layer,
                                         switchyard_stats* out) {
  return guarded([&] {
    require(runtime != nullptr && out != nullptr, "runtime and out must not be NULL");
    const switchyard::GlobalRouterStats stats = runtime->runtime->global_router_stats(layer);
    const switchyard::LayerTimings timings = runtime->runtime->max_timings(layer);
    const switchyard::LayerTraffic traffic = runtime->runtime->total_traffic(layer);
    *out = switchyard_stats{};
    out->tokens = stats.tokens;
    out->dropped = stats.dropped;
    out->imbalance = stats.imbalance;
    out->aux_loss = stats.aux_loss;
    out->z_loss = stats.z_loss;
    out->route_s = timings.route_s;
    out->layout_s = timings.layout_s;
    out->dispatch_s = timings.dispatch_s;
    out->experts_s = timings.experts_s;
    out->combine_s = timings.combine_s;
    out->dispatch_bytes = traffic.dispatch_bytes;
    out->combine_bytes = traffic.combine_bytes;
  });
}

switchyard_status switchyard_plugin_count(switchyard_runtime* runtime, size_t* out) {
  return guarded([&] {
    require(runtime != nullptr && out != nullptr, "runtime and out must not be NULL");
    if (!runtime->plugins) {
      auto registry = std::make_unique<switchyard::PluginRegistry>(
          switchyard::PluginRegistry::default_search_path(
              switchyard::configured_plugin_dirs(runtime->config)));
      registry->load_all();
      std::vector<std::string> strings;
      for (const auto& p : registry->available()) {
        strings.emplace_back(switchyard::plugin_kind_name(p.kind));
        strings.push_back(p.name);
        strings.push_back(p.version);
        strings.push_back(p.path.string());
        strings.push_back(p.probe.ok() ? std::string() : p.probe.message);
      }
      runtime->plugin_strings = std::move(strings);
      runtime->plugins = std::move(registry);
    }
    *out = runtime->plugins->available().size();
  });
}

switchyard_status switchyard_plugin_get(const switchyard_runtime* runtime, size_t index,
                                        switchyard_plugin_info* out) {
  return guarded([&] {
    require(runtime != nullptr && out != nullptr, "runtime and out must not be NULL");
    require(runtime->plugins != nullptr, "call switchyard_plugin_count first");
    const auto available = runtime->plugins->available();
    if (index >= available.size()) {
      throw switchyard::Error(switchyard::ErrorCode::kInvalidArgument,
                              "plugin index " + std::to_string(index) + " is not below " +
                                  std::to_string(available.size()));
    }
    const std::string* s = &runtime->plugin_strings[index * 5];
    out->kind = s[0].c_str();
    out->name = s[1].c_str();
    out->version = s[2].c_str();
    out->path = s[3].c_str();
    out->usable = available[index].probe.ok() ? 1 : 0;
    out->reason = s[4].c_str();
  });
}

}  // extern "C"

extern "C" {

switchyard_status switchyard_set_training(switchyard_runtime* runtime, int training) {
  return guarded([&] {
    require(runtime != nullptr, "runtime must not be NULL");
    runtime->runtime->set_training(training != 0);
  });
}

switchyard_status switchyard_backward(switchyard_runtime* runtime, const DLTensor* x,
                                      const DLTensor* dy, DLTensor* dx) {
  return guarded([&] {
    require(runtime != nullptr, "runtime must not be NULL");
    const std::int64_t H = runtime->runtime->model().hidden();
    runtime->has_gradients = false;
    runtime->runtime->backward_local_tokens(matrix(x, "input x", H), matrix(dy, "dy", H),
                                            matrix(dx, "dx", H), runtime->gradients);
    runtime->has_gradients = true;
  });
}

switchyard_status switchyard_gradient(switchyard_runtime* runtime, int which, int expert,
                                      DLTensor* out) {
  return guarded([&] {
    const std::size_t index = tensor_index(runtime, which, expert);
    require(out != nullptr, "out must not be NULL");
    if (!runtime->has_gradients) {
      throw switchyard::Error(switchyard::ErrorCode::kNotFound,
                              "no gradients: switchyard_backward has not run (or failed)");
    }
    switchyard::ModelGradients& g = runtime->gradients;
    switchyard::HostTensor& t = index == 0
                                    ? g.gate
                                    : g.experts[static_cast<std::size_t>(expert)]
                                               [index - 1 - 3 * static_cast<std::size_t>(expert)];
    if (t.size_bytes() == 0) not_held(expert);
    runtime->gradient_shapes.resize(1 + 3 * g.experts.size());
    *out = switchyard::to_dlpack(t.view(), runtime->gradient_shapes[index]);
  });
}

switchyard_status switchyard_parameter(switchyard_runtime* runtime, int which, int expert,
                                       DLTensor* out) {
  return guarded([&] {
    const std::size_t index = tensor_index(runtime, which, expert);
    require(out != nullptr, "out must not be NULL");
    const switchyard::ModelParameters p = runtime->runtime->parameters();
    const switchyard::TensorView& t =
        index == 0 ? p.gate
                   : p.experts[static_cast<std::size_t>(expert)]
                              [index - 1 - 3 * static_cast<std::size_t>(expert)];
    if (t.data() == nullptr) not_held(expert);
    runtime->parameter_shapes.resize(1 + 3 * p.experts.size());
    *out = switchyard::to_dlpack(t, runtime->parameter_shapes[index]);
  });
}

switchyard_status switchyard_save_model(switchyard_runtime* runtime, const char* path) {
  return guarded([&] {
    require(runtime != nullptr && path != nullptr, "runtime and path must not be NULL");
    runtime->runtime->save_model(path);
  });
}

}  // extern "C"
