#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <thread>

#include "switchyard/layer.hpp"
#include "switchyard/model.hpp"
#include "switchyard/plugin.hpp"
#include "switchyard/status.hpp"
#include "test_support.hpp"

using namespace switchyard;

namespace {

const PluginRegistry& registry() {
  static PluginRegistry r(PluginRegistry::default_search_path());
  return r;
}

std::vector<std::shared_ptr<Transport>> inproc(int ranks, double timeout_s = 30) {
  TransportCreateArgs args;
  args.requested_ranks = ranks;
  args.timeout_s = timeout_s;
  return registry().create_transport("inproc", args);
}

struct Fixture {
  ModelWeights model;
  std::vector<std::shared_ptr<Transport>> transports;
  std::vector<std::unique_ptr<MoELayer>> layers;
  ConfigSection router_options, expert_options;

  Fixture(int ranks, int experts, int top_k) : model(ModelWeights::random(experts, 16, 24, 11)) {
    transports = inproc(ranks);
    Config config;
    config.set("router", "top_k", std::int64_t{top_k});
    router_options = config.section("router", registry().options(PluginKind::kRouter, "topk"));
    expert_options =
        config.section("experts", registry().options(PluginKind::kExpert, "cpu_swiglu"));
    const ExpertPlacement placement(experts, ranks);
    for (int r = 0; r < ranks; ++r) {
      RouterCreateArgs ra;
      ra.options = &router_options;
      ra.num_experts = experts;
      const auto local = model.experts(placement.first_expert(r), placement.num_local(r));
      ExpertCreateArgs ea;
      ea.options = &expert_options;
      ea.hidden = model.hidden();
      ea.ffn_hidden = model.ffn_hidden();
      ea.experts = local;
      MoELayerParts parts;
      parts.transport = transports[static_cast<std::size_t>(r)].get();
      parts.router = registry().create_router("topk", ra);
      parts.experts = registry().create_expert("cpu_swiglu", ea);
      parts.gate = model.gate().view();
      parts.placement = placement;
      layers.push_back(std::make_unique<MoELayer>(std::move(parts)));
    }
  }
};

}  // namespace

TEST_CASE("contiguous placement, uneven and with empty ranks") {
  ExpertPlacement p(10, 4);  // 3,3,2,2
  CHECK(p.num_local(0) == 3);
  CHECK(p.num_local(3) == 2);
  CHECK(p.first_expert(2) == 6);
  CHECK(p.rank_of(5) == 1);
  CHECK(p.rank_of(6) == 2);
  CHECK(p.rank_of(9) == 3);
  for (int e = 0; e < 10; ++e) {
    const int r = p.rank_of(e);
    CHECK(e >= p.first_expert(r));
    CHECK(e < p.first_expert(r) + p.num_local(r));
  }
  ExpertPlacement sparse(2, 4);  // ranks 2 and 3 hold nothing
  CHECK(sparse.num_local(2) == 0);
  CHECK(sparse.rank_of(1) == 1);
}

TEST_CASE("router logits do not depend on how many tokens are computed together") {
  const ModelWeights m = ModelWeights::random(5, 33, 8, 2);
  const HostTensor x = synthetic_tokens(7, 33, 3);
  std::vector<float> all(35), one(5);
  compute_router_logits(x.view(), m.gate().view(), all.data());
  TensorView row(const_cast<float*>(x.data<float>()) + 4 * 33, DType::kF32, {1, 33});
  compute_router_logits(row, m.gate().view(), one.data());
  CHECK(std::equal(one.begin(), one.end(), all.begin() + 20));
}

