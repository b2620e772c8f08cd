// Checkpoints: a run resumed from one continues bit for bit (AdamW and SGD,
// float and double, a Sequential and a map of layers); the file's layout;
// refusals (shapes, missing tensors, optimizer kind, damaged and hostile
// files) that leave the model and the optimizer as they were; atomic saves.
#include <catch2/catch.hpp>
#include <lora/lora.hpp>

#include <nlohmann/json.hpp>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "test_files.hpp"

// Everything below is in a namespace of its own, so the test files can be compiled together (CMake's
// UNITY_BUILD, tests/CMakeLists.txt) without their helpers clashing.
namespace unit_checkpoint {

namespace fs = std::filesystem;
namespace st = lora::safetensors;
using Catch::Contains;
using lora::Index;
template <class S>
using Mat = lora::Matrix<S>;

namespace {

// ---- the training run ------------------------------------------------------------

// Deterministic test data (no std::rand, no std distributions).
template <class S>
Mat<S> smooth_matrix(Index rows, Index cols, double seed, double scale = 1.0) {
  Mat<S> m(rows, cols);
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j)
      m(i, j) = static_cast<S>(scale * std::sin(1.3 * static_cast<double>(i) + 0.7 * static_cast<double>(j) + seed));
  return m;
}

struct ModelShape {
  int r0 = 4, r2 = 2;
  double alpha0 = 8;
  double base_seed = 0.1;  // the frozen W and b
};

// 10 -> 12 (r 4, trained bias) -> GELU -> 6 (r 2), dropout 0.25 in both LoRA layers. The frozen
// weights depend on `shape` only; `seed` sets A, B (init "random": B is not zero) and the dropout streams.
template <class S>
lora::Sequential<S> make_model(std::uint64_t seed, const ModelShape& shape = {}) {
  lora::LoraConfig c0;
  c0.r = shape.r0;
  c0.lora_alpha = shape.alpha0;
  c0.lora_dropout = 0.25;
  c0.bias = lora::BiasMode::all;
  c0.init_lora_weights = lora::InitLoraWeights::random;
  c0.seed = seed;
  lora::LoraConfig c2 = c0;
  c2.r = shape.r2;
  c2.lora_alpha = 4;
  c2.bias = lora::BiasMode::none;
  c2.seed = seed + 1;
  lora::Sequential<S> model;
  model.add(lora::LoRALinear<S>(smooth_matrix<S>(12, 10, shape.base_seed, 0.3),
                                smooth_matrix<S>(1, 12, shape.base_seed + 1, 0.1), c0));
  model.add(lora::GELU{});
  model.add(lora::LoRALinear<S>(smooth_matrix<S>(6, 12, shape.base_seed + 2, 0.3), c2));
  return model;
}

template <class S>
typename lora::AdamW<S>::Options adamw_options(double weight_decay = 0.05) {
  typename lora::AdamW<S>::Options o;
  o.lr = 0.02;
  o.beta1 = 0.8;
  o.beta2 = 0.95;
  o.eps = 1e-6;
  o.weight_decay = weight_decay;
  return o;
}

template <class S>
typename lora::SGD<S>::Options sgd_options(double momentum = 0.9) {
  typename lora::SGD<S>::Options o;
  o.lr = 0.05;
  o.momentum = momentum;
  o.weight_decay = 0.01;
  o.nesterov = momentum > 0;
  return o;
}

constexpr long total_steps = 20, warmup_steps = 4, batches_per_epoch = 5, batch_rows = 8;

// A model, its optimizer, the caller's own generator and the loop's position. Not movable: the
// optimizer points into the model.
template <class S, class Opt>
struct Run {
  lora::Sequential<S> model;
  Opt opt;
  std::mt19937_64 rng;
  lora::TrainingState state;
  std::vector<S> losses;

  Run(std::uint64_t seed, const typename Opt::Options& options, const ModelShape& shape = {})
      : model(make_model<S>(seed, shape)), opt(model.parameters(), options), rng(seed) {}
  Run(const Run&) = delete;
  Run& operator=(const Run&) = delete;

