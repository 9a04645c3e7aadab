// SPDX-License-Identifier: BSL-1.0
// weft::pool_executor as an Asio executor, so Asio work and coroutines run
// on a worker_pool:
//
//   boost::asio::post(pool.executor(), handler);
//   boost::asio::co_spawn(pool.executor(), serve(socket), boost::asio::detached);
//
// It meets Asio's standard executor requirements (execute, equality, the
// properties below), and converts to boost::asio::any_io_executor, the
// executor of use_awaitable coroutines.
//  - execution::context: a boost::asio::execution_context that belongs to
//    the pool, made on first use and destroyed after the pool's workers are
//    joined. Services that need one (a steady_timer's) live there; Asio runs
//    their reactor on an internal thread and hands completions to the pool.
//  - execution::blocking: never. execute() only queues; it does not run the
//    function inline (the one exception: a worker of the pool posting into
//    its own full queue, see worker_pool.hpp). On a full queue it waits for
//    room whatever the pool's overflow policy: what Asio hands over is the
//    completion of an operation already under way, which cannot be refused.
//  - relationship, outstanding_work, allocator: accepted by prefer() and
//    ignored. A pool runs until it is shut down, so it has no use for a
//    count of outstanding work.
// Work that Asio hands over after the pool is shut down, or while it waits
// for room, is destroyed, as io_context destroys what is posted after
// stop(), and counted in stats().rejected; execute() never throws
// weft::rejected.
#pragma once

#include <weft/worker_pool.hpp>

#include <boost/asio/execution/blocking.hpp>
#include <boost/asio/execution/context.hpp>
#include <boost/asio/execution/executor.hpp>
#include <boost/asio/execution_context.hpp>

namespace weft {
namespace detail {

class pool_execution_context final : public boost::asio::execution_context {
 public:
  explicit pool_execution_context(worker_pool&) {}
  ~pool_execution_context() {
    shutdown();
    destroy();
  }
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
