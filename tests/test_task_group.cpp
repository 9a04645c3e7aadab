// SPDX-License-Identifier: BSL-1.0
// Tests for weft::task_group and weft::result_group (weft/task_group.hpp):
// exceptions in every position, cancellation in and out of the group,
// skipped tasks reported at wait(), set_limit / try_go, nesting (tasks that
// spawn into their own group or pool, waiting from inside the only worker),
// destruction during stack unwinding, and result order.
//
// Hand-offs: std::latch, promises and atomics with weft_test::spin_until.
// Nothing sleeps; a deadlock fails through the test's time limit.
//
// How many tasks of one group can run at once matters to tests that make
// tasks meet (a latch that needs k of them running together). A group posts
// at most one runner per worker, so k tasks that must meet before anyone
// calls wait() need k workers (once the test thread is inside wait() it
// helps too). Pools below have k + 1, a spare that costs nothing.
#include <weft/cancel.hpp>
#include <weft/manual_clock.hpp>
#include <weft/registry.hpp>
#include <weft/task_group.hpp>
#include <weft/wait_group.hpp>
#include <weft/worker_pool.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <future>
#include <latch>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include <doctest/doctest.h>

#include "support.hpp"

using namespace std::chrono_literals;

namespace {

using weft_test::gate;
using weft_test::high_water;
using weft_test::spin_until;

// An exception that counts its live copies, so a test can tell that every
// exception a group caught (kept or not) was destroyed.
class counted_error : public std::runtime_error {
 public:
  explicit counted_error(int id) : std::runtime_error("task " + std::to_string(id)), id_(id) { ++live; }
  counted_error(const counted_error& other) : std::runtime_error(other), id_(other.id_) { ++live; }
  counted_error& operator=(const counted_error&) = delete;
  ~counted_error() override { --live; }
  int id() const noexcept { return id_; }

  static inline std::atomic<int> live{0};

 private:
  int id_;
};

// Occupies `count` workers of `pool` with tasks blocked on `g`; returns once
// they all run.
void occupy(weft::worker_pool& pool, std::size_t count, const gate& g) {
  std::latch running{static_cast<std::ptrdiff_t>(count)};
  for (std::size_t i = 0; i < count; ++i) {
    pool.post([&running, f = g.closed] {
      running.count_down();
      f.wait();
    });
  }
  running.wait();
}

// Runs `wait` and returns the id of the counted_error it threw (-1 if it
// threw nothing, -2 for anything else).
template <class Wait>
int thrown_id(Wait&& wait) {
  try {
    wait();
  } catch (const counted_error& e) {
    return e.id();
  } catch (...) {
    return -2;
  }
  return -1;
}

// A result type that counts its live objects.
struct counted_result {
  explicit counted_result(int v) : value(v) { ++live; }
  counted_result(counted_result&& other) noexcept : value(other.value) { ++live; }
  counted_result& operator=(counted_result&&) = delete;
  ~counted_result() { --live; }
  int value;
  static inline std::atomic<int> live{0};
};

std::error_code thrown_code(weft::task_group& group) {
  try {
    group.wait();
  } catch (const std::system_error& e) {
    return e.code();
  } catch (...) {
    return std::make_error_code(std::errc::invalid_argument);  // "something else"
  }
  return {};
}

}  // namespace

// ---------------------------------------------------------------------------
// Joining and exceptions.

TEST_CASE("task_group: wait joins every task and succeeds when none throws" * doctest::timeout(30)) {
  for (const std::size_t workers : {1u, 2u, 3u, 8u}) {
    CAPTURE(workers);
    weft::worker_pool pool{{.workers = workers}};
    weft::task_group group{pool.executor()};
    std::atomic<int> ran{0};
    std::atomic<int> running{0};
    for (int i = 0; i < 200; ++i) {
      group.go([&] {
        running.fetch_add(1);
        ran.fetch_add(1);
        running.fetch_sub(1);
      });
    }
    group.wait();
    CHECK(ran.load() == 200);
    CHECK(running.load() == 0);  // nothing still running after wait()
    CHECK(group.in_flight() == 0);
    CHECK_FALSE(group.token().cancelled());
    // A group may be waited on again, and reused.
    group.wait();
    group.go([&] { ran.fetch_add(1); });
    group.wait();
    CHECK(ran.load() == 201);
  }
}

// A runner that runs out of tasks waits a moment for the next before it
// reports the ones it ran, and only a wait() cuts that short. Here nothing
// joins: the test thread blocks on the group's count itself, as
// async_wait() does, and would wait for good if a report needed a joiner.
TEST_CASE("task_group: runners report every finished task with no wait() under way" *
          doctest::timeout(30)) {
  for (const std::size_t workers : {1u, 2u, 4u}) {
    CAPTURE(workers);
    weft::worker_pool pool{{.workers = workers}};
    weft::task_group group{pool.executor()};
    std::atomic<int> ran{0};
    for (int round = 1; round <= 50; ++round) {
      for (int i = 0; i < 500; ++i) group.go([&] { ran.fetch_add(1, std::memory_order_relaxed); });
      weft::detail::task_group_access::pending(group).wait();
      CHECK(ran.load() == 500 * round);
      CHECK(group.in_flight() == 0);
    }
    group.wait();
  }
}

