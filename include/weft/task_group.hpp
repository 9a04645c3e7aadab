// SPDX-License-Identifier: BSL-1.0
// weft::task_group and weft::result_group: structured groups of tasks that
// are joined together and fail together.
//
// Go analogue: golang.org/x/sync/errgroup (Group, WithContext, SetLimit,
// TryGo). C++ alternatives: tbb::task_group, a vector of std::future from
// std::async, a latch over a thread pool.
//
//   weft::task_group g{pool.executor(), request_token};
//   g.go([&](weft::cancel_token t) { user = fetch_user(id, t); });
//   g.go([&](weft::cancel_token t) { orders = fetch_orders(id, t); });
//   g.wait();   // joins both; rethrows the first exception
//
// Semantics:
//  - go(f) runs f, as f() or f(cancel_token), on the group's executor (the
//    default executor unless one is given). The token is g.token(): a child
//    of the parent token, cancelled by the first task that throws (its
//    exception becomes the token's cause), so siblings can stop early. A
//    null function pointer is refused with std::invalid_argument.
//  - A task that has not started when the group's token is cancelled is not
//    started. wait() reports it rather than skipping silently: it rethrows
//    the first task exception; if there is none but tasks were skipped, it
//    throws the token's cause (std::system_error with errc::cancelled or
//    errc::deadline_exceeded, or the exception given to cancel()).
//  - wait() helps: while it waits, the waiting thread runs the group's own
//    tasks that no worker has started yet (never another group's), so a
//    short fan-out finishes without a wake-up round trip, and waiting from
//    inside a pool task cannot deadlock a pool whose workers are all busy.
//    A waiter asleep on the count is woken by a task added meanwhile (by
//    one of the group's tasks) to run it.
//  - set_limit(n): at most n tasks in flight; go() waits for a slot
//    (backpressure), running the group's unstarted tasks meanwhile;
//    try_go() returns false instead. Only while no task is
//    in flight (as in errgroup). A task that calls go() on its own limited,
//    full group waits for a sibling to finish: with n such tasks the group
//    deadlocks, as errgroup does.
//  - Structured: the destructor cancels the token if tasks were started
//    since the last wait() (for example during stack unwinding), then joins
//    them. No task outlives its group. An exception that no wait() delivered
//    is written to stderr, never lost silently.
//  - After a failure the group is spent: its token stays cancelled, later
//    tasks are skipped, and every wait() rethrows the same exception.
//  - If the pool shuts down before tasks of the group have started, with
//    none of the group's runners left on it (shutdown_now() dropped them, or
//    go() raced shutdown()), those tasks are destroyed unrun and the group
//    fails with weft::rejected, as go() on that pool would; those that a
//    wait() under way takes first, it runs, as it runs any task it helps
//    with.
//
// result_group<T> is the same with tasks that return a T; wait() returns
// the results in spawn order.
//
// Thread safety: go, try_go, token and cancel may be called concurrently,
// from any thread, including from the group's own tasks. wait() may run
// concurrently with go() from inside the group's tasks (it returns once the
// count of tasks reaches zero), but not with another wait(), which might
// then not report a skipped task; set_limit and the destructor may not run
// concurrently with anything else. A task must not wait() on its own group,
// nor on the group of a task it runs inside: that wait would wait for
// itself, and throws std::logic_error instead, from the group's own tasks
// and from the tasks of groups and fan-outs started inside them (each
// group records up to eight groups it was started inside), on whichever
// thread they run. A group counts as started inside the task that made it
// even when it outlives that task. A coroutine added to a group that waits
// on that group (async_wait, or the blocking wait()) is not caught, and
// waits for good.
//
// Cost: a group takes the shared state of a finished group when one is
// spare (up to 64 are kept, about 13 KiB each, mostly its ring of 64 task
// slots of 128 bytes), else allocates one; a group with a parent token also
// allocates its child token's state; a group made inside a task copies the
// ids of the groups it is nested in. go() adds to the group's count and
// pushes the task into the ring (captures up to four pointers kept inline,
// no allocation; three for a result_group's task); it posts a runner to the
// pool only while fewer runners than workers are out, and each runner takes
// tasks until none is left, publishing completions in batches; it waits a
// moment for the next task before it leaves (WEFT_WORKER_SPIN_LIMIT / 2
// polls, about 1.2 us, cut short by a wait()).
// So a task costs about three atomic read-modify-writes, and a thousand tasks
// cost a few posts. If the pool is full and no runner is out, go() waits for
// room, whatever the pool's overflow policy: a group never leaves its tasks
// without a runner. wait() on finished tasks is a load and a
// read-modify-write (of the skipped flag); with nothing left to
// run but tasks still running, it polls the count for about 2.5 us (128
// pause instructions) before it sleeps.
#pragma once

