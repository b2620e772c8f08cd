// gpt: a GPT-2 trained and adapted with LoRA in C++ (examples/gpt/README.md says what each command shows).
//
//   gpt pretrain  [--out DIR]          a small GPT-2 trained from scratch on fortune's texts, saved in Hugging
//                                      Face's layout (config.json + model.safetensors); cached
//   gpt study     [--out DIR] [--quick] the LoRA paper's Tables 5 and 6 in miniature on a text the model never saw
//   gpt eval      --model DIR [--adapter DIR] --tokens 464,3290,... --logits out.safetensors
//   gpt generate  --model DIR [--adapter DIR] --prompt TEXT
//   gpt finetune  --model DIR --text FILE --out DIR   LoRA on your own text, saved as a PEFT adapter folder
//   gpt bench                          training throughput (tokens/s) of LoRA on q, v at the default config
//
// Every bad input ends the program with status 1 and one line on stderr that says what was expected and what came.
#include "adapters.hpp"
#include "bpe.hpp"
#include "checkpoint.hpp"
#include "model.hpp"
#include "train.hpp"

#include <lora/errors.hpp>
#include <lora/peft.hpp>
#include <lora/safetensors.hpp>
#include <lora/targets.hpp>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <spawn.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

extern char** environ;

namespace {

namespace fs = std::filesystem;
using Model = gpt::Model<float>;
using Weights = gpt::Weights<float>;
using lora::Index;

const char* const default_pretrain_text = "/usr/share/games/fortunes";  // Debian: fortunes
const char* const default_adapt_text = "/usr/share/common-licenses";    // Debian: base-files, on every machine

// ---- tokens ----------------------------------------------------------------------------------------

/// Bytes for the models made here (vocab_size 256), GPT-2's BPE when the model folder has vocab.json and
/// merges.txt.
struct Tokenizer {
  std::optional<gpt::BpeTokenizer> bpe;
  int vocab_size = 256;

  static Tokenizer for_model(const std::string& dir, const gpt::Config& config) {
    Tokenizer t;
    t.vocab_size = config.vocab_size;
    if (gpt::BpeTokenizer::available(dir)) {
      t.bpe = gpt::BpeTokenizer::load(dir);
      if (t.bpe->vocab_size() > config.vocab_size)
        throw lora::config_error(dir + ": vocab.json has ids up to " + std::to_string(t.bpe->vocab_size() - 1) +
                                 ", more than config.json's vocab_size " + std::to_string(config.vocab_size));
    } else if (config.vocab_size < 256) {
      throw lora::config_error(dir +
                               ": no vocab.json / merges.txt, and a byte-level model needs vocab_size >= 256, "
                               "config.json has " +
                               std::to_string(config.vocab_size));
    }
    return t;
  }
  std::vector<int> encode(const std::string& text) const { return bpe ? bpe->encode(text) : gpt::byte_tokens(text); }
  std::string decode(const std::vector<int>& ids) const {
    if (bpe) return bpe->decode(ids);
    for (std::size_t i = 0; i < ids.size(); ++i)
      if (ids[i] > 255)
        throw lora::config_error("token " + std::to_string(ids[i]) + " at position " + std::to_string(i) +
                                 " is no byte (this model has no vocab.json)");
    return gpt::bytes_text(ids);
  }
};

/// "464,3290, 318" -> ids, each checked against the vocabulary with its position.
std::vector<int> parse_ids(const std::string& text, int vocab_size) {
  std::vector<int> ids;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    const auto b = item.find_first_not_of(" \t"), e = item.find_last_not_of(" \t");
    const std::string s = b == std::string::npos ? "" : item.substr(b, e - b + 1);
    std::size_t used = 0;
    long long v = -1;
    try {
      v = std::stoll(s, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (s.empty() || used != s.size())
      throw lora::config_error("--tokens: item " + std::to_string(ids.size()) + " is \"" + lora::printable(s) +
                               "\", expected a token id (comma-separated integers)");
    if (v < 0 || v >= vocab_size)
      throw lora::config_error("--tokens: token " + std::to_string(v) + " at position " + std::to_string(ids.size()) +
                               " is outside the vocabulary [0, " + std::to_string(vocab_size) + ")");
    ids.push_back(static_cast<int>(v));
  }
  if (ids.empty()) throw lora::config_error("--tokens: no token given");
  return ids;
}

// ---- memory --------------------------------------------------------------------------------------

/// The process's peak resident set (VmHWM) since the last reset_peak_rss(), in MiB; getrusage's maxrss otherwise.
double peak_rss_mib() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.compare(0, 6, "VmHWM:") == 0) return std::stod(line.substr(6)) / 1024.0;  // "VmHWM:   83344 kB"
  struct rusage u {};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_maxrss) / 1024.0;
}

/// Starts the peak over at the current resident set (Linux: writing 5 to clear_refs), so that a training run's peak
/// is not the texts' reading and tokenising before it. False when the kernel refuses.
bool reset_peak_rss() {
  std::ofstream clear("/proc/self/clear_refs");
  clear << "5";
  clear.flush();
  return static_cast<bool>(clear);
}

// ---- pretraining ---------------------------------------------------------------------------------

