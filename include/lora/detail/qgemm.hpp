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

#if defined(LORA_USE_DNNL)
#include <lora/detail/dnnl_gemm.hpp>
#endif

#if defined(LORA_X86_KERNELS) && defined(__linux__)
#define LORA_AMX_KERNELS 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#ifdef LORA_X86_KERNELS
// The int8 dot-product kernel: AVX-512 with VNNI, called only when the CPU has it (has_avx512_vnni()).
#define LORA_AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")))
#endif

// GCC 12.2 vectorises the portable int8 · int8 -> int32 dot products into wrong code when the target has AVX512_VNNI
// (-O2 -march=native on the project's Xeon: wrong sums; right at -O1, with -mno-avx512vnni, or under the
// sanitizers), so the portable int8 code is compiled without GCC's loop vectorizer.
#if defined(__GNUC__) && !defined(__clang__)
#define LORA_NO_TREE_VECTORIZE __attribute__((optimize("no-tree-vectorize")))
#else
#define LORA_NO_TREE_VECTORIZE
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

// GCC before 13 reports -W(maybe-)uninitialized inside its own AVX-512 intrinsics once they are inlined into the
// kernels below (_mm512_undefined_*, GCC bug 105593): false positives, silenced here only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace lora::detail {

struct QGemm {
  static constexpr Index MR = 12, NR = 32;  // micro-tile of C: 24 AVX-512 accumulators
  static constexpr Index KC = 256;          // depth of a packed panel: B's micro-panel (32 KiB) stays in L1
  static constexpr Index MC = 12 * MR;      // rows of A packed at once (144 × 256 floats, in L2)
  static constexpr Index NC = 1024;         // columns of B packed at once (256 × 1024 floats: 1 MiB, in L2)
  static constexpr Index gemv_rows = 4;     // M at or below this: decode and use row by row
  static constexpr Index int8_rows = 2;     // int8 products: M at or below this (float products beyond)
  static constexpr Index chunk = 1024;      // GEMV: values of S decoded at a time

  static constexpr Index KP = 256;  // bf16 products: k-pairs of a packed panel (512 values)

  // Grow-only buffers, one set per thread: a steady-state product allocates nothing.
  struct Buffers {
    std::vector<float> a, b, row, rounded, split, panel;
    std::vector<std::uint32_t> a16, b16;
    std::vector<std::uint16_t> x16, x16_row;
    std::vector<std::int8_t> x8;  // int8 products: A's rows quantised, their scales and corrections
    std::vector<float> x8_scale;
    std::vector<std::int32_t> x8_corr, x8_lane_corr;
    std::vector<std::int8_t> x8_split;
    std::vector<float> x8_lane_scale;
  };
  static Buffers& buffers() {
    thread_local Buffers buf;
    return buf;
  }
  template <class T>
  static T* reserve(std::vector<T>& v, std::size_t n) {
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
    if (S.products() == Products::int8 && transposed && M <= int8_rows && K % 32 == 0)
      return gemv_int8(A, lda, M, K, S, C, ldc, accumulate);
    if (S.products() == Products::bf16) {
      // The other operand rounded to bf16: with more than a few rows (and an even depth, so k-pairs never straddle
      // two rows of S) the bf16 dot-product kernel; otherwise the float path over the rounded rows, which gives the
      // same exact products.
      if (M > gemv_rows && K % 2 == 0) return gemm_bf16(A, lda, M, K, N, S, transposed, C, ldc, accumulate);
      float* rounded = reserve(buffers().rounded, static_cast<std::size_t>(M * K));
      for (Index m = 0; m < M; ++m) {
        std::copy(A + m * lda, A + m * lda + K, rounded + m * K);
        round_to_bf16(rounded + m * K, static_cast<std::size_t>(K));
      }
      A = rounded;
      lda = K;
    }
    if (M <= gemv_rows) return gemv(A, lda, M, K, S, transposed, C, ldc, accumulate);
#if defined(LORA_USE_DNNL)
    if (S.products() != Products::bf16) return gemm_dnnl(A, lda, M, K, N, S, transposed, C, ldc, accumulate);
#endif
    gemm(A, lda, M, K, N, S, transposed, C, ldc, accumulate);
  }

 private:
  // Each of v[0 .. n) rounded to the nearest bf16, ties to even (float_to_bf16): the operands of bf16 products.
  static void round_to_bf16(float* v, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) v[i] = bf16_to_float(float_to_bf16(v[i]));
  }

  // S's values from (row, col) into out, rounded to bf16 when S's products are bf16 (bf16 storage needs no rounding).
  static void decode_for_products(const QuantizedMatrix& S, Index row, Index col, Index count, float* out) {
    S.decode(row, col, count, out);
    if (S.products() == Products::bf16 && S.format() != WeightFormat::bf16)
      round_to_bf16(out, static_cast<std::size_t>(count));
  }

#if defined(LORA_USE_DNNL)
  // Float products of more than gemv_rows rows under LORA_USE_DNNL: S decoded dnnl_panel outputs at a time into a
  // float panel (4 MiB at a depth of 4096), each panel's product on oneDNN's sgemm, the float layers' GEMM. Never
  // more of W in float than one panel. Measured against the float product on oneDNN (Xeon, 4096², one thread,
  // medians of paired runs), q8_0 / NF4: x Wᵀ at M = 512 1.13 / 1.12 (1.35 / 1.27 with the packed kernel below),
  // at M = 16 1.12 / 1.10 (1.83 / 1.52). Panels of 512 were no better overall.
  static constexpr Index dnnl_panel = 256;
  static void gemm_dnnl(const float* A, Index lda, Index M, Index K, Index N, const QuantizedMatrix& S, bool transposed,
                        float* C, Index ldc, bool accumulate) {
    float* panel = reserve(buffers().panel, static_cast<std::size_t>(std::min(dnnl_panel, N) * K));
    for (Index j = 0; j < N; j += dnnl_panel) {
      const Index n = std::min(dnnl_panel, N - j);
      if (transposed) {  // S (N, K): its rows j .. j + n, (n, K)
        for (Index r = 0; r < n; ++r) S.decode(j + r, 0, K, panel + r * K);
        dnnl_gemm("QGemm", false, true, M, n, K, 1.0f, A, lda, panel, K, accumulate ? 1.0f : 0.0f, C + j, ldc);
      } else {  // S (K, N): columns j .. j + n of every row, (K, n)
        for (Index k = 0; k < K; ++k) S.decode(k, j, n, panel + k * n);
        dnnl_gemm("QGemm", false, false, M, n, K, 1.0f, A, lda, panel, n, accumulate ? 1.0f : 0.0f, C + j, ldc);
      }
    }
  }