  // Steps until state.step == until: the lr from a cosine schedule with warmup, the batch from
  // (epoch, batch), one row of it negated as chosen by the caller's generator, clipping at 0.5.
  void train_until(long until) {
    const Mat<S> data_x = smooth_matrix<S>(batches_per_epoch * batch_rows, 10, 3.0);
    const Mat<S> data_y = smooth_matrix<S>(batches_per_epoch * batch_rows, 6, 4.0, 0.5);
    Mat<S> x(batch_rows, 10), target(batch_rows, 6), dy(batch_rows, 6);
    for (; state.step < until; ++state.step) {
      opt.set_lr(base_lr() * lora::cosine_schedule_with_warmup(state.step, warmup_steps, total_steps));
      x = data_x.middleRows(state.batch * batch_rows, batch_rows);
      target = data_y.middleRows(state.batch * batch_rows, batch_rows) * static_cast<S>(1 + 0.25 * state.epoch);
      x.row(static_cast<Index>(rng() % batch_rows)) *= S(-1);
      model.zero_grad();
      const Mat<S>& y = model.forward(x);
      losses.push_back(lora::mse_loss<S>(y, target, dy));
      model.backward(dy);
      lora::clip_grad_norm(opt.parameters(), 0.5);
      opt.step();
      if (++state.batch == batches_per_epoch) {
        state.batch = 0;
        ++state.epoch;
      }
    }
  }
  static double base_lr() { return std::is_same_v<Opt, lora::AdamW<S>> ? 0.02 : 0.05; }

  void save(const std::string& path) {
    std::ostringstream text;
    text << rng;
    state.rng = text.str();
    lora::save_checkpoint(path, model, opt, state);
  }
  void load(const std::string& path) {
    state = lora::load_checkpoint(path, model, opt);
    std::istringstream text(state.rng);
    text >> rng;
    REQUIRE(text);
  }
};

// ---- bits ------------------------------------------------------------------------------------

template <class T>
void append_bits(std::vector<std::uint8_t>& out, const T* p, std::size_t n) {
  const auto* b = reinterpret_cast<const std::uint8_t*>(p);
  out.insert(out.end(), b, b + n * sizeof(T));
}

template <class S>
void append_options(std::vector<std::uint8_t>& out, const typename lora::AdamW<S>::Options& o) {
  for (double v : {o.lr, o.beta1, o.beta2, o.eps, o.weight_decay}) append_bits(out, &v, 1);
}
template <class S>
void append_options(std::vector<std::uint8_t>& out, const typename lora::SGD<S>::Options& o) {
  for (double v : {o.lr, o.momentum, o.dampening, o.weight_decay, o.nesterov ? 1.0 : 0.0}) append_bits(out, &v, 1);
}

template <class S>
std::vector<lora::LoRALinear<S>*> linears(lora::Sequential<S>& model) {
  std::vector<lora::LoRALinear<S>*> out;
  for (std::size_t i = 0; i < model.size(); ++i)
    if (auto* l = std::get_if<lora::LoRALinear<S>>(&model[i])) out.push_back(l);
  return out;
}

// Every bit of the model a checkpoint covers (trainable tensors, dropout streams), and the gradients.
template <class S>
std::vector<std::uint8_t> model_bits(lora::Sequential<S>& model, bool with_grads = true) {
  std::vector<std::uint8_t> out;
  for (const auto& p : model.parameters()) {
    append_bits(out, p.value, static_cast<std::size_t>(p.size()));
    if (with_grads) append_bits(out, p.grad, static_cast<std::size_t>(p.size()));
  }
  for (auto* l : linears(model)) append_bits(out, l->dropout_rng_state().data(), 4);
  return out;
}

// The optimizer's whole state: options, step count, buffers.
template <class Opt>
std::vector<std::uint8_t> optimizer_bits(const Opt& opt) {
  using S = std::remove_reference_t<decltype(*opt.parameters()[0].value)>;
  std::vector<std::uint8_t> out;
  append_options<S>(out, opt.options());
  const long step = opt.step_count();
  append_bits(out, &step, 1);
  const auto& s = opt.state();
  if constexpr (std::is_same_v<Opt, lora::AdamW<S>>) {
    for (const auto& m : s.exp_avg) append_bits(out, m.data(), static_cast<std::size_t>(m.size()));
    for (const auto& v : s.exp_avg_sq) append_bits(out, v.data(), static_cast<std::size_t>(v.size()));
  } else {
    for (const auto& b : s.momentum_buffer) append_bits(out, b.data(), static_cast<std::size_t>(b.size()));
  }
  return out;
}

template <class S>
std::vector<std::uint8_t> loss_bits(const std::vector<S>& losses, std::size_t begin, std::size_t end) {
  std::vector<std::uint8_t> out;
  append_bits(out, losses.data() + begin, end - begin);
  return out;
}

// "" when a and b hold the same bits, else where they first differ (readable where Catch would print bytes).
std::string first_difference(const std::vector<std::uint8_t>& a, const std::vector<std::uint8_t>& b) {
  if (a.size() != b.size()) return std::to_string(a.size()) + " bytes against " + std::to_string(b.size());
  for (std::size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i]) return "byte " + std::to_string(i) + " of " + std::to_string(a.size()) + " differs";
  return "";
}

