// `switchyard bench`: the layer's phases against their floors, on the same tokens and
// routing: the runtime's dispatch + combine against the transport's raw alltoallv of the
// same bytes and against a naive per-(token, expert) dispatcher; routing against one sgemm
// of the logits' shape; the experts against one sgemm of their FLOPs. Each figure is the
// median over iterations of the slowest rank's time.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#ifdef SWITCHYARD_BENCH_OPENBLAS
#include <cblas.h>
#endif
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "switchyard/bootstrap.hpp"
#include "switchyard/data_path.hpp"
#include "switchyard/expert_kernel.hpp"
#include "switchyard/io.hpp"
#include "switchyard/runtime.hpp"
#include "switchyard/status.hpp"
#include "switchyard/tensor.hpp"

namespace switchyard::tool {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

struct BenchOptions {
  int iters = 10;
  int warmup = 2;
  bool uniform = false;
  std::uint64_t routing_seed = 7;
  std::int64_t tokens_per_rank = 0;  // 0: the config's input.num_tokens split over ranks
  std::string json_path;
  bool exchange_only = false;  // dispatch + combine and the raw alltoallv only (sweeps)
};

/// k distinct experts per token, uniformly at random (seeded per rank), weights 1/k.
void uniform_plan(std::int64_t T, int E, int k, std::uint64_t seed, RoutingPlan& plan) {
  plan.num_tokens = T;
  plan.slots = k;
  plan.experts.resize(static_cast<std::size_t>(T * k));
  plan.weights.resize(static_cast<std::size_t>(T * k));
  plan.counts.assign(static_cast<std::size_t>(E), 0);
  std::mt19937_64 rng(seed);
  std::vector<std::int32_t> pool(static_cast<std::size_t>(E));
  for (std::int64_t t = 0; t < T; ++t) {
    for (int e = 0; e < E; ++e) pool[static_cast<std::size_t>(e)] = e;
    for (int j = 0; j < k; ++j) {
      std::uniform_int_distribution<int> pick(j, E - 1);
      std::swap(pool[static_cast<std::size_t>(j)], pool[static_cast<std::size_t>(pick(rng))]);
      const std::int32_t e = pool[static_cast<std::size_t>(j)];
      plan.experts[static_cast<std::size_t>(t * k + j)] = e;
      plan.weights[static_cast<std::size_t>(t * k + j)] = 1.0f / static_cast<float>(k);
      ++plan.counts[static_cast<std::size_t>(e)];
    }
  }
}

/// A naive dispatcher, the shape of common all-to-all token dispatchers: one row per
/// (token, expert) pair (no per-rank deduplication), separate pack and unpack passes, the
/// expert outputs sent back per pair and weighted at the sender. Rows travel in the
/// payload dtype (f32 or bf16, as 2-byte values), results in f32.
class NaiveDispatcher {
 public:
  NaiveDispatcher(Transport& transport, const ExpertPlacement& placement, std::int64_t hidden,
                  bool bf16)
      : transport_(transport), placement_(placement), hidden_(hidden), bf16_(bf16) {}

  /// Bytes the last step sent to other ranks (rows and their (expert, weight)).
  std::uint64_t dispatch_bytes() const { return dispatch_bytes_; }

