// Runtime: diagnostics (the dense reference of a layer and of the model, routing
// statistics, timings and traffic over all ranks).
#include "runtime_internal.hpp"

#include <algorithm>
#include <cmath>
#include <exception>
#include <map>
#include <mutex>
#include <optional>
#include <system_error>
#include <thread>
#include <utility>

#include "switchyard/bootstrap.hpp"
#include "switchyard/checkpoint.hpp"
#include "switchyard/io.hpp"
#include "switchyard/memory_budget.hpp"
#include "switchyard/reference.hpp"
#include "switchyard/status.hpp"

namespace switchyard {

using namespace runtime_detail;

void Runtime::reference_forward(const TensorView& x, const TensorView& y, int index) const {
  const ModelWeights& m = model(index);
  x.require("input tokens", DType::kF32, {-1, m.hidden()});
  y.require("reference output", DType::kF32, {x.dim(0), m.hidden()});
  const ConfigSection& router_options = state_->settings->section("router");
  RouterCreateArgs args;
  args.options = &router_options;
  args.num_experts = m.num_experts();
  args.checkpoint_bias = m.bias();
  auto router = state_->registry->create_router(router_options.get_string("policy"), args);
  const int world = world_size();
  std::vector<float> logits;
  RoutingPlan plan;
  HostStream stream;
  // Route each rank's block the way that rank does, then evaluate it densely.
  for (int rank = 0; rank < world; ++rank) {
    const auto [first, count] = token_block(x.dim(0), world, rank);
    const TensorView block = rows(x, first, count);
    logits.resize(static_cast<std::size_t>(count * m.num_experts()));
    compute_router_logits(block, m.gate().view(), logits.data());
    RouteInput input;
    input.logits = TensorView(logits.data(), DType::kF32, {count, m.num_experts()});
    input.topology = &topology();
    if (const TensorView& ids = state_->token_ids; ids.data() != nullptr) {
      // set_token_ids' ids, as the next forward takes them.
      require_token_ids(ids, x.dim(0));
      input.token_ids = id_rows(ids, first, count);
    }
    router->route(input, plan, stream);
    dense_moe_reference(m, plan, block, rows(y, first, count));
  }
}

void Runtime::reference_model(const TensorView& x, const TensorView& y) const {
  const std::int64_t H = model().hidden();
  x.require("input tokens", DType::kF32, {-1, H});
  y.require("reference output", DType::kF32, {x.dim(0), H});
  HostTensor in(DType::kF32, {x.dim(0), H});
  std::copy_n(x.data_as<const float>(), x.numel(), in.data<float>());
  for (int index = 0; index < num_layers(); ++index) {
    reference_forward(in.view(), y, index);
    if (residual()) add_rows(in.view(), y);
    std::copy_n(y.data_as<const float>(), y.numel(), in.data<float>());
  }
}

void Runtime::finish_worst_case_steps() {
  std::optional<Error> first;
  for (int local = 0; local < num_local_ranks(); ++local) {
    for (int index = 0; index < num_layers(); ++index) {
      std::optional<Error> e = layer(local, index).wait_worst_case_steps();
      if (e && !first) first = std::move(e);
    }
  }
  if (first) throw *first;
}

GlobalRouterStats Runtime::global_router_stats(int index) {
  check_layer(index, "global_router_stats");
  const int E = model(index).num_experts();
  const auto e_size = static_cast<std::size_t>(E);
  GlobalRouterStats result;
  std::vector<double> probability_sums(e_size, 0.0);
  std::vector<std::int64_t> aux_counts(e_size, 0);
  double z_loss_sum = 0;
  std::mutex mutex;
  // The worst-case mode's statistics, waited for; a failure they report is thrown once the
  // collectives are done, outside run_on_ranks (which would abort the transports).
  std::vector<std::optional<Error>> late(static_cast<std::size_t>(num_local_ranks()));
  run_on_ranks([&](int local) {
    late[static_cast<std::size_t>(local)] = layer(local, index).wait_worst_case_steps();
    const RouterStats& s = layer(local, index).router().stats();
    // [counts E | aux counts E | dropped | tokens] and [probability sums E | z-loss sum].
    std::vector<std::int64_t> ints(2 * e_size + 2, 0);
    std::vector<double> reals(e_size + 1, 0.0);
    std::copy(s.counts.begin(), s.counts.end(), ints.begin());
    std::copy(s.aux_counts.begin(), s.aux_counts.end(), ints.begin() + E);
    ints[2 * e_size] = s.dropped;
    ints[2 * e_size + 1] = s.tokens;
    std::copy(s.probability_sums.begin(), s.probability_sums.end(), reals.begin());
    reals[e_size] = s.z_loss_sum;
    world_transport(local).allreduce(ints.data(), ints.size(), DType::kI64, ReduceOp::kSum);
    world_transport(local).allreduce(reals.data(), reals.size(), DType::kF64, ReduceOp::kSum);
    if (local != 0) return;
    std::lock_guard<std::mutex> lock(mutex);
    result.counts.assign(ints.begin(), ints.begin() + E);
    aux_counts.assign(ints.begin() + E, ints.begin() + 2 * static_cast<std::ptrdiff_t>(E));
    result.dropped = ints[2 * e_size];
    result.tokens = ints[2 * e_size + 1];
    probability_sums.assign(reals.begin(), reals.begin() + E);
    z_loss_sum = reals[e_size];
  });
  for (const std::optional<Error>& e : late)
    if (e) throw *e;
  // The losses of all ranks' tokens from the summed parts, as one router would compute them.
  RouterStats sums;
  sums.counts = result.counts;
  sums.tokens = result.tokens;
  sums.probability_sums = std::move(probability_sums);
  sums.aux_counts = std::move(aux_counts);
  sums.z_loss_sum = z_loss_sum;
  sums.top_k = layer(0, index).router().stats().top_k;
  finish_router_stats(sums);
  result.imbalance = sums.imbalance;
  result.aux_loss = sums.aux_loss;
  result.z_loss = sums.z_loss;
  return result;
}

LayerTimings Runtime::max_timings(int index) {
  check_layer(index, "max_timings");
  LayerTimings result;
  run_on_ranks([&](int local) {
    MoELayer& l = layer(local, index);
    const LayerTimings& t = l.timings();
    double v[5] = {t.route_s, t.layout_s, t.dispatch_s, t.experts_s, t.combine_s};
    world_transport(local).allreduce(v, 5, DType::kF64, ReduceOp::kMax);
    if (local == 0) result = {v[0], v[1], v[2], v[3], v[4]};
  });
  return result;
}

LayerTraffic Runtime::total_traffic(int index) {
  check_layer(index, "total_traffic");
  LayerTraffic result;
  run_on_ranks([&](int local) {
    MoELayer& l = layer(local, index);
    const LayerTraffic& t = l.traffic();
    std::int64_t v[3] = {static_cast<std::int64_t>(t.dispatch_bytes),
                         static_cast<std::int64_t>(t.combine_bytes), t.rows_sent};
    world_transport(local).allreduce(v, 3, DType::kI64, ReduceOp::kSum);
    if (local == 0) {
      result = {static_cast<std::uint64_t>(v[0]), static_cast<std::uint64_t>(v[1]), v[2]};
    }
  });
  return result;
}

}  // namespace switchyard
