// libFuzzer target for the safetensors reader: any byte string must either
// be refused with lora::format_error or parse into tensors that can all be
// read, written back and parsed again to the same header. Built by
// -DLORA_FUZZ=ON with clang (-fsanitize=fuzzer,address,undefined); the same
// function replays tests/fuzz/corpus under ctest in every build
// (fuzz_replay), so a crash once found stays a test.
#include <lora/safetensors.hpp>

#include <cstdint>
#include <cstdlib>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  namespace st = lora::safetensors;
  std::vector<std::uint8_t> bytes(data, data + size);
  std::optional<st::File> file;
  try {
    file = st::File::from_bytes(bytes, "fuzz");
  } catch (const lora::format_error&) {
    return 0;
  }
  st::Writer writer;
  for (const auto& t : file->tensors()) {
    if (st::is_float(t.dtype) && t.shape.size() <= 2 && t.numel() > 0) {
      auto m = file->matrix<double>(t.name);  // reads every element: out-of-bounds reads would show
      (void)m;
    }
    writer.add_bytes(t.name, t.dtype, t.shape, file->bytes(t), static_cast<std::size_t>(t.nbytes()));
  }
  for (const auto& [k, v] : file->metadata()) writer.set_metadata(k, v);
  // What the reader accepted, the writer must write in a form the reader accepts again.
  auto again = st::File::from_bytes(writer.serialize(), "fuzz-rewritten");
  if (again.tensors().size() != file->tensors().size() || again.metadata() != file->metadata()) std::abort();
  return 0;
}
