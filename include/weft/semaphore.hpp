// SPDX-License-Identifier: BSL-1.0
// weft::semaphore: a weighted, FIFO-fair counting semaphore.
//
// Go analogues: golang.org/x/sync/semaphore.Weighted, and the buffered
// channel used as a semaphore (`sem := make(chan struct{}, N)`). The standard
// analogue is std::counting_semaphore, which has no weights, no fairness, no
// cancellation, and (in libstdc++ 12) a system call on every release.
//
// Guarantees:
//  - Weighted: acquire(n) takes n permits at once, or none.
//  - FIFO and fair across weights: waiters are served strictly in arrival
//    order. A waiter for many permits at the head is not overtaken by later,
//    smaller requests, so it cannot starve; the price is head-of-line
//    blocking: while it waits, smaller requests behind it wait too, even if
//    enough permits for them are free (as in x/sync). try_acquire never jumps
//    ahead of queued waiters.
//  - A waiter that gives up (token cancelled, deadline passed, Asio
//    cancellation) leaves the queue; if it was at the head, the permits it
//    was waiting for pass on to the waiters behind it.
//  - A permit is never lost or doubled when a cancellation races a release
//    that would satisfy the same waiter: exactly one of them removes the
//    waiter, and the waiter reports what happened (ok: it holds the permits).
//  - A token already cancelled acquires nothing, even if permits are free.
//  - Threads and Asio coroutines (weft/asio.hpp: async_acquire) share one
//    queue and one FIFO order.
//
// Errors (std::invalid_argument / std::logic_error, thrown at once): a
// capacity below 1; a negative n; n greater than the capacity (it could
// never be granted); releasing more permits than are held (checked against
// one consistent view of the free permits: an over-release that races
// another thread's release of one permit, or a weighted acquire moving a
// permit between them, can go unseen, as the free count lives in two
// words).
//
// Thread safety: every member may be called concurrently. Destroying the
// semaphore while a thread waits on it is undefined (checked by WEFT_ASSERT);
// pending async waits are destroyed without being completed, as Asio does at
// shutdown. So is destroying it while an async waiter it granted permits
// has not had its handler run yet (its completion still records the wait
// here, and its permit will release them here). A waiter may destroy
// it as soon as its acquire returns, even while the release that let it
// through is still returning: a release no longer touches the semaphore
// once a waiter it let through can return (stress_lifetime.cpp checks
// this).
//
// Memory ordering: a release() happens-before the acquire() it satisfies.
//
// Cost: when nobody waits, acquire and release never take a lock or make a
// system call. A thread that acquires and releases one permit at a time pays
// one compare-and-swap per pair: its acquire takes the permit parked in the
// release slot, and its release puts it back with a plain store (see "The
// release slot" below; a thread's first acquire there takes a process-wide
// mutex once, for the thread's record). Other acquires and releases are each
// one compare-and-swap on the state word, which also counts acquisitions
// for stats(). A waiter spins and yields briefly
// (WEFT_SPIN_LIMIT, WEFT_YIELD_LIMIT) before it queues; queueing and waking
// take the queue's mutex, and a parked thread costs one futex wake. Waiting
// allocates nothing (thread waiters live on the waiting thread's stack),
// except that a timed wait on a clock with timers of its own (manual_clock)
// adds one to the clock's heap.
//
// A queued waiter is served strictly in order, so permits released to a
// parked waiter sit unused until it is scheduled. Acquirers therefore spin
// and yield before they queue, and keep doing so while others are queued,
// so a busy semaphore seldom queues anyone and its queue drains instead of
// turning into a convoy; what does queue costs a futex wake per waiter.
//
// Example:
//   weft::semaphore db_slots{10};
//   void handle(const weft::cancel_token& request) {
//     auto slot = db_slots.acquire_permit(1, request);
//     if (!slot) return reply_busy();   // cancelled or timed out
//     query();                          // at most 10 at once
//   }                                   // the permit goes back here
#pragma once

#include <weft/cancel.hpp>
#include <weft/config.hpp>
#include <weft/detail/asymmetric_barrier.hpp>
#include <weft/detail/backoff.hpp>
#include <weft/detail/deadline.hpp>
#include <weft/detail/task_tracking.hpp>
#include <weft/detail/thread_record.hpp>
#include <weft/detail/wait_queue.hpp>
#include <weft/wait_status.hpp>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <utility>

namespace weft {

struct semaphore_stats {
  std::string_view name;  // as given to the constructor; empty if none
  std::ptrdiff_t capacity = 0;
  std::ptrdiff_t available = 0;
  std::size_t waiters = 0;
  std::uint64_t acquisitions = 0;   // successful acquires, of any weight
  std::uint64_t timeouts = 0;       // waits that ended by a deadline
  std::uint64_t cancellations = 0;  // waits that ended by cancellation
  std::chrono::nanoseconds total_wait{0};  // time spent queued, summed over waits
  std::chrono::nanoseconds max_wait{0};
};

namespace detail {
struct semaphore_access;

// What a task waiting on a semaphore is listed as blocked on.
struct blocked_kind {
  const char* kind;  // a string literal
};
}  // namespace detail

template <class Clock = std::chrono::steady_clock>
class basic_semaphore {
 public:
  using clock = Clock;