  void step(const float* x, const RoutingPlan& plan, float* y) {
    const int R = transport_.size(), me = transport_.rank();
    const std::int64_t T = plan.num_tokens, K = plan.slots, H = hidden_;
    const std::size_t element = bf16_ ? 2 : 4;
    const std::size_t row_bytes = static_cast<std::size_t>(H) * element;
    // Pass 1: count pairs per destination and exchange the counts.
    std::vector<std::size_t> pairs_to(static_cast<std::size_t>(R), 0), pairs_from(pairs_to);
    for (std::int64_t i = 0; i < T * K; ++i) {
      const std::int32_t e = plan.experts[static_cast<std::size_t>(i)];
      if (e >= 0) ++pairs_to[static_cast<std::size_t>(placement_.rank_of(e))];
    }
    transport_.alltoall(pairs_to.data(), pairs_from.data(), sizeof(std::size_t));
    std::vector<std::size_t> first_to(static_cast<std::size_t>(R) + 1, 0), first_from(first_to);
    for (int d = 0; d < R; ++d) {
      first_to[static_cast<std::size_t>(d) + 1] = first_to[d] + pairs_to[d];
      first_from[static_cast<std::size_t>(d) + 1] = first_from[d] + pairs_from[d];
    }
    const std::size_t sent = first_to[static_cast<std::size_t>(R)];
    const std::size_t received = first_from[static_cast<std::size_t>(R)];
    // Pass 2: pack each pair's row, converted, and its (expert, weight).
    send_rows_.resize(sent * row_bytes);
    send_meta_.resize(sent);
    pair_of_sent_.resize(sent);
    std::vector<std::size_t> cursor(first_to.begin(), first_to.end() - 1);
    for (std::int64_t i = 0; i < T * K; ++i) {
      const std::int32_t e = plan.experts[static_cast<std::size_t>(i)];
      if (e < 0) continue;
      const std::size_t at = cursor[static_cast<std::size_t>(placement_.rank_of(e))]++;
      const float* row = x + (i / K) * H;
      encode(row, send_rows_.data() + at * row_bytes);
      send_meta_[at] = {e, plan.weights[static_cast<std::size_t>(i)]};
      pair_of_sent_[at] = i;
    }
    dispatch_bytes_ = 0;
    for (int d = 0; d < R; ++d)
      if (d != me) dispatch_bytes_ += pairs_to[d] * (row_bytes + sizeof(SlotMeta));
    // Exchange rows and their metadata.
    recv_rows_.resize(received * row_bytes);
    recv_meta_.resize(received);
    exchange(send_rows_.data(), pairs_to, first_to, recv_rows_.data(), pairs_from, first_from,
             row_bytes);
    exchange(reinterpret_cast<const std::byte*>(send_meta_.data()), pairs_to, first_to,
             reinterpret_cast<std::byte*>(recv_meta_.data()), pairs_from, first_from,
             sizeof(SlotMeta));
    // Pass 3: unpack into rows grouped per local expert (counting sort), decoded.
    const int first_expert = placement_.first_expert(me);
    const int local = placement_.num_local(me);
    std::vector<std::size_t> expert_first(static_cast<std::size_t>(local) + 1, 0);
    for (std::size_t r = 0; r < received; ++r)
      ++expert_first[static_cast<std::size_t>(recv_meta_[r].local_expert - first_expert) + 1];
    for (int l = 0; l < local; ++l) expert_first[l + 1] += expert_first[l];
    expert_rows_.resize(received * static_cast<std::size_t>(H));
    grouped_at_.resize(received);
    for (std::size_t r = 0; r < received; ++r) {
      const std::size_t at =
          expert_first[static_cast<std::size_t>(recv_meta_[r].local_expert - first_expert)]++;
      decode(recv_rows_.data() + r * row_bytes, expert_rows_.data() + at * H);
      grouped_at_[r] = at;
    }
    // Identity experts. Pass 4: results back in arrival order, f32.
    back_rows_.resize(received * static_cast<std::size_t>(H));
    for (std::size_t r = 0; r < received; ++r)
      std::memcpy(back_rows_.data() + r * H, expert_rows_.data() + grouped_at_[r] * H,
                  static_cast<std::size_t>(H) * 4);
    returned_.resize(sent * static_cast<std::size_t>(H));
    exchange(reinterpret_cast<const std::byte*>(back_rows_.data()), pairs_from, first_from,
             reinterpret_cast<std::byte*>(returned_.data()), pairs_to, first_to,
             static_cast<std::size_t>(H) * 4);
    // Pass 5: weighted sum per token.
    std::fill(y, y + T * H, 0.0f);
    for (std::size_t s = 0; s < sent; ++s) {
      const std::int64_t i = pair_of_sent_[s];
      const float w = plan.weights[static_cast<std::size_t>(i)];
      float* out = y + (i / K) * H;
      const float* in = returned_.data() + s * H;
      for (std::int64_t h = 0; h < H; ++h) out[h] += w * in[h];
    }
  }

