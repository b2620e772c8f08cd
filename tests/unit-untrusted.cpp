// Untrusted adapters and bases, second round: every class of hostile input
// that once crashed, hung or wrote a wrong model with success, one test each
// (each fails on the code before the fix): JSON depth, size and overflowing
// numbers; special files; files that change while read; non-finite merges;
// adapter tensors merge used to drop; adapters with nothing to merge; two
// modules on one base tensor; keys with no module path; output file modes,
// long names and the file-size limit.
#include <catch2/catch.hpp>
#include <lora/peft.hpp>

#include "test_files.hpp"

#include <cmath>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

// Everything below is in a namespace of its own, so the test files can be compiled together (CMake's
// UNITY_BUILD, tests/CMakeLists.txt) without their helpers clashing.
namespace unit_untrusted {

using Catch::Contains;
namespace st = lora::safetensors;
namespace peft = lora::peft;
namespace fs = std::filesystem;
using Mat = lora::Matrix<float>;

namespace {

const std::string data_dir = LORA_TEST_DATA_DIR;
const std::string golden_dir = data_dir + "/peft/golden";

using lora_test::error_of;
using lora_test::write_text;

fs::path scratch(const std::string& name) { return lora_test::scratch_dir("untrusted-" + name); }

const char* small_config = R"({"peft_type": "LORA", "r": 2, "lora_alpha": 4})";

// An adapter folder with the given tensors and config.
void write_adapter(const fs::path& dir, const std::vector<std::pair<std::string, Mat>>& tensors,
                   const std::string& config = small_config) {
  fs::create_directories(dir);
  st::Writer w;
  w.set_metadata("format", "pt");
  for (const auto& [name, t] : tensors) w.add(name, t);
  w.save((dir / "adapter_model.safetensors").string());
  write_text(dir / "adapter_config.json", config);
}

// A base file holding `tensors` as `dtype`.
void write_base(const fs::path& path, const std::vector<std::pair<std::string, Mat>>& tensors,
                st::Dtype dtype = st::Dtype::F32) {
  st::Writer w;
  for (const auto& [name, t] : tensors) w.add(name, t, dtype);
  w.save(path.string());
}

mode_t mode_of(const fs::path& p) {
  struct stat s {};
  REQUIRE(::stat(p.c_str(), &s) == 0);
  return s.st_mode & 07777;
}

}  // namespace

TEST_CASE("untrusted: a config nested too deep or too large is refused before it is parsed", "[untrusted][config]") {
  // 100,000 levels crashed the recursive dump() that copies unknown keys.
  std::string deep = R"({"peft_type": "LORA", "notes": )" + std::string(100000, '[') + std::string(100000, ']') + "}";
  CHECK_THAT(error_of([&] { peft::AdapterConfig::parse(deep, "deep.json"); }),
             Contains("deep.json: arrays and objects nest more than 64 levels deep"));
  // Brackets inside strings do not count; 64 levels are fine.
  std::string ok =
      R"({"peft_type": "LORA", "s": "[[[[[[", "notes": )" + std::string(63, '[') + std::string(63, ']') + "}";
  CHECK(peft::AdapterConfig::parse(ok).other.contains("notes"));
  // A 100-million-entry array took 5.6 GB: anything over the limit is refused unread.
  const fs::path dir = scratch("config-size");
  std::string big = R"({"peft_type": "LORA", "notes": [)";
  big.reserve(peft::max_config_bytes + 64);
  while (big.size() <= peft::max_config_bytes) big += "0,";
  big += "0]}";
  write_text(dir / "adapter_config.json", big);
  CHECK_THAT(error_of([&] { peft::AdapterConfig::read((dir / "adapter_config.json").string()); }),
             Contains("adapter_config.json: the config is " + std::to_string(big.size()) +
                      " bytes, more than the limit of 8388608"));
  fs::remove_all(dir);
}

TEST_CASE("untrusted: a number that overflows is a format_error naming the file", "[untrusted][config]") {
  // nlohmann's out_of_range escaped as a non-lora exception before.
  for (const char* text : {R"({"peft_type": "LORA", "lora_alpha": 1e400})", R"({"peft_type": "LORA", "r": 1e400})",
                           R"({"peft_type": "LORA", "alpha_pattern": {"q": -1e999}})"}) {
    INFO(text);
    std::string message;
    try {
      peft::AdapterConfig::parse(text, "big-number.json");
    } catch (const lora::format_error& e) {
      message = e.what();
    }
    CHECK_THAT(message, Contains("big-number.json: not valid JSON") && Contains("overflow"));
  }
}

TEST_CASE("untrusted: FIFOs and devices are refused without blocking or reading", "[untrusted][files]") {
  const fs::path dir = scratch("fifo");
  write_adapter(dir / "adapter", {{"base_model.model.fc.lora_A.weight", Mat::Ones(2, 3)},
                                  {"base_model.model.fc.lora_B.weight", Mat::Ones(4, 2)}});
  write_base(dir / "base.safetensors", {{"fc.weight", Mat::Ones(4, 3)}});
  REQUIRE(::mkfifo((dir / "fifo").c_str(), 0600) == 0);
  // A FIFO with no writer made open() wait forever; each of these returned only when a writer came.
  CHECK_THAT(error_of([&] { st::File::open((dir / "fifo").string()); }), Contains("not a regular file (a FIFO)"));
  CHECK_THAT(error_of([&] { st::File::open((dir / "fifo").string(), st::Access::read); }),
             Contains("not a regular file (a FIFO)"));
  CHECK_THAT(error_of([&] { peft::AdapterConfig::read((dir / "fifo").string()); }),
             Contains("fifo: not a regular file (a FIFO)"));
  CHECK_THAT(error_of([&] {
               peft::merge_adapter_file((dir / "fifo").string(), (dir / "adapter").string(),
                                        (dir / "out.safetensors").string());
             }),
             Contains("not a regular file (a FIFO)"));
  // A FIFO as the adapter's config, and as its weights.
  fs::rename(dir / "adapter" / "adapter_config.json", dir / "config.json");
  REQUIRE(::mkfifo((dir / "adapter" / "adapter_config.json").c_str(), 0600) == 0);
  CHECK_THAT(error_of([&] { peft::read_adapter<float>((dir / "adapter").string()); }),
             Contains("adapter_config.json: not a regular file (a FIFO)"));
  fs::remove(dir / "adapter" / "adapter_config.json");
  fs::rename(dir / "config.json", dir / "adapter" / "adapter_config.json");
  fs::remove(dir / "adapter" / "adapter_model.safetensors");
  REQUIRE(::mkfifo((dir / "adapter" / "adapter_model.safetensors").c_str(), 0600) == 0);
  CHECK_THAT(error_of([&] { peft::read_adapter<float>((dir / "adapter").string()); }),
             Contains("adapter_model.safetensors: not a regular file (a FIFO)"));
  // /dev/zero as a config was read until memory ran out.
  if (fs::exists("/dev/zero"))
    CHECK_THAT(error_of([&] { peft::AdapterConfig::read("/dev/zero"); }),
               Contains("/dev/zero: not a regular file (a character device)"));
  CHECK_FALSE(fs::exists(dir / "out.safetensors"));
  fs::remove_all(dir);
}

TEST_CASE("untrusted: a file truncated or rewritten while read gives io_error, not SIGBUS", "[untrusted][files]") {
  const fs::path dir = scratch("truncate");
  const fs::path path = dir / "base.safetensors";
  write_base(path, {{"a", Mat::Constant(64, 64, 1.5f)}, {"b", Mat::Constant(64, 64, 2.5f)}});
  {
    auto file = st::File::open(path.string(), st::Access::read);
    CHECK(file.matrix<float>("a")(3, 4) == 1.5f);
    CHECK_THAT(error_of([&] { (void)file.bytes(file.at("a")); }), Contains("opened with Access::read"));
    // Truncated after the header was checked: a mapped file would now die of SIGBUS on "b".
    fs::resize_file(path, fs::file_size(path) - 1000);
    std::string message;
    try {
      (void)file.matrix<float>("b");
    } catch (const lora::io_error& e) {
      message = e.what();
    }
    CHECK_THAT(message, Contains("base.safetensors: the file changed while being read"));
    CHECK_THAT(error_of([&] { file.check_unchanged(); }), Contains("the file changed while being read"));
  }
  // Rewritten in place with the same size: every read succeeds, check_unchanged notices.
  write_base(path, {{"a", Mat::Constant(64, 64, 1.5f)}});
  auto file = st::File::open(path.string(), st::Access::read);
  file.check_unchanged();
  {
    std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(-4, std::ios::end);
    f.write("\0\0\0\0", 4);
  }
  struct timespec later[2] = {{0, UTIME_OMIT}, {1, 0}};  // a modification time surely different from now
  REQUIRE(::utimensat(AT_FDCWD, path.c_str(), later, 0) == 0);
  CHECK_THAT(error_of([&] { file.check_unchanged(); }), Contains("the file changed while being read"));
  fs::remove_all(dir);
}

TEST_CASE("untrusted: merges whose result is not finite are refused and write nothing", "[untrusted][merge]") {
  const fs::path dir = scratch("nonfinite");
  const fs::path out = dir / "out.safetensors";
  const Mat A = Mat::Ones(2, 3), B = Mat::Ones(4, 2);
  write_base(dir / "base.safetensors", {{"fc.weight", Mat::Ones(4, 3)}, {"other", Mat::Ones(2, 2)}});
  auto merge = [&](const fs::path& base, double scale = 1.0) {
    return error_of([&] { peft::merge_adapter_file(base.string(), (dir / "adapter").string(), out.string(), scale); });
  };
  // Huge adapter values: 2 · 1e38 · 1e38 overflows float.
  write_adapter(dir / "adapter",
                {{"base_model.model.fc.lora_A.weight", A * 1e38f}, {"base_model.model.fc.lora_B.weight", B}});
  CHECK_THAT(
      merge(dir / "base.safetensors"),
      Contains("fc -> fc.weight: the result is not finite in F32 (first at [0, 0]") && Contains("nothing was written"));
  // A NaN in B.
  Mat nan_B = B;
  nan_B(2, 1) = std::nanf("");
  write_adapter(dir / "adapter",
                {{"base_model.model.fc.lora_A.weight", A}, {"base_model.model.fc.lora_B.weight", nan_B}});
  CHECK_THAT(merge(dir / "base.safetensors"), Contains("not finite in F32 (first at [2, 0]"));
  // --scale 1e40: scale x scaling does not fit a float.
  write_adapter(dir / "adapter", {{"base_model.model.fc.lora_A.weight", A}, {"base_model.model.fc.lora_B.weight", B}});
  CHECK_THAT(merge(dir / "base.safetensors", 1e40), Contains("scale 1e+40 x scaling 2 = 2e+40 does not fit a float"));
  // An F16 base pushed past 65504: finite in float, infinite once stored.
  write_base(dir / "base16.safetensors", {{"fc.weight", Mat::Constant(4, 3, 60000.0f)}}, st::Dtype::F16);
  CHECK_THAT(merge(dir / "base16.safetensors", 2000.0), Contains("not finite in F16 (first at [0, 0]: base 60000"));
  // A base that is already not finite where the adapter lands.
  Mat inf_W = Mat::Ones(4, 3);
  inf_W(1, 2) = INFINITY;
  write_base(dir / "base-inf.safetensors", {{"fc.weight", inf_W}});
  CHECK_THAT(merge(dir / "base-inf.safetensors"), Contains("the base weight is already not finite there"));
  CHECK_FALSE(fs::exists(out));
  CHECK(lora_test::count_files(dir) == 4);  // the adapter folder and three bases: no temporaries
  fs::remove_all(dir);
}

TEST_CASE("untrusted: modules_to_save heads and trained biases reach the merged file", "[untrusted][merge]") {
  // PEFT's merge_and_unload keeps an adapter's non-LoRA tensors; merge_adapter_file used to drop them.
  const fs::path dir = scratch("heads");
  const std::string out = (dir / "out.safetensors").string();
  auto report = peft::merge_adapter_file(golden_dir + "/base.safetensors", golden_dir + "/adapter", out);
  auto merged = st::File::open(out);
  auto adapter = st::File::open(golden_dir + "/adapter/adapter_model.safetensors");
  auto expected = st::File::open(golden_dir + "/merged.safetensors");  // PyTorch's merge, without the head
  REQUIRE(report.added == std::vector<std::string>{"score.weight"});   // the golden base has no head
  CHECK(merged.tensors().size() == expected.tensors().size() + 1);
  const auto& head = merged.at("score.weight");
  const auto& saved = adapter.at("base_model.model.score.weight");
  CHECK(head.shape == saved.shape);
  CHECK(head.dtype == saved.dtype);
  CHECK(merged.matrix<float>("score.weight") == adapter.matrix<float>("base_model.model.score.weight"));

  // bias = "all": a bias trained on a module without LoRA replaces the base's, converted to its dtype; a head
  // the base has replaces it.
  const Mat A = Mat::Ones(2, 3), B = Mat::Ones(4, 2);
  const Mat fc2_bias = Mat::Constant(1, 5, 0.25f), head_w = Mat::Constant(2, 4, -3.0f);
  st::Writer w;
  w.add("base_model.model.model.fc.lora_A.weight", A);
  w.add("base_model.model.model.fc.lora_B.weight", B);
  w.add("base_model.model.model.fc2.bias", fc2_bias, st::Dtype::F32, {5});
  w.add("base_model.model.head.weight", head_w);
  fs::create_directories(dir / "adapter");
  w.save((dir / "adapter" / "adapter_model.safetensors").string());
  write_text(dir / "adapter" / "adapter_config.json",
             R"({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "bias": "all"})");
  st::Writer b;
  b.add("model.fc.weight", Mat::Zero(4, 3), st::Dtype::BF16);
  b.add("model.fc2.bias", Mat::Zero(1, 5), st::Dtype::BF16, {5});
  b.add("model.fc2.weight", Mat::Ones(5, 4), st::Dtype::BF16);
  b.add("head.weight", Mat::Zero(2, 4));
  b.save((dir / "base.safetensors").string());
  report = peft::merge_adapter_file((dir / "base.safetensors").string(), (dir / "adapter").string(), out);
  CHECK(report.merged.size() == 1);
  CHECK(report.replaced.size() == 2);
  CHECK(report.copied == 1);
  auto got = st::File::open(out);
  CHECK(got.at("model.fc2.bias").dtype == st::Dtype::BF16);
  CHECK(got.matrix<float>("model.fc2.bias") == fc2_bias);
  CHECK(got.matrix<float>("head.weight") == head_w);
  CHECK(got.matrix<float>("model.fc.weight") == Mat::Constant(4, 3, 4.0f));  // 0 + (4/2)·(B A), B A = 2
  CHECK(got.matrix<float>("model.fc2.weight") == Mat::Ones(5, 4));
  fs::remove_all(dir);
}

TEST_CASE("untrusted: nothing to merge, two modules on one tensor, keys without a module", "[untrusted][merge]") {
  const fs::path dir = scratch("structure");
  const std::string out = (dir / "out.safetensors").string();
  const Mat A = Mat::Ones(2, 3), B = Mat::Ones(4, 2);
  write_base(dir / "base.safetensors", {{"h.0.fc.weight", Mat::Ones(4, 3)}});
  auto merge = [&] {
    return error_of(
        [&] { peft::merge_adapter_file((dir / "base.safetensors").string(), (dir / "adapter").string(), out); });
  };
  // No LoRA module at all "merged" into a copy of the base with success.
  write_adapter(dir / "adapter", {{"something.else", Mat::Ones(1, 1)}});
  CHECK_THAT(merge(), Contains("no LoRA module: no base_model.model.<module path>.lora_A.weight / .lora_B.weight "
                               "pair among its 1 tensor(s)"));
  // Two module paths that both find h.0.fc.weight gave an internal writer error.
  write_adapter(dir / "adapter", {{"base_model.model.h.0.fc.lora_A.weight", A},
                                  {"base_model.model.h.0.fc.lora_B.weight", B},
                                  {"base_model.model.transformer.h.0.fc.lora_A.weight", A},
                                  {"base_model.model.transformer.h.0.fc.lora_B.weight", B}});
  CHECK_THAT(merge(),
             Contains("module transformer.h.0.fc and module h.0.fc both map to base tensor \"h.0.fc.weight\""));
  // "base_model.model.lora_A.weight" underflowed the path parsing into a misleading "no lora_B".
  write_adapter(dir / "adapter", {{"base_model.model.lora_A.weight", A}, {"base_model.model.lora_B.weight", B}});
  const std::string message = error_of([&] { peft::read_adapter<float>((dir / "adapter").string()); });
  CHECK_THAT(message, Contains("base_model.model.lora_A.weight: a LoRA matrix with no module path"));
  CHECK_THAT(message, Contains("base_model.model.lora_B.weight: a LoRA matrix with no module path"));
  CHECK_THAT(message, !Contains("but no lora_"));
  // A tensor outside base_model.model. has no place in the base.
  write_adapter(dir / "adapter", {{"base_model.model.h.0.fc.lora_A.weight", A},
                                  {"base_model.model.h.0.fc.lora_B.weight", B},
                                  {"stray", Mat::Ones(1, 1)}});
  CHECK_THAT(merge(), Contains("adapter tensor \"stray\" is not under \"base_model.model.\""));
  CHECK_FALSE(fs::exists(out));
  fs::remove_all(dir);
}

TEST_CASE("untrusted: names with control characters are escaped in messages", "[untrusted][config]") {
  const fs::path dir = scratch("escape");
  write_adapter(dir / "adapter", {{"base_model.model.fc\x1b[2J\n  fake problem.lora_A.weight", Mat::Ones(2, 3)}});
  const std::string message = error_of([&] { peft::read_adapter<float>((dir / "adapter").string()); });
  CHECK_THAT(message, Contains("fc\\x1b[2J\\n  fake problem: has lora_A but no lora_B"));
  CHECK(message.find('\x1b') == std::string::npos);
  CHECK(message.find("1 problem(s):\n  ") != std::string::npos);  // the list's own line breaks stay
  fs::remove_all(dir);
}

TEST_CASE("untrusted: saved files honour the umask, keep a replaced file's mode, fit long names",
          "[untrusted][files]") {
  const fs::path dir = scratch("modes");
  st::Writer w;
  w.add("t", Mat::Ones(2, 2));
  const mode_t old_mask = ::umask(027);
  w.save((dir / "new.safetensors").string());
  ::umask(old_mask);
  CHECK(mode_of(dir / "new.safetensors") == 0640);  // was 0644 whatever the umask
  REQUIRE(::chmod((dir / "new.safetensors").c_str(), 0600) == 0);
  w.save((dir / "new.safetensors").string());
  CHECK(mode_of(dir / "new.safetensors") == 0600);  // a private file stays private when replaced
  // A name of 250 bytes is valid; the temporary name used to be 12 bytes longer, past NAME_MAX.
  const std::string long_name = std::string(250 - 12, 'n') + ".safetensors";
  w.save((dir / long_name).string());
  CHECK(st::File::open((dir / long_name).string()).tensors().size() == 1);
  CHECK(lora_test::count_files(dir) == 2);
  fs::remove_all(dir);
}

TEST_CASE("untrusted: the file-size limit gives io_error and leaves no temporary, with SIGXFSZ at its default",
          "[untrusted][files]") {
  // Past RLIMIT_FSIZE the kernel sends SIGXFSZ, whose default action ends the process and left the temporary
  // behind. The writer now refuses the write that would cross the limit. SIGXFSZ is NOT ignored here: if the
  // check were missing, this test process would die.
  const fs::path dir = scratch("fsize");
  st::Writer w;
  w.add("t", Mat::Ones(256, 256));  // 256 KiB
  struct rlimit old {};
  REQUIRE(::getrlimit(RLIMIT_FSIZE, &old) == 0);
  struct rlimit limit = old;
  limit.rlim_cur = 64 * 1024;
  REQUIRE(::setrlimit(RLIMIT_FSIZE, &limit) == 0);
  std::string message;
  try {
    w.save((dir / "big.safetensors").string());
  } catch (const lora::io_error& e) {
    message = e.what();
  }
  ::setrlimit(RLIMIT_FSIZE, &old);
  CHECK_THAT(message, Contains("big.safetensors: the file would be larger than the process's file-size limit "
                               "(ulimit -f) of 65536 bytes"));
  CHECK(lora_test::count_files(dir) == 0);
  fs::remove_all(dir);
}

TEST_CASE("untrusted: rank_pattern keys run in bounded time and stack, or are refused by name", "[untrusted][config]") {
  // std::regex backtracked exponentially on (a+)+b against a long run of a's and recursed per character on a long
  // module path (stack overflow). The linear-time matcher answers; keys it cannot run are refused up front.
  const std::string config = R"({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
      "rank_pattern": {"(a+)+b": 4, "(.*)*x": 6, "layers\\.\\d+\\.(q|v)_proj": 8}})";
  const auto c = peft::AdapterConfig::parse(config, "hostile.json");
  const std::string as(4000, 'a');
  CHECK(c.rank_for(as) == 2);        // no b at the end: no match, and no exponential search to find that out
  CHECK(c.rank_for(as + "b") == 4);  // the same key matching
  CHECK(c.rank_for("model." + std::string(3000, 'x')) == 6);
  CHECK(c.rank_for("model.layers.17.v_proj") == 8);
  CHECK(c.rank_for("model.layers.x.v_proj") == 2);
  CHECK_THAT(error_of([&] { (void)c.rank_for(std::string(5000, 'a')); }),
             Contains("more than the limit of 4096 for pattern matching"));
  for (const char* key : {"(?=q)_proj", "(?<!x)q", "(q)\\\\1", "(?i)q_proj", "(?>q)", "q*+"}) {
    INFO(key);
    const std::string text = std::string(R"({"peft_type": "LORA", "rank_pattern": {")") + key + R"(": 2}})";
    CHECK_THAT(error_of([&] { peft::AdapterConfig::parse(text, "unsupported.json"); }),
               Contains("unsupported.json: rank_pattern: pattern key") && Contains("not supported"));
  }
  const std::string nested = std::string(40, '(') + "a" + std::string(40, ')');
  CHECK_THAT(error_of([&] {
               peft::AdapterConfig::parse(R"({"peft_type": "LORA", "rank_pattern": {")" + nested + R"(": 2}})");
             }),
             Contains("rank_pattern: pattern key"));
  // A module path over the limit, coming from a tensor name, is one problem of the file, not an escaped exception.
  const fs::path dir = scratch("patterns");
  const std::string long_path = "model." + std::string(5000, 'q');
  write_adapter(dir / "adapter",
                {{"base_model.model." + long_path + ".lora_A.weight", Mat::Ones(2, 3)},
                 {"base_model.model." + long_path + ".lora_B.weight", Mat::Ones(4, 2)}},
                R"({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "rank_pattern": {"q_proj": 4}})");
  std::string message;
  try {
    peft::read_adapter<float>((dir / "adapter").string());
  } catch (const lora::format_error& e) {
    message = e.what();
  }
  CHECK_THAT(message, Contains("1 problem(s)") && Contains("more than the limit of 4096 for pattern matching"));
  fs::remove_all(dir);
}

}  // namespace unit_untrusted
