// SPDX-License-Identifier: BSL-1.0
// weft::channel<T>: a bounded multi-producer multi-consumer channel with
// close, Go's `chan T`.
//
//   weft::channel<job> jobs{256, "jobs"};
//   producer:  if (jobs.send(std::move(j)) == weft::wait_status::closed) ...
//              jobs.close();                         // no more jobs
//   consumer:  for (job& j : jobs) handle(j);        // until closed and drained
//
// Go analogue: `make(chan T, N)`, `close(ch)`, `for v := range ch`, and
// `make(chan T)` for capacity 0. C++ alternatives: a mutex + condition
// variable deque, tbb::concurrent_bounded_queue, moodycamel's queue bounded
// by a semaphore, boost::asio::experimental::concurrent_channel.
//
// Semantics:
//  - capacity >= 1: a bounded ring. send waits while it is full
//    (backpressure) and recv waits while it is empty. capacity 0: a
//    rendezvous: a send completes only when a receiver takes the value.
//  - Values are received in the order their sends completed (one FIFO for
//    every producer), each exactly once.
//  - Waiters are served in the order they queued: blocked senders are let
//    into the ring (capacity 0: taken by a receiver), and blocked receivers
//    given values, oldest first, and a send or receive that has not queued
//    never passes one that has.
//  - close() is idempotent. Values already in the channel are still
//    received; then every recv reports the end of the stream (an empty
//    optional, or wait_status::closed). Blocked and later sends fail with
//    wait_status::closed.
//  - A failed send never loses the value: the overloads that take an rvalue
//    move from it only on success, so the caller still holds it.
//  - The waiting forms come in the three forms of every weft wait: try_
//    (never waits for room or a value), blocking (as long as it takes, or
//    until a cancel_token, a duration or a time point), and async in
//    weft/asio.hpp (async_send, async_recv, with any completion token).
//    Threads and coroutines share one channel. weft::select (select.hpp)
//    waits on several operations.
//  - try_send reports full, and try_recv empty, only when that is so at
//    one moment of the call. They wait out a hand-off another thread is in
//    the middle of, as Go's try forms wait for a channel's lock: a value
//    being moved into or out of the slot they need (a move and the
//    moved-from value's destructor), and room or values being handed to
//    queued waiters. Without that wait, a try could miss room or a value
//    that a send or receive which had already returned left behind.
//  - A task blocked here is listed by the task registry as blocked on
//    `channel "name" send` or `channel "name" recv`.
//
// Errors: none on the normal path. Destroying a channel while a thread waits
// on it is undefined (checked by WEFT_ASSERT); values still buffered are
// destroyed with it.
//
// Thread safety: every member may be called concurrently. A waiter may
// destroy the channel as soon as its operation returns, even while the
// send, receive or close that let it through is still returning (Go's
// one-shot reply channel: the destructor waits the few instructions until
// that operation has stopped touching the channel).
//
// Memory ordering: a send happens-before the receive that takes its value.
//
// Cost (buffered): while the channel is neither full nor empty, a send is one
// compare-and-swap on the tail and a receive one on the head, with no lock
// and no allocation (the ring of slots, sequence-numbered, is allocated once).
// A waiter spins and yields briefly before it queues; a queued receiver is
// handed its value directly by the sender that finds it waiting, and a
// queued sender's value is moved into the ring by the receiver that makes
// room. Rendezvous channels take a mutex for every operation, as Go's do.
// stats() counts sends and receives from the ring's own positions, so
// counting costs nothing.
#pragma once

#include <weft/cancel.hpp>
#include <weft/config.hpp>
#include <weft/detail/backoff.hpp>
#include <weft/detail/bounded_ring.hpp>
#include <weft/detail/deadline.hpp>
#include <weft/detail/task_tracking.hpp>
#include <weft/detail/wait_queue.hpp>
#include <weft/wait_status.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <optional>
#include <string_view>
#include <thread>
#include <type_traits>
#include <utility>

