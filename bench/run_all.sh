#!/usr/bin/env bash
# Builds and runs every benchmark (bench_params, bench_compute, bench_memory,
# bench_gemm, bench_lowp, bench/peers/pytorch_lora.py, bench_mpi_scaling under mpirun -np 2 when the first backend's build
# has MPI, and examples/gpt's training throughput against bench/peers/pytorch_gpt.py) and prints one table of ratios at the end.
#
#   bench/run_all.sh            the "eigen" and "blas" backends, 1 and 2 threads, the issue's headline
#                               shapes with 5 interleaved repetitions
#   bench/run_all.sh --smoke    tiny shapes and a few iterations: proves it all still runs (CI)
#
# Backends: "eigen" is the README's build (its name is older than oneDNN here): float products on oneDNN where
# libdnnl-dev is installed (LORA_USE_DNNL=AUTO), else Eigen's GEMM; every program prints which ran. "blas" is
# -DLORA_USE_BLAS=ON with oneDNN off, so OpenBLAS runs the products.
# Environment: BACKENDS (default "eigen blas"), THREADS ("1 2"), OUT (build-bench/results),
# JOBS (build parallelism, 2), PYTHON (/usr/bin/python3, which has Debian's python3-torch), EIGEN_BUILD (an
# existing build folder whose bench/ programs serve as the Eigen backend instead of building build-bench/eigen;
# .ci/run passes the README build it made moments before; it has no OpenMP, so the Eigen backend then runs at one
# thread only: fine for --smoke, which judges no number, not for measuring).
# OPENBLAS_CORETYPE is left as the caller has it; every program prints the kernel that ran.
# bench/RESULTS.md was made with: env -u OPENBLAS_CORETYPE bench/run_all.sh
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=0
case "${1:-}" in
  --smoke) smoke=1 ;;
  "") ;;
  *)
    echo "usage: bench/run_all.sh [--smoke]" >&2
    exit 2
    ;;
esac
read -r -a backends <<<"${BACKENDS:-eigen blas}"
read -r -a threads_list <<<"${THREADS:-1 2}"
out=${OUT:-build-bench/results}
jobs=${JOBS:-2}
python=${PYTHON:-/usr/bin/python3}
mkdir -p "$out"
rm -f "$out"/compute-*.json "$out"/pytorch-*.json "$out"/memory.txt "$out"/lowp.txt "$out"/gemm.txt "$out"/mpi_scaling.txt

section() { printf '\n===== %s\n' "$*"; }

# Eigen's products use threads only under OpenMP; OpenBLAS has its own. The eigen backend is the README's build:
# its layers' frozen-weight products run on oneDNN where libdnnl-dev is installed (LORA_USE_DNNL=AUTO); the blas
# backend turns that off, so OpenBLAS runs them.
declare -A bench_dir
for backend in "${backends[@]}"; do
  case "$backend" in
    eigen) flags=(-DLORA_USE_OPENMP=ON) ;;
    blas) flags=(-DLORA_USE_BLAS=ON -DLORA_USE_DNNL=OFF) ;;
    *)
      echo "run_all.sh: unknown backend '$backend' (eigen or blas)" >&2
      exit 2
      ;;
  esac
  if [ "$backend" = eigen ] && [ -n "${EIGEN_BUILD:-}" ]; then
    section "build: eigen backend from EIGEN_BUILD=$EIGEN_BUILD (built already)"
    cmake --build "$EIGEN_BUILD" -j"$jobs" --target bench_params bench_compute bench_memory bench_lowp bench_gemm
    bench_dir[$backend]="$EIGEN_BUILD/bench"
    continue
  fi
  # Only the first backend runs bench_params, bench_memory, bench_lowp and bench_gemm (below); the others run
  # bench_compute alone, so they build it alone.
  targets=(bench_compute)
  [ "$backend" = "${backends[0]}" ] && targets+=(bench_params bench_memory bench_lowp bench_gemm)
  section "build: $backend backend in build-bench/$backend (${targets[*]})"
  cmake -S . -B "build-bench/$backend" -DCMAKE_BUILD_TYPE=Release -DLORA_BUILD_TESTS=OFF \
    -DLORA_BUILD_EXAMPLES=OFF -DLORA_INSTALL=OFF "${flags[@]}" >/dev/null
  cmake --build "build-bench/$backend" -j"$jobs" --target "${targets[@]}"
  bench_dir[$backend]="build-bench/$backend/bench"
done
first="${bench_dir[${backends[0]}]}"

smoke_flag=()
[ "$smoke" = 1 ] && smoke_flag=(--smoke)

section "bench_params"
"$first/bench_params" "${smoke_flag[@]}"

if [ "$smoke" = 1 ]; then
  compute_flags=(--smoke --benchmark_min_time=0.01)
else
  # 0.2 s per repetition: one or two iterations of a 4096 x 4096 step, each repetition a sample of the median.
  compute_flags=("--benchmark_filter=N:(1|512)/D:4096/R:8/" --benchmark_repetitions=5 --benchmark_min_time=0.2
    --benchmark_enable_random_interleaving=true --benchmark_report_aggregates_only=true)