#include <weft/cancel.hpp>
#include <weft/config.hpp>
#include <weft/detail/bounded_ring.hpp>
#include <weft/detail/futex.hpp>
#include <weft/detail/reusable_source.hpp>
#include <weft/detail/spin_mutex.hpp>
#include <weft/detail/task.hpp>
#include <weft/detail/task_tracking.hpp>
#include <weft/semaphore.hpp>
#include <weft/spawn_site.hpp>
#include <weft/wait_group.hpp>
#include <weft/worker_pool.hpp>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace weft {

class task_group;
template <class T>
class result_group;

namespace detail {
// The groups whose tasks were running on a thread when it made a group or
// started a fan-out, and the groups they were made inside, in turn. The
// group's or fan-out's tasks may run on other threads, and a wait() there
// on one of these groups would wait for itself (through the join of the
// group or fan-out in between). Kept by value, as ids that no other group
// ever gets: a group may outlive the task that made it, and a finished
// group's state is reused.
struct group_ancestry {
  static constexpr std::size_t capacity = 8;  // deeper nesting goes unchecked
  std::uint64_t ids[capacity];
  std::size_t count = 0;

  // This thread's; defined below.
  void record_this_thread() noexcept;

  bool contains(std::uint64_t id) const noexcept {
    for (std::size_t i = 0; i < count; ++i) {
      if (ids[i] == id) return true;
    }
    return false;
  }
  void add(std::uint64_t id) noexcept {
    if (id != no_group_id && count < capacity && !contains(id)) ids[count++] = id;
  }

  // What a fan-out's task runs as: it has no group of its own.
  static constexpr std::uint64_t no_group_id = 0;
};

// The groups whose tasks this thread is running, innermost first.
struct running_group {
  std::uint64_t group_id;
  const group_ancestry* ancestry;
  const running_group* outer;
};
inline thread_local const running_group* running_groups = nullptr;

inline void group_ancestry::record_this_thread() noexcept {
  count = 0;
  for (const running_group* g = running_groups; g != nullptr; g = g->outer) {
    add(g->group_id);
    for (std::size_t i = 0; i < g->ancestry->count; ++i) add(g->ancestry->ids[i]);
  }
}

// Runs a task with `ancestry` as its group's, so that it and the groups it
// makes know where they are nested.
class running_group_scope {
 public:
  running_group_scope(std::uint64_t group_id, const group_ancestry& ancestry) noexcept
      : here_{group_id, &ancestry, running_groups} {
    running_groups = &here_;
  }
  running_group_scope(const running_group_scope&) = delete;
  running_group_scope& operator=(const running_group_scope&) = delete;
  ~running_group_scope() { running_groups = here_.outer; }

 private:
  const running_group here_;
};

// Ids are taken in blocks, so that threads making groups at once do not
// share a line for them. The first is 1 (no_group_id is 0).
inline std::uint64_t next_group_id() noexcept {
  constexpr std::uint64_t block = 1024;
  static constinit std::atomic<std::uint64_t> taken{0};
  constinit thread_local std::uint64_t next = 0;
  constinit thread_local std::uint64_t end = 0;
  if (next == end) {
    next = taken.fetch_add(block, std::memory_order_relaxed) + 1;
    end = next + block;
  }
  return next++;
}

// Whether a task running on this thread belongs to group `id`, or to a
// group or fan-out started inside one of its tasks.
inline bool running_inside(std::uint64_t id) noexcept {
  for (const running_group* g = running_groups; g != nullptr; g = g->outer) {
    if (g->group_id == id || g->ancestry->contains(id)) return true;
  }
  return false;
}

// What weft/asio.hpp needs of a group: to count work that is not a posted
// task (a coroutine), and to wait for it without blocking.
struct task_group_access {
  static wait_group& pending(task_group& group) noexcept;
  static std::exception_ptr outcome(task_group& group);
  // False (and the task counts as skipped) when the group is cancelled.
  static bool begin(task_group& group);
  static void end(task_group& group, std::exception_ptr error) noexcept;
  // Fails the group as a task that threw `error` would: the first failure
  // is kept, and the token is cancelled.
  static void fail(task_group& group, std::exception_ptr error) noexcept;
};

// f() or f(token), whichever f accepts.
template <class F>
decltype(auto) invoke_with_token(F& f, const cancel_token& token) {
  if constexpr (std::is_invocable_v<F&, const cancel_token&>) {
    return f(token);
  } else {
    static_assert(std::is_invocable_v<F&>, "weft: a group task must be callable as f() or f(weft::cancel_token)");
    return f();
  }
}
}  // namespace detail

class task_group {
 public:
  // On the default executor, with no parent token.
  task_group() : task_group(default_executor(), cancel_token{}) {}
  explicit task_group(const cancel_token& parent) : task_group(default_executor(), parent) {}
  explicit task_group(pool_executor executor, const cancel_token& parent = {})
      : core_(core::make(executor, parent)) {}

  task_group(const task_group&) = delete;
  task_group& operator=(const task_group&) = delete;

