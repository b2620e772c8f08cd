// The pieces of the fine-tuning demo, shared by examples/finetune/main.cpp and tests/finetune.cpp:
// tasks cut from Fashion-MNIST, a dense MLP that trains all its weights (pretraining and full
// fine-tuning), the same network as a lora::Sequential of LoRALinear layers, one training loop for
// both, accuracy, and a progress line.
//
//   N rows (batch), D = 784 pixels, H hidden width, C = 10 outputs; x (N, D), logits (N, C).
//
// Tasks: task A is classes 0-4, task B classes 5-9. The network has 10 outputs; a task's loss and
// accuracy use its own five (cross-entropy over logits[:, first .. first+4], argmax over the same five),
// as in a multi-head set-up. So the frozen base is at chance on task B (its outputs 5-9 never trained)
// instead of trivially at 0, and task A accuracy after adapting measures what became of the features.
#pragma once

#include <lora/data_parallel.hpp>  // train(): the same loop on one process or, under mpirun, on several
#include <lora/init.hpp>
#include <lora/lora.hpp>
#include <lora/quant.hpp>  // the low-precision bases

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "mnist.hpp"

namespace finetune {

using Mat = lora::Matrix<float>;
using Row = lora::RowVector<float>;
using lora::Index;

constexpr int kTaskClasses = 5;

// ---- data -------------------------------------------------------------------------------------------

/// The images of classes [first_class, first_class + 5) of a split, labelled 0..4.
struct Task {
  const mnist::Dataset* data = nullptr;
  int first_class = 0;
  std::vector<std::size_t> index;  // rows of *data
  std::vector<int> labels;         // label - first_class
  std::size_t size() const { return index.size(); }
};

/// The first `limit` images (0: all) of the split whose class is in [first_class, first_class + 5), in file order.
inline Task make_task(const mnist::Dataset& data, int first_class, std::size_t limit = 0) {
  Task t;
  t.data = &data;
  t.first_class = first_class;
  for (std::size_t i = 0; i < data.count && (limit == 0 || t.size() < limit); ++i) {
    const int y = data.labels[i] - first_class;
    if (y >= 0 && y < kTaskClasses) {
      t.index.push_back(i);
      t.labels.push_back(y);
    }
  }
  return t;
}

/// Pixels p in 0..255 become (p / 255 - mean) / std, Fashion-MNIST's training-set mean and std.
inline void fill_row(const mnist::Dataset& d, std::size_t image, float* out) {
  const std::uint8_t* p = d.image(image);
  for (std::size_t k = 0; k < d.pixels_per_image(); ++k) out[k] = (p[k] / 255.0f - 0.2860f) / 0.3530f;
}

/// x (n, D) and labels of the task's examples picked[0 .. n).
template <class I>
void fill_batch(const Task& t, const I* picked, std::size_t n, Mat& x, std::vector<int>& labels) {
  x.resize(static_cast<Index>(n), static_cast<Index>(t.data->pixels_per_image()));
  labels.resize(n);
  for (std::size_t i = 0; i < n; ++i) {
    const auto k = static_cast<std::size_t>(picked[i]);
    fill_row(*t.data, t.index[k], x.row(static_cast<Index>(i)).data());
    labels[i] = t.labels[k];
  }
}

/// The whole task as x (size, D).
inline Mat all_images(const Task& t) {
  std::vector<std::size_t> all(t.size());
  for (std::size_t i = 0; i < all.size(); ++i) all[i] = i;
  Mat x;
  std::vector<int> ignored;
  fill_batch(t, all.data(), all.size(), x, ignored);
  return x;
}

// ---- the dense network: pretraining and full fine-tuning ----------------------------------------------

/// y = x Wᵀ + b with W (O, I) and b (O) that train: LoRALinear never computes dW (its W is frozen by
/// design), so pretraining and full fine-tuning use this layer, written out here, with the library's
/// initialisation, GELU, loss and optimizer.
template <class Scalar>
struct BasicDenseLinear {
  using Mat = lora::Matrix<Scalar>;
  using Row = lora::RowVector<Scalar>;
  Mat W, dW;  // (O, I)
  Row b, db;  // (O)
  bool trainable = true;
};

/// Linear, GELU, Linear, GELU, ..., Linear. Float in the demo; double for the gradient check in the tests.
template <class Scalar>
class BasicDenseMLP {
 public:
  using Mat = lora::Matrix<Scalar>;
  using Row = lora::RowVector<Scalar>;