namespace weft {

struct channel_stats {
  std::string_view name;  // as given to the constructor; empty if none
  std::size_t capacity = 0;
  std::size_t size = 0;  // values buffered now
  std::uint64_t sent = 0;
  std::uint64_t received = 0;
  std::size_t waiting_senders = 0;
  std::size_t waiting_receivers = 0;
  bool closed = false;
  // Time senders spent waiting for room (backpressure) and receivers spent
  // waiting for a value (starvation), summed over the send() and recv()
  // calls (with or without a token or deadline) that queued. A select's
  // wait and an async operation's are not counted.
  std::chrono::nanoseconds send_blocked{0};
  std::chrono::nanoseconds recv_blocked{0};
};

// A value, or why there is none: closed (the channel is closed and
// drained), cancelled or timeout. Like std::optional<T>, plus status().
template <class T>
class recv_result {
 public:
  recv_result(T value) : value_(std::move(value)) {}  // NOLINT(google-explicit-constructor)
  // For a channel of wait_status, whose values would read as the reason,
  // only failed() makes a result without a value.
  recv_result(wait_status status) noexcept  // NOLINT(google-explicit-constructor)
      requires(!std::is_same_v<T, wait_status>)
      : status_(status) {}

  // No value, because of `status`.
  static recv_result failed(wait_status status) noexcept { return recv_result(status, no_value{}); }

  bool has_value() const noexcept { return value_.has_value(); }
  explicit operator bool() const noexcept { return value_.has_value(); }
  T& operator*() & noexcept { return *value_; }
  const T& operator*() const& noexcept { return *value_; }
  T&& operator*() && noexcept { return std::move(*value_); }
  T* operator->() noexcept { return &*value_; }
  const T* operator->() const noexcept { return &*value_; }
  // ok when there is a value.
  wait_status status() const noexcept { return status_; }
  std::optional<T>& value() & noexcept { return value_; }
  std::optional<T>&& value() && noexcept { return std::move(value_); }

 private:
  struct no_value {};
  recv_result(wait_status status, no_value) noexcept : status_(status) {}

  std::optional<T> value_;
  wait_status status_ = wait_status::ok;
};

namespace detail {

// A select (select.hpp) waiting on several channel operations: the first
// channel to claim it completes it, and only that one.
struct select_state {
  static constexpr int unclaimed = -1;
  static constexpr int given_up = -2;  // its owner was cancelled or timed out

  std::atomic<int> winner{unclaimed};
  // Written by the winner before it completes the select: the value moved
  // (rendezvous), rather than "look again" (a buffered channel became ready).
  bool handed_over = false;
  parker waiter;

  bool claim(int index) noexcept {
    int expected = unclaimed;
    return winner.compare_exchange_strong(expected, index, std::memory_order_acq_rel, std::memory_order_acquire);
  }
};

// What a channel waiter carries (wait_node::context points to one).
template <class T>
struct channel_slot {
  T* outgoing = nullptr;                  // a sender's value, moved from when taken
  std::optional<T>* incoming = nullptr;   // where a receiver's value goes
  select_state* select = nullptr;         // set for a select's case
  int select_case = 0;
};

template <class T>
channel_slot<T>& slot_of(wait_node& node) noexcept {
  return *static_cast<channel_slot<T>*>(node.context);
}

// A select's node in one channel's queue; completing it completes the select.
struct select_node : wait_node {
  select_node() {
    complete = [](wait_node& node) noexcept { static_cast<select_node&>(node).state->waiter.complete(); };
  }
  select_state* state = nullptr;
};

template <class T, class Clock>
struct channel_access;
template <class T, class Clock, class F>
class recv_case;
template <class T, class Clock, class F>
class send_case;

}  // namespace detail

template <class T, class Clock = std::chrono::steady_clock>
class basic_channel {
  static_assert(std::is_nothrow_move_constructible_v<T> && std::is_nothrow_move_assignable_v<T>,
                "weft::channel<T>: T must be nothrow move-constructible and move-assignable (values move "
                "through the channel inside operations that cannot fail halfway)");
  static_assert(std::is_default_constructible_v<T>,
                "weft::channel<T>: T must be default-constructible (wrap it in std::optional otherwise)");

 public:
  using value_type = T;
  using clock = Clock;

  // capacity 0 makes a rendezvous channel. `name` shows in stats() and in
  // the task registry.
  explicit basic_channel(std::size_t capacity, std::string_view name = {})
      : capacity_(capacity),
        name_(detail::intern(name)),
        ring_(capacity == 0 ? 1 : capacity),
        receivers_(this, &on_receiver_removed, nullptr, name_),
        senders_(this, &on_sender_removed, nullptr, name_) {}

  basic_channel(const basic_channel&) = delete;
  basic_channel& operator=(const basic_channel&) = delete;