#endif

  // ---- int8 products: q8_0 and NF4, x Wᵀ over at most int8_rows rows (Products::int8) ----
  //
  // Each block of 32 values of A's rows is quantised to int8 as llama.cpp quantises activations for q8_0
  // (d = amax / 127, q = x / d to nearest, ties to even), and dotted with W's block in integers: exact, and on
  // AVX512_VNNI 32 products an instruction. The dot product instruction multiplies unsigned by signed bytes, so
  // W's codes go in as w + 128 (one xor; every int8 w fits) and 128 · Σ q, kept per block of x, is taken off.
  // Measured on the Xeon (4096², one thread, session program, medians of 41), against float products over the same
  // q8_0 bytes and the float product on oneDNN: one row 0.73-0.74 ms, 0.98-0.99, 2.41; two rows 1.28-1.30, 1.53-1.54,
  // 2.39-2.43; four rows 2.70-2.74, 2.54-2.61, 4.81. So two rows at most: beyond, the float kernels share each
  // decoded value among the rows and win. NF4, one row, alternating with the float product (colder caches):
  // 0.51-0.56 ms against 0.70-0.76 for float products and 2.56-2.66 for float.
  struct Int8Rows {
    std::int8_t* q;      // (M, K) codes
    float* d;            // (M, K / 32) scales
    std::int32_t* corr;  // (M, K / 32) 128 · Σ q over each block
  };
  LORA_NO_TREE_VECTORIZE static Int8Rows quantize_rows_int8(const float* A, Index lda, Index M, Index K) {
    const Index blocks = K / 32;
    Buffers& b = buffers();
    Int8Rows x{reserve(b.x8, static_cast<std::size_t>(M * K)),
               reserve(b.x8_scale, static_cast<std::size_t>(M * blocks)),
               reserve(b.x8_corr, static_cast<std::size_t>(M * blocks))};
    for (Index m = 0; m < M; ++m)
      for (Index blk = 0; blk < blocks; ++blk) {
        const float* v = A + m * lda + blk * 32;
        std::int8_t* q = x.q + m * K + blk * 32;
        float amax = 0.0f;
        bool finite = true;
        for (int j = 0; j < 32; ++j) {
          finite = finite && std::isfinite(v[j]);
          amax = std::max(amax, std::fabs(v[j]));
        }
        std::int32_t sum = 0;
        if (!finite) {  // NaN or infinity in x: the block's products are NaN, as a float product's would be (or ±inf)
          std::fill(q, q + 32, std::int8_t(0));
          x.d[m * blocks + blk] = std::numeric_limits<float>::quiet_NaN();
        } else {
          const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
          for (int j = 0; j < 32; ++j) {
            const float r = std::nearbyint(v[j] * id);  // the default rounding mode: to nearest, ties to even
            q[j] = static_cast<std::int8_t>(std::min(127.0f, std::max(-127.0f, r)));
            sum += q[j];
          }
          x.d[m * blocks + blk] = d;
        }
        x.corr[m * blocks + blk] = 128 * sum;
      }
    return x;
  }
  LORA_NO_TREE_VECTORIZE static void gemv_int8(const float* A, Index lda, Index M, Index K, const QuantizedMatrix& S,
                                               float* C, Index ldc, bool accumulate) {
    const QuantizedMatrix::State& s = *S.s_;
    const Int8Rows x = quantize_rows_int8(A, lda, M, K);
    if (s.format == WeightFormat::nf4) return gemv_int8_nf4(s, x, M, K, C, ldc, accumulate);
#ifdef LORA_X86_KERNELS
    if (QuantizedMatrix::has_avx512_vnni()) {
      if (M == 1) return gemv_int8_vnni<1>(s, x, K, C, ldc, accumulate);
      return gemv_int8_vnni<2>(s, x, K, C, ldc, accumulate);
    }
#endif
    const Index N = s.rows, blocks = K / 32;
    for (Index n = 0; n < N; ++n)
      for (Index m = 0; m < M; ++m) {
        float acc = 0.0f;
        for (Index blk = 0; blk < blocks; ++blk) {
          const std::uint8_t* w = QuantizedMatrix::bytes_of<WeightFormat::q8_0>(
              s, static_cast<std::size_t>(n) * static_cast<std::size_t>(K) + static_cast<std::size_t>(blk * 32));
          const std::int8_t* q = x.q + m * K + blk * 32;
          std::int32_t dot = 0;
          for (int j = 0; j < 32; ++j) dot += static_cast<std::int32_t>(static_cast<std::int8_t>(w[2 + j])) * q[j];
          const float dw = half_to_float(static_cast<std::uint16_t>(w[0] | (w[1] << 8)));
          acc += static_cast<float>(dot) * (dw * x.d[m * blocks + blk]);
        }
        C[m * ldc + n] = accumulate ? C[m * ldc + n] + acc : acc;
      }
  }
  // NF4: the 16 code values as int8 (code · 127 / max |code|, to nearest), and the factor that undoes it. The only
  // rounding of W that int8 products add: at most absmax · max |code| / 254 a value (0.4% of the block's absmax).
  struct Nf4Int8Codes {
    std::int8_t c[16];
    float unit;  // max |code| / 127
  };
  static Nf4Int8Codes nf4_int8_codes(const QuantizedMatrix::State& s) {
    Nf4Int8Codes t{};
    float cmax = 0.0f;
    for (float v : s.code) cmax = std::max(cmax, std::fabs(v));
    t.unit = cmax / 127.0f;
    for (int i = 0; i < 16; ++i)
      t.c[i] =
          static_cast<std::int8_t>(cmax > 0.0f ? std::nearbyint(s.code[static_cast<std::size_t>(i)] / t.unit) : 0.0f);
    return t;
  }
  LORA_NO_TREE_VECTORIZE static void gemv_int8_nf4(const QuantizedMatrix::State& s, const Int8Rows& x, Index M, Index K,
                                                   float* C, Index ldc, bool accumulate) {
    const Nf4Int8Codes t = nf4_int8_codes(s);
#ifdef LORA_X86_KERNELS
    if (QuantizedMatrix::has_avx512_vnni() && K % nf4_run == 0 && s.block % 64 == 0) {
      if (M == 1) return gemv_int8_nf4_vnni<1>(s, t, x, K, C, ldc, accumulate);
      return gemv_int8_nf4_vnni<2>(s, t, x, K, C, ldc, accumulate);
    }
#endif
    // Exact integer products in groups of 8 values along the row, as the kernel's lanes take them: a group shares
    // x's scale (blocks of 32) and W's absmax (blocks of a power of two from 32; rows a multiple of 32 values).
    const Index N = s.rows, blocks = K / 32;
    for (Index n = 0; n < N; ++n)
      for (Index m = 0; m < M; ++m) {
        float acc = 0.0f;
        for (Index k0 = 0; k0 < K; k0 += 8) {
          const std::size_t e0 =
              static_cast<std::size_t>(n) * static_cast<std::size_t>(K) + static_cast<std::size_t>(k0);
          std::int32_t dot = 0;
          for (std::size_t e = e0; e < e0 + 8; ++e) {
            const std::uint8_t byte = s.data[e / 2];
            dot += static_cast<std::int32_t>(t.c[(e % 2 == 0) ? byte >> 4 : byte & 0xf]) *
                   x.q[m * K + k0 + static_cast<Index>(e - e0)];
          }
          acc += static_cast<float>(dot) * (s.absmax_at(e0) * t.unit * x.d[m * blocks + k0 / 32]);
        }
        C[m * ldc + n] = accumulate ? C[m * ldc + n] + acc : acc;
      }
  }
