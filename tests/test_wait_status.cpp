// SPDX-License-Identifier: BSL-1.0
// Tests for weft/wait_status.hpp: wait_status, errc, the error category, and
// their equivalence with the standard error conditions.
#include <weft/wait_status.hpp>

#include <doctest/doctest.h>

#include <cstring>
#include <iterator>
#include <ostream>  // doctest prints std::error_code through operator<<
#include <set>
#include <string>
#include <system_error>
#include <type_traits>

namespace {

constexpr weft::errc all_errcs[] = {weft::errc::cancelled, weft::errc::timeout, weft::errc::closed,
                                    weft::errc::deadline_exceeded};
constexpr weft::wait_status all_statuses[] = {weft::wait_status::ok, weft::wait_status::cancelled,
                                              weft::wait_status::timeout, weft::wait_status::closed};

}  // namespace

TEST_CASE("weft::errc converts implicitly to a std::error_code in the weft category" * doctest::timeout(30)) {
  static_assert(std::is_error_code_enum_v<weft::errc>);
  for (const auto code : all_errcs) {
    const std::error_code converted = code;
    CHECK(converted);
    CHECK(converted == code);
    CHECK(converted == weft::make_error_code(code));
    CHECK(converted.value() == static_cast<int>(code));
    CHECK(&converted.category() == &weft::error_category());
  }
}

TEST_CASE("the weft error category is one object named weft" * doctest::timeout(30)) {
  CHECK(&weft::error_category() == &weft::error_category());
  CHECK(std::string(weft::error_category().name()) == "weft");
  CHECK(weft::error_category() != std::generic_category());
  CHECK(weft::error_category() != std::system_category());
}

TEST_CASE("every weft error has its own non-empty message" * doctest::timeout(30)) {
  std::set<std::string> messages;
  for (const auto code : all_errcs) {
    const auto message = weft::make_error_code(code).message();
    CHECK_FALSE(message.empty());
    messages.insert(message);
  }
  CHECK(messages.size() == std::size(all_errcs));
  // A value weft does not define still gets a message rather than garbage.
  CHECK_FALSE(weft::error_category().message(0).empty());
  CHECK_FALSE(weft::error_category().message(999).empty());
}

TEST_CASE("cancelled is equivalent to std::errc::operation_canceled" * doctest::timeout(30)) {
  const std::error_code code = weft::errc::cancelled;
  CHECK(code == std::errc::operation_canceled);
  CHECK(code != std::errc::timed_out);
  CHECK(code.default_error_condition() == std::errc::operation_canceled);
}

TEST_CASE("timeout and deadline_exceeded are equivalent to std::errc::timed_out" * doctest::timeout(30)) {
  const std::error_code timeout = weft::errc::timeout;
  const std::error_code deadline = weft::errc::deadline_exceeded;
  CHECK(timeout == std::errc::timed_out);
  CHECK(deadline == std::errc::timed_out);
  CHECK(timeout != std::errc::operation_canceled);
  CHECK(deadline != std::errc::operation_canceled);
  // Equivalent to the same condition, yet distinct codes.
  CHECK(timeout != deadline);
}

TEST_CASE("closed is equivalent to neither cancellation nor timeout" * doctest::timeout(30)) {
  const std::error_code closed = weft::errc::closed;
  CHECK(closed != std::errc::operation_canceled);
  CHECK(closed != std::errc::timed_out);
  CHECK(closed.default_error_condition().category() == weft::error_category());
}

TEST_CASE("distinct weft codes compare unequal to each other and to std codes with the same value" *
          doctest::timeout(30)) {
  for (const auto a : all_errcs) {
    for (const auto b : all_errcs) {
      CHECK((weft::make_error_code(a) == weft::make_error_code(b)) == (a == b));
    }
    CHECK(weft::make_error_code(a) != std::error_code(static_cast<int>(a), std::generic_category()));
  }
}

TEST_CASE("to_error_code maps ok to no error and every other status to its errc" * doctest::timeout(30)) {
  CHECK_FALSE(weft::to_error_code(weft::wait_status::ok));
  CHECK(weft::to_error_code(weft::wait_status::ok) == std::error_code{});
  CHECK(weft::to_error_code(weft::wait_status::cancelled) == weft::errc::cancelled);
  CHECK(weft::to_error_code(weft::wait_status::timeout) == weft::errc::timeout);
  CHECK(weft::to_error_code(weft::wait_status::closed) == weft::errc::closed);

  CHECK(weft::to_error_code(weft::wait_status::cancelled) == std::errc::operation_canceled);
  CHECK(weft::to_error_code(weft::wait_status::timeout) == std::errc::timed_out);
  for (const auto status : all_statuses) {
    if (status == weft::wait_status::ok) continue;
    CHECK(&weft::to_error_code(status).category() == &weft::error_category());
  }
}

TEST_CASE("to_string names every wait_status" * doctest::timeout(30)) {
  CHECK(std::string(weft::to_string(weft::wait_status::ok)) == "ok");
  CHECK(std::string(weft::to_string(weft::wait_status::cancelled)) == "cancelled");
  CHECK(std::string(weft::to_string(weft::wait_status::timeout)) == "timeout");
  CHECK(std::string(weft::to_string(weft::wait_status::closed)) == "closed");
  std::set<std::string> names;
  for (const auto status : all_statuses) names.insert(weft::to_string(status));
  CHECK(names.size() == std::size(all_statuses));
  CHECK(std::strlen(weft::to_string(static_cast<weft::wait_status>(200))) > 0);
}

TEST_CASE("a weft error code travels in a std::system_error" * doctest::timeout(30)) {
  try {
    throw std::system_error(weft::errc::deadline_exceeded);
  } catch (const std::system_error& error) {
    CHECK(error.code() == weft::errc::deadline_exceeded);
    CHECK(error.code() == std::errc::timed_out);
    CHECK(std::string(error.what()).find(weft::make_error_code(weft::errc::deadline_exceeded).message()) !=
          std::string::npos);
  }
}

TEST_CASE("wait_status and errc are usable in constant expressions" * doctest::timeout(30)) {
  constexpr auto status = weft::wait_status::timeout;
  static_assert(status != weft::wait_status::ok);
  static_assert(static_cast<int>(weft::errc::cancelled) != 0, "errc values must not collide with 'no error'");
  CHECK(status == weft::wait_status::timeout);
}
