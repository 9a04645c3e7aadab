// SPDX-License-Identifier: BSL-1.0
// weft::worker_pool: a fixed set of worker threads fed by one bounded task
// queue.
//
// Go analogue: N worker goroutines ranging over a buffered channel of jobs.
// C++ alternatives: boost::asio::thread_pool (unbounded queue), tbb::task_arena,
// a hand-written mutex + condition_variable + std::deque pool.
//
// Bounded: the queue holds at most queue_capacity tasks. What post() does
// when it is full is the pool's overflow policy:
//   block        wait for room (backpressure on the producer)
//   reject       throw weft::rejected (try_post returns false instead)
//   caller_runs  run the task on the posting thread, now
// A worker of this pool that posts into its own full queue runs the task
// itself, whatever the policy says, except that post(f) and try_post(f)
// under `reject` still reject (post(f, token) asks to wait, so it runs the
// task too): when every worker waited for room that only workers can make,
// the pool would deadlock. A thread already running 16 such tasks, one
// inside another (a task that posts its successor, over and over), queues
// the next past the full queue instead, as Asio's hand-offs are (below),
// rather than nest deeper; caller_runs does the same.
//
// Order: a worker that finds the queue deep claims a run of up to 16 tasks
// at once and runs them in order; those it has not started yet stay
// queued (stats().queued and the registry count them), and any worker that
// runs out of work takes them. So a task never waits behind a blocked one
// while another worker is idle, but tasks do not always start in the order
// they were queued, and up to 15 per worker can wait beyond queue_capacity.
//
// Asio: what Asio hands the pool (boost::asio::post onto pool.executor(), a
// timer's or a socket's completion, a strand's turn, a coroutine's next
// step) never waits for room: it is queued past a full queue, in a list
// that workers serve in turn with the queue, and counted in stats().queued and
// stats().over_capacity. Waiting there would block the thread that
// completed the operation: Asio's reactor thread, or the thread behind
// every weft deadline, while the workers wait for one of them. It is
// bounded by the Asio work under way, and by the tasks a thread 16 inline
// runs deep posts into the full queue (above): a task there that posts in
// a loop grows it for as long as the loop runs. A producer that needs
// backpressure posts with post() from outside the pool's own tasks.
//
// Errors: a task that throws never kills its worker. For submit() the
// exception reaches the future; for post() it goes to the error handler
// (set_error_handler; by default it writes one line to stderr), and both
// count in stats().failed; a handler that throws has both exceptions
// written to stderr. A task's destructor must not throw (a static_assert
// says so). Posting after shutdown throws weft::rejected. Zero workers, a
// zero queue capacity, or a null function pointer as a task throw
// std::invalid_argument.
//
// Shutdown: shutdown() stops intake; the workers run what is queued, then
// exit. shutdown_now() stops intake and destroys what is queued without
// running it, returning how many tasks that was. join() waits for the
// workers to exit. The destructor is shutdown() + join(). Producers blocked
// on a full queue wake with weft::rejected. A post that races shutdown()
// either throws weft::rejected or its task is queued before shutdown()
// returns, and runs before join() returns (on the thread that calls join(),
// if the workers have already exited; after shutdown_now(), join() drops
// it). A post that found the queue full just before shutdown() and runs its
// task on the posting thread (caller_runs, or a worker posting into its
// own pool) may still be running it after join() has returned: it was
// never queued. What Asio hands over while join() stops the pool's Asio
// services is destroyed and counted as rejected (see asio/executor.hpp).
//
// Threads: the workers start in the constructor and inherit the signal
// mask and CPU affinity of the thread that makes the pool (for
// default_executor(), of the thread that first uses it), as
// boost::asio::thread_pool's do: they run the program's tasks, and a
// profiler that samples with SIGPROF must see them. A program that takes
// its signals in one thread (sigwait, signalfd) blocks them before it makes
// a pool. The threads weft starts on its own (a clock's timer thread, the
// registry's clock) block the signals sent to the process.
//
// Thread safety: every member may be called concurrently, except the
// destructor; neither the destructor nor join() may run on one of the
// pool's own workers (the worker would wait for itself; join() throws
// std::logic_error). As for any object, the destructor must not run while
// another thread may still call a member, a producer blocked in post()
// included: shutdown() wakes those with weft::rejected, and the pool is
// destroyed once they have returned.
//
// Memory ordering: everything before a post() happens-before the task runs.
//
// Cost: a task is a move-only callable kept inline up to five pointers of
// captures (no allocation per post). A post is one compare-and-swap on the
// queue's tail and a check (two loads) that some worker is awake
// to take it; it makes a system call only to wake a parked worker, and only
// when no worker is already awake and looking for work. A worker that runs
// out of work spins before it parks (longer while a hardware thread is
// spare, see WEFT_WORKER_SPIN_LIMIT), and the worker that finds work
// first wakes the next one only if more is queued, so adding workers does
// not make producers pay for more wake-ups. Workers take a deep queue in
// runs (one compare-and-swap on its head per run, see claim), so adding
// workers does not add a fight for the head on every task either. A post
// that waits for room (overflow::block, or a post with a token) spins and
// yields for a while, until a quarter of the queue (at most 256 slots) is
// free, so that it writes well behind the slots the workers are emptying
// (see wait_for_room); after that it parks and takes the first slot freed.
// Queue wait is timed on one task in 16 (two clock reads each would cost a
// quarter of the throughput).
//
// Example:
//   weft::worker_pool db{{.workers = 8, .queue_capacity = 1024, .name = "db"}};
//   db.post([&] { write(record); });                 // waits while 1024 are queued
//   std::future<row> r = db.submit([&] { return read(key); });
#pragma once

#include <weft/cancel.hpp>
#include <weft/config.hpp>
#include <weft/detail/available_cpus.hpp>
#include <weft/detail/backoff.hpp>
#include <weft/detail/bounded_ring.hpp>
#include <weft/detail/futex.hpp>
#include <weft/detail/spin_mutex.hpp>
#include <weft/detail/task.hpp>
#include <weft/detail/task_tracking.hpp>
#include <weft/detail/wait_queue.hpp>
#include <weft/spawn_site.hpp>
#include <weft/wait_status.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <exception>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#endif

namespace weft {

// Thrown when a pool cannot take a task: it is shut down, or it is full and
// its policy is overflow::reject.
class rejected : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class overflow { block, reject, caller_runs };

// How many threads this process can run at once: the CPUs of the affinity
// mask (taskset, a container's cpuset) of the thread that first asks, which
// the workers of a pool it makes inherit, capped by the process's cgroups'
// CPU quota rounded up (a container's CPU limit); see
// detail/available_cpus.hpp. Read once per process: it reads files under
// /proc and /sys, and fan.hpp asks on every call.
inline std::size_t hardware_threads() noexcept {
  static const std::size_t threads = detail::available_cpus();
  return threads;
}

struct worker_pool_options {
  std::size_t workers = hardware_threads();
  std::size_t queue_capacity = 1024;
  overflow on_full = overflow::block;
  std::string name = "worker_pool";
};

// Counts read while tasks run are each of their own moment, but
// failed <= completed and completed + dropped <= submitted always hold.
struct worker_pool_stats {
  std::size_t workers = 0;
  std::size_t busy = 0;            // workers running a task now
  std::size_t queued = 0;          // waiting now: queued, held by a worker, or past a full queue
  std::size_t peak_queued = 0;     // the most `queued` seen (sampled; see note_queued)
  std::uint64_t submitted = 0;     // accepted: queued, or run by the caller
  std::uint64_t completed = 0;     // finished running, with or without an exception
  std::uint64_t failed = 0;        // of those, ended by an exception
  std::uint64_t rejected = 0;      // refused: full under overflow::reject, a try_post that
                                   // found it full, or shut down (Asio work handed to a
                                   // shut-down pool too)
  std::uint64_t dropped = 0;       // destroyed unrun by shutdown_now()
  std::uint64_t over_capacity = 0;  // Asio work queued past a full queue (see above)
  std::size_t waiting_for_room = 0;  // producers blocked in post() on a full queue now,
                                     // past their first short spin
  // Time from queue to start, measured on every 16th queued task: the total
  // is the sampled sum times 16 (an estimate), the max is over the sample.
  std::chrono::nanoseconds total_queue_wait{0};
  std::chrono::nanoseconds max_queue_wait{0};
};

class worker_pool;
namespace detail {
struct worker_pool_access;

// The teardown of a joined pool's Asio services, under way on this thread
// (asio/executor.hpp). Destroying the operations they hold pending can
// destroy a coroutine that owns a task_group, whose destructor then waits
// for the group's own coroutines; when their frames are held by a service
// the teardown has not reached yet, only this thread can destroy them, so
// the waiting destructor asks the teardown to finish first
// (destroy_pending). Each service gives up what it holds once, so a second
// pass over them ends. It reaches only what a service still holds, not
// what the first pass has already taken out (asio/task_group.hpp lists the
// shapes that still hang).
class pool_teardown {
 public:
  virtual void destroy_pending() noexcept = 0;

