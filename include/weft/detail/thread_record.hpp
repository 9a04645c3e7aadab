// SPDX-License-Identifier: BSL-1.0
// detail::thread_record: a small record per thread that outlives its thread,
// so another thread may read it at any time through its address without
// knowing whether its thread still runs.
//
// Its address is also a tag for the thread: no two live threads have the
// same record. A finished thread's record goes back to a free list and on to
// the next thread that asks for one, tag and all: whatever a tag still
// stands for passes to that thread, so a user of tags must let any live
// thread act on a tag once its first owner is gone.
//
// Cost: this_thread_record() is one thread-local load once the thread has a
// record (a call to __tls_get_addr in a shared library built as PIC); its
// first call takes a process-wide mutex and may allocate.
// Records are never freed (64 bytes each, as many as threads were ever alive
// at once), and stay reachable, so leak checkers do not report them.
#pragma once

#include <weft/config.hpp>
#include <weft/detail/never_destroyed.hpp>

#include <atomic>
#include <memory>
#include <mutex>
#include <vector>

namespace weft::detail {

struct alignas(64) thread_record {
  // The semaphore this thread is returning a permit to through its release
  // slot right now, for the slot's settler (semaphore.hpp); null otherwise.
  std::atomic<const void*> releasing{nullptr};
};

class thread_record_registry {
 public:
  static thread_record_registry& instance() noexcept {
    static never_destroyed<thread_record_registry> registry;
    return registry.get();
  }

  thread_record* take() {
    std::lock_guard lock(mutex_);
    if (!free_.empty()) {
      thread_record* record = free_.back();
      free_.pop_back();
      return record;
    }
    free_.reserve(all_.size() + 1);  // so that give_back cannot fail
    all_.push_back(std::make_unique<thread_record>());
    return all_.back().get();
  }

  void give_back(thread_record* record) noexcept {
    std::lock_guard lock(mutex_);
    free_.push_back(record);
  }

 private:
  std::mutex mutex_;
  std::vector<std::unique_ptr<thread_record>> all_;
  std::vector<thread_record*> free_;
};

inline thread_local thread_record* this_thread_record_cache = nullptr;
inline thread_local bool this_thread_record_returned = false;

// Gives the thread's record back as the thread ends.
struct thread_record_return {
  thread_record* record;
  ~thread_record_return() {
    this_thread_record_cache = nullptr;
    this_thread_record_returned = true;
    thread_record_registry::instance().give_back(record);
  }
};

// Null when the thread has no record yet.
inline thread_record* this_thread_record_if_any() noexcept { return this_thread_record_cache; }

WEFT_NOINLINE inline thread_record* this_thread_record_attach() noexcept {
  // A thread whose record went back as it ends (a later thread-local
  // destructor got here) goes without.
  if (this_thread_record_returned) return nullptr;
  try {
    thread_record* record = thread_record_registry::instance().take();
    static thread_local thread_record_return give_back_at_exit{record};
    this_thread_record_cache = record;
    return record;
  } catch (...) {  // no memory, or the mutex failed: the caller goes without
    return nullptr;
  }
}

// The calling thread's record; null only if none could be allocated, or
// while the thread ends.
inline thread_record* this_thread_record() noexcept {
  thread_record* record = this_thread_record_cache;
  return record != nullptr ? record : this_thread_record_attach();
}

}  // namespace weft::detail
