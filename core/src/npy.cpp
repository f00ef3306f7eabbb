// .npy reading and writing (NumPy format versions 1-3, little-endian, C order).
#include <charconv>
#include <cstring>
#include <fstream>
#include <sstream>

#include "switchyard/io.hpp"
#include "switchyard/status.hpp"

namespace switchyard {
namespace {

constexpr char kMagic[] = "\x93NUMPY";
/// Headers longer than this are refused before they are read (NumPy's own writers stay far
/// below; its reader refuses more than 10000 bytes by default).
constexpr std::uint32_t kMaxHeaderBytes = 1u << 20;

[[noreturn]] void bad(const std::filesystem::path& path, const std::string& why) {
  throw Error(ErrorCode::kInvalidArgument, path.string() + ": not a valid .npy file: " + why);
}

std::string header_value(const std::string& header, const std::string& key) {
  const auto pos = header.find("'" + key + "'");
  if (pos == std::string::npos) return {};
  auto colon = header.find(':', pos);
  if (colon == std::string::npos) return {};
  auto start = header.find_first_not_of(' ', colon + 1);
  if (start == std::string::npos) return {};
  if (header[start] == '\'') {
    const auto end = header.find('\'', start + 1);
    return end == std::string::npos ? std::string() : header.substr(start + 1, end - start - 1);
  }
  if (header[start] == '(') {
    const auto end = header.find(')', start);
    return end == std::string::npos ? std::string() : header.substr(start + 1, end - start - 1);
  }
  const auto end = header.find_first_of(",}", start);
  return header.substr(start, end - start);
}

const char* npy_descr(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "<f4";
    case DType::kF64:
      return "<f8";
    case DType::kI32:
      return "<i4";
    case DType::kI64:
      return "<i8";
    case DType::kU8:
      return "|u1";
    case DType::kF16:
      return "<f2";
    case DType::kBF16:
    case DType::kF8E4M3:
      return nullptr;  // NumPy has no bfloat16 or FP8
  }
  return nullptr;
}

}  // namespace

HostTensor read_npy(const std::filesystem::path& path) {
  // What the file is, and how long, before anything is read or allocated: every size the
  // header declares is checked against it.
  std::error_code ec;
  const auto status = std::filesystem::status(path, ec);
  if (ec || !std::filesystem::exists(status)) {
    throw Error(ErrorCode::kNotFound, path.string() + ": cannot open .npy file (no such file)");
  }
  if (std::filesystem::is_directory(status)) {
    throw Error(ErrorCode::kInvalidArgument, path.string() + ": is a directory, not a .npy file");
  }
  if (!std::filesystem::is_regular_file(status)) {
    throw Error(ErrorCode::kInvalidArgument, path.string() + ": not a regular file");
  }
  const std::uintmax_t file_size = std::filesystem::file_size(path, ec);
  std::ifstream in(path, std::ios::binary);
  if (ec || !in) throw Error(ErrorCode::kNotFound, path.string() + ": cannot open .npy file");
  char magic[6];
  unsigned char version[2];
  in.read(magic, 6);
  in.read(reinterpret_cast<char*>(version), 2);
  if (!in || std::memcmp(magic, kMagic, 6) != 0) bad(path, "missing the \\x93NUMPY magic");
  std::uint32_t header_len = 0;
  if (version[0] == 1) {
    unsigned char len[2];
    in.read(reinterpret_cast<char*>(len), 2);
    header_len = static_cast<std::uint32_t>(len[0] | (len[1] << 8));
  } else if (version[0] == 2 || version[0] == 3) {
    unsigned char len[4];
    in.read(reinterpret_cast<char*>(len), 4);
    header_len = static_cast<std::uint32_t>(len[0] | (len[1] << 8) | (len[2] << 16) |
                                            (static_cast<std::uint32_t>(len[3]) << 24));
  } else {
    bad(path, "unsupported format version " + std::to_string(version[0]));
  }
  const std::uintmax_t preamble = version[0] == 1 ? 10 : 12;
  if (header_len > kMaxHeaderBytes || preamble + header_len > file_size) {
    bad(path,
        "header length " + std::to_string(header_len) + " exceeds " +
            (header_len > kMaxHeaderBytes ? "the limit of " + std::to_string(kMaxHeaderBytes)
                                          : "the file (" + std::to_string(file_size) + " bytes)"));
  }
  std::string header(header_len, '\0');
  in.read(header.data(), header_len);
  if (!in) bad(path, "truncated header");

  const std::string descr = header_value(header, "descr");
  DType dtype;
  if (descr == "<f4")
    dtype = DType::kF32;
  else if (descr == "<f8")
    dtype = DType::kF64;
  else if (descr == "<i4")
    dtype = DType::kI32;
  else if (descr == "<i8")
    dtype = DType::kI64;
  else if (descr == "|u1" || descr == "<u1")
    dtype = DType::kU8;
  else if (descr == "<f2")
    dtype = DType::kF16;
  else
    bad(path, "unsupported dtype '" + descr + "' (f4, f8, f2, i4, i8, u1 little-endian are read)");
  if (header_value(header, "fortran_order") != "False") bad(path, "Fortran order is not supported");

  std::vector<std::int64_t> shape;
  const std::string shape_text = header_value(header, "shape");
  std::stringstream dims(shape_text);
  std::string dim;
  // The data's bytes, with every product checked: a shape whose size wraps around is as
  // malformed as a short file.
  std::uint64_t data_bytes = dtype_size(dtype);
  while (std::getline(dims, dim, ',')) {
    const auto first = dim.find_first_not_of(' ');
    if (first == std::string::npos) continue;
    const auto last = dim.find_last_not_of(' ');
    std::int64_t value = 0;
    const char* begin = dim.data() + first;
    const char* end = dim.data() + last + 1;
    const auto [stop, error] = std::from_chars(begin, end, value);
    if (error != std::errc() || stop != end) bad(path, "malformed shape '" + shape_text + "'");
    if (value < 0) bad(path, "negative dimension in shape '" + shape_text + "'");
    if (__builtin_mul_overflow(data_bytes, static_cast<std::uint64_t>(value), &data_bytes)) {
      bad(path, "shape '" + shape_text + "' is too large to address");
    }
    shape.push_back(value);
  }
  const std::uintmax_t data_start = preamble + header_len;
  if (data_bytes > file_size - data_start) {
    bad(path, "truncated data: the shape (" + shape_text + ") needs " + std::to_string(data_bytes) +
                  " bytes, the file holds " + std::to_string(file_size - data_start));
  }
  HostTensor tensor(dtype, shape);
  in.read(reinterpret_cast<char*>(tensor.bytes()),
          static_cast<std::streamsize>(tensor.size_bytes()));
  if (static_cast<std::size_t>(in.gcount()) != tensor.size_bytes()) {
    bad(path, "truncated data: expected " + std::to_string(tensor.size_bytes()) + " bytes, found " +
                  std::to_string(in.gcount()));
  }
  return tensor;
}

