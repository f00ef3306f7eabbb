// datapath_cuda against the host data path on the same random inputs (never zeros; device
// outputs poisoned with 0xff bytes — NaN — before each call): the same layout, the same
// payload bytes for f32, bf16 and fp8, the same grouping (into f32 and into bf16 rows), the
// same weighted sums and unpermute-sums bit for bit (both add in the same order without
// contraction), and router logits within float rounding (the host sums in blocks, the
// device in order).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <tuple>
#include <utility>
#include <vector>

#include "cuda_test_support.hpp"
#include "switchyard/data_path.hpp"
#include "switchyard/layer.hpp"
#include "switchyard/plugin.hpp"

using namespace switchyard;

namespace {

std::shared_ptr<DataPath> cuda_path() {
  static PluginRegistry registry(PluginRegistry::default_search_path());
  DataPathCreateArgs args;
  return registry.create_data_path("cuda", args);
}

/// Random top-k rows over E experts (distinct per token, some slots dropped), weights > 0.
struct Routing {
  std::vector<std::int32_t> experts;
  std::vector<float> weights;
};

Routing random_routing(std::int64_t T, int K, int E, std::mt19937& rng) {
  Routing r;
  std::uniform_real_distribution<float> weight(0.05f, 1.0f);
  std::uniform_int_distribution<int> drop(0, 9);
  std::vector<int> order(static_cast<std::size_t>(E));
  for (std::int64_t t = 0; t < T; ++t) {
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    for (int j = 0; j < K; ++j) {
      const bool dropped = drop(rng) == 0;
      r.experts.push_back(dropped ? -1 : order[static_cast<std::size_t>(j)]);
      r.weights.push_back(dropped ? 0.0f : weight(rng));
    }
  }
  return r;
}

std::vector<float> random_floats(std::size_t n, std::mt19937& rng, float scale = 1.0f) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) {
    do {
      x = normal(rng);
    } while (x == 0.0f);
  }
  return v;
}

template <typename T>
bool same_bytes(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

}  // namespace