 private:
  void encode(const float* row, std::byte* out) const {
    if (!bf16_) {
      std::memcpy(out, row, static_cast<std::size_t>(hidden_) * 4);
      return;
    }
    auto* bits = reinterpret_cast<std::uint16_t*>(out);
    for (std::int64_t h = 0; h < hidden_; ++h) bits[h] = float_to_bf16(row[h]);
  }
  void decode(const std::byte* in, float* row) const {
    if (!bf16_) {
      std::memcpy(row, in, static_cast<std::size_t>(hidden_) * 4);
      return;
    }
    const auto* bits = reinterpret_cast<const std::uint16_t*>(in);
    for (std::int64_t h = 0; h < hidden_; ++h) row[h] = bf16_to_float(bits[h]);
  }
  void exchange(const std::byte* send, const std::vector<std::size_t>& send_items,
                const std::vector<std::size_t>& send_first, std::byte* recv,
                const std::vector<std::size_t>& recv_items,
                const std::vector<std::size_t>& recv_first, std::size_t item_bytes) {
    const std::size_t R = send_items.size();
    counts_.resize(4 * R);
    for (std::size_t d = 0; d < R; ++d) {
      counts_[d] = send_items[d] * item_bytes;
      counts_[R + d] = send_first[d] * item_bytes;
      counts_[2 * R + d] = recv_items[d] * item_bytes;
      counts_[3 * R + d] = recv_first[d] * item_bytes;
    }
    AlltoallvBuffers b;
    b.send = send;
    b.send_counts = {counts_.data(), R};
    b.send_offsets = {counts_.data() + R, R};
    b.recv = recv;
    b.recv_counts = {counts_.data() + 2 * R, R};
    b.recv_offsets = {counts_.data() + 3 * R, R};
    transport_.alltoallv(b);
  }

  Transport& transport_;
  const ExpertPlacement& placement_;
  std::int64_t hidden_;
  bool bf16_;
  std::uint64_t dispatch_bytes_ = 0;
  std::vector<std::byte> send_rows_, recv_rows_;
  std::vector<SlotMeta> send_meta_, recv_meta_;
  std::vector<std::int64_t> pair_of_sent_;
  std::vector<float> expert_rows_, back_rows_, returned_;
  std::vector<std::size_t> grouped_at_, counts_;
};

/// The exchange the runtime's dispatch and combine need, as one raw alltoallv each way:
/// the deduplicated rows with their slots out, the partial sums back, between
/// pre-packed contiguous buffers.
class RawExchange {
 public:
  RawExchange(Transport& transport, const ExpertPlacement& placement, const RoutingPlan& plan,
              std::int64_t hidden, PayloadDType payload, DType combine)
      : transport_(transport) {
    const int R = transport.size();
    const auto size = static_cast<std::size_t>(R);
    // Rows per destination: a token goes once to each rank holding one of its experts.
    std::vector<std::size_t> rows_to(size, 0), rows_from(size, 0);
    std::vector<char> seen(size);
    for (std::int64_t t = 0; t < plan.num_tokens; ++t) {
      std::fill(seen.begin(), seen.end(), 0);
      for (int j = 0; j < plan.slots; ++j) {
        const std::int32_t e = plan.experts[static_cast<std::size_t>(t * plan.slots + j)];
        if (e < 0) continue;
        const auto d = static_cast<std::size_t>(placement.rank_of(e));
        if (!seen[d]) ++rows_to[d];
        seen[d] = 1;
      }
    }
    transport.alltoall(rows_to.data(), rows_from.data(), sizeof(std::size_t));
    const std::size_t out_row = payload_row_bytes(payload, hidden) +
                                static_cast<std::size_t>(plan.slots) * sizeof(SlotMeta);
    const std::size_t back_row = static_cast<std::size_t>(hidden) * dtype_size(combine);
    out_ = layout(rows_to, rows_from, out_row);
    back_ = layout(rows_from, rows_to, back_row);
    send_.resize(std::max(out_.total_send, back_.total_send));
    recv_.resize(std::max(out_.total_recv, back_.total_recv));
    std::fill(send_.begin(), send_.end(), std::byte{1});
    for (std::size_t d = 0; d < size; ++d)
      if (static_cast<int>(d) != transport.rank()) bytes_out_ += out_.counts[d];
  }
  std::uint64_t bytes_out() const { return bytes_out_; }
  void step() {
    run(out_);
    run(back_);
  }

