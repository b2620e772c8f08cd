// The float products of FrozenWeight on oneDNN's sgemm, when LORA_USE_DNNL is defined (CMake: link lora::dnnl, or
// build this project with LORA_USE_DNNL, on by default where libdnnl-dev is installed).
//
// Why: FrozenWeight's products are nearly all of a LoRA layer's time, and Eigen's GEMM runs them at 76-89% of the
// fastest float GEMM on the project's Xeon, oneDNN's at 96-100% (bench_gemm, bench/RESULTS.md). oneDNN picks its kernel
// from the CPU at run time (a JIT for AVX2, AVX-512, ...), so one binary runs near the best kernel of whichever machine
// it lands on.
//
// Threads. Debian's oneDNN runs on OpenMP (libgomp), whose pool defaults to every core. Every call here sets the
// calling thread's OpenMP thread count to Eigen::nbThreads() for its duration, the knob Eigen's own products follow:
// one thread unless the program is compiled with OpenMP (then OMP_NUM_THREADS or Eigen::setNbThreads()). So turning
// oneDNN on changes how fast a product runs, never how many cores it takes. Called inside an OpenMP parallel region,
// oneDNN runs on the calling thread alone.
//
// Only this header includes oneDNN; <lora/detail/gemm.hpp> includes it only under LORA_USE_DNNL (CONVENTIONS.md 13).
#pragma once

#include <lora/errors.hpp>
#include <lora/types.hpp>

#include <oneapi/dnnl/dnnl.h>

#include <Eigen/Core>
#include <new>
#include <string>

#if DNNL_CPU_THREADING_RUNTIME == DNNL_RUNTIME_OMP
// OpenMP's own declarations, so that no -fopenmp (which would also turn on Eigen's threads) is needed; lora::dnnl
// links the runtime (libgomp) that oneDNN itself runs on.
extern "C" {
int omp_get_max_threads(void);
void omp_set_num_threads(int);
}
#endif

namespace lora::detail {

/// C (M, N) = alpha op(A) op(B) + beta C, every matrix row-major with leading dimension ld*, op(X) = Xᵀ when
/// trans_x. beta is 0 (C's old values, NaN included, are never read) or 1. `where` names the caller in errors.
inline void dnnl_gemm(const char* where, bool trans_a, bool trans_b, Index M, Index N, Index K, float alpha,
                      const float* A, Index lda, const float* B, Index ldb, float beta, float* C, Index ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    // Nothing to add: an empty product is zero. oneDNN refuses K = 0, so it is done here.
    if (beta == 0.0f)
      for (Index i = 0; i < M; ++i)
        for (Index j = 0; j < N; ++j) C[i * ldc + j] = 0.0f;
    return;
  }
#if DNNL_CPU_THREADING_RUNTIME == DNNL_RUNTIME_OMP
  struct Threads {
    int saved = omp_get_max_threads();
    int wanted = Eigen::nbThreads();
    Threads() {
      if (wanted != saved) omp_set_num_threads(wanted);
    }
    ~Threads() {
      if (wanted != saved) omp_set_num_threads(saved);
    }
  } threads;
#endif
  const dnnl_status_t status =
      dnnl_sgemm(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  if (status == dnnl_success) return;
  if (status == dnnl_out_of_memory) throw std::bad_alloc();
  throw error(std::string(where) + ": oneDNN's sgemm failed with status " + std::to_string(int(status)) +
              " for M=" + std::to_string(M) + ", N=" + std::to_string(N) + ", K=" + std::to_string(K) +
              ", lda=" + std::to_string(lda) + ", ldb=" + std::to_string(ldb) + ", ldc=" + std::to_string(ldc));
}

/// The leading dimension oneDNN is given for a row-major block: its outer stride, or its width when it has one row
/// (a single row's stride is never used, and Eigen may report any value for it).
template <class Block>
Index dnnl_leading_dimension(const Block& m) {
  return m.rows() > 1 ? Index(m.outerStride()) : Index(m.cols());
}

}  // namespace lora::detail
