// GGUF reader and writer: files written by ggml's own gguf code read back
// exactly, our writer reproduces them byte for byte, the file our writer made
// for ggml's reader (tests/data/gguf/ours_adapter.gguf) is what it writes
// today, round trips of every value and tensor type, and one test per hostile
// input rule, each asserting its own message.
#include <catch2/catch.hpp>
#include <lora/gguf.hpp>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "test_files.hpp"

// Everything below is in a namespace of its own, so the test files can be compiled together (CMake's
// UNITY_BUILD, tests/CMakeLists.txt) without their helpers clashing.
namespace unit_gguf {

using Catch::Contains;
namespace gguf = lora::gguf;
namespace fs = std::filesystem;
using Bytes = std::vector<std::uint8_t>;
using Mat = lora::Matrix<float>;
using lora_test::error_of;

namespace {

const std::string gguf_dir = std::string(LORA_TEST_DATA_DIR) + "/gguf";

std::string refused(const Bytes& b) {
  try {
    gguf::File::from_bytes(b, "bad.gguf");
  } catch (const lora::format_error& e) {
    return e.what();
  }
  return "accepted";
}

// A GGUF image written field by field, for hostile files.
struct Image {
  Bytes b;
  Image& raw(const void* p, std::size_t n) {
    auto c = static_cast<const std::uint8_t*>(p);
    b.insert(b.end(), c, c + n);
    return *this;
  }
  template <class T>
  Image& num(T v) {
    return raw(&v, sizeof v);
  }
  Image& str(const std::string& s) {
    num<std::uint64_t>(s.size());
    return raw(s.data(), s.size());
  }
  Image& header(std::int64_t n_tensors, std::int64_t n_kv, std::uint32_t version = 3) {
    raw("GGUF", 4);
    num(version);
    num(n_tensors);
    return num(n_kv);
  }
  // key, type, then the value's bytes (added by the caller)
  Image& key(const std::string& k, std::int32_t type) {
    str(k);
    return num(type);
  }
  Image& tensor(const std::string& name, std::vector<std::int64_t> ne, std::int32_t type, std::uint64_t offset) {
    str(name);
    num(static_cast<std::uint32_t>(ne.size()));
    for (auto d : ne) num(d);
    num(type);
    return num(offset);
  }
  Image& pad(std::size_t alignment = 32) {
    b.resize((b.size() + alignment - 1) / alignment * alignment, 0);
    return *this;
  }
  Image& zeros(std::size_t n) {
    b.resize(b.size() + n, 0);
    return *this;
  }
};

constexpr std::int32_t u8_type = 0, u32_type = 4, bool_type = 7, str_type = 8, arr_type = 9, u64_type = 10;
constexpr std::int32_t f32_type = 0, q8_0_type = 8;

// One key "k" = u8 1 and one f32 tensor "t" of ne {4} at offset 0: the valid file the hostile ones vary.
Bytes valid_image() {
  Image i;
  i.header(1, 1).key("k", u8_type).num<std::uint8_t>(1).tensor("t", {4}, f32_type, 0).pad().zeros(16);
  return i.b;
}

template <class F>
Mat filled(lora::Index rows, lora::Index cols, F value) {
  Mat m(rows, cols);
  for (lora::Index k = 0; k < m.size(); ++k) m.data()[k] = value(static_cast<int>(k));
  return m;
}

// The values make_gguf_golden.sh chose (its copy of these formulas is in the script).
float all_f32(int k) { return 0.5f * k - 2.75f; }
float all_f16(int k) { return 0.125f * k - 1.0f; }
float all_bf16(int k) { return 0.25f * k - 1.0f; }
float all_q8_0(int k) { return (8.0f * (k % 32) - 127.0f) * std::ldexp(1.0f, -(k / 32 + 1)); }
float rounding_x(int k) { return static_cast<float>((37 * k) % 101 - 50) / 7.0f; }

// ggml_all_types.gguf's content, built with our writer.
gguf::Writer all_types_writer() {
  gguf::Writer w;
  w.set("general.architecture", "llama");
  w.set("test.u8", std::uint8_t{200});
  w.set("test.i8", std::int8_t{-100});
  w.set("test.u16", std::uint16_t{60000});
  w.set("test.i16", std::int16_t{-30000});
  w.set("test.u32", std::uint32_t{4000000000u});
  w.set("test.i32", std::int32_t{-2000000000});
  w.set("test.f32", 3.25f);
  w.set("test.bool", true);
  w.set("test.str", "h\xc3\xa9llo GGUF");
  w.set("test.u64", std::uint64_t{1234567890123456789ull});
  w.set("test.i64", std::int64_t{-1234567890123456789ll});
  w.set("test.f64", -0.1);
  w.set("test.arr_u8", std::vector<std::uint8_t>{0, 1, 255});
  w.set("test.arr_i8", std::vector<std::int8_t>{-128, 0, 127});
  w.set("test.arr_u16", std::vector<std::uint16_t>{0, 65535});
  w.set("test.arr_i16", std::vector<std::int16_t>{-32768, 32767});
  w.set("test.arr_u32", std::vector<std::uint32_t>{0, 4294967295u});
  w.set("test.arr_i32",
        std::vector<std::int32_t>{std::numeric_limits<std::int32_t>::min(), std::numeric_limits<std::int32_t>::max()});
  w.set("test.arr_f32", std::vector<float>{0.5f, -1.5f, 1e-3f});
  w.set("test.arr_bool", std::vector<bool>{true, false, true});
  w.set("test.arr_str", std::vector<std::string>{"a", "",
                                                 "\xc3\xbcn\xc3\xaf"
                                                 "code"});
  w.set("test.arr_u64", std::vector<std::uint64_t>{0, std::numeric_limits<std::uint64_t>::max()});
  w.set("test.arr_i64",
        std::vector<std::int64_t>{std::numeric_limits<std::int64_t>::min(), std::numeric_limits<std::int64_t>::max()});
  w.set("test.arr_f64", std::vector<double>{0.25, -1e300});
  w.set("test.arr_empty", std::vector<std::int32_t>{});
  w.add("t.f32", filled(3, 4, all_f32));
  w.add("t.f16", filled(2, 8, all_f16), gguf::TensorType::F16);
  w.add("t.bf16", filled(2, 4, all_bf16), gguf::TensorType::BF16);
  w.add("t.q8_0", filled(2, 64, all_q8_0), gguf::TensorType::Q8_0);
  w.add("t.vec", filled(1, 5, all_f32));
  w.add("t.3d", filled(6, 2, all_f32), gguf::TensorType::F32, {2, 3, 2});
  return w;
}

// ours_adapter.gguf's content (make_gguf_golden.sh's ours_side.cpp builds the same).
gguf::Writer ours_adapter_writer() {
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
  w.add("blk.0.attn_q.weight.lora_a", filled(4, 64, [](int k) { return (k % 13 - 6) * 0.125f; }));
  w.add("blk.0.attn_q.weight.lora_b", filled(8, 4, [](int k) { return (k - 16) * 0.0625f; }), gguf::TensorType::F16);
  w.add("blk.0.attn_k.weight.lora_a", filled(2, 64, [](int k) { return (k % 7 - 3) * 0.5f; }), gguf::TensorType::BF16);
  w.add("blk.0.attn_k.weight.lora_b",
        filled(3, 32, [](int k) { return (8.0f * (k % 32) - 127.0f) * std::ldexp(1.0f, -(k / 32 + 3)); }),
        gguf::TensorType::Q8_0);
  return w;
}

}  // namespace

// ---- ggml's own files ---------------------------------------------------------------

TEST_CASE("gguf: the type table matches ggml's ggml_blck_size and ggml_type_size for every type number",
          "[gguf][golden]") {
  std::ifstream in(gguf_dir + "/ggml_type_traits.txt");
  REQUIRE(in);
  std::string line;
  std::uint32_t seen = 0;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream fields(line);
    std::uint32_t number = 0, block = 0, size = 0;
    std::string name;
    fields >> number >> name >> block >> size;
    INFO(line);
    auto traits = gguf::type_traits(number);
    if (block == 0) {
      CHECK_FALSE(traits.has_value());
    } else {
      REQUIRE(traits.has_value());
      CHECK(std::string(traits->name) == name);
      CHECK(traits->block_size == block);
      CHECK(traits->type_size == size);
    }
    ++seen;
  }
  CHECK(seen == gguf::tensor_type_count);
  CHECK_FALSE(gguf::type_traits(gguf::tensor_type_count).has_value());
  CHECK(gguf::parse_tensor_type("q8_0") == gguf::TensorType::Q8_0);
  CHECK(gguf::parse_tensor_type("bf16") == gguf::TensorType::BF16);
  CHECK_FALSE(gguf::parse_tensor_type("Q8_0").has_value());
}

