#pragma once
/// \file
/// Version of the Switchyard core and the identity of the build that plugins must match.

// Any standard header defines the library macros the build id reads.
#include <cstddef>

/// Core version; CMake reads the project version from this line.
#define SWITCHYARD_VERSION_STRING "0.1.0"

#define SWITCHYARD_STRINGIFY_IMPL(x) #x
#define SWITCHYARD_STRINGIFY(x) SWITCHYARD_STRINGIFY_IMPL(x)
#define SWITCHYARD_CONCAT_IMPL(a, b) a##b
#define SWITCHYARD_CONCAT(a, b) SWITCHYARD_CONCAT_IMPL(a, b)

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

/// The plugin interface version, the one number of the plugin contract: it names the
/// entry point (`switchyard_plugin_v<N>`), the descriptor declares it and the build id
/// carries it. Raised whenever anything that crosses the plugin boundary changes (the
/// descriptor, a create-argument struct, a virtual function added, a member moved), so that
/// a plugin built before is refused instead of calling through a stale vtable. Before 8 it
/// was two numbers, an entry-point ABI (last 2) and an interface revision (last 7: streams
/// and device memory, the fused expert path, `Router::backward`, saved columns, bf16 expert
/// rows). 8: one number; `SwigluExpertWeights` block scales (FP8 weights);
/// `ExpertKernel::capabilities` as one value. 9: `LayoutCountsArgs::slots_to_expert` (the
/// counts exchange carries each peer's slots per local expert), `GroupArgs::rows_per_expert`
/// read, not written; data-path calls that write host memory return with it written;
/// `DataPath::route_token_choice` queues the routing, `finish_route_token_choice` reports.
/// 10: `Transport::do_alltoallv_group` (several exchanges as one collective) and
/// `raise_stream_error`; `Stream::wait`; `DataPath::borrow_stream`; `RouteInput::token_ids`
/// and `Router::needs_token_ids`; `LayerParts`' token ids.
#define SWITCHYARD_PLUGIN_INTERFACE 10

/// Expanded where it is compiled: the core records its own, every plugin records the one
/// it was built with, and the loader refuses a plugin whose build id differs, because
/// C++ objects (std::string, std::vector, vtables) cross the plugin boundary.
#define SWITCHYARD_BUILD_ID                                                                     \
  "switchyard " SWITCHYARD_VERSION_STRING "; " SWITCHYARD_COMPILER_ID "; " SWITCHYARD_STDLIB_ID \
  "; c++ " SWITCHYARD_STRINGIFY(__cplusplus) "; plugin interface " SWITCHYARD_STRINGIFY(        \
      SWITCHYARD_PLUGIN_INTERFACE)

namespace switchyard {
/// The build id this core was compiled with.
const char* core_build_id() noexcept;
/// The core version, e.g. "0.1.0".
const char* core_version() noexcept;
}  // namespace switchyard
