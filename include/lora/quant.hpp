// Low-precision storage for a frozen weight: bf16, f16, 8-bit blocks (ggml's
// q8_0) and 4-bit NF4 blocks (bitsandbytes' QLoRA format).
//
// A QuantizedMatrix holds a row-major (rows, cols) matrix as its bytes in one
// format. It is immutable: copies share the bytes. FrozenWeight<float>
// (<lora/weight.hpp>) wraps one as a layer's W, in either layout, and its
// products never dequantise W as a whole: they decode it a tile at a time
// into a packed panel that stays in cache (<lora/detail/qgemm.hpp>).
//
//   format  bytes / parameter            blocks                         as
//   f32     4                            -                              float
//   bf16    2                            -                              torch.bfloat16, round to nearest even
//   f16     2                            -                              IEEE binary16, round to nearest even
//   q8_0    34/32 = 1.0625               32 along a row: f16 scale d,   ggml's block_q8_0 and
//                                        then 32 int8 q; x = q · d       quantize_row_q8_0_ref
//   nf4     0.5 + 4/64 (absmax float)    64 (or any power of two ≥ 32)  bitsandbytes' quantize_4bit (NF4):
//           0.5 + 1/64 + 4/16384         over the flat row-major array; code[q] · absmax, two codes a byte,
//           (absmax double-quantised)    the last block padded           the first in the high nibble
//
// Shapes. q8_0 needs cols to be a multiple of 32 (its blocks never cross a
// row, as in ggml; anything else is refused with the shape). NF4 blocks run
// over the flattened matrix as bitsandbytes' do, so any shape is taken: the
// last block may be short, and an odd element count pads a zero nibble.
//
// Values. Quantising refuses NaN and infinity (numeric_error naming the row
// and column); a bf16 or f16 buffer viewed in place is taken as it is.
#pragma once

#ifndef LORA_INSIDE_LIBRARY
#define LORA_INSIDE_LIBRARY
#endif

#include <lora/detail/half.hpp>
#include <lora/detail/simd.hpp>  // LORA_X86_KERNELS, LORA_AVX512, cpu_has_avx512()
#include <lora/errors.hpp>
#include <lora/types.hpp>
#include <lora/weight.hpp>  // WeightFormat, LowPrecisionStorage

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

// GCC before 13 reports -W(maybe-)uninitialized inside its own AVX-512 intrinsics once they are inlined into the
// kernels below (_mm512_undefined_*, GCC bug 105593): false positives, silenced here only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace lora {

namespace detail {
struct QGemm;
}

namespace detail {
// a · b and a + b each rounded to float on their own: a build with -ffp-contract=fast (GCC's default with FMA
// enabled) would otherwise fuse a product and a sum into one rounding, which the reference implementations do not.
inline float mul_rounded(float a, float b) {
  volatile float p = a * b;
  return p;
}
inline float add_rounded(float a, float b) {
  volatile float s = a + b;
  return s;
}
}  // namespace detail

