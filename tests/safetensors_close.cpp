// safetensors_close GOT EXPECTED TOLERANCE [EXTRA...]: exit 0 when GOT holds EXPECTED's tensors with the same
// dtypes and shapes, every value within TOLERANCE (absolute) of EXPECTED's, compared in double, and besides them
// exactly the tensors named EXTRA (say a modules_to_save head lora-merge adds that the golden file leaves out);
// otherwise exit 1 naming the first difference. For the ctest entries that check a file a command-line tool
// wrote against one PyTorch wrote (tests/golden/), where byte equality would be too strict for merged weights.
#include <lora/safetensors.hpp>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: safetensors_close GOT EXPECTED TOLERANCE [EXTRA...]\n");
    return 2;
  }
  namespace st = lora::safetensors;
  try {
    const auto got = st::File::open(argv[1]);
    const auto expected = st::File::open(argv[2]);
    const double tolerance = std::stod(argv[3]);
    const std::size_t extra = static_cast<std::size_t>(argc - 4);
    for (int i = 4; i < argc; ++i)
      if (got.find(argv[i]) == nullptr || expected.find(argv[i]) != nullptr) {
        std::fprintf(stderr, "%s: expected in GOT only\n", argv[i]);
        return 1;
      }
    if (got.tensors().size() != expected.tensors().size() + extra) {
      std::fprintf(stderr, "%zu tensors, expected %zu\n", got.tensors().size(), expected.tensors().size() + extra);
      return 1;
    }
    for (const auto& e : expected.tensors()) {
      const auto* g = got.find(e.name);
      if (g == nullptr) {
        std::fprintf(stderr, "%s: missing\n", e.name.c_str());
        return 1;
      }
      if (g->dtype != e.dtype || g->shape != e.shape) {
        std::fprintf(stderr, "%s: %s %s, expected %s %s\n", e.name.c_str(), st::dtype_name(g->dtype),
                     st::shape_text(g->shape).c_str(), st::dtype_name(e.dtype), st::shape_text(e.shape).c_str());
        return 1;
      }
      if (!st::is_float(e.dtype)) {
        if (e.nbytes() != 0 && std::memcmp(got.bytes(*g), expected.bytes(e), e.nbytes()) != 0) {
          std::fprintf(stderr, "%s: the bytes differ\n", e.name.c_str());
          return 1;
        }
        continue;
      }
      if (e.nbytes() == 0) continue;
      const auto a = got.matrix<double>(e.name), b = expected.matrix<double>(e.name);
      const double diff = (a - b).cwiseAbs().maxCoeff();
      if (!(diff <= tolerance)) {
        std::fprintf(stderr, "%s: largest difference %g, tolerance %g\n", e.name.c_str(), diff, tolerance);
        return 1;
      }
    }
    std::printf("%zu tensors within %g\n", expected.tensors().size(), tolerance);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "safetensors_close: %s\n", e.what());
    return 1;
  }
}
