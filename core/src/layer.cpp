// One MoE layer on one rank: route → dispatch → experts → combine.
//
// Wire format of a dispatched row: H floats of the token, then K (local expert, weight)
// slots (8 bytes each, stored in the same float buffer). A token goes once to each rank
// that holds any of its experts. Partial sums are formed on the expert side, so the
// combine sends back one row per dispatched row.
#include "switchyard/layer.hpp"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <optional>

#include "switchyard/status.hpp"

namespace switchyard {
namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

std::size_t to_size(std::int64_t v) { return static_cast<std::size_t>(v); }

/// Floats one (local expert, weight) slot takes in a dispatched row.
constexpr std::int64_t kSlotFloats = 2;

std::byte* as_bytes(float* p) { return reinterpret_cast<std::byte*>(p); }

}  // namespace

ExpertPlacement::ExpertPlacement(int num_experts, int num_ranks)
    : num_experts_(num_experts), num_ranks_(num_ranks) {
  if (num_experts < 1 || num_ranks < 1) {
    throw Error(ErrorCode::kInvalidArgument, "expert placement needs at least one expert and rank");
  }
}

int ExpertPlacement::first_expert(int rank) const noexcept {
  const int base = num_experts_ / num_ranks_;
  const int extra = num_experts_ % num_ranks_;
  return rank * base + (rank < extra ? rank : extra);
}

int ExpertPlacement::num_local(int rank) const noexcept {
  return num_experts_ / num_ranks_ + (rank < num_experts_ % num_ranks_ ? 1 : 0);
}

int ExpertPlacement::rank_of(int expert) const noexcept {
  const int base = num_experts_ / num_ranks_;
  const int extra = num_experts_ % num_ranks_;
  const int boundary = extra * (base + 1);
  if (expert < boundary) return expert / (base + 1);
  return extra + (expert - boundary) / base;
}

void compute_router_logits(const TensorView& x, const TensorView& gate, float* logits) {
  const std::int64_t T = x.dim(0), H = x.dim(1), E = gate.dim(0);
  const float* xs = x.data_as<const float>();
  const float* g = gate.data_as<const float>();
  for (std::int64_t t = 0; t < T; ++t) {
    const float* row = xs + t * H;
    for (std::int64_t e = 0; e < E; ++e) {
      const float* w = g + e * H;
      float acc = 0.0f;
      for (std::int64_t h = 0; h < H; ++h) acc += row[h] * w[h];
      logits[t * E + e] = acc;
    }
  }
}

TensorView DispatchHandle::expert_input() noexcept {
  const std::int64_t rows = hidden_ ? static_cast<std::int64_t>(expert_input_.size()) / hidden_ : 0;
  return TensorView(expert_input_.data(), DType::kF32, {rows, hidden_});
}

TensorView DispatchHandle::expert_output() noexcept {
  const std::int64_t rows =
      hidden_ ? static_cast<std::int64_t>(expert_output_.size()) / hidden_ : 0;
  return TensorView(expert_output_.data(), DType::kF32, {rows, hidden_});
}

MoELayer::MoELayer(MoELayerParts parts) : parts_(std::move(parts)) {
  if (parts_.transport == nullptr || !parts_.router || !parts_.experts) {
    throw Error(ErrorCode::kInvalidArgument, "MoELayer needs a transport, a router and experts");
  }
  parts_.gate.require("MoELayer gate", DType::kF32, {parts_.placement.num_experts(), -1});
  hidden_ = parts_.gate.dim(1);
  const int rank = parts_.transport->rank();
  if (parts_.placement.num_ranks() != parts_.transport->size()) {
    throw Error(ErrorCode::kInvalidArgument,
                "MoELayer: placement over " + std::to_string(parts_.placement.num_ranks()) +
                    " ranks but the EP group has " + std::to_string(parts_.transport->size()));
  }
  if (parts_.router->num_experts() != parts_.placement.num_experts()) {
    throw Error(ErrorCode::kInvalidArgument,
                "MoELayer: router configured for " + std::to_string(parts_.router->num_experts()) +
                    " experts, model has " + std::to_string(parts_.placement.num_experts()));
  }
  if (parts_.experts->num_local_experts() != parts_.placement.num_local(rank)) {
    throw Error(ErrorCode::kInvalidArgument,
                "MoELayer: expert kernel holds " +
                    std::to_string(parts_.experts->num_local_experts()) + " experts, rank " +
                    std::to_string(rank) + " should hold " +
                    std::to_string(parts_.placement.num_local(rank)));
  }
}

