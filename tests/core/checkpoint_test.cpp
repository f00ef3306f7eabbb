// Checkpoints over shards and the list of a model's MoE layers. Expected values are
// written out by hand: the tensors' contents are the small integers the test stored.
#include <doctest/doctest.h>

#include <fstream>

#include "switchyard/checkpoint.hpp"
#include "switchyard/io.hpp"
#include "switchyard/model.hpp"
#include "switchyard/status.hpp"
#include "test_support.hpp"

using namespace switchyard;

namespace {

/// A [rows, cols] f32 tensor whose element i is `start + i`.
HostTensor counting(std::int64_t rows, std::int64_t cols, float start) {
  HostTensor t(DType::kF32, {rows, cols});
  for (std::int64_t i = 0; i < rows * cols; ++i) t.data<float>()[i] = start + static_cast<float>(i);
  return t;
}

/// Two MoE layers (1 and 2) of E=2, H=2, F=3 in Qwen naming, over two shards: layer 1
/// wholly in shard A, layer 2 split (gate and expert 0 in A, expert 1 in B); layer 5 in
/// shard C, which is garbage. Returns the index's path.
std::filesystem::path write_sharded(const std::filesystem::path& dir) {
  std::map<std::string, HostTensor> a, b;
  for (int layer : {1, 2}) {
    const std::string p = "model.layers." + std::to_string(layer) + ".mlp.";
    a.emplace(p + "gate.weight", counting(2, 2, static_cast<float>(10 * layer)));
    for (int e = 0; e < 2; ++e) {
      auto& shard = layer == 2 && e == 1 ? b : a;
      const auto base = static_cast<float>(100 * layer + 10 * e);
      shard.emplace(p + "experts." + std::to_string(e) + ".gate_proj.weight", counting(3, 2, base));
      shard.emplace(p + "experts." + std::to_string(e) + ".up_proj.weight",
                    counting(3, 2, base + 1));
      shard.emplace(p + "experts." + std::to_string(e) + ".down_proj.weight",
                    counting(2, 3, base + 2));
    }
  }
  write_safetensors(dir / "model-00001-of-00003.safetensors", a);
  write_safetensors(dir / "model-00002-of-00003.safetensors", b);
  test::write_text(dir / "model-00003-of-00003.safetensors", "not a safetensors file at all");
  std::string map;
  for (const auto* shard : {&a, &b}) {
    const char* file =
        shard == &a ? "model-00001-of-00003.safetensors" : "model-00002-of-00003.safetensors";
    for (const auto& [name, t] : *shard) {
      map += (map.empty() ? "" : ",") + std::string("\"") + name + "\":\"" + file + "\"";
    }
  }
  map += ",\"model.layers.5.mlp.gate.weight\":\"model-00003-of-00003.safetensors\"";
  test::write_text(dir / "model.safetensors.index.json",
                   "{\"metadata\":{\"total_size\":1},\"weight_map\":{" + map + "}}");
  return dir / "model.safetensors.index.json";
}

}  // namespace

TEST_CASE("layer lists: numbers and ranges, ascending, each once") {
  CHECK(parse_layer_list("", "model.layers") == std::vector<int>{0});
  CHECK(parse_layer_list("3-6", "model.layers") == std::vector<int>{3, 4, 5, 6});
  CHECK(parse_layer_list("0,2,4", "model.layers") == std::vector<int>{0, 2, 4});
  CHECK(parse_layer_list(" 5, 0-2 ,1", "model.layers") == std::vector<int>{0, 1, 2, 5});
  CHECK(parse_layer_list("7", "model.layers") == std::vector<int>{7});
  CHECK(parse_layer_list("3-60", "x").size() == 58);
  for (const char* bad : {"3-1", "-1", "a", "1,,2", "1-", "2-x", "1.5", "0-70000", "99999999"}) {
    INFO(bad);
    const std::string message =
        test::error_message([&] { parse_layer_list(bad, "cfg:3: model.layers"); });
    CHECK(message.find("cfg:3: model.layers") != std::string::npos);
    CHECK(message.find("e.g. \"3-60\"") != std::string::npos);
  }
}

TEST_CASE("layer prefixes replace every {layer}") {
  CHECK(layer_prefix("model.layers.{layer}.mlp.", 12) == "model.layers.12.mlp.");
  CHECK(layer_prefix("a{layer}b{layer}", 3) == "a3b3");
  CHECK(layer_prefix("plain.", 9) == "plain.");
  CHECK(layer_prefix("", 0).empty());
}

