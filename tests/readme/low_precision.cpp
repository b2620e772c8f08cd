// README.md's snippet for low-precision frozen weights, built and run as written: extract_snippets.cmake cuts it out
// into low_precision.inc at build time. What the README leaves out is here: a model.safetensors holding one weight
// in transformers' bitsandbytes 4-bit layout (written with this library's add_nf4 from a float W), a batch x and
// its output y. Then it checks what a fresh adapter must give: B is zero, so y is x times the decoded NF4 W.
#include <lora/lora.hpp>
#include <lora/quant_io.hpp>  // QuantizedMatrix, read_nf4: not in lora.hpp

#include <cstdio>

int main() {
  using Mat = lora::Matrix<float>;
  const lora::Index N = 5;
  const Mat original = Mat::Random(48, 64);
  {
    lora::safetensors::Writer writer;
    writer.set_metadata("format", "pt");
    lora::QuantizeOptions options;
    options.double_quant = true;
    lora::safetensors::add_nf4(writer, "model.layers.0.mlp.down_proj.weight",
                               lora::QuantizedMatrix::quantize(original, lora::WeightFormat::nf4, options));
    writer.save("model.safetensors");
  }
  const Mat x = Mat::Random(N, 64);
  Mat y(N, 48);

#include "low_precision.inc"

  const Mat decoded = down_proj.frozen_weight().to_dense();
  const float error = (y - x * decoded.transpose()).cwiseAbs().maxCoeff();
  const float rounding = (decoded - original).cwiseAbs().maxCoeff();
  if (!(error < 1e-4f) || !(rounding < 0.2f) || down_proj.frozen_weight().format() != lora::WeightFormat::nf4) {
    std::fprintf(stderr, "README snippet (NF4 base): y off by %g, NF4 rounding %g\n", error, rounding);
    return 1;
  }
  std::puts("README snippet (NF4 base): built, ran, y is x times the decoded 4-bit W");
}
