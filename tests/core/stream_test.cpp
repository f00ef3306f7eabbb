// Host streams: inline and queued execution, ordering, errors at synchronize, events.
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include "switchyard/status.hpp"
#include "switchyard/stream.hpp"

using namespace switchyard;

namespace {

struct Gate {
  std::atomic<bool> open{false};
  static void wait(void* self) {
    auto* g = static_cast<Gate*>(self);
    while (!g->open.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
};

struct Log {
  std::vector<int> order;
  int next = 0;
  static void append(void* self) {
    auto* l = static_cast<Log*>(self);
    l->order.push_back(l->next++);
  }
};

void fail_task(void*) { throw Error(ErrorCode::kTimeout, "task timed out"); }

}  // namespace

TEST_CASE("an inline stream runs each task at once and throws to the caller") {
  HostStream stream;
  Log log;
  stream.enqueue(&Log::append, &log);
  CHECK(log.order.size() == 1);
  CHECK(stream.idle());
  CHECK_THROWS_WITH_AS(stream.enqueue(&fail_task, nullptr), "timeout: task timed out", Error);
  auto event = stream.create_event();
  stream.record(*event);
  CHECK(event->query());
}

TEST_CASE("a queued stream returns before the work is done and runs tasks in order") {
  HostStream stream(HostStream::Mode::kQueued);
  Gate gate;
  Log log;
  auto before = stream.create_event();
  auto after = stream.create_event();
  stream.enqueue(&Log::append, &log);
  stream.record(*before);
  stream.enqueue(&Gate::wait, &gate);
  for (int i = 0; i < 20; ++i) stream.enqueue(&Log::append, &log);  // grows the ring
  stream.record(*after);
  before->synchronize();  // the first task only
  CHECK(before->query());
  CHECK_FALSE(after->query());
  CHECK_FALSE(stream.idle());
  gate.open = true;
  stream.synchronize();
  CHECK(after->query());
  REQUIRE(log.order.size() == 21);
  for (int i = 0; i < 21; ++i) CHECK(log.order[static_cast<std::size_t>(i)] == i);
}

TEST_CASE("a queued task's error comes out of synchronize once; later tasks are skipped") {
  HostStream stream(HostStream::Mode::kQueued);
  Log log;
  stream.enqueue(&fail_task, nullptr);
  stream.enqueue(&Log::append, &log);
  CHECK_THROWS_WITH_AS(stream.synchronize(), "timeout: task timed out", Error);
  CHECK(log.order.empty());
  stream.enqueue(&Log::append, &log);  // usable again
  stream.synchronize();
  CHECK(log.order.size() == 1);
}

TEST_CASE("an event of one stream cannot be recorded on another") {
  HostStream a, b;
  auto event = a.create_event();
  CHECK_THROWS_AS(b.record(*event), Error);
}
