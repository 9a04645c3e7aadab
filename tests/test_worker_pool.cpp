// SPDX-License-Identifier: BSL-1.0
// Tests for weft::worker_pool (weft/worker_pool.hpp): construction errors,
// exactly-once execution, submit and its futures, the three overflow
// policies on a queue made full deterministically, post with a token,
// posting from a worker into its own full pool, the error handler, shutdown
// and shutdown_now, destruction while idle or busy, join from a worker, the
// executor, stats, and the default pool.
//
// Nothing here sleeps. A queue is made full by holding every worker inside a
// task that waits on a gate (an atomic flag the test sets), then posting
// exactly queue_capacity tasks. A test knows that:
//   - a worker is running a task when the task itself says so (an atomic);
//   - a producer is parked inside post(f, token) when the token's cancel
//     state holds its callback (detail::cancel_state::callback_count, a
//     hook for tests: the pool registers it only after it queued the
//     producer for room);
//   - a producer is waiting for room inside a plain post() when the task
//     registry lists it as blocked on `worker_pool "name" post`: the producer runs
//     as a task of a pool of its own, and the pool marks it blocked once it
//     has stopped spinning and waits in the room queue, from where only a
//     freed slot or shutdown brings it back.
#include <weft/cancel.hpp>
#include <weft/manual_clock.hpp>
#include <weft/registry.hpp>
#include <weft/wait_group.hpp>
#include <weft/wait_status.hpp>
#include <weft/worker_pool.hpp>

#include <algorithm>
#include <any>
#include <array>
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
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>


#include <doctest/doctest.h>

#include "support.hpp"

using namespace std::chrono_literals;

namespace {

using weft::wait_status;
using weft_test::callbacks_on;
using weft_test::spin_until;
using weft_test::under_sanitizer;

// 1, 2, 3, 8, and more than the cores.
std::vector<std::size_t> worker_counts() {
  const std::size_t cores = std::max(1u, std::thread::hardware_concurrency());
  return {1, 2, 3, 8, std::max<std::size_t>(9, 2 * cores + 1)};
}

// Holds workers inside tasks until opened. Plain atomics, and declared
// before the pool in every test, so it outlives the workers that wait on it
// (a gate on a std::shared_future would be freed through libc++'s shared
// count, which ThreadSanitizer does not see).
struct atomic_gate {
  std::atomic<std::size_t> held{0};
  std::atomic<bool> opened{false};
  void wait() const { opened.wait(false); }
  void open() {
    opened.store(true);
    opened.notify_all();
  }
};

// Occupies every worker of `pool` with a task that waits on `g`; returns
// once all of them are running (so the queue is empty and stays so until
// the test posts).
void hold_all_workers(weft::worker_pool& pool, atomic_gate& g) {
  const std::size_t before = g.held.load();
  for (std::size_t i = 0; i < pool.size(); ++i) {
    pool.post([&g] {
      g.held.fetch_add(1);
      g.wait();
    });
  }
  spin_until([&] { return g.held.load() == before + pool.size(); });
}

// Live instances of `counted` made from one `instances`: proves that every
// task object the pool took (run, dropped or rejected) was destroyed.
struct instances {
  std::atomic<int> live{0};
  std::atomic<int> made{0};
};

class counted {
 public:
  explicit counted(instances& owner) noexcept : owner_(&owner) {
    owner_->live.fetch_add(1);
    owner_->made.fetch_add(1);
  }
  counted(const counted& other) noexcept : owner_(other.owner_) { owner_->live.fetch_add(1); }
  counted(counted&& other) noexcept : owner_(other.owner_) { owner_->live.fetch_add(1); }
  counted& operator=(const counted&) = delete;
  counted& operator=(counted&&) = delete;
  ~counted() { owner_->live.fetch_sub(1); }

 private:
  instances* owner_;
};

// A call that is expected to block in post(), run as the only task of a
// pool of its own, so that the task registry tells when it waits for room.
class blocking_call {
 public:
  template <class Body>
  explicit blocking_call(Body body) : runner_{{.workers = 1, .name = unique_name()}} {
    runner_.post([this, body = std::move(body)]() mutable {
      body();
      returned_.store(true);
    });
  }

  blocking_call(const blocking_call&) = delete;
  blocking_call& operator=(const blocking_call&) = delete;

  // Waits until the call returned or the registry lists it as waiting for
  // room in a pool.
  void wait_until_parked_or_returned() const {
    spin_until([&] {
      if (returned_.load()) return true;
      for (const auto& task : weft::registry::snapshot()) {
        if (task.name == runner_.name() && task.state == weft::task_state::blocked &&
            task.blocked_on.starts_with("worker_pool ") && task.blocked_on.ends_with(" post")) {
          return true;
        }
      }
      return false;
    });
  }

  bool returned() const { return returned_.load(); }
  void join() {
    runner_.shutdown();
    runner_.join();
  }

 private:
  static std::string unique_name() {
    static std::atomic<int> next{0};
    return "blocking-call-" + std::to_string(next.fetch_add(1));
  }

  std::atomic<bool> returned_{false};
  weft::worker_pool runner_;
};

// Waits until `pool` has finished (completed counted, busy flag cleared)
// `completed` tasks. Counters move right after the task body returns, so a
// test that saw the body's effect waits for them here.
void wait_for_completed(const weft::worker_pool& pool, std::uint64_t completed) {
  spin_until([&] {
    const auto s = pool.stats();
    return s.completed >= completed && s.busy == 0;
  });
}

// Runs f on `pool` and returns its result, through a promise that lives
// here: the worker only sets it, and this thread frees it.
template <class F>
auto run_on(weft::worker_pool& pool, F f) {
  using result = decltype(f());
  std::promise<result> promise;
  auto future = promise.get_future();
  pool.post([&promise, &f] {
    if constexpr (std::is_void_v<result>) {
      f();
      promise.set_value();
    } else {
      promise.set_value(f());
    }
  });
  return future.get();
}

// weft_test::future_sink (see there why) for one thread and futures of any
// type, handing back a shared_future that the test reads later.
class future_keeper {
 public:
  template <class T>
  std::shared_future<T> operator()(std::future<T> future) {
    std::shared_future<T> shared = future.share();
    kept_.emplace_back(shared);
    return shared;
  }

 private:
  std::vector<std::any> kept_;
};

struct task_error : std::runtime_error {
  task_error(const char* what, int code_) : std::runtime_error(what), code(code_) {}
  int code;
};

int forty_two() { return 42; }
std::atomic<int> free_function_calls{0};
void free_function() { free_function_calls.fetch_add(1); }

}  // namespace

// ---------------------------------------------------------------------------
// Construction

TEST_CASE(
    "worker_pool with zero workers, zero queue capacity or no overflow policy throws "
    "invalid_argument" *
    doctest::timeout(60)) {
  CHECK_THROWS_AS(weft::worker_pool({.workers = 0}), std::invalid_argument);
  CHECK_THROWS_AS(weft::worker_pool({.workers = 2, .queue_capacity = 0}), std::invalid_argument);
  CHECK_THROWS_AS(weft::worker_pool({.workers = 0, .queue_capacity = 0}), std::invalid_argument);
  try {
    weft::worker_pool pool{{.workers = 0, .name = "zero-workers"}};
    FAIL("workers = 0 was accepted");
  } catch (const std::invalid_argument& error) {
    const std::string what = error.what();
    CHECK(what.find("workers") != std::string::npos);
    CHECK(what.find("zero-workers") != std::string::npos);
  }
  try {
    weft::worker_pool pool{{.workers = 1, .queue_capacity = 0}};
    FAIL("queue_capacity = 0 was accepted");
  } catch (const std::invalid_argument& error) {
    CHECK(std::string(error.what()).find("queue_capacity") != std::string::npos);
  }
  // A value cast into the enum: a full queue would otherwise drop its task.
  try {
    weft::worker_pool pool{{.workers = 1, .on_full = static_cast<weft::overflow>(7)}};
    FAIL("an out-of-range overflow policy was accepted");
  } catch (const std::invalid_argument& error) {
    CHECK(std::string(error.what()).find("on_full") != std::string::npos);
  }
}