template <class S>
const char* dtype_name() {
  return std::is_same_v<S, float> ? "F32" : "F64";
}

// ---- files -------------------------------------------------------------------------------------

void write_bytes(const std::string& path, const std::vector<std::uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

// Copies checkpoint `in` to `out` with its tensors and "lora_checkpoint" JSON passed through `edit`.
void rewrite(const std::string& in, const std::string& out,
             const std::function<void(nlohmann::json& meta, std::set<std::string>& drop)>& edit,
             const std::function<void(st::Writer&)>& add = {}) {
  const auto file = st::File::open(in);
  auto meta = nlohmann::json::parse(file.metadata().at("lora_checkpoint"));
  std::set<std::string> drop;
  edit(meta, drop);
  st::Writer writer;
  writer.set_metadata("lora_checkpoint", meta.dump());
  for (const auto& t : file.tensors())
    if (!drop.count(t.name)) writer.add_from(t.name, file, t);
  if (add) add(writer);
  writer.save(out);
}

}  // namespace

// ---- resuming --------------------------------------------------------------------------------

// Runs 20 steps straight; and 10 steps, a checkpoint, then 10 more in fresh objects built with other seeds
// (so other A, B and dropout streams) and other hyperparameters, which must all come from the file.
template <class S, class Opt>
void check_bit_identical_resume(const typename Opt::Options& options, const typename Opt::Options& other_options) {
  const fs::path dir = lora_test::scratch_dir("checkpoint-resume");
  const std::string path = (dir / "step10.safetensors").string();

  Run<S, Opt> straight(1, options);
  straight.train_until(total_steps);

  Run<S, Opt> first(1, options);
  first.train_until(10);
  REQUIRE(first_difference(loss_bits(first.losses, 0, 10), loss_bits(straight.losses, 0, 10)) == "");
  first.save(path);

  Run<S, Opt> resumed(77, other_options);
  REQUIRE(first_difference(model_bits(resumed.model, false), model_bits(first.model, false)) !=
          "");  // the fresh run starts elsewhere
  REQUIRE(first_difference(optimizer_bits(resumed.opt), optimizer_bits(first.opt)) != "");
  resumed.load(path);
  CHECK(resumed.state.step == 10);
  CHECK(resumed.state.epoch == 2);
  CHECK(resumed.state.batch == 0);
  CHECK(first_difference(model_bits(resumed.model, false), model_bits(first.model, false)) == "");
  for (const auto& p : resumed.model.parameters()) CHECK(p.grad_matrix().isZero(0));  // loading zeroes gradients
  CHECK(first_difference(optimizer_bits(resumed.opt), optimizer_bits(first.opt)) == "");
  resumed.train_until(total_steps);

  REQUIRE(resumed.losses.size() == 10);
  // Steps 11-20 moved the model, so the comparisons below can tell a resumed run from a stalled one.
  REQUIRE(first_difference(model_bits(straight.model, false), model_bits(first.model, false)) != "");
  CHECK(first_difference(loss_bits(resumed.losses, 0, 10), loss_bits(straight.losses, 10, 20)) == "");
  CHECK(first_difference(model_bits(resumed.model), model_bits(straight.model)) == "");
  CHECK(first_difference(optimizer_bits(resumed.opt), optimizer_bits(straight.opt)) == "");
  CHECK(resumed.opt.step_count() == total_steps);
  CHECK(resumed.rng() == straight.rng());

  // The control: the same resume with one dropout stream moved on does not repeat the straight run,
  // so the comparison above depends on the dropout state being restored.
  Run<S, Opt> control(77, other_options);
  control.load(path);
  linears(control.model)[1]->set_dropout_seed(12345);
  control.train_until(total_steps);
  CHECK(first_difference(loss_bits(control.losses, 0, 10), loss_bits(straight.losses, 10, 20)) != "");
  fs::remove_all(dir);
}

