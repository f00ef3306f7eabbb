#include <doctest/doctest.h>

#include <cstring>
#include <fstream>
#include <utility>

#include "switchyard/io.hpp"
#include "switchyard/model.hpp"
#include "switchyard/status.hpp"
#include "test_support.hpp"

using namespace switchyard;

namespace {

void truncate_file(const std::filesystem::path& path, std::uintmax_t drop) {
  std::filesystem::resize_file(path, std::filesystem::file_size(path) - drop);
}
}  // namespace

TEST_CASE("npy round trip and errors") {
  test::TempDir dir;
  HostTensor t(DType::kF32, {3, 5});
  for (int i = 0; i < 15; ++i) t.data<float>()[i] = static_cast<float>(i) * 0.5f;
  write_npy(dir / "x.npy", t.view());
  CHECK_FALSE(std::filesystem::exists(dir / "x.npy.tmp"));
  HostTensor back = read_npy(dir / "x.npy");
  CHECK(back.dtype() == DType::kF32);
  CHECK(back.shape() == std::vector<std::int64_t>{3, 5});
  CHECK(back.data<float>()[14] == 7.0f);
  CHECK_NOTHROW(read_npy_f32_matrix(dir / "x.npy", 5, "input.tokens"));

  CHECK(test::error_message([&] {
          read_npy_f32_matrix(dir / "x.npy", 4, "input.tokens");
        }).find("has shape [3,5]; expected float32 [rows, 4]") != std::string::npos);
  HostTensor d(DType::kF64, {3, 5});
  write_npy(dir / "d.npy", d.view());
  CHECK(test::error_message([&] {
          read_npy_f32_matrix(dir / "d.npy", 5, "input.tokens");
        }).find("has dtype f64; expected float32") != std::string::npos);
  HostTensor v(DType::kF32, {4});
  write_npy(dir / "v.npy", v.view());
  CHECK(read_npy(dir / "v.npy").shape() == std::vector<std::int64_t>{4});

  truncate_file(dir / "x.npy", 8);
  CHECK(test::error_message([&] { read_npy(dir / "x.npy"); }).find("truncated data") !=
        std::string::npos);
  test::write_text(dir / "junk.npy", "not numpy at all");
  CHECK(test::error_message([&] { read_npy(dir / "junk.npy"); }).find("magic") !=
        std::string::npos);
  try {
    read_npy(dir / "missing.npy");
    FAIL("expected an error");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::kNotFound);
  }
}

namespace {
/// A version 1 or 2 .npy file written byte by byte: `header` as given (padded to 64 with
/// a newline), its length as `declared_length` when set, then `data_bytes` zero bytes.
void write_raw_npy(const std::filesystem::path& path, int version, std::string header,
                   std::size_t data_bytes, std::uint64_t declared_length = 0) {
  const std::size_t preamble = version == 1 ? 10 : 12;
  header.append((64 - (preamble + header.size() + 1) % 64) % 64, ' ');
  header.push_back('\n');
  const std::uint64_t length = declared_length != 0 ? declared_length : header.size();
  std::string bytes = "\x93NUMPY";
  bytes.push_back(static_cast<char>(version));
  bytes.push_back('\0');
  for (std::size_t i = 0; i < preamble - 8; ++i) {
    bytes.push_back(static_cast<char>((length >> (8 * i)) & 0xff));
  }
  bytes += header;
  bytes.append(data_bytes, '\0');
  std::ofstream(path, std::ios::binary) << bytes;
}
}  // namespace

