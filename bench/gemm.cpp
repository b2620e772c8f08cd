// The library's float products against every float GEMM this machine has, measured in one run (issue 14: "the
// build a user gets by following the README runs float products at 90% or more of the fastest float GEMM on the
// machine it runs on").
//
// For each shape, y = x Wᵀ (forward) and dx = dy W (backward), W (O, I) row-major as FrozenWeight stores it:
//   library   FrozenWeight<float>::forward / backward, as every layer calls them (float_gemm_backend() says what
//             runs them in this build: oneDNN's sgemm where libdnnl-dev was found, Eigen otherwise)
//   Eigen     Eigen 3.4's product, as this build compiled it
//   oneDNN    dnnl_sgemm from libdnnl.so.2, loaded at run time when the machine has it
//   OpenBLAS  cblas_sgemm from libopenblas.so.0, loaded at run time when the machine has it, with the kernel it
//             picked for this CPU (OPENBLAS_CORETYPE is left as the caller set it)
// Every candidate runs once per round, in an order that rotates; a candidate's time is its median over the rounds.
// "library share" is the median over the rounds of (fastest other candidate's time / library time): 1.00 means as
// fast as the fastest, and the target is 0.90. One thread for every candidate (--threads=T for more, where the
// build allows it). Flags: --smoke (tiny shapes, 3 rounds: proves the program runs, judges nothing).
#include <lora/lora.hpp>

#include "bench_common.hpp"

#include <dlfcn.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

namespace {
using Mat = lora::Matrix<float>;
using lora::Index;

// The C interfaces, declared here so that the program builds without either library installed.
using dnnl_sgemm_fn = int (*)(char, char, std::int64_t, std::int64_t, std::int64_t, float, const float*, std::int64_t,
                              const float*, std::int64_t, float, float*, std::int64_t);
using dnnl_isa_fn = int (*)();
using cblas_sgemm_fn = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int, float,
                                float*, int);
constexpr int cblas_row_major = 101, cblas_no_trans = 111, cblas_trans = 112;

struct Candidate {
  std::string name;
  std::function<void()> forward, backward;
};

struct Shape {
  Index n, in, out;
  int rounds;
};

using lora_bench::median;
using lora_bench::seconds;

}  // namespace