TEMPLATE_TEST_CASE("checkpoint: a resumed run continues bit for bit", "[checkpoint]", float, double) {
  using S = TestType;
  SECTION("AdamW with weight decay, cosine schedule with warmup, gradient clipping") {
    auto other = adamw_options<S>(0.5);
    other.beta1 = 0.5;
    other.eps = 1e-3;
    check_bit_identical_resume<S, lora::AdamW<S>>(adamw_options<S>(), other);
  }
  SECTION("SGD with nesterov momentum and weight decay") {
    auto other = sgd_options<S>(0.5);
    other.weight_decay = 0.2;
    check_bit_identical_resume<S, lora::SGD<S>>(sgd_options<S>(), other);
  }
  SECTION("SGD without momentum, resumed into one built with momentum") {
    check_bit_identical_resume<S, lora::SGD<S>>(sgd_options<S>(0.0), sgd_options<S>(0.9));
  }
}

TEMPLATE_TEST_CASE("checkpoint: a map of layers resumes bit for bit, whatever the optimizer's order", "[checkpoint]",
                   float, double) {
  using S = TestType;
  const fs::path dir = lora_test::scratch_dir("checkpoint-map");
  const std::string path = (dir / "ckpt.safetensors").string();
  const Mat<S> Wq = smooth_matrix<S>(8, 10, 0.5, 0.3), Wv = smooth_matrix<S>(6, 8, 1.5, 0.3);
  const Mat<S> x = smooth_matrix<S>(5, 10, 2.0), target = smooth_matrix<S>(5, 6, 2.5, 0.5);

  // q: 10 -> 8, v: 8 -> 6, chained; the optimizer lists v's tensors before q's.
  struct Model {
    lora::LoRALinear<S> q, v;
    std::map<std::string, lora::LoRALinear<S>*> map;
    lora::AdamW<S> opt;
    std::vector<S> losses;
    static lora::LoraConfig config(std::uint64_t seed) {
      lora::LoraConfig c;
      c.r = 3;
      c.lora_alpha = 6;
      c.lora_dropout = 0.3;
      c.init_lora_weights = lora::InitLoraWeights::random;
      c.seed = seed;
      return c;
    }
    static lora::ParameterList<S> v_then_q(lora::LoRALinear<S>& q, lora::LoRALinear<S>& v) {
      auto list = v.parameters();
      for (const auto& p : q.parameters()) list.push_back(p);
      return list;
    }
    Model(const Mat<S>& Wq, const Mat<S>& Wv, std::uint64_t seed)
        : q(Wq, config(seed)),
          v(Wv, config(seed + 1)),
          map{{"encoder.q_proj", &q}, {"encoder.v_proj", &v}},
          opt(v_then_q(q, v)) {}
    void train(int steps, const Mat<S>& x, const Mat<S>& target) {
      Mat<S> h(x.rows(), 8), y(x.rows(), 6), dy(x.rows(), 6), dh(x.rows(), 8);
      for (int i = 0; i < steps; ++i) {
        q.zero_grad();
        v.zero_grad();
        q.forward(x, h);
        v.forward(h, y);
        losses.push_back(lora::mse_loss<S>(y, target, dy));
        v.backward(h, dy, dh);
        q.backward(x, dh);
        opt.step();
      }
    }
  };
  Model straight(Wq, Wv, 1), first(Wq, Wv, 1);
  straight.train(6, x, target);
  first.train(3, x, target);
  lora::save_checkpoint(path, first.map, first.opt, lora::TrainingState{3, 0, 3, ""});
  Model resumed(Wq, Wv, 50);
  const auto state = lora::load_checkpoint(path, resumed.map, resumed.opt);
  CHECK(state.step == 3);
  resumed.train(3, x, target);
  CHECK(first_difference(loss_bits(resumed.losses, 0, 3), loss_bits(straight.losses, 3, 6)) == "");
  CHECK(resumed.q.lora_A() == straight.q.lora_A());
  CHECK(resumed.q.lora_B() == straight.q.lora_B());
  CHECK(resumed.v.lora_A() == straight.v.lora_A());
  CHECK(resumed.v.lora_B() == straight.v.lora_B());
  CHECK(first_difference(optimizer_bits(resumed.opt), optimizer_bits(straight.opt)) == "");
  CHECK(resumed.q.dropout_rng_state() == straight.q.dropout_rng_state());

  const auto file = st::File::open(path);
  CHECK(file.find("model.encoder.q_proj.lora_A") != nullptr);
  CHECK(file.find("optimizer.exp_avg_sq.encoder.v_proj.lora_B") != nullptr);
  CHECK(file.find("model.encoder.v_proj.dropout_rng") != nullptr);
  fs::remove_all(dir);
}

// ---- the format --------------------------------------------------------------------------------