namespace quant {

/// ggml's block_q8_0: a half-precision scale d, then 32 int8 values q; value j is q[j] · d.
inline constexpr Index q8_0_block = 32;
inline constexpr std::size_t q8_0_block_bytes = 34;

/// Quantises 32 floats into one block_q8_0 (34 bytes) exactly as ggml's quantize_row_q8_0_ref:
/// d = amax / 127, q = roundf(x · (1/d)), d stored as f16.
inline void quantize_q8_0_block(const float* x, std::uint8_t* out) {
  float amax = 0.0f;
  for (Index j = 0; j < q8_0_block; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float d = amax / 127;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  const std::uint16_t dh = detail::float_to_half(d);
  out[0] = static_cast<std::uint8_t>(dh & 0xff);
  out[1] = static_cast<std::uint8_t>(dh >> 8);
  for (Index j = 0; j < q8_0_block; ++j)
    out[2 + j] = static_cast<std::uint8_t>(static_cast<std::int8_t>(std::roundf(x[j] * id)));
}

/// One block_q8_0 back to 32 floats, as ggml's dequantize_row_q8_0 (q · d in float).
inline void dequantize_q8_0_block(const std::uint8_t* block, float* out) {
  const float d = detail::half_to_float(static_cast<std::uint16_t>(block[0] | (block[1] << 8)));
  for (Index j = 0; j < q8_0_block; ++j) out[j] = static_cast<float>(static_cast<std::int8_t>(block[2 + j])) * d;
}

/// bitsandbytes' NF4 code values (get_4bit_type("nf4"), _NF4_QUANT_TABLE), sorted.
inline constexpr std::array<float, 16> nf4_code = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

/// The index of the code nearest to v in a sorted code table, as bitsandbytes' quantisers find it:
/// torch.bucketize(v, midpoints) with the midpoints (code[i] + code[i+1]) / 2 in float, so a value exactly on a
/// midpoint takes the lower code. `midpoints` has code size − 1 entries.
inline std::uint8_t nearest_code(float v, const float* midpoints, int count) {
  int lo = 0, hi = count;  // the first i with v <= midpoints[i], or count
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (v <= midpoints[mid])
      hi = mid;
    else
      lo = mid + 1;
  }
  return static_cast<std::uint8_t>(lo);
}

/// bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)),
/// which double quantisation uses for the absmax values: computed in float as torch computes it.
inline std::array<float, 256> dynamic_map() {
  std::vector<float> data;
  // torch.linspace(float32) as PyTorch's CPU kernel computes it (RangeFactoriesKernel.cpp, built for AVX2): runs of
  // 16 values as two vectors of 8, each base + lane · step from its first value; the first value of a vector and
  // the values after the last run are start + step · i (or end − step · (steps − 1 − i) past halfway), which the
  // compiler fused into one rounding. This reproduces the map bitsandbytes computes and saves, bit for bit.
  const auto linspace = [](float start, float end, int steps) {
    std::vector<float> v(static_cast<std::size_t>(steps));
    const float step = (end - start) / static_cast<float>(steps - 1);
    const int halfway = steps / 2;
    const auto at = [&](int i) {
      return i < halfway ? std::fma(step, static_cast<float>(i), start)
                         : std::fma(-step, static_cast<float>(steps - i - 1), end);
    };
    int i = 0;
    for (; i + 16 <= steps; i += 16)
      for (int h = 0; h < 16; h += 8) {
        const float base = at(i + h);
        for (int lane = 0; lane < 8; ++lane)
          v[static_cast<std::size_t>(i + h + lane)] =
              detail::add_rounded(base, detail::mul_rounded(static_cast<float>(lane), step));
      }
    for (; i < steps; ++i) v[static_cast<std::size_t>(i)] = at(i);
    return v;
  };
  for (int i = 0; i < 7; ++i) {
    const int items = (1 << i) + 1;
    const auto b = linspace(0.1f, 1.0f, items);
    const float scale = static_cast<float>(std::pow(10.0, -6 + i));
    for (int k = 0; k + 1 < items; ++k) data.push_back(scale * ((b[k] + b[k + 1]) / 2.0f));
    for (int k = 0; k + 1 < items; ++k) data.push_back(-scale * ((b[k] + b[k + 1]) / 2.0f));
  }
  data.push_back(0.0f);
  data.push_back(1.0f);
  while (data.size() < 256) data.push_back(0.0f);
  std::sort(data.begin(), data.end());
  std::array<float, 256> out{};
  std::copy(data.begin(), data.end(), out.begin());
  return out;
}

}  // namespace quant

/// Options for QuantizedMatrix::quantize.
struct QuantizeOptions {
  /// NF4: elements per absmax block (bitsandbytes' blocksize: a power of two, 32 to 4096; 64 is its default).
  Index block_size = 64;
  /// NF4: quantise the absmax values again (bitsandbytes' compress_statistics, QLoRA's double quantisation):
  /// absmax − mean in 8-bit dynamic blocks of 256.
  bool double_quant = false;
};

/// How products with a low-precision matrix are computed.
///   float32  S is decoded exactly to float and every product and sum is float (the default).
///   bf16     S's values (decoded, when not stored in bf16) and the other operand (x, or dy in backward) are
///            rounded to bf16; products of two bf16 values are exact in float and summed in float: PyTorch's bf16
///            Linear, and QLoRA's compute (bitsandbytes dequantises NF4 to bf16). Runs on AMX tiles where the CPU
///            and the OS allow them (several times float's rate), else AVX512_BF16, else portable code.
///   int8     q8_0 and NF4: x Wᵀ with 1 or 2 rows of x (a decoding step) on integer dot products, as llama.cpp
///            runs its 8- and 4-bit formats: each block of 32 values of x quantised to int8 with a float scale
///            d = amax / 127 (q = x / d to nearest, ties to even), its exact integer dot product with W's int8
///            codes, times d and W's scale, summed in float. NF4's 16 code values become int8 codes
///            (code · 127 / max|code|, to nearest; llama.cpp's IQ4_NL works so), which moves each of W's values by
///            at most absmax · max|code| / 254. On AVX512_VNNI where the CPU has it, else portable code with the
///            same integers. So results differ from float products by x's rounding (at most d / 2 per value of x)
///            and, for NF4, the codes' rounding. Every other product (more rows, dy W in backward, W stored (I, O),
///            rows not a multiple of 32 values) is a float product.
enum class Products { float32, bf16, int8 };

/// "float32", "bf16" or "int8".
inline const char* products_name(Products p) {
  switch (p) {
    case Products::float32:
      return "float32";
    case Products::bf16:
      return "bf16";
    case Products::int8:
      return "int8";
  }
  return "unknown";
}

class QuantizedMatrix {
 public:
  /// An empty matrix (0 x 0).
  QuantizedMatrix() = default;

