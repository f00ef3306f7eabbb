#include "switchyard/config.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>

#include <toml++/toml.h>

#include "switchyard/status.hpp"

extern char** environ;

namespace switchyard {

std::string_view config_type_name(ConfigType type) noexcept {
  switch (type) {
    case ConfigType::kBool:
      return "boolean";
    case ConfigType::kInt:
      return "integer";
    case ConfigType::kFloat:
      return "float";
    case ConfigType::kString:
      return "string";
    case ConfigType::kStringList:
      return "list of strings";
  }
  return "?";
}

std::string format_config_value(const ConfigValue& value) {
  struct Visitor {
    std::string operator()(bool b) const { return b ? "true" : "false"; }
    std::string operator()(std::int64_t i) const { return std::to_string(i); }
    std::string operator()(double d) const {
      std::ostringstream out;
      out << d;
      std::string s = out.str();
      if (s.find_first_of(".eEn") == std::string::npos) s += ".0";
      return s;
    }
    std::string operator()(const std::string& s) const { return "\"" + s + "\""; }
    std::string operator()(const std::vector<std::string>& list) const {
      std::string s = "[";
      for (std::size_t i = 0; i < list.size(); ++i) s += (i ? ", \"" : "\"") + list[i] + "\"";
      return s + "]";
    }
  };
  return std::visit(Visitor{}, value);
}

std::string ConfigOrigin::describe() const {
  switch (kind) {
    case Kind::kDefault:
      return "default";
    case Kind::kFile:
      return where + ":" + std::to_string(line) + ":" + std::to_string(column);
    case Kind::kEnvironment:
      return "environment " + where;
    case Kind::kCommandLine:
      return "--set " + where;
    case Kind::kApi:
      return "API";
  }
  return "?";
}

namespace checks {

ConfigCheck int_range(std::int64_t min, std::int64_t max) {
  return [min, max](const ConfigValue& v) -> std::string {
    const auto i = std::get<std::int64_t>(v);
    if (i >= min && i <= max) return {};
    return "must be in " + std::to_string(min) + ".." + std::to_string(max) + " (got " +
           std::to_string(i) + ")";
  };
}

ConfigCheck positive() {
  return [](const ConfigValue& v) -> std::string {
    if (const auto* i = std::get_if<std::int64_t>(&v)) {
      return *i > 0 ? std::string() : "must be > 0 (got " + std::to_string(*i) + ")";
    }
    const double d = std::get<double>(v);
    return d > 0 && std::isfinite(d) ? std::string()
                                     : "must be > 0 (got " + format_config_value(v) + ")";
  };
}

ConfigCheck seconds_up_to(double max_s) {
  return [max_s](const ConfigValue& v) -> std::string {
    const double d = std::get<double>(v);
    if (d > 0 && d <= max_s) return {};  // false for NaN too
    return "must be a number of seconds in (0, " + format_seconds(max_s) + "] (got " +
           format_config_value(v) + ")";
  };
}

ConfigCheck one_of(std::vector<std::string> allowed) {
  return [allowed = std::move(allowed)](const ConfigValue& v) -> std::string {
    const auto& s = std::get<std::string>(v);
    if (std::find(allowed.begin(), allowed.end(), s) != allowed.end()) return {};
    std::string msg = "must be one of ";
    for (std::size_t i = 0; i < allowed.size(); ++i) msg += (i ? ", \"" : "\"") + allowed[i] + "\"";
    msg += " (got \"" + s + "\")";
    const std::string guess = did_you_mean(s, allowed);
    if (!guess.empty()) msg += "; did you mean \"" + guess + "\"?";
    return msg;
  };
}

}  // namespace checks

ConfigSchema& ConfigSchema::add(ConfigKey key) {
  if (find(key.name) != nullptr) {
    throw Error(ErrorCode::kInternal, "config key '" + key.name + "' declared twice");
  }
  keys_.push_back(std::move(key));
  return *this;
}

ConfigSchema& ConfigSchema::add(std::string name, ConfigType type,
                                std::optional<ConfigValue> default_value, std::string doc,
                                ConfigCheck check) {
  return add(
      ConfigKey{std::move(name), type, std::move(default_value), std::move(doc), std::move(check)});
}

ConfigSchema& ConfigSchema::merge(const ConfigSchema& other) {
  for (const auto& key : other.keys()) add(key);
  return *this;
}

const ConfigKey* ConfigSchema::find(std::string_view name) const noexcept {
  for (const auto& key : keys_) {
    if (key.name == name) return &key;
  }
  return nullptr;
}

// ---------------------------------------------------------------------------------------
// ConfigSection

const ConfigSection::Entry& ConfigSection::entry(std::string_view key) const {
  for (const auto& e : entries_) {
    if (e.key->name == key) return e;
  }
  throw Error(ErrorCode::kInternal,
              "config key " + name_ + "." + std::string(key) + " is not declared in the schema");
}

bool ConfigSection::has(std::string_view key) const { return entry(key).value.has_value(); }

namespace {
template <typename T>
const T& typed(const ConfigSection::Entry& e, const std::string& section) {
  if (!e.value) {
    throw Error(ErrorCode::kInternal,
                "config key " + section + "." + e.key->name + " has no value and no default");
  }
  const T* v = std::get_if<T>(&*e.value);
  if (v == nullptr) {
    throw Error(ErrorCode::kInternal,
                "config key " + section + "." + e.key->name + " read with the wrong type");
  }
  return *v;
}
}  // namespace

bool ConfigSection::get_bool(std::string_view key) const { return typed<bool>(entry(key), name_); }
std::int64_t ConfigSection::get_int(std::string_view key) const {
  return typed<std::int64_t>(entry(key), name_);
}
double ConfigSection::get_float(std::string_view key) const {
  return typed<double>(entry(key), name_);
}
const std::string& ConfigSection::get_string(std::string_view key) const {
  return typed<std::string>(entry(key), name_);
}
const std::vector<std::string>& ConfigSection::get_string_list(std::string_view key) const {
  return typed<std::vector<std::string>>(entry(key), name_);
}

std::filesystem::path ConfigSection::get_path(std::string_view key) const {
  const auto& e = entry(key);
  std::filesystem::path p = typed<std::string>(e, name_);
  if (p.is_relative() && e.origin.kind == ConfigOrigin::Kind::kFile) {
    return std::filesystem::path(e.origin.where).parent_path() / p;
  }
  return p;
}

const ConfigOrigin& ConfigSection::origin(std::string_view key) const { return entry(key).origin; }

void ConfigSection::fail(std::string_view key, std::string_view message) const {
  throw Error(ErrorCode::kInvalidArgument, origin(key).describe() + ": " + name_ + "." +
                                               std::string(key) + ": " + std::string(message));
}

// ---------------------------------------------------------------------------------------
// Config

namespace {

std::string lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

ConfigOrigin file_origin(const std::string& file, const toml::source_region& region) {
  ConfigOrigin o;
  o.kind = ConfigOrigin::Kind::kFile;
  o.where = file;
  o.line = static_cast<int>(region.begin.line);
  o.column = static_cast<int>(region.begin.column);
  return o;
}

[[noreturn]] void fail_at(const ConfigOrigin& origin, const std::string& what,
                          const std::string& message) {
  throw Error(ErrorCode::kInvalidArgument, origin.describe() + ": " + what + ": " + message);
}

std::string unshield(std::string_view text);  // below, with the reason for it

ConfigValue value_from_toml(const toml::node& node, const ConfigOrigin& origin,
                            const std::string& what) {
  if (auto v = node.as_boolean()) return v->get();
  if (auto v = node.as_integer()) return v->get();
  if (auto v = node.as_floating_point()) return v->get();
  if (auto v = node.as_string()) return unshield(v->get());
  if (auto arr = node.as_array()) {
    std::vector<std::string> list;
    for (const auto& item : *arr) {
      auto s = item.as_string();
      if (!s) fail_at(origin, what, "only lists of strings are supported");
      list.push_back(unshield(s->get()));
    }
    return list;
  }
  if (node.is_table()) fail_at(origin, what, "nested tables are not supported here");
  fail_at(origin, what, "unsupported value type (dates and times are not used)");
}

std::optional<ConfigValue> parse_text(std::string_view text, ConfigType type) {
  std::string s(text);
  switch (type) {
    case ConfigType::kBool: {
      const std::string l = lower(s);
      if (l == "true" || l == "1" || l == "yes" || l == "on") return true;
      if (l == "false" || l == "0" || l == "no" || l == "off") return false;
      return std::nullopt;
    }
    case ConfigType::kInt: {
      std::int64_t v = 0;
      auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
      if (ec != std::errc() || ptr != s.data() + s.size() || s.empty()) return std::nullopt;
      return v;
    }
    case ConfigType::kFloat: {
      if (s.empty()) return std::nullopt;
      char* end = nullptr;
      const double v = std::strtod(s.c_str(), &end);
      if (end != s.c_str() + s.size()) return std::nullopt;
      return v;
    }
    case ConfigType::kString:
      if (s.size() >= 2 && s.front() == '"' && s.back() == '"') s = s.substr(1, s.size() - 2);
      return s;
    case ConfigType::kStringList: {
      std::vector<std::string> list;
      std::size_t start = 0;
      while (start <= s.size() && !s.empty()) {
        const std::size_t comma = s.find(',', start);
        list.push_back(
            s.substr(start, comma == std::string::npos ? std::string::npos : comma - start));
        if (comma == std::string::npos) break;
        start = comma + 1;
      }
      return list;
    }
  }
  return std::nullopt;
}

std::string value_type_name(const ConfigValue& v) {
  static const char* names[] = {"boolean", "integer", "float", "string", "list"};
  return names[v.index()];
}

}  // namespace

Config Config::from_file(const std::filesystem::path& path) {
  // Opened without blocking and checked on the descriptor: a FIFO or a device named as the
  // config is refused instead of read (a FIFO would block for ever).
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    const int error = errno;
    throw Error(error == ENOENT ? ErrorCode::kNotFound : ErrorCode::kSystem,
                "config file " + path.string() +
                    (error == ENOENT ? std::string(" does not exist")
                                     : std::string(": cannot open: ") + std::strerror(error)));
  }
  struct stat st {};
  std::string why;
  if (::fstat(fd, &st) != 0) {
    why = std::string("cannot stat: ") + std::strerror(errno);
  } else if (S_ISDIR(st.st_mode)) {
    why = "is a directory";
  } else if (!S_ISREG(st.st_mode)) {
    why = "is not a regular file";
  } else if (st.st_size > kMaxConfigBytes) {
    why = "is " + std::to_string(st.st_size) + " bytes; a configuration is at most " +
          std::to_string(kMaxConfigBytes);
  }
  std::string text;
  if (why.empty()) {
    text.resize(static_cast<std::size_t>(st.st_size));
    std::size_t have = 0;
    while (have < text.size()) {
      const ssize_t got = ::read(fd, text.data() + have, text.size() - have);
      if (got < 0 && errno == EINTR) continue;
      if (got <= 0) {
        why = std::string("cannot read: ") + (got < 0 ? std::strerror(errno) : "file shrank");
        break;
      }
      have += static_cast<std::size_t>(got);
    }
  }
  ::close(fd);
  if (!why.empty()) {
    throw Error(ErrorCode::kInvalidArgument, "config file " + path.string() + " " + why);
  }
  Config config = from_string(text, path.string());
  config.file_ = path;
  return config;
}

