// Learning-rate schedules with the semantics of Hugging Face's
// get_linear_schedule_with_warmup / get_cosine_schedule_with_warmup: each
// returns the multiplier of the base learning rate at a step (the number of
// scheduler steps taken so far, 0 before the first optimizer step):
//
//   for (long step = 0; step < total; ++step) {
//     opt.set_lr(base_lr * lora::linear_schedule_with_warmup(step, warmup, total));
//     ... forward, backward, opt.step() ...
//   }
#pragma once

#include <lora/errors.hpp>

#include <algorithm>
#include <cmath>
#include <string>

namespace lora {

namespace detail {
inline void check_schedule(const char* name, long step, long warmup_steps, long total_steps) {
  if (step < 0)
    throw config_error(std::string(name) +
                       ": step counts scheduler steps taken and must be >= 0, got step=" + std::to_string(step));
  if (warmup_steps < 0 || total_steps < 0)
    throw config_error(std::string(name) + ": warmup_steps and total_steps must be >= 0, got warmup_steps=" +
                       std::to_string(warmup_steps) + ", total_steps=" + std::to_string(total_steps));
}
}  // namespace detail

/// step < warmup: step / warmup; after: linear decay to 0 at total_steps.
inline double linear_schedule_with_warmup(long step, long warmup_steps, long total_steps) {
  detail::check_schedule("linear_schedule_with_warmup", step, warmup_steps, total_steps);
  if (step < warmup_steps) return static_cast<double>(step) / static_cast<double>(std::max(1L, warmup_steps));
  return std::max(
      0.0, static_cast<double>(total_steps - step) / static_cast<double>(std::max(1L, total_steps - warmup_steps)));
}

/// step < warmup: step / warmup; after: 0.5 (1 + cos(pi · num_cycles · 2 · progress)),
/// progress from 0 to 1 over the remaining steps (num_cycles 0.5: one half cosine down to 0).
inline double cosine_schedule_with_warmup(long step, long warmup_steps, long total_steps, double num_cycles = 0.5) {
  detail::check_schedule("cosine_schedule_with_warmup", step, warmup_steps, total_steps);
  if (step < warmup_steps) return static_cast<double>(step) / static_cast<double>(std::max(1L, warmup_steps));
  const double progress =
      static_cast<double>(step - warmup_steps) / static_cast<double>(std::max(1L, total_steps - warmup_steps));
  return std::max(0.0, 0.5 * (1.0 + std::cos(3.14159265358979323846 * num_cycles * 2.0 * progress)));
}

}  // namespace lora