TEST_CASE("gguf: ggml_all_types.gguf, written by ggml, reads back every value exactly", "[gguf][golden]") {
  for (auto access : {gguf::Access::map, gguf::Access::read}) {
    auto f = gguf::File::open(gguf_dir + "/ggml_all_types.gguf", access);
    CHECK(f.version() == 3);
    CHECK(f.alignment() == 32);
    CHECK(f.metadata().size() == 26);
    CHECK(f.metadata()[0].key == "general.architecture");
    CHECK(f.get<std::string>("general.architecture") == "llama");
    CHECK(f.get<std::uint8_t>("test.u8") == 200);
    CHECK(f.get<std::int8_t>("test.i8") == -100);
    CHECK(f.get<std::uint16_t>("test.u16") == 60000);
    CHECK(f.get<std::int16_t>("test.i16") == -30000);
    CHECK(f.get<std::uint32_t>("test.u32") == 4000000000u);
    CHECK(f.get<std::int32_t>("test.i32") == -2000000000);
    CHECK(f.get<float>("test.f32") == 3.25f);
    CHECK(f.get<bool>("test.bool") == true);
    CHECK(f.get<std::string>("test.str") == "h\xc3\xa9llo GGUF");
    CHECK(f.get<std::uint64_t>("test.u64") == 1234567890123456789ull);
    CHECK(f.get<std::int64_t>("test.i64") == -1234567890123456789ll);
    CHECK(f.get<double>("test.f64") == -0.1);
    CHECK(f.value("test.arr_u8").array<std::uint8_t>() == std::vector<std::uint8_t>{0, 1, 255});
    CHECK(f.value("test.arr_i8").array<std::int8_t>() == std::vector<std::int8_t>{-128, 0, 127});
    CHECK(f.value("test.arr_u16").array<std::uint16_t>() == std::vector<std::uint16_t>{0, 65535});
    CHECK(f.value("test.arr_i16").array<std::int16_t>() == std::vector<std::int16_t>{-32768, 32767});
    CHECK(f.value("test.arr_u32").array<std::uint32_t>() == std::vector<std::uint32_t>{0, 4294967295u});
    CHECK(
        f.value("test.arr_i32").array<std::int32_t>() ==
        std::vector<std::int32_t>{std::numeric_limits<std::int32_t>::min(), std::numeric_limits<std::int32_t>::max()});
    CHECK(f.value("test.arr_f32").array<float>() == std::vector<float>{0.5f, -1.5f, 1e-3f});
    CHECK(f.value("test.arr_bool").array<bool>() == std::vector<bool>{true, false, true});
    CHECK(f.value("test.arr_str").array<std::string>() == std::vector<std::string>{"a", "",
                                                                                   "\xc3\xbcn\xc3\xaf"
                                                                                   "code"});
    CHECK(f.value("test.arr_u64").array<std::uint64_t>() ==
          std::vector<std::uint64_t>{0, std::numeric_limits<std::uint64_t>::max()});
    CHECK(
        f.value("test.arr_i64").array<std::int64_t>() ==
        std::vector<std::int64_t>{std::numeric_limits<std::int64_t>::min(), std::numeric_limits<std::int64_t>::max()});
    CHECK(f.value("test.arr_f64").array<double>() == std::vector<double>{0.25, -1e300});
    CHECK(f.value("test.arr_empty").type_text() == "arr[i32]");
    CHECK(f.value("test.arr_empty").size() == 0);
    CHECK(f.value("test.arr_str").element(2).get<std::string>() ==
          "\xc3\xbcn\xc3\xaf"
          "code");

    REQUIRE(f.tensors().size() == 6);
    CHECK(f.at("t.f32").ne == std::vector<std::uint64_t>{4, 3});
    CHECK(f.at("t.f32").shape() == std::vector<std::uint64_t>{3, 4});
    CHECK(f.at("t.q8_0").type == gguf::TensorType::Q8_0);
    CHECK(f.at("t.q8_0").nbytes == 4 * 34);
    CHECK(f.at("t.vec").ne == std::vector<std::uint64_t>{5});
    CHECK(f.at("t.3d").ne == std::vector<std::uint64_t>{2, 3, 2});
    CHECK(f.matrix<float>("t.f32") == filled(3, 4, all_f32));
    CHECK(f.matrix<float>("t.f16") == filled(2, 8, all_f16));
    CHECK(f.matrix<float>("t.bf16") == filled(2, 4, all_bf16));
    CHECK(f.matrix<float>("t.q8_0") == filled(2, 64, all_q8_0));
    CHECK(f.matrix<double>("t.q8_0") == filled(2, 64, all_q8_0).cast<double>());
    CHECK(f.matrix<float>("t.vec") == filled(1, 5, all_f32));
    CHECK_THAT(error_of([&] { f.matrix<float>("t.3d"); }),
               Contains("ggml_all_types.gguf: tensor \"t.3d\" has ne [2, 3, 2], a matrix needs at most 2 dimensions"));
    std::vector<float> flat(12);
    f.convert_into(f.at("t.3d"), flat.data());
    for (int k = 0; k < 12; ++k) CHECK(flat[static_cast<std::size_t>(k)] == all_f32(k));
    CHECK_THAT(error_of([&] { f.get<std::uint32_t>("test.u8"); }),
               Contains("ggml_all_types.gguf: key \"test.u8\" is u8, expected u32"));
    CHECK_THAT(error_of([&] { f.value("no.such.key"); }), Contains("ggml_all_types.gguf: no key \"no.such.key\""));
  }
}