  /// Quantises `m` (rows, cols) into `format`. Throws numeric_error for a NaN or infinite value (naming its row
  /// and column), shape_error for q8_0 when cols is not a multiple of 32, config_error for a bad NF4 block size.
  static QuantizedMatrix quantize(const ConstRef<float>& m, WeightFormat format, const QuantizeOptions& options = {}) {
    const Index rows = m.rows(), cols = m.cols();
    check_shape("QuantizedMatrix::quantize", format, rows, cols);
    for (Index r = 0; r < rows; ++r)
      for (Index c = 0; c < cols; ++c)
        if (!std::isfinite(m(r, c)))
          throw numeric_error("QuantizedMatrix::quantize: the value at row " + std::to_string(r) + ", column " +
                              std::to_string(c) + " is " + value_string(static_cast<double>(m(r, c))) +
                              "; only finite values can be quantised to " + format_name(format));
    auto s = std::make_shared<State>();
    s->format = format;
    s->rows = rows;
    s->cols = cols;
    const std::size_t n = static_cast<std::size_t>(rows) * static_cast<std::size_t>(cols);
    switch (format) {
      case WeightFormat::f32:
        s->owned.resize(n * 4);
        for (Index r = 0; r < rows; ++r)
          std::memcpy(s->owned.data() + 4 * r * cols, m.data() + r * m.outerStride(),
                      4 * static_cast<std::size_t>(cols));
        break;
      case WeightFormat::bf16:
      case WeightFormat::f16:
        s->owned.resize(n * 2);
        for (Index r = 0; r < rows; ++r)
          for (Index c = 0; c < cols; ++c) {
            const std::uint16_t h =
                format == WeightFormat::bf16 ? detail::float_to_bf16(m(r, c)) : detail::float_to_half(m(r, c));
            std::memcpy(s->owned.data() + 2 * (r * cols + c), &h, 2);
          }
        break;
      case WeightFormat::q8_0: {
        s->owned.resize(n / quant::q8_0_block * quant::q8_0_block_bytes);
        std::uint8_t* out = s->owned.data();
        for (Index r = 0; r < rows; ++r)
          for (Index c = 0; c < cols; c += quant::q8_0_block, out += quant::q8_0_block_bytes)
            quant::quantize_q8_0_block(m.data() + r * m.outerStride() + c, out);
        break;
      }
      case WeightFormat::nf4:
        quantize_nf4(m, options, *s);
        break;
    }
    s->data = s->owned.data();
    return QuantizedMatrix(std::move(s));
  }

  /// Views `data`, a row-major (rows, cols) buffer in `format` (f32, bf16, f16: the values; q8_0: rows · cols/32
  /// blocks of 34 bytes), without copying it: e.g. a BF16 tensor of a mapped safetensors file. The buffer must
  /// outlive every copy of the matrix. NF4 has its own constructor (nf4()).
  static QuantizedMatrix view(WeightFormat format, const void* data, Index rows, Index cols) {
    if (format == WeightFormat::nf4)
      throw config_error("QuantizedMatrix::view: NF4 needs its absmax values; use QuantizedMatrix::nf4()");
    check_shape("QuantizedMatrix::view", format, rows, cols);
    if (data == nullptr) throw shape_error("QuantizedMatrix::view: the buffer must not be null");
    auto s = std::make_shared<State>();
    s->format = format;
    s->rows = rows;
    s->cols = cols;
    s->data = static_cast<const std::uint8_t*>(data);
    return QuantizedMatrix(std::move(s));
  }

  /// As view(), but the matrix keeps `bytes` (moved in): e.g. a matrix quantised a block of rows at a time.
  static QuantizedMatrix from_bytes(WeightFormat format, Index rows, Index cols, std::vector<std::uint8_t> bytes) {
    if (format == WeightFormat::nf4)
      throw config_error("QuantizedMatrix::from_bytes: NF4 needs its absmax values; use QuantizedMatrix::nf4()");
    check_shape("QuantizedMatrix::from_bytes", format, rows, cols);
    auto s = std::make_shared<State>();
    s->format = format;
    s->rows = rows;
    s->cols = cols;
    const std::size_t want = QuantizedMatrix(s).bytes();
    if (bytes.size() != want)
      throw shape_error("QuantizedMatrix::from_bytes: " + std::string(format_name(format)) + " " +
                        shape_string(rows, cols) + " needs " + std::to_string(want) + " bytes, got " +
                        std::to_string(bytes.size()));
    s->owned = std::move(bytes);
    s->data = s->owned.data();
    return QuantizedMatrix(std::move(s));
  }

