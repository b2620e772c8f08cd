// A steady-state training step allocates nothing, at shapes where Eigen's
// GEMM keeps its packing buffers on the stack (under EIGEN_STACK_ALLOCATION_LIMIT,
// 128 KiB by default); noalloc-large-shapes.cpp covers larger ones.
#include "noalloc.hpp"
#include "noalloc_steps.hpp"

#include <lora/embedding.hpp>
#include <lora/fused.hpp>
#include <lora/multi.hpp>
#include <lora/quant.hpp>

#include <catch2/catch.hpp>

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

TEST_CASE("at the default stack limit, Eigen's GEMM takes large packing buffers from the heap", "[noalloc]") {
  // Why the steps below use small shapes, and noalloc-large-shapes.cpp raises the limit: this
  // product allocates inside Eigen, on every call, whatever the library around it does.
  const auto counted = noalloc::allocations_of_64x512x384_product();
  CHECK(counted.first > 0);
}

TEST_CASE("a steady-state LoRALinear training step allocates nothing", "[noalloc]") {
  lora::LoraConfig cfg;
  cfg.r = 4;
  cfg.lora_alpha = 8;
  cfg.lora_dropout = 0.1;
  cfg.bias = lora::BiasMode::all;
  lora::LoRALinear<float> layer(32, 24, cfg);
  const lora::Matrix<float> x = lora::Matrix<float>::Random(16, 32), target = lora::Matrix<float>::Random(16, 24);
  const auto counted = noalloc::mse_step_allocations(layer, x, target, 5);
  CHECK(counted.first == 0);
  CHECK(counted.second == 0);
}

TEST_CASE("a steady-state training step over a low-precision W allocates nothing", "[noalloc]") {
  // The tiled kernels' packing buffers grow on the first call and are reused (one set per thread), for every
  // format, every product path (few rows, many rows, bf16 and int8 products) and both layouts.
  lora::LoraConfig cfg;
  cfg.r = 4;
  cfg.lora_alpha = 8;
  for (const auto format : {lora::WeightFormat::bf16, lora::WeightFormat::q8_0, lora::WeightFormat::nf4}) {
    for (const auto products : {lora::Products::float32, lora::Products::bf16, lora::Products::int8}) {
      if (products == lora::Products::int8 && format == lora::WeightFormat::bf16) continue;
      for (const lora::Index N : {lora::Index(2), lora::Index(3), lora::Index(40)}) {
        INFO(lora::format_name(format) << ", " << lora::products_name(products) << " products, N = " << N);
        const lora::Matrix<float> W =
            lora::Matrix<float>::Random(64, 128);  // rows of 128: NF4 int8 products run their AVX-512 kernel
        auto q = lora::QuantizedMatrix::quantize(W, format).with_products(products);
        lora::LoRALinear<float> layer(lora::FrozenWeight<float>::quantized(q), cfg);
        const lora::Matrix<float> x = lora::Matrix<float>::Random(N, 128), target = lora::Matrix<float>::Random(N, 64);
        const auto counted = noalloc::mse_step_allocations(layer, x, target, 3);
        CHECK(counted.first == 0);
        CHECK(counted.second == 0);
      }
    }
  }
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
  const auto counted = allocations_after_first(step, 5);
  CHECK(counted.first == 0);
  CHECK(counted.second == 0);
}

TEST_CASE("a steady-state FusedLoRALinear training step allocates nothing", "[noalloc][fused]") {
  // q and v adapted, k frozen, a frozen bias, dropout: every product of the forward and backward, dx included.
  auto slice = [](lora::Index d, int r) {
    lora::FusedSlice s;
    s.out_features = d;
    s.config.r = r;
    s.config.lora_alpha = 2.0 * r;
    s.config.lora_dropout = 0.1;
    return s;
  };
  std::vector<lora::FusedSlice> slices = {slice(16, 4), slice(16, 0), slice(16, 2)};
  slices[0].name = "q";
  slices[1].name = "k";
  slices[2].name = "v";
  lora::FusedLoRALinear<float> layer(lora::FrozenWeight<float>::owned(lora::Matrix<float>::Random(48, 32)), slices,
                                     lora::RowVector<float>::Random(48));
  const lora::Matrix<float> x = lora::Matrix<float>::Random(12, 32), target = lora::Matrix<float>::Random(12, 48);
  const auto counted = noalloc::mse_step_allocations(layer, x, target, 5);
  CHECK(counted.first == 0);
  CHECK(counted.second == 0);
}

