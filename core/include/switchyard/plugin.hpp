#pragma once
/// \file
/// The plugin contract and the registry that finds and loads plugins.
///
/// A plugin is a shared library `libswitchyard-<kind>-<name>.so` exporting exactly one
/// C entry point, `switchyard_plugin_v<N>` with N the plugin interface version (version.hpp;
/// today `switchyard_plugin_v9`), that returns a pointer to a static `PluginDescriptor`. The
/// loader checks, in order: the entry exists; `interface_version` equals
/// `kPluginInterfaceVersion`; `build_id` (which carries N too) equals the core's; `kind` and
/// `name` match the file name. Any failure is recorded with its reason; a scan never stops
/// at a bad file. Plugins are written with the SWITCHYARD_*_PLUGIN macros at the bottom.

#include <cstdint>
#include <deque>
#include <filesystem>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "switchyard/config.hpp"
#include "switchyard/data_path.hpp"
#include "switchyard/expert_kernel.hpp"
#include "switchyard/router.hpp"
#include "switchyard/status.hpp"
#include "switchyard/transport.hpp"
#include "switchyard/version.hpp"

namespace switchyard {

/// The plugin interface version (`SWITCHYARD_PLUGIN_INTERFACE`, version.hpp): the one
/// number of the binary contract below, raised on any change to `PluginDescriptor`, the
/// create-argument structs or the interfaces.
inline constexpr std::uint32_t kPluginInterfaceVersion = SWITCHYARD_PLUGIN_INTERFACE;
/// Name of the entry point, which carries the version: "switchyard_plugin_v9".
inline constexpr const char* kPluginEntryName =
    "switchyard_plugin_v" SWITCHYARD_STRINGIFY(SWITCHYARD_PLUGIN_INTERFACE);

/// The kinds of plugin. The name is the middle part of the file name.
enum class PluginKind : std::uint32_t { kTransport = 1, kRouter = 2, kExpert = 3, kDataPath = 4 };
/// "transport", "router", "expert", "datapath".
std::string_view plugin_kind_name(PluginKind kind) noexcept;

/// Arguments of a transport factory.
struct TransportCreateArgs {
  const ConfigSection* options = nullptr;  ///< the [runtime] section (core and plugin keys)
  int requested_ranks = 1;  ///< [runtime] ranks: world size for in-process transports
  double timeout_s = 300;   ///< bound on every blocking wait
  int ranks_per_node = 0;   ///< >0: emulate nodes of this many ranks
};

/// Arguments of a router factory.
struct RouterCreateArgs {
  const ConfigSection* options = nullptr;  ///< the [router] section (core and plugin keys)
  int num_experts = 0;                     ///< E
  /// Selection bias [E] from the checkpoint (e_score_correction_bias); empty if none.
  /// A `bias` option, when set, takes precedence. Copied by the factory.
  std::span<const float> checkpoint_bias;
};

/// Arguments of an expert-kernel factory.
struct ExpertCreateArgs {
  const ConfigSection* options = nullptr;  ///< the [experts] section (core and plugin keys)
  int hidden = 0;                          ///< H
  int ffn_hidden = 0;                      ///< F
  /// The local experts' weights, borrowed: they outlive the kernel.
  std::span<const SwigluExpertWeights> experts;
};

/// Arguments of a data-path factory (one data path per local rank).
struct DataPathCreateArgs {
  const ConfigSection* options = nullptr;  ///< the [runtime] section (core and plugin keys)
  int rank = 0;                            ///< world rank of the local rank it serves
  int local_rank = 0;  ///< that rank's index among the ranks of its node (picks a device)
};

/// Factories fill `out` and return ok, or return an error status. They must not throw;
/// the loader still catches and converts anything thrown, reporting it as a plugin bug.
using TransportFactory = Status (*)(const TransportCreateArgs& args,
                                    std::vector<std::unique_ptr<Transport>>& local_ranks);
using RouterFactory = Status (*)(const RouterCreateArgs& args, std::unique_ptr<Router>& out);
using ExpertFactory = Status (*)(const ExpertCreateArgs& args, std::unique_ptr<ExpertKernel>& out);
using DataPathFactory = Status (*)(const DataPathCreateArgs& args, std::unique_ptr<DataPath>& out);

/// What a plugin's entry point returns. Static storage in the plugin; never freed.
struct PluginDescriptor {
  /// `kPluginInterfaceVersion` as the plugin was built; first, so that it can be checked
  /// before anything else is read.
  std::uint32_t interface_version;
  const char* build_id;  ///< SWITCHYARD_BUILD_ID as compiled into the plugin
  PluginKind kind;
  const char* name;     ///< must match the file name
  const char* version;  ///< the plugin's own version
  const char* summary;  ///< one line
  /// Declares the plugin's keys in its section. May be null (no options).
  void (*declare_options)(ConfigSchema& schema);
  /// Says whether the plugin can work on this machine; never throws. Null: always can.
  Status (*probe)();
  TransportFactory create_transport;  ///< set for kind == kTransport only
  RouterFactory create_router;        ///< set for kind == kRouter only
  ExpertFactory create_expert;        ///< set for kind == kExpert only
  DataPathFactory create_data_path;   ///< set for kind == kDataPath only
};

/// A plugin that loaded and passed every check.
struct PluginInfo {
  PluginKind kind = PluginKind::kRouter;
  std::string name;
  std::string version;
  std::string summary;
  std::filesystem::path path;
  Status probe;  ///< ok, or why it cannot work here (state "unavailable")
};

/// A file that looked like a plugin but was refused.
struct PluginRejection {
  std::filesystem::path path;
  ErrorCode code = ErrorCode::kInternal;
  std::string reason;
};

/// Finds, checks and loads plugins, and creates objects from them. The created objects
/// keep their library loaded for as long as they live. Thread-safe after construction
/// (loading on demand is serialised inside).
class PluginRegistry {
 public:
  /// The standard search path: `SWITCHYARD_PLUGIN_PATH` (colon-separated), then
  /// `config_dirs`, then `lib/switchyard/` beside the core library.
  static std::vector<std::filesystem::path> default_search_path(
      std::span<const std::filesystem::path> config_dirs = {});
  /// Scans every folder of `search_path` for `libswitchyard-*.so` without loading any:
  /// a plugin's code runs only when it is asked for (`find`, `options`, `create_*`) or
  /// by `load_all`. Trust: a folder is searched only if it, and every folder above it
  /// that is not sticky, is owned by this user or root and writable by no one else; a
  /// file is a candidate only if it is a regular file with the same owners and
  /// permissions. Anything else is recorded in `rejected()` and never opened. The first
  /// plugin found for a kind and name wins; later ones are recorded as shadowed.
  explicit PluginRegistry(std::vector<std::filesystem::path> search_path);
  ~PluginRegistry();
  PluginRegistry(const PluginRegistry&) = delete;
  PluginRegistry& operator=(const PluginRegistry&) = delete;