  /// An NF4 matrix from bitsandbytes' tensors, copied: `packed` ((rows·cols + 1) / 2 bytes, the first element in
  /// the high nibble), `absmax` (one float per block of `block_size` flat elements, the last block possibly short)
  /// and the 16-entry `code` (bitsandbytes' quant_map). Sizes are checked against the shape (shape_error naming
  /// what was expected and what came); absmax must be finite.
  static QuantizedMatrix nf4(Index rows, Index cols, Index block_size, std::vector<std::uint8_t> packed,
                             std::vector<float> absmax, const std::array<float, 16>& code = quant::nf4_code) {
    auto s = nf4_state("QuantizedMatrix::nf4", rows, cols, block_size, std::move(packed), code);
    const std::size_t blocks = s->block_count();
    if (absmax.size() != blocks)
      throw shape_error("QuantizedMatrix::nf4: absmax expected " + std::to_string(blocks) + " values (one per " +
                        std::to_string(block_size) + " of " + std::to_string(rows * cols) + " elements), got " +
                        std::to_string(absmax.size()));
    for (std::size_t b = 0; b < blocks; ++b)
      if (!std::isfinite(absmax[b]))
        throw numeric_error("QuantizedMatrix::nf4: absmax of block " + std::to_string(b) + " is " +
                            value_string(static_cast<double>(absmax[b])));
    s->absmax = std::move(absmax);
    return QuantizedMatrix(std::move(s));
  }

  /// An NF4 matrix whose absmax values are double-quantised (bitsandbytes' compress_statistics): block b's absmax
  /// is nested_code[absmax_q[b]] · nested_absmax[b / nested_block_size] + offset, in float.
  static QuantizedMatrix nf4_double(Index rows, Index cols, Index block_size, std::vector<std::uint8_t> packed,
                                    std::vector<std::uint8_t> absmax_q, std::vector<float> nested_absmax,
                                    const std::array<float, 256>& nested_code, float offset,
                                    Index nested_block_size = 256,
                                    const std::array<float, 16>& code = quant::nf4_code) {
    const char* where = "QuantizedMatrix::nf4_double";
    auto s = nf4_state(where, rows, cols, block_size, std::move(packed), code);
    const std::size_t blocks = s->block_count();
    if (absmax_q.size() != blocks)
      throw shape_error(std::string(where) + ": the quantised absmax expected " + std::to_string(blocks) +
                        " bytes (one per block of " + std::to_string(block_size) + "), got " +
                        std::to_string(absmax_q.size()));
    if (nested_block_size <= 0)
      throw config_error(std::string(where) + ": the nested block size must be positive, got " +
                         std::to_string(nested_block_size));
    const std::size_t nested = (blocks + static_cast<std::size_t>(nested_block_size) - 1) / nested_block_size;
    if (nested_absmax.size() != nested)
      throw shape_error(std::string(where) + ": nested_absmax expected " + std::to_string(nested) +
                        " values (one per " + std::to_string(nested_block_size) + " of " + std::to_string(blocks) +
                        " blocks), got " + std::to_string(nested_absmax.size()));
    for (float v : nested_absmax)
      if (!std::isfinite(v)) throw numeric_error(std::string(where) + ": nested_absmax holds " + value_string(v));
    for (float v : nested_code)
      if (!std::isfinite(v)) throw numeric_error(std::string(where) + ": the nested code holds " + value_string(v));
    if (!std::isfinite(offset)) throw numeric_error(std::string(where) + ": the offset is " + value_string(offset));
    s->double_quant = true;
    s->absmax_q = std::move(absmax_q);
    s->nested_absmax = std::move(nested_absmax);
    s->nested_code = nested_code;
    s->offset = offset;
    s->nested_block = nested_block_size;
    return QuantizedMatrix(std::move(s));
  }

  /// This matrix with products computed as `products` says (a copy sharing the bytes). Throws config_error for
  /// int8 products over a format other than q8_0, and leaves this matrix as it was.
  QuantizedMatrix with_products(Products products) const {
    if (products == Products::int8 && format() != WeightFormat::q8_0 && format() != WeightFormat::nf4)
      throw config_error(std::string("QuantizedMatrix::with_products: int8 products need a q8_0 or nf4 matrix "
                                     "(integer codes), this one is ") +
                         format_name(format()));
    QuantizedMatrix q = *this;
    q.products_ = products;
    return q;
  }
  Products products() const { return products_; }

  /// This matrix as the storage a FrozenWeight<float> holds (FrozenWeight<float>::quantized(q) calls it): its
  /// products go through this header's kernels.
  std::shared_ptr<const LowPrecisionStorage> storage() const;

  WeightFormat format() const { return s_ ? s_->format : WeightFormat::f32; }
  Index rows() const { return s_ ? s_->rows : 0; }
  Index cols() const { return s_ ? s_->cols : 0; }
  bool empty() const { return rows() == 0; }
  /// True when the values are a buffer the caller owns (view()).
  bool is_view() const { return s_ && s_->owned.empty(); }

