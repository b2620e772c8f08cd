// Sequential: a chain of LoRALinear layers and activations with forward and
// backward, so a multi-layer network trains in a few lines:
//
//   lora::Sequential<float> model;
//   model.add(lora::LoRALinear<float>(784, 256, cfg)).add(lora::ReLU{}).add(lora::LoRALinear<float>(256, 10, cfg));
//   lora::AdamW<float> opt(model.parameters());
//   const auto& logits = model.forward(x);              // x (N, 784) -> (N, 10)
//   float loss = lora::cross_entropy<float>(logits, labels, dlogits);
//   model.backward(dlogits);                            // adds into every dA, dB (and db)
//   opt.step(); opt.zero_grad();
//
// The model keeps one activation buffer per layer boundary and two gradient
// buffers, reused from step to step: a steady-state step allocates nothing.
#pragma once

#ifndef LORA_INSIDE_LIBRARY
#define LORA_INSIDE_LIBRARY
#endif

#include <lora/activations.hpp>
#include <lora/detail/checks.hpp>
#include <lora/errors.hpp>
#include <lora/linear.hpp>
#include <lora/params.hpp>
#include <lora/types.hpp>

#include <algorithm>
#include <map>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

namespace lora {

template <class Scalar>
class Sequential {
 public:
  using Mat = Matrix<Scalar>;
  using Layer = std::variant<LoRALinear<Scalar>, ReLU, GELU>;

  Sequential() = default;

  /// Appends a layer. A LoRALinear's in_features must match the width coming
  /// out of the layers before it (shape_error otherwise; the model is unchanged).
  Sequential& add(LoRALinear<Scalar> layer) {
    const Index width = output_width();
    if (width >= 0 && layer.in_features() != width)
      throw shape_error("Sequential::add: layer " + std::to_string(layers_.size()) + " expected in_features " +
                        std::to_string(width) + " (the output width of layer " + std::to_string(last_linear_) +
                        "), got " + std::to_string(layer.in_features()));
    last_linear_ = static_cast<Index>(layers_.size());
    layer.train(training_);
    layers_.emplace_back(std::move(layer));
    names_.emplace_back();
    return *this;
  }
  /// Appends a LoRALinear under a module path (the name PEFT files use for it,
  /// "model.layers.0.mlp.up_proj"): named_linears() gives it under that name,
  /// so the model saves and loads as a PEFT adapter. config_error for an empty
  /// or repeated name, and the model is unchanged.
  Sequential& add(const std::string& name, LoRALinear<Scalar> layer) {
    if (name.empty()) throw config_error("Sequential::add: a layer name must not be empty");
    for (const auto& n : names_)
      if (n == name) throw config_error("Sequential::add: a layer is already named \"" + printable(name) + "\"");
    add(std::move(layer));
    names_.back() = name;
    return *this;
  }
  Sequential& add(ReLU a) {
    layers_.emplace_back(a);
    names_.emplace_back();
    return *this;
  }
  Sequential& add(GELU a) {
    layers_.emplace_back(a);
    names_.emplace_back();
    return *this;
  }

  /// The LoRALinear layers by name: the name given to add(name, layer), else
  /// the layer's index ("0", "2"). The map peft::save_adapter,
  /// peft::load_adapter and lora::save_checkpoint take; the pointers are valid
  /// until the next add().
  std::map<std::string, LoRALinear<Scalar>*> named_linears() {
    std::map<std::string, LoRALinear<Scalar>*> out;
    for (std::size_t i = 0; i < layers_.size(); ++i)
      if (auto* l = std::get_if<LoRALinear<Scalar>>(&layers_[i]))
        out.emplace(names_[i].empty() ? std::to_string(i) : names_[i], l);
    return out;
  }

  std::size_t size() const { return layers_.size(); }
  Layer& operator[](std::size_t i) { return layers_.at(i); }
  const Layer& operator[](std::size_t i) const { return layers_.at(i); }

  /// The i-th layer as a LoRALinear (state_error if it is an activation).
  LoRALinear<Scalar>& linear(std::size_t i) {
    auto* l = std::get_if<LoRALinear<Scalar>>(&layers_.at(i));
    if (!l) throw state_error("Sequential::linear: layer " + std::to_string(i) + " is an activation, not a LoRALinear");
    return *l;
  }