TEST_CASE("task_group: an exception in any position is rethrown by wait, every time" * doctest::timeout(30)) {
  // Which of 10 tasks throw: the first, one in the middle, the last, all.
  const std::vector<std::vector<int>> throwers{{0}, {5}, {9}, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9}};
  for (const std::size_t workers : {1u, 2u, 4u}) {
    for (const auto& throwing : throwers) {
      CAPTURE(workers);
      CAPTURE(throwing.size());
      CAPTURE(throwing.front());
      {
        weft::worker_pool pool{{.workers = workers}};
        weft::task_group group{pool.executor()};
        for (int i = 0; i < 10; ++i) {
          const bool throws = std::find(throwing.begin(), throwing.end(), i) != throwing.end();
          group.go([i, throws] {
            if (throws) throw counted_error(i);
          });
        }
        const int first = thrown_id([&] { group.wait(); });
        CHECK(std::find(throwing.begin(), throwing.end(), first) != throwing.end());
        CHECK(group.token().cancelled());
        // The group is spent: every wait() rethrows the same exception.
        CHECK(thrown_id([&] { group.wait(); }) == first);
        // ...and a task given to it now is skipped.
        std::atomic<bool> late_ran{false};
        group.go([&] { late_ran = true; });
        CHECK(thrown_id([&] { group.wait(); }) == first);
        CHECK_FALSE(late_ran.load());
      }
      // The group and the pool (whose runners may hold the group's state)
      // are gone: every exception, kept or not, was destroyed.
      CHECK(counted_error::live.load() == 0);
    }
  }
}

TEST_CASE("task_group: the first task's exception is the one kept, later tasks are skipped" *
          doctest::timeout(30)) {
  {
    weft::worker_pool pool{{.workers = 2}};
    weft::task_group group{pool.executor()};
    group.go([] { throw counted_error(0); });
    spin_until([&] { return group.token().cancelled(); });
    std::atomic<int> later_ran{0};
    for (int i = 1; i < 10; ++i) {
      group.go([&later_ran, i] {
        later_ran.fetch_add(1);
        throw counted_error(i);
      });
    }
    CHECK(thrown_id([&] { group.wait(); }) == 0);
    CHECK(later_ran.load() == 0);
    // The token's cause is the exception itself.
    CHECK(thrown_id([&] { group.token().cause().rethrow(); }) == 0);
  }
  CHECK(counted_error::live.load() == 0);
}

TEST_CASE("task_group: many tasks throwing at once: wait rethrows one, the others are destroyed" *
          doctest::timeout(30)) {
  // Three workers: two runners, so the first two tasks run together and
  // throw at the same moment; the test thread helps once in wait().
  constexpr int meeting = 2;
  for (int round = 0; round < 20; ++round) {
    std::atomic<int> thrown{0};
    {
      weft::worker_pool pool{{.workers = 3}};
      weft::task_group group{pool.executor()};
      std::atomic<int> arrived{0};
      for (int i = 0; i < 16; ++i) {
        group.go([&, i] {
          if (arrived.fetch_add(1) < meeting) spin_until([&] { return arrived.load() >= meeting; });
          thrown.fetch_add(1);
          throw counted_error(i);
        });
      }
      const int kept = thrown_id([&] { group.wait(); });
      CHECK(kept >= 0);
      CHECK(kept < 16);
      CHECK(thrown_id([&] { group.wait(); }) == kept);
    }
    CHECK(thrown.load() >= meeting);
    CHECK(counted_error::live.load() == 0);
  }
}

TEST_CASE("task_group: wait returns the root cause, not a sibling's cancellation error (go#27837)" *
          doctest::timeout(30)) {
  // Three workers: two runners, for the sibling and the failing task.
  weft::worker_pool pool{{.workers = 3}};
  weft::task_group group{pool.executor()};
  std::latch sibling_waiting{1};
  group.go([&](const weft::cancel_token& token) {
    sibling_waiting.count_down();
    token.wait();
    // What a cancelled operation typically throws.
    throw std::system_error(std::make_error_code(std::errc::operation_canceled));
  });
  sibling_waiting.wait();
  group.go([] { throw counted_error(42); });
  CHECK(thrown_id([&] { group.wait(); }) == 42);
}

// ---------------------------------------------------------------------------
// Cancellation.

TEST_CASE("task_group: an exception cancels the group's token, so a sibling blocked on it returns" *
          doctest::timeout(30)) {
  // Three workers: two runners, so the thrower runs while the sibling blocks,
  // before the test thread waits.
  weft::worker_pool pool{{.workers = 3}};
  weft::task_group group{pool.executor()};
  std::latch sibling_waiting{1};
  std::promise<int> sibling_saw;
  group.go([&](weft::cancel_token token) {
    sibling_waiting.count_down();
    token.wait();
    sibling_saw.set_value(thrown_id([&] { token.cause().rethrow(); }));
  });
  sibling_waiting.wait();
  group.go([] { throw counted_error(7); });
  // The sibling returns before anyone calls wait(): the cancellation, not
  // the join, released it.
  CHECK(sibling_saw.get_future().get() == 7);
  CHECK(thrown_id([&] { group.wait(); }) == 7);
}

TEST_CASE("task_group: a parent token's cancellation reaches running tasks through their token" *
          doctest::timeout(30)) {
  // Three workers: two runners, for two tasks blocked at once.
  weft::worker_pool pool{{.workers = 3}};
  weft::cancel_source parent;
  weft::task_group group{pool.executor(), parent.token()};
  CHECK(group.token() != parent.token());  // a child, not the parent itself
  std::latch both_waiting{2};
  std::atomic<int> saw_cause{0};
  for (int i = 0; i < 2; ++i) {
    group.go([&](const weft::cancel_token& token) {
      both_waiting.count_down();
      token.wait();
      if (token.cause().code() == std::errc::connection_aborted) saw_cause.fetch_add(1);
    });
  }
  both_waiting.wait();
  parent.cancel(std::make_error_code(std::errc::connection_aborted));
  // Both tasks had started and returned normally: nothing was skipped and
  // nothing failed, so wait() does not throw.
  CHECK_NOTHROW(group.wait());
  CHECK(saw_cause.load() == 2);
  CHECK(group.token().cancelled());
}