  ~task_group() {
    if (started_since_wait_.load(std::memory_order_relaxed)) core_->cancellation.cancel();
    join();
    if (core_->failed.load(std::memory_order_acquire) && !error_delivered_) report_undelivered();
    core_->release_outcome();
    core_->unref();
  }

  // Starts f on the executor; waits for a slot first when a limit is set.
  // Throws weft::rejected when the executor's pool is shut down.
  template <class F>
  void go(F&& f, spawn_site site = spawn_site::current()) {
    detail::check_callable(f, "task_group::go");
    check_open();
    if (core_->limit) acquire_slot();
    start(std::forward<F>(f), site);
  }

  // Starts f if a slot is free under the limit (always, with no limit);
  // never waits for a slot.
  template <class F>
  [[nodiscard]] bool try_go(F&& f, spawn_site site = spawn_site::current()) {
    detail::check_callable(f, "task_group::try_go");
    check_open();
    if (core_->limit && !core_->limit->try_acquire()) return false;
    start(std::forward<F>(f), site);
    return true;
  }

  // At most n tasks in flight from now on; n >= 1. Only while none is.
  void set_limit(std::ptrdiff_t n) {
    if (n < 1) {
      throw std::invalid_argument("weft::task_group::set_limit: n must be at least 1, got " + std::to_string(n));
    }
    if (core_->pending.count() != 0) {
      throw std::logic_error("weft::task_group::set_limit: tasks are in flight; set the limit before go()");
    }
    core_->limit = std::make_unique<semaphore>(n);
  }

  // Joins every task started so far (helping to run those not yet started),
  // then rethrows the first task exception, or reports skipped tasks (see
  // the top of this header).
  void wait() {
    check_not_own_task();
    join();
    if (auto error = outcome()) std::rethrow_exception(error);
  }

  // Cancelled by the first failure, by cancel(), or by the parent token.
  [[nodiscard]] cancel_token token() const noexcept { return core_->cancellation.token(); }

  // Asks the group's tasks to stop (those not started are skipped).
  void cancel() noexcept { core_->cancellation.cancel(); }

  pool_executor executor() const noexcept { return core_->executor; }

  // Tasks started and not yet finished; a snapshot.
  std::int64_t in_flight() const noexcept { return core_->pending.count(); }

 private:
  friend struct detail::task_group_access;
  template <class T>
  friend class result_group;

  // What the group shares with the runners it posts; freed by whichever of
  // them (or the group) lets go last, so a runner that an executor runs
  // late, after the group's tasks are done and the group is gone, is
  // harmless.
  //
  // Tasks wait in `unstarted`, a lock-free ring (the pool's kind), and past
  // its capacity in a locked overflow vector. They are run by runners, at most one per
  // worker of the pool, each taking tasks until none is left, and by the
  // waiting thread. So a group of a thousand tasks costs a few posts, not a
  // thousand, and a waiter runs only its own group's tasks.
  struct core final : detail::task_source {
    static constexpr std::size_t ring_capacity = 64;

    struct queued_task {
      detail::task work;
      detail::task_origin origin;
    };

    // A spare core when there is one, else a new one.
    static core* make(pool_executor pool, const cancel_token& parent) {
      core* c = nullptr;
      if (spares().try_pop(c)) {
        c->refs.store(1, std::memory_order_relaxed);
        c->executor = pool;
        c->max_runners = pool.context().size();
      } else {
        c = new core(pool);
        if constexpr (detail::registry_compiled) {
          try {
            detail::add_source(*c);
          } catch (...) {
            delete c;
            throw;
          }
        }
      }
      try {
        c->cancellation.renew(parent);
      } catch (...) {
        destroy(c);
        throw;
      }
      c->id = detail::next_group_id();
      c->ancestry.record_this_thread();
      return c;
    }

    explicit core(pool_executor pool) : executor(pool), max_runners(pool.context().size()) {}

    void unref() noexcept {
      if (refs.fetch_sub(1, std::memory_order_acq_rel) == 1) retire();
    }

    // Finished cores are kept for the next group. Whichever thread lets go
    // last frees a core, usually a pool worker; a free of a block that
    // another thread allocated takes the malloc arena's lock, and the
    // spawning thread's next allocation then waits for it: that cost a
    // small fan-out a third of its time.
    static detail::bounded_ring<core*>& spares() {
      static auto* const bin = new detail::bounded_ring<core*>(64);  // never freed: runners may retire cores during exit
      return *bin;
    }

    // Drops the group's hold on a task's exception, as the first error and
    // as the cause of the cancelled source (with the source itself, unless
    // nothing touched it), on the group's own thread once its tasks are
    // joined. The exception is then freed by whichever thread caught and
    // read it last, not by a pool worker that happens to let go of the core
    // last: the runtime's count of references to an exception is invisible
    // to ThreadSanitizer, which reported such frees as races with the
    // catcher's what() (and stalled the worker while it symbolised them).
    void release_outcome() noexcept {
      first_error = nullptr;
      cancellation.release();
    }

