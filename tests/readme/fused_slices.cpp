// README.md's snippet for FusedLoRALinear, built and run as written: extract_snippets.cmake cuts it out into
// fused_slices.inc at build time. What the README leaves out is here: a GPT-2-like c_attn weight stored (d, 3d),
// its bias, a batch x and its output y. Then it checks what a fresh adapter must give (B is zero, so y is the
// base layer's x W + b exactly) and that the trainable tensors are q's and v's only.
#include <lora/lora.hpp>

#include <cstdio>
#include <string>

int main() {
  using Mat = lora::Matrix<float>;
  const lora::Index d = 8, N = 3;
  Mat storage = Mat::Random(d, 3 * d);  // c_attn as transformers' Conv1D stores it: (in, out)
  float* c_attn_weight = storage.data();
  const lora::RowVector<float> c_attn_bias = lora::RowVector<float>::Random(3 * d);
  const Mat x = Mat::Random(N, d);
  Mat y(N, 3 * d);

#include "fused_slices.inc"

  const Mat expected = (x * storage).rowwise() + c_attn_bias;
  const float error = (y - expected).cwiseAbs().maxCoeff();
  std::string names;
  for (const auto& p : c_attn.parameters()) names += p.name + " ";
  if (!(error < 1e-5f) || names != "q.lora_A q.lora_B v.lora_A v.lora_B " || c_attn.rank() != 16) {
    std::fprintf(stderr, "README snippet (FusedLoRALinear): y off by %g, parameters %s, rank %ld\n", error,
                 names.c_str(), static_cast<long>(c_attn.rank()));
    return 1;
  }
  std::puts("README snippet (FusedLoRALinear): built, ran, y is the base layer's and q, v train");
}
