#include <cstdio>
#include <lora/lora.hpp>
int main() {
  using Mat = lora::Matrix<float>;
  const Mat W = Mat::Random(1024, 1024), x = Mat::Random(64, 1024), change = Mat::Random(1024, 8) / 64;
  const Mat target = x * (W + change * Mat::Random(8, 1024)).transpose();  // W changed by rank 8: LoRA learns it
  lora::LoraConfig cfg;                                                    // PEFT's names and defaults
  cfg.r = 8;
  cfg.lora_alpha = 16;                                                    // scaling s = alpha / r = 2
  auto layer = lora::LoRALinear<float>::view(W.data(), 1024, 1024, cfg);  // W (O, I): yours, never copied
  lora::AdamW<float> opt(layer.parameters());                             // state for A and B only
  Mat y(64, 1024), dy(64, 1024);
  for (int step = 0; step <= 100; ++step) {
    layer.forward(x, y);                                      // y = x Wᵀ + s · (x Aᵀ) Bᵀ
    const float loss = lora::mse_loss<float>(y, target, dy);  // and dy = d loss / dy
    if (step % 20 == 0) std::printf("step %3d  loss %.2e\n", step, loss);
    layer.backward(x, dy);  // adds into dA, dB; W has no gradient at all
    opt.step();
    opt.zero_grad();
  }
  std::puts(lora::trainable_summary(layer.parameter_count()).c_str());
}
