// SPDX-License-Identifier: BSL-1.0
// detail::wait_queue: the one FIFO of waiters under every blocking weft
// primitive.
//
// A waiter is a wait_node: a thread_waiter on the waiting thread's stack,
// which parks the thread (detail::parker: a bounded spin, then a futex), or an
// async waiter made by weft/asio, which holds an Asio completion handler and
// completes it on the handler's associated executor. Both kinds sit in one
// FIFO, so order holds across threads and coroutines.
//
// The owning primitive keeps its own atomic state for the fast path and comes
// here only when it must wait or wake someone; it also keeps, in that state, a
// "has waiters" mark that it sets and clears with the queue's mutex held, so
// its fast paths can tell without the mutex that nobody waits.
//
// Invariants (who may touch a node when):
//  1. A node is in at most one queue. While queued it is reachable only
//     through the queue and only with the queue's mutex held.
//  2. Exactly one party removes a node: the primitive granting it (status
//     ok), or cancel() (status cancelled or timeout, from a cancel_token
//     callback, a deadline, or an Asio cancellation slot). The remover sets
//     the status under the mutex, then after releasing the mutex calls
//     complete(), which is its last touch of the node. Three removals
//     complete nothing, as the node's owner (or its end) makes them:
//     withdraw() and erase(), by an owner that stopped waiting by other
//     means, and the queue's destructor, which abandons the async waiters
//     still queued.
//  3. The node's owner does not destroy it, nor stop listening for
//     cancellation, before it has observed that completion. A thread waiter
//     that times out calls cancel() itself and, whether that found the node
//     or not, then waits for the completion, which has come or is on its way.
//  4. Cancellation callbacks (cancel_token registrations, timers) are removed
//     by the owner after the completion; their removal waits for a callback
//     running on another thread, which may still be inside cancel() holding
//     the node's address.
//
// Why no wake-up is lost: a waiter is pushed, and the primitive's "has
// waiters" mark set, under the mutex, after the waiter re-checked the
// condition under that mutex; a waker that changes the condition either sees
// the mark (and takes the mutex, so it finds the node) or its change happened
// before the mark was set (so the waiter's re-check saw it and did not wait).
// A completion is a flag on the node, not a signal, so one that lands before
// the waiter parks is seen when it does.
//
// Thread safety: all members need the mutex (lock()) except cancel(),
// withdraw() and the waits, which take it themselves, and size(), a
// snapshot.
#pragma once

#include <weft/config.hpp>
#include <weft/detail/cancel_state.hpp>
#include <weft/detail/parker.hpp>
#include <weft/detail/task_tracking.hpp>
#include <weft/detail/timed_wait.hpp>
#include <weft/wait_status.hpp>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <mutex>
#include <optional>

namespace weft::detail {

struct wait_node {
  wait_node* prev = nullptr;
  wait_node* next = nullptr;
  bool queued = false;
  wait_status status = wait_status::ok;
  // What the waiter asks for; its meaning belongs to the primitive (a
  // semaphore's weight, a wait_group's epoch).
  std::ptrdiff_t request = 0;
  // What the waiter carries, also the primitive's to define (a channel's
  // value slot).
  void* context = nullptr;
  // Called once by the remover, without the queue's mutex (invariant 2).
  void (*complete)(wait_node&) noexcept = nullptr;
  // For async waiters only: destroys the waiter without completing it, when
  // its queue is destroyed first (as an Asio service does at shutdown).
  void (*abandon)(wait_node&) noexcept = nullptr;
};

// Nodes removed under the mutex, completed after it is released.
class completion_list {
 public:
  completion_list() = default;
  completion_list(const completion_list&) = delete;
  completion_list& operator=(const completion_list&) = delete;
  ~completion_list() { complete_all(); }

  void push(wait_node& node) noexcept {
    node.next = nullptr;
    (tail_ != nullptr ? tail_->next : head_) = &node;
    tail_ = &node;
  }

  void complete_all() noexcept {
    while (head_ != nullptr) {
      wait_node* node = head_;
      head_ = node->next;  // read before complete(): the node may be gone after it
      node->complete(*node);
    }
    tail_ = nullptr;
  }

 private:
  wait_node* head_ = nullptr;
  wait_node* tail_ = nullptr;
};

struct thread_waiter : wait_node {
  thread_waiter() {
    complete = [](wait_node& node) noexcept { static_cast<thread_waiter&>(node).waiter.complete(); };
  }
  parker waiter;
};

class wait_queue {
 public:
  using lock_type = std::unique_lock<std::mutex>;
  // Called with the mutex held after cancel() removed a node, so the owner
  // can pass on what the removed waiter no longer takes (a semaphore hands
  // its free permits to the next waiter).
  using removal_hook = void (*)(void* owner, completion_list&) noexcept;

  // `kind` and `name` (interned, or null) say what a task parked here is
  // blocked on, for the task registry: `semaphore "db-conns"`.
  wait_queue(void* owner, removal_hook on_removed, const char* kind = nullptr, const char* name = nullptr) noexcept
      : owner_(owner), on_removed_(on_removed), kind_(kind), name_(name) {}
  wait_queue(const wait_queue&) = delete;
  wait_queue& operator=(const wait_queue&) = delete;

