#pragma once
// The shared state of one in-process communicator: a ring of rendezvous slots through
// which the ranks (threads) of a collective publish pointers to their arguments and read
// each other's buffers directly.

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "switchyard/status.hpp"
#include "switchyard/topology.hpp"
#include "switchyard/transport.hpp"

namespace switchyard::inproc {

/// Failure flag shared by a communicator and every communicator split from it.
struct AbortState {
  std::atomic<bool> aborted{false};
  std::mutex mutex;
  std::string reason;
};

/// One communicator's rendezvous. Collective number `seq` of every rank uses slot
/// `seq % kRing`; a rank may run up to kRing collectives ahead of the slowest.
///
/// Protocol of one collective: `arrive` (publish the argument), `wait_all_arrived` (then
/// read peers' buffers), `depart` (done reading), `wait_all_departed` (peers are done with
/// this rank's buffers, which may now be reused). Every wait is bounded by the timeout
/// and ends early when the communicator is aborted.
///
/// Buffers of a rank that gives up: a rank that times out aborts the communicator (so no
/// peer starts reading any more), then waits until the peers already reading its
/// buffers have finished their copies, and only then throws and unwinds; so does a rank
/// that finds the communicator aborted after every rank arrived (peers may be reading its
/// argument already). A peer reads only between a successful `wait_all_arrived`/
/// `try_all_arrived` and its `depart`.
class World {
 public:
  /// `world_ranks[r]`: the world rank of communicator rank r (for messages); empty means
  /// this communicator is the world.
  World(int size, double timeout_s, Topology topology, std::shared_ptr<AbortState> abort,
        std::vector<int> world_ranks = {});

  int size() const noexcept { return size_; }
  double timeout_s() const noexcept { return timeout_s_; }
  const Topology& topology() const noexcept { return topology_; }
  const std::shared_ptr<AbortState>& abort_state() const noexcept { return abort_; }
  /// The world rank of communicator rank `rank`.
  int world_rank(int rank) const noexcept {
    return world_ranks_.empty() ? rank : world_ranks_[static_cast<std::size_t>(rank)];
  }

  void arrive(std::uint64_t seq, int rank, const void* argument, const char* op);
  /// The arguments of all ranks, indexed by rank; the caller is a reader until `depart`.
  std::span<const void* const> wait_all_arrived(std::uint64_t seq, const char* op);
  /// Like `wait_all_arrived` without waiting: empty when not all have arrived yet.
  std::optional<std::span<const void* const>> try_all_arrived(std::uint64_t seq, const char* op);
  /// Done reading peers' buffers (and no longer a reader).
  void depart(std::uint64_t seq, int rank);
  void wait_all_departed(std::uint64_t seq, const char* op);
  bool all_departed(std::uint64_t seq);
  void abort(const std::string& reason) noexcept;

 private:
  static constexpr std::uint64_t kRing = 16;
  struct Slot {
    std::uint64_t seq = 0;  // the collective this slot serves now
    int arrived = 0;
    int departed = 0;
    int readers = 0;                  // ranks between all-arrived and their depart
    std::vector<const void*> posted;  // per rank; null until it arrives
    std::vector<char> gone;           // per rank: has departed
  };
  Slot& slot(std::uint64_t seq) { return slots_[seq % kRing]; }
  /// Waits under `lock` until `ready()`; throws kTimeout naming `waiting_for()` ranks, or
  /// kPeerFailed when aborted.
  template <typename Ready, typename Missing>
  void wait(std::unique_lock<std::mutex>& lock, const char* op, std::uint64_t seq, const char* what,
            Ready ready, Missing missing);
  /// The kPeerFailed error naming `op` and the abort's reason, if the communicator aborted.
  std::optional<Error> abort_error(const char* op);
  /// Aborts with `reason`, waits until nobody reads this slot's buffers, then throws `error`.
  [[noreturn]] void give_up(std::unique_lock<std::mutex>& lock, Slot& s, const Error& error);
  /// "rank(s) 1, 2" in the world, "world rank(s) 5, 7" in a split communicator.
  std::string describe(const std::vector<int>& ranks) const;

  const int size_;
  const double timeout_s_;
  const Topology topology_;
  std::shared_ptr<AbortState> abort_;
  const std::vector<int> world_ranks_;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<Slot> slots_;
};

/// Departs for a rank that leaves its reading section by an exception (after aborting, so
/// that peers stop): a reader that never departed would keep a rank that gives up waiting.
class DepartOnThrow {
 public:
  DepartOnThrow(World& world, std::uint64_t seq, int rank)
      : world_(world), seq_(seq), rank_(rank) {}
  ~DepartOnThrow();
  DepartOnThrow(const DepartOnThrow&) = delete;
  DepartOnThrow& operator=(const DepartOnThrow&) = delete;
  /// The reading section ended normally; the caller departs itself.
  void release() noexcept { armed_ = false; }

 private:
  World& world_;
  std::uint64_t seq_;
  int rank_;
  bool armed_ = true;
};

/// Copies what every peer (its posted `AlltoallvBuffers`) sends to `me` into this rank's
/// receive buffer. Returns the first size mismatch instead of throwing, so the caller
/// still departs. `transport` names the plugin in the message.
std::optional<Error> pull_alltoallv(std::span<const void* const> posted, int me,
                                    const AlltoallvBuffers& mine, const char* transport);

/// Communicator rank `rank`'s whole part in collective `seq`, an alltoallv of `mine`:
/// arrive, copy from the peers, depart, and wait until no peer reads `mine` any more.
/// Throws the size mismatch after departing.
void run_alltoallv(World& world, std::uint64_t seq, int rank, const AlltoallvBuffers& mine,
                   const char* transport);
/// A barrier as collective `seq`.
void run_barrier(World& world, std::uint64_t seq, int rank);
/// A split as collective `seq`: the world of the ranks with the same `color`, ordered by
/// (`key`, old rank), and this rank's index in it; a null world for a negative color.
std::pair<std::shared_ptr<World>, int> run_split(World& world, std::uint64_t seq, int rank,
                                                 int color, int key);

}  // namespace switchyard::inproc
