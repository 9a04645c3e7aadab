// SPDX-License-Identifier: BSL-1.0
// README.md, channel: a producer, consumers and selects, as statements.
#pragma once

#include <chrono>
#include <optional>

using namespace std::chrono_literals;

struct job {};
struct result {};
inline job next;
inline result out;
inline int sent = 0;
inline weft::channel<result> results{16};
inline const weft::cancel_token request_token;
inline void handle(job&) {}
inline void handle_one(std::optional<job>) {}
inline void idle() {}

#define WEFT_README_IN_FUNCTION
