#include "switchyard/simulator.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numbers>
#include <string>
#include <utility>

#include "switchyard/expert_balancer.hpp"
#include "switchyard/placement.hpp"
#include "switchyard/runtime.hpp"
#include "switchyard/status.hpp"
#include "switchyard/stream.hpp"

namespace switchyard::sim {
namespace {

[[noreturn]] void invalid(const std::string& message) {
  throw Error(ErrorCode::kInvalidArgument, message);
}

/// xoshiro256** seeded through SplitMix64: fast, and the same stream on every machine.
class Random {
 public:
  explicit Random(std::uint64_t seed) {
    for (auto& s : state_) {
      seed += 0x9e3779b97f4a7c15ULL;
      std::uint64_t z = seed;
      z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
      z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
      s = z ^ (z >> 31);
    }
  }
  std::uint64_t next() noexcept {
    const std::uint64_t result = rotl(state_[1] * 5, 7) * 9;
    const std::uint64_t t = state_[1] << 17;
    state_[2] ^= state_[0];
    state_[3] ^= state_[1];
    state_[1] ^= state_[2];
    state_[0] ^= state_[3];
    state_[2] ^= t;
    state_[3] = rotl(state_[3], 45);
    return result;
  }
  /// Uniform in (0, 1].
  double uniform() noexcept { return (static_cast<double>(next() >> 11) + 1.0) * 0x1.0p-53; }
  /// Two independent N(0, 1) draws (Box-Muller).
  std::pair<double, double> normal_pair() noexcept {
    const double radius = std::sqrt(-2.0 * std::log(uniform()));
    const double angle = 2.0 * std::numbers::pi * uniform();
    return {radius * std::cos(angle), radius * std::sin(angle)};
  }

