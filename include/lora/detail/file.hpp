// Files: a read-only memory map (or a plain read where mmap is missing) and
// atomic writes (temporary file in the destination folder, flush, fsync,
// rename), so a crash or a full disk never leaves half a file where a good
// one was.
#pragma once

#ifndef LORA_INSIDE_LIBRARY
#error "lora/detail/file.hpp is internal; include <lora/safetensors.hpp> instead"
#endif

#include <lora/errors.hpp>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>
#define LORA_HAVE_POSIX_FILES 1
#else
#define LORA_HAVE_POSIX_FILES 0
#endif

namespace lora::detail {

inline std::string errno_text(int code) { return std::strerror(code); }

/// What kind of file `mode` (st_mode) describes, for "not a regular file (a FIFO)".
inline const char* file_type_name(unsigned mode) {
#if LORA_HAVE_POSIX_FILES
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISSOCK(mode)) return "a socket";
#endif
  (void)mode;
  return "not a regular file";
}

#if LORA_HAVE_POSIX_FILES
/// Opens `path` for reading without ever blocking (a FIFO with no writer
/// would block a plain open) and refuses anything that is not a regular
/// file before a byte is read: FIFOs, devices (/dev/zero), sockets,
/// directories. Returns the descriptor and fills `st`.
inline int open_regular_file(const std::string& path, struct stat& st) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  if (fd < 0) throw io_error(path + ": cannot open: " + errno_text(errno));
  if (::fstat(fd, &st) != 0) {
    int code = errno;
    ::close(fd);
    throw io_error(path + ": cannot stat: " + errno_text(code));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw io_error(path + ": not a regular file (" + file_type_name(static_cast<unsigned>(st.st_mode)) +
                   "); expected a file on disk");
  }
  // Regular files never block; clear the flag so reads behave as usual.
  int flags = ::fcntl(fd, F_GETFL);
  if (flags >= 0) ::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
  return fd;
}
#endif

/// The whole of a file into `Bytes` (std::string or std::vector<std::uint8_t>), refused without reading it when
/// it is not a regular file or larger than `max_bytes`. `what` names the file in the size message.
template <class Bytes>
Bytes read_bounded_file(const std::string& path, std::size_t max_bytes, const char* what) {
  Bytes bytes;
#if LORA_HAVE_POSIX_FILES
  struct stat st {};
  int fd = open_regular_file(path, st);
  auto size = static_cast<std::uint64_t>(st.st_size);
  if (size > max_bytes) {
    ::close(fd);
    throw format_error(path + ": " + what + " is " + std::to_string(size) + " bytes, more than the limit of " +
                       std::to_string(max_bytes));
  }
  bytes.resize(static_cast<std::size_t>(size));
  std::size_t done = 0;
  while (done < bytes.size()) {
    ssize_t got = ::read(fd, bytes.data() + done, bytes.size() - done);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) {
      int code = errno;
      ::close(fd);
      throw io_error(path + ": cannot read: " + errno_text(code));
    }
    if (got == 0) break;  // shrank while being read: take what is there
    done += static_cast<std::size_t>(got);
  }
  bytes.resize(done);
  ::close(fd);
#else
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) throw io_error(path + ": not a regular file");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw io_error(path + ": cannot open");
  bytes.resize(max_bytes + 1);
  in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  bytes.resize(static_cast<std::size_t>(in.gcount()));
  if (bytes.size() > max_bytes)
    throw format_error(path + ": " + what + " is more than the limit of " + std::to_string(max_bytes) + " bytes");
#endif
  return bytes;
}

/// The whole of a small text file (a JSON config), refused without reading
/// it when it is not a regular file or larger than `max_bytes`.
inline std::string read_small_file(const std::string& path, std::size_t max_bytes, const char* what) {
  return read_bounded_file<std::string>(path, max_bytes, what);
}

/// read_small_file's bytes as a byte vector, for a file that goes on as bytes (a checkpoint sent to other ranks)
/// and should not be held twice.
inline std::vector<std::uint8_t> read_small_file_bytes(const std::string& path, std::size_t max_bytes,
                                                       const char* what) {
  return read_bounded_file<std::vector<std::uint8_t>>(path, max_bytes, what);
}