TEST_CASE("task_group: cancelling the group does not cancel its parent" * doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 2}};
  weft::cancel_source parent;
  weft::task_group group{pool.executor(), parent.token()};
  group.go([] { throw std::runtime_error("fails"); });
  CHECK_THROWS_AS(group.wait(), std::runtime_error);
  CHECK(group.token().cancelled());
  CHECK_FALSE(parent.cancelled());
}

TEST_CASE("task_group: tasks not started when the group is cancelled are skipped, and wait reports it" *
          doctest::timeout(30)) {
  // Two workers, one of them held by a gate: the group's only runner runs a
  // blocker, so the second task stays queued until after the cancellation.
  enum class how { group_cancel, parent_plain, parent_code, parent_exception, parent_deadline };
  for (const how way : {how::group_cancel, how::parent_plain, how::parent_code, how::parent_exception,
                        how::parent_deadline}) {
    CAPTURE(static_cast<int>(way));
    {
      weft::worker_pool pool{{.workers = 2}};
      gate held;
      occupy(pool, 1, held);
      weft::cancel_source plain;
      auto deadline = weft::with_deadline(weft::cancel_token{}, weft::manual_clock::now() + 1s);
      const weft::cancel_token parent = way == how::parent_deadline ? deadline.token() : plain.token();
      weft::task_group group{pool.executor(), parent};

      std::latch blocker_running{1};
      std::atomic<bool> blocker_returned{false};
      group.go([&](const weft::cancel_token& token) {
        blocker_running.count_down();
        token.wait();
        blocker_returned = true;
      });
      blocker_running.wait();
      std::atomic<int> skipped_ran{0};
      for (int i = 0; i < 3; ++i) group.go([&] { skipped_ran.fetch_add(1); });

      switch (way) {
        case how::group_cancel: group.cancel(); break;
        case how::parent_plain: plain.cancel(); break;
        case how::parent_code: plain.cancel(std::make_error_code(std::errc::timed_out)); break;
        case how::parent_exception: plain.cancel(std::make_exception_ptr(counted_error(99))); break;
        case how::parent_deadline: weft::manual_clock::advance(1s); break;
      }

      switch (way) {
        case how::group_cancel:
        case how::parent_plain: CHECK(thrown_code(group) == weft::errc::cancelled); break;
        case how::parent_code: CHECK(thrown_code(group) == std::errc::timed_out); break;
        case how::parent_exception: CHECK(thrown_id([&] { group.wait(); }) == 99); break;
        case how::parent_deadline: CHECK(thrown_code(group) == weft::errc::deadline_exceeded); break;
      }
      CHECK(blocker_returned.load());
      CHECK(skipped_ran.load() == 0);
      held.open();
    }
    CHECK(counted_error::live.load() == 0);
  }
}

TEST_CASE("task_group: a group whose parent is already cancelled starts nothing and says so" *
          doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 2}};
  weft::cancel_source parent;
  parent.cancel();
  weft::task_group group{pool.executor(), parent.token()};
  std::atomic<int> ran{0};
  for (int i = 0; i < 20; ++i) group.go([&] { ran.fetch_add(1); });
  CHECK(thrown_code(group) == weft::errc::cancelled);
  CHECK(ran.load() == 0);
}

// ---------------------------------------------------------------------------
// Limits.

// set_limit() is allowed once no task is in flight, and a caller may see
// that by polling in_flight() instead of calling wait(). The runner that
// finished the last task released the old limit's semaphore before it
// counted the task off; set_limit() frees that semaphore, so its read of
// the count must come after the release (ThreadSanitizer reported the free
// racing the release while the count was read relaxed).
TEST_CASE(
    "task_group: set_limit once in_flight() reads zero, without wait(), comes after the old "
    "limit's last use" *
    doctest::timeout(60)) {
  weft::worker_pool pool{{.workers = 2}};
  for (int round = 0; round < 100; ++round) {
    CAPTURE(round);
    weft::task_group group{pool.executor()};
    group.set_limit(1 + round % 3);
    std::atomic<int> ran{0};
    for (int i = 0; i < 4; ++i) group.go([&ran] { ran.fetch_add(1); });
    spin_until([&] { return group.in_flight() == 0; });
    CHECK(ran.load() == 4);
    group.set_limit(2);
    group.go([&ran] { ran.fetch_add(1); });
    group.wait();
    CHECK(ran.load() == 5);
  }
}

