// SPDX-License-Identifier: BSL-1.0
// Bridges between weft cancel tokens and Asio's per-operation cancellation.
//
//  - weft::async_wait(token, completion_token): completes when a weft token
//    is cancelled (Go's `<-ctx.Done()` in a select), for coroutines.
//  - weft::cancel_source_for(slot): a weft source cancelled when an Asio
//    cancellation slot is emitted, to hand an Asio operation's cancellation
//    to code that takes weft tokens.
//  - weft::cancellation_bridge: an Asio cancellation slot emitted when a weft
//    token is cancelled, so an Asio operation (a timer, a socket read) stops
//    with a weft deadline or request cancellation.
//
// Asio requires a cancellation signal to be emitted where it cannot race the
// operation (its strand or executor); a weft token is cancelled on any
// thread, so the bridge posts the emission to the executor it is given
// instead of emitting inline.
#pragma once

#include <weft/cancel.hpp>
#include <weft/detail/asio_waiter.hpp>
#include <weft/detail/cancel_state.hpp>

#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/cancellation_type.hpp>
#include <boost/asio/deferred.hpp>
#include <boost/asio/post.hpp>
#include <boost/system/error_code.hpp>

#include <atomic>
#include <memory>
#include <stdexcept>
#include <tuple>
#include <utility>

