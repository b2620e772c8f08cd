// Reproducible random numbers: xoshiro256++ seeded through splitmix64.
// The standard library's distributions differ between implementations, so
// the same seed would give different weights under libstdc++ and libc++;
// these are written out so a seed means the same numbers everywhere.
#pragma once

#ifndef LORA_INSIDE_LIBRARY
#error "lora/detail/random.hpp is internal; include <lora/lora.hpp>"
#endif

#include <array>
#include <cassert>
#include <cmath>
#include <cstdint>

namespace lora::detail {

inline std::uint64_t splitmix64(std::uint64_t& state) {
  std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

class Rng {
 public:
  explicit Rng(std::uint64_t seed = 0) { reseed(seed); }

  void reseed(std::uint64_t seed) {
    std::uint64_t sm = seed;
    for (auto& word : s_) word = splitmix64(sm);
  }

  /// The four state words: set_state(state()) continues the sequence exactly (checkpoints).
  std::array<std::uint64_t, 4> state() const { return {s_[0], s_[1], s_[2], s_[3]}; }
  /// `state` must not be all zero, xoshiro's fixed point (callers check what they read from files).
  void set_state(const std::array<std::uint64_t, 4>& state) {
    assert((state[0] | state[1] | state[2] | state[3]) != 0);
    for (int i = 0; i < 4; ++i) s_[i] = state[static_cast<std::size_t>(i)];
  }

  std::uint64_t next() {
    const std::uint64_t result = rotl(s_[0] + s_[3], 23) + s_[0];
    const std::uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = rotl(s_[3], 45);
    return result;
  }

  /// Uniform in [0, 1) with 53 random bits.
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }

  /// Uniform in [lo, hi).
  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }

  /// Standard normal by Box-Muller (one value per call; the pair's twin is dropped
  /// so that the sequence does not depend on call history).
  double normal() {
    const double u1 = 1.0 - uniform();  // (0, 1]: log is finite
    const double u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586476925 * u2);
  }

 private:
  static std::uint64_t rotl(std::uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  std::uint64_t s_[4];
};

}  // namespace lora::detail
