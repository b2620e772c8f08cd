// Data-parallel training: K processes share each optimizer step's global batch and average their gradients, so
// that they train the adapter one process would train. Nothing here needs MPI: the transport is a Communicator
// (<lora/distributed.hpp> has the MPI one; LocalCommunicator is the one-process one), so a program runs the same
// code with or without MPI, and one process gives what K give.
//
//   lora::mpi::Environment env(argc, argv);                // <lora/distributed.hpp>
//   lora::mpi::Communicator comm;                          // MPI_COMM_WORLD (or lora::LocalCommunicator)
//   lora::DataParallel<float>::Options o;
//   o.global_batch = 128;                                  // rows per optimizer step, over all ranks
//   o.mode = lora::DataParallelMode::deterministic;        // bit-identical for every rank count
//   o.micro_batches = 4;                                   // the global batch's fixed split (its "leaves")
//   lora::DataParallel<float> dp(comm, model, o);          // collective: checks the ranks agree, broadcasts rank 0's
//   lora::ShuffledBatches batches(n, o.global_batch, seed);// every rank draws the same global batches
//   for (long step = 0; step < steps; ++step) {
//     const Index* batch = batches.next();                 // the global batch, the same on every rank
//     for (const auto& shard : dp.shards()) {              // this rank's rows of it: batch[shard.begin, shard.end)
//       ... forward and backward of those rows, loss = their mean ...
//       dp.accumulate(loss);                               // takes the gradients (and zeroes them)
//     }
//     const double loss = dp.reduce();                     // the global batch's mean loss; grads hold its gradient
//     lora::clip_grad_norm(params, 1.0);                   // the same on every rank
//     opt.step();
//     opt.zero_grad();
//   }
//
// The global batch of B rows is cut into M leaves (micro_batches) of B/M rows (the first B mod M one row longer),
// and the leaves are dealt out in order: rank k of K takes a contiguous run of about M/K of them. Each leaf's
// gradient, taken by accumulate(), is weighted by its share of the batch (rows / B), so that the sum over leaves is
// the gradient of the batch's mean loss: what one process computes with the whole batch, up to rounding.
//
// Two modes:
//   fast           the local leaves are summed in order, then one allreduce (the transport's own order) sums the
//                  ranks. K processes agree with one to rounding (about 1e-7 relative per step).
//   deterministic  the leaves are summed in one fixed binary tree over leaf indices, whatever the rank count: a
//                  rank sums the subtrees that lie inside its run, one allgather brings every rank the others', and
//                  every rank adds up the rest of the tree in the same order. So any K (1 <= K <= M) gives the
//                  bits one process gives with the same M. It sends each rank's subtree sums (usually one or two
//                  per rank; at most about 2 log2(M/K) + 2) where fast mode sends one vector.
//
// Every collective call (the constructor, reduce, save_checkpoint, load_checkpoint) must be made by every rank,
// in the same order. What a rank sends per step is counted (bytes_sent_per_step).
#pragma once

#ifndef LORA_INSIDE_LIBRARY
#define LORA_INSIDE_LIBRARY
#endif

#include <lora/checkpoint.hpp>
#include <lora/errors.hpp>
#include <lora/linear.hpp>
#include <lora/optim.hpp>
#include <lora/params.hpp>
#include <lora/safetensors.hpp>
#include <lora/sequential.hpp>
#include <lora/types.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

namespace lora {

// ---- the transport ------------------------------------------------------------------------------------------

/// What data-parallel training needs from its transport. Every call is collective: every rank makes it, in the
/// same order. `what` names the call in the transport's errors ("reduce of step 12", ...).
class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  /// In place: data[i] becomes the sum over ranks of their data[i].
  virtual void allreduce_sum(float* data, std::size_t n, const char* what) = 0;
  virtual void allreduce_sum(double* data, std::size_t n, const char* what) = 0;
  /// Every rank's `send` (counts[rank()] bytes), concatenated in rank order into `recv` (sum of counts bytes).
  virtual void allgatherv(const void* send, void* recv, const std::vector<std::size_t>& counts, const char* what) = 0;
  /// Rank `root`'s n bytes into every rank's `data`.
  virtual void broadcast(void* data, std::size_t n, int root, const char* what) = 0;
};