TEST_CASE("dispatch and combine on their own: identity experts return sum(weights) * x") {
  for (int ranks : {1, 3}) {
    CAPTURE(ranks);
    Fixture f(ranks, 7, 3);
    const std::int64_t H = f.model.hidden();
    auto errors = test::on_threads(ranks, [&](int r) {
      const std::int64_t T = 5 + r;  // different T per rank
      HostTensor x = synthetic_tokens(T, static_cast<int>(H), static_cast<std::uint64_t>(r));
      HostTensor y(DType::kF32, {T, H});
      RoutingPlan plan;
      DispatchHandle handle;
      MoELayer& layer = *f.layers[static_cast<std::size_t>(r)];
      layer.route(x.view(), plan);
      layer.dispatch(x.view(), plan, handle);
      // Every received assignment is one (token, expert) pair of some rank.
      std::int64_t rows = 0;
      for (auto n : handle.rows_per_expert()) rows += n;
      CHECK(rows == handle.expert_input().dim(0));
      layer.combine(handle, handle.expert_input(), y.view());
      for (std::int64_t t = 0; t < T; ++t) {
        float w = 0;
        for (int j = 0; j < plan.slots; ++j)
          w += plan.weights[static_cast<std::size_t>(t * plan.slots + j)];
        for (std::int64_t h = 0; h < H; ++h) {
          CHECK(y.data<float>()[t * H + h] ==
                doctest::Approx(w * x.data<float>()[t * H + h]).epsilon(1e-6));
        }
      }
    });
    for (const auto& e : errors) CHECK_FALSE(e.has_value());
  }
}

TEST_CASE("a token is sent once per destination rank, not once per expert") {
  Fixture f(2, 4, 2);  // experts 0,1 on rank 0; 2,3 on rank 1
  const std::int64_t H = f.model.hidden();
  auto errors = test::on_threads(2, [&](int r) {
    MoELayer& layer = *f.layers[static_cast<std::size_t>(r)];
    RoutingPlan plan;
    plan.num_tokens = 3;
    plan.slots = 2;
    // token 0 -> experts 0,1 (rank 0 twice); token 1 -> 2,3 (rank 1 twice); token 2 -> 0,3.
    plan.experts = {0, 1, 2, 3, 0, 3};
    plan.weights = {0.5f, 0.5f, 0.25f, 0.75f, 1.0f, 2.0f};
    HostTensor x = synthetic_tokens(3, static_cast<int>(H), static_cast<std::uint64_t>(r));
    DispatchHandle handle;
    layer.dispatch(x.view(), plan, handle);
    // Two rows leave for the other rank (tokens 1 and 2 from rank 0, tokens 0 and 2 from
    // rank 1), not three.
    CHECK(layer.traffic().rows_sent == 2);
    // The counts (rows, then slots for each of the peer's 2 experts) and the rows.
    CHECK(layer.traffic().dispatch_bytes == 3 * 8 + 2 * (H + 2 * 2) * 4);
    // Per local expert, the assignments of both ranks' tokens.
    const std::vector<std::int64_t> expected =
        r == 0 ? std::vector<std::int64_t>{4, 2} : std::vector<std::int64_t>{2, 4};
    CHECK(std::vector<std::int64_t>(handle.rows_per_expert().begin(),
                                    handle.rows_per_expert().end()) == expected);
    HostTensor y(DType::kF32, {3, H});
    layer.combine(handle, handle.expert_input(), y.view());
    CHECK(layer.traffic().combine_bytes == static_cast<std::uint64_t>(2 * H * 4));
    for (std::int64_t h = 0; h < H; ++h) {
      CHECK(y.data<float>()[2 * H + h] == doctest::Approx(3.0f * x.data<float>()[2 * H + h]));
    }
  });
  for (const auto& e : errors) CHECK_FALSE(e.has_value());
}

