// Training memory of LoRA against full fine-tuning, as the operating system
// measures it: the peak resident set size of a process that trains a stack of
// L linear layers (D x D, no bias) for a few AdamW steps on an MSE loss.
//
//   x (N, D) -> layer 0 -> ... -> layer L-1 -> y (N, D); loss = mse(y, target)
//
//   lora   LoRALinear<float> (r = 8): W frozen, no dW; AdamW state for A, B only
//   dora   the same with use_dora: a magnitude per output; backward takes each layer's output (kept anyway as
//          the next layer's input) instead of a copy of Z (set_dora_output_backward), as Sequential does
//   full   the same stack trained in full: W, dW (O, I) and AdamW's two moments of W
//
// Both keep the same activations: every layer's input (L + 1 buffers of N x D),
// the target and two gradient buffers. Each variant runs in a child process of
// its own (this program again, with --variant), and its peak RSS is the
// child's ru_maxrss from wait4(), cross-checked against VmHWM from
// /proc/self/status as the child saw it before exiting.
//
//   bench_memory [--layers=8] [--d=4096] [--n=512] [--steps=3] [--rank=8] [--threads=1] [--smoke]
#include <lora/lora.hpp>

#include "bench_common.hpp"

#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

namespace {
using Mat = lora::Matrix<float>;
using lora::Index;

struct Shape {
  int layers = 8;
  Index d = 4096;
  Index n = 512;
  int steps = 3;
  int rank = 8;
};

/// A fully trained dense layer: y = x Wᵀ; dW += dyᵀ x; dx = dy W. The library's
/// LoRALinear deliberately has no dW, so full fine-tuning lives here.
struct DenseLayer {
  Mat W, dW;
  explicit DenseLayer(Index d) : W(Mat::Random(d, d) / std::sqrt(static_cast<float>(d))), dW(Mat::Zero(d, d)) {}
  // x (N, I), W (O, I) -> y (N, O)
  void forward(const Mat& x, Mat& y) const { y.noalias() = x * W.transpose(); }
  // forward: y = x Wᵀ, so dW += dyᵀ x and dx = dy W
  void backward(const Mat& x, const Mat& /*y*/, const Mat& dy, Mat* dx) {
    dW.noalias() += dy.transpose() * x;
    if (dx) dx->noalias() = dy * W;
  }
};

struct Report {
  double weights = 0, activations = 0, gradients = 0, optimizer = 0;  // bytes
  double seconds_per_step = 0;
  long start_rss_kib = 0;
};

template <class Layer>
Report train(std::vector<Layer>& layers, lora::ParameterList<float> params, const Shape& s, double weight_bytes) {
  Report r;
  r.weights = weight_bytes;
  lora::AdamW<float> opt(params);
  std::vector<Mat> acts(static_cast<std::size_t>(s.layers) + 1, Mat(s.n, s.d));
  acts[0].setRandom();
  const Mat target = Mat::Random(s.n, s.d);
  Mat grad_a(s.n, s.d), grad_b(s.n, s.d);
  for (const auto& a : acts) r.activations += static_cast<double>(a.size()) * sizeof(float);
  r.activations += static_cast<double>(target.size() + grad_a.size() + grad_b.size()) * sizeof(float);
  for (const auto& p : params) r.gradients += static_cast<double>(p.size()) * sizeof(float);
  r.optimizer = static_cast<double>(opt.state_bytes());

  const auto t0 = std::chrono::steady_clock::now();
  float loss = 0;
  for (int step = 0; step < s.steps; ++step) {
    for (int l = 0; l < s.layers; ++l) layers[l].forward(acts[l], acts[l + 1]);
    loss = lora::mse_loss<float>(acts.back(), target, grad_a);
    Mat* d_out = &grad_a;
    Mat* d_in = &grad_b;
    for (int l = s.layers - 1; l >= 0; --l) {
      if (l > 0) {
        layers[l].backward(acts[l], acts[l + 1], *d_out, d_in);
        std::swap(d_out, d_in);
      } else {
        layers[l].backward(acts[l], acts[l + 1], *d_out, nullptr);  // the input needs no gradient
      }
    }
    opt.step();
    opt.zero_grad();
  }
  r.seconds_per_step = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / s.steps;
  std::printf("# loss after %d steps: %g\n", s.steps, static_cast<double>(loss));
  return r;
}

// LoRALinear's backward takes its dx by MutRef; this adapter gives the two layer kinds one call shape. The
// forward's output y is still there at backward (the next layer's input), so DoRA layers take it.
struct LoraLayer {
  lora::LoRALinear<float> layer;
  void forward(const Mat& x, Mat& y) { layer.forward(x, y); }
  void backward(const Mat& x, const Mat& y, const Mat& dy, Mat* dx) {
    if (dx)
      layer.backward_with_output(x, y, dy, *dx);
    else
      layer.backward_with_output(x, y, dy);
  }
};

Report run_variant(const std::string& variant, const Shape& s) {
  const long start_rss = lora_bench::status_kib("VmRSS");
  const double weight_bytes = static_cast<double>(s.layers) * static_cast<double>(s.d * s.d) * sizeof(float);
  Report r;
  if (variant == "lora" || variant == "dora") {
    lora::LoraConfig cfg;
    cfg.r = s.rank;
    cfg.lora_alpha = 2 * s.rank;
    cfg.use_dora = variant == "dora";
    std::vector<LoraLayer> layers;
    layers.reserve(static_cast<std::size_t>(s.layers));
    for (int l = 0; l < s.layers; ++l) {
      cfg.seed = static_cast<std::uint64_t>(l);
      layers.push_back({lora::LoRALinear<float>(s.d, s.d, cfg, false)});
      if (cfg.use_dora) layers.back().layer.set_dora_output_backward(true);
    }
    lora::ParameterList<float> params;
    for (auto& l : layers)
      for (auto& p : l.layer.parameters()) params.push_back(p);
    r = train(layers, params, s, weight_bytes);
  } else {
    std::vector<DenseLayer> layers;
    layers.reserve(static_cast<std::size_t>(s.layers));
    for (int l = 0; l < s.layers; ++l) layers.emplace_back(s.d);
    lora::ParameterList<float> params;
    for (auto& l : layers) params.push_back({"weight", l.W.data(), l.dW.data(), s.d, s.d});
    r = train(layers, params, s, weight_bytes);
  }
  r.start_rss_kib = start_rss;
  return r;
}

struct ChildResult {
  Report report;
  long maxrss_kib = -1;  // wait4's ru_maxrss
  long vmhwm_kib = -1;   // the child's own VmHWM
};

/// Runs this program again with --variant=<variant>, reads its RESULT line, and takes its peak RSS from wait4().
ChildResult run_child(const char* self, const std::string& variant, const std::vector<std::string>& args) {
  int fds[2];
  if (pipe(fds) != 0) {
    std::perror("pipe");
    std::exit(1);
  }
  const pid_t pid = fork();
  if (pid < 0) {
    std::perror("fork");
    std::exit(1);
  }
  if (pid == 0) {
    dup2(fds[1], STDOUT_FILENO);
    close(fds[0]);
    close(fds[1]);
    std::vector<std::string> all{self, "--variant=" + variant};
    all.insert(all.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (auto& a : all) argv.push_back(a.data());
    argv.push_back(nullptr);
    execv("/proc/self/exe", argv.data());
    std::perror("execv");
    _exit(127);
  }
  close(fds[1]);
  std::string out;
  char buf[4096];
  ssize_t got;
  while ((got = read(fds[0], buf, sizeof buf)) > 0) out.append(buf, static_cast<std::size_t>(got));
  close(fds[0]);
  int status = 0;
  struct rusage usage {};
  if (wait4(pid, &status, 0, &usage) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    std::fprintf(stderr, "bench_memory: the %s child failed; its output:\n%s\n", variant.c_str(), out.c_str());
    std::exit(1);
  }
  ChildResult c;
  c.maxrss_kib = usage.ru_maxrss;  // KiB on Linux
  const auto at = out.find("RESULT ");
  if (at == std::string::npos ||
      std::sscanf(out.c_str() + at,
                  "RESULT weights=%lf activations=%lf gradients=%lf optimizer=%lf step=%lf start=%ld "
                  "vmhwm=%ld",
                  &c.report.weights, &c.report.activations, &c.report.gradients, &c.report.optimizer,
                  &c.report.seconds_per_step, &c.report.start_rss_kib, &c.vmhwm_kib) != 7) {
    std::fprintf(stderr, "bench_memory: no RESULT line from the %s child:\n%s\n", variant.c_str(), out.c_str());
    std::exit(1);
  }
  // The child's own comment lines (its loss) go through.
  for (std::size_t pos = 0; pos < out.size();) {
    const auto end = out.find('\n', pos);
    const std::string line = out.substr(pos, end - pos);
    if (line.rfind("# loss", 0) == 0) std::printf("# %s: %s\n", variant.c_str(), line.c_str() + 2);
    if (end == std::string::npos) break;
    pos = end + 1;
  }
  return c;
}

double mib(double bytes) { return bytes / (1024.0 * 1024.0); }

bool take_int(const char* arg, const char* name, long& out) {
  const std::size_t n = std::strlen(name);
  if (std::strncmp(arg, name, n) != 0) return false;
  char* end = nullptr;
  out = std::strtol(arg + n, &end, 10);
  if (end == arg + n || *end != '\0' || out < 1) {
    std::fprintf(stderr, "bench_memory: %s expects a positive integer, got '%s'\n", name, arg + n);
    std::exit(2);
  }
  return true;
}
}  // namespace

int main(int argc, char** argv) {
  const auto options = lora_bench::take_options(argc, argv);
  Shape s;
  if (options.smoke) s = Shape{2, 256, 32, 2, 8};
  std::string variant;
  std::vector<std::string> forward_args;  // what each child gets besides --variant
  for (int i = 1; i < argc; ++i) {
    long v = 0;
    const char* a = argv[i];
    if (std::strncmp(a, "--variant=", 10) == 0) {
      variant = a + 10;
      if (variant != "lora" && variant != "dora" && variant != "full") {
        std::fprintf(stderr, "bench_memory: --variant is lora, dora or full, got '%s'\n", variant.c_str());
        return 2;
      }
      continue;
    }
    if (take_int(a, "--layers=", v))
      s.layers = static_cast<int>(v);
    else if (take_int(a, "--d=", v))
      s.d = v;
    else if (take_int(a, "--n=", v))
      s.n = v;
    else if (take_int(a, "--steps=", v))
      s.steps = static_cast<int>(v);
    else if (take_int(a, "--rank=", v))
      s.rank = static_cast<int>(v);
    else {
      std::fprintf(stderr,
                   "usage: %s [--layers=8] [--d=4096] [--n=512] [--steps=3] [--rank=8] [--threads=1] [--smoke]\n",
                   argv[0]);
      return 2;
    }
  }
  lora_bench::set_threads(options.threads, argv[0]);

  if (!variant.empty()) {  // the child: train, then report
    const Report r = run_variant(variant, s);
    std::printf("RESULT weights=%.0f activations=%.0f gradients=%.0f optimizer=%.0f step=%.6f start=%ld vmhwm=%ld\n",
                r.weights, r.activations, r.gradients, r.optimizer, r.seconds_per_step, r.start_rss_kib,
                lora_bench::status_kib("VmHWM"));
    return 0;
  }

  forward_args = {"--layers=" + std::to_string(s.layers), "--d=" + std::to_string(s.d),
                  "--n=" + std::to_string(s.n),           "--steps=" + std::to_string(s.steps),
                  "--rank=" + std::to_string(s.rank),     "--threads=" + std::to_string(options.threads)};
  std::fputs(lora_bench::context_lines().c_str(), stdout);
  std::printf("# model: %d layers of %lld x %lld (float, no bias), batch N = %lld, %d AdamW steps, LoRA r = %d\n",
              s.layers, static_cast<long long>(s.d), static_cast<long long>(s.d), static_cast<long long>(s.n), s.steps,
              s.rank);
  const ChildResult lora_run = run_child(argv[0], "lora", forward_args);
  const ChildResult full_run = run_child(argv[0], "full", forward_args);
  const ChildResult dora_run = run_child(argv[0], "dora", forward_args);

  std::puts("");
  std::puts(
      "| variant | peak RSS (OS) | VmHWM | weights | activations | gradients | AdamW state | "
      "peak / (weights + activations) | s / step |");
  std::puts("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
  for (const auto* c : {&lora_run, &dora_run, &full_run}) {
    const Report& r = c->report;
    const double peak = static_cast<double>(c->maxrss_kib) * 1024.0;
    std::printf("| %s | %.1f MiB | %.1f MiB | %.1f MiB | %.1f MiB | %.2f MiB | %.2f MiB | %.3f | %.3f |\n",
                c == &lora_run   ? "LoRA"
                : c == &dora_run ? "DoRA"
                                 : "full fine-tuning",
                mib(peak), mib(static_cast<double>(c->vmhwm_kib) * 1024.0), mib(r.weights), mib(r.activations),
                mib(r.gradients), mib(r.optimizer), peak / (r.weights + r.activations), r.seconds_per_step);
  }
  const double lora_peak = static_cast<double>(lora_run.maxrss_kib);
  const double full_peak = static_cast<double>(full_run.maxrss_kib);
  std::printf("\n# process RSS before allocating anything: %.1f MiB (counted in the peaks)\n",
              static_cast<double>(lora_run.report.start_rss_kib) / 1024.0);
  std::printf("memory.lora_peak_over_weights_and_activations %.3f\n",
              lora_peak * 1024.0 / (lora_run.report.weights + lora_run.report.activations));
  std::printf("memory.full_peak_over_lora_peak %.3f\n", full_peak / lora_peak);
  std::printf("memory.dora_peak_over_lora_peak %.3f\n", static_cast<double>(dora_run.maxrss_kib) / lora_peak);
  return 0;
}