 protected:
  ~pool_teardown() = default;
};
inline thread_local pool_teardown* current_pool_teardown = nullptr;
}

// A cheap, copyable handle that posts to a pool; weft/asio.hpp makes it an
// Asio executor. It does not keep the pool alive.
class pool_executor {
 public:
  pool_executor() = delete;
  explicit pool_executor(worker_pool& pool) noexcept : pool_(&pool) {}

  template <class F>
  void post(F&& task, spawn_site site = spawn_site::current()) const;
  template <class F>
  void execute(F&& task) const;

  worker_pool& context() const noexcept { return *pool_; }
  bool running_in_this_thread() const noexcept;

  friend bool operator==(const pool_executor&, const pool_executor&) noexcept = default;

 private:
  worker_pool* pool_;
};

namespace detail {
// The pool whose worker this thread is, if any.
inline thread_local const worker_pool* current_worker_pool = nullptr;
// Tasks this thread runs because the queue they were posted to was full,
// one inside another (see worker_pool::run_here_or_queue).
inline thread_local int inline_runs = 0;
}  // namespace detail

class worker_pool {
 public:
  using executor_type = pool_executor;
  using clock = std::chrono::steady_clock;

  explicit worker_pool(worker_pool_options options = {})
      : options_(checked(std::move(options))), tracked_name_(detail::intern(options_.name)),
        ring_(options_.queue_capacity), workers_(new worker[options_.workers]),
        room_(this, nullptr, "worker_pool post", tracked_name_) {
    // Deadlines keep firing until this pool has joined its workers at exit.
    detail::timer_threads::keep_until_exit();
    idle_.reserve(options_.workers);
    started_.reserve(options_.workers);
    try {
      for (std::size_t i = 0; i < options_.workers; ++i) {
        workers_[i].thread = std::thread([this, i] { run_worker(workers_[i], i); });
        started_.push_back(&workers_[i]);
      }
      if constexpr (detail::registry_compiled) detail::add_source(queued_tasks_);
    } catch (...) {
      shutdown();
      join();
      throw;
    }
  }

  worker_pool(const worker_pool&) = delete;
  worker_pool& operator=(const worker_pool&) = delete;

  ~worker_pool() {
    WEFT_ASSERT(!running_in_this_thread() && "a worker_pool was destroyed by one of its own tasks");
    shutdown();
    join();
    if constexpr (detail::registry_compiled) detail::remove_source(queued_tasks_);
    extensions_.clear();
    first_extension_key_.store(nullptr, std::memory_order_relaxed);
  }

  // Queues f; a full queue gets the overflow policy. Throws weft::rejected
  // after shutdown (and when full under overflow::reject).
  template <class F>
  void post(F&& f, spawn_site site = spawn_site::current()) {
    detail::task work = make_task(std::forward<F>(f));
    check_open();
    post_task(work, detail::origin_to_make{site, tracked_name_});
  }

  // Queues f if there is room now; never waits for room, never runs f here
  // (it may wait, spinning, for a worker to finish moving a task out of the
  // slot f takes: so a task's move constructor must not post into its own
  // pool). False when the queue is full; throws weft::rejected after
  // shutdown.
  template <class F>
  [[nodiscard]] bool try_post(F&& f, spawn_site site = spawn_site::current()) {
    detail::task work = make_task(std::forward<F>(f));
    check_open();
    return try_post_task(work, detail::origin_to_make{site, tracked_name_});
  }

  // Waits for room whatever the policy; ok once queued (or, on a worker of
  // this pool, run here), cancelled or timeout when the token stopped the
  // wait first (f is then destroyed unrun). Throws weft::rejected after
  // shutdown.
  template <class F>
  wait_status post(F&& f, const cancel_token& token, spawn_site site = spawn_site::current()) {
    detail::task work = make_task(std::forward<F>(f));
    check_open();
    if (token.cancelled()) return detail::state_of(token)->stop_status();
    return post_task(work, token, detail::origin_to_make{site, tracked_name_});
  }

  // Queues f and returns a future for its result or its exception. Waiting
  // on that future in one of this pool's own tasks can deadlock: the
  // waiting task holds its worker while f may be queued behind it (with
  // one worker, it always is), and a std::future cannot run f itself. In a
  // task, use a task_group or parallel_map, whose waits run queued work.
  template <class F>
  auto submit(F&& f, spawn_site site = spawn_site::current())
      -> std::future<std::invoke_result_t<std::decay_t<F>&>> {
    using result = std::invoke_result_t<std::decay_t<F>&>;
    detail::check_callable(f, "worker_pool::submit");
    std::promise<result> promise;
    auto future = promise.get_future();
    post([this, promise = std::move(promise), f = std::forward<F>(f)]() mutable {
      try {
        if constexpr (std::is_void_v<result>) {
          f();
          promise.set_value();
        } else {
          promise.set_value(f());
        }
      } catch (...) {
        counters_.failed.fetch_add(1, std::memory_order_relaxed);
        promise.set_exception(std::current_exception());
      }
    }, site);
    return future;
  }

  // Stops intake; queued tasks still run. Returns at once.
  void shutdown() noexcept { close(false); }

  // Stops intake and destroys the queued tasks unrun; returns how many.
  // Tasks already running finish. A task that a worker took from the queue
  // as this began counts as running: it is not among those dropped, and it
  // may begin just after this returns. Every task is either run or dropped.
  std::size_t shutdown_now() noexcept {
    close(true);
    std::size_t dropped = drop_queued();
    for (std::size_t i = 0; i < options_.workers; ++i) dropped += drop_held(workers_[i]);
    counters_.dropped.fetch_add(dropped, std::memory_order_relaxed);
    return dropped;
  }

  // Waits for the workers to exit (call shutdown() first, or it waits
  // forever). Runs, here, any task that a post racing shutdown() queued
  // after the workers left.
  void join() {
    if (running_in_this_thread()) {
      throw std::logic_error("weft::worker_pool::join: called from one of the pool's own workers, "
                             "which would wait for itself");
    }
    std::lock_guard guard(join_mutex_);
    join_workers();
    if (discarding_.load(std::memory_order_relaxed)) {
      counters_.dropped.fetch_add(drop_queued(), std::memory_order_relaxed);
    } else {
      run_leftovers();
    }
    // Asio operations still pending can complete on no worker now: the
    // pool's execution context abandons them (see asio/executor.hpp), after
    // shutdown_now() too.
    std::vector<std::function<void()>> hooks;
    {
      std::lock_guard extensions_guard(extensions_mutex_);
      hooks.swap(joined_hooks_);
    }
    // What Asio's reactor hands over while the context stops it finds the
    // queue closed, and is destroyed and counted as rejected.
    for (auto& hook : hooks) hook();
  }

  bool is_shutdown() const noexcept { return closed_.load(std::memory_order_acquire); }

