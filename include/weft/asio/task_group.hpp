// SPDX-License-Identifier: BSL-1.0
// task_group for coroutines: wait for a group without blocking a thread, and
// add coroutines to a group so they are joined, and fail, with its tasks.
//
//   weft::task_group group{pool.executor(), request};
//   weft::co_spawn(group, fetch_user(id));       // an awaitable<void>
//   weft::co_spawn(group, fetch_orders(id));
//   co_await weft::async_wait(group, asio::use_awaitable);  // rethrows the first exception
//
// co_spawn(group, awaitable) counts the coroutine in the group until it
// returns; an exception it throws is the group's failure (first one wins,
// and cancels the group's token). When the group's token is cancelled, the
// coroutine's pending Asio operation is cancelled (terminal), emitted on the
// coroutine's executor; a group already cancelled starts no coroutine and
// reports it at wait, as for tasks. The coroutine runs on a strand of the
// group's executor, or of the executor the three-argument form names (an
// io_context's), so the cancellation can be emitted where it cannot race it.
//
// async_wait(group, token) completes with void(std::exception_ptr): null on
// success, else what task_group::wait() would throw; cancelled through its
// cancellation slot, it completes with a boost::system::system_error
// (errc::cancelled), and the group's tasks keep running. It must not run
// concurrently with another wait on the same group.
#pragma once

#include <weft/asio/cancel.hpp>
#include <weft/asio/executor.hpp>
#include <weft/asio/wait_group.hpp>
#include <weft/detail/task_tracking.hpp>
#include <weft/spawn_site.hpp>
#include <weft/task_group.hpp>

#include <boost/asio/async_result.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/compose.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/system_executor.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/system/system_error.hpp>

#include <exception>
#include <memory>
#include <utility>
#include <vector>

namespace weft {

template <class CompletionToken = boost::asio::default_completion_token_t<boost::asio::system_executor>>
auto async_wait(task_group& group, CompletionToken&& token = {}) {
  return boost::asio::async_compose<CompletionToken, void(std::exception_ptr)>(
      [&group, waiting = false](auto& self, boost::system::error_code error = {}) mutable {
        if (!waiting) {
          waiting = true;
          weft::async_wait(detail::task_group_access::pending(group), std::move(self));
          return;
        }
        if (error) {
          self.complete(std::make_exception_ptr(boost::system::system_error(error)));
          return;
        }
        self.complete(detail::task_group_access::outcome(group));
      },
      token);
}

namespace detail {

// How a group's cancellation reaches a coroutine in it, working around
// three traps of Asio 1.81's co_spawn:
//  - its entry point co_awaits a dispatch before the coroutine starts and a
//    post after it returns, outside any try block: a cancellation emitted
//    then makes that co_await throw operation_aborted out of the executor,
//    and the completion handler never runs. So the signal is emitted only
//    while the coroutine runs (`started` and not `finished`; both are
//    touched only on the coroutine's strand), a cancellation that came
//    before the start is emitted by the coroutine itself when it starts,
//    and throw_if_cancelled is off once the body is done;
//  - a completion handler with an associated executor makes co_spawn
//    dispatch each emission with a pointer into the slot's handler, which a
//    completing coroutine may already have destroyed
//    (chriskohlhoff/asio#1332): the handler here carries its slot itself and
//    has no associated executor, so the emission runs inline;
//  - a signal must be emitted where it cannot race the operation it
//    cancels: the group's token posts the emission to the strand.
//
// It also carries the coroutine's record for the task registry: a
// coroutine is on no queue and, between its steps, on no thread, so it is
// registered as a source of its own for its lifetime, listed as blocked on
// `co_await` (the registry cannot see which step runs when).
struct coroutine_cancellation {
  boost::asio::cancellation_signal signal;
  bool started = false;
  bool finished = false;

  void emit() {
    if (started && !finished) signal.emit(boost::asio::cancellation_type::terminal);
  }

  struct record final : task_source {
    task_origin origin;  // set before the record is registered, constant after
    void collect(std::vector<task_record>& out) const override {
      task_record listed;
      listed.origin = origin;
      listed.state = tracked_state::blocked;
      listed.blocked_kind = "co_await";
      listed.since_ns = origin.spawned_ns;
      out.push_back(listed);
    }
  };
  record registry_record;
  bool registered = false;