  /// Bytes this matrix keeps for its values: the elements or blocks, and NF4's absmax (float, or 1 byte per block
  /// with its nested scales when double-quantised) and code tables.
  std::size_t bytes() const {
    if (!s_) return 0;
    const std::size_t n = static_cast<std::size_t>(rows()) * static_cast<std::size_t>(cols());
    switch (s_->format) {
      case WeightFormat::f32:
        return 4 * n;
      case WeightFormat::bf16:
      case WeightFormat::f16:
        return 2 * n;
      case WeightFormat::q8_0:
        return n / quant::q8_0_block * quant::q8_0_block_bytes;
      case WeightFormat::nf4:
        return s_->packed_bytes() + 4 * s_->absmax.size() + s_->absmax_q.size() + 4 * s_->nested_absmax.size() +
               4 * 16 + (s_->double_quant ? 4 * 256 + 4 : 0);
    }
    return 0;
  }

  /// The stored bytes (elements, q8_0 blocks or NF4's packed nibbles).
  const std::uint8_t* data() const { return s_ ? s_->data : nullptr; }
  std::size_t data_bytes() const {
    if (!s_) return 0;
    return s_->format == WeightFormat::nf4 ? s_->packed_bytes() : bytes();
  }
  /// NF4's block size, code table and absmax values as floats (de-double-quantised).
  Index block_size() const { return s_ ? s_->block : 0; }
  const std::array<float, 16>& code() const { return s_->code; }
  bool double_quant() const { return s_ && s_->double_quant; }
  std::vector<float> absmax() const {
    std::vector<float> out(s_ ? s_->block_count() : 0);
    for (std::size_t b = 0; b < out.size(); ++b) out[b] = s_->absmax_of(b);
    return out;
  }
  /// NF4 double quantisation's tensors (empty otherwise).
  const std::vector<std::uint8_t>& absmax_q() const { return s_->absmax_q; }
  const std::vector<float>& nested_absmax() const { return s_->nested_absmax; }
  const std::array<float, 256>& nested_code() const { return s_->nested_code; }
  float offset() const { return s_->offset; }
  Index nested_block_size() const { return s_->nested_block; }

  /// Decodes `count` values of row `row` from column `col` into out (float), with the fastest kernel this CPU has.
  void decode(Index row, Index col, Index count, float* out) const {
    const std::size_t e =
        static_cast<std::size_t>(row) * static_cast<std::size_t>(cols()) + static_cast<std::size_t>(col);
#ifdef LORA_X86_KERNELS
    if (has_avx512()) return decode_avx512(*s_, e, static_cast<std::size_t>(count), out);
#endif
    decode_portable(*s_, e, static_cast<std::size_t>(count), out);
  }
  /// decode() with the portable kernel whatever the CPU: the reference the SIMD kernels are tested against.
  void decode_reference(Index row, Index col, Index count, float* out) const {
    decode_portable(*s_,
                    static_cast<std::size_t>(row) * static_cast<std::size_t>(cols()) + static_cast<std::size_t>(col),
                    static_cast<std::size_t>(count), out);
  }

  /// The whole matrix in float (rows, cols): for tests, inspection and writing files, never used by the layers.
  Matrix<float> dequantize() const {
    Matrix<float> out(rows(), cols());
    for (Index r = 0; r < rows(); ++r) decode(r, 0, cols(), out.row(r).data());
    return out;
  }

  /// True when the bf16 dot-product kernels run: has_avx512() and this CPU has AVX512_BF16.
  static bool has_avx512_bf16() {
#ifdef LORA_X86_KERNELS
    static const bool has = __builtin_cpu_supports("avx512bf16");
    return has && has_avx512();
#else
    return false;
#endif
  }

  /// True when the int8 dot-product kernels run: has_avx512() and this CPU has AVX512_VNNI.
  static bool has_avx512_vnni() {
#ifdef LORA_X86_KERNELS
    static const bool has = __builtin_cpu_supports("avx512vnni");
    return has && has_avx512();
#else
    return false;
#endif
  }

  /// True when the AVX-512 kernels run: this CPU has AVX-512 (F, BW, VL, DQ; read once) and they are not turned off.
  static bool has_avx512() { return detail::cpu_has_avx512() && !portable_only().load(std::memory_order_relaxed); }
  /// Runs the portable kernels even on an AVX-512 CPU (for tests and benchmarks that compare the two).
  static void force_portable_kernels(bool on) { portable_only().store(on, std::memory_order_relaxed); }

 private:
  friend struct detail::QGemm;  // its fused kernels read the blocks directly

  struct State {
    WeightFormat format = WeightFormat::f32;
    Index rows = 0, cols = 0;
    std::vector<std::uint8_t> owned;
    const std::uint8_t* data = nullptr;
    // NF4
    Index block = 64;
    std::array<float, 16> code = quant::nf4_code;
    std::vector<float> absmax;
    bool double_quant = false;
    std::vector<std::uint8_t> absmax_q;
    std::vector<float> nested_absmax;
    std::array<float, 256> nested_code{};
    float offset = 0;
    Index nested_block = 256;

