// `switchyard run`: forward over the configured input, statistics, timings, --check.
#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "commands.hpp"
#include "switchyard/bootstrap.hpp"
#include "switchyard/io.hpp"
#include "switchyard/memory_budget.hpp"
#include "switchyard/runtime.hpp"
#include "switchyard/status.hpp"

namespace switchyard::tool {

namespace {
/// " [rank R]" when this process is one rank of a launched job, else "".
std::string rank_label() {
  try {
    const auto info = LaunchInfo::from_environment();
    if (info && info->world_size > 1) return " [rank " + std::to_string(info->rank) + "]";
  } catch (const Error&) {
    // Malformed launcher variables are reported by the command itself.
  }
  return "";
}
}  // namespace

void report_error(const Error& error) {
  std::fprintf(stderr, "switchyard%s: error (%s): %s\n", rank_label().c_str(),
               std::string(error_code_name(error.code())).c_str(), error.message().c_str());
}

Config load_config(const std::string& path, const std::vector<std::string>& sets) {
  Config config = Config::from_file(path);
  config.apply_environment(config_sections());
  for (const auto& s : sets) config.set_from_command_line(s);
  return config;
}

std::string take_optional_flag(std::vector<std::string>& args, std::string_view flag,
                               std::string fallback) {
  std::vector<std::string> rest;
  for (std::size_t i = 0; i < args.size(); ++i) {
    if (args[i] == flag && i + 1 < args.size()) {
      fallback = args[++i];
    } else {
      rest.push_back(std::move(args[i]));
    }
  }
  args = std::move(rest);
  return fallback;
}

std::optional<ConfigCommandLine> parse_config_command_line(
    const std::vector<std::string>& args, std::initializer_list<std::string_view> flags,
    const char* usage) {
  ConfigCommandLine line;
  line.values.resize(flags.size());
  for (std::size_t i = 0; i < args.size(); ++i) {
    const auto flag = std::find(flags.begin(), flags.end(), args[i]);
    const bool has_value = i + 1 < args.size();
    if (flag != flags.end() && has_value) {
      line.values[static_cast<std::size_t>(flag - flags.begin())] = args[++i];
    } else if (args[i] == "--set" && has_value) {
      line.sets.push_back(args[++i]);
    } else if (line.config_path.empty() && args[i].rfind("--", 0) != 0) {
      line.config_path = args[i];
    } else {
      std::fputs(usage, stderr);
      return std::nullopt;
    }
  }
  if (line.config_path.empty() || std::any_of(line.values.begin(), line.values.end(),
                                              [](const auto& v) { return v.empty(); })) {
    std::fputs(usage, stderr);
    return std::nullopt;
  }
  return line;
}

std::optional<long long> parse_integer_flag(const char* command, const char* flag,
                                            const std::string& text, long long min, long long max) {
  long long value = 0;
  const char* end = text.data() + text.size();
  const auto [stop, error] = std::from_chars(text.data(), end, value);
  if (text.empty() || error != std::errc() || stop != end || value < min || value > max) {
    std::fprintf(stderr, "switchyard %s: %s needs an integer in [%lld, %lld], not '%s'\n", command,
                 flag, min, max, text.c_str());
    return std::nullopt;
  }
  return value;
}

std::optional<double> parse_seconds_flag(const char* command, const char* flag,
                                         const std::string& text, double min, double max) {
  char* stop = nullptr;
  const double value = text.empty() ? NAN : std::strtod(text.c_str(), &stop);
  if (text.empty() || stop != text.c_str() + text.size() || !std::isfinite(value) || value < min ||
      value > max) {
    std::fprintf(stderr, "switchyard %s: %s needs a number of seconds in [%g, %g], not '%s'\n",
                 command, flag, min, max, text.c_str());
    return std::nullopt;
  }
  return value;
}

namespace {

std::string human_bytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (bytes >= 1024 && u < 4) {
    bytes /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, u == 0 ? "%.0f %s" : "%.2f %s", bytes, units[u]);
  return buf;
}

}  // namespace

/// Balancing by bias must move every rank's bias the same way: compares them over the
/// world (elementwise max and min) and prints the result.
void print_bias_agreement(Runtime& runtime, std::FILE* out, int layer) {
  std::vector<double> highest, lowest;
  std::mutex mutex;
  runtime.run_on_ranks([&](int local) {
    const auto bias = runtime.layer(local, layer).router().bias();
    std::vector<double> hi(bias.begin(), bias.end()), lo(bias.begin(), bias.end());
    runtime.world_transport(local).allreduce(hi.data(), hi.size(), DType::kF64, ReduceOp::kMax);
    runtime.world_transport(local).allreduce(lo.data(), lo.size(), DType::kF64, ReduceOp::kMin);
    if (local != 0) return;
    std::lock_guard<std::mutex> lock(mutex);
    highest = std::move(hi);
    lowest = std::move(lo);
  });
  double largest = 0;
  for (double b : highest) largest = std::max(largest, std::fabs(b));
  std::fprintf(out, "bias: %s on all %d ranks (max |bias| %.4f)\n",
               highest == lowest ? "identical" : "DIFFERS", runtime.world_size(), largest);
}

