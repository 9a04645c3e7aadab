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
//    the pool, made on first use and destroyed after the pool's workers are
//    joined. Services that need one (a steady_timer's) live there; Asio runs
//    their reactor on an internal thread and hands completions to the pool.
//  - execution::blocking: never. execute() only queues; it never runs the
//    function inline and never waits for room: on a full queue the work goes
//    past the queue's capacity, whatever the pool's overflow policy (see
//    worker_pool.hpp). What Asio hands over is mostly the completion of an
//    operation already under way, which cannot be refused, and the thread
//    handing it over (Asio's reactor, weft's deadline thread) must not wait
//    for workers that may be waiting for it.
//  - relationship, outstanding_work, allocator: accepted by prefer() and
//    ignored. A pool runs until it is shut down, so it has no use for a
//    count of outstanding work.
// Work that Asio hands over after the pool is shut down is destroyed and
// counted in stats().rejected; execute() never throws weft::rejected. Once
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
#include <boost/asio/execution_context.hpp>

#include <utility>

namespace weft {
namespace detail {

class pool_execution_context final : public boost::asio::execution_context, pool_teardown {
 public:
  explicit pool_execution_context(worker_pool&) {}
  ~pool_execution_context() {
    shutdown();
    destroy();
  }

  // Once the workers are joined, no completion can run: the services
  // abandon their pending operations and destroy their handlers, as
  // io_context's destructor does, so that what waits on them (a task
  // group's coroutine) learns now, not when the pool is destroyed. The
  // services themselves live on until then, for the I/O objects that still
  // refer to them; shutting one down again does nothing more.
  void pool_joined() {
    // A task_group destroyed meanwhile may ask for the rest first (see
    // pool_teardown).
    struct scope {
      pool_teardown* outer;
      ~scope() { current_pool_teardown = outer; }
    } const restore{std::exchange(current_pool_teardown, static_cast<pool_teardown*>(this))};
    shutdown();
  }

 private:
  // Asio's services are shut down in a list, newest first; a second pass
  // from inside the first reaches those the first has not (a service that
  // already gave up its operations gives up none), and the first then
  // finds nothing left in them.
  void destroy_pending() noexcept override { shutdown(); }
};

}  // namespace detail

// Found by argument-dependent lookup from Asio's query/require customisation
// points.
inline boost::asio::execution_context& query(const pool_executor& executor,
                                              boost::asio::execution::context_t) noexcept {
  return detail::worker_pool_access::extension<detail::pool_execution_context>(executor.context());
}

constexpr boost::asio::execution::blocking_t query(const pool_executor&,
                                                   boost::asio::execution::blocking_t) noexcept {
  return boost::asio::execution::blocking.never;
}

inline pool_executor require(const pool_executor& executor, boost::asio::execution::blocking_t::never_t) noexcept {
  return executor;
}

}  // namespace weft