  // Permits held until destroyed, moved from, or released. Empty (false)
  // when the acquire that made it did not succeed.
  class [[nodiscard]] permit {
   public:
    permit() noexcept = default;
    permit(permit&& other) noexcept
        : semaphore_(std::exchange(other.semaphore_, nullptr)), count_(std::exchange(other.count_, 0)) {}
    permit& operator=(permit&& other) noexcept {
      if (this != &other) {
        release();
        semaphore_ = std::exchange(other.semaphore_, nullptr);
        count_ = std::exchange(other.count_, 0);
      }
      return *this;
    }
    permit(const permit&) = delete;
    permit& operator=(const permit&) = delete;
    ~permit() { release(); }

    explicit operator bool() const noexcept { return semaphore_ != nullptr; }
    std::ptrdiff_t count() const noexcept { return count_; }

    // Returns the permits now, rather than at destruction. Noexcept, as the
    // destructor is: should they have been released by hand as well (an
    // over-release, which release(n) reports with std::logic_error), the
    // program ends in std::terminate.
    void release() noexcept {
      if (semaphore_ != nullptr) std::exchange(semaphore_, nullptr)->release(count_);
      count_ = 0;
    }

    // Stops owning the permits without returning them; returns how many the
    // caller must now release() by hand.
    std::ptrdiff_t detach() noexcept {
      semaphore_ = nullptr;
      return std::exchange(count_, 0);
    }

   private:
    friend class basic_semaphore;
    friend struct detail::semaphore_access;
    permit(basic_semaphore* semaphore, std::ptrdiff_t count) noexcept : semaphore_(semaphore), count_(count) {}

    basic_semaphore* semaphore_ = nullptr;
    std::ptrdiff_t count_ = 0;
  };

  // `name` shows in stats() and in the task registry, where a task blocked
  // here is listed as blocked on `semaphore "name"`.
  explicit basic_semaphore(std::ptrdiff_t capacity, std::string_view name = {})
      : basic_semaphore(capacity, name, detail::blocked_kind{"semaphore"}) {}

  // For a primitive built on a semaphore: its waiters show in the registry
  // as blocked on `kind "name"` (a resource_pool's, for example).
  basic_semaphore(std::ptrdiff_t capacity, std::string_view name, detail::blocked_kind kind)
      : capacity_(checked_capacity(capacity)),
        name_(detail::intern(name)),
        state_(static_cast<std::uint64_t>(capacity) -
               (detail::asymmetric_barrier_available() ? 1 : 0)),
        slot_(detail::asymmetric_barrier_available() ? slot_full : slot_off),
        queue_(this, &on_waiter_removed, kind.kind, name_) {}

  std::string_view name() const noexcept { return name_ != nullptr ? std::string_view{name_} : std::string_view{}; }

  basic_semaphore(const basic_semaphore&) = delete;
  basic_semaphore& operator=(const basic_semaphore&) = delete;

  // Takes n permits if they are free and nobody is queued; never waits for
  // permits. (Once every 2^23 acquisitions, the one that folds the count
  // takes the queue's mutex, briefly.)
  [[nodiscard]] bool try_acquire(std::ptrdiff_t n = 1) {
    check_weight(n, "try_acquire");
    return take_now(static_cast<std::uint64_t>(n));
  }

  // Waits as long as it takes.
  void acquire(std::ptrdiff_t n = 1) {
    check_weight(n, "acquire");
    if (take_fast(static_cast<std::uint64_t>(n))) return;
    acquire_slow(n);
  }

  // Waits until the permits are granted (ok) or the token is cancelled
  // (cancelled; timeout when the token's own deadline cancelled it).
  wait_status acquire(std::ptrdiff_t n, const cancel_token& token) {
    check_weight(n, "acquire");
    detail::cancel_state* const cancel = detail::state_of(token);
    const auto give_up = detail::give_up_check(cancel);
    if (const auto status = give_up()) return count_failure(*status);
    if (spin_take(static_cast<std::uint64_t>(n), give_up)) return wait_status::ok;
    // The queue's first step takes free permits, cancelled or not.
    if (const auto status = give_up()) return count_failure(*status);
    return wait_in_queue<Clock, typename Clock::duration>(n, cancel, nullptr);
  }

  template <class Rep, class Period>
  wait_status acquire_for(std::ptrdiff_t n, std::chrono::duration<Rep, Period> timeout) {
    return acquire_until(n, detail::deadline_after<Clock>(timeout));
  }