  // Waits for the operations that let a waiter through to stop touching the
  // channel (see begin_waking): for a few instructions, or a lock and a
  // queue walk.
  ~basic_channel() {
    detail::spin_until([this] { return wakers_.load(std::memory_order_acquire) == 0; });
  }

  std::size_t capacity() const noexcept { return capacity_; }
  std::string_view name() const noexcept { return name_ != nullptr ? std::string_view{name_} : std::string_view{}; }
  bool closed() const noexcept { return ring_.closed(); }
  // Values buffered now, at most capacity() (0 for a rendezvous channel);
  // may be stale at once.
  std::size_t size() const noexcept { return rendezvous() ? 0 : ring_.size(); }

  // ---- send ----

  // Sends if there is room now (for a rendezvous channel: if a receiver
  // waits); never waits for room, but may wait out a hand-off in progress
  // (see the top of this file). On false (full or closed) `value` is
  // untouched.
  [[nodiscard]] bool try_send(T&& value) { return try_send_value(value); }
  [[nodiscard]] bool try_send(const T& value) {
    T copy(value);
    return try_send_value(copy);
  }

  // Waits for room as long as it takes: ok, or closed (value untouched).
  wait_status send(T&& value) { return send_value<Clock, typename Clock::duration>(value, nullptr, nullptr); }
  wait_status send(const T& value) {
    T copy(value);
    return send(std::move(copy));
  }

  // Waits for room until the token is cancelled: ok, closed, cancelled (or
  // timeout when the token's own deadline cancelled it).
  wait_status send(T&& value, const cancel_token& token) {
    return send_value<Clock, typename Clock::duration>(value, detail::state_of(token), nullptr);
  }

  template <class Rep, class Period>
  wait_status send_for(T&& value, std::chrono::duration<Rep, Period> timeout) {
    return send_until(std::move(value), detail::deadline_after<Clock>(timeout));
  }

  template <class Duration>
  wait_status send_until(T&& value, const std::chrono::time_point<Clock, Duration>& deadline) {
    const auto due = detail::clock_deadline(deadline);
    return send_value(value, nullptr, &due);
  }

  // ---- receive ----

  // A value if one is ready now (for a rendezvous channel: if a sender
  // waits); never waits for one, but may wait out a hand-off in progress
  // (see the top of this file). Empty when there is none, or closed and
  // drained.
  std::optional<T> try_recv() {
    std::optional<T> out;
    if (rendezvous()) {
      detail::completion_list done;
      auto lock = receivers_.lock();
      take_from_sender(out, done);
      return out;
    }
    T value;
    if (!pop_if_ready(value)) return out;
    out.emplace(std::move(value));
    return out;
  }

  // Waits as long as it takes; empty once the channel is closed and drained.
  std::optional<T> recv() {
    return std::move(recv_value<Clock, typename Clock::duration>(nullptr, nullptr)).value();
  }

  recv_result<T> recv(const cancel_token& token) {
    return recv_value<Clock, typename Clock::duration>(detail::state_of(token), nullptr);
  }

  template <class Rep, class Period>
  recv_result<T> recv_for(std::chrono::duration<Rep, Period> timeout) {
    return recv_until(detail::deadline_after<Clock>(timeout));
  }

  template <class Duration>
  recv_result<T> recv_until(const std::chrono::time_point<Clock, Duration>& deadline) {
    const auto due = detail::clock_deadline(deadline);
    return recv_value(nullptr, &due);
  }

  // ---- close ----

  // Refuses every later send and wakes every waiter: senders fail with
  // closed, receivers take what is left and then see the end. Returns false
  // if the channel was already closed.
  bool close() noexcept {
    detail::completion_list woken;  // completed last: a woken waiter may destroy the channel
    begin_waking();                 // a waiter that sees the close may return and destroy it
    if (!ring_.close()) {
      end_waking();
      return false;
    }
    {
      auto lock = receivers_.lock();
      while (detail::wait_node* node = receivers_.front()) {
        auto& slot = detail::slot_of<T>(*node);
        if (rendezvous() || slot.select != nullptr || slot.outgoing != nullptr) {
          close_waiter(receivers_, *node, woken);
          continue;
        }
        // Values pushed before the close go to the receivers that wait.
        T value;
        if (ring_.try_pop(value)) {
          slot.incoming->emplace(std::move(value));
          receivers_.remove(*node, wait_status::ok, woken);
        } else if (ring_.claimed_unpopped()) {
          detail::cpu_relax();  // a send claimed its slot before the close and is about to publish it
        } else {
          close_waiter(receivers_, *node, woken);
        }
      }
      receivers_waiting_.store(false, std::memory_order_relaxed);
    }
    {
      auto lock = senders_.lock();
      while (detail::wait_node* node = senders_.front()) close_waiter(senders_, *node, woken);
      senders_waiting_.store(false, std::memory_order_relaxed);
    }
    end_waking();
    return true;
  }

