// The tests that run one layer from several threads at once: a const LoRALinear's eval forward, a
// MultiLoRALinear hot-swapped or trained while others read it. .ci/run builds this file and
// unit-data-parallel.cpp (its thread ranks) under ThreadSanitizer, and nothing else of the unit tests: every
// [threads] test lives in one of the two (check_thread_tests.cmake fails otherwise).
#include <catch2/catch.hpp>
#include <lora/lora.hpp>

#include <atomic>
#include <chrono>
#include <random>
#include <thread>
#include <utility>
#include <vector>

// Everything below is in a namespace of its own, so the test files can be compiled together (CMake's
// UNITY_BUILD, tests/CMakeLists.txt) without their helpers clashing.
namespace unit_threads {

using lora::Index;
template <class S>
using Mat = lora::Matrix<S>;
template <class S>
using Multi = lora::MultiLoRALinear<S>;

namespace {

lora::LoraConfig cfg(int r, double alpha) {
  lora::LoraConfig c;
  c.r = r;
  c.lora_alpha = alpha;
  c.seed = 7;
  return c;
}

template <class S>
Mat<S> random_matrix(Index rows, Index cols, unsigned seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  Mat<S> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<S>(u(gen));
  return m;
}

template <class S>
lora::RowVector<S> random_row(Index n, unsigned seed) {
  return random_matrix<S>(1, n, seed).row(0);
}

template <class S>
bool same_bits(const Eigen::MatrixBase<S>& a, const Eigen::MatrixBase<S>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() && (a.array() == b.array()).all();
}

// A layer with nonzero B, so the LoRA path changes the output.
template <class S>
lora::LoRALinear<S> adapted_layer(Index in, Index out, int r, double alpha, double dropout) {
  auto c = cfg(r, alpha);
  c.lora_dropout = dropout;
  lora::LoRALinear<S> layer(in, out, c);
  layer.lora_B() = random_matrix<S>(out, r, 11);
  return layer;
}

}  // namespace

TEST_CASE("eval forward of a const layer is safe from several threads", "[linear][threads]") {
  auto layer = adapted_layer<float>(96, 80, 8, 16, 0.1);
  layer.eval();
  const lora::LoRALinear<float>& shared = layer;
  std::vector<Mat<float>> inputs, expected;
  for (unsigned t = 0; t < 4; ++t) {
    inputs.push_back(random_matrix<float>(16 + t, 96, 100 + t));
    expected.push_back(shared.forward(inputs.back()));
  }
  std::vector<int> mismatches(4, 0);
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      Mat<float> y(inputs[t].rows(), 80);
      for (int rep = 0; rep < 50; ++rep) {
        shared.forward(inputs[t], y);
        if (y != expected[t]) ++mismatches[t];
      }
    });
  for (auto& th : threads) th.join();
  CHECK(mismatches == std::vector<int>(4, 0));
}