  void register_with_registry(const task_origin& origin) {
    if (origin.id == 0) return;
    registry_record.origin = origin;
    add_source(registry_record);
    registered = true;
    accepted(origin);
  }

  void unregister() noexcept {
    if (!registered) return;
    registered = false;
    remove_source(registry_record);
    finished_unrun(registry_record.origin);
  }
};

template <class Strand>
struct post_cancellation {
  std::shared_ptr<coroutine_cancellation> target;
  Strand strand;
  void operator()() noexcept {
    boost::asio::post(strand, [target = target] { target->emit(); });
  }
};

template <class AwaitableExecutor>
boost::asio::awaitable<void, AwaitableExecutor> run_group_coroutine(
    boost::asio::awaitable<void, AwaitableExecutor> body, std::shared_ptr<coroutine_cancellation> cancellation,
    cancel_token token) {
  cancellation->started = true;
  if (token.cancelled()) cancellation->emit();  // it came before the start: the first co_await throws
  std::exception_ptr error;
  try {
    co_await std::move(body);
  } catch (...) {
    error = std::current_exception();
  }
  co_await boost::asio::this_coro::throw_if_cancelled(false);
  if (error) std::rethrow_exception(error);
}

template <class Strand>
struct group_coroutine_completion {
  using cancellation_slot_type = boost::asio::cancellation_slot;

  group_coroutine_completion(task_group& target, std::shared_ptr<coroutine_cancellation> state,
                             std::unique_ptr<cancel_callback<post_cancellation<Strand>>> token_link) noexcept
      : group(&target), cancellation(std::move(state)), link(std::move(token_link)) {}
  group_coroutine_completion(group_coroutine_completion&&) noexcept = default;
  group_coroutine_completion& operator=(group_coroutine_completion&&) = delete;

  // Destroyed without being called (its executor went away with the
  // coroutine pending): the record must not outlive the state it lives in.
  ~group_coroutine_completion() {
    if (cancellation) cancellation->unregister();
  }

  cancellation_slot_type get_cancellation_slot() const noexcept { return cancellation->signal.slot(); }

  void operator()(std::exception_ptr error) {
    cancellation->finished = true;
    cancellation->unregister();
    link.reset();  // unregisters from the token before the group may go
    task_group_access::end(*group, std::move(error));
  }

  task_group* group;
  std::shared_ptr<coroutine_cancellation> cancellation;
  std::unique_ptr<cancel_callback<post_cancellation<Strand>>> link;
};

}  // namespace detail

template <class Executor, class AwaitableExecutor>
void co_spawn(task_group& group, const Executor& executor, boost::asio::awaitable<void, AwaitableExecutor> coroutine,
              spawn_site site = spawn_site::current()) {
  if (!detail::task_group_access::begin(group)) return;
  // The coroutine runs on a strand, where its cancellation is emitted (see
  // coroutine_cancellation): a pool runs a coroutine's steps on any worker.
  auto strand = boost::asio::make_strand(executor);
  using strand_type = decltype(strand);
  try {
    auto cancellation = std::make_shared<detail::coroutine_cancellation>();
    auto link = std::make_unique<cancel_callback<detail::post_cancellation<strand_type>>>(
        group.token(), detail::post_cancellation<strand_type>{cancellation, strand});
    detail::group_coroutine_completion<strand_type> completion{group, cancellation, std::move(link)};
    cancellation->register_with_registry(detail::make_origin(site, "coroutine"));
    boost::asio::co_spawn(strand, detail::run_group_coroutine(std::move(coroutine), cancellation, group.token()),
                          std::move(completion));
  } catch (...) {
    detail::task_group_access::end(group, nullptr);
    throw;
  }
}

template <class AwaitableExecutor>
void co_spawn(task_group& group, boost::asio::awaitable<void, AwaitableExecutor> coroutine,
              spawn_site site = spawn_site::current()) {
  co_spawn(group, AwaitableExecutor(group.executor()), std::move(coroutine), site);
}

}  // namespace weft
