// Losses (mse_loss, cross_entropy) and activations (GELU, ReLU): hand-computed
// cases, PyTorch golden values, finite-difference gradients and bad input.
#include <catch2/catch.hpp>
#include <lora/lora.hpp>

#include <cmath>
#include <initializer_list>
#include <limits>
#include <vector>

#include "golden.hpp"

// Everything below is in a namespace of its own, so the test files can be compiled together (CMake's
// UNITY_BUILD, tests/CMakeLists.txt) without their helpers clashing.
namespace unit_loss {

using Catch::Contains;
using lora::Index;
using lora_test::max_rel_diff;
using lora_test::rel_diff;
using lora_test::tensor;
using lora_test::tolerance;
template <class S>
using Mat = lora::Matrix<S>;

namespace {

// A (rows, cols) matrix from row-major values.
template <class S>
Mat<S> matrix_of(Index rows, Index cols, std::initializer_list<double> values) {
  REQUIRE(static_cast<Index>(values.size()) == rows * cols);
  Mat<S> m(rows, cols);
  Index k = 0;
  for (double v : values) m.data()[k++] = static_cast<S>(v);
  return m;
}

// Golden labels are stored as doubles.
std::vector<int> labels_from(const Mat<double>& m) {
  std::vector<int> out;
  for (Index i = 0; i < m.size(); ++i) out.push_back(static_cast<int>(std::lround(m.data()[i])));
  return out;
}

// Deterministic, platform-independent test data.
Mat<double> smooth_matrix(Index rows, Index cols, double seed, double scale) {
  Mat<double> m(rows, cols);
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j)
      m(i, j) = scale * std::sin(1.3 * static_cast<double>(i) + 0.7 * static_cast<double>(j) + seed);
  return m;
}

}  // namespace

// ---- mse_loss ------------------------------------------------------------------------

TEMPLATE_TEST_CASE("mse_loss: hand-computed 2x2 value and dpred", "[loss][mse]", float, double) {
  using S = TestType;
  // pred - target = [[1, 0], [-2, 3]]: L = (1 + 0 + 4 + 9) / 4 = 3.5,
  // dpred = 2 (pred - target) / 4 = [[0.5, 0], [-1, 1.5]]. All exact in binary.
  const auto pred = matrix_of<S>(2, 2, {1, 2, 3, 4});
  const auto target = matrix_of<S>(2, 2, {0, 2, 5, 1});
  Mat<S> dpred = Mat<S>::Constant(2, 2, S(7));  // overwritten, not added to
  CHECK(lora::mse_loss<S>(pred, target, dpred) == S(3.5));
  CHECK(dpred == matrix_of<S>(2, 2, {0.5, 0, -1, 1.5}));
  CHECK(lora::mse_loss<S>(pred, target) == S(3.5));
}

TEST_CASE("mse_loss: a shape mismatch throws shape_error naming both shapes", "[loss][mse][errors]") {
  const Mat<double> pred = Mat<double>::Zero(2, 3), wrong = Mat<double>::Zero(3, 2);
  Mat<double> dpred(2, 3), dpred_wrong(2, 2);
  REQUIRE_THROWS_AS(lora::mse_loss<double>(pred, wrong, dpred), lora::shape_error);
  REQUIRE_THROWS_WITH(lora::mse_loss<double>(pred, wrong, dpred), Contains("(2, 3)") && Contains("(3, 2)"));
  REQUIRE_THROWS_WITH(lora::mse_loss<double>(pred, wrong), Contains("(2, 3)") && Contains("(3, 2)"));
  REQUIRE_THROWS_AS(lora::mse_loss<double>(pred, pred, dpred_wrong), lora::shape_error);
  REQUIRE_THROWS_WITH(lora::mse_loss<double>(pred, pred, dpred_wrong),
                      Contains("dpred") && Contains("(2, 3)") && Contains("(2, 2)"));
  const Mat<double> empty(0, 3);
  Mat<double> dempty(0, 3);
  REQUIRE_THROWS_AS(lora::mse_loss<double>(empty, empty, dempty), lora::shape_error);  // mean of nothing
}

// ---- cross_entropy ---------------------------------------------------------------------

TEMPLATE_TEST_CASE("cross_entropy: extreme logits stay finite and match PyTorch", "[loss][ce][golden]", float, double) {
  using S = TestType;
  // Rows: (1000, -1000, 0), (-800, -805, -790), (3, 3, 3): exp() of any of them overflows or underflows.
  const auto logits = tensor<S>("ce.logits");
  const auto labels = labels_from(tensor("ce.labels"));
  Mat<S> dlogits(logits.rows(), logits.cols());
  const S loss = lora::cross_entropy<S>(logits, labels, dlogits);
  REQUIRE(std::isfinite(loss));
  REQUIRE(dlogits.allFinite());
  CHECK(rel_diff(loss, tensor("ce.loss")(0, 0)) < tolerance<S>);
  CHECK(max_rel_diff(dlogits, tensor("ce.dlogits")) < tolerance<S>);
  CHECK(rel_diff(lora::cross_entropy<S>(logits, labels), tensor("ce.loss")(0, 0)) < tolerance<S>);
}

