#!/usr/bin/env bash
# Golden GGUF files from ggml's own gguf code (ggml/src/gguf.cpp), for tests/unit-gguf.cpp.
#
#   tests/golden/make_gguf_golden.sh [GGML_SOURCE_DIR]
#
# Builds ggml's ggml-base library (gguf.cpp, ggml.c, ggml-quants.c) in a temporary folder, from GGML_SOURCE_DIR
# or from a clone of github.com/ggml-org/ggml at the commit tests/golden/ggml_base.sh pins, then
#   (a) writes reference files with ggml's gguf writer into tests/data/gguf/:
#       ggml_all_types.gguf  a value of every GGUF type and an array of each; f32, f16, bf16, q8_0 tensors whose
#                            values are exact in their type (so the test knows them without rounding), and a 1-D
#                            and a 3-D tensor
#       ggml_rounding.gguf   general.alignment 64; f16, bf16 and q8_0 from values none of them hold exactly
#                            (x_k = ((37 k) mod 101 - 50) / 7, converted by ggml: ggml_fp32_to_fp16_row,
#                            ggml_fp32_to_bf16_row_ref, ggml_quantize_chunk = quantize_row_q8_0_ref), and a q8_0
#                            block of zeros
#       ggml_type_traits.txt ggml_type_name / ggml_blck_size / ggml_type_size for every ggml type number
#   (b) writes ours_adapter.gguf with OUR writer (include/lora/gguf.hpp), reads it back with ggml's
#       gguf_init_from_file and checks every key, type, value, tensor type, ne, offset and (through ggml's
#       to_float) every tensor value against the values chosen here; the report is ours_read_by_ggml.txt.
# The values are written out in this script, twice (once for each side): tests/unit-gguf.cpp checks them
# again from its own copy, never from what a reader returned.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
out="$root/tests/data/gguf"
work=$(mktemp -d /tmp/gguf-golden.XXXXXX)
trap '[ -n "${KEEP_WORK:-}" ] || rm -rf "$work"' EXIT
mkdir -p "$out"

# shellcheck source=ggml_base.sh
source "$root/tests/golden/ggml_base.sh"
build_ggml_base "${1:-}" "$work"

cat >"$work/ggml_side.cpp" <<'EOF'
// write: the reference files; check FILE: ggml's reader on our writer's ours_adapter.gguf.
#include "ggml.h"
#include "gguf.h"

#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static ggml_context* ctx_new() {
  ggml_init_params p = {16 * 1024 * 1024, nullptr, false};
  return ggml_init(p);
}

// The exact-valued tensors of ggml_all_types.gguf, row-major index k (ne[0] fastest).
static float all_f32(int k) { return 0.5f * k - 2.75f; }
static float all_f16(int k) { return 0.125f * k - 1.0f; }
static float all_bf16(int k) { return 0.25f * k - 1.0f; }
// q8_0, ne {64, 2}: four blocks of 32; block b holds q_j = 8 j - 127 scaled by 2^-(b+1): amax / 127 is the scale.
static float all_q8_0(int k) { return (8.0f * (k % 32) - 127.0f) * std::ldexp(1.0f, -(k / 32 + 1)); }
static float rounding_x(int k) { return static_cast<float>((37 * k) % 101 - 50) / 7.0f; }

static void add_tensor(ggml_context* ctx, gguf_context* g, const char* name, ggml_type type,
                       std::vector<int64_t> ne, float (*value)(int)) {
  ggml_tensor* t = ggml_new_tensor(ctx, type, (int)ne.size(), ne.data());
  ggml_set_name(t, name);
  const int64_t n = ggml_nelements(t);
  std::vector<float> x(n);
  for (int64_t k = 0; k < n; ++k) x[k] = value((int)k);
  switch (type) {
    case GGML_TYPE_F32: std::memcpy(t->data, x.data(), n * 4); break;
    case GGML_TYPE_F16: ggml_fp32_to_fp16_row(x.data(), (ggml_fp16_t*)t->data, n); break;
    case GGML_TYPE_BF16: ggml_fp32_to_bf16_row_ref(x.data(), (ggml_bf16_t*)t->data, n); break;
    default: ggml_quantize_chunk(type, x.data(), t->data, 0, n / ne[0], ne[0], nullptr); break;
  }
  gguf_add_tensor(g, t);
}

