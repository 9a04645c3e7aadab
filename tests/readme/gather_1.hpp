// SPDX-License-Identifier: BSL-1.0
// README.md, gather: statements inside a handler.
#pragma once

#include <chrono>
#include <vector>

using namespace std::chrono_literals;

struct account {};
struct order_history {};
struct preferences_record {};
struct user_service {
  account get(int, const weft::cancel_token&) { return {}; }
};
struct order_service {
  order_history list(int, const weft::cancel_token&) { return {}; }
};
struct preference_store {
  preferences_record load(int) { return {}; }
};
inline user_service users;
inline order_service orders;
inline preference_store preferences;
inline const weft::cancel_token request;
inline const int id = 0;

struct image {};
struct thumbnail {};
inline thumbnail make_thumbnail(const image&) { return {}; }
inline std::vector<image> images;

struct shard {
  void compact(const weft::cancel_token&) {}
};
inline std::vector<shard> shards;

#define WEFT_README_IN_FUNCTION