/// One process: the transport of a program run without MPI (every call is a copy or nothing).
class LocalCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  void allreduce_sum(float*, std::size_t, const char*) override {}
  void allreduce_sum(double*, std::size_t, const char*) override {}
  void allgatherv(const void* send, void* recv, const std::vector<std::size_t>& counts, const char*) override {
    if (counts.size() != 1)
      throw config_error("LocalCommunicator::allgatherv: expected 1 count, got " + std::to_string(counts.size()));
    if (counts[0] > 0) std::memcpy(recv, send, counts[0]);
  }
  void broadcast(void*, std::size_t, int root, const char*) override {
    if (root != 0) throw config_error("LocalCommunicator::broadcast: root must be 0, got " + std::to_string(root));
  }
};

// ---- the data ---------------------------------------------------------------------------------------------

/// Shuffled passes over 0..n-1, one global batch at a time, the same on every rank for the same seed. Epoch e's
/// order is a Fisher-Yates shuffle drawn from std::mt19937_64 seeded with splitmix64(seed, e) (the engine's output
/// is fixed by the standard, its distributions are not, so the shuffle is written out): any (epoch, batch)
/// position is reached directly, which a checkpoint needs. An epoch holds n / batch batches; the rest of it is
/// left out, as torch's DataLoader(drop_last=True) does.
class ShuffledBatches {
 public:
  ShuffledBatches(Index n, Index batch, std::uint64_t seed) : n_(n), batch_(batch), seed_(seed) {
    if (n < 1 || batch < 1 || batch > n)
      throw config_error("ShuffledBatches: expected 1 <= batch <= n, got batch " + std::to_string(batch) + " of n " +
                         std::to_string(n));
    order_.resize(static_cast<std::size_t>(n));
    shuffle();
  }
  /// The next global batch: `batch()` indices into the data set.
  const Index* next() {
    if (next_batch_ >= batches_per_epoch()) {
      ++epoch_;
      next_batch_ = 0;
      shuffle();
    }
    return order_.data() + static_cast<std::size_t>(batch_ * next_batch_++);
  }
  Index batch() const { return batch_; }
  Index batches_per_epoch() const { return n_ / batch_; }
  /// The position of the batch next() returns next (a checkpoint's TrainingState epoch and batch).
  long epoch() const { return next_batch_ >= batches_per_epoch() ? epoch_ + 1 : epoch_; }
  long next_batch() const { return next_batch_ >= batches_per_epoch() ? 0 : static_cast<long>(next_batch_); }
  /// Continues from a saved position.
  void seek(long epoch, long batch) {
    if (epoch < 0 || batch < 0 || batch >= batches_per_epoch())
      throw config_error("ShuffledBatches::seek: expected epoch >= 0 and 0 <= batch < " +
                         std::to_string(batches_per_epoch()) + ", got epoch " + std::to_string(epoch) + ", batch " +
                         std::to_string(batch));
    epoch_ = epoch;
    next_batch_ = batch;
    shuffle();
  }

 private:
  void shuffle() {
    std::uint64_t state = seed_ ^ (0x9E3779B97F4A7C15ull * static_cast<std::uint64_t>(epoch_ + 1));
    std::mt19937_64 rng(detail::splitmix64(state));
    for (std::size_t i = 0; i < order_.size(); ++i) order_[i] = static_cast<Index>(i);
    for (std::size_t i = order_.size(); i > 1; --i) std::swap(order_[i - 1], order_[rng() % i]);
  }
  Index n_, batch_;
  std::uint64_t seed_;
  long epoch_ = 0;
  Index next_batch_ = 0;
  std::vector<Index> order_;
};

// ---- what every rank must agree on -------------------------------------------------------------------------

/// One line per module of a model, for DataParallel to compare across ranks: the layer's kind, shape, rank,
/// scaling, dropout, variants and a fingerprint of its frozen weights (so that a rank that loaded another base
/// is caught too).
template <class Scalar>
std::vector<std::pair<std::string, std::string>> module_signatures(const LoRALinear<Scalar>& layer,
                                                                   const std::string& name = "") {
  const auto& c = layer.config();
  std::ostringstream s;
  s << "LoRALinear(" << layer.in_features() << " -> " << layer.out_features() << ", r=" << layer.rank()
    << ", scaling=" << value_string(c.scaling()) << ", lora_dropout=" << value_string(c.lora_dropout)
    << ", use_dora=" << (c.use_dora ? "true" : "false") << ", bias=" << (layer.bias_trainable() ? "trains" : "frozen")
    << ", base " << detail::base_fingerprint(layer) << ")";
  return {{name, s.str()}};
}

