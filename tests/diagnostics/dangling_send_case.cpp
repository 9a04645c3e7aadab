// SPDX-License-Identifier: BSL-1.0
// Compiled, not run, by the test select_dangling_send_warns: Clang must warn
// (-Wdangling) that this send case refers to a temporary that is gone by
// the time select runs (weft/select.hpp, WEFT_LIFETIMEBOUND).
#include <weft/select.hpp>

#include <string>

int main() {
  weft::channel<std::string> ch{1};
  auto dangling = weft::on_send(ch, std::string(40, 'x'));
  return weft::select(std::move(dangling)) ? 0 : 1;
}