// Called on a worker, a null function pointer ended the process there.
TEST_CASE("worker_pool refuses a null function pointer as a task with invalid_argument" *
          doctest::timeout(60)) {
  weft::worker_pool pool{{.workers = 1}};
  void (*no_function)() = nullptr;
  int (*no_result)() = nullptr;
  CHECK_THROWS_AS(pool.post(no_function), std::invalid_argument);
  CHECK_THROWS_AS((void)pool.try_post(no_function), std::invalid_argument);
  CHECK_THROWS_AS((void)pool.post(no_function, weft::cancel_token{}), std::invalid_argument);
  CHECK_THROWS_AS((void)pool.submit(no_result), std::invalid_argument);
  CHECK(pool.stats().submitted == 0);
  CHECK(pool.submit(+[] { return 7; }).get() == 7);
}

TEST_CASE("worker_pool reports the options it was built with" * doctest::timeout(60)) {
  weft::worker_pool pool{{.workers = 3, .queue_capacity = 5, .on_full = weft::overflow::caller_runs, .name = "opts"}};
  CHECK(pool.size() == 3);
  CHECK(pool.queue_capacity() == 5);
  CHECK(pool.overflow_policy() == weft::overflow::caller_runs);
  CHECK(pool.name() == "opts");
  CHECK_FALSE(pool.is_shutdown());
  const auto s = pool.stats();
  CHECK(s.workers == 3);
  CHECK(s.submitted == 0);
  CHECK(s.completed == 0);
  CHECK(s.queued == 0);

  weft::worker_pool smallest{{.workers = 1, .queue_capacity = 1}};
  CHECK(run_on(smallest, [] { return 1; }) == 1);
}

// ---------------------------------------------------------------------------
// Running tasks

TEST_CASE("worker_pool runs every posted task exactly once, on a worker, for 1 to many workers and producers" *
          doctest::timeout(120)) {
  const int per_producer = under_sanitizer ? 150 : 1500;
  for (const std::size_t workers : worker_counts()) {
    for (const int producers : {1, 3, 8}) {
      CAPTURE(workers);
      CAPTURE(producers);
      // A small queue, so producers also meet backpressure.
      // Declared before the pool, so they outlive its workers.
      weft::wait_group done;
      const int total = producers * per_producer;
      std::vector<std::atomic<int>> runs(static_cast<std::size_t>(total));
      std::atomic<int> off_pool{0};
      weft::worker_pool pool{{.workers = workers, .queue_capacity = 4}};
      done.add(total);
      std::vector<std::thread> threads;
      for (int p = 0; p < producers; ++p) {
        threads.emplace_back([&, p] {
          for (int i = 0; i < per_producer; ++i) {
            const int id = p * per_producer + i;
            pool.post([&, id] {
              if (!pool.running_in_this_thread()) off_pool.fetch_add(1);
              runs[static_cast<std::size_t>(id)].fetch_add(1);
              done.done();
            });
          }
        });
      }
      for (auto& t : threads) t.join();
      done.wait();
      int not_once = 0;
      for (auto& r : runs) not_once += r.load() == 1 ? 0 : 1;
      CHECK(not_once == 0);
      CHECK(off_pool.load() == 0);
      wait_for_completed(pool, static_cast<std::uint64_t>(total));
      const auto s = pool.stats();
      CHECK(s.submitted == static_cast<std::uint64_t>(total));
      CHECK(s.completed == static_cast<std::uint64_t>(total));
      CHECK(s.failed == 0);
      CHECK(s.rejected == 0);
      CHECK(s.dropped == 0);
      CHECK(s.queued == 0);
      // The queue, and what each worker holds from a claim of it.
      CHECK(s.peak_queued <= 4 * (1 + workers));
    }
  }
}

// From a deep queue a worker claims a run of tasks and holds the ones it has
// not started. Here the first of a pair waits until the second has run: if
// one worker holds both, only another worker taking the second from it lets
// the first finish. The pair sits behind 64 tasks that workers, let go at
// once from a gate, take in runs of up to 16, so most rounds put both in one
// run (a round that does not still passes).
TEST_CASE("worker_pool: a task that a worker claimed behind one that blocks is run by a free worker" *
          doctest::timeout(60)) {
  constexpr int rounds = 20;
  std::array<atomic_gate, rounds> gates;  // outlive the pool's workers
  weft::worker_pool pool{{.workers = 2, .queue_capacity = 256}};
  for (auto& round_gate : gates) {
    hold_all_workers(pool, round_gate);
    std::atomic<int> ran{0};
    std::atomic<bool> second_ran{false};
    for (int i = 0; i < 64; ++i) pool.post([&] { ran++; });
    pool.post([&] {
      second_ran.wait(false);
      ran++;
    });
    pool.post([&] {
      second_ran.store(true);
      second_ran.notify_all();
      ran++;
    });
    for (int i = 0; i < 64; ++i) pool.post([&] { ran++; });
    round_gate.open();
    spin_until([&] { return ran.load() == 130; });
  }
}

TEST_CASE("worker_pool makes everything written before post visible inside the task" * doctest::timeout(60)) {
  future_keeper kept;  // before the pool: see future_keeper
  weft::worker_pool pool{{.workers = 2, .queue_capacity = 8}};
  for (int round = 0; round < 50; ++round) {
    std::vector<int> data(256);  // plain memory: TSan checks the ordering
    std::iota(data.begin(), data.end(), round);
    auto sum = kept(pool.submit([&data] { return std::accumulate(data.begin(), data.end(), 0L); }));
    CHECK(sum.get() == 256L * round + 255L * 256L / 2);
  }
}

TEST_CASE("worker_pool submit returns the value, completes a void future and carries the exception" *
          doctest::timeout(60)) {
  future_keeper kept;  // before the pool: see future_keeper
  weft::worker_pool pool{{.workers = 2}};
  std::atomic<int> handler_calls{0};
  pool.set_error_handler([&](std::exception_ptr) { handler_calls.fetch_add(1); });

  CHECK(kept(pool.submit([] { return 42; })).get() == 42);
  CHECK(kept(pool.submit([] { return std::string("text"); })).get() == "text");

  std::atomic<bool> ran{false};
  auto done = kept(pool.submit([&] { ran.store(true); }));
  done.get();
  CHECK(ran.load());

  auto failing = kept(pool.submit([]() -> int { throw task_error("from submit", 17); }));
  try {
    (void)failing.get();
    FAIL("the exception did not reach the future");
  } catch (const task_error& error) {
    CHECK(std::string(error.what()) == "from submit");
    CHECK(error.code == 17);
  }
  auto failing_void = kept(pool.submit([] { throw 5; }));
  CHECK_THROWS_AS(failing_void.get(), int);

  wait_for_completed(pool, 5);
  const auto s = pool.stats();
  CHECK(s.failed == 2);
  CHECK(s.completed == 5);
  // A submit() exception belongs to the future, not to the error handler.
  CHECK(handler_calls.load() == 0);
}

TEST_CASE("worker_pool takes move-only callables and move-only results" * doctest::timeout(60)) {
  future_keeper kept;  // before the pool: see future_keeper
  // A promise is move-only too: the classic "packaged task in a pool" shape.
  // Its future is shared and declared before the pool, like `kept`.
  std::promise<std::string> promise;
  const std::shared_future<std::string> future = promise.get_future().share();
  weft::worker_pool pool{{.workers = 1}};
  auto owned = std::make_unique<int>(7);
  CHECK(kept(pool.submit([p = std::move(owned)] { return *p * 6; })).get() == 42);

  const std::unique_ptr<int>& result = kept(pool.submit([] { return std::make_unique<int>(9); })).get();
  REQUIRE(result != nullptr);
  CHECK(*result == 9);

  std::promise<int> seen;
  pool.post([p = std::make_unique<int>(3), &seen] { seen.set_value(*p); });
  CHECK(seen.get_future().get() == 3);

  pool.post([promise = std::move(promise)]() mutable { promise.set_value("through a moved promise"); });
  CHECK(future.get() == "through a moved promise");
}

