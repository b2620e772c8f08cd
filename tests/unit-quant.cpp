// Low-precision frozen weights (<lora/quant.hpp>): bf16, f16, q8_0 and NF4 storage against the bytes ggml and
// bitsandbytes write (tests/data/gguf/ggml_rounding.gguf, tests/data/quant/ from bitsandbytes' own code), the
// AVX-512 decoders and products against the portable ones and against float products over the decoded matrix,
// layers over a quantized base against the same layers over its float copy, and the refusals.
#include <catch2/catch.hpp>
#include <lora/gguf.hpp>
#include <lora/lora.hpp>
#include <lora/quant_io.hpp>

#include "test_files.hpp"

#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace unit_quant {

using Catch::Contains;
using lora::FrozenWeight;
using lora::Index;
using lora::QuantizedMatrix;
using lora::WeightFormat;
using lora::WeightLayout;
using Mat = lora::Matrix<float>;
using lora_test::error_of;

namespace {

const std::string quant_dir = std::string(LORA_TEST_DATA_DIR) + "/quant";
const std::string gguf_dir = std::string(LORA_TEST_DATA_DIR) + "/gguf";

Mat random_matrix(Index rows, Index cols, unsigned seed) {
  std::srand(seed);
  return Mat::Random(rows, cols);
}

// The tensor's raw bytes from a safetensors file.
std::vector<std::uint8_t> raw(const lora::safetensors::File& f, const std::string& name) {
  const auto& t = f.at(name);
  const std::uint8_t* p = f.bytes(t);
  return std::vector<std::uint8_t>(p, p + t.nbytes());
}
std::vector<float> floats(const lora::safetensors::File& f, const std::string& name) {
  const Mat m = f.matrix<float>(name);
  return std::vector<float>(m.data(), m.data() + m.size());
}

// Runs `check` with the AVX-512 kernels (when this CPU has them) and with the portable ones.
template <class F>
void with_each_kernel(F&& check) {
  for (bool portable : {false, true}) {
    if (!portable && !QuantizedMatrix::has_avx512()) continue;
    QuantizedMatrix::force_portable_kernels(portable);
    INFO((portable ? "portable kernels" : "AVX-512 kernels"));
    try {
      check();
    } catch (...) {
      QuantizedMatrix::force_portable_kernels(false);
      throw;
    }
  }
  QuantizedMatrix::force_portable_kernels(false);
}

const WeightFormat all_formats[] = {WeightFormat::f32, WeightFormat::bf16, WeightFormat::f16, WeightFormat::q8_0,
                                    WeightFormat::nf4};

// The largest error a format's rounding may make on values of magnitude ≤ amax (per element, loose).
float format_tolerance(WeightFormat f, float amax) {
  switch (f) {
    case WeightFormat::f32:
      return 0;
    case WeightFormat::bf16:
      return amax / 256;
    case WeightFormat::f16:
      return amax / 2048;
    case WeightFormat::q8_0:
      return amax / 127 * 0.51f + amax / 1024;
    case WeightFormat::nf4:
      return amax * 0.17f;  // half the widest NF4 gap (1 - 0.723) / 2 and a margin
  }
  return 0;
}

}  // namespace

TEST_CASE("quant: bf16, f16 and q8_0 quantisation gives ggml's bytes (ggml_rounding.gguf)", "[quant][golden]") {
  const auto bytes = lora_test::read_bytes(gguf_dir + "/ggml_rounding.gguf");
  REQUIRE(!bytes.empty());
  const auto f = lora::gguf::File::from_bytes(bytes, "ggml_rounding.gguf");
  // x_k = ((37 k) mod 101 − 50) / 7, as tests/golden/make_gguf_golden.sh wrote them through ggml's converters.
  const auto rounding_x = [](int k) { return static_cast<float>((37 * k) % 101 - 50) / 7.0f; };
  Mat x(3, 32), xq(4, 32);
  for (int k = 0; k < 96; ++k) x(k / 32, k % 32) = xq(k / 32, k % 32) = rounding_x(k);
  xq.row(3).setZero();
  const struct {
    const char* name;
    WeightFormat format;
    const Mat& values;
  } cases[] = {{"r.bf16", WeightFormat::bf16, x}, {"r.f16", WeightFormat::f16, x}, {"r.q8_0", WeightFormat::q8_0, xq}};
  for (const auto& c : cases) {
    INFO(c.name);
    const auto& t = f.at(c.name);
    const std::uint8_t* ggml = f.bytes(t);
    const QuantizedMatrix q = QuantizedMatrix::quantize(c.values, c.format);
    REQUIRE(q.data_bytes() == t.nbytes);
    CHECK(std::vector<std::uint8_t>(q.data(), q.data() + q.data_bytes()) ==
          std::vector<std::uint8_t>(ggml, ggml + t.nbytes));
    // Decoding ggml's bytes in place gives what the GGUF reader (ggml's dequantize_row_q8_0) gives.
    const QuantizedMatrix view = QuantizedMatrix::view(c.format, ggml, c.values.rows(), c.values.cols());
    CHECK(view.is_view());
    with_each_kernel([&] { CHECK(view.dequantize() == f.matrix<float>(c.name)); });
  }
}

TEST_CASE("quant: NF4 quantisation and decoding give bitsandbytes' bytes (nf4_blocks: ties, zeros, a short block)",
          "[quant][golden]") {
  const auto f = lora::safetensors::File::open(quant_dir + "/nf4_blocks.safetensors");
  const Mat x = f.matrix<float>("x");  // (6, 100): 600 values, 9 blocks of 64 and one of 24
  const QuantizedMatrix q = QuantizedMatrix::quantize(x, WeightFormat::nf4);
  CHECK(q.block_size() == 64);
  CHECK(std::vector<float>(q.code().begin(), q.code().end()) == floats(f, "quant_map"));
  CHECK(std::vector<std::uint8_t>(q.data(), q.data() + q.data_bytes()) == raw(f, "packed"));
  CHECK(q.absmax() == floats(f, "absmax"));
  // The codes one by one, so a nibble-order mistake shows apart from a rounding one.
  const auto codes = raw(f, "codes");
  for (std::size_t e = 0; e < codes.size(); ++e) {
    const std::uint8_t byte = q.data()[e / 2];
    const int code = e % 2 == 0 ? byte >> 4 : byte & 0xf;
    if (code != codes[e]) FAIL_CHECK("element " << e << ": code " << code << ", bitsandbytes " << int(codes[e]));
  }
  const Mat dequant = f.matrix<float>("dequant");
  with_each_kernel([&] { CHECK(q.dequantize() == dequant); });
  // Built from bitsandbytes' tensors instead of quantised here: the same values.
  const auto packed = raw(f, "packed");
  const QuantizedMatrix loaded = QuantizedMatrix::nf4(6, 100, 64, packed, floats(f, "absmax"));
  with_each_kernel([&] { CHECK(loaded.dequantize() == dequant); });
  // Decoding from any offset: the SIMD decoder's head and tail against the reference.
  with_each_kernel([&] {
    std::vector<float> a(100), b(100);
    for (Index col : {0, 1, 7, 31, 33, 63, 64, 65}) {
      const Index n = 100 - col;
      q.decode(2, col, n, a.data());
      q.decode_reference(2, col, n, b.data());
      CHECK(a == b);
    }
  });
}