  template <class Duration>
  wait_status acquire_until(std::ptrdiff_t n, const std::chrono::time_point<Clock, Duration>& deadline) {
    check_weight(n, "acquire_until");
    const auto amount = static_cast<std::uint64_t>(n);
    if (take_fast(amount)) return wait_status::ok;
    const auto due = detail::clock_deadline(deadline);
    // A deadline already past gets the one try that try_acquire makes, not
    // a spin: acquire_for(n, 0s) is a try.
    if (Clock::now() >= due) {
      return take_now(amount) ? wait_status::ok : count_failure(wait_status::timeout);
    }
    const auto give_up = detail::give_up_check(nullptr, &due);
    if (spin_take(amount, give_up)) return wait_status::ok;
    if (const auto status = give_up()) return count_failure(*status);
    return wait_in_queue(n, nullptr, &due);
  }

  // Returns n permits and hands them to queued waiters in FIFO order.
  void release(std::ptrdiff_t n = 1) {
    // More than the capacity is not a request that could never be granted
    // but an over-release, which release_slow reports.
    if (n < 0) [[unlikely]] {
      throw_bad_weight(n, "release");
    }
    if (n == 1 && release_to_slot()) return;
    release_to_state(static_cast<std::uint64_t>(n));
  }

  permit acquire_permit(std::ptrdiff_t n = 1) {
    acquire(n);
    return permit{this, n};
  }
  permit try_acquire_permit(std::ptrdiff_t n = 1) {
    return try_acquire(n) ? permit{this, n} : permit{};
  }
  permit acquire_permit(std::ptrdiff_t n, const cancel_token& token) {
    return acquire(n, token) == wait_status::ok ? permit{this, n} : permit{};
  }
  template <class Rep, class Period>
  permit acquire_permit_for(std::ptrdiff_t n, std::chrono::duration<Rep, Period> timeout) {
    return acquire_for(n, timeout) == wait_status::ok ? permit{this, n} : permit{};
  }
  template <class Duration>
  permit acquire_permit_until(std::ptrdiff_t n, const std::chrono::time_point<Clock, Duration>& deadline) {
    return acquire_until(n, deadline) == wait_status::ok ? permit{this, n} : permit{};
  }

  std::ptrdiff_t capacity() const noexcept { return capacity_; }

  // A snapshot: may be stale by the time it is read.
  std::ptrdiff_t available() const noexcept { return static_cast<std::ptrdiff_t>(free_permits()); }

  // How many acquirers are queued; a snapshot, readable without the mutex.
  std::size_t waiters() const noexcept { return queue_.size(); }

  // Takes the queue's mutex (briefly) for a consistent acquisition count.
  semaphore_stats stats() const {
    semaphore_stats s;
    s.name = name();
    s.capacity = capacity_;
    {
      auto lock = queue_.lock();
      const auto state = state_.load(std::memory_order_relaxed);
      s.available = static_cast<std::ptrdiff_t>(free_permits());
      s.acquisitions = acquisitions_folded_.load(std::memory_order_relaxed) +
                       ((state & acquisitions_mask) >> acquisitions_shift) +
                       slot_acquisitions_.load(std::memory_order_relaxed);
    }
    s.waiters = queue_.size();
    s.timeouts = counters_.timeouts.load(std::memory_order_relaxed);
    s.cancellations = counters_.cancellations.load(std::memory_order_relaxed);
    s.total_wait = std::chrono::nanoseconds{counters_.total_wait_ns.load(std::memory_order_relaxed)};
    s.max_wait = std::chrono::nanoseconds{counters_.max_wait_ns.load(std::memory_order_relaxed)};
    return s;
  }

 private:
  friend struct detail::semaphore_access;

  WEFT_NOINLINE void acquire_slow(std::ptrdiff_t n) {
    if (spin_take(static_cast<std::uint64_t>(n), detail::give_up_check(nullptr))) return;
    wait_in_queue<Clock, typename Clock::duration>(n, nullptr, nullptr);
  }

  // Waiters are queued, or the release may be too large (which throws,
  // unless `checked` is false: for a permit that was free, in the slot).
  WEFT_NOINLINE void release_slow(std::uint64_t amount, bool checked = true) {
    const auto n = static_cast<std::ptrdiff_t>(amount);
    const auto capacity = static_cast<std::uint64_t>(capacity_);
    // A release of permits the caller holds leaves at most the capacity
    // free at every moment, so a consistent snapshot above it proves an
    // over-release; the checks on the count alone below cannot see a permit
    // parked in the slot.
    if (const auto free = checked ? free_permits() : 0; free + amount > capacity) {
      throw_over_release(n, free);
    }
    for (;;) {
      auto state = state_.load(std::memory_order_relaxed);
      while ((state & waiters_mark) == 0) {
        if (checked && (state & count_mask) + amount > capacity) {
          throw_over_release(n, free_permits());
        }
        if (state_.compare_exchange_weak(state, state + amount, std::memory_order_release,
                                         std::memory_order_relaxed)) {
          return;
        }
      }
      detail::completion_list granted;  // completed after the lock below is released
      auto lock = queue_.lock();
      state = state_.load(std::memory_order_relaxed);
      if ((state & waiters_mark) == 0) continue;  // the queue emptied meanwhile: fast path again
      if (checked && (state & count_mask) + amount > capacity) {
        throw_over_release(n, free_permits());
      }
      state_.store(state + amount, std::memory_order_release);
      grant(granted);
      return;
    }
  }