    std::size_t elements() const { return static_cast<std::size_t>(rows) * static_cast<std::size_t>(cols); }
    std::size_t packed_bytes() const { return (elements() + 1) / 2; }
    std::size_t block_count() const {
      return (elements() + static_cast<std::size_t>(block) - 1) / static_cast<std::size_t>(block);
    }
    /// The absmax of the block holding flat element e (blocks are powers of two: a shift, not a division).
    float absmax_at(std::size_t e) const {
#if defined(__GNUC__) || defined(__clang__)
      return absmax_of(e >> __builtin_ctzll(static_cast<unsigned long long>(block)));
#else
      return absmax_of(e / static_cast<std::size_t>(block));
#endif
    }
    float absmax_of(std::size_t b) const {
      if (!double_quant) return absmax[b];
      // bitsandbytes rounds the product, then adds (two float operations, never one fused).
      return detail::add_rounded(
          detail::mul_rounded(nested_code[absmax_q[b]], nested_absmax[b / static_cast<std::size_t>(nested_block)]),
          offset);
    }
  };

  explicit QuantizedMatrix(std::shared_ptr<State> s) : s_(std::move(s)) {}

  static std::atomic<bool>& portable_only() {
    static std::atomic<bool> on{false};
    return on;
  }

  static void check_shape(const char* where, WeightFormat format, Index rows, Index cols) {
    if (rows <= 0 || cols <= 0)
      throw shape_error(std::string(where) + ": the matrix must not be empty, got " + shape_string(rows, cols));
    if (format == WeightFormat::q8_0 && cols % quant::q8_0_block != 0)
      throw shape_error(std::string(where) +
                        ": q8_0 stores blocks of 32 along a row, so the row length (columns) must "
                        "be a multiple of 32, got " +
                        shape_string(rows, cols) + " (as stored); ggml refuses it too");
  }

  static void check_block_size(const char* where, Index block) {
    if (block < 32 || block > 4096 || (block & (block - 1)) != 0)
      throw config_error(std::string(where) + ": the NF4 block size must be a power of two from 32 to 4096, got " +
                         std::to_string(block));
  }

  static std::shared_ptr<State> nf4_state(const char* where, Index rows, Index cols, Index block,
                                          std::vector<std::uint8_t> packed, const std::array<float, 16>& code) {
    check_shape(where, WeightFormat::nf4, rows, cols);
    check_block_size(where, block);
    for (std::size_t i = 0; i < code.size(); ++i)
      if (!std::isfinite(code[i]))
        throw numeric_error(std::string(where) + ": code value " + std::to_string(i) + " is " + value_string(code[i]));
    auto s = std::make_shared<State>();
    s->format = WeightFormat::nf4;
    s->rows = rows;
    s->cols = cols;
    s->block = block;
    s->code = code;
    if (packed.size() != s->packed_bytes())
      throw shape_error(std::string(where) + ": the packed weight expected " + std::to_string(s->packed_bytes()) +
                        " bytes (two 4-bit codes a byte for " + shape_string(rows, cols) + "), got " +
                        std::to_string(packed.size()));
    s->owned = std::move(packed);
    s->data = s->owned.data();
    return s;
  }

  // bitsandbytes' quantize_4bit (backends/default/ops.py) on the flattened matrix, then, for double quantisation,
  // its quantize_blockwise of absmax − mean(absmax) with the dynamic map in blocks of 256 (functional.py).
  static void quantize_nf4(const ConstRef<float>& m, const QuantizeOptions& options, State& s) {
    check_block_size("QuantizedMatrix::quantize", options.block_size);
    s.block = options.block_size;
    const std::size_t n = s.elements(), block = static_cast<std::size_t>(s.block);
    const std::size_t blocks = s.block_count(), full = n / block;
    std::vector<float> flat(n);
    for (Index r = 0; r < m.rows(); ++r)
      for (Index c = 0; c < m.cols(); ++c) flat[static_cast<std::size_t>(r * m.cols() + c)] = m(r, c);
    float mid[15];
    for (int i = 0; i < 15; ++i) mid[i] = (s.code[i] + s.code[i + 1]) / 2;
    s.absmax.assign(blocks, 0.0f);
    s.owned.assign(s.packed_bytes(), 0);
    std::vector<std::uint8_t> codes(2 * s.packed_bytes(), 7);  // the pad is a zero value: code 7
    for (std::size_t b = 0; b < blocks; ++b) {
      const std::size_t begin = b * block, end = std::min(n, begin + block);
      float amax = 0;
      for (std::size_t e = begin; e < end; ++e) amax = std::max(amax, std::fabs(flat[e]));
      const float clamped = std::max(amax, 1e-38f);
      // Full blocks multiply by the reciprocal and store absmax as it is; the short last block divides and stores
      // the clamped value (bitsandbytes' two branches).
      const bool short_block = b >= full;
      s.absmax[b] = short_block ? clamped : amax;
      const float inv = 1.0f / clamped;
      for (std::size_t e = begin; e < end; ++e) {
        const float scaled = std::clamp(short_block ? flat[e] / clamped : flat[e] * inv, -1.0f, 1.0f);
        codes[e] = quant::nearest_code(scaled, mid, 15);
      }
    }
    for (std::size_t i = 0; i < s.owned.size(); ++i)
      s.owned[i] = static_cast<std::uint8_t>((codes[2 * i] << 4) | codes[2 * i + 1]);
    if (!options.double_quant) return;
    // offset = absmax.mean() (float32: torch sums pairwise; the double sum rounded is what it gets within an ulp)
    double sum = 0;
    for (float a : s.absmax) sum += a;
    s.offset = static_cast<float>(sum / static_cast<double>(blocks));
    s.double_quant = true;
    s.nested_block = 256;
    s.nested_code = quant::dynamic_map();
    float nested_mid[255];
    for (int i = 0; i < 255; ++i) nested_mid[i] = (s.nested_code[i] + s.nested_code[i + 1]) / 2;
    const std::size_t nb = 256, nested_full = blocks / nb;
    const std::size_t nested = (blocks + nb - 1) / nb;
    s.nested_absmax.assign(nested, 0.0f);
    s.absmax_q.assign(blocks, 0);
    for (std::size_t j = 0; j < nested; ++j) {
      const std::size_t begin = j * nb, end = std::min(blocks, begin + nb);
      float amax = 0;
      for (std::size_t b = begin; b < end; ++b) amax = std::max(amax, std::fabs(s.absmax[b] - s.offset));
      const float clamped = std::max(amax, 1e-38f);
      const bool short_block = j >= nested_full;
      s.nested_absmax[j] = short_block ? clamped : amax;
      const float inv = 1.0f / clamped;
      for (std::size_t b = begin; b < end; ++b) {
        const float v = s.absmax[b] - s.offset;
        const float scaled = std::clamp(short_block ? v / clamped : v * inv, -1.0f, 1.0f);
        s.absmax_q[b] = quant::nearest_code(scaled, nested_mid, 255);
      }
    }
    s.absmax.clear();
  }

