// SPDX-License-Identifier: BSL-1.0
// detail::task: a move-only `void()` callable that keeps small captures
// inline.
//
// Why not std::function: it must be copyable (so a lambda that captures a
// std::promise or a unique_ptr cannot go in), and libstdc++ keeps only two
// pointers inline, so most task lambdas cost a heap allocation per post. A
// task keeps up to inline_size bytes (five pointers) in place when the
// callable moves without throwing, and allocates only for bigger ones.
#pragma once

#include <cstddef>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

namespace weft::detail {

// A null function pointer given as a task is refused where it is given:
// called on a worker, it ended the process there (std::function's empty
// state, by contrast, throws, which the pool reports).
template <class F>
void check_callable(const F& callable, const char* operation) {
  // A function itself (F a reference to one) is never null.
  if constexpr (std::is_pointer_v<std::remove_cvref_t<F>>) {
    if (callable == nullptr) {
      throw std::invalid_argument(std::string("weft::") + operation +
                                  ": the function pointer is null");
    }
  }
}

class task {
 public:
  static constexpr std::size_t inline_size = 5 * sizeof(void*);
  static constexpr std::size_t inline_align = alignof(void*);

  task() noexcept = default;

  template <class F>
    requires(!std::is_same_v<std::remove_cvref_t<F>, task> && std::is_invocable_v<std::decay_t<F>&>)
  task(F&& callable) {  // NOLINT(google-explicit-constructor): a task is made from any callable
    using stored = std::decay_t<F>;
    // Destroyed on a worker, after it ran or unrun, where nothing could
    // catch what the destructor threw.
    static_assert(std::is_nothrow_destructible_v<stored>,
                  "weft: a task's destructor (and those of its captures) must not throw");
    if constexpr (fits_inline<stored>) {
      ::new (static_cast<void*>(storage_)) stored(std::forward<F>(callable));
      operations_ = &inline_operations<stored>;
    } else {
      *reinterpret_cast<stored**>(storage_) = new stored(std::forward<F>(callable));
      operations_ = &heap_operations<stored>;
    }
  }

  task(task&& other) noexcept : operations_(std::exchange(other.operations_, nullptr)) {
    if (operations_ != nullptr) operations_->relocate(other.storage_, storage_);
  }

  task& operator=(task&& other) noexcept {
    if (this != &other) {
      reset();
      operations_ = std::exchange(other.operations_, nullptr);
      if (operations_ != nullptr) operations_->relocate(other.storage_, storage_);
    }
    return *this;
  }

  task(const task&) = delete;
  task& operator=(const task&) = delete;
  ~task() { reset(); }

  explicit operator bool() const noexcept { return operations_ != nullptr; }

  // Runs the callable; the task keeps it (destroy it with reset()).
  void operator()() { operations_->invoke(storage_); }

  void reset() noexcept {
    if (operations_ != nullptr) std::exchange(operations_, nullptr)->destroy(storage_);
  }

 private:
  struct operations {
    void (*invoke)(void* storage);
    // Moves the callable from one storage to another and destroys the source.
    void (*relocate)(void* from, void* to) noexcept;
    void (*destroy)(void* storage) noexcept;
  };

  template <class F>
  static constexpr bool fits_inline =
      sizeof(F) <= inline_size && alignof(F) <= inline_align && std::is_nothrow_move_constructible_v<F>;

  template <class F>
  static constexpr operations inline_operations{
      [](void* storage) { (*std::launder(static_cast<F*>(storage)))(); },
      [](void* from, void* to) noexcept {
        F* source = std::launder(static_cast<F*>(from));
        ::new (to) F(std::move(*source));
        source->~F();
      },
      [](void* storage) noexcept { std::launder(static_cast<F*>(storage))->~F(); },
  };

  template <class F>
  static constexpr operations heap_operations{
      [](void* storage) { (**static_cast<F**>(storage))(); },
      [](void* from, void* to) noexcept { *static_cast<F**>(to) = *static_cast<F**>(from); },
      [](void* storage) noexcept { delete *static_cast<F**>(storage); },
  };

  alignas(inline_align) unsigned char storage_[inline_size];
  const operations* operations_ = nullptr;
};

}  // namespace weft::detail