TEST_CASE("checkpoint: the file holds the documented tensors and metadata", "[checkpoint][format]") {
  const fs::path dir = lora_test::scratch_dir("checkpoint-format");
  const std::string path = (dir / "ckpt.safetensors").string();
  Run<float, lora::AdamW<float>> run(1, adamw_options<float>());
  run.train_until(7);
  run.save(path);

  const auto file = st::File::open(path);
  std::map<std::string, std::string> tensors;
  for (const auto& t : file.tensors())
    tensors[t.name] = std::string(st::dtype_name(t.dtype)) + " " + st::shape_text(t.shape);
  const std::map<std::string, std::string> expected{
      {"model.0.lora_A", "F32 [4, 10]"},
      {"model.0.lora_B", "F32 [12, 4]"},
      {"model.0.bias", "F32 [1, 12]"},
      {"model.0.dropout_rng", "U64 [4]"},
      {"model.2.lora_A", "F32 [2, 12]"},
      {"model.2.lora_B", "F32 [6, 2]"},
      {"model.2.dropout_rng", "U64 [4]"},
      {"optimizer.exp_avg.0.lora_A", "F32 [4, 10]"},
      {"optimizer.exp_avg.0.lora_B", "F32 [12, 4]"},
      {"optimizer.exp_avg.0.bias", "F32 [1, 12]"},
      {"optimizer.exp_avg.2.lora_A", "F32 [2, 12]"},
      {"optimizer.exp_avg.2.lora_B", "F32 [6, 2]"},
      {"optimizer.exp_avg_sq.0.lora_A", "F32 [4, 10]"},
      {"optimizer.exp_avg_sq.0.lora_B", "F32 [12, 4]"},
      {"optimizer.exp_avg_sq.0.bias", "F32 [1, 12]"},
      {"optimizer.exp_avg_sq.2.lora_A", "F32 [2, 12]"},
      {"optimizer.exp_avg_sq.2.lora_B", "F32 [6, 2]"},
  };
  CHECK(tensors == expected);
  CHECK(file.view<float>("model.0.lora_B") == linears(run.model)[0]->lora_B());
  CHECK(file.view<float>("optimizer.exp_avg_sq.2.lora_A").reshaped<Eigen::RowMajor>().transpose() ==
        run.opt.state().exp_avg_sq[3].transpose());
  std::array<std::uint64_t, 4> words{};
  std::memcpy(words.data(), file.bytes(file.at("model.2.dropout_rng")), sizeof words);
  CHECK(words == linears(run.model)[1]->dropout_rng_state());

  REQUIRE(file.metadata().size() == 1);
  const auto meta = nlohmann::json::parse(file.metadata().at("lora_checkpoint"));
  CHECK(meta.at("format_version") == 1);
  CHECK(meta.at("scalar") == "F32");
  CHECK(meta.at("training").at("step") == 7);
  CHECK(meta.at("training").at("epoch") == 1);
  CHECK(meta.at("training").at("batch") == 2);
  CHECK(meta.at("training").at("rng").get<std::string>().size() > 1000);  // mt19937_64's text state
  CHECK(meta.at("optimizer").at("kind") == "AdamW");
  CHECK(meta.at("optimizer").at("step") == 7);
  const auto& h = meta.at("optimizer").at("hyperparameters");
  CHECK(h.size() == 5);
  CHECK(h.at("lr").get<double>() == run.opt.lr());  // the scheduled lr, exactly
  CHECK(h.at("lr").get<double>() != 0.02);
  CHECK(h.at("beta2").get<double>() == 0.95);
  const auto& layer0 = meta.at("layers").at("0");
  CHECK(meta.at("layers").size() == 2);
  CHECK(layer0.at("in_features") == 10);
  CHECK(layer0.at("out_features") == 12);
  CHECK(layer0.at("r") == 4);
  CHECK(layer0.at("scaling").get<double>() == 2.0);
  CHECK(layer0.at("lora_dropout").get<double>() == 0.25);
  CHECK(layer0.at("base").get<std::string>().size() == 16);
  CHECK(layer0.at("base") != meta.at("layers").at("2").at("base"));

  // SGD without momentum has no buffers; with momentum, one per tensor.
  Run<float, lora::SGD<float>> plain(1, sgd_options<float>(0.0));
  plain.save(path);
  const auto sgd_file = st::File::open(path);
  CHECK(sgd_file.tensors().size() == 7);
  CHECK(nlohmann::json::parse(sgd_file.metadata().at("lora_checkpoint")).at("optimizer").at("hyperparameters").size() ==
        5);
  Run<float, lora::SGD<float>> heavy(1, sgd_options<float>(0.9));
  heavy.save(path);
  CHECK(st::File::open(path).find("optimizer.momentum_buffer.0.bias") != nullptr);
  fs::remove_all(dir);
}