static void write_references(const std::string& dir) {
  {
    gguf_context* g = gguf_init_empty();
    gguf_set_val_str(g, "general.architecture", "llama");
    gguf_set_val_u8(g, "test.u8", 200);
    gguf_set_val_i8(g, "test.i8", -100);
    gguf_set_val_u16(g, "test.u16", 60000);
    gguf_set_val_i16(g, "test.i16", -30000);
    gguf_set_val_u32(g, "test.u32", 4000000000u);
    gguf_set_val_i32(g, "test.i32", -2000000000);
    gguf_set_val_f32(g, "test.f32", 3.25f);
    gguf_set_val_bool(g, "test.bool", true);
    gguf_set_val_str(g, "test.str", "h\xc3\xa9llo GGUF");
    gguf_set_val_u64(g, "test.u64", 1234567890123456789ull);
    gguf_set_val_i64(g, "test.i64", -1234567890123456789ll);
    gguf_set_val_f64(g, "test.f64", -0.1);
    const uint8_t u8s[] = {0, 1, 255};
    const int8_t i8s[] = {-128, 0, 127};
    const uint16_t u16s[] = {0, 65535};
    const int16_t i16s[] = {-32768, 32767};
    const uint32_t u32s[] = {0, 4294967295u};
    const int32_t i32s[] = {INT32_MIN, INT32_MAX};
    const float f32s[] = {0.5f, -1.5f, 1e-3f};
    const int8_t bools[] = {1, 0, 1};
    const uint64_t u64s[] = {0, UINT64_MAX};
    const int64_t i64s[] = {INT64_MIN, INT64_MAX};
    const double f64s[] = {0.25, -1e300};
    const char* strs[] = {"a", "", "\xc3\xbcn\xc3\xaf" "code"};
    gguf_set_arr_data(g, "test.arr_u8", GGUF_TYPE_UINT8, u8s, 3);
    gguf_set_arr_data(g, "test.arr_i8", GGUF_TYPE_INT8, i8s, 3);
    gguf_set_arr_data(g, "test.arr_u16", GGUF_TYPE_UINT16, u16s, 2);
    gguf_set_arr_data(g, "test.arr_i16", GGUF_TYPE_INT16, i16s, 2);
    gguf_set_arr_data(g, "test.arr_u32", GGUF_TYPE_UINT32, u32s, 2);
    gguf_set_arr_data(g, "test.arr_i32", GGUF_TYPE_INT32, i32s, 2);
    gguf_set_arr_data(g, "test.arr_f32", GGUF_TYPE_FLOAT32, f32s, 3);
    gguf_set_arr_data(g, "test.arr_bool", GGUF_TYPE_BOOL, bools, 3);
    gguf_set_arr_str(g, "test.arr_str", strs, 3);
    gguf_set_arr_data(g, "test.arr_u64", GGUF_TYPE_UINT64, u64s, 2);
    gguf_set_arr_data(g, "test.arr_i64", GGUF_TYPE_INT64, i64s, 2);
    gguf_set_arr_data(g, "test.arr_f64", GGUF_TYPE_FLOAT64, f64s, 2);
    gguf_set_arr_data(g, "test.arr_empty", GGUF_TYPE_INT32, nullptr, 0);
    ggml_context* ctx = ctx_new();
    add_tensor(ctx, g, "t.f32", GGML_TYPE_F32, {4, 3}, all_f32);
    add_tensor(ctx, g, "t.f16", GGML_TYPE_F16, {8, 2}, all_f16);
    add_tensor(ctx, g, "t.bf16", GGML_TYPE_BF16, {4, 2}, all_bf16);
    add_tensor(ctx, g, "t.q8_0", GGML_TYPE_Q8_0, {64, 2}, all_q8_0);
    add_tensor(ctx, g, "t.vec", GGML_TYPE_F32, {5}, all_f32);
    add_tensor(ctx, g, "t.3d", GGML_TYPE_F32, {2, 3, 2}, all_f32);
    if (!gguf_write_to_file(g, (dir + "/ggml_all_types.gguf").c_str(), false)) std::exit(1);
    gguf_free(g);
    ggml_free(ctx);
  }
  {
    // ggml's writer pads to its context's alignment, which only its reader sets from "general.alignment":
    // gguf_set_val_u32(ctx, "general.alignment", 64) on an empty context still lays the file out for 32, and
    // ggml's own reader then refuses the file. So the key goes through a file and back first.
    const std::string meta = dir + "/.alignment-meta.gguf";
    {
      gguf_context* m = gguf_init_empty();
      gguf_set_val_u32(m, "general.alignment", 64);
      gguf_write_to_file(m, meta.c_str(), false);
      gguf_free(m);
    }
    gguf_init_params no_data = {true, nullptr};
    gguf_context* g = gguf_init_from_file(meta.c_str(), no_data);
    std::remove(meta.c_str());
    if (g == nullptr || gguf_get_alignment(g) != 64) std::exit(1);
    ggml_context* ctx = ctx_new();
    add_tensor(ctx, g, "r.f16", GGML_TYPE_F16, {32, 3}, rounding_x);
    add_tensor(ctx, g, "r.bf16", GGML_TYPE_BF16, {32, 3}, rounding_x);
    add_tensor(ctx, g, "r.q8_0", GGML_TYPE_Q8_0, {32, 4}, [](int k) { return k < 96 ? rounding_x(k) : 0.0f; });
    add_tensor(ctx, g, "r.f32_odd", GGML_TYPE_F32, {3}, rounding_x);
    if (!gguf_write_to_file(g, (dir + "/ggml_rounding.gguf").c_str(), false)) std::exit(1);
    gguf_free(g);
    ggml_free(ctx);
  }
  {
    gguf_context* g = gguf_init_empty();
    gguf_set_val_u32(g, "general.alignment", 64);
    ggml_context* ctx = ctx_new();
    add_tensor(ctx, g, "r.f32_odd", GGML_TYPE_F32, {3}, rounding_x);
    add_tensor(ctx, g, "r.f16", GGML_TYPE_F16, {32, 3}, rounding_x);
    const std::string naive = dir + "/.alignment-naive.gguf";
    gguf_write_to_file(g, naive.c_str(), false);
    gguf_init_params no_data = {true, nullptr};
    gguf_context* back = gguf_init_from_file(naive.c_str(), no_data);
    std::printf("note: general.alignment = 64 set with gguf_set_val_u32 on an empty context: ggml's writer pads to "
                "%zu, and ggml's reader %s the file it wrote\n",
                gguf_get_alignment(g), back == nullptr ? "refuses" : "accepts");
    std::remove(naive.c_str());
    gguf_free(back);
    gguf_free(g);
    ggml_free(ctx);
  }
  FILE* f = std::fopen((dir + "/ggml_type_traits.txt").c_str(), "w");
  std::fprintf(f, "# ggml type number, ggml_type_name, ggml_blck_size, ggml_type_size (0 0: removed)\n");
  for (int t = 0; t < GGML_TYPE_COUNT; ++t) {
    const bool removed = ggml_blck_size((ggml_type)t) == 0;
    std::fprintf(f, "%d %s %" PRId64 " %zu\n", t, removed ? "removed" : ggml_type_name((ggml_type)t),
                 ggml_blck_size((ggml_type)t), ggml_type_size((ggml_type)t));
  }
  std::fclose(f);
}