  // The state word:
  //   bit 63      "waiters are queued": set and cleared with the queue's
  //               mutex held; while it is set only holders of that mutex
  //               change the state, so the fast paths (which require it
  //               clear) never race a grant.
  //   bits 40-62  the low bits of the acquisition count. Counting in the
  //               same compare-and-swap that takes the permits keeps the
  //               fast path at one atomic operation; when the field is full
  //               the next acquire takes the slow path, which folds it into
  //               acquisitions_folded_ under the mutex, so stats() (which
  //               reads both under the mutex) never sees a wrap.
  //   bits 0-39   the free permits outside the slot (so the capacity is at
  //               most 2^40 - 1).
  static constexpr std::uint64_t waiters_mark = std::uint64_t{1} << 63;
  static constexpr unsigned acquisitions_shift = 40;
  static constexpr std::uint64_t acquisition_one = std::uint64_t{1} << acquisitions_shift;
  static constexpr std::uint64_t acquisitions_mask = waiters_mark - acquisition_one;
  static constexpr std::uint64_t count_mask = acquisition_one - 1;

  // The release slot parks one free permit where a single compare-and-swap
  // takes it and a plain store gives it back, so a thread that acquires and
  // releases one permit at a time pays one atomic operation per pair instead
  // of two (without it, a fair semaphore's pair costs what an unfair one's
  // does, or a mutex's). Its word holds:
  //   slot_full    a free permit, counted in no state word: the free permits
  //                are the state's count plus this one.
  //   a tag        the address of the detail::thread_record of the thread
  //                that took the permit: that thread alone may store
  //                slot_full here again, when it next releases one permit
  //                (any permit: they are interchangeable). Should the permit
  //                be released by another thread, that release goes to the
  //                state word, and the tag stays until its thread releases
  //                one here.
  //   slot_empty   no permit and no owner: a release of one permit may fill
  //                it with a compare-and-swap.
  //   slot_blocked like slot_empty, but waiters are queued: releases go to
  //                the state word, whose releases grant them.
  //   slot_off     never used again.
  //   a drain mark  a weighted acquire is moving the parked permit into
  //                the state's count (drain_slot): for those few
  //                instructions the permit is in neither, so an acquire
  //                that meets a mark waits it out rather than decline a
  //                permit that is free; the settler, which holds the
  //                queue's mutex the drainer may need, blocks the slot
  //                instead (the permit reaches the count, or through the
  //                queue the waiters). Each drain has a mark of its own, an
  //                odd value no other drain in progress can have: a drainer
  //                delayed before its last step, while the slot was
  //                blocked, unblocked, refilled and drained by another,
  //                must not clear that later drain's mark.
  // A release never touches the semaphore after its store or
  // compare-and-swap has made the permit free, because the acquirer who
  // takes it may destroy the semaphore at once. So no release looks for
  // waiters after it fills the slot; instead, nobody may queue while the
  // slot could still be filled. The acquirer that sets the waiters mark on
  // a state without it (so the queue is empty) settles the slot under the
  // queue's mutex, before it queues:
  //  - a parked permit moves into the state's count (the slot is blocked);
  //  - an empty slot is blocked, with a compare-and-swap, so a fill loses
  //    the race to it or is seen by it;
  //  - its own tag stays: the thread that set the mark is not releasing
  //    anything meanwhile, and sees the mark when it next releases;
  //  - another thread's tag: that thread announces its release
  //    (thread_record::releasing), then loads the slot and the mark, and
  //    stores only if the slot still holds its tag and nobody waits; but
  //    nothing on its side orders those loads after the announcement. So
  //    the settler turns the slot off for good (a compare-and-swap from the
  //    tag), then runs a heavy asymmetric barrier (a membarrier system call;
  //    detail/asymmetric_barrier.hpp). After the barrier, a release by that
  //    thread has either announced itself, and the settler waits it out (a
  //    few instructions, unless that thread is preempted) and takes the
  //    permit it may have stored over slot_off, or it loads the slot off
  //    and releases to the state word. A semaphore thus pays for one
  //    barrier at most, the first time a thread queues while another holds
  //    the slot's permit, and from then on costs what it would without a
  //    slot. (A permit that others take from the slot after the mark was
  //    set, such as the one a waited-out release stored, needs no barrier:
  //    the compare-and-swap that takes it, its taker's later load of the
  //    mark, and the mark are sequentially consistent.)
  // The mark's clearing unblocks the slot. Where the barrier is not
  // available, the slot starts off.
  static constexpr std::uintptr_t slot_empty = 0;
  static constexpr std::uintptr_t slot_full = 1;
  static constexpr std::uintptr_t slot_blocked = 2;
  static constexpr std::uintptr_t slot_off = 3;

