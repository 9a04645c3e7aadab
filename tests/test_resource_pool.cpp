// SPDX-License-Identifier: BSL-1.0
// Tests for weft::resource_pool (weft/resource_pool.hpp) and its async form
// (weft/asio/resource_pool.hpp), with fake resources that count themselves:
// limits, reuse, FIFO waiters, failures of open / validate / reset, expiry
// by lifetime and idle time on weft::manual_clock (nothing sleeps), run-time
// resizing, cancellation, and a stress that checks max_open is never
// exceeded and nothing leaks.
//
// Hand-offs: a thread has queued for a slot when stats().waiting goes up (it
// changes under the semaphore's mutex as the waiter is pushed); a timed
// waiter has armed its deadline when manual_clock::pending_timers() goes up.
#include <weft/asio/resource_pool.hpp>
#include <weft/cancel.hpp>
#include <weft/manual_clock.hpp>
#include <weft/registry.hpp>
#include <weft/resource_pool.hpp>
#include <weft/worker_pool.hpp>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/system/system_error.hpp>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <exception>
#include <latch>
#include <mutex>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <doctest/doctest.h>

#include "support.hpp"

using namespace std::chrono_literals;

namespace {

using weft::wait_status;
using weft_test::spin_until;

struct connection {
  int id = 0;
  bool broken = false;
};

// The server side of the fake: counts what is open, remembers the most ever
// open at once, and fails opens on request.
struct fake_server {
  std::atomic<int> next_id{0};
  std::atomic<int> open_now{0};
  std::atomic<int> most_open{0};
  std::atomic<int> closed{0};
  std::atomic<int> failures_to_inject{0};

  connection open() {
    if (failures_to_inject.load() > 0 && failures_to_inject.fetch_sub(1) > 0) {
      throw std::runtime_error("connection refused");
    }
    const int now = open_now.fetch_add(1) + 1;
    for (int seen = most_open.load(); seen < now && !most_open.compare_exchange_weak(seen, now);) {
    }
    return connection{next_id.fetch_add(1)};
  }

  void close(connection&) {
    open_now.fetch_sub(1);
    closed.fetch_add(1);
  }
};

template <class Clock = std::chrono::steady_clock>
weft::basic_resource_pool<connection, Clock> make_pool(fake_server& server, weft::resource_pool_options options,
                                                       std::function<bool(connection&)> validate = {},
                                                       std::function<void(connection&)> reset = {}) {
  return {options, [&server] { return server.open(); }, [&server](connection& c) { server.close(c); },
          std::move(validate), std::move(reset)};
}

using manual_pool = weft::basic_resource_pool<connection, weft::manual_clock>;

}  // namespace

TEST_CASE("resource_pool: bad configuration is reported at once") {
  fake_server server;
  CHECK_THROWS_AS(make_pool(server, {.max_open = 0}), std::invalid_argument);
  CHECK_THROWS_AS(make_pool(server, {.max_open = 1, .max_lifetime = -1s}), std::invalid_argument);
  CHECK_THROWS_AS(make_pool(server, {.max_open = 1, .max_idle_time = -1s}), std::invalid_argument);
  CHECK_THROWS_AS((weft::resource_pool<connection>{{.max_open = 1}, {}, [](connection&) {}}), std::invalid_argument);
  CHECK_THROWS_AS((weft::resource_pool<connection>{{.max_open = 1}, [] { return connection{}; }, {}}),
                  std::invalid_argument);
  auto pool = make_pool(server, {.max_open = 2});
  CHECK_THROWS_AS(pool.set_max_open(0), std::invalid_argument);
}

TEST_CASE("resource_pool: a returned resource is reused, and stats follow it") {
  fake_server server;
  {
    auto pool = make_pool(server, {.max_open = 3, .max_idle = 3, .name = "db"});
    CHECK(pool.name() == "db");
    int first = -1;
    {
      auto lease = pool.acquire();
      REQUIRE(lease);
      CHECK(lease.status() == wait_status::ok);
      first = lease->id;
      const auto s = pool.stats();
      CHECK(s.name == "db");
      CHECK(s.max_open == 3);
      CHECK(s.open == 1);
      CHECK(s.in_use == 1);
      CHECK(s.idle == 0);
    }
    CHECK(pool.stats().idle == 1);
    auto again = pool.acquire();
    CHECK(again->id == first);
    CHECK(server.next_id == 1);
  }
  CHECK(server.open_now == 0);  // the destructor closed the idle one
}

