// SPDX-License-Identifier: BSL-1.0
// Fan-out / fan-in as calls (gather, parallel_map, for_each) and over
// channels (merge, fan_out).
//
// Go analogue: an errgroup whose goroutines write into a results slice, the
// pattern an API handler uses to call three backends at once. C++
// alternatives: std::async per call and future::get, tbb::parallel_for /
// tbb::task_group, a latch over asio::thread_pool.
//
//   auto [account, history, settings] = weft::gather_for(50ms, request,
//       [&](weft::cancel_token t) { return users.get(id, t); },
//       [&](weft::cancel_token t) { return orders.list(id, t); },
//       [&] { return prefs.load(id); });
//
//   std::vector<thumb> thumbs = weft::parallel_map(images, make_thumbnail, {.limit = 4});
//
// Semantics (gather, parallel_map and for_each keep task_group's rules,
// with helper tasks of their own, see below):
//  - Each call may take a weft::cancel_token as its last parameter; the
//    token is cancelled by the caller's token, by the deadline, or by the
//    first call that throws. The first exception is rethrown to the caller
//    after every call has finished or been skipped; calls not yet started
//    when the token is cancelled are skipped, and a cancellation with no
//    exception is reported by throwing the token's cause (std::system_error
//    with errc::cancelled or errc::deadline_exceeded).
//  - The calling thread does not sit idle: it runs calls itself while it
//    waits, so a fan-out of small calls needs no wake-up round trip.
//  - A null function pointer, as f or as one of gather's calls, is refused
//    with std::invalid_argument before any call is made, as go() refuses one.
//  - On an executor whose pool is shut down they throw weft::rejected and
//    make no call, even one the calling thread would have made (over an
//    empty range too). When the pool shuts down while they start their
//    tasks, the refusal fails the call as a call's exception would: the
//    calls already started see their token cancelled and are joined, and
//    weft::rejected is thrown, or the exception of a call that failed first.
//    A shutdown after that does not fail the call: the helpers shutdown()
//    leaves queued still run, and the calling thread runs what the helpers
//    that shutdown_now() drops would have.
//  - parallel_map and for_each keep at most `limit` calls in flight (by
//    default one per worker of the executor, plus the caller if the
//    workers leave it a hardware thread). They do not post a task per
//    element: the calling thread and up to `limit` - 1 helpers (one per
//    worker at most, and none the pool has no room for) claim runs of
//    elements until none is left, so a million elements cost a million
//    calls, not a million posts. The calling thread starts with every
//    element; a task with none left steals the back half of what another
//    has not claimed. A claim takes 1/(2n) of what the claimer holds, and
//    at least one element, n being the limit or, if fewer, the number of
//    elements: so claims are few while much is left, and single elements
//    at the end. Elements of one claim run one after another on one task:
//    an element must not wait for another element.
//    A helper that the pool starts after the call has returned does
//    nothing. Their tasks are listed in the registry as "task_group" tasks
//    at the line that called them.
//  - gather returns a std::tuple of the calls' results in argument order; a
//    call returning void gives std::monostate. Its calls are claimed as
//    elements are, one at a time and all at once (its limit is the number
//    of calls): the calling thread and up to one helper per worker run
//    them, and a call may wait for another while a task is free to run it.
//  - merge(group, out, in1, in2, ...) and fan_out(group, in, n, f) start
//    tasks in a group the caller owns and joins (group.wait()), so they are
//    structured like any other task: they block their worker while they
//    wait on a channel, so give the group's pool a worker for each, or
//    let group.wait() run them.
//
//     weft::task_group group{ingest_pool.executor(), request};
//     weft::merge(group, all, from_kafka, from_http);   // all closes when both are drained
//     weft::fan_out(group, all, 4, [&](event& e) { store(e); });
//     group.wait();
//
// Thread safety: each call is independent; the range must not change while
// parallel_map or for_each runs, and f is called concurrently from several
// threads. for_each that writes elements through a reference must not be
// given a range whose elements share a memory location (a std::vector<bool>
// packs 64 in a word): writes from two threads to one word lose each other.
// The range must be a forward range.
//
// Cost: gather, parallel_map and for_each take one of their thread's spare
// shared states (allocating one only while late helpers of earlier calls,
// which the pool had not started, still hold all four),
// plus a child token's state under a parent token; they post up to one
// helper per worker (three words, inline in the pool's slot), and wait for
// the helpers that started, spinning before they sleep (as long as an idle
// worker may, WEFT_WORKER_SPIN_LIMIT: the helpers have no calls left to
// start). A claim is
// a compare-and-swap on the claimer's own cache line; a steal moves the
// victim's line and a shared counter's. parallel_map also allocates its
// result vector, and for a range that is not random-access and sized, a
// vector of its iterators.
#pragma once