    // Once every reference is gone, the group's too: release_outcome() has run.
    void retire() noexcept {
      limit.reset();
      skipped.store(false, std::memory_order_relaxed);
      failed.store(false, std::memory_order_relaxed);
      if (overflow.capacity() > ring_capacity) {
        // Under the lock: the core is still a registry source, and a
        // snapshot's collect() may be reading the vector.
        std::vector<queued_task> grown;
        std::lock_guard guard(overflow_mutex);
        grown.swap(overflow);
      }
      core* self = this;
      if (!spares().try_push(self)) destroy(this);
    }

    static void destroy(core* c) noexcept {
      if constexpr (detail::registry_compiled) detail::remove_source(*c);
      delete c;
    }

    // The queued tasks, for the registry's snapshots: the overflow first, so
    // that a task moved from it into the ring meanwhile is seen twice (which
    // snapshots allow), never missed.
    void collect(std::vector<detail::task_record>& out) const override {
      // A spare core stays a source, but holds no task: its group joined
      // them all before letting go. Skipping it spares each snapshot a lock
      // and a walk of the ring's slots per spare.
      if (refs.load(std::memory_order_acquire) == 0) return;
      {
        std::lock_guard guard(overflow_mutex);
        for (std::size_t i = overflow_head; i < overflow.size(); ++i) detail::add_queued(out, overflow[i].origin);
      }
      detail::collect_queued(unstarted, out);
    }

    // Moves `work` into the ring with its record, if there is room.
    bool push_to_ring(detail::task& work, const detail::task_origin& origin) noexcept {
      return unstarted.try_push(work, [&](detail::slot_cell& cell, std::uint64_t) noexcept {
        detail::store_origin(cell, origin);
      });
    }

    void push(detail::task&& work, const detail::task_origin& origin) {
      if (push_to_ring(work, origin)) return;
      std::lock_guard guard(overflow_mutex);
      overflow.push_back({std::move(work), origin});
      overflow_size.store(overflow.size() - overflow_head, std::memory_order_seq_cst);  // see start()
    }

    // Takes the oldest unstarted task; `running` then records it as running
    // on this thread (before it leaves the queue, see task_tracking.hpp).
    bool pop(detail::task& work, detail::running_scope& running) noexcept {
      if (unstarted.try_pop(work, [&](const detail::slot_cell& cell, std::uint64_t) noexcept {
            running.start_from(cell);
          })) {
        return true;
      }
      if (overflow_size.load(std::memory_order_acquire) == 0) return false;
      // A frame push must not register this thread under overflow_mutex (the
      // registry takes its mutex, then this one, in collect()).
      const bool registered = !detail::registry_compiled || detail::register_this_thread_early();
      std::lock_guard guard(overflow_mutex);
      if (overflow_head == overflow.size()) return false;
      work = std::move(overflow[overflow_head].work);
      if (registered) running.start(overflow[overflow_head].origin);
      // Moves what fits into the ring, so the next takers find it there
      // rather than queueing for this lock one task at a time: with 16
      // runners and the waiting thread taking a group's 1,000 tasks on 16
      // cores, that made the spawn and wait 28% faster.
      for (++overflow_head; overflow_head != overflow.size(); ++overflow_head) {
        if (!push_to_ring(overflow[overflow_head].work, overflow[overflow_head].origin)) break;
      }
      if (overflow_head == overflow.size()) {
        overflow.clear();  // keeps the capacity
        overflow_head = 0;
      }
      overflow_size.store(overflow.size() - overflow_head, std::memory_order_release);
      return true;
    }

    // Counts tasks being pushed right now too, so a runner that sees one
    // keeps going until it is published.
    bool has_unstarted() const noexcept {
      return unstarted.claimed_unpopped() || overflow_size.load(std::memory_order_seq_cst) != 0;
    }

    // Runs one task; counts its completion in `finished` (the caller
    // subtracts those from `pending` in a batch).
    void run(detail::task& work) noexcept {
      if (cancellation.token().cancelled()) {
        skipped.store(true, std::memory_order_relaxed);
      } else {
        const detail::running_group_scope running_here{id, ancestry};
        try {
          work();
        } catch (...) {
          record_failure(std::current_exception());
        }
      }
      work.reset();
      if (limit) limit->release();
    }

    // Only the first failure cancels the token, so that its cause is the
    // exception wait() rethrows: a later one cancelling first made them
    // differ.
    void record_failure(std::exception_ptr error) noexcept {
      {
        std::lock_guard guard(error_mutex);
        if (failed.load(std::memory_order_relaxed)) return;
        first_error = error;
        failed.store(true, std::memory_order_release);
      }
      cancellation.cancel(std::move(error));
    }