TEST_CASE("npy: sizes the header declares are checked against the file before allocating") {
  test::TempDir dir;
  auto message = [&](const char* name) {
    return test::error_message([&] { read_npy(dir / name); });
  };
  // 50M x 16 floats declared, 228 bytes present: refused from the file's size.
  write_raw_npy(dir / "short.npy", 1,
                "{'descr': '<f4', 'fortran_order': False, 'shape': (50000000, 16), }", 228);
  CHECK(message("short.npy")
            .find("short.npy: not a valid .npy file: truncated data: the shape "
                  "(50000000, 16) needs 3200000000 bytes, the file holds 228") !=
        std::string::npos);
  // Header lengths of 2^31 and 2^32 - 1 in a version 2 file of a few bytes.
  write_raw_npy(dir / "long_header.npy", 2,
                "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }", 4,
                std::uint64_t{1} << 31);
  CHECK(message("long_header.npy").find("header length 2147483648 exceeds the limit") !=
        std::string::npos);
  write_raw_npy(dir / "longer_header.npy", 2,
                "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }", 4, 0xffffffffu);
  CHECK(message("longer_header.npy").find("header length 4294967295 exceeds") != std::string::npos);
  write_raw_npy(dir / "past_end.npy", 1,
                "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }", 0, 60000);
  CHECK(message("past_end.npy").find("header length 60000 exceeds the file") != std::string::npos);
  // A shape whose byte count wraps around 2^64.
  write_raw_npy(dir / "wraps.npy", 1,
                "{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904, 16), }",
                64);
  CHECK(message("wraps.npy").find("wraps.npy: not a valid .npy file: shape") != std::string::npos);
  CHECK(message("wraps.npy").find("too large") != std::string::npos);
  // Dimensions parse strictly.
  write_raw_npy(dir / "letters.npy", 1,
                "{'descr': '<f4', 'fortran_order': False, 'shape': (3abc,), }", 12);
  CHECK(message("letters.npy").find("malformed shape") != std::string::npos);
  write_raw_npy(dir / "negative.npy", 1,
                "{'descr': '<f4', 'fortran_order': False, 'shape': (-3,), }", 12);
  CHECK(message("negative.npy").find("negative dimension") != std::string::npos);
  // A well-formed file written the same way reads.
  write_raw_npy(dir / "fine.npy", 2, "{'descr': '<i4', 'fortran_order': False, 'shape': (2, 3), }",
                24);
  CHECK(read_npy(dir / "fine.npy").shape() == std::vector<std::int64_t>{2, 3});
  // A directory is said to be one.
  std::filesystem::create_directory(dir / "folder.npy");
  CHECK(message("folder.npy").find("folder.npy: is a directory") != std::string::npos);
}

TEST_CASE("npy: a write that fails leaves neither the file nor its temporary") {
  test::TempDir dir;
  HostTensor t(DType::kF32, {2, 2});
  // The output's path is a directory: the rename fails after the temporary was written.
  std::filesystem::create_directory(dir / "taken.npy");
  std::filesystem::create_directory(dir / "taken.npy" / "inside");
  CHECK_THROWS_AS(write_npy(dir / "taken.npy", t.view()), Error);
  CHECK_FALSE(std::filesystem::exists(dir / "taken.npy.tmp"));
}

TEST_CASE("safetensors round trip in every weight dtype") {
  test::TempDir dir;
  std::map<std::string, HostTensor> tensors;
  HostTensor f32(DType::kF32, {2, 3});
  HostTensor bf16(DType::kBF16, {3});
  HostTensor f16(DType::kF16, {2});
  for (int i = 0; i < 6; ++i) f32.data<float>()[i] = static_cast<float>(i) - 2.5f;
  for (int i = 0; i < 3; ++i)
    bf16.data<std::uint16_t>()[i] = float_to_bf16(static_cast<float>(i) + 0.5f);
  f16.data<std::uint16_t>()[0] = 0x3c00;  // 1.0
  f16.data<std::uint16_t>()[1] = 0xc000;  // -2.0
  tensors["a"] = std::move(f32);
  tensors["b"] = std::move(bf16);
  tensors["c"] = std::move(f16);
  write_safetensors(dir / "t.safetensors", tensors);
  SafetensorsFile file(dir / "t.safetensors");
  CHECK(file.entries().size() == 3);
  CHECK(file.read_f32("a").data<float>()[5] == 2.5f);
  CHECK(file.read_f32("b").data<float>()[2] == 2.5f);
  CHECK(file.read_f32("c").data<float>()[1] == -2.0f);
  CHECK(file.read("b").dtype() == DType::kBF16);
  CHECK(test::error_message([&] { file.read_f32("zzz"); }).find("tensor zzz not found") !=
        std::string::npos);
}