TEST_CASE("quant: NF4 with double-quantised absmax gives bitsandbytes' tensors (nf4_double)", "[quant][golden]") {
  const auto f = lora::safetensors::File::open(quant_dir + "/nf4_double.safetensors");
  const Mat x = f.matrix<float>("x");  // (128, 160): 320 blocks, nested blocks of 256 and 64
  lora::QuantizeOptions options;
  options.double_quant = true;
  const QuantizedMatrix q = QuantizedMatrix::quantize(x, WeightFormat::nf4, options);
  REQUIRE(q.double_quant());
  CHECK(std::vector<std::uint8_t>(q.data(), q.data() + q.data_bytes()) == raw(f, "packed"));
  CHECK(q.offset() == floats(f, "offset")[0]);
  CHECK(std::vector<float>(q.nested_code().begin(), q.nested_code().end()) == floats(f, "nested_quant_map"));
  CHECK(q.nested_absmax() == floats(f, "nested_absmax"));
  CHECK(q.absmax_q() == raw(f, "absmax_q"));
  CHECK(q.absmax() == floats(f, "absmax_dequant"));
  const Mat dequant = f.matrix<float>("dequant");
  with_each_kernel([&] { CHECK(q.dequantize() == dequant); });

  std::array<float, 256> nested_code{};
  const auto map = floats(f, "nested_quant_map");
  std::copy(map.begin(), map.end(), nested_code.begin());
  const QuantizedMatrix loaded =
      QuantizedMatrix::nf4_double(128, 160, 64, raw(f, "packed"), raw(f, "absmax_q"), floats(f, "nested_absmax"),
                                  nested_code, floats(f, "offset")[0]);
  with_each_kernel([&] { CHECK(loaded.dequantize() == dequant); });
  // 0.5 bytes a parameter and one byte per 64 for absmax, plus the small tables.
  CHECK(loaded.bytes() == 10240 + 320 + 2 * 4 + 16 * 4 + 256 * 4 + 4);
}

TEST_CASE("quant: products through a quantized matrix equal float products over its decoded values", "[quant][gemm]") {
  // Shapes that leave partial micro-tiles (MR = 12, NR = 32) and partial depth blocks (KC = 256), few-row and
  // many-row paths, both orientations, and accumulation. Under LORA_USE_DNNL, M > 4 takes oneDNN's sgemm over
  // decoded panels of 256 outputs instead (300 rows and 288 or 384 columns leave a partial panel).
  struct Shape {
    Index rows, cols;
  };
  // Row lengths that are and are not multiples of 32 and 64, for the fused few-row kernels and their fallbacks.
  // 9 and 19 rows leave partial groups of the 8-, 4- and 2-row dot kernels; 384 is three NF4 runs of 128.
  const Shape shapes[] = {{70, 96}, {33, 288}, {300, 64}, {50, 128}, {24, 100}, {9, 384}, {19, 256}};
  for (WeightFormat format : all_formats) {
    for (const Shape& sh : shapes) {
      if (format == WeightFormat::q8_0 && sh.cols % 32 != 0) continue;  // refused (tested below)
      const Mat S = random_matrix(sh.rows, sh.cols, 11);
      const QuantizedMatrix q = QuantizedMatrix::quantize(S, format);
      const Mat Sd = q.dequantize();
      for (Index M : {1, 2, 3, 4, 5, 13, 40, 70}) {
        INFO(lora::format_name(format) << " S " << sh.rows << "x" << sh.cols << ", M = " << M);
        const Mat At = random_matrix(M, sh.cols, 5), A = random_matrix(M, sh.rows, 6);
        const Mat want_t = (At.cast<double>() * Sd.cast<double>().transpose()).cast<float>();
        const Mat want = (A.cast<double>() * Sd.cast<double>()).cast<float>();
        with_each_kernel([&] {
          Mat C(M, sh.rows);
          lora::detail::QGemm::run(At.data(), At.cols(), M, sh.cols, q, true, C.data(), C.cols(), false);
          CHECK((C - want_t).cwiseAbs().maxCoeff() <= 1e-5f * static_cast<float>(sh.cols));
          Mat D = Mat::Constant(M, sh.cols, 1.0f);
          lora::detail::QGemm::run(A.data(), A.cols(), M, sh.rows, q, false, D.data(), D.cols(), true);
          CHECK((D - want - Mat::Constant(M, sh.cols, 1.0f)).cwiseAbs().maxCoeff() <=
                1e-5f * static_cast<float>(sh.rows));
        });
      }
    }
  }
}

TEST_CASE("quant: NF4 products over every block size and double quantisation equal float products", "[quant][gemm]") {
  // The few-row NF4 kernels take runs of 128 values when blocks are 64 or longer (a run's two halves each in one
  // block) and pairs otherwise; each against the float product over the decoded matrix.
  for (Index block : {32, 64, 128, 256}) {
    for (bool double_quant : {false, true}) {
      for (Index cols : {256, 384, 96}) {
        lora::QuantizeOptions o;
        o.block_size = block;
        o.double_quant = double_quant;
        const Mat S = random_matrix(13, cols, 21) * 3.0f;
        const QuantizedMatrix q = QuantizedMatrix::quantize(S, WeightFormat::nf4, o);
        const Mat Sd = q.dequantize();
        for (Index M : {1, 2, 3, 4}) {
          INFO("block " << block << (double_quant ? ", double-quantised" : "") << ", S 13x" << cols << ", M = " << M);
          const Mat A = random_matrix(M, cols, 22);
          const Mat want = (A.cast<double>() * Sd.cast<double>().transpose()).cast<float>();
          with_each_kernel([&] {
            Mat C = Mat::Constant(M, 13, 2.0f);
            lora::detail::QGemm::run(A.data(), A.cols(), M, cols, q, true, C.data(), C.cols(), true);
            CHECK((C - want - Mat::Constant(M, 13, 2.0f)).cwiseAbs().maxCoeff() <= 1e-5f * static_cast<float>(cols));
          });
        }
      }
    }
  }
}