TEST_CASE("gguf: our writer reproduces ggml_all_types.gguf byte for byte", "[gguf][golden]") {
  const Bytes ggml = lora_test::read_bytes(gguf_dir + "/ggml_all_types.gguf");
  REQUIRE(ggml.size() > 0);
  CHECK(all_types_writer().serialize() == ggml);
}

TEST_CASE("gguf: our f16, bf16 and q8_0 conversions and 64-byte alignment give ggml's bytes (ggml_rounding.gguf)",
          "[gguf][golden]") {
  const Bytes ggml = lora_test::read_bytes(gguf_dir + "/ggml_rounding.gguf");
  REQUIRE(ggml.size() > 0);
  gguf::Writer w;
  w.set("general.alignment", std::uint32_t{64});
  w.add("r.f16", filled(3, 32, rounding_x), gguf::TensorType::F16);
  w.add("r.bf16", filled(3, 32, rounding_x), gguf::TensorType::BF16);
  w.add("r.q8_0", filled(4, 32, [](int k) { return k < 96 ? rounding_x(k) : 0.0f; }), gguf::TensorType::Q8_0);
  w.add("r.f32_odd", filled(1, 3, rounding_x));
  CHECK(w.serialize() == ggml);

  // Read back: within half a step of each format (q8_0: d / 2 per block, d = amax / 127).
  auto f = gguf::File::from_bytes(ggml, "ggml_rounding.gguf");
  CHECK(f.alignment() == 64);
  CHECK(f.data_offset() % 64 == 0);
  for (const auto& t : f.tensors()) CHECK(t.offset % 64 == 0);
  const Mat x = filled(3, 32, rounding_x);
  CHECK((f.matrix<float>("r.f16") - x).cwiseAbs().maxCoeff() <= 8.0f / 2048);  // |x| < 8: f16 step 2^-10 · 8
  CHECK((f.matrix<float>("r.bf16") - x).cwiseAbs().maxCoeff() <= 8.0f / 256);
  const Mat q = f.matrix<float>("r.q8_0");
  for (lora::Index r = 0; r < 3; ++r) {
    const float d = x.row(r).cwiseAbs().maxCoeff() / 127;
    CHECK((q.row(r) - x.row(r)).cwiseAbs().maxCoeff() <= d * 0.5f + d * 127 / 1024);  // + d's own f16 rounding
  }
  CHECK(q.row(3).isZero(0));
}

TEST_CASE("gguf: ours_adapter.gguf, which ggml's reader checked, is what our writer writes today", "[gguf][golden]") {
  const Bytes ours = lora_test::read_bytes(gguf_dir + "/ours_adapter.gguf");
  REQUIRE(ours.size() > 0);
  CHECK(ours_adapter_writer().serialize() == ours);
  // What ggml's gguf_init_from_file found (make_gguf_golden.sh wrote the report).
  std::ifstream report(gguf_dir + "/ours_read_by_ggml.txt");
  std::string text((std::istreambuf_iterator<char>(report)), std::istreambuf_iterator<char>());
  CHECK_THAT(text, Contains("\n64 of 64 checks passed\n"));
  CHECK_THAT(text, !Contains("FAIL"));

  auto f = gguf::File::from_bytes(ours, "ours_adapter.gguf");
  CHECK(f.alignment() == 64);
  CHECK(f.get<float>("adapter.lora.alpha") == 16.0f);
  CHECK(f.get<std::string>("general.type") == "adapter");
  const auto& b = f.at("blk.0.attn_q.weight.lora_b");
  CHECK(b.ne == std::vector<std::uint64_t>{4, 8});  // B (O = 8, R = 4): ne = {R, O}
  CHECK(f.matrix<float>("blk.0.attn_q.weight.lora_b") == filled(8, 4, [](int k) { return (k - 16) * 0.0625f; }));
}

// ---- round trips -------------------------------------------------------------------------