void MoELayer::route(const TensorView& x, RoutingPlan& plan) {
  x.require("MoE input x", DType::kF32, {-1, hidden_});
  const std::int64_t T = x.dim(0);
  const std::int64_t E = parts_.placement.num_experts();
  logits_.resize(to_size(T * E));
  compute_router_logits(x, parts_.gate, logits_.data());
  RouteInput input;
  input.logits = TensorView(logits_.data(), DType::kF32, {T, E});
  input.topology = &parts_.transport->topology();
  parts_.router->route(input, plan);
}

void MoELayer::forward(const TensorView& x, const TensorView& y) {
  auto start = Clock::now();
  // A routing failure on one rank must not leave the others waiting in the dispatch, so
  // it is carried to them in the counts exchange instead of being thrown at once.
  std::optional<Error> routing_error;
  try {
    route(x, plan_);
    y.require("MoE output y", DType::kF32, {x.dim(0), hidden_});
    if (x.numel() > 0 && x.data() == y.data()) {
      throw Error(ErrorCode::kInvalidArgument, "MoE input x and output y must not alias");
    }
  } catch (const Error& e) {
    routing_error = e;
  }
  timings_.route_s = seconds_since(start);
  dispatch_impl(x, plan_, handle_, routing_error ? &*routing_error : nullptr);

  start = Clock::now();
  ExpertBatch batch;
  batch.input = handle_.expert_input();
  batch.rows_per_expert = handle_.rows_per_expert_;
  batch.output = handle_.expert_output();
  parts_.experts->forward(batch);
  timings_.experts_s = seconds_since(start);

  combine(handle_, handle_.expert_output(), y);
}

void MoELayer::dispatch(const TensorView& x, const RoutingPlan& plan, DispatchHandle& handle) {
  std::optional<Error> input_error;
  try {
    x.require("MoE dispatch input x", DType::kF32, {plan.num_tokens, hidden_});
  } catch (const Error& e) {
    input_error = e;
  }
  dispatch_impl(x, plan, handle, input_error ? &*input_error : nullptr);
}

