#include "switchyard/tensor.hpp"

#include <bit>
#include <cmath>
#include <cstring>
#include <sstream>

#include "switchyard/status.hpp"

namespace switchyard {

std::size_t dtype_size(DType dtype) noexcept {
  switch (dtype) {
    case DType::kF32:
      return 4;
    case DType::kBF16:
      return 2;
    case DType::kF16:
      return 2;
    case DType::kF64:
      return 8;
    case DType::kI32:
      return 4;
    case DType::kI64:
      return 8;
    case DType::kU8:
    case DType::kF8E4M3:
      return 1;
  }
  return 0;
}

std::string_view dtype_name(DType dtype) noexcept {
  switch (dtype) {
    case DType::kF32:
      return "f32";
    case DType::kBF16:
      return "bf16";
    case DType::kF16:
      return "f16";
    case DType::kF64:
      return "f64";
    case DType::kI32:
      return "i32";
    case DType::kI64:
      return "i64";
    case DType::kU8:
      return "u8";
    case DType::kF8E4M3:
      return "f8_e4m3";
  }
  return "?";
}

namespace {
void check_rank(std::size_t rank) {
  if (rank > static_cast<std::size_t>(kMaxTensorRank)) {
    throw Error(ErrorCode::kInvalidArgument, "tensor has " + std::to_string(rank) +
                                                 " dimensions; at most " +
                                                 std::to_string(kMaxTensorRank) + " are supported");
  }
}
}  // namespace

TensorView::TensorView(void* data, DType dtype, std::initializer_list<std::int64_t> shape,
                       Device device)
    : TensorView(data, dtype, std::span<const std::int64_t>(shape.begin(), shape.size()), device) {}

TensorView::TensorView(void* data, DType dtype, std::span<const std::int64_t> shape, Device device)
    : data_(data), dtype_(dtype), device_(device), rank_(static_cast<int>(shape.size())) {
  check_rank(shape.size());
  std::int64_t stride = 1;
  for (int i = rank_ - 1; i >= 0; --i) {
    shape_[static_cast<std::size_t>(i)] = shape[static_cast<std::size_t>(i)];
    strides_[static_cast<std::size_t>(i)] = stride;
    stride *= shape[static_cast<std::size_t>(i)];
  }
}

TensorView::TensorView(void* data, DType dtype, std::span<const std::int64_t> shape,
                       std::span<const std::int64_t> strides, Device device)
    : data_(data), dtype_(dtype), device_(device), rank_(static_cast<int>(shape.size())) {
  check_rank(shape.size());
  if (strides.size() != shape.size()) {
    throw Error(ErrorCode::kInvalidArgument, "tensor strides and shape differ in length");
  }
  for (std::size_t i = 0; i < shape.size(); ++i) {
    shape_[i] = shape[i];
    strides_[i] = strides[i];
  }
}

std::int64_t TensorView::numel() const noexcept {
  std::int64_t n = 1;
  for (int i = 0; i < rank_; ++i) n *= shape_[static_cast<std::size_t>(i)];
  return n;
}

bool TensorView::is_contiguous() const noexcept {
  // No elements: no layout to get wrong (PyTorch gives empty tensors any strides).
  for (int i = 0; i < rank_; ++i) {
    if (shape_[static_cast<std::size_t>(i)] == 0) return true;
  }
  std::int64_t expected = 1;
  for (int i = rank_ - 1; i >= 0; --i) {
    const auto idx = static_cast<std::size_t>(i);
    if (shape_[idx] != 1 && strides_[idx] != expected) return false;
    expected *= shape_[idx];
  }
  return true;
}

std::string TensorView::describe() const {
  std::ostringstream out;
  out << dtype_name(dtype_) << "[";
  for (int i = 0; i < rank_; ++i) out << (i ? "," : "") << shape_[static_cast<std::size_t>(i)];
  out << "]";
  if (device_.kind == Device::Kind::kCuda) out << " on cuda:" << device_.ordinal;
  return out.str();
}

void TensorView::require(std::string_view what, DType dtype,
                         std::initializer_list<std::int64_t> expected_dims) const {
  require_on(Device::host(), what, dtype, expected_dims);
}

void TensorView::require_on(Device device, std::string_view what, DType dtype,
                            std::initializer_list<std::int64_t> expected_dims) const {
  check(device, what, dtype, expected_dims, /*contiguous=*/true);
}

void TensorView::require_strided(std::string_view what, DType dtype,
                                 std::initializer_list<std::int64_t> expected_dims) const {
  check(Device::host(), what, dtype, expected_dims, /*contiguous=*/false);
}

void TensorView::check(Device device, std::string_view what, DType dtype,
                       std::initializer_list<std::int64_t> expected_dims, bool contiguous) const {
  bool ok = dtype_ == dtype && rank_ == static_cast<int>(expected_dims.size()) &&
            device_ == device && (!contiguous || is_contiguous()) &&
            (data_ != nullptr || numel() == 0);
  int i = 0;
  for (std::int64_t d : expected_dims) {
    if (ok && d >= 0 && shape_[static_cast<std::size_t>(i)] != d) ok = false;
    ++i;
  }
  if (ok) return;
  std::ostringstream want;
  want << dtype_name(dtype) << "[";
  i = 0;
  for (std::int64_t d : expected_dims) {
    want << (i++ ? "," : "");
    if (d >= 0)
      want << d;
    else
      want << "*";
  }
  want << "]" << (contiguous ? " contiguous " : " ")
       << (device.kind == Device::Kind::kHost ? "host" : "device") << " tensor";
  if (device.kind != Device::Kind::kHost) want << " (cuda:" << device.ordinal << ")";
  throw Error(ErrorCode::kInvalidArgument,
              std::string(what) + ": expected " + want.str() + ", got " + describe() +
                  (!contiguous || is_contiguous() ? "" : " (not contiguous)"));
}

HostTensor::HostTensor(DType dtype, std::vector<std::int64_t> shape)
    : dtype_(dtype), shape_(std::move(shape)) {
  bytes_.resize(static_cast<std::size_t>(numel()) * dtype_size(dtype_));
}

std::int64_t HostTensor::numel() const noexcept {
  std::int64_t n = 1;
  for (auto d : shape_) n *= d;
  return n;
}

TensorView HostTensor::view() noexcept { return TensorView(bytes_.data(), dtype_, shape_); }
TensorView HostTensor::view() const noexcept {
  return TensorView(const_cast<std::byte*>(bytes_.data()), dtype_, shape_);
}

float bf16_to_float(std::uint16_t bits) noexcept {
  return std::bit_cast<float>(static_cast<std::uint32_t>(bits) << 16);
}

std::uint16_t float_to_bf16(float value) noexcept {
  std::uint32_t bits = std::bit_cast<std::uint32_t>(value);
  if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu) != 0) {
    return static_cast<std::uint16_t>((bits >> 16) | 0x0040u);  // quiet NaN
  }
  const std::uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<std::uint16_t>((bits + rounding) >> 16);
}