TEST_CASE("a sharded checkpoint opens only the shards of the tensors read") {
  test::TempDir dir;
  const auto index = write_sharded(dir.path());
  for (const auto& opened_as : {index, dir.path()}) {  // the index, or its folder
    Checkpoint checkpoint(opened_as);
    CHECK(checkpoint.opened_files().empty());
    CHECK(checkpoint.contains("model.layers.2.mlp.experts.1.up_proj.weight"));
    CHECK_FALSE(checkpoint.contains("model.layers.3.mlp.gate.weight"));
    CHECK(checkpoint.names_with_prefix("model.layers.2.mlp.experts.1.").size() == 3);
    CHECK(checkpoint.description().find("(3 shards)") != std::string::npos);

    // Layer 1 lies in shard 1 alone.
    const ModelWeights layer1 =
        ModelWeights::load(checkpoint, CheckpointFormat::kDeepseek, "model.layers.1.mlp.");
    REQUIRE(checkpoint.opened_files().size() == 1);
    CHECK(checkpoint.opened_files()[0].filename() == "model-00001-of-00003.safetensors");
    CHECK(layer1.num_experts() == 2);
    CHECK(layer1.hidden() == 2);
    CHECK(layer1.ffn_hidden() == 3);
    CHECK(layer1.gate().data<float>()[3] == 13.0f);
    CHECK(layer1.experts(1, 1)[0].down.data_as<float>()[0] == 112.0f);

    // Layer 2 spans shards 1 and 2; shard 3 (garbage, layer 5) is never opened.
    const ModelWeights layer2 =
        ModelWeights::load(checkpoint, CheckpointFormat::kDeepseek, "model.layers.2.mlp.");
    CHECK(checkpoint.opened_files().size() == 2);
    CHECK(layer2.gate().data<float>()[0] == 20.0f);
    CHECK(layer2.experts(0, 2)[1].gate.data_as<float>()[5] == 215.0f);
    CHECK(layer2.experts(0, 2)[1].up.data_as<float>()[0] == 211.0f);

    // Reading layer 5 opens shard 3 and names it.
    const std::string message = test::error_message([&] {
      ModelWeights::load(checkpoint, CheckpointFormat::kDeepseek, "model.layers.5.mlp.");
    });
    CHECK(message.find("model-00003-of-00003.safetensors") != std::string::npos);
    CHECK(message.find("shard of tensor model.layers.5.mlp.gate.weight") != std::string::npos);
  }
}

TEST_CASE("a single-file checkpoint, or a folder holding one") {
  test::TempDir dir;
  std::map<std::string, HostTensor> tensors;
  tensors.emplace("gate.weight", counting(1, 2, 0.0f));
  tensors.emplace("experts.0.w1.weight", counting(1, 2, 1.0f));
  tensors.emplace("experts.0.w3.weight", counting(1, 2, 2.0f));
  tensors.emplace("experts.0.w2.weight", counting(2, 1, 3.0f));
  write_safetensors(dir / "model.safetensors", tensors);
  for (const auto& path : {dir / "model.safetensors", dir.path()}) {
    const ModelWeights m = ModelWeights::load(path, CheckpointFormat::kMixtral, "");
    CHECK(m.num_experts() == 1);
    CHECK(m.experts(0, 1)[0].down.data_as<float>()[1] == 4.0f);
  }
}

TEST_CASE("hostile indexes are refused with the file named") {
  test::TempDir dir;
  const auto index = dir / "model.safetensors.index.json";
  auto refused = [&](const std::string& text, const std::string& why) {
    test::write_text(index, text);
    INFO(text);
    const std::string message = test::error_message([&] { Checkpoint checkpoint(index); });
    CHECK(message.find(index.string()) != std::string::npos);
    CHECK(message.find(why) != std::string::npos);
  };
  refused("{", "not valid JSON");
  refused("[]", "no \"weight_map\"");
  refused("{\"weight_map\": 3}", "no \"weight_map\"");
  refused("{\"weight_map\": {\"a\": 3}}", "tensor a maps to 3");
  refused("{\"weight_map\": {\"a\": \"../secret.safetensors\"}}", "not a file name inside");
  refused("{\"weight_map\": {\"a\": \"/etc/passwd\"}}", "not a file name inside");
  refused("{\"weight_map\": {\"a\": \"\"}}", "not a file name inside");

  // A tensor the index puts in a shard that does not hold it.
  std::map<std::string, HostTensor> tensors;
  tensors.emplace("b", counting(1, 1, 0.0f));
  write_safetensors(dir / "s.safetensors", tensors);
  test::write_text(index,
                   "{\"weight_map\": {\"a\": \"s.safetensors\", \"b\": \"missing.safetensors\"}}");
  Checkpoint checkpoint(index);
  CHECK(test::error_message([&] { checkpoint.read("a"); }).find("which does not hold it") !=
        std::string::npos);
  CHECK(test::error_of([&] { checkpoint.read("b"); }).code() == ErrorCode::kNotFound);
  CHECK(test::error_of([&] { checkpoint.read("c"); }).code() == ErrorCode::kNotFound);

  // An empty folder, and a missing path.
  test::TempDir empty;
  CHECK(test::error_message([&] {
          Checkpoint c(empty.path());
        }).find("neither model.safetensors.index.json nor model.safetensors") != std::string::npos);
  CHECK(test::error_of([&] { Checkpoint c(dir / "nope.safetensors.index.json"); }).code() ==
        ErrorCode::kNotFound);
}

