// examples/finetune: the IDX reader on good and damaged files, and a small version of the demo's pipeline on a
// few hundred real Fashion-MNIST images (the [data] tests; CMake leaves them out when the data set is not
// installed and says so).
#include <catch2/catch.hpp>
#include <lora/lora.hpp>

#include <zlib.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "mnist.hpp"
#include "pipeline.hpp"

using Catch::Contains;
using finetune::Mat;

namespace {

namespace fs = std::filesystem;

fs::path tmp_dir() {
  const fs::path d = fs::path(LORA_TEST_TMP_DIR) / "finetune";
  fs::create_directories(d);
  return d;
}

std::vector<unsigned char> be32(std::uint32_t v) {
  return {static_cast<unsigned char>(v >> 24), static_cast<unsigned char>(v >> 16), static_cast<unsigned char>(v >> 8),
          static_cast<unsigned char>(v)};
}

// An IDX file of unsigned bytes: magic, sizes, then `payload` bytes (which need not match the sizes).
std::vector<unsigned char> idx_bytes(std::uint32_t magic, const std::vector<std::uint32_t>& sizes,
                                     std::size_t payload) {
  std::vector<unsigned char> b = be32(magic);
  for (auto s : sizes) {
    const auto v = be32(s);
    b.insert(b.end(), v.begin(), v.end());
  }
  for (std::size_t i = 0; i < payload; ++i) b.push_back(static_cast<unsigned char>(i % 5));
  return b;
}

std::string write_gz(const std::string& name, const std::vector<unsigned char>& bytes) {
  const std::string path = (tmp_dir() / name).string();
  gzFile f = gzopen(path.c_str(), "wb");
  REQUIRE(f != nullptr);
  REQUIRE(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())) == static_cast<int>(bytes.size()));
  REQUIRE(gzclose(f) == Z_OK);
  return path;
}

std::vector<unsigned char> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

std::string write_raw(const std::string& name, const std::vector<unsigned char>& bytes) {
  const std::string path = (tmp_dir() / name).string();
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(f.good());
  return path;
}

}  // namespace

TEST_CASE("finetune IDX reader: a well-formed file reads back", "[finetune][idx]") {
  const auto images = mnist::read_images(write_gz("good-images.gz", idx_bytes(0x803, {3, 2, 4}, 24)));
  CHECK(images.count == 3);
  CHECK(images.rows == 2);
  CHECK(images.cols == 4);
  REQUIRE(images.pixels.size() == 24);
  CHECK(images.pixels[7] == 2);
  CHECK(images.image(2)[0] == 16 % 5);
  const auto labels = mnist::read_labels(write_gz("good-labels.gz", idx_bytes(0x801, {3}, 3)));
  CHECK(labels == std::vector<int>{0, 1, 2});
}

