// SPDX-License-Identifier: BSL-1.0
// weft::wait_status and weft::errc: how a wait ended, as a value.
//
// Every waiting operation in weft reports its normal outcomes as values, never
// as exceptions: a blocking call returns a wait_status, an async call completes
// with the matching error code. The Go analogue is the error a channel
// operation or `ctx.Err()` gives back (`context.Canceled`,
// `context.DeadlineExceeded`, a closed channel).
//
//   wait_status  errc                 meaning
//   ok           (no error)           the wait got what it waited for
//   cancelled    errc::cancelled      a cancel_token or an Asio cancellation slot stopped it
//   timeout      errc::timeout        its deadline passed (including a token's deadline)
//   closed       errc::closed         the object waited on was closed
//
// errc::deadline_exceeded is the cause of a token cancelled by its own
// deadline (cancel_token::cause()); a wait stopped by such a token reports
// wait_status::timeout.
//
// Thread safety: everything here is immutable or a pure function.
#pragma once

#include <weft/detail/never_destroyed.hpp>

#include <string>
#include <system_error>
#include <type_traits>

namespace weft {

enum class wait_status : unsigned char { ok, cancelled, timeout, closed };

enum class errc : int {
  cancelled = 1,
  timeout,
  closed,
  deadline_exceeded,
};

namespace detail {

class error_category_impl final : public std::error_category {
 public:
  const char* name() const noexcept override { return "weft"; }

  std::string message(int code) const override {
    switch (static_cast<errc>(code)) {
      case errc::cancelled: return "operation cancelled";
      case errc::timeout: return "operation timed out";
      case errc::closed: return "closed";
      case errc::deadline_exceeded: return "deadline exceeded";
    }
    return "unknown weft error";
  }

  std::error_condition default_error_condition(int code) const noexcept override {
    switch (static_cast<errc>(code)) {
      case errc::cancelled: return std::errc::operation_canceled;
      case errc::timeout:
      case errc::deadline_exceeded: return std::errc::timed_out;
      case errc::closed: break;
    }
    return {code, *this};
  }
};

}  // namespace detail

// The category of weft's error codes. One object for the whole program (an
// inline function's static), so codes compare equal across translation
// units. It is never destroyed: a pool made before its first use joins its
// workers after the exit has destroyed the statics made later, and their
// tasks may still compare or print codes.
inline const std::error_category& error_category() noexcept {
  static detail::never_destroyed<const detail::error_category_impl> category;
  return category.get();
}

inline std::error_code make_error_code(errc code) noexcept {
  return {static_cast<int>(code), error_category()};
}

// ok maps to the empty error code; the others to their errc.
inline std::error_code to_error_code(wait_status status) noexcept {
  switch (status) {
    case wait_status::ok: return {};
    case wait_status::cancelled: return make_error_code(errc::cancelled);
    case wait_status::timeout: return make_error_code(errc::timeout);
    case wait_status::closed: return make_error_code(errc::closed);
  }
  return {};
}

inline const char* to_string(wait_status status) noexcept {
  switch (status) {
    case wait_status::ok: return "ok";
    case wait_status::cancelled: return "cancelled";
    case wait_status::timeout: return "timeout";
    case wait_status::closed: return "closed";
  }
  return "unknown";
}

}  // namespace weft

template <>
struct std::is_error_code_enum<weft::errc> : std::true_type {};
