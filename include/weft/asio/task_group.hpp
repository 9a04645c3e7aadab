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
//
// Go analogue: errgroup.Group's Go and Wait, where a goroutine blocked on
// I/O is what a suspended coroutine is here. Asio analogue:
// experimental::make_parallel_group, for a set known up front.
//
// Errors: co_spawn onto a pool that is shut down throws weft::rejected, as
// go() does (only for the pool's own executor: a strand or an
// any_io_executor wrapping it is not checked). A coroutine that its
// executor destroys unfinished (its pool was joined while it waited, or
// its io_context destroyed) ends its task with weft::rejected, so wait()
// reports it instead of waiting for good; so does one whose co_spawn raced
// the pool's shutdown, its first step dropped, once the pool is joined. A
// coroutine whose body has returned or thrown reports that, whatever
// happens to its pool afterwards.
//
// A pool joined while a coroutine that owns a group is suspended destroys
// that coroutine's frame in the join, and the group's destructor waits
// there for the group's own coroutines. Before it sleeps, it has the join
// tear down the pool's other Asio services (see pool_teardown in
// worker_pool.hpp), which destroys the frames they still hold: a parent
// waiting on the group (weft's service) whose coroutines wait on timers or
// strands (Asio's) is torn down whole.
//
// A group's coroutine suspended when its pool shuts down (on a timer, on
// I/O) resumes through its strand, whose handlers the shut-down pool
// leaves queued until join() destroys them: the coroutine ends its task,
// with weft::rejected, only in join(). So a group.wait() (or the group's
// destructor) between shutdown() and join() waits for that join, and
// hangs when it runs on the thread that would call join(). Plain go()
// tasks and asio::co_spawn onto the pool's own executor do not wait so.
//
// Known defects: the pool's join can still hang
//  - when a coroutine that owns a group runs, or unwinds, on a worker of a
//    pool that is shutting down while one of the group's coroutines is
//    suspended: the shut-down pool drops that coroutine's next step, which
//    its strand keeps until the pool's Asio services are torn down, after
//    the workers exit, while the worker waits in the group's destructor;
//  - when a group's coroutine waits where the teardown has already taken
//    its operation out to destroy: Asio's reactor and strands move all
//    they hold into a list of their own first (a parent and its coroutine
//    both on timers, the parent's timer the newer), or when groups nest
//    two deep across services (the second pass destroys an ancestor of
//    the frame being destroyed).
// Cancel the coroutines and wait for them before the pool shuts down.
// The destructor cannot stop waiting there for coroutines that will never
// run again on the pool: one may still await work on another context that
// runs on and uses what the parent's frame lent it (tested).
//
// Thread safety: co_spawn may be called from any thread, as go() may, and
// from inside the group's own tasks and coroutines.
//
// Cost, per coroutine: a strand, a shared state holding its cancellation
// signal, a registration on the group's token, and its registry record;
// Asio's co_spawn allocates the coroutine's frames. On a pool, each copy of
// the coroutine's executor counts a reference on the pool's execution
// context (one atomic increment; see asio/executor.hpp). A cancellation is
// one post to the strand per coroutine.
#pragma once

#include <weft/asio/cancel.hpp>
#include <weft/asio/executor.hpp>
#include <weft/asio/wait_group.hpp>
#include <weft/detail/task_tracking.hpp>
#include <weft/spawn_site.hpp>
#include <weft/task_group.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/compose.hpp>
#include <boost/asio/deferred.hpp>
#include <boost/asio/prefer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/system/system_error.hpp>

#include <atomic>
#include <exception>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace weft {

