#!/usr/bin/env bash
# GGUF LoRA adapters exported by lora-export-gguf, checked by ggml's own gguf reader as llama.cpp's loader checks
# them, for tests/unit-gguf-adapter.cpp.
#
#   tests/golden/make_gguf_adapter_golden.sh [EXPORTER] [GGML_SOURCE_DIR]
#
# 1. make_gguf_adapter_golden.py writes the PEFT adapters and, from PEFT's and llama.cpp's definitions, the update
#    each GGUF base tensor must get (tests/data/gguf/adapters/, see that script).
# 2. EXPORTER (default build/tools/lora-export-gguf) writes every case as f32 and f16, and llama_plain also as q8_0,
#    to tests/data/gguf/adapters/<case>.<type>.gguf. The unit test exports again and compares the bytes, so the
#    check below holds for what the library writes today.
# 3. ggml's ggml-base library (gguf.cpp and its to_float conversions), built from GGML_SOURCE_DIR or from a clone
#    of github.com/ggml-org/ggml at the commit ggml_base.sh pins, reads each file, and this script's C++ side does what
#    llama.cpp's llama_adapter_lora_init_impl (src/llama-adapter.cpp) does with it:
#      general.type "adapter", adapter.type "lora", general.architecture the model's, adapter.lora.alpha;
#      every tensor "<base>.lora_a" or "<base>.lora_b", each pair whole, each <base> a tensor of the model
#      (<case>_base.txt), shapes W.ne[0] == A.ne[0], W.ne[1] == B.ne[1], A.ne[1] == B.ne[0] (token_embd:
#      W.ne[0] == B.ne[1], W.ne[1] == A.ne[1]);
#    then computes the update llama.cpp applies, scale = alpha / B.ne[0] (1 when alpha is 0), as
#    llm_build_lora_mm (scale · mul_mat(B, mul_mat(A, x)) for every unit x) and llm_build_inp_embd
#    (scale · mul_mat(B, get_rows(A, token))) do, from ggml's dequantised values, and compares it with
#    PyTorch's. The bound is the rounding of the stored type, per element: s · Σ_k (|b| e_a + |a| e_b + e_a e_b)
#    with e = |x|·2^-24 (f32), 2^-11 (f16), 2^-8 (bf16) or 0.57 · amax/127 of the q8_0 block, plus float
#    accumulation on both sides. The report is tests/data/gguf/adapters/read_by_ggml.txt.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
out="$root/tests/data/gguf/adapters"
exporter=${1:-"$root/build/tools/lora-export-gguf"}
work=$(mktemp -d /tmp/gguf-adapter-golden.XXXXXX)
trap '[ -n "${KEEP_WORK:-}" ] || rm -rf "$work"' EXIT

/usr/bin/python3 "$root/tests/golden/make_gguf_adapter_golden.py" "$work/expected"

# shellcheck source=ggml_base.sh
source "$root/tests/golden/ggml_base.sh"
build_ggml_base "${2:-}" "$work"

cat >"$work/loader_check.cpp" <<'EOF'
// loader_check FILE ARCH BASE_TXT EXPECTED_DIR: llama.cpp's adapter checks and update, through ggml's reader.
#include "ggml.h"
#include "gguf.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <string>
#include <vector>

static int failures = 0, checks = 0;
static void expect(bool ok, const std::string& what) {
  ++checks;
  if (!ok) ++failures;
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
}

static bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Every value of t as float (ggml's to_float), and each value's rounding bound in its stored type.
static void values(const ggml_tensor* t, std::vector<float>& v, std::vector<float>& err) {
  const int64_t n = ggml_nelements(t);
  v.resize(n);
  err.resize(n);
  if (t->type == GGML_TYPE_F32)
    std::memcpy(v.data(), t->data, n * sizeof(float));
  else
    ggml_get_type_traits(t->type)->to_float(t->data, v.data(), n);
  for (int64_t k = 0; k < n; ++k) {
    switch (t->type) {
      case GGML_TYPE_F32: err[k] = std::fabs(v[k]) * std::ldexp(1.0f, -24); break;
      case GGML_TYPE_F16: err[k] = std::fabs(v[k]) * std::ldexp(1.0f, -11); break;
      case GGML_TYPE_BF16: err[k] = std::fabs(v[k]) * std::ldexp(1.0f, -8); break;
      default: {  // q8_0: blocks of 32 along ne[0]
        const int64_t b0 = k - k % 32;
        float amax = 0;
        for (int64_t j = b0; j < b0 + 32; ++j) amax = std::fmax(amax, std::fabs(v[j]));
        err[k] = 0.57f * amax / 127.0f;
      }
    }
  }
}

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: loader_check FILE ARCH BASE_TXT EXPECTED_DIR\n");
    return 2;
  }
  const std::string file = argv[1], arch = argv[2], expected_dir = argv[4];
  std::map<std::string, std::pair<int64_t, int64_t>> base;  // the model's tensors: ne0, ne1
  {
    std::ifstream in(argv[3]);
    std::string name;
    int64_t ne0, ne1;
    while (in >> name >> ne0 >> ne1) base[name] = {ne0, ne1};
  }
  ggml_context* ctx = nullptr;
  gguf_init_params params = {/*no_alloc=*/false, &ctx};
  gguf_context* g = gguf_init_from_file(file.c_str(), params);
  std::printf("ggml (commit %s) reads %s\n", GGML_COMMIT_ID, std::strrchr(file.c_str(), '/') + 1);
  expect(g != nullptr, "gguf_init_from_file opens it");
  if (g == nullptr) return 1;
  auto str = [&](const char* key) -> std::string {
    const int64_t id = gguf_find_key(g, key);
    return id < 0 || gguf_get_kv_type(g, id) != GGUF_TYPE_STRING ? "" : gguf_get_val_str(g, id);
  };
  expect(str("general.type") == "adapter", "general.type = adapter");
  expect(str("general.architecture") == arch, "general.architecture = " + arch);
  expect(str("adapter.type") == "lora", "adapter.type = lora");
  const int64_t alpha_id = gguf_find_key(g, "adapter.lora.alpha");
  expect(alpha_id >= 0 && gguf_get_kv_type(g, alpha_id) == GGUF_TYPE_FLOAT32, "adapter.lora.alpha is f32");
  const float alpha = alpha_id >= 0 ? gguf_get_val_f32(g, alpha_id) : 0.0f;
  std::printf("     alpha %g\n", alpha);

  std::map<std::string, std::pair<ggml_tensor*, ggml_tensor*>> ab;
  // The file's tensors (with no_alloc false, ggml's context also holds the data blob, which is no tensor).
  for (int64_t id = 0; id < gguf_get_n_tensors(g); ++id) {
    std::string name = gguf_get_tensor_name(g, id);
    ggml_tensor* t = ggml_get_tensor(ctx, name.c_str());
    const bool a = ends_with(name, ".lora_a"), b = ends_with(name, ".lora_b");
    expect(a || b, name + " ends in .lora_a or .lora_b");
    if (!a && !b) continue;
    (a ? ab[name.substr(0, name.size() - 7)].first : ab[name.substr(0, name.size() - 7)].second) = t;
  }
  for (auto& [name, pair] : ab) {
    ggml_tensor *a = pair.first, *b = pair.second;
    expect(a && b, name + ": both lora_a and lora_b");
    if (!a || !b) continue;
    auto it = base.find(name);
    expect(it != base.end(), name + ": a tensor of the base model");
    if (it == base.end()) continue;
    const int64_t W0 = it->second.first, W1 = it->second.second;
    const bool embd = ends_with(name, "token_embd.weight");
    bool shapes;
    if (embd) {
      shapes = W0 == b->ne[1] && W1 == a->ne[1];
      expect(shapes, "  token_embd rule: W.ne[0] == B.ne[1], W.ne[1] == A.ne[1] (A " + std::to_string(a->ne[0]) +
                         "x" + std::to_string(a->ne[1]) + ", B " + std::to_string(b->ne[0]) + "x" +
                         std::to_string(b->ne[1]) + ")");
    } else {
      shapes = W0 == a->ne[0] && W1 == b->ne[1] && a->ne[1] == b->ne[0];
      expect(shapes, "  W.ne[0] == A.ne[0], W.ne[1] == B.ne[1], A.ne[1] == B.ne[0] (W " + std::to_string(W0) + "x" +
                         std::to_string(W1) + ", A " + std::to_string(a->ne[0]) + "x" + std::to_string(a->ne[1]) +
                         ", B " + std::to_string(b->ne[0]) + "x" + std::to_string(b->ne[1]) + ")");
    }
    if (!shapes) continue;
    const float rank = (float)b->ne[0];
    const float scale = alpha ? alpha / rank : 1.0f;  // llama_adapter_lora_weight::get_scale, adapter_scale 1
    std::vector<float> av, ae, bv, be;
    values(a, av, ae);
    values(b, bv, be);
    const int64_t r = b->ne[0], out_rows = W1, in_cols = W0;
    // The update in PyTorch orientation (W.ne[1] rows, W.ne[0] columns).
    std::vector<double> got(out_rows * in_cols), bound(out_rows * in_cols);
    for (int64_t o = 0; o < out_rows; ++o)
      for (int64_t i = 0; i < in_cols; ++i) {
        double sum = 0, mag = 0, e = 0;
        for (int64_t k = 0; k < r; ++k) {
          // linear: mul_mat(B, mul_mat(A, e_i)): row o of B (ne[0] = r) times column i of A (A[k][i] at k*ne0+i).
          // token_embd: row o is token o: get_rows(A, o) is A's row o (r values), times B's row i (output i).
          const int64_t ia = embd ? o * r + k : k * in_cols + i, ib = embd ? i * r + k : o * r + k;
          sum += (double)bv[ib] * av[ia];
          mag += std::fabs((double)bv[ib] * av[ia]);
          e += std::fabs(bv[ib]) * ae[ia] + std::fabs(av[ia]) * be[ib] + (double)ae[ia] * be[ib];
        }
        got[o * in_cols + i] = scale * sum;
        bound[o * in_cols + i] = std::fabs(scale) * (e + 2 * (r + 2) * std::ldexp(1.0, -24) * mag);
      }
    std::vector<float> want(out_rows * in_cols);
    std::ifstream raw(expected_dir + "/" + name + ".f32", std::ios::binary);
    raw.read(reinterpret_cast<char*>(want.data()), want.size() * sizeof(float));
    expect(raw.gcount() == (std::streamsize)(want.size() * sizeof(float)), "  PyTorch's update read");
    double worst = 0, max_diff = 0, max_want = 0;
    for (size_t k = 0; k < want.size(); ++k) {
      const double d = std::fabs(got[k] - want[k]);
      max_diff = std::fmax(max_diff, d);
      max_want = std::fmax(max_want, std::fabs(want[k]));
      worst = std::fmax(worst, d / (bound[k] + 1e-30));
    }
    char line[256];
    std::snprintf(line, sizeof line, "  %s/%s, scale %g: (scale B A) vs PyTorch's update: max |diff| %.3g of max %.3g, "
                  "%.2f of the rounding bound", ggml_type_name(a->type), ggml_type_name(b->type), scale, max_diff,
                  max_want, worst);
    expect(worst <= 1.0, line);
  }
  std::printf("%d of %d checks passed\n", checks - failures, checks);
  gguf_free(g);
  ggml_free(ctx);
  return failures == 0 ? 0 : 1;
}
EOF

ggml_commit=$(git -C "$ggml" rev-parse HEAD 2>/dev/null || echo "$GGML_COMMIT (source tree, not a git checkout)")
g++ -std=c++17 -O1 -DGGML_COMMIT_ID="\"$ggml_commit\"" -I"$ggml/include" "$work/loader_check.cpp" \
  "$work/build/src/libggml-base.a" -lm -lpthread -o "$work/loader_check"

status=0
report="$out/read_by_ggml.txt"
: >"$report"
for case in llama_plain llama_rslora gpt2; do
  arch=${case%%_*}
  types="f32 f16"
  [ "$case" = llama_plain ] && types="f32 f16 q8_0"
  for type in $types; do
    file="$out/$case.$type.gguf"
    "$exporter" --adapter "$out/$case" --arch "$arch" --n-head 4 --n-head-kv 2 --outtype "$type" --out "$file" \
      >/dev/null
    "$work/loader_check" "$file" "$arch" "$out/${case}_base.txt" "$work/expected/$case" >>"$report" || status=$?
  done
done
cp "$ggml/LICENSE" "$out/LICENSE-ggml"
grep -E "FAIL|checks passed" "$report"
exit "$status"
