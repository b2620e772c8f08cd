// Text, batches, the training loop, evaluation and sampling for examples/gpt.
#pragma once

#include "model.hpp"

#include <lora/detail/file.hpp>
#include <lora/errors.hpp>
#include <lora/optim.hpp>
#include <lora/schedule.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace gpt {

/// A text cut into tokens, with a training and a validation part.
struct Corpus {
  std::string name;
  std::vector<int> train, val;
  std::size_t bytes = 0;
  std::uint64_t fingerprint = 0;  ///< FNV-1a of the bytes read, to tell whether a cached model saw this text
};

inline std::uint64_t fnv1a(const std::string& s, std::uint64_t h = 1469598103934665603ull) {
  for (unsigned char ch : s) h = (h ^ ch) * 1099511628211ull;
  return h;
}

/// The regular files a path names: itself, or those directly inside a folder (symlinks and fortune's .dat
/// index files left out), sorted by name so every machine reads them in one order.
inline std::vector<std::string> text_files(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::exists(path, ec)) throw lora::io_error(path + ": no such file or folder");
  if (!fs::is_directory(path, ec)) return {path};
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(path)) {
    if (e.is_symlink() || !e.is_regular_file()) continue;
    const std::string name = e.path().filename().string();
    if (name.size() > 4 && name.compare(name.size() - 4, 4, ".dat") == 0) continue;
    out.push_back(e.path().string());
  }
  std::sort(out.begin(), out.end());
  if (out.empty()) throw lora::io_error(path + ": the folder holds no regular file to read");
  return out;
}

/// Reads a file or a folder of files; the last `val_fraction` of every file is validation text. `encode` turns
/// bytes into token ids (the bytes themselves for the byte-level models made here).
inline Corpus read_corpus(const std::string& path, double val_fraction,
                          const std::function<std::vector<int>(const std::string&)>& encode) {
  if (!(val_fraction > 0 && val_fraction < 1))
    throw lora::config_error("validation fraction must be in (0, 1), got " + std::to_string(val_fraction));
  Corpus c;
  c.name = path;
  for (const auto& file : text_files(path)) {
    const std::string text = lora::detail::read_small_file(file, std::size_t(1) << 30, "a text file");
    c.bytes += text.size();
    c.fingerprint = fnv1a(file + "\n" + text, c.fingerprint ? c.fingerprint : 1469598103934665603ull);
    const std::size_t cut = text.size() - static_cast<std::size_t>(static_cast<double>(text.size()) * val_fraction);
    auto a = encode(text.substr(0, cut)), b = encode(text.substr(cut));
    c.train.insert(c.train.end(), a.begin(), a.end());
    c.val.insert(c.val.end(), b.begin(), b.end());
  }
  return c;
}

inline std::vector<int> byte_tokens(const std::string& text) {
  std::vector<int> ids(text.size());
  for (std::size_t i = 0; i < text.size(); ++i) ids[i] = static_cast<unsigned char>(text[i]);
  return ids;
}
inline std::string bytes_text(const std::vector<int>& ids) {
  std::string s;
  for (int id : ids) s.push_back(static_cast<char>(id));
  return s;
}

/// B windows of T + 1 tokens at random places: inputs (B, T) and their next tokens (B, T).
struct Batcher {
  const std::vector<int>* tokens;
  Index B, T;
  std::mt19937_64 rng;
  std::vector<int> x, y;

  Batcher(const std::vector<int>& t, Index batch, Index seq, std::uint64_t seed)
      : tokens(&t), B(batch), T(seq), rng(seed), x(static_cast<std::size_t>(batch * seq)), y(x.size()) {
    if (static_cast<Index>(t.size()) < seq + 2)
      throw lora::config_error("the text has " + std::to_string(t.size()) + " tokens, fewer than one window of " +
                               std::to_string(seq + 1));
  }
  void next() {
    std::uniform_int_distribution<std::size_t> start(0, tokens->size() - static_cast<std::size_t>(T) - 1);
    for (Index b = 0; b < B; ++b) {
      const std::size_t s = start(rng);
      for (Index t = 0; t < T; ++t) {
        x[b * T + t] = (*tokens)[s + t];
        y[b * T + t] = (*tokens)[s + t + 1];
      }
    }
  }
};

