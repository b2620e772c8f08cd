// The library's own float GEMM for C = X · S with S stored (K, N) row-major, on AVX-512, with low-rank terms
// added inside its micro-kernel:
//
//   C (M, N) = X (M, K) · S (K, N)  [+ C]  + Σ_t H_t (M, r_t) · E_t (r_t, N_t) on columns [c_t, c_t + N_t)
//
// S stored (K, N) is W stored (I, O) in y = x Wᵀ (GPT-2's Conv1D layout) and W stored (O, I) in dx = dy W; S
// stored transposed, (N, K), is W (O, I) in y = x Wᵀ (torch.nn.Linear) and W (I, O) in dx = dy W (StoredOperand).
// The terms are LoRA's: y += s · H Bᵀ for LoRALinear, y_k += s_k · H_k B_kᵀ on slice k of a fused projection
// (E = s · Bᵀ), and in LoRALinear's backward dx += s · G A (G = dy B, E = s · A).
//
// Why its own. A LoRA term on oneDNN's product has to be written into C before the product adds into it (or
// after), one more pass over C's adapted columns: measured on the Emerald Rapids Xeon at 512 x 768 -> 2304 with q
// and v adapted at r = 8, that pass and x Aᵀ cost 4-5% of the product, however the passes were blocked (session
// programs, 2026-12-06). Here each C tile gets its terms while it is in registers, after the product's own sum, with
// no pass over C for them: they cost 0.8-1.1% of the product, for flops (2·M·r·N_t) of 0.69% at those sizes.
//
// The terms' left factors H = x Aᵀ can be computed here too (LowRankInput): each block of 8 rows of H just before
// that block's tiles, by dot products along K, while the tiles before it bring the block's rows of x into L2
// (software prefetch). As oneDNN's product before the GEMM, H cost 1.04-1.14% of the base product for its 0.69%
// of flops, its pass over x coming from L3; the dot products alone cost 0.8% on rows already in cache. The fused
// forward went from 1.021-1.026 of the base product to 1.019-1.024 (bench_compute fused_qv, Emerald Rapids Xeon,
// 2026-12-06).
//
// How. Goto / BLIS loops: S is packed KC x NC at a time into NR-column panels (in L2; from transposed storage by
// 16 x 16 transposes in registers, which cost nothing measurable), X is read in place (an MR x KC
// block of its rows stays in L1), and an MR x NR micro-kernel keeps C's tile in 24 AVX-512 registers. Each element of
// C is summed in a fixed order: its K products in order within each KC block, the blocks in order (the first
// block's sum, plus C's old value when accumulating; then each further block's sum added), then the bias when
// given, and the terms last. So the result depends only on M, N, K and the values: a layer with its adapters at
// B = 0 gives its base product bit for bit, as both run this code (0 · h adds +0).
//
// When. Float, one thread (Eigen::nbThreads() == 1; oneDNN and Eigen thread, this does not), a CPU with AVX-512 (read
// once), the shapes where it was measured about as fast as oneDNN or faster (eligible(): at least 512 rows, so the
// packing of S pays off, and at least 1536 columns: GPT-2's c_attn and c_fc, for one; with S transposed, where
// oneDNN is slower, 64 rows, a depth of 256 and 768 columns or more), and
// not turned off (set_enabled(false), for tests and benchmarks that compare). Otherwise the callers use
// detail::product, oneDNN or Eigen. FrozenWeight's products, LoRALinear's forward and backward and
// FusedLoRALinear's forward ask the same eligible(), so a layer and its base model always take the same path.
#pragma once

#include <lora/detail/simd.hpp>  // LORA_X86_KERNELS, LORA_AVX512, cpu_has_avx512()
#include <lora/types.hpp>

#include <Eigen/Core>
#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <vector>

// GCC before 13 reports -W(maybe-)uninitialized inside its own AVX-512 intrinsics once they are inlined (GCC bug
// 105593): false positives, silenced here only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace lora::detail {

/// One low-rank term: C[:, col : col + cols] += H (M, r; row stride ldh) · E (r, cols; row stride lde).
struct LowRankTerm {
  Index col = 0, cols = 0, r = 0;
  const float* H = nullptr;
  Index ldh = 0;
  const float* E = nullptr;
  Index lde = 0;
};