namespace {

// toml++ 3.3 reaches undefined behaviour (an "unreachable" branch of its Unicode tables)
// when it asks whether some characters are whitespace: U+00A1..U+0499, U+2C5E..U+3057
// but U+3000, and U+FB26..U+FEFE (every code point was checked against its table). It asks wherever
// TOML allows no such text (keys, bare values), and what it might do there is anyone's guess. So
// the text it parses has those characters "shielded": swapped one for one with private-use
// characters from U+E000, which it handles safely, and swapped back in every key, string and error
// message it returns. Private-use characters U+E000..U+EBFF are refused in a configuration (nothing
// real uses them), which keeps the swap one to one.
struct ShieldedRange {
  char32_t first, last, stand_in;
};
constexpr ShieldedRange kShielded[] = {
    {0xA1, 0x499, 0xE000}, {0x2C5E, 0x3057, 0xE400}, {0xFB26, 0xFEFE, 0xE800}};
constexpr char32_t kShieldFirst = 0xE000, kShieldLast = 0xEBFF;

/// Decodes one UTF-8 sequence at text[i]: its code point and length, or length 0 when it
/// is not valid UTF-8 (left for toml++ to refuse).
std::pair<char32_t, std::size_t> decode_utf8(std::string_view text, std::size_t i) {
  const auto byte = [&](std::size_t k) { return static_cast<unsigned char>(text[i + k]); };
  const unsigned char lead = byte(0);
  const std::size_t length = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC0 ? 2 : 0;
  if (length == 0 || lead >= 0xF8 || i + length > text.size()) return {0, 0};
  char32_t cp = lead & (0x7F >> length);
  for (std::size_t k = 1; k < length; ++k) {
    if ((byte(k) & 0xC0) != 0x80) return {0, 0};
    cp = (cp << 6) | (byte(k) & 0x3F);
  }
  return {cp, length};
}

void encode_utf8(char32_t cp, std::string& out) {
  if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
  } else {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
  }
  out += static_cast<char>(0x80 | (cp & 0x3F));
}