/// The mean next-token loss over consecutive windows of T + 1 tokens (at most max_tokens predictions), B at a
/// time, in eval mode. The same windows every call, so two models compare on the same text.
template <class S>
double evaluate(Model<S>& model, const std::vector<int>& tokens, Index B, Index T, std::size_t max_tokens) {
  model.eval();
  std::vector<int> x, y;
  double total = 0;
  std::size_t count = 0;
  std::size_t pos = 0;
  while (count < max_tokens && pos + static_cast<std::size_t>(T) + 1 <= tokens.size()) {
    x.clear();
    y.clear();
    Index rows = 0;
    while (rows < B && pos + static_cast<std::size_t>(T) + 1 <= tokens.size()) {
      x.insert(x.end(), tokens.begin() + pos, tokens.begin() + pos + T);
      y.insert(y.end(), tokens.begin() + pos + 1, tokens.begin() + pos + T + 1);
      pos += static_cast<std::size_t>(T);
      ++rows;
    }
    const S loss = model.forward_loss(x.data(), y.data(), rows, T);
    total += static_cast<double>(loss) * static_cast<double>(rows * T);
    count += static_cast<std::size_t>(rows * T);
  }
  model.train();
  if (count == 0) throw lora::config_error("evaluation text shorter than one window of " + std::to_string(T + 1));
  return total / static_cast<double>(count);
}

struct TrainOptions {
  long steps = 200;
  Index batch = 8, seq = 128;
  double lr = 1e-3, weight_decay = 0.0, clip = 1.0;
  long warmup = 20;
  std::uint64_t seed = 1;
  double progress_seconds = 5;  ///< a progress line at most this often (0: none)
  std::string label = "train";
};

struct TrainResult {
  std::vector<double> losses;      ///< training loss per step
  double median_step_seconds = 0;  ///< forward + backward + optimizer step
  double seconds = 0;
  std::size_t optimizer_state_floats = 0;
};

inline std::string duration_text(double s) {
  char buf[32];
  if (s < 60)
    std::snprintf(buf, sizeof buf, "%.0f s", s);
  else
    std::snprintf(buf, sizeof buf, "%d min %02d s", static_cast<int>(s) / 60, static_cast<int>(s) % 60);
  return buf;
}

