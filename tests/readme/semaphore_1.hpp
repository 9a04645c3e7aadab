// SPDX-License-Identifier: BSL-1.0
// README.md, semaphore, first block: a semaphore guarding a database.
#pragma once

inline void reply_busy() {}
inline void run_query() {}