    // The unstarted tasks of a group whose pool shut down with no runner
    // left: destroyed unrun, and the group fails with weft::rejected, as
    // go() on that pool would. A waiting thread could run them, but
    // async_wait() cannot, and waited for good.
    void abandon_unstarted() noexcept {
      std::int64_t abandoned = 0;
      const auto unrun = [](const detail::slot_cell& cell, std::uint64_t) noexcept {
        detail::finished_unrun(detail::load_origin(cell));
      };
      for (detail::task work; unstarted.try_pop(work, unrun);) {
        work.reset();
        ++abandoned;
      }
      // Taken whole, and destroyed outside the lock (their destructors are
      // user code, and finished_unrun may take the registry's mutex).
      std::vector<queued_task> overflowed;
      std::size_t first = 0;
      {
        std::lock_guard guard(overflow_mutex);
        overflowed.swap(overflow);
        first = std::exchange(overflow_head, 0);
        overflow_size.store(0, std::memory_order_release);
      }
      for (std::size_t i = first; i < overflowed.size(); ++i) {
        detail::finished_unrun(overflowed[i].origin);
      }
      abandoned += static_cast<std::int64_t>(overflowed.size() - first);
      overflowed.clear();
      if (abandoned == 0) return;
      record_failure(pool_shut_down());
      if (limit) limit->release(abandoned);
      pending.add(-abandoned);
    }

    std::exception_ptr pool_shut_down() const noexcept {
      try {
        return std::make_exception_ptr(rejected("weft::task_group: its executor's pool \"" +
                                                executor.context().name() +
                                                "\" shut down before the group's tasks could run"));
      } catch (...) {
        return std::current_exception();
      }
    }

    // A waiter parked on `pending` (see task_group::park) is woken when a
    // task is added: it may be the only thread free to run it.
    void wake_waiter() noexcept {
      std::lock_guard guard(waiter_mutex);
      if (waiter_wake) waiter_wake->cancel();
    }

    // Posts a runner if fewer than max_runners are out. If the pool is full
    // and no other runner is out, waits for room whatever the pool's policy
    // (as post(f, token) does; on one of the pool's own workers it runs the
    // runner here), so queued tasks always have a runner coming. Only a shut
    // down pool refuses; the runner is then destroyed unrun (see runner).
    void add_runner() noexcept {
      if (!claim_runner_slot()) return;
      try {
        if (detail::worker_pool_access::try_post_untracked(executor.context(), runner{this})) return;
        if (runners.load(std::memory_order_seq_cst) != 0 || !claim_runner_slot()) return;
        (void)detail::worker_pool_access::post_untracked(executor.context(), runner{this}, cancel_token{});
      } catch (...) {
      }
    }

    bool claim_runner_slot() noexcept {
      auto out = runners.load(std::memory_order_relaxed);
      do {
        if (out >= max_runners) return false;
      } while (!runners.compare_exchange_weak(out, out + 1, std::memory_order_relaxed));
      refs.fetch_add(1, std::memory_order_relaxed);
      return true;
    }

    // The body of a runner, on a pool worker.
    void drain() noexcept {
      detail::task work;
      detail::running_scope running;
      for (;;) {
        std::int64_t finished = 0;
        do {
          while (pop(work, running)) {
            run(work);
            running.stop();
            // Completions are published in batches; wait() needs them all,
            // and every runner publishes before it stops.
            if (++finished == 32) {
              pending.add(-finished);
              finished = 0;
            }
          }
        } while (next_task_soon());
        if (finished != 0) pending.add(-finished);
        // Seq_cst on both sides (see start()): either go() sees this runner
        // gone and posts another, or this runner sees the new task.
        runners.fetch_sub(1, std::memory_order_seq_cst);
        if (!has_unstarted()) return;
        auto out = runners.load(std::memory_order_relaxed);
        do {
          if (out >= max_runners) return;
        } while (!runners.compare_exchange_weak(out, out + 1, std::memory_order_relaxed));
      }
    }

    // Whether a task arrives within a moment, for a runner that found
    // none: it waits that long before it publishes its completions and
    // gives up its count. A runner that keeps up with its spawner finds the
    // ring empty after almost every task, and each time it left it wrote
    // the pending count and the runner count, and read the ring's tail:
    // lines that the spawner's next go() writes. 1,000 tiny tasks on 2
    // cores: go() took 86 ns with runners out (32 ns with none), and the
    // group ran 10.7M tasks/s; 13.0-14.2M/s with this wait. A join() under
    // way ends the wait at once, so that the completions it waits for are
    // not held back; an async_wait() may see them up to one wait late.
    bool next_task_soon() const noexcept {
      for (int polls = 0; polls < next_task_polls; ++polls) {
        if (unstarted.has_ready()) return true;
        if (overflow_size.load(std::memory_order_relaxed) != 0) return true;
        if (joining.load(std::memory_order_relaxed)) return false;
        detail::cpu_relax();
      }
      return false;
    }
    // About 1.2 us of pause instructions on the 2-core AMD machine (see
    // finish_polls). Runs of 1,000 tiny tasks, on 2 cores: 12.9M tasks/s
    // with 16 polls, 13.0-14.2M with 32 or 64, 11.8-12.1M with 128.
    static constexpr int next_task_polls = WEFT_WORKER_SPIN_LIMIT / 2;