struct PretrainOptions {
  gpt::Config config;
  gpt::TrainOptions train;
  std::string text = default_pretrain_text;
  double val_fraction = 0.05;
  std::size_t eval_tokens = 65536;
};

nlohmann::ordered_json pretrain_record(const PretrainOptions& o, std::uint64_t fingerprint) {
  nlohmann::ordered_json j;
  j["config"] = o.config.to_json();
  j["text"] = o.text;
  j["text_fingerprint"] = std::to_string(fingerprint);
  j["steps"] = o.train.steps;
  j["batch"] = o.train.batch;
  j["seq"] = o.train.seq;
  j["lr"] = o.train.lr;
  j["seed"] = o.train.seed;
  j["eval_tokens"] = o.eval_tokens;
  return j;
}

/// Trains (or finds cached in `dir`) the base model. Returns its validation loss on the pretraining text.
double pretrain(const PretrainOptions& o, const std::string& dir, bool force) {
  const gpt::Corpus text = gpt::read_corpus(o.text, o.val_fraction, gpt::byte_tokens);
  const auto record = pretrain_record(o, text.fingerprint);
  const fs::path info = fs::path(dir) / "pretrain.json";
  if (!force && fs::exists(info) && fs::exists(fs::path(dir) / "model.safetensors")) {
    nlohmann::json saved =
        nlohmann::json::parse(lora::detail::read_small_file(info.string(), 1u << 20, "pretrain.json"), nullptr, false);
    if (!saved.is_discarded() && saved.contains("settings") && saved["settings"] == nlohmann::json(record)) {
      std::printf("pretrain: %s is cached (same settings and text); --force trains again\n", dir.c_str());
      return saved.value("val_loss", 0.0);
    }
  }
  std::printf("pretrain: %s, %zu bytes (%zu training, %zu validation tokens)\n", o.text.c_str(), text.bytes,
              text.train.size(), text.val.size());
  auto weights = std::make_shared<Weights>(Weights::initialized(o.config, o.train.seed));
  Model model(weights);
  model.set_train_base(true);
  std::printf("pretrain: GPT-2 with %d layers, %d heads, %d channels, %d positions: %ld parameters\n", o.config.n_layer,
              o.config.n_head, o.config.n_embd, o.config.n_positions, static_cast<long>(weights->total_size()));
  gpt::TrainOptions t = o.train;
  t.label = "pretrain";
  const auto r = gpt::train(model, text.train, t);
  const double val = gpt::evaluate(model, text.val, t.batch, t.seq, o.eval_tokens);
  std::printf("pretrain: %ld steps in %s, validation loss %.4f (perplexity %.2f per byte)\n", t.steps,
              gpt::duration_text(r.seconds).c_str(), val, std::exp(val));
  gpt::save_model(dir, *weights);
  nlohmann::ordered_json saved;
  saved["settings"] = record;
  saved["val_loss"] = val;
  saved["seconds"] = r.seconds;
  const std::string body = saved.dump(2) + "\n";
  lora::detail::StagedFile(info.string(), [&](lora::detail::FileSink& s) {
    s.write(body.data(), body.size());
  }).commit();
  return val;
}

// ---- the study -------------------------------------------------------------------------------------

/// One row of the study: which matrices get LoRA at which rank, or full fine-tuning, or nothing.
struct Method {
  std::string name;
  bool q = false, k = false, v = false, o = false;
  int r = 0;
  bool full = false;  ///< full fine-tuning
  bool frozen = false;
  std::string table;  ///< "5", "6", "5,6" or "" (baselines)
};

std::vector<Method> study_methods() {
  std::vector<Method> m;
  auto lora = [&](std::string name, bool q, bool k, bool v, bool o, int r, std::string table) {
    Method x;
    x.name = std::move(name);
    x.q = q, x.k = k, x.v = v, x.o = o, x.r = r, x.table = std::move(table);
    m.push_back(x);
  };
  Method frozen;
  frozen.name = "frozen";
  frozen.frozen = true;
  m.push_back(frozen);
  Method full;
  full.name = "full";
  full.full = true;
  m.push_back(full);
  lora("Wq r=8", true, false, false, false, 8, "5");
  lora("Wk r=8", false, true, false, false, 8, "5");
  lora("Wv r=8", false, false, true, false, 8, "5");
  lora("Wo r=8", false, false, false, true, 8, "5");
  lora("Wq,Wv r=4", true, false, true, false, 4, "5,6");
  lora("Wq,Wk,Wv,Wo r=2", true, true, true, true, 2, "5");
  for (int r : {1, 2, 8, 64}) lora("Wq,Wv r=" + std::to_string(r), true, false, true, false, r, "6");
  return m;
}

std::string slug(const std::string& name) {
  std::string s;
  for (char ch : name) s += std::isalnum(static_cast<unsigned char>(ch)) ? static_cast<char>(std::tolower(ch)) : '_';
  return s;
}

struct StudySettings {
  std::string model_dir, out_dir, new_text = default_adapt_text, old_text = default_pretrain_text;
  gpt::TrainOptions lora, full;
  double lora_alpha = 8;  // the paper sets alpha to the first r it tries and does not tune it
  std::size_t eval_tokens = 32768;
  int samples = 200;  ///< bytes sampled after the prompt
};