fi
peer_flags=(--min-time 0.2)
[ "$smoke" = 1 ] && peer_flags=(--smoke)
for backend in "${backends[@]}"; do
  for threads in "${threads_list[@]}"; do
    if [ "$backend" = eigen ] && [ -n "${EIGEN_BUILD:-}" ] && [ "$threads" != 1 ]; then
      # bench_compute refuses --threads > 1 without OpenMP, which EIGEN_BUILD (the README build) does not have.
      section "bench_compute: eigen, $threads thread(s): skipped, EIGEN_BUILD has no OpenMP"
      continue
    fi
    section "bench_compute: $backend, $threads thread(s)"
    "${bench_dir[$backend]}/bench_compute" --threads="$threads" "${compute_flags[@]}" --benchmark_color=false \
      --benchmark_out="$out/compute-$backend-t$threads.json" --benchmark_out_format=json
  done
done

section "bench_gemm (the ${backends[0]} build's float products against every float GEMM on this machine, 1 thread)"
if [ "$smoke" = 1 ]; then
  "$first/bench_gemm" --smoke
else
  "$first/bench_gemm" | tee "$out/gemm.txt"
fi

section "bench_lowp (low-precision bases; ${backends[0]}'s float layer as the baseline, 1 thread)"
if [ "$smoke" = 1 ]; then
  "$first/bench_lowp" --smoke --benchmark_min_time=0.01 --benchmark_color=false
else
  "$first/bench_lowp" --benchmark_color=false | tee "$out/lowp.txt"
fi

# Data-parallel communication (issue 17), when CMake found MPI: measured on 2 ranks here, then projected.
if [ -x "$first/bench_mpi_scaling" ] || cmake --build "$(dirname "$first")" --target bench_mpi_scaling >/dev/null 2>&1; then
  section "bench_mpi_scaling (mpirun -np 2)"
  mpirun_flags=()
  case "$(mpirun --version 2>/dev/null)" in *"Open MPI"*) mpirun_flags=(--oversubscribe) ;; esac
  [ "$(id -u)" -eq 0 ] && [ "${#mpirun_flags[@]}" -gt 0 ] && mpirun_flags+=(--allow-run-as-root)
  mpirun "${mpirun_flags[@]}" -np 2 "$first/bench_mpi_scaling" "${smoke_flag[@]}" | tee "$out/mpi_scaling.txt"
else
  section "bench_mpi_scaling: skipped, the build has no MPI (Debian: libopenmpi-dev openmpi-bin)"
fi

section "bench_memory (${backends[0]}, 1 thread)"
"$first/bench_memory" "${smoke_flag[@]}" | tee "$out/memory.txt"

if "$python" -c 'import torch' >/dev/null 2>&1; then
  for threads in "${threads_list[@]}"; do
    section "bench/peers/pytorch_lora.py, $threads thread(s)"
    "$python" bench/peers/pytorch_lora.py --threads "$threads" "${peer_flags[@]}" --json "$out/pytorch-t$threads.json"
  done
else
  section "bench/peers/pytorch_lora.py: skipped, $python cannot import torch (Debian: apt-get install python3-torch)"
fi

# examples/gpt's LoRA training step (q, v slices, AdamW) against the same model in PyTorch, 1 thread each, in
# alternating pairs; the ratio of each pair's tokens/s, then their median (issue 18 asks for at least 1.5).
gpt_bin=""
if [ -n "${EIGEN_BUILD:-}" ] && [ -x "$EIGEN_BUILD/examples/gpt/gpt" ]; then
  gpt_bin="$EIGEN_BUILD/examples/gpt/gpt"
elif cmake -S . -B build-bench/gpt -DCMAKE_BUILD_TYPE=Release -DLORA_BUILD_TESTS=OFF -DLORA_BUILD_BENCHMARKS=OFF \
  -DLORA_INSTALL=OFF >/dev/null && cmake --build build-bench/gpt -j"$jobs" --target gpt >/dev/null; then
  gpt_bin="build-bench/gpt/examples/gpt/gpt"
fi
if [ -n "$gpt_bin" ] && "$python" -c 'import torch' >/dev/null 2>&1; then
  section "GPT training throughput: examples/gpt bench against bench/peers/pytorch_gpt.py, 1 thread"
  gpt_flags=()
  py_flags=()
  pairs=3
  if [ "$smoke" = 1 ]; then
    gpt_flags=(--layers 1 --heads 2 --embd 32 --batch 2 --seq 16 --min-time 0.05 --repetitions 1)
    py_flags=(--smoke)
    pairs=1
  fi
  for pair in $(seq 1 "$pairs"); do
    "$gpt_bin" bench "${gpt_flags[@]}" --json "$out/gpt-cpp-$pair.json"
    "$python" bench/peers/pytorch_gpt.py --threads 1 "${py_flags[@]}" --json "$out/gpt-torch-$pair.json" | grep -v '^$'
  done
  "$python" - "$out" "$pairs" <<'PY'
import json, statistics, sys
out, pairs = sys.argv[1], int(sys.argv[2])
ratios = []
for p in range(1, pairs + 1):
    cpp = json.load(open("%s/gpt-cpp-%d.json" % (out, p)))["tokens_per_s"]
    torch = json.load(open("%s/gpt-torch-%d.json" % (out, p)))["results"]["lora"]["tokens_per_second"]
    ratios.append(cpp / torch)
    print("pair %d: examples/gpt %.0f tokens/s, PyTorch %.0f tokens/s, ratio %.2f" % (p, cpp, torch, cpp / torch))
print("examples/gpt / PyTorch training throughput, median of %d pairs: %.2f" % (pairs, statistics.median(ratios)))
PY
else
  section "GPT training throughput: skipped (no gpt build, or $python cannot import torch)"
fi

section "summary"
"$python" bench/summarize.py "$out"
