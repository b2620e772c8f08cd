// Compute cost of LoRA next to the dense product it wraps, measured in one run.
//
//   x (N, I), W (O, I), A (R, I), B (O, R), y (N, O); here I = O = D.
//
// Variants, each registered over (N, D, R):
//   dense_forward         y = x Wᵀ                              the baseline for forwards
//   lora_forward          y = x Wᵀ + s (x Aᵀ) Bᵀ, training mode, dropout 0
//   lora_forward_merged   y = x W'ᵀ with W' = W + s B A merged once
//   naive_rebuild         W' = W + s B A rebuilt, then y = x W'ᵀ (what not to do)
//   dense_two_products    y = x Wᵀ and dx = dy W                the baseline for training steps
//   lora_train_step       forward + backward (dA, dB, dx)
//   full_ft_step          forward + dx = dy W + dW += dyᵀ x     what LoRA saves
//   dense_dx, dense_dW    dx = dy W and dW += dyᵀ x alone       the pieces of the two steps above
//   lora_step_adamw       lora_train_step + AdamW on A, B (and zero_grad)
//   full_ft_step_adamw    full_ft_step + AdamW on W (and zero_grad)
// After the runs a table gives each variant's median time over its baseline's.
//
// Flags besides google benchmark's: --threads=T (default 1) and --smoke (small
// shapes, for CI). The first lines of the output name the backend, the GEMM
// kernel, the threads and the CPU.
#include <benchmark/benchmark.h>
#include <lora/lora.hpp>

#include "bench_common.hpp"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