/// Adapts the model as `m` says, evaluates it, saves its adapter, and writes the result as JSON. Runs in a process
/// of its own (study spawns `gpt study-run`), so its peak resident memory is its own.
nlohmann::ordered_json run_method(const Method& m, const StudySettings& s) {
  const gpt::Corpus fresh = gpt::read_corpus(s.new_text, 0.1, gpt::byte_tokens);
  const gpt::Corpus old = gpt::read_corpus(s.old_text, 0.05, gpt::byte_tokens);
  auto weights = std::make_shared<Weights>(
      gpt::load_model<float>(s.model_dir, m.full ? gpt::LoadMode::copy : gpt::LoadMode::view));
  Model model(weights);
  const gpt::TrainOptions& t = m.full ? s.full : s.lora;
  nlohmann::ordered_json j;
  j["method"] = m.name;
  j["table"] = m.table;
  // The pretrained model's numbers, before anything changes: the reference every row compares with.
  const double old_before = gpt::evaluate(model, old.val, t.batch, t.seq, s.eval_tokens);
  lora::LoraConfig cfg, off;
  cfg.r = m.r;
  cfg.lora_alpha = s.lora_alpha;
  cfg.seed = t.seed;
  off.r = 0;
  if (m.full) {
    model.set_train_base(true);
  } else if (!m.frozen) {
    for (int l = 0; l < model.config().n_layer; ++l) {
      if (m.q || m.k || m.v)
        model.add_qkv_lora(Model::module_name(l, 0), m.q ? cfg : off, m.k ? cfg : off, m.v ? cfg : off);
      if (m.o) model.add_lora(Model::module_name(l, 1), cfg);
    }
  }
  const auto count = model.parameter_count();
  j["trainable"] = count.trainable;
  j["peak_rss_reset"] = reset_peak_rss();
  gpt::TrainResult r;
  if (!m.frozen) {
    gpt::TrainOptions run = t;
    run.label = m.name;
    r = gpt::train(model, fresh.train, run);
  }
  j["optimizer_state_bytes"] = r.optimizer_state_floats * sizeof(float);
  j["step_ms"] = r.median_step_seconds * 1e3;
  j["train_seconds"] = r.seconds;
  j["losses"] = r.losses;
  const double new_val = gpt::evaluate(model, fresh.val, t.batch, t.seq, s.eval_tokens);
  const double old_val = gpt::evaluate(model, old.val, t.batch, t.seq, s.eval_tokens);
  j["peak_rss_mib"] = peak_rss_mib();  // the texts and the model loaded, then training and evaluation
  j["new_val_loss"] = new_val;
  j["old_val_loss"] = old_val;
  j["old_val_loss_pretrained"] = old_before;
  if (!m.full && !m.frozen) {
    model.enable_adapters(false);
    j["old_val_loss_adapter_off"] = gpt::evaluate(model, old.val, t.batch, t.seq, s.eval_tokens);
    model.enable_adapters(true);
    const std::string dir = (fs::path(s.out_dir) / "adapters" / slug(m.name)).string();
    gpt::save_adapter(model, dir, s.model_dir);
    j["adapter"] = dir;
  }
  const std::string prompt = "The ";
  auto ids = gpt::generate(model, gpt::byte_tokens(prompt), s.samples, 0.8, 40, 7);
  j["sample"] = prompt + gpt::bytes_text(ids);
  return j;
}

/// Runs `gpt study-run` for each method, `jobs` at a time; collects their JSON results.
std::vector<nlohmann::json> run_all(const std::vector<Method>& methods, const std::vector<std::string>& common,
                                    const std::string& out_dir, int jobs) {
  std::vector<nlohmann::json> results(methods.size());
  std::map<pid_t, std::size_t> running;
  std::size_t next = 0;
  auto result_path = [&](std::size_t i) {
    return (fs::path(out_dir) / "runs" / (slug(methods[i].name) + ".json")).string();
  };
  fs::create_directories(fs::path(out_dir) / "runs");
  std::string failed;
  while (next < methods.size() || !running.empty()) {
    while (failed.empty() && next < methods.size() && static_cast<int>(running.size()) < jobs) {
      std::vector<std::string> args{"/proc/self/exe",   "study-run", "--method",
                                    methods[next].name, "--result",  result_path(next)};
      args.insert(args.end(), common.begin(), common.end());
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      pid_t pid = 0;
      if (posix_spawn(&pid, "/proc/self/exe", nullptr, nullptr, argv.data(), environ) != 0)
        throw lora::io_error("study: cannot start a process for \"" + methods[next].name + "\"");
      running[pid] = next++;
    }
    if (running.empty()) break;
    int status = 0;
    const pid_t pid = waitpid(-1, &status, 0);
    if (pid < 0) throw lora::io_error("study: waitpid failed");
    const std::size_t i = running.at(pid);
    running.erase(pid);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      if (failed.empty()) failed = methods[i].name;
      continue;
    }
    std::ifstream in(result_path(i));
    results[i] = nlohmann::json::parse(in);
  }
  if (!failed.empty()) throw lora::error("study: the run \"" + failed + "\" failed (its message is above)");
  return results;
}