/// `text` with every character toml++ mishandles swapped for its private-use stand-in.
std::string shield(std::string_view text, const std::string& source_name) {
  std::string out;
  out.reserve(text.size() + text.size() / 2);
  int line = 1, column = 1;
  for (std::size_t i = 0; i < text.size();) {
    if (text[i] == '\n') {
      ++line;
      column = 0;
    }
    const auto [cp, length] = (static_cast<unsigned char>(text[i]) & 0x80) != 0
                                  ? decode_utf8(text, i)
                                  : std::pair<char32_t, std::size_t>{0, 0};
    if (length == 0) {
      out += text[i++];
      ++column;
      continue;
    }
    if (cp >= kShieldFirst && cp <= kShieldLast) {
      char hex[16];
      std::snprintf(hex, sizeof hex, "U+%04X", static_cast<unsigned>(cp));
      throw Error(ErrorCode::kInvalidArgument,
                  source_name + ":" + std::to_string(line) + ":" + std::to_string(column) +
                      ": a private-use character (" + hex + ") is not accepted in a configuration");
    }
    bool swapped = false;
    for (const auto& range : kShielded) {
      if (cp < range.first || cp > range.last || cp == 0x3000) continue;
      encode_utf8(range.stand_in + (cp - range.first), out);
      swapped = true;
    }
    if (!swapped) out.append(text.substr(i, length));
    i += length;
    ++column;
  }
  return out;
}