TEST_CASE("resource_pool: at most max_open exist, and try_acquire and timed acquires give up") {
  fake_server server;
  auto pool = make_pool<weft::manual_clock>(server, {.max_open = 2});
  auto a = pool.acquire();
  auto b = pool.acquire();
  auto none = pool.try_acquire();
  CHECK_FALSE(none);
  CHECK(none.status() == wait_status::timeout);

  const auto timers_before = weft::manual_clock::pending_timers();
  std::optional<manual_pool::lease> timed;
  std::thread waiter{[&] { timed.emplace(pool.acquire_for(5s)); }};
  spin_until([&] { return weft::manual_clock::pending_timers() > timers_before; });
  weft::manual_clock::advance(5s);
  waiter.join();
  REQUIRE(timed.has_value());
  CHECK_FALSE(*timed);
  CHECK(timed->status() == wait_status::timeout);
  CHECK(pool.stats().wait_count == 1);
  CHECK(server.most_open == 2);
  CHECK(pool.stats().waiting == 0);
}

TEST_CASE("resource_pool: waiters are served in arrival order") {
  fake_server server;
  auto pool = make_pool(server, {.max_open = 1, .max_idle = 1});
  auto held = std::optional{pool.acquire()};
  std::mutex order_mutex;
  std::vector<int> order;
  std::vector<std::thread> waiters;
  for (int i = 0; i < 4; ++i) {
    waiters.emplace_back([&, i] {
      auto lease = pool.acquire();
      std::lock_guard lock(order_mutex);
      order.push_back(i);
    });
    spin_until([&, i] { return pool.stats().waiting == static_cast<std::size_t>(i + 1); });
  }
  held.reset();
  for (auto& waiter : waiters) waiter.join();
  CHECK(order == std::vector<int>{0, 1, 2, 3});
  const auto s = pool.stats();
  CHECK(s.wait_count == 4);
  CHECK(s.open == 1);
  CHECK(server.next_id == 1);  // one connection served everybody
}

TEST_CASE("resource_pool: an open that throws reaches its acquirer and frees the slot") {
  fake_server server;
  auto pool = make_pool(server, {.max_open = 1});
  server.failures_to_inject = 1;
  CHECK_THROWS_WITH_AS((void)pool.acquire(), "connection refused", std::runtime_error);
  auto s = pool.stats();
  CHECK(s.open == 0);
  CHECK(s.in_use == 0);
  CHECK(s.open_failures == 1);
  CHECK(pool.acquire());  // the slot was not lost

  SUBCASE("and a waiter handed the slot gets the failure, not a hang") {
    auto held = std::optional{pool.acquire()};
    held->discard();  // broken: the slot is free but no resource is idle
    held = pool.acquire();
    server.failures_to_inject = 1;
    std::exception_ptr failure;
    std::thread waiter{[&] {
      try {
        (void)pool.acquire();
      } catch (...) {
        failure = std::current_exception();
      }
    }};
    spin_until([&] { return pool.stats().waiting == 1; });
    held->discard();
    waiter.join();
    CHECK(failure != nullptr);
    CHECK(pool.stats().open == 0);
    CHECK(pool.acquire());
  }
}

TEST_CASE("resource_pool: validate replaces broken resources at checkout, and discard closes one") {
  fake_server server;
  auto pool = make_pool(server, {.max_open = 2, .max_idle = 2}, [](connection& c) { return !c.broken; });
  int broken_id = -1;
  {
    auto lease = pool.acquire();
    broken_id = lease->id;
    lease->broken = true;  // the server dropped it while it sat idle, say
  }
  {
    auto lease = pool.acquire();
    CHECK(lease->id != broken_id);
    CHECK(pool.stats().validation_failures == 1);
    CHECK(server.closed == 1);
    lease.discard();
    CHECK_FALSE(lease);
  }
  CHECK(server.closed == 2);
  const auto s = pool.stats();
  CHECK(s.open == 0);
  CHECK(s.in_use == 0);

  SUBCASE("a validate that throws counts as a failure") {
    auto throwing = make_pool(server, {.max_open = 1}, [](connection&) -> bool { throw std::runtime_error("?"); });
    { auto lease = throwing.acquire(); }
    auto lease = throwing.acquire();
    CHECK(lease);
    CHECK(throwing.stats().validation_failures == 1);
  }
}