  // ---- iteration: for (T& v : ch) receives until closed and drained ----

  class iterator {
   public:
    using iterator_category = std::input_iterator_tag;
    using value_type = T;
    using difference_type = std::ptrdiff_t;
    using pointer = T*;
    using reference = T&;

    iterator() noexcept = default;
    T& operator*() const noexcept { return *current_; }
    T* operator->() const noexcept { return &*current_; }
    iterator& operator++() {
      current_ = channel_->recv();
      return *this;
    }
    void operator++(int) { ++*this; }
    friend bool operator==(const iterator& it, std::default_sentinel_t) noexcept { return !it.current_; }

   private:
    friend class basic_channel;
    explicit iterator(basic_channel& channel) : channel_(&channel), current_(channel.recv()) {}
    basic_channel* channel_ = nullptr;
    mutable std::optional<T> current_;
  };

  iterator begin() { return iterator{*this}; }
  std::default_sentinel_t end() const noexcept { return {}; }

  // A snapshot; takes each queue's mutex briefly.
  channel_stats stats() const {
    channel_stats s;
    s.name = name();
    s.capacity = capacity_;
    s.closed = closed();
    if (rendezvous()) {
      auto lock = receivers_.lock();
      s.sent = s.received = handed_over_.load(std::memory_order_relaxed);
      for (auto* node = receivers_.front(); node != nullptr; node = node->next) {
        ++(detail::slot_of<T>(*node).outgoing != nullptr ? s.waiting_senders : s.waiting_receivers);
      }
    } else {
      s.received = ring_.popped();
      s.sent = ring_.pushed();
      s.size = ring_.size();  // of one moment, unlike sent - received (see bounded_ring::size)
      s.waiting_receivers = receivers_.size();
      s.waiting_senders = senders_.size();
    }
    s.send_blocked = std::chrono::nanoseconds{send_blocked_ns_.load(std::memory_order_relaxed)};
    s.recv_blocked = std::chrono::nanoseconds{recv_blocked_ns_.load(std::memory_order_relaxed)};
    return s;
  }

 private:
  template <class, class>
  friend struct detail::channel_access;
  template <class, class, class>
  friend class detail::recv_case;
  template <class, class, class>
  friend class detail::send_case;

  static constexpr const char* send_kind = "channel send";
  static constexpr const char* recv_kind = "channel recv";

  struct channel_waiter : detail::thread_waiter {
    detail::channel_slot<T> slot;
    channel_waiter() { context = &slot; }
  };

  bool rendezvous() const noexcept { return capacity_ == 0; }

  // ---- buffered: the ring, and the hand-over to queued waiters ----

  // A waiter may destroy the channel as soon as its operation returns, and
  // the operation that let it through (a push, a pop, a close) may still be
  // returning. So such an operation decides, before the step that lets a
  // waiter through (publishing a value, freeing a slot, closing), whether it
  // will touch the channel after that step; if it will, it counts itself in
  // wakers_ first and out when it is done, and the destructor waits for
  // wakers_ to come back to zero. The waiters it completes are completed
  // after that, as they touch only their own nodes. A fast push or pop that
  // finds nobody to wake touches nothing after its step, and pays nothing.
  void begin_waking() noexcept { wakers_.fetch_add(1, std::memory_order_relaxed); }
  void end_waking() noexcept { wakers_.fetch_sub(1, std::memory_order_release); }

  // For a ring push or pop that will touch the channel afterwards: begins
  // waking once the slot is claimed (a failed attempt owes nothing).
  auto waking_hook() noexcept {
    return [this](auto&, std::uint64_t) noexcept { begin_waking(); };
  }

  // waking_hook() only if someone waits on the other side (`others_waiting`,
  // read once the slot is claimed); `waking` says whether it began.
  auto waking_hook_if(const std::atomic<bool>& others_waiting, bool& waking) noexcept {
    return [this, &others_waiting, &waking](auto&, std::uint64_t) noexcept {
      waking = others_waiting.load(std::memory_order_seq_cst);
      if (waking) begin_waking();
    };
  }

