#pragma once
/// \file
/// Collective algorithms written only against the `Transport` interface, for transport
/// plugins to build on: one implementation, the same bits on every transport.

#include <cstddef>
#include <memory>
#include <span>
#include <string_view>
#include <vector>

#include "switchyard/transport.hpp"

namespace switchyard {

/// Throws `Error(kInvalidArgument)` naming `transport` unless every count and offset array
/// of `buffers` has `size` entries.
void check_alltoallv_arguments(const AlltoallvBuffers& buffers, int size,
                               std::string_view transport);

/// acc[i] = op(acc[i], in[i]) for `count` elements of f32, f64, i32 or i64; throws
/// `Error(kInvalidArgument)` for other dtypes.
void reduce_into(void* acc, const void* in, std::size_t count, DType dtype, ReduceOp op);

/// Reusable buffers of the algorithms below; one per communicator, not shared between
/// threads.
struct CollectiveScratch {
  std::vector<std::byte> send, recv;
  std::vector<std::size_t> counts, offsets;
};

/// The arguments of an `alltoallv` that is the `alltoall` of `bytes_per_peer` bytes among
/// `size` ranks; the counts and offsets live in `scratch`.
AlltoallvBuffers alltoall_as_alltoallv(const void* send, void* recv, std::size_t bytes_per_peer,
                                       int size, CollectiveScratch& scratch);

/// Allreduce on `alltoall`: every rank receives every contribution and combines them in
/// rank order, so all ranks (and all transports) get the same bits.
void allreduce_through_alltoall(Transport& transport, void* data, std::size_t count, DType dtype,
                                ReduceOp op, CollectiveScratch& scratch);

/// Barrier on an `alltoall` of one byte.
void barrier_through_alltoall(Transport& transport, CollectiveScratch& scratch);

/// The group of a `split(color, key)`: exchanges every rank's (color, key) with `alltoall`
/// and returns the old ranks with this rank's color, ordered by (key, old rank). Empty for
/// a negative color. Collective.
std::vector<int> split_group(Transport& transport, int color, int key);

/// A `TransportRequest` that drives an `Exchange` (any type with `bool test()` and
/// `void wait()`, both throwing on failure) and keeps `Owner` (the state the exchange
/// uses, e.g. the transport's context) alive until the exchange is gone.
template <typename Exchange, typename Owner>
class PolledRequest final : public TransportRequest {
 public:
  PolledRequest(std::shared_ptr<Owner> owner, std::unique_ptr<Exchange> exchange)
      : owner_(std::move(owner)), exchange_(std::move(exchange)) {}
  ~PolledRequest() override {
    try {
      wait();
    } catch (...) {
      // A destructor cannot report; the failure shows in the next collective.
    }
  }
  void wait() override {
    if (!exchange_) return;
    auto exchange = std::move(exchange_);
    exchange->wait();
  }
  bool test() override {
    if (!exchange_) return true;
    if (!exchange_->test()) return false;
    exchange_.reset();
    return true;
  }

 private:
  std::shared_ptr<Owner> owner_;  // declared first: outlives the exchange
  std::unique_ptr<Exchange> exchange_;
};

}  // namespace switchyard