TEST_CASE("forward: NaN logits on one rank fail every rank, quickly, with the cause on that rank") {
  Fixture f(3, 6, 2);
  const std::int64_t H = f.model.hidden();
  auto errors = test::on_threads(3, [&](int r) {
    HostTensor x = synthetic_tokens(4, static_cast<int>(H), static_cast<std::uint64_t>(r));
    if (r == 1) x.data<float>()[2 * H + 3] = std::numeric_limits<float>::quiet_NaN();
    HostTensor y(DType::kF32, {4, H});
    f.layers[static_cast<std::size_t>(r)]->forward(x.view(), y.view());
  });
  REQUIRE(errors[1].has_value());
  CHECK(errors[1]->code() == ErrorCode::kInvalidArgument);
  CHECK(errors[1]->message().find("logit of token 2, expert 0 is NaN") != std::string::npos);
  for (int r : {0, 2}) {
    REQUIRE(errors[static_cast<std::size_t>(r)].has_value());
    CHECK(errors[static_cast<std::size_t>(r)]->code() == ErrorCode::kPeerFailed);
    CHECK(errors[static_cast<std::size_t>(r)]->message().find("rank 1 failed before dispatch") !=
          std::string::npos);
  }
  // The layers stay usable: the next step with good input works on every rank.
  auto again = test::on_threads(3, [&](int r) {
    HostTensor x = synthetic_tokens(4, static_cast<int>(H), static_cast<std::uint64_t>(r));
    HostTensor y(DType::kF32, {4, H});
    f.layers[static_cast<std::size_t>(r)]->forward(x.view(), y.view());
  });
  for (const auto& e : again) CHECK_FALSE(e.has_value());
}

TEST_CASE("forward: wrong input width on one rank is an error on every rank") {
  Fixture f(2, 4, 1);
  const std::int64_t H = f.model.hidden();
  auto errors = test::on_threads(2, [&](int r) {
    const std::int64_t width = r == 0 ? H + 1 : H;
    HostTensor x(DType::kF32, {3, width});
    HostTensor y(DType::kF32, {3, width});
    f.layers[static_cast<std::size_t>(r)]->forward(x.view(), y.view());
  });
  REQUIRE(errors[0].has_value());
  CHECK(errors[0]->message().find("MoE input x: expected f32[*,16]") != std::string::npos);
  REQUIRE(errors[1].has_value());
  CHECK(errors[1]->code() == ErrorCode::kPeerFailed);
}

TEST_CASE("a plan with an expert id out of range is refused before anything is sent") {
  Fixture f(1, 4, 1);
  RoutingPlan plan;
  plan.num_tokens = 1;
  plan.slots = 1;
  plan.experts = {4};
  plan.weights = {1.0f};
  HostTensor x(DType::kF32, {1, f.model.hidden()});
  DispatchHandle handle;
  CHECK_THROWS_WITH_AS(f.layers[0]->dispatch(x.view(), plan, handle),
                       doctest::Contains("has expert 4, outside 0..3"), Error);
}

namespace {

/// A layer with `base`'s parts but the given experts, payload, combine dtype and chunks.
std::unique_ptr<MoELayer> variant_of(const MoELayer& base, std::shared_ptr<ExpertKernel> experts,
                                     PayloadDType payload, DType combine, int chunks) {
  MoELayerParts parts = base.parts();
  parts.experts = std::move(experts);
  parts.payload_dtype = payload;
  parts.combine_dtype = combine;
  parts.chunks = chunks;
  return std::make_unique<MoELayer>(std::move(parts));
}

/// Identity experts through the grouped path: `forward` copies, no fused form.
class GroupedCopyExperts final : public ExpertKernel {
 public:
  explicit GroupedCopyExperts(int n) : n_(n) {}
  std::string name() const override { return "grouped copy"; }
  int num_local_experts() const noexcept override { return n_; }
  void forward(const ExpertBatch& batch, Stream& /*stream*/) override {
    std::copy_n(batch.input.data_as<const float>(), batch.input.numel(),
                batch.output.data_as<float>());
  }

 private:
  int n_;
};

}  // namespace