/// The inverse of `shield`, for what comes back from toml++.
std::string unshield(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (std::size_t i = 0; i < text.size();) {
    const auto [cp, length] = (static_cast<unsigned char>(text[i]) & 0x80) != 0
                                  ? decode_utf8(text, i)
                                  : std::pair<char32_t, std::size_t>{0, 0};
    if (length == 0) {
      out += text[i++];
      continue;
    }
    bool swapped = false;
    for (const auto& range : kShielded) {
      if (cp < range.stand_in || cp > range.stand_in + (range.last - range.first)) continue;
      encode_utf8(range.first + (cp - range.stand_in), out);
      swapped = true;
    }
    if (!swapped) out.append(text.substr(i, length));
    i += length;
  }
  return out;
}

}  // namespace

Config Config::from_string(std::string_view toml_text, const std::string& source_name) {
  const std::string shielded = shield(toml_text, source_name);
  toml::table table;
  try {
    table = toml::parse(shielded, source_name);
  } catch (const toml::parse_error& e) {
    const auto& where = e.source().begin;
    throw Error(ErrorCode::kInvalidArgument, source_name + ":" + std::to_string(where.line) + ":" +
                                                 std::to_string(where.column) +
                                                 ": malformed TOML: " + unshield(e.description()));
  }
  Config config;
  for (const auto& [section_key, node] : table) {
    const std::string section = unshield(section_key.str());
    const ConfigOrigin section_origin = file_origin(source_name, node.source());
    auto* sub = node.as_table();
    if (sub == nullptr) {
      fail_at(section_origin, section,
              "top-level keys are not allowed; put it inside a section such as [runtime]");
    }
    config.section_origins_.emplace(section, section_origin);
    for (const auto& [key, value] : *sub) {
      const ConfigOrigin origin = file_origin(source_name, value.source());
      const std::string name = unshield(key.str());
      std::string what = section;
      what += '.';
      what += name;
      config.put(section, name, RawEntry{value_from_toml(value, origin, what), origin});
    }
  }
  return config;
}

