// The library's own part of a training step allocates nothing at any shape:
// here Eigen may put GEMM packing buffers of up to 2 MiB on the stack, so every
// heap allocation left would be the library's. (At the default limit of
// 128 KiB, Eigen's GEMM takes larger packing buffers from the heap on each
// product; that is Eigen's choice, made per product, not a workspace we keep.)
#define EIGEN_STACK_ALLOCATION_LIMIT (2 << 20)
#include "noalloc.hpp"

#include <catch2/catch.hpp>

#include <vector>

TEST_CASE("with the raised limit, a 64 x 512 x 384 product keeps its packing buffers off the heap", "[noalloc]") {
  // The same product allocates at the default limit (noalloc-training-step.cpp shows it), so the
  // step below runs at shapes the small-shape test cannot reach.
  const auto counted = noalloc::allocations_of_64x512x384_product();
  CHECK(counted.first == 0);
  CHECK(counted.second == 0);
}

TEST_CASE("a steady-state training step of a 512 x 384 layer with N = 64 allocates nothing", "[noalloc]") {
  lora::LoraConfig cfg;
  cfg.r = 16;
  cfg.lora_alpha = 32;
  cfg.lora_dropout = 0.1;
  cfg.bias = lora::BiasMode::all;
  const lora::Index N = 64, I = 512, O = 384;
  lora::Sequential<float> model;
  model.add(lora::LoRALinear<float>(I, O, cfg)).add(lora::GELU{});
  model.add(lora::LoRALinear<float>(O, 10, cfg));
  const lora::Matrix<float> x = lora::Matrix<float>::Random(N, I);
  std::vector<int> labels(N);
  for (lora::Index i = 0; i < N; ++i) labels[i] = static_cast<int>(i % 10);
  lora::Matrix<float> dlogits(N, 10);
  lora::AdamW<float> opt(model.parameters());
  const auto params = model.parameters();
  auto step = [&] {
    lora::cross_entropy<float>(model.forward(x), labels, dlogits);
    model.backward(dlogits);
    lora::clip_grad_norm(params, 1.0);
    opt.step();
    opt.zero_grad();
  };
  const auto counted = allocations_after_first(step, 3);
  CHECK(counted.first == 0);
  CHECK(counted.second == 0);
}
