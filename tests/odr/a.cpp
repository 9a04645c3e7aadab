// SPDX-License-Identifier: BSL-1.0
// ODR check, translation unit A: includes every public header and uses the
// same weft types as tests/odr/b.cpp. Linking both into one program fails
// if a header defines a non-inline function or variable; running it fails if
// the two disagree about an object that must be unique in the program (the
// error category, the timer service behind deadlines).
#include <weft/asio.hpp>
#include <weft/weft.hpp>

#include <chrono>
#include <system_error>

const std::error_category* weft_odr_category_a() { return &weft::error_category(); }

bool weft_odr_semaphore_a(weft::semaphore& shared) {
  auto permit = shared.try_acquire_permit(1);
  return static_cast<bool>(permit);
}

bool weft_odr_deadline_a() {
  const weft::cancel_source source = weft::with_timeout(weft::cancel_token{}, std::chrono::milliseconds(1));
  return source.token().wait() == weft::wait_status::ok && source.token().cause().is_deadline();
}

int weft_odr_version_a() { return WEFT_VERSION; }
