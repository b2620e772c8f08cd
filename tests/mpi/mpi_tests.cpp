// DataParallel over MPI, run by ctest under `mpirun -np K` (K = 1 to 4; tests/CMakeLists.txt). Every rank runs
// every test case, in the same order, since each holds collective calls. Besides Catch2's flags:
//   --uninitialised        (not under mpirun) lora::mpi::Communicator before MPI_Init: must refuse
//   --hang-rank R          rank R sleeps instead of joining the first collective; the others must stop the job
//   --die-rank R           rank R kills itself in the middle of training; the job must stop, not hang
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#include <lora/distributed.hpp>

#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "../data_parallel_helpers.hpp"

namespace {

using dp_test::Data;
using dp_test::Job;
using dp_test::Result;
using Options = lora::DataParallel<float>::Options;
using Catch::Matchers::Contains;

constexpr double kTestTimeout = 60;  // seconds a rank waits for the others before it stops the job

Options options(lora::DataParallelMode mode, int micro_batches) {
  Options o;
  o.mode = mode;
  o.micro_batches = micro_batches;
  return o;
}

// A folder every rank names the same: rank 0's pid, broadcast.
std::string scratch(lora::Communicator& comm, const std::string& name) {
  long pid = comm.rank() == 0 ? static_cast<long>(::getpid()) : 0;
  comm.broadcast(&pid, sizeof pid, 0, "scratch folder");
  const auto dir = std::filesystem::temp_directory_path() / ("lora-mpi-test-" + std::to_string(pid));
  if (comm.rank() == 0) std::filesystem::create_directories(dir);
  int ready = 0;
  comm.broadcast(&ready, sizeof ready, 0, "scratch folder made");
  return (dir / name).string();
}

bool same_on_every_rank(lora::Communicator& comm, const std::vector<float>& v) {
  std::vector<double> mine(v.begin(), v.end()), sum = mine;
  comm.allreduce_sum(sum.data(), sum.size(), "compare");
  for (std::size_t i = 0; i < v.size(); ++i)
    if (sum[i] != mine[i] * comm.size()) return false;
  return true;
}

TEST_CASE("Deterministic mode over MPI gives the bits of one process, for this rank count") {
  lora::mpi::Communicator comm(MPI_COMM_WORLD, kTestTimeout);
  const Data data;
  Job job;
  job.dropout = 0.1f;
  for (const int M : {4, 8}) {
    INFO("ranks " << comm.size() << ", micro_batches " << M);
    const Options o = options(lora::DataParallelMode::deterministic, M);
    const Result many = dp_test::train_parallel(comm, data, job, o);
    lora::LocalCommunicator local;  // one process with the whole batch, the same M leaves
    const Result one = dp_test::train_parallel(local, data, job, o);
    CHECK(many.params == one.params);
    CHECK(many.losses == one.losses);
    CHECK(same_on_every_rank(comm, many.params));
  }
}

TEST_CASE("Fast mode over MPI agrees with the plain loop of one process") {
  lora::mpi::Communicator comm(MPI_COMM_WORLD, kTestTimeout);
  const Data data;
  const Job job;
  const Result many = dp_test::train_parallel(comm, data, job, options(lora::DataParallelMode::fast, 0));
  const Result plain = dp_test::train_plain(data, job);
  const double rel = dp_test::relative_difference(many.params, plain.params);
  if (comm.rank() == 0) std::printf("fast mode, %d ranks, 100 steps: relative difference %.3g\n", comm.size(), rel);
  CHECK(rel <= 1e-6);
  CHECK(same_on_every_rank(comm, many.params));
  // One vector per step: every gradient and the loss.
  std::size_t trainable = 0;
  auto model = dp_test::make_model(0);
  for (const auto& p : model.parameters()) trainable += static_cast<std::size_t>(p.size());
  CHECK(many.bytes_per_step == (trainable + 1) * sizeof(float));
}

TEST_CASE("A checkpoint written by K ranks resumes on one rank, bit for bit") {
  lora::mpi::Communicator comm(MPI_COMM_WORLD, kTestTimeout);
  const Data data;
  const Job job;
  const Options o = options(lora::DataParallelMode::deterministic, 4);
  const std::string path = scratch(comm, "resume.safetensors");
  const Result straight = dp_test::train_parallel(comm, data, job, o, path, 50);
  lora::LocalCommunicator local;  // every rank reads rank 0's file on its own
  const Result resumed = dp_test::train_parallel(local, data, job, o, path, 0, true);
  CHECK(resumed.params == straight.params);
  // And on K ranks again, rank 0 sending the file's bytes to the others.
  const Result again = dp_test::train_parallel(comm, data, job, o, path, 0, true);
  CHECK(again.params == straight.params);
}

TEST_CASE("Ranks that build different models are refused on every rank, naming rank and module") {
  lora::mpi::Communicator comm(MPI_COMM_WORLD, kTestTimeout);
  if (comm.size() < 2) return;
  Options o = options(lora::DataParallelMode::fast, 0);
  o.global_batch = 48;
  const int odd = comm.size() - 1;
  auto model = dp_test::make_model(0, comm.rank() == odd ? 8 : 4);
  CHECK_THROWS_WITH((lora::DataParallel<float>(comm, model, o)),
                    Contains("rank " + std::to_string(odd) + " has module \"0\": LoRALinear(24 -> 40, r=8") &&
                        Contains("rank 0 has module \"0\": LoRALinear(24 -> 40, r=4"));
}

TEST_CASE("A failed save on rank 0 fails on every rank and leaves the older checkpoint") {
  lora::mpi::Communicator comm(MPI_COMM_WORLD, kTestTimeout);
  const std::string path = scratch(comm, "kept.safetensors");
  auto model = dp_test::make_model(0);
  lora::AdamW<float> opt(model.parameters());
  Options o = options(lora::DataParallelMode::fast, 0);
  o.global_batch = 48;
  lora::DataParallel<float> dp(comm, model, o);
  lora::TrainingState state;
  state.step = 1;
  lora::save_checkpoint(dp, path, model, opt, state);
  std::string before;
  if (comm.rank() == 0) {
    std::FILE* f = std::fopen(path.c_str(), "rb");
    REQUIRE(f);
    char buf[4096];
    for (std::size_t n; (n = std::fread(buf, 1, sizeof buf, f)) > 0;) before.append(buf, n);
    std::fclose(f);
  }
  state.step = -1;  // refused by save_checkpoint on rank 0
  CHECK_THROWS_AS(lora::save_checkpoint(dp, path, model, opt, state), lora::config_error);
  if (comm.rank() == 0) {
    std::string after;
    std::FILE* f = std::fopen(path.c_str(), "rb");
    REQUIRE(f);
    char buf[4096];
    for (std::size_t n; (n = std::fread(buf, 1, sizeof buf, f)) > 0;) after.append(buf, n);
    std::fclose(f);
    CHECK(after == before);
  }
  state.step = 2;
  CHECK_THROWS_WITH(lora::save_checkpoint(dp, path + "-missing-dir/x.safetensors", model, opt, state),
                    Contains("missing-dir"));
}

int hang(int rank_to_hang) {
  lora::mpi::Communicator comm(MPI_COMM_WORLD, 2.0);
  if (comm.rank() == rank_to_hang) {
    std::this_thread::sleep_for(std::chrono::seconds(120));  // stops answering; the job ends first
    return 0;
  }
  double x = 1;
  comm.allreduce_sum(&x, 1, "the hang test");
  std::puts("hang test: the collective returned, which it must not");
  return 1;
}

int die(int rank_to_die) {
  lora::mpi::Communicator comm(MPI_COMM_WORLD, 10.0);
  const Data data;
  Job job;
  job.steps = 1000;
  auto model = dp_test::make_model(0);
  lora::AdamW<float> opt(model.parameters());
  Options o = options(lora::DataParallelMode::fast, 0);
  o.global_batch = job.batch;
  lora::DataParallel<float> dp(comm, model, o);
  lora::ShuffledBatches batches(dp_test::kRows, job.batch, 1);
  dp_test::Mat x, y, dy;
  for (long step = 0; step < job.steps; ++step) {
    if (step == 5 && comm.rank() == rank_to_die) std::raise(SIGKILL);
    const auto* batch = batches.next();
    for (const auto& s : dp.shards()) {
      dp_test::gather_rows(data.x, batch + s.begin, s.size(), x);
      dp_test::gather_rows(data.y, batch + s.begin, s.size(), y);
      const auto& out = model.forward(x);
      dy.resize(out.rows(), out.cols());
      const float loss = lora::mse_loss<float>(out, y, dy);
      model.backward(dy);
      dp.accumulate(loss);
    }
    dp.reduce();
    opt.step();
    opt.zero_grad();
  }
  std::puts("die test: training finished, which it must not");
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<char*> args(argv, argv + argc);
  auto take = [&](const char* flag) -> int {  // removes "flag N" from args, returns N (or -1)
    for (std::size_t i = 1; i + 1 < args.size(); ++i)
      if (std::strcmp(args[i], flag) == 0) {
        const int v = std::atoi(args[i + 1]);
        args.erase(args.begin() + static_cast<long>(i), args.begin() + static_cast<long>(i) + 2);
        return v;
      }
    return -1;
  };
  if (argc == 2 && std::strcmp(argv[1], "--uninitialised") == 0) {
    try {
      lora::mpi::Communicator comm;
    } catch (const lora::state_error& e) {
      std::printf("refused: %s\n", e.what());
      return std::strstr(e.what(), "MPI is not initialised") ? 0 : 1;
    }
    std::puts("a Communicator was made before MPI_Init");
    return 1;
  }
  const int hang_rank = take("--hang-rank"), die_rank = take("--die-rank");
  int n = static_cast<int>(args.size());
  char** a = args.data();
  lora::mpi::Environment env(n, a);
  if (hang_rank >= 0) return hang(hang_rank);
  if (die_rank >= 0) return die(die_rank);

  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  Catch::Session session;
  if (const int bad = session.applyCommandLine(n, a)) return bad;
  // Only rank 0 reports passes; every rank reports its failures (prefixed with its rank by Catch's output).
  int failed = session.run();
  MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (rank == 0) std::printf("mpi tests: %s on every rank\n", failed ? "FAILED" : "passed");
  return failed ? 1 : 0;
}