TEST_CASE("quant: bf16 products round the other operand to bf16 and sum exact products in float", "[quant][gemm]") {
  // The reference: bf16(A) · op(S) in double over the same bf16 values, so only the float sums differ.
  const auto round_bf16 = [](const Mat& m) {
    return m.unaryExpr([](float v) { return lora::detail::bf16_to_float(lora::detail::float_to_bf16(v)); }).eval();
  };
  for (Index K : {96, 600, 1030, 1088, 97}) {  // multiples of 32 run on AMX tiles where the CPU has them
    const Index N = 70;
    const Mat S = random_matrix(N, K, 12), St = random_matrix(K, N, 13);
    const QuantizedMatrix q = QuantizedMatrix::quantize(S, WeightFormat::bf16).with_products(lora::Products::bf16);
    const QuantizedMatrix qt = QuantizedMatrix::quantize(St, WeightFormat::bf16).with_products(lora::Products::bf16);
    CHECK(q.products() == lora::Products::bf16);
    for (Index M : {1, 4, 5, 40}) {
      INFO("K = " << K << ", M = " << M);
      const Mat A = random_matrix(M, K, 14);
      const Mat want = (round_bf16(A).cast<double>() * q.dequantize().cast<double>().transpose()).cast<float>();
      const Mat want_t = (round_bf16(A).cast<double>() * qt.dequantize().cast<double>()).cast<float>();
      with_each_kernel([&] {
        Mat C(M, N), D = Mat::Constant(M, N, 2.0f);
        lora::detail::QGemm::run(A.data(), K, M, K, q, true, C.data(), N, false);
        lora::detail::QGemm::run(A.data(), K, M, K, qt, false, D.data(), N, true);
        CHECK((C - want).cwiseAbs().maxCoeff() <= 1e-6f * static_cast<float>(K));
        CHECK((D - Mat::Constant(M, N, 2.0f) - want_t).cwiseAbs().maxCoeff() <= 1e-6f * static_cast<float>(K));
      });
    }
  }
  // Other formats with bf16 products: S's decoded values are rounded to bf16 as well, on every path (few rows:
  // in the fused kernels' registers, or in the buffered path when S's rows do not fit their runs, N = 96 for S).
  for (WeightFormat format : {WeightFormat::q8_0, WeightFormat::nf4, WeightFormat::f32, WeightFormat::f16})
    for (Index N : {96, 128}) {
      // f32 and f16 rows of 1000 leave a tail of 8 after the runs of 32
      const Index K = format == WeightFormat::f32 || format == WeightFormat::f16 ? 1000 : 1024;
      const Mat S = random_matrix(N, K, 15), St = random_matrix(K, N, 16);
      const QuantizedMatrix q = QuantizedMatrix::quantize(S, format).with_products(lora::Products::bf16);
      const QuantizedMatrix qt = QuantizedMatrix::quantize(St, format).with_products(lora::Products::bf16);
      for (Index M : {1, 2, 4, 37}) {
        INFO(lora::format_name(format) << ", N = " << N << ", M = " << M);
        const Mat A = random_matrix(M, K, 17);
        const Mat want =
            (round_bf16(A).cast<double>() * round_bf16(q.dequantize()).cast<double>().transpose()).cast<float>();
        const Mat want_t = (round_bf16(A).cast<double>() * round_bf16(qt.dequantize()).cast<double>()).cast<float>();
        with_each_kernel([&] {
          Mat C(M, N), D(M, N);
          lora::detail::QGemm::run(A.data(), K, M, K, q, true, C.data(), N, false);
          lora::detail::QGemm::run(A.data(), K, M, K, qt, false, D.data(), N, false);
          CHECK((C - want).cwiseAbs().maxCoeff() <= 1e-6f * static_cast<float>(K));
          CHECK((D - want_t).cwiseAbs().maxCoeff() <= 1e-6f * static_cast<float>(K));
        });
      }
    }
}

