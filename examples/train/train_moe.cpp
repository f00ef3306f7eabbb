// Training an expert-parallel MoE model with Switchyard: a small model of L MoE layers
// (`[model] layers`, the student) learns to imitate a fixed chain of L MoE layers with other
// weights (the teacher) on synthetic tokens. Each step runs the model forward (layer l+1
// takes h + MoE_l(h), the residual stream of `[model] residual`), the loss's gradient, the model
// backward (through the layers in reverse: dx, every layer's experts' and router's gradients,
// summed over the ranks that hold each tensor) and an Adam or SGD update of the parameters in
// place.
//
// The same program runs on any transport: the in-process one (all ranks are threads of
// this process), MPI (one process per rank under mpirun) or UCX (under
// `switchyard launch`). Every process computes the same teacher targets and applies the
// same update to the tensors it holds, so the trained weights are the same bits on every
// transport; `--out` writes them as a checkpoint from rank 0.
//
//   train_moe examples/train/train.toml --out trained.safetensors
//   mpirun -np 4 train_moe examples/train/train.toml --set runtime.transport=mpi
//   switchyard launch -n 4 -- train_moe examples/train/train.toml --set runtime.transport=ucx
#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <vector>

#include <switchyard/config.hpp>
#include <switchyard/model.hpp>
#include <switchyard/reference.hpp>
#include <switchyard/runtime.hpp>
#include <switchyard/status.hpp>

namespace {

constexpr const char* kUsage =
    "usage: train_moe CONFIG [--steps N] [--batch TOKENS] [--lr RATE] [--optimizer adam|sgd]\n"
    "                 [--teacher-seed SEED] [--teacher-ffn F] [--out CHECKPOINT]\n"
    "                 [--set section.key=value]...\n"
    "  defaults: 800 steps of 512 tokens, Adam at 0.01 (cosine decay to a tenth), a teacher\n"
    "  with seed 1000 and ffn 16; prints the loss on held-out tokens\n";

struct Options {
  std::string config;
  std::vector<std::string> sets;
  long long steps = 800;
  long long batch = 512;  // tokens per step, over all ranks
  double lr = 1e-2;
  bool adam = true;
  long long teacher_seed = 1000;
  long long teacher_ffn = 16;  // narrower than the student's: it can imitate it
  std::string out;
};

bool parse_number(const std::string& text, long long& value) {
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  return error == std::errc() && end == text.data() + text.size() && value > 0;
}

bool parse_options(int argc, char** argv, Options& o) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const bool has_value = i + 1 < argc;
    if (arg == "--steps" && has_value) {
      if (!parse_number(argv[++i], o.steps)) return false;
    } else if (arg == "--batch" && has_value) {
      if (!parse_number(argv[++i], o.batch)) return false;
    } else if (arg == "--lr" && has_value) {
      o.lr = std::strtod(argv[++i], nullptr);
      if (!(o.lr > 0)) return false;
    } else if (arg == "--optimizer" && has_value) {
      const std::string name = argv[++i];
      if (name != "adam" && name != "sgd") return false;
      o.adam = name == "adam";
    } else if (arg == "--teacher-seed" && has_value) {
      if (!parse_number(argv[++i], o.teacher_seed)) return false;
    } else if (arg == "--teacher-ffn" && has_value) {
      if (!parse_number(argv[++i], o.teacher_ffn)) return false;
    } else if (arg == "--out" && has_value) {
      o.out = argv[++i];
    } else if (arg == "--set" && has_value) {
      o.sets.emplace_back(argv[++i]);
    } else if (o.config.empty() && arg.rfind("--", 0) != 0) {
      o.config = arg;
    } else {
      return false;
    }
  }
  return !o.config.empty();
}