  // Replaces the handler that receives exceptions thrown by posted tasks.
  // It runs on the worker that ran the task, so on several at once; a
  // worker that took the old handler may still be calling it as this
  // returns. An empty handler restores the default (one line to stderr).
  // An exception the handler throws is written to stderr after the task's.
  void set_error_handler(std::function<void(std::exception_ptr)> handler) {
    shared_error_handler replacement;
    if (handler) replacement = std::make_shared<const error_handler>(std::move(handler));
    {
      std::lock_guard guard(handler_mutex_);
      error_handler_.swap(replacement);
    }
    // The old handler is destroyed here, outside the lock (its destructor
    // is user code), or by a worker still calling it.
  }

  executor_type executor() noexcept { return executor_type{*this}; }

  bool running_in_this_thread() const noexcept { return detail::current_worker_pool == this; }

  std::size_t size() const noexcept { return options_.workers; }
  std::size_t queue_capacity() const noexcept { return options_.queue_capacity; }
  overflow overflow_policy() const noexcept { return options_.on_full; }
  const std::string& name() const noexcept { return options_.name; }

  worker_pool_stats stats() const noexcept {
    worker_pool_stats s;
    s.workers = options_.workers;
    s.queued = queued_now();
    // Kept, so that a later peak is never below a count reported now.
    note_queued(s.queued);
    s.peak_queued = peak_queued_.load(std::memory_order_relaxed);
    s.rejected = counters_.rejected.load(std::memory_order_relaxed);
    // The counts are read one after another while tasks run, each at its
    // own moment. They are read in the reverse of the order in which a task
    // moves them (failed, completed and dropped, then submitted), and a
    // count that still ran ahead of one read after it is cut to it, as of a
    // moment before those tasks ended (the longest sampled wait likewise to
    // the total). A monitor computing submitted - completed or
    // completed - failed never sees it wrap around.
    s.failed = counters_.failed.load(std::memory_order_relaxed);
    std::int64_t total_wait = 0;
    std::int64_t max_wait = 0;
    auto add = [&](const task_counters& c) {
      s.failed += c.failed.load(std::memory_order_relaxed);
      s.completed += c.completed.load(std::memory_order_relaxed);
      max_wait = std::max(max_wait, c.max_wait_ns.load(std::memory_order_relaxed));
      total_wait += c.total_wait_ns.load(std::memory_order_relaxed);
    };
    for (std::size_t i = 0; i < options_.workers; ++i) {
      add(workers_[i].counters);
      if (workers_[i].busy.load(std::memory_order_relaxed)) ++s.busy;
    }
    add(caller_counters_);
    s.dropped = counters_.dropped.load(std::memory_order_relaxed);
    s.over_capacity = over_capacity_pushed_.load(std::memory_order_relaxed);
    s.waiting_for_room = room_waiters_.load(std::memory_order_relaxed);
    s.submitted =
        ring_.pushed() + counters_.ran_by_caller.load(std::memory_order_relaxed) + s.over_capacity;
    s.completed = std::min(s.completed, s.submitted);
    s.dropped = std::min(s.dropped, s.submitted - s.completed);
    s.failed = std::min(s.failed, s.completed);
    max_wait = std::min(max_wait, total_wait * static_cast<std::int64_t>(queue_wait_sampling));
    s.total_queue_wait = std::chrono::nanoseconds{total_wait * static_cast<std::int64_t>(queue_wait_sampling)};
    s.max_queue_wait = std::chrono::nanoseconds{max_wait};
    return s;
  }

 private:
  friend struct detail::worker_pool_access;

  // Reading the clock twice per task would cost a quarter of a tiny task's
  // throughput, so queue wait is sampled.
  static constexpr std::uint64_t queue_wait_sampling = 16;

  // What a queue slot keeps beside its task: the task's registry record,
  // whose id shares the task's cache line (see origin_cell), and, for the
  // timed tasks, when it was queued (in nanoseconds on `clock`). An
  // untracked, untimed task touches only the slot's first line.
  struct slot_extras {
    [[no_unique_address]] detail::slot_cell origin;
    std::int64_t queued_ns = 0;
  };

  // One task in queue_wait_sampling is timed, chosen by its position, which
  // its producer and its consumer both know.
  static bool timed(std::uint64_t position) noexcept { return position % queue_wait_sampling == 0; }

  static std::int64_t now_ns() noexcept {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(clock::now().time_since_epoch()).count();
  }

  // Counted by one thread (a worker) with plain load + store, read by
  // stats() from any thread; the caller's set is shared and uses RMWs.
  struct task_counters {
    explicit task_counters(bool shared_by_threads = false) noexcept : shared(shared_by_threads) {}
    const bool shared;
    std::atomic<std::uint64_t> completed{0};
    std::atomic<std::uint64_t> failed{0};
    std::atomic<std::int64_t> total_wait_ns{0};
    std::atomic<std::int64_t> max_wait_ns{0};
  };

  // A task a worker has taken from the queue and not started yet.
  struct claimed_task {
    detail::task work;
    detail::task_origin origin;
    std::int64_t queued_ns = 0;  // when it was queued, for a timed task; else 0
  };

  // The most tasks one claim takes from the queue (see claim).
  static constexpr std::size_t max_claim = 16;
  // The most tasks a thread runs one inside another because the queue was
  // full (see run_here_or_queue).
  static constexpr int max_inline_depth = 16;

  struct alignas(64) worker {
    std::thread thread;
    // Set to 1 by the thread that takes this worker off the idle list.
    std::atomic<std::uint32_t> wake_signal{0};
    std::atomic<bool> busy{false};
    // False when registering the thread with the registry failed (out of
    // memory): its tasks then run untracked.
    bool registered = true;
    // How many tasks the next claim asks for; the worker's own.
    std::size_t claim_size = 1;
    task_counters counters;

    // The tasks of this worker's last claim that it has not started: the
    // worker runs them in order, and any other worker that runs out of work
    // takes them (from the back), so a task held here never waits for one
    // that blocks ahead of it while a worker is free. On a line of their
    // own: the owner takes one per task.
    alignas(64) detail::spin_mutex held_mutex;
    std::atomic<std::size_t> held_count{0};  // written under held_mutex
    std::size_t held_first = 0;             // under held_mutex
    claimed_task held[max_claim - 1];
  };

  static worker_pool_options checked(worker_pool_options options) {
    if (options.workers == 0) {
      throw std::invalid_argument(
          "weft::worker_pool \"" + options.name +
          "\": workers must be at least 1 (weft::hardware_threads() is what this process may use)");
    }
    if (options.on_full != overflow::block && options.on_full != overflow::reject &&
        options.on_full != overflow::caller_runs) {
      throw std::invalid_argument(
          "weft::worker_pool \"" + options.name +
          "\": on_full is not an overflow policy (block, reject or caller_runs)");
    }
    if (options.queue_capacity == 0) {
      throw std::invalid_argument("weft::worker_pool \"" + options.name +
                                  "\": queue_capacity must be at least 1; overflow::caller_runs "
                                  "gives a pool that runs overflow in the caller");
    }
    return options;
  }

  template <class F>
  static detail::task make_task(F&& f) {
    static_assert(std::is_invocable_v<std::decay_t<F>&>, "weft::worker_pool: a task must be callable as f()");
    detail::check_callable(f, "worker_pool");
    return detail::task(std::forward<F>(f));
  }

  void check_open() {
    if (closed_.load(std::memory_order_relaxed)) [[unlikely]] throw_closed();
  }

  // `origin`: a detail::task_origin, or an origin_to_make, which becomes
  // one only where the task goes on past a full queue.
  template <class Origin>
  void post_task(detail::task& work, const Origin& origin) {
    if (enqueue(work, origin)) return;
    post_to_full(work, detail::make_origin(origin));
  }

  template <class Origin>
  bool try_post_task(detail::task& work, const Origin& origin) {
    if (try_queue(work, origin)) return true;
    counters_.rejected.fetch_add(1, std::memory_order_relaxed);
    return false;
  }