  /// x (N, I) -> y (N, O). Returns a reference to the model's output buffer,
  /// valid until the next forward. Training mode keeps every layer's input for backward().
  const Mat& forward(const ConstRef<Scalar>& x) {
    if (layers_.empty()) throw state_error("Sequential::forward: the model has no layers");
    const Index N = x.rows();
    acts_.resize(layers_.size() + 1);
    acts_[0] = x;  // copied so backward does not depend on the caller keeping x alive (N·I, cheap next to the GEMMs)
    for (std::size_t i = 0; i < layers_.size(); ++i) {
      const Mat& in = acts_[i];
      Mat& out = acts_[i + 1];
      std::visit(
          [&](auto& layer) {
            using L = std::decay_t<decltype(layer)>;
            if constexpr (std::is_same_v<L, LoRALinear<Scalar>>) {
              out.resize(N, layer.out_features());
              // A DoRA layer's backward takes its output, which stays here as the next input: no copy of Z.
              if (layer.use_dora()) layer.set_dora_output_backward(true);
              layer.forward(in, out);
            } else {
              out.resize(N, in.cols());
              L::template forward<Scalar>(in, out);
            }
          },
          layers_[i]);
    }
    forward_rows_ = training_ ? N : -1;
    return acts_.back();
  }

  /// x (N, I) -> y (N, O) written into y, the calling convention of
  /// LoRALinear::forward(x, y) (training mode keeps what backward() needs).
  void forward(const ConstRef<Scalar>& x, MutRef<Scalar> y) {
    detail::check_shape("Sequential::forward", "y", y, x.rows(), output_width() < 0 ? x.cols() : output_width());
    y = forward(x);
  }

  /// ... and the eval-mode form of a const model, as LoRALinear's const forward.
  void forward(const ConstRef<Scalar>& x, MutRef<Scalar> y) const {
    detail::check_shape("Sequential::forward", "y", y, x.rows(), output_width() < 0 ? x.cols() : output_width());
    y = forward(x);
  }

  /// Eval-mode forward of a const model: allocates its own buffers, safe from several threads.
  Mat forward(const ConstRef<Scalar>& x) const {
    if (layers_.empty()) throw state_error("Sequential::forward: the model has no layers");
    Mat cur = x, next;
    for (const auto& l : layers_) {
      std::visit(
          [&](const auto& layer) {
            using L = std::decay_t<decltype(layer)>;
            if constexpr (std::is_same_v<L, LoRALinear<Scalar>>) {
              next.resize(cur.rows(), layer.out_features());
              layer.forward(cur, next);
            } else {
              next.resize(cur.rows(), cur.cols());
              L::template forward<Scalar>(cur, next);
            }
          },
          l);
      std::swap(cur, next);
    }
    return cur;
  }

  /// dy (N, O): adds into every layer's gradients. The input gradient is not
  /// computed (the first layer skips its dx).
  void backward(const ConstRef<Scalar>& dy) { backward_impl(dy, nullptr); }

  /// As above, and writes dx (N, I), the gradient with respect to the model's input.
  void backward(const ConstRef<Scalar>& dy, MutRef<Scalar> dx) { backward_impl(dy, &dx); }

  void zero_grad() {
    for_each_linear([](LoRALinear<Scalar>& l) { l.zero_grad(); });
  }
  void train(bool mode = true) {
    training_ = mode;
    forward_rows_ = -1;
    for_each_linear([mode](LoRALinear<Scalar>& l) { l.train(mode); });
  }
  void eval() { train(false); }
  bool is_training() const { return training_; }
  void merge(bool safe_merge = true) {
    for_each_linear([safe_merge](LoRALinear<Scalar>& l) { l.merge(safe_merge); });
  }
  void unmerge() {
    for_each_linear([](LoRALinear<Scalar>& l) { l.unmerge(); });
  }

