// SPDX-License-Identifier: BSL-1.0
// weft::resource_pool pooling libpq connections to a real PostgreSQL server.
//
// CTest runs these inside the weft_postgres fixture (tests/CMakeLists.txt):
// scripts/postgres.sh starts a throwaway server and its connection string
// arrives in WEFT_PG_CONNINFO. Without it, or with the server down, every
// case fails and says how to install and start PostgreSQL; none is skipped.
//
// Each case gives its pool's connections an application_name of its own
// (weft_pool_test_<pid>_<case>), so what the server reports in
// pg_stat_activity can be compared with the pool's stats() without counting
// anyone else's connections: ctest runs cases in parallel, and the admin
// connection that asks has a name of its own too.
//
// libpq is not built with the sanitizers. A PGconn is used by one thread at
// a time: the pool hands a connection from one lease to the next under its
// mutex and semaphore, and that hand-off is what ThreadSanitizer checks.
#include <weft/manual_clock.hpp>
#include <weft/resource_pool.hpp>
#include <weft/task_group.hpp>
#include <weft/worker_pool.hpp>

#include <doctest/doctest.h>
#include <libpq-fe.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdlib>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "../support.hpp"

namespace {

using namespace std::chrono_literals;

constexpr char how_to_run[] =
    "Run these tests through ctest: its weft_postgres fixture starts a throwaway server with "
    "scripts/postgres.sh and sets WEFT_PG_CONNINFO. That needs the PostgreSQL server and libpq:\n"
    "  apt-get install -y postgresql libpq-dev        # Debian/Ubuntu, as root\n"
    "Or start a server by hand and point the tests at it:\n"
    "  scripts/postgres.sh start /tmp/weft-pg 55432   # prints the connection string\n"
    "  WEFT_PG_CONNINFO='host=127.0.0.1 port=55432 user=postgres dbname=postgres' "
    "build/dev/tests/weft_postgres_tests\n"
    "  scripts/postgres.sh stop /tmp/weft-pg";

// A libpq connection: move-only, closed when destroyed.
class pg_connection {
 public:
  pg_connection() noexcept = default;

  // Connects with `conninfo` (key=value or a postgresql:// URI) and the given
  // application_name. Throws std::runtime_error with libpq's message.
  pg_connection(const std::string& conninfo, const std::string& application_name) {
    const char* const keys[] = {"dbname", "application_name", "connect_timeout", nullptr};
    const char* const values[] = {conninfo.c_str(), application_name.c_str(), "10", nullptr};
    // expand_dbname: the first "dbname" is a whole connection string; the
    // keys after it add to it.
    conn_ = PQconnectdbParams(keys, values, /*expand_dbname=*/1);
    if (conn_ == nullptr) throw std::bad_alloc();
    if (PQstatus(conn_) != CONNECTION_OK) {
      std::string message = PQerrorMessage(conn_);
      close();
      throw std::runtime_error("cannot connect to PostgreSQL at '" + conninfo + "': " + message);
    }
  }

  pg_connection(pg_connection&& other) noexcept : conn_(std::exchange(other.conn_, nullptr)) {}
  pg_connection& operator=(pg_connection&& other) noexcept {
    if (this != &other) {
      close();
      conn_ = std::exchange(other.conn_, nullptr);
    }
    return *this;
  }
  pg_connection(const pg_connection&) = delete;
  pg_connection& operator=(const pg_connection&) = delete;
  ~pg_connection() { close(); }

  void close() noexcept {
    if (conn_ != nullptr) PQfinish(std::exchange(conn_, nullptr));
  }

  int backend_pid() const noexcept { return PQbackendPID(conn_); }

  // Runs `sql` with text parameters $1, $2, ... and returns the first column
  // of the first row ("" if there is none). Throws std::runtime_error.
  std::string query(const char* sql, std::initializer_list<std::string> params = {}) {
    std::vector<const char*> values;
    for (const auto& param : params) values.push_back(param.c_str());
    const result res{PQexecParams(conn_, sql, static_cast<int>(values.size()), nullptr,
                                  values.data(), nullptr, nullptr, 0)};
    const auto status = PQresultStatus(res.get());
    if (status != PGRES_TUPLES_OK && status != PGRES_COMMAND_OK) {
      throw std::runtime_error(std::string("query '") + sql + "' failed: " + PQerrorMessage(conn_));
    }
    if (PQntuples(res.get()) == 0 || PQnfields(res.get()) == 0) return {};
    return PQgetvalue(res.get(), 0, 0);
  }

