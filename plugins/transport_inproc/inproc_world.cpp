#include "inproc_world.hpp"

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

}  // namespace switchyard::inproc