#include <weft/cancel.hpp>
#include <weft/channel.hpp>
#include <weft/config.hpp>
#include <weft/detail/fan_core.hpp>
#include <weft/task_group.hpp>
#include <weft/worker_pool.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <iterator>
#include <memory>
#include <optional>
#include <ranges>
#include <stdexcept>
#include <tuple>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

namespace weft {

struct fan_options {
  // Calls in flight at most; 0 means one per worker of the executor, plus
  // one on the calling thread when the pool has fewer workers than
  // weft::hardware_threads() (the CPUs this process may use).
  std::size_t limit = 0;
  cancel_token token{};
  // The default executor when empty.
  std::optional<pool_executor> executor{};
};

namespace detail {

// The first parameter of gather, merge and fan_out, with the line that
// called them. Their last parameters are a pack, so the spawn site cannot be
// a defaulted last parameter as elsewhere in weft; it is a defaulted
// parameter of this implicit conversion instead, which the compiler also
// evaluates at the caller. It refers to the caller's object, so it lives
// only for the call.
template <class Object>
struct at_call_site {
  // NOLINTNEXTLINE(google-explicit-constructor): converting is its purpose
  at_call_site(Object& object, spawn_site site = spawn_site::current()) noexcept : object(object), site(site) {}

  Object& object;
  spawn_site site;
};

template <class F, class... Args>
decltype(auto) invoke_maybe_with_token(F& f, const cancel_token& token, Args&&... args) {
  if constexpr (std::is_invocable_v<F&, Args..., const cancel_token&>) {
    return f(std::forward<Args>(args)..., token);
  } else {
    static_assert(std::is_invocable_v<F&, Args...>,
                  "weft: the function must be callable with the element (and optionally a weft::cancel_token)");
    return f(std::forward<Args>(args)...);
  }
}

// Calls f (with the token if it takes one); void becomes std::monostate,
// so every call has a value to put in gather's tuple.
template <class F>
auto call_for_result(F& f, const cancel_token& token) {
  if constexpr (std::is_void_v<decltype(invoke_with_token(f, token))>) {
    invoke_with_token(f, token);
    return std::monostate{};
  } else {
    return invoke_with_token(f, token);
  }
}

template <class F>
concept group_callable = std::is_invocable_v<F&> || std::is_invocable_v<F&, const cancel_token&>;

// Runs body(i) for every i in [0, count) on at most `limit` tasks: the
// calling thread and helpers it posts to the pool, one per worker at most.
// The indices are claimed from lanes (see fan_core.hpp): the caller's lane
// starts with all of them, and each claim takes 1/(2 x tasks) of what is
// left in the claimer's lane (at least one index), so claims are few while
// much is left, and the last ones are single indices that keep the tasks'
// ends level.
//
// The default limit is one task per worker, plus one for the calling thread
// only while the workers leave a hardware thread free for it. On a pool as
// large as hardware_threads(), a task more would wake a worker that can
// only take turns on a core with the caller and the rest: a fan-out of 16
// calls of 170 ns on the 2-core default pool took 6.3 us with 3 tasks (a
// wake-up and a context switch per fan-out) and 5.0 us with 2 (fan_bench).
inline std::size_t default_fan_limit(std::size_t workers) noexcept {
  return workers < hardware_threads() ? workers + 1 : workers;
}

// What a task of run_indexed needs from the calling thread's frame; a
// helper reads it only once it has entered the core's gate.
template <class Body>
struct fan_call {
  const Body& body;
  const spawn_site& site;
  group_ancestry callers;  // see task_group.hpp
  // The task running on the calling thread: every lane's parent, wherever
  // the lane runs.
  std::uint64_t parent = running_task_id();
};

// One task's share: claims and runs indices until none is left or the
// token is cancelled. Listed in the registry as a group's task is.
template <class Body>
void run_fan_lane(fan_core& core, std::size_t lane, const fan_call<Body>& call) noexcept {
  task_origin origin = make_origin(call.site, "task_group");
  origin.parent = call.parent;
  accepted(origin);
  const cancel_token& token = core.token();
  std::size_t calls = 0;
  {
    const running_scope running{origin};
    const running_group_scope running_here{group_ancestry::no_group_id, call.callers};
    try {
      // A copy on this task's stack: read through the caller's frame for
      // every call, the captures share lines with what the caller writes
      // as it runs its own calls, and the caller waits for those lines to
      // come back (16 calls of 170 ns on 2 cores: the caller's calls took
      // 300 ns each while a helper ran).
      Body body = call.body;
      // The flag is read through a pointer to the token's state held
      // here, so that GCC keeps the body's captures in registers. Read
      // through the token (a null test, the state's pointer, then the
      // flag), it reloaded the pointer and parallel_map's result and
      // element pointers after every check: a map over 100,000
      // one-multiply elements ran 2.2G/s, 0.72x tbb::parallel_for, where
      // this loop runs 2.6G/s, 1.01x (fan_bench on 2 vCPUs, medians of six
      // alternating rounds).
      const cancel_state* const state = state_of(token);
      WEFT_ASSERT(state != nullptr);  // see reusable_source::token()
      for (fan_core::unit_range units{}; !state->cancelled() && core.claim(lane, units);) {
        const auto elements = core.elements_of(units);
        for (auto i = elements.first; i < elements.last && !state->cancelled(); ++i) {
          body(i, token);
          ++calls;
        }
      }
    } catch (...) {
      core.fail(std::current_exception());
    }
  }
  core.add_run(lane, calls);
}

// What the pool runs for a helper: three words, inline in the pool's slot.
// One destroyed unrun (shutdown_now) only lets go of the core.
template <class Body>
class fan_helper {
 public:
  fan_helper(fan_core& core, const fan_call<Body>& call, std::size_t lane) noexcept
      : core_(&core), call_(&call), lane_(lane) {
    core.add_ref();
  }
  fan_helper(fan_helper&& other) noexcept
      : core_(std::exchange(other.core_, nullptr)), call_(other.call_), lane_(other.lane_) {}
  fan_helper& operator=(fan_helper&&) = delete;
  ~fan_helper() {
    if (core_ != nullptr) core_->unref();
  }

