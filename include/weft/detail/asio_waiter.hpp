// SPDX-License-Identifier: BSL-1.0
// detail::async_waiter: the async kind of wait_queue node, holding an Asio
// completion handler. Included only by weft/asio/*.hpp (it needs Boost).
//
// Life of an async waiter:
//  1. The initiating function allocates it, installs a handler in the
//     completion handler's associated cancellation slot (before the node can
//     be seen by any other thread), then, with the queue's lock held, lists
//     it with its context's waiter_service (enlist) and queues it, or
//     completes it at once.
//  2. Whoever removes it from the queue (a grant, or cancel() from the slot
//     handler) calls complete(), which posts a completion function to the
//     handler's associated executor (system_executor when it has none). The
//     handler is never invoked inline: neither from the initiating function
//     nor from release() on a foreign thread.
//  3. The completion function, running on that executor, clears the slot,
//     frees the waiter, then invokes the handler. Until the slot is cleared,
//     a cancellation emitted on the handler's executor finds the node no
//     longer queued and does nothing.
// While queued the waiter holds outstanding work on the handler's executor,
// so io_context::run() does not return under a pending acquire.
//
// An io_context may still be destroyed (without running) while a waiter for
// one of its handlers sits in a semaphore's queue. Every queued waiter is
// therefore listed with a waiter_service of its handler's execution context;
// when the context shuts down, the service withdraws each waiter still
// queued (it leaves the queue without completing, and the handler is
// destroyed, as Asio destroys the handlers of its own pending operations),
// so a later release() never touches the dead context. A waiter that
// another thread has already removed (a release() that granted it, on its
// way to post the completion) is the remover's: the remover asks the
// service before it posts (begin_post), the shutdown waits for posts under
// way, and a remover that comes after the shutdown destroys the waiter
// instead of posting, its result giving back what the grant gave it.
//
// A waiter is listed and queued under one hold of the queue's lock, which
// withdraw() takes too: so the shutdown finds a listed waiter either queued
// or removed by a grant whose post is on its way, never listed but not yet
// queued (it would wait for a post that only a later grant makes). A
// waiter started once the shutdown has begun is not listed, nor queued: it
// is destroyed, as an operation started on a shut-down io_context is.
#pragma once

#include <weft/detail/wait_queue.hpp>
#include <weft/wait_status.hpp>

#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/cancellation_type.hpp>
#include <boost/asio/execution/context.hpp>
#include <boost/asio/execution/outstanding_work.hpp>
#include <boost/asio/execution_context.hpp>
#include <boost/asio/query.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/prefer.hpp>
#include <boost/asio/system_executor.hpp>
#include <boost/system/error_code.hpp>

#include <condition_variable>
#include <cstddef>
#include <memory>
#include <mutex>
#include <tuple>
#include <utility>

namespace weft::detail {

// The handler's associated executor (system_executor when it has none),
// holding outstanding work so the context does not run out while we wait.
template <class Handler>
auto tracked_executor(const Handler& handler) {
  return boost::asio::prefer(boost::asio::get_associated_executor(handler, boost::asio::system_executor{}),
                             boost::asio::execution::outstanding_work.tracked);
}

template <class Handler>
using tracked_executor_t = decltype(tracked_executor(std::declval<const Handler&>()));

// What waiter_service needs of an async operation.
class context_bound_waiter {
 public:
  context_bound_waiter() = default;
  context_bound_waiter(const context_bound_waiter&) = delete;
  context_bound_waiter& operator=(const context_bound_waiter&) = delete;

  // At context shutdown: if the operation still waits, stop waiting without
  // completing, destroy it and return true. Return false if another thread
  // has removed it (a grant, a cancellation), or if its initiation has not
  // finished: that thread will call the service's begin_post for it.
  virtual bool withdraw() noexcept = 0;

 protected:
  ~context_bound_waiter() = default;

 private:
  friend class waiter_service;
  context_bound_waiter* previous_ = nullptr;
  context_bound_waiter* next_ = nullptr;
  bool registered_ = false;  // guarded by the service's mutex
};

// Tracks the async weft operations whose handlers belong to one execution
// context, and withdraws them when the context shuts down.
class waiter_service final : public boost::asio::execution_context::service {
 public:
  using key_type = waiter_service;
  static inline boost::asio::execution_context::id id;

  explicit waiter_service(boost::asio::execution_context& context) : service(context) {}

  template <class Executor>
  static waiter_service& of(const Executor& executor) {
    return boost::asio::use_service<waiter_service>(
        boost::asio::query(executor, boost::asio::execution::context));
  }