  // Queues work if there is room now; throws weft::rejected once shut down.
  template <class Origin>
  bool try_queue(detail::task& work, const Origin& origin) {
    if (enqueue(work, origin)) return true;
    if (ring_.closed()) throw_closed();
    note_full();
    return false;
  }

  template <class Origin>
  wait_status post_task(detail::task& work, const cancel_token& token, const Origin& origin) {
    if (enqueue(work, origin)) return wait_status::ok;
    if (ring_.closed()) throw_closed();
    note_full();
    if (running_in_this_thread()) {
      run_here_or_queue(work, detail::make_origin(origin));
      return wait_status::ok;
    }
    const auto status = wait_for_room(work, detail::make_origin(origin), detail::state_of(token));
    if (status == wait_status::closed) throw_closed();
    return status;
  }

  // The registry's hooks around the ring: a task's record goes into its
  // slot when it is queued, and onto the running thread's frames (before
  // the slot is freed) when it is taken.
  // Returns when the task was queued (0: not timed).
  static std::int64_t begin_running(const slot_extras& cell, std::uint64_t position,
                                    detail::running_scope& running) noexcept {
    running.start_from(cell.origin);
    return queued_time(cell, position);
  }

  // When the task at `position` was queued, if it is timed; else 0.
  static std::int64_t queued_time(const slot_extras& cell, std::uint64_t position) noexcept {
    return timed(position) ? cell.queued_ns : 0;
  }

  static void drop_origin(const slot_extras& cell) noexcept {
    detail::finished_unrun(detail::load_origin(cell.origin));
  }

  // The queued tasks, for the registry's snapshots.
  struct queued_tasks final : detail::task_source {
    explicit queued_tasks(const worker_pool& p) noexcept : pool(p) {}
    // The ring first: a task claimed meanwhile is then seen twice (which
    // snapshots allow), never missed.
    void collect(std::vector<detail::task_record>& out) const override {
      detail::collect_queued(pool.ring_, out, [](const slot_extras& cell) -> const auto& { return cell.origin; });
      for (std::size_t i = 0; i < pool.options_.workers; ++i) {
        worker& w = pool.workers_[i];
        std::lock_guard guard(w.held_mutex);
        for (std::size_t k = 0; k < w.held_count.load(std::memory_order_relaxed); ++k) {
          detail::add_queued(out, w.held[w.held_first + k].origin);
        }
      }
      std::lock_guard guard(pool.over_capacity_mutex_);
      for (const claimed_task& task : pool.over_capacity_) detail::add_queued(out, task.origin);
    }
    const worker_pool& pool;
  };

  [[noreturn]] WEFT_NOINLINE void throw_closed() {
    counters_.rejected.fetch_add(1, std::memory_order_relaxed);
    throw rejected("weft::worker_pool \"" + options_.name + "\": shut down, no longer takes tasks");
  }

  // Queues `work` (moving it) if there is room, and makes sure a worker is
  // awake to take it. False when the queue is full or closed; a slot that
  // a worker is still emptying is waited for (push_unless_full): taken for
  // "full", it made a post under overflow::reject throw, try_post return
  // false and caller_runs run the task on its caller, with room in the queue.
  template <class Origin>
  bool enqueue(detail::task& work, const Origin& origin) noexcept {
    std::uint64_t position = 0;
    std::uint64_t id = 0;
    const auto fill = [&](slot_extras& cell, std::uint64_t at) noexcept {
      id = detail::store_origin(cell.origin, origin);
      if (timed(at)) cell.queued_ns = now_ns();
    };
    if (!ring_.push_unless_full(work, fill, &position)) return false;
    detail::accepted(id);
    if (position % 64 == 0) note_queued(ring_.size());
    // The push claimed its position with a seq_cst compare-and-swap; a
    // worker going idle (or dropping its spinning mark) writes that with
    // seq_cst and then reads the claims. Either this thread's seq_cst reads
    // in wake_idle_worker see that worker, or the worker sees this task.
    wake_idle_worker();
    return true;
  }

  // peak_queued: noted every 64 posts (the queue alone), whenever the
  // queue is full (the queue and what waits past it), and by every
  // stats() (everything `queued` counts, held tasks too: reading every
  // worker's count on each post that finds the queue full would cost a
  // producer that keeps trying a cache miss per worker).
  void note_queued(std::size_t queued) const noexcept {
    auto peak = peak_queued_.load(std::memory_order_relaxed);
    while (queued > peak && !peak_queued_.compare_exchange_weak(peak, queued, std::memory_order_relaxed)) {
    }
  }

  // Tasks waiting: in the queue, held by workers, and past a full queue.
  std::size_t queued_now() const noexcept {
    std::size_t queued = ring_.size();
    for (std::size_t i = 0; i < options_.workers; ++i) {
      queued += workers_[i].held_count.load(std::memory_order_relaxed);
    }
    return queued + over_capacity_count_.load(std::memory_order_relaxed);
  }

  void note_full() noexcept {
    note_queued(options_.queue_capacity + over_capacity_count_.load(std::memory_order_relaxed));
  }

  WEFT_NOINLINE void post_to_full(detail::task& work, const detail::task_origin& origin) {
    if (ring_.closed()) throw_closed();
    note_full();
    switch (options_.on_full) {
      case overflow::reject:
        counters_.rejected.fetch_add(1, std::memory_order_relaxed);
        throw rejected("weft::worker_pool \"" + options_.name + "\": the queue is full (" +
                       std::to_string(options_.queue_capacity) + " tasks) and the policy is overflow::reject");
      case overflow::caller_runs:
        run_here_or_queue(work, origin);
        return;
      case overflow::block:
        if (running_in_this_thread()) {
          run_here_or_queue(work, origin);
          return;
        }
        if (wait_for_room(work, origin, nullptr) == wait_status::closed) throw_closed();
        return;
    }
  }

  // Runs a task that found the queue full on the posting thread, unless
  // that thread is already running max_inline_depth such tasks one inside
  // another: it is then queued past the full queue (as Asio's hand-offs
  // are), where a worker takes it. A task that posts its successor into a
  // full pool on its only worker (a continuation, an actor's loop) nested
  // a level deeper with every post, and a long chain overflowed the stack.
  void run_here_or_queue(detail::task& work, const detail::task_origin& origin) {
    if (detail::inline_runs < max_inline_depth) {
      run_here(work, origin);
    } else if (!queue_past_capacity(work, origin)) {
      throw_closed();
    }
  }

  void run_here(detail::task& work, const detail::task_origin& origin) {
    counters_.ran_by_caller.fetch_add(1, std::memory_order_relaxed);
    detail::accepted(origin);
    const detail::running_scope running{origin};
    ++detail::inline_runs;
    run_task(work, 0, caller_counters_);
    --detail::inline_runs;
  }

  // Joins the workers, but not the calling thread, should it be one (see
  // worker_pool_access::finish_at_exit). Under join_mutex_.
  void join_workers() {
    for (worker* w : started_) {
      if (w->thread.joinable() && w->thread.get_id() != std::this_thread::get_id())
        w->thread.join();
    }
  }

  // After the workers have exited: runs, on this thread, what a post racing
  // shutdown() queued after they left.
  void run_leftovers() {
    detail::running_scope running;
    std::int64_t queued_ns = 0;
    const auto on_pop = [&](const slot_extras& cell, std::uint64_t position) noexcept {
      queued_ns = begin_running(cell, position, running);
    };
    for (detail::task work; ring_.try_pop(work, on_pop); running.stop()) {
      run_task(work, queued_ns, caller_counters_);
    }
    // Registered first: take_over_capacity starts the record under its
    // lock, inside which the registry's mutex must never be taken (a
    // snapshot takes that lock inside the registry's mutex).
    bool registered = false;
    if constexpr (detail::registry_compiled) registered = detail::register_this_thread_early();
    for (detail::task work; take_over_capacity(work, queued_ns, running, registered);
         running.stop()) {
      run_task(work, queued_ns, caller_counters_);
    }
  }