#ifdef LORA_X86_KERNELS
  // Runs of 128 values (64 bytes): byte i holds value 2i (high nibble) and 2i + 1 (low). Each nibble plane is
  // looked up in the int8 codes stored as unsigned (code + 128, vpshufb's 16-entry table), and dotted with x's
  // codes for the even or odd values (signed): lane j sums values 8j .. 8j + 7, so lanes 0-7 share one absmax
  // block and each 4 lanes one block of x. The 128 · Σ x the unsigned codes add is taken off per lane.
  template <int M>
  LORA_AVX512_VNNI static void gemv_int8_nf4_vnni(const QuantizedMatrix::State& s, const Nf4Int8Codes& t,
                                                  const Int8Rows& x, Index K, float* C, Index ldc, bool accumulate) {
    constexpr int RS = M == 1 ? 8 : 4;
    const Index N = s.rows, runs = K / nf4_run, blocks = K / 32;
    // x per run: its even and odd values (64 bytes each), each lane's −128 · Σ x and each lane's scale of x
    Buffers& b = buffers();
    std::int8_t* xe = reserve(b.x8_split, static_cast<std::size_t>(2 * M * K));
    std::int32_t* corr = reserve(b.x8_lane_corr, static_cast<std::size_t>(M * K / 8));
    float* dx = reserve(b.x8_lane_scale, static_cast<std::size_t>(M * K / 8));
    for (Index m = 0; m < M; ++m)
      for (Index run = 0; run < runs; ++run) {
        const std::int8_t* q = x.q + m * K + run * nf4_run;
        std::int8_t* even = xe + (m * runs + run) * 2 * 64;
        for (int i = 0; i < 64; ++i) {
          even[i] = q[2 * i];
          even[64 + i] = q[2 * i + 1];
        }
        for (int lane = 0; lane < 16; ++lane) {
          std::int32_t sum = 0;
          for (int v = 0; v < 8; ++v) sum += q[8 * lane + v];
          corr[(m * runs + run) * 16 + lane] = -128 * sum;
          dx[(m * runs + run) * 16 + lane] = x.d[m * blocks + (run * nf4_run + 8 * lane) / 32] * t.unit;
        }
      }
    alignas(16) std::uint8_t table16[16];
    for (int i = 0; i < 16; ++i) table16[i] = static_cast<std::uint8_t>(t.c[i] + 128);
    const __m512i table = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(table16)));
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    for (Index n0 = 0; n0 < N; n0 += RS) {
      const int rs = static_cast<int>(std::min<Index>(RS, N - n0));
      __m512 acc[RS][M];
      for (int r = 0; r < RS; ++r)
        for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
      for (Index run = 0; run < runs; ++run) {
        for (int r = 0; r < rs; ++r) {
          const std::size_t e =
              static_cast<std::size_t>(n0 + r) * static_cast<std::size_t>(K) + static_cast<std::size_t>(run * nf4_run);
          const std::uint8_t* p = QuantizedMatrix::bytes_of<WeightFormat::nf4>(s, e);
          prefetch(p);
          const __m512i v = _mm512_loadu_si512(p);
          const __m512i hi = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(v, 4), low4));
          const __m512i lo = _mm512_shuffle_epi8(table, _mm512_and_si512(v, low4));
          const __m512 absmax =
              _mm512_insertf32x8(_mm512_set1_ps(s.absmax_at(e)), _mm256_set1_ps(s.absmax_at(e + 64)), 1);
          for (int m = 0; m < M; ++m) {
            const std::int8_t* xr = xe + (m * runs + run) * 2 * 64;
            __m512i dot = _mm512_loadu_si512(corr + (m * runs + run) * 16);
            dot = _mm512_dpbusd_epi32(dot, hi, _mm512_loadu_si512(xr));
            dot = _mm512_dpbusd_epi32(dot, lo, _mm512_loadu_si512(xr + 64));
            const __m512 scale = _mm512_mul_ps(absmax, _mm512_loadu_ps(dx + (m * runs + run) * 16));
            acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r][m]);
          }
        }
      }
      for (int r = 0; r < rs; ++r)
        for (int m = 0; m < M; ++m) {
          const float v = _mm512_reduce_add_ps(acc[r][m]);
          C[m * ldc + n0 + r] = accumulate ? C[m * ldc + n0 + r] + v : v;
        }
    }
  }
#endif
#ifdef LORA_X86_KERNELS
  template <int M>
  LORA_AVX512_VNNI static void gemv_int8_vnni(const QuantizedMatrix::State& s, const Int8Rows& x, Index K, float* C,
                                              Index ldc, bool accumulate) {
    // Rows of S side by side: with one row of x, 12 streams measured best (Xeon, 4096², against 8: 0.93-0.96 ms
    // against 1.00-1.02, one row at a time 1.4-1.8); with two, dot_streams<2>.
    constexpr int RS = M == 1 ? 12 : dot_streams<M>;
    const Index N = s.rows, blocks = K / 32;
    const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
    for (Index n0 = 0; n0 < N; n0 += RS) {
      const int rs = static_cast<int>(std::min<Index>(RS, N - n0));
      __m256 acc[RS][M];
      for (int r = 0; r < RS; ++r)
        for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
      for (Index blk = 0; blk < blocks; ++blk) {
        __m256i xq[M], corr[M];
        __m256 dx[M];
        for (int m = 0; m < M; ++m) {
          xq[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + m * K + blk * 32));
          corr[m] = _mm256_setr_epi32(-x.corr[m * blocks + blk], 0, 0, 0, 0, 0, 0, 0);
          dx[m] = _mm256_set1_ps(x.d[m * blocks + blk]);
        }
        for (int r = 0; r < rs; ++r) {
          const std::uint8_t* w = QuantizedMatrix::bytes_of<WeightFormat::q8_0>(
              s, static_cast<std::size_t>(n0 + r) * static_cast<std::size_t>(K) + static_cast<std::size_t>(blk * 32));
          prefetch(w);
          const __m256i wu = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 2)), flip);
          const __m256 dw = _mm256_set1_ps(_cvtsh_ss(static_cast<unsigned short>(w[0] | (w[1] << 8))));
          for (int m = 0; m < M; ++m) {
            // Σ (w + 128) q − 128 Σ q, the correction in lane 0 before the products are added
            const __m256i dot = _mm256_dpbusd_epi32(corr[m], wu, xq[m]);
            acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(dw, dx[m]), acc[r][m]);
          }
        }
      }
      for (int r = 0; r < rs; ++r)
        for (int m = 0; m < M; ++m) {
          const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[r][m]), _mm256_extractf128_ps(acc[r][m], 1));
          const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
          const float v = _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
          C[m * ldc + n0 + r] = accumulate ? C[m * ldc + n0 + r] + v : v;
        }
    }
  }