TEST_CASE("task_group: set_limit is never exceeded and is reached, try_go declines when full" *
          doctest::timeout(60)) {
  for (const std::ptrdiff_t limit : {1, 2, 3}) {
    CAPTURE(limit);
    // limit + 3 workers: more runners than the limit, so the limit, not the
    // pool, is what keeps tasks out.
    weft::worker_pool pool{{.workers = static_cast<std::size_t>(limit) + 3}};
    weft::task_group group{pool.executor()};
    CHECK_THROWS_AS(group.set_limit(0), std::invalid_argument);
    CHECK_THROWS_AS(group.set_limit(-1), std::invalid_argument);
    group.set_limit(limit);

    high_water tracker;
    gate held;
    std::latch all_in{limit};
    // The first `limit` tasks meet and hold their slots.
    for (std::ptrdiff_t i = 0; i < limit; ++i) {
      group.go([&tracker, &all_in, f = held.closed] {
        tracker.enter();
        all_in.count_down();
        f.wait();
        tracker.leave();
      });
    }
    all_in.wait();
    CHECK(tracker.now.load() == limit);
    std::atomic<bool> declined_ran{false};
    CHECK_FALSE(group.try_go([&] { declined_ran = true; }));
    CHECK(group.in_flight() == limit);
    CHECK_THROWS_AS(group.set_limit(limit + 1), std::logic_error);

    // A producer blocked in go() on the full group: it gets in once a slot
    // is freed.
    std::atomic<bool> producer_done{false};
    std::thread producer([&] {
      group.go([&] {
        tracker.enter();
        tracker.leave();
      });
      producer_done = true;
    });
    held.open();
    producer.join();
    CHECK(producer_done.load());

    // Many short tasks that stay a while in flight (yielding, not sleeping).
    for (int i = 0; i < 200; ++i) {
      group.go([&] {
        tracker.enter();
        for (int y = 0; y < 20; ++y) std::this_thread::yield();
        tracker.leave();
      });
    }
    group.wait();
    CHECK(tracker.most.load() == limit);
    CHECK_FALSE(declined_ran.load());

    // No task in flight: the limit may change, and try_go takes a free slot.
    group.set_limit(limit + 1);
    std::atomic<bool> accepted_ran{false};
    CHECK(group.try_go([&] { accepted_ran = true; }));
    group.wait();
    CHECK(accepted_ran.load());
  }
}

TEST_CASE("task_group: without a limit try_go always accepts" * doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 2}};
  weft::task_group group{pool.executor()};
  std::atomic<int> ran{0};
  for (int i = 0; i < 100; ++i) CHECK(group.try_go([&] { ran.fetch_add(1); }));
  group.wait();
  CHECK(ran.load() == 100);
}

// Called on a worker, a null function pointer ended the process there.
TEST_CASE("task_group and result_group refuse a null function pointer with invalid_argument" *
          doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 1}};
  weft::task_group group{pool.executor()};
  void (*no_function)() = nullptr;
  CHECK_THROWS_AS(group.go(no_function), std::invalid_argument);
  CHECK_THROWS_AS((void)group.try_go(no_function), std::invalid_argument);
  group.set_limit(1);
  CHECK_THROWS_AS(group.go(no_function), std::invalid_argument);
  CHECK(group.in_flight() == 0);
  group.wait();
  weft::result_group<int> results{pool.executor()};
  int (*no_result)() = nullptr;
  CHECK_THROWS_AS(results.go(no_result), std::invalid_argument);
  CHECK_THROWS_AS((void)results.try_go(no_result), std::invalid_argument);
  results.go(+[] { return 3; });
  CHECK(results.wait() == std::vector<int>{3});
}

TEST_CASE("task_group: a failing task frees its slot under a limit (no lost permit)" * doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 2}};
  weft::task_group group{pool.executor()};
  group.set_limit(1);
  group.go([] { throw std::runtime_error("first"); });
  // Tasks after the failure are skipped; each still gives its slot back, or
  // the second go() here would wait forever.
  for (int i = 0; i < 5; ++i) group.go([] {});
  CHECK_THROWS_AS(group.wait(), std::runtime_error);
  CHECK(group.in_flight() == 0);
}

TEST_CASE("task_group: a go() past the count of tasks in flight throws and frees its slot" *
          doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 1}};
  weft::task_group group{pool.executor()};
  group.set_limit(1);
  // No group holds 2^32 - 1 tasks; stand in for them on the count itself.
  auto& pending = weft::detail::task_group_access::pending(group);
  constexpr std::int64_t max_in_flight = 0xFFFF'FFFF;
  pending.add(max_in_flight);
  CHECK_THROWS_AS(group.go([] {}), std::overflow_error);
  pending.add(-max_in_flight);
  CHECK(group.in_flight() == 0);
  // The failed go() gave its slot back, or this one would find none.
  std::atomic<bool> ran{false};
  CHECK(group.try_go([&] { ran = true; }));
  group.wait();
  CHECK(ran.load());
}

namespace {
// Holds a go() between taking its slot and pushing its task: the first move
// of a held_capture, once armed, counts `paused` down and waits for `resume`.
struct push_hold {
  std::atomic<bool> armed{false};
  std::latch paused{1};
  std::latch resume{1};
};

struct held_capture {
  explicit held_capture(push_hold& h) noexcept : hold(&h) {}
  held_capture(held_capture&& other) noexcept : hold(other.hold) {
    if (hold->armed.exchange(false)) {
      hold->paused.count_down();
      hold->resume.wait();
    }
  }
  held_capture& operator=(held_capture&&) = delete;
  push_hold* hold;
};
}  // namespace

// One worker, limit 2. Task A, on the worker, calls go(C) while another
// thread's go(B) holds the second slot and has not pushed B yet: A finds
// nothing to run, and sleeps. B's push must wake it to run B, whose slot it
// then takes. A slept on: with the pool's only worker inside A, nobody ran
// B until a wait() came to help (and an async_wait never does).
TEST_CASE("task_group: a go() waiting for a slot wakes to run a task pushed while it slept" *
          doctest::timeout(60)) {
  weft::worker_pool pool{{.workers = 1}};
  weft::task_group group{pool.executor()};
  group.set_limit(2);
  push_hold hold;
  std::latch c_ran{1};
  group.go([&] {
    hold.paused.wait();
    group.go([&] { c_ran.count_down(); });
  });
  hold.armed = true;
  std::thread spawner([&] { group.go([capture = held_capture{hold}] { (void)capture; }); });
  // A is in go(C), asleep, once the registry lists it as blocked.
  spin_until([] {
    for (const auto& task : weft::registry::snapshot()) {
      if (task.state == weft::task_state::blocked) return true;
    }
    return false;
  });
  hold.resume.count_down();
  spawner.join();
  c_ran.wait();
  group.wait();
}

