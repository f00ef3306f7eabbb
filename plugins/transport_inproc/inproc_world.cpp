#include "inproc_world.hpp"

#include <algorithm>
#include <cstring>

namespace switchyard::inproc {
namespace {

/// Ranks whose entry is unset (null pointer or 0), for timeout messages.
template <typename T>
std::vector<int> unset_ranks(const std::vector<T>& per_rank) {
  std::vector<int> ranks;
  for (std::size_t r = 0; r < per_rank.size(); ++r) {
    if (!per_rank[r]) ranks.push_back(static_cast<int>(r));
  }
  return ranks;
}

}  // namespace

World::World(int size, double timeout_s, Topology topology, std::shared_ptr<AbortState> abort,
             std::vector<int> world_ranks)
    : size_(size),
      timeout_s_(timeout_s),
      topology_(std::move(topology)),
      abort_(std::move(abort)),
      world_ranks_(std::move(world_ranks)),
      slots_(kRing) {
  for (std::uint64_t i = 0; i < kRing; ++i) {
    slots_[i].seq = i;
    slots_[i].posted.assign(static_cast<std::size_t>(size), nullptr);
    slots_[i].gone.assign(static_cast<std::size_t>(size), 0);
  }
}

std::string World::describe(const std::vector<int>& ranks) const {
  std::string text = world_ranks_.empty() ? "rank(s) " : "world rank(s) ";
  for (std::size_t i = 0; i < ranks.size(); ++i) {
    if (i > 0) text += ", ";
    text += std::to_string(world_rank(ranks[i]));
  }
  return text;
}

std::optional<Error> World::abort_error(const char* op) {
  if (!abort_->aborted.load()) return std::nullopt;
  std::lock_guard<std::mutex> lock(abort_->mutex);
  return Error(ErrorCode::kPeerFailed, std::string("inproc ") + op + ": " + abort_->reason);
}

void World::give_up(std::unique_lock<std::mutex>& lock, Slot& s, const Error& error) {
  // Abort under `mutex_`: a peer checks the flag under it before it starts reading, so
  // after this line nobody new reads this rank's buffers.
  abort(error.message());
  changed_.wait(lock, [&] { return s.readers == 0; });  // copies in progress end by themselves
  throw error;
}

template <typename Ready, typename Missing>
void World::wait(std::unique_lock<std::mutex>& lock, const char* op, std::uint64_t seq,
                 const char* what, Ready ready, Missing missing) {
  using Clock = std::chrono::steady_clock;
  // timeout_s is at most a week (checked with the config), far inside the clock's range.
  const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                           std::chrono::duration<double>(timeout_s_));
  // Wake up now and then: an abort may come from a communicator split from this one.
  constexpr auto kPoll = std::chrono::milliseconds(50);
  Slot& s = slot(seq);
  while (!ready()) {
    if (auto error = abort_error(op)) give_up(lock, s, *error);
    const auto now = Clock::now();
    if (now >= deadline) {
      give_up(lock, s,
              Error(ErrorCode::kTimeout,
                    std::string("inproc ") + op + " (collective #" + std::to_string(seq) +
                        " of a " + std::to_string(size_) + "-rank communicator): timed out after " +
                        format_seconds(timeout_s_) + " waiting for " + describe(missing()) +
                        " to " + what));
    }
    changed_.wait_until(lock, std::min(deadline, now + kPoll));
  }
}

void World::arrive(std::uint64_t seq, int rank, const void* argument, const char* op) {
  std::unique_lock<std::mutex> lock(mutex_);
  Slot& s = slot(seq);
  // The slot is still serving collective seq - kRing until its last rank departs.
  wait(
      lock, op, seq, "finish an earlier collective", [&] { return s.seq == seq; },
      [&] { return unset_ranks(s.gone); });
  s.posted[static_cast<std::size_t>(rank)] = argument;
  ++s.arrived;
  if (s.arrived == size_) changed_.notify_all();
}

std::span<const void* const> World::wait_all_arrived(std::uint64_t seq, const char* op) {
  std::unique_lock<std::mutex> lock(mutex_);
  Slot& s = slot(seq);
  wait(
      lock, op, seq, "arrive", [&] { return s.arrived == size_; },
      [&] { return unset_ranks(s.posted); });
  // Every rank arrived, but one has already given up. Peers that got here first may be
  // reading (or, for a split, writing results into) this rank's posted argument: wait for
  // them as a rank that gives up does, before this one unwinds.
  if (auto error = abort_error(op)) give_up(lock, s, *error);
  ++s.readers;
  return s.posted;
}

std::optional<std::span<const void* const>> World::try_all_arrived(std::uint64_t seq,
                                                                   const char* op) {
  std::unique_lock<std::mutex> lock(mutex_);
  Slot& s = slot(seq);
  if (auto error = abort_error(op)) give_up(lock, s, *error);  // as in wait_all_arrived
  if (s.seq != seq || s.arrived != size_) return std::nullopt;
  ++s.readers;
  return std::span<const void* const>(s.posted);
}

void World::depart(std::uint64_t seq, int rank) {
  std::lock_guard<std::mutex> lock(mutex_);
  Slot& s = slot(seq);
  --s.readers;
  ++s.departed;
  s.gone[static_cast<std::size_t>(rank)] = 1;
  if (s.departed == size_) {
    // Recycle for collective seq + kRing.
    s.seq = seq + kRing;
    s.arrived = 0;
    s.departed = 0;
    std::fill(s.posted.begin(), s.posted.end(), nullptr);
    std::fill(s.gone.begin(), s.gone.end(), 0);
  }
  changed_.notify_all();  // a rank giving up may be waiting for readers to finish
}