  // The validate function: does the server still answer? One round trip.
  bool ping() noexcept {
    if (conn_ == nullptr || PQstatus(conn_) != CONNECTION_OK) return false;
    const result res{PQexec(conn_, "SELECT 1")};
    return PQresultStatus(res.get()) == PGRES_TUPLES_OK;
  }

 private:
  struct clear_result {
    void operator()(PGresult* r) const noexcept { PQclear(r); }
  };
  using result = std::unique_ptr<PGresult, clear_result>;

  PGconn* conn_ = nullptr;
};

std::string conninfo() {
  const char* value = std::getenv("WEFT_PG_CONNINFO");
  if (value == nullptr || *value == '\0') {
    FAIL("WEFT_PG_CONNINFO is not set, so there is no PostgreSQL server to test against.\n"
         << how_to_run);
  }
  return value;
}

std::string application_name(const char* which) {
  return "weft_pool_test_" + std::to_string(::getpid()) + "_" + which;
}

// A connection for the test's own questions to the server; fails the test,
// saying what to do, when there is no server.
pg_connection connect_or_fail(const std::string& name) {
  const std::string info = conninfo();
  try {
    return pg_connection{info, name};
  } catch (const std::exception& e) {
    FAIL(std::string(e.what()) << "Is the test server running? " << how_to_run);
  }
  return {};
}

// How many connections the server has for `name`.
std::size_t server_count(pg_connection& admin, const std::string& name) {
  return std::stoul(
      admin.query("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", {name}));
}

// The backends of the connections a pool has closed, so that the test can
// wait for them to be gone. PostgreSQL drops a backend from pg_stat_activity
// when the backend process exits, after the client has hung up; PQfinish
// does not wait for that, so a connection the pool has just closed may still
// be counted for a moment.
class closed_backends {
 public:
  // The pool's close function: remembers the backend, then hangs up.
  auto closer() {
    return [this](pg_connection& c) noexcept {
      {
        std::lock_guard lock(mutex_);
        pids_.push_back(c.backend_pid());
      }
      c.close();
    };
  }

  // Waits until every backend closed so far has exited, then counts the
  // server's connections for `name`. pg_terminate_backend with a timeout
  // (PostgreSQL 14 and later) returns once the backend has exited; for one
  // that is already on its way out after the hang-up the signal changes
  // nothing. The application_name filter keeps it to this test's backends.
  std::size_t server_count_after_closes(pg_connection& admin, const std::string& name) {
    std::vector<int> pids;
    {
      std::lock_guard lock(mutex_);
      pids.swap(pids_);
    }
    for (const int pid : pids) {
      (void)admin.query(
          "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity WHERE pid = $1 AND application_name = $2",
          {std::to_string(pid), name});
    }
    return server_count(admin, name);
  }

 private:
  std::mutex mutex_;
  std::vector<int> pids_;
};

// Kills a backend as an administrator would. The timeout (PostgreSQL 14 and
// later) makes pg_terminate_backend wait until the backend has exited.
void terminate_backend(pg_connection& admin, int pid) {
  REQUIRE(admin.query("SELECT pg_terminate_backend($1, 10000)", {std::to_string(pid)}) == "t");
}

// The pool's functions, for connections named `name`.
auto opener(std::string name) {
  return [info = conninfo(), name = std::move(name)] { return pg_connection{info, name}; };
}
void close_connection(pg_connection& c) noexcept { c.close(); }
bool validate_connection(pg_connection& c) noexcept { return c.ping(); }

}  // namespace