  // Pushes and then feeds the receivers that wait, if any. Skips the ring
  // while senders wait, so a queued sender is not overtaken. Queued
  // receivers registered their mark (seq_cst) before they looked at the
  // ring's claim counters, and the push claims its slot with a seq_cst
  // compare-and-swap before it reads the mark, so either the receiver saw
  // the claim (and did not queue) or the push sees its mark.
  bool fast_push(T& value) noexcept {
    if (senders_waiting_.load(std::memory_order_relaxed)) return false;
    bool waking = false;
    const bool pushed = ring_.try_push(value, waking_hook_if(receivers_waiting_, waking));
    if (waking) finish_push();
    return pushed;
  }

  // Pops and then admits the senders that wait, if any (as fast_push).
  bool fast_pop(T& value) noexcept {
    if (receivers_waiting_.load(std::memory_order_relaxed)) return false;
    bool waking = false;
    const bool popped = ring_.try_pop(value, waking_hook_if(senders_waiting_, waking));
    if (waking) finish_pop();
    return popped;
  }

  // try_send's push: fast_push that fails only when the ring is full or
  // closed. Where fast_push fails on a hand-off in progress, it waits that
  // out: room while senders are queued is theirs, and is being given to
  // them (a pop that made it saw their mark, see fast_push), and a slot
  // that a receiver claimed is being emptied.
  bool push_if_room(T& value) noexcept {
    for (detail::backoff pause; senders_waiting_.load(std::memory_order_seq_cst);) {
      if (ring_.closed() || ring_.full()) return false;
      if (!pause.wait()) std::this_thread::yield();
    }
    bool waking = false;
    const bool pushed = ring_.push_unless_full(value, waking_hook_if(receivers_waiting_, waking));
    if (waking) finish_push();
    return pushed;
  }

  // try_recv's pop, as push_if_room: values while receivers are queued are
  // being fed to them, and a value whose sender claimed its slot is being
  // moved in.
  bool pop_if_ready(T& value) noexcept {
    for (detail::backoff pause; receivers_waiting_.load(std::memory_order_seq_cst);) {
      if (!ring_.claimed_unpopped()) return false;
      if (!pause.wait()) std::this_thread::yield();
    }
    bool waking = false;
    const bool popped = ring_.pop_unless_empty(value, waking_hook_if(senders_waiting_, waking));
    if (waking) finish_pop();
    return popped;
  }

  // What a push owes, by a thread that began waking before the push
  // published its value: the receivers that wait are fed, then the senders
  // that wait admitted into the room that made, and so on.
  void finish_push() noexcept {
    detail::completion_list woken;
    while (receivers_waiting_.load(std::memory_order_seq_cst) && feed_receivers(woken) &&
           senders_waiting_.load(std::memory_order_seq_cst) && admit_senders(woken)) {
    }
    end_waking();
  }
  void finish_pop() noexcept {
    detail::completion_list woken;
    while (senders_waiting_.load(std::memory_order_seq_cst) && admit_senders(woken) &&
           receivers_waiting_.load(std::memory_order_seq_cst) && feed_receivers(woken)) {
    }
    end_waking();
  }

  // Hands ring values to queued receivers, oldest first; wakes queued
  // selects to look again. Returns true if it popped anything.
  bool feed_receivers(detail::completion_list& fed) noexcept {
    bool popped = false;
    auto lock = receivers_.lock();
    for (detail::wait_node* node = receivers_.front(); node != nullptr;) {
      detail::wait_node* next = node->next;
      auto& slot = detail::slot_of<T>(*node);
      if (slot.select != nullptr) {
        wake_select(receivers_, *node, fed);
      } else {
        T value;
        if (!ring_.try_pop(value)) break;
        popped = true;
        slot.incoming->emplace(std::move(value));
        receivers_.remove(*node, wait_status::ok, fed);
      }
      node = next;
    }
    receivers_waiting_.store(!receivers_.empty(), std::memory_order_relaxed);
    return popped;
  }

