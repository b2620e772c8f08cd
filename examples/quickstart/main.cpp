// Quickstart: wrap a frozen weight with LoRA and fit a low-rank change.
//
// The "pretrained" layer is y = x W0ᵀ. The task wants y = x (W0 + ΔW)ᵀ with a
// rank-4 ΔW, which a rank-4 adapter can represent exactly: the loss falls
// towards zero while W0 stays frozen and only A and B train.
#include <lora/lora.hpp>

#include <cstdio>

int main() {
  using Mat = lora::Matrix<float>;
  const lora::Index I = 256, O = 128, N = 512;

  // The frozen base weight and the task's hidden low-rank change.
  std::srand(1);
  const Mat W0 = Mat::Random(O, I) / 16.0f;
  const Mat delta = Mat::Random(O, 4) * Mat::Random(4, I) / 8.0f;
  const Mat x = Mat::Random(N, I);
  const Mat target = x * (W0 + delta).transpose();

  lora::LoraConfig cfg;
  cfg.r = 4;
  cfg.lora_alpha = 8;
  auto layer = lora::LoRALinear<float>::view(W0.data(), O, I, cfg);  // no copy of W0
  std::printf("%s\n", lora::trainable_summary(layer.parameter_count()).c_str());

  lora::AdamW<float> opt(layer.parameters(), {/*lr*/ 2e-2, 0.9, 0.999, 1e-8, /*weight_decay*/ 0.0});
  Mat y(N, O), dy(N, O);
  const long steps = 300;
  float first = 0, last = 0;
  for (long step = 0; step < steps; ++step) {
    opt.set_lr(2e-2 * lora::cosine_schedule_with_warmup(step, 10, steps));
    layer.forward(x, y);
    last = lora::mse_loss<float>(y, target, dy);
    if (step == 0) first = last;
    layer.backward(x, dy);  // first layer: no dx needed
    opt.step();
    opt.zero_grad();
    if (step % 50 == 0 || step == steps - 1) std::printf("step %3ld  loss %.3e\n", step, last);
  }

  // Serve it merged: same outputs, no extra cost per call, W0 untouched (it is a read-only view,
  // so merging needs the layer's own copy).
  lora::LoRALinear<float> served(W0, cfg);
  served.lora_A() = layer.lora_A();
  served.lora_B() = layer.lora_B();
  served.eval();
  served.merge();
  layer.eval();
  const float gap = (served.forward(x) - layer.forward(x)).cwiseAbs().maxCoeff();
  std::printf("loss fell from %.3e to %.3e; merged vs unmerged max difference %.2e\n", first, last, gap);
  return last < 0.01f * first ? 0 : 1;
}