TEST_CASE("finetune IDX reader: damaged files are refused with a clear error", "[finetune][idx]") {
  using mnist::idx_error;
  SECTION("truncated data") {
    const auto path = write_gz("truncated.gz", idx_bytes(0x803, {3, 2, 4}, 20));
    REQUIRE_THROWS_AS(mnist::read_images(path), idx_error);
    REQUIRE_THROWS_WITH(mnist::read_images(path),
                        Contains(path) && Contains("truncated") && Contains("expected 24 bytes") && Contains("got 20"));
  }
  SECTION("truncated header") {
    REQUIRE_THROWS_WITH(mnist::read_images(write_gz("short-header.gz", {0, 0, 8})),
                        Contains("expected 4 bytes of IDX magic, got 3"));
  }
  SECTION("wrong magic: a label file where images belong") {
    REQUIRE_THROWS_WITH(mnist::read_images(write_gz("labels-as-images.gz", idx_bytes(0x801, {3}, 3))),
                        Contains("expected magic 0x00000803, got 0x00000801"));
  }
  SECTION("wrong magic: not unsigned bytes") {
    REQUIRE_THROWS_WITH(mnist::read_labels(write_gz("floats.gz", idx_bytes(0xD01, {3}, 12))),
                        Contains("expected magic 0x00000801, got 0x00000D01"));
  }
  SECTION("more data than the header says") {
    REQUIRE_THROWS_WITH(mnist::read_labels(write_gz("long.gz", idx_bytes(0x801, {3}, 4))),
                        Contains("expected the file to end after 3 bytes"));
  }
  SECTION("a label out of range") {
    auto bytes = idx_bytes(0x801, {3}, 3);
    bytes.back() = 10;
    REQUIRE_THROWS_WITH(mnist::read_labels(write_gz("bad-label.gz", bytes)),
                        Contains("label 2 expected in [0, 10), got 10"));
  }
  SECTION("bad gzip: the CRC in the trailer does not match") {
    auto gz = read_file(write_gz("crc.gz", idx_bytes(0x803, {3, 2, 4}, 24)));
    REQUIRE(gz.size() > 8);
    gz[gz.size() - 8] ^= 0xFF;  // first byte of the CRC-32
    REQUIRE_THROWS_WITH(mnist::read_images(write_raw("crc-bad.gz", gz)), Contains("gzip"));
  }
  SECTION("bad gzip: the compressed stream is cut short") {
    const auto gz = read_file(write_gz("cut.gz", idx_bytes(0x803, {50, 28, 28}, 50 * 28 * 28)));
    const std::vector<unsigned char> half(gz.begin(), gz.begin() + static_cast<std::ptrdiff_t>(gz.size() / 2));
    REQUIRE_THROWS_AS(mnist::read_images(write_raw("cut-half.gz", half)), idx_error);
  }
  SECTION("bad gzip: garbage inside the deflate stream") {
    auto gz = read_file(write_gz("garbage.gz", idx_bytes(0x803, {50, 28, 28}, 50 * 28 * 28)));
    REQUIRE(gz.size() > 40);
    for (std::size_t i = 12; i < 40; ++i) gz[i] = 0xFF;  // past the 10-byte gzip header
    REQUIRE_THROWS_WITH(mnist::read_images(write_raw("garbage-bad.gz", gz)), Contains("gzip"));
  }
  SECTION("images and labels disagree on the count") {
    write_gz("mismatch-images-idx3-ubyte.gz", idx_bytes(0x803, {3, 2, 4}, 24));
    write_gz("mismatch-labels-idx1-ubyte.gz", idx_bytes(0x801, {2}, 2));
    REQUIRE_THROWS_WITH(mnist::load(tmp_dir().string(), "mismatch"), Contains("expected 3 labels"));
  }
}

TEST_CASE("finetune IDX reader: a missing file names the install command", "[finetune][idx]") {
  const std::string path = (tmp_dir() / "does-not-exist.gz").string();
  REQUIRE_THROWS_AS(mnist::read_images(path), mnist::missing_data_error);
  REQUIRE_THROWS_WITH(mnist::read_images(path),
                      Contains(path) && Contains("No such file") && Contains("apt-get install dataset-fashion-mnist"));
}

namespace {

struct Small {
  mnist::Dataset train, test;
  finetune::Task train_a, train_b, test_a, test_b;
  Mat x_test_a, x_test_b;
};

// A few hundred real images per task.
const Small& small_data() {
  static const Small s = [] {
    Small d;
    d.train = mnist::load(LORA_FASHION_MNIST_DIR, "train");
    d.test = mnist::load(LORA_FASHION_MNIST_DIR, "t10k");
    d.train_a = finetune::make_task(d.train, 0, 500);
    d.train_b = finetune::make_task(d.train, 5, 500);
    d.test_a = finetune::make_task(d.test, 0, 300);
    d.test_b = finetune::make_task(d.test, 5, 300);
    d.x_test_a = finetune::all_images(d.test_a);
    d.x_test_b = finetune::all_images(d.test_b);
    return d;
  }();
  return s;
}

finetune::TrainOptions small_options(long steps, std::uint64_t seed) {
  finetune::TrainOptions o;
  o.steps = steps;
  o.batch = 32;
  o.seed = seed;
  return o;
}

double mean(const std::vector<float>& v, std::size_t from, std::size_t to) {
  double s = 0;
  for (std::size_t i = from; i < to; ++i) s += v[i];
  return s / static_cast<double>(to - from);
}

}  // namespace