    std::atomic<std::uint32_t> refs{1};
    std::uint64_t id = 0;  // this group's, never reused
    detail::group_ancestry ancestry;
    pool_executor executor;
    detail::reusable_source cancellation;  // renewed for each group
    // On a line of its own: go() adds to it for every task, and a runner
    // reads the fields that shared its line (token, limit) for every task,
    // so each go() pulled the line back from the runner's core
    // (group_spawn_wait on 2 cores: 480 ns per task before, 100 ns after).
    alignas(64) wait_group pending;
    alignas(64) std::unique_ptr<semaphore> limit;
    std::size_t max_runners;
    std::atomic<std::size_t> runners{0};
    std::atomic<int> waiters_parked{0};  // read by every start(), beside runners
    std::atomic<bool> joining{false};    // while a join() runs; see next_task_soon
    detail::spin_mutex waiter_mutex;
    std::optional<cancel_source> waiter_wake;  // under waiter_mutex

    detail::bounded_ring<detail::task, detail::slot_cell, detail::handoff_slot_alignment> unstarted{
        ring_capacity};
    // Tasks beyond the ring's capacity: a vector used as a FIFO, under a
    // lock, allocation-free once grown.
    std::atomic<std::size_t> overflow_size{0};
    mutable detail::spin_mutex overflow_mutex;
    std::vector<queued_task> overflow;
    std::size_t overflow_head = 0;

    std::atomic<bool> skipped{false};
    std::atomic<bool> failed{false};
    detail::spin_mutex error_mutex;
    std::exception_ptr first_error;
  };

  // What the executor runs: 8 bytes, inline in the pool's slot. A runner
  // destroyed unrun lets go of the core and its count: refused by a full
  // queue, it is followed by a post that waits (see add_runner). Dropped by
  // a shut-down pool (shutdown_now, or a post that raced shutdown) as the
  // last runner out, no runner will come: the group's unstarted tasks are
  // abandoned (see abandon_unstarted).
  class runner {
   public:
    explicit runner(core* c) noexcept : core_(c) {}
    runner(runner&& other) noexcept : core_(std::exchange(other.core_, nullptr)) {}
    runner& operator=(runner&&) = delete;
    ~runner() {
      if (core_ != nullptr) {
        // Seq_cst, as drain() gives up its count: a runner still draining
        // either counts here or sees the tasks as it leaves.
        const bool last = core_->runners.fetch_sub(1, std::memory_order_seq_cst) == 1;
        if (last && core_->executor.context().is_shutdown()) core_->abandon_unstarted();
        core_->unref();
      }
    }
    void operator()() noexcept {
      core* c = std::exchange(core_, nullptr);
      c->drain();
      c->unref();
    }

   private:
    core* core_;
  };

  // Waits for a slot under the limit, running the group's own unstarted
  // tasks meanwhile: the slots may be held by tasks no worker has taken yet.
  // It sleeps as a waiter in wait() does (see park), woken by a task added
  // meanwhile: a go() from a task slept through a sibling's task that was
  // pushed while it looked, and on a pool with no other worker free nobody
  // ran that task, nor freed its slot, until a wait() came to help (an
  // async_wait never does).
  void acquire_slot() {
    detail::task work;
    detail::running_scope running;
    while (!core_->limit->try_acquire()) {
      if (core_->pop(work, running)) {
        core_->run(work);
        running.stop();
        core_->pending.done();
        continue;
      }
      const cancel_token wake = wake_token();
      // Seq_cst, as in park().
      core_->waiters_parked.fetch_add(1, std::memory_order_seq_cst);
      bool acquired = false;
      if (!core_->has_unstarted()) {
        const detail::blocked_scope blocked{"task_group::go", nullptr};
        acquired = core_->limit->acquire(1, wake) == wait_status::ok;
      }
      core_->waiters_parked.fetch_sub(1, std::memory_order_relaxed);
      if (acquired) return;
    }
  }

  void check_open() const {
    if (core_->executor.context().is_shutdown()) {
      throw rejected("weft::task_group: its executor's pool \"" + core_->executor.context().name() +
                     "\" is shut down");
    }
  }

