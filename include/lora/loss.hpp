// Losses. Each returns the loss and, when given dpred, writes dL/dpred
// (it does not add: a loss is the start of a backward pass).
//
//   pred / logits (N, C), target (N, C), labels (N)
#pragma once

#ifndef LORA_INSIDE_LIBRARY
#define LORA_INSIDE_LIBRARY
#endif

#include <lora/detail/checks.hpp>
#include <lora/errors.hpp>
#include <lora/types.hpp>

#include <cmath>
#include <string>
#include <vector>

namespace lora {

/// Mean squared error over all N·C entries (torch.nn.functional.mse_loss, reduction="mean"):
/// L = mean((pred - target)²), dpred = 2 (pred - target) / (N·C).
template <class Scalar>
Scalar mse_loss(const ConstRef<Scalar>& pred, const ConstRef<Scalar>& target, MutRef<Scalar> dpred) {
  detail::check_shape("mse_loss", "target", target, pred.rows(), pred.cols());
  detail::check_shape("mse_loss", "dpred", dpred, pred.rows(), pred.cols());
  if (pred.size() == 0) throw shape_error("mse_loss: pred is empty " + shape_string(pred.rows(), pred.cols()));
  const Scalar inv_n = Scalar(1) / static_cast<Scalar>(pred.size());
  dpred = pred - target;
  const Scalar loss = dpred.squaredNorm() * inv_n;
  dpred *= Scalar(2) * inv_n;
  return loss;
}

template <class Scalar>
Scalar mse_loss(const ConstRef<Scalar>& pred, const ConstRef<Scalar>& target) {
  detail::check_shape("mse_loss", "target", target, pred.rows(), pred.cols());
  if (pred.size() == 0) throw shape_error("mse_loss: pred is empty " + shape_string(pred.rows(), pred.cols()));
  return (pred - target).squaredNorm() / static_cast<Scalar>(pred.size());
}

/// Label value that cross_entropy skips, as PyTorch's ignore_index default.
constexpr int ignore_index = -100;

namespace detail {
template <class Scalar>
Scalar cross_entropy_impl(const ConstRef<Scalar>& logits, const int* labels, Index n_labels, Scalar* dlogits_data,
                          Index dlogits_stride) {
  const char* where = "cross_entropy";
  if (n_labels != logits.rows())
    throw shape_error(std::string(where) + ": labels expected " + std::to_string(logits.rows()) +
                      " entries (one per row of logits " + shape_string(logits.rows(), logits.cols()) + "), got " +
                      std::to_string(n_labels));
  const Index C = logits.cols();
  Index counted = 0;
  for (Index i = 0; i < n_labels; ++i) {
    const int y = labels[i];
    if (y == ignore_index) continue;
    if (y < 0 || y >= C)
      throw shape_error(std::string(where) + ": label at row " + std::to_string(i) + " expected in [0, " +
                        std::to_string(C) + ") or ignore_index (-100), got " + std::to_string(y));
    ++counted;
  }
  // Mean over the rows that count, as PyTorch (all ignored gives NaN there; we return 0 and zero gradients).
  const Scalar inv_count = counted > 0 ? Scalar(1) / static_cast<Scalar>(counted) : Scalar(0);
  double total = 0;
  for (Index i = 0; i < logits.rows(); ++i) {
    Scalar* d = dlogits_data ? dlogits_data + i * dlogits_stride : nullptr;
    const int y = labels[i];
    if (y == ignore_index) {
      if (d)
        for (Index c = 0; c < C; ++c) d[c] = Scalar(0);
      continue;
    }
    // log Σ exp(z) = m + log Σ exp(z - m), m = max z: no overflow
    const auto row = logits.row(i);
    const Scalar m = row.maxCoeff();
    Scalar sum = 0;
    for (Index c = 0; c < C; ++c) sum += std::exp(row(c) - m);
    const Scalar lse = m + std::log(sum);
    total += static_cast<double>(lse - row(y));
    if (d) {
      // dL/dz = (softmax(z) - onehot(y)) / count
      for (Index c = 0; c < C; ++c) d[c] = std::exp(row(c) - lse) * inv_count;
      d[y] -= inv_count;
    }
  }
  return static_cast<Scalar>(total) * inv_count;
}
}  // namespace detail

/// Softmax cross-entropy from logits (N, C) with integer class labels (N),
/// mean over the rows whose label is not ignore_index (torch.nn.functional.cross_entropy).
/// Writes dlogits (N, C). Labels outside [0, C) throw shape_error.
template <class Scalar>
Scalar cross_entropy(const ConstRef<Scalar>& logits, const std::vector<int>& labels, MutRef<Scalar> dlogits) {
  detail::check_shape("cross_entropy", "dlogits", dlogits, logits.rows(), logits.cols());
  detail::check_no_overlap("cross_entropy", "dlogits", dlogits, "logits", logits);
  return detail::cross_entropy_impl<Scalar>(logits, labels.data(), static_cast<Index>(labels.size()), dlogits.data(),
                                            dlogits.outerStride());
}

template <class Scalar>
Scalar cross_entropy(const ConstRef<Scalar>& logits, const std::vector<int>& labels) {
  return detail::cross_entropy_impl<Scalar>(logits, labels.data(), static_cast<Index>(labels.size()), nullptr, 0);
}

}  // namespace lora