 private:
  static std::uint64_t rotl(std::uint64_t x, int k) noexcept { return (x << k) | (x >> (64 - k)); }
  std::uint64_t state_[4] = {};
};

/// A finite number from `text` (all of it), or nothing.
std::optional<double> number(std::string_view text) {
  const std::string s(text);
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  if (s.empty() || end != s.c_str() + s.size() || !std::isfinite(v)) return std::nullopt;
  return v;
}

std::vector<std::string_view> split(std::string_view text, char separator) {
  std::vector<std::string_view> parts;
  std::size_t start = 0;
  for (std::size_t i = 0; i <= text.size(); ++i) {
    if (i == text.size() || text[i] == separator) {
      parts.push_back(text.substr(start, i - start));
      start = i + 1;
    }
  }
  return parts;
}

std::string gb(double bytes_per_s) {
  char text[32];
  std::snprintf(text, sizeof text, "%g", bytes_per_s);
  return text;
}

}  // namespace

// Achievable large-transfer rates per GPU and direction, not peaks (docs/simulator.md).
LinkModel link_preset(std::string_view name) {
  if (name == "h800") return {"h800", {155.0, 3.0}, {48.0, 5.0}};
  if (name == "h100") return {"h100", {370.0, 3.0}, {48.0, 5.0}};
  if (name == "b200") return {"b200", {740.0, 3.0}, {48.0, 5.0}};
  if (name == "cpu") return {"cpu", {10.0, 1.0}, {1.5, 20.0}};
  std::string names;
  for (const auto& n : link_preset_names()) names += (names.empty() ? "" : ", ") + n;
  invalid("unknown link preset '" + std::string(name) + "' (presets: " + names + ")");
}

std::vector<std::string> link_preset_names() { return {"h800", "h100", "b200", "cpu"}; }

std::string_view accounting_name(Accounting accounting) noexcept {
  switch (accounting) {
    case Accounting::kPerExpert:
      return "per expert";
    case Accounting::kPerRank:
      return "per rank";
    case Accounting::kPerNode:
      return "per node";
  }
  return "?";
}

void validate(const ClusterSpec& spec) {
  if (spec.nodes < 1 || spec.gpus_per_node < 1) {
    invalid("the cluster needs at least one node and one GPU per node (got " +
            std::to_string(spec.nodes) + " × " + std::to_string(spec.gpus_per_node) + ")");
  }
  if (static_cast<std::int64_t>(spec.nodes) * spec.gpus_per_node > (1 << 16)) {
    invalid("at most 65536 ranks can be simulated (got " + std::to_string(spec.nodes) + " × " +
            std::to_string(spec.gpus_per_node) + ")");
  }
  const int world = spec.world();
  if (spec.ep_size < 0 || (spec.ep_size > 0 && world % spec.ep_size != 0)) {
    invalid("ep_size " + std::to_string(spec.ep_size) + " does not divide the " +
            std::to_string(world) + " ranks (" + std::to_string(spec.nodes) + " nodes × " +
            std::to_string(spec.gpus_per_node) + " GPUs)");
  }
  if (spec.num_experts < 1) invalid("num_experts must be at least 1");
  if (spec.hidden < 1) invalid("hidden must be at least 1");
  if (spec.combine_dtype != DType::kF32 && spec.combine_dtype != DType::kBF16) {
    invalid("the combine dtype must be f32 or bf16");
  }
  for (const auto& [what, link] :
       {std::pair{"intra-node link", spec.links.intra}, std::pair{"NIC", spec.links.nic}}) {
    if (!(link.gb_per_s > 0) || !std::isfinite(link.gb_per_s) || !(link.latency_us >= 0) ||
        !std::isfinite(link.latency_us)) {
      invalid(std::string("the ") + what + " needs a bandwidth > 0 and a latency >= 0 (got " +
              gb(link.gb_per_s) + " GB/s, " + gb(link.latency_us) + " us)");
    }
  }
}

// --- logits ---------------------------------------------------------------------------

LogitsSource LogitsSource::synthetic(std::string_view spec, int num_experts,
                                     std::int64_t tokens_per_rank, std::uint64_t seed) {
  if (num_experts < 1) invalid("logits: num_experts must be at least 1");
  if (tokens_per_rank < 0) invalid("logits: tokens per rank must be >= 0");
  LogitsSource s;
  s.num_experts_ = num_experts;
  s.tokens_per_rank_ = tokens_per_rank;
  s.seed_ = seed;
  s.description_ = std::string(spec);
  s.shift_.assign(static_cast<std::size_t>(num_experts), 0.0f);
  const std::vector<std::string_view> parts = split(spec, ':');
  const std::string usage = "logits '" + std::string(spec) +
                            "': expected normal, zipf:S (S > 0), hot:N:DELTA (1 <= N <= E) or a "
                            ".npy file";
  if (parts[0] == "normal" && parts.size() == 1) {
    s.kind_ = Kind::kNormal;
  } else if (parts[0] == "zipf" && parts.size() == 2) {
    const auto exponent = number(parts[1]);
    if (!exponent || *exponent <= 0) invalid(usage);
    s.kind_ = Kind::kZipf;
    for (int e = 0; e < num_experts; ++e) {
      s.shift_[static_cast<std::size_t>(e)] = static_cast<float>(-*exponent * std::log(e + 1.0));
    }
  } else if (parts[0] == "hot" && parts.size() == 3) {
    const auto count = number(parts[1]);
    const auto delta = number(parts[2]);
    if (!count || !delta || *count < 1 || *count > num_experts || *count != std::floor(*count)) {
      invalid(usage);
    }
    s.kind_ = Kind::kHot;
    const int n = static_cast<int>(*count);
    for (int i = 0; i < n; ++i) {
      const auto e = static_cast<std::size_t>(static_cast<std::int64_t>(i) * num_experts / n);
      s.shift_[e] = static_cast<float>(*delta);
    }
  } else {
    invalid(usage);
  }
  return s;
}

LogitsSource LogitsSource::recorded(const TensorView& logits, int ranks) {
  logits.require("recorded logits", DType::kF32, {-1, -1});
  if (logits.dim(1) < 1) invalid("recorded logits: no expert columns");
  if (ranks < 1) invalid("recorded logits: ranks must be at least 1");
  LogitsSource s;
  s.kind_ = Kind::kRecorded;
  s.num_experts_ = static_cast<int>(logits.dim(1));
  s.ranks_ = ranks;
  s.recorded_tokens_ = logits.dim(0);
  s.recorded_.assign(logits.data_as<const float>(), logits.data_as<const float>() + logits.numel());
  s.description_ =
      "recorded [" + std::to_string(logits.dim(0)) + "," + std::to_string(logits.dim(1)) + "]";
  return s;
}

std::int64_t LogitsSource::tokens(int rank) const noexcept {
  if (kind_ != Kind::kRecorded) return tokens_per_rank_;
  return token_block(recorded_tokens_, ranks_, rank).second;
}

void LogitsSource::fill(int step, int rank, float* out) const {
  const std::int64_t T = tokens(rank);
  const auto E = static_cast<std::int64_t>(num_experts_);
  if (kind_ == Kind::kRecorded) {
    const std::int64_t first = token_block(recorded_tokens_, ranks_, rank).first;
    std::memcpy(out, recorded_.data() + first * E, static_cast<std::size_t>(T * E) * sizeof(float));
    return;
  }
  Random random(seed_ ^ (static_cast<std::uint64_t>(step) << 40) ^
                (static_cast<std::uint64_t>(rank) * 0x9e3779b97f4a7c15ULL));
  const std::int64_t n = T * E;
  for (std::int64_t i = 0; i < n; i += 2) {
    const auto [a, b] = random.normal_pair();
    out[i] = static_cast<float>(a) + shift_[static_cast<std::size_t>(i % E)];
    if (i + 1 < n)
      out[i + 1] = static_cast<float>(b) + shift_[static_cast<std::size_t>((i + 1) % E)];
  }
}

// --- traffic --------------------------------------------------------------------------

void Traffic::accumulate(const Traffic& s) {
  auto add = [](auto& into, const auto& from) {
    if (into.size() < from.size()) into.resize(from.size());
    for (std::size_t i = 0; i < from.size(); ++i) into[i] += from[i];
  };
  tokens += s.tokens;
  assignments += s.assignments;
  dropped += s.dropped;
  add(tokens_per_expert, s.tokens_per_expert);
  add(tokens_per_rank, s.tokens_per_rank);
  add(tokens_per_node, s.tokens_per_node);
  for (int a = 0; a < kNumAccountings; ++a) add(copies[a], s.copies[a]);
  distinct_nodes += s.distinct_nodes;
  remote_nodes += s.remote_nodes;
  distinct_ranks += s.distinct_ranks;
  max_nodes_per_token = std::max(max_nodes_per_token, s.max_nodes_per_token);
  rank_imbalance_floor = std::max(rank_imbalance_floor, s.rank_imbalance_floor);
  add(layer_dispatch_bytes, s.layer_dispatch_bytes);
  add(layer_combine_bytes, s.layer_combine_bytes);
}

double Traffic::rank_imbalance() const noexcept {
  if (assignments == 0 || tokens_per_rank.empty()) return 0;
  const double mean =
      static_cast<double>(assignments) / static_cast<double>(tokens_per_rank.size());
  return static_cast<double>(*std::max_element(tokens_per_rank.begin(), tokens_per_rank.end())) /
         mean;
}

double Traffic::imbalance() const noexcept {
  if (assignments == 0 || tokens_per_expert.empty()) return 0;
  const double mean =
      static_cast<double>(assignments) / static_cast<double>(tokens_per_expert.size());
  return static_cast<double>(
             *std::max_element(tokens_per_expert.begin(), tokens_per_expert.end())) /
         mean;
}

std::uint64_t dispatch_copy_bytes(const ClusterSpec& spec, Accounting accounting, int slots) {
  const std::uint64_t slot_bytes = sizeof(SlotMeta);
  const std::uint64_t row = payload_row_bytes(spec.payload_dtype, spec.hidden);
  return row + slot_bytes *
                   (accounting == Accounting::kPerExpert ? 1 : static_cast<std::uint64_t>(slots));
}

std::uint64_t combine_copy_bytes(const ClusterSpec& spec) {
  return static_cast<std::uint64_t>(spec.hidden) * dtype_size(spec.combine_dtype);
}

namespace {

/// Calls fn(sender, receiver, copies) for every rank pair with copies.
template <typename Fn>
void for_each_pair(const ClusterSpec& spec, const Traffic& traffic, Accounting accounting, Fn fn) {
  const int W = spec.world();
  const auto& copies = traffic.copies[static_cast<int>(accounting)];
  if (copies.size() != static_cast<std::size_t>(W) * static_cast<std::size_t>(W)) return;
  for (int s = 0; s < W; ++s) {
    for (int d = 0; d < W; ++d) {
      const std::int64_t n = copies[static_cast<std::size_t>(s) * static_cast<std::size_t>(W) +
                                    static_cast<std::size_t>(d)];
      if (n != 0) fn(s, d, n);
    }
  }
}

}  // namespace

ByteSplit dispatch_bytes(const ClusterSpec& spec, const Traffic& traffic, Accounting accounting,
                         int slots) {
  const std::uint64_t bytes = dispatch_copy_bytes(spec, accounting, slots);
  ByteSplit split;
  for_each_pair(spec, traffic, accounting, [&](int s, int d, std::int64_t n) {
    auto& into = s / spec.gpus_per_node == d / spec.gpus_per_node ? split.intra : split.inter;
    into += static_cast<std::uint64_t>(n) * bytes;
  });
  return split;
}

std::vector<std::uint64_t> node_matrix(const ClusterSpec& spec, const Traffic& traffic,
                                       Accounting accounting, int slots) {
  const std::uint64_t bytes = dispatch_copy_bytes(spec, accounting, slots);
  const auto N = static_cast<std::size_t>(spec.nodes);
  std::vector<std::uint64_t> m(N * N, 0);
  for_each_pair(spec, traffic, accounting, [&](int s, int d, std::int64_t n) {
    m[static_cast<std::size_t>(s / spec.gpus_per_node) * N +
      static_cast<std::size_t>(d / spec.gpus_per_node)] += static_cast<std::uint64_t>(n) * bytes;
  });
  return m;
}

std::vector<ResourceTimes> resource_times(const ClusterSpec& spec, const Traffic& traffic,
                                          Accounting accounting, int slots, bool combine) {
  const auto W = static_cast<std::size_t>(spec.world());
  // Per rank: NIC send, NIC receive, intra-node send, intra-node receive.
  std::vector<std::array<std::uint64_t, 4>> load(W, {0, 0, 0, 0});
  const std::uint64_t bytes =
      combine ? combine_copy_bytes(spec) : dispatch_copy_bytes(spec, accounting, slots);
  for_each_pair(spec, traffic, accounting, [&](int s, int d, std::int64_t n) {
    if (combine) std::swap(s, d);  // the results travel back
    const bool inside = s / spec.gpus_per_node == d / spec.gpus_per_node;
    const std::uint64_t b = static_cast<std::uint64_t>(n) * bytes;
    load[static_cast<std::size_t>(s)][inside ? 2 : 0] += b;
    load[static_cast<std::size_t>(d)][inside ? 3 : 1] += b;
  });
  auto seconds = [](std::uint64_t b, const Link& link) {
    return b == 0 ? 0.0 : static_cast<double>(b) / (link.gb_per_s * 1e9) + link.latency_us * 1e-6;
  };
  std::vector<ResourceTimes> times(W);
  for (std::size_t r = 0; r < W; ++r) {
    times[r] = {seconds(load[r][0], spec.links.nic), seconds(load[r][1], spec.links.nic),
                seconds(load[r][2], spec.links.intra), seconds(load[r][3], spec.links.intra)};
  }
  return times;
}

PhaseTime predict(const ClusterSpec& spec, const Traffic& traffic, Accounting accounting, int slots,
                  bool combine) {
  const std::vector<ResourceTimes> times =
      resource_times(spec, traffic, accounting, slots, combine);
  PhaseTime worst{0, "none"};
  for (std::size_t r = 0; r < times.size(); ++r) {
    const std::pair<const char*, double> resources[4] = {
        {"NIC send", times[r].nic_send},
        {"NIC receive", times[r].nic_receive},
        {"intra-node send", times[r].intra_send},
        {"intra-node receive", times[r].intra_receive}};
    for (const auto& [name, seconds] : resources) {
      if (seconds > worst.seconds) {
        worst.seconds = seconds;
        worst.bottleneck = std::string(name) + " of rank " + std::to_string(r) + " (node " +
                           std::to_string(static_cast<int>(r) / spec.gpus_per_node) + ")";
      }
    }
  }
  return worst;
}

PhaseTime predict_allreduce(const ClusterSpec& spec, std::uint64_t bytes, int ranks,
                            int ranks_per_node) {
  if (ranks <= 1 || bytes == 0) return {0, "none"};
  const bool crosses_nodes = ranks > ranks_per_node;
  const Link& link = crosses_nodes ? spec.links.nic : spec.links.intra;
  const double n = ranks;
  const double sent = 2 * (n - 1) / n * static_cast<double>(bytes);
  const double seconds = sent / (link.gb_per_s * 1e9) + 2 * (n - 1) * link.latency_us * 1e-6;
  return {seconds, crosses_nodes ? "NIC ring over " + std::to_string(ranks) + " ranks"
                                 : "intra-node ring over " + std::to_string(ranks) + " ranks"};
}

TrainingStep predict_training_step(const ClusterSpec& spec, const Traffic& traffic, int slots,
                                   int moe_layers, std::int64_t dense_params,
                                   std::int64_t expert_params, int steps) {
  TrainingStep step;
  const int W = spec.world(), G = spec.group_size();
  // The EP part: a forward and a backward per layer, each a dispatch and a combine.
  const double layer_s = predict(spec, traffic, Accounting::kPerRank, slots, false).seconds +
                         predict(spec, traffic, Accounting::kPerRank, slots, true).seconds;
  const int n = std::max(steps, 1);
  step.ep_seconds = 2.0 * moe_layers * layer_s / n;
  std::uint64_t most = 0;
  for (std::size_t r = 0; r < traffic.layer_dispatch_bytes.size(); ++r) {
    most = std::max(most, traffic.layer_dispatch_bytes[r] + traffic.layer_combine_bytes[r]);
  }
  step.ep_bytes_per_rank =
      2 * static_cast<std::uint64_t>(moe_layers) * most / static_cast<std::uint64_t>(n);
  // The DP part: the replicated parameters over the world; each rank's experts over its DP
  // group, W / G ranks G apart (on other nodes when an EP group fills a node or more).
  constexpr std::uint64_t kGradientBytes = sizeof(float);
  const std::uint64_t dense = static_cast<std::uint64_t>(dense_params) * kGradientBytes;
  const std::uint64_t local_experts =
      static_cast<std::uint64_t>((spec.num_experts + G - 1) / G);  // the most any rank holds
  const std::uint64_t experts = static_cast<std::uint64_t>(moe_layers) * local_experts *
                                static_cast<std::uint64_t>(expert_params) * kGradientBytes;
  const PhaseTime dense_time = predict_allreduce(spec, dense, W, spec.gpus_per_node);
  const int dp_ranks = W / G;
  const PhaseTime expert_time = predict_allreduce(
      spec, experts, dp_ranks, G >= spec.gpus_per_node ? 1 : spec.gpus_per_node / G);
  step.dp_seconds = dense_time.seconds + expert_time.seconds;
  const auto ring = [](std::uint64_t bytes, int ranks) {
    return ranks <= 1
               ? std::uint64_t{0}
               : static_cast<std::uint64_t>(2.0 * (ranks - 1) / ranks * static_cast<double>(bytes));
  };
  step.dp_bytes_per_rank = ring(dense, W) + ring(experts, dp_ranks);
  // Pure DP: every expert of every layer on every rank, all gradients over the world.
  const std::uint64_t all = dense + static_cast<std::uint64_t>(moe_layers) *
                                        static_cast<std::uint64_t>(spec.num_experts) *
                                        static_cast<std::uint64_t>(expert_params) * kGradientBytes;
  step.pure_dp_seconds = predict_allreduce(spec, all, W, spec.gpus_per_node).seconds;
  step.pure_dp_bytes_per_rank = ring(all, W);
  return step;
}

// --- the simulator --------------------------------------------------------------------

Simulator::Simulator(ClusterSpec spec, LogitsSource logits, std::vector<RouterSetting> settings,
                     int sample_tokens)
    : spec_(std::move(spec)),
      logits_(std::move(logits)),
      settings_(std::move(settings)),
      sample_tokens_(std::max(0, sample_tokens)) {
  validate(spec_);
  if (settings_.empty()) invalid("no router setting to simulate");
  if (logits_.num_experts() != spec_.num_experts) {
    invalid("the logits have " + std::to_string(logits_.num_experts()) +
            " experts (columns) but the model has " + std::to_string(spec_.num_experts));
  }
  const int W = spec_.world(), G = spec_.group_size();
  for (int first = 0; first < W; first += G) {
    Group group;
    std::vector<int> node_of_rank;
    for (int r = first; r < first + G; ++r) node_of_rank.push_back(r / spec_.gpus_per_node);
    group.topology = Topology(node_of_rank);
    groups_.push_back(std::move(group));
  }
  // Routers per group, each tried on one token here so that a setting the placement
  // cannot take fails before any work.
  std::vector<float> zero(static_cast<std::size_t>(spec_.num_experts), 0.0f);
  for (auto& group : groups_) {
    for (const auto& setting : settings_) {
      std::shared_ptr<Router> router = setting.make_router();
      if (router == nullptr) invalid("router setting '" + setting.label + "' made no router");
      if (router->num_experts() != spec_.num_experts) {
        invalid("router setting '" + setting.label + "' routes " +
                std::to_string(router->num_experts()) + " experts but the logits have " +
                std::to_string(spec_.num_experts));
      }
      RouteInput input;
      input.logits = TensorView(zero.data(), DType::kF32, {1, spec_.num_experts});
      input.topology = &group.topology;
      RoutingPlan plan;
      HostStream stream;
      try {
        router->route(input, plan, stream);
      } catch (const Error& e) {
        throw Error(e.code(), "router setting '" + setting.label + "': " + e.message());
      }
      group.routers.push_back(std::move(router));
    }
    group.slot_maps.resize(settings_.size());
  }
  rank_stamp_.assign(static_cast<std::size_t>(W), -1);
  node_stamp_.assign(static_cast<std::size_t>(spec_.nodes), -1);
  node_sent_stamp_.assign(static_cast<std::size_t>(spec_.nodes), -1);
}

int Simulator::slots(std::size_t setting) const {
  return groups_.front().routers.at(setting)->slots_per_token();
}

std::vector<Traffic> Simulator::step(int step, const std::function<void(int, int)>& progress) {
  return run(
      [&](int rank) {
        const std::int64_t T = logits_.tokens(rank);
        scratch_.resize(static_cast<std::size_t>(T * spec_.num_experts));
        logits_.fill(step, rank, scratch_.data());
        return TensorView(scratch_.data(), DType::kF32, {T, spec_.num_experts});
      },
      progress);
}

std::vector<Traffic> Simulator::step_on(std::span<const TensorView> logits_per_rank) {
  if (logits_per_rank.size() != static_cast<std::size_t>(spec_.world())) {
    invalid("step_on needs logits for each of the " + std::to_string(spec_.world()) +
            " ranks, got " + std::to_string(logits_per_rank.size()));
  }
  for (const auto& l : logits_per_rank) l.require("logits", DType::kF32, {-1, spec_.num_experts});
  return run([&](int rank) { return logits_per_rank[static_cast<std::size_t>(rank)]; }, nullptr);
}

std::vector<Traffic> Simulator::run(const std::function<TensorView(int rank)>& logits_of,
                                    const std::function<void(int, int)>& progress) {
  const int W = spec_.world(), G = spec_.group_size();
  const auto E = static_cast<std::size_t>(spec_.num_experts);
  std::vector<Traffic> result(settings_.size());
  for (auto& t : result) {
    t.tokens_per_expert.assign(E, 0);
    t.tokens_per_rank.assign(static_cast<std::size_t>(W), 0);
    t.tokens_per_node.assign(static_cast<std::size_t>(spec_.nodes), 0);
    for (auto& c : t.copies) c.assign(static_cast<std::size_t>(W) * static_cast<std::size_t>(W), 0);
  }
  RoutingPlan plan;
  HostStream stream;
  std::vector<std::vector<std::int64_t>> group_counts(settings_.size());
  for (std::size_t g = 0; g < groups_.size(); ++g) {
    for (std::size_t s = 0; s < settings_.size(); ++s) {
      if (settings_[s].redundant_experts > 0 && groups_[g].slot_maps[s].empty())
        place_copies(g, s, logits_of);
    }
    for (auto& c : group_counts) c.assign(E, 0);
    for (int r = static_cast<int>(g) * G; r < static_cast<int>(g + 1) * G; ++r) {
      const TensorView logits = logits_of(r);
      for (std::size_t s = 0; s < settings_.size(); ++s) {
        Router& router = *groups_[g].routers[s];
        RouteInput input;
        input.logits = logits;
        input.topology = &groups_[g].topology;
        router.route(input, plan, stream);
        result[s].tokens += plan.num_tokens;
        result[s].dropped += router.stats().dropped;
        for (std::size_t e = 0; e < E; ++e) group_counts[s][e] += plan.counts[e];
        account(r, plan, groups_[g].slot_maps[s], result[s]);
      }
      if (progress) progress(r + 1, W);
    }
    // The floor: no placement of these copies puts less than the hottest copy's load on
    // a rank.
    for (std::size_t s = 0; s < settings_.size(); ++s) {
      const ExpertSlotMap& slot_map = groups_[g].slot_maps[s];
      double hottest = 0, total = 0;
      for (std::size_t e = 0; e < E; ++e) {
        const auto load = static_cast<double>(group_counts[s][e]);
        total += load;
        hottest = std::max(
            hottest,
            load / static_cast<double>(
                       slot_map.empty() ? 1 : slot_map.slots_of(static_cast<int>(e)).size()));
      }
      if (total > 0) {
        result[s].rank_imbalance_floor =
            std::max(result[s].rank_imbalance_floor, std::max(1.0, hottest * G / total));
      }
    }
    // Balancing routers learn from their group's summed counts, as the runtime's do.
    for (std::size_t s = 0; s < settings_.size(); ++s) {
      Router& router = *groups_[g].routers[s];
      if (router.updates_from_counts()) router.update(group_counts[s]);
    }
  }
  // What the layer's own counters would say: rows with their slots to each peer of the
  // group plus the counts for each peer (its rows, then the slots for each of its local
  // experts, as many as the rank with the most: int64 each); results back in the combine
  // dtype.
  for (std::size_t s = 0; s < settings_.size(); ++s) {
    Traffic& t = result[s];
    // With copies: every rank holds ceil((E + R) / G) slots.
    const int redundant = settings_[s].redundant_experts;
    const auto counts_per_peer =
        1 + static_cast<std::uint64_t>(redundant > 0
                                           ? (spec_.num_experts + redundant + G - 1) / G
                                           : ExpertPlacement(spec_.num_experts, G).max_local());
    const std::uint64_t row = dispatch_copy_bytes(spec_, Accounting::kPerRank, slots(s));
    const std::uint64_t back = combine_copy_bytes(spec_);
    t.layer_dispatch_bytes.assign(static_cast<std::size_t>(W), 0);
    t.layer_combine_bytes.assign(static_cast<std::size_t>(W), 0);
    const auto& per_rank = t.copies[static_cast<int>(Accounting::kPerRank)];
    for (int a = 0; a < W; ++a) {
      t.layer_dispatch_bytes[static_cast<std::size_t>(a)] =
          sizeof(std::int64_t) * counts_per_peer * static_cast<std::uint64_t>(G - 1);
      for (int b = 0; b < W; ++b) {
        const auto n = static_cast<std::uint64_t>(
            per_rank[static_cast<std::size_t>(a) * static_cast<std::size_t>(W) +
                     static_cast<std::size_t>(b)]);
        t.layer_dispatch_bytes[static_cast<std::size_t>(a)] += n * row;
        t.layer_combine_bytes[static_cast<std::size_t>(b)] += n * back;
      }
    }
  }
  return result;
}

void Simulator::place_copies(std::size_t g, std::size_t s,
                             const std::function<TensorView(int)>& logits_of) {
  const int G = spec_.group_size();
  const auto E = static_cast<std::size_t>(spec_.num_experts);
  std::vector<double> load(E, 0.0);
  RoutingPlan plan;
  HostStream stream;
  Router& router = *groups_[g].routers[s];
  for (int r = static_cast<int>(g) * G; r < static_cast<int>(g + 1) * G; ++r) {
    RouteInput input;
    input.logits = logits_of(r);
    input.topology = &groups_[g].topology;
    router.route(input, plan, stream);
    for (std::size_t e = 0; e < E; ++e) load[e] += static_cast<double>(plan.counts[e]);
  }
  // Global: any expert's copies on any rank (hot experts are often neighbours, and keeping
  // each node's block of the contiguous placement on its node would leave their node hot).
  ExpertBalanceShape shape;
  shape.num_ranks = G;
  shape.redundant_experts = settings_[s].redundant_experts;
  const ExpertSlots slots = balance_experts(load, shape);
  groups_[g].slot_maps[s] =
      ExpertSlotMap(spec_.num_experts, slots.expert_of_slot, slots.share_of_slot);
}

void Simulator::account(int rank, const RoutingPlan& plan, const ExpertSlotMap& slot_map,
                        Traffic& t) {
  const int W = spec_.world(), G = spec_.group_size(), P = spec_.gpus_per_node;
  const int group_first = rank / G * G;
  const ExpertPlacement placement(spec_.num_experts, G);
  const int K = plan.slots;
  const int own_node = rank / P;
  auto pair = [W](int s, int d) {
    return static_cast<std::size_t>(s) * static_cast<std::size_t>(W) + static_cast<std::size_t>(d);
  };
  auto& per_expert = t.copies[static_cast<int>(Accounting::kPerExpert)];
  auto& per_rank = t.copies[static_cast<int>(Accounting::kPerRank)];
  auto& per_node = t.copies[static_cast<int>(Accounting::kPerNode)];
  // Sampled tokens: spread over the ranks, the first few of each.
  const int sampled_here =
      sample_tokens_ == 0
          ? 0
          : static_cast<int>((static_cast<std::int64_t>(rank + 1) * sample_tokens_ + W - 1) / W -
                             (static_cast<std::int64_t>(rank) * sample_tokens_ + W - 1) / W);
  std::vector<int> hit;  // distinct destination ranks of the current token
  hit.reserve(static_cast<std::size_t>(K));
  for (std::int64_t token = 0; token < plan.num_tokens; ++token) {
    const std::int64_t stamp = ++token_stamp_;
    hit.clear();
    int nodes = 0;
    bool own_node_hit = false;
    const std::int32_t* experts = plan.experts.data() + token * K;
    for (int k = 0; k < K; ++k) {
      const int e = experts[k];
      if (e < 0) continue;
      ++t.assignments;
      ++t.tokens_per_expert[static_cast<std::size_t>(e)];
      const int d =
          group_first + (slot_map.empty() ? placement.rank_of(e)
                                          : slot_map.choose_slot(rank - group_first, token, e) /
                                                (slot_map.num_slots() / G));
      const int node = d / P;
      ++t.tokens_per_rank[static_cast<std::size_t>(d)];
      ++t.tokens_per_node[static_cast<std::size_t>(node)];
      if (d != rank) ++per_expert[pair(rank, d)];
      if (rank_stamp_[static_cast<std::size_t>(d)] == stamp) continue;
      rank_stamp_[static_cast<std::size_t>(d)] = stamp;
      hit.push_back(d);
      if (d != rank) ++per_rank[pair(rank, d)];
      if (node_stamp_[static_cast<std::size_t>(node)] != stamp) {
        node_stamp_[static_cast<std::size_t>(node)] = stamp;
        ++nodes;
        own_node_hit = own_node_hit || node == own_node;
      }
    }
    // Two-level: one copy per remote node to the GPU of this rank's local index there,
    // forwarded inside that node; ranks of this rank's own node get theirs directly.
    for (const int d : hit) {
      const int node = d / P;
      if (node == own_node) {
        if (d != rank) ++per_node[pair(rank, d)];
        continue;
      }
      const int receiver = node * P + rank % P;
      if (node_sent_stamp_[static_cast<std::size_t>(node)] != stamp) {
        node_sent_stamp_[static_cast<std::size_t>(node)] = stamp;
        ++per_node[pair(rank, receiver)];
      }
      if (d != receiver) ++per_node[pair(receiver, d)];
    }
    t.distinct_ranks += static_cast<std::int64_t>(hit.size());
    t.distinct_nodes += nodes;
    t.remote_nodes += nodes - (own_node_hit ? 1 : 0);
    t.max_nodes_per_token = std::max(t.max_nodes_per_token, nodes);
    if (token < sampled_here) {
      t.sample.emplace_back(rank, std::vector<std::int32_t>(experts, experts + K));
    }
  }
}

}  // namespace switchyard::sim
