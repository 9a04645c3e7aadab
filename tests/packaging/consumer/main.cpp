// SPDX-License-Identifier: BSL-1.0
// Consumer of weft (installed or through add_subdirectory): uses a cancel
// token with a deadline, a semaphore and a wait group through the umbrella
// header, as an application would.
#include <weft/weft.hpp>

#include <chrono>
#include <cstdio>
#include <thread>

int main() {
  weft::semaphore slots{2};
  weft::wait_group done;
  done.add(2);
  std::thread first([&] {
    auto slot = slots.acquire_permit();
    done.done();
  });
  std::thread second([&] {
    auto slot = slots.acquire_permit();
    done.done();
  });
  done.wait();
  first.join();
  second.join();

  const weft::cancel_source request = weft::with_timeout(weft::cancel_token{}, std::chrono::milliseconds(1));
  request.token().wait();

  std::printf("weft %d.%d.%d: %td permits free, deadline cause: %s\n", WEFT_VERSION_MAJOR, WEFT_VERSION_MINOR,
              WEFT_VERSION_PATCH, slots.available(), request.token().cause().code().message().c_str());
  return slots.available() == 2 && request.token().cause().is_deadline() ? 0 : 1;
}