TEST_CASE("gguf: every value type round-trips, nested arrays and NaN payloads included", "[gguf][roundtrip]") {
  float nan;
  const std::uint32_t nan_bits = 0x7fc01234u;
  std::memcpy(&nan, &nan_bits, 4);
  gguf::Writer w;
  w.set("u8", std::uint8_t{255});
  w.set("i8", std::int8_t{-128});
  w.set("u16", std::uint16_t{65535});
  w.set("i16", std::int16_t{-32768});
  w.set("u32", std::uint32_t{4294967295u});
  w.set("i32", std::int32_t{-2147483647 - 1});
  w.set("f32", nan);
  w.set("bool", false);
  w.set("str", std::string("with\0nul", 8));
  w.set("u64", std::uint64_t{1} << 63);
  w.set("i64", std::int64_t{-1});
  w.set("f64", -0.0);
  w.set("empty_str", "");
  w.set("arr_str", std::vector<std::string>{});
  w.set("nested", std::vector<gguf::Value>{std::vector<std::string>{"x", "y"}, std::vector<bool>{true},
                                           std::vector<gguf::Value>{std::vector<float>{1.5f}}});
  // Eight levels deep, the most the reader takes.
  gguf::Value deep = std::vector<std::uint8_t>{1};
  for (int i = 1; i < gguf::max_array_depth; ++i) deep = std::vector<gguf::Value>{deep};
  w.set("deep", deep);
  w.set("u8", std::uint8_t{254});  // replaced in place
  auto f = gguf::File::from_bytes(w.serialize());
  REQUIRE(f.metadata().size() == w.metadata().size());
  for (std::size_t i = 0; i < f.metadata().size(); ++i) {
    INFO(f.metadata()[i].key);
    CHECK(f.metadata()[i].key == w.metadata()[i].key);
    CHECK(f.metadata()[i].value == w.metadata()[i].value);
  }
  CHECK(f.metadata()[0].key == "u8");
  CHECK(f.get<std::uint8_t>("u8") == 254);
  float back = f.get<float>("f32");
  std::uint32_t back_bits;
  std::memcpy(&back_bits, &back, 4);
  CHECK(back_bits == nan_bits);
  CHECK(std::signbit(f.get<double>("f64")));
  CHECK(f.get<std::string>("str") == std::string("with\0nul", 8));
  CHECK(f.value("nested").type_text() == "arr[arr]");
  CHECK(f.value("nested").arrays()[2].arrays()[0].array<float>() == std::vector<float>{1.5f});
  CHECK(f.value("deep").depth() == gguf::max_array_depth);
  CHECK_THAT(error_of([&] { f.value("nested").array<float>(); }), Contains("the value is arr[arr], expected arr[f32]"));
}

TEST_CASE("gguf: f32, f16, bf16 and q8_0 tensors round-trip through a file, mapped and read", "[gguf][roundtrip]") {
  const fs::path dir = lora_test::scratch_dir("gguf-roundtrip");
  const Mat a = filled(5, 64, [](int k) { return std::sin(0.37f * k) * 3.0f; });
  gguf::Writer w;
  w.set("general.alignment", std::uint32_t{128});
  w.add("f32", a);
  w.add("f16", a, gguf::TensorType::F16);
  w.add("bf16", a, gguf::TensorType::BF16);
  w.add("q8_0", a, gguf::TensorType::Q8_0);
  w.add("col", Mat(a.col(0)));  // (5, 1): ne {1, 5}
  const std::string path = (dir / "t.gguf").string();
  w.save(path);
  CHECK(lora_test::count_files(dir) == 1);  // no temporary left behind
  for (auto access : {gguf::Access::map, gguf::Access::read}) {
    auto f = gguf::File::open(path, access);
    CHECK(f.matrix<float>("f32") == a);
    CHECK(f.matrix<float>("f16").isApprox(a, 1e-3f));
    CHECK((f.matrix<float>("f16") - a).cwiseAbs().maxCoeff() <= 3.0f / 2048);
    CHECK((f.matrix<float>("bf16") - a).cwiseAbs().maxCoeff() <= 3.0f / 256);
    CHECK((f.matrix<float>("q8_0") - a).cwiseAbs().maxCoeff() <= 3.0f / 127 * (0.5f + 127.0f / 1024));
    CHECK(f.at("col").ne == std::vector<std::uint64_t>{1, 5});
    CHECK(f.matrix<float>("col") == Mat(a.col(0)));
    for (const auto& t : f.tensors()) CHECK((f.data_offset() + t.offset) % 128 == 0);
    // Raw bytes through add_from / add_bytes: the same file again.
    gguf::Writer copy;
    for (const auto& kv : f.metadata()) copy.set(kv.key, kv.value);
    for (const auto& t : f.tensors()) copy.add_from(t.name, f, t);
    CHECK(copy.serialize() == lora_test::read_bytes(path));
  }
  // A quantised type ggml knows but this library does not convert: the bytes pass through, matrix() refuses.
  Bytes q4(2 * 18, 7);
  gguf::Writer raw;
  raw.add_bytes("q4", gguf::TensorType::Q4_0, {64}, q4.data(), q4.size());
  auto f = gguf::File::from_bytes(raw.serialize(), "q4.gguf");
  CHECK(std::memcmp(f.bytes(f.at("q4")), q4.data(), q4.size()) == 0);
  CHECK_THAT(error_of([&] { f.matrix<float>("q4"); }),
             Contains("q4.gguf: tensor \"q4\" is q4_0, expected one of f32, f16, bf16, q8_0"));
  fs::remove_all(dir);
}

TEST_CASE("gguf: q8_0 is ggml's quantize_row_q8_0_ref: d = amax / 127 as f16, q = roundf(x / d)", "[gguf]") {
  // A hand-computed block: amax 2.54 gives d = 0.02 (f16 0x251f = 0.0200042724609375), x = 0.03 gives
  // q = roundf(1.5) = 2 (half away from zero), -0.01 gives roundf(-0.5) = -1.
  float x[32] = {};
  x[0] = 2.54f;
  x[1] = 0.03f;
  x[2] = -0.01f;
  x[3] = -2.54f;
  std::uint8_t block[34];
  gguf::quantize_q8_0_block(x, block);
  CHECK((block[0] | (block[1] << 8)) == 0x251f);
  CHECK(static_cast<std::int8_t>(block[2]) == 127);
  CHECK(static_cast<std::int8_t>(block[3]) == 2);
  CHECK(static_cast<std::int8_t>(block[4]) == -1);
  CHECK(static_cast<std::int8_t>(block[5]) == -127);
  CHECK(block[6] == 0);
  float y[32];
  gguf::dequantize_q8_0_block(block, y);
  CHECK(y[0] == 127 * 0.0200042724609375f);
  CHECK(y[2] == -0.0200042724609375f);
  // All zeros: d = 0, every q 0.
  std::fill(x, x + 32, 0.0f);
  gguf::quantize_q8_0_block(x, block);
  CHECK(std::all_of(block, block + 34, [](std::uint8_t v) { return v == 0; }));
}

