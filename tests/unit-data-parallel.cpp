// DataParallel in one process: over LocalCommunicator (one rank) and over ranks that are threads
// (dp_test::ThreadCommunicator), against the plain one-process loop. tests/mpi/ runs the same job under mpirun.
#include <catch2/catch.hpp>
#include <lora/data_parallel.hpp>

#if defined(__unix__)
#include <sys/stat.h>
#endif

#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "data_parallel_helpers.hpp"

namespace unit_data_parallel {

using dp_test::Data;
using dp_test::Job;
using dp_test::Result;
using Options = lora::DataParallel<float>::Options;
using Catch::Matchers::Contains;

Options options(lora::DataParallelMode mode, int micro_batches) {
  Options o;
  o.mode = mode;
  o.micro_batches = micro_batches;
  return o;
}

std::string scratch(const std::string& name) {
  const auto dir = std::filesystem::temp_directory_path() / ("lora-unit-dp-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  return (dir / name).string();
}

// K thread ranks train the job; returns rank 0's result and checks every rank ended with the same parameters.
Result train_on_threads(int K, const Data& data, const Job& job, const Options& o, const std::string& path = "",
                        long save_at = 0) {
  std::vector<Result> results(static_cast<std::size_t>(K));
  const auto errors = dp_test::run_ranks(K, [&](lora::Communicator& comm) {
    results[static_cast<std::size_t>(comm.rank())] = dp_test::train_parallel(comm, data, job, o, path, save_at);
  });
  for (const auto& e : errors)
    if (e) std::rethrow_exception(e);
  for (int r = 1; r < K; ++r) REQUIRE(results[static_cast<std::size_t>(r)].params == results[0].params);
  return results[0];
}

TEST_CASE("DataParallel on one rank with one leaf is the plain loop, bit for bit", "[data_parallel]") {
  const Data data;
  const Job job;
  lora::LocalCommunicator comm;
  const Result plain = dp_test::train_plain(data, job);
  const Result one = dp_test::train_parallel(comm, data, job, options(lora::DataParallelMode::fast, 0));
  CHECK(one.params == plain.params);
  CHECK(one.losses == plain.losses);
  // Training did something: the loss fell by more than half.
  CHECK(plain.losses.back() < 0.5 * plain.losses.front());
  // One vector of every trainable scalar and the loss.
  std::size_t trainable = 0;
  auto model = dp_test::make_model(0);
  for (const auto& p : model.parameters()) trainable += static_cast<std::size_t>(p.size());
  CHECK(one.bytes_per_step == (trainable + 1) * sizeof(float));
}

TEST_CASE("DataParallel's leaves agree with the whole batch to rounding", "[data_parallel]") {
  const Data data;
  const Job job;
  lora::LocalCommunicator comm;
  const Result plain = dp_test::train_plain(data, job);
  for (const auto mode : {lora::DataParallelMode::fast, lora::DataParallelMode::deterministic}) {
    const Result split = dp_test::train_parallel(comm, data, job, options(mode, 4));
    INFO(lora::mode_name(mode));
    CHECK(dp_test::relative_difference(split.params, plain.params) < 1e-5);
    CHECK(split.params != plain.params);  // the leaves are summed in another order: not the same bits
  }
}

TEST_CASE("Deterministic mode gives the same bits for every rank count", "[data_parallel][threads]") {
  const Data data;
  Job job;
  job.dropout = 0.2f;  // the masks come from the leaf, not from the rank
  for (const int M : {4, 5, 8}) {
    const Options o = options(lora::DataParallelMode::deterministic, M);
    lora::LocalCommunicator local;
    const Result one = dp_test::train_parallel(local, data, job, o);
    for (int K = 2; K <= 4; ++K) {
      INFO("M = " << M << ", K = " << K);
      const Result many = train_on_threads(K, data, job, o);
      CHECK(many.params == one.params);
      CHECK(many.losses == one.losses);
    }
  }
}

TEST_CASE("Fast mode over thread ranks agrees with one process to rounding", "[data_parallel][threads]") {
  const Data data;
  const Job job;
  const Result plain = dp_test::train_plain(data, job);
  for (int K = 2; K <= 4; ++K) {
    INFO("K = " << K);
    const Result many = train_on_threads(K, data, job, options(lora::DataParallelMode::fast, 0));
    CHECK(dp_test::relative_difference(many.params, plain.params) < 1e-5);
  }
}

// K thread ranks run body(comm); returns the config_error each rank's body threw, and checks that every rank
// threw ("" for a rank that threw nothing, or something else: CHECK_THAT then names it).
template <class Body>
std::vector<std::string> refusals_on_ranks(int K, Body body) {
  std::vector<std::string> messages(static_cast<std::size_t>(K));
  const auto errors = dp_test::run_ranks(K, [&](lora::Communicator& comm) {
    try {
      body(comm);
    } catch (const lora::config_error& e) {
      messages[static_cast<std::size_t>(comm.rank())] = e.what();
      throw;
    }
  });
  for (int r = 0; r < K; ++r) {
    INFO("rank " << r);
    CHECK(errors[static_cast<std::size_t>(r)]);
  }
  return messages;
}

TEST_CASE("A data-parallel checkpoint resumes on another rank count", "[data_parallel][threads]") {
  const Data data;
  const Job job;
  const Options o = options(lora::DataParallelMode::deterministic, 4);
  const std::string path = scratch("resume.safetensors");
  const Result straight = train_on_threads(2, data, job, o, path, 50);
  // The same run, from the checkpoint written at step 50 by two ranks, on one and on three.
  lora::LocalCommunicator local;
  const Result resumed = dp_test::train_parallel(local, data, job, o, path, 0, true);
  CHECK(resumed.params == straight.params);
  std::vector<Result> three(3);
  const auto errors = dp_test::run_ranks(3, [&](lora::Communicator& comm) {
    three[static_cast<std::size_t>(comm.rank())] = dp_test::train_parallel(comm, data, job, o, path, 0, true);
  });
  for (const auto& e : errors) REQUIRE_FALSE(e);
  CHECK(three[0].params == straight.params);
  CHECK(three[2].params == straight.params);

  SECTION("a checkpoint of other options is refused, and nothing changes") {
    auto model = dp_test::make_model(0);
    lora::AdamW<float> opt(model.parameters());
    Options other = o;
    other.global_batch = job.batch;
    other.micro_batches = 8;
    lora::DataParallel<float> dp(local, model, other);
    const auto before = dp_test::flat(model);
    CHECK_THROWS_MATCHES(lora::load_checkpoint(dp, path, model, opt), lora::config_error,
                         Catch::Matchers::Predicate<lora::config_error>([](const lora::config_error& e) {
                           const std::string m = e.what();
                           return m.find("\"micro_batches\":4") != std::string::npos &&
                                  m.find("\"micro_batches\":8") != std::string::npos;
                         }));
    CHECK(dp_test::flat(model) == before);
    CHECK(opt.state().step == 0);
  }
  SECTION("on three ranks a checkpoint of other options is refused on every rank, by the file's name") {
    // Every rank loads the bytes rank 0 read, from memory: the message names `path` on ranks 1 and 2 too.
    // The models outlive the ranks' bodies, which end in the refusal, so that they can be compared afterwards.
    std::vector<lora::Sequential<float>> models;
    for (int r = 0; r < 3; ++r) models.push_back(dp_test::make_model(0));
    std::vector<std::vector<float>> before(3);
    const auto messages = refusals_on_ranks(3, [&](lora::Communicator& comm) {
      const auto r = static_cast<std::size_t>(comm.rank());
      auto& model = models[r];
      lora::AdamW<float> opt(model.parameters());
      Options other = o;
      other.global_batch = job.batch;
      other.micro_batches = 8;
      lora::DataParallel<float> dp(comm, model, other);
      before[r] = dp_test::flat(model);
      lora::load_checkpoint(dp, path, model, opt);
    });
    for (std::size_t r = 0; r < 3; ++r) {
      INFO("rank " << r);
      CHECK_THAT(messages[r], Contains(path + ": written by a data-parallel run with options") &&
                                  Contains("\"micro_batches\":4") && Contains("\"micro_batches\":8"));
      CHECK(dp_test::flat(models[r]) == before[r]);
    }
  }
  SECTION("a checkpoint written without DataParallel is refused") {
    auto model = dp_test::make_model(0);
    lora::AdamW<float> opt(model.parameters());
    const std::string plain_path = scratch("plain.safetensors");
    lora::save_checkpoint(plain_path, model, opt, lora::TrainingState{});
    Options same = o;
    same.global_batch = job.batch;
    lora::DataParallel<float> dp(local, model, same);
    CHECK_THROWS_WITH(lora::load_checkpoint(dp, plain_path, model, opt),
                      Contains("not written by a data-parallel run"));
  }
  SECTION("a missing file is an io_error; a directory or a FIFO is refused by name, not read; nothing changes") {
    auto model = dp_test::make_model(0);
    lora::AdamW<float> opt(model.parameters());
    Options same = o;
    same.global_batch = job.batch;
    lora::DataParallel<float> dp(local, model, same);
    const auto before = dp_test::flat(model);
    CHECK_THROWS_AS(lora::load_checkpoint(dp, scratch("missing.safetensors"), model, opt), lora::io_error);
    const std::string dir = scratch("a-directory");
    std::filesystem::create_directories(dir);
    CHECK_THROWS_WITH(lora::load_checkpoint(dp, dir, model, opt), Contains(dir + ": not a regular file"));
#if defined(__unix__)
    const std::string fifo = scratch("a-fifo");
    std::filesystem::remove(fifo);
    REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
    CHECK_THROWS_WITH(lora::load_checkpoint(dp, fifo, model, opt), Contains(fifo + ": not a regular file"));
    std::filesystem::remove(fifo);
#endif
    CHECK(dp_test::flat(model) == before);
  }
}

// K thread ranks construct DataParallel, rank k over make_model(k) with options(k); returns the config_error each
// rank's constructor threw (see refusals_on_ranks).
template <class MakeModel, class MakeOptions>
std::vector<std::string> constructor_refusals(int K, MakeModel make_model, MakeOptions make_options) {
  return refusals_on_ranks(K, [&](lora::Communicator& comm) {
    auto model = make_model(comm.rank());
    lora::DataParallel<float> dp(comm, model, make_options(comm.rank()));
  });
}

TEST_CASE("Ranks that build different models are refused on every rank", "[data_parallel][threads]") {
  Options o = options(lora::DataParallelMode::fast, 0);
  o.global_batch = 48;
  const auto messages = constructor_refusals(
      3, [](int rank) { return dp_test::make_model(0, rank == 2 ? 8 : 4); },  // rank 2 adapts its first layer at r = 8
      [&](int) { return o; });
  for (const auto& m : messages)
    CHECK_THAT(m, Contains("rank 2 has module \"0\": LoRALinear(24 -> 40, r=8") && Contains("rank 0 has module \"0\""));
}

TEST_CASE("Bad options on one rank are refused on every rank, not left waiting", "[data_parallel][threads]") {
  const auto messages = constructor_refusals(
      3, [](int) { return dp_test::make_model(0); },
      [](int rank) {
        Options o = options(lora::DataParallelMode::fast, 0);
        o.global_batch = rank == 1 ? 0 : 48;  // rank 1 alone asks for an impossible batch
        return o;
      });
  for (const auto& m : messages) CHECK_THAT(m, Contains("rank 1 has options: mode fast, global_batch 0"));
  // The same bad options everywhere: every rank gets the option's own message.
  const auto same = constructor_refusals(
      2, [](int) { return dp_test::make_model(0); },
      [](int) {
        Options o = options(lora::DataParallelMode::deterministic, 0);
        o.global_batch = 48;
        return o;
      });
  for (const auto& m : same) CHECK_THAT(m, Contains("deterministic mode needs Options::micro_batches"));
}

TEST_CASE("Rank 0's parameters reach every rank at the start", "[data_parallel][threads]") {
  Options o = options(lora::DataParallelMode::fast, 0);
  o.global_batch = 48;
  std::vector<std::vector<float>> start(2);
  const auto errors = dp_test::run_ranks(2, [&](lora::Communicator& comm) {
    auto model = dp_test::make_model(0);
    if (comm.rank() == 1) model.linear(0).lora_A().setConstant(7.0f);  // another initialisation
    lora::DataParallel<float> dp(comm, model, o);
    start[static_cast<std::size_t>(comm.rank())] = dp_test::flat(model);
  });
  for (const auto& e : errors) REQUIRE_FALSE(e);
  CHECK(start[1] == start[0]);
  CHECK(start[0] == dp_test::flat(*std::make_unique<lora::Sequential<float>>(dp_test::make_model(0))));
}

TEST_CASE("DataParallel refuses bad options and calls out of order", "[data_parallel]") {
  lora::LocalCommunicator comm;
  auto model = dp_test::make_model(0);
  Options o;
  CHECK_THROWS_WITH((lora::DataParallel<float>(comm, model, o)), Contains("global_batch") && Contains("got 0"));
  o.global_batch = 48;
  o.mode = lora::DataParallelMode::deterministic;
  CHECK_THROWS_WITH((lora::DataParallel<float>(comm, model, o)),
                    Contains("deterministic mode needs") && Contains("got 0"));
  o.micro_batches = 49;
  CHECK_THROWS_WITH((lora::DataParallel<float>(comm, model, o)),
                    Contains("49 leaves") && Contains("got global_batch 48"));
  o.micro_batches = 4;
  lora::DataParallel<float> dp(comm, model, o);
  REQUIRE(dp.shards().size() == 4);
  CHECK(dp.shards()[0].begin == 0);
  CHECK(dp.shards()[3].end == 48);
  CHECK_THROWS_WITH(dp.reduce(), Contains("accumulate() was called 0 times") && Contains("4 shards"));
  for (int i = 0; i < 4; ++i) dp.accumulate(1.0);
  CHECK_THROWS_WITH(dp.accumulate(1.0), Contains("took them all"));
  CHECK(dp.reduce() == Approx(1.0));  // the mean of four leaves' 1.0, weighted by their shares
}

TEST_CASE("ShuffledBatches reaches any position directly and refuses bad ones", "[data_parallel]") {
  lora::ShuffledBatches a(10, 3, 9);
  std::vector<lora::Index> seen;
  for (int i = 0; i < 7; ++i) {
    const lora::Index* b = a.next();
    seen.insert(seen.end(), b, b + 3);
  }
  // Three batches per epoch (the tenth row is left out), each epoch a permutation.
  CHECK(a.batches_per_epoch() == 3);
  CHECK(a.epoch() == 2);
  CHECK(a.next_batch() == 1);
  std::vector<lora::Index> epoch0(seen.begin(), seen.begin() + 9), epoch1(seen.begin() + 9, seen.begin() + 18);
  CHECK(epoch0 != epoch1);
  lora::ShuffledBatches b(10, 3, 9);
  b.seek(1, 1);
  const lora::Index* x = b.next();
  CHECK(std::vector<lora::Index>(x, x + 3) == std::vector<lora::Index>(seen.begin() + 12, seen.begin() + 15));
  CHECK_THROWS_WITH(b.seek(0, 3), Contains("0 <= batch < 3") && Contains("batch 3"));
  CHECK_THROWS_AS(lora::ShuffledBatches(10, 11, 0), lora::config_error);
}

}  // namespace unit_data_parallel