template <class CompletionToken = boost::asio::deferred_t>
auto async_wait(task_group& group, CompletionToken&& token = {}) {
  return boost::asio::async_compose<CompletionToken, void(std::exception_ptr)>(
      [&group, waiting = false](auto& self, boost::system::error_code error = {}) mutable {
        if (!waiting) {
          waiting = true;
          // async_compose passes on terminal cancellation only, by default;
          // the wait below stops for any type, as the header says.
          self.reset_cancellation_state(boost::asio::enable_total_cancellation());
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

// Weak: the registration lives in the state it targets (coroutine_task).
template <class Strand>
struct post_cancellation {
  std::weak_ptr<coroutine_cancellation> target;
  Strand strand;
  void operator()() noexcept {
    auto alive = target.lock();
    if (!alive) return;  // the coroutine is gone: its state is being destroyed
    boost::asio::post(strand, [alive = std::move(alive)] { alive->emit(); });
  }
};

// What a group learns of a coroutine whose executor destroyed it unfinished.
inline std::exception_ptr coroutine_dropped() noexcept {
  try {
    return std::make_exception_ptr(rejected(
        "weft::co_spawn: the coroutine was destroyed before it finished: its executor dropped "
        "its next step (a pool joined, or an io_context destroyed, while it waited)"));
  } catch (...) {
    return std::current_exception();
  }
}

// A coroutine's task in its group, shared by the coroutine and its
// completion handler: whichever comes first ends it, once.
template <class Strand>
struct coroutine_task final : coroutine_cancellation {
  task_group* group = nullptr;  // null once the task has ended
  std::unique_ptr<cancel_callback<post_cancellation<Strand>>> link;
  // A handler destroyed uncalled while co_spawn runs leaves the ending to
  // co_spawn's caller: if co_spawn then throws, the caller gets that
  // exception, and the group should not report the coroutine as well.
  enum class spawn : int { running, returned, handler_dropped };
  std::atomic<spawn> spawned{spawn::running};

  // For co_spawn's caller, once it has returned.
  void spawn_returned() noexcept {
    auto expected = spawn::running;
    if (!spawned.compare_exchange_strong(expected, spawn::returned, std::memory_order_acq_rel)) {
      end(coroutine_dropped());
    }
  }

  // For the handler destroyed uncalled.
  void handler_dropped() noexcept {
    auto expected = spawn::running;
    if (!spawned.compare_exchange_strong(expected, spawn::handler_dropped,
                                         std::memory_order_acq_rel)) {
      end(coroutine_dropped());
    }
  }

  void end(std::exception_ptr error) noexcept {
    if (group == nullptr) return;
    task_group& target = *group;
    // Before the group may go: the record must not outlive the state it
    // lives in, and the link unregisters from the token.
    disarm();
    task_group_access::end(target, std::move(error));
  }

  // Ends the task without reporting anything.
  void disarm() noexcept {
    unregister();
    link.reset();
    group = nullptr;
  }
};

// Ends the coroutine's task as soon as its body is done, here on the
// strand. Left to the completion handler, the outcome was lost when the
// pool shut down meanwhile: Asio's entry point posts to the strand before
// it calls the handler (for a body that never suspended), a shut-down pool
// drops that step, and the group learnt only at join() that the coroutine
// was destroyed, as weft::rejected.
template <class AwaitableExecutor, class Strand>
boost::asio::awaitable<void, AwaitableExecutor> run_group_coroutine(
    boost::asio::awaitable<void, AwaitableExecutor> body,
    std::shared_ptr<coroutine_task<Strand>> task, cancel_token token) {
  task->started = true;
  if (token.cancelled()) task->emit();  // it came before the start: the first co_await throws
  std::exception_ptr error;
  try {
    co_await std::move(body);
  } catch (...) {
    error = std::current_exception();
  }
  task->finished = true;
  co_await boost::asio::this_coro::throw_if_cancelled(false);
  task->end(std::move(error));
}

// The coroutine's completion handler. The coroutine ends its own task
// (see run_group_coroutine); the handler ends it only when the coroutine
// could not: called with what escaped the coroutine's entry point, or
// destroyed uncalled (the executor dropped the coroutine's next step), when
// it ends the task with coroutine_dropped(), so that the group's wait()
// does not wait for a coroutine that will never finish.
template <class Strand>
struct group_coroutine_completion {
  using cancellation_slot_type = boost::asio::cancellation_slot;

  explicit group_coroutine_completion(std::shared_ptr<coroutine_task<Strand>> state) noexcept
      : task(std::move(state)) {}
  group_coroutine_completion(group_coroutine_completion&&) noexcept = default;
  group_coroutine_completion& operator=(group_coroutine_completion&&) = delete;

  ~group_coroutine_completion() {
    if (task != nullptr && !called) task->handler_dropped();
  }

  cancellation_slot_type get_cancellation_slot() const noexcept { return task->signal.slot(); }

  void operator()(std::exception_ptr error) {
    called = true;
    task->end(std::move(error));
  }

  std::shared_ptr<coroutine_task<Strand>> task;  // null once moved from
  bool called = false;
};

// The executor a group's coroutine runs on, through its strand: on a pool,
// one that owns the pool's execution context, so that every copy of the
// coroutine's executor keeps the strand's service alive. Asio releases some
// of them (in the frames of a coroutine destroyed on another context) after
// the coroutine has ended its task, when the pool may already be gone.
inline tracked_pool_executor owning_pool_context(const pool_executor& executor) {
  return boost::asio::prefer(executor, boost::asio::execution::outstanding_work.tracked);
}
// A strand of a pool keeps its own strand state in the pool's strand
// service, so its copies must own the pool's context too: the same strand,
// its executor tracked.
inline boost::asio::strand<tracked_pool_executor> owning_pool_context(
    const boost::asio::strand<pool_executor>& executor) {
  return boost::asio::prefer(executor, boost::asio::execution::outstanding_work.tracked);
}
inline boost::asio::strand<boost::asio::any_io_executor> owning_pool_context(
    const boost::asio::strand<boost::asio::any_io_executor>& executor) {
  if (executor.get_inner_executor().target<pool_executor>() == nullptr) return executor;
  return boost::asio::prefer(executor, boost::asio::execution::outstanding_work.tracked);
}
inline boost::asio::any_io_executor owning_pool_context(
    const boost::asio::any_io_executor& executor) {
  if (const auto* pool = executor.target<pool_executor>()) return owning_pool_context(*pool);
  if (const auto* strand = executor.target<boost::asio::strand<pool_executor>>()) {
    return owning_pool_context(*strand);
  }
  if (const auto* strand = executor.target<boost::asio::strand<boost::asio::any_io_executor>>()) {
    return owning_pool_context(*strand);
  }
  return executor;
}
template <class Executor>
const Executor& owning_pool_context(const Executor& executor) noexcept {
  return executor;
}

inline void check_open(const pool_executor& executor) {
  if (executor.context().is_shutdown()) {
    throw rejected("weft::co_spawn: the pool \"" + executor.context().name() + "\" is shut down");
  }
}

}  // namespace detail

// Throws weft::rejected when `executor` is a pool's and the pool is shut
// down, as task_group::go does.
template <class Executor, class AwaitableExecutor>
void co_spawn(task_group& group, const Executor& executor, boost::asio::awaitable<void, AwaitableExecutor> coroutine,
              spawn_site site = spawn_site::current()) {
  if constexpr (std::is_same_v<Executor, pool_executor>) detail::check_open(executor);
  // The coroutine runs on a strand, where its cancellation is emitted (see
  // coroutine_cancellation): a pool runs a coroutine's steps on any worker.
  using strand_type = decltype(boost::asio::make_strand(detail::owning_pool_context(executor)));
  if (!detail::task_group_access::begin(group)) return;
  std::shared_ptr<detail::coroutine_task<strand_type>> task;
  try {
    auto strand = boost::asio::make_strand(detail::owning_pool_context(executor));
    task = std::make_shared<detail::coroutine_task<strand_type>>();
    task->group = &group;
    task->link = std::make_unique<cancel_callback<detail::post_cancellation<strand_type>>>(
        group.token(), detail::post_cancellation<strand_type>{task, strand});
    task->register_with_registry(detail::make_origin(site, "coroutine"));
    boost::asio::co_spawn(strand,
                          detail::run_group_coroutine(std::move(coroutine), task, group.token()),
                          detail::group_coroutine_completion<strand_type>{task});
    task->spawn_returned();
  } catch (...) {
    // The task ends here, with nothing to report: the caller gets the
    // exception. (A handler destroyed meanwhile left it to this.)
    if (task) task->disarm();
    detail::task_group_access::end(group, nullptr);
    throw;
  }
}

template <class AwaitableExecutor>
void co_spawn(task_group& group, boost::asio::awaitable<void, AwaitableExecutor> coroutine,
              spawn_site site = spawn_site::current()) {
  detail::check_open(group.executor());
  co_spawn(group, AwaitableExecutor(group.executor()), std::move(coroutine), site);
}

}  // namespace weft