std::string fixed(double v, int digits) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", digits, v);
  return buf;
}

/// Writes results.md, results.csv, curves.csv, samples.txt and loss.png (gnuplot, when installed).
void write_report(const std::vector<Method>& methods, const std::vector<nlohmann::json>& results,
                  const StudySettings& s, double pretrain_val, const std::string& out_dir, bool plot) {
  std::ofstream md(fs::path(out_dir) / "results.md"), csv(fs::path(out_dir) / "results.csv");
  md << "| method | paper table | trainable params | optimizer state | new text: val loss | perplexity | old text: "
        "val loss | old text, adapter off | step (ms) | peak RSS in training (MiB) |\n";
  md << "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|\n";
  csv << "method,table,trainable,optimizer_state_bytes,new_val_loss,new_val_ppl,old_val_loss,old_val_loss_adapter_off,"
         "step_ms,peak_rss_mib\n";
  for (std::size_t i = 0; i < methods.size(); ++i) {
    const auto& r = results[i];
    const std::string off = r.contains("old_val_loss_adapter_off") ? fixed(r["old_val_loss_adapter_off"], 4) : "";
    md << "| " << methods[i].name << " | " << methods[i].table << " | " << r["trainable"].get<long>() << " | "
       << fixed(r["optimizer_state_bytes"].get<double>() / 1024.0, 1) << " KiB | " << fixed(r["new_val_loss"], 4)
       << " | " << fixed(std::exp(r["new_val_loss"].get<double>()), 3) << " | " << fixed(r["old_val_loss"], 4) << " | "
       << off << " | " << (methods[i].frozen ? "" : fixed(r["step_ms"], 1)) << " | " << fixed(r["peak_rss_mib"], 0)
       << " |\n";
    csv << '"' << methods[i].name << "\"," << '"' << methods[i].table << "\"," << r["trainable"].get<long>() << ","
        << r["optimizer_state_bytes"].get<long>() << "," << fixed(r["new_val_loss"], 6) << ","
        << fixed(std::exp(r["new_val_loss"].get<double>()), 6) << "," << fixed(r["old_val_loss"], 6) << "," << off
        << "," << fixed(r["step_ms"], 3) << "," << fixed(r["peak_rss_mib"], 1) << "\n";
  }
  md << "\nEvery method: " << s.lora.steps << " steps of " << s.lora.batch << " x " << s.lora.seq << " bytes of "
     << s.new_text << ", lora_alpha " << s.lora_alpha << ". The pretrained model's validation loss on " << s.old_text
     << ": " << fixed(pretrain_val, 4) << ".\n";
  md.close();
  csv.close();
  // Training-loss curves, averaged over 10 steps, one column per trained method.
  std::vector<std::size_t> trained;
  {
    std::ofstream curves(fs::path(out_dir) / "curves.csv");
    curves << "step";
    for (std::size_t i = 0; i < methods.size(); ++i)
      if (!methods[i].frozen) {
        trained.push_back(i);
        curves << ",\"" << methods[i].name << '"';
      }
    curves << "\n";
    const std::size_t steps = results[trained.front()]["losses"].size();
    for (std::size_t step = 0; step < steps; ++step) {
      curves << step + 1;
      for (std::size_t i : trained) {
        const auto& losses = results[i]["losses"];
        double sum = 0;
        std::size_t n = 0;
        for (std::size_t k = step >= 9 ? step - 9 : 0; k <= step && k < losses.size(); ++k, ++n)
          sum += losses[k].get<double>();
        curves << "," << fixed(n ? sum / n : 0, 5);
      }
      curves << "\n";
    }
  }
  {
    std::ofstream samples(fs::path(out_dir) / "samples.txt");
    for (std::size_t i = 0; i < methods.size(); ++i)
      samples << "== " << methods[i].name << " ==\n" << results[i]["sample"].get<std::string>() << "\n\n";
  }
  if (!plot) return;
  if (std::system("command -v gnuplot > /dev/null 2>&1") != 0) {
    std::printf("gnuplot not found (Debian: gnuplot-nox): no plot\n");
    return;
  }
  const std::string script = (fs::path(out_dir) / "loss.gp").string();
  const std::string points = (fs::path(out_dir) / "points.tsv").string();
  {
    // Each method's validation loss on the new text against the old one's: adapting against forgetting.
    std::ofstream pts(points);
    for (std::size_t i = 0; i < methods.size(); ++i)
      pts << fixed(results[i]["new_val_loss"], 6) << '\t' << fixed(results[i]["old_val_loss"], 6) << '\t'
          << methods[i].name << "\n";
  }
  {
    static const char* colors[] = {"#000000", "#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00",
                                   "#a65628", "#f781bf", "#999999", "#66c2a5", "#1b9e77", "#d95f02"};
    std::ofstream gp(script);
    gp << "set terminal pngcairo size 1400,620 noenhanced\nset output '" << (fs::path(out_dir) / "loss.png").string()
       << "'\nset multiplot layout 1,2 title 'LoRA on a GPT-2 pretrained on fortunes, adapted to license texts'\n"
          "set datafile separator ','\nset key top right font ',9'\nset xlabel 'step'\n"
          "set ylabel 'training loss on the new text (nats per byte, mean of 10 steps)'\nplot ";
    for (std::size_t c = 0; c < trained.size(); ++c)
      gp << (c ? ", " : "") << "'" << (fs::path(out_dir) / "curves.csv").string() << "' using 1:" << c + 2
         << " skip 1 with lines lw 1.5 lc rgb '" << colors[c % 12] << "' dt "
         << (methods[trained[c]].table == "6" ? 2 : 1) << " title '" << methods[trained[c]].name << "'";
    gp << "\nset datafile separator '\\t'\nunset key\nset xlabel 'validation loss on the new text (license texts)'\n"
          "set ylabel 'validation loss on the old text (fortunes)'\nset offsets graph 0.05, graph 0.2, graph 0.05, "
          "graph 0.05\nplot '"
       << points
       << "' using 1:2 with points pt 7 ps 1.2 lc rgb '#377eb8', '' using 1:2:3 with labels left offset "
          "char 0.8,0 font ',9'\nunset multiplot\n";
  }
  if (std::system(("gnuplot '" + script + "'").c_str()) != 0) std::printf("gnuplot failed: no plot\n");
}

