// Builds a rank-4 adapter on a 16 -> 8 layer, with lora installed (find_package/) or built as a subproject
// (add_subdirectory/); fails unless the trainable count is R * (I + O) and the forward matches a naive product.
// With LORA_CONSUMER_EXPECT_<NAME> (consumer.cmake: linked lora::native, lora::openblas, lora::openmp, lora::mpi,
// lora::dnnl)
// it also fails unless that target took effect in this file (lora::mpi: <lora/distributed.hpp> builds, links and
// trains one data-parallel step on MPI's singleton start).
#include <lora/lora.hpp>
#ifdef LORA_CONSUMER_EXPECT_MPI
#include <lora/distributed.hpp>
#endif

#include <cmath>
#include <cstdio>

#ifdef LORA_CONSUMER_EXPECT_OPENBLAS
#ifndef EIGEN_USE_BLAS
#error "lora::openblas is linked but EIGEN_USE_BLAS is not defined"
#endif
extern "C" char* openblas_get_corename(void);  // links only against OpenBLAS
#endif
#if defined(LORA_CONSUMER_EXPECT_OPENMP) && !defined(_OPENMP)
#error "lora::openmp is linked but this file is not compiled with OpenMP"
#endif
#if defined(LORA_CONSUMER_EXPECT_DNNL) && !defined(LORA_USE_DNNL)
#error "lora::dnnl is linked but LORA_USE_DNNL is not defined"
#endif

#ifdef __AVX2__
constexpr bool kCompiledWithAvx2 = true;
#else
constexpr bool kCompiledWithAvx2 = false;
#endif

int main(int argc, char** argv) {
#ifdef LORA_CONSUMER_EXPECT_MPI
  lora::mpi::Environment mpi(argc, argv);
#else
  (void)argc;
  (void)argv;
#endif
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

  // y = x Wᵀ + b + s · (x Aᵀ) Bᵀ against a loop in double: whichever GEMM runs (Eigen's, OpenBLAS's, oneDNN's,
  // threaded), the row-major products must be the right ones. 64 rows, so Eigen takes its GEMM path, not a lazy
  // product.
  layer.lora_B().setRandom();  // B starts at zero (PEFT); make the adapter path count
  const lora::Matrix<float> x = lora::Matrix<float>::Random(64, 16);
  lora::Matrix<float> y(64, 8);
  layer.forward(x, y);
  const auto W = layer.weight();
  const auto A = layer.lora_A();
  const auto B = layer.lora_B();
  double worst = 0;
  for (lora::Index n = 0; n < 64; ++n)
    for (lora::Index o = 0; o < 8; ++o) {
      double ref = layer.has_bias() ? double(layer.bias()(0, o)) : 0.0;
      for (lora::Index i = 0; i < 16; ++i) ref += double(x(n, i)) * W(o, i);
      for (lora::Index r = 0; r < 4; ++r) {
        double h = 0;
        for (lora::Index i = 0; i < 16; ++i) h += double(x(n, i)) * A(r, i);
        ref += layer.scaling() * h * B(o, r);
      }
      const double difference = std::fabs(ref - y(n, o));
      if (!(difference <= worst)) worst = difference;  // a NaN sticks
    }
  std::printf("forward: largest difference from the naive product %.2g\n", worst);
  if (!(worst < 1e-4)) return 1;

#if defined(LORA_CONSUMER_EXPECT_NATIVE) && (defined(__x86_64__) || defined(__i386__))
  // lora::native: -march=native reached this file, so on a CPU with AVX2 the compiler was allowed to use it.
  if (__builtin_cpu_supports("avx2") && !kCompiledWithAvx2) {
    std::printf("lora::native is linked and this CPU has AVX2, but __AVX2__ is not defined\n");
    return 1;
  }
#endif
#ifdef LORA_CONSUMER_EXPECT_NATIVE
  std::printf("lora::native: Eigen uses %s\n", Eigen::SimdInstructionSetsInUse());
#endif
#ifdef LORA_CONSUMER_EXPECT_OPENBLAS
  std::printf("lora::openblas: OpenBLAS core %s\n", openblas_get_corename());
#endif
#ifdef LORA_CONSUMER_EXPECT_OPENMP
  std::printf("lora::openmp: Eigen may use %d threads\n", Eigen::nbThreads());
#endif
#ifdef LORA_CONSUMER_EXPECT_DNNL
  // The forward checked against a naive product above ran on oneDNN.
  std::printf("lora::dnnl: the frozen weight's products run on %s\n", lora::float_gemm_backend());
#endif
#ifdef LORA_CONSUMER_EXPECT_MPI
  {
    // One data-parallel step over MPI: the gradient the reduction hands back is the one backward left.
    lora::mpi::Communicator comm;
    lora::DataParallel<float>::Options o;
    o.global_batch = 64;
    lora::DataParallel<float> dp(comm, layer, o);
    lora::Matrix<float> dy = lora::Matrix<float>::Ones(64, 8);
    layer.backward(x, dy);
    const lora::Matrix<float> dB = layer.dB();
    dp.accumulate(1.0);
    const double loss = dp.reduce();
    if (comm.size() != 1 || loss != 1.0 || !(layer.dB() == dB)) {
      std::printf("lora::mpi: %d rank(s), loss %g, gradient %s\n", comm.size(), loss,
                  layer.dB() == dB ? "kept" : "changed");
      return 1;
    }
    std::printf("lora::mpi: one data-parallel step on %d rank(s)\n", comm.size());
  }
#endif
  return 0;
}