TEST_CASE("multi: hot swap never shows a reader a half-written adapter", "[multi][threads]") {
  using S = float;
  const Index I = 64, O = 48, N = 8;
  Multi<S> layer(random_matrix<S>(O, I, 1), random_row<S>(O, 2));
  const Mat<S> A1 = random_matrix<S>(4, I, 3), B1 = random_matrix<S>(O, 4, 4);
  const Mat<S> A2 = random_matrix<S>(4, I, 5), B2 = random_matrix<S>(O, 4, 6);
  layer.add_adapter("live", cfg(4, 8), A1, B1);
  layer.set_adapter("live");
  const Mat<S> x = random_matrix<S>(N, I, 7);
  // Both versions' outputs, from the same code path, before any thread starts.
  const Mat<S> y1 = layer.forward(x);
  layer.replace_adapter("live", cfg(4, 8), A2, B2);
  const Mat<S> y2 = layer.forward(x);
  REQUIRE_FALSE(same_bits(y1, y2));
  std::vector<std::string> rows(N, "live");
  rows[0] = "__base__";
  Mat<S> ym1(N, O), ym2(N, O);
  layer.replace_adapter("live", cfg(4, 8), A1, B1);
  layer.forward(x, rows, ym1);
  layer.replace_adapter("live", cfg(4, 8), A2, B2);
  layer.forward(x, rows, ym2);

  std::atomic<bool> done{false};
  std::atomic<long> seen1{0}, seen2{0}, torn{0}, errors{0};
  auto reader = [&](bool mixed) {
    Mat<S> y(N, O);
    while (!done.load()) {
      try {
        if (mixed)
          layer.forward(x, rows, y);
        else
          layer.forward(x, y);
      } catch (...) {
        ++errors;
        continue;
      }
      const Mat<S>& r1 = mixed ? ym1 : y1;
      const Mat<S>& r2 = mixed ? ym2 : y2;
      if (same_bits(y, r1))
        ++seen1;
      else if (same_bits(y, r2))
        ++seen2;
      else
        ++torn;
    }
  };
  std::vector<std::thread> readers;
  for (int t = 0; t < 3; ++t) readers.emplace_back(reader, t == 2);
  // The writer swaps the adapter back and forth and adds / removes another one meanwhile.
  for (int i = 0; i < 400; ++i) {
    if (i % 2 == 0)
      layer.replace_adapter("live", cfg(4, 8), A1, B1);
    else
      layer.replace_adapter("live", cfg(4, 8), A2, B2);
    if (i % 10 == 0) layer.add_adapter("other" + std::to_string(i), cfg(2, 2));
    if (i % 10 == 5) layer.remove_adapter("other" + std::to_string(i - 5));
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  done = true;
  for (auto& t : readers) t.join();
  INFO("seen old " << seen1 << ", seen new " << seen2);
  CHECK(torn == 0);
  CHECK(errors == 0);
  CHECK(seen1 > 0);
  CHECK(seen2 > 0);
}

// The non-const forward(x, y) reads the training state; before it took a lock, a forward on one thread raced
// with train_adapter / eval / finish_training on another (ThreadSanitizer in .ci/run shows it; without it the
// reader could run a trainer that finish_training had just freed).
TEST_CASE("multi: non-const forward while another thread trains, publishes and finishes", "[multi][threads]") {
  using S = float;
  const Index I = 32, O = 24, N = 6;
  Multi<S> layer(random_matrix<S>(O, I, 11), random_row<S>(O, 12));
  layer.add_adapter("live", cfg(4, 8), random_matrix<S>(4, I, 13), random_matrix<S>(O, 4, 14));
  layer.set_adapter("live");
  const Mat<S> x = random_matrix<S>(N, I, 15);
  const Mat<S> expected = std::as_const(layer).forward(x);  // no optimizer step runs: A and B never change
  std::atomic<bool> done{false};
  std::atomic<long> calls{0}, wrong{0}, errors{0};
  auto reader = [&] {
    Mat<S> y(N, O);
    while (!done.load()) {
      try {
        layer.forward(x, y);  // non-const: the training forward while "live" trains, the eval one otherwise
      } catch (...) {
        ++errors;
        continue;
      }
      ++calls;
      if ((y - expected).cwiseAbs().maxCoeff() > 1e-5f * (1 + expected.cwiseAbs().maxCoeff())) ++wrong;
    }
  };
  std::vector<std::thread> readers;
  for (int t = 0; t < 2; ++t) readers.emplace_back(reader);
  for (int i = 0; i < 200; ++i) {
    layer.train_adapter("live");
    std::this_thread::sleep_for(std::chrono::microseconds(100));
    if (i % 2 == 0) layer.eval();
    std::this_thread::sleep_for(std::chrono::microseconds(100));
    layer.finish_training();
    CHECK_FALSE(layer.is_training());
  }
  done = true;
  for (auto& t : readers) t.join();
  INFO(calls << " forwards");
  CHECK(calls > 0);
  CHECK(wrong == 0);
  CHECK(errors == 0);
  CHECK(same_bits(std::as_const(layer).forward(x), expected));
}

}  // namespace unit_threads
