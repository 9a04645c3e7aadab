// SPDX-License-Identifier: BSL-1.0
// Share a few PostgreSQL connections (libpq) among many request threads with
// weft::resource_pool, the pool of Go's database/sql: checked before use,
// rolled back on return, replaced when broken, retired by age.
//
//   postgres_pool [CONNINFO]    e.g. "host=127.0.0.1 port=5432 user=app dbname=app"
//
// Without an argument it uses $WEFT_PG_CONNINFO (the tests set it), else
// libpq's defaults (PGHOST, PGPORT, PGUSER, ...).
//
// weft-example-needs: postgres
#include <weft/cancel.hpp>
#include <weft/resource_pool.hpp>

#include <libpq-fe.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace {

using namespace std::chrono_literals;

// A libpq connection, closed when destroyed. Move-only.
class pg_connection {
 public:
  explicit pg_connection(const char* conninfo) : conn_(PQconnectdb(conninfo)) {
    if (PQstatus(conn_) != CONNECTION_OK) {
      std::string message = PQerrorMessage(conn_);
      PQfinish(conn_);
      throw std::runtime_error("connect: " + message);
    }
  }
  pg_connection(pg_connection&& other) noexcept : conn_(std::exchange(other.conn_, nullptr)) {}
  pg_connection& operator=(pg_connection&&) = delete;
  ~pg_connection() { close(); }

  void close() noexcept {
    if (conn_ != nullptr) PQfinish(std::exchange(conn_, nullptr));
  }

  // One value from a one-parameter query; throws on error.
  std::string query(const char* sql, const std::string& param) {
    const char* values[] = {param.c_str()};
    PGresult* res = PQexecParams(conn_, sql, 1, nullptr, values, nullptr, nullptr, 0);
    const bool ok = PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1;
    std::string value = ok ? PQgetvalue(res, 0, 0) : PQerrorMessage(conn_);
    PQclear(res);
    if (!ok) throw std::runtime_error("query: " + value);
    return value;
  }

  // Checkout: does the server still answer? (A round trip; a busy service
  // may ping only connections that have idled a while.)
  bool healthy() noexcept {
    if (PQstatus(conn_) != CONNECTION_OK) return false;
    PGresult* res = PQexec(conn_, "SELECT 1");
    const bool ok = PQresultStatus(res) == PGRES_TUPLES_OK;
    PQclear(res);
    return ok;
  }

  // Return: never hand the next user a transaction someone left open.
  // False when the connection cannot be brought back (the pool closes it).
  bool reset() noexcept {
    if (PQtransactionStatus(conn_) == PQTRANS_IDLE) return true;
    PGresult* res = PQexec(conn_, "ROLLBACK");
    const bool ok = PQresultStatus(res) == PGRES_COMMAND_OK;
    PQclear(res);
    return ok;
  }

 private:
  PGconn* conn_;
};

}  // namespace

int main(int argc, char** argv) {
  const char* from_env = std::getenv("WEFT_PG_CONNINFO");
  const std::string conninfo = argc > 1 ? argv[1] : from_env != nullptr ? from_env : "";

  // Sizing. max_open bounds what this process may hold: the server accepts
  // max_connections (100 by default, a few reserved for superusers) from
  // every process of every service together, so give each process its
  // share. More connections than the server has cores seldom makes queries
  // faster; past that, requests are better off waiting here, where
  // wait_count and wait_duration show it. max_idle keeps enough open for
  // the steady load (each costs the server a backend process, megabytes),
  // so only bursts pay for new connections. max_lifetime spreads connections
  // again after a failover and caps a backend's memory growth;
  // max_idle_time lets a quiet service give connections back.
  weft::resource_pool<pg_connection> db{
      {.max_open = 8,
       .max_idle = 4,
       .max_lifetime = 30min,
       .max_idle_time = 5min,
       .name = "postgres"},
      [&] { return pg_connection{conninfo.c_str()}; },  // open
      [](pg_connection& c) { c.close(); },              // close
      [](pg_connection& c) { return c.healthy(); },     // validate, on checkout
      [](pg_connection& c) { return c.reset(); }};      // reset, on return

  try {
    (void)db.acquire()->query("SELECT $1::int", "1");  // is the database there at all?
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cannot use the database: %s\n", e.what());
    return 1;
  }

  // One request: a connection for at most 5 s, else "busy"; then a query.
  std::atomic<int> answered{0};
  std::atomic<int> busy{0};
  const auto handle = [&](int n) {
    const weft::cancel_source deadline = weft::with_timeout(weft::cancel_token{}, 5s);
    auto conn = db.acquire(deadline.token());  // throws if a new connection fails
    if (!conn) {
      busy.fetch_add(1);
      return;
    }
    try {
      if (conn->query("SELECT $1::int + 1", std::to_string(n)) == std::to_string(n + 1))
        answered.fetch_add(1);
    } catch (...) {
      conn.discard();  // it may be broken: close it rather than reuse it
      throw;
    }
  };  // the lease goes back to the pool here

  // 32 request threads, 10 requests each, on at most 8 connections.
  std::vector<std::thread> handlers;
  for (int t = 0; t < 32; ++t) {
    handlers.emplace_back([&, t] {
      for (int r = 0; r < 10; ++r) {
        try {
          handle(t * 100 + r);
        } catch (const std::exception& e) {
          std::fprintf(stderr, "request failed: %s\n", e.what());
        }
      }
    });
  }
  for (auto& handler : handlers) handler.join();

  db.close_expired();  // a service runs this from a timer
  const auto s = db.stats();
  std::printf("answered %d of 320 requests (%d busy) with %zu connections open (%zu idle)\n",
              answered.load(), busy.load(), s.open, s.idle);
  std::printf(
      "waited for a connection %llu times, %.1f ms in all; closed: %llu over max_idle, %llu failed "
      "checks\n",
      static_cast<unsigned long long>(s.wait_count),
      std::chrono::duration<double, std::milli>(s.wait_duration).count(),
      static_cast<unsigned long long>(s.max_idle_closed),
      static_cast<unsigned long long>(s.validation_failures));
  return answered.load() == 320 && s.open <= 4 ? 0 : 1;
}