int main(int argc, char** argv) {
  const auto options = lora_bench::take_options(argc, argv);
  if (argc > 1) {
    std::fprintf(stderr, "usage: %s [--smoke] [--threads=T]\n", argv[0]);
    return 2;
  }
  lora_bench::set_threads(options.threads, argv[0]);

  // The other libraries, loaded by name: absent ones are left out and said so.
  void* dnnl = dlopen("libdnnl.so.2", RTLD_NOW | RTLD_GLOBAL);
  auto dnnl_sgemm = dnnl ? reinterpret_cast<dnnl_sgemm_fn>(dlsym(dnnl, "dnnl_sgemm")) : nullptr;
  auto dnnl_isa = dnnl ? reinterpret_cast<dnnl_isa_fn>(dlsym(dnnl, "dnnl_get_effective_cpu_isa")) : nullptr;
  void* gomp = dlopen("libgomp.so.1", RTLD_NOW | RTLD_GLOBAL);
  auto omp_set_threads = gomp ? reinterpret_cast<void (*)(int)>(dlsym(gomp, "omp_set_num_threads")) : nullptr;
  if (omp_set_threads) omp_set_threads(options.threads);  // oneDNN's own pool, called directly below
  void* openblas = dlopen("libopenblas.so.0", RTLD_NOW | RTLD_GLOBAL);
  auto cblas_sgemm = openblas ? reinterpret_cast<cblas_sgemm_fn>(dlsym(openblas, "cblas_sgemm")) : nullptr;
  auto openblas_threads =
      openblas ? reinterpret_cast<void (*)(int)>(dlsym(openblas, "openblas_set_num_threads")) : nullptr;
  auto openblas_core = openblas ? reinterpret_cast<char* (*)()>(dlsym(openblas, "openblas_get_corename")) : nullptr;
  if (openblas_threads) openblas_threads(options.threads);

  std::fputs(lora_bench::context_lines().c_str(), stdout);
  std::printf("# library products: %s\n", lora::float_gemm_backend());
  std::printf("# Eigen: %d.%d.%d, SIMD %s\n", EIGEN_WORLD_VERSION, EIGEN_MAJOR_VERSION, EIGEN_MINOR_VERSION,
              Eigen::SimdInstructionSetsInUse());
  if (dnnl_sgemm)
    std::printf("# oneDNN: libdnnl.so.2, ISA %s\n",
                dnnl_isa ? lora_bench::dnnl_isa_name(dnnl_isa()).c_str() : "unknown");
  else
    std::printf("# oneDNN: not on this machine (libdnnl.so.2: %s)\n", dlerror());
  if (cblas_sgemm) {
    const char* coretype = std::getenv("OPENBLAS_CORETYPE");
    std::printf("# OpenBLAS: libopenblas.so.0, core %s (OPENBLAS_CORETYPE=%s)\n",
                openblas_core ? openblas_core() : "unknown", coretype ? coretype : "unset");
  } else {
    std::printf("# OpenBLAS: not on this machine\n");
  }

  // The shape (N = 512, 4096²), a decoded token (N = 1), GPT-2's c_attn (768 -> 2304) and the finetune
  // demo's first layer (784 -> 512, a batch of 64).
  const std::vector<Shape> shapes =
      options.smoke
          ? std::vector<Shape>{{4, 32, 48, 3}, {1, 64, 64, 3}}
          : std::vector<Shape>{{512, 4096, 4096, 15}, {1, 4096, 4096, 101}, {512, 768, 2304, 41}, {64, 784, 512, 201}};
  std::printf("\n%-24s %-8s %-26s %10s %8s %14s\n", "shape (N x I -> O)", "product", "candidate", "median us",
              "GFLOP/s", "library share");
  for (const Shape& sh : shapes) {
    const Mat W = Mat::Random(sh.out, sh.in), x = Mat::Random(sh.n, sh.in), dy = Mat::Random(sh.n, sh.out);
    Mat y(sh.n, sh.out), dx(sh.n, sh.in);
    const auto w = lora::FrozenWeight<float>::view(W.data(), sh.out, sh.in);
    const int N = int(sh.n), I = int(sh.in), O = int(sh.out);
    std::vector<Candidate> cands;
    cands.push_back({"library", [&] { w.forward(x, y); }, [&] { w.backward(dy, dx); }});
    cands.push_back({"Eigen", [&] { y.noalias() = x * W.transpose(); }, [&] { dx.noalias() = dy * W; }});
    if (dnnl_sgemm)
      cands.push_back({"oneDNN sgemm",
                       [&] { dnnl_sgemm('N', 'T', N, O, I, 1.0f, x.data(), I, W.data(), I, 0.0f, y.data(), O); },
                       [&] { dnnl_sgemm('N', 'N', N, I, O, 1.0f, dy.data(), O, W.data(), I, 0.0f, dx.data(), I); }});
    if (cblas_sgemm)
      cands.push_back({"OpenBLAS sgemm",
                       [&] {
                         cblas_sgemm(cblas_row_major, cblas_no_trans, cblas_trans, N, O, I, 1.0f, x.data(), I, W.data(),
                                     I, 0.0f, y.data(), O);
                       },
                       [&] {
                         cblas_sgemm(cblas_row_major, cblas_no_trans, cblas_no_trans, N, I, O, 1.0f, dy.data(), O,
                                     W.data(), I, 0.0f, dx.data(), I);
                       }});
    const double flops = 2.0 * double(sh.n) * double(sh.in) * double(sh.out);
    for (int backward = 0; backward < 2; ++backward) {
      const size_t k = cands.size();
      std::vector<std::vector<double>> t(k);
      for (auto& c : cands) (backward ? c.backward : c.forward)();  // warm-up: JIT, packing buffers, pages
      for (int r = 0; r < sh.rounds; ++r)
        for (size_t j = 0; j < k; ++j) {
          const size_t c = (j + size_t(r)) % k;
          t[c].push_back(seconds(backward ? cands[c].backward : cands[c].forward));
        }
      // The fastest other candidate by median, and the library's share of its speed round by round.
      size_t fastest = 1;
      for (size_t c = 2; c < k; ++c)
        if (median(t[c]) < median(t[fastest])) fastest = c;
      std::vector<double> share;
      for (int r = 0; r < sh.rounds; ++r) share.push_back(t[fastest][r] / t[0][r]);
      char shape[64];
      std::snprintf(shape, sizeof shape, "%ld x %ld -> %ld", long(sh.n), long(sh.in), long(sh.out));
      for (size_t c = 0; c < k; ++c) {
        const double m = median(t[c]);
        std::printf("%-24s %-8s %-26s %10.1f %8.1f", shape, backward ? "dy W" : "x Wt", cands[c].name.c_str(), m * 1e6,
                    flops / m * 1e-9);
        if (c == 0)
          std::printf(" %9.2f of %s\n", median(share), cands[fastest].name.c_str());
        else
          std::printf("\n");
      }
    }
  }
  return 0;
}
