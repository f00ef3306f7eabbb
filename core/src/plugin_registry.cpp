// Finds, checks and loads plugins with Boost.DLL. Every failure is recorded, never fatal
// to the scan; asking for a plugin that did not load explains everything in one message.
// BOOST_DLL_USE_STD_FS is set by CMake. library_info.hpp needs <vector> before it.
#include <string>
#include <vector>

#include <boost/dll/library_info.hpp>
#include <boost/dll/runtime_symbol_info.hpp>
#include <boost/dll/shared_library.hpp>

#include <dlfcn.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <regex>
#include <sstream>

#include "switchyard/plugin.hpp"

namespace switchyard {

std::string_view plugin_kind_name(PluginKind kind) noexcept {
  switch (kind) {
    case PluginKind::kTransport:
      return "transport";
    case PluginKind::kRouter:
      return "router";
    case PluginKind::kExpert:
      return "expert";
    case PluginKind::kDataPath:
      return "datapath";
  }
  return "unknown";
}

namespace {

std::optional<PluginKind> kind_from_name(std::string_view name) {
  for (auto kind :
       {PluginKind::kTransport, PluginKind::kRouter, PluginKind::kExpert, PluginKind::kDataPath}) {
    if (plugin_kind_name(kind) == name) return kind;
  }
  return std::nullopt;
}

bool is_factory_set(const PluginDescriptor& d) {
  switch (d.kind) {
    case PluginKind::kTransport:
      return d.create_transport != nullptr;
    case PluginKind::kRouter:
      return d.create_router != nullptr;
    case PluginKind::kExpert:
      return d.create_expert != nullptr;
    case PluginKind::kDataPath:
      return d.create_data_path != nullptr;
  }
  return false;
}

/// Names of the exported symbols that look like another interface version's entry point.
std::vector<std::string> other_entry_points(const std::filesystem::path& path) {
  std::vector<std::string> found;
  try {
    boost::dll::library_info info(path);
    for (const auto& symbol : info.symbols()) {
      if (symbol.rfind("switchyard_plugin_v", 0) == 0) found.push_back(symbol);
    }
  } catch (const std::exception&) {
    // Unreadable symbol table: report only that the entry point is missing.
  }
  return found;
}

}  // namespace

struct PluginRegistry::Loaded {
  PluginInfo info;
  const PluginDescriptor* descriptor = nullptr;
  std::shared_ptr<boost::dll::shared_library> library;
};

/// A file whose name says it is plugin `kind`/`name`, found in a trusted folder, and
/// loaded only when that plugin is asked for.
struct PluginRegistry::Candidate {
  PluginKind kind = PluginKind::kRouter;
  std::string name;
  std::filesystem::path path;
  bool tried = false;
  const Loaded* loaded = nullptr;  // set once it loaded and passed every check
};

namespace {

/// Why code in `path` (a folder or file) could be swapped by someone other than this user
/// or root, or why it is not what a plugin file must be; empty when it is trusted.
/// For a folder, also checks every folder above it, allowing sticky ones such as /tmp,
/// where nobody else can rename what is ours.
std::string distrust(const std::filesystem::path& path, bool is_folder) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return std::string("cannot stat: ") + std::strerror(errno);
  if (is_folder ? !S_ISDIR(st.st_mode) : !S_ISREG(st.st_mode))
    return is_folder ? "not a folder" : "not a regular file";
  const uid_t me = ::geteuid();
  if (st.st_uid != me && st.st_uid != 0)
    return "owned by another user (uid " + std::to_string(st.st_uid) + ")";
  if ((st.st_mode & (S_IWGRP | S_IWOTH)) != 0) {
    return std::string(is_folder ? "folder" : "file") +
           " is writable by group or others (chmod go-w it, or move the plugins)";
  }
  if (!is_folder) return "";
  for (auto up = std::filesystem::absolute(path).parent_path();; up = up.parent_path()) {
    struct stat above {};
    if (::stat(up.c_str(), &above) != 0) break;
    const bool sticky = (above.st_mode & S_ISVTX) != 0;
    if (above.st_uid != me && above.st_uid != 0)
      return "inside " + up.string() + ", owned by another user";
    if ((above.st_mode & (S_IWGRP | S_IWOTH)) != 0 && !sticky)
      return "inside " + up.string() + ", which is writable by group or others";
    if (up == up.parent_path()) break;
  }
  return "";
}

}  // namespace