/// The GEMM's right operand S (K, N) as stored: row-major (K, N) with row stride `ld`, or with `transposed` row-major
/// (N, K), its rows S's columns. y = x Wᵀ reads W (I, O) plainly (GPT-2's Conv1D) and W (O, I) transposed
/// (torch.nn.Linear); dx = dy W reads W (O, I) plainly and W (I, O) transposed.
struct StoredOperand {
  const float* data = nullptr;
  Index ld = 0;
  bool transposed = false;
};

/// H (M, r; row stride ldh) = X (M, K; row stride ldx) · Aᵀ, A (r, K; row stride lda): the terms' left factors,
/// which run() computes one row block at a time before that block's tiles read them (the terms' H may point into
/// this H). X may be the product's own X or another matrix of its shape (a dropped-out copy).
struct LowRankInput {
  const float* X = nullptr;
  Index ldx = 0;
  const float* A = nullptr;
  Index lda = 0, r = 0;
  float* H = nullptr;
  Index ldh = 0;
};

// A class template only so that nothing of it is compiled in a program that never runs it: as a plain class, its
// kernels' instantiations were compiled into every includer (<lora/lora.hpp> took 4.2-4.7 s of CPU against 3.0
// without them, g++ -O2). KGemm below is the one instance.
template <class Unused = void>
struct KGemmT {
  static constexpr Index MR = 8, NRV = 3, NR = 16 * NRV;  // C's tile: 8 x 48, 24 AVX-512 accumulators
  static constexpr Index KC = 1024;    // most of a K block (K split evenly): X's 8 rows of it (32 KiB) stay in L1
  static constexpr Index NC = 4 * NR;  // S's block: K x 192 floats (768 KiB at most), in L2
  // Where it runs (eligible()): measured against oneDNN's sgemm on the Emerald Rapids Xeon, one thread, medians of
  // 41 paired runs (2026-12-06): 512 x 768 -> 2304 0.91-0.97, -> 3072 0.99-1.00, 512 x 1024 -> 3072 0.99-1.00,
  // 2048 x 768 -> 2304 0.96; but 256 rows 0.95-1.06, 64 rows 1.16, 512 x 1024 -> 1024 1.01-1.09. Over more than one
  // block of depth (session program, medians of 11-31 rotating rounds, 2026-12-06 19:47 UTC, the kernel as it is
  // now): 0.89 at 512 x 1536 -> 1536, 0.92 at 2048 -> 1536, 0.97-0.98 at 2304 -> 2304 and 3072 -> 2304, 0.84 at
  // 4096 -> 11008, 1.00 at 4096 -> 4096, 1.00-1.01 at 3072 -> 3072 and 11008 -> 4096, 1.01 at 1024 x 4096 -> 4096;
  // but 1.07 at 512 x 2304 -> 768 and 3072 -> 768 (oneDNN is ahead at narrow outputs). So: many rows, wide, any
  // depth.
  static constexpr Index min_rows = 512, min_cols = 1536;
  // With S transposed (eligible(M, K, N, true)) it is oneDNN's sgemm with its B transposed ('T') that the callers
  // would run instead, and that is slower than its 'N': the own GEMM measured 0.93-0.97 of it at 512 x 768 -> 768,
  // -> 2304, -> 3072, 512 x 2304 -> 768, 512 x 3072 -> 768, 2048 x 768 -> 2304, 512 x 4096 -> 11008, 96 x 4096 ->
  // 4096 and 64 x 768 -> 2304, and 0.99-1.00 at 512 x 1024 -> 1024, 512 x 4096 -> 4096 and 512 x 11008 -> 4096
  // (session program, medians of 15-101 rotating rounds, 2026-12-06); but 1.03 at 512 x 768 -> 256 and 512 x 64 ->
  // 768. So: at least 64 rows, a depth of 256 or more (any number of blocks), at least 768 columns.
  static constexpr Index min_rows_t = 64, min_depth_t = 256, min_cols_t = 768;

  static std::atomic<bool>& enabled_flag() {
    static std::atomic<bool> on{true};
    return on;
  }
  /// Turns this GEMM off (the callers then use oneDNN or Eigen) or back on: for tests and benchmarks.
  static void set_enabled(bool on) { enabled_flag().store(on, std::memory_order_relaxed); }

  /// True when this CPU has AVX-512 (F, BW, VL, DQ; read once) and this code was compiled for x86-64.
  static bool cpu_supported() { return cpu_has_avx512(); }