TEST_CASE("finetune pipeline: the real files have Fashion-MNIST's shapes", "[finetune][data]") {
  const auto& d = small_data();
  CHECK(d.train.count == 60000);
  CHECK(d.test.count == 10000);
  CHECK(d.train.rows == 28);
  CHECK(d.train.cols == 28);
  CHECK(d.train_a.size() == 500);
  CHECK(d.test_b.size() == 300);
  for (int y : d.train_b.labels) REQUIRE((y >= 0 && y < 5));
}

TEST_CASE("finetune pipeline: pretraining lowers the loss and LoRA beats the frozen base on task B",
          "[finetune][data]") {
  const auto& d = small_data();
  finetune::DenseMLP base({784, 64, 64, 10}, 1);
  const auto pre = finetune::train(base, d.train_a, small_options(150, 1), "pretrain", nullptr);
  REQUIRE(pre.losses.size() == 150);
  const double first = mean(pre.losses, 0, 15), last = mean(pre.losses, 135, 150);
  INFO("pretraining loss, first tenth " << first << ", last tenth " << last);
  CHECK(last < 0.5 * first);

  auto frozen = finetune::lora_model(base, 0, 1);
  frozen.eval();
  const Mat base_logits_a = finetune::predict(frozen, d.x_test_a);
  const double pretrained_a = finetune::accuracy(base_logits_a, 0, d.test_a.labels);
  const double frozen_b = finetune::accuracy(finetune::predict(frozen, d.x_test_b), 5, d.test_b.labels);
  CHECK(pretrained_a > 0.7);  // five classes: chance is 0.2
  CHECK(frozen_b < 0.45);     // outputs 5-9 never trained

  auto model = finetune::lora_model(base, 4, 1);
  const auto adapt = finetune::train(model, d.train_b, small_options(120, 2), "LoRA r=4", nullptr);
  CHECK(adapt.params.trainable == 4 * (784 + 64) + 4 * (64 + 64) + 4 * (64 + 10));
  CHECK(adapt.optimizer_state_bytes == 2 * sizeof(float) * static_cast<std::size_t>(adapt.params.trainable));
  model.eval();
  const double lora_b = finetune::accuracy(finetune::predict(model, d.x_test_b), 5, d.test_b.labels);
  INFO("task B accuracy: frozen base " << frozen_b << ", LoRA r=4 " << lora_b);
  CHECK(lora_b > frozen_b + 0.3);

  SECTION("switching the adapter off gives back the pretrained task A predictions bit for bit") {
    const Mat on = finetune::predict(model, d.x_test_a);
    REQUIRE(on.cwiseNotEqual(base_logits_a).count() > 0);  // the adapter did change the outputs
    const Mat off = finetune::predict(finetune::adapter_off(model), d.x_test_a);
    REQUIRE(off.rows() == base_logits_a.rows());
    CHECK(std::memcmp(off.data(), base_logits_a.data(), sizeof(float) * static_cast<std::size_t>(off.size())) == 0);
    CHECK(finetune::accuracy(off, 0, d.test_a.labels) == pretrained_a);
  }
  SECTION("merged then unmerged: the same predictions, W back to within float rounding") {
    model.merge();
    const Mat merged_b = finetune::predict(model, d.x_test_b);
    CHECK(finetune::accuracy(merged_b, 5, d.test_b.labels) == Approx(lora_b).margin(2.0 / 300));
    model.unmerge();
    for (std::size_t k = 0; k < base.layers.size(); ++k) {
      const float change = (model.linear(2 * k).weight() - base.layers[k].W).cwiseAbs().maxCoeff();
      INFO("layer " << k);
      CHECK(change < 1e-6f);
    }
    const Mat off = finetune::predict(finetune::adapter_off(model), d.x_test_a);
    CHECK(finetune::accuracy(off, 0, d.test_a.labels) == pretrained_a);
  }
}