// ---------------------------------------------------------------------------
// Nesting.

TEST_CASE("task_group: tasks spawning tasks into their own group, wait racing those go calls" *
          doctest::timeout(60)) {
  const int rounds = weft_test::under_sanitizer ? 10 : 40;
  for (const std::size_t workers : {1u, 2u, 4u}) {
    CAPTURE(workers);
    weft::worker_pool pool{{.workers = workers}};
    for (int round = 0; round < rounds; ++round) {
      weft::task_group group{pool.executor()};
      std::atomic<int> ran{0};
      std::atomic<int> running{0};
      // A tree, three levels of three below the root: 1 + 3 + 9 + 27 tasks.
      std::function<void(int)> node = [&](int depth) {
        running.fetch_add(1);
        ran.fetch_add(1);
        if (depth < 3) {
          for (int i = 0; i < 3; ++i) group.go([&node, depth] { node(depth + 1); });
        }
        running.fetch_sub(1);
      };
      group.go([&] { node(0); });
      group.wait();  // called at once, racing the go() calls of the tree
      CHECK(ran.load() == 40);
      CHECK(running.load() == 0);
    }
  }
}

TEST_CASE("task_group: a chain where each task spawns the next never lets wait return early "
          "(neilotoole/errgroup#6)" *
          doctest::timeout(60)) {
  weft::worker_pool pool{{.workers = 2}};
  for (int round = 0; round < 20; ++round) {
    weft::task_group group{pool.executor()};
    constexpr int length = 300;
    std::atomic<int> links{0};
    std::function<void()> link = [&] {
      // The spawn comes last, when the task is about to finish: the count
      // must never touch zero between this task and the next.
      if (links.fetch_add(1) + 1 < length) group.go(link);
    };
    group.go(link);
    group.wait();
    CHECK(links.load() == length);
  }
}

TEST_CASE("task_group: tasks that post into their own small pool do not deadlock it" * doctest::timeout(60)) {
  // A queue of 2 fills at once; a worker that posts into its own full
  // queue runs the task itself.
  weft::worker_pool pool{{.workers = 2, .queue_capacity = 2}};
  weft::task_group group{pool.executor()};
  weft::wait_group posted;
  std::atomic<int> ran{0};
  gate all_spawned;  // keeps the pool's queue free while go() posts runners
  for (int i = 0; i < 8; ++i) {
    group.go([&, f = all_spawned.closed] {
      f.wait();
      for (int j = 0; j < 16; ++j) {
        posted.add(1);
        pool.post([&] {
          ran.fetch_add(1);
          posted.done();
        });
      }
    });
  }
  all_spawned.open();
  group.wait();
  posted.wait();
  CHECK(ran.load() == 8 * 16);
}

TEST_CASE("task_group: waiting from inside the only worker runs the group's own tasks (no deadlock)" *
          doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 1}};
  auto outcome = pool.submit([&] {
    const auto worker = std::this_thread::get_id();
    weft::task_group inner{pool.executor()};
    std::atomic<int> on_this_worker{0};
    for (int i = 0; i < 10; ++i) {
      inner.go([&] {
        if (std::this_thread::get_id() == worker) on_this_worker.fetch_add(1);
      });
    }
    inner.wait();  // the only worker is busy here: it must run them itself
    return on_this_worker.load();
  });
  CHECK(outcome.get() == 10);
}

TEST_CASE("task_group: a task's wait() on its own group throws std::logic_error, on another works" *
          doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 2}};
  weft::task_group group{pool.executor()};
  std::string message;
  std::atomic<int> nested_ran{0};
  group.go([&] {
    try {
      group.wait();
    } catch (const std::logic_error& error) {
      message = error.what();
    }
    weft::task_group nested{pool.executor()};
    nested.go([&] { nested_ran.fetch_add(1); });
    nested.wait();  // another group's wait, from inside this one's task
  });
  group.wait();
  CHECK(message.find("own tasks") != std::string::npos);
  CHECK(nested_ran.load() == 1);
  group.go([] {});
  CHECK_NOTHROW(group.wait());  // the thread that made it may wait again
}

TEST_CASE("task_group: a helping wait runs only its own group's tasks (TileDB#1994)" * doctest::timeout(30)) {
  // One worker: the outer group's runner. Task A waits on a nested group
  // there; task B of the outer group is queued behind A. If A's wait ran B,
  // B would find A unfinished.
  weft::worker_pool pool{{.workers = 1}};
  weft::task_group outer{pool.executor()};
  std::atomic<bool> a_finished{false};
  std::promise<void> a_done;
  std::atomic<int> nested_ran{0};
  std::atomic<int> b_saw_a_finished{-1};
  outer.go([&] {
    weft::task_group nested{pool.executor()};
    for (int i = 0; i < 5; ++i) nested.go([&] { nested_ran.fetch_add(1); });
    nested.wait();
    a_finished = true;
    a_done.set_value();
  });
  outer.go([&] { b_saw_a_finished = a_finished.load() ? 1 : 0; });
  // The test thread stays out of the outer group until A is done, so that
  // only the worker (in A's nested wait) could run B early.
  a_done.get_future().wait();
  outer.wait();
  CHECK(nested_ran.load() == 5);
  CHECK(b_saw_a_finished.load() == 1);
}