TEST_CASE("cuda data path: layout, pack, group, reduce and unpermute equal the host's") {
  auto device = cuda_path();
  auto host = make_host_data_path();
  test::CudaStream stream;
  HostStream host_stream;
  std::mt19937 rng(42);
  for (const auto& [T, K, E, R, H] :
       std::vector<std::tuple<std::int64_t, int, int, int, std::int64_t>>{
           {1, 1, 4, 1, 8},
           {100, 2, 8, 4, 300},
           {257, 8, 64, 8, 1000},
           {64, 4, 10, 3, 128},
           // H not a multiple of 4 (the element-wise kernels), and rows longer than one
           // pass of a block (the kernels that move four elements at a time).
           {50, 3, 6, 2, 37},
           {16, 2, 4, 2, 8192}}) {
    CAPTURE(T);
    CAPTURE(K);
    CAPTURE(E);
    CAPTURE(R);
    CAPTURE(H);
    const ExpertPlacement placement(E, R);
    const Routing routing = random_routing(T, K, E, rng);
    test::DeviceArray<std::int32_t> d_experts(routing.experts);
    test::DeviceArray<float> d_weights(routing.weights);

    // Counts and offsets.
    std::vector<std::int64_t> rows_host(static_cast<std::size_t>(R)),
        rows_dev(static_cast<std::size_t>(R), -1);
    LayoutCountsArgs counts{routing.experts.data(), T, K, &placement, rows_host.data()};
    host->layout_counts(counts, host_stream);
    counts.experts = d_experts.get();
    counts.rows_to = rows_dev.data();
    device->layout_counts(counts, stream);
    REQUIRE(rows_dev == rows_host);
    std::vector<std::int64_t> offsets(static_cast<std::size_t>(R));
    std::int64_t S = 0;
    for (int d = 0; d < R; ++d) {
      offsets[static_cast<std::size_t>(d)] = S;
      S += rows_host[static_cast<std::size_t>(d)];
    }

    // Layout.
    std::vector<std::int64_t> token_host(static_cast<std::size_t>(S));
    std::vector<SlotMeta> meta_host(static_cast<std::size_t>(S * K));
    LayoutArgs layout{routing.experts.data(), routing.weights.data(), T, K, &placement, offsets,
                      token_host.data(),      meta_host.data()};
    host->layout(layout, host_stream);
    test::DeviceArray<std::int64_t> d_token(static_cast<std::size_t>(S));
    test::DeviceArray<SlotMeta> d_meta(static_cast<std::size_t>(S * K));
    d_token.poison();
    d_meta.poison();
    layout.experts = d_experts.get();
    layout.weights = d_weights.get();
    layout.send_row_token = d_token.get();
    layout.send_meta = d_meta.get();
    device->layout(layout, stream);
    stream.synchronize();
    REQUIRE(d_token.to_host() == token_host);
    REQUIRE(same_bytes(d_meta.to_host(), meta_host));

    const std::vector<float> x = random_floats(static_cast<std::size_t>(T * H), rng, 3.0f);
    test::DeviceArray<float> d_x(x);
    for (PayloadDType dtype : {PayloadDType::kF32, PayloadDType::kBF16, PayloadDType::kFP8}) {
      CAPTURE(payload_dtype_name(dtype));
      const std::size_t row_bytes = payload_row_bytes(dtype, H);
      // Pack.
      std::vector<std::byte> rows_host_bytes(static_cast<std::size_t>(S) * row_bytes);
      PackArgs pack{x.data(), H, token_host.data(), S, dtype, rows_host_bytes.data()};
      host->pack(pack, host_stream);
      test::DeviceArray<std::byte> d_rows(rows_host_bytes.size());
      d_rows.poison();
      pack.x = d_x.get();
      pack.send_row_token = d_token.get();
      pack.rows = d_rows.get();
      device->pack(pack, stream);
      stream.synchronize();
      REQUIRE(same_bytes(d_rows.to_host(), rows_host_bytes));

      // The rows as received by one rank: all S rows, with local experts of rank 0's size.
      const int L = placement.num_local(0);
      std::vector<SlotMeta> received = meta_host;
      for (auto& m : received) {
        if (m.local_expert >= L) m.local_expert = m.local_expert % L;
      }
      test::DeviceArray<SlotMeta> d_received(received);
      std::vector<std::int64_t> per_host(static_cast<std::size_t>(L)),
          per_dev(static_cast<std::size_t>(L), -1);
      GroupCountArgs gc{received.data(), S, K, L, per_host.data()};
      host->count_groups(gc, host_stream);
      gc.meta = d_received.get();
      gc.rows_per_expert = per_dev.data();
      device->count_groups(gc, stream);
      REQUIRE(per_dev == per_host);
      std::int64_t A = 0;
      for (auto c : per_host) A += c;

      std::vector<float> input_host(static_cast<std::size_t>(A * H));
      std::vector<std::int64_t> assign_host(static_cast<std::size_t>(S * K));
      GroupArgs group{rows_host_bytes.data(),
                      received.data(),
                      S,
                      K,
                      H,
                      dtype,
                      L,
                      per_host.data(),
                      reinterpret_cast<std::byte*>(input_host.data()),
                      assign_host.data()};
      host->group_by_expert(group, host_stream);
      test::DeviceArray<float> d_input(static_cast<std::size_t>(A * H));
      test::DeviceArray<std::int64_t> d_assign(static_cast<std::size_t>(S * K));
      d_input.poison();
      d_assign.poison();
      GroupArgs on_device = group;
      on_device.rows = d_rows.get();
      on_device.meta = d_received.get();
      on_device.expert_input = reinterpret_cast<std::byte*>(d_input.get());
      on_device.assignment_of_slot = d_assign.get();
      device->group_by_expert(on_device, stream);
      stream.synchronize();
      REQUIRE(d_assign.to_host() == assign_host);
      REQUIRE(same_bytes(d_input.to_host(), input_host));
      // Grouped into bf16 rows (what a bf16 expert kernel takes): each element of the f32
      // rows rounded to nearest even, on both paths.
      std::vector<std::uint16_t> bf16_host(static_cast<std::size_t>(A * H));
      group.expert_input = reinterpret_cast<std::byte*>(bf16_host.data());
      group.expert_input_dtype = DType::kBF16;
      host->group_by_expert(group, host_stream);
      for (std::size_t i = 0; i < bf16_host.size(); ++i)
        REQUIRE(bf16_host[i] == float_to_bf16(input_host[i]));
      test::DeviceArray<std::uint16_t> d_bf16(bf16_host.size());
      d_bf16.poison();
      on_device.expert_input = reinterpret_cast<std::byte*>(d_bf16.get());
      on_device.expert_input_dtype = DType::kBF16;
      device->group_by_expert(on_device, stream);
      stream.synchronize();
      REQUIRE(d_assign.to_host() == assign_host);
      REQUIRE(same_bytes(d_bf16.to_host(), bf16_host));

      // Reduce (from f32 and from bf16 expert outputs) and unpermute-sum, in f32 and bf16.
      const std::vector<float> expert_out = random_floats(static_cast<std::size_t>(A * H), rng);
      std::vector<std::uint16_t> expert_out_bf16(expert_out.size());
      for (std::size_t i = 0; i < expert_out.size(); ++i)
        expert_out_bf16[i] = float_to_bf16(expert_out[i]);
      test::DeviceArray<float> d_out(expert_out);
      test::DeviceArray<std::uint16_t> d_out_bf16(expert_out_bf16);
      for (const auto& dtypes :
           std::vector<std::pair<DType, DType>>{{DType::kF32, DType::kF32},
                                                {DType::kBF16, DType::kF32},
                                                {DType::kF32, DType::kBF16},
                                                {DType::kBF16, DType::kBF16}}) {
        const DType combine = dtypes.first, outputs = dtypes.second;
        CAPTURE(static_cast<int>(combine));
        CAPTURE(static_cast<int>(outputs));
        const bool bf16_outputs = outputs == DType::kBF16;
        const std::size_t bytes = static_cast<std::size_t>(S * H) * dtype_size(combine);
        std::vector<std::byte> partial_host(bytes);
        WeightedReduceArgs reduce;
        reduce.expert_output = bf16_outputs
                                   ? reinterpret_cast<const std::byte*>(expert_out_bf16.data())
                                   : reinterpret_cast<const std::byte*>(expert_out.data());
        reduce.expert_output_dtype = outputs;
        reduce.meta = received.data();
        reduce.assignment_of_slot = assign_host.data();
        reduce.num_rows = S;
        reduce.slots = K;
        reduce.hidden = H;
        reduce.combine_dtype = combine;
        reduce.partial_rows = partial_host.data();
        host->weighted_reduce(reduce, host_stream);
        test::DeviceArray<std::byte> d_partial(bytes);
        d_partial.poison();
        reduce.expert_output = bf16_outputs ? reinterpret_cast<const std::byte*>(d_out_bf16.get())
                                            : reinterpret_cast<const std::byte*>(d_out.get());
        reduce.meta = d_received.get();
        reduce.assignment_of_slot = d_assign.get();
        reduce.partial_rows = d_partial.get();
        device->weighted_reduce(reduce, stream);
        stream.synchronize();
        REQUIRE(same_bytes(d_partial.to_host(), partial_host));

        std::vector<float> y_host(static_cast<std::size_t>(T * H));
        UnpermuteSumArgs unpermute{
            partial_host.data(), token_host.data(), S, H, combine, y_host.data(), T};
        host->unpermute_sum(unpermute, host_stream);
        test::DeviceArray<float> d_y(y_host.size());
        d_y.poison();
        unpermute.combined_rows = d_partial.get();
        unpermute.send_row_token = d_token.get();
        unpermute.y = d_y.get();
        device->unpermute_sum(unpermute, stream);
        stream.synchronize();
        REQUIRE(same_bytes(d_y.to_host(), y_host));
      }
    }
  }
}

