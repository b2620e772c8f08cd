// FrozenWeight and the weight layouts: W stored (O, I) as torch.nn.Linear, or (I, O) as transformers' Conv1D
// (fan_in_fan_out), viewed in place. Checked against hand-computed products, against the same layer over an
// (O, I) copy, against finite differences, and through PEFT files.
#include <catch2/catch.hpp>
#include <lora/lora.hpp>

#include "test_files.hpp"

#include <cstdlib>
#include <limits>
#include <map>
#include <string>
#include <vector>

// Everything below is in a namespace of its own, so the test files can be compiled together (CMake's
// UNITY_BUILD, tests/CMakeLists.txt) without their helpers clashing.
namespace unit_weight {

using Catch::Contains;
using lora::FrozenWeight;
using lora::Index;
using lora::WeightLayout;
template <class S>
using Mat = lora::Matrix<S>;

namespace {

lora::LoraConfig make_config(int r, double alpha, double dropout = 0.0, std::uint64_t seed = 7) {
  lora::LoraConfig c;
  c.r = r;
  c.lora_alpha = alpha;
  c.lora_dropout = dropout;
  c.seed = seed;
  return c;
}

template <class S>
Mat<S> random_matrix(Index rows, Index cols, unsigned seed) {
  std::srand(seed);
  return Mat<S>::Random(rows, cols);
}

double max_diff(const Mat<double>& a, const Mat<double>& b) {
  REQUIRE(a.rows() == b.rows());
  REQUIRE(a.cols() == b.cols());
  return (a - b).cwiseAbs().maxCoeff();
}

}  // namespace

TEST_CASE("FrozenWeight products in both layouts, computed by hand", "[weight]") {
  // W (O = 2, I = 3) = [[1, 2, 3], [4, 5, 6]]; stored (I, O) it is [[1, 4], [2, 5], [3, 6]].
  Mat<double> W(2, 3), Wt(3, 2), x(1, 3), dy(1, 2);
  W << 1, 2, 3, 4, 5, 6;
  Wt << 1, 4, 2, 5, 3, 6;
  x << 1, 0, -1;
  dy << 1, 1;
  for (auto layout : {WeightLayout::out_in, WeightLayout::in_out}) {
    const Mat<double>& stored = layout == WeightLayout::out_in ? W : Wt;
    const auto w = FrozenWeight<double>::view(stored.data(), 2, 3, layout);
    CHECK(w.out_features() == 2);
    CHECK(w.in_features() == 3);
    CHECK(w.stored().data() == stored.data());
    CHECK(w.stored().rows() == stored.rows());
    CHECK(w.to_dense() == W);
    Mat<double> y(1, 2), dx(1, 3);
    w.forward(x, y);  // x Wᵀ = [1 - 3, 4 - 6]
    CHECK(y(0, 0) == -2);
    CHECK(y(0, 1) == -2);
    w.backward(dy, dx);  // dy W = [5, 7, 9]
    CHECK(dx(0, 0) == 5);
    CHECK(dx(0, 1) == 7);
    CHECK(dx(0, 2) == 9);
  }
}

TEST_CASE("FrozenWeight<float> products match a double reference on strided blocks, in both layouts", "[weight]") {
  // Whatever runs the float products (float_gemm_backend(): oneDNN's sgemm under LORA_USE_DNNL, Eigen otherwise),
  // x, y, dy and dx may be blocks of larger matrices (a leading dimension beyond their width), `=` must not read
  // what y held (NaN here), `+=` must add to it, and nothing outside the destination block may change.
  INFO("backend: " << lora::float_gemm_backend());
  struct Shape {
    Index n, in, out;
  };
  const float nan = std::numeric_limits<float>::quiet_NaN();
  unsigned seed = 100;
  for (const Shape& sh :
       {Shape{1, 3, 2}, Shape{1, 1, 1}, Shape{7, 33, 17}, Shape{64, 130, 70}, Shape{3, 257, 9}, Shape{0, 5, 4},
        // Shapes where, on an AVX-512 CPU, an (I, O) weight's x Wᵀ and an (O, I) weight's dy W run the library's
        // own GEMM (detail/kgemm.hpp): 512 rows, at least 1536 columns, any depth (one block, then two at 512 x
        // 1100 -> 1560); 1560 is not a multiple of its 48-column panels.
        Shape{512, 100, 1560}, Shape{512, 1600, 100}, Shape{512, 1100, 1560},
        // And where it reads W transposed: an (O, I) weight's x Wᵀ and an (I, O) weight's dy W at 64 rows or more,
        // a depth of 256 or more, 768 columns or more: one block of depth, then two and three (1100 and 2100).
        Shape{70, 300, 800}, Shape{70, 800, 300}, Shape{64, 2100, 1100}}) {
    const Mat<float> W = random_matrix<float>(sh.out, sh.in, ++seed);
    const Mat<float> Wt = W.transpose();
    // x and dy inside larger buffers, 2 rows and 5 columns in.
    Mat<float> xbuf = random_matrix<float>(sh.n + 3, sh.in + 7, ++seed);
    Mat<float> dybuf = random_matrix<float>(sh.n + 3, sh.out + 7, ++seed);
    const auto x = xbuf.block(2, 5, sh.n, sh.in);
    const auto dy = dybuf.block(2, 5, sh.n, sh.out);
    const Mat<double> y_ref = x.cast<double>() * W.cast<double>().transpose();
    const Mat<double> dx_ref = dy.cast<double>() * W.cast<double>();
    const double tol = 1e-5 * double(std::max(sh.in, sh.out));
    for (auto layout : {WeightLayout::out_in, WeightLayout::in_out}) {
      const Mat<float>& stored = layout == WeightLayout::out_in ? W : Wt;
      const auto w = FrozenWeight<float>::view(stored.data(), sh.out, sh.in, layout);
      for (bool accumulate : {false, true}) {
        INFO("N=" << sh.n << " I=" << sh.in << " O=" << sh.out << " layout " << lora::layout_name(layout)
                  << (accumulate ? " +=" : " ="));
        Mat<float> ybuf = random_matrix<float>(sh.n + 4, sh.out + 6, ++seed);
        Mat<float> dxbuf = random_matrix<float>(sh.n + 4, sh.in + 6, ++seed);
        if (!accumulate) {
          ybuf.block(1, 3, sh.n, sh.out).setConstant(nan);
          dxbuf.block(1, 3, sh.n, sh.in).setConstant(nan);
        }
        const Mat<float> ybefore = ybuf, dxbefore = dxbuf;
        auto y = ybuf.block(1, 3, sh.n, sh.out);
        auto dx = dxbuf.block(1, 3, sh.n, sh.in);
        if (accumulate) {
          w.forward_add(x, y);
          w.backward_add(dy, dx);
        } else {
          w.forward(x, y);
          w.backward(dy, dx);
        }
        const Mat<double> y_want =
            accumulate ? Mat<double>(ybefore.block(1, 3, sh.n, sh.out).cast<double>() + y_ref) : y_ref;
        const Mat<double> dx_want =
            accumulate ? Mat<double>(dxbefore.block(1, 3, sh.n, sh.in).cast<double>() + dx_ref) : dx_ref;
        if (sh.n > 0) {
          CHECK(max_diff(Mat<float>(y).cast<double>(), y_want) < tol);
          CHECK(max_diff(Mat<float>(dx).cast<double>(), dx_want) < tol);
        }
        // Outside the blocks, every value is as it was (NaN compares unequal, so the blocks are put back first).
        y = ybefore.block(1, 3, sh.n, sh.out);
        dx = dxbefore.block(1, 3, sh.n, sh.in);
        CHECK(ybuf.cwiseEqual(ybefore).count() == ybuf.size() - (accumulate ? 0 : sh.n * sh.out));
        CHECK(dxbuf.cwiseEqual(dxbefore).count() == dxbuf.size() - (accumulate ? 0 : sh.n * sh.in));
      }
    }
  }
}

TEST_CASE("the own GEMM matches a double reference at its edges, with a bias and low-rank terms inside it",
          "[weight][kgemm]") {
  using lora::detail::KGemm;
  using lora::detail::LowRankTerm;
  if (!KGemm::cpu_supported()) {
    WARN("this CPU has no AVX-512 (or the build has no x86 kernels): the own GEMM does not run here");
    return;
  }
  // Rows that are not a multiple of its 8-row tile, columns not of its 48-column panels, depths of one block and
  // of two and three (K above 1024 is split evenly); X, S, C, H and E all blocks of larger buffers.
  struct Shape {
    Index m, k, n;
  };
  unsigned seed = 300;
  const double eps = std::numeric_limits<float>::epsilon();
  for (const Shape& sh : {Shape{1, 1, 1}, Shape{7, 5, 47}, Shape{9, 1537, 49}, Shape{17, 64, 97}, Shape{8, 2049, 200},
                          Shape{33, 300, 1000}}) {
    const Mat<float> xbuf = random_matrix<float>(sh.m + 2, sh.k + 3, ++seed);
    const Mat<float> sbuf = random_matrix<float>(sh.k + 1, sh.n + 5, ++seed);
    const auto X = xbuf.block(1, 2, sh.m, sh.k);
    const auto S = sbuf.block(1, 4, sh.k, sh.n);
    // The same S stored transposed (N, K), as W (O, I) is in x Wᵀ: a block of a larger buffer too.
    Mat<float> tbuf = random_matrix<float>(sh.n + 2, sh.k + 3, ++seed);
    tbuf.block(2, 1, sh.n, sh.k) = S.transpose();
    const lora::detail::StoredOperand St{tbuf.data() + 2 * tbuf.cols() + 1, tbuf.cols(), true};
    // Two terms: one from column n/3 over half the columns (across panels), one right after it to the last column
    // (sharing a panel with the first when they meet inside one); ranks 3 and 2, H and E blocks of larger buffers.
    const Index c1 = sh.n / 3, n1 = std::max<Index>(1, sh.n / 2), c2 = std::min(sh.n, c1 + n1), n2 = sh.n - c2;
    const Mat<float> hbuf = random_matrix<float>(sh.m, 7, ++seed);
    const Mat<float> e1 = random_matrix<float>(3, n1 + 2, ++seed), e2 = random_matrix<float>(2, n2 + 1, ++seed);
    std::vector<LowRankTerm> terms = {{c1, std::min(n1, sh.n - c1), 3, hbuf.data() + 1, 7, e1.data() + 2, n1 + 2}};
    if (n2 > 0) terms.push_back({c2, n2, 2, hbuf.data() + 5, 7, e2.data(), n2 + 1});
    // The reference and a bound on each element's rounding: (K + r + 1) ε times the sum of the magnitudes added.
    Mat<double> want = X.cast<double>() * S.cast<double>();
    Mat<double> size = X.cast<double>().cwiseAbs() * S.cast<double>().cwiseAbs();
    for (const auto& t : terms) {
      const Eigen::Map<const Eigen::Matrix<float, -1, -1, Eigen::RowMajor>, 0, Eigen::OuterStride<>> H(
          t.H, sh.m, t.r, Eigen::OuterStride<>(t.ldh)),
          E(t.E, t.r, t.cols, Eigen::OuterStride<>(t.lde));
      want.middleCols(t.col, t.cols) += H.cast<double>() * E.cast<double>();
      size.middleCols(t.col, t.cols) += H.cast<double>().cwiseAbs() * E.cast<double>().cwiseAbs();
    }
    // A bias: a row of N inside a larger buffer, added to every row of C.
    const Mat<float> bbuf = random_matrix<float>(1, sh.n + 3, ++seed);
    const auto bias = bbuf.block(0, 2, 1, sh.n);
    for (int variant = 0; variant < 4; ++variant) {
      const bool accumulate = (variant & 1) != 0, with_bias = (variant & 2) != 0;
      INFO("M=" << sh.m << " K=" << sh.k << " N=" << sh.n << (accumulate ? " +=" : " =")
                << (with_bias ? " with a bias" : ""));
      Mat<float> cbuf = random_matrix<float>(sh.m + 3, sh.n + 4, ++seed);
      if (!accumulate) cbuf.block(2, 1, sh.m, sh.n).setConstant(std::numeric_limits<float>::quiet_NaN());
      const Mat<float> before = cbuf;
      auto C = cbuf.block(2, 1, sh.m, sh.n);
      KGemm::run(sh.m, sh.n, sh.k, X.data(), X.outerStride(), {S.data(), S.outerStride()}, C.data(), C.outerStride(),
                 accumulate, terms.data(), terms.size(), nullptr, with_bias ? bias.data() : nullptr);
      // S read from its transposed storage: the same packed panels, so the same C bit for bit.
      Mat<float> from_t = before.block(2, 1, sh.m, sh.n);
      KGemm::run(sh.m, sh.n, sh.k, X.data(), X.outerStride(), St, from_t.data(), sh.n, accumulate, terms.data(),
                 terms.size(), nullptr, with_bias ? bias.data() : nullptr);
      CHECK(from_t == Mat<float>(C));
      Mat<double> old = Mat<double>::Zero(sh.m, sh.n);
      if (accumulate) old = before.block(2, 1, sh.m, sh.n).cast<double>();
      if (with_bias) old.rowwise() += bias.cast<double>().row(0);
      const Mat<double> expect = want + old;
      const Mat<double> bound = (double(sh.k + 7) * eps) * (size + old.cwiseAbs()).array() + 1e-30;
      const Mat<double> err = (Mat<float>(C).cast<double>() - expect).cwiseAbs();
      CHECK((err.array() <= bound.array()).all());
      // Nothing outside C's block changed (C's own block put back first: NaN compares unequal).
      C = before.block(2, 1, sh.m, sh.n);
      CHECK(cbuf.cwiseEqual(before).count() == cbuf.size() - (accumulate ? 0 : sh.m * sh.n));
    }
    // Terms whose E is zero add +0 after the product's own sum: the result is the plain product's, bit for bit.
    const Mat<float> zero1 = Mat<float>::Zero(3, n1 + 2), zero2 = Mat<float>::Zero(2, n2 + 1);
    std::vector<LowRankTerm> zero_terms = terms;
    zero_terms[0].E = zero1.data();
    if (zero_terms.size() > 1) zero_terms[1].E = zero2.data();
    Mat<float> plain(sh.m, sh.n), with_zero(sh.m, sh.n);
    KGemm::run(sh.m, sh.n, sh.k, X.data(), X.outerStride(), {S.data(), S.outerStride()}, plain.data(), sh.n, false);
    KGemm::run(sh.m, sh.n, sh.k, X.data(), X.outerStride(), {S.data(), S.outerStride()}, with_zero.data(), sh.n, false,
               zero_terms.data(), zero_terms.size());
    CHECK(plain == with_zero);
    // The bias is added after the product's own sum: the plain product plus the bias, each element one float sum.
    Mat<float> with_bias(sh.m, sh.n);
    KGemm::run(sh.m, sh.n, sh.k, X.data(), X.outerStride(), {S.data(), S.outerStride()}, with_bias.data(), sh.n, false,
               zero_terms.data(), zero_terms.size(), nullptr, bias.data());
    plain.rowwise() += bias.row(0);
    CHECK(plain == with_bias);
  }
  // Where it runs: 512 rows or more, 1536 columns or more (any depth), one thread, and not turned off.
  CHECK(KGemm::eligible(512, 1024, 1536) == (Eigen::nbThreads() == 1));
  CHECK(KGemm::eligible(512, 4096, 4096) == (Eigen::nbThreads() == 1));
  CHECK_FALSE(KGemm::eligible(511, 768, 2304));
  CHECK_FALSE(KGemm::eligible(512, 0, 2304));
  CHECK_FALSE(KGemm::eligible(512, 768, 1535));
  CHECK_FALSE(KGemm::eligible(512, 2304, 768));
  // S transposed (W (O, I) in x Wᵀ): 64 rows or more, a depth of 256 or more (any number of blocks), 768 columns
  // or more.
  CHECK(KGemm::eligible(64, 256, 768, true) == (Eigen::nbThreads() == 1));
  CHECK(KGemm::eligible(512, 11008, 4096, true) == (Eigen::nbThreads() == 1));
  CHECK_FALSE(KGemm::eligible(63, 768, 2304, true));
  CHECK_FALSE(KGemm::eligible(512, 255, 2304, true));
  CHECK_FALSE(KGemm::eligible(512, 768, 767, true));
  KGemm::set_enabled(false);
  CHECK_FALSE(KGemm::eligible(512, 768, 2304));
  CHECK_FALSE(KGemm::eligible(512, 768, 2304, true));
  KGemm::set_enabled(true);
}

TEST_CASE("the own GEMM computes the terms' H = X Aᵀ itself, before the tiles that read it", "[weight][kgemm]") {
  using lora::detail::KGemm;
  using lora::detail::LowRankInput;
  using lora::detail::LowRankTerm;
  if (!KGemm::cpu_supported()) {
    WARN("this CPU has no AVX-512 (or the build has no x86 kernels): the own GEMM does not run here");
    return;
  }
  // Row tails of its 4-row and 8-row blocks, ranks that are not multiples of its 4-column blocks, depths below,
  // at and between its 16-lane steps and over one 1024 block; the input's X is another matrix than the
  // product's (as dropout makes it), and X, A and H are all blocks of larger buffers.
  struct Shape {
    Index m, k, n, r;
  };
  unsigned seed = 900;
  const double eps = std::numeric_limits<float>::epsilon();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (const Shape& sh : {Shape{1, 1, 1, 3}, Shape{7, 5, 47, 5}, Shape{9, 1537, 49, 6}, Shape{17, 64, 97, 7},
                          Shape{8, 2049, 200, 8}, Shape{33, 300, 1000, 9}}) {
    INFO("M=" << sh.m << " K=" << sh.k << " N=" << sh.n << " r=" << sh.r);
    const Mat<float> xbuf = random_matrix<float>(sh.m + 2, sh.k + 3, ++seed);
    const Mat<float> xabuf = random_matrix<float>(sh.m + 1, sh.k + 2, ++seed);
    const Mat<float> sbuf = random_matrix<float>(sh.k + 1, sh.n + 5, ++seed);
    const Mat<float> abuf = random_matrix<float>(sh.r + 2, sh.k + 4, ++seed);
    const auto X = xbuf.block(1, 2, sh.m, sh.k);
    const auto XA = xabuf.block(1, 1, sh.m, sh.k);
    const auto S = sbuf.block(1, 4, sh.k, sh.n);
    const auto A = abuf.block(2, 3, sh.r, sh.k);
    Mat<float> hbuf = Mat<float>::Constant(sh.m + 2, sh.r + 3, nan);
    auto H = hbuf.block(1, 2, sh.m, sh.r);
    // Two terms reading H: columns [0, r - 2) over the first half of C's columns, [r - 2, r) over the rest.
    const Index n1 = std::max<Index>(1, sh.n / 2), n2 = sh.n - n1;
    const Mat<float> e1 = random_matrix<float>(sh.r - 2, n1, ++seed), e2 = random_matrix<float>(2, n2 + 1, ++seed);
    std::vector<LowRankTerm> terms = {{0, n1, sh.r - 2, H.data(), H.outerStride(), e1.data(), n1}};
    if (n2 > 0) terms.push_back({n1, n2, 2, H.data() + (sh.r - 2), H.outerStride(), e2.data(), n2 + 1});
    const LowRankInput input{XA.data(), XA.outerStride(), A.data(), A.outerStride(), sh.r, H.data(), H.outerStride()};
    Mat<float> C(sh.m, sh.n);
    KGemm::run(sh.m, sh.n, sh.k, X.data(), X.outerStride(), {S.data(), S.outerStride()}, C.data(), sh.n, false,
               terms.data(), terms.size(), &input);
    // H against a double reference, within (K + 1) ε of the magnitudes summed; nothing of its buffer outside it
    // written (NaN there still).
    const Mat<float> Hgot = H;
    const Mat<double> h_want = XA.cast<double>() * A.cast<double>().transpose();
    const Mat<double> h_size = XA.cast<double>().cwiseAbs() * A.cast<double>().cwiseAbs().transpose();
    const Mat<double> h_err = (Hgot.cast<double>() - h_want).cwiseAbs();
    CHECK((h_err.array() <= (double(sh.k + 1) * eps) * h_size.array() + 1e-30).all());
    CHECK(hbuf.array().isNaN().count() == hbuf.size() - sh.m * sh.r);
    // C against a double reference with the H the GEMM wrote, which the terms read after it was written.
    Mat<double> want = X.cast<double>() * S.cast<double>();
    Mat<double> size = X.cast<double>().cwiseAbs() * S.cast<double>().cwiseAbs();
    want.leftCols(n1) += Hgot.leftCols(sh.r - 2).cast<double>() * e1.cast<double>();
    size.leftCols(n1) += Hgot.leftCols(sh.r - 2).cast<double>().cwiseAbs() * e1.cast<double>().cwiseAbs();
    if (n2 > 0) {
      const Mat<double> e2d = e2.leftCols(n2).cast<double>();
      want.rightCols(n2) += Hgot.rightCols(2).cast<double>() * e2d;
      size.rightCols(n2) += Hgot.rightCols(2).cast<double>().cwiseAbs() * e2d.cwiseAbs();
    }
    const Mat<double> err = (C.cast<double>() - want).cwiseAbs();
    CHECK((err.array() <= (double(sh.k + 6) * eps) * size.array() + 1e-30).all());
    // The same terms with H computed outside (the same values) give the same C, bit for bit: the GEMM's own H is
    // written before any tile reads it.
    Mat<float> C_outside(sh.m, sh.n);
    std::vector<LowRankTerm> outside = terms;
    outside[0].H = Hgot.data();
    outside[0].ldh = sh.r;
    if (outside.size() > 1) {
      outside[1].H = Hgot.data() + (sh.r - 2);
      outside[1].ldh = sh.r;
    }
    KGemm::run(sh.m, sh.n, sh.k, X.data(), X.outerStride(), {S.data(), S.outerStride()}, C_outside.data(), sh.n, false,
               outside.data(), outside.size());
    CHECK(C == C_outside);
  }
}

TEST_CASE("the adapters' products (detail::product) match a double reference, transposed or not, on blocks",
          "[weight]") {
  // FusedLoRALinear's thin products (x Aᵀ, dyᵀ H, dy B, Gᵀ x, G A) go through detail::product, on the backend of
  // FrozenWeight's float products. Every operand here is a block inside a larger buffer, 0-row and 1-row cases
  // included; `=` must not read C (NaN), `+=` adds, alpha scales, and nothing outside C changes.
  INFO("backend: " << lora::float_gemm_backend());
  const float nan = std::numeric_limits<float>::quiet_NaN();
  unsigned seed = 300;
  struct Shape {
    Index m, n, k;
  };
  for (const Shape& sh : {Shape{5, 8, 33}, Shape{64, 16, 130}, Shape{1, 7, 9}, Shape{6, 1, 4}, Shape{3, 5, 1},
                          Shape{4, 3, 0}, Shape{0, 3, 4}}) {
    for (int t = 0; t < 4; ++t) {
      const bool ta = (t & 1) != 0, tb = (t & 2) != 0;
      // op(A) (m, k), op(B) (k, n), stored transposed when asked, each 1 row and 2 columns into a larger buffer.
      const Index ar = ta ? sh.k : sh.m, ac = ta ? sh.m : sh.k, br = tb ? sh.n : sh.k, bc = tb ? sh.k : sh.n;
      const Mat<float> abuf = random_matrix<float>(ar + 2, ac + 5, ++seed);
      const Mat<float> bbuf = random_matrix<float>(br + 2, bc + 5, ++seed);
      const auto A = abuf.block(1, 2, ar, ac);
      const auto B = bbuf.block(1, 2, br, bc);
      const Mat<double> a = ta ? Mat<double>(A.cast<double>().transpose()) : Mat<double>(A.cast<double>());
      const Mat<double> b = tb ? Mat<double>(B.cast<double>().transpose()) : Mat<double>(B.cast<double>());
      const Mat<double> ref = 0.75 * a * b;
      for (bool accumulate : {false, true}) {
        INFO("m=" << sh.m << " n=" << sh.n << " k=" << sh.k << " trans_a " << ta << " trans_b " << tb
                  << (accumulate ? " +=" : " ="));
        Mat<float> cbuf = random_matrix<float>(sh.m + 3, sh.n + 4, ++seed);
        if (!accumulate) cbuf.block(2, 1, sh.m, sh.n).setConstant(nan);
        const Mat<float> before = cbuf;
        auto C = cbuf.block(2, 1, sh.m, sh.n);
        lora::detail::product<float>("test", 0.75f, A, ta, B, tb, accumulate, C);
        const Mat<double> want = accumulate ? Mat<double>(before.block(2, 1, sh.m, sh.n).cast<double>() + ref) : ref;
        if (sh.m > 0 && sh.n > 0) CHECK(max_diff(Mat<float>(C).cast<double>(), want) < 1e-5 * double(sh.k + 1));
        C = before.block(2, 1, sh.m, sh.n);
        CHECK(cbuf.cwiseEqual(before).count() == cbuf.size() - (accumulate ? 0 : sh.m * sh.n));
      }
    }
  }
}

#if defined(LORA_USE_DNNL) && DNNL_CPU_THREADING_RUNTIME == DNNL_RUNTIME_OMP
TEST_CASE("oneDNN's products leave the calling thread's OpenMP thread count as they found it", "[weight]") {
  // dnnl_gemm sets the count to Eigen::nbThreads() for each call and puts the caller's back afterwards.
  const int before = omp_get_max_threads();
  omp_set_num_threads(3);
  const Mat<float> W = random_matrix<float>(40, 30, 1), x = random_matrix<float>(20, 30, 2);
  Mat<float> y(20, 40);
  FrozenWeight<float>::view(W.data(), 40, 30).forward(x, y);
  CHECK(omp_get_max_threads() == 3);
  CHECK((y - x * W.transpose()).cwiseAbs().maxCoeff() < 1e-4f);
  omp_set_num_threads(before);
}
#endif

TEST_CASE("LoRALinear over an (in, out) view computes what it computes over the (out, in) copy", "[weight][linear]") {
  const Index O = 7, I = 5, N = 6;
  const int r = 3;
  const Mat<double> W = random_matrix<double>(O, I, 1);
  const Mat<double> Wt = W.transpose();  // the Conv1D checkpoint's buffer
  const Mat<double> b = random_matrix<double>(1, O, 2);
  const Mat<double> x = random_matrix<double>(N, I, 3), dy = random_matrix<double>(N, O, 4);
  for (double dropout : {0.0, 0.3}) {
    CAPTURE(dropout);
    const auto cfg = make_config(r, 6, dropout);
    lora::LoRALinear<double> linear(W, b, cfg);
    lora::LoRALinear<double> conv1d(FrozenWeight<double>::view(Wt.data(), O, I, WeightLayout::in_out), b, cfg);
    CHECK(conv1d.frozen_weight().stored().data() == Wt.data());  // no copy
    CHECK(conv1d.weight_layout() == WeightLayout::in_out);
    CHECK(conv1d.weight_is_view());
    CHECK(conv1d.lora_A() == linear.lora_A());  // the same seed gives the same A
    linear.lora_B() = random_matrix<double>(O, r, 5);
    conv1d.lora_B() = linear.lora_B();

    Mat<double> y1(N, O), y2(N, O), dx1(N, I), dx2(N, I);
    linear.forward(x, y1);
    conv1d.forward(x, y2);
    CHECK(max_diff(y1, y2) < 1e-12);
    linear.backward(x, dy, dx1);
    conv1d.backward(x, dy, dx2);
    CHECK(max_diff(dx1, dx2) < 1e-12);
    CHECK(max_diff(linear.dA(), conv1d.dA()) < 1e-12);
    CHECK(max_diff(linear.dB(), conv1d.dB()) < 1e-12);

    conv1d.eval();
    linear.eval();
    CHECK(max_diff(std::as_const(linear).forward(x), std::as_const(conv1d).forward(x)) < 1e-12);
  }
  lora::LoRALinear<double> conv1d(FrozenWeight<double>::view(Wt.data(), O, I, WeightLayout::in_out));
  REQUIRE_THROWS_AS(conv1d.weight(), lora::state_error);
  REQUIRE_THROWS_WITH(conv1d.weight(), Contains("frozen_weight()"));
}

TEST_CASE("gradients through an (in, out) weight match finite differences", "[weight][gradcheck]") {
  const Index O = 6, I = 4;
  const Mat<double> Wt = random_matrix<double>(I, O, 8);
  lora::LoRALinear<double> layer(FrozenWeight<double>::owned(Wt, WeightLayout::in_out), random_matrix<double>(1, O, 9),
                                 make_config(2, 4));
  layer.lora_B() = random_matrix<double>(O, 2, 10);
  const auto result = lora::check_layer_gradients(layer, random_matrix<double>(5, I, 11));
  INFO(result.describe());
  CHECK(result.ok());
  CHECK(result.dx.checked == 5 * I);
}

TEST_CASE("merge writes W + s B A transposed into an (in, out) buffer, and unmerge takes it back", "[weight][merge]") {
  const Index O = 5, I = 4;
  const int r = 2;
  const Mat<double> W = random_matrix<double>(O, I, 12);
  Mat<double> Wt = W.transpose();
  const Mat<double> original = Wt;
  auto cfg = make_config(r, 3);
  auto layer = lora::LoRALinear<double>(FrozenWeight<double>::mutable_view(Wt.data(), O, I, WeightLayout::in_out), cfg);
  layer.lora_B() = random_matrix<double>(O, r, 13);
  const Mat<double> x = random_matrix<double>(3, I, 14);
  layer.eval();
  const Mat<double> unmerged = std::as_const(layer).forward(x);

  layer.merge();
  // Independent of the library: the (O, I) sum, transposed, element by element.
  const double s = 3.0 / r;
  const Mat<double> BA = layer.lora_B() * layer.lora_A();
  for (Index o = 0; o < O; ++o)
    for (Index i = 0; i < I; ++i) CHECK(std::abs(Wt(i, o) - (W(o, i) + s * BA(o, i))) < 1e-14);
  CHECK(max_diff(std::as_const(layer).forward(x), unmerged) < 1e-12);
  layer.unmerge();
  CHECK(max_diff(Wt, original) < 1e-14);

  SECTION("a read-only (in, out) view refuses, and nothing is written") {
    auto view = lora::LoRALinear<double>(FrozenWeight<double>::view(Wt.data(), O, I, WeightLayout::in_out), cfg);
    view.lora_B() = random_matrix<double>(O, r, 15);
    const Mat<double> before = Wt;
    REQUIRE_THROWS_AS(view.merge(), lora::state_error);
    REQUIRE_THROWS_WITH(view.merge(), Contains("mutable_view"));
    CHECK(Wt == before);
  }
  SECTION("a sum that is not finite is refused, and nothing is written") {
    layer.lora_B()(3, 1) = std::numeric_limits<double>::infinity();
    const Mat<double> before = Wt;
    REQUIRE_THROWS_AS(layer.merge(), lora::numeric_error);
    REQUIRE_THROWS_WITH(layer.merge(), Contains("W is left unchanged"));
    CHECK(Wt == before);
    CHECK_FALSE(layer.is_merged());
  }
}

TEST_CASE("add_low_rank adds to one slice of a fused weight's outputs, in both layouts", "[weight][merge]") {
  // A fused q, k, v projection: O = 3·4 outputs, I = 5 inputs; the update goes to k only (outputs 4..7).
  const Index d = 4, O = 3 * d, I = 5;
  const Mat<double> W = random_matrix<double>(O, I, 16);
  const Mat<double> B = random_matrix<double>(d, 2, 17), A = random_matrix<double>(2, I, 18);
  Mat<double> expected = W;
  expected.middleRows(d, d) += 0.5 * B * A;
  for (auto layout : {WeightLayout::out_in, WeightLayout::in_out}) {
    Mat<double> stored = layout == WeightLayout::out_in ? W : Mat<double>(W.transpose());
    auto w = FrozenWeight<double>::mutable_view(stored.data(), O, I, layout);
    w.add_low_rank("test", 0.5, B, A, d, true);
    CHECK(max_diff(w.to_dense(), expected) < 1e-14);
    CHECK(w.to_dense().topRows(d) == W.topRows(d));  // q and v untouched, bit for bit
    CHECK(w.to_dense().bottomRows(d) == W.bottomRows(d));
    REQUIRE_THROWS_AS(w.add_low_rank("test", 0.5, B, A, 2 * d + 1), lora::shape_error);
    REQUIRE_THROWS_WITH(w.add_low_rank("test", 0.5, B, A, 2 * d + 1), Contains("at output 9"));
  }
}

TEST_CASE("FrozenWeight refuses bad input and copies as owned or viewed", "[weight]") {
  REQUIRE_THROWS_AS(FrozenWeight<float>::view(nullptr, 2, 2), lora::shape_error);
  REQUIRE_THROWS_WITH(FrozenWeight<float>::view(nullptr, 2, 2), Contains("must not be null"));
  const std::vector<float> host(6, 1.0f);
  REQUIRE_THROWS_WITH(FrozenWeight<float>::view(host.data(), 0, 6), Contains("out_features=0"));
  REQUIRE_THROWS_AS(FrozenWeight<float>::owned(Mat<float>()), lora::shape_error);
  REQUIRE_THROWS_AS(lora::LoRALinear<float>(FrozenWeight<float>()), lora::shape_error);

  auto owned = FrozenWeight<double>::owned(Mat<double>::Ones(2, 3), WeightLayout::in_out);  // O = 3, I = 2
  CHECK(owned.out_features() == 3);
  CHECK(owned.in_features() == 2);
  auto copy = owned;
  CHECK(copy.stored().data() != owned.stored().data());
  copy.add_low_rank("test", 1, Mat<double>::Ones(3, 1), Mat<double>::Ones(1, 2));
  CHECK(owned.to_dense() == Mat<double>::Ones(3, 2));  // the original did not move
  CHECK(copy.to_dense() == Mat<double>::Constant(3, 2, 2));

  const auto view = FrozenWeight<float>::view(host.data(), 2, 3);
  const auto view_copy = view;
  CHECK(view_copy.stored().data() == host.data());
  CHECK_FALSE(view_copy.is_writable());
}

TEST_CASE("MultiLoRALinear over an (in, out) view serves and trains as over the (out, in) copy", "[weight][multi]") {
  const Index O = 6, I = 5, N = 4;
  const Mat<double> W = random_matrix<double>(O, I, 20);
  const Mat<double> Wt = W.transpose();
  lora::MultiLoRALinear<double> linear(W);
  lora::MultiLoRALinear<double> conv1d(FrozenWeight<double>::view(Wt.data(), O, I, WeightLayout::in_out));
  CHECK(conv1d.frozen_weight().stored().data() == Wt.data());
  for (auto* layer : {&linear, &conv1d}) {
    layer->add_adapter("a", make_config(2, 4), random_matrix<double>(2, I, 21), random_matrix<double>(O, 2, 22));
    layer->add_adapter("b", make_config(3, 3), random_matrix<double>(3, I, 23), random_matrix<double>(O, 3, 24));
  }
  const Mat<double> x = random_matrix<double>(N, I, 25);
  const std::vector<std::string> rows{"a", "__base__", "b", "a"};
  Mat<double> y1(N, O), y2(N, O);
  linear.forward(x, rows, y1);
  conv1d.forward(x, rows, y2);
  CHECK(max_diff(y1, y2) < 1e-12);

  const Mat<double> dy = random_matrix<double>(N, O, 26);
  Mat<double> dx1(N, I), dx2(N, I);
  for (auto* layer : {&linear, &conv1d}) layer->train_adapter("b");
  linear.forward(x, y1);
  conv1d.forward(x, y2);
  linear.backward(x, dy, dx1);
  conv1d.backward(x, dy, dx2);
  CHECK(max_diff(y1, y2) < 1e-12);
  CHECK(max_diff(dx1, dx2) < 1e-12);
  CHECK(max_diff(linear.dA(), conv1d.dA()) < 1e-12);
  CHECK(max_diff(linear.dB(), conv1d.dB()) < 1e-12);
  CHECK(Wt == Mat<double>(W.transpose()));  // never written
}

TEST_CASE("PEFT files: fan_in_fan_out is written for (in, out) layers and layout mismatches are reported",
          "[weight][peft]") {
  const auto dir = lora_test::scratch_dir("weight-peft");
  const Index O = 6, I = 4;
  const Mat<float> W = random_matrix<float>(O, I, 30);
  const Mat<float> Wt = W.transpose();
  const auto cfg = make_config(2, 4);
  lora::LoRALinear<float> conv1d(FrozenWeight<float>::view(Wt.data(), O, I, WeightLayout::in_out), cfg);
  conv1d.lora_B() = random_matrix<float>(O, 2, 31);
  const std::map<std::string, lora::LoRALinear<float>*> gpt2{{"transformer.h.0.attn.c_proj", &conv1d}};
  lora::peft::save_adapter((dir / "conv1d").string(), gpt2);
  const auto config = lora::peft::AdapterConfig::read((dir / "conv1d" / "adapter_config.json").string());
  CHECK(config.fan_in_fan_out);

  // Back into an (in, out) layer: nothing to report. Into an (out, in) layer over a transposed copy: loaded
  // (A and B do not depend on the layout), and listed.
  lora::LoRALinear<float> back(FrozenWeight<float>::view(Wt.data(), O, I, WeightLayout::in_out), cfg);
  const auto report =
      lora::peft::load_adapter((dir / "conv1d").string(),
                               std::map<std::string, lora::LoRALinear<float>*>{{"transformer.h.0.attn.c_proj", &back}});
  CHECK(report.layout_differs.empty());
  CHECK(back.lora_B() == conv1d.lora_B());
  lora::LoRALinear<float> copied(W, cfg);
  const auto mismatch = lora::peft::load_adapter(
      (dir / "conv1d").string(),
      std::map<std::string, lora::LoRALinear<float>*>{{"transformer.h.0.attn.c_proj", &copied}});
  REQUIRE(mismatch.layout_differs == std::vector<std::string>{"transformer.h.0.attn.c_proj"});

  // The multi-adapter writer writes fan_in_fan_out for (in, out) layers too.
  lora::MultiLoRALinear<float> multi(FrozenWeight<float>::view(Wt.data(), O, I, WeightLayout::in_out));
  multi.add_adapter("x", cfg, conv1d.lora_A(), conv1d.lora_B());
  lora::peft::save_adapter(
      (dir / "multi").string(), "x",
      std::map<std::string, lora::MultiLoRALinear<float>*>{{"transformer.h.0.attn.c_proj", &multi}});
  CHECK(lora::peft::AdapterConfig::read((dir / "multi" / "adapter_config.json").string()).fan_in_fan_out);
  std::filesystem::remove_all(dir);
}

}  // namespace unit_weight