/// One teacher layer: softmax over the top-k of x·gateᵀ (lower expert index first on
/// ties), its SwiGLU experts evaluated densely.
void teacher_layer(const switchyard::ModelWeights& teacher, int top_k,
                   const switchyard::HostTensor& x, switchyard::HostTensor& y) {
  const std::int64_t T = x.shape()[0], H = teacher.hidden();
  const int E = teacher.num_experts();
  switchyard::RoutingPlan plan;
  plan.num_tokens = T;
  plan.slots = top_k;
  plan.experts.resize(static_cast<std::size_t>(T * top_k));
  plan.weights.resize(static_cast<std::size_t>(T * top_k));
  std::vector<double> logits(static_cast<std::size_t>(E));
  std::vector<int> order(static_cast<std::size_t>(E));
  for (std::int64_t t = 0; t < T; ++t) {
    for (int e = 0; e < E; ++e) {
      double z = 0;
      for (std::int64_t h = 0; h < H; ++h) {
        z += double{x.data<float>()[t * H + h]} * teacher.gate().data<float>()[e * H + h];
      }
      logits[static_cast<std::size_t>(e)] = z;
      order[static_cast<std::size_t>(e)] = e;
    }
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
      return logits[static_cast<std::size_t>(a)] > logits[static_cast<std::size_t>(b)];
    });
    double total = 0;
    for (int j = 0; j < top_k; ++j) {
      total += std::exp(logits[static_cast<std::size_t>(order[static_cast<std::size_t>(j)])] -
                        logits[static_cast<std::size_t>(order[0])]);
    }
    for (int j = 0; j < top_k; ++j) {
      const int e = order[static_cast<std::size_t>(j)];
      const auto slot = static_cast<std::size_t>(t * top_k + j);
      plan.experts[slot] = e;
      plan.weights[slot] = static_cast<float>(std::exp(logits[static_cast<std::size_t>(e)] -
                                                       logits[static_cast<std::size_t>(order[0])]) /
                                              total);
    }
  }
  switchyard::dense_moe_reference(teacher, plan, x.view(), y.view());
}

/// The teacher's layers in order over x into y, as the student's model runs them: with
/// `residual`, each layer's output is h + MoE(h).
void teacher_forward(const std::vector<switchyard::ModelWeights>& teacher, int top_k, bool residual,
                     const switchyard::HostTensor& x, switchyard::HostTensor& y) {
  switchyard::HostTensor in = x;
  for (const auto& layer : teacher) {
    teacher_layer(layer, top_k, in, y);
    if (residual) {
      for (std::int64_t i = 0; i < y.numel(); ++i) y.data<float>()[i] += in.data<float>()[i];
    }
    if (&layer != &teacher.back()) in = y;
  }
}

/// Mean squared error of y against the target over all rows.
double mean_squared_error(const switchyard::HostTensor& y, const switchyard::HostTensor& target) {
  double sum = 0;
  for (std::int64_t i = 0; i < y.numel(); ++i) {
    const double d = double{y.data<float>()[i]} - target.data<float>()[i];
    sum += d * d;
  }
  return sum / static_cast<double>(y.numel());
}

/// Adam (or plain SGD) over one parameter tensor, with its moment estimates.
struct Parameter {
  switchyard::TensorView weights;
  std::vector<float> m, v;
};

/// The learning rate of `step`: `--lr` decayed along a half cosine to a tenth of it.
double learning_rate(const Options& o, long long step) {
  const double progress = static_cast<double>(step) / static_cast<double>(o.steps);
  return o.lr * (0.1 + 0.9 * 0.5 * (1 + std::cos(3.14159265358979323846 * progress)));
}