TEST_CASE("quant: int8 products quantise x per block of 32 as llama.cpp does and sum exact integer products",
          "[quant][gemm]") {
  // The reference quantises A here, by llama.cpp's rule for q8_0 activations (d = amax / 127, q = x / d to nearest,
  // ties to even), and sums q · d · W's decoded values (fp16 scale times int8 code: exact in float) in double.
  const auto quantised = [](const Mat& A, Mat& bound_scale) {
    Mat out(A.rows(), A.cols());
    bound_scale.resize(A.rows(), A.cols());
    for (Index m = 0; m < A.rows(); ++m)
      for (Index b = 0; b < A.cols(); b += 32) {
        float amax = 0.0f;
        for (Index j = b; j < b + 32; ++j) amax = std::max(amax, std::fabs(A(m, j)));
        const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        for (Index j = b; j < b + 32; ++j) {
          out(m, j) = std::nearbyint(A(m, j) * id) * d;
          bound_scale(m, j) = d / 2;  // x's rounding error is at most d / 2
        }
      }
    return out;
  };
  for (Index K : {32, 96, 1024}) {
    const Index N = 70;   // not a multiple of the kernel's 8 or 4 rows side by side
    const Index Nt = 64;  // S stored (K, Nt): q8_0 rows are whole blocks
    const Mat S = random_matrix(N, K, 31), St = random_matrix(K, Nt, 32);
    const QuantizedMatrix f = QuantizedMatrix::quantize(S, WeightFormat::q8_0);
    const QuantizedMatrix q = f.with_products(lora::Products::int8);
    const QuantizedMatrix qt = QuantizedMatrix::quantize(St, WeightFormat::q8_0).with_products(lora::Products::int8);
    const QuantizedMatrix ft = QuantizedMatrix::quantize(St, WeightFormat::q8_0);
    CHECK(q.products() == lora::Products::int8);
    const Mat Sd = q.dequantize();
    for (Index M : {1, 2, 3, 5}) {
      INFO("K = " << K << ", M = " << M);
      Mat A = random_matrix(M, K, 33);
      A.row(0).segment(0, 32).setZero();  // an all-zero block: d = 0
      Mat half_step;
      const Mat Aq = quantised(A, half_step);
      const Mat want = (Aq.cast<double>() * Sd.cast<double>().transpose()).cast<float>();
      const Mat bound = (half_step.cast<double>() * Sd.cast<double>().cwiseAbs().transpose()).cast<float>();
      with_each_kernel([&] {
        Mat C(M, N), F(M, N), D = Mat::Constant(M, N, 2.0f), Dt(M, Nt), Ft(M, Nt);
        lora::detail::QGemm::run(A.data(), K, M, K, q, true, C.data(), N, false);
        lora::detail::QGemm::run(A.data(), K, M, K, f, true, F.data(), N, false);
        lora::detail::QGemm::run(A.data(), K, M, K, q, true, D.data(), N, true);
        if (M <= 2) {
          CHECK((C - want).cwiseAbs().maxCoeff() <= 1e-6f * static_cast<float>(K));
          CHECK((D - Mat::Constant(M, N, 2.0f) - want).cwiseAbs().maxCoeff() <= 1e-6f * static_cast<float>(K));
          // and within x's rounding of the float products, as the documentation says
          CHECK(((C - F).cwiseAbs() - bound).maxCoeff() <= 1e-6f * static_cast<float>(K));
          if (K > 32 || M > 1) CHECK(C != F);  // (K = 32, M = 1: the one block is zero)
        } else {
          CHECK(C == F);  // more rows: float products, bit for bit
        }
        // W stored (K, N), the axpy form (dy W in backward, an (in, out) layer's forward): float products
        lora::detail::QGemm::run(A.data(), K, M, K, qt, false, Dt.data(), Nt, false);
        lora::detail::QGemm::run(A.data(), K, M, K, ft, false, Ft.data(), Nt, false);
        CHECK(Dt == Ft);
      });
    }
  }
  // NaN or infinity in a block of x gives NaN in that row, on every kernel.
  const Index K = 64, N = 9;
  const QuantizedMatrix q =
      QuantizedMatrix::quantize(random_matrix(N, K, 34), WeightFormat::q8_0).with_products(lora::Products::int8);
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    Mat A = random_matrix(2, K, 35);
    A(1, 40) = bad;
    with_each_kernel([&] {
      Mat C(2, N);
      lora::detail::QGemm::run(A.data(), K, 2, K, q, true, C.data(), N, false);
      CHECK(C.row(0).allFinite());
      CHECK(C.row(1).array().isNaN().all());
    });
  }
  // int8 products need integer codes: q8_0 or NF4 only, and the refused matrix keeps its products.
  for (WeightFormat format : {WeightFormat::f32, WeightFormat::bf16, WeightFormat::f16}) {
    INFO(lora::format_name(format));
    const QuantizedMatrix other = QuantizedMatrix::quantize(random_matrix(4, 64, 36), format);
    CHECK_THROWS_AS(other.with_products(lora::Products::int8), lora::config_error);
    CHECK_THAT(
        error_of([&] { (void)other.with_products(lora::Products::int8); }),
        Contains("need a q8_0 or nf4 matrix") && Contains(std::string("this one is ") + lora::format_name(format)));
    CHECK(other.products() == lora::Products::float32);
  }
  CHECK(std::string(lora::products_name(lora::Products::int8)) == "int8");
}

TEST_CASE("quant: int8 products over NF4 round the 16 codes to int8 and sum exact integer products", "[quant][gemm]") {
  // W is built here from known nibbles and absmax values, so the reference needs no decoder: each value is
  // absmax · c8[nibble] · max|code| / 127 with c8 = code · 127 / max|code| to nearest, and x is quantised by
  // llama.cpp's rule for q8_0 activations (as in the q8_0 case above), all in double.
  const auto& code = lora::quant::nf4_code;
  double cmax = 0;
  for (float v : code) cmax = std::max(cmax, std::fabs(static_cast<double>(v)));
  std::array<double, 16> c8{};
  for (int i = 0; i < 16; ++i) c8[i] = std::nearbyint(static_cast<double>(code[i]) * 127.0 / cmax) * cmax / 127.0;
  struct Shape {
    Index K, block;
  };
  // K = 1024, 128 with blocks of 64: the VNNI kernel's runs; K = 96 or blocks of 32 and 128: the portable code
  for (const Shape sh : {Shape{1024, 64}, Shape{128, 64}, Shape{96, 64}, Shape{256, 32}, Shape{256, 128}}) {
    const Index N = 37, K = sh.K;
    std::srand(40);
    std::vector<std::uint8_t> packed(static_cast<std::size_t>(N * K / 2));
    for (auto& b : packed) b = static_cast<std::uint8_t>(std::rand() & 0xff);
    std::vector<float> absmax(static_cast<std::size_t>((N * K + sh.block - 1) / sh.block));
    for (auto& a : absmax) a = 0.5f + static_cast<float>(std::rand() % 1000) / 1000.0f;
    const QuantizedMatrix f = QuantizedMatrix::nf4(N, K, sh.block, packed, absmax);
    const QuantizedMatrix q = f.with_products(lora::Products::int8);
    Mat W8(N, K);  // W as int8 products see it
    Mat Wabs(N, K);
    for (Index n = 0; n < N; ++n)
      for (Index k = 0; k < K; ++k) {
        const std::size_t e = static_cast<std::size_t>(n * K + k);
        const int nibble = e % 2 == 0 ? packed[e / 2] >> 4 : packed[e / 2] & 0xf;
        W8(n, k) = static_cast<float>(absmax[e / static_cast<std::size_t>(sh.block)] * c8[nibble]);
        Wabs(n, k) = absmax[e / static_cast<std::size_t>(sh.block)];
      }
    for (Index M : {1, 2, 3}) {
      INFO("K = " << K << ", block " << sh.block << ", M = " << M);
      const Mat A = random_matrix(M, K, 41);
      Mat Aq(M, K), half_step(M, K);
      for (Index m = 0; m < M; ++m)
        for (Index b = 0; b < K; b += 32) {
          float amax = 0.0f;
          for (Index j = b; j < b + 32; ++j) amax = std::max(amax, std::fabs(A(m, j)));
          const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
          for (Index j = b; j < b + 32; ++j) {
            Aq(m, j) = std::nearbyint(A(m, j) * id) * d;
            half_step(m, j) = d / 2;
          }
        }
      const Mat want = (Aq.cast<double>() * W8.cast<double>().transpose()).cast<float>();
      // documented bound: x's rounding (d / 2 a value) times |w|, plus the codes' rounding (absmax · max|code| /
      // 254 a value) times |x̂|
      const Mat bound = (half_step.cast<double>() * f.dequantize().cast<double>().cwiseAbs().transpose() +
                         Aq.cast<double>().cwiseAbs() * (Wabs.cast<double>() * (cmax / 254.0)).transpose())
                            .cast<float>();
      with_each_kernel([&] {
        Mat C(M, N), F(M, N);
        lora::detail::QGemm::run(A.data(), K, M, K, q, true, C.data(), N, false);
        lora::detail::QGemm::run(A.data(), K, M, K, f, true, F.data(), N, false);
        if (M <= 2) {
          CHECK((C - want).cwiseAbs().maxCoeff() <= 1e-6f * static_cast<float>(K));
          CHECK(((C - F).cwiseAbs() - bound).maxCoeff() <= 1e-6f * static_cast<float>(K));
          CHECK(C != F);
        } else {
          CHECK(C == F);
        }
      });
    }
  }
}

