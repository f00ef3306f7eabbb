// .safetensors: 8-byte little-endian header length, a JSON header, then the raw data.
#include <fstream>
#include <limits>
#include <set>

#include <nlohmann/json.hpp>

#include "switchyard/io.hpp"
#include "switchyard/status.hpp"

namespace switchyard {
namespace {

/// The format's own bound on the JSON header (100 MB); a longer one is refused unread.
constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;

[[noreturn]] void bad(const std::filesystem::path& path, const std::string& why) {
  throw Error(ErrorCode::kInvalidArgument,
              path.string() + ": not a valid safetensors file: " + why);
}

std::optional<DType> dtype_from_name(const std::string& name) {
  if (name == "F32") return DType::kF32;
  if (name == "F16") return DType::kF16;
  if (name == "BF16") return DType::kBF16;
  if (name == "F64") return DType::kF64;
  if (name == "I32") return DType::kI32;
  if (name == "I64") return DType::kI64;
  if (name == "U8") return DType::kU8;
  if (name == "F8_E4M3") return DType::kF8E4M3;
  return std::nullopt;
}

const char* dtype_to_name(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "F32";
    case DType::kF16:
      return "F16";
    case DType::kBF16:
      return "BF16";
    case DType::kF64:
      return "F64";
    case DType::kI32:
      return "I32";
    case DType::kI64:
      return "I64";
    case DType::kU8:
      return "U8";
    case DType::kF8E4M3:
      return "F8_E4M3";
  }
  return "?";
}

}  // namespace

SafetensorsFile::SafetensorsFile(const std::filesystem::path& path) : path_(path) {
  std::error_code ec;
  const auto status = std::filesystem::status(path, ec);
  if (ec || !std::filesystem::exists(status)) {
    throw Error(ErrorCode::kNotFound, path.string() + ": safetensors file does not exist");
  }
  if (std::filesystem::is_directory(status)) {
    throw Error(ErrorCode::kInvalidArgument,
                path.string() + ": is a directory, not a safetensors file");
  }
  if (!std::filesystem::is_regular_file(status)) {
    throw Error(ErrorCode::kInvalidArgument, path.string() + ": not a regular file");
  }
  const std::uint64_t file_size = std::filesystem::file_size(path, ec);
  std::ifstream in(path, std::ios::binary);
  unsigned char len_bytes[8];
  in.read(reinterpret_cast<char*>(len_bytes), 8);
  if (!in) bad(path, "shorter than the 8-byte header length (truncated?)");
  std::uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | len_bytes[i];
  if (header_len > kMaxHeaderBytes) {
    bad(path, "header length " + std::to_string(header_len) + " exceeds the format's limit of " +
                  std::to_string(kMaxHeaderBytes) + " bytes");
  }
  if (header_len > file_size - 8) {
    bad(path, "header length " + std::to_string(header_len) + " exceeds the file size " +
                  std::to_string(file_size) + " (truncated?)");
  }
  std::string header(header_len, '\0');
  in.read(header.data(), static_cast<std::streamsize>(header_len));
  data_offset_ = 8 + header_len;
  nlohmann::json json;
  // JSON lets a key repeat (the last one wins); two tensors of one name are refused.
  std::set<std::string> names;
  std::string repeated;
  auto note_keys = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    if (event == nlohmann::json::parse_event_t::key && depth == 1 && parsed.is_string() &&
        !names.insert(parsed.get<std::string>()).second && repeated.empty()) {
      repeated = parsed.get<std::string>();
    }
    return true;
  };
  try {
    json = nlohmann::json::parse(header, note_keys);
  } catch (const std::exception& e) {
    bad(path, std::string("header is not valid JSON: ") + e.what());
  }
  if (!json.is_object()) bad(path, "header is not a JSON object");
  if (!repeated.empty()) bad(path, "tensor " + repeated + " is named twice");
  const std::uint64_t data_size = file_size - data_offset_;
  for (const auto& [name, info] : json.items()) {
    if (name == "__metadata__") continue;
    try {
      SafetensorsEntry entry;
      const auto dtype = dtype_from_name(info.at("dtype").get<std::string>());
      if (!dtype) bad(path, "tensor " + name + " has unsupported dtype " + info.at("dtype").dump());
      entry.dtype = *dtype;
      // The tensor's bytes, every product checked: a shape whose size wraps around would
      // otherwise match small data_offsets.
      std::uint64_t bytes = dtype_size(entry.dtype);
      for (const auto& d : info.at("shape")) {
        if (!d.is_number_unsigned()) {  // JSON's non-negative integers parse as unsigned
          bad(path,
              "tensor " + name + " has dimension " + d.dump() + ", not a non-negative integer");
        }
        const auto dim = d.get<std::uint64_t>();
        if (dim > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()) ||
            __builtin_mul_overflow(bytes, dim, &bytes)) {
          bad(path, "tensor " + name + " has shape " + info.at("shape").dump() +
                        ", too large to address");
        }
        entry.shape.push_back(static_cast<std::int64_t>(dim));
      }
      const auto& offsets = info.at("data_offsets");
      entry.begin = offsets.at(0).get<std::uint64_t>();
      entry.end = offsets.at(1).get<std::uint64_t>();
      if (entry.end < entry.begin || entry.end - entry.begin != bytes) {
        bad(path, "tensor " + name + " has data_offsets [" + std::to_string(entry.begin) + ", " +
                      std::to_string(entry.end) + "] that do not match its shape and dtype");
      }
      if (entry.end > data_size) {
        bad(path, "tensor " + name + " ends at byte " + std::to_string(entry.end) +
                      " of the data section, but the file holds only " + std::to_string(data_size) +
                      " bytes of data (truncated?)");
      }
      entries_.emplace(name, std::move(entry));
    } catch (const nlohmann::json::exception& e) {
      bad(path, "tensor " + name + " has a malformed entry: " + e.what());
    }
  }
}

