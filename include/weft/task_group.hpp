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
//    exception becomes the token's cause), so siblings can stop early.
//  - A task that has not started when the group's token is cancelled is not
//    started. wait() reports it rather than skipping silently: it rethrows
//    the first task exception; if there is none but tasks were skipped, it
//    throws the token's cause (std::system_error with errc::cancelled or
//    errc::deadline_exceeded, or the exception given to cancel()).
//  - wait() helps: while it waits, the waiting thread runs the group's own
//    tasks that no worker has started yet (never another group's), so a
//    short fan-out finishes without a wake-up round trip, and waiting from
//    inside a pool task cannot deadlock a pool whose workers are all busy.
//  - set_limit(n): at most n tasks in flight; go() waits for a slot
//    (backpressure), try_go() returns false instead. Only while no task is
//    in flight (as in errgroup). A task that calls go() on its own limited,
//    full group waits for a sibling to finish: with n such tasks the group
//    deadlocks, as errgroup does.
//  - Structured: the destructor cancels the token if tasks were started
//    since the last wait() (for example during stack unwinding), then joins
//    them. No task outlives its group. An exception that no wait() delivered
//    is written to stderr, never lost silently.
//  - After a failure the group is spent: its token stays cancelled, later
//    tasks are skipped, and every wait() rethrows the same exception.
//
// result_group<T> is the same with tasks that return a T; wait() returns
// the results in spawn order.
//
// Thread safety: go, try_go, token and cancel may be called concurrently,
// from any thread, including from the group's own tasks. wait() may run
// concurrently with go() from inside the group's tasks (it returns once the
// count of tasks reaches zero); set_limit and the destructor may not run
// concurrently with anything else. A task must not wait() on its own group.
//
// Cost: go() allocates one small node (the task's captures are kept inline
// up to five pointers), adds to the group's count, and posts an 8-byte
// runner to the executor; each task costs three atomic read-modify-writes
// in all (claim, count, release of the node). wait() on finished tasks is a
// load.
#pragma once

#include <weft/cancel.hpp>
#include <weft/config.hpp>
#include <weft/detail/spin_mutex.hpp>
#include <weft/detail/task.hpp>
#include <weft/semaphore.hpp>
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

namespace detail {
// What weft/asio.hpp needs of a group: to count work that is not a posted
// task (a coroutine), and to wait for it without blocking.
struct task_group_access {
  static wait_group& pending(task_group& group) noexcept;
  static std::exception_ptr outcome(task_group& group);
  // False (and the task counts as skipped) when the group is cancelled.
  static bool begin(task_group& group);
  static void end(task_group& group, std::exception_ptr error) noexcept;
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
      : executor_(executor), source_(parent.child()) {}

  task_group(const task_group&) = delete;
  task_group& operator=(const task_group&) = delete;

  ~task_group() {
    if (started_since_wait_.load(std::memory_order_relaxed)) source_.cancel();
    join();
    if (failed_.load(std::memory_order_acquire) && !error_delivered_) report_undelivered();
  }

  // Starts f on the executor; waits for a slot first when a limit is set.
  // Throws weft::rejected when the executor's pool is shut down.
  template <class F>
  void go(F&& f) {
    if (limit_) limit_->acquire();
    start(std::forward<F>(f));
  }

  // Starts f if a slot is free under the limit (always, with no limit);
  // never waits for a slot.
  template <class F>
  [[nodiscard]] bool try_go(F&& f) {
    if (limit_ && !limit_->try_acquire()) return false;
    start(std::forward<F>(f));
    return true;
  }

  // At most n tasks in flight from now on; n >= 1. Only while none is.
  void set_limit(std::ptrdiff_t n) {
    if (n < 1) {
      throw std::invalid_argument("weft::task_group::set_limit: n must be at least 1, got " + std::to_string(n));
    }
    if (pending_.count() != 0) {
      throw std::logic_error("weft::task_group::set_limit: tasks are in flight; set the limit before go()");
    }
    limit_ = std::make_unique<semaphore>(n);
  }

  // Joins every task started so far (helping to run those not yet started),
  // then rethrows the first task exception, or reports skipped tasks (see
  // the top of this header).
  void wait() {
    join();
    if (auto error = outcome()) std::rethrow_exception(error);
  }

