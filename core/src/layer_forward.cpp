// MoELayer's forward: one sequence for every forward, in `chunks` pipelined chunks. The
// tokens' rows go in chunks whose exchanges run on a thread of their own (or inline, on the
// layer's stream) while this thread packs, groups, runs the experts of and sums another; one
// chunk is the plain sequence route → counts → dispatch → experts → combine → sum. The
// same y for every number of chunks.
#include "layer_internal.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <optional>
#include <utility>

#include "switchyard/status.hpp"
#include "token_exchange.hpp"

namespace switchyard {

using namespace layer_detail;

void ExchangeTask::run(void* task) noexcept {
  auto& t = *static_cast<ExchangeTask*>(task);
  try {
    if (t.back) {
      t.exchange->send_back(*t.handle, t.stream);
    } else {
      t.exchange->send_rows(*t.handle, t.stream);
    }
  } catch (...) {
    t.error = std::current_exception();
  }
}

void MoELayer::forward(const TensorView& x, const TensorView& y) { forward(x, y, nullptr); }

void MoELayer::forward(const TensorView& x, const TensorView& y, StreamEvent& done) {
  forward(x, y, &done);
}

void MoELayer::forward(const TensorView& x, const TensorView& y, Stream& caller) {
  if (caller.device() != stream().device()) {
    throw Error(ErrorCode::kInvalidArgument,
                "MoE forward: the caller's stream runs on " + device_name(caller.device()) +
                    ", the layer's data path on " + device_name(stream().device()));
  }
  // x is written when the caller's work so far is done.
  const std::unique_ptr<StreamEvent> x_written = caller.create_event();
  caller.record(*x_written);
  stream().wait(*x_written);
  if (!caller_y_written_) caller_y_written_ = stream().create_event();
  forward(x, y, caller_y_written_.get());
  caller.wait(*caller_y_written_);
}

void MoELayer::forward(const TensorView& x, const TensorView& y, StreamEvent* done) {
  auto start = Clock::now();
  // A routing failure on one rank must not leave the others waiting in the dispatch, so
  // it is carried to them in the counts exchange instead of being thrown at once.
  std::optional<Error> routing_error;
  try {
    route_queued(x, plan_);  // a device routing's report comes with the counts' wait
  } catch (const Error& e) {
    routing_error = e;
  }
  timings_.route_s = seconds_since(start);
  forward_routed(x, plan_, y, routing_error ? &*routing_error : nullptr, done);
  backward_ready_ = true;  // plan_ and logits_ are this forward's
}

void MoELayer::forward(const TensorView& x, const RoutingPlan& plan, const TensorView& y) {
  backward_ready_ = false;  // no router ran: nothing to differentiate through it
  std::optional<Error> input_error;
  try {
    x.require_on(data_path_->device(), "MoE input x", DType::kF32, {plan.num_tokens, hidden_});
  } catch (const Error& e) {
    input_error = e;
  }
  timings_.route_s = 0;
  forward_routed(x, plan, y, input_error ? &*input_error : nullptr, nullptr);
}

void MoELayer::forward_routed(const TensorView& x, const RoutingPlan& plan, const TensorView& y,
                              const Error* local_error, StreamEvent* done) {
  worst_case_failed_in_step_ = false;
  std::optional<Error> output_error;
  if (local_error == nullptr) {
    try {
      y.require_on(data_path_->device(), "MoE output y", DType::kF32, {x.dim(0), hidden_});
      if (x.numel() > 0 && x.data() == y.data()) {
        throw Error(ErrorCode::kInvalidArgument, "MoE input x and output y must not alias");
      }
    } catch (const Error& e) {
      output_error = e;
      local_error = &*output_error;
    }
  }
  kept_for_backward_ = false;
  // With a slot map the exchange carries slots; the router's plan stays in experts.
  std::optional<Error> plan_error;
  const RoutingPlan* routed = &plan;
  if (local_error == nullptr && !parts_.slot_map.empty()) {
    try {
      routed = &slot_plan(plan);
    } catch (const Error& e) {
      plan_error = e;
      local_error = &*plan_error;
    }
  }
  if (local_error == nullptr) count_load(plan);
  if (worst_case_forward()) {
    forward_worst_case(x, plan, y, local_error, std::exchange(device_routing_pending_, false),
                       done);
    return;
  }
  const bool save = saves_for_backward();
  // Chunks pipeline the host data path's steps; a forward that keeps its rows for the
  // backward, or a device data path, runs one.
  const bool host = data_path_->device().kind == Device::Kind::kHost;
  const int chunks = host && !save ? parts_.chunks : 1;
  forward_pipeline(x, *routed, y, local_error, chunks, save, done);
  kept_for_backward_ = save;
}

void MoELayer::forward_pipeline(const TensorView& x, const RoutingPlan& plan, const TensorView& y,
                                const Error* local_error, int n, bool save,
                                StreamEvent* y_written) {
  auto start = Clock::now();
  timings_.layout_s = timings_.experts_s = timings_.combine_s = 0;
  agree_counts(plan, n, local_error);  // throws on every rank together
  exchange_->count_traffic();
  timings_.dispatch_s = seconds_since(start);
  const std::int64_t H = hidden_;
  const int K = plan.slots;
  const bool fused =
      expert_caps_.fuses_weighted_rows && !save && parts_.combine_order == CombineOrder::kRank;
  // The expert rows a forward hands the kernel: its dtypes, or f32 when they are kept.
  const TokenExchange::ExpertRowDTypes dtypes =
      save ? TokenExchange::ExpertRowDTypes{}
           : TokenExchange::ExpertRowDTypes{expert_caps_.input_dtype, expert_caps_.output_dtype};
  // The exchanges run on a thread of their own where something can overlap them: other
  // chunks, or the shared expert. Else inline on the layer's stream, in the order they are
  // launched (the same on every rank, so the collectives match).
  const bool host = data_path_->device().kind == Device::Kind::kHost;
  const bool threaded = host && parts_.overlap_exchanges && (n > 1 || parts_.shared_expert);

  // Up to three chunks are in flight: one exchanging its rows, one being staged, one
  // whose partial sums travel back.
  const std::size_t in_flight = std::min<std::size_t>(static_cast<std::size_t>(n), 3);
  if (threaded && !workspace_->exchange_stream)
    workspace_->exchange_stream = std::make_unique<HostStream>(HostStream::Mode::kQueued);
  while (workspace_->chunk_slots.size() < in_flight)
    workspace_->chunk_slots.push_back(std::make_unique<ChunkSlot>());
  auto slot_of = [&](int c) -> ChunkSlot& {
    return *workspace_->chunk_slots[static_cast<std::size_t>(c) % in_flight];
  };
  // A kept forward holds its rows in the layer's own handle until the backward.
  auto handle_of = [&](int c) -> DispatchHandle& {
    return save ? kept_handle_ : slot_of(c).handle;
  };
  auto launch = [&](ExchangeTask& task, std::unique_ptr<StreamEvent>& done) {
    if (threaded) {
      if (!done) done = workspace_->exchange_stream->create_event();
      workspace_->exchange_stream->enqueue(&ExchangeTask::run, &task);
      workspace_->exchange_stream->record(*done);
    } else {
      task.stream = &stream();
      ExchangeTask::run(&task);
    }
  };
  auto wait = [&](const std::unique_ptr<StreamEvent>& done, ExchangeTask& task) {
    if (threaded) {
      done->synchronize();
    } else {
      data_path_ready();  // the host data path reads what arrived
    }
    if (task.error) std::rethrow_exception(std::exchange(task.error, nullptr));
  };
  auto start_dispatch = [&](int c) {
    const auto stage_start = Clock::now();
    const std::int64_t first = exchange_->first_token(c);
    DispatchHandle& h = handle_of(c);
    exchange_->stage({x.data_as<const float>() + first * H, plan.experts.data() + first * K,
                      plan.weights.data() + first * K, exchange_->first_token(c + 1) - first, K},
                     c, h);
    timings_.layout_s += seconds_since(stage_start);
    ChunkSlot& slot = slot_of(c);
    slot.dispatch = {exchange_.get(), &h, nullptr, false, nullptr};
    launch(slot.dispatch, slot.dispatched);
  };
  auto finish = [&](int c) {
    ChunkSlot& slot = slot_of(c);
    const auto sum_start = Clock::now();
    wait(slot.combined, slot.combine);
    exchange_->sum(handle_of(c), y.data_as<float>() + exchange_->first_token(c) * H);
    timings_.combine_s += seconds_since(sum_start);
  };

  try {
    start_dispatch(0);
    if (parts_.shared_expert) {
      // On this rank's own tokens, while the first rows travel.
      const auto shared_start = Clock::now();
      run_shared_expert(x);
      timings_.experts_s += seconds_since(shared_start);
    }
    for (int c = 0; c < n; ++c) {
      if (c + 1 < n) start_dispatch(c + 1);  // packs while chunk c's rows travel
      ChunkSlot& slot = slot_of(c);
      DispatchHandle& h = handle_of(c);
      start = Clock::now();
      wait(slot.dispatched, slot.dispatch);
      timings_.dispatch_s += seconds_since(start);
      if (fused) {
        start = Clock::now();
        run_fused_experts(h);
        timings_.experts_s += seconds_since(start);
        start = Clock::now();
      } else {
        start = Clock::now();
        exchange_->group(h, dtypes);
        timings_.layout_s += seconds_since(start);
        start = Clock::now();
        run_grouped_experts(h, save);
        timings_.experts_s += seconds_since(start);
        start = Clock::now();
        const TensorView chunk_y(y.data_as<float>() + exchange_->first_token(c) * H, DType::kF32,
                                 {h.num_tokens_, H}, y.device());
        // The expert rows stay alive for the backward when they are kept.
        exchange_->reduce(h, h.expert_output(), chunk_y, /*in_expert_buffers=*/!save);
      }
      slot.combine = {exchange_.get(), &h, nullptr, true, nullptr};
      launch(slot.combine, slot.combined);
      timings_.combine_s += seconds_since(start);
      if (c > 0) finish(c - 1);  // sums chunk c-1 while chunk c's partials travel
    }
    finish(n - 1);
  } catch (...) {
    // The exchanges already queued reference the chunk buffers: let them end first.
    try {
      if (threaded) workspace_->exchange_stream->synchronize();
    } catch (...) {  // NOLINT(bugprone-empty-catch): the first error is the one to report
    }
    throw;
  }
  if (parts_.shared_expert) add_shared_expert(y);
  // A device data path's last sum may still be queued: y is written when `y_written` says
  // so, or when this returns.
  if (y_written != nullptr) {
    stream().record(*y_written);
  } else {
    host_ready();
  }
}

namespace {

/// The worst-case mode's failure mark: the first slot of the last row of a rank's block for
/// a peer, when the rank's input was refused (a real row's first slot is never empty).
constexpr SlotMeta kSenderFailed{-2, 0.0f};
constexpr SlotMeta kSenderFine{-1, 0.0f};

}  // namespace

bool MoELayer::worst_case_forward() const noexcept {
  // A training forward's backward needs the routing statistics (the aux and z losses) of
  // its own step, which this mode does not gather: it counts as usual.
  return parts_.max_tokens_per_rank > 0 && !training_;
}

void MoELayer::forward_worst_case(const TensorView& x, const RoutingPlan& plan, const TensorView& y,
                                  const Error* local_error, bool device_routed,
                                  StreamEvent* y_written) {
  const auto start = Clock::now();
  timings_.layout_s = timings_.experts_s = timings_.combine_s = 0;
  const std::int64_t M = parts_.max_tokens_per_rank;
  const int K = parts_.router->slots_per_token();
  std::optional<Error> refused;
  if (local_error == nullptr && plan.num_tokens > M) {
    refused = Error(
        ErrorCode::kInvalidArgument,
        "MoE forward: " + std::to_string(plan.num_tokens) +
            " tokens on this rank, more than [runtime] max_tokens_per_rank = " + std::to_string(M));
  } else if (local_error == nullptr && plan.slots != K) {
    // Every rank's slots travel in rows of K: a plan of other slots cannot be sent.
    refused = Error(ErrorCode::kInvalidArgument,
                    "MoE forward: a plan of " + std::to_string(plan.slots) +
                        " slots per token; this layer's router gives " + std::to_string(K));
  } else if (local_error == nullptr) {
    refused = exchange_->check_plan(plan);
  }
  if (refused) local_error = &*refused;
  // Reports of earlier steps that have finished (a full ring waits for its oldest).
  std::optional<Error> earlier = collect_worst_case_reports(false);
  if (worst_case_reports_.size() < kWorstCaseReportsInFlight) {
    worst_case_reports_.emplace_back();
  } else if (worst_case_reports_[next_report_].pending) {
    if (std::optional<Error> e = collect_worst_case_reports(true); e && !earlier) earlier = e;
  }
  WorstCaseReport& report = worst_case_reports_[next_report_];
  next_report_ = (next_report_ + 1) % kWorstCaseReportsInFlight;

  // A rank whose input was refused still serves its experts, with no tokens of its own:
  // its peers' step completes, and only it throws.
  const std::int64_t T = local_error != nullptr ? 0 : plan.num_tokens;
  device_routed = device_routed && local_error == nullptr;
  exchange_->assume_worst_case(T, K, M);
  exchange_->count_traffic();
  while (workspace_->chunk_slots.empty())
    workspace_->chunk_slots.push_back(std::make_unique<ChunkSlot>());
  DispatchHandle& h = workspace_->chunk_slots.front()->handle;
  exchange_->stage(
      {T > 0 ? x.data_as<const float>() : nullptr, plan.experts.data(), plan.weights.data(), T, K},
      0, h);
  const auto R = static_cast<std::size_t>(parts_.transport->size());
  const auto self = static_cast<std::size_t>(parts_.transport->rank());
  const auto last_slot = [&](std::size_t p) {
    return static_cast<std::int64_t>((p + 1) * to_size(M) - 1) * K;
  };
  if (local_error != nullptr) {
    // The peers learn of it in the rows: the last row of each block, padding since this
    // rank sends no token, says so in its first slot.
    for (std::size_t p = 0; p < R; ++p) {
      if (p == self) continue;
      data_path_->copy(h.send_meta_.data() + last_slot(p), &kSenderFailed, sizeof(SlotMeta),
                       stream());
    }
  }
  // The checks the host makes later: the plan's counts from a device routing, the
  // layout's first bad expert id, and the peers' failure marks (with the rows).
  const auto E = static_cast<std::size_t>(num_experts());
  if (!report.done) {
    report.done = stream().create_event();
    report.words = Buffer<std::int64_t>(data_path_->staging_allocator());
  }
  report.words.resize(E + 1 + R);
  if (device_routed) {
    data_path_->copy(report.words.data(), plan.counts.data(), E * sizeof(std::int64_t), stream());
  }
  data_path_->copy(report.words.data() + E, h.first_bad_slot_.data(), sizeof(std::int64_t),
                   stream());
  report.tokens = T;
  report.slots = K;
  report.device_routed = device_routed;
  report.refused = local_error != nullptr;
  report.pending = true;
  timings_.layout_s = seconds_since(start);

  if (parts_.shared_expert && local_error == nullptr) run_shared_expert(x);
  auto step = Clock::now();
  exchange_->send_rows(h, &stream());
  data_path_ready();
  static_assert(sizeof(SlotMeta) == sizeof(std::int64_t));
  for (std::size_t p = 0; p < R; ++p) {
    if (p == self) {
      std::memcpy(report.words.data() + E + 1 + p, &kSenderFine, sizeof(SlotMeta));
    } else {
      data_path_->copy(report.words.data() + E + 1 + p, h.recv_meta_.data() + last_slot(p),
                       sizeof(SlotMeta), stream());
    }
  }
  stream().record(*report.done);
  timings_.dispatch_s = seconds_since(step);
  const TensorView y_rows(local_error != nullptr ? nullptr : y.data(), DType::kF32, {T, hidden_},
                          y.device());
  step = Clock::now();
  if (expert_caps_.fuses_weighted_rows) {
    run_fused_experts(h);  // padding rows have no slots: their partial sums are 0
  } else {
    exchange_->group(h, {expert_caps_.input_dtype, expert_caps_.output_dtype}, 1,
                     /*finite_blocks=*/!expert_caps_.masked_rows);
    run_grouped_experts(h, false, /*worst_case=*/true);
    exchange_->reduce(h, h.expert_output(), y_rows, /*in_expert_buffers=*/true);
  }
  timings_.experts_s = seconds_since(step);
  step = Clock::now();
  exchange_->send_back(h, &stream());
  data_path_ready();
  exchange_->sum(h, y_rows.data_as<float>());
  if (parts_.shared_expert && local_error == nullptr) add_shared_expert(y);
  timings_.combine_s = seconds_since(step);
  if (y_written != nullptr) {
    stream().record(*y_written);
  } else {
    host_ready();
  }
  // Every rank's work is queued: a failure thrown now leaves the group in step.
  if (!earlier) earlier = collect_worst_case_reports(false);
  worst_case_failed_in_step_ = local_error != nullptr || earlier.has_value();
  if (local_error != nullptr) throw *local_error;
  if (earlier) throw *earlier;
}

std::optional<Error> MoELayer::collect_worst_case_reports(bool wait) {
  std::optional<Error> first;
  const std::size_t n = worst_case_reports_.size();
  for (std::size_t i = 0; i < n; ++i) {
    WorstCaseReport& report = worst_case_reports_[(next_report_ + i) % n];
    if (!report.pending) continue;
    if (wait) {
      report.done->synchronize();
    } else if (!report.done->query()) {
      break;  // the later ones are not done either
    }
    report.pending = false;
    if (report.refused) continue;  // its step threw this rank's own error
    const auto E = static_cast<std::size_t>(num_experts());
    const std::int64_t* words = report.words.data();
    for (std::size_t p = 0; p < report.words.size() - E - 1; ++p) {
      SlotMeta mark{};
      std::memcpy(&mark, words + E + 1 + p, sizeof mark);
      if (mark.local_expert == kSenderFailed.local_expert && !first) {
        first = Error(ErrorCode::kPeerFailed,
                      "MoE forward (max_tokens_per_rank): world rank " +
                          std::to_string(parts_.first_world_rank + static_cast<int>(p)) +
                          " refused its input and sent no tokens; it reports the cause");
      }
    }
    const std::int64_t bad_slot = words[E];
    if (bad_slot >= 0 && !first) {
      first = Error(ErrorCode::kInvalidArgument,
                    "MoE forward (max_tokens_per_rank), an earlier step: routing plan: token " +
                        std::to_string(bad_slot / report.slots) + " slot " +
                        std::to_string(bad_slot % report.slots) + " has an expert outside 0.." +
                        std::to_string(E - 1) + "; the token was not sent");
    }
    if (!report.device_routed) continue;
    // Into the device routing's statistics (their vectors keep their size: no allocation).
    RouterStats& stats = device_stats_;
    stats.counts.assign(words, words + E);
    stats.tokens = report.tokens;
    stats.top_k = report.slots;
    stats.dropped = 0;
    stats.z_loss_sum = 0;
    stats.probability_sums.assign(E, 0.0);  // not gathered in this mode
    stats.aux_counts.assign(E, 0);
    finish_router_stats(stats);
    parts_.router->adopt_stats(stats);
    std::int64_t kept = 0;
    for (std::size_t e = 0; e < E; ++e) kept += words[e];
    // A device routing fills every slot of a token unless its logits are bad.
    const std::int64_t missing = report.tokens * report.slots - kept;
    if (missing > 0 && !first) {
      first = Error(
          ErrorCode::kInvalidArgument,
          "router " + parts_.router->name() + " (max_tokens_per_rank), an earlier step: " +
              std::to_string(missing / report.slots) + " of its " + std::to_string(report.tokens) +
              " tokens had a NaN or infinite logit and went to no expert");
    }
  }
  return first;
}

std::optional<Error> MoELayer::wait_worst_case_steps() { return collect_worst_case_reports(true); }

void MoELayer::finish_worst_case_steps() {
  if (std::optional<Error> e = wait_worst_case_steps()) throw *e;
}

std::optional<Error> first_non_finite(const TensorView& m, std::string_view what) {
  const float* data = m.data_as<const float>();
  const std::int64_t H = m.dim(1);
  for (std::int64_t i = 0; i < m.dim(0) * H; ++i) {
    if (!std::isfinite(data[i])) {
      return Error(ErrorCode::kInvalidArgument,
                   std::string(what) + ": token " + std::to_string(i / H) + " feature " +
                       std::to_string(i % H) + " is " + (std::isnan(data[i]) ? "NaN" : "infinite"));
    }
  }
  return std::nullopt;
}

}  // namespace switchyard