  void operator()() noexcept {
    fan_core* core = std::exchange(core_, nullptr);
    if (core->enter()) {
      run_fan_lane(*core, lane_, *call_);
      core->leave();
    } else {
      core->unref();
    }
  }

 private:
  fan_core* core_;
  const fan_call<Body>* call_;
  std::size_t lane_;
};

template <class Body>
void run_indexed(std::size_t count, const fan_options& options, const spawn_site& site, Body body) {
  const pool_executor executor = options.executor ? *options.executor : default_executor();
  // As go() would, even when every call is to run on this thread.
  if (executor.context().is_shutdown()) {
    throw rejected("weft::parallel_map/for_each: the executor's pool \"" + executor.context().name() +
                   "\" is shut down");
  }
  if (count == 0) return;
  const std::size_t limit = options.limit != 0 ? options.limit : default_fan_limit(executor.context().size());
  const auto tasks = std::min(count, limit);
  const auto lanes = std::min(tasks, executor.context().size() + 1);
  fan_core& core = *fan_core::make(count, lanes, tasks, options.token);
  fan_call<Body> call{body, site, {}};
  call.callers.record_this_thread();
  // A helper that the pool has no room for is not needed: its workers are
  // busy, and this thread runs what no helper takes.
  try {
    for (std::size_t lane = 1; lane < lanes; ++lane) {
      if (!worker_pool_access::try_post_untracked(executor.context(),
                                                  fan_helper<Body>{core, call, lane}))
        break;
    }
  } catch (...) {
    // The pool was shut down while the helpers were being posted (or a
    // post could not allocate). That fails the call as a call's exception
    // would: the helpers already posted see the token cancelled, and the
    // first failure is thrown below, theirs if one came before.
    core.fail(std::current_exception());
  }
  run_fan_lane(core, 0, call);
  core.close_and_wait();
  const std::exception_ptr error = core.first_error();
  // A task that saw the token cancelled stopped without an exception; the
  // elements it left are reported, as a group's skipped tasks are.
  const bool skipped = !error && core.calls_run() != count;
  const cancel_cause cause = skipped ? core.token().cause() : cancel_cause{};
  core.release_by_caller();
  if (error) std::rethrow_exception(error);
  if (skipped) cause.rethrow();
}

// The elements of a range, addressable by index: the range's own iterator
// when it is random-access, else its iterators, collected once. indexer()
// is what the calls capture: a copy small enough for each task to keep on
// its own stack (see run_fan_lane).
template <class Iterator>
struct random_access_elements {
  Iterator first;
  std::size_t count;
  std::size_t size() const noexcept { return count; }
  decltype(auto) operator[](std::size_t i) const {
    return first[static_cast<std::iter_difference_t<Iterator>>(i)];
  }
  random_access_elements indexer() const { return *this; }
};

template <class Iterator>
struct collected_elements {
  struct collected_indexer {
    const Iterator* iterators;
    decltype(auto) operator[](std::size_t i) const { return *iterators[i]; }
  };

