// SPDX-License-Identifier: BSL-1.0
// Tests for weft/wait_group.hpp: Go's sync.WaitGroup.
//
// Nothing here sleeps: threads meet on latches, barriers and atomics, time is
// a weft::manual_clock (process-wide, so deadlines are computed from its
// now()), and "this thread is waiting now" is read from stats().waiters or
// manual_clock::pending_timers().
#include <weft/cancel.hpp>
#include <weft/manual_clock.hpp>
#include <weft/wait_group.hpp>
#include <weft/wait_status.hpp>

#include <doctest/doctest.h>

#include "support.hpp"

#include <atomic>
#include <barrier>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <latch>
#include <limits>
#include <ostream>  // doctest prints std::error_code through operator<<
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <type_traits>
#include <vector>

using namespace std::chrono_literals;
using weft::manual_clock;
using weft::wait_status;

namespace {

using weft_test::fixed_thread_counts;
using weft_test::spin_until;
using weft_test::under_sanitizer;

template <class Group>
void wait_for_waiters(const Group& group, std::size_t count) {
  spin_until([&] { return group.stats().waiters == count; });
}

}  // namespace

TEST_CASE("a new wait_group has a zero count and wait returns at once" * doctest::timeout(30)) {
  weft::wait_group group;
  CHECK(group.count() == 0);
  CHECK(group.stats().count == 0);
  CHECK(group.stats().waiters == 0);
  group.wait();
  CHECK(group.wait(weft::cancel_token{}) == wait_status::ok);
  CHECK(group.wait_for(0s) == wait_status::ok);
  CHECK(group.wait_until(std::chrono::steady_clock::now() - 1s) == wait_status::ok);
}

TEST_CASE("wait on a zero count returns ok even with a cancelled token or a past deadline" *
          doctest::timeout(30)) {
  weft::basic_wait_group<manual_clock> group;
  weft::cancel_source source;
  source.cancel();
  CHECK(group.wait(source.token()) == wait_status::ok);
  CHECK(group.wait_for(-1s) == wait_status::ok);
  CHECK(group.wait_until(manual_clock::now() - 1s) == wait_status::ok);
  group.add(1);
  group.done();
  CHECK(group.wait(source.token()) == wait_status::ok);
}

// A deadline in seconds, compared with the clock's nanoseconds, overflowed
// into the past: the wait timed out at once.
TEST_CASE("wait_until far off in a coarse unit waits for done" * doctest::timeout(30)) {
  weft::wait_group group;
  group.add(1);
  const auto far = weft_test::thousand_years_on_in_seconds<std::chrono::steady_clock>();
  const auto status =
      weft_test::wait_on_thread([&] { return group.wait_until(far); },
                                [&] { return group.stats().waiters == 1; }, [&] { group.done(); });
  CHECK(status == weft::wait_status::ok);
}

TEST_CASE("add and done move the count" * doctest::timeout(30)) {
  weft::wait_group group;
  group.add(3);
  CHECK(group.count() == 3);
  group.add();  // default 1
  CHECK(group.count() == 4);
  group.done();
  group.add(-2);
  CHECK(group.count() == 1);
  group.add(0);
  CHECK(group.count() == 1);
  group.done();
  CHECK(group.count() == 0);
  group.wait();
}

TEST_CASE("wait returns once every task has called done" * doctest::timeout(60)) {
  for (const int tasks : fixed_thread_counts) {
    CAPTURE(tasks);
    weft::wait_group group;
    std::atomic<int> finished{0};
    std::vector<std::thread> workers;
    group.add(tasks);
    for (int i = 0; i < tasks; ++i) {
      workers.emplace_back([&] {
        finished.fetch_add(1);
        group.done();
      });
    }
    group.wait();
    CHECK(finished.load() == tasks);
    CHECK(group.count() == 0);
    for (auto& w : workers) w.join();
  }
}

TEST_CASE("a waiter blocks while the count is above zero" * doctest::timeout(30)) {
  weft::wait_group group;
  group.add(2);
  std::atomic<bool> returned{false};
  std::thread waiter([&] {
    group.wait();
    returned.store(true);
  });
  wait_for_waiters(group, 1);
  group.done();
  CHECK(group.count() == 1);
  // One done() is not enough: the waiter stays queued. (It was queued, and
  // only a zero count removes a waiter that has no token or deadline.)
  CHECK(group.stats().waiters == 1);
  CHECK_FALSE(returned.load());
  group.done();
  waiter.join();
  CHECK(returned.load());
  CHECK(group.stats().waiters == 0);
}

