// SPDX-License-Identifier: BSL-1.0
// The one place weft includes moodycamel's ConcurrentQueue, found under the
// paths distributions use: <concurrentqueue/concurrentqueue.h> (Debian's
// libconcurrentqueue-dev), <concurrentqueue/moodycamel/concurrentqueue.h>
// (upstream's CMake install), or <concurrentqueue.h> (a source tree on the
// include path).
#pragma once

#if __has_include(<concurrentqueue/concurrentqueue.h>)
#include <concurrentqueue/concurrentqueue.h>
#elif __has_include(<concurrentqueue/moodycamel/concurrentqueue.h>)
#include <concurrentqueue/moodycamel/concurrentqueue.h>
#elif __has_include(<concurrentqueue.h>)
#include <concurrentqueue.h>
#else
#error "weft needs moodycamel's concurrentqueue: on Debian, apt-get install libconcurrentqueue-dev"
#endif

namespace weft::detail {

template <class T>
using concurrent_queue = moodycamel::ConcurrentQueue<T>;

}  // namespace weft::detail
