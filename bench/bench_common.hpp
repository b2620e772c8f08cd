// What every benchmark program shares: its own flags (--threads=T, --smoke),
// the thread setting for the backend it was built with, and a header saying
// which backend, kernel, thread count and CPU produced the numbers.
//
//   Backend   built with            threads set by
//   Eigen     (default)             Eigen::setNbThreads, only with LORA_USE_OPENMP
//   OpenBLAS  -DLORA_USE_BLAS=ON    openblas_set_num_threads
//   oneDNN    LORA_USE_DNNL (the    Eigen::nbThreads(), which lora::detail::dnnl_gemm passes on for every call
//             default where found)  (FrozenWeight's products only; Eigen or OpenBLAS run the rest)
#pragma once

#include <Eigen/Core>

#ifdef LORA_USE_DNNL
#include <oneapi/dnnl/dnnl.h>
#endif

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#ifdef LORA_USE_OPENBLAS
extern "C" {
void openblas_set_num_threads(int num_threads);
int openblas_get_num_threads(void);
char* openblas_get_corename(void);
char* openblas_get_config(void);
}
#endif

namespace lora_bench {

struct Options {
  int threads = 1;     ///< --threads=T
  bool smoke = false;  ///< --smoke: small shapes and few iterations, to prove the program still runs (CI)
};

/// Takes --threads=T and --smoke out of argv (so google benchmark never sees
/// them) and returns them. Exits with a message on a malformed value.
inline Options take_options(int& argc, char** argv) {
  Options o;
  int kept = 1;
  for (int i = 1; i < argc; ++i) {
    const char* a = argv[i];
    if (std::strncmp(a, "--threads=", 10) == 0) {
      char* end = nullptr;
      const long t = std::strtol(a + 10, &end, 10);
      if (end == a + 10 || *end != '\0' || t < 1 || t > 1024) {
        std::fprintf(stderr, "%s: --threads expects a positive integer, got '%s'\n", argv[0], a + 10);
        std::exit(2);
      }
      o.threads = static_cast<int>(t);
    } else if (std::strcmp(a, "--smoke") == 0) {
      o.smoke = true;
    } else {
      argv[kept++] = argv[i];
    }
  }
  argc = kept;
  argv[argc] = nullptr;
  return o;
}

inline std::string backend_name() {
#if defined(LORA_USE_DNNL) && defined(LORA_USE_OPENBLAS)
  return "oneDNN for the frozen W's products, OpenBLAS for Eigen's";
#elif defined(LORA_USE_DNNL)
  return "oneDNN for the frozen W's products, Eigen for the rest";
#elif defined(LORA_USE_OPENBLAS)
  return "OpenBLAS";
#else
  return "Eigen";
#endif
}

inline bool has_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

/// Sets the threads the backend's matrix products use. More than one thread
/// needs OpenBLAS or OpenMP; without either the program says so and exits.
inline void set_threads(int threads, const char* program) {
#ifdef LORA_USE_OPENBLAS
  (void)program;
  openblas_set_num_threads(threads);
#else
  if (threads > 1 && !has_openmp()) {
    std::fprintf(stderr,
                 "%s: --threads=%d needs a build with -DLORA_USE_OPENMP=ON (Eigen runs its products on threads "
                 "only under OpenMP) or -DLORA_USE_BLAS=ON\n",
                 program, threads);
    std::exit(2);
  }
#endif
  Eigen::setNbThreads(threads);
}

inline int backend_threads() {
#ifdef LORA_USE_OPENBLAS
  return openblas_get_num_threads();
#else
  return Eigen::nbThreads();
#endif
}

/// "AMD EPYC" from /proc/cpuinfo, or "unknown".
inline std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) return line.substr(line.find_first_not_of(' ', colon + 1));
    }
  return "unknown";
}

/// oneDNN's name for the instruction set it runs (dnnl_get_effective_cpu_isa(); dnnl_types.h's values).
inline std::string dnnl_isa_name(int isa) {
  switch (isa) {
    case 0x3e7:
      return "avx512_core_amx";
    case 0xe7:
      return "avx512_core_bf16";
    case 0x67:
      return "avx512_core_vnni";
    case 0x27:
      return "avx512_core";
    case 0x407:
      return "avx2_vnni";
    case 0x7:
      return "avx2";
    case 0x3:
      return "avx";
    case 0x1:
      return "sse41";
    default: {
      char b[32];
      std::snprintf(b, sizeof b, "isa 0x%x", unsigned(isa));
      return b;
    }
  }
}

/// The GEMM kernel that runs: OpenBLAS's core name and build config, or Eigen's SIMD set; oneDNN's instruction
/// set first when the frozen weights' products run on it.
inline std::string kernel_description() {
  std::string dnnl;
#ifdef LORA_USE_DNNL
  dnnl = "oneDNN " + std::to_string(dnnl_version()->major) + "." + std::to_string(dnnl_version()->minor) +
         " sgemm, ISA " + dnnl_isa_name(int(dnnl_get_effective_cpu_isa())) + "; ";
#endif
#ifdef LORA_USE_OPENBLAS
  const char* coretype = std::getenv("OPENBLAS_CORETYPE");
  return dnnl + "core " + openblas_get_corename() + " (OPENBLAS_CORETYPE=" + (coretype ? coretype : "unset") +
         "), config: " + openblas_get_config();
#else
  return dnnl + "Eigen " + std::to_string(EIGEN_WORLD_VERSION) + "." + std::to_string(EIGEN_MAJOR_VERSION) + "." +
         std::to_string(EIGEN_MINOR_VERSION) + " GEMM, SIMD: " + Eigen::SimdInstructionSetsInUse();
#endif
}

/// The seconds one call of f takes (steady clock).
template <class F>
double seconds(F&& f) {
  const auto t0 = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

/// The median of v (its upper middle value when v has an even size); v must not be empty.
inline double median(std::vector<double> v) {
  std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
  return v[v.size() / 2];
}

/// A field of /proc/self/status in KiB ("VmHWM", "VmRSS"), or -1.
inline long status_kib(const char* field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  const std::string key = std::string(field) + ":";
  while (std::getline(in, line))
    if (line.rfind(key, 0) == 0) return std::strtol(line.c_str() + key.size(), nullptr, 10);
  return -1;
}

/// One line per fact, "# " first so that scripts reading the output can skip them.
inline std::string context_lines() {
  std::string s;
  s += "# backend: " + backend_name() + (has_openmp() ? " (OpenMP)" : "") + "\n";
  s += "# kernel:  " + kernel_description() + "\n";
  s += "# threads: " + std::to_string(backend_threads()) + "\n";
  s += "# cpu:     " + cpu_model() + "\n";
  return s;
}

}  // namespace lora_bench