TEST_CASE("quant: LoRALinear over a quantized W, both layouts, matches the layer over W's decoded float copy",
          "[quant][layer]") {
  const Index O = 64, I = 96, N = 9;
  for (WeightFormat format : all_formats) {
    for (WeightLayout layout : {WeightLayout::out_in, WeightLayout::in_out}) {
      INFO(lora::format_name(format) << " " << lora::layout_name(layout));
      const Mat W = random_matrix(O, I, 3);
      const Mat stored = layout == WeightLayout::out_in ? W : Mat(W.transpose());
      const QuantizedMatrix q = QuantizedMatrix::quantize(stored, format);
      lora::LoraConfig cfg;
      cfg.r = 4;
      cfg.lora_alpha = 8;
      cfg.seed = 9;
      lora::LoRALinear<float> low(FrozenWeight<float>::quantized(q, layout), cfg);
      lora::LoRALinear<float> ref(FrozenWeight<float>::owned(q.dequantize(), layout), cfg);
      REQUIRE(low.frozen_weight().is_quantized());
      CHECK(low.frozen_weight().format() == format);
      CHECK((low.frozen_weight().to_dense() - W).cwiseAbs().maxCoeff() <= format_tolerance(format, 1.0f));
      low.lora_B() = ref.lora_B() = random_matrix(O, 4, 4) * 0.1f;
      const Mat x = random_matrix(N, I, 8), dy = random_matrix(N, O, 9);
      Mat y(N, O), y_ref(N, O), dx(N, I), dx_ref(N, I);
      low.forward(x, y);
      ref.forward(x, y_ref);
      CHECK((y - y_ref).cwiseAbs().maxCoeff() <= 1e-4f);
      low.backward(x, dy, dx);
      ref.backward(x, dy, dx_ref);
      CHECK((dx - dx_ref).cwiseAbs().maxCoeff() <= 1e-4f);
      CHECK((low.dA() - ref.dA()).cwiseAbs().maxCoeff() <= 1e-4f);
      CHECK((low.dB() - ref.dB()).cwiseAbs().maxCoeff() <= 1e-4f);

      // Merging into a low-precision W is refused, and nothing changes.
      const Mat before = low.frozen_weight().to_dense();
      CHECK_THROWS_AS(low.merge(), lora::state_error);
      CHECK_THAT(error_of([&] { low.merge(); }), Contains(std::string("stored in ") + lora::format_name(format)));
      CHECK(!low.is_merged());
      CHECK(low.frozen_weight().to_dense() == before);
    }
  }
}

TEST_CASE("quant: a checkpoint of a layer over a quantized W resumes it, and refuses another base", "[quant][layer]") {
  // The checkpoint's base fingerprint covers a low-precision W by its format and decoded values.
  const auto dir = lora_test::scratch_dir("quant_checkpoint");
  for (WeightFormat format : all_formats) {
    INFO(lora::format_name(format));
    const QuantizedMatrix q = QuantizedMatrix::quantize(random_matrix(32, 64, 60), format);
    lora::LoraConfig cfg;
    cfg.r = 4;
    cfg.seed = 61;
    lora::LoRALinear<float> layer(FrozenWeight<float>::quantized(q), cfg);
    layer.lora_B() = random_matrix(32, 4, 62);
    lora::AdamW<float> opt(layer.parameters());
    const std::string path = (dir / (std::string(lora::format_name(format)) + ".safetensors")).string();
    lora::save_checkpoint(path, layer, opt, lora::TrainingState{});
    lora::LoRALinear<float> again(FrozenWeight<float>::quantized(q), cfg);
    lora::AdamW<float> opt_again(again.parameters());
    lora::load_checkpoint(path, again, opt_again);
    CHECK(again.lora_B() == layer.lora_B());
    // Another base of the same shape and format: refused by its fingerprint, and nothing changes.
    const QuantizedMatrix other = QuantizedMatrix::quantize(random_matrix(32, 64, 63), format);
    lora::LoRALinear<float> wrong(FrozenWeight<float>::quantized(other), cfg);
    lora::AdamW<float> opt_wrong(wrong.parameters());
    const Mat before = wrong.lora_B();
    CHECK_THAT(error_of([&] { lora::load_checkpoint(path, wrong, opt_wrong); }),
               Contains("base (fingerprint of the frozen W and b)"));
    CHECK(wrong.lora_B() == before);
  }
}