#endif

  // ---- few rows ----
  static void gemv(const float* A, Index lda, Index M, Index K, const QuantizedMatrix& S, bool transposed, float* C,
                   Index ldc, bool accumulate) {
#ifdef LORA_X86_KERNELS
    const bool rounds = S.products() == Products::bf16 && S.format() != WeightFormat::bf16;
    if (QuantizedMatrix::has_avx512() && gemv_fused(A, lda, M, K, S, transposed, rounds, C, ldc, accumulate)) return;
#endif
    float* buf = reserve(buffers().row, chunk);
    const bool simd = QuantizedMatrix::has_avx512();
    if (transposed) {  // C[m, n] (+)= Σ_k A[m, k] S[n, k]: dots along S's rows
      const Index N = S.rows();
      for (Index n = 0; n < N; ++n) {
        float acc[gemv_rows] = {0, 0, 0, 0};
        for (Index k0 = 0; k0 < K; k0 += chunk) {
          const Index len = std::min(chunk, K - k0);
          decode_for_products(S, n, k0, len, buf);
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
        decode_for_products(S, k, n0, len, buf);
        for (Index m = 0; m < M; ++m) axpy(simd, A[m * lda + k], buf, C + m * ldc + n0, len);
      }
    }
  }

#ifdef LORA_X86_KERNELS
  // Fused few-row products: S decoded 32 (Sᵀ) or 64 (S) values at a time straight into registers and used there.
  // Returns false when S's blocks do not line up with those runs (an NF4 row length that is not a multiple of 32,
  // or, for S, column counts that are not a multiple of 64), leaving the work to the buffered path.
  using State = QuantizedMatrix::State;

  // rounds: bf16 products over a format other than bf16, so each decoded value of S is rounded to bf16 in its
  // register before use (A is rounded already), as decode_for_products rounds it in the buffered path.
  static bool gemv_fused(const float* A, Index lda, Index M, Index K, const QuantizedMatrix& S, bool transposed,
                         bool rounds, float* C, Index ldc, bool accumulate) {
    const State& s = *S.s_;
    const Index cols = s.cols;
    if (transposed ? (s.format == WeightFormat::nf4 && cols % 32 != 0) : cols % 64 != 0) return false;
    switch (s.format) {
      case WeightFormat::f32:
        return rounds ? gemv_fused_m<WeightFormat::f32, true>(s, A, lda, M, K, transposed, C, ldc, accumulate)
                      : gemv_fused_m<WeightFormat::f32, false>(s, A, lda, M, K, transposed, C, ldc, accumulate);
      case WeightFormat::bf16:  // bf16 values need no rounding
        return gemv_fused_m<WeightFormat::bf16, false>(s, A, lda, M, K, transposed, C, ldc, accumulate);
      case WeightFormat::f16:
        return rounds ? gemv_fused_m<WeightFormat::f16, true>(s, A, lda, M, K, transposed, C, ldc, accumulate)
                      : gemv_fused_m<WeightFormat::f16, false>(s, A, lda, M, K, transposed, C, ldc, accumulate);
      case WeightFormat::q8_0:
        return rounds ? gemv_fused_m<WeightFormat::q8_0, true>(s, A, lda, M, K, transposed, C, ldc, accumulate)
                      : gemv_fused_m<WeightFormat::q8_0, false>(s, A, lda, M, K, transposed, C, ldc, accumulate);
      case WeightFormat::nf4:
        return rounds ? gemv_fused_m<WeightFormat::nf4, true>(s, A, lda, M, K, transposed, C, ldc, accumulate)
                      : gemv_fused_m<WeightFormat::nf4, false>(s, A, lda, M, K, transposed, C, ldc, accumulate);
    }
    return false;
  }
  template <WeightFormat F, bool Round>
  static bool gemv_fused_m(const State& s, const float* A, Index lda, Index M, Index K, bool transposed, float* C,
                           Index ldc, bool accumulate) {
    switch (M) {
      case 1:
        transposed ? gemv_dots<F, 1, Round>(s, A, lda, K, C, ldc, accumulate)
                   : gemv_axpys<F, 1, Round>(s, A, lda, K, C, ldc, accumulate);
        return true;
      case 2:
        transposed ? gemv_dots<F, 2, Round>(s, A, lda, K, C, ldc, accumulate)
                   : gemv_axpys<F, 2, Round>(s, A, lda, K, C, ldc, accumulate);
        return true;
      case 3:
        transposed ? gemv_dots<F, 3, Round>(s, A, lda, K, C, ldc, accumulate)
                   : gemv_axpys<F, 3, Round>(s, A, lda, K, C, ldc, accumulate);
        return true;
      case 4:
        transposed ? gemv_dots<F, 4, Round>(s, A, lda, K, C, ldc, accumulate)
                   : gemv_axpys<F, 4, Round>(s, A, lda, K, C, ldc, accumulate);
        return true;
      default:
        return false;
    }
  }

  // Each value rounded to the nearest bf16, ties to even (float_to_bf16 for finite values; W's values are finite).
  LORA_AVX512 static __m512 round_to_bf16(__m512 w) {
    const __m512i u = _mm512_castps_si512(w);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i up = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    return _mm512_castsi512_ps(_mm512_and_si512(up, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  // load32, then rounded to bf16 when Round.
  template <WeightFormat F, bool Round>
  LORA_AVX512 static void load32_for_products(const State& s, std::size_t e, __m512& w0, __m512& w1) {
    load32<F>(s, e, w0, w1);
    if constexpr (Round) {
      w0 = round_to_bf16(w0);
      w1 = round_to_bf16(w1);
    }
  }
  // The tail of a row (fewer than 32 values) decoded, and rounded to bf16 when Round.
  template <bool Round>
  static void decode_tail(const State& s, std::size_t e, std::size_t count, float* out) {
    QuantizedMatrix::decode_portable(s, e, count, out);
    if constexpr (Round) round_to_bf16(out, count);
  }

  // Values e .. e + 31 of S's flat array into two registers (QuantizedMatrix's decoder, shared with decode()).
  template <WeightFormat F>
  LORA_AVX512 static void load32(const State& s, std::size_t e, __m512& w0, __m512& w1) {
    QuantizedMatrix::decode32_avx512<F>(s, e, w0, w1);
  }

  // bf16 and NF4 hold 32 values as 16 pairs (a 32-bit word; a byte): splitting a pair needs no shuffle when x is
  // split the same way. xd holds A's rows with each run of 32 reordered as its 16 even then its 16 odd values.
  template <WeightFormat F>
  LORA_AVX512 static void load32_split(const State& s, std::size_t e, __m512& even, __m512& odd) {
    const std::uint8_t* p = QuantizedMatrix::bytes_of<F>(s, e);
    if constexpr (F == WeightFormat::bf16) {
      const __m512i v = _mm512_loadu_si512(p);  // lane i: value 2i in the low half, 2i + 1 in the high
      even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
    } else {  // NF4: byte i holds value 2i (high nibble) and 2i + 1 (low); scaled by the block's absmax by the caller
      const __m512 table = _mm512_loadu_ps(s.code.data());
      const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      even = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
      odd = _mm512_permutexvar_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(0xf)), table);
    }
  }

  // Rows of S read side by side by the dot kernels: with one row of A, 8 streams keep more of S's lines in flight
  // (Xeon, 4096², N = 1: bf16 0.63 -> 0.52 of the float product, q8_0 0.46 -> 0.42).
  template <int M>
  static constexpr int dot_streams = M == 1   ? 8
                                     : M == 2 ? 4
                                              : 2;
  // How far ahead of its reads each stream asks for S's bytes (_mm_prefetch never faults, past the end included).
  static constexpr std::size_t prefetch_bytes = 512;
  LORA_AVX512 static void prefetch(const std::uint8_t* p) {
    _mm_prefetch(reinterpret_cast<const char*>(p + prefetch_bytes), _MM_HINT_T0);
  }

  template <WeightFormat F, int M>
  LORA_AVX512 static void gemv_dots_split(const State& s, const float* A, Index lda, Index K, float* C, Index ldc,
                                          bool accumulate) {
    constexpr int RS = dot_streams<M>;
    const Index N = s.rows, K32 = K / 32 * 32;
    float* xd = reserve(buffers().split, static_cast<std::size_t>(M * K32));  // A may be in `rounded`
    for (int m = 0; m < M; ++m)
      for (Index k = 0; k < K32; k += 32)
        for (int i = 0; i < 16; ++i) {
          xd[m * K32 + k + i] = A[m * lda + k + 2 * i];
          xd[m * K32 + k + 16 + i] = A[m * lda + k + 2 * i + 1];
        }
    float tail[32];
    for (Index n0 = 0; n0 < N; n0 += RS) {
      const int rs = static_cast<int>(std::min<Index>(RS, N - n0));
      __m512 acc[RS][M];
      for (int r = 0; r < RS; ++r)
        for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
      for (Index k = 0; k < K32; k += 32) {
        for (int r = 0; r < rs; ++r) {
          const std::size_t e =
              static_cast<std::size_t>(n0 + r) * static_cast<std::size_t>(K) + static_cast<std::size_t>(k);
          prefetch(QuantizedMatrix::bytes_of<F>(s, e));
          __m512 even, odd;
          load32_split<F>(s, e, even, odd);
          if constexpr (F == WeightFormat::nf4) {
            const __m512 scale = _mm512_set1_ps(s.absmax_at(e));
            for (int m = 0; m < M; ++m) {
              const __m512 part = _mm512_fmadd_ps(_mm512_loadu_ps(xd + m * K32 + k + 16), odd,
                                                  _mm512_mul_ps(_mm512_loadu_ps(xd + m * K32 + k), even));
              acc[r][m] = _mm512_fmadd_ps(part, scale, acc[r][m]);
            }
          } else {
            for (int m = 0; m < M; ++m) {
              acc[r][m] = _mm512_fmadd_ps(_mm512_loadu_ps(xd + m * K32 + k), even, acc[r][m]);
              acc[r][m] = _mm512_fmadd_ps(_mm512_loadu_ps(xd + m * K32 + k + 16), odd, acc[r][m]);
            }
          }
        }
      }
      for (int r = 0; r < rs; ++r) {
        const std::size_t row = static_cast<std::size_t>(n0 + r) * static_cast<std::size_t>(K);
        float extra[M] = {};
        if (K32 < K) {
          QuantizedMatrix::decode_portable(s, row + static_cast<std::size_t>(K32), static_cast<std::size_t>(K - K32),
                                           tail);
          for (int m = 0; m < M; ++m)
            for (Index k = K32; k < K; ++k) extra[m] += A[m * lda + k] * tail[k - K32];
        }
        for (int m = 0; m < M; ++m) {
          const float v = _mm512_reduce_add_ps(acc[r][m]) + extra[m];
          C[m * ldc + n0 + r] = accumulate ? C[m * ldc + n0 + r] + v : v;
        }
      }
    }
  }

  // NF4 in runs of 128 values (64 bytes, one register): the 16 32-bit lanes hold values 8i .. 8i + 7, so the
  // nibble at bit 4j of lane i is value 8i + c_j (c = 1, 0, 3, 2, 5, 4, 7, 6: a byte's high nibble is the even
  // value). vpermps reads only the low 4 bits of each index, so each of the 8 nibble planes is one shift and one
  // table lookup, against an x reordered the same way (plane j of a run: x[8i + c_j], i = 0 .. 15). Lanes 0-7 of
  // a run lie in one absmax block and lanes 8-15 in one (blocks of 64 or more), so a run is scaled once, lane by
  // lane. 3.2 -> 5.4 bytes of S a cycle against the pairs of gemv_dots_split (Xeon, 4096², N = 1).
  static constexpr Index nf4_run = 128;
  template <int M>
  LORA_AVX512 static void gemv_dots_nf4(const State& s, const float* A, Index lda, Index K, float* C, Index ldc,
                                        bool accumulate) {
    // 4 rows of S side by side at M = 1, not dot_streams<1>'s 8: each run keeps 8 decoded registers live per row,
    // and 4 measured faster than 8 on the Xeon when this kernel was written (2026-12-05).
    constexpr int RS = M == 1 ? 4 : 2;
    static constexpr int c[8] = {1, 0, 3, 2, 5, 4, 7, 6};
    const Index N = s.rows;
    float* xr = reserve(buffers().split, static_cast<std::size_t>(M * K));
    for (int m = 0; m < M; ++m)
      for (Index run = 0; run < K; run += nf4_run)
        for (int j = 0; j < 8; ++j)
          for (int i = 0; i < 16; ++i) xr[m * K + run + 16 * j + i] = A[m * lda + run + 8 * i + c[j]];
    const __m512 table = _mm512_loadu_ps(s.code.data());
    for (Index n0 = 0; n0 < N; n0 += RS) {
      const int rs = static_cast<int>(std::min<Index>(RS, N - n0));
      __m512 acc[RS][M];
      for (int r = 0; r < RS; ++r)
        for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
      for (Index run = 0; run < K; run += nf4_run) {
        for (int r = 0; r < rs; ++r) {
          const std::size_t e =
              static_cast<std::size_t>(n0 + r) * static_cast<std::size_t>(K) + static_cast<std::size_t>(run);
          const std::uint8_t* p = QuantizedMatrix::bytes_of<WeightFormat::nf4>(s, e);
          prefetch(p);
          const __m512i v = _mm512_loadu_si512(p);
          __m512 w[8];
          w[0] = _mm512_permutexvar_ps(v, table);
          w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
          w[2] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 8), table);
          w[3] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 12), table);
          w[4] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 16), table);
          w[5] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 20), table);
          w[6] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 24), table);
          w[7] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 28), table);
          const __m512 scale =
              _mm512_insertf32x8(_mm512_set1_ps(s.absmax_at(e)), _mm256_set1_ps(s.absmax_at(e + 64)), 1);
          for (int m = 0; m < M; ++m) {
            const float* x = xr + m * K + run;
            __m512 s0 = _mm512_mul_ps(w[0], _mm512_loadu_ps(x));
            __m512 s1 = _mm512_mul_ps(w[1], _mm512_loadu_ps(x + 16));
            s0 = _mm512_fmadd_ps(w[2], _mm512_loadu_ps(x + 32), s0);
            s1 = _mm512_fmadd_ps(w[3], _mm512_loadu_ps(x + 48), s1);
            s0 = _mm512_fmadd_ps(w[4], _mm512_loadu_ps(x + 64), s0);
            s1 = _mm512_fmadd_ps(w[5], _mm512_loadu_ps(x + 80), s1);
            s0 = _mm512_fmadd_ps(w[6], _mm512_loadu_ps(x + 96), s0);
            s1 = _mm512_fmadd_ps(w[7], _mm512_loadu_ps(x + 112), s1);
            acc[r][m] = _mm512_fmadd_ps(_mm512_add_ps(s0, s1), scale, acc[r][m]);
          }
        }
      }
      for (int r = 0; r < rs; ++r)
        for (int m = 0; m < M; ++m) {
          const float v = _mm512_reduce_add_ps(acc[r][m]);
          C[m * ldc + n0 + r] = accumulate ? C[m * ldc + n0 + r] + v : v;
        }
    }
  }

  // C[m, n] (+)= Σ_k A[m, k] S[n, k], m < M: each row of S read once, 32 values a step, RS rows of S side by side
  // (independent streams and accumulator chains: one row at a time leaves the core waiting on memory).
  template <WeightFormat F, int M, bool Round>
  LORA_AVX512 static void gemv_dots(const State& s, const float* A, Index lda, Index K, float* C, Index ldc,
                                    bool accumulate) {
    // Rounding needs each decoded value on its own: the generic loop below, over load32's values.
    if constexpr (!Round && (F == WeightFormat::bf16 || F == WeightFormat::nf4)) {
      // NF4 runs of 32 must start at an even element: rows of a length that is a multiple of 32 (checked above)
      if constexpr (F == WeightFormat::nf4)
        if (K % nf4_run == 0 && s.block % 64 == 0) return gemv_dots_nf4<M>(s, A, lda, K, C, ldc, accumulate);
      return gemv_dots_split<F, M>(s, A, lda, K, C, ldc, accumulate);
    }
    constexpr int RS = dot_streams<M>;
    const Index N = s.rows, K32 = K / 32 * 32;
    float tail[32];
    Index n = 0;
    for (; n + RS <= N; n += RS) {
      __m512 acc[RS][M];
      for (int r = 0; r < RS; ++r)
        for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
      for (Index k = 0; k < K32; k += 32) {
        for (int r = 0; r < RS; ++r) {
          const std::size_t e =
              static_cast<std::size_t>(n + r) * static_cast<std::size_t>(K) + static_cast<std::size_t>(k);
          if constexpr (F == WeightFormat::q8_0 && !Round) {  // Σ q·x over the block, then one multiply by d
            const std::uint8_t* blk = QuantizedMatrix::bytes_of<F>(s, e);
            prefetch(blk);
            const __m512 q0 =
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2))));
            const __m512 q1 =
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 18))));
            const __m512 d = _mm512_set1_ps(_cvtsh_ss(static_cast<unsigned short>(blk[0] | (blk[1] << 8))));
            for (int m = 0; m < M; ++m) {
              const __m512 part = _mm512_fmadd_ps(_mm512_loadu_ps(A + m * lda + k + 16), q1,
                                                  _mm512_mul_ps(_mm512_loadu_ps(A + m * lda + k), q0));
              acc[r][m] = _mm512_fmadd_ps(part, d, acc[r][m]);
            }
            continue;
          }
          prefetch(QuantizedMatrix::bytes_of<F>(s, e));
          __m512 w0, w1;
          load32_for_products<F, Round>(s, e, w0, w1);
          for (int m = 0; m < M; ++m) {
            acc[r][m] = _mm512_fmadd_ps(_mm512_loadu_ps(A + m * lda + k), w0, acc[r][m]);
            acc[r][m] = _mm512_fmadd_ps(_mm512_loadu_ps(A + m * lda + k + 16), w1, acc[r][m]);
          }
        }
      }
      for (int r = 0; r < RS; ++r) {
        float extra[M] = {};
        if (K32 < K) {
          decode_tail<Round>(
              s, static_cast<std::size_t>(n + r) * static_cast<std::size_t>(K) + static_cast<std::size_t>(K32),
              static_cast<std::size_t>(K - K32), tail);
          for (int m = 0; m < M; ++m)
            for (Index k = K32; k < K; ++k) extra[m] += A[m * lda + k] * tail[k - K32];
        }
        for (int m = 0; m < M; ++m) {
          const float v = _mm512_reduce_add_ps(acc[r][m]) + extra[m];
          C[m * ldc + n + r] = accumulate ? C[m * ldc + n + r] + v : v;
        }
      }
    }
    for (; n < N; ++n) {  // the last rows, one at a time
      const std::size_t row = static_cast<std::size_t>(n) * static_cast<std::size_t>(K);
      __m512 acc[M];
      for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
      for (Index k = 0; k < K32; k += 32) {
        __m512 w0, w1;
        load32_for_products<F, Round>(s, row + static_cast<std::size_t>(k), w0, w1);
        for (int m = 0; m < M; ++m) {
          acc[m] = _mm512_fmadd_ps(_mm512_loadu_ps(A + m * lda + k), w0, acc[m]);
          acc[m] = _mm512_fmadd_ps(_mm512_loadu_ps(A + m * lda + k + 16), w1, acc[m]);
        }
      }
      float extra[M] = {};
      if (K32 < K) {
        decode_tail<Round>(s, row + static_cast<std::size_t>(K32), static_cast<std::size_t>(K - K32), tail);
        for (int m = 0; m < M; ++m)
          for (Index k = K32; k < K; ++k) extra[m] += A[m * lda + k] * tail[k - K32];
      }
      for (int m = 0; m < M; ++m) {
        const float v = _mm512_reduce_add_ps(acc[m]) + extra[m];
        C[m * ldc + n] = accumulate ? C[m * ldc + n] + v : v;
      }
    }
  }

  // C[m, n] (+)= Σ_k A[m, k] S[k, n], m < M: 16 rows of S at a time (16 streams the prefetcher follows), 64
  // columns of C held in registers while those rows pass.
  template <WeightFormat F, int M, bool Round>
  LORA_AVX512 static void gemv_axpys(const State& s, const float* A, Index lda, Index K, float* C, Index ldc,
                                     bool accumulate) {
    const Index N = s.cols;  // a multiple of 64 (gemv_fused checked)
    constexpr Index rows = 16;
    for (Index k0 = 0; k0 < K; k0 += rows)
      for (Index n0 = 0; n0 < N; n0 += 64) {
        __m512 acc[M][4];
        const bool load = accumulate || k0 > 0;
        for (int m = 0; m < M; ++m)
          for (int j = 0; j < 4; ++j)
            acc[m][j] = load ? _mm512_loadu_ps(C + m * ldc + n0 + 16 * j) : _mm512_setzero_ps();
        for (Index k = k0; k < std::min(K, k0 + rows); ++k) {
          const std::size_t e =
              static_cast<std::size_t>(k) * static_cast<std::size_t>(N) + static_cast<std::size_t>(n0);
          __m512 w0, w1, w2, w3;
          load32_for_products<F, Round>(s, e, w0, w1);
          load32_for_products<F, Round>(s, e + 32, w2, w3);
          for (int m = 0; m < M; ++m) {
            const __m512 a = _mm512_set1_ps(A[m * lda + k]);
            acc[m][0] = _mm512_fmadd_ps(a, w0, acc[m][0]);
            acc[m][1] = _mm512_fmadd_ps(a, w1, acc[m][1]);
            acc[m][2] = _mm512_fmadd_ps(a, w2, acc[m][2]);
            acc[m][3] = _mm512_fmadd_ps(a, w3, acc[m][3]);
          }
        }
        for (int m = 0; m < M; ++m)
          for (int j = 0; j < 4; ++j) _mm512_storeu_ps(C + m * ldc + n0 + 16 * j, acc[m][j]);
      }
  }