void World::wait_all_departed(std::uint64_t seq, const char* op) {
  std::unique_lock<std::mutex> lock(mutex_);
  Slot& s = slot(seq);
  wait(
      lock, op, seq, "finish reading this rank's buffers", [&] { return s.seq != seq; },
      [&] { return unset_ranks(s.gone); });
}

bool World::all_departed(std::uint64_t seq) {
  std::lock_guard<std::mutex> lock(mutex_);
  return slot(seq).seq != seq;
}

void World::abort(const std::string& reason) noexcept {
  try {
    std::lock_guard<std::mutex> lock(abort_->mutex);
    if (!abort_->aborted.load()) {
      abort_->reason = reason;
      abort_->aborted.store(true);
    }
  } catch (...) {
    abort_->aborted.store(true);
  }
  changed_.notify_all();
}

DepartOnThrow::~DepartOnThrow() {
  if (!armed_) return;
  world_.abort(std::string("world rank ") + std::to_string(world_.world_rank(rank_)) +
               " failed while reading its peers' buffers");
  world_.depart(seq_, rank_);
}

std::optional<Error> pull_alltoallv(std::span<const void* const> posted, int me,
                                    const AlltoallvBuffers& mine, const char* transport) {
  std::optional<Error> problem;
  for (std::size_t p = 0; p < posted.size(); ++p) {
    const auto* peer = static_cast<const AlltoallvBuffers*>(posted[p]);
    const std::size_t n = peer->send_counts[static_cast<std::size_t>(me)];
    if (n != mine.recv_counts[p]) {
      if (!problem) {
        problem = Error(ErrorCode::kInvalidArgument,
                        std::string(transport) + " alltoallv: rank " + std::to_string(p) +
                            " sends " + std::to_string(n) + " bytes to rank " + std::to_string(me) +
                            ", which expects " + std::to_string(mine.recv_counts[p]));
      }
      continue;
    }
    if (n != 0) {
      std::memcpy(mine.recv + mine.recv_offsets[p],
                  peer->send + peer->send_offsets[static_cast<std::size_t>(me)], n);
    }
  }
  return problem;
}

void run_alltoallv(World& world, std::uint64_t seq, int rank, const AlltoallvBuffers& mine,
                   const char* transport) {
  world.arrive(seq, rank, &mine, "alltoallv");
  auto posted = world.wait_all_arrived(seq, "alltoallv");
  DepartOnThrow reading(world, seq, rank);
  auto problem = pull_alltoallv(posted, rank, mine, transport);
  reading.release();
  world.depart(seq, rank);
  world.wait_all_departed(seq, "alltoallv");
  if (problem) throw *problem;
}

void run_barrier(World& world, std::uint64_t seq, int rank) {
  world.arrive(seq, rank, &world, "barrier");
  world.wait_all_arrived(seq, "barrier");
  world.depart(seq, rank);
  world.wait_all_departed(seq, "barrier");
}

namespace {

struct SplitArgument {
  int color;
  int key;
  std::shared_ptr<World>* world_out;  // written by rank 0 of the parent
  int* rank_out;
};

/// Rank 0's part of a split: builds every color's world and writes each member's result.
void build_split_worlds(const World& parent, std::span<const void* const> posted) {
  struct Member {
    int key, old_rank;
  };
  std::vector<int> colors;
  for (const void* p : posted) {
    const int c = static_cast<const SplitArgument*>(p)->color;
    if (c >= 0 && std::find(colors.begin(), colors.end(), c) == colors.end()) colors.push_back(c);
  }
  for (int color : colors) {
    std::vector<Member> members;
    for (std::size_t r = 0; r < posted.size(); ++r) {
      const auto* a = static_cast<const SplitArgument*>(posted[r]);
      if (a->color == color) members.push_back({a->key, static_cast<int>(r)});
    }
    std::stable_sort(members.begin(), members.end(), [](const Member& a, const Member& b) {
      return a.key != b.key ? a.key < b.key : a.old_rank < b.old_rank;
    });
    std::vector<int> nodes;
    for (const auto& m : members) nodes.push_back(parent.topology().node_of(m.old_rank));
    std::vector<int> world_ranks;
    for (const auto& m : members) world_ranks.push_back(parent.world_rank(m.old_rank));
    auto world =
        std::make_shared<World>(static_cast<int>(members.size()), parent.timeout_s(),
                                Topology(nodes), parent.abort_state(), std::move(world_ranks));
    for (std::size_t i = 0; i < members.size(); ++i) {
      const auto* a =
          static_cast<const SplitArgument*>(posted[static_cast<std::size_t>(members[i].old_rank)]);
      *a->world_out = world;
      *a->rank_out = static_cast<int>(i);
    }
  }
}

}  // namespace

std::pair<std::shared_ptr<World>, int> run_split(World& world, std::uint64_t seq, int rank,
                                                 int color, int key) {
  std::shared_ptr<World> new_world;
  int new_rank = -1;
  const SplitArgument mine{color, key, &new_world, &new_rank};
  world.arrive(seq, rank, &mine, "split");
  auto posted = world.wait_all_arrived(seq, "split");
  {
    DepartOnThrow reading(world, seq, rank);
    if (rank == 0) build_split_worlds(world, posted);
    reading.release();
  }
  world.depart(seq, rank);
  // Rank 0 writes every member's result before it departs.
  world.wait_all_departed(seq, "split");
  return {std::move(new_world), new_rank};
}

}  // namespace switchyard::inproc