void Config::put(const std::string& section, std::string key, RawEntry entry) {
  auto& keys = values_[section];
  auto it = keys.find(key);
  // Equal or higher precedence replaces; lower precedence never does.
  if (it == keys.end()) {
    section_origins_.try_emplace(section, entry.origin);
    keys.emplace(std::move(key), std::move(entry));
  } else if (static_cast<int>(entry.origin.kind) >= static_cast<int>(it->second.origin.kind)) {
    it->second = std::move(entry);
  }
}

void Config::set_from_command_line(std::string_view assignment) {
  const auto eq = assignment.find('=');
  const auto dot = assignment.substr(0, eq).find('.');
  if (eq == std::string_view::npos || dot == std::string_view::npos || dot == 0 || dot + 1 >= eq) {
    throw Error(ErrorCode::kInvalidArgument, "--set " + std::string(assignment) +
                                                 ": expected section.key=value, e.g. "
                                                 "--set router.top_k=2");
  }
  ConfigOrigin origin;
  origin.kind = ConfigOrigin::Kind::kCommandLine;
  origin.where = std::string(assignment);
  put(std::string(assignment.substr(0, dot)), std::string(assignment.substr(dot + 1, eq - dot - 1)),
      RawEntry{std::string(assignment.substr(eq + 1)), origin});
}

void Config::set(std::string_view section, std::string_view key, ConfigValue value) {
  ConfigOrigin origin;
  origin.kind = ConfigOrigin::Kind::kApi;
  origin.where = std::string(section) + "." + std::string(key);
  put(std::string(section), std::string(key), RawEntry{std::move(value), origin});
}

void Config::apply_environment(std::span<const std::string_view> sections) {
  static constexpr std::string_view kPrefix = "SWITCHYARD_";
  for (char** env = environ; env != nullptr && *env != nullptr; ++env) {
    std::string_view entry(*env);
    if (entry.substr(0, kPrefix.size()) != kPrefix) continue;
    const auto eq = entry.find('=');
    if (eq == std::string_view::npos) continue;
    const std::string name(entry.substr(0, eq));
    const std::string rest = lower(entry.substr(kPrefix.size(), eq - kPrefix.size()));
    const auto underscore = rest.find('_');
    if (underscore == std::string::npos) continue;
    const std::string section = rest.substr(0, underscore);
    if (std::find(sections.begin(), sections.end(), section) == sections.end()) continue;
    ConfigOrigin origin;
    origin.kind = ConfigOrigin::Kind::kEnvironment;
    origin.where = name;
    put(section, rest.substr(underscore + 1), RawEntry{std::string(entry.substr(eq + 1)), origin});
  }
}

void Config::check_sections(std::span<const std::string_view> known) const {
  std::vector<std::string> names(known.begin(), known.end());
  // Every section a file named, with keys or empty (`[rnutime]` alone is a typo too).
  std::vector<std::string> seen;
  for (const auto& [section, keys] : values_) seen.push_back(section);
  for (const auto& [section, origin] : section_origins_) seen.push_back(section);
  for (const auto& section : seen) {
    if (std::find(known.begin(), known.end(), section) != known.end()) continue;
    auto it = section_origins_.find(section);
    const ConfigOrigin origin = it != section_origins_.end() ? it->second : ConfigOrigin{};
    std::string msg = "unknown section";
    const std::string guess = did_you_mean(section, names);
    if (!guess.empty()) msg += " (did you mean [" + guess + "]?)";
    msg += "; sections are:";
    for (const auto& n : names) msg += " [" + n + "]";
    fail_at(origin, "[" + section + "]", msg);
  }
}

