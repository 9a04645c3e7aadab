// SPDX-License-Identifier: BSL-1.0
// detail::never_destroyed<T>: a T made in place and never destroyed, for a
// process-wide object that threads may still use while the exit destroys
// statics (a pool made before the object's first use joins its workers
// after the exit would have destroyed the object). Its own destructor is
// trivial, so a function-local static of it registers nothing to run at
// exit. The memory stays reachable, so leak checkers do not report it.
#pragma once

#include <new>
#include <utility>

namespace weft::detail {

template <class T>
class never_destroyed {
 public:
  template <class... Args>
  explicit never_destroyed(Args&&... args) {
    ::new (static_cast<void*>(storage_)) T(std::forward<Args>(args)...);
  }
  never_destroyed(const never_destroyed&) = delete;
  never_destroyed& operator=(const never_destroyed&) = delete;

  T& get() noexcept { return *std::launder(reinterpret_cast<T*>(storage_)); }

 private:
  alignas(T) unsigned char storage_[sizeof(T)];
};

}  // namespace weft::detail