TEST_CASE("task_group: groups nested in tasks of a one-worker pool, three deep, all complete" *
          doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 1}};
  std::atomic<int> leaves{0};
  std::function<void(int)> level = [&](int depth) {
    if (depth == 3) {
      leaves.fetch_add(1);
      return;
    }
    weft::task_group group{pool.executor()};
    for (int i = 0; i < 3; ++i) group.go([&level, depth] { level(depth + 1); });
    group.wait();
  };
  weft::task_group top{pool.executor()};
  top.go([&] { level(0); });
  top.wait();
  CHECK(leaves.load() == 27);
}

// stdexec#1909: stopping a scope from nested work that a helping wait runs inline. The nested wait
// must skip the rest and report it (not run it, not skip it silently, not hang), and the outer wait
// must see it.
TEST_CASE(
    "task_group: a nested group's wait on the only worker stops its tasks when the outer group is "
    "cancelled or one throws" *
    doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 1}};
  std::latch a_running{1};
  std::thread::id a_thread;
  std::thread::id b_thread;
  std::atomic<bool> c_ran{false};
  std::exception_ptr inner_threw;
  weft::task_group outer{pool.executor()};
  // A keeps what its nested wait threw for the test thread to check, and rethrows it so that the
  // outer wait shows whether the failure got out.
  const auto start_a = [&](std::function<void()> b) {
    outer.go([&, b] {
      a_running.count_down();
      a_thread = std::this_thread::get_id();
      weft::task_group inner{pool.executor(), outer.token()};
      inner.go([&] {
        b_thread = std::this_thread::get_id();
        b();
      });
      inner.go([&] { c_ran = true; });
      try {
        inner.wait();
      } catch (...) {
        inner_threw = std::current_exception();
        throw;
      }
    });
    // The test thread stays out of the outer group until A runs: A then holds the only worker, so
    // nobody but A's wait runs B and C, one after the other.
    REQUIRE(weft_test::eventually([&] { return a_running.try_wait(); }));
  };

  SUBCASE("B cancels the outer group") {
    start_a([&] { outer.cancel(); });
    CHECK(thrown_code(outer) == weft::errc::cancelled);
    REQUIRE(inner_threw != nullptr);
    std::error_code inner_code;
    try {
      std::rethrow_exception(inner_threw);
    } catch (const std::system_error& e) {
      inner_code = e.code();
    } catch (...) {
    }
    CHECK(inner_code == weft::errc::cancelled);
  }
  SUBCASE("B throws") {
    start_a([] { throw std::runtime_error("nested failure"); });
    CHECK_THROWS_WITH_AS(outer.wait(), "nested failure", std::runtime_error);
    REQUIRE(inner_threw != nullptr);
    CHECK_THROWS_WITH_AS(std::rethrow_exception(inner_threw), "nested failure", std::runtime_error);
  }
  CHECK(b_thread == a_thread);
  CHECK_FALSE(c_ran.load());
}

// ---------------------------------------------------------------------------
// Destruction.

TEST_CASE("task_group: destroyed during unwinding, it cancels its token, skips the unstarted, and joins" *
          doctest::timeout(30)) {
  // Two workers, one held: the group's runner runs the blocker; the second
  // task stays queued until the destructor has cancelled the token.
  weft::worker_pool pool{{.workers = 2}};
  gate held;
  occupy(pool, 1, held);
  std::atomic<bool> blocker_finished{false};
  std::atomic<bool> queued_ran{false};
  weft::cancel_token seen_token;
  bool caught = false;
  try {
    weft::task_group group{pool.executor()};
    seen_token = group.token();
    std::latch started{1};
    group.go([&](const weft::cancel_token& token) {
      started.count_down();
      token.wait();
      // Something slow after the wake-up: the destructor still waits.
      for (int i = 0; i < 100; ++i) std::this_thread::yield();
      blocker_finished = true;
    });
    started.wait();
    group.go([&] { queued_ran = true; });
    throw std::runtime_error("unwinding");
  } catch (const std::runtime_error& e) {
    caught = std::string(e.what()) == "unwinding";
    // No task outlived the group.
    CHECK(blocker_finished.load());
  }
  CHECK(caught);
  CHECK(seen_token.cancelled());
  CHECK(seen_token.cause().code() == weft::errc::cancelled);
  CHECK_FALSE(queued_ran.load());
  held.open();
}

TEST_CASE("task_group: destroyed without wait, it joins, destroyed after wait, it cancels nothing" *
          doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 2}};
  std::atomic<int> finished{0};
  weft::cancel_token after_wait;
  {
    weft::task_group group{pool.executor()};
    after_wait = group.token();
    group.go([&] { finished.fetch_add(1); });
    group.wait();
  }
  CHECK_FALSE(after_wait.cancelled());
  CHECK(finished.load() == 1);

  weft::cancel_token without_wait;
  {
    weft::task_group group{pool.executor()};
    without_wait = group.token();
    std::latch started{1};
    group.go([&](const weft::cancel_token& token) {
      started.count_down();
      token.wait();
      finished.fetch_add(1);
    });
    started.wait();
  }
  CHECK(without_wait.cancelled());
  CHECK(finished.load() == 2);
}

// tf#479: a task's exception that no wait() delivered must be written out when the group is
// destroyed, not lost silently.
TEST_CASE(
    "task_group: a task's exception that no wait delivered is written to stderr when the group is "
    "destroyed" *
    doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 1}};
  std::optional<weft::task_group> group{std::in_place, pool.executor()};
  const weft::cancel_token group_token = group->token();
  group->go([] { throw std::runtime_error("x"); });
  // The failure cancels the token. Destroyed before that, the group would cancel the task itself.
  REQUIRE(weft_test::eventually([&] { return group_token.cancelled(); }));
  weft_test::stderr_capture captured;
  group.reset();
  CHECK(captured.text() ==
        "weft::task_group: destroyed without wait(); a task's exception was lost: x\n");
}