TEST_CASE("gguf: the writer refuses what the reader would refuse", "[gguf][writer]") {
  gguf::Writer w;
  CHECK_THAT(error_of([&] { w.set("", std::uint8_t{1}); }), Contains("the key is empty"));
  CHECK_THAT(error_of([&] { w.set("general.alignment", std::uint64_t{32}); }),
             Contains("general.alignment must be u32, got u64"));
  CHECK_THAT(error_of([&] { w.set("general.alignment", std::uint32_t{48}); }),
             Contains("general.alignment must be a power of two, got 48"));
  gguf::Value deep = std::vector<std::uint8_t>{1};
  for (int i = 0; i < gguf::max_array_depth; ++i) deep = std::vector<gguf::Value>{deep};
  CHECK_THAT(error_of([&] { w.set("deep", deep); }), Contains("arrays nest more than 8 levels deep"));
  CHECK_THAT(error_of([&] { gguf::Value(std::vector<gguf::Value>{std::uint8_t{1}}); }),
             Contains("an array of arrays holds a u8"));
  const Mat m = Mat::Ones(2, 32);
  CHECK_THAT(error_of([&] { w.add(std::string(64, 'n'), m); }),
             Contains("the name is 64 bytes, ggml allows at most 63"));
  w.add(std::string(63, 'n'), m);
  CHECK_THAT(error_of([&] { w.add(std::string(63, 'n'), m); }), Contains("a tensor of that name was added already"));
  CHECK_THAT(error_of([&] { w.add("q", Mat::Ones(2, 33), gguf::TensorType::Q8_0); }),
             Contains("gguf::Writer::add(\"q\"): q8_0 stores rows in blocks of 32 values, ne[0] is 33"));
  Mat bad = m;
  bad(1, 5) = std::numeric_limits<float>::infinity();
  CHECK_THAT(error_of([&] { w.add("q", bad, gguf::TensorType::Q8_0); }),
             Contains("value (1, 5) is inf, which q8_0 cannot store"));
  CHECK_THAT(error_of([&] { w.add("q", m, gguf::TensorType::Q4_0); }),
             Contains("type must be f32, f16, bf16 or q8_0, got q4_0"));
  CHECK_THAT(error_of([&] {
               w.add("q", m, gguf::TensorType::F32, {2, 2, 2, 2, 4});
             }),
             Contains("ne [2, 2, 2, 2, 4] has more than 4 dimensions"));
  CHECK_THAT(error_of([&] {
               w.add("q", m, gguf::TensorType::F32, {32, 3});
             }),
             Contains("ne [32, 3] holds 96 values, the matrix 64"));
  std::uint8_t byte = 0;
  CHECK_THAT(error_of([&] { w.add_bytes("q", gguf::TensorType::F32, {2}, &byte, 1); }),
             Contains("f32 [2] needs 8 bytes, got 1"));
  CHECK(w.size() == 1);
}

// ---- hostile files: one rule each ------------------------------------------------------

TEST_CASE("gguf hostile: the valid base file the hostile ones vary is accepted", "[gguf][hostile]") {
  auto f = gguf::File::from_bytes(valid_image());
  CHECK(f.tensors().size() == 1);
  CHECK(f.matrix<float>("t") == Mat::Zero(1, 4));
}

TEST_CASE("gguf hostile: a file cut short anywhere before its last tensor's end is refused", "[gguf][hostile]") {
  for (const char* name : {"ggml_all_types.gguf", "ggml_rounding.gguf", "ours_adapter.gguf"}) {
    const Bytes whole = lora_test::read_bytes(gguf_dir + "/" + name);
    const auto f = gguf::File::from_bytes(whole);
    std::uint64_t end = 0;
    for (const auto& t : f.tensors()) end = std::max(end, f.data_offset() + t.offset + t.nbytes);
    for (std::size_t n = 0; n < end; ++n) {
      INFO(name << " cut to " << n << " bytes");
      const std::string message = refused(Bytes(whole.begin(), whole.begin() + static_cast<long>(n)));
      CHECK((message.find("file is truncated") != std::string::npos ||
             message.find("runs past the end of the file") != std::string::npos ||
             message.find("run past the end of the data section") != std::string::npos ||
             message.find("holds at most") != std::string::npos ||
             message.find("needs at least") != std::string::npos));
    }
  }
  CHECK_THAT(
      refused(Bytes{'G', 'G'}),
      Contains("bad.gguf: file is truncated: the magic \"GGUF\" at byte 0 needs 4 bytes, the file ends at byte 2"));
  Image i;
  i.header(0, 1).key("k", u32_type).num<std::uint16_t>(1);
  CHECK_THAT(refused(i.b), Contains("file is truncated: key \"k\": the u32 value at byte 37 needs 4 bytes, the file "
                                    "ends at byte 39"));
}

TEST_CASE("gguf hostile: not a GGUF file", "[gguf][hostile]") {
  Bytes b = valid_image();
  b[3] = 'L';
  CHECK_THAT(refused(b), Contains("bad.gguf: not a GGUF file: it starts with \"GGUL\", expected \"GGUF\""));
}

TEST_CASE("gguf hostile: versions other than 3", "[gguf][hostile]") {
  auto with_version = [](std::uint32_t v) {
    Image i;
    i.header(0, 0, v);
    return refused(i.b);
  };
  CHECK_THAT(with_version(1), Contains("GGUF version 1 is not supported, only version 3"));
  CHECK_THAT(with_version(2), Contains("GGUF version 2 is not supported, only version 3"));
  CHECK_THAT(with_version(4), Contains("GGUF version 4, expected 3"));
  CHECK_THAT(with_version(0), Contains("GGUF version 0, expected 3"));
  CHECK_THAT(with_version(0x03000000u), Contains("GGUF version 50331648: a big-endian file?"));
}

