// Products with a matrix stored in any WeightFormat, decoded tile by tile.
//
//   C (M, N) = A (M, K) · op(S)   (or C += ...)
//   op(S) = Sᵀ with S stored (N, K)   y = x Wᵀ for W (O, I); dx = dy W for W stored (I, O)
//   op(S) = S  with S stored (K, N)   dx = dy W for W (O, I); y = x Wᵀ for W stored (I, O)
//
// A and C are row-major float with leading dimensions lda, ldc. S is never
// decoded as a whole.
//
// M ≤ 4 (decoding a token, a few rows): bound by the bytes of S. Each row of S
// is decoded a chunk at a time into a buffer in L1 and used at once (dots
// for Sᵀ, axpys for S), so S is read once at the speed of its format.
//
// Larger M: a blocked product in the manner of BLIS / Goto's GEMM. S is
// decoded straight into the packed panel of B (KC × NC, NR columns a panel),
// once per call; A is packed into MR-row panels (MC × KC); an MR × NR
// micro-kernel keeps C in registers. The AVX-512 kernels are compiled for
// AVX-512 whatever the build's flags and chosen at run time from the CPU
// (QuantizedMatrix::has_avx512()); the portable ones are plain C++.
#pragma once

#ifndef LORA_INSIDE_LIBRARY
#error "lora/detail/qgemm.hpp is internal; include <lora/lora.hpp>"
#endif

#include <lora/quant.hpp>

#include <algorithm>
#include <cstring>
#include <vector>

namespace lora::detail {

struct QGemm {
  static constexpr Index MR = 12, NR = 32;       // micro-tile of C: 24 AVX-512 accumulators
  static constexpr Index KC = 256;               // depth of a packed panel: B's micro-panel (32 KiB) stays in L1
  static constexpr Index MC = 12 * MR;           // rows of A packed at once (144 × 256 floats, in L2)
  static constexpr Index NC = 4096;              // columns of B packed at once (256 × 4096 floats)
  static constexpr Index gemv_rows = 4;          // M at or below this: decode and use row by row
  static constexpr Index chunk = 1024;           // GEMV: values of S decoded at a time

  // Grow-only buffers, one set per thread: a steady-state product allocates nothing.
  struct Buffers {
    std::vector<float> a, b, row;
  };
  static Buffers& buffers() {
    thread_local Buffers buf;
    return buf;
  }
  static float* reserve(std::vector<float>& v, std::size_t n) {
    if (v.size() < n) v.resize(n);
    return v.data();
  }

  static void run(const float* A, Index lda, Index M, Index K, const QuantizedMatrix& S, bool transposed, float* C,
                  Index ldc, bool accumulate) {
    const Index N = transposed ? S.rows() : S.cols();
    if (M == 0 || N == 0) return;
    if (K == 0) {
      if (!accumulate)
        for (Index m = 0; m < M; ++m) std::fill(C + m * ldc, C + m * ldc + N, 0.0f);
      return;
    }
    if (M <= gemv_rows) return gemv(A, lda, M, K, S, transposed, C, ldc, accumulate);
    gemm(A, lda, M, K, N, S, transposed, C, ldc, accumulate);
  }

 private:
  // ---- few rows ----
  static void gemv(const float* A, Index lda, Index M, Index K, const QuantizedMatrix& S, bool transposed, float* C,
                   Index ldc, bool accumulate) {
    float* buf = reserve(buffers().row, chunk);
    const bool simd = QuantizedMatrix::has_avx512();
    if (transposed) {  // C[m, n] (+)= Σ_k A[m, k] S[n, k]: dots along S's rows
      const Index N = S.rows();
      for (Index n = 0; n < N; ++n) {
        float acc[gemv_rows] = {0, 0, 0, 0};
        for (Index k0 = 0; k0 < K; k0 += chunk) {
          const Index len = std::min(chunk, K - k0);
          S.decode(n, k0, len, buf);
          for (Index m = 0; m < M; ++m) acc[m] += dot(simd, A + m * lda + k0, buf, len);
        }
        for (Index m = 0; m < M; ++m) C[m * ldc + n] = accumulate ? C[m * ldc + n] + acc[m] : acc[m];
      }
      return;
    }
    const Index N = S.cols();  // C[m, :] (+)= Σ_k A[m, k] S[k, :]: axpys of S's rows
    if (!accumulate)
      for (Index m = 0; m < M; ++m) std::fill(C + m * ldc, C + m * ldc + N, 0.0f);
    for (Index n0 = 0; n0 < N; n0 += chunk) {
      const Index len = std::min(chunk, N - n0);
      for (Index k = 0; k < K; ++k) {
        S.decode(k, n0, len, buf);
        for (Index m = 0; m < M; ++m) axpy(simd, A[m * lda + k], buf, C + m * ldc + n0, len);
      }
    }
  }