#endif

  static float dot(bool simd, const float* x, const float* y, Index n) {
#ifdef LORA_X86_KERNELS
    if (simd) return dot_avx512(x, y, n);
#endif
    (void)simd;
    // Counted in size_t from a checked length: with a signed count GCC 12 at -O3 warns that a huge iteration would
    // overflow the address (-Waggressive-loop-optimizations), which -Werror turns into an error.
    const std::size_t count = n > 0 ? static_cast<std::size_t>(n) : 0, quads = count / 4 * 4;
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (std::size_t i = 0; i < quads; i += 4) {
      s0 += x[i] * y[i];
      s1 += x[i + 1] * y[i + 1];
      s2 += x[i + 2] * y[i + 2];
      s3 += x[i + 3] * y[i + 3];
    }
    for (std::size_t i = quads; i < count; ++i) s0 += x[i] * y[i];
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
          // A's micro-panel (MR rows, 12 KiB) stays in L1 while B's panels stream from L2 (the block of B is
          // KC x NC floats, 1 MiB), as BLIS orders its loops.
          for (Index ir = 0; ir < mc; ir += MR) {
            const Index mr = std::min(MR, mc - ir);
            for (Index jr = 0; jr < nc; jr += NR) {
              const Index nr = std::min(NR, nc - jr);
              float* c = C + (ic + ir) * ldc + jc + jr;
              kernel(simd, kc, apack + (ir / MR) * MR * KC, bpack + (jr / NR) * KC * NR, c, ldc, mr, nr, add);
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
        decode_for_products(S, jc + n, pc, kc, row);
        float* panel = bpack + (n / NR) * KC * NR + n % NR;
        for (Index k = 0; k < kc; ++k) panel[k * NR] = row[k];
      }
      return;
    }
    for (Index k = 0; k < kc; ++k) {  // B(k, n) = S(k, n): S's row k gives row k of every panel
      decode_for_products(S, pc + k, jc, nc, row);
      for (Index p = 0; p < panels; ++p)
        std::memcpy(bpack + p * KC * NR + k * NR, row + p * NR,
                    static_cast<std::size_t>(std::min(NR, nc - p * NR)) * 4);
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

  // ---- bf16 products: C (M, N) (+)= bf16(A) · op(S), S bf16 ----
  // Panels hold k-pairs: a 32-bit word is two bf16 values, the even k in the low half, as AVX512_BF16's dot product
  // pairs them. A is rounded once per call into x16 (M, K); B's panel p holds b[q * NR + j] = (B(2q, j), B(2q+1, j)).
  static void gemm_bf16(const float* A, Index lda, Index M, Index K, Index N, const QuantizedMatrix& S, bool transposed,
                        float* C, Index ldc, bool accumulate) {
    Buffers& buf = buffers();
    const bool amx = K % 32 == 0 && has_amx_bf16();   // AMX tiles take 32 k at a time
    const Index rows = amx ? (M + 31) / 32 * 32 : M;  // AMX: rows padded with zeros to whole 32-row blocks
    std::uint16_t* x16 = reserve(buf.x16, static_cast<std::size_t>(rows * K));
    for (Index m = 0; m < M; ++m) to_bf16(A + m * lda, x16 + m * K, K);
    std::fill(x16 + M * K, x16 + rows * K, std::uint16_t{0});
    std::uint32_t* bpack = reserve(buf.b16, static_cast<std::size_t>(KP * NC));
    std::uint32_t* apack = reserve(buf.a16, static_cast<std::size_t>(MC * KP));
    const bool simd = QuantizedMatrix::has_avx512_bf16();
    const auto* s16 = reinterpret_cast<const std::uint16_t*>(S.data());
    const Index KC2 = 2 * KP;
    for (Index jc = 0; jc < N; jc += NC) {
      const Index nc = std::min(NC, N - jc);
      for (Index pc = 0; pc < K; pc += KC2) {
        const Index kp = (std::min(KC2, K - pc) + 1) / 2;
        if (S.format() == WeightFormat::bf16)
          pack_b_bf16(s16, S.cols(), K, transposed, pc, kp, jc, nc, bpack);
        else
          pack_b_decoded(S, transposed, pc, kp, jc, nc, bpack, buf);
        const bool add = accumulate || pc > 0;
#ifdef LORA_AMX_KERNELS
        if (amx) {
          gemm_bf16_amx(x16 + pc, K, M, bpack, kp, nc, C + jc, ldc, add);
          continue;
        }
#endif
        for (Index ic = 0; ic < M; ic += MC) {
          const Index mc = std::min(MC, M - ic);
          pack_a_bf16(x16 + ic * K, K, pc, mc, kp, apack);
          for (Index jr = 0; jr < nc; jr += NR) {
            const Index nr = std::min(NR, nc - jr);
            const std::uint32_t* bp = bpack + (jr / NR) * KP * NR;
            for (Index ir = 0; ir < mc; ir += MR) {
              const Index mr = std::min(MR, mc - ir);
              float* c = C + (ic + ir) * ldc + jc + jr;
              kernel_bf16(simd, kp, apack + (ir / MR) * MR * KP, bp, c, ldc, mr, nr, add);
            }
          }
        }
      }
    }
  }

  // (public: tests and benchmarks report which kernel ran)
 public:
  /// True when bf16 products run on AMX tiles: the CPU has AMX-BF16 and AMX-TILE (CPUID leaf 7), Linux granted this
  /// process the tile state (arch_prctl ARCH_REQ_XCOMP_PERM, asked once), and the AVX-512 kernels are on.
  static bool has_amx_bf16() {
#ifdef LORA_AMX_KERNELS
    static const bool ok = [] {
      unsigned a = 0, b = 0, c = 0, d = 0;
      if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
      if (((d >> 22) & 1u) == 0 || ((d >> 24) & 1u) == 0) return false;
      return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
    }();
    return ok && QuantizedMatrix::has_avx512();
#else
    return false;
#endif
  }

 private:
  static std::uint32_t pair(std::uint16_t even, std::uint16_t odd) {
    return static_cast<std::uint32_t>(even) | (static_cast<std::uint32_t>(odd) << 16);
  }

  // A's rows (bf16, leading dimension K) from depth pc: apack panel ir: a[q * MR + i] = (A(i, pc+2q), A(i, pc+2q+1)).
  static void pack_a_bf16(const std::uint16_t* x16, Index K, Index pc, Index mc, Index kp, std::uint32_t* apack) {
    for (Index ir = 0; ir < mc; ir += MR) {
      std::uint32_t* panel = apack + (ir / MR) * MR * KP;
      const Index mr = std::min(MR, mc - ir);
      for (Index i = 0; i < MR; ++i) {
        if (i >= mr) {
          for (Index q = 0; q < kp; ++q) panel[q * MR + i] = 0;
          continue;
        }
        const std::uint16_t* row = x16 + (ir + i) * K + pc;
        for (Index q = 0; q < kp; ++q) panel[q * MR + i] = pair(row[2 * q], row[2 * q + 1]);
      }
    }
  }

  // n floats to bf16 (round to nearest even), 32 at a time with AVX512_BF16's conversion where the CPU has it.
  static void to_bf16(const float* in, std::uint16_t* out, Index n) {
    Index i = 0;
#ifdef LORA_X86_KERNELS
    if (QuantizedMatrix::has_avx512_bf16()) i = to_bf16_avx512(in, out, n);
#endif
    for (; i < n; ++i) out[i] = float_to_bf16(in[i]);
  }
#ifdef LORA_X86_KERNELS
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"))) static Index to_bf16_avx512(
      const float* in, std::uint16_t* out, Index n) {
    Index i = 0;
    for (; i + 32 <= n; i += 32) {
      const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(in + i + 16), _mm512_loadu_ps(in + i));
      _mm512_storeu_si512(out + i, (__m512i)v);
    }
    return i;
  }
