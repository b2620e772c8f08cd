// What data-parallel LoRA costs in communication, measured and projected (issue 17).
//
//   mpirun -np 2 build/bench/bench_mpi_scaling [--smoke] [--lora-step-ms T --full-step-ms T]
//
// 1. Measured here: DataParallel's two reductions over lora::mpi::Communicator for the gradient vectors of real
//    shapes (fast mode: one allreduce of the vector; deterministic mode: one allgather of each rank's subtree sum),
//    median over repetitions of the slowest rank's time, on however many ranks mpirun started.
// 2. Counted: the bytes each rank hands MPI per step, LoRA against full fine-tuning, for the finetune demo (its
//    784-512-512-10 MLP, LoRA r = 8 on all three layers), GPT-2 small and LLaMA-7B (LoRA r = 8 on Wq and Wv).
// 3. Projected: a ring allreduce (fast mode) costs 2 (K - 1) alpha + 2 (K - 1) / K * S / beta on K nodes for S
//    bytes; a ring allgather of one S-byte vector per node (deterministic mode) (K - 1) alpha + (K - 1) S / beta.
//    alpha (latency) and beta (bandwidth) are stated per link: 10 Gb/s Ethernet with TCP (alpha 50 us, beta
//    1.25 GB/s) and 100 Gb/s RDMA (alpha 5 us, beta 12.5 GB/s). With the demo's measured step time T (one node;
//    --lora-step-ms, --full-step-ms, from the demo's table: train time / steps), each node keeps its batch (weak
//    scaling) and the step takes T + T_comm, no overlap: efficiency T / (T + T_comm).
#include <lora/distributed.hpp>

#include "../bench_common.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

struct Payload {
  const char* name;
  double lora_floats;  // trainable scalars, the loss one more
  double full_floats;  // every parameter of the model
};

// LoRA r = 8 on Wq and Wv of every layer: 2 · r · (d + d) per layer.
constexpr double qv_lora(double layers, double d, double r) { return layers * 2 * r * (d + d); }

const Payload payloads[] = {
    // The demo: 784-512-512-10, LoRA r = 8 on all three layers (the trainable count its table prints).
    {"finetune demo (784-512-512-10 MLP, LoRA r=8 on 3 layers)", 22736 + 1, 669706 + 1},
    {"GPT-2 small (12 layers, d 768), LoRA r=8 on q, v", qv_lora(12, 768, 8) + 1, 124439808 + 1},
    {"LLaMA-7B (32 layers, d 4096), LoRA r=8 on q, v", qv_lora(32, 4096, 8) + 1, 6738415616.0 + 1},
};

struct Link {
  const char* name;
  double alpha, beta;  // seconds, bytes per second
};
const Link links[] = {{"10 Gb/s TCP", 50e-6, 1.25e9}, {"100 Gb/s RDMA", 5e-6, 12.5e9}};

double ring_allreduce(double K, double bytes, const Link& l) {
  return 2 * (K - 1) * l.alpha + 2 * (K - 1) / K * bytes / l.beta;
}
double ring_allgather(double K, double bytes, const Link& l) { return (K - 1) * l.alpha + (K - 1) * bytes / l.beta; }

// Median over reps of the slowest rank's time for one call.
template <class Call>
double time_collective(lora::mpi::Communicator& comm, int reps, Call&& call) {
  std::vector<double> t;
  call();  // warm up (buffers, connections)
  for (int i = 0; i < reps; ++i) {
    MPI_Barrier(comm.comm());
    const auto start = std::chrono::steady_clock::now();
    call();
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    MPI_Allreduce(MPI_IN_PLACE, &s, 1, MPI_DOUBLE, MPI_MAX, comm.comm());
    t.push_back(s);
  }
  return lora_bench::median(t);
}

std::string bytes_text(double b) {
  char buf[32];
  if (b < 1024 * 1024)
    std::snprintf(buf, sizeof buf, "%.1f KiB", b / 1024);
  else if (b < 1024.0 * 1024 * 1024)
    std::snprintf(buf, sizeof buf, "%.2f MiB", b / (1024 * 1024));
  else
    std::snprintf(buf, sizeof buf, "%.2f GiB", b / (1024.0 * 1024 * 1024));
  return buf;
}

