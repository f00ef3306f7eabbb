// The fault suite, file part: malformed inputs, checkpoints and configurations given to
// `switchyard run`, as a hostile user would. Each must end with exit 1 and a message that
// names the file, within seconds, without writing the output, and with a peak RSS under
// 64 MiB plus the file's size (measured by /usr/bin/time) above the tool's own: its peak when
// it refuses a file that does not exist (the runtime, its plugins and, in a sanitizer build,
// the sanitizer's runtime, about 8 MiB in a release build and 70 under AddressSanitizer).
// The files are written byte by byte here, independently of the readers.
#include <doctest/doctest.h>
#include <sys/stat.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <string>

#include "test_support.hpp"

using namespace switchyard;

namespace {

const std::string kTool = SWITCHYARD_TOOL_PATH;

/// An .npy file: magic, version, a header length field of `length_bytes` (2 for version 1,
/// 4 after) holding `declared` (the header's true length when 0), the header, then
/// `data` zero bytes.
std::string npy_bytes(int version, const std::string& dict, std::size_t data,
                      std::uint64_t declared = 0) {
  std::string header = dict;
  const std::size_t prefix = version == 1 ? 10 : 12;
  while ((prefix + header.size() + 1) % 64 != 0) header += ' ';
  header += '\n';
  std::string bytes = "\x93NUMPY";
  bytes += static_cast<char>(version);
  bytes += '\0';
  const std::uint64_t length = declared != 0 ? declared : header.size();
  for (std::size_t i = 0; i < (version == 1 ? 2u : 4u); ++i)
    bytes += static_cast<char>((length >> (8 * i)) & 0xff);
  return bytes + header + std::string(data, '\0');
}

/// A safetensors file: u64 little-endian header length, JSON header, `data` zero bytes.
std::string safetensors_bytes(const std::string& json, std::size_t data,
                              std::uint64_t declared = 0) {
  std::string bytes;
  const std::uint64_t length = declared != 0 ? declared : json.size();
  for (int i = 0; i < 8; ++i) bytes += static_cast<char>((length >> (8 * i)) & 0xff);
  return bytes + json + std::string(data, '\0');
}

struct Outcome {
  test::CommandResult result;
  double seconds = 0;
  long peak_rss_kib = -1;
};

/// Runs `switchyard run` on a small config plus `overrides`, under /usr/bin/time.
Outcome run_tool(const test::TempDir& dir, const std::string& config_path,
                 const std::string& overrides) {
  const auto start = std::chrono::steady_clock::now();
  Outcome o;
  o.result = test::run_command("/usr/bin/time -f 'peak_rss_kib=%M' " + kTool + " run " +
                               config_path + " --set output.path=" + (dir / "y.npy").string() +
                               " " + overrides + " 2>&1");
  o.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const auto at = o.result.output.rfind("peak_rss_kib=");
  if (at != std::string::npos) o.peak_rss_kib = std::stol(o.result.output.substr(at + 13));
  return o;
}

std::string small_config(const test::TempDir& dir) {
  test::write_text(dir / "moe.toml",
                   "[runtime]\nranks = 2\ntimeout_s = 3\n[model]\nnum_experts = 4\nhidden = 16\n"
                   "ffn_hidden = 8\n[router]\ntop_k = 2\n");
  return (dir / "moe.toml").string();
}

/// The tool's own peak RSS in this build: refusing a file that does not exist.
long baseline_rss_kib() {
  static const long baseline = [] {
    test::TempDir dir;
    const Outcome o =
        run_tool(dir, small_config(dir), "--set input.tokens=" + (dir / "absent.npy").string());
    INFO(o.result.output);
    REQUIRE(o.result.exit_code == 1);
    REQUIRE(o.peak_rss_kib > 0);
    return o.peak_rss_kib;
  }();
  return baseline;
}

/// What a refusal may cost above the tool's own peak RSS, beside the file's size.
constexpr long kRefusalBudgetKib = 64 * 1024;

/// The checks every hostile file must pass.
void check_refused(const test::TempDir& dir, const Outcome& o, const std::string& file,
                   const std::string& expected) {
  INFO(o.result.output);
  CHECK(o.result.exit_code == 1);
  CHECK(o.result.output.find(file) != std::string::npos);
  CHECK(o.result.output.find(expected) != std::string::npos);
  CHECK(o.result.output.find("internal error") == std::string::npos);
  CHECK(o.seconds < 10);
  std::error_code ec;
  const auto size = std::filesystem::is_regular_file(file, ec) ? std::filesystem::file_size(file)
                                                               : std::uintmax_t{0};
  CHECK(o.peak_rss_kib > 0);
  CHECK(o.peak_rss_kib < baseline_rss_kib() + kRefusalBudgetKib + static_cast<long>(size / 1024));
  CHECK_FALSE(std::filesystem::exists(dir / "y.npy"));
}

/// A hostile file: its name, its bytes, and what the refusal must say.
struct FileCase {
  const char* name;
  std::string bytes;
  const char* expected;
};

/// Writes each file and gives it to `switchyard run` as `key`; each must be refused.
void refuse_each(const test::TempDir& dir, const std::string& config,
                 std::initializer_list<FileCase> cases, const std::string& key) {
  for (const auto& c : cases) {
    CAPTURE(c.name);
    test::write_text(dir / c.name, c.bytes);
    const std::string file = (dir / c.name).string();
    const Outcome o = run_tool(dir, config, "--set " + key + "=" + file);
    check_refused(dir, o, file, c.expected);
    CHECK(o.result.output.find("router.top_k") == std::string::npos);
  }
}

}  // namespace