TEST_CASE("gguf hostile: a tensor count that is negative or more than the file can hold", "[gguf][hostile]") {
  Image neg;
  neg.header(-1, 0);
  CHECK_THAT(refused(neg.b), Contains("the tensor count is -1, expected 0 or more"));
  Image big;
  big.header(1000000000000, 0).zeros(100);
  CHECK_THAT(refused(big.b), Contains("the tensor count is 1000000000000, but the rest of the file (108 bytes) holds "
                                      "at most 4 tensor infos of at least 24 bytes"));
}

TEST_CASE("gguf hostile: a key-value count that is negative or more than the file can hold", "[gguf][hostile]") {
  Image neg;
  neg.header(0, -5);
  CHECK_THAT(refused(neg.b), Contains("the key-value count is -5, expected 0 or more"));
  Image big;
  big.header(0, std::numeric_limits<std::int64_t>::max()).zeros(20);
  CHECK_THAT(refused(big.b), Contains("the key-value count is 9223372036854775807, but the rest of the file (20 bytes) "
                                      "holds at most 1 key-value pairs of at least 14 bytes"));
}

TEST_CASE("gguf hostile: a string longer than the rest of the file", "[gguf][hostile]") {
  Image key;
  key.header(0, 1).num<std::uint64_t>(std::uint64_t{1} << 62).zeros(16);
  CHECK_THAT(refused(key.b), Contains("key-value pair 0 of 1: the key: a string of 4611686018427387904 bytes at byte "
                                      "32 runs past the end of the file (16 bytes left)"));
  Image value;
  value.header(0, 1).key("k", str_type).num<std::uint64_t>(5).raw("abcd", 4);
  CHECK_THAT(refused(value.b), Contains("key \"k\": a string of 5 bytes at byte 45 runs past the end of the file (4 "
                                        "bytes left)"));
}

TEST_CASE("gguf hostile: an empty key", "[gguf][hostile]") {
  Image i;
  i.header(0, 1).key("", u8_type).num<std::uint8_t>(0).zeros(8);
  CHECK_THAT(refused(i.b), Contains("key-value pair 0 of 1: the key is empty"));
}

TEST_CASE("gguf hostile: a duplicate key", "[gguf][hostile]") {
  Image i;
  i.header(0, 2).key("k", u8_type).num<std::uint8_t>(1).key("k", u8_type).num<std::uint8_t>(2);
  CHECK_THAT(refused(i.b), Contains("bad.gguf: duplicate key \"k\" (key-value pairs 0 and 1)"));
}

TEST_CASE("gguf hostile: an unknown value type", "[gguf][hostile]") {
  for (std::int32_t type : {13, -1, 1000}) {
    Image i;
    i.header(0, 1).key("k", type).zeros(8);
    CHECK_THAT(refused(i.b),
               Contains("key \"k\": unknown value type " + std::to_string(type) + " (GGUF's value types are 0 to 12)"));
  }
  Image array;
  array.header(0, 1).key("k", arr_type).num<std::int32_t>(42).num<std::uint64_t>(0);
  CHECK_THAT(refused(array.b), Contains("key \"k\": array of unknown value type 42"));
}

TEST_CASE("gguf hostile: an array longer than the rest of the file", "[gguf][hostile]") {
  Image i;
  i.header(0, 1).key("k", arr_type).num<std::int32_t>(u32_type).num<std::uint64_t>(1000).zeros(12);
  CHECK_THAT(refused(i.b), Contains("key \"k\": an array of 1000 u32 needs at least 4000 bytes, the file has 12 left"));
  Image huge;
  huge.header(0, 1).key("k", arr_type).num<std::int32_t>(u64_type).num<std::uint64_t>(std::uint64_t{1} << 62);
  CHECK_THAT(refused(huge.b), Contains("an array of 4611686018427387904 u64 needs at least more than 2^64 bytes"));
  Image strings;
  strings.header(0, 1).key("k", arr_type).num<std::int32_t>(str_type).num<std::uint64_t>(3).str("a").zeros(4);
  CHECK_THAT(refused(strings.b), Contains("an array of 3 str needs at least 24 bytes, the file has 13 left"));
}

TEST_CASE("gguf hostile: a bool that is neither 0 nor 1", "[gguf][hostile]") {
  Image scalar;
  scalar.header(0, 1).key("k", bool_type).num<std::uint8_t>(2);
  CHECK_THAT(refused(scalar.b), Contains("key \"k\": bool value 2 at byte 37, expected 0 or 1"));
  Image array;
  array.header(0, 1).key("k", arr_type).num<std::int32_t>(bool_type).num<std::uint64_t>(3);
  array.num<std::uint8_t>(1).num<std::uint8_t>(0).num<std::uint8_t>(255);
  CHECK_THAT(refused(array.b), Contains("key \"k\"[2]: bool value 255 at byte 51, expected 0 or 1"));
}

TEST_CASE("gguf hostile: arrays nested more than 8 deep", "[gguf][hostile]") {
  auto nested = [](int levels) {
    Image i;
    i.header(0, 1).key("k", arr_type);
    for (int l = 1; l < levels; ++l) i.num<std::int32_t>(arr_type).num<std::uint64_t>(1);
    i.num<std::int32_t>(u8_type).num<std::uint64_t>(1).num<std::uint8_t>(9);
    return i.b;
  };
  CHECK(gguf::File::from_bytes(nested(8)).value("k").depth() == 8);
  CHECK_THAT(refused(nested(9)), Contains("key \"k\"[0][0][0][0][0][0][0][0]: arrays nest more than 8 levels deep"));
  CHECK_THAT(refused(nested(100000)), Contains("arrays nest more than 8 levels deep"));
}

TEST_CASE("gguf hostile: general.alignment of the wrong type, zero or not a power of two", "[gguf][hostile]") {
  Image type;
  type.header(0, 1).key("general.alignment", u64_type).num<std::uint64_t>(32);
  CHECK_THAT(refused(type.b), Contains("general.alignment must be u32, got u64"));
  for (std::uint32_t a : {0u, 48u}) {
    Image i;
    i.header(0, 1).key("general.alignment", u32_type).num(a);
    CHECK_THAT(refused(i.b), Contains("general.alignment is " + std::to_string(a) + ", expected a power of two"));
  }
}