  std::vector<Iterator> iterators;
  std::size_t size() const noexcept { return iterators.size(); }
  collected_indexer indexer() const noexcept { return {iterators.data()}; }
};

template <class Range>
auto elements_of(Range& range) {
  // Copies of a single-pass iterator all read the stream's current element.
  static_assert(std::ranges::forward_range<Range>,
                "weft::parallel_map/for_each: the range must be a forward range (a single-pass "
                "range, such as a stream, cannot be read by several tasks); collect it into a "
                "vector first");
  using iterator = std::ranges::iterator_t<Range>;
  if constexpr (std::ranges::random_access_range<Range> && std::ranges::sized_range<Range>) {
    return random_access_elements<iterator>{std::ranges::begin(range), static_cast<std::size_t>(std::ranges::size(range))};
  } else {
    collected_elements<iterator> elements;
    for (auto it = std::ranges::begin(range); it != std::ranges::end(range); ++it) elements.iterators.push_back(it);
    return elements;
  }
}

// Runs call `index` of a gather into its slot of the tuple.
template <class Slots, std::size_t... I, class... F>
void run_gather_call(std::size_t index, Slots& slots, const cancel_token& token,
                     std::index_sequence<I...>, F&... calls) {
  ((index == I ? (void)std::get<I>(slots).emplace(call_for_result(calls, token)) : void()), ...);
}

}  // namespace detail

// Calls f on every element, concurrently; returns the results in input order.
template <class Range, class F>
auto parallel_map(Range&& range, F&& f, const fan_options& options = {}, spawn_site site = spawn_site::current()) {
  using element = std::ranges::range_reference_t<Range>;
  using result = std::remove_cvref_t<decltype(detail::invoke_maybe_with_token(
      std::declval<std::decay_t<F>&>(), std::declval<const cancel_token&>(), std::declval<element>()))>;
  static_assert(!std::is_void_v<result>, "weft::parallel_map: f returns void; use weft::for_each");
  detail::check_callable(f, "parallel_map");
  auto elements = detail::elements_of(range);
  // Results of trivially copyable types (numbers, plain structs) that can
  // be assigned (not a struct with a const member) are assigned in place,
  // where assigning is constructing; others are made in optionals and
  // moved out after, so a type whose default constructor may throw (or has
  // none) is never default-constructed, and a proxy (as
  // std::vector<bool>::reference), whose assignment writes through it, is
  // never assigned to. Not bools: std::vector<bool> packs them, and
  // neighbours written from two threads would race.
  if constexpr (std::is_trivially_copyable_v<result> &&
                std::is_nothrow_default_constructible_v<result> &&
                std::is_trivially_move_assignable_v<result> && !std::is_same_v<result, bool>) {
    std::vector<result> out(elements.size());
    detail::run_indexed(elements.size(), options, site,
                        [results = out.data(), elements = elements.indexer(), &f](
                            std::size_t i, const cancel_token& token) {
                          results[i] = detail::invoke_maybe_with_token(f, token, elements[i]);
                        });
    return out;
  } else {
    std::vector<std::optional<result>> slots(elements.size());
    detail::run_indexed(elements.size(), options, site,
                        [slots = slots.data(), elements = elements.indexer(), &f](
                            std::size_t i, const cancel_token& token) {
                          slots[i].emplace(detail::invoke_maybe_with_token(f, token, elements[i]));
                        });
    std::vector<result> out;
    out.reserve(slots.size());
    for (auto& slot : slots) out.push_back(std::move(*slot));
    return out;
  }
}

// Calls f on every element, concurrently.
template <class Range, class F>
void for_each(Range&& range, F&& f, const fan_options& options = {}, spawn_site site = spawn_site::current()) {
  detail::check_callable(f, "for_each");
  auto elements = detail::elements_of(range);
  detail::run_indexed(
      elements.size(), options, site,
      [elements = elements.indexer(), &f](std::size_t i, const cancel_token& token) {
        detail::invoke_maybe_with_token(f, token, elements[i]);
      });
}

// Runs every call concurrently on `executor` under `token`; returns their
// results as a tuple.
template <class... F>
auto gather(pool_executor executor, detail::at_call_site<const cancel_token> token, F&&... calls) {
  (detail::check_callable(calls, "gather"), ...);
  std::tuple<std::optional<decltype(detail::call_for_result(std::declval<std::decay_t<F>&>(),
                                                            std::declval<const cancel_token&>()))>...>
      slots;
  // Calls are elements of a run with no limit below their number: each
  // claim takes one, and the calls run on the calling thread and on up to
  // one helper per worker.
  constexpr std::size_t count = sizeof...(F);
  detail::run_indexed(
      count, fan_options{.limit = count, .token = token.object, .executor = executor}, token.site,
      [&slots, &calls...](std::size_t index, const cancel_token& call_token) {
        detail::run_gather_call(index, slots, call_token, std::index_sequence_for<F...>{},
                                calls...);
      });
  // Spelled out: std::tuple{...} would unwrap a single pair or tuple result.
  return std::apply(
      [](auto&... slot) {
        return std::tuple<typename std::remove_reference_t<decltype(slot)>::value_type...>{
            std::move(*slot)...};
      },
      slots);
}

// gather on the default executor.
template <class... F>
auto gather(detail::at_call_site<const cancel_token> token, F&&... calls) {
  return gather(default_executor(), token, std::forward<F>(calls)...);
}

// gather with a deadline `timeout` from now (on the steady clock): calls
// still running then see their token cancelled with errc::deadline_exceeded.
template <class Rep, class Period, class... F>
auto gather_for(std::chrono::duration<Rep, Period> timeout, detail::at_call_site<const cancel_token> token, F&&... calls) {
  const cancel_source deadline = with_timeout(token.object, timeout);
  return gather(default_executor(), detail::at_call_site<const cancel_token>{deadline.token(), token.site}, std::forward<F>(calls)...);
}

namespace detail {
// merge()'s count of open inputs: an input is counted off when its
// forwarder is destroyed, whether it ran to its end, was skipped by a
// cancelled group, or was dropped by a go() that threw. Counted off at the
// end of the forwarder's run, a skipped one left `out` open for good.
template <class T, class Clock>
class merge_input_done {
 public:
  merge_input_done(std::shared_ptr<std::atomic<std::size_t>> open, basic_channel<T, Clock>& out)
      : open_(std::move(open)), out_(&out) {}
  merge_input_done(merge_input_done&&) noexcept = default;
  merge_input_done& operator=(merge_input_done&&) = delete;
  ~merge_input_done() { count_off(open_, *out_, 1); }