TEST_CASE("identity experts' fused form, by hand: weights summed over the decoded row") {
  IdentityExperts experts(2);
  CHECK(experts.capabilities().fuses_weighted_rows);
  HostStream stream(HostStream::Mode::kInline);
  // Two rows of H = 3 in bf16 (exact values), three slots each; the second row has no slot.
  const std::vector<float> values = {1.0f, -2.0f, 0.5f, 3.0f, 4.0f, -8.0f};
  std::vector<std::uint16_t> rows(2 * payload_row_bytes(PayloadDType::kBF16, 3) / 2, 0);
  for (int r = 0; r < 2; ++r) {
    for (int h = 0; h < 3; ++h)
      rows[static_cast<std::size_t>(r * 4 + h)] = float_to_bf16(values[r * 3 + h]);
  }
  const std::vector<SlotMeta> meta = {{1, 0.25f}, {-1, 9.0f}, {0, 0.5f},
                                      {-1, 1.0f}, {-1, 1.0f}, {-1, 1.0f}};
  std::vector<float> partials(6, 42.0f);
  WeightedRowsBatch batch;
  batch.rows = reinterpret_cast<const std::byte*>(rows.data());
  batch.dtype = PayloadDType::kBF16;
  batch.meta = meta.data();
  batch.num_rows = 2;
  batch.slots = 3;
  batch.hidden = 3;
  batch.partial_dtype = DType::kF32;
  batch.partials = reinterpret_cast<std::byte*>(partials.data());
  experts.forward_weighted(batch, stream);
  CHECK(partials == std::vector<float>{0.75f, -1.5f, 0.375f, 0.0f, 0.0f, 0.0f});
  const std::vector<SlotMeta> bad = {{2, 1.0f},  {-1, 0.0f}, {-1, 0.0f},
                                     {-1, 1.0f}, {-1, 1.0f}, {-1, 1.0f}};
  batch.meta = bad.data();
  CHECK_THROWS_AS(experts.forward_weighted(batch, stream), Error);
  // A kernel without the fused form says so.
  GroupedCopyExperts grouped(2);
  CHECK_FALSE(grouped.capabilities().fuses_weighted_rows);
  CHECK_THROWS_AS(grouped.forward_weighted(batch, stream), Error);
}

TEST_CASE("forward with fused experts: the grouped path's bits, and sum(weights) * x") {
  for (int ranks : {1, 3}) {
    Fixture f(ranks, 7, 3);
    const std::int64_t H = f.model.hidden();
    for (auto payload : {PayloadDType::kF32, PayloadDType::kBF16, PayloadDType::kFP8}) {
      for (auto combine : {DType::kF32, DType::kBF16}) {
        for (int chunks : {1, 3}) {
          CAPTURE(ranks);
          CAPTURE(payload_dtype_name(payload));
          CAPTURE(dtype_name(combine));
          CAPTURE(chunks);
          auto errors = test::on_threads(ranks, [&](int r) {
            MoELayer& base = *f.layers[static_cast<std::size_t>(r)];
            const int local = base.placement().num_local(r);
            auto fused = variant_of(base, std::make_shared<IdentityExperts>(local), payload,
                                    combine, chunks);
            auto grouped = variant_of(base, std::make_shared<GroupedCopyExperts>(local), payload,
                                      combine, chunks);
            const std::int64_t T = 6 + 2 * r;  // different T per rank
            HostTensor x =
                synthetic_tokens(T, static_cast<int>(H), 5 + static_cast<std::uint64_t>(r));
            RoutingPlan plan;
            base.route(x.view(), plan);
            HostTensor y_fused(DType::kF32, {T, H}), y_grouped(DType::kF32, {T, H});
            fused->forward(x.view(), plan, y_fused.view());
            grouped->forward(x.view(), plan, y_grouped.view());
            CHECK(std::memcmp(y_fused.bytes(), y_grouped.bytes(), y_fused.size_bytes()) == 0);
            // The fused forward keeps no expert-grouped rows.
            CHECK(fused->buffer_bytes() < grouped->buffer_bytes());
            // y[t] = (sum of t's weights) * x[t], up to the payload's and combine's rounding.
            const double tolerance =
                payload == PayloadDType::kFP8
                    ? 0.07
                    : (payload == PayloadDType::kBF16 || combine == DType::kBF16 ? 0.01 : 1e-6);
            for (std::int64_t t = 0; t < T; ++t) {
              double w = 0;
              for (int j = 0; j < plan.slots; ++j) {
                w += plan.weights[static_cast<std::size_t>(t * plan.slots + j)];
              }
              for (std::int64_t h = 0; h < H; ++h) {
                const double expected = w * x.data<float>()[t * H + h];
                const double got = y_fused.data<float>()[t * H + h];
                CHECK(std::abs(got - expected) <= tolerance * (std::abs(expected) + 1e-3));
              }
            }
          });
          for (const auto& e : errors) CHECK_FALSE(e.has_value());
        }
      }
    }
  }
}