  static float dot(bool simd, const float* x, const float* y, Index n) {
#ifdef LORA_X86_KERNELS
    if (simd) return dot_avx512(x, y, n);
#endif
    (void)simd;
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    Index i = 0;
    for (; i + 4 <= n; i += 4) {
      s0 += x[i] * y[i];
      s1 += x[i + 1] * y[i + 1];
      s2 += x[i + 2] * y[i + 2];
      s3 += x[i + 3] * y[i + 3];
    }
    for (; i < n; ++i) s0 += x[i] * y[i];
    return (s0 + s1) + (s2 + s3);
  }
  static void axpy(bool simd, float a, const float* x, float* y, Index n) {
#ifdef LORA_X86_KERNELS
    if (simd) return axpy_avx512(a, x, y, n);
#endif
    (void)simd;
    for (Index i = 0; i < n; ++i) y[i] += a * x[i];
  }

  // ---- many rows ----
  static void gemm(const float* A, Index lda, Index M, Index K, Index N, const QuantizedMatrix& S, bool transposed,
                   float* C, Index ldc, bool accumulate) {
    Buffers& buf = buffers();
    float* bpack = reserve(buf.b, static_cast<std::size_t>(KC * NC));
    float* apack = reserve(buf.a, static_cast<std::size_t>(MC * KC));
    float* row = reserve(buf.row, static_cast<std::size_t>(std::max(KC, NC)));
    const bool simd = QuantizedMatrix::has_avx512();
    for (Index jc = 0; jc < N; jc += NC) {
      const Index nc = std::min(NC, N - jc);
      for (Index pc = 0; pc < K; pc += KC) {
        const Index kc = std::min(KC, K - pc);
        pack_b(S, transposed, pc, kc, jc, nc, bpack, row);
        const bool add = accumulate || pc > 0;
        for (Index ic = 0; ic < M; ic += MC) {
          const Index mc = std::min(MC, M - ic);
          pack_a(A + ic * lda + pc, lda, mc, kc, apack);
          for (Index jr = 0; jr < nc; jr += NR) {
            const Index nr = std::min(NR, nc - jr);
            const float* bp = bpack + (jr / NR) * KC * NR;
            for (Index ir = 0; ir < mc; ir += MR) {
              const Index mr = std::min(MR, mc - ir);
              float* c = C + (ic + ir) * ldc + jc + jr;
              kernel(simd, kc, apack + (ir / MR) * MR * KC, bp, c, ldc, mr, nr, add);
            }
          }
        }
      }
    }
  }

  // B's block (kc, nc) at (pc, jc) into NR-column panels: panel p holds b[k * NR + j] = B(pc + k, jc + p·NR + j),
  // columns past nc zero. Each panel is KC·NR floats apart whatever kc is.
  static void pack_b(const QuantizedMatrix& S, bool transposed, Index pc, Index kc, Index jc, Index nc, float* bpack,
                     float* row) {
    const Index panels = (nc + NR - 1) / NR;
    if (nc % NR != 0) {  // zero the last panel's missing columns
      float* last = bpack + (panels - 1) * KC * NR;
      for (Index k = 0; k < kc; ++k) std::fill(last + k * NR + nc % NR, last + (k + 1) * NR, 0.0f);
    }
    if (transposed) {  // B(k, n) = S(n, k): S's row n gives column n of B
      for (Index n = 0; n < nc; ++n) {
        S.decode(jc + n, pc, kc, row);
        float* panel = bpack + (n / NR) * KC * NR + n % NR;
        for (Index k = 0; k < kc; ++k) panel[k * NR] = row[k];
      }
      return;
    }
    for (Index k = 0; k < kc; ++k) {  // B(k, n) = S(k, n): S's row k gives row k of every panel
      S.decode(pc + k, jc, nc, row);
      for (Index p = 0; p < panels; ++p)
        std::memcpy(bpack + p * KC * NR + k * NR, row + p * NR, static_cast<std::size_t>(std::min(NR, nc - p * NR)) * 4);
    }
  }