// ---- (b): what ggml's reader finds in ours_adapter.gguf ------------------------------------------------------

static int failures = 0, checks = 0;
static void expect(bool ok, const std::string& what) {
  ++checks;
  if (!ok) ++failures;
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
}

// ours_adapter.gguf's tensors (the same formulas are in tests/unit-gguf.cpp and in ours_side.cpp below).
static float lora_a_q(int k) { return (k % 13 - 6) * 0.125f; }
static float lora_b_q(int k) { return (k - 16) * 0.0625f; }
static float lora_a_k(int k) { return (k % 7 - 3) * 0.5f; }
static float lora_b_k(int k) { return (8.0f * (k % 32) - 127.0f) * std::ldexp(1.0f, -(k / 32 + 3)); }

static void check_ours(const char* path) {
  ggml_context* data = nullptr;
  gguf_init_params params = {false, &data};
  gguf_context* g = gguf_init_from_file(path, params);
  expect(g != nullptr, "gguf_init_from_file reads the file (no_alloc = false: the whole data section is read)");
  if (g == nullptr) return;
  std::printf("     version %u, alignment %zu, data offset %zu, %" PRId64 " keys, %" PRId64 " tensors\n",
              gguf_get_version(g), gguf_get_alignment(g), gguf_get_data_offset(g), gguf_get_n_kv(g),
              gguf_get_n_tensors(g));
  expect(gguf_get_version(g) == 3 && gguf_get_alignment(g) == 64 && gguf_get_data_offset(g) % 64 == 0,
         "version 3, alignment 64, data section aligned");
  auto key = [&](const char* k, gguf_type type) {
    const int64_t id = gguf_find_key(g, k);
    const bool ok = id >= 0 && gguf_get_kv_type(g, id) == type;
    expect(ok, std::string("key ") + k + " is " + gguf_type_name(type));
    return ok ? id : -1;
  };
  int64_t id;
  if ((id = key("general.architecture", GGUF_TYPE_STRING)) >= 0)
    expect(std::strcmp(gguf_get_val_str(g, id), "llama") == 0, "  = \"llama\"");
  if ((id = key("general.type", GGUF_TYPE_STRING)) >= 0)
    expect(std::strcmp(gguf_get_val_str(g, id), "adapter") == 0, "  = \"adapter\"");
  if ((id = key("adapter.type", GGUF_TYPE_STRING)) >= 0)
    expect(std::strcmp(gguf_get_val_str(g, id), "lora") == 0, "  = \"lora\"");
  if ((id = key("adapter.lora.alpha", GGUF_TYPE_FLOAT32)) >= 0) expect(gguf_get_val_f32(g, id) == 16.0f, "  = 16");
  if ((id = key("general.alignment", GGUF_TYPE_UINT32)) >= 0) expect(gguf_get_val_u32(g, id) == 64, "  = 64");
  if ((id = key("test.u8", GGUF_TYPE_UINT8)) >= 0) expect(gguf_get_val_u8(g, id) == 7, "  = 7");
  if ((id = key("test.i8", GGUF_TYPE_INT8)) >= 0) expect(gguf_get_val_i8(g, id) == -7, "  = -7");
  if ((id = key("test.u16", GGUF_TYPE_UINT16)) >= 0) expect(gguf_get_val_u16(g, id) == 65535, "  = 65535");
  if ((id = key("test.i16", GGUF_TYPE_INT16)) >= 0) expect(gguf_get_val_i16(g, id) == -32768, "  = -32768");
  if ((id = key("test.u32", GGUF_TYPE_UINT32)) >= 0) expect(gguf_get_val_u32(g, id) == 123456789u, "  = 123456789");
  if ((id = key("test.i32", GGUF_TYPE_INT32)) >= 0) expect(gguf_get_val_i32(g, id) == -123456789, "  = -123456789");
  if ((id = key("test.bool", GGUF_TYPE_BOOL)) >= 0) expect(gguf_get_val_bool(g, id) == false, "  = false");
  if ((id = key("test.u64", GGUF_TYPE_UINT64)) >= 0) expect(gguf_get_val_u64(g, id) == UINT64_MAX, "  = 2^64 - 1");
  if ((id = key("test.i64", GGUF_TYPE_INT64)) >= 0) expect(gguf_get_val_i64(g, id) == INT64_MIN, "  = -2^63");
  if ((id = key("test.f64", GGUF_TYPE_FLOAT64)) >= 0) expect(gguf_get_val_f64(g, id) == 1.0 / 3.0, "  = 1/3");
  if ((id = key("test.str", GGUF_TYPE_STRING)) >= 0)
    expect(std::strcmp(gguf_get_val_str(g, id), "GGUF from lora::gguf::Writer") == 0, "  = \"GGUF from lora::gguf::Writer\"");
  if ((id = key("test.arr_str", GGUF_TYPE_ARRAY)) >= 0)
    expect(gguf_get_arr_type(g, id) == GGUF_TYPE_STRING && gguf_get_arr_n(g, id) == 3 &&
               std::strcmp(gguf_get_arr_str(g, id, 0), "blk.0.attn_q") == 0 &&
               std::strcmp(gguf_get_arr_str(g, id, 1), "\xc3\x9f") == 0 && gguf_get_arr_str(g, id, 2)[0] == '\0',
           "  = [\"blk.0.attn_q\", \"\xc3\x9f\", \"\"]");
  if ((id = key("test.arr_f32", GGUF_TYPE_ARRAY)) >= 0) {
    const float* v = (const float*)gguf_get_arr_data(g, id);
    expect(gguf_get_arr_type(g, id) == GGUF_TYPE_FLOAT32 && gguf_get_arr_n(g, id) == 2 && v[0] == 1.5f &&
               v[1] == -2.25f,
           "  = [1.5, -2.25] (f32)");
  }
  if ((id = key("test.arr_bool", GGUF_TYPE_ARRAY)) >= 0) {
    const int8_t* v = (const int8_t*)gguf_get_arr_data(g, id);
    expect(gguf_get_arr_type(g, id) == GGUF_TYPE_BOOL && gguf_get_arr_n(g, id) == 2 && v[0] == 0 && v[1] == 1,
           "  = [false, true]");
  }
  if ((id = key("test.arr_i16", GGUF_TYPE_ARRAY)) >= 0) {
    const int16_t* v = (const int16_t*)gguf_get_arr_data(g, id);
    expect(gguf_get_arr_type(g, id) == GGUF_TYPE_INT16 && gguf_get_arr_n(g, id) == 3 && v[0] == -1 && v[1] == 2 &&
               v[2] == -3,
           "  = [-1, 2, -3] (i16)");
  }
  if ((id = key("test.arr_u64", GGUF_TYPE_ARRAY)) >= 0) {
    const uint64_t* v = (const uint64_t*)gguf_get_arr_data(g, id);
    expect(gguf_get_arr_type(g, id) == GGUF_TYPE_UINT64 && gguf_get_arr_n(g, id) == 2 && v[0] == 1 && v[1] == 2,
           "  = [1, 2] (u64)");
  }
  if ((id = key("test.arr_f64", GGUF_TYPE_ARRAY)) >= 0) {
    const double* v = (const double*)gguf_get_arr_data(g, id);
    expect(gguf_get_arr_type(g, id) == GGUF_TYPE_FLOAT64 && gguf_get_arr_n(g, id) == 2 && v[0] == 0.1 && v[1] == 0.2,
           "  = [0.1, 0.2] (f64)");
  }
  expect(gguf_get_n_kv(g) == 22, "22 keys, no others");

  struct Want {
    const char* name;
    ggml_type type;
    int64_t ne0, ne1;
    float (*value)(int);
  };
  const Want want[] = {{"blk.0.attn_q.weight.lora_a", GGML_TYPE_F32, 64, 4, lora_a_q},
                       {"blk.0.attn_q.weight.lora_b", GGML_TYPE_F16, 4, 8, lora_b_q},
                       {"blk.0.attn_k.weight.lora_a", GGML_TYPE_BF16, 64, 2, lora_a_k},
                       {"blk.0.attn_k.weight.lora_b", GGML_TYPE_Q8_0, 32, 3, lora_b_k}};
  expect(gguf_get_n_tensors(g) == 4, "4 tensors");
  size_t expected_offset = 0;
  for (const Want& w : want) {
    const int64_t t = gguf_find_tensor(g, w.name);
    expect(t >= 0, std::string("tensor ") + w.name);
    if (t < 0) continue;
    const int64_t* ne = gguf_get_tensor_ne(g, t);
    expect(gguf_get_tensor_type(g, t) == w.type && ne[0] == w.ne0 && ne[1] == w.ne1 && ne[2] == 1 && ne[3] == 1,
           std::string("  ") + ggml_type_name(w.type) + " ne [" + std::to_string(w.ne0) + ", " +
               std::to_string(w.ne1) + ", 1, 1]");
    expect(gguf_get_tensor_offset(g, t) == expected_offset,
           "  offset " + std::to_string(expected_offset) + " (tensors packed in order, each padded to 64)");
    expected_offset += GGML_PAD(gguf_get_tensor_size(g, t), 64);
    ggml_tensor* tensor = ggml_get_tensor(data, w.name);
    const int64_t n = ggml_nelements(tensor);
    std::vector<float> v(n);
    if (w.type == GGML_TYPE_F32) {
      std::memcpy(v.data(), tensor->data, n * sizeof(float));
    } else {
      ggml_get_type_traits(w.type)->to_float(tensor->data, v.data(), n);
    }
    int64_t same = 0;
    for (int64_t k = 0; k < n; ++k) same += v[k] == w.value((int)k);
    expect(same == n, "  " + std::to_string(same) + " of " + std::to_string(n) +
                          " values exactly as chosen (f32 as stored, others through ggml's to_float)");
  }
  gguf_free(g);
  ggml_free(data);
}