float f16_to_float(std::uint16_t h) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  std::uint32_t exponent = (h >> 10) & 0x1fu;
  std::uint32_t mantissa = h & 0x3ffu;
  std::uint32_t bits;
  if (exponent == 0) {
    if (mantissa == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exponent = 127 - 15 + 1;
      while ((mantissa & 0x400u) == 0) {
        mantissa <<= 1;
        --exponent;
      }
      mantissa &= 0x3ffu;
      bits = sign | (exponent << 23) | (mantissa << 13);
    }
  } else if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else {
    bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
  }
  return std::bit_cast<float>(bits);
}

namespace {
constexpr float kFp8Max = 448.0f;
}  // namespace

std::uint8_t float_to_fp8_e4m3(float value) noexcept {
  if (std::isnan(value)) return 0x7f;
  const std::uint8_t sign = std::signbit(value) ? 0x80 : 0x00;
  const float a = std::fabs(value);
  if (a >= kFp8Max) return sign | 0x7e;  // saturate to 448
  if (a < 0.015625f) {                   // below 2^-6: subnormal, steps of 2^-9
    const auto q = static_cast<std::uint8_t>(std::nearbyint(a * 512.0f));
    return sign | q;  // q == 8 is the smallest normal, 2^-6
  }
  int exponent = 0;
  const float fraction =
      std::frexp(a, &exponent);  // a = fraction * 2^exponent, fraction in [0.5,1)
  int e = exponent - 1;          // a = (2 * fraction) * 2^e
  auto q = static_cast<int>(std::nearbyint((2.0f * fraction - 1.0f) * 8.0f));
  if (q == 8) {
    q = 0;
    ++e;
  }
  const int biased = e + 7;
  if (biased > 15 || (biased == 15 && q == 7)) return sign | 0x7e;
  return static_cast<std::uint8_t>(sign | (biased << 3) | q);
}

float fp8_e4m3_to_float(std::uint8_t bits) noexcept {
  const int exponent = (bits >> 3) & 0xf;
  const int mantissa = bits & 0x7;
  const float sign = (bits & 0x80) != 0 ? -1.0f : 1.0f;
  if (exponent == 0xf && mantissa == 0x7) return std::nanf("");
  if (exponent == 0) return sign * std::ldexp(static_cast<float>(mantissa), -9);
  return sign * std::ldexp(1.0f + static_cast<float>(mantissa) / 8.0f, exponent - 7);
}

void widen_to_f32(const void* src, DType dtype, std::size_t count, float* dst) {
  const auto* bits = static_cast<const std::uint16_t*>(src);
  switch (dtype) {
    case DType::kF32:
      std::memcpy(dst, src, count * sizeof(float));
      return;
    case DType::kBF16:
      // bf16 is the top half of an f32: a shift, written inline so that it vectorises.
      for (std::size_t i = 0; i < count; ++i) {
        dst[i] = std::bit_cast<float>(static_cast<std::uint32_t>(bits[i]) << 16);
      }
      return;
    case DType::kF16:
      for (std::size_t i = 0; i < count; ++i) dst[i] = f16_to_float(bits[i]);
      return;
    case DType::kF8E4M3: {
      const auto* codes = static_cast<const std::uint8_t*>(src);
      for (std::size_t i = 0; i < count; ++i) dst[i] = fp8_e4m3_to_float(codes[i]);
      return;
    }
    default:
      throw Error(ErrorCode::kInvalidArgument, "cannot widen " + std::string(dtype_name(dtype)) +
                                                   " to f32 (f32, bf16, f16 and f8_e4m3 can be)");
  }
}

}  // namespace switchyard