  // Moves queued senders' values into the ring, oldest first; wakes queued
  // selects to look again. Returns true if it pushed anything.
  bool admit_senders(detail::completion_list& admitted) noexcept {
    bool pushed = false;
    auto lock = senders_.lock();
    for (detail::wait_node* node = senders_.front(); node != nullptr;) {
      detail::wait_node* next = node->next;
      auto& slot = detail::slot_of<T>(*node);
      if (slot.select != nullptr) {
        wake_select(senders_, *node, admitted);
      } else {
        if (!ring_.try_push(*slot.outgoing)) break;
        pushed = true;
        senders_.remove(*node, wait_status::ok, admitted);
      }
      node = next;
    }
    senders_waiting_.store(!senders_.empty(), std::memory_order_relaxed);
    return pushed;
  }

  // A select waiting here may go now: it looks again at every case.
  static void wake_select(detail::wait_queue& queue, detail::wait_node& node, detail::completion_list& woken) noexcept {
    auto& slot = detail::slot_of<T>(node);
    if (slot.select->claim(slot.select_case)) {
      slot.select->handed_over = false;
      queue.remove(node, wait_status::ok, woken);
    } else {
      queue.erase(node);  // it completed elsewhere; its owner withdraws it
    }
  }

  void close_waiter(detail::wait_queue& queue, detail::wait_node& node, detail::completion_list& woken) noexcept {
    if (detail::slot_of<T>(node).select != nullptr) {
      wake_select(queue, node, woken);
    } else {
      queue.remove(node, wait_status::closed, woken);
    }
  }

  // ---- rendezvous: one queue (receivers_) holds whichever side waits ----

  // With receivers_ locked: the oldest waiter that sends (or receives), or
  // null. Plain waiters of one kind never queue behind plain waiters of the
  // other (they would have met), so a plain waiter of the wrong kind ends the
  // search; a select may wait on both sides of one channel, so its nodes of
  // the wrong kind are passed over. A select that completed elsewhere is
  // dropped; one that is found is claimed.
  detail::wait_node* claim_waiter(bool sender) noexcept {
    for (detail::wait_node* node = receivers_.front(); node != nullptr;) {
      detail::wait_node* next = node->next;
      auto& slot = detail::slot_of<T>(*node);
      if ((slot.outgoing != nullptr) != sender) {
        if (slot.select == nullptr) return nullptr;
      } else if (slot.select == nullptr) {
        return node;
      } else if (slot.select->claim(slot.select_case)) {
        slot.select->handed_over = true;
        return node;
      } else {
        receivers_.erase(*node);
      }
      node = next;
    }
    return nullptr;
  }