#endif

  // As pack_b_bf16 for a matrix stored in another format: S's rows decoded to float, then rounded to bf16.
  static void pack_b_decoded(const QuantizedMatrix& S, bool transposed, Index pc, Index kp, Index jc, Index nc,
                             std::uint32_t* bpack, Buffers& buf) {
    const Index panels = (nc + NR - 1) / NR;
    if (nc % NR != 0) {
      std::uint32_t* last = bpack + (panels - 1) * KP * NR;
      for (Index q = 0; q < kp; ++q) std::fill(last + q * NR + nc % NR, last + (q + 1) * NR, 0u);
    }
    float* row = reserve(buf.row, static_cast<std::size_t>(2 * std::max(2 * KP, NC)));
    std::uint16_t* r16 = reserve(buf.x16_row, static_cast<std::size_t>(2 * std::max(2 * KP, NC)));
    if (transposed) {  // S's row n: 2 kp values from pc, the pairs of column n
      for (Index n = 0; n < nc; ++n) {
        S.decode(jc + n, pc, 2 * kp, row);
        to_bf16(row, r16, 2 * kp);
        const auto* pairs = reinterpret_cast<const std::uint32_t*>(r16);
        std::uint32_t* panel = bpack + (n / NR) * KP * NR + n % NR;
        for (Index q = 0; q < kp; ++q) panel[q * NR] = pairs[q];
      }
      return;
    }
    for (Index q = 0; q < kp; ++q) {  // rows pc + 2q and pc + 2q + 1 of S
      S.decode(pc + 2 * q, jc, nc, row);
      to_bf16(row, r16, nc);
      if (pc + 2 * q + 1 < S.rows()) {
        S.decode(pc + 2 * q + 1, jc, nc, row);
        to_bf16(row, r16 + nc, nc);
      } else {
        std::fill(r16 + nc, r16 + 2 * nc, std::uint16_t{0});
      }
      for (Index p = 0; p < panels; ++p) {
        std::uint32_t* out = bpack + p * KP * NR + q * NR;
        const Index n0 = p * NR, w = std::min(NR, nc - n0);
        for (Index j = 0; j < w; ++j) out[j] = pair(r16[n0 + j], r16[nc + n0 + j]);
      }
    }
  }

  // B = op(S) over depth [pc, pc + 2 kp) and columns [jc, jc + nc), S's bf16 values s16 with `cols` per row.
  static void pack_b_bf16(const std::uint16_t* s16, Index cols, Index K, bool transposed, Index pc, Index kp, Index jc,
                          Index nc, std::uint32_t* bpack) {
    const Index panels = (nc + NR - 1) / NR;
    if (nc % NR != 0) {
      std::uint32_t* last = bpack + (panels - 1) * KP * NR;
      for (Index q = 0; q < kp; ++q) std::fill(last + q * NR + nc % NR, last + (q + 1) * NR, 0u);
    }
    if (transposed) {  // B(k, n) = S(n, k): S's row n holds the pairs of column n back to back
      for (Index n = 0; n < nc; ++n) {
        const std::uint16_t* row = s16 + (jc + n) * cols + pc;
        std::uint32_t* panel = bpack + (n / NR) * KP * NR + n % NR;
        for (Index q = 0; q < kp; ++q) panel[q * NR] = pair(row[2 * q], row[2 * q + 1]);
      }
      return;
    }
    for (Index q = 0; q < kp; ++q) {  // B(k, n) = S(k, n): rows pc + 2q and pc + 2q + 1 of S, interleaved
      const std::uint16_t* even = s16 + (pc + 2 * q) * cols + jc;
      const std::uint16_t* odd = pc + 2 * q + 1 < K ? even + cols : nullptr;
      for (Index p = 0; p < panels; ++p) {
        std::uint32_t* out = bpack + p * KP * NR + q * NR;
        const Index n0 = p * NR, w = std::min(NR, nc - n0);
        for (Index j = 0; j < w; ++j) out[j] = pair(even[n0 + j], odd != nullptr ? odd[n0 + j] : 0);
      }
    }
  }

  // C (mr, nr) (+)= Σ_q a_q · b_q over kp pairs; the portable kernel sums the odd product first, as the instruction.
  static void kernel_bf16(bool simd, Index kp, const std::uint32_t* a, const std::uint32_t* b, float* C, Index ldc,
                          Index mr, Index nr, bool add) {
#ifdef LORA_X86_KERNELS
    if (simd) return kernel_bf16_avx512(kp, a, b, C, ldc, mr, nr, add);
#endif
    (void)simd;
    float acc[MR][NR] = {};
    for (Index q = 0; q < kp; ++q, a += MR, b += NR)
      for (Index i = 0; i < MR; ++i) {
        const float a0 = bf16_to_float(static_cast<std::uint16_t>(a[i])),
                    a1 = bf16_to_float(static_cast<std::uint16_t>(a[i] >> 16));
        for (Index j = 0; j < NR; ++j)
          acc[i][j] = (acc[i][j] + a1 * bf16_to_float(static_cast<std::uint16_t>(b[j] >> 16))) +
                      a0 * bf16_to_float(static_cast<std::uint16_t>(b[j]));
      }
    for (Index i = 0; i < mr; ++i)
      for (Index j = 0; j < nr; ++j) C[i * ldc + j] = add ? C[i * ldc + j] + acc[i][j] : acc[i][j];
  }