  // Cancelled by the first failure, by cancel(), or by the parent token.
  [[nodiscard]] cancel_token token() const noexcept { return source_.token(); }

  // Asks the group's tasks to stop (those not started are skipped).
  void cancel() noexcept { source_.cancel(); }

  pool_executor executor() const noexcept { return executor_; }

  // Tasks started and not yet finished; a snapshot.
  std::int64_t in_flight() const noexcept { return pending_.count(); }

 private:
  friend struct detail::task_group_access;

  // A started task, shared by the runner posted to the executor and the
  // group's list of unstarted tasks, until both let go. Whoever claims it
  // first (a worker through the runner, or the waiting thread helping) runs
  // it; the other only lets go.
  struct node {
    static constexpr std::uint32_t claimed = 1;
    static constexpr std::uint32_t one_holder = 2;

    node(task_group* owner, detail::task work) noexcept : group(owner), task(std::move(work)) {}

    bool claim() noexcept { return (state.fetch_or(claimed, std::memory_order_acq_rel) & claimed) == 0; }
    void let_go() noexcept {
      if ((state.fetch_sub(one_holder, std::memory_order_acq_rel) & ~claimed) == one_holder) delete this;
    }

    std::atomic<std::uint32_t> state{2 * one_holder};
    node* next = nullptr;  // in the group's list of unstarted tasks
    task_group* group;
    detail::task task;
  };

  // What the executor runs: 8 bytes, so it stays inline in the pool's slot.
  // A runner destroyed unrun (by shutdown_now) only lets go of its node; the
  // waiting thread runs the task instead.
  class runner {
   public:
    explicit runner(node* n) noexcept : node_(n) {}
    runner(runner&& other) noexcept : node_(std::exchange(other.node_, nullptr)) {}
    runner& operator=(runner&&) = delete;
    ~runner() {
      if (node_ != nullptr) node_->let_go();
    }
    void operator()() {
      node* n = std::exchange(node_, nullptr);
      if (n->claim()) n->group->run(*n);
      n->let_go();
    }

   private:
    node* node_;
  };

  template <class F>
  void start(F&& f) {
    pending_.add(1);
    started_since_wait_.store(true, std::memory_order_relaxed);
    node* n = nullptr;
    try {
      n = new node(this, detail::task([this, f = std::forward<F>(f)]() mutable {
                     detail::invoke_with_token(f, source_.token());
                   }));
      executor_.post(runner(n));
    } catch (...) {
      if (n != nullptr) delete n;
      finish_without_running();
      throw;
    }
    push_unstarted(n);
  }

  void push_unstarted(node* n) noexcept {
    n->next = unstarted_.load(std::memory_order_relaxed);
    while (!unstarted_.compare_exchange_weak(n->next, n, std::memory_order_release, std::memory_order_relaxed)) {
    }
  }

  // Runs the tasks in the unstarted list that nobody has claimed; true if
  // the list was not empty.
  bool help() {
    node* n = unstarted_.exchange(nullptr, std::memory_order_acquire);
    if (n == nullptr) return false;
    while (n != nullptr) {
      node* next = n->next;
      if (n->claim()) run(*n);
      n->let_go();
      n = next;
    }
    return true;
  }

  void join() noexcept {
    while (pending_.count() != 0) {
      if (help()) continue;
      pending_.wait();
    }
    while (help()) {
    }
  }

  void run(node& n) noexcept {
    if (source_.cancelled()) {
      skipped_.store(true, std::memory_order_relaxed);
    } else {
      try {
        n.task();
      } catch (...) {
        record_failure(std::current_exception());
      }
    }
    n.task.reset();
    if (limit_) limit_->release();
    pending_.done();  // the last touch of the group
  }

  void finish_without_running() noexcept {
    if (limit_) limit_->release();
    pending_.done();
  }

  void record_failure(std::exception_ptr error) noexcept {
    {
      std::lock_guard guard(error_mutex_);
      if (!failed_.load(std::memory_order_relaxed)) {
        first_error_ = error;
        failed_.store(true, std::memory_order_release);
      }
    }
    source_.cancel(std::move(error));
  }

