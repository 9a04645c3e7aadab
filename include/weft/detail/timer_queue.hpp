// SPDX-License-Identifier: BSL-1.0
// detail::timer_queue and detail::timer_service: deadlines that fire without
// anyone polling.
//
// A timer_queue is a binary min-heap of intrusive timer nodes ordered by
// deadline. fire_due(now) pops and fires every node whose deadline has come,
// one at a time, outside the queue's mutex (see invocation_tracker); cancel()
// removes a node, waiting for its callback when another thread is running it.
//
// Who drives a queue depends on the clock:
//  - a clock that offers `static detail::timer_queue<Clock>& timers()` (the
//    manual clock used by tests) drives it itself, by calling fire_due from
//    its advance(); time moves only when a test says so, and timers fire
//    synchronously on that thread;
//  - any other clock gets a timer_service: one internal thread per clock type
//    (named weft-timer; internal_thread.hpp says which signals it blocks),
//    started on the first timer, sleeping until the earliest deadline, and
//    joined when the program exits. Callbacks run on that thread and must be
//    short (they cancel tokens and wake waiters).
//
// Cost: scheduling and cancelling are O(log n) under one mutex; a node never
// allocates (the heap's vector grows amortised).
#pragma once

#include <weft/detail/internal_thread.hpp>
#include <weft/detail/invocation_tracker.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <mutex>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

namespace weft::detail {

template <class Clock>
concept clock_with_own_timers = requires { Clock::timers(); };

template <class Clock>
struct timer_node {
  using time_point = typename Clock::time_point;
  static constexpr std::size_t not_scheduled = static_cast<std::size_t>(-1);

  time_point deadline{};
  // Runs on the thread that fires the queue, without its mutex.
  void (*fire)(timer_node&) noexcept = nullptr;
  std::size_t heap_index = not_scheduled;
};

template <class Clock>
class timer_queue {
 public:
  using node = timer_node<Clock>;
  using time_point = typename Clock::time_point;

  // Returns true when `n` became the earliest deadline (a sleeping driver
  // must then look again).
  bool schedule(node& n) {
    std::lock_guard lock(mutex_);
    heap_.push_back(&n);
    n.heap_index = heap_.size() - 1;
    sift_up(n.heap_index);
    return heap_.front() == &n;
  }

  // After cancel returns, n's callback is not running and will not run,
  // unless cancel is called from inside that callback, or the callback
  // schedules n again (which no timer of weft's does): cancel then finds
  // n queued, and returns while the callback still runs.
  void cancel(node& n) noexcept {
    std::unique_lock lock(mutex_);
    if (n.heap_index != node::not_scheduled) {
      erase(n.heap_index);
      return;
    }
    tracker_.wait_until_not_running(&n, lock);
  }

  // Fires every node whose deadline is at or before `now`; returns the
  // earliest deadline left, if any. One thread at a time: the tracker follows
  // one running callback (the service thread, or manual_clock's advance(),
  // which serialises its callers).
  std::optional<time_point> fire_due(time_point now) noexcept {
    std::unique_lock lock(mutex_);
    while (!heap_.empty() && heap_.front()->deadline <= now) {
      node* due = heap_.front();
      erase(0);
      tracker_.begin(due);
      lock.unlock();
      due->fire(*due);
      lock.lock();
      tracker_.end();
    }
    if (heap_.empty()) return std::nullopt;
    return heap_.front()->deadline;
  }

  std::optional<time_point> earliest() {
    std::lock_guard lock(mutex_);
    if (heap_.empty()) return std::nullopt;
    return heap_.front()->deadline;
  }

  std::size_t size() {
    std::lock_guard lock(mutex_);
    return heap_.size();
  }

 private:
  void erase(std::size_t index) noexcept {
    heap_[index]->heap_index = node::not_scheduled;
    const std::size_t last = heap_.size() - 1;
    if (index != last) {
      heap_[index] = heap_[last];
      heap_[index]->heap_index = index;
    }
    heap_.pop_back();
    if (index < heap_.size()) {
      sift_up(index);
      sift_down(heap_[index]->heap_index);
    }
  }

  void swap_nodes(std::size_t a, std::size_t b) noexcept {
    std::swap(heap_[a], heap_[b]);
    heap_[a]->heap_index = a;
    heap_[b]->heap_index = b;
  }

  void sift_up(std::size_t index) noexcept {
    while (index > 0) {
      const std::size_t parent = (index - 1) / 2;
      if (!(heap_[index]->deadline < heap_[parent]->deadline)) break;
      swap_nodes(index, parent);
      index = parent;
    }
  }

  void sift_down(std::size_t index) noexcept {
    for (;;) {
      const std::size_t left = 2 * index + 1;
      const std::size_t right = left + 1;
      std::size_t smallest = index;
      if (left < heap_.size() && heap_[left]->deadline < heap_[smallest]->deadline) smallest = left;
      if (right < heap_.size() && heap_[right]->deadline < heap_[smallest]->deadline) smallest = right;
      if (smallest == index) return;
      swap_nodes(index, smallest);
      index = smallest;
    }
  }

  std::mutex mutex_;
  std::vector<node*> heap_;
  invocation_tracker tracker_;
};

// Stops the timer threads (one per clock) when the program exits, and not
// before the worker pools made until then have joined their workers: a
// worker may be waiting on a deadline as its pool's exit handler (the
// default pool's) or destructor (a static pool's) joins it. Each service
// used to be stopped by a guard made with it, so the thread of a clock
// whose first deadline came after a pool was made stopped first, and
// exit() waited for good on a deadline that could no longer fire.
// worker_pool's constructor calls keep_until_exit(), so the guard here,
// made by then, is destroyed after the pool's (statics are destroyed, and
// atexit handlers run, in the reverse order of their making).
class timer_threads {
 public:
  // A service, listed to be stopped at exit.
  struct listed {
    listed* next = nullptr;
    void (*stop)(listed&) noexcept = nullptr;
  };