TEST_CASE(
    "the server counts as many connections as the pool has open while it grows, idles and shrinks" *
    doctest::timeout(120)) {
  const auto name = application_name("grow");
  auto admin = connect_or_fail(application_name("grow_admin"));
  // A manual clock ages the idle connections without waiting.
  using pool_type = weft::basic_resource_pool<pg_connection, weft::manual_clock>;
  closed_backends closed;
  pool_type pool{{.max_open = 6, .max_idle = 6, .max_idle_time = 5min, .name = "pg grow"},
                 opener(name),
                 closed.closer(),
                 validate_connection};
  std::vector<pool_type::lease> leases;

  // Grows: each acquire with nothing idle opens a connection, and the server
  // has it (libpq returns once the backend is ready, and listed).
  for (std::size_t n = 1; n <= 4; ++n) {
    leases.push_back(pool.acquire());
    REQUIRE(leases.back());
    CHECK(pool.stats().open == n);
    CHECK(pool.stats().in_use == n);
    CHECK(server_count(admin, name) == n);
  }

  // Idles: returned connections stay open (max_idle 6) and are reused.
  leases.clear();
  auto stats = pool.stats();
  CHECK(stats.open == 4);
  CHECK(stats.idle == 4);
  CHECK(stats.in_use == 0);
  CHECK(server_count(admin, name) == 4);
  {
    auto again = pool.acquire();
    CHECK(again->query("SELECT 1") == "1");
    CHECK(pool.stats().open == 4);
    CHECK(server_count(admin, name) == 4);
  }

  // Shrinks: set_max_idle closes the idle connections above it at once.
  pool.set_max_idle(2);
  stats = pool.stats();
  CHECK(stats.open == 2);
  CHECK(stats.idle == 2);
  CHECK(stats.max_idle_closed == 2);
  CHECK(closed.server_count_after_closes(admin, name) == 2);

  // Grows again to a new max_open: two idle ones reused, one opened.
  pool.set_max_open(3);
  for (int i = 0; i < 3; ++i) leases.push_back(pool.acquire());
  CHECK(pool.stats().open == 3);
  CHECK(server_count(admin, name) == 3);
  CHECK(!pool.try_acquire());  // max_open 3, all in use

  // Shrinks while busy: lowering max_open interrupts nobody; the connections
  // above the limit close as they come back (max_idle follows max_open down).
  pool.set_max_open(1);
  CHECK(pool.stats().open == 3);
  CHECK(server_count(admin, name) == 3);
  leases[0].release();
  CHECK(pool.stats().open == 2);
  CHECK(closed.server_count_after_closes(admin, name) == 2);
  leases[1].release();
  CHECK(pool.stats().open == 1);
  CHECK(closed.server_count_after_closes(admin, name) == 1);
  leases.clear();  // the last one stays idle: max_idle is 1 now
  stats = pool.stats();
  CHECK(stats.open == 1);
  CHECK(stats.idle == 1);
  CHECK(server_count(admin, name) == 1);

  // Idles too long: close_expired closes it.
  weft::manual_clock::advance(5min);
  CHECK(pool.close_expired() == 1);
  stats = pool.stats();
  CHECK(stats.open == 0);
  CHECK(stats.max_idle_time_closed == 1);
  CHECK(stats.validation_failures == 0);
  CHECK(stats.open_failures == 0);
  CHECK(closed.server_count_after_closes(admin, name) == 0);
}

TEST_CASE("a connection the server killed while it was idle is detected on checkout and replaced" *
          doctest::timeout(120)) {
  const auto name = application_name("killed_idle");
  auto admin = connect_or_fail(application_name("killed_idle_admin"));
  weft::resource_pool<pg_connection> pool{{.max_open = 2, .max_idle = 2, .name = "pg killed idle"},
                                          opener(name),
                                          close_connection,
                                          validate_connection};

  int first_pid = 0;
  {
    auto conn = pool.acquire();
    first_pid = conn->backend_pid();
    CHECK(conn->query("SELECT pg_backend_pid()") == std::to_string(first_pid));
  }
  CHECK(pool.stats().idle == 1);

  terminate_backend(admin, first_pid);
  CHECK(server_count(admin, name) == 0);
  CHECK(pool.stats().open == 1);  // the pool cannot know yet

  // The checkout's validate finds it dead; the pool closes it and opens another.
  auto conn = pool.acquire();
  REQUIRE(conn);
  const auto stats = pool.stats();
  CHECK(stats.validation_failures == 1);
  CHECK(stats.open == 1);
  CHECK(stats.in_use == 1);
  CHECK(stats.open_failures == 0);
  CHECK(conn->backend_pid() != first_pid);
  CHECK(conn->query("SELECT pg_backend_pid()") == std::to_string(conn->backend_pid()));
  CHECK(server_count(admin, name) == 1);
}

