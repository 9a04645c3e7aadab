// SPDX-License-Identifier: BSL-1.0
// Tests for weft/cancel.hpp: cancel_source, cancel_token, children,
// deadlines, on_cancel registrations, waiting, and std::stop_token interop.
//
// Time is a weft::manual_clock wherever it matters; the one real-clock case
// waits for a deadline to fire by itself (waiting for the event, never
// sleeping to make it happen). manual_clock is process-wide, so deadlines are
// computed from manual_clock::now() and timer counts are compared with a
// baseline taken at the start of the case.
#include <weft/cancel.hpp>
#include <weft/detail/tick_clock.hpp>
#include <weft/manual_clock.hpp>
#include <weft/wait_status.hpp>

#include <doctest/doctest.h>

#include "support.hpp"

#include <atomic>
#include <barrier>
#include <chrono>
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <fstream>
#include <functional>
#include <latch>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <ostream>  // doctest prints std::error_code through operator<<
#include <ratio>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>
#include <version>

#include <dirent.h>
#include <pthread.h>

#if defined(__cpp_lib_jthread)
#include <stop_token>
#endif

using namespace std::chrono_literals;
using weft::manual_clock;
using weft::wait_status;

namespace {

using weft_test::callbacks_on;
using weft_test::fixed_thread_counts;
using weft_test::spin_until;
using weft_test::under_sanitizer;

// Like spin_until, but polls without giving up the core (a yield now and
// then, in case the other thread needs it): for lockstep races whose windows
// are shorter than a yield.
template <class Condition>
void busy_wait_until(Condition condition) {
  for (unsigned spins = 1; !condition(); ++spins) {
    if (spins % 65536 == 0) std::this_thread::yield();
  }
}

// Waits until `count` timers more than `baseline` are scheduled on the manual
// clock, i.e. until a thread has really begun its timed wait.
void wait_for_manual_timers(std::size_t baseline, std::size_t count = 1) {
  spin_until([&] { return manual_clock::pending_timers() >= baseline + count; });
}

struct test_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace

// ---------------------------------------------------------------------------
// Sources, tokens, causes

TEST_CASE("a default-constructed token is never cancelled" * doctest::timeout(30)) {
  const weft::cancel_token token;
  CHECK_FALSE(token.cancelled());
  CHECK_FALSE(token.can_be_cancelled());
  CHECK_FALSE(token.cause());
  CHECK(token.cause().code() == std::error_code{});
  CHECK(token.cause().exception() == nullptr);

  // Nothing registered on it ever runs, and its children are never cancelled by it.
  bool ran = false;
  {
    auto registration = weft::on_cancel(token, [&] { ran = true; });
    auto child = token.child();
    CHECK_FALSE(child.cancelled());
  }
  CHECK_FALSE(ran);
}

TEST_CASE("a new source's token is not cancelled until the source cancels it" * doctest::timeout(30)) {
  weft::cancel_source source;
  const auto token = source.token();
  CHECK(token.can_be_cancelled());
  CHECK_FALSE(token.cancelled());
  CHECK_FALSE(source.cancelled());
  CHECK_FALSE(token.cause());

  CHECK(source.cancel());
  CHECK(token.cancelled());
  CHECK(source.cancelled());
  CHECK(token.cause());
}

TEST_CASE("cancel is idempotent and the first cause wins" * doctest::timeout(30)) {
  weft::cancel_source source;
  const auto token = source.token();
  CHECK(source.cancel(std::make_error_code(std::errc::io_error)));
  CHECK_FALSE(source.cancel());
  CHECK_FALSE(source.cancel(std::make_error_code(std::errc::broken_pipe)));
  CHECK_FALSE(source.cancel(std::make_exception_ptr(test_error("late"))));
  CHECK(token.cause().code() == std::errc::io_error);
  CHECK(token.cause().exception() == nullptr);
}

TEST_CASE("a plain cancel gives the cause cancelled" * doctest::timeout(30)) {
  weft::cancel_source source;
  source.cancel();
  const auto cause = source.token().cause();
  REQUIRE(cause);
  CHECK(cause.code() == weft::errc::cancelled);
  CHECK(cause.code() == std::errc::operation_canceled);
  CHECK_FALSE(cause.is_deadline());
  CHECK(cause.exception() == nullptr);
  CHECK_THROWS_AS(cause.rethrow(), std::system_error);
  try {
    cause.rethrow();
  } catch (const std::system_error& error) {
    CHECK(error.code() == weft::errc::cancelled);
  }
}

TEST_CASE("cancelling with an error code makes that code the cause" * doctest::timeout(30)) {
  weft::cancel_source source;
  const auto code = std::make_error_code(std::errc::connection_reset);
  source.cancel(code);
  const auto cause = source.token().cause();
  REQUIRE(cause);
  CHECK(cause.code() == code);
  CHECK_FALSE(cause.is_deadline());
  CHECK(cause.exception() == nullptr);
  try {
    cause.rethrow();
    FAIL("rethrow() returned");
  } catch (const std::system_error& error) {
    CHECK(error.code() == code);
  }
}

TEST_CASE("cancelling with an empty error code counts as a plain cancel" * doctest::timeout(30)) {
  weft::cancel_source source;
  source.cancel(std::error_code{});
  CHECK(source.token().cancelled());
  CHECK(source.token().cause().code() == weft::errc::cancelled);
}

TEST_CASE("cancelling with an exception makes it the cause and rethrow() throws it" * doctest::timeout(30)) {
  weft::cancel_source source;
  const auto exception = std::make_exception_ptr(test_error("the database went away"));
  source.cancel(exception);
  const auto cause = source.token().cause();
  REQUIRE(cause);
  CHECK(cause.exception() == exception);
  CHECK(cause.code() == weft::errc::cancelled);
  CHECK_FALSE(cause.is_deadline());
  CHECK_THROWS_WITH_AS(cause.rethrow(), "the database went away", test_error);
}

TEST_CASE("copies of sources and tokens share one state" * doctest::timeout(30)) {
  weft::cancel_source source;
  const weft::cancel_source source_copy = source;  // NOLINT(performance-unnecessary-copy-initialization)
  weft::cancel_source to_move{source};
  weft::cancel_source moved_to = std::move(to_move);
  const auto token = source.token();
  const auto token_copy = token;
  weft::cancel_token assigned;
  assigned = token;

  CHECK(token == token_copy);
  CHECK(token == assigned);
  CHECK(token == source_copy.token());
  CHECK(token == moved_to.token());
  CHECK_FALSE(token == weft::cancel_token{});
  CHECK_FALSE(token == weft::cancel_source{}.token());

  moved_to.cancel(std::make_error_code(std::errc::timed_out));
  for (const weft::cancel_token* t : {&token, &token_copy, static_cast<const weft::cancel_token*>(&assigned)}) {
    CHECK(t->cancelled());
    CHECK(t->cause().code() == std::errc::timed_out);
  }
  CHECK(source.cancelled());
  CHECK(source_copy.cancelled());
}

TEST_CASE("a token outlives every source of its state" * doctest::timeout(30)) {
  weft::cancel_token token;
  {
    weft::cancel_source source;
    token = source.token();
    source.cancel(std::make_exception_ptr(test_error("gone")));
  }
  CHECK(token.cancelled());
  CHECK_THROWS_AS(token.cause().rethrow(), test_error);
}

TEST_CASE("a moved-from token is a token that is never cancelled" * doctest::timeout(30)) {
  weft::cancel_source source;
  auto token = source.token();
  const auto moved_to = std::move(token);
  source.cancel();
  CHECK(moved_to.cancelled());
  CHECK_FALSE(token.cancelled());  // NOLINT(bugprone-use-after-move): documented to be a default token
  CHECK_FALSE(token.can_be_cancelled());
}

TEST_CASE("exactly one of many concurrent cancels wins and its cause is kept" * doctest::timeout(60)) {
  const int rounds = under_sanitizer ? 50 : 500;
  for (const int threads : fixed_thread_counts) {
    CAPTURE(threads);
    for (int round = 0; round < rounds; ++round) {
      weft::cancel_source source;
      std::atomic<int> callback_runs{0};
      auto registration = weft::on_cancel(source.token(), [&] { callback_runs.fetch_add(1); });
      std::atomic<int> winners{0};
      std::atomic<int> winner{-1};
      std::barrier start(threads);
      std::vector<std::thread> cancellers;
      for (int i = 0; i < threads; ++i) {
        cancellers.emplace_back([&, i] {
          start.arrive_and_wait();
          if (source.cancel(std::error_code(i + 1, std::generic_category()))) {
            winners.fetch_add(1);
            winner.store(i);
          }
        });
      }
      for (auto& t : cancellers) t.join();
      REQUIRE(winners.load() == 1);
      CHECK(callback_runs.load() == 1);
      CHECK(source.token().cause().code() == std::error_code(winner.load() + 1, std::generic_category()));
    }
  }
}

// ---------------------------------------------------------------------------
// Children

TEST_CASE("a child is cancelled with its parent's cause" * doctest::timeout(30)) {
  SUBCASE("an error code") {
    weft::cancel_source parent;
    auto child = parent.token().child();
    CHECK_FALSE(child.cancelled());
    const auto code = std::make_error_code(std::errc::host_unreachable);
    parent.cancel(code);
    CHECK(child.cancelled());
    CHECK(child.token().cause().code() == code);
  }
  SUBCASE("an exception") {
    weft::cancel_source parent;
    auto child = parent.token().child();
    const auto exception = std::make_exception_ptr(test_error("parent failed"));
    parent.cancel(exception);
    CHECK(child.cancelled());
    CHECK(child.token().cause().exception() == exception);
    CHECK_THROWS_WITH_AS(child.token().cause().rethrow(), "parent failed", test_error);
  }
  SUBCASE("through several generations") {
    weft::cancel_source root;
    auto child = root.token().child();
    auto grandchild = child.token().child();
    auto great_grandchild = grandchild.token().child();
    root.cancel(std::make_error_code(std::errc::network_down));
    for (const auto* source : {&child, &grandchild, &great_grandchild}) {
      CHECK(source->cancelled());
      CHECK(source->token().cause().code() == std::errc::network_down);
    }
  }
}

TEST_CASE("a child of an already cancelled token is born cancelled with the parent's cause" * doctest::timeout(30)) {
  weft::cancel_source parent;
  parent.cancel(std::make_error_code(std::errc::permission_denied));
  auto child = parent.token().child();
  CHECK(child.cancelled());
  CHECK(child.token().cause().code() == std::errc::permission_denied);
  CHECK(callbacks_on(parent.token()) == 0);
}

TEST_CASE("cancelling a child never cancels its parent or its siblings" * doctest::timeout(30)) {
  weft::cancel_source parent;
  auto child = parent.token().child();
  auto sibling = parent.token().child();
  auto grandchild = child.token().child();
  bool parent_callback_ran = false;
  auto registration = weft::on_cancel(parent.token(), [&] { parent_callback_ran = true; });

  CHECK(child.cancel(std::make_error_code(std::errc::io_error)));
  CHECK(child.cancelled());
  CHECK(grandchild.cancelled());  // downwards, yes
  CHECK_FALSE(parent.cancelled());
  CHECK_FALSE(sibling.cancelled());
  CHECK_FALSE(parent_callback_ran);

  // The parent cancelling later leaves the child's own (first) cause alone.
  parent.cancel();
  CHECK(sibling.cancelled());
  CHECK(child.token().cause().code() == std::errc::io_error);
  CHECK(sibling.token().cause().code() == weft::errc::cancelled);
}

TEST_CASE("a child keeps its parent's state alive" * doctest::timeout(30)) {
  std::optional<weft::cancel_source> parent{std::in_place};
  auto child = parent->token().child();
  auto parent_copy = *parent;
  parent.reset();
  parent_copy.cancel();
  CHECK(child.cancelled());
}

TEST_CASE("destroying a child detaches it from its parent" * doctest::timeout(60)) {
  weft::cancel_source parent;
  const auto token = parent.token();
  CHECK(callbacks_on(token) == 0);
  {
    auto child = token.child();
    CHECK(callbacks_on(token) == 1);
    auto child_copy = child;
    auto child_token = child.token();
    CHECK(callbacks_on(token) == 1);
  }
  CHECK(callbacks_on(token) == 0);

  // The failsafe-go#134 / concourse#5099 leak: a long-lived parent with many
  // short-lived children must not accumulate them.
  for (int i = 0; i < 1'000'000; ++i) {
    auto child = token.child();
    auto grandchild = child.token().child();
  }
  CHECK(callbacks_on(token) == 0);
  CHECK_FALSE(parent.cancelled());
}

TEST_CASE("destroying an on_cancel registration removes it from the token's list" * doctest::timeout(60)) {
  weft::cancel_source source;
  const auto token = source.token();
  int runs = 0;
  for (int i = 0; i < 1'000'000; ++i) {
    auto registration = weft::on_cancel(token, [&runs] { ++runs; });
  }
  CHECK(callbacks_on(token) == 0);
  source.cancel();
  CHECK(runs == 0);
}

TEST_CASE("a child made from a token that is destroyed first is still cancelled by the parent" * doctest::timeout(30)) {
  weft::cancel_source parent;
  std::optional<weft::cancel_source> child;
  {
    const auto temporary_token = parent.token();
    child = temporary_token.child();
  }
  parent.cancel();
  CHECK(child->cancelled());
}

// ---------------------------------------------------------------------------
// on_cancel

TEST_CASE("on_cancel runs the callback at once when the token is already cancelled" * doctest::timeout(30)) {
  weft::cancel_source source;
  source.cancel();
  const auto caller = std::this_thread::get_id();
  int runs = 0;
  std::thread::id ran_on;
  auto registration = weft::on_cancel(source.token(), [&] {
    ++runs;
    ran_on = std::this_thread::get_id();
  });
  CHECK(runs == 1);
  CHECK(ran_on == caller);
  CHECK(callbacks_on(source.token()) == 0);
}

TEST_CASE("on_cancel callbacks run on the cancelling thread, in registration order, exactly once" * doctest::timeout(30)) {
  weft::cancel_source source;
  std::vector<int> order;  // written only by the cancelling thread
  std::vector<std::thread::id> threads;
  std::vector<std::unique_ptr<weft::cancel_callback<std::function<void()>>>> registrations;
  for (int i = 0; i < 10; ++i) {
    registrations.push_back(std::make_unique<weft::cancel_callback<std::function<void()>>>(
        source.token(), std::function<void()>([&order, &threads, i] {
          order.push_back(i);
          threads.push_back(std::this_thread::get_id());
        })));
  }
  CHECK(callbacks_on(source.token()) == 10);

  std::thread::id canceller_id;
  std::thread canceller([&] {
    canceller_id = std::this_thread::get_id();
    source.cancel();
    source.cancel();
  });
  canceller.join();
  source.cancel();

  REQUIRE(order.size() == 10);
  for (int i = 0; i < 10; ++i) {
    CHECK(order[static_cast<std::size_t>(i)] == i);
    CHECK(threads[static_cast<std::size_t>(i)] == canceller_id);
  }
  CHECK(callbacks_on(source.token()) == 0);
  registrations.clear();
  CHECK(order.size() == 10);
}

TEST_CASE("a callback sees what the cancelling thread did before cancelling" * doctest::timeout(30)) {
  for (int round = 0; round < 100; ++round) {
    weft::cancel_source source;
    int payload = 0;  // plain memory: ordered by cancel() alone
    std::atomic<bool> registered{false};
    int seen = -1;
    std::latch ran{1};
    std::thread canceller([&] {
      spin_until([&] { return registered.load(); });
      payload = 42;
      source.cancel();
    });
    auto registration = weft::on_cancel(source.token(), [&] {
      seen = payload;
      ran.count_down();
    });
    registered.store(true);
    ran.wait();
    canceller.join();
    CHECK(seen == 42);
    // And a thread that sees cancelled() == true sees it too.
    CHECK(source.token().cancelled());
    CHECK(payload == 42);
  }
}

TEST_CASE("a registration on a token that is never cancelled never runs" * doctest::timeout(30)) {
  int runs = 0;
  {
    weft::cancel_source source;
    auto registration = weft::on_cancel(source.token(), [&] { ++runs; });
  }
  CHECK(runs == 0);
}

TEST_CASE("destroying a registration while its callback runs on another thread waits for the callback to finish" *
          doctest::timeout(60)) {
  const int rounds = under_sanitizer ? 10 : 50;
  for (int round = 0; round < rounds; ++round) {
    weft::cancel_source source;
    std::latch entered{1};
    std::latch release{1};
    std::latch destroying{1};
    std::atomic<bool> finished{false};
    auto callback = [&] {
      entered.count_down();
      release.wait();
      // Give a destroyer that does not wait every chance to return first.
      for (int i = 0; i < 1000; ++i) std::this_thread::yield();
      finished.store(true);
    };
    std::optional<weft::cancel_callback<decltype(callback)>> registration;
    registration.emplace(source.token(), callback);

    std::thread canceller([&] { source.cancel(); });
    entered.wait();  // the callback is now running on the canceller thread
    std::thread releaser([&] {
      destroying.wait();
      for (int i = 0; i < 100; ++i) std::this_thread::yield();
      release.count_down();
    });
    destroying.count_down();
    registration.reset();  // must block until the callback has returned
    CHECK(finished.load());
    releaser.join();
    canceller.join();
  }
}

namespace {
// A callback that destroys its own registration (kept in an optional).
struct destroy_own_registration {
  std::optional<weft::cancel_callback<destroy_own_registration>>* registration;
  int* runs;
  void operator()() const noexcept {
    int* const counter = runs;
    registration->reset();  // destroys *this; touch nothing of it afterwards
    ++*counter;
  }
};
}  // namespace

TEST_CASE("destroying a registration from inside its own callback does not deadlock" * doctest::timeout(30)) {
  SUBCASE("cancelled on this thread") {
    weft::cancel_source source;
    int runs = 0;
    std::optional<weft::cancel_callback<destroy_own_registration>> registration;
    registration.emplace(source.token(), destroy_own_registration{&registration, &runs});
    source.cancel();
    CHECK(runs == 1);
    CHECK_FALSE(registration.has_value());
  }
  SUBCASE("cancelled on another thread") {
    weft::cancel_source source;
    int runs = 0;
    std::optional<weft::cancel_callback<destroy_own_registration>> registration;
    registration.emplace(source.token(), destroy_own_registration{&registration, &runs});
    std::thread canceller([&] { source.cancel(); });
    canceller.join();
    CHECK(runs == 1);
    CHECK_FALSE(registration.has_value());
  }
}

TEST_CASE("a callback that removes a later registration keeps it from running" * doctest::timeout(30)) {
  weft::cancel_source source;
  bool second_ran = false;
  bool third_ran = false;
  std::optional<weft::cancel_callback<std::function<void()>>> second;
  auto first = weft::on_cancel(source.token(), [&] { second.reset(); });
  second.emplace(source.token(), std::function<void()>([&] { second_ran = true; }));
  auto third = weft::on_cancel(source.token(), [&] { third_ran = true; });
  source.cancel();
  CHECK_FALSE(second_ran);
  CHECK(third_ran);
}

TEST_CASE("a callback may register another callback on the same token, which runs at once" * doctest::timeout(30)) {
  weft::cancel_source source;
  std::vector<int> order;
  std::optional<weft::cancel_callback<std::function<void()>>> nested;
  auto outer = weft::on_cancel(source.token(), [&] {
    order.push_back(1);
    nested.emplace(source.token(), std::function<void()>([&] { order.push_back(2); }));
    order.push_back(3);
  });
  auto later = weft::on_cancel(source.token(), [&] { order.push_back(4); });
  source.cancel();
  CHECK(order == std::vector<int>{1, 2, 3, 4});
}

TEST_CASE("a callback may register on other tokens and cancel other sources" * doctest::timeout(30)) {
  weft::cancel_source first;
  weft::cancel_source second;
  weft::cancel_source third;
  bool second_ran = false;
  bool first_cancelled_again = true;
  std::optional<weft::cancel_callback<std::function<void()>>> on_third;
  bool third_ran = false;
  // first -> cancels second -> tries to cancel first again (already cancelled).
  auto on_first = weft::on_cancel(first.token(), [&] {
    on_third.emplace(third.token(), std::function<void()>([&] { third_ran = true; }));
    second.cancel(std::make_error_code(std::errc::owner_dead));
  });
  auto on_second = weft::on_cancel(second.token(), [&] {
    second_ran = true;
    first_cancelled_again = first.cancel();
  });
  first.cancel();
  CHECK(second.cancelled());
  CHECK(second_ran);
  CHECK_FALSE(first_cancelled_again);
  CHECK_FALSE(third_ran);
  third.cancel();
  CHECK(third_ran);
}

TEST_CASE("weft holds no lock of its own while a callback runs (cppcoro#221, cpprestsdk#481)" * doctest::timeout(30)) {
  // The callback blocks until another thread has used the same state in every
  // way a lock would block: registering (runs at once), removing, cancelling,
  // reading, making a child. If weft held the state's mutex across the call,
  // this would deadlock.
  weft::cancel_source source;
  const auto token = source.token();
  std::latch entered{1};
  std::latch other_thread_done{1};
  bool late_ran = false;
  auto pending = std::make_unique<weft::cancel_callback<std::function<void()>>>(token, std::function<void()>([] {}));
  auto blocking = weft::on_cancel(token, [&] {
    entered.count_down();
    other_thread_done.wait();
  });
  // Registered after `blocking`, so still queued while it runs.
  auto later = std::make_unique<weft::cancel_callback<std::function<void()>>>(token, std::function<void()>([] {}));

  std::thread canceller([&] { source.cancel(std::make_error_code(std::errc::interrupted)); });
  entered.wait();
  std::thread other([&] {
    CHECK(token.cancelled());
    CHECK(token.cause().code() == std::errc::interrupted);
    {
      auto late = weft::on_cancel(token, [&] { late_ran = true; });
    }
    later.reset();  // not yet run: removed without running
    CHECK_FALSE(source.cancel());
    auto child = token.child();
    CHECK(child.cancelled());
    (void)callbacks_on(token);
    other_thread_done.count_down();
  });
  other.join();
  canceller.join();
  CHECK(late_ran);
  pending.reset();
}

TEST_CASE("a callback may drop the last handles to its own token" * doctest::timeout(30)) {
  // The child's source and registration are gone by the time the parent's
  // cancel returns; ASan checks nothing touched the freed state.
  weft::cancel_source parent;
  std::optional<weft::cancel_source> child{parent.token().child()};
  bool ran = false;
  std::optional<weft::cancel_callback<std::function<void()>>> registration;
  registration.emplace(child->token(), std::function<void()>([&] {
    ran = true;
    child.reset();
    registration.reset();
  }));
  parent.cancel();
  CHECK(ran);
  CHECK_FALSE(child.has_value());
  CHECK_FALSE(registration.has_value());
  CHECK(callbacks_on(parent.token()) == 0);
}

// ---------------------------------------------------------------------------
// Deadlines (manual clock)

TEST_CASE("a deadline cancels with deadline_exceeded when the clock reaches it, and not before" *
          doctest::timeout(30)) {
  const auto deadline = manual_clock::now() + 10s;
  auto source = weft::with_deadline(weft::cancel_token{}, deadline);
  const auto token = source.token();
  CHECK_FALSE(token.cancelled());
  manual_clock::advance(10s - 1ns);
  CHECK_FALSE(token.cancelled());
  manual_clock::advance(1ns);
  REQUIRE(token.cancelled());
  CHECK(token.cause().is_deadline());
  CHECK(token.cause().code() == weft::errc::deadline_exceeded);
  CHECK(token.cause().code() == std::errc::timed_out);
  CHECK(token.cause().exception() == nullptr);
}

TEST_CASE("with_timeout counts from the clock's now" * doctest::timeout(30)) {
  auto source = weft::with_timeout<manual_clock>(weft::cancel_token{}, 5s);
  manual_clock::advance(4s);
  CHECK_FALSE(source.cancelled());
  manual_clock::advance(2s);
  CHECK(source.cancelled());
  CHECK(source.token().cause().is_deadline());
}

TEST_CASE("a deadline runs on_cancel callbacks on the thread that advances the clock" * doctest::timeout(30)) {
  auto source = weft::with_timeout<manual_clock>(weft::cancel_token{}, 1s);
  std::thread::id ran_on;
  int runs = 0;
  auto registration = weft::on_cancel(source.token(), [&] {
    ++runs;
    ran_on = std::this_thread::get_id();
  });
  std::thread advancer([] { manual_clock::advance(1s); });
  const auto advancer_id = advancer.get_id();
  advancer.join();
  CHECK(runs == 1);
  CHECK(ran_on == advancer_id);
  manual_clock::advance(1h);
  CHECK(runs == 1);
}

TEST_CASE("a deadline already past gives a token that is already cancelled with deadline_exceeded" *
          doctest::timeout(30)) {
  const auto timers_before = manual_clock::pending_timers();
  SUBCASE("with_deadline at now") {
    auto source = weft::with_deadline(weft::cancel_token{}, manual_clock::now());
    CHECK(source.cancelled());
    CHECK(source.token().cause().is_deadline());
  }
  SUBCASE("with_deadline in the past") {
    auto source = weft::with_deadline(weft::cancel_token{}, manual_clock::now() - 1s);
    CHECK(source.cancelled());
    CHECK(source.token().cause().is_deadline());
  }
  SUBCASE("with_timeout of zero and of a negative duration") {
    auto zero = weft::with_timeout<manual_clock>(weft::cancel_token{}, 0s);
    auto negative = weft::with_timeout<manual_clock>(weft::cancel_token{}, -1s);
    CHECK(zero.token().cause().is_deadline());
    CHECK(negative.token().cause().is_deadline());
  }
  SUBCASE("steady_clock") {
    auto zero = weft::with_timeout(weft::cancel_token{}, 0ms);
    auto past = weft::with_deadline(weft::cancel_token{}, std::chrono::steady_clock::now() - 1s);
    CHECK(zero.token().cause().is_deadline());
    CHECK(past.token().cause().is_deadline());
  }
  SUBCASE("an on_cancel registered afterwards runs at once") {
    auto source = weft::with_deadline(weft::cancel_token{}, manual_clock::now());
    bool ran = false;
    auto registration = weft::on_cancel(source.token(), [&] { ran = true; });
    CHECK(ran);
  }
  CHECK(manual_clock::pending_timers() == timers_before);
}

TEST_CASE("a deadline on a token whose parent is already cancelled keeps the parent's cause" *
          doctest::timeout(30)) {
  weft::cancel_source parent;
  parent.cancel(std::make_error_code(std::errc::io_error));
  auto past = weft::with_deadline(parent.token(), manual_clock::now() - 1s);
  auto future = weft::with_timeout<manual_clock>(parent.token(), 1s);
  CHECK(past.token().cause().code() == std::errc::io_error);
  CHECK(future.token().cause().code() == std::errc::io_error);
}

TEST_CASE("a deadline source is also cancelled by its parent, with the parent's cause" * doctest::timeout(30)) {
  weft::cancel_source parent;
  auto source = weft::with_timeout<manual_clock>(parent.token(), 10s);
  parent.cancel(std::make_error_code(std::errc::not_connected));
  CHECK(source.cancelled());
  CHECK(source.token().cause().code() == std::errc::not_connected);
  manual_clock::advance(10s);
  CHECK(source.token().cause().code() == std::errc::not_connected);
}

TEST_CASE("a child never outlives its parent's earlier deadline" * doctest::timeout(30)) {
  auto parent = weft::with_timeout<manual_clock>(weft::cancel_token{}, 5s);
  auto later_deadline_child = weft::with_timeout<manual_clock>(parent.token(), 60s);
  auto plain_child = parent.token().child();
  auto grandchild = later_deadline_child.token().child();

  manual_clock::advance(5s - 1ns);
  CHECK_FALSE(later_deadline_child.cancelled());
  CHECK_FALSE(plain_child.cancelled());
  manual_clock::advance(1ns);
  for (const auto* source : {&parent, &later_deadline_child, &plain_child, &grandchild}) {
    CHECK(source->cancelled());
    CHECK(source->token().cause().is_deadline());
  }
}

TEST_CASE("a child's earlier deadline fires without cancelling the parent" * doctest::timeout(30)) {
  auto parent = weft::with_timeout<manual_clock>(weft::cancel_token{}, 60s);
  auto child = weft::with_timeout<manual_clock>(parent.token(), 5s);
  manual_clock::advance(5s);
  CHECK(child.cancelled());
  CHECK(child.token().cause().is_deadline());
  CHECK_FALSE(parent.cancelled());
  manual_clock::advance(55s);
  CHECK(parent.cancelled());
}

TEST_CASE("cancelling a deadline source early wins over the deadline" * doctest::timeout(30)) {
  auto source = weft::with_timeout<manual_clock>(weft::cancel_token{}, 5s);
  int runs = 0;
  auto registration = weft::on_cancel(source.token(), [&] { ++runs; });
  CHECK(source.cancel());
  CHECK(runs == 1);
  manual_clock::advance(10s);
  CHECK(runs == 1);
  CHECK(source.token().cause().code() == weft::errc::cancelled);
  CHECK_FALSE(source.token().cause().is_deadline());
}

TEST_CASE("destroying deadline sources removes their timers" * doctest::timeout(30)) {
  const auto timers_before = manual_clock::pending_timers();
  weft::cancel_source parent;
  {
    auto source = weft::with_timeout<manual_clock>(parent.token(), 1h);
    CHECK(manual_clock::pending_timers() == timers_before + 1);
  }
  for (int i = 0; i < 10'000; ++i) {
    auto source = weft::with_timeout<manual_clock>(parent.token(), std::chrono::seconds{i + 1});
  }
  CHECK(manual_clock::pending_timers() == timers_before);
  CHECK(callbacks_on(parent.token()) == 0);
}

TEST_CASE("a deadline source destroyed before its deadline never fires" * doctest::timeout(30)) {
  int runs = 0;
  weft::cancel_token survivor;
  {
    auto source = weft::with_timeout<manual_clock>(weft::cancel_token{}, 1s);
    survivor = source.token();
    auto registration = weft::on_cancel(source.token(), [&] { ++runs; });
  }
  // The token still holds the state, so its timer is still live; the
  // registration is gone, so its callback must not run.
  manual_clock::advance(1s);
  CHECK(runs == 0);
  CHECK(survivor.cancelled());
  CHECK(survivor.cause().is_deadline());
}

TEST_CASE("with_timeout too long for the clock gives a source that its deadline never cancels" *
          doctest::timeout(30)) {
  const auto timers_before = manual_clock::pending_timers();
  {
    auto steady_hours = weft::with_timeout(weft::cancel_token{}, std::chrono::hours::max());
    auto steady_seconds = weft::with_timeout(weft::cancel_token{}, std::chrono::seconds::max());
    auto steady_nanoseconds =
        weft::with_timeout(weft::cancel_token{}, std::chrono::nanoseconds::max());
    auto manual_hours =
        weft::with_timeout<manual_clock>(weft::cancel_token{}, std::chrono::hours::max());
    manual_clock::advance(24h);
    for (const auto* source :
         {&steady_hours, &steady_seconds, &steady_nanoseconds, &manual_hours}) {
      CHECK_FALSE(source->token().cancelled());
    }
    // Still cancellable by hand, with a plain cause.
    CHECK(manual_hours.cancel());
    CHECK_FALSE(manual_hours.token().cause().is_deadline());
  }
  CHECK(manual_clock::pending_timers() == timers_before);
}

// A deadline in seconds was converted to the clock's nanoseconds, which
// overflowed into the past: cancelled at once.
TEST_CASE(
    "with_deadline and wait_until far off in a coarse unit saturate instead of firing at once" *
    doctest::timeout(30)) {
  using seconds_point = std::chrono::time_point<std::chrono::steady_clock, std::chrono::seconds>;
  const auto far = weft_test::thousand_years_on_in_seconds<std::chrono::steady_clock>();
  auto at_max = weft::with_deadline(weft::cancel_token{}, seconds_point::max());
  auto thousand_years = weft::with_deadline(weft::cancel_token{}, far);
  CHECK_FALSE(at_max.token().cancelled());
  CHECK_FALSE(thousand_years.token().cancelled());

  // On the manual clock, a wait shows as a pending timer.
  const auto manual_far = weft_test::thousand_years_on_in_seconds<manual_clock>();
  const auto timers_before = manual_clock::pending_timers();
  weft::cancel_source source;
  const auto status = weft_test::wait_on_thread(
      [&] { return source.token().wait_until(manual_far); },
      [&] { return manual_clock::pending_timers() > timers_before; }, [&] { source.cancel(); });
  CHECK(status == wait_status::ok);
}

namespace {
// A clock whose time a test sets, to put now() next to the ends of its range.
template <class Duration>
struct settable_clock {
  using duration = Duration;
  using rep = typename duration::rep;
  using period = typename duration::period;
  using time_point = std::chrono::time_point<settable_clock>;
  [[maybe_unused]] static constexpr bool is_steady = true;

