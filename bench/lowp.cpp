// LoRA over a frozen base stored in low precision (issue 14), against the same layer over a float base, in one
// run: every counter is the median of per-pair time ratios (the two calls alternate inside one loop, so both see
// the same machine state).
//
//   x (N, I), W (O, I) in `format`, A (R, I), B (O, R), y (N, O); I = O = D.
//
// Registered over (N, D, fmt):
//   base_paired   the base product x Wᵀ alone through the low-precision kernels against Eigen's float product
//                 ("base fmt/f32"), at N = 1, where it is bound by the bytes of W.
// Registered over (N, D, R, fmt, step):
//   lowp_paired   LoRALinear over W in `format` (decoded tile by tile, products in float) against LoRALinear over
//                 the float W (Eigen's product, or OpenBLAS's with LORA_USE_BLAS): "time fmt/f32" for the forward
//                 (step 0) or forward + backward with dx (step 1), and "GFLOP/s" of the low-precision layer's base
//                 products. Variants 0-4 are the formats f32, bf16, f16, q8_0, nf4 with float products; 5-7 are
//                 bf16, q8_0 and nf4 with bf16 products (x and W's values rounded to bf16; AMX or AVX512_BF16). Format
//                 "f32" here is the float W through the same tiled kernels (QuantizedMatrix format f32), so its ratio
//                 measures those kernels against the backend's GEMM. At N = 1, variants 8-9 are q8_0 and nf4
//                 with int8 products (x quantised per block of 32 as llama.cpp does; integer dot products on
//                 AVX512_VNNI).
// and, before the runs, the resident bytes per parameter of each format and the peak RSS of a training step over 8
// layers in each (a child process each: --rss=V).
//
// Flags besides google benchmark's: --smoke (small shapes, for CI). One thread: the tiled kernels are
// single-threaded.
#include <benchmark/benchmark.h>
#include <lora/lora.hpp>
#include <lora/quant.hpp>

#include "bench_common.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {
using Mat = lora::Matrix<float>;
using lora::WeightFormat;

const WeightFormat formats[] = {WeightFormat::f32, WeightFormat::bf16, WeightFormat::f16, WeightFormat::q8_0,
                                WeightFormat::nf4};
// The benchmark's variants: the five formats with float products (0-4), then bf16, q8_0 and nf4 with bf16
// products (5-7: x and W's values rounded to bf16, on AMX tiles where the CPU has them), then q8_0 and nf4 with
// int8 products (8-9: x quantised per block of 32, integer dot products on AVX512_VNNI; N = 1 only, since more
// than two rows are float products).
constexpr int bf16_products = 5, variants = 8, int8_variant = 8, last_variant = 9;
const WeightFormat bf16_product_formats[] = {WeightFormat::bf16, WeightFormat::q8_0, WeightFormat::nf4};
WeightFormat variant_format(int v) {
  if (v >= int8_variant) return v == int8_variant ? WeightFormat::q8_0 : WeightFormat::nf4;
  return v >= bf16_products ? bf16_product_formats[v - bf16_products] : formats[v];
}
lora::Products variant_products(int v) {
  if (v >= int8_variant) return lora::Products::int8;
  return v >= bf16_products ? lora::Products::bf16 : lora::Products::float32;
}
std::string variant_name(int v) {
  const lora::Products p = variant_products(v);
  return std::string(lora::format_name(variant_format(v))) +
         (p == lora::Products::float32 ? "" : std::string(" (") + lora::products_name(p) + " products)");
}
lora::QuantizedMatrix stored_as(const Mat& W, int v) {
  return lora::QuantizedMatrix::quantize(W, variant_format(v)).with_products(variant_products(v));
}

lora::LoraConfig config(int r) {
  lora::LoraConfig c;
  c.r = r;
  c.lora_alpha = 2 * r;
  return c;
}

// lora_bench::seconds with the call's writes completed inside the timed span.
template <class F>
double seconds(F&& f) {
  return lora_bench::seconds([&] {
    f();
    benchmark::ClobberMemory();
  });
}

