// The counts bench/params prints (bench/params_table.hpp), against the
// figures of issue #3 and against real layers of the same shapes.
#include <catch2/catch.hpp>

#include "../bench/params_table.hpp"

#include <string>
#include <vector>

// Everything below is in a namespace of its own, so the test files can be compiled together (CMake's
// UNITY_BUILD, tests/CMakeLists.txt) without their helpers clashing.
namespace unit_params_table {

TEST_CASE("params table: every trainable count is the issue's figure", "[params-table]") {
  struct Expected {
    std::string name;
    int r;
    lora::Index trainable;
  };
  const std::vector<Expected> expected = {
      {"seed example (README)", 8, 16384}, {"RoBERTa-base", 8, 294912}, {"RoBERTa-large", 8, 786432},
      {"DeBERTa-XXL", 16, 4718592},        {"GPT-2 Medium", 4, 393216}, {"GPT-2 Large", 4, 737280},
      {"GPT-3 175B", 1, 4718592},          {"GPT-3 175B", 4, 18874368}, {"GPT-3 175B", 8, 37748736},
  };
  const auto rows = lora_bench::params_table();
  REQUIRE(rows.size() == expected.size());
  for (std::size_t i = 0; i < rows.size(); ++i) {
    INFO(expected[i].name << " r=" << expected[i].r);
    CHECK(rows[i].model.name == expected[i].name);
    CHECK(rows[i].model.r == expected[i].r);
    CHECK(rows[i].count.trainable == expected[i].trainable);
    CHECK(rows[i].adapter_bytes_fp32() == 4 * static_cast<std::size_t>(expected[i].trainable));
    CHECK(rows[i].adapter_bytes_fp16() == 2 * static_cast<std::size_t>(expected[i].trainable));
    CHECK(rows[i].adamw_state_lora == 8 * static_cast<std::size_t>(expected[i].trainable));
  }
}

TEST_CASE("params table: the seed example is 16,384 of 1,048,576, 64x fewer", "[params-table]") {
  const auto seed = lora_bench::params_table().front();
  CHECK(seed.count.trainable == 16384);
  CHECK(seed.count.frozen == 1048576);
  CHECK(seed.ratio() == 64.0);
  CHECK(seed.adamw_state_lora == 131072);         // AdamW::state_bytes() of the real optimizer: 2 x 4 x 16,384
  CHECK(seed.adamw_state_full == 8u * 1048576u);  // the same on W: 8 MiB
}

TEST_CASE("params table: frozen counts are the adapted projections' weights and biases", "[params-table]") {
  const auto rows = lora_bench::params_table();
  for (std::size_t i = 1; i < rows.size(); ++i) {
    const auto& m = rows[i].model;
    INFO(m.name << " r=" << m.r);
    const lora::Index d = m.d_model;
    CHECK(rows[i].count.frozen == m.layers * 2 * (d * d + d));
    CHECK(rows[i].adamw_state_full == 8 * static_cast<std::size_t>(rows[i].count.frozen));
  }
}

TEST_CASE("params table: only GPT-2 Medium and Large differ from the paper's printed figure", "[params-table]") {
  for (const auto& row : lora_bench::params_table()) {
    INFO(row.model.name << " r=" << row.model.r);
    const bool gpt2 = row.model.name == "GPT-2 Medium" || row.model.name == "GPT-2 Large";
    CHECK(row.paper_differs == gpt2);
  }
}

TEST_CASE("params table: the dry run counts what a real layer of each shape holds", "[params-table]") {
  // parameter_count_for must agree with a built layer's parameters(); GPT-3's 12288 x 12288 (576 MiB) is left out.
  for (const auto& m : lora_bench::paper_models()) {
    if (m.d_model > 1536) continue;
    INFO(m.name << " d=" << m.d_model << " r=" << m.r);
    const auto cfg = lora_bench::rank_config(m.r);
    lora::LoRALinear<float> layer(m.d_model, m.d_model, cfg, m.bias);
    lora::Index trainable = 0;
    for (const auto& p : layer.parameters()) trainable += p.size();
    const auto dry = lora::LoRALinear<float>::parameter_count_for(m.d_model, m.d_model, cfg, m.bias);
    CHECK(dry.trainable == trainable);
    CHECK(dry.frozen == layer.weight().size() + layer.bias().size());
  }
}

TEST_CASE("params table: bytes print in binary units", "[params-table]") {
  CHECK(lora_bench::bytes_string(512) == "512 B");
  CHECK(lora_bench::bytes_string(65536) == "64.0 KiB");
  CHECK(lora_bench::bytes_string(8.0 * 1048576) == "8.0 MiB");
}

}  // namespace unit_params_table
