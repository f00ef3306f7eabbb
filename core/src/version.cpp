#include "switchyard/version.hpp"

namespace switchyard {

const char* core_build_id() noexcept { return SWITCHYARD_BUILD_ID; }
const char* core_version() noexcept { return SWITCHYARD_VERSION_STRING; }

}  // namespace switchyard
