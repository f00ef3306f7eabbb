// libFuzzer target: the safetensors reader, on any bytes, reading every tensor it lists.
#include "fuzz_support.hpp"
#include "switchyard/io.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const switchyard::fuzz::MemoryFile file(data, size);
  switchyard::fuzz::expect_only_errors([&] {
    const switchyard::SafetensorsFile f(file.path());
    for (const auto& entry : f.entries()) {
      const std::string& name = entry.first;
      switchyard::fuzz::expect_only_errors([&] { (void)f.read(name); });
      switchyard::fuzz::expect_only_errors([&] { (void)f.read_f32(name); });
    }
  });
  return 0;
}