  /// widths {D, H, ..., C}; each layer initialised as torch.nn.Linear (LoRALinear's own init) from seed.
  BasicDenseMLP(const std::vector<Index>& widths, std::uint64_t seed) {
    for (std::size_t k = 0; k + 1 < widths.size(); ++k) {
      lora::LoraConfig cfg;
      cfg.r = 0;
      cfg.seed = seed * 1000 + k;
      const lora::LoRALinear<Scalar> init(widths[k], widths[k + 1], cfg, /*bias*/ true);
      BasicDenseLinear<Scalar> l;
      l.W = init.weight();
      l.b = init.bias();
      l.dW = Mat::Zero(l.W.rows(), l.W.cols());
      l.db = Row::Zero(l.b.cols());
      layers.push_back(std::move(l));
    }
  }

  /// Only the last layer (the classifier head) trains.
  void freeze_all_but_head() {
    for (std::size_t k = 0; k + 1 < layers.size(); ++k) layers[k].trainable = false;
  }

  /// Training forward: keeps every layer's input and pre-activation for backward.
  const Mat& forward(const lora::ConstRef<Scalar>& x) {
    const std::size_t L = layers.size();
    in_.resize(L);
    pre_.resize(L);
    in_[0] = x;
    for (std::size_t k = 0; k < L; ++k) {
      // z_k = a_k Wᵀ + b  (N, O);  a_{k+1} = gelu(z_k), except after the last layer
      pre_[k].resize(x.rows(), layers[k].W.rows());
      pre_[k].noalias() = in_[k] * layers[k].W.transpose();
      pre_[k].rowwise() += layers[k].b;
      if (k + 1 < L) {
        in_[k + 1].resize(pre_[k].rows(), pre_[k].cols());
        lora::GELU::forward<Scalar>(pre_[k], in_[k + 1]);
      }
    }
    return pre_.back();
  }

  /// dlogits (N, C): adds into dW, db of the trainable layers; stops below the lowest trainable layer.
  void backward(const lora::ConstRef<Scalar>& dlogits) {
    std::size_t lowest = layers.size();
    for (std::size_t k = layers.size(); k-- > 0;)
      if (layers[k].trainable) lowest = k;
    dz_ = dlogits;
    for (std::size_t k = layers.size(); k-- > lowest;) {
      BasicDenseLinear<Scalar>& l = layers[k];
      if (l.trainable) {
        // forward: z = a Wᵀ + b, so dW += dzᵀ a and db += Σ_rows dz
        l.dW.noalias() += dz_.transpose() * in_[k];
        l.db += dz_.colwise().sum();
      }
      if (k == lowest) break;
      // forward: z = a Wᵀ + b with a = gelu(z_{k-1}), so da = dz W and dz_{k-1} = da ⊙ gelu'(z_{k-1})
      da_.resize(dz_.rows(), l.W.cols());
      da_.noalias() = dz_ * l.W;
      dz_.resize(da_.rows(), da_.cols());
      lora::GELU::backward<Scalar>(pre_[k - 1], da_, dz_);
    }
  }

  /// Eval forward, allocating its own buffers.
  Mat predict(const lora::ConstRef<Scalar>& x) const {
    Mat a = x, z;
    for (std::size_t k = 0; k < layers.size(); ++k) {
      z.resize(a.rows(), layers[k].W.rows());
      z.noalias() = a * layers[k].W.transpose();
      z.rowwise() += layers[k].b;
      if (k + 1 < layers.size()) {
        a.resize(z.rows(), z.cols());
        lora::GELU::forward<Scalar>(z, a);
      }
    }
    return z;
  }