namespace {

/// Experts that scale their rows rounded to bf16, with results rounded to bf16:
/// expert_l(x) = bf16((l + 1) · bf16(x)). With `bf16_input` they ask the layer for bf16 rows
/// (`input_dtype`) and use them as they are; otherwise they take f32 rows and round them
/// themselves. With `bf16_output` they ask for bf16 output rows (`output_dtype`) and write
/// the bits; otherwise they write the rounded values as f32. Both take f32 rows and outputs,
/// and record the dtypes of the last rows they were given.
class ScaledBf16Experts final : public ExpertKernel {
 public:
  ScaledBf16Experts(int n, bool bf16_input, bool bf16_output = false)
      : n_(n), bf16_input_(bf16_input), bf16_output_(bf16_output) {}
  std::string name() const override { return "scaled bf16"; }
  int num_local_experts() const noexcept override { return n_; }
  ExpertKernelCapabilities capabilities() const noexcept override {
    ExpertKernelCapabilities c;
    c.input_dtype = bf16_input_ ? DType::kBF16 : DType::kF32;
    c.output_dtype = bf16_output_ ? DType::kBF16 : DType::kF32;
    return c;
  }
  void forward(const ExpertBatch& batch, Stream& /*stream*/) override {
    const std::int64_t H = batch.output.dim(1);
    check_expert_batch(batch, H, static_cast<std::size_t>(n_), Device::host(), names_,
                       capabilities().input_dtype, capabilities().output_dtype);
    last_input = batch.input.dtype();
    last_output = batch.output.dtype();
    std::int64_t row = 0;
    for (int l = 0; l < n_; ++l) {
      for (std::int64_t i = 0; i < batch.rows_per_expert[static_cast<std::size_t>(l)]; ++i) {
        for (std::int64_t h = 0; h < H; ++h, ++row) {
          const std::uint16_t bits = last_input == DType::kBF16
                                         ? batch.input.data_as<const std::uint16_t>()[row]
                                         : float_to_bf16(batch.input.data_as<const float>()[row]);
          const std::uint16_t result =
              float_to_bf16(static_cast<float>(l + 1) * bf16_to_float(bits));
          if (last_output == DType::kBF16) {
            batch.output.data_as<std::uint16_t>()[row] = result;
          } else {
            batch.output.data_as<float>()[row] = bf16_to_float(result);
          }
        }
      }
    }
  }
  DType last_input = DType::kI32;  // none yet
  DType last_output = DType::kI32;