  // With receivers_ locked: gives `value` to a waiting receiver.
  bool give_to_receiver(T& value, detail::completion_list& done) noexcept {
    detail::wait_node* node = claim_waiter(false);
    if (node == nullptr) return false;
    detail::slot_of<T>(*node).incoming->emplace(std::move(value));
    receivers_.remove(*node, wait_status::ok, done);
    handed_over_.store(handed_over_.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
    return true;
  }

  // With receivers_ locked: takes the value of a waiting sender. Not once
  // the channel is closed: close() marks it closed before it takes the lock
  // to fail the senders still waiting, and a sender it is about to fail has
  // not sent (a receive that saw closed() must not get its value).
  bool take_from_sender(std::optional<T>& out, detail::completion_list& done) noexcept {
    if (ring_.closed()) return false;
    detail::wait_node* node = claim_waiter(true);
    if (node == nullptr) return false;
    out.emplace(std::move(*detail::slot_of<T>(*node).outgoing));
    receivers_.remove(*node, wait_status::ok, done);
    handed_over_.store(handed_over_.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
    return true;
  }

  // ---- the operations ----

  bool try_send_value(T& value) {
    if (rendezvous()) {
      detail::completion_list done;
      auto lock = receivers_.lock();
      return !ring_.closed() && give_to_receiver(value, done);
    }
    return push_if_room(value);
  }

  template <class WaitClock, class Duration>
  wait_status send_value(T& value, detail::cancel_state* cancel,
                         const std::chrono::time_point<WaitClock, Duration>* deadline) {
    if (cancel != nullptr && cancel->cancelled()) return cancel->stop_status();
    if (rendezvous()) return send_queued(value, cancel, deadline);
    if (fast_push(value)) return wait_status::ok;
    const auto give_up = detail::give_up_check(cancel, deadline);
    for (detail::backoff pause; pause.wait();) {
      if (ring_.closed()) return wait_status::closed;  // before giving up, as the queued step does
      if (const auto status = give_up()) return *status;
      if (fast_push(value)) return wait_status::ok;
    }
    return send_queued(value, cancel, deadline);
  }

  // The slow paths shared by the blocking and the async forms. Each is
  // called with `queue_of_*` locked (lock), and either finishes the
  // operation, returning its status (having unlocked first when the other
  // side may need a wake-up), or queues `waiter`, whose slot already points
  // at the value, and returns nothing with the lock still held.
  //
  // Neither may queue while the other side has claimed a slot and not yet
  // done with it (that side read the "waiting" mark before this set it, and
  // will wake nobody), so each spins until it is; give_up() (a status, or
  // nothing) lets a blocking wait end there at its deadline or token.
  struct never_give_up {
    std::optional<wait_status> operator()() const noexcept { return std::nullopt; }
  };

  template <class GiveUp = never_give_up>
  std::optional<wait_status> send_or_enqueue(T& value, detail::wait_node& waiter,
                                             detail::wait_queue::lock_type& lock,
                                             GiveUp give_up = {}) {
    if (rendezvous()) {
      detail::completion_list done;  // completed on return, after the caller's lock is released
      if (ring_.closed()) return wait_status::closed;
      if (give_to_receiver(value, done)) {
        lock.unlock();
        return wait_status::ok;
      }
      receivers_.push_back(waiter);
      return std::nullopt;
    }
    for (;;) {
      senders_waiting_.store(true, std::memory_order_seq_cst);
      if (ring_.closed()) {
        senders_waiting_.store(!senders_.empty(), std::memory_order_relaxed);
        return wait_status::closed;
      }
      if (ring_.try_push(value, waking_hook())) {
        senders_waiting_.store(!senders_.empty(), std::memory_order_relaxed);
        lock.unlock();
        finish_push();
        return wait_status::ok;
      }
      if (ring_.full()) break;
      // A receiver claimed a slot and is about to free it.
      if (const auto status = give_up()) {
        senders_waiting_.store(!senders_.empty(), std::memory_order_relaxed);
        return status;
      }
      detail::cpu_relax();
    }
    senders_.push_back(waiter);
    return std::nullopt;
  }

  template <class GiveUp = never_give_up>
  std::optional<wait_status> recv_or_enqueue(std::optional<T>& out, detail::wait_node& waiter,
                                             detail::wait_queue::lock_type& lock,
                                             GiveUp give_up = {}) {
    if (rendezvous()) {
      detail::completion_list done;
      if (take_from_sender(out, done)) {
        lock.unlock();
        return wait_status::ok;
      }
      if (ring_.closed()) return wait_status::closed;
      receivers_.push_back(waiter);
      return std::nullopt;
    }
    for (;;) {
      receivers_waiting_.store(true, std::memory_order_seq_cst);
      T value;
      if (ring_.try_pop(value, waking_hook())) {
        receivers_waiting_.store(!receivers_.empty(), std::memory_order_relaxed);
        lock.unlock();
        finish_pop();
        out.emplace(std::move(value));
        return wait_status::ok;
      }
      // Closed first: after the close no claim can come, so no claim in
      // flight then means drained for good.
      const bool closed = ring_.closed();
      if (!ring_.claimed_unpopped()) {
        if (!closed) break;
        receivers_waiting_.store(!receivers_.empty(), std::memory_order_relaxed);
        return wait_status::closed;
      }
      // A sender claimed a slot and is about to publish it.
      if (const auto status = give_up()) {
        receivers_waiting_.store(!receivers_.empty(), std::memory_order_relaxed);
        return status;
      }
      detail::cpu_relax();
    }
    receivers_.push_back(waiter);
    return std::nullopt;
  }

  // The queue a sender waits in.
  detail::wait_queue& send_queue() noexcept { return rendezvous() ? receivers_ : senders_; }

  template <class WaitClock, class Duration>
  WEFT_NOINLINE wait_status send_queued(T& value, detail::cancel_state* cancel,
                                        const std::chrono::time_point<WaitClock, Duration>* deadline) {
    channel_waiter waiter;
    waiter.slot.outgoing = &value;
    auto& queue = send_queue();
    auto lock = queue.lock();
    if (const auto finished =
            send_or_enqueue(value, waiter, lock, detail::give_up_check(cancel, deadline))) {
      return *finished;
    }
    const auto queued_at = Clock::now();
    const auto status = queue.wait(waiter, lock, cancel, deadline, send_kind);
    add_blocked(send_blocked_ns_, Clock::now() - queued_at);
    return status;
  }

  // A result that holds `value`, moved once: made empty (failed(ok) holds
  // no value) and the value emplaced. recv_result's constructor takes its T
  // by value, which moves it twice. Built with that constructor, recv_value
  // also made GCC 12 at -O3 report a dangling pointer to its local T (a
  // false positive, seen with the stress tests' tracked_item, whose move
  // constructor writes to its source).
  static recv_result<T> received(T& value) {
    auto result = recv_result<T>::failed(wait_status::ok);
    result.value().emplace(std::move(value));
    return result;
  }

  template <class WaitClock, class Duration>
  recv_result<T> recv_value(detail::cancel_state* cancel, const std::chrono::time_point<WaitClock, Duration>* deadline) {
    if (cancel != nullptr && cancel->cancelled()) {
      return recv_result<T>::failed(cancel->stop_status());
    }
    if (!rendezvous()) {
      T value;
      if (fast_pop(value)) return received(value);
      const auto give_up = detail::give_up_check(cancel, deadline);
      for (detail::backoff pause; pause.wait();) {
        // What a closed channel still holds comes before giving up, as in
        // the queued step. Values there now are taken by that step; a
        // sender that claimed a slot before the close is waited for here,
        // where the wait yields, not there, under the receivers' lock.
        if (ring_.closed()) {
          if (!ring_.claimed_unpopped()) break;
          if (fast_pop(value)) return received(value);
          continue;
        }
        if (const auto status = give_up()) return recv_result<T>::failed(*status);
        if (fast_pop(value)) return received(value);
      }
    }
    return recv_queued(cancel, deadline);
  }

  template <class WaitClock, class Duration>
  WEFT_NOINLINE recv_result<T> recv_queued(detail::cancel_state* cancel,
                                           const std::chrono::time_point<WaitClock, Duration>* deadline) {
    channel_waiter waiter;
    std::optional<T> incoming;
    waiter.slot.incoming = &incoming;
    wait_status status = wait_status::ok;
    {
      auto lock = receivers_.lock();
      if (const auto finished =
              recv_or_enqueue(incoming, waiter, lock, detail::give_up_check(cancel, deadline))) {
        status = *finished;
      } else {
        const auto queued_at = Clock::now();
        status = receivers_.wait(waiter, lock, cancel, deadline, recv_kind);
        add_blocked(recv_blocked_ns_, Clock::now() - queued_at);
      }
    }
    if (status == wait_status::ok) return received(*incoming);
    return recv_result<T>::failed(status);
  }

  template <class Duration>
  static void add_blocked(std::atomic<std::int64_t>& total, Duration waited) noexcept {
    total.fetch_add(detail::waited_ns(waited), std::memory_order_relaxed);
  }

  // A waiter that left by cancellation or deadline: the marks follow the
  // queues (the fast paths stop deferring once nobody waits).
  static void on_receiver_removed(void* self, detail::completion_list&) noexcept {
    auto& channel = *static_cast<basic_channel*>(self);
    channel.receivers_waiting_.store(!channel.receivers_.empty(), std::memory_order_relaxed);
  }
  static void on_sender_removed(void* self, detail::completion_list&) noexcept {
    auto& channel = *static_cast<basic_channel*>(self);
    channel.senders_waiting_.store(!channel.senders_.empty(), std::memory_order_relaxed);
  }

  const std::size_t capacity_;
  const char* const name_;  // interned, for the registry; null if unnamed
  // Buffered: the values. Rendezvous: holds nothing, but its closed mark is
  // the channel's.
  detail::bounded_ring<T> ring_;
  // Set and cleared under the matching queue's mutex: someone waits there.
  alignas(64) std::atomic<bool> receivers_waiting_{false};
  alignas(64) std::atomic<bool> senders_waiting_{false};
  alignas(64) mutable detail::wait_queue receivers_;
  mutable detail::wait_queue senders_;
  std::atomic<std::uint64_t> handed_over_{0};  // rendezvous sends, under receivers_'s mutex
  std::atomic<std::int64_t> send_blocked_ns_{0};
  std::atomic<std::int64_t> recv_blocked_ns_{0};
  // Operations that let a waiter through and still touch the channel (see
  // begin_waking).
  std::atomic<std::uint32_t> wakers_{0};
};

template <class T>
using channel = basic_channel<T>;

}  // namespace weft