  // Makes the guard, if it is not made yet.
  static void keep_until_exit() noexcept { (void)state(); }

  // Lists `service` to be stopped at exit; false once exit has stopped the
  // threads (the service then never starts one).
  static bool stop_at_exit(listed& service) noexcept {
    shared& threads = state();
    std::lock_guard lock(threads.mutex);
    if (threads.stopped) return false;
    service.next = std::exchange(threads.services, &service);
    return true;
  }

 private:
  struct shared {
    std::mutex mutex;
    listed* services = nullptr;
    bool stopped = false;
  };

  struct exit_guard {
    shared& threads;
    ~exit_guard() {
      listed* services = nullptr;
      {
        std::lock_guard lock(threads.mutex);
        threads.stopped = true;
        services = std::exchange(threads.services, nullptr);
      }
      // Outside the lock: a timer callback may make the service of another clock.
      while (services != nullptr) {
        listed& service = *std::exchange(services, services->next);
        service.stop(service);
      }
    }
  };

  // Never freed, so a service made during the exit (in a static's
  // destructor) finds it.
  static shared& state() noexcept {
    static shared* const threads = new shared;
    static const exit_guard guard{*threads};
    return *threads;
  }
};

// The thread that drives a timer_queue for a real clock.
template <class Clock>
class timer_service : timer_threads::listed {
 public:
  using node = timer_node<Clock>;

  // The process-wide service for Clock. Its state is never freed, so a timer
  // cancelled during static destruction finds it alive; its thread is joined
  // at exit (see timer_threads), after which timers no longer fire.
  static timer_service& instance() {
    static timer_service* const service = [] {
      auto* made = new timer_service;
      if (!timer_threads::stop_at_exit(*made)) made->stopping_ = true;
      return made;
    }();
    return *service;
  }

  // The thread starts before the node is queued: when it cannot start
  // (std::system_error, say under a thread limit), the node must not stay
  // queued, since the caller frees it as the exception unwinds.
  void schedule(node& n) {
    start_thread();
    if (!queue_.schedule(n)) return;
    std::lock_guard lock(mutex_);
    rearm_ = true;
    wake_.notify_one();
  }

  void cancel(node& n) noexcept { queue_.cancel(n); }

 private:
  timer_service() {
    stop = [](timer_threads::listed& self) noexcept { static_cast<timer_service&>(self).halt(); };
  }

  void start_thread() {
    if (started_.load(std::memory_order_acquire)) return;
    std::lock_guard lock(mutex_);
    if (!thread_.joinable() && !stopping_) {
      thread_ = start_internal_thread("weft-timer", [this] { run(); });
    }
    started_.store(true, std::memory_order_release);
  }

  void halt() noexcept {
    std::thread thread;
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
      thread = std::move(thread_);
      wake_.notify_one();
    }
    if (!thread.joinable()) return;
    if (thread.get_id() == std::this_thread::get_id()) {
      thread.detach();  // exit() called from a timer callback: nobody else can join it
    } else {
      thread.join();
    }
  }

  void run() {
    std::unique_lock lock(mutex_);
    while (!stopping_) {
      rearm_ = false;
      lock.unlock();
      const auto next = queue_.fire_due(Clock::now());
      lock.lock();
      if (stopping_ || rearm_) continue;
      if (next) {
        // A day at a time: a deadline near the clock's max overflowed the
        // condition variable's conversion to its own clock (for a clock
        // other than steady_clock and system_clock), which then returned at
        // once, over and over. Each day ends at a time on Clock, not after
        // a day has passed: a system_clock wait ends when the wall clock
        // is set past its end, so a far deadline fires on time after the
        // clock is set forward (it waited out the day before).
        const auto day =
            std::chrono::duration_cast<typename Clock::duration>(std::chrono::hours{24});
        const auto now = Clock::now();
        const bool far = *next > Clock::time_point::min() + day && *next - day > now;
        wake_.wait_until(lock, far ? now + day : *next);
      } else {
        wake_.wait(lock);
      }
    }
  }

  timer_queue<Clock> queue_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::thread thread_;
  // Set once the thread has started (or never will, after halt()), so that
  // scheduling a timer takes mutex_ only to wake the thread.
  std::atomic<bool> started_{false};
  bool rearm_ = false;
  bool stopping_ = false;
};

// Schedules and cancels a timer on whatever drives Clock's timers.
//
// A clock with its own timers fires them only when it is advanced; a
// deadline that the clock passed between the caller's last reading and the
// schedule is not fired by it. Every caller therefore reads the clock again
// after scheduling and acts on a deadline already due itself.
template <class Clock>
void schedule_timer(timer_node<Clock>& n) {
  if constexpr (clock_with_own_timers<Clock>) {
    Clock::timers().schedule(n);
  } else {
    timer_service<Clock>::instance().schedule(n);
  }
}

template <class Clock>
void cancel_timer(timer_node<Clock>& n) noexcept {
  if constexpr (clock_with_own_timers<Clock>) {
    Clock::timers().cancel(n);
  } else {
    timer_service<Clock>::instance().cancel(n);
  }
}

}  // namespace weft::detail
