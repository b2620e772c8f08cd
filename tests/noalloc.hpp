// Allocation counting for the noalloc-*.cpp tests; include it first, before
// anything that includes Eigen, and in one translation unit per executable
// (it replaces the global operator new and delete).
//
// Eigen's own heap use is caught by EIGEN_RUNTIME_NO_MALLOC, routed to a
// counter (so the check also works in release builds where eigen_assert is
// compiled out); everything else by counting calls to the global operator new.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <new>

namespace noalloc {
inline int eigen_violations = 0;
inline long operator_new_calls = 0;
}  // namespace noalloc

#define EIGEN_RUNTIME_NO_MALLOC
#define eigen_assert(x)                      \
  do {                                       \
    if (!(x)) ++::noalloc::eigen_violations; \
  } while (false)

#include <lora/lora.hpp>

#include <utility>

void* operator new(std::size_t n) {
  ++noalloc::operator_new_calls;
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  ++noalloc::operator_new_calls;
  return std::malloc(n ? n : 1);
}
void* operator new[](std::size_t n) { return ::operator new(n); }
void* operator new[](std::size_t n, const std::nothrow_t& tag) noexcept { return ::operator new(n, tag); }
// Every form of delete is replaced too: under AddressSanitizer a replaced new paired with the
// sanitizer's own delete would be reported as a mismatch.
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }

namespace noalloc {
// Counts what a block of code allocates, with Eigen's heap use forbidden inside it.
template <class F>
std::pair<int, long> allocations_in(F&& f) {
  const int eigen_before = noalloc::eigen_violations;
  const long new_before = noalloc::operator_new_calls;
  Eigen::internal::set_is_malloc_allowed(false);
  f();
  Eigen::internal::set_is_malloc_allowed(true);
  return {noalloc::eigen_violations - eigen_before, noalloc::operator_new_calls - new_before};
}

// Calls `step` once (the first call sizes every workspace and buffer), then counts what `times` more calls
// allocate: a steady-state training step.
template <class F>
std::pair<int, long> allocations_after_first(F&& step, int times) {
  step();
  return allocations_in([&] {
    for (int i = 0; i < times; ++i) step();
  });
}

// The control both noalloc executables run on the same product, x (64, 512) times Wᵀ (512, 384):
// its packing buffers exceed Eigen's default EIGEN_STACK_ALLOCATION_LIMIT (128 KiB), so it
// allocates at the default limit and not at a raised one.
inline std::pair<int, long> allocations_of_64x512x384_product() {
  const lora::Matrix<float> x = lora::Matrix<float>::Random(64, 512), W = lora::Matrix<float>::Random(384, 512);
  lora::Matrix<float> y(64, 384);
  return allocations_in([&] { y.noalias() = x * W.transpose(); });
}
}  // namespace noalloc

using noalloc::allocations_after_first;
using noalloc::allocations_in;