 private:
  struct Layout {
    std::vector<std::size_t> counts;  // send counts, send offsets, recv counts, recv offsets
    std::size_t total_send = 0, total_recv = 0;
  };
  static Layout layout(const std::vector<std::size_t>& items_to,
                       const std::vector<std::size_t>& items_from, std::size_t item_bytes) {
    const std::size_t R = items_to.size();
    Layout l;
    l.counts.resize(4 * R);
    for (std::size_t d = 0; d < R; ++d) {
      l.counts[d] = items_to[d] * item_bytes;
      l.counts[R + d] = l.total_send;
      l.total_send += l.counts[d];
      l.counts[2 * R + d] = items_from[d] * item_bytes;
      l.counts[3 * R + d] = l.total_recv;
      l.total_recv += l.counts[2 * R + d];
    }
    return l;
  }
  void run(const Layout& l) {
    const std::size_t R = l.counts.size() / 4;
    AlltoallvBuffers b;
    b.send = send_.data();
    b.send_counts = {l.counts.data(), R};
    b.send_offsets = {l.counts.data() + R, R};
    b.recv = recv_.data();
    b.recv_counts = {l.counts.data() + 2 * R, R};
    b.recv_offsets = {l.counts.data() + 3 * R, R};
    transport_.alltoallv(b);
  }
  Transport& transport_;
  Layout out_, back_;
  std::vector<std::byte> send_, recv_;
  std::uint64_t bytes_out_ = 0;
};

/// Host memcpy bandwidth (bytes read + written per second) of a 256 MiB copy, best of 5.
double memcpy_bandwidth() {
  const std::size_t bytes = std::size_t{256} << 20;
  std::vector<std::byte> a(bytes, std::byte{1}), b(bytes);
  double best = 1e30;
  for (int i = 0; i < 5; ++i) {
    const auto start = Clock::now();
    std::memcpy(b.data(), a.data(), bytes);
    best = std::min(best, seconds_since(start));
  }
  return 2.0 * static_cast<double>(bytes) / best;
}

/// Per-iteration times of the slowest rank: each rank times `op`; the world takes the max.
class Timer {
 public:
  Timer(Transport& world, int warmup, int iters) : world_(world), warmup_(warmup), iters_(iters) {}
  double median_of_slowest(const std::function<void()>& op) {
    std::vector<double> times(static_cast<std::size_t>(iters_));
    for (int i = 0; i < warmup_ + iters_; ++i) {
      world_.barrier();
      const auto start = Clock::now();
      op();
      const double s = seconds_since(start);
      if (i >= warmup_) times[static_cast<std::size_t>(i - warmup_)] = s;
    }
    world_.allreduce(times.data(), times.size(), DType::kF64, ReduceOp::kMax);
    return median(times);
  }