void lowp_paired(benchmark::State& state) {
  const lora::Index N = state.range(0), D = state.range(1);
  const int R = static_cast<int>(state.range(2));
  const int variant = static_cast<int>(state.range(3));
  const bool step = state.range(4) != 0;
  const Mat W = Mat::Random(D, D) / std::sqrt(static_cast<float>(D));
  const Mat x = Mat::Random(N, D), dy = Mat::Random(N, D);
  Mat y(N, D), dx(N, D);
  lora::LoRALinear<float> dense(lora::FrozenWeight<float>::view(W.data(), D, D), config(R));
  lora::LoRALinear<float> low(lora::FrozenWeight<float>::quantized(stored_as(W, variant)), config(R));
  dense.lora_B().setRandom();
  low.lora_B() = dense.lora_B();
  low.lora_A() = dense.lora_A();
  auto run = [&](lora::LoRALinear<float>& layer) {
    return seconds([&] {
      layer.forward(x, y);
      if (step) layer.backward(x, dy, dx);
      benchmark::DoNotOptimize(y.data());
      benchmark::DoNotOptimize(dx.data());
    });
  };
  run(low);
  run(dense);
  std::vector<double> ratios, low_times;
  bool low_first = false;
  for (auto _ : state) {
    double tl, td;
    if (low_first) {
      tl = run(low);
      td = run(dense);
    } else {
      td = run(dense);
      tl = run(low);
    }
    ratios.push_back(tl / td);
    low_times.push_back(tl);
    low_first = !low_first;
  }
  state.counters["time fmt/f32"] = lora_bench::median(ratios);
  const double base_flops =
      2.0 * static_cast<double>(N) * static_cast<double>(D) * static_cast<double>(D) * (step ? 2 : 1);
  state.counters["base GFLOP/s"] = base_flops / lora_bench::median(low_times) * 1e-9;
  state.counters["low ms"] = lora_bench::median(low_times) * 1e3;
  state.SetLabel(variant_name(variant));
}

// The base product alone, y = x Wᵀ, through the low-precision kernels against the float product the float layer runs
// (FrozenWeight's: oneDNN's sgemm under LORA_USE_DNNL, Eigen's otherwise), paired as above ("base fmt/f32").
// Without the LoRA path and the layer's bookkeeping this isolates the kernels.
void base_paired(benchmark::State& state) {
  const lora::Index N = state.range(0), D = state.range(1);
  const int variant = static_cast<int>(state.range(2));
  const Mat W = Mat::Random(D, D);
  const Mat x = Mat::Random(N, D);
  Mat y(N, D);
  const auto q = stored_as(W, variant);
  const auto low = [&] { lora::detail::QGemm::run(x.data(), D, N, D, q, true, y.data(), D, false); };
  const auto w = lora::FrozenWeight<float>::view(W.data(), D, D);
  const auto dense = [&] { w.forward(x, y); };
  low();
  dense();
  std::vector<double> ratios;
  bool low_first = false;
  for (auto _ : state) {
    double tl = 0, td = 0;
    if (low_first) {
      tl = seconds(low);
      td = seconds(dense);
    } else {
      td = seconds(dense);
      tl = seconds(low);
    }
    ratios.push_back(tl / td);
    low_first = !low_first;
  }
  state.counters["base fmt/f32"] = lora_bench::median(ratios);
  state.SetLabel(variant_name(variant));
}

// --rss=V: the peak resident memory (VmHWM) of a process that builds 8 LoRA layers of D x D over a base stored as
// variant V (-1: float W, Eigen's product), each W made and quantised 64 rows at a time so no float copy of a whole W
// ever exists, then runs one training step (forward through the 8 layers, backward with dx) on N rows. Prints
// "rss V kib".
int rss_child(int variant, lora::Index D, lora::Index N) {
  std::vector<lora::LoRALinear<float>> layers;
  layers.reserve(8);
  std::vector<Mat> owned;
  for (int l = 0; l < 8; ++l) {
    if (variant < 0) {
      owned.push_back(Mat::Random(D, D) / std::sqrt(static_cast<float>(D)));
      layers.emplace_back(lora::FrozenWeight<float>::view(owned.back().data(), D, D), config(8));
      continue;
    }
    const WeightFormat f = variant_format(variant);
    std::vector<std::uint8_t> bytes;
    std::vector<float> absmax;
    for (lora::Index r = 0; r < D; r += 64) {
      const Mat block = Mat::Random(std::min<lora::Index>(64, D - r), D) / std::sqrt(static_cast<float>(D));
      const auto q = lora::QuantizedMatrix::quantize(block, f);
      bytes.insert(bytes.end(), q.data(), q.data() + q.data_bytes());
      if (f == WeightFormat::nf4) {
        const auto a = q.absmax();
        absmax.insert(absmax.end(), a.begin(), a.end());
      }
    }
    auto q = f == WeightFormat::nf4 ? lora::QuantizedMatrix::nf4(D, D, 64, std::move(bytes), std::move(absmax))
                                    : lora::QuantizedMatrix::from_bytes(f, D, D, std::move(bytes));
    if (variant >= bf16_products) q = q.with_products(lora::Products::bf16);
    layers.emplace_back(lora::FrozenWeight<float>::quantized(std::move(q)), config(8));
  }
  std::vector<Mat> acts(9, Mat(N, D));
  acts[0].setRandom();
  for (int l = 0; l < 8; ++l) layers[l].forward(acts[l], acts[l + 1]);
  Mat dy = Mat::Random(N, D), dx(N, D);
  for (int l = 7; l >= 0; --l) {
    layers[l].backward(acts[l], dy, dx);
    dy.swap(dx);
  }
  benchmark::DoNotOptimize(dy.data());
  std::printf("rss %d %ld\n", variant, lora_bench::status_kib("VmHWM"));
  return 0;
}