namespace weft {
namespace detail {

// Completes once: when the token is cancelled (success) or when the
// handler's slot is emitted (errc::cancelled), whichever comes first.
//
// Three parties may end the wait: the token's callback, the slot's handler,
// and the context's shutdown (withdraw). The first to set its claim bit in
// state_bits_ owns the ending. The waiter becomes visible to them one by one as
// start() runs (the slot, the service, the token's callback list), so an
// ending that is claimed before start() has set `started` is left to
// start(), which finishes it as its last step: nobody frees the waiter
// while start() still uses it.
template <class Handler>
class token_waiter final : public callback_node,
                           public handler_waiter<token_waiter<Handler>, Handler> {
  using base = handler_waiter<token_waiter, Handler>;
  friend base;

 public:
  token_waiter(Handler handler, cancel_state* state) : base(std::move(handler)), state_(state) {
    state_->ref();
    invoke = [](callback_node& node) noexcept { static_cast<token_waiter&>(node).claim(by_token); };
  }

  // Removes the token's callback also when the completion is destroyed
  // unrun (its context shut down) after the slot claimed the wait; waits
  // for the callback if it is still returning on another thread.
  ~token_waiter() {
    state_->remove_callback(*this);
    state_->unref();
  }

  bool withdraw() noexcept override {
    bool was_started = false;
    if (!take_claim(withdrawn, was_started) || !was_started) return false;
    this->destroy();
    return true;
  }

  static void start(std::unique_ptr<token_waiter> waiter) {
    // Out of memory here, the waiter and its handler are destroyed on the
    // way out: nothing refers to them yet.
    auto slot = boost::asio::get_associated_cancellation_slot(waiter->handler_);
    if (slot.is_connected()) slot.template emplace<cancel_handler>(waiter.get());
    auto* self = waiter.release();  // freed by its completion
    // A context that is shutting down ends the wait unstarted, as it ends
    // the operations it withdraws.
    if (!self->service_->add(*self)) {
      self->destroy();
      return;
    }
    self->state_->add_callback(*self);
    const unsigned before = self->state_bits_.fetch_or(started, std::memory_order_acq_rel);
    if ((before & claimed) != 0) self->end(before);
  }

 private:
  // state_bits_: which party claimed the ending (at most one of the first
  // three is set), and whether start() is done with the waiter.
  static constexpr unsigned by_token = 1;
  static constexpr unsigned by_slot = 2;
  static constexpr unsigned withdrawn = 4;
  static constexpr unsigned claimed = by_token | by_slot | withdrawn;
  static constexpr unsigned started = 8;

  struct cancel_handler {
    explicit cancel_handler(token_waiter* target) noexcept : waiter(target) {}
    token_waiter* waiter;
    void operator()(boost::asio::cancellation_type_t type) const noexcept {
      if (type != boost::asio::cancellation_type::none) waiter->claim(by_slot);
    }
  };

  // True when `party` is the first to claim the ending; `was_started` then
  // says whether start() was done (if not, start() ends the wait).
  bool take_claim(unsigned party, bool& was_started) noexcept {
    unsigned before = state_bits_.load(std::memory_order_relaxed);
    do {
      if ((before & claimed) != 0) return false;
    } while (!state_bits_.compare_exchange_weak(before, before | party, std::memory_order_acq_rel,
                                                std::memory_order_relaxed));
    was_started = (before & started) != 0;
    return true;
  }

  void claim(unsigned party) noexcept {
    bool was_started = false;
    if (take_claim(party, was_started) && was_started) end(party);
  }

  // By the party that claimed the ending, or by start() for one claimed
  // before it was done. A withdrawn waiter's post finds the shutdown under
  // way and destroys it.
  void end(unsigned bits) noexcept {
    if ((bits & by_slot) != 0) error_ = boost::system::error_code(make_error_code(errc::cancelled));
    this->post_or_destroy();
  }

  std::tuple<boost::system::error_code> upcall_arguments() const noexcept { return {error_}; }

  cancel_state* state_;
  std::atomic<unsigned> state_bits_{0};
  boost::system::error_code error_;
};

}  // namespace detail

// Completes with an empty error code once `token` is cancelled (at once,
// through the executor, if it already is), or with weft::errc::cancelled if
// the wait itself is cancelled through the handler's cancellation slot.
// A token that can never be cancelled throws std::logic_error.
template <class CompletionToken = boost::asio::deferred_t>
auto async_wait(const cancel_token& token, CompletionToken&& completion_token = {}) {
  if (!token.can_be_cancelled()) {
    throw std::logic_error(
        "weft::async_wait(cancel_token): this token can never be cancelled (default-constructed), "
        "so the wait would never end");
  }
  // The token travels by value: a deferred operation may be launched after
  // every other reference to the token's state is gone.
  return boost::asio::async_initiate<CompletionToken, void(boost::system::error_code)>(
      [](auto handler, const cancel_token& waited_on) {
        using waiter_type = detail::token_waiter<decltype(handler)>;
        waiter_type::start(std::make_unique<waiter_type>(std::move(handler), detail::state_of(waited_on)));
      },
      completion_token, token);
}

// A source that is cancelled (errc::cancelled) when `slot` is emitted with
// any cancellation type. It installs a handler into the slot, replacing the
// one there (an Asio slot holds one handler); the source stays valid after
// the slot is cleared or its signal destroyed.
[[nodiscard]] inline cancel_source cancel_source_for(boost::asio::cancellation_slot slot) {
  cancel_source source;
  if (slot.is_connected()) {
    struct forward_cancel {
      explicit forward_cancel(cancel_source target) noexcept : source(std::move(target)) {}
      cancel_source source;
      void operator()(boost::asio::cancellation_type_t type) {
        if (type != boost::asio::cancellation_type::none) source.cancel();
      }
    };
    slot.template emplace<forward_cancel>(forward_cancel{source});
  }
  return source;
}

// Emits an Asio cancellation signal, on `executor`, when a weft token is
// cancelled. Bind slot() to an Asio operation's handler:
//
//   weft::cancellation_bridge bridge{request_token, co_await asio::this_coro::executor};
//   co_await socket.async_read_some(buffer,
//       asio::bind_cancellation_slot(bridge.slot(), asio::use_awaitable));
//
// The bridge may be destroyed at any time; a pending emission then finds the
// signal alive (it is shared) and does nothing harmful.
//
// The executor must be the one that runs the operations bound to the
// slot, serially: the coroutine's strand, or a context run by one thread.
// An emission then never runs while an operation binds itself to the slot
// (cancellation_signal is not thread-safe), but one that runs while
// nothing is bound is lost: a token cancelled while the coroutine waited
// on something else, not bound to the slot, emitted into an empty slot,
// and the operation bound next ran to its end. So slot(), asked once the
// token is cancelled, posts one more emission, which runs after the
// operation the slot is then bound to has started: every operation bound
// through the bridge after the cancellation is cancelled (a last write
// after it needs a slot of its own).
template <class Executor>
class cancellation_bridge {
 public:
  cancellation_bridge(
      const cancel_token& token, Executor executor,
      boost::asio::cancellation_type_t type = boost::asio::cancellation_type::terminal)
      : shared_(std::make_shared<shared>()),
        token_(token),
        emission_{shared_, std::move(executor), type},
        link_(token, emission_) {}

  cancellation_bridge(const cancellation_bridge&) = delete;
  cancellation_bridge& operator=(const cancellation_bridge&) = delete;

  [[nodiscard]] boost::asio::cancellation_slot slot() {
    if (token_.cancelled()) emission_();
    return shared_->signal.slot();
  }

 private:
  struct shared {
    boost::asio::cancellation_signal signal;
  };

  struct emit_later {
    std::shared_ptr<shared> target;
    Executor executor;
    boost::asio::cancellation_type_t type;
    void operator()() noexcept {
      boost::asio::post(executor, [target = target, type = type] { target->signal.emit(type); });
    }
  };

  std::shared_ptr<shared> shared_;
  cancel_token token_;
  emit_later emission_;
  cancel_callback<emit_later> link_;
};

template <class Executor>
cancellation_bridge(const cancel_token&, Executor) -> cancellation_bridge<Executor>;

}  // namespace weft