TEST_CASE("task_group: go on a shut-down pool throws weft::rejected and leaves the group clean" *
          doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 1}};
  weft::task_group group{pool.executor()};
  pool.shutdown();
  pool.join();
  std::atomic<bool> ran{false};
  CHECK_THROWS_AS(group.go([&] { ran = true; }), weft::rejected);
  CHECK_FALSE(ran.load());
  CHECK(group.in_flight() == 0);
  CHECK_NOTHROW(group.wait());
}

// ---------------------------------------------------------------------------
// result_group.

TEST_CASE("result_group: results come back in spawn order although tasks finish in reverse" *
          doctest::timeout(30)) {
  // Task i finishes only after task i + 1 has: four tasks blocked at once
  // need three runners and the helping test thread, so four workers.
  constexpr int count = 4;
  weft::worker_pool pool{{.workers = 4}};
  weft::result_group<std::unique_ptr<int>> group{pool.executor()};
  std::vector<std::promise<void>> finished(count);
  std::vector<std::shared_future<void>> finished_future;
  for (auto& p : finished) finished_future.push_back(p.get_future().share());
  std::mutex order_mutex;
  std::vector<int> finish_order;
  for (int i = 0; i < count; ++i) {
    group.go([&, i] {
      if (i + 1 < count) finished_future[static_cast<std::size_t>(i + 1)].wait();
      {
        std::lock_guard lock(order_mutex);
        finish_order.push_back(i);
      }
      finished[static_cast<std::size_t>(i)].set_value();
      return std::make_unique<int>(i * 10);  // move-only
    });
  }
  std::vector<std::unique_ptr<int>> results = group.wait();
  CHECK(finish_order == std::vector<int>{3, 2, 1, 0});
  REQUIRE(results.size() == count);
  for (int i = 0; i < count; ++i) {
    REQUIRE(results[static_cast<std::size_t>(i)] != nullptr);
    CHECK(*results[static_cast<std::size_t>(i)] == i * 10);
  }
}

TEST_CASE("result_group: many results in spawn order, tasks may take the token, the group is reusable" *
          doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 3}};
  weft::result_group<std::string> group{pool.executor()};
  for (int i = 0; i < 300; ++i) {
    if (i % 2 == 0) {
      group.go([i] { return std::to_string(i); });
    } else {
      group.go([i](const weft::cancel_token& token) { return token.cancelled() ? "x" : std::to_string(i); });
    }
  }
  auto results = group.wait();
  REQUIRE(results.size() == 300);
  for (int i = 0; i < 300; ++i) CHECK(results[static_cast<std::size_t>(i)] == std::to_string(i));
  // A second round starts from an empty list.
  group.go([] { return std::string("again"); });
  CHECK(group.wait() == std::vector<std::string>{"again"});
  CHECK(group.wait().empty());
}

TEST_CASE("result_group: a task declined by try_go leaves no hole in the results" * doctest::timeout(30)) {
  // Three workers: two runners, so the held task runs before wait().
  weft::worker_pool pool{{.workers = 3}};
  weft::result_group<int> group{pool.executor()};
  group.set_limit(1);
  gate held;
  std::latch running{1};
  group.go([&running, f = held.closed] {
    running.count_down();
    f.wait();
    return 1;
  });
  running.wait();
  CHECK_FALSE(group.try_go([] { return 2; }));
  held.open();
  group.go([] { return 3; });
  CHECK(group.wait() == std::vector<int>{1, 3});
}

TEST_CASE("result_group: an exception is rethrown and every result is still destroyed" * doctest::timeout(30)) {
  {
    weft::worker_pool pool{{.workers = 2}};
    weft::result_group<counted_result> group{pool.executor()};
    for (int i = 0; i < 20; ++i) {
      group.go([i] {
        if (i == 10) throw counted_error(i);
        return counted_result(i);
      });
    }
    CHECK(thrown_id([&] { group.wait(); }) == 10);
  }
  CHECK(counted_result::live.load() == 0);
  CHECK(counted_error::live.load() == 0);
}

namespace {

// A task whose copy throws.
struct copy_throws {
  copy_throws() = default;
  copy_throws(const copy_throws&) { throw std::runtime_error("copy failed"); }
  copy_throws& operator=(const copy_throws&) = delete;
  int operator()() const { return 1; }
};

// A result whose move throws when `fail` is set; counts the moves that did not.
struct move_throws {
  int value;
  static inline std::atomic<bool> fail{false};
  static inline std::atomic<int> moved{0};
  explicit move_throws(int v) : value(v) {}
  move_throws(move_throws&& other) : value(other.value) {
    if (fail) throw std::runtime_error("move failed");
    ++moved;
  }
  move_throws& operator=(move_throws&&) = delete;
};

}  // namespace

TEST_CASE("result_group: a go() or try_go() that throws leaves no slot behind" *
          doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 2}};
  weft::result_group<int> group{pool.executor()};
  group.go([] { return 1; });
  const copy_throws throwing;
  CHECK_THROWS_WITH_AS(group.go(throwing), "copy failed", std::runtime_error);
  CHECK_THROWS_WITH_AS((void)group.try_go(throwing), "copy failed", std::runtime_error);
  group.go([] { return 2; });
  CHECK(group.wait() == std::vector<int>{1, 2});
  pool.shutdown();
  CHECK_THROWS_AS((void)group.try_go([] { return 3; }), weft::rejected);
  CHECK(group.wait().empty());
}

