// SPDX-License-Identifier: BSL-1.0
// weft::cancel_source and weft::cancel_token: Go's context.Context for
// cancellation, deadlines and causes, in C++.
//
//   Go                                     weft
//   ctx, cancel := context.WithCancel(p)   auto source = p.child(); auto ctx = source.token();
//   context.WithTimeout(p, d)              weft::with_timeout(p, d)
//   context.WithDeadline(p, t)             weft::with_deadline(p, t)
//   cancel() / context.WithCancelCause     source.cancel() / source.cancel(cause)
//   ctx.Err(), context.Cause(ctx)          token.cause()
//   <-ctx.Done()                           token.wait(), weft::async_wait(token, ...)
//   context.AfterFunc(ctx, f)              weft::on_cancel(token, f)
//
// A cancel_source owns the right to cancel; its tokens observe. Both are
// handles to one shared, reference-counted state (like std::stop_source and
// std::stop_token, which they interoperate with). A source made by
// `token.child()` is cancelled when the parent is, never the other way round;
// its cause is then the parent's. A default-constructed token is never
// cancelled.
//
// Guarantees:
//  - cancel() is idempotent; the first call's cause wins.
//  - Callbacks registered with on_cancel run exactly once: at registration on
//    the registering thread if already cancelled, else on the thread that
//    cancels (for a deadline: weft's timer thread), in registration order,
//    without any weft lock held, so they may register, remove or cancel.
//  - Destroying an on_cancel registration while its callback runs on another
//    thread waits for the callback to finish; from inside the callback it
//    returns at once (std::stop_callback's rule).
//  - Destroying a child detaches it from its parent: a parent's callback list
//    does not grow with children that are gone.
//  - A weft wait, fan-out or group given a token registers on it at most
//    once, only while it waits (a group: while it lives), and removes that
//    registration before it returns (a group: when it is destroyed), so a
//    long-lived server or request token's callback list does not grow.
//  - A deadline fires on time without polling: a lazily started internal
//    thread per clock type runs the timers and is joined at exit, once the
//    worker pools have joined theirs (a task waiting on a deadline as its
//    pool drains at exit is woken), but before the destructors of statics
//    made before the first pool or deadline: a thread of your own that such
//    a destructor joins must not wait on a deadline then. A deadline made
//    after that (in a later static's destructor) never fires. A far
//    deadline in a coarse unit (seconds::max()) saturates at the clock's
//    range, and one in a finer unit than the clock's is rounded up to its
//    tick: never early.
//  - Cancelling a parent cancels its children recursively, and a chain of
//    children is freed recursively: a chain tens of thousands deep (each a
//    child of the last) can overflow a thread's stack.
//
// Memory ordering: everything the cancelling thread did before cancel() is
// visible to a callback, and to any thread that sees cancelled() == true.
//
// Thread safety: the const members of both classes, and cancel(), may be
// called concurrently on the same or different objects; assigning to or
// destroying an object needs exclusive access to it, as for
// std::stop_token. Copies share one state. A thread that sees
// the cancel (its wait returns, cancelled() is true) may destroy its source
// at once, even while the cancel() called on that very source is still
// returning: cancel() keeps the state alive until it is done.
//
// Cost: a source allocates its state once (one allocation, ~100 bytes);
// tokens copy with one atomic increment; cancelled() is one acquire load;
// on_cancel allocates nothing (the registration holds the callback inline)
// and takes the state's mutex once; cancel() takes it once plus once per
// callback, and a reference for as long as it runs. A deadline adds one
// timer-heap entry.
//
// Example:
//   weft::cancel_source request = weft::with_timeout(server_token, 2s);
//   auto stop_io = weft::on_cancel(request.token(), [&] { socket.cancel(); });
//   if (request.token().cause().is_deadline()) ...
#pragma once

#include <weft/detail/cancel_state.hpp>
#include <weft/detail/deadline.hpp>
#include <weft/detail/parker.hpp>
#include <weft/detail/task_tracking.hpp>
#include <weft/detail/timed_wait.hpp>
#include <weft/wait_status.hpp>

