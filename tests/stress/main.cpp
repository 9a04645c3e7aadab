// SPDX-License-Identifier: BSL-1.0
// doctest's main for weft_stress: takes --seed N (or --seed=N) and
// --scale N (or --scale=N), passes every other argument to doctest, and
// prints the seed at the start and again when a test fails, so a failure can
// be replayed with the same seed. The environment variables WEFT_TEST_SEED
// and WEFT_TEST_SCALE do the same when the arguments cannot be given (ctest).
// doctest itself is compiled in ../doctest_runtime.cpp.
#include <doctest/doctest.h>

#include <charconv>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string_view>
#include <vector>

#include "seed.hpp"

namespace {

std::uint64_t g_seed = 0;
std::uint64_t g_scale = 1;

bool parse_u64(std::string_view text, std::uint64_t& out) {
  auto const* first = text.data();
  auto const* last = text.data() + text.size();
  auto [ptr, ec] = std::from_chars(first, last, out);
  return ec == std::errc{} && ptr == last && first != last;
}

std::uint64_t random_seed() {
  std::random_device rd;
  return (std::uint64_t{rd()} << 32) ^ std::uint64_t{rd()};
}

// Handles "--name N" and "--name=N". Returns true and advances i when
// argv[i] is the option; exits with a message when its value is bad.
bool take_option(int argc, char** argv, int& i, std::string_view name, std::uint64_t& out) {
  std::string_view arg = argv[i];
  std::string_view value;
  if (arg == name) {
    if (i + 1 >= argc) {
      std::fprintf(stderr, "weft_stress: %s needs a value\n", argv[i]);
      std::exit(2);
    }
    value = argv[++i];
  } else if (arg.size() > name.size() && arg.substr(0, name.size()) == name &&
             arg[name.size()] == '=') {
    value = arg.substr(name.size() + 1);
  } else {
    return false;
  }
  if (!parse_u64(value, out)) {
    std::fprintf(stderr, "weft_stress: %.*s wants an unsigned integer, got '%.*s'\n",
                 static_cast<int>(name.size()), name.data(), static_cast<int>(value.size()),
                 value.data());
    std::exit(2);
  }
  return true;
}

// Reads an unsigned integer from an environment variable, if it is set.
bool from_environment(char const* variable, std::uint64_t& out) {
  if (char const* text = std::getenv(variable); text != nullptr && *text != '\0') {
    if (!parse_u64(text, out)) {
      std::fprintf(stderr, "weft_stress: %s wants an unsigned integer, got '%s'\n", variable, text);
      std::exit(2);
    }
    return true;
  }
  return false;
}

// True for the doctest options that print something and run no test
// (--list-test-cases and friends): doctest_discover_tests parses that output,
// so nothing else may be printed then.
bool is_query(std::string_view arg) {
  while (!arg.empty() && arg.front() == '-') arg.remove_prefix(1);
  if (arg.substr(0, 3) == "dt-") arg.remove_prefix(3);
  arg = arg.substr(0, arg.find('='));
  for (std::string_view query :
       {"list-test-cases", "ltc", "list-test-suites", "lts", "list-reporters", "lr", "help", "h",
        "?", "version", "v", "count", "c"}) {
    if (arg == query) return true;
  }
  return false;
}

}  // namespace

namespace weft_test {
std::uint64_t seed() { return g_seed; }
std::uint64_t scale() { return g_scale; }
}  // namespace weft_test

int main(int argc, char** argv) {
  bool seed_given = from_environment("WEFT_TEST_SEED", g_seed);
  from_environment("WEFT_TEST_SCALE", g_scale);

  std::vector<char*> rest;
  rest.push_back(argv[0]);
  for (int i = 1; i < argc; ++i) {
    if (take_option(argc, argv, i, "--seed", g_seed)) {
      seed_given = true;
    } else if (take_option(argc, argv, i, "--scale", g_scale)) {
      continue;
    } else {
      rest.push_back(argv[i]);
    }
  }
  if (!seed_given) g_seed = random_seed();
  if (g_scale == 0) g_scale = 1;

  doctest::Context context;
  context.applyCommandLine(static_cast<int>(rest.size()), rest.data());

  bool querying = false;
  for (std::size_t i = 1; i < rest.size(); ++i) querying = querying || is_query(rest[i]);
  if (!querying) {
    std::printf("[weft_stress] seed %llu, scale %llu (replay: --seed %llu)\n",
                static_cast<unsigned long long>(g_seed), static_cast<unsigned long long>(g_scale),
                static_cast<unsigned long long>(g_seed));
    std::fflush(stdout);
  }

  int const result = context.run();
  if (result != 0 && !querying) {
    std::printf("[weft_stress] FAILED with seed %llu; replay with --seed %llu\n",
                static_cast<unsigned long long>(g_seed), static_cast<unsigned long long>(g_seed));
  }
  return result;
}
