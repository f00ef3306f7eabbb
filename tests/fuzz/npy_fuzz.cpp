// libFuzzer target: the .npy reader, on any bytes.
#include "fuzz_support.hpp"
#include "switchyard/io.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const switchyard::fuzz::MemoryFile file(data, size);
  switchyard::fuzz::expect_only_errors([&] {
    const switchyard::HostTensor t = switchyard::read_npy(file.path());
    // What it returns must be as large as it says.
    volatile std::byte sink{};
    if (t.size_bytes() > 0) sink = t.bytes()[t.size_bytes() - 1];
    (void)sink;
  });
  return 0;
}