TEST_CASE("worker_pool runs plain functions and std::function objects" * doctest::timeout(60)) {
  future_keeper kept;  // before the pool: see future_keeper
  weft::worker_pool pool{{.workers = 1}};
  CHECK(kept(pool.submit(forty_two)).get() == 42);
  CHECK(kept(pool.submit(&forty_two)).get() == 42);
  const int before = free_function_calls.load();
  kept(pool.submit(free_function)).get();
  pool.post(&free_function);
  std::function<void()> wrapped = free_function;
  pool.post(wrapped);                      // copied from an lvalue
  CHECK(static_cast<bool>(wrapped));       // the caller's copy is intact
  kept(pool.submit([] {})).get();                // one worker: everything before it ran
  CHECK(free_function_calls.load() == before + 3);
}

TEST_CASE("worker_pool runs tasks with captures larger than the inline buffer and destroys them" *
          doctest::timeout(60)) {
  future_keeper kept;  // before the pool: see future_keeper
  weft::worker_pool pool{{.workers = 2}};
  std::array<std::uint64_t, 16> big{};  // 128 bytes, well past five pointers
  for (std::size_t i = 0; i < big.size(); ++i) big[i] = i * i + 1;
  const auto expected = std::accumulate(big.begin(), big.end(), std::uint64_t{0});
  CHECK(kept(pool.submit([big] { return std::accumulate(big.begin(), big.end(), std::uint64_t{0}); })).get() == expected);

  // Just past the inline size (six pointers).
  std::array<void*, 6> six{};
  six[5] = &six;
  CHECK(kept(pool.submit([six] { return six[5]; })).get() == &six);

  // Over-aligned captures keep their alignment.
  struct alignas(64) wide {
    std::uint64_t value[2];
  };
  wide w{{11, 22}};
  auto misalignment = kept(pool.submit([w] { return reinterpret_cast<std::uintptr_t>(&w) % 64 + (w.value[1] - 22); }));
  CHECK(misalignment.get() == 0);

  // A capture whose move constructor may throw cannot stay inline.
  struct throwing_move {
    int value = 5;
    throwing_move() = default;
    throwing_move(const throwing_move&) = default;
    throwing_move(throwing_move&& other) noexcept(false) : value(other.value) {}
  };
  throwing_move tm;
  CHECK(kept(pool.submit([tm] { return tm.value; })).get() == 5);

  // Big captures are destroyed once the task has run.
  instances inst;
  weft::wait_group done;
  done.add(20);
  for (int i = 0; i < 20; ++i) {
    pool.post([big, c = counted{inst}, &done] {
      if (big[15] == 15 * 15 + 1) done.done();
    });
  }
  done.wait();
  spin_until([&] { return inst.live.load() == 0; });
  CHECK(inst.made.load() == 20);
}

// ---------------------------------------------------------------------------
// Overflow policies on a queue made full deterministically

TEST_CASE("worker_pool with overflow::reject throws weft::rejected from post and try_post returns false when full" *
          doctest::timeout(60)) {
  atomic_gate g;  // outlives the pool's workers
  weft::worker_pool pool{{.workers = 1, .queue_capacity = 3, .on_full = weft::overflow::reject, .name = "rej"}};
  hold_all_workers(pool, g);
  std::atomic<int> ran{0};
  instances inst;
  CHECK(pool.try_post([&] { ran++; }));
  pool.post([&] { ran++; });
  CHECK(pool.try_post([&] { ran++; }));
  CHECK(pool.stats().queued == 3);

  std::atomic<bool> refused_ran{false};
  try {
    pool.post([&, c = counted{inst}] { refused_ran = true; });
    FAIL("post into a full reject pool returned");
  } catch (const weft::rejected& error) {
    CHECK(std::string(error.what()).find("full") != std::string::npos);
  }
  CHECK_FALSE(pool.try_post([&, c = counted{inst}] { refused_ran = true; }));
  CHECK_THROWS_AS(pool.submit([] { return 1; }), weft::rejected);
  CHECK(inst.live.load() == 0);  // refused tasks are destroyed at once

  auto s = pool.stats();
  CHECK(s.rejected == 3);
  CHECK(s.queued == 3);
  CHECK(s.submitted == 4);
  CHECK(s.busy == 1);
  CHECK(s.peak_queued == 3);

  g.open();
  pool.shutdown();
  pool.join();
  CHECK(ran.load() == 3);
  CHECK_FALSE(refused_ran.load());
  s = pool.stats();
  CHECK(s.completed == 4);
  CHECK(s.rejected == 3);
}

