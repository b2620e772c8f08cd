// finetune: adapt a pretrained network to a new task on real data (Fashion-MNIST), and show what LoRA buys.
//
// Pretrains a 784-512-512-10 GELU MLP on task A (classes 0-4), then adapts it to task B (classes 5-9,
// which the base never saw) with the frozen base, the classifier head only, LoRA on every layer at
// several ranks, LoRA's variants at r = 8 (DoRA also at r = 4, PiSSA, LoRA+), LoRA at r = 8 over the base
// stored in bf16, 8-bit (q8_0) and 4-bit (NF4) blocks (QLoRA's setting), and full fine-tuning, all with the
// same AdamW, schedule, batches and steps. Prints one
// table (trainable parameters, optimizer state, time, task B accuracy, task A accuracy after adapting),
// writes CSVs of the curves and the rank sweep, a PNG plot when gnuplot is installed, and the best LoRA
// adapter in PEFT's format.
//
// Built with MPI (CMake found it: lora::mpi), the same program runs under `mpirun -np K`: every method trains
// data-parallel (<lora/data_parallel.hpp>, deterministic mode), each rank computing its leaves of every batch, and
// rank 0 prints and writes the same as one process does (every number but the times is the same, bit for bit).
//
// Exits 1 if an invariant fails (switching a LoRA adapter off does not give back the pretrained model's
// task A logits bit for bit, or training did not lower the loss); 77 if the data set is not installed;
// 2 on bad flags.
#include <CLI/CLI.hpp>
#include <lora/data_parallel.hpp>
#include <lora/lora.hpp>
#ifdef LORA_FINETUNE_MPI
#include <lora/distributed.hpp>
#endif

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "mnist.hpp"
#include "pipeline.hpp"

namespace {

using finetune::Index;
using finetune::Mat;

struct Method {
  std::string name;
  int rank = -1;         // LoRA rank, -1 for the others
  bool variant = false;  // DoRA, PiSSA or LoRA+ rather than plain LoRA (not in the rank sweep)
  bool pissa = false;    // W holds PiSSA's residual: "adapter off" adds the initial adapter back
  finetune::TrainResult train;
  double acc_b = 0;
  double acc_a = 0;                 // after adapting (LoRA: adapter switched off)
  double acc_a_roundtrip = NAN;     // LoRA: merged, then unmerged, adapter off
  bool a_bitwise_off = true;        // LoRA: adapter-off task A logits == pretrained logits, bit for bit
  bool a_bitwise_roundtrip = true;  // LoRA: the same after merge() then unmerge()
  double max_w_change = 0;          // LoRA: max |W - W_pretrained| after merge() then unmerge()
  double acc_b_merged = NAN;        // LoRA: task B accuracy served merged
  bool low_precision = false;       // the frozen W is stored in bf16, q8_0 or nf4 (QLoRA's setting)
  double merge_error = 0;           // low precision: the largest |W'_q - W'| merge_quantized() reported
};

// Task B accuracy of plain LoRA at r = 8 over the float base (NaN when that row was not run).
double float_lora8_acc(const std::vector<Method>& methods) {
  for (const auto& m : methods)
    if (m.rank == 8 && !m.variant) return m.acc_b;
  return NAN;
}

bool same_bits(const Mat& a, const Mat& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(float) * static_cast<std::size_t>(a.size())) == 0;
}

std::string bytes_string(std::size_t b) {
  char buf[32];
  if (b == 0) return "0";
  if (b < (1u << 20))
    std::snprintf(buf, sizeof buf, "%.1f KiB", static_cast<double>(b) / 1024.0);
  else
    std::snprintf(buf, sizeof buf, "%.2f MiB", static_cast<double>(b) / (1024.0 * 1024.0));
  return buf;
}

// A CSV field (RFC 4180): quoted when it holds a comma or a quote ("LoRA r=8, bf16 base"), quotes doubled.
std::string csv(const std::string& field) {
  if (field.find_first_of(",\"") == std::string::npos) return field;
  std::string out = "\"";
  for (char c : field) out += c == '"' ? std::string("\"\"") : std::string(1, c);
  return out + '"';
}

bool command_exists(const char* name) {
  const std::string cmd = std::string("command -v ") + name + " >/dev/null 2>&1";
  return std::system(cmd.c_str()) == 0;
}

}  // namespace

