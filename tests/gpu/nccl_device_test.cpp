// transport_nccl on device memory at world 1 (one GPU), and on every GPU of the machine
// where there are more (as one process per GPU, started by tests/gpu/run.sh's launcher
// test). Expected values are written by hand from the inputs; outputs are poisoned first.
#include <doctest/doctest.h>

#include <cmath>
#include <numeric>
#include <vector>

#include "cuda_test_support.hpp"
#include "switchyard/plugin.hpp"

using namespace switchyard;

namespace {

std::shared_ptr<Transport> nccl_world_of_one(double timeout_s = 60) {
  static PluginRegistry registry(PluginRegistry::default_search_path());
  static Config config;
  static const ConfigSection options =
      config.section("runtime", registry.options(PluginKind::kTransport, "nccl"));
  TransportCreateArgs args;
  args.options = &options;
  args.timeout_s = timeout_s;
  auto ranks = registry.create_transport("nccl", args);
  REQUIRE(ranks.size() == 1);
  return ranks[0];
}

}  // namespace

TEST_CASE("nccl world 1: alltoallv of device memory to itself, at offsets, on the stream") {
  auto t = nccl_world_of_one();
  CHECK(t->size() == 1);
  CHECK(t->capabilities().device_memory);
  std::vector<float> input(1000);
  std::iota(input.begin(), input.end(), 0.5f);
  test::DeviceArray<float> send(input), recv(1200);
  recv.poison();
  const std::size_t counts[1] = {400 * sizeof(float)};
  const std::size_t send_offsets[1] = {100 * sizeof(float)};
  const std::size_t recv_offsets[1] = {700 * sizeof(float)};
  AlltoallvBuffers b;
  b.send = reinterpret_cast<const std::byte*>(send.get());
  b.recv = reinterpret_cast<std::byte*>(recv.get());
  b.send_counts = counts;
  b.recv_counts = counts;
  b.send_offsets = send_offsets;
  b.recv_offsets = recv_offsets;
  b.device = Device::cuda(0);
  test::CudaStream stream;
  t->alltoallv(b, stream);
  stream.synchronize();
  const auto out = recv.to_host();
  for (int i = 0; i < 400; ++i)
    CHECK(out[static_cast<std::size_t>(700 + i)] == input[static_cast<std::size_t>(100 + i)]);
  CHECK(std::isnan(out[699]));  // untouched around the block
}

TEST_CASE("nccl world 1: two exchanges in one group, stream-ordered, watched without errors") {
  auto t = nccl_world_of_one();
  CHECK(t->capabilities().stream_ordered);
  std::vector<float> rows(64);
  std::iota(rows.begin(), rows.end(), 1.0f);
  const std::vector<std::int32_t> slots = {7, -1, 3, 2};
  test::DeviceArray<float> rows_in(rows), rows_out(64);
  test::DeviceArray<std::int32_t> slots_in(slots), slots_out(4);
  rows_out.poison();
  slots_out.poison();
  const std::size_t row_bytes[1] = {64 * sizeof(float)}, slot_bytes[1] = {4 * sizeof(std::int32_t)};
  const std::size_t at_zero[1] = {0};
  const AlltoallvBuffers exchanges[2] = {
      {reinterpret_cast<const std::byte*>(rows_in.get()), row_bytes, at_zero,
       reinterpret_cast<std::byte*>(rows_out.get()), row_bytes, at_zero, Device::cuda(0)},
      {reinterpret_cast<const std::byte*>(slots_in.get()), slot_bytes, at_zero,
       reinterpret_cast<std::byte*>(slots_out.get()), slot_bytes, at_zero, Device::cuda(0)}};
  test::CudaStream stream;
  t->alltoallv_group(exchanges, stream);
  stream.synchronize();
  t->raise_stream_error();  // nothing was late
  CHECK(rows_out.to_host() == rows);
  CHECK(slots_out.to_host() == slots);
}

TEST_CASE("nccl world 1: allreduce of device f32/f64/i64 leaves the values, barrier and split") {
  auto t = nccl_world_of_one();
  test::CudaStream stream;
  const std::vector<double> values = {1.25, -3.5, 1e300, 7.0};
  test::DeviceArray<double> data(values);
  t->allreduce(data.get(), values.size(), DType::kF64, ReduceOp::kSum, stream);
  stream.synchronize();
  CHECK(data.to_host() == values);
  const std::vector<std::int64_t> counts = {5, 0, 9};
  test::DeviceArray<std::int64_t> c(counts);
  t->allreduce(c.get(), counts.size(), DType::kI64, ReduceOp::kMax, stream);
  CHECK(c.to_host() == counts);
  t->barrier();
  auto child = t->split(0, 0);
  REQUIRE(child != nullptr);
  CHECK(child->size() == 1);
  CHECK(t->split(-1, 0) == nullptr);
}

TEST_CASE("nccl: host memory is staged through the device") {
  auto t = nccl_world_of_one();
  std::vector<std::int32_t> send = {3, 1, 4, 1, 5}, recv(5, -7);
  t->alltoall(send.data(), recv.data(), send.size() * sizeof(std::int32_t));
  CHECK(recv == send);
  double x = 2.5;
  t->allreduce(&x, 1, DType::kF64, ReduceOp::kSum);
  CHECK(x == 2.5);
}
