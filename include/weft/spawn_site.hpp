// SPDX-License-Identifier: BSL-1.0
// weft::spawn_site: the line of the user's code that started a task.
//
// Standard analogue: std::source_location, which is what it holds where the
// compiler supports it. Clang 14 has no usable std::source_location (with
// libstdc++ 12 the header needs a builtin that arrived in Clang 15, and
// libc++ 14 has no header at all), so there the site comes from the
// __builtin_FILE / __builtin_FUNCTION / __builtin_LINE default arguments,
// which GCC and Clang both evaluate at the caller.
//
// Every weft call that starts a task takes a `spawn_site site =
// spawn_site::current()` last parameter, so the registry shows the line that
// called post() or go(), not a line inside weft. A caller that forwards a
// task on someone else's behalf passes its own caller's site along.
//
// Thread safety and cost: a value type of three words; the strings it points
// to are string literals with static storage, so a copy stays valid forever.
#pragma once

#if __has_include(<version>)
#include <version>
#endif
#if defined(__cpp_lib_source_location)
#include <source_location>
#endif

#include <cstdint>

namespace weft {

class spawn_site {
 public:
  // An unknown site: empty file and function, line 0.
  constexpr spawn_site() noexcept = default;

#if defined(__cpp_lib_source_location)
  static constexpr spawn_site current(std::source_location where = std::source_location::current()) noexcept {
    return spawn_site{where.file_name(), where.function_name(), where.line()};
  }
#else
  static constexpr spawn_site current(const char* file = __builtin_FILE(),
                                      const char* function = __builtin_FUNCTION(),
                                      std::uint_least32_t line = __builtin_LINE()) noexcept {
    return spawn_site{file, function, line};
  }
#endif

  constexpr const char* file() const noexcept { return file_; }
  constexpr const char* function() const noexcept { return function_; }
  constexpr std::uint_least32_t line() const noexcept { return line_; }
  constexpr bool known() const noexcept { return line_ != 0; }

 private:
  constexpr spawn_site(const char* file, const char* function, std::uint_least32_t line) noexcept
      : file_(file), function_(function), line_(line) {}

  const char* file_ = "";
  const char* function_ = "";
  std::uint_least32_t line_ = 0;
};

}  // namespace weft
