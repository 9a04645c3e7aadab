// SPDX-License-Identifier: BSL-1.0
// Helpers shared by the tests of weft's Asio layer (they need Boost, which
// support.hpp does not).
#pragma once

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>

#include <thread>
#include <vector>

namespace weft_test {

// Runs an io_context on `count` threads until stop() (a work guard keeps it
// alive while nothing is queued).
class io_threads {
 public:
  io_threads(boost::asio::io_context& io, int count)
      : io_(io), guard_(boost::asio::make_work_guard(io)) {
    for (int i = 0; i < count; ++i) threads_.emplace_back([this] { io_.run(); });
  }
  io_threads(const io_threads&) = delete;
  io_threads& operator=(const io_threads&) = delete;
  ~io_threads() { stop(); }

  // Lets run() return once the queued work is done, and joins.
  void stop() {
    guard_.reset();
    for (auto& t : threads_) {
      if (t.joinable()) t.join();
    }
  }

 private:
  boost::asio::io_context& io_;
  boost::asio::executor_work_guard<boost::asio::io_context::executor_type> guard_;
  std::vector<std::thread> threads_;
};

}  // namespace weft_test
