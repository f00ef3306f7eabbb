#pragma once
/// \file
/// Configuration: TOML files, environment and command-line overrides, and schemas that
/// declare every key with its type, default, documentation and check.
///
/// Precedence, lowest first: schema default < file < environment (`SWITCHYARD_<SECTION>_<KEY>`)
/// < command line (`--set section.key=value`) and API (`Config::set`).

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace switchyard {

/// Types a configuration key can have.
enum class ConfigType { kBool, kInt, kFloat, kString, kStringList };
std::string_view config_type_name(ConfigType type) noexcept;

/// A configuration value.
using ConfigValue = std::variant<bool, std::int64_t, double, std::string, std::vector<std::string>>;
/// Renders a value as TOML would write it: true, 3, 0.5, "text", ["a", "b"].
std::string format_config_value(const ConfigValue& value);

/// Where a value came from. Errors about a value start with `describe()`.
struct ConfigOrigin {
  enum class Kind { kDefault = 0, kFile = 1, kEnvironment = 2, kCommandLine = 3, kApi = 4 };
  Kind kind = Kind::kDefault;
  std::string where;  ///< file path, environment variable name, or the --set argument
  int line = 0;       ///< 1-based, files only
  int column = 0;     ///< 1-based, files only
  /// "moe.toml:12:5", "environment SWITCHYARD_ROUTER_TOP_K", "--set router.top_k=0",
  /// "API", "default".
  std::string describe() const;
};

/// Checks a value; returns an empty string when it is fine, else what is wrong
/// (e.g. "must be in 1..64 (got 0)").
using ConfigCheck = std::function<std::string(const ConfigValue&)>;

/// Declaration of one key.
struct ConfigKey {
  std::string name;
  ConfigType type = ConfigType::kString;
  /// Absent for keys that have no default (optional or computed from other keys; the
  /// doc says which).
  std::optional<ConfigValue> default_value;
  std::string doc;  ///< one line
  ConfigCheck check;
};

/// Ready-made checks.
namespace checks {
ConfigCheck int_range(std::int64_t min, std::int64_t max);
ConfigCheck positive();  ///< > 0, for ints and floats
/// A float number of seconds: finite, > 0 and at most `max_s`.
ConfigCheck seconds_up_to(double max_s);
ConfigCheck one_of(std::vector<std::string> allowed);
}  // namespace checks

/// The keys of one section (or the part of a section a plugin owns). Plain value.
class ConfigSchema {
 public:
  /// Adds a key; throws `Error(kInternal)` if the name is already declared.
  ConfigSchema& add(ConfigKey key);
  ConfigSchema& add(std::string name, ConfigType type, std::optional<ConfigValue> default_value,
                    std::string doc, ConfigCheck check = {});
  /// Adds every key of `other`.
  ConfigSchema& merge(const ConfigSchema& other);
  const ConfigKey* find(std::string_view name) const noexcept;
  std::span<const ConfigKey> keys() const noexcept { return keys_; }

 private:
  std::vector<ConfigKey> keys_;
};

/// The effective values of one section, validated against a schema. Values are typed
/// according to the schema; asking for a key the schema does not declare, or with the
/// wrong type, throws `Error(kInternal)`.
class ConfigSection {
 public:
  struct Entry {
    const ConfigKey* key = nullptr;  ///< points into the schema held by this section
    std::optional<ConfigValue> value;
    ConfigOrigin origin;
  };

  const std::string& name() const noexcept { return name_; }
  /// True when the key has a value (set anywhere, or a default).
  bool has(std::string_view key) const;
  bool get_bool(std::string_view key) const;
  std::int64_t get_int(std::string_view key) const;
  double get_float(std::string_view key) const;
  const std::string& get_string(std::string_view key) const;
  const std::vector<std::string>& get_string_list(std::string_view key) const;
  /// A string key read as a path: relative paths from a file are relative to that file's
  /// folder; relative paths from anywhere else are relative to the working directory.
  std::filesystem::path get_path(std::string_view key) const;
  const ConfigOrigin& origin(std::string_view key) const;
  /// Throws `Error(kInvalidArgument)` with "<origin>: <section>.<key>: <message>".
  [[noreturn]] void fail(std::string_view key, std::string_view message) const;
  /// Every declared key in declaration order.
  std::span<const Entry> entries() const noexcept { return entries_; }

 private:
  friend class Config;
  const Entry& entry(std::string_view key) const;
  std::string name_;
  std::shared_ptr<const ConfigSchema> schema_;
  std::vector<Entry> entries_;
};

/// The raw configuration: every value given in a file, the environment, on the command
/// line or through the API, with its origin. Cheap to copy. Not thread-safe for writes.
/// The largest configuration file read: far above any real one (a few KiB).
inline constexpr long kMaxConfigBytes = 1 << 20;

class Config {
 public:
  Config() = default;
  /// Parses a TOML file. Throws `Error(kNotFound)` if it does not exist,
  /// `Error(kInvalidArgument)` for a directory, a FIFO or other non-regular file, or one over
  /// `kMaxConfigBytes` (each checked before reading), and with "file:line:col: ..." if it is
  /// malformed.
  static Config from_file(const std::filesystem::path& path);
  /// Parses TOML text; `source_name` stands for the file name in messages.
  static Config from_string(std::string_view toml, const std::string& source_name = "<string>");

  /// Applies "section.key=value" as given on the command line (value parsed per schema
  /// type when the section is resolved). Throws `Error(kInvalidArgument)` if malformed.
  void set_from_command_line(std::string_view assignment);
  /// Sets a value through the API (highest precedence, like the command line).
  void set(std::string_view section, std::string_view key, ConfigValue value);
  /// Applies every `SWITCHYARD_<SECTION>_<KEY>=value` variable whose SECTION is one of
  /// `sections` (case-insensitive). Other SWITCHYARD_* variables are left alone.
  void apply_environment(std::span<const std::string_view> sections);

  /// Throws `Error(kInvalidArgument)` for any section that is not in `known`, with a
  /// did-you-mean suggestion.
  void check_sections(std::span<const std::string_view> known) const;
  /// Validates section `name` against `schema`: types, checks, unknown keys (with a
  /// did-you-mean). Throws `Error(kInvalidArgument)` naming the origin of the bad value.
  /// `reject_unknown = false` skips keys the schema does not declare (for a first pass
  /// before the plugin that declares them is known).
  ConfigSection section(std::string_view name, const ConfigSchema& schema,
                        bool reject_unknown = true) const;

  /// The file this config was read from (empty when not from a file).
  const std::filesystem::path& file() const noexcept { return file_; }

 private:
  struct RawEntry {
    std::variant<ConfigValue, std::string> value;  // typed (TOML, API) or text (env, CLI)
    ConfigOrigin origin;
  };
  void put(const std::string& section, std::string key, RawEntry entry);
  std::map<std::string, std::map<std::string, RawEntry, std::less<>>, std::less<>> values_;
  std::map<std::string, ConfigOrigin, std::less<>> section_origins_;
  std::filesystem::path file_;
};

/// Closest candidate to `word` by edit distance, or empty if none is close enough.
std::string did_you_mean(std::string_view word, std::span<const std::string> candidates);

}  // namespace switchyard