  // What Asio's execute does with a task (see worker_pool_access::execute):
  // queue it, past a full queue if need be. Never waits for room (only, as
  // every post may, for a worker to finish moving a task out of the slot
  // it takes; see enqueue).
  template <class Origin>
  void execute_task(detail::task& work, const Origin& origin) {
    if (enqueue(work, origin)) return;
    if (!queue_past_capacity(work, detail::make_origin(origin))) {
      counters_.rejected.fetch_add(1, std::memory_order_relaxed);
    }
  }

  // Queues a task past the full queue. False once the pool is shut down
  // (the task is then destroyed unrun).
  bool queue_past_capacity(detail::task& work, const detail::task_origin& origin) {
    claimed_task task{std::move(work), origin, 0};
    const detail::task_origin queued_origin = task.origin;
    std::size_t past_capacity = 0;
    {
      // Out of memory, the task is destroyed here and the caller (Asio, or
      // a post) sees the exception; the registry never counted it.
      std::lock_guard guard(over_capacity_mutex_);
      // Shut down since the caller looked (see close): dropped as there,
      // outside the lock (its destructor is user code).
      if (!closed_.load(std::memory_order_relaxed)) {
        over_capacity_.push_back(std::move(task));
        past_capacity = over_capacity_.size();
        // Seq_cst, as a post's claim is: a worker going idle reads it after
        // its own seq_cst write (see park and run_worker).
        over_capacity_count_.store(past_capacity, std::memory_order_seq_cst);
      }
    }
    if (past_capacity == 0) return false;
    note_full();
    over_capacity_pushed_.fetch_add(1, std::memory_order_relaxed);
    detail::accepted(queued_origin);
    wake_idle_worker();
    return true;
  }

  // Whether any task waits for a worker: claimed in the queue, held by a
  // worker, or past a full queue. Seq_cst loads, for a worker that has just
  // dropped its spinning mark or joined the idle list (see enqueue).
  bool work_waiting() const noexcept {
    return ring_.claimed_unpopped() || any_held() || has_over_capacity();
  }

  bool has_over_capacity() const noexcept {
    return over_capacity_count_.load(std::memory_order_seq_cst) != 0;
  }

  // Takes the oldest task queued past a full queue (untimed: queued_ns is
  // 0); its record goes onto this thread's frames before it leaves the list.
  bool take_over_capacity(detail::task& work, std::int64_t& queued_ns,
                          detail::running_scope& running, bool tracked) noexcept {
    if (over_capacity_count_.load(std::memory_order_relaxed) == 0) return false;
    std::lock_guard guard(over_capacity_mutex_);
    if (over_capacity_.empty()) return false;
    claimed_task& task = over_capacity_.front();
    work = std::move(task.work);
    queued_ns = 0;
    if (tracked) running.start(task.origin);
    over_capacity_.pop_front();
    over_capacity_count_.store(over_capacity_.size(), std::memory_order_relaxed);
    return true;
  }

  // Destroys the queued tasks, unrun, except those a worker holds (see
  // drop_held); returns how many. After close(): a position claimed but not
  // published yet is a post between its claim and its publish (a noexcept
  // move), which this waits for. Stopping there left that task, and every
  // one behind it, neither run nor dropped, and a submit()'s future unready
  // after join().
  std::size_t drop_queued() noexcept {
    const auto unrun = [](const slot_extras& cell, std::uint64_t) noexcept { drop_origin(cell); };
    std::size_t dropped = 0;
    detail::task work;
    detail::spin_until([&] {
      while (ring_.try_pop(work, unrun)) ++dropped;
      return !ring_.claimed_unpopped();
    });
    return dropped + drop_over_capacity();
  }

  // Destroys the tasks queued past a full queue, unrun, outside the lock
  // (their destructors are user code); returns how many.
  std::size_t drop_over_capacity() noexcept {
    std::deque<claimed_task> dropped;
    {
      std::lock_guard guard(over_capacity_mutex_);
      dropped.swap(over_capacity_);
      over_capacity_count_.store(0, std::memory_order_relaxed);
    }
    for (claimed_task& task : dropped) detail::finished_unrun(task.origin);
    return dropped.size();
  }

  // The blocking part of post: spin briefly, then queue on room_ until a
  // worker frees a slot, the token is cancelled, or the pool shuts down
  // (closed).
  wait_status wait_for_room(detail::task& work, const detail::task_origin& origin, detail::cancel_state* cancel) {
    // While it spins, the producer waits for many free slots, not one: a
    // producer that takes each slot as the worker frees it pulls that slot's
    // cache line back and forth once per task (measured with tracking off,
    // 2 cores: 17.6M tiny tasks/s at 1 worker before this wait, 26-31M
    // after). Waiting for a quarter of the queue, up to 256 slots, keeps
    // its writes that far behind the worker's claims (2 cores with a cache
    // line 180 ns from core to core, against a wait for 32: 22.9 -> 33.3M
    // tiny tasks/s at 1 worker, 22.5 -> 26.6M at 2, 28.9 -> 29.3M at 16,
    // medians of 13-16 runs alternating with the old code; 1.06x, 1.03x and
    // 1.01x where a line takes 45 ns). It watches the last of those slots,
    // not the queue's size: reading the head's line made each worker's
    // next claim take that line back (17.9 -> 22.4M tiny tasks/s at 1
    // worker, 18.6 -> 21.3M at 2, in the same slow state of the host). The
    // queue stays exact: the locked wait below takes any one slot.
    const std::size_t slack = std::min<std::size_t>(256, (options_.queue_capacity + 3) / 4);
    const auto give_up = detail::give_up_check(cancel);
    for (detail::backoff pause; pause.wait();) {
      // A shutdown comes before a stop, as in the queued wait below: post
      // throws rejected.
      if (ring_.closed()) return wait_status::closed;
      if (const auto status = give_up()) return *status;
      if (!ring_.has_room_for(slack)) continue;
      // A closed ring refuses every push (see close): seen above next time.
      if (enqueue(work, origin)) return wait_status::ok;
    }
    for (;;) {
      detail::thread_waiter waiter;
      auto lock = room_.lock();
      // A worker frees a slot with a seq_cst claim of the head, then reads
      // this count with seq_cst: either it sees this waiter, or the full()
      // check below sees the freed slot.
      room_waiters_.fetch_add(1, std::memory_order_seq_cst);
      bool queued = false;
      for (;;) {
        if (enqueue(work, origin)) {
          queued = true;
          break;
        }
        // Under room_'s lock: a close() after this check wakes this waiter.
        if (ring_.closed()) {
          room_waiters_.fetch_sub(1, std::memory_order_relaxed);
          return wait_status::closed;
        }
        if (ring_.full()) break;
        detail::cpu_relax();  // room was made since enqueue() looked
      }
      if (queued) {
        room_waiters_.fetch_sub(1, std::memory_order_relaxed);
        return wait_status::ok;
      }
      room_.push_back(waiter);
      const auto status = room_.wait(waiter, lock, cancel);
      room_waiters_.fetch_sub(1, std::memory_order_relaxed);
      if (status != wait_status::ok) return status;
      if (enqueue(work, origin)) return wait_status::ok;  // else another producer took the slot: queue again
    }
  }

  // After a worker frees `freed` slots: hands them to blocked producers.
  void notify_room(std::size_t freed) noexcept {
    if (room_waiters_.load(std::memory_order_seq_cst) == 0) return;  // see wait_for_room
    detail::completion_list woken;
    auto lock = room_.lock();
    for (; freed != 0; --freed) {
      detail::wait_node* first = room_.front();
      if (first == nullptr) break;
      room_.remove(*first, wait_status::ok, woken);
    }
  }