  // Tags are the addresses of thread records, which are 64-byte aligned.
  // A drain mark is the address of a word on the drainer's stack, which no
  // other live thread's stack holds, with its low bit set.
  static std::uintptr_t tag_of(const detail::thread_record* record) noexcept {
    return reinterpret_cast<std::uintptr_t>(record);
  }
  static_assert(alignof(detail::thread_record) >= 2 && alignof(std::uintptr_t) >= 2);
  static bool is_tag(std::uintptr_t slot) noexcept { return slot > slot_off && (slot & 1) == 0; }
  static bool is_drain_mark(std::uintptr_t slot) noexcept {
    return slot > slot_off && (slot & 1) != 0;
  }

  static bool folding_due(std::uint64_t state) noexcept {
    return (state & acquisitions_mask) == acquisitions_mask;
  }

  // `state` with n permits taken and the acquisition counted; a full count
  // field restarts at zero (the caller then calls fold_acquisitions).
  static std::uint64_t taken(std::uint64_t state, std::uint64_t n) noexcept {
    return folding_due(state) ? (state & ~acquisitions_mask) - n : state - n + acquisition_one;
  }

  // With the queue's mutex held, after a full count field was reset.
  void fold_acquisitions() noexcept {
    acquisitions_folded_.store(
        acquisitions_folded_.load(std::memory_order_relaxed) + (acquisitions_mask >> acquisitions_shift) + 1,
        std::memory_order_relaxed);
  }

  // With the queue's mutex held: takes n permits if free and nobody is queued.
  bool take_locked(std::uint64_t n) noexcept {
    auto state = state_.load(std::memory_order_relaxed);
    while ((state & waiters_mark) == 0 && (state & count_mask) >= n) {
      if (state_.compare_exchange_weak(state, taken(state, n), std::memory_order_acquire,
                                       std::memory_order_relaxed)) {
        if (folding_due(state)) fold_acquisitions();
        return true;
      }
    }
    return false;
  }

  static std::ptrdiff_t checked_capacity(std::ptrdiff_t capacity) {
    if (capacity < 1) {
      throw std::invalid_argument("weft::semaphore: capacity must be at least 1, got " +
                                  std::to_string(capacity));
    }
    if (static_cast<std::uint64_t>(capacity) > count_mask) {
      throw std::invalid_argument("weft::semaphore: capacity must be at most 2^40 - 1, got " +
                                  std::to_string(capacity));
    }
    return capacity;
  }

  void check_weight(std::ptrdiff_t n, const char* operation) const {
    if (n < 0 || n > capacity_) [[unlikely]] throw_bad_weight(n, operation);
  }

  // Out of line, so the checks on the fast paths stay two compares.
  [[noreturn]] WEFT_NOINLINE void throw_bad_weight(std::ptrdiff_t n, const char* operation) const {
    if (n < 0) {
      throw std::invalid_argument(std::string("weft::semaphore::") + operation + ": n must not be negative, got " +
                                  std::to_string(n));
    }
    throw std::invalid_argument(std::string("weft::semaphore::") + operation + ": n (" + std::to_string(n) +
                                ") is larger than the capacity (" + std::to_string(capacity_) +
                                "), so it could never be granted");
  }

  [[noreturn]] WEFT_NOINLINE void throw_over_release(std::ptrdiff_t n, std::uint64_t available) const {
    throw std::logic_error("weft::semaphore::release(" + std::to_string(n) + "): only " +
                           std::to_string(capacity_ - static_cast<std::ptrdiff_t>(available)) +
                           " permits are held; release what was acquired, no more");
  }

  // The fast paths, which decline when waiters are queued.
  bool take_fast(std::uint64_t n) noexcept { return (n == 1 && take_slot()) || try_take(n); }

  // Takes the permit parked in the slot, leaving this thread's tag there.
  // A drain met here, or one that won the permit from under this thread,
  // is waited out: the permit is then in the count, where the caller looks
  // next, unless a settler blocked the slot for queued waiters, who come
  // first.
  bool take_slot() noexcept {
    // Acquire: an empty slot that a drain left must show its permit in the
    // count, which the caller reads next.
    auto slot = slot_.load(std::memory_order_acquire);
    for (;;) {
      if (is_drain_mark(slot)) slot = wait_out_drain();
      if (slot != slot_full) return false;
      detail::thread_record* record = detail::this_thread_record();
      if (record == nullptr) return false;
      if (slot_.compare_exchange_strong(slot, tag_of(record), std::memory_order_seq_cst,
                                        std::memory_order_relaxed)) {
        break;
      }
    }
    // Only the thread whose tag is in the slot counts here, and the slot is
    // full again only after it releases: the count has one writer at a time.
    slot_acquisitions_.store(slot_acquisitions_.load(std::memory_order_relaxed) + 1,
                             std::memory_order_relaxed);
    return true;
  }

