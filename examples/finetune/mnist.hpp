// Reading (Fashion-)MNIST: gzip'd IDX files through zlib, every header checked.
//
// IDX: a big-endian magic 0x000008DD (08 = unsigned bytes, DD = number of dimensions), DD big-endian uint32
// sizes, then the bytes row-major. Images: dims (count, 28, 28), magic 0x00000803; labels: dims (count),
// magic 0x00000801. Debian's dataset-fashion-mnist installs them under /usr/share/datasets/fashion-mnist/.
//
// Not part of the header-only library (it needs zlib); shared by examples/finetune and its test.
#pragma once

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace mnist {

inline const char* const kDefaultDir = "/usr/share/datasets/fashion-mnist";
inline const char* const kInstallHint =
    "install the data set with: sudo apt-get install dataset-fashion-mnist (or run tools/install-deps.sh)";
inline const char* const kReinstallHint =
    "the file is damaged; reinstall it with: sudo apt-get install --reinstall dataset-fashion-mnist";

/// A file is damaged: wrong magic, sizes, truncated, not valid gzip, extra bytes.
class idx_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A file is missing or unreadable; the message carries the install command.
class missing_data_error : public idx_error {
 public:
  using idx_error::idx_error;
};

/// Images as bytes, row-major (count, rows·cols), and their labels.
struct Dataset {
  std::vector<std::uint8_t> pixels;
  std::vector<int> labels;
  std::size_t count = 0;
  std::size_t rows = 0, cols = 0;
  std::size_t pixels_per_image() const { return rows * cols; }
  const std::uint8_t* image(std::size_t i) const { return pixels.data() + i * pixels_per_image(); }
};

namespace detail {

struct GzCloser {
  void operator()(gzFile_s* f) const { gzclose(f); }
};
using GzFile = std::unique_ptr<gzFile_s, GzCloser>;

inline std::string hex32(std::uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08X", v);
  return buf;
}

// Reads exactly n bytes (or throws, naming what was being read, how much was expected and how much came).
inline void read_exact(gzFile file, const std::string& path, const char* what, void* out, std::size_t n) {
  auto* dst = static_cast<unsigned char*>(out);
  std::size_t got = 0;
  while (got < n) {
    const unsigned chunk = static_cast<unsigned>(std::min<std::size_t>(n - got, 1u << 30));
    const int r = gzread(file, dst + got, chunk);
    if (r < 0) {
      int code = 0;
      const char* msg = gzerror(file, &code);
      throw idx_error(path + ": not a valid gzip stream (zlib: " + msg + "); " + kReinstallHint);
    }
    if (r == 0) break;
    got += static_cast<std::size_t>(r);
  }
  if (got != n) {
    int code = 0;
    const char* msg = gzerror(file, &code);
    throw idx_error(path + ": truncated: expected " + std::to_string(n) + " bytes of " + what + ", got " +
                    std::to_string(got) + (code != Z_OK ? std::string(" (zlib: ") + msg + ")" : std::string()) + "; " +
                    kReinstallHint);
  }
}

inline std::uint32_t big_endian(const unsigned char* b) {
  return (std::uint32_t(b[0]) << 24) | (std::uint32_t(b[1]) << 16) | (std::uint32_t(b[2]) << 8) | std::uint32_t(b[3]);
}

// Opens path and reads an IDX header of unsigned bytes with `dims` dimensions; returns the sizes.
inline std::vector<std::uint32_t> open_idx(const std::string& path, std::uint32_t dims, GzFile& file) {
  errno = 0;
  file.reset(gzopen(path.c_str(), "rb"));
  if (!file) {
    const std::string why = errno ? std::strerror(errno) : "cannot open";
    throw missing_data_error(path + ": " + why + "; " + kInstallHint);
  }
  unsigned char header[4];
  read_exact(file.get(), path, "IDX magic", header, 4);
  const std::uint32_t magic = big_endian(header), expected = 0x0800u | dims;
  if (magic != expected)
    throw idx_error(path + ": not an IDX file of unsigned bytes with " + std::to_string(dims) +
                    " dimensions: expected magic " + hex32(expected) + ", got " + hex32(magic));
  std::vector<std::uint32_t> sizes(dims);
  for (auto& s : sizes) {
    read_exact(file.get(), path, "IDX sizes", header, 4);
    s = big_endian(header);
  }
  return sizes;
}

// After the payload the stream must end; reading on also makes zlib check the gzip trailer (CRC and length).
inline void expect_end(gzFile file, const std::string& path, std::size_t payload) {
  unsigned char extra;
  const int r = gzread(file, &extra, 1);
  if (r < 0) {
    int code = 0;
    const char* msg = gzerror(file, &code);
    throw idx_error(path + ": gzip check failed after the " + std::to_string(payload) + " bytes of data (zlib: " + msg +
                    "); " + kReinstallHint);
  }
  if (r > 0)
    throw idx_error(path + ": expected the file to end after " + std::to_string(payload) +
                    " bytes of data (as its header says), but there is more");
}

}  // namespace detail

/// Reads an idx3 image file: (count, rows, cols) bytes. Throws missing_data_error or idx_error.
inline Dataset read_images(const std::string& path) {
  detail::GzFile file;
  const auto sizes = detail::open_idx(path, 3, file);
  Dataset d;
  d.count = sizes[0];
  d.rows = sizes[1];
  d.cols = sizes[2];
  if (d.rows == 0 || d.cols == 0 || d.rows > 4096 || d.cols > 4096)
    throw idx_error(path + ": expected image sizes between 1 and 4096, got " + std::to_string(d.rows) + " x " +
                    std::to_string(d.cols));
  const std::size_t n = d.count * d.rows * d.cols;
  d.pixels.resize(n);
  detail::read_exact(file.get(), path,
                     ("pixels (" + std::to_string(d.count) + " images of " + std::to_string(d.rows) + " x " +
                      std::to_string(d.cols) + ")")
                         .c_str(),
                     d.pixels.data(), n);
  detail::expect_end(file.get(), path, n);
  return d;
}

/// Reads an idx1 label file: count bytes, each below num_classes.
inline std::vector<int> read_labels(const std::string& path, int num_classes = 10) {
  detail::GzFile file;
  const auto sizes = detail::open_idx(path, 1, file);
  std::vector<std::uint8_t> bytes(sizes[0]);
  detail::read_exact(file.get(), path, "labels", bytes.data(), bytes.size());
  detail::expect_end(file.get(), path, bytes.size());
  std::vector<int> labels(bytes.begin(), bytes.end());
  for (std::size_t i = 0; i < labels.size(); ++i)
    if (labels[i] >= num_classes)
      throw idx_error(path + ": label " + std::to_string(i) + " expected in [0, " + std::to_string(num_classes) +
                      "), got " + std::to_string(labels[i]));
  return labels;
}

/// Images and labels of one split: "train" or "t10k" (the IDX file prefixes).
inline Dataset load(const std::string& dir, const std::string& split) {
  const std::string images = dir + "/" + split + "-images-idx3-ubyte.gz";
  const std::string labels = dir + "/" + split + "-labels-idx1-ubyte.gz";
  Dataset d = read_images(images);
  d.labels = read_labels(labels);
  if (d.labels.size() != d.count)
    throw idx_error(labels + ": expected " + std::to_string(d.count) + " labels (one per image in " + images +
                    "), got " + std::to_string(d.labels.size()));
  return d;
}

}  // namespace mnist