TEST_CASE("done below zero throws std::logic_error and leaves the count unchanged" * doctest::timeout(30)) {
  weft::wait_group group;
  CHECK_THROWS_AS(group.done(), std::logic_error);
  CHECK(group.count() == 0);
  CHECK_THROWS_AS(group.add(-1), std::logic_error);
  CHECK(group.count() == 0);

  group.add(2);
  CHECK_THROWS_AS(group.add(-3), std::logic_error);
  CHECK(group.count() == 2);
  group.done();
  group.done();
  CHECK_THROWS_AS(group.done(), std::logic_error);
  CHECK(group.count() == 0);
  group.wait();  // still usable

  // The message tells the user what to change.
  try {
    group.done();
    FAIL("done() on a zero count did not throw");
  } catch (const std::logic_error& error) {
    CHECK(std::string(error.what()).find("done()") != std::string::npos);
  }
}

TEST_CASE("a count above 2^32 - 1 throws std::overflow_error and leaves the count unchanged" *
          doctest::timeout(30)) {
  weft::wait_group group;
  group.add(0xFFFF'FFFF);
  CHECK(group.count() == 0xFFFF'FFFF);
  CHECK_THROWS_AS(group.add(1), std::overflow_error);
  CHECK(group.count() == 0xFFFF'FFFF);
  group.add(-std::int64_t{0xFFFF'FFFF});
  CHECK(group.count() == 0);
  CHECK_THROWS_AS(group.add(std::int64_t{1} << 40), std::overflow_error);
  CHECK(group.count() == 0);
}

TEST_CASE(
    "an add whose sum would not fit an int64_t throws std::overflow_error and leaves the count "
    "unchanged" *
    doctest::timeout(30)) {
  weft::wait_group group;
  group.add(1);
  for (const std::int64_t delta :
       {std::numeric_limits<std::int64_t>::max(), std::int64_t{0xFFFF'FFFF}}) {
    CAPTURE(delta);
    try {
      group.add(delta);
      FAIL("the count went past 2^32 - 1");
    } catch (const std::overflow_error& error) {
      CHECK(std::string(error.what()).find("exceed") != std::string::npos);
    } catch (const std::exception& error) {
      FAIL("expected overflow_error, got: " << std::string(error.what()));
    }
    CHECK(group.count() == 1);
  }
  // The most negative delta is a done() too many, not an overflow.
  CHECK_THROWS_AS(group.add(std::numeric_limits<std::int64_t>::min()), std::logic_error);
  CHECK(group.count() == 1);
  group.done();
  CHECK(group.count() == 0);
}

TEST_CASE("a failed done does not disturb a waiter" * doctest::timeout(30)) {
  // A done() that throws must not release or wedge a waiter: counting stays
  // balanced when an operation fails (fatih/semgroup PR#2).
  weft::wait_group group;
  group.add(1);
  wait_status status = wait_status::closed;
  weft::cancel_source source;
  std::thread waiter([&] { status = group.wait(source.token()); });
  wait_for_waiters(group, 1);
  CHECK_THROWS_AS(group.add(-2), std::logic_error);
  CHECK(group.count() == 1);
  CHECK(group.stats().waiters == 1);
  group.done();
  waiter.join();
  CHECK(status == wait_status::ok);
}

TEST_CASE("wait with a cancelled token returns cancelled" * doctest::timeout(30)) {
  SUBCASE("cancelled before the wait") {
    weft::wait_group group;
    group.add(1);
    weft::cancel_source source;
    source.cancel();
    CHECK(group.wait(source.token()) == wait_status::cancelled);
    CHECK(group.count() == 1);
    CHECK(group.stats().waiters == 0);
    group.done();
  }
  SUBCASE("cancelled during the wait") {
    weft::wait_group group;
    group.add(1);
    weft::cancel_source source;
    wait_status status = wait_status::closed;
    std::thread waiter([&] { status = group.wait(source.token()); });
    wait_for_waiters(group, 1);
    source.cancel();
    waiter.join();
    CHECK(status == wait_status::cancelled);
    CHECK(group.count() == 1);
    CHECK(group.stats().waiters == 0);
    // The group still works after a waiter left it.
    std::thread second([&] { group.wait(); });
    wait_for_waiters(group, 1);
    group.done();
    second.join();
  }
  SUBCASE("cancelled with a custom cause") {
    weft::wait_group group;
    group.add(1);
    weft::cancel_source source;
    source.cancel(std::make_error_code(std::errc::io_error));
    CHECK(group.wait(source.token()) == wait_status::cancelled);
    group.done();
  }
  SUBCASE("cancelled through a parent") {
    weft::wait_group group;
    group.add(1);
    weft::cancel_source parent;
    auto child = parent.token().child();
    wait_status status = wait_status::closed;
    std::thread waiter([&] { status = group.wait(child.token()); });
    wait_for_waiters(group, 1);
    parent.cancel();
    waiter.join();
    CHECK(status == wait_status::cancelled);
    group.done();
  }
}

TEST_CASE("a cancelled waiter leaves the others waiting, and they are released at zero" * doctest::timeout(30)) {
  weft::wait_group group;
  group.add(1);
  weft::cancel_source source;
  wait_status first = wait_status::closed;
  wait_status middle = wait_status::closed;
  wait_status last = wait_status::closed;
  std::thread first_waiter([&] { first = group.wait(weft::cancel_token{}); });
  wait_for_waiters(group, 1);
  std::thread middle_waiter([&] { middle = group.wait(source.token()); });
  wait_for_waiters(group, 2);
  std::thread last_waiter([&] { last = group.wait_for(1h); });
  wait_for_waiters(group, 3);
  source.cancel();
  middle_waiter.join();
  CHECK(middle == wait_status::cancelled);
  CHECK(group.stats().waiters == 2);
  group.done();
  first_waiter.join();
  last_waiter.join();
  CHECK(first == wait_status::ok);
  CHECK(last == wait_status::ok);
}

TEST_CASE("wait with a token whose manual-clock deadline passes returns timeout" * doctest::timeout(30)) {
  weft::wait_group group;
  group.add(1);
  auto source = weft::with_timeout<manual_clock>(weft::cancel_token{}, 5s);
  wait_status status = wait_status::closed;
  std::thread waiter([&] { status = group.wait(source.token()); });
  wait_for_waiters(group, 1);
  manual_clock::advance(5s);
  waiter.join();
  CHECK(status == wait_status::timeout);
  CHECK(group.count() == 1);
  CHECK(group.stats().waiters == 0);
  // Already past: at once.
  CHECK(group.wait(source.token()) == wait_status::timeout);
  group.done();
}

TEST_CASE("wait with a token cancelled early wins over its deadline" * doctest::timeout(30)) {
  weft::wait_group group;
  group.add(1);
  auto source = weft::with_timeout<manual_clock>(weft::cancel_token{}, 5s);
  wait_status status = wait_status::closed;
  std::thread waiter([&] { status = group.wait(source.token()); });
  wait_for_waiters(group, 1);
  source.cancel();
  waiter.join();
  CHECK(status == wait_status::cancelled);
  manual_clock::advance(5s);
  CHECK(group.wait(source.token()) == wait_status::cancelled);
  group.done();
}

TEST_CASE("wait_for on a manual clock times out when the clock passes the deadline, not before" *
          doctest::timeout(30)) {
  weft::basic_wait_group<manual_clock> group;
  group.add(1);
  const auto timers_before = manual_clock::pending_timers();
  wait_status status = wait_status::closed;
  std::thread waiter([&] { status = group.wait_for(5s); });
  spin_until([&] { return manual_clock::pending_timers() > timers_before; });
  wait_for_waiters(group, 1);
  manual_clock::advance(5s);
  waiter.join();
  CHECK(status == wait_status::timeout);
  CHECK(group.count() == 1);
  CHECK(group.stats().waiters == 0);
  CHECK(manual_clock::pending_timers() == timers_before);
  group.done();
}

TEST_CASE("wait_for on a manual clock returns ok when the count reaches zero before the deadline" *
          doctest::timeout(30)) {
  weft::basic_wait_group<manual_clock> group;
  group.add(1);
  const auto timers_before = manual_clock::pending_timers();
  wait_status status = wait_status::closed;
  std::thread waiter([&] { status = group.wait_for(5s); });
  spin_until([&] { return manual_clock::pending_timers() > timers_before; });
  wait_for_waiters(group, 1);
  manual_clock::advance(4s);  // not yet: a timer that fired here would make it timeout
  group.done();
  waiter.join();
  CHECK(status == wait_status::ok);
  CHECK(manual_clock::pending_timers() == timers_before);
}

// A timeout too long for the clock (hours::max() overflows nanoseconds)
// waits as long as it takes instead of timing out at once.
template <class Group, class Duration>
void check_wait_for_outlasts(Duration endless) {
  Group group;
  CHECK(group.wait_for(endless) == wait_status::ok);  // a zero count: at once
  group.add(1);
  std::atomic<bool> returned{false};
  wait_status status = wait_status::closed;
  std::thread waiter([&] {
    status = group.wait_for(endless);
    returned = true;
  });
  spin_until([&] { return group.stats().waiters == 1 || returned.load(); });
  CHECK_FALSE(returned.load());  // it waits instead of timing out at once
  if constexpr (std::is_same_v<typename Group::clock, manual_clock>) {
    manual_clock::advance(24h);  // a deadline that wrapped would have fired
  }
  group.done();
  waiter.join();
  CHECK(status == wait_status::ok);
}

TEST_CASE("wait_for with a timeout too long for the clock returns ok once the count reaches zero" *
          doctest::timeout(30)) {
  SUBCASE("steady_clock, seconds::max()") {
    check_wait_for_outlasts<weft::wait_group>(std::chrono::seconds::max());
  }
  SUBCASE("steady_clock, hours::max()") {
    check_wait_for_outlasts<weft::wait_group>(std::chrono::hours::max());
  }
  SUBCASE("steady_clock, nanoseconds::max()") {
    check_wait_for_outlasts<weft::wait_group>(std::chrono::nanoseconds::max());
  }
  SUBCASE("manual_clock, hours::max()") {
    check_wait_for_outlasts<weft::basic_wait_group<manual_clock>>(std::chrono::hours::max());
  }
}

TEST_CASE("wait_until a manual-clock deadline already past times out at once" * doctest::timeout(30)) {
  weft::basic_wait_group<manual_clock> group;
  group.add(1);
  CHECK(group.wait_until(manual_clock::now()) == wait_status::timeout);
  CHECK(group.wait_until(manual_clock::now() - 1s) == wait_status::timeout);
  CHECK(group.wait_for(0s) == wait_status::timeout);
  CHECK(group.stats().waiters == 0);
  group.done();
}

TEST_CASE("a wait_group can be reused: zero releases the waiters, and a new add makes new waiters wait" *
          doctest::timeout(30)) {
  weft::wait_group group;
  for (int cycle = 0; cycle < 3; ++cycle) {
    CAPTURE(cycle);
    group.add(1);
    std::atomic<bool> returned{false};
    std::thread waiter([&] {
      group.wait();
      returned.store(true);
    });
    wait_for_waiters(group, 1);
    CHECK_FALSE(returned.load());
    group.done();
    waiter.join();
    CHECK(returned.load());
    CHECK(group.count() == 0);
    group.wait();  // zero again: at once
  }
}

TEST_CASE("a waiter that began before the count reached zero is released even if add follows at once" *
          doctest::timeout(60)) {
  // The epoch rule: every wait that began while the count was above zero ends
  // when it next reaches zero, even if another add() raises it again before
  // the waiter runs. A second thread calls add(1) the moment it sees zero,
  // racing the releasing done(); the old waiters must all come out and a new
  // waiter must wait for the new count.
  const int rounds = under_sanitizer ? 100 : 1000;
  for (const int waiters : {1, 2, 3, 8}) {
    CAPTURE(waiters);
    for (int round = 0; round < rounds; ++round) {
      weft::wait_group group;
      group.add(1);
      std::atomic<int> released{0};
      std::vector<std::thread> threads;
      for (int i = 0; i < waiters; ++i) {
        threads.emplace_back([&] {
          group.wait();
          released.fetch_add(1);
        });
      }
      wait_for_waiters(group, static_cast<std::size_t>(waiters));
      std::thread re_adder([&] {
        spin_until([&] { return group.count() == 0; });
        group.add(1);
      });
      group.done();
      re_adder.join();
      for (auto& t : threads) t.join();
      CHECK(released.load() == waiters);
      CHECK(group.count() == 1);

      // The new count holds back a new waiter.
      std::atomic<bool> new_returned{false};
      std::thread new_waiter([&] {
        group.wait();
        new_returned.store(true);
      });
      wait_for_waiters(group, 1);
      CHECK_FALSE(new_returned.load());
      group.done();
      new_waiter.join();
    }
  }
}

TEST_CASE("many threads calling done concurrently release every waiter" * doctest::timeout(120)) {
  const int rounds = under_sanitizer ? 20 : 200;
  constexpr int waiters = 4;
  for (const int threads : fixed_thread_counts) {
    CAPTURE(threads);
    for (int round = 0; round < rounds; ++round) {
      weft::wait_group group;
      group.add(threads);
      std::atomic<int> released{0};
      std::atomic<int> saw_nonzero{0};
      std::vector<std::thread> waiting;
      for (int i = 0; i < waiters; ++i) {
        waiting.emplace_back([&, i] {
          // A mix of forms; none may miss the wake-up.
          wait_status status = wait_status::ok;
          switch (i % 3) {
            case 0: group.wait(); break;
            case 1: status = group.wait(weft::cancel_token{}); break;
            default: status = group.wait_for(1h); break;
          }
          if (status == wait_status::ok) released.fetch_add(1);
          if (group.count() != 0) saw_nonzero.fetch_add(1);
        });
      }
      // On odd rounds the waiters are known to be queued first; on even
      // rounds they race the done() calls.
      if (round % 2 == 1) wait_for_waiters(group, waiters);
      std::barrier start(threads);
      std::vector<std::thread> finishing;
      for (int i = 0; i < threads; ++i) {
        finishing.emplace_back([&] {
          start.arrive_and_wait();
          group.done();
        });
      }
      for (auto& t : finishing) t.join();
      for (auto& t : waiting) t.join();
      CHECK(released.load() == waiters);
      CHECK(saw_nonzero.load() == 0);
      CHECK(group.count() == 0);
      CHECK(group.stats().waiters == 0);
    }
  }
}

TEST_CASE("add and done racing from many threads keep the count balanced" * doctest::timeout(120)) {
  const int per_thread = under_sanitizer ? 2000 : 20000;
  for (const int threads : fixed_thread_counts) {
    CAPTURE(threads);
    weft::wait_group group;
    std::barrier start(threads + 1);
    std::vector<std::thread> workers;
    for (int t = 0; t < threads; ++t) {
      workers.emplace_back([&] {
        start.arrive_and_wait();
        for (int i = 0; i < per_thread; ++i) {
          group.add(1);
          group.done();
        }
      });
    }
    // A waiter that comes and goes meanwhile sees only ok.
    start.arrive_and_wait();
    int waits = 0;
    for (int i = 0; i < 200; ++i) {
      group.wait();
      ++waits;
    }
    for (auto& w : workers) w.join();
    CHECK(waits == 200);
    CHECK(group.count() == 0);
    CHECK(group.stats().waiters == 0);
  }
}

TEST_CASE("what tasks wrote before done() is visible after wait() returns" * doctest::timeout(60)) {
  // Plain, non-atomic writes: ThreadSanitizer reports a race if wait() does
  // not order them before the reads.
  const int rounds = under_sanitizer ? 20 : 200;
  for (const int threads : fixed_thread_counts) {
    CAPTURE(threads);
    for (int round = 0; round < rounds; ++round) {
      weft::wait_group group;
      std::vector<int> results(static_cast<std::size_t>(threads), 0);
      group.add(threads);
      std::vector<std::thread> workers;
      for (int i = 0; i < threads; ++i) {
        workers.emplace_back([&, i] {
          results[static_cast<std::size_t>(i)] = i + 1;
          group.done();
        });
      }
      int sum = 0;
      if (round % 2 == 0) {
        group.wait();
      } else {
        REQUIRE(group.wait(weft::cancel_token{}) == wait_status::ok);
      }
      for (const int value : results) sum += value;
      CHECK(sum == threads * (threads + 1) / 2);
      for (auto& w : workers) w.join();
    }
  }
}

TEST_CASE("a waiter cancelled while the count reaches zero gets ok or cancelled, never hangs" *
          doctest::timeout(60)) {
  const int rounds = under_sanitizer ? 200 : 2000;
  int ok = 0;
  int cancelled = 0;
  for (int round = 0; round < rounds; ++round) {
    weft::wait_group group;
    group.add(1);
    weft::cancel_source source;
    wait_status status = wait_status::closed;
    std::thread waiter([&] { status = group.wait(source.token()); });
    wait_for_waiters(group, 1);
    std::barrier start(2);
    std::thread canceller([&] {
      start.arrive_and_wait();
      source.cancel();
    });
    start.arrive_and_wait();
    group.done();
    canceller.join();
    waiter.join();
    CHECK((status == wait_status::ok || status == wait_status::cancelled));
    (status == wait_status::ok ? ok : cancelled) += 1;
    CHECK(group.stats().waiters == 0);
    group.wait();
  }
  CHECK(ok + cancelled == rounds);
}
