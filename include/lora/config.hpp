// LoraConfig: the per-layer configuration, with PEFT's names and defaults.
#pragma once

#include <lora/errors.hpp>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

namespace lora {

namespace detail {
struct SeedSequence {
  std::atomic<std::uint64_t> base{0};
  std::atomic<std::uint64_t> next{0};
};
inline SeedSequence& seed_sequence() {
  static SeedSequence sequence;
  return sequence;
}
}  // namespace detail

/// Restarts the process-wide sequence that layers built without a seed draw
/// theirs from (as torch.manual_seed does for PyTorch's layers): after
/// manual_seed(s), the k-th such layer gets the same seed in every run.
inline void manual_seed(std::uint64_t seed) {
  detail::seed_sequence().base = seed;
  detail::seed_sequence().next = 0;
}

/// The next seed of that sequence (splitmix64 of base and a counter): what a
/// layer or adapter whose LoraConfig::seed is unset is initialised from.
/// Layers built on several threads at once get distinct seeds in an order
/// that depends on timing.
inline std::uint64_t next_seed() {
  auto& s = detail::seed_sequence();
  std::uint64_t z = s.base.load() + 0x9e3779b97f4a7c15ull * (s.next.fetch_add(1) + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

/// How A and B start (PEFT's `init_lora_weights`). B is zero in the first two,
/// so a fresh adapter leaves the base output exactly as it was.
enum class InitLoraWeights {
  /// PEFT/loralib default (`init_lora_weights=True`): A by kaiming_uniform_(a=sqrt(5)),
  /// that is U(-1/sqrt(I), 1/sqrt(I)); B = 0.
  kaiming_uniform,
  /// `init_lora_weights="gaussian"`: A ~ Normal(0, 1/r); B = 0.
  gaussian,
  /// `init_lora_weights=False`: A and B both as nn.Linear initialises them
  /// (U(-1/sqrt(I), 1/sqrt(I)) and U(-1/sqrt(R), 1/sqrt(R))). Not a no-op: for debugging.
  random,
};

/// Which biases train (loralib's `mark_only_lora_as_trainable(bias=...)`, PEFT's `bias`).
enum class BiasMode {
  none,       ///< no bias trains
  all,        ///< every layer's bias trains, adapted (r > 0) or not
  lora_only,  ///< only the biases of adapted layers (r > 0) train
};

struct LoraConfig {
  int r = 8;                ///< rank; 0 means a plain frozen linear layer
  double lora_alpha = 8;    ///< scaling numerator
  double lora_dropout = 0;  ///< dropout on the LoRA path's input, in [0, 1)
  bool use_rslora = false;  ///< scaling = alpha / sqrt(r) instead of alpha / r
  InitLoraWeights init_lora_weights = InitLoraWeights::kaiming_uniform;
  BiasMode bias = BiasMode::none;
  /// Seeds initialisation (W when the layer owns a new one, A, B) and the
  /// dropout masks. Unset, the default: the layer takes lora::next_seed(), so
  /// layers built from one config start different, and a program that builds
  /// them in the same order gets the same numbers on every run
  /// (lora::manual_seed restarts the sequence). Set it to pin one layer's
  /// numbers whatever else the program builds; the layer's config() shows the
  /// seed it used either way.
  std::optional<std::uint64_t> seed;
  /// DoRA (Liu et al. 2024; PEFT's use_dora): a trainable magnitude m (O) rescales each output of the adapted
  /// weight, y = b + (m / ‖W + s·B A‖) ⊙ (x Wᵀ + s·x Aᵀ Bᵀ). LoRALinear only; the other layers refuse it.
  bool use_dora = false;

  /// This config with `seed` set: its own, or the next of the sequence.
  LoraConfig with_seed() const {
    LoraConfig c = *this;
    if (!c.seed) c.seed = next_seed();
    return c;
  }

  /// s = alpha / r, or alpha / sqrt(r) with rsLoRA; 0 when r = 0.
  double scaling() const {
    if (r == 0) return 0.0;
    return use_rslora ? lora_alpha / std::sqrt(static_cast<double>(r)) : lora_alpha / r;
  }

  /// Throws config_error naming the first value out of range.
  void validate() const {
    auto fail = [](const std::string& what, double got) {
      throw config_error("LoraConfig: " + what + ", got " + value_string(got));
    };
    if (r < 0) fail("r must be >= 0", r);
    if (!std::isfinite(lora_alpha)) fail("lora_alpha must be finite", lora_alpha);
    if (!(lora_dropout >= 0.0 && lora_dropout < 1.0)) fail("lora_dropout must be in [0, 1)", lora_dropout);
  }
};

}  // namespace lora
