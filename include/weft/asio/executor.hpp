// SPDX-License-Identifier: BSL-1.0
// weft::pool_executor as an Asio executor, so Asio work and coroutines run
// on a worker_pool:
//
//   boost::asio::post(pool.executor(), handler);
//   boost::asio::co_spawn(pool.executor(), serve(socket), boost::asio::detached);
//
// Analogue: boost::asio::thread_pool's executor; in Go, the runtime's
// scheduler that resumes a goroutine when its I/O is ready.
//
// It meets Asio's standard executor requirements (execute, equality, the
// properties below), and converts to boost::asio::any_io_executor, the
// executor of use_awaitable coroutines.
//  - execution::context: a boost::asio::execution_context that belongs to
//    the pool, made on first use and destroyed with the pool, or after it
//    by the last tracked executor (below). Services that need one (a
//    steady_timer's) live there; Asio runs their reactor on an internal
//    thread and hands completions to the pool.
//  - execution::blocking: never. execute() only queues; it never runs the
//    function inline and never waits for room: on a full queue the work goes
//    past the queue's capacity, whatever the pool's overflow policy (see
//    worker_pool.hpp). What Asio hands over is mostly the completion of an
//    operation already under way, which cannot be refused, and the thread
//    handing it over (Asio's reactor, weft's deadline thread) must not wait
//    for workers that may be waiting for it.
//  - outstanding_work.tracked: prefer() gives a tracked_pool_executor,
//    which Asio holds for an operation that will complete on the pool (a
//    coroutine of the pool awaiting work on another io_context holds one
//    there, in a strand of the pool). It keeps the pool's execution context,
//    and so its services, alive, not the pool: a pool runs until it is shut
//    down, whatever work is outstanding. A pool destroyed while another
//    context still holds such work leaves its services to the last of
//    them, which can then release what belongs to the pool (a strand)
//    safely; handing one work is as for the pool's own executor, and must
//    not happen once the pool is destroyed.
//  - relationship, allocator: accepted by prefer() and ignored.
// Work that Asio hands over after the pool is shut down is destroyed and
// counted in stats().rejected; execute() never throws weft::rejected. A
// strand of the pool is the exception: the pool destroys the strand's turn,
// but the handlers queued in the strand stay there until join() tears the
// pool's services down (below). Once
// join() has joined the workers, Asio operations still pending on the
// pool's context are abandoned and their handlers destroyed, as
// io_context's destructor does: a coroutine waiting on one is destroyed,
// and a task group's coroutine ends its task with weft::rejected; a weft
// async wait (async_acquire, async_recv, ...) for a handler on the pool
// started after that is destroyed as it starts, unqueued. What Asio's
// reactor thread hands over while the services stop it is destroyed at
// once and counted in stats().rejected, as all work handed over after
// shutdown is.
//
// Thread safety: an executor is a pointer to its pool; copy it and use the
// copies from any thread while the pool lives.
//
// Cost: execute() is a post (one compare-and-swap on the queue's tail) plus
// the task's allocation when its captures do not fit inline; past a full
// queue, a spin lock and a std::deque push.
#pragma once

#include <weft/worker_pool.hpp>

#include <boost/asio/execution/blocking.hpp>
#include <boost/asio/execution/context.hpp>
#include <boost/asio/execution/executor.hpp>
#include <boost/asio/execution/outstanding_work.hpp>
#include <boost/asio/execution_context.hpp>

#include <atomic>
#include <cstddef>
#include <utility>

namespace weft {
namespace detail {

// The pool's Asio execution context. The pool holds one reference to it, and
// each tracked_pool_executor one more: the services live until the last is
// let go, which may come after the pool is destroyed.
class pool_execution_context final : public boost::asio::execution_context, pool_teardown {
 public:
  explicit pool_execution_context(worker_pool& pool) : pool_(&pool) {}

  pool_execution_context(const pool_execution_context&) = delete;
  pool_execution_context& operator=(const pool_execution_context&) = delete;

  static pool_execution_context& of(worker_pool& pool);

  // Valid while the pool lives.
  worker_pool& pool() const noexcept { return *pool_; }