template <class Scalar>
std::vector<std::pair<std::string, std::string>> module_signatures(const Sequential<Scalar>& model) {
  std::map<const LoRALinear<Scalar>*, std::string> names;  // named_linears() hands out writable pointers
  for (const auto& [name, layer] : const_cast<Sequential<Scalar>&>(model).named_linears()) names[layer] = name;
  std::vector<std::pair<std::string, std::string>> out;
  for (std::size_t i = 0; i < model.size(); ++i) {
    if (const auto* l = std::get_if<LoRALinear<Scalar>>(&model[i])) {
      auto line = module_signatures(*l, names[l]);
      out.push_back(std::move(line[0]));
    } else {
      out.emplace_back(std::to_string(i), std::holds_alternative<GELU>(model[i]) ? "GELU" : "ReLU");
    }
  }
  return out;
}

template <class Scalar>
std::vector<std::pair<std::string, std::string>> module_signatures(
    const std::map<std::string, LoRALinear<Scalar>*>& model) {
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& [name, layer] : model) {
    if (layer == nullptr) throw config_error("module_signatures: module \"" + name + "\" is a null pointer");
    auto line = module_signatures(*layer, name);
    out.push_back(std::move(line[0]));
  }
  return out;
}

/// Reseeds the dropout stream of every LoRALinear of `model` from one seed (layer i gets splitmix64 of seed and
/// i): with DataParallel::leaf_seed(step, leaf) before each shard's forward, the dropout masks of a leaf are the
/// same whichever rank computes it.
template <class Scalar>
void set_dropout_seeds(LoRALinear<Scalar>& layer, std::uint64_t seed) {
  layer.set_dropout_seed(seed);
}
template <class Scalar>
void set_dropout_seeds(Sequential<Scalar>& model, std::uint64_t seed) {
  for (std::size_t i = 0; i < model.size(); ++i)
    if (auto* l = std::get_if<LoRALinear<Scalar>>(&model[i])) {
      std::uint64_t s = seed + 0x9E3779B97F4A7C15ull * (i + 1);
      l->set_dropout_seed(detail::splitmix64(s));
    }
}
template <class Scalar>
void set_dropout_seeds(const std::map<std::string, LoRALinear<Scalar>*>& model, std::uint64_t seed) {
  std::uint64_t i = 0;
  for (const auto& entry : model) {
    std::uint64_t s = seed + 0x9E3779B97F4A7C15ull * ++i;
    entry.second->set_dropout_seed(detail::splitmix64(s));
  }
}

enum class DataParallelMode { fast, deterministic };

inline const char* mode_name(DataParallelMode m) { return m == DataParallelMode::fast ? "fast" : "deterministic"; }

/// Rows [begin, end) of the global batch: leaf `leaf` of the micro_batches.
struct Shard {
  int leaf = 0;
  Index begin = 0;
  Index end = 0;
  Index size() const { return end - begin; }
};

// ---- data-parallel training ---------------------------------------------------------------------------------