// ---- refusals ----------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("checkpoint: a file that does not fit is refused and the model and optimizer stay as they were",
                   "[checkpoint][errors]", float, double) {
  using S = TestType;
  const std::string F = dtype_name<S>();
  const fs::path dir = lora_test::scratch_dir("checkpoint-refuse");
  auto at = [&](const char* name) { return (dir / name).string(); };
  const std::string good = at("good.safetensors");
  {
    Run<S, lora::AdamW<S>> source(1, adamw_options<S>());
    source.train_until(3);
    source.save(good);
  }

  // The target has taken steps and holds gradients, so every part of it has bits to lose.
  Run<S, lora::AdamW<S>> target(5, adamw_options<S>(0.2));
  target.train_until(2);
  target.model.forward(smooth_matrix<S>(3, 10, 9.0));
  target.model.backward(smooth_matrix<S>(3, 6, 8.0));
  const auto model_before = model_bits(target.model);
  const auto opt_before = optimizer_bits(target.opt);
  auto refused = [&](const std::string& path, const std::string& fragment) {
    CAPTURE(path, fragment);
    std::string message;
    try {
      target.load(path);
    } catch (const lora::format_error& e) {
      message = e.what();
    }
    CHECK_THAT(message, Contains(fragment));
    CHECK(first_difference(model_bits(target.model), model_before) == "");
    CHECK(first_difference(optimizer_bits(target.opt), opt_before) == "");
    CHECK(target.state.step == 2);
  };

  SECTION("wrong shapes: another rank") {
    ModelShape shape;
    shape.r0 = 3;
    Run<S, lora::AdamW<S>> other(1, adamw_options<S>(), shape);
    other.save(at("rank3.safetensors"));
    refused(at("rank3.safetensors"), "model.0.lora_A: expected " + F + " [4, 10], got " + F + " [3, 10]");
    refused(at("rank3.safetensors"), "optimizer.exp_avg.0.lora_B: expected " + F + " [12, 4], got " + F + " [12, 3]");
    refused(at("rank3.safetensors"), "layer \"0\": r expected 4, got 3");
  }
  SECTION("another scaling, another base") {
    ModelShape alpha;
    alpha.alpha0 = 16;
    Run<S, lora::AdamW<S>> scaled(1, adamw_options<S>(), alpha);
    scaled.save(at("alpha.safetensors"));
    refused(at("alpha.safetensors"), "layer \"0\": scaling expected 2 (lora_alpha / r), got 4");
    ModelShape base;
    base.base_seed = 0.2;
    Run<S, lora::AdamW<S>> rebased(1, adamw_options<S>(), base);
    rebased.save(at("base.safetensors"));
    refused(at("base.safetensors"), "layer \"2\": base (fingerprint of the frozen W and b) expected ");
  }
  SECTION("a missing tensor, an unexpected one, a missing layer") {
    rewrite(good, at("missing.safetensors"), [](auto&, auto& drop) { drop.insert("model.2.lora_B"); });
    refused(at("missing.safetensors"), "missing: model.2.lora_B (" + F + " [6, 2])");
    rewrite(good, at("missing_rng.safetensors"), [](auto&, auto& drop) { drop.insert("model.0.dropout_rng"); });
    refused(at("missing_rng.safetensors"), "missing: model.0.dropout_rng (U64 [4])");
    const Mat<S> extra = Mat<S>::Zero(2, 2);
    rewrite(
        good, at("extra.safetensors"), [](auto&, auto&) {},
        [&](st::Writer& w) { w.add("model.4.lora_A", extra, F == "F32" ? st::Dtype::F32 : st::Dtype::F64); });
    refused(at("extra.safetensors"), "unexpected: model.4.lora_A (" + F + " [2, 2])");
    rewrite(good, at("no_layer.safetensors"), [](auto& meta, auto&) { meta["layers"].erase("2"); });
    refused(at("no_layer.safetensors"), "missing: layer \"2\"");
  }
  SECTION("another optimizer kind") {
    Run<S, lora::SGD<S>> sgd(1, sgd_options<S>());
    sgd.save(at("sgd.safetensors"));
    refused(at("sgd.safetensors"), "optimizer: expected AdamW, got \"SGD\"");
    refused(at("sgd.safetensors"), "1 problem(s)");  // the SGD buffers are not listed one by one
  }
  SECTION("another hyperparameter layout, out-of-range or mistyped values") {
    rewrite(good, at("no_beta2.safetensors"),
            [](auto& meta, auto&) { meta["optimizer"]["hyperparameters"].erase("beta2"); });
    refused(at("no_beta2.safetensors"),
            "expected the keys beta1, beta2, eps, lr, weight_decay; got beta1, eps, lr, "
            "weight_decay");
    rewrite(good, at("extra_key.safetensors"),
            [](auto& meta, auto&) { meta["optimizer"]["hyperparameters"]["momentum"] = 0.9; });
    refused(at("extra_key.safetensors"), "got beta1, beta2, eps, lr, momentum, weight_decay");
    rewrite(good, at("negative_lr.safetensors"),
            [](auto& meta, auto&) { meta["optimizer"]["hyperparameters"]["lr"] = -1; });
    refused(at("negative_lr.safetensors"), "lr must be >= 0, got -1");
    rewrite(good, at("string_eps.safetensors"),
            [](auto& meta, auto&) { meta["optimizer"]["hyperparameters"]["eps"] = "1e-8"; });
    refused(at("string_eps.safetensors"), "hyperparameters.eps: expected a number, got string");
    rewrite(good, at("huge_step.safetensors"),
            [](auto& meta, auto&) { meta["optimizer"]["step"] = std::uint64_t{1} << 63; });
    refused(at("huge_step.safetensors"),
            "optimizer.step: expected an integer that fits a long, got 9223372036854775808");
    rewrite(good, at("negative_step.safetensors"), [](auto& meta, auto&) { meta["training"]["step"] = -3; });
    refused(at("negative_step.safetensors"), "training.step: expected an integer >= 0, got -3");
    rewrite(good, at("version2.safetensors"), [](auto& meta, auto&) { meta["format_version"] = 2; });
    refused(at("version2.safetensors"), "format_version: expected 1, got 2");
  }
  SECTION("damaged and hostile files") {
    const auto bytes = lora_test::read_bytes(good);
    for (std::size_t keep : {std::size_t{0}, std::size_t{7}, std::size_t{100}, bytes.size() / 2, bytes.size() - 1}) {
      write_bytes(at("cut.safetensors"), std::vector<std::uint8_t>(bytes.begin(), bytes.begin() + keep));
      CAPTURE(keep);
      refused(at("cut.safetensors"), at("cut.safetensors") + ": ");
    }
    refused(at("cut.safetensors"), "file is truncated");
    const std::string text = "step,loss\n1,0.5\n2,0.25\n";
    write_bytes(at("text.safetensors"), std::vector<std::uint8_t>(text.begin(), text.end()));
    refused(at("text.safetensors"), "not a safetensors file");

    st::Writer adapter;  // a PEFT adapter: safetensors, but not a checkpoint
    adapter.set_metadata("format", "pt");
    adapter.add("base_model.model.fc.lora_A.weight", Mat<S>::Zero(2, 3));
    adapter.save(at("adapter.safetensors"));
    refused(at("adapter.safetensors"), "not a lora checkpoint");

    auto with_metadata = [&](const std::string& name, const std::string& json) {
      const auto file = st::File::open(good);
      st::Writer w;
      w.set_metadata("lora_checkpoint", json);
      for (const auto& t : file.tensors()) w.add_from(t.name, file, t);
      w.save(at(name.c_str()));
    };
    with_metadata("deep.safetensors", std::string(100000, '[') + std::string(100000, ']'));
    refused(at("deep.safetensors"), "nests more than 8 levels deep");
    with_metadata("not_json.safetensors", "{\"format_version\": 1,");
    refused(at("not_json.safetensors"), "\"lora_checkpoint\" is not valid JSON");
    with_metadata("array.safetensors", "[1, 2]");
    refused(at("array.safetensors"), "must be a JSON object, got array");

    // All-zero xoshiro state: the stream would give zeros forever (every mask "keep").
    const std::array<std::uint64_t, 4> zero{};
    rewrite(
        good, at("zero_rng.safetensors"), [](auto&, auto& drop) { drop.insert("model.2.dropout_rng"); },
        [&](st::Writer& w) {
          w.add_bytes("model.2.dropout_rng", st::Dtype::U64, {4}, reinterpret_cast<const std::uint8_t*>(zero.data()),
                      sizeof zero);
        });
    refused(at("zero_rng.safetensors"), "model.2.dropout_rng: the all-zero state");
    // A name that would reorder the terminal's text is printed escaped.
    rewrite(
        good, at("bidi.safetensors"), [](auto&, auto&) {},
        [&](st::Writer& w) {
          w.add(
              "model.\xE2\x80\xAE"
              "evil",
              Mat<S>::Zero(1, 1));
        });
    refused(at("bidi.safetensors"), "unexpected: model.\\u202eevil");
  }
  SECTION("a float checkpoint into a model of another Scalar") {
    const std::string other = at("other_scalar.safetensors");
    if constexpr (std::is_same_v<S, float>) {
      Run<double, lora::AdamW<double>> d(1, adamw_options<double>());
      d.save(other);
    } else {
      Run<float, lora::AdamW<float>> f(1, adamw_options<float>());
      f.save(other);
    }
    const std::string G = F == "F32" ? "F64" : "F32";
    refused(other, "scalar: expected " + F + ", got \"" + G + "\"");
    refused(other, "model.0.lora_A: expected " + F + " [4, 10], got " + G + " [4, 10]");
  }
  SECTION("no file, and an optimizer that is not the model's") {
    CHECK_THROWS_AS(target.load(at("absent.safetensors")), lora::io_error);
    lora::AdamW<S> partial(linears(target.model)[0]->parameters());
    CHECK_THROWS_WITH(lora::load_checkpoint(good, target.model, partial),
                      Contains("the model's trainable tensor \"2.lora_A\" is not one the optimizer updates"));
    CHECK_THROWS_WITH(lora::save_checkpoint(at("x.safetensors"), target.model, partial, {}),
                      Contains("is not one the optimizer updates"));
    CHECK_FALSE(fs::exists(at("x.safetensors")));
    lora::TrainingState negative;
    negative.step = -1;
    CHECK_THROWS_AS(lora::save_checkpoint(at("x.safetensors"), target.model, target.opt, negative), lora::config_error);
    lora::TrainingState not_utf8;
    not_utf8.rng = "\xff";
    CHECK_THROWS_AS(lora::save_checkpoint(at("x.safetensors"), target.model, target.opt, not_utf8), lora::config_error);
    CHECK(lora_test::count_files(dir) == 1);  // good.safetensors only: nothing written, no temporary
    CHECK(first_difference(model_bits(target.model), model_before) == "");
    CHECK(first_difference(optimizer_bits(target.opt), opt_before) == "");
  }
  SECTION("a merged layer is neither saved nor loaded into") {
    target.model.merge();
    CHECK_THROWS_AS(target.load(good), lora::state_error);
    CHECK_THROWS_AS(target.save(at("merged.safetensors")), lora::state_error);
    target.model.unmerge();
    CHECK(first_difference(optimizer_bits(target.opt), opt_before) == "");
  }
  SECTION("the good file loads, so the refusals above are about what was changed") {
    target.load(good);
    CHECK(target.state.step == 3);
    CHECK(first_difference(model_bits(target.model), model_before) != "");
  }
  fs::remove_all(dir);
}