  // A's block (mc, kc) into MR-row panels: a[k * MR + i] = A(ir + i, k), rows past mc zero.
  static void pack_a(const float* A, Index lda, Index mc, Index kc, float* apack) {
    for (Index ir = 0; ir < mc; ir += MR) {
      float* panel = apack + (ir / MR) * MR * KC;
      const Index mr = std::min(MR, mc - ir);
      for (Index i = 0; i < mr; ++i) {
        const float* a = A + (ir + i) * lda;
        for (Index k = 0; k < kc; ++k) panel[k * MR + i] = a[k];
      }
      for (Index i = mr; i < MR; ++i)
        for (Index k = 0; k < kc; ++k) panel[k * MR + i] = 0.0f;
    }
  }

  // C (mr, nr) (+)= a-panel · b-panel over kc.
  static void kernel(bool simd, Index kc, const float* a, const float* b, float* C, Index ldc, Index mr, Index nr,
                     bool add) {
#ifdef LORA_X86_KERNELS
    if (simd) return kernel_avx512(kc, a, b, C, ldc, mr, nr, add);
#endif
    (void)simd;
    float acc[MR][NR] = {};
    for (Index k = 0; k < kc; ++k, a += MR, b += NR)
      for (Index i = 0; i < MR; ++i) {
        const float ai = a[i];
        for (Index j = 0; j < NR; ++j) acc[i][j] += ai * b[j];
      }
    for (Index i = 0; i < mr; ++i)
      for (Index j = 0; j < nr; ++j) C[i * ldc + j] = add ? C[i * ldc + j] + acc[i][j] : acc[i][j];
  }

#ifdef LORA_X86_KERNELS
  LORA_AVX512 static float dot_avx512(const float* x, const float* y, Index n) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();
    Index i = 0;
    for (; i + 64 <= n; i += 64) {
      s0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i), s0);
      s1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(y + i + 16), s1);
      s2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 32), _mm512_loadu_ps(y + i + 32), s2);
      s3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 48), _mm512_loadu_ps(y + i + 48), s3);
    }
    for (; i + 16 <= n; i += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i), s0);
    if (i < n) {
      const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
      s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, y + i), s1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
  }
  LORA_AVX512 static void axpy_avx512(float a, const float* x, float* y, Index n) {
    const __m512 av = _mm512_set1_ps(a);
    Index i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(av, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
    if (i < n) {
      const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
      _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, y + i)));
    }
  }

  LORA_AVX512 static void kernel_avx512(Index kc, const float* a, const float* b, float* C, Index ldc, Index mr,
                                        Index nr, bool add) {
#define LORA_QG_ZERO(i) __m512 c##i##0 = _mm512_setzero_ps(), c##i##1 = _mm512_setzero_ps();
#define LORA_QG_FMA(i)                                   \
  {                                                      \
    const __m512 ai = _mm512_set1_ps(a[i]);              \
    c##i##0 = _mm512_fmadd_ps(ai, b0, c##i##0);          \
    c##i##1 = _mm512_fmadd_ps(ai, b1, c##i##1);          \
  }
#define LORA_QG_ALL(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
    LORA_QG_ALL(LORA_QG_ZERO)
    for (Index k = 0; k < kc; ++k, a += MR, b += NR) {
      const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
      LORA_QG_ALL(LORA_QG_FMA)
    }
    alignas(64) float tile[MR][NR];
#define LORA_QG_STORE(i)                     \
  _mm512_store_ps(tile[i], c##i##0);         \
  _mm512_store_ps(tile[i] + 16, c##i##1);
    LORA_QG_ALL(LORA_QG_STORE)
#undef LORA_QG_STORE
#undef LORA_QG_ALL
#undef LORA_QG_FMA
#undef LORA_QG_ZERO
    const __mmask16 m0 = static_cast<__mmask16>(nr >= 16 ? 0xffff : (1u << nr) - 1);
    const __mmask16 m1 = static_cast<__mmask16>(nr >= 32 ? 0xffff : nr <= 16 ? 0 : (1u << (nr - 16)) - 1);
    for (Index i = 0; i < mr; ++i) {
      float* c = C + i * ldc;
      __m512 v0 = _mm512_load_ps(tile[i]), v1 = _mm512_load_ps(tile[i] + 16);
      if (add) {
        v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, c));
        v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, c + 16));
      }
      _mm512_mask_storeu_ps(c, m0, v0);
      _mm512_mask_storeu_ps(c + 16, m1, v1);
    }
  }
#endif
};

}  // namespace lora::detail
