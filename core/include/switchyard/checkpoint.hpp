#pragma once
/// \file
/// Checkpoints of whole models: one safetensors file, a Hugging Face sharded checkpoint
/// (`model.safetensors.index.json` and its shards), or a folder holding either; and the
/// list of a model's MoE layers (`[model] layers`).

#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "switchyard/io.hpp"
#include "switchyard/tensor.hpp"

namespace switchyard {

/// The tensors of a checkpoint that may span several safetensors files. Opened from
///  - a `.safetensors` file;
///  - a sharded checkpoint's index (`*.safetensors.index.json`: a JSON object whose
///    "weight_map" maps each tensor name to the file name of its shard, beside the index);
///  - a folder holding `model.safetensors.index.json` or `model.safetensors`.
/// A shard's header is read the first time one of its tensors is asked for, and its data
/// only tensor by tensor: reading some layers opens only the shards that hold them and
/// never reads another tensor's bytes. Not thread-safe.
class Checkpoint {
 public:
  /// Throws `Error(kNotFound)` for a missing path or a folder with neither file, and
  /// `Error(kInvalidArgument)` naming the file for a malformed index (not JSON, no
  /// "weight_map", a shard that is not a plain name inside the index's folder) or a bad
  /// single file.
  explicit Checkpoint(const std::filesystem::path& path);
  ~Checkpoint();
  Checkpoint(Checkpoint&&) noexcept;
  Checkpoint& operator=(Checkpoint&&) noexcept;

  /// The path it was opened from.
  const std::filesystem::path& path() const noexcept { return path_; }
  /// True when the checkpoint names a tensor of this name (no shard is opened).
  bool contains(const std::string& name) const;
  /// Its dtype, shape and place, from its shard's header (the shard is opened).
  /// `Error(kNotFound)` naming the checkpoint when absent; `Error(kInvalidArgument)` when
  /// the index names a shard that does not hold it.
  const SafetensorsEntry& entry(const std::string& name);
  /// The tensor in its stored dtype.
  HostTensor read(const std::string& name);
  /// The tensor widened to f32 (from F32, F16 or BF16).
  HostTensor read_f32(const std::string& name);
  /// Every tensor name whose name starts with `prefix`, sorted (no shard is opened).
  std::vector<std::string> names_with_prefix(std::string_view prefix) const;
  /// The shard files opened so far (a single-file checkpoint: that file).
  std::vector<std::filesystem::path> opened_files() const;
  /// "sharded checkpoint DIR/model.safetensors.index.json (3 shards)" or the file's path.
  std::string description() const;

 private:
  SafetensorsFile& shard_of(const std::string& name);
  std::filesystem::path path_;
  bool sharded_ = false;
  std::map<std::string, std::string> shard_of_name_;  // sharded: tensor -> shard file name
  std::map<std::string, std::unique_ptr<SafetensorsFile>> open_shards_;
};

/// The MoE layers of `[model] layers`: "" for the single layer of a one-layer model
/// (returned as {0}); otherwise comma-separated layer numbers and inclusive ranges, e.g.
/// "3-60" or "0,2,4" or "0-2,5". Returns them ascending, each once. Throws
/// `Error(kInvalidArgument)` naming `what` for anything else (a reversed range, a negative
/// number, more than 65536 layers).
std::vector<int> parse_layer_list(std::string_view text, std::string_view what);

/// `prefix` with every "{layer}" replaced by `layer` (a prefix without it is returned as
/// it is).
std::string layer_prefix(std::string_view prefix, int layer);

}  // namespace switchyard