TEST_CASE("a FusedLoRALinear training step on the own GEMM allocates nothing in steady state", "[noalloc][fused]") {
  // GPT-2's layout (W stored (I, O)) at a shape where the forward runs the library's own GEMM with the slices'
  // terms inside it (detail/kgemm.hpp): its packing buffers are kept per thread and the terms' list per layer.
  const lora::Index N = 512, I = 64, d = 520;
  lora::LoraConfig cfg, frozen;
  cfg.r = 4;
  cfg.lora_alpha = 8;
  cfg.lora_dropout = 0.1;
  frozen.r = 0;
  const lora::Matrix<float> Wt = lora::Matrix<float>::Random(I, 3 * d);
  const auto weight = lora::FrozenWeight<float>::view(Wt.data(), 3 * d, I, lora::WeightLayout::in_out);
  lora::FusedLoRALinear<float> layer(weight, {{"q", d, cfg}, {"k", d, frozen}, {"v", d, cfg}},
                                     lora::RowVector<float>::Random(3 * d));
  if (!weight.forward_takes_terms(N)) {
    WARN("this CPU has no AVX-512 (or the build has no x86 kernels): the own GEMM does not run here");
    return;
  }
  const lora::Matrix<float> x = lora::Matrix<float>::Random(N, I), target = lora::Matrix<float>::Random(N, 3 * d);
  const auto counted = noalloc::mse_step_allocations(layer, x, target, 3);
  CHECK(counted.first == 0);
  CHECK(counted.second == 0);
}

TEST_CASE("a steady-state MultiLoRALinear training step allocates nothing", "[noalloc][multi]") {
  // Two adapters on one base, one of them training (with dropout), the other kept; a bias; dx.
  lora::LoraConfig cfg;
  cfg.r = 4;
  cfg.lora_alpha = 8;
  cfg.lora_dropout = 0.1;
  lora::MultiLoRALinear<float> layer(lora::FrozenWeight<float>::owned(lora::Matrix<float>::Random(24, 32)),
                                     lora::RowVector<float>::Random(24));
  layer.add_adapter("kept", cfg);
  layer.add_adapter("trained", cfg);
  layer.train_adapter("trained");
  const lora::Matrix<float> x = lora::Matrix<float>::Random(16, 32), target = lora::Matrix<float>::Random(16, 24);
  const auto counted = noalloc::mse_step_allocations(layer, x, target, 5);
  CHECK(counted.first == 0);
  CHECK(counted.second == 0);
}

TEST_CASE("a steady-state LoRAEmbedding training step allocates nothing", "[noalloc][embedding]") {
  // Repeated ids, the same batch every step (its ids decide which columns of A the backward touches).
  lora::LoraConfig cfg;
  cfg.r = 4;
  cfg.lora_alpha = 8;
  lora::LoRAEmbedding<float> layer(lora::Matrix<float>::Random(50, 16), cfg);
  layer.lora_B().setRandom();
  const std::vector<lora::Index> ids = {3, 7, 3, 49, 0, 7, 12, 3};
  const lora::Matrix<float> target = lora::Matrix<float>::Random(8, 16);
  lora::Matrix<float> y(8, 16), dy(8, 16);
  lora::AdamW<float> opt(layer.parameters());
  auto step = [&] {
    layer.forward(ids, y);
    lora::mse_loss<float>(y, target, dy);
    layer.backward(ids, dy);
    opt.step();
    opt.zero_grad();
  };
  const auto counted = allocations_after_first(step, 5);
  CHECK(counted.first == 0);
  CHECK(counted.second == 0);
}