HostTensor SafetensorsFile::read(const std::string& name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) {
    throw Error(ErrorCode::kNotFound, path_.string() + ": tensor " + name + " not found");
  }
  const auto& e = it->second;
  HostTensor tensor(e.dtype, e.shape);
  std::ifstream in(path_, std::ios::binary);
  in.seekg(static_cast<std::streamoff>(data_offset_ + e.begin));
  in.read(reinterpret_cast<char*>(tensor.bytes()),
          static_cast<std::streamsize>(tensor.size_bytes()));
  if (!in) throw Error(ErrorCode::kSystem, path_.string() + ": cannot read tensor " + name);
  return tensor;
}

HostTensor SafetensorsFile::read_f32(const std::string& name) const {
  HostTensor raw = read(name);
  if (raw.dtype() == DType::kF32) return raw;
  if (raw.dtype() != DType::kBF16 && raw.dtype() != DType::kF16) {
    throw Error(ErrorCode::kInvalidArgument, path_.string() + ": tensor " + name + " has dtype " +
                                                 std::string(dtype_name(raw.dtype())) +
                                                 "; weights must be F32, BF16 or F16");
  }
  HostTensor out(DType::kF32, raw.shape());
  widen_to_f32(raw.bytes(), raw.dtype(), static_cast<std::size_t>(raw.numel()), out.data<float>());
  return out;
}

void write_safetensors(const std::filesystem::path& path,
                       const std::map<std::string, HostTensor>& tensors) {
  nlohmann::json header = nlohmann::json::object();
  std::uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    header[name] = {{"dtype", dtype_to_name(t.dtype())},
                    {"shape", t.shape()},
                    {"data_offsets", {offset, offset + t.size_bytes()}}};
    offset += t.size_bytes();
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  write_file_atomically(path, [&](std::ostream& out) {
    const std::uint64_t len = text.size();
    char len_bytes[8];
    for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<char>((len >> (8 * i)) & 0xff);
    out.write(len_bytes, 8);
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    for (const auto& [name, t] : tensors) {
      out.write(reinterpret_cast<const char*>(t.bytes()),
                static_cast<std::streamsize>(t.size_bytes()));
    }
  });
}

}  // namespace switchyard