TEST_CASE("result_group: wait() from one of its own tasks throws and leaves the results alone" *
          doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 2}};
  weft::result_group<int> group{pool.executor()};
  std::atomic<bool> threw{false};
  for (int i = 0; i < 8; ++i) {
    group.go([&, i] {
      if (i == 0) {
        try {
          (void)group.wait();
        } catch (const std::logic_error&) {
          threw = true;
        }
      }
      return i;
    });
  }
  CHECK(group.wait() == std::vector<int>{0, 1, 2, 3, 4, 5, 6, 7});
  CHECK(threw.load());
}

TEST_CASE("result_group: a result whose move throws leaves nothing for the next wait()" *
          doctest::timeout(30)) {
  weft::worker_pool pool{{.workers = 2}};
  weft::result_group<move_throws> group{pool.executor()};
  for (int i = 0; i < 3; ++i) group.go([i] { return move_throws{i}; });
  // Once each task has moved its result into its slot.
  weft_test::spin_until([] { return move_throws::moved.load() == 3; });
  move_throws::fail = true;
  CHECK_THROWS_WITH_AS((void)group.wait(), "move failed", std::runtime_error);
  move_throws::fail = false;
  group.go([] { return move_throws{10}; });
  const auto results = group.wait();
  REQUIRE(results.size() == 1);
  CHECK(results[0].value == 10);
}

// The waiting thread, asleep on the group's count, used to sleep through a
// task that a running task added, leaving it to a runner that no worker was
// free to run: the task that added it and waited for it waited for good.
TEST_CASE("task_group: a sleeping wait() wakes to run a task that a running task adds" *
          doctest::timeout(30)) {
  // Two workers: one runs the waiting task, one the task that adds another.
  weft::worker_pool pool{{.workers = 2}};
  auto outcome = pool.submit([&] {
    weft::task_group group{pool.executor()};
    std::latch started{1};
    std::latch added_ran{1};
    group.go([&] {
      started.count_down();
      // Once the waiter sleeps on the count.
      weft_test::spin_until(
          [&] { return weft::detail::task_group_access::pending(group).stats().waiters == 1; });
      group.go([&] { added_ran.count_down(); });
      added_ran.wait();
    });
    started.wait();  // on the other worker, not run by the wait below
    group.wait();
  });
  CHECK_NOTHROW(outcome.get());
}

TEST_CASE("task_group: wait() from a nested group's task on the same thread throws logic_error" *
          doctest::timeout(30)) {
  // One worker, running the outer task: the inner task can only be run by
  // the inner wait(), on that worker.
  weft::worker_pool pool{{.workers = 1}};
  weft::task_group outer{pool.executor()};
  std::atomic<bool> threw{false};
  std::latch started{1};
  outer.go([&] {
    started.count_down();
    weft::task_group inner{pool.executor()};
    inner.go([&] {
      try {
        outer.wait();
      } catch (const std::logic_error&) {
        threw = true;
      }
    });
    inner.wait();
  });
  started.wait();  // on the worker, not run by the wait below
  outer.wait();
  CHECK(threw.load());
}

// On another worker than the task it is nested in, a nested group's task
// that waited on the outer group deadlocked: that thread knew only the
// nested group.
TEST_CASE("task_group: wait() from a nested group's task on another worker throws logic_error" *
          doctest::timeout(30)) {
  // Depth 1: the outer task on one worker, its group's task on the other.
  // Depth 2: a group made in that task, whose task runs on a third worker.
  for (const int depth : {1, 2}) {
    CAPTURE(depth);
    weft::worker_pool pool{{.workers = static_cast<std::size_t>(depth) + 1}};
    weft::task_group outer{pool.executor()};
    std::atomic<bool> threw{false};
    std::function<void(int)> nest = [&](int level) {
      if (level == depth) {
        try {
          outer.wait();
        } catch (const std::logic_error&) {
          threw = true;
        }
        return;
      }
      weft::task_group inner{pool.executor()};
      std::latch started{1};
      inner.go([&] {
        started.count_down();
        nest(level + 1);
      });
      started.wait();  // so a free worker runs it, not the wait below
      inner.wait();
    };
    std::latch started{1};
    outer.go([&] {
      started.count_down();
      nest(0);
    });
    started.wait();  // on a worker, not run by the wait below
    outer.wait();
    CHECK(threw.load());
  }
}

// Two tasks fail at once: the token's cause is the exception wait()
// rethrows, whichever failure comes first. The second failure used to
// cancel the token first at times (a third of the rounds on 2 cores).
TEST_CASE(
    "task_group: the token's cause is the exception wait() rethrows when tasks fail together" *
    doctest::timeout(60)) {
  weft::worker_pool pool{{.workers = 2}};
  for (int round = 0; round < 2000; ++round) {
    weft::task_group group{pool.executor()};
    // A spinning rendezvous, so that the two throw at the same moment (a
    // latch parks the first to arrive).
    std::atomic<int> arrived{0};
    for (int id = 0; id < 2; ++id) {
      group.go([&arrived, id] {
        arrived.fetch_add(1);
        while (arrived.load() < 2) {
        }
        throw counted_error(id);
      });
    }
    std::exception_ptr rethrown;
    try {
      group.wait();
    } catch (...) {
      rethrown = std::current_exception();
    }
    REQUIRE(rethrown != nullptr);
    CHECK(group.token().cause().exception() == rethrown);
  }
}
