// safetensors reader and writer: the reference implementation's own byte
// vectors, the fixture files, half-precision conversion, round trips, atomic
// saves, and one test per hostile header, each asserting its own message.
#include <catch2/catch.hpp>
#include <lora/safetensors.hpp>

#include <cstdint>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

#include "test_files.hpp"

// Everything below is in a namespace of its own, so the test files can be compiled together (CMake's
// UNITY_BUILD, tests/CMakeLists.txt) without their helpers clashing.
namespace unit_safetensors {

using Catch::Contains;
namespace st = lora::safetensors;
namespace fs = std::filesystem;

namespace {

using Bytes = std::vector<std::uint8_t>;

// A file image: the length prefix (n, or the header's size), the header text, then `data` bytes.
Bytes image(const std::string& header, std::size_t data_bytes = 0, std::uint64_t n = UINT64_MAX) {
  if (n == UINT64_MAX) n = header.size();
  Bytes b(8);
  for (int i = 0; i < 8; ++i) b[i] = static_cast<std::uint8_t>(n >> (8 * i));
  b.insert(b.end(), header.begin(), header.end());
  b.insert(b.end(), data_bytes, 0);
  return b;
}

std::string refused(const Bytes& b) {
  try {
    st::File::from_bytes(b, "bad.safetensors");
  } catch (const lora::format_error& e) {
    return e.what();
  }
  return "accepted";
}

const std::string data_dir = LORA_TEST_DATA_DIR;

}  // namespace

TEST_CASE("safetensors writer reproduces the reference implementation's bytes", "[safetensors]") {
  // safetensors/src/tensor.rs, test_serialization: "attn.0", F32, shape [1, 2, 3], values 0..5.
  const Bytes expected = {
      64,  0,  0,   0,  0,   0,  0,   0,   123, 34,  97,  116, 116, 110, 46,  48, 34, 58, 123, 34, 100, 116, 121, 112,
      101, 34, 58,  34, 70,  51, 50,  34,  44,  34,  115, 104, 97,  112, 101, 34, 58, 91, 49,  44, 50,  44,  51,  93,
      44,  34, 100, 97, 116, 97, 95,  111, 102, 102, 115, 101, 116, 115, 34,  58, 91, 48, 44,  50, 52,  93,  125, 125,
      0,   0,  0,   0,  0,   0,  128, 63,  0,   0,   0,   64,  0,   0,   64,  64, 0,  0,  128, 64, 0,   0,   160, 64};
  lora::Matrix<float> m(1, 6);
  m << 0, 1, 2, 3, 4, 5;
  st::Writer w;
  w.add("attn.0", m, st::Dtype::F32, {1, 2, 3});
  CHECK(w.serialize() == expected);

  // test_empty: no tensors, then no tensors with metadata {"framework": "pt"}.
  CHECK(st::Writer().serialize() == Bytes{8, 0, 0, 0, 0, 0, 0, 0, 123, 125, 32, 32, 32, 32, 32, 32});
  st::Writer with_metadata;
  with_metadata.set_metadata("framework", "pt");
  const Bytes expected_metadata = {40,  0,   0,   0,  0,  0,  0,   0,   123, 34,  95,  95,  109, 101, 116, 97,
                                   100, 97,  116, 97, 95, 95, 34,  58,  123, 34,  102, 114, 97,  109, 101, 119,
                                   111, 114, 107, 34, 58, 34, 112, 116, 34,  125, 125, 32,  32,  32,  32,  32};
  CHECK(with_metadata.serialize() == expected_metadata);

  auto parsed = st::File::from_bytes(expected);
  REQUIRE(parsed.tensors().size() == 1);
  CHECK(parsed.tensors()[0].shape == std::vector<std::uint64_t>{1, 2, 3});
  CHECK_FALSE(parsed.has_metadata());
}

TEST_CASE("safetensors reads the fixture written by another tool", "[safetensors]") {
  auto f = st::File::open(data_dir + "/safetensors/model.safetensors");
  REQUIRE(f.tensors().size() == 2);
  CHECK(f.at("weight1").dtype == st::Dtype::F64);
  CHECK(f.at("weight2").shape == std::vector<std::uint64_t>{16, 16});
  // Values read with Python's struct module from the same file.
  auto w1 = f.matrix<double>("weight1");
  CHECK(w1(0, 0) == 0.08001627472781947);
  CHECK(w1(0, 1) == 0.7158429049744487);
  auto w2 = f.view<double>("weight2");
  CHECK(w2(0, 0) == 0.16715496979848254);
  CHECK(w2(15, 15) == 0.4085505781254526);
  CHECK(f.matrix<float>("weight2")(15, 15) == static_cast<float>(0.4085505781254526));
  CHECK_THROWS_WITH(f.view<float>("weight1"), Contains("is F64, a view needs F32"));
  CHECK_THROWS_WITH(f.at("weight3"), Contains("no tensor named \"weight3\""));
}

TEST_CASE("safetensors refuses the hostile fixture with the header-length error", "[safetensors][hostile]") {
  // Its length field says 1000; the file has 88 bytes.
  const std::string path = data_dir + "/safetensors/abuse_attempt_1.safetensors";
  CHECK_THROWS_WITH(st::File::open(path), Contains("abuse_attempt_1.safetensors: header length 1,000 runs past the end "
                                                   "of the file (88 bytes"));
}

TEST_CASE("half and bfloat16 conversions round to nearest even", "[safetensors]") {
  // Bit patterns as torch 1.13 gives them (tests/golden/make_adapter_golden.py checks the same cases).
  CHECK(st::float_to_half(1.0f) == 0x3c00);
  CHECK(st::float_to_half(-2.0f) == 0xc000);
  CHECK(st::float_to_half(65504.0f) == 0x7bff);
  CHECK(st::float_to_half(65519.0f) == 0x7bff);  // below the halfway point to 65536
  CHECK(st::float_to_half(65520.0f) == 0x7c00);  // halfway, odd mantissa: rounds up to inf
  CHECK(st::float_to_half(1e-8f) == 0x0000);
  CHECK(st::float_to_half(5.9604645e-8f) == 0x0001);   // smallest subnormal
  CHECK(st::float_to_half(2.98023224e-8f) == 0x0000);  // exactly half of it: ties to even (0)
  CHECK(st::float_to_half(1.0009765625f) == 0x3c01);
  CHECK(st::float_to_half(1.00048828125f) == 0x3c00);  // tie between 0x3c00 and 0x3c01: even
  CHECK(st::float_to_half(1.00146484375f) == 0x3c02);  // tie between 0x3c01 and 0x3c02: even
  CHECK(st::float_to_half(std::numeric_limits<float>::infinity()) == 0x7c00);
  CHECK((st::float_to_half(std::numeric_limits<float>::quiet_NaN()) & 0x7c00) == 0x7c00);
  CHECK((st::float_to_half(std::numeric_limits<float>::quiet_NaN()) & 0x03ff) != 0);
  for (std::uint32_t h = 0; h < 0x10000; ++h) {  // every finite half survives half -> float -> half
    if ((h & 0x7c00) == 0x7c00) continue;
    REQUIRE(st::float_to_half(st::half_to_float(static_cast<std::uint16_t>(h))) == h);
  }
  CHECK(st::half_to_float(0x0001) == 5.9604644775390625e-8f);
  CHECK(st::half_to_float(0x8400) == -6.103515625e-5f);

  CHECK(st::float_to_bf16(1.0f) == 0x3f80);
  CHECK(st::float_to_bf16(1.00390625f) == 0x3f80);  // tie: even
  CHECK(st::float_to_bf16(1.01171875f) == 0x3f82);  // tie: even (up)
  CHECK(st::float_to_bf16(3.4e38f) == 0x7f80);      // rounds past the largest bf16
  CHECK(st::bf16_to_float(0xc049) == -3.140625f);
  CHECK((st::float_to_bf16(std::numeric_limits<float>::quiet_NaN()) & 0x7fc0) == 0x7fc0);
}

TEMPLATE_TEST_CASE("safetensors round trip in every float dtype", "[safetensors]", float, double) {
  lora::Matrix<TestType> a(3, 5);
  for (lora::Index i = 0; i < a.size(); ++i) a.data()[i] = static_cast<TestType>(0.25 * i - 1.5);
  lora::Matrix<TestType> bias(1, 4);
  bias << 1, -2, 0.5, 3;
  st::Writer w;
  w.set_metadata("format", "pt");
  w.add("f32", a, st::Dtype::F32);
  w.add("f64", a, st::Dtype::F64);
  w.add("f16", a, st::Dtype::F16);
  w.add("bf16", a, st::Dtype::BF16);
  w.add("bias", bias, st::Dtype::F32, {4});
  auto bytes = w.serialize();
  CHECK((bytes.size() - 8 - w.header().size()) == 15 * (4 + 8 + 2 + 2) + 4 * 4);
  CHECK(w.header().size() % 8 == 0);

  auto f = st::File::from_bytes(bytes);
  CHECK(f.metadata().at("format") == "pt");
  // The reference order: F64 first, then F32 by name, then BF16, then F16.
  std::vector<std::string> names;
  for (const auto& t : f.tensors()) names.push_back(t.name);
  CHECK(names == std::vector<std::string>{"f64", "bias", "f32", "bf16", "f16"});
  for (const char* name : {"f32", "f64", "f16", "bf16"}) CHECK(f.matrix<TestType>(name) == a);  // all exact
  CHECK(f.at("bias").shape == std::vector<std::uint64_t>{4});
  CHECK(f.matrix<TestType>("bias") == bias);
  CHECK(f.view<float>("f32") == a.template cast<float>());
}

TEST_CASE("safetensors writer refuses duplicate and reserved names", "[safetensors]") {
  st::Writer w;
  lora::Matrix<float> m = lora::Matrix<float>::Zero(2, 2);
  w.add("a", m);
  CHECK_THROWS_WITH(w.add("a", m), Contains("tensor \"a\" added twice"));
  CHECK_THROWS_WITH(w.add("__metadata__", m), Contains("may not be named \"__metadata__\""));
  CHECK_THROWS_WITH(w.add("b", m, st::Dtype::F32, {3}), Contains("shape [3] holds 3 values, the matrix 4"));
  CHECK_THROWS_AS(w.add("c", m, st::Dtype::I32), lora::config_error);
  CHECK(w.size() == 1);
}

TEST_CASE("safetensors save is atomic: a failed write leaves the old file", "[safetensors][atomic]") {
  fs::path dir = lora_test::scratch_dir("atomic");
  const std::string path = (dir / "weights.safetensors").string();
  lora::Matrix<float> small = lora::Matrix<float>::Constant(2, 2, 1.0f);
  st::Writer good;
  good.add("w", small);
  good.save(path);
  const Bytes before = lora_test::read_bytes(path);
  REQUIRE(st::File::open(path).matrix<float>("w") == small);

  // A file-size limit makes the kernel fail the write part-way (EFBIG), as a full disk would.
  lora::Matrix<float> big = lora::Matrix<float>::Constant(512, 512, 2.0f);  // 1 MiB
  st::Writer large;
  large.add("w", big);
  std::string message;
  {
    lora_test::FileSizeLimit limit(64 * 1024);
    REQUIRE(limit.ok());
    try {
      large.save(path);
    } catch (const lora::io_error& e) {
      message = e.what();
    }
  }

  CHECK_THAT(message, Contains("weights.safetensors: the file would be larger than the process's file-size limit"));
  CHECK(lora_test::read_bytes(path) == before);
  CHECK(lora_test::count_files(dir) == 1);  // the temporary file is gone

  large.save(path);  // without the limit it goes through and replaces the file
  CHECK(st::File::open(path).matrix<float>("w") == big);
  CHECK_THROWS_WITH(good.save((dir / "missing" / "x.safetensors").string()),
                    Contains("cannot create a temporary file in"));
  fs::remove_all(dir);
}

// ---- hostile headers: one case each, each with its own message ---------------------

TEST_CASE("hostile: file shorter than 8 bytes", "[safetensors][hostile]") {
  CHECK_THAT(refused(Bytes{1, 2, 3}), Contains("file is 3 bytes, shorter than the 8-byte header length"));
  CHECK_THAT(refused(Bytes{}), Contains("file is 0 bytes"));
}

TEST_CASE("hostile: header length over the limit", "[safetensors][hostile]") {
  CHECK_THAT(refused(image("{}", 0, 100'000'001)), Contains("header length 100,000,001 exceeds the limit"));
  CHECK_THAT(refused(image("{}", 0, UINT64_MAX - 1)), Contains("exceeds the limit of 100,000,000 bytes"));
}

TEST_CASE("hostile: header length past the end of the file", "[safetensors][hostile]") {
  CHECK_THAT(refused(image("{}      ", 0, 9)), Contains("header length 9 runs past the end of the file (16 bytes"));
}

TEST_CASE("hostile: a file of another kind is named as such, not as an absurd header length",
          "[safetensors][hostile]") {
  const std::string png = "\x89PNG\r\n\x1a\n\0\0\0\rIHDR";
  CHECK_THAT(refused(Bytes(png.begin(), png.end())),
             Contains("not a safetensors file: it does not start with a header length and a JSON header (its first 8 "
                      "bytes, \"\\x89PNG\\r\\n\\x1a\\n\", would claim a header of 727,905,341,920,923,785 bytes"));
  const std::string text = "hello, world: not tensors";
  CHECK_THAT(refused(Bytes(text.begin(), text.end())), Contains("not a safetensors file"));
}

TEST_CASE("hostile: header not UTF-8", "[safetensors][hostile]") {
  CHECK_THAT(refused(image("{\"a\xff\":1}")), Contains("header is not valid UTF-8 (byte 3"));
  CHECK_THAT(refused(image("{\"\xc0\xaf\":1}")), Contains("not valid UTF-8"));      // overlong '/'
  CHECK_THAT(refused(image("{\"\xed\xa0\x80\":1}")), Contains("not valid UTF-8"));  // a surrogate
}

TEST_CASE("hostile: header not JSON", "[safetensors][hostile]") {
  CHECK_THAT(refused(image("{\"a\":")), Contains("header is not valid JSON"));
  CHECK_THAT(refused(image("        ")), Contains("header is not valid JSON"));
  CHECK_THAT(refused(image("{} {}")), Contains("header is not valid JSON"));
  CHECK_THAT(refused(image("{/*c*/}")), Contains("header is not valid JSON"));
}

TEST_CASE("hostile: header of the wrong JSON types", "[safetensors][hostile]") {
  CHECK_THAT(refused(image("[]")), Contains("header must be a JSON object, got an array"));
  CHECK_THAT(refused(image("{\"t\":[1]}")), Contains("tensor \"t\": expected an object, got an array"));
  CHECK_THAT(refused(image("{\"t\":{\"dtype\":3}}")), Contains("tensor \"t\": dtype must be a string"));
  CHECK_THAT(refused(image("{\"t\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,0]}}")),
             Contains("shape entries must be unsigned integers, got a negative integer"));
  CHECK_THAT(refused(image("{\"t\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,0]}}")),
             Contains("shape entries must be unsigned integers, got a floating-point number"));
  CHECK_THAT(refused(image("{\"t\":{\"dtype\":\"F32\",\"shape\":[[1]],\"data_offsets\":[0,0]}}")),
             Contains("shape entries must be unsigned integers, got an array"));
  CHECK_THAT(refused(image("{\"t\":{\"dtype\":\"F32\",\"shape\":\"2\",\"data_offsets\":[0,8]}}")),
             Contains("shape must be an array of unsigned integers, got a string"));
  CHECK_THAT(refused(image("{\"t\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4,8]}}")),
             Contains("data_offsets must have 2 entries"));
  CHECK_THAT(refused(image("{\"t\":{\"dtype\":\"F32\",\"shape\":[]}}")), Contains("missing field(s): data_offsets"));
  CHECK_THAT(refused(image("{\"t\":{\"dtype\":\"F32\",\"dtype\":\"F32\"}}")), Contains("field \"dtype\" given twice"));
  CHECK_THAT(refused(image("{\"t\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4],\"x\":1}}", 4)),
             Contains("unexpected field \"x\""));
  CHECK_THAT(refused(image("{\"__metadata__\":[]}")), Contains("\"__metadata__\" must be an object, got an array"));
}

TEST_CASE("hostile: unknown dtype", "[safetensors][hostile]") {
  CHECK_THAT(refused(image("{\"t\":{\"dtype\":\"F128\",\"shape\":[1],\"data_offsets\":[0,16]}}", 16)),
             Contains("tensor \"t\": unknown dtype \"F128\""));
}

TEST_CASE("hostile: shape whose element count or byte size overflows", "[safetensors][hostile]") {
  // 2^32 * 2^32 elements: the count overflows 64 bits.
  CHECK_THAT(refused(image("{\"t\":{\"dtype\":\"U8\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,0]}}")),
             Contains("has more elements than 64 bits can count"));
  // 2^62 elements of 8 bytes: the count fits, the byte size does not.
  CHECK_THAT(refused(image("{\"t\":{\"dtype\":\"F64\",\"shape\":[4611686018427387904],\"data_offsets\":[0,0]}}")),
             Contains("overflows a 64-bit byte count"));
  // A huge claimed size is refused by the arithmetic, never allocated.
  CHECK_THAT(refused(image("{\"t\":{\"dtype\":\"F32\",\"shape\":[1000000000,1000],\"data_offsets\":[0,"
                           "4000000000000]}}")),
             Contains("file is truncated"));
}

TEST_CASE("hostile: data_offsets not matching the tensor's byte size", "[safetensors][hostile]") {
  CHECK_THAT(refused(image("{\"t\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,12]}}", 12)),
             Contains("tensor \"t\": F32 [2, 2] needs 16 bytes, data_offsets [0, 12] give 12"));
}

TEST_CASE("hostile: offsets that overlap, leave holes or run backwards", "[safetensors][hostile]") {
  CHECK_THAT(refused(image("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                           "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
                           12)),
             Contains("tensor \"b\": data_offsets [4, 12] overlap tensor \"a\""));
  CHECK_THAT(refused(image("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                           "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[12,20]}}",
                           20)),
             Contains("tensor \"b\": data_offsets begin at 12, leaving a hole of 4 bytes after tensor \"a\""));
  CHECK_THAT(refused(image("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}", 16)),
             Contains("leaving a hole of 8 bytes after the header"));
  CHECK_THAT(refused(image("{\"a\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,0]}}", 8)),
             Contains("data_offsets [8, 0] end before they begin"));
  // Out of order in the JSON but tiling the data exactly is fine (the reference sorts by offset too).
  auto ok =
      st::File::from_bytes(image("{\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]},"
                                 "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}",
                                 8));
  CHECK(ok.tensors()[0].name == "a");
}