/// The bytes of a whole file. open() maps it read-only (POSIX) or reads it
/// into memory; the mapping stays valid while any copy of the shared_ptr
/// lives, but a file truncated by someone else while mapped makes the next
/// access to the lost pages raise SIGBUS. open_for_reads() maps nothing: it
/// keeps the descriptor and copies what is asked with pread(), so a file
/// that shrinks or is replaced underneath gives an io_error naming it.
class FileBytes {
 public:
  static std::shared_ptr<const FileBytes> open(const std::string& path) {
    auto bytes = std::shared_ptr<FileBytes>(new FileBytes());
    bytes->path_ = path;
#if LORA_HAVE_POSIX_FILES
    struct stat st {};
    int fd = open_regular_file(path, st);
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
    std::error_code ec;
    if (!std::filesystem::is_regular_file(path, ec)) throw io_error(path + ": not a regular file");
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

  /// Opens `path` for copying reads (read()); data() is null. Falls back to
  /// open() where there is no pread.
  static std::shared_ptr<const FileBytes> open_for_reads(const std::string& path) {
#if LORA_HAVE_POSIX_FILES
    auto bytes = std::shared_ptr<FileBytes>(new FileBytes());
    bytes->path_ = path;
    struct stat st {};
    bytes->fd_ = open_regular_file(path, st);
    bytes->size_ = static_cast<std::size_t>(st.st_size);
    bytes->stamp_ = stamp_of(st);
    return bytes;
#else
    return open(path);
#endif
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
    if (fd_ >= 0) ::close(fd_);
#endif
  }

  /// The whole file in memory, or null for open_for_reads().
  const std::uint8_t* data() const { return data_; }
  /// The file's size when it was opened.
  std::size_t size() const { return size_; }

  /// Copies bytes [offset, offset + n) of the file into `out`; throws
  /// io_error when the file no longer holds them.
  void read(std::uint64_t offset, void* out, std::size_t n) const {
    if (n == 0) return;
    if (offset > size_ || n > size_ - offset)
      throw io_error(path_ + ": read of bytes [" + std::to_string(offset) + ", " + std::to_string(offset + n) +
                     ") past the end of the file (" + std::to_string(size_) + " bytes)");
    if (data_ != nullptr) {
      std::memcpy(out, data_ + offset, n);
      return;
    }
#if LORA_HAVE_POSIX_FILES
    auto* dst = static_cast<std::uint8_t*>(out);
    std::size_t done = 0;
    while (done < n) {
      ssize_t got = ::pread(fd_, dst + done, n - done, static_cast<off_t>(offset + done));
      if (got < 0 && errno == EINTR) continue;
      if (got < 0) throw io_error(path_ + ": cannot read: " + errno_text(errno));
      if (got == 0)
        throw io_error(path_ + ": the file changed while being read: it was " + std::to_string(size_) +
                       " bytes when opened and now ends before byte " + std::to_string(offset + done + 1));
      done += static_cast<std::size_t>(got);
    }
#endif
  }

  /// Throws io_error when the file was truncated, grown or rewritten since
  /// open_for_reads() (size or modification time differ); a no-op otherwise.
  void check_unchanged() const {
#if LORA_HAVE_POSIX_FILES
    if (fd_ < 0) return;
    struct stat st {};
    if (::fstat(fd_, &st) != 0) throw io_error(path_ + ": cannot stat: " + errno_text(errno));
    if (static_cast<std::size_t>(st.st_size) != size_ || stamp_of(st) != stamp_)
      throw io_error(path_ + ": the file changed while being read (it was " + std::to_string(size_) +
                     " bytes when opened, it is " + std::to_string(static_cast<std::uint64_t>(st.st_size)) +
                     " bytes now, modified since)");
#endif
  }

 private:
  FileBytes() = default;
#if LORA_HAVE_POSIX_FILES
  static std::pair<std::int64_t, std::int64_t> stamp_of(const struct stat& st) {
#if defined(__APPLE__)
    return {static_cast<std::int64_t>(st.st_mtimespec.tv_sec), static_cast<std::int64_t>(st.st_mtimespec.tv_nsec)};
#else
    return {static_cast<std::int64_t>(st.st_mtim.tv_sec), static_cast<std::int64_t>(st.st_mtim.tv_nsec)};
#endif
  }
  int fd_ = -1;
  std::pair<std::int64_t, std::int64_t> stamp_{0, 0};
#endif
  const std::uint8_t* data_ = nullptr;
  std::size_t size_ = 0;
  bool mapped_ = false;
  std::vector<std::uint8_t> owned_;
  std::string path_ = "<memory>";
};

/// Sink handed to the body of an atomic write; every write is checked. A
/// write that would take the file past the process's file-size limit
/// (RLIMIT_FSIZE, `ulimit -f`) is refused with io_error before it is made:
/// past the limit the kernel would send SIGXFSZ, which ends the process and
/// leaves the temporary file behind.
class FileSink {
 public:
  FileSink(std::FILE* file, const std::string& path) : file_(file), path_(path) {
#if LORA_HAVE_POSIX_FILES
    struct rlimit limit {};
    if (::getrlimit(RLIMIT_FSIZE, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY)
      limit_ = static_cast<std::uint64_t>(limit.rlim_cur);
#endif
  }
  void write(const void* data, std::size_t size) {
    if (size == 0) return;
    if (size > limit_ - written_)
      throw io_error(path_ + ": the file would be larger than the process's file-size limit (ulimit -f) of " +
                     std::to_string(limit_) + " bytes");
    if (std::fwrite(data, 1, size, file_) != size) throw io_error(path_ + ": write failed: " + errno_text(errno));
    written_ += size;
  }

 private:
  std::FILE* file_;
  const std::string& path_;
  std::uint64_t written_ = 0;
  std::uint64_t limit_ = ~std::uint64_t{0};
};

/// A file written in full to a temporary beside its destination and flushed
/// to disk, not yet in place: commit() renames it over the destination;
/// destroying it uncommitted removes the temporary. Staging several files
/// before committing any means a failed write (a full disk) changes none.
/// The new file gets the mode of the file it replaces, or 0666 less the
/// umask when there is none, as a plain open() would give it.
class StagedFile {
 public:
  StagedFile(const std::string& path, const std::function<void(FileSink&)>& body) : path_(path) {
    namespace fs = std::filesystem;
    fs::path target(path);
    fs::path folder = target.has_parent_path() ? target.parent_path() : fs::path(".");
    // ".<name>.tmp-XXXXXX", with the name cut so the temporary fits NAME_MAX (255) whenever the target does.
    std::string stem = target.filename().string();
    constexpr std::size_t name_max = 255, extra = 1 + 11;  // "." and ".tmp-XXXXXX"
    if (stem.size() + extra > name_max) stem.resize(name_max > extra ? name_max - extra : 0);
    temp_ = (folder / ("." + stem + ".tmp-XXXXXX")).string();
#if LORA_HAVE_POSIX_FILES
    std::FILE* file = nullptr;
    {
      // mkstemp's 0600 would ignore the umask; O_CREAT | O_EXCL with 0666 lets the kernel apply it.
      const std::string pattern = temp_;
      int fd = -1;
      for (unsigned attempt = 0; fd < 0 && attempt < 100; ++attempt) {
        temp_ = pattern.substr(0, pattern.size() - 6) + random_suffix();
        fd = ::open(temp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        if (fd < 0 && errno != EEXIST) break;
      }
      if (fd < 0)
        throw io_error(path + ": cannot create a temporary file in " + folder.string() + ": " + errno_text(errno));
      struct stat existing {};
      if (::stat(path.c_str(), &existing) == 0 && S_ISREG(existing.st_mode))
        ::fchmod(fd, existing.st_mode & 07777);  // replacing a file keeps its permissions
      file = ::fdopen(fd, "wb");
      if (file == nullptr) {
        int code = errno;
        ::close(fd);
        ::unlink(temp_.c_str());
        throw io_error(path + ": cannot open the temporary file: " + errno_text(code));
      }
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
#if LORA_HAVE_POSIX_FILES
  /// Six characters for the temporary's name, different per call, process and time.
  static std::string random_suffix() {
    static constexpr char alphabet[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    static std::atomic<std::uint64_t> counter{0};
    std::uint64_t x = static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count()) ^
                      (static_cast<std::uint64_t>(::getpid()) << 32) ^ (counter.fetch_add(1) * 0x9e3779b97f4a7c15ull);
    std::string out(6, 'x');
    for (char& c : out) {
      x ^= x >> 33;
      x *= 0xff51afd7ed558ccdull;
      x ^= x >> 29;
      c = alphabet[x % (sizeof alphabet - 1)];
    }
    return out;
  }
#endif

  std::string path_, temp_;
  bool committed_ = false;
};

}  // namespace lora::detail