TEST_CASE(
    "quant: MultiLoRALinear, FusedLoRALinear and LoRAEmbedding over a low-precision base match the same layers "
    "over its decoded copy",
    "[quant][layer]") {
  lora::LoraConfig cfg;
  cfg.r = 4;
  cfg.lora_alpha = 8;
  cfg.seed = 3;
  for (WeightFormat format : {WeightFormat::bf16, WeightFormat::q8_0, WeightFormat::nf4}) {
    INFO(lora::format_name(format));
    // Several named adapters, mixed rows.
    const QuantizedMatrix q = QuantizedMatrix::quantize(random_matrix(64, 96, 41), format);
    lora::MultiLoRALinear<float> multi(FrozenWeight<float>::quantized(q));
    lora::MultiLoRALinear<float> multi_ref(FrozenWeight<float>::owned(q.dequantize()));
    for (const char* name : {"a", "b"}) {
      const Mat A = random_matrix(4, 96, 42), B = random_matrix(64, 4, 43);
      multi.add_adapter(name, cfg, A, B);
      multi_ref.add_adapter(name, cfg, A, B);
    }
    const Mat x = random_matrix(6, 96, 44);
    Mat y(6, 64), y_ref(6, 64);
    const std::vector<std::string> rows = {"a", "b", "a", "b", "b", "a"};
    multi.forward(x, rows, y);
    multi_ref.forward(x, rows, y_ref);
    CHECK((y - y_ref).cwiseAbs().maxCoeff() <= 1e-4f);

    // q and v slices of a fused (in, out) = (32, 96) projection; a frozen k.
    const QuantizedMatrix qf = QuantizedMatrix::quantize(random_matrix(32, 96, 45), format);
    lora::LoraConfig frozen;
    frozen.r = 0;
    const std::vector<lora::FusedSlice> slices = {{"q", 32, cfg}, {"k", 32, frozen}, {"v", 32, cfg}};
    lora::FusedLoRALinear<float> fused(FrozenWeight<float>::quantized(qf, WeightLayout::in_out), slices);
    lora::FusedLoRALinear<float> fused_ref(FrozenWeight<float>::owned(qf.dequantize(), WeightLayout::in_out), slices);
    fused.lora_B(0) = fused_ref.lora_B(0) = random_matrix(32, 4, 46);
    fused.lora_B(2) = fused_ref.lora_B(2) = random_matrix(32, 4, 47);
    const Mat xf = random_matrix(5, 32, 48), dyf = random_matrix(5, 96, 49);
    Mat yf(5, 96), yf_ref(5, 96), dxf(5, 32), dxf_ref(5, 32);
    fused.forward(xf, yf);
    fused_ref.forward(xf, yf_ref);
    fused.backward(xf, dyf, dxf);
    fused_ref.backward(xf, dyf, dxf_ref);
    CHECK((yf - yf_ref).cwiseAbs().maxCoeff() <= 1e-4f);
    CHECK((dxf - dxf_ref).cwiseAbs().maxCoeff() <= 1e-4f);

    // A (V, d) = (50, 64) table: the lookup decodes one row per token.
    const QuantizedMatrix qe = QuantizedMatrix::quantize(random_matrix(50, 64, 50), format);
    lora::LoRAEmbedding<float> emb(FrozenWeight<float>::quantized(qe, WeightLayout::in_out), cfg);
    lora::LoRAEmbedding<float> emb_ref(FrozenWeight<float>::owned(qe.dequantize(), WeightLayout::in_out), cfg);
    emb.lora_A() = emb_ref.lora_A() = random_matrix(4, 50, 51);
    const std::vector<Index> ids = {3, 49, 3, 0, 17};
    Mat ye(5, 64), ye_ref(5, 64);
    emb.forward(ids, ye);
    emb_ref.forward(ids, ye_ref);
    CHECK((ye - ye_ref).cwiseAbs().maxCoeff() <= 1e-5f);
    CHECK_THROWS_AS(emb.merge(), lora::state_error);  // merging a low-precision table is refused too
  }
}

TEST_CASE("quant: bitsandbytes' NF4 model file reads, serves a layer and writes back byte for byte (nf4_model)",
          "[quant][golden][files]") {
  const std::string path = quant_dir + "/nf4_model.safetensors";
  const auto f = lora::safetensors::File::open(path);
  const auto dense = lora::safetensors::File::open(quant_dir + "/nf4_model_dense.safetensors");
  const std::string down = "model.layers.0.mlp.down_proj.weight", q_proj = "model.layers.0.self_attn.q_proj.weight";
  REQUIRE(lora::safetensors::has_nf4(f, down));
  CHECK(!lora::safetensors::has_nf4(f, "model.norm.weight"));
  const QuantizedMatrix qd = lora::safetensors::read_nf4(f, down);  // double-quantised absmax
  const QuantizedMatrix qq = lora::safetensors::read_nf4(f, q_proj);
  CHECK(qd.double_quant());
  CHECK(!qq.double_quant());
  CHECK((qd.rows() == 48 && qd.cols() == 64));
  CHECK((qq.rows() == 32 && qq.cols() == 96));
  with_each_kernel([&] {
    CHECK(qd.dequantize() == dense.matrix<float>(down + ".dequant"));
    CHECK(qq.dequantize() == dense.matrix<float>(q_proj + ".dequant"));
  });
  // Quantising the original weights here gives the same bytes bitsandbytes saved.
  lora::QuantizeOptions dq;
  dq.double_quant = true;
  const QuantizedMatrix again =
      QuantizedMatrix::quantize(dense.matrix<float>(down + ".original"), WeightFormat::nf4, dq);
  CHECK(std::vector<std::uint8_t>(again.data(), again.data() + again.data_bytes()) == raw(f, down));
  CHECK(again.absmax_q() == raw(f, down + ".absmax"));

  // Written back in bitsandbytes' layout: the same file, byte for byte (the quant state's JSON included).
  lora::safetensors::Writer w;
  w.set_metadata("format", "pt");
  lora::safetensors::add_nf4(w, down, qd);
  lora::safetensors::add_nf4(w, q_proj, qq);
  w.add_from("model.norm.weight", f, f.at("model.norm.weight"));
  CHECK(w.serialize() == lora_test::read_bytes(path));

  // A LoRA layer over the NF4 base: the same outputs as over its decoded float copy.
  lora::LoraConfig cfg;
  cfg.r = 4;
  cfg.seed = 3;
  lora::LoRALinear<float> low(FrozenWeight<float>::quantized(qd), cfg);
  lora::LoRALinear<float> ref(FrozenWeight<float>::owned(qd.dequantize()), cfg);
  low.lora_B() = ref.lora_B() = random_matrix(48, 4, 2);
  const Mat x = random_matrix(5, 64, 4);
  Mat y(5, 48), y_ref(5, 48);
  low.forward(x, y);
  ref.forward(x, y_ref);
  CHECK((y - y_ref).cwiseAbs().maxCoeff() <= 1e-4f);
}

