// A small training job for the data-parallel tests (tests/unit-data-parallel.cpp in one process, tests/mpi/ under
// mpirun): a two-layer LoRA model over frozen random bases, a regression target, AdamW with a cosine schedule and
// gradient clipping, trained either by DataParallel over a Communicator or by the plain one-process loop.
#pragma once

#include <lora/data_parallel.hpp>
#include <lora/lora.hpp>

#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace dp_test {

using Mat = lora::Matrix<float>;
using lora::Index;

constexpr Index kInputs = 24, kHidden = 40, kOutputs = 6, kRows = 240;

/// Uniform [-1, 1) numbers from std::mt19937_64 (whose output the standard fixes): the same on every rank.
inline Mat random_matrix(Index rows, Index cols, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  Mat m(rows, cols);
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) m(i, j) = static_cast<float>(static_cast<double>(rng() >> 11) * 0x1p-52 - 1.0);
  return m;
}

struct Data {
  Mat x = random_matrix(kRows, kInputs, 11);
  Mat y =
      (x * random_matrix(kInputs, kOutputs, 12)).array().tanh().matrix() + 0.1f * random_matrix(kRows, kOutputs, 13);
};

/// LoRALinear(24 -> 40) GELU LoRALinear(40 -> 6, bias trains). `first_rank` changes the first layer's rank (the
/// mismatch test gives one rank another).
inline lora::Sequential<float> make_model(float dropout, int first_rank = 4) {
  lora::LoraConfig c;
  c.r = first_rank;
  c.lora_alpha = 8;
  c.lora_dropout = dropout;
  c.seed = 5;
  lora::LoraConfig head = c;
  head.r = 2;
  head.seed = 6;
  head.bias = lora::BiasMode::lora_only;
  lora::Sequential<float> model;
  model.add(lora::LoRALinear<float>(kInputs, kHidden, c));
  model.add(lora::GELU{});
  model.add(lora::LoRALinear<float>(kHidden, kOutputs, head));
  // B starts at zero (PEFT's start); a random one makes every step's gradient reach A as well.
  model.linear(0).lora_B() = random_matrix(kHidden, first_rank, 21) * 0.1f;
  model.linear(2).lora_B() = random_matrix(kOutputs, 2, 22) * 0.1f;
  return model;
}

/// Every trainable scalar of the model, in parameters() order.
inline std::vector<float> flat(lora::Sequential<float>& model) {
  std::vector<float> out;
  for (const auto& p : model.parameters()) out.insert(out.end(), p.value, p.value + p.size());
  return out;
}

inline double relative_difference(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size() && i < b.size(); ++i) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return a.size() == b.size() ? std::sqrt(num / den) : INFINITY;
}

/// K ranks as K threads of one process: every collective deposits each rank's buffer, waits for all, then reads
/// what it needs (sums in rank order), and waits again before anyone reuses a buffer. For the tests only: it runs
/// the multi-rank logic under the sanitizers, with no MPI.
class ThreadGroup {
 public:
  explicit ThreadGroup(int size) : size_(size), slots_(static_cast<std::size_t>(size)) {}
  int size() const { return size_; }
  void barrier() {
    std::unique_lock<std::mutex> lock(m_);
    const long generation = generation_;
    if (++arrived_ == size_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation_ != generation; });
    }
  }
  void deposit(int rank, const void* p) {
    std::lock_guard<std::mutex> lock(m_);
    slots_[static_cast<std::size_t>(rank)] = p;
  }
  const void* slot(int rank) {
    std::lock_guard<std::mutex> lock(m_);
    return slots_[static_cast<std::size_t>(rank)];
  }

 private:
  int size_;
  std::mutex m_;
  std::condition_variable cv_;
  int arrived_ = 0;
  long generation_ = 0;
  std::vector<const void*> slots_;
};

class ThreadCommunicator final : public lora::Communicator {
 public:
  ThreadCommunicator(ThreadGroup& group, int rank) : g_(group), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return g_.size(); }
  void allreduce_sum(float* data, std::size_t n, const char*) override { sum(data, n); }
  void allreduce_sum(double* data, std::size_t n, const char*) override { sum(data, n); }
  void allgatherv(const void* send, void* recv, const std::vector<std::size_t>& counts, const char*) override {
    g_.deposit(rank_, send);
    g_.barrier();
    std::size_t at = 0;
    for (int r = 0; r < size(); ++r) {
      if (counts[static_cast<std::size_t>(r)] > 0)
        std::memcpy(static_cast<char*>(recv) + at, g_.slot(r), counts[static_cast<std::size_t>(r)]);
      at += counts[static_cast<std::size_t>(r)];
    }
    g_.barrier();
  }
  void broadcast(void* data, std::size_t n, int root, const char*) override {
    g_.deposit(rank_, data);
    g_.barrier();
    if (rank_ != root && n > 0) std::memcpy(data, g_.slot(root), n);
    g_.barrier();
  }

 private:
  template <class T>
  void sum(T* data, std::size_t n) {
    g_.deposit(rank_, data);
    g_.barrier();
    std::vector<T> total(n, T(0));
    for (int r = 0; r < size(); ++r) {
      const T* other = static_cast<const T*>(g_.slot(r));
      for (std::size_t i = 0; i < n; ++i) total[i] += other[i];
    }
    g_.barrier();
    std::copy(total.begin(), total.end(), data);
  }
  ThreadGroup& g_;
  int rank_;
};

