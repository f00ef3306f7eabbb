#pragma once
/// \file
/// Reading and writing .npy arrays and .safetensors checkpoints.

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <ostream>
#include <string>
#include <vector>

#include "switchyard/tensor.hpp"

namespace switchyard {

/// Reads a .npy file (version 1-3, little-endian, C order) of dtype f4, f8, i4, i8, u1.
/// Throws `Error(kNotFound)` if missing, `Error(kInvalidArgument)` naming the file when
/// malformed, truncated, Fortran-ordered or of another dtype.
HostTensor read_npy(const std::filesystem::path& path);

/// Reads a .npy file that must be f32 [rows, cols] (`cols` = -1: any). Errors name `what`,
/// the file and the expected and actual dtype/shape.
HostTensor read_npy_f32_matrix(const std::filesystem::path& path, std::int64_t cols,
                               std::string_view what);

/// Writes a file through `write`, to a temporary file beside `path` (same folder, so the
/// rename is atomic) that is renamed over `path` once complete. On any failure, `write`'s
/// exception included, the temporary is removed and `path` is untouched; write errors
/// throw `Error(kSystem)` naming `path`.
void write_file_atomically(const std::filesystem::path& path,
                           const std::function<void(std::ostream&)>& write);

/// Writes a contiguous host tensor as .npy. Writes to a temporary file beside `path` and
/// renames it, so `path` is either the old file or the complete new one.
void write_npy(const std::filesystem::path& path, const TensorView& tensor);

/// One tensor's entry in a safetensors header.
struct SafetensorsEntry {
  DType dtype = DType::kF32;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0;  ///< byte offset in the data section
  std::uint64_t end = 0;
};

/// A .safetensors file: header parsed and checked on open, data read on demand.
/// Supports F32, F16, BF16, F64, I32, I64, U8 tensors. Not thread-safe.
class SafetensorsFile {
 public:
  /// Throws `Error(kNotFound)` if missing; `Error(kInvalidArgument)` naming the file if
  /// the header is malformed, a tensor's offsets do not fit its shape, or the file is
  /// shorter than the header says (truncated).
  explicit SafetensorsFile(const std::filesystem::path& path);

  const std::filesystem::path& path() const noexcept { return path_; }
  const std::map<std::string, SafetensorsEntry>& entries() const noexcept { return entries_; }
  bool contains(const std::string& name) const { return entries_.count(name) != 0; }
  /// The tensor converted to f32 (from F32, F16, BF16). `Error(kNotFound)` naming the
  /// file and tensor if absent; `Error(kInvalidArgument)` for other dtypes.
  HostTensor read_f32(const std::string& name) const;
  /// The tensor with its own dtype.
  HostTensor read(const std::string& name) const;

 private:
  std::filesystem::path path_;
  std::uint64_t data_offset_ = 0;
  std::map<std::string, SafetensorsEntry> entries_;
};

/// Writes tensors as a .safetensors file (keys sorted, 8-byte aligned header), atomically
/// like `write_npy`. For tests, examples and conversion tools.
void write_safetensors(const std::filesystem::path& path,
                       const std::map<std::string, HostTensor>& tensors);

}  // namespace switchyard