TEST_CASE("quant: merging an adapter into a bitsandbytes 4-bit base file writes it dequantised (lora-merge)",
          "[quant][files][merge]") {
  const std::string base_path = quant_dir + "/nf4_model.safetensors";
  const auto base = lora::safetensors::File::open(base_path);
  const auto dense = lora::safetensors::File::open(quant_dir + "/nf4_model_dense.safetensors");
  const std::string down = "model.layers.0.mlp.down_proj", q_proj = "model.layers.0.self_attn.q_proj";
  // An adapter trained over the 4-bit down_proj, saved as PEFT saves it.
  const QuantizedMatrix qd = lora::safetensors::read_nf4(base, down + ".weight");
  lora::LoraConfig cfg;
  cfg.r = 2;
  cfg.lora_alpha = 4;
  cfg.seed = 9;
  lora::LoRALinear<float> layer(FrozenWeight<float>::quantized(qd), cfg);
  layer.lora_B() = random_matrix(48, 2, 61);
  const auto dir = lora_test::scratch_dir("quant_merge");
  const std::string adapter = (dir / "adapter").string(), out = (dir / "merged.safetensors").string();
  lora::peft::save_adapter(adapter, std::map<std::string, lora::LoRALinear<float>*>{{down, &layer}},
                           std::map<std::string, lora::LoRAEmbedding<float>*>{});
  const Mat want = qd.dequantize() + 2.0f * layer.lora_B() * layer.lora_A();  // s = alpha / r = 2

  using lora::safetensors::Dtype;
  for (const std::optional<Dtype> dtype : {std::optional<Dtype>(), std::optional<Dtype>(Dtype::F32),
                                           std::optional<Dtype>(Dtype::BF16), std::optional<Dtype>(Dtype::F16)}) {
    const Dtype written = dtype ? *dtype : Dtype::F32;  // the quant states say "float32"
    INFO(lora::safetensors::dtype_name(written));
    const auto report = lora::peft::merge_adapter_file(base_path, adapter, out, 1.0, dtype);
    REQUIRE(report.merged.size() == 1);
    REQUIRE(report.dequantized.size() == 1);
    CHECK(report.dequantized[0].first == q_proj + ".weight");
    CHECK(report.dequantized[0].second == lora::safetensors::dtype_name(written));
    CHECK(report.copied == 1);  // model.norm.weight
    const auto merged = lora::safetensors::File::open(out);
    CHECK(merged.tensors().size() == 3);  // no absmax, quant_map, nested_* or quant_state left
    const auto& t = merged.at(down + ".weight");
    CHECK(t.dtype == written);
    CHECK(t.shape == std::vector<std::uint64_t>{48, 64});
    const float tol = written == Dtype::F32 ? 1e-5f : written == Dtype::BF16 ? 1.0f / 64 : 1.0f / 512;
    CHECK((merged.matrix<float>(down + ".weight") - want).cwiseAbs().maxCoeff() <= tol);
    CHECK((merged.matrix<float>(q_proj + ".weight") - dense.matrix<float>(q_proj + ".weight.dequant"))
              .cwiseAbs()
              .maxCoeff() <= tol);
    CHECK(merged.matrix<float>("model.norm.weight") == base.matrix<float>("model.norm.weight"));
  }
  CHECK_THAT(error_of([&] { lora::peft::merge_adapter_file(base_path, adapter, out, 1.0, Dtype::I8); }),
             Contains("4-bit weights are written as F32, BF16 or F16, not I8"));
}

TEST_CASE("quant: a BF16 or F16 tensor of a mapped safetensors file is viewed in place", "[quant][files]") {
  const auto dir = lora_test::scratch_dir("quant_view");
  const Mat W = random_matrix(8, 48, 21);
  lora::safetensors::Writer w;
  w.add("w.bf16", W, lora::safetensors::Dtype::BF16);
  w.add("w.f16", W, lora::safetensors::Dtype::F16);
  w.add("w.f64", W.cast<double>(), lora::safetensors::Dtype::F64);
  w.save((dir / "w.safetensors").string());
  const auto f = lora::safetensors::File::open((dir / "w.safetensors").string());
  for (const char* name : {"w.bf16", "w.f16"}) {
    INFO(name);
    const QuantizedMatrix v = lora::safetensors::view_low_precision(f, name);
    CHECK(v.is_view());
    CHECK(v.data() == f.bytes(f.at(name)));  // the file's own bytes, not a copy
    CHECK(v.dequantize() == f.matrix<float>(name));
    const auto layer = FrozenWeight<float>::quantized(v, WeightLayout::in_out);  // stored (I, O) = (8, 48)
    CHECK(layer.out_features() == 48);
    CHECK(layer.is_view());
  }
  CHECK_THAT(error_of([&] { lora::safetensors::view_low_precision(f, "w.f64"); }),
             Contains("tensor \"w.f64\" is F64, expected F32, BF16 or F16 to view in place"));
}

TEST_CASE("quant: a bad NF4 file gets a clear error", "[quant][files][errors]") {
  const auto src = lora::safetensors::File::open(quant_dir + "/nf4_model.safetensors");
  const std::string q_proj = "model.layers.0.self_attn.q_proj.weight";
  const auto dir = lora_test::scratch_dir("quant_bad");
  // Rewrites the file with `edit` applied to the q_proj tensors, and returns what reading it says.
  const auto refused = [&](const std::string& drop, const std::string& state, std::size_t absmax_count) {
    lora::safetensors::Writer w;
    const auto qq = lora::safetensors::read_nf4(src, q_proj);
    std::vector<float> absmax = qq.absmax();
    absmax.resize(absmax_count);
    std::vector<std::uint8_t> bytes(state.begin(), state.end());
    const auto packed = raw(src, q_proj);
    w.add_owned_bytes(q_proj, lora::safetensors::Dtype::U8, {packed.size(), 1}, packed);
    std::vector<std::uint8_t> absmax_bytes(4 * absmax.size());
    std::memcpy(absmax_bytes.data(), absmax.data(), absmax_bytes.size());
    w.add_owned_bytes(q_proj + ".absmax", lora::safetensors::Dtype::F32, {absmax.size()}, absmax_bytes);
    if (drop != "quant_map") w.add_from(q_proj + ".quant_map", src, src.at(q_proj + ".quant_map"));
    w.add_owned_bytes(q_proj + ".quant_state.bitsandbytes__nf4", lora::safetensors::Dtype::U8, {bytes.size()}, bytes);
    const std::string path = (dir / "bad.safetensors").string();
    w.save(path);
    return error_of([&] { lora::safetensors::read_nf4(lora::safetensors::File::open(path), q_proj); });
  };
  const std::string good = R"({"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [32, 96]})";
  CHECK(refused("", good, 48) == "accepted");
  CHECK_THAT(refused("", R"({"quant_type": "fp4", "blocksize": 64, "dtype": "float32", "shape": [32, 96]})", 48),
             Contains("quantised as \"fp4\"; only bitsandbytes' \"nf4\" is supported"));
  CHECK_THAT(refused("", good, 47), Contains("absmax expected 48 values"));
  CHECK_THAT(refused("quant_map", good, 48), Contains(".quant_map\" (the NF4 code table), which is missing"));
  CHECK_THAT(refused("", R"({"quant_type": "nf4", "blocksize": 64, "shape": [32, 97]})", 48),
             Contains("the packed weight expected 1552 bytes"));
  CHECK_THAT(refused("", "{not json", 48), Contains("is not JSON"));
}