/// Runs body(communicator) on K threads, one rank each, and returns each rank's exception (or null).
inline std::vector<std::exception_ptr> run_ranks(int K, const std::function<void(lora::Communicator&)>& body) {
  ThreadGroup group(K);
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(K));
  std::vector<std::thread> threads;
  for (int r = 0; r < K; ++r)
    threads.emplace_back([&, r] {
      ThreadCommunicator comm(group, r);
      try {
        body(comm);
      } catch (...) {
        errors[static_cast<std::size_t>(r)] = std::current_exception();
      }
    });
  for (auto& t : threads) t.join();
  return errors;
}

struct Job {
  Index batch = 48;
  long steps = 100;
  float dropout = 0;
  std::uint64_t seed = 3;
};

struct Result {
  std::vector<float> params;
  std::vector<double> losses;
  std::size_t bytes_per_step = 0;
};

inline void gather_rows(const Mat& from, const Index* rows, Index n, Mat& to) {
  to.resize(n, from.cols());
  for (Index i = 0; i < n; ++i) to.row(i) = from.row(rows[i]);
}

inline float schedule(long step, long total) { return lora::cosine_schedule_with_warmup(step, total / 10, total); }

/// Trains with DataParallel over `comm` from step `from` (a checkpoint's) to job.steps. `save_at` > 0 saves a
/// checkpoint to `path` after that many steps; `resume` loads one from `path` first.
inline Result train_parallel(lora::Communicator& comm, const Data& data, const Job& job,
                             lora::DataParallel<float>::Options o, const std::string& path = "", long save_at = 0,
                             bool resume = false, int first_rank = 4) {
  auto model = make_model(job.dropout, first_rank);
  lora::AdamW<float> opt(model.parameters(), {1e-2, 0.9, 0.999, 1e-8, 0.01});
  o.global_batch = job.batch;
  o.seed = job.seed;
  lora::DataParallel<float> dp(comm, model, o);
  lora::ShuffledBatches batches(kRows, job.batch, job.seed);
  long step = 0;
  if (resume) {
    const auto state = lora::load_checkpoint(dp, path, model, opt);
    step = state.step;
    batches.seek(state.epoch, state.batch);
  }
  const auto params = model.parameters();
  Result r;
  Mat x, y, dy;
  model.train();
  for (; step < job.steps; ++step) {
    const Index* batch = batches.next();
    for (const auto& shard : dp.shards()) {
      lora::set_dropout_seeds(model, dp.leaf_seed(step, shard.leaf));
      gather_rows(data.x, batch + shard.begin, shard.size(), x);
      gather_rows(data.y, batch + shard.begin, shard.size(), y);
      const Mat& out = model.forward(x);
      dy.resize(out.rows(), out.cols());
      const float loss = lora::mse_loss<float>(out, y, dy);
      model.backward(dy);
      dp.accumulate(loss);
    }
    r.losses.push_back(dp.reduce());
    lora::clip_grad_norm(params, 1.0);
    opt.set_lr(1e-2 * schedule(step, job.steps));
    opt.step();
    opt.zero_grad();
    if (save_at > 0 && step + 1 == save_at) {
      lora::TrainingState state;
      state.step = step + 1;
      state.epoch = batches.epoch();
      state.batch = batches.next_batch();
      lora::save_checkpoint(dp, path, model, opt, state);
    }
  }
  r.params = flat(model);
  r.bytes_per_step = dp.bytes_sent_per_step();
  return r;
}

/// The plain loop of one process: the whole global batch in one forward and backward.
inline Result train_plain(const Data& data, const Job& job) {
  auto model = make_model(job.dropout);
  lora::AdamW<float> opt(model.parameters(), {1e-2, 0.9, 0.999, 1e-8, 0.01});
  lora::ShuffledBatches batches(kRows, job.batch, job.seed);
  const auto params = model.parameters();
  Result r;
  Mat x, y, dy;
  model.train();
  for (long step = 0; step < job.steps; ++step) {
    const Index* batch = batches.next();
    gather_rows(data.x, batch, job.batch, x);
    gather_rows(data.y, batch, job.batch, y);
    const Mat& out = model.forward(x);
    dy.resize(out.rows(), out.cols());
    r.losses.push_back(lora::mse_loss<float>(out, y, dy));
    model.backward(dy);
    lora::clip_grad_norm(params, 1.0);
    opt.set_lr(1e-2 * schedule(step, job.steps));
    opt.step();
    opt.zero_grad();
  }
  r.params = flat(model);
  return r;
}

}  // namespace dp_test