#include <chrono>
#include <exception>
#include <stdexcept>
#include <system_error>
#include <type_traits>
#include <utility>

namespace weft {

class cancel_source;
class cancel_token;

namespace detail {
// weft's internals reach a token's shared state through this; not for users.
inline cancel_state* state_of(const cancel_token& token) noexcept;
}  // namespace detail

// Why a token was cancelled. Empty (false) while it is not.
class cancel_cause {
 public:
  cancel_cause() = default;

  explicit operator bool() const noexcept { return static_cast<bool>(code_); }

  // errc::cancelled, errc::deadline_exceeded, or the code given to cancel();
  // errc::cancelled when the cause is an exception. Empty when not cancelled.
  std::error_code code() const noexcept { return code_; }

  // The exception given to cancel(std::exception_ptr), else null.
  std::exception_ptr exception() const noexcept { return exception_; }

  bool is_deadline() const noexcept { return code_ == errc::deadline_exceeded; }

  // Throws the exception given as the cause, else std::system_error(code()).
  [[noreturn]] void rethrow() const {
    if (exception_) std::rethrow_exception(exception_);
    throw std::system_error(code_ ? code_ : make_error_code(errc::cancelled));
  }

 private:
  friend class cancel_token;
  cancel_cause(std::error_code code, std::exception_ptr exception) noexcept
      : code_(code), exception_(std::move(exception)) {}

  std::error_code code_;
  std::exception_ptr exception_;
};

class cancel_token {
 public:
  // A token that is never cancelled.
  cancel_token() noexcept = default;

  cancel_token(const cancel_token& other) noexcept : state_(other.state_) {
    if (state_ != nullptr) state_->ref();
  }
  cancel_token(cancel_token&& other) noexcept : state_(std::exchange(other.state_, nullptr)) {}
  cancel_token& operator=(cancel_token other) noexcept {
    std::swap(state_, other.state_);
    return *this;
  }
  ~cancel_token() {
    if (state_ != nullptr) state_->unref();
  }

  [[nodiscard]] bool cancelled() const noexcept { return state_ != nullptr && state_->cancelled(); }

  // False for a default-constructed token, which nothing can cancel.
  [[nodiscard]] bool can_be_cancelled() const noexcept { return state_ != nullptr; }

  [[nodiscard]] cancel_cause cause() const {
    if (!cancelled()) return {};
    return {state_->code(), state_->exception()};
  }

  // A new source whose token is cancelled when this one is.
  [[nodiscard]] cancel_source child() const;

  // Blocks until cancelled; returns wait_status::ok. Waiting on a token that
  // nothing can cancel would block forever, so that throws std::logic_error.
  wait_status wait() const;

  // Blocks until cancelled (ok) or the deadline passes (timeout).
  template <class Rep, class Period>
  wait_status wait_for(std::chrono::duration<Rep, Period> timeout) const {
    return wait_until(detail::deadline_after<std::chrono::steady_clock>(timeout));
  }
  template <class Clock, class Duration>
  wait_status wait_until(const std::chrono::time_point<Clock, Duration>& deadline) const;

#if defined(__cpp_lib_jthread)
  // A std::stop_token that is stopped when this token is cancelled (the
  // bridge is made on first use and lives as long as the shared state).
  [[nodiscard]] std::stop_token stop_token() const {
    return state_ != nullptr ? state_->std_stop_token() : std::stop_token{};
  }
#endif

  friend bool operator==(const cancel_token& a, const cancel_token& b) noexcept {
    return a.state_ == b.state_;
  }

 private:
  friend class cancel_source;
  template <class F>
  friend class cancel_callback;
  friend detail::cancel_state* detail::state_of(const cancel_token& token) noexcept;

  explicit cancel_token(detail::cancel_state* state) noexcept : state_(state) {
    if (state_ != nullptr) state_->ref();
  }

