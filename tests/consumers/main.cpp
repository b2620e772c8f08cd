// Builds a rank-4 adapter on a 16 -> 8 layer, with lora installed (find_package/) or built as a
// subproject (add_subdirectory/); fails unless the trainable count is R * (I + O).
#include <lora/lora.hpp>

#include <cstdio>

int main() {
  lora::LoraConfig cfg;
  cfg.r = 4;
  lora::LoRALinear<float> layer(/*in_features*/ 16, /*out_features*/ 8, cfg);
  const auto count = layer.parameter_count();
  std::printf("%s\n", lora::trainable_summary(count).c_str());
  const lora::Index expected = 4 * (16 + 8);
  if (count.trainable != expected) {
    std::printf("expected %ld trainable parameters, got %ld\n", static_cast<long>(expected),
                static_cast<long>(count.trainable));
    return 1;
  }
  return 0;
}