  // ---- decoding: values e .. e + count of the flat row-major array ----

  static void decode_portable(const State& s, std::size_t e, std::size_t count, float* out) {
    const std::uint8_t* p = s.data;
    switch (s.format) {
      case WeightFormat::f32:
        std::memcpy(out, p + 4 * e, 4 * count);
        return;
      case WeightFormat::bf16:
        for (std::size_t j = 0; j < count; ++j) out[j] = detail::bf16_to_float(load16(p + 2 * (e + j)));
        return;
      case WeightFormat::f16:
        for (std::size_t j = 0; j < count; ++j) out[j] = detail::half_to_float(load16(p + 2 * (e + j)));
        return;
      case WeightFormat::q8_0:
        for (std::size_t j = 0; j < count; ++j) {
          const std::size_t k = e + j;
          const std::uint8_t* blk = p + k / quant::q8_0_block * quant::q8_0_block_bytes;
          out[j] = static_cast<float>(static_cast<std::int8_t>(blk[2 + k % quant::q8_0_block])) *
                   detail::half_to_float(load16(blk));
        }
        return;
      case WeightFormat::nf4:
        for (std::size_t j = 0; j < count; ++j) {
          const std::size_t k = e + j;
          const std::uint8_t byte = p[k / 2];
          const int q = (k % 2 == 0) ? byte >> 4 : byte & 0xf;
          out[j] = s.code[static_cast<std::size_t>(q)] * s.absmax_at(k);
        }
        return;
    }
  }

  static std::uint16_t load16(const std::uint8_t* p) { return static_cast<std::uint16_t>(p[0] | (p[1] << 8)); }