  void add_reference() noexcept { references_.fetch_add(1, std::memory_order_relaxed); }
  void release() noexcept {
    // Acq_rel: the last release sees every other holder's use of the
    // services before it destroys them.
    if (references_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete this;
  }

  // Once the workers are joined, no completion can run: the services
  // abandon their pending operations and destroy their handlers, as
  // io_context's destructor does, so that what waits on them (a task
  // group's coroutine) learns now, not when the pool is destroyed. The
  // services themselves live on, for the I/O objects and the strands that
  // still refer to them; shutting one down again abandons only what was
  // started on it since.
  void pool_joined() {
    // A task_group destroyed meanwhile may ask for the rest first (see
    // pool_teardown).
    struct scope {
      pool_teardown* outer;
      ~scope() { current_pool_teardown = outer; }
    } const restore{std::exchange(current_pool_teardown, static_cast<pool_teardown*>(this))};
    shutdown();
  }

  // As the pool is destroyed: what was started on the context after the
  // join is abandoned too (it would otherwise hold the context for good).
  void pool_destroyed() noexcept {
    shutdown();
    release();
  }

 private:
  ~pool_execution_context() { destroy(); }

  // Asio's services are shut down in a list, newest first; a second pass
  // from inside the first reaches those the first has not (a service that
  // already gave up its operations gives up none), and the first then
  // finds nothing left in them.
  void destroy_pending() noexcept override { shutdown(); }

  std::atomic<std::size_t> references_{1};  // the pool's
  worker_pool* pool_;
};

// The pool's extension: its reference to its context.
class pool_context_owner {
 public:
  explicit pool_context_owner(worker_pool& pool) : context_(new pool_execution_context(pool)) {}
  pool_context_owner(const pool_context_owner&) = delete;
  pool_context_owner& operator=(const pool_context_owner&) = delete;
  ~pool_context_owner() { context_->pool_destroyed(); }

  void pool_joined() { context_->pool_joined(); }
  pool_execution_context& context() const noexcept { return *context_; }

 private:
  pool_execution_context* context_;
};

inline pool_execution_context& pool_execution_context::of(worker_pool& pool) {
  return worker_pool_access::extension<pool_context_owner>(pool).context();
}

}  // namespace detail

// A pool_executor that Asio holds as outstanding work: it shares the
// ownership of the pool's execution context (see the top of this file).
// Like a strand, once moved from it may only be destroyed or assigned to.
// Cost: one atomic increment per copy, one decrement per destruction.
class tracked_pool_executor {
 public:
  explicit tracked_pool_executor(pool_executor executor)
      : context_(&detail::pool_execution_context::of(executor.context())) {
    context_->add_reference();
  }
  tracked_pool_executor(const tracked_pool_executor& other) noexcept : context_(other.context_) {
    if (context_ != nullptr) context_->add_reference();
  }
  tracked_pool_executor(tracked_pool_executor&& other) noexcept
      : context_(std::exchange(other.context_, nullptr)) {}
  tracked_pool_executor& operator=(tracked_pool_executor other) noexcept {
    std::swap(context_, other.context_);
    return *this;
  }
  ~tracked_pool_executor() {
    if (context_ != nullptr) context_->release();
  }

  template <class F>
  void execute(F&& task) const {
    untracked().execute(std::forward<F>(task));
  }

  worker_pool& context() const noexcept { return context_->pool(); }
  bool running_in_this_thread() const noexcept { return untracked().running_in_this_thread(); }
  pool_executor untracked() const noexcept { return pool_executor{context_->pool()}; }
  detail::pool_execution_context& execution_context() const noexcept { return *context_; }

  friend bool operator==(const tracked_pool_executor& a, const tracked_pool_executor& b) noexcept {
    return a.context_ == b.context_;
  }

 private:
  detail::pool_execution_context* context_;
};

// Found by argument-dependent lookup from Asio's query/require/prefer
// customisation points.
inline boost::asio::execution_context& query(const pool_executor& executor,
                                              boost::asio::execution::context_t) noexcept {
  return detail::pool_execution_context::of(executor.context());
}

constexpr boost::asio::execution::blocking_t query(const pool_executor&,
                                                   boost::asio::execution::blocking_t) noexcept {
  return boost::asio::execution::blocking.never;
}

inline pool_executor require(const pool_executor& executor, boost::asio::execution::blocking_t::never_t) noexcept {
  return executor;
}

inline tracked_pool_executor prefer(const pool_executor& executor,
                                    boost::asio::execution::outstanding_work_t::tracked_t) {
  return tracked_pool_executor{executor};
}

inline boost::asio::execution_context& query(const tracked_pool_executor& executor,
                                             boost::asio::execution::context_t) noexcept {
  return executor.execution_context();
}

constexpr boost::asio::execution::blocking_t query(const tracked_pool_executor&,
                                                   boost::asio::execution::blocking_t) noexcept {
  return boost::asio::execution::blocking.never;
}

// Reporting the tracking is what lets prefer(untracked) reach the overload
// below: Asio tries a static requirement first.
constexpr boost::asio::execution::outstanding_work_t query(
    const tracked_pool_executor&, boost::asio::execution::outstanding_work_t) noexcept {
  return boost::asio::execution::outstanding_work.tracked;
}

inline tracked_pool_executor require(const tracked_pool_executor& executor,
                                     boost::asio::execution::blocking_t::never_t) noexcept {
  return executor;
}

inline pool_executor prefer(const tracked_pool_executor& executor,
                            boost::asio::execution::outstanding_work_t::untracked_t) noexcept {
  return executor.untracked();
}

}  // namespace weft
