// The training step most noalloc tests count: include after noalloc.hpp (which comes first, before Eigen).
#pragma once

#include "noalloc.hpp"

#include <lora/loss.hpp>
#include <lora/optim.hpp>
#include <lora/types.hpp>

#include <utility>

namespace noalloc {

// One layer's training step on an MSE loss (forward, the loss, backward with dx, AdamW's step, zero_grad) on x and
// target: what `times` steps allocate after the first (which sizes every workspace).
template <class Layer>
std::pair<int, long> mse_step_allocations(Layer& layer, const lora::Matrix<float>& x, const lora::Matrix<float>& target,
                                          int times) {
  lora::Matrix<float> y(x.rows(), target.cols()), dy(x.rows(), target.cols()), dx(x.rows(), x.cols());
  lora::AdamW<float> opt(layer.parameters());
  auto step = [&] {
    layer.forward(x, y);
    lora::mse_loss<float>(y, target, dy);
    layer.backward(x, dy, dx);
    opt.step();
    opt.zero_grad();
  };
  return allocations_after_first(step, times);
}

}  // namespace noalloc