namespace {

/// An FP8 E4M3 [rows, cols] tensor every element of which is `code`.
HostTensor fp8_filled(std::int64_t rows, std::int64_t cols, std::uint8_t code) {
  HostTensor t(DType::kF8E4M3, {rows, cols});
  std::fill_n(t.data<std::uint8_t>(), rows * cols, code);
  return t;
}

HostTensor f32_values(std::vector<std::int64_t> shape, std::initializer_list<float> values) {
  HostTensor t(DType::kF32, std::move(shape));
  std::copy(values.begin(), values.end(), t.data<float>());
  return t;
}

}  // namespace

TEST_CASE("FP8 block-scaled experts and a shared expert load as stored") {
  // E=1, H=2, F=130: the gate and up projections span two row blocks of 128.
  // Codes: 0x38 is 1.0, 0x40 is 2.0, 0xC0 is -2.0 (E4M3, bias 7).
  test::TempDir dir;
  const std::string p = "model.layers.3.mlp.";
  std::map<std::string, HostTensor> t;
  t.emplace(p + "gate.weight", counting(1, 2, 0.0f));
  HostTensor gate_proj = fp8_filled(130, 2, 0x38);
  gate_proj.data<std::uint8_t>()[0] = 0x40;
  gate_proj.data<std::uint8_t>()[129 * 2 + 1] = 0xC0;
  t.emplace(p + "experts.0.gate_proj.weight", std::move(gate_proj));
  t.emplace(p + "experts.0.gate_proj.weight_scale_inv", f32_values({2, 1}, {0.5f, 4.0f}));
  t.emplace(p + "experts.0.up_proj.weight", fp8_filled(130, 2, 0x38));
  t.emplace(p + "experts.0.up_proj.weight_scale_inv", f32_values({2, 1}, {1.0f, 1.0f}));
  t.emplace(p + "experts.0.down_proj.weight", fp8_filled(2, 130, 0x40));
  t.emplace(p + "experts.0.down_proj.weight_scale_inv", f32_values({1, 2}, {0.25f, 3.0f}));
  t.emplace(p + "shared_experts.gate_proj.weight", counting(3, 2, 1.0f));
  t.emplace(p + "shared_experts.up_proj.weight", counting(3, 2, 2.0f));
  t.emplace(p + "shared_experts.down_proj.weight", counting(2, 3, 3.0f));
  write_safetensors(dir / "model.safetensors", t);

  const ModelWeights m =
      ModelWeights::load(dir / "model.safetensors", CheckpointFormat::kDeepseek, p);
  const SwigluExpertWeights w = m.experts(0, 1)[0];
  CHECK(w.gate.dtype() == DType::kF8E4M3);
  CHECK(m.weight_bytes() < 4 * 130 * 2 * 3);  // kept in FP8: one byte a weight
  constexpr std::size_t kRows = 130;
  std::vector<float> gate(kRows * 2), down(2 * kRows);
  widen_expert_weight(w.gate, w.gate_scale, gate.data());
  CHECK(gate[0] == 1.0f);                     // 2.0 × 0.5
  CHECK(gate[1] == 0.5f);                     // 1.0 × 0.5
  CHECK(gate[std::size_t{128} * 2] == 4.0f);  // 1.0 × 4, the second row block
  CHECK(gate[129 * 2 + 1] == -8.0f);          // -2.0 × 4
  widen_expert_weight(w.down, w.down_scale, down.data());
  CHECK(down[127] == 0.5f);  // 2.0 × 0.25, columns 0-127
  CHECK(down[128] == 6.0f);  // 2.0 × 3, columns 128-129
  CHECK(down[130 + 129] == 6.0f);

  REQUIRE(m.has_shared_expert());
  CHECK(m.shared_ffn_hidden() == 3);
  CHECK(m.shared_expert().gate.data() == nullptr);  // DeepSeek's: no gate
  CHECK(m.shared_expert().weights.down.data_as<float>()[5] == 8.0f);

  // An FP8 weight without its scales, or with scales of the wrong shape, is refused.
  auto without = t;
  without.erase(p + "experts.0.up_proj.weight_scale_inv");
  write_safetensors(dir / "unscaled.safetensors", without);
  const Error missing = test::error_of([&] {
    (void)ModelWeights::load(dir / "unscaled.safetensors", CheckpointFormat::kDeepseek, p);
  });
  CHECK(missing.code() == ErrorCode::kNotFound);
  CHECK(missing.message().find("experts.0.up_proj.weight_scale_inv") != std::string::npos);
  auto misshapen = t;
  misshapen.erase(p + "experts.0.down_proj.weight_scale_inv");
  misshapen.emplace(p + "experts.0.down_proj.weight_scale_inv", f32_values({1, 1}, {1.0f}));
  write_safetensors(dir / "misshapen.safetensors", misshapen);
  const Error shape = test::error_of([&] {
    (void)ModelWeights::load(dir / "misshapen.safetensors", CheckpointFormat::kDeepseek, p);
  });
  CHECK(shape.code() == ErrorCode::kInvalidArgument);
  CHECK(shape.message().find("expected [1,2]") != std::string::npos);
}
