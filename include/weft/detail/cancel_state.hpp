// SPDX-License-Identifier: BSL-1.0
// detail::cancel_state: the shared state behind cancel_source and
// cancel_token.
//
// Layout and rules:
//  - Reference counted by sources and tokens (refs_). Anything that acts on
//    a state from a callback it does not own a reference for (a parent
//    cancelling a child, a deadline timer) first takes one with try_ref(),
//    so a callback that drops the last user reference cannot free the state
//    under the canceller's feet.
//  - cancelled_ goes from false to true once, with a release store, after the
//    cause (code_, exception_) is written; readers load it with acquire and
//    may then read the cause without the mutex.
//  - Callbacks are intrusive nodes in a doubly linked list guarded by
//    mutex_ (a spin_mutex: it is held for a few instructions at a time).
//    cancel() unlinks and invokes them one by one, in registration order,
//    outside the mutex. remove_callback() waits for a callback running
//    on another thread (invocation_tracker), and returns at once from inside
//    the callback itself.
//  - A child holds a reference to its parent and a callback node in the
//    parent's list; destroying the child's state removes that node, so the
//    parent's list never grows with children that are gone.
#pragma once

#include <weft/detail/invocation_tracker.hpp>
#include <weft/detail/spin_mutex.hpp>
#include <weft/detail/timer_queue.hpp>
#include <weft/wait_status.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <mutex>
#include <system_error>
#include <version>

#if defined(__cpp_lib_jthread)
#include <optional>
#include <stop_token>
#endif

namespace weft::detail {

struct callback_node {
  callback_node* prev = nullptr;
  callback_node* next = nullptr;
  bool linked = false;
  // Runs once, on the cancelling thread, without the state's mutex held.
  void (*invoke)(callback_node&) noexcept = nullptr;
};

class cancel_state {
 public:
  cancel_state() = default;
  cancel_state(const cancel_state&) = delete;
  cancel_state& operator=(const cancel_state&) = delete;

  // A state linked to `parent` (which may be null): cancelled when it is.
  explicit cancel_state(cancel_state* parent) {
    if (parent != nullptr) link_to(*parent);
  }

  virtual ~cancel_state() {
    if (parent_ != nullptr) {
      parent_->remove_callback(parent_link_);
      parent_->unref();
    }
#if defined(__cpp_lib_jthread)
    if (std_link_) remove_callback(*std_link_);
#endif
  }

  void ref() noexcept { refs_.fetch_add(1, std::memory_order_relaxed); }

