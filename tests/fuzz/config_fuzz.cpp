// libFuzzer target: TOML configurations, parsed and validated against every core section.
#include <string_view>

#include "fuzz_support.hpp"
#include "switchyard/config.hpp"
#include "switchyard/runtime.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  switchyard::fuzz::expect_only_errors([&] {
    const switchyard::Config config = switchyard::Config::from_string(text, "fuzz.toml");
    switchyard::fuzz::expect_only_errors(
        [&] { config.check_sections(switchyard::config_sections()); });
    for (const std::string_view section : switchyard::config_sections()) {
      switchyard::fuzz::expect_only_errors([&] {
        (void)config.section(std::string(section), switchyard::core_schema(section),
                             /*reject_unknown=*/false);
      });
    }
  });
  return 0;
}