  static inline rep ticks = 0;
  static time_point now() noexcept { return time_point{duration{ticks}}; }
};
}  // namespace

TEST_CASE(
    "a timeout's deadline is rounded up to the clock's tick and saturates at the clock's maximum" *
    doctest::timeout(30)) {
  using std::chrono::duration;
  using std::chrono::hours;
  using std::chrono::microseconds;
  using std::chrono::nanoseconds;
  using std::chrono::seconds;
  using weft::detail::deadline_after;
  SUBCASE("a nanosecond clock") {
    using clock = settable_clock<nanoseconds>;
    const auto max = clock::time_point::max();
    clock::ticks = 1'000;
    CHECK(deadline_after<clock>(5ns) == clock::now() + 5ns);
    CHECK(deadline_after<clock>(2h) == clock::now() + 2h);
    CHECK(deadline_after<clock>(0s) == clock::now());
    CHECK(deadline_after<clock>(-1s) == clock::now());
    CHECK(deadline_after<clock>(seconds::min()) == clock::now());
    CHECK(deadline_after<clock>(nanoseconds::max()) == max);
    CHECK(deadline_after<clock>(seconds::max()) == max);
    CHECK(deadline_after<clock>(hours::max()) == max);
    CHECK(deadline_after<clock>(duration<double>{1.5e-9}) == clock::now() + 2ns);
    CHECK(deadline_after<clock>(duration<double>{1e300}) == max);
    CHECK(deadline_after<clock>(duration<double>{std::numeric_limits<double>::infinity()}) == max);
    CHECK(deadline_after<clock>(duration<long long, std::ratio<1, 3>>{1}) ==
          clock::now() + 333'333'334ns);
    CHECK(deadline_after<clock>(duration<long long, std::ratio<1, 3>>::max()) == max);

    clock::ticks = nanoseconds::max().count() - 10;
    CHECK(deadline_after<clock>(9ns) == max - 1ns);
    CHECK(deadline_after<clock>(10ns) == max);
    CHECK(deadline_after<clock>(11ns) == max);
    CHECK(deadline_after<clock>(1s) == max);

    clock::ticks = nanoseconds::min().count();  // before the epoch: the whole range is ahead
    CHECK(deadline_after<clock>(nanoseconds::max()) == clock::now() + nanoseconds::max());
    CHECK(deadline_after<clock>(seconds::max()) == max);
  }
  SUBCASE("a microsecond clock (libc++'s system_clock)") {
    using clock = settable_clock<microseconds>;
    const auto max = clock::time_point::max();
    clock::ticks = 1'000;
    CHECK(deadline_after<clock>(1ns) == clock::now() + 1us);
    CHECK(deadline_after<clock>(1'000ns) == clock::now() + 1us);
    CHECK(deadline_after<clock>(1'001ns) == clock::now() + 2us);
    CHECK(deadline_after<clock>(nanoseconds::max()) ==
          clock::now() + std::chrono::ceil<microseconds>(nanoseconds::max()));
    CHECK(deadline_after<clock>(hours::max()) == max);

    clock::ticks = microseconds::max().count() - 1;
    CHECK(deadline_after<clock>(999ns) == max);
    CHECK(deadline_after<clock>(1'000ns) == max);
    CHECK(deadline_after<clock>(1'001ns) == max);
    CHECK(deadline_after<clock>(1s) == max);
    clock::ticks = microseconds::max().count() - 2;
    CHECK(deadline_after<clock>(1ns) == max - 1us);
  }
}

// Converted in its own Rep, a far time_point overflowed there and landed in
// the past (a wait on it timed out at once): float seconds rounded up past
// the clock's range, and a count of 1/1024 s was multiplied before it was
// divided.
TEST_CASE("a time_point's deadline is rounded up to the clock's tick and saturates at its range" *
          doctest::timeout(30)) {
  using std::chrono::duration;
  using std::chrono::nanoseconds;
  using std::chrono::time_point;
  using weft::detail::clock_deadline;
  using clock = settable_clock<nanoseconds>;
  const auto max = clock::time_point::max();
  const auto min = clock::time_point::min();
  using ticks_1024 = duration<long long, std::ratio<1, 1024>>;
  CHECK(clock_deadline(time_point<clock, ticks_1024>{ticks_1024{1}}) ==
        clock::time_point{976'563ns});
  CHECK(clock_deadline(time_point<clock, ticks_1024>{ticks_1024{-1}}) ==
        clock::time_point{-976'562ns});
  CHECK(clock_deadline(time_point<clock, duration<double>>{duration<double>{1.5e-9}}) ==
        clock::time_point{2ns});
  // 200 and 300 years on, in 1/1024 s: the clock's nanoseconds reach 292.
  constexpr long long year = 3600LL * 24 * 365;
  CHECK(clock_deadline(time_point<clock, ticks_1024>{ticks_1024{1024 * 200 * year}}) ==
        clock::time_point{std::chrono::seconds{200 * year}});
  CHECK(clock_deadline(time_point<clock, ticks_1024>{ticks_1024{1024 * 300 * year}}) == max);
  // Just inside the clock's range, in float seconds and double
  // milliseconds, whose own precision rounds them to 2^63 ns, past it.
  const auto far_float =
      clock_deadline(time_point<clock, duration<float>>{duration<float>{9223371776.0F}});
  CHECK(far_float >= clock::time_point{9'223'371'775'999'000'000ns});
  CHECK(far_float <= clock::time_point{9'223'371'776'001'000'000ns});
  const auto far_double = clock_deadline(time_point<clock, duration<double, std::milli>>{
      duration<double, std::milli>{9223372036854.7753906}});
  CHECK(far_double >= clock::time_point{9'223'372'036'854'775'000ns});
  const auto early_float =
      clock_deadline(time_point<clock, duration<float>>{duration<float>{-9223371776.0F}});
  CHECK(early_float <= clock::time_point{-9'223'371'775'999'000'000ns});
  CHECK(clock_deadline(time_point<clock, duration<float>>{duration<float>{1e19F}}) == max);
  CHECK(clock_deadline(time_point<clock, duration<float>>{duration<float>{-1e19F}}) == min);
  CHECK(clock_deadline(time_point<clock, duration<double>>{
            duration<double>{std::numeric_limits<double>::infinity()}}) == max);
}

namespace {
// A manual clock like weft::manual_clock (it drives its own timer_queue, the
// documented hook for test clocks), whose next now() can be made to pause
// after reading the time, so a test can move the clock at that exact point.
struct pausable_clock : weft_test::clock_types<pausable_clock> {
  [[maybe_unused]] static constexpr bool is_steady = true;

  static inline std::atomic<rep> ticks{0};
  static inline std::latch* time_read = nullptr;     // counted down by the paused now()
  static inline std::latch* may_return = nullptr;    // waited on by the paused now()
  static inline std::atomic<bool> pause_next{false};

  static time_point now() noexcept {
    const rep value = ticks.load();
    if (pause_next.exchange(false)) {
      time_read->count_down();
      may_return->wait();
    }
    return time_point{duration{value}};
  }
  static weft::detail::timer_queue<pausable_clock>& timers() noexcept {
    static weft::detail::timer_queue<pausable_clock> queue;
    return queue;
  }
  // As manual_clock::advance: move time, then fire what is due, before returning.
  static void advance(duration by) {
    const rep value = ticks.fetch_add(by.count()) + by.count();
    timers().fire_due(time_point{duration{value}});
  }
};
}  // namespace

TEST_CASE("a deadline made while the clock moves past it is not missed" * doctest::timeout(30)) {
  // A test clock's advance() fires every deadline it passes before it returns
  // (manual_clock's contract). with_deadline() reads now(), finds the deadline
  // still ahead, and schedules a timer. If the clock moves past the deadline
  // between those two steps, the advance finds no timer to fire and the timer
  // is scheduled with a deadline already past: nothing fires it until the
  // clock moves again, though now() >= deadline. Here the clock moves at
  // exactly that point.
  std::latch time_read{1};
  std::latch may_return{1};
  pausable_clock::time_read = &time_read;
  pausable_clock::may_return = &may_return;
  const auto deadline = pausable_clock::now() + 1ns;
  std::optional<weft::cancel_source> source;
  std::thread maker([&] {
    pausable_clock::pause_next.store(true);
    source.emplace(weft::with_deadline(weft::cancel_token{}, deadline));
  });
  time_read.wait();  // with_deadline has read the time and found the deadline ahead
  pausable_clock::advance(1ns);
  may_return.count_down();
  maker.join();
  REQUIRE(pausable_clock::now() >= deadline);
  CHECK(source->cancelled());
  // Moving the clock again fires it in any case; clean up either way.
  pausable_clock::advance(1ns);
  CHECK(source->cancelled());
  source.reset();
  CHECK(pausable_clock::timers().size() == 0);
}

TEST_CASE("a deadline created while another thread advances manual_clock is not missed" * doctest::timeout(60)) {
  // The same contract on weft::manual_clock itself, as a race: the two threads
  // run in lockstep and the advancer waits a little longer each round, so
  // that its advance() sweeps across the maker's with_deadline().
  const int rounds = under_sanitizer ? 2000 : 20000;
  std::atomic<int> phase{0};  // 2r+1: round r may start; 2r+2: round r's source is made; -1: stop
  std::optional<weft::cancel_source> source;
  manual_clock::time_point deadline;
  std::thread maker([&] {
    for (int round = 0; round < rounds; ++round) {
      busy_wait_until([&] {
        const int now_phase = phase.load(std::memory_order_acquire);
        return now_phase < 0 || now_phase >= 2 * round + 1;
      });
      if (phase.load(std::memory_order_acquire) < 0) return;
      source.emplace(weft::with_deadline(weft::cancel_token{}, deadline));
      phase.store(2 * round + 2, std::memory_order_release);
    }
  });
  int missed_round = -1;
  for (int round = 0; round < rounds; ++round) {
    source.reset();
    deadline = manual_clock::now() + 1ns;
    phase.store(2 * round + 1, std::memory_order_release);
    for (int i = 0; i < round % 128; ++i) weft::detail::cpu_relax();
    manual_clock::advance(1ns);
    busy_wait_until([&] { return phase.load(std::memory_order_acquire) == 2 * round + 2; });
    // Only this thread moves the clock (tests run one at a time), so
    // now() >= deadline here, and the advance above must have fired it.
    if (manual_clock::now() >= deadline && !source->cancelled()) {
      missed_round = round;
      phase.store(-1, std::memory_order_release);
      break;
    }
  }
  maker.join();
  manual_clock::advance(1ns);  // fires a missed one, so nothing is left behind
  source.reset();
  CHECK(missed_round == -1);
}

namespace {
struct blocking_timer : weft::detail::timer_node<manual_clock> {
  std::latch* entered = nullptr;
  std::latch* release = nullptr;
  std::atomic<bool>* finished = nullptr;
};
}  // namespace

TEST_CASE("cancelling a manual-clock timer waits for its running callback while other threads fire late timers" *
          doctest::timeout(30)) {
  // timer_queue::cancel's contract: after it returns, the node's callback is
  // not running. Timer X fires on the advancing thread and is held there;
  // meanwhile another thread's timed wait with a deadline already past goes
  // through schedule_timer, which may fire due timers on that thread too.
  // Then cancelling X must still wait for X's callback to finish.
  std::latch entered{1};
  std::latch release{1};
  std::latch cancelling{1};
  std::atomic<bool> finished{false};
  blocking_timer x;
  x.entered = &entered;
  x.release = &release;
  x.finished = &finished;
  x.deadline = manual_clock::now() + 1s;
  x.fire = [](weft::detail::timer_node<manual_clock>& node) noexcept {
    auto& self = static_cast<blocking_timer&>(node);
    self.entered->count_down();
    self.release->wait();
    for (int i = 0; i < 1000; ++i) std::this_thread::yield();
    self.finished->store(true);
  };
  weft::detail::schedule_timer(x);
  std::thread advancer([] { manual_clock::advance(1s); });
  entered.wait();  // X's callback is running on the advancer

  weft::cancel_source unrelated;
  CHECK(unrelated.token().wait_until(manual_clock::now()) == wait_status::timeout);

  std::thread releaser([&] {
    cancelling.wait();
    for (int i = 0; i < 1000; ++i) std::this_thread::yield();
    release.count_down();
  });
  cancelling.count_down();
  weft::detail::cancel_timer(x);  // must block until X's callback has returned
  CHECK(finished.load());
  releaser.join();
  advancer.join();
}

// ---------------------------------------------------------------------------
// Deadlines (steady_clock): the timer thread

TEST_CASE("a steady_clock deadline fires by itself, running callbacks on another thread and waking waiters" *
          doctest::timeout(30)) {
  auto source = weft::with_timeout(weft::cancel_token{}, 20ms);
  const auto token = source.token();
  std::atomic<std::thread::id> ran_on{};
  std::atomic<int> runs{0};
  auto registration = weft::on_cancel(token, [&] {
    ran_on.store(std::this_thread::get_id());
    runs.fetch_add(1);
  });
  // Waiting for the deadline to happen, not sleeping to make it happen.
  CHECK(token.wait() == wait_status::ok);
  CHECK(token.cancelled());
  CHECK(token.cause().is_deadline());
  CHECK(runs.load() == 1);
  CHECK(ran_on.load() != std::this_thread::get_id());
}

TEST_CASE("several steady_clock deadlines fire, the earliest first" * doctest::timeout(30)) {
  // Scheduled latest first, so firing in the order of scheduling would show.
  auto late = weft::with_timeout(weft::cancel_token{}, 60ms);
  auto early = weft::with_timeout(weft::cancel_token{}, 10ms);
  auto never = weft::with_timeout(weft::cancel_token{}, 24h);
  std::mutex mutex;
  std::vector<std::string> fired;
  std::latch both_fired{2};
  const auto record = [&](const char* name) {
    return [&, name] {
      {
        const std::lock_guard guard(mutex);
        fired.emplace_back(name);
      }
      both_fired.count_down();
    };
  };
  auto on_late = weft::on_cancel(late.token(), record("late"));
  auto on_early = weft::on_cancel(early.token(), record("early"));
  both_fired.wait();
  CHECK(late.token().cause().is_deadline());
  CHECK(early.token().cause().is_deadline());
  CHECK_FALSE(never.cancelled());
  const std::lock_guard guard(mutex);
  CHECK(fired == std::vector<std::string>{"early", "late"});
}

namespace {
// A field of a thread's /proc status ("SigBlk", a mask in hexadecimal;
// "voluntary_ctxt_switches", a count in decimal).
std::uint64_t status_field(const std::string& task, const std::string& field, int base) {
  std::ifstream status(task + "/status");
  for (std::string line; std::getline(status, line);) {
    if (line.rfind(field + ":", 0) == 0) {
      return std::stoull(line.substr(field.size() + 1), nullptr, base);
    }
  }
  FAIL("no " << field << " in " << task << "/status");
  return 0;
}

// The blocked-signal masks of this process's threads whose name is `name`,
// each read once its thread has slept: glibc starts a thread with every
// signal blocked and sets the mask it inherited only as the thread begins
// to run, so a thread just made shows every signal blocked.
std::vector<std::uint64_t> blocked_signals_of_threads_named(const std::string& name) {
  std::vector<std::uint64_t> masks;
  const std::unique_ptr<DIR, int (*)(DIR*)> tasks{opendir("/proc/self/task"), &closedir};
  REQUIRE(tasks != nullptr);
  while (const dirent* task = readdir(tasks.get())) {
    const std::string path = std::string("/proc/self/task/") + task->d_name;
    std::ifstream comm(path + "/comm");
    std::string thread_name;
    if (!std::getline(comm, thread_name) || thread_name != name) continue;
    weft_test::spin_until([&] { return status_field(path, "voluntary_ctxt_switches", 10) > 0; });
    masks.push_back(status_field(path, "SigBlk", 16));
  }
  return masks;
}

constexpr bool blocks(std::uint64_t mask, int signal) noexcept {
  return (mask >> (signal - 1) & 1) != 0;
}
}  // namespace

// A program that takes its signals in one thread blocks them in the others;
// a timer or ticker thread that weft started before it did must not take
// them (SIGTERM's default action would end the process there).
TEST_CASE(
    "weft's own threads block the signals sent to the process, and leave the caller's mask alone" *
    doctest::timeout(30)) {
  sigset_t caller_mask;
  REQUIRE(pthread_sigmask(SIG_SETMASK, nullptr, &caller_mask) == 0);
  REQUIRE_FALSE(sigismember(&caller_mask, SIGTERM));
  // Each starts its thread if no earlier test has.
  const auto pending = weft::with_timeout(weft::cancel_token{}, 24h);
  (void)weft::detail::registry_clock.now_ns();

  for (const std::string name : {"weft-timer", "weft-clock"}) {
    CAPTURE(name);
    const auto masks = blocked_signals_of_threads_named(name);
    REQUIRE_FALSE(masks.empty());
    for (const std::uint64_t mask : masks) {
      CHECK(blocks(mask, SIGTERM));
      CHECK(blocks(mask, SIGINT));
      CHECK(blocks(mask, SIGUSR1));
      CHECK_FALSE(blocks(mask, SIGSEGV));  // a crash still reaches its handler
      CHECK_FALSE(blocks(mask, SIGPROF));  // a profiler still samples the thread
    }
  }
  REQUIRE(pthread_sigmask(SIG_SETMASK, nullptr, &caller_mask) == 0);
  CHECK_FALSE(sigismember(&caller_mask, SIGTERM));
  CHECK_FALSE(pending.token().cancelled());
}

// ---------------------------------------------------------------------------
// Waiting

TEST_CASE("wait on a default-constructed token throws std::logic_error" * doctest::timeout(30)) {
  const weft::cancel_token token;
  CHECK_THROWS_AS(token.wait(), std::logic_error);
  CHECK_THROWS_AS(weft::wait(token), std::logic_error);
}

TEST_CASE("wait returns ok at once on a token that is already cancelled" * doctest::timeout(30)) {
  weft::cancel_source source;
  source.cancel();
  CHECK(source.token().wait() == wait_status::ok);
  CHECK(weft::wait(source.token()) == wait_status::ok);
  CHECK(source.token().wait_for(0s) == wait_status::ok);
  CHECK(source.token().wait_until(manual_clock::now() - 1s) == wait_status::ok);
  CHECK(weft::wait_until(source.token(), manual_clock::now()) == wait_status::ok);
}

TEST_CASE("wait returns ok when another thread cancels" * doctest::timeout(60)) {
  for (const int threads : fixed_thread_counts) {
    CAPTURE(threads);
    weft::cancel_source source;
    const auto token = source.token();
    std::atomic<int> ok{0};
    std::vector<std::thread> waiters;
    for (int i = 0; i < threads; ++i) {
      waiters.emplace_back([&, i] {
        const auto status = i % 2 == 0 ? token.wait() : weft::wait(token);
        if (status == wait_status::ok && token.cancelled()) ok.fetch_add(1);
      });
    }
    // Every waiter has registered its wake-up: they really are waiting.
    spin_until([&] { return callbacks_on(token) == static_cast<std::size_t>(threads); });
    source.cancel();
    for (auto& t : waiters) t.join();
    CHECK(ok.load() == threads);
    CHECK(callbacks_on(token) == 0);
  }
}

TEST_CASE("a waiter is woken by its parent's cancellation" * doctest::timeout(30)) {
  weft::cancel_source parent;
  auto child = parent.token().child();
  const auto token = child.token();
  wait_status status = wait_status::closed;
  std::thread waiter([&] { status = token.wait(); });
  spin_until([&] { return callbacks_on(token) == 1; });
  parent.cancel();
  waiter.join();
  CHECK(status == wait_status::ok);
}

TEST_CASE("wait_until on a manual clock times out when the clock passes the deadline" * doctest::timeout(30)) {
  weft::cancel_source source;
  const auto token = source.token();
  const auto deadline = manual_clock::now() + 5s;
  const auto timers_before = manual_clock::pending_timers();
  wait_status member = wait_status::closed;
  wait_status free_function = wait_status::closed;
  std::thread waiter([&] {
    member = token.wait_until(deadline);
    free_function = weft::wait_until(token, deadline);
  });
  wait_for_manual_timers(timers_before);
  manual_clock::advance(5s);
  waiter.join();
  CHECK(member == wait_status::timeout);
  CHECK(free_function == wait_status::timeout);  // deadline already past: at once
  CHECK_FALSE(token.cancelled());
  CHECK(callbacks_on(token) == 0);
  CHECK(manual_clock::pending_timers() == timers_before);
}

TEST_CASE("wait_until on a manual clock returns ok when cancelled before the deadline" * doctest::timeout(30)) {
  weft::cancel_source source;
  const auto token = source.token();
  const auto deadline = manual_clock::now() + 5s;
  const auto timers_before = manual_clock::pending_timers();
  wait_status status = wait_status::closed;
  std::thread waiter([&] { status = token.wait_until(deadline); });
  wait_for_manual_timers(timers_before);
  spin_until([&] { return callbacks_on(token) == 1; });
  manual_clock::advance(4s);  // not yet
  source.cancel();
  waiter.join();
  CHECK(status == wait_status::ok);
  CHECK(manual_clock::pending_timers() == timers_before);
}

TEST_CASE("wait_until on a default-constructed token times out at the deadline" * doctest::timeout(30)) {
  const weft::cancel_token token;
  const auto deadline = manual_clock::now() + 1s;
  const auto timers_before = manual_clock::pending_timers();
  wait_status status = wait_status::closed;
  std::thread waiter([&] { status = token.wait_until(deadline); });
  wait_for_manual_timers(timers_before);
  manual_clock::advance(1s);
  waiter.join();
  CHECK(status == wait_status::timeout);
}

TEST_CASE("wait_for and wait_until with a deadline already past time out at once" * doctest::timeout(30)) {
  weft::cancel_source source;
  const auto token = source.token();
  CHECK(token.wait_for(0s) == wait_status::timeout);
  CHECK(token.wait_for(-1s) == wait_status::timeout);
  CHECK(token.wait_until(manual_clock::now()) == wait_status::timeout);
  CHECK(token.wait_until(std::chrono::steady_clock::now() - 1s) == wait_status::timeout);
  CHECK(callbacks_on(token) == 0);
}

TEST_CASE("wait_for with a timeout too long for the clock waits until the token is cancelled" *
          doctest::timeout(30)) {
  weft::cancel_source source;
  const auto token = source.token();
  std::atomic<bool> returned{false};
  wait_status status = wait_status::closed;
  std::thread waiter([&] {
    status = token.wait_for(std::chrono::hours::max());
    returned = true;
  });
  spin_until([&] { return callbacks_on(token) == 1 || returned.load(); });
  CHECK_FALSE(returned.load());  // it waits instead of timing out at once
  source.cancel();
  waiter.join();
  CHECK(status == wait_status::ok);
}

TEST_CASE("a wait on a deadline token ends with ok when the deadline fires" * doctest::timeout(30)) {
  auto source = weft::with_timeout<manual_clock>(weft::cancel_token{}, 3s);
  const auto token = source.token();
  wait_status status = wait_status::closed;
  std::thread waiter([&] { status = token.wait(); });
  spin_until([&] { return callbacks_on(token) == 1; });
  manual_clock::advance(3s);
  waiter.join();
  CHECK(status == wait_status::ok);
  CHECK(token.cause().is_deadline());
}

// ---------------------------------------------------------------------------
// std::stop_token interop

#if defined(__cpp_lib_jthread)

TEST_CASE("a token's std::stop_token is stopped when the token is cancelled" * doctest::timeout(30)) {
  weft::cancel_source source;
  const auto stop = source.token().stop_token();
  CHECK(stop.stop_possible());
  CHECK_FALSE(stop.stop_requested());
  bool std_callback_ran = false;
  std::stop_callback std_callback(stop, [&] { std_callback_ran = true; });
  CHECK(source.token().stop_token() == stop);  // made once, then shared
  source.cancel();
  CHECK(stop.stop_requested());
  CHECK(std_callback_ran);
}

TEST_CASE("the std::stop_token of an already cancelled token is already stopped" * doctest::timeout(30)) {
  weft::cancel_source parent;
  auto child = parent.token().child();
  parent.cancel();
  CHECK(child.token().stop_token().stop_requested());
  CHECK(parent.token().stop_token().stop_requested());
}

TEST_CASE("a default token's std::stop_token can never stop" * doctest::timeout(30)) {
  CHECK_FALSE(weft::cancel_token{}.stop_token().stop_possible());
}

TEST_CASE("a child's std::stop_token is stopped by the parent's cancellation" * doctest::timeout(30)) {
  weft::cancel_source parent;
  auto child = parent.token().child();
  const auto stop = child.token().stop_token();
  parent.cancel();
  CHECK(stop.stop_requested());
}

TEST_CASE("a std::stop_token outlives the weft state it came from" * doctest::timeout(30)) {
  std::stop_token stop;
  {
    weft::cancel_source source;
    stop = source.token().stop_token();
  }
  CHECK_FALSE(stop.stop_requested());
}

TEST_CASE("from_stop_token gives a source cancelled when the std::stop_token is stopped" * doctest::timeout(30)) {
  std::stop_source std_source;
  auto source = weft::from_stop_token(std_source.get_token());
  const auto token = source.token();
  CHECK(token.can_be_cancelled());
  CHECK_FALSE(token.cancelled());
  int runs = 0;
  auto registration = weft::on_cancel(token, [&] { ++runs; });
  std_source.request_stop();
  CHECK(token.cancelled());
  CHECK(token.cause().code() == weft::errc::cancelled);
  CHECK(runs == 1);
}

TEST_CASE("from_stop_token of a stopped std::stop_token is already cancelled" * doctest::timeout(30)) {
  std::stop_source std_source;
  std_source.request_stop();
  auto source = weft::from_stop_token(std_source.get_token());
  CHECK(source.cancelled());
  CHECK(source.token().cause().code() == weft::errc::cancelled);
}

TEST_CASE("from_stop_token works one way: cancelling the weft source does not stop the std source" *
          doctest::timeout(30)) {
  std::stop_source std_source;
  auto source = weft::from_stop_token(std_source.get_token());
  source.cancel();
  CHECK_FALSE(std_source.stop_requested());

  auto never = weft::from_stop_token(std::stop_token{});
  CHECK_FALSE(never.cancelled());
  never.cancel();
  CHECK(never.cancelled());
}

TEST_CASE("a from_stop_token source may be destroyed while the std source stops on another thread" *
          doctest::timeout(60)) {
  const int rounds = under_sanitizer ? 200 : 2000;
  for (int round = 0; round < rounds; ++round) {
    std::stop_source std_source;
    std::optional<weft::cancel_source> source{weft::from_stop_token(std_source.get_token())};
    std::barrier start(2);
    std::thread stopper([&] {
      start.arrive_and_wait();
      std_source.request_stop();
    });
    start.arrive_and_wait();
    source.reset();
    stopper.join();
  }
}

TEST_CASE("a jthread's stop request cancels a weft wait" * doctest::timeout(30)) {
  wait_status status = wait_status::closed;
  std::atomic<bool> waiting{false};
  std::optional<weft::cancel_token> token;
  {
    std::jthread worker([&](std::stop_token stop) {
      auto source = weft::from_stop_token(std::move(stop));
      token = source.token();
      waiting.store(true);
      status = source.token().wait();
    });
    spin_until([&] { return waiting.load(); });
    spin_until([&] { return callbacks_on(*token) == 1; });
  }  // ~jthread: request_stop() and join()
  CHECK(status == wait_status::ok);
}

TEST_CASE("a weft token bridges to a std::jthread-style consumer and back" * doctest::timeout(30)) {
  weft::cancel_source source;
  auto round_trip = weft::from_stop_token(source.token().stop_token());
  CHECK_FALSE(round_trip.cancelled());
  source.cancel();
  CHECK(round_trip.cancelled());
}

#endif  // __cpp_lib_jthread

// ---------------------------------------------------------------------------
// Stress

TEST_CASE("registrations racing a cancel each run exactly once or are removed before running" *
          doctest::timeout(180)) {
  const int rounds = under_sanitizer ? 8 : 40;
  const int per_thread = under_sanitizer ? 100 : 300;
  for (const int threads : fixed_thread_counts) {
    CAPTURE(threads);
    for (int round = 0; round < rounds; ++round) {
      weft::cancel_source source;
      const auto token = source.token();
      std::atomic<bool> cancel_returned{false};
      std::latch cancel_done{1};
      std::barrier start(threads + 1);
      // runs[t][i]: how often registration i of thread t ran. Read after the
      // registration is gone, and again at the end: a callback that ran after
      // its registration was destroyed would show up as a change.
      std::vector<std::vector<std::atomic<int>>> runs(static_cast<std::size_t>(threads));
      std::vector<std::vector<int>> at_destruction(static_cast<std::size_t>(threads));
      std::atomic<int> failures{0};
      std::vector<std::thread> workers;
      for (int t = 0; t < threads; ++t) {
        auto& my_runs = runs[static_cast<std::size_t>(t)];
        auto& my_seen = at_destruction[static_cast<std::size_t>(t)];
        my_runs = std::vector<std::atomic<int>>(static_cast<std::size_t>(per_thread) + 1);
        my_seen.assign(static_cast<std::size_t>(per_thread), 0);
        workers.emplace_back([&, t] {
          start.arrive_and_wait();
          for (int i = 0; i < per_thread; ++i) {
            auto& counter = my_runs[static_cast<std::size_t>(i)];
            const bool cancelled_before = token.cancelled();
            {
              auto registration = weft::on_cancel(token, [&counter] { counter.fetch_add(1); });
              if (cancelled_before && counter.load() != 1) failures.fetch_add(1);
              if ((i + t) % 3 == 0) std::this_thread::yield();
              // Alive after cancel() returned: it must have run.
              if (cancel_returned.load() && counter.load() != 1) failures.fetch_add(1);
            }
            const int seen = counter.load();
            if (seen > 1) failures.fetch_add(1);
            my_seen[static_cast<std::size_t>(i)] = seen;
          }
          // One registration held across the cancel: it must run exactly once.
          auto& last = my_runs[static_cast<std::size_t>(per_thread)];
          auto held = weft::on_cancel(token, [&last] { last.fetch_add(1); });
          cancel_done.wait();
          if (last.load() != 1) failures.fetch_add(1);
        });
      }
      start.arrive_and_wait();
      for (int i = 0; i < (round % 4) * 50; ++i) std::this_thread::yield();
      source.cancel();
      cancel_returned.store(true);
      cancel_done.count_down();
      for (auto& w : workers) w.join();
      CHECK(failures.load() == 0);
      int ran = 0;
      int removed_unrun = 0;
      for (int t = 0; t < threads; ++t) {
        for (int i = 0; i < per_thread; ++i) {
          const int final_runs = runs[static_cast<std::size_t>(t)][static_cast<std::size_t>(i)].load();
          CHECK(final_runs == at_destruction[static_cast<std::size_t>(t)][static_cast<std::size_t>(i)]);
          (final_runs == 1 ? ran : removed_unrun) += 1;
        }
      }
      CHECK(ran + removed_unrun == threads * per_thread);
      CHECK(callbacks_on(token) == 0);
    }
  }
}

TEST_CASE("children made and destroyed while the parent is cancelled are all cancelled or detached" *
          doctest::timeout(180)) {
  const int rounds = under_sanitizer ? 8 : 40;
  const int per_thread = under_sanitizer ? 100 : 300;
  for (const int threads : fixed_thread_counts) {
    CAPTURE(threads);
    for (int round = 0; round < rounds; ++round) {
      weft::cancel_source parent;
      const auto token = parent.token();
      std::atomic<bool> cancel_returned{false};
      std::barrier start(threads + 1);
      std::atomic<int> failures{0};
      std::vector<std::thread> workers;
      for (int t = 0; t < threads; ++t) {
        workers.emplace_back([&, t] {
          start.arrive_and_wait();
          for (int i = 0; i < per_thread; ++i) {
            const bool cancelled_before = token.cancelled();
            auto child = (i + t) % 2 == 0 ? token.child() : weft::with_timeout<manual_clock>(token, 1h);
            if (cancelled_before && !child.cancelled()) failures.fetch_add(1);
            if (i % 5 == 0) std::this_thread::yield();
            if (cancel_returned.load()) {
              if (!child.cancelled()) failures.fetch_add(1);
              if (child.token().cause().code() != std::errc::operation_canceled) failures.fetch_add(1);
            }
          }
        });
      }
      start.arrive_and_wait();
      for (int i = 0; i < (round % 4) * 50; ++i) std::this_thread::yield();
      parent.cancel();
      cancel_returned.store(true);
      for (auto& w : workers) w.join();
      CHECK(failures.load() == 0);
      CHECK(callbacks_on(token) == 0);
    }
  }
}