  void close(bool discard) noexcept {
    if (discard) discarding_.store(true, std::memory_order_relaxed);
    closed_.store(true, std::memory_order_seq_cst);
    // A post that passed check_open() before this now either claimed its
    // slot already, where the workers or join() find it, or is refused
    // (enqueue() fails, and the poster sees the ring closed). Checked alone,
    // closed_ let a post land after join() had run what was queued.
    ring_.close();
    // The same for work going past a full queue: pushed before this, or it
    // sees closed_ under the lock.
    { std::lock_guard guard(over_capacity_mutex_); }
    {
      detail::completion_list woken;
      auto lock = room_.lock();
      while (detail::wait_node* first = room_.front()) room_.remove(*first, wait_status::closed, woken);
    }
    // Wake every parked worker so it sees the pool closed. Each is handed a
    // spinning mark, which it gives back as it would after any wake-up.
    std::lock_guard guard(idle_mutex_);
    for (worker* w : idle_) {
      spinning_.fetch_add(1, std::memory_order_relaxed);
      signal(*w);
    }
    idle_.clear();
    idle_count_.store(0, std::memory_order_relaxed);
  }

  static void signal(worker& w) noexcept {
    w.wake_signal.store(1, std::memory_order_release);
    detail::futex_wake_one(w.wake_signal);
  }

  // Called once a task is queued (after its seq_cst claim). Wakes one parked
  // worker, and only when no worker is awake and looking for work: that one
  // will find the task, and wakes the next if more are queued (Go's
  // scheduler does the same with its count of spinning threads).
  //
  // Every spinning mark belongs to a worker that will search, so the mark
  // is taken only together with a worker to hand it to, under the lock of
  // the idle list. A mark held for a moment by a thread that then finds the
  // list empty would let another producer skip its wake-up while a worker
  // parks in that moment, leaving its task to nobody.
  void wake_idle_worker() noexcept {
    if (spinning_.load(std::memory_order_seq_cst) != 0 || idle_count_.load(std::memory_order_seq_cst) == 0) return;
    worker* woken = nullptr;
    {
      std::lock_guard guard(idle_mutex_);
      // An empty list: its worker left it to search on its own (see park).
      if (idle_.empty()) return;
      // A failed exchange: another worker is searching now.
      int none = 0;
      if (!spinning_.compare_exchange_strong(none, 1, std::memory_order_seq_cst)) return;
      woken = idle_.back();
      idle_.pop_back();
      idle_count_.store(idle_.size(), std::memory_order_relaxed);
    }
    signal(*woken);  // the woken worker inherits the spinning mark
  }

  // How long a worker out of work polls before it yields: long while the
  // pool's awake workers (this one included) leave a hardware thread to
  // spare, since the poll then takes a core nobody else needs, and the
  // next task is often on its way (see WEFT_WORKER_SPIN_LIMIT); briefly
  // otherwise, when the core it holds may be the one its producer or a
  // busy worker waits for (a group of 1,000 tiny tasks on 2 cores, a
  // producer and 2 workers: 8.5-10.8M tasks/s with brief polls, 5.1-8.9M
  // with long ones).
  int idle_spin_limit() const noexcept {
    const std::size_t awake = options_.workers - idle_count_.load(std::memory_order_relaxed);
    return awake < hardware_threads() ? WEFT_WORKER_SPIN_LIMIT : WEFT_SPIN_LIMIT;
  }

  // Parks `self` until another thread takes it off the idle list, or until
  // it finds work before parking and takes itself off again. Either way it
  // returns holding a spinning mark.
  void park(worker& self) noexcept {
    {
      std::lock_guard guard(idle_mutex_);
      idle_.push_back(&self);
      idle_count_.store(idle_.size(), std::memory_order_seq_cst);  // see enqueue
    }
    if (work_waiting() || closed_.load(std::memory_order_seq_cst)) {
      std::lock_guard guard(idle_mutex_);
      if (auto it = std::find(idle_.begin(), idle_.end(), &self); it != idle_.end()) {
        idle_.erase(it);
        idle_count_.store(idle_.size(), std::memory_order_relaxed);
        // It found work that a producer may not have woken anyone for (it
        // saw no idle worker yet): it searches, so its pop hands the search
        // on if more is queued.
        spinning_.fetch_add(1, std::memory_order_seq_cst);
        return;
      }
      // Someone took this worker off the list already; its signal is coming.
    }
    while (self.wake_signal.exchange(0, std::memory_order_acquire) == 0) {
      detail::futex_wait(self.wake_signal, 0);
    }
  }

  // Takes a task that `from` holds: its first for its owner, its last for
  // any other worker. The task's record goes onto this thread's frames
  // before it leaves `from`, as it does before a slot is freed.
  static bool take_held(worker& from, const worker& self, detail::task& work, std::int64_t& queued_ns,
                        detail::running_scope& running) noexcept {
    if (from.held_count.load(std::memory_order_relaxed) == 0) return false;
    std::lock_guard guard(from.held_mutex);
    const std::size_t count = from.held_count.load(std::memory_order_relaxed);
    if (count == 0) return false;
    claimed_task& task = from.held[&from == &self ? from.held_first++ : from.held_first + count - 1];
    work = std::move(task.work);
    queued_ns = task.queued_ns;
    if (self.registered) running.start(task.origin);
    from.held_count.store(count - 1, std::memory_order_relaxed);
    return true;
  }

  // Takes up to self.claim_size tasks from the queue with one claim (see
  // bounded_ring::try_claim): `work` is the first, the rest are held. The
  // size doubles, up to max_claim, while claims get all they ask for, and
  // falls back to 1 when one does not: a deep queue is shared out in runs,
  // which spares each worker a fight for the queue's head (and the tasks'
  // own data) on every task, while a worker that keeps up with its
  // producers takes one task at a time and never reads a slot before the
  // producer has written it. pool_tiny_tasks on 16 cores (Xeon), one
  // producer: 2.7M tasks/s at 16 workers and 4.1M at 2 with a claim per
  // task, 11.8-13.7M and 11.9-12.3M with runs of up to 8. Runs of up to 16
  // on 2 cores: 1.07x runs of 8 at 2 workers and 1.05x at 16 (medians of
  // 11 rounds, each variant run back to back); runs of 32 gained more at 2
  // workers (1.13x) and nothing at 16 (0.99x), and hold more tasks past
  // queue_capacity.
  bool claim(worker& self, detail::task& work, std::int64_t& queued_ns, detail::running_scope& running) noexcept {
    std::size_t count = 0;
    {
      // Held while the claimed tasks move in, so that shutdown_now() finds
      // them either in the queue or here.
      std::lock_guard guard(self.held_mutex);
      std::uint64_t first = 0;
      count = ring_.try_claim(self.claim_size, first);
      if (count == 0) {
        self.claim_size = 1;
        return false;
      }
      self.claim_size = count == self.claim_size ? std::min(2 * count, max_claim) : 1;
      ring_.take_claimed(first, work, [&](const slot_extras& cell, std::uint64_t position) noexcept {
        queued_ns = self.registered ? begin_running(cell, position, running) : queued_time(cell, position);
      });
      for (std::size_t i = 1; i < count; ++i) {
        claimed_task& task = self.held[i - 1];
        ring_.take_claimed(first + i, task.work, [&](const slot_extras& cell, std::uint64_t position) noexcept {
          detail::copy_origin(cell.origin, task.origin);
          task.queued_ns = queued_time(cell, position);
        });
      }
      self.held_first = 0;
      // Seq_cst, as a post's claim is: a worker going idle reads the held
      // counts after its seq_cst registration (see park).
      self.held_count.store(count - 1, std::memory_order_seq_cst);
    }
    notify_room(count);
    // Should the first task block, a worker must be awake to take the
    // held ones: a spinner looks at held tasks before it parks.
    if (count > 1) wake_idle_worker();
    return true;
  }

  // Takes a task another worker holds; for a worker that found the queue
  // empty.
  bool steal(const worker& self, detail::task& work, std::int64_t& queued_ns, detail::running_scope& running) noexcept {
    const auto self_index = static_cast<std::size_t>(&self - workers_.get());
    for (std::size_t k = 1; k < options_.workers; ++k) {
      if (take_held(workers_[(self_index + k) % options_.workers], self, work, queued_ns, running)) return true;
    }
    return false;
  }