TEST_CASE("hostile: data not covering the rest of the file", "[safetensors][hostile]") {
  const std::string h = "{\"t\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}";
  CHECK_THAT(refused(image(h, 9)), Contains("trailing bytes: the tensors cover 8 bytes of data, the file has 9"));
  CHECK_THAT(refused(image(h, 7)), Contains("file is truncated: the tensors need 8 bytes of data, the file has 7"));
  CHECK(st::File::from_bytes(image(h, 8)).tensors().size() == 1);
}

TEST_CASE("hostile: duplicate tensor names", "[safetensors][hostile]") {
  CHECK_THAT(refused(image("{\"t\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                           "\"t\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
                           8)),
             Contains("duplicate tensor name \"t\""));
  CHECK_THAT(refused(image("{\"__metadata__\":{},\"__metadata__\":{}}")), Contains("duplicate key \"__metadata__\""));
}

TEST_CASE("hostile: a tensor named __metadata__", "[safetensors][hostile]") {
  CHECK_THAT(refused(image("{\"__metadata__\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4)),
             Contains("a tensor may not be named \"__metadata__\""));
}

TEST_CASE("hostile: __metadata__ values that are not strings", "[safetensors][hostile]") {
  CHECK_THAT(refused(image("{\"__metadata__\":{\"format\":1}}")),
             Contains("\"__metadata__\" values must be strings; \"format\" is an unsigned integer"));
  CHECK_THAT(refused(image("{\"__metadata__\":{\"a\":{}}}")), Contains("\"a\" is an object"));
  CHECK_THAT(refused(image("{\"__metadata__\":{\"a\":\"x\",\"a\":\"y\"}}")), Contains("has the key \"a\" twice"));
}

TEST_CASE("safetensors accepts JSON whitespace around the header object", "[safetensors]") {
  auto f = st::File::from_bytes(
      image(" \n\t{ \"t\" : { \"dtype\" : \"F32\" , \"shape\" : [ 1 ] , \"data_offsets\" : [ 0 , 4 ] } }\r\n  ", 4));
  CHECK(f.at("t").nbytes() == 4);
}

}  // namespace unit_safetensors