TEST_CASE(
    "a connection the server killed while it was leased fails its query, and discard() replaces "
    "it" *
    doctest::timeout(120)) {
  const auto name = application_name("killed_leased");
  auto admin = connect_or_fail(application_name("killed_leased_admin"));
  weft::resource_pool<pg_connection> pool{
      {.max_open = 1, .max_idle = 1, .name = "pg killed leased"},
      opener(name),
      close_connection,
      validate_connection};

  auto conn = pool.acquire();
  const int first_pid = conn->backend_pid();
  terminate_backend(admin, first_pid);
  CHECK_THROWS_AS(conn->query("SELECT 1"), std::runtime_error);
  conn.discard();  // broken: close it rather than return it
  CHECK(!conn);
  auto stats = pool.stats();
  CHECK(stats.open == 0);
  CHECK(stats.in_use == 0);

  // Its slot is free again (max_open is 1): the next acquire opens a new one.
  auto next = pool.acquire();
  CHECK(next->backend_pid() != first_pid);
  CHECK(next->query("SELECT 1") == "1");
  stats = pool.stats();
  CHECK(stats.open == 1);
  CHECK(stats.validation_failures == 0);
  CHECK(server_count(admin, name) == 1);
}

TEST_CASE(
    "200 concurrent queries through a pool of max_open 10 all succeed, and some wait for a "
    "connection" *
    doctest::timeout(weft_test::under_sanitizer ? 240 : 120)) {
  constexpr int queries = 200;
  constexpr std::size_t max_open = 10;
  const auto name = application_name("concurrent");
  auto admin = connect_or_fail(application_name("concurrent_admin"));
  weft::resource_pool<pg_connection> pool{
      {.max_open = max_open, .max_idle = max_open, .name = "pg concurrent"},
      opener(name),
      close_connection,
      validate_connection};

  // Every connection is held here first, so the queries must queue: the test
  // does not rely on timing to make them wait.
  std::vector<weft::resource_pool<pg_connection>::lease> held;
  for (std::size_t i = 0; i < max_open; ++i) held.push_back(pool.acquire());
  CHECK(pool.stats().open == max_open);
  CHECK(server_count(admin, name) == max_open);

  // The server's count, sampled on the admin connection throughout.
  std::atomic<bool> done{false};
  std::size_t peak_on_server = 0;
  std::size_t peak_open = 0;
  int samples = 0;
  std::string monitor_error;
  std::thread monitor{[&] {
    try {
      do {
        peak_on_server = std::max(peak_on_server, server_count(admin, name));
        peak_open = std::max(peak_open, pool.stats().open);
        ++samples;
      } while (!done.load(std::memory_order_acquire));
    } catch (const std::exception& e) {
      monitor_error = e.what();
    }
  }};

  std::atomic<int> succeeded{0};
  {
    // One thread per query: all 200 are in flight at once.
    weft::worker_pool clients{{.workers = queries, .name = "pg clients"}};
    weft::task_group group{clients.executor()};
    for (int i = 0; i < queries; ++i) {
      group.go([&pool, &succeeded, i] {
        auto conn = pool.acquire();
        // pg_sleep is the query's own work, in the server (the scenario:
        // queries that take a while hold their connections), not a wait.
        const auto doubled =
            conn->query("SELECT $1::int * 2, pg_sleep(0.001)", {std::to_string(i)});
        if (doubled == std::to_string(2 * i)) succeeded.fetch_add(1, std::memory_order_relaxed);
      });
    }
    // Once a query is queued for a connection, they go back and the queries
    // run.
    weft_test::spin_until([&pool] { return pool.stats().waiting > 0; });
    held.clear();
    group.wait();  // rethrows a failed query's exception
  }
  done.store(true, std::memory_order_release);
  monitor.join();

  CHECK(monitor_error == "");
  CHECK(succeeded.load() == queries);
  const auto stats = pool.stats();
  CHECK(stats.wait_count > 0);
  CHECK(stats.wait_duration > std::chrono::nanoseconds::zero());
  CHECK(stats.open <= max_open);
  CHECK(stats.in_use == 0);
  CHECK(stats.waiting == 0);
  CHECK(stats.open_failures == 0);
  CHECK(stats.validation_failures == 0);
  CHECK(samples > 0);
  CHECK(peak_on_server <= max_open);
  CHECK(peak_open <= max_open);
  CHECK(server_count(admin, name) == stats.open);
  MESSAGE("wait_count " << stats.wait_count << ", waited "
                        << std::chrono::duration<double, std::milli>(stats.wait_duration).count()
                        << " ms in all, " << samples << " samples of pg_stat_activity, peak "
                        << peak_on_server);
}