 private:
  Transport& world_;
  int warmup_, iters_;
};

int bench(Runtime& runtime, const BenchOptions& options) {
  const ModelWeights& model = runtime.model();
  const ConfigSection& input = runtime.settings().section("input");
  const ConfigSection& runtime_options = runtime.settings().section("runtime");
  const int world = runtime.world_size();
  if (runtime.ep_size() != world) {
    throw Error(ErrorCode::kInvalidArgument,
                "switchyard bench: measures one EP group; set runtime.ep_size to the world size");
  }
  const std::int64_t total_tokens =
      options.tokens_per_rank > 0 ? options.tokens_per_rank * world : input.get_int("num_tokens");
  const HostTensor x = synthetic_tokens(total_tokens, model.hidden(),
                                        static_cast<std::uint64_t>(input.get_int("seed")));
  const bool reporter = runtime.world_rank(0) == 0;
  const PayloadDType payload = parse_payload_dtype(runtime_options.get_string("payload_dtype"));
  const DType combine =
      runtime_options.get_string("combine_dtype") == "bf16" ? DType::kBF16 : DType::kF32;
  if (reporter) {
    std::fprintf(stderr, "switchyard bench: %d rank%s, %lld tokens per rank, %d iterations\n",
                 world, world == 1 ? "" : "s", static_cast<long long>(total_tokens / world),
                 options.iters);
  }
  std::mutex mutex;
  nlohmann::json figures;
  const double memcpy_bps = reporter ? memcpy_bandwidth() : 0.0;

  runtime.run_on_ranks([&](int local) {
    MoELayer& layer = runtime.layer(local);
    Transport& ep = layer.transport();
    Transport& world_transport = runtime.world_transport(local);
    const int rank = runtime.world_rank(local);
    const auto block = token_block(total_tokens, world, rank);
    const std::int64_t first = block.first, count = block.second;
    const TensorView xs(const_cast<float*>(x.data<float>()) + first * model.hidden(), DType::kF32,
                        {count, model.hidden()});
    HostTensor y(DType::kF32, {count, model.hidden()});
    Timer timer(world_transport, options.warmup, options.iters);
    auto progress = [&](const char* what) {
      if (rank == 0) std::fprintf(stderr, "switchyard bench: %s\n", what);
    };
    nlohmann::json f;

    // The routing every exchange below uses.
    RoutingPlan plan;
    if (options.uniform) {
      uniform_plan(count, model.num_experts(), layer.router().slots_per_token(),
                   options.routing_seed + static_cast<std::uint64_t>(rank), plan);
    } else {
      layer.route(xs, plan);
    }

    if (!options.exchange_only) {
      progress("route");
      RoutingPlan routed;
      f["route_s"] = timer.median_of_slowest([&] { layer.route(xs, routed); });
#ifdef SWITCHYARD_BENCH_OPENBLAS
      openblas_set_num_threads(1);
      std::vector<float> logits(static_cast<std::size_t>(count * model.num_experts()));
      const float* gate = model.gate().view().data_as<const float>();
      f["logits_gemm_s"] = timer.median_of_slowest([&] {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(count),
                    model.num_experts(), model.hidden(), 1.0f, xs.data_as<const float>(),
                    model.hidden(), gate, model.hidden(), 0.0f, logits.data(), model.num_experts());
      });
#endif
    }

    // Each measurement below holds its buffers only while it runs: world 4 on one machine
    // holds four ranks' worth of each.
    double identity_allocations = 0;
    {
      progress("dispatch + combine (identity experts)");
      // The layer's own forward from the plan, its experts replaced by identity experts: the
      // fused path (the received rows are weighed as they arrived, no expert-grouped copy).
      MoELayerParts identity_parts = layer.parts();
      identity_parts.experts =
          std::make_shared<IdentityExperts>(layer.experts().num_local_experts());
      MoELayer identity(std::move(identity_parts));
      identity.forward(xs, plan, y.view());  // sizes its buffers
      const std::uint64_t identity_sized = buffer_allocations();
      f["dispatch_combine_s"] =
          timer.median_of_slowest([&] { identity.forward(xs, plan, y.view()); });
      identity_allocations = static_cast<double>(buffer_allocations() - identity_sized) /
                             (options.warmup + options.iters);
      f["bytes_dispatch"] = identity.traffic().dispatch_bytes;
      const LayerTimings& phases = identity.timings();
      f["dispatch_combine_phases_s"] = {{"layout", phases.layout_s},
                                        {"dispatch", phases.dispatch_s},
                                        {"weigh", phases.experts_s},
                                        {"combine", phases.combine_s}};
    }
    {
      progress("raw alltoallv");
      RawExchange raw(ep, layer.placement(), plan, model.hidden(), payload, combine);
      f["raw_alltoallv_s"] = timer.median_of_slowest([&] { raw.step(); });
      f["bytes_raw_dispatch"] = raw.bytes_out();
    }
    if (options.exchange_only) {
      f["allocations_per_step"] = identity_allocations;
      if (local == 0 && rank == 0) {
        std::lock_guard<std::mutex> lock(mutex);
        figures = std::move(f);
      }
      return;
    }
    {
      progress("naive dispatch + combine");
      NaiveDispatcher naive(ep, layer.placement(), model.hidden(), payload == PayloadDType::kBF16);
      f["naive_dispatch_combine_s"] = timer.median_of_slowest(
          [&] { naive.step(xs.data_as<const float>(), plan, y.data<float>()); });
      f["bytes_naive_dispatch"] = naive.dispatch_bytes();
    }
    std::int64_t expert_rows = 0;
    {
      progress("dispatch + combine, grouped (public dispatch and combine)");
      DispatchHandle handle;
      f["grouped_dispatch_combine_s"] = timer.median_of_slowest([&] {
        layer.dispatch(xs, plan, handle);
        layer.combine(handle, handle.expert_input(), y.view());
      });

      progress("experts");
      layer.dispatch(xs, plan, handle);
      ExpertBatch batch;
      batch.input = handle.expert_input();
      batch.output = handle.expert_output();
      batch.rows_per_expert = handle.rows_per_expert();
      f["expert_s"] = timer.median_of_slowest([&] {
        layer.experts().forward(batch, layer.stream());
        layer.stream().synchronize();
      });
      expert_rows = batch.input.dim(0);
      f["expert_rows"] = expert_rows;
    }
#ifdef SWITCHYARD_BENCH_OPENBLAS
    {
      // One sgemm with the experts' FLOPs: [A,H] · [H,3F].
      const std::int64_t A = std::max<std::int64_t>(expert_rows, 1);
      const std::int64_t H = model.hidden(), F3 = 3 * static_cast<std::int64_t>(model.ffn_hidden());
      std::vector<float> a(static_cast<std::size_t>(A * H), 0.5f),
          b(static_cast<std::size_t>(H * F3), 0.25f), c(static_cast<std::size_t>(A * F3));
      f["gemm_reference_s"] = timer.median_of_slowest([&] {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(A),
                    static_cast<int>(F3), static_cast<int>(H), 1.0f, a.data(), static_cast<int>(H),
                    b.data(), static_cast<int>(F3), 0.0f, c.data(), static_cast<int>(F3));
      });
    }
#endif

    progress("layer forward");
    layer.forward(xs, y.view());  // sizes the layer's own buffers
    const std::uint64_t sized = buffer_allocations();
    f["layer_forward_s"] = timer.median_of_slowest([&] { layer.forward(xs, y.view()); });
    const std::uint64_t after = buffer_allocations();
    f["allocations_per_step"] =
        std::max(identity_allocations,
                 static_cast<double>(after - sized) / (options.warmup + options.iters));
    f["peak_buffer_bytes"] = layer.buffer_bytes();

    if (!options.exchange_only && layer.experts().name() != "identity") {
      // The backward of the last forward (same tokens), with its gradients' memory made
      // here once: dx, the gate's [E,H] and the local experts'.
      progress("layer backward");
      const std::int64_t H = model.hidden(), F = model.ffn_hidden();
      const HostTensor dy = synthetic_tokens(
          count, static_cast<int>(H), options.routing_seed + 7 + static_cast<std::uint64_t>(rank));
      HostTensor dx(DType::kF32, {count, H}), d_gate(DType::kF32, {model.num_experts(), H});
      const ExpertGradientStorage d_experts(layer.experts().num_local_experts(), H, F);
      LayerGradients out;
      out.dx = dx.view();
      out.d_experts = d_experts.views();
      out.d_gate = d_gate.view();
      // Training mode: the forward keeps its rows, outputs and projections (unless
      // [runtime] recompute); then the backward from them, repeated on the same forward.
      layer.set_training(true);
      f["training_forward_s"] = timer.median_of_slowest([&] { layer.forward(xs, y.view()); });
      f["backward_s"] = timer.median_of_slowest([&] { layer.backward(xs, dy.view(), out); });
      // After a forward that kept nothing: x dispatched again, projections recomputed.
      layer.set_training(false);
      layer.forward(xs, y.view());
      f["backward_recompute_s"] =
          timer.median_of_slowest([&] { layer.backward(xs, dy.view(), out); });
    }
    f["input_output_bytes"] = 2 * count * model.hidden() * 4;
    f["received_row_bytes"] = expert_rows * model.hidden() * 4;

    if (local == 0 && rank == 0) {
      std::lock_guard<std::mutex> lock(mutex);
      figures = std::move(f);
    }
  });
  // The model: each layer's forward on the chain (layer l takes layer l-1's output), the
  // median of `iters` runs after `warmup` on this process, and the step buffers of all
  // layers (layer 0's training rows from the backward above included).
  nlohmann::json per_layer = nlohmann::json::array();
  if (!options.exchange_only) {
    HostTensor in = x, out(DType::kF32, {total_tokens, model.hidden()});
    const auto ranks_here = static_cast<std::size_t>(runtime.num_local_ranks());
    std::vector<RoutingPlan> uniform_plans(ranks_here), routed(ranks_here);
    if (options.uniform) {
      // The routing of the measurements above, one plan per local rank for every layer.
      runtime.run_on_ranks([&](int local) {
        const int rank = runtime.world_rank(local);
        uniform_plan(token_block(total_tokens, world, rank).second, model.num_experts(),
                     runtime.layer(local).router().slots_per_token(),
                     options.routing_seed + static_cast<std::uint64_t>(rank),
                     uniform_plans[static_cast<std::size_t>(local)]);
      });
    }
    for (int l = 0; l < runtime.num_layers(); ++l) {
      std::vector<double> seconds;
      for (int i = 0; i < options.warmup + options.iters; ++i) {
        const auto start = std::chrono::steady_clock::now();
        if (options.uniform) {
          // The same fixed routing as above on every layer (each layer's router still runs,
          // for its logits): what grows with L is then only what a layer holds of its own.
          runtime.run_on_ranks([&](int local) {
            const auto [first, count] = token_block(total_tokens, world, runtime.world_rank(local));
            const std::int64_t H = model.hidden();
            const TensorView xs(in.data<float>() + first * H, DType::kF32, {count, H});
            const TensorView ys(out.data<float>() + first * H, DType::kF32, {count, H});
            MoELayer& layer = runtime.layer(local, l);
            layer.route(xs, routed[static_cast<std::size_t>(local)]);
            layer.forward(xs, uniform_plans[static_cast<std::size_t>(local)], ys);
          });
        } else {
          runtime.forward(in.view(), out.view(), l);
        }
        if (i >= options.warmup) {
          seconds.push_back(
              std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
        }
      }
      std::sort(seconds.begin(), seconds.end());
      per_layer.push_back({{"layer", runtime.layer_ids()[static_cast<std::size_t>(l)]},
                           {"forward_s", seconds.empty() ? 0.0 : seconds[seconds.size() / 2]}});
      std::swap(in, out);
    }
  }
  const std::size_t step_buffer_bytes = runtime.step_buffer_bytes();
  if (!reporter) return kExitOk;
  figures["num_layers"] = runtime.num_layers();
  figures["layers"] = per_layer;
  figures["step_buffer_bytes"] = step_buffer_bytes;

  figures["transport"] = runtime_options.get_string("transport");
  figures["world"] = world;
  figures["tokens_per_rank"] = total_tokens / world;
  figures["hidden"] = model.hidden();
  figures["ffn_hidden"] = model.ffn_hidden();
  figures["num_experts"] = model.num_experts();
  figures["top_k"] = runtime.layer(0).router().slots_per_token();
  figures["routing"] =
      options.uniform ? "uniform" : runtime.settings().section("router").get_string("policy");
  figures["payload_dtype"] = std::string(payload_dtype_name(payload));
  figures["chunks"] = runtime_options.get_int("chunks");
  figures["iters"] = options.iters;
  figures["memcpy_bytes_per_s"] = memcpy_bps;

  auto ratio = [&](const char* a, const char* b) -> double {
    if (!figures.contains(a) || !figures.contains(b)) return NAN;
    const double den = figures[b].get<double>();
    return den > 0 ? figures[a].get<double>() / den : NAN;
  };
  std::printf(
      "switchyard bench: transport %s, world %d, %lld tokens per rank, hidden %d, "
      "E %d, k %d, %s routing, payload %s, %lld chunk(s) (median of %d, slowest rank)\n",
      figures["transport"].get<std::string>().c_str(), world,
      static_cast<long long>(total_tokens / world), model.hidden(), model.num_experts(),
      figures["top_k"].get<int>(), figures["routing"].get<std::string>().c_str(),
      figures["payload_dtype"].get<std::string>().c_str(),
      static_cast<long long>(figures["chunks"].get<std::int64_t>()), options.iters);
  auto row = [&](const char* name, const char* key, const char* floor_key, const char* floor_name) {
    if (!figures.contains(key)) return;
    if (floor_key != nullptr && figures.contains(floor_key)) {
      std::printf("  %-28s %10.3f ms   %-26s %10.3f ms   ratio %.2f\n", name,
                  figures[key].get<double>() * 1e3, floor_name,
                  figures[floor_key].get<double>() * 1e3, ratio(key, floor_key));
    } else {
      std::printf("  %-28s %10.3f ms\n", name, figures[key].get<double>() * 1e3);
    }
  };
  row("dispatch + combine", "dispatch_combine_s", "raw_alltoallv_s", "raw alltoallv");
  if (figures.contains("dispatch_combine_phases_s")) {
    const auto& p = figures["dispatch_combine_phases_s"];
    std::printf(
        "    rank 0, last step: layout %.3f ms, dispatch %.3f ms, weigh %.3f ms, combine %.3f "
        "ms\n",
        p["layout"].get<double>() * 1e3, p["dispatch"].get<double>() * 1e3,
        p["weigh"].get<double>() * 1e3, p["combine"].get<double>() * 1e3);
  }
  row("  grouped (public API)", "grouped_dispatch_combine_s", "raw_alltoallv_s", "raw alltoallv");
  row("naive dispatch + combine", "naive_dispatch_combine_s", "dispatch_combine_s", "runtime's");
  row("route", "route_s", "logits_gemm_s", "logits sgemm");
  row("experts", "expert_s", "gemm_reference_s", "sgemm of their FLOPs");
  row("layer forward", "layer_forward_s", nullptr, nullptr);
  if (figures.contains("backward_s")) {
    row("layer forward, training", "training_forward_s", "layer_forward_s", "forward");
    row("layer backward", "backward_s", "layer_forward_s", "forward");
    row("  recomputing", "backward_recompute_s", "layer_forward_s", "forward");
    figures["backward_over_forward"] = ratio("backward_s", "layer_forward_s");
    figures["backward_recompute_over_forward"] = ratio("backward_recompute_s", "layer_forward_s");
  }
  if (options.exchange_only) {
    std::printf("  bytes dispatched per rank %llu, allocations per step %.2f, memcpy %.1f GB/s\n",
                figures["bytes_dispatch"].get<unsigned long long>(),
                figures["allocations_per_step"].get<double>(), memcpy_bps / 1e9);
  } else {
    std::printf("  bytes dispatched per rank: runtime %llu, naive %llu (%.2fx)\n",
                figures["bytes_dispatch"].get<unsigned long long>(),
                figures["bytes_naive_dispatch"].get<unsigned long long>(),
                ratio("bytes_naive_dispatch", "bytes_dispatch"));
    std::printf(
        "  layer buffers %.1f MiB (input + output %.1f MiB, received rows %.1f MiB), "
        "allocations per step %.2f, memcpy %.1f GB/s\n",
        figures["peak_buffer_bytes"].get<double>() / (1 << 20),
        figures["input_output_bytes"].get<double>() / (1 << 20),
        figures["received_row_bytes"].get<double>() / (1 << 20),
        figures["allocations_per_step"].get<double>(), memcpy_bps / 1e9);
  }
  if (!per_layer.empty()) {
    std::printf(
        "  model: %d MoE layer%s, step buffers %.1f MiB on this process; forward per "
        "layer (median of %d, this process):",
        runtime.num_layers(), runtime.num_layers() == 1 ? "" : "s",
        static_cast<double>(step_buffer_bytes) / (1 << 20), options.iters);
    for (const auto& l : per_layer) {
      std::printf(" %d: %.3f ms", l["layer"].get<int>(), l["forward_s"].get<double>() * 1e3);
    }
    std::printf("\n");
  }
  if (!options.json_path.empty()) {
    write_file_atomically(options.json_path,
                          [&](std::ostream& out) { out << figures.dump(2) << "\n"; });
  }
  return kExitOk;
}

}  // namespace