  template <class F>
  void start(F&& f, const spawn_site& site) {
    bool counted = false;
    try {
      core_->pending.add(1);  // throws std::overflow_error past 2^32 - 1 tasks in flight
      counted = true;
      if (!started_since_wait_.load(std::memory_order_relaxed)) {
        started_since_wait_.store(true, std::memory_order_relaxed);
      }
      const detail::task_origin origin = detail::make_origin(site, "task_group");
      core_->push(detail::task([c = core_, f = std::forward<F>(f)]() mutable {
                    detail::invoke_with_token(f, c->cancellation.token());
                  }),
                  origin);
      detail::accepted(origin);
    } catch (...) {
      if (core_->limit) core_->limit->release();
      if (counted) core_->pending.done();
      throw;
    }
    // The push was a seq_cst claim (or store, past the ring); see drain()
    // and park().
    if (core_->runners.load(std::memory_order_seq_cst) < core_->max_runners) core_->add_runner();
    if (core_->waiters_parked.load(std::memory_order_seq_cst) != 0) [[unlikely]] {
      core_->wake_waiter();
    }
  }

  void check_not_own_task() const {
    if (detail::running_inside(core_->id)) [[unlikely]] {
      throw std::logic_error(
          "weft::task_group::wait: called from one of the group's own tasks, or from a task of a "
          "group made inside one, which would wait for itself; wait where the group was made, and "
          "let tasks use token() to stop early");
    }
  }

  void join() noexcept {
    detail::task work;
    detail::running_scope running;
    detail::pool_teardown* teardown = detail::current_pool_teardown;
    core_->joining.store(true, std::memory_order_relaxed);
    while (core_->pending.count() != 0) {
      // The tasks run here are counted off in one subtraction, before the
      // count is read again.
      std::int64_t finished = 0;
      while (core_->pop(work, running)) {
        core_->run(work);
        running.stop();
        ++finished;
      }
      if (finished != 0) {
        core_->pending.add(-finished);
        continue;
      }
      if (tasks_end_soon()) continue;
      if (teardown != nullptr) {
        std::exchange(teardown, nullptr)->destroy_pending();
        continue;
      }
      park();
    }
    core_->joining.store(false, std::memory_order_relaxed);
    core_->pending.wait();  // the count is zero: one acquire load, after which the tasks' writes are visible
  }

  // Sleeps until the count reaches zero or a task is added. A parked waiter
  // that slept through a task added by one of the group's running tasks
  // left it to a runner, and there may be no worker to run that: a task
  // that adds a task and waits for it, on a pool whose workers are all
  // busy, waited for good (a waiter inside a task of a one-worker pool).
  void park() noexcept {
    const cancel_token wake = wake_token();
    // Seq_cst, against start()'s push then load: either start() sees the
    // waiter parked and wakes it, or the waiter sees the task.
    core_->waiters_parked.fetch_add(1, std::memory_order_seq_cst);
    if (!core_->has_unstarted()) {
      const detail::blocked_scope blocked{"task_group::wait", nullptr};
      (void)core_->pending.wait(wake);
    }
    core_->waiters_parked.fetch_sub(1, std::memory_order_relaxed);
  }

  // What a parked waiter sleeps on besides what it waits for: cancelled by
  // start() when it sees waiters parked. The waiters share one source; a
  // woken one makes the next. Out of memory, an empty token: a sleep that
  // only what it waits for ends.
  cancel_token wake_token() noexcept {
    try {
      {
        std::lock_guard guard(core_->waiter_mutex);
        if (core_->waiter_wake && !core_->waiter_wake->token().cancelled()) {
          return core_->waiter_wake->token();
        }
      }
      // Made outside the lock; left holding the spent source, if any,
      // which is let go of after the lock.
      cancel_source fresh;
      std::lock_guard guard(core_->waiter_mutex);
      if (!core_->waiter_wake) {
        core_->waiter_wake.emplace(fresh);
      } else if (core_->waiter_wake->token().cancelled()) {
        std::swap(*core_->waiter_wake, fresh);
      }
      return core_->waiter_wake->token();
    } catch (...) {
      return {};
    }
  }

  // Watches, for a while, for the last tasks to finish or for a task to
  // help with, before the waiter queues on the count. The last runner's
  // report then crosses to this thread once, where a queued waiter costs
  // it the queue's lock, the waiter's node and its wake-up, each a line
  // that crosses between the two cores (a fan-out of 16 calls of 170 ns on
  // 2 cores waited 0.46-0.59 us after the last call for its task to
  // report, and 0.23-0.27 us with this).
  bool tasks_end_soon() const noexcept {
    for (int polls = 0; polls < finish_polls; ++polls) {
      if (core_->pending.count() == 0 || core_->has_unstarted()) return true;
      detail::cpu_relax();
    }
    return false;
  }

  // After a join: what wait() reports (null for success). Marks the tasks
  // so far as waited for.
  std::exception_ptr outcome() {
    started_since_wait_.store(false, std::memory_order_relaxed);
    if (core_->failed.load(std::memory_order_acquire)) {
      error_delivered_ = true;
      return core_->first_error;
    }
    if (core_->skipped.exchange(false, std::memory_order_relaxed)) {
      try {
        core_->cancellation.token().cause().rethrow();
      } catch (...) {
        return std::current_exception();
      }
    }
    return nullptr;
  }

