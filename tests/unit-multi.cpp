// MultiLoRALinear: several named adapters over one frozen base. Hand-computed
// cases, mixed batches against per-row runs, training one adapter only,
// weighted combinations, PEFT files and bad input (hot swap under threads: unit-threads.cpp).
#include "test_files.hpp"

#include <catch2/catch.hpp>
#include <lora/lora.hpp>

#include <cmath>
#include <cstdlib>
#include <random>
#include <utility>
#include <vector>

// Everything below is in a namespace of its own, so the test files can be compiled together (CMake's
// UNITY_BUILD, tests/CMakeLists.txt) without their helpers clashing.
namespace unit_multi {

using Catch::Contains;
using lora::Index;
template <class S>
using Mat = lora::Matrix<S>;
template <class S>
using Multi = lora::MultiLoRALinear<S>;

namespace {

lora::LoraConfig cfg(int r, double alpha, bool rslora = false, std::uint64_t seed = 7) {
  lora::LoraConfig c;
  c.r = r;
  c.lora_alpha = alpha;
  c.use_rslora = rslora;
  c.seed = seed;
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

// Everything a failed call must leave as it was.
template <class S>
struct Snapshot {
  std::vector<std::string> names, active;
  std::vector<double> scales;
  bool enabled;
  Mat<S> y;
  Snapshot(const Multi<S>& layer, const Mat<S>& x)
      : names(layer.adapter_names()),
        active(layer.active_adapters()),
        enabled(layer.adapters_enabled()),
        y(layer.forward(x)) {
    for (const auto& n : names) scales.push_back(layer.scale(n));
  }
  void require_same(const Multi<S>& layer, const Mat<S>& x) const {
    Snapshot now(layer, x);
    REQUIRE(now.names == names);
    REQUIRE(now.active == active);
    REQUIRE(now.scales == scales);
    REQUIRE(now.enabled == enabled);
    REQUIRE(same_bits(now.y, y));
  }
};

}  // namespace

TEMPLATE_TEST_CASE("multi: hand-computed two adapters, summed, scaled, disabled", "[multi]", float, double) {
  using S = TestType;
  // W = [[1, 2], [3, 4]], b = [0.5, -0.5], x = [1, 1].
  Mat<S> W(2, 2);
  W << 1, 2, 3, 4;
  lora::RowVector<S> b(2);
  b << S(0.5), S(-0.5);
  Multi<S> layer(W, b);
  // a: r = 1, alpha = 2 -> s = 2; A = [1, 0], B = [1, 1]ᵀ.  c: r = 1, alpha = 1 -> s = 1; A = [0, 1], B = [0, 2]ᵀ.
  Mat<S> Aa(1, 2), Ba(2, 1), Ac(1, 2), Bc(2, 1);
  Aa << 1, 0;
  Ba << 1, 1;
  Ac << 0, 1;
  Bc << 0, 2;
  layer.add_adapter("a", cfg(1, 2), Aa, Ba);
  layer.add_adapter("c", cfg(1, 1), Ac, Bc);
  Mat<S> x(1, 2);
  x << 1, 1;
  // base: x Wᵀ + b = [3, 7] + [0.5, -0.5] = [3.5, 6.5]
  Mat<S> y = layer.forward(x);
  CHECK(y(0, 0) == S(3.5));
  CHECK(y(0, 1) == S(6.5));
  layer.set_adapter("a");  // + 2 · (x·A = 1) · [1, 1] = [5.5, 8.5]
  y = layer.forward(x);
  CHECK(y(0, 0) == S(5.5));
  CHECK(y(0, 1) == S(8.5));
  layer.set_active_adapters({"a", "c"});  // + 1 · (x·A = 1) · [0, 2] = [5.5, 10.5]
  y = layer.forward(x);
  CHECK(y(0, 0) == S(5.5));
  CHECK(y(0, 1) == S(10.5));
  layer.set_scale("a", 0.5);  // a's s = 0.5 · 2 = 1: [4.5, 9.5]
  CHECK(layer.adapter("a")->scaling() == S(1));
  y = layer.forward(x);
  CHECK(y(0, 0) == S(4.5));
  CHECK(y(0, 1) == S(9.5));
  layer.disable_adapters();
  y = layer.forward(x);
  CHECK(y(0, 0) == S(3.5));
  CHECK(y(0, 1) == S(6.5));
  layer.enable_adapters();
  CHECK(layer.active_adapters() == std::vector<std::string>{"a", "c"});
  CHECK(layer.forward(x)(0, 1) == S(9.5));
  // Mixed batch over three copies of x: base, a, c.
  Mat<S> x3(3, 2);
  x3 << 1, 1, 1, 1, 1, 1;
  Mat<S> y3(3, 2);
  layer.forward(x3, std::vector<std::string>{"__base__", "a", "c"}, y3);
  Mat<S> expect(3, 2);
  expect << S(3.5), S(6.5), S(4.5), S(7.5), S(3.5), S(8.5);
  CHECK(same_bits(y3, expect));
  // rsLoRA: r = 4, alpha = 4 -> s = 4 / sqrt(4) = 2.
  layer.add_adapter("rs", cfg(4, 4, true), Mat<S>::Zero(4, 2), Mat<S>::Zero(2, 4));
  CHECK(layer.adapter("rs")->scaling() == S(2));
  CHECK(layer.adapter_parameter_count() == 2 * (2 + 2) + 4 * (2 + 2));
}

TEMPLATE_TEST_CASE("multi: one adapter gives LoRALinear's output bit for bit", "[multi]", float, double) {
  using S = TestType;
  const Index I = 24, O = 17, N = 9;
  Mat<S> W = random_matrix<S>(O, I, 1);
  lora::RowVector<S> b = random_row<S>(O, 2);
  lora::LoraConfig c = cfg(4, 8, false, 99);
  c.init_lora_weights = lora::InitLoraWeights::random;  // B != 0
  lora::LoRALinear<S> single(W, b, c);
  single.eval();
  Multi<S> multi(W, b);
  multi.add_adapter("x", c);
  multi.set_adapter("x");
  REQUIRE(same_bits(multi.adapter("x")->lora_A, Mat<S>(single.lora_A())));
  REQUIRE(same_bits(multi.adapter("x")->lora_B, Mat<S>(single.lora_B())));
  Mat<S> x = random_matrix<S>(N, I, 3);
  CHECK(same_bits(multi.forward(x), single.forward(x)));
  // A fresh default adapter (B = 0) leaves the base output exactly.
  multi.add_adapter("fresh", cfg(8, 16));
  multi.set_adapter("fresh");
  Mat<S> base(N, O);  // W's own product (oneDNN's sgemm for float under LORA_USE_DNNL), then the bias
  lora::FrozenWeight<S>::view(W.data(), O, I).forward(x, base);
  base.rowwise() += b;
  CHECK(same_bits(multi.forward(x), base));
}

TEMPLATE_TEST_CASE("multi: mixed batch equals running each row on its own", "[multi][mixed]", float, double) {
  using S = TestType;
  const Index I = 40, O = 33;
  Mat<S> W = random_matrix<S>(O, I, 5);
  lora::RowVector<S> b = random_row<S>(O, 6);
  Multi<S> layer(W, b);
  const std::vector<std::string> names = {"r1", "r2", "r4rs", "r8", "r3"};
  const std::vector<int> ranks = {1, 2, 4, 8, 3};
  for (std::size_t i = 0; i < names.size(); ++i)
    layer.add_adapter(names[i], cfg(ranks[i], 2.0 * ranks[i] + 1, i == 2), random_matrix<S>(ranks[i], I, 10 + i),
                      random_matrix<S>(O, ranks[i], 20 + i));
  layer.set_scale("r8", -0.75);
  layer.set_active_adapters({"r1", "r2"});  // the mixed forward must ignore the active set
  const int N = GENERATE(1, 7, 64, 129);
  std::mt19937 gen(static_cast<unsigned>(N));
  std::vector<std::string> rows(N);
  std::vector<int> ids(N);
  for (int n = 0; n < N; ++n) {
    const int k = static_cast<int>(gen() % (names.size() + 1));
    rows[n] = k == 0 ? "__base__" : names[k - 1];
    ids[n] = k == 0 ? Multi<S>::base_id : layer.adapter_id(rows[n]);
  }
  Mat<S> x = random_matrix<S>(N, I, 30);
  Mat<S> y(N, O), y_ids(N, O);
  layer.forward(x, rows, y);
  layer.forward(x, ids, y_ids);
  CHECK(same_bits(y, y_ids));
  // Reference: each row alone, computed in long double straight from the formula.
  const double tol = std::is_same_v<S, float> ? 2e-5 : 1e-13;
  for (int n = 0; n < N; ++n) {
    using L = long double;
    Eigen::Matrix<L, 1, Eigen::Dynamic> ref = x.row(n).template cast<L>() * W.transpose().template cast<L>();
    ref += b.template cast<L>();
    if (rows[n] != "__base__") {
      auto a = layer.adapter(rows[n]);
      ref += static_cast<L>(a->scaling()) * (x.row(n).template cast<L>() * a->lora_A.transpose().template cast<L>()) *
             a->lora_B.transpose().template cast<L>();
    }
    INFO("row " << n << " adapter " << rows[n]);
    CHECK((y.row(n).template cast<L>() - ref).cwiseAbs().maxCoeff() <= tol * (1 + ref.cwiseAbs().maxCoeff()));
  }
  // The same rows through single-adapter forwards, one row at a time.
  for (int n = 0; n < N; ++n) {
    Mat<S> row_y(1, O);
    if (rows[n] == "__base__")
      layer.set_active_adapters({});
    else
      layer.set_adapter(rows[n]);
    layer.forward(x.row(n), row_y);
    CHECK((row_y - y.row(n)).cwiseAbs().maxCoeff() <= tol * (1 + y.row(n).cwiseAbs().maxCoeff()));
  }
}

TEMPLATE_TEST_CASE("multi: a batch sorted by adapter and a shuffled one give the same rows", "[multi][mixed]", float,
                   double) {
  using S = TestType;
  const Index I = 16, O = 12, N = 96;
  Multi<S> layer(random_matrix<S>(O, I, 1));
  for (int i = 0; i < 4; ++i)
    layer.add_adapter("a" + std::to_string(i), cfg(2, 4), random_matrix<S>(2, I, 40 + i),
                      random_matrix<S>(O, 2, 50 + i));
  Mat<S> x = random_matrix<S>(N, I, 2);
  std::vector<int> sorted(N);
  for (int n = 0; n < N; ++n) sorted[n] = n / 24;  // contiguous groups of 24: used in place
  std::vector<int> perm(N);
  for (int n = 0; n < N; ++n) perm[n] = (n * 7) % N;  // 7 is coprime with 96: a permutation
  Mat<S> xs(N, I);
  std::vector<int> shuffled(N);
  for (int n = 0; n < N; ++n) {
    xs.row(n) = x.row(perm[n]);
    shuffled[n] = sorted[perm[n]];
  }
  Mat<S> y(N, O), ys(N, O);
  layer.forward(x, sorted, y);
  layer.forward(xs, shuffled, ys);
  for (int n = 0; n < N; ++n) CHECK((ys.row(n) - y.row(perm[n])).cwiseAbs().maxCoeff() <= S(1e-5));
}

TEMPLATE_TEST_CASE("multi: training touches the chosen adapter only", "[multi][train]", float, double) {
  using S = TestType;
  const Index I = 20, O = 14, N = 6;
  Mat<S> W = random_matrix<S>(O, I, 1);
  lora::RowVector<S> b = random_row<S>(O, 2);
  const Mat<S> W0 = W;
  Multi<S> layer(W, b);
  lora::LoraConfig ca = cfg(3, 6, false, 11), cb = cfg(5, 5, true, 12);
  ca.lora_dropout = 0.25;
  layer.add_adapter("a", ca);
  layer.add_adapter("b", cb, random_matrix<S>(5, I, 3), random_matrix<S>(O, 5, 4));
  const auto b_before = layer.adapter("b");
  const Mat<S> bA = b_before->lora_A, bB = b_before->lora_B;

  // The same training on a LoRALinear with a's config: the adapter must end bit-identical.
  lora::LoRALinear<S> ref(W, b, ca);
  layer.train_adapter("a");
  CHECK(layer.active_adapters() == std::vector<std::string>{"a"});
  lora::SGD<S> opt(layer.parameters(), {0.1});
  lora::SGD<S> opt_ref(ref.parameters(), {0.1});
  CHECK(layer.parameters()[0].name == "a.lora_A");
  Mat<S> x = random_matrix<S>(N, I, 5), target = random_matrix<S>(N, O, 6);
  Mat<S> y(N, O), y_ref(N, O), dx(N, I), dx_ref(N, I);
  for (int step = 0; step < 5; ++step) {
    layer.zero_grad();
    ref.zero_grad();
    layer.forward(x, y);
    ref.forward(x, y_ref);
    REQUIRE(same_bits(y, y_ref));
    Mat<S> dy = y - target;
    layer.backward(x, dy, dx);
    ref.backward(x, dy, dx_ref);
    REQUIRE(same_bits(dx, dx_ref));
    opt.step();
    opt_ref.step();
  }
  CHECK(same_bits(layer.dA(), ref.dA()));
  layer.eval();  // publishes
  CHECK(same_bits(layer.adapter("a")->lora_A, Mat<S>(ref.lora_A())));
  CHECK(same_bits(layer.adapter("a")->lora_B, Mat<S>(ref.lora_B())));
  CHECK_FALSE(layer.adapter("a")->lora_B.isZero());
  // b, W and the bias are untouched, bit for bit; b's published snapshot is the very same object.
  CHECK(layer.adapter("b") == b_before);
  CHECK(same_bits(layer.adapter("b")->lora_A, bA));
  CHECK(same_bits(layer.adapter("b")->lora_B, bB));
  CHECK(same_bits(Mat<S>(layer.weight()), W0));
  CHECK(same_bits(Mat<S>(layer.bias()), Mat<S>(b)));
  // Served output after training equals the trained LoRALinear's eval output.
  ref.eval();
  CHECK(same_bits(layer.forward(x), ref.forward(x)));
  // Training with a runtime scale trains at the serving scaling.
  layer.set_scale("b", 0.5);
  layer.train_adapter("b");
  Mat<S> yb(N, O);
  layer.forward(x, yb);
  layer.eval();
  CHECK((layer.forward(x) - yb).cwiseAbs().maxCoeff() <= S(1e-5));  // eval has no dropout: b has none
  layer.finish_training();
  CHECK(layer.trained_adapter().empty());
  CHECK_THROWS_WITH(layer.parameters(), Contains("no adapter is being trained"));
  CHECK_THROWS_WITH(layer.train(), Contains("call train_adapter(name)"));
}

TEMPLATE_TEST_CASE("multi: add_weighted_adapter linear, hand-computed", "[multi][combine]", float, double) {
  using S = TestType;
  Multi<S> layer(Mat<S>::Zero(2, 2));
  Mat<S> A1(1, 2), B1(2, 1), A2(1, 2), B2(2, 1);
  A1 << 1, 2;
  B1 << 1, 0;
  A2 << 0, 1;
  B2 << 0, 2;
  layer.add_adapter("one", cfg(1, 1), A1, B1);  // s = 1
  layer.add_adapter("two", cfg(1, 2), A2, B2);  // s = 2
  // w = [1, 0.5]: wᵢsᵢ = [1, 1], so A = A1 + A2 = [1, 3], B = B1 + B2 = [1, 2]ᵀ.
  layer.add_weighted_adapter({"one", "two"}, {1.0, 0.5}, "sum", lora::Combination::linear);
  auto m = layer.adapter("sum");
  CHECK(m->lora_A(0, 0) == S(1));
  CHECK(m->lora_A(0, 1) == S(3));
  CHECK(m->lora_B(0, 0) == S(1));
  CHECK(m->lora_B(1, 0) == S(2));
  CHECK(m->config.r == 1);
  CHECK(m->config.lora_alpha == 1);
  CHECK(m->scaling() == S(1));
  CHECK(layer.active_adapters().empty());  // not activated
  // w = [2, -1]: wᵢsᵢ = [2, -2]: A = √2·A1 - √2·A2 = √2·[1, 1], B = √2·B1 + √2·B2 = √2·[1, 2]ᵀ.
  layer.add_weighted_adapter({"one", "two"}, {2.0, -1.0}, "diff", lora::Combination::linear);
  m = layer.adapter("diff");
  const S r2 = static_cast<S>(std::sqrt(2.0));
  CHECK(m->lora_A(0, 0) == Approx(r2));
  CHECK(m->lora_A(0, 1) == Approx(r2));
  CHECK(m->lora_B(0, 0) == Approx(r2));
  CHECK(m->lora_B(1, 0) == Approx(2 * r2));
  // One source: B A = w s B A exactly as PEFT's formula gives.
  layer.add_weighted_adapter({"two"}, {-3.0}, "neg", lora::Combination::linear);
  m = layer.adapter("neg");
  Mat<S> expect = S(-6) * B2 * A2;
  CHECK((m->lora_B * m->lora_A - expect).cwiseAbs().maxCoeff() <= S(1e-5));
}

TEMPLATE_TEST_CASE("multi: add_weighted_adapter cat and svd against the dense sum", "[multi][combine]", float, double) {
  using S = TestType;
  const Index I = 9, O = 7;
  Multi<S> layer(random_matrix<S>(O, I, 1));
  layer.add_adapter("p", cfg(2, 3), random_matrix<S>(2, I, 2), random_matrix<S>(O, 2, 3));
  layer.add_adapter("q", cfg(3, 2, true), random_matrix<S>(3, I, 4), random_matrix<S>(O, 3, 5));
  layer.set_scale("q", 1.5);
  const std::vector<double> w = {0.8, -1.7};
  using D = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic>;
  D delta = D::Zero(O, I);
  for (std::size_t i = 0; i < 2; ++i) {
    auto a = layer.adapter(i == 0 ? "p" : "q");
    delta += w[i] * static_cast<double>(a->scaling()) *
             (a->lora_B.template cast<double>() * a->lora_A.template cast<double>());
  }
  const double tol = std::is_same_v<S, float> ? 1e-5 : 1e-12;
  const double norm = delta.cwiseAbs().maxCoeff();

  layer.add_weighted_adapter({"p", "q"}, w, "cat", lora::Combination::cat);
  auto c = layer.adapter("cat");
  CHECK(c->config.r == 5);
  CHECK(c->config.lora_alpha == 5);
  CHECK(c->scaling() == S(1));
  CHECK((c->lora_B.template cast<double>() * c->lora_A.template cast<double>() - delta).cwiseAbs().maxCoeff() <=
        tol * norm);

  // Independent truncated SVD of the dense (O, I) sum.
  Eigen::JacobiSVD<D> full(delta, Eigen::ComputeThinU | Eigen::ComputeThinV);
  for (int k : {2, 3, 5}) {
    const std::string name = "svd" + std::to_string(k);
    layer.add_weighted_adapter({"p", "q"}, w, name, lora::Combination::svd, k);
    auto s = layer.adapter(name);
    REQUIRE(s->config.r == k);
    CHECK(s->config.lora_alpha == k);
    D best = full.matrixU().leftCols(k) * full.singularValues().head(k).asDiagonal() *
             full.matrixV().leftCols(k).transpose();
    D got = s->lora_B.template cast<double>() * s->lora_A.template cast<double>();
    INFO("svd rank " << k);
    CHECK((got - best).cwiseAbs().maxCoeff() <= 10 * tol * norm);
    // PEFT's layout: B = U_k Σ_k, A = V_kᵀ with orthonormal rows.
    D AAt = s->lora_A.template cast<double>() * s->lora_A.template cast<double>().transpose();
    CHECK((AAt - D::Identity(k, k)).cwiseAbs().maxCoeff() <= 10 * tol);
  }
  // One source, truncated: svd compresses an adapter to a lower rank (PEFT would fall back to linear here).
  layer.add_weighted_adapter({"q"}, {1.0}, "q_rank1", lora::Combination::svd, 1);
  {
    auto q = layer.adapter("q");
    const D dq =
        static_cast<double>(q->scaling()) * q->lora_B.template cast<double>() * q->lora_A.template cast<double>();
    Eigen::JacobiSVD<D> sq(dq, Eigen::ComputeThinU | Eigen::ComputeThinV);
    const D best1 = sq.singularValues()(0) * sq.matrixU().col(0) * sq.matrixV().col(0).transpose();
    auto c1 = layer.adapter("q_rank1");
    CHECK(c1->config.r == 1);
    CHECK((c1->lora_B.template cast<double>() * c1->lora_A.template cast<double>() - best1).cwiseAbs().maxCoeff() <=
          10 * tol * dq.cwiseAbs().maxCoeff());
  }
  // svd_rank 0: the largest source rank (3).
  layer.add_weighted_adapter({"p", "q"}, w, "svd_default", lora::Combination::svd);
  CHECK(layer.adapter("svd_default")->config.r == 3);
  // A rank above the rank of the sum pads with zeros and still reproduces it.
  layer.add_weighted_adapter({"p", "q"}, w, "svd7", lora::Combination::svd, 7);
  auto s7 = layer.adapter("svd7");
  CHECK((s7->lora_B.template cast<double>() * s7->lora_A.template cast<double>() - delta).cwiseAbs().maxCoeff() <=
        10 * tol * norm);
}

TEMPLATE_TEST_CASE("multi: bad input names the adapter and leaves the layer unchanged", "[multi][errors]", float,
                   double) {
  using S = TestType;
  const Index I = 6, O = 5;
  Multi<S> layer(random_matrix<S>(O, I, 1), random_row<S>(O, 2));
  layer.add_adapter("a", cfg(2, 4), random_matrix<S>(2, I, 3), random_matrix<S>(O, 2, 4));
  layer.add_adapter("b", cfg(3, 3), random_matrix<S>(3, I, 5), random_matrix<S>(O, 3, 6));
  layer.set_active_adapters({"a", "b"});
  layer.set_scale("b", 0.5);
  const Mat<S> x = random_matrix<S>(4, I, 7);
  const Snapshot<S> before(layer, x);
  const auto a_before = layer.adapter("a");

  CHECK_THROWS_AS(layer.add_adapter("a", cfg(2, 4)), lora::config_error);
  CHECK_THROWS_WITH(layer.add_adapter("a", cfg(2, 4)), Contains("an adapter named \"a\" already exists"));
  CHECK_THROWS_WITH(layer.add_adapter("__base__", cfg(2, 4)), Contains("\"__base__\" is reserved"));
  CHECK_THROWS_WITH(layer.add_adapter("", cfg(2, 4)), Contains("must not be empty"));
  CHECK_THROWS_AS(layer.add_adapter("wide", cfg(2, 4), random_matrix<S>(2, I + 1, 8), random_matrix<S>(O, 2, 9)),
                  lora::shape_error);
  CHECK_THROWS_WITH(layer.add_adapter("wide", cfg(2, 4), random_matrix<S>(2, I + 1, 8), random_matrix<S>(O, 2, 9)),
                    Contains("adapter \"wide\": lora_A expected (2, 6), got (2, 7)"));
  CHECK_THROWS_WITH(
      layer.add_adapter("rank", cfg(4, 4), random_matrix<S>(2, I, 8), random_matrix<S>(O, 2, 9)),
      Contains("adapter \"rank\": lora_A expected (4, 6), got (2, 6); lora_B expected (5, 4), got (5, 2)"));
  CHECK_THROWS_WITH(layer.add_adapter("zero", cfg(0, 4)), Contains("adapter \"zero\": r must be >= 1, got 0"));
  lora::LoraConfig with_bias = cfg(2, 4);
  with_bias.bias = lora::BiasMode::lora_only;
  CHECK_THROWS_WITH(layer.add_adapter("biased", with_bias), Contains("adapter \"biased\": bias must be none"));
  CHECK_THROWS_WITH(layer.add_adapter("nan", cfg(2, std::nan(""))), Contains("adapter \"nan\": LoraConfig"));
  CHECK_THROWS_WITH(layer.replace_adapter("zz", cfg(2, 4), random_matrix<S>(2, I, 3), random_matrix<S>(O, 2, 4)),
                    Contains("no adapter named \"zz\" in this layer; it has \"a\" (id 0), \"b\" (id 1)"));
  CHECK_THROWS_WITH(layer.replace_adapter("a", cfg(2, 4), random_matrix<S>(2, I, 3), random_matrix<S>(O + 1, 2, 4)),
                    Contains("adapter \"a\": lora_A expected (2, 6), got (2, 6); lora_B expected (5, 2), got (6, 2)"));
  CHECK_THROWS_WITH(layer.remove_adapter("zz"), Contains("no adapter named \"zz\""));
  CHECK_THROWS_WITH(layer.set_active_adapters({"a", "zz"}), Contains("no adapter named \"zz\""));
  CHECK_THROWS_WITH(layer.set_active_adapters({"a", "a"}), Contains("adapter \"a\" is listed twice"));
  CHECK_THROWS_WITH(layer.set_scale("zz", 1.0), Contains("no adapter named \"zz\""));
  CHECK_THROWS_WITH(layer.set_scale("a", INFINITY), Contains("adapter \"a\": scale must be finite, got inf"));
  CHECK_THROWS_WITH(layer.adapter_id("zz"), Contains("no adapter named \"zz\""));
  CHECK_THROWS_WITH(layer.train_adapter("zz"), Contains("no adapter named \"zz\""));

  Mat<S> y(4, O);
  CHECK_THROWS_WITH(layer.forward(x, std::vector<std::string>{"a", "b", "zz", "a"}, y),
                    Contains("row 2 asks for adapter \"zz\", which this layer does not have"));
  CHECK_THROWS_WITH(layer.forward(x, std::vector<int>{0, 1, 7, -1}, y),
                    Contains("row 2 has adapter id 7, which no adapter of this layer has"));
  CHECK_THROWS_WITH(layer.forward(x, std::vector<int>{0, 1}, y), Contains("one adapter id per row of x (4), got 2"));

  using C = lora::Combination;
  CHECK_THROWS_WITH(layer.add_weighted_adapter({"a", "b"}, {1, 1}, "a", C::cat),
                    Contains("an adapter named \"a\" already exists"));
  CHECK_THROWS_WITH(layer.add_weighted_adapter({"a", "zz"}, {1, 1}, "new", C::cat),
                    Contains("no adapter named \"zz\""));
  CHECK_THROWS_WITH(layer.add_weighted_adapter({"a", "b"}, {1}, "new", C::cat),
                    Contains("new adapter \"new\": 2 adapters but 1 weights"));
  CHECK_THROWS_WITH(layer.add_weighted_adapter({"a", "b"}, {1, 1}, "new", C::linear),
                    Contains("linear needs equal ranks, but adapter \"a\" has r = 2 and adapter \"b\" has r = 3"));
  CHECK_THROWS_WITH(layer.add_weighted_adapter({"a", "b"}, {1, NAN}, "new", C::svd),
                    Contains("the weight of adapter \"b\" must be finite"));
  CHECK_THROWS_WITH(layer.add_weighted_adapter({"a", "b"}, {0, 0}, "new", C::svd),
                    Contains("new adapter \"new\": the weighted sum"));
  // The same adapter with weights 1 and -1: the update cancels exactly.
  CHECK_THROWS_WITH(layer.add_weighted_adapter({"a", "a"}, {1, -1}, "new", C::svd),
                    Contains("is zero (the weights cancel or are all zero)"));
  CHECK_THROWS_WITH(layer.add_weighted_adapter({"a", "b"}, {1, 1}, "new", C::svd, 6),
                    Contains("svd_rank must be in [1, 5]"));
  CHECK_THROWS_WITH(layer.add_weighted_adapter({}, {}, "new", C::svd), Contains("no source adapters"));

  before.require_same(layer, x);
  CHECK(layer.adapter("a") == a_before);
  CHECK_FALSE(layer.has_adapter("new"));
}

TEMPLATE_TEST_CASE("multi: replace keeps id, scale and activity, remove drops it from the active set", "[multi]", float,
                   double) {
  using S = TestType;
  const Index I = 8, O = 6;
  Multi<S> layer(random_matrix<S>(O, I, 1));
  layer.add_adapter("a", cfg(2, 2), random_matrix<S>(2, I, 2), random_matrix<S>(O, 2, 3));
  layer.add_adapter("b", cfg(2, 2), random_matrix<S>(2, I, 4), random_matrix<S>(O, 2, 5));
  layer.set_active_adapters({"b", "a"});
  layer.set_scale("a", 3.0);
  const int id = layer.adapter_id("a");
  const auto old = layer.adapter("a");
  const Mat<S> A2 = random_matrix<S>(4, I, 6), B2 = random_matrix<S>(O, 4, 7);
  layer.replace_adapter("a", cfg(4, 2), A2, B2);
  auto now = layer.adapter("a");
  CHECK(now != old);
  CHECK(now->id == id);
  CHECK(now->scale == 3.0);
  CHECK(now->rank() == 4);
  CHECK(same_bits(now->lora_A, A2));
  CHECK(layer.active_adapters() == std::vector<std::string>{"b", "a"});
  CHECK(same_bits(old->lora_A, random_matrix<S>(2, I, 2)));  // the old snapshot stays whole for whoever holds it
  CHECK(old->rank() == 2);
  layer.remove_adapter("b");
  CHECK(layer.active_adapters() == std::vector<std::string>{"a"});
  CHECK(layer.adapter_names() == std::vector<std::string>{"a"});
  layer.add_adapter("b", cfg(2, 2));
  CHECK(layer.adapter_id("b") == 2);  // ids are never reused
  Mat<S> y3(3, O);
  CHECK_THROWS_WITH(layer.forward(Mat<S>::Zero(3, I), std::vector<int>{0, 1, 2}, y3),
                    Contains("row 1 has adapter id 1"));
}

TEST_CASE("multi: several PEFT adapters load onto one base and save back byte for byte", "[multi][peft]") {
  using S = float;
  const Index I = 12, O = 10;
  const std::vector<std::string> paths = {"model.layers.0.q_proj", "model.layers.0.v_proj"};
  std::map<std::string, Mat<S>> weights;
  for (std::size_t i = 0; i < paths.size(); ++i) weights[paths[i]] = random_matrix<S>(O, I, 100 + i);
  const auto dir = lora_test::scratch_dir("multi-peft");
  // Two adapters trained elsewhere: written by the single-adapter path.
  std::vector<std::unique_ptr<lora::LoRALinear<S>>> singles;
  for (int k = 0; k < 2; ++k) {
    std::map<std::string, lora::LoRALinear<S>*> model;
    for (std::size_t i = 0; i < paths.size(); ++i) {
      lora::LoraConfig c = cfg(k == 0 ? 2 : 4, k == 0 ? 4 : 4, k == 1, 30 + k * 10 + i);
      c.init_lora_weights = lora::InitLoraWeights::random;
      singles.push_back(std::make_unique<lora::LoRALinear<S>>(weights[paths[i]], c));
      singles.back()->eval();
      model[paths[i]] = singles.back().get();
    }
    lora::peft::save_adapter((dir / ("adapter" + std::to_string(k))).string(), model);
  }
  std::map<std::string, std::unique_ptr<Multi<S>>> layers;
  std::map<std::string, Multi<S>*> model;
  for (const auto& p : paths) {
    layers[p] = std::make_unique<Multi<S>>(weights[p]);
    model[p] = layers[p].get();
  }
  lora::peft::load_adapter((dir / "adapter0").string(), "math", model);
  lora::peft::load_adapter((dir / "adapter1").string(), "code", model);
  const Mat<S> x = random_matrix<S>(5, I, 9);
  for (std::size_t i = 0; i < paths.size(); ++i) {
    Multi<S>& layer = *model[paths[i]];
    CHECK(layer.adapter_names() == std::vector<std::string>{"math", "code"});
    layer.set_adapter("math");
    CHECK(same_bits(layer.forward(x), std::as_const(*singles[i]).forward(x)));
    layer.set_adapter("code");
    CHECK(same_bits(layer.forward(x), std::as_const(*singles[2 + i]).forward(x)));
  }
  lora::peft::save_adapter((dir / "code-again").string(), "code", model);
  for (const char* f : {"adapter_model.safetensors", "adapter_config.json"})
    CHECK(lora_test::read_bytes((dir / "adapter1" / f).string()) ==
          lora_test::read_bytes((dir / "code-again" / f).string()));

  // Loading a name again, or into layers of another shape, changes nothing.
  CHECK_THROWS_WITH(lora::peft::load_adapter((dir / "adapter0").string(), "math", model),
                    Contains("cannot load adapter \"math\"") && Contains("already has an adapter named \"math\""));
  Multi<S> narrow(random_matrix<S>(O, I - 1, 1));
  std::map<std::string, Multi<S>*> wrong = {{paths[0], &narrow}, {paths[1], model[paths[1]]}};
  CHECK_THROWS_WITH(lora::peft::load_adapter((dir / "adapter0").string(), "third", wrong),
                    Contains("model.layers.0.q_proj.lora_A.weight: expected (2, 11), got (2, 12)"));
  CHECK_FALSE(model[paths[1]]->has_adapter("third"));
  CHECK(narrow.adapter_count() == 0);
  CHECK_THROWS_WITH(lora::peft::save_adapter((dir / "none").string(), "nope", model),
                    Contains("has no adapter named \"nope\""));
}

}  // namespace unit_multi