std::string time_text(double s) {
  char buf[32];
  if (s < 1e-3)
    std::snprintf(buf, sizeof buf, "%.0f us", s * 1e6);
  else if (s < 1)
    std::snprintf(buf, sizeof buf, "%.2f ms", s * 1e3);
  else
    std::snprintf(buf, sizeof buf, "%.2f s", s);
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  lora::mpi::Environment env(argc, argv);
  lora::mpi::Communicator comm;
  bool smoke = false;
  double lora_step_ms = 0, full_step_ms = 0;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--smoke") == 0) {
      smoke = true;
    } else if (std::strcmp(argv[i], "--lora-step-ms") == 0 && i + 1 < argc) {
      lora_step_ms = std::atof(argv[++i]);
    } else if (std::strcmp(argv[i], "--full-step-ms") == 0 && i + 1 < argc) {
      full_step_ms = std::atof(argv[++i]);
    } else {
      if (comm.rank() == 0)
        std::fprintf(stderr, "usage: bench_mpi_scaling [--smoke] [--lora-step-ms T --full-step-ms T]\n");
      return 2;
    }
  }
  const bool root = comm.rank() == 0;
  const int K = comm.size();

  // 1. Measured: the two reductions on this machine's ranks.
  if (root)
    std::printf(
        "### Measured: DataParallel's reductions, %d rank(s) on this machine (median of the slowest rank)\n\n"
        "| gradient vector | bytes per rank | fast: allreduce | deterministic: allgather of one piece per "
        "rank |\n|---|--:|--:|--:|\n",
        K);
  for (const auto& p : payloads) {
    for (const double floats : {p.lora_floats, p.full_floats}) {
      const double bytes = floats * sizeof(float);
      if (bytes > (smoke ? 4e6 : 1.2e9)) continue;  // LLaMA-7B's full gradient (27 GB) is not held here
      const auto n = static_cast<std::size_t>(floats);
      std::vector<float> v(n, 1.0f), gathered(n * static_cast<std::size_t>(K));
      const int reps = smoke ? 3 : bytes > 1e8 ? 5 : bytes > 1e6 ? 30 : 200;
      const double reduce = time_collective(comm, reps, [&] { comm.allreduce_sum(v.data(), n, "bench"); });
      const std::vector<std::size_t> counts(static_cast<std::size_t>(K), n * sizeof(float));
      const double gather =
          time_collective(comm, reps, [&] { comm.allgatherv(v.data(), gathered.data(), counts, "bench"); });
      if (root)
        std::printf("| %s, %s | %s | %s | %s |\n", p.name, floats == p.lora_floats ? "LoRA" : "full fine-tuning",
                    bytes_text(bytes).c_str(), time_text(reduce).c_str(), time_text(gather).c_str());
    }
  }

  if (!root) return 0;
  // 2. Counted.
  std::printf(
      "\n### Sent per step and rank (the gradients and the loss, float)\n\n"
      "| model | LoRA | full fine-tuning | ratio |\n|---|--:|--:|--:|\n");
  for (const auto& p : payloads)
    std::printf("| %s | %s | %s | %.0f |\n", p.name, bytes_text(p.lora_floats * 4).c_str(),
                bytes_text(p.full_floats * 4).c_str(), p.full_floats / p.lora_floats);

  // 3. Projected.
  std::printf(
      "\n### Projected communication per step (ring allreduce, fast mode; ring allgather, deterministic)\n\n"
      "| model | link | nodes | LoRA fast | LoRA deterministic | full FT fast |\n|---|---|--:|--:|--:|--:|\n");
  for (const auto& p : payloads)
    for (const auto& l : links)
      for (const double nodes : {8.0, 64.0, 512.0})
        std::printf("| %s | %s | %.0f | %s | %s | %s |\n", p.name, l.name, nodes,
                    time_text(ring_allreduce(nodes, p.lora_floats * 4, l)).c_str(),
                    time_text(ring_allgather(nodes, p.lora_floats * 4, l)).c_str(),
                    time_text(ring_allreduce(nodes, p.full_floats * 4, l)).c_str());
  if (lora_step_ms > 0 && full_step_ms > 0) {
    const Payload& demo = payloads[0];
    std::printf(
        "\n### Projected step time and efficiency for the finetune demo (measured step: LoRA r=8 %.2f ms, "
        "full fine-tuning %.2f ms on one node; each node keeps its batch of 128)\n\n"
        "| link | nodes | LoRA fast: step, efficiency | LoRA deterministic | full FT fast |\n"
        "|---|--:|--:|--:|--:|\n",
        lora_step_ms, full_step_ms);
    for (const auto& l : links)
      for (const double nodes : {8.0, 64.0, 512.0}) {
        const double tl = lora_step_ms * 1e-3, tf = full_step_ms * 1e-3;
        const double fast = tl + ring_allreduce(nodes, demo.lora_floats * 4, l);
        const double det = tl + ring_allgather(nodes, demo.lora_floats * 4, l);
        const double full = tf + ring_allreduce(nodes, demo.full_floats * 4, l);
        std::printf("| %s | %.0f | %s, %.0f%% | %s, %.0f%% | %s, %.0f%% |\n", l.name, nodes, time_text(fast).c_str(),
                    100 * tl / fast, time_text(det).c_str(), 100 * tl / det, time_text(full).c_str(), 100 * tf / full);
      }
  }
  return 0;
}