TEST_CASE("resource_pool: reset runs on return, and a reset that throws closes the resource") {
  fake_server server;
  std::atomic<int> resets{0};
  auto pool = make_pool(server, {.max_open = 2, .max_idle = 2}, {}, [&](connection& c) {
    resets.fetch_add(1);
    if (c.broken) throw std::runtime_error("cannot roll back");
  });
  { auto lease = pool.acquire(); }
  CHECK(resets == 1);
  CHECK(pool.stats().idle == 1);
  {
    auto lease = pool.acquire();
    lease->broken = true;
  }
  CHECK(resets == 2);
  CHECK(pool.stats().idle == 0);
  CHECK(server.open_now == 0);
}

TEST_CASE("resource_pool: a reset that returns false closes the resource") {
  fake_server server;
  weft::resource_pool<connection> pool{{.max_open = 1, .max_idle = 1},
                                       [&server] { return server.open(); },
                                       [&server](connection& c) { server.close(c); },
                                       {},
                                       [](connection& c) { return !c.broken; }};
  { auto fine = pool.acquire(); }
  CHECK(pool.stats().idle == 1);
  {
    auto lease = pool.acquire();
    lease->broken = true;
  }
  CHECK(pool.stats().idle == 0);
  CHECK(server.open_now == 0);
}

TEST_CASE("resource_pool: returns beyond max_idle are closed, unless someone waits") {
  fake_server server;
  auto pool = make_pool(server, {.max_open = 4, .max_idle = 1});
  {
    auto a = pool.acquire(), b = pool.acquire(), c = pool.acquire();
  }
  auto s = pool.stats();
  CHECK(s.idle == 1);
  CHECK(s.open == 1);
  CHECK(s.max_idle_closed == 2);

  pool.set_max_open(1);
  pool.set_max_idle(0);
  CHECK(pool.stats().max_idle_closed == 3);
  auto held = std::optional{pool.acquire()};
  const int held_id = (*held)->id;
  int waiter_got = -1;
  std::thread waiter{[&] { waiter_got = pool.acquire()->id; }};
  spin_until([&] { return pool.stats().waiting == 1; });
  held.reset();  // no idle room, but the waiter takes it
  waiter.join();
  CHECK(waiter_got == held_id);
  s = pool.stats();
  CHECK(s.max_idle_closed == 4);  // when the waiter returned it, nobody waited
  CHECK(s.open == 0);
}

TEST_CASE("resource_pool: resources past max_lifetime or max_idle_time are closed and replaced") {
  fake_server server;
  SUBCASE("lifetime, at return and at checkout") {
    auto pool = make_pool<weft::manual_clock>(server, {.max_open = 2, .max_idle = 2, .max_lifetime = 30min});
    auto young = std::optional{pool.acquire()};
    { auto other = pool.acquire(); }  // idle from now on
    weft::manual_clock::advance(30min);
    young.reset();  // too old to keep
    CHECK(pool.stats().max_lifetime_closed == 1);
    auto fresh = pool.acquire();  // the idle one is too old as well
    CHECK(pool.stats().max_lifetime_closed == 2);
    CHECK(fresh->id == 2);
    CHECK(server.open_now == 1);
  }
  SUBCASE("idle time, at checkout and by close_expired") {
    auto pool = make_pool<weft::manual_clock>(server, {.max_open = 3, .max_idle = 3, .max_idle_time = 5min});
    {
      auto a = pool.acquire(), b = pool.acquire(), c = pool.acquire();
    }
    weft::manual_clock::advance(4min);
    { auto kept_busy = pool.acquire(); }  // the newest idle one is used, and idles afresh
    weft::manual_clock::advance(1min);
    CHECK(pool.close_expired() == 2);
    auto s = pool.stats();
    CHECK(s.max_idle_time_closed == 2);
    CHECK(s.idle == 1);
    weft::manual_clock::advance(5min);
    auto lease = pool.acquire();
    CHECK(pool.stats().max_idle_time_closed == 3);
    CHECK(lease->id == 3);
  }
}

