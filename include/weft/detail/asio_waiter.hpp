// SPDX-License-Identifier: BSL-1.0
// detail::async_waiter: the async kind of wait_queue node, holding an Asio
// completion handler. Included only by weft/asio/*.hpp (it needs Boost).
//
// Life of an async waiter:
//  1. The initiating function allocates it, installs a handler in the
//     completion handler's associated cancellation slot (before the node can
//     be seen by any other thread), and queues it, or completes it at once.
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
// one of its handlers sits in a semaphore's queue. Every waiter is therefore
// registered with a waiter_service of its handler's execution context; when
// the context shuts down, the service withdraws each waiter still queued
// (it leaves the queue without completing, and the handler is destroyed, as
// Asio destroys the handlers of its own pending operations), so a later
// release() never touches the dead context.
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
  // completing and destroy it; if its completion is already on its way, do
  // nothing (the context destroys that completion, and it the operation).
  virtual void withdraw() noexcept = 0;

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

  void add(context_bound_waiter& waiter) {
    std::lock_guard lock(mutex_);
    waiter.previous_ = nullptr;
    waiter.next_ = head_;
    if (head_ != nullptr) head_->previous_ = &waiter;
    head_ = &waiter;
    waiter.registered_ = true;
  }

  void remove(context_bound_waiter& waiter) noexcept {
    std::lock_guard lock(mutex_);
    if (!waiter.registered_) return;
    (waiter.previous_ != nullptr ? waiter.previous_->next_ : head_) = waiter.next_;
    if (waiter.next_ != nullptr) waiter.next_->previous_ = waiter.previous_;
    waiter.registered_ = false;
  }

 private:
  void shutdown() override {
    context_bound_waiter* waiters = nullptr;
    {
      std::lock_guard lock(mutex_);
      waiters = std::exchange(head_, nullptr);
      for (auto* waiter = waiters; waiter != nullptr; waiter = waiter->next_) waiter->registered_ = false;
    }
    while (waiters != nullptr) {
      auto* waiter = waiters;
      waiters = waiter->next_;  // read first: withdraw() may destroy it
      waiter->withdraw();
    }
  }

  std::mutex mutex_;
  context_bound_waiter* head_ = nullptr;
};

inline boost::system::error_code to_boost_error(wait_status status) noexcept {
  return boost::system::error_code(to_error_code(status));
}

// Result settles what the wait produced as soon as the waiter leaves the
// queue, on the remover's thread: result.settle(status) takes ownership of it
// (a semaphore's permits become a permit object there). The completion then
// hands result.arguments() to the handler. If the completion is destroyed
// without running (its io_context shut down first), the settled result is
// destroyed with it and gives back what it owned: nothing granted is lost.
template <class Handler, class Result>
class async_waiter final : public wait_node, public context_bound_waiter {
 public:
  async_waiter(Handler handler, Result result, wait_queue& queue)
      : handler_(std::move(handler)),
        result_(std::move(result)),
        queue_(&queue),
        work_(tracked_executor(handler_)),
        service_(&waiter_service::of(work_)) {
    complete = &post_completion;
    abandon = &destroy;
    service_->add(*this);
  }

  ~async_waiter() { service_->remove(*this); }

  void withdraw() noexcept override {
    if (queue_->withdraw(*this)) destroy(*this);
  }

  // Step 1: call before the node is queued.
  void watch_cancellation() {
    auto slot = boost::asio::get_associated_cancellation_slot(handler_);
    if (slot.is_connected()) slot.template emplace<cancel_handler>(this);
  }

  // Completes a waiter that was never queued.
  static void finish(std::unique_ptr<async_waiter> waiter, wait_status status) noexcept {
    waiter->status = status;
    post_completion(*waiter.release());
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

  struct completion {
    std::unique_ptr<async_waiter> waiter;
    void operator()() {
      boost::asio::get_associated_cancellation_slot(waiter->handler_).clear();
      auto handler = std::move(waiter->handler_);
      auto arguments = waiter->result_.arguments();
      waiter.reset();  // free before the upcall, as Asio does
      std::apply(std::move(handler), std::move(arguments));
    }
  };

  static void post_completion(wait_node& node) noexcept {
    auto* self = static_cast<async_waiter*>(&node);
    self->result_.settle(self->status);
    auto executor = self->work_;
    boost::asio::post(std::move(executor), completion{std::unique_ptr<async_waiter>(self)});
  }

  static void destroy(wait_node& node) noexcept {
    auto* self = static_cast<async_waiter*>(&node);
    boost::asio::get_associated_cancellation_slot(self->handler_).clear();
    delete self;
  }

  Handler handler_;
  Result result_;
  wait_queue* queue_;
  tracked_executor_t<Handler> work_;
  waiter_service* service_;
};

}  // namespace weft::detail
