#include "switchyard/collectives.hpp"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>

#include "switchyard/status.hpp"

namespace switchyard {
namespace {

template <typename T>
void reduce_typed(T* acc, const T* in, std::size_t n, ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      for (std::size_t i = 0; i < n; ++i) acc[i] += in[i];
      break;
    case ReduceOp::kMax:
      for (std::size_t i = 0; i < n; ++i) acc[i] = std::max(acc[i], in[i]);
      break;
    case ReduceOp::kMin:
      for (std::size_t i = 0; i < n; ++i) acc[i] = std::min(acc[i], in[i]);
      break;
  }
}

}  // namespace

void check_alltoallv_arguments(const AlltoallvBuffers& b, int size, std::string_view transport) {
  const auto n = static_cast<std::size_t>(size);
  if (b.send_counts.size() != n || b.send_offsets.size() != n || b.recv_counts.size() != n ||
      b.recv_offsets.size() != n) {
    throw Error(ErrorCode::kInvalidArgument,
                std::string(transport) +
                    " alltoallv: counts and offsets must have one entry per rank (" +
                    std::to_string(n) + ")");
  }
}

void reduce_into(void* acc, const void* in, std::size_t count, DType dtype, ReduceOp op) {
  switch (dtype) {
    case DType::kF32:
      return reduce_typed(static_cast<float*>(acc), static_cast<const float*>(in), count, op);
    case DType::kF64:
      return reduce_typed(static_cast<double*>(acc), static_cast<const double*>(in), count, op);
    case DType::kI32:
      return reduce_typed(static_cast<std::int32_t*>(acc), static_cast<const std::int32_t*>(in),
                          count, op);
    case DType::kI64:
      return reduce_typed(static_cast<std::int64_t*>(acc), static_cast<const std::int64_t*>(in),
                          count, op);
    default:
      throw Error(ErrorCode::kInvalidArgument, "allreduce: dtype " +
                                                   std::string(dtype_name(dtype)) +
                                                   " is not supported (f32, f64, i32, i64 are)");
  }
}

AlltoallvBuffers alltoall_as_alltoallv(const void* send, void* recv, std::size_t bytes_per_peer,
                                       int size, CollectiveScratch& scratch) {
  const auto n = static_cast<std::size_t>(size);
  scratch.counts.assign(n, bytes_per_peer);
  scratch.offsets.resize(n);
  for (std::size_t p = 0; p < n; ++p) scratch.offsets[p] = p * bytes_per_peer;
  return {static_cast<const std::byte*>(send), scratch.counts, scratch.offsets,
          static_cast<std::byte*>(recv),       scratch.counts, scratch.offsets};
}

void allreduce_through_alltoall(Transport& transport, void* data, std::size_t count, DType dtype,
                                ReduceOp op, CollectiveScratch& scratch) {
  reduce_into(nullptr, nullptr, 0, dtype, op);  // rejects unsupported dtypes before sending
  const std::size_t bytes = count * dtype_size(dtype);
  const auto n = static_cast<std::size_t>(transport.size());
  scratch.send.resize(n * bytes);
  scratch.recv.resize(n * bytes);
  for (std::size_t p = 0; p < n; ++p) std::memcpy(scratch.send.data() + p * bytes, data, bytes);
  transport.alltoall(scratch.send.data(), scratch.recv.data(), bytes);
  for (std::size_t p = 1; p < n; ++p) {
    reduce_into(scratch.recv.data(), scratch.recv.data() + p * bytes, count, dtype, op);
  }
  if (bytes != 0) std::memcpy(data, scratch.recv.data(), bytes);
}

void barrier_through_alltoall(Transport& transport, CollectiveScratch& scratch) {
  const auto n = static_cast<std::size_t>(transport.size());
  scratch.send.resize(n);
  scratch.recv.resize(n);
  transport.alltoall(scratch.send.data(), scratch.recv.data(), 1);
}

std::vector<int> split_group(Transport& transport, int color, int key) {
  const auto n = static_cast<std::size_t>(transport.size());
  std::vector<std::int32_t> mine(2 * n), all(2 * n);
  for (std::size_t p = 0; p < n; ++p) {
    mine[2 * p] = color;
    mine[2 * p + 1] = key;
  }
  transport.alltoall(mine.data(), all.data(), 2 * sizeof(std::int32_t));
  if (color < 0) return {};
  std::vector<std::pair<int, int>> members;  // (key, old rank)
  for (std::size_t p = 0; p < n; ++p) {
    if (all[2 * p] == color) members.emplace_back(all[2 * p + 1], static_cast<int>(p));
  }
  std::stable_sort(members.begin(), members.end());
  std::vector<int> group;
  for (const auto& m : members) group.push_back(m.second);
  return group;
}

}  // namespace switchyard