TEST_CASE("resource_pool: max_open can be raised and lowered while leases are out") {
  fake_server server;
  auto pool = make_pool(server, {.max_open = 4, .max_idle = 4});
  std::vector<weft::resource_pool<connection>::lease> out;
  for (int i = 0; i < 4; ++i) out.push_back(pool.acquire());

  pool.set_max_open(2);
  CHECK(pool.stats().max_open == 2);
  CHECK_FALSE(pool.try_acquire());
  out.pop_back();
  out.pop_back();  // both closed: the pool is above its new limit
  CHECK(server.open_now == 2);
  CHECK_FALSE(pool.try_acquire());

  std::thread waiter{[&] { auto lease = pool.acquire(); }};
  spin_until([&] { return pool.stats().waiting == 1; });
  pool.set_max_open(3);  // frees one slot at once, for the waiter
  waiter.join();
  CHECK(server.most_open <= 4);
  out.clear();
  const auto s = pool.stats();
  CHECK(s.open == 2);  // lowering max_open to 2 lowered max_idle to 2 as well
  CHECK(s.idle == 2);
  CHECK(s.max_idle_closed == 1);

  pool.set_max_idle(1);
  CHECK(pool.stats().idle == 1);
  CHECK(server.open_now == 1);
  pool.set_max_open(1);  // takes the free slots now
  auto last = pool.acquire();
  CHECK(last);
  CHECK_FALSE(pool.try_acquire());
}

// A returned slot is decided under the pool's lock and released after it,
// once the resource is closed; set_max_open used to take the free slots in
// between, miss these two, and owe them as well: with every lease back, a
// max_open of 1 then granted 2 leases.
TEST_CASE(
    "resource_pool: leases coming back while max_open is lowered leave exactly the new limit "
    "free") {
  std::latch in_close{2};
  std::latch let_close{1};
  std::atomic<bool> hold_closes{false};
  weft::resource_pool<int> pool{{.max_open = 2, .max_idle = 2},
                                [] { return 0; },
                                [&](int&) {
                                  if (hold_closes.load()) {
                                    in_close.count_down();
                                    let_close.wait();
                                  }
                                }};
  auto first = pool.acquire();
  auto second = pool.acquire();
  hold_closes = true;
  std::thread returning_first{[&] { first.discard(); }};
  std::thread returning_second{[&] { second.discard(); }};
  in_close.wait();  // both are past the lock, their slots not yet released
  pool.set_max_open(1);
  let_close.count_down();
  returning_first.join();
  returning_second.join();
  hold_closes = false;

  std::vector<weft::resource_pool<int>::lease> granted;
  while (auto lease = pool.try_acquire()) granted.push_back(std::move(lease));
  CHECK(granted.size() == 1);
  CHECK(pool.stats().in_use == 1);
  granted.clear();
  pool.set_max_open(3);
  while (auto lease = pool.try_acquire()) granted.push_back(std::move(lease));
  CHECK(granted.size() == 3);
}

// A resource not kept is closed while its lease still holds its slot, and
// the slot's return is decided after the close. It used to be decided
// first: a lowering during the close found the slot on its way back, and
// the release handed it to the queued waiter, one lease above the limit.
TEST_CASE("resource_pool: a lease closing as max_open is lowered pays the debt, not a waiter") {
  std::latch in_close{1};
  std::latch let_close{1};
  std::atomic<bool> hold_close{false};
  weft::resource_pool<int> pool{{.max_open = 2, .max_idle = 2},
                                [] { return 0; },
                                [&](int&) {
                                  if (hold_close.exchange(false)) {
                                    in_close.count_down();
                                    let_close.wait();
                                  }
                                }};
  auto first = pool.acquire();
  auto second = pool.acquire();
  std::atomic<bool> waiter_granted{false};
  std::thread waiter{[&] {
    auto lease = pool.acquire();
    waiter_granted = static_cast<bool>(lease);
  }};
  spin_until([&] { return pool.stats().waiting == 1; });
  hold_close = true;
  std::thread returning_first{[&] { first.discard(); }};
  in_close.wait();
  CHECK(pool.stats().in_use == 2);  // closing, it still holds its slot
  pool.set_max_open(1);
  let_close.count_down();
  returning_first.join();
  CHECK(pool.stats().waiting == 1);  // the closed lease's slot paid the debt
  CHECK(pool.stats().in_use == 1);
  second = {};  // now the waiter's turn
  waiter.join();
  CHECK(waiter_granted.load());
  CHECK(pool.stats().in_use == 0);
}

