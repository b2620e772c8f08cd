// README.md's snippet for data-parallel training, built and run as written: extract_snippets.cmake cuts it out into
// data_parallel.inc at build time. What the README leaves out is here: MPI's start (when the build has MPI; without
// mpirun that is one process, MPI's singleton start) or else lora::LocalCommunicator, a small LoRA model over frozen
// random layers, a regression data set and the row gatherer. Then it checks that the loss fell and that the
// checkpoint resumes onto a fresh model.
#include <lora/data_parallel.hpp>
#include <lora/lora.hpp>
#ifdef LORA_README_MPI
#include <lora/distributed.hpp>
#endif

#include <cstdio>

int main(int argc, char** argv) {
#ifdef LORA_README_MPI
  lora::mpi::Environment env(argc, argv);
  lora::mpi::Communicator comm;
#else
  (void)argc;
  (void)argv;
  lora::LocalCommunicator comm;
#endif
  using Mat = lora::Matrix<float>;
  auto make_model = [] {
    lora::LoraConfig c;
    c.r = 4;
    c.lora_alpha = 8;
    c.seed = 3;
    lora::Sequential<float> m;
    m.add(lora::LoRALinear<float>(16, 32, c));
    m.add(lora::GELU{});
    c.seed = 4;
    m.add(lora::LoRALinear<float>(32, 4, c));
    return m;
  };
  auto model = make_model();
  lora::manual_seed(5);
  std::srand(5);
  const Mat data_x = Mat::Random(512, 16);
  const Mat data_y = (data_x * Mat::Random(16, 4)).array().tanh().matrix();
  auto gather_rows = [&](const lora::Index* rows, lora::Index n, Mat& x, Mat& y) {
    x.resize(n, data_x.cols());
    y.resize(n, data_y.cols());
    for (lora::Index i = 0; i < n; ++i) x.row(i) = data_x.row(rows[i]), y.row(i) = data_y.row(rows[i]);
  };
  double first_loss = -1, last_loss = 0;
  {
    // The first step's loss, for the check below: the same model and batch before any training.
    lora::ShuffledBatches b(data_x.rows(), 64, 1);
    Mat x, y, dy;
    gather_rows(b.next(), 64, x, y);
    auto m = make_model();
    const Mat& out = m.forward(x);
    dy.resize(out.rows(), out.cols());
    first_loss = lora::mse_loss<float>(out, y, dy);
  }

#include "data_parallel.inc"

  auto resumed = make_model();
  lora::AdamW<float> resumed_opt(resumed.parameters());
  lora::DataParallel<float> dp2(comm, resumed, o);
  const auto resumed_state = lora::load_checkpoint(dp2, "run.safetensors", resumed, resumed_opt);
  const bool same = resumed.linear(0).lora_A() == model.linear(0).lora_A() &&
                    resumed.linear(2).lora_B() == model.linear(2).lora_B() && resumed_state.step == 200;
  if (!(last_loss < 0.5 * first_loss) || !same) {
    std::fprintf(stderr, "README snippet (data parallel): loss %g -> %g, checkpoint resumed: %s\n", first_loss,
                 last_loss, same ? "yes" : "no");
    return 1;
  }
  if (comm.rank() == 0)
    std::printf("README snippet (data parallel): built, ran on %d rank(s), loss %.4f -> %.4f, checkpoint resumed\n",
                comm.size(), first_loss, last_loss);
}
