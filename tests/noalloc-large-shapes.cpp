// The library's own part of a training step allocates nothing at any shape:
// here Eigen may put GEMM packing buffers of up to 2 MiB on the stack, so every
// heap allocation left would be the library's. (At the default limit of
// 128 KiB, Eigen's GEMM takes larger packing buffers from the heap on each
// product; that is Eigen's choice, made per product, not a workspace we keep.)
#define EIGEN_STACK_ALLOCATION_LIMIT (2 << 20)
#include "noalloc.hpp"
#include "noalloc_steps.hpp"

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

TEST_CASE("a LoRALinear training step on the own GEMM allocates nothing in steady state", "[noalloc][kgemm]") {
  // Shapes where the forward is one product of the library's own GEMM with the bias and s·H Bᵀ inside it
  // (detail/kgemm.hpp): W (O, I) read transposed at 64 x 300 -> 800, W (I, O) at 512 x 64 -> 1560 (both with
  // dropout); and where the backward is one, dx = dy W with G = dy B and s·G A inside it: W (I, O) read transposed
  // at 64 x 800 -> 300 (without dropout; with it, only G inside). Its packing buffers are kept per thread, s·Bᵀ,
  // Bᵀ and s·A per layer.
  struct Shape {
    lora::Index n, in, out;
    lora::WeightLayout layout;
    double dropout;
  };
  bool ran = false;
  for (const Shape& sh :
       {Shape{64, 300, 800, lora::WeightLayout::out_in, 0.1}, Shape{512, 64, 1560, lora::WeightLayout::in_out, 0.1},
        Shape{64, 800, 300, lora::WeightLayout::in_out, 0.0}, Shape{64, 800, 300, lora::WeightLayout::in_out, 0.1}}) {
    INFO("N=" << sh.n << " I=" << sh.in << " O=" << sh.out << " dropout " << sh.dropout);
    const bool out_in = sh.layout == lora::WeightLayout::out_in;
    const lora::Matrix<float> stored = lora::Matrix<float>::Random(out_in ? sh.out : sh.in, out_in ? sh.in : sh.out);
    const auto weight = lora::FrozenWeight<float>::view(stored.data(), sh.out, sh.in, sh.layout);
    if (!weight.forward_takes_terms(sh.n) && !weight.backward_takes_terms(sh.n)) continue;
    ran = true;
    lora::LoraConfig cfg;
    cfg.r = 4;
    cfg.lora_alpha = 8;
    cfg.lora_dropout = sh.dropout;
    lora::LoRALinear<float> layer(weight, lora::RowVector<float>::Random(sh.out), cfg);
    const lora::Matrix<float> x = lora::Matrix<float>::Random(sh.n, sh.in),
                              target = lora::Matrix<float>::Random(sh.n, sh.out);
    const auto counted = noalloc::mse_step_allocations(layer, x, target, 3);
    CHECK(counted.first == 0);
    CHECK(counted.second == 0);
  }
  if (!ran) WARN("this CPU has no AVX-512 (or the build has no x86 kernels): the own GEMM does not run here");
}