TEST_CASE("hostile .npy token files are refused before they cost memory") {
  test::TempDir dir;
  const std::string config = small_config(dir);
  refuse_each(
      dir, config,
      {
          {"short.npy",
           npy_bytes(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (50000000, 16), }", 228),
           "truncated data"},
          {"header_2e31.npy",
           npy_bytes(2, "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 16), }", 64,
                     std::uint64_t{1} << 31),
           "header length 2147483648 exceeds"},
          {"header_2e32.npy",
           npy_bytes(3, "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 16), }", 64,
                     0xffffffffu),
           "header length 4294967295 exceeds"},
          {"wraps.npy",
           npy_bytes(
               1, "{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904, 16), }",
               64),
           "too large"},
      },
      "input.tokens");
  std::filesystem::create_directory(dir / "folder.npy");
  const std::string folder = (dir / "folder.npy").string();
  check_refused(dir, run_tool(dir, config, "--set input.tokens=" + folder), folder,
                "is a directory");
  REQUIRE(::mkfifo((dir / "fifo.npy").c_str(), 0600) == 0);
  const std::string fifo = (dir / "fifo.npy").string();
  check_refused(dir, run_tool(dir, config, "--set input.tokens=" + fifo), fifo,
                "not a regular file");
}

TEST_CASE("hostile safetensors checkpoints are refused, naming the file, not a router key") {
  test::TempDir dir;
  const std::string config = small_config(dir);
  refuse_each(
      dir, config,
      {
          {"wrap.safetensors",
           safetensors_bytes(
               R"({"w":{"dtype":"F32","shape":[4611686018427387905,16],"data_offsets":[0,64]}})",
               64),
           "too large to address"},
          {"twice.safetensors",
           safetensors_bytes(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                             R"("w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                             8),
           "named twice"},
          {"huge_header.safetensors", safetensors_bytes("{}", 0, std::uint64_t{1} << 32),
           "exceeds the format's limit"},
          {"float_dim.safetensors",
           safetensors_bytes(R"({"w":{"dtype":"F32","shape":[1e30],"data_offsets":[0,4]}})", 4),
           "not a non-negative integer"},
      },
      "model.weights");
}

TEST_CASE("hostile configuration files: a FIFO, a directory, an oversized file") {
  test::TempDir dir;
  REQUIRE(::mkfifo((dir / "fifo.toml").c_str(), 0600) == 0);
  std::filesystem::create_directory(dir / "folder.toml");
  test::write_text(dir / "big.toml", "# " + std::string(2 << 20, 'x') + "\n");
  const std::pair<const char*, const char*> cases[] = {
      {"fifo.toml", "is not a regular file"},
      {"folder.toml", "is a directory"},
      {"big.toml", "a configuration is at most 1048576"},
  };
  for (const auto& [name, expected] : cases) {
    CAPTURE(name);
    const std::string file = (dir / name).string();
    check_refused(dir, run_tool(dir, file, ""), file, expected);
  }
}

TEST_CASE("configurations too large for the machine are refused before allocating") {
  test::TempDir dir;
  const std::string config = small_config(dir);
  const std::pair<std::string, std::string> cases[] = {
      {"--set model.num_experts=65536 --set model.hidden=1024 --set model.ffn_hidden=1024",
       "model.num_experts, model.hidden, model.ffn_hidden: needs 768 GiB"},
      {"--set input.num_tokens=1099511627776", "input.num_tokens: needs "},
      {"--set runtime.timeout_s=1e10", "runtime.timeout_s: must be a number of seconds in (0, "},
      {"--set experts.blas_threads=1024", "experts.blas_threads: must be at most the "},
  };
  for (const auto& [overrides, expected] : cases) {
    CAPTURE(overrides);
    const Outcome o = run_tool(dir, config, overrides);
    INFO(o.result.output);
    CHECK(o.result.exit_code == 1);
    CHECK(o.result.output.find(expected) != std::string::npos);
    CHECK(o.peak_rss_kib < baseline_rss_kib() + kRefusalBudgetKib);
    CHECK(o.seconds < 10);
  }
  // Many in-process ranks under a memory limit: a thread that cannot start is an error
  // naming the rank, not a terminate or a hang. (AddressSanitizer cannot start at all
  // under ulimit -v: its shadow memory is a reservation of terabytes.)
#if defined(__SANITIZE_ADDRESS__)
  MESSAGE("ranks under ulimit -v: not run under AddressSanitizer");
  return;
#endif
  const auto limited = test::run_command("ulimit -v 2000000; " + kTool + " run " + config +
                                         " --set runtime.ranks=1024 2>&1");
  INFO(limited.output);
  CHECK(limited.exit_code == 1);
  CHECK(limited.output.find("cannot start the thread of local rank ") != std::string::npos);
}