template <class Scalar>
class DataParallel {
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>,
                "DataParallel: Scalar is float or double");

 public:
  struct Options {
    DataParallelMode mode = DataParallelMode::fast;
    Index global_batch = 0;  ///< rows per optimizer step over all ranks (required)
    /// The global batch's split into leaves (gradient accumulation: the most rows one forward holds is about
    /// global_batch / micro_batches). 0: one leaf per rank (fast mode only; deterministic mode needs a split that
    /// does not change with the rank count).
    int micro_batches = 0;
    std::uint64_t seed = 0;  ///< leaf_seed(step, leaf) derives the dropout seeds from it
  };

  /// Collective. Checks that every rank built the same trainable tensors (names, shapes, parameter groups), the
  /// same modules (`modules`, e.g. module_signatures(model)) and the same options, and throws config_error on
  /// every rank, naming the first rank and module that differ from rank 0, when they do not. Then every rank's
  /// parameters become rank 0's (one broadcast), so every rank starts from the same adapters.
  DataParallel(Communicator& comm, ParameterList<Scalar> params, Options options,
               std::vector<std::pair<std::string, std::string>> modules = {})
      : comm_(comm), params_(std::move(params)), o_(options) {
    const int K = comm_.size();
    // Bad options are reported after the ranks compared them (agree), so that every rank throws: a rank that threw
    // here alone would leave the others waiting in the collective.
    std::string problem;
    if (o_.global_batch < 1)
      problem = "DataParallel: Options::global_batch (rows per step over all ranks) must be >= 1, got " +
                std::to_string(o_.global_batch);
    else if (o_.micro_batches < 0)
      problem = "DataParallel: Options::micro_batches must be >= 0, got " + std::to_string(o_.micro_batches);
    else if (o_.mode == DataParallelMode::deterministic && o_.micro_batches == 0)
      problem =
          "DataParallel: deterministic mode needs Options::micro_batches, the global batch's split into leaves, "
          "which stays the same for every rank count (e.g. 8; every rank count from 1 to it then gives the same "
          "bits); got 0";
    leaves_ = o_.micro_batches > 0 ? o_.micro_batches : K;
    if (problem.empty() && leaves_ > o_.global_batch)
      problem = "DataParallel: " + std::to_string(leaves_) + " leaves (micro_batches" +
                std::string(o_.micro_batches > 0 ? "" : " 0: one per rank") + ") need at least as many rows " +
                "per step, got global_batch " + std::to_string(o_.global_batch);
    size_ = 0;
    for (const auto& p : params_) size_ += static_cast<std::size_t>(p.size());
    agree(modules);
    if (!problem.empty()) throw config_error(problem);
    for (const auto& p : params_)
      comm_.broadcast(p.value, static_cast<std::size_t>(p.size()) * sizeof(Scalar), 0, "the initial parameters");

    // This rank's leaves: a contiguous run, the first (leaves mod K) ranks one longer.
    const int k = comm_.rank();
    for (int r = 0; r <= K; ++r) first_leaf_.push_back(r * (leaves_ / K) + std::min(r, leaves_ % K));
    for (int j = first_leaf_[k]; j < first_leaf_[k + 1]; ++j) shards_.push_back({j, leaf_row(j), leaf_row(j + 1)});
    if (o_.mode == DataParallelMode::deterministic) {
      pieces(0, leaves_);
      for (const auto& p : pieces_) ++pieces_of_rank_[static_cast<std::size_t>(p.owner)];
    }
    const std::size_t n = size_ + 1;  // the gradients and the loss
    if (o_.mode == DataParallelMode::fast) {
      acc_.assign(n, Scalar(0));
    } else {
      stored_.assign(n * shards_.size(), Scalar(0));
      mine_.assign(n * pieces_of_rank_[static_cast<std::size_t>(k)], Scalar(0));
      std::size_t total = 0;
      for (const auto c : pieces_of_rank_) total += c;
      if (K > 1) gathered_.assign(n * total, Scalar(0));
      work_.assign(n * static_cast<std::size_t>(depth(0, leaves_) + 1), Scalar(0));
    }
  }

  /// The same over a model: its parameters() and module_signatures(model).
  template <class Model, class = decltype(module_signatures(std::declval<const Model&>()))>
  DataParallel(Communicator& comm, Model& model, Options options)
      : DataParallel(comm, model.parameters(), options, module_signatures(static_cast<const Model&>(model))) {}

  DataParallel(const DataParallel&) = delete;
  DataParallel& operator=(const DataParallel&) = delete;

  /// This rank's rows of every global batch, in order (empty when there are more ranks than leaves).
  const std::vector<Shard>& shards() const { return shards_; }
  const Options& options() const { return o_; }
  int leaves() const { return leaves_; }
  int rank() const { return comm_.rank(); }
  int ranks() const { return comm_.size(); }
  const ParameterList<Scalar>& parameters() const { return params_; }

  /// A dropout seed for leaf `leaf` of step `step`: the same whichever rank computes the leaf, so that dropout
  /// masks, too, do not depend on the rank count (set it on each layer before the leaf's forward).
  std::uint64_t leaf_seed(long step, int leaf) const {
    std::uint64_t s = o_.seed ^ (0xD1B54A32D192ED03ull * static_cast<std::uint64_t>(step + 1)) ^
                      (0x8CB92BA72F3D8DD7ull * static_cast<std::uint64_t>(leaf + 1));
    return detail::splitmix64(s);
  }

  /// After the backward of shards()[i] (call it once per shard, in order): takes the gradients the backward left
  /// in the parameters (weighted by the shard's share of the global batch) and zeroes them. `loss` is the shard's
  /// mean loss.
  void accumulate(double loss) {
    if (taken_ >= shards_.size())
      throw state_error("DataParallel::accumulate: this rank has " + std::to_string(shards_.size()) +
                        " shards per step and took them all; call reduce()");
    const Shard& s = shards_[taken_];
    const Scalar w = static_cast<Scalar>(static_cast<double>(s.size()) / static_cast<double>(o_.global_batch));
    const std::size_t n = size_ + 1;
    Scalar* out = o_.mode == DataParallelMode::fast ? acc_.data() : stored_.data() + n * taken_;
    const bool add = o_.mode == DataParallelMode::fast && taken_ > 0;
    std::size_t at = 0;
    for (const auto& p : params_) {  // one pass: take, weight, zero
      const auto m = static_cast<std::size_t>(p.size());
      Scalar* o = out + at;
      Scalar* g = p.grad;
      if (add)
        for (std::size_t i = 0; i < m; ++i) o[i] += w * g[i], g[i] = Scalar(0);
      else
        for (std::size_t i = 0; i < m; ++i) o[i] = w * g[i], g[i] = Scalar(0);
      at += m;
    }
    out[size_] = add ? out[size_] + w * static_cast<Scalar>(loss) : w * static_cast<Scalar>(loss);
    ++taken_;
  }

  /// Collective, after accumulate() for each of this rank's shards: every rank's parameters' gradients become the
  /// gradient of the global batch's mean loss, and the return value that mean loss.
  double reduce() {
    if (taken_ != shards_.size())
      throw state_error("DataParallel::reduce: accumulate() was called " + std::to_string(taken_) + " times, but " +
                        "this rank has " + std::to_string(shards_.size()) + " shards per step");
    const auto start = std::chrono::steady_clock::now();
    const std::string what = "reduce of step " + std::to_string(steps_);
    const std::size_t n = size_ + 1;
    const Scalar* result;
    if (o_.mode == DataParallelMode::fast) {
      if (shards_.empty()) std::fill(acc_.begin(), acc_.end(), Scalar(0));
      comm_.allreduce_sum(acc_.data(), n, what.c_str());
      result = acc_.data();
    } else {
      // This rank's subtrees, then everybody's, then the rest of the tree.
      const int k = comm_.rank();
      std::size_t m = 0;
      for (const auto& p : pieces_)
        if (p.owner == k) sum(p.lo, p.hi, 0, /*local=*/true, mine_.data() + n * m++);
      if (comm_.size() > 1) {
        std::vector<std::size_t> counts(pieces_of_rank_.size());
        for (std::size_t r = 0; r < counts.size(); ++r) counts[r] = pieces_of_rank_[r] * n * sizeof(Scalar);
        comm_.allgatherv(mine_.data(), gathered_.data(), counts, what.c_str());
        gathered_at_ = gathered_.data();
      } else {
        gathered_at_ = mine_.data();  // one rank: its pieces are all of them
      }
      result = sum(0, leaves_, 0, /*local=*/false, nullptr);
    }
    std::size_t at = 0;
    for (const auto& p : params_) {
      std::memcpy(p.grad, result + at, static_cast<std::size_t>(p.size()) * sizeof(Scalar));
      at += static_cast<std::size_t>(p.size());
    }
    const double loss = static_cast<double>(result[size_]);
    taken_ = 0;
    ++steps_;
    seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return loss;
  }

  /// What this rank hands the transport per step: fast mode one vector of every gradient and the loss,
  /// deterministic mode that many per subtree sum it owns.
  std::size_t bytes_sent_per_step() const {
    const std::size_t vector_bytes = (size_ + 1) * sizeof(Scalar);
    if (o_.mode == DataParallelMode::fast) return vector_bytes;
    return vector_bytes * pieces_of_rank_[static_cast<std::size_t>(comm_.rank())];
  }
  /// The trainable scalars reduced per step (the gradients; the loss is one more).
  std::size_t gradient_size() const { return size_; }
  /// Seconds spent in reduce() (the summing and the transport, waiting for slower ranks included), and steps.
  double reduce_seconds() const { return seconds_; }
  long steps() const { return steps_; }

  /// The options as a checkpoint records them: a resumed run must use the same (the rank count may change in
  /// deterministic mode, and in fast mode when micro_batches is set; with micro_batches 0 the leaves are the ranks).
  nlohmann::ordered_json description() const {
    return {{"mode", mode_name(o_.mode)},
            {"global_batch", o_.global_batch},
            {"micro_batches", o_.micro_batches},
            {"seed", std::to_string(o_.seed)}};
  }

  /// Collective: throws state_error on every rank when the ranks' parameters differ (they never should: every
  /// rank applies the same gradients to the same start), naming the ranks that differ from rank 0.
  void check_in_sync(const char* where) {
    std::uint64_t h = 0;
    for (const auto& p : params_)
      h = detail::fingerprint(h, p.value, static_cast<std::size_t>(p.size()) * sizeof(Scalar));
    std::vector<std::uint64_t> all(static_cast<std::size_t>(comm_.size()));
    comm_.allgatherv(&h, all.data(), std::vector<std::size_t>(all.size(), sizeof h), where);
    std::string differ;
    for (std::size_t r = 1; r < all.size(); ++r)
      if (all[r] != all[0]) differ += (differ.empty() ? "" : ", ") + std::to_string(r);
    if (!differ.empty())
      throw state_error(std::string(where) + ": the parameters of rank(s) " + differ +
                        " differ from rank 0's; the ranks no longer train one model");
  }

  Communicator& communicator() { return comm_; }

 private:
  struct Piece {
    int lo, hi, owner;
  };

  Index leaf_row(int j) const {
    const Index B = o_.global_batch, M = leaves_;
    return j * (B / M) + std::min<Index>(j, B % M);
  }

  int owner_of(int lo, int hi) const {  // the rank whose leaves hold [lo, hi), or -1
    for (std::size_t r = 0; r + 1 < first_leaf_.size(); ++r)
      if (first_leaf_[r] <= lo && hi <= first_leaf_[r + 1]) return static_cast<int>(r);
    return -1;
  }

  // The tree: [lo, hi) splits at lo + (hi - lo) / 2. A piece is a node inside one rank's leaves whose parent is not.
  void pieces(int lo, int hi) {
    if (const int r = owner_of(lo, hi); r >= 0) {
      pieces_.push_back({lo, hi, r});
      return;
    }
    const int mid = lo + (hi - lo) / 2;
    pieces(lo, mid);
    pieces(mid, hi);
  }
  static int depth(int lo, int hi) {
    if (hi - lo <= 1) return 0;
    const int mid = lo + (hi - lo) / 2;
    return 1 + std::max(depth(lo, mid), depth(mid, hi));
  }

  // The sum of leaves [lo, hi) in the tree's order (left + right at every node). Returns where it is: a stored leaf
  // or a gathered piece itself when the node is one (copied into `out` when given), else `out`, or work_ slot t
  // when out is null (slots above t are scratch). local: from this rank's stored leaves; else from the pieces.
  const Scalar* sum(int lo, int hi, std::size_t t, bool local, Scalar* out) {
    const std::size_t n = size_ + 1;
    const Scalar* given = nullptr;
    if (local && hi - lo == 1) {
      given = stored_.data() + n * static_cast<std::size_t>(lo - first_leaf_[static_cast<std::size_t>(comm_.rank())]);
    } else if (!local) {
      for (std::size_t i = 0; i < pieces_.size() && !given; ++i)
        if (pieces_[i].lo == lo && pieces_[i].hi == hi) given = gathered_at_ + n * i;
    }
    if (given) {
      if (!out) return given;
      std::memcpy(out, given, n * sizeof(Scalar));
      return out;
    }
    const int mid = lo + (hi - lo) / 2;
    const Scalar* left = sum(lo, mid, t, local, nullptr);
    const Scalar* right = sum(mid, hi, t + 1, local, nullptr);
    Scalar* to = out ? out : work_.data() + n * t;
    for (std::size_t i = 0; i < n; ++i) to[i] = left[i] + right[i];
    return to;
  }

  // Every rank's description of itself against rank 0's.
  void agree(const std::vector<std::pair<std::string, std::string>>& modules) {
    std::vector<std::string> lines;
    lines.push_back("options: mode " + std::string(mode_name(o_.mode)) + ", global_batch " +
                    std::to_string(o_.global_batch) + ", micro_batches " + std::to_string(o_.micro_batches) +
                    ", seed " + std::to_string(o_.seed) + ", scalar " + (sizeof(Scalar) == 4 ? "float" : "double"));
    for (const auto& [name, text] : modules) lines.push_back("module \"" + name + "\": " + text);
    for (const auto& p : params_) {
      std::ostringstream s;
      s << "parameter \"" << p.name << "\": [" << p.rows << ", " << p.cols << "], lr_scale " << value_string(p.lr_scale)
        << ", weight_decay " << (p.weight_decay ? value_string(*p.weight_decay) : std::string("the optimizer's"));
      lines.push_back(s.str());
    }
    std::string mine;
    for (const auto& l : lines) mine += l + '\n';
    const int K = comm_.size();
    std::vector<std::uint64_t> sizes(static_cast<std::size_t>(K));
    const std::uint64_t my_size = mine.size();
    comm_.allgatherv(&my_size, sizes.data(), std::vector<std::size_t>(sizes.size(), sizeof my_size),
                     "the ranks' descriptions (sizes)");
    std::vector<std::size_t> counts(sizes.begin(), sizes.end());
    std::size_t total = 0;
    for (const auto c : counts) total += c;
    std::string all(total, '\0');
    comm_.allgatherv(mine.data(), all.data(), counts, "the ranks' descriptions");
    std::vector<std::vector<std::string>> by_rank(static_cast<std::size_t>(K));
    std::size_t at = 0;
    for (int r = 0; r < K; ++r) {
      std::istringstream in(all.substr(at, counts[static_cast<std::size_t>(r)]));
      for (std::string line; std::getline(in, line);) by_rank[static_cast<std::size_t>(r)].push_back(line);
      at += counts[static_cast<std::size_t>(r)];
    }
    std::vector<std::string> problems;
    const auto& ref = by_rank[0];
    for (int r = 1; r < K; ++r) {
      const auto& got = by_rank[static_cast<std::size_t>(r)];
      for (std::size_t i = 0; i < std::max(ref.size(), got.size()); ++i) {
        const std::string a = i < ref.size() ? ref[i] : "(nothing)", b = i < got.size() ? got[i] : "(nothing)";
        if (a != b) {
          problems.push_back("rank " + std::to_string(r) + " has " + b + "; rank 0 has " + a);
          break;
        }
      }
    }
    if (!problems.empty()) {
      std::string message = "DataParallel: the ranks do not train the same model: ";
      for (std::size_t i = 0; i < problems.size() && i < 8; ++i) message += (i ? "; " : "") + problems[i];
      if (problems.size() > 8) message += "; and " + std::to_string(problems.size() - 8) + " more ranks";
      throw config_error(message);
    }
  }

  Communicator& comm_;
  ParameterList<Scalar> params_;
  Options o_;
  int leaves_ = 1;
  std::size_t size_ = 0;
  std::vector<int> first_leaf_;  // rank r's leaves are [first_leaf_[r], first_leaf_[r + 1])
  std::vector<Shard> shards_;
  std::vector<Piece> pieces_;  // deterministic: the tree's nodes each rank sums, in leaf order (so in rank order)
  std::vector<std::size_t> pieces_of_rank_ = std::vector<std::size_t>(static_cast<std::size_t>(comm_.size()), 0);
  std::vector<Scalar> acc_;              // fast: the local sum
  std::vector<Scalar> stored_;           // deterministic: this rank's leaves, one vector each
  std::vector<Scalar> mine_;             // deterministic: this rank's pieces
  std::vector<Scalar> gathered_;         // deterministic: every rank's pieces
  std::vector<Scalar> work_;             // deterministic: one vector per tree level
  const Scalar* gathered_at_ = nullptr;  // gathered_, or mine_ on one rank
  std::size_t taken_ = 0;
  long steps_ = 0;
  double seconds_ = 0;
};