int main(int argc, char** argv) {
  if (argc == 3 && std::strcmp(argv[1], "write") == 0) {
    write_references(argv[2]);
    return 0;
  }
  if (argc == 3 && std::strcmp(argv[1], "check") == 0) {
    std::printf("ggml (commit %s) reads %s\n", GGML_COMMIT_ID, std::strrchr(argv[2], '/') + 1);
    check_ours(argv[2]);
    std::printf("%d of %d checks passed\n", checks - failures, checks);
    return failures == 0 ? 0 : 1;
  }
  std::fprintf(stderr, "usage: ggml_side write DIR | check FILE\n");
  return 2;
}
EOF

cat >"$work/ours_side.cpp" <<'EOF'
// ours_adapter.gguf from lora::gguf::Writer (tests/unit-gguf.cpp builds the same file and compares bytes).
#include <lora/gguf.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

namespace gguf = lora::gguf;

template <class F>
lora::Matrix<float> filled(lora::Index rows, lora::Index cols, F value) {
  lora::Matrix<float> m(rows, cols);
  for (lora::Index k = 0; k < m.size(); ++k) m.data()[k] = value(static_cast<int>(k));
  return m;
}

int main(int, char** argv) {
  gguf::Writer w;
  w.set("general.architecture", "llama");
  w.set("general.type", "adapter");
  w.set("adapter.type", "lora");
  w.set("adapter.lora.alpha", 16.0f);
  w.set("general.alignment", std::uint32_t{64});
  w.set("test.u8", std::uint8_t{7});
  w.set("test.i8", std::int8_t{-7});
  w.set("test.u16", std::uint16_t{65535});
  w.set("test.i16", std::int16_t{-32768});
  w.set("test.u32", std::uint32_t{123456789});
  w.set("test.i32", std::int32_t{-123456789});
  w.set("test.bool", false);
  w.set("test.u64", std::numeric_limits<std::uint64_t>::max());
  w.set("test.i64", std::numeric_limits<std::int64_t>::min());
  w.set("test.f64", 1.0 / 3.0);
  w.set("test.arr_str", std::vector<std::string>{"blk.0.attn_q", "\xc3\x9f", ""});
  w.set("test.arr_f32", std::vector<float>{1.5f, -2.25f});
  w.set("test.arr_bool", std::vector<bool>{false, true});
  w.set("test.arr_i16", std::vector<std::int16_t>{-1, 2, -3});
  w.set("test.arr_u64", std::vector<std::uint64_t>{1, 2});
  w.set("test.arr_f64", std::vector<double>{0.1, 0.2});
  w.set("test.str", "GGUF from lora::gguf::Writer");
  // A (R, I) and B (O, R) as PyTorch holds them; GGUF's ne is {I, R} and {R, O}.
  w.add("blk.0.attn_q.weight.lora_a", filled(4, 64, [](int k) { return (k % 13 - 6) * 0.125f; }));
  w.add("blk.0.attn_q.weight.lora_b", filled(8, 4, [](int k) { return (k - 16) * 0.0625f; }), gguf::TensorType::F16);
  w.add("blk.0.attn_k.weight.lora_a", filled(2, 64, [](int k) { return (k % 7 - 3) * 0.5f; }), gguf::TensorType::BF16);
  w.add("blk.0.attn_k.weight.lora_b",
        filled(3, 32, [](int k) { return (8.0f * (k % 32) - 127.0f) * std::ldexp(1.0f, -(k / 32 + 3)); }),
        gguf::TensorType::Q8_0);
  w.save(std::string(argv[1]) + "/ours_adapter.gguf");
}
EOF

ggml_commit=$(git -C "$ggml" rev-parse HEAD 2>/dev/null || echo "$GGML_COMMIT (source tree, not a git checkout)")
eigen=$(pkg-config --cflags eigen3 2>/dev/null || echo -I/usr/include/eigen3)
g++ -std=c++17 -O1 -DGGML_COMMIT_ID="\"$ggml_commit\"" -I"$ggml/include" "$work/ggml_side.cpp" \
  "$work/build/src/libggml-base.a" -lm -lpthread -o "$work/ggml_side"
# shellcheck disable=SC2086
g++ -std=c++17 -O1 -I"$root/include" $eigen "$work/ours_side.cpp" -o "$work/ours_side"

"$work/ggml_side" write "$out"
"$work/ours_side" "$out"
status=0
"$work/ggml_side" check "$out/ours_adapter.gguf" >"$out/ours_read_by_ggml.txt" || status=$?
cat "$out/ours_read_by_ggml.txt"
cp "$ggml/LICENSE" "$out/LICENSE-ggml"
ls -l "$out"
exit "$status"