TEMPLATE_TEST_CASE("cross_entropy: the two-layer model's loss matches PyTorch, label -100 ignored",
                   "[loss][ce][golden]", float, double) {
  using S = TestType;
  const auto logits = tensor<S>("mlp.logits");
  const auto labels = labels_from(tensor("mlp.labels"));
  REQUIRE(labels.size() == 6);
  REQUIRE(labels[3] == lora::ignore_index);
  Mat<S> dlogits = Mat<S>::Constant(logits.rows(), logits.cols(), S(7));
  const S loss = lora::cross_entropy<S>(logits, labels, dlogits);
  CHECK(rel_diff(loss, tensor("mlp.loss")(0, 0)) < tolerance<S>);
  CHECK((dlogits.row(3).array() == 0).all());  // the ignored row gets no gradient
  // softmax - onehot sums to zero over each row that counts
  for (Index i = 0; i < dlogits.rows(); ++i) CHECK(std::abs(dlogits.row(i).sum()) < tolerance<S>);
}

TEMPLATE_TEST_CASE("cross_entropy: hand-computed two-class cases", "[loss][ce]", float, double) {
  using S = TestType;
  const double tol = sizeof(S) == 4 ? 1e-6 : 1e-15;
  SECTION("equal logits: ln 2 per row, gradient (0.5 - onehot) / count; ignored rows do not count") {
    // Rows 0 and 1 count (N = 2): softmax = (0.5, 0.5), loss ln 2,
    // dlogits = ([0.5, 0.5] - onehot) / 2. Row 2 is ignored: zero gradient, not in the mean.
    const auto logits = matrix_of<S>(3, 2, {0, 0, 0, 0, 5, -5});
    const std::vector<int> labels{0, 1, lora::ignore_index};
    Mat<S> dlogits = Mat<S>::Constant(3, 2, S(7));
    const S loss = lora::cross_entropy<S>(logits, labels, dlogits);
    CHECK(std::abs(loss - std::log(2.0)) < tol);
    const auto expected = matrix_of<double>(3, 2, {-0.25, 0.25, 0.25, -0.25, 0, 0});
    CHECK(max_rel_diff(dlogits, expected) < tol);
  }
  SECTION("logits (ln 3, 0), label 1: softmax (3/4, 1/4), loss ln 4") {
    const auto logits = matrix_of<S>(1, 2, {std::log(3.0), 0});
    Mat<S> dlogits(1, 2);
    const S loss = lora::cross_entropy<S>(logits, {1}, dlogits);
    CHECK(std::abs(loss - std::log(4.0)) < tol);
    CHECK(max_rel_diff(dlogits, matrix_of<double>(1, 2, {0.75, -0.75})) < tol);
  }
  SECTION("every label ignored: loss 0 and zero gradients (PyTorch gives NaN)") {
    const auto logits = matrix_of<S>(2, 2, {1, 2, 3, 4});
    Mat<S> dlogits = Mat<S>::Constant(2, 2, S(7));
    CHECK(lora::cross_entropy<S>(logits, {lora::ignore_index, lora::ignore_index}, dlogits) == S(0));
    CHECK((dlogits.array() == 0).all());
  }
}

TEST_CASE("cross_entropy: bad labels or shapes throw shape_error naming what was wrong", "[loss][ce][errors]") {
  const auto logits = matrix_of<double>(2, 3, {1, 2, 3, 4, 5, 6});
  Mat<double> dlogits(2, 3);
  SECTION("label out of range: names the row and the value") {
    REQUIRE_THROWS_AS(lora::cross_entropy<double>(logits, {0, 3}, dlogits), lora::shape_error);
    REQUIRE_THROWS_WITH(lora::cross_entropy<double>(logits, {0, 3}, dlogits), Contains("row 1") && Contains("got 3"));
    REQUIRE_THROWS_WITH(lora::cross_entropy<double>(logits, {-1, 0}, dlogits), Contains("row 0") && Contains("got -1"));
    REQUIRE_THROWS_WITH(lora::cross_entropy<double>(logits, {0, 7}), Contains("row 1") && Contains("got 7"));
  }
  SECTION("labels size mismatch") {
    REQUIRE_THROWS_AS(lora::cross_entropy<double>(logits, {0, 1, 2}, dlogits), lora::shape_error);
    REQUIRE_THROWS_WITH(lora::cross_entropy<double>(logits, {0, 1, 2}, dlogits),
                        Contains("expected 2") && Contains("got 3"));
    REQUIRE_THROWS_AS(lora::cross_entropy<double>(logits, {0}), lora::shape_error);
  }
  SECTION("dlogits of the wrong shape, or overlapping logits") {
    Mat<double> wrong(3, 2);
    REQUIRE_THROWS_WITH(lora::cross_entropy<double>(logits, {0, 1}, wrong),
                        Contains("dlogits") && Contains("(2, 3)") && Contains("(3, 2)"));
    Mat<double> z = logits;
    REQUIRE_THROWS_AS(lora::cross_entropy<double>(z, {0, 1}, z), lora::shape_error);
    CHECK(z == logits);  // refused before writing
  }
}