// A drain that acquired every slot of a lowered max_open destroyed the pool
// while a lease above the new limit was still in its close(), which then
// ran the pool's freed close function. That lease keeps its slot until its
// close() returns, so the drain cannot complete before it.
TEST_CASE("resource_pool: after max_open is lowered, a lease still closing holds its slot") {
  std::latch in_close{1};
  std::latch let_close{1};
  std::atomic<bool> hold_close{false};
  std::atomic<int> closes{0};
  weft::resource_pool<int> pool{{.max_open = 2},
                                [] { return 0; },
                                [&](int&) {
                                  if (hold_close.exchange(false)) {
                                    in_close.count_down();
                                    let_close.wait();
                                  }
                                  closes.fetch_add(1);
                                }};
  auto first = pool.acquire();
  auto second = pool.acquire();
  pool.set_max_open(1);
  hold_close = true;
  std::thread returning_first{[&] { first.release(); }};  // above the limit: closed
  in_close.wait();
  second.release();  // pays the debt
  CHECK_FALSE(pool.try_acquire());
  let_close.count_down();
  returning_first.join();
  auto drained = pool.try_acquire();
  CHECK(drained);
  CHECK_FALSE(pool.try_acquire());
  drained = {};
  CHECK(closes.load() == 2);
  CHECK(pool.stats().in_use == 0);
}

// As Go's WaitCount: acquires that had to wait. One whose deadline had
// passed, or acquire_for(0), waits for nothing.
TEST_CASE("resource_pool: a timed acquire that cannot wait is not counted as a wait") {
  weft::resource_pool<int> pool{{.max_open = 1}, [] { return 0; }, [](int&) {}};
  auto held = pool.acquire();
  CHECK(pool.acquire_for(0ms).status() == wait_status::timeout);
  CHECK(pool.acquire_until(std::chrono::steady_clock::now() - 1h).status() == wait_status::timeout);
  CHECK(pool.stats().wait_count == 0);
  CHECK(pool.stats().wait_duration == 0ns);
  held = {};
  CHECK(pool.acquire_for(0ms));  // free now: a deadline past still takes it
}

TEST_CASE("resource_pool: a task waiting for a slot shows in the registry as resource_pool \"name\"") {
  fake_server server;
  auto pool = make_pool(server, {.max_open = 1, .name = "orders-db"});
  auto held = std::optional{pool.acquire()};
  weft::worker_pool workers{{.workers = 1}};
  workers.post([&] { auto lease = pool.acquire(); });
  const auto blocked_on_pool = [] {
    for (const auto& task : weft::registry::snapshot()) {
      if (task.state == weft::task_state::blocked && task.blocked_on == "resource_pool \"orders-db\"") return true;
    }
    return false;
  };
  spin_until(blocked_on_pool);
  held.reset();
  workers.shutdown();
  CHECK(pool.stats().wait_count == 1);
}

TEST_CASE("resource_pool: a nested acquire on a full pool waits for its token, not forever") {
  fake_server server;
  auto pool = make_pool(server, {.max_open = 1});
  auto outer = pool.acquire();
  weft::cancel_source request;
  std::thread deadline{[&] {
    spin_until([&] { return pool.stats().waiting == 1; });
    request.cancel();  // what the request's deadline would do
  }};
  auto inner = pool.acquire(request.token());  // this thread holds the only slot
  deadline.join();
  CHECK_FALSE(inner);
  CHECK(inner.status() == wait_status::cancelled);
  CHECK(pool.stats().in_use == 1);
}

