// Data-parallel training over MPI: the Communicator that <lora/data_parallel.hpp> runs on, over an MPI
// communicator. The only header of the library that needs MPI (link lora::mpi, which CMake defines when it finds
// MPI: Debian's libopenmpi-dev and openmpi-bin).
//
//   int main(int argc, char** argv) {
//     lora::mpi::Environment env(argc, argv);  // MPI_Init_thread ... MPI_Finalize (or call them yourself)
//     lora::mpi::Communicator comm;            // MPI_COMM_WORLD, 600 s before a silent rank stops the job
//     lora::DataParallel<float> dp(comm, model, options);
//     ...
//   }
//   $ mpirun -np 4 ./train            (on one machine; across machines: mpirun --hostfile hosts -np 64 ./train)
//
// Faults. A rank that dies makes mpirun stop the others (Open MPI's default). A rank that stops answering (a hung
// process, a lost node) would leave the others blocked in a collective forever, so a watchdog thread times every
// collective: past `timeout_seconds` in one, the waiting rank prints what it waited for, and where, to stderr,
// and exits with status 3, upon which mpirun stops every rank of the job. Start the run again from its last
// checkpoint. (The collectives themselves are MPI's blocking ones: on 2026-12-04's Xeon, Open MPI 4.1's
// non-blocking MPI_Iallreduce took 1.5 to 2.4 times as long for 89 KiB to 2.6 MiB, and polling it cost more.)
#pragma once

#ifndef LORA_INSIDE_LIBRARY
#define LORA_INSIDE_LIBRARY
#endif

#include <lora/data_parallel.hpp>
#include <lora/errors.hpp>

// The C API only: MPI's deprecated C++ bindings (which Open MPI's mpi.h pulls in for C++) warn under -Wextra.
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace lora::mpi {

/// MPI_Init_thread (MPI_THREAD_FUNNELED: the program may run threads, only the main one calls MPI) unless MPI
/// is initialised already, and MPI_Finalize at the end of its scope when it was the one that initialised.
class Environment {
 public:
  Environment(int& argc, char**& argv) {
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (initialized) return;
    int provided = 0;
    if (MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS)
      throw state_error("lora::mpi::Environment: MPI_Init_thread failed");
    owns_ = true;
  }
  Environment(const Environment&) = delete;
  Environment& operator=(const Environment&) = delete;
  ~Environment() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (owns_ && !finalized) MPI_Finalize();
  }

 private:
  bool owns_ = false;
};

namespace detail {

/// A thread that ends the process when one collective takes longer than the timeout. It never calls MPI (the
/// program may have asked for MPI_THREAD_FUNNELED only): it prints and exits, and mpirun stops the other ranks.
class Watchdog {
 public:
  explicit Watchdog(double timeout_seconds)
      : timeout_(std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_seconds))),
        thread_([this] { run(); }) {}
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;
  ~Watchdog() {
    {
      std::lock_guard<std::mutex> lock(m_);
      stop_ = true;
    }
    cv_.notify_one();
    thread_.join();
  }
  /// Before a collective; `message` says what this rank is waiting in.
  void arm(std::string message) {
    {
      std::lock_guard<std::mutex> lock(m_);
      armed_ = true;
      since_ = Clock::now();
      message_ = std::move(message);
    }
    cv_.notify_one();
  }
  void disarm() {
    std::lock_guard<std::mutex> lock(m_);
    armed_ = false;
  }

 private:
  using Clock = std::chrono::steady_clock;
  void run() {
    std::unique_lock<std::mutex> lock(m_);
    while (!stop_) {
      if (!armed_) {
        cv_.wait(lock);
        continue;
      }
      const auto deadline = since_ + timeout_;
      cv_.wait_until(lock, deadline);
      if (!stop_ && armed_ && Clock::now() >= since_ + timeout_) {
        const double waited = std::chrono::duration<double>(Clock::now() - since_).count();
        std::fprintf(stderr,
                     "lora::mpi: %s: waited %.1f s for the other ranks: one of them has died or stopped answering. "
                     "Stopping the job (exit status 3); resume from the last checkpoint.\n",
                     message_.c_str(), waited);
        std::fflush(stderr);
        std::_Exit(3);
      }
    }
  }
  const Clock::duration timeout_;
  std::mutex m_;
  std::condition_variable cv_;
  bool stop_ = false, armed_ = false;
  Clock::time_point since_;
  std::string message_;
  std::thread thread_;  // last: starts once the rest is built
};

}  // namespace detail