// ---- checkpoints ---------------------------------------------------------------------------------------------

namespace detail {

inline constexpr const char* data_parallel_key = "data_parallel";

/// The error classes a failure keeps when it crosses ranks or is reworded: 1 io_error, 2 config_error,
/// 3 format_error, 4 state_error, 5 any other exception (0 is "no failure" on the wire).
inline std::uint64_t error_class(const std::exception& e) {
  if (dynamic_cast<const io_error*>(&e)) return 1;
  if (dynamic_cast<const config_error*>(&e)) return 2;
  if (dynamic_cast<const format_error*>(&e)) return 3;
  if (dynamic_cast<const state_error*>(&e)) return 4;
  return 5;
}

/// Throws `message` as an exception of class `c` (error_class's numbering; lora::error for 5).
[[noreturn]] inline void throw_error_class(std::uint64_t c, const std::string& message) {
  switch (c) {
    case 1:
      throw io_error(message);
    case 2:
      throw config_error(message);
    case 3:
      throw format_error(message);
    case 4:
      throw state_error(message);
    default:
      throw error(message);
  }
}

/// Broadcasts rank 0's outcome of `action` (run on rank 0 only): rank 0 rethrows its own exception, the other
/// ranks throw its class (io_error, config_error, format_error or state_error; lora::error otherwise) with rank 0's
/// message.
template <class Action>
void on_rank0(Communicator& comm, const char* what, Action&& action) {
  std::uint64_t head[2] = {0, 0};  // error_class of rank 0's failure (0: none), and its message's length
  std::string message;
  std::exception_ptr failure;
  if (comm.rank() == 0) {
    try {
      action();
    } catch (const std::exception& e) {
      head[0] = error_class(e), message = e.what(), failure = std::current_exception();
    }
  }
  head[1] = message.size();
  comm.broadcast(head, sizeof head, 0, what);
  if (head[0] == 0) return;
  message.resize(static_cast<std::size_t>(head[1]));
  comm.broadcast(message.data(), message.size(), 0, what);
  if (failure) std::rethrow_exception(failure);
  throw_error_class(head[0], "rank 0: " + message);
}

}  // namespace detail

