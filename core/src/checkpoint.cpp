// Checkpoints split over shards, and the `[model] layers` list.
#include "switchyard/checkpoint.hpp"

#include <algorithm>
#include <charconv>
#include <fstream>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "switchyard/status.hpp"

namespace switchyard {
namespace {

/// The index is JSON text of a few MB for the largest published models; far larger ones
/// are refused unread.
constexpr std::uintmax_t kMaxIndexBytes = 256u << 20;

[[noreturn]] void bad_index(const std::filesystem::path& path, const std::string& why) {
  throw Error(ErrorCode::kInvalidArgument,
              path.string() + ": not a valid safetensors index: " + why);
}

bool is_index_name(const std::filesystem::path& path) {
  const std::string name = path.filename().string();
  const std::string_view suffix = ".index.json";
  return name.size() > suffix.size() &&
         name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
}

/// A shard's file name must stay inside the index's folder: a plain relative path with no
/// ".." component (an index from elsewhere must not read arbitrary files).
bool is_plain_shard_name(const std::string& name) {
  if (name.empty()) return false;
  const std::filesystem::path p(name);
  if (p.is_absolute() || p.has_root_name() || p.has_root_directory()) return false;
  for (const auto& part : p) {
    if (part == ".." || part == ".") return false;
  }
  return true;
}

}  // namespace

Checkpoint::Checkpoint(const std::filesystem::path& given) {
  std::error_code ec;
  std::filesystem::path path = given;
  if (std::filesystem::is_directory(path, ec)) {
    if (std::filesystem::exists(path / "model.safetensors.index.json", ec)) {
      path /= "model.safetensors.index.json";
    } else if (std::filesystem::exists(path / "model.safetensors", ec)) {
      path /= "model.safetensors";
    } else {
      throw Error(ErrorCode::kNotFound,
                  given.string() +
                      ": folder holds neither model.safetensors.index.json nor model.safetensors");
    }
  }
  path_ = path;
  if (!is_index_name(path)) {
    open_shards_.emplace("", std::make_unique<SafetensorsFile>(path));
    return;
  }
  sharded_ = true;
  if (!std::filesystem::exists(path, ec)) {
    throw Error(ErrorCode::kNotFound, path.string() + ": safetensors index does not exist");
  }
  if (!std::filesystem::is_regular_file(path, ec)) bad_index(path, "not a regular file");
  const std::uintmax_t size = std::filesystem::file_size(path, ec);
  if (ec) bad_index(path, "cannot read its size: " + ec.message());
  if (size > kMaxIndexBytes) {
    bad_index(path,
              std::to_string(size) + " bytes, over the limit of " + std::to_string(kMaxIndexBytes));
  }
  std::ifstream in(path, std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  if (!in) bad_index(path, "cannot read it");
  nlohmann::json json;
  try {
    json = nlohmann::json::parse(text.str());
  } catch (const std::exception& e) {
    bad_index(path, std::string("not valid JSON: ") + e.what());
  }
  if (!json.is_object() || !json.contains("weight_map") || !json["weight_map"].is_object()) {
    bad_index(path, "it has no \"weight_map\" object");
  }
  for (const auto& [name, shard] : json["weight_map"].items()) {
    if (!shard.is_string()) bad_index(path, "tensor " + name + " maps to " + shard.dump());
    const auto file = shard.get<std::string>();
    if (!is_plain_shard_name(file)) {
      std::string why = "tensor " + name;
      why += " maps to \"" + file + "\", not a file name inside the index's folder";
      bad_index(path, why);
    }
    shard_of_name_.emplace(name, file);
  }
}

Checkpoint::~Checkpoint() = default;
Checkpoint::Checkpoint(Checkpoint&&) noexcept = default;
Checkpoint& Checkpoint::operator=(Checkpoint&&) noexcept = default;

bool Checkpoint::contains(const std::string& name) const {
  if (sharded_) return shard_of_name_.count(name) != 0;
  return open_shards_.begin()->second->contains(name);
}

SafetensorsFile& Checkpoint::shard_of(const std::string& name) {
  if (!sharded_) return *open_shards_.begin()->second;
  const auto it = shard_of_name_.find(name);
  if (it == shard_of_name_.end()) {
    throw Error(ErrorCode::kNotFound, path_.string() + ": tensor " + name + " not found");
  }
  auto& shard = open_shards_[it->second];
  if (!shard) {
    try {
      shard = std::make_unique<SafetensorsFile>(path_.parent_path() / it->second);
    } catch (const Error& e) {
      open_shards_.erase(it->second);
      throw Error(e.code(), path_.string() + ": shard of tensor " + name + ": " + e.message());
    }
  }
  if (!shard->contains(name)) {
    throw Error(ErrorCode::kInvalidArgument, path_.string() + ": the index puts tensor " + name +
                                                 " in " + it->second + ", which does not hold it");
  }
  return *shard;
}

const SafetensorsEntry& Checkpoint::entry(const std::string& name) {
  SafetensorsFile& file = shard_of(name);
  const auto it = file.entries().find(name);
  if (it == file.entries().end()) {
    throw Error(ErrorCode::kNotFound, path_.string() + ": tensor " + name + " not found");
  }
  return it->second;
}

HostTensor Checkpoint::read(const std::string& name) { return shard_of(name).read(name); }

HostTensor Checkpoint::read_f32(const std::string& name) { return shard_of(name).read_f32(name); }

std::vector<std::string> Checkpoint::names_with_prefix(std::string_view prefix) const {
  std::vector<std::string> names;
  auto add = [&](const std::string& name) {
    if (name.compare(0, prefix.size(), prefix) == 0) names.push_back(name);
  };
  if (sharded_) {
    for (const auto& [name, shard] : shard_of_name_) add(name);
  } else {
    for (const auto& [name, entry] : open_shards_.begin()->second->entries()) add(name);
  }
  return names;  // std::map order: sorted
}

std::vector<std::filesystem::path> Checkpoint::opened_files() const {
  std::vector<std::filesystem::path> files;
  for (const auto& [name, file] : open_shards_) {
    if (file) files.push_back(file->path());
  }
  return files;
}

std::string Checkpoint::description() const {
  if (!sharded_) return path_.string();
  std::set<std::string> shards;
  for (const auto& [name, shard] : shard_of_name_) shards.insert(shard);
  return "sharded checkpoint " + path_.string() + " (" + std::to_string(shards.size()) +
         (shards.size() == 1 ? " shard)" : " shards)");
}

std::vector<int> parse_layer_list(std::string_view text, std::string_view what) {
  constexpr int kMaxLayerNumber = 1 << 20;
  constexpr std::size_t kMaxLayers = 1 << 16;
  auto fail = [&](const std::string& why) -> void {
    throw Error(ErrorCode::kInvalidArgument, std::string(what) + ": \"" + std::string(text) +
                                                 "\": " + why +
                                                 " (e.g. \"3-60\", \"0,2,4\" or \"0-2,5\")");
  };
  if (text.find_first_not_of(" \t") == std::string_view::npos) return {0};
  std::set<int> layers;
  auto number = [&](std::string_view part) {
    const auto first = part.find_first_not_of(" \t");
    const auto last = part.find_last_not_of(" \t");
    if (first == std::string_view::npos) fail("an empty entry");
    part = part.substr(first, last - first + 1);
    int value = -1;
    const auto [end, ec] = std::from_chars(part.data(), part.data() + part.size(), value);
    if (ec != std::errc() || end != part.data() + part.size() || value < 0 ||
        value > kMaxLayerNumber) {
      fail("\"" + std::string(part) + "\" is not a layer number from 0 to " +
           std::to_string(kMaxLayerNumber));
    }
    return value;
  };
  std::size_t start = 0;
  while (start <= text.size()) {
    const std::size_t comma = std::min(text.find(',', start), text.size());
    const std::string_view item = text.substr(start, comma - start);
    // A '-' after the first non-blank character separates a range.
    const auto lead = item.find_first_not_of(" \t");
    const std::size_t dash =
        lead == std::string_view::npos ? std::string_view::npos : item.find('-', lead + 1);
    const int low = number(dash == std::string_view::npos ? item : item.substr(0, dash));
    const int high = dash == std::string_view::npos ? low : number(item.substr(dash + 1));
    if (high < low) fail("the range " + std::string(item) + " runs backwards");
    if (static_cast<std::size_t>(high - low) >= kMaxLayers ||
        layers.size() + static_cast<std::size_t>(high - low) >= kMaxLayers) {
      fail("more than " + std::to_string(kMaxLayers) + " layers");
    }
    for (int l = low; l <= high; ++l) layers.insert(l);
    start = comma + 1;
  }
  return {layers.begin(), layers.end()};
}

std::string layer_prefix(std::string_view prefix, int layer) {
  std::string out;
  constexpr std::string_view kToken = "{layer}";
  std::size_t start = 0;
  while (true) {
    const std::size_t at = prefix.find(kToken, start);
    out += prefix.substr(start, at == std::string_view::npos ? std::string_view::npos : at - start);
    if (at == std::string_view::npos) return out;
    out += std::to_string(layer);
    start = at + kToken.size();
  }
}

}  // namespace switchyard