TEST_CASE("finetune pipeline: full fine-tuning changes every layer, head only just the head", "[finetune][data]") {
  const auto& d = small_data();
  const finetune::DenseMLP base({784, 32, 32, 10}, 3);
  finetune::DenseMLP full = base, head = base;
  head.freeze_all_but_head();
  const auto f = finetune::train(full, d.train_b, small_options(20, 4), "full", nullptr);
  const auto h = finetune::train(head, d.train_b, small_options(20, 4), "head", nullptr);
  CHECK(f.params.trainable == 784 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10);
  CHECK(h.params.trainable == 32 * 10 + 10);
  CHECK(h.params.total() == f.params.total());
  for (std::size_t k = 0; k < base.layers.size(); ++k) {
    INFO("layer " << k);
    CHECK(full.layers[k].W != base.layers[k].W);
    CHECK((head.layers[k].W != base.layers[k].W) == (k + 1 == base.layers.size()));
  }
}

TEST_CASE("finetune pipeline: the same seed gives the same run, another seed another", "[finetune][data]") {
  const auto& d = small_data();
  auto run = [&](std::uint64_t seed) {
    finetune::DenseMLP base({784, 32, 32, 10}, seed);
    finetune::train(base, d.train_a, small_options(20, seed), "pretrain", nullptr);
    auto model = finetune::lora_model(base, 2, seed);
    return finetune::train(model, d.train_b, small_options(20, seed + 1), "LoRA", nullptr).losses;
  };
  const auto a = run(5), b = run(5), c = run(6);
  CHECK(a == b);
  CHECK(a != c);
}

TEST_CASE("finetune DenseMLP: dW and db match finite differences", "[finetune]") {
  // The dense network's backward is the example's own (pretraining and full fine-tuning use it), so it gets
  // the library's finite-difference check, in double: widths 6-5-4-3, 4 rows.
  using MLP = finetune::BasicDenseMLP<double>;
  const bool head_only = GENERATE(false, true);
  MLP mlp({6, 5, 4, 3}, 11);
  if (head_only) mlp.freeze_all_but_head();
  std::srand(3);
  const lora::Matrix<double> x = lora::Matrix<double>::Random(4, 6);
  const std::vector<int> labels{0, 2, 1, 2};
  lora::Matrix<double> dlogits(4, 3);
  lora::cross_entropy<double>(mlp.forward(x), labels, dlogits);
  mlp.backward(dlogits);
  auto loss = [&] { return lora::cross_entropy<double>(mlp.predict(x), labels); };
  for (std::size_t k = 0; k < mlp.layers.size(); ++k) {
    auto& l = mlp.layers[k];
    INFO("layer " << k << (head_only ? ", head only" : ""));
    if (!l.trainable) {
      CHECK(l.dW.isZero(0));  // frozen: backward never reaches it
      continue;
    }
    REQUIRE(l.dW.cwiseAbs().maxCoeff() > 1e-4);  // something to check
    const auto w = lora::check_gradient(loss, l.W.data(), l.dW.data(), l.W.size());
    const auto b = lora::check_gradient(loss, l.b.data(), l.db.data(), l.b.size());
    INFO(w.describe("dW") << "; " << b.describe("db"));
    CHECK(w.ok());
    CHECK(b.ok());
  }
}

TEST_CASE("finetune pipeline: the batch order covers every example once per pass", "[finetune]") {
  lora::ShuffledBatches batches(10, 5, 7);
  std::vector<int> seen(10, 0);
  for (int k = 0; k < 2; ++k) {
    const lora::Index* b = batches.next();
    for (int i = 0; i < 5; ++i) ++seen[b[i]];
  }
  CHECK(seen == std::vector<int>(10, 1));
}