TEST_CASE("safetensors: missing, truncated and inconsistent files are refused") {
  test::TempDir dir;
  try {
    SafetensorsFile f(dir / "none.safetensors");
    FAIL("expected an error");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::kNotFound);
  }
  std::map<std::string, HostTensor> tensors;
  tensors["w"] = HostTensor(DType::kF32, {64, 64});
  write_safetensors(dir / "t.safetensors", tensors);
  truncate_file(dir / "t.safetensors", 100);
  CHECK(test::error_message([&] { SafetensorsFile f(dir / "t.safetensors"); }).find("truncated") !=
        std::string::npos);

  const std::string header = R"({"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}})";
  std::string bytes(8, '\0');
  bytes[0] = static_cast<char>(header.size());
  bytes += header + std::string(16, '\0');
  test::write_text(dir / "bad.safetensors", bytes);
  CHECK(test::error_message([&] {
          SafetensorsFile f(dir / "bad.safetensors");
        }).find("do not match its shape and dtype") != std::string::npos);
  test::write_text(dir / "short.safetensors", "abc");
  CHECK(test::error_message([&] {
          SafetensorsFile f(dir / "short.safetensors");
        }).find("truncated") != std::string::npos);
}

TEST_CASE("safetensors: wrapping shapes, repeated names, odd dimensions, directories") {
  test::TempDir dir;
  // A file of `header` (JSON) and `data` zero bytes.
  auto write = [&](const char* name, const std::string& header, std::size_t data) {
    std::string bytes(8, '\0');
    for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((header.size() >> (8 * i)) & 0xff);
    test::write_text(dir / name, bytes + header + std::string(data, '\0'));
  };
  auto message = [&](const char* name) {
    return test::error_message([&] { SafetensorsFile f(dir / name); });
  };
  // (2^62 + 1) x 16 x 4 bytes wraps around 2^64 to 64.
  write("wrap.safetensors",
        R"({"w":{"dtype":"F32","shape":[4611686018427387905,16],"data_offsets":[0,64]}})", 64);
  CHECK(message("wrap.safetensors")
            .find("tensor w has shape [4611686018427387905,16], too large "
                  "to address") != std::string::npos);
  write("twice.safetensors",
        R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
        R"("w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
        8);
  CHECK(message("twice.safetensors").find("tensor w is named twice") != std::string::npos);
  write("float_dim.safetensors", R"({"w":{"dtype":"F32","shape":[1e30],"data_offsets":[0,4]}})", 4);
  CHECK(message("float_dim.safetensors").find("has dimension 1e+30, not a non-negative integer") !=
        std::string::npos);
  write("negative.safetensors", R"({"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4);
  CHECK(message("negative.safetensors").find("has dimension -1, not a non-negative integer") !=
        std::string::npos);
  // A header length past the format's limit, in a small file.
  std::string huge(8, '\0');
  huge[4] = 1;  // 2^32
  test::write_text(dir / "huge.safetensors", huge + "{}");
  CHECK(message("huge.safetensors").find("exceeds the format's limit") != std::string::npos);
  std::filesystem::create_directory(dir / "folder.safetensors");
  CHECK(message("folder.safetensors").find("is a directory") != std::string::npos);
  // Nested objects may repeat names between tensors (the metadata's keys are not tensors).
  write("fine.safetensors",
        R"({"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
        R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
        8);
  CHECK(SafetensorsFile(dir / "fine.safetensors").entries().size() == 2);
}

