// A steady-state training step allocates nothing: Eigen's allocations are
// caught by EIGEN_RUNTIME_NO_MALLOC (routed to a counter below, so the check
// also works in release builds where eigen_assert is compiled out), and the
// rest by counting calls to the global operator new.
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

#include <catch2/catch.hpp>
#include <lora/lora.hpp>

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

namespace {
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
}  // namespace

TEST_CASE("the allocation counters see allocations", "[noalloc]") {
  const auto counted = allocations_in([] {
    lora::Matrix<float> m(64, 64);
    m.setZero();
    void* p = ::operator new(16);  // a call, not a new-expression: the compiler may not elide it
    ::operator delete(p);
  });
  CHECK(counted.first > 0);
  CHECK(counted.second == 1);
}

TEST_CASE("a steady-state LoRALinear training step allocates nothing", "[noalloc]") {
  lora::LoraConfig cfg;
  cfg.r = 4;
  cfg.lora_alpha = 8;
  cfg.lora_dropout = 0.1;
  cfg.bias = lora::BiasMode::all;
  lora::LoRALinear<float> layer(32, 24, cfg);
  const lora::Matrix<float> x = lora::Matrix<float>::Random(16, 32), target = lora::Matrix<float>::Random(16, 24);
  lora::Matrix<float> y(16, 24), dy(16, 24), dx(16, 32);
  lora::AdamW<float> opt(layer.parameters());
  auto step = [&] {
    layer.forward(x, y);
    lora::mse_loss<float>(y, target, dy);
    layer.backward(x, dy, dx);
    opt.step();
    opt.zero_grad();
  };
  step();  // the first step sizes the workspace
  const auto counted = allocations_in([&] {
    for (int i = 0; i < 5; ++i) step();
  });
  CHECK(counted.first == 0);
  CHECK(counted.second == 0);
}

TEST_CASE("a steady-state Sequential training step allocates nothing", "[noalloc]") {
  lora::LoraConfig cfg;
  cfg.r = 4;
  cfg.lora_alpha = 8;
  cfg.lora_dropout = 0.1;
  lora::Sequential<float> model;
  model.add(lora::LoRALinear<float>(32, 48, cfg)).add(lora::GELU{});
  model.add(lora::LoRALinear<float>(48, 24, cfg)).add(lora::ReLU{});
  model.add(lora::LoRALinear<float>(24, 10, cfg));
  const lora::Matrix<float> x = lora::Matrix<float>::Random(16, 32);
  const std::vector<int> labels = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 3, 4, 5};
  lora::Matrix<float> dlogits(16, 10);
  lora::AdamW<float> opt(model.parameters());
  const auto params = model.parameters();
  long step_index = 0;
  auto step = [&] {
    opt.set_lr(1e-3 * lora::cosine_schedule_with_warmup(step_index++, 2, 10));
    lora::cross_entropy<float>(model.forward(x), labels, dlogits);
    model.backward(dlogits);
    lora::clip_grad_norm(params, 1.0);
    opt.step();
    opt.zero_grad();
  };
  step();
  const auto counted = allocations_in([&] {
    for (int i = 0; i < 5; ++i) step();
  });
  CHECK(counted.first == 0);
  CHECK(counted.second == 0);
}