// ---- atomic saves --------------------------------------------------------------------------

TEST_CASE("checkpoint: a failed save leaves the previous checkpoint whole and no temporary behind",
          "[checkpoint][atomic]") {
  const fs::path dir = lora_test::scratch_dir("checkpoint-atomic");
  const std::string path = (dir / "ckpt.safetensors").string();
  Run<float, lora::AdamW<float>> run(1, adamw_options<float>());
  run.train_until(4);
  run.save(path);
  const auto saved = lora_test::read_bytes(path);
  run.train_until(8);

  std::string message;
  {
    // The new checkpoint has the same size as the old one: the write fails 100 bytes before its end.
    lora_test::FileSizeLimit limit(saved.size() - 100);
    REQUIRE(limit.ok());
    try {
      run.save(path);
    } catch (const lora::io_error& e) {
      message = e.what();
    }
  }
  CHECK_THAT(message, Contains("ckpt.safetensors: the file would be larger than the process's file-size limit"));
  CHECK(lora_test::read_bytes(path) == saved);
  CHECK(lora_test::count_files(dir) == 1);

  Run<float, lora::AdamW<float>> resumed(3, adamw_options<float>());
  resumed.load(path);
  CHECK(resumed.state.step == 4);
  CHECK(resumed.opt.step_count() == 4);

  run.save(path);  // without the limit the same save replaces it
  CHECK(lora_test::read_bytes(path) != saved);
  CHECK(lora_test::count_files(dir) == 1);
  resumed.load(path);
  CHECK(resumed.state.step == 8);
  fs::remove_all(dir);
}

}  // namespace unit_checkpoint