  // After a join: what wait() reports (null for success). Marks the tasks
  // so far as waited for.
  std::exception_ptr outcome() {
    started_since_wait_.store(false, std::memory_order_relaxed);
    if (failed_.load(std::memory_order_acquire)) {
      error_delivered_ = true;
      return first_error_;
    }
    if (skipped_.exchange(false, std::memory_order_relaxed)) {
      try {
        source_.token().cause().rethrow();
      } catch (...) {
        return std::current_exception();
      }
    }
    return nullptr;
  }

  void report_undelivered() const noexcept {
    try {
      std::rethrow_exception(first_error_);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "weft::task_group: destroyed without wait(); a task's exception was lost: %s\n",
                   e.what());
    } catch (...) {
      std::fprintf(stderr, "weft::task_group: destroyed without wait(); a task's non-standard exception was lost\n");
    }
  }

  pool_executor executor_;
  cancel_source source_;
  wait_group pending_;
  std::unique_ptr<semaphore> limit_;
  std::atomic<node*> unstarted_{nullptr};
  std::atomic<bool> started_since_wait_{false};
  std::atomic<bool> skipped_{false};
  std::atomic<bool> failed_{false};
  bool error_delivered_ = false;
  detail::spin_mutex error_mutex_;
  std::exception_ptr first_error_;
};

namespace detail {
inline wait_group& task_group_access::pending(task_group& group) noexcept { return group.pending_; }
inline std::exception_ptr task_group_access::outcome(task_group& group) { return group.outcome(); }
inline bool task_group_access::begin(task_group& group) {
  if (group.source_.cancelled()) {
    group.skipped_.store(true, std::memory_order_relaxed);
    return false;
  }
  group.pending_.add(1);
  group.started_since_wait_.store(true, std::memory_order_relaxed);
  return true;
}
inline void task_group_access::end(task_group& group, std::exception_ptr error) noexcept {
  if (error) group.record_failure(std::move(error));
  group.pending_.done();
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
  void go(F&& f) {
    auto [task, slot] = bind(std::forward<F>(f));
    try {
      group_.go(std::move(task));
    } catch (...) {
      std::lock_guard guard(mutex_);
      slot->used = false;
      throw;
    }
  }

  template <class F>
  [[nodiscard]] bool try_go(F&& f) {
    auto [task, slot] = bind(std::forward<F>(f));
    if (group_.try_go(std::move(task))) return true;
    std::lock_guard guard(mutex_);
    slot->used = false;
    return false;
  }

  void set_limit(std::ptrdiff_t n) { group_.set_limit(n); }

  // The results in the order their go() calls returned; rethrows as
  // task_group::wait() does. The group may then be reused.
  std::vector<T> wait() {
    group_.wait();
    std::vector<T> out;
    std::lock_guard guard(mutex_);
    out.reserve(results_.size());
    for (auto& r : results_) {
      if (r.used) out.push_back(std::move(*r.value));
    }
    results_.clear();
    return out;
  }

  [[nodiscard]] cancel_token token() const noexcept { return group_.token(); }
  void cancel() noexcept { group_.cancel(); }

 private:
  struct slot {
    std::optional<T> value;
    bool used = true;  // false when try_go declined the task
  };

  // The task to run, and the slot (in spawn order) it fills.
  template <class F>
  auto bind(F&& f) {
    static_assert(std::is_convertible_v<decltype(detail::invoke_with_token(std::declval<std::decay_t<F>&>(),
                                                                           std::declval<const cancel_token&>())),
                                        T>,
                  "weft::result_group<T>: each task must return something convertible to T");
    slot* target = nullptr;
    {
      std::lock_guard guard(mutex_);
      target = &results_.emplace_back();  // a deque: earlier slots never move
    }
    auto task = [target, f = std::forward<F>(f)](const cancel_token& token) mutable {
      target->value.emplace(detail::invoke_with_token(f, token));
    };
    return std::pair{std::move(task), target};
  }

  // Destroyed after group_, which joins every task that writes a slot.
  detail::spin_mutex mutex_;
  std::deque<slot> results_;
  task_group group_;
};

}  // namespace weft