  // Gives one permit back through the slot: a compare-and-swap that fills
  // an empty slot, or the plain store when this thread's tag is there.
  // False when the slot does not take it.
  bool release_to_slot() {
    const auto slot = slot_.load(std::memory_order_relaxed);
    if (slot == slot_empty) {
      if ((state_.load(std::memory_order_relaxed) & count_mask) + 1 >
          static_cast<std::uint64_t>(capacity_)) {
        return false;  // an over-release, which release_to_state reports
      }
      auto empty = slot_empty;
      return slot_.compare_exchange_strong(empty, slot_full, std::memory_order_release,
                                           std::memory_order_relaxed);
    }
    detail::thread_record* record = detail::this_thread_record_if_any();
    if (record == nullptr || slot != tag_of(record)) return false;
    record->releasing.store(this, std::memory_order_relaxed);
    // The loads must follow the announcement in program order; the settler's
    // barrier orders them on the processor (see "The release slot").
    std::atomic_signal_fence(std::memory_order_seq_cst);
    const auto state = state_.load(std::memory_order_seq_cst);
    const bool fill = slot_.load(std::memory_order_relaxed) == slot &&
                      (state & waiters_mark) == 0 &&
                      (state & count_mask) + 1 <= static_cast<std::uint64_t>(capacity_);
    if (fill) slot_.store(slot_full, std::memory_order_release);
    record->releasing.store(nullptr, std::memory_order_release);
    return fill;
  }

  // Moves a permit parked in the slot into the state's count, for a weighted
  // request the count alone cannot meet. Unchecked: should an over-release
  // racing another release have gone unseen, this acquirer is not the one
  // to report it.
  bool drain_slot() {
    // Not const: a compiler may put a const one in read-only data, shared.
    std::uintptr_t mark_site = 0;
    const auto mark = reinterpret_cast<std::uintptr_t>(&mark_site) | 1;
    auto full = slot_full;
    if (slot_.load(std::memory_order_relaxed) != full ||
        !slot_.compare_exchange_strong(full, mark, std::memory_order_acquire,
                                       std::memory_order_relaxed)) {
      return false;
    }
    release_slow(1, false);  // its fast loop, unchecked, when nobody waits
    // Released after the count's update, for those who waited this out.
    // Blocked or off meanwhile by a settler, the slot stays so, and refilled
    // since, it holds no mark of this drain's.
    auto draining = mark;
    slot_.compare_exchange_strong(draining, slot_empty, std::memory_order_release,
                                  std::memory_order_relaxed);
    return true;
  }

  // Waits until the slot holds no drain's mark (its permit is in the count,
  // or a settler blocked the slot and queued waiters come first), and
  // returns the slot's value then.
  std::uintptr_t wait_out_drain() const noexcept {
    std::uintptr_t slot = slot_off;
    detail::spin_until([&] {
      slot = slot_.load(std::memory_order_acquire);
      return !is_drain_mark(slot);
    });
    return slot;
  }

  void release_to_state(std::uint64_t amount) {
    auto state = state_.load(std::memory_order_relaxed);
    while ((state & waiters_mark) == 0 && surely_fits(state, amount)) {
      if (state_.compare_exchange_weak(state, state + amount, std::memory_order_release,
                                       std::memory_order_relaxed)) {
        return;
      }
    }
    release_slow(amount);
  }

  // Whether returning `amount` to `state` keeps the free permits within the
  // capacity, counting a permit that may be parked in the slot; release_slow
  // decides the doubtful case exactly.
  bool surely_fits(std::uint64_t state, std::uint64_t amount) const noexcept {
    const auto after = (state & count_mask) + amount;
    const auto capacity = static_cast<std::uint64_t>(capacity_);
    return after < capacity ||
           (after == capacity && slot_.load(std::memory_order_relaxed) != slot_full);
  }

  struct state_and_slot {
    std::uint64_t state;
    std::uintptr_t slot;
  };

  // The state word and the slot at one moment: the slot read between two
  // equal reads of the state. Only a permit moving from the count to the
  // slot could make the two count one twice, and it must be taken from the
  // count first, which changes the acquisition bits: so the state cannot
  // come back to an earlier value unseen in between (but for a wrap of
  // those bits, after 2^23 acquisitions within the three loads).
  state_and_slot read_at_one_moment() const noexcept {
    for (;;) {
      const auto state = state_.load(std::memory_order_seq_cst);
      const auto slot = slot_.load(std::memory_order_seq_cst);
      if (state_.load(std::memory_order_seq_cst) == state) return {state, slot};
    }
  }

  // The free permits at one moment: the state's count and the slot's. A
  // permit that drain_slot is moving from the slot into the count is in
  // neither for those few instructions, and not counted: one low, never one
  // high, which is the side release_slow's over-release check needs.
  std::uint64_t free_permits() const noexcept {
    const auto [state, slot] = read_at_one_moment();
    return (state & count_mask) + (slot == slot_full ? 1 : 0);
  }