  detail::cancel_state* state_ = nullptr;
};

inline detail::cancel_state* detail::state_of(const cancel_token& token) noexcept { return token.state_; }

class cancel_source {
 public:
  // A new, independent source.
  cancel_source() : state_(new detail::cancel_state) {}

  cancel_source(const cancel_source& other) noexcept : state_(other.state_) { state_->ref(); }
  cancel_source(cancel_source&& other) noexcept : state_(other.state_) { state_->ref(); }
  cancel_source& operator=(cancel_source other) noexcept {
    std::swap(state_, other.state_);
    return *this;
  }
  ~cancel_source() { state_->unref(); }

  [[nodiscard]] cancel_token token() const noexcept { return cancel_token{state_}; }

  // Cancels with errc::cancelled, the given error code, or the given
  // exception as the cause. Returns true when this call cancelled the source,
  // false when it already was.
  bool cancel() noexcept { return state_->cancel(make_error_code(errc::cancelled)); }
  bool cancel(std::error_code cause) noexcept {
    return state_->cancel(cause ? cause : make_error_code(errc::cancelled));
  }
  bool cancel(std::exception_ptr cause) noexcept {
    return state_->cancel(make_error_code(errc::cancelled), std::move(cause));
  }

  [[nodiscard]] bool cancelled() const noexcept { return state_->cancelled(); }

 private:
  friend class cancel_token;
  template <class Clock, class Duration>
  friend cancel_source with_deadline(const cancel_token&, const std::chrono::time_point<Clock, Duration>&);
#if defined(__cpp_lib_jthread)
  friend cancel_source from_stop_token(std::stop_token);
#endif

  struct adopt_t {};
  cancel_source(adopt_t, detail::cancel_state* state) noexcept : state_(state) {}

  // Never null: a moved-from source still shares the state (copy semantics),
  // so every member stays usable.
  detail::cancel_state* state_;
};

inline cancel_source cancel_token::child() const {
  return cancel_source{cancel_source::adopt_t{}, new detail::cancel_state(state_)};
}

// A source cancelled with errc::deadline_exceeded at `deadline`, or earlier
// when `parent` is cancelled. A deadline already past gives a source that is
// already cancelled. Go's context.WithDeadline.
template <class Clock, class Duration>
[[nodiscard]] cancel_source with_deadline(const cancel_token& parent,
                                          const std::chrono::time_point<Clock, Duration>& deadline) {
  return cancel_source{cancel_source::adopt_t{},
                       new detail::deadline_state<Clock>(detail::state_of(parent),
                                                         detail::clock_deadline(deadline))};
}

// with_deadline(parent, Clock::now() + timeout), where a sum past the clock's
// range is its time_point::max(), a deadline that never comes. Go's
// context.WithTimeout.
template <class Clock = std::chrono::steady_clock, class Rep, class Period>
[[nodiscard]] cancel_source with_timeout(const cancel_token& parent,
                                         std::chrono::duration<Rep, Period> timeout) {
  return with_deadline(parent, detail::deadline_after<Clock>(timeout));
}

// An RAII registration of a callback that runs when a token is cancelled.
// Neither copyable nor movable: the state points at it while it lives.
// F must be invocable as f() and must not throw (an exception escaping it
// calls std::terminate, as with std::stop_callback).
template <class F>
class [[nodiscard]] cancel_callback {
 public:
  template <class G>
  cancel_callback(const cancel_token& token, G&& callback) noexcept(
      std::is_nothrow_constructible_v<F, G>)
      : link_(std::forward<G>(callback)), state_(token.state_) {
    if (state_ == nullptr) return;
    state_->ref();
    state_->add_callback(link_);
  }

  // Adopts the token's reference: `on_cancel(source.token(), f)` costs no
  // extra reference count update.
  template <class G>
  cancel_callback(cancel_token&& token, G&& callback) noexcept(std::is_nothrow_constructible_v<F, G>)
      : link_(std::forward<G>(callback)), state_(std::exchange(token.state_, nullptr)) {
    if (state_ != nullptr) state_->add_callback(link_);
  }

