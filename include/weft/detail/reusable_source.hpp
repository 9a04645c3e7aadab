// SPDX-License-Identifier: BSL-1.0
// detail::reusable_source: the cancel source and token of a run (a
// task_group, a fan-out) whose shared state is kept for the next run. A
// parentless run keeps the source of the run before when nothing touched
// it, so that most runs allocate no token state.
//
// Thread safety: renew() and release() are for the run's owner, before and
// after the run; token() and cancel() may be called from any task of the
// run in between.
#pragma once

#include <weft/cancel.hpp>

#include <exception>
#include <optional>

namespace weft::detail {

class reusable_source {
 public:
  // Before a run: a child of `parent`, or the source kept from the run
  // before when neither has a parent.
  void renew(const cancel_token& parent) {
    if (source_ && state_of(parent) == nullptr) return;
    token_ = cancel_token{};
    source_.reset();
    source_.emplace(parent.child());
    token_ = source_->token();
  }

  // After a run: lets go of the source unless nothing touched it (its
  // source and token hold a reference each; a task that kept a copy of the
  // token holds another).
  void release() noexcept {
    if (source_ && !state_of(token_)->pristine(2)) {
      token_ = cancel_token{};
      source_.reset();
    }
  }

  // Handed to the run's tasks by reference: a copy per task would be two
  // read-modify-writes on the token's count, a line every task shares.
  // Between renew() and release() it always has a state (a source's token
  // does), which the run's tasks may read directly.
  const cancel_token& token() const noexcept { return token_; }

  void cancel() noexcept { source_->cancel(); }
  void cancel(std::exception_ptr cause) noexcept { source_->cancel(std::move(cause)); }

 private:
  std::optional<cancel_source> source_;
  cancel_token token_;
};

}  // namespace weft::detail