std::vector<std::filesystem::path> PluginRegistry::default_search_path(
    std::span<const std::filesystem::path> config_dirs) {
  std::vector<std::filesystem::path> path;
  if (const char* env = std::getenv("SWITCHYARD_PLUGIN_PATH"); env != nullptr) {
    std::string_view rest(env);
    while (!rest.empty()) {
      const auto colon = rest.find(':');
      const auto part = rest.substr(0, colon);
      if (!part.empty()) path.emplace_back(part);
      if (colon == std::string_view::npos) break;
      rest.remove_prefix(colon + 1);
    }
  }
  path.insert(path.end(), config_dirs.begin(), config_dirs.end());
  // The core library's own folder: build/lib/ in a build tree, <prefix>/lib/ when installed.
  path.push_back(boost::dll::this_line_location().parent_path() / "switchyard");
  return path;
}

PluginRegistry::PluginRegistry(std::vector<std::filesystem::path> search_path)
    : search_path_(std::move(search_path)) {
  static const std::regex file_pattern(R"(libswitchyard-([a-z]+)-([A-Za-z0-9_]+)\.so)");
  // Only names and file types are read here: no plugin's code runs until it is asked for.
  for (const auto& dir : search_path_) {
    std::error_code ec;
    if (!std::filesystem::is_directory(dir, ec)) continue;
    if (const std::string why = distrust(dir, /*is_folder=*/true); !why.empty()) {
      rejected_.push_back({dir, ErrorCode::kUnavailable,
                           "folder not searched: " + why +
                               "; plugins load only from folders "
                               "that only their owner (this user or root) can change"});
      continue;
    }
    std::vector<std::filesystem::path> files;
    for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
      const std::string file = entry.path().filename().string();
      if (file.rfind("libswitchyard-", 0) == 0 && file.find(".so") != std::string::npos) {
        files.push_back(entry.path());
      }
    }
    std::sort(files.begin(), files.end());
    for (const auto& file : files) {
      std::smatch match;
      const std::string filename = file.filename().string();
      if (!std::regex_match(filename, match, file_pattern) || !kind_from_name(match[1].str())) {
        rejected_.push_back({file, ErrorCode::kInvalidArgument,
                             "file name does not follow libswitchyard-<kind>-<name>.so with kind "
                             "transport, router, expert or datapath"});
        continue;
      }
      if (const std::string why = distrust(file, /*is_folder=*/false); !why.empty()) {
        rejected_.push_back({file, ErrorCode::kUnavailable, "not loaded: " + why});
        continue;
      }
      Candidate c;
      c.kind = *kind_from_name(match[1].str());
      c.name = match[2].str();
      c.path = file;
      auto earlier = std::find_if(candidates_.begin(), candidates_.end(), [&](const auto& other) {
        return other.kind == c.kind && other.name == c.name;
      });
      if (earlier != candidates_.end()) {
        rejected_.push_back(
            {file, ErrorCode::kInvalidArgument,
             "shadowed by " + earlier->path.string() + ", found earlier in the search path"});
        continue;
      }
      candidates_.push_back(std::move(c));
    }
  }
}