  cancel_callback(const cancel_callback&) = delete;
  cancel_callback& operator=(const cancel_callback&) = delete;

  ~cancel_callback() {
    if (state_ == nullptr) return;
    state_->remove_callback(link_);
    state_->unref();
  }

 private:
  struct link : detail::callback_node {
    template <class G>
    explicit link(G&& callback) : callback(std::forward<G>(callback)) {
      invoke = [](detail::callback_node& node) noexcept { static_cast<link&>(node).callback(); };
    }
    F callback;
  };

  link link_;
  detail::cancel_state* state_;
};

// Registers `callback` to run when `token` is cancelled (at once if it is).
template <class Token, class F>
  requires std::is_same_v<std::remove_cvref_t<Token>, cancel_token>
[[nodiscard]] cancel_callback<std::decay_t<F>> on_cancel(Token&& token, F&& callback) {
  static_assert(std::is_invocable_v<std::decay_t<F>&>, "on_cancel: the callback must be callable as f()");
  return cancel_callback<std::decay_t<F>>(std::forward<Token>(token), std::forward<F>(callback));
}

namespace detail {

// Parks the calling thread until `token` is cancelled or the deadline (if
// any) passes.
template <class Clock, class Duration>
wait_status wait_for_cancel(cancel_state* state, const std::chrono::time_point<Clock, Duration>* deadline) {
  if (state->cancelled()) return wait_status::ok;
  const blocked_scope blocked{"cancel_token", nullptr};
  struct wake_link : callback_node {
    parker waiter;
  } link;
  link.invoke = [](callback_node& node) noexcept { static_cast<wake_link&>(node).waiter.complete(); };
  state->add_callback(link);
  wait_status status = wait_status::ok;
  if (deadline == nullptr) {
    link.waiter.wait_completed();
  } else if (!wait_completed_until(link.waiter, *deadline)) {
    status = wait_status::timeout;
  }
  // Waits for a callback running on another thread, so the parker outlives its completion.
  state->remove_callback(link);
  return status == wait_status::timeout && state->cancelled() ? wait_status::ok : status;
}

}  // namespace detail

inline wait_status cancel_token::wait() const {
  if (state_ == nullptr) {
    throw std::logic_error(
        "weft::cancel_token::wait: this token can never be cancelled (default-constructed), "
        "so the wait would never end; use a token from a cancel_source");
  }
  return detail::wait_for_cancel<std::chrono::steady_clock, std::chrono::steady_clock::duration>(state_, nullptr);
}

template <class Clock, class Duration>
wait_status cancel_token::wait_until(const std::chrono::time_point<Clock, Duration>& deadline) const {
  const auto due = detail::clock_deadline(deadline);
  if (state_ == nullptr) {
    detail::parker never_completed;
    detail::wait_completed_until(never_completed, due);
    return wait_status::timeout;
  }
  return detail::wait_for_cancel(state_, &due);
}

// Free-function form of token.wait(), for symmetry with the other primitives.
inline wait_status wait(const cancel_token& token) { return token.wait(); }

template <class Clock, class Duration>
wait_status wait_until(const cancel_token& token, const std::chrono::time_point<Clock, Duration>& deadline) {
  return token.wait_until(deadline);
}

#if defined(__cpp_lib_jthread)
namespace detail {

class stop_token_state final : public cancel_state {
 public:
  explicit stop_token_state(std::stop_token token) : link_(std::move(token), forward_stop{this}) {}

 private:
  struct forward_stop {
    cancel_state* state;
    void operator()() const noexcept {
      if (!state->try_ref()) return;
      state->cancel(make_error_code(errc::cancelled));
      state->unref();
    }
  };
  std::stop_callback<forward_stop> link_;
};

}  // namespace detail

// A source cancelled (errc::cancelled) when `token` is asked to stop.
[[nodiscard]] inline cancel_source from_stop_token(std::stop_token token) {
  return cancel_source{cancel_source::adopt_t{}, new detail::stop_token_state(std::move(token))};
}
#endif

}  // namespace weft
