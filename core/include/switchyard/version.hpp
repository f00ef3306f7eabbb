#pragma once
/// \file
/// Version of the Switchyard core and the identity of the build that plugins must match.

// Any standard header defines the library macros the build id reads.
#include <cstddef>

/// Core version; CMake reads the project version from this line.
#define SWITCHYARD_VERSION_STRING "0.1.0"

#define SWITCHYARD_STRINGIFY_IMPL(x) #x
#define SWITCHYARD_STRINGIFY(x) SWITCHYARD_STRINGIFY_IMPL(x)

#if defined(__clang__)
#define SWITCHYARD_COMPILER_ID "clang " __clang_version__
#elif defined(__GNUC__)
#define SWITCHYARD_COMPILER_ID "gcc " __VERSION__
#else
#define SWITCHYARD_COMPILER_ID "unknown compiler"
#endif

#if defined(_GLIBCXX_USE_CXX11_ABI)
#define SWITCHYARD_STDLIB_ID "libstdc++ cxx11-abi=" SWITCHYARD_STRINGIFY(_GLIBCXX_USE_CXX11_ABI)
#elif defined(_LIBCPP_VERSION)
#define SWITCHYARD_STDLIB_ID "libc++ " SWITCHYARD_STRINGIFY(_LIBCPP_VERSION)
#else
#define SWITCHYARD_STDLIB_ID "unknown stdlib"
#endif

/// Raised whenever a class that crosses the plugin boundary changes its layout within a
/// core version (a virtual function added, a member moved), so that a plugin built before
/// is refused by its build id instead of calling through a stale vtable. Revision 2:
/// `ExpertKernel::fuses_weighted_rows` and `forward_weighted`, `DataPath::pack_runs`.
/// Revision 3: `PeerMessaging::world_ranks`. Revision 4: `Router::backward`. Revision 5:
/// `ExpertKernel::saved_columns`, `ExpertBatch::saved`, `ExpertGradientBatch::saved`.
/// Revision 6: `ExpertKernel::input_dtype`, `GroupArgs::expert_input_dtype`. Revision 7:
/// `ExpertKernel::output_dtype`, `WeightedReduceArgs::expert_output` (bytes) and
/// `expert_output_dtype`.
#define SWITCHYARD_INTERFACE_REVISION "7"

/// Expanded where it is compiled: the core records its own, every plugin records the one
/// it was built with, and the loader refuses a plugin whose build id differs, because
/// C++ objects (std::string, std::vector, vtables) cross the plugin boundary.
#define SWITCHYARD_BUILD_ID                                                                     \
  "switchyard " SWITCHYARD_VERSION_STRING "; " SWITCHYARD_COMPILER_ID "; " SWITCHYARD_STDLIB_ID \
  "; c++ " SWITCHYARD_STRINGIFY(__cplusplus) "; interfaces " SWITCHYARD_INTERFACE_REVISION

namespace switchyard {
/// The build id this core was compiled with.
const char* core_build_id() noexcept;
/// The core version, e.g. "0.1.0".
const char* core_version() noexcept;
}  // namespace switchyard