  // False, and the waiter is not listed, once the shutdown has begun: the
  // operation must not start waiting then, as nothing would withdraw it.
  [[nodiscard]] bool add(context_bound_waiter& waiter) {
    std::lock_guard lock(mutex_);
    if (shut_down_) return false;
    waiter.previous_ = nullptr;
    waiter.next_ = head_;
    if (head_ != nullptr) head_->previous_ = &waiter;
    head_ = &waiter;
    waiter.registered_ = true;
    return true;
  }

  // For a waiter's destructor. A waiter leaves the list before its
  // completion is posted (begin_post) or it is withdrawn, so only one whose
  // initiation failed after add() is still listed here; the others do not
  // touch the service, which may be gone by then.
  void remove(context_bound_waiter& waiter) noexcept {
    if (!waiter.registered_) return;
    std::lock_guard lock(mutex_);
    unlink(waiter);
  }

  // For the thread that removed `waiter` from its wait, before it posts the
  // completion to this context. True: post it. False: the context is
  // shutting down, so destroy the operation instead (its result gives back
  // what it holds). Either way call end_post() after, which the shutdown
  // waits for: the operation holds work on the context, whose end must come
  // before the context goes.
  bool begin_post(context_bound_waiter& waiter) noexcept {
    std::unique_lock lock(mutex_);
    unlink(waiter);
    ++posting_;
    if (!shut_down_) return true;
    if (withdrawing_ == &waiter) {
      withdrawing_reached_ = true;
      changed_.notify_all();
      changed_.wait(lock, [&] { return withdrawing_ != &waiter; });
    }
    return false;
  }

  void end_post() noexcept {
    std::lock_guard lock(mutex_);
    // Notified under the mutex: once the shutdown sees the count at zero,
    // the service may be destroyed.
    if (--posting_ == 0) changed_.notify_all();
  }

 private:
  // Waiters leave the list under the mutex, one at a time, so a remover
  // either takes its waiter off the list first (and the shutdown never sees
  // it) or finds it in withdrawing_ and waits until the shutdown is done
  // with it. A waiter that withdraw() finds removed is waited for too: its
  // remover is between the queue and begin_post, and must be counted in
  // posting_ before the shutdown's last wait.
  void shutdown() override {
    std::unique_lock lock(mutex_);
    shut_down_ = true;
    while (head_ != nullptr) {
      context_bound_waiter& waiter = *head_;
      unlink(waiter);
      withdrawing_ = &waiter;
      withdrawing_reached_ = false;
      lock.unlock();
      const bool withdrawn = waiter.withdraw();
      lock.lock();
      if (!withdrawn) changed_.wait(lock, [&] { return withdrawing_reached_; });
      withdrawing_ = nullptr;
      changed_.notify_all();
    }
    changed_.wait(lock, [&] { return posting_ == 0; });
  }

  void unlink(context_bound_waiter& waiter) noexcept {
    if (!waiter.registered_) return;
    (waiter.previous_ != nullptr ? waiter.previous_->next_ : head_) = waiter.next_;
    if (waiter.next_ != nullptr) waiter.next_->previous_ = waiter.previous_;
    waiter.registered_ = false;
  }

  std::mutex mutex_;
  std::condition_variable changed_;
  context_bound_waiter* head_ = nullptr;
  bool shut_down_ = false;
  std::size_t posting_ = 0;  // between begin_post and end_post
  context_bound_waiter* withdrawing_ = nullptr;
  bool withdrawing_reached_ = false;  // its remover is in begin_post
};

inline boost::system::error_code to_boost_error(wait_status status) noexcept {
  return boost::system::error_code(to_error_code(status));
}

// What the two kinds of async waiter share (async_waiter below, and
// token_waiter in weft/asio/cancel.hpp): the handler, the work it holds on
// its executor, its context's service, and how an ended wait reaches the
// handler. Derived provides upcall_arguments(): the tuple the handler is
// invoked with, read on the handler's executor once the wait has ended.
template <class Derived, class Handler>
class handler_waiter : public context_bound_waiter {
 protected:
  explicit handler_waiter(Handler handler)
      : handler_(std::move(handler)),
        work_(tracked_executor(handler_)),
        service_(&waiter_service::of(work_)) {}

  ~handler_waiter() { service_->remove(*this); }