  ~wait_queue() {
    while (head_ != nullptr) {
      wait_node* node = head_;
      unlink(*node);
      WEFT_ASSERT(node->abandon != nullptr && "a weft primitive was destroyed while a thread waits on it");
      if (node->abandon != nullptr) node->abandon(*node);
    }
  }

  [[nodiscard]] lock_type lock() { return lock_type(mutex_); }

  bool empty() const noexcept { return head_ == nullptr; }
  // Readable without the mutex (for stats).
  std::size_t size() const noexcept { return size_.load(std::memory_order_relaxed); }
  wait_node* front() const noexcept { return head_; }

  void push_back(wait_node& node) noexcept {
    node.prev = tail_;
    node.next = nullptr;
    (tail_ != nullptr ? tail_->next : head_) = &node;
    tail_ = &node;
    node.queued = true;
    size_.store(size_.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
  }

  // Removes a queued node and schedules its completion with `status`.
  void remove(wait_node& node, wait_status status, completion_list& completions) noexcept {
    unlink(node);
    node.status = status;
    completions.push(node);
  }

  // Removes a queued node without completing it: for a node whose owner
  // stopped waiting by other means (a select that completed elsewhere) and
  // will withdraw it.
  void erase(wait_node& node) noexcept { unlink(node); }

  // Removes `node` if it is still queued and completes it with `status`.
  // Returns false when someone else removed it first.
  bool cancel(wait_node& node, wait_status status) noexcept {
    completion_list completions;
    {
      lock_type guard(mutex_);
      if (!node.queued) return false;
      remove(node, status, completions);
      if (on_removed_ != nullptr) on_removed_(owner_, completions);
    }
    return true;
  }

  // Removes `node` if it is still queued, without completing it (its owner
  // destroys it instead). Returns false when someone else removed it first.
  bool withdraw(wait_node& node) noexcept {
    completion_list completions;
    {
      lock_type guard(mutex_);
      if (!node.queued) return false;
      unlink(node);
      if (on_removed_ != nullptr) on_removed_(owner_, completions);
    }
    return true;
  }

  // The blocking wait shared by every primitive. Call it with `lock` held
  // and `waiter` just pushed; returns the status its remover gave it. Stops
  // waiting when `cancel` (may be null) is cancelled, giving `cancelled` (or
  // `timeout` when the token's own deadline did it), or when `deadline` (may
  // be null) passes, giving `timeout`. `kind`, when given, replaces the
  // queue's own in the registry (one queue may hold several kinds of wait).
  template <class Clock = std::chrono::steady_clock, class Duration = typename Clock::duration>
  wait_status wait(thread_waiter& waiter, lock_type& lock, cancel_state* cancel,
                   const std::chrono::time_point<Clock, Duration>* deadline = nullptr,
                   const char* kind = nullptr) noexcept {
    lock.unlock();
    const blocked_scope blocked{kind != nullptr ? kind : kind_, name_};
    cancel_link link;
    if (cancel != nullptr) {
      link.queue = this;
      link.node = &waiter;
      link.state = cancel;
      cancel->add_callback(link);
    }
    if (deadline != nullptr && !wait_completed_until(waiter.waiter, *deadline)) {
      this->cancel(waiter, wait_status::timeout);
    }
    waiter.waiter.wait_completed();  // invariant 3
    if (cancel != nullptr) cancel->remove_callback(link);  // invariant 4
    return waiter.status;
  }

 private:
  struct cancel_link : callback_node {
    cancel_link() {
      invoke = [](callback_node& self) noexcept {
        auto& link = static_cast<cancel_link&>(self);
        link.queue->cancel(*link.node, link.state->stop_status());
      };
    }
    wait_queue* queue = nullptr;
    wait_node* node = nullptr;
    cancel_state* state = nullptr;
  };

  void unlink(wait_node& node) noexcept {
    (node.prev != nullptr ? node.prev->next : head_) = node.next;
    (node.next != nullptr ? node.next->prev : tail_) = node.prev;
    node.prev = node.next = nullptr;
    node.queued = false;
    size_.store(size_.load(std::memory_order_relaxed) - 1, std::memory_order_relaxed);
  }

  std::mutex mutex_;
  wait_node* head_ = nullptr;
  wait_node* tail_ = nullptr;
  std::atomic<std::size_t> size_{0};  // written under the mutex only
  void* owner_;
  removal_hook on_removed_;
  const char* kind_;
  const char* name_;
};

// Whether a wait that has not queued yet (a spin before wait_queue::wait,
// a step that takes what is free and else queues) must stop: the status
// it returns when `cancel` is cancelled or `deadline` has passed (either
// may be null), as wait() would give, else nothing. Every blocking form
// asks this on each turn of its spin: a spin lasts up to WEFT_YIELD_LIMIT
// yields, and one that ignored the stop took what came after it.
template <class Clock = std::chrono::steady_clock, class Duration = typename Clock::duration>
auto give_up_check(cancel_state* cancel,
                   const std::chrono::time_point<Clock, Duration>* deadline = nullptr) noexcept {
  return [cancel, deadline]() -> std::optional<wait_status> {
    if (cancel != nullptr && cancel->cancelled()) return cancel->stop_status();
    if (deadline != nullptr && Clock::now() >= *deadline) return wait_status::timeout;
    return std::nullopt;
  };
}

}  // namespace weft::detail