int bench_command(const std::vector<std::string>& args) {
  std::string config_path;
  std::vector<std::string> sets;
  BenchOptions options;
  // A flag's integer value in [min, max]; nothing (after saying why) when it is not one.
  auto number = [&](std::size_t& i, const char* flag, long long min,
                    long long max) -> std::optional<long long> {
    if (i + 1 >= args.size()) {
      std::fprintf(stderr, "switchyard bench: %s needs a value\n", flag);
      return std::nullopt;
    }
    return parse_integer_flag("bench", flag, args[++i], min, max);
  };
  for (std::size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--set" && i + 1 < args.size()) {
      sets.push_back(args[++i]);
    } else if (args[i] == "--iters") {
      const auto value = number(i, "--iters", 1, 1'000'000);
      if (!value) return kExitUsage;
      options.iters = static_cast<int>(*value);
    } else if (args[i] == "--warmup") {
      const auto value = number(i, "--warmup", 0, 1'000'000);
      if (!value) return kExitUsage;
      options.warmup = static_cast<int>(*value);
    } else if (args[i] == "--tokens-per-rank") {
      const auto value = number(i, "--tokens-per-rank", 1, std::int64_t{1} << 31);
      if (!value) return kExitUsage;
      options.tokens_per_rank = *value;
    } else if (args[i] == "--exchange-only") {
      options.exchange_only = true;
    } else if (args[i] == "--json" && i + 1 < args.size()) {
      options.json_path = args[++i];
    } else if (args[i] == "--routing" && i + 1 < args.size()) {
      const std::string& how = args[++i];
      if (how != "uniform" && how != "router") {
        std::fprintf(stderr, "switchyard bench: --routing is 'uniform' or 'router'\n");
        return kExitUsage;
      }
      options.uniform = how == "uniform";
    } else if (config_path.empty() && args[i].rfind("--", 0) != 0) {
      config_path = args[i];
    } else {
      std::fprintf(stderr, "switchyard bench: unexpected argument '%s'\n", args[i].c_str());
      return kExitUsage;
    }
  }
  if (config_path.empty() || options.iters < 1 || options.warmup < 0) {
    std::fprintf(stderr,
                 "usage: switchyard bench CONFIG [--iters N] [--warmup N] [--routing "
                 "uniform|router] [--tokens-per-rank N] [--exchange-only] [--json OUT] [--set "
                 "section.key=value]...\n");
    return kExitUsage;
  }
  const Config config = load_config(config_path, sets);
  Runtime runtime(config);
  return run_reporting_errors(runtime, [&] { return bench(runtime, options); });
}

}  // namespace switchyard::tool