TEST_CASE("gguf hostile: a tensor name of 64 bytes or more", "[gguf][hostile]") {
  Image i;
  i.header(1, 0).tensor(std::string(64, 'x'), {4}, f32_type, 0).pad().zeros(16);
  CHECK_THAT(refused(i.b), Contains("tensor info 0 of 1: the name \"" + std::string(64, 'x') +
                                    "\" is 64 bytes, ggml allows at most 63"));
}

TEST_CASE("gguf hostile: a duplicate tensor name", "[gguf][hostile]") {
  Image i;
  i.header(2, 0).tensor("t", {4}, f32_type, 0).tensor("t", {4}, f32_type, 32).pad().zeros(64);
  CHECK_THAT(refused(i.b), Contains("duplicate tensor name \"t\" (tensor infos 0 and 1)"));
}

TEST_CASE("gguf hostile: more than 4 dimensions", "[gguf][hostile]") {
  Image i;
  i.header(1, 0).tensor("t", {1, 1, 1, 1, 1}, f32_type, 0).pad().zeros(32);
  CHECK_THAT(refused(i.b), Contains("tensor \"t\": 5 dimensions, GGUF allows at most 4"));
}

TEST_CASE("gguf hostile: a negative dimension", "[gguf][hostile]") {
  Image i;
  i.header(1, 0).tensor("t", {4, -3}, f32_type, 0).pad().zeros(32);
  CHECK_THAT(refused(i.b), Contains("tensor \"t\": ne[1] is -3, expected 0 or more"));
}

TEST_CASE("gguf hostile: more elements than a signed 64-bit count holds", "[gguf][hostile]") {
  Image i;
  i.header(1, 0).tensor("t", {std::int64_t{1} << 32, std::int64_t{1} << 32}, f32_type, 0).pad().zeros(32);
  CHECK_THAT(refused(i.b), Contains("tensor \"t\": ne [4294967296, 4294967296] has more elements than a signed 64-bit "
                                    "count holds"));
  Image zero;  // a zero dimension makes any other harmless
  zero.header(1, 0).tensor("t", {0, std::int64_t{1} << 62, std::int64_t{1} << 62}, f32_type, 0).pad();
  CHECK(gguf::File::from_bytes(zero.b).at("t").nbytes == 0);
}

TEST_CASE("gguf hostile: an unknown or removed ggml type", "[gguf][hostile]") {
  auto with_type = [](std::int32_t type) {
    Image i;
    i.header(1, 0).tensor("t", {32}, type, 0).pad().zeros(256);
    return refused(i.b);
  };
  CHECK_THAT(with_type(4), Contains("tensor \"t\": unknown ggml type 4 (removed from ggml), expected one of the ggml "
                                    "types 0 to 42"));
  CHECK_THAT(with_type(31), Contains("unknown ggml type 31 (removed from ggml)"));
  CHECK_THAT(with_type(43), Contains("tensor \"t\": unknown ggml type 43, expected"));
  CHECK_THAT(with_type(-1), Contains("tensor \"t\": unknown ggml type -1, expected"));
}

TEST_CASE("gguf hostile: a row that is not whole blocks of a quantised type", "[gguf][hostile]") {
  Image i;
  i.header(1, 0).tensor("t", {33, 2}, q8_0_type, 0).pad().zeros(128);
  CHECK_THAT(refused(i.b), Contains("tensor \"t\": q8_0 stores rows in blocks of 32 values, ne[0] is 33"));
}

TEST_CASE("gguf hostile: more bytes than 64 bits can count", "[gguf][hostile]") {
  Image i;  // f64 (type 28): 2^62 elements are 2^65 bytes
  i.header(1, 0).tensor("t", {std::int64_t{1} << 62}, 28, 0).pad();
  CHECK_THAT(refused(i.b), Contains("tensor \"t\": f64 [4611686018427387904] takes more bytes than 64 bits can count"));
}

TEST_CASE("gguf hostile: an offset that is not a multiple of the alignment", "[gguf][hostile]") {
  Image i;
  i.header(1, 0).tensor("t", {4}, f32_type, 16).pad().zeros(64);
  CHECK_THAT(refused(i.b), Contains("tensor \"t\": offset 16 is not a multiple of the alignment 32"));
}

TEST_CASE("gguf hostile: a tensor past the end of the data section", "[gguf][hostile]") {
  Image i;
  i.header(1, 0).tensor("t", {8}, f32_type, 0).pad().zeros(16);
  CHECK_THAT(refused(i.b), Contains("tensor \"t\": 32 bytes at offset 0 run past the end of the data section (16 "
                                    "bytes from byte 64)"));
  Image far;  // offset + size would wrap around 2^64
  far.header(1, 0).tensor("t", {8}, f32_type, std::uint64_t{0} - 32).pad().zeros(32);
  CHECK_THAT(refused(far.b), Contains("tensor \"t\": 32 bytes at offset 18446744073709551584 run past the end"));
}

TEST_CASE("gguf hostile: tensors that overlap", "[gguf][hostile]") {
  Image i;
  i.header(2, 0).tensor("a", {16}, f32_type, 0).tensor("b", {4}, f32_type, 32).pad().zeros(64);
  CHECK_THAT(refused(i.b), Contains("tensors \"a\" (bytes [0, 64)) and \"b\" (bytes [32, 48)) of the data section "
                                    "overlap"));
  Image order;  // listed out of order, overlapping: found all the same
  order.header(2, 0).tensor("b", {4}, f32_type, 32).tensor("a", {16}, f32_type, 0).pad().zeros(64);
  CHECK_THAT(refused(order.b), Contains("tensors \"a\" (bytes [0, 64)) and \"b\" (bytes [32, 48))"));
  Image apart;  // out of order and apart: fine (ggml itself wants them packed in order)
  apart.header(2, 0).tensor("b", {4}, f32_type, 64).tensor("a", {16}, f32_type, 0).pad().zeros(96);
  CHECK(gguf::File::from_bytes(apart.b).tensors().size() == 2);
}

TEST_CASE("gguf hostile: a data section that starts past the end of the file", "[gguf][hostile]") {
  Image i;
  i.header(1, 0).tensor("t", {0}, f32_type, 0);  // 57 bytes; the data would start at 64
  CHECK_THAT(refused(i.b), Contains("file is truncated: the data section starts at byte 64 (padded to the alignment "
                                    "32), the file ends at byte 57"));
}