TEST_CASE("resource_pool: a cancelled acquire returns an empty lease and takes nothing") {
  fake_server server;
  auto pool = make_pool(server, {.max_open = 1});
  weft::cancel_source already;
  already.cancel();
  auto lease = pool.acquire(already.token());
  CHECK_FALSE(lease);
  CHECK(lease.status() == wait_status::cancelled);

  auto held = pool.acquire();
  weft::cancel_source later;
  std::optional<weft::resource_pool<connection>::lease> result;
  std::thread waiter{[&] { result.emplace(pool.acquire(later.token())); }};
  spin_until([&] { return pool.stats().waiting == 1; });
  later.cancel();
  waiter.join();
  CHECK(result->status() == wait_status::cancelled);
  held.release();
  CHECK(pool.acquire());
  CHECK(server.next_id == 1);
}

TEST_CASE("resource_pool: async_acquire completes on the handler's executor and shares the FIFO") {
  fake_server server;
  auto pool = make_pool(server, {.max_open = 1});
  boost::asio::io_context io;
  using lease_type = weft::resource_pool<connection>::lease;

  SUBCASE("a free slot completes through the executor, not inline") {
    bool done = false;
    weft::async_acquire(pool, boost::asio::bind_executor(io, [&](std::exception_ptr error, lease_type lease) {
                          CHECK(error == nullptr);
                          CHECK(lease);
                          done = true;
                        }));
    CHECK_FALSE(done);
    io.run();
    CHECK(done);
  }
  SUBCASE("a waiter is granted when a thread returns its lease") {
    auto held = std::optional{pool.acquire()};
    bool done = false;
    weft::async_acquire(pool, boost::asio::bind_executor(io, [&](std::exception_ptr error, lease_type lease) {
                          CHECK(error == nullptr);
                          CHECK(lease);
                          done = true;
                        }));
    CHECK(pool.stats().waiting == 1);
    held.reset();
    io.run();
    CHECK(done);
    CHECK(pool.stats().wait_count == 1);
  }
  SUBCASE("cancellation through the slot completes with errc::cancelled") {
    auto held = pool.acquire();
    boost::asio::cancellation_signal signal;
    std::exception_ptr failure;
    weft::async_acquire(pool, boost::asio::bind_cancellation_slot(
                                  signal.slot(), boost::asio::bind_executor(io, [&](std::exception_ptr error,
                                                                                    lease_type lease) {
                                    CHECK_FALSE(lease);
                                    failure = error;
                                  })));
    signal.emit(boost::asio::cancellation_type::terminal);
    io.run();
    REQUIRE(failure != nullptr);
    try {
      std::rethrow_exception(failure);
    } catch (const boost::system::system_error& e) {
      CHECK(e.code() == weft::errc::cancelled);
    }
    CHECK(pool.stats().waiting == 0);
  }
  SUBCASE("what open throws reaches the handler") {
    server.failures_to_inject = 1;
    std::exception_ptr failure;
    weft::async_acquire(pool, boost::asio::bind_executor(io, [&](std::exception_ptr error, lease_type lease) {
                          CHECK_FALSE(lease);
                          failure = error;
                        }));
    io.run();
    CHECK_THROWS_WITH_AS(std::rethrow_exception(failure), "connection refused", std::runtime_error);
    CHECK(pool.stats().open == 0);
  }
  SUBCASE("an io_context destroyed before running gives the slot back") {
    {
      boost::asio::io_context doomed;
      weft::async_acquire(pool, boost::asio::bind_executor(doomed, [](std::exception_ptr, lease_type) {}));
    }
    CHECK(pool.try_acquire());
  }
}