TEST_CASE("cuda data path: router logits are the host's bits") {
  auto device = cuda_path();
  auto host = make_host_data_path();
  test::CudaStream stream;
  HostStream host_stream;
  std::mt19937 rng(7);
  for (const auto& [T, E, H] : std::vector<std::tuple<std::int64_t, std::int64_t, std::int64_t>>{
           {1, 8, 64}, {333, 64, 2048}, {70, 256, 100}}) {
    const auto x = random_floats(static_cast<std::size_t>(T * H), rng);
    const auto gate = random_floats(static_cast<std::size_t>(E * H), rng, 0.05f);
    std::vector<float> expected(static_cast<std::size_t>(T * E));
    host->router_logits(TensorView(const_cast<float*>(x.data()), DType::kF32, {T, H}),
                        TensorView(const_cast<float*>(gate.data()), DType::kF32, {E, H}),
                        TensorView(expected.data(), DType::kF32, {T, E}), host_stream);
    test::DeviceArray<float> d_x(x), d_gate(gate), d_logits(expected.size());
    d_logits.poison();
    device->router_logits(TensorView(d_x.get(), DType::kF32, {T, H}, Device::cuda(0)),
                          TensorView(d_gate.get(), DType::kF32, {E, H}, Device::cuda(0)),
                          TensorView(d_logits.get(), DType::kF32, {T, E}, Device::cuda(0)), stream);
    stream.synchronize();
    const auto got = d_logits.to_host();
    // The same order of fused multiply-adds and sums as the host (layer.hpp).
    for (std::size_t i = 0; i < got.size(); ++i) REQUIRE(std::isfinite(got[i]));
    CHECK(std::memcmp(got.data(), expected.data(), got.size() * sizeof(float)) == 0);
    // A token's logits do not depend on how many tokens are computed with it.
    if (T > 1) {
      test::DeviceArray<float> d_one(static_cast<std::size_t>(E));
      device->router_logits(TensorView(d_x.get(), DType::kF32, {1, H}, Device::cuda(0)),
                            TensorView(d_gate.get(), DType::kF32, {E, H}, Device::cuda(0)),
                            TensorView(d_one.get(), DType::kF32, {1, E}, Device::cuda(0)), stream);
      stream.synchronize();
      const auto one = d_one.to_host();
      CHECK(std::memcmp(one.data(), got.data(), one.size() * sizeof(float)) == 0);
    }
  }
}