/// One layer's routing statistics, phase times and traffic of the last step (collective).
void print_layer_report(Runtime& runtime, int layer, const std::string& label, int steps,
                        std::FILE* out) {
  const GlobalRouterStats stats = runtime.global_router_stats(layer);
  const LayerTimings timings = runtime.max_timings(layer);
  const LayerTraffic traffic = runtime.total_traffic(layer);
  std::fprintf(out, "%sexpert load:", label.c_str());
  for (std::size_t e = 0; e < stats.counts.size(); ++e) {
    std::fprintf(out, "%s e%zu=%lld", e % 16 == 0 && e ? "\n            " : "", e,
                 static_cast<long long>(stats.counts[e]));
  }
  std::fprintf(out,
               "\n%srouting: imbalance %.3f (max/mean), dropped %lld, aux_loss %.4f, z_loss %.4f\n",
               label.c_str(), stats.imbalance, static_cast<long long>(stats.dropped),
               stats.aux_loss, stats.z_loss);
  const double total = timings.route_s + timings.layout_s + timings.dispatch_s + timings.experts_s +
                       timings.combine_s;
  std::fprintf(out,
               "%stime (slowest rank, step %d): route %.3f ms, layout %.3f ms, dispatch %.3f ms, "
               "experts %.3f ms, combine %.3f ms, total %.3f ms\n",
               label.c_str(), steps, timings.route_s * 1e3, timings.layout_s * 1e3,
               timings.dispatch_s * 1e3, timings.experts_s * 1e3, timings.combine_s * 1e3,
               total * 1e3);
  std::fprintf(out, "%sbytes to other ranks (all ranks): dispatch %s (%lld rows), combine %s\n",
               label.c_str(), human_bytes(static_cast<double>(traffic.dispatch_bytes)).c_str(),
               static_cast<long long>(traffic.rows_sent),
               human_bytes(static_cast<double>(traffic.combine_bytes)).c_str());
}

HostTensor read_input_tokens(
    const Runtime& runtime, std::string& description,
    const std::function<void(std::int64_t, const std::string&, const std::string&)>& check) {
  const ConfigSection& input = runtime.settings().section("input");
  const int hidden = runtime.model().hidden();
  if (input.has("tokens")) {
    const auto path = input.get_path("tokens");
    HostTensor x;
    try {
      x = read_npy_f32_matrix(path, hidden, "input.tokens");
    } catch (const Error& e) {
      throw Error(e.code(), input.origin("tokens").describe() + ": " + e.message());
    }
    if (check)
      check(x.shape()[0], input.origin("tokens").describe(), "input.tokens " + path.string());
    description = path.string();
    return x;
  }
  if (check) {
    check(input.get_int("num_tokens"), input.origin("num_tokens").describe(), "input.num_tokens");
  }
  description = "synthetic (seed " + std::to_string(input.get_int("seed")) + ")";
  return synthetic_tokens(input.get_int("num_tokens"), hidden,
                          static_cast<std::uint64_t>(input.get_int("seed")));
}