int main(int argc, char** argv) {
#ifdef LORA_FINETUNE_MPI
  lora::mpi::Environment mpi(argc, argv);  // without mpirun: one process (MPI's singleton start)
  lora::mpi::Communicator comm;
#else
  lora::LocalCommunicator comm;
#endif
  const bool root = comm.rank() == 0;
  // Rank 0 prints and writes; the others compute their share silently.
  if (!root && !std::freopen("/dev/null", "w", stdout)) return 1;
  CLI::App app{
      "Adapt a network pretrained on Fashion-MNIST classes 0-4 to classes 5-9: frozen base, head only, "
      "LoRA at several ranks, full fine-tuning."};
  long steps = 1000, pretrain_steps = 1000;
  std::vector<int> ranks{1, 2, 4, 8, 16, 64};
  int threads = 1, hidden = 512, micro_batches = 4;
  std::size_t batch = 128, train_limit = 0, test_limit = 0;
  double lr = 1e-3;
  std::uint64_t seed = 1;
  std::string output = "out/finetune", data_dir = mnist::kDefaultDir;
  bool plot = true, variants = true;
  app.add_option("--steps", steps, "Adaptation steps, the same for every method")
      ->check(CLI::Range(1L, 100000000L))
      ->capture_default_str();
  app.add_option("--pretrain-steps", pretrain_steps, "Pretraining steps on task A")
      ->check(CLI::Range(1L, 100000000L))
      ->capture_default_str();
  app.add_option("--ranks", ranks, "LoRA ranks to sweep, e.g. --ranks 1,4,16")
      ->delimiter(',')
      ->check(CLI::Range(1, 4096))
      ->capture_default_str();
  app.add_option("--threads", threads, "Threads for Eigen's matrix products")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  app.add_option("--micro-batches", micro_batches,
                 "Leaves per batch: each batch's gradient is the sum of this many pieces in a fixed order, so that "
                 "1 to this many MPI ranks train the same bits")
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  app.add_option("--output", output, "Folder for the CSVs and the plot")->capture_default_str();
  app.add_option("--seed", seed, "Seed of the initialisation and the batch order")->capture_default_str();
  app.add_option("--batch", batch, "Batch size")
      ->check(CLI::Range(std::size_t{1}, std::size_t{1} << 20))
      ->capture_default_str();
  app.add_option("--lr", lr, "Peak learning rate (AdamW, cosine schedule, 5% warmup)")
      ->check([](const std::string& v) {
        return std::strtod(v.c_str(), nullptr) > 0 ? std::string() : "expected a learning rate > 0, got " + v;
      })
      ->capture_default_str();
  app.add_option("--hidden", hidden, "Width of the two hidden layers")
      ->check(CLI::Range(1, 65536))
      ->capture_default_str();
  app.add_option("--train-limit", train_limit, "Use only the first N training images of each task (0: all)")
      ->capture_default_str();
  app.add_option("--test-limit", test_limit, "Use only the first N test images of each task (0: all)")
      ->capture_default_str();
  app.add_option("--data", data_dir, "Folder with the gzip'd IDX files")->capture_default_str();
  app.add_flag("!--no-plot", plot, "Do not run gnuplot");
  app.add_flag("!--no-variants", variants,
               "Leave out the DoRA (r = 4, 8), PiSSA and LoRA+ (r = 8) rows and LoRA over bf16, q8_0 and NF4 bases");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }

  Eigen::setNbThreads(threads);
  const int eigen_threads = Eigen::nbThreads();
  if (eigen_threads != threads)
    std::printf("note: --threads %d asked, Eigen uses %d (built without OpenMP)\n", threads, eigen_threads);

  // ---- data ---------------------------------------------------------------------------------------
  mnist::Dataset train_set, test_set;
  try {
    train_set = mnist::load(data_dir, "train");
    test_set = mnist::load(data_dir, "t10k");
  } catch (const mnist::missing_data_error& e) {
    std::fprintf(stderr, "finetune: %s\n", e.what());
    return 77;
  } catch (const mnist::idx_error& e) {
    std::fprintf(stderr, "finetune: %s\n", e.what());
    return 1;
  }
  const finetune::Task train_a = finetune::make_task(train_set, 0, train_limit);
  const finetune::Task train_b = finetune::make_task(train_set, 5, train_limit);
  const finetune::Task test_a = finetune::make_task(test_set, 0, test_limit);
  const finetune::Task test_b = finetune::make_task(test_set, 5, test_limit);
  const Mat x_test_a = finetune::all_images(test_a), x_test_b = finetune::all_images(test_b);
  std::printf(
      "Fashion-MNIST from %s: task A (classes 0-4) %zu train / %zu test images, task B (classes 5-9) "
      "%zu / %zu; %d thread(s), seed %llu\n",
      data_dir.c_str(), train_a.size(), test_a.size(), train_b.size(), test_b.size(), eigen_threads,
      static_cast<unsigned long long>(seed));

  // ---- pretraining on task A ------------------------------------------------------------------------
  const Index D = static_cast<Index>(train_set.pixels_per_image());
  finetune::DenseMLP base({D, hidden, hidden, 10}, seed);
  finetune::TrainOptions pre;
  pre.steps = pretrain_steps;
  pre.batch = batch;
  pre.lr = lr;
  pre.seed = seed;
  pre.micro_batches = micro_batches;
  pre.comm = &comm;
  const auto pretrain = finetune::train(base, train_a, pre, "pretrain A", stdout);

  // The pretrained model as the library runs it (r = 0): the reference for every task A comparison.
  auto base_eval = finetune::lora_model(base, 0, seed);
  base_eval.eval();
  const Mat base_logits_a = finetune::predict(base_eval, x_test_a);
  const double pretrained_acc_a = finetune::accuracy(base_logits_a, 0, test_a.labels);
  std::printf("pretrained: task A test accuracy %.2f%%\n\n", 100 * pretrained_acc_a);

  // ---- adapting to task B -----------------------------------------------------------------------------
  finetune::TrainOptions adapt = pre;
  adapt.steps = steps;
  adapt.seed = seed + 1;  // the same batches for every method
  std::vector<Method> methods;
  double best_lora_acc = -1;  // the LoRA rank with the best task B accuracy is saved as a PEFT adapter
  std::string best_lora_name;

  {
    Method m;
    m.name = "frozen base";
    m.train.params = base.parameter_count();
    m.train.params.frozen += m.train.params.trainable;
    m.train.params.trainable = 0;
    m.acc_b = finetune::accuracy(finetune::predict(base_eval, x_test_b), 5, test_b.labels);
    m.acc_a = pretrained_acc_a;
    methods.push_back(m);
  }
  {
    Method m;
    m.name = "head only";
    finetune::DenseMLP model = base;
    model.freeze_all_but_head();
    m.train = finetune::train(model, train_b, adapt, m.name, stdout);
    m.acc_b = finetune::accuracy(model.predict(x_test_b), 5, test_b.labels);
    m.acc_a = finetune::accuracy(model.predict(x_test_a), 0, test_a.labels);
    methods.push_back(m);
  }
  // One LoRA row: a rank, and optionally one of the variants (DoRA, PiSSA, LoRA+ with ratio `loraplus`).
  auto adapt_lora = [&](const std::string& name, int r, const finetune::LoraVariant& variant, double loraplus) {
    Method m;
    m.name = name;
    m.rank = r;
    m.variant = variant.dora || variant.pissa || loraplus > 0;
    m.pissa = variant.pissa;
    auto model = finetune::lora_model(base, r, seed, variant);
    // PiSSA's initial adapter: W_res + s·B0 A0 is the pretrained W again (to float rounding).
    std::vector<Mat> pissa_start;
    for (std::size_t k = 0; variant.pissa && k < base.layers.size(); ++k) {
      const auto& l = model.linear(2 * k);
      pissa_start.push_back(l.weight() + l.scaling() * l.lora_B() * l.lora_A());
    }
    finetune::TrainOptions options = adapt;
    options.loraplus_ratio = loraplus;
    m.train = finetune::train(model, train_b, options, m.name, stdout);
    model.eval();
    m.acc_b = finetune::accuracy(finetune::predict(model, x_test_b), 5, test_b.labels);

    // Adapter off: the frozen W and b the adapted model holds, without the adapter. With PiSSA W is the
    // residual, so the initial adapter goes back in (a copy): the pretrained model to float rounding, not bit for bit.
    auto adapter_off_logits = [&] {
      if (!variant.pissa) return finetune::predict(finetune::adapter_off(model), x_test_a);
      lora::Sequential<float> off;
      for (std::size_t k = 0; k < base.layers.size(); ++k) {
        lora::LoraConfig none;
        none.r = 0;
        off.add(lora::LoRALinear<float>(Mat(pissa_start[k]), base.layers[k].b, none));
        if (k + 1 < base.layers.size()) off.add(lora::GELU{});
      }
      off.eval();
      return finetune::predict(off, x_test_a);
    };
    const Mat off_a = adapter_off_logits();
    m.acc_a = finetune::accuracy(off_a, 0, test_a.labels);
    m.a_bitwise_off = variant.pissa || same_bits(off_a, base_logits_a);

    // Served merged (W += s·B·A; DoRA: W ← (m/n) ⊙ (W + s·B·A)), then unmerged and switched off again.
    std::vector<Mat> before;
    for (std::size_t k = 0; k < base.layers.size(); ++k) before.push_back(model.linear(2 * k).weight());
    model.merge();
    m.acc_b_merged = finetune::accuracy(finetune::predict(model, x_test_b), 5, test_b.labels);
    model.unmerge();
    const Mat roundtrip_a = adapter_off_logits();
    m.acc_a_roundtrip = finetune::accuracy(roundtrip_a, 0, test_a.labels);
    m.a_bitwise_roundtrip = !variant.pissa && same_bits(roundtrip_a, base_logits_a);
    for (std::size_t k = 0; k < base.layers.size(); ++k)
      m.max_w_change = std::max(m.max_w_change,
                                static_cast<double>((model.linear(2 * k).weight() - before[k]).cwiseAbs().maxCoeff()));

    // The best adapter so far, in PEFT's format: module paths as torch.nn.Sequential names its layers. (A PiSSA
    // adapter applies to the residual, not to the pretrained W, so it is not a candidate.)
    if (root && !variant.pissa && m.acc_b > best_lora_acc) {
      std::map<std::string, lora::LoRALinear<float>*> modules;
      for (std::size_t k = 0; k < base.layers.size(); ++k)
        modules["layers." + std::to_string(2 * k)] = &model.linear(2 * k);
      lora::peft::AdapterConfig config;
      config.base_model_name_or_path = "examples/finetune: MLP pretrained on Fashion-MNIST classes 0-4";
      lora::peft::save_adapter(output + "/best_adapter", modules, config);
      best_lora_acc = m.acc_b;
      best_lora_name = m.name;
    }
    methods.push_back(m);
  };
  for (int r : ranks) adapt_lora("LoRA r=" + std::to_string(r), r, {}, 0);
  // LoRA over a base stored in low precision: the adapter trains in float over bf16, 8-bit or 4-bit W (QLoRA).
  // Task A "after" is then the quantized base with the adapter off, which need not equal the pretrained float
  // model; served merged means merge_quantized(), W + s·B·A rounded back to the format, and unmerge() restores W.
  auto adapt_low_precision = [&](const std::string& name, lora::WeightFormat format) {
    Method m;
    m.name = name;
    m.rank = 8;
    m.variant = true;
    m.low_precision = true;
    finetune::LoraVariant v;
    v.base_format = format;
    auto model = finetune::lora_model(base, 8, seed, v);
    m.train = finetune::train(model, train_b, adapt, m.name, stdout);
    model.eval();
    m.acc_b = finetune::accuracy(finetune::predict(model, x_test_b), 5, test_b.labels);
    const Mat off_a = finetune::predict(finetune::adapter_off(model), x_test_a);
    m.acc_a = finetune::accuracy(off_a, 0, test_a.labels);
    for (std::size_t k = 0; k < base.layers.size(); ++k)
      m.merge_error = std::max(m.merge_error, model.linear(2 * k).merge_quantized().max_abs_error);
    m.acc_b_merged = finetune::accuracy(finetune::predict(model, x_test_b), 5, test_b.labels);
    model.unmerge();
    const Mat roundtrip_a = finetune::predict(finetune::adapter_off(model), x_test_a);
    m.acc_a_roundtrip = finetune::accuracy(roundtrip_a, 0, test_a.labels);
    m.a_bitwise_roundtrip = same_bits(roundtrip_a, off_a);
    methods.push_back(m);
  };
  if (variants) {
    adapt_low_precision("LoRA r=8, bf16 base", lora::WeightFormat::bf16);
    adapt_low_precision("LoRA r=8, q8_0 base", lora::WeightFormat::q8_0);
    adapt_low_precision("LoRA r=8, NF4 base", lora::WeightFormat::nf4);
    adapt_lora("DoRA r=4", 4, {true, false}, 0);
    adapt_lora("DoRA r=8", 8, {true, false}, 0);
    adapt_lora("PiSSA r=8", 8, {false, true}, 0);
    adapt_lora("LoRA+ r=8", 8, {}, 16);  // PEFT's and the paper's ratio 2^4
  }
  {
    Method m;
    m.name = "full FT";
    finetune::DenseMLP model = base;
    m.train = finetune::train(model, train_b, adapt, m.name, stdout);
    m.acc_b = finetune::accuracy(model.predict(x_test_b), 5, test_b.labels);
    m.acc_a = finetune::accuracy(model.predict(x_test_a), 0, test_a.labels);
    methods.push_back(m);
  }
  const Method& full = methods.back();

  // ---- the table ---------------------------------------------------------------------------------------
  std::printf(
      "\nAdapting to task B: %ld steps of %zu images, AdamW lr %g (cosine, 5%% warmup), weight decay %g, "
      "clip 1.0; LoRA alpha = 2r on every layer\n\n",
      steps, batch, lr, adapt.weight_decay);
  std::printf(
      "| method | trainable params | %% of full FT | optimizer state | train time | task B acc | "
      "task A acc after | task A acc, merged then unmerged |\n");
  std::printf("|---|--:|--:|--:|--:|--:|--:|--:|\n");
  const double full_params = static_cast<double>(full.train.params.trainable);
  for (const auto& m : methods) {
    char roundtrip[32] = "";
    if (m.rank > 0) std::snprintf(roundtrip, sizeof roundtrip, "%.2f%%", 100 * m.acc_a_roundtrip);
    std::printf("| %s | %s | %.2f%% | %s | %.2f s | %.2f%% | %.2f%%%s | %s |\n", m.name.c_str(),
                lora::with_thousands(m.train.params.trainable).c_str(),
                100 * static_cast<double>(m.train.params.trainable) / full_params,
                bytes_string(m.train.optimizer_state_bytes).c_str(), m.train.seconds, 100 * m.acc_b, 100 * m.acc_a,
                m.rank > 0 ? " (adapter off)" : "", roundtrip);
  }
  std::printf("\npretrained task A accuracy: %.2f%%\n", 100 * pretrained_acc_a);

  // ---- invariants and the claims -------------------------------------------------------------------------
  bool ok = true;
  bool roundtrip_acc_equal = true, roundtrip_bitwise = true;
  double max_w_change = 0;
  for (const auto& m : methods) {
    if (m.low_precision) {  // its own base: adapter off gives the quantized model, which merge/unmerge must keep
      if (!m.a_bitwise_roundtrip) {
        std::printf("FAIL: %s merged then unmerged does not give its base's task A logits bit for bit\n",
                    m.name.c_str());
        ok = false;
      }
      std::printf(
          "%s: task B %.2f%% (%+.2f points vs LoRA r=8 over the float base), served merged %.2f%% "
          "(largest rounding of W + s·B·A back to the format: %.2e); task A with the adapter off %.2f%% "
          "(the quantized base; pretrained %.2f%%)\n",
          m.name.c_str(), 100 * m.acc_b, 100 * (m.acc_b - float_lora8_acc(methods)), 100 * m.acc_b_merged,
          m.merge_error, 100 * m.acc_a, 100 * pretrained_acc_a);
      continue;
    }
    if (m.rank <= 0) continue;
    if (!m.a_bitwise_off) {
      std::printf("FAIL: %s with the adapter off does not give the pretrained task A logits bit for bit\n",
                  m.name.c_str());
      ok = false;
    }
    roundtrip_acc_equal = roundtrip_acc_equal && m.acc_a_roundtrip == pretrained_acc_a;
    roundtrip_bitwise = roundtrip_bitwise && m.a_bitwise_roundtrip;
    max_w_change = std::max(max_w_change, m.max_w_change);
    if (m.acc_b_merged != m.acc_b)
      std::printf("note: %s served merged: task B accuracy %.2f%% (unmerged %.2f%%)\n", m.name.c_str(),
                  100 * m.acc_b_merged, 100 * m.acc_b);
  }
  std::printf(
      "LoRA, adapter off: task A logits bit for bit those of the pretrained model at every rank (DoRA, LoRA+ too; "
      "PiSSA's W is the residual, so its row adds the initial adapter back, to float rounding): %s\n",
      ok ? "yes" : "NO");
  // unmerge() subtracts s·B·A from W + s·B·A in float, which need not give W back to the last bit.
  std::printf(
      "LoRA, merged then unmerged: task A accuracy equal to the pretrained at every rank: %s; logits bit for "
      "bit: %s (W moved by at most %.1e, float rounding of (W + s·B·A) - s·B·A)\n",
      roundtrip_acc_equal ? "yes" : "NO", roundtrip_bitwise ? "yes" : "no", max_w_change);
  auto mean = [](const std::vector<float>& v, std::size_t from, std::size_t to) {
    double s = 0;
    for (std::size_t i = from; i < to; ++i) s += v[i];
    return s / static_cast<double>(to - from);
  };
  for (const auto* curve : {&pretrain.losses, &full.train.losses}) {
    const std::size_t n = curve->size(), w = n / 10;
    if (n < 20) continue;  // too short a run to judge
    if (!(mean(*curve, n - w, n) < mean(*curve, 0, w))) {
      std::printf("FAIL: the training loss did not fall (first tenth %.4f, last tenth %.4f)\n", mean(*curve, 0, w),
                  mean(*curve, n - w, n));
      ok = false;
    }
  }
  for (const auto& m : methods)
    if (m.rank == 8 && !m.variant)
      std::printf(
          "LoRA r=8 vs full fine-tuning on task B: %+.2f points with %.2f%% of its trainable parameters; "
          "task A: %.2f%% with the adapter off (pretrained %.2f%%), %.2f%% after full fine-tuning\n",
          100 * (m.acc_b - full.acc_b), 100 * static_cast<double>(m.train.params.trainable) / full_params,
          100 * m.acc_a, 100 * pretrained_acc_a, 100 * full.acc_a);

  // What data parallelism sends: one vector of the trainable tensors' gradients (and the loss) per step and rank.
  for (const auto& m : methods)
    if (m.rank == 8 && !m.variant)
      std::printf(
          "data parallel: %d process(es), each batch in %d leaves; sent per step and rank: LoRA r=8 %s, full "
          "fine-tuning %s (%.1f times more); time in the gradient reduction: LoRA r=8 %.1f%%, full FT %.1f%%\n",
          comm.size(), std::min<int>(micro_batches, static_cast<int>(batch)),
          bytes_string(m.train.bytes_sent_per_step).c_str(), bytes_string(full.train.bytes_sent_per_step).c_str(),
          static_cast<double>(full.train.bytes_sent_per_step) / static_cast<double>(m.train.bytes_sent_per_step),
          100 * m.train.reduce_seconds / m.train.seconds, 100 * full.train.reduce_seconds / full.train.seconds);
  if (!root) return ok ? 0 : 1;  // rank 0 writes the files

  // ---- CSVs and the plot -----------------------------------------------------------------------------------
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(output, ec);
  if (ec) {
    std::fprintf(stderr, "finetune: cannot create the output folder %s: %s\n", output.c_str(), ec.message().c_str());
    return 1;
  }
  {
    std::ofstream f(output + "/sweep.csv");
    f << "method,rank,trainable_params,optimizer_state_bytes,train_seconds,task_b_acc,task_a_acc,"
         "task_a_acc_merged_unmerged\n";
    for (const auto& m : methods) {
      if (m.variant) continue;  // variants.csv
      f << csv(m.name) << ',' << std::max(0, m.rank) << ',' << m.train.params.trainable << ','
        << m.train.optimizer_state_bytes << ',' << m.train.seconds << ',' << m.acc_b << ',' << m.acc_a << ',';
      if (m.rank > 0) f << m.acc_a_roundtrip;
      f << '\n';
    }
  }
  {
    std::ofstream f(output + "/curves.csv");  // adaptation loss per step, one column per trained method
    f << "step";
    for (std::size_t k = 1; k < methods.size(); ++k) f << ',' << csv(methods[k].name);
    f << '\n';
    for (long s = 0; s < steps; ++s) {
      f << s + 1;
      for (std::size_t k = 1; k < methods.size(); ++k) f << ',' << methods[k].train.losses[static_cast<std::size_t>(s)];
      f << '\n';
    }
    // The same, each value the mean of the last 25 steps, for the plot.
    std::ofstream m(output + "/curves_smoothed.csv");
    m << "step";
    for (std::size_t k = 1; k < methods.size(); ++k) m << ',' << csv(methods[k].name);
    m << '\n';
    const long window = 25;
    for (long s = 0; s < steps; ++s) {
      m << s + 1;
      const long from = std::max(0L, s + 1 - window);
      for (std::size_t k = 1; k < methods.size(); ++k) {
        const auto& l = methods[k].train.losses;
        m << ',' << mean(l, static_cast<std::size_t>(from), static_cast<std::size_t>(s + 1));
      }
      m << '\n';
    }
    std::ofstream p(output + "/pretrain.csv");
    p << "step,loss\n";
    for (std::size_t s = 0; s < pretrain.losses.size(); ++s) p << s + 1 << ',' << pretrain.losses[s] << '\n';
  }
  {
    std::ofstream f(output + "/variants.csv");  // DoRA, PiSSA, LoRA+ beside plain LoRA of the same rank
    f << "method,rank,trainable_params,optimizer_state_bytes,train_seconds,task_b_acc,task_a_acc\n";
    for (const auto& m : methods)
      if (m.variant || (m.rank == 4 || m.rank == 8))
        f << csv(m.name) << ',' << m.rank << ',' << m.train.params.trainable << ',' << m.train.optimizer_state_bytes
          << ',' << m.train.seconds << ',' << m.acc_b << ',' << m.acc_a << '\n';
  }
  std::printf("wrote %s/sweep.csv, variants.csv, curves.csv, curves_smoothed.csv, pretrain.csv\n", output.c_str());
  if (best_lora_acc >= 0)
    std::printf(
        "wrote %s/best_adapter/ (PEFT format: adapter_model.safetensors, adapter_config.json): %s, task B "
        "%.2f%%\n",
        output.c_str(), best_lora_name.c_str(), 100 * best_lora_acc);
  if (plot) {
    if (!command_exists("gnuplot")) {
      std::printf("gnuplot not found (Debian: gnuplot-nox): no plot\n");
    } else {
      const double head_b = methods[1].acc_b, frozen_b = methods[0].acc_b;
      std::ofstream g(output + "/plot.gp");
      g << "set datafile separator ','\n"
           "set terminal pngcairo size 1200,450 font ',10' noenhanced\n"
           "set output '"
        << output << "/finetune.png'\n"
        << "set multiplot layout 1,2\n"
           "set title 'Task B test accuracy (classes 5-9, never seen in pretraining)'\n"
           "set logscale x 2\nset xlabel 'LoRA rank r (every layer)'\nset ylabel 'accuracy (%)'\n"
           "set key bottom right\nset grid\n"
           "plot '"
        << output << "/sweep.csv' using ($2>0 ? $2 : 1/0):($6*100) with linespoints lw 2 pt 7 title 'LoRA', "
        << 100 * full.acc_b << " with lines lw 2 dt 2 title 'full fine-tuning', " << 100 * head_b
        << " with lines lw 2 dt 3 title 'head only', " << 100 * frozen_b
        << " with lines lw 1 dt 4 title 'frozen base'\n"
        << "unset logscale x\nset logscale y\n"
           "set title 'Task B training loss (mean of the last 25 steps)'\nset xlabel 'step'\n"
           "set ylabel 'cross-entropy'\n"
           "set key top right autotitle columnhead\n"  // skips the header line; the titles are given below
           "plot ";
      // One curve per method, titled by its name (gnuplot's columnhead would cut "LoRA r=8, bf16 base" at the comma).
      for (std::size_t k = 1; k < methods.size(); ++k)
        g << (k == 1 ? "'" + output + "/curves_smoothed.csv'" : std::string(", ''")) << " using 1:" << k + 1
          << " with lines lw 1.5 title '" << methods[k].name << "'";
      g << "\nunset multiplot\n";
      g.close();
      const std::string cmd = "gnuplot '" + output + "/plot.gp'";
      if (std::system(cmd.c_str()) == 0)
        std::printf("wrote %s/finetune.png\n", output.c_str());
      else
        std::printf("gnuplot failed on %s/plot.gp: no plot\n", output.c_str());
    }
  }
  return ok ? 0 : 1;
}