  // By the party that ended the wait, as its last touch of the waiter:
  // posts the completion to the handler's executor or, if the context is
  // shutting down, destroys the waiter.
  void post_or_destroy() noexcept {
    waiter_service* service = service_;
    if (service->begin_post(*this)) {
      auto executor = work_;
      try {
        boost::asio::post(std::move(executor), completion{static_cast<Derived&>(*this)});
      } catch (...) {  // the executor refused it: the completion, destroyed, freed the waiter
      }
    } else {
      destroy();
    }
    service->end_post();
  }

  // Ends the wait without completing it: the handler is destroyed (and
  // with it, a derived waiter's result gives back what it holds).
  void destroy() noexcept {
    boost::asio::get_associated_cancellation_slot(handler_).clear();
    delete static_cast<Derived*>(this);
  }

  Handler handler_;
  tracked_executor_t<Handler> work_;
  waiter_service* service_;

 private:
  // Owns the waiter until it runs. Destroyed unrun (its executor refused
  // or dropped it, or its context shut down), it clears the handler's
  // cancellation slot as it frees the waiter: left installed there, the
  // slot's handler would reach the freed waiter at the next emission.
  struct completion {
    explicit completion(Derived& owned) noexcept : waiter(&owned) {}
    completion(completion&&) noexcept = default;
    completion& operator=(completion&&) = delete;
    ~completion() {
      if (waiter) waiter.release()->destroy();
    }

    void operator()() {
      std::unique_ptr<Derived> self = std::move(waiter);
      boost::asio::get_associated_cancellation_slot(self->handler_).clear();
      auto handler = std::move(self->handler_);
      auto arguments = self->upcall_arguments();
      self.reset();  // free before the upcall, as Asio does
      std::apply(std::move(handler), std::move(arguments));
    }

    std::unique_ptr<Derived> waiter;
  };
};

// Result settles what the wait produced as soon as the waiter leaves the
// queue, on the remover's thread: result.settle(status) takes ownership of it
// (a semaphore's permits become a permit object there). The completion then
// hands result.arguments() to the handler. If the completion is destroyed
// without running (its io_context shut down first), the settled result is
// destroyed with it and gives back what it owned: nothing granted is lost.
template <class Handler, class Result>
class async_waiter final : public wait_node,
                           public handler_waiter<async_waiter<Handler, Result>, Handler> {
  using base = handler_waiter<async_waiter, Handler>;
  friend base;

 public:
  async_waiter(Handler handler, Result result, wait_queue& queue)
      : base(std::move(handler)), result_(std::move(result)), queue_(&queue) {
    complete = &on_complete;
    abandon = [](wait_node& node) noexcept { static_cast<async_waiter&>(node).destroy(); };
  }

  bool withdraw() noexcept override {
    if (!queue_->withdraw(*this)) return false;
    this->destroy();
    return true;
  }

  // Step 1: call before the node is queued.
  void watch_cancellation() {
    auto slot = boost::asio::get_associated_cancellation_slot(this->handler_);
    if (slot.is_connected()) slot.template emplace<cancel_handler>(this);
  }

  // Step 2, with the queue's lock held, before the waiter may be queued:
  // lists it with its context's service (see the top of this file). False
  // when the context is shutting down or has shut down: do not queue it;
  // release the lock and discard() it.
  [[nodiscard]] bool enlist() { return this->service_->add(*this); }

  // Ends a waiter that was never queued without completing it: the handler
  // is destroyed.
  static void discard(std::unique_ptr<async_waiter> waiter) noexcept {
    waiter.release()->destroy();
  }

  // Completes a waiter that was never queued.
  static void finish(std::unique_ptr<async_waiter> waiter, wait_status status) noexcept {
    waiter->status = status;
    on_complete(*waiter.release());
  }

  Result& result() noexcept { return result_; }

 private:
  struct cancel_handler {
    explicit cancel_handler(async_waiter* target) noexcept : waiter(target) {}
    async_waiter* waiter;
    void operator()(boost::asio::cancellation_type_t type) const noexcept {
      using boost::asio::cancellation_type;
      if ((type & (cancellation_type::terminal | cancellation_type::partial | cancellation_type::total)) !=
          cancellation_type::none) {
        waiter->queue_->cancel(*waiter, wait_status::cancelled);
      }
    }
  };

  static void on_complete(wait_node& node) noexcept {
    auto& self = static_cast<async_waiter&>(node);
    self.result_.settle(self.status);
    self.post_or_destroy();
  }

  auto upcall_arguments() { return result_.arguments(); }

  Result result_;
  wait_queue* queue_;
};

}  // namespace weft::detail
