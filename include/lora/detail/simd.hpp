// What the library's x86-64 kernels share (<lora/quant.hpp>'s quantized products, <lora/detail/kgemm.hpp>'s GEMM):
// they are compiled for AVX-512 whatever the build's -march, through the LORA_AVX512 target attribute, and called
// only when the CPU has it (cpu_has_avx512(), read once). LORA_X86_KERNELS is defined where they exist: x86-64
// with GCC or Clang, and not turned off with LORA_NO_SIMD.
#pragma once

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__)) && !defined(LORA_NO_SIMD)
#define LORA_X86_KERNELS 1
#include <immintrin.h>
#define LORA_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))
#endif

namespace lora::detail {

/// True when this CPU has AVX-512 F, BW, VL and DQ and the kernels were compiled (LORA_X86_KERNELS).
inline bool cpu_has_avx512() {
#ifdef LORA_X86_KERNELS
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return has;
#else
  return false;
#endif
}

}  // namespace lora::detail
