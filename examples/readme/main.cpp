#include <cstdio>
#include <lora/lora.hpp>
int main() {
  using Mat = lora::Matrix<float>;
  const Mat W = Mat::Random(1024, 1024), x = Mat::Random(64, 1024), target = Mat::Random(64, 1024);
  lora::LoraConfig cfg;  // PEFT's names and defaults
  cfg.r = 8;
  cfg.lora_alpha = 16;                                                    // scaling s = alpha / r = 2
  auto layer = lora::LoRALinear<float>::view(W.data(), 1024, 1024, cfg);  // W (O, I): yours, never copied
  lora::AdamW<float> opt(layer.parameters());                             // state for A and B only
  Mat y(64, 1024), dy(64, 1024);
  for (int step = 0; step < 5; ++step) {
    layer.forward(x, y);  // y = x Wᵀ + s · (x Aᵀ) Bᵀ
    std::printf("step %d  loss %.5f\n", step, lora::mse_loss<float>(y, target, dy));
    layer.backward(x, dy);  // adds into dA, dB; W has no gradient at all
    opt.step();
    opt.zero_grad();
  }
  std::puts(lora::trainable_summary(layer.parameter_count()).c_str());
}
