// Compute cost of LoRA next to the dense product it wraps, measured in one run.
//
//   x (N, I), W (O, I), A (R, I), B (O, R), y (N, O); here I = O = D.
//
// Variants, each registered over (N, D, R):
//   dense_forward         y = x Wᵀ                              the baseline for forwards
//   lora_forward          y = x Wᵀ + s (x Aᵀ) Bᵀ, training mode, dropout 0
//   lora_forward_merged   y = x W'ᵀ with W' = W + s B A merged once
//   naive_rebuild         W' = W + s B A rebuilt, then y = x W'ᵀ (what not to do)
//   dense_two_products    y = x Wᵀ and dx = dy W                the baseline for training steps
//   lora_train_step       forward + backward (dA, dB, dx)
//   full_ft_step          forward + dx = dy W + dW += dyᵀ x     what LoRA saves
//   dense_dx, dense_dW    dx = dy W and dW += dyᵀ x alone       the pieces of the two steps above
//   lora_step_adamw       lora_train_step + AdamW on A, B (and zero_grad)
//   full_ft_step_adamw    full_ft_step + AdamW on W (and zero_grad)
// Several adapters on one base (MultiLoRALinear), registered over (N, D, R, K):
//   single_adapter_forward   y = x Wᵀ + s (x Aᵀ) Bᵀ, one adapter for every row   the baseline for mixed batches
//   mixed_forward            row n uses adapter a_n of K (rows shuffled), one call: the base product once,
//                            each adapter's rows grouped into one low-rank product
//   naive_merge_per_adapter  for each of the K adapters: W += s B A, y[rows] = x[rows] Wᵀ, W -= s B A
//   mixed_over_single_paired the single-adapter and the mixed forward alternating in one loop; the counter
//                            mixed/single is the median of the per-pair time ratios
// and, before the runs, the resident memory each extra adapter adds (VmRSS).
// Weight layouts and fused slices (issue 13), each a paired run whose counters are medians of per-pair ratios,
// registered over (N, I, O, R):
//   layout_paired    the same LoRALinear over W stored (O, I) and over Wᵀ stored (I, O) (a Conv1D checkpoint
//                    viewed in place): "fwd in_out/out_in" and "step in_out/out_in" (forward + backward with dx)
//   fused_qv_paired  FusedLoRALinear with adapters on the q and v thirds of a fused (I, O = 3I) weight, against
//                    the base product alone ("fwd fused/base": x Wᵀ) and against the two dense products of a
//                    training step ("step fused/dense": x Wᵀ and dy W). Where x Wᵀ runs the library's own GEMM
//                    (detail/kgemm.hpp), also that base and the fused forward against x Wᵀ on detail::product
//                    (oneDNN's sgemm or Eigen): "fwd own/product" and "fwd fused/product"
//   embedding_backward_paired  LoRAEmbedding's backward over a V-row table against the same layer over 1000 rows,
//                    the same N token ids (all below 1000) and d, r: "bwd V/1000", which must not grow with V
//   dora_paired      LoRALinear with use_dora against the same layer without it (same W, A, B): "fwd dora/lora" and
//                    "step dora/lora" (issue 16)
// After the runs a table gives each variant's median time over its baseline's. The dense products (and full
// fine-tuning's dW) run on the GEMM library the layers' products use (FrozenWeight: oneDNN's sgemm under
// LORA_USE_DNNL, Eigen otherwise), so the ratios compare LoRA with the product it wraps.
//
// Flags besides google benchmark's: --threads=T (default 1) and --smoke (small
// shapes, for CI). The first lines of the output name the backend, the GEMM
// kernel, the threads and the CPU.
#include <benchmark/benchmark.h>
#include <lora/init.hpp>
#include <lora/lora.hpp>

#include "bench_common.hpp"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