/// Runs the configured forward (and check) on a built runtime; returns the exit code.
int run_layer(Runtime& runtime, bool check, int steps, int rebalance_every) {
  const ModelWeights& model = runtime.model();
  const ConfigSection& output = runtime.settings().section("output");
  const ConfigSection& runtime_options = runtime.settings().section("runtime");
  const ConfigSection& router_options = runtime.settings().section("router");

  // The step's memory, checked before it is allocated: input and output rows, and the
  // exchange buffers (each token goes to at most min(k, world) ranks, there in the payload
  // dtype and back in the combine dtype, each side sent and received).
  const auto check_step_memory = [&](std::int64_t tokens, const std::string& where,
                                     const std::string& keys) {
    const long double H = static_cast<long double>(model.hidden());
    const long double copies = static_cast<long double>(std::min<std::int64_t>(
        router_options.has("top_k") ? router_options.get_int("top_k") : 1, runtime.world_size()));
    const std::string& payload = runtime_options.get_string("payload_dtype");
    const long double payload_bytes = payload == "f32" ? 4 : payload == "bf16" ? 2 : 1.03;
    const long double combine_bytes = runtime_options.get_string("combine_dtype") == "f32" ? 4 : 2;
    const long double rows = static_cast<long double>(tokens) * H * 4 * 2;
    const long double exchange =
        2 * static_cast<long double>(tokens) * copies * H * (payload_bytes + combine_bytes);
    check_fits_in_memory(rows + exchange, where + ": " + keys,
                         std::to_string(tokens) + " tokens x hidden " +
                             std::to_string(model.hidden()) + ": " + format_bytes(rows) +
                             " of input and output rows, " + format_bytes(exchange) +
                             " of exchange buffers");
  };
  std::string input_description;
  const HostTensor x = read_input_tokens(runtime, input_description, check_step_memory);
  const std::int64_t T = x.shape()[0];
  HostTensor y(DType::kF32, {T, model.hidden()});

  const int world = runtime.world_size();
  // With one process per rank, rank 0 reports, checks and writes; the others only compute.
  const bool reporter = runtime.world_rank(0) == 0;
  // Ranks other than 0 write their report nowhere.
  std::unique_ptr<FILE, int (*)(FILE*)> sink(reporter ? nullptr : std::fopen("/dev/null", "w"),
                                             &std::fclose);
  FILE* const out = reporter ? stdout : sink.get();
  if (out == nullptr) throw Error(ErrorCode::kSystem, "cannot open /dev/null");
  std::fprintf(out, "switchyard %s: transport %s, %d rank%s (%s)\n", core_version(),
               runtime_options.get_string("transport").c_str(), world, world == 1 ? "" : "s",
               runtime.topology().describe().c_str());
  const int layers = runtime.num_layers();
  if (layers == 1) {
    std::fprintf(out, "model: %s: %d experts, hidden %d, ffn_hidden %d\n",
                 model.description().c_str(), model.num_experts(), model.hidden(),
                 model.ffn_hidden());
  } else {
    std::string ids;
    for (const int id : runtime.layer_ids()) ids += (ids.empty() ? "" : ",") + std::to_string(id);
    std::fprintf(out, "model: %d MoE layers (%s), each %d experts, hidden %d, ffn_hidden %d\n",
                 layers, ids.c_str(), model.num_experts(), model.hidden(), model.ffn_hidden());
    std::fprintf(out, "weights: layer %d: %s\n", runtime.layer_ids().front(),
                 model.description().c_str());
  }
  // What the experts are stored as, and the shared expert, when the layers have one.
  const SwigluExpertWeights first_expert = model.experts(0, 1)[0];
  std::string stored =
      std::string(dtype_name(first_expert.gate.dtype())) +
      (first_expert.gate_scale.data() != nullptr ? " with 128x128 block scales" : "");
  if (model.has_shared_expert()) {
    stored += "; a shared expert (ffn_hidden " + std::to_string(model.shared_ffn_hidden()) +
              (model.shared_expert().gate.data() != nullptr ? ", sigmoid-gated" : "") +
              ") on every token's own rank";
  }
  std::fprintf(out, "expert weights: %s, %.2f MiB per layer\n", stored.c_str(),
               static_cast<double>(model.weight_bytes()) / (1 << 20));
  std::fprintf(out, "router: %s, top_k %d; experts: %s\n",
               router_options.get_string("policy").c_str(),
               runtime.layer(0).router().slots_per_token(),
               runtime.settings().section("experts").get_string("kernel").c_str());
  std::string split;
  for (int r = 0; r < world; ++r) {
    if (r != 0) split += '/';
    split += std::to_string(token_block(T, world, r).second);
  }
  std::fprintf(out, "tokens: %lld from %s, split %s\n", static_cast<long long>(T),
               input_description.c_str(), split.c_str());
  if (runtime.ep_size() != world) {
    std::fprintf(out, "groups: %d data-parallel groups of %d expert-parallel ranks\n",
                 world / runtime.ep_size(), runtime.ep_size());
  }

  // With several steps, the group's imbalance after each shows what balancing by bias does.
  // A model of several layers runs them in order: layer l's output is layer l+1's input.
  for (int step = 0; step < steps; ++step) {
    runtime.forward_model(x.view(), y.view());
    if (steps > 1) {
      std::fprintf(out, "step %d: imbalance", step + 1);
      for (int l = 0; l < layers; ++l) {
        std::fprintf(out, " %.3f", runtime.global_router_stats(l).imbalance);
      }
      std::fprintf(out, layers > 1 ? " (per layer)\n" : "\n");
    }
    if (rebalance_every > 0 && (step + 1) % rebalance_every == 0 && step + 1 < steps) {
      for (const RebalanceReport& r : runtime.rebalance()) {
        std::fprintf(out,
                     "rebalance after step %d: layer %d: rank load %.3f -> %.3f planned (max/mean "
                     "over %d slots), %lld expert copies moved, %s received here\n",
                     step + 1, r.layer, r.imbalance_before, r.imbalance_planned, r.slots,
                     static_cast<long long>(r.moved_experts),
                     human_bytes(static_cast<double>(r.received_bytes)).c_str());
      }
    }
  }
  runtime.gather_rows(y.view());
  for (int l = 0; l < layers; ++l) {
    const std::string label =
        layers == 1
            ? std::string()
            : "layer " + std::to_string(runtime.layer_ids()[static_cast<std::size_t>(l)]) + " ";
    if (runtime.layer(0, l).router().updates_from_counts()) {
      std::fprintf(out, "%s", label.c_str());
      print_bias_agreement(runtime, out, l);
    }
    print_layer_report(runtime, l, label, steps, out);
  }
  if (layers > 1) {
    std::fprintf(out, "step buffers: %s on this process for %d layers\n",
                 human_bytes(static_cast<double>(runtime.step_buffer_bytes())).c_str(), layers);
  }

  int exit_code = kExitOk;
  if (!reporter) return exit_code;
  if (check) {
    HostTensor reference(DType::kF32, {T, model.hidden()});
    runtime.reference_model(x.view(), reference.view());
    double max_diff = 0, max_ref = 0;
    const float* a = y.data<float>();
    const float* b = reference.data<float>();
    for (std::int64_t i = 0; i < y.numel(); ++i) {
      const double d = std::fabs(static_cast<double>(a[i]) - b[i]);
      max_diff = std::isnan(d) ? INFINITY : std::max(max_diff, d);
      max_ref = std::max(max_ref, std::fabs(static_cast<double>(b[i])));
    }
    const double relative = max_ref > 0 ? max_diff / max_ref : max_diff;
    const double tolerance = runtime.settings().section("check").get_float("tolerance");
    const bool pass = relative <= tolerance;
    std::fprintf(out,
                 "check: max |y - reference| = %.3g, relative to max |reference| %.3g: %.3g "
                 "(tolerance %.3g): %s\n",
                 max_diff, max_ref, relative, tolerance, pass ? "PASS" : "FAIL");
    if (!pass) exit_code = kExitCheckFailed;
  }
  if (output.has("path") && exit_code == kExitOk) {
    const auto path = output.get_path("path");
    write_npy(path, y.view());
    std::fprintf(out, "output: %s f32[%lld,%d]\n", path.string().c_str(), static_cast<long long>(T),
                 model.hidden());
  } else if (output.has("path")) {
    std::fprintf(out, "output: not written because the check failed\n");
  }
  return exit_code;
}