// Runs rss_child in a fresh process for the float base and each variant, and prints each peak over the float one.
void rss_table(const char* self, lora::Index D, lora::Index N) {
  std::printf("# peak RSS of a training step over 8 LoRA layers of %ld x %ld, N = %ld, r = 8 (a process each):\n",
              static_cast<long>(D), static_cast<long>(D), static_cast<long>(N));
  long float_kib = 0;
  for (int v = -1; v < bf16_products; ++v) {  // bf16 products change no storage
    const std::string cmd = std::string(self) + " --rss=" + std::to_string(v) + " --rss-d=" + std::to_string(D) +
                            " --rss-n=" + std::to_string(N);
    std::FILE* p = popen(cmd.c_str(), "r");
    long kib = -1;
    int got = -2;
    if (p != nullptr) {
      if (std::fscanf(p, "rss %d %ld", &got, &kib) != 2) kib = -1;
      pclose(p);
    }
    if (v < 0) float_kib = kib;
    std::printf("#   %-22s %8.1f MiB  %.3f of float\n", v < 0 ? "float (Eigen)" : variant_name(v).c_str(), kib / 1024.0,
                float_kib > 0 ? static_cast<double>(kib) / static_cast<double>(float_kib) : 0.0);
  }
}

void register_all(bool smoke) {
  const lora::Index D = smoke ? 128 : 4096;
  for (int v = 0; v <= last_variant; ++v)
    benchmark::RegisterBenchmark("base_paired", base_paired)
        ->ArgNames({"N", "D", "fmt"})
        ->Args({1, D, v})
        ->Iterations(smoke ? 2 : 201)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
  const std::vector<lora::Index> rows = smoke ? std::vector<lora::Index>{1, 16} : std::vector<lora::Index>{1, 512};
  for (int step = 0; step < 2; ++step)
    for (lora::Index N : rows) {
      if (step == 1 && N == 1) continue;  // a training step on one row is not the case this measures
      for (int v = 0; v < (N == 1 ? last_variant + 1 : variants); ++v)
        benchmark::RegisterBenchmark("lowp_paired", lowp_paired)
            ->ArgNames({"N", "D", "R", "fmt", "step"})
            ->Args({N, D, 8, v, step})
            ->Iterations(smoke ? 2 : (N == 1 ? 201 : 11))
            ->Unit(benchmark::kMillisecond)
            ->UseRealTime();
    }
}

}  // namespace

int main(int argc, char** argv) {
  const auto options = lora_bench::take_options(argc, argv);
  int rss = -2;
  long rss_d = 4096, rss_n = 512;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a.rfind("--rss=", 0) == 0) rss = std::atoi(a.c_str() + 6);
    if (a.rfind("--rss-d=", 0) == 0) rss_d = std::atol(a.c_str() + 8);
    if (a.rfind("--rss-n=", 0) == 0) rss_n = std::atol(a.c_str() + 8);
  }
  if (rss >= -1) return rss_child(rss, rss_d, rss_n);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  lora_bench::set_threads(1, argv[0]);
  std::fputs(lora_bench::context_lines().c_str(), stdout);
  std::printf("# kernels (chosen at run time): %s; bf16 products on %s; int8 products on %s\n",
              lora::QuantizedMatrix::has_avx512() ? "AVX-512" : "portable",
              lora::detail::QGemm::has_amx_bf16()        ? "AMX tiles"
              : lora::QuantizedMatrix::has_avx512_bf16() ? "AVX512_BF16"
                                                         : "the portable kernel",
              lora::QuantizedMatrix::has_avx512_vnni() ? "AVX512_VNNI" : "the portable kernel");
  // Resident bytes per parameter of each format, for a 4096 x 4096 W (smoke: 128 x 128).
  const lora::Index D = options.smoke ? 128 : 4096;
  const Mat W = Mat::Random(D, D);
  lora::QuantizeOptions dq;
  dq.double_quant = true;
  for (WeightFormat f : formats) {
    const auto q = lora::QuantizedMatrix::quantize(W, f);
    std::printf("# %-5s %.4f bytes / parameter", lora::format_name(f), static_cast<double>(q.bytes()) / (D * D));
    if (f == WeightFormat::nf4)
      std::printf(" (double-quantised absmax: %.4f)",
                  static_cast<double>(lora::QuantizedMatrix::quantize(W, f, dq).bytes()) / (D * D));
    std::printf("\n");
  }
  for (lora::Index n : {lora::Index(512), lora::Index(64)})
    rss_table(argv[0], options.smoke ? 128 : 4096, options.smoke ? 16 : n);
  register_all(options.smoke);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