  // With the queue's mutex held, by the acquirer that has just set the
  // waiters mark on a state without it (so the queue is empty): see "The
  // release slot". Returns true if it moved a parked permit into the count.
  bool settle_slot() noexcept {
    for (;;) {
      auto slot = slot_.load(std::memory_order_seq_cst);
      if (slot == slot_full || slot == slot_empty || is_drain_mark(slot)) {
        if (!slot_.compare_exchange_strong(slot, slot_blocked, std::memory_order_seq_cst,
                                           std::memory_order_relaxed)) {
          continue;
        }
        if (slot != slot_full) return false;  // a drainer's permit goes to the count or the queue
        state_.fetch_add(1, std::memory_order_release);
        return true;
      }
      // This thread's own tag stays: the thread that set the mark is not
      // releasing anything now, and sees the mark when it next does.
      if (!is_tag(slot) || slot == tag_of(detail::this_thread_record_if_any())) return false;
      if (slot_.compare_exchange_strong(slot, slot_off, std::memory_order_seq_cst,
                                        std::memory_order_relaxed)) {
        return collect_from(reinterpret_cast<const detail::thread_record*>(slot));
      }
    }
  }

  // The slot is now off, and held the tag of `owner`, which may be releasing
  // through it right now, blind to the mark, and may yet store its permit
  // over slot_off. After the barrier, such a release has announced itself,
  // and is waited out; any later one sees the slot off. Meanwhile others
  // may have taken that permit from the slot, or drained it and refilled
  // the emptied slot: whatever is there now is swapped for slot_off, so the
  // slot stays off. (A permit taken meanwhile was taken after the mark was
  // set, and its release sees the mark or the slot off; one drained goes to
  // the state word, through its queue.)
  WEFT_NOINLINE bool collect_from(const detail::thread_record* owner) noexcept {
    detail::asymmetric_barrier_heavy();
    while (owner->releasing.load(std::memory_order_acquire) == this) {
      std::this_thread::yield();  // a few instructions from done, unless preempted
    }
    if (slot_.exchange(slot_off, std::memory_order_seq_cst) != slot_full) return false;
    state_.fetch_add(1, std::memory_order_release);
    return true;
  }

  // With the queue's mutex held, just before the waiters mark is cleared.
  void unblock_slot() noexcept {
    auto blocked = slot_blocked;
    slot_.compare_exchange_strong(blocked, slot_empty, std::memory_order_relaxed);
  }

  // The state word's fast path: one compare-and-swap that takes the permits
  // and counts the acquisition; declines when waiters are queued or a fold
  // is due.
  bool try_take(std::uint64_t n) noexcept {
    auto state = state_.load(std::memory_order_relaxed);
    while ((state & waiters_mark) == 0 && (state & count_mask) >= n && !folding_due(state)) {
      if (state_.compare_exchange_weak(state, state - n + acquisition_one, std::memory_order_acquire,
                                       std::memory_order_relaxed)) {
        return true;
      }
    }
    return false;
  }

  // take_fast, and where the state's count cannot meet the request alone,
  // the slot's permit moved into the count first: for a weighted request,
  // and for one permit on a thread that cannot tag the slot (it has no
  // record: a thread_local's destructor at thread exit, or out of memory).
  // (Moving it cannot throw: that permit was free.)
  bool take_any(std::uint64_t n) noexcept {
    if (take_fast(n)) return true;
    if ((state_.load(std::memory_order_relaxed) & count_mask) >= n) return false;
    if (n == 1 && detail::this_thread_record_if_any() != nullptr) return false;
    if (is_drain_mark(slot_.load(std::memory_order_relaxed))) {
      wait_out_drain();  // another weighted acquire's drain
    } else if (!drain_slot()) {
      return false;
    }
    return try_take(n);
  }

  // try_acquire: takes n permits if free and nobody is queued. It declines
  // only on a state and a slot read at one moment that cannot meet n, or
  // with waiters queued: take_any looked at the slot before the count, and
  // a permit may have come to the slot in between. Any other decline means
  // the state moved meanwhile (another taker, or a fold), and it looks
  // again.
  bool take_now(std::uint64_t n) {
    for (;;) {
      if (take_any(n)) return true;
      auto now = read_at_one_moment();
      if (folding_due(now.state)) {
        {
          auto lock = queue_.lock();
          if (take_locked(n)) return true;  // and folds
        }
        now = read_at_one_moment();
      }
      if ((now.state & waiters_mark) != 0) return false;
      const auto count = now.state & count_mask;
      if (count >= n || is_drain_mark(now.slot) || (now.slot == slot_full && count + 1 >= n))
        continue;
      return false;
    }
  }

