// SPDX-License-Identifier: BSL-1.0
// README.md, pipeline: four stages over a channel of raw lines.
#pragma once

#include <chrono>
#include <optional>
#include <string>
#include <vector>

using namespace std::chrono_literals;

struct event {};
inline weft::channel<std::string> incoming{64};
inline std::optional<event> parse(std::string) { return event{}; }
inline event enrich(event e) { return e; }
inline void write_batch(std::vector<event>) {}
inline const weft::cancel_token request_token;

#define WEFT_README_IN_FUNCTION
