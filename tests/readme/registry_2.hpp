// SPDX-License-Identifier: BSL-1.0
// README.md, registry, second block: a doctest case that checks for leaks.
#pragma once

struct http_request {};
inline const http_request request;
inline void handle(const http_request&) {}