/// A Communicator over an MPI communicator. Throws state_error when MPI is not initialised (or already
/// finalised). `timeout_seconds` bounds every wait for the other ranks (> 0).
class Communicator final : public lora::Communicator {
 public:
  explicit Communicator(MPI_Comm comm = MPI_COMM_WORLD, double timeout_seconds = 600) : timeout_(timeout_seconds) {
    int initialized = 0, finalized = 0;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    if (!initialized || finalized)
      throw state_error(std::string("lora::mpi::Communicator: MPI is ") +
                        (finalized ? "already finalised" : "not initialised") +
                        "; call MPI_Init (or create a lora::mpi::Environment) first");
    if (!(timeout_seconds > 0))
      throw config_error("lora::mpi::Communicator: timeout_seconds must be > 0, got " + value_string(timeout_seconds));
    // A communicator of our own, so that our collectives never match the program's.
    MPI_Comm_dup(comm, &comm_);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
    watchdog_ = std::make_unique<detail::Watchdog>(timeout_seconds);
  }
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;
  ~Communicator() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  double timeout_seconds() const { return timeout_; }
  MPI_Comm comm() const { return comm_; }

  void allreduce_sum(float* data, std::size_t n, const char* what) override { allreduce(data, n, MPI_FLOAT, what); }
  void allreduce_sum(double* data, std::size_t n, const char* what) override { allreduce(data, n, MPI_DOUBLE, what); }

  void allgatherv(const void* send, void* recv, const std::vector<std::size_t>& counts, const char* what) override {
    if (counts.size() != static_cast<std::size_t>(size_))
      throw config_error("lora::mpi::Communicator::allgatherv: expected " + std::to_string(size_) + " counts, got " +
                         std::to_string(counts.size()));
    std::vector<int> c(counts.size()), displacements(counts.size());
    std::size_t at = 0;
    for (std::size_t r = 0; r < counts.size(); ++r) {
      if (counts[r] > static_cast<std::size_t>(INT_MAX) || at > static_cast<std::size_t>(INT_MAX))
        throw config_error(std::string("lora::mpi::Communicator::allgatherv (") + what +
                           "): " + std::to_string(at + counts[r]) + " bytes, more than MPI's int counts hold");
      c[r] = static_cast<int>(counts[r]);
      displacements[r] = static_cast<int>(at);
      at += counts[r];
    }
    Timed timed(*this, "allgather", what);
    MPI_Allgatherv(send, c[static_cast<std::size_t>(rank_)], MPI_BYTE, recv, c.data(), displacements.data(), MPI_BYTE,
                   comm_);
  }

  void broadcast(void* data, std::size_t n, int root, const char* what) override {
    auto* bytes = static_cast<char*>(data);
    for (std::size_t done = 0; done < n;) {  // 2^30 bytes at a time: MPI counts in int
      const auto part = static_cast<int>(std::min<std::size_t>(n - done, chunk));
      Timed timed(*this, "broadcast", what);
      MPI_Bcast(bytes + done, part, MPI_BYTE, root, comm_);
      done += static_cast<std::size_t>(part);
    }
  }

 private:
  static constexpr std::size_t chunk = std::size_t(1) << 30;

  void allreduce(void* data, std::size_t n, MPI_Datatype type, const char* what) {
    int type_size = 0;
    MPI_Type_size(type, &type_size);
    auto* bytes = static_cast<char*>(data);
    for (std::size_t done = 0; done < n;) {
      const auto part = static_cast<int>(std::min<std::size_t>(n - done, chunk));
      Timed timed(*this, "allreduce", what);
      MPI_Allreduce(MPI_IN_PLACE, bytes + done * static_cast<std::size_t>(type_size), part, type, MPI_SUM, comm_);
      done += static_cast<std::size_t>(part);
    }
  }

  // Arms the watchdog for one collective.
  struct Timed {
    Timed(Communicator& c, const char* call, const char* what) : c_(c) {
      c_.watchdog_->arm("rank " + std::to_string(c_.rank_) + " of " + std::to_string(c_.size_) + " in " + call + " (" +
                        what + ")");
    }
    ~Timed() { c_.watchdog_->disarm(); }
    Timed(const Timed&) = delete;
    Timed& operator=(const Timed&) = delete;
    Communicator& c_;
  };

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
  double timeout_;
  std::unique_ptr<detail::Watchdog> watchdog_;
};

}  // namespace lora::mpi