TEST_CASE("gguf hostile: names from the file reach messages escaped", "[gguf][hostile]") {
  Image i;
  i.header(0, 2).key("a\x1b[2Jb", u8_type).num<std::uint8_t>(1).key("a\x1b[2Jb", u8_type).num<std::uint8_t>(1);
  CHECK_THAT(refused(i.b), Contains("duplicate key \"a\\x1b[2Jb\""));
}

TEST_CASE("gguf hostile: Access::read gives the same refusals and notices a file that shrinks", "[gguf][hostile]") {
  const fs::path dir = lora_test::scratch_dir("gguf-read");
  Image i;
  i.header(1, 0).tensor("t", {8}, f32_type, 0).pad().zeros(16);
  lora_test::write_text(dir / "bad.gguf", std::string(i.b.begin(), i.b.end()));
  CHECK_THAT(error_of([&] { gguf::File::open((dir / "bad.gguf").string(), gguf::Access::read); }),
             Contains("bad.gguf: tensor \"t\": 32 bytes at offset 0 run past the end of the data section"));
  const Bytes good = valid_image();
  lora_test::write_text(dir / "good.gguf", std::string(good.begin(), good.end()));
  auto f = gguf::File::open((dir / "good.gguf").string(), gguf::Access::read);
  CHECK_THAT(error_of([&] { f.bytes(f.at("t")); }), Contains("opened with Access::read, which maps nothing"));
  fs::resize_file(dir / "good.gguf", 40);
  CHECK_THAT(error_of([&] { f.matrix<float>("t"); }), Contains("good.gguf: the file changed while being read"));
  CHECK_THAT(error_of([&] { gguf::File::open((dir / "missing.gguf").string()); }), Contains("cannot open"));
  fs::remove_all(dir);
}

// One value as @huggingface/gguf recorded it (tests/golden/read_with_hf_gguf.sh): numbers as JSON numbers, 64-bit
// integers as decimal strings, f32 widened to double, NaN / infinities / -0 as strings.
bool same_as_recorded(const gguf::Value& v, const nlohmann::json& j) {
  auto as_double = [&](double x) {
    if (j.is_string()) {
      const std::string t = j.get<std::string>();
      return (t == "nan" && std::isnan(x)) || (t == "inf" && x == INFINITY) || (t == "-inf" && x == -INFINITY) ||
             (t == "-0" && x == 0 && std::signbit(x));
    }
    return j.is_number() && j.get<double>() == x;
  };
  switch (v.type()) {
    case gguf::ValueType::UINT8:
      return j == v.get<std::uint8_t>();
    case gguf::ValueType::INT8:
      return j == v.get<std::int8_t>();
    case gguf::ValueType::UINT16:
      return j == v.get<std::uint16_t>();
    case gguf::ValueType::INT16:
      return j == v.get<std::int16_t>();
    case gguf::ValueType::UINT32:
      return j == v.get<std::uint32_t>();
    case gguf::ValueType::INT32:
      return j == v.get<std::int32_t>();
    case gguf::ValueType::UINT64:
      return j == std::to_string(v.get<std::uint64_t>());
    case gguf::ValueType::INT64:
      return j == std::to_string(v.get<std::int64_t>());
    case gguf::ValueType::FLOAT32:
      return as_double(v.get<float>());
    case gguf::ValueType::FLOAT64:
      return as_double(v.get<double>());
    case gguf::ValueType::BOOL:
      return j == v.get<bool>();
    case gguf::ValueType::STRING:
      return j == v.get<std::string>();
    case gguf::ValueType::ARRAY: {
      if (!j.is_array() || j.size() != v.size()) return false;
      for (std::size_t i = 0; i < v.size(); ++i)
        if (!same_as_recorded(v.element(i), j[i])) return false;
      return true;
    }
  }
  return false;
}

TEST_CASE("gguf: an independent reader (@huggingface/gguf) read every file here as our reader does", "[gguf]") {
  // Files written by ggml and by our writer (ours_adapter.gguf, adapters/*.gguf), read by the npm package: the
  // same version, keys, value types, values, tensor names, ne, types and offsets as our reader finds.
  std::ifstream in(gguf_dir + "/read_by_hf_gguf.json");
  const auto record = nlohmann::json::parse(in);
  CHECK(record.at("read_by").get<std::string>().rfind("@huggingface/gguf@", 0) == 0);
  int files = 0;
  for (const auto& [path, seen] : record.items()) {
    if (path == "read_by") continue;
    CAPTURE(path);
    ++files;
    REQUIRE_FALSE(seen.contains("error"));
    const auto file = gguf::File::open(gguf_dir + "/" + path);
    CHECK(seen.at("version") == file.version());
    CHECK(seen.at("tensor_data_offset") == std::to_string(file.data_offset()));
    const auto& metadata = seen.at("metadata");
    REQUIRE(metadata.size() == file.metadata().size());
    for (std::size_t i = 0; i < metadata.size(); ++i) {
      const auto& kv = file.metadata()[i];
      CAPTURE(kv.key);
      CHECK(metadata[i].at("key") == kv.key);
      CHECK(metadata[i].at("type") == static_cast<std::uint32_t>(kv.value.type()));
      if (kv.value.is_array())
        CHECK(metadata[i].at("element_type") == static_cast<std::uint32_t>(kv.value.element_type()));
      CHECK(same_as_recorded(kv.value, metadata[i].at("value")));
    }
    const auto& tensors = seen.at("tensors");
    REQUIRE(tensors.size() == file.tensors().size());
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      const auto& t = file.tensors()[i];
      CAPTURE(t.name);
      CHECK(tensors[i].at("name") == t.name);
      CHECK(tensors[i].at("n_dims") == t.ne.size());
      REQUIRE(tensors[i].at("ne").size() == t.ne.size());
      for (std::size_t d = 0; d < t.ne.size(); ++d) CHECK(tensors[i].at("ne")[d] == std::to_string(t.ne[d]));
      CHECK(tensors[i].at("type") == static_cast<std::uint32_t>(t.type));
      CHECK(tensors[i].at("offset") == std::to_string(t.offset));
      CHECK(tensors[i].at("data_offset") == std::to_string(file.data_offset() + t.offset));
    }
  }
  CHECK(files == 10);  // 3 here, 7 in adapters/
}

}  // namespace unit_gguf