void MoELayer::dispatch_impl(const TensorView& x, const RoutingPlan& plan, DispatchHandle& h,
                             const Error* local_error) {
  auto start = Clock::now();
  failure_agreed_ = false;
  Transport& transport = *parts_.transport;
  const ExpertPlacement& placement = parts_.placement;
  const int R = transport.size();
  const int me = transport.rank();
  const std::int64_t H = hidden_;
  const int E = placement.num_experts();
  const std::int64_t T = local_error ? 0 : plan.num_tokens;
  const int K = plan.slots;
  const auto r_size = static_cast<std::size_t>(R);

  std::optional<Error> plan_error;
  if (local_error == nullptr) {
    if (K < 1 || plan.experts.size() != to_size(T * K) || plan.weights.size() != to_size(T * K)) {
      plan_error = Error(ErrorCode::kInvalidArgument, "routing plan shape does not match " +
                                                          std::to_string(T) + " tokens x " +
                                                          std::to_string(K) + " slots");
    } else {
      for (std::size_t i = 0; i < plan.experts.size(); ++i) {
        const std::int32_t e = plan.experts[i];
        if (e < -1 || e >= E) {
          plan_error = Error(ErrorCode::kInvalidArgument,
                             "routing plan: token " + std::to_string(i / to_size(K)) + " slot " +
                                 std::to_string(i % to_size(K)) + " has expert " +
                                 std::to_string(e) + ", outside 0.." + std::to_string(E - 1));
          break;
        }
      }
    }
    if (plan_error) local_error = &*plan_error;
  }

  h.hidden_ = H;
  h.num_tokens_ = local_error ? 0 : T;
  h.slots_ = K;
  const std::int64_t row_floats = H + kSlotFloats * K;  // the token, then K slots
  const std::int64_t row_bytes = row_floats * static_cast<std::int64_t>(sizeof(float));

  // Rows per destination: each token once per rank that holds one of its experts.
  h.rows_to_.assign(r_size, 0);
  h.scratch_.assign(3 * r_size, -1);
  std::int64_t* stamp = h.scratch_.data();
  std::int64_t* cursor = stamp + R;
  std::int64_t* current_row = cursor + R;
  if (local_error == nullptr) {
    for (std::int64_t t = 0; t < T; ++t) {
      for (int j = 0; j < K; ++j) {
        const std::int32_t e = plan.experts[to_size(t * K + j)];
        if (e < 0) continue;
        const int d = placement.rank_of(e);
        if (stamp[d] != t) {
          stamp[d] = t;
          ++h.rows_to_[static_cast<std::size_t>(d)];
        }
      }
    }
  } else {
    h.rows_to_.assign(r_size, -1);  // tells every peer that this rank failed
  }
  timings_.layout_s = seconds_since(start);

  start = Clock::now();
  h.rows_from_.resize(r_size);
  transport.alltoall(h.rows_to_.data(), h.rows_from_.data(), sizeof(std::int64_t));
  const double counts_s = seconds_since(start);
  // From here every rank of the group knows whether any rank failed: they all stop at
  // this same point, and the group stays usable for the next step.
  if (local_error != nullptr) {
    failure_agreed_ = true;
    throw *local_error;
  }
  for (int p = 0; p < R; ++p) {
    if (h.rows_from_[static_cast<std::size_t>(p)] < 0) {
      failure_agreed_ = true;
      throw Error(ErrorCode::kPeerFailed, "MoE dispatch: rank " + std::to_string(p) +
                                              " failed before dispatch and reports the cause");
    }
  }

  start = Clock::now();
  h.rows_to_offset_.resize(r_size);
  h.rows_from_offset_.resize(r_size);
  h.send_bytes_.resize(r_size);
  h.send_offsets_.resize(r_size);
  h.recv_bytes_.resize(r_size);
  h.recv_offsets_.resize(r_size);
  std::int64_t S = 0, received = 0;
  for (std::size_t p = 0; p < r_size; ++p) {
    h.rows_to_offset_[p] = S;
    h.rows_from_offset_[p] = received;
    h.send_bytes_[p] = to_size(h.rows_to_[p] * row_bytes);
    h.send_offsets_[p] = to_size(S * row_bytes);
    h.recv_bytes_[p] = to_size(h.rows_from_[p] * row_bytes);
    h.recv_offsets_[p] = to_size(received * row_bytes);
    S += h.rows_to_[p];
    received += h.rows_from_[p];
  }

  // Pack: rows in (destination, token) order, each with its (local expert, weight) slots.
  h.send_rows_.resize(to_size(S * row_floats));
  h.send_row_token_.resize(to_size(S));
  const DispatchHandle::SlotMeta empty{-1, 0.0f};
  for (std::int64_t s = 0; s < S; ++s) {
    for (int j = 0; j < K; ++j) {
      std::memcpy(&h.send_rows_[to_size(s * row_floats + H + kSlotFloats * j)], &empty,
                  sizeof empty);
    }
  }
  for (int d = 0; d < R; ++d) {
    stamp[d] = -1;
    cursor[d] = h.rows_to_offset_[static_cast<std::size_t>(d)];
  }
  const float* xs = x.data_as<const float>();
  for (std::int64_t t = 0; t < T; ++t) {
    for (int j = 0; j < K; ++j) {
      const std::int32_t e = plan.experts[to_size(t * K + j)];
      if (e < 0) continue;
      const int d = placement.rank_of(e);
      if (stamp[d] != t) {
        stamp[d] = t;
        current_row[d] = cursor[d]++;
        std::memcpy(&h.send_rows_[to_size(current_row[d] * row_floats)], xs + t * H,
                    to_size(H) * sizeof(float));
        h.send_row_token_[to_size(current_row[d])] = t;
      }
      float* slots = &h.send_rows_[to_size(current_row[d] * row_floats + H)];
      for (int k = 0; k < K; ++k) {
        DispatchHandle::SlotMeta m;
        std::memcpy(&m, slots + kSlotFloats * k, sizeof m);
        if (m.local_expert >= 0) continue;
        m = {e - placement.first_expert(d), plan.weights[to_size(t * K + j)]};
        std::memcpy(slots + kSlotFloats * k, &m, sizeof m);
        break;
      }
    }
  }
  double layout_s = seconds_since(start);

  start = Clock::now();
  h.recv_rows_.resize(to_size(received * row_floats));
  transport.alltoallv({as_bytes(h.send_rows_.data()), h.send_bytes_, h.send_offsets_,
                       as_bytes(h.recv_rows_.data()), h.recv_bytes_, h.recv_offsets_});
  timings_.dispatch_s = counts_s + seconds_since(start);

  // Group the received rows per local expert (stable: source rank, then source token).
  start = Clock::now();
  const int L = placement.num_local(me);
  h.rows_per_expert_.assign(static_cast<std::size_t>(L), 0);
  h.scratch_.assign(static_cast<std::size_t>(L), 0);
  h.assignment_of_slot_.resize(to_size(received * K));
  for (std::int64_t r = 0; r < received; ++r) {
    const float* slots = &h.recv_rows_[to_size(r * row_floats + H)];
    for (int j = 0; j < K; ++j) {
      DispatchHandle::SlotMeta m;
      std::memcpy(&m, slots + kSlotFloats * j, sizeof m);
      if (m.local_expert < 0) continue;
      if (m.local_expert >= L) {
        throw Error(ErrorCode::kInternal, "MoE dispatch: received a row for local expert " +
                                              std::to_string(m.local_expert) + " but rank " +
                                              std::to_string(me) + " holds " + std::to_string(L));
      }
      ++h.rows_per_expert_[static_cast<std::size_t>(m.local_expert)];
    }
  }
  std::int64_t A = 0;
  for (int l = 0; l < L; ++l) {
    h.scratch_[static_cast<std::size_t>(l)] = A;
    A += h.rows_per_expert_[static_cast<std::size_t>(l)];
  }
  h.expert_input_.resize(to_size(A * H));
  h.expert_output_.resize(to_size(A * H));
  for (std::int64_t r = 0; r < received; ++r) {
    const float* row = &h.recv_rows_[to_size(r * row_floats)];
    for (int j = 0; j < K; ++j) {
      DispatchHandle::SlotMeta m;
      std::memcpy(&m, row + H + kSlotFloats * j, sizeof m);
      std::int64_t& assignment = h.assignment_of_slot_[to_size(r * K + j)];
      if (m.local_expert < 0) {
        assignment = -1;
        continue;
      }
      assignment = h.scratch_[static_cast<std::size_t>(m.local_expert)]++;
      std::memcpy(&h.expert_input_[to_size(assignment * H)], row, to_size(H) * sizeof(float));
    }
  }
  timings_.layout_s += layout_s + seconds_since(start);

  traffic_.dispatch_bytes = 0;
  traffic_.rows_sent = 0;
  for (int p = 0; p < R; ++p) {
    if (p == me) continue;
    traffic_.dispatch_bytes += sizeof(std::int64_t) + h.send_bytes_[static_cast<std::size_t>(p)];
    traffic_.rows_sent += h.rows_to_[static_cast<std::size_t>(p)];
  }
}

