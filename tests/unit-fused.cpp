// FusedLoRALinear: LoRA on output slices of a fused q, k, v projection. Checked against a per-slice reference
// written here (each slice a LoRALinear of its own over its rows of W), against finite differences, through the
// exact single LoRA it saves as (PEFT file and MultiLoRALinear), and on bad input.
#include <catch2/catch.hpp>
#include <lora/fused.hpp>
#include <lora/lora.hpp>

#include "gradient_checks.hpp"
#include "test_files.hpp"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <vector>

// Everything below is in a namespace of its own, so the test files can be compiled together (CMake's
// UNITY_BUILD, tests/CMakeLists.txt) without their helpers clashing.
namespace unit_fused {

using Catch::Contains;
using lora::FrozenWeight;
using lora::FusedSlice;
using lora::Index;
using lora::WeightLayout;
template <class S>
using Mat = lora::Matrix<S>;

namespace {

lora::LoraConfig make_config(int r, double alpha, std::uint64_t seed, double dropout = 0.0) {
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

// GPT-2's c_attn in miniature: d = 4, O = 3d; q at rank 2 (alpha 4), k frozen, v at rank 3 (alpha 6, rsLoRA).
constexpr Index d = 4, O = 3 * d, I = 4;
std::vector<FusedSlice> qkv_slices(double dropout = 0.0) {
  lora::LoraConfig v = make_config(3, 6, 12, dropout);
  v.use_rslora = true;
  return {{"q", d, make_config(2, 4, 11, dropout)}, {"k", d, make_config(0, 8, 0)}, {"v", d, v}};
}

}  // namespace

TEST_CASE("on the own GEMM, fused slices at B = 0 give the base model bit for bit, and otherwise its terms",
          "[fused][kgemm]") {
  // GPT-2's layout at a shape where the forward adds the slices' terms inside the library's own GEMM
  // (detail/kgemm.hpp): 512 rows, 1560 outputs in slices of 520 (not a multiple of its 48-column panels, so
  // panels hold two slices' columns), q at rank 4 and v at rank 2 with other scalings, k frozen.
  const Index N = 512, in = 100, dd = 520;
  const Mat<float> Wt = random_matrix<float>(in, 3 * dd, 41), x = random_matrix<float>(N, in, 42);
  const lora::RowVector<float> bias = random_matrix<float>(1, 3 * dd, 43);
  const auto weight = FrozenWeight<float>::view(Wt.data(), 3 * dd, in, WeightLayout::in_out);
  if (!weight.forward_takes_terms(N)) {
    WARN("this CPU has no AVX-512 (or the build has no x86 kernels): the own GEMM does not run here");
    return;
  }
  auto slices = [&](double dropout) {
    return std::vector<FusedSlice>{{"q", dd, make_config(4, 8, 51, dropout)},
                                   {"k", dd, make_config(0, 8, 0)},
                                   {"v", dd, make_config(2, 8, 52, dropout)}};
  };
  lora::FusedLoRALinear<float> plain(weight, slices(0.0)), biased(weight, slices(0.0), bias);
  Mat<float> base(N, 3 * dd), base_biased(N, 3 * dd), y(N, 3 * dd);
  weight.forward(x, base);
  base_biased.rowwise() = bias;
  weight.forward_add(x, base_biased);  // the base model with its bias, as LoRALinear and the fused layer add it
  for (bool training : {false, true}) {
    INFO((training ? "training" : "eval") << " forward");
    if (training) {
      plain.train();
      biased.train();
    } else {
      plain.eval();
      biased.eval();
    }
    plain.forward(x, y);
    CHECK(y == base);
    biased.forward(x, y);
    CHECK(y == base_biased);
  }
  // With B set, the same layer with the own GEMM turned off (oneDNN or Eigen, the low-rank terms written into y
  // first) and a double reference.
  biased.lora_B(0) = random_matrix<float>(dd, 4, 44);
  biased.lora_B(2) = random_matrix<float>(dd, 2, 45);
  biased.eval();
  biased.forward(x, y);
  lora::detail::KGemm::set_enabled(false);
  Mat<float> off(N, 3 * dd);
  biased.forward(x, off);
  lora::detail::KGemm::set_enabled(true);
  Mat<double> want = x.cast<double>() * Wt.cast<double>();
  want.rowwise() += bias.cast<double>();
  for (std::size_t k : {std::size_t(0), std::size_t(2)})
    want.middleCols(Index(k) * dd, dd) += double(biased.slice_scaling(k)) * x.cast<double>() *
                                          biased.lora_A(k).cast<double>().transpose() *
                                          biased.lora_B(k).cast<double>().transpose();
  CHECK(max_diff(y.cast<double>(), want) < 1e-4);
  CHECK(max_diff(y.cast<double>(), off.cast<double>()) < 1e-4);
  CHECK(y != off);  // the two paths did run: their roundings differ somewhere
  // Training with dropout: two layers with the same seed draw the same masks, so the own GEMM's forward and the
  // other path's give the same y (to rounding) and the same gradients after one backward.
  lora::FusedLoRALinear<float> on(weight, slices(0.2), bias), other(weight, slices(0.2), bias);
  for (auto* layer : {&on, &other}) {
    layer->lora_B(0) = biased.lora_B(0);
    layer->lora_B(2) = biased.lora_B(2);
  }
  const Mat<float> dy = random_matrix<float>(N, 3 * dd, 46);
  Mat<float> y_on(N, 3 * dd), y_other(N, 3 * dd), dx_on(N, in), dx_other(N, in);
  on.forward(x, y_on);
  on.backward(x, dy, dx_on);
  lora::detail::KGemm::set_enabled(false);
  other.forward(x, y_other);
  other.backward(x, dy, dx_other);
  lora::detail::KGemm::set_enabled(true);
  CHECK(max_diff(y_on.cast<double>(), y_other.cast<double>()) < 1e-4);
  CHECK(max_diff(dx_on.cast<double>(), dx_other.cast<double>()) < 1e-3);
  lora_test::check_same_gradients(on, other, 1e-3f);
}

TEST_CASE("on the own GEMM over W (O, I) two blocks deep, B = 0, frozen slices and W + b give the same bits",
          "[fused][kgemm]") {
  // W stored (O, I), read transposed by the own GEMM, at a depth of 1100 (two of its blocks): the bias is added
  // after W's whole sum whether the layer has adapters at B = 0 or none (all slices frozen), as W's product and
  // then += b do.
  const Index N = 64, in = 1100, dd = 300;
  const Mat<float> W = random_matrix<float>(3 * dd, in, 61), x = random_matrix<float>(N, in, 62);
  const lora::RowVector<float> bias = random_matrix<float>(1, 3 * dd, 63);
  const auto weight = FrozenWeight<float>::view(W.data(), 3 * dd, in);
  if (!weight.forward_takes_terms(N)) {
    WARN("this CPU has no AVX-512 (or the build has no x86 kernels): the own GEMM does not run here");
    return;
  }
  const lora::LoraConfig frozen = make_config(0, 8, 0);
  lora::FusedLoRALinear<float> adapted(
      weight, {{"q", dd, make_config(4, 8, 71)}, {"k", dd, frozen}, {"v", dd, make_config(2, 8, 72)}}, bias),
      none(weight, {{"q", dd, frozen}, {"k", dd, frozen}, {"v", dd, frozen}}, bias);
  Mat<float> base(N, 3 * dd), y_adapted(N, 3 * dd), y_none(N, 3 * dd);
  weight.forward(x, base);
  base.rowwise() += bias;
  for (bool training : {false, true}) {
    INFO((training ? "training" : "eval") << " forward");
    if (training) {
      adapted.train();
      none.train();
    } else {
      adapted.eval();
      none.eval();
    }
    adapted.forward(x, y_adapted);
    none.forward(x, y_none);
    CHECK(y_adapted == base);
    CHECK(y_none == base);
  }
}

TEST_CASE("fused q, k, v with adapters on q and v equal one LoRALinear per slice", "[fused]") {
  const Mat<double> W = random_matrix<double>(O, I, 1), b = random_matrix<double>(1, O, 2);
  const Mat<double> Wt = W.transpose();  // GPT-2 stores c_attn (I, O)
  // 5 rows, and 150: forward and backward work in blocks of 64 rows, the last one partial.
  const Index N = GENERATE(Index(5), Index(150));
  CAPTURE(N);
  const Mat<double> x = random_matrix<double>(N, I, 3), dy = random_matrix<double>(N, O, 4);
  lora::FusedLoRALinear<double> fused(FrozenWeight<double>::view(Wt.data(), O, I, WeightLayout::in_out), qkv_slices(),
                                      b);
  REQUIRE(fused.rank() == 5);
  CHECK(fused.parameter_count().trainable == 5 * I + d * 2 + d * 3);
  const std::size_t q = fused.slice_index("q"), k = fused.slice_index("k"), v = fused.slice_index("v");
  fused.lora_B(q) = random_matrix<double>(d, 2, 5);
  fused.lora_B(v) = random_matrix<double>(d, 3, 6);
  CHECK(fused.lora_B(k).size() == 0);

  // The reference: q and v as LoRALinear layers over their own rows of W (O, I), with the same A and B; k the
  // plain product. Written without the fused code.
  auto slice_layer = [&](std::size_t s, Index first) {
    lora::LoRALinear<double> layer(Mat<double>(W.middleRows(first, d)), Mat<double>(b.middleCols(first, d)),
                                   fused.slices()[s].config);
    layer.lora_A() = fused.lora_A(s);
    layer.lora_B() = fused.lora_B(s);
    return layer;
  };
  auto ref_q = slice_layer(q, 0), ref_v = slice_layer(v, 2 * d);
  Mat<double> y(N, O), y_ref(N, O), dx(N, I);
  fused.forward(x, y);
  y_ref.middleCols(0, d) = ref_q.forward(x);
  y_ref.middleCols(d, d) = (x * W.middleRows(d, d).transpose()).rowwise() + b.middleCols(d, d).row(0);
  y_ref.middleCols(2 * d, d) = ref_v.forward(x);
  CHECK(max_diff(y, y_ref) < 1e-12);

  fused.backward(x, dy, dx);
  Mat<double> dx_q(N, I), dx_v(N, I);
  ref_q.backward(x, dy.middleCols(0, d), dx_q);
  ref_v.backward(x, dy.middleCols(2 * d, d), dx_v);
  // dx = dy W, split by slices: each reference layer gives dy_s W_s + its LoRA path, k gives dy_k W_k.
  const Mat<double> dx_ref = dx_q + dy.middleCols(d, d) * W.middleRows(d, d) + dx_v;
  CHECK(max_diff(dx, dx_ref) < 1e-12);
  CHECK(max_diff(fused.dA(q), ref_q.dA()) < 1e-12);
  CHECK(max_diff(fused.dB(q), ref_q.dB()) < 1e-12);
  CHECK(max_diff(fused.dA(v), ref_v.dA()) < 1e-12);
  CHECK(max_diff(fused.dB(v), ref_v.dB()) < 1e-12);
  CHECK(fused.parameters().size() == 4);
  CHECK(fused.parameters()[2].name == "v.lora_A");

  fused.eval();
  Mat<double> y_eval(N, O);
  std::as_const(fused).forward(x, y_eval);
  CHECK(max_diff(y_eval, y_ref) < 1e-12);
}

TEST_CASE("fused float forward over W (O, I) and W (I, O), with and without a bias", "[fused]") {
  // The float layer's products (oneDNN's sgemm in the README's build) over either layout give the same y as
  // x Wᵀ + b + Σ s_k H_k B_kᵀ computed here in double from the layer's own A, B and scalings.
  constexpr Index dd = 16, II = 24, OO = 3 * dd, N = 37;
  const Mat<float> W = random_matrix<float>(OO, II, 40), Wt = W.transpose(), b = random_matrix<float>(1, OO, 41);
  const Mat<float> x = random_matrix<float>(N, II, 42);
  const std::vector<FusedSlice> slices = {
      {"q", dd, make_config(4, 8, 43)}, {"k", dd, make_config(0, 8, 0)}, {"v", dd, make_config(2, 4, 44)}};
  const bool in_out = GENERATE(false, true), with_bias = GENERATE(false, true);
  CAPTURE(in_out, with_bias);
  const auto weight = in_out ? FrozenWeight<float>::view(Wt.data(), OO, II, WeightLayout::in_out)
                             : FrozenWeight<float>::view(W.data(), OO, II);
  lora::FusedLoRALinear<float> fused(weight, slices, with_bias ? b : Mat<float>(1, 0));
  fused.lora_B(0) = random_matrix<float>(dd, 4, 45);
  fused.lora_B(2) = random_matrix<float>(dd, 2, 46);

  Mat<double> y_ref = x.cast<double>() * W.cast<double>().transpose();
  if (with_bias) y_ref.rowwise() += b.cast<double>().row(0);
  for (std::size_t k : {std::size_t(0), std::size_t(2)})
    y_ref.middleCols(fused.slice_offset(k), dd) += double(fused.slice_scaling(k)) * x.cast<double>() *
                                                   fused.lora_A(k).cast<double>().transpose() *
                                                   fused.lora_B(k).cast<double>().transpose();
  Mat<float> y(N, OO);
  y.setConstant(std::numeric_limits<float>::quiet_NaN());  // every entry must be written, none read
  fused.forward(x, y);
  CHECK(y.allFinite());
  CHECK(max_diff(y.cast<double>(), y_ref) < 1e-4);
  fused.eval();
  y.setConstant(std::numeric_limits<float>::quiet_NaN());
  std::as_const(fused).forward(x, y);
  CHECK(y.allFinite());
  CHECK(max_diff(y.cast<double>(), y_ref) < 1e-4);
}

TEST_CASE("fused gradients match finite differences, with dropout", "[fused][gradcheck]") {
  const Mat<double> W = random_matrix<double>(O, I, 7);
  lora::FusedLoRALinear<double> fused(FrozenWeight<double>::owned(W), qkv_slices(0.25));
  fused.lora_B(0) = random_matrix<double>(d, 2, 8);
  fused.lora_B(2) = random_matrix<double>(d, 3, 9);
  const Index N = GENERATE(Index(3), Index(70));  // 70: two blocks of rows
  CAPTURE(N);
  Mat<double> x = random_matrix<double>(N, I, 10);
  const Mat<double> P = random_matrix<double>(N, O, 11);
  // loss = Σ P ⊙ y, with the dropout mask held fixed: every evaluation reseeds it the same way.
  Mat<double> y(N, O), dx(N, I);
  auto loss = [&] {
    fused.set_dropout_seed(42);
    fused.forward(x, y);
    return y.cwiseProduct(P).sum();
  };
  loss();
  fused.zero_grad();
  fused.backward(x, P, dx);
  auto params = fused.parameters();
  for (auto& p : params) {
    const Mat<double> analytic = Eigen::Map<const Mat<double>>(p.grad, p.rows, p.cols);
    const auto result = lora::check_gradient(loss, p.value, analytic.data(), p.rows * p.cols);
    INFO(p.name << ": " << result.describe(p.name));
    CHECK(result.ok());
  }
  const Mat<double> dx_analytic = dx;
  const auto result = lora::check_gradient(loss, x.data(), dx_analytic.data(), x.size());
  INFO(result.describe("dx"));
  CHECK(result.ok());
}

TEST_CASE("fused merge adds each slice's s B A to its rows only, and unmerge takes it back", "[fused][merge]") {
  Mat<double> W = random_matrix<double>(O, I, 12);
  const Mat<double> original = W;
  lora::FusedLoRALinear<double> fused(FrozenWeight<double>::mutable_view(W.data(), O, I), qkv_slices());
  fused.lora_B(0) = random_matrix<double>(d, 2, 13);
  fused.lora_B(2) = random_matrix<double>(d, 3, 14);
  const Mat<double> x = random_matrix<double>(3, I, 15);
  fused.eval();
  const Mat<double> unmerged = [&] {
    Mat<double> y(3, O);
    std::as_const(fused).forward(x, y);
    return y;
  }();
  fused.merge();
  const double s_q = 4.0 / 2, s_v = 6.0 / std::sqrt(3.0);
  CHECK(max_diff(W.topRows(d), original.topRows(d) + s_q * fused.lora_B(0) * fused.lora_A(0)) < 1e-14);
  CHECK(W.middleRows(d, d) == original.middleRows(d, d));  // k untouched, bit for bit
  CHECK(max_diff(W.bottomRows(d), original.bottomRows(d) + s_v * fused.lora_B(2) * fused.lora_A(2)) < 1e-14);
  Mat<double> merged(3, O);
  std::as_const(fused).forward(x, merged);
  CHECK(max_diff(merged, unmerged) < 1e-12);
  fused.unmerge();
  CHECK(max_diff(W, original) < 1e-14);

  SECTION("a non-finite v is refused before q is written") {
    fused.lora_B(2)(1, 1) = std::numeric_limits<double>::infinity();
    const Mat<double> before = W;
    REQUIRE_THROWS_AS(fused.merge(), lora::numeric_error);
    CHECK(W == before);
    CHECK_FALSE(fused.is_merged());
  }
  SECTION("a read-only view refuses") {
    lora::FusedLoRALinear<double> view(FrozenWeight<double>::view(W.data(), O, I), qkv_slices());
    view.lora_B(0).setOnes();
    const Mat<double> before = W;
    REQUIRE_THROWS_AS(view.merge(), lora::state_error);
    CHECK(W == before);
  }
}

TEST_CASE("fused slices save as one exact LoRA on the fused module, and come back", "[fused][peft]") {
  const auto dir = lora_test::scratch_dir("fused-peft");
  const Mat<float> Wt = random_matrix<float>(I, O, 16);  // c_attn as GPT-2 stores it
  const auto weight = FrozenWeight<float>::view(Wt.data(), O, I, WeightLayout::in_out);
  lora::FusedLoRALinear<float> fused(weight, qkv_slices());
  fused.lora_B(0) = random_matrix<float>(d, 2, 17);
  fused.lora_B(2) = random_matrix<float>(d, 3, 18);
  fused.eval();
  const Mat<float> x = random_matrix<float>(4, I, 19);
  Mat<float> y_fused(4, O);
  std::as_const(fused).forward(x, y_fused);

  const std::string path = "transformer.h.0.attn.c_attn";
  auto single = fused.to_lora();
  CHECK(single.rank() == 5);
  CHECK(single.scaling() == 1.0f);
  CHECK(single.lora_B().block(d, 0, d, 5).isZero(0));  // k has no adapter
  CHECK(single.lora_B().block(0, 2, d, 3).isZero(0));  // q's rows, v's columns
  CHECK(max_diff(std::as_const(single).forward(x).cast<double>(), y_fused.cast<double>()) < 1e-5);
  lora::peft::save_adapter((dir / "qkv").string(), std::map<std::string, lora::LoRALinear<float>*>{{path, &single}});
  const auto config = lora::peft::AdapterConfig::read((dir / "qkv" / "adapter_config.json").string());
  CHECK(config.r == 5);
  CHECK(config.fan_in_fan_out);

  // lora-merge's merge_into applies the file to the checkpoint's (I, O) tensor exactly as the slices would.
  const auto adapter = lora::peft::read_adapter<double>((dir / "qkv").string());
  Mat<double> merged = Wt.cast<double>();
  lora::peft::merge_into<double>(merged, *adapter.find(path), 1.0, config.fan_in_fan_out);
  Mat<double> by_slices = Wt.cast<double>();
  for (std::size_t k : {std::size_t(0), std::size_t(2)})
    by_slices.middleCols(fused.slice_offset(k), d) +=
        (double(fused.slice_scaling(k)) * fused.lora_B(k).cast<double>() * fused.lora_A(k).cast<double>()).transpose();
  CHECK(max_diff(merged, by_slices) < 1e-5);

  // Read back: a LoRALinear over the same weight loads the file, and the slices come out of it.
  lora::LoRALinear<float> loaded(weight.read_only_view(), config.layer_config(path));
  lora::peft::load_adapter((dir / "qkv").string(), std::map<std::string, lora::LoRALinear<float>*>{{path, &loaded}});
  lora::FusedLoRALinear<float> back(weight.read_only_view(), qkv_slices());
  back.from_lora(loaded);
  CHECK(max_diff(back.lora_A(0).cast<double>(), fused.lora_A(0).cast<double>()) == 0);
  CHECK(max_diff(back.lora_B(0).cast<double>(), fused.lora_B(0).cast<double>()) < 1e-6);
  CHECK(max_diff(back.lora_B(2).cast<double>(), fused.lora_B(2).cast<double>()) < 1e-6);

  SECTION("a LoRA that mixes slices is refused, naming the entry, and nothing changes") {
    loaded.lora_B()(d + 1, 0) = 0.5f;  // k's row, q's column
    const Mat<float> before = back.lora_B(0);
    REQUIRE_THROWS_AS(back.from_lora(loaded), lora::config_error);
    REQUIRE_THROWS_WITH(back.from_lora(loaded), Contains("lora_B[5, 0]") && Contains("slice \"k\""));
    CHECK(back.lora_B(0) == before);
  }
  SECTION("a rank that is not the slices' sum is refused") {
    lora::LoRALinear<float> other(weight.read_only_view(), make_config(4, 4, 1));
    REQUIRE_THROWS_WITH(back.from_lora(other), Contains("rank 4") && Contains("need rank 5"));
  }
  SECTION("the same adapter serves in a MultiLoRALinear's mixed batch") {
    lora::MultiLoRALinear<float> multi(weight.read_only_view());
    multi.add_adapter("qv", single.config(), single.lora_A(), single.lora_B());
    Mat<float> y(4, O);
    multi.forward(x, std::vector<std::string>{"qv", "__base__", "qv", "__base__"}, y);
    CHECK(max_diff(y.row(0).cast<double>(), y_fused.row(0).cast<double>()) < 1e-5);
    CHECK(max_diff(y.row(1).cast<double>(), (x.row(1) * Wt).cast<double>()) < 1e-5);
    CHECK(max_diff(y.row(2).cast<double>(), y_fused.row(2).cast<double>()) < 1e-5);
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("fused layers refuse bad slices with the slice named", "[fused]") {
  const Mat<float> W = Mat<float>::Zero(O, I);
  auto make = [&](std::vector<FusedSlice> slices) {
    return lora::FusedLoRALinear<float>(FrozenWeight<float>::owned(W), std::move(slices));
  };
  REQUIRE_THROWS_WITH(make({{"q", d, make_config(2, 4, 1)}, {"v", d, make_config(2, 4, 1)}}),
                      Contains("8 outputs in all, the weight has 12"));
  REQUIRE_THROWS_WITH(make({{"q", d, {}}, {"q", d, {}}, {"v", d, {}}}), Contains("two slices are named \"q\""));
  REQUIRE_THROWS_WITH(make({{"", O, {}}}), Contains("slice 0 has no name"));
  REQUIRE_THROWS_WITH(make({{"q", d, make_config(2, 4, 1, 0.1)}, {"k", d, {}}, {"v", d, make_config(2, 4, 1, 0.2)}}),
                      Contains("one dropout mask"));
  lora::LoraConfig bias_all = make_config(2, 4, 1);
  bias_all.bias = lora::BiasMode::all;
  REQUIRE_THROWS_WITH(make({{"q", d, bias_all}, {"k", d, {}}, {"v", d, {}}}), Contains("bias must be none"));
  auto fused = make(qkv_slices());
  REQUIRE_THROWS_WITH(fused.slice_index("o"), Contains("\"q\", \"k\", \"v\""));
  Mat<float> x(2, I), y(2, O - 1);
  REQUIRE_THROWS_AS(fused.forward(x, y), lora::shape_error);
}

TEST_CASE("an adapter PEFT wrote with q, v slices and an embedding loads, gives PyTorch's outputs, saves back exactly",
          "[fused][embedding][peft][golden]") {
  // tests/golden/make_sliced_golden.py: a tiny GPT-2 (V = 10, d = 6) whose c_attn holds LoRA on its q and v
  // slices (rank 4 each, alpha 8) as one LoRA on the fused module, an embedding LoRA on wte, LoRA on c_proj.
  namespace st = lora::safetensors;
  const std::string golden = std::string(LORA_TEST_DATA_DIR) + "/peft/sliced";
  const auto base = st::File::open(golden + "/base.safetensors");
  const auto forward = st::File::open(golden + "/forward.safetensors");
  const auto config = lora::peft::AdapterConfig::read(golden + "/adapter/adapter_config.json");
  constexpr Index V = 10, D = 6;
  const auto slices = [&] {
    lora::LoraConfig c = config.layer_config("transformer.h.0.attn.c_attn");
    c.r = 4;
    c.lora_alpha = 8;
    lora::LoraConfig frozen;
    frozen.r = 0;
    return std::vector<FusedSlice>{{"q", D, c}, {"k", D, frozen}, {"v", D, c}};
  };

  // Every weight viewed in place in the mmap'd base: Conv1D (in, out) as GPT-2 stores it.
  std::map<std::string, lora::LoRALinear<float>*> linears;
  std::vector<std::unique_ptr<lora::LoRALinear<float>>> layers;
  std::vector<std::unique_ptr<lora::FusedLoRALinear<float>>> fused;
  for (int layer = 0; layer < 2; ++layer) {
    const std::string h = "h." + std::to_string(layer) + ".attn.";
    const auto attn = base.view<float>(h + "c_attn.weight");
    REQUIRE(attn.rows() == D);
    REQUIRE(attn.cols() == 3 * D);
    fused.push_back(std::make_unique<lora::FusedLoRALinear<float>>(
        FrozenWeight<float>::view(attn.data(), 3 * D, D, WeightLayout::in_out), slices(),
        base.matrix<float>(h + "c_attn.bias")));
    const std::string attn_path = "transformer." + h + "c_attn";
    layers.push_back(std::make_unique<lora::LoRALinear<float>>(fused.back()->frozen_weight().read_only_view(),
                                                               config.layer_config(attn_path)));
    linears[attn_path] = layers.back().get();
    const auto proj = base.view<float>(h + "c_proj.weight");
    const std::string proj_path = "transformer." + h + "c_proj";
    layers.push_back(std::make_unique<lora::LoRALinear<float>>(
        FrozenWeight<float>::view(proj.data(), D, D, WeightLayout::in_out), config.layer_config(proj_path)));
    linears[proj_path] = layers.back().get();
  }
  const auto table = base.view<float>("wte.weight");
  lora::LoRAEmbedding<float> wte(FrozenWeight<float>::view(table.data(), D, V, WeightLayout::in_out),
                                 config.layer_config("transformer.wte"));
  const std::map<std::string, lora::LoRAEmbedding<float>*> embeddings{{"transformer.wte", &wte}};
  const auto report = lora::peft::load_adapter(golden + "/adapter", linears, embeddings);
  CHECK(report.loaded.size() == 5);
  CHECK(report.layout_differs.empty());

  // The fused modules' LoRA is one adapter per slice: the slices come out of it, and give PyTorch's y.
  for (int layer = 0; layer < 2; ++layer) {
    const std::string path = "transformer.h." + std::to_string(layer) + ".attn.c_attn";
    CAPTURE(path);
    fused[layer]->from_lora(*linears.at(path));
    fused[layer]->eval();
    const Mat<float> x = forward.matrix<float>(path + ".x");
    Mat<float> y(x.rows(), 3 * D);
    std::as_const(*fused[layer]).forward(x, y);
    CHECK(max_diff(y.cast<double>(), forward.matrix<double>(path + ".y")) < 1e-5);
  }
  const auto& ids_info = forward.at("transformer.wte.ids");  // I64, as torch writes token ids
  REQUIRE(ids_info.dtype == st::Dtype::I64);
  std::vector<std::int64_t> ids64(ids_info.nbytes() / sizeof(std::int64_t));
  std::memcpy(ids64.data(), forward.bytes(ids_info), ids_info.nbytes());
  const std::vector<Index> ids(ids64.begin(), ids64.end());
  wte.eval();
  CHECK(max_diff(wte.forward(ids).cast<double>(), forward.matrix<double>("transformer.wte.y")) < 1e-5);

  // Saved back from the slices (to_lora) and the embedding: both files byte for byte as PEFT wrote them.
  std::vector<lora::LoRALinear<float>> singles;
  singles.reserve(2);
  std::map<std::string, lora::LoRALinear<float>*> to_save = linears;
  for (int layer = 0; layer < 2; ++layer) {
    singles.push_back(fused[layer]->to_lora());
    CHECK(singles.back().scaling() == 2.0f);  // the slices share scaling 2, so B keeps each B_k as it is
    to_save["transformer.h." + std::to_string(layer) + ".attn.c_attn"] = &singles.back();
  }
  const auto dir = lora_test::scratch_dir("sliced-peft");
  lora::peft::save_adapter((dir / "out").string(), to_save, embeddings, config);
  for (const char* name : {"adapter_model.safetensors", "adapter_config.json"}) {
    CAPTURE(name);
    CHECK(lora_test::read_bytes((dir / "out" / name).string()) == lora_test::read_bytes(golden + "/adapter/" + name));
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("output_blocks finds the slices in a fused LoRA's B, and nothing in an ordinary B", "[fused]") {
  const Mat<float> Wt = random_matrix<float>(I, O, 21);
  lora::FusedLoRALinear<float> fused(FrozenWeight<float>::view(Wt.data(), O, I, WeightLayout::in_out), qkv_slices());
  fused.lora_B(0) = random_matrix<float>(d, 2, 22);
  fused.lora_B(2) = random_matrix<float>(d, 3, 23);
  Mat<float> B = fused.to_lora().lora_B();
  B(1, 0) = 0;  // a zero inside q's block changes nothing
  const auto blocks = lora::output_blocks(B);
  REQUIRE(blocks.size() == 3);
  CHECK(
      (blocks[0].out_begin == 0 && blocks[0].out_count == d && blocks[0].rank_begin == 0 && blocks[0].rank_count == 2));
  CHECK((blocks[1].out_begin == d && blocks[1].out_count == d && blocks[1].rank_count == 0));
  CHECK((blocks[2].out_begin == 2 * d && blocks[2].out_count == d && blocks[2].rank_begin == 2 &&
         blocks[2].rank_count == 3));
  // Adjacent adapted slices with no frozen one between them are told apart by their columns.
  Mat<float> qv = Mat<float>::Zero(4, 3);
  qv.topLeftCorner(2, 1).setOnes();
  qv.bottomRightCorner(2, 2).setOnes();
  const auto two = lora::output_blocks(qv);
  REQUIRE(two.size() == 2);
  CHECK((two[1].out_begin == 2 && two[1].rank_begin == 1 && two[1].rank_count == 2));

  CHECK(lora::output_blocks(random_matrix<float>(O, 5, 24)).empty());  // an ordinary LoRA's B
  CHECK(lora::output_blocks(Mat<float>::Zero(O, 5)).empty());          // a new adapter's B
  Mat<float> k_uses_v = B;
  k_uses_v(d + 1, 4) = 0.5f;  // a row of k uses one of v's columns: not slices
  CHECK(lora::output_blocks(k_uses_v).empty());
  Mat<float> q_reaches_v = B;
  q_reaches_v(1, 3) = 0.25f;  // a row of q reaches into v's columns
  CHECK(lora::output_blocks(q_reaches_v).empty());
  Mat<float> dense_gap = random_matrix<float>(O, 5, 25);
  dense_gap.row(3).setZero();  // a zero row inside an ordinary B: the runs around it share every column
  CHECK(lora::output_blocks(dense_gap).empty());
}

}  // namespace unit_fused