void PluginRegistry::try_load(Candidate& candidate) const {
  candidate.tried = true;
  const auto& file = candidate.path;
  auto reject = [&](ErrorCode code, std::string reason) {
    rejected_.push_back({file, code, std::move(reason)});
  };
  auto library = std::make_shared<boost::dll::shared_library>();
  try {
    // Never unmapped: vendor libraries behind plugins (UCX, MPI, CUDA) keep threads and
    // exit handlers that must outlive the plugin objects.
    const auto no_delete = static_cast<boost::dll::load_mode::type>(RTLD_NODELETE);
    // Immediate binding: a missing symbol is a rejection now, not a crash at first call.
    library->load(file,
                  boost::dll::load_mode::rtld_now | boost::dll::load_mode::rtld_local | no_delete);
  } catch (const std::exception& e) {
    return reject(ErrorCode::kUnavailable, std::string("cannot be loaded: ") + e.what());
  }
  if (!library->has(kPluginEntryName)) {
    const auto others = other_entry_points(file);
    if (!others.empty()) {
      return reject(ErrorCode::kAbiMismatch,
                    "exports " + others.front() + " but this core loads plugin interface " +
                        std::to_string(kPluginInterfaceVersion) + " (" + kPluginEntryName +
                        "); rebuild the plugin against this core");
    }
    return reject(ErrorCode::kNotFound, std::string("does not export the entry point ") +
                                            kPluginEntryName + "; is it a Switchyard plugin?");
  }
  const PluginDescriptor* d = nullptr;
  try {
    d = library->get<const PluginDescriptor*()>(kPluginEntryName)();
  } catch (const std::exception& e) {
    return reject(ErrorCode::kInternal, std::string("entry point threw: ") + e.what());
  }
  if (d == nullptr) return reject(ErrorCode::kInternal, "entry point returned no descriptor");
  if (d->interface_version != kPluginInterfaceVersion) {
    return reject(ErrorCode::kAbiMismatch,
                  "descriptor declares plugin interface " + std::to_string(d->interface_version) +
                      ", this core needs " + std::to_string(kPluginInterfaceVersion) +
                      "; rebuild the plugin against this core");
  }
  if (d->build_id == nullptr || std::strcmp(d->build_id, core_build_id()) != 0) {
    return reject(ErrorCode::kAbiMismatch,
                  std::string("built as \"") + (d->build_id ? d->build_id : "(none)") +
                      "\" but this core is \"" + core_build_id() +
                      "\"; C++ objects cross the plugin boundary, so rebuild the plugin with the "
                      "same compiler and core");
  }
  if (d->kind != candidate.kind) {
    return reject(ErrorCode::kInvalidArgument,
                  "declares kind \"" + std::string(plugin_kind_name(d->kind)) +
                      "\" but its file name says \"" +
                      std::string(plugin_kind_name(candidate.kind)) + "\"");
  }
  if (d->name == nullptr || candidate.name != d->name) {
    return reject(ErrorCode::kInvalidArgument,
                  "declares name \"" + std::string(d->name ? d->name : "(none)") +
                      "\" but its file name says \"" + candidate.name + "\"");
  }
  if (!is_factory_set(*d)) return reject(ErrorCode::kInternal, "declares no factory for its kind");
  Loaded loaded;
  loaded.descriptor = d;
  loaded.library = std::move(library);
  loaded.info.kind = d->kind;
  loaded.info.name = d->name;
  loaded.info.version = d->version ? d->version : "";
  loaded.info.summary = d->summary ? d->summary : "";
  loaded.info.path = file;
  if (d->probe != nullptr) {
    try {
      loaded.info.probe = d->probe();
    } catch (...) {
      loaded.info.probe = Status::from_current_exception();
    }
  }
  loaded_.push_back(std::move(loaded));
  candidate.loaded = &loaded_.back();
  available_.push_back(loaded_.back().info);
}

void PluginRegistry::load_all() const {
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto& c : candidates_) {
    if (!c.tried) try_load(c);
  }
}

PluginRegistry::~PluginRegistry() = default;

const std::vector<std::filesystem::path>& PluginRegistry::search_path() const noexcept {
  return search_path_;
}
std::span<const PluginInfo> PluginRegistry::available() const noexcept { return available_; }
std::span<const PluginRejection> PluginRegistry::rejected() const noexcept { return rejected_; }

const PluginRegistry::Loaded& PluginRegistry::get(PluginKind kind, std::string_view name,
                                                  bool usable) const {
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto& c : candidates_) {
    if (c.kind != kind || c.name != name) continue;
    if (!c.tried) try_load(c);
    if (c.loaded == nullptr) break;
    const Loaded& l = *c.loaded;
    if (usable && !l.info.probe.ok()) {
      throw Error(ErrorCode::kUnavailable, std::string(plugin_kind_name(kind)) + " plugin \"" +
                                               std::string(name) + "\" (" + l.info.path.string() +
                                               ") cannot work here: " + l.info.probe.message);
    }
    return l;
  }
  const std::string kind_name(plugin_kind_name(kind));
  const std::string wanted_file = "libswitchyard-" + kind_name + "-" + std::string(name) + ".so";
  std::ostringstream msg;
  msg << kind_name << " plugin \"" << name << "\" not found (looked for " << wanted_file << ").";
  msg << "\n  " << kind_name << " plugins found:";
  bool any = false;
  for (const auto& c : candidates_) {
    // Others of the kind are named, not loaded: their code runs only when asked for.
    if (c.kind != kind || (c.tried && c.loaded == nullptr)) continue;
    msg << (any ? "," : "") << " " << c.name;
    if (c.loaded != nullptr) msg << " " << c.loaded->info.version;
    msg << " (" << c.path.string() << ")";
    any = true;
  }
  if (!any) msg << " none";
  // The requested plugin's own file first: it is the most likely explanation.
  std::vector<const PluginRejection*> rejections;
  for (const auto& r : rejected_) {
    if (r.path.filename() == wanted_file)
      rejections.insert(rejections.begin(), &r);
    else
      rejections.push_back(&r);
  }
  if (!rejections.empty()) {
    msg << "\n  rejected:";
    for (const auto* r : rejections) {
      msg << "\n    " << r->path.string() << ": " << error_code_name(r->code) << ": " << r->reason;
    }
  }
  msg << "\n  searched:";
  for (const auto& dir : search_path_) {
    std::error_code ec;
    msg << " " << dir.string() << (std::filesystem::is_directory(dir, ec) ? "" : " (missing)");
  }
  msg << "\n  set SWITCHYARD_PLUGIN_PATH or [runtime] plugin_dirs to add folders";
  throw Error(ErrorCode::kNotFound, msg.str());
}

