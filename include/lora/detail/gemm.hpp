// The library's float GEMM: FrozenWeight's products (x Wᵀ, dy W) and the fused layer's own adapter products
// (x Aᵀ, dyᵀ H, dy B, Gᵀ x, G A) all go through product(): oneDNN's sgemm for float when LORA_USE_DNNL is defined,
// Eigen's product otherwise (detail/dnnl_gemm.hpp says why oneDNN).
//
// Why the adapter products too: they are thin (one side is the rank, 8 or 16), and Eigen runs them at a fraction of the
// machine's speed. Measured on the project's Xeon, one thread, N = 512, I = 768, 2 slices of 768 outputs at r = 8
// (session program, medians of 41): x Aᵀ with A (16, 768) 0.12 ms on Eigen, 0.07 on oneDNN; dyᵀ H as (r, O) 0.19 and
// 0.13; dy B 0.23 and 0.18; Gᵀ x 0.10 and 0.07; G A 0.16 (row by row) and 0.07. That is 0.5 ms a training step, 2.6% of
// its two base products.
#pragma once

#include <lora/types.hpp>

#if defined(LORA_USE_DNNL)
#include <lora/detail/dnnl_gemm.hpp>
#endif

#include <type_traits>

namespace lora::detail {

/// C = alpha op(A) op(B), or C += alpha op(A) op(B) when `accumulate`; op(X) = Xᵀ when trans_x. A, B and C are
/// row-major blocks (of a Matrix, a Map, or a block of either); C's shape must already be right, and C must not
/// share memory with A or B. Without `accumulate`, C's old values (NaN included) are never read. `where` names the
/// caller in errors.
template <class Scalar>
void product(const char* where, Scalar alpha, const ConstRef<Scalar>& A, bool trans_a, const ConstRef<Scalar>& B,
             bool trans_b, bool accumulate, MutRef<Scalar> C) {
#if defined(LORA_USE_DNNL)
  if constexpr (std::is_same_v<Scalar, float>) {
    return dnnl_gemm(where, trans_a, trans_b, C.rows(), C.cols(), trans_a ? A.rows() : A.cols(), alpha, A.data(),
                     dnnl_leading_dimension(A), B.data(), dnnl_leading_dimension(B), accumulate ? 1.0f : 0.0f, C.data(),
                     dnnl_leading_dimension(C));
  }
#endif
  (void)where;
  auto run = [&](const auto& a, const auto& b) {
    if (accumulate)
      C.noalias() += alpha * a * b;
    else
      C.noalias() = alpha * a * b;
  };
  if (trans_a && trans_b)
    run(A.transpose(), B.transpose());
  else if (trans_a)
    run(A.transpose(), B);
  else if (trans_b)
    run(A, B.transpose());
  else
    run(A, B);
}

}  // namespace lora::detail