// ---- activations -------------------------------------------------------------------------

TEMPLATE_TEST_CASE("GELU (tanh) forward and derivative match PyTorch", "[activations][golden]", float, double) {
  using S = TestType;
  const auto x = tensor<S>("gelu.x");  // linspace(-6, 6, 25)
  Mat<S> y(x.rows(), x.cols()), dx(x.rows(), x.cols());
  lora::GELU::forward<S>(x, y);
  CHECK(max_rel_diff(y, tensor("gelu.y")) < tolerance<S>);
  // golden dx is d(sum y)/dx, i.e. backward with dy = 1
  lora::GELU::backward<S>(x, Mat<S>::Ones(x.rows(), x.cols()), dx);
  CHECK(max_rel_diff(dx, tensor("gelu.dx")) < tolerance<S>);
  // dy scales the derivative elementwise
  lora::GELU::backward<S>(x, Mat<S>::Constant(x.rows(), x.cols(), S(-2)), dx);
  CHECK(max_rel_diff(dx, -2.0 * tensor("gelu.dx")) < tolerance<S>);
}

TEMPLATE_TEST_CASE("ReLU: hand-computed forward and backward", "[activations]", float, double) {
  using S = TestType;
  const auto x = matrix_of<S>(2, 2, {-1, 0, 2, -0.5});
  Mat<S> y(2, 2), dx(2, 2);
  lora::ReLU::forward<S>(x, y);
  CHECK(y == matrix_of<S>(2, 2, {0, 0, 2, 0}));
  // gradient only where x > 0 (torch also gives 0 at x = 0)
  lora::ReLU::backward<S>(x, matrix_of<S>(2, 2, {5, 6, 7, 8}), dx);
  CHECK(dx == matrix_of<S>(2, 2, {0, 0, 7, 0}));
}

TEST_CASE("activation forward and backward with mismatched shapes throw shape_error", "[activations][errors]") {
  const Mat<double> x = Mat<double>::Zero(2, 3), dy_wrong = Mat<double>::Zero(3, 2);
  Mat<double> y_wrong(2, 2), dx(2, 3), dx_wrong(1, 3);
  REQUIRE_THROWS_AS(lora::GELU::backward<double>(x, dy_wrong, dx), lora::shape_error);
  REQUIRE_THROWS_WITH(lora::GELU::backward<double>(x, dy_wrong, dx),
                      Contains("dy") && Contains("(2, 3)") && Contains("(3, 2)"));
  REQUIRE_THROWS_WITH(lora::GELU::backward<double>(x, x, dx_wrong), Contains("dx") && Contains("(1, 3)"));
  REQUIRE_THROWS_AS(lora::GELU::forward<double>(x, y_wrong), lora::shape_error);
  REQUIRE_THROWS_AS(lora::ReLU::backward<double>(x, dy_wrong, dx), lora::shape_error);
  REQUIRE_THROWS_AS(lora::ReLU::backward<double>(x, x, dx_wrong), lora::shape_error);
  REQUIRE_THROWS_AS(lora::ReLU::forward<double>(x, y_wrong), lora::shape_error);
}

// ---- finite differences ---------------------------------------------------------------------

TEST_CASE("mse_loss and cross_entropy gradients match finite differences", "[loss][gradcheck]") {
  SECTION("mse_loss") {
    Mat<double> pred = smooth_matrix(3, 4, 0.2, 1.5);
    const Mat<double> target = smooth_matrix(3, 4, 1.9, 1.0);
    Mat<double> dpred(3, 4);
    lora::mse_loss<double>(pred, target, dpred);
    auto loss = [&] { return lora::mse_loss<double>(pred, target); };
    const auto r = lora::check_gradient(loss, pred.data(), dpred.data(), pred.size());
    INFO(r.describe("dpred"));
    CHECK(r.ok());
    CHECK(r.checked == 12);
  }
  SECTION("cross_entropy, with an ignored row and a large logit") {
    Mat<double> logits = smooth_matrix(4, 5, 0.4, 3.0);
    logits(2, 1) = 40;  // a dominant class: softmax near one-hot, still finite differences
    const std::vector<int> labels{2, lora::ignore_index, 1, 4};
    Mat<double> dlogits(4, 5);
    lora::cross_entropy<double>(logits, labels, dlogits);
    auto loss = [&] { return lora::cross_entropy<double>(logits, labels); };
    const auto r = lora::check_gradient(loss, logits.data(), dlogits.data(), logits.size());
    INFO(r.describe("dlogits"));
    CHECK(r.ok());
    CHECK(r.checked == 20);
  }
}

}  // namespace unit_loss
