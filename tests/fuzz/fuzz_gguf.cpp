// libFuzzer target for the GGUF reader: any byte string must either be
// refused with lora::format_error or parse into metadata and tensors that can
// all be read (every f32/f16/bf16/q8_0 matrix converted), written back by
// gguf::Writer and parsed again to the same metadata, tensor infos and bytes.
// A file that parses is also imported as a LoRA adapter (gguf_adapter.hpp),
// which must either refuse it with a lora::error or give an adapter that
// exports again.
// Built by -DLORA_FUZZ=ON with clang (-fsanitize=fuzzer,address,undefined);
// the same function replays tests/fuzz/gguf_corpus and tests/data/gguf under
// ctest in every build (fuzz_gguf_replay), so a crash once found stays a test.
#include <lora/gguf.hpp>
#include <lora/gguf_adapter.hpp>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  namespace gguf = lora::gguf;
  std::optional<gguf::File> file;
  try {
    file = gguf::File::from_bytes(std::vector<std::uint8_t>(data, data + size), "fuzz");
  } catch (const lora::format_error&) {
    return 0;
  }
  gguf::Writer writer;
  for (const auto& kv : file->metadata()) writer.set(kv.key, kv.value);
  for (const auto& t : file->tensors()) {
    if (gguf::is_convertible(t.type) && t.ne.size() <= 2 && t.numel() > 0) {
      auto m = file->matrix<double>(t.name);  // reads every element: out-of-bounds reads would show
      (void)m;
    }
    writer.add_bytes(t.name, t.type, t.ne, file->bytes(t), static_cast<std::size_t>(t.nbytes));
  }
  // What the reader accepted, the writer must write in a form the reader accepts again, unchanged.
  auto again = gguf::File::from_bytes(writer.serialize(), "fuzz-rewritten");
  if (again.metadata().size() != file->metadata().size() || again.tensors().size() != file->tensors().size())
    std::abort();
  for (std::size_t i = 0; i < again.metadata().size(); ++i)
    if (again.metadata()[i].key != file->metadata()[i].key || again.metadata()[i].value != file->metadata()[i].value)
      std::abort();
  for (std::size_t i = 0; i < again.tensors().size(); ++i) {
    const auto& a = again.tensors()[i];
    const auto& b = file->tensors()[i];
    if (a.name != b.name || a.ne != b.ne || a.type != b.type || a.nbytes != b.nbytes ||
        (a.nbytes > 0 && std::memcmp(again.bytes(a), file->bytes(b), static_cast<std::size_t>(a.nbytes)) != 0))
      std::abort();
  }
  // As a LoRA adapter: refused with a lora::error, or imported and exported again.
  lora::gguf::ImportOptions options;
  options.n_head = 4;
  options.n_head_kv = 2;
  try {
    auto adapter = gguf::import_adapter<double>(*file, options);
    gguf::ExportOptions out;
    out.architecture = *gguf::find_architecture(file->get<std::string>("general.architecture"));
    out.n_head = 4;
    out.n_head_kv = 2;
    gguf::Writer exported;
    gguf::export_adapter(adapter, out, exported);
  } catch (const lora::error&) {
  }
  return 0;
}
