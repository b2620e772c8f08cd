// LoRA over a frozen base stored in low precision (issue 14), against the same layer over a float base, in one
// run: every counter is the median of per-pair time ratios (the two calls alternate inside one loop, so both see
// the same machine state).
//
//   x (N, I), W (O, I) in `format`, A (R, I), B (O, R), y (N, O); I = O = D.
//
// Registered over (N, D, R, format, step):
//   lowp_paired   LoRALinear over W in `format` (decoded tile by tile, products in float) against LoRALinear over
//                 the float W (Eigen's product, or OpenBLAS's with LORA_USE_BLAS): "time fmt/f32" for the forward
//                 (step 0) or forward + backward with dx (step 1), and "GFLOP/s" of the low-precision layer's base
//                 products. Format "f32" here is the float W through the same tiled kernels (QuantizedMatrix
//                 format f32), so its ratio measures those kernels against the backend's GEMM.
// and, before the runs, the resident bytes per parameter of each format.
//
// Flags besides google benchmark's: --smoke (small shapes, for CI). One thread: the tiled kernels are
// single-threaded.
#include <benchmark/benchmark.h>
#include <lora/lora.hpp>

#include "bench_common.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

namespace {
using Mat = lora::Matrix<float>;
using lora::WeightFormat;

const WeightFormat formats[] = {WeightFormat::f32, WeightFormat::bf16, WeightFormat::f16, WeightFormat::q8_0,
                                WeightFormat::nf4};

lora::LoraConfig config(int r) {
  lora::LoraConfig c;
  c.r = r;
  c.lora_alpha = 2 * r;
  return c;
}

template <class F>
double seconds(F&& f) {
  const auto t0 = std::chrono::steady_clock::now();
  f();
  benchmark::ClobberMemory();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void lowp_paired(benchmark::State& state) {
  const lora::Index N = state.range(0), D = state.range(1);
  const int R = static_cast<int>(state.range(2));
  const auto format = static_cast<WeightFormat>(state.range(3));
  const bool step = state.range(4) != 0;
  const Mat W = Mat::Random(D, D) / std::sqrt(static_cast<float>(D));
  const Mat x = Mat::Random(N, D), dy = Mat::Random(N, D);
  Mat y(N, D), dx(N, D);
  lora::LoRALinear<float> dense(lora::FrozenWeight<float>::view(W.data(), D, D), config(R));
  lora::LoRALinear<float> low(lora::FrozenWeight<float>::quantized(lora::QuantizedMatrix::quantize(W, format)),
                              config(R));
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
  const auto median = [](std::vector<double> v) {
    std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
    return v[v.size() / 2];
  };
  state.counters["time fmt/f32"] = median(ratios);
  const double base_flops = 2.0 * static_cast<double>(N) * static_cast<double>(D) * static_cast<double>(D) * (step ? 2 : 1);
  state.counters["base GFLOP/s"] = base_flops / median(low_times) * 1e-9;
  state.counters["low ms"] = median(low_times) * 1e3;
  state.SetLabel(lora::format_name(format));
}

void register_all(bool smoke) {
  const lora::Index D = smoke ? 128 : 4096;
  const std::vector<lora::Index> rows = smoke ? std::vector<lora::Index>{1, 16} : std::vector<lora::Index>{1, 512};
  for (int step = 0; step < 2; ++step)
    for (lora::Index N : rows) {
      if (step == 1 && N == 1) continue;  // a training step on one row is not the case this measures
      for (WeightFormat f : formats)
        benchmark::RegisterBenchmark("lowp_paired", lowp_paired)
            ->ArgNames({"N", "D", "R", "fmt", "step"})
            ->Args({N, D, 8, static_cast<int64_t>(f), step})
            ->Iterations(smoke ? 2 : (N == 1 ? 201 : 11))
            ->Unit(benchmark::kMillisecond)
            ->UseRealTime();
    }
}

}  // namespace

int main(int argc, char** argv) {
  const auto options = lora_bench::take_options(argc, argv);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  lora_bench::set_threads(1, argv[0]);
  std::fputs(lora_bench::context_lines().c_str(), stdout);
  std::printf("# kernels: %s\n", lora::QuantizedMatrix::has_avx512() ? "AVX-512 (chosen at run time)" : "portable");
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
  register_all(options.smoke);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