void MoELayer::combine(DispatchHandle& h, const TensorView& expert_output, const TensorView& y) {
  auto start = Clock::now();
  Transport& transport = *parts_.transport;
  const int R = transport.size();
  const int me = transport.rank();
  const std::int64_t H = hidden_;
  const int K = h.slots_;
  const auto r_size = static_cast<std::size_t>(R);
  const std::int64_t row_floats = H + kSlotFloats * K;
  const std::int64_t received = static_cast<std::int64_t>(h.recv_rows_.size()) / row_floats;
  const std::int64_t S = static_cast<std::int64_t>(h.send_row_token_.size());
  const std::int64_t A = static_cast<std::int64_t>(h.expert_input_.size()) / H;
  // Shapes are checked on every rank before anything is sent; a mismatch is a caller bug
  // that would otherwise corrupt memory.
  expert_output.require("MoE combine expert_output", DType::kF32, {A, H});
  y.require("MoE combine y", DType::kF32, {h.num_tokens_, H});

  // Weighted partial sum per received row, slots in routing order.
  h.partial_rows_.resize(to_size(received * H));
  const float* out = expert_output.data_as<const float>();
  for (std::int64_t r = 0; r < received; ++r) {
    float* partial = &h.partial_rows_[to_size(r * H)];
    std::fill(partial, partial + H, 0.0f);
    const float* slots = &h.recv_rows_[to_size(r * row_floats + H)];
    for (int j = 0; j < K; ++j) {
      const std::int64_t a = h.assignment_of_slot_[to_size(r * K + j)];
      if (a < 0) continue;
      DispatchHandle::SlotMeta m;
      std::memcpy(&m, slots + kSlotFloats * j, sizeof m);
      const float* expert_row = out + a * H;
      for (std::int64_t k = 0; k < H; ++k) partial[k] += m.weight * expert_row[k];
    }
  }

  // Back to the token's rank: reverse the dispatch counts (rows, H floats each).
  for (std::size_t p = 0; p < r_size; ++p) {
    h.recv_bytes_[p] = to_size(h.rows_to_[p] * H) * sizeof(float);
    h.recv_offsets_[p] = to_size(h.rows_to_offset_[p] * H) * sizeof(float);
    h.send_bytes_[p] = to_size(h.rows_from_[p] * H) * sizeof(float);
    h.send_offsets_[p] = to_size(h.rows_from_offset_[p] * H) * sizeof(float);
  }
  h.combined_rows_.resize(to_size(S * H));
  double local_s = seconds_since(start);
  start = Clock::now();
  transport.alltoallv({as_bytes(h.partial_rows_.data()), h.send_bytes_, h.send_offsets_,
                       as_bytes(h.combined_rows_.data()), h.recv_bytes_, h.recv_offsets_});
  local_s += seconds_since(start);

  // Rows arrive in (expert rank, token) order, so each token sums its partials in
  // ascending rank order: the same on every transport.
  start = Clock::now();
  float* ys = y.data_as<float>();
  std::fill(ys, ys + h.num_tokens_ * H, 0.0f);
  for (std::int64_t s = 0; s < S; ++s) {
    float* dst = ys + h.send_row_token_[to_size(s)] * H;
    const float* src = &h.combined_rows_[to_size(s * H)];
    for (std::int64_t k = 0; k < H; ++k) dst[k] += src[k];
  }
  timings_.combine_s = local_s + seconds_since(start);

  traffic_.combine_bytes = 0;
  for (int p = 0; p < R; ++p) {
    if (p != me) traffic_.combine_bytes += h.send_bytes_[static_cast<std::size_t>(p)];
  }
}

}  // namespace switchyard