const PluginInfo& PluginRegistry::find(PluginKind kind, std::string_view name) const {
  return get(kind, name).info;
}

ConfigSchema PluginRegistry::options(PluginKind kind, std::string_view name) const {
  const auto& l = get(kind, name, /*usable=*/false);
  ConfigSchema schema;
  if (l.descriptor->declare_options != nullptr) {
    try {
      l.descriptor->declare_options(schema);
    } catch (...) {
      const Status s = Status::from_current_exception();
      throw Error(ErrorCode::kInternal, std::string(plugin_kind_name(kind)) + " plugin \"" +
                                            std::string(name) +
                                            "\" failed to declare its options: " + s.message);
    }
  }
  return schema;
}

namespace {
/// Calls a factory; anything thrown through it is a plugin bug and is reported as such.
template <typename Call>
void call_factory(const PluginInfo& info, Call&& call) {
  Status status;
  try {
    status = call();
  } catch (...) {
    const Status thrown = Status::from_current_exception();
    throw Error(ErrorCode::kInternal, std::string(plugin_kind_name(info.kind)) + " plugin \"" +
                                          info.name + "\" (" + info.path.string() +
                                          ") threw from its factory instead of returning a "
                                          "status: " +
                                          thrown.message);
  }
  status.throw_if_error();
}

template <typename T>
std::shared_ptr<T> keep_library_alive(std::unique_ptr<T> object,
                                      std::shared_ptr<boost::dll::shared_library> library) {
  if (!object) return nullptr;
  return std::shared_ptr<T>(object.release(), [library = std::move(library)](T* p) { delete p; });
}
}  // namespace

std::vector<std::shared_ptr<Transport>> PluginRegistry::create_transport(
    std::string_view name, const TransportCreateArgs& args) const {
  const auto& l = get(PluginKind::kTransport, name);
  std::vector<std::unique_ptr<Transport>> made;
  call_factory(l.info, [&] { return l.descriptor->create_transport(args, made); });
  std::vector<std::shared_ptr<Transport>> out;
  for (auto& t : made) out.push_back(keep_library_alive(std::move(t), l.library));
  if (out.empty()) {
    throw Error(ErrorCode::kInternal,
                "transport plugin \"" + std::string(name) + "\" created no local ranks");
  }
  return out;
}

std::shared_ptr<Router> PluginRegistry::create_router(std::string_view name,
                                                      const RouterCreateArgs& args) const {
  const auto& l = get(PluginKind::kRouter, name);
  std::unique_ptr<Router> made;
  call_factory(l.info, [&] { return l.descriptor->create_router(args, made); });
  if (!made)
    throw Error(ErrorCode::kInternal,
                "router plugin \"" + std::string(name) + "\" created nothing");
  return keep_library_alive(std::move(made), l.library);
}

std::shared_ptr<ExpertKernel> PluginRegistry::create_expert(std::string_view name,
                                                            const ExpertCreateArgs& args) const {
  const auto& l = get(PluginKind::kExpert, name);
  std::unique_ptr<ExpertKernel> made;
  call_factory(l.info, [&] { return l.descriptor->create_expert(args, made); });
  if (!made)
    throw Error(ErrorCode::kInternal,
                "expert plugin \"" + std::string(name) + "\" created nothing");
  return keep_library_alive(std::move(made), l.library);
}

std::shared_ptr<DataPath> PluginRegistry::create_data_path(std::string_view name,
                                                           const DataPathCreateArgs& args) const {
  const auto& l = get(PluginKind::kDataPath, name);
  std::unique_ptr<DataPath> made;
  call_factory(l.info, [&] { return l.descriptor->create_data_path(args, made); });
  if (!made) {
    throw Error(ErrorCode::kInternal,
                "datapath plugin \"" + std::string(name) + "\" created nothing");
  }
  return keep_library_alive(std::move(made), l.library);
}

}  // namespace switchyard
