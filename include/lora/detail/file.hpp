// Files: a read-only memory map (or a plain read where mmap is missing) and
// atomic writes (temporary file in the destination folder, flush, fsync,
// rename), so a crash or a full disk never leaves half a file where a good
// one was.
#pragma once

#ifndef LORA_INSIDE_LIBRARY
#error "lora/detail/file.hpp is internal; include <lora/safetensors.hpp> instead"
#endif

#include <lora/errors.hpp>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#define LORA_HAVE_POSIX_FILES 1
#else
#include <fstream>
#define LORA_HAVE_POSIX_FILES 0
#endif

namespace lora::detail {

inline std::string errno_text(int code) { return std::strerror(code); }

/// The bytes of a whole file, mapped read-only (POSIX) or read into memory.
/// The mapping stays valid while any copy of the shared_ptr lives.
class FileBytes {
 public:
  static std::shared_ptr<const FileBytes> open(const std::string& path) {
    auto bytes = std::shared_ptr<FileBytes>(new FileBytes());
#if LORA_HAVE_POSIX_FILES
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw io_error(path + ": cannot open: " + errno_text(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      int code = errno;
      ::close(fd);
      throw io_error(path + ": cannot stat: " + errno_text(code));
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      throw io_error(path + ": not a regular file");
    }
    bytes->size_ = static_cast<std::size_t>(st.st_size);
    if (bytes->size_ > 0) {
      void* map = ::mmap(nullptr, bytes->size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (map == MAP_FAILED) {
        int code = errno;
        ::close(fd);
        throw io_error(path + ": cannot map: " + errno_text(code));
      }
      bytes->data_ = static_cast<const std::uint8_t*>(map);
      bytes->mapped_ = true;
    }
    ::close(fd);
#else
    std::ifstream in(path, std::ios::binary | std::ios::ate);
    if (!in) throw io_error(path + ": cannot open");
    auto end = in.tellg();
    in.seekg(0);
    bytes->owned_.resize(static_cast<std::size_t>(end));
    if (!in.read(reinterpret_cast<char*>(bytes->owned_.data()), end)) throw io_error(path + ": cannot read");
    bytes->data_ = bytes->owned_.data();
    bytes->size_ = bytes->owned_.size();
#endif
    return bytes;
  }

  static std::shared_ptr<const FileBytes> adopt(std::vector<std::uint8_t> owned) {
    auto bytes = std::shared_ptr<FileBytes>(new FileBytes());
    bytes->owned_ = std::move(owned);
    bytes->data_ = bytes->owned_.data();
    bytes->size_ = bytes->owned_.size();
    return bytes;
  }

  FileBytes(const FileBytes&) = delete;
  FileBytes& operator=(const FileBytes&) = delete;
  ~FileBytes() {
#if LORA_HAVE_POSIX_FILES
    if (mapped_) ::munmap(const_cast<std::uint8_t*>(data_), size_);
#endif
  }

  const std::uint8_t* data() const { return data_; }
  std::size_t size() const { return size_; }

 private:
  FileBytes() = default;
  const std::uint8_t* data_ = nullptr;
  std::size_t size_ = 0;
  bool mapped_ = false;
  std::vector<std::uint8_t> owned_;
};

/// Sink handed to the body of an atomic write; every write is checked.
class FileSink {
 public:
  FileSink(std::FILE* file, const std::string& path) : file_(file), path_(path) {}
  void write(const void* data, std::size_t size) {
    if (size == 0) return;
    if (std::fwrite(data, 1, size, file_) != size) throw io_error(path_ + ": write failed: " + errno_text(errno));
  }

 private:
  std::FILE* file_;
  const std::string& path_;
};

/// A file written in full to a temporary beside its destination and flushed
/// to disk, not yet in place: commit() renames it over the destination;
/// destroying it uncommitted removes the temporary. Staging several files
/// before committing any means a failed write (a full disk) changes none.
class StagedFile {
 public:
  StagedFile(const std::string& path, const std::function<void(FileSink&)>& body) : path_(path) {
    namespace fs = std::filesystem;
    fs::path target(path);
    fs::path folder = target.has_parent_path() ? target.parent_path() : fs::path(".");
    temp_ = (folder / ("." + target.filename().string() + ".tmp-XXXXXX")).string();
#if LORA_HAVE_POSIX_FILES
    std::vector<char> name(temp_.begin(), temp_.end());
    name.push_back('\0');
    int fd = ::mkstemp(name.data());
    if (fd < 0)
      throw io_error(path + ": cannot create a temporary file in " + folder.string() + ": " + errno_text(errno));
    temp_.assign(name.data());
    ::fchmod(fd, 0644);
    std::FILE* file = ::fdopen(fd, "wb");
    if (file == nullptr) {
      int code = errno;
      ::close(fd);
      ::unlink(temp_.c_str());
      throw io_error(path + ": cannot open the temporary file: " + errno_text(code));
    }
#else
    temp_.replace(temp_.size() - 6, 6, "000000");
    std::FILE* file = std::fopen(temp_.c_str(), "wb");
    if (file == nullptr) throw io_error(path + ": cannot create a temporary file in " + folder.string());
#endif
    try {
      FileSink sink(file, path);
      body(sink);
      if (std::fflush(file) != 0) throw io_error(path + ": flush failed: " + errno_text(errno));
#if LORA_HAVE_POSIX_FILES
      if (::fsync(::fileno(file)) != 0) throw io_error(path + ": fsync failed: " + errno_text(errno));
#endif
      std::FILE* closing = file;
      file = nullptr;
      if (std::fclose(closing) != 0) throw io_error(path + ": close failed: " + errno_text(errno));
    } catch (...) {
      if (file != nullptr) std::fclose(file);
      std::remove(temp_.c_str());
      throw;
    }
  }
  StagedFile(const StagedFile&) = delete;
  StagedFile& operator=(const StagedFile&) = delete;
  ~StagedFile() {
    if (!committed_) std::remove(temp_.c_str());
  }

  /// Renames the temporary into place (atomic on POSIX file systems).
  void commit() {
    std::error_code ec;
    std::filesystem::rename(temp_, path_, ec);
    if (ec) throw io_error(path_ + ": cannot rename the temporary file into place: " + ec.message());
    committed_ = true;
  }

 private:
  std::string path_, temp_;
  bool committed_ = false;
};

}  // namespace lora::detail
