// LoRALinear<float>::forward timed the way a consumer builds it: N = 512 rows, I = O = 1024, r = 8, the
// training-mode forward of examples/readme (y = x Wᵀ + s · (x Aᵀ) Bᵀ). Prints the median, fastest and slowest of
// --runs timed calls after three warm-up calls, with what this binary was built with (CMakeLists.txt).
//
//   speed_<variant> [--runs=K] [--threads=T] [--smoke]
//
// --threads: OpenBLAS's threads (speed_native_openblas) or Eigen's OpenMP threads (speed_native_openmp); the
// other builds run on one thread only. --smoke: a tiny shape and one run, to prove the program still works.
#include <lora/linear.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#ifdef EIGEN_USE_BLAS
extern "C" {
void openblas_set_num_threads(int num_threads);
char* openblas_get_corename(void);
}
#endif

namespace {

// Reads --name=<positive integer>; exits with a message on anything else.
bool take_int(const char* arg, const char* name, int& out) {
  const std::size_t n = std::strlen(name);
  if (std::strncmp(arg, name, n) != 0 || arg[n] != '=') return false;
  char* end = nullptr;
  const long value = std::strtol(arg + n + 1, &end, 10);
  if (end == arg + n + 1 || *end != '\0' || value < 1 || value > 100000) {
    std::fprintf(stderr, "%s: expected a positive integer, got \"%s\"\n", name, arg + n + 1);
    std::exit(1);
  }
  out = static_cast<int>(value);
  return true;
}

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "unknown";
}

}  // namespace

int main(int argc, char** argv) {
  int runs = 30, threads = 1;
  bool smoke = false;
  for (int i = 1; i < argc; ++i) {
    if (take_int(argv[i], "--runs", runs) || take_int(argv[i], "--threads", threads)) continue;
    if (std::strcmp(argv[i], "--smoke") == 0) {
      smoke = true;
      continue;
    }
    std::fprintf(stderr, "usage: %s [--runs=K] [--threads=T] [--smoke]; got \"%s\"\n", argv[0], argv[i]);
    return 1;
  }

  std::string kernel = std::string("Eigen GEMM, SIMD: ") + Eigen::SimdInstructionSetsInUse();
#if defined(EIGEN_USE_BLAS)
  openblas_set_num_threads(threads);
  kernel = std::string("OpenBLAS core ") + openblas_get_corename();
#elif defined(_OPENMP)
  Eigen::setNbThreads(threads);
  kernel += ", OpenMP";
#else
  if (threads != 1) {
    std::fprintf(stderr, "--threads=%d: this build runs on one thread (link lora::openblas or lora::openmp)\n",
                 threads);
    return 1;
  }
#endif

  const lora::Index N = smoke ? 16 : 512, I = smoke ? 32 : 1024, O = smoke ? 24 : 1024, R = 8;
  if (smoke) runs = 1;
  using Mat = lora::Matrix<float>;
  const Mat W = Mat::Random(O, I), x = Mat::Random(N, I);
  Mat y(N, O);
  lora::LoraConfig cfg;
  cfg.r = static_cast<int>(R);
  cfg.lora_alpha = 16;
  auto layer = lora::LoRALinear<float>::view(W.data(), O, I, cfg);
  layer.lora_B().setRandom();  // B starts at zero (PEFT); the time is the same, the checksum more telling

  using Clock = std::chrono::steady_clock;
  for (int warm = 0; warm < 3; ++warm) layer.forward(x, y);
  std::vector<double> ms;
  double checksum = 0;
  for (int run = 0; run < runs; ++run) {
    const auto start = Clock::now();
    layer.forward(x, y);
    const auto stop = Clock::now();
    ms.push_back(std::chrono::duration<double, std::milli>(stop - start).count());
    checksum += y(run % N, run % O);
  }
  std::sort(ms.begin(), ms.end());
  const double median = ms.size() % 2 ? ms[ms.size() / 2] : (ms[ms.size() / 2 - 1] + ms[ms.size() / 2]) / 2;
  // x Wᵀ, x Aᵀ and H Bᵀ: two flops per multiply-add.
  const double gflop = 2.0 * double(N) * (double(I) * double(O) + double(I) * R + double(R) * O) * 1e-9;
  std::printf("%-22s N=%ld I=%ld O=%ld r=%ld threads=%d runs=%d  median %.2f ms (min %.2f, max %.2f)  %.1f GFLOP/s\n",
              LORA_SPEED_VARIANT, static_cast<long>(N), static_cast<long>(I), static_cast<long>(O),
              static_cast<long>(R), threads, runs, median, ms.front(), ms.back(), gflop / (median * 1e-3));
  std::printf("%-22s %s; CPU %s; checksum %.3g\n", "", kernel.c_str(), cpu_model().c_str(), checksum);
  return std::isfinite(checksum) ? 0 : 1;
}
