// FusedLoRALinear: LoRA on output slices of a fused q, k, v projection. Checked against a per-slice reference
// written here (each slice a LoRALinear of its own over its rows of W), against finite differences, through the
// exact single LoRA it saves as (PEFT file and MultiLoRALinear), and on bad input.
#include <catch2/catch.hpp>
#include <lora/fused.hpp>
#include <lora/lora.hpp>

#include "test_files.hpp"

#include <cstdlib>
#include <limits>
#include <map>
#include <string>
#include <vector>

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

TEST_CASE("fused q, k, v with adapters on q and v equal one LoRALinear per slice", "[fused]") {
  const Mat<double> W = random_matrix<double>(O, I, 1), b = random_matrix<double>(1, O, 2);
  const Mat<double> Wt = W.transpose();  // GPT-2 stores c_attn (I, O)
  const Index N = 5;
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

TEST_CASE("fused gradients match finite differences, with dropout", "[fused][gradcheck]") {
  const Mat<double> W = random_matrix<double>(O, I, 7);
  lora::FusedLoRALinear<double> fused(FrozenWeight<double>::owned(W), qkv_slices(0.25));
  fused.lora_B(0) = random_matrix<double>(d, 2, 8);
  fused.lora_B(2) = random_matrix<double>(d, 3, 9);
  const Index N = 3;
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