  void report_undelivered() const noexcept {
    try {
      std::rethrow_exception(core_->first_error);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "weft::task_group: destroyed without wait(); a task's exception was lost: %s\n",
                   e.what());
    } catch (...) {
      std::fprintf(stderr, "weft::task_group: destroyed without wait(); a task's non-standard exception was lost\n");
    }
  }

  core* core_;
  // About 2.5 us of pause instructions on the 2-core AMD machine (19 ns a
  // pause; Intel cores since Skylake take several times as long): a few
  // cache-line transfers, well under a wake-up.
  static constexpr int finish_polls = 128;

  std::atomic<bool> started_since_wait_{false};
  bool error_delivered_ = false;
};

namespace detail {
inline wait_group& task_group_access::pending(task_group& group) noexcept { return group.core_->pending; }
inline std::exception_ptr task_group_access::outcome(task_group& group) { return group.outcome(); }
inline bool task_group_access::begin(task_group& group) {
  if (group.core_->cancellation.token().cancelled()) {
    group.core_->skipped.store(true, std::memory_order_relaxed);
    return false;
  }
  group.core_->pending.add(1);
  group.started_since_wait_.store(true, std::memory_order_relaxed);
  return true;
}
inline void task_group_access::end(task_group& group, std::exception_ptr error) noexcept {
  if (error) fail(group, std::move(error));
  group.core_->pending.done();
}
inline void task_group_access::fail(task_group& group, std::exception_ptr error) noexcept {
  group.core_->record_failure(std::move(error));
}
}  // namespace detail

// A task_group whose tasks each return a T; wait() returns them in spawn
// order. T must be move-constructible.
template <class T>
class result_group {
 public:
  result_group() = default;
  explicit result_group(const cancel_token& parent) : group_(parent) {}
  explicit result_group(pool_executor executor, const cancel_token& parent = {}) : group_(executor, parent) {}

  template <class F>
  void go(F&& f, spawn_site site = spawn_site::current()) {
    detail::check_callable(f, "result_group::go");
    slot* target = add_slot();
    try {
      group_.go(bind(target, std::forward<F>(f)), site);
    } catch (...) {
      give_back(target);
      throw;
    }
  }

  template <class F>
  [[nodiscard]] bool try_go(F&& f, spawn_site site = spawn_site::current()) {
    detail::check_callable(f, "result_group::try_go");
    slot* target = add_slot();
    try {
      if (group_.try_go(bind(target, std::forward<F>(f)), site)) return true;
    } catch (...) {
      give_back(target);
      throw;
    }
    give_back(target);
    return false;
  }

  void set_limit(std::ptrdiff_t n) { group_.set_limit(n); }

  // The results in the order their go() calls were made (each takes its
  // place as it is entered); rethrows as task_group::wait() does. The group
  // may then be reused.
  std::vector<T> wait() {
    // Before the slots are touched: the group's tasks still write them.
    group_.check_not_own_task();
    // The tasks so far are reported, by the results or by the exception,
    // and the next wait starts afresh: the slots are taken out first, so
    // that a T whose move throws leaves none behind.
    std::deque<slot> finished;
    try {
      group_.wait();
    } catch (...) {
      std::lock_guard guard(mutex_);
      results_.clear();
      throw;
    }
    {
      std::lock_guard guard(mutex_);
      finished.swap(results_);
    }
    std::vector<T> out;
    out.reserve(finished.size());
    for (auto& r : finished) {
      if (r.used) out.push_back(std::move(*r.value));
    }
    return out;
  }

  [[nodiscard]] cancel_token token() const noexcept { return group_.token(); }
  void cancel() noexcept { group_.cancel(); }

 private:
  struct slot {
    std::optional<T> value;
    bool used = true;  // false when try_go declined the task
  };

  // The next slot in spawn order; a deque, so earlier slots never move.
  slot* add_slot() {
    std::lock_guard guard(mutex_);
    return &results_.emplace_back();
  }

  // A slot whose task was declined, or whose go() threw: skipped by wait().
  void give_back(slot* target) noexcept {
    std::lock_guard guard(mutex_);
    target->used = false;
  }

  // The task that fills `target`.
  template <class F>
  static auto bind(slot* target, F&& f) {
    static_assert(std::is_convertible_v<decltype(detail::invoke_with_token(std::declval<std::decay_t<F>&>(),
                                                                           std::declval<const cancel_token&>())),
                                        T>,
                  "weft::result_group<T>: each task must return something convertible to T");
    return [target, f = std::forward<F>(f)](const cancel_token& token) mutable {
      target->value.emplace(detail::invoke_with_token(f, token));
    };
  }

  // Destroyed after group_, which joins every task that writes a slot.
  detail::spin_mutex mutex_;
  std::deque<slot> results_;
  task_group group_;
};

}  // namespace weft