  // Where value e of the flat array is stored: its own bytes (f32, bf16, f16), the byte that holds its nibble
  // (NF4), or its block, scale first (q8_0). decode32_avx512 reads from here, and QGemm's kernels and prefetches.
  template <WeightFormat F>
  static const std::uint8_t* bytes_of(const State& s, std::size_t e) {
    if constexpr (F == WeightFormat::f32)
      return s.data + 4 * e;
    else if constexpr (F == WeightFormat::bf16 || F == WeightFormat::f16)
      return s.data + 2 * e;
    else if constexpr (F == WeightFormat::q8_0)
      return s.data + e / quant::q8_0_block * quant::q8_0_block_bytes;
    else
      return s.data + e / 2;
  }

#ifdef LORA_X86_KERNELS
  // Values e .. e + 31 of the flat array into two registers (e a multiple of 32 for q8_0 and NF4, so the 32 values
  // lie in one block): decode_avx512 below, and QGemm's fused kernels, which use them in place.
  template <WeightFormat F>
  LORA_AVX512 static void decode32_avx512(const State& s, std::size_t e, __m512& w0, __m512& w1) {
    const std::uint8_t* p = bytes_of<F>(s, e);
    if constexpr (F == WeightFormat::f32) {
      w0 = _mm512_loadu_ps(reinterpret_cast<const float*>(p));
      w1 = _mm512_loadu_ps(reinterpret_cast<const float*>(p) + 16);
    } else if constexpr (F == WeightFormat::bf16) {
      const __m512i h = _mm512_loadu_si512(p);
      w0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(h)), 16));
      w1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(h, 1)), 16));
    } else if constexpr (F == WeightFormat::f16) {
      w0 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      w1 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32)));
    } else if constexpr (F == WeightFormat::q8_0) {
      const std::uint8_t* blk = p;
      const __m512 d = _mm512_set1_ps(_cvtsh_ss(static_cast<unsigned short>(blk[0] | (blk[1] << 8))));
      w0 = _mm512_mul_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2)))), d);
      w1 = _mm512_mul_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 18)))), d);
    } else {
      const __m512 table = _mm512_loadu_ps(s.code.data());
      const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
      const __m512i second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
      const __m512 scale = _mm512_set1_ps(s.absmax_at(e));
      const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      const __m512i hi = _mm512_srli_epi32(bytes, 4), lo = _mm512_and_si512(bytes, _mm512_set1_epi32(0xf));
      w0 = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_permutex2var_epi32(hi, first, lo), table), scale);
      w1 = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_permutex2var_epi32(hi, second, lo), table), scale);
    }
  }

  LORA_AVX512 static void decode_avx512(const State& s, std::size_t e, std::size_t count, float* out) {
    const std::uint8_t* p = s.data;
    std::size_t j = 0;
    switch (s.format) {
      case WeightFormat::f32:
        std::memcpy(out, p + 4 * e, 4 * count);
        return;
      case WeightFormat::bf16:
        for (; j + 16 <= count; j += 16) {
          const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 2 * (e + j)));
          _mm512_storeu_ps(out + j, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
        }
        break;
      case WeightFormat::f16:
        for (; j + 16 <= count; j += 16)
          _mm512_storeu_ps(out + j,
                           _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 2 * (e + j)))));
        break;
      case WeightFormat::q8_0: {
        const std::size_t head = std::min(count, (quant::q8_0_block - e % quant::q8_0_block) % quant::q8_0_block);
        decode_portable(s, e, head, out);
        for (j = head; j + 32 <= count; j += 32) {
          __m512 w0, w1;
          decode32_avx512<WeightFormat::q8_0>(s, e + j, w0, w1);
          _mm512_storeu_ps(out + j, w0);
          _mm512_storeu_ps(out + j + 16, w1);
        }
        break;
      }
      case WeightFormat::nf4: {
        // 32 codes from 16 bytes: the high nibble of byte k is element 2k, the low nibble element 2k + 1.
        const std::size_t head = std::min(count, (32 - e % 32) % 32);
        decode_portable(s, e, head, out);
        for (j = head; j + 32 <= count; j += 32) {  // e + j: a multiple of 32, within one block (blocks ≥ 32)
          __m512 w0, w1;
          decode32_avx512<WeightFormat::nf4>(s, e + j, w0, w1);
          _mm512_storeu_ps(out + j, w0);
          _mm512_storeu_ps(out + j + 16, w1);
        }
        break;
      }
    }
    if (j < count) decode_portable(s, e + j, count - j, out + j);
  }
#endif

  std::shared_ptr<const State> s_;
  Products products_ = Products::float32;
};

}  // namespace lora

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#include <lora/detail/qgemm.hpp>

namespace lora {

namespace detail {
// QuantizedMatrix as a FrozenWeight<float>'s storage.
class QuantizedStorage final : public LowPrecisionStorage {
 public:
  explicit QuantizedStorage(QuantizedMatrix q) : q_(std::move(q)) {}
  WeightFormat format() const override { return q_.format(); }
  Index rows() const override { return q_.rows(); }
  Index cols() const override { return q_.cols(); }
  std::size_t bytes() const override { return q_.bytes(); }
  bool is_view() const override { return q_.is_view(); }
  void decode(Index row, Index col, Index count, float* out) const override { q_.decode(row, col, count, out); }
  void product(const float* A, Index lda, Index M, Index K, bool transposed, float* C, Index ldc,
               bool accumulate) const override {
    QGemm::run(A, lda, M, K, q_, transposed, C, ldc, accumulate);
  }
  std::shared_ptr<const LowPrecisionStorage> requantize(const float* values) const override {
    QuantizeOptions options;
    if (q_.format() == WeightFormat::nf4) {
      options.block_size = q_.block_size();
      options.double_quant = q_.double_quant();
    }
    const ConstMatrixMap<float> m(values, q_.rows(), q_.cols());
    return QuantizedMatrix::quantize(m, q_.format(), options).with_products(q_.products()).storage();
  }
  const QuantizedMatrix& matrix() const { return q_; }

 private:
  QuantizedMatrix q_;
};
}  // namespace detail

inline std::shared_ptr<const LowPrecisionStorage> QuantizedMatrix::storage() const {
  return std::make_shared<detail::QuantizedStorage>(*this);
}

}  // namespace lora