#ifdef LORA_X86_KERNELS
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma"))) static void kernel_bf16_avx512(
      Index kp, const std::uint32_t* a, const std::uint32_t* b, float* C, Index ldc, Index mr, Index nr, bool add) {
#define LORA_QG_ZERO(i) __m512 c##i##0 = _mm512_setzero_ps(), c##i##1 = _mm512_setzero_ps();
#define LORA_QG_DOT(i)                                                       \
  {                                                                          \
    const __m512bh ai = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[i])); \
    c##i##0 = _mm512_dpbf16_ps(c##i##0, ai, b0);                             \
    c##i##1 = _mm512_dpbf16_ps(c##i##1, ai, b1);                             \
  }
#define LORA_QG_ALL(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
    LORA_QG_ALL(LORA_QG_ZERO)
    for (Index q = 0; q < kp; ++q, a += MR, b += NR) {
      const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b), b1 = (__m512bh)_mm512_loadu_si512(b + 16);
      LORA_QG_ALL(LORA_QG_DOT)
    }
    alignas(64) float tile[MR][NR];
#define LORA_QG_STORE(i)             \
  _mm512_store_ps(tile[i], c##i##0); \
  _mm512_store_ps(tile[i] + 16, c##i##1);
    LORA_QG_ALL(LORA_QG_STORE)
#undef LORA_QG_STORE
#undef LORA_QG_ALL
#undef LORA_QG_DOT
#undef LORA_QG_ZERO
    store_tile(&tile[0][0], C, ldc, mr, nr, add);
  }

#ifdef LORA_AMX_KERNELS
  // C (M, nc) (+)= x16 (M rows padded to 32, leading dimension K, from the block's first k) · the packed B block
  // (kp pairs, a multiple of 16). Per 32 × 32 block of C: tiles 0-3 hold C, 4-5 two 16-row slices of A (32 k),
  // 6-7 two 16-column halves of B's panel (16 k-pairs: the panel's rows are the VNNI layout AMX reads).
  __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,fma"))) static void gemm_bf16_amx(
      const std::uint16_t* x16, Index K, Index M, const std::uint32_t* bpack, Index kp, Index nc, float* C, Index ldc,
      bool add) {
    struct alignas(64) Config {
      std::uint8_t palette = 1, start_row = 0, reserved[14] = {};
      std::uint16_t colsb[16] = {};
      std::uint8_t rows[16] = {};
    } cfg;
    for (int t = 0; t < 8; ++t) {
      cfg.colsb[t] = 64;
      cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
    alignas(64) float tile[32 * NR];
    const Index stride_a = 2 * K, stride_b = 4 * NR;
    for (Index ir = 0; ir < M; ir += 32) {
      for (Index jr = 0; jr < nc; jr += NR) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        const std::uint32_t* panel = bpack + (jr / NR) * KP * NR;
        const std::uint16_t* a = x16 + ir * K;
        for (Index q = 0; q < kp; q += 16) {
          _tile_loadd(4, a + 2 * q, stride_a);
          _tile_loadd(5, a + 16 * K + 2 * q, stride_a);
          _tile_loadd(6, panel + q * NR, stride_b);
          _tile_loadd(7, panel + q * NR + 16, stride_b);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, tile, 4 * NR);
        _tile_stored(1, tile + 16, 4 * NR);
        _tile_stored(2, tile + 16 * NR, 4 * NR);
        _tile_stored(3, tile + 16 * NR + 16, 4 * NR);
        store_tile(tile, C + ir * ldc + jr, ldc, std::min<Index>(32, M - ir), std::min(NR, nc - jr), add);
      }
    }
    _tile_release();
  }