 private:
  int n_;
  bool bf16_input_, bf16_output_;
  ExpertBatchNames names_{"scaled bf16"};
};

/// Synthetic tokens x [T,H] (from `seed`), their plan as `base` routes them, and the outputs
/// of layers `a` and `b` (variants of `base`, hidden size H) on that plan, which must be the
/// same bits.
struct TwoForwards {
  HostTensor x, y_a, y_b;
  RoutingPlan plan;
};
TwoForwards same_forwards(MoELayer& base, MoELayer& a, MoELayer& b, std::int64_t T, std::int64_t H,
                          std::uint64_t seed) {
  TwoForwards out{synthetic_tokens(T, static_cast<int>(H), seed), HostTensor(DType::kF32, {T, H}),
                  HostTensor(DType::kF32, {T, H}), RoutingPlan{}};
  base.route(out.x.view(), out.plan);
  a.forward(out.x.view(), out.plan, out.y_a.view());
  b.forward(out.x.view(), out.plan, out.y_b.view());
  CHECK(std::memcmp(out.y_a.bytes(), out.y_b.bytes(), out.y_a.size_bytes()) == 0);
  return out;
}

/// Checks y[t] = Σ_j w_j · (l_j + 1) · x[t] (l_j: slot j's local expert on its rank, the
/// ScaledBf16Experts' factor) in float64, within `tolerance` relative: the payload's and
/// bf16's rounding.
void check_scaled_sums(const ExpertPlacement& placement, const RoutingPlan& plan,
                       const HostTensor& x, const HostTensor& y, double tolerance) {
  const std::int64_t T = x.shape()[0], H = x.shape()[1];
  for (std::int64_t t = 0; t < T; ++t) {
    for (std::int64_t h = 0; h < H; ++h) {
      double expected = 0;
      for (int j = 0; j < plan.slots; ++j) {
        const auto s = static_cast<std::size_t>(t * plan.slots + j);
        const int e = plan.experts[s];
        if (e < 0) continue;
        const int l = e - placement.first_expert(placement.rank_of(e));
        expected += static_cast<double>(plan.weights[s]) * (l + 1) * x.data<float>()[t * H + h];
      }
      const double got = y.data<float>()[t * H + h];
      CHECK(std::abs(got - expected) <= tolerance * (std::abs(expected) + 1e-3));
    }
  }
}

}  // namespace

TEST_CASE("a kernel that asks for bf16 rows gets them grouped in bf16, with the same y") {
  for (int ranks : {1, 3}) {
    Fixture f(ranks, 7, 3);
    const std::int64_t H = f.model.hidden();
    for (auto payload : {PayloadDType::kF32, PayloadDType::kBF16, PayloadDType::kFP8}) {
      for (int chunks : {1, 3}) {
        CAPTURE(ranks);
        CAPTURE(payload_dtype_name(payload));
        CAPTURE(chunks);
        auto errors = test::on_threads(ranks, [&](int r) {
          MoELayer& base = *f.layers[static_cast<std::size_t>(r)];
          const int local = base.placement().num_local(r);
          auto asks = std::make_shared<ScaledBf16Experts>(local, true);
          auto rounds = std::make_shared<ScaledBf16Experts>(local, false);
          auto with_bf16_rows = variant_of(base, asks, payload, DType::kF32, chunks);
          auto with_f32_rows = variant_of(base, rounds, payload, DType::kF32, chunks);
          const std::int64_t T = 6 + 2 * r;
          auto [x, y_bf16, y_f32, plan] = same_forwards(base, *with_bf16_rows, *with_f32_rows, T, H,
                                                        9 + static_cast<std::uint64_t>(r));
          const bool got_rows = asks->last_input != DType::kI32;  // a rank may receive none
          if (got_rows) CHECK(asks->last_input == DType::kBF16);
          if (rounds->last_input != DType::kI32) CHECK(rounds->last_input == DType::kF32);
          check_scaled_sums(base.placement(), plan, x, y_bf16,
                            payload == PayloadDType::kFP8 ? 0.1 : 0.01);
          // The caller's own dispatch hands over f32 rows, whatever the kernel asks for.
          DispatchHandle handle;
          with_bf16_rows->dispatch(x.view(), plan, handle);
          CHECK(handle.expert_input().dtype() == DType::kF32);
          HostTensor y_combined(DType::kF32, {T, H});
          with_bf16_rows->combine(handle, handle.expert_input(), y_combined.view());
          // A training forward keeps f32 rows for the backward: the kernel gets those.
          asks->last_input = DType::kI32;
          with_bf16_rows->set_training(true);
          with_bf16_rows->forward(x.view(), plan, y_bf16.view());
          CHECK(std::memcmp(y_bf16.bytes(), y_f32.bytes(), y_bf16.size_bytes()) == 0);
          if (got_rows) CHECK(asks->last_input == DType::kF32);
        });
        for (const auto& e : errors) CHECK_FALSE(e.has_value());
      }
    }
  }
}