namespace {
using Mat = lora::Matrix<float>;

struct Problem {
  lora::Index N, D;
  int R;
  Mat x, dy, y, dx;
  lora::LoRALinear<float> layer;
  Problem(const benchmark::State& state)
      : N(state.range(0)),
        D(state.range(1)),
        R(static_cast<int>(state.range(2))),
        x(Mat::Random(N, D)),
        dy(Mat::Random(N, D)),
        y(N, D),
        dx(N, D),
        layer(D, D, config(R), false) {
    layer.lora_B().setRandom();
  }
  static lora::LoraConfig config(int r) {
    lora::LoraConfig c;
    c.r = r;
    c.lora_alpha = 2 * r;
    return c;
  }
};

void set_flops(benchmark::State& state, double flops_per_iter) {
  state.counters["GFLOP/s"] = benchmark::Counter(flops_per_iter * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

double gemm_flops(double m, double n, double k) { return 2 * m * n * k; }

// The dense baselines run the very products the layers wrap (FrozenWeight's: oneDNN's sgemm where the build has
// it, Eigen's otherwise), so a ratio measures what LoRA adds and not a difference between GEMM libraries.
lora::FrozenWeight<float> frozen(const Mat& W) { return lora::FrozenWeight<float>::view(W.data(), W.rows(), W.cols()); }

// Full fine-tuning's weight gradient dW += dyᵀ x, on the same GEMM library as the products above.
void add_weight_gradient(Mat& dW, const Mat& dy, const Mat& x) {
  lora::detail::product<float>("bench", 1.0f, dy, true, x, false, true, dW);
}

void dense_forward(benchmark::State& state) {
  Problem p(state);
  const Mat W = p.layer.weight();
  const auto w = frozen(W);
  for (auto _ : state) {
    w.forward(p.x, p.y);
    benchmark::DoNotOptimize(p.y.data());
    benchmark::ClobberMemory();
  }
  set_flops(state, gemm_flops(p.N, p.D, p.D));
}

void lora_forward(benchmark::State& state) {
  Problem p(state);
  for (auto _ : state) {
    p.layer.forward(p.x, p.y);
    benchmark::DoNotOptimize(p.y.data());
    benchmark::ClobberMemory();
  }
  set_flops(state, gemm_flops(p.N, p.D, p.D) + 2 * gemm_flops(p.N, p.D, p.R));
}

void lora_forward_merged(benchmark::State& state) {
  Problem p(state);
  p.layer.eval();
  p.layer.merge();
  for (auto _ : state) {
    p.layer.forward(p.x, p.y);
    benchmark::DoNotOptimize(p.y.data());
    benchmark::ClobberMemory();
  }
  set_flops(state, gemm_flops(p.N, p.D, p.D));
}

void naive_rebuild(benchmark::State& state) {
  Problem p(state);
  Mat merged(p.D, p.D);
  const float s = p.layer.scaling();
  for (auto _ : state) {
    merged = p.layer.weight();
    merged.noalias() += s * p.layer.lora_B() * p.layer.lora_A();
    frozen(merged).forward(p.x, p.y);
    benchmark::DoNotOptimize(p.y.data());
    benchmark::ClobberMemory();
  }
  set_flops(state, gemm_flops(p.N, p.D, p.D) + gemm_flops(p.D, p.D, p.R));
}

void dense_two_products(benchmark::State& state) {
  Problem p(state);
  const Mat W = p.layer.weight();
  const auto w = frozen(W);
  for (auto _ : state) {
    w.forward(p.x, p.y);
    w.backward(p.dy, p.dx);
    benchmark::DoNotOptimize(p.dx.data());
    benchmark::ClobberMemory();
  }
  set_flops(state, 2 * gemm_flops(p.N, p.D, p.D));
}

void lora_train_step(benchmark::State& state) {
  Problem p(state);
  for (auto _ : state) {
    p.layer.forward(p.x, p.y);
    p.layer.backward(p.x, p.dy, p.dx);
    benchmark::DoNotOptimize(p.dx.data());
    benchmark::ClobberMemory();
  }
  set_flops(state, 2 * gemm_flops(p.N, p.D, p.D) + 6 * gemm_flops(p.N, p.D, p.R));
}

void full_ft_step(benchmark::State& state) {
  Problem p(state);
  const Mat W = p.layer.weight();
  const auto w = frozen(W);
  Mat dW = Mat::Zero(p.D, p.D);
  for (auto _ : state) {
    w.forward(p.x, p.y);
    w.backward(p.dy, p.dx);
    add_weight_gradient(dW, p.dy, p.x);
    benchmark::DoNotOptimize(dW.data());
    benchmark::ClobberMemory();
  }
  set_flops(state, 3 * gemm_flops(p.N, p.D, p.D));
}

void dense_dx(benchmark::State& state) {
  Problem p(state);
  const Mat W = p.layer.weight();
  const auto w = frozen(W);
  for (auto _ : state) {
    w.backward(p.dy, p.dx);
    benchmark::DoNotOptimize(p.dx.data());
    benchmark::ClobberMemory();
  }
  set_flops(state, gemm_flops(p.N, p.D, p.D));
}

void dense_dW(benchmark::State& state) {
  Problem p(state);
  Mat dW = Mat::Zero(p.D, p.D);
  for (auto _ : state) {
    add_weight_gradient(dW, p.dy, p.x);
    benchmark::DoNotOptimize(dW.data());
    benchmark::ClobberMemory();
  }
  set_flops(state, gemm_flops(p.D, p.D, p.N));
}

void lora_step_adamw(benchmark::State& state) {
  Problem p(state);
  lora::AdamW<float> opt(p.layer.parameters());
  for (auto _ : state) {
    p.layer.forward(p.x, p.y);
    p.layer.backward(p.x, p.dy, p.dx);
    opt.step();
    opt.zero_grad();
    benchmark::DoNotOptimize(p.dx.data());
    benchmark::ClobberMemory();
  }
  set_flops(state, 2 * gemm_flops(p.N, p.D, p.D) + 6 * gemm_flops(p.N, p.D, p.R));
}

// Full fine-tuning trains W itself: a gradient dW and two AdamW moments the size of W.
void full_ft_step_adamw(benchmark::State& state) {
  Problem p(state);
  Mat W = p.layer.weight();
  Mat dW = Mat::Zero(p.D, p.D);
  lora::AdamW<float> opt({{"weight", W.data(), dW.data(), p.D, p.D}});
  const auto w = frozen(W);  // a view: AdamW's updates of W are what it reads
  for (auto _ : state) {
    w.forward(p.x, p.y);
    w.backward(p.dy, p.dx);
    add_weight_gradient(dW, p.dy, p.x);
    opt.step();
    opt.zero_grad();
    benchmark::DoNotOptimize(W.data());
    benchmark::ClobberMemory();
  }
  set_flops(state, 3 * gemm_flops(p.N, p.D, p.D));
}

// ---- several adapters on one base ----------------------------------------------------------

struct MultiProblem {
  lora::Index N, D;
  int R, K;
  Mat x, y;
  lora::MultiLoRALinear<float> layer;
  std::vector<std::string> names;
  std::vector<int> row_ids;  // adapter id per row: each adapter gets N / K rows, shuffled over the batch
  MultiProblem(const benchmark::State& state)
      : N(state.range(0)),
        D(state.range(1)),
        R(static_cast<int>(state.range(2))),
        K(static_cast<int>(state.range(3))),
        x(Mat::Random(N, D)),
        y(N, D),
        layer(Mat::Random(D, D)) {
    for (int k = 0; k < K; ++k) {
      names.push_back("adapter" + std::to_string(k));
      layer.add_adapter(names.back(), Problem::config(R), Mat::Random(R, D), Mat::Random(D, R));
    }
    layer.set_adapter(names[0]);
    std::vector<int> slots(N);
    for (lora::Index n = 0; n < N; ++n) slots[n] = static_cast<int>(n % K);
    std::mt19937 gen(42);
    std::shuffle(slots.begin(), slots.end(), gen);
    for (int s : slots) row_ids.push_back(layer.adapter_id(names[s]));
  }
};

void single_adapter_forward(benchmark::State& state) {
  MultiProblem p(state);
  for (auto _ : state) {
    p.layer.forward(p.x, p.y);
    benchmark::DoNotOptimize(p.y.data());
    benchmark::ClobberMemory();
  }
  set_flops(state, gemm_flops(p.N, p.D, p.D) + 2 * gemm_flops(p.N, p.D, p.R));
}

void mixed_forward(benchmark::State& state) {
  MultiProblem p(state);
  for (auto _ : state) {
    p.layer.forward(p.x, p.row_ids, p.y);
    benchmark::DoNotOptimize(p.y.data());
    benchmark::ClobberMemory();
  }
  set_flops(state, gemm_flops(p.N, p.D, p.D) + 2 * gemm_flops(p.N, p.D, p.R));
}

// The two calls alternate inside one loop, each timed on its own, so both see the same machine state: on a
// shared VM two identical 4096-square products in separate runs differ by up to 15%, more than the targets.
void mixed_over_single_paired(benchmark::State& state) {
  MultiProblem p(state);
  using clock = std::chrono::steady_clock;
  auto timed = [&p](bool mixed) {
    const auto t0 = clock::now();
    if (mixed)
      p.layer.forward(p.x, p.row_ids, p.y);
    else
      p.layer.forward(p.x, p.y);
    benchmark::DoNotOptimize(p.y.data());
    benchmark::ClobberMemory();
    return std::chrono::duration<double>(clock::now() - t0).count();
  };
  // One untimed pair first: the first product after the setup pays for cold pages and caches, and at these
  // shapes a run is only one or two iterations long.
  timed(false);
  timed(true);
  std::vector<double> ratios;
  bool mixed_first = false;
  for (auto _ : state) {
    // The order alternates, so neither call always runs right after the other.
    const double first = timed(mixed_first), second = timed(!mixed_first);
    ratios.push_back(mixed_first ? first / second : second / first);
    mixed_first = !mixed_first;
  }
  std::nth_element(ratios.begin(), ratios.begin() + ratios.size() / 2, ratios.end());
  state.counters["mixed/single"] = ratios[ratios.size() / 2];  // the median per-pair ratio
}

// Runs f and g alternately, each returning the seconds it timed, after one untimed call of each; returns the
// median of the per-pair ratios f / g. The order alternates so neither always runs right after the other.
template <class F, class G>
double paired_median_seconds(benchmark::State& state, F&& f, G&& g) {
  f();
  g();
  std::vector<double> ratios;
  bool f_first = false;
  for (auto _ : state) {
    double tf, tg;
    if (f_first) {
      tf = f();
      tg = g();
    } else {
      tg = g();
      tf = f();
    }
    ratios.push_back(tf / tg);
    f_first = !f_first;
  }
  std::nth_element(ratios.begin(), ratios.begin() + ratios.size() / 2, ratios.end());
  return ratios[ratios.size() / 2];
}

// The seconds one call of `call` takes, its writes to memory included.
template <class F>
double timed(F& call) {
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  call();
  benchmark::ClobberMemory();
  return std::chrono::duration<double>(clock::now() - t0).count();
}

// paired_median_seconds over the whole of each call: time(f) / time(g).
template <class F, class G>
double paired_median(benchmark::State& state, F&& f, G&& g) {
  return paired_median_seconds(
      state, [&] { return timed(f); }, [&] { return timed(g); });
}

// paired_median of a forward (and, for a step, a backward) of layer `a` over the same of layer `b`, on the same
// x and dy: time(a) / time(b).
double layer_pair_ratio(benchmark::State& state, lora::LoRALinear<float>& a, lora::LoRALinear<float>& b, const Mat& x,
                        const Mat& dy, bool step) {
  Mat y(x.rows(), dy.cols()), dx(x.rows(), x.cols());
  auto run = [&](lora::LoRALinear<float>& layer) {
    layer.forward(x, y);
    if (step) layer.backward(x, dy, dx);
    benchmark::DoNotOptimize(y.data());
    benchmark::DoNotOptimize(dx.data());
  };
  return paired_median(
      state, [&] { run(a); }, [&] { run(b); });
}

void layout_paired(benchmark::State& state) {
  const lora::Index N = state.range(0), I = state.range(1), O = state.range(2);
  const int R = static_cast<int>(state.range(3));
  const Mat W = Mat::Random(O, I), Wt = W.transpose();
  const Mat x = Mat::Random(N, I), dy = Mat::Random(N, O);
  const auto cfg = Problem::config(R);
  lora::LoRALinear<float> out_in(lora::FrozenWeight<float>::view(W.data(), O, I), cfg);
  lora::LoRALinear<float> in_out(lora::FrozenWeight<float>::view(Wt.data(), O, I, lora::WeightLayout::in_out), cfg);
  out_in.lora_B().setRandom();
  in_out.lora_B() = out_in.lora_B();
  const bool step = state.range(4) != 0;
  state.counters[step ? "step in_out/out_in" : "fwd in_out/out_in"] =
      layer_pair_ratio(state, in_out, out_in, x, dy, step);
}

void fused_qv_paired(benchmark::State& state) {
  const lora::Index N = state.range(0), I = state.range(1), O = state.range(2);
  const int R = static_cast<int>(state.range(3));
  const lora::Index d = O / 3;
  const Mat Wt = Mat::Random(I, O);  // GPT-2's c_attn: (in, 3 out)
  const Mat x = Mat::Random(N, I), dy = Mat::Random(N, O);
  Mat y(N, O), dx(N, I);
  const auto weight = lora::FrozenWeight<float>::view(Wt.data(), O, I, lora::WeightLayout::in_out);
  lora::LoraConfig frozen;
  frozen.r = 0;
  lora::FusedLoRALinear<float> fused(weight,
                                     {{"q", d, Problem::config(R)}, {"k", d, frozen}, {"v", d, Problem::config(R)}});
  fused.lora_B(0).setRandom();
  fused.lora_B(2).setRandom();
  const bool step = state.range(4) != 0;
  auto run_fused = [&] {
    fused.forward(x, y);
    if (step) fused.backward(x, dy, dx);
    benchmark::DoNotOptimize(y.data());
    benchmark::DoNotOptimize(dx.data());
  };
  auto run_dense = [&] {
    weight.forward(x, y);
    if (step) weight.backward(dy, dx);
    benchmark::DoNotOptimize(y.data());
    benchmark::DoNotOptimize(dx.data());
  };
  if (step || !weight.forward_takes_terms(N)) {
    state.counters[step ? "step fused/dense" : "fwd fused/base"] = paired_median(state, run_fused, run_dense);
    return;
  }
  // The base product runs the library's own GEMM here (detail/kgemm.hpp). The same x Wᵀ on detail::product
  // (oneDNN's sgemm, or Eigen) runs in the same loop, so the ratio is not bought with a slower base: the three
  // forwards in turn (the order rotating), and the medians of the per-round ratios.
  auto run_product = [&] {
    lora::detail::KGemm::set_enabled(false);
    weight.forward(x, y);
    lora::detail::KGemm::set_enabled(true);
    benchmark::DoNotOptimize(y.data());
  };
  run_fused();
  run_dense();
  run_product();
  std::vector<double> fused_base, own_product, fused_product;
  int round = 0;
  for (auto _ : state) {
    double t[3];
    for (int i = 0; i < 3; ++i) {
      const int which = (round + i) % 3;
      t[which] = which == 0 ? timed(run_fused) : which == 1 ? timed(run_dense) : timed(run_product);
    }
    fused_base.push_back(t[0] / t[1]);
    own_product.push_back(t[1] / t[2]);
    fused_product.push_back(t[0] / t[2]);
    ++round;
  }
  auto median = [](std::vector<double>& v) {
    std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
    return v[v.size() / 2];
  };
  state.counters["fwd fused/base"] = median(fused_base);
  state.counters["fwd own/product"] = median(own_product);
  state.counters["fwd fused/product"] = median(fused_product);
}

// DoRA against LoRA on the same frozen W, A and B (issue 16): forward, or forward + backward with dx.
void dora_paired(benchmark::State& state) {
  const lora::Index N = state.range(0), I = state.range(1), O = state.range(2);
  const int R = static_cast<int>(state.range(3));
  const Mat W = Mat::Random(O, I) / std::sqrt(static_cast<float>(I));
  const Mat x = Mat::Random(N, I), dy = Mat::Random(N, O);
  lora::LoraConfig cfg = Problem::config(R);
  lora::LoRALinear<float> lora_layer(lora::FrozenWeight<float>::view(W.data(), O, I), cfg);
  cfg.use_dora = true;
  lora::LoRALinear<float> dora_layer(lora::FrozenWeight<float>::view(W.data(), O, I), cfg);
  lora_layer.lora_B().setRandom();
  dora_layer.lora_A() = lora_layer.lora_A();
  dora_layer.lora_B() = lora_layer.lora_B();
  const bool step = state.range(4) != 0;
  state.counters[step ? "step dora/lora" : "fwd dora/lora"] =
      layer_pair_ratio(state, dora_layer, lora_layer, x, dy, step);
}

void embedding_backward_paired(benchmark::State& state) {
  const lora::Index N = state.range(0), V = state.range(1), d = state.range(2), small_vocab = state.range(4);
  lora::LoraConfig cfg = Problem::config(static_cast<int>(state.range(3)));
  lora::LoRAEmbedding<float> large(Mat::Random(V, d), cfg), small(Mat::Random(small_vocab, d), cfg);
  large.lora_A().setRandom();
  small.lora_A().setRandom();
  std::mt19937 rng(3);
  std::uniform_int_distribution<lora::Index> pick(0, small_vocab - 1);
  std::vector<lora::Index> ids(static_cast<std::size_t>(N));
  for (auto& id : ids) id = pick(rng);
  const Mat dy = Mat::Random(N, d);
  Mat y(N, d);
  // Only the backward is timed; each layer's forward (which backward needs) runs right before it, untimed.
  using clock = std::chrono::steady_clock;
  auto backward_seconds = [&](lora::LoRAEmbedding<float>& layer) {
    layer.forward(ids, y);
    benchmark::DoNotOptimize(y.data());
    const auto t0 = clock::now();
    layer.backward(ids, dy);
    benchmark::ClobberMemory();
    return std::chrono::duration<double>(clock::now() - t0).count();
  };
  state.counters["bwd V/" + std::to_string(small_vocab)] = paired_median_seconds(
      state, [&] { return backward_seconds(large); }, [&] { return backward_seconds(small); });
}

// Issue 16: PiSSA's start on a D x D weight from a full SVD (init_lora_weights = "pissa") and from the randomised
// one ("pissa_niter_4"), and OLoRA's QR; each once per iteration (a full SVD of 4096 x 4096 takes a while).
void init_times(benchmark::State& state) {
  const lora::Index D = state.range(0);
  const lora::LoraConfig cfg = Problem::config(static_cast<int>(state.range(1)));
  const Mat W = Mat::Random(D, D);
  using clock = std::chrono::steady_clock;
  auto seconds = [&](auto&& init) {
    lora::LoRALinear<float> layer(W, cfg);
    const auto t0 = clock::now();
    init(layer);
    benchmark::DoNotOptimize(layer.lora_A().data());
    return std::chrono::duration<double>(clock::now() - t0).count();
  };
  double full = 0, niter4 = 0, olora = 0;
  for (auto _ : state) {
    full = seconds([](auto& layer) { lora::pissa_init(layer); });
    niter4 = seconds([](auto& layer) { lora::pissa_init(layer, 4); });
    olora = seconds([](auto& layer) { lora::olora_init(layer); });
  }
  state.counters["pissa s"] = full;
  state.counters["pissa_niter_4 s"] = niter4;
  state.counters["olora s"] = olora;
  state.counters["pissa/niter_4"] = full / niter4;
}

// What a server without grouped low-rank products would do: merge each adapter into W, run its rows, unmerge.
void naive_merge_per_adapter(benchmark::State& state) {
  MultiProblem p(state);
  Mat W = p.layer.weight();
  std::vector<std::vector<lora::Index>> rows(p.K);
  for (lora::Index n = 0; n < p.N; ++n) rows[p.row_ids[n]].push_back(n);  // ids are 0..K-1 in order of adding
  Mat xg, yg;
  for (auto _ : state) {
    for (int k = 0; k < p.K; ++k) {
      const auto a = p.layer.adapter(p.names[k]);
      const lora::Index count = static_cast<lora::Index>(rows[k].size());
      xg.resize(count, p.D);
      yg.resize(count, p.D);
      for (lora::Index i = 0; i < count; ++i) xg.row(i) = p.x.row(rows[k][i]);
      W.noalias() += a->scaling() * a->lora_B * a->lora_A;
      frozen(W).forward(xg, yg);
      W.noalias() -= a->scaling() * a->lora_B * a->lora_A;
      for (lora::Index i = 0; i < count; ++i) p.y.row(rows[k][i]) = yg.row(i);
    }
    benchmark::DoNotOptimize(p.y.data());
    benchmark::ClobberMemory();
  }
  set_flops(state, gemm_flops(p.N, p.D, p.D) + 2 * p.K * gemm_flops(p.D, p.D, p.R));
}

/// The resident memory extra adapters add to a base, as the OS counts it, against r (I + O) floats each:
/// one line, printed and kept in the JSON context.
std::string adapter_memory(lora::Index D, int R, int extra) {
  lora::MultiLoRALinear<float> layer(Mat::Random(D, D));
  layer.add_adapter("first", Problem::config(R), Mat::Random(R, D), Mat::Random(D, R));
  const long before = lora_bench::status_kib("VmRSS");
  for (int k = 0; k < extra; ++k)
    layer.add_adapter("extra" + std::to_string(k), Problem::config(R), Mat::Random(R, D), Mat::Random(D, R));
  const long after = lora_bench::status_kib("VmRSS");
  const double per_adapter = 1024.0 * static_cast<double>(after - before) / extra;
  const double ideal = static_cast<double>(R) * 2.0 * static_cast<double>(D) * sizeof(float);
  char line[320];
  std::snprintf(line, sizeof line,
                "%d extra adapters (r = %d, I = O = %ld) added %ld KiB of VmRSS: %.0f bytes each, r (I + O) floats = "
                "%.0f bytes, ratio %.3f; the base W is %.1f MiB",
                extra, R, static_cast<long>(D), after - before, per_adapter, ideal, per_adapter / ideal,
                static_cast<double>(D) * static_cast<double>(D) * sizeof(float) / (1024.0 * 1024.0));
  return line;
}

// The variants in registration order; google benchmark's random interleaving
// shuffles the runs, so the ratios see the same machine state on average.
const std::vector<std::pair<const char*, void (*)(benchmark::State&)>> variants = {
    {"dense_forward", dense_forward},
    {"lora_forward", lora_forward},
    {"lora_forward_merged", lora_forward_merged},
    {"naive_rebuild", naive_rebuild},
    {"dense_two_products", dense_two_products},
    {"lora_train_step", lora_train_step},
    {"full_ft_step", full_ft_step},
    {"dense_dx", dense_dx},
    {"dense_dW", dense_dW},
    {"lora_step_adamw", lora_step_adamw},
    {"full_ft_step_adamw", full_ft_step_adamw},
};

void register_all(bool smoke) {
  // The issue's grid; --smoke keeps the code paths (N = 1 and N > 1, R = 1 and R > 1) at shapes CI runs in seconds.
  const std::vector<std::vector<int64_t>> grid =
      smoke ? std::vector<std::vector<int64_t>>{{1, 32}, {64}, {1, 8}}
            : std::vector<std::vector<int64_t>>{{1, 32, 512}, {1024, 4096}, {1, 8, 64}};
  for (const auto& [name, fn] : variants)
    benchmark::RegisterBenchmark(name, fn)
        ->ArgNames({"N", "D", "R"})
        ->ArgsProduct(grid)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();  // with several threads the main thread's CPU time is not the cost
  // The issue's mixed-batch case: N = 512 rows over 1, 8 and 64 adapters of rank 8, I = O = 4096.
  const std::vector<int64_t> N{smoke ? 64 : 512}, D{smoke ? 64 : 4096}, R{8};
  const std::vector<std::pair<const char*, void (*)(benchmark::State&)>> multi = {
      {"single_adapter_forward", single_adapter_forward},
      {"mixed_forward", mixed_forward},
      {"naive_merge_per_adapter", naive_merge_per_adapter},
      {"mixed_over_single_paired", mixed_over_single_paired}};
  for (const auto& [name, fn] : multi)
    benchmark::RegisterBenchmark(name, fn)
        ->ArgNames({"N", "D", "R", "K"})
        ->ArgsProduct(
            {N, D, R, fn == single_adapter_forward ? std::vector<int64_t>{1} : std::vector<int64_t>{1, 8, 64}})
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
  // Issue 13's shapes: GPT-2's c_attn (768 -> 2304) and a LLaMA-7B projection (4096 -> 4096), N = 512, r = 8;
  // the last argument is 0 for the forward, 1 for the training step. Each iteration is one pair.
  const std::vector<std::vector<int64_t>> layouts =
      smoke ? std::vector<std::vector<int64_t>>{{16, 32, 96, 4}}
            : std::vector<std::vector<int64_t>>{{512, 768, 2304, 8}, {512, 4096, 4096, 8}};
  for (int step = 0; step < 2; ++step) {
    for (auto shape : layouts) {
      shape.push_back(step);
      benchmark::RegisterBenchmark("layout_paired", layout_paired)
          ->ArgNames({"N", "I", "O", "R", "step"})
          ->Args(shape)
          ->Iterations(smoke ? 2 : 15)
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime();
    }
    benchmark::RegisterBenchmark("fused_qv_paired", fused_qv_paired)
        ->ArgNames({"N", "I", "O", "R", "step"})
        ->Args(smoke ? std::vector<int64_t>{16, 32, 96, 4, step} : std::vector<int64_t>{512, 768, 2304, 8, step})
        ->Iterations(smoke ? 2 : 101)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
  }
  // Issue 13: the embedding's backward at GPT-2's vocabulary (V = 50257) against V = 1000, 512 tokens, d = 768.
  benchmark::RegisterBenchmark("embedding_backward_paired", embedding_backward_paired)
      ->ArgNames({"N", "V", "d", "R", "small"})
      ->Args(smoke ? std::vector<int64_t>{16, 500, 32, 4, 100} : std::vector<int64_t>{512, 50257, 768, 8, 1000})
      ->Iterations(smoke ? 2 : 201)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
  // Issue 16: DoRA's forward and training step against LoRA's, N = 512, I = O = 4096, r = 8.
  for (int step = 0; step < 2; ++step)
    benchmark::RegisterBenchmark("dora_paired", dora_paired)
        ->ArgNames({"N", "I", "O", "R", "step"})
        ->Args(smoke ? std::vector<int64_t>{16, 64, 64, 4, step} : std::vector<int64_t>{512, 4096, 4096, 8, step})
        ->Iterations(smoke ? 2 : 15)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
  // Issue 16: PiSSA (full and randomised SVD) and OLoRA initialisation of a 4096 x 4096 weight at r = 8.
  benchmark::RegisterBenchmark("init_times", init_times)
      ->ArgNames({"D", "R"})
      ->Args({smoke ? 64 : 4096, 8})
      ->Iterations(1)
      ->Unit(benchmark::kSecond)
      ->UseRealTime();
}

// Passes everything to the console and keeps each run's time (the median when
// repetitions are on) to print ratios at the end.
class RatioReporter : public benchmark::ConsoleReporter {
 public:
  // Colours only on a terminal: a custom reporter does not get --benchmark_color, and logs should stay plain text.
  RatioReporter() : ConsoleReporter(isatty(STDOUT_FILENO) ? OO_Defaults : OO_Tabular) {}
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const auto& r : runs) {
      if (r.run_type == Run::RT_Aggregate && r.aggregate_name != "median") continue;
      std::string name = r.benchmark_name();
      if (r.run_type == Run::RT_Aggregate) name = name.substr(0, name.rfind('_'));
      const auto suffix = name.find("/real_time");
      if (suffix != std::string::npos) name.erase(suffix);
      times_[name] = r.GetAdjustedRealTime();
    }
    ConsoleReporter::ReportRuns(runs);
  }
  void print_ratios() const {
    const std::vector<std::pair<std::string, std::string>> pairs = {{"lora_forward", "dense_forward"},
                                                                    {"lora_forward_merged", "dense_forward"},
                                                                    {"naive_rebuild", "dense_forward"},
                                                                    {"lora_train_step", "dense_two_products"},
                                                                    {"full_ft_step", "dense_two_products"},
                                                                    {"full_ft_step", "lora_train_step"},
                                                                    {"dense_dx", "dense_forward"},
                                                                    {"dense_dW", "dense_forward"},
                                                                    {"full_ft_step_adamw", "lora_step_adamw"}};
    std::printf("\n%-22s %-20s %-22s %8s\n", "variant", "shape", "relative to", "ratio");
    for (const auto& [variant, base] : pairs)
      for (const auto& [name, t] : times_) {
        if (name.rfind(variant + "/", 0) != 0) continue;
        const std::string shape = name.substr(variant.size());
        auto it = times_.find(base + shape);
        if (it == times_.end()) continue;
        std::printf("%-22s %-20s %-22s %8.3f\n", variant.c_str(), shape.c_str() + 1, base.c_str(), t / it->second);
      }
    // Mixed batches: against the single-adapter forward of the same N, D, R (K = 1), and that against the dense
    // product.
    std::printf("\n%-24s %-26s %-24s %8s\n", "variant", "shape", "relative to", "ratio");
    for (const char* variant : {"mixed_forward", "naive_merge_per_adapter", "single_adapter_forward"})
      for (const auto& [name, t] : times_) {
        const std::string v = variant;
        if (name.rfind(v + "/", 0) != 0) continue;
        const std::string shape = name.substr(v.size());
        const std::string nd_r = shape.substr(0, shape.rfind("/K:"));
        const std::string base = v == "single_adapter_forward" ? "dense_forward" : "single_adapter_forward";
        auto it = times_.find(base + nd_r + (v == "single_adapter_forward" ? "" : "/K:1"));
        if (it == times_.end()) continue;
        std::printf("%-24s %-26s %-24s %8.3f\n", variant, shape.c_str() + 1, base.c_str(), t / it->second);
      }
  }

 private:
  std::map<std::string, double> times_;
};
}  // namespace