  lora::ParameterList<Scalar> parameters() {
    lora::ParameterList<Scalar> ps;
    for (std::size_t k = 0; k < layers.size(); ++k) {
      BasicDenseLinear<Scalar>& l = layers[k];
      if (!l.trainable) continue;
      ps.push_back({std::to_string(k) + ".weight", l.W.data(), l.dW.data(), l.W.rows(), l.W.cols()});
      ps.push_back({std::to_string(k) + ".bias", l.b.data(), l.db.data(), 1, l.b.cols()});
    }
    return ps;
  }

  lora::ParameterCount parameter_count() const {
    lora::ParameterCount c;
    for (const auto& l : layers) (l.trainable ? c.trainable : c.frozen) += l.W.size() + l.b.size();
    return c;
  }

  void train() {}  // no dropout: training and eval forward compute the same

  std::vector<BasicDenseLinear<Scalar>> layers;

 private:
  std::vector<Mat> in_, pre_;  // in_[k]: input of layer k; pre_[k]: its output before the activation
  Mat dz_, da_;
};

using DenseLinear = BasicDenseLinear<float>;
using DenseMLP = BasicDenseMLP<float>;

// ---- the same network with LoRA ------------------------------------------------------------------

/// What a LoRA row of the demo varies besides the rank: the variants people train today.
struct LoraVariant {
  bool dora = false;   ///< DoRA (LoraConfig::use_dora)
  bool pissa = false;  ///< PiSSA initialisation (full SVD): A, B from W's top r singular triplets, W the residual
  /// The frozen W stored in low precision (QLoRA's setting): bf16, q8_0 or nf4; f32 keeps the float W. q8_0's
  /// blocks run along a stored row, so a W whose input width is not a multiple of 32 (the 784 pixels) is stored
  /// transposed, (in, out), as a Conv1D checkpoint is.
  lora::WeightFormat base_format = lora::WeightFormat::f32;
};

/// The base's layers as LoRALinear layers that own a copy of W and b, with rank r on every layer
/// (r = 0: the plain frozen network). lora_alpha = 2 r, so the scaling s = alpha / r is 2 at every rank,
/// the common PEFT choice (r 8, alpha 16), and the ranks differ only in rank.
inline lora::Sequential<float> lora_model(const DenseMLP& base, int r, std::uint64_t seed,
                                          const LoraVariant& variant = {}) {
  lora::Sequential<float> m;
  for (std::size_t k = 0; k < base.layers.size(); ++k) {
    lora::LoraConfig cfg;
    cfg.r = r;
    cfg.lora_alpha = 2.0 * r;
    cfg.seed = seed * 1000 + 100 + k;
    cfg.use_dora = variant.dora;
    if (variant.base_format != lora::WeightFormat::f32) {
      const Mat& W = base.layers[k].W;
      const bool transposed = variant.base_format == lora::WeightFormat::q8_0 && W.cols() % 32 != 0;
      auto q = lora::QuantizedMatrix::quantize(transposed ? Mat(W.transpose()) : W, variant.base_format);
      m.add(lora::LoRALinear<float>(
          lora::FrozenWeight<float>::quantized(std::move(q),
                                               transposed ? lora::WeightLayout::in_out : lora::WeightLayout::out_in),
          base.layers[k].b, cfg));
      if (k + 1 < base.layers.size()) m.add(lora::GELU{});
      continue;
    }
    lora::LoRALinear<float> layer(base.layers[k].W, base.layers[k].b, cfg);
    if (variant.pissa) lora::pissa_init(layer);
    m.add(std::move(layer));
    if (k + 1 < base.layers.size()) m.add(lora::GELU{});
  }
  return m;
}

/// The adapted model with its adapter switched off: read-only views (r = 0) of the very W and b buffers
/// the adapted model holds, evaluated without the s·B·A path. Nothing is copied, so this is the model's
/// frozen part as it is now. Valid while `adapted` lives.
inline lora::Sequential<float> adapter_off(lora::Sequential<float>& adapted) {
  lora::Sequential<float> m;
  lora::LoraConfig cfg;
  cfg.r = 0;
  for (std::size_t i = 0; i < adapted.size(); ++i) {
    if (std::holds_alternative<lora::GELU>(adapted[i])) {
      m.add(lora::GELU{});
      continue;
    }
    auto& l = adapted.linear(i);
    if (l.frozen_weight().is_quantized()) {  // the same low-precision bytes, shared (the bias copied)
      m.add(lora::LoRALinear<float>(l.frozen_weight().read_only_view(), lora::RowVector<float>(l.bias()), cfg));
      continue;
    }
    m.add(lora::LoRALinear<float>::view(l.weight().data(), l.out_features(), l.in_features(), cfg,
                                        l.has_bias() ? l.bias().data() : nullptr));
  }
  m.eval();
  return m;
}

/// Eval-mode logits (N, C) of a Sequential in batches of rows (its const forward).
inline Mat predict(const lora::Sequential<float>& m, const Mat& x) { return m.forward(x); }
inline Mat predict(const DenseMLP& m, const Mat& x) { return m.predict(x); }

/// Fraction of rows whose argmax over logits[:, first .. first+4] is the label.
inline double accuracy(const Mat& logits, int first_class, const std::vector<int>& labels) {
  std::size_t right = 0;
  for (std::size_t i = 0; i < labels.size(); ++i) {
    Index best = 0;
    logits.row(static_cast<Index>(i)).segment(first_class, kTaskClasses).maxCoeff(&best);
    right += best == labels[i];
  }
  return labels.empty() ? 0.0 : static_cast<double>(right) / static_cast<double>(labels.size());
}

// ---- progress line ---------------------------------------------------------------------------------

/// "label  step 120/600  loss 0.4213  elapsed 3.1s  eta 12.4s". On a terminal the line redraws in place
/// (at most ten times a second); otherwise a plain line every tenth of the run and at the end, so logs stay short.
class Progress {
 public:
  Progress(std::string label, long total, std::FILE* out)
      : label_(std::move(label)), total_(total), out_(out), tty_(out && isatty(fileno(out))) {}