// ---- commands --------------------------------------------------------------------------------------

void add_config_options(CLI::App* cmd, gpt::Config& c) {
  cmd->add_option("--layers", c.n_layer, "Transformer blocks")->check(CLI::Range(1, 96))->capture_default_str();
  cmd->add_option("--heads", c.n_head, "Attention heads")->check(CLI::Range(1, 128))->capture_default_str();
  cmd->add_option("--embd", c.n_embd, "Channels")->check(CLI::Range(1, 16384))->capture_default_str();
  cmd->add_option("--positions", c.n_positions, "Context length")->check(CLI::Range(2, 8192))->capture_default_str();
}

void write_logits(const std::string& path, const lora::Matrix<float>& logits) {
  lora::safetensors::Writer w;
  w.set_metadata("format", "pt");
  w.add("logits", logits, lora::safetensors::Dtype::F32);
  w.save(path);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"gpt: GPT-2 trained and adapted with LoRA in C++ (see examples/gpt/README.md)"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "gpt (lora example) 1");

  // pretrain
  PretrainOptions pre;
  pre.train.steps = 3000;
  pre.train.lr = 2e-3;
  pre.train.warmup = 50;
  pre.train.weight_decay = 0.01;
  std::string pre_out = "output/pretrained";
  bool force = false;
  auto* cmd_pre = app.add_subcommand("pretrain", "Train a small GPT-2 from scratch (cached)");
  add_config_options(cmd_pre, pre.config);
  cmd_pre->add_option("--steps", pre.train.steps, "Training steps")
      ->check(CLI::Range(1L, 100000000L))
      ->capture_default_str();
  cmd_pre->add_option("--text", pre.text, "A text file or a folder of them")->capture_default_str();
  cmd_pre->add_option("--out", pre_out, "Model folder")->capture_default_str();
  cmd_pre->add_flag("--force", force, "Train even when the folder holds a model made with the same settings");

  // study and its worker
  StudySettings study;
  study.lora.steps = 600;
  study.lora.lr = 2e-3;
  study.full.steps = 600;
  study.full.lr = 5e-4;
  study.full.weight_decay = 0.01;
  std::string study_out = "output/study";
  bool quick = false, plot = true;
  int jobs = 2;
  auto* cmd_study = app.add_subcommand("study", "The LoRA paper's Tables 5 and 6 in miniature");
  cmd_study->add_option("--out", study_out, "Output folder")->capture_default_str();
  cmd_study->add_flag("--quick", quick, "A small model and few steps (under 2 minutes), as ctest runs it");
  cmd_study->add_option("--steps", study.lora.steps, "Adaptation steps of every method")
      ->check(CLI::Range(1L, 100000000L))
      ->capture_default_str();
  cmd_study->add_option("--pretrain-steps", pre.train.steps, "Pretraining steps")
      ->check(CLI::Range(1L, 100000000L))
      ->capture_default_str();
  cmd_study->add_option("--jobs", jobs, "Methods trained at once (each in its own process, one thread each)")
      ->check(CLI::Range(1, 64))
      ->capture_default_str();
  cmd_study->add_option("--new-text", study.new_text, "The text to adapt to")->capture_default_str();
  cmd_study->add_option("--old-text", study.old_text, "The pretraining text")->capture_default_str();
  cmd_study->add_flag("!--no-plot", plot, "Do not run gnuplot");
  add_config_options(cmd_study, pre.config);
  std::string method_name, result_path;
  auto* cmd_run = app.add_subcommand("study-run", "One method of the study (study runs it)");
  cmd_run->group("");  // hidden
  cmd_run->add_option("--method", method_name)->required();
  cmd_run->add_option("--result", result_path)->required();
  cmd_run->add_option("--model", study.model_dir)->required();
  cmd_run->add_option("--out", study.out_dir)->required();
  cmd_run->add_option("--steps", study.lora.steps);
  cmd_run->add_option("--eval-tokens", study.eval_tokens);
  cmd_run->add_option("--seq", study.lora.seq);
  cmd_run->add_option("--samples", study.samples);
  cmd_run->add_option("--new-text", study.new_text);
  cmd_run->add_option("--old-text", study.old_text);

  // eval, generate
  std::string model_dir, adapter_dir, tokens_text, logits_path, prompt = "The ";
  int count = 200, top_k = 40;
  double temperature = 0.8;
  std::uint64_t seed = 1;
  auto* cmd_eval = app.add_subcommand("eval", "Logits of a model (and adapter) for given token ids");
  cmd_eval->add_option("--model", model_dir, "A folder with config.json and model.safetensors")->required();
  cmd_eval->add_option("--adapter", adapter_dir, "A PEFT adapter folder");
  cmd_eval->add_option("--tokens", tokens_text, "Token ids, comma-separated")->required();
  cmd_eval->add_option("--logits", logits_path, "Output: a safetensors file with one F32 tensor \"logits\" (T, V)")
      ->required();
  auto* cmd_gen = app.add_subcommand("generate", "Sample text from a model (and adapter)");
  cmd_gen->add_option("--model", model_dir, "A folder with config.json and model.safetensors")->required();
  cmd_gen->add_option("--adapter", adapter_dir, "A PEFT adapter folder");
  cmd_gen->add_option("--prompt", prompt, "The text to continue")->capture_default_str();
  cmd_gen->add_option("--count", count, "Tokens to sample")->check(CLI::Range(1, 1 << 20))->capture_default_str();
  cmd_gen->add_option("--temperature", temperature, "0: greedy")->check(CLI::Range(0.0, 100.0))->capture_default_str();
  cmd_gen->add_option("--top-k", top_k, "Sample among the k likeliest (0: all)")->check(CLI::Range(0, 1 << 30));
  cmd_gen->add_option("--seed", seed, "Sampling seed")->capture_default_str();

  // finetune
  gpt::TrainOptions ft;
  ft.steps = 300;
  ft.lr = 2e-3;
  std::string ft_text, ft_out, targets = "attn.c_attn";
  int rank = 8;
  double alpha = 16, val_fraction = 0.1;
  bool qv = true;
  auto* cmd_ft = app.add_subcommand("finetune", "LoRA on your own text; saves a PEFT adapter folder");
  cmd_ft->add_option("--model", model_dir, "A folder with config.json and model.safetensors")->required();
  cmd_ft->add_option("--text", ft_text, "A text file (or a folder of them) to adapt to")->required();
  cmd_ft->add_option("--out", ft_out, "The adapter folder to write")->required();
  cmd_ft
      ->add_option("--target-modules", targets,
                   "PEFT target_modules: comma-separated names or suffixes (c_attn, attn.c_proj, mlp.c_fc, ...), "
                   "one regex, or all-linear")
      ->capture_default_str();
  cmd_ft->add_flag("!--no-qv-slices", qv, "LoRA on the whole c_attn instead of its q and v slices");
  cmd_ft->add_option("-r,--rank", rank, "LoRA rank")->check(CLI::Range(1, 4096))->capture_default_str();
  cmd_ft->add_option("--alpha", alpha, "lora_alpha")->capture_default_str();
  cmd_ft->add_option("--steps", ft.steps, "Training steps")->check(CLI::Range(1L, 100000000L))->capture_default_str();
  cmd_ft->add_option("--lr", ft.lr, "Peak learning rate (AdamW, cosine)")->capture_default_str();
  cmd_ft->add_option("--batch", ft.batch, "Sequences per step")->check(CLI::Range(1L, 4096L))->capture_default_str();
  cmd_ft->add_option("--seq", ft.seq, "Tokens per sequence (at most n_positions)")
      ->check(CLI::Range(1L, 1L << 20))
      ->capture_default_str();
  cmd_ft->add_option("--val-fraction", val_fraction, "The last part of the text held out")->capture_default_str();

  // bench
  gpt::Config bench_config;
  Index bench_batch = 8, bench_seq = 128;
  double bench_seconds = 3;
  int bench_reps = 5, bench_rank = 8;
  bool bench_full = false;
  std::string bench_json;
  auto* cmd_bench = app.add_subcommand("bench", "Training throughput of LoRA on q, v (tokens/s)");
  add_config_options(cmd_bench, bench_config);
  cmd_bench->add_option("--batch", bench_batch)->capture_default_str();
  cmd_bench->add_option("--seq", bench_seq)->capture_default_str();
  cmd_bench->add_option("--rank", bench_rank)->capture_default_str();
  cmd_bench->add_option("--min-time", bench_seconds, "Seconds per repetition")->capture_default_str();
  cmd_bench->add_option("--repetitions", bench_reps)->capture_default_str();
  cmd_bench->add_flag("--full", bench_full, "Full fine-tuning instead");
  cmd_bench->add_option("--json", bench_json, "Also write the result as JSON");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 1;
  }

  try {
    if (*cmd_pre) {
      pretrain(pre, pre_out, force);
      return 0;
    }

    if (*cmd_study) {
      const auto start = std::chrono::steady_clock::now();
      StudySettings& s = study;
      s.out_dir = study_out;
      s.model_dir = (fs::path(study_out) / "pretrained").string();
      std::vector<std::string> common;
      if (quick) {
        pre.config.n_layer = 2;
        pre.config.n_head = 2;
        pre.config.n_embd = 64;
        pre.config.n_positions = 64;
        pre.train.steps = std::min<long>(pre.train.steps, 300);
        pre.train.seq = 64;
        pre.train.batch = 8;
        s.lora.steps = std::min<long>(s.lora.steps, 60);
        s.lora.seq = 64;
        s.eval_tokens = 4096;
        s.samples = 60;
        pre.eval_tokens = 4096;
      }
      for (const std::string* text : {&s.old_text, &s.new_text})
        if (!fs::exists(*text) && (*text == default_pretrain_text || *text == default_adapt_text)) {
          std::fprintf(stderr,
                       "gpt study: %s is missing (Debian: apt-get install fortunes, or give --old-text and "
                       "--new-text)\n",
                       text->c_str());
          return 77;  // ctest's "skipped"
        }
      pre.text = s.old_text;
      pre.eval_tokens = s.eval_tokens;  // the frozen row of the table then shows the same number
      pre.train.seq = std::min<Index>(pre.train.seq, pre.config.n_positions);
      const double pretrain_val = pretrain(pre, s.model_dir, false);
      common = {"--model",       s.model_dir,
                "--out",         s.out_dir,
                "--steps",       std::to_string(s.lora.steps),
                "--eval-tokens", std::to_string(s.eval_tokens),
                "--seq",         std::to_string(s.lora.seq),
                "--samples",     std::to_string(s.samples),
                "--new-text",    s.new_text,
                "--old-text",    s.old_text};
      const auto methods = study_methods();
      std::printf("study: %zu methods, %d at a time, %ld steps each, on %s\n", methods.size(), jobs, s.lora.steps,
                  s.new_text.c_str());
      const auto results = run_all(methods, common, s.out_dir, jobs);
      write_report(methods, results, s, pretrain_val, s.out_dir, plot);
      std::ifstream md(fs::path(s.out_dir) / "results.md");
      std::cout << md.rdbuf();
      // What must hold whatever the numbers: the adapters never touched the base.
      int bad = 0;
      for (std::size_t i = 0; i < methods.size(); ++i) {
        const auto& r = results[i];
        if (r.contains("old_val_loss_adapter_off") && r["old_val_loss_adapter_off"] != r["old_val_loss_pretrained"]) {
          std::fprintf(stderr, "study: %s: with the adapter off the old text's loss is %.9g, the pretrained %.9g\n",
                       methods[i].name.c_str(), r["old_val_loss_adapter_off"].get<double>(),
                       r["old_val_loss_pretrained"].get<double>());
          ++bad;
        }
        if (!methods[i].frozen && !methods[i].full &&
            !(r["new_val_loss"].get<double>() < results[0]["new_val_loss"].get<double>())) {
          std::fprintf(stderr, "study: %s did not lower the new text's validation loss below the frozen model's\n",
                       methods[i].name.c_str());
          ++bad;
        }
      }
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      std::printf("study: done in %s; %s/results.md, results.csv, curves.csv, samples.txt, adapters/\n",
                  gpt::duration_text(seconds).c_str(), s.out_dir.c_str());
      return bad ? 1 : 0;
    }

    if (*cmd_run) {
      const auto methods = study_methods();
      auto it = std::find_if(methods.begin(), methods.end(), [&](const Method& m) { return m.name == method_name; });
      if (it == methods.end()) throw lora::config_error("study-run: no method \"" + method_name + "\"");
      study.full.steps = study.lora.steps;
      study.full.seq = study.lora.seq;
      study.lora.progress_seconds = study.full.progress_seconds = 15;
      const auto j = run_method(*it, study);
      const std::string body = j.dump() + "\n";
      lora::detail::StagedFile(result_path, [&](lora::detail::FileSink& f) {
        f.write(body.data(), body.size());
      }).commit();
      return 0;
    }

    if (*cmd_eval || *cmd_gen) {
      auto weights = std::make_shared<Weights>(gpt::load_model<float>(model_dir, gpt::LoadMode::view));
      Model model(weights);
      if (!adapter_dir.empty()) gpt::load_adapter(model, adapter_dir);
      model.eval();
      if (*cmd_eval) {
        const auto ids = parse_ids(tokens_text, weights->config.vocab_size);
        if (static_cast<Index>(ids.size()) > weights->config.n_positions)
          throw lora::config_error("--tokens: " + std::to_string(ids.size()) +
                                   " tokens, more than n_positions = " + std::to_string(weights->config.n_positions));
        const lora::Matrix<float> logits = model.forward(ids.data(), 1, static_cast<Index>(ids.size()));
        write_logits(logits_path, logits);
        std::printf("eval: logits (%zu, %d) written to %s\n", ids.size(), weights->config.vocab_size,
                    logits_path.c_str());
        return 0;
      }
      const Tokenizer tok = Tokenizer::for_model(model_dir, weights->config);
      const auto ids = tok.encode(prompt);
      const auto out = gpt::generate(model, ids, count, temperature, top_k, seed);
      std::printf("%s%s\n", prompt.c_str(), tok.decode(out).c_str());
      return 0;
    }

    if (*cmd_ft) {
      auto weights = std::make_shared<Weights>(gpt::load_model<float>(model_dir, gpt::LoadMode::view));
      Model model(weights);
      const Tokenizer tok = Tokenizer::for_model(model_dir, weights->config);
      if (ft.seq > weights->config.n_positions)
        throw lora::config_error("--seq " + std::to_string(ft.seq) + " is more than the model's n_positions " +
                                 std::to_string(weights->config.n_positions));
      lora::peft::AdapterConfig pc;
      pc.r = rank;
      pc.lora_alpha = alpha;
      // As PEFT: a list of names or suffixes, or one string that is a regex (or "all-linear").
      if (targets.find(',') == std::string::npos &&
          (targets.find_first_of("*()[]|\\^$?+") != std::string::npos || targets == "all-linear")) {
        pc.target_modules_regex = targets;
      } else {
        std::stringstream in(targets);
        std::string item;
        while (std::getline(in, item, ','))
          if (!item.empty()) pc.target_modules.push_back(item);
      }
      const auto modules = lora::peft::select_targets(model.module_names(), pc);
      lora::LoraConfig cfg, off;
      cfg.r = rank;
      cfg.lora_alpha = alpha;
      off.r = 0;
      for (const auto& m : modules) {
        if (m == "transformer.wte" || m == "transformer.wpe")
          throw lora::config_error("--target-modules selects the embedding \"" + m +
                                   "\"; this example adapts the Conv1D projections only");
        if (qv && m.size() > 12 && m.compare(m.size() - 12, 12, ".attn.c_attn") == 0)
          model.add_qkv_lora(m, cfg, off, cfg);
        else
          model.add_lora(m, cfg);
      }
      const gpt::Corpus text =
          gpt::read_corpus(ft_text, val_fraction, [&](const std::string& t) { return tok.encode(t); });
      std::printf(
          "finetune: %zu modules (%s ... %s), %ld trainable parameters; %zu training and %zu validation "
          "tokens\n",
          modules.size(), modules.front().c_str(), modules.back().c_str(),
          static_cast<long>(model.parameter_count().trainable), text.train.size(), text.val.size());
      const double before = gpt::evaluate(model, text.val, ft.batch, ft.seq, 1 << 20);
      ft.label = "finetune";
      gpt::train(model, text.train, ft);
      const double after = gpt::evaluate(model, text.val, ft.batch, ft.seq, 1 << 20);
      std::printf("finetune: validation loss %.4f -> %.4f (perplexity %.3f -> %.3f)\n", before, after, std::exp(before),
                  std::exp(after));
      gpt::save_adapter(model, ft_out, model_dir);
      std::printf("finetune: adapter saved to %s\n", ft_out.c_str());
      return 0;
    }

    if (*cmd_bench) {
      bench_config.n_positions = std::max<int>(bench_config.n_positions, static_cast<int>(bench_seq));
      auto weights = std::make_shared<Weights>(Weights::initialized(bench_config, 1));
      Model model(weights);
      lora::LoraConfig cfg, off;
      cfg.r = bench_rank;
      cfg.lora_alpha = 2.0 * bench_rank;
      off.r = 0;
      if (bench_full)
        model.set_train_base(true);
      else
        for (int l = 0; l < bench_config.n_layer; ++l) model.add_qkv_lora(Model::module_name(l, 0), cfg, off, cfg);
      std::vector<int> data(1 << 16);
      std::mt19937_64 rng(1);
      for (auto& t : data) t = static_cast<int>(rng() % static_cast<std::uint64_t>(bench_config.vocab_size));
      gpt::TrainOptions t;
      t.batch = bench_batch;
      t.seq = bench_seq;
      t.progress_seconds = 0;
      t.steps = 3;
      const double warm = gpt::train(model, data, t).median_step_seconds;  // warm-up, and the steps per repetition
      t.steps = std::max<long>(3, static_cast<long>(bench_seconds / warm));
      std::vector<double> medians;
      for (int rep = 0; rep < bench_reps; ++rep) medians.push_back(gpt::train(model, data, t).median_step_seconds);
      std::sort(medians.begin(), medians.end());
      const double step = medians[medians.size() / 2];
      const double tokens = static_cast<double>(bench_batch * bench_seq) / step;
      std::printf(
          "gpt bench: %s, %d layers, %d heads, %d channels, B=%ld T=%ld: step %.2f ms, %.0f tokens/s (median "
          "of %d)\n",
          bench_full ? "full fine-tuning" : "LoRA on q,v", bench_config.n_layer, bench_config.n_head,
          bench_config.n_embd, static_cast<long>(bench_batch), static_cast<long>(bench_seq), step * 1e3, tokens,
          bench_reps);
      if (!bench_json.empty()) {
        nlohmann::ordered_json j;
        j["variant"] = bench_full ? "full" : "lora_qv";
        j["step_ms"] = step * 1e3;
        j["tokens_per_s"] = tokens;
        std::ofstream(bench_json) << j.dump(2) << "\n";
      }
      return 0;
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gpt: %s\n", e.what());
    return 1;
  }
  return 0;
}
