// libFuzzer target for adapter_config.json and its patterns: any byte string
// must either be refused with lora::format_error or parse into a config whose
// rank_pattern / alpha_pattern keys can be matched against module paths (in
// bounded time and stack: a hang or a stack overflow is a finding) and that
// writes JSON which parses back to the same values. Module paths come from a
// fixed list, from the keys themselves, and from what follows a NUL byte in
// the input. Built by -DLORA_FUZZ=ON with clang; fuzz_config_replay runs
// tests/fuzz/config_corpus under ctest in every build.
#include <lora/peft.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  namespace peft = lora::peft;
  const std::string input(reinterpret_cast<const char*>(data), size);
  const std::size_t nul = input.find('\0');
  const std::string text = input.substr(0, nul);
  std::vector<std::string> modules = {"q_proj", "model.layers.0.self_attn.q_proj", "transformer.h.11.mlp.c_fc", "",
                                      "a.b.c",  std::string(300, 'a') + "b"};
  if (nul != std::string::npos) modules.push_back(input.substr(nul + 1));
  peft::AdapterConfig config;
  try {
    config = peft::AdapterConfig::parse(text, "fuzz.json");
  } catch (const lora::format_error&) {
    return 0;
  }
  for (const auto& [key, rank] : config.rank_pattern) {
    modules.push_back(key);
    modules.push_back("model.layers.3." + key);
  }
  for (const auto& module : modules) {
    try {
      const int r = config.rank_for(module);
      const double alpha = config.alpha_for(module);
      if (r < 0 || !std::isfinite(alpha)) std::abort();
      (void)config.scaling_for(module);
      (void)config.layer_config(module);
    } catch (const lora::config_error&) {  // a module path over the length limit
    }
  }
  // What the parser accepted, the writer must write in a form the parser accepts with the same values. The
  // patterns come back sorted by key, as PEFT's json.dumps(sort_keys=True) writes them.
  const peft::AdapterConfig again = peft::AdapterConfig::parse(config.to_json(), "fuzz-rewritten.json");
  auto sorted = [](auto list) {
    std::sort(list.begin(), list.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    return list;
  };
  if (again.r != config.r || sorted(again.rank_pattern) != sorted(config.rank_pattern) ||
      again.alpha_pattern.size() != config.alpha_pattern.size() || again.use_rslora != config.use_rslora ||
      again.target_modules != config.target_modules || again.target_modules_regex != config.target_modules_regex)
    std::abort();
  return 0;
}