TEST_CASE("a kernel that asks for bf16 outputs writes them, with the same y as f32 outputs") {
  for (int ranks : {1, 3}) {
    Fixture f(ranks, 7, 3);
    const std::int64_t H = f.model.hidden();
    for (auto payload : {PayloadDType::kF32, PayloadDType::kBF16}) {
      for (auto combine : {DType::kF32, DType::kBF16}) {
        for (int chunks : {1, 3}) {
          CAPTURE(ranks);
          CAPTURE(payload_dtype_name(payload));
          CAPTURE(dtype_name(combine));
          CAPTURE(chunks);
          auto errors = test::on_threads(ranks, [&](int r) {
            MoELayer& base = *f.layers[static_cast<std::size_t>(r)];
            const int local = base.placement().num_local(r);
            auto writes_bf16 = std::make_shared<ScaledBf16Experts>(local, true, true);
            auto writes_f32 = std::make_shared<ScaledBf16Experts>(local, true, false);
            auto with_bf16_out = variant_of(base, writes_bf16, payload, combine, chunks);
            auto with_f32_out = variant_of(base, writes_f32, payload, combine, chunks);
            const std::int64_t T = 5 + 3 * r;
            // The reduce widens bf16 outputs exactly: the same bits as f32 outputs holding
            // the same values.
            auto [x, y_bf16, y_f32, plan] = same_forwards(base, *with_bf16_out, *with_f32_out, T, H,
                                                          21 + static_cast<std::uint64_t>(r));
            const bool got_rows = writes_bf16->last_output != DType::kI32;
            if (got_rows) CHECK(writes_bf16->last_output == DType::kBF16);
            if (writes_f32->last_output != DType::kI32) {
              CHECK(writes_f32->last_output == DType::kF32);
            }
            check_scaled_sums(base.placement(), plan, x, y_bf16, 0.02);
            // The caller's own dispatch gives f32 outputs; combine takes bf16 ones as well.
            DispatchHandle handle;
            with_bf16_out->dispatch(x.view(), plan, handle);
            CHECK(handle.expert_output().dtype() == DType::kF32);
            const TensorView rows = handle.expert_input();
            std::vector<std::uint16_t> outputs(static_cast<std::size_t>(rows.numel()));
            const TensorView out(outputs.data(), DType::kBF16, {rows.dim(0), H});
            HostStream stream;
            writes_bf16->forward(ExpertBatch{rows, handle.rows_per_expert(), out}, stream);
            HostTensor y_combined(DType::kF32, {T, H});
            with_bf16_out->combine(handle, out, y_combined.view());
            CHECK(std::memcmp(y_combined.bytes(), y_f32.bytes(), y_f32.size_bytes()) == 0);
            // A training forward keeps f32 rows for the backward: the kernel writes f32.
            writes_bf16->last_output = DType::kI32;
            with_bf16_out->set_training(true);
            with_bf16_out->forward(x.view(), plan, y_bf16.view());
            CHECK(std::memcmp(y_bf16.bytes(), y_f32.bytes(), y_bf16.size_bytes()) == 0);
            if (got_rows) CHECK(writes_bf16->last_output == DType::kF32);
          });
          for (const auto& e : errors) CHECK_FALSE(e.has_value());
        }
      }
    }
  }
}
