# The opt-in targets a consumer links next to lora::lora for speed. lora::lora itself adds no flag, define or
# library; a program that wants these asks for them:
#
#   target_link_libraries(app PRIVATE lora::lora lora::native lora::openblas)
#
#   lora::native    -march=native (GCC and Clang; nothing elsewhere): the SIMD of the building machine. The program
#                   then runs only on CPUs with that machine's instruction set.
#   lora::openblas  EIGEN_USE_BLAS and OpenBLAS: Eigen hands its float/double matrix products to sgemm/dgemm.
#                   Defined only when find_package(BLAS) with BLA_VENDOR OpenBLAS finds it.
#   lora::openmp    the compiler's OpenMP: Eigen's own products run on Eigen::nbThreads() threads
#                   (OMP_NUM_THREADS or Eigen::setNbThreads). Defined only when find_package(OpenMP) finds it.
#   lora::dnnl      LORA_USE_DNNL and oneDNN: FrozenWeight<float>'s products (every layer's x Wᵀ and dy W) go to
#                   oneDNN's sgemm, which picks its kernel from the CPU at run time; on Eigen::nbThreads() threads,
#                   like Eigen's own products. Defined only when oneDNN's header and library are found (Debian:
#                   libdnnl-dev) and, for a oneDNN built on OpenMP, the OpenMP runtime it runs on (libgomp).
#   lora::mpi       MPI's C library, for <lora/distributed.hpp> (data-parallel training over MPI; the only header
#                   that needs it). Defined only when find_package(MPI) finds MPI for C++ (Debian: libopenmpi-dev).
#
# EIGEN_USE_BLAS and -march=native change how Eigen's types and kernels are compiled, so every target of one
# program that passes Eigen objects to another must link the same ones.
#
# Included by the top-level CMakeLists.txt (normal INTERFACE targets with lora:: aliases, for add_subdirectory
# and the project's own targets) and by the installed loraConfig.cmake (IMPORTED targets, searched for on the
# consumer's machine). Missing OpenBLAS, OpenMP, oneDNN or MPI is not an error here: the target is then absent, and
# find_package(lora REQUIRED COMPONENTS openblas) reports it.
include_guard(DIRECTORY)

# Creates lora::<name> and returns in out_var the name that takes target_* commands.
function(_lora_opt_in_target name out_var)
  if(LORA_OPT_IN_IMPORTED)
    add_library(lora::${name} INTERFACE IMPORTED)
    set(${out_var} lora::${name} PARENT_SCOPE)
  else()
    add_library(lora_${name} INTERFACE)
    add_library(lora::${name} ALIAS lora_${name})
    set(${out_var} lora_${name} PARENT_SCOPE)
  endif()
endfunction()

# A function, so that BLA_VENDOR, BLAS_LIBRARIES, OpenMP_* and the other variables the find modules set stay
# here and never reach the caller's scope (loraConfig.cmake runs in the consumer's).
function(_lora_define_opt_in_targets)
  if(NOT TARGET lora::native)
    _lora_opt_in_target(native tgt)
    target_compile_options(${tgt} INTERFACE $<$<COMPILE_LANG_AND_ID:CXX,GNU,Clang>:-march=native>)
  endif()

  if(NOT TARGET lora::openblas)
    # An environment BLA_VENDOR would override ours: set it aside while searching.
    set(env_vendor "$ENV{BLA_VENDOR}")
    unset(ENV{BLA_VENDOR})
    set(BLA_VENDOR OpenBLAS)
    find_package(BLAS QUIET)
    set(ENV{BLA_VENDOR} "${env_vendor}")
    if(BLAS_FOUND AND BLAS_LIBRARIES MATCHES "openblas")
      _lora_opt_in_target(openblas tgt)
      target_compile_definitions(${tgt} INTERFACE EIGEN_USE_BLAS)
      target_link_libraries(${tgt} INTERFACE ${BLAS_LIBRARIES} ${BLAS_LINKER_FLAGS})
    endif()
  endif()

  if(NOT TARGET lora::openmp AND CMAKE_CXX_COMPILER_LOADED)
    find_package(OpenMP QUIET COMPONENTS CXX)
    if(OpenMP_CXX_FOUND)
      _lora_opt_in_target(openmp tgt)
      target_link_libraries(${tgt} INTERFACE OpenMP::OpenMP_CXX)
    endif()
  endif()

  if(NOT TARGET lora::dnnl)
    find_path(LORA_DNNL_INCLUDE_DIR oneapi/dnnl/dnnl.h)
    find_library(LORA_DNNL_LIBRARY dnnl)
    set(runtime_ok FALSE)
    if(LORA_DNNL_INCLUDE_DIR AND LORA_DNNL_LIBRARY)
      # <lora/detail/dnnl_gemm.hpp> sets the OpenMP thread count around each call, so a oneDNN built on OpenMP
      # needs that runtime linked too; one built on another runtime (TBB, threadpool) is not used.
      file(STRINGS "${LORA_DNNL_INCLUDE_DIR}/oneapi/dnnl/dnnl_config.h" runtime
           REGEX "^#define DNNL_CPU_THREADING_RUNTIME ")
      if(runtime MATCHES "DNNL_RUNTIME_OMP")
        find_library(LORA_GOMP_LIBRARY NAMES gomp libgomp.so.1)
        if(LORA_GOMP_LIBRARY)
          set(runtime_ok TRUE)
        endif()
      elseif(runtime MATCHES "DNNL_RUNTIME_SEQ")
        set(runtime_ok TRUE)
        set(LORA_GOMP_LIBRARY "")
      endif()
    endif()
    if(runtime_ok)
      _lora_opt_in_target(dnnl tgt)
      target_compile_definitions(${tgt} INTERFACE LORA_USE_DNNL)
      target_include_directories(${tgt} SYSTEM INTERFACE "${LORA_DNNL_INCLUDE_DIR}")
      target_link_libraries(${tgt} INTERFACE "${LORA_DNNL_LIBRARY}" ${LORA_GOMP_LIBRARY})
    endif()
  endif()

  if(NOT TARGET lora::mpi AND CMAKE_CXX_COMPILER_LOADED)
    find_package(MPI QUIET COMPONENTS CXX)
    if(MPI_CXX_FOUND)
      _lora_opt_in_target(mpi tgt)
      target_link_libraries(${tgt} INTERFACE MPI::MPI_CXX)
    endif()
  endif()
endfunction()

_lora_define_opt_in_targets()