  // The holder usually releases within a microsecond on a busy system, far
  // sooner than a park and wake, so spin (then yield) before queueing. Keep
  // doing so while others are queued, too: try_take cannot overtake them,
  // but not joining the queue at once lets a queue of parked threads drain
  // instead of growing into a convoy, where every release waits for the
  // next queued thread to be scheduled. A stop that `give_up` (a
  // detail::give_up_check) reports ends the spin.
  template <class GiveUp>
  bool spin_take(std::uint64_t n, GiveUp give_up) noexcept {
    for (detail::backoff pause;;) {
      if (give_up()) return false;
      if (take_any(n)) return true;
      if (folding_due(state_.load(std::memory_order_relaxed)) || !pause.wait()) return false;
    }
  }

  // With the queue's mutex held: takes n permits if free and nobody is
  // queued, else marks the state and queues `node`. Returns true if taken.
  bool take_or_enqueue(detail::wait_node& node) noexcept {
    const auto n = static_cast<std::uint64_t>(node.request);
    for (;;) {
      if (take_locked(n)) return true;
      auto state = state_.load(std::memory_order_relaxed);
      if ((state & count_mask) >= n && (state & waiters_mark) == 0)
        continue;  // lost a race to a fast path
      // Sequentially consistent, for the slot (see "The release slot"), and
      // an acquire: the permits this waiter will be granted include those
      // that fast-path releases returned before the mark, and what their
      // releasers did must happen-before its acquire returns. The grant
      // that completes it comes later, through the queue's mutex.
      if ((state & waiters_mark) == 0) {
        if (!state_.compare_exchange_strong(state, state | waiters_mark, std::memory_order_seq_cst,
                                            std::memory_order_relaxed)) {
          continue;
        }
        // The queue is empty: nothing is lost by clearing the mark again
        // when a permit from the slot may now meet the request.
        if (settle_slot()) {
          unblock_slot();
          state_.fetch_and(~waiters_mark, std::memory_order_relaxed);
          continue;
        }
      }
      queue_.push_back(node);
      return false;
    }
  }

  // With the queue's mutex held: hands free permits to waiters from the
  // head, and clears the mark once nobody is left.
  void grant(detail::completion_list& granted) noexcept {
    while (detail::wait_node* head = queue_.front()) {
      const auto state = state_.load(std::memory_order_relaxed);
      const auto n = static_cast<std::uint64_t>(head->request);
      if ((state & count_mask) < n) return;
      state_.store(taken(state, n), std::memory_order_relaxed);
      if (folding_due(state)) fold_acquisitions();
      queue_.remove(*head, wait_status::ok, granted);
    }
    // The slot first: once the mark is clear, a release may let an acquirer
    // through that destroys the semaphore before this one returns.
    unblock_slot();
    state_.fetch_and(~waiters_mark, std::memory_order_release);
  }

  static void on_waiter_removed(void* self, detail::completion_list& granted) noexcept {
    static_cast<basic_semaphore*>(self)->grant(granted);
  }

  template <class WaitClock, class Duration>
  wait_status wait_in_queue(std::ptrdiff_t n, detail::cancel_state* cancel,
                            const std::chrono::time_point<WaitClock, Duration>* deadline) {
    detail::thread_waiter waiter;
    waiter.request = n;
    auto lock = queue_.lock();
    if (take_or_enqueue(waiter)) return wait_status::ok;
    const auto queued_at = Clock::now();
    const auto status = queue_.wait(waiter, lock, cancel, deadline);
    record_wait(status, Clock::now() - queued_at);
    return status;
  }

  wait_status count_failure(wait_status status) noexcept {
    (status == wait_status::timeout ? counters_.timeouts : counters_.cancellations)
        .fetch_add(1, std::memory_order_relaxed);
    return status;
  }

  template <class Duration>
  void record_wait(wait_status status, Duration waited) noexcept {
    const auto ns = detail::waited_ns(waited);
    counters_.total_wait_ns.fetch_add(ns, std::memory_order_relaxed);
    auto max = counters_.max_wait_ns.load(std::memory_order_relaxed);
    while (ns > max && !counters_.max_wait_ns.compare_exchange_weak(max, ns, std::memory_order_relaxed)) {
    }
    if (status != wait_status::ok) count_failure(status);
  }

  struct alignas(64) counters {
    std::atomic<std::uint64_t> timeouts{0};
    std::atomic<std::uint64_t> cancellations{0};
    std::atomic<std::int64_t> total_wait_ns{0};
    std::atomic<std::int64_t> max_wait_ns{0};
  };

  const std::ptrdiff_t capacity_;
  const char* const name_;  // interned, for the registry; null if unnamed
  alignas(64) std::atomic<std::uint64_t> state_;
  std::atomic<std::uintptr_t> slot_;  // the release slot, on the state's cache line
  // Acquisitions through the slot; see take_slot.
  std::atomic<std::uint64_t> slot_acquisitions_{0};
  mutable detail::wait_queue queue_;
  // Acquisitions folded out of the state word; written under the queue's mutex.
  std::atomic<std::uint64_t> acquisitions_folded_{0};
  counters counters_;
};

using semaphore = basic_semaphore<>;
using permit = semaphore::permit;

}  // namespace weft