/// AdamW with warmup and cosine decay over model.parameters(), gradient clipping, one progress line at most every
/// progress_seconds (step, loss, tokens/s, time left) on stderr.
template <class S>
TrainResult train(Model<S>& model, const std::vector<int>& tokens, const TrainOptions& o) {
  using clock = std::chrono::steady_clock;
  Batcher batches(tokens, o.batch, o.seq, o.seed);
  auto params = model.parameters();
  if (params.empty()) throw lora::config_error("nothing to train: the model has no trainable parameter");
  typename lora::AdamW<S>::Options ao;
  ao.lr = o.lr;
  ao.weight_decay = o.weight_decay;
  lora::AdamW<S> opt(params, ao);
  TrainResult r;
  for (const auto& p : params) r.optimizer_state_floats += 2 * static_cast<std::size_t>(p.size());
  std::vector<double> step_times;
  model.train();
  const auto start = clock::now();
  auto last_print = start;
  double recent_loss = 0;
  int recent = 0;
  for (long step = 0; step < o.steps; ++step) {
    batches.next();
    const auto t0 = clock::now();
    opt.set_lr(o.lr * lora::cosine_schedule_with_warmup(step, std::min(o.warmup, o.steps), o.steps));
    model.zero_grad();
    const double loss = static_cast<double>(model.forward_loss(batches.x.data(), batches.y.data(), o.batch, o.seq));
    if (!std::isfinite(loss))
      throw lora::numeric_error(o.label + ": the loss is " + std::to_string(loss) + " at step " + std::to_string(step) +
                                " (lower the learning rate)");
    model.backward();
    if (o.clip > 0) lora::clip_grad_norm(params, o.clip);
    opt.step();
    const auto t1 = clock::now();
    step_times.push_back(std::chrono::duration<double>(t1 - t0).count());
    r.losses.push_back(loss);
    recent_loss += loss;
    ++recent;
    const double since = std::chrono::duration<double>(t1 - last_print).count();
    if (o.progress_seconds > 0 && (since >= o.progress_seconds || step + 1 == o.steps)) {
      const double elapsed = std::chrono::duration<double>(t1 - start).count();
      const double per_step = elapsed / static_cast<double>(step + 1);
      std::fprintf(stderr, "%s: step %ld/%ld  loss %.4f  %.0f tokens/s  %s left\n", o.label.c_str(), step + 1, o.steps,
                   recent_loss / recent, static_cast<double>(o.batch * o.seq) / per_step,
                   duration_text(per_step * static_cast<double>(o.steps - step - 1)).c_str());
      last_print = t1;
      recent_loss = 0;
      recent = 0;
    }
  }
  r.seconds = std::chrono::duration<double>(clock::now() - start).count();
  std::sort(step_times.begin(), step_times.end());
  if (!step_times.empty()) r.median_step_seconds = step_times[step_times.size() / 2];
  return r;
}

/// Samples `count` tokens after `prompt` (temperature 0: greedy), each from the logits of the last position. Eval
/// mode. The keys and values of the sequence so far are cached (Model::forward_next); once the sequence fills
/// n_positions, each step runs the last n_positions tokens through forward() instead, as a sliding window.
template <class S>
std::vector<int> generate(Model<S>& model, std::vector<int> prompt, int count, double temperature, int top_k,
                          std::uint64_t seed) {
  if (prompt.empty()) throw lora::config_error("generate: the prompt is empty (give at least one token)");
  const Config& c = model.config();
  if (static_cast<Index>(prompt.size()) > c.n_positions)
    throw lora::config_error("generate: the prompt has " + std::to_string(prompt.size()) +
                             " tokens, more than n_positions = " + std::to_string(c.n_positions));
  model.eval();
  std::mt19937_64 rng(seed);
  std::vector<int> out;
  std::vector<double> p(static_cast<std::size_t>(c.vocab_size));
  model.reset_cache();
  Eigen::Matrix<S, 1, Eigen::Dynamic> last =
      model.forward_next(prompt.data(), static_cast<Index>(prompt.size())).bottomRows(1);
  for (int i = 0; i < count; ++i) {
    int next = 0;
    if (temperature <= 0) {
      last.maxCoeff(&next);
    } else {
      const double mx = static_cast<double>(last.maxCoeff());
      double kth = -INFINITY;
      if (top_k > 0 && top_k < c.vocab_size) {
        std::vector<double> sorted(last.data(), last.data() + c.vocab_size);
        std::nth_element(sorted.begin(), sorted.begin() + (top_k - 1), sorted.end(), std::greater<double>());
        kth = sorted[static_cast<std::size_t>(top_k - 1)];
      }
      for (Index v = 0; v < c.vocab_size; ++v) {
        const double l = static_cast<double>(last(v));
        p[static_cast<std::size_t>(v)] = l < kth ? 0.0 : std::exp((l - mx) / temperature);
      }
      std::discrete_distribution<int> pick(p.begin(), p.end());
      next = pick(rng);
    }
    prompt.push_back(next);
    out.push_back(next);
    if (i + 1 == count) break;
    if (model.cached_positions() < c.n_positions) {
      last = model.forward_next(&prompt.back(), 1);
    } else {
      const Index T = c.n_positions;
      last = model.forward(prompt.data() + prompt.size() - T, 1, T).row(T - 1);
    }
  }
  model.train();
  return out;
}

}  // namespace gpt