  /// True when run() computes C (M, N) = X (M, K) · S (K, N), S stored as is or (with `transposed`) transposed:
  /// see the header's "When".
  static bool eligible(Index M, Index K, Index N, bool transposed = false) {
    const bool shape =
        transposed ? M >= min_rows_t && K >= min_depth_t && N >= min_cols_t : M >= min_rows && K > 0 && N >= min_cols;
    return shape && enabled_flag().load(std::memory_order_relaxed) && cpu_supported() && Eigen::nbThreads() == 1;
  }

  /// C = X · S (+ C when accumulate) (+ bias, a row of N added to every row) + the terms; row-major, strides ldx,
  /// S.ld, ldc; C shares no memory with X, S, the bias or the terms. Call only when eligible(M, K, N). Terms must lie
  /// within [0, N) and not overlap one another. With `input`, its H = input X · Aᵀ is written first (row block by
  /// row block; see LowRankInput); its H shares no memory with anything else here but the terms' H.
  static void run(Index M, Index N, Index K, const float* X, Index ldx, const StoredOperand& S, float* C, Index ldc,
                  bool accumulate, const LowRankTerm* terms = nullptr, std::size_t n_terms = 0,
                  const LowRankInput* input = nullptr, const float* bias = nullptr) {
#ifdef LORA_X86_KERNELS
    run_avx512(M, N, K, X, ldx, S, C, ldc, accumulate, terms, n_terms, input, bias);
#else
    (void)M, (void)N, (void)K, (void)X, (void)ldx, (void)S, (void)C, (void)ldc, (void)accumulate, (void)terms,
        (void)n_terms, (void)input, (void)bias;
#endif
  }

 private:
#ifdef LORA_X86_KERNELS
  // A term's part in one panel: H (its rows from row 0, stride ldh), E packed r x NR (zero outside the term).
  struct PanelTerm {
    const float* h = nullptr;
    Index ldh = 0, r = 0;
    const float* e = nullptr;
  };
#endif
  struct Buffers {
    std::vector<float> s, e;   // S's packed block; the terms' E packed per panel
    std::vector<Index> first;  // panel p's terms are terms[first[p] .. first[p + 1])
#ifdef LORA_X86_KERNELS
    std::vector<PanelTerm> terms;
#endif
  };
  static Buffers& buffers() {
    thread_local Buffers buf;
    return buf;
  }
  // A 64-byte aligned region of n floats in v (grow-only: a steady-state call allocates nothing).
  static float* aligned(std::vector<float>& v, std::size_t n) {
    if (v.size() < n + 16) v.resize(n + 16);
    const auto p = reinterpret_cast<std::uintptr_t>(v.data());
    return v.data() + ((64 - p % 64) % 64) / sizeof(float);
  }

#ifdef LORA_X86_KERNELS
  // The tile's products over k in [k0, k1): c0, c1 and c2 are its accumulators' three columns.
  template <int Rows>
  LORA_AVX512 static inline __attribute__((always_inline)) void products(Index k0, Index k1, const float* x, Index ldx,
                                                                         const float* s, __m512 (&c0)[Rows],
                                                                         __m512 (&c1)[Rows], __m512 (&c2)[Rows]) {
#pragma GCC unroll 4
    for (Index k = k0; k < k1; ++k) {
      const __m512 b0 = _mm512_load_ps(s + k * NR), b1 = _mm512_load_ps(s + k * NR + 16),
                   b2 = _mm512_load_ps(s + k * NR + 32);
#pragma GCC unroll 8
      for (int i = 0; i < Rows; ++i) {
        const __m512 a = _mm512_set1_ps(x[i * ldx + k]);
        c0[i] = _mm512_fmadd_ps(a, b0, c0[i]);
        c1[i] = _mm512_fmadd_ps(a, b1, c1[i]);
        c2[i] = _mm512_fmadd_ps(a, b2, c2[i]);
      }
    }
  }