ConfigSection Config::section(std::string_view name, const ConfigSchema& schema,
                              bool reject_unknown) const {
  ConfigSection out;
  out.name_ = std::string(name);
  out.schema_ = std::make_shared<const ConfigSchema>(schema);
  const auto section_it = values_.find(name);
  const std::string prefix = std::string(name) + ".";

  if (section_it != values_.end() && reject_unknown) {
    std::vector<std::string> known;
    for (const auto& key : schema.keys()) known.push_back(key.name);
    for (const auto& [key, raw] : section_it->second) {
      if (schema.find(key) != nullptr) continue;
      std::string msg = "unknown key";
      const std::string guess = did_you_mean(key, known);
      if (!guess.empty()) msg += " (did you mean '" + guess + "'?)";
      if (known.empty()) {
        msg += "; this section takes no keys";
      } else {
        msg += "; known keys:";
        for (const auto& k : known) msg += " " + k;
      }
      fail_at(raw.origin, prefix + key, msg);
    }
  }

  for (const auto& key : out.schema_->keys()) {
    ConfigSection::Entry entry;
    entry.key = &key;
    entry.value = key.default_value;
    const RawEntry* raw = nullptr;
    if (section_it != values_.end()) {
      auto it = section_it->second.find(key.name);
      if (it != section_it->second.end()) raw = &it->second;
    }
    if (raw != nullptr) {
      entry.origin = raw->origin;
      const std::string what = prefix + key.name;
      if (const auto* text = std::get_if<std::string>(&raw->value)) {
        auto parsed = parse_text(*text, key.type);
        if (!parsed) {
          fail_at(
              raw->origin, what,
              "expected " + std::string(config_type_name(key.type)) + " (got \"" + *text + "\")");
        }
        entry.value = std::move(parsed);
      } else {
        ConfigValue v = std::get<ConfigValue>(raw->value);
        // An integer is a valid float; nothing else converts.
        if (key.type == ConfigType::kFloat && std::holds_alternative<std::int64_t>(v)) {
          v = static_cast<double>(std::get<std::int64_t>(v));
        }
        const bool matches =
            (key.type == ConfigType::kBool && std::holds_alternative<bool>(v)) ||
            (key.type == ConfigType::kInt && std::holds_alternative<std::int64_t>(v)) ||
            (key.type == ConfigType::kFloat && std::holds_alternative<double>(v)) ||
            (key.type == ConfigType::kString && std::holds_alternative<std::string>(v)) ||
            (key.type == ConfigType::kStringList &&
             std::holds_alternative<std::vector<std::string>>(v));
        if (!matches) {
          fail_at(raw->origin, what,
                  "wrong type: expected " + std::string(config_type_name(key.type)) + ", got " +
                      value_type_name(v) + " " + format_config_value(v));
        }
        entry.value = std::move(v);
      }
      if (key.check) {
        const std::string problem = key.check(*entry.value);
        if (!problem.empty()) fail_at(raw->origin, what, problem);
      }
    }
    out.entries_.push_back(std::move(entry));
  }
  return out;
}

std::string did_you_mean(std::string_view word, std::span<const std::string> candidates) {
  const std::string w = lower(word);
  std::string best;
  std::size_t best_distance = std::string::npos;
  for (const auto& candidate : candidates) {
    const std::string c = lower(candidate);
    // Levenshtein distance, one row at a time.
    std::vector<std::size_t> row(c.size() + 1);
    for (std::size_t j = 0; j <= c.size(); ++j) row[j] = j;
    for (std::size_t i = 1; i <= w.size(); ++i) {
      std::size_t diagonal = row[0];
      row[0] = i;
      for (std::size_t j = 1; j <= c.size(); ++j) {
        const std::size_t above = row[j];
        row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (w[i - 1] == c[j - 1] ? 0 : 1)});
        diagonal = above;
      }
    }
    const std::size_t d = row[c.size()];
    if (d < best_distance) {
      best_distance = d;
      best = candidate;
    }
  }
  const std::size_t limit = std::max<std::size_t>(2, w.size() / 3);
  return best_distance <= limit ? best : std::string();
}

}  // namespace switchyard
