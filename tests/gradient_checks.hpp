// The gradients of two layers that ran the same steps on different paths (the own GEMM on and off, say),
// compared parameter by parameter.
#pragma once

#include <catch2/catch.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cstddef>

namespace lora_test {

/// a's and b's parameters() have the same names in the same order, and every gradient of a is b's to within
/// rel_tol of b's largest magnitude (or of 1, when that is smaller). Float layers.
template <class LayerA, class LayerB>
void check_same_gradients(LayerA& a, LayerB& b, float rel_tol) {
  const auto ga = a.parameters(), gb = b.parameters();
  REQUIRE(ga.size() == gb.size());
  for (std::size_t i = 0; i < ga.size(); ++i) {
    INFO(ga[i].name);
    CHECK(ga[i].name == gb[i].name);
    REQUIRE(ga[i].rows * ga[i].cols == gb[i].rows * gb[i].cols);
    const Eigen::Map<const Eigen::VectorXf> x(ga[i].grad, ga[i].rows * ga[i].cols),
        y(gb[i].grad, gb[i].rows * gb[i].cols);
    CHECK((x - y).cwiseAbs().maxCoeff() <= rel_tol * std::max(1.0f, y.cwiseAbs().maxCoeff()));
  }
}

}  // namespace lora_test