  /// Every trainable tensor, named "<layer index>.lora_A" and so on.
  ParameterList<Scalar> parameters() {
    ParameterList<Scalar> all;
    for (std::size_t i = 0; i < layers_.size(); ++i)
      if (auto* l = std::get_if<LoRALinear<Scalar>>(&layers_[i]))
        for (auto p : l->parameters()) {
          p.name = std::to_string(i) + '.' + p.name;
          all.push_back(std::move(p));
        }
    return all;
  }

  ParameterCount parameter_count() const {
    ParameterCount c;
    for (const auto& l : layers_)
      if (const auto* lin = std::get_if<LoRALinear<Scalar>>(&l)) c += lin->parameter_count();
    return c;
  }

  /// PEFT's print_trainable_parameters() line.
  std::string summary() const { return trainable_summary(parameter_count()); }

 private:
  template <class F>
  void for_each_linear(F&& f) {
    for (auto& l : layers_)
      if (auto* lin = std::get_if<LoRALinear<Scalar>>(&l)) f(*lin);
  }

  Index output_width() const {
    if (last_linear_ < 0) return -1;
    return std::get<LoRALinear<Scalar>>(layers_[static_cast<std::size_t>(last_linear_)]).out_features();
  }

  void backward_impl(const ConstRef<Scalar>& dy, MutRef<Scalar>* dx) {
    const char* where = "Sequential::backward";
    if (!training_)
      throw state_error(std::string(where) + ": the model is in eval mode; call train() and run forward again");
    if (forward_rows_ < 0) throw state_error(std::string(where) + ": needs a training-mode forward first");
    detail::check_shape(where, "dy", dy, forward_rows_, acts_.back().cols());
    if (dx) detail::check_shape(where, "dx", *dx, forward_rows_, acts_[0].cols());
    // Two gradient buffers, used in turn: layer k reads the gradient of its output (dy itself for the last layer)
    // and writes that of its input into grad_buf_[k % 2], which layer k - 1 then reads. Grow-only, so a
    // steady-state step allocates nothing, and a step holds two gradients at a time, not one per layer.
    const std::size_t L = layers_.size();
    std::size_t most = 0;
    for (std::size_t k = 0; k < L; ++k) most = std::max(most, static_cast<std::size_t>(acts_[k].size()));
    for (auto& b : grad_buf_)
      if (b.size() < most) b.resize(most);
    // The first layer writes dx itself, unless it also reads dy and the two share memory.
    const bool dx_direct = dx != nullptr && !(L == 1 && detail::overlap(*dx, dy));
    for (std::size_t k = L; k-- > 0;) {
      const Mat& in = acts_[k];
      const ConstRef<Scalar> d_out =
          k + 1 == L
              ? dy
              : ConstRef<Scalar>(ConstMatrixMap<Scalar>(grad_buf_[(k + 1) % 2].data(), in.rows(), acts_[k + 1].cols()));
      const bool need_dx = k > 0 || dx != nullptr;
      MutRef<Scalar> d_in =
          k == 0 && dx_direct ? *dx : MutRef<Scalar>(MatrixMap<Scalar>(grad_buf_[k % 2].data(), in.rows(), in.cols()));
      std::visit(
          [&](auto& layer) {
            using L_ = std::decay_t<decltype(layer)>;
            if constexpr (std::is_same_v<L_, LoRALinear<Scalar>>) {
              if (need_dx)
                layer.backward_with_output(in, acts_[k + 1], d_out, d_in);
              else
                layer.backward_with_output(in, acts_[k + 1], d_out);
            } else if (need_dx) {
              L_::template backward<Scalar>(in, d_out, d_in);
            }
          },
          layers_[k]);
    }
    if (dx != nullptr && !dx_direct) *dx = ConstMatrixMap<Scalar>(grad_buf_[0].data(), dx->rows(), dx->cols());
  }

  std::vector<Layer> layers_;
  std::vector<std::string> names_;  // per layer: the name given to add(name, layer), or empty
  Index last_linear_ = -1;
  bool training_ = true;
  Index forward_rows_ = -1;
  std::vector<Mat> acts_;            // acts_[i]: input of layer i; acts_.back(): the output
  std::vector<Scalar> grad_buf_[2];  // backward's two gradient buffers (see backward_impl)
};

}  // namespace lora