  void update(long step, double loss) {  // step: 1 .. total
    if (!out_) return;
    const double t = seconds();
    const bool last = step == total_;
    if (tty_) {
      if (!last && t - drawn_ < 0.1) return;
      drawn_ = t;
      std::fprintf(out_, "\r%s\x1b[K", line(step, loss, t).c_str());
      if (last) std::fputc('\n', out_);
    } else {
      const long every = std::max(1L, total_ / 10);
      if (!last && step % every != 0) return;
      std::fprintf(out_, "%s\n", line(step, loss, t).c_str());
    }
    std::fflush(out_);
  }
  double seconds() const { return std::chrono::duration<double>(Clock::now() - start_).count(); }

 private:
  using Clock = std::chrono::steady_clock;
  std::string line(long step, double loss, double t) const {
    const double eta = step > 0 ? t / static_cast<double>(step) * static_cast<double>(total_ - step) : 0.0;
    char buf[160];
    std::snprintf(buf, sizeof buf, "%-12s step %5ld/%ld  loss %.4f  elapsed %5.1fs  eta %5.1fs", label_.c_str(), step,
                  total_, loss, t, eta);
    return buf;
  }
  std::string label_;
  long total_;
  std::FILE* out_;
  bool tty_;
  Clock::time_point start_ = Clock::now();
  double drawn_ = -1;
};

// ---- training -----------------------------------------------------------------------------------------

/// The same for every method: AdamW, cosine schedule with linear warmup, gradient clipping, batches.
struct TrainOptions {
  long steps = 600;
  std::size_t batch = 128;
  double lr = 1e-3;
  double weight_decay = 0.01;
  double warmup_fraction = 0.05;
  double clip_norm = 1.0;
  std::uint64_t seed = 0;     // the batch order
  double loraplus_ratio = 0;  // LoRA+ (PEFT's create_loraplus_optimizer): lora_B at lr · ratio; 0: off
  // Data parallelism (<lora/data_parallel.hpp>): each global batch in `micro_batches` leaves, summed in a fixed
  // tree, so that one process and any number of MPI ranks (up to micro_batches) train the same bits. `comm`:
  // null for one process.
  int micro_batches = 4;
  lora::Communicator* comm = nullptr;
};

struct TrainResult {
  std::vector<float> losses;  // one per step
  double seconds = 0;
  std::size_t optimizer_state_bytes = 0;
  lora::ParameterCount params;
  std::size_t bytes_sent_per_step = 0;  // what each rank hands MPI per step (the gradients and the loss)
  double reduce_seconds = 0;            // of `seconds`, the time in DataParallel::reduce()
};

/// Trains model (DenseMLP or lora::Sequential<float>) on the task: cross-entropy over the task's five outputs.
/// Every rank of o.comm calls it with the same arguments; each computes its leaves of every global batch.
template <class Model>
TrainResult train(Model& model, const Task& task, const TrainOptions& o, const std::string& label,
                  std::FILE* progress_out) {
  TrainResult r;
  r.params = model.parameter_count();
  model.train();
  auto groups = model.parameters();
  if (o.loraplus_ratio > 0)
    groups = lora::loraplus_groups(std::move(groups), o.lr, {o.loraplus_ratio, o.lr, o.weight_decay});
  lora::AdamW<float> opt(groups, {o.lr, 0.9, 0.999, 1e-8, o.weight_decay});
  r.optimizer_state_bytes = opt.state_bytes();
  const auto params = model.parameters();
  lora::LocalCommunicator one_process;
  lora::Communicator& comm = o.comm ? *o.comm : one_process;
  lora::DataParallel<float>::Options dpo;
  dpo.mode = lora::DataParallelMode::deterministic;
  dpo.global_batch = static_cast<Index>(std::min(o.batch, task.size()));
  dpo.micro_batches = static_cast<int>(std::min<std::size_t>(static_cast<std::size_t>(o.micro_batches), o.batch));
  dpo.seed = o.seed;
  // A LoRA model's modules (shapes, ranks, base fingerprints) are compared across ranks too.
  auto dp = [&] {
    if constexpr (std::is_same_v<Model, lora::Sequential<float>>)
      return std::make_unique<lora::DataParallel<float>>(comm, model, dpo);
    else
      return std::make_unique<lora::DataParallel<float>>(comm, params, dpo);
  }();
  lora::ShuffledBatches batches(static_cast<Index>(task.size()), dpo.global_batch, o.seed);
  const long warmup = static_cast<long>(o.warmup_fraction * static_cast<double>(o.steps));
  Mat x, dlogits;
  std::vector<int> labels;
  Progress progress(label, o.steps, progress_out);
  for (long step = 0; step < o.steps; ++step) {
    const Index* batch = batches.next();
    for (const auto& shard : dp->shards()) {
      if constexpr (std::is_same_v<Model, lora::Sequential<float>>)
        lora::set_dropout_seeds(model, dp->leaf_seed(step, shard.leaf));
      fill_batch(task, batch + shard.begin, static_cast<std::size_t>(shard.size()), x, labels);
      const Mat& logits = model.forward(x);
      dlogits.setZero(logits.rows(), logits.cols());  // the other task's outputs get no gradient
      const float loss = lora::cross_entropy<float>(logits.middleCols(task.first_class, kTaskClasses), labels,
                                                    dlogits.middleCols(task.first_class, kTaskClasses));
      model.backward(dlogits);
      dp->accumulate(loss);
    }
    const double loss = dp->reduce();  // the global batch's mean loss; the gradients are the batch's
    opt.set_lr(o.lr * lora::cosine_schedule_with_warmup(step, warmup, o.steps));
    lora::clip_grad_norm(params, o.clip_norm);
    opt.step();
    opt.zero_grad();
    r.losses.push_back(static_cast<float>(loss));
    progress.update(step + 1, loss);
  }
  r.seconds = progress.seconds();
  r.bytes_sent_per_step = dp->bytes_sent_per_step();
  r.reduce_seconds = dp->reduce_seconds();
  return r;
}

}  // namespace finetune