int run_command(const std::vector<std::string>& args) {
  std::string config_path;
  std::vector<std::string> sets;
  bool check = false;
  int steps = 1, rebalance_every = 0;
  for (std::size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--set" && i + 1 < args.size()) {
      sets.push_back(args[++i]);
    } else if (args[i].rfind("--set=", 0) == 0) {
      sets.push_back(args[i].substr(6));
    } else if (args[i] == "--check") {
      check = true;
    } else if (args[i] == "--steps" && i + 1 < args.size()) {
      const auto value = parse_integer_flag("run", "--steps", args[++i], 1, 1 << 30);
      if (!value) return kExitUsage;
      steps = static_cast<int>(*value);
    } else if (args[i] == "--rebalance-every" && i + 1 < args.size()) {
      const auto value = parse_integer_flag("run", "--rebalance-every", args[++i], 1, 1 << 30);
      if (!value) return kExitUsage;
      rebalance_every = static_cast<int>(*value);
    } else if (config_path.empty() && args[i].rfind("--", 0) != 0) {
      config_path = args[i];
    } else {
      std::fprintf(stderr, "switchyard run: unexpected argument '%s'\n", args[i].c_str());
      return kExitUsage;
    }
  }
  if (config_path.empty()) {
    std::fprintf(stderr,
                 "usage: switchyard run CONFIG [--set section.key=value]... [--steps N] [--check]\n"
                 "                      [--rebalance-every N]\n");
    return kExitUsage;
  }

  const Config config = load_config(config_path, sets);
  Runtime runtime(config);
  return run_reporting_errors(runtime,
                              [&] { return run_layer(runtime, check, steps, rebalance_every); });
}

int run_reporting_errors(Runtime& runtime, const std::function<int()>& body) {
  try {
    return body();
  } catch (const Error& e) {
    report_error(e);
    // Bad input is seen by every rank together: each reports and exits by itself. Anything
    // else may leave peers waiting, so stop them (with MPI this ends the job).
    if (e.code() != ErrorCode::kInvalidArgument && e.code() != ErrorCode::kPeerFailed) {
      runtime.abort(e.message());
    }
    return kExitError;
  }
}

}  // namespace switchyard::tool