  void unref() noexcept {
    if (refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete this;
  }

  // Takes a reference unless the state is already being destroyed.
  bool try_ref() noexcept {
    auto count = refs_.load(std::memory_order_relaxed);
    while (count != 0) {
      if (refs_.compare_exchange_weak(count, count + 1, std::memory_order_acquire,
                                      std::memory_order_relaxed)) {
        return true;
      }
    }
    return false;
  }

  bool cancelled() const noexcept { return cancelled_.load(std::memory_order_acquire); }

  // Valid once cancelled() is true.
  std::error_code code() const noexcept { return code_; }
  std::exception_ptr exception() const noexcept { return exception_; }
  bool by_deadline() const noexcept { return code_ == errc::deadline_exceeded; }
  // What a wait that this state stopped returns.
  wait_status stop_status() const noexcept {
    return by_deadline() ? wait_status::timeout : wait_status::cancelled;
  }

  // Returns true when this call cancelled the state, false when it already
  // was. A waiter that sees the cancel may drop what it holds at once (its
  // cancel_source among them, on which this may have been called): the
  // call holds a reference of its own until it is done with the state. It
  // takes none from a state already being destroyed, whose destructor waits
  // for this call (a deadline's timer, or the parent's link, firing).
  bool cancel(std::error_code code, std::exception_ptr exception = nullptr) noexcept {
    const bool referenced = try_ref();
    const bool first = cancel_referenced(code, std::move(exception));
    if (referenced) unref();
    return first;
  }

  // Links `node`, or invokes it at once (on this thread) when already
  // cancelled. Returns true when linked.
  bool add_callback(callback_node& node) noexcept {
    if (!cancelled()) {
      std::lock_guard lock(mutex_);
      if (!cancelled_.load(std::memory_order_relaxed)) {
        link(node);
        return true;
      }
    }
    node.invoke(node);
    return false;
  }

  // After it returns, node's callback is not running and will not run
  // (unless called from inside that callback, which may then go on).
  void remove_callback(callback_node& node) noexcept {
    std::unique_lock lock(mutex_);
    if (node.linked) {
      unlink(node);
      return;
    }
    tracker_.wait_until_not_running(&node, lock);
  }

  // True when nothing but `owner_refs` references of one owner remain and
  // nothing has happened to the state since it was made without a parent:
  // the owner may then use it again as if new, and nobody can tell.
  bool pristine(std::uint32_t owner_refs) noexcept {
    std::lock_guard lock(mutex_);
    bool pristine = refs_.load(std::memory_order_acquire) == owner_refs && !cancelled() && parent_ == nullptr &&
                    head_ == nullptr;
#if defined(__cpp_lib_jthread)
    pristine = pristine && !std_link_;
#endif
    return pristine;
  }

  // For tests: how many callbacks are registered.
  std::size_t callback_count() {
    std::lock_guard lock(mutex_);
    std::size_t count = 0;
    for (auto* node = head_; node != nullptr; node = node->next) ++count;
    return count;
  }

#if defined(__cpp_lib_jthread)
  // A std::stop_token that is stopped when this state is cancelled.
  std::stop_token std_stop_token() {
    std::lock_guard lock(mutex_);
    if (!std_link_) {
      std_link_.emplace();
      std_link_->invoke = [](callback_node& node) noexcept {
        static_cast<std_source_link&>(node).source.request_stop();
      };
      // Linked, or stopped, before the mutex is released: a cancel() that
      // has returned found the link, and no caller gets the token of a
      // cancelled state unstopped. Nothing is registered on the new source
      // yet, so stopping it here runs no callback under the mutex.
      if (cancelled_.load(std::memory_order_relaxed)) {
        std_link_->source.request_stop();
      } else {
        link(*std_link_);
      }
    }
    return std_link_->source.get_token();
  }
#endif

 private:
  bool cancel_referenced(std::error_code code, std::exception_ptr exception) noexcept {
    std::unique_lock lock(mutex_);
    if (cancelled_.load(std::memory_order_relaxed)) return false;
    code_ = code;
    exception_ = std::move(exception);
    cancelled_.store(true, std::memory_order_release);
    while (head_ != nullptr) {
      callback_node* node = head_;
      unlink(*node);
      tracker_.begin(node);
      lock.unlock();
      node->invoke(*node);
      lock.lock();
      tracker_.end();
    }
    return true;
  }

  struct parent_link : callback_node {
    cancel_state* child = nullptr;
  };

  void link_to(cancel_state& parent) {
    parent.ref();
    parent_ = &parent;
    parent_link_.child = this;
    parent_link_.invoke = [](callback_node& node) noexcept {
      cancel_state& child = *static_cast<parent_link&>(node).child;
      if (!child.try_ref()) return;
      child.cancel(child.parent_->code(), child.parent_->exception());
      child.unref();
    };
    parent.add_callback(parent_link_);
  }

  // With the mutex held, before the state is cancelled.
  void link(callback_node& node) noexcept {
    node.prev = tail_;
    node.next = nullptr;
    (tail_ != nullptr ? tail_->next : head_) = &node;
    tail_ = &node;
    node.linked = true;
  }

  void unlink(callback_node& node) noexcept {
    (node.prev != nullptr ? node.prev->next : head_) = node.next;
    (node.next != nullptr ? node.next->prev : tail_) = node.prev;
    node.prev = node.next = nullptr;
    node.linked = false;
  }

  std::atomic<std::uint32_t> refs_{1};
  std::atomic<bool> cancelled_{false};
  spin_mutex mutex_;
  callback_node* head_ = nullptr;
  callback_node* tail_ = nullptr;
  invocation_tracker tracker_;
  std::error_code code_;
  std::exception_ptr exception_;
  cancel_state* parent_ = nullptr;
  parent_link parent_link_;

#if defined(__cpp_lib_jthread)
  struct std_source_link : callback_node {
    std::stop_source source;
  };
  std::optional<std_source_link> std_link_;
#endif
};

}  // namespace weft::detail

namespace weft::detail {

// A state that cancels itself with errc::deadline_exceeded at `deadline`.
template <class Clock>
class deadline_state final : public cancel_state {
 public:
  deadline_state(cancel_state* parent, typename Clock::time_point deadline) : cancel_state(parent) {
    if (cancelled()) return;  // the parent was cancelled already
    if (Clock::now() >= deadline) {
      cancel(make_error_code(errc::deadline_exceeded));
      return;
    }
    // Where a timeout too long for the clock saturates: it never comes, so
    // it needs no timer (nor a timer thread).
    if (deadline == Clock::time_point::max()) return;
    timer_.deadline = deadline;
    timer_.owner = this;
    timer_.fire = [](timer_node<Clock>& node) noexcept {
      cancel_state& owner = *static_cast<deadline_timer&>(node).owner;
      if (!owner.try_ref()) return;  // being destroyed; its destructor waits for us
      owner.cancel(make_error_code(errc::deadline_exceeded));
      owner.unref();
    };
    schedule_timer(timer_);
    scheduled_ = true;
    // The clock may have passed the deadline between the check above and the
    // schedule without firing the new timer (see schedule_timer).
    if (Clock::now() >= deadline) cancel(make_error_code(errc::deadline_exceeded));
  }

  ~deadline_state() override {
    if (scheduled_) cancel_timer(timer_);
  }

 private:
  struct deadline_timer : timer_node<Clock> {
    cancel_state* owner = nullptr;
  };

  deadline_timer timer_;
  bool scheduled_ = false;
};

}  // namespace weft::detail
