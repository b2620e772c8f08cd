#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages needed to build, test, benchmark and
# format lora, its tools (nlohmann-json, CLI11) and examples/finetune (zlib,
# the Fashion-MNIST data set; gnuplot-nox is optional and adds its PNG plot) and data-parallel training over
# MPI (<lora/distributed.hpp> and its tests: Open MPI's libopenmpi-dev and openmpi-bin), and examples/gpt's
# pretraining text (fortunes: fortune's topical files, 2.5 MB of English).
# Does nothing (and needs no network) when all are present.
set -euo pipefail

# libopenblas-dev: the LORA_USE_BLAS backend of the benchmarks. Not here: python3-torch (about 1 GB), which only
# bench/peers/pytorch_lora.py and the golden-data scripts use; .ci/run installs it for its benchmark step.
packages=(cmake g++ make git libeigen3-dev nlohmann-json3-dev libcli11-dev catch2 libbenchmark-dev clang-format
  zlib1g-dev dataset-fashion-mnist libopenblas-dev libdnnl-dev libopenmpi-dev openmpi-bin fortunes)

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "install-deps: all packages present (${packages[*]})"
  exit 0
fi

sudo=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
  else
    echo "install-deps: missing ${missing[*]}; run as root or install sudo" >&2
    exit 1
  fi
fi

echo "install-deps: installing ${missing[*]}"
"${sudo[@]}" apt-get update
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