  template <int Rows>
  LORA_AVX512 static inline __attribute__((always_inline)) void tile(Index kc, const float* x, Index ldx,
                                                                     const float* s, float* c, Index ldc, __mmask16 m0,
                                                                     __mmask16 m1, __mmask16 m2, bool add_c,
                                                                     const float* bias, const PanelTerm* pt, Index npt,
                                                                     Index row, const float* pf0, const float* pf1) {
    // Three columns of accumulators, every loop over them unrolled: GCC then keeps all of them in registers
    // from the first product to the store (with acc[Rows][3] and loops it did not unroll, it spilled them).
    __m512 c0[Rows], c1[Rows], c2[Rows];
#pragma GCC unroll 8
    for (int i = 0; i < Rows; ++i) c0[i] = c1[i] = c2[i] = _mm512_setzero_ps();
    if (pf0 == nullptr) {
      products<Rows>(0, kc, x, ldx, s, c0, c1, c2);
    } else {
      // K in steps of 16, each bringing one 64-byte line of pf0's row and of pf1's into L2. (Only the tiles that
      // prefetch run in steps: the same loop for every tile made the base product 2-4% slower.)
      for (Index k0 = 0; k0 < kc; k0 += 16) {
        _mm_prefetch(reinterpret_cast<const char*>(pf0 + k0), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(pf1 + k0), _MM_HINT_T1);
        products<Rows>(k0, std::min(kc, k0 + 16), x, ldx, s, c0, c1, c2);
      }
    }
    if (add_c) {
#pragma GCC unroll 8
      for (int i = 0; i < Rows; ++i) {
        c0[i] = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, c + i * ldc), c0[i]);
        c1[i] = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, c + i * ldc + 16), c1[i]);
        c2[i] = _mm512_add_ps(_mm512_maskz_loadu_ps(m2, c + i * ldc + 32), c2[i]);
      }
    }
    if (bias != nullptr) {
      const __m512 b0 = _mm512_maskz_loadu_ps(m0, bias), b1 = _mm512_maskz_loadu_ps(m1, bias + 16),
                   b2 = _mm512_maskz_loadu_ps(m2, bias + 32);
#pragma GCC unroll 8
      for (int i = 0; i < Rows; ++i) {
        c0[i] = _mm512_add_ps(c0[i], b0);
        c1[i] = _mm512_add_ps(c1[i], b1);
        c2[i] = _mm512_add_ps(c2[i], b2);
      }
    }
    for (Index t = 0; t < npt; ++t) {
      const float* h = pt[t].h + row * pt[t].ldh;
      const Index ldh = pt[t].ldh;
      for (Index q = 0; q < pt[t].r; ++q) {
        const float* e = pt[t].e + q * NR;
        const __m512 e0 = _mm512_load_ps(e), e1 = _mm512_load_ps(e + 16), e2 = _mm512_load_ps(e + 32);
#pragma GCC unroll 8
        for (int i = 0; i < Rows; ++i) {
          const __m512 hv = _mm512_set1_ps(h[i * ldh + q]);
          c0[i] = _mm512_fmadd_ps(hv, e0, c0[i]);
          c1[i] = _mm512_fmadd_ps(hv, e1, c1[i]);
          c2[i] = _mm512_fmadd_ps(hv, e2, c2[i]);
        }
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < Rows; ++i) {
      _mm512_mask_storeu_ps(c + i * ldc, m0, c0[i]);
      _mm512_mask_storeu_ps(c + i * ldc + 16, m1, c1[i]);
      _mm512_mask_storeu_ps(c + i * ldc + 32, m2, c2[i]);
    }
  }

  LORA_AVX512 static void tile_rows(Index rows, Index kc, const float* x, Index ldx, const float* s, float* c,
                                    Index ldc, __mmask16 m0, __mmask16 m1, __mmask16 m2, bool add_c, const float* bias,
                                    const PanelTerm* pt, Index npt, Index row, const float* pf0, const float* pf1) {
    switch (rows) {
#define LORA_KGEMM_ROWS(n) \
  case n:                  \
    return tile<n>(kc, x, ldx, s, c, ldc, m0, m1, m2, add_c, bias, pt, npt, row, pf0, pf1);
      LORA_KGEMM_ROWS(1)
      LORA_KGEMM_ROWS(2)
      LORA_KGEMM_ROWS(3)
      LORA_KGEMM_ROWS(4)
      LORA_KGEMM_ROWS(5)
      LORA_KGEMM_ROWS(6)
      LORA_KGEMM_ROWS(7)
      LORA_KGEMM_ROWS(8)
#undef LORA_KGEMM_ROWS
      default:
        return;
    }
  }

  // H's block of RB rows and QB columns = X's RB rows · A's QB rows ᵀ: dot products along K, 16 lanes at a time,
  // each summed across its lanes at the end.
  template <int RB, int QB>
  LORA_AVX512 static inline __attribute__((always_inline)) void dots(Index K, const float* x, Index ldx, const float* a,
                                                                     Index lda, float* h, Index ldh) {
    __m512 acc[RB][QB];
#pragma GCC unroll 4
    for (int i = 0; i < RB; ++i)
#pragma GCC unroll 4
      for (int q = 0; q < QB; ++q) acc[i][q] = _mm512_setzero_ps();
    // Whole steps with plain loads, then the last one masked: one masked loop throughout (the mask worked out each
    // step) took H from 0.8% of the base product to 1.2%.
    Index k = 0;
    for (; k + 16 <= K; k += 16) {
      __m512 xv[RB];
#pragma GCC unroll 4
      for (int i = 0; i < RB; ++i) xv[i] = _mm512_loadu_ps(x + i * ldx + k);
#pragma GCC unroll 4
      for (int q = 0; q < QB; ++q) {
        const __m512 av = _mm512_loadu_ps(a + q * lda + k);
#pragma GCC unroll 4
        for (int i = 0; i < RB; ++i) acc[i][q] = _mm512_fmadd_ps(xv[i], av, acc[i][q]);
      }
    }
    if (k < K) {
      const __mmask16 m = lanes(K - k);
      __m512 xv[RB];
#pragma GCC unroll 4
      for (int i = 0; i < RB; ++i) xv[i] = _mm512_maskz_loadu_ps(m, x + i * ldx + k);
#pragma GCC unroll 4
      for (int q = 0; q < QB; ++q) {
        const __m512 av = _mm512_maskz_loadu_ps(m, a + q * lda + k);
#pragma GCC unroll 4
        for (int i = 0; i < RB; ++i) acc[i][q] = _mm512_fmadd_ps(xv[i], av, acc[i][q]);
      }
    }
#pragma GCC unroll 4
    for (int i = 0; i < RB; ++i)
#pragma GCC unroll 4
      for (int q = 0; q < QB; ++q) h[i * ldh + q] = _mm512_reduce_add_ps(acc[i][q]);
  }

  // H's rows [row, row + rows) of the input, in blocks of 4 rows by 4 columns.
  LORA_AVX512 static void input_rows(const LowRankInput& in, Index K, Index row, Index rows) {
    for (Index i = 0; i < rows; i += 4) {
      const Index rb = std::min<Index>(4, rows - i);
      const float* x = in.X + (row + i) * in.ldx;
      for (Index q = 0; q < in.r; q += 4) {
        const Index qb = std::min<Index>(4, in.r - q);
        const float* a = in.A + q * in.lda;
        float* h = in.H + (row + i) * in.ldh + q;
        switch (rb * 4 + qb) {
#define LORA_KGEMM_DOTS(r, c)                       \
  case r * 4 + c:                                   \
    dots<r, c>(K, x, in.ldx, a, in.lda, h, in.ldh); \
    break;
          LORA_KGEMM_DOTS(1, 1)
          LORA_KGEMM_DOTS(1, 2)
          LORA_KGEMM_DOTS(1, 3)
          LORA_KGEMM_DOTS(1, 4)
          LORA_KGEMM_DOTS(2, 1)
          LORA_KGEMM_DOTS(2, 2)
          LORA_KGEMM_DOTS(2, 3)
          LORA_KGEMM_DOTS(2, 4)
          LORA_KGEMM_DOTS(3, 1)
          LORA_KGEMM_DOTS(3, 2)
          LORA_KGEMM_DOTS(3, 3)
          LORA_KGEMM_DOTS(3, 4)
          LORA_KGEMM_DOTS(4, 1)
          LORA_KGEMM_DOTS(4, 2)
          LORA_KGEMM_DOTS(4, 3)
          LORA_KGEMM_DOTS(4, 4)
#undef LORA_KGEMM_DOTS
          default:
            break;
        }
      }
    }
  }

  static __mmask16 lanes(Index n) {
    return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1u);
  }

  // One NR-column panel of S from its transposed storage: panel[k·NR + j] = T[j·ldt + k] for the panel's `cols`
  // columns (rows of T) and kc depths, zero for columns past `cols`. In 16 x 16 blocks: 16 rows of T loaded (masked
  // past cols and kc), transposed in registers (unpack, then shuffles within and across 128-bit lanes), stored as
  // 16 k-rows of the panel.
  LORA_AVX512 static void pack_transposed(const float* T, Index ldt, Index cols, Index kc, float* panel) {
    for (Index j0 = 0; j0 < NR; j0 += 16) {
      const Index rows = std::min<Index>(16, std::max<Index>(0, cols - j0));
      for (Index k0 = 0; k0 < kc; k0 += 16) {
        const Index depth = std::min<Index>(16, kc - k0);
        const __mmask16 m = lanes(depth);
        __m512 r[16];
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i)
          r[i] = i < rows ? _mm512_maskz_loadu_ps(m, T + (j0 + i) * ldt + k0) : _mm512_setzero_ps();
        transpose16(r);
        for (Index t = 0; t < depth; ++t) _mm512_store_ps(panel + (k0 + t) * NR + j0, r[t]);
      }
    }
  }

  // r[i][j] -> r[j][i] for a 16 x 16 block of floats.
  LORA_AVX512 static inline __attribute__((always_inline)) void transpose16(__m512 (&r)[16]) {
    // t: pairs of rows interleaved within each 128-bit lane l, (2a, 2a + 1) at columns 4l, 4l + 1 (lo) and
    // 4l + 2, 4l + 3 (hi).
    __m512 t[16];
#pragma GCC unroll 8
    for (int a = 0; a < 8; ++a) {
      t[2 * a] = _mm512_unpacklo_ps(r[2 * a], r[2 * a + 1]);
      t[2 * a + 1] = _mm512_unpackhi_ps(r[2 * a], r[2 * a + 1]);
    }
    // u[4g + c], lane l: rows 4g .. 4g + 3 at column 4l + c.
    __m512 u[16];
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) {
      const __m512* p = t + 4 * g;
      u[4 * g + 0] = _mm512_shuffle_ps(p[0], p[2], _MM_SHUFFLE(1, 0, 1, 0));
      u[4 * g + 1] = _mm512_shuffle_ps(p[0], p[2], _MM_SHUFFLE(3, 2, 3, 2));
      u[4 * g + 2] = _mm512_shuffle_ps(p[1], p[3], _MM_SHUFFLE(1, 0, 1, 0));
      u[4 * g + 3] = _mm512_shuffle_ps(p[1], p[3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    // Column 4l + c gathers lane l of u[c], u[4 + c], u[8 + c], u[12 + c]: lanes (0, 2) and (1, 3) of row groups
    // (0, 1) and (2, 3) first, then those pairs' halves.
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const __m512 v02 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88), v13 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);
      const __m512 w02 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88),
                   w13 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
      r[c] = _mm512_shuffle_f32x4(v02, w02, 0x88);
      r[8 + c] = _mm512_shuffle_f32x4(v02, w02, 0xDD);
      r[4 + c] = _mm512_shuffle_f32x4(v13, w13, 0x88);
      r[12 + c] = _mm512_shuffle_f32x4(v13, w13, 0xDD);
    }
  }

  LORA_AVX512 static void run_avx512(Index M, Index N, Index K, const float* X, Index ldx, const StoredOperand& S,
                                     float* C, Index ldc, bool accumulate, const LowRankTerm* terms,
                                     std::size_t n_terms, const LowRankInput* input, const float* bias) {
    Buffers& buf = buffers();
    const Index panels = (N + NR - 1) / NR;
    // The terms' E packed per panel, and each panel's list of terms (counted, then placed).
    Index packed = 0;
    buf.first.assign(static_cast<std::size_t>(panels) + 1, 0);
    for (std::size_t t = 0; t < n_terms; ++t)
      for (Index p = terms[t].col / NR; p * NR < terms[t].col + terms[t].cols; ++p) {
        ++buf.first[static_cast<std::size_t>(p) + 1];
        packed += terms[t].r * NR;
      }
    for (Index p = 0; p < panels; ++p)
      buf.first[static_cast<std::size_t>(p) + 1] += buf.first[static_cast<std::size_t>(p)];
    buf.terms.assign(static_cast<std::size_t>(buf.first.back()), PanelTerm{});
    float* e = aligned(buf.e, static_cast<std::size_t>(packed));
    for (std::size_t t = 0; t < n_terms; ++t) {
      const LowRankTerm& term = terms[t];
      for (Index p = term.col / NR; p * NR < term.col + term.cols; ++p) {
        // The panel's columns [p·NR, p·NR + NR) that are the term's: [lo, hi); zero around them.
        const Index lo = std::max(term.col, p * NR), hi = std::min(term.col + term.cols, p * NR + NR);
        for (Index q = 0; q < term.r; ++q) {
          float* row = e + q * NR;
          std::fill(row, row + (lo - p * NR), 0.0f);
          std::copy(term.E + q * term.lde + (lo - term.col), term.E + q * term.lde + (hi - term.col),
                    row + (lo - p * NR));
          std::fill(row + (hi - p * NR), row + NR, 0.0f);
        }
        // terms of one panel are placed in the order given (the same order every call)
        Index at = buf.first[static_cast<std::size_t>(p)];
        while (buf.terms[static_cast<std::size_t>(at)].e != nullptr) ++at;
        buf.terms[static_cast<std::size_t>(at)] = PanelTerm{term.H, term.ldh, term.r, e};
        e += term.r * NR;
      }
    }
    float* s = aligned(buf.s, static_cast<std::size_t>(KC * NC));
    const Index blocks = (K + KC - 1) / KC, depth = (K + blocks - 1) / blocks;
    for (Index jc = 0; jc < N; jc += NC) {
      const Index nc = std::min(NC, N - jc);
      for (Index pc = 0; pc < K; pc += depth) {
        const Index kc = std::min(depth, K - pc);
        const bool first = pc == 0, last = pc + kc == K;
        // S's block into NR-column panels, k-major, zero past N.
        for (Index jr = 0; jr < nc; jr += NR) {
          const Index cols = std::min(NR, nc - jr);
          float* panel = s + jr * kc;
          if (S.transposed) {
            pack_transposed(S.data + (jc + jr) * S.ld + pc, S.ld, cols, kc, panel);
            continue;
          }
          const __mmask16 m0 = lanes(cols), m1 = lanes(cols - 16), m2 = lanes(cols - 32);
          for (Index k = 0; k < kc; ++k) {
            const float* src = S.data + (pc + k) * S.ld + jc + jr;
            _mm512_store_ps(panel + k * NR, _mm512_maskz_loadu_ps(m0, src));
            _mm512_store_ps(panel + k * NR + 16, _mm512_maskz_loadu_ps(m1, src + 16));
            _mm512_store_ps(panel + k * NR + 32, _mm512_maskz_loadu_ps(m2, src + 32));
          }
        }
        for (Index ir = 0; ir < M; ir += MR) {
          const Index rows = std::min(MR, M - ir);
          // The input's H for these rows, before any of their tiles (the first column block's) reads it.
          const bool h_rows = input != nullptr && input->r > 0 && jc == 0 && first;
          if (h_rows) input_rows(*input, K, ir, rows);
          for (Index jr = 0; jr < nc; jr += NR) {
            const Index cols = std::min(NR, nc - jr), p = (jc + jr) / NR;
            const Index b = buf.first[static_cast<std::size_t>(p)];
            const Index npt = last ? buf.first[static_cast<std::size_t>(p) + 1] - b : 0;
            const PanelTerm* pt = npt > 0 ? buf.terms.data() + b : nullptr;
            float* c = C + ir * ldc + jc + jr;
            const __mmask16 m0 = lanes(cols), m1 = lanes(cols - 16), m2 = lanes(cols - 32);
            // C's old value is added after the first block's sum when accumulating, after every later one always;
            // the bias after the last block's, with the terms.
            // Meanwhile each of these tiles brings two of the next row block's rows of the input's X into L2 (the
            // block's 8 rows over its first 4 panels), so that their dot products do not wait for memory: measured,
            // that took H's cost inside the GEMM from 1.0-1.4% of the product to 0.8-1.0%.
            const float* pf0 = nullptr;
            const float* pf1 = nullptr;
            const Index pr = ir + MR + 2 * (jr / NR);
            if (h_rows && pr < M) {
              pf0 = input->X + pr * input->ldx + pc;
              pf1 = pr + 1 < M ? pf0 + input->ldx : pf0;
            }
            tile_rows(rows, kc, X + ir * ldx + pc, ldx, s + jr * kc, c, ldc, m0, m1, m2, accumulate || !first,
                      last && bias != nullptr ? bias + jc + jr : nullptr, pt, npt, ir, pf0, pf1);
          }
        }
      }
    }
  }
#endif
};

using KGemm = KGemmT<>;

}  // namespace lora::detail

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
