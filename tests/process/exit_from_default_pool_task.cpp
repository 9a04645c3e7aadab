// SPDX-License-Identifier: BSL-1.0
// std::exit called from a task of the default pool: the pool's exit
// handler shuts it down without joining the calling worker. The pool used
// to be a static whose destructor joined, from that worker: join() threw
// std::logic_error in a noexcept destructor, and the process aborted.
#include <weft/worker_pool.hpp>

#include <cstdlib>
#include <future>

int main() {
  weft::default_executor().post([] { std::exit(0); });
  std::promise<void>().get_future().wait();  // never ready: the task exits the process
}