namespace {
using Mat = lora::Matrix<float>;

struct Problem {
  lora::Index N, D;
  int R;
  Mat x, dy, y, dx;
  lora::LoRALinear<float> layer;
  Problem(const benchmark::State& state)
      : N(state.range(0)),
        D(state.range(1)),
        R(static_cast<int>(state.range(2))),
        x(Mat::Random(N, D)),
        dy(Mat::Random(N, D)),
        y(N, D),
        dx(N, D),
        layer(D, D, config(R), false) {
    layer.lora_B().setRandom();
  }
  static lora::LoraConfig config(int r) {
    lora::LoraConfig c;
    c.r = r;
    c.lora_alpha = 2 * r;
    return c;
  }
};

void set_flops(benchmark::State& state, double flops_per_iter) {
  state.counters["GFLOP/s"] = benchmark::Counter(flops_per_iter * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

double gemm_flops(double m, double n, double k) { return 2 * m * n * k; }

void dense_forward(benchmark::State& state) {
  Problem p(state);
  const auto W = p.layer.weight();
  for (auto _ : state) {
    p.y.noalias() = p.x * W.transpose();
    benchmark::DoNotOptimize(p.y.data());
    benchmark::ClobberMemory();
  }
  set_flops(state, gemm_flops(p.N, p.D, p.D));
}

void lora_forward(benchmark::State& state) {
  Problem p(state);
  for (auto _ : state) {
    p.layer.forward(p.x, p.y);
    benchmark::DoNotOptimize(p.y.data());
    benchmark::ClobberMemory();
  }
  set_flops(state, gemm_flops(p.N, p.D, p.D) + 2 * gemm_flops(p.N, p.D, p.R));
}

void lora_forward_merged(benchmark::State& state) {
  Problem p(state);
  p.layer.eval();
  p.layer.merge();
  for (auto _ : state) {
    p.layer.forward(p.x, p.y);
    benchmark::DoNotOptimize(p.y.data());
    benchmark::ClobberMemory();
  }
  set_flops(state, gemm_flops(p.N, p.D, p.D));
}

void naive_rebuild(benchmark::State& state) {
  Problem p(state);
  Mat merged(p.D, p.D);
  const float s = p.layer.scaling();
  for (auto _ : state) {
    merged = p.layer.weight();
    merged.noalias() += s * p.layer.lora_B() * p.layer.lora_A();
    p.y.noalias() = p.x * merged.transpose();
    benchmark::DoNotOptimize(p.y.data());
    benchmark::ClobberMemory();
  }
  set_flops(state, gemm_flops(p.N, p.D, p.D) + gemm_flops(p.D, p.D, p.R));
}

void dense_two_products(benchmark::State& state) {
  Problem p(state);
  const auto W = p.layer.weight();
  for (auto _ : state) {
    p.y.noalias() = p.x * W.transpose();
    p.dx.noalias() = p.dy * W;
    benchmark::DoNotOptimize(p.dx.data());
    benchmark::ClobberMemory();
  }
  set_flops(state, 2 * gemm_flops(p.N, p.D, p.D));
}

void lora_train_step(benchmark::State& state) {
  Problem p(state);
  for (auto _ : state) {
    p.layer.forward(p.x, p.y);
    p.layer.backward(p.x, p.dy, p.dx);
    benchmark::DoNotOptimize(p.dx.data());
    benchmark::ClobberMemory();
  }
  set_flops(state, 2 * gemm_flops(p.N, p.D, p.D) + 6 * gemm_flops(p.N, p.D, p.R));
}

void full_ft_step(benchmark::State& state) {
  Problem p(state);
  const auto W = p.layer.weight();
  Mat dW = Mat::Zero(p.D, p.D);
  for (auto _ : state) {
    p.y.noalias() = p.x * W.transpose();
    p.dx.noalias() = p.dy * W;
    dW.noalias() += p.dy.transpose() * p.x;
    benchmark::DoNotOptimize(dW.data());
    benchmark::ClobberMemory();
  }
  set_flops(state, 3 * gemm_flops(p.N, p.D, p.D));
}

void dense_dx(benchmark::State& state) {
  Problem p(state);
  const auto W = p.layer.weight();
  for (auto _ : state) {
    p.dx.noalias() = p.dy * W;
    benchmark::DoNotOptimize(p.dx.data());
    benchmark::ClobberMemory();
  }
  set_flops(state, gemm_flops(p.N, p.D, p.D));
}

void dense_dW(benchmark::State& state) {
  Problem p(state);
  Mat dW = Mat::Zero(p.D, p.D);
  for (auto _ : state) {
    dW.noalias() += p.dy.transpose() * p.x;
    benchmark::DoNotOptimize(dW.data());
    benchmark::ClobberMemory();
  }
  set_flops(state, gemm_flops(p.D, p.D, p.N));
}

void lora_step_adamw(benchmark::State& state) {
  Problem p(state);
  lora::AdamW<float> opt(p.layer.parameters());
  for (auto _ : state) {
    p.layer.forward(p.x, p.y);
    p.layer.backward(p.x, p.dy, p.dx);
    opt.step();
    opt.zero_grad();
    benchmark::DoNotOptimize(p.dx.data());
    benchmark::ClobberMemory();
  }
  set_flops(state, 2 * gemm_flops(p.N, p.D, p.D) + 6 * gemm_flops(p.N, p.D, p.R));
}

// Full fine-tuning trains W itself: a gradient dW and two AdamW moments the size of W.
void full_ft_step_adamw(benchmark::State& state) {
  Problem p(state);
  Mat W = p.layer.weight();
  Mat dW = Mat::Zero(p.D, p.D);
  lora::AdamW<float> opt({{"weight", W.data(), dW.data(), p.D, p.D}});
  for (auto _ : state) {
    p.y.noalias() = p.x * W.transpose();
    p.dx.noalias() = p.dy * W;
    dW.noalias() += p.dy.transpose() * p.x;
    opt.step();
    opt.zero_grad();
    benchmark::DoNotOptimize(W.data());
    benchmark::ClobberMemory();
  }
  set_flops(state, 3 * gemm_flops(p.N, p.D, p.D));
}

// The variants in registration order; google benchmark's random interleaving
// shuffles the runs, so the ratios see the same machine state on average.
const std::vector<std::pair<const char*, void (*)(benchmark::State&)>> variants = {
    {"dense_forward", dense_forward},
    {"lora_forward", lora_forward},
    {"lora_forward_merged", lora_forward_merged},
    {"naive_rebuild", naive_rebuild},
    {"dense_two_products", dense_two_products},
    {"lora_train_step", lora_train_step},
    {"full_ft_step", full_ft_step},
    {"dense_dx", dense_dx},
    {"dense_dW", dense_dW},
    {"lora_step_adamw", lora_step_adamw},
    {"full_ft_step_adamw", full_ft_step_adamw},
};

void register_all(bool smoke) {
  // The issue's grid; --smoke keeps the code paths (N = 1 and N > 1, R = 1 and R > 1) at shapes CI runs in seconds.
  const std::vector<std::vector<int64_t>> grid =
      smoke ? std::vector<std::vector<int64_t>>{{1, 32}, {64}, {1, 8}}
            : std::vector<std::vector<int64_t>>{{1, 32, 512}, {1024, 4096}, {1, 8, 64}};
  for (const auto& [name, fn] : variants)
    benchmark::RegisterBenchmark(name, fn)
        ->ArgNames({"N", "D", "R"})
        ->ArgsProduct(grid)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();  // with several threads the main thread's CPU time is not the cost
}

// Passes everything to the console and keeps each run's time (the median when
// repetitions are on) to print ratios at the end.
class RatioReporter : public benchmark::ConsoleReporter {
 public:
  // Colours only on a terminal: a custom reporter does not get --benchmark_color, and logs should stay plain text.
  RatioReporter() : ConsoleReporter(isatty(STDOUT_FILENO) ? OO_Defaults : OO_Tabular) {}
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const auto& r : runs) {
      if (r.run_type == Run::RT_Aggregate && r.aggregate_name != "median") continue;
      std::string name = r.benchmark_name();
      if (r.run_type == Run::RT_Aggregate) name = name.substr(0, name.rfind('_'));
      const auto suffix = name.find("/real_time");
      if (suffix != std::string::npos) name.erase(suffix);
      times_[name] = r.GetAdjustedRealTime();
    }
    ConsoleReporter::ReportRuns(runs);
  }
  void print_ratios() const {
    const std::vector<std::pair<std::string, std::string>> pairs = {{"lora_forward", "dense_forward"},
                                                                    {"lora_forward_merged", "dense_forward"},
                                                                    {"naive_rebuild", "dense_forward"},
                                                                    {"lora_train_step", "dense_two_products"},
                                                                    {"full_ft_step", "dense_two_products"},
                                                                    {"full_ft_step", "lora_train_step"},
                                                                    {"dense_dx", "dense_forward"},
                                                                    {"dense_dW", "dense_forward"},
                                                                    {"full_ft_step_adamw", "lora_step_adamw"}};
    std::printf("\n%-22s %-20s %-22s %8s\n", "variant", "shape", "relative to", "ratio");
    for (const auto& [variant, base] : pairs)
      for (const auto& [name, t] : times_) {
        if (name.rfind(variant + "/", 0) != 0) continue;
        const std::string shape = name.substr(variant.size());
        auto it = times_.find(base + shape);
        if (it == times_.end()) continue;
        std::printf("%-22s %-20s %-22s %8.3f\n", variant.c_str(), shape.c_str() + 1, base.c_str(), t / it->second);
      }
  }

 private:
  std::map<std::string, double> times_;
};
}  // namespace

int main(int argc, char** argv) {
  const auto options = lora_bench::take_options(argc, argv);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  lora_bench::set_threads(options.threads, argv[0]);
  std::fputs(lora_bench::context_lines().c_str(), stdout);
  benchmark::AddCustomContext("lora_backend", lora_bench::backend_name());
  benchmark::AddCustomContext("lora_kernel", lora_bench::kernel_description());
  benchmark::AddCustomContext("lora_threads", std::to_string(lora_bench::backend_threads()));
  benchmark::AddCustomContext("lora_cpu", lora_bench::cpu_model());
  register_all(options.smoke);
  RatioReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  reporter.print_ratios();
  benchmark::Shutdown();
  return 0;
}