  bool any_held() const noexcept {
    for (std::size_t i = 0; i < options_.workers; ++i) {
      if (workers_[i].held_count.load(std::memory_order_seq_cst) != 0) return true;
    }
    return false;
  }

  // any_held() for a worker about to exit, which must also see a claim in
  // flight: a claimer moves the queue's head and stores its count under its
  // lock, so once this thread has read the moved head (ring_.size() == 0),
  // taking that lock waits for the count. (A worker about to park needs no
  // lock: the claimer wakes it after the store; an exiting one would be
  // gone.)
  bool any_held_or_claiming() noexcept {
    for (std::size_t i = 0; i < options_.workers; ++i) {
      std::lock_guard guard(workers_[i].held_mutex);
      if (workers_[i].held_count.load(std::memory_order_relaxed) != 0) return true;
    }
    return false;
  }

  // Destroys the tasks `w` holds, unrun, outside its lock (their
  // destructors are user code); returns how many.
  static std::size_t drop_held(worker& w) noexcept {
    claimed_task dropped[max_claim - 1];
    std::size_t count = 0;
    {
      std::lock_guard guard(w.held_mutex);
      count = w.held_count.load(std::memory_order_relaxed);
      for (std::size_t k = 0; k < count; ++k) dropped[k] = std::move(w.held[w.held_first + k]);
      w.held_count.store(0, std::memory_order_relaxed);
    }
    for (std::size_t k = 0; k < count; ++k) {
      detail::finished_unrun(dropped[k].origin);
      dropped[k].work.reset();
    }
    return count;
  }

  void run_worker(worker& self, std::size_t index) {
    detail::current_worker_pool = this;
    name_thread(index);
    // Records are pushed under held_mutex, inside which the registry's
    // mutex (taken to register a thread) must never be taken.
    if constexpr (detail::registry_compiled) self.registered = detail::register_this_thread_early();
    bool spinning = false;
    bool past_capacity_first = false;
    detail::task work;
    std::int64_t queued_ns = 0;
    detail::running_scope running;
    for (;;) {
      // After shutdown_now() the queue is not for workers: join() drops what is left.
      if (discarding_.load(std::memory_order_relaxed)) break;
      // Work queued past a full queue and the queue take turns. Served
      // after the queue, the list waited for good while producers kept the
      // queue full; served before it, the queue waited for good while Asio
      // work kept coming past it (a coroutine that yields in a loop).
      past_capacity_first = !past_capacity_first;
      if ((past_capacity_first && take_over_capacity(work, queued_ns, running, self.registered)) ||
          take_held(self, self, work, queued_ns, running) ||
          claim(self, work, queued_ns, running) || steal(self, work, queued_ns, running) ||
          (!past_capacity_first && take_over_capacity(work, queued_ns, running, self.registered))) {
        if (spinning) {
          spinning = false;
          // The last searcher to find work hands the search on. Held tasks
          // count as work: a claim's own wake-up is skipped while this
          // searcher (the claimer, perhaps) still holds its mark.
          if (spinning_.fetch_sub(1, std::memory_order_seq_cst) == 1 && work_waiting()) {
            wake_idle_worker();
          }
        }
        self.busy.store(true, std::memory_order_relaxed);
        run_task(work, queued_ns, self.counters);
        running.stop();
        self.busy.store(false, std::memory_order_relaxed);
        continue;
      }
      if (!spinning && 2 * static_cast<std::size_t>(spinning_.load(std::memory_order_relaxed)) < options_.workers) {
        spinning_.fetch_add(1, std::memory_order_relaxed);
        spinning = true;
      }
      if (spinning) {
        bool found = false;
        // Spinners watch the slot at the head, not the tail: the tail is the
        // line every post claims with a compare-and-swap, and workers
        // reading it while they wait made each post wait for that line
        // (measured: 6.9 -> 13M tiny tasks/s at 4 workers, 2.8 -> 13M at 16,
        // on 2 cores). A claim in flight that this misses is seen below.
        // Tasks held by busy workers are looked for less often: the
        // spinners would share the lines of every worker's held tasks. A
        // shutdown with nothing queued ends the spin: join() waits for the
        // workers to exit, and a post that claims a slot before the ring
        // closes is still found below (the exit test waits for the ring's
        // own close), after a full spin rather than a hot loop of short ones.
        std::uint32_t polls = 0;
        bool closing = false;
        for (detail::backoff pause{idle_spin_limit()}; !found && !closing && pause.wait();) {
          found = ring_.has_ready();
          if (!found && ++polls % 8 == 0) {
            found = any_held() || has_over_capacity();
            closing = closed_.load(std::memory_order_relaxed) && ring_.size() == 0;
          }
        }
        if (found) continue;
        spinning_.fetch_sub(1, std::memory_order_seq_cst);  // see enqueue
        if (work_waiting()) {
          // Work came after all, and a producer that saw this searcher may
          // have skipped its wake-up: search again, so that the pop hands
          // the search on (above) if more is queued. Popping it as a plain
          // worker would leave the rest to this worker alone, and to nobody
          // while its task blocks.
          spinning_.fetch_add(1, std::memory_order_seq_cst);
          continue;
        }
        spinning = false;
      }
      // Tasks another worker holds keep this one: their holder may be
      // blocked on them. The ring's own closed bit, not closed_: close()
      // sets that bit after closed_, and a post that passed check_open()
      // can still claim a slot in between. A worker that left on closed_
      // and an empty ring left that task to join(), which gave up on it
      // while its post was still writing it in.
      if (ring_.closed() && ring_.size() == 0 && !any_held_or_claiming() && !has_over_capacity()) {
        break;
      }
      park(self);
      spinning = true;
    }
    if (spinning) spinning_.fetch_sub(1, std::memory_order_relaxed);
    // Left only after shutdown_now(), by a claim of a task whose post raced
    // it: dropped like the rest of the queue.
    counters_.dropped.fetch_add(drop_held(self), std::memory_order_relaxed);
    detail::current_worker_pool = nullptr;
  }

  void name_thread([[maybe_unused]] std::size_t index) noexcept {
#if defined(__linux__)
    // Linux keeps 15 characters: the name, cut to leave room for "-<index>".
    char suffix[24];
    const auto suffix_length = static_cast<std::size_t>(std::snprintf(suffix, sizeof suffix, "-%zu", index));
    std::string label(options_.name, 0, 15 - std::min<std::size_t>(15, suffix_length));
    label.append(suffix, suffix_length);
    pthread_setname_np(pthread_self(), label.c_str());
#endif
  }

  void run_task(detail::task& work, std::int64_t queued_ns, task_counters& counters) noexcept {
    if (queued_ns != 0) record_wait(counters, now_ns() - queued_ns);
    try {
      work();
    } catch (...) {
      add(counters.failed, counters);
      report(std::current_exception());
    }
    work.reset();
    add(counters.completed, counters);
  }

  // A worker's counters have one writer, which adds with a load and a store;
  // the caller's set is shared by every posting thread and needs RMWs.
  static void add(std::atomic<std::uint64_t>& counter, const task_counters& owner) noexcept {
    if (owner.shared) {
      counter.fetch_add(1, std::memory_order_relaxed);
    } else {
      counter.store(counter.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
    }
  }

  static void record_wait(task_counters& counters, std::int64_t waited_ns) noexcept {
    if (counters.shared) {
      counters.total_wait_ns.fetch_add(waited_ns, std::memory_order_relaxed);
    } else {
      counters.total_wait_ns.store(counters.total_wait_ns.load(std::memory_order_relaxed) + waited_ns,
                                   std::memory_order_relaxed);
    }
    auto max = counters.max_wait_ns.load(std::memory_order_relaxed);
    while (waited_ns > max && !counters.max_wait_ns.compare_exchange_weak(max, waited_ns, std::memory_order_relaxed)) {
    }
  }

  // The handler is shared, not copied per error: a copy lost the state
  // a handler object keeps, and could throw (out of memory) here.
  void report(const std::exception_ptr& error) noexcept {
    shared_error_handler handler;
    {
      std::lock_guard guard(handler_mutex_);
      handler = error_handler_;
    }
    if (!handler) {
      print_error("a posted task", error);
      return;
    }
    try {
      (*handler)(error);
    } catch (...) {
      // Both are reported: the task's own error first.
      print_error("a posted task", error);
      print_error("the error handler", std::current_exception());
    }
  }

  void print_error(const char* thrower, const std::exception_ptr& error) const noexcept {
    try {
      std::rethrow_exception(error);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "weft::worker_pool \"%s\": %s threw %s: %s\n", options_.name.c_str(),
                   thrower, typeid(e).name(), e.what());
    } catch (...) {
      std::fprintf(stderr, "weft::worker_pool \"%s\": %s threw a non-standard exception\n",
                   options_.name.c_str(), thrower);
    }
  }