TEST_CASE("model weights load from both naming conventions") {
  test::TempDir dir;
  const ModelWeights model = ModelWeights::random(4, 8, 12, 5);
  for (const std::string format : {"mixtral", "deepseek"}) {
    CAPTURE(format);
    const std::vector<float> bias =
        format == "deepseek" ? std::vector<float>{0.1f, -0.2f, 0.3f, 0.0f} : std::vector<float>{};
    write_safetensors(dir / "m.safetensors",
                      test::checkpoint_tensors(model, format, DType::kF32, "layers.1.mlp.", bias));
    const ModelWeights loaded = ModelWeights::load(
        dir / "m.safetensors",
        format == "mixtral" ? CheckpointFormat::kMixtral : CheckpointFormat::kDeepseek,
        "layers.1.mlp.");
    CHECK(loaded.num_experts() == 4);
    CHECK(loaded.hidden() == 8);
    CHECK(loaded.ffn_hidden() == 12);
    CHECK(loaded.bias() == bias);
    const auto a = model.experts(3, 1)[0];
    const auto b = loaded.experts(3, 1)[0];
    CHECK(
        std::equal(a.down.data_as<float>(), a.down.data_as<float>() + 96, b.down.data_as<float>()));
  }
  // BF16 weights load as their exact bf16 values.
  write_safetensors(dir / "bf.safetensors",
                    test::checkpoint_tensors(model, "mixtral", DType::kBF16, ""));
  const ModelWeights bf =
      ModelWeights::load(dir / "bf.safetensors", CheckpointFormat::kMixtral, "");
  const float original = model.gate().data<float>()[5];
  CHECK(bf.gate().data<float>()[5] == bf16_to_float(float_to_bf16(original)));

  // A wrong shape and a missing tensor are named.
  auto tensors = test::checkpoint_tensors(model, "mixtral", DType::kF32, "");
  tensors["experts.2.w2.weight"] = HostTensor(DType::kF32, {8, 11});
  write_safetensors(dir / "shape.safetensors", tensors);
  CHECK(test::error_message([&] {
          ModelWeights::load(dir / "shape.safetensors", CheckpointFormat::kMixtral, "");
        }).find("tensor experts.2.w2.weight has shape [8,11], expected [8,12]") !=
        std::string::npos);
  tensors.erase("experts.2.w2.weight");
  write_safetensors(dir / "missing.safetensors", tensors);
  CHECK(test::error_message([&] {
          ModelWeights::load(dir / "missing.safetensors", CheckpointFormat::kMixtral, "");
        }).find("tensor experts.2.w2.weight not found") != std::string::npos);
  CHECK(test::error_message([&] {
          ModelWeights::load(dir / "missing.safetensors", CheckpointFormat::kDeepseek, "");
        }).find("experts.0.gate_proj.weight not found") != std::string::npos);
}

TEST_CASE("random bf16 experts are the f32 draw rounded to nearest even; the gate stays f32") {
  const ModelWeights f32 = ModelWeights::random(3, 8, 5, 9);
  const ModelWeights bf16 = ModelWeights::random(3, 8, 5, 9, DType::kBF16);
  CHECK(std::memcmp(f32.gate().bytes(), bf16.gate().bytes(), f32.gate().size_bytes()) == 0);
  const auto a = f32.experts(0, 3), b = bf16.experts(0, 3);
  for (std::size_t e = 0; e < 3; ++e) {
    for (const auto& [wide, narrow] : {std::pair{a[e].gate, b[e].gate}, std::pair{a[e].up, b[e].up},
                                       std::pair{a[e].down, b[e].down}}) {
      REQUIRE(narrow.dtype() == DType::kBF16);
      for (std::int64_t i = 0; i < wide.numel(); ++i) {
        // By hand: add half an ulp of bf16 (and one more for an odd result), drop 16 bits.
        std::uint32_t bits = 0;
        std::memcpy(&bits, wide.data_as<const float>() + i, 4);
        const auto expected =
            static_cast<std::uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
        CHECK(narrow.data_as<const std::uint16_t>()[i] == expected);
      }
    }
  }
  CHECK_THROWS_AS(ModelWeights::random(3, 8, 5, 9, DType::kF16), Error);
}