  // Closes `out` when these are the last open inputs.
  static void count_off(const std::shared_ptr<std::atomic<std::size_t>>& open,
                        basic_channel<T, Clock>& out, std::size_t inputs) {
    if (open && inputs != 0 && open->fetch_sub(inputs, std::memory_order_acq_rel) == inputs) {
      out.close();
    }
  }

 private:
  std::shared_ptr<std::atomic<std::size_t>> open_;
  basic_channel<T, Clock>* out_;
};
}  // namespace detail

// Fan-in over channels: forwards every value of `inputs` into `out`, from
// one task of `group` per input, and closes `out` once every input is closed
// and drained (or the group's token is cancelled, which drops the values
// then in flight). Values of one input keep their order in `out`.
template <class T, class Clock, class... Inputs>
  requires(sizeof...(Inputs) > 0 && (std::is_same_v<Inputs, basic_channel<T, Clock>> && ...))
void merge(detail::at_call_site<task_group> group, basic_channel<T, Clock>& out, Inputs&... inputs) {
  auto open_inputs = std::make_shared<std::atomic<std::size_t>>(sizeof...(Inputs));
  std::size_t started = 0;
  const auto forward = [&](basic_channel<T, Clock>& in) {
    ++started;
    group.object.go(
        [&in, &out,
         done = detail::merge_input_done<T, Clock>{open_inputs, out}](const cancel_token& token) {
          for (;;) {
            auto value = in.recv(token);
            if (!value || out.send(std::move(*value), token) != wait_status::ok) break;
          }
        },
        group.site);
  };
  try {
    (forward(inputs), ...);
  } catch (...) {
    // The inputs whose go() was never tried.
    detail::merge_input_done<T, Clock>::count_off(open_inputs, out, sizeof...(Inputs) - started);
    throw;
  }
}

// Fan-out over a channel: `workers` tasks of `group` each receive from `in`
// and call f(value) (or f(value, token)) until `in` is closed and drained.
// An exception from f fails the group, whose cancelled token stops the rest.
template <class T, class Clock, class F>
void fan_out(detail::at_call_site<task_group> group, basic_channel<T, Clock>& in, std::size_t workers, F f) {
  if (workers == 0) throw std::invalid_argument("weft::fan_out: workers must be at least 1");
  detail::check_callable(f, "fan_out");
  auto shared = std::make_shared<F>(std::move(f));
  for (std::size_t i = 0; i < workers; ++i) {
    group.object.go(
        [&in, shared](const cancel_token& token) {
          for (;;) {
            auto value = in.recv(token);
            if (!value) break;
            detail::invoke_maybe_with_token(*shared, token, *value);
          }
        },
        group.site);
  }
}

}  // namespace weft