#endif

  LORA_AVX512 static void store_tile(const float* tile, float* C, Index ldc, Index mr, Index nr, bool add) {
    const __mmask16 m0 = static_cast<__mmask16>(nr >= 16 ? 0xffff : (1u << nr) - 1);
    const __mmask16 m1 = static_cast<__mmask16>(nr >= 32 ? 0xffff : nr <= 16 ? 0 : (1u << (nr - 16)) - 1);
    for (Index i = 0; i < mr; ++i) {
      float* c = C + i * ldc;
      __m512 v0 = _mm512_load_ps(tile + i * NR), v1 = _mm512_load_ps(tile + i * NR + 16);
      if (add) {
        v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, c));
        v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, c + 16));
      }
      _mm512_mask_storeu_ps(c, m0, v0);
      _mm512_mask_storeu_ps(c + 16, m1, v1);
    }
  }
#endif

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
    for (; i + 16 <= n; i += 16)
      _mm512_storeu_ps(y + i, _mm512_fmadd_ps(av, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
    if (i < n) {
      const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
      _mm512_mask_storeu_ps(y + i, m,
                            _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, y + i)));
    }
  }

  LORA_AVX512 static void kernel_avx512(Index kc, const float* a, const float* b, float* C, Index ldc, Index mr,
                                        Index nr, bool add) {
#define LORA_QG_ZERO(i) __m512 c##i##0 = _mm512_setzero_ps(), c##i##1 = _mm512_setzero_ps();
#define LORA_QG_FMA(i)                          \
  {                                             \
    const __m512 ai = _mm512_set1_ps(a[i]);     \
    c##i##0 = _mm512_fmadd_ps(ai, b0, c##i##0); \
    c##i##1 = _mm512_fmadd_ps(ai, b1, c##i##1); \
  }
#define LORA_QG_ALL(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
    LORA_QG_ALL(LORA_QG_ZERO)
    for (Index k = 0; k < kc; ++k, a += MR, b += NR) {
      const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
      LORA_QG_ALL(LORA_QG_FMA)
    }
    alignas(64) float tile[MR][NR];
#define LORA_QG_STORE(i)             \
  _mm512_store_ps(tile[i], c##i##0); \
  _mm512_store_ps(tile[i] + 16, c##i##1);
    LORA_QG_ALL(LORA_QG_STORE)
#undef LORA_QG_STORE
#undef LORA_QG_ALL
#undef LORA_QG_FMA
#undef LORA_QG_ZERO
    store_tile(&tile[0][0], C, ldc, mr, nr, add);
  }
#endif
};

}  // namespace lora::detail

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
