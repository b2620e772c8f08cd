#!/usr/bin/env bash
# Runs every build of this folder's CMakeLists.txt in interleaved rounds (each a median of 30 forwards), so a
# change in the machine's load hits every configuration alike, then prints per configuration the median of its
# round medians and every round's. Threads: 1 and 2 for the OpenBLAS and OpenMP builds.
#
#   tests/consumers/speed/rounds.sh <speed build dir> [rounds, default 5]
set -euo pipefail
dir=${1:?usage: rounds.sh <speed build dir> [rounds]}
rounds=${2:-5}
configs=()
for config in "plain 1" "native 1" "native_openblas 1" "native_openblas 2" "native_openmp 1" "native_openmp 2"; do
  if [ -x "$dir/speed_${config% *}" ]; then
    configs+=("$config")
  else
    echo "no $dir/speed_${config% *}: left out" >&2
  fi
done
results=$(mktemp)
trap 'rm -f "$results"' EXIT
echo "$(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //'); load before: $(cut -d' ' -f1-3 /proc/loadavg)"
for _ in $(seq "$rounds"); do
  for config in "${configs[@]}"; do
    read -r variant threads <<<"$config"
    median=$("$dir/speed_$variant" --runs=30 --threads="$threads" | head -n 1 | sed -E 's/.*median ([0-9.]+) ms.*/\1/')
    echo "$variant $threads $median" >>"$results"
  done
done
for config in "${configs[@]}"; do
  read -r variant threads <<<"$config"
  awk -v v="$variant" -v t="$threads" '$1 == v && $2 == t {print $3}' "$results" | sort -n |
    awk -v name="$variant, $threads thread(s)" '{m[NR] = $1}
      END {
        mid = (NR % 2) ? m[(NR + 1) / 2] : (m[NR / 2] + m[NR / 2 + 1]) / 2
        printf "%-28s %7.2f ms   rounds:", name, mid
        for (i = 1; i <= NR; ++i) printf " %.2f", m[i]
        print ""
      }'
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
"$dir/speed_native_openblas" --smoke 2>/dev/null | tail -n 1 | sed 's/^ *//' || true