void update(Parameter& p, const switchyard::HostTensor& gradient, const Options& o,
            long long step) {
  const double lr = learning_rate(o, step);
  float* w = p.weights.data_as<float>();
  const float* g = gradient.data<float>();
  const auto n = static_cast<std::size_t>(p.weights.numel());
  if (!o.adam) {
    for (std::size_t i = 0; i < n; ++i) w[i] -= static_cast<float>(lr) * g[i];
    return;
  }
  constexpr float kBeta1 = 0.9f, kBeta2 = 0.999f, kEpsilon = 1e-8f;
  const auto t = static_cast<double>(step + 1);
  const auto step_size = static_cast<float>(lr * std::sqrt(1 - std::pow(double{kBeta2}, t)) /
                                            (1 - std::pow(double{kBeta1}, t)));
  p.m.resize(n, 0.0f);
  p.v.resize(n, 0.0f);
  for (std::size_t i = 0; i < n; ++i) {
    p.m[i] = kBeta1 * p.m[i] + (1 - kBeta1) * g[i];
    p.v[i] = kBeta2 * p.v[i] + (1 - kBeta2) * g[i] * g[i];
    w[i] -= step_size * p.m[i] / (std::sqrt(p.v[i]) + kEpsilon);
  }
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  if (!parse_options(argc, argv, o)) {
    std::fputs(kUsage, stderr);
    return 2;
  }
  try {
    switchyard::Config config = switchyard::Config::from_file(o.config);
    config.apply_environment(switchyard::config_sections());
    for (const auto& s : o.sets) config.set_from_command_line(s);
    switchyard::Runtime runtime(config);
    const bool reporter = runtime.world_rank(0) == 0;
    const switchyard::ModelWeights& model = runtime.model();
    const int E = model.num_experts(), H = model.hidden();
    const int top_k = static_cast<int>(runtime.settings().section("router").get_int("top_k"));
    const int L = runtime.num_layers();
    std::vector<switchyard::ModelWeights> teacher;
    for (int l = 0; l < L; ++l) {
      teacher.push_back(switchyard::ModelWeights::random(
          E, H, o.teacher_ffn > 0 ? static_cast<int>(o.teacher_ffn) : model.ffn_hidden(),
          static_cast<std::uint64_t>(o.teacher_seed + l)));
    }

    // The tensors this process updates (in-process ranks share them), with their state:
    // per layer the gate, then gate, up, down of each expert.
    struct LayerParameters {
      Parameter gate;
      std::vector<Parameter> experts;  // [E * 3]
    };
    std::vector<LayerParameters> parameters(static_cast<std::size_t>(L));
    for (int l = 0; l < L; ++l) {
      const switchyard::ModelParameters weights = runtime.parameters(l);
      auto& p = parameters[static_cast<std::size_t>(l)];
      p.gate = {weights.gate, {}, {}};
      for (const auto& expert : weights.experts) {
        for (const auto& w : expert) p.experts.push_back({w, {}, {}});
      }
    }

    const auto T = static_cast<std::int64_t>(o.batch);
    switchyard::HostTensor y(switchyard::DType::kF32, {T, H}),
        target(switchyard::DType::kF32, {T, H});
    switchyard::HostTensor dy(switchyard::DType::kF32, {T, H}), dx(switchyard::DType::kF32, {T, H});
    std::vector<switchyard::ModelGradients> gradients;  // per layer

    // The loss on held-out tokens (collective: every rank runs the forward).
    const switchyard::HostTensor eval_x = switchyard::synthetic_tokens(T, H, /*seed=*/7);
    switchyard::HostTensor eval_target(switchyard::DType::kF32, {T, H});
    teacher_forward(teacher, top_k, runtime.residual(), eval_x, eval_target);
    auto eval_loss = [&] {
      runtime.set_training(false);  // nothing to keep
      runtime.forward_model(eval_x.view(), y.view());
      runtime.gather_rows(y.view());
      return mean_squared_error(y, eval_target);
    };
    const double initial = eval_loss();
    if (reporter) {
      std::printf(
          "training %d MoE layer%s of %d experts (hidden %d, ffn %d, top-%d) on %d ranks (%s), "
          "%s, lr %g\n",
          L, L == 1 ? "" : "s", E, H, model.ffn_hidden(), top_k, runtime.world_size(),
          runtime.settings().section("runtime").get_string("transport").c_str(),
          o.adam ? "adam" : "sgd", o.lr);
      std::printf("step %5d  eval loss %.6e\n", 0, initial);
    }

    // Training forwards keep every layer's input and, unless [runtime] recompute, what each
    // layer's backward needs.
    for (long long step = 0; step < o.steps; ++step) {
      const switchyard::HostTensor x =
          switchyard::synthetic_tokens(T, H, 100 + static_cast<std::uint64_t>(step));
      teacher_forward(teacher, top_k, runtime.residual(), x, target);
      runtime.set_training(true);
      runtime.forward_model(x.view(), y.view());
      // L = mean (y - target)²; every rank's rows of dy from its own rows of y.
      const auto scale = static_cast<float>(2.0 / static_cast<double>(T * H));
      for (std::int64_t i = 0; i < T * H; ++i) {
        dy.data<float>()[i] = scale * (y.data<float>()[i] - target.data<float>()[i]);
      }
      runtime.backward_model(x.view(), dy.view(), dx.view(), gradients);
      for (std::size_t l = 0; l < parameters.size(); ++l) {
        auto& p = parameters[l];
        update(p.gate, gradients[l].gate, o, step);
        for (std::size_t i = 0; i < p.experts.size(); ++i) {
          if (p.experts[i].weights.data() == nullptr) continue;  // held by another process
          update(p.experts[i], gradients[l].experts[i / 3][i % 3], o, step);
        }
      }
      if ((step + 1) % 50 == 0 || step + 1 == o.steps) {
        const double loss = eval_loss();
        if (reporter) std::printf("step %5lld  eval loss %.6e\n", step + 1, loss);
      }
    }
    const double final_loss = eval_loss();
    if (reporter) {
      std::printf("eval loss %.6e -> %.6e (%.1fx lower)\n", initial, final_loss,
                  initial / final_loss);
    }
    if (!o.out.empty()) {
      runtime.save_model(o.out);
      if (reporter) std::printf("wrote %s\n", o.out.c_str());
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "train_moe: %s\n", e.what());
    return 1;
  }
}