  /// Loads and checks every candidate (for listing them all, as `switchyard plugins` does).
  void load_all() const;

  const std::vector<std::filesystem::path>& search_path() const noexcept;
  /// The plugins loaded so far (all of them after `load_all`). The span is invalidated by
  /// the next load; do not hold it while other threads ask for plugins.
  std::span<const PluginInfo> available() const noexcept;
  /// Files and folders refused so far: at the scan (names, trust) and at loading.
  std::span<const PluginRejection> rejected() const noexcept;

  /// The plugin `kind`/`name`, or `Error(kNotFound)` (none loaded: the message names what
  /// was asked, what is available with versions and paths, what was rejected and why, and
  /// where the registry looked) or `Error(kUnavailable)` (its probe failed: why).
  const PluginInfo& find(PluginKind kind, std::string_view name) const;
  /// The plugin's option schema (empty when it declares none). Available also when the
  /// plugin cannot work here (its probe failed), so that configurations can be checked
  /// and shown anywhere. Throws `Error(kNotFound)` like `find`.
  ConfigSchema options(PluginKind kind, std::string_view name) const;

  /// Create objects; throw like `find`, or the plugin's error.
  std::vector<std::shared_ptr<Transport>> create_transport(std::string_view name,
                                                           const TransportCreateArgs& args) const;
  std::shared_ptr<Router> create_router(std::string_view name, const RouterCreateArgs& args) const;
  std::shared_ptr<ExpertKernel> create_expert(std::string_view name,
                                              const ExpertCreateArgs& args) const;
  std::shared_ptr<DataPath> create_data_path(std::string_view name,
                                             const DataPathCreateArgs& args) const;

 private:
  struct Loaded;
  struct Candidate;
  /// Loads the candidate (under `mutex_`) into `loaded_`, or records why not.
  void try_load(Candidate& candidate) const;
  /// `usable`: also require that the probe passed.
  const Loaded& get(PluginKind kind, std::string_view name, bool usable = true) const;
  std::vector<std::filesystem::path> search_path_;
  mutable std::mutex mutex_;
  mutable std::vector<Candidate> candidates_;
  mutable std::deque<Loaded> loaded_;  // a deque: candidates point into it
  mutable std::vector<PluginInfo> available_;
  mutable std::vector<PluginRejection> rejected_;
};

namespace plugin_detail {
/// Adapts `Create(args) -> object(s)`, which may throw, to a factory that returns a Status.
template <auto Create, typename Args, typename Out>
Status guarded_factory(const Args& args, Out& out) {
  try {
    out = Create(args);
    return {};
  } catch (...) {
    return Status::from_current_exception();
  }
}
template <auto Create>
inline constexpr TransportFactory transport_factory =
    &guarded_factory<Create, TransportCreateArgs, std::vector<std::unique_ptr<Transport>>>;
template <auto Create>
inline constexpr RouterFactory router_factory =
    &guarded_factory<Create, RouterCreateArgs, std::unique_ptr<Router>>;
template <auto Create>
inline constexpr ExpertFactory expert_factory =
    &guarded_factory<Create, ExpertCreateArgs, std::unique_ptr<ExpertKernel>>;
template <auto Create>
inline constexpr DataPathFactory data_path_factory =
    &guarded_factory<Create, DataPathCreateArgs, std::unique_ptr<DataPath>>;
}  // namespace plugin_detail

}  // namespace switchyard

