#pragma once
/// \file
/// Non-owning tensor views and a small owning host tensor.

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace switchyard {

/// Element types that cross Switchyard's interfaces.
/// Element types. kF8E4M3 is FP8 E4M3 "fn" (bias 7, no infinities, max 448), as
/// checkpoints store it (safetensors "F8_E4M3", PyTorch float8_e4m3fn).
enum class DType : std::uint8_t { kF32, kBF16, kF16, kF64, kI32, kI64, kU8, kF8E4M3 };

/// Size of one element in bytes.
std::size_t dtype_size(DType dtype) noexcept;
/// Lower-case name: "f32", "bf16", "f16", "f64", "i32", "i64", "u8", "f8_e4m3".
std::string_view dtype_name(DType dtype) noexcept;

/// Where memory lives. Host memory has ordinal 0; CUDA memory names its device ordinal.
struct Device {
  enum class Kind : std::uint8_t { kHost, kCuda };
  Kind kind = Kind::kHost;
  int ordinal = 0;

  static constexpr Device host() { return {}; }
  static constexpr Device cuda(int ordinal) { return {Kind::kCuda, ordinal}; }
  friend bool operator==(const Device&, const Device&) = default;
};

/// Most dimensions a view can have.
inline constexpr int kMaxTensorRank = 4;

/// A non-owning view of a strided tensor: pointer, dtype, shape, strides (in elements)
/// and device. Copying a view never copies data. The memory's owner must keep it alive
/// while any view is used. Views are plain values and safe to pass between threads; the
/// data behind them is not synchronised.
class TensorView {
 public:
  TensorView() = default;
  /// A contiguous (row-major) view.
  TensorView(void* data, DType dtype, std::initializer_list<std::int64_t> shape,
             Device device = Device::host());
  /// A contiguous (row-major) view with the shape given as a span.
  TensorView(void* data, DType dtype, std::span<const std::int64_t> shape,
             Device device = Device::host());
  /// A strided view; `strides` are in elements and must have `shape.size()` entries.
  TensorView(void* data, DType dtype, std::span<const std::int64_t> shape,
             std::span<const std::int64_t> strides, Device device = Device::host());

  void* data() const noexcept { return data_; }
  template <typename T>
  T* data_as() const noexcept {
    return static_cast<T*>(data_);
  }
  DType dtype() const noexcept { return dtype_; }
  Device device() const noexcept { return device_; }
  int rank() const noexcept { return rank_; }
  std::int64_t dim(int i) const noexcept { return shape_[static_cast<std::size_t>(i)]; }
  std::int64_t stride(int i) const noexcept { return strides_[static_cast<std::size_t>(i)]; }
  std::span<const std::int64_t> shape() const noexcept {
    return {shape_.data(), static_cast<std::size_t>(rank_)};
  }
  std::span<const std::int64_t> strides() const noexcept {
    return {strides_.data(), static_cast<std::size_t>(rank_)};
  }
  /// Product of the dimensions (1 for a scalar view).
  std::int64_t numel() const noexcept;
  /// True when the strides are those of a row-major layout of the shape.
  bool is_contiguous() const noexcept;
  /// "f32[4,16]" style description for error messages.
  std::string describe() const;

  /// Throws `Error(kInvalidArgument)` naming `what` unless this view is a contiguous host
  /// tensor of `dtype` with `rank` dimensions. `expected_dims` entries of -1 match any size.
  void require(std::string_view what, DType dtype,
               std::initializer_list<std::int64_t> expected_dims) const;
  /// The same for a contiguous tensor in the memory of `device` (host or a CUDA device).
  void require_on(Device device, std::string_view what, DType dtype,
                  std::initializer_list<std::int64_t> expected_dims) const;
  /// As `require`, for a host tensor with any strides (e.g. a column slice).
  void require_strided(std::string_view what, DType dtype,
                       std::initializer_list<std::int64_t> expected_dims) const;

 private:
  void check(Device device, std::string_view what, DType dtype,
             std::initializer_list<std::int64_t> expected_dims, bool contiguous) const;
  void* data_ = nullptr;
  DType dtype_ = DType::kF32;
  Device device_{};
  int rank_ = 0;
  std::array<std::int64_t, kMaxTensorRank> shape_{};
  std::array<std::int64_t, kMaxTensorRank> strides_{};
};

/// An owning, contiguous host tensor. Moves are cheap; copies copy the data.
class HostTensor {
 public:
  HostTensor() = default;
  /// Zero-filled tensor of the given dtype and shape.
  HostTensor(DType dtype, std::vector<std::int64_t> shape);

  DType dtype() const noexcept { return dtype_; }
  const std::vector<std::int64_t>& shape() const noexcept { return shape_; }
  std::int64_t numel() const noexcept;
  std::size_t size_bytes() const noexcept { return bytes_.size(); }
  std::byte* bytes() noexcept { return bytes_.data(); }
  const std::byte* bytes() const noexcept { return bytes_.data(); }
  template <typename T>
  T* data() noexcept {
    return reinterpret_cast<T*>(bytes_.data());
  }
  template <typename T>
  const T* data() const noexcept {
    return reinterpret_cast<const T*>(bytes_.data());
  }
  /// A view of the whole tensor. The view is valid while this tensor is alive and unresized.
  TensorView view() noexcept;
  TensorView view() const noexcept;

 private:
  DType dtype_ = DType::kF32;
  std::vector<std::int64_t> shape_;
  std::vector<std::byte> bytes_;
};

/// bfloat16 bits to float (exact).
float bf16_to_float(std::uint16_t bits) noexcept;
/// float to bfloat16 bits, rounding to nearest even (NaN stays NaN).
std::uint16_t float_to_bf16(float value) noexcept;
/// IEEE half bits to float (exact, subnormals included).
float f16_to_float(std::uint16_t bits) noexcept;
/// float to FP8 E4M3 (bias 7, no infinities, max 448), rounding to nearest even and
/// saturating; NaN stays NaN.
std::uint8_t float_to_fp8_e4m3(float value) noexcept;
/// FP8 E4M3 to float (exact).
float fp8_e4m3_to_float(std::uint8_t bits) noexcept;
/// Widens `count` elements of f32, bf16, f16 or f8_e4m3 at `src` to float32 at `dst`
/// (exact; an FP8 weight's block scales are `widen_expert_weight`'s). Throws
/// `Error(kInvalidArgument)` for other dtypes.
void widen_to_f32(const void* src, DType dtype, std::size_t count, float* dst);

}  // namespace switchyard
