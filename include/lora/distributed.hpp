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
// process, a lost node) would leave the others blocked in a collective forever, so every collective here is
// started non-blocking and waited for with a deadline: past `timeout_seconds` the waiting rank prints what it
// waited for, and where, to stderr, and calls MPI_Abort, which stops every rank of the job. Start the run again
// from its last checkpoint.
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
#include <cstdint>
#include <cstdio>
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
    MPI_Request request;
    // MPI's send buffer is const only from MPI 3 on; Open MPI 4 declares it const.
    MPI_Iallgatherv(send, c[static_cast<std::size_t>(rank_)], MPI_BYTE, recv, c.data(), displacements.data(), MPI_BYTE,
                    comm_, &request);
    wait(request, "allgather", what);
  }

  void broadcast(void* data, std::size_t n, int root, const char* what) override {
    auto* bytes = static_cast<char*>(data);
    for (std::size_t done = 0; done < n;) {  // 2^30 bytes at a time: MPI counts in int
      const auto part = static_cast<int>(std::min<std::size_t>(n - done, chunk));
      MPI_Request request;
      MPI_Ibcast(bytes + done, part, MPI_BYTE, root, comm_, &request);
      wait(request, "broadcast", what);
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
      MPI_Request request;
      MPI_Iallreduce(MPI_IN_PLACE, bytes + done * static_cast<std::size_t>(type_size), part, type, MPI_SUM, comm_,
                     &request);
      wait(request, "allreduce", what);
      done += static_cast<std::size_t>(part);
    }
  }

  // MPI_Test until done, sleeping a little longer each time (up to 1 ms, so that waiting ranks leave the CPU to
  // the computing ones when ranks outnumber cores), until the deadline.
  void wait(MPI_Request& request, const char* call, const char* what) {
    const auto start = std::chrono::steady_clock::now();
    auto pause = std::chrono::microseconds(0);
    for (;;) {
      int done = 0;
      MPI_Test(&request, &done, MPI_STATUS_IGNORE);
      if (done) return;
      const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (waited > timeout_) {
        std::fprintf(stderr,
                     "lora::mpi: rank %d of %d waited %.1f s in %s (%s) for the other ranks: one of them has died or "
                     "stopped answering. Stopping the job (MPI_Abort); resume from the last checkpoint.\n",
                     rank_, size_, waited, call, what);
        std::fflush(stderr);
        MPI_Abort(comm_, 3);
      }
      std::this_thread::sleep_for(pause);
      pause = std::min(std::chrono::microseconds(1000), pause * 2 + std::chrono::microseconds(1));
    }
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
  double timeout_;
};

}  // namespace lora::mpi
