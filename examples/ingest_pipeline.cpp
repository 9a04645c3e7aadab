// SPDX-License-Identifier: BSL-1.0
// An ingestion pipeline: raw log lines arrive on a channel (from a socket
// reader, say), are parsed by four workers, enriched by two (a lookup that
// stands in for a cache or a database), and written in batches of up to 500
// rows, the way a service bulk-inserts into its database. Malformed lines
// are dropped by the parse stage (it returns an empty optional). The slow
// writer shows backpressure: the stages before it wait, and memory stays
// bounded by the buffers. At the end the program prints each stage's stats
// and names the bottleneck.
//
//   build/dev/examples/ingest_pipeline
#include <weft/channel.hpp>
#include <weft/pipeline.hpp>

#include <chrono>
#include <cstdint>
#include <iostream>
#include <optional>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;

namespace {

struct record {
  std::uint64_t user = 0;
  std::string action;
  std::string region;  // filled in by enrich
};

// "user=42 action=login"; anything else is malformed.
std::optional<record> parse(const std::string& line) {
  const auto user_at = line.find("user=");
  const auto action_at = line.find(" action=");
  if (user_at != 0 || action_at == std::string::npos) return std::nullopt;
  record parsed;
  try {
    parsed.user = std::stoull(line.substr(5, action_at - 5));
  } catch (const std::exception&) {
    return std::nullopt;
  }
  parsed.action = line.substr(action_at + 8);
  return parsed;
}

// Stands in for a lookup in a cache or a database.
record enrich(record r) {
  static const char* const regions[] = {"eu-west", "us-east", "ap-south"};
  r.region = regions[r.user % 3];
  return r;
}

// Stands in for one bulk INSERT: a fixed cost per batch plus a little per
// row, which is why batching pays.
std::uint64_t rows_written = 0;
void write_batch(const std::vector<record>& batch) {
  volatile std::uint64_t work = 0;
  for (std::size_t i = 0; i < 20'000 + 50 * batch.size(); ++i) work = work + i;
  rows_written += batch.size();
}

}  // namespace

int main() {
  constexpr int lines = 200'000;
  weft::channel<std::string> incoming{1024, "incoming-lines"};

  auto ingest = weft::pipeline(incoming, "ingest")
                    .stage(parse, {.workers = 4, .buffer = 256, .name = "parse"})
                    .stage(enrich, {.workers = 2, .buffer = 256, .name = "enrich"})
                    .batch(500, 50ms)
                    .sink(write_batch, {.name = "write"});

  // The reader: one in every 100 lines is malformed.
  std::thread reader([&] {
    for (int i = 0; i < lines; ++i) {
      std::string line = i % 100 == 99 ? "garbage" : "user=" + std::to_string(i) + " action=view";
      if (incoming.send(std::move(line)) != weft::wait_status::ok) break;
    }
    incoming.close();  // end of input: the pipeline drains and run() returns
  });

  try {
    ingest.run();  // rethrows the first stage's failure
  } catch (...) {
    incoming.close();  // the reader's blocked send returns closed, and it ends
    reader.join();
    throw;
  }
  reader.join();

  std::cout << "lines read: " << lines << ", rows written: " << rows_written << " (malformed lines dropped)\n"
            << ingest.stats() << "bottleneck: " << ingest.bottleneck() << '\n';
  return rows_written == lines - lines / 100 ? 0 : 1;
}