// try_push also fails while the worker that claimed the queue's only slot
// is still moving its task out (a noexcept move, stalled here): the queue
// has room then, and posts took the failure for a full queue (reject threw,
// try_post returned false, caller_runs ran the task on its caller). The
// post now waits that move out. The release comes after a random spin, so
// that with the old behaviour the post would almost always have been
// refused first.
TEST_CASE(
    "worker_pool: a slot that a worker is still emptying is room, not a full queue, for every "
    "policy" *
    doctest::timeout(60)) {
  std::mt19937_64 rng{20261207};
  for (const auto policy :
       {weft::overflow::reject, weft::overflow::caller_runs, weft::overflow::block}) {
    for (const bool try_post : {true, false}) {
      CAPTURE(static_cast<int>(policy));
      CAPTURE(try_post);
      weft::worker_pool pool{{.workers = 1, .queue_capacity = 1, .on_full = policy}};
      std::atomic<bool> taking{false};
      std::atomic<bool> taken{false};
      weft_test::stalling_move payload;
      payload.arm(4, taking,
                  taken);  // into the capture, the task, the slot; the 4th: out of the slot
      std::atomic<int> ran{0};
      pool.post([held = std::move(payload), &ran] { ran.fetch_add(1); });
      spin_until([&] { return taking.load(); });

      std::atomic<bool> posting{false};
      bool queued = false;
      std::thread::id ran_on;
      const auto second = [&] {
        ran_on = std::this_thread::get_id();
        ran.fetch_add(1);
      };
      std::thread producer([&] {
        posting = true;
        try {
          if (try_post) {
            queued = pool.try_post(second);
          } else {
            pool.post(second);
            queued = true;
          }
        } catch (const weft::rejected&) {
          queued = false;
        }
      });
      spin_until([&] { return posting.load(); });
      for (auto spins = rng() % 20'000; spins != 0; --spins) weft::detail::cpu_relax();
      taken = true;
      const auto producer_id = producer.get_id();
      producer.join();
      pool.shutdown();
      pool.join();
      CHECK(queued);
      CHECK(ran.load() == 2);
      CHECK(ran_on != producer_id);
      const auto s = pool.stats();
      CHECK(s.rejected == 0);
      CHECK(s.completed == 2);
    }
  }
}

TEST_CASE("worker_pool with overflow::caller_runs runs the overflowing task on the posting thread before post returns" *
          doctest::timeout(60)) {
  atomic_gate g;  // outlives the pool's workers
  weft::worker_pool pool{{.workers = 1, .queue_capacity = 2, .on_full = weft::overflow::caller_runs}};
  hold_all_workers(pool, g);
  std::atomic<int> queued_ran{0};
  pool.post([&] { queued_ran++; });
  pool.post([&] { queued_ran++; });

  std::thread::id ran_on;
  bool on_a_worker = true;
  pool.post([&] {
    ran_on = std::this_thread::get_id();
    on_a_worker = pool.running_in_this_thread();
  });
  // It ran here, and before post returned (the only worker is held).
  CHECK(ran_on == std::this_thread::get_id());
  CHECK_FALSE(on_a_worker);
  CHECK(queued_ran.load() == 0);

  // submit() through caller_runs gives a ready future.
  auto here = pool.submit([] { return std::this_thread::get_id(); });
  CHECK(here.wait_for(0s) == std::future_status::ready);
  CHECK(here.get() == std::this_thread::get_id());

  // try_post never runs the task here, whatever the policy.
  bool tried_ran = false;
  CHECK_FALSE(pool.try_post([&] { tried_ran = true; }));
  CHECK_FALSE(tried_ran);

  // A throwing overflow task goes to the error handler, on this thread, and
  // post does not throw.
  std::thread::id handler_on;
  std::string handler_saw;
  pool.set_error_handler([&](std::exception_ptr error) {
    handler_on = std::this_thread::get_id();
    try {
      std::rethrow_exception(error);
    } catch (const std::exception& e) {
      handler_saw = e.what();
    }
  });
  CHECK_NOTHROW(pool.post([] { throw std::runtime_error("overflow task failed"); }));
  CHECK(handler_on == std::this_thread::get_id());
  CHECK(handler_saw == "overflow task failed");

  auto s = pool.stats();
  CHECK(s.submitted == 6);  // the holder, two queued, three run here
  CHECK(s.completed == 3);  // the three run here
  CHECK(s.failed == 1);
  CHECK(s.rejected == 1);   // the try_post
  CHECK(s.queued == 2);

  g.open();
  pool.shutdown();
  pool.join();
  CHECK(queued_ran.load() == 2);
  CHECK(pool.stats().completed == 6);
}

TEST_CASE("worker_pool with overflow::block holds producers in post until a worker frees a slot" *
          doctest::timeout(60)) {
  atomic_gate g;  // outlives the pool's workers
  weft::worker_pool pool{{.workers = 1, .queue_capacity = 2, .on_full = weft::overflow::block}};
  hold_all_workers(pool, g);
  weft::wait_group done;
  done.add(2);
  pool.post([&] { done.done(); });
  pool.post([&] { done.done(); });

  constexpr int producers = 3;
  std::vector<std::atomic<int>> runs(producers);
  std::atomic<int> ran_off_pool{0};
  done.add(producers);
  std::vector<std::unique_ptr<blocking_call>> calls;
  for (int p = 0; p < producers; ++p) {
    calls.push_back(std::make_unique<blocking_call>([&, p] {
      pool.post([&, p] {
        if (!pool.running_in_this_thread()) ran_off_pool++;
        runs[static_cast<std::size_t>(p)]++;
        done.done();
      });
    }));
  }
  for (auto& call : calls) call->wait_until_parked_or_returned();
  // The queue stays full until the gate opens: no post may have returned,
  // run its task, or queued it.
  for (auto& call : calls) CHECK_FALSE(call->returned());
  for (auto& r : runs) CHECK(r.load() == 0);
  auto s = pool.stats();
  CHECK(s.submitted == 3);
  CHECK(s.queued == 2);
  CHECK(s.rejected == 0);
  // Each producer counts itself once it waits under the queue's lock; one
  // seen parked may still be asleep on that lock. A count that never
  // reaches them all fails by the timeout.
  spin_until([&] { return pool.stats().waiting_for_room == static_cast<std::size_t>(producers); });

  g.open();
  for (auto& call : calls) call->join();
  CHECK(pool.stats().waiting_for_room == 0);
  done.wait();
  for (auto& r : runs) CHECK(r.load() == 1);
  CHECK(ran_off_pool.load() == 0);
  wait_for_completed(pool, 6);
  s = pool.stats();
  CHECK(s.submitted == 6);
  CHECK(s.completed == 6);
  CHECK(s.rejected == 0);
  CHECK(s.peak_queued == 2);
}

// ---------------------------------------------------------------------------
// post(f, token)

TEST_CASE("worker_pool post with a pre-cancelled token queues nothing and destroys the task (PITFALLS: gkit PR#134)" *
          doctest::timeout(60)) {
  atomic_gate g;  // outlives the pool's workers
  weft::worker_pool pool{{.workers = 1, .queue_capacity = 1}};
  weft::cancel_source source;
  source.cancel();
  instances inst;
  std::atomic<bool> ran{false};

  // With room in the queue...
  CHECK(pool.post([&, c = counted{inst}] { ran = true; }, source.token()) == wait_status::cancelled);
  CHECK(inst.live.load() == 0);

  // ...and with the queue full.
  hold_all_workers(pool, g);
  pool.post([] {});
  CHECK(pool.post([&, c = counted{inst}] { ran = true; }, source.token()) == wait_status::cancelled);
  CHECK(inst.live.load() == 0);

  // A deadline already past reads as timeout.
  auto expired = weft::with_deadline(weft::cancel_token{}, weft::manual_clock::now());
  CHECK(pool.post([&, c = counted{inst}] { ran = true; }, expired.token()) == wait_status::timeout);
  CHECK(inst.live.load() == 0);

  g.open();
  pool.shutdown();
  pool.join();
  CHECK_FALSE(ran.load());
  const auto s = pool.stats();
  CHECK(s.submitted == 2);  // the holder and the filler
  CHECK(s.completed == 2);
  CHECK(s.rejected == 0);   // a cancelled wait is not a rejection
}

TEST_CASE("worker_pool post with a token cancelled while it waits for room returns cancelled and never runs the task" *
          doctest::timeout(60)) {
  for (const auto policy : {weft::overflow::block, weft::overflow::reject, weft::overflow::caller_runs}) {
    CAPTURE(static_cast<int>(policy));
    atomic_gate g;  // outlives the pool's workers
    weft::worker_pool pool{{.workers = 1, .queue_capacity = 1, .on_full = policy}};
    hold_all_workers(pool, g);
    pool.post([] {});
    instances inst;
    std::atomic<bool> ran{false};
    weft::cancel_source source;
    const auto token = source.token();
    std::promise<wait_status> result;
    std::thread::id producer_id;
    std::thread producer([&] {
      producer_id = std::this_thread::get_id();
      result.set_value(pool.post([&, c = counted{inst}] { ran = true; }, token));
    });
    auto status = result.get_future();
    // Parked: its cancel callback is registered (or it already returned,
    // which the check below turns into a failure).
    spin_until([&] { return callbacks_on(token) == 1 || status.wait_for(0s) == std::future_status::ready; });
    CHECK(status.wait_for(0s) == std::future_status::timeout);
    source.cancel();
    CHECK(status.get() == wait_status::cancelled);
    producer.join();
    CHECK(inst.live.load() == 0);
    CHECK(callbacks_on(token) == 0);

    g.open();
    pool.shutdown();
    pool.join();
    CHECK_FALSE(ran.load());
    const auto s = pool.stats();
    CHECK(s.submitted == 2);
    CHECK(s.rejected == 0);
  }
}

TEST_CASE("worker_pool post with a token returns ok once a slot frees, whatever the overflow policy" *
          doctest::timeout(60)) {
  for (const auto policy : {weft::overflow::block, weft::overflow::reject, weft::overflow::caller_runs}) {
    CAPTURE(static_cast<int>(policy));
    atomic_gate g;  // outlives the pool's workers
    weft::worker_pool pool{{.workers = 1, .queue_capacity = 1, .on_full = policy}};
    hold_all_workers(pool, g);
    pool.post([] {});
    weft::cancel_source source;
    const auto token = source.token();
    std::promise<bool> ran_on_worker;
    std::promise<wait_status> result;
    std::thread producer(
        [&] { result.set_value(pool.post([&] { ran_on_worker.set_value(pool.running_in_this_thread()); }, token)); });
    auto status = result.get_future();
    spin_until([&] { return callbacks_on(token) == 1 || status.wait_for(0s) == std::future_status::ready; });
    CHECK(status.wait_for(0s) == std::future_status::timeout);
    g.open();
    CHECK(status.get() == wait_status::ok);
    producer.join();
    CHECK(ran_on_worker.get_future().get());
    CHECK(pool.stats().rejected == 0);
  }
}

TEST_CASE("worker_pool post with a deadline token returns timeout when the deadline passes while it waits" *
          doctest::timeout(60)) {
  atomic_gate g;  // outlives the pool's workers
  weft::worker_pool pool{{.workers = 1, .queue_capacity = 1}};
  hold_all_workers(pool, g);
  pool.post([] {});
  auto deadline = weft::with_deadline(weft::cancel_token{}, weft::manual_clock::now() + 1s);
  const auto token = deadline.token();
  std::atomic<bool> ran{false};
  std::promise<wait_status> result;
  std::thread producer([&] { result.set_value(pool.post([&] { ran = true; }, token)); });
  auto status = result.get_future();
  spin_until([&] { return callbacks_on(token) == 1 || status.wait_for(0s) == std::future_status::ready; });
  CHECK(status.wait_for(0s) == std::future_status::timeout);
  weft::manual_clock::advance(1s);
  CHECK(status.get() == wait_status::timeout);
  producer.join();
  g.open();
  pool.shutdown();
  pool.join();
  CHECK_FALSE(ran.load());
}

// ---------------------------------------------------------------------------
// A worker posting into its own full pool

TEST_CASE("worker_pool: a worker posting into its own full one-worker pool with overflow::block runs the task "
          "inline instead of deadlocking (PITFALLS: waiting on the pool from inside a task, Brion PR#186)" *
          doctest::timeout(60)) {
  weft::worker_pool pool{{.workers = 1, .queue_capacity = 1, .on_full = weft::overflow::block}};
  struct observed {
    std::thread::id worker;
    std::thread::id inline_on;
    bool ran_before_post_returned = false;
    wait_status token_status = wait_status::closed;
    std::thread::id token_inline_on;
  };
  std::promise<observed> result;
  std::promise<std::thread::id> queued_ran_on;
  pool.post([&] {
    observed o;
    o.worker = std::this_thread::get_id();
    pool.post([&] { queued_ran_on.set_value(std::this_thread::get_id()); });  // fills the queue
    bool ran = false;
    pool.post([&] {
      ran = true;
      o.inline_on = std::this_thread::get_id();
    });
    o.ran_before_post_returned = ran;
    o.token_status = pool.post([&] { o.token_inline_on = std::this_thread::get_id(); }, weft::cancel_source{}.token());
    result.set_value(o);
  });
  const observed o = result.get_future().get();
  CHECK(o.ran_before_post_returned);
  CHECK(o.inline_on == o.worker);
  CHECK(o.token_status == wait_status::ok);
  CHECK(o.token_inline_on == o.worker);
  CHECK(queued_ran_on.get_future().get() == o.worker);
  wait_for_completed(pool, 4);
  const auto s = pool.stats();
  CHECK(s.submitted == 4);
  CHECK(s.completed == 4);
  CHECK(s.rejected == 0);
}

namespace {
// A chain of tasks, each posting the next into a pool whose queue stays
// full; records how deeply they nested on one thread.
struct post_chain {
  weft::worker_pool& pool;
  std::atomic<long> steps{0};
  std::atomic<int> deepest{0};
  static inline thread_local int depth = 0;

  void step(long left) {
    ++depth;
    for (int seen = deepest.load(); depth > seen && !deepest.compare_exchange_weak(seen, depth);) {
    }
    if (left > 0) pool.post([this, left] { step(left - 1); });
    --depth;
    steps.fetch_add(1);
  }
};
}  // namespace

// Run inline one inside another, a chain of 10,000 posts overflowed the
// worker's stack (under AddressSanitizer; 1,000,000 without).
TEST_CASE(
    "worker_pool: a chain of tasks that post their successor into a full queue does not nest "
    "without bound" *
    doctest::timeout(120)) {
  constexpr long chain = 10'000;
  SUBCASE("on the pool's only worker, under overflow::block") {
    weft::worker_pool pool{{.workers = 1, .queue_capacity = 1, .on_full = weft::overflow::block}};
    post_chain tasks{pool};
    atomic_gate g;
    pool.post([&] {
      g.held.fetch_add(1);
      g.wait();
      tasks.step(chain);
    });
    spin_until([&] { return g.held.load() == 1; });
    pool.post([] {});  // fills the queue, and stays there while the chain runs on the worker
    g.open();
    spin_until([&] { return tasks.steps.load() == chain + 1; });
    CHECK(tasks.deepest.load() <= 17);
    wait_for_completed(pool, static_cast<std::uint64_t>(chain) + 2);
  }
  SUBCASE("on the posting thread, under overflow::caller_runs") {
    weft::worker_pool pool{
        {.workers = 1, .queue_capacity = 1, .on_full = weft::overflow::caller_runs}};
    post_chain tasks{pool};
    atomic_gate g;
    hold_all_workers(pool, g);
    pool.post([] {});
    tasks.step(chain);  // the tasks it no longer runs itself wait past the full queue
    CHECK(tasks.deepest.load() <= 17);
    g.open();
    spin_until([&] { return tasks.steps.load() == chain + 1; });
    CHECK(tasks.deepest.load() <= 17);
  }
}

TEST_CASE("worker_pool: a worker posting into its own full pool with overflow::reject is still rejected" *
          doctest::timeout(60)) {
  weft::worker_pool pool{{.workers = 1, .queue_capacity = 1, .on_full = weft::overflow::reject}};
  struct observed {
    bool post_rejected = false;
    bool try_post_declined = false;
    bool refused_ran = false;
  };
  std::promise<observed> result;
  pool.post([&] {
    observed o;
    pool.post([] {});  // fills the queue
    try {
      pool.post([&] { o.refused_ran = true; });
    } catch (const weft::rejected&) {
      o.post_rejected = true;
    }
    o.try_post_declined = !pool.try_post([&] { o.refused_ran = true; });
    result.set_value(o);
  });
  const observed o = result.get_future().get();
  CHECK(o.post_rejected);
  CHECK(o.try_post_declined);
  CHECK_FALSE(o.refused_ran);
  CHECK(pool.stats().rejected == 2);
}

TEST_CASE("worker_pool: workers of a busy multi-worker pool posting into their own full queue all make progress" *
          doctest::timeout(60)) {
  // Every worker posts children into a one-slot queue that the others keep
  // full: if a worker waited for room that only workers can make, this would
  // hang.
  for (const std::size_t workers : {std::size_t{1}, std::size_t{2}, std::size_t{4}}) {
    CAPTURE(workers);
    const int parents = 16;
    const int children = 8;
    std::atomic<int> ran{0};
    weft::wait_group done;  // outlives the pool's workers
    weft::worker_pool pool{{.workers = workers, .queue_capacity = 1, .on_full = weft::overflow::block}};
    done.add(parents * (children + 1));
    for (int p = 0; p < parents; ++p) {
      pool.post([&] {
        for (int c = 0; c < children; ++c) {
          pool.post([&] {
            ran++;
            done.done();
          });
        }
        ran++;
        done.done();
      });
    }
    done.wait();
    CHECK(ran.load() == parents * (children + 1));
  }
}

// ---------------------------------------------------------------------------
// Errors

TEST_CASE("worker_pool: a posted task that throws does not kill its worker, the handler gets that exception on the "
          "worker and stats count it" *
          doctest::timeout(60)) {
  weft::worker_pool pool{{.workers = 1}};
  std::mutex mutex;
  std::vector<int> codes;
  std::vector<std::string> messages;
  int off_worker = 0;
  weft::wait_group done;
  pool.set_error_handler([&](std::exception_ptr error) {
    std::lock_guard lock(mutex);
    if (!pool.running_in_this_thread()) ++off_worker;
    try {
      std::rethrow_exception(error);
    } catch (const task_error& e) {
      codes.push_back(e.code);
      messages.emplace_back(e.what());
    } catch (...) {
      codes.push_back(-1);
    }
    done.done();
  });
  std::atomic<int> normal_ran{0};
  done.add(6);
  for (int i = 1; i <= 3; ++i) {
    pool.post([i] { throw task_error("task failed", i); });
    pool.post([&] {
      normal_ran++;
      done.done();
    });
  }
  done.wait();
  CHECK(normal_ran.load() == 3);  // the single worker survived every throw
  {
    std::lock_guard lock(mutex);
    CHECK(codes == std::vector<int>{1, 2, 3});
    CHECK(messages == std::vector<std::string>(3, "task failed"));
    CHECK(off_worker == 0);
  }
  wait_for_completed(pool, 6);
  const auto s = pool.stats();
  CHECK(s.failed == 3);
  CHECK(s.completed == 6);
  CHECK(run_on(pool, [] { return 1; }) == 1);
}

// tf#479: with no handler set, a posted task's exception must still be reported (one line on stderr
// naming the pool and the exception), not lost silently, and must not kill the worker.
TEST_CASE(
    "worker_pool: with no handler set a throwing task (std or not) is counted and written to "
    "stderr and the worker lives" *
    doctest::timeout(60)) {
  weft::worker_pool pool{{.workers = 1, .name = "default-handler"}};
  weft_test::stderr_capture captured;
  pool.post([] { throw std::runtime_error("expected in this test: default handler"); });
  pool.post([] { throw 42; });
  CHECK(run_on(pool, [] { return 2; }) == 2);
  wait_for_completed(pool, 3);
  CHECK(pool.stats().failed == 2);
  CHECK(pool.stats().completed == 3);

  // An empty handler restores the default.
  std::atomic<int> calls{0};
  pool.set_error_handler([&](std::exception_ptr) { calls++; });
  pool.set_error_handler({});
  pool.post([] { throw std::logic_error("expected in this test: handler reset"); });
  CHECK(run_on(pool, [] { return 3; }) == 3);
  wait_for_completed(pool, 5);
  const std::string written = captured.text();
  CHECK(calls.load() == 0);
  CHECK(pool.stats().failed == 3);
  // One line per failure, in order; the one worker reported each before it ran the next task.
  const std::string line_start = "weft::worker_pool \"default-handler\": a posted task threw ";
  CHECK(written == line_start + typeid(std::runtime_error).name() +
                       ": expected in this test: default handler\n" + line_start +
                       "a non-standard exception\n" + line_start + typeid(std::logic_error).name() +
                       ": expected in this test: handler reset\n");
}

// The handler's exception used to replace the task's, which was lost.
TEST_CASE(
    "worker_pool: an error handler that throws does not kill the worker, and both errors are "
    "written" *
    doctest::timeout(60)) {
  weft::worker_pool pool{{.workers = 1, .name = "throwing-handler"}};
  std::atomic<int> calls{0};
  pool.set_error_handler([&](std::exception_ptr) {
    calls++;
    throw std::runtime_error("expected in this test: the handler throws");
  });
  weft_test::stderr_capture captured;
  pool.post([] { throw std::runtime_error("expected in this test: task"); });
  CHECK(run_on(pool, [] { return 4; }) == 4);
  wait_for_completed(pool, 2);
  const std::string written = captured.text();
  CHECK(calls.load() == 1);
  CHECK(pool.stats().failed == 1);
  CHECK(written.find("a posted task threw") != std::string::npos);
  CHECK(written.find("expected in this test: task") != std::string::npos);
  CHECK(written.find("the error handler threw") != std::string::npos);
  CHECK(written.find("expected in this test: the handler throws") != std::string::npos);
}

// The handler was copied for every error, so what it kept was lost.
TEST_CASE("worker_pool: the error handler is one object, called for every error" *
          doctest::timeout(60)) {
  weft::worker_pool pool{{.workers = 1, .name = "stateful-handler"}};
  std::vector<int> seen;  // written by the one worker
  pool.set_error_handler(
      [&seen, count = 0](std::exception_ptr) mutable { seen.push_back(++count); });
  for (int i = 0; i < 3; ++i) pool.post([] { throw std::runtime_error("expected in this test"); });
  CHECK(run_on(pool, [] { return 5; }) == 5);
  CHECK(seen == std::vector<int>{1, 2, 3});
}

// ---------------------------------------------------------------------------
// Shutdown and destruction

TEST_CASE("worker_pool shutdown returns at once, still runs queued tasks, then every post form throws weft::rejected" *
          doctest::timeout(60)) {
  atomic_gate g;  // outlives the pool's workers
  weft::worker_pool pool{{.workers = 1, .queue_capacity = 8, .name = "closing"}};
  hold_all_workers(pool, g);
  std::atomic<int> ran{0};
  for (int i = 0; i < 5; ++i) pool.post([&] { ran++; });
  pool.shutdown();  // returns although the only worker is held
  CHECK(pool.is_shutdown());
  instances inst;
  std::atomic<bool> late_ran{false};
  try {
    pool.post([&, c = counted{inst}] { late_ran = true; });
    FAIL("post after shutdown returned");
  } catch (const weft::rejected& error) {
    CHECK(std::string(error.what()).find("closing") != std::string::npos);
  }
  CHECK_THROWS_AS((void)pool.try_post([&, c = counted{inst}] { late_ran = true; }), weft::rejected);
  CHECK_THROWS_AS(pool.post([&, c = counted{inst}] { late_ran = true; }, weft::cancel_source{}.token()),
                  weft::rejected);
  CHECK_THROWS_AS(pool.submit([] { return 1; }), weft::rejected);
  CHECK_THROWS_AS(pool.executor().post([&] { late_ran = true; }), weft::rejected);
  CHECK(inst.live.load() == 0);
  CHECK(ran.load() == 0);  // still held

  g.open();
  pool.join();
  pool.join();  // a second join returns too
  CHECK(ran.load() == 5);
  CHECK_FALSE(late_ran.load());
  const auto s = pool.stats();
  CHECK(s.submitted == 6);
  CHECK(s.completed == 6);
  CHECK(s.dropped == 0);
  CHECK(s.rejected == 5);
  CHECK(s.queued == 0);
}

TEST_CASE("worker_pool shutdown_now drops the queued tasks unrun, destroys them before returning, and counts them" *
          doctest::timeout(60)) {
  atomic_gate g;  // outlives the pool's workers
  weft::worker_pool pool{{.workers = 1, .queue_capacity = 8}};
  CHECK(run_on(pool, [] { return 0; }) == 0);
  std::atomic<bool> running_finished{false};
  std::latch running{1};
  pool.post([&] {
    running.count_down();
    g.wait();
    running_finished = true;
  });
  running.wait();
  instances inst;
  std::atomic<int> ran{0};
  for (int i = 0; i < 4; ++i) pool.post([&, c = counted{inst}] { ran++; });
  CHECK(inst.live.load() == 4);

  CHECK(pool.shutdown_now() == 4);
  CHECK(inst.live.load() == 0);  // destroyed, before shutdown_now returned
  CHECK(pool.is_shutdown());
  CHECK(pool.stats().queued == 0);
  CHECK(pool.stats().dropped == 4);
  CHECK_THROWS_AS(pool.post([] {}), weft::rejected);
  CHECK(pool.shutdown_now() == 0);  // nothing left

  g.open();
  pool.join();
  CHECK(running_finished.load());  // the running task finished
  CHECK(ran.load() == 0);
  const auto s = pool.stats();
  CHECK(s.submitted == 6);
  CHECK(s.dropped == 4);
  CHECK(s.completed == 2);
  CHECK(s.completed == s.submitted - s.dropped);
  CHECK(s.rejected == 1);
}

// A worker that finds the queue deep claims a run of tasks at once and
// holds those it has not started; shutdown_now() must find them there.
// Workers are held at a gate while the queue fills, so that they then claim
// runs (the claim size grows while claims come back full), until each
// blocks in one of the `blockers`; what is left is queued or held. Both
// workers are blocked when shutdown_now() runs, so nothing runs meanwhile
// and the count it returns is exact.
TEST_CASE("worker_pool shutdown_now drops and counts the tasks that workers claimed and hold, and the registry "
          "lists them as queued until then" *
          doctest::timeout(60)) {
  atomic_gate first_gate;  // outlives the pool's workers
  atomic_gate blocker_gate;
  const std::string name = "held-drop";
  weft::worker_pool pool{{.workers = 2, .queue_capacity = 512, .name = name}};
  hold_all_workers(pool, first_gate);
  constexpr int fillers = 64;
  constexpr int blockers = 16;
  constexpr int late = 100;
  std::atomic<int> ran{0};
  std::atomic<int> blockers_started{0};
  std::atomic<bool> dropped_all{false};
  std::atomic<int> ran_after_shutdown{0};
  const auto task = [&] {
    if (dropped_all.load()) ran_after_shutdown++;
    ran++;
  };
  for (int i = 0; i < fillers; ++i) pool.post(task);
  for (int i = 0; i < blockers; ++i) {
    pool.post([&] {
      blockers_started++;
      blocker_gate.wait();
    });
  }
  for (int i = 0; i < late; ++i) pool.post(task);
  first_gate.open();
  spin_until([&] { return blockers_started.load() == 2; });

  // Both workers wait at blocker_gate: nothing else runs until it opens.
  const int queued = fillers + blockers + late - ran.load() - 2;
  CHECK(pool.stats().queued == static_cast<std::size_t>(queued));
  if constexpr (weft::detail::registry_compiled) {
    const auto tasks = weft::registry::snapshot();  // libc++ 14 has no std::ranges::count_if
    const auto listed = std::count_if(tasks.begin(), tasks.end(), [&](const auto& t) {
      return t.name == name && t.state == weft::task_state::queued;
    });
    CHECK(listed == queued);  // nothing is claimed while the snapshot runs, so no task is listed twice
  }
  CHECK(pool.shutdown_now() == static_cast<std::size_t>(queued));
  dropped_all.store(true);
  CHECK(pool.stats().queued == 0);

  blocker_gate.open();
  pool.join();
  CHECK(ran_after_shutdown.load() == 0);
  const auto s = pool.stats();
  CHECK(s.dropped == static_cast<std::uint64_t>(queued));
  CHECK(s.completed + s.dropped == s.submitted);
}

TEST_CASE("worker_pool shutdown_now on an idle pool drops nothing and its destructor returns" * doctest::timeout(60)) {
  weft::worker_pool pool{{.workers = 3}};
  CHECK(run_on(pool, [] { return 1; }) == 1);
  CHECK(pool.shutdown_now() == 0);
  pool.join();
  CHECK(pool.stats().dropped == 0);
}

TEST_CASE("worker_pool destructor runs every task queued before destruction" * doctest::timeout(60)) {
  instances inst;
  std::atomic<int> ran{0};
  {
    atomic_gate g;  // outlives the pool's workers
    auto pool = std::make_unique<weft::worker_pool>(weft::worker_pool_options{.workers = 1, .queue_capacity = 8});
    weft::worker_pool* raw = pool.get();
    hold_all_workers(*pool, g);
    for (int i = 0; i < 8; ++i) pool->post([&, c = counted{inst}] { ran++; });
    // The gate opens only once the destructor has stopped intake, so the
    // destructor certainly starts with eight tasks queued.
    std::thread opener([&] {
      spin_until([&] { return raw->is_shutdown(); });
      g.open();
    });
    pool.reset();
    opener.join();
  }
  CHECK(ran.load() == 8);
  CHECK(inst.live.load() == 0);
}

TEST_CASE("worker_pool shutdown wakes producers blocked on a full queue with weft::rejected (PITFALLS: shutdown "
          "deadlock)" *
          doctest::timeout(60)) {
  for (const bool now : {false, true}) {
    CAPTURE(now);
    atomic_gate g;  // outlives the pool's workers
    weft::worker_pool pool{{.workers = 1, .queue_capacity = 2, .on_full = weft::overflow::block}};
    hold_all_workers(pool, g);
    std::atomic<int> queued_ran{0};
    pool.post([&] { queued_ran++; });
    pool.post([&] { queued_ran++; });

    instances inst;
    std::atomic<int> blocked_ran{0};
    std::atomic<int> rejected{0};
    std::atomic<int> returned_normally{0};
    const auto attempt = [&](auto post_call) {
      try {
        post_call();
        returned_normally++;
      } catch (const weft::rejected&) {
        rejected++;
      }
    };
    std::vector<std::unique_ptr<blocking_call>> plain;
    for (int p = 0; p < 3; ++p) {
      plain.push_back(std::make_unique<blocking_call>(
          [&] { attempt([&] { pool.post([&, c = counted{inst}] { blocked_ran++; }); }); }));
    }
    weft::cancel_source source;
    const auto token = source.token();
    std::thread with_token([&] {
      attempt([&] { (void)pool.post([&, c = counted{inst}] { blocked_ran++; }, token); });
    });
    for (auto& call : plain) call->wait_until_parked_or_returned();
    spin_until([&] { return callbacks_on(token) == 1 || returned_normally.load() + rejected.load() > 0; });
    CHECK(returned_normally.load() == 0);
    CHECK(rejected.load() == 0);

    std::size_t dropped = 0;
    if (now) {
      dropped = pool.shutdown_now();
    } else {
      pool.shutdown();
    }
    for (auto& call : plain) call->join();
    with_token.join();
    CHECK(rejected.load() == 4);
    CHECK(returned_normally.load() == 0);
    CHECK(inst.live.load() == 0);

    g.open();
    pool.join();
    CHECK(blocked_ran.load() == 0);
    CHECK(queued_ran.load() == (now ? 0 : 2));
    CHECK(dropped == (now ? 2u : 0u));
    const auto s = pool.stats();
    CHECK(s.rejected == 4);
    CHECK(s.submitted == 3);
    CHECK(s.dropped == dropped);
    CHECK(s.completed == s.submitted - s.dropped);
  }
}

TEST_CASE("worker_pool can be destroyed while its workers are idle, parked, or busy, without hanging or leaking "
          "(PITFALLS: BS#93, ptsouchlos/thread-pool#52)" *
          doctest::timeout(120)) {
  const int rounds = under_sanitizer ? 12 : 60;
  instances inst;
  for (int round = 0; round < rounds; ++round) {
    const std::size_t workers = 1 + static_cast<std::size_t>(round) % 4;
    CAPTURE(round);
    // Never used: workers may still be starting up.
    { weft::worker_pool idle{{.workers = workers}}; }
    // After one round trip: workers spinning or parked.
    {
      weft::worker_pool parked{{.workers = workers}};
      CHECK(run_on(parked, [] { return 1; }) == 1);
    }
    // Busy: tasks running and queued when the destructor starts.
    std::atomic<int> ran{0};
    {
      weft::worker_pool busy{{.workers = workers, .queue_capacity = 16}};
      for (int i = 0; i < 32; ++i) {
        busy.post([&, c = counted{inst}] {
          for (int spin = 0; spin < 100; ++spin) std::atomic_signal_fence(std::memory_order_seq_cst);
          ran++;
        });
      }
    }
    CHECK(ran.load() == 32);
    CHECK(inst.live.load() == 0);
    // Busy and then shut down hard.
    {
      weft::worker_pool hard{{.workers = workers, .queue_capacity = 16}};
      for (int i = 0; i < 16; ++i) hard.post([c = counted{inst}] {});
      (void)hard.shutdown_now();
    }
    CHECK(inst.live.load() == 0);
  }
}

TEST_CASE("worker_pool join from one of its own workers throws logic_error and the worker carries on" *
          doctest::timeout(60)) {
  future_keeper kept;  // before the pool: see future_keeper
  weft::worker_pool pool{{.workers = 1}};
  auto joined = kept(pool.submit([&] { pool.join(); }));
  try {
    joined.get();
    FAIL("join on a worker returned");
  } catch (const std::logic_error& error) {
    CHECK(std::string(error.what()).find("own workers") != std::string::npos);
  }
  CHECK(run_on(pool, [] { return 8; }) == 8);
  CHECK_FALSE(pool.is_shutdown());
}

// ---------------------------------------------------------------------------
// Executor, stats, default pool

TEST_CASE("worker_pool executor posts to its pool, knows when it runs there, and compares by pool" *
          doctest::timeout(60)) {
  weft::worker_pool a{{.workers = 2}};
  weft::worker_pool b{{.workers = 1}};
  const auto ex = a.executor();
  const auto copy = ex;
  CHECK(ex == copy);
  CHECK(a.executor() == a.executor());
  CHECK_FALSE(a.executor() == b.executor());
  CHECK(a.executor() != b.executor());
  CHECK(&ex.context() == &a);
  CHECK_FALSE(ex.running_in_this_thread());

  std::promise<std::array<bool, 3>> inside;
  ex.post([&] { inside.set_value({ex.running_in_this_thread(), a.running_in_this_thread(), b.running_in_this_thread()}); });
  const auto seen = inside.get_future().get();
  CHECK(seen[0]);
  CHECK(seen[1]);
  CHECK_FALSE(seen[2]);

  std::promise<bool> executed;
  ex.execute([&] { executed.set_value(a.running_in_this_thread()); });
  CHECK(executed.get_future().get());
  CHECK_FALSE(a.running_in_this_thread());
}

TEST_CASE("worker_pool stats are exact in a deterministic scenario: busy, queued, peak, submitted, completed, "
          "rejected" *
          doctest::timeout(60)) {
  atomic_gate g;  // outlives the pool's workers
  weft::worker_pool pool{{.workers = 2, .queue_capacity = 4, .on_full = weft::overflow::reject}};
  hold_all_workers(pool, g);
  auto s = pool.stats();
  CHECK(s.workers == 2);
  CHECK(s.busy == 2);
  CHECK(s.queued == 0);
  CHECK(s.submitted == 2);
  CHECK(s.completed == 0);

  weft::wait_group done;
  done.add(4);
  for (int k = 1; k <= 3; ++k) {
    pool.post([&] { done.done(); });
    CHECK(pool.stats().queued == static_cast<std::size_t>(k));
  }
  CHECK(pool.stats().peak_queued >= 3);
  CHECK(pool.try_post([&] { done.done(); }));
  CHECK_FALSE(pool.try_post([] {}));
  CHECK_THROWS_AS(pool.post([] {}), weft::rejected);
  s = pool.stats();
  CHECK(s.queued == 4);
  CHECK(s.peak_queued == 4);
  CHECK(s.submitted == 6);
  CHECK(s.rejected == 2);
  CHECK(s.busy == 2);
  CHECK(s.completed == 0);

  g.open();
  done.wait();
  wait_for_completed(pool, 6);
  s = pool.stats();
  CHECK(s.busy == 0);
  CHECK(s.queued == 0);
  CHECK(s.peak_queued == 4);  // exact: the queue filled
  CHECK(s.submitted == 6);
  CHECK(s.completed == 6);
  CHECK(s.completed == s.submitted - s.dropped);
  CHECK(s.failed == 0);
  CHECK(s.rejected == 2);
  CHECK(s.dropped == 0);
  CHECK(s.max_queue_wait <= s.total_queue_wait);
  CHECK(s.total_queue_wait >= 0ns);
}

// `queued` counts the tasks a worker holds from a claim of several; the
// peak did not, and read 8 after stats() had reported 9 queued.
TEST_CASE("worker_pool: peak_queued never reads below a queued count stats() reported" *
          doctest::timeout(60)) {
  constexpr std::size_t capacity = 8;
  atomic_gate first;
  atomic_gate second;
  weft::worker_pool pool{
      {.workers = 1, .queue_capacity = capacity, .on_full = weft::overflow::reject}};
  hold_all_workers(pool, first);
  // The worker's next claim takes both (a worker that got all it asked for
  // asks for twice as many next time): it runs the first, and holds the
  // second.
  pool.post([&second] {
    second.held.fetch_add(1);
    second.wait();
  });
  pool.post([] {});
  first.open();
  spin_until([&] { return second.held.load() == 1; });
  std::size_t posted = 0;
  while (pool.try_post([] {})) ++posted;
  CHECK(posted == capacity);
  const auto full = pool.stats();
  CHECK(full.queued == capacity + 1);
  CHECK(full.peak_queued >= full.queued);
  second.open();
  wait_for_completed(pool, 3 + capacity);
  const auto drained = pool.stats();
  CHECK(drained.queued == 0);
  CHECK(drained.peak_queued >= full.queued);
}

// stats() reads each count at its own moment: a task that completed
// between the reads of `submitted` and `completed` made completed exceed
// submitted, and one that failed between the reads of `completed` and
// `failed` made failed exceed completed; a monitor computing
// submitted - completed saw it wrap around.
TEST_CASE("worker_pool: stats read while tasks run and fail keep failed <= completed <= submitted" *
          doctest::timeout(120)) {
  constexpr int producers = 2;
  const int tasks_per_producer = weft_test::under_sanitizer ? 10'000 : 50'000;
  // One per producer, declared before the pool: see weft_test::future_sink.
  std::array<std::vector<std::future<void>>, producers> submitted;
  weft::worker_pool pool{{.workers = 2, .queue_capacity = 64}};
  pool.set_error_handler([](std::exception_ptr) {});
  std::atomic<int> posting{producers};
  std::vector<std::thread> threads;
  for (int p = 0; p < producers; ++p) {
    threads.emplace_back([&, p] {
      for (int i = 0; i < tasks_per_producer; ++i) {
        if (i % 2 == 0) {
          pool.post([] {});
        } else if (i % 4 == 1) {
          pool.post([] { throw std::runtime_error("posted"); });
        } else {
          submitted[p].push_back(pool.submit([] { throw std::runtime_error("submitted"); }));
        }
      }
      posting.fetch_sub(1);
    });
  }
  const auto total = static_cast<std::uint64_t>(producers * tasks_per_producer);
  std::uint64_t inconsistent = 0;
  for (;;) {
    const auto s = pool.stats();
    inconsistent += s.failed > s.completed || s.completed + s.dropped > s.submitted ? 1 : 0;
    if (posting.load() == 0 && s.completed == total) break;
  }
  for (auto& thread : threads) thread.join();
  const auto s = pool.stats();
  CHECK(inconsistent == 0);
  CHECK(s.submitted == total);
  CHECK(s.completed == total);
  CHECK(s.failed == total / 2);
  std::uint64_t reached_future = 0;
  for (auto& futures : submitted) {
    for (auto& future : futures) {
      try {
        future.get();
      } catch (const std::runtime_error&) {
        ++reached_future;
      }
    }
  }
  CHECK(reached_future == total / 4);
}

TEST_CASE("default_executor runs tasks on the process-wide pool, which has one worker per hardware thread" *
          doctest::timeout(60)) {
  weft::worker_pool& pool = weft::default_pool();
  CHECK(&pool == &weft::default_pool());
  CHECK(pool.size() == weft::hardware_threads());
  CHECK(weft::hardware_threads() >= 1);
  CHECK(pool.queue_capacity() == 4096);
  CHECK(pool.overflow_policy() == weft::overflow::block);
  const auto ex = weft::default_executor();
  CHECK(&ex.context() == &pool);
  CHECK(ex == pool.executor());

  std::promise<bool> on_pool;
  ex.post([&] { on_pool.set_value(ex.running_in_this_thread()); });
  CHECK(on_pool.get_future().get());
  CHECK_FALSE(ex.running_in_this_thread());

  // The default pool outlives this test, so what its tasks touch must too:
  // a worker may still be inside done() when wait() returns.
  constexpr int tasks = 100;
  static std::atomic<int> ran{0};
  static weft::wait_group done;
  ran.store(0);
  done.add(tasks);
  for (int i = 0; i < tasks; ++i) {
    ex.post([] {
      ran.fetch_add(1);
      done.done();
    });
  }
  done.wait();
  CHECK(ran.load() == tasks);
  CHECK(run_on(pool, [] { return 6; }) == 6);
}