#define SWITCHYARD_PLUGIN_EXPORT extern "C" __attribute__((visibility("default")))
/// The entry point's name as an identifier (switchyard_plugin_v9).
#define SWITCHYARD_PLUGIN_ENTRY SWITCHYARD_CONCAT(switchyard_plugin_v, SWITCHYARD_PLUGIN_INTERFACE)

/// Defines the entry point of a plugin. KIND is kTransport, kRouter, kExpert or kDataPath; FIELD
/// the factory member it fills; CREATE a function taking the kind's create-args and returning what
/// the factory fills (it may throw `switchyard::Error`); DECLARE fills the schema (or nullptr);
/// PROBE returns a Status (or nullptr).
#define SWITCHYARD_DEFINE_PLUGIN_IMPL(KIND, NAME, VERSION, SUMMARY, DECLARE, PROBE, FACTORY) \
  SWITCHYARD_PLUGIN_EXPORT const ::switchyard::PluginDescriptor* SWITCHYARD_PLUGIN_ENTRY() { \
    static const ::switchyard::PluginDescriptor descriptor = [] {                            \
      ::switchyard::PluginDescriptor d{};                                                    \
      d.interface_version = ::switchyard::kPluginInterfaceVersion;                           \
      d.build_id = SWITCHYARD_BUILD_ID;                                                      \
      d.kind = ::switchyard::PluginKind::KIND;                                               \
      d.name = NAME;                                                                         \
      d.version = VERSION;                                                                   \
      d.summary = SUMMARY;                                                                   \
      d.declare_options = DECLARE;                                                           \
      d.probe = PROBE;                                                                       \
      FACTORY;                                                                               \
      return d;                                                                              \
    }();                                                                                     \
    return &descriptor;                                                                      \
  }

/// A transport plugin. CREATE: std::vector<std::unique_ptr<Transport>>(const TransportCreateArgs&).
#define SWITCHYARD_TRANSPORT_PLUGIN(NAME, VERSION, SUMMARY, DECLARE, PROBE, CREATE) \
  SWITCHYARD_DEFINE_PLUGIN_IMPL(                                                    \
      kTransport, NAME, VERSION, SUMMARY, DECLARE, PROBE,                           \
      d.create_transport = ::switchyard::plugin_detail::transport_factory<CREATE>)

/// A router plugin. CREATE: std::unique_ptr<Router>(const RouterCreateArgs&).
#define SWITCHYARD_ROUTER_PLUGIN(NAME, VERSION, SUMMARY, DECLARE, CREATE) \
  SWITCHYARD_DEFINE_PLUGIN_IMPL(                                          \
      kRouter, NAME, VERSION, SUMMARY, DECLARE, nullptr,                  \
      d.create_router = ::switchyard::plugin_detail::router_factory<CREATE>)

/// An expert-kernel plugin. CREATE: std::unique_ptr<ExpertKernel>(const ExpertCreateArgs&).
#define SWITCHYARD_EXPERT_PLUGIN(NAME, VERSION, SUMMARY, DECLARE, PROBE, CREATE) \
  SWITCHYARD_DEFINE_PLUGIN_IMPL(                                                 \
      kExpert, NAME, VERSION, SUMMARY, DECLARE, PROBE,                           \
      d.create_expert = ::switchyard::plugin_detail::expert_factory<CREATE>)

/// A data-path plugin (the layer's primitives on a device). CREATE:
/// std::unique_ptr<DataPath>(const DataPathCreateArgs&).
#define SWITCHYARD_DATA_PATH_PLUGIN(NAME, VERSION, SUMMARY, DECLARE, PROBE, CREATE) \
  SWITCHYARD_DEFINE_PLUGIN_IMPL(                                                    \
      kDataPath, NAME, VERSION, SUMMARY, DECLARE, PROBE,                            \
      d.create_data_path = ::switchyard::plugin_detail::data_path_factory<CREATE>)