/// Collective: rank 0 writes save_checkpoint(path, model, opt, state) (atomically: a failed save leaves an older
/// checkpoint as it was) with the data-parallel options beside `state.rng`; every rank returns when the file is in
/// place, or throws what rank 0's save threw. Checks first that every rank holds the same parameters.
template <class Model, class Optimizer, class Scalar>
void save_checkpoint(DataParallel<Scalar>& dp, const std::string& path, const Model& model, const Optimizer& opt,
                     const TrainingState& state) {
  dp.check_in_sync("save_checkpoint");
  TrainingState s = state;
  nlohmann::ordered_json wrapped;
  wrapped[detail::data_parallel_key] = dp.description();
  wrapped["ranks"] = dp.ranks();
  wrapped["rng"] = state.rng;
  s.rng = wrapped.dump();
  detail::on_rank0(dp.communicator(), "save_checkpoint", [&] { save_checkpoint(path, model, opt, s); });
}

/// Collective: rank 0 reads the checkpoint at `path` and sends its bytes to every rank (so the other ranks need
/// not see rank 0's file system), and every rank loads them as load_checkpoint(path, model, opt) does: checked
/// whole before anything changes. The file must come from a data-parallel run with the same options (the rank
/// count may differ, see DataParallel::description). Returns the TrainingState with the caller's own rng text.
template <class Model, class Optimizer, class Scalar>
TrainingState load_checkpoint(DataParallel<Scalar>& dp, const std::string& path, Model& model, Optimizer& opt) {
  Communicator& comm = dp.communicator();
  std::vector<std::uint8_t> bytes;
  // The library's bounded reader: a FIFO, a device such as /dev/zero or a directory at `path` is refused by name
  // (an ifstream would block on the first and read the second until memory ran out, with every rank waiting).
  // The bound only stops what cannot be a checkpoint: the file is held in memory to be sent either way.
  constexpr std::size_t max_checkpoint_bytes = std::size_t(1) << 36;  // 64 GiB
  detail::on_rank0(comm, "load_checkpoint (reading)",
                   [&] { bytes = detail::read_small_file_bytes(path, max_checkpoint_bytes, "a checkpoint"); });
  std::uint64_t n = bytes.size();
  comm.broadcast(&n, sizeof n, 0, "load_checkpoint (size)");
  bytes.resize(static_cast<std::size_t>(n));
  comm.broadcast(bytes.data(), bytes.size(), 0, "load_checkpoint (bytes)");

  // Every rank loads the same bytes, rank 0 too (not the file again, which may have changed since), from memory:
  // no rank writes a temporary copy, and every message names `path`.
  std::exception_ptr failure;
  TrainingState state;
  try {
    std::string own_rng;
    // The data-parallel options are checked on the state load_checkpoint_file has parsed and matched against the
    // model, before it changes anything: nothing may change when they differ.
    auto check_options = [&](const TrainingState& saved) {
      const std::string not_data_parallel =
          path + ": not written by a data-parallel run (its training.rng holds no \"" + detail::data_parallel_key +
          "\" object; load it with lora::load_checkpoint)";
      nlohmann::json wrapped;
      try {
        wrapped = nlohmann::json::parse(saved.rng, [&](int depth, nlohmann::json::parse_event_t, nlohmann::json&) {
          if (depth > detail::checkpoint_max_json_depth) throw format_error(not_data_parallel);
          return true;
        });
      } catch (const nlohmann::json::exception&) {
        throw format_error(not_data_parallel);
      }
      if (!wrapped.is_object() || !wrapped.contains(detail::data_parallel_key) || !wrapped.contains("rng") ||
          !wrapped["rng"].is_string())
        throw format_error(not_data_parallel);
      const nlohmann::json expected = dp.description();
      if (wrapped[detail::data_parallel_key] != expected)
        throw config_error(path + ": written by a data-parallel run with options " +
                           wrapped[detail::data_parallel_key].dump() + ", this run has " + expected.dump() +
                           "; resume with the same mode, global_batch, micro_batches and seed");
      own_rng = wrapped["rng"].get<std::string>();
    };
    state = detail::load_checkpoint_file(
        path, model, opt, [&] { return safetensors::File::from_bytes(std::move(bytes), path); }, check_options);
    state.rng = std::move(own_rng);
  } catch (...) {
    failure = std::current_exception();
  }
  double failed = failure ? 1 : 0;
  comm.allreduce_sum(&failed, 1, "load_checkpoint (outcome)");
  if (failure) std::rethrow_exception(failure);
  if (failed > 0)
    throw state_error("load_checkpoint: " + path + " could not be loaded on " +
                      std::to_string(static_cast<long>(failed)) + " other rank(s); every rank stops");
  return state;
}

}  // namespace lora