HostTensor read_npy_f32_matrix(const std::filesystem::path& path, std::int64_t cols,
                               std::string_view what) {
  HostTensor t = read_npy(path);
  const std::string want =
      "float32 [rows, " + (cols >= 0 ? std::to_string(cols) : std::string("*")) + "]";
  if (t.dtype() != DType::kF32) {
    throw Error(ErrorCode::kInvalidArgument,
                std::string(what) + ": " + path.string() + " has dtype " +
                    std::string(dtype_name(t.dtype())) + "; expected " + want);
  }
  if (t.shape().size() != 2 || (cols >= 0 && t.shape()[1] != cols)) {
    std::string got = "[";
    for (std::size_t i = 0; i < t.shape().size(); ++i) {
      if (i != 0) got += ',';
      got += std::to_string(t.shape()[i]);
    }
    throw Error(ErrorCode::kInvalidArgument, std::string(what) + ": " + path.string() +
                                                 " has shape " + got + "]; expected " + want);
  }
  return t;
}

void write_npy(const std::filesystem::path& path, const TensorView& tensor) {
  const char* descr = npy_descr(tensor.dtype());
  if (descr == nullptr || !tensor.is_contiguous() || tensor.device().kind != Device::Kind::kHost) {
    throw Error(ErrorCode::kInvalidArgument,
                "write_npy: cannot write " + tensor.describe() + " (contiguous host, not bf16)");
  }
  std::string shape;
  for (int i = 0; i < tensor.rank(); ++i) shape += std::to_string(tensor.dim(i)) + ", ";
  if (tensor.rank() > 1)
    shape.erase(shape.size() - 2);  // (3,) for 1-D, (3, 4) otherwise
  else if (tensor.rank() == 1)
    shape.pop_back();
  std::string header =
      "{'descr': '" + std::string(descr) + "', 'fortran_order': False, 'shape': (" + shape + "), }";
  const std::size_t unpadded = 10 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header.push_back('\n');

  write_file_atomically(path, [&](std::ostream& out) {
    out.write(kMagic, 6);
    const char version[2] = {1, 0};
    out.write(version, 2);
    const auto len = static_cast<std::uint16_t>(header.size());
    const char len_bytes[2] = {static_cast<char>(len & 0xff), static_cast<char>(len >> 8)};
    out.write(len_bytes, 2);
    out.write(header.data(), static_cast<std::streamsize>(header.size()));
    out.write(static_cast<const char*>(tensor.data()),
              static_cast<std::streamsize>(static_cast<std::size_t>(tensor.numel()) *
                                           dtype_size(tensor.dtype())));
  });
}

}  // namespace switchyard