// An async acquire holds its slot from the grant until its handler runs on
// its executor. If that executor's context is destroyed first, the slot
// must go back the way a lease's does, so that a max_open lowered meanwhile
// keeps it: it used to go straight back to the pool's semaphore, and the pool
// then granted one lease more than its new limit.
TEST_CASE("resource_pool: an async acquire dropped with its io_context pays a lowered max_open") {
  using lease_type = weft::resource_pool<int>::lease;
  weft::resource_pool<int> pool{{.max_open = 2}, [] { return 0; }, [](int&) {}};
  std::vector<lease_type> granted;

  SUBCASE("granted at once") {
    {
      boost::asio::io_context doomed;
      weft::async_acquire(
          pool, boost::asio::bind_executor(doomed, [](std::exception_ptr, lease_type) {}));
      granted.push_back(pool.acquire());
      pool.set_max_open(1);  // owed: the slot the handler holds
    }
  }
  SUBCASE("granted by a returning lease") {
    auto first = pool.acquire();
    granted.push_back(pool.acquire());
    {
      boost::asio::io_context doomed;
      weft::async_acquire(
          pool, boost::asio::bind_executor(doomed, [](std::exception_ptr, lease_type) {}));
      REQUIRE(pool.stats().waiting == 1);
      first = {};  // its slot goes to the waiting handler
      pool.set_max_open(1);
    }
  }
  while (auto lease = pool.try_acquire()) granted.push_back(std::move(lease));
  CHECK(granted.size() == 1);
  granted.clear();
  while (auto lease = pool.try_acquire()) granted.push_back(std::move(lease));
  CHECK(granted.size() == 1);
}

// The held slot of an async acquire whose handler never ran went back to
// the semaphore, and so to a queued thread, while a lowered max_open was
// owed: two leases out under a max_open of 1.
TEST_CASE(
    "resource_pool: an async acquire dropped with its io_context pays the debt before a waiter") {
  using lease_type = weft::resource_pool<int>::lease;
  weft::resource_pool<int> pool{{.max_open = 2}, [] { return 0; }, [](int&) {}};
  auto first = pool.acquire();
  std::atomic<bool> waiter_granted{false};
  std::thread waiter;
  {
    boost::asio::io_context doomed;
    weft::async_acquire(pool,
                        boost::asio::bind_executor(doomed, [](std::exception_ptr, lease_type) {}));
    waiter = std::thread{[&] {
      auto lease = pool.acquire();
      waiter_granted = static_cast<bool>(lease);
    }};
    spin_until([&] { return pool.stats().waiting == 1; });
    pool.set_max_open(1);  // owed: the slot the handler holds
  }
  CHECK(pool.stats().waiting == 1);
  first = {};
  waiter.join();
  CHECK(waiter_granted.load());
  std::vector<lease_type> granted;
  while (auto lease = pool.try_acquire()) granted.push_back(std::move(lease));
  CHECK(granted.size() == 1);
}

TEST_CASE("resource_pool: under concurrent use max_open is never exceeded and nothing leaks") {
  fake_server server;
  constexpr int threads = 8;
  const int rounds = weft_test::under_sanitizer ? 1'000 : 10'000;
  {
    auto pool = make_pool(server, {.max_open = 3, .max_idle = 2},
                          [](connection& c) { return c.id % 7 != 3; });  // some never validate
    std::latch start{threads};
    std::vector<std::thread> workers;
    for (int t = 0; t < threads; ++t) {
      workers.emplace_back([&, t] {
        std::minstd_rand random{static_cast<unsigned>(t) + 1};
        start.arrive_and_wait();
        for (int i = 0; i < rounds; ++i) {
          weft::cancel_source source;
          const auto choice = random() % 16;
          if (choice == 0) source.cancel();
          if (choice == 1) server.failures_to_inject.store(1);
          try {
            auto lease = choice < 4 ? pool.acquire(source.token()) : pool.acquire();
            if (lease && random() % 8 == 0) lease.discard();
            if (i % 512 == 0 && t == 0) pool.set_max_open(2 + random() % 3);
          } catch (const std::runtime_error&) {  // an injected open failure
          }
        }
      });
    }
    for (auto& worker : workers) worker.join();
    const auto s = pool.stats();
    CHECK(s.in_use == 0);
    CHECK(s.waiting == 0);
    CHECK(s.open == s.idle);
    CHECK(static_cast<int>(s.open) == server.open_now);
    CHECK(server.most_open <= 4);
  }
  CHECK(server.open_now == 0);
}