TEST_CASE("quant: merge_quantized rounds W + s·B A back to the format, reports the error, and unmerges exactly",
          "[quant][layer][merge]") {
  const Index O = 64, I = 96;
  for (WeightFormat format : {WeightFormat::bf16, WeightFormat::f16, WeightFormat::q8_0, WeightFormat::nf4}) {
    for (bool dora : {false, true}) {
      INFO(lora::format_name(format) << (dora ? " DoRA" : " LoRA"));
      const Mat W = random_matrix(O, I, 31);
      const QuantizedMatrix q = QuantizedMatrix::quantize(Mat(W.transpose()), format);  // a Conv1D layout
      lora::LoraConfig cfg;
      cfg.r = 4;
      cfg.lora_alpha = 8;
      cfg.use_dora = dora;
      cfg.seed = 5;
      lora::LoRALinear<float> layer(FrozenWeight<float>::quantized(q, WeightLayout::in_out), cfg);
      layer.lora_B() = random_matrix(O, 4, 6) * 0.05f;
      // The exact merge, computed here from the decoded W: the same layer over a float copy, merged.
      lora::LoRALinear<float> ref(FrozenWeight<float>::owned(q.dequantize(), WeightLayout::in_out), cfg);
      ref.lora_A() = layer.lora_A();
      ref.lora_B() = layer.lora_B();
      if (dora) ref.magnitude() = layer.magnitude();
      ref.merge();
      const Mat exact = ref.frozen_weight().to_dense();
      const Mat before = layer.frozen_weight().to_dense();
      const Mat x = random_matrix(7, I, 8);
      Mat y_unmerged(7, O), y_merged(7, O);
      layer.eval();
      layer.forward(x, y_unmerged);

      const lora::QuantizedMergeReport report = layer.merge_quantized();
      REQUIRE(layer.is_merged());
      CHECK(layer.frozen_weight().format() == format);
      const Mat merged = layer.frozen_weight().to_dense();
      const Mat diff = (merged - exact).cwiseAbs();
      Index r = 0, c = 0;
      const float worst = diff.maxCoeff(&r, &c);
      CHECK(report.max_abs_error == Approx(worst).margin(1e-6));
      CHECK(report.max_abs_error <= format_tolerance(format, exact.cwiseAbs().maxCoeff()));
      if (worst > 0) CHECK((report.row == r && report.col == c));
      CHECK(report.max_abs_update > 0);
      layer.forward(x, y_merged);
      CHECK((y_merged - y_unmerged).cwiseAbs().maxCoeff() <=
            static_cast<float>(I) * static_cast<float>(report.max_abs_error) + 1e-4f);  // |x| ≤ 1
      CHECK_THROWS_AS(layer.merge_quantized(), lora::state_error);

      layer.unmerge();
      CHECK(!layer.is_merged());
      CHECK(layer.frozen_weight().to_dense() == before);  // the original W, not a second rounding
      Mat y_again(7, O);
      layer.forward(x, y_again);
      CHECK(y_again == y_unmerged);
    }
  }
  lora::LoRALinear<float> plain(FrozenWeight<float>::owned(random_matrix(8, 8, 1)), lora::LoraConfig{});
  CHECK_THAT(error_of([&] { plain.merge_quantized(); }), Contains("W is stored in float"));
}

TEST_CASE("quant: bad input gets a clear error", "[quant][errors]") {
  Mat m = random_matrix(4, 64, 1);
  m(2, 5) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THAT(error_of([&] { QuantizedMatrix::quantize(m, WeightFormat::nf4); }),
             Contains("the value at row 2, column 5 is nan"));
  m(2, 5) = std::numeric_limits<float>::infinity();
  CHECK_THROWS_AS(QuantizedMatrix::quantize(m, WeightFormat::bf16), lora::numeric_error);
  CHECK_THAT(error_of([] { QuantizedMatrix::quantize(Mat::Zero(3, 40), WeightFormat::q8_0); }),
             Contains("must be a multiple of 32, got (3, 40)"));
  lora::QuantizeOptions odd;
  odd.block_size = 48;
  CHECK_THAT(error_of([&] { QuantizedMatrix::quantize(Mat::Zero(3, 64), WeightFormat::nf4, odd); }),
             Contains("power of two from 32 to 4096, got 48"));
  CHECK_THAT(error_of([] { QuantizedMatrix::nf4(4, 64, 64, std::vector<std::uint8_t>(128), std::vector<float>(3)); }),
             Contains("absmax expected 4 values"));
  CHECK_THAT(error_of([] { QuantizedMatrix::nf4(4, 64, 64, std::vector<std::uint8_t>(100), std::vector<float>(4)); }),
             Contains("the packed weight expected 128 bytes"));
  CHECK_THAT(error_of([] { QuantizedMatrix::view(WeightFormat::nf4, "x", 1, 1); }),
             Contains("use QuantizedMatrix::nf4()"));
  const FrozenWeight<float> w =
      FrozenWeight<float>::quantized(QuantizedMatrix::quantize(Mat::Zero(2, 32), WeightFormat::bf16));
  CHECK_THAT(error_of([&] { w.stored(); }), Contains("W is stored in bf16, not as a float matrix"));
  CHECK(lora::parse_format("q8_0") == WeightFormat::q8_0);
  CHECK(!lora::parse_format("q4_0"));
}

}  // namespace unit_quant