  const worker_pool_options options_;
  const char* const tracked_name_;  // the name, interned for the registry
  detail::bounded_ring<detail::task, slot_extras, detail::handoff_slot_alignment> ring_;
  std::unique_ptr<worker[]> workers_;
  std::vector<worker*> started_;

  // Workers awake and looking for work without having found it yet.
  alignas(64) std::atomic<int> spinning_{0};
  std::atomic<std::size_t> idle_count_{0};
  std::atomic<bool> closed_{false};
  std::atomic<bool> discarding_{false};
  detail::spin_mutex idle_mutex_;
  std::vector<worker*> idle_;  // parked workers, under idle_mutex_

  // Producers waiting for room (overflow::block, post with a token).
  alignas(64) std::atomic<std::uint32_t> room_waiters_{0};
  detail::wait_queue room_;

  // Asio work queued past a full queue (see execute_task).
  alignas(64) std::atomic<std::size_t> over_capacity_count_{0};  // written under the mutex
  mutable detail::spin_mutex over_capacity_mutex_;
  std::deque<claimed_task> over_capacity_;
  std::atomic<std::uint64_t> over_capacity_pushed_{0};

  alignas(64) mutable std::atomic<std::size_t> peak_queued_{0};
  struct {
    std::atomic<std::uint64_t> ran_by_caller{0};
    std::atomic<std::uint64_t> rejected{0};
    std::atomic<std::uint64_t> dropped{0};
    std::atomic<std::uint64_t> failed{0};  // submit() tasks, whose exception goes to the future
  } counters_;
  task_counters caller_counters_{true};

  std::mutex join_mutex_;
  std::mutex extensions_mutex_;
  std::vector<std::pair<const void*, std::shared_ptr<void>>> extensions_;
  // Set, after first_extension_, when the first extension is made; cleared
  // once the pool has let go of its extensions.
  std::atomic<const void*> first_extension_key_{nullptr};
  void* first_extension_ = nullptr;
  std::vector<std::function<void()>> joined_hooks_;  // under extensions_mutex_
  mutable detail::spin_mutex handler_mutex_;
  using error_handler = std::function<void(std::exception_ptr)>;
  using shared_error_handler = std::shared_ptr<const error_handler>;
  shared_error_handler error_handler_;  // under handler_mutex_
  const queued_tasks queued_tasks_{*this};
};

namespace detail {
// What weft's own layers (weft/asio.hpp) need of a pool.
struct worker_pool_access {
  // At exit: shutdown() and join(), or, when exit() was called from one of
  // the pool's tasks, shutdown() and a join of the other workers (join()
  // would wait for this one, and throws instead).
  static void finish_at_exit(worker_pool& pool) {
    pool.shutdown();
    if (!pool.running_in_this_thread()) {
      pool.join();
      return;
    }
    std::lock_guard guard(pool.join_mutex_);
    pool.join_workers();
  }

  // Asio's execute: like post, except that it never throws into, nor
  // blocks, the thread that completed an operation (a timer's, a semaphore
  // release()'s): a full queue sends the work past its capacity whatever
  // the overflow policy (see the top of this file). Work handed over after
  // shutdown is destroyed, as io_context destroys what is posted after
  // stop(), and counted as rejected.
  template <class F>
  static void execute(worker_pool& pool, F&& f) {
    if (pool.closed_.load(std::memory_order_acquire)) {
      pool.counters_.rejected.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    detail::task work = worker_pool::make_task(std::forward<F>(f));
    pool.execute_task(work, detail::origin_to_make{spawn_site{}, pool.tracked_name_});
  }

  // Posts that the registry does not list: weft's own helpers (a group's
  // runners, a fan-out's helpers), whose tasks are listed by their own
  // spawn sites. A helper that finds the queue full is not needed (its
  // caller runs the work), so it is not counted as rejected.
  template <class F>
  static bool try_post_untracked(worker_pool& pool, F&& f) {
    detail::task work = worker_pool::make_task(std::forward<F>(f));
    pool.check_open();
    return pool.try_queue(work, task_origin{});
  }
  template <class F>
  static wait_status post_untracked(worker_pool& pool, F&& f, const cancel_token& token) {
    detail::task work = worker_pool::make_task(std::forward<F>(f));
    pool.check_open();
    if (token.cancelled()) return detail::state_of(token)->stop_status();
    return pool.post_task(work, token, task_origin{});
  }

  // An object of type T, made from the pool on first use (the owner of the
  // pool's Asio execution_context), that lives until the pool is destroyed,
  // after its workers are joined. Its pool_joined(), if it has one, runs
  // when join() returns the first time after it was made.
  template <class T>
  static T& extension(worker_pool& pool) {
    static const char key = 0;
    // Every Asio operation on the pool asks for its context: the first kind
    // made (in practice the only one) is found without the mutex.
    if (pool.first_extension_key_.load(std::memory_order_acquire) == &key) {
      return *static_cast<T*>(pool.first_extension_);
    }
    std::lock_guard guard(pool.extensions_mutex_);
    for (auto& [k, object] : pool.extensions_) {
      if (k == &key) return *static_cast<T*>(object.get());
    }
    auto object = std::make_shared<T>(pool);
    T& result = *object;
    if constexpr (requires { result.pool_joined(); }) {
      pool.joined_hooks_.reserve(pool.joined_hooks_.size() + 1);
      pool.extensions_.reserve(pool.extensions_.size() + 1);
      pool.joined_hooks_.emplace_back([&result] { result.pool_joined(); });
    }
    pool.extensions_.emplace_back(&key, std::move(object));
    if (pool.extensions_.size() == 1) {
      pool.first_extension_ = &result;
      pool.first_extension_key_.store(&key, std::memory_order_release);
    }
    return result;
  }
};
}  // namespace detail

template <class F>
void pool_executor::post(F&& task, spawn_site site) const {
  pool_->post(std::forward<F>(task), site);
}

template <class F>
void pool_executor::execute(F&& task) const {
  detail::worker_pool_access::execute(*pool_, std::forward<F>(task));
}

inline bool pool_executor::running_in_this_thread() const noexcept { return pool_->running_in_this_thread(); }

// The process-wide pool behind task groups and fan-out calls that name no
// executor: hardware_threads() workers, a queue of 4096 that applies
// backpressure, started on first use and shut down and joined when the
// program exits (by an atexit handler registered then, so after the
// destructors of statics made after that first use). It is never
// destroyed: code that runs later in the exit (a static's destructor)
// finds it shut down, and gets weft::rejected, where a destroyed pool
// would be a use after free. An exit called from one of its tasks joins
// the other workers, not the one running that task.
inline worker_pool& default_pool() {
  static worker_pool* const pool = [] {
    auto* made = new worker_pool{
        {.workers = hardware_threads(), .queue_capacity = 4096, .name = "weft-default"}};
    std::atexit([] { detail::worker_pool_access::finish_at_exit(default_pool()); });
    return made;
  }();
  return *pool;
}

inline pool_executor default_executor() { return default_pool().executor(); }

}  // namespace weft