int main(int argc, char** argv) {
  const auto options = lora_bench::take_options(argc, argv);
  // --benchmark_format=json or csv: Google Benchmark's own reporter, so stdout is what the flag promises; the
  // context lines go to stderr and the ratio table is left out (bench/summarize.py computes it from the JSON).
  bool machine_format = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--benchmark_format=", 0) == 0 && arg != "--benchmark_format=console") machine_format = true;
  }
  std::FILE* text = machine_format ? stderr : stdout;
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  lora_bench::set_threads(options.threads, argv[0]);
  std::fputs(lora_bench::context_lines().c_str(), text);
  benchmark::AddCustomContext("lora_backend", lora_bench::backend_name());
  benchmark::AddCustomContext("lora_kernel", lora_bench::kernel_description());
  benchmark::AddCustomContext("lora_threads", std::to_string(lora_bench::backend_threads()));
  benchmark::AddCustomContext("lora_cpu", lora_bench::cpu_model());
  const std::string memory = adapter_memory(options.smoke ? 64 : 4096, 8, 64);
  std::fprintf(text, "# adapter memory: %s\n", memory.c_str());
  benchmark::AddCustomContext("lora_adapter_memory", memory);
  register_all(options.smoke);
  if (machine_format) {
    benchmark::RunSpecifiedBenchmarks();
  } else {
    RatioReporter reporter;
    benchmark::RunSpecifiedBenchmarks(&reporter);
    reporter.print_ratios();
  }
  benchmark::Shutdown();
  return 0;
}
